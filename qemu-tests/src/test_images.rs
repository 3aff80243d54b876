//! The built image of a profile, for tests: from `AIWIMG_TEST_IMAGES=DIR`
//! when set, otherwise built by the builder (which caches by content hash).
//! Built at most once per profile per process, and under a lock file so
//! parallel test processes do not build the same profile at once.

use crate::vm::DiskFormat;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

/// One file listed in `manifest.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct ManifestFile {
    pub name: String,
    pub format: String,
    #[serde(default)]
    pub sha256: String,
    #[serde(default)]
    pub size: u64,
}

/// The parts of the builder's `manifest.json` the tests use.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub profile: String,
    #[serde(default)]
    pub version: String,
    pub files: Vec<ManifestFile>,
    #[serde(default)]
    pub roothash: Option<String>,
    #[serde(flatten)]
    pub rest: serde_json::Map<String, serde_json::Value>,
}

/// A built image ready to boot.
#[derive(Debug, Clone)]
pub struct TestImage {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub disk: PathBuf,
    pub format: DiskFormat,
}

/// The workspace root (parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("qemu-tests sits inside the workspace")
        .to_path_buf()
}

/// `<workspace>/target/qemu-tests`: images, per-test work dirs, artifacts.
pub fn qemu_tests_root() -> PathBuf {
    workspace_root().join("target").join("qemu-tests")
}

