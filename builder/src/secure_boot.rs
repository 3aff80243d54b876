//! UEFI Secure Boot: the disk stage signs what the firmware loads with the
//! user's db key, and puts on the ESP what systemd-boot needs to enroll that
//! key into a machine's firmware.
//!
//! - systemd-boot (`EFI/BOOT/BOOTX64.EFI`, `EFI/systemd/systemd-bootx64.efi`)
//!   is signed with `systemd-sbsign`; the UKI by ukify with the same signer
//!   (`--sign-kernel` too: Debian's kernel inside carries Debian's signature,
//!   which our db does not trust, and systemd-stub hands it over with the
//!   UKI's own authority, so the UKI signature is what counts). Every byte
//!   of the UKI (kernel, initrd, the command line with the roothash) is
//!   covered: a changed roothash is a refused boot.
//! - `loader/keys/auto/{PK,KEK,db}.auth` (efitools): signed variable
//!   updates that set PK, KEK and db to the user's certificate (the same pair
//!   for all three unless a platform key is managed elsewhere, as mkosi and
//!   `bootctl --secure-boot-auto-enroll` do). `loader.conf` says
//!   `secure-boot-enroll <mode>`: `off` by default; `if-safe` enrolls by
//!   itself only in a VM; `manual` offers it in the boot menu; `force`
//!   enrolls on any machine in setup mode.
//!
//! Reproducible: the PKCS#7 signatures carry a signing time, taken from
//! SOURCE_DATE_EPOCH through libfaketime (RSA PKCS#1 v1.5 itself is
//! deterministic), so the same inputs and key give the same image bytes.
//!
//! The private key is read only at `/keys/db.key` inside the tools tree, from
//! a private copy made for the stage and removed after it: its path on the
//! build host never reaches a command line, an error, the cache or the image.

use crate::tools::{Bind, ToolsTree};
use anyhow::{bail, Context, Result};
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// `secure-boot-enroll` in loader.conf (loader.conf(5), systemd 257).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Enroll {
    /// Never enroll: keys are put in the firmware by other means.
    Off,
    /// An entry in the boot menu enrolls them when chosen.
    Manual,
    /// Enroll by itself in setup mode, only in a virtual machine.
    IfSafe,
    /// Enroll by itself in setup mode on any machine (bare metal may lose
    /// option ROMs signed by Microsoft's keys: know your hardware).
    Force,
}

impl Enroll {
    pub fn as_str(self) -> &'static str {
        match self {
            Enroll::Off => "off",
            Enroll::Manual => "manual",
            Enroll::IfSafe => "if-safe",
            Enroll::Force => "force",
        }
    }
}

/// What a build signs with, resolved from the command line and the profile.
#[derive(Debug, Clone)]
pub struct SigningInput {
    pub key: PathBuf,
    pub cert: PathBuf,
    pub enroll: Enroll,
    /// sha256 of the certificate's DER: in the disk key and the manifest.
    pub cert_sha256: String,
    pub cert_der: Vec<u8>,
}

impl SigningInput {
    /// Reads the certificate (PEM or DER); the key only has to exist here,
    /// it is read once, in the disk stage.
    pub fn new(key: &Path, cert: &Path, enroll: Enroll) -> Result<SigningInput> {
        let meta = std::fs::metadata(key)
            .with_context(|| format!("the Secure Boot key {} cannot be read", key.display()))?;
        if !meta.is_file() {
            bail!("the Secure Boot key {} is not a file", key.display());
        }
        let raw = std::fs::read(cert)
            .with_context(|| format!("reading the Secure Boot certificate {}", cert.display()))?;
        let cert_der = cert_der(&raw)
            .with_context(|| format!("reading the Secure Boot certificate {}", cert.display()))?;
        Ok(SigningInput {
            key: key.to_path_buf(),
            cert: cert.to_path_buf(),
            enroll,
            cert_sha256: cert_sha256(&cert_der),
            cert_der,
        })
    }
}

