//! Content-addressed stage cache.
//!
//! Every stage names its inputs to a [`KeyBuilder`]; the sha256 of those inputs
//! is the stage's key, and its artifact lives in `<cache>/<stage>/<key>/`. A
//! stage whose key directory is complete (has the `.done` marker) is not redone.
//! Inputs are hashed with their names, so two inputs can never be confused for
//! each other, and files are hashed with their relative paths, modes and
//! contents, so a rename, a chmod or an edit each change the key.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Bumped when the way a stage is made changes, so old artifacts are not reused.
pub const RECIPE_VERSION: u32 = 2;

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

    /// Removes this cached entry so the next build makes it again (`--rebuild`).
    /// Ok(false) when there was none; an error when another build uses it.
    pub fn remove(&self) -> Result<bool> {
        if !self.is_done() {
            return Ok(false);
        }
        if !self.try_remove()? {
            bail!(
                "{} is in use by another build; wait for it to finish",
                self.dir.display()
            );
        }
        Ok(true)
    }

    /// Removes the entry unless a build is using or filling it right now
    /// (then returns false).
    fn try_remove(&self) -> Result<bool> {
        let lock = self.lock_path();
        let Some(_held) = FileLock::try_exclusive(&lock)? else {
            return Ok(false);
        };
        // Not done first: a crash half-way leaves something that is not reused.
        let _ = std::fs::remove_file(self.dir.join(".done"));
        remove_tree(&self.dir)?;
        let _ = std::fs::remove_file(&lock);
        Ok(true)
    }

    fn lock_path(&self) -> PathBuf {
        let parent = self.dir.parent().expect("slot has a parent");
        parent.join(format!(".{}.lock", self.key))
    }

    /// Marks the slot as in use by this build until the guard is dropped: a
    /// shared lock eviction respects, and the `.done` time eviction orders by.
    /// None when the slot is not (or no longer) complete.
    pub fn hold(&self) -> Result<Option<FileLock>> {
        if !self.is_done() {
            // Also true of a stage never built, whose folder may not exist yet.
            return Ok(None);
        }
        let lock = FileLock::shared(&self.lock_path())?;
        if !self.is_done() {
            return Ok(None);
        }
        let done = std::fs::File::options()
            .write(true)
            .open(self.dir.join(".done"))?;
        done.set_modified(std::time::SystemTime::now())?;
        Ok(Some(lock))
    }

    /// Runs `make` into a fresh temporary folder beside the slot and moves it
    /// into place only when it succeeded, so an interrupted stage never looks done.
    pub fn fill(&self, make: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        let parent = self.dir.parent().expect("slot has a parent");
        std::fs::create_dir_all(parent)?;
        // One builder at a time per slot; a second one waits, then reuses.
        let _lock = FileLock::exclusive(&self.lock_path())?;
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

/// A `flock` held until dropped (released by the kernel if the process dies,
/// so an interrupted build never leaves a stale lock). Exclusive: one builder
/// fills a slot. Shared: a build is using a slot, so it must not be evicted.
pub struct FileLock {
    _file: std::fs::File,
}

impl FileLock {
    pub fn exclusive(path: &Path) -> Result<FileLock> {
        Self::take(path, libc::LOCK_EX).map(|l| l.expect("blocking lock"))
    }

    pub fn shared(path: &Path) -> Result<FileLock> {
        Self::take(path, libc::LOCK_SH).map(|l| l.expect("blocking lock"))
    }

    /// Exclusive, or None at once when someone else holds the lock.
    pub fn try_exclusive(path: &Path) -> Result<Option<FileLock>> {
        Self::take(path, libc::LOCK_EX | libc::LOCK_NB)
    }

    fn take(path: &Path, op: libc::c_int) -> Result<Option<FileLock>> {
        use std::os::fd::AsRawFd;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening lock {}", path.display()))?;
        // SAFETY: a valid open file descriptor.
        if unsafe { libc::flock(file.as_raw_fd(), op) } != 0 {
            let e = std::io::Error::last_os_error();
            if op & libc::LOCK_NB != 0 && e.kind() == std::io::ErrorKind::WouldBlock {
                return Ok(None);
            }
            anyhow::bail!("locking {}: {e}", path.display());
        }
        Ok(Some(FileLock { _file: file }))
    }
}

/// A complete artifact in the cache.
#[derive(Debug, Clone)]
pub struct Entry {
    pub stage: String,
    pub key: String,
    pub dir: PathBuf,
    /// Bytes allocated on disk (sparse files count what they use).
    pub size: u64,
    /// When a build last used it (the `.done` marker's time).
    pub last_used: std::time::SystemTime,
}

impl Cache {
    /// Every complete artifact, least recently used first: each slot (a
    /// folder `<kind>/<key>/` with a `.done` marker: the stages, the pulled
    /// images). Folders that are not slots (the apt archive cache, helpers'
    /// venvs) have no such marker and are not listed.
    pub fn entries(&self) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        let mut kinds: Vec<_> = std::fs::read_dir(&self.root)?
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|k| !k.starts_with('.'))
            .collect();
        kinds.sort();
        for stage in &kinds {
            let dir = self.root.join(stage);
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in rd.flatten() {
                let key = e.file_name().to_string_lossy().into_owned();
                // Entries are folders; the file_type of a directory listing
                // needs no stat, so apt-archives' thousands of .debs cost
                // nothing here.
                if key.starts_with('.') || !e.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let done = e.path().join(".done");
                if !done.is_file() {
                    continue;
                }
                out.push(Entry {
                    stage: stage.to_string(),
                    key,
                    size: allocated_size(&e.path()),
                    last_used: std::fs::metadata(&done)?.modified()?,
                    dir: e.path(),
                });
            }
        }
        out.sort_by_key(|e| e.last_used);
        Ok(out)
    }

    /// Removes one entry unless a build is using or filling it right now
    /// (then returns false).
    pub fn evict(&self, entry: &Entry) -> Result<bool> {
        self.slot(&entry.stage, &entry.key).try_remove()
    }

    /// Evicts least recently used entries, never those in `keep`, until
    /// `want` bytes are freed or nothing more can go. Returns the bytes freed.
    pub fn make_room(&self, want: u64, keep: &[&Path], mut log: impl FnMut(&Entry)) -> Result<u64> {
        let mut freed = 0;
        for e in self.entries()? {
            if freed >= want {
                break;
            }
            if keep.contains(&e.dir.as_path()) {
                continue;
            }
            if self.evict(&e)? {
                log(&e);
                freed += e.size;
            }
        }
        Ok(freed)
    }
}

