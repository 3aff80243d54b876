//! NVIDIA GPUs found on PCI (vendor 0x10de, display class 0x03xxxx).

use crate::paths::Paths;
use serde::{Deserialize, Serialize};

pub const NVIDIA_VENDOR: &str = "0x10de";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gpu {
    pub pci_address: String,
    pub device_id: String,
    /// A name for `GpuType`: the PCI device id unless the driver names it.
    pub name: String,
}

pub fn find_nvidia(paths: &Paths) -> Vec<Gpu> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(paths.pci_devices()) else {
        return out;
    };
    let read = |p: std::path::PathBuf| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    for e in rd.filter_map(|e| e.ok()) {
        let d = e.path();
        if read(d.join("vendor")) != NVIDIA_VENDOR || !read(d.join("class")).starts_with("0x03") {
            continue;
        }
        let device_id = read(d.join("device"));
        let addr = e.file_name().to_string_lossy().into_owned();
        // The driver's own name for the board, once nvidia.ko is loaded.
        let info = std::fs::read_to_string(
            paths
                .at("/proc/driver/nvidia/gpus")
                .join(&addr)
                .join("information"),
        )
        .unwrap_or_default();
        let name = info
            .lines()
            .find_map(|l| l.strip_prefix("Model:").map(|m| m.trim().to_string()))
            .unwrap_or_else(|| format!("NVIDIA {device_id}"));
        out.push(Gpu {
            pci_address: addr,
            device_id,
            name,
        });
    }
    out.sort_by(|a, b| a.pci_address.cmp(&b.pci_address));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nvidia_display_devices_only() {
        let t = tempfile::tempdir().unwrap();
        let p = Paths::new(t.path());
        for (addr, vendor, class) in [
            ("0000:00:04.0", "0x10de", "0x030200"),
            ("0000:00:05.0", "0x10de", "0x040300"),
            ("0000:00:02.0", "0x1af4", "0x030000"),
        ] {
            let d = p.pci_devices().join(addr);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("vendor"), format!("{vendor}\n")).unwrap();
            std::fs::write(d.join("class"), class).unwrap();
            std::fs::write(d.join("device"), "0x20b0").unwrap();
        }
        let g = find_nvidia(&p);
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].name, "NVIDIA 0x20b0");
        assert!(find_nvidia(&Paths::new("/nonexistent")).is_empty());
    }
}
