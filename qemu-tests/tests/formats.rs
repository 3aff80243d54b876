//! Every output format of `aiwimg build`, checked with its ecosystem's tools
//! (slow: builds the `engine` image with all formats; needs root, qemu-utils,
//! bmap-tools, tar, python3):
//!
//! - qcow2, vmdk: `qemu-img info` (format, stream-optimized, virtual size),
//!   `qemu-img check`, `qemu-img compare` with the raw disk;
//! - vhd: the footer says fixed, its size is a multiple of 1 MiB, its checksum
//!   holds; `qemu-img info`/`compare` agree;
//! - raw.zst + bmap: `bmaptool copy` into a file equals the raw disk;
//! - gce: `tar -tvzf` lists exactly `disk.raw` of the raw size;
//! - ova: `tar -tvf` lists the OVF first, then the vmdk, then the `.mf`;
//!   the `.mf` SHA256 lines hold; the OVF parses as XML and describes an EFI,
//!   x86_64, 2 vCPU / 4 GiB VM with the vmdk's capacity and a vmxnet3 NIC.
//!
//! Prints each file's size.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace() -> PathBuf {
    qemu_tests::test_images::workspace_root()
}

fn aiwimg() -> PathBuf {
    qemu_tests::test_images::aiwimg_bin().unwrap()
}

/// Runs a command; returns stdout, failing the test with all output if it fails.
fn run(cmd: &mut Command) -> String {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (is the tool installed? builder/setup-host.sh)"));
    assert!(
        o.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn qemu_info(path: &Path, fmt: &str) -> Value {
    let out = run(Command::new("qemu-img")
        .args(["info", "--output=json", "-f", fmt])
        .arg(path));
    serde_json::from_str(&out).unwrap()
}

fn qemu_compare(path: &Path, fmt: &str, raw: &Path) -> String {
    run(Command::new("qemu-img")
        .args(["compare", "-f", fmt, "-F", "raw"])
        .arg(path)
        .arg(raw))
    .lines()
    .map(str::trim)
    .collect::<Vec<_>>()
    .join(" ")
}

fn sha256_hex(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).unwrap();
    hex::encode(h.finalize())
}

/// `tar -tv` lines as (mode, size, name).
fn tar_listing(args: &[&str], file: &Path) -> Vec<(String, u64, String)> {
    let out = run(Command::new("tar").args(args).arg(file));
    out.lines()
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w[0].to_string(), w[2].parse().unwrap(), w[5..].join(" "))
        })
        .collect()
}

const OVF_CHECK: &str = r#"
import json, sys, xml.etree.ElementTree as ET
ns = {
  "ovf": "http://schemas.dmtf.org/ovf/envelope/1",
  "rasd": "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData",
  "vssd": "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData",
  "vmw": "http://www.vmware.com/schema/ovf",
}
O = "{%s}" % ns["ovf"]
V = "{%s}" % ns["vmw"]
root = ET.parse(sys.argv[1]).getroot()
assert root.tag == O + "Envelope", root.tag
files = [{"href": f.get(O + "href"), "id": f.get(O + "id"), "size": int(f.get(O + "size"))}
         for f in root.findall("ovf:References/ovf:File", ns)]
disks = [{"capacity": int(d.get(O + "capacity")), "units": d.get(O + "capacityAllocationUnits"),
          "fileRef": d.get(O + "fileRef"), "format": d.get(O + "format"), "diskId": d.get(O + "diskId")}
         for d in root.findall("ovf:DiskSection/ovf:Disk", ns)]
vss = root.findall("ovf:VirtualSystem", ns)
assert len(vss) == 1
vs = vss[0]
os_ = vs.find("ovf:OperatingSystemSection", ns)
hw = vs.find("ovf:VirtualHardwareSection", ns)
items = []
for it in hw.findall("ovf:Item", ns):
    d = {}
    for c in it:
        d[c.tag.split("}")[1]] = c.text
    items.append(d)
