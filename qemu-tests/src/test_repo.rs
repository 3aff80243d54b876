//! A local signed apt repository: a TEST DOUBLE of NVIDIA's
//! libnvidia-container repository, which this machine cannot reach.
//!
//! It holds one package the test builds itself, named
//! `nvidia-container-toolkit`, whose programs (`nvidia-container-runtime`,
//! `nvidia-ctk`) are stand-ins: the runtime execs runc. It proves the
//! mechanism the real build uses (a flat repository, InRelease signed by a key
//! the profile pins by fingerprint, `--repo-mirror nvidia=URL`), not NVIDIA's
//! software. Served over HTTP on 127.0.0.1 only.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The test repository's fixed port on 127.0.0.1.
pub const TEST_REPO_PORT: u16 = 47613;

pub struct TestAptRepo {
    pub dir: PathBuf,
    pub url: String,
    /// Armored public key the repository is signed with.
    pub key: PathBuf,
    pub fingerprint: String,
    /// The GnuPG home that signed the index; its gpg-agent is stopped on drop.
    gnupg: PathBuf,
    server: Child,
}

impl Drop for TestAptRepo {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("gpgconf")
            .arg("--homedir")
            .arg(&self.gnupg)
            .args(["--kill", "gpg-agent"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn run(what: &str, cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{what}: cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Builds the fake toolkit package into `pool`; returns its file name.
fn build_toolkit_deb(work: &Path, pool: &Path) -> Result<String> {
    let root = work.join("pkg");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("DEBIAN"))?;
    std::fs::create_dir_all(root.join("usr/bin"))?;
    std::fs::write(
        root.join("DEBIAN/control"),
        "Package: nvidia-container-toolkit\n\
         Version: 1.17.8-1~aiwimgtest\n\
         Architecture: amd64\n\
         Maintainer: aiwimg tests <tests@aiwimg.invalid>\n\
         Description: TEST DOUBLE of NVIDIA's container toolkit (aiwimg tests)\n \
         Stand-in programs only; proves the pinned-key repository path.\n",
    )?;
    let scripts = [
        (
            "nvidia-container-runtime",
            "#!/bin/sh\n# TEST DOUBLE: the real runtime adds GPU devices, then runs runc.\nexec runc \"$@\"\n",
        ),
        (
            "nvidia-ctk",
            "#!/bin/sh\n# TEST DOUBLE of nvidia-ctk.\necho \"NVIDIA Container Toolkit CLI version 1.17.8 (aiwimg TEST DOUBLE)\"\n",
        ),
    ];
    for (name, text) in scripts {
        let p = root.join("usr/bin").join(name);
        std::fs::write(&p, text)?;
        run("chmod", Command::new("chmod").arg("0755").arg(&p))?;
    }
    let file = "nvidia-container-toolkit_1.17.8-1~aiwimgtest_amd64.deb".to_string();
    run(
        "building the test package",
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&root)
            .arg(pool.join(&file)),
    )?;
    Ok(file)
}

/// `python3 -m http.server` serving `dir` on 127.0.0.1:`port` (and nowhere
/// else), once it accepts connections.
pub fn serve_dir(dir: &Path, port: u16, what: &str) -> Result<Child> {
    let mut server = Command::new("python3")
        .args(["-m", "http.server", "--bind", "127.0.0.1"])
        .arg(port.to_string())
        .arg("--directory")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting python3 -m http.server for {what}"))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if std::time::Instant::now() > deadline {
            let _ = server.kill();
            bail!("{what}: the HTTP server did not start on 127.0.0.1:{port}");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Ok(server)
}

impl TestAptRepo {
    /// Makes the key, the package and the signed index under `work`, and
    /// serves them on a free port of 127.0.0.1.
    pub fn start(work: &Path) -> Result<TestAptRepo> {
        let _ = std::fs::remove_dir_all(work);
        // A GnuPG home of its own each time: the gpg-agent of an earlier one
        // (another test process built this profile a moment ago) goes on for
        // seconds after its home is removed or it is told to stop, and as it
        // ends it unlinks its socket's path. Had this home the same path, that
        // would be the new agent's socket, and gpg here failed with "can't
        // connect to the agent: IPC connect call failed" (seen when two VM
        // tests of the pool both wanted the engine-gpu image).
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let gnupg = work.join(format!("gnupg-{}-{nanos}", std::process::id()));
        let dir = work.join("repo");
        std::fs::create_dir_all(&gnupg)?;
        std::fs::create_dir_all(&dir)?;
        run("chmod", Command::new("chmod").arg("0700").arg(&gnupg))?;
        let gpg = || {
            let mut c = Command::new("gpg");
            c.arg("--homedir").arg(&gnupg).args(["--batch", "--quiet"]);
            c
        };
        // A fixed key (fixtures/nvidia-test-repo) and a fixed port: the image
        // built against this repository then has the same inputs every run,
        // so its stages (the DKMS build among them) stay cached.
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/nvidia-test-repo");
        run(
            "importing the test repository key",
            gpg().arg("--import").arg(fixtures.join("secret-key.asc")),
        )?;
        let listing = run(
            "reading the key",
            gpg().args(["--with-colons", "--list-keys"]),
        )?;
        let fingerprint = listing
            .lines()
            .find_map(|l| l.strip_prefix("fpr:::::::::"))
            .map(|r| r.trim_end_matches(':').to_string())
            .context("gpg printed no fingerprint")?;
        let key = work.join("test-repo-key.asc");
        std::fs::copy(fixtures.join("public-key.asc"), &key)?;

        let deb = build_toolkit_deb(work, &dir)?;
        let control = run(
            "reading the package",
            Command::new("dpkg-deb").arg("--field").arg(dir.join(&deb)),
        )?;
        let bytes = std::fs::read(dir.join(&deb))?;
        let packages = format!(
            "{}Filename: ./{deb}\nSize: {}\nSHA256: {}\n\n",
            control.trim_end().to_string() + "\n",
            bytes.len(),
            sha256_hex(&bytes)
        );
        std::fs::write(dir.join("Packages"), &packages)?;
        let release = format!(
            "Origin: aiwimg tests\nLabel: TEST DOUBLE of NVIDIA's libnvidia-container\n\
             Architectures: amd64\nDate: Thu, 01 Jan 2026 00:00:00 UTC\nSHA256:\n {} {} Packages\n",
            sha256_hex(packages.as_bytes()),
            packages.len()
        );
        std::fs::write(dir.join("Release"), &release)?;
        run(
            "signing the repository",
            gpg()
                .args(["--clearsign", "--output"])
                .arg(dir.join("InRelease"))
                .arg(dir.join("Release")),
        )?;

        // Another test process may be serving it right now: wait for the port.
        let port = TEST_REPO_PORT;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
        while std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            if std::time::Instant::now() > deadline {
                bail!("127.0.0.1:{port} (the test repository's port) stays busy");
            }
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
        let server = serve_dir(&dir, port, "the test repository")?;
        let url = format!("http://127.0.0.1:{port}/");
        Ok(TestAptRepo {
            dir,
            url,
            key,
            fingerprint,
            gnupg,
            server,
        })
    }
}

/// A copy of the project's images/ and overlays/ in which the `nvidia`
/// repository of `engine-gpu` pins the test repository's key instead of
/// NVIDIA's (everything else as in the project).
pub fn project_with_test_key(workspace: &Path, repo: &TestAptRepo, dest: &Path) -> Result<PathBuf> {
    let _ = std::fs::remove_dir_all(dest);
    std::fs::create_dir_all(dest)?;
    for sub in ["images", "overlays", "agent/units"] {
        std::fs::create_dir_all(dest.join(sub).parent().unwrap())?;
        run(
            "copying the project",
            Command::new("cp")
                .arg("-a")
                .arg(workspace.join(sub))
                .arg(dest.join(sub)),
        )?;
    }
    std::fs::copy(&repo.key, dest.join("images/keys/test-repo-key.asc"))?;
    let profile = dest.join("images/engine-gpu.toml");
    let text = std::fs::read_to_string(&profile)?;
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with("key = ") {
            out.push_str("key = \"keys/test-repo-key.asc\"\n");
        } else if line.starts_with("fingerprint = ") {
            out.push_str(&format!("fingerprint = \"{}\"\n", repo.fingerprint));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    std::fs::write(&profile, out)?;
    Ok(dest.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_a_signed_flat_repository_on_loopback() {
        let work = std::env::temp_dir().join(format!("aiwimg-test-repo-{}", std::process::id()));
        let repo = TestAptRepo::start(&work).unwrap();
        assert!(repo.url.starts_with("http://127.0.0.1:"));
        assert_eq!(repo.fingerprint.len(), 40);
        // The index is served and its signature verifies with the exported key.
        let body = {
            use std::io::{Read, Write};
            let addr = repo.url.trim_start_matches("http://").trim_end_matches('/');
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            write!(s, "GET /InRelease HTTP/1.0\r\n\r\n").unwrap();
            let mut b = String::new();
            s.read_to_string(&mut b).unwrap();
            b
        };
        assert!(body.starts_with("HTTP/1.0 200"), "{body}");
        assert!(body.contains("BEGIN PGP SIGNED MESSAGE") && body.contains("Packages"));
        let verify_home = work.join("verify");
        std::fs::create_dir_all(&verify_home).unwrap();
        let gpg = |args: &[&str]| {
            Command::new("gpg")
                .arg("--homedir")
                .arg(&verify_home)
                .args(["--batch", "--quiet"])
                .args(args)
                .output()
                .unwrap()
        };
        assert!(gpg(&["--import", repo.key.to_str().unwrap()])
            .status
            .success());
        let v = gpg(&["--verify", repo.dir.join("InRelease").to_str().unwrap()]);
        assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
        // A tampered index does not verify.
        let tampered = work.join("tampered");
        let text = std::fs::read_to_string(repo.dir.join("InRelease")).unwrap();
        std::fs::write(&tampered, text.replace("amd64", "arm64")).unwrap();
        assert!(!gpg(&["--verify", tampered.to_str().unwrap()])
            .status
            .success());
        drop(repo);
        // Started again in the same folder while a gpg-agent of an earlier
        // start is still up there, as another test process's is when the next
        // one wants the image: that agent, ending when its home is removed,
        // must not take the new agent's socket with it.
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/nvidia-test-repo");
        for again in 1..=6u64 {
            let earlier = work.join("gnupg");
            std::fs::create_dir_all(&earlier).unwrap();
            run("chmod", Command::new("chmod").arg("0700").arg(&earlier)).unwrap();
            run(
                "an earlier agent",
                Command::new("gpg")
                    .arg("--homedir")
                    .arg(&earlier)
                    .args(["--batch", "--quiet", "--import"])
                    .arg(fixtures.join("secret-key.asc")),
            )
            .unwrap();
            std::thread::sleep(std::time::Duration::from_millis(100 * again));
            let repo = TestAptRepo::start(&work)
                .unwrap_or_else(|e| panic!("start {again} beside an earlier agent: {e:#}"));
            drop(repo);
        }
        let _ = std::fs::remove_dir_all(&work);
    }
}
