//! The whole boot pipeline against the Edge API test controller (a test double
//! from qemu-tests), in a tempdir root with a NoCloud seed directory.

use aiw_agent::agent::{Agent, AgentConfig, Outcome};
use aiw_agent::datasource::Endpoints;
use aiw_agent::paths::Paths;
use aiw_agent::systemd::RecordingUnits;
use qemu_tests::edge_controller::EdgeTestController;
use qemu_tests::tls_front::TlsFront;
use std::time::{Duration, Instant};

const INIT: &str = "6f1c1f4e-5d1e-4a55-9a0c-3b8f2d7e9a11";
const LICENSE: &str = "lic-super-secret-0123";

fn node(user_data: &str, gpu_image: bool) -> (tempfile::TempDir, Paths) {
    let t = tempfile::tempdir().unwrap();
    let p = Paths::new(t.path());
    std::fs::create_dir_all(p.modes_toml().parent().unwrap()).unwrap();
    std::fs::copy(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/modes.toml"),
        p.modes_toml(),
    )
    .unwrap();
    let image = serde_json::json!({"profile": if gpu_image {"engine-gpu"} else {"engine"}, "version": "test", "modes": ["engine", "registry", "prometheus"],
        "profiles": {"engine": ["engine"], "controller": ["controller", "db", "nfs"]}, "gpu": gpu_image});
    std::fs::write(p.image_json(), image.to_string()).unwrap();
    let seed = p.by_label().join("cidata");
    std::fs::create_dir_all(&seed).unwrap();
    std::fs::write(seed.join("user-data"), user_data).unwrap();
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
        metrics_addr: Some("127.0.0.1:0".parse().unwrap()),
        real_system: false,
        heartbeat_override: Some(Duration::from_millis(50)),
        stop_after_heartbeats: Some(2),
    }
}

fn engine_user_data(url: &str) -> String {
    format!("#cloud-config\nhostname: eng-1\naiware:\n  mode: [engine, prometheus]\n  controller: {url}\n  init_token: {INIT}\n  license: {LICENSE}\n")
}

#[test]
fn normal_join_reports_modes_and_status_and_keeps_secrets_out() {
    let c = EdgeTestController::start("127.0.0.1:0", INIT).unwrap();
    let (_t, p) = node(&engine_user_data(&c.url()), true);
    let units = RecordingUnits::default();
    let start = Instant::now();
    let agent = Agent::new(cfg(&p), &units);
    assert_eq!(agent.run(), Outcome::Ready);
    eprintln!(
        "start-to-joined (2 heartbeats) {} ms",
        start.elapsed().as_millis()
    );
    let hosts = c.hosts();
    assert_eq!(hosts.len(), 1);
    assert_eq!(hosts[0].run_modes(), ["engine", "prometheus"]);
    assert_eq!(hosts[0].register_request["info"]["numGPU"], 0);
    assert!(hosts[0].statuses.len() >= 2);
    let calls = units.calls.lock().unwrap().clone();
    assert!(
        calls.contains(&"start docker.service".to_string()),
        "{calls:?}"
    );
    assert!(
        calls.contains(&"stop postgresql.service".to_string()),
        "{calls:?}"
    );
    let st = agent.status.lock().unwrap().clone();
    assert_eq!(st.join.state, "joined");
    assert_eq!(st.join.host_id.as_deref(), Some(hosts[0].host_id.as_str()));
    assert_eq!(st.join.mounts.len(), 1);
    // File-SD targets for Prometheus from the controller's host list.
    let sd = std::fs::read_to_string(p.prometheus_sd_dir().join("aiware-hosts.json")).unwrap();
    assert!(sd.contains(":8000"), "{sd}");
    // Secrets: only in the 0600 files under /var/lib/aiware and /run/aiware/aiware.env.
    use std::os::unix::fs::PermissionsExt;
    for f in [
        p.settings_file(),
        p.join_file(),
        p.run_dir().join("aiware.env"),
    ] {
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600,
            "{}",
            f.display()
        );
    }
    let status = std::fs::read_to_string(p.status_file()).unwrap();
    let token = &hosts[0].host_token;
    for secret in [INIT, LICENSE, token.as_str()] {
        assert!(!status.contains(secret), "status.json leaks a secret");
    }
}