configs = {c.get(V + "key"): c.get(V + "value") for c in hw.findall("vmw:Config", ns)}
print(json.dumps({
  "files": files, "disks": disks, "name": vs.findtext("ovf:Name", namespaces=ns),
  "os_id": os_.get(O + "id"), "os_type": os_.get(V + "osType"),
  "system_type": hw.findtext("ovf:System/vssd:VirtualSystemType", namespaces=ns),
  "items": items, "configs": configs,
}))
"#;

fn check_ova(ova: &Path, raw_size: u64, raw: &Path, work: &Path) -> String {
    let listing = tar_listing(&["-tvf"], ova);
    let names: Vec<&str> = listing.iter().map(|(_, _, n)| n.as_str()).collect();
    assert_eq!(names.len(), 3, "{listing:?}");
    assert!(names[0].ends_with(".ovf"), "OVF must come first: {names:?}");
    assert!(names[1].ends_with(".vmdk"), "{names:?}");
    assert!(names[2].ends_with(".mf"), "{names:?}");
    // ovftool's tars are ustar; vSphere reads the descriptor from the first member.
    let head = std::fs::read(ova).unwrap();
    assert_eq!(&head[257..263], b"ustar\0", "not a POSIX ustar archive");

    let dir = work.join("ova");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    run(Command::new("tar").arg("-xf").arg(ova).arg("-C").arg(&dir));
    let mf = std::fs::read_to_string(dir.join(names[2])).unwrap();
    let mut sums = 0;
    for line in mf.lines() {
        let (lhs, sum) = line.split_once("= ").expect(line);
        let file = lhs
            .strip_prefix("SHA256(")
            .and_then(|s| s.strip_suffix(')'))
            .expect(line);
        assert_eq!(sha256_hex(&dir.join(file)), sum, "{file} in the .mf");
        sums += 1;
    }
    assert_eq!(sums, 2, "{mf}");

    let ovf = dir.join(names[0]);
    let parsed: Value = serde_json::from_str(&run(Command::new("python3")
        .args(["-c", OVF_CHECK])
        .arg(&ovf)))
    .unwrap();
    eprintln!("OVF parsed: {parsed}");
    let vmdk = dir.join(names[1]);
    let files = parsed["files"].as_array().unwrap();
    assert_eq!(files.len(), 1);
    assert_eq!(files[0]["href"], names[1]);
    assert_eq!(files[0]["size"], std::fs::metadata(&vmdk).unwrap().len());
    let disk = &parsed["disks"][0];
    assert_eq!(disk["fileRef"], files[0]["id"]);
    assert_eq!(disk["units"], "byte");
    assert_eq!(disk["capacity"], raw_size);
    assert!(disk["format"]
        .as_str()
        .unwrap()
        .ends_with("#streamOptimized"));
    assert_eq!(parsed["configs"]["firmware"], "efi", "{parsed}");
    assert!(parsed["os_type"].as_str().unwrap().ends_with("_64Guest"));
    assert!(parsed["system_type"].as_str().unwrap().starts_with("vmx-"));
    let items = parsed["items"].as_array().unwrap();
    let item = |rt: &str| -> Vec<&Value> {
        items
            .iter()
            .filter(|i| i["ResourceType"] == rt)
            .collect::<Vec<_>>()
    };
    assert_eq!(item("3")[0]["VirtualQuantity"], "2", "vCPUs");
    assert_eq!(item("4")[0]["VirtualQuantity"], "4096", "memory MiB");
    assert_eq!(item("4")[0]["AllocationUnits"], "byte * 2^20");
    let disks = item("17");
    assert_eq!(disks.len(), 1);
    let host = format!("ovf:/disk/{}", disk["diskId"].as_str().unwrap());
    assert_eq!(disks[0]["HostResource"], host.as_str());
    let parent = disks[0]["Parent"].as_str().unwrap();
    let controller = items
        .iter()
        .find(|i| i["InstanceID"] == parent)
        .expect("the disk's controller");
    assert!(
        ["6", "20"].contains(&controller["ResourceType"].as_str().unwrap()),
        "disk on a SCSI or SATA controller: {controller}"
    );
    let nics = item("10");
    assert_eq!(nics.len(), 1);
    assert_eq!(nics[0]["ResourceSubType"], "VmxNet3");

    let info = qemu_info(&vmdk, "vmdk");
    assert_eq!(
        info["format-specific"]["data"]["create-type"],
        "streamOptimized"
    );
    let same = qemu_compare(&vmdk, "vmdk", raw);
    format!(
        "tar -tvf: {} ; .mf sha256 ok; OVF XML: efi, {} vCPU, {} MiB, disk {} B on {} controller, {} NIC; vmdk: {same}",
        names.join(", "),
        item("3")[0]["VirtualQuantity"].as_str().unwrap(),
        item("4")[0]["VirtualQuantity"].as_str().unwrap(),
        raw_size,
        controller["ResourceSubType"].as_str().unwrap_or("?"),
        nics[0]["ResourceSubType"].as_str().unwrap()
    )
}

