//! Stage 6: the files users take away, converted from the disk stage's raw
//! disk, plus `manifest.json`. Written into a temporary folder that the
//! pipeline moves into place only when everything succeeded.

use crate::cache::{sha256_file, Slot};
use crate::manifest::{Manifest, ManifestFile, Package, UpdateInfo};
use crate::pipeline::BuildContext;
use crate::run::{run_cmd, Cmd};
use crate::stages;
use anyhow::{bail, Context, Result};
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
    /// vSphere OVA: OVF descriptor, stream-optimized vmdk, sha256 `.mf`.
    Ova,
}

impl Format {
    pub const ALL: [Format; 7] = [
        Format::Raw,
        Format::Qcow2,
        Format::Vmdk,
        Format::Vhd,
        Format::Gce,
        Format::RawZst,
        Format::Ova,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Vhd => "vhd",
            Format::Gce => "gce",
            Format::RawZst => "raw.zst",
            Format::Ova => "ova",
        }
    }

    pub fn needs_qemu_img(self) -> bool {
        matches!(
            self,
            Format::Qcow2 | Format::Vmdk | Format::Vhd | Format::Ova
        )
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

/// Writes every asked-for format from the disk slot alone (earlier stages'
/// artifacts may have been evicted from the cache).
pub fn write_all(ctx: &BuildContext, disk: &Slot, out: &Path) -> Result<Manifest> {
    let raw_src = disk.dir.join("disk.raw");
    let base = ctx.image_name();
    let info = stages::disk::info(disk)?;
    // Each format is its own conversion of the same raw disk into files of its
    // own, so they run side by side (the compressing ones are CPU-bound); the
    // OVA goes after, since it reuses the vmdk of the same build. The manifest
    // lists them in the order asked.
    let asked = &ctx.opts.formats;
    let (ova, others): (Vec<Format>, Vec<Format>) = asked.iter().partition(|f| **f == Format::Ova);
    let mut written = write_side_by_side(&others, &raw_src, &base, out)?;
    written.extend(write_side_by_side(&ova, &raw_src, &base, out)?);
    let mut files = Vec::new();
    for f in asked {
        if let Some(i) = written.iter().position(|(w, _)| w == f) {
            files.extend(written.remove(i).1);
        }
    }
    files.extend(write_update(ctx, disk, &info, out)?);
    if info.secure_boot.is_some() {
        files.extend(write_secure_boot(disk, out)?);
    }
    let packages = stages::rootfs::installed(disk)?
        .into_iter()
        .map(|(name, version)| Package { name, version })
        .collect();
    let info_json = stages::customize::image_info(ctx)?;
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
        root_erofs_size: info.root_size,
        partitions: info.partitions.clone(),
        layout: Some(info.layout.clone()),
        secure_boot: info.secure_boot.clone(),
        update: Some(UpdateInfo {
            url: ctx.profile.update_url.clone(),
            tries: ctx.profile.update_tries,
            keyring_fingerprint: crate::update::keyring(&ctx.profile)?.map(|(_, f)| f),
        }),
        files,
        packages,
        input_hash: disk.key.clone(),
        container_images: info_json.container_images,
        pulled_images: pulled_images(ctx),
        vendor_agent: info_json.vendor_agent,
    };
    std::fs::write(
        out.join("manifest.json"),
        serde_json::to_string_pretty(&manifest)? + "\n",
    )?;
    Ok(manifest)
}

/// Writes `formats` at once, a thread each; the first error wins.
fn write_side_by_side(
    formats: &[Format],
    raw: &Path,
    base: &str,
    out: &Path,
) -> Result<Vec<(Format, Vec<ManifestFile>)>> {
    std::thread::scope(|scope| {
        let jobs: Vec<_> = formats
            .iter()
            .map(|&f| {
                scope.spawn(move || -> Result<(Format, Vec<ManifestFile>)> {
                    let mut files = Vec::new();
                    for (name, format) in write_one(f, raw, base, out)? {
                        let path = out.join(&name);
                        files.push(ManifestFile {
                            size: std::fs::metadata(&path)?.len(),
                            sha256: sha256_file(&path)?,
                            name,
                            format,
                        });
                    }
                    Ok((f, files))
                })
            })
            .collect();
        jobs.into_iter()
            .map(|j| {
                j.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a format writer panicked")))
            })
            .collect()
    })
}

