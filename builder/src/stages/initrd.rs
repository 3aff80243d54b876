//! Stage 4: the initrd. dracut from the tools tree, run against the image's
//! own kernel modules, systemd-based, holding only what boot needs: the disk
//! and bus drivers of the platforms we boot on, erofs, dm-verity, ext4, vfat.

use crate::cache::{KeyBuilder, Slot};
use crate::pipeline::BuildContext;
use crate::tools::{Bind, ToolsTree};
use anyhow::{bail, Result};
use std::path::Path;

/// systemd's initrd without dracut's own hook services (the dracut-systemd
/// module: dracut-cmdline, dracut-pre-udev, ... shell scripts run before and
/// around udev): systemd's generators find the root from the command line
/// (fstab-generator: root=, veritysetup-generator: roothash=), and the hooks
/// cost 0.5 s before udev could start under TCG.
const DRACUT_MODULES: &str = "systemd systemd-initrd systemd-veritysetup systemd-modules-load \
     kernel-modules base fs-lib rootfs-block udev-rules dm";
/// virtio (KVM/QEMU), nvme (EC2 Nitro, GCE), ahci (bare metal, Hyper-V gen2
/// uses hv_storvsc), xen-blkfront (EC2 Xen), ena (EC2 network).
const DRIVERS: &str = "virtio_blk virtio_scsi virtio_pci virtio_net nvme ahci sd_mod sr_mod \
     xen-blkfront hv_storvsc hv_vmbus ena erofs dm-verity ext4 vfat";
const FILESYSTEMS: &str = "erofs ext4 vfat";
/// Loaded by the initrd as soon as it starts (systemd-modules-load, from the
/// initrd's /etc/modules-load.d), not when udev's coldplug gets to them: the root disk's driver on QEMU/KVM (virtio) and on EC2 Nitro and
/// GCE (nvme); under TCG udev loaded virtio_blk 1.5 s after it started, and
/// on a machine without the device a load costs one module. And the x86
/// SHA-256 code (SHA-NI, AVX2): dm-verity picks its hash when the root is
/// set up, and without this module in the initrd that was the generic C code
/// for the whole life of the node, for every block read from the root (87 vs
/// 109 MB/s under TCG; several times that gap on real CPUs with SHA-NI).
const EARLY_DRIVERS: &str = "virtio_blk nvme sha256_ssse3";

/// The initrd's udev keeps what it learnt of block devices for the booted
/// system (`db_persist`, as udev's own rules do for device-mapper): systemd
/// there sees the disk's partitions as present from its start, so /var's
/// fsck and mount (and Docker after them) need not wait for udev to start
/// again and re-probe every device (3.5 s after the switch under TCG). The
/// booted system's coldplug still processes every device with its own
/// rules and updates these entries.
const BLOCK_DB_PERSIST: &str = "# Written by aiwimg (builder/src/stages/initrd.rs).\n\
SUBSYSTEM==\"block\", ACTION==\"add|change\", OPTIONS+=\"db_persist\"\n";

/// The initrd's coldplug: only what can lead to the root disk. Every other
/// device (71 ttys, 21 virtual consoles, memory blocks, CPUs, workqueues,
/// ~100 modules, ...) was probed here and then again by the booted system's
/// own coldplug, which probes everything; under TCG the initrd's udev spent
/// 3.5 s of CPU on it while the root was being set up. Block devices first,
/// as systemd's own unit has them.
const COLDPLUG_SKIP: &[&str] = &[
    "tty",
    "vc",
    "vtconsole",
    "memory",
    "cpu",
    "node",
    "workqueue",
    "wakeup",
    "bdi",
    "mem",
    "input",
    "serio",
    "serial-base",
    "rtc",
    "hwmon",
    "thermal",
    "event_source",
    "clockevents",
    "clocksource",
    "machinecheck",
    "msr",
    "edac",
    "power_supply",
    "graphics",
    "drm",
    "sound",
    "hid",
    "hidraw",
    "module",
    "dmi",
    "pci_bus",
    "virtio-ports",
    "leds",
    "backlight",
    "watchdog",
];

fn coldplug_drop_in() -> String {
    let skip: String = COLDPLUG_SKIP
        .iter()
        .map(|s| format!(" --subsystem-nomatch={s}"))
        .collect();
    format!(
        "# Written by aiwimg (builder/src/stages/initrd.rs): the initrd probes only\n\
         # what can lead to the root disk; the booted system probes every device.\n\
         [Service]\n\
         ExecStart=\n\
         ExecStart=-udevadm trigger --type=all --action=add --prioritized-subsystem=block,tpmrm{skip}\n"
    )
}

