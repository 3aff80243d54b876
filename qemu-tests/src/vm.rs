//! One QEMU virtual machine booting an image the way a user's hypervisor does.
//!
//! ```text
//! let vm = Vm::builder("engine", case.dir())
//!     .disk(&image.disk, image.format)
//!     .user_data(UserData::cloud_config().setting("AIWARE_MODE", "engine"))
//!     .start()?;
//! vm.wait_for_agent(&deadline)?;
//! vm.check("systemctl is-active docker", &deadline)?;
//! ```
//!
//! The image is attached through a qcow2 copy-on-write overlay in the VM's
//! directory, so the built image is never written. Dropping a [`Vm`] fetches
//! the guest's journal when SSH worked, then kills QEMU.

use crate::accel::{accel, Accel};
use crate::console::{
    agent_report, find_trouble, tail_of, AgentReport, ConsoleLog, Mark, Trouble, TAIL_LINES,
};
use crate::deadline::Deadline;
use crate::firmware::Ovmf;
use crate::netdev::{check_isolated, Nic, SocketNic, UserNet};
use crate::power::{Launch, PowerOn, Tpm};
use crate::process::{on_path, run_checked, CmdOutput};
use crate::seed::{nocloud_meta_data, nocloud_seed, UserData};
use crate::ssh::{GuestSsh, SshKey};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The QEMU binary: `AIWIMG_QEMU` or `qemu-system-x86_64` on PATH.
pub fn qemu_binary() -> String {
    std::env::var("AIWIMG_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into())
}

/// On-disk format of an image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// How a drive is presented to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriveBus {
    /// SATA CD-ROM on the q35 AHCI controller, as hypervisors attach seed ISOs.
    Cdrom,
    /// virtio-blk disk.
    Virtio,
}

/// A drive beyond the boot disk (config-2 ISO, OVF environment, data disk).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraDrive {
    pub path: PathBuf,
    pub format: DiskFormat,
    pub bus: DriveBus,
    pub read_only: bool,
}

/// Everything that defines a VM; kept so the VM can be powered on again.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub name: String,
    pub image: PathBuf,
    pub image_format: DiskFormat,
    /// Virtual size of the overlay disk the guest sees (`/var` grows into it).
    pub disk_size_gib: u32,
    pub memory_mib: u32,
    pub cpus: u32,
    /// `-smbios` values, e.g. `type=1,manufacturer=Amazon EC2`.
    pub smbios: Vec<String>,
    /// NoCloud user-data; `None` means no seed ISO at all.
    pub user_data: Option<String>,
    pub instance_id: String,
    pub seed_bus: DriveBus,
    pub extra_drives: Vec<ExtraDrive>,
    pub user_net: Option<UserNet>,
    pub lan_nics: Vec<SocketNic>,
    /// UEFI Secure Boot enforced by the firmware: OVMF's secboot build, which
    /// needs SMM, with its vars write-protected outside SMM.
    pub secure_boot: bool,
    /// The vars file copied for this VM instead of OVMF's empty template (e.g.
    /// another VM's, with keys enrolled).
    pub vars_template: Option<PathBuf>,
    /// A TPM2 for the guest: swtpm keeping its state in this folder (an
    /// empty folder is a new TPM; the same folder is the same TPM across
    /// reboots and power cycles).
    pub tpm_state: Option<PathBuf>,
}

/// Files of one VM, all inside its directory (the QMP socket lives in the
/// temp dir because socket paths are limited to 108 bytes).
#[derive(Debug, Clone)]
pub struct VmPaths {
    pub dir: PathBuf,
    pub overlay: PathBuf,
    pub vars: PathBuf,
    pub console: PathBuf,
    pub qemu_stderr: PathBuf,
    pub seed_dir: PathBuf,
    pub qmp: PathBuf,
    /// A second QMP socket, for the harness's listener to QEMU's events
    /// (a QMP socket serves one client at a time; `qmp` stays free for commands).
    pub qmp_events: PathBuf,
    /// swtpm's control socket (in the temp dir, like `qmp`).
    pub tpm_socket: PathBuf,
}

impl VmPaths {
    fn new(dir: PathBuf) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let socket = |what: &str| {
            std::env::temp_dir().join(format!("aiwimg-{what}-{}-{n}.sock", std::process::id()))
        };
        let (qmp, qmp_events, tpm_socket) = (socket("qmp"), socket("qmpev"), socket("tpm"));
        VmPaths {
            overlay: dir.join("disk.qcow2"),
            vars: dir.join("OVMF_VARS.fd"),
            console: dir.join("console.log"),
            qemu_stderr: dir.join("qemu.stderr.log"),
            seed_dir: dir.join("seed"),
            qmp,
            qmp_events,
            tpm_socket,
            dir,
        }
    }

    fn seed_iso(&self) -> PathBuf {
        self.seed_dir.join("seed.iso")
    }
}

