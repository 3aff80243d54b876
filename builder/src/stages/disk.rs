//! Stage 5: the GPT disk, made by systemd-repart offline in two runs.
//!
//! Layout: ESP (systemd-boot + the UKI), root-A (erofs) + its dm-verity hash
//! partition, root-B + hash reserved empty for A/B updates. `/var` is not in
//! the image: repart in the booted system creates it and fills the disk.
//!
//! The roothash must be on the UKI's command line, and the UKI lives on the
//! ESP, so repart runs twice: root partitions first (`--defer-partitions=esp`,
//! which reports the roothash), then the ESP once the UKI exists.
//! `--sector-size=512`: without it the ESP gets 4096-byte FAT sectors, which
//! OVMF will not boot.

use crate::cache::{KeyBuilder, Slot};
use crate::pipeline::BuildContext;
use crate::stages::customize::uuid_from_key;
use crate::tools::{Bind, ToolsTree};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

const MIB: u64 = 1 << 20;

pub fn slot(ctx: &BuildContext, tools: &Slot, custom: &Slot, initrd: &Slot) -> Slot {
    let key = KeyBuilder::new("disk")
        // Bump when make() changes what it produces from the same inputs.
        .field("recipe", "3")
        .key("tools", &tools.key)
        .key("customize", &custom.key)
        .key("initrd", &initrd.key)
        .list("cmdline", &ctx.profile.kernel_cmdline)
        .field("esp-size", &ctx.profile.esp_size_mib.to_string())
        .field("esp-file-times", &ctx.profile.source_date_epoch.to_string())
        .field("name", &ctx.image_name())
        .finish();
    ctx.cache.slot("disk", &key)
}

/// Sets the access and modification times of `dir` and everything under it
/// to `epoch` (seconds since 1970), so file systems built from it do not
/// record when the build ran.
fn set_times_under(dir: &Path, epoch: u64) -> Result<()> {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(epoch);
    let times = std::fs::FileTimes::new().set_accessed(t).set_modified(t);
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            set_times_under(&entry.path(), epoch)?;
        } else {
            std::fs::File::options()
                .write(true)
                .open(entry.path())?
                .set_times(times)?;
        }
    }
    // A directory's times are set last: changing its entries touches it.
    std::fs::File::open(dir)?
        .set_times(times)
        .with_context(|| format!("setting the times of {}", dir.display()))
}

/// What the disk stage learned, kept beside disk.raw.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskInfo {
    pub roothash: String,
    pub cmdline: String,
    pub uki: String,
    pub kernel_version: String,
    pub root_size: u64,
    pub partitions: Vec<PartitionInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartitionInfo {
    pub label: String,
    #[serde(rename = "type")]
    pub ptype: String,
    pub uuid: String,
    pub offset: u64,
    pub size: u64,
}

/// repart's `--json` rows (the fields we read).
#[derive(Deserialize)]
struct RepartRow {
    #[serde(rename = "type")]
    ptype: String,
    label: String,
    uuid: String,
    offset: u64,
    raw_size: u64,
    roothash: Option<String>,
}

pub fn info(slot: &Slot) -> Result<DiskInfo> {
    let text = std::fs::read_to_string(slot.dir.join("disk.json"))?;
    Ok(serde_json::from_str(&text)?)
}

fn round_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

