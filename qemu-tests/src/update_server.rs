//! The parts of the A/B update tests: a throwaway signing key (fixed, see
//! `fixtures/update-test-key/README.md`), images built to trust it and to
//! read their updates from [`UPDATE_URL_IN_GUEST`], later versions of the
//! same profile, and the update folder, published with `aiwimg publish
//! update` and served by a plain HTTP server on 127.0.0.1 that guests reach
//! through a guestfwd (never a real network).

use crate::test_images::{
    aiwimg_bin, build_agent, builder_command, load, qemu_tests_root, workspace_root, TestImage,
};
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Where guests find the update server (forwarded to [`UpdateServer`]).
pub const UPDATE_GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 101);
pub const UPDATE_GUEST_PORT: u16 = 80;
pub const UPDATE_URL_IN_GUEST: &str = "http://10.0.2.101/aiware";

fn key_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/update-test-key")
}

/// Profiles whose test images take updates from the test server.
pub const UPDATE_TEST_PROFILES: &[&str] = &["engine", "engine-tpm"];

/// The builder options that make an image trust the test key and read
/// updates from the test server.
pub fn build_args() -> Vec<OsString> {
    vec![
        "--update-url".into(),
        UPDATE_URL_IN_GUEST.into(),
        "--update-keyring".into(),
        key_dir().join("public-key.asc").into(),
    ]
}

/// Boot tries a later version gives the versions it installs: two, not the
/// profiles' three (`update_tries`), through `aiwimg build --update-tries`.
/// The rollback test then sees every try fail and the fallback with one
/// boot fewer, and the option is tested end to end.
pub const LATER_VERSION_UPDATE_TRIES: usize = 2;

/// Version `version` of `profile` (same inputs as its test image but the
/// version and [`LATER_VERSION_UPDATE_TRIES`]), built into
/// `target/qemu-tests/images-<version>/`.
pub fn later_version(profile: &str, version: &str) -> Result<TestImage> {
    let out = qemu_tests_root().join(format!("images-{version}"));
    std::fs::create_dir_all(&out)?;
    let mut cmd = builder_command(profile, &out);
    cmd.args(build_args()).args([
        "--image-version",
        version,
        "--update-tries",
        &LATER_VERSION_UPDATE_TRIES.to_string(),
    ]);
    eprintln!("qemu-tests: building {profile} {version}: {cmd:?}");
    let st = cmd.status().context("running the image builder")?;
    if !st.success() {
        bail!("building {profile} {version} failed ({st}): {cmd:?}");
    }
    load(&out.join(profile))
}

/// The overlay that makes a version bad: aiw-agent exits at once, so the
/// boot health check fails on every try.
const BAD_DROP_IN: &str = "# TEST ONLY (aiwimg update tests): a version whose agent fails.\n\
[Service]\nExecStart=\nExecStart=/bin/false\nRestart=no\n";
/// Incompressible bytes in the bad version's root, so its root is larger
/// than the first version's and must still fit the other slot.
pub const BALLAST_MIB: usize = 48;

/// A bad version `version` of `profile`: its test image plus an overlay
/// (`test-bad-version`) whose aiw-agent fails, and [`BALLAST_MIB`] of
/// incompressible data. Built from a project copy, with this workspace's agent.
pub fn bad_version(profile: &str, version: &str) -> Result<TestImage> {
    let project = qemu_tests_root().join("bad-version-project");
    let ws = workspace_root();
    let _ = std::fs::remove_dir_all(&project);
    std::fs::create_dir_all(project.join("agent"))?;
    for sub in ["images", "overlays", "agent/units"] {
        let st = Command::new("cp")
            .arg("-a")
            .arg(ws.join(sub))
            .arg(project.join(sub))
            .status()?;
        if !st.success() {
            bail!("copying {sub} into {}", project.display());
        }
    }
    let overlay = project.join("overlays/test-bad-version");
    let drop_in = overlay.join("usr/lib/systemd/system/aiw-agent.service.d");
    std::fs::create_dir_all(&drop_in)?;
    std::fs::write(drop_in.join("90-test-bad-version.conf"), BAD_DROP_IN)?;
    // SHA-256 in counter mode: the same bytes every run (so the build stays
    // cached), and nothing erofs can compress.
    let mut ballast = Vec::with_capacity(BALLAST_MIB << 20);
    let mut n = 0u64;
    while ballast.len() < BALLAST_MIB << 20 {
        ballast.extend_from_slice(&Sha256::digest(n.to_le_bytes()));
        n += 1;
    }
    let share = overlay.join("usr/share/aiwimg-test");
    std::fs::create_dir_all(&share)?;
    std::fs::write(share.join("ballast.bin"), &ballast)?;
    let toml = project.join("images").join(format!("{profile}.toml"));
    let mut text = std::fs::read_to_string(&toml)?;
    text.push_str(
        "\n# TEST ONLY: the bad version of the update tests.\noverlays = [\"test-bad-version\"]\n",
    );
    std::fs::write(&toml, text)?;

    let out = qemu_tests_root().join(format!("images-{version}"));
    std::fs::create_dir_all(&out)?;
    let mut cmd = builder_command(profile, &out);
    cmd.args(build_args())
        .args(["--image-version", version, "--project"])
        .arg(&project)
        .arg("--agent-bin")
        .arg(build_agent()?);
    eprintln!("qemu-tests: building the bad {profile} {version}: {cmd:?}");
    let st = cmd.status().context("running the image builder")?;
    if !st.success() {
        bail!("building the bad {profile} {version} failed ({st}): {cmd:?}");
    }
    load(&out.join(profile))
}