#[test]
fn controller_down_then_up_joins_when_it_comes_up() {
    let c = EdgeTestController::start("127.0.0.1:0", INIT).unwrap();
    c.set_down(true);
    let (_t, p) = node(&engine_user_data(&c.url()), false);
    let up = std::thread::spawn({
        let c = std::sync::Arc::new(c);
        let c2 = c.clone();
        move || {
            std::thread::sleep(Duration::from_millis(800));
            c2.set_down(false);
            c
        }
    });
    let units = RecordingUnits::default();
    assert_eq!(Agent::new(cfg(&p), &units).run(), Outcome::Ready);
    let c = up.join().unwrap();
    assert_eq!(c.hosts().len(), 1);
}

#[test]
fn restart_rejoins_as_the_same_host() {
    let c = EdgeTestController::start("127.0.0.1:0", INIT).unwrap();
    let (_t, p) = node(&engine_user_data(&c.url()), false);
    let units = RecordingUnits::default();
    assert_eq!(Agent::new(cfg(&p), &units).run(), Outcome::Ready);
    // Second boot: the seed is gone; the persisted settings and hostID are used.
    std::fs::remove_dir_all(p.by_label()).unwrap();
    assert_eq!(Agent::new(cfg(&p), &units).run(), Outcome::Ready);
    let hosts = c.hosts();
    assert_eq!(hosts.len(), 1, "a restart must not register a new host");
    assert_eq!(hosts[0].registrations, 2);
}

/// An Edge API behind https whose certificate comes from a private CA
/// (TlsFront, a test double, in front of the test controller).
#[test]
fn https_controller_with_a_private_ca_joins_and_without_it_names_the_setting() {
    let c = EdgeTestController::start("127.0.0.1:0", INIT).unwrap();
    let front = TlsFront::start(c.addr(), &["127.0.0.1"]).unwrap();
    let url = format!("https://127.0.0.1:{}/edge/v1", front.addr().port());
    let units = RecordingUnits::default();

    let ca: String = front
        .ca_pem()
        .lines()
        .map(|l| format!("    {l}\n"))
        .collect();
    let with_ca = format!("{}  controller_ca: |\n{ca}", engine_user_data(&url));
    let (_t, p) = node(&with_ca, false);
    assert_eq!(Agent::new(cfg(&p), &units).run(), Outcome::Ready);
    let hosts = c.hosts();
    assert_eq!(hosts.len(), 1);
    assert!(hosts[0].statuses.len() >= 2, "status reports over TLS too");

    // The same controller without its CA: refused, and the message says how to fix it.
    let (_t2, p2) = node(&engine_user_data(&url), false);
    let mut short = cfg(&p2);
    short.join_deadline = Some(Duration::from_secs(2));
    match Agent::new(short, &units).run() {
        Outcome::JoinFailed(m) => assert!(
            m.contains("UnknownIssuer") && m.contains("AIWARE_CONTROLLER_CA"),
            "{m}"
        ),
        o => panic!("{o:?}"),
    }
    assert_eq!(c.hosts().len(), 1, "nothing registered without trust");
}

#[test]
fn controller_401_gives_a_clear_error() {
    let c = EdgeTestController::start("127.0.0.1:0", INIT).unwrap();
    c.set_unauthorized(true);
    let (_t, p) = node(&engine_user_data(&c.url()), false);
    let units = RecordingUnits::default();
    match Agent::new(cfg(&p), &units).run() {
        Outcome::JoinFailed(m) => {
            assert!(m.contains("401") && m.contains("AIWARE_INIT_TOKEN"), "{m}")
        }
        o => panic!("{o:?}"),
    }
}