/// The manifest of `dir` when it was written from `disk` with the same
/// profile, version and formats, and every file it lists is still there at
/// its recorded size; `None` means the outputs must be written again.
/// The `pull` entries as this build names them. The disk holds each image
/// by its digest, so the same disk serves a reference through another
/// registry address; the manifest names the one this build was given.
fn pulled_images(ctx: &BuildContext) -> Vec<crate::manifest::PulledImage> {
    ctx.profile
        .container_images
        .iter()
        .filter_map(|c| {
            Some(crate::manifest::PulledImage {
                reference: c.pulled_from.clone()?,
                sha256: c.sha256.clone(),
            })
        })
        .collect()
}

pub fn up_to_date(ctx: &BuildContext, disk: &Slot, dir: &Path) -> Option<Manifest> {
    let text = std::fs::read_to_string(dir.join("manifest.json")).ok()?;
    let manifest: Manifest = serde_json::from_str(&text).ok()?;
    if manifest.input_hash != disk.key
        || manifest.profile != ctx.profile.name
        || manifest.version != ctx.opts.image_version
        || manifest.pulled_images != pulled_images(ctx)
    {
        return None;
    }
    let mut had: Vec<&str> = manifest
        .files
        .iter()
        .map(|f| f.format.as_str())
        .filter(|f| !f.starts_with("update") && *f != SECURE_BOOT_FORMAT)
        .collect();
    had.sort_unstable();
    had.dedup();
    let mut want: Vec<&str> = ctx
        .opts
        .formats
        .iter()
        .flat_map(|f| format_names(*f))
        .collect();
    want.sort_unstable();
    want.dedup();
    if had != want {
        return None;
    }
    let intact = manifest.files.iter().all(|f| {
        std::fs::metadata(dir.join(&f.name)).is_ok_and(|m| m.is_file() && m.len() == f.size)
    });
    intact.then_some(manifest)
}

/// The manifest's format of the Secure Boot files in `secureboot/`.
const SECURE_BOOT_FORMAT: &str = "secure-boot";

