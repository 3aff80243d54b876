//! Issue 15: UEFI Secure Boot, end to end under QEMU with OVMF's secboot
//! firmware (SMM, vars writable only from SMM).
//!
//! The `engine-gpu` test image is built signed with a test db key
//! (`qemu-tests/fixtures/secure-boot-test-key/`: a TEST KEY, never a user's)
//! and `--secure-boot-enroll if-safe`: its boot loader, its UKI and the NVIDIA
//! modules DKMS builds into it. Then, in one case:
//! 1. It boots on firmware in setup mode (no keys): systemd-boot enrolls the
//!    image's PK, KEK and db from `loader/keys/auto/` and resets; the node
//!    then boots with Secure Boot enforced and joins the Edge API test
//!    controller. Inside: the SecureBoot variable is 1, SetupMode 0, the
//!    kernel is locked down, `bootctl status` says Secure Boot is enabled.
//!    Kernel modules: an unsigned one is refused, the same one signed with
//!    the db key loads (the kernel trusts db for modules), and the image's
//!    `nvidia-current`, signed by the db key, passes the signature check
//!    (no GPU here: its init then says "No such device").
//! 2. The same disk with one byte of the UKI's command line changed (another
//!    roothash), on the firmware with those keys enrolled: refused, the
//!    console shows it, no kernel starts.
//! 3. The unsigned `engine` image on that firmware: refused the same way.
//!
//! Run: `cargo test --release -p qemu-tests --test secure_boot -- --nocapture`.

use anyhow::{bail, ensure, Context, Result};
use qemu_tests::node::{joining_user_data, node_vm, start_controller, wait_for_hosts};
use qemu_tests::process::{run_checked, run_with_limit, CmdOutput};
use qemu_tests::test_images::{
    image_for, qemu_tests_root, secure_boot_test_keys, TestImage, SECURE_BOOT_TEST_KEY_CN,
};
use qemu_tests::{Deadline, DiskFormat, TestCase, Vm};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Signed: the GPU engine, whose kernel modules must load under Secure Boot
/// too. Unsigned (refused by the firmware): the plain engine.
const SIGNED: &str = "engine-gpu";
const UNSIGNED: &str = "engine";

