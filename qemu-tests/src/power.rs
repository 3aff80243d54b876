//! One power-on of a VM: its QEMU process (and swtpm, for a TPM), kept going
//! across the guest's resets by a thread of its own.
//!
//! QEMU runs with `-action reboot=shutdown` (see `vm::qemu_args`): a guest
//! reset ends the process. The thread hears QEMU's `SHUTDOWN` event say
//! `guest-reset` (on a QMP socket of its own) and starts QEMU again on the same
//! disk, NVRAM and TPM state, so the guest reboots as on one machine: it shut
//! down, reset, and its firmware starts from the same variables. Why not let
//! QEMU reset in place: under TCG a guest runs markedly slower after a reset in
//! the same process (QEMU still tracks the pages that held the last boot's
//! translated code). Measured: a reboot took 59.7 s to ready against 47.5 s in
//! a new process. That is the emulator's cost, not the node's, and every test
//! that reboots paid it.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What it takes to start the VM's QEMU, again after each reset.
pub struct Launch {
    pub name: String,
    pub qemu: String,
    pub args: Vec<String>,
    /// QEMU's stderr, appended to over every start.
    pub stderr_log: PathBuf,
    /// The command socket (removed before each start: QEMU makes it).
    pub qmp: PathBuf,
    /// The socket the reset listener connects to.
    pub qmp_events: PathBuf,
    pub tpm: Option<Tpm>,
}

/// swtpm for the guest: its state folder (the same folder is the same TPM),
/// its control socket and its log.
pub struct Tpm {
    pub state: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
}

/// The processes of one QEMU start.
struct Running {
    qemu: Child,
    swtpm: Option<Child>,
    /// Gives the reason of QEMU's last SHUTDOWN event once QEMU has gone.
    shutdown_reason: JoinHandle<Option<String>>,
}

impl Launch {
    fn start(&self) -> Result<Running> {
        let mut swtpm = match &self.tpm {
            Some(tpm) => Some(start_swtpm(&self.name, tpm)?),
            None => None,
        };
        let _ = std::fs::remove_file(&self.qmp);
        let _ = std::fs::remove_file(&self.qmp_events);
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_log)?;
        let qemu = Command::new(&self.qemu)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {}", self.qemu));
        let qemu = match qemu {
            Ok(q) => q,
            Err(e) => {
                if let Some(mut t) = swtpm.take() {
                    let _ = t.kill();
                    let _ = t.wait();
                }
                return Err(e);
            }
        };
        Ok(Running {
            qemu,
            swtpm,
            shutdown_reason: listen_for_shutdown(self.qmp_events.clone()),
        })
    }
}

impl Running {
    fn stop_swtpm(&mut self) {
        // swtpm ends with QEMU's connection; make sure of it.
        if let Some(mut t) = self.swtpm.take() {
            let _ = t.kill();
            let _ = t.wait();
        }
    }
}

#[derive(Default)]
struct State {
    /// The VM's owner wants QEMU gone.
    kill: bool,
    /// How QEMU ended for good (not a guest reset: that goes on).
    ended: Option<String>,
    /// When QEMU last started again after a guest reset.
    restarted_at: Option<Instant>,
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running VM's QEMU, restarted at each guest reset until it powers off,
/// exits otherwise, or is dropped (which kills it).
pub struct PowerOn {
    state: Arc<Mutex<State>>,
    thread: Option<JoinHandle<()>>,
}

impl PowerOn {
    /// Starts QEMU (an error if it cannot start) and the thread that keeps it.
    pub fn start(launch: Launch) -> Result<PowerOn> {
        let first = launch.start()?;
        let state = Arc::new(Mutex::new(State::default()));
        let kept = Arc::clone(&state);
        let thread = std::thread::spawn(move || keep_going(&launch, first, &kept));
        Ok(PowerOn {
            state,
            thread: Some(thread),
        })
    }

    /// How QEMU ended (its exit status, or why it could not start again after
    /// a reset); `None` while the VM runs.
    pub fn ended(&self) -> Option<String> {
        lock(&self.state).ended.clone()
    }

    /// When QEMU last started again after a guest reset; `None` before any.
    pub fn restarted_at(&self) -> Option<Instant> {
        lock(&self.state).restarted_at
    }
}

impl Drop for PowerOn {
    fn drop(&mut self) {
        lock(&self.state).kill = true;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn keep_going(launch: &Launch, mut run: Running, state: &Mutex<State>) {
    loop {
        let (status, killed) = loop {
            if lock(state).kill {
                let _ = run.qemu.kill();
                break (run.qemu.wait(), true);
            }
            match run.qemu.try_wait() {
                Ok(Some(status)) => break (Ok(status), false),
                Ok(None) => std::thread::sleep(Duration::from_millis(100)),
                Err(e) => break (Err(e), false),
            }
        };
        run.stop_swtpm();
        let reason = run.shutdown_reason.join().ok().flatten();
        let ended = match status {
            Ok(status)
                if !killed && status.success() && reason.as_deref() == Some("guest-reset") =>
            {
                eprintln!(
                    "qemu-tests: VM {}: the guest reset; it goes on in a new QEMU process",
                    launch.name
                );
                match launch.start() {
                    Ok(next) => {
                        run = next;
                        lock(state).restarted_at = Some(Instant::now());
                        continue;
                    }
                    Err(e) => format!("the guest reset and QEMU did not start again: {e:#}"),
                }
            }
            Ok(status) => status.to_string(),
            Err(e) => format!("waiting for QEMU: {e}"),
        };
        lock(state).ended = Some(ended);
        return;
    }
}

/// Listens to QEMU's events on `socket` until QEMU closes it; gives the
/// reason of the last SHUTDOWN event ("guest-reset", "guest-shutdown",
/// "host-qmp-system-reset", ...), `None` if there was none.
fn listen_for_shutdown(socket: PathBuf) -> JoinHandle<Option<String>> {
    std::thread::spawn(move || {
        // QEMU makes the socket before it runs the guest.
        let until = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            match UnixStream::connect(&socket) {
                Ok(s) => break s,
                Err(_) if Instant::now() < until => std::thread::sleep(Duration::from_millis(20)),
                Err(_) => return None,
            }
        };
        let mut writer = stream.try_clone().ok()?;
        writeln!(
            writer,
            "{}",
            serde_json::json!({ "execute": "qmp_capabilities" })
        )
        .ok()?;
        let mut reason = None;
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if v["event"] == "SHUTDOWN" {
                reason = v["data"]["reason"].as_str().map(str::to_string);
            }
        }
        reason
    })
}

/// Starts swtpm on the TPM's state folder and waits for its socket. QEMU
/// tells it to exit when QEMU does.
fn start_swtpm(vm: &str, tpm: &Tpm) -> Result<Child> {
    if !crate::process::on_path("swtpm") {
        bail!("VM {vm}: a TPM was asked for and swtpm is missing (package swtpm)");
    }
    std::fs::create_dir_all(&tpm.state)?;
    let _ = std::fs::remove_file(&tpm.socket);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&tpm.log)?;
    let mut child = Command::new("swtpm")
        .args(["socket", "--tpm2", "--tpmstate"])
        .arg(format!("dir={}", tpm.state.display()))
        .arg("--ctrl")
        .arg(format!("type=unixio,path={}", tpm.socket.display()))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting swtpm")?;
    let until = Instant::now() + Duration::from_secs(10);
    while !tpm.socket.exists() {
        if let Some(st) = child.try_wait()? {
            bail!("VM {vm}: swtpm exited ({st}); see swtpm.log");
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            bail!("VM {vm}: swtpm made no socket in 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(child)
}