/// Copies the disk stage's enrollment files and certificate to
/// `OUT/secureboot/`: what a platform's firmware needs (db.der for GCE and
/// Azure, the .auth files for systemd-boot or by hand, the .esl list).
fn write_secure_boot(disk: &Slot, out: &Path) -> Result<Vec<ManifestFile>> {
    let from = disk.dir.join(crate::secure_boot::SLOT_DIR);
    let to = out.join(crate::secure_boot::SLOT_DIR);
    std::fs::create_dir_all(&to)?;
    let mut names: Vec<String> = std::fs::read_dir(&from)
        .with_context(|| format!("reading {}", from.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut files = Vec::new();
    for n in names {
        let dest = to.join(&n);
        std::fs::copy(from.join(&n), &dest)?;
        files.push(ManifestFile {
            name: format!("{}/{n}", crate::secure_boot::SLOT_DIR),
            format: SECURE_BOOT_FORMAT.into(),
            sha256: sha256_file(&dest)?,
            size: std::fs::metadata(&dest)?.len(),
        });
    }
    Ok(files)
}

/// The format names a format's files carry in the manifest.
fn format_names(f: Format) -> Vec<&'static str> {
    match f {
        Format::RawZst => vec!["raw.zst", "bmap"],
        other => vec![other.name()],
    }
}

/// The folder of update files in the output, what `aiwimg publish update`
/// adds to an update server.
pub const UPDATE_DIR: &str = "update";

/// Writes `update/`: root A's erofs and hash tree as the disk holds them (the
/// bytes the roothash covers), the UKI, and their SHA256SUMS, named as the
/// node's transfer files match them.
fn write_update(
    ctx: &BuildContext,
    disk: &Slot,
    info: &stages::disk::DiskInfo,
    out: &Path,
) -> Result<Vec<ManifestFile>> {
    let l = &info.layout;
    let dir = out.join(UPDATE_DIR);
    std::fs::create_dir_all(&dir)?;
    let names = crate::update::artifact_names(&ctx.image_name(), &l.root_uuid, &l.verity_uuid);
    let part = |label: &str| {
        info.partitions
            .iter()
            .find(|p| p.label == label)
            .ok_or_else(|| anyhow::anyhow!("the disk has no partition labelled {label:?}"))
    };
    let raw = disk.dir.join("disk.raw");
    stages::disk::copy_range(
        &raw,
        part(&l.root_label)?.offset,
        l.root_data_size,
        &dir.join(&names.root),
    )?;
    stages::disk::copy_range(
        &raw,
        part(&l.verity_label)?.offset,
        l.verity_data_size,
        &dir.join(&names.verity),
    )?;
    std::fs::copy(disk.dir.join(&info.uki), dir.join(&names.uki))?;
    let mut sums = std::collections::BTreeMap::new();
    let mut files = Vec::new();
    for (name, format) in [
        (&names.root, "update-root"),
        (&names.verity, "update-root-verity"),
        (&names.uki, "update-uki"),
    ] {
        let path = dir.join(name);
        let sha256 = sha256_file(&path)?;
        sums.insert(name.clone(), sha256.clone());
        files.push(ManifestFile {
            name: format!("{UPDATE_DIR}/{name}"),
            format: format.into(),
            sha256,
            size: std::fs::metadata(&path)?.len(),
        });
    }
    let sums_path = dir.join("SHA256SUMS");
    std::fs::write(&sums_path, crate::update::sha256sums(&sums))?;
    files.push(ManifestFile {
        name: format!("{UPDATE_DIR}/SHA256SUMS"),
        format: "update-sums".into(),
        sha256: sha256_file(&sums_path)?,
        size: std::fs::metadata(&sums_path)?.len(),
    });
    Ok(files)
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
        Format::Ova => {
            let file = name("ova");
            write_ova(raw, base, out, &file)?;
            Ok(vec![(file, "ova".into())])
        }
    }
}

/// Virtual hardware of the OVA's VM; users change it at deploy time.
pub const OVA_CPUS: u32 = 2;
pub const OVA_MEMORY_MIB: u64 = 4096;

