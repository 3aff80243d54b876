//! KVM when a probe boot proves it works, TCG otherwise, decided once per process.
//!
//! `/dev/kvm` existing is not enough: on some hosts (nested virtualization
//! without full CPU support) KVM guests die with "KVM internal error" in the
//! firmware. So the probe boots the same OVMF the tests use under KVM and
//! requires it to reach its boot manager on the serial console.

use crate::firmware::Ovmf;
use crate::process::on_path;
use anyhow::Result;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Console text OVMF prints once it has reached its boot manager.
const PROBE_MARKERS: &[&str] = &["BdsDxe:", "UEFI Interactive Shell", "Shell>"];
/// What QEMU prints when a KVM guest hits an instruction the host cannot run.
const KVM_FAILURE_MARKERS: &[&str] = &["KVM internal error", "emulation failure"];
const PROBE_LIMIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// `-accel` and `-cpu` values for this accelerator.
    pub fn qemu_args(self) -> [&'static str; 4] {
        match self {
            Accel::Kvm => ["-accel", "kvm", "-cpu", "host"],
            // Multi-threaded TCG uses every vCPU thread; `max` gives the guest
            // every CPU feature TCG can emulate.
            Accel::Tcg => ["-accel", "tcg,thread=multi", "-cpu", "max"],
        }
    }
}

/// The accelerator chosen and why, printed once per process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelChoice {
    pub accel: Accel,
    pub reason: String,
}

/// How the KVM probe boot ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// OVMF reached its boot manager under KVM.
    Reached(Duration),
    /// QEMU reported a KVM failure (first matching stderr line).
    KvmFailed(String),
    /// QEMU exited before the firmware got anywhere.
    QemuExited(String),
    /// Nothing within the probe limit.
    TimedOut,
}

/// What the host offers before any probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostKvm {
    pub dev_kvm_usable: bool,
}

/// The decision, from the override (`AIWIMG_QEMU_ACCEL=kvm|tcg`), the host and
/// the probe. Pure, so every branch is unit-tested.
pub fn decide(
    forced: Option<&str>,
    host: HostKvm,
    probe: impl FnOnce() -> ProbeOutcome,
) -> AccelChoice {
    match forced.map(str::trim) {
        Some("tcg") => {
            return AccelChoice {
                accel: Accel::Tcg,
                reason: "AIWIMG_QEMU_ACCEL=tcg".into(),
            }
        }
        Some("kvm") => {
            return AccelChoice {
                accel: Accel::Kvm,
                reason: "AIWIMG_QEMU_ACCEL=kvm (probe skipped)".into(),
            }
        }
        _ => {}
    }
    if !host.dev_kvm_usable {
        return AccelChoice {
            accel: Accel::Tcg,
            reason: "/dev/kvm is missing or not readable and writable".into(),
        };
    }
    match probe() {
        ProbeOutcome::Reached(t) => AccelChoice {
            accel: Accel::Kvm,
            reason: format!("KVM probe boot reached the OVMF boot manager in {t:.1?}"),
        },
        ProbeOutcome::KvmFailed(line) => AccelChoice {
            accel: Accel::Tcg,
            reason: format!("/dev/kvm exists but a KVM guest failed: {line}"),
        },
        ProbeOutcome::QemuExited(why) => AccelChoice {
            accel: Accel::Tcg,
            reason: format!("/dev/kvm exists but QEMU with -accel kvm exited: {why}"),
        },
        ProbeOutcome::TimedOut => AccelChoice {
            accel: Accel::Tcg,
            reason: format!(
                "/dev/kvm exists but a KVM guest did not reach the OVMF boot manager within {PROBE_LIMIT:?}"
            ),
        },
    }
}

/// The accelerator for this process: probed on first use, then cached.
pub fn accel() -> &'static AccelChoice {
    static CHOICE: OnceLock<AccelChoice> = OnceLock::new();
    CHOICE.get_or_init(|| {
        let forced = std::env::var("AIWIMG_QEMU_ACCEL").ok();
        let host = HostKvm {
            dev_kvm_usable: dev_kvm_usable(Path::new("/dev/kvm")),
        };
        let choice = decide(forced.as_deref(), host, || {
            probe_kvm().unwrap_or_else(|e| ProbeOutcome::QemuExited(format!("{e:#}")))
        });
        eprintln!(
            "qemu-tests: accelerator {:?}: {}",
            choice.accel, choice.reason
        );
        choice
    })
}

