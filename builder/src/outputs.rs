//! Stage 6: the files users take away, converted from the disk stage's raw
//! disk, plus `manifest.json`. Written into a temporary folder that the
//! pipeline moves into place only when everything succeeded.

use crate::cache::{sha256_file, Slot};
use crate::manifest::{Manifest, ManifestFile, Package};
use crate::pipeline::BuildContext;
use crate::run::{run_cmd, Cmd};
use crate::stages;
use anyhow::{bail, Result};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Format {
    /// Raw GPT disk image (dd, cloud imports, QEMU).
    Raw,
    /// qcow2 for libvirt, Proxmox, OpenStack.
    Qcow2,
    /// Stream-optimized VMDK for vSphere.
    Vmdk,
    /// Fixed VHD, size aligned to 1 MiB, for Azure and Hyper-V.
    Vhd,
    /// GCE: `disk.raw` in a gzip'd tar.
    Gce,
    /// zstd-compressed raw plus a .bmap for `bmaptool copy` (bare metal).
    RawZst,
}

impl Format {
    pub const ALL: [Format; 6] = [
        Format::Raw,
        Format::Qcow2,
        Format::Vmdk,
        Format::Vhd,
        Format::Gce,
        Format::RawZst,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Vhd => "vhd",
            Format::Gce => "gce",
            Format::RawZst => "raw.zst",
        }
    }

    pub fn needs_qemu_img(self) -> bool {
        matches!(self, Format::Qcow2 | Format::Vmdk | Format::Vhd)
    }

    pub fn parse_list(s: &str) -> Result<Vec<Format>> {
        let mut out = Vec::new();
        for word in s.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            let f = Format::ALL.iter().copied().find(|f| f.name() == word);
            match f {
                Some(f) if !out.contains(&f) => out.push(f),
                Some(_) => {}
                None => bail!(
                    "unknown format {word:?}; formats are {}",
                    Format::ALL.map(|f| f.name()).join(", ")
                ),
            }
        }
        if out.is_empty() {
            bail!(
                "--formats is empty; formats are {}",
                Format::ALL.map(|f| f.name()).join(", ")
            );
        }
        out.sort();
        Ok(out)
    }
}

pub fn write_all(
    ctx: &BuildContext,
    rootfs: &Slot,
    custom: &Slot,
    disk: &Slot,
    out: &Path,
) -> Result<Manifest> {
    let raw_src = disk.dir.join("disk.raw");
    let base = ctx.image_name();
    let info = stages::disk::info(disk)?;
    let mut files = Vec::new();
    for f in &ctx.opts.formats {
        let written = write_one(*f, &raw_src, &base, out)?;
        for (name, format) in written {
            let path = out.join(&name);
            files.push(ManifestFile {
                size: std::fs::metadata(&path)?.len(),
                sha256: sha256_file(&path)?,
                name,
                format,
            });
        }
    }
    let packages = stages::rootfs::installed(rootfs)?
        .into_iter()
        .map(|(name, version)| Package { name, version })
        .collect();
    let manifest = Manifest {
        profile: ctx.profile.name.clone(),
        version: ctx.opts.image_version.clone(),
        image_id: format!("aiware-{}", ctx.profile.name),
        description: ctx.profile.description.clone(),
        modes: ctx.profile.modes.clone(),
        gpu: ctx.profile.gpu,
        roothash: info.roothash.clone(),
        kernel_version: info.kernel_version.clone(),
        cmdline: info.cmdline.clone(),
        root_erofs_size: std::fs::metadata(custom.dir.join("root.erofs"))?.len(),
        partitions: info.partitions.clone(),
        files,
        packages,
        input_hash: disk.key.clone(),
    };
    std::fs::write(
        out.join("manifest.json"),
        serde_json::to_string_pretty(&manifest)? + "\n",
    )?;
    Ok(manifest)
}