/// The QEMU command line for `spec`. Pure: unit tests read it.
pub fn qemu_args(spec: &VmSpec, paths: &VmPaths, accel: Accel, ovmf: &Ovmf) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&["-name", &spec.name, "-nodefaults", "-no-user-config"]);
    if spec.secure_boot {
        push(&["-machine", "q35,smm=on"]);
        push(&["-global", "driver=cfi.pflash01,property=secure,value=on"]);
    } else {
        push(&["-machine", "q35"]);
    }
    push(&accel.qemu_args());
    push(&[
        "-m",
        &spec.memory_mib.to_string(),
        "-smp",
        &spec.cpus.to_string(),
    ]);
    push(&["-display", "none", "-monitor", "none"]);
    a.extend(ovmf.pflash_args(&paths.vars));
    a.extend([
        "-drive".into(),
        format!(
            // A full host disk becomes an I/O error the guest logs, not a
            // silently paused VM (QEMU's default for ENOSPC is to stop).
            "if=none,id=disk0,format=qcow2,discard=unmap,werror=report,rerror=report,file={}",
            paths.overlay.display()
        ),
        "-device".into(),
        "virtio-blk-pci,drive=disk0,bootindex=1".into(),
    ]);
    let mut drives: Vec<ExtraDrive> = Vec::new();
    if spec.user_data.is_some() {
        drives.push(ExtraDrive {
            path: paths.seed_iso(),
            format: DiskFormat::Raw,
            bus: spec.seed_bus,
            read_only: true,
        });
    }
    drives.extend(spec.extra_drives.iter().cloned());
    for (i, d) in drives.iter().enumerate() {
        let id = format!("drive{}", i + 1);
        let media = if d.bus == DriveBus::Cdrom {
            ",media=cdrom"
        } else {
            ""
        };
        let ro = if d.read_only { ",readonly=on" } else { "" };
        a.push("-drive".into());
        a.push(format!(
            "if=none,id={id},format={}{media}{ro},file={}",
            d.format.as_str(),
            d.path.display()
        ));
        a.push("-device".into());
        a.push(match d.bus {
            DriveBus::Cdrom => format!("ide-cd,drive={id},bus=ide.{i}"),
            DriveBus::Virtio => format!("virtio-blk-pci,drive={id}"),
        });
    }
    let mut nics: Vec<Nic> = Vec::new();
    if let Some(u) = &spec.user_net {
        nics.push(Nic::User(u.clone()));
    }
    nics.extend(spec.lan_nics.iter().cloned().map(Nic::Lan));
    for (i, nic) in nics.iter().enumerate() {
        let id = format!("net{i}");
        a.push("-netdev".into());
        a.push(nic.netdev_arg(&id));
        a.push("-device".into());
        // No option ROM: OVMF must not try to boot from the network.
        a.push(format!("{},romfile=", nic.device_arg(&id)));
    }
    if spec.tpm_state.is_some() {
        a.extend([
            "-chardev".into(),
            format!("socket,id=chrtpm,path={}", paths.tpm_socket.display()),
            "-tpmdev".into(),
            "emulator,id=tpm0,chardev=chrtpm".into(),
            "-device".into(),
            "tpm-tis,tpmdev=tpm0".into(),
        ]);
    }
    for s in &spec.smbios {
        a.push("-smbios".into());
        a.push(s.clone());
    }
    a.extend([
        "-object".into(),
        "rng-random,id=rng0,filename=/dev/urandom".into(),
        "-device".into(),
        "virtio-rng-pci,rng=rng0".into(),
        "-chardev".into(),
        format!("file,id=serial0,path={},append=on", paths.console.display()),
        "-serial".into(),
        "chardev:serial0".into(),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", paths.qmp.display()),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", paths.qmp_events.display()),
        // A guest reset ends this QEMU process; the harness starts a new one
        // on the same disk, vars and TPM (Vm::ensure_running). Under TCG a
        // guest runs markedly slower after a reset in the same process (the
        // translated code of the last boot is still tracked: measured, a
        // reboot 59.7 s to ready against 47.5 s in a new process), which is
        // QEMU's cost, not the node's. What the guest does is the same: it
        // shuts down, resets, and its firmware starts from the same NVRAM.
        "-action".into(),
        "reboot=shutdown".into(),
    ]);
    a
}

/// Builds a [`Vm`]; defaults: 2 GiB memory, 2 vCPUs, 16 GiB disk, SSH forwarded.
pub struct VmBuilder {
    spec: VmSpec,
    dir: PathBuf,
    user_data: Option<UserData>,
    raw_user_data: Option<String>,
    ssh: bool,
    /// Made early by [`VmBuilder::ssh_public_key`] (the VM dir is then already fresh).
    early_key: Option<SshKey>,
}

