//! The platform metadata of this boot's launch (hostname, SSH keys, instance
//! facts), kept in /var/lib/aiware/platform.json: /etc is read-only on these
//! images, so nothing else keeps the hostname, and a boot that finds no launch
//! data (seed removed, metadata service slow) re-applies what was kept.

use crate::datasource::{LaunchData, PlatformMeta};
use crate::paths::Paths;
use crate::settings::Settings;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CachedPlatform {
    /// The datasource it came from (`nocloud`, `ec2`, ...).
    pub datasource: String,
    /// The instance it belongs to: metadata of another instance is never applied.
    pub instance_id: Option<String>,
    pub meta: PlatformMeta,
}

pub fn cache_file(paths: &Paths) -> std::path::PathBuf {
    paths.state_dir().join("platform.json")
}

pub fn load(paths: &Paths) -> Option<CachedPlatform> {
    serde_json::from_slice(&std::fs::read(cache_file(paths)).ok()?).ok()
}

pub fn save(paths: &Paths, c: &CachedPlatform) -> std::io::Result<()> {
    crate::files::write_private(
        &cache_file(paths),
        &serde_json::to_vec_pretty(c).unwrap_or_default(),
        0o600,
    )
}

/// This boot's platform metadata: that of the launch data found (it replaces
/// what was kept, even when it has none, so a new instance never inherits the
/// old one's keys), else what an earlier boot kept.
pub fn for_this_boot(paths: &Paths, found: Option<(&str, &LaunchData)>) -> Option<CachedPlatform> {
    let Some((source, ld)) = found else {
        return load(paths);
    };
    let c = CachedPlatform {
        datasource: source.to_string(),
        instance_id: ld.instance_id.clone(),
        meta: ld.platform.clone(),
    };
    if let Err(e) = save(paths, &c) {
        crate::log::info(&format!(
            "cannot keep the platform metadata in {}: {e}; a boot without launch data will not re-apply it",
            cache_file(paths).display()
        ));
    }
    Some(c)
}

/// The platform metadata that goes with `s`: the kept one when it is of the
/// same instance, else none.
pub fn for_settings(paths: &Paths, s: &Settings) -> PlatformMeta {
    load(paths)
        .filter(|c| c.instance_id == s.instance_id)
        .map(|c| c.meta)
        .unwrap_or_default()
}

/// Settings for a node without user-data: none of its own, only the
/// instance id the kept platform metadata belongs to, so that its hostname
/// and SSH keys are applied (afterburn's case: a key pair, no user-data).
/// `None` when the platform gave neither.
pub fn access_settings(paths: &Paths) -> Option<Settings> {
    let c = load(paths)?;
    (c.meta.hostname.is_some() || !c.meta.ssh_keys.is_empty()).then(|| Settings {
        instance_id: c.instance_id,
        ..Settings::default()
    })
}

/// The host name to set: user-data's wins over the platform's, as with cloud-init.
pub fn hostname<'a>(s: &'a Settings, p: &'a PlatformMeta) -> Option<(&'a str, &'static str)> {
    s.hostname.as_deref().map(|h| (h, "user-data")).or_else(|| {
        p.hostname
            .as_deref()
            .map(|h| (h, "the platform's metadata"))
    })
}

/// Whether a line is an OpenSSH public key (what validation asks of user-data's keys).
pub fn is_openssh_key(k: &str) -> bool {
    let kind = k.split_whitespace().next().unwrap_or("");
    kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-")
}

/// user-data's keys, then the platform's (each once). A platform line that is
/// no OpenSSH key is left out with a log line: it is not the user's settings
/// to refuse.
pub fn authorized_keys(s: &Settings, p: &PlatformMeta) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for k in &s.ssh_authorized_keys {
        if !out.contains(k) {
            out.push(k.clone());
        }
    }
    for k in &p.ssh_keys {
        if !is_openssh_key(k) {
            let short: String = k.chars().take(20).collect();
            crate::log::info(&format!(
                "the platform's SSH key {short:?}… is not an OpenSSH public key (left out)"
            ));
        } else if !out.contains(k) {
            out.push(k.clone());
        }
    }
    out
}

