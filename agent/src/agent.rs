//! The boot pipeline, top to bottom: find launch data → parse → validate →
//! apply → join → report. Each stage updates the status that `aiw-agent status`
//! and `/metrics` show.

use crate::containers::{self, ContainerRuntime};
use crate::controller::join::{self, Backoff, EdgeClient, HostReport, JoinRecord};
use crate::controller::tasks::{
    HostTasks, LaunchContext, LogindPowerOff, PowerControl, RecordingPower,
};
use crate::datasource::{self, Endpoints, LaunchData};
use crate::modes::{ImageInfo, ModeTable};
use crate::paths::Paths;
use crate::settings::Settings;
use crate::status::{now_unix, ModeStatus, Status};
use crate::systemd::UnitControl;
use crate::validate::{self, ImageContext};
use crate::{apply, gpu, host, log, userdata};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Default grace past an engine's runtimeTTL before the agent stops it (the
/// engine toolkit enforces its own TTL first).
pub const TTL_GRACE_S: u64 = 60;

pub struct AgentConfig {
    pub paths: Paths,
    pub endpoints: Endpoints,
    /// Overall deadline for finding launch data.
    pub datasource_deadline: Duration,
    /// `None`: wait for the controller as long as it takes.
    pub join_deadline: Option<Duration>,
    pub join_backoff_max: Duration,
    pub metrics_addr: Option<SocketAddr>,
    pub real_system: bool,
    /// Overrides AIWARE_AGENT_UPDATE_INTERVAL (tests).
    pub heartbeat_override: Option<Duration>,
    /// Return after this many heartbeats (tests, measurements); `None`: run forever.
    pub stop_after_heartbeats: Option<u64>,
}

impl AgentConfig {
    pub fn for_system(paths: Paths) -> Self {
        let env_secs = |k: &str, d: u64| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(d)
        };
        AgentConfig {
            real_system: paths.is_real_root(),
            paths,
            endpoints: Endpoints::default(),
            datasource_deadline: Duration::from_secs(env_secs("AIW_AGENT_DATASOURCE_DEADLINE", 90)),
            join_deadline: None,
            join_backoff_max: Duration::from_secs(30),
            metrics_addr: std::env::var("AIW_AGENT_METRICS_ADDR")
                .ok()
                .and_then(|a| a.parse().ok())
                .or_else(|| Some(([0, 0, 0, 0], 8000).into())),
            heartbeat_override: None,
            // For measurements and smoke tests: exit after N status reports.
            stop_after_heartbeats: std::env::var("AIW_AGENT_EXIT_AFTER_HEARTBEATS")
                .ok()
                .and_then(|v| v.parse().ok()),
        }
    }
}

/// How the run ended (for tests; the service itself keeps running).
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Ready,
    NoUserData,
    Invalid(String),
    JoinFailed(String),
    /// The image's encrypted /var was not unsealed (overlays/var-tpm2).
    NoPersistentStorage(String),
}

pub struct Agent<'a> {
    cfg: AgentConfig,
    units: &'a dyn UnitControl,
    pub status: Arc<Mutex<Status>>,
    runtime: Option<Arc<dyn ContainerRuntime>>,
    power: Option<Arc<dyn PowerControl>>,
    ttl_grace: Duration,
    stop: Option<Arc<std::sync::atomic::AtomicBool>>,
}

fn sd_notify(msg: &str) {
    if let Some(path) = std::env::var_os("NOTIFY_SOCKET") {
        let sock = std::os::unix::net::UnixDatagram::unbound();
        if let Ok(s) = sock {
            let p = std::path::PathBuf::from(&path);
            let b = path.as_encoded_bytes();
            if b.first() == Some(&b'@') {
                use std::os::linux::net::SocketAddrExt;
                if let Ok(addr) = std::os::unix::net::SocketAddr::from_abstract_name(&b[1..]) {
                    let _ = s.send_to_addr(msg.as_bytes(), &addr);
                }
            } else {
                let _ = s.send_to(msg.as_bytes(), p);
            }
        }
    }
}

impl<'a> Agent<'a> {
    pub fn new(cfg: AgentConfig, units: &'a dyn UnitControl) -> Self {
        let status = Status {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            phase: "starting".into(),
            ..Default::default()
        };
        Agent {
            cfg,
            units,
            status: Arc::new(Mutex::new(status)),
            runtime: None,
            power: None,
            ttl_grace: Duration::from_secs(TTL_GRACE_S),
            stop: None,
        }
    }