/// Writes `file`, an OVA as VMware's ovftool makes one: a ustar tar whose
/// first member is the OVF descriptor, then the stream-optimized disk, then
/// the `.mf` manifest with a SHA256 line per file.
fn write_ova(raw: &Path, base: &str, out: &Path, file: &str) -> Result<()> {
    let staging = out.join(".ova");
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    std::fs::create_dir_all(&staging)?;
    let ovf = format!("{base}.ovf");
    let vmdk = format!("{base}-disk1.vmdk");
    let mf = format!("{base}.mf");
    // The OVA is written after the other formats (write_all), so a vmdk output
    // of this build is complete by now: reuse it rather than compress twice.
    let made_vmdk = out.join(format!("{base}.vmdk"));
    if made_vmdk.is_file() {
        std::fs::hard_link(&made_vmdk, staging.join(&vmdk))
            .or_else(|_| std::fs::copy(&made_vmdk, staging.join(&vmdk)).map(|_| ()))?;
    } else {
        run_cmd(
            "converting to stream-optimized vmdk for the ova",
            Cmd::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "vmdk", "-o"])
                .arg("subformat=streamOptimized,adapter_type=lsilogic")
                .arg(raw)
                .arg(staging.join(&vmdk)),
        )?;
    }
    let capacity = std::fs::metadata(raw)?.len();
    let vmdk_size = std::fs::metadata(staging.join(&vmdk))?.len();
    std::fs::write(
        staging.join(&ovf),
        ovf_descriptor(base, &vmdk, vmdk_size, capacity),
    )?;
    let mut manifest = String::new();
    for f in [&ovf, &vmdk] {
        manifest.push_str(&format!(
            "SHA256({f})= {}\n",
            sha256_file(&staging.join(f))?
        ));
    }
    std::fs::write(staging.join(&mf), manifest)?;
    run_cmd(
        "packing the ova",
        Cmd::new("tar")
            .args([
                "--format=ustar",
                "--owner=0",
                "--group=0",
                "--numeric-owner",
                "--mode=0644",
                "-cf",
            ])
            .arg(out.join(file))
            .arg("-C")
            .arg(&staging)
            .args([&ovf, &vmdk, &mf]),
    )?;
    std::fs::remove_dir_all(&staging)?;
    Ok(())
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The OVF 1.0 envelope of the OVA, in the shape ovftool exports: EFI
/// firmware, 64-bit Debian guest, 2 vCPU / 4 GiB, the disk on a SATA (AHCI)
/// controller — the initrd carries `ahci`, not the pvscsi or LSI drivers —
/// and one vmxnet3 NIC. The `user-data` property reaches the guest through the
/// OVF environment (guestinfo and CD-ROM transports).
pub fn ovf_descriptor(name: &str, vmdk: &str, vmdk_size: u64, capacity: u64) -> String {
    let name = xml_escape(name);
    let vmdk = xml_escape(vmdk);
    let (cpus, mem) = (OVA_CPUS, OVA_MEMORY_MIB);
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:cim="http://schemas.dmtf.org/wbem/wscim/1/common" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vmw="http://www.vmware.com/schema/ovf" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <References>
    <File ovf:href="{vmdk}" ovf:id="file1" ovf:size="{vmdk_size}"/>
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:capacity="{capacity}" ovf:capacityAllocationUnits="byte" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <NetworkSection>
    <Info>The list of logical networks</Info>
    <Network ovf:name="VM Network">
      <Description>The VM Network network</Description>
    </Network>
  </NetworkSection>
  <VirtualSystem ovf:id="{name}">
    <Info>A virtual machine</Info>
    <Name>{name}</Name>
    <OperatingSystemSection ovf:id="96" vmw:osType="debian12_64Guest">
      <Info>The kind of installed guest operating system</Info>
      <Description>Debian GNU/Linux (64-bit)</Description>
    </OperatingSystemSection>
    <ProductSection ovf:required="false">
      <Info>aiWARE Anywhere node</Info>
      <Product>aiWARE Anywhere node</Product>
      <FullVersion>{name}</FullVersion>
      <Property ovf:key="user-data" ovf:type="string" ovf:userConfigurable="true" ovf:value="">
        <Label>User data</Label>
        <Description>Launch data for aiw-agent (for example AIWARE_MODE=engine), base64 or plain</Description>
      </Property>
    </ProductSection>
    <VirtualHardwareSection ovf:transport="com.vmware.guestInfo iso">
      <Info>Virtual hardware requirements</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>{name}</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-17</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
        <rasd:Description>Number of Virtual CPUs</rasd:Description>
        <rasd:ElementName>{cpus} virtual CPU(s)</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>{cpus}</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:Description>Memory Size</rasd:Description>
        <rasd:ElementName>{mem}MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>{mem}</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Description>SATA Controller</rasd:Description>
        <rasd:ElementName>SATA controller 0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>vmware.sata.ahci</rasd:ResourceSubType>
        <rasd:ResourceType>20</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:ElementName>Hard disk 1</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>1</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>false</rasd:AutomaticAllocation>
        <rasd:ElementName>CD/DVD drive 1</rasd:ElementName>
        <rasd:InstanceID>5</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceSubType>vmware.cdrom.remotepassthrough</rasd:ResourceSubType>
        <rasd:ResourceType>15</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>7</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Connection>VM Network</rasd:Connection>
        <rasd:Description>VmxNet3 ethernet adapter on &quot;VM Network&quot;</rasd:Description>
        <rasd:ElementName>Network adapter 1</rasd:ElementName>
        <rasd:InstanceID>6</rasd:InstanceID>
        <rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType>
      </Item>
      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>
      <vmw:Config ovf:required="false" vmw:key="uefi.secureBoot.enabled" vmw:value="false"/>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"#
    )
}
