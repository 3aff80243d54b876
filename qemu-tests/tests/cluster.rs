//! Issue 8: a three-node cluster in QEMU. A controller VM (the `controller`
//! profile plus, through an overlay as a user would add one, the Edge API test
//! controller on 9000) and two engine VMs on one private LAN of QEMU socket
//! netdevs on 127.0.0.1 (`LoopbackLan`), static addresses from user-data
//! (`write_files` of a systemd-networkd file), each VM keeping its restricted
//! user net for SSH from the host.
//!
//! Checks: engines started before the controller wait, then join; `GET /hosts`
//! lists every node with modes, CPUs, memory and GPUs; `/cache` is the
//! controller's NFS export on every engine; an engine pulls from the
//! controller's registry on 5000 and runs the image; Prometheus on the
//! controller scrapes every node's agent (8000) and node exporter (9100); the
//! controller reboots and engines keep their hostIDs, report again and get
//! `/cache` back. Prints the time from launch to a joined three-node cluster.
//!
//! Run: `cargo test -p qemu-tests --test cluster -- --nocapture` (three TCG
//! VMs at once: budget 25 minutes).

use anyhow::{bail, ensure, Context, Result};
use qemu_tests::checks::{agent_status, mount_at, parse_prometheus_targets};
use qemu_tests::deadline::Deadline;
use qemu_tests::docker_archive::{hello_image_archive, HELLO_LINE, HELLO_TAG};
use qemu_tests::netdev::{LoopbackLan, SocketNic};
use qemu_tests::node::{TEST_INIT_TOKEN, TEST_LICENSE};
use qemu_tests::test_images::{
    build_agent, builder_command, image_for, load, qemu_tests_root, workspace_root, TestImage,
};
use qemu_tests::{TestCase, UserData, Vm};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const BUDGET: Duration = Duration::from_secs(25 * 60);
const MEMORY_MIB: u32 = 1536;
/// One vCPU per VM: three TCG VMs share two host cores, and a boot is mostly
/// one chain of work (two one-vCPU boots side by side: 98 s for both, against
/// 65 s each one after the other with two vCPUs).
const CPUS: u32 = 1;
/// The cluster LAN: controller .10, engines .11 and .12.
const LAN_PREFIX: &str = "192.168.76";
const CONTROLLER_IP: &str = "192.168.76.10";
const CONTROLLER_MODES: &str = "controller,db,nfs,prometheus,registry";
/// The profile the test adds to a copy of the project.
const PROFILE: &str = "controller-edge";
const TOKEN_FILE: &str = "/run/edge-test-controller/init-token";
const ENV_FILE: &str = "/run/edge-test-controller/env";

fn controller_url() -> String {
    format!("http://{CONTROLLER_IP}:9000/edge/v1")
}

/// The unit of the overlay: the test controller started after the agent has
/// written its token file and settings (user-data `write_files`), its host list
/// kept on /var as the real controller keeps it in its database.
const UNIT: &str = "\
[Unit]
Description=Edge API test controller on 9000 (TEST DOUBLE of the aiWARE controller; aiwimg tests)
After=aiw-agent.service
ConditionPathExists=/run/edge-test-controller/init-token

[Service]
EnvironmentFile=/run/edge-test-controller/env
ExecStart=/usr/bin/edge-test-controller --listen 0.0.0.0:9000 --init-token-file /run/edge-test-controller/init-token --nfs-server ${NFS_SERVER} --nfs-path /opt/aiware/nfs --state-file /var/lib/edge-test-controller/hosts.json
StateDirectory=edge-test-controller
Restart=on-failure
RestartSec=2

[Install]
WantedBy=multi-user.target
";

/// The static (musl) edge-test-controller of this workspace, built if needed.
fn build_edge_test_controller() -> Result<PathBuf> {
    let root = workspace_root();
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(&root)
        .args(["build", "--quiet", "--release", "-p", "qemu-tests"])
        .args(["--bin", "edge-test-controller"])
        .args(["--target", "x86_64-unknown-linux-musl"])
        .status()
        .context("running cargo build for edge-test-controller")?;
    ensure!(
        status.success(),
        "cargo build edge-test-controller failed ({status})"
    );
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let bin = target.join("x86_64-unknown-linux-musl/release/edge-test-controller");
    ensure!(bin.is_file(), "{} was not built", bin.display());
    Ok(bin)
}

