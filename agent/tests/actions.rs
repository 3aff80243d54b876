//! Host actions end to end: the agent joins the Edge API test controller (a
//! test double from qemu-tests), the controller queues HostActions, and the
//! agent carries them out on `FakeRuntime` (the container runtime's test
//! double). The real Docker path is tested in QEMU.

use aiw_agent::agent::{Agent, AgentConfig, Outcome};
use aiw_agent::containers::fake::FakeRuntime;
use aiw_agent::containers::{self as rt, ContainerRuntime, ContainerSpec};
use aiw_agent::controller::tasks::RecordingPower;
use aiw_agent::datasource::Endpoints;
use aiw_agent::paths::Paths;
use aiw_agent::systemd::RecordingUnits;
use qemu_tests::edge_controller::{launch_ids, EdgeTestController};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

const INIT: &str = "6f1c1f4e-5d1e-4a55-9a0c-3b8f2d7e9a11";
const LICENSE: &str = "lic-super-secret-0123";
const REG_PASSWORD: &str = "reg-pass-9f8e7d6c";
const ENV_SECRET: &str = "env-value-s3cr3t-42";
const WAIT: Duration = Duration::from_secs(10);

fn node(url: &str, gpu_image: bool) -> (tempfile::TempDir, Paths) {
    node_with(url, gpu_image, "")
}

/// `extra`: more lines under `aiware:` in the user-data.
fn node_with(url: &str, gpu_image: bool, extra: &str) -> (tempfile::TempDir, Paths) {
    let t = tempfile::tempdir().unwrap();
    let p = Paths::new(t.path());
    std::fs::create_dir_all(p.modes_toml().parent().unwrap()).unwrap();
    std::fs::copy(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/modes.toml"),
        p.modes_toml(),
    )
    .unwrap();
    let image = json!({"profile": "engine", "version": "test", "modes": ["engine"],
        "profiles": {"engine": ["engine"]}, "gpu": gpu_image});
    std::fs::write(p.image_json(), image.to_string()).unwrap();
    let seed = p.by_label().join("cidata");
    std::fs::create_dir_all(&seed).unwrap();
    let ud = format!("#cloud-config\nhostname: eng-1\naiware:\n  mode: [engine]\n  controller: {url}\n  init_token: {INIT}\n  license: {LICENSE}\n{extra}");
    std::fs::write(seed.join("user-data"), ud).unwrap();
    std::fs::write(seed.join("meta-data"), "instance-id: iid-1\n").unwrap();
    std::fs::create_dir_all(p.proc_sys().join("vm")).unwrap();
    (t, p)
}

fn cfg(p: &Paths) -> AgentConfig {
    AgentConfig {
        paths: p.clone(),
        endpoints: Endpoints::default(),
        datasource_deadline: Duration::from_secs(2),
        join_deadline: Some(Duration::from_secs(20)),
        join_backoff_max: Duration::from_millis(300),
        metrics_addr: None,
        real_system: false,
        heartbeat_override: Some(Duration::from_millis(40)),
        stop_after_heartbeats: Some(2000),
    }
}

/// An agent running in a thread until [`RunningAgent::stop`].
struct RunningAgent {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Outcome>>,
    host_id: String,
}