pub fn slot(ctx: &BuildContext, tools: &Slot, rootfs: &Slot) -> Slot {
    let key = KeyBuilder::new("initrd")
        .key("tools", &tools.key)
        .key("rootfs", &rootfs.key)
        // The kernel's version comes from the root file system (its key).
        .field("dracut", &dracut_args("KVER").join("\n"))
        .list(
            "included",
            &included_files().map(|(_, target, text)| format!("{target}\n{text}")),
        )
        .finish();
    ctx.cache.slot("initrd", &key)
}

/// The image kernel's version: the one folder under /usr/lib/modules.
pub fn kernel_version(rootfs_tree: &Path) -> Result<String> {
    let mut kvers: Vec<String> = std::fs::read_dir(rootfs_tree.join("usr/lib/modules"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| {
            rootfs_tree
                .join("boot")
                .join(format!("vmlinuz-{n}"))
                .is_file()
        })
        .collect();
    kvers.sort();
    match kvers.len() {
        1 => Ok(kvers.remove(0)),
        0 => bail!(
            "the root filesystem has no kernel: add linux-image-amd64 to the profile's packages"
        ),
        _ => bail!(
            "the root filesystem has several kernels ({}); keep one",
            kvers.join(", ")
        ),
    }
}

/// Our files in the initrd: the name they are staged under (in the
/// output's `included/`, removed before the stage is kept), where dracut
/// puts them, and their text.
fn included_files() -> [(&'static str, &'static str, String); 3] {
    [
        (
            "early-modules.conf",
            "/etc/modules-load.d/aiwimg-early.conf",
            format!(
                "# Written by aiwimg: loaded as soon as the initrd starts.\n{}\n",
                EARLY_DRIVERS
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
        ),
        (
            "db-persist.rules",
            "/etc/udev/rules.d/99-aiwimg-db-persist.rules",
            BLOCK_DB_PERSIST.to_string(),
        ),
        (
            "coldplug.conf",
            "/etc/systemd/system/systemd-udev-trigger.service.d/50-aiwimg-root-disk-only.conf",
            coldplug_drop_in(),
        ),
    ]
}

/// dracut's command line in the tools tree (the root at /image, the output
/// at /out). Its every word is in the stage's key: dracut records it in the
/// initrd (usr/lib/dracut/build-parameter.txt).
fn dracut_args(kver: &str) -> Vec<String> {
    let mut args: Vec<String> = [
        "dracut",
        "--quiet",
        "--no-hostonly",
        "--reproducible",
        "--no-early-microcode",
        "--kver",
        kver,
        "--kmoddir",
        &format!("/image/usr/lib/modules/{kver}"),
        "--fwdir",
        "/image/usr/lib/firmware",
        "-m",
        DRACUT_MODULES,
        "--drivers",
        DRIVERS,
        "--filesystems",
        FILESYSTEMS,
        "--add-drivers",
        EARLY_DRIVERS,
    ]
    .map(String::from)
    .to_vec();
    for (name, target, _) in included_files() {
        args.extend([
            "--include".into(),
            format!("/out/included/{name}"),
            target.into(),
        ]);
    }
    args.extend(["--compress", "zstd", "--force", "/out/initrd.img"].map(String::from));
    args
}

pub fn make(tools: &ToolsTree, rootfs: &Slot, tmp: &Path) -> Result<()> {
    let tree = rootfs.dir.join("tree");
    let kver = kernel_version(&tree)?;
    let staged = tmp.join("included");
    std::fs::create_dir_all(&staged)?;
    for (name, _, text) in included_files() {
        std::fs::write(staged.join(name), text)?;
    }
    let args = dracut_args(&kver);
    tools.run(
        "making the initrd with dracut",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &[
            Bind {
                host: tmp,
                inside: "/out",
            },
            Bind {
                host: &tree,
                inside: "/image",
            },
        ],
    )?;
    std::fs::remove_dir_all(&staged)?;
    std::fs::copy(
        tree.join("boot").join(format!("vmlinuz-{kver}")),
        tmp.join("vmlinuz"),
    )?;
    std::fs::write(tmp.join("kernel-version"), &kver)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dracut_includes_each_staged_file_at_its_target() {
        let args = dracut_args("6.12.0-test");
        let includes: Vec<_> = args
            .windows(3)
            .filter(|w| w[0] == "--include")
            .map(|w| (w[1].clone(), w[2].clone()))
            .collect();
        let expected: Vec<_> = included_files()
            .iter()
            .map(|(name, target, _)| (format!("/out/included/{name}"), target.to_string()))
            .collect();
        assert_eq!(includes, expected);
        assert!(args
            .windows(2)
            .any(|w| w[0] == "--kmoddir" && w[1] == "/image/usr/lib/modules/6.12.0-test"));
        assert_eq!(args.last().unwrap(), "/out/initrd.img");
    }
}
