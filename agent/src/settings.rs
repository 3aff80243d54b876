//! Resolved node settings: the `AIWARE_*` variables of the guide, the common
//! cloud-config keys, and their validation against this image.

use crate::userdata::{UserData, WriteFile};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// Every `AIWARE_*` variable the agent knows, with a one-line meaning.
/// Others are kept and passed through to the aiWARE containers with a warning.
pub const KNOWN_VARS: &[(&str, &str)] = &[
    ("AIWARE_MODE", "run modes of this node, comma separated"),
    ("AIWARE_LICENSE", "aiWARE license key"),
    (
        "AIWARE_CONTROLLER",
        "Edge API URL of the controller, http://IP:9000/edge/v1",
    ),
    (
        "AIWARE_INIT_TOKEN",
        "initial admin token, the bearer token for the controller",
    ),
    (
        "AIWARE_HOST_EXPIRE",
        "true/false: whether aiWARE may expire this host",
    ),
    ("AIWARE_DOMAIN_NAME", "domain name served by the lb mode"),
    ("AIWARE_HOST_IP", "IP address this host announces"),
    ("AIWARE_ROOT", "aiWARE root directory (default /opt/aiware)"),
    (
        "AIWARE_REGION",
        "region label of this host (default: the cloud region)",
    ),
    (
        "AIWARE_SERVER_TYPE",
        "server type of this host (default: the instance type)",
    ),
    (
        "AIWARE_AGENT_UPDATE_INTERVAL",
        "seconds between status reports (default 60)",
    ),
    (
        "AIWARE_AUTOREMOVE_ENGINES",
        "remove engine containers when they exit (default true)",
    ),
    (
        "AIWARE_AGENT_PORT",
        "port of the agent's metrics (default 8000)",
    ),
    ("AIWARE_DB_HOST", "PostgreSQL host"),
    ("AIWARE_DB_PORT", "PostgreSQL port (default 5432)"),
    ("AIWARE_DB_NAME", "PostgreSQL database"),
    ("AIWARE_DB_USER", "PostgreSQL user"),
    ("AIWARE_DB_PASS", "PostgreSQL password"),
    ("AIWARE_DB_PASSWORD", "PostgreSQL password (alias)"),
    (
        "AIWARE_CONTROLLER_CA",
        "PEM CA certificate(s), or a PEM file's path, for an https controller with a private CA (aiwimg)",
    ),
    (
        "AIWARE_UPDATE_POLICY",
        "image updates: off, notify (default) or auto (aiwimg)",
    ),
    (
        "AIWARE_UPDATE_URL",
        "update server (default: the image's update_url) (aiwimg)",
    ),
    (
        "AIWARE_UPDATE_VERSION",
        "install exactly this image version, never a newer one (aiwimg)",
    ),
    (
        "AIWARE_UPDATE_WINDOW",
        "HH:MM-HH:MM UTC when `auto` may install and reboot (aiwimg)",
    ),
    (
        "AIWARE_UPDATE_CHECK_INTERVAL",
        "seconds between update checks (default 21600) (aiwimg)",
    ),
    ("AIWARE_NFS_SERVER", "NFS server for the cache"),
    (
        "AIWARE_NFS_PATH",
        "exported path of the cache (default /opt/aiware/nfs)",
    ),
    (
        "AIWARE_NFS_PERMITTED",
        "clients allowed to mount the nfs export",
    ),
    ("AIWARE_REDIS_PASSWORD", "Redis password"),
    (
        "AIWARE_REGISTRY",
        "the cluster's registry, HOST:PORT over TLS or http://HOST:PORT (the only one trusted over plain HTTP)",
    ),
    (
        "AIWARE_REGISTRY_CERT",
        "registry mode: its TLS certificate (PEM text or file path), from the cluster's CA",
    ),
    ("AIWARE_REGISTRY_KEY", "registry mode: the certificate's private key"),
    ("AIWARE_REGISTRY_USER", "registry user"),
    ("AIWARE_REGISTRY_PASSWORD", "registry password"),
    ("AIWARE_MINIO_ACCESS_KEY", "MinIO access key"),
    ("AIWARE_MINIO_SECRET_KEY", "MinIO secret key"),
    (
        "AIWARE_CACHE_DIR",
        "local path of the cluster cache (default /cache)",
    ),
    // The mode containers (modes.toml `settings` prefixes): image, arguments, extra env.
    ("AIWARE_CONTROLLER_IMAGE", "image of the aiware-controller container (default aiware-controller:latest)"),
    ("AIWARE_CONTROLLER_ARGS", "arguments of the aiware-controller container, whitespace separated"),
    ("AIWARE_CONTROLLER_ENV", "extra KEY=VALUE words for the aiware-controller container"),
    ("AIWARE_API_IMAGE", "image of the aiware-api container"),
    ("AIWARE_API_ARGS", "arguments of the aiware-api container"),
    ("AIWARE_API_ENV", "extra KEY=VALUE words for the aiware-api container"),
    ("AIWARE_ES_IMAGE", "image of the aiware-elasticsearch container"),
    ("AIWARE_ES_ARGS", "arguments of the aiware-elasticsearch container"),
    ("AIWARE_ES_ENV", "extra KEY=VALUE words for the aiware-elasticsearch container"),
    ("AIWARE_MINIO_IMAGE", "image of the aiware-minio container"),
    ("AIWARE_MINIO_ARGS", "arguments of the aiware-minio container"),
    ("AIWARE_MINIO_ENV", "extra KEY=VALUE words for the aiware-minio container"),
    ("AIWARE_NSQ_IMAGE", "image of the aiware-nsqd container"),
    ("AIWARE_NSQ_ARGS", "arguments of the aiware-nsqd container"),
    ("AIWARE_NSQ_ENV", "extra KEY=VALUE words for the aiware-nsqd container"),
    ("AIWARE_NSQLOOKUPD_IMAGE", "image of the aiware-nsqlookupd container"),
    ("AIWARE_NSQLOOKUPD_ARGS", "arguments of the aiware-nsqlookupd container"),
    ("AIWARE_NSQLOOKUPD_ENV", "extra KEY=VALUE words for the aiware-nsqlookupd container"),
];

