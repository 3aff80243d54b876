//! OpenStack config drive: a filesystem labelled `config-2` with
//! `openstack/latest/user_data` and `meta_data.json` (its `uuid` is the instance).

use super::seedfs::SeedFs;
use super::{Datasource, DsError, LaunchData};
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
        let instance_id = meta
            .and_then(|m| serde_json::from_slice::<serde_json::Value>(&m).ok())
            .and_then(|v| v["uuid"].as_str().map(String::from));
        Ok(LaunchData {
            user_data,
            instance_id,
        })
    }
}
