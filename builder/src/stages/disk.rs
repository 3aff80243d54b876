//! Stage 5: the GPT disk, made by systemd-repart offline in two runs.
//!
//! Layout (A/B, see [`crate::update`]): ESP (systemd-boot + the UKI, room for
//! two), root A (erofs) + its dm-verity hash partition labelled
//! `<IMAGE_ID>_<version>` and `…_verity`, and the spare B pair labelled
//! `_empty`; all four root partitions at the profile's fixed slot sizes
//! (`root_slot_mib`), so any later version fits either slot. `/var` is not in
//! the image: repart in the booted system creates it and fills the disk.
//!
//! The roothash must be on the UKI's command line, and the UKI lives on the
//! ESP, so repart runs twice: first root A and its hash tree alone, at their
//! own sizes (which reports the roothash and gives the bytes the update
//! server serves), then the whole disk with those bytes copied into the
//! fixed slots. dm-verity reads the data size from the hash superblock, so
//! the zeros after the root in its slot are never hashed.
//! `--sector-size=512`: without it the ESP gets 4096-byte FAT sectors, which
//! OVMF will not boot.

use crate::cache::{KeyBuilder, Slot};
use crate::pipeline::BuildContext;
use crate::secure_boot::{self as sb, SecureBootInfo, StagedKeys};
use crate::stages::customize::uuid_from_key;
use crate::tools::{Bind, ToolsTree};
use crate::update;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

const MIB: u64 = 1 << 20;

pub fn slot(ctx: &BuildContext, tools: &Slot, custom: &Slot, initrd: &Slot) -> Slot {
    let mut k = KeyBuilder::new("disk");
    // The certificate identifies the signer (the key is checked against it
    // when signing); never a path.
    if let Some(s) = &ctx.signing {
        k.field("secure-boot-cert", &s.cert_sha256)
            .field("secure-boot-enroll", s.enroll.as_str());
    }
    let key = k
        // Bump when make() changes what it produces from the same inputs.
        .field("recipe", "5")
        .key("tools", &tools.key)
        .key("customize", &custom.key)
        .key("initrd", &initrd.key)
        .list("cmdline", &ctx.profile.kernel_cmdline)
        .field("esp-size", &ctx.profile.esp_size_mib.to_string())
        .field("esp-file-times", &ctx.profile.source_date_epoch.to_string())
        .field("root-slot-mib", &ctx.profile.root_slot_mib.to_string())
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
    pub layout: Layout,
    /// Set when the EFI binaries are signed for Secure Boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_boot: Option<SecureBootInfo>,
}

/// The A/B layout: equal slots, fixed per profile, and where root A's data
/// and hash tree end inside theirs (the rest is zeros).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Layout {
    pub root_slot_size: u64,
    pub verity_slot_size: u64,
    pub esp_size: u64,
    /// Bytes of root A that are the erofs image (what the update server serves).
    pub root_data_size: u64,
    /// Bytes of the hash partition that are the verity superblock and tree.
    pub verity_data_size: u64,
    pub root_uuid: String,
    pub verity_uuid: String,
    pub root_label: String,
    pub verity_label: String,
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

/// Copies `len` bytes at `offset` of `src` into a new file `dest`.
pub fn copy_range(src: &Path, offset: u64, len: u64, dest: &Path) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(src).with_context(|| format!("opening {}", src.display()))?;
    f.seek(SeekFrom::Start(offset))?;
    let mut out =
        std::fs::File::create(dest).with_context(|| format!("creating {}", dest.display()))?;
    let n = std::io::copy(&mut f.take(len), &mut out)?;
    anyhow::ensure!(
        n == len,
        "{} ends before byte {}",
        src.display(),
        offset + len
    );
    Ok(())
}