/// An update folder served on a free port of 127.0.0.1: `<dir>/aiware/<IMAGE_ID>/`.
pub struct UpdateServer {
    pub dir: PathBuf,
    pub port: u16,
    server: Child,
}

impl Drop for UpdateServer {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

impl UpdateServer {
    pub fn start(dir: &Path) -> Result<UpdateServer> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir.join("aiware"))?;
        let port = std::net::TcpListener::bind(("127.0.0.1", 0))?
            .local_addr()?
            .port();
        let server = crate::test_repo::serve_dir(dir, port, "the update folder")?;
        Ok(UpdateServer {
            dir: dir.to_path_buf(),
            port,
            server,
        })
    }

    /// `aiwimg publish update` of a built image, signed with the test key.
    pub fn publish(&self, image: &TestImage) -> Result<String> {
        let out = Command::new(aiwimg_bin()?)
            .args(["publish", "update", "--image"])
            .arg(&image.dir)
            .arg("--repo")
            .arg(self.dir.join("aiware"))
            .arg("--sign-key")
            .arg(key_dir().join("secret-key.asc"))
            .stdin(Stdio::null())
            .output()
            .context("running aiwimg publish update")?;
        let said = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!("aiwimg publish update failed: {said}");
        }
        Ok(said.lines().last().unwrap_or_default().to_string())
    }
}

/// Ways an update folder can be wrong; a node must refuse each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tamper {
    /// `SHA256SUMS.gpg` is missing.
    Unsigned,
    /// `SHA256SUMS.gpg` made by a key the node does not trust.
    OtherKey,
    /// A hash in `SHA256SUMS` changed after signing.
    SumsEdited,
    /// One byte of a published file changed (its hash no longer matches).
    PayloadByteFlipped,
}

impl Tamper {
    pub const ALL: [Tamper; 4] = [
        Tamper::Unsigned,
        Tamper::OtherKey,
        Tamper::SumsEdited,
        Tamper::PayloadByteFlipped,
    ];
}

impl UpdateServer {
    /// Runs `f` while `image_id`'s published folder is tampered with `how`
    /// (on `version`'s UKI where a file is changed), and puts it back after.
    pub fn tampered<T>(
        &self,
        image_id: &str,
        version: &str,
        how: Tamper,
        f: impl FnOnce() -> T,
    ) -> Result<T> {
        let dir = self.dir.join("aiware").join(image_id);
        let sums = dir.join("SHA256SUMS");
        let sig = dir.join("SHA256SUMS.gpg");
        let uki = dir.join(format!("{image_id}_{version}.efi"));
        let saved_sums = std::fs::read(&sums)?;
        let saved_sig = std::fs::read(&sig)?;
        let flip = |path: &Path| -> Result<()> {
            let mut b = std::fs::read(path)?;
            let i = b.len() / 2;
            b[i] ^= 0x01;
            std::fs::write(path, b)?;
            Ok(())
        };
        match how {
            Tamper::Unsigned => std::fs::remove_file(&sig)?,
            Tamper::OtherKey => {
                let home = self.dir.with_file_name("other-key-gnupg");
                sign_with_throwaway_key(&home, &sums, &sig)?
            }
            Tamper::SumsEdited => {
                let text = String::from_utf8(saved_sums.clone())?;
                let line = text
                    .lines()
                    .find(|l| l.ends_with(&format!("{image_id}_{version}.efi")))
                    .context("the version's UKI is not in SHA256SUMS")?;
                let first = if line.starts_with('0') { "1" } else { "0" };
                let edited = text.replacen(line, &format!("{first}{}", &line[1..]), 1);
                std::fs::write(&sums, edited)?;
            }
            Tamper::PayloadByteFlipped => flip(&uki)?,
        }
        let out = f();
        std::fs::write(&sums, saved_sums)?;
        std::fs::write(&sig, saved_sig)?;
        if how == Tamper::PayloadByteFlipped {
            flip(&uki)?;
        }
        Ok(out)
    }
}

/// A detached signature of `file` by a key made on the spot, which no image trusts.
fn sign_with_throwaway_key(home: &Path, file: &Path, sig: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(home);
    std::fs::create_dir_all(home)?;
    std::fs::set_permissions(home, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let gpg = |args: &[&str]| -> Result<()> {
        let st = Command::new("gpg")
            .arg("--homedir")
            .arg(home)
            .args(["--batch", "--quiet", "--passphrase", ""])
            .args(args)
            .stdin(Stdio::null())
            .status()?;
        if !st.success() {
            bail!("gpg {args:?} failed ({st})");
        }
        Ok(())
    };
    gpg(&[
        "--quick-gen-key",
        "someone else <other@aiwimg.invalid>",
        "ed25519",
        "sign",
        "never",
    ])?;
    let _ = std::fs::remove_file(sig);
    gpg(&[
        "--detach-sign",
        "--output",
        sig.to_str().context("path")?,
        file.to_str().context("path")?,
    ])
}
