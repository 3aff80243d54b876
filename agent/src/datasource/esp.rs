//! Bare metal: `aiware/user-data` on the ESP, mounted at /efi by
//! systemd-gpt-auto-generator (flash the image, drop the file, boot).

use super::{Datasource, DsError, LaunchData};
use crate::paths::Paths;
use std::time::Instant;

pub struct EspSource {
    paths: Paths,
}

impl EspSource {
    pub fn new(paths: Paths) -> Self {
        EspSource { paths }
    }
}

impl Datasource for EspSource {
    fn name(&self) -> &'static str {
        "esp"
    }
    fn fetch(&self, _deadline: Instant) -> Result<LaunchData, DsError> {
        let p = self.paths.esp_user_data();
        let data = std::fs::read(&p).map_err(|e| DsError::Failed {
            source_name: "esp",
            message: format!("cannot read {}: {e}", p.display()),
        })?;
        let instance_id = Some(super::digest_id("esp", &data));
        Ok(LaunchData {
            user_data: Some(data),
            instance_id,
            // Bare metal and PXE: no platform metadata service.
            platform: Default::default(),
        })
    }
}
