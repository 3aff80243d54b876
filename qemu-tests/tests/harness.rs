//! The harness itself, proven on a real QEMU without an aiwimg image: OVMF
//! boots a blank disk to its boot manager. Checks console capture, the KVM
//! probe, the seed CD, deadlines with the console tail, and QMP power-off.
//! Needs QEMU and OVMF (it fails, never passes, without them); ~30 s under TCG.

use qemu_tests::accel::accel;
use qemu_tests::{Deadline, DiskFormat, TestCase, UserData, Vm};
use std::process::Command;
use std::time::Duration;

/// A blank 64 MiB raw "image": OVMF finds nothing to boot and goes to its shell.
fn blank_image(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("blank.raw");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(&p)
        .arg("64M")
        .status()
        .expect("qemu-img");
    assert!(st.success());
    p
}

#[test]
fn ovmf_boots_to_its_boot_manager_and_powers_off() {
    TestCase::run("harness-ovmf", Duration::from_secs(240), |case| {
        let choice = accel();
        assert!(!choice.reason.is_empty());
        let image = blank_image(case.dir());
        let before = std::fs::read(&image)?;
        let mut vm = Vm::builder("ovmf", case.dir())
            .disk(&image, DiskFormat::Raw)
            .memory_mib(256)
            .cpus(1)
            .smbios("type=1,manufacturer=aiwimg-test,product=harness")
            .user_data(UserData::cloud_config().setting("AIWARE_MODE", "engine"))
            .start()?;
        let line = vm.wait_for_line("BdsDxe:", case.deadline())?;
        case.timing("firmware to boot manager", vm.since_boot());
        assert!(line.starts_with("BdsDxe:"), "{line}");

        // The seed carries the test's SSH key in its user-data.
        let ud = std::fs::read_to_string(vm.dir().join("seed/user-data"))?;
        assert!(
            ud.contains("ssh_authorized_keys:") && ud.contains("ssh-ed25519 "),
            "{ud}"
        );
        assert!(vm.dir().join("seed/seed.iso").is_file());

        // A short deadline on something that never comes fails with the console tail.
        let err = vm
            .wait_for_line("no such line", &Deadline::after(Duration::from_secs(2)))
            .unwrap_err()
            .to_string();
        assert!(err.contains("timed out"), "{err}");
        assert!(err.contains("BdsDxe:"), "tail missing from: {err}");

        // The guest's disk writes go to the overlay; the image is untouched.
        assert!(vm.paths().overlay.is_file());
        // OVMF's shell ignores ACPI power-off: this also proves the kill after the grace time.
        vm.shutdown(Duration::from_secs(5))?;
        assert!(vm.ensure_running().is_err());
        assert_eq!(std::fs::read(&image)?, before);
        Ok(())
    });
}

#[test]
fn qemu_accepts_the_restricted_forwards() {
    // Construction-level check with the real QEMU: QEMU accepts the restricted
    // netdev with hostfwd and guestfwd and keeps running.
    TestCase::run("harness-netdev", Duration::from_secs(120), |case| {
        let image = blank_image(case.dir());
        let server = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = server.local_addr()?.port();
        let mut vm = Vm::builder("net", case.dir())
            .disk(&image, DiskFormat::Raw)
            .memory_mib(256)
            .cpus(1)
            .guest_forward("10.0.2.100".parse()?, 9000, port)?
            .host_forward(8000)?
            .start()?;
        vm.wait_for_line("BdsDxe:", case.deadline())?;
        vm.ensure_running()?;
        let cmdline = std::fs::read_to_string(vm.dir().join("qemu.cmdline"))?;
        assert!(cmdline.contains("restrict=on"), "{cmdline}");
        assert!(
            cmdline.contains(&format!("TCP:127.0.0.1:{port}")),
            "{cmdline}"
        );
        assert!(vm.host_port(8000).is_some());
        assert!(vm.host_port(22).is_some());
        Ok(())
    });
}
