//! cloud-config `swap` (cloud-init's `swap: {filename, size, maxsize}`): a
//! swap file on /var (the image's root is read-only), made once, switched on
//! at every boot (there is no /etc/fstab to write). The install guide
//! recommends swap on engine nodes.

use serde::{Deserialize, Serialize};
use std::os::unix::fs::OpenOptionsExt;

/// Where the file goes when `filename` is not given (cloud-init: /swap.img,
/// which is on the read-only root here).
pub const DEFAULT_SWAP_FILE: &str = "/var/swap.img";
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Swap {
    pub filename: String,
    /// `None`: `auto`, sized from the memory as cloud-init does.
    pub size: Option<u64>,
    pub maxsize: Option<u64>,
}

/// `"auto"`, an integer of bytes, or a size like `512M`, `2G`, `1.5G`
/// (cloud-init's human2bytes: B, K, M, G, T; powers of 1024).
pub fn parse_size(v: &serde_json::Value) -> Result<Option<u64>, String> {
    match v {
        serde_json::Value::Number(n) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| format!("{n} is not a size in bytes")),
        serde_json::Value::String(s) if s.trim().eq_ignore_ascii_case("auto") => Ok(None),
        serde_json::Value::String(s) => human_bytes(s)
            .map(Some)
            .ok_or_else(|| format!("{s:?} is not a size (auto, bytes, or like 512M, 2G)")),
        other => Err(format!(
            "{other} is not a size (auto, bytes, or like 512M, 2G)"
        )),
    }
}

fn human_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult = match unit
        .trim()
        .trim_end_matches(['B', 'b'])
        .to_ascii_uppercase()
        .as_str()
    {
        "" => 1u64,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => return None,
    };
    (n >= 0.0 && n.is_finite()).then_some((n * mult as f64) as u64)
}

/// cloud-init's `auto`: as much as the memory below 4 GiB, 4 GiB below
/// 16 GiB, then √(memory in GiB) GiB; at most `maxsize` (default 8 GiB) and
/// half the free space of /var; whole MiB.
pub fn auto_size(memory: u64, var_free: u64, maxsize: Option<u64>) -> u64 {
    let want = if memory < 4 * GIB {
        memory
    } else if memory < 16 * GIB {
        4 * GIB
    } else {
        ((memory as f64 / GIB as f64).sqrt().round() as u64) * GIB
    };
    let cap = maxsize.unwrap_or(8 * GIB).min(var_free / 2);
    want.min(cap) / MIB * MIB
}

/// The swap file's size for this node, 0 for none.
pub fn size_for(s: &Swap, memory: u64, var_free: u64) -> u64 {
    match s.size {
        None => auto_size(memory, var_free, s.maxsize),
        Some(n) => n.min(s.maxsize.unwrap_or(u64::MAX)) / MIB * MIB,
    }
}

/// Makes (or re-makes, when its size changed) the swap file at `path` of
/// `bytes` and, on a real system, switches it on. Says what was done.
pub fn ensure(path: &std::path::Path, bytes: u64, real_system: bool) -> Result<String, String> {
    let shown = path.display();
    if bytes == 0 {
        return Ok(format!("swap size 0: no swap file at {shown}"));
    }
    let active = real_system
        && std::fs::read_to_string("/proc/swaps")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split_whitespace().next() == Some(&shown.to_string()));
    let same_size = std::fs::metadata(path).is_ok_and(|m| m.len() == bytes);
    if active && same_size {
        return Ok(format!("swap {shown} ({} MiB) already on", bytes / MIB));
    }
    if active {
        run("swapoff", &[path.as_os_str()])?;
    }
    if !same_size {
        let _ = std::fs::remove_file(path);
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).map_err(|e| format!("swap {shown}: {e}"))?;
        }
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| format!("swap {shown}: {e}"))?;
        // Allocated, not sparse: the kernel refuses a swap file with holes.
        let len = libc::off_t::try_from(bytes).map_err(|_| format!("swap {shown}: too large"))?;
        use std::os::fd::AsRawFd;
        // SAFETY: a valid open descriptor and a length; no memory is shared.
        let rc = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, len) };
        if rc != 0 {
            let _ = std::fs::remove_file(path);
            return Err(format!(
                "swap {shown}: cannot allocate {} MiB: {}",
                bytes / MIB,
                std::io::Error::from_raw_os_error(rc)
            ));
        }
        if real_system {
            run("mkswap", &[path.as_os_str()])?;
        }
    }
    if !real_system {
        return Ok(format!(
            "swap {shown} ({} MiB) made (not a real system: not switched on)",
            bytes / MIB
        ));
    }
    run("swapon", &[path.as_os_str()])?;
    Ok(format!("swap {shown} ({} MiB) on", bytes / MIB))
}

fn run(cmd: &str, args: &[&std::ffi::OsStr]) -> Result<(), String> {
    crate::storage::run_tool(cmd, args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sizes_in_the_forms_cloud_init_takes() {
        assert_eq!(parse_size(&json!("auto")), Ok(None));
        assert_eq!(parse_size(&json!(1048576)), Ok(Some(MIB)));
        assert_eq!(parse_size(&json!("512M")), Ok(Some(512 * MIB)));
        assert_eq!(parse_size(&json!("2G")), Ok(Some(2 * GIB)));
        assert_eq!(parse_size(&json!("1.5G")), Ok(Some(3 * GIB / 2)));
        assert_eq!(parse_size(&json!("64MB")), Ok(Some(64 * MIB)));
        assert!(parse_size(&json!("lots")).is_err());
        assert!(parse_size(&json!(-1)).is_err());
        assert!(parse_size(&json!(true)).is_err());
    }

    #[test]
    fn auto_follows_memory_and_stays_within_the_disk() {
        let big_disk = 1 << 40;
        assert_eq!(auto_size(2 * GIB, big_disk, None), 2 * GIB);
        assert_eq!(auto_size(8 * GIB, big_disk, None), 4 * GIB);
        assert_eq!(auto_size(64 * GIB, big_disk, None), 8 * GIB);
        assert_eq!(auto_size(64 * GIB, big_disk, Some(16 * GIB)), 8 * GIB);
        assert_eq!(
            auto_size(8 * GIB, 2 * GIB, None),
            GIB,
            "half the free space"
        );
        assert_eq!(auto_size(8 * GIB, big_disk, Some(GIB)), GIB);
        let s = Swap {
            filename: DEFAULT_SWAP_FILE.into(),
            size: Some(3 * GIB),
            maxsize: Some(2 * GIB),
        };
        assert_eq!(size_for(&s, GIB, big_disk), 2 * GIB);
    }

    #[test]
    fn a_file_is_made_allocated_private_and_remade_when_its_size_changes() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("var/swap.img");
        let said = ensure(&p, 8 * MIB, false).unwrap();
        assert!(said.contains("8 MiB"), "{said}");
        let m = std::fs::metadata(&p).unwrap();
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        assert_eq!(m.len(), 8 * MIB);
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        assert!(
            m.blocks() * 512 >= 8 * MIB,
            "allocated, not sparse: {} blocks",
            m.blocks()
        );
        ensure(&p, 16 * MIB, false).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 16 * MIB);
        assert!(ensure(&p, 0, false).unwrap().contains("no swap"));
    }
}
