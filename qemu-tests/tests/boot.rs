//! Boot tests of issue 4: each profile booted under QEMU with real user-data,
//! checked as users would. Slow (a TCG boot takes minutes); VM tests run one
//! at a time whatever the thread count (`TestCase` holds a process-wide lock
//! and a lock file). They need the built images (built on demand, or
//! `AIWIMG_TEST_IMAGES=DIR`), QEMU and OVMF, and fail with a clear message
//! when those are missing: they never pass without booting.
//!
//! Run: `cargo test -p qemu-tests --test boot -- --test-threads=1 --nocapture`.

use anyhow::{bail, ensure, Result};
use qemu_tests::case::DEFAULT_BUDGET;
use qemu_tests::checks::{
    agent_status, assert_active, assert_console_clean, assert_no_failed_units, assert_not_active,
    assert_root_verity_erofs, assert_var_grown, wait_listening,
};
use qemu_tests::docker_archive::{
    hello_image_archive, task_image_archive, HELLO_LINE, HELLO_TAG, TASK_BUSYBOX, TASK_TAG,
};
use qemu_tests::edge_controller::{container_of, launch_ids, EdgeTestController, LAUNCH_LABEL};
use qemu_tests::local_registry::LocalRegistry;
use qemu_tests::node::{
    controller_url_in_guest, joining_user_data, mode_list, node_vm, sorted_modes, start_controller,
    wait_for_hosts, CONTROLLER_GUEST_ADDR, TEST_INIT_TOKEN, TEST_LICENSE,
};
use qemu_tests::seed::ca_certs_yaml;
use qemu_tests::test_ca::TestCa;
use qemu_tests::test_images::{image_for, TestImage};
use qemu_tests::tls_front::TlsFront;
use qemu_tests::update_server::{
    bad_version, later_version, Tamper, UpdateServer, UPDATE_GUEST_ADDR, UPDATE_GUEST_PORT,
};
use qemu_tests::{AgentReport, Deadline, TestCase, UserData, Vm};
use std::time::Duration;

/// The built image of `profile`, fetched or built before the test's deadline starts.
fn image(profile: &str) -> TestImage {
    image_for(profile).unwrap_or_else(|e| panic!("no {profile:?} image to boot: {e:#}"))
}

/// Boots `vm` to the agent's `ready`, records the time, and lets SSH in.
fn boot_ready(case: &TestCase, vm: &mut Vm) -> Result<()> {
    let took = vm.wait_ready(case.deadline())?;
    case.timing("boot to ready", took);
    vm.wait_ssh(case.deadline())
}

/// The swap file the engine test asks for in user-data.
const SWAP_FILE: &str = "/var/swap.img";

/// Checks [`SWAP_FILE`] is a 64 MiB file and on (swapon counts all of it but
/// its header page); returns its inode.
fn swap_on(vm: &Vm, dl: &Deadline) -> Result<String> {
    let on = vm.check("swapon --show=NAME,SIZE --noheadings --bytes", dl)?;
    ensure!(
        on.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.first() == Some(&SWAP_FILE)
                && f.get(1)
                    .and_then(|s| s.parse::<u64>().ok())
                    .is_some_and(|b| (63 << 20..=64 << 20).contains(&b))
        }),
        "swapon --show: {on:?}"
    );
    let stat = vm.check(&format!("stat -c '%s %i' {SWAP_FILE}"), dl)?;
    let (size, inode) = stat.trim().split_once(' ').unwrap_or_default();
    ensure!(size == "67108864", "{SWAP_FILE} is {size} bytes");
    eprintln!("qemu-tests: swapon --show: {}", on.trim());
    Ok(inode.to_string())
}

/// The checks every healthy node passes.
fn healthy(case: &TestCase, vm: &Vm) -> Result<()> {
    let dl = case.deadline();
    assert_no_failed_units(vm, dl)?;
    assert_console_clean(vm, &[])?;
    // tmpfiles links /var/run to /run on the empty /var of a first boot; a
    // daemon started before it made /var/run a directory of its own, and
    // /var/run/dbus (the system bus every client dials) was gone.
    let var_run = vm.check("readlink -f /var/run", dl)?;
    ensure!(
        var_run.trim() == "/run",
        "/var/run is {var_run:?}, not /run"
    );
    let status = agent_status(vm, dl)?;
    ensure!(
        status["settings_valid"] == true,
        "aiw-agent status says settings are not valid: {status}"
    );
    // The guide's `service aiware-agent status`: an alias of our agent.
    let alias = vm.check(
        "systemctl show -p Id -p ActiveState aiware-agent.service",
        dl,
    )?;
    ensure!(
        alias.contains("Id=aiw-agent.service") && alias.contains("ActiveState=active"),
        "aiware-agent.service is not the running aiw-agent: {alias}"
    );
    Ok(())
}

/// The engine test's update server as launch data names it (the image's
/// own `update_url`, [`qemu_tests::update_server::UPDATE_URL_IN_GUEST`], is
/// not forwarded there, so only the override can work).
const UPDATE_OVERRIDE_ADDR: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 0, 2, 102);
const UPDATE_URL_OVERRIDE: &str = "http://10.0.2.102/aiware";

/// The version the engine test updates to.
const UPDATE_VERSION: &str = "0.2.0";

/// Publishes `v2`, and has the node find and install it (systemd-sysupdate
/// through `aiw-agent update`), signature checked against the baked key.
fn update_to(case: &TestCase, vm: &Vm, updates: &UpdateServer) -> Result<()> {
    let dl = case.deadline();
    // The transfer files read launch data's server, and the `notify`
    // policy's check (every 30 s) has found the new version.
    let runtime = vm.check("cat /run/sysupdate.d/10-root.transfer", dl)?;
    ensure!(
        runtime.contains(&format!("Path={UPDATE_URL_OVERRIDE}/%M/")),
        "/run/sysupdate.d/10-root.transfer: {runtime}"
    );
    let mut available = serde_json::Value::Null;
    for _ in 0..45 {
        available = agent_status(vm, dl)?["update_check"].clone();
        if available["available"] == UPDATE_VERSION {
            break;
        }
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
    ensure!(
        available["available"] == UPDATE_VERSION && available["policy"] == "notify",
        "aiw-agent status update_check: {available}"
    );
    // Refused, each leaving the partition table and the ESP as they were.
    let layout =
        "lsblk -n -o NAME,PARTLABEL,PARTUUID /dev/vda; ls -l --time-style=+%s /efi/EFI/Linux";
    let before = vm.check(layout, dl)?;
    for how in Tamper::ALL {
        let out = updates.tampered("aiware-engine", UPDATE_VERSION, how, || {
            vm.run("aiw-agent update apply", dl)
        })??;
        ensure!(
            out.status.is_some_and(|c| c != 0),
            "{how:?}: aiw-agent update apply did not fail: {}{}",
            out.stdout,
            out.stderr
        );
        // sysupdate's own words for the refusal, else its last lines.
        let telling: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| {
                ["ignature", "mismatch", "Bad message", "ailed", "match"]
                    .iter()
                    .any(|w| l.contains(w))
                    && !["Download", "Pulling", "Acquir"]
                        .iter()
                        .any(|w| l.contains(w))
            })
            .collect();
        let lines: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        let why = if telling.is_empty() {
            lines[lines.len().saturating_sub(3)..].join(" / ")
        } else {
            telling.join(" / ")
        };
        eprintln!("qemu-tests: {how:?} refused: {why}");
        let now = vm.check(layout, dl)?;
        ensure!(
            now == before,
            "{how:?} changed the disk:\n{before}\n->\n{now}"
        );
    }
    let check = vm.check("aiw-agent update check", dl)?;
    ensure!(
        check.contains(&format!("update available: {UPDATE_VERSION}")),
        "aiw-agent update check: {check}"
    );
    let t = std::time::Instant::now();
    let applied = vm.check("aiw-agent update apply 2>/dev/null", dl)?;
    case.timing("update apply (download and write)", t.elapsed());
    ensure!(
        applied.contains(&format!("installed {UPDATE_VERSION}")),
        "aiw-agent update apply: {applied}"
    );
    let status = vm.check("aiw-agent update status", dl)?;
    eprintln!(
        "qemu-tests: before the reboot: aiw-agent update status: {}",
        status.trim()
    );
    ensure!(
        status.contains(&format!(
            "{UPDATE_VERSION} installed, boots at the next reboot"
        )),
        "aiw-agent update status: {status}"
    );
    Ok(())
}

/// The bad version: its aiw-agent fails (a test overlay), so the boot
/// health check fails on each of its tries.
const BAD_VERSION: &str = "0.3.0";
/// The tries 0.2.0 gives what it installs (`aiwimg build --update-tries`).
const UPDATE_TRIES: usize = qemu_tests::update_server::LATER_VERSION_UPDATE_TRIES;