/// The repart definitions of the final disk: the ESP, root A and its verity
/// partition copied from the first run's output with the UUIDs it derived
/// from the roothash, and the spare B pair labelled `_empty`; all four root
/// partitions at the profile's fixed slot sizes.
fn final_definitions(
    esp: u64,
    slots: &update::Slots,
    labels: &(String, String),
    uuids: &(String, String),
) -> Vec<(&'static str, String)> {
    let (root, verity) = (slots.root, slots.verity);
    let empty = update::EMPTY_LABEL;
    vec![
        (
            "00-esp.conf",
            format!("[Partition]\nType=esp\nLabel=ESP\nFormat=vfat\nCopyFiles=/work/esp:/\nSizeMinBytes={esp}\nSizeMaxBytes={esp}\n"),
        ),
        (
            "10-root-a.conf",
            format!(
                "[Partition]\nType=root\nLabel={}\nUUID={}\nCopyBlocks=/work/root.raw\nSizeMinBytes={root}\nSizeMaxBytes={root}\n",
                labels.0, uuids.0
            ),
        ),
        (
            "11-root-a-verity.conf",
            format!(
                "[Partition]\nType=root-verity\nLabel={}\nUUID={}\nCopyBlocks=/work/root-verity.raw\nSizeMinBytes={verity}\nSizeMaxBytes={verity}\n",
                labels.1, uuids.1
            ),
        ),
        (
            "20-root-b.conf",
            format!("[Partition]\nType=root\nLabel={empty}\nSizeMinBytes={root}\nSizeMaxBytes={root}\n"),
        ),
        (
            "21-root-b-verity.conf",
            format!("[Partition]\nType=root-verity\nLabel={empty}\nSizeMinBytes={verity}\nSizeMaxBytes={verity}\n"),
        ),
    ]
}

