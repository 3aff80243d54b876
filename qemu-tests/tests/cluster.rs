//! Issues 8 and 11: a three-node cluster in QEMU. A controller VM (the
//! `controller` profile plus, as a user bakes their own images in, the
//! `aiware-controller` image: a TEST DOUBLE made locally from the Edge API test
//! controller, pushed to a real registry on the host's loopback (Debian's
//! `docker-registry`) and pulled by the build from there, pinned by digest in
//! the profile's `[[container_images]] pull`, loaded into Docker at first boot and run by aiw-agent as the controller mode's
//! container) and two engine VMs on one private LAN of QEMU socket netdevs on
//! 127.0.0.1 (`LoopbackLan`), static addresses from user-data (`write_files`
//! of a systemd-networkd file), each VM keeping its restricted user net for
//! SSH from the host.
//!
//! Checks: engines started before the controller wait, then join; `docker ps`
//! on the controller lists `aiware-controller`; `GET /hosts` lists every node
//! with modes, CPUs, memory and GPUs; `/cache` is the controller's NFS export
//! on every engine; an engine pulls from the controller's registry on 5000 and
//! runs the image; the controller launches a task on an engine (its image
//! pulled over the LAN from that registry), the task's result file on the NFS
//! `/cache` is read on the controller, the status lists it, a
//! `terminateContainer` stops it, a drained engine refuses a launch;
//! Prometheus on the controller scrapes every node's agent (8000) and node
//! exporter (9100); the controller reboots and engines keep their hostIDs,
//! report again and get `/cache` back. Prints the time from launch to a joined
//! three-node cluster.
//!
//! Run: `cargo test -p qemu-tests --test cluster -- --nocapture` (three TCG
//! VMs at once: budget 25 minutes).

use anyhow::{bail, ensure, Context, Result};
use qemu_tests::checks::{agent_status, assert_active, mount_at, parse_prometheus_targets};
use qemu_tests::deadline::Deadline;
use qemu_tests::docker_archive::{
    controller_image_archive, hello_image_archive, task_image_archive, CONTROLLER_TAG, HELLO_LINE,
    HELLO_TAG, TASK_BUSYBOX, TASK_TAG,
};
use qemu_tests::edge_controller::{container_of, launch_ids, LAUNCH_LABEL};
use qemu_tests::local_registry::LocalRegistry;
use qemu_tests::netdev::{LoopbackLan, SocketNic};
use qemu_tests::node::{TEST_INIT_TOKEN, TEST_LICENSE};
use qemu_tests::seed::ca_certs_yaml;
use qemu_tests::test_ca::TestCa;
use qemu_tests::test_images::{
    build_agent, builder_command, image_for, load, qemu_tests_root, workspace_root, TestImage,
};
use qemu_tests::{TestCase, UserData, Vm};
use serde_json::Value;
use std::collections::BTreeMap;
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
/// Engine id and launch id of the task the controller runs across the LAN.
const TASK_ENGINE: &str = "eng-cluster";
const TASK_LAUNCH: &str = "L-cluster";

fn controller_url() -> String {
    format!("http://{CONTROLLER_IP}:9000/edge/v1")
}

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

