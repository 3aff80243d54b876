//! Running systemd-sysupdate (Debian's `systemd-container`; it is not on
//! PATH there) and pointing it at the update server launch data names.

use crate::paths::Paths;
use std::path::PathBuf;
use std::process::{Command, Stdio};

const SYSUPDATE: &str = "/usr/lib/systemd/systemd-sysupdate";
/// The image's transfer files (written by the builder from the profile).
pub const VENDOR_TRANSFER_DIR: &str = "/usr/lib/sysupdate.d";
/// sysupdate reads /etc, /run, /usr/local/lib, /usr/lib; a file here
/// replaces the one of the same name under /usr/lib (/etc is read-only).
pub const RUNTIME_TRANSFER_DIR: &str = "/run/sysupdate.d";

/// The program: `AIW_AGENT_SYSUPDATE` (tests) or systemd's.
pub fn program() -> PathBuf {
    std::env::var_os("AIW_AGENT_SYSUPDATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| SYSUPDATE.into())
}

/// Where [`one_at_a_time`] locks: in /run, or beside a test's program.
fn lock_path() -> PathBuf {
    match std::env::var_os("AIW_AGENT_SYSUPDATE") {
        Some(p) => {
            let mut p = p;
            p.push(".lock");
            PathBuf::from(p)
        }
        None => PathBuf::from("/run/aiw-agent-sysupdate.lock"),
    }
}

/// One systemd-sysupdate run at a time on this node. The agent's periodic
/// check and an operator's `aiw-agent update apply` would otherwise overlap,
/// one listing the partitions while the other relabels and writes them.
/// The lock is held until the returned file is dropped.
fn one_at_a_time() -> Result<std::fs::File, String> {
    lock_at(&lock_path())
}

fn lock_at(path: &std::path::Path) -> Result<std::fs::File, String> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    match f.try_lock() {
        Ok(()) => return Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => {
            eprintln!("aiw-agent: waiting for another systemd-sysupdate run to finish")
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(format!("{}: {e}", path.display())),
    }
    f.lock().map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(f)
}

/// `systemd-sysupdate check-new`: the newest version the server offers that
/// is newer than what is installed, if any.
pub fn check_new() -> Result<Option<String>, String> {
    let _lock = one_at_a_time()?;
    let out = Command::new(program())
        .arg("check-new")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", program().display()))?;
    check_new_answer(out.status.success(), &out.stdout, &out.stderr)
}

/// `check-new` exits non-zero both when nothing is newer and on errors
/// (systemd-sysupdate(8)); an error is what logs a failure.
fn check_new_answer(ok: bool, stdout: &[u8], stderr: &[u8]) -> Result<Option<String>, String> {
    let v = String::from_utf8_lossy(stdout).trim().to_string();
    if ok && !v.is_empty() {
        return Ok(Some(v));
    }
    let err = String::from_utf8_lossy(stderr);
    if err.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.contains("failed") || l.contains("error") || l.contains("refusing")
    }) {
        return Err(last_lines(stderr));
    }
    Ok(None)
}

