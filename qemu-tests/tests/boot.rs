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
use qemu_tests::docker_archive::{hello_image_archive, HELLO_LINE, HELLO_TAG};
use qemu_tests::node::{
    controller_url_in_guest, joining_user_data, mode_list, node_vm, sorted_modes, start_controller,
    wait_for_hosts, CONTROLLER_GUEST_ADDR, TEST_INIT_TOKEN, TEST_LICENSE,
};
use qemu_tests::test_images::{image_for, TestImage};
use qemu_tests::tls_front::TlsFront;
use qemu_tests::{AgentReport, TestCase, UserData, Vm};

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

/// The checks every healthy node passes.
fn healthy(case: &TestCase, vm: &Vm) -> Result<()> {
    let dl = case.deadline();
    assert_no_failed_units(vm, dl)?;
    assert_console_clean(vm, &[])?;
    let status = agent_status(vm, dl)?;
    ensure!(
        status["settings_valid"] == true,
        "aiw-agent status says settings are not valid: {status}"
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
/// and the node joins again.
#[test]
fn engine_joins_over_https_runs_a_container_and_keeps_var_across_reboot() {
    let image = image("engine");
    TestCase::run("engine", DEFAULT_BUDGET + DEFAULT_BUDGET / 2, |case| {
        let dl = case.deadline();
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
            .setting("AIWARE_CONTROLLER_CA", front.ca_pem());
        let disk_gib = 12;
        let mut vm = node_vm(case.dir(), "engine", &image, None)?
            .guest_forward(addr, 443, front.addr().port())?
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

        // Across a reboot: /var and the host ID are kept, the node joins again.
        let token = format!("written-before-reboot-{}", std::process::id());
        vm.check(
            &format!(
                "mkdir -p /var/opt/aiware && echo {token} > /var/opt/aiware/persist-check && sync"
            ),
            dl,
        )?;
        let report = vm.reboot(dl)?;
        ensure!(
            matches!(report, AgentReport::Ready(_)),
            "second boot: {report:?}"
        );
        case.timing("reboot to ready", vm.since_boot());
        vm.wait_ssh(dl)?;
        let read = vm.check("cat /var/opt/aiware/persist-check", dl)?;
        ensure!(read.trim() == token, "after reboot the file holds {read:?}");
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
        healthy(case, &vm)
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