/// v2 → bad v3: installed (its root larger than v1's, in the slot v1 had),
/// each try fails the health check and reboots, then systemd-boot boots v2
/// again by itself; the node says `rolled back from 0.3.0` on the console,
/// in `aiw-agent update status` and to the controller, and is not offered v3
/// again.
#[allow(clippy::too_many_arguments)]
fn rolls_back_from_a_bad_version(
    case: &TestCase,
    vm: &mut Vm,
    updates: &UpdateServer,
    controller: &EdgeTestController,
    v1: &TestImage,
    v2: &TestImage,
    v3: &TestImage,
) -> Result<()> {
    let dl = case.deadline();
    let root_size = |img: &TestImage| -> Result<u64> {
        let update = img.dir.join("update");
        for e in std::fs::read_dir(&update)? {
            let e = e?;
            if e.file_name().to_string_lossy().contains(".root.") {
                return Ok(e.metadata()?.len());
            }
        }
        bail!("no root file in {}", update.display())
    };
    let (r1, r3) = (root_size(v1)?, root_size(v3)?);
    ensure!(
        r3 > r1,
        "the bad version's root ({r3} B) is not larger than v1's ({r1} B)"
    );
    eprintln!(
        "qemu-tests: roots: {} {r1} B, {BAD_VERSION} {r3} B",
        v1.manifest.version
    );
    eprintln!("qemu-tests: {}", updates.publish(v3)?);
    let applied = vm.check("aiw-agent update apply 2>/dev/null", dl)?;
    ensure!(
        applied.contains(&format!("installed {BAD_VERSION}")),
        "aiw-agent update apply: {applied}"
    );
    let before = vm.check("aiw-agent update status", dl)?;
    eprintln!(
        "qemu-tests: aiw-agent update status before: {}",
        before.trim()
    );
    let t = std::time::Instant::now();
    vm.start_reboot(dl)?;
    let back = vm.wait_for_line(&format!("rolled back from {BAD_VERSION}"), dl)?;
    case.timing("bad version's tries and the fallback boot", t.elapsed());
    let failed: Vec<String> = vm
        .boot_lines()
        .into_iter()
        .filter(|l| l.contains(&format!("boot health: FAILED: version {BAD_VERSION}")))
        .collect();
    for l in &failed {
        eprintln!("qemu-tests: console: {}", l.trim());
    }
    eprintln!("qemu-tests: console: {}", back.trim());
    ensure!(
        failed.len() == UPDATE_TRIES,
        "{} failed boot health checks of {BAD_VERSION} on the console, expected {UPDATE_TRIES}",
        failed.len()
    );
    let report = vm.wait_for_agent(dl)?;
    ensure!(
        matches!(report, AgentReport::Ready(_)),
        "after the fallback: {report:?}"
    );
    vm.wait_ssh(dl)?;
    runs_version(vm, v2, dl)?;
    let after = vm.check("aiw-agent update status", dl)?;
    eprintln!(
        "qemu-tests: aiw-agent update status after: {}",
        after.trim()
    );
    ensure!(
        after.contains(&format!("rolled back from {BAD_VERSION}")),
        "aiw-agent update status: {after}"
    );
    let ukis = vm.check("ls /efi/EFI/Linux", dl)?;
    ensure!(
        ukis.contains(&format!("aiware-engine_{BAD_VERSION}+0-{UPDATE_TRIES}.efi")),
        "the bad UKI is not marked bad: {ukis}"
    );
    let status = agent_status(vm, dl)?;
    ensure!(
        status["update"]["rolled_back_from"] == BAD_VERSION,
        "aiw-agent status --json update: {}",
        status["update"]
    );
    // No reinstall loop: the server still offers 0.3.0, the node does not take it.
    let check = vm.check("aiw-agent update check", dl)?;
    ensure!(
        check.contains("no newer version"),
        "aiw-agent update check after the rollback: {check}"
    );
    controller.wait_for(dl.cap(std::time::Duration::from_secs(120)), |h| {
        h.first()
            .and_then(|h| h.statuses.last())
            .is_some_and(|s| s["imageVersion"]["rolledBackFrom"] == BAD_VERSION)
    });
    let last = controller
        .hosts()
        .first()
        .and_then(|h| h.statuses.last().cloned())
        .unwrap_or_default();
    ensure!(
        last["imageVersion"]["rolledBackFrom"] == BAD_VERSION
            && last["imageVersion"]["booted"] == UPDATE_VERSION,
        "the controller's last status: imageVersion {}",
        last["imageVersion"]
    );
    Ok(())
}

/// The node runs `image`'s version on `image`'s root (its roothash on the
/// kernel command line, which its UKI carries).
fn runs_version(vm: &Vm, image: &TestImage, dl: &Deadline) -> Result<()> {
    let version = &image.manifest.version;
    let osrel = vm.check("grep ^IMAGE_VERSION= /usr/lib/os-release", dl)?;
    ensure!(
        osrel.trim() == format!("IMAGE_VERSION={version}"),
        "the node runs {osrel:?}, not {version}"
    );
    let roothash = image.manifest.roothash.clone().unwrap_or_default();
    let cmdline = vm.check("cat /proc/cmdline", dl)?;
    ensure!(
        !roothash.is_empty() && cmdline.contains(&format!("roothash={roothash}")),
        "the kernel command line has not {version}'s roothash {roothash}: {cmdline}"
    );
    Ok(())
}