/// How a certificate is named in cache keys, disk.json and the manifest:
/// the sha256 of its DER.
pub fn cert_sha256(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// The DER of a certificate given as PEM (the first CERTIFICATE block) or DER.
pub fn cert_der(raw: &[u8]) -> Result<Vec<u8>> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    if raw.first() == Some(&0x30) {
        return Ok(raw.to_vec());
    }
    let text = std::str::from_utf8(raw).context("neither PEM nor DER")?;
    if text.contains("PRIVATE KEY-----") {
        bail!("it holds a private key: give the certificate here, the key with --secure-boot-key");
    }
    let start = text
        .find(BEGIN)
        .context("no -----BEGIN CERTIFICATE----- block")?
        + BEGIN.len();
    let len = text[start..]
        .find(END)
        .context("no -----END CERTIFICATE-----")?;
    let b64: String = text[start..start + len]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .context("the PEM block is not base64")?;
    if der.first() != Some(&0x30) {
        bail!("the PEM block is not a DER certificate");
    }
    Ok(der)
}

/// What the disk stage signed, kept in disk.json and shown in manifest.json.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SecureBootInfo {
    /// sha256 of the db certificate's DER (what `openssl x509 -outform der |
    /// sha256sum` gives): the certificate firmware must trust.
    pub db_cert_sha256: String,
    pub db_subject: String,
    /// ESP paths of the signed EFI binaries.
    pub signed: Vec<String>,
    /// loader.conf's `secure-boot-enroll`.
    pub enroll: Enroll,
    /// The enrollment files on the ESP (`loader/keys/auto/`), also written
    /// to the output folder's `secureboot/`.
    pub auth_files: Vec<String>,
}

/// The folder of the ESP systemd-boot enrolls from: `auto` is the one its
/// `if-safe` and `force` modes take by themselves (loader.conf(5)); in
/// `manual` mode it is offered in the menu like any folder there.
pub const ESP_KEYS_DIR: &str = "loader/keys/auto";
/// The AWS UEFI variable store (base64), in [`SLOT_DIR`]: what `publish aws`
/// passes as RegisterImage's `UefiData`, so instances boot with our keys
/// enrolled and Secure Boot on.
pub const AWS_UEFI_DATA: &str = "aws-uefi-data.b64";
/// Where the disk stage keeps the enrollment files for the outputs.
pub const SLOT_DIR: &str = "secureboot";

/// The common name (CN) of a DER certificate's issuer: the first
/// `id-at-commonName` (2.5.4.3) attribute, since the issuer comes before the
/// subject and nothing earlier holds one. What `modinfo -F signer` shows for
/// a module signed with the certificate's key.
pub fn issuer_common_name(cert_der: &[u8]) -> Option<String> {
    const CN_OID: &[u8] = &[0x06, 0x03, 0x55, 0x04, 0x03];
    let at = cert_der.windows(CN_OID.len()).position(|w| w == CN_OID)? + CN_OID.len();
    // A string type (UTF8String, PrintableString, ...) with a short or
    // one-byte long length.
    let (&_tag, rest) = cert_der.get(at..)?.split_first()?;
    let (&len, rest) = rest.split_first()?;
    let (len, rest) = match len {
        0x81 => (*rest.first()? as usize, rest.get(1..)?),
        l if l < 0x80 => (l as usize, rest),
        _ => return None,
    };
    String::from_utf8(rest.get(..len)?.to_vec()).ok()
}

/// A private copy of the key and certificate for one stage, bound at `/keys`.
pub struct StagedKeys {
    dir: tempfile::TempDir,
}