/// `systemd-sysupdate update [VERSION]`. With `show_progress` its output goes
/// to ours (the CLI); otherwise it is returned (the agent's journal).
pub fn update(version: Option<&str>, show_progress: bool) -> Result<String, String> {
    let _lock = one_at_a_time()?;
    let mut cmd = Command::new(program());
    cmd.arg("update").args(version).stdin(Stdio::null());
    if show_progress {
        let st = cmd
            .status()
            .map_err(|e| format!("cannot run {}: {e}", program().display()))?;
        return if st.success() {
            Ok(String::new())
        } else {
            Err(format!("systemd-sysupdate update failed ({st})"))
        };
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {}: {e}", program().display()))?;
    if out.status.success() {
        Ok(last_lines(&out.stderr))
    } else {
        Err(last_lines(&out.stderr))
    }
}

fn last_lines(b: &[u8]) -> String {
    let text = String::from_utf8_lossy(b);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join(" / ")
}

/// The transfer file `text` reading from `url` instead (its `[Source]`
/// `Path=`, where `%M` is the IMAGE_ID folder); None when it has no URL source.
pub fn with_source_url(text: &str, url: &str) -> Option<String> {
    let mut section = "";
    let mut changed = false;
    let mut out = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            section = t;
        }
        if section == "[Source]" && t.starts_with("Path=") && t.contains("://") {
            out.push_str(&format!("Path={}/%M/\n", url.trim_end_matches('/')));
            changed = true;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    changed.then_some(out)
}

/// Writes `/run/sysupdate.d/` copies of the image's transfer files reading
/// `url` (launch data's `AIWARE_UPDATE_URL`); returns how many.
pub fn point_at(paths: &Paths, url: &str) -> Result<usize, String> {
    let from = paths.at(VENDOR_TRANSFER_DIR);
    let to = paths.at(RUNTIME_TRANSFER_DIR);
    let rd = std::fs::read_dir(&from).map_err(|e| format!("{}: {e}", from.display()))?;
    let mut n = 0;
    for e in rd.flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().ends_with(".transfer") {
            continue;
        }
        let text = std::fs::read_to_string(e.path()).map_err(|e| e.to_string())?;
        if let Some(new) = with_source_url(&text, url) {
            std::fs::create_dir_all(&to).map_err(|e| format!("{}: {e}", to.display()))?;
            std::fs::write(to.join(&name), new).map_err(|e| e.to_string())?;
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: &str = "[Transfer]\nProtectVersion=%A\n\n[Source]\nType=url-file\n\
        Path=http://update.invalid/aiware/%M/\nMatchPattern=%M_@v.root.@u.raw\n\n\
        [Target]\nType=partition\nPath=auto\nMatchPattern=%M_@v\n";

    #[test]
    fn check_new_tells_nothing_newer_from_a_failure() {
        assert_eq!(
            check_new_answer(true, b"0.2.0\n", b""),
            Ok(Some("0.2.0".into()))
        );
        // What 257 printed on a node with nothing newer (exit status 1).
        let none = "Discovering installed instances\u{2026}\nDiscovering available instances\u{2026}\n\
                    Determining installed update sets\u{2026}\nDetermining available update sets\u{2026}\nExiting.\n";
        assert_eq!(check_new_answer(false, b"", none.as_bytes()), Ok(None));
        let down = "Pulling 'http://10.0.2.102/aiware/aiware-engine/SHA256SUMS'.\n\
                    (sd-pull) failed with exit status 1.\nExiting.\n";
        assert!(check_new_answer(false, b"", down.as_bytes())
            .unwrap_err()
            .contains("failed with exit status 1"));
    }

    #[test]
    fn sysupdate_runs_one_at_a_time() {
        let dir = std::env::temp_dir().join(format!("aiw-sysupdate-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let lock = dir.join("sysupdate.lock");
        let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let runs: Vec<_> = (0..3)
            .map(|i| {
                let (lock, order) = (lock.clone(), order.clone());
                std::thread::spawn(move || {
                    let _held = lock_at(&lock).unwrap();
                    order.lock().unwrap().push(format!("start {i}"));
                    std::thread::sleep(std::time::Duration::from_millis(150));
                    order.lock().unwrap().push(format!("end {i}"));
                })
            })
            .collect();
        for r in runs {
            r.join().unwrap();
        }
        let order = order.lock().unwrap();
        assert_eq!(order.len(), 6);
        for pair in order.chunks(2) {
            assert_eq!(pair[0].replace("start", "end"), pair[1], "{order:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_the_source_path_changes() {
        let new = with_source_url(ROOT, "https://updates.example.net/fleet/").unwrap();
        assert!(new.contains("Path=https://updates.example.net/fleet/%M/\n"));
        assert!(
            new.contains("[Target]\nType=partition\nPath=auto\n"),
            "{new}"
        );
        assert!(!new.contains("update.invalid"));
        assert_eq!(
            with_source_url("[Source]\nPath=/srv/local\n", "http://x"),
            None
        );
    }

    #[test]
    fn runtime_copies_replace_the_images() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(dir.path());
        let vendor = paths.at(VENDOR_TRANSFER_DIR);
        std::fs::create_dir_all(&vendor).unwrap();
        std::fs::write(vendor.join("10-root.transfer"), ROOT).unwrap();
        std::fs::write(vendor.join("README"), "not a transfer file").unwrap();
        assert_eq!(point_at(&paths, "http://10.0.0.5:8080/aiware"), Ok(1));
        let got = std::fs::read_to_string(paths.at(RUNTIME_TRANSFER_DIR).join("10-root.transfer"))
            .unwrap();
        assert!(got.contains("Path=http://10.0.0.5:8080/aiware/%M/"));
    }
}
