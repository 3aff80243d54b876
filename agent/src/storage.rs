//! cloud-config `disk_setup`, `fs_setup` and `mounts` (cloud-init's
//! cc_disk_setup and cc_mounts): a data disk partitioned, formatted and
//! mounted before the role services start, e.g. `/opt/aiware` and Docker's
//! `/var/lib/docker` on their own disk as the install guide recommends for
//! engines (≥ 500 GB for Docker's root).
//!
//! The root is read-only and there is no /etc/fstab to write: the agent does
//! it at every boot, and each step is idempotent by looking first. A disk
//! with a partition table or a file system is never partitioned again, a
//! partition with a file system is never formatted again (both unless
//! `overwrite: true`), and a disk the node runs from (anything on it mounted,
//! held by dm-verity or used as swap) is never touched, whatever the
//! user-data says. A new instance-id re-applies the same way: a layout that
//! is already there is kept, data on disks user-data does not name is never
//! read or written.
//!
//! Devices: paths, short names (`vdb`) and cloud-init's `ephemeralN[.P]`,
//! resolved when applied to the Nth instance-store disk ([`resolve_aliases`]).
//!
//! Tools: systemd-repart (GPT), our own 512-byte MBR writer (`table_type:
//! mbr`, cloud-init's default; repart writes GPT only), mkfs.ext4/3/2 and
//! mkswap, mount and swapon: all in every image. Other file systems are not
//! in the image and are refused at `aiw-agent check`.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// File systems whose mkfs is in every image.
pub const FILESYSTEMS: &[&str] = &["ext4", "ext3", "ext2", "swap"];

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Storage {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskLayout>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filesystems: Vec<FsSetup>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<MountEntry>,
}