impl StagedKeys {
    pub fn new(input: &SigningInput) -> Result<StagedKeys> {
        let dir = tempfile::Builder::new()
            .prefix("aiwimg-sb-")
            .tempdir()
            .context("making a private folder for the Secure Boot key")?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
        let key = dir.path().join("db.key");
        // Created 0600 before the key is written into it.
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let data = std::fs::read(&input.key).context("reading the Secure Boot key")?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&key)?;
            f.write_all(&data)?;
        }
        // The certificate as PEM: every tool here takes PEM.
        let pem = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            base64::engine::general_purpose::STANDARD
                .encode(&input.cert_der)
                .as_bytes()
                .chunks(64)
                .map(|c| std::str::from_utf8(c).unwrap_or_default())
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::fs::write(dir.path().join("db.crt"), pem)?;
        Ok(StagedKeys { dir })
    }

    /// The private folder: `db.key` (0600) and `db.crt` (PEM).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn bind(&self) -> Bind<'_> {
        Bind {
            host: self.dir.path(),
            inside: "/keys",
        }
    }
}

/// `sh -c` text that runs `command` with the wall clock stopped at `epoch`
/// (libfaketime's absolute form; monotonic clocks stay real, so timeouts work).
fn at_epoch(epoch: u64, command: &str) -> String {
    format!(
        "export TZ=UTC FAKETIME=\"$(date -u -d @{epoch} '+%Y-%m-%d %H:%M:%S')\" \
         FAKETIME_DONT_FAKE_MONOTONIC=1 \
         LD_PRELOAD=/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1; {command}"
    )
}

/// Checks the key belongs to the certificate; returns the certificate's subject.
pub fn check_pair(tools: &ToolsTree, binds: &[Bind]) -> Result<String> {
    let out = tools.run(
        "checking the Secure Boot key against its certificate (openssl)",
        &[
            "sh",
            "-c",
            "a=$(openssl pkey -in /keys/db.key -passin pass: -pubout 2>/dev/null) || { echo 'KEY-UNREADABLE'; exit 0; }; \
             b=$(openssl x509 -in /keys/db.crt -noout -pubkey); \
             [ \"$a\" = \"$b\" ] && echo MATCH || echo MISMATCH; \
             openssl x509 -in /keys/db.crt -noout -subject -nameopt RFC2253",
        ],
        binds,
    )?;
    let mut lines = out.lines();
    match lines.next() {
        Some("MATCH") => {}
        Some("KEY-UNREADABLE") => {
            bail!("the Secure Boot key is not a private key openssl can read (PEM, no passphrase)")
        }
        _ => bail!("the Secure Boot key does not belong to the certificate given with it"),
    }
    Ok(lines
        .next()
        .unwrap_or_default()
        .trim_start_matches("subject=")
        .to_string())
}

/// Signs systemd-boot in place on the staged ESP (`/work/esp`).
pub fn sign_boot_loader(tools: &ToolsTree, binds: &[Bind], epoch: u64) -> Result<Vec<String>> {
    let files = ["EFI/BOOT/BOOTX64.EFI", "EFI/systemd/systemd-bootx64.efi"];
    let mut script = String::from("set -e; ");
    for f in files {
        script.push_str(&format!(
            "/usr/lib/systemd/systemd-sbsign sign --private-key=/keys/db.key \
             --certificate=/keys/db.crt --output=/work/esp/{f}.signed /work/esp/{f} >/dev/null; \
             mv /work/esp/{f}.signed /work/esp/{f}; "
        ));
    }
    tools.run(
        "signing systemd-boot (systemd-sbsign)",
        &["sh", "-c", &at_epoch(epoch, &script)],
        binds,
    )?;
    Ok(files.iter().map(|f| f.to_string()).collect())
}

/// ukify's arguments that sign the UKI.
pub const UKIFY_SIGN_ARGS: &[&str] = &[
    "--signtool=systemd-sbsign",
    "--secureboot-private-key=/keys/db.key",
    "--secureboot-certificate=/keys/db.crt",
    "--sign-kernel",
];