    /// The container runtime for host actions (default: Docker on
    /// /run/docker.sock on a real system, none in a test root).
    pub fn with_runtime(mut self, rt: Arc<dyn ContainerRuntime>) -> Self {
        self.runtime = Some(rt);
        self
    }

    /// What `mode: terminate` powers off with (default: logind on a real system).
    pub fn with_power(mut self, p: Arc<dyn PowerControl>) -> Self {
        self.power = Some(p);
        self
    }

    /// How long past its runtimeTTL an engine may run before it is stopped.
    pub fn with_ttl_grace(mut self, d: Duration) -> Self {
        self.ttl_grace = d;
        self
    }

    /// The status loop returns [`Outcome::Ready`] once `flag` is set (tests).
    pub fn with_stop_flag(mut self, flag: Arc<std::sync::atomic::AtomicBool>) -> Self {
        self.stop = Some(flag);
        self
    }

    fn host_tasks(&self, host_id: &str, url: &str, s: &Settings, gpus: &[gpu::Gpu]) -> HostTasks {
        let runtime = self.runtime.clone().unwrap_or_else(|| {
            if self.cfg.real_system {
                containers::for_system(std::path::Path::new(containers::docker::DOCKER_SOCKET))
            } else {
                Arc::new(containers::Unavailable {
                    reason: format!(
                        "no container runtime under the test root {}",
                        self.cfg.paths.root.display()
                    ),
                })
            }
        });
        let power = self.power_control();
        let gpu_image = self
            .status
            .lock()
            .map(|st| st.image.as_ref().is_some_and(|i| i["gpu"] == true))
            .unwrap_or(false);
        let ctx = LaunchContext {
            host_id: host_id.to_string(),
            controller: url.to_string(),
            license: s.get("AIWARE_LICENSE").unwrap_or("").to_string(),
            cache_dir: self
                .cfg
                .paths
                .at(s.get("AIWARE_CACHE_DIR").unwrap_or("/cache")),
            auto_remove: !s
                .get("AIWARE_AUTOREMOVE_ENGINES")
                .is_some_and(|v| v.eq_ignore_ascii_case("false") || v == "0"),
            gpu_image,
            gpus: gpus.len(),
            ttl_grace: self.ttl_grace,
            stop_timeout: Duration::from_secs(10),
        };
        let tasks = HostTasks::new(runtime, power, ctx);
        if self.cfg.real_system && self.runtime.is_none() {
            tasks.with_reconnect(Box::new(|| {
                containers::for_system(std::path::Path::new(containers::docker::DOCKER_SOCKET))
            }))
        } else {
            tasks
        }
    }

    /// A `HostAction` whose `mount[]` differs from what is mounted: mounts it
    /// (mounting is idempotent: what is mounted already is kept).
    fn mount_from_action(&self, action: &serde_json::Value, applied: &mut Vec<serde_json::Value>) {
        let Some(m) = action["mount"].as_array().filter(|m| !m.is_empty()) else {
            return;
        };
        if m == applied {
            return;
        }
        *applied = m.clone();
        let mut lines = Vec::new();
        for r in join::mount_all(&self.cfg.paths, m, self.cfg.real_system) {
            match r {
                Ok(l) => lines.push(l),
                Err(e) => self.error(&e),
            }
        }
        self.update(|st| st.join.mounts = lines);
    }

    /// Keeps what the last report said about the actions in `aiw-agent status`.
    fn record_actions(&self, report: &serde_json::Value) {
        self.update(|st| {
            let a = &mut st.actions;
            a.host_mode = report["hostMode"].as_str().unwrap_or("").to_string();
            a.runtime_error = report["containerRuntimeError"].as_str().map(String::from);
            a.containers = report["containerStatus"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            for e in report["actionErrors"].as_array().into_iter().flatten() {
                a.errors_total += 1;
                a.errors.push(format!(
                    "{}{}: {}",
                    e["action"].as_str().unwrap_or("?"),
                    e["launchID"]
                        .as_str()
                        .map(|l| format!(" (launch {l})"))
                        .unwrap_or_default(),
                    e["reason"].as_str().unwrap_or("")
                ));
            }
            let n = a.errors.len();
            if n > 20 {
                a.errors.drain(..n - 20);
            }
        });
    }

    fn update(&self, f: impl FnOnce(&mut Status)) {
        let mut st = self.status.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut st);
        st.updated_unix = now_unix();
        let json = serde_json::to_vec_pretty(&*st).unwrap_or_default();
        drop(st);
        let _ = crate::files::write_private(&self.cfg.paths.status_file(), &json, 0o644);
    }

