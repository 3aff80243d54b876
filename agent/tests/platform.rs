//! Platform metadata (issue 13, part 1): each datasource against the metadata
//! service TEST DOUBLES the QEMU tests use, and the boot pipeline in a tempdir
//! root: the platform's hostname is what the node registers as, its SSH keys
//! are installed, instance facts reach the controller, the same instance
//! re-applies them without launch data and a new one replaces them.

use aiw_agent::agent::{Agent, AgentConfig, Outcome};
use aiw_agent::datasource::*;
use aiw_agent::paths::Paths;
use aiw_agent::systemd::RecordingUnits;
use qemu_tests::cloud_doubles::{
    Cloud, InstanceFacts, MetadataDouble, DOUBLE_SSH_KEY, EC2_INSTANCE_ID, GCE_PROJECT_SSH_KEY,
};
use qemu_tests::edge_controller::EdgeTestController;
use std::time::{Duration, Instant};

const INIT: &str = "0b5e3c1a-7d2f-4c6e-9a8b-1f2e3d4c5b6a";
const KEY_A: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMetaDataKeyA meta@a";
const KEY_B: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMetaDataKeyB meta@b";
const USER_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIUserDataKey user@laptop";

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

#[test]
fn ec2_meta_data_from_the_double() {
    let d = MetadataDouble::start(Cloud::Ec2, Some(b"AIWARE_MODE=engine\n")).unwrap();
    let p = Ec2Source::new(&d.url()).fetch(soon()).unwrap().platform;
    assert_eq!(p.hostname.as_deref(), Some("ip-172-31-5-10.ec2.internal"));
    assert_eq!(p.ssh_keys, [DOUBLE_SSH_KEY]);
    assert_eq!(p.instance_type.as_deref(), Some("m5.xlarge"));
    assert_eq!(p.region.as_deref(), Some("us-east-1"));
    assert_eq!(p.zone.as_deref(), Some("us-east-1a"));
    assert_eq!(p.private_ips, ["172.31.5.10"]);
    assert_eq!(p.public_ips, ["54.80.1.2"]);
    // No key pair and no public address: 404s, which are none, not errors.
    d.set_instance_facts(InstanceFacts {
        ssh_keys: vec![],
        public_ip: None,
        ..InstanceFacts::of(Cloud::Ec2)
    });
    let ld = Ec2Source::new(&d.url()).fetch(soon()).unwrap();
    assert_eq!(ld.instance_id.as_deref(), Some(EC2_INSTANCE_ID));
    assert!(ld.platform.ssh_keys.is_empty());
    assert!(ld.platform.public_ips.is_empty());
    assert!(
        d.seen().iter().all(|s| s.credential || s.method == "PUT"),
        "every GET carried the token:\n{}",
        d.log()
    );
}

#[test]
fn gce_instance_and_project_attributes_from_the_double() {
    let d = MetadataDouble::start(Cloud::Gce, Some(b"AIWARE_MODE=engine\n")).unwrap();
    let p = GceSource::new(&d.url()).fetch(soon()).unwrap().platform;
    assert_eq!(
        p.hostname.as_deref(),
        Some("gce-engine.us-central1-a.c.aiwimg-test.internal")
    );
    // `aiware:` user parts dropped; the instance's key, then the project's.
    assert_eq!(p.ssh_keys, [DOUBLE_SSH_KEY, GCE_PROJECT_SSH_KEY]);
    assert_eq!(p.instance_type.as_deref(), Some("n2-standard-4"));
    assert_eq!(p.zone.as_deref(), Some("us-central1-a"));
    assert_eq!(p.region.as_deref(), Some("us-central1"));
    assert_eq!(p.private_ips, ["10.128.0.7"]);
    assert_eq!(p.public_ips, ["34.66.1.2"]);
    // A name past the kernel's 64 characters: its first label.
    d.set_instance_facts(InstanceFacts {
        hostname:
            "a-rather-long-instance-name-for-gce.europe-west4-b.c.some-long-project-id.internal"
                .into(),
        ..InstanceFacts::of(Cloud::Gce)
    });
    let p = GceSource::new(&d.url()).fetch(soon()).unwrap().platform;
    assert_eq!(
        p.hostname.as_deref(),
        Some("a-rather-long-instance-name-for-gce")
    );
}