/// Writes one format; returns the (file name, format name) pairs it made.
fn write_one(f: Format, raw: &Path, base: &str, out: &Path) -> Result<Vec<(String, String)>> {
    let name = |ext: &str| format!("{base}.{ext}");
    let qemu_img = |what: &str, args: &[&str], dest: &str| -> Result<()> {
        run_cmd(
            what,
            Cmd::new("qemu-img")
                .args(["convert", "-f", "raw"])
                .args(args)
                .arg(raw)
                .arg(out.join(dest)),
        )?;
        Ok(())
    };
    match f {
        Format::Raw => {
            run_cmd(
                "copying the raw image",
                Cmd::new("cp")
                    .args(["--reflink=auto", "--sparse=always"])
                    .arg(raw)
                    .arg(out.join(name("raw"))),
            )?;
            Ok(vec![(name("raw"), "raw".into())])
        }
        Format::Qcow2 => {
            qemu_img("converting to qcow2", &["-O", "qcow2"], &name("qcow2"))?;
            Ok(vec![(name("qcow2"), "qcow2".into())])
        }
        Format::Vmdk => {
            qemu_img(
                "converting to stream-optimized vmdk",
                &[
                    "-O",
                    "vmdk",
                    "-o",
                    "subformat=streamOptimized,adapter_type=lsilogic",
                ],
                &name("vmdk"),
            )?;
            Ok(vec![(name("vmdk"), "vmdk".into())])
        }
        Format::Vhd => {
            // Azure wants a fixed VHD whose virtual size is a whole number of MiB;
            // the raw disk from repart already is (repart aligns to 4 KiB, we pad).
            let size = std::fs::metadata(raw)?.len();
            let aligned = size.div_ceil(1 << 20) << 20;
            let padded = out.join(".vhd-src.raw");
            run_cmd(
                "padding the raw image to 1 MiB",
                Cmd::new("cp")
                    .args(["--reflink=auto", "--sparse=always"])
                    .arg(raw)
                    .arg(&padded),
            )?;
            std::fs::OpenOptions::new()
                .write(true)
                .open(&padded)?
                .set_len(aligned)?;
            run_cmd(
                "converting to fixed vhd",
                Cmd::new("qemu-img")
                    .args([
                        "convert",
                        "-f",
                        "raw",
                        "-O",
                        "vpc",
                        "-o",
                        "subformat=fixed,force_size=on",
                    ])
                    .arg(&padded)
                    .arg(out.join(name("vhd"))),
            )?;
            std::fs::remove_file(&padded)?;
            Ok(vec![(name("vhd"), "vhd".into())])
        }
        Format::Gce => {
            // GCE wants exactly one member named disk.raw, sparse, in a gzip'd tar.
            let staging = out.join(".gce");
            std::fs::create_dir_all(&staging)?;
            run_cmd(
                "staging disk.raw",
                Cmd::new("cp")
                    .args(["--reflink=auto", "--sparse=always"])
                    .arg(raw)
                    .arg(staging.join("disk.raw")),
            )?;
            let file = format!("{base}.gce.tar.gz");
            run_cmd(
                "packing the GCE tarball",
                Cmd::new("tar")
                    .args(["--format=oldgnu", "-Szcf"])
                    .arg(out.join(&file))
                    .arg("-C")
                    .arg(&staging)
                    .arg("disk.raw"),
            )?;
            std::fs::remove_dir_all(&staging)?;
            Ok(vec![(file, "gce".into())])
        }
        Format::RawZst => {
            let zst = format!("{base}.raw.zst");
            run_cmd(
                "compressing with zstd",
                Cmd::new("zstd")
                    .args(["-q", "-T0", "-10", "-f", "-o"])
                    .arg(out.join(&zst))
                    .arg(raw),
            )?;
            let bmap = format!("{base}.bmap");
            // The block map of the sparse raw image: bmaptool writes only mapped blocks.
            run_cmd(
                "writing the block map (bmaptool)",
                Cmd::new("bmaptool")
                    .args(["create", "-o"])
                    .arg(out.join(&bmap))
                    .arg(raw),
            )?;
            Ok(vec![(zst, "raw.zst".into()), (bmap, "bmap".into())])
        }
    }
}