    fn error(&self, e: &str) {
        log::info(&format!("error: {e}"));
        self.update(|s| {
            s.last_error = Some(log::scrub(e));
            s.errors_total += 1;
        });
    }

    /// Finds launch data: the first identified datasource that has some.
    fn find_launch_data(&self) -> Option<(String, String, LaunchData)> {
        let paths = &self.cfg.paths;
        let ev = datasource::gather_evidence(paths);
        self.update(|s| s.evidence = serde_json::to_value(&ev).ok());
        let candidates = datasource::identify(paths, &self.cfg.endpoints, &ev);
        if candidates.is_empty() {
            log::info("no datasource identified: no cidata/config-2 label, no /efi/aiware/user-data, no aiware.* on the kernel command line, no cloud in DMI");
        }
        let deadline = Instant::now() + self.cfg.datasource_deadline;
        let mut recorded = false;
        for c in candidates {
            log::info(&format!(
                "trying datasource {} because {}",
                c.source.name(),
                c.reason
            ));
            let fetched = c.source.fetch(deadline);
            if fetched.is_ok() && c.source.name() == "azure" {
                self.azure_check_in();
            }
            match fetched {
                Ok(ld) if ld.user_data.is_some() => {
                    return Some((c.source.name().to_string(), c.reason, ld))
                }
                Ok(ld) => {
                    // Its metadata is kept: a launch without user-data still gets the
                    // platform's hostname and SSH keys.
                    if !recorded {
                        crate::platform::for_this_boot(paths, Some((c.source.name(), &ld)));
                        recorded = true;
                    }
                    log::info(&format!("datasource {} has no user-data", c.source.name()))
                }
                Err(e) => self.error(&e.to_string()),
            }
        }
        None
    }

    /// Azure's provisioning "ready" report, once its IMDS has answered (so
    /// this is Azure): every boot, as WALinuxAgent does, whatever the
    /// user-data holds (the VM is provisioned and reachable either way).
    /// Bounded: a wireserver that never answers costs at most a minute.
    fn azure_check_in(&self) {
        let said = datasource::azure::report_ready(
            &self.cfg.endpoints.azure_wireserver,
            Instant::now() + Duration::from_secs(60),
        )
        .unwrap_or_else(|e| {
            self.error(&format!("azure: the provisioning ready report failed: {e}"));
            format!("azure ready report failed: {e}")
        });
        log::info(&format!("azure: {said}"));
        self.update(|s| s.platform_checkin = Some(said));
    }

    /// logind on a real system; one that only counts in a test root.
    fn power_control(&self) -> Arc<dyn PowerControl> {
        self.power.clone().unwrap_or_else(|| {
            if self.cfg.real_system {
                Arc::new(LogindPowerOff)
            } else {
                Arc::new(RecordingPower::default())
            }
        })
    }

    /// Points systemd-sysupdate at launch data's update server and starts
    /// the policy's checks (see [`crate::update::policy`]).
    fn start_update_policy(&self, settings: &Settings) {
        let Ok(policy) = crate::update::policy::Policy::from_settings(settings) else {
            return; // validated before: not reached
        };
        if let Some(url) = &policy.url {
            match crate::update::sysupdate::point_at(&self.cfg.paths, url) {
                Ok(n) => log::info(&format!("updates: {n} transfer files read {url}")),
                Err(e) => self.error(&format!("updates: cannot use {url}: {e}")),
            }
        }
        let has_facts = self.status.lock().is_ok_and(|s| s.update.is_some());
        if has_facts {
            crate::update::policy::spawn_checks(
                policy,
                self.cfg.paths.clone(),
                self.status.clone(),
                self.power_control(),
            );
        }
    }

