//! Every file the agent reads or writes, under one root so tests run
//! unprivileged in a tempdir (`AIW_AGENT_ROOT`, default `/`).

use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Paths {
    pub root: PathBuf,
}

impl Paths {
    pub fn new(root: impl Into<PathBuf>) -> Paths {
        Paths { root: root.into() }
    }

    /// `AIW_AGENT_ROOT` or `/`.
    pub fn from_env() -> Paths {
        Paths::new(
            std::env::var_os("AIW_AGENT_ROOT")
                .map(PathBuf::from)
                .unwrap_or_else(|| "/".into()),
        )
    }

    /// `rel` is written as an absolute path of the real system, e.g. `/var/lib/aiware`.
    pub fn at(&self, rel: &str) -> PathBuf {
        self.root.join(rel.trim_start_matches('/'))
    }

    pub fn is_real_root(&self) -> bool {
        self.root == Path::new("/")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.at("/var/lib/aiware")
    }
    pub fn settings_file(&self) -> PathBuf {
        self.at("/var/lib/aiware/settings.json")
    }
    pub fn join_file(&self) -> PathBuf {
        self.at("/var/lib/aiware/join.json")
    }
    pub fn run_dir(&self) -> PathBuf {
        self.at("/run/aiware")
    }
    /// Written by aiw-var-unsealed.service when the TPM did not unseal /var.
    pub fn var_encryption_error(&self) -> PathBuf {
        self.at("/run/aiware/var-encryption-error")
    }
    pub fn status_file(&self) -> PathBuf {
        self.at("/run/aiware/status.json")
    }
    pub fn modes_toml(&self) -> PathBuf {
        self.at(crate::modes::MODES_PATH)
    }
    pub fn image_json(&self) -> PathBuf {
        self.at(crate::modes::IMAGE_INFO_PATH)
    }
    pub fn esp_user_data(&self) -> PathBuf {
        self.at("/efi/aiware/user-data")
    }
    pub fn by_label(&self) -> PathBuf {
        self.at("/dev/disk/by-label")
    }
    pub fn dmi(&self, field: &str) -> PathBuf {
        self.at("/sys/class/dmi/id").join(field)
    }
    pub fn cmdline(&self) -> PathBuf {
        self.at("/proc/cmdline")
    }
    pub fn proc_sys(&self) -> PathBuf {
        self.at("/proc/sys")
    }
    pub fn pci_devices(&self) -> PathBuf {
        self.at("/sys/bus/pci/devices")
    }
    pub fn var_opt_aiware(&self) -> PathBuf {
        self.at("/var/opt/aiware")
    }
    pub fn ssh_root_dir(&self) -> PathBuf {
        self.at("/var/lib/aiware/ssh/root")
    }
    /// Prometheus file-based discovery targets written from the controller's host list
    /// (read by the prometheus user, so not under the private /var/lib/aiware).
    pub fn prometheus_sd_dir(&self) -> PathBuf {
        self.at("/var/opt/aiware/prometheus/targets")
    }
}