/// Runs `argv` (ukify) with the clock pinned, for a reproducible signature.
pub fn run_signing(
    tools: &ToolsTree,
    what: &str,
    argv: &[&str],
    binds: &[Bind],
    epoch: u64,
) -> Result<String> {
    let quoted: Vec<String> = argv.iter().map(|a| shell_quote(a)).collect();
    tools.run(
        what,
        &["sh", "-c", &at_epoch(epoch, &quoted.join(" "))],
        binds,
    )
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Writes `PK.auth`, `KEK.auth`, `db.auth` (and the `.esl` lists) for
/// systemd-boot's enrollment: into `/work/esp/loader/keys/auto/` and into
/// `/work/secureboot/` for the outputs. `owner` is the signature owner GUID.
pub fn write_enrollment(
    tools: &ToolsTree,
    binds: &[Bind],
    epoch: u64,
    owner: &str,
) -> Result<Vec<String>> {
    // Each update is signed by the key that may change the variable: PK by
    // itself (setup mode accepts any), KEK and db by PK and KEK, all one pair.
    // Their timestamp is the (pinned) clock's.
    let script = format!(
        "set -e; d=/work/{SLOT_DIR}; mkdir -p $d /work/esp/{ESP_KEYS_DIR}; \
         cert-to-efi-sig-list -g {owner} /keys/db.crt $d/db.esl >/dev/null; \
         for v in PK KEK db; do \
           sign-efi-sig-list -g {owner} -k /keys/db.key -c /keys/db.crt $v $d/db.esl $d/$v.auth >/dev/null; \
           cp $d/$v.auth /work/esp/{ESP_KEYS_DIR}/$v.auth; \
         done; \
         openssl x509 -in /keys/db.crt -outform DER -out $d/db.der; cp /keys/db.crt $d/db.crt; \
         virt-fw-vars --set-pk {owner} /keys/db.crt --add-kek {owner} /keys/db.crt \
           --add-db {owner} /keys/db.crt --secure-boot --output-aws $d/{AWS_UEFI_DATA} >/dev/null"
    );
    tools.run(
        "making the Secure Boot enrollment files (efitools, virt-fw-vars)",
        &["sh", "-c", &at_epoch(epoch, &script)],
        binds,
    )?;
    // Read back what AWS will be given: PK, KEK and db set, Secure Boot on.
    let store = tools.run(
        "reading back the AWS UEFI variable store (virt-fw-vars)",
        &[
            "virt-fw-vars",
            "-i",
            &format!("/work/{SLOT_DIR}/{AWS_UEFI_DATA}"),
            "--print",
        ],
        binds,
    )?;
    check_aws_store(&store)?;
    Ok(["PK", "KEK", "db"]
        .iter()
        .map(|v| format!("{ESP_KEYS_DIR}/{v}.auth"))
        .collect())
}

/// Checks `virt-fw-vars --print` of the AWS store: each of PK, KEK and db
/// holds a list, and SecureBootEnable is on.
fn check_aws_store(printed: &str) -> Result<()> {
    let value = |name: &str| {
        printed.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim().to_string())
        })
    };
    for var in ["PK", "KEK", "db"] {
        match value(var) {
            Some(v) if v.starts_with("blob:") => {}
            other => bail!("the AWS UEFI variable store has no {var} ({other:?}): {printed}"),
        }
    }
    if value("SecureBootEnable").as_deref() != Some("bool: ON") {
        bail!("the AWS UEFI variable store does not turn Secure Boot on: {printed}");
    }
    Ok(())
}