/// After the update's reboot: the new version's root (its roothash on the
/// command line), the old one in the other slot, the boot health check
/// passed and systemd-bless-boot marked the new UKI good.
fn updated_and_blessed(case: &TestCase, vm: &Vm, v1: &TestImage, v2: &TestImage) -> Result<()> {
    let dl = case.deadline();
    runs_version(vm, v2, dl)?;
    let good = format!("boot health: good: version {UPDATE_VERSION}");
    let mut ukis = String::new();
    let blessed = |u: &str| {
        u.lines()
            .any(|l| l.trim().ends_with(&format!("_{UPDATE_VERSION}.efi")))
    };
    for _ in 0..60 {
        ukis = vm.check("ls /efi/EFI/Linux", dl)?;
        if blessed(&ukis) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
    ensure!(blessed(&ukis), "the new UKI was not marked good: {ukis}");
    ensure!(
        vm.boot_lines().iter().any(|l| l.contains(&good)),
        "no {good:?} on the console"
    );
    let status = vm.check("aiw-agent update status", dl)?;
    eprintln!(
        "qemu-tests: after the reboot: aiw-agent update status: {}",
        status.trim()
    );
    eprintln!(
        "qemu-tests: ESP: {}",
        ukis.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    ensure!(
        status.contains(&format!(
            "booted aiware-engine {UPDATE_VERSION}; other slot: {}",
            v1.manifest.version
        )) && !status.contains("rolled back"),
        "aiw-agent update status: {status}"
    );
    Ok(())
}

/// The guide's check that the controller answers: `curl $AIWARE_CONTROLLER/version`.
fn controller_answers_version(case: &TestCase, vm: &Vm) -> Result<()> {
    let url = format!("{}/version", controller_url_in_guest());
    let out = vm.check(
        &format!(
            "if command -v curl >/dev/null; then curl -fsS {url}; \
             else bash -c 'exec 3<>/dev/tcp/{host}/{port}; printf \"GET {path} HTTP/1.0\\r\\n\\r\\n\" >&3; cat <&3'; fi",
            host = qemu_tests::node::CONTROLLER_GUEST_ADDR,
            port = qemu_tests::node::CONTROLLER_GUEST_PORT,
            path = "/edge/v1/version",
        ),
        case.deadline(),
    )?;
    ensure!(
        out.contains("Build number"),
        "controller /version from the guest: {out}"
    );
    Ok(())
}

/// The engine image's whole first-boot-and-reboot journey, one VM (issue 12:
/// one boot for the checks whose launch data agree). The Edge API is behind
/// https with a certificate from a private CA (TlsFront in front of the test
/// controller, both TEST DOUBLES); the node gets the CA in user-data as
/// AIWARE_CONTROLLER_CA and joins over TLS. Then: Docker on /var runs a
/// container, the root is read-only erofs under verity, /var grew to fill a
/// 12 GiB disk, and after a reboot a file on /var and the host ID are kept
/// and the node joins again. Between, the controller's host actions run on
/// real Docker (issue 11, see `host_actions_before_reboot`), and at the end
/// mode `terminate` powers the node off.
#[test]
fn engine_joins_over_https_runs_a_container_and_keeps_var_across_reboot() {
    let image = image("engine");
    let v2 = later_version("engine", UPDATE_VERSION)
        .unwrap_or_else(|e| panic!("no engine {UPDATE_VERSION} to update to: {e:#}"));
    let v3 = bad_version("engine", BAD_VERSION)
        .unwrap_or_else(|e| panic!("no bad engine {BAD_VERSION}: {e:#}"));
    TestCase::run("engine", DEFAULT_BUDGET * 4, |case| {
        let dl = case.deadline();
        let updates = UpdateServer::start(&case.dir().join("update-server"))?;
        // Published before the node boots: its `notify` policy finds it.
        eprintln!("qemu-tests: {}", updates.publish(&v2)?);
        let controller = start_controller()?;
        let addr = CONTROLLER_GUEST_ADDR;
        let front = TlsFront::start(controller.addr(), &[&addr.to_string()])?;
        let url = format!("https://{addr}/edge/v1");
        let ud = UserData::cloud_config()
            .hostname("engine-1")
            .setting("AIWARE_MODE", "engine")
            .setting("AIWARE_LICENSE", TEST_LICENSE)
            .setting("AIWARE_CONTROLLER", &url)
            .setting("AIWARE_INIT_TOKEN", TEST_INIT_TOKEN)
            .setting("AIWARE_CONTROLLER_CA", front.ca_pem())
            .setting(
                "AIWARE_AGENT_UPDATE_INTERVAL",
                &STATUS_INTERVAL_S.to_string(),
            )
            // Updates from launch data's server (not the image's), checked
            // and reported, installed by hand below.
            .setting("AIWARE_UPDATE_URL", UPDATE_URL_OVERRIDE)
            .setting("AIWARE_UPDATE_POLICY", "notify")
            .setting("AIWARE_UPDATE_CHECK_INTERVAL", "30")
            // cloud-config `swap` (the guide recommends swap on engines).
            .raw_yaml(&format!("swap:\n  filename: {SWAP_FILE}\n  size: 64M"));
        let disk_gib = 12;
        let mut vm = node_vm(case.dir(), "engine", &image, None)?
            .guest_forward(addr, 443, front.addr().port())?
            .guest_forward(UPDATE_OVERRIDE_ADDR, UPDATE_GUEST_PORT, updates.port)?
            .disk_size_gib(disk_gib)
            .user_data(ud)
            .start()?;
        boot_ready(case, &mut vm)?;

        // Joined over TLS.
        let first = wait_for_hosts(&controller, 1, dl)?;
        ensure!(
            sorted_modes(&first[0]) == ["engine"],
            "registered modes: {:?}",
            first[0].run_modes()
        );
        let status = agent_status(&vm, dl)?;
        ensure!(
            status["join"]["state"] == "joined",
            "aiw-agent status: {}",
            status["join"]
        );
        controller.wait_for(dl.cap(std::time::Duration::from_secs(60)), |h| {
            h.first().is_some_and(|h| !h.statuses.is_empty())
        });
        ensure!(
            controller
                .hosts()
                .first()
                .is_some_and(|h| !h.statuses.is_empty()),
            "no status report reached the controller over TLS"
        );

        // The swap file of user-data is on.
        let swap_inode = swap_on(&vm, dl)?;

        // Docker keeps its data on /var and runs a container.
        assert_active(&vm, &["docker.service"], dl)?;
        let root = vm.check("docker info --format '{{.DockerRootDir}}'", dl)?;
        let root = root.trim();
        let mount = vm.check(&format!("findmnt -n -o TARGET --target {root}"), dl)?;
        ensure!(
            mount.trim() == "/var",
            "Docker's data-root {root} is on {} , not /var",
            mount.trim()
        );
        let loaded = vm.check_with_input("docker load", &hello_image_archive(), dl)?;
        ensure!(loaded.contains(HELLO_TAG), "docker load said: {loaded}");
        let out = vm.check(&format!("docker run --rm {HELLO_TAG}"), dl)?;
        ensure!(out.trim() == HELLO_LINE, "docker run printed {out:?}");
        let host = first[0].host_id.clone();
        host_actions_before_reboot(case, &vm, &controller, &host, &url)?;

        // A read-only, verified root; /var grown to fill the disk.
        assert_root_verity_erofs(&vm, dl)?;
        vm.ssh()?.check_fails("touch /usr/aiwimg-write-test", dl)?;
        vm.ssh()?.check_fails("touch /aiwimg-write-test", dl)?;
        let image_bytes = std::fs::metadata(&image.disk)?.len();
        let disk_bytes = u64::from(disk_gib) << 30;
        // /var gets what the image's partitions leave, less filesystem overhead.
        let min_var = (disk_bytes.saturating_sub(image_bytes)) / 10 * 8;
        let var = assert_var_grown(&vm, min_var, dl)?;
        eprintln!(
            "qemu-tests: /var is {} MiB of a {disk_gib} GiB disk",
            var.size >> 20
        );
        vm.check("dd if=/dev/zero of=/var/tmp/aiwimg-fill bs=1M count=256 status=none && sync && rm /var/tmp/aiwimg-fill", dl)?;
        healthy(case, &vm)?;

        // Across an A/B update and its reboot (issue 14): /var and the host
        // ID are kept, the node joins again, now on the new version.
        let token = format!("written-before-reboot-{}", std::process::id());
        vm.check(
            &format!(
                "mkdir -p /var/opt/aiware && echo {token} > /var/opt/aiware/persist-check && sync"
            ),
            dl,
        )?;
        update_to(case, &vm, &updates)?;
        let report = vm.reboot(dl)?;
        ensure!(
            matches!(report, AgentReport::Ready(_)),
            "second boot: {report:?}"
        );
        case.timing("update reboot to ready", vm.since_boot());
        vm.wait_ssh(dl)?;
        updated_and_blessed(case, &vm, &image, &v2)?;
        let read = vm.check("cat /var/opt/aiware/persist-check", dl)?;
        ensure!(read.trim() == token, "after reboot the file holds {read:?}");
        // The same swap file, switched on again (not made again).
        ensure!(
            swap_on(&vm, dl)? == swap_inode,
            "the swap file was made again on the second boot"
        );
        let boots = vm.check("journalctl --list-boots --no-pager | wc -l", dl)?;
        ensure!(
            boots.trim().parse::<u32>().unwrap_or(0) >= 2,
            "journal lists {} boots",
            boots.trim()
        );
        controller.wait_for(dl.cap(std::time::Duration::from_secs(120)), |h| {
            h.len() == 1 && h[0].registrations >= 2
        });
        let after = controller.hosts();
        ensure!(
            after.len() == 1,
            "after reboot the controller knows {} hosts",
            after.len()
        );
        ensure!(
            after[0].host_id == first[0].host_id,
            "host ID changed: {} -> {}",
            first[0].host_id,
            after[0].host_id
        );
        ensure!(
            after[0].registrations >= 2,
            "the second boot did not re-join (registrations {})",
            after[0].registrations
        );
        host_actions_after_reboot(&vm, &controller, &host, dl)?;
        healthy(case, &vm)?;
        rolls_back_from_a_bad_version(case, &mut vm, &updates, &controller, &image, &v2, &v3)?;
        host_terminates(&mut vm, &controller, &host, dl)
    });
}

#[test]
fn controller() {
    let image = image("controller");
    TestCase::run("controller", DEFAULT_BUDGET, |case| {
        let dl = case.deadline();
        let modes = "controller,db,nfs";
        let controller = start_controller()?;
        let mut vm = node_vm(case.dir(), "controller", &image, Some(&controller))?
            .user_data(joining_user_data("controller-1", modes))
            .start()?;
        boot_ready(case, &mut vm)?;

        let hosts = wait_for_hosts(&controller, 1, dl)?;
        ensure!(
            sorted_modes(&hosts[0]) == mode_list(modes),
            "registered modes: {:?}",
            hosts[0].run_modes()
        );
        assert_active(&vm, &["postgresql.service", "nfs-server.service"], dl)?;
        wait_listening(&vm, &[5432, 2049], dl)?;
        vm.check("pg_isready -h 127.0.0.1 -p 5432", dl)?;
        snakeoil_pair_is_this_nodes_own(&vm, dl)?;
        // The guide's validation steps.
        let exports = vm.check("exportfs -v", dl)?;
        ensure!(
            exports.contains("/opt/aiware/nfs"),
            "exportfs lists: {exports}"
        );
        controller_answers_version(case, &vm)?;
        healthy(case, &vm)
    });
}

/// ssl-cert's snakeoil paths (the TLS pair Debian's packages default to)
/// hold a pair this node made at first boot, not one baked into the image:
/// the paths are links into /var, and the key is the certificate's.
fn snakeoil_pair_is_this_nodes_own(vm: &Vm, dl: &Deadline) -> Result<()> {
    let links = vm.check(
        "readlink /etc/ssl/private/ssl-cert-snakeoil.key /etc/ssl/certs/ssl-cert-snakeoil.pem; \
         stat -L -c '%a %U:%G' /etc/ssl/private/ssl-cert-snakeoil.key",
        dl,
    )?;
    ensure!(
        links.contains("/var/lib/aiwimg/ssl-cert/ssl-cert-snakeoil.key")
            && links.contains("/var/lib/aiwimg/ssl-cert/ssl-cert-snakeoil.pem")
            && links.contains("640 root:ssl-cert"),
        "snakeoil paths: {links}"
    );
    let of_key = vm.check(
        "openssl pkey -pubout -in /etc/ssl/private/ssl-cert-snakeoil.key",
        dl,
    )?;
    let of_cert = vm.check(
        "openssl x509 -noout -pubkey -in /etc/ssl/certs/ssl-cert-snakeoil.pem",
        dl,
    )?;
    ensure!(
        of_key.contains("PUBLIC KEY") && of_key == of_cert,
        "the snakeoil key is not the certificate's: {of_key} / {of_cert}"
    );
    let subject = vm.check(
        "openssl x509 -noout -subject -fingerprint -sha256 -in /etc/ssl/certs/ssl-cert-snakeoil.pem",
        dl,
    )?;
    eprintln!(
        "qemu-tests: this node's own snakeoil pair: {}",
        subject.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    Ok(())
}

#[test]
fn coreless() {
    let image = image("coreless");
    TestCase::run("coreless", DEFAULT_BUDGET, |case| {
        let dl = case.deadline();
        let modes = "controller,db,engine,nfs,prometheus,registry";
        let controller = start_controller()?;
        let mut vm = node_vm(case.dir(), "coreless", &image, Some(&controller))?
            .memory_mib(3072)
            .user_data(joining_user_data("coreless-1", modes))
            .start()?;
        boot_ready(case, &mut vm)?;

        let hosts = wait_for_hosts(&controller, 1, dl)?;
        ensure!(
            sorted_modes(&hosts[0]) == mode_list(modes),
            "registered modes: {:?}",
            hosts[0].run_modes()
        );
        assert_active(
            &vm,
            &[
                "docker.service",
                "postgresql.service",
                "nfs-server.service",
                "prometheus.service",
                "docker-registry.service",
            ],
            dl,
        )?;
        wait_listening(&vm, &[5432, 2049, 9090, 5000], dl)?;
        let exports = vm.check("exportfs -v", dl)?;
        ensure!(
            exports.contains("/opt/aiware/nfs"),
            "exportfs lists: {exports}"
        );
        controller_answers_version(case, &vm)?;
        healthy(case, &vm)
    });
}

#[test]
fn engine_gpu_without_a_gpu() {
    let image = image("engine-gpu");
    TestCase::run("engine-gpu-no-gpu", DEFAULT_BUDGET, |case| {
        let dl = case.deadline();
        let controller = start_controller()?;
        let mut vm = node_vm(case.dir(), "engine-gpu", &image, Some(&controller))?
            .user_data(joining_user_data("engine-gpu-1", "engine"))
            .start()?;
        boot_ready(case, &mut vm)?;
        // The test image is signed (test_images::SIGNED_TEST_PROFILES): on
        // this firmware in setup mode systemd-boot enrolled its keys first.
        let sb = vm.check(
            "bootctl status 2>/dev/null | grep -i 'secure boot' || true",
            dl,
        )?;
        eprintln!("engine-gpu: {}", sb.trim());
        let said = vm
            .console()
            .lines()
            .into_iter()
            .find(|l| l.contains("aiw-agent:") && l.contains("no GPU"));
        ensure!(
            said.is_some(),
            "the agent did not say on the console that no GPU was found"
        );
        let hosts = wait_for_hosts(&controller, 1, dl)?;
        ensure!(
            sorted_modes(&hosts[0]) == ["engine"],
            "registered modes: {:?}",
            hosts[0].run_modes()
        );
        let status = agent_status(&vm, dl)?;
        ensure!(
            status["gpus"].as_array().is_some_and(|g| g.is_empty()),
            "gpus in status: {}",
            status["gpus"]
        );
        assert_active(&vm, &["docker.service"], dl)?;
        // The driver was built at image build time for this image's kernel.
        let kver = vm.check("uname -r", dl)?;
        // Debian names the DKMS-built driver nvidia-current (`modprobe nvidia` loads it).
        let vermagic = vm.check("modinfo -F vermagic nvidia-current", dl)?;
        ensure!(
            vermagic.starts_with(&format!("{} ", kver.trim())),
            "modinfo nvidia-current: vermagic {vermagic:?} is not the image kernel {kver:?}"
        );
        eprintln!(
            "engine-gpu: modinfo nvidia-current vermagic {}",
            vermagic.trim()
        );
        // No compiler, kernel headers, driver source, dkms or perl remain in the image.
        let leftovers = vm.check(
            "ls -d /usr/bin/gcc /usr/bin/cc /usr/bin/make /usr/sbin/dkms \
             /usr/lib/x86_64-linux-gnu/libperl.so.* /usr/src/linux-headers-* /usr/src/nvidia-* 2>/dev/null | wc -l",
            dl,
        )?;
        ensure!(
            leftovers.trim() == "0",
            "build tools left in the image: {leftovers}"
        );
        // Docker knows the nvidia runtime (from the baked daemon.json).
        let runtimes = vm.check(
            "docker info --format '{{range $name, $r := .Runtimes}}{{$name}} {{end}}'",
            dl,
        )?;
        ensure!(
            runtimes.split_whitespace().any(|r| r == "nvidia"),
            "docker info runtimes: {runtimes}"
        );
        eprintln!("engine-gpu: docker runtimes {}", runtimes.trim());
        healthy(case, &vm)
    });
}

/// Invalid launch data, refused with every reason at once: one boot of the
/// engine image with an unknown mode and an engine without a controller. The
/// console names the first problem, `aiw-agent status` all of them; the node
/// stays up (SSH), the role services stay down, nothing registers.
#[test]
fn invalid_user_data_is_refused_with_every_reason() {
    let image = image("engine");
    TestCase::run("invalid-user-data", DEFAULT_BUDGET, |case| {
        let dl = case.deadline();
        let ud = UserData::cloud_config()
            .setting("AIWARE_MODE", "ftp,engine")
            .setting("AIWARE_LICENSE", TEST_LICENSE);
        let reasons = [
            "unknown mode \"ftp\"",
            "mode engine needs AIWARE_CONTROLLER",
        ];
        let controller = start_controller()?;
        let mut vm = node_vm(case.dir(), "invalid", &image, Some(&controller))?
            .user_data(ud)
            .start()?;
        let report = vm.wait_for_agent(dl)?;
        case.timing("boot to agent report", vm.since_boot());
        let AgentReport::InvalidSettings(line) = report else {
            bail!("the agent accepted invalid settings: {report:?}");
        };
        ensure!(
            line.contains(reasons[0]) && line.contains(" more: see aiw-agent status"),
            "console line {line:?} does not name {:?} and point to the others",
            reasons[0]
        );
        vm.wait_ssh(dl)?;
        let status = agent_status(&vm, dl)?;
        let errors = status["validation_errors"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e.as_str())
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default();
        for reason in reasons {
            ensure!(
                errors.contains(reason),
                "aiw-agent status errors {errors} do not mention {reason:?}"
            );
        }
        ensure!(
            status["settings_valid"] == false,
            "status says settings valid: {status}"
        );
        assert_not_active(&vm, &["docker.service"], dl)?;
        assert_no_failed_units(&vm, dl)?;
        assert_console_clean(&vm, &[])?;
        ensure!(
            controller.hosts().is_empty(),
            "a node with invalid settings registered"
        );
        Ok(())
    });
}

// ---------------------------------------------------------------------------
// Host actions on real Docker (issue 11): the Edge API test controller (a
// TEST DOUBLE) queues HostActions, the engine's aiw-agent carries them out
// through the Docker Engine API, and every step is read back both from the
// status reports and from Docker itself.

/// The engine id of the test's launches.
const TASK_ENGINE: &str = "eng-task";
/// An env value the controller sends that must never reach a log or a report.
const TASK_SECRET: &str = "task-secret-7c1d9e";
/// The status interval the engine test asks for (AIWARE_AGENT_UPDATE_INTERVAL).
const STATUS_INTERVAL_S: u64 = 5;

fn task_launch(id: &str, image: &str) -> serde_json::Value {
    serde_json::json!({
        "launchId": id, "engineId": TASK_ENGINE, "buildId": "build-1",
        "dockerImage": image, "name": format!("task {id}"),
    })
}

/// Queues `action` (unless null) and waits for a later status report for
/// which `pred` holds; the error names the last report.
fn queue_and_wait(
    controller: &EdgeTestController,
    host: &str,
    action: serde_json::Value,
    what: &str,
    dl: &Deadline,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    let after = controller.statuses(host).len();
    if !action.is_null() {
        ensure!(
            controller.queue_actions(host, action),
            "the controller does not know host {host}"
        );
    }
    controller
        .wait_for_status(host, after, dl.cap(Duration::from_secs(150)), pred)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no status report showed {what}; the last: {}",
                controller
                    .statuses(host)
                    .last()
                    .map(|s| s.to_string())
                    .unwrap_or_default()
            )
        })
}

