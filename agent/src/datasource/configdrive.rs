//! OpenStack config drive: a filesystem labelled `config-2` with
//! `openstack/latest/user_data` and `meta_data.json` (its `uuid` is the instance).

use super::seedfs::SeedFs;
use super::{Datasource, DsError, LaunchData, PlatformMeta};
use crate::paths::Paths;
use std::time::Instant;

pub struct ConfigDriveSource {
    paths: Paths,
}

impl ConfigDriveSource {
    pub fn new(paths: Paths) -> Self {
        ConfigDriveSource { paths }
    }
}

impl Datasource for ConfigDriveSource {
    fn name(&self) -> &'static str {
        "configdrive"
    }
    fn fetch(&self, _deadline: Instant) -> Result<LaunchData, DsError> {
        let fail = |message: String| DsError::Failed {
            source_name: "configdrive",
            message,
        };
        let label = if self.paths.by_label().join("config-2").exists() {
            "config-2"
        } else {
            "CONFIG-2"
        };
        let fs = SeedFs::open(&self.paths, label).map_err(fail)?;
        let user_data = fs.read("openstack/latest/user_data").map_err(fail)?;
        let meta = fs.read("openstack/latest/meta_data.json").map_err(fail)?;
        let meta = meta.and_then(|m| serde_json::from_slice::<serde_json::Value>(&m).ok());
        let instance_id = meta
            .as_ref()
            .and_then(|v| v["uuid"].as_str().map(String::from));
        Ok(LaunchData {
            user_data,
            instance_id,
            platform: meta.as_ref().map(meta_platform).unwrap_or_default(),
        })
    }
}

/// `meta_data.json`: `hostname` (Nova's, e.g. `name.novalocal`), `public_keys`
/// (`{keypair name: key}`) and `availability_zone`. It names no flavor.
pub fn meta_platform(v: &serde_json::Value) -> PlatformMeta {
    PlatformMeta {
        hostname: v["hostname"].as_str().and_then(super::platform_hostname),
        ssh_keys: super::public_keys_value(&v["public_keys"]),
        zone: v["availability_zone"]
            .as_str()
            .filter(|z| !z.is_empty())
            .map(String::from),
        ..PlatformMeta::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_hostname_keys_and_zone_from_the_drive() {
        let t = tempfile::tempdir().unwrap();
        let paths = Paths::new(t.path());
        let dir = paths.by_label().join("config-2/openstack/latest");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("meta_data.json"),
            r#"{"uuid": "83679162-1378", "hostname": "openstack-engine.novalocal", "availability_zone": "nova",
                "public_keys": {"mykey": "ssh-ed25519 AAAA1 nova@host\n"}}"#,
        )
        .unwrap();
        std::fs::write(dir.join("user_data"), "AIWARE_MODE=engine\n").unwrap();
        let ld = ConfigDriveSource::new(paths).fetch(Instant::now()).unwrap();
        assert_eq!(ld.instance_id.as_deref(), Some("83679162-1378"));
        assert_eq!(
            ld.platform.hostname.as_deref(),
            Some("openstack-engine.novalocal")
        );
        assert_eq!(ld.platform.ssh_keys, ["ssh-ed25519 AAAA1 nova@host"]);
        assert_eq!(ld.platform.zone.as_deref(), Some("nova"));
    }
}