/// The ESP must take a second UKI (the update) beside the booted one, with a
/// fifth to spare: a full ESP makes sysupdate fail with a bare I/O error.
pub fn check_esp_room(esp: u64, uki: u64) -> Result<()> {
    let need = (2 * uki + 2 * uki / 5).div_ceil(MIB) * MIB + 2 * MIB;
    if esp < need {
        bail!(
            "the ESP ({} MiB) cannot hold two {} MiB UKIs for A/B updates: \
             set `esp_size_mib` to at least {}",
            esp / MIB,
            uki.div_ceil(MIB),
            need / MIB
        );
    }
    Ok(())
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
    let slots = update::Slots::for_root_mib(ctx.profile.root_slot_mib);
    let image_id = format!("aiware-{}", ctx.profile.name);
    let labels = update::labels(&image_id, &ctx.opts.image_version)?;
    // Fail before any work when the root cannot fit (the hash tree is checked
    // once it exists).
    slots.check_fits(&ctx.profile.name, root_size, 0)?;
    let defs = tmp.join("repart.d");
    std::fs::create_dir_all(&defs)?;
    let esp = ctx.profile.esp_size_mib * MIB;
    // Run 1 makes root A and its hash tree at their own sizes: dm-verity
    // covers exactly the root's blocks, as on the update server.
    let first = [
        (
            "10-root-a.conf",
            "[Partition]\nType=root\nCopyBlocks=/custom/root.erofs\nVerity=data\nVerityMatchKey=root\n".to_string(),
        ),
        (
            "11-root-a-verity.conf",
            // 4 KiB verity blocks, the root's page and erofs block size. Left
            // to repart, they follow --sector-size (512): eight hashes per page
            // read, which made every cold read of the root ~3x slower than
            // the disk (64 MiB in 1.9 s against 0.6 s under TCG).
            "[Partition]\nType=root-verity\nVerity=hash\nVerityMatchKey=root\nMinimize=best\n\
             VerityDataBlockSizeBytes=4096\nVerityHashBlockSizeBytes=4096\n".to_string(),
        ),
    ];
    for (name, text) in &first {
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
            .field("root-slot-mib", &ctx.profile.root_slot_mib.to_string())
            .field("name", &ctx.image_name())
            .finish(),
    );
    // The key's private copy, bound at /keys only while this stage runs.
    let staged = ctx.signing.as_ref().map(StagedKeys::new).transpose()?;
    let tree = rootfs.dir.join("tree");
    let mut binds = vec![
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
            host: &tree,
            inside: "/image",
        },
    ];
    if let Some(k) = &staged {
        binds.push(k.bind());
    }
    let subject = match &staged {
        Some(_) => Some(sb::check_pair(tools, &binds)?),
        None => None,
    };
    let repart = |what: &str, image: &str, extra: &[&str]| -> Result<Vec<RepartRow>> {
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
        args.push(image);
        let out = tools.run(what, &args, &binds)?;
        serde_json::from_str(&out).with_context(|| format!("reading systemd-repart's JSON: {out}"))
    };

    // Run 1: root A and its hash tree, which give the roothash.
    let rows = repart(
        "computing the dm-verity tree (systemd-repart)",
        "/work/first.raw",
        &["--empty=create", "--size=auto"],
    )?;
    let roothash = rows
        .iter()
        .find_map(|r| r.roothash.clone().filter(|h| !h.is_empty()))
        .context("systemd-repart reported no roothash")?;
    let row = |ptype: &str| {
        rows.iter()
            .find(|r| r.ptype.ends_with(ptype) && r.raw_size > 0)
            .with_context(|| format!("systemd-repart wrote no {ptype} partition"))
    };
    let (data_row, hash_row) = (row("x86-64")?, row("x86-64-verity")?);
    let uuids = (
        update::uuid_from_roothash(&roothash, true)?,
        update::uuid_from_roothash(&roothash, false)?,
    );
    // The veritysetup generator finds the partitions by these UUIDs alone.
    anyhow::ensure!(
        data_row.uuid == uuids.0 && hash_row.uuid == uuids.1,
        "systemd-repart's verity partition UUIDs {} / {} are not the roothash's halves",
        data_row.uuid,
        hash_row.uuid
    );
    slots.check_fits(&ctx.profile.name, data_row.raw_size, hash_row.raw_size)?;
    let first_raw = tmp.join("first.raw");
    copy_range(
        &first_raw,
        data_row.offset,
        data_row.raw_size,
        &tmp.join("root.raw"),
    )?;
    copy_range(
        &first_raw,
        hash_row.offset,
        hash_row.raw_size,
        &tmp.join("root-verity.raw"),
    )?;
    std::fs::remove_file(&first_raw)?;

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
    // No `default`: systemd-boot must pick the newest good UKI by itself, so
    // that a version whose tries ran out falls back to the previous one.
    std::fs::write(
        espdir.join("loader/loader.conf"),
        sb::loader_conf(ctx.signing.as_ref().map(|s| s.enroll)),
    )?;
    std::fs::write(
        espdir.join("aiware/README.txt"),
        "Bare metal: put the node's launch data in this folder as `user-data`\r\n\
         (#cloud-config, KEY=VALUE lines or TOML); aiw-agent reads it at boot.\r\n",
    )?;
    // The first version is not counted: it is the one to come back to.
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
    let epoch = ctx.profile.source_date_epoch;
    let uki_out = format!("--output=/work/esp/EFI/Linux/{uki}");
    let cmdline_arg = format!("--cmdline={cmdline}");
    let uname = format!("--uname={kver}");
    let mut ukify = vec![
        "ukify",
        "build",
        "--linux=/initrd/vmlinuz",
        "--initrd=/initrd/initrd.img",
        &cmdline_arg,
        "--os-release=@/custom/os-release",
        &uname,
        &uki_out,
    ];
    let secure_boot = match (&ctx.signing, subject) {
        (Some(s), Some(subject)) => {
            ukify.extend_from_slice(sb::UKIFY_SIGN_ARGS);
            sb::run_signing(
                tools,
                "making and signing the unified kernel image (ukify)",
                &ukify,
                &binds,
                epoch,
            )?;
            let mut signed = sb::sign_boot_loader(tools, &binds, epoch)?;
            signed.push(format!("EFI/Linux/{uki}"));
            // The owner GUID of the enrolled entries: the certificate's own.
            let owner = uuid_from_key(&s.cert_sha256);
            let auth_files = sb::write_enrollment(tools, &binds, epoch, &owner)?;
            Some(SecureBootInfo {
                db_cert_sha256: s.cert_sha256.clone(),
                db_subject: subject,
                signed,
                enroll: s.enroll,
                auth_files,
            })
        }
        _ => {
            tools.run("making the unified kernel image (ukify)", &ukify, &binds)?;
            None
        }
    };
    let uki_path = espdir.join("EFI/Linux").join(&uki);
    check_esp_room(esp, std::fs::metadata(&uki_path)?.len())?;
    // Kept beside disk.raw: the outputs stage serves it as the update's UKI.
    std::fs::copy(&uki_path, tmp.join(&uki))?;

    // FAT directory entries carry each file's times, which mcopy takes from the
    // staged files: pin them, or every build's ESP (and image sha256) differs.
    set_times_under(&espdir, ctx.profile.source_date_epoch)?;

    // Run 2: the whole disk at its fixed layout.
    for (name, _) in &first {
        std::fs::remove_file(defs.join(name))?;
    }
    for (name, text) in final_definitions(esp, &slots, &labels, &uuids) {
        std::fs::write(defs.join(name), text)?;
    }
    let rows = repart(
        "writing the disk (systemd-repart)",
        "/work/disk.raw",
        &["--empty=create", "--size=auto"],
    )?;
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
    std::fs::remove_file(tmp.join("root.raw"))?;
    std::fs::remove_file(tmp.join("root-verity.raw"))?;
    let info = DiskInfo {
        roothash,
        cmdline,
        uki,
        kernel_version: kver,
        root_size,
        partitions,
        layout: Layout {
            root_slot_size: slots.root,
            verity_slot_size: slots.verity,
            esp_size: esp,
            root_data_size: data_row.raw_size,
            verity_data_size: hash_row.raw_size,
            root_uuid: uuids.0,
            verity_uuid: uuids.1,
            root_label: labels.0,
            verity_label: labels.1,
        },
        secure_boot,
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

    fn value<'a>(text: &'a str, key: &str) -> &'a str {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}= in {text}"))
    }

    #[test]
    fn both_slots_are_the_same_fixed_size_and_b_is_empty() {
        let slots = update::Slots::for_root_mib(2048);
        let labels = update::labels("aiware-engine", "1.0.0").unwrap();
        let uuids = ("u-data".to_string(), "u-hash".to_string());
        let defs = final_definitions(128 * MIB, &slots, &labels, &uuids);
        let get = |n: &str| &defs.iter().find(|(name, _)| *name == n).unwrap().1;
        let (a, av) = (get("10-root-a.conf"), get("11-root-a-verity.conf"));
        let (b, bv) = (get("20-root-b.conf"), get("21-root-b-verity.conf"));
        for (t, size) in [
            (a, slots.root),
            (b, slots.root),
            (av, slots.verity),
            (bv, slots.verity),
        ] {
            assert_eq!(value(t, "SizeMinBytes"), size.to_string(), "{t}");
            assert_eq!(value(t, "SizeMaxBytes"), size.to_string(), "{t}");
        }
        assert_eq!(value(a, "Label"), "aiware-engine_1.0.0");
        assert_eq!(value(av, "Label"), "aiware-engine_1.0.0_verity");
        assert_eq!(value(b, "Label"), "_empty");
        assert_eq!(value(bv, "Label"), "_empty");
        assert_eq!(value(a, "UUID"), "u-data");
        assert_eq!(value(av, "UUID"), "u-hash");
        assert_eq!(value(a, "Type"), "root");
        assert_eq!(value(bv, "Type"), "root-verity");
        // No Verity= here: a tree over the slot's zeros would change the roothash.
        assert!(defs.iter().all(|(_, t)| !t.contains("Verity=")));
        assert_eq!(
            value(get("00-esp.conf"), "SizeMinBytes"),
            (128 * MIB).to_string()
        );
    }

    #[test]
    fn the_esp_must_hold_two_ukis() {
        check_esp_room(128 * MIB, 26 * MIB).unwrap();
        let e = check_esp_room(64 * MIB, 26 * MIB).unwrap_err().to_string();
        assert!(e.contains("esp_size_mib") && e.contains("two"), "{e}");
    }

    #[test]
    fn copy_range_takes_exactly_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::write(&src, (0u8..=255).collect::<Vec<_>>()).unwrap();
        let dest = dir.path().join("dest");
        copy_range(&src, 16, 32, &dest).unwrap();
        assert_eq!(
            std::fs::read(&dest).unwrap(),
            (16u8..48).collect::<Vec<_>>()
        );
        assert!(copy_range(&src, 250, 10, &dest).is_err());
    }

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