/// Queues `action` (unless null) and waits for a report listing `launch` in `state`.
fn wait_for_state(
    controller: &EdgeTestController,
    host: &str,
    action: serde_json::Value,
    launch: &str,
    state: &str,
    dl: &Deadline,
) -> Result<serde_json::Value> {
    queue_and_wait(
        controller,
        host,
        action,
        &format!("{launch} {state}"),
        dl,
        |s| container_of(s, launch).is_some_and(|c| c["state"] == state),
    )
}

/// Every actionError reported after the first `after` reports, by launchID.
fn action_errors(
    controller: &EdgeTestController,
    host: &str,
    after: usize,
) -> std::collections::BTreeMap<String, String> {
    errors_in(&controller.statuses(host), after)
}

fn errors_in(
    statuses: &[serde_json::Value],
    after: usize,
) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    for st in statuses.iter().skip(after) {
        for e in st["actionErrors"].as_array().into_iter().flatten() {
            out.insert(
                e["launchID"].as_str().unwrap_or("").to_string(),
                e["reason"].as_str().unwrap_or("").to_string(),
            );
        }
    }
    out
}

/// How many containers (running or not) Docker has for `launch`.
fn docker_count(vm: &Vm, launch: &str, dl: &Deadline) -> Result<usize> {
    let out = vm.check(
        &format!("docker ps -aq --filter label={LAUNCH_LABEL}={launch} | wc -l"),
        dl,
    )?;
    Ok(out.trim().parse()?)
}