fn run(what: &str, cmd: &mut Command) -> Result<()> {
    let st = cmd
        .status()
        .with_context(|| format!("{what}: cannot run {cmd:?}"))?;
    ensure!(st.success(), "{what} failed ({st}): {cmd:?}");
    Ok(())
}

/// A copy of the project with profile `controller-edge` (the controller plus
/// the overlay `edge-test-controller`: the binary and its unit), as a user adds
/// their own software to an image.
fn project_with_edge_overlay(dest: &Path, bin: &Path) -> Result<PathBuf> {
    let ws = workspace_root();
    let _ = std::fs::remove_dir_all(dest);
    std::fs::create_dir_all(dest.join("agent"))?;
    for (from, to) in [
        ("images", "images"),
        ("overlays", "overlays"),
        ("agent/units", "agent/units"),
    ] {
        run(
            "copying the project",
            Command::new("cp")
                .arg("-a")
                .arg(ws.join(from))
                .arg(dest.join(to)),
        )?;
    }
    std::fs::write(
        dest.join("images").join(format!("{PROFILE}.toml")),
        "# The controller node plus the Edge API test controller (aiwimg tests).\n\
         description = \"Controller node + Edge API test controller (TEST DOUBLE) on 9000\"\n\
         extends = [\"controller\"]\n\
         overlays = [\"edge-test-controller\"]\n",
    )?;
    let overlay = dest.join("overlays/edge-test-controller");
    std::fs::create_dir_all(overlay.join("usr/bin"))?;
    std::fs::create_dir_all(overlay.join("usr/lib/systemd/system"))?;
    let to = overlay.join("usr/bin/edge-test-controller");
    std::fs::copy(bin, &to)?;
    run("chmod", Command::new("chmod").arg("0755").arg(&to))?;
    std::fs::write(
        overlay.join("usr/lib/systemd/system/edge-test-controller.service"),
        UNIT,
    )?;
    Ok(dest.to_path_buf())
}

/// The `controller-edge` image: `$AIWIMG_TEST_IMAGES/controller-edge/` when
/// set, else built by the builder from the project copy (cached by content).
fn controller_edge_image() -> Result<TestImage> {
    if std::env::var_os("AIWIMG_TEST_IMAGES").is_some() {
        return image_for(PROFILE);
    }
    let out_dir = qemu_tests_root().join("images");
    std::fs::create_dir_all(&out_dir)?;
    let lock = std::fs::File::create(out_dir.join(format!(".{PROFILE}.lock")))?;
    lock.lock()?;
    let bin = build_edge_test_controller()?;
    let project =
        project_with_edge_overlay(&qemu_tests_root().join("controller-edge-project"), &bin)?;
    let agent = build_agent()?;
    let mut cmd = builder_command(PROFILE, &out_dir);
    cmd.arg("--project")
        .arg(&project)
        .arg("--agent-bin")
        .arg(agent);
    eprintln!("qemu-tests: building image {PROFILE:?}: {cmd:?}");
    let started = Instant::now();
    run("building the controller-edge image", &mut cmd)?;
    eprintln!(
        "qemu-tests: image {PROFILE:?} ready in {:.0?}",
        started.elapsed()
    );
    load(&out_dir.join(PROFILE))
}

fn file_yaml(path: &str, content: &str, perms: &str) -> String {
    format!(
        "  - path: {path}\n    permissions: \"{perms}\"\n    content: {}\n",
        serde_json::to_string(content).unwrap()
    )
}

/// systemd-networkd file for the LAN NIC (matched by MAC): a static address,
/// no gateway (the LAN has no way out).
fn lan_network(nic: &SocketNic, ip: &str) -> String {
    format!(
        "[Match]\nMACAddress={}\n\n[Network]\nAddress={ip}/24\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n",
        nic.mac()
    )
}

/// User-data of a cluster node: modes, the controller on the LAN, the LAN address.
fn node_user_data(name: &str, modes: &str, nic: &SocketNic, ip: &str, extra: &str) -> UserData {
    UserData::cloud_config()
        .hostname(name)
        .setting("AIWARE_MODE", modes)
        .setting("AIWARE_LICENSE", TEST_LICENSE)
        .setting("AIWARE_CONTROLLER", &controller_url())
        .setting("AIWARE_INIT_TOKEN", TEST_INIT_TOKEN)
        .setting("AIWARE_AGENT_UPDATE_INTERVAL", "10")
        .raw_yaml(&format!(
            "write_files:\n{}{extra}",
            file_yaml(
                "/run/systemd/network/10-cluster-lan.network",
                &lan_network(nic, ip),
                "0644"
            )
        ))
}