impl VmBuilder {
    pub fn disk(mut self, image: &Path, format: DiskFormat) -> Self {
        self.spec.image = image.to_path_buf();
        self.spec.image_format = format;
        self
    }

    pub fn disk_size_gib(mut self, gib: u32) -> Self {
        self.spec.disk_size_gib = gib;
        self
    }

    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.spec.memory_mib = mib;
        self
    }

    pub fn cpus(mut self, n: u32) -> Self {
        self.spec.cpus = n;
        self
    }

    /// One `-smbios` value, e.g. `type=1,manufacturer=Amazon EC2,product=m5.large`.
    pub fn smbios(mut self, value: &str) -> Self {
        self.spec.smbios.push(value.to_string());
        self
    }

    /// Cloud-config user-data; the test's SSH key is added to it.
    pub fn user_data(mut self, ud: UserData) -> Self {
        self.user_data = Some(ud);
        self.raw_user_data = None;
        self
    }

    /// User-data exactly as given (KEY=VALUE, garbage, MIME...); no key added.
    pub fn raw_user_data(mut self, text: &str) -> Self {
        self.raw_user_data = Some(text.to_string());
        self.user_data = None;
        self
    }

    pub fn instance_id(mut self, id: &str) -> Self {
        self.spec.instance_id = id.to_string();
        self
    }

    pub fn seed_bus(mut self, bus: DriveBus) -> Self {
        self.spec.seed_bus = bus;
        self
    }

    pub fn drive(mut self, drive: ExtraDrive) -> Self {
        self.spec.extra_drives.push(drive);
        self
    }

    /// Replaces the default user network (which forwards only SSH).
    pub fn user_net(mut self, net: UserNet) -> Self {
        self.spec.user_net = Some(net);
        self
    }

    /// No user network at all (LAN-only VMs).
    pub fn no_user_net(mut self) -> Self {
        self.spec.user_net = None;
        self.ssh = false;
        self
    }

    /// Guest connections to `guest_addr:guest_port` reach `127.0.0.1:host_port`.
    pub fn guest_forward(
        mut self,
        guest_addr: Ipv4Addr,
        guest_port: u16,
        host_port: u16,
    ) -> Result<Self> {
        let net = self.spec.user_net.get_or_insert_with(UserNet::new);
        net.forward_to_host(guest_addr, guest_port, host_port)?;
        Ok(self)
    }

    /// Forward a guest TCP port to a free 127.0.0.1 port (see [`Vm::host_port`]).
    pub fn host_forward(mut self, guest_port: u16) -> Result<Self> {
        let net = self.spec.user_net.get_or_insert_with(UserNet::new);
        net.forward_guest_port(guest_port)?;
        Ok(self)
    }

    /// Boots with Secure Boot enforced by the firmware; `vars` (a vars file
    /// with keys enrolled) or, when None, OVMF's empty vars: setup mode, in
    /// which systemd-boot may enroll the image's keys.
    pub fn secure_boot(mut self, vars: Option<&Path>) -> Self {
        self.spec.secure_boot = true;
        self.spec.vars_template = vars.map(Path::to_path_buf);
        self
    }

    /// Gives the guest a TPM2 (swtpm) whose state lives in `state`.
    pub fn tpm(mut self, state: &Path) -> Self {
        self.spec.tpm_state = Some(state.to_path_buf());
        self
    }

    pub fn lan(mut self, nic: SocketNic) -> Self {
        self.spec.lan_nics.push(nic);
        self
    }

    /// Makes the VM's fresh directory and SSH key now, before [`VmBuilder::start`],
    /// and returns the public key: for launch data the test builds itself (cloud
    /// metadata doubles, config drives, an ESP file) instead of the NoCloud seed.
    pub fn ssh_public_key(&mut self) -> Result<String> {
        if self.early_key.is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
            std::fs::create_dir_all(&self.dir)
                .with_context(|| format!("creating {}", self.dir.display()))?;
            self.early_key = Some(SshKey::generate(&self.dir)?);
        }
        Ok(self.early_key.as_ref().expect("set above").public.clone())
    }

    /// Creates the overlay, vars copy and seed, and starts QEMU.
    pub fn start(mut self) -> Result<Vm> {
        preflight()?;
        if self.spec.image.as_os_str().is_empty() {
            bail!(
                "VM {}: no disk image given (VmBuilder::disk)",
                self.spec.name
            );
        }
        if !self.spec.image.is_file() {
            bail!(
                "VM {}: image {} does not exist",
                self.spec.name,
                self.spec.image.display()
            );
        }
        let early_key = self.early_key.take();
        if early_key.is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
            std::fs::create_dir_all(&self.dir)
                .with_context(|| format!("creating {}", self.dir.display()))?;
        }
        let paths = VmPaths::new(self.dir.clone());
        let ssh_key = if self.ssh {
            let net = self.spec.user_net.get_or_insert_with(UserNet::new);
            if net.host_port_for(22).is_none() {
                net.forward_guest_port(22)?;
            }
            Some(match early_key {
                Some(k) => k,
                None => SshKey::generate(&self.dir)?,
            })
        } else {
            None
        };
        self.spec.user_data = match (self.user_data.take(), self.raw_user_data.take()) {
            (Some(ud), _) => Some(match &ssh_key {
                Some(k) => ud.ssh_key(&k.public).render(),
                None => ud.render(),
            }),
            (None, Some(raw)) => Some(raw),
            (None, None) => None,
        };
        let image = std::fs::canonicalize(&self.spec.image)?;
        run_checked(
            Command::new("qemu-img")
                .args([
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-F",
                    self.spec.image_format.as_str(),
                    "-b",
                ])
                .arg(&image)
                .arg(&paths.overlay)
                .arg(format!("{}G", self.spec.disk_size_gib)),
            Duration::from_secs(60),
        )
        .context("creating the copy-on-write overlay")?;
        let ovmf = if self.spec.secure_boot {
            Ovmf::locate_secure_boot()?
        } else {
            Ovmf::locate()?
        };
        let vars = self.spec.vars_template.as_ref().unwrap_or(&ovmf.vars);
        std::fs::copy(vars, &paths.vars).with_context(|| format!("copying {}", vars.display()))?;
        if let Some(ud) = &self.spec.user_data {
            let hostname = self.spec.name.clone();
            nocloud_seed(
                &paths.seed_dir,
                ud,
                &nocloud_meta_data(&self.spec.instance_id, &hostname),
            )?;
        }
        let ssh = ssh_key.map(|k| {
            let port = self
                .spec
                .user_net
                .as_ref()
                .and_then(|n| n.host_port_for(22))
                .expect("SSH forward added above");
            GuestSsh::new(port, &k)
        });
        let mut vm = Vm {
            spec: self.spec,
            paths,
            ovmf,
            power: None,
            ssh,
            started: Instant::now(),
            boot_mark: Mark(0),
        };
        vm.spawn()?;
        Ok(vm)
    }
}

