//! The parts of the A/B update tests: a throwaway signing key (fixed, see
//! `fixtures/update-test-key/README.md`), images built to trust it and to
//! read their updates from [`UPDATE_URL_IN_GUEST`], later versions of the
//! same profile, and the update folder, published with `aiwimg publish
//! update` and served by a plain HTTP server on 127.0.0.1 that guests reach
//! through a guestfwd (never a real network).

use crate::test_images::{aiwimg_bin, builder_command, load, qemu_tests_root, TestImage};
use anyhow::{bail, Context, Result};
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
pub const UPDATE_TEST_PROFILES: &[&str] = &["engine"];

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

/// Version `version` of `profile` (same inputs as its test image but the
/// version), built into `target/qemu-tests/images-<version>/`.
pub fn later_version(profile: &str, version: &str) -> Result<TestImage> {
    let out = qemu_tests_root().join(format!("images-{version}"));
    std::fs::create_dir_all(&out)?;
    let mut cmd = builder_command(profile, &out);
    cmd.args(build_args()).args(["--image-version", version]);
    eprintln!("qemu-tests: building {profile} {version}: {cmd:?}");
    let st = cmd.status().context("running the image builder")?;
    if !st.success() {
        bail!("building {profile} {version} failed ({st}): {cmd:?}");
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
        let server = Command::new("python3")
            .args(["-m", "http.server", "--bind", "127.0.0.1"])
            .arg(port.to_string())
            .arg("--directory")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting python3 -m http.server for the update folder")?;
        let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if std::time::Instant::now() > until {
                bail!("the update server did not start on 127.0.0.1:{port}");
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
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