fn dev_kvm_usable(path: &Path) -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .is_ok()
}

/// Scans what a probe boot produced so far.
pub fn classify_probe(console: &str, stderr: &str) -> Option<ProbeOutcome> {
    if let Some(line) = stderr
        .lines()
        .find(|l| KVM_FAILURE_MARKERS.iter().any(|m| l.contains(m)))
    {
        return Some(ProbeOutcome::KvmFailed(line.trim().to_string()));
    }
    if PROBE_MARKERS.iter().any(|m| console.contains(m)) {
        return Some(ProbeOutcome::Reached(Duration::ZERO));
    }
    None
}

fn probe_kvm() -> Result<ProbeOutcome> {
    let qemu = crate::vm::qemu_binary();
    if !on_path(&qemu) {
        anyhow::bail!("{qemu} not found");
    }
    let ovmf = Ovmf::locate()?;
    let dir = tempfile_dir("kvm-probe")?;
    let vars = dir.join("vars.fd");
    std::fs::copy(&ovmf.vars, &vars)?;
    let console = dir.join("console.log");
    let stderr_path = dir.join("stderr.log");
    let mut child = Command::new(&qemu)
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args([
            "-machine", "q35", "-accel", "kvm", "-cpu", "host", "-m", "256",
        ])
        .args(ovmf.pflash_args(&vars))
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path)?)
        .spawn()?;
    let started = Instant::now();
    let outcome = loop {
        let con = std::fs::read_to_string(&console).unwrap_or_default();
        let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        if let Some(o) = classify_probe(&con, &err) {
            break match o {
                ProbeOutcome::Reached(_) => ProbeOutcome::Reached(started.elapsed()),
                other => other,
            };
        }
        if let Some(status) = child.try_wait()? {
            let last = err.lines().last().unwrap_or("no message").to_string();
            break ProbeOutcome::QemuExited(format!("{status}: {last}"));
        }
        if started.elapsed() > PROBE_LIMIT {
            break ProbeOutcome::TimedOut;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(outcome)
}

fn tempfile_dir(what: &str) -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("aiwimg-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST_OK: HostKvm = HostKvm {
        dev_kvm_usable: true,
    };

    #[test]
    fn override_wins_without_probing() {
        let c = decide(Some("tcg"), HOST_OK, || panic!("probed"));
        assert_eq!(c.accel, Accel::Tcg);
        let c = decide(
            Some("kvm"),
            HostKvm {
                dev_kvm_usable: false,
            },
            || panic!("probed"),
        );
        assert_eq!(c.accel, Accel::Kvm);
    }

    #[test]
    fn no_dev_kvm_means_tcg_without_probing() {
        let c = decide(
            None,
            HostKvm {
                dev_kvm_usable: false,
            },
            || panic!("probed"),
        );
        assert_eq!(c.accel, Accel::Tcg);
        assert!(c.reason.contains("/dev/kvm"));
    }

    #[test]
    fn probe_result_decides() {
        let ok = decide(None, HOST_OK, || {
            ProbeOutcome::Reached(Duration::from_secs(2))
        });
        assert_eq!(ok.accel, Accel::Kvm);
        for bad in [
            ProbeOutcome::KvmFailed("KVM internal error. Suberror: 1".into()),
            ProbeOutcome::QemuExited("exit status: 1".into()),
            ProbeOutcome::TimedOut,
        ] {
            let c = decide(None, HOST_OK, || bad.clone());
            assert_eq!(c.accel, Accel::Tcg, "{bad:?}");
            assert!(!c.reason.is_empty());
        }
    }

    #[test]
    fn classifies_what_this_host_prints() {
        // Seen on this machine: the guest dies in OVMF's first FPU instruction.
        let stderr = "qemu-system-x86_64: warning: host doesn't support requested feature\n\
                      KVM internal error. Suberror: 1\nemulation failure\n";
        assert_eq!(
            classify_probe("", stderr),
            Some(ProbeOutcome::KvmFailed(
                "KVM internal error. Suberror: 1".into()
            ))
        );
        let console = "\x1b[2JBdsDxe: loading Boot0001 \"EFI Internal Shell\"\r\n";
        assert!(matches!(
            classify_probe(console, ""),
            Some(ProbeOutcome::Reached(_))
        ));
        assert_eq!(classify_probe("", ""), None);
    }
}