/// Checks the host tools a VM needs, naming the package for each one missing.
pub fn preflight() -> Result<()> {
    let qemu = qemu_binary();
    let tools = [
        (qemu.as_str(), "qemu-system-x86"),
        ("qemu-img", "qemu-utils"),
        ("ssh", "openssh-client"),
        ("ssh-keygen", "openssh-client"),
        ("genisoimage", "genisoimage"),
        ("socat", "socat"),
    ];
    let missing: Vec<String> = tools
        .iter()
        .filter(|(t, _)| !on_path(t))
        .map(|(t, p)| format!("{t} (package {p})"))
        .collect();
    if !missing.is_empty() {
        bail!(
            "QEMU tests cannot run: missing host tools: {}",
            missing.join(", ")
        );
    }
    Ovmf::locate().map(|_| ())
}

/// A running (or stopped) VM. Dropping it saves the journal if SSH worked and kills QEMU.
pub struct Vm {
    spec: VmSpec,
    paths: VmPaths,
    ovmf: Ovmf,
    /// QEMU (and swtpm) while powered on, kept across guest resets.
    power: Option<PowerOn>,
    ssh: Option<GuestSsh>,
    started: Instant,
    boot_mark: Mark,
}

impl Vm {
    /// A builder for a VM whose files live in `case_dir/name/`.
    pub fn builder(name: &str, case_dir: &Path) -> VmBuilder {
        VmBuilder {
            spec: VmSpec {
                name: name.to_string(),
                image: PathBuf::new(),
                image_format: DiskFormat::Raw,
                disk_size_gib: 16,
                memory_mib: 2048,
                cpus: crate::case::vcpus_per_vm(),
                smbios: Vec::new(),
                user_data: None,
                instance_id: format!("iid-aiwimg-{name}"),
                seed_bus: DriveBus::Cdrom,
                extra_drives: Vec::new(),
                user_net: Some(UserNet::new()),
                lan_nics: Vec::new(),
                secure_boot: false,
                vars_template: None,
                tpm_state: None,
            },
            dir: case_dir.join(name),
            user_data: None,
            raw_user_data: None,
            ssh: true,
            early_key: None,
        }
    }