    pub fn run(&self) -> Outcome {
        let paths = self.cfg.paths.clone();
        if let Some(addr) = self.cfg.metrics_addr {
            match crate::metrics::serve(addr, self.status.clone()) {
                Ok(a) => log::info(&format!("metrics on http://{a}/metrics")),
                Err(e) => self.error(&format!("cannot serve metrics on {addr}: {e}")),
            }
        }
        let image: Option<ImageInfo> = std::fs::read(paths.image_json())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let table = match ModeTable::load(&paths.modes_toml()) {
            Ok(t) => Some(t),
            Err(e) => {
                self.error(&format!(
                    "{e}: the image lacks its mode table, so no mode service can be managed"
                ));
                None
            }
        };
        if let Some(f) = crate::update::UpdateFacts::gather(&paths) {
            if let Some(v) = &f.rolled_back_from {
                log::console(&format!(
                    "rolled back from {v}: it failed its boot health checks, systemd-boot booted {} again",
                    f.booted
                ));
            }
            self.update(|s| s.update = Some(f));
        }
        let gpus = gpu::find_nvidia(&paths);
        if image.as_ref().is_some_and(|i| i.gpu) && gpus.is_empty() {
            log::console("no GPU found on PCI (no NVIDIA device, vendor 0x10de): this GPU image runs with 0 GPUs");
        } else if image.as_ref().is_some_and(|i| i.gpu) && self.cfg.real_system {
            // The driver was built into the image for its kernel; load it now
            // so the CDI spec and the nvidia runtime find the devices.
            for m in ["nvidia", "nvidia-uvm", "nvidia-modeset"] {
                match std::process::Command::new("modprobe")
                    .arg("--")
                    .arg(m)
                    .status()
                {
                    Ok(st) if st.success() => {}
                    Ok(st) => self.error(&format!("modprobe {m} exited with {st}")),
                    Err(e) => self.error(&format!("cannot run modprobe {m}: {e}")),
                }
            }
        }
        self.update(|s| {
            s.image = image.as_ref().and_then(|i| serde_json::to_value(i).ok());
            s.gpus = gpus.clone();
        });

        // An image whose /var is sealed to the TPM (overlays/var-tpm2) runs
        // on a temporary /var when the TPM did not unseal it: fail closed,
        // no mode and no join (only launch data's SSH keys, so that someone
        // can look), and say why wherever someone looks.
        let storage_lost = std::fs::read_to_string(paths.var_encryption_error()).ok();

        // Launch data, or the settings persisted by an earlier boot.
        let persisted = apply::load_settings(&paths);
        let found = self.find_launch_data();
        // Kept for apply_access and the register request (host::add_platform_facts).
        crate::platform::for_this_boot(&paths, found.as_ref().map(|(n, _, ld)| (n.as_str(), ld)));
        let (source, reason, settings) = match (found, persisted) {
            (Some((name, reason, ld)), prev) => {
                if let Some(p) =
                    prev.filter(|p| p.instance_id.is_some() && p.instance_id == ld.instance_id)
                {
                    (
                        name,
                        format!(
                            "{reason}; same instance-id as the persisted settings, which are kept"
                        ),
                        Ok(p),
                    )
                } else {
                    let parsed = userdata::parse(ld.user_data.as_deref().unwrap_or_default())
                        .map(|u| Settings::from_user_data(u, ld.instance_id.clone()))
                        .map_err(|e| e.0);
                    (name, reason, parsed)
                }
            }
            (None, Some(p)) => (
                "persisted".into(),
                "no launch data this boot; using the settings persisted in /var/lib/aiware".into(),
                Ok(p),
            ),
            (None, None) if storage_lost.is_some() => {
                let why = storage_lost.unwrap_or_default();
                return self.no_persistent_storage(why.trim(), table.as_ref());
            }
            (None, None) => {
                let msg = "no user-data found (no NoCloud seed, ESP file, kernel command line or cloud metadata); running with no modes";
                log::console(msg);
                if let Some(t) = &table {
                    let a = self.applier(t);
                    if let Err(e) = a.stop_all() {
                        self.error(&e);
                    }
                    if let Some(only) = crate::platform::access_settings(&paths) {
                        for e in a.apply_access(&only) {
                            self.error(&e);
                        }
                    }
                }
                self.update(|s| {
                    s.phase = "no-user-data".into();
                    s.settings_valid = true;
                    s.join.state = "not-configured".into();
                    s.ports = table
                        .as_ref()
                        .map(|t| apply::ports(t, &[]))
                        .unwrap_or_default();
                });
                sd_notify("READY=1\nSTATUS=no user-data; no modes");
                log::console("ready (no modes, no user-data)");
                return Outcome::NoUserData;
            }
        };
        self.update(|s| {
            s.datasource = Some(source.clone());
            s.datasource_reason = Some(reason.clone());
        });
        log::info(&format!("datasource {source}: {reason}"));

        let settings = match settings {
            Ok(s) => s,
            Err(e) => {
                return self.invalid(
                    vec![format!("user-data cannot be parsed: {e}")],
                    table.as_ref(),
                )
            }
        };
        log::add_secrets(settings.secrets());
        if let Some(why) = storage_lost {
            if let Some(t) = table.as_ref() {
                for e in self.applier(t).apply_access(&settings) {
                    self.error(&e);
                }
            }
            return self.no_persistent_storage(why.trim(), table.as_ref());
        }
        for w in &settings.warnings {
            log::info(&format!("warning: {w}"));
        }
        let mut errs = validate::validate(
            &settings,
            &ImageContext {
                table: table.as_ref(),
                image: image.as_ref(),
            },
        );
        if table.is_none() {
            errs.push(format!(
                "{} is missing or unreadable",
                crate::modes::MODES_PATH
            ));
        }
        self.update(|s| s.settings = Some(settings.redacted_json()));
        if !errs.is_empty() {
            // The role stays stopped, but the node stays reachable over SSH.
            if let Some(t) = table.as_ref() {
                let a = self.applier(t);
                for e in a.apply_access(&settings) {
                    self.error(&e);
                }
            }
            return self.invalid(errs, table.as_ref());
        }
        let table = table.expect("checked above");
        let modes = settings.modes();
        self.start_update_policy(&settings);
        let a = self.applier(&table);
        for e in a.apply(&settings) {
            self.error(&e);
        }
        let mode_status: Vec<ModeStatus> = modes
            .iter()
            .map(|m| ModeStatus {
                mode: m.clone(),
                services: table
                    .get(m)
                    .map(|s| {
                        s.services
                            .iter()
                            .map(|u| (u.clone(), self.units.active_state(u)))
                            .collect()
                    })
                    .unwrap_or_default(),
            })
            .collect();
        self.update(|s| {
            s.phase = "configured".into();
            s.settings_valid = true;
            s.validation_errors.clear();
            s.modes = mode_status;
            s.ports = apply::ports(&table, &modes);
            s.join.controller = settings.controller().map(String::from);
            s.join.state = if settings.controller().is_some() {
                "waiting-for-controller".into()
            } else {
                "not-configured".into()
            };
        });
        sd_notify(&format!("READY=1\nSTATUS=configured: {}", modes.join(",")));
        // The mode services are ordered after this unit, so their start jobs
        // only run once READY=1 is sent: wait for them here, so that "ready"
        // means the role is up.
        let (wanted, _) = apply::split_services(&table, &modes);
        self.wait_for_services(&wanted, std::time::Duration::from_secs(180));
        self.update(|s| {
            for m in s.modes.iter_mut() {
                for (u, st) in m.services.iter_mut() {
                    *st = self.units.active_state(u);
                }
            }
        });
        // Baked images, then the mode containers or the vendor's agent (node/).
        if self.start_node(&table, image.as_ref(), &settings, &modes) {
            log::console(&format!(
                "ready modes={} datasource={source} (the vendor's aiware-agent joins the controller)",
                modes.join(",")
            ));
            self.update(|s| s.join.state = "vendor-agent".into());
            return Outcome::Ready;
        }

        match settings.controller() {
            None => {
                log::console(&format!(
                    "ready modes={} datasource={source} (no controller to join)",
                    modes.join(",")
                ));
                Outcome::Ready
            }
            Some(url) => self.join_and_report(url, &settings, &modes, &gpus, &source),
        }
    }