/// `GET /edge/v1/hosts` from the host through the controller VM's forward of 9000.
fn hosts(port: u16) -> Result<Vec<Value>> {
    let body = http(port, "/edge/v1/hosts", Some(TEST_INIT_TOKEN))?;
    let v: Value = serde_json::from_str(&body).context("GET /hosts is not JSON")?;
    Ok(v["result"].as_array().cloned().unwrap_or_default())
}

fn http(port: u16, path: &str, token: Option<&str>) -> Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n"
    )?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    ensure!(
        head.starts_with("HTTP/1.") && head.split_whitespace().nth(1) == Some("200"),
        "GET {path}: {head}"
    );
    Ok(body.to_string())
}

fn host_ip(h: &Value) -> String {
    h["ips"][0].as_str().unwrap_or_default().to_string()
}

fn host_by_ip<'a>(hosts: &'a [Value], ip: &str) -> Option<&'a Value> {
    hosts.iter().find(|h| host_ip(h) == ip)
}

/// `aiw-agent status`'s join state and hostID on a node.
fn join_of(vm: &Vm, dl: &Deadline) -> Result<(String, String, u64)> {
    let s = agent_status(vm, dl)?;
    Ok((
        s["join"]["state"].as_str().unwrap_or_default().to_string(),
        s["join"]["host_id"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        s["join"]["heartbeats"].as_u64().unwrap_or(0),
    ))
}

/// Checks `/cache` on an engine is the controller's export.
fn check_cache_mount(vm: &Vm, dl: &Deadline) -> Result<()> {
    let m = mount_at(vm, "/cache", dl)?;
    ensure!(
        m.fstype.starts_with("nfs") && m.source == format!("{CONTROLLER_IP}:/opt/aiware/nfs"),
        "{}: /cache is {m:?}, not the controller's NFS export",
        vm.name()
    );
    Ok(())
}

/// Prometheus targets on the controller: (job, instance, health).
fn prometheus_targets(port: u16) -> Result<Vec<(String, String, String)>> {
    parse_prometheus_targets(&http(port, "/api/v1/targets", None)?)
}

#[test]
fn three_node_cluster() {
    let controller_image =
        controller_edge_image().unwrap_or_else(|e| panic!("no {PROFILE:?} image to boot: {e:#}"));
    let engine_image =
        image_for("engine").unwrap_or_else(|e| panic!("no \"engine\" image to boot: {e:#}"));
    TestCase::run("cluster", BUDGET, |case| {
        let dl = case.deadline();
        let mut lan = LoopbackLan::start()?;
        let engine_ips = [format!("{LAN_PREFIX}.11"), format!("{LAN_PREFIX}.12")];

        // Engines first: no controller yet, they must wait for it.
        let launched = Instant::now();
        let mut engines = Vec::new();
        for (i, ip) in engine_ips.iter().enumerate() {
            let name = format!("engine-{}", i + 1);
            let nic = lan.attach()?;
            let ud = node_user_data(&name, "engine", &nic, ip, "");
            let vm = Vm::builder(&name, case.dir())
                .disk(&engine_image.disk, engine_image.format)
                .memory_mib(MEMORY_MIB)
                .cpus(CPUS)
                .user_data(ud)
                .lan(nic)
                .start()?;
            engines.push(vm);
        }
        for (i, e) in engines.iter_mut().enumerate() {
            e.wait_ssh(dl)?;
            let waiting = dl.poll(
                &format!("{}: the agent waiting for the controller", e.name()),
                || {
                    let (state, _, _) = join_of(e, dl)?;
                    if state != "waiting-for-controller" {
                        return Ok(None);
                    }
                    // The agent first waits for the role's services, then logs its
                    // waits for the controller.
                    let out = e.run(
                        "journalctl -b -u aiw-agent -o cat | grep -m1 'for the controller'",
                        dl,
                    )?;
                    Ok((out.status == Some(0)).then_some(out.stdout))
                },
            )?;
            eprintln!("{}: {}", e.name(), waiting.trim());
            let lan_addr = e.check("ip -4 -o addr show to 192.168.76.0/24", dl)?;
            ensure!(
                lan_addr.contains(&format!("{}/24", engine_ips[i])),
                "{}: no static LAN address: {lan_addr}",
                e.name()
            );
        }
        case.timing("engines up, waiting for the controller", launched.elapsed());

        // The controller: its own agent joins its test controller on the LAN too.
        let nic = lan.attach()?;
        let extra = format!(
            "{}{}",
            file_yaml(TOKEN_FILE, TEST_INIT_TOKEN, "0600"),
            file_yaml(ENV_FILE, &format!("NFS_SERVER={CONTROLLER_IP}\n"), "0644"),
        );
        let ud = node_user_data("controller", CONTROLLER_MODES, &nic, CONTROLLER_IP, &extra)
            .setting("AIWARE_NFS_PERMITTED", "192.168.76.0/24");
        let mut controller = Vm::builder("controller", case.dir())
            .disk(&controller_image.disk, controller_image.format)
            .memory_mib(MEMORY_MIB)
            .cpus(CPUS)
            .user_data(ud)
            .lan(nic)
            .host_forward(9000)?
            .host_forward(9090)?
            .start()?;
        let took = controller.wait_ready(dl)?;
        case.timing("controller: boot to ready (joined itself)", took);
        for e in engines.iter_mut() {
            let line = e.wait_for_line("aiw-agent: ready modes=engine host_id=", dl)?;
            eprintln!("{}: {line}", e.name());
        }
        let api = controller.host_port(9000).context("9000 forwarded")?;
        let all_ips: Vec<String> = std::iter::once(CONTROLLER_IP.to_string())
            .chain(engine_ips.iter().cloned())
            .collect();
        let listed = dl.poll("GET /hosts lists the three nodes", || {
            let h = hosts(api)?;
            Ok(all_ips
                .iter()
                .all(|ip| host_by_ip(&h, ip).is_some())
                .then_some(h))
        })?;
        let joined = launched.elapsed();
        case.timing("launch to a joined three-node cluster", joined);

        // GET /hosts: every node with its modes, CPUs, memory and GPUs.
        ensure!(listed.len() == 3, "GET /hosts: {listed:#?}");
        let mut ids = BTreeMap::new();
        for (ip, modes) in [
            (CONTROLLER_IP, CONTROLLER_MODES),
            (engine_ips[0].as_str(), "engine"),
            (engine_ips[1].as_str(), "engine"),
        ] {
            let h = host_by_ip(&listed, ip).expect("checked above");
            let mut got: Vec<&str> = h["runModes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            got.sort();
            let mut want: Vec<&str> = modes.split(',').collect();
            want.sort();
            ensure!(got == want, "{ip}: runModes {got:?}, expected {want:?}");
            let cpus = h["numCPU"].as_u64().unwrap_or(0);
            let mem = h["memory"].as_u64().unwrap_or(0);
            ensure!(cpus >= 1, "{ip}: numCPU {}", h["numCPU"]);
            ensure!(
                mem > 1_000_000_000 && mem <= u64::from(MEMORY_MIB) << 20,
                "{ip}: memory {mem}"
            );
            ensure!(h["numGPU"] == 0, "{ip}: numGPU {}", h["numGPU"]);
            eprintln!(
                "GET /hosts: {ip} {} modes={got:?} cpus={cpus} memory={mem} gpus={}",
                h["hostname"], h["numGPU"]
            );
            ids.insert(
                ip.to_string(),
                h["hostID"].as_str().unwrap_or("").to_string(),
            );
        }
        for (i, e) in engines.iter().enumerate() {
            let (state, id, _) = join_of(e, dl)?;
            ensure!(
                state == "joined" && id == ids[&engine_ips[i]],
                "{}: join state {state} hostID {id}, controller says {}",
                e.name(),
                ids[&engine_ips[i]]
            );
        }

        // /cache: the controller's export on both engines, shared.
        for e in &engines {
            check_cache_mount(e, dl)?;
        }
        engines[0].check(
            "echo written-on-engine-1 > /cache/cluster-check.txt && sync",
            dl,
        )?;
        let read = engines[1].check("cat /cache/cluster-check.txt", dl)?;
        ensure!(
            read.trim() == "written-on-engine-1",
            "engine-2 read {read:?}"
        );
        let read = controller.check("cat /opt/aiware/nfs/cluster-check.txt", dl)?;
        ensure!(
            read.trim() == "written-on-engine-1",
            "the controller read {read:?}"
        );
        case.timing(
            "/cache shared by both engines and the controller",
            launched.elapsed(),
        );

        // Registry: pushed on the controller, pulled and run on an engine over the LAN.
        controller.check_with_input("docker load", &hello_image_archive(), dl)?;
        controller.check(
            &format!(
                "docker tag {HELLO_TAG} 127.0.0.1:5000/{HELLO_TAG} && docker push 127.0.0.1:5000/{HELLO_TAG}"
            ),
            dl,
        )?;
        let ran = engines[1].check(
            &format!("docker run --rm {CONTROLLER_IP}:5000/{HELLO_TAG}"),
            dl,
        )?;
        ensure!(
            ran.trim() == HELLO_LINE,
            "engine-2 ran the pulled image and got {ran:?}"
        );
        case.timing(
            "engine pulled from the controller's registry and ran it",
            launched.elapsed(),
        );

        // Prometheus on the controller: every node's agent and node exporter up.
        let prom = controller.host_port(9090).context("9090 forwarded")?;
        let want: Vec<String> = all_ips
            .iter()
            .flat_map(|ip| [format!("{ip}:8000"), format!("{ip}:9100")])
            .collect();
        let targets = dl.poll("Prometheus: every node's 8000 and 9100 up", || {
            let t = prometheus_targets(prom)?;
            Ok(want
                .iter()
                .all(|w| {
                    t.iter()
                        .any(|(j, i, h)| j == "aiware-hosts" && i == w && h == "up")
                })
                .then_some(t))
        })?;
        eprintln!("prometheus targets: {targets:?}");
        case.timing("Prometheus scrapes every node", launched.elapsed());

        // The controller reboots: same hostIDs, new status reports, /cache back.
        let before: BTreeMap<String, u64> = hosts(api)?
            .iter()
            .map(|h| {
                (
                    h["hostID"].as_str().unwrap_or("").to_string(),
                    h["lastUpdateDateTime"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        let beats_before: Vec<u64> = engines
            .iter()
            .map(|e| join_of(e, dl).map(|j| j.2))
            .collect::<Result<_>>()?;
        let rebooted = Instant::now();
        match controller.reboot(dl)? {
            qemu_tests::AgentReport::Ready(_) => {}
            other => bail!("controller after reboot: {other:?}"),
        }
        case.timing("controller reboot to ready", rebooted.elapsed());
        let after = dl.poll("every engine reporting to the rebooted controller", || {
            let h = hosts(api)?;
            let fresh = engine_ips.iter().all(|ip| {
                host_by_ip(&h, ip).is_some_and(|x| {
                    let id = x["hostID"].as_str().unwrap_or("");
                    x["lastUpdateDateTime"].as_u64().unwrap_or(0)
                        > before.get(id).copied().unwrap_or(u64::MAX)
                })
            });
            Ok(fresh.then_some(h))
        })?;
        ensure!(after.len() == 3, "GET /hosts after the reboot: {after:#?}");
        for ip in &all_ips {
            let h = host_by_ip(&after, ip).context("a node is missing after the reboot")?;
            ensure!(
                h["hostID"].as_str() == Some(ids[ip].as_str()),
                "{ip}: hostID {} after the reboot, was {}",
                h["hostID"],
                ids[ip]
            );
        }
        for (i, e) in engines.iter().enumerate() {
            let (state, id, beats) = join_of(e, dl)?;
            ensure!(
                state == "joined" && id == ids[&engine_ips[i]] && beats > beats_before[i],
                "{}: after the reboot join state {state}, hostID {id}, heartbeats {beats} (were {})",
                e.name(),
                beats_before[i]
            );
        }
        engines[1].check(
            "timeout 300 sh -c 'echo after-reboot-from-engine-2 > /cache/after-reboot.txt && sync'",
            dl,
        )?;
        let read = engines[0].check("timeout 300 cat /cache/after-reboot.txt", dl)?;
        ensure!(
            read.trim() == "after-reboot-from-engine-2",
            "engine-1 read {read:?}"
        );
        let read = controller.check(
            "cat /opt/aiware/nfs/after-reboot.txt /opt/aiware/nfs/cluster-check.txt",
            dl,
        )?;
        ensure!(
            read.contains("after-reboot-from-engine-2") && read.contains("written-on-engine-1"),
            "the controller's export after the reboot: {read:?}"
        );
        for e in &engines {
            check_cache_mount(e, dl)?;
        }
        case.timing(
            "controller reboot to /cache back on the engines",
            rebooted.elapsed(),
        );
        eprintln!(
            "qemu-tests: cluster: launch to a joined three-node cluster: {joined:.1?} (TCG, {MEMORY_MIB} MiB per VM)"
        );
        Ok(())
    });
}