/// The VHD footer: cookie, fixed disk type, current size, checksum.
fn check_vhd_footer(vhd: &Path, raw_size: u64) -> (u64, String) {
    let data = std::fs::read(vhd).unwrap();
    let f = &data[data.len() - 512..];
    assert_eq!(&f[0..8], b"conectix", "VHD footer cookie");
    let be32 = |o: usize| u32::from_be_bytes(f[o..o + 4].try_into().unwrap());
    let be64 = |o: usize| u64::from_be_bytes(f[o..o + 8].try_into().unwrap());
    assert_eq!(be32(60), 2, "disk type 2 = fixed");
    let size = be64(48);
    assert_eq!(size, (data.len() - 512) as u64, "fixed: data then footer");
    assert_eq!(size % (1 << 20), 0, "virtual size {size} not a whole MiB");
    assert!(size >= raw_size && size - raw_size < 1 << 20);
    let sum: u32 = f
        .iter()
        .enumerate()
        .filter(|(i, _)| !(64..68).contains(i))
        .map(|(_, b)| *b as u32)
        .sum();
    assert_eq!(be32(64), !sum, "footer checksum");
    (
        size,
        format!(
            "footer: conectix, type 2 (fixed), size {size} = {} MiB, checksum ok",
            size >> 20
        ),
    )
}

