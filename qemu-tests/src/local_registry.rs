//! A real container registry on the host's loopback: Debian's
//! `docker-registry` (the CNCF distribution registry), not a test double. The
//! builder's `[[container_images]] pull` is tested against it: images are
//! pushed with `skopeo` from the archives the tests make locally, and the
//! build pulls them back by digest. Listens on 127.0.0.1 only; its storage is
//! a folder of its own, removed with it.

use crate::process::run_checked;
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct LocalRegistry {
    child: Child,
    dir: PathBuf,
    /// `127.0.0.1:PORT`: the host part of references, and what the builder's
    /// `--insecure-registry` names (when it speaks plain HTTP).
    pub addr: String,
}

impl LocalRegistry {
    /// Starts a registry with its storage under `dir` (emptied first),
    /// speaking plain HTTP.
    pub fn start(dir: &Path) -> Result<LocalRegistry> {
        Self::start_serving(dir, None)
    }

    /// The same, serving TLS with `issued` (a certificate of a test CA).
    pub fn start_tls(dir: &Path, issued: &crate::test_ca::Issued) -> Result<LocalRegistry> {
        Self::start_serving(dir, Some(issued))
    }

    /// The port is picked by binding port 0 and letting go, so another
    /// process (a VM's forward, a client's source port) can take it before
    /// the registry binds it: a registry that exits at once with the address
    /// in use is started again on another port, up to three times.
    fn start_serving(dir: &Path, tls: Option<&crate::test_ca::Issued>) -> Result<LocalRegistry> {
        let mut tries = 0;
        loop {
            tries += 1;
            match Self::start_once(dir, tls) {
                Err(e) if tries < 3 && format!("{e:#}").contains("address already in use") => {
                    eprintln!("qemu-tests: registry port taken, trying another: {e:#}");
                }
                other => return other,
            }
        }
    }

    fn start_once(dir: &Path, tls: Option<&crate::test_ca::Issued>) -> Result<LocalRegistry> {
        let bin = "docker-registry";
        if !crate::process::on_path(bin) {
            bail!("{bin} is not installed: run builder/setup-host.sh --tests");
        }
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir.join("data"))?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.join("config.yml");
        let mut text = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: {addr}\n",
            dir.join("data").display()
        );
        if let Some(i) = tls {
            let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
            std::fs::write(&cert, &i.cert_pem)?;
            std::fs::write(&key, &i.key_pem)?;
            text.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            ));
        }
        std::fs::write(&config, text)?;
        let log = std::fs::File::create(dir.join("registry.log"))?;
        let child = Command::new(bin)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {bin}"))?;
        let mut reg = LocalRegistry {
            child,
            dir: dir.to_path_buf(),
            addr,
        };
        reg.wait_ready()?;
        Ok(reg)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let started = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait()? {
                bail!(
                    "docker-registry exited ({st}): {}",
                    std::fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default()
                );
            }
            // Any failure to talk (refused, reset, broken pipe: seen once in
            // CI while the registry was still starting) means "not yet".
            if let Ok(mut s) = TcpStream::connect(&self.addr) {
                let mut head = String::new();
                let _ = s
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .and_then(|_| write!(s, "GET /v2/ HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr))
                    .and_then(|_| s.read_to_string(&mut head));
                let status = head.split_whitespace().nth(1);
                // A TLS registry answers plain HTTP with 400 ("Client sent
                // an HTTP request to an HTTPS server"): it listens.
                let tls_up = status == Some("400") && head.contains("HTTPS server");
                if head.starts_with("HTTP/1.") && (status == Some("200") || tls_up) {
                    return Ok(());
                }
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("docker-registry on {} not ready after 30 s", self.addr);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Pushes a docker-save archive as `NAME:TAG` on this registry; returns
    /// the manifest digest the registry stored (`sha256:…`). Without TLS
    /// verification: the host side of a test, the registry its own.
    pub fn push_archive(&self, archive: &Path, name_tag: &str) -> Result<String> {
        let digest_file = self.dir.join("pushed.digest");
        let _ = std::fs::remove_file(&digest_file);
        run_checked(
            Command::new("skopeo")
                .args(["copy", "--quiet", "--dest-tls-verify=false", "--digestfile"])
                .arg(&digest_file)
                .arg(format!("docker-archive:{}", archive.display()))
                .arg(format!("docker://{}/{name_tag}", self.addr)),
            Duration::from_secs(120),
        )
        .context("skopeo copy into the local registry")?;
        let digest = std::fs::read_to_string(&digest_file)?.trim().to_string();
        if !digest.starts_with("sha256:") || digest.len() != 71 {
            bail!("skopeo wrote digest {digest:?}");
        }
        Ok(digest)
    }
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
