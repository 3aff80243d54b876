//! Reading files from a labelled seed filesystem (NoCloud `cidata`, config-drive
//! `config-2`): ISO 9660 is read directly from the device; vfat is mounted
//! read-only under /run/aiware/seed. A directory in place of the device (tests)
//! is read as is.

use crate::paths::Paths;
use std::path::{Path, PathBuf};

pub struct SeedFs {
    dev: PathBuf,
    mounted: Option<PathBuf>,
}

impl SeedFs {
    pub fn open(paths: &Paths, label: &str) -> Result<SeedFs, String> {
        let dev = paths.by_label().join(label);
        if dev.is_dir() {
            return Ok(SeedFs { dev, mounted: None });
        }
        let mut f =
            std::fs::File::open(&dev).map_err(|e| format!("cannot open {}: {e}", dev.display()))?;
        if crate::iso9660::volume_id(&mut f).is_ok() {
            return Ok(SeedFs { dev, mounted: None });
        }
        let target = paths.run_dir().join("seed").join(label);
        std::fs::create_dir_all(&target)
            .map_err(|e| format!("cannot create {}: {e}", target.display()))?;
        mount_ro(&dev, &target, "vfat")?;
        Ok(SeedFs {
            dev,
            mounted: Some(target),
        })
    }

    /// `Ok(None)` when the file is not there.
    pub fn read(&self, rel: &str) -> Result<Option<Vec<u8>>, String> {
        let base = self.mounted.as_deref().unwrap_or(&self.dev);
        if base.is_dir() {
            return match std::fs::read(base.join(rel)) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(format!("cannot read {rel} on {}: {e}", base.display())),
            };
        }
        let mut f = std::fs::File::open(&self.dev).map_err(|e| e.to_string())?;
        crate::iso9660::read_file(&mut f, rel).map_err(|e| format!("{}: {e}", self.dev.display()))
    }
}

impl Drop for SeedFs {
    fn drop(&mut self) {
        if let Some(t) = &self.mounted {
            if let Ok(c) = std::ffi::CString::new(t.as_os_str().as_encoded_bytes()) {
                // SAFETY: c is a valid NUL-terminated path.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
}

fn mount_ro(dev: &Path, target: &Path, fstype: &str) -> Result<(), String> {
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())
    };
    let (d, t) = (c(dev)?, c(target)?);
    let fs = std::ffi::CString::new(fstype).unwrap();
    let flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: all pointers are valid NUL-terminated strings for the call's duration.
    let rc = unsafe { libc::mount(d.as_ptr(), t.as_ptr(), fs.as_ptr(), flags, std::ptr::null()) };
    if rc != 0 {
        return Err(format!(
            "cannot mount {} ({fstype}, read-only) on {}: {}",
            dev.display(),
            target.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}