pub const DEFAULT_UPDATE_INTERVAL_S: u64 = 60;
pub const REDACTED: &str = "<redacted>";

/// True for variables whose value is a secret.
pub fn is_secret(key: &str) -> bool {
    ["TOKEN", "LICENSE", "PASS", "SECRET", "KEY"]
        .iter()
        .any(|s| key.contains(s))
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub vars: BTreeMap<String, String>,
    pub hostname: Option<String>,
    pub ssh_authorized_keys: Vec<String>,
    pub write_files: Vec<WriteFile>,
    /// cloud-config `swap`: a swap file on /var.
    #[serde(default)]
    pub swap: Option<crate::swap::Swap>,
    /// cloud-config `disk_setup`, `fs_setup`, `mounts`: applied first.
    #[serde(default)]
    pub storage: crate::storage::Storage,
    /// cloud-config `users`: accounts in /run/userdb, homes on /var.
    #[serde(default)]
    pub users: Vec<crate::users::User>,
    /// cloud-config `groups`: groups in /run/userdb and their members.
    #[serde(default)]
    pub groups: Vec<crate::users::Group>,
    /// cloud-config `ntp`, `timezone`, `ca_certs` ([`crate::os_config`]).
    #[serde(default)]
    pub ntp: Option<crate::os_config::Ntp>,
    #[serde(default)]
    pub timezone: Option<String>,
    #[serde(default)]
    pub ca_certs: Option<crate::os_config::CaCerts>,
    pub warnings: Vec<String>,
    /// The launch this came from (cloud instance-id, NoCloud instance-id, or a digest).
    pub instance_id: Option<String>,
}