#[test]
fn azure_instance_document_from_the_double() {
    let d = MetadataDouble::start(Cloud::Azure, Some(b"AIWARE_MODE=engine\n")).unwrap();
    let ld = AzureSource::new(&d.url()).fetch(soon()).unwrap();
    assert_eq!(ld.user_data.as_deref(), Some(&b"AIWARE_MODE=engine\n"[..]));
    let p = ld.platform;
    assert_eq!(p.hostname.as_deref(), Some("azure-engine"));
    assert_eq!(p.ssh_keys, [DOUBLE_SSH_KEY]);
    assert_eq!(p.instance_type.as_deref(), Some("Standard_D4s_v5"));
    assert_eq!(p.region.as_deref(), Some("westeurope"));
    assert_eq!(p.zone.as_deref(), Some("1"));
    assert_eq!(p.private_ips, ["10.1.0.4"]);
    assert_eq!(p.public_ips, ["20.50.1.2"]);
}

#[test]
fn an_imds_without_the_instance_document_still_gives_user_data_at_once() {
    // An IMDS that answers only vmId and userData: no waiting out the deadline.
    let d = common_double(|p| {
        if p.starts_with("/metadata/instance/compute/vmId") {
            (200, b"vm-1".to_vec())
        } else if p.starts_with("/metadata/instance/compute/userData") {
            (200, b"QUlXQVJFX01PREU9ZW5naW5lCg==".to_vec())
        } else {
            (404, vec![])
        }
    });
    let t = Instant::now();
    let ld = AzureSource::new(&d).fetch(soon()).unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(ld.platform, PlatformMeta::default());
}

/// A one-answer-per-path HTTP server on 127.0.0.1 (the doubles above fix
/// their paths; this one leaves some out).
fn common_double(answer: fn(&str) -> (u16, Vec<u8>)) -> String {
    use std::io::{BufRead, BufReader, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let mut line = String::new();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let _ = r.read_line(&mut line);
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                    break;
                }
            }
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let (code, body) = answer(&path);
            let _ = write!(
                s,
                "HTTP/1.1 {code} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(&body);
        }
    });
    url
}