impl RunningAgent {
    fn start(
        c: &EdgeTestController,
        p: &Paths,
        runtime: Option<Arc<dyn ContainerRuntime>>,
        power: Arc<RecordingPower>,
        ttl_grace: Duration,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let known = c.hosts().len();
        let cfg = cfg(p);
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let units = RecordingUnits::default();
            let mut a = Agent::new(cfg, &units)
                .with_power(power)
                .with_ttl_grace(ttl_grace)
                .with_stop_flag(flag);
            if let Some(r) = runtime {
                a = a.with_runtime(r);
            }
            a.run()
        });
        assert!(
            c.wait_for(WAIT, |h| h.iter().any(|h| h.statuses.len() > known)),
            "the agent never reported status"
        );
        let host_id = c.hosts()[0].host_id.clone();
        RunningAgent {
            stop,
            thread: Some(thread),
            host_id,
        }
    }

    fn stop(mut self) -> Outcome {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn fake_agent(c: &EdgeTestController, p: &Paths) -> (RunningAgent, Arc<FakeRuntime>) {
    let f = Arc::new(FakeRuntime::new());
    let a = RunningAgent::start(
        c,
        p,
        Some(f.clone()),
        Arc::new(RecordingPower::default()),
        Duration::ZERO,
    );
    (a, f)
}

fn launch(id: &str, image: &str) -> Value {
    json!({"launchId": id, "engineId": "eng-7", "buildId": "build-3", "dockerImage": image})
}

/// Queues `action` and waits for a later status report for which `pred` holds.
fn queue_and_wait(
    c: &EdgeTestController,
    host: &str,
    action: Value,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let after = c.statuses(host).len();
    if !action.is_null() {
        assert!(c.queue_actions(host, action));
    }
    c.wait_for_status(host, after, WAIT, pred)
        .unwrap_or_else(|| panic!("no such status; last: {:?}", c.statuses(host).last()))
}

fn refused(st: &Value, launch: &str) -> Option<String> {
    st["actionErrors"]
        .as_array()?
        .iter()
        .find(|e| e["launchID"] == launch)
        .map(|e| e["reason"].as_str().unwrap_or("").to_string())
}

/// An admin request as an operator would send it (`POST /host/{id}/drain` ...).
fn admin(c: &EdgeTestController, host: &str, op: &str) {
    let body = r#"{"reason":"user","detail":"test"}"#;
    let mut s = std::net::TcpStream::connect(c.addr()).unwrap();
    write!(
        s,
        "POST /edge/v1/host/{host}/{op} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {INIT}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}

#[test]
fn launch_runs_with_the_engine_env_cache_command_labels_and_reservations() {
    let c = EdgeTestController::start("127.0.0.1:0", INIT).unwrap();
    let (_t, p) = node(&c.url(), false);
    let (a, f) = fake_agent(&c, &p);
    let mut l = launch("launch-1", "reg.example:5000/engines/task:1.0");
    l["env"] =
        json!([{"key": "TASK_MODE", "value": "fast"}, {"key": "TASK_SECRET", "value": ENV_SECRET}]);
    l["containerConfig"] = json!({"commandLine": ["/task", "--out", "a b; rm -rf /"]});
    l["softMinMemory"] = json!(268435456);
    l["softMinvCPU"] = json!(512);
    l["runtimeTTL"] = json!(3600);
    let action = json!({
        "launchContainer": [l],
        "registries": [
            {"dockerRegistryURL": "other.example", "dockerUsername": "x", "dockerPassword": "not-this-one"},
            {"dockerRegistryURL": "https://reg.example:5000", "dockerUsername": "puller", "dockerPassword": REG_PASSWORD}
        ],
    });
    let st = queue_and_wait(&c, &a.host_id, action, |s| launch_ids(s) == ["launch-1"]);
    assert_eq!(
        (
            st["numContainers"].clone(),
            st["numEngineInstances"].clone()
        ),
        (json!(1), json!(1))
    );
    let cs = &st["containerStatus"][0];
    assert_eq!(cs["engineID"], "eng-7");
    assert_eq!(cs["dockerContainerId"].as_str().unwrap().len(), 64);
    assert!(
        cs["CPUUtilization"].is_number() && cs["memoryUsed"].is_number(),
        "{cs}"
    );
    assert!(cs["ttl"].as_u64().unwrap() > 3500);

    let pulled = f.pulled();
    assert_eq!(pulled.len(), 1);
    let auth = pulled[0].1.as_ref().expect("the registry's credentials");
    assert_eq!(
        (auth.username.as_str(), auth.password.as_str()),
        ("puller", REG_PASSWORD)
    );

    let c1 = &f.by_launch("launch-1")[0];
    let spec = &c1.spec;
    let env: BTreeMap<&str, &str> = spec
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(env["AIWARE_HOST_ID"], a.host_id);
    assert_eq!(env["AIWARE_ID"], "launch-1");
    assert_eq!(env["AIWARE_LAUNCH_ID"], "launch-1");
    assert_eq!(env["AIWARE_ENGINE_ID"], "eng-7");
    assert_eq!(env["ENGINE_ID"], "eng-7");
    assert_eq!(env["AIWARE_ENGINE_SCRATCH"], "/cache/engine/eng-7/scratch");
    assert_eq!(
        env["AIWARE_ENGINE_INSTANCE_SCRATCH"],
        "/cache/engine/eng-7/launch-1"
    );
    assert_eq!(env["AIWARE_CONTROLLER"], c.url());
    assert_eq!(env["AIWARE_LICENSE"], LICENSE);
    assert!(
        env["AIWARE_EXPIRATION"].ends_with('Z') && env["AIWARE_EXPIRATION"].len() == 20,
        "{}",
        env["AIWARE_EXPIRATION"]
    );
    assert_eq!((env["TASK_MODE"], env["TASK_SECRET"]), ("fast", ENV_SECRET));
    assert_eq!(
        spec.cmd,
        ["/task", "--out", "a b; rm -rf /"],
        "argv as given, no shell"
    );
    assert_eq!(spec.binds, [format!("{}:/cache", p.at("/cache").display())]);
    assert!(p.at("/cache/engine/eng-7/scratch").is_dir());
    assert!(p.at("/cache/engine/eng-7/launch-1").is_dir());
    assert_eq!(
        (spec.memory_reservation, spec.cpu_shares),
        (Some(268435456), Some(512))
    );
    assert!(spec.auto_remove && !spec.gpu);
    assert_eq!(spec.image, "reg.example:5000/engines/task:1.0");
    assert_eq!(spec.labels[rt::LABEL_LAUNCH_ID], "launch-1");
    assert_eq!(spec.labels[rt::LABEL_ENGINE_ID], "eng-7");
    assert_eq!(spec.labels[rt::LABEL_BUILD_ID], "build-3");
    assert_eq!(spec.labels[rt::LABEL_MANAGED_BY], "aiw-agent");
    assert_eq!(a.stop(), Outcome::Ready);

    // Secrets: not in any status report, not in status.json, scrubbed from logs.
    let all = serde_json::to_string(&c.statuses(&c.hosts()[0].host_id)).unwrap();
    let file = std::fs::read_to_string(p.status_file()).unwrap();
    assert!(file.contains("launch-1"), "status.json lists the container");
    for secret in [LICENSE, REG_PASSWORD, ENV_SECRET] {
        assert!(!all.contains(secret), "a status report leaks {secret}");
        assert!(!file.contains(secret), "status.json leaks {secret}");
        assert!(
            !aiw_agent::log::scrub(&format!("x {secret} y")).contains(secret),
            "logs would show {secret}"
        );
    }
}

#[test]
fn terminate_container_stops_the_named_one() {
    let c = EdgeTestController::start("127.0.0.1:0", INIT).unwrap();
    let (_t, p) = node(&c.url(), false);
    let (a, f) = fake_agent(&c, &p);
    let st = queue_and_wait(
        &c,
        &a.host_id,
        json!({"launchContainer": [launch("L1", "task:1"), launch("L2", "task:1")]}),
        |s| s["numContainers"] == 2,
    );
    let id = st["containerStatus"][0]["dockerContainerId"]
        .as_str()
        .unwrap()
        .to_string();
    let gone = st["containerStatus"][0]["launchID"]
        .as_str()
        .unwrap()
        .to_string();
    let st = queue_and_wait(
        &c,
        &a.host_id,
        json!({"terminateContainer": [{"dockerContainerId": id}, {"dockerContainerId": "0123456789abcdef"}]}),
        |s| s["numContainers"] == 1,
    );
    assert!(!launch_ids(&st).contains(&gone));
    assert!(f.by_launch(&gone).is_empty());
    assert!(
        f.calls()
            .iter()
            .any(|c| c.starts_with(&format!("stop {id}"))),
        "{:?}",
        f.calls()
    );
    let errs = st["actionErrors"].to_string();
    assert!(errs.contains("no container 0123456789abcdef"), "{st}");
    a.stop();
}

#[test]
fn drain_refuses_new_launches_and_lets_running_ones_go_on() {
    let c = EdgeTestController::start("127.0.0.1:0", INIT).unwrap();
    let (_t, p) = node(&c.url(), false);
    let (a, f) = fake_agent(&c, &p);
    queue_and_wait(
        &c,
        &a.host_id,
        json!({"launchContainer": [launch("L1", "task:1")]}),
        |s| s["numContainers"] == 1,
    );
    admin(&c, &a.host_id, "drain");
    queue_and_wait(&c, &a.host_id, Value::Null, |s| s["hostMode"] == "drain");
    let st = queue_and_wait(
        &c,
        &a.host_id,
        json!({"launchContainer": [launch("L2", "task:1")]}),
        |s| refused(s, "L2").is_some(),
    );
    assert!(refused(&st, "L2").unwrap().contains("drain"), "{st}");
    assert_eq!(st["drain"], true);
    assert_eq!(launch_ids(&st), ["L1"], "the running one goes on");
    assert!(f.by_launch("L2").is_empty());
    assert_eq!(f.by_launch("L1")[0].state, "running");
    a.stop();
}

/// `AIWARE_UPDATE_POLICY=auto` (issue 14): the agent finds a new image
/// version, installs it, drains (reported to the controller, new launches
/// refused), and reboots only once the running task ended. systemd-sysupdate
/// is a TEST DOUBLE here (a script answering `check-new` and writing the UKI
/// name `update` would); the real one runs in the QEMU update journey.
#[test]
fn auto_update_drains_and_reboots_only_when_no_task_runs() {
    let c = EdgeTestController::start("127.0.0.1:0", INIT).unwrap();
    let (t, p) = node_with(
        &c.url(),
        false,
        "  update_policy: auto\n  update_check_interval: 5\n",
    );
    std::fs::create_dir_all(p.at("/usr/lib")).unwrap();
    std::fs::write(
        p.at("/usr/lib/os-release"),
        "ID=debian\nIMAGE_ID=aiware-engine\nIMAGE_VERSION=1\n",
    )
    .unwrap();
    let esp = p.at("/efi/EFI/Linux");
    std::fs::create_dir_all(&esp).unwrap();
    std::fs::write(esp.join("aiware-engine_1.efi"), "").unwrap();
    let fake = t.path().join("fake-sysupdate");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\n# TEST DOUBLE of systemd-sysupdate: version 2 on offer.\n\
             new={esp}/aiware-engine_2+3-0.efi\n\
             case \"$1\" in\n\
             check-new) [ -e \"$new\" ] && exit 1; echo 2 ;;\n\
             update) [ \"$2\" = 2 ] && : > \"$new\" ;;\n\
             *) exit 2 ;;\nesac\n",
            esp = esp.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // Only this test's agent reads it: the others' roots have no os-release.
    std::env::set_var("AIW_AGENT_SYSUPDATE", &fake);
    let power = Arc::new(RecordingPower::default());
    let f = Arc::new(FakeRuntime::new());
    let a = RunningAgent::start(&c, &p, Some(f.clone()), power.clone(), Duration::ZERO);
    queue_and_wait(
        &c,
        &a.host_id,
        json!({"launchContainer": [launch("L1", "task:1")]}),
        |s| s["numContainers"] == 1,
    );
    // The first check is 5 s after the settings applied.
    let after = c.statuses(&a.host_id).len();
    let st = c
        .wait_for_status(&a.host_id, after, Duration::from_secs(30), |s| {
            s["drain"] == true
        })
        .expect("the node never reported drain for the update");
    assert!(
        esp.join("aiware-engine_2+3-0.efi").exists(),
        "version 2 not installed"
    );
    assert_eq!(st["imageVersion"]["booted"], "1", "{st}");
    let st = queue_and_wait(
        &c,
        &a.host_id,
        json!({"launchContainer": [launch("L2", "task:1")]}),
        |s| refused(s, "L2").is_some(),
    );
    assert!(
        refused(&st, "L2").unwrap().contains("image version 2"),
        "{st}"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        *power.reboots.lock().unwrap(),
        0,
        "rebooted with L1 running"
    );
    let id = f.by_launch("L1")[0].id.clone();
    queue_and_wait(
        &c,
        &a.host_id,
        json!({"terminateContainer": [{"dockerContainerId": id}]}),
        |s| s["numContainers"] == 0,
    );
    let until = std::time::Instant::now() + WAIT;
    while *power.reboots.lock().unwrap() == 0 && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(*power.reboots.lock().unwrap(), 1, "no reboot once L1 ended");
    assert_eq!(*power.requests.lock().unwrap(), 0, "powered off");
    a.stop();
}

#[test]
fn pause_pauses_the_engines_and_resume_unpauses_them() {
    let c = EdgeTestController::start("127.0.0.1:0", INIT).unwrap();
    let (_t, p) = node(&c.url(), false);
    let (a, f) = fake_agent(&c, &p);
    queue_and_wait(
        &c,
        &a.host_id,
        json!({"launchContainer": [launch("L1", "task:1")]}),
        |s| s["numContainers"] == 1,
    );
    admin(&c, &a.host_id, "pause");
    let st = queue_and_wait(&c, &a.host_id, Value::Null, |s| {
        s["containerStatus"][0]["state"] == "paused"
    });
    assert_eq!(st["hostMode"], "pause");
    assert_eq!(f.by_launch("L1")[0].state, "paused");
    admin(&c, &a.host_id, "resume");
    let st = queue_and_wait(&c, &a.host_id, Value::Null, |s| {
        s["containerStatus"][0]["state"] == "running"
    });
    assert_eq!(st["hostMode"], "continue");
    assert_eq!(f.by_launch("L1")[0].state, "running");
    a.stop();
}

#[test]
fn runtime_ttl_over_stops_the_container() {
    let c = EdgeTestController::start("127.0.0.1:0", INIT).unwrap();
    let (_t, p) = node(&c.url(), false);
    let (a, f) = fake_agent(&c, &p);
    let mut short = launch("L-ttl", "task:1");
    short["runtimeTTL"] = json!(1);
    queue_and_wait(
        &c,
        &a.host_id,
        json!({"launchContainer": [short, launch("L-long", "task:1")]}),
        |s| s["numContainers"] == 2,
    );
    let st = queue_and_wait(&c, &a.host_id, Value::Null, |s| s["numContainers"] == 1);
    assert_eq!(launch_ids(&st), ["L-long"]);
    assert!(f.by_launch("L-ttl").is_empty());
    a.stop();
}

#[test]
fn a_restarted_agent_readopts_what_runs_and_never_starts_it_twice() {
    let c = EdgeTestController::start("127.0.0.1:0", INIT).unwrap();
    let (_t, p) = node(&c.url(), false);
    let f = Arc::new(FakeRuntime::new());
    let start = || {
        RunningAgent::start(
            &c,
            &p,
            Some(f.clone()),
            Arc::new(RecordingPower::default()),
            Duration::ZERO,
        )
    };
    let a = start();
    queue_and_wait(
        &c,
        &a.host_id,
        json!({"launchContainer": [launch("L1", "task:1")]}),
        |s| s["numContainers"] == 1,
    );
    let host = a.host_id.clone();
    a.stop();
    // The agent restarts (same runtime: the container kept running).
    let b = start();
    assert_eq!(b.host_id, host);
    let first = c.statuses(&host).len();
    let st = queue_and_wait(&c, &host, Value::Null, |s| s["numContainers"] == 1);
    assert_eq!(launch_ids(&st), ["L1"], "re-adopted and reported");
    // The controller sends the same launch again: not started twice.
    queue_and_wait(
        &c,
        &host,
        json!({"launchContainer": [launch("L1", "task:1")]}),
        |_| true,
    );
    queue_and_wait(&c, &host, Value::Null, |_| true);
    assert_eq!(f.by_launch("L1").len(), 1);
    let creates = f.calls().iter().filter(|c| c.starts_with("create")).count();
    assert_eq!(creates, 1, "{:?}", f.calls());
    assert!(c.statuses(&host)[first..]
        .iter()
        .all(|s| s["numContainers"] == 1));
    b.stop();
}

#[test]
fn a_container_from_a_previous_agent_is_reported_from_the_first_status() {
    let c = EdgeTestController::start("127.0.0.1:0", INIT).unwrap();
    let (_t, p) = node(&c.url(), false);
    let f = Arc::new(FakeRuntime::new());
    let labels = BTreeMap::from([
        (rt::LABEL_MANAGED_BY.to_string(), rt::MANAGED_BY.to_string()),
        (rt::LABEL_LAUNCH_ID.to_string(), "old-launch".to_string()),
        (rt::LABEL_ENGINE_ID.to_string(), "eng-1".to_string()),
    ]);
    f.adopt_existing(ContainerSpec {
        name: "aiware-engine-old-launch".into(),
        labels,
        ..Default::default()
    });
    let a = RunningAgent::start(
        &c,
        &p,
        Some(f.clone()),
        Arc::new(RecordingPower::default()),
        Duration::ZERO,
    );
    let first = &c.statuses(&a.host_id)[0];
    assert_eq!(launch_ids(first), ["old-launch"]);
    a.stop();
}

#[test]
fn bad_image_references_and_shell_metacharacters_are_refused_and_reported() {
    let c = EdgeTestController::start("127.0.0.1:0", INIT).unwrap();
    let (_t, p) = node(&c.url(), false);
    let (a, f) = fake_agent(&c, &p);
    let mut bad_env = launch("L-env", "task:1");
    bad_env["env"] = json!([{"key": "X;reboot", "value": "1"}]);
    let st = queue_and_wait(
        &c,
        &a.host_id,
        json!({"launchContainer": [launch("L-img", "task:1;reboot"), launch("L-sub", "$(reboot)"), bad_env, launch("L-ok", "task:1"), 42],
               "unknownField": {"ignored": true}}),
        |s| s["actionErrors"].as_array().is_some_and(|e| e.len() >= 4),
    );
    assert!(
        refused(&st, "L-img")
            .unwrap()
            .contains("not a valid image reference"),
        "{st}"
    );
    assert!(refused(&st, "L-sub")
        .unwrap()
        .contains("not a valid image reference"));
    assert!(refused(&st, "L-env")
        .unwrap()
        .contains("not a variable name"));
    assert!(st["actionErrors"]
        .to_string()
        .contains("launchContainer[4]"));
    assert!(refused(&st, "L-ok").is_none());
    let st = queue_and_wait(&c, &a.host_id, Value::Null, |s| s["numContainers"] == 1);
    assert_eq!(launch_ids(&st), ["L-ok"]);
    assert!(st.get("actionErrors").is_none(), "reported once");
    assert!(
        f.calls().iter().all(|c| !c.contains("reboot")),
        "{:?}",
        f.calls()
    );
    a.stop();
    // What an operator sees: `aiw-agent status` and /metrics.
    let st: aiw_agent::status::Status =
        serde_json::from_slice(&std::fs::read(p.status_file()).unwrap()).unwrap();
    let human = st.human();
    assert!(
        human.contains("host mode:  continue, 1 container(s)"),
        "{human}"
    );
    assert!(
        human.contains("launch L-ok engine eng-7 running"),
        "{human}"
    );
    assert!(
        human.contains("refused: launchContainer[0] (launch L-img)"),
        "{human}"
    );
    let metrics = aiw_agent::metrics::render(&st);
    assert!(
        metrics.contains("aiw_agent_action_errors_total 4\n"),
        "{metrics}"
    );
    assert!(metrics.contains("aiw_agent_containers 1\n"), "{metrics}");
    // The last report's latency, measured by the agent (gather → reply).
    let ms = st.join.last_report_ms.expect("a report was sent");
    assert!(ms < 10_000, "a report to a local controller took {ms} ms");
    assert!(
        metrics.contains(&format!(
            "aiw_agent_last_report_seconds {:.3}\n",
            ms as f64 / 1000.0
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("aiw_agent_host_mode{mode=\"continue\"} 1"),
        "{metrics}"
    );
}

#[test]
fn a_gpu_launch_on_a_node_without_gpus_is_refused_with_the_reason() {
    let c = EdgeTestController::start("127.0.0.1:0", INIT).unwrap();
    // A GPU image, but no NVIDIA device on this node's PCI bus.
    let (_t, p) = node(&c.url(), true);
    let (a, f) = fake_agent(&c, &p);
    let mut g = launch("L-gpu", "task:1");
    g["isGPU"] = json!(true);
    g["gpuType"] = json!("cuda");
    let st = queue_and_wait(&c, &a.host_id, json!({"launchContainer": [g]}), |s| {
        refused(s, "L-gpu").is_some()
    });
    assert!(
        refused(&st, "L-gpu").unwrap().contains("no GPU found"),
        "{st}"
    );
    assert_eq!(st["numContainers"], 0);
    assert!(f.calls().is_empty(), "{:?}", f.calls());
    a.stop();
}

#[test]
fn without_docker_launches_are_refused_and_the_node_keeps_reporting() {
    let c = EdgeTestController::start("127.0.0.1:0", INIT).unwrap();
    let (_t, p) = node(&c.url(), false);
    // No runtime given: a test root has none, as a node without /run/docker.sock.
    let a = RunningAgent::start(
        &c,
        &p,
        None,
        Arc::new(RecordingPower::default()),
        Duration::ZERO,
    );
    let st = queue_and_wait(
        &c,
        &a.host_id,
        json!({"launchContainer": [launch("L1", "task:1")]}),
        |s| refused(s, "L1").is_some(),
    );
    assert!(
        refused(&st, "L1").unwrap().contains("no container runtime"),
        "{st}"
    );
    assert!(st["containerRuntimeError"].is_string());
    let n = c.statuses(&a.host_id).len();
    queue_and_wait(&c, &a.host_id, Value::Null, |s| s["numContainers"] == 0);
    assert!(c.statuses(&a.host_id).len() > n);
    a.stop();
}

#[test]
fn terminate_mode_stops_every_engine_reports_none_then_powers_off() {
    let c = EdgeTestController::start("127.0.0.1:0", INIT).unwrap();
    let (_t, p) = node(&c.url(), false);
    let f = Arc::new(FakeRuntime::new());
    let power = Arc::new(RecordingPower::default());
    let a = RunningAgent::start(&c, &p, Some(f.clone()), power.clone(), Duration::ZERO);
    queue_and_wait(
        &c,
        &a.host_id,
        json!({"launchContainer": [launch("L1", "task:1"), launch("L2", "task:1")]}),
        |s| s["numContainers"] == 2,
    );
    assert_eq!(*power.requests.lock().unwrap(), 0);
    admin(&c, &a.host_id, "terminate");
    let st = queue_and_wait(&c, &a.host_id, Value::Null, |s| {
        s["hostMode"] == "terminate"
    });
    assert_eq!(st["numContainers"], 0);
    assert!(f.containers().is_empty());
    // Powered off once the controller has the report with none running.
    queue_and_wait(&c, &a.host_id, Value::Null, |_| true);
    queue_and_wait(&c, &a.host_id, Value::Null, |_| true);
    assert_eq!(*power.requests.lock().unwrap(), 1);
    a.stop();
}

#[test]
fn background_pulls_never_block_status_reports() {
    let c = EdgeTestController::start("127.0.0.1:0", INIT).unwrap();
    let (_t, p) = node(&c.url(), false);
    let (a, f) = fake_agent(&c, &p);
    f.set_pull_delay(Duration::from_millis(2500));
    f.fail_pulls_of("bad/image:1");
    let before = c.statuses(&a.host_id).len();
    queue_and_wait(
        &c,
        &a.host_id,
        json!({"pullDockerImages": [{"dockerImage": "good/image:1", "engineID": "e", "buildID": "b"}, {"dockerImage": "bad/image:1"}]}),
        |s| s["pullsInProgress"] == 2,
    );
    // Reports go on while both pulls take 2.5 s each.
    let during = c.wait_for(Duration::from_millis(2000), |h| {
        h[0].statuses.len() >= before + 6
    });
    assert!(during, "status reports stalled during the pulls");
    assert!(f.pulled().is_empty(), "the pulls are still running");
    let st = queue_and_wait(&c, &a.host_id, Value::Null, |s| {
        s["actionErrors"].is_array()
    });
    assert!(
        st["actionErrors"].to_string().contains("bad/image:1"),
        "{st}"
    );
    assert_eq!(f.pulled().len(), 1);
    assert_eq!(f.pulled()[0].0, "good/image:1");
    a.stop();
}

#[test]
fn a_slow_launch_pull_never_blocks_reports_and_the_resent_launch_is_not_started_twice() {
    let c = EdgeTestController::start("127.0.0.1:0", INIT).unwrap();
    let (_t, p) = node(&c.url(), false);
    let (a, f) = fake_agent(&c, &p);
    f.set_pull_delay(Duration::from_millis(2500));
    let st = queue_and_wait(
        &c,
        &a.host_id,
        json!({"launchContainer": [launch("L-slow", "big/image:1")]}),
        |s| s["launchesInProgress"] == json!(["L-slow"]),
    );
    assert_eq!(st["numContainers"], 0);
    // The controller sends it again while it is still being pulled.
    let before = c.statuses(&a.host_id).len();
    assert!(c.queue_actions(
        &a.host_id,
        json!({"launchContainer": [launch("L-slow", "big/image:1")]})
    ));
    assert!(
        c.wait_for(Duration::from_millis(2000), |h| h[0].statuses.len()
            >= before + 5),
        "status reports stalled during the launch's pull"
    );
    let st = queue_and_wait(&c, &a.host_id, Value::Null, |s| s["numContainers"] == 1);
    assert_eq!(launch_ids(&st), ["L-slow"]);
    queue_and_wait(&c, &a.host_id, Value::Null, |_| true);
    assert_eq!(
        f.calls().iter().filter(|c| c.starts_with("pull")).count(),
        1,
        "{:?}",
        f.calls()
    );
    assert_eq!(f.by_launch("L-slow").len(), 1);
    a.stop();
}

#[test]
fn autoremove_engines_false_keeps_exited_containers_and_they_are_not_counted() {
    let c = EdgeTestController::start("127.0.0.1:0", INIT).unwrap();
    let (_t, p) = node_with(&c.url(), false, "  autoremove_engines: false\n");
    let (a, f) = fake_agent(&c, &p);
    queue_and_wait(
        &c,
        &a.host_id,
        json!({"launchContainer": [launch("L1", "task:1")]}),
        |s| s["numContainers"] == 1,
    );
    let c1 = f.by_launch("L1").remove(0);
    assert!(!c1.spec.auto_remove);
    f.exit(&c1.id);
    queue_and_wait(&c, &a.host_id, Value::Null, |s| s["numContainers"] == 0);
    assert_eq!(f.by_launch("L1")[0].state, "exited", "kept by Docker");
    // Still there: the same launch is not started again.
    queue_and_wait(
        &c,
        &a.host_id,
        json!({"launchContainer": [launch("L1", "task:1")]}),
        |_| true,
    );
    queue_and_wait(&c, &a.host_id, Value::Null, |_| true);
    assert_eq!(
        f.calls().iter().filter(|c| c.starts_with("create")).count(),
        1
    );
    a.stop();
}

#[test]
fn a_mount_in_a_later_host_action_is_applied() {
    let c = EdgeTestController::start("127.0.0.1:0", INIT).unwrap();
    let (_t, p) = node(&c.url(), false);
    let (a, _f) = fake_agent(&c, &p);
    let mount = json!({"mountType": "nfs", "ips": ["10.9.8.7"], "server_path": "/export/cache1",
        "local_path": "/cache/1", "options": "nfsvers=4.1", "cache_number": 1, "priority": 20});
    queue_and_wait(&c, &a.host_id, json!({"mount": [mount]}), |_| true);
    queue_and_wait(&c, &a.host_id, Value::Null, |_| true);
    let st: Value = serde_json::from_slice(&std::fs::read(p.status_file()).unwrap()).unwrap();
    let mounts = st["join"]["mounts"].to_string();
    assert!(
        mounts.contains("10.9.8.7:/export/cache1 on /cache/1"),
        "{mounts}"
    );
    a.stop();
}
