//! NoCloud seed: a filesystem labelled `cidata`/`CIDATA` (vfat or iso9660) with
//! `user-data` and `meta-data`, as `cloud-localds` and `genisoimage -V cidata` make it.

use super::seedfs::SeedFs;
use super::{Datasource, DsError, LaunchData};
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
        })
    }
}