/// Before the reboot: launch (env, /cache, labels, reservations), the refusals
/// (bad image, shell metacharacters, a GPU task on a node without one), an
/// agent restart that re-adopts and never starts twice, pause and resume,
/// drain, runtimeTTL, terminateContainer. Leaves `L-reboot` running.
fn host_actions_before_reboot(
    case: &TestCase,
    vm: &Vm,
    controller: &EdgeTestController,
    host: &str,
    controller_url: &str,
) -> Result<()> {
    let dl = case.deadline();
    let loaded = vm.check_with_input("docker load", &task_image_archive()?, dl)?;
    ensure!(loaded.contains(TASK_TAG), "docker load said: {loaded}");

    // One reply with five launches: two run, three are refused.
    let mut l1 = task_launch("L-env", TASK_TAG);
    l1["env"] = serde_json::json!([
        {"key": "TASK_NOTE", "value": "from the controller"},
        {"key": "TASK_SECRET", "value": TASK_SECRET},
    ]);
    l1["containerConfig"] = serde_json::json!({"commandLine": [
        TASK_BUSYBOX, "sh", "-c",
        "env > \"$AIWARE_ENGINE_INSTANCE_SCRATCH/env\" && echo done > \"$AIWARE_ENGINE_INSTANCE_SCRATCH/result\" && exec sleep 3600",
    ]});
    l1["softMinMemory"] = serde_json::json!(64 << 20);
    l1["runtimeTTL"] = serde_json::json!(3600);
    let mut ttl = task_launch("L-ttl", TASK_TAG);
    ttl["runtimeTTL"] = serde_json::json!(1);
    let mut gpu = task_launch("L-gpu", TASK_TAG);
    gpu["isGPU"] = serde_json::json!(true);
    let bad_image = task_launch("L-absent", "127.0.0.1:5999/aiwimg-test/absent:1");
    let shell = task_launch("L-shell", "aiwimg-test/task:1;reboot");
    let after = controller.statuses(host).len();
    let launched_at = std::time::Instant::now();
    let st = queue_and_wait(
        controller,
        host,
        serde_json::json!({"launchContainer": [l1, ttl, gpu, bad_image, shell]}),
        "L-env and L-ttl running",
        dl,
        |s| {
            ["L-env", "L-ttl"]
                .iter()
                .all(|l| container_of(s, l).is_some_and(|c| c["state"] == "running"))
        },
    )?;
    case.timing(
        "launchContainer to running (preloaded image)",
        launched_at.elapsed(),
    );
    ensure!(
        st["numContainers"] == 2 && st["numEngineInstances"] == 2,
        "counts in {st}"
    );
    let c1 = container_of(&st, "L-env").expect("listed");
    ensure!(
        c1["engineID"] == TASK_ENGINE
            && c1["dockerContainerId"]
                .as_str()
                .is_some_and(|i| i.len() == 64)
            && c1["memoryUsed"].is_number()
            && c1["CPUUtilization"].is_number(),
        "containerStatus of L-env: {c1}"
    );
    let l1_id = c1["dockerContainerId"].as_str().unwrap_or("").to_string();
    // The refusals, each with its reason, in this or a later report.
    // (wait_for holds the controller's lock: read the hosts it passes.)
    let mut errors = action_errors(controller, host, after);
    controller.wait_for(dl.cap(Duration::from_secs(120)), |hosts| {
        let statuses = hosts.iter().find(|h| h.host_id == host);
        errors = statuses
            .map(|h| errors_in(&h.statuses, after))
            .unwrap_or_default();
        ["L-gpu", "L-absent", "L-shell"]
            .iter()
            .all(|l| errors.contains_key(*l))
    });
    for (launch, says) in [
        ("L-gpu", "GPU"),
        ("L-absent", "absent"),
        ("L-shell", "not a valid image reference"),
    ] {
        let reason = errors.get(launch).ok_or_else(|| {
            anyhow::anyhow!("{launch} was never reported refused; errors: {errors:?}")
        })?;
        ensure!(reason.contains(says), "{launch} refused with {reason:?}");
        eprintln!("qemu-tests: {launch} refused: {reason}");
    }
    for launch in ["L-gpu", "L-absent", "L-shell"] {
        ensure!(
            docker_count(vm, launch, dl)? == 0,
            "Docker has a container of refused {launch}"
        );
    }

    // What the task saw: the documented engine env and the scratch on /cache.
    let scratch = format!("/cache/engine/{TASK_ENGINE}/L-env");
    let seen = vm.check(&format!("cat {scratch}/env; cat {scratch}/result"), dl)?;
    let env: std::collections::BTreeMap<&str, &str> =
        seen.lines().filter_map(|l| l.split_once('=')).collect();
    for (key, want) in [
        ("AIWARE_HOST_ID", host),
        ("AIWARE_ID", "L-env"),
        ("AIWARE_LAUNCH_ID", "L-env"),
        ("AIWARE_ENGINE_ID", TASK_ENGINE),
        ("ENGINE_ID", TASK_ENGINE),
        ("AIWARE_CONTROLLER", controller_url),
        ("AIWARE_LICENSE", TEST_LICENSE),
        (
            "AIWARE_ENGINE_SCRATCH",
            &format!("/cache/engine/{TASK_ENGINE}/scratch"),
        ),
        ("AIWARE_ENGINE_INSTANCE_SCRATCH", &scratch),
        ("TASK_NOTE", "from the controller"),
    ] {
        ensure!(
            env.get(key) == Some(&want),
            "the task saw {key}={:?}, want {want:?}; its env:\n{seen}",
            env.get(key)
        );
    }
    ensure!(
        env.get("AIWARE_EXPIRATION")
            .is_some_and(|e| e.ends_with('Z')),
        "AIWARE_EXPIRATION: {:?}",
        env.get("AIWARE_EXPIRATION")
    );
    ensure!(
        seen.lines().last() == Some("done"),
        "the task's result: {seen}"
    );
    let inspect = vm.check(
        &format!("docker inspect --format '{{{{.HostConfig.AutoRemove}}}} {{{{.HostConfig.MemoryReservation}}}} {{{{range .Mounts}}}}{{{{.Destination}}}}{{{{end}}}} {{{{index .Config.Labels \"ai.veritone.aiware.engine-id\"}}}}' {l1_id}"),
        dl,
    )?;
    ensure!(
        inspect.trim() == format!("true {} /cache {TASK_ENGINE}", 64 << 20),
        "docker inspect of L-env: {inspect}"
    );

    // The agent restarted: it re-adopts L-env, and the controller sending the
    // same launch again does not start a second one.
    vm.check("systemctl restart aiw-agent", dl)?;
    queue_and_wait(
        controller,
        host,
        serde_json::json!({"launchContainer": [task_launch("L-env", TASK_TAG)]}),
        "L-env after the agent restarted",
        dl,
        |s| launch_ids(s).contains(&"L-env".to_string()),
    )?;
    queue_and_wait(
        controller,
        host,
        serde_json::Value::Null,
        "a second report",
        dl,
        |_| true,
    )?;
    ensure!(
        docker_count(vm, "L-env", dl)? == 1,
        "L-env runs twice after an agent restart and a resent launch"
    );

    // pause and resume (the admin endpoints set the host's mode).
    controller.set_mode(host, "pause");
    wait_for_state(
        controller,
        host,
        serde_json::Value::Null,
        "L-env",
        "paused",
        dl,
    )?;
    let paused = vm.check(
        &format!("docker inspect --format '{{{{.State.Paused}}}}' {l1_id}"),
        dl,
    )?;
    ensure!(paused.trim() == "true", "Docker says paused={paused}");
    controller.set_mode(host, "continue");
    wait_for_state(
        controller,
        host,
        serde_json::Value::Null,
        "L-env",
        "running",
        dl,
    )?;

    // drain: a new launch is refused, the running one goes on.
    controller.set_mode(host, "drain");
    let after = controller.statuses(host).len();
    let st = queue_and_wait(
        controller,
        host,
        serde_json::json!({"launchContainer": [task_launch("L-drained", TASK_TAG)]}),
        "L-drained refused",
        dl,
        |s| s["drain"] == true && s["actionErrors"].to_string().contains("L-drained"),
    )?;
    ensure!(
        launch_ids(&st).contains(&"L-env".to_string()),
        "L-env stopped on drain: {st}"
    );
    let reason = action_errors(controller, host, after)
        .remove("L-drained")
        .unwrap_or_default();
    ensure!(
        reason.contains("drain"),
        "L-drained refused with {reason:?}"
    );
    ensure!(
        docker_count(vm, "L-drained", dl)? == 0,
        "L-drained started while draining"
    );
    controller.set_mode(host, "continue");

    // runtimeTTL 1 s: the agent stopped L-ttl once its grace was over.
    let st = queue_and_wait(
        controller,
        host,
        serde_json::Value::Null,
        "L-ttl gone",
        dl,
        |s| !launch_ids(s).contains(&"L-ttl".to_string()),
    )?;
    ensure!(launch_ids(&st) == ["L-env"], "after the TTL: {st}");
    ensure!(docker_count(vm, "L-ttl", dl)? == 0, "L-ttl still in Docker");

    // terminateContainer by Docker's id.
    queue_and_wait(
        controller,
        host,
        serde_json::json!({"terminateContainer": [{"dockerContainerId": l1_id}]}),
        "L-env terminated",
        dl,
        |s| s["numContainers"] == 0,
    )?;
    ensure!(docker_count(vm, "L-env", dl)? == 0, "L-env still in Docker");

    // Secrets never reach the reports or the agent's journal.
    let reports = serde_json::to_string(&controller.statuses(host))?;
    ensure!(
        !reports.contains(TASK_SECRET),
        "a status report holds the task's secret env"
    );
    let leaks = vm.check(
        &format!("journalctl -b -u aiw-agent --no-pager | grep -c {TASK_SECRET} || true"),
        dl,
    )?;
    ensure!(
        leaks.trim() == "0",
        "the agent's journal holds the task's secret env"
    );

    // One task left running into the reboot.
    wait_for_state(
        controller,
        host,
        serde_json::json!({"launchContainer": [task_launch("L-reboot", TASK_TAG)]}),
        "L-reboot",
        "running",
        dl,
    )?;
    Ok(())
}

