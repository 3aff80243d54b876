//! Kernel command line: `aiware.<key>=<value>` (PXE and bare metal), e.g.
//! `aiware.mode=engine aiware.controller=http://10.0.0.5:9000/edge/v1`.

use super::{Datasource, DsError, LaunchData};
use crate::paths::Paths;
use std::time::Instant;

pub struct CmdlineSource {
    paths: Paths,
}

impl CmdlineSource {
    pub fn new(paths: Paths) -> Self {
        CmdlineSource { paths }
    }
}

/// `(key, value)` of every `aiware.key=value` word, keys as written.
pub fn aiware_args(cmdline: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut words = Vec::new();
    for c in cmdline.chars() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    for w in words {
        if let Some(rest) = w.strip_prefix("aiware.") {
            if let Some((k, v)) = rest.split_once('=') {
                out.push((k.to_string(), v.to_string()));
            }
        }
    }
    out
}

/// The `aiware.*` words as `AIWARE_KEY='value'` lines for the user-data parser.
pub fn to_env_lines(cmdline: &str) -> String {
    aiware_args(cmdline)
        .into_iter()
        .map(|(k, v)| {
            format!(
                "AIWARE_{}='{}'\n",
                k.to_ascii_uppercase().replace(['-', '.'], "_"),
                v.replace('\'', "")
            )
        })
        .collect()
}

impl Datasource for CmdlineSource {
    fn name(&self) -> &'static str {
        "cmdline"
    }
    fn fetch(&self, _deadline: Instant) -> Result<LaunchData, DsError> {
        let p = self.paths.cmdline();
        let text = std::fs::read_to_string(&p).map_err(|e| DsError::Failed {
            source_name: "cmdline",
            message: format!("cannot read {}: {e}", p.display()),
        })?;
        let env = to_env_lines(&text);
        let instance_id = Some(super::digest_id("cmdline", env.as_bytes()));
        Ok(LaunchData {
            user_data: Some(env.into_bytes()),
            instance_id,
            // Bare metal and PXE: no platform metadata service.
            platform: Default::default(),
        })
    }
}