pub fn make(
    ctx: &BuildContext,
    tools: &ToolsTree,
    rootfs: &Slot,
    custom: &Slot,
    initrd: &Slot,
    tmp: &Path,
) -> Result<()> {
    let root_size = std::fs::metadata(custom.dir.join("root.erofs"))?.len();
    // Room for the next version's root to grow by a quarter.
    let b_size = round_up(root_size + root_size / 4, MIB);
    let b_verity = round_up((b_size / 4096) * 32 * 130 / 128 + 2 * MIB, MIB).max(10 * MIB);
    let defs = tmp.join("repart.d");
    std::fs::create_dir_all(&defs)?;
    let esp = ctx.profile.esp_size_mib * MIB;
    let files = [
        (
            "00-esp.conf",
            format!("[Partition]\nType=esp\nLabel=ESP\nFormat=vfat\nCopyFiles=/work/esp:/\nSizeMinBytes={esp}\nSizeMaxBytes={esp}\n"),
        ),
        (
            "10-root-a.conf",
            "[Partition]\nType=root\nLabel=root-a\nCopyBlocks=/custom/root.erofs\nVerity=data\nVerityMatchKey=root\n".to_string(),
        ),
        (
            "11-root-a-verity.conf",
            // 4 KiB verity blocks, the root's page and erofs block size. Left
            // to repart, they follow --sector-size (512): eight hashes per page
            // read, which made every cold read of the root ~3x slower than
            // the disk (64 MiB in 1.9 s against 0.6 s under TCG).
            "[Partition]\nType=root-verity\nLabel=root-a-verity\nVerity=hash\nVerityMatchKey=root\nMinimize=best\n\
             VerityDataBlockSizeBytes=4096\nVerityHashBlockSizeBytes=4096\n".to_string(),
        ),
        (
            "20-root-b.conf",
            format!("[Partition]\nType=root\nLabel=root-b\nSizeMinBytes={b_size}\nSizeMaxBytes={b_size}\n"),
        ),
        (
            "21-root-b-verity.conf",
            format!("[Partition]\nType=root-verity\nLabel=root-b-verity\nSizeMinBytes={b_verity}\nSizeMaxBytes={b_verity}\n"),
        ),
    ];
    for (name, text) in &files {
        std::fs::write(defs.join(name), text)?;
    }
    // The seed makes the GPT's and partitions' UUIDs and the verity salt. It
    // comes from what goes on the disk, not from the stage keys, so the same
    // content gives the same bytes however it was asked for (the keys of a
    // --locked build differ from those of the build that wrote the lock).
    let seed = uuid_from_key(
        &KeyBuilder::new("disk-seed")
            .path("root", &custom.dir.join("root.erofs"))?
            .path("kernel", &initrd.dir.join("vmlinuz"))?
            .path("initrd", &initrd.dir.join("initrd.img"))?
            .list("cmdline", &ctx.profile.kernel_cmdline)
            .field("esp-size", &ctx.profile.esp_size_mib.to_string())
            .field("name", &ctx.image_name())
            .finish(),
    );
    let binds = [
        Bind {
            host: tmp,
            inside: "/work",
        },
        Bind {
            host: &custom.dir,
            inside: "/custom",
        },
        Bind {
            host: &initrd.dir,
            inside: "/initrd",
        },
        Bind {
            host: &rootfs.dir.join("tree"),
            inside: "/image",
        },
    ];
    let repart = |what: &str, extra: &[&str]| -> Result<Vec<RepartRow>> {
        let mut args = vec![
            "systemd-repart",
            "--offline=yes",
            "--sector-size=512",
            "--dry-run=no",
            "--definitions=/work/repart.d",
            "--json=short",
            "--no-pager",
        ];
        let seed_arg = format!("--seed={seed}");
        args.push(&seed_arg);
        args.extend_from_slice(extra);
        args.push("/work/disk.raw");
        let out = tools.run(what, &args, &binds)?;
        serde_json::from_str(&out).with_context(|| format!("reading systemd-repart's JSON: {out}"))
    };

    // Run 1: root partitions (and the reserved B pair); the ESP's space is kept.
    let rows = repart(
        "writing the root partitions (systemd-repart)",
        &["--empty=create", "--size=auto", "--defer-partitions=esp"],
    )?;
    let roothash = rows
        .iter()
        .find_map(|r| r.roothash.clone().filter(|h| !h.is_empty()))
        .context("systemd-repart reported no roothash")?;

    // The UKI: kernel + initrd + command line naming the verity root.
    let kver = std::fs::read_to_string(initrd.dir.join("kernel-version"))?;
    let mut cmdline = format!("roothash={roothash} root=/dev/mapper/root rootfstype=erofs ro");
    for w in &ctx.profile.kernel_cmdline {
        cmdline.push(' ');
        cmdline.push_str(w);
    }
    let espdir = tmp.join("esp");
    for d in ["EFI/BOOT", "EFI/systemd", "EFI/Linux", "loader", "aiware"] {
        std::fs::create_dir_all(espdir.join(d))?;
    }
    std::fs::write(espdir.join("loader/loader.conf"), "timeout 0\neditor no\n")?;
    std::fs::write(
        espdir.join("aiware/README.txt"),
        "Bare metal: put the node's launch data in this folder as `user-data`\r\n\
         (#cloud-config, KEY=VALUE lines or TOML); aiw-agent reads it at boot.\r\n",
    )?;
    let uki = format!("{}.efi", ctx.image_name());
    tools.run(
        "installing systemd-boot",
        &[
            "sh",
            "-c",
            "cp /usr/lib/systemd/boot/efi/systemd-bootx64.efi /work/esp/EFI/BOOT/BOOTX64.EFI && \
             cp /usr/lib/systemd/boot/efi/systemd-bootx64.efi /work/esp/EFI/systemd/systemd-bootx64.efi",
        ],
        &binds,
    )?;
    let uki_out = format!("--output=/work/esp/EFI/Linux/{uki}");
    let cmdline_arg = format!("--cmdline={cmdline}");
    let uname = format!("--uname={kver}");
    tools.run(
        "making the unified kernel image (ukify)",
        &[
            "ukify",
            "build",
            "--linux=/initrd/vmlinuz",
            "--initrd=/initrd/initrd.img",
            &cmdline_arg,
            "--os-release=@/custom/os-release",
            &uname,
            &uki_out,
        ],
        &binds,
    )?;

    // FAT directory entries carry each file's times, which mcopy takes from the
    // staged files: pin them, or every build's ESP (and image sha256) differs.
    set_times_under(&espdir, ctx.profile.source_date_epoch)?;

    // Run 2: the ESP, now that the UKI exists.
    let rows = repart("writing the ESP (systemd-repart)", &[])?;
    let partitions = rows
        .iter()
        .filter(|r| r.raw_size > 0)
        .map(|r| PartitionInfo {
            label: r.label.clone(),
            ptype: r.ptype.clone(),
            uuid: r.uuid.clone(),
            offset: r.offset,
            size: r.raw_size,
        })
        .collect();
    std::fs::remove_dir_all(&espdir)?;
    std::fs::remove_dir_all(&defs)?;
    let info = DiskInfo {
        roothash,
        cmdline,
        uki,
        kernel_version: kver,
        root_size,
        partitions,
    };
    std::fs::write(tmp.join("disk.json"), serde_json::to_string_pretty(&info)?)?;
    // The package list travels with the disk, so a cached disk needs nothing
    // of the (large) rootfs slot to make outputs and the lock file.
    std::fs::copy(rootfs.dir.join("packages.lock"), tmp.join("packages.lock"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_and_folder_under_the_esp_gets_the_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let esp = dir.path().join("esp");
        std::fs::create_dir_all(esp.join("EFI/Linux")).unwrap();
        std::fs::write(esp.join("EFI/Linux/a.efi"), b"uki").unwrap();
        std::fs::write(esp.join("loader.conf"), b"timeout 0").unwrap();
        set_times_under(&esp, 1_767_225_600).unwrap();
        for p in ["", "EFI", "EFI/Linux", "EFI/Linux/a.efi", "loader.conf"] {
            let m = std::fs::metadata(esp.join(p)).unwrap().modified().unwrap();
            let secs = m.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
            assert_eq!(secs, 1_767_225_600, "{p:?}");
        }
    }
}
