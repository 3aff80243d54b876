//! The vendor's `aiware-agent`, when the profile baked it (`vendor_agent`):
//! aiw-agent still finds, validates and applies the launch data, then writes
//! the vendor agent's environment and starts `aiware-agent.service` (its unit,
//! baked by the builder), and does not register with the controller itself.
//! The vendor agent runs the aiWARE containers then, as it does on any host.

use crate::files::write_private;
use crate::paths::Paths;
use crate::settings::Settings;
use crate::systemd::UnitControl;

pub const UNIT: &str = "aiware-agent.service";
/// Read by the vendor unit (`EnvironmentFile=`).
pub const ENV_FILE: &str = "/run/aiware/aiware-agent.env";

/// One systemd EnvironmentFile value: single-quoted (literal) when it can be,
/// else double-quoted with `\` and `"` escaped; newlines become spaces.
fn quote(v: &str) -> String {
    let v = v.replace(['\n', '\r'], " ");
    if !v.contains('\'') {
        format!("'{v}'")
    } else {
        format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

/// The environment the vendor's install guide exports before installing its
/// agent: every launch setting (generated passwords included), and
/// `AIWARE_ROOT` (default /opt/aiware).
pub fn env_file(s: &Settings) -> String {
    let mut out = String::from(
        "# Written by aiw-agent from the launch settings for the vendor's aiware-agent (0600).\n",
    );
    if s.get("AIWARE_ROOT").is_none() {
        out.push_str("AIWARE_ROOT='/opt/aiware'\n");
    }
    for (k, v) in &s.vars {
        out.push_str(&format!("{k}={}\n", quote(v)));
    }
    out
}

/// Writes the environment and starts the vendor's unit.
pub fn start(paths: &Paths, units: &dyn UnitControl, s: &Settings) -> Result<(), String> {
    write_private(&paths.at(ENV_FILE), env_file(s).as_bytes(), 0o600)
        .map_err(|e| format!("cannot write {ENV_FILE}: {e}"))?;
    units
        .enable_and_start(&[UNIT.to_string()])
        .map_err(|e| format!("starting the vendor's {UNIT}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::systemd::RecordingUnits;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn env_is_every_setting_quoted_for_systemd_and_private() {
        let s = Settings {
            vars: [
                ("AIWARE_MODE", "engine"),
                ("AIWARE_INIT_TOKEN", "t0k'en"),
                ("AIWARE_LICENSE", "a b\nc"),
                ("AIWARE_CONTROLLER", "http://10.0.0.1:9000/edge/v1"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            ..Default::default()
        };
        let text = env_file(&s);
        assert!(text.contains("AIWARE_ROOT='/opt/aiware'\n"));
        assert!(text.contains("AIWARE_MODE='engine'\n"));
        assert!(text.contains("AIWARE_INIT_TOKEN=\"t0k'en\"\n"), "{text}");
        assert!(text.contains("AIWARE_LICENSE='a b c'\n"), "{text}");
        let d = tempfile::tempdir().unwrap();
        let paths = Paths::new(d.path());
        let units = RecordingUnits::default();
        start(&paths, &units, &s).unwrap();
        assert_eq!(
            *units.calls.lock().unwrap(),
            vec!["start aiware-agent.service"]
        );
        let f = paths.at(ENV_FILE);
        assert_eq!(std::fs::read_to_string(&f).unwrap(), text);
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