/// Bytes a tree uses on disk (st_blocks), without following links.
pub fn allocated_size(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let mut total = meta.blocks() * 512;
    if meta.is_dir() {
        if let Ok(rd) = std::fs::read_dir(path) {
            for e in rd.flatten() {
                total += allocated_size(&e.path());
            }
        }
    }
    total
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
/// The sha256 of a file. Holes are hashed as the zeros they read as, without
/// reading them: a raw disk image is gigabytes of holes around a few hundred
/// MiB of data, and reading the holes made the kernel zero-fill every page
/// (60 s for the engine image's 4.2 GiB raw, against a few now).
pub fn sha256_file(path: &Path) -> Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::fd::AsRawFd;
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = f.metadata()?.len();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let zeros = vec![0u8; 1 << 20];
    let mut pos: u64 = 0;
    while pos < len {
        // Where the next data starts and where it ends; a file system without
        // SEEK_DATA (or a file that changed under us) is read as all data.
        let seek = |from: u64, whence: libc::c_int| -> Option<u64> {
            let r = unsafe { libc::lseek(f.as_raw_fd(), from as libc::off_t, whence) };
            (r >= 0).then_some(r as u64)
        };
        let data = match seek(pos, libc::SEEK_DATA) {
            Some(d) => d.min(len),
            None if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) => len,
            None => pos,
        };
        let mut zero_run = data - pos;
        while zero_run > 0 {
            let n = zero_run.min(zeros.len() as u64) as usize;
            h.update(&zeros[..n]);
            zero_run -= n as u64;
        }
        if data >= len {
            break;
        }
        let hole = seek(data, libc::SEEK_HOLE)
            .unwrap_or(len)
            .clamp(data + 1, len);
        f.seek(SeekFrom::Start(data))?;
        let mut left = hole - data;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = f.read(&mut buf[..want])?;
            if n == 0 {
                bail!("{} shrank while being hashed", path.display());
            }
            h.update(&buf[..n]);
            left -= n as u64;
        }
        pos = hole;
    }
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_a_sparse_file_is_that_of_its_bytes() {
        use std::io::{Seek, SeekFrom, Write};
        let d = tempfile::tempdir().unwrap();
        let sparse = d.path().join("sparse.raw");
        let mut f = std::fs::File::create(&sparse).unwrap();
        // Hole, data, hole, data, trailing hole: every boundary of the walk.
        let mib = 1u64 << 20;
        f.seek(SeekFrom::Start(3 * mib + 17)).unwrap();
        f.write_all(&[0xa5; 5000]).unwrap();
        f.seek(SeekFrom::Start(9 * mib)).unwrap();
        f.write_all(b"aiwimg").unwrap();
        f.set_len(16 * mib + 3).unwrap();
        drop(f);
        let bytes = std::fs::read(&sparse).unwrap();
        assert_eq!(bytes.len() as u64, 16 * mib + 3);
        let want = hex::encode(Sha256::digest(&bytes));
        assert_eq!(sha256_file(&sparse).unwrap(), want);
        // The same bytes written out in full (no holes) hash the same.
        let dense = d.path().join("dense.raw");
        std::fs::write(&dense, &bytes).unwrap();
        assert_eq!(sha256_file(&dense).unwrap(), want);
        let empty = d.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        assert_eq!(
            sha256_file(&empty).unwrap(),
            hex::encode(Sha256::digest(b""))
        );
    }

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
    fn eviction_is_least_recently_used_first_and_spares_held_slots() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::new(d.path().to_path_buf()).unwrap();
        let make = |stage: &str, key: &str, bytes: usize| {
            let slot = cache.slot(stage, key);
            slot.fill(|tmp| Ok(std::fs::write(tmp.join("art"), vec![1u8; bytes])?))
                .unwrap();
            slot
        };
        let old = make("rootfs", "old", 64 << 10);
        let held = make("customize", "held", 64 << 10);
        let kept = make("disk", "kept", 64 << 10);
        let new = make("rootfs", "new", 64 << 10);
        let t = |secs| std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs);
        for (slot, when) in [(&old, 1), (&held, 2), (&kept, 3), (&new, 4)] {
            let f = std::fs::File::options()
                .write(true)
                .open(slot.dir.join(".done"))
                .unwrap();
            f.set_modified(t(when)).unwrap();
        }
        let names = |c: &Cache| -> Vec<String> {
            c.entries().unwrap().into_iter().map(|e| e.key).collect()
        };
        assert_eq!(names(&cache), ["old", "held", "kept", "new"]);

        // A build holding `held` keeps it; `kept` is the current plan's.
        let guard = held.hold().unwrap().expect("held is complete");
        // hold() marks it used now: it moves to the back of the line.
        assert_eq!(names(&cache).last().unwrap(), "held");
        let mut evicted = Vec::new();
        let freed = cache
            .make_room(u64::MAX, &[kept.dir.as_path()], |e| {
                evicted.push(e.key.clone())
            })
            .unwrap();
        assert_eq!(evicted, ["old", "new"]);
        assert!(freed >= 2 * (64 << 10), "{freed}");
        assert!(!old.is_done() && !old.dir.exists());
        assert!(held.is_done() && kept.is_done());
        drop(guard);

        // Enough freed after the first one: the rest stay.
        let a = make("rootfs", "a", 64 << 10);
        let evicted = cache.make_room(1, &[], |_| {}).unwrap();
        assert!(evicted > 0);
        assert_eq!(names(&cache).len(), 2, "{:?}", names(&cache));
        assert!(a.is_done(), "the oldest entry goes first, the newest stays");
    }

    #[test]
    fn slot_is_done_only_after_success() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::new(d.path().to_path_buf()).unwrap();
        let slot = cache.slot("stage", "k1");
        assert!(!slot.is_done());
        // A stage never built: nothing to hold, and no error.
        assert!(slot.hold().unwrap().is_none());
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

    #[test]
    fn remove_for_rebuild_refuses_a_slot_another_build_holds() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::new(d.path().to_path_buf()).unwrap();
        let slot = cache.slot("rootfs", "k1");
        assert!(!slot.remove().unwrap(), "nothing to remove");
        slot.fill(|tmp| Ok(std::fs::write(tmp.join("art"), "x")?))
            .unwrap();
        let guard = slot.hold().unwrap();
        let err = slot.remove().unwrap_err().to_string();
        assert!(err.contains("in use by another build"), "{err}");
        assert!(slot.is_done());
        drop(guard);
        assert!(slot.remove().unwrap());
        assert!(!slot.is_done() && !slot.dir.exists());
    }
}
