//! NoCloud seed: a filesystem labelled `cidata`/`CIDATA` (vfat or iso9660) with
//! `user-data` and `meta-data`, as `cloud-localds` and `genisoimage -V cidata` make it.

use super::seedfs::SeedFs;
use super::{Datasource, DsError, LaunchData, PlatformMeta};
use crate::paths::Paths;
use std::time::Instant;

pub struct NoCloudSource {
    paths: Paths,
    label: String,
}

impl NoCloudSource {
    pub fn new(paths: Paths, label: &str) -> Self {
        NoCloudSource {
            paths,
            label: label.into(),
        }
    }
}

/// `instance-id` from NoCloud meta-data (YAML, or `key: value` lines).
pub fn meta_instance_id(meta: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_yaml::from_slice(meta).ok()?;
    v.get("instance-id")
        .or_else(|| v.get("instance_id"))
        .and_then(|i| i.as_str().map(String::from).or_else(|| Some(i.to_string())))
}

/// The platform part of NoCloud meta-data (also the form of VMware's
/// `guestinfo.metadata`): `local-hostname` and `public-keys`.
pub fn meta_platform(meta: &[u8]) -> PlatformMeta {
    let Ok(v) = serde_yaml::from_slice::<serde_json::Value>(meta) else {
        return PlatformMeta::default();
    };
    let get = |a: &str, b: &str| v.get(a).or_else(|| v.get(b));
    PlatformMeta {
        hostname: get("local-hostname", "local_hostname")
            .and_then(|h| h.as_str())
            .and_then(super::platform_hostname),
        ssh_keys: get("public-keys", "public_keys")
            .map(super::public_keys_value)
            .unwrap_or_default(),
        ..PlatformMeta::default()
    }
}

impl Datasource for NoCloudSource {
    fn name(&self) -> &'static str {
        "nocloud"
    }
    fn fetch(&self, _deadline: Instant) -> Result<LaunchData, DsError> {
        let fail = |message: String| DsError::Failed {
            source_name: "nocloud",
            message,
        };
        let fs = SeedFs::open(&self.paths, &self.label).map_err(fail)?;
        let user_data = fs.read("user-data").map_err(fail)?;
        let meta = fs.read("meta-data").map_err(fail)?;
        let instance_id = meta
            .as_deref()
            .and_then(meta_instance_id)
            .or_else(|| user_data.as_deref().map(|u| super::digest_id("nocloud", u)));
        Ok(LaunchData {
            user_data,
            instance_id,
            platform: meta.as_deref().map(meta_platform).unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_data_hostname_and_keys_in_each_form_cloud_init_takes() {
        let m = meta_platform(
            b"instance-id: iid-1\nlocal-hostname: ceo-engine\npublic-keys:\n  - ssh-ed25519 AAAA1 a@b\n  - ssh-rsa AAAA2 c@d\n",
        );
        assert_eq!(m.hostname.as_deref(), Some("ceo-engine"));
        assert_eq!(m.ssh_keys, ["ssh-ed25519 AAAA1 a@b", "ssh-rsa AAAA2 c@d"]);
        let m = meta_platform(b"local_hostname: n1\npublic-keys: |\n  ssh-ed25519 AAAA1 a@b\n\n  ssh-ed25519 AAAA3 e@f\n");
        assert_eq!(m.hostname.as_deref(), Some("n1"));
        assert_eq!(
            m.ssh_keys,
            ["ssh-ed25519 AAAA1 a@b", "ssh-ed25519 AAAA3 e@f"]
        );
        let m = meta_platform(b"public-keys:\n  mykey: ssh-ed25519 AAAA4 g@h\n");
        assert_eq!(m.ssh_keys, ["ssh-ed25519 AAAA4 g@h"]);
        // Not a host name: none, rather than a hostname hostnamed refuses.
        assert_eq!(
            meta_platform(b"local-hostname: 'bad name!'\n").hostname,
            None
        );
        assert_eq!(meta_platform(b"instance-id: x\n"), PlatformMeta::default());
        assert_eq!(meta_platform(b"\xff\xfe"), PlatformMeta::default());
    }
}