impl Settings {
    pub fn from_user_data(u: UserData, instance_id: Option<String>) -> Settings {
        let mut warnings = u.warnings;
        for k in u.vars.keys() {
            if !KNOWN_VARS.iter().any(|(n, _)| n == k) {
                warnings.push(format!(
                    "{k} is not a setting aiw-agent knows; it is kept and passed to the aiWARE containers"
                ));
            }
        }
        if let Some(w) = u
            .vars
            .get("AIWARE_CONTROLLER")
            .and_then(|c| controller_path_warning(c))
        {
            warnings.push(w);
        }
        Settings {
            vars: u.vars,
            hostname: u.hostname,
            ssh_authorized_keys: u.ssh_authorized_keys,
            write_files: u.write_files,
            swap: u.swap,
            storage: u.storage,
            users: u.users,
            groups: u.groups,
            ntp: u.ntp,
            timezone: u.timezone,
            ca_certs: u.ca_certs,
            warnings,
            instance_id,
        }
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.vars
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// `AIWARE_MODE` split on commas/spaces, lower-cased, unique, in order.
    pub fn modes(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for m in self
            .get("AIWARE_MODE")
            .unwrap_or("")
            .split([',', ' ', ';'])
            .map(|m| m.trim().to_ascii_lowercase())
            .filter(|m| !m.is_empty())
        {
            if !out.contains(&m) {
                out.push(m);
            }
        }
        out
    }

    pub fn controller(&self) -> Option<&str> {
        self.get("AIWARE_CONTROLLER")
    }

    pub fn update_interval_s(&self) -> u64 {
        self.get("AIWARE_AGENT_UPDATE_INTERVAL")
            .and_then(|v| v.parse().ok())
            .filter(|v| *v > 0)
            .unwrap_or(DEFAULT_UPDATE_INTERVAL_S)
    }

    /// Every secret value, for scrubbing text before it is logged.
    pub fn secrets(&self) -> Vec<String> {
        self.vars
            .iter()
            .filter(|(k, v)| is_secret(k) && v.len() >= 4)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// JSON for `check`/`status`: secrets replaced by [`REDACTED`], file contents left out.
    pub fn redacted_json(&self) -> Value {
        let vars: BTreeMap<&str, String> = self
            .vars
            .iter()
            .map(|(k, v)| {
                let shown = if is_secret(k) && !v.is_empty() {
                    REDACTED.to_string()
                } else {
                    crate::log::scrub_url_userinfo(v)
                };
                (k.as_str(), shown)
            })
            .collect();
        let files: Vec<Value> = self
            .write_files
            .iter()
            .map(|f| json!({"path": f.path, "bytes": f.content.len(), "permissions": format!("{:04o}", f.permissions), "append": f.append}))
            .collect();
        json!({
            "vars": vars,
            "modes": self.modes(),
            "hostname": self.hostname,
            "ssh_authorized_keys": self.ssh_authorized_keys.len(),
            "write_files": files,
            "swap": self.swap,
            "storage": self.storage,
            "users": self.users.iter().map(|u| json!({"name": u.name, "groups": u.groups, "sudo": !u.sudo.is_empty(), "ssh_authorized_keys": u.ssh_authorized_keys.len()})).collect::<Vec<_>>(),
            "groups": self.groups,
            "ntp": self.ntp,
            "timezone": self.timezone,
            "ca_certs": self.ca_certs.as_ref().map(|c| json!({"trusted": c.trusted.len(), "remove_defaults": c.remove_defaults})),
            "instance_id": self.instance_id,
            "warnings": self.warnings.iter().map(|w| crate::log::scrub_url_userinfo(w)).collect::<Vec<_>>(),
        })
    }
}

/// An `ssh_authorized_keys` entry must look like an OpenSSH public key.
pub fn check_public_key(k: &str) -> Result<(), String> {
    let kind = k.split_whitespace().next().unwrap_or("");
    if kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-") {
        return Ok(());
    }
    let short: String = k.chars().take(20).collect();
    Err(format!(
        "ssh_authorized_keys entry {short:?}… is not an OpenSSH public key (ssh-ed25519 AAAA…)"
    ))
}

/// `write_files` may only write to the writable parts of the image.
pub fn check_write_path(path: &str) -> Result<(), String> {
    let p = std::path::Path::new(path);
    if !p.is_absolute() || path.split('/').any(|c| c == "..") {
        return Err(format!(
            "write_files path {path:?} must be absolute, without '..'"
        ));
    }
    if ["/var/", "/run/", "/opt/"]
        .iter()
        .any(|r| path.starts_with(r))
    {
        return Ok(());
    }
    if path.starts_with("/etc/") || path.starts_with("/usr/") {
        return Err(format!(
            "write_files path {path}: /etc and /usr are read-only on aiwimg images (dm-verity); \
             write under /var, /run or /opt, or set the matching AIWARE_* setting instead"
        ));
    }
    Err(format!(
        "write_files path {path}: only /var, /run and /opt are writable on aiwimg images"
    ))
}

pub fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// The Edge API path the guide gives the controller URL.
pub const EDGE_API_PATH: &str = "/edge/v1";

/// A warning when `AIWARE_CONTROLLER` does not end in `/edge/v1`: the agent
/// calls the URL as given, so it says which URL that is.
pub fn controller_path_warning(url: &str) -> Option<String> {
    let base = url.trim().trim_end_matches('/');
    if base.is_empty() || base.ends_with(EDGE_API_PATH) || check_url(base).is_err() {
        return None;
    }
    let shown = crate::log::scrub_url_userinfo(base);
    let after_scheme = base.split_once("://").map(|(_, r)| r).unwrap_or(base);
    let root = match after_scheme.find('/') {
        Some(i) => &base[..base.len() - after_scheme.len() + i],
        None => base,
    };
    let root = crate::log::scrub_url_userinfo(root);
    Some(format!(
        "AIWARE_CONTROLLER={shown} does not end in {EDGE_API_PATH}: the agent calls it as given, \
         e.g. {shown}/host/register; the controller's Edge API is usually \
         {root}{EDGE_API_PATH} (AIWARE_CONTROLLER={root}{EDGE_API_PATH})"
    ))
}

/// A minimal URL check: `http(s)://host[:port][/path]`.
pub fn check_url(url: &str) -> Result<(), String> {
    let rest = if let Some(r) = url.strip_prefix("http://") {
        r
    } else if let Some(r) = url.strip_prefix("https://") {
        r
    } else {
        return Err(
            "must start with http:// or https://, e.g. http://10.0.0.5:9000/edge/v1".into(),
        );
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') {
        // Never repeated in the message: it would print the password.
        return Err(
            "has a user name or password in it (user:password@host); the agent authenticates \
             with AIWARE_INIT_TOKEN, so write the URL without credentials"
                .into(),
        );
    }
    let (host, port) = if let Some(h) = authority.strip_prefix('[') {
        let (h, p) = h.split_once(']').ok_or("unclosed [ in the IPv6 address")?;
        (h, p.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("has no host".into());
    }
    if host.parse::<IpAddr>().is_err() && !valid_hostname(host) {
        return Err(format!(
            "host {host:?} is neither an IP address nor a host name"
        ));
    }
    if let Some(p) = port {
        if p.parse::<u16>().ok().filter(|p| *p > 0).is_none() {
            return Err(format!("port {p:?} is not a number from 1 to 65535"));
        }
    }
    if rest.contains(char::is_whitespace) {
        return Err("contains spaces".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modes::{ImageInfo, ModeTable};
    use crate::userdata::parse;
    use crate::validate::{validate, ImageContext};

    fn image() -> ImageInfo {
        ImageInfo {
            profile: "engine".into(),
            version: "1".into(),
            modes: vec!["engine".into()],
            profiles: [
                ("engine".to_string(), vec!["engine".to_string()]),
                (
                    "controller".to_string(),
                    vec!["controller".into(), "db".into(), "nfs".into()],
                ),
            ]
            .into(),
            gpu: false,
            vendor_agent: None,
            container_images: Vec::new(),
        }
    }

    #[test]
    fn every_container_settings_prefix_is_known() {
        let t = ModeTable::load(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/modes.toml"),
        )
        .unwrap();
        for spec in t.modes.values() {
            for c in &spec.containers {
                for suffix in ["IMAGE", "ARGS", "ENV"] {
                    let k = format!("{}_{suffix}", c.settings);
                    assert!(
                        KNOWN_VARS.iter().any(|(n, _)| *n == k),
                        "{k} not in KNOWN_VARS"
                    );
                }
            }
        }
        let s = Settings::from_user_data(
            parse(b"AIWARE_MODE=controller\nAIWARE_CONTROLLER_IMAGE=a;b\n").unwrap(),
            None,
        );
        let e = validate(
            &s,
            &ImageContext {
                table: Some(&t),
                image: None,
            },
        );
        assert!(
            e.iter().any(|x| x.starts_with("AIWARE_CONTROLLER_IMAGE=")),
            "{e:?}"
        );
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    }

    fn errs(text: &str) -> Vec<String> {
        let s = Settings::from_user_data(parse(text.as_bytes()).unwrap(), None);
        let img = image();
        validate(
            &s,
            &ImageContext {
                table: None,
                image: Some(&img),
            },
        )
    }

    #[test]
    fn a_swap_file_must_live_on_var() {
        let engine = "#cloud-config\naiware:\n  mode: engine\n  license: L\n  controller: http://10.0.0.5:9000/edge/v1\n  init_token: abcd-1234\n";
        assert!(errs(&format!("{engine}swap:\n  size: 1G\n")).is_empty());
        for f in ["/swap.img", "/var/../etc/swap", "/var/"] {
            let e = errs(&format!("{engine}swap:\n  filename: {f}\n  size: 1G\n"));
            assert!(
                e.iter()
                    .any(|x| x.starts_with("swap.filename") && x.contains("/var/swap.img")),
                "{f}: {e:?}"
            );
        }
    }

    #[test]
    fn valid_engine() {
        let e = errs("AIWARE_MODE=engine\nAIWARE_LICENSE=L\nAIWARE_CONTROLLER=http://10.0.0.5:9000/edge/v1\nAIWARE_INIT_TOKEN=abcd-1234\n");
        assert!(e.is_empty(), "{e:?}");
    }

    #[test]
    fn engine_without_controller_and_unbaked_mode() {
        let e = errs("AIWARE_MODE=engine,db\nAIWARE_LICENSE=L\n");
        assert!(
            e.iter().any(|m| m.contains("needs AIWARE_CONTROLLER")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|m| m.contains("\"db\" is not baked") && m.contains("controller")),
            "{e:?}"
        );
        let e = errs("AIWARE_MODE=ftp\n");
        assert!(e[0].contains("unknown mode \"ftp\""), "{e:?}");
    }

    #[test]
    fn urls_placeholders_and_redaction() {
        assert!(check_url("http://[::1]:9000/edge/v1").is_ok());
        assert!(check_url("ftp://x").is_err());
        assert!(check_url("https://api.example.com/edge/v1").is_ok());
        assert!(check_url("https://:443/edge/v1").is_err());
        let base = "AIWARE_MODE=engine\nAIWARE_LICENSE=l123\nAIWARE_INIT_TOKEN=t123\n";
        let e = errs(&format!(
            "{base}AIWARE_CONTROLLER=https://c/edge/v1\nAIWARE_CONTROLLER_CA=not-a-cert\n"
        ));
        assert!(
            e.iter()
                .any(|m| m.starts_with("AIWARE_CONTROLLER_CA:") && m.contains("no certificate")),
            "{e:?}"
        );
        let e = errs(&format!(
            "{base}AIWARE_CONTROLLER=https://c/edge/v1\nAIWARE_CONTROLLER_CA=/nonexistent.pem\n"
        ));
        assert!(e.iter().any(|m| m.contains("/nonexistent.pem")), "{e:?}");
        assert!(errs(&format!("{base}AIWARE_CONTROLLER=https://c/edge/v1\n")).is_empty());
        assert!(check_url("http://host:99999/").is_err());
        let e = errs("AIWARE_MODE=engine\nAIWARE_LICENSE=<LICENSE_KEY>\nAIWARE_CONTROLLER=http://c:9000/edge/v1\nAIWARE_INIT_TOKEN=tok-secret\n");
        assert!(e.iter().any(|m| m.contains("placeholder")), "{e:?}");
        let s = Settings::from_user_data(
            parse(b"AIWARE_INIT_TOKEN=tok-secret\nAIWARE_X=1\n").unwrap(),
            None,
        );
        let j = s.redacted_json().to_string();
        assert!(!j.contains("tok-secret") && j.contains(REDACTED));
        assert!(s.warnings.iter().any(|w| w.contains("AIWARE_X")));
    }

    #[test]
    fn controller_with_credentials_is_refused_without_printing_them() {
        let e = errs("AIWARE_MODE=engine\nAIWARE_LICENSE=l123\nAIWARE_INIT_TOKEN=t123\nAIWARE_CONTROLLER=https://aiw:pa55-in-url@c:9000/edge/v1\n");
        let all = e.join("\n");
        assert!(all.contains("user name or password"), "{all}");
        assert!(
            !all.contains("pa55-in-url") && !all.contains("aiw:"),
            "{all}"
        );
        let s = Settings::from_user_data(
            parse(b"AIWARE_CONTROLLER=https://aiw:pa55-in-url@c/edge/v1\n").unwrap(),
            None,
        );
        let j = s.redacted_json().to_string();
        assert!(!j.contains("pa55-in-url"), "{j}");
        assert!(j.contains("https://<redacted>@c/edge/v1"), "{j}");
    }

    #[test]
    fn controller_without_edge_path_warns_with_the_url_called() {
        let s = Settings::from_user_data(
            parse(b"AIWARE_CONTROLLER=http://10.0.0.5:9000/\n").unwrap(),
            None,
        );
        let w = s.warnings.join("\n");
        assert!(
            w.contains("does not end in /edge/v1")
                && w.contains("http://10.0.0.5:9000/host/register")
                && w.contains("AIWARE_CONTROLLER=http://10.0.0.5:9000/edge/v1"),
            "{w}"
        );
        let s = Settings::from_user_data(
            parse(b"AIWARE_CONTROLLER=http://c:9000/api\n").unwrap(),
            None,
        );
        assert!(
            s.warnings
                .iter()
                .any(|w| w.contains("http://c:9000/api/host/register")
                    && w.contains("http://c:9000/edge/v1")),
            "{:?}",
            s.warnings
        );
        for ok in ["http://c:9000/edge/v1", "http://c:9000/edge/v1/"] {
            let s = Settings::from_user_data(
                parse(format!("AIWARE_CONTROLLER={ok}\n").as_bytes()).unwrap(),
                None,
            );
            assert!(s.warnings.is_empty(), "{ok}: {:?}", s.warnings);
        }
    }

    #[test]
    fn write_paths() {
        assert!(check_write_path("/var/opt/aiware/x").is_ok());
        assert!(check_write_path("/etc/passwd")
            .unwrap_err()
            .contains("read-only"));
        assert!(check_write_path("/var/../etc/x").is_err());
    }
}