/// Settings that default to instance facts when user-data leaves them unset:
/// `AIWARE_SERVER_TYPE` to the instance type, `AIWARE_REGION` to the region.
pub fn with_defaults(mut s: Settings, p: &PlatformMeta) -> Settings {
    for (key, fact) in [
        ("AIWARE_SERVER_TYPE", &p.instance_type),
        ("AIWARE_REGION", &p.region),
    ] {
        if let (None, Some(v)) = (s.get(key), fact) {
            s.vars.insert(key.to_string(), v.clone());
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(instance: &str, hostname: Option<&str>, keys: &[&str]) -> Settings {
        Settings {
            instance_id: Some(instance.into()),
            hostname: hostname.map(String::from),
            ssh_authorized_keys: keys.iter().map(|k| k.to_string()).collect(),
            ..Settings::default()
        }
    }

    fn launch(instance: &str, hostname: &str, key: &str) -> LaunchData {
        LaunchData {
            user_data: Some(b"AIWARE_MODE=engine\n".to_vec()),
            instance_id: Some(instance.into()),
            platform: PlatformMeta {
                hostname: Some(hostname.into()),
                ssh_keys: vec![key.into()],
                instance_type: Some("m5.large".into()),
                ..PlatformMeta::default()
            },
        }
    }

    #[test]
    fn kept_for_the_same_instance_replaced_by_a_new_one() {
        let t = tempfile::tempdir().unwrap();
        let paths = Paths::new(t.path());
        assert_eq!(for_this_boot(&paths, None), None);
        let first = launch("i-1", "node-a", "ssh-ed25519 AAAA1 a");
        let c = for_this_boot(&paths, Some(("ec2", &first))).unwrap();
        assert_eq!(c.meta.hostname.as_deref(), Some("node-a"));
        // A boot without launch data: what was kept.
        assert_eq!(for_this_boot(&paths, None), Some(c.clone()));
        assert_eq!(
            for_settings(&paths, &settings("i-1", None, &[])),
            first.platform
        );
        // Settings of another instance get none of it.
        assert_eq!(
            for_settings(&paths, &settings("i-2", None, &[])),
            PlatformMeta::default()
        );
        // A new instance without metadata replaces the kept keys with none.
        let bare = LaunchData {
            instance_id: Some("i-2".into()),
            ..LaunchData::default()
        };
        for_this_boot(&paths, Some(("ec2", &bare)));
        assert_eq!(
            for_settings(&paths, &settings("i-2", None, &[])),
            PlatformMeta::default()
        );
        assert_eq!(
            for_settings(&paths, &settings("i-1", None, &[])),
            PlatformMeta::default()
        );
    }

    #[test]
    fn user_data_hostname_wins_and_keys_are_merged_once() {
        let p = launch("i-1", "platform-name", "ssh-ed25519 AAAA1 a").platform;
        let s = settings("i-1", Some("user-name"), &["ssh-ed25519 AAAA1 a"]);
        assert_eq!(hostname(&s, &p), Some(("user-name", "user-data")));
        let s2 = settings("i-1", None, &["ssh-rsa AAAA9 b"]);
        assert_eq!(
            hostname(&s2, &p),
            Some(("platform-name", "the platform's metadata"))
        );
        assert_eq!(authorized_keys(&s, &p), ["ssh-ed25519 AAAA1 a"]);
        assert_eq!(
            authorized_keys(&s2, &p),
            ["ssh-rsa AAAA9 b", "ssh-ed25519 AAAA1 a"]
        );
        let odd = PlatformMeta {
            ssh_keys: vec!["not a key".into()],
            ..PlatformMeta::default()
        };
        assert!(authorized_keys(&settings("i", None, &[]), &odd).is_empty());
    }

    #[test]
    fn server_type_and_region_default_to_the_instance_facts() {
        let p = PlatformMeta {
            instance_type: Some("n2-standard-4".into()),
            region: Some("us-central1".into()),
            ..PlatformMeta::default()
        };
        let s = with_defaults(settings("i", None, &[]), &p);
        assert_eq!(s.get("AIWARE_SERVER_TYPE"), Some("n2-standard-4"));
        assert_eq!(s.get("AIWARE_REGION"), Some("us-central1"));
        let mut given = settings("i", None, &[]);
        given
            .vars
            .insert("AIWARE_SERVER_TYPE".into(), "gpu-large".into());
        let s = with_defaults(given, &p);
        assert_eq!(s.get("AIWARE_SERVER_TYPE"), Some("gpu-large"));
        let none = with_defaults(settings("i", None, &[]), &PlatformMeta::default());
        assert!(none.vars.is_empty());
    }
}
