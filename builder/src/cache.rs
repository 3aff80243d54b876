//! Content-addressed stage cache.
//!
//! Every stage names its inputs to a [`KeyBuilder`]; the sha256 of those inputs
//! is the stage's key, and its artifact lives in `<cache>/<stage>/<key>/`. A
//! stage whose key directory is complete (has the `.done` marker) is not redone.
//! Inputs are hashed with their names, so two inputs can never be confused for
//! each other, and files are hashed with their relative paths, modes and
//! contents, so a rename, a chmod or an edit each change the key.

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Bumped when the way a stage is made changes, so old artifacts are not reused.
pub const RECIPE_VERSION: u32 = 1;

#[derive(Clone)]
pub struct KeyBuilder {
    hasher: Sha256,
}

impl KeyBuilder {
    pub fn new(stage: &str) -> Self {
        let mut k = KeyBuilder {
            hasher: Sha256::new(),
        };
        k.field("stage", stage);
        k.field("recipe", &RECIPE_VERSION.to_string());
        k
    }

    fn put(&mut self, bytes: &[u8]) {
        self.hasher.update((bytes.len() as u64).to_le_bytes());
        self.hasher.update(bytes);
    }

    /// A named scalar input.
    pub fn field(&mut self, name: &str, value: &str) -> &mut Self {
        self.put(b"field");
        self.put(name.as_bytes());
        self.put(value.as_bytes());
        self
    }

    /// A named list input (order matters).
    pub fn list(&mut self, name: &str, values: &[String]) -> &mut Self {
        self.put(b"list");
        self.put(name.as_bytes());
        self.put(&(values.len() as u64).to_le_bytes());
        for v in values {
            self.put(v.as_bytes());
        }
        self
    }

    /// Another stage's key: a stage that consumes an artifact depends on its key.
    pub fn key(&mut self, name: &str, key: &str) -> &mut Self {
        self.field(&format!("key:{name}"), key)
    }

    /// A file or a whole tree: relative paths, kinds, modes, contents, link targets.
    pub fn path(&mut self, name: &str, path: &Path) -> Result<&mut Self> {
        self.put(b"path");
        self.put(name.as_bytes());
        if !path.exists() {
            self.put(b"absent");
            return Ok(self);
        }
        let mut entries = Vec::new();
        walk(path, Path::new(""), &mut entries)?;
        for rel in entries {
            let full = if rel.as_os_str().is_empty() {
                path.to_path_buf()
            } else {
                path.join(&rel)
            };
            let meta = std::fs::symlink_metadata(&full)
                .with_context(|| format!("reading {}", full.display()))?;
            self.put(rel.to_string_lossy().as_bytes());
            self.put(&meta.permissions().mode().to_le_bytes());
            if meta.file_type().is_symlink() {
                self.put(b"link");
                self.put(std::fs::read_link(&full)?.to_string_lossy().as_bytes());
            } else if meta.is_dir() {
                self.put(b"dir");
            } else {
                self.put(b"file");
                let data =
                    std::fs::read(&full).with_context(|| format!("reading {}", full.display()))?;
                self.put(&data);
            }
        }
        Ok(self)
    }

    pub fn finish(&self) -> String {
        hex::encode(self.hasher.clone().finalize())
    }
}

/// All entries under `root` (root itself as ""), sorted, without following links.
fn walk(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    out.push(rel.to_path_buf());
    // join("") would add a trailing slash, which fails on a plain file.
    let full = if rel.as_os_str().is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    };
    let meta = std::fs::symlink_metadata(&full)?;
    if meta.is_dir() {
        let mut names: Vec<_> = std::fs::read_dir(&full)
            .with_context(|| format!("listing {}", full.display()))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()?;
        names.sort();
        for n in names {
            walk(root, &rel.join(n), out)?;
        }
    }
    Ok(())
}

/// The cache folder and its stage slots.
pub struct Cache {
    pub root: PathBuf,
}

/// One stage's slot in the cache.
pub struct Slot {
    pub dir: PathBuf,
    pub key: String,
}

impl Cache {
    pub fn new(root: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&root)
            .with_context(|| format!("creating cache folder {}", root.display()))?;
        Ok(Cache { root })
    }

    pub fn slot(&self, stage: &str, key: &str) -> Slot {
        Slot {
            dir: self.root.join(stage).join(key),
            key: key.to_string(),
        }
    }
}

impl Slot {
    pub fn is_done(&self) -> bool {
        self.dir.join(".done").is_file()
    }