impl Storage {
    pub fn is_empty(&self) -> bool {
        self.disks.is_empty() && self.filesystems.is_empty() && self.mounts.is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TableType {
    Mbr,
    Gpt,
}

/// One partition of a `layout`: its share of the disk in percent and its
/// type (cloud-init's MBR codes: 83 Linux, 82 swap).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionSpec {
    pub percent: u8,
    pub kind: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskLayout {
    pub device: String,
    pub table: TableType,
    /// Empty: `layout: false`, the disk is left unpartitioned.
    pub partitions: Vec<PartitionSpec>,
    pub overwrite: bool,
}

/// `partition:` of an `fs_setup` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PartitionChoice {
    /// The first partition without a file system (or the one that already
    /// has the wanted one); the whole device when it has no partitions.
    Auto,
    /// The first partition, formatted only if it has no file system.
    Any,
    /// The whole device.
    None,
    Number(u32),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsSetup {
    pub device: String,
    pub partition: PartitionChoice,
    pub filesystem: String,
    pub label: Option<String>,
    pub overwrite: bool,
    pub extra_opts: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountEntry {
    /// `/dev/vdb1`, `LABEL=x`, `UUID=x`, `host:/path`.
    pub spec: String,
    /// A path, or `none`/`swap` for swap.
    pub point: String,
    pub fstype: String,
    pub options: String,
}

impl MountEntry {
    pub fn is_swap(&self) -> bool {
        self.fstype == "swap" || self.point == "swap" || self.point == "none"
    }
}

// ---------------------------------------------------------------- parsing

fn b(v: Option<&Value>, default: bool, at: &str) -> Result<bool, String> {
    match v {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(x)) => Ok(*x),
        Some(other) => Err(format!("{at} must be true or false, not {other}")),
    }
}

/// cloud-init's names for the instance's own disks: `ephemeral0` is the
/// first instance-store disk, `ephemeral0.1` its first partition. Returns
/// `(N, partition)`.
fn ephemeral_alias(s: &str) -> Option<(usize, Option<u32>)> {
    let rest = s.strip_prefix("ephemeral")?;
    let (n, part) = match rest.split_once('.') {
        Some((n, p)) => (n, Some(p.parse().ok().filter(|p| *p > 0)?)),
        None => (rest, None),
    };
    Some((n.parse().ok()?, part))
}

/// A device as cloud-init accepts it: a path, a short name (`vdb`), or an
/// `ephemeralN[.P]` alias, resolved when applied ([`resolve_aliases`]).
fn device_path(s: &str, at: &str) -> Result<String, String> {
    let s = s.trim();
    if ephemeral_alias(s).is_some() {
        return Ok(s.to_string());
    }
    if s.starts_with("ephemeral") || s == "swap" {
        return Err(format!(
            "{at}: {s:?} is a cloud-init alias aiwimg does not resolve (ephemeralN and \
             ephemeralN.P are): name the device (/dev/nvme1n1, /dev/xvdb, /dev/vdb)"
        ));
    }
    let p = if s.starts_with("/dev/") {
        s.to_string()
    } else {
        format!("/dev/{s}")
    };
    if p.len() <= 5 || p.contains("..") || p.contains(char::is_whitespace) {
        return Err(format!("{at}: {s:?} is not a device"));
    }
    Ok(p)
}

/// A partition type as cloud-init's layouts write it: the MBR code's hex
/// digits, as a YAML number (`82`) or string (`"82"`, `"0x82"`).
fn mbr_type(v: &Value) -> Option<u8> {
    let digits = match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.trim_start_matches("0x").to_string(),
        _ => return None,
    };
    u8::from_str_radix(&digits, 16).ok()
}

/// `disk_setup: {DEVICE: {table_type, layout, overwrite}}`.
pub fn parse_disk_setup(v: &Value, what: &str) -> Result<Vec<DiskLayout>, String> {
    let Value::Object(map) = v else {
        return Err(format!(
            "{what}: disk_setup must be a map of devices, e.g. `/dev/vdb: {{table_type: gpt, layout: true}}`"
        ));
    };
    let mut out = Vec::new();
    for (dev, spec) in map {
        let at = format!("{what}: disk_setup.{dev}");
        let device = device_path(dev, &at)?;
        let Value::Object(m) = spec else {
            return Err(format!(
                "{at} must be a map (table_type, layout, overwrite)"
            ));
        };
        let table = match m.get("table_type").and_then(Value::as_str) {
            None | Some("mbr") => TableType::Mbr,
            Some("gpt") => TableType::Gpt,
            Some(t) => return Err(format!("{at}.table_type {t:?}: use mbr or gpt")),
        };
        let partitions = match m.get("layout") {
            None | Some(Value::Null) | Some(Value::Bool(false)) => Vec::new(),
            Some(Value::Bool(true)) => vec![PartitionSpec {
                percent: 100,
                kind: 0x83,
            }],
            Some(Value::Array(parts)) => {
                let mut v = Vec::new();
                for (i, p) in parts.iter().enumerate() {
                    let (pct, kind) = match p {
                        Value::Number(n) => (n.as_u64(), Some(0x83)),
                        Value::Array(pair) if pair.len() == 2 => {
                            (pair[0].as_u64(), mbr_type(&pair[1]))
                        }
                        _ => (None, None),
                    };
                    match (pct, kind) {
                        (Some(pct @ 1..=100), Some(kind)) => v.push(PartitionSpec {
                            percent: pct as u8,
                            kind,
                        }),
                        _ => {
                            return Err(format!(
                                "{at}.layout[{i}]: a percentage (1-100) or [percentage, type] such as [50, 82]"
                            ))
                        }
                    }
                }
                let total: u32 = v.iter().map(|p| p.percent as u32).sum();
                if total > 100 {
                    return Err(format!(
                        "{at}.layout: the partitions add up to {total}% of the disk"
                    ));
                }
                if table == TableType::Mbr && v.len() > 4 {
                    return Err(format!("{at}.layout: an MBR holds at most 4 partitions"));
                }
                v
            }
            Some(other) => {
                return Err(format!(
                    "{at}.layout must be true, false or a list of percentages, not {other}"
                ))
            }
        };
        for (p, i) in partitions.iter().zip(1..) {
            if ![0x83, 0x82].contains(&p.kind) {
                return Err(format!(
                    "{at}.layout[{}]: partition type {:x}: use 83 (Linux) or 82 (swap)",
                    i - 1,
                    p.kind
                ));
            }
        }
        out.push(DiskLayout {
            device,
            table,
            partitions,
            overwrite: b(m.get("overwrite"), false, &format!("{at}.overwrite"))?,
        });
    }
    Ok(out)
}

/// `fs_setup: [{label, filesystem, device, partition, overwrite, extra_opts}]`.
pub fn parse_fs_setup(v: &Value, what: &str) -> Result<Vec<FsSetup>, String> {
    let Value::Array(list) = v else {
        return Err(format!("{what}: fs_setup must be a list of file systems"));
    };
    let mut out = Vec::new();
    for (i, e) in list.iter().enumerate() {
        let at = format!("{what}: fs_setup[{i}]");
        let Value::Object(m) = e else {
            return Err(format!(
                "{at} must be a map (device, filesystem, label, partition)"
            ));
        };
        if m.contains_key("cmd") {
            return Err(format!(
                "{at}.cmd: aiw-agent runs no commands from user-data; give filesystem, label and extra_opts"
            ));
        }
        let device = match m.get("device").and_then(Value::as_str) {
            Some(d) => device_path(d, &format!("{at}.device"))?,
            None => return Err(format!("{at}: device is required (e.g. /dev/vdb)")),
        };
        let filesystem = m
            .get("filesystem")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("{at}: filesystem is required (ext4, ext3, ext2, swap)"))?
            .to_string();
        if !FILESYSTEMS.contains(&filesystem.as_str()) {
            return Err(format!(
                "{at}.filesystem {filesystem:?}: the image has mkfs for {} only",
                FILESYSTEMS.join(", ")
            ));
        }
        let partition = match m.get("partition") {
            None | Some(Value::Null) => PartitionChoice::Auto,
            Some(Value::Number(n)) => match n.as_u64() {
                Some(k @ 1..=128) => PartitionChoice::Number(k as u32),
                _ => return Err(format!("{at}.partition {n}: a partition number from 1")),
            },
            Some(Value::String(s)) => match s.as_str() {
                "auto" => PartitionChoice::Auto,
                "any" => PartitionChoice::Any,
                "none" => PartitionChoice::None,
                n => match n.parse::<u32>() {
                    Ok(k @ 1..=128) => PartitionChoice::Number(k),
                    _ => {
                        return Err(format!(
                            "{at}.partition {s:?}: auto, any, none or a partition number"
                        ))
                    }
                },
            },
            Some(other) => {
                return Err(format!(
                    "{at}.partition {other}: auto, any, none or a partition number"
                ))
            }
        };
        let label = match m.get("label") {
            None | Some(Value::Null) => None,
            Some(Value::String(l)) if valid_label(l) => Some(l.clone()),
            Some(other) => {
                return Err(format!(
                    "{at}.label {other}: up to 16 letters, digits, '-', '_' or '.'"
                ))
            }
        };
        let extra_opts = match m.get("extra_opts") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => s.split_whitespace().map(String::from).collect(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| match x {
                    Value::String(s) => Ok(s.clone()),
                    Value::Number(n) => Ok(n.to_string()),
                    _ => Err(format!("{at}.extra_opts: a list of strings")),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(format!("{at}.extra_opts: a string or a list of strings")),
        };
        // Options are argv words for mkfs, never a shell line; a word that
        // names a device would let user-data format something else.
        if let Some(o) = extra_opts
            .iter()
            .find(|o| !o.starts_with('-') && o.contains('/'))
        {
            return Err(format!(
                "{at}.extra_opts: {o:?}: only options, no devices or paths"
            ));
        }
        out.push(FsSetup {
            device,
            partition,
            filesystem,
            label,
            overwrite: b(m.get("overwrite"), false, &format!("{at}.overwrite"))?,
            extra_opts,
        });
    }
    Ok(out)
}

fn valid_label(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= 16
        && l.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// `mounts: [[SPEC, POINT, TYPE, OPTIONS, FREQ, PASSNO], …]` with cloud-init's
/// defaults (`mount_default_fields`: auto, `defaults,nofail`).
pub fn parse_mounts(
    v: &Value,
    defaults: Option<&Value>,
    what: &str,
) -> Result<Vec<MountEntry>, String> {
    let Value::Array(list) = v else {
        return Err(format!(
            "{what}: mounts must be a list such as `- [/dev/vdb1, /opt/aiware]`"
        ));
    };
    let field = |row: &[Value], i: usize| -> Option<String> {
        match row.get(i) {
            Some(Value::String(s)) if s != "None" => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        }
    };
    let default_row: Vec<Value> = match defaults {
        Some(Value::Array(a)) => a.clone(),
        _ => Vec::new(),
    };
    let mut out = Vec::new();
    for (i, e) in list.iter().enumerate() {
        let at = format!("{what}: mounts[{i}]");
        let Value::Array(row) = e else {
            return Err(format!(
                "{at} must be a list: [device, mount point, type, options]"
            ));
        };
        let spec =
            field(row, 0).ok_or_else(|| format!("{at}: the first field names the device"))?;
        // cloud-init: an entry with no mount point removes that mount (there
        // is no fstab here to remove it from: nothing to do).
        let Some(point) = field(row, 1) else {
            continue;
        };
        let spec = if spec.starts_with("LABEL=")
            || spec.starts_with("UUID=")
            || spec.starts_with("PARTUUID=")
            || spec.contains(':')
        {
            spec
        } else {
            device_path(&spec, &at)?
        };
        let fstype = field(row, 2)
            .or_else(|| field(&default_row, 2))
            .unwrap_or_else(|| "auto".into());
        let options = field(row, 3)
            .or_else(|| field(&default_row, 3))
            .unwrap_or_else(|| "defaults,nofail".into());
        if options.contains(char::is_whitespace) {
            return Err(format!(
                "{at}: options {options:?} must be one comma-separated word"
            ));
        }
        out.push(MountEntry {
            spec,
            point,
            fstype,
            options,
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------- checks

/// Where user-data may mount: the writable parts of the image. Not /var
/// itself, not the agent's or systemd's own state.
pub fn check_mount_point(point: &str) -> Result<(), String> {
    let ok_prefix = |p: &str, base: &str| p == base || p.starts_with(&format!("{base}/"));
    let clean = !point.split('/').any(|c| c == ".." || c == ".") && point.starts_with('/');
    let denied = [
        "/var/lib/aiware",
        "/var/lib/systemd",
        "/var/log",
        "/var/tmp/aiwimg",
    ]
    .iter()
    .any(|d| ok_prefix(point, d));
    let allowed = ok_prefix(point, "/opt/aiware")
        || (point.starts_with("/var/") && point.len() > 5)
        || point == "/mnt"
        || point == "/srv";
    if clean && allowed && !denied {
        Ok(())
    } else {
        Err(format!(
            "mounts: {point:?}: mount under /opt/aiware or /var (e.g. /var/lib/docker), or on /mnt or /srv; \
             the root is read-only and the agent's state stays where it is"
        ))
    }
}

/// Errors in valid YAML that `aiw-agent check` reports.
pub fn validate(s: &Storage) -> Vec<String> {
    let mut errs = Vec::new();
    for m in &s.mounts {
        if !m.is_swap() {
            if let Err(e) = check_mount_point(&m.point) {
                errs.push(e);
            }
        }
    }
    for f in &s.filesystems {
        if f.filesystem == "swap" && !f.extra_opts.is_empty() {
            errs.push(format!("fs_setup {}: swap takes no extra_opts", f.device));
        }
    }
    errs
}

// ---------------------------------------------------------------- the system

/// What the agent needs to know of block devices (a fake in tests).
pub trait BlockDevices {
    /// Why `disk` (or any partition of it) must not be touched: mounted,
    /// swap, held by device-mapper. `None` when it is free.
    fn in_use(&self, disk: &str) -> Option<String>;
    /// Its partitions, in order (`/dev/vdb1`, …).
    fn partitions(&self, disk: &str) -> Vec<String>;
    /// `(TYPE, LABEL)` of a file system or swap on `dev`, and whether it
    /// carries a partition table (blkid's low-level probe).
    fn probe(&self, dev: &str) -> Probe;
    fn size_bytes(&self, disk: &str) -> Option<u64>;
    /// Where `spec` is mounted now, if it is.
    fn mounted_at(&self, point: &Path) -> Option<String>;
    /// Runs a tool; `Err` carries its stderr.
    fn run(&self, program: &str, args: &[String]) -> Result<(), String>;
    fn write_at(&self, dev: &str, offset: u64, data: &[u8]) -> Result<(), String>;
    /// The instance-store disks, `ephemeral0` first (whole disks).
    fn instance_store(&self) -> Vec<String>;
}

/// Where udev names instance-store disks: EC2's NVMe instance storage (its
/// model, in /dev/disk/by-id, on every Nitro instance type), and Azure's
/// resource disk (the link the Azure udev rules make, when present).
const INSTANCE_STORE_BY_ID: &str = "nvme-Amazon_EC2_NVMe_Instance_Storage_";
const AZURE_RESOURCE_DISK: &[&str] =
    &["/dev/disk/cloud/azure_resource", "/dev/disk/azure/resource"];

/// The instance-store disks among the links of a by-id folder (names and
/// the devices they point at): EC2's, one per disk (udev also links each
/// namespace and partition), in the kernel's order (nvme1n1 before nvme2n1).
pub fn instance_store_disks(by_id: &[(String, String)]) -> Vec<String> {
    let mut disks: Vec<String> = by_id
        .iter()
        .filter(|(name, _)| name.starts_with(INSTANCE_STORE_BY_ID) && !name.contains("-part"))
        .map(|(_, dev)| dev.clone())
        .filter(|dev| {
            // A whole disk: nvmeXnY, not nvmeXnYpZ.
            let n = name_of(dev);
            n.starts_with("nvme") && !n.trim_start_matches("nvme").contains('p')
        })
        .collect();
    let key = |d: &String| -> Vec<u32> {
        name_of(d)
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|x| x.parse().ok())
            .collect()
    };
    disks.sort_by_key(key);
    disks.dedup();
    disks
}

/// `s` with every `ephemeralN[.P]` replaced by the device it names here;
/// the problems of the entries whose alias names no disk (those are left out).
pub fn resolve_aliases(s: &Storage, dev: &dyn BlockDevices) -> (Storage, Vec<String>) {
    let uses_alias = s
        .disks
        .iter()
        .map(|d| d.device.as_str())
        .chain(s.filesystems.iter().map(|f| f.device.as_str()))
        .chain(s.mounts.iter().map(|m| m.spec.as_str()))
        .any(|n| ephemeral_alias(n).is_some());
    let store = if uses_alias {
        dev.instance_store()
    } else {
        Vec::new()
    };
    let mut errs = Vec::new();
    let resolve = |name: &str, what: &str, errs: &mut Vec<String>| -> Option<String> {
        let Some((n, part)) = ephemeral_alias(name) else {
            return Some(name.to_string());
        };
        match store.get(n) {
            Some(disk) => Some(match part {
                Some(p) => partition_path(disk, p),
                None => disk.clone(),
            }),
            None => {
                errs.push(format!(
                    "{what} {name}: this machine has {} instance-store disk(s) (EC2 NVMe \
                     instance storage, Azure's resource disk); name the device instead",
                    store.len()
                ));
                None
            }
        }
    };
    let mut out = Storage::default();
    for d in &s.disks {
        if let Some(device) = resolve(&d.device, "disk_setup", &mut errs) {
            out.disks.push(DiskLayout {
                device,
                ..d.clone()
            });
        }
    }
    for f in &s.filesystems {
        if let Some(device) = resolve(&f.device, "fs_setup", &mut errs) {
            out.filesystems.push(FsSetup {
                device,
                ..f.clone()
            });
        }
    }
    for m in &s.mounts {
        if let Some(spec) = resolve(&m.spec, "mounts", &mut errs) {
            out.mounts.push(MountEntry { spec, ..m.clone() });
        }
    }
    (out, errs)
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Probe {
    pub fs_type: Option<String>,
    pub label: Option<String>,
    pub table: Option<String>,
}

/// Runs a tool of the image; `Err` names it, its arguments and its stderr.
pub(crate) fn run_tool<A: AsRef<std::ffi::OsStr>>(program: &str, args: &[A]) -> Result<(), String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let shown: Vec<String> = args
        .iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect();
    Err(format!(
        "{program} {} failed ({}): {}",
        shown.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

/// A device's partition path: `/dev/vdb` → `/dev/vdb1`, `/dev/nvme1n1` →
/// `/dev/nvme1n1p1` (a name ending in a digit takes `p`).
pub fn partition_path(disk: &str, n: u32) -> String {
    if disk.ends_with(|c: char| c.is_ascii_digit()) {
        format!("{disk}p{n}")
    } else {
        format!("{disk}{n}")
    }
}

/// Applies `s` in order: tables, file systems, mounts. Returns what was done
/// (for the journal) and the problems met; a problem stops only its own
/// entry, and mounts marked `nofail` that fail are notes, not errors.
pub fn apply(
    s: &Storage,
    dev: &dyn BlockDevices,
    root: &Path,
    run_dir: &Path,
) -> (Vec<String>, Vec<String>) {
    let mut done = Vec::new();
    let (resolved, mut errs) = resolve_aliases(s, dev);
    let s = &resolved;
    let mut tables_changed = false;
    for d in &s.disks {
        match partition(d, dev, run_dir) {
            Ok((said, changed)) => {
                tables_changed |= changed;
                done.push(said)
            }
            Err(e) => errs.push(format!("disk_setup {}: {e}", d.device)),
        }
    }
    if tables_changed {
        // The kernel reads the new table; udev makes the partition nodes.
        let _ = dev.run("udevadm", &["settle".into(), "--timeout=30".into()]);
    }
    let mut made = false;
    for f in &s.filesystems {
        match format(f, dev) {
            Ok(said) => {
                made |= said.contains(": made ");
                done.push(said)
            }
            Err(e) => errs.push(format!("fs_setup {}: {e}", f.device)),
        }
    }
    if made {
        // The new file systems' labels and UUIDs, for the mounts below.
        let _ = dev.run("udevadm", &["settle".into(), "--timeout=30".into()]);
    }
    for m in &s.mounts {
        match mount(m, dev, root) {
            Ok(said) => done.push(said),
            Err(e) if m.options.split(',').any(|o| o == "nofail") => done.push(format!(
                "mounts {} on {}: not mounted (nofail): {e}",
                m.spec, m.point
            )),
            Err(e) => errs.push(format!("mounts {} on {}: {e}", m.spec, m.point)),
        }
    }
    (done, errs)
}

/// Partitions one disk when it is blank (or `overwrite`); says what it did
/// and whether a table was written.
fn partition(
    d: &DiskLayout,
    dev: &dyn BlockDevices,
    run_dir: &Path,
) -> Result<(String, bool), String> {
    if d.partitions.is_empty() {
        return Ok((
            format!("disk_setup {}: layout false, left as it is", d.device),
            false,
        ));
    }
    if let Some(why) = dev.in_use(&d.device) {
        return Err(format!("in use ({why}): never partitioned"));
    }
    let probe = dev.probe(&d.device);
    if !d.overwrite {
        if let Some(t) = &probe.table {
            return Ok((
                format!("disk_setup {}: has a {t} partition table, kept", d.device),
                false,
            ));
        }
        if let Some(fs) = &probe.fs_type {
            return Ok((
                format!(
                    "disk_setup {}: holds {fs} on the whole disk, kept (overwrite: false)",
                    d.device
                ),
                false,
            ));
        }
    }
    let size = dev
        .size_bytes(&d.device)
        .ok_or_else(|| "no such disk".to_string())?;
    match d.table {
        TableType::Gpt => {
            let defs = run_dir
                .join("repart")
                .join(d.device.trim_start_matches("/dev/").replace('/', "-"));
            let _ = std::fs::remove_dir_all(&defs);
            std::fs::create_dir_all(&defs).map_err(|e| format!("{}: {e}", defs.display()))?;
            for (i, p) in d.partitions.iter().enumerate() {
                let bytes = part_bytes(size, p.percent);
                let kind = if p.kind == 0x82 {
                    "swap"
                } else {
                    "linux-generic"
                };
                let text = format!(
                    "[Partition]\nType={kind}\nSizeMinBytes={bytes}\nSizeMaxBytes={bytes}\n"
                );
                std::fs::write(defs.join(format!("{:02}-part.conf", i + 1)), text)
                    .map_err(|e| format!("{}: {e}", defs.display()))?;
            }
            let empty = if d.overwrite {
                "--empty=force"
            } else {
                "--empty=require"
            };
            dev.run(
                "systemd-repart",
                &[
                    "--dry-run=no".into(),
                    "--no-pager".into(),
                    empty.into(),
                    format!("--definitions={}", defs.display()),
                    d.device.clone(),
                ],
            )?;
        }
        TableType::Mbr => {
            let signature = disk_signature(&d.device, size);
            let mbr = mbr_table(size, &d.partitions, signature)?;
            // Old GPT headers would make tools read the disk as GPT still.
            if d.overwrite {
                dev.run(
                    "wipefs",
                    &["--all".into(), "--force".into(), d.device.clone()],
                )?;
            }
            dev.write_at(&d.device, 0, &mbr)?;
            dev.run("blockdev", &["--rereadpt".into(), d.device.clone()])?;
        }
    }
    let shares: Vec<String> = d
        .partitions
        .iter()
        .map(|p| format!("{}%", p.percent))
        .collect();
    Ok((
        format!(
            "disk_setup {}: {} table written, partitions {}",
            d.device,
            match d.table {
                TableType::Gpt => "GPT",
                TableType::Mbr => "MBR",
            },
            shares.join(" ")
        ),
        true,
    ))
}

const MIB: u64 = 1 << 20;

/// A partition's size: its share of the disk, whole MiB, less the first MiB
/// (alignment) and the GPT's backup at the end.
fn part_bytes(disk: u64, percent: u8) -> u64 {
    let usable = disk.saturating_sub(2 * MIB);
    (usable / 100 * percent as u64) / MIB * MIB
}

/// A stable, non-zero MBR disk signature from the device and its size (no
/// randomness: the same disk gets the same bytes).
fn disk_signature(device: &str, size: u64) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in device.bytes().chain(size.to_le_bytes()) {
        h = (h ^ b as u32).wrapping_mul(0x0100_0193);
    }
    h | 1
}

/// A DOS partition table: primary partitions at 1 MiB alignment, sizes by
/// share of the disk, CHS fields as "LBA only" (0xFE 0xFF 0xFF).
pub fn mbr_table(disk: u64, parts: &[PartitionSpec], signature: u32) -> Result<[u8; 512], String> {
    let mut mbr = [0u8; 512];
    mbr[440..444].copy_from_slice(&signature.to_le_bytes());
    let mut start = MIB / 512;
    let total = disk / 512;
    for (i, p) in parts.iter().enumerate() {
        let sectors = part_bytes(disk, p.percent) / 512;
        if sectors == 0 || start + sectors > total || start + sectors > u32::MAX as u64 {
            return Err(format!(
                "partition {} ({}%) does not fit an MBR on a {} MiB disk",
                i + 1,
                p.percent,
                disk / MIB
            ));
        }
        let e = &mut mbr[446 + 16 * i..446 + 16 * (i + 1)];
        e[0] = 0;
        e[1..4].copy_from_slice(&[0xFE, 0xFF, 0xFF]);
        e[4] = p.kind;
        e[5..8].copy_from_slice(&[0xFE, 0xFF, 0xFF]);
        e[8..12].copy_from_slice(&(start as u32).to_le_bytes());
        e[12..16].copy_from_slice(&(sectors as u32).to_le_bytes());
        start += sectors;
    }
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    Ok(mbr)
}

/// The device an `fs_setup` entry formats, or `Ok(None)` with why when what
/// it asks for is there already.
fn target(f: &FsSetup, dev: &dyn BlockDevices) -> Result<Result<String, String>, String> {
    let matches = |p: &Probe| {
        p.fs_type.as_deref() == Some(f.filesystem.as_str())
            && (f.label.is_none() || p.label == f.label)
    };
    let parts = dev.partitions(&f.device);
    let device = match &f.partition {
        PartitionChoice::None => f.device.clone(),
        PartitionChoice::Number(n) => {
            let p = partition_path(&f.device, *n);
            if !parts.contains(&p) {
                return Err(format!("{} has no partition {n}", f.device));
            }
            p
        }
        PartitionChoice::Any | PartitionChoice::Auto if parts.is_empty() => f.device.clone(),
        PartitionChoice::Any => parts[0].clone(),
        PartitionChoice::Auto => {
            if let Some(p) = parts.iter().find(|p| matches(&dev.probe(p))) {
                return Ok(Err(format!("{p} already has it")));
            }
            match parts.iter().find(|p| dev.probe(p).fs_type.is_none()) {
                Some(p) => p.clone(),
                None => {
                    return Err(
                        "every partition has a file system already (overwrite: false)".into(),
                    )
                }
            }
        }
    };
    Ok(Ok(device))
}

fn format(f: &FsSetup, dev: &dyn BlockDevices) -> Result<String, String> {
    let what = format!(
        "{}{}",
        f.filesystem,
        f.label
            .as_ref()
            .map(|l| format!(" labelled {l}"))
            .unwrap_or_default()
    );
    let device = match target(f, dev)? {
        Ok(d) => d,
        Err(kept) => return Ok(format!("fs_setup {}: {what}: {kept}, kept", f.device)),
    };
    let disk = &f.device;
    if let Some(why) = dev.in_use(&device).or_else(|| dev.in_use(disk)) {
        return Err(format!("{device} is in use ({why}): never formatted"));
    }
    let probe = dev.probe(&device);
    if probe.table.is_some() && device == *disk && !f.overwrite {
        return Ok(format!(
            "fs_setup {device}: has a partition table: name a partition (partition: 1) or say overwrite: true"
        ));
    }
    if let Some(fs) = &probe.fs_type {
        if !f.overwrite {
            let same = matches!(&probe, p if p.fs_type.as_deref() == Some(f.filesystem.as_str()));
            return Ok(format!(
                "fs_setup {device}: holds {fs}{} already, kept (overwrite: false){}",
                probe
                    .label
                    .as_ref()
                    .map(|l| format!(" labelled {l}"))
                    .unwrap_or_default(),
                if same { "" } else { ", not what was asked" }
            ));
        }
    }
    let mut args: Vec<String> = Vec::new();
    let program = if f.filesystem == "swap" {
        if let Some(l) = &f.label {
            args.extend(["-L".into(), l.clone()]);
        }
        "mkswap".to_string()
    } else {
        args.push("-F".into());
        if let Some(l) = &f.label {
            args.extend(["-L".into(), l.clone()]);
        }
        args.extend(f.extra_opts.iter().cloned());
        format!("mkfs.{}", f.filesystem)
    };
    if f.filesystem == "swap" {
        args.push("-f".into());
    }
    args.push(device.clone());
    dev.run(&program, &args)?;
    Ok(format!("fs_setup {device}: made {what}"))
}

fn mount(m: &MountEntry, dev: &dyn BlockDevices, root: &Path) -> Result<String, String> {
    if m.is_swap() {
        let r = dev.run("swapon", std::slice::from_ref(&m.spec));
        return match r {
            Ok(()) => Ok(format!("mounts {}: swap on", m.spec)),
            Err(e) if e.contains("Device or resource busy") => {
                Ok(format!("mounts {}: swap on already", m.spec))
            }
            Err(e) => Err(e),
        };
    }
    check_mount_point(&m.point)?;
    let point = resolve_point(root, &m.point);
    if let Some(src) = dev.mounted_at(&point) {
        return Ok(format!(
            "mounts {} on {}: mounted already ({src})",
            m.spec, m.point
        ));
    }
    std::fs::create_dir_all(&point).map_err(|e| format!("{}: {e}", point.display()))?;
    dev.run(
        "mount",
        &[
            "-t".into(),
            m.fstype.clone(),
            "-o".into(),
            m.options.clone(),
            m.spec.clone(),
            point.display().to_string(),
        ],
    )?;
    Ok(format!("mounts {} on {}: mounted", m.spec, m.point))
}

/// `/opt/aiware/...` is `/var/opt/aiware/...` on the node (the root's
/// `/opt/aiware` is a link there); everything under `root` (tests).
fn resolve_point(root: &Path, point: &str) -> PathBuf {
    let p = match point.strip_prefix("/opt/aiware") {
        Some(rest) => format!("/var/opt/aiware{rest}"),
        None => point.to_string(),
    };
    root.join(p.trim_start_matches('/'))
}

/// Whether any mount point is Docker's or containerd's data: those services
/// must be stopped while their folder is mounted over.
pub fn mounts_under_docker(s: &Storage) -> bool {
    s.mounts.iter().any(|m| {
        ["/var/lib/docker", "/var/lib/containerd"]
            .iter()
            .any(|d| m.point == *d || m.point.starts_with(&format!("{d}/")))
    })
}

/// The real block devices, through sysfs, /proc and util-linux.
pub struct SystemDevices;

fn name_of(dev: &str) -> &str {
    dev.trim_start_matches("/dev/")
}

impl BlockDevices for SystemDevices {
    fn in_use(&self, disk: &str) -> Option<String> {
        let name = name_of(disk);
        let sys = Path::new("/sys/class/block").join(name);
        if !sys.exists() {
            return None;
        }
        let mut names = vec![name.to_string()];
        names.extend(self.partitions(disk).iter().map(|p| name_of(p).to_string()));
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let swaps = std::fs::read_to_string("/proc/swaps").unwrap_or_default();
        for n in &names {
            let holders = Path::new("/sys/class/block").join(n).join("holders");
            if std::fs::read_dir(&holders).is_ok_and(|mut d| d.next().is_some()) {
                return Some(format!("/dev/{n} is held by device-mapper"));
            }
            let majmin = std::fs::read_to_string(Path::new("/sys/class/block").join(n).join("dev"))
                .unwrap_or_default();
            let majmin = majmin.trim();
            if !majmin.is_empty()
                && mounts
                    .lines()
                    .any(|l| l.split_whitespace().nth(2) == Some(majmin))
            {
                return Some(format!("/dev/{n} is mounted"));
            }
            if swaps
                .lines()
                .any(|l| l.split_whitespace().next() == Some(&format!("/dev/{n}")))
            {
                return Some(format!("/dev/{n} is swap"));
            }
        }
        None
    }

    fn partitions(&self, disk: &str) -> Vec<String> {
        let sys = Path::new("/sys/class/block").join(name_of(disk));
        let mut parts: Vec<(u32, String)> = std::fs::read_dir(&sys)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let n: u32 = std::fs::read_to_string(e.path().join("partition"))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()?;
                Some((n, format!("/dev/{}", e.file_name().to_string_lossy())))
            })
            .collect();
        parts.sort();
        parts.into_iter().map(|(_, p)| p).collect()
    }

    fn probe(&self, dev: &str) -> Probe {
        let out = std::process::Command::new("blkid")
            .args(["-p", "-o", "export", dev])
            .output();
        let mut p = Probe::default();
        if let Ok(o) = out {
            for line in String::from_utf8_lossy(&o.stdout).lines() {
                match line.split_once('=') {
                    Some(("TYPE", v)) => p.fs_type = Some(v.to_string()),
                    Some(("LABEL", v)) => p.label = Some(v.to_string()),
                    Some(("PTTYPE", v)) => p.table = Some(v.to_string()),
                    _ => {}
                }
            }
        }
        p
    }

    fn size_bytes(&self, disk: &str) -> Option<u64> {
        let s = std::fs::read_to_string(
            Path::new("/sys/class/block")
                .join(name_of(disk))
                .join("size"),
        )
        .ok()?;
        s.trim().parse::<u64>().ok().map(|sectors| sectors * 512)
    }

    fn mounted_at(&self, point: &Path) -> Option<String> {
        let real = std::fs::canonicalize(point).ok()?;
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        mounts.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let at = f.get(4)?;
            let src = f.iter().skip_while(|x| **x != "-").nth(2)?;
            (Path::new(at) == real).then(|| src.to_string())
        })
    }

    fn run(&self, program: &str, args: &[String]) -> Result<(), String> {
        run_tool(program, args)
    }

    fn instance_store(&self) -> Vec<String> {
        let canonical = |p: &Path| {
            std::fs::canonicalize(p)
                .ok()
                .map(|c| c.to_string_lossy().into_owned())
        };
        let by_id: Vec<(String, String)> = std::fs::read_dir("/dev/disk/by-id")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                Some((
                    e.file_name().to_string_lossy().into_owned(),
                    canonical(&e.path())?,
                ))
            })
            .collect();
        let mut disks = instance_store_disks(&by_id);
        disks.extend(
            AZURE_RESOURCE_DISK
                .iter()
                .find_map(|p| canonical(Path::new(p))),
        );
        disks
    }
    fn write_at(&self, dev: &str, offset: u64, data: &[u8]) -> Result<(), String> {
        use std::io::{Seek, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(dev)
            .map_err(|e| format!("{dev}: {e}"))?;
        f.seek(std::io::SeekFrom::Start(offset))
            .and_then(|_| f.write_all(data))
            .and_then(|_| f.sync_all())
            .map_err(|e| format!("{dev}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    fn yaml(s: &str) -> Value {
        serde_yaml::from_str(s).unwrap()
    }

    /// A TEST DOUBLE of the node's block devices: disks and partitions with
    /// what blkid would say, and a log of the commands the agent ran.
    #[derive(Default)]
    struct FakeDevices {
        probes: RefCell<BTreeMap<String, Probe>>,
        parts: RefCell<BTreeMap<String, Vec<String>>>,
        busy: Vec<String>,
        mounted: RefCell<BTreeMap<PathBuf, String>>,
        ran: RefCell<Vec<String>>,
        written: RefCell<Vec<(String, Vec<u8>)>>,
        store: Vec<String>,
    }

    impl BlockDevices for FakeDevices {
        fn instance_store(&self) -> Vec<String> {
            self.store.clone()
        }
        fn in_use(&self, disk: &str) -> Option<String> {
            self.busy
                .iter()
                .any(|b| b == disk)
                .then(|| format!("{disk} is mounted"))
        }
        fn partitions(&self, disk: &str) -> Vec<String> {
            self.parts.borrow().get(disk).cloned().unwrap_or_default()
        }
        fn probe(&self, dev: &str) -> Probe {
            self.probes.borrow().get(dev).cloned().unwrap_or_default()
        }
        fn size_bytes(&self, _: &str) -> Option<u64> {
            Some(1 << 30)
        }
        fn mounted_at(&self, point: &Path) -> Option<String> {
            self.mounted.borrow().get(point).cloned()
        }
        fn run(&self, program: &str, args: &[String]) -> Result<(), String> {
            let line = format!("{program} {}", args.join(" "));
            self.ran.borrow_mut().push(line);
            // What the real tools would leave behind.
            let last = args.last().cloned().unwrap_or_default();
            match program {
                "systemd-repart" => {
                    let n = 2;
                    self.probes.borrow_mut().insert(
                        last.clone(),
                        Probe {
                            table: Some("gpt".into()),
                            ..Default::default()
                        },
                    );
                    self.parts.borrow_mut().insert(
                        last.clone(),
                        (1..=n).map(|i| partition_path(&last, i)).collect(),
                    );
                }
                p if p.starts_with("mkfs.") || p == "mkswap" => {
                    let label = args.windows(2).find(|w| w[0] == "-L").map(|w| w[1].clone());
                    let fs = if p == "mkswap" {
                        "swap"
                    } else {
                        p.trim_start_matches("mkfs.")
                    };
                    self.probes.borrow_mut().insert(
                        last,
                        Probe {
                            fs_type: Some(fs.into()),
                            label,
                            table: None,
                        },
                    );
                }
                "mount" => {
                    self.mounted
                        .borrow_mut()
                        .insert(PathBuf::from(&last), args[args.len() - 2].clone());
                }
                _ => {}
            }
            Ok(())
        }
        fn write_at(&self, dev: &str, _: u64, data: &[u8]) -> Result<(), String> {
            self.written.borrow_mut().push((dev.into(), data.to_vec()));
            Ok(())
        }
    }

    const DOC: &str = "
disk_setup:
  /dev/vdb:
    table_type: gpt
    layout: [60, 40]
    overwrite: false
fs_setup:
  - label: aiware
    filesystem: ext4
    device: /dev/vdb
    partition: auto
  - label: docker
    filesystem: ext4
    device: /dev/vdb
    partition: 2
mounts:
  - [ LABEL=aiware, /opt/aiware, ext4, \"defaults,nofail\", \"0\", \"2\" ]
  - [ /dev/vdb2, /var/lib/docker ]
";

    fn storage(doc: &str) -> Storage {
        let v = yaml(doc);
        Storage {
            disks: v
                .get("disk_setup")
                .map(|d| parse_disk_setup(d, "t").unwrap())
                .unwrap_or_default(),
            filesystems: v
                .get("fs_setup")
                .map(|d| parse_fs_setup(d, "t").unwrap())
                .unwrap_or_default(),
            mounts: v
                .get("mounts")
                .map(|d| parse_mounts(d, v.get("mount_default_fields"), "t").unwrap())
                .unwrap_or_default(),
        }
    }

    #[test]
    fn ephemeral_aliases_name_the_instance_store_disks() {
        // What udev links on an EC2 instance with two NVMe instance-store
        // disks beside its EBS root (names written by us, in udev's forms).
        let by_id: Vec<(String, String)> = [
            ("nvme-Amazon_Elastic_Block_Store_vol0123", "/dev/nvme0n1"),
            (
                "nvme-Amazon_EC2_NVMe_Instance_Storage_AWS22B1",
                "/dev/nvme2n1",
            ),
            (
                "nvme-Amazon_EC2_NVMe_Instance_Storage_AWS22B1_1",
                "/dev/nvme2n1",
            ),
            (
                "nvme-Amazon_EC2_NVMe_Instance_Storage_AWS11A0",
                "/dev/nvme1n1",
            ),
            (
                "nvme-Amazon_EC2_NVMe_Instance_Storage_AWS11A0-part1",
                "/dev/nvme1n1p1",
            ),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let store = instance_store_disks(&by_id);
        assert_eq!(store, ["/dev/nvme1n1", "/dev/nvme2n1"]);
        let s = storage(
            "disk_setup:\n  ephemeral0: {table_type: gpt, layout: true}\n\
             fs_setup:\n  - {label: scratch, filesystem: ext4, device: ephemeral0.1}\n  \
             - {label: more, filesystem: ext4, device: ephemeral1}\n\
             mounts:\n  - [ ephemeral1, /mnt ]\n",
        );
        assert!(validate(&s).is_empty(), "{:?}", validate(&s));
        let dev = FakeDevices {
            store,
            ..FakeDevices::default()
        };
        let (r, errs) = resolve_aliases(&s, &dev);
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(r.disks[0].device, "/dev/nvme1n1");
        assert_eq!(r.filesystems[0].device, "/dev/nvme1n1p1");
        assert_eq!(r.filesystems[1].device, "/dev/nvme2n1");
        assert_eq!(r.mounts[0].spec, "/dev/nvme2n1");
        // A machine without them (QEMU, an EBS-only type): said, left out.
        let (r, errs) = resolve_aliases(&s, &FakeDevices::default());
        assert!(r.is_empty());
        assert_eq!(errs.len(), 4);
        assert!(errs[0].contains("has 0 instance-store disk(s)"), "{errs:?}");
    }

    #[test]
    fn the_guides_data_disk_is_partitioned_formatted_and_mounted_once() {
        let s = storage(DOC);
        assert!(validate(&s).is_empty(), "{:?}", validate(&s));
        let root = tempfile::tempdir().unwrap();
        let dev = FakeDevices::default();
        let (done, errs) = apply(&s, &dev, root.path(), root.path());
        assert!(errs.is_empty(), "{errs:?}");
        let ran = dev.ran.borrow().clone();
        assert!(
            ran[0].starts_with("systemd-repart --dry-run=no --no-pager --empty=require"),
            "{ran:?}"
        );
        let defs = std::fs::read_to_string(root.path().join("repart/vdb/01-part.conf")).unwrap();
        assert!(
            defs.contains("Type=linux-generic") && defs.contains("SizeMaxBytes="),
            "{defs}"
        );
        assert!(
            ran.contains(&"mkfs.ext4 -F -L aiware /dev/vdb1".to_string()),
            "{ran:?}"
        );
        assert!(
            ran.contains(&"mkfs.ext4 -F -L docker /dev/vdb2".to_string()),
            "{ran:?}"
        );
        let opt = root.path().join("var/opt/aiware");
        assert!(
            ran.contains(&format!(
                "mount -t ext4 -o defaults,nofail LABEL=aiware {}",
                opt.display()
            )),
            "{ran:?}"
        );
        assert!(
            ran.iter()
                .any(|l| l.starts_with("mount -t auto -o defaults,nofail /dev/vdb2 ")),
            "{ran:?}"
        );
        assert_eq!(done.len(), 5, "{done:?}");

        // The next boot: everything is there; nothing is partitioned or
        // formatted again, only mounted (the fake forgets its mounts).
        dev.mounted.borrow_mut().clear();
        dev.ran.borrow_mut().clear();
        let (done, errs) = apply(&s, &dev, root.path(), root.path());
        assert!(errs.is_empty(), "{errs:?}");
        let ran = dev.ran.borrow().clone();
        assert!(
            ran.iter().all(|l| l.starts_with("mount ")),
            "second boot ran {ran:?}"
        );
        assert!(
            done.iter().any(|d| d.contains("partition table, kept")),
            "{done:?}"
        );
        assert!(
            done.iter().any(|d| d.contains("already has it, kept")),
            "{done:?}"
        );
        // And mounted already: nothing at all.
        dev.ran.borrow_mut().clear();
        apply(&s, &dev, root.path(), root.path());
        assert!(dev.ran.borrow().is_empty(), "{:?}", dev.ran.borrow());
    }

    #[test]
    fn a_disk_in_use_or_with_data_is_never_touched() {
        let s = storage(DOC);
        let root = tempfile::tempdir().unwrap();
        let dev = FakeDevices {
            busy: vec!["/dev/vdb".into()],
            ..Default::default()
        };
        let (_, errs) = apply(&s, &dev, root.path(), root.path());
        assert!(
            errs.iter().any(|e| e.contains("never partitioned")),
            "{errs:?}"
        );
        assert!(dev
            .ran
            .borrow()
            .iter()
            .all(|l| !l.starts_with("systemd-repart") && !l.starts_with("mkfs")));

        // A whole-disk file system and overwrite: false: kept.
        let dev = FakeDevices::default();
        dev.probes.borrow_mut().insert(
            "/dev/vdb".into(),
            Probe {
                fs_type: Some("xfs".into()),
                ..Default::default()
            },
        );
        let (done, _) = apply(&s, &dev, root.path(), root.path());
        assert!(
            done.iter()
                .any(|d| d.contains("holds xfs on the whole disk, kept")),
            "{done:?}"
        );
        assert!(
            dev.ran
                .borrow()
                .iter()
                .all(|l| !l.starts_with("systemd-repart") && !l.starts_with("mkfs")),
            "{:?}",
            dev.ran.borrow()
        );
    }

    #[test]
    fn mbr_tables_are_cloud_inits_default_and_laid_out_by_share() {
        let s = storage("disk_setup:\n  vdc:\n    layout: [[50, 83], [50, \"82\"]]\n");
        assert_eq!(s.disks[0].device, "/dev/vdc");
        assert_eq!(s.disks[0].table, TableType::Mbr);
        assert_eq!(
            s.disks[0].partitions[1],
            PartitionSpec {
                percent: 50,
                kind: 0x82
            }
        );
        let t = mbr_table(1 << 30, &s.disks[0].partitions, 0x1234_5679).unwrap();
        assert_eq!(&t[510..], &[0x55, 0xAA]);
        assert_eq!(t[446 + 4], 0x83);
        assert_eq!(t[462 + 4], 0x82);
        let start = |i: usize| {
            u32::from_le_bytes(t[446 + 16 * i + 8..446 + 16 * i + 12].try_into().unwrap())
        };
        let len = |i: usize| {
            u32::from_le_bytes(t[446 + 16 * i + 12..446 + 16 * i + 16].try_into().unwrap())
        };
        assert_eq!(start(0), 2048);
        assert_eq!(start(1), start(0) + len(0));
        assert!((start(1) + len(1)) as u64 * 512 <= 1 << 30);
        assert_eq!(t[478..510], [0; 32], "two entries only");
        let root = tempfile::tempdir().unwrap();
        let dev = FakeDevices::default();
        let (_, errs) = apply(&s, &dev, root.path(), root.path());
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(dev.written.borrow()[0].0, "/dev/vdc");
        assert!(dev
            .ran
            .borrow()
            .contains(&"blockdev --rereadpt /dev/vdc".to_string()));
    }

    #[test]
    fn what_cannot_work_here_is_refused_with_the_way_that_does() {
        let bad = |doc: &str| -> String {
            let v = yaml(doc);
            let r = if let Some(d) = v.get("disk_setup") {
                parse_disk_setup(d, "t").map(|_| ())
            } else if let Some(f) = v.get("fs_setup") {
                parse_fs_setup(f, "t").map(|_| ())
            } else {
                let m = parse_mounts(v.get("mounts").unwrap(), None, "t").unwrap();
                let e = validate(&Storage {
                    mounts: m,
                    ..Default::default()
                });
                if e.is_empty() {
                    Ok(())
                } else {
                    Err(e.join("; "))
                }
            };
            r.unwrap_err()
        };
        assert!(bad("fs_setup:\n  - {device: /dev/vdb, filesystem: xfs}\n")
            .contains("ext4, ext3, ext2, swap"));
        assert!(bad(
            "fs_setup:\n  - {device: /dev/vdb, filesystem: ext4, cmd: mkfs -t %(filesystem)s}\n"
        )
        .contains("no commands"));
        assert!(
            bad("fs_setup:\n  - {device: ephemeral0.x, filesystem: ext4}\n")
                .contains("name the device")
        );
        assert!(
            bad("fs_setup:\n  - {device: swap, filesystem: swap}\n").contains("name the device")
        );
        assert!(bad(
            "fs_setup:\n  - {device: /dev/vdb, filesystem: ext4, extra_opts: [-E, /dev/vda]}\n"
        )
        .contains("no devices"));
        assert!(bad("disk_setup:\n  /dev/vdb: {layout: [60, 60]}\n").contains("120%"));
        assert!(
            bad("disk_setup:\n  /dev/vdb: {table_type: bsd, layout: true}\n")
                .contains("mbr or gpt")
        );
        assert!(bad("mounts:\n  - [/dev/vdb1, /etc/app]\n").contains("under /opt/aiware or /var"));
        assert!(bad("mounts:\n  - [/dev/vdb1, /var/lib/aiware]\n").contains("/var/lib/docker"));
        assert!(bad("mounts:\n  - [/dev/vdb1, /var/../etc]\n").contains("read-only"));
    }

    #[test]
    fn mount_defaults_short_names_swap_and_removals_follow_cloud_init() {
        let s = storage(
            "mount_default_fields: [None, None, ext4, \"defaults,noatime\", \"0\", \"2\"]\n\
             mounts:\n  - [ vdb1, /mnt ]\n  - [ /dev/vdb2, none, swap, sw, \"0\", \"0\" ]\n  - [ /dev/vdc1 ]\n",
        );
        assert_eq!(
            s.mounts.len(),
            2,
            "an entry without a mount point removes, here: nothing"
        );
        assert_eq!(s.mounts[0].spec, "/dev/vdb1");
        assert_eq!(
            (s.mounts[0].fstype.as_str(), s.mounts[0].options.as_str()),
            ("ext4", "defaults,noatime")
        );
        assert!(s.mounts[1].is_swap());
        assert!(validate(&s).is_empty());
        assert!(mounts_under_docker(&storage(DOC)));
        assert!(!mounts_under_docker(&s));
        assert_eq!(partition_path("/dev/nvme1n1", 2), "/dev/nvme1n1p2");
        assert_eq!(partition_path("/dev/xvdb", 1), "/dev/xvdb1");
    }
}
