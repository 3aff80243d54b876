//! Writing the agent's files: whole or not at all (a temporary file renamed
//! over the old one), with the mode said explicitly (the agent runs with
//! `UMask=0077`). A leaf module: every step of the flow writes through it.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Writes `data` to `path` atomically with `mode`; a missing parent folder
/// is made with `dir_mode` (an existing one is left as it is).
pub fn write_atomic(path: &Path, data: &[u8], mode: u32, dir_mode: u32) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        if !dir.is_dir() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(dir_mode)
                .create(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(dir_mode))?;
        }
    }
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// A file only root reads or writes into a folder only root enters.
pub fn write_private(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    write_atomic(path, data, mode, 0o700)
}

/// A configuration file services read as their own users (0644, its folder
/// 0755 when made), e.g. systemd-timesyncd's drop-in or Docker's daemon.json.
pub fn write_public(path: &Path, data: &[u8]) -> std::io::Result<()> {
    write_atomic(path, data, 0o644, 0o755)
}

/// Replaces `path` (a file or a link) with a link to `target`, atomically.
pub fn replace_with_link(path: &Path, target: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_are_the_ones_asked_whatever_the_umask() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("new/dir/f");
        write_public(&p, b"x").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&p), 0o644);
        assert_eq!(mode(p.parent().unwrap()), 0o755);
        let q = d.path().join("secret/f");
        write_private(&q, b"s", 0o600).unwrap();
        assert_eq!(mode(&q), 0o600);
        assert_eq!(mode(q.parent().unwrap()), 0o700);
        // Over a link: the link is replaced, its target left alone.
        let target = d.path().join("target");
        std::fs::write(&target, "image default").unwrap();
        let l = d.path().join("l");
        replace_with_link(&l, target.to_str().unwrap()).unwrap();
        write_public(&l, b"mine").unwrap();
        assert!(!std::fs::symlink_metadata(&l).unwrap().is_symlink());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "image default");
    }
}
