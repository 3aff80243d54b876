//! `aiwimg publish update`: adds a build's update files to a folder that a
//! plain HTTP server serves, as the nodes' systemd-sysupdate reads it:
//! `REPO/<IMAGE_ID>/` holds every published version's files, one
//! `SHA256SUMS` naming them all, and `SHA256SUMS.gpg`, its detached
//! signature (made by Debian's `gpg`, the tool sysupdate verifies with).

use crate::cache::sha256_file;
use crate::manifest::Manifest;
use crate::run::{run_cmd, Cmd};
use crate::update::{parse_sha256sums, sha256sums};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

pub struct PublishOptions {
    /// The folder `aiwimg build` wrote (or its manifest.json).
    pub image: PathBuf,
    /// The update server's document folder (the profile's `update_url`).
    pub repo: PathBuf,
    /// Secret OpenPGP key file to sign SHA256SUMS with.
    pub sign_key: Option<PathBuf>,
    /// File holding the key's passphrase, if it has one.
    pub passphrase_file: Option<PathBuf>,
}

/// What was published.
#[derive(Debug)]
pub struct Published {
    pub dir: PathBuf,
    pub version: String,
    pub added: Vec<String>,
    pub signed_by: Option<String>,
}

pub fn publish(o: &PublishOptions) -> Result<Published> {
    let image_dir = if o.image.is_file() {
        o.image.parent().unwrap_or(Path::new(".")).to_path_buf()
    } else {
        o.image.clone()
    };
    let mpath = image_dir.join("manifest.json");
    let m: Manifest = serde_json::from_str(
        &std::fs::read_to_string(&mpath).with_context(|| format!("reading {}", mpath.display()))?,
    )
    .with_context(|| format!("reading {}", mpath.display()))?;
    let files: Vec<_> = m
        .files
        .iter()
        .filter(|f| f.format.starts_with("update-") && f.format != "update-sums")
        .collect();
    for want in ["update-root", "update-root-verity", "update-uki"] {
        if !files.iter().any(|f| f.format == want) {
            bail!(
                "{} lists no {want} file: rebuild the image with this aiwimg",
                mpath.display()
            );
        }
    }
    // The signer's key first: nothing is added when it cannot sign.
    let gpg = match &o.sign_key {
        Some(k) => Some(Gpg::with_secret_key(k, o.passphrase_file.as_deref())?),
        None => None,
    };
    if let (Some(g), Some(u)) = (&gpg, &m.update) {
        match &u.keyring_fingerprint {
            Some(f) if !f.eq_ignore_ascii_case(&g.fingerprint) => bail!(
                "the image trusts update key {f}, but --sign-key is {}: its nodes would refuse this signature",
                g.fingerprint
            ),
            Some(_) => {}
            None => eprintln!(
                "warning: this image bakes no update keyring (`update_keyring`), so it refuses every update"
            ),
        }
    }

    let dir = o.repo.join(&m.image_id);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let sums_path = dir.join("SHA256SUMS");
    let mut sums = match std::fs::read_to_string(&sums_path) {
        Ok(t) => {
            parse_sha256sums(&t).with_context(|| format!("reading {}", sums_path.display()))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Default::default(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", sums_path.display())),
    };
    let mut added = Vec::new();
    for f in &files {
        let src = image_dir.join(&f.name);
        let name = Path::new(&f.name)
            .file_name()
            .context("update file without a name")?
            .to_string_lossy()
            .to_string();
        // What is published is what the build recorded, not a later change.
        let sum = sha256_file(&src).with_context(|| format!("reading {}", src.display()))?;
        if sum != f.sha256 {
            bail!(
                "{}: sha256 {sum} differs from manifest.json ({}): the output was changed after the build",
                src.display(),
                f.sha256
            );
        }
        let dest = dir.join(&name);
        if dest.exists() {
            let have = sha256_file(&dest)?;
            if have != sum {
                bail!(
                    "{} is already published with other content (sha256 {have}): \
                     a version is never replaced, build a new one",
                    dest.display()
                );
            }
        } else {
            let tmp = dir.join(format!(".{name}.tmp"));
            std::fs::copy(&src, &tmp)?;
            std::fs::rename(&tmp, &dest)?;
            added.push(name.clone());
        }
        sums.insert(name, sum);
    }
    let tmp = dir.join(".SHA256SUMS.tmp");
    std::fs::write(&tmp, sha256sums(&sums))?;
    std::fs::rename(&tmp, &sums_path)?;
    let sig = dir.join("SHA256SUMS.gpg");
    let signed_by = match &gpg {
        Some(g) => {
            let tmp_sig = dir.join(".SHA256SUMS.gpg.tmp");
            g.sign(&sums_path, &tmp_sig)?;
            // Checked the way the node's sysupdate does before it is served.
            g.verify_as_node(&sums_path, &tmp_sig)?;
            std::fs::rename(&tmp_sig, &sig)?;
            Some(g.fingerprint.clone())
        }
        None => {
            // A signature of the previous SHA256SUMS no longer matches.
            if sig.exists() {
                std::fs::remove_file(&sig)?;
            }
            eprintln!(
                "warning: SHA256SUMS is not signed (no --sign-key): nodes refuse these updates"
            );
            None
        }
    };
    Ok(Published {
        dir,
        version: m.version,
        added,
        signed_by,
    })
}

/// A throwaway gpg home holding one secret key.
struct Gpg {
    home: tempfile::TempDir,
    fingerprint: String,
    passphrase_file: Option<PathBuf>,
}

impl Gpg {
    fn with_secret_key(key: &Path, passphrase_file: Option<&Path>) -> Result<Gpg> {
        let home = tempfile::Builder::new().prefix("aiwimg-gpg").tempdir()?;
        let mut g = Gpg {
            home,
            fingerprint: String::new(),
            passphrase_file: passphrase_file.map(Path::to_path_buf),
        };
        let mut import = g.cmd();
        import.arg("--import").arg(key);
        run_cmd("importing the signing key (gpg)", &mut import)?;
        let out = run_cmd(
            "listing the signing key (gpg)",
            g.cmd().args(["--with-colons", "--list-secret-keys"]),
        )?;
        let mut fprs = Vec::new();
        let mut after_sec = false;
        for l in out.lines() {
            if l.starts_with("sec:") {
                after_sec = true;
            } else if after_sec && l.starts_with("fpr:") {
                fprs.push(l.split(':').nth(9).unwrap_or("").to_string());
                after_sec = false;
            }
        }
        match fprs.as_slice() {
            [f] if !f.is_empty() => g.fingerprint = f.clone(),
            [] => bail!("{} holds no secret key", key.display()),
            _ => bail!(
                "{} holds {} secret keys: give one (sysupdate's gpg check wants a single signature)",
                key.display(),
                fprs.len()
            ),
        }
        Ok(g)
    }

    fn cmd(&self) -> Cmd {
        let mut c = Cmd::new("gpg");
        c.args(["--batch", "--quiet", "--no-tty", "--homedir"])
            .arg(self.home.path());
        c
    }

    fn sign(&self, file: &Path, sig: &Path) -> Result<()> {
        let mut c = self.cmd();
        c.args(["--yes", "--pinentry-mode", "loopback"]);
        if let Some(p) = &self.passphrase_file {
            c.arg("--passphrase-file").arg(p);
        } else {
            c.args(["--passphrase", ""]);
        }
        c.args(["--local-user", &format!("{}!", self.fingerprint)])
            .args(["--digest-algo", "SHA256", "--detach-sign", "--output"])
            .arg(sig)
            .arg(file);
        run_cmd("signing SHA256SUMS (gpg)", &mut c)?;
        Ok(())
    }

    /// `gpg --no-default-keyring --keyring=K --trust-model=always --verify`
    /// with K the exported public key, as systemd-sysupdate runs it.
    fn verify_as_node(&self, file: &Path, sig: &Path) -> Result<()> {
        let pubring = self.home.path().join("node-pubring.gpg");
        let mut export = self.cmd();
        export
            .arg("--output")
            .arg(&pubring)
            .args(["--export", &self.fingerprint]);
        run_cmd("exporting the public key (gpg)", &mut export)?;
        let node_home = tempfile::Builder::new().prefix("aiwimg-gpg").tempdir()?;
        let mut c = Cmd::new("gpg");
        c.args(["--batch", "--no-tty", "--homedir"])
            .arg(node_home.path())
            .arg("--no-default-keyring")
            .arg(format!("--keyring={}", pubring.display()))
            .args(["--trust-model=always", "--verify"])
            .arg(sig)
            .arg(file);
        run_cmd("checking the signature as a node would (gpg)", &mut c)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{ManifestFile, UpdateInfo};

    /// A throwaway ed25519 key made by gpg: (secret key file, fingerprint).
    fn make_key(dir: &Path, name: &str) -> (PathBuf, String) {
        let home = dir.join(format!("gnupg-{name}"));
        std::fs::create_dir_all(&home).unwrap();
        let gpg = |args: &[&str]| {
            let out = std::process::Command::new("gpg")
                .args(["--batch", "--quiet", "--homedir"])
                .arg(&home)
                .args(args)
                .output()
                .expect("gpg (Debian's gpg package) is needed by this test");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        };
        gpg(&[
            "--passphrase",
            "",
            "--quick-gen-key",
            &format!("{name} <{name}@example.org>"),
            "ed25519",
            "sign",
            "never",
        ]);
        let list = gpg(&["--with-colons", "--list-secret-keys"]);
        let fpr = list
            .lines()
            .find(|l| l.starts_with("fpr:"))
            .unwrap()
            .split(':')
            .nth(9)
            .unwrap()
            .to_string();
        let key = dir.join(format!("{name}.key"));
        let secret = std::process::Command::new("gpg")
            .args(["--batch", "--homedir"])
            .arg(&home)
            .args(["--export-secret-keys", &fpr])
            .output()
            .unwrap();
        std::fs::write(&key, secret.stdout).unwrap();
        (key, fpr)
    }

    /// An image folder as `aiwimg build` writes it, update files only.
    fn image(dir: &Path, version: &str, fpr: Option<&str>) -> PathBuf {
        let out = dir.join(format!("out-{version}"));
        std::fs::create_dir_all(out.join("update")).unwrap();
        let base = format!("aiware-engine_{version}");
        let mut files = Vec::new();
        for (name, format) in [
            (
                format!("{base}.root.11111111-2222-3333-4444-555555555555.raw"),
                "update-root",
            ),
            (
                format!("{base}.root-verity.66666666-7777-8888-9999-000000000000.raw"),
                "update-root-verity",
            ),
            (format!("{base}.efi"), "update-uki"),
        ] {
            let path = out.join("update").join(&name);
            std::fs::write(&path, format!("{name} bytes")).unwrap();
            files.push(ManifestFile {
                name: format!("update/{name}"),
                format: format.into(),
                sha256: sha256_file(&path).unwrap(),
                size: std::fs::metadata(&path).unwrap().len(),
            });
        }
        let m = serde_json::json!({
            "profile": "engine", "version": version, "image_id": "aiware-engine",
            "description": "d", "modes": [], "gpu": false, "roothash": "00",
            "kernel_version": "k", "cmdline": "c", "root_erofs_size": 0,
            "partitions": [], "files": files, "packages": [], "input_hash": "h",
            "update": UpdateInfo { url: "http://x/aiware".into(), tries: 3,
                keyring_fingerprint: fpr.map(str::to_string) },
        });
        std::fs::write(out.join("manifest.json"), m.to_string()).unwrap();
        out
    }

    fn gpgv(dir: &Path, key_fpr: &str, key: &Path, repo: &Path) -> bool {
        // The public half, as the image bakes it.
        let home = dir.join(format!("v-{key_fpr}"));
        std::fs::create_dir_all(&home).unwrap();
        let run = |args: &[&str]| {
            std::process::Command::new("gpg")
                .args(["--batch", "--quiet", "--homedir"])
                .arg(&home)
                .args(args)
                .output()
                .unwrap()
        };
        run(&["--import", key.to_str().unwrap()]);
        let pubring = home.join("pub.gpg");
        let out = run(&["--output", pubring.to_str().unwrap(), "--export", key_fpr]);
        assert!(out.status.success());
        let d = repo.join("aiware-engine");
        std::process::Command::new("gpgv")
            .arg("--keyring")
            .arg(&pubring)
            .arg(d.join("SHA256SUMS.gpg"))
            .arg(d.join("SHA256SUMS"))
            .output()
            .unwrap()
            .status
            .success()
    }

    #[test]
    fn versions_accumulate_signed_and_are_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (key, fpr) = make_key(d, "release");
        let (other_key, other_fpr) = make_key(d, "other");
        let repo = d.join("repo");
        let opts = |image: PathBuf, key: Option<&Path>| PublishOptions {
            image,
            repo: repo.clone(),
            sign_key: key.map(Path::to_path_buf),
            passphrase_file: None,
        };

        let v1 = image(d, "1.0.0", Some(&fpr));
        let p = publish(&opts(v1.clone(), Some(&key))).unwrap();
        assert_eq!(p.added.len(), 3);
        assert_eq!(p.signed_by.as_deref(), Some(fpr.as_str()));
        let v2 = image(d, "2.0.0", Some(&fpr));
        publish(&opts(v2, Some(&key))).unwrap();
        let sums_text = std::fs::read_to_string(repo.join("aiware-engine/SHA256SUMS")).unwrap();
        let sums = parse_sha256sums(&sums_text).unwrap();
        assert_eq!(sums.len(), 6, "{sums_text}");
        for (name, sum) in &sums {
            assert_eq!(
                &sha256_file(&repo.join("aiware-engine").join(name)).unwrap(),
                sum
            );
        }
        assert!(sums.contains_key("aiware-engine_1.0.0.efi"));
        assert!(gpgv(d, &fpr, &key, &repo), "the signature does not verify");
        assert!(
            !gpgv(d, &other_fpr, &other_key, &repo),
            "another key verified it"
        );

        // Publishing again is a no-op; other bytes under a published name are refused.
        assert!(publish(&opts(v1.clone(), Some(&key)))
            .unwrap()
            .added
            .is_empty());
        let v1b = image(&d.join("b"), "1.0.0", Some(&fpr));
        let uki = v1b.join("update/aiware-engine_1.0.0.efi");
        std::fs::write(&uki, b"other").unwrap();
        let mut m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(v1b.join("manifest.json")).unwrap())
                .unwrap();
        m["files"][2]["sha256"] = sha256_file(&uki).unwrap().into();
        std::fs::write(v1b.join("manifest.json"), m.to_string()).unwrap();
        let e = publish(&opts(v1b, Some(&key))).unwrap_err().to_string();
        assert!(e.contains("already published"), "{e}");

        // An output changed after the build is refused.
        std::fs::write(v1.join("update/aiware-engine_1.0.0.efi"), b"tampered").unwrap();
        let e = publish(&opts(v1, Some(&key))).unwrap_err().to_string();
        assert!(e.contains("differs from manifest.json"), "{e}");

        // A key other than the one the image trusts is refused before anything is added.
        let v3 = image(d, "3.0.0", Some(&fpr));
        let e = publish(&opts(v3.clone(), Some(&other_key)))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&fpr) && e.contains(&other_fpr), "{e}");
        assert!(!repo.join("aiware-engine/aiware-engine_3.0.0.efi").exists());

        // Unsigned: the stale signature goes, so nodes refuse rather than fail on a mismatch.
        publish(&opts(v3, None)).unwrap();
        assert!(!repo.join("aiware-engine/SHA256SUMS.gpg").exists());
    }
}