    /// Runs `make` into a fresh temporary folder beside the slot and moves it
    /// into place only when it succeeded, so an interrupted stage never looks done.
    pub fn fill(&self, make: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        let parent = self.dir.parent().expect("slot has a parent");
        std::fs::create_dir_all(parent)?;
        // One builder at a time per slot; a second one waits, then reuses.
        let _lock = FileLock::exclusive(&parent.join(format!(".{}.lock", self.key)))?;
        if self.is_done() {
            return Ok(());
        }
        // Leftovers of an interrupted build of this same stage are garbage.
        let prefix = format!(".{}.tmp-", self.key);
        for e in std::fs::read_dir(parent)?.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                remove_tree(&e.path())?;
            }
        }
        let tmp = parent.join(format!("{prefix}{}", std::process::id()));
        std::fs::create_dir_all(&tmp)?;
        if let Err(e) = make(&tmp) {
            let _ = remove_tree(&tmp);
            return Err(e);
        }
        std::fs::write(tmp.join(".done"), b"")?;
        if self.dir.exists() {
            remove_tree(&self.dir)?;
        }
        std::fs::rename(&tmp, &self.dir)?;
        Ok(())
    }
}

/// Mount points at or below `path` (deepest first), from /proc/self/mountinfo.
fn mounts_below(path: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(path))
        .collect();
    out.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    out
}

/// An exclusive `flock` held until dropped (released by the kernel if the
/// process dies, so an interrupted build never leaves a stale lock).
pub struct FileLock {
    _file: std::fs::File,
}

impl FileLock {
    pub fn exclusive(path: &Path) -> Result<FileLock> {
        use std::os::fd::AsRawFd;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening lock {}", path.display()))?;
        // SAFETY: a valid open file descriptor.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            anyhow::bail!(
                "locking {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(FileLock { _file: file })
    }
}

/// Removes a tree that may hold read-only folders (rootfs trees do). Anything
/// still mounted below it is unmounted first, so removal never reaches into
/// /dev, /proc or /sys of the host.
pub fn remove_tree(path: &Path) -> Result<()> {
    for m in mounts_below(path) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&m)
            .status();
    }
    anyhow::ensure!(
        mounts_below(path).is_empty(),
        "cannot remove {}: something is still mounted below it",
        path.display()
    );
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(_) => {
            let st = std::process::Command::new("rm")
                .arg("-rf")
                .arg(path)
                .status()?;
            anyhow::ensure!(st.success(), "cannot remove {}", path.display());
            Ok(())
        }
    }
}

/// sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_names_and_boundaries_matter() {
        let a = KeyBuilder::new("s").field("a", "bc").finish();
        let b = KeyBuilder::new("s").field("ab", "c").finish();
        let c = KeyBuilder::new("t").field("a", "bc").finish();
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(a, KeyBuilder::new("s").field("a", "bc").finish());
        let l1 = KeyBuilder::new("s")
            .list("l", &["a".into(), "b".into()])
            .finish();
        let l2 = KeyBuilder::new("s").list("l", &["ab".into()]).finish();
        assert_ne!(l1, l2);
    }

    #[test]
    fn tree_key_sees_edit_rename_mode_and_link() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("t");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/a"), "1").unwrap();
        let key = || KeyBuilder::new("s").path("t", &root).unwrap().finish();
        let k0 = key();
        assert_eq!(k0, key());
        std::fs::write(root.join("etc/a"), "2").unwrap();
        let k1 = key();
        assert_ne!(k0, k1);
        std::fs::rename(root.join("etc/a"), root.join("etc/b")).unwrap();
        let k2 = key();
        assert_ne!(k1, k2);
        std::fs::set_permissions(root.join("etc/b"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        let k3 = key();
        assert_ne!(k2, k3);
        std::os::unix::fs::symlink("b", root.join("etc/c")).unwrap();
        assert_ne!(k3, key());
    }

    #[test]
    fn single_file_input() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("Cargo.lock");
        std::fs::write(&f, "a").unwrap();
        let k1 = KeyBuilder::new("s").path("f", &f).unwrap().finish();
        std::fs::write(&f, "b").unwrap();
        assert_ne!(k1, KeyBuilder::new("s").path("f", &f).unwrap().finish());
    }

    #[test]
    fn slot_is_done_only_after_success() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::new(d.path().to_path_buf()).unwrap();
        let slot = cache.slot("stage", "k1");
        assert!(!slot.is_done());
        let r = slot.fill(|tmp| {
            std::fs::write(tmp.join("half"), "x")?;
            anyhow::bail!("boom")
        });
        assert!(r.is_err());
        assert!(!slot.is_done());
        assert!(!slot.dir.exists());
        slot.fill(|tmp| Ok(std::fs::write(tmp.join("art"), "x")?))
            .unwrap();
        assert!(slot.is_done());
        assert!(slot.dir.join("art").is_file());
    }
}