#[test]
fn every_format_checked_with_its_tools() {
    assert!(
        unsafe { libc_geteuid() } == 0,
        "this test builds an image and needs root: run the README's test command as root"
    );
    let work = workspace().join("target/qemu-tests/formats");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let started = std::time::Instant::now();
    let o = Command::new(aiwimg())
        .arg("--project")
        .arg(workspace())
        .args(["build", "--profile", "engine", "--json", "--output-dir"])
        .arg(work.join("out"))
        .args(["--formats", "raw,qcow2,vmdk,vhd,gce,raw.zst,ova"])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "aiwimg build failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    eprintln!("build in {:.1}s", started.elapsed().as_secs_f64());
    let stdout = String::from_utf8_lossy(&o.stdout);
    let result: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let out = PathBuf::from(result["output"].as_str().unwrap());
    let files = result["manifest"]["files"].as_array().unwrap().clone();
    let path_of = |fmt: &str| -> PathBuf {
        let f = files
            .iter()
            .find(|f| f["format"] == fmt)
            .unwrap_or_else(|| panic!("no {fmt} in the manifest: {files:?}"));
        out.join(f["name"].as_str().unwrap())
    };
    let raw = path_of("raw");
    let raw_size = std::fs::metadata(&raw).unwrap().len();
    let mut report: Vec<(String, u64, String)> = Vec::new();
    let mut add = |fmt: &str, path: &Path, how: String| {
        report.push((
            format!("{fmt}: {}", path.file_name().unwrap().to_string_lossy()),
            std::fs::metadata(path).unwrap().len(),
            how,
        ));
    };
    add(
        "raw",
        &raw,
        format!("{raw_size} bytes, GPT disk (reference)"),
    );

    // qcow2
    let qcow2 = path_of("qcow2");
    let info = qemu_info(&qcow2, "qcow2");
    assert_eq!(info["virtual-size"], raw_size);
    run(Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&qcow2));
    let same = qemu_compare(&qcow2, "qcow2", &raw);
    add(
        "qcow2",
        &qcow2,
        format!(
            "qemu-img info: qcow2, virtual {raw_size}; qemu-img check: no errors; compare: {same}"
        ),
    );

    // vmdk
    let vmdk = path_of("vmdk");
    let info = qemu_info(&vmdk, "vmdk");
    assert_eq!(info["virtual-size"], raw_size);
    assert_eq!(
        info["format-specific"]["data"]["create-type"],
        "streamOptimized"
    );
    run(Command::new("qemu-img")
        .args(["check", "-f", "vmdk"])
        .arg(&vmdk));
    let same = qemu_compare(&vmdk, "vmdk", &raw);
    add(
        "vmdk",
        &vmdk,
        format!("qemu-img info: vmdk streamOptimized, virtual {raw_size}; qemu-img check: no errors; compare: {same}"),
    );

    // vhd
    let vhd = path_of("vhd");
    let (vsize, footer) = check_vhd_footer(&vhd, raw_size);
    let info = qemu_info(&vhd, "vpc");
    assert_eq!(info["virtual-size"], vsize, "{info}");
    let same = qemu_compare(&vhd, "vpc", &raw);
    add(
        "vhd",
        &vhd,
        format!("{footer}; qemu-img info: vpc, virtual {vsize}; compare: {same}"),
    );

    // raw.zst + bmap
    let zst = path_of("raw.zst");
    let bmap = path_of("bmap");
    let flashed = work.join("flashed.img");
    run(Command::new("bmaptool")
        .args(["copy", "--bmap"])
        .arg(&bmap)
        .arg(&zst)
        .arg(&flashed));
    // qemu-img compare rather than cmp: it skips the holes both files share
    // (cmp read 4.2 GiB of them, 74 s) and still compares every byte of data.
    let same = qemu_compare(&flashed, "raw", &raw);
    assert!(same.contains("identical"), "{same}");
    let bmap_text = std::fs::read_to_string(&bmap).unwrap();
    assert!(bmap_text.contains("<bmap version="), "{bmap_text}");
    std::fs::remove_file(&flashed).unwrap();
    add(
        "raw.zst",
        &zst,
        format!(
            "bmaptool copy --bmap (checksums verified) into a file; compare with the raw: {same}"
        ),
    );
    add("bmap", &bmap, "used by the bmaptool copy above".into());

    // gce
    let gce = path_of("gce");
    let listing = tar_listing(&["-tvzf"], &gce);
    assert_eq!(listing.len(), 1, "{listing:?}");
    assert_eq!(listing[0].2, "disk.raw");
    assert_eq!(listing[0].1, raw_size);
    add(
        "gce",
        &gce,
        format!("tar -tvzf: one member disk.raw, {raw_size} bytes"),
    );

    // ova
    let ova = path_of("ova");
    let how = check_ova(&ova, raw_size, &raw, &work);
    add("ova", &ova, how);

    // Every file's sha256 in manifest.json.
    run(Command::new(aiwimg())
        .args(["inspect", "--verify"])
        .arg(&out));

    eprintln!("\n{:<48} {:>14}  verified by", "file", "bytes");
    for (name, size, how) in &report {
        eprintln!(
            "{name:<48} {size:>14}  {how}  ({:.1} MiB)",
            *size as f64 / (1u64 << 20) as f64
        );
    }
    // Passed: seven formats of one image only take disk space from later tests.
    std::fs::remove_dir_all(&work).unwrap();
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