#[test]
fn vmware_guestinfo_metadata_gives_instance_id_hostname_and_keys() {
    let t = tempfile::tempdir().unwrap();
    let tool = t.path().join("vmware-rpctool-double");
    // guestinfo.metadata as base64 of NoCloud-style YAML, as govc users set it.
    use base64::Engine;
    let meta = base64::engine::general_purpose::STANDARD.encode(format!(
        "instance-id: vm-guestinfo-1\nlocal-hostname: vsphere-engine\npublic-keys:\n  - {KEY_A}\n"
    ));
    std::fs::write(
        &tool,
        format!(
            "#!/bin/sh\ncase \"$1\" in\n\
             'info-get guestinfo.userdata') echo AIWARE_MODE=engine;;\n\
             'info-get guestinfo.metadata') echo {meta};;\n\
             'info-get guestinfo.metadata.encoding') echo base64;;\n\
             *) echo 'No value found'; exit 1;;\nesac\n"
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
    let ld = VmwareSource::new(tool.to_str().unwrap())
        .fetch(soon())
        .unwrap();
    assert_eq!(ld.user_data.as_deref(), Some(&b"AIWARE_MODE=engine"[..]));
    assert_eq!(ld.instance_id.as_deref(), Some("vm-guestinfo-1"));
    assert_eq!(ld.platform.hostname.as_deref(), Some("vsphere-engine"));
    assert_eq!(ld.platform.ssh_keys, [KEY_A]);
}

fn node_root() -> (tempfile::TempDir, Paths) {
    let t = tempfile::tempdir().unwrap();
    let p = Paths::new(t.path());
    std::fs::create_dir_all(p.modes_toml().parent().unwrap()).unwrap();
    std::fs::copy(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/modes.toml"),
        p.modes_toml(),
    )
    .unwrap();
    let image = serde_json::json!({"profile": "engine", "version": "9.9.9", "modes": ["engine"],
        "profiles": {"engine": ["engine"]}, "gpu": false});
    std::fs::write(p.image_json(), image.to_string()).unwrap();
    std::fs::create_dir_all(p.proc_sys().join("vm")).unwrap();
    (t, p)
}

fn cfg(p: &Paths, endpoints: Endpoints) -> AgentConfig {
    AgentConfig {
        paths: p.clone(),
        endpoints,
        datasource_deadline: Duration::from_secs(5),
        join_deadline: Some(Duration::from_secs(20)),
        join_backoff_max: Duration::from_millis(300),
        metrics_addr: None,
        real_system: false,
        heartbeat_override: Some(Duration::from_millis(50)),
        stop_after_heartbeats: Some(1),
    }
}

/// Engine user-data without a hostname, as most users write it.
fn engine(controller: &str, extra: &str) -> String {
    format!("#cloud-config\n{extra}aiware:\n  mode: engine\n  controller: {controller}\n  init_token: {INIT}\n  license: lic-0123456789\n")
}

fn seed(p: &Paths, user_data: &str, meta_data: &str) {
    let dir = p.by_label().join("cidata");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("user-data"), user_data).unwrap();
    std::fs::write(dir.join("meta-data"), meta_data).unwrap();
}

fn authorized_keys(p: &Paths) -> String {
    std::fs::read_to_string(p.ssh_root_dir().join("authorized_keys")).unwrap()
}

/// A reboot: /run is a tmpfs.
fn reboot(p: &Paths) {
    std::fs::remove_dir_all(p.run_dir()).unwrap();
}

fn run(p: &Paths, endpoints: Endpoints) -> Outcome {
    let units = RecordingUnits::default();
    Agent::new(cfg(p, endpoints), &units).run()
}

#[test]
fn nocloud_meta_data_hostname_and_keys_kept_per_instance() {
    let c = EdgeTestController::start("127.0.0.1:0", INIT).unwrap();
    let (_t, p) = node_root();
    seed(
        &p,
        &engine(&c.url(), &format!("ssh_authorized_keys:\n  - {USER_KEY}\n")),
        &format!("instance-id: iid-a\nlocal-hostname: ceo-engine\npublic-keys:\n  - {KEY_A}\n"),
    );
    assert_eq!(run(&p, Endpoints::default()), Outcome::Ready);
    let hosts = c.hosts();
    assert_eq!(hosts.len(), 1);
    assert_eq!(hosts[0].register_request["info"]["hostname"], "ceo-engine");
    assert_eq!(
        std::fs::read_to_string(p.run_dir().join("hostname")).unwrap(),
        "ceo-engine\n"
    );
    assert_eq!(authorized_keys(&p), format!("{USER_KEY}\n{KEY_A}\n"));
    // NoCloud names no instance type: the image version stays.
    assert_eq!(hosts[0].register_request["info"]["serverTypeName"], "9.9.9");

    // Same instance, seed gone: the kept settings and metadata are re-applied.
    reboot(&p);
    std::fs::remove_dir_all(p.by_label()).unwrap();
    assert_eq!(run(&p, Endpoints::default()), Outcome::Ready);
    assert_eq!(
        std::fs::read_to_string(p.run_dir().join("hostname")).unwrap(),
        "ceo-engine\n"
    );
    assert_eq!(authorized_keys(&p), format!("{USER_KEY}\n{KEY_A}\n"));
    let hosts = c.hosts();
    assert_eq!(hosts.len(), 1, "the same host, registered again");
    assert_eq!(hosts[0].registrations, 2);
    assert_eq!(hosts[0].register_request["info"]["hostname"], "ceo-engine");

    // A new instance: its own name and keys, none of the old one's.
    reboot(&p);
    seed(
        &p,
        &engine(&c.url(), ""),
        &format!("instance-id: iid-b\nlocal-hostname: cfo-engine\npublic-keys: {KEY_B}\n"),
    );
    assert_eq!(run(&p, Endpoints::default()), Outcome::Ready);
    assert_eq!(authorized_keys(&p), format!("{KEY_B}\n"));
    assert!(c
        .hosts()
        .iter()
        .any(|h| h.register_request["info"]["hostname"] == "cfo-engine"));

    // user-data's hostname wins over meta-data's.
    reboot(&p);
    seed(
        &p,
        &engine(&c.url(), "hostname: chosen-by-user\n"),
        "instance-id: iid-c\nlocal-hostname: from-meta\n",
    );
    assert_eq!(run(&p, Endpoints::default()), Outcome::Ready);
    assert_eq!(
        std::fs::read_to_string(p.run_dir().join("hostname")).unwrap(),
        "chosen-by-user\n"
    );
}

#[test]
fn ec2_instance_facts_reach_the_controller_and_the_containers() {
    let c = EdgeTestController::start("127.0.0.1:0", INIT).unwrap();
    let (_t, p) = node_root();
    let ud = engine(&c.url(), "");
    let d = MetadataDouble::start(Cloud::Ec2, Some(ud.as_bytes())).unwrap();
    d.set_ssh_keys(&[KEY_A]);
    std::fs::create_dir_all(p.dmi("x").parent().unwrap()).unwrap();
    std::fs::write(p.dmi("sys_vendor"), "Amazon EC2\n").unwrap();
    let endpoints = Endpoints {
        ec2: d.url(),
        ..Endpoints::default()
    };
    assert_eq!(run(&p, endpoints.clone()), Outcome::Ready);
    let hosts = c.hosts();
    assert_eq!(hosts.len(), 1);
    let info = &hosts[0].register_request["info"];
    assert_eq!(info["hostname"], "ip-172-31-5-10.ec2.internal");
    assert_eq!(info["serverTypeName"], "m5.xlarge");
    assert_eq!(info["cloudProviderInstanceID"], EC2_INSTANCE_ID);
    let ips: Vec<&str> = info["ips"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    // After the interfaces' own addresses: neither is on an interface here.
    assert!(ips.ends_with(&["172.31.5.10", "54.80.1.2"]), "{ips:?}");
    assert_eq!(authorized_keys(&p), format!("{KEY_A}\n"));
    let env = std::fs::read_to_string(p.run_dir().join("aiware.env")).unwrap();
    assert!(
        env.contains("AIWARE_SERVER_TYPE=") && env.contains("m5.xlarge"),
        "{env}"
    );
    assert!(
        env.contains("AIWARE_REGION=") && env.contains("us-east-1"),
        "{env}"
    );

    // AIWARE_SERVER_TYPE given in user-data wins over the instance type.
    reboot(&p);
    std::fs::remove_dir_all(p.state_dir()).unwrap();
    let ud = engine(&c.url(), "").replace(
        "  mode: engine\n",
        "  mode: engine\n  server_type: gpu-pool\n",
    );
    d.set_user_data(Some(ud.as_bytes()));
    assert_eq!(run(&p, endpoints), Outcome::Ready);
    let last = c
        .hosts()
        .into_iter()
        .map(|h| h.register_request["info"]["serverTypeName"].clone())
        .collect::<Vec<_>>();
    assert!(last.contains(&serde_json::json!("gpu-pool")), "{last:?}");
}

#[test]
fn a_launch_without_user_data_still_gets_the_platform_hostname_and_key() {
    let (_t, p) = node_root();
    let d = MetadataDouble::start(Cloud::Ec2, None).unwrap();
    d.set_ssh_keys(&[KEY_A]);
    std::fs::create_dir_all(p.dmi("x").parent().unwrap()).unwrap();
    std::fs::write(p.dmi("sys_vendor"), "Amazon EC2\n").unwrap();
    let endpoints = Endpoints {
        ec2: d.url(),
        ..Endpoints::default()
    };
    assert_eq!(run(&p, endpoints.clone()), Outcome::NoUserData);
    assert_eq!(authorized_keys(&p), format!("{KEY_A}\n"));
    assert_eq!(
        std::fs::read_to_string(p.run_dir().join("hostname")).unwrap(),
        "ip-172-31-5-10.ec2.internal\n"
    );
    // Neither a hostname nor a key: nothing is written.
    let (_t2, p2) = node_root();
    std::fs::create_dir_all(p2.dmi("x").parent().unwrap()).unwrap();
    std::fs::write(p2.dmi("sys_vendor"), "Amazon EC2\n").unwrap();
    d.set_instance_facts(InstanceFacts {
        hostname: String::new(),
        ssh_keys: vec![],
        ..InstanceFacts::of(Cloud::Ec2)
    });
    assert_eq!(run(&p2, endpoints), Outcome::NoUserData);
    assert!(!p2.ssh_root_dir().join("authorized_keys").exists());
    assert!(!p2.run_dir().join("hostname").exists());
}

/// A node on Azure: DMI says so (the asset tag Azure gives every VM).
fn on_azure(p: &Paths) {
    std::fs::create_dir_all(p.dmi("x").parent().unwrap()).unwrap();
    std::fs::write(p.dmi("sys_vendor"), "Microsoft Corporation\n").unwrap();
    std::fs::write(
        p.dmi("chassis_asset_tag"),
        "7783-7084-3265-9085-8269-3286-77\n",
    )
    .unwrap();
}

#[test]
fn azure_is_told_the_vm_is_ready_whatever_the_user_data() {
    use qemu_tests::cloud_doubles::{
        WIRESERVER_CONTAINER_ID, WIRESERVER_INCARNATION, WIRESERVER_INSTANCE_ID,
    };
    let c = EdgeTestController::start("127.0.0.1:0", INIT).unwrap();
    let imds = MetadataDouble::start(Cloud::Azure, Some(engine(&c.url(), "").as_bytes())).unwrap();
    let wire = MetadataDouble::start(Cloud::AzureWireServer, None).unwrap();
    let endpoints = Endpoints {
        azure: imds.url(),
        azure_wireserver: wire.url(),
        ..Endpoints::default()
    };
    let (_t, p) = node_root();
    on_azure(&p);
    assert_eq!(run(&p, endpoints.clone()), Outcome::Ready);
    let reports = wire.health_reports();
    assert_eq!(reports.len(), 1, "{reports:?}\n{}", wire.log());
    for want in [
        format!("<GoalStateIncarnation>{WIRESERVER_INCARNATION}</GoalStateIncarnation>"),
        format!("<ContainerId>{WIRESERVER_CONTAINER_ID}</ContainerId>"),
        format!("<InstanceId>{WIRESERVER_INSTANCE_ID}</InstanceId>"),
        "<State>Ready</State>".to_string(),
    ] {
        assert!(reports[0].contains(&want), "{want} not in {}", reports[0]);
    }
    assert!(
        wire.seen().iter().all(|s| s.credential && s.status == 200),
        "every wireserver request carried x-ms-version:\n{}",
        wire.log()
    );
    let status: aiw_agent::status::Status =
        serde_json::from_slice(&std::fs::read(p.status_file()).unwrap()).unwrap();
    let said = status.platform_checkin.clone().unwrap_or_default();
    assert!(said.contains("reported Ready"), "{said}");
    assert!(status.human().contains("platform:   reported Ready"));

    // Launched without user-data: provisioned all the same, so reported.
    let bare = MetadataDouble::start(Cloud::Azure, None).unwrap();
    let (_t2, p2) = node_root();
    on_azure(&p2);
    let endpoints = Endpoints {
        azure: bare.url(),
        ..endpoints
    };
    assert_eq!(run(&p2, endpoints), Outcome::NoUserData);
    assert_eq!(wire.health_reports().len(), 2, "{}", wire.log());
}

#[test]
fn an_ec2_spot_interruption_or_a_near_scheduled_event_drains_the_node() {
    let c = EdgeTestController::start("127.0.0.1:0", INIT).unwrap();
    let ud = engine(&c.url(), "");
    let d = MetadataDouble::start(Cloud::Ec2, Some(ud.as_bytes())).unwrap();
    let endpoints = Endpoints {
        ec2: d.url(),
        ..Endpoints::default()
    };
    let on_ec2 = |p: &Paths| {
        std::fs::create_dir_all(p.dmi("x").parent().unwrap()).unwrap();
        std::fs::write(p.dmi("sys_vendor"), "Amazon EC2\n").unwrap();
    };
    let last_drain = |c: &EdgeTestController| {
        let h = c.hosts();
        h.last().unwrap().statuses.last().unwrap()["drain"].clone()
    };
    // Nothing announced: not draining.
    let (_t, p) = node_root();
    on_ec2(&p);
    assert_eq!(run(&p, endpoints.clone()), Outcome::Ready);
    assert_eq!(last_drain(&c), false);
    // A spot interruption notice: the next report says drain.
    d.set_spot_interruption(Some(
        r#"{"action": "terminate", "time": "2026-12-04T15:30:00Z"}"#,
    ));
    reboot(&p);
    assert_eq!(run(&p, endpoints.clone()), Outcome::Ready);
    assert_eq!(last_drain(&c), true);
    let st: aiw_agent::status::Status =
        serde_json::from_slice(&std::fs::read(p.status_file()).unwrap()).unwrap();
    assert_eq!(
        st.actions.host_mode, "continue",
        "the controller's mode is kept"
    );
    // A scheduled reboot a week away: not yet; one starting now: drain.
    d.set_spot_interruption(None);
    let when = |unix: u64| {
        let out = std::process::Command::new("date")
            .env("LC_ALL", "C")
            .args(["-u", "-d", &format!("@{unix}"), "+%d %b %Y %H:%M:%S GMT"])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let now = aiw_agent::status::now_unix();
    let events = |at: u64| {
        format!(
            r#"[{{"Code": "system-reboot", "Description": "scheduled reboot", "State": "active", "NotBefore": "{}"}}]"#,
            when(at)
        )
    };
    d.set_scheduled_events(&events(now + 7 * 86400));
    reboot(&p);
    assert_eq!(run(&p, endpoints.clone()), Outcome::Ready);
    assert_eq!(last_drain(&c), false, "{}", events(now + 7 * 86400));
    d.set_scheduled_events(&events(now + 60));
    reboot(&p);
    assert_eq!(run(&p, endpoints), Outcome::Ready);
    assert_eq!(last_drain(&c), true);
}
