//! Issue 15: UEFI Secure Boot, end to end under QEMU with OVMF's secboot
//! firmware (SMM, vars writable only from SMM).
//!
//! The `engine` image is built signed with a test db key (made once per
//! checkout under `target/qemu-tests/secure-boot-keys/`: a TEST KEY, never a
//! user's) and `--secure-boot-enroll if-safe`. Then, in one case:
//! 1. It boots on firmware in setup mode (no keys): systemd-boot enrolls the
//!    image's PK, KEK and db from `loader/keys/auto/` and resets; the node
//!    then boots with Secure Boot enforced and joins the Edge API test
//!    controller. Inside: the SecureBoot variable is 1, SetupMode 0, the
//!    kernel is locked down, `bootctl status` says Secure Boot is enabled.
//! 2. The same disk with one byte of the UKI's command line changed (another
//!    roothash), on the firmware with those keys enrolled: refused, the
//!    console shows it, no kernel starts.
//! 3. The unsigned `engine` image on that firmware: refused the same way.
//!
//! Run: `cargo test --release -p qemu-tests --test secure_boot -- --nocapture`.

use anyhow::{bail, ensure, Context, Result};
use qemu_tests::node::{joining_user_data, node_vm, start_controller, wait_for_hosts};
use qemu_tests::process::{run_checked, run_with_limit, CmdOutput};
use qemu_tests::test_images::{builder_command, image_for, load, qemu_tests_root, TestImage};
use qemu_tests::{Deadline, DiskFormat, TestCase, Vm};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const PROFILE: &str = "engine";

/// The test's db key pair: made once, then reused so the signed image's disk
/// stage stays cached between runs.
fn test_keys() -> Result<(PathBuf, PathBuf)> {
    let dir = qemu_tests_root().join("secure-boot-keys");
    let (key, cert) = (dir.join("db.key"), dir.join("db.crt"));
    if key.is_file() && cert.is_file() {
        return Ok((key, cert));
    }
    std::fs::create_dir_all(&dir)?;
    run_checked(
        Command::new("openssl")
            .args([
                "req",
                "-new",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-sha256",
                "-nodes",
                "-days",
                "36500",
                "-subj",
                "/CN=aiwimg TEST Secure Boot db key (not for production)/",
                "-keyout",
            ])
            .arg(&key)
            .arg("-out")
            .arg(&cert),
        Duration::from_secs(60),
    )?;
    Ok((key, cert))
}

/// `engine` signed with the test key, under `target/qemu-tests/images-secure-boot/`.
fn signed_image() -> Result<TestImage> {
    let (key, cert) = test_keys()?;
    let out_dir = qemu_tests_root().join("images-secure-boot");
    std::fs::create_dir_all(&out_dir)?;
    let lock = std::fs::File::create(out_dir.join(format!(".{PROFILE}.lock")))?;
    lock.lock()?;
    let mut cmd = builder_command(PROFILE, &out_dir);
    // The same update settings as the unsigned test image: only the disk
    // stage differs, the rest comes from the cache.
    cmd.args(qemu_tests::update_server::build_args())
        .arg("--secure-boot-key")
        .arg(&key)
        .arg("--secure-boot-cert")
        .arg(&cert)
        .args(["--secure-boot-enroll", "if-safe"]);
    eprintln!("qemu-tests: building the signed {PROFILE} image: {cmd:?}");
    let status = cmd.status().context("running the image builder")?;
    ensure!(
        status.success(),
        "building the signed image failed ({status})"
    );
    load(&out_dir.join(PROFILE))
}