    /// Loads the baked images and starts the mode containers, or the vendor's
    /// agent; true when the vendor's agent runs (it registers, not us).
    fn start_node(
        &self,
        table: &ModeTable,
        image: Option<&ImageInfo>,
        s: &Settings,
        modes: &[String],
    ) -> bool {
        let rt: Arc<dyn ContainerRuntime> = match &self.runtime {
            Some(r) => r.clone(),
            None if self.cfg.real_system => {
                containers::for_system(std::path::Path::new(containers::docker::DOCKER_SOCKET))
            }
            None => Arc::new(containers::Unavailable {
                reason: "no container runtime under a test root".into(),
            }),
        };
        let effective = crate::services::with_generated_secrets(&self.cfg.paths, s, modes)
            .unwrap_or_else(|_| s.clone());
        let wait = Duration::from_secs(if self.cfg.real_system { 60 } else { 0 });
        let node = crate::node::Node {
            paths: &self.cfg.paths,
            units: self.units,
            rt: rt.as_ref(),
            table,
            docker_wait: wait,
        };
        let r = crate::node::start(&node, image, &effective, modes);
        for e in &r.errors {
            self.error(e);
        }
        self.update(|st| {
            for (mode, unit, state) in &r.units {
                let state = if state == "started" {
                    &self.units.active_state(unit)
                } else {
                    state
                };
                match st.modes.iter_mut().find(|m| &m.mode == mode) {
                    Some(m) => m.services.push((unit.clone(), state.clone())),
                    None => st.modes.push(ModeStatus {
                        mode: mode.clone(),
                        services: vec![(unit.clone(), state.clone())],
                    }),
                }
            }
        });
        r.vendor_agent
    }