    /// Powers on: starts QEMU (swtpm first, for a TPM). This boot's console
    /// lines and time start here; a guest reset goes on in the same power-on.
    fn spawn(&mut self) -> Result<()> {
        let choice = accel();
        let args = qemu_args(&self.spec, &self.paths, choice.accel, &self.ovmf);
        check_isolated(&args)?;
        std::fs::write(
            self.paths.dir.join("qemu.cmdline"),
            format!("{} {}\n", qemu_binary(), args.join(" ")),
        )?;
        self.boot_mark = self.console().mark();
        self.power = Some(PowerOn::start(Launch {
            name: self.spec.name.clone(),
            qemu: qemu_binary(),
            args,
            stderr_log: self.paths.qemu_stderr.clone(),
            qmp: self.paths.qmp.clone(),
            qmp_events: self.paths.qmp_events.clone(),
            tpm: self.spec.tpm_state.as_ref().map(|state| Tpm {
                state: state.clone(),
                socket: self.paths.tpm_socket.clone(),
                log: self.paths.dir.join("swtpm.log"),
            }),
        })?);
        self.started = Instant::now();
        eprintln!(
            "qemu-tests: VM {} started ({:?}); console {}{}",
            self.spec.name,
            choice.accel,
            self.paths.console.display(),
            self.ssh
                .as_ref()
                .map(|s| format!("; {}", s.shown()))
                .unwrap_or_default()
        );
        Ok(())
    }