#[test]
fn invalid_settings_stop_role_services_and_say_why() {
    let (_t, p) = node("AIWARE_MODE=engine\nAIWARE_LICENSE=x1234\n", false);
    let units = RecordingUnits::default();
    match Agent::new(cfg(&p), &units).run() {
        Outcome::Invalid(m) => assert!(m.contains("AIWARE_CONTROLLER"), "{m}"),
        o => panic!("{o:?}"),
    }
    let calls = units.calls.lock().unwrap().clone();
    assert!(calls.iter().all(|c| c.starts_with("stop ")), "{calls:?}");
    let st: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p.status_file()).unwrap()).unwrap();
    assert_eq!(st["phase"], "invalid-settings");
}

#[test]
fn no_user_data_runs_with_no_modes() {
    let (_t, p) = node("", false);
    std::fs::remove_dir_all(p.by_label()).unwrap();
    let units = RecordingUnits::default();
    assert_eq!(Agent::new(cfg(&p), &units).run(), Outcome::NoUserData);
}

#[test]
fn invalid_settings_still_install_ssh_keys() {
    let ud = "#cloud-config\nssh_authorized_keys:\n  - ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTheTest test@host\naiware:\n  mode: [engine]\n  license: x1234\n";
    let (_t, p) = node(ud, false);
    let units = RecordingUnits::default();
    assert!(matches!(
        Agent::new(cfg(&p), &units).run(),
        Outcome::Invalid(_)
    ));
    let keys = std::fs::read_to_string(p.ssh_root_dir().join("authorized_keys")).unwrap();
    assert!(keys.contains("FakeKeyForTheTest"), "{keys}");
}

#[test]
fn controller_url_with_credentials_is_refused_and_never_printed() {
    const URL_PASSWORD: &str = "url-pa55word-9876";
    let (_t, p) = node(
        &engine_user_data(&format!(
            "https://aiw-admin:{URL_PASSWORD}@127.0.0.1:9/edge/v1"
        )),
        false,
    );
    let units = RecordingUnits::default();
    let agent = Agent::new(cfg(&p), &units);
    let outcome = agent.run();
    let Outcome::Invalid(first) = &outcome else {
        panic!("{outcome:?}");
    };
    let status = std::fs::read_to_string(p.status_file()).unwrap();
    assert!(
        status.contains("user name or password"),
        "the refusal says why: {status}"
    );
    for text in [first.as_str(), status.as_str()] {
        for secret in [URL_PASSWORD, INIT, LICENSE, "aiw-admin:"] {
            assert!(!text.contains(secret), "leaks {secret}: {text}");
        }
    }
    assert!(
        !aiw_agent::log::scrub(&format!("x https://u:{URL_PASSWORD}@h/ y")).contains(URL_PASSWORD),
        "logs would show the URL's password"
    );
}

/// An image with /var sealed to the TPM (overlays/var-tpm2) that the TPM did
/// not unseal: aiw-var-unsealed.service wrote why; valid launch data and a
/// reachable controller change nothing: no mode, no join, the reason in the
/// status.
#[test]
fn a_var_the_tpm_did_not_unseal_stops_the_node_before_launch_data() {
    let c = EdgeTestController::start("127.0.0.1:0", INIT).unwrap();
    let (_t, p) = node(&engine_user_data(&c.url()), false);
    std::fs::create_dir_all(p.run_dir()).unwrap();
    std::fs::write(
        p.var_encryption_error(),
        "this machine has no TPM2; this image keeps /var encrypted\n",
    )
    .unwrap();
    let units = RecordingUnits::default();
    let outcome = Agent::new(cfg(&p), &units).run();
    let Outcome::NoPersistentStorage(msg) = &outcome else {
        panic!("{outcome:?}");
    };
    assert!(msg.contains("no TPM2"), "{msg}");
    let st: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p.status_file()).unwrap()).unwrap();
    assert_eq!(st["phase"], "no-persistent-storage");
    assert_eq!(st["join"]["state"], "not-configured");
    assert!(
        st["last_error"]
            .as_str()
            .unwrap()
            .contains("/var is not available"),
        "{st}"
    );
    assert!(c.hosts().is_empty(), "joined: {:?}", c.hosts());
    assert!(!p.settings_file().exists(), "launch data was applied");
}