/// loader.conf with the enrollment mode.
pub fn loader_conf(enroll: Option<Enroll>) -> String {
    let mut s = String::from("timeout 0\neditor no\n");
    if let Some(e) = enroll {
        s.push_str(&format!("secure-boot-enroll {}\n", e.as_str()));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issuer then subject, each one RDN with a CN, as a certificate's TBS
    /// lays them out (the rest of the certificate does not matter here).
    fn names(issuer: &[u8], subject: &[u8]) -> Vec<u8> {
        let rdn = |cn: &[u8]| {
            let mut v = vec![0x31, 0, 0x30, 0, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c];
            if cn.len() >= 0x80 {
                v.extend([0x81, cn.len() as u8]);
            } else {
                v.push(cn.len() as u8);
            }
            v.extend_from_slice(cn);
            v
        };
        let mut der = vec![0x30, 0x82, 0, 0, 0x02, 0x01, 0x07];
        der.extend(rdn(issuer));
        der.extend(rdn(subject));
        der
    }

    #[test]
    fn the_issuer_cn_is_what_modinfo_names_as_signer() {
        assert_eq!(
            issuer_common_name(&names(b"Our CA", b"db key")).as_deref(),
            Some("Our CA")
        );
        let long = "x".repeat(200);
        assert_eq!(
            issuer_common_name(&names(long.as_bytes(), b"s")).as_deref(),
            Some(long.as_str())
        );
        assert_eq!(issuer_common_name(&[0x30, 0x03, 0x02, 0x01, 0x07]), None);
        let mut cut = names(b"Our CA", b"s");
        cut.truncate(14);
        assert_eq!(issuer_common_name(&cut), None);
    }

    // 30 82 01 00: a DER SEQUENCE header, all the parser looks at (openssl
    // checks the rest when signing).
    const PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIBAA==\n-----END CERTIFICATE-----\n";

    #[test]
    fn certificates_are_read_as_pem_or_der_and_keys_are_refused() {
        assert_eq!(
            cert_der(PEM.as_bytes()).unwrap(),
            vec![0x30, 0x82, 0x01, 0x00]
        );
        assert_eq!(
            cert_der(&[0x30, 0x01, 0x02]).unwrap(),
            vec![0x30, 0x01, 0x02]
        );
        let e = cert_der(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("--secure-boot-key"), "{e}");
        assert!(cert_der(b"hello").is_err());
    }

    #[test]
    fn the_aws_store_must_hold_our_keys_and_turn_secure_boot_on() {
        let good = "CustomMode          : bool: off\nKEK                 : blob: 911 bytes\n\
                    PK                  : blob: 911 bytes\nSecureBootEnable    : bool: ON\n\
                    db                  : blob: 911 bytes\ndbx                 : blob: 76 bytes\n";
        check_aws_store(good).unwrap();
        let e = check_aws_store(&good.replace("KEK ", "XEK "))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no KEK"), "{e}");
        assert!(check_aws_store(&good.replace("bool: ON", "bool: off")).is_err());
    }

    #[test]
    fn loader_conf_says_the_enrollment_mode_only_when_signing() {
        assert_eq!(loader_conf(None), "timeout 0\neditor no\n");
        assert!(loader_conf(Some(Enroll::IfSafe)).ends_with("secure-boot-enroll if-safe\n"));
        assert!(loader_conf(Some(Enroll::Off)).ends_with("secure-boot-enroll off\n"));
    }

    #[test]
    fn the_signing_clock_is_the_epoch_and_arguments_stay_whole() {
        let s = at_epoch(1767225600, "true");
        assert!(
            s.contains("@1767225600") && s.contains("libfaketime.so.1"),
            "{s}"
        );
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }

    #[test]
    fn the_staged_key_is_private_and_the_cert_is_pem() {
        let d = tempfile::tempdir().unwrap();
        let key = d.path().join("k");
        std::fs::write(&key, "KEY").unwrap();
        let cert = d.path().join("c");
        std::fs::write(&cert, PEM).unwrap();
        let input = SigningInput::new(&key, &cert, Enroll::Off).unwrap();
        assert_eq!(
            input.cert_sha256,
            hex::encode(Sha256::digest([0x30, 0x82, 0x01, 0x00]))
        );
        let staged = StagedKeys::new(&input).unwrap();
        let b = staged.bind();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(b.host), 0o700);
        assert_eq!(mode(&b.host.join("db.key")), 0o600);
        assert!(std::fs::read_to_string(b.host.join("db.crt"))
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----\nMIIBAA==\n"));
        let gone = b.host.to_path_buf();
        drop(staged);
        assert!(!gone.exists(), "the private copy outlives the stage");
        let e = SigningInput::new(&d.path().join("none"), &cert, Enroll::Off).unwrap_err();
        assert!(e.to_string().contains("cannot be read"), "{e}");
    }
}