    /// Powers the VM off and on again with another TPM (`state`: an empty
    /// folder is a new one), as when a disk is moved to another machine.
    /// `None`: no TPM at all.
    pub fn power_cycle_with_tpm(
        &mut self,
        state: Option<&Path>,
        deadline: &Deadline,
    ) -> Result<()> {
        self.shutdown(deadline.cap(Duration::from_secs(120)))?;
        self.spec.tpm_state = state.map(Path::to_path_buf);
        self.spawn()
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn spec(&self) -> &VmSpec {
        &self.spec
    }

    pub fn dir(&self) -> &Path {
        &self.paths.dir
    }

    pub fn paths(&self) -> &VmPaths {
        &self.paths
    }

    pub fn console(&self) -> ConsoleLog {
        ConsoleLog::new(&self.paths.console)
    }

    /// Console lines of the current boot only.
    pub fn boot_lines(&self) -> Vec<String> {
        self.console().lines_since(self.boot_mark)
    }

    /// Time since QEMU was (re)started or the guest last rebooted.
    pub fn since_boot(&self) -> Duration {
        self.started.elapsed()
    }

    /// Time since QEMU last started again after a guest reset (a reboot's
    /// boot alone, without the shutdown before it); `None` before any reset.
    pub fn since_qemu_restart(&self) -> Option<Duration> {
        Some(self.power.as_ref()?.restarted_at()?.elapsed())
    }

    /// The 127.0.0.1 port forwarded to `guest_port`.
    pub fn host_port(&self, guest_port: u16) -> Option<u16> {
        self.spec.user_net.as_ref()?.host_port_for(guest_port)
    }

    pub fn ssh(&self) -> Result<&GuestSsh> {
        self.ssh
            .as_ref()
            .ok_or_else(|| anyhow!("VM {} has no SSH forward", self.spec.name))
    }

    /// Whether QEMU is still running (a guest reset does not stop it); the
    /// error carries its stderr if it exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        let Some(power) = self.power.as_ref() else {
            bail!("VM {} is not running", self.spec.name);
        };
        if let Some(how) = power.ended() {
            self.power = None;
            let stderr = std::fs::read_to_string(&self.paths.qemu_stderr).unwrap_or_default();
            bail!(
                "QEMU for VM {} exited ({how}).\nQEMU stderr:\n{}\nLast console lines:\n{}",
                self.spec.name,
                stderr.trim(),
                tail_of(&self.boot_lines(), TAIL_LINES)
            );
        }
        Ok(())
    }

    /// Waits for the first console line of this boot for which `pick` returns
    /// something. On timeout the error shows the last console lines.
    pub fn wait_for_console<T>(
        &mut self,
        what: &str,
        deadline: &Deadline,
        mut pick: impl FnMut(&[String]) -> Option<T>,
    ) -> Result<T> {
        loop {
            let lines = self.boot_lines();
            if let Some(found) = pick(&lines) {
                return Ok(found);
            }
            self.ensure_running()?;
            if deadline.expired() {
                bail!(
                    "VM {}: timed out after {:.0?} waiting for {what} on the console ({}).\n\
                     Last {TAIL_LINES} console lines:\n{}",
                    self.spec.name,
                    deadline.elapsed(),
                    self.paths.console.display(),
                    tail_of(&lines, TAIL_LINES)
                );
            }
            // Often enough that a boot's time is measured to 0.1 s (at 0.5 s
            // every figure was up to 0.5 s late, 0.25 s on average).
            std::thread::sleep(deadline.cap(Duration::from_millis(100)));
        }
    }

    /// Waits for a console line containing `text`; returns that line.
    pub fn wait_for_line(&mut self, text: &str, deadline: &Deadline) -> Result<String> {
        self.wait_for_console(&format!("{text:?}"), deadline, |lines| {
            lines.iter().find(|l| l.contains(text)).cloned()
        })
    }

    /// Waits for the agent's verdict on this boot: `aiw-agent: ready` or
    /// `aiw-agent: invalid settings: ...`.
    pub fn wait_for_agent(&mut self, deadline: &Deadline) -> Result<AgentReport> {
        self.wait_for_console(
            "the agent's report (\"aiw-agent: ready\" or \"aiw-agent: invalid settings:\")",
            deadline,
            agent_report,
        )
    }

    /// Waits for `aiw-agent: ready`; an invalid-settings report is an error.
    pub fn wait_ready(&mut self, deadline: &Deadline) -> Result<Duration> {
        match self.wait_for_agent(deadline)? {
            AgentReport::Ready(_) => Ok(self.since_boot()),
            AgentReport::InvalidSettings(line) => bail!(
                "VM {}: the agent refused its settings: {line}",
                self.spec.name
            ),
        }
    }

    /// Waits until SSH lets us in.
    pub fn wait_ssh(&mut self, deadline: &Deadline) -> Result<()> {
        self.ensure_running()?;
        self.ssh()?.wait_ready(deadline)
    }

    /// Runs a guest command over SSH: (status, stdout, stderr).
    pub fn run(&self, cmd: &str, deadline: &Deadline) -> Result<CmdOutput> {
        self.ssh()?.run(cmd, deadline)
    }

    /// Runs a guest command that must succeed; returns its stdout.
    pub fn check(&self, cmd: &str, deadline: &Deadline) -> Result<String> {
        self.ssh()?.check(cmd, deadline)
    }

    /// Runs a guest command with `input` on its stdin; it must succeed.
    pub fn check_with_input(&self, cmd: &str, input: &[u8], deadline: &Deadline) -> Result<String> {
        let out = self.ssh()?.run_with_input(cmd, Some(input), deadline)?;
        if !out.success() {
            bail!(
                "guest command {cmd:?} exited {:?}\nstdout: {}\nstderr: {}",
                out.status,
                out.stdout.trim(),
                out.stderr.trim()
            );
        }
        Ok(out.stdout)
    }

    /// Trouble on the console over all boots of this VM.
    pub fn console_trouble(&self) -> Vec<Trouble> {
        find_trouble(&self.console().lines())
    }

    /// Reboots the guest from inside (`systemctl reboot`) and waits for the
    /// agent's report of the new boot. The disk, vars and seed stay the same.
    pub fn reboot(&mut self, deadline: &Deadline) -> Result<AgentReport> {
        self.start_reboot(deadline)?;
        self.wait_for_agent(deadline)
    }

    /// Asks the guest to reboot and returns; console lines from here on are
    /// the next boots' (for boots the agent does not report on).
    pub fn start_reboot(&mut self, deadline: &Deadline) -> Result<()> {
        self.boot_mark = self.console().mark();
        self.started = Instant::now();
        // The connection drops as the guest goes down; its status says nothing.
        let _ = self.ssh()?.exec(
            "systemctl reboot",
            None,
            deadline.cap(Duration::from_secs(60)),
        );
        Ok(())
    }

    /// Waits up to `timeout` for the guest to power itself off (QEMU exits);
    /// true when it did.
    pub fn wait_powered_off(&mut self, timeout: Duration) -> Result<bool> {
        let until = Instant::now() + timeout;
        loop {
            match self.power.as_ref() {
                None => return Ok(true),
                Some(power) if power.ended().is_some() => {
                    self.power = None;
                    return Ok(true);
                }
                Some(_) => {}
            }
            if Instant::now() >= until {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Asks the guest to power off (ACPI), waiting up to `grace`; kills QEMU after that.
    pub fn shutdown(&mut self, grace: Duration) -> Result<()> {
        let running = match self.power.as_ref() {
            None => return Ok(()),
            Some(power) => power.ended().is_none(),
        };
        if running {
            if let Err(e) = qmp_command(&self.paths.qmp, "system_powerdown") {
                eprintln!(
                    "qemu-tests: VM {}: powerdown request failed: {e:#}",
                    self.spec.name
                );
            }
            self.wait_powered_off(grace)?;
        }
        self.kill();
        Ok(())
    }

    /// Powers the VM off cleanly and on again with the same disk and vars.
    pub fn power_cycle(&mut self, deadline: &Deadline) -> Result<()> {
        self.shutdown(deadline.cap(Duration::from_secs(120)))?;
        self.spawn()
    }

    /// Powers the VM off and on again with the same disks but new launch
    /// data: a NoCloud seed with `ud` (the test's SSH key added) under a new
    /// `instance_id`, as when a disk is launched again as another instance.
    pub fn relaunch(&mut self, ud: UserData, instance_id: &str, deadline: &Deadline) -> Result<()> {
        self.shutdown(deadline.cap(Duration::from_secs(120)))?;
        let text = match &self.ssh {
            Some(ssh) => {
                let public = std::fs::read_to_string(ssh.key.with_extension("pub"))
                    .context("reading the test's SSH public key")?;
                ud.ssh_key(public.trim()).render()
            }
            None => ud.render(),
        };
        self.spec.instance_id = instance_id.to_string();
        self.spec.user_data = Some(text.clone());
        nocloud_seed(
            &self.paths.seed_dir,
            &text,
            &nocloud_meta_data(instance_id, &self.spec.name),
        )?;
        self.spawn()
    }

    /// Kills QEMU (and swtpm) at once.
    pub fn kill(&mut self) {
        self.power = None;
        let _ = std::fs::remove_file(&self.paths.qmp);
        let _ = std::fs::remove_file(&self.paths.qmp_events);
        let _ = std::fs::remove_file(&self.paths.tpm_socket);
    }

    /// Saves `journalctl -b` (and the boot list) from the guest to the VM dir,
    /// and `systemd-analyze` (time, critical chain, blame) beside it.
    pub fn save_journal(&self) -> Result<PathBuf> {
        let ssh = self.ssh()?;
        let out = ssh.exec(
            "journalctl --list-boots --no-pager; echo; journalctl -b --no-pager -o short-monotonic",
            None,
            Duration::from_secs(90),
        )?;
        if out.status != Some(0) {
            bail!(
                "journalctl over ssh failed: {:?} {}",
                out.status,
                out.stderr.trim()
            );
        }
        let path = self.paths.dir.join("journal.txt");
        std::fs::write(&path, out.stdout)?;
        // Where the boot's time went, kept beside the journal of every VM.
        let analysis = ssh.exec(
            "systemd-analyze 2>&1; echo; systemd-analyze critical-chain --no-pager 2>&1; \
             echo; systemd-analyze blame --no-pager 2>&1",
            None,
            Duration::from_secs(60),
        )?;
        std::fs::write(self.paths.dir.join("systemd-analyze.txt"), analysis.stdout)?;
        Ok(path)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let running = self.power.as_ref().is_some_and(|p| p.ended().is_none());
        if running && self.ssh.as_ref().is_some_and(|s| s.was_reached()) {
            match self.save_journal() {
                Ok(p) => eprintln!(
                    "qemu-tests: VM {}: journal saved to {}",
                    self.spec.name,
                    p.display()
                ),
                Err(e) => eprintln!(
                    "qemu-tests: VM {}: journal not saved: {e:#}",
                    self.spec.name
                ),
            }
        }
        self.kill();
        let failed = std::thread::panicking();
        if failed {
            eprintln!(
                "qemu-tests: VM {} artifacts (console, user-data, journal, disk) kept in {}",
                self.spec.name,
                self.paths.dir.display()
            );
        } else if std::env::var_os("AIWIMG_KEEP_DISKS").is_none() {
            // The overlay can hold gigabytes; console, seed and journal stay.
            let _ = std::fs::remove_file(&self.paths.overlay);
        }
    }
}

/// Sends one QMP command over the VM's control socket.
pub fn qmp_command(socket: &Path, command: &str) -> Result<Value> {
    let stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to QMP at {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?; // greeting
    let mut answer = |cmd: &str| -> Result<Value> {
        writeln!(writer, "{}", serde_json::json!({ "execute": cmd }))?;
        loop {
            let mut l = String::new();
            if reader.read_line(&mut l)? == 0 {
                bail!("QMP closed while waiting for the answer to {cmd}");
            }
            let v: Value = serde_json::from_str(&l)?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                bail!("QMP {cmd}: {e}");
            }
        }
    };
    answer("qmp_capabilities")?;
    answer(command)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        let mut net = UserNet::new();
        net.forward_guest_port(22).unwrap();
        net.forward_to_host(Ipv4Addr::new(10, 0, 2, 100), 9000, 4000)
            .unwrap();
        VmSpec {
            name: "t".into(),
            image: "/img/engine.raw".into(),
            image_format: DiskFormat::Raw,
            disk_size_gib: 16,
            memory_mib: 1536,
            cpus: 2,
            smbios: vec!["type=1,manufacturer=Amazon EC2".into()],
            user_data: Some("#cloud-config\n".into()),
            instance_id: "iid".into(),
            seed_bus: DriveBus::Cdrom,
            extra_drives: vec![ExtraDrive {
                path: "/w/config-2.iso".into(),
                format: DiskFormat::Raw,
                bus: DriveBus::Cdrom,
                read_only: true,
            }],
            user_net: Some(net),
            lan_nics: Vec::new(),
            secure_boot: false,
            vars_template: None,
            tpm_state: None,
        }
    }

    #[test]
    fn a_tpm_is_swtpm_on_a_socket_as_a_tis_device() {
        let paths = VmPaths::new("/w/t".into());
        let plain = qemu_args(&spec(), &paths, Accel::Tcg, &ovmf());
        assert!(after(&plain, "-tpmdev").is_empty());
        let mut with = spec();
        with.tpm_state = Some("/w/t/tpm".into());
        let args = qemu_args(&with, &paths, Accel::Tcg, &ovmf());
        assert_eq!(after(&args, "-tpmdev"), ["emulator,id=tpm0,chardev=chrtpm"]);
        assert!(after(&args, "-device").contains(&"tpm-tis,tpmdev=tpm0"));
        assert!(after(&args, "-chardev")
            .contains(&format!("socket,id=chrtpm,path={}", paths.tpm_socket.display()).as_str()));
    }

    #[test]
    fn secure_boot_machines_have_smm_and_protected_vars() {
        let paths = VmPaths::new("/w/t".into());
        let plain = qemu_args(&spec(), &paths, Accel::Tcg, &ovmf());
        assert_eq!(after(&plain, "-machine"), ["q35"]);
        assert!(after(&plain, "-global").is_empty());
        let mut sb = spec();
        sb.secure_boot = true;
        let args = qemu_args(&sb, &paths, Accel::Tcg, &ovmf());
        assert_eq!(after(&args, "-machine"), ["q35,smm=on"]);
        assert_eq!(
            after(&args, "-global"),
            ["driver=cfi.pflash01,property=secure,value=on"]
        );
    }

    fn ovmf() -> Ovmf {
        Ovmf {
            code: "/fw/CODE.fd".into(),
            vars: "/fw/VARS.fd".into(),
        }
    }

    fn after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn command_line_boots_uefi_from_the_overlay_with_seed_and_console() {
        let paths = VmPaths::new("/w/t".into());
        let args = qemu_args(&spec(), &paths, Accel::Tcg, &ovmf());
        let drives = after(&args, "-drive");
        assert!(drives.contains(&"if=pflash,format=raw,unit=0,readonly=on,file=/fw/CODE.fd"));
        assert!(drives.contains(&"if=pflash,format=raw,unit=1,file=/w/t/OVMF_VARS.fd"));
        assert!(
            drives.contains(
                &"if=none,id=disk0,format=qcow2,discard=unmap,werror=report,rerror=report,file=/w/t/disk.qcow2"
            )
        );
        assert!(drives.contains(
            &"if=none,id=drive1,format=raw,media=cdrom,readonly=on,file=/w/t/seed/seed.iso"
        ));
        assert!(drives.contains(
            &"if=none,id=drive2,format=raw,media=cdrom,readonly=on,file=/w/config-2.iso"
        ));
        // The built image itself is never on the command line: only the overlay is.
        assert!(!args.iter().any(|a| a.contains("/img/engine.raw")));
        let devices = after(&args, "-device");
        assert!(devices.contains(&"virtio-blk-pci,drive=disk0,bootindex=1"));
        assert!(devices.contains(&"ide-cd,drive=drive1,bus=ide.0"));
        assert!(devices.contains(&"ide-cd,drive=drive2,bus=ide.1"));
        assert!(devices.contains(&"virtio-net-pci,netdev=net0,romfile="));
        assert_eq!(after(&args, "-accel"), ["tcg,thread=multi"]);
        assert_eq!(after(&args, "-m"), ["1536"]);
        assert_eq!(after(&args, "-smp"), ["2"]);
        assert_eq!(after(&args, "-smbios"), ["type=1,manufacturer=Amazon EC2"]);
        assert_eq!(after(&args, "-serial"), ["chardev:serial0"]);
        assert_eq!(
            after(&args, "-chardev"),
            ["file,id=serial0,path=/w/t/console.log,append=on"]
        );
        assert!(args.contains(&"-nodefaults".to_string()));
        check_isolated(&args).unwrap();
    }

    #[test]
    fn kvm_uses_the_host_cpu_and_no_seed_means_no_cdrom() {
        let mut s = spec();
        s.user_data = None;
        s.extra_drives.clear();
        let args = qemu_args(&s, &VmPaths::new("/w/t".into()), Accel::Kvm, &ovmf());
        assert_eq!(after(&args, "-accel"), ["kvm"]);
        assert_eq!(after(&args, "-cpu"), ["host"]);
        assert!(!args.iter().any(|a| a.contains("seed.iso")));
    }

    #[test]
    fn lan_nics_follow_the_user_net() {
        let mut lan = crate::netdev::LoopbackLan::start().unwrap();
        let mut s = spec();
        s.lan_nics.push(lan.attach().unwrap());
        let args = qemu_args(&s, &VmPaths::new("/w/t".into()), Accel::Tcg, &ovmf());
        let netdevs = after(&args, "-netdev");
        assert!(netdevs[0].starts_with("user,id=net0,restrict=on"));
        assert!(netdevs[1].starts_with("socket,id=net1,udp=127.0.0.1:"));
        check_isolated(&args).unwrap();
    }
}