/// A copy of the project with profile `controller-edge`: the controller plus
/// the `aiware-controller` image (the edge-test-controller) in
/// `[[container_images]]`, pulled at build time from `registry` and pinned by
/// its manifest digest, as a user bakes the vendor's images from their own
/// registry for an air-gapped site.
fn project_with_controller_image(
    dest: &Path,
    bin: &Path,
    registry: &LocalRegistry,
) -> Result<PathBuf> {
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
    let (archive, image_id) = controller_image_archive(bin)?;
    let archive_path = dest.join("edge-test-controller.tar");
    std::fs::write(&archive_path, &archive)?;
    let digest = registry.push_archive(&archive_path, CONTROLLER_TAG)?;
    let (name, tag) = CONTROLLER_TAG.split_once(':').context("CONTROLLER_TAG")?;
    std::fs::write(
        dest.join("images").join(format!("{PROFILE}.toml")),
        format!(
            "# The controller node with the Edge API test controller as its aiware-controller image (aiwimg tests).\n\
             description = \"Controller node + aiware-controller image: the Edge API test controller (TEST DOUBLE)\"\n\
             extends = [\"controller\"]\n\n\
             [[container_images]]\n\
             pull = \"{}/{name}:{tag}@{digest}\"\n\
             tag = \"{CONTROLLER_TAG}\"\n\
             image_id = \"{image_id}\"\n",
            registry.addr
        ),
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
    let registry = LocalRegistry::start(&qemu_tests_root().join("controller-edge-registry"))?;
    let project = project_with_controller_image(
        &qemu_tests_root().join("controller-edge-project"),
        &bin,
        &registry,
    )?;
    let agent = build_agent()?;
    let mut cmd = builder_command(PROFILE, &out_dir);
    cmd.arg("--project")
        .arg(&project)
        .arg("--agent-bin")
        .arg(agent)
        .arg("--insecure-registry")
        .arg(&registry.addr);
    eprintln!("qemu-tests: building image {PROFILE:?}: {cmd:?}");
    let started = Instant::now();
    run("building the controller-edge image", &mut cmd)?;
    eprintln!(
        "qemu-tests: image {PROFILE:?} ready in {:.0?}",
        started.elapsed()
    );
    // The manifest says which baked image came from which pinned reference.
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(out_dir.join(PROFILE).join("manifest.json"))?)?;
    let pulled = &manifest["pulled_images"];
    let reference = pulled[0]["reference"].as_str().unwrap_or_default();
    ensure!(
        pulled.as_array().map(Vec::len) == Some(1)
            && reference.starts_with(&registry.addr)
            && reference.contains("@sha256:")
            && manifest["container_images"][0]["sha256"] == pulled[0]["sha256"],
        "manifest.json does not list the pulled controller image: {pulled}"
    );
    eprintln!("qemu-tests: {PROFILE} bakes {reference} (pulled at build time, pinned by digest)");
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

/// Where the controller's `write_files` put the registry's TLS pair.
const REGISTRY_CERT: &str = "/var/lib/aiware/registry-tls/registry.crt";
const REGISTRY_KEY: &str = "/var/lib/aiware/registry-tls/registry.key";

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
    request(port, "GET", path, token, "")
}

/// One HTTP/1.0 request to the controller VM's forward of `port`; the body of a 200.
fn request(port: u16, method: &str, path: &str, token: Option<&str>, body: &str) -> Result<String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let (code, body) = qemu_tests::http_request::send(addr, method, path, token, body)?;
    ensure!(code == 200, "{method} {path}: HTTP {code}: {body}");
    Ok(body)
}

/// Queues HostActions for `host_id` on the controller (its test-only endpoint).
fn queue_actions(port: u16, host_id: &str, actions: &Value) -> Result<()> {
    request(
        port,
        "POST",
        &format!("/edge/v1/test-only/host/{host_id}/actions"),
        Some(TEST_INIT_TOKEN),
        &actions.to_string(),
    )?;
    Ok(())
}