    /// The applier for this node's paths, units and mode table.
    fn applier<'b>(&'b self, table: &'b ModeTable) -> apply::Applier<'b> {
        apply::Applier {
            paths: &self.cfg.paths,
            table,
            units: self.units,
            real_system: self.cfg.real_system,
        }
    }

    /// Waits until every unit is active; a failed unit or the deadline is
    /// reported as an error and the agent goes on (it never hangs the node).
    fn wait_for_services(&self, units: &[String], limit: std::time::Duration) {
        let started = std::time::Instant::now();
        let mut logged = false;
        loop {
            let states: Vec<(String, String)> = units
                .iter()
                .map(|u| (u.clone(), self.units.active_state(u)))
                .collect();
            if let Some((u, st)) = states
                .iter()
                .find(|(_, st)| *st == "failed" || *st == "unknown")
            {
                self.error(&format!("{u} did not start ({st}): see journalctl -u {u}"));
                return;
            }
            let pending: Vec<&str> = states
                .iter()
                .filter(|(_, st)| st != "active")
                .map(|(u, _)| u.as_str())
                .collect();
            if pending.is_empty() {
                return;
            }
            if started.elapsed() >= limit {
                self.error(&format!(
                    "services still not active after {}s: {}",
                    limit.as_secs(),
                    pending.join(", ")
                ));
                return;
            }
            if !logged {
                log::info(&format!("waiting for {} to start", pending.join(", ")));
                logged = true;
            }
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
    }

    fn invalid(&self, errs: Vec<String>, table: Option<&ModeTable>) -> Outcome {
        let first = log::scrub(&errs[0]);
        let more = if errs.len() > 1 {
            format!(" (and {} more: see aiw-agent status)", errs.len() - 1)
        } else {
            String::new()
        };
        log::console(&format!("invalid settings: {first}{more}"));
        for e in &errs {
            log::info(&format!("invalid setting: {e}"));
        }
        if let Some(t) = table {
            let a = self.applier(t);
            if let Err(e) = a.stop_all() {
                self.error(&e);
            }
        }
        self.update(|s| {
            s.phase = "invalid-settings".into();
            s.settings_valid = false;
            s.validation_errors = errs.iter().map(|e| log::scrub(e)).collect();
            s.last_error = Some(format!("invalid settings: {first}"));
            s.errors_total += 1;
            s.join.state = "not-configured".into();
        });
        sd_notify(&format!("READY=1\nSTATUS=invalid settings: {first}"));
        Outcome::Invalid(first)
    }

    fn no_persistent_storage(&self, why: &str, table: Option<&ModeTable>) -> Outcome {
        let msg = format!("/var is not available: {why}");
        log::console(&format!(
            "{msg}; no mode is started and the controller is not joined"
        ));
        if let Some(t) = table {
            if let Err(e) = self.applier(t).stop_all() {
                self.error(&e);
            }
        }
        self.update(|s| {
            s.phase = "no-persistent-storage".into();
            s.last_error = Some(msg.clone());
            s.errors_total += 1;
            s.join.state = "not-configured".into();
        });
        sd_notify(&format!("READY=1\nSTATUS={msg}"));
        Outcome::NoPersistentStorage(msg)
    }

    fn fail_join(&self, msg: &str) -> Outcome {
        log::console(msg);
        self.error(msg);
        self.update(|st| st.join.state = "failed".into());
        Outcome::JoinFailed(msg.to_string())
    }

    fn join_and_report(
        &self,
        url: &str,
        s: &Settings,
        modes: &[String],
        gpus: &[gpu::Gpu],
        source: &str,
    ) -> Outcome {
        let paths = &self.cfg.paths;
        let client = match EdgeClient::new(url, s.get("AIWARE_CONTROLLER_CA")) {
            Ok(c) => c,
            // Checked with the settings already; kept for a CA file gone since.
            Err(e) => return self.fail_join(&format!("cannot join the controller: {e}")),
        };
        let init = s.get("AIWARE_INIT_TOKEN").unwrap_or("").to_string();
        let image_version = self
            .status
            .lock()
            .map(|st| {
                st.image
                    .as_ref()
                    .and_then(|i| i["version"].as_str().map(String::from))
            })
            .ok()
            .flatten()
            .unwrap_or_default();
        let previous = join::load(paths);
        let deadline = self.cfg.join_deadline.map(|d| Instant::now() + d);
        let mut backoff = Backoff::new(Duration::from_millis(200), self.cfg.join_backoff_max);
        let facts = host::gather_toward(paths, Some(url));
        let report = HostReport {
            facts: &facts,
            modes,
            gpus,
            host_expire: s
                .get("AIWARE_HOST_EXPIRE")
                .is_some_and(|v| v.eq_ignore_ascii_case("true")),
            instance_id: s.instance_id.as_deref(),
            image_version: &image_version,
        };
        let mut on_wait = |m: &str| log::info(m);
        let mut register_request = |id: Option<&str>| {
            let facts = host::gather_toward(paths, Some(url));
            let mut r = HostReport {
                facts: &facts,
                ..report
            }
            .register_request(id);
            host::add_platform_facts(paths, s, &mut r);
            r
        };
        let reply = match join::join(
            &client,
            &init,
            &mut register_request,
            previous.as_ref(),
            &mut backoff,
            deadline,
            &mut on_wait,
        ) {
            Ok(v) => v,
            Err(e) => return self.fail_join(&format!("cannot join the controller: {e}")),
        };
        let host_id = reply["hostID"].as_str().unwrap_or_default().to_string();
        let mut token = reply["hostToken"].as_str().unwrap_or_default().to_string();
        log::add_secrets([token.clone()]);
        if let Some(p) = &previous {
            if p.host_id != host_id && p.controller == client.base {
                log::info(&format!(
                    "the controller gave a new hostID {host_id} (was {})",
                    p.host_id
                ));
            }
        }
        let mounts: Vec<serde_json::Value> = reply["mount"].as_array().cloned().unwrap_or_default();
        let rec = JoinRecord {
            controller: client.base.clone(),
            host_id: host_id.clone(),
            host_token: token.clone(),
            joined_unix: now_unix(),
            mounts: mounts.clone(),
        };
        if let Err(e) = join::save(paths, &rec) {
            self.error(&format!(
                "cannot keep the join state in {}: {e}",
                paths.join_file().display()
            ));
        }
        let mut mount_lines = Vec::new();
        for r in join::mount_all(paths, &mounts, self.cfg.real_system) {
            match r {
                Ok(l) => mount_lines.push(l),
                Err(e) => self.error(&e),
            }
        }
        if modes.iter().any(|m| m == "engine") {
            let cache = s.get("AIWARE_CACHE_DIR").unwrap_or("/cache");
            match join::local_cache_fallback(paths, cache, self.cfg.real_system) {
                Ok(Some(line)) => {
                    log::info(&format!("engine cache: {line}"));
                    mount_lines.push(line);
                }
                Ok(None) => {}
                Err(e) => self.error(&e),
            }
        }
        let mut tasks = self.host_tasks(&host_id, url, s, gpus);
        let mut applied_mounts = mounts.clone();
        self.mount_from_action(&reply["status"], &mut applied_mounts);
        tasks.apply(&reply["status"]);
        self.update(|st| {
            st.phase = "joined".into();
            st.join.state = "joined".into();
            st.join.host_id = Some(host_id.clone());
            st.join.joined_unix = Some(now_unix());
            st.join.mounts = mount_lines;
        });
        sd_notify(&format!("STATUS=joined {url} as {host_id}"));
        log::console(&format!(
            "ready modes={} host_id={host_id} datasource={source} controller={url}",
            modes.join(",")
        ));

        // Report status every interval; a 401 re-registers (same hostID) with the init token.
        let interval = self
            .cfg
            .heartbeat_override
            .unwrap_or(Duration::from_secs(s.update_interval_s()));
        let prometheus = modes.iter().any(|m| m == "prometheus");
        // On EC2 the platform announces a spot interruption or a scheduled
        // stop in its metadata: asked at every report, the node drains.
        let ec2 = (source == "ec2").then(|| datasource::Ec2Source::new(&self.cfg.endpoints.ec2));
        let mut ec2_unreadable_said = false;
        let mut beats = 0u64;
        loop {
            let report_started = Instant::now();
            if let Some(ec2) = &ec2 {
                match ec2.interruption_notice(now_unix(), Instant::now() + Duration::from_secs(5)) {
                    Ok(Some(notice)) => tasks.platform_drain(&notice),
                    Ok(None) => {}
                    Err(e) if !ec2_unreadable_said => {
                        ec2_unreadable_said = true;
                        log::info(&format!("ec2: cannot read interruption notices: {e}"));
                    }
                    Err(_) => {}
                }
            }
            if let Some(v) = self
                .status
                .lock()
                .ok()
                .and_then(|s| s.update_check.as_ref()?.reboot_for.clone())
            {
                tasks.platform_drain(&format!(
                    "image version {v} is installed; rebooting into it once the running tasks end"
                ));
            }
            let facts = host::gather_toward(paths, Some(url));
            let report = HostReport {
                facts: &facts,
                ..report
            };
            tasks.tick();
            let mut status = report.status(Some(&host_id));
            tasks.fill_status(&mut status);
            // Not in the Edge API's HostStatus (a controller ignores unknown
            // fields); there for an operator reading the reports.
            if let Some(u) = self.status.lock().ok().and_then(|s| s.update.clone()) {
                status["imageVersion"] = serde_json::json!({
                    "imageId": u.image_id,
                    "booted": u.booted,
                    "otherSlot": u.other_slot,
                    "rolledBackFrom": u.rolled_back_from,
                });
            }
            self.record_actions(&status);
            match client.update_status(&host_id, &token, &status) {
                Ok(reply) => {
                    tasks.report_sent(&status);
                    self.mount_from_action(&reply, &mut applied_mounts);
                    tasks.apply(&reply);
                    beats += 1;
                    let took = report_started.elapsed();
                    self.update(|st| {
                        st.join.last_report_ms = Some(took.as_millis() as u64);
                        st.join.heartbeats += 1;
                        st.join.last_heartbeat_unix = Some(now_unix());
                        st.join.state = "joined".into();
                    });
                }
                Err(join::JoinError::Unauthorized { .. }) => {
                    log::info(
                        "the controller refused the host token; registering again as the same host",
                    );
                    let mut again = report.register_request(Some(&host_id));
                    host::add_platform_facts(paths, s, &mut again);
                    match client.register(&init, &again) {
                        Ok(v) => {
                            token = v["hostToken"].as_str().unwrap_or_default().to_string();
                            log::add_secrets([token.clone()]);
                            let rec = JoinRecord {
                                host_token: token.clone(),
                                ..rec.clone()
                            };
                            let _ = join::save(paths, &rec);
                        }
                        Err(e) => self.error(&format!("re-registering: {e}")),
                    }
                }
                Err(e) => self.error(&format!("status report: {e}")),
            }
            if prometheus {
                match client.hosts(&token) {
                    Ok(h) => {
                        let t = join::prometheus_targets(&h);
                        let file = paths.prometheus_sd_dir().join("aiware-hosts.json");
                        if let Err(e) =
                            std::fs::create_dir_all(paths.prometheus_sd_dir()).and_then(|_| {
                                crate::files::write_private(
                                    &file,
                                    serde_json::to_string_pretty(&t)
                                        .unwrap_or_default()
                                        .as_bytes(),
                                    0o644,
                                )
                            })
                        {
                            self.error(&format!("cannot write {}: {e}", file.display()));
                        }
                    }
                    Err(e) => self.error(&format!("listing hosts for Prometheus: {e}")),
                }
            }
            if self.cfg.stop_after_heartbeats.is_some_and(|n| beats >= n)
                || self
                    .stop
                    .as_ref()
                    .is_some_and(|f| f.load(std::sync::atomic::Ordering::SeqCst))
            {
                return Outcome::Ready;
            }
            std::thread::sleep(interval);
        }
    }
}