/// After the reboot: the task that ran into it ended with the boot (auto-
/// removed) and is reported as gone, never started again.
fn host_actions_after_reboot(
    vm: &Vm,
    controller: &EdgeTestController,
    host: &str,
    dl: &Deadline,
) -> Result<()> {
    let st = queue_and_wait(
        controller,
        host,
        serde_json::Value::Null,
        "a report after the reboot",
        dl,
        |_| true,
    )?;
    queue_and_wait(
        controller,
        host,
        serde_json::Value::Null,
        "a second report after the reboot",
        dl,
        |_| true,
    )?;
    ensure!(
        st["numContainers"] == 0 && launch_ids(&st).is_empty(),
        "after the reboot the node reports {st}"
    );
    ensure!(
        docker_count(vm, "L-reboot", dl)? == 0,
        "L-reboot was started again after the reboot"
    );
    Ok(())
}

/// mode terminate: a running engine is stopped, a report says none runs, and
/// the node powers itself off.
fn host_terminates(
    vm: &mut Vm,
    controller: &EdgeTestController,
    host: &str,
    dl: &Deadline,
) -> Result<()> {
    wait_for_state(
        controller,
        host,
        serde_json::json!({"launchContainer": [task_launch("L-last", TASK_TAG)]}),
        "L-last",
        "running",
        dl,
    )?;
    controller.set_mode(host, "terminate");
    queue_and_wait(
        controller,
        host,
        serde_json::Value::Null,
        "none running on terminate",
        dl,
        |s| s["numContainers"] == 0 && s["drain"] == true,
    )?;
    ensure!(
        vm.wait_powered_off(dl.cap(Duration::from_secs(180)))?,
        "the node did not power off after mode terminate"
    );
    Ok(())
}

/// cloud-config `disk_setup`, `fs_setup` and `mounts` (issue 13): a blank
/// data disk as the guide recommends for engines, in cloud-init's forms.
const DATA_DISK_YAML: &str = "disk_setup:
  /dev/vdb:
    table_type: gpt
    layout: [60, 40]
    overwrite: false
fs_setup:
  - label: aiware
    filesystem: ext4
    device: /dev/vdb
    partition: auto
  - label: docker
    filesystem: ext4
    device: /dev/vdb
    partition: 2
mounts:
  - [ LABEL=aiware, /opt/aiware, ext4, \"defaults,nofail\", \"0\", \"2\" ]
  - [ LABEL=docker, /var/lib/docker, ext4, \"defaults,nofail\", \"0\", \"2\" ]
swap:
  filename: /var/swap.img
  size: 64M";

/// What is mounted at `point` in the guest: `SOURCE FSTYPE LABEL`.
fn mounted(vm: &Vm, point: &str, dl: &Deadline) -> Result<String> {
    Ok(vm
        .check(&format!("findmnt -n -o SOURCE,FSTYPE,LABEL {point}"), dl)?
        .trim()
        .to_string())
}

/// The data disk's layout on this boot, and that nothing failed applying it.
fn data_disk_in_place(vm: &Vm, dl: &Deadline) -> Result<()> {
    let opt = mounted(vm, "/var/opt/aiware", dl)?;
    ensure!(opt == "/dev/vdb1 ext4 aiware", "/opt/aiware: {opt:?}");
    let docker = mounted(vm, "/var/lib/docker", dl)?;
    ensure!(
        docker == "/dev/vdb2 ext4 docker",
        "/var/lib/docker: {docker:?}"
    );
    // Docker runs on it: started again after the mount, its data there.
    assert_active(vm, &["docker.service"], dl)?;
    let root = vm.check("docker info -f '{{.DockerRootDir}}'", dl)?;
    ensure!(root.trim() == "/var/lib/docker", "DockerRootDir {root:?}");
    vm.check(
        "test -d /var/lib/docker/image && test -d /var/opt/aiware/engine",
        dl,
    )?;
    let status = agent_status(vm, dl)?;
    ensure!(
        status["last_error"].is_null() && status["settings_valid"] == true,
        "aiw-agent status: last_error {} valid {}",
        status["last_error"],
        status["settings_valid"]
    );
    Ok(())
}

/// Issue 13's declarative cloud-config on one engine: a blank virtio disk
/// laid out by `disk_setup`/`fs_setup`/`mounts` (/opt/aiware and Docker's
/// data on it), a user from `users` who logs in with their key, `ntp`,
/// `timezone`, and a controller over https trusted through `ca_certs` only.
/// A reboot changes nothing; the same disks launched as another instance
/// with another layout keep every byte it does not name.
///
/// Registry trust (issue 15 §5) on the same boots: Docker pulls over TLS
/// from a registry whose certificate comes from the CA given in `ca_certs`;
/// a plain-HTTP registry at another private address is refused until a
/// launch names it (`AIWARE_REGISTRY=http://…`, the relaunch).
#[test]
fn engine_data_disk_from_cloud_config() {
    let image = image("engine");
    TestCase::run("engine-data-disk", DEFAULT_BUDGET, |case| {
        let dl = case.deadline();
        let disk = case.dir().join("data.raw");
        std::fs::File::create(&disk)?.set_len(2 << 30)?;
        let controller = start_controller()?;
        // The controller over https from a private CA the node is given only
        // in cloud-config `ca_certs` (no AIWARE_CONTROLLER_CA): the agent
        // trusts what the system trusts.
        let addr = CONTROLLER_GUEST_ADDR;
        let ca = TestCa::new()?;
        let front = TlsFront::start_with_ca(controller.addr(), &[&addr.to_string()], &ca)?;
        // Two real registries on the host's loopback, each seen by the guest
        // at a private address of its own: one over TLS from the cluster's
        // CA, one over plain HTTP. Both hold the same test image.
        let leaf = ca.issue(&[&TLS_REGISTRY.to_string()], "registry (TEST)")?;
        let tls_registry = LocalRegistry::start_tls(&case.dir().join("registry-tls"), &leaf)?;
        let http_registry = LocalRegistry::start(&case.dir().join("registry-http"))?;
        let archive = case.dir().join("hello.tar");
        std::fs::write(&archive, hello_image_archive())?;
        for r in [&tls_registry, &http_registry] {
            r.push_archive(&archive, HELLO_TAG)?;
        }
        let mut builder = node_vm(case.dir(), "data-disk", &image, None)?
            .guest_forward(addr, 443, front.addr().port())?
            .guest_forward(TLS_REGISTRY, 5000, loopback_port(&tls_registry.addr)?)?
            .guest_forward(HTTP_REGISTRY, 5000, loopback_port(&http_registry.addr)?)?
            .drive(qemu_tests::ExtraDrive {
                path: disk.clone(),
                format: qemu_tests::DiskFormat::Raw,
                bus: qemu_tests::DriveBus::Virtio,
                read_only: false,
            });
        let key = builder.ssh_public_key()?;
        let ud = UserData::cloud_config()
            .hostname("data-disk-1")
            .setting("AIWARE_MODE", "engine")
            .setting("AIWARE_LICENSE", TEST_LICENSE)
            .setting("AIWARE_CONTROLLER", &format!("https://{addr}/edge/v1"))
            .setting("AIWARE_INIT_TOKEN", TEST_INIT_TOKEN)
            .raw_yaml(DATA_DISK_YAML)
            .raw_yaml(&os_config_yaml(&key, front.ca_pem()));
        let mut vm = builder.user_data(ud).start()?;
        boot_ready(case, &mut vm)?;
        wait_for_hosts(&controller, 1, dl)?;
        data_disk_in_place(&vm, dl)?;
        let parts = vm.check("lsblk -n -o NAME,SIZE,PARTTYPENAME /dev/vdb", dl)?;
        eprintln!("qemu-tests: data disk:\n{}", parts.trim_end());
        let first = vm.check(
            "journalctl -b -u aiw-agent -o cat | grep -E 'aiw-agent: (disk_setup|fs_setup|mounts|users|ntp|timezone|ca_certs)[: ]'",
            dl,
        )?;
        eprintln!("qemu-tests: first boot:\n{}", first.trim_end());
        ensure!(
            first.contains("GPT table written") && first.contains("made ext4 labelled docker"),
            "first boot did not lay the disk out:\n{first}"
        );
        ensure!(
            first.contains("users: ops (uid ") && first.contains("home /home/ops made"),
            "first boot did not make the user:\n{first}"
        );
        let ops = os_config_in_place(&vm, dl)?;
        registry_trust(&vm, false, dl)?;
        let swap_inode = swap_on(&vm, dl)?;
        vm.check("echo kept > /opt/aiware/marker && sync", dl)?;
        ops.check("echo mine > ~/notes && sync", dl)?;

        // A second boot changes nothing: kept, mounted again, data there.
        let again = vm.reboot(dl)?;
        ensure!(
            matches!(again, AgentReport::Ready(_)),
            "second boot: {again:?}"
        );
        case.timing("reboot to ready", vm.since_boot());
        vm.wait_ssh(dl)?;
        data_disk_in_place(&vm, dl)?;
        ensure!(
            vm.check("cat /opt/aiware/marker", dl)?.trim() == "kept",
            "marker lost"
        );
        let second = vm.check(
            "journalctl -b -u aiw-agent -o cat | grep -E 'aiw-agent: (disk_setup|fs_setup|mounts|users) '",
            dl,
        )?;
        eprintln!("qemu-tests: second boot:\n{}", second.trim_end());
        ensure!(
            !second.contains("written") && !second.contains("made "),
            "the second boot partitioned, formatted or made a home again:\n{second}"
        );
        let ops = os_config_in_place(&vm, dl)?;
        ensure!(
            swap_on(&vm, dl)? == swap_inode,
            "the swap file was made again"
        );
        ensure!(
            ops.check("cat ~/notes", dl)?.trim() == "mine",
            "the user's file in their home is lost"
        );

        // The same disks launched as another instance with another layout:
        // applied from scratch, and what it does not name is left alone.
        let other = UserData::cloud_config()
            .hostname("data-disk-2")
            .setting("AIWARE_MODE", "engine")
            .setting("AIWARE_LICENSE", TEST_LICENSE)
            .setting("AIWARE_CONTROLLER", &format!("https://{addr}/edge/v1"))
            .setting("AIWARE_INIT_TOKEN", TEST_INIT_TOKEN)
            .setting("AIWARE_REGISTRY", &format!("http://{HTTP_REGISTRY}:5000"))
            .raw_yaml(OTHER_LAYOUT_YAML)
            .raw_yaml(&format!(
                "users:\n  - name: dev\n    ssh_authorized_keys: [{key}]\n{}",
                ca_certs_yaml(front.ca_pem())
            ));
        vm.relaunch(other, "data-disk-other-instance", dl)?;
        let third = vm.wait_for_agent(dl)?;
        ensure!(
            matches!(third, AgentReport::Ready(_)),
            "as another instance: {third:?}"
        );
        vm.wait_ssh(dl)?;
        let log = vm.check(
            "journalctl -b -u aiw-agent -o cat | grep -E 'aiw-agent: (disk_setup|fs_setup|mounts|users)[: ]'",
            dl,
        )?;
        eprintln!("qemu-tests: as another instance:\n{}", log.trim_end());
        ensure!(
            !log.contains("written") && !log.contains("made ext4"),
            "another instance partitioned or formatted a disk with data:\n{log}"
        );
        let opt = mounted(&vm, "/var/opt/aiware", dl)?;
        let mnt = mounted(&vm, "/mnt", dl)?;
        ensure!(
            opt == "/dev/vdb1 ext4 aiware" && mnt == "/dev/vdb2 ext4 docker",
            "the other layout: /opt/aiware {opt:?}, /mnt {mnt:?}"
        );
        let found = vm.check(
            "cat /opt/aiware/marker; test -d /mnt/image && echo docker-data; \
             cat /var/home/ops/notes; getent passwd ops || echo no-ops; getent passwd dev | cut -d: -f6; \
             findmnt -n /var/lib/docker || echo docker-on-var",
            dl,
        )?;
        ensure!(
            found.split_whitespace().collect::<Vec<_>>()
                == [
                    "kept",
                    "docker-data",
                    "mine",
                    "no-ops",
                    "/home/dev",
                    "docker-on-var"
                ],
            "after the relaunch: {found:?}"
        );
        // Docker kept running through the agent's work (its data stayed on
        // /var): the launch's plain-HTTP registry reached it by a reload.
        registry_trust(&vm, true, dl)?;
        let mut dev = vm.ssh()?.clone();
        dev.user = "dev".into();
        ensure!(
            dev.check("id -un", dl)?.trim() == "dev",
            "dev cannot log in"
        );
        // Not the owner of the home ops left behind.
        let owners = vm.check("stat -c %u /var/home/ops; id -u dev", dl)?;
        let owners: Vec<&str> = owners.split_whitespace().collect();
        ensure!(
            owners.len() == 2 && owners[0] != owners[1],
            "dev got the number of ops's home: {owners:?}"
        );
        ensure!(
            dev.run("cat /var/home/ops/notes", dl)?.status != Some(0),
            "dev can read ops's files"
        );
        healthy(case, &vm)
    });
}

/// Where the guest reaches the data-disk test's registries (guestfwd to the
/// host's loopback, port 5000 each).
const TLS_REGISTRY: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 0, 2, 110);
const HTTP_REGISTRY: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 0, 2, 111);