/// Reads `dir/manifest.json` and picks the disk to boot (raw first, then qcow2).
pub fn load(dir: &Path) -> Result<TestImage> {
    let path = dir.join("manifest.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let manifest: Manifest =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let (file, format) = pick_disk(&manifest.files).with_context(|| {
        format!(
            "{} lists no raw or qcow2 file (has: {})",
            path.display(),
            manifest
                .files
                .iter()
                .map(|f| format!("{} ({})", f.name, f.format))
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    let disk = dir.join(&file.name);
    if !disk.is_file() {
        bail!(
            "{} lists {} but it is not there: rebuild the image",
            path.display(),
            disk.display()
        );
    }
    if file.size != 0 {
        let actual = std::fs::metadata(&disk)?.len();
        if actual != file.size {
            bail!(
                "{} is {actual} bytes but manifest.json says {}: rebuild the image",
                disk.display(),
                file.size
            );
        }
    }
    Ok(TestImage {
        dir: dir.to_path_buf(),
        manifest,
        disk,
        format,
    })
}

fn pick_disk(files: &[ManifestFile]) -> Option<(&ManifestFile, DiskFormat)> {
    files
        .iter()
        .find(|f| f.format == "raw")
        .map(|f| (f, DiskFormat::Raw))
        .or_else(|| {
            files
                .iter()
                .find(|f| f.format == "qcow2")
                .map(|f| (f, DiskFormat::Qcow2))
        })
}

/// The image for `profile`: `$AIWIMG_TEST_IMAGES/<profile>/` when that is set,
/// otherwise built into `<workspace>/target/qemu-tests/images/<profile>/`.
pub fn image_for(profile: &str) -> Result<TestImage> {
    if let Some(dir) = std::env::var_os("AIWIMG_TEST_IMAGES") {
        let dir = PathBuf::from(dir).join(profile);
        return load(&dir).with_context(|| {
            format!("AIWIMG_TEST_IMAGES is set but has no usable image for profile {profile:?}")
        });
    }
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let built = BUILT.get_or_init(Mutex::default);
    // Held while building: other threads wanting any profile wait, which is
    // what two cores want anyway.
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(dir) = built.get(profile) {
        return load(dir);
    }
    let out_dir = qemu_tests_root().join("images");
    std::fs::create_dir_all(&out_dir)?;
    let lock_path = out_dir.join(format!(".{profile}.lock"));
    let lock = std::fs::File::create(&lock_path)
        .with_context(|| format!("creating {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("locking {}", lock_path.display()))?;
    let dir = build(profile, &out_dir)?;
    drop(lock);
    built.insert(profile.to_string(), dir.clone());
    load(&dir)
}

/// The builder command: `$AIWIMG_BIN build ...` or `cargo run --release -p aiwimg -- build ...`.
pub fn builder_command(profile: &str, out_dir: &Path) -> Command {
    let mut cmd = match std::env::var_os("AIWIMG_BIN") {
        Some(bin) => Command::new(bin),
        None => {
            let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
            c.args(["run", "--quiet", "--release", "-p", "aiwimg", "--"])
                .current_dir(workspace_root())
                // The builder binary belongs in the workspace's own target dir.
                .env_remove("CARGO_TARGET_DIR");
            c
        }
    };
    // Tests boot the raw disk through an overlay; other formats only cost disk.
    cmd.args([
        "build",
        "--profile",
        profile,
        "--formats",
        "raw",
        "--output-dir",
    ])
    .arg(out_dir);
    cmd
}

/// Profiles with a third-party repository this machine cannot reach are built
/// against a local test double of it (see `test_repo`).
const NEEDS_TEST_REPO: &[&str] = &["engine-gpu"];

pub const SECURE_BOOT_TEST_KEY_CN: &str = "aiwimg TEST Secure Boot db key (not for production)";

/// The Secure Boot test db key pair (a TEST KEY, never a user's), committed
/// under `qemu-tests/fixtures/secure-boot-test-key/` so the signed image's
/// cache keys are the same in every clone (a key made per checkout would
/// rebuild the GPU root file system on every CI run).
pub fn secure_boot_test_keys() -> Result<(PathBuf, PathBuf)> {
    let dir = workspace_root().join("qemu-tests/fixtures/secure-boot-test-key");
    let (key, cert) = (dir.join("db.key"), dir.join("db.crt"));
    if !key.is_file() || !cert.is_file() {
        bail!("the Secure Boot test key is missing from {}", dir.display());
    }
    Ok((key, cert))
}

/// Profiles the suite builds signed with the Secure Boot test key (and
/// `--secure-boot-enroll if-safe`): one image serves the Secure Boot test and
/// the boot tests (on firmware in setup mode, systemd-boot enrolls the keys
/// and the node boots enforced), so the suite builds the GPU image's DKMS
/// root once.
pub const SIGNED_TEST_PROFILES: &[&str] = &["engine-gpu"];

fn build(profile: &str, out_dir: &Path) -> Result<PathBuf> {
    let mut cmd = builder_command(profile, out_dir);
    if SIGNED_TEST_PROFILES.contains(&profile) {
        let (key, cert) = secure_boot_test_keys()?;
        cmd.arg("--secure-boot-key")
            .arg(key)
            .arg("--secure-boot-cert")
            .arg(cert)
            .args(["--secure-boot-enroll", "if-safe"]);
    }
    let _repo = if NEEDS_TEST_REPO.contains(&profile) {
        let work = workspace_root().join("target/qemu-tests/nvidia-test-repo");
        let repo = crate::test_repo::TestAptRepo::start(&work)?;
        let project = crate::test_repo::project_with_test_key(
            &workspace_root(),
            &repo,
            &work.join("project"),
        )?;
        eprintln!(
            "qemu-tests: {profile} builds against a TEST DOUBLE of NVIDIA's repository at {} \
             (key {}): the real nvidia-container-toolkit is not installed here",
            repo.url, repo.fingerprint
        );
        let agent = build_agent()?;
        cmd.arg("--project")
            .arg(&project)
            .arg("--repo-mirror")
            .arg(format!("nvidia={}", repo.url))
            .arg("--agent-bin")
            .arg(agent);
        Some(repo)
    } else {
        None
    };
    if crate::update_server::UPDATE_TEST_PROFILES.contains(&profile) {
        cmd.args(crate::update_server::build_args());
    }
    eprintln!("qemu-tests: building image {profile:?}: {cmd:?}");
    let started = std::time::Instant::now();
    // Inherit stdio so the builder's progress shows in the test output.
    let status = cmd
        .status()
        .with_context(|| format!("running the image builder: {cmd:?}"))?;
    if !status.success() {
        bail!(
            "building image {profile:?} failed ({status}); command: {cmd:?}. \
             Set AIWIMG_TEST_IMAGES=DIR to test prebuilt images instead"
        );
    }
    eprintln!(
        "qemu-tests: image {profile:?} ready in {:.0?}",
        started.elapsed()
    );
    Ok(out_dir.join(profile))
}

/// Free space a VM test wants beside it: its disk overlay grows by what the
/// guest writes (an A/B update writes a whole root partition) and update
/// folders are published next to it, while another slot's VM does the same.
pub const VM_TEST_FREE_BYTES: u64 = 8 << 30;

/// Free bytes on the filesystem holding `dir` (`df`, as a user would read it).
pub fn free_bytes(dir: &Path) -> Result<u64> {
    let out = Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(dir)
        .output()
        .context("running df")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .with_context(|| format!("df {}: {text}", dir.display()))
}

/// Makes sure `dir`'s filesystem has `need` bytes free before a VM starts,
/// evicting the builder's least recently used cache entries when it has not.
/// A full disk does not fail a VM: QEMU pauses it, and the test only sees a
/// guest that stopped answering.
pub fn ensure_free_space(dir: &Path, need: u64) -> Result<()> {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let free = free_bytes(dir)?;
    if free >= need {
        return Ok(());
    }
    eprintln!(
        "qemu-tests: {} has {:.1} GiB free, a VM test wants {:.1} GiB: pruning the image cache",
        dir.display(),
        gib(free),
        gib(need)
    );
    let out = Command::new(aiwimg_bin()?)
        .args(["cache", "prune", "--keep-free", &need.to_string()])
        .output()
        .context("running aiwimg cache prune")?;
    eprint!("{}", String::from_utf8_lossy(&out.stdout));
    let now = free_bytes(dir)?;
    if now < need {
        bail!(
            "too little disk space for a VM test: {} has {:.1} GiB free after pruning the \
             image cache, {:.1} GiB wanted ({})",
            dir.display(),
            gib(now),
            gib(need),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The builder binary: `$AIWIMG_BIN`, else this workspace's release build
/// (built if needed, outside any CARGO_TARGET_DIR of the caller).
pub fn aiwimg_bin() -> Result<PathBuf> {
    if let Some(b) = std::env::var_os("AIWIMG_BIN") {
        return Ok(PathBuf::from(b));
    }
    let root = workspace_root();
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(&root)
        .env_remove("CARGO_TARGET_DIR")
        .args(["build", "--quiet", "--release", "-p", "aiwimg"])
        .status()
        .context("running cargo build for aiwimg")?;
    if !status.success() {
        bail!("cargo build -p aiwimg failed ({status})");
    }
    Ok(root.join("target/release/aiwimg"))
}

/// The agent binary of this workspace (release, musl), built if needed.
pub fn build_agent() -> Result<PathBuf> {
    let root = workspace_root();
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(&root)
        .env_remove("CARGO_TARGET_DIR")
        .args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "aiw-agent",
            "--target",
            "x86_64-unknown-linux-musl",
        ])
        .status()
        .context("running cargo build for aiw-agent")?;
    if !status.success() {
        bail!("cargo build -p aiw-agent failed ({status})");
    }
    Ok(root.join("target/x86_64-unknown-linux-musl/release/aiw-agent"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_a_manifest_and_prefers_raw() {
        let dir = std::env::temp_dir().join(format!("aiwimg-img-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("e.raw"), [0u8; 4]).unwrap();
        std::fs::write(dir.join("e.qcow2"), [0u8; 2]).unwrap();
        let manifest = r#"{"profile":"engine","version":"0.1.0","roothash":"ab",
            "files":[{"name":"e.qcow2","format":"qcow2","sha256":"x","size":2},
                     {"name":"e.raw","format":"raw","sha256":"y","size":4}],
            "packages":{"systemd":"257"}}"#;
        std::fs::write(dir.join("manifest.json"), manifest).unwrap();
        let img = load(&dir).unwrap();
        assert_eq!(img.format, DiskFormat::Raw);
        assert_eq!(img.disk, dir.join("e.raw"));
        assert_eq!(img.manifest.profile, "engine");
        assert!(img.manifest.rest.contains_key("packages"));

        // A size that does not match is caught before booting.
        std::fs::write(dir.join("e.raw"), [0u8; 5]).unwrap();
        let err = format!("{:#}", load(&dir).unwrap_err());
        assert!(err.contains("manifest.json says 4"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_manifest_is_a_clear_error() {
        let err = format!("{:#}", load(Path::new("/nonexistent/engine")).unwrap_err());
        assert!(err.contains("/nonexistent/engine/manifest.json"), "{err}");
    }

    #[test]
    fn builder_runs_outside_our_target_dir() {
        let cmd = builder_command("engine", Path::new("/o"));
        let args: Vec<_> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(args.ends_with(&[
            "build".into(),
            "--profile".into(),
            "engine".into(),
            "--formats".into(),
            "raw".into(),
            "--output-dir".into(),
            "/o".into()
        ]));
        if std::env::var_os("AIWIMG_BIN").is_none() {
            assert!(cmd
                .get_envs()
                .any(|(k, v)| k == "CARGO_TARGET_DIR" && v.is_none()));
        }
    }
}