/// The last status report of the node at `ip`, once `pred` holds for it.
fn wait_for_report(
    port: u16,
    ip: &str,
    what: &str,
    dl: &Deadline,
    pred: impl Fn(&Value) -> bool,
) -> Result<Value> {
    dl.poll(what, || {
        let h = hosts(port)?;
        let last = host_by_ip(&h, ip).map(|x| x["lastStatus"].clone());
        Ok(last.filter(|s| pred(s)))
    })
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
        // The cluster's CA: the controller's registry serves TLS with a
        // certificate from it, the engines trust it through `ca_certs` and
        // name that registry (no plain HTTP anywhere).
        let ca = TestCa::new()?;
        let registry_tls = ca.issue(&[CONTROLLER_IP], "cluster registry (TEST)")?;

        // Engines first: no controller yet, they must wait for it.
        let launched = Instant::now();
        let mut engines = Vec::new();
        for (i, ip) in engine_ips.iter().enumerate() {
            let name = format!("engine-{}", i + 1);
            let nic = lan.attach()?;
            let ud = node_user_data(&name, "engine", &nic, ip, "")
                .setting("AIWARE_REGISTRY", &format!("{CONTROLLER_IP}:5000"))
                .raw_yaml(&ca_certs_yaml(&ca.pem()));
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
        // The registry's pair as files written by `write_files` (the path
        // form of AIWARE_REGISTRY_CERT/_KEY, checked before they exist).
        let tls_files = format!(
            "{}{}",
            file_yaml(REGISTRY_CERT, &registry_tls.cert_pem, "0644"),
            file_yaml(REGISTRY_KEY, &registry_tls.key_pem, "0600")
        );
        let ud = node_user_data(
            "controller",
            CONTROLLER_MODES,
            &nic,
            CONTROLLER_IP,
            &tls_files,
        )
        .setting("AIWARE_REGISTRY_CERT", REGISTRY_CERT)
        .setting("AIWARE_REGISTRY_KEY", REGISTRY_KEY)
        .setting("AIWARE_NFS_PERMITTED", "192.168.76.0/24")
        .setting("AIWARE_NFS_SERVER", CONTROLLER_IP)
        .setting("AIWARE_CONTROLLER_IMAGE", CONTROLLER_TAG);
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
        // The Edge API on 9000 is the aiware-controller container aiw-agent
        // started from the baked image (no overlay binary in this image).
        let ps = controller.check("docker ps --format '{{.Names}} {{.Image}} {{.Status}}'", dl)?;
        eprintln!("controller: docker ps:\n{}", ps.trim_end());
        ensure!(
            ps.lines()
                .any(|l| l.starts_with(&format!("aiware-controller {CONTROLLER_TAG} Up"))),
            "docker ps on the controller lists no running aiware-controller: {ps}"
        );
        assert_active(&controller, &["aiware-controller.service"], dl)?;
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
        // The controller's own `/cache` is its export folder bind-mounted,
        // not NFS to itself (whose unmount hung every reboot for 90 s).
        let own = mount_at(&controller, "/cache", dl)?;
        ensure!(
            !own.fstype.starts_with("nfs") && own.source.ends_with("[/opt/aiware/nfs]"),
            "the controller's /cache is {own:?}, not its export folder bound"
        );
        case.timing(
            "/cache shared by both engines and the controller",
            launched.elapsed(),
        );

        // Registry: pushed on the controller, pulled and run on an engine
        // over the LAN, over TLS verified with the cluster's CA.
        let trust = engines[1].check(
            "journalctl -b -u aiw-agent -o cat | grep 'aiw-agent: registry trust'",
            dl,
        )?;
        ensure!(
            trust.contains(&format!(
                "the cluster's registry {CONTROLLER_IP}:5000 and every other over verified TLS"
            )),
            "engine-2: {trust}"
        );
        let served = controller.check(
            "journalctl -b -u docker-registry -o cat | grep -m1 -i 'listening on'",
            dl,
        )?;
        eprintln!("controller registry: {}", served.trim());
        ensure!(
            served.contains("tls"),
            "the registry does not serve TLS: {served}"
        );
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

        // The controller's work across the LAN: a task on engine-1, its image
        // pulled from the controller's registry, its result on the NFS /cache.
        controller.check_with_input("docker load", &task_image_archive()?, dl)?;
        controller.check(
            &format!(
                "docker tag {TASK_TAG} 127.0.0.1:5000/{TASK_TAG} && docker push 127.0.0.1:5000/{TASK_TAG}"
            ),
            dl,
        )?;
        let engine1 = ids[&engine_ips[0]].clone();
        let launch = serde_json::json!({"launchContainer": [{
            "launchId": TASK_LAUNCH, "engineId": TASK_ENGINE, "buildId": "build-1",
            "dockerImage": format!("{CONTROLLER_IP}:5000/{TASK_TAG}"),
            "containerConfig": {"commandLine": [
                TASK_BUSYBOX, "sh", "-c",
                "echo \"result of $AIWARE_LAUNCH_ID on $AIWARE_HOST_ID\" > \"$AIWARE_ENGINE_INSTANCE_SCRATCH/result\" && exec sleep 3600",
            ]},
        }]});
        let queued = Instant::now();
        queue_actions(api, &engine1, &launch)?;
        let st = wait_for_report(
            api,
            &engine_ips[0],
            "engine-1 reports the task running",
            dl,
            |s| container_of(s, TASK_LAUNCH).is_some_and(|c| c["state"] == "running"),
        )?;
        case.timing(
            "launchContainer queued to reported running (pulled over the LAN; status every 10 s)",
            queued.elapsed(),
        );
        let task = container_of(&st, TASK_LAUNCH).expect("checked");
        eprintln!("engine-1 status lists the task: {task}");
        // The agent's own figure: the action read → the container running.
        let took = engines[0].check(
            &format!(
                "journalctl -b -u aiw-agent -o cat --no-pager | grep -m1 'launched {TASK_LAUNCH} '"
            ),
            dl,
        )?;
        eprintln!("engine-1: {}", took.trim());
        ensure!(
            task["engineID"] == TASK_ENGINE && st["numContainers"] == 1,
            "engine-1's report: {st}"
        );
        let docker_id = task["dockerContainerId"].as_str().unwrap_or("").to_string();
        let result_path = format!("/opt/aiware/nfs/engine/{TASK_ENGINE}/{TASK_LAUNCH}/result");
        let result = dl.poll("the task's result on the controller's export", || {
            let out = controller.run(&format!("cat {result_path}"), dl)?;
            Ok((out.status == Some(0) && !out.stdout.trim().is_empty()).then_some(out.stdout))
        })?;
        eprintln!("controller: {result_path}: {}", result.trim());
        ensure!(
            result.trim() == format!("result of {TASK_LAUNCH} on {engine1}"),
            "the controller read {result:?} from the task"
        );
        queue_actions(
            api,
            &engine1,
            &serde_json::json!({"terminateContainer": [{"dockerContainerId": docker_id}]}),
        )?;
        let st = wait_for_report(
            api,
            &engine_ips[0],
            "engine-1 reports the task gone",
            dl,
            |s| s["numContainers"] == 0,
        )?;
        ensure!(launch_ids(&st).is_empty(), "after terminate: {st}");
        let left = engines[0].check(
            &format!("docker ps -aq --filter label={LAUNCH_LABEL}={TASK_LAUNCH} | wc -l"),
            dl,
        )?;
        ensure!(
            left.trim() == "0",
            "the terminated task is still in Docker on engine-1"
        );
        eprintln!("engine-1: {TASK_LAUNCH} terminated: gone from its status and from Docker");

        // drain on engine-2 (the admin endpoint): said in its status, a launch refused.
        let engine2 = ids[&engine_ips[1]].clone();
        request(
            api,
            "POST",
            &format!("/edge/v1/host/{engine2}/drain"),
            Some(TEST_INIT_TOKEN),
            "{}",
        )?;
        wait_for_report(api, &engine_ips[1], "engine-2 reports drain", dl, |s| {
            s["drain"] == true
        })?;
        let mut refused = launch.clone();
        refused["launchContainer"][0]["launchId"] = serde_json::json!("L-drained");
        queue_actions(api, &engine2, &refused)?;
        let st = wait_for_report(
            api,
            &engine_ips[1],
            "engine-2 refuses a launch while draining",
            dl,
            |s| {
                s["actionErrors"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|e| e["launchID"] == "L-drained")
            },
        )?;
        ensure!(
            launch_ids(&st).is_empty(),
            "engine-2 started a task while draining: {st}"
        );
        case.timing(
            "the controller's task flow across the cluster",
            queued.elapsed(),
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
            // The controller's list can be fresh before the engine's own
            // next report has gone through (a report that timed out while
            // the controller was down ends first): wait for that report.
            let (state, id, beats) = dl.poll(
                &format!("{}: a heartbeat to the rebooted controller", e.name()),
                || {
                    let j = join_of(e, dl)?;
                    Ok((j.2 > beats_before[i]).then_some(j))
                },
            )?;
            ensure!(
                state == "joined" && id == ids[&engine_ips[i]],
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