/// `image`'s raw disk copied (sparse) to `dest` with one hex digit of the
/// roothash on its UKI's command line changed: the UKI no longer matches its
/// signature. Returns the changed command line word.
fn with_changed_uki(image: &TestImage, dest: &Path) -> Result<String> {
    run_checked(
        Command::new("cp")
            .arg("--sparse=always")
            .arg(&image.disk)
            .arg(dest),
        Duration::from_secs(300),
    )?;
    let esp = image.manifest.rest["partitions"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["type"] == "esp"))
        .and_then(|p| p["offset"].as_u64())
        .context("manifest.json lists no ESP partition")?;
    let img = format!("{}@@{esp}", dest.display());
    let listing = run_checked(
        Command::new("mdir").args(["-b", "-i", &img, "::/EFI/Linux"]),
        Duration::from_secs(30),
    )?
    .stdout;
    let uki = listing
        .lines()
        .map(str::trim)
        .find(|l| l.ends_with(".efi"))
        .context("no UKI in the ESP's EFI/Linux")?;
    // `mdir -b` names files with their drive (`::/EFI/Linux/…`).
    let uki = format!("::{}", uki.trim_start_matches("::"));
    let local = dest.with_extension("uki.efi");
    run_checked(
        Command::new("mcopy")
            .args(["-n", "-o", "-i", &img, &uki])
            .arg(&local),
        Duration::from_secs(30),
    )?;
    let mut bytes = std::fs::read(&local)?;
    let at = bytes
        .windows(9)
        .position(|w| w == b"roothash=")
        .context("no roothash= in the UKI")?
        + 9;
    bytes[at] = if bytes[at] == b'0' { b'1' } else { b'0' };
    let word = String::from_utf8_lossy(&bytes[at - 9..at + 64]).into_owned();
    std::fs::write(&local, &bytes)?;
    run_checked(
        Command::new("mcopy")
            .args(["-n", "-o", "-i", &img])
            .arg(&local)
            .arg(&uki),
        Duration::from_secs(30),
    )?;
    Ok(word)
}

/// `aiwimg inspect --verify DIR`: its exit status and what it printed.
fn inspect_verify(dir: &Path) -> Result<CmdOutput> {
    let mut cmd = Command::new(qemu_tests::test_images::aiwimg_bin()?);
    cmd.arg("inspect").arg("--verify").arg(dir);
    let out = run_with_limit(&mut cmd, None, Duration::from_secs(300))?;
    ensure!(
        !out.timed_out,
        "aiwimg inspect --verify took over 5 minutes"
    );
    Ok(out)
}

/// Boots `disk` on Secure Boot firmware with `vars`; expects the firmware or
/// systemd-boot to refuse it and no kernel to start. Returns the refusal line.
fn refused(case: &TestCase, name: &str, disk: &Path, vars: &Path, dl: &Deadline) -> Result<String> {
    let mut vm = Vm::builder(name, case.dir())
        .disk(disk, DiskFormat::Raw)
        .secure_boot(Some(vars))
        .start()?;
    let wait = Deadline::after(dl.cap(Duration::from_secs(240)));
    let found = vm.wait_for_console("the firmware's refusal", &wait, |lines| {
        lines
            .iter()
            .find(|l| {
                let l = l.to_ascii_lowercase();
                l.contains("access denied") || l.contains("security violation")
            })
            .cloned()
    });
    let lines = vm.boot_lines();
    vm.kill();
    let line = found?;
    // Given a few seconds more it would still not be Linux.
    if let Some(k) = lines
        .iter()
        .find(|l| l.contains("Linux version") || l.contains("login:") || l.contains("systemd["))
    {
        bail!("{name}: a kernel started despite the refusal: {k}");
    }
    Ok(line.trim().to_string())
}