fn loopback_port(addr: &str) -> Result<u16> {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no port in {addr}"))
}

/// Docker pulls the test image over TLS from [`TLS_REGISTRY`] (trusted
/// through `ca_certs` alone) and runs it; from [`HTTP_REGISTRY`], plain
/// HTTP at another private address, only when the launch named it.
fn registry_trust(vm: &Vm, http_named: bool, dl: &Deadline) -> Result<()> {
    let said = vm.check(
        "journalctl -b -u aiw-agent -o cat | grep 'aiw-agent: registry trust'",
        dl,
    )?;
    eprintln!("qemu-tests: {}", said.trim_end());
    let tls_ref = format!("{TLS_REGISTRY}:5000/{HELLO_TAG}");
    let ran = vm.check(
        &format!("docker pull -q {tls_ref} >/dev/null && docker run --rm {tls_ref}"),
        dl,
    )?;
    ensure!(
        ran.trim() == HELLO_LINE,
        "pulled over TLS, the image printed {ran:?}"
    );
    eprintln!("qemu-tests: docker pull {tls_ref}: pulled over TLS and ran");
    let http_ref = format!("{HTTP_REGISTRY}:5000/{HELLO_TAG}");
    let out = vm.run(&format!("docker pull {http_ref} 2>&1"), dl)?;
    let last = out.stdout.trim().lines().last().unwrap_or("").to_string();
    eprintln!(
        "qemu-tests: docker pull {http_ref} (named: {http_named}): exit {:?}: {last}",
        out.status
    );
    if http_named {
        ensure!(
            out.status == Some(0)
                && said.contains(&format!("plain HTTP from {HTTP_REGISTRY}:5000 only")),
            "the launch named {http_ref}'s registry but: {said} / {}",
            out.stdout
        );
    } else {
        ensure!(
            out.status != Some(0)
                && out
                    .stdout
                    .contains("server gave HTTP response to HTTPS client")
                && said.contains("every registry over verified TLS"),
            "a plain-HTTP registry at a private address was not refused: {said} / {}",
            out.stdout
        );
    }
    Ok(())
}

/// The data disk as another instance sees it: the same table and file
/// systems asked for differently (kept: `overwrite` is false), Docker's old
/// partition mounted aside on /mnt, Docker back on /var.
const OTHER_LAYOUT_YAML: &str = "disk_setup:
  /dev/vdb: {table_type: gpt, layout: [50, 50], overwrite: false}
fs_setup:
  - {label: scratch, filesystem: ext4, device: /dev/vdb, partition: 2}
