//! Launch data for the guest: `#cloud-config` user-data and the ISOs that carry
//! it (NoCloud `cidata` seed; any labelled ISO such as OpenStack's `config-2`).

use crate::process::{on_path, run_checked};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// `#cloud-config` user-data as users write it: SSH keys, a hostname, and the
/// `aiware:` section of `AIWARE_*` settings.
#[derive(Debug, Clone, Default)]
pub struct UserData {
    hostname: Option<String>,
    ssh_keys: Vec<String>,
    aiware: Vec<(String, String)>,
    extra: Vec<String>,
}

impl UserData {
    pub fn cloud_config() -> Self {
        Self::default()
    }

    pub fn hostname(mut self, name: &str) -> Self {
        self.hostname = Some(name.to_string());
        self
    }

    pub fn ssh_key(mut self, public_key: &str) -> Self {
        self.ssh_keys.push(public_key.trim().to_string());
        self
    }

    /// One setting of the `aiware:` section, e.g. `("AIWARE_MODE", "engine")`.
    pub fn setting(mut self, key: &str, value: &str) -> Self {
        self.aiware.push((key.to_string(), value.to_string()));
        self
    }

    /// Verbatim top-level YAML appended at the end (e.g. `write_files:` blocks).
    pub fn raw_yaml(mut self, yaml: &str) -> Self {
        self.extra.push(yaml.trim_end().to_string());
        self
    }

    pub fn render(&self) -> String {
        let mut out = String::from("#cloud-config\n");
        if let Some(h) = &self.hostname {
            out.push_str(&format!("hostname: {}\n", yaml_str(h)));
        }
        if !self.ssh_keys.is_empty() {
            out.push_str("ssh_authorized_keys:\n");
            for k in &self.ssh_keys {
                out.push_str(&format!("  - {}\n", yaml_str(k)));
            }
        }
        if !self.aiware.is_empty() {
            out.push_str("aiware:\n");
            for (k, v) in &self.aiware {
                out.push_str(&format!("  {k}: {}\n", yaml_str(v)));
            }
        }
        for e in &self.extra {
            out.push_str(e);
            out.push('\n');
        }
        out
    }
}

/// A double-quoted YAML scalar (JSON string syntax is valid YAML).
/// cloud-config `ca_certs` trusting `ca_pem` (a test's cluster CA).
pub fn ca_certs_yaml(ca_pem: &str) -> String {
    let ca: String = ca_pem
        .trim()
        .lines()
        .map(|l| format!("      {l}\n"))
        .collect();
    format!("ca_certs:\n  trusted:\n    - |\n{ca}")
}

fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialize")
}

/// NoCloud `meta-data`: the instance id (same id across reboots = same instance).
pub fn nocloud_meta_data(instance_id: &str, hostname: &str) -> String {
    format!("instance-id: {instance_id}\nlocal-hostname: {hostname}\n")
}

/// Writes `user-data` and `meta-data` into `dir` and makes the NoCloud seed
/// ISO (volume label `cidata`) from them, returning its path.
pub fn nocloud_seed(dir: &Path, user_data: &str, meta_data: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let ud = dir.join("user-data");
    let md = dir.join("meta-data");
    std::fs::write(&ud, user_data)?;
    std::fs::write(&md, meta_data)?;
    let iso = dir.join("seed.iso");
    if on_path("cloud-localds") {
        run_checked(
            Command::new("cloud-localds").arg(&iso).arg(&ud).arg(&md),
            Duration::from_secs(60),
        )?;
    } else {
        make_iso(
            "cidata",
            &[
                ("user-data", user_data.as_bytes()),
                ("meta-data", meta_data.as_bytes()),
            ],
            &iso,
        )?;
    }
    Ok(iso)
}

/// An ISO 9660 image with Rock Ridge and Joliet, volume label `label`, holding
/// `files` (paths relative to its root, e.g. `openstack/latest/user_data`).
pub fn make_iso(label: &str, files: &[(&str, &[u8])], out: &Path) -> Result<()> {
    if !on_path("genisoimage") {
        bail!("genisoimage not found: install the `genisoimage` package to make seed ISOs");
    }
    let staging = out.with_extension("staging");
    let _ = std::fs::remove_dir_all(&staging);
    for (rel, data) in files {
        if rel.starts_with('/') || rel.split('/').any(|c| c == "..") {
            bail!("ISO file path {rel:?} must be relative and stay inside the image");
        }
        let p = staging.join(rel);
        std::fs::create_dir_all(p.parent().expect("joined path has a parent"))?;
        std::fs::write(&p, data).with_context(|| format!("writing {}", p.display()))?;
    }
    std::fs::create_dir_all(&staging)?;
    run_checked(
        Command::new("genisoimage")
            .args(["-quiet", "-V", label, "-r", "-J", "-o"])
            .arg(out)
            .arg(&staging),
        Duration::from_secs(60),
    )?;
    std::fs::remove_dir_all(&staging)?;
    Ok(())
}

/// The volume label of an ISO 9660 image (bytes 40..72 of sector 16).
pub fn iso_volume_label(iso: &Path) -> Result<String> {
    let data = std::fs::read(iso)?;
    let pvd = data
        .get(16 * 2048..17 * 2048)
        .context("file too short to be an ISO 9660 image")?;
    if &pvd[1..6] != b"CD001" {
        bail!("{} is not an ISO 9660 image", iso.display());
    }
    Ok(String::from_utf8_lossy(&pvd[40..72]).trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("aiwimg-seed-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn renders_cloud_config_with_keys_and_settings() {
        let ud = UserData::cloud_config()
            .hostname("engine-1")
            .ssh_key("ssh-ed25519 AAAA test@host\n")
            .setting("AIWARE_MODE", "engine")
            .setting("AIWARE_CONTROLLER", "http://10.0.2.100:9000/edge/v1")
            .render();
        assert_eq!(
            ud,
            "#cloud-config\nhostname: \"engine-1\"\nssh_authorized_keys:\n  - \"ssh-ed25519 AAAA test@host\"\n\
             aiware:\n  AIWARE_MODE: \"engine\"\n  AIWARE_CONTROLLER: \"http://10.0.2.100:9000/edge/v1\"\n"
        );
    }

    #[test]
    fn seed_iso_is_labelled_cidata_and_holds_the_files() {
        let dir = scratch("nocloud");
        let iso = nocloud_seed(&dir, "#cloud-config\n", &nocloud_meta_data("i-1", "h")).unwrap();
        assert_eq!(iso_volume_label(&iso).unwrap(), "cidata");
        let bytes = std::fs::read(&iso).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("instance-id: i-1"));
        assert!(text.contains("#cloud-config"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn config_drive_iso_keeps_nested_paths() {
        let dir = scratch("config2");
        let iso = dir.join("config-2.iso");
        make_iso(
            "config-2",
            &[("openstack/latest/user_data", b"#cloud-config\n")],
            &iso,
        )
        .unwrap();
        assert_eq!(iso_volume_label(&iso).unwrap(), "config-2");
        assert!(make_iso("x", &[("../escape", b"")], &dir.join("bad.iso")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
