//! `HostTasks`: the state machine that carries out the controller's actions on
//! a [`ContainerRuntime`]. The runtime's list of labelled containers is the
//! state of the launches (so a restarted agent re-adopts them); what lives here
//! is the host's mode, the refusals not yet reported, and the background pulls.
//!
//! Per status interval: [`HostTasks::apply`] the reply, [`HostTasks::tick`]
//! (runtimeTTL), [`HostTasks::fill_status`] the next report, then
//! [`HostTasks::report_sent`] (which powers off after `terminate`).

use super::actions::{self, HostActions, Launch, Mode, Refusal, Registry};
use crate::containers::{
    self as rt, ContainerRuntime, ContainerSpec, ManagedContainer, RegistryAuth,
};
use crate::log;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Powers the host off (`mode: terminate`) or reboots it (into an installed
/// image update). A trait so tests never power off.
pub trait PowerControl: Send + Sync {
    fn power_off(&self) -> Result<(), String>;
    fn reboot(&self) -> Result<(), String>;
}

/// The real one: logind's `PowerOff` on the system bus (what `systemctl poweroff` asks for).
pub struct LogindPowerOff;

impl PowerControl for LogindPowerOff {
    fn power_off(&self) -> Result<(), String> {
        crate::systemd::logind("PowerOff")
    }
    fn reboot(&self) -> Result<(), String> {
        crate::systemd::logind("Reboot")
    }
}

/// A TEST DOUBLE of [`PowerControl`]: counts the requests.
#[derive(Default)]
pub struct RecordingPower {
    /// Power-off requests.
    pub requests: Mutex<u32>,
    pub reboots: Mutex<u32>,
}

impl PowerControl for RecordingPower {
    fn power_off(&self) -> Result<(), String> {
        *self.requests.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        Ok(())
    }
    fn reboot(&self) -> Result<(), String> {
        *self.reboots.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        Ok(())
    }
}

/// What a launch needs from the node (settings, host facts).
#[derive(Debug, Clone)]
pub struct LaunchContext {
    pub host_id: String,
    pub controller: String,
    pub license: String,
    /// The cache as this agent reaches it (`/cache`, or under a test root).
    pub cache_dir: PathBuf,
    /// `AIWARE_AUTOREMOVE_ENGINES` (default true).
    pub auto_remove: bool,
    pub gpu_image: bool,
    pub gpus: usize,
    /// How long past `runtimeTTL` an engine may run before the agent stops it.
    pub ttl_grace: Duration,
    /// SIGTERM to SIGKILL when stopping.
    pub stop_timeout: Duration,
}

/// `AIWARE_EXPIRATION` when no runtimeTTL is given (documented default).
pub const DEFAULT_EXPIRATION_S: u64 = 900;

/// Work done in threads so that a slow pull never holds up a status report.
#[derive(Default)]
struct Background {
    pulls: usize,
    /// launchIds being pulled and started now.
    launches: std::collections::BTreeSet<String>,
    failed: Vec<Refusal>,
}

/// Makes the runtime anew (Docker's socket appears once docker.service runs).
pub type Reconnect = Box<dyn Fn() -> Arc<dyn ContainerRuntime> + Send>;

pub struct HostTasks {
    runtime: Arc<dyn ContainerRuntime>,
    power: Arc<dyn PowerControl>,
    ctx: LaunchContext,
    mode: Mode,
    registries: Vec<Registry>,
    refused: Vec<Refusal>,
    background: Arc<Mutex<Background>>,
    runtime_error: Option<String>,
    reconnect: Option<Reconnect>,
    terminate_pending: bool,
    powered_off: bool,
    /// The platform announced the instance goes away (an EC2 spot
    /// interruption, a scheduled stop): drained whatever the controller says.
    platform_notice: Option<String>,
}

fn now_unix() -> u64 {
    crate::status::now_unix()
}

impl HostTasks {
    /// Looks at what already runs (a previous agent's containers are re-adopted).
    pub fn new(
        runtime: Arc<dyn ContainerRuntime>,
        power: Arc<dyn PowerControl>,
        ctx: LaunchContext,
    ) -> Self {
        let runtime_error = runtime.check().err();
        match &runtime_error {
            // The journal, not the console: most nodes without Docker (db,
            // nfs, ...) never get a container action; one that does is
            // refused with this reason in its next status report.
            Some(e) => log::info(&format!("container runtime: {e}")),
            None => {
                let live: Vec<String> = runtime
                    .list_managed()
                    .unwrap_or_default()
                    .iter()
                    .filter(|c| c.is_live())
                    .map(|c| c.label(rt::LABEL_LAUNCH_ID).to_string())
                    .collect();
                if !live.is_empty() {
                    log::info(&format!(
                        "re-adopted {} running launch(es): {}",
                        live.len(),
                        live.join(", ")
                    ));
                }
            }
        }
        HostTasks {
            runtime,
            power,
            ctx,
            mode: Mode::Continue,
            registries: Vec::new(),
            refused: Vec::new(),
            background: Arc::default(),
            runtime_error,
            reconnect: None,
            terminate_pending: false,
            powered_off: false,
            platform_notice: None,
        }
    }

    /// While the runtime is unavailable, each tick tries `f` for a new one.
    pub fn with_reconnect(mut self, f: Reconnect) -> Self {
        self.reconnect = Some(f);
        self
    }

    fn bg(&self) -> std::sync::MutexGuard<'_, Background> {
        self.background.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until no pull or launch runs in the background (tests, shutdown).
    pub fn wait_background(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            {
                let bg = self.bg();
                if bg.pulls == 0 && bg.launches.is_empty() {
                    return true;
                }
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    fn refuse(&mut self, action: &str, launch_id: Option<&str>, reason: String) {
        let reason = log::scrub(&reason);
        log::info(&format!(
            "refused {action}{}: {reason}",
            launch_id
                .map(|l| format!(" (launch {l})"))
                .unwrap_or_default()
        ));
        self.refused.push(Refusal {
            action: action.into(),
            launch_id: launch_id.map(String::from),
            reason,
        });
    }

    fn managed(&mut self) -> Vec<ManagedContainer> {
        match self.runtime.list_managed() {
            Ok(l) => l,
            Err(e) => {
                log::info(&format!("listing containers: {e}"));
                Vec::new()
            }
        }
    }

    /// Carries out one `HostAction` (the reply to register or updatestatus).
    pub fn apply(&mut self, v: &Value) {
        let a = actions::parse(v);
        log::add_secrets(a.secrets());
        self.apply_parsed(a);
    }

    pub fn apply_parsed(&mut self, a: HostActions) {
        for r in a.refused {
            self.refuse(&r.action, r.launch_id.as_deref(), r.reason);
        }
        if !a.registries.is_empty() {
            self.registries = a.registries;
        }
        if let Some(m) = a.mode {
            self.set_mode(m);
        }
        for (i, id) in a.terminates.iter().enumerate() {
            self.terminate(i, id);
        }
        for (i, l) in a.launches.iter().enumerate() {
            self.launch(i, l);
        }
        for p in a.pulls {
            self.pull_in_background(p.image);
        }
    }

    fn live_engines(&mut self) -> Vec<ManagedContainer> {
        self.managed().into_iter().filter(|c| c.is_live()).collect()
    }

    fn set_mode(&mut self, m: Mode) {
        let was = self.mode;
        if m == was && m != Mode::Terminate {
            return;
        }
        log::info(&format!("host mode {} -> {}", was.as_str(), m.as_str()));
        match m {
            Mode::Pause => {
                for c in self
                    .live_engines()
                    .into_iter()
                    .filter(|c| c.state == "running")
                {
                    if let Err(e) = self.runtime.pause(&c.id) {
                        self.refuse(
                            "mode",
                            Some(c.label(rt::LABEL_LAUNCH_ID)),
                            format!("cannot pause: {e}"),
                        );
                    }
                }
            }
            Mode::Continue | Mode::Drain => {
                // The controller took the terminate back before the power-off.
                if !self.powered_off {
                    self.terminate_pending = false;
                }
                if was == Mode::Pause {
                    for c in self
                        .live_engines()
                        .into_iter()
                        .filter(|c| c.state == "paused")
                    {
                        if let Err(e) = self.runtime.unpause(&c.id) {
                            self.refuse(
                                "mode",
                                Some(c.label(rt::LABEL_LAUNCH_ID)),
                                format!("cannot resume: {e}"),
                            );
                        }
                    }
                }
            }
            Mode::Terminate => {
                if !self.terminate_pending {
                    for c in self.live_engines() {
                        self.stop(&c, "the host terminates");
                    }
                    self.terminate_pending = true;
                }
            }
        }
        self.mode = m;
    }

    /// The platform says the instance is going (`why`): from now on the host
    /// reports drain and takes no new launch; running tasks go on until the
    /// instance stops (the controller moves the work). Said once in the journal.
    pub fn platform_drain(&mut self, why: &str) {
        if self.platform_notice.is_none() {
            log::console(&format!("draining: {why}"));
            self.platform_notice = Some(why.to_string());
        }
    }

    fn stop(&mut self, c: &ManagedContainer, why: &str) {
        let launch = c.label(rt::LABEL_LAUNCH_ID).to_string();
        if c.state == "paused" {
            let _ = self.runtime.unpause(&c.id);
        }
        match self.runtime.stop_and_remove(&c.id, self.ctx.stop_timeout) {
            Ok(()) => log::info(&format!(
                "stopped launch {launch} ({}): {why}",
                short(&c.id)
            )),
            Err(e) => self.refuse(
                "stop",
                Some(&launch),
                format!("cannot stop {}: {e}", short(&c.id)),
            ),
        }
    }

    fn terminate(&mut self, i: usize, id: &str) {
        let all = self.managed();
        let found = all.into_iter().find(|c| {
            (id.len() >= 12 && c.id.starts_with(id))
                || c.label(rt::LABEL_LAUNCH_ID) == id
                || c.name == id
        });
        match found {
            Some(c) => self.stop(&c, "terminateContainer"),
            None => self.refuse(
                &format!("terminateContainer[{i}]"),
                None,
                format!("no container {id} on this host"),
            ),
        }
    }

    fn auth(&self, image: &str) -> Option<RegistryAuth> {
        actions::find_auth(&self.registries, image).map(|r| RegistryAuth {
            server: r.host.clone(),
            username: r.username.clone(),
            password: r.password.clone(),
        })
    }

    fn pull_in_background(&mut self, image: String) {
        if let Some(e) = &self.runtime_error {
            let e = e.clone();
            return self.refuse(
                "pullDockerImages",
                None,
                format!("cannot pull {image}: {e}"),
            );
        }
        let rt = self.runtime.clone();
        let auth = self.auth(&image);
        let state = self.background.clone();
        self.bg().pulls += 1;
        std::thread::spawn(move || {
            let r = rt.pull(&image, auth.as_ref());
            let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
            st.pulls -= 1;
            match r {
                Ok(()) => log::info(&format!("pulled {image}")),
                Err(e) => st.failed.push(Refusal {
                    action: "pullDockerImages".into(),
                    launch_id: None,
                    reason: log::scrub(&format!("pulling {image}: {e}")),
                }),
            }
        });
    }

    fn launch(&mut self, i: usize, l: &Launch) {
        let what = format!("launchContainer[{i}]");
        let id = Some(l.launch_id.as_str());
        if let Some(e) = self.runtime_error.clone() {
            return self.refuse(&what, id, e);
        }
        if let Some(n) = self.platform_notice.clone() {
            return self.refuse(&what, id, format!("the host is draining: {n}"));
        }
        match self.mode {
            Mode::Continue => {}
            m => {
                return self.refuse(
                    &what,
                    id,
                    format!("the host is in {} mode: no new launches", m.as_str()),
                )
            }
        }
        if self.bg().launches.contains(&l.launch_id) {
            log::info(&format!(
                "launch {} is being started already: not started again",
                l.launch_id
            ));
            return;
        }
        let existing = self.managed();
        if let Some(c) = existing
            .iter()
            .find(|c| c.label(rt::LABEL_LAUNCH_ID) == l.launch_id)
        {
            log::info(&format!(
                "launch {} is already on this host as {} ({}): not started again",
                l.launch_id,
                short(&c.id),
                c.state
            ));
            return;
        }
        if l.is_gpu {
            if !self.ctx.gpu_image {
                return self.refuse(
                    &what,
                    id,
                    "isGPU: this node's image is not a GPU image (no NVIDIA driver or runtime)"
                        .into(),
                );
            }
            if self.ctx.gpus == 0 {
                return self.refuse(
                    &what,
                    id,
                    "isGPU: no GPU found on this node (no NVIDIA device on PCI)".into(),
                );
            }
        }
        let spec = match self.spec(l) {
            Ok(s) => s,
            Err(e) => return self.refuse(&what, id, e),
        };
        let auth = self.auth(&l.image);
        let rt = self.runtime.clone();
        let state = self.background.clone();
        let launch_id = l.launch_id.clone();
        let engine_id = l.engine_id.clone();
        self.bg().launches.insert(launch_id.clone());
        // Pull and start in a thread: a pull may take minutes, reports go on.
        // Timed from here, the action just read from the controller's reply:
        // the journal line is the figure "launchContainer received → running".
        let received = std::time::Instant::now();
        std::thread::spawn(move || {
            let r = ensure_image(rt.as_ref(), &spec.image, auth.as_ref())
                .map_err(|e| format!("pulling {}: {e}", spec.image))
                .and_then(|()| {
                    let image_ready = received.elapsed();
                    rt.create_and_start(&spec)
                        .map(|cid| (cid, image_ready))
                        .map_err(|e| format!("starting {}: {e}", spec.image))
                });
            let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
            st.launches.remove(&launch_id);
            match r {
                Ok((cid, image_ready)) => log::info(&format!(
                    "launched {launch_id} (engine {engine_id}) from {} as {}: running {:.2} s after the action arrived (image ready after {:.2} s)",
                    spec.image,
                    short(&cid),
                    received.elapsed().as_secs_f64(),
                    image_ready.as_secs_f64(),
                )),
                Err(e) => {
                    // In the journal too: the report reaches the controller,
                    // the operator on the node reads the journal.
                    log::info(&format!("launch {launch_id} failed: {e}"));
                    st.failed.push(Refusal {
                        action: what,
                        launch_id: Some(launch_id),
                        reason: log::scrub(&e),
                    })
                }
            }
        });
    }

    /// The container for a launch: env, /cache, scratch folders, labels, reservations.
    pub fn spec(&self, l: &Launch) -> Result<ContainerSpec, String> {
        let now = now_unix();
        let engine_dir = self.ctx.cache_dir.join("engine").join(&l.engine_id);
        let scratch = engine_dir.join("scratch");
        let instance = engine_dir.join(&l.launch_id);
        for d in [&scratch, &instance] {
            std::fs::create_dir_all(d)
                .map_err(|e| format!("cannot create {}: {e}", d.display()))?;
            // Engines run as whatever user their image names: the folders they
            // write must be writable by any (sticky, as /tmp).
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o1777))
                .map_err(|e| format!("cannot open {} to the engine: {e}", d.display()))?;
        }
        let expires = now + l.runtime_ttl_s.unwrap_or(DEFAULT_EXPIRATION_S);
        let c = &self.ctx;
        let mut env: Vec<(String, String)> = [
            ("AIWARE_HOST_ID", c.host_id.clone()),
            ("AIWARE_ID", l.launch_id.clone()),
            ("AIWARE_LAUNCH_ID", l.launch_id.clone()),
            ("AIWARE_ENGINE_ID", l.engine_id.clone()),
            ("ENGINE_ID", l.engine_id.clone()),
            ("AIWARE_EXPIRATION", rfc3339(expires)),
            (
                "AIWARE_ENGINE_SCRATCH",
                format!("/cache/engine/{}/scratch", l.engine_id),
            ),
            (
                "AIWARE_ENGINE_INSTANCE_SCRATCH",
                format!("/cache/engine/{}/{}", l.engine_id, l.launch_id),
            ),
            ("AIWARE_CONTROLLER", c.controller.clone()),
            ("AIWARE_LICENSE", c.license.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        // The action's own env comes last; the documented names stay the agent's.
        for (k, v) in &l.env {
            if env.iter().any(|(e, _)| e == k) {
                continue;
            }
            env.push((k.clone(), v.clone()));
        }
        let mut labels = BTreeMap::from([
            (rt::LABEL_MANAGED_BY.to_string(), rt::MANAGED_BY.to_string()),
            (rt::LABEL_LAUNCH_ID.to_string(), l.launch_id.clone()),
            (rt::LABEL_ENGINE_ID.to_string(), l.engine_id.clone()),
            (rt::LABEL_BUILD_ID.to_string(), l.build_id.clone()),
            (
                rt::LABEL_CONTAINER_TYPE.to_string(),
                l.container_type.clone(),
            ),
            (rt::LABEL_STARTED_UNIX.to_string(), now.to_string()),
        ]);
        if let Some(ttl) = l.runtime_ttl_s {
            labels.insert(rt::LABEL_EXPIRES_UNIX.to_string(), (now + ttl).to_string());
        }
        Ok(ContainerSpec {
            name: format!("aiware-engine-{}", l.launch_id),
            image: l.image.clone(),
            env,
            cmd: l.command.clone(),
            binds: vec![format!("{}:/cache", c.cache_dir.display())],
            labels,
            memory_reservation: l.soft_min_memory,
            cpu_shares: l.soft_min_vcpu,
            gpu: l.is_gpu,
            auto_remove: c.auto_remove,
        })
    }

    /// Once per report: retries an unavailable runtime, keeps the containers
    /// in line with the mode (one started while pausing is paused too), and
    /// enforces runtimeTTL (past its expiry plus the grace: stopped).
    pub fn tick(&mut self) {
        if self.runtime_error.is_some() {
            if let Some(f) = &self.reconnect {
                let candidate = f();
                if candidate.check().is_ok() {
                    log::console("container runtime: reachable now; container actions run");
                    self.runtime = candidate;
                    self.runtime_error = None;
                }
            }
        }
        match self.mode {
            Mode::Pause => {
                for c in self
                    .live_engines()
                    .into_iter()
                    .filter(|c| c.state == "running")
                {
                    let _ = self.runtime.pause(&c.id);
                }
            }
            Mode::Terminate => {
                for c in self.live_engines() {
                    self.stop(&c, "the host terminates");
                }
            }
            // Paused by an earlier agent, or a resume that failed: unpause.
            Mode::Continue | Mode::Drain => {
                for c in self
                    .live_engines()
                    .into_iter()
                    .filter(|c| c.state == "paused")
                {
                    let _ = self.runtime.unpause(&c.id);
                }
            }
        }
        let now = now_unix();
        let grace = self.ctx.ttl_grace.as_secs();
        for c in self.live_engines() {
            // Whole seconds: past `exp` means at least runtimeTTL ran, never less.
            let Ok(exp) = c.label(rt::LABEL_EXPIRES_UNIX).parse::<u64>() else {
                continue;
            };
            if now > exp + grace {
                self.stop(&c, "its runtimeTTL is over");
            }
        }
    }

    /// Fills the container part of a `HostStatus`, and the refusals since the last report.
    pub fn fill_status(&mut self, status: &mut Value) {
        let now = now_unix();
        let mut entries = Vec::new();
        let mut engines = 0;
        for c in self.live_engines() {
            if c.label(rt::LABEL_CONTAINER_TYPE) != "service" {
                engines += 1;
            }
            let u = self.runtime.usage(&c.id).unwrap_or_default();
            let mut e = json!({
                "dockerContainerId": c.id,
                "launchID": c.label(rt::LABEL_LAUNCH_ID),
                "engineID": c.label(rt::LABEL_ENGINE_ID),
                "buildID": c.label(rt::LABEL_BUILD_ID),
                "state": c.state,
                "CPUUtilization": (u.cpu_percent * 100.0).round() / 100.0,
                "memoryUsed": u.memory_used,
            });
            if u.memory_limit > 0 {
                e["memoryAvailable"] = json!(u.memory_limit.saturating_sub(u.memory_used));
            }
            if let Ok(t) = c.label(rt::LABEL_STARTED_UNIX).parse::<u64>() {
                e["startupTimestamp"] = json!(t);
            }
            if let Ok(t) = c.label(rt::LABEL_EXPIRES_UNIX).parse::<u64>() {
                e["ttl"] = json!(t.saturating_sub(now));
            }
            entries.push(e);
        }
        status["numContainers"] = json!(entries.len());
        status["numEngineInstances"] = json!(engines);
        status["containerStatus"] = Value::Array(entries);
        status["hostMode"] = json!(self.mode.as_str());
        status["drain"] = json!(
            matches!(self.mode, Mode::Drain | Mode::Terminate) || self.platform_notice.is_some()
        );
        {
            let mut bg = self.background.lock().unwrap_or_else(|e| e.into_inner());
            self.refused.append(&mut bg.failed);
            status["pullsInProgress"] = json!(bg.pulls);
            status["launchesInProgress"] = json!(bg.launches.iter().collect::<Vec<_>>());
        }
        if let Some(e) = &self.runtime_error {
            status["containerRuntimeError"] = json!(e);
        }
        if !self.refused.is_empty() {
            let errs: Vec<Value> = self
                .refused
                .drain(..)
                .map(|r| json!({"action": r.action, "launchID": r.launch_id, "reason": log::scrub(&r.reason)}))
                .collect();
            status["actionErrors"] = Value::Array(errs);
        }
    }

    /// After a report reached the controller: a terminating host with no
    /// engine left asks for power-off (once).
    pub fn report_sent(&mut self, status: &Value) {
        let starting = !self.bg().launches.is_empty();
        if self.terminate_pending && !self.powered_off && !starting && status["numContainers"] == 0
        {
            self.powered_off = true;
            log::console(
                "mode terminate: no engine runs and the controller knows it; powering off",
            );
            if let Err(e) = self.power.power_off() {
                log::console(&format!("cannot power off: {e}"));
            }
        }
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// `2026-12-01T22:13:06Z`
pub fn rfc3339(unix: u64) -> String {
    let days = (unix / 86400) as i64;
    let secs = unix % 86400;
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Whether a reference names one fixed image: a digest, or a tag that is not
/// `latest` (`registry:5000/name` has a port, not a tag).
pub fn is_pinned(image: &str) -> bool {
    if image.contains('@') {
        return true;
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    matches!(last.split_once(':'), Some((_, tag)) if tag != "latest")
}

/// The image of a launch, in the store before it is started. A pinned image
/// already here (baked into the node, preloaded by `pullDockerImages`, or
/// pulled by an earlier launch) is used as is, so a node cut off from its
/// registry still runs what it has; a moving tag (`:latest`, none) is pulled
/// every time, and only when that pull fails is the local copy used, with a
/// line in the journal. This is Kubernetes' `IfNotPresent`/`Always` split by
/// the same rule it defaults with.
pub fn ensure_image(
    rt: &dyn ContainerRuntime,
    image: &str,
    auth: Option<&RegistryAuth>,
) -> Result<(), String> {
    let local = rt.has_image(image).unwrap_or(false);
    if local && is_pinned(image) {
        return Ok(());
    }
    match rt.pull(image, auth) {
        Ok(()) => Ok(()),
        Err(e) if local => {
            log::info(&log::scrub(&format!(
                "pulling {image} failed ({e}): starting the copy this node has"
            )));
            Ok(())
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::containers::fake::FakeRuntime;

    fn ctx(dir: &std::path::Path) -> LaunchContext {
        LaunchContext {
            host_id: "H1".into(),
            controller: "http://c/edge/v1".into(),
            license: "lic-secret-1234".into(),
            cache_dir: dir.to_path_buf(),
            auto_remove: true,
            gpu_image: false,
            gpus: 0,
            ttl_grace: Duration::ZERO,
            stop_timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_904_586), "2026-11-28T22:23:06Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn ttl_over_stops_and_status_counts_what_runs() {
        let t = tempfile::tempdir().unwrap();
        let f = Arc::new(FakeRuntime::new());
        let mut h = HostTasks::new(
            f.clone(),
            Arc::new(RecordingPower::default()),
            ctx(t.path()),
        );
        h.apply(&json!({"launchContainer": [
            {"launchId": "L1", "engineId": "E1", "dockerImage": "a/b:1", "runtimeTTL": 1},
            {"launchId": "L2", "engineId": "E1", "dockerImage": "a/b:1", "containerType": "service"}
        ]}));
        assert!(h.wait_background(Duration::from_secs(5)));
        let mut st = json!({});
        h.fill_status(&mut st);
        assert_eq!(
            (
                st["numContainers"].clone(),
                st["numEngineInstances"].clone()
            ),
            (json!(2), json!(1))
        );
        assert!(st.get("actionErrors").is_none(), "{st}");
        assert!(
            t.path().join("engine/E1/scratch").is_dir() && t.path().join("engine/E1/L1").is_dir()
        );
        h.tick();
        assert_eq!(f.by_launch("L1").len(), 1, "not over yet");
        std::thread::sleep(Duration::from_millis(2100));
        h.tick();
        assert!(f.by_launch("L1").is_empty(), "over: stopped");
        assert_eq!(f.by_launch("L2").len(), 1, "no TTL: left alone");
    }

    #[test]
    fn a_platform_notice_drains_new_launches_but_keeps_what_runs() {
        let t = tempfile::tempdir().unwrap();
        let f = Arc::new(FakeRuntime::new());
        let mut h = HostTasks::new(
            f.clone(),
            Arc::new(RecordingPower::default()),
            ctx(t.path()),
        );
        h.apply(
            &json!({"launchContainer": [{"launchId": "L1", "engineId": "E1", "dockerImage": "a"}]}),
        );
        assert!(h.wait_background(Duration::from_secs(5)));
        h.platform_drain("EC2 spot interruption: terminate at 2026-12-04T15:30:00Z");
        h.apply(
            &json!({"launchContainer": [{"launchId": "L2", "engineId": "E1", "dockerImage": "a"}]}),
        );
        assert!(h.wait_background(Duration::from_secs(5)));
        let mut st = json!({});
        h.fill_status(&mut st);
        assert_eq!(st["drain"], true);
        assert_eq!(st["hostMode"], "continue");
        assert_eq!(st["numContainers"], 1, "L1 goes on: {st}");
        let refused = st["actionErrors"].to_string();
        assert!(
            refused.contains("L2") && refused.contains("EC2 spot interruption"),
            "{refused}"
        );
        assert_eq!(f.containers().len(), 1);
    }

    #[test]
    fn terminate_mode_powers_off_once_after_a_report_with_none_running() {
        let t = tempfile::tempdir().unwrap();
        let f = Arc::new(FakeRuntime::new());
        let p = Arc::new(RecordingPower::default());
        let mut h = HostTasks::new(f.clone(), p.clone(), ctx(t.path()));
        h.apply(
            &json!({"launchContainer": [{"launchId": "L1", "engineId": "E1", "dockerImage": "a"}]}),
        );
        assert!(h.wait_background(Duration::from_secs(5)));
        let mut st = json!({});
        h.fill_status(&mut st);
        assert_eq!(st["numContainers"], 1);
        h.report_sent(&st);
        assert_eq!(*p.requests.lock().unwrap(), 0);
        h.apply(&json!({"mode": "terminate"}));
        assert!(f.containers().is_empty());
        let mut st = json!({});
        h.fill_status(&mut st);
        assert_eq!(st["numContainers"], 0);
        h.report_sent(&st);
        h.apply(&json!({"mode": "terminate"}));
        h.report_sent(&st);
        assert_eq!(*p.requests.lock().unwrap(), 1);
    }

    #[test]
    fn continue_unpauses_what_a_previous_agent_paused_and_cancels_a_terminate() {
        let t = tempfile::tempdir().unwrap();
        let f = Arc::new(FakeRuntime::new());
        let labels = BTreeMap::from([
            (rt::LABEL_MANAGED_BY.to_string(), rt::MANAGED_BY.to_string()),
            (rt::LABEL_LAUNCH_ID.to_string(), "L0".to_string()),
        ]);
        let id = f.adopt_existing(ContainerSpec {
            name: "aiware-engine-L0".into(),
            labels,
            ..Default::default()
        });
        f.pause(&id).unwrap();
        let p = Arc::new(RecordingPower::default());
        let mut h = HostTasks::new(f.clone(), p.clone(), ctx(t.path()));
        h.apply(&json!({"mode": "continue"}));
        h.tick();
        assert_eq!(f.containers()[0].state, "running");
        h.apply(&json!({"mode": "terminate"}));
        h.apply(&json!({"mode": "continue"}));
        let mut st = json!({});
        h.fill_status(&mut st);
        h.report_sent(&st);
        assert_eq!(*p.requests.lock().unwrap(), 0, "taken back: no power-off");
    }

    #[test]
    fn no_runtime_refuses_launches_with_the_reason() {
        let t = tempfile::tempdir().unwrap();
        let u = Arc::new(rt::Unavailable {
            reason: "no Docker on this node".into(),
        });
        let mut h = HostTasks::new(u, Arc::new(RecordingPower::default()), ctx(t.path()));
        h.apply(
            &json!({"launchContainer": [{"launchId": "L1", "engineId": "E1", "dockerImage": "a"}]}),
        );
        let mut st = json!({});
        h.fill_status(&mut st);
        assert_eq!(st["numContainers"], 0);
        assert_eq!(st["actionErrors"][0]["launchID"], "L1");
        assert!(st["actionErrors"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("no Docker"));
        assert!(st["containerRuntimeError"].is_string());
    }

    #[test]
    fn pinned_references() {
        for p in ["a/b:1", "reg:5000/a/b:2.1", "a/b@sha256:00", "busybox:musl"] {
            assert!(is_pinned(p), "{p}");
        }
        for m in ["a/b", "a/b:latest", "reg:5000/a/b", "reg:5000/a/b:latest"] {
            assert!(!is_pinned(m), "{m}");
        }
    }

    #[test]
    fn a_pinned_image_on_the_node_is_not_pulled_and_a_moving_one_falls_back() {
        let f = FakeRuntime::new();
        f.add_image("a/b:1");
        f.add_image("a/b:latest");
        f.fail_pulls_of("a/b:latest");
        f.fail_pulls_of("c/d:2");
        ensure_image(&f, "a/b:1", None).unwrap();
        assert!(f.pulled().is_empty(), "pinned and here: no pull");
        ensure_image(&f, "a/b:latest", None).unwrap();
        assert!(
            f.calls().contains(&"pull a/b:latest".to_string()),
            "moving: pulled"
        );
        let e = ensure_image(&f, "c/d:2", None).unwrap_err();
        assert!(e.contains("pull access denied"), "{e}");
    }
}