mounts:
  - [ LABEL=aiware, /opt/aiware, ext4, \"defaults,nofail\", \"0\", \"2\" ]
  - [ LABEL=docker, /mnt, ext4, \"defaults,nofail\", \"0\", \"2\" ]";

/// cloud-config `users`, `groups`, `ntp`, `timezone` and `ca_certs` (issue
/// 13): a user `ops` who logs in with `key`, in groups docker and adm and
/// the launch's own night-shift, with sudo;
/// time servers; Berlin's zone; `ca_pem` trusted.
fn os_config_yaml(key: &str, ca_pem: &str) -> String {
    format!(
        "users:
  - default
  - name: ops
    gecos: Night Operator
    groups: docker, adm
    sudo: ALL=(ALL) NOPASSWD:ALL
    lock_passwd: true
    ssh_authorized_keys:
      - {key}
groups:
  - night-shift: [ops]
ntp:
  servers: [10.0.2.123]
  pools: [pool.aiwimg-test.invalid]
timezone: Europe/Berlin
{}",
        ca_certs_yaml(ca_pem)
    )
}

/// The user logs in with their key into a home on /var, is in their groups
/// and may sudo; the zone is Berlin's; timesyncd asks the servers given; the
/// system's CA bundle holds the image's CAs and the one given. Returns an
/// SSH connection as the user.
fn os_config_in_place(vm: &Vm, dl: &Deadline) -> Result<qemu_tests::ssh::GuestSsh> {
    let entry = vm.check("getent passwd ops", dl)?;
    ensure!(
        entry.contains(":Night Operator:/home/ops:/bin/bash"),
        "getent passwd ops: {entry:?}"
    );
    let mut ops = vm.ssh()?.clone();
    ops.user = "ops".into();
    let id = ops.check("id -nG && echo $HOME && readlink -f ~ && sudo -n id -u", dl)?;
    eprintln!("qemu-tests: as ops: {}", id.trim().replace('\n', " | "));
    let lines: Vec<&str> = id.lines().collect();
    ensure!(
        lines.len() == 4
            && lines[0].split(' ').any(|g| g == "docker")
            && lines[0].split(' ').any(|g| g == "adm")
            && lines[0].split(' ').any(|g| g == "night-shift")
            && lines[1] == "/home/ops"
            && lines[2] == "/var/home/ops"
            && lines[3] == "0",
        "ops: groups, home or sudo wrong: {id:?}"
    );
    ops.check("docker ps -q >/dev/null", dl)?;
    let tz = vm.check("readlink -f /etc/localtime; date +%z", dl)?;
    ensure!(
        tz.starts_with("/usr/share/zoneinfo/Europe/Berlin\n")
            && matches!(tz.lines().nth(1), Some("+0100" | "+0200")),
        "time zone: {tz:?}"
    );
    let ntp = vm.check(
        "systemctl is-active systemd-timesyncd && timedatectl show-timesync -p SystemNTPServers --value",
        dl,
    )?;
    ensure!(
        ntp.contains("10.0.2.123 pool.aiwimg-test.invalid"),
        "timesyncd's servers: {ntp:?}"
    );
    let cas = vm.check(
        "grep -c 'BEGIN CERTIFICATE' /etc/ssl/certs/ca-certificates.crt; grep -c 'BEGIN CERTIFICATE' /usr/share/aiwimg/ca-certificates.crt",
        dl,
    )?;
    let n: Vec<usize> = cas.lines().filter_map(|l| l.trim().parse().ok()).collect();
    ensure!(
        n.len() == 2 && n[1] > 100 && n[0] == n[1] + 1,
        "CA bundle: {cas:?} (the system's, then the image's)"
    );
    Ok(ops)
}

/// The `luksDump` lines that show how /var's key is sealed (the token).
fn sealed_token(dump: &str) -> Vec<&str> {
    dump.lines()
        .skip_while(|l| !l.starts_with("Tokens:"))
        .take_while(|l| !l.starts_with("Digests:"))
        .collect()
}

/// `engine-tpm` (issue 15 §4): /var is a LUKS2 volume sealed to the TPM2
/// (swtpm) at first boot, against PCR 7. One VM, one disk:
/// 1. first boot: /var is `/dev/mapper/aiw-var`, `luksDump` shows a
///    systemd-tpm2 token on PCR 7, the node joins;
/// 2. an update to 0.2.0 (another UKI, another root; systemd-sysupdate) and
///    its reboot: /var unlocks with no prompt, the file written before and
///    the host ID are kept;
/// 3. the disk on another machine (a new swtpm) and on one with no TPM:
///    it does not unlock; the console and `aiw-agent status` say why, the
///    node does not join and its old /var stays locked, not lost:
/// 4. back on its own TPM it unlocks again, the file still there.
#[test]
fn engine_tpm_seals_var_to_its_own_tpm() {
    let image = image("engine-tpm");
    let v2 = later_version("engine-tpm", UPDATE_VERSION)
        .unwrap_or_else(|e| panic!("no engine-tpm {UPDATE_VERSION} to update to: {e:#}"));
    TestCase::run("engine-tpm", DEFAULT_BUDGET * 3, |case| {
        let dl = case.deadline();
        let updates = UpdateServer::start(&case.dir().join("update-server"))?;
        eprintln!("qemu-tests: {}", updates.publish(&v2)?);
        let controller = start_controller()?;
        let own_tpm = case.dir().join("tpm-of-this-machine");
        let mut vm = node_vm(case.dir(), "engine-tpm", &image, Some(&controller))?
            .guest_forward(UPDATE_GUEST_ADDR, UPDATE_GUEST_PORT, updates.port)?
            .tpm(&own_tpm)
            .user_data(joining_user_data("engine-tpm-1", "engine"))
            .start()?;
        boot_ready(case, &mut vm)?;
        let hosts = wait_for_hosts(&controller, 1, dl)?;
        let host_id = hosts[0].host_id.clone();
        let unlocked = |vm: &Vm, when: &str| -> Result<()> {
            let source = vm.check("findmnt -n -o SOURCE /var", dl)?;
            ensure!(
                source.trim() == "/dev/mapper/aiw-var",
                "{when}: /var is {source:?}, not the unlocked LUKS volume"
            );
            let marker = vm.check("cat /var/lib/aiware/tpm-test-marker 2>&1 || true", dl)?;
            ensure!(
                marker.trim() == "written on the first boot",
                "{when}: /var/lib/aiware/tpm-test-marker: {marker:?}"
            );
            let said = agent_status(vm, dl)?;
            ensure!(
                said["join"]["state"] == "joined" && said["join"]["host_id"] == host_id.as_str(),
                "{when}: aiw-agent status join: {}",
                said["join"]
            );
            ensure!(
                !vm.boot_lines().iter().any(|l| l.contains("assphrase")),
                "{when}: a passphrase was asked for"
            );
            eprintln!("qemu-tests: {when}: /var unlocked by the TPM, host ID {host_id} kept");
            Ok(())
        };

        let dump = vm.check("cryptsetup luksDump /dev/disk/by-partlabel/aiw-var", dl)?;
        let token = sealed_token(&dump);
        eprintln!(
            "qemu-tests: cryptsetup luksDump (tokens):\n{}",
            token.join("\n")
        );
        ensure!(
            token.iter().any(|l| l.contains("systemd-tpm2"))
                && token
                    .iter()
                    .any(|l| l.contains("tpm2-hash-pcrs:") && l.trim().ends_with(" 7")),
            "/var is not sealed to PCR 7 of the TPM:\n{dump}"
        );
        vm.check(
            "echo 'written on the first boot' > /var/lib/aiware/tpm-test-marker && sync",
            dl,
        )?;
        unlocked(&vm, "first boot")?;
        healthy(case, &vm)?;

        // An update: another UKI and root, the same Secure Boot policy.
        let applied = vm.check("aiw-agent update apply 2>/dev/null", dl)?;
        ensure!(
            applied.contains(&format!("installed {UPDATE_VERSION}")),
            "aiw-agent update apply: {applied}"
        );
        vm.reboot(dl)?;
        vm.wait_ssh(dl)?;
        runs_version(&vm, &v2, dl)?;
        unlocked(&vm, &format!("after the update to {UPDATE_VERSION}"))?;
        healthy(case, &vm)?;

        // The disk on machines whose TPM cannot unseal it.
        for (tpm, why) in [
            (
                Some(case.dir().join("tpm-of-another-machine")),
                "the TPM2 did not unseal /var",
            ),
            (None, "this machine has no TPM2"),
        ] {
            let which = if tpm.is_some() {
                "another TPM"
            } else {
                "no TPM"
            };
            vm.power_cycle_with_tpm(tpm.as_deref(), dl)?;
            let line = vm.wait_for_line("/var is not available", dl)?;
            eprintln!("qemu-tests: {which}: console: {}", line.trim());
            ensure!(line.contains(why), "{which}: the console says: {line}");
            let agent = vm.wait_for_line("no mode is started", dl)?;
            eprintln!("qemu-tests: {which}: console: {}", agent.trim());
            vm.wait_ssh(dl)?;
            let said = agent_status(&vm, dl)?;
            ensure!(
                said["phase"] == "no-persistent-storage"
                    && said["last_error"].as_str().is_some_and(|e| e.contains(why))
                    && said["join"]["state"] == "not-configured",
                "{which}: aiw-agent status: {said}"
            );
            let human = vm.check("aiw-agent status", dl)?;
            eprintln!(
                "qemu-tests: {which}: aiw-agent status:\n{}",
                human.trim_end()
            );
            let fs = vm.check("findmnt -n -o FSTYPE /var; ls /var/lib/aiware", dl)?;
            ensure!(
                fs.starts_with("tmpfs") && !fs.contains("tpm-test-marker"),
                "{which}: /var: {fs}"
            );
            let cryptsetup = vm.check(
                "journalctl -b -u 'systemd-cryptsetup@aiw\\x2dvar.service' --no-pager -o cat | tail -4",
                dl,
            )?;
            eprintln!(
                "qemu-tests: {which}: systemd-cryptsetup said:\n{}",
                cryptsetup.trim_end()
            );
            ensure!(
                controller.hosts().len() == 1,
                "{which}: the node joined again: {:?}",
                controller.hosts()
            );
        }

        // Its own TPM again: nothing was lost.
        vm.power_cycle_with_tpm(Some(&own_tpm), dl)?;
        vm.wait_ready(dl)?;
        vm.wait_ssh(dl)?;
        unlocked(&vm, "back on its own TPM")?;
        Ok(())
    });
}