#[test]
fn signed_image_enrolls_its_keys_boots_enforced_and_changed_or_unsigned_ukis_are_refused() {
    let signed = signed_image().unwrap_or_else(|e| panic!("no signed image: {e:#}"));
    let unsigned = image_for(PROFILE).unwrap_or_else(|e| panic!("no {PROFILE} image: {e:#}"));
    let sb = signed.manifest.rest["secure_boot"].clone();
    assert!(
        sb["signed"].as_array().map(Vec::len) == Some(3) && sb["enroll"] == "if-safe",
        "manifest.json secure_boot: {sb}"
    );
    for f in ["db.auth", "db.der", "aws-uefi-data.b64"] {
        assert!(
            signed.dir.join("secureboot").join(f).is_file(),
            "no secureboot/{f} beside the image"
        );
    }
    // The AWS UEFI variable store: base64 of the AMZNUEFI format (the build
    // read it back with virt-fw-vars; here only its envelope).
    let store = std::fs::read_to_string(signed.dir.join("secureboot/aws-uefi-data.b64")).unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg("base64 -d | head -c 8")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(store.trim().as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    assert_eq!(
        out.stdout, b"AMZNUEFI",
        "aws-uefi-data.b64 is not an AWS varstore"
    );
    // `aiwimg inspect --verify` checks every signed EFI binary on the ESP
    // against the db certificate (sbverify).
    let said = inspect_verify(&signed.dir).unwrap();
    assert!(
        said.success(),
        "inspect --verify of the signed image failed:\n{}",
        said.stderr
    );
    let verified = said
        .stderr
        .lines()
        .filter(|l| l.contains("Secure Boot signature verified"))
        .count();
    assert_eq!(verified, 3, "inspect --verify:\n{}", said.stderr);
    TestCase::run("secure-boot", Duration::from_secs(1500), |case| {
        let dl = case.deadline();
        let controller = start_controller()?;
        let mut vm = node_vm(case.dir(), "signed", &signed, Some(&controller))?
            .user_data(joining_user_data("sb-engine", "engine"))
            .secure_boot(None)
            .start()?;
        wait_for_hosts(&controller, 1, dl)?;
        case.timing("setup mode to enrolled and joined", vm.since_boot());
        vm.wait_ssh(dl)?;
        // The last byte of each variable (after 4 bytes of attributes).
        let var = |name: &str| -> Result<String> {
            vm.check(
                &format!(
                    "od -An -tu1 -j4 /sys/firmware/efi/efivars/{name}-8be4df61-93ca-11d2-aa0d-00e098032b8c | tr -d ' \\n'"
                ),
                dl,
            )
        };
        ensure!(var("SecureBoot")? == "1", "SecureBoot is not 1");
        ensure!(var("SetupMode")? == "0", "still in setup mode");
        let lockdown = vm.check("cat /sys/kernel/security/lockdown", dl)?;
        ensure!(
            lockdown.contains("[integrity]") || lockdown.contains("[confidentiality]"),
            "the kernel is not locked down: {lockdown}"
        );
        let bootctl = vm.check("bootctl status 2>/dev/null | grep -i 'secure boot'", dl)?;
        ensure!(
            bootctl.contains("enabled (user)"),
            "bootctl status: {bootctl}"
        );
        // Nothing on the node replaces the signed boot loader with the
        // image's unsigned one (systemd-boot-update after an A/B update).
        let sbu = vm.check(
            "systemctl is-enabled systemd-boot-update.service || true",
            dl,
        )?;
        ensure!(
            sbu.trim() == "masked",
            "systemd-boot-update.service is {sbu:?}"
        );
        eprintln!(
            "qemu-tests: signed: {}; lockdown {}",
            bootctl.trim(),
            lockdown.trim()
        );
        vm.shutdown(dl.cap(Duration::from_secs(120)))?;
        let vars = case.dir().join("enrolled-vars.fd");
        std::fs::copy(&vm.paths().vars, &vars)?;

        // The changed disk in an output folder of its own, beside the signed
        // image's manifest and certificate: what `inspect --verify` reads.
        // (Not `changed-uki/`: that is the VM's own folder below, which its
        // start empties.)
        let tampered_dir = case.dir().join("changed-uki-image");
        std::fs::create_dir_all(tampered_dir.join("secureboot"))?;
        std::fs::copy(
            signed.dir.join("manifest.json"),
            tampered_dir.join("manifest.json"),
        )?;
        std::fs::copy(
            signed.dir.join("secureboot/db.crt"),
            tampered_dir.join("secureboot/db.crt"),
        )?;
        let tampered = tampered_dir.join(signed.disk.file_name().context("disk name")?);
        let word = with_changed_uki(&signed, &tampered)?;
        let said = inspect_verify(&tampered_dir)?;
        ensure!(
            !said.success(),
            "inspect --verify passed a disk whose UKI was changed:\n{}",
            said.stderr
        );
        let uki_refused = said
            .stderr
            .lines()
            .find(|l| l.contains("EFI/Linux/") && l.contains("does not verify"))
            .with_context(|| {
                format!(
                    "inspect --verify did not name the UKI's signature:\n{}",
                    said.stderr
                )
            })?;
        eprintln!(
            "qemu-tests: inspect --verify on the changed UKI: {}",
            uki_refused.trim()
        );
        let line = refused(case, "changed-uki", &tampered, &vars, dl)?;
        eprintln!("qemu-tests: UKI with {word:?}: refused: {line}");
        std::fs::remove_dir_all(&tampered_dir)?;

        let line = refused(case, "unsigned", &unsigned.disk, &vars, dl)?;
        eprintln!("qemu-tests: the unsigned image: refused: {line}");
        Ok(())
    });
}