/// The signed test image (`image_for` builds `engine-gpu` signed with the
/// test db key and `--secure-boot-enroll if-safe`; the boot tests use the
/// same image on firmware without Secure Boot).
fn signed_image() -> Result<TestImage> {
    image_for(SIGNED)
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
    let unsigned = image_for(UNSIGNED).unwrap_or_else(|e| panic!("no {UNSIGNED} image: {e:#}"));
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
        let (loaded, refused_unsigned) = module_trust(&vm, dl)?;
        eprintln!("qemu-tests: a module signed with the db key: {loaded}");
        eprintln!("qemu-tests: the same module unsigned: {refused_unsigned}");
        // The NVIDIA driver DKMS built into the image, signed there with the
        // same db key: the kernel takes its signature. With no GPU in QEMU
        // the driver's own init then fails with ENODEV ("No such device");
        // a refused signature would say "Key was rejected by service".
        let signer = vm.check("modinfo -F signer nvidia-current", dl)?;
        ensure!(
            signer.trim() == SECURE_BOOT_TEST_KEY_CN,
            "nvidia-current is signed by {:?}, not the test db key",
            signer.trim()
        );
        let load = vm.run("modprobe nvidia-current", dl)?;
        ensure!(
            load.success() || load.stderr.contains("No such device"),
            "modprobe nvidia-current under Secure Boot: {}",
            load.stderr.trim()
        );
        let nvrm = vm.check("dmesg | grep -E 'NVRM|nvidia' | tail -n 3", dl)?;
        eprintln!(
            "qemu-tests: nvidia-current (signer {:?}) under lockdown: {}; kernel said:\n{}",
            signer.trim(),
            if load.success() {
                "loaded".to_string()
            } else {
                load.stderr.trim().to_string()
            },
            nvrm.trim_end()
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

/// The module-signature trust path a GPU image relies on (issue 15 §3):
/// Debian's kernel carries "KEYS: Make use of platform keyring for module
/// signature verify", so a module signed with a db key would load under
/// lockdown without shim or a MOK. Shown with a stock module of the image
/// (`dummy`): with no signature lockdown refuses it; with the test db key's
/// signature in place of Debian's, it loads. Returns the two outcomes.
fn module_trust(vm: &Vm, dl: &Deadline) -> Result<(String, String)> {
    let (key, cert) = secure_boot_test_keys()?;
    let work = qemu_tests_root().join("secure-boot-module");
    std::fs::create_dir_all(&work)?;
    let path = vm.check("modinfo -n dummy", dl)?;
    let b64 = work.join("dummy.ko.xz.b64");
    std::fs::write(&b64, vm.check(&format!("base64 -w0 {}", path.trim()), dl)?)?;
    let debian_signed = work.join("dummy.debian.ko");
    run_checked(
        Command::new("sh").arg("-c").arg(format!(
            "base64 -d < '{}' | xz -dc > '{}'",
            b64.display(),
            debian_signed.display()
        )),
        Duration::from_secs(30),
    )?;
    let unsigned = without_module_signature(&std::fs::read(&debian_signed)?)?;
    let bare = work.join("dummy.unsigned.ko");
    std::fs::write(&bare, &unsigned)?;
    let sig = work.join("dummy.p7s");
    // What the kernel's scripts/sign-file writes: a detached PKCS#7/CMS
    // signature by issuer and serial, no signed attributes, no certificates.
    run_checked(
        Command::new("openssl")
            .args([
                "cms",
                "-sign",
                "-binary",
                "-noattr",
                "-nocerts",
                "-nosmimecap",
            ])
            .args(["-md", "sha256", "-outform", "DER", "-in"])
            .arg(&bare)
            .arg("-signer")
            .arg(&cert)
            .arg("-inkey")
            .arg(&key)
            .arg("-out")
            .arg(&sig),
        Duration::from_secs(30),
    )?;
    let signed = with_module_signature(&unsigned, &std::fs::read(&sig)?);
    let try_load = |bytes: &[u8], name: &str| -> Result<CmdOutput> {
        let text = qemu_tests::cloud_doubles::base64(bytes);
        vm.check_with_input(&format!("base64 -d > /tmp/{name}.ko"), text.as_bytes(), dl)?;
        vm.run(
            &format!("rmmod dummy 2>/dev/null; insmod /tmp/{name}.ko"),
            dl,
        )
    };
    let plain = try_load(&unsigned, "unsigned")?;
    ensure!(
        !plain.success(),
        "lockdown let an unsigned module in: the check below would prove nothing"
    );
    let ours = try_load(&signed, "db-signed")?;
    ensure!(
        ours.success(),
        "a module signed with the enrolled db key was refused: {}",
        ours.stderr.trim()
    );
    let signer = vm.check("modinfo -F signer /tmp/db-signed.ko", dl)?;
    Ok((
        format!("loaded under lockdown (signer {:?})", signer.trim()),
        format!("refused: {}", plain.stderr.trim()),
    ))
}

const MODULE_SIG_MAGIC: &[u8] = b"~Module signature appended~\n";

/// A module's bytes without its appended signature (the kernel's
/// `struct module_signature`: 12 bytes ending in the signature's length,
/// big-endian, then the magic).
fn without_module_signature(module: &[u8]) -> Result<Vec<u8>> {
    let body = module
        .strip_suffix(MODULE_SIG_MAGIC)
        .context("the module carries no signature")?;
    ensure!(body.len() >= 12, "truncated module signature");
    let info = &body[body.len() - 12..];
    let sig_len = u32::from_be_bytes(info[8..12].try_into()?) as usize;
    let end = body
        .len()
        .checked_sub(12 + sig_len)
        .context("module signature longer than the module")?;
    Ok(body[..end].to_vec())
}

/// `module` with `pkcs7` appended as scripts/sign-file appends it.
fn with_module_signature(module: &[u8], pkcs7: &[u8]) -> Vec<u8> {
    let mut out = module.to_vec();
    out.extend_from_slice(pkcs7);
    // algo, hash, id_type = PKEY_ID_PKCS7 (2), signer_len, key_id_len, pad[3]
    out.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&(pkcs7.len() as u32).to_be_bytes());
    out.extend_from_slice(MODULE_SIG_MAGIC);
    out
}
