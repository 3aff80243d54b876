//! VMware guestinfo: `guestinfo.userdata` with `guestinfo.userdata.encoding`
//! (`base64`/`b64` or `gzip+base64`/`gz+b64`), read with `vmware-rpctool`.

use super::{Datasource, DsError, LaunchData};
use base64::Engine;
use std::io::Read;
use std::time::Instant;

pub struct VmwareSource {
    rpctool: String,
}

impl VmwareSource {
    pub fn new(rpctool: &str) -> Self {
        VmwareSource {
            rpctool: rpctool.into(),
        }
    }

    /// `Ok(None)` when the key is not set (rpctool exits non-zero with "No value found").
    fn info_get(&self, key: &str) -> Result<Option<String>, DsError> {
        let out = std::process::Command::new(&self.rpctool)
            .arg(format!("info-get {key}"))
            .output()
            .map_err(|e| DsError::Failed {
                source_name: "vmware",
                message: format!("cannot run {}: {e}", self.rpctool),
            })?;
        if !out.status.success() {
            return Ok(None);
        }
        let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ok((!v.is_empty()).then_some(v))
    }
}

pub fn decode(value: &str, encoding: Option<&str>) -> Result<Vec<u8>, String> {
    let b64 = |s: &str| {
        let c: String = s.split_ascii_whitespace().collect();
        base64::engine::general_purpose::STANDARD
            .decode(c)
            .map_err(|e| format!("not base64: {e}"))
    };
    match encoding.map(str::to_ascii_lowercase).as_deref() {
        None | Some("") => Ok(value.as_bytes().to_vec()),
        Some("base64" | "b64") => b64(value),
        Some("gzip+base64" | "gz+b64") => {
            let z = b64(value)?;
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&z[..])
                .take(crate::userdata::MAX_USER_DATA as u64)
                .read_to_end(&mut out)
                .map_err(|e| format!("not gzip: {e}"))?;
            Ok(out)
        }
        Some(other) => Err(format!(
            "guestinfo.userdata.encoding {other:?} is not base64 or gzip+base64"
        )),
    }
}

impl Datasource for VmwareSource {
    fn name(&self) -> &'static str {
        "vmware"
    }
    fn fetch(&self, _deadline: Instant) -> Result<LaunchData, DsError> {
        let Some(value) = self.info_get("guestinfo.userdata")? else {
            return Ok(LaunchData::default());
        };
        let enc = self.info_get("guestinfo.userdata.encoding")?;
        let data = decode(&value, enc.as_deref()).map_err(|message| DsError::Failed {
            source_name: "vmware",
            message,
        })?;
        let instance_id = Some(super::digest_id("vmware", &data));
        Ok(LaunchData {
            user_data: Some(data),
            instance_id,
        })
    }
}
