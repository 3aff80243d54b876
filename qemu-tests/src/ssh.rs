//! SSH into a guest through its forwarded port, with a key made for the test.

use crate::deadline::Deadline;
use crate::netdev::LOOPBACK;
use crate::process::{run_checked, run_with_limit, CmdOutput};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// An ed25519 key pair in the test's work dir.
#[derive(Debug, Clone)]
pub struct SshKey {
    pub private: PathBuf,
    pub public: String,
}

impl SshKey {
    /// Makes `dir/id_ed25519` (reusing one already there, so a VM restarted
    /// in the same work dir keeps its key).
    pub fn generate(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let private = dir.join("id_ed25519");
        let public_path = dir.join("id_ed25519.pub");
        if !private.exists() || !public_path.exists() {
            let _ = std::fs::remove_file(&private);
            let _ = std::fs::remove_file(&public_path);
            run_checked(
                Command::new("ssh-keygen")
                    .args([
                        "-q",
                        "-t",
                        "ed25519",
                        "-N",
                        "",
                        "-C",
                        "aiwimg-qemu-tests",
                        "-f",
                    ])
                    .arg(&private),
                Duration::from_secs(30),
            )
            .context("making the test's SSH key (is openssh-client installed?)")?;
        }
        let public = std::fs::read_to_string(&public_path)?.trim().to_string();
        Ok(SshKey { private, public })
    }
}

/// How to reach one guest's sshd from the host.
#[derive(Debug, Clone)]
pub struct GuestSsh {
    pub port: u16,
    pub user: String,
    pub key: PathBuf,
    /// Set once sshd has let us in, so teardown knows the journal can be fetched.
    reached: Arc<AtomicBool>,
}

/// ssh exits 255 for its own failures (connection refused, reset, auth).
const SSH_FAILED: i32 = 255;

impl GuestSsh {
    pub fn new(port: u16, key: &SshKey) -> Self {
        GuestSsh {
            port,
            user: "root".into(),
            key: key.private.clone(),
            reached: Arc::default(),
        }
    }

    /// The ssh command line for `remote` (also what a human would paste).
    pub fn command(&self, remote: &str) -> Command {
        let mut c = Command::new("ssh");
        c.args(self.base_args()).arg(remote);
        c
    }

    fn base_args(&self) -> Vec<String> {
        vec![
            "-i".into(),
            self.key.display().to_string(),
            "-p".into(),
            self.port.to_string(),
            "-o".into(),
            "StrictHostKeyChecking=no".into(),
            "-o".into(),
            "UserKnownHostsFile=/dev/null".into(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "IdentitiesOnly=yes".into(),
            "-o".into(),
            "LogLevel=ERROR".into(),
            "-o".into(),
            "ConnectTimeout=20".into(),
            "-o".into(),
            "ServerAliveInterval=15".into(),
            format!("{}@{LOOPBACK}", self.user),
        ]
    }

    /// A line a human can paste to get into the guest while it runs.
    pub fn shown(&self) -> String {
        format!("ssh {}", self.base_args().join(" "))
    }

    /// Runs `remote` once; an error only when ssh itself could not run.
    pub fn exec(&self, remote: &str, stdin: Option<&[u8]>, limit: Duration) -> Result<CmdOutput> {
        let out = run_with_limit(&mut self.command(remote), stdin, limit)?;
        if out.status.is_some_and(|s| s != SSH_FAILED) {
            self.reached.store(true, Ordering::Relaxed);
        }
        Ok(out)
    }

    /// Whether any command has run in the guest over this connection.
    pub fn was_reached(&self) -> bool {
        self.reached.load(Ordering::Relaxed)
    }

    /// Runs `remote`, retrying while sshd does not answer, until `deadline`.
    /// The command's own exit status (anything but 255) is returned as is.
    pub fn run(&self, remote: &str, deadline: &Deadline) -> Result<CmdOutput> {
        self.run_with_input(remote, None, deadline)
    }

    pub fn run_with_input(
        &self,
        remote: &str,
        stdin: Option<&[u8]>,
        deadline: &Deadline,
    ) -> Result<CmdOutput> {
        let mut last = String::new();
        loop {
            let limit = deadline.cap(Duration::from_secs(300));
            if limit.is_zero() {
                bail!(
                    "ssh to 127.0.0.1:{} could not run {remote:?} before the deadline; last ssh error: {last}",
                    self.port
                );
            }
            let out = self.exec(remote, stdin, limit)?;
            if out.timed_out {
                bail!("{remote:?} over ssh did not finish before the deadline");
            }
            if out.status != Some(SSH_FAILED) {
                return Ok(out);
            }
            last = out.stderr.trim().to_string();
            std::thread::sleep(deadline.cap(Duration::from_secs(3)));
        }
    }

    /// Waits until sshd lets us in.
    pub fn wait_ready(&self, deadline: &Deadline) -> Result<()> {
        let out = self.run("true", deadline)?;
        if !out.success() {
            bail!("ssh answered but `true` failed: {}", out.stderr);
        }
        Ok(())
    }

    /// Runs `remote` and returns its stdout; fails with status and stderr otherwise.
    pub fn check(&self, remote: &str, deadline: &Deadline) -> Result<String> {
        let out = self.run(remote, deadline)?;
        if !out.success() {
            bail!(
                "guest command {remote:?} exited {:?}\nstdout: {}\nstderr: {}",
                out.status,
                out.stdout.trim(),
                out.stderr.trim()
            );
        }
        Ok(out.stdout)
    }

    /// Runs `remote` and fails unless it exits non-zero (for "must be refused" checks).
    pub fn check_fails(&self, remote: &str, deadline: &Deadline) -> Result<CmdOutput> {
        let out = self.run(remote, deadline)?;
        if out.success() {
            bail!(
                "guest command {remote:?} succeeded but must fail; stdout: {}",
                out.stdout.trim()
            );
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_a_key_once_and_reuses_it() {
        let dir = std::env::temp_dir().join(format!("aiwimg-ssh-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = SshKey::generate(&dir).unwrap();
        assert!(a.public.starts_with("ssh-ed25519 "), "{}", a.public);
        let b = SshKey::generate(&dir).unwrap();
        assert_eq!(a.public, b.public);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn command_targets_loopback_with_the_key_and_no_host_key_pinning() {
        let key = SshKey {
            private: "/w/id_ed25519".into(),
            public: String::new(),
        };
        let ssh = GuestSsh::new(2222, &key);
        let shown = ssh.shown();
        assert!(shown.contains("-i /w/id_ed25519 -p 2222"), "{shown}");
        assert!(shown.contains("StrictHostKeyChecking=no"));
        assert!(shown.contains("UserKnownHostsFile=/dev/null"));
        assert!(shown.ends_with("root@127.0.0.1"), "{shown}");
    }

    #[test]
    fn an_unanswered_port_fails_at_the_deadline_with_the_ssh_error() {
        let port = crate::netdev::free_tcp_port().unwrap();
        let dir = std::env::temp_dir().join(format!("aiwimg-ssh-dl-{}", std::process::id()));
        let key = SshKey::generate(&dir).unwrap();
        let ssh = GuestSsh::new(port, &key);
        let err = ssh
            .run("true", &Deadline::after(Duration::from_secs(2)))
            .unwrap_err()
            .to_string();
        assert!(err.contains("before the deadline"), "{err}");
        assert!(err.contains("refused"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
