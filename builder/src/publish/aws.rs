//! `aiwimg publish aws`: the raw disk straight into an EBS snapshot with the
//! EBS direct APIs (as coldsnap does: no S3 bucket, no VM Import), then an
//! AMI registered from it.
//!
//! 1. StartSnapshot (volume size in GiB, rounded up);
//! 2. PutSnapshotBlock for every 512 KiB block that is not all zeros, in
//!    parallel, each with its SHA256 (base64) in `x-amz-Checksum`;
//! 3. CompleteSnapshot with `x-amz-ChangedBlocksCount` and the LINEAR
//!    aggregate checksum; DescribeSnapshots until `completed`;
//! 4. RegisterImage: UEFI boot, ENA, x86_64, hvm, IMDSv2, root /dev/xvda.
//!
//! Progress is kept in `<raw file>.aws-upload.json` beside the image: the
//! snapshot id and the blocks already stored. A rerun continues the same
//! snapshot while EC2 says it is still pending, sending only missing blocks.

use super::credentials::{self, ProcessEnv};
use super::http::{xml_tag, CallError, Client, Endpoint};
use crate::manifest::Manifest;
use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// The only block size the EBS direct APIs take.
pub const BLOCK_SIZE: usize = 512 * 1024;
const EC2_API_VERSION: &str = "2016-11-15";
/// Minutes a started snapshot may stay pending before EBS cancels it: long
/// enough for an interrupted upload to be resumed the next day.
const SNAPSHOT_TIMEOUT_MIN: u32 = 1440;

pub struct PublishOptions {
    /// The folder `aiwimg build` wrote (or a file in it).
    pub image: PathBuf,
    pub region: Option<String>,
    pub name: Option<String>,
    pub endpoint_url: Option<String>,
    /// Parallel block uploads.
    pub jobs: usize,
    /// Register the AMI with NitroTPM (`TpmSupport=v2.0`).
    pub tpm: bool,
}

/// The raw disk to upload and what identifies it.
struct Image {
    path: PathBuf,
    size: u64,
    sha256: String,
    manifest: Manifest,
    /// A signed image's UEFI variable store (`secureboot/aws-uefi-data.b64`).
    uefi_data: Option<String>,
}

fn locate(image: &Path) -> Result<Image> {
    let dir = if image.is_dir() {
        image.to_path_buf()
    } else {
        image
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."))
    };
    let mpath = dir.join("manifest.json");
    let text = std::fs::read_to_string(&mpath).with_context(|| {
        format!(
            "reading {}: --image is the folder aiwimg build wrote",
            mpath.display()
        )
    })?;
    let manifest: Manifest =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", mpath.display()))?;
    let f = manifest.file("raw").ok_or_else(|| {
        anyhow!(
            "{} has no raw image: publish aws uploads the raw disk; build with --formats raw",
            dir.display()
        )
    })?;
    let path = dir.join(&f.name);
    let size = std::fs::metadata(&path)
        .with_context(|| format!("{}", path.display()))?
        .len();
    if size != f.size {
        bail!(
            "{} is {size} bytes but manifest.json says {}: the image changed since it was built",
            path.display(),
            f.size
        );
    }
    let uefi_data = match &manifest.secure_boot {
        Some(_) => Some(uefi_data(&dir, &manifest)?),
        None => None,
    };
    Ok(Image {
        path,
        size,
        sha256: f.sha256.clone(),
        manifest: manifest.clone(),
        uefi_data,
    })
}

/// The UEFI variable store of a signed image, checked against the manifest.
fn uefi_data(dir: &Path, manifest: &Manifest) -> Result<String> {
    use crate::secure_boot::{AWS_UEFI_DATA, SLOT_DIR};
    let name = format!("{SLOT_DIR}/{AWS_UEFI_DATA}");
    let f = manifest.files.iter().find(|f| f.name == name).ok_or_else(|| {
        anyhow!(
            "{} is signed for Secure Boot but its manifest lists no {name}: rebuild it with this aiwimg",
            dir.display()
        )
    })?;
    let path = dir.join(&name);
    if crate::cache::sha256_file(&path)? != f.sha256 {
        bail!("{} changed since the image was built", path.display());
    }
    Ok(std::fs::read_to_string(&path)?.trim().to_string())
}

/// RegisterImage's parameters (UEFI boot; with Secure Boot, the variable
/// store holding our PK, KEK and db; with `tpm`, a NitroTPM 2.0).
fn register_params(
    name: &str,
    description: &str,
    snapshot: &str,
    uefi_data: Option<&str>,
    tpm: bool,
) -> Vec<(&'static str, String)> {
    let mut p = vec![
        ("Name", name.to_string()),
        ("Description", description.to_string()),
        ("Architecture", "x86_64".into()),
        ("VirtualizationType", "hvm".into()),
        ("BootMode", "uefi".into()),
        ("EnaSupport", "true".into()),
        ("ImdsSupport", "v2.0".into()),
        ("RootDeviceName", "/dev/xvda".into()),
        ("BlockDeviceMapping.1.DeviceName", "/dev/xvda".into()),
        ("BlockDeviceMapping.1.Ebs.SnapshotId", snapshot.to_string()),
        ("BlockDeviceMapping.1.Ebs.VolumeType", "gp3".into()),
        (
            "BlockDeviceMapping.1.Ebs.DeleteOnTermination",
            "true".into(),
        ),
    ];
    if let Some(d) = uefi_data {
        p.push(("UefiData", d.to_string()));
    }
    if tpm {
        p.push(("TpmSupport", "v2.0".into()));
    }
    p
}

/// Upload progress, persisted after every stored block.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UploadState {
    pub image_sha256: String,
    pub region: String,
    pub endpoint: String,
    pub snapshot_id: String,
    pub volume_size_gib: u64,
    /// Block indexes EBS acknowledged.
    pub done: BTreeSet<u64>,
    /// CompleteSnapshot was accepted.
    pub completed: bool,
}

pub fn state_path(raw: &Path) -> PathBuf {
    let mut name = raw.file_name().unwrap_or_default().to_os_string();
    name.push(".aws-upload.json");
    raw.with_file_name(name)
}

fn save_state(path: &Path, st: &UploadState) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(st)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn ec2_params(action: &str, params: &[(&str, String)]) -> Vec<u8> {
    let mut all = vec![
        ("Action".to_string(), action.to_string()),
        ("Version".to_string(), EC2_API_VERSION.to_string()),
    ];
    all.extend(params.iter().map(|(k, v)| (k.to_string(), v.clone())));
    all.iter()
        .map(|(k, v)| {
            format!(
                "{}={}",
                super::sigv4::uri_encode(k, false),
                super::sigv4::uri_encode(v, false)
            )
        })
        .collect::<Vec<_>>()
        .join("&")
        .into_bytes()
}

struct Aws {
    client: Client,
    ebs: Endpoint,
    ec2: Endpoint,
}

impl Aws {
    fn ec2(&self, action: &str, params: &[(&str, String)]) -> Result<String, CallError> {
        let body = ec2_params(action, params);
        let headers = [(
            "Content-Type".to_string(),
            "application/x-www-form-urlencoded; charset=utf-8".to_string(),
        )];
        let r = self
            .client
            .call(&self.ec2, "POST", "/", &[], &headers, &body)?;
        Ok(r.text())
    }

    /// The snapshot's state in EC2 (`pending`, `completed`, `error`), None if
    /// EC2 does not know it.
    fn snapshot_state(&self, id: &str) -> Result<Option<(String, String)>> {
        match self.ec2("DescribeSnapshots", &[("SnapshotId.1", id.to_string())]) {
            Ok(xml) => Ok(xml_tag(&xml, "status")
                .map(|s| (s, xml_tag(&xml, "stateMessage").unwrap_or_default()))),
            Err(e) if e.code().is_some_and(|c| c.starts_with("InvalidSnapshot")) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn start_snapshot(&self, gib: u64, description: &str, name: &str) -> Result<String> {
        let token = client_token();
        let body = serde_json::json!({
            "VolumeSize": gib,
            "Description": description,
            "Timeout": SNAPSHOT_TIMEOUT_MIN,
            "ClientToken": token,
            "Tags": [{"Key": "Name", "Value": name}],
        })
        .to_string();
        let headers = [("Content-Type".to_string(), "application/json".to_string())];
        let r = self.client.call(
            &self.ebs,
            "POST",
            "/snapshots",
            &[],
            &headers,
            body.as_bytes(),
        )?;
        let v: serde_json::Value = serde_json::from_slice(&r.body)
            .with_context(|| format!("StartSnapshot answered {}", r.text()))?;
        if let Some(bs) = v["BlockSize"].as_u64() {
            if bs != BLOCK_SIZE as u64 {
                eprintln!(
                    "  note: StartSnapshot reports BlockSize {bs}; the EBS direct APIs use {BLOCK_SIZE}, which aiwimg sends"
                );
            }
        }
        v["SnapshotId"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("StartSnapshot answered without SnapshotId: {}", r.text()))
    }

    fn put_block(&self, snapshot: &str, index: u64, data: &[u8], sha: &[u8; 32]) -> Result<()> {
        let b64 = base64::engine::general_purpose::STANDARD.encode(sha);
        let headers = [
            (
                "Content-Type".to_string(),
                "application/octet-stream".to_string(),
            ),
            ("x-amz-Data-Length".to_string(), data.len().to_string()),
            ("x-amz-Checksum".to_string(), b64.clone()),
            ("x-amz-Checksum-Algorithm".to_string(), "SHA256".to_string()),
        ];
        let path = format!("/snapshots/{snapshot}/blocks/{index}");
        let r = self
            .client
            .call(&self.ebs, "PUT", &path, &[], &headers, data)?;
        if let Some(c) = r.header("x-amz-Checksum") {
            if c != b64 {
                bail!("block {index}: EBS stored checksum {c}, sent {b64}");
            }
        }
        Ok(())
    }

    fn complete(&self, snapshot: &str, changed: u64, aggregate: &str) -> Result<String> {
        let headers = [
            ("x-amz-ChangedBlocksCount".to_string(), changed.to_string()),
            ("x-amz-Checksum".to_string(), aggregate.to_string()),
            ("x-amz-Checksum-Algorithm".to_string(), "SHA256".to_string()),
            (
                "x-amz-Checksum-Aggregation-Method".to_string(),
                "LINEAR".to_string(),
            ),
        ];
        let path = format!("/snapshots/completion/{snapshot}");
        let r = self
            .client
            .call(&self.ebs, "POST", &path, &[], &headers, b"")?;
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
        Ok(v["Status"].as_str().unwrap_or("pending").to_string())
    }
}

fn client_token() -> String {
    let mut h = Sha256::new();
    h.update(format!(
        "{:?}{}",
        SystemTime::now().duration_since(SystemTime::UNIX_EPOCH),
        std::process::id()
    ));
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let mut b = [0u8; 16];
        if f.read_exact(&mut b).is_ok() {
            h.update(b);
        }
    }
    hex::encode(&h.finalize()[..16])
}

fn utc_stamp() -> String {
    let (stamp, _) = super::sigv4::amz_dates(SystemTime::now());
    stamp.replace(['T', 'Z'], "")
}

/// Reads the image block by block: (index, data, sha256) of the blocks that
/// are not all zeros. The last block is padded with zeros to 512 KiB.
fn for_each_data_block(
    path: &Path,
    mut f: impl FnMut(u64, Vec<u8>, [u8; 32]) -> Result<bool>,
) -> Result<()> {
    let mut file = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let mut index = 0u64;
    loop {
        let mut buf = vec![0u8; BLOCK_SIZE];
        let mut filled = 0;
        while filled < BLOCK_SIZE {
            let n = file.read(&mut buf[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            return Ok(());
        }
        if buf.iter().any(|b| *b != 0) {
            let sha: [u8; 32] = Sha256::digest(&buf).into();
            if !f(index, buf, sha)? {
                return Ok(());
            }
        }
        if filled < BLOCK_SIZE {
            return Ok(());
        }
        index += 1;
    }
}

/// Publishes the image; returns the AMI id.
pub fn publish(opts: &PublishOptions) -> Result<String> {
    let image = locate(&opts.image)?;
    let env = ProcessEnv;
    let region = credentials::region(opts.region.as_deref(), &env)?;
    let creds = credentials::load(&env)?;
    let endpoint_url = opts.endpoint_url.clone().or_else(|| {
        std::env::var("AWS_ENDPOINT_URL")
            .ok()
            .filter(|v| !v.is_empty())
    });
    let aws = Aws {
        client: Client::new(creds),
        ebs: Endpoint::new("ebs", &region, endpoint_url.as_deref())?,
        ec2: Endpoint::new("ec2", &region, endpoint_url.as_deref())?,
    };
    let m = &image.manifest;
    if let Some(sb) = &m.secure_boot {
        eprintln!(
            "Secure Boot: the AMI gets the image's UEFI variable store (PK, KEK and db: {}); \
             its instances boot with Secure Boot on",
            sb.db_subject
        );
    }
    let name = opts
        .name
        .clone()
        .unwrap_or_else(|| format!("{}-{}-{}", m.image_id, m.version, utc_stamp()));
    if name.len() < 3
        || name.len() > 128
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "()[] ./-'@_".contains(c))
    {
        bail!("AMI name {name:?}: 3 to 128 letters, digits, spaces and ()[]./-'@_");
    }
    let description = format!(
        "aiWARE Anywhere {} {} (roothash {})",
        m.profile,
        m.version,
        &m.roothash[..m.roothash.len().min(16)]
    );
    let gib = image.size.div_ceil(1 << 30).max(1);
    let spath = state_path(&image.path);
    let started = Instant::now();

    // A previous, interrupted upload of this very image to this place?
    let mut state: Option<UploadState> = std::fs::read(&spath)
        .ok()
        .and_then(|b| serde_json::from_slice::<UploadState>(&b).ok())
        .filter(|s| {
            s.image_sha256 == image.sha256 && s.region == region && s.endpoint == aws.ebs.base
        });
    if let Some(st) = &state {
        match aws.snapshot_state(&st.snapshot_id)? {
            None => {
                eprintln!(
                    "snapshot {} of an earlier upload is gone; starting a new one",
                    st.snapshot_id
                );
                state = None;
            }
            Some((s, msg)) if s == "error" => {
                eprintln!(
                    "snapshot {} of an earlier upload failed ({msg}); starting a new one",
                    st.snapshot_id
                );
                state = None;
            }
            // `completed` while we never completed it: EBS never does that
            // (moto reports every snapshot completed at once); the first
            // PutSnapshotBlock would tell.
            Some((s, _)) => eprintln!(
                "resuming snapshot {} ({s}): {} blocks already stored{}",
                st.snapshot_id,
                st.done.len(),
                if st.completed {
                    ", upload completed"
                } else {
                    ""
                }
            ),
        }
    }
    let mut state = match state {
        Some(s) => s,
        None => {
            let id = aws.start_snapshot(gib, &description, &name)?;
            eprintln!(
                "started snapshot {id} ({gib} GiB) for {}",
                image.path.display()
            );
            let s = UploadState {
                image_sha256: image.sha256.clone(),
                region: region.clone(),
                endpoint: aws.ebs.base.clone(),
                snapshot_id: id,
                volume_size_gib: gib,
                done: BTreeSet::new(),
                completed: false,
            };
            save_state(&spath, &s)?;
            s
        }
    };
    let snapshot = state.snapshot_id.clone();

    if !state.completed {
        let (checksums, sent) = upload_blocks(&aws, &image, &spath, &mut state, opts.jobs)?;
        let mut agg = Sha256::new();
        for (_, sha) in &checksums {
            agg.update(sha);
        }
        let aggregate = base64::engine::general_purpose::STANDARD.encode(agg.finalize());
        let status = aws.complete(&snapshot, checksums.len() as u64, &aggregate)?;
        state.completed = true;
        save_state(&spath, &state)?;
        eprintln!(
            "uploaded {sent} blocks ({} with data, {} were stored before) in {:.1}s, {} retries; CompleteSnapshot: {status}",
            checksums.len(),
            checksums.len() as u64 - sent,
            started.elapsed().as_secs_f64(),
            aws.client.retries.load(Ordering::Relaxed)
        );
    }

    // EBS finishes the snapshot in the background.
    let wait_until = Instant::now() + Duration::from_secs(4 * 3600);
    let mut delay = Duration::from_secs(2);
    loop {
        match aws.snapshot_state(&snapshot)? {
            Some((s, _)) if s == "completed" => break,
            Some((s, msg)) if s == "error" => {
                let _ = std::fs::remove_file(&spath);
                bail!("snapshot {snapshot} failed: {msg}")
            }
            Some(_) if Instant::now() < wait_until => {}
            other => bail!("snapshot {snapshot} did not complete: {other:?}"),
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_secs(15));
    }

    let params = register_params(
        &name,
        &description,
        &snapshot,
        image.uefi_data.as_deref(),
        opts.tpm,
    );
    let xml = aws.ec2("RegisterImage", &params)?;
    let ami = xml_tag(&xml, "imageId")
        .ok_or_else(|| anyhow!("RegisterImage answered without imageId: {xml}"))?;
    let _ = std::fs::remove_file(&spath);
    eprintln!(
        "registered {ami} ({name}) from {snapshot} in {region}, {:.1}s in all",
        started.elapsed().as_secs_f64()
    );
    Ok(ami)
}

/// A data block's index and SHA256.
type BlockSum = (u64, [u8; 32]);

/// Sends every data block not yet stored; returns the (index, sha256) of all
/// data blocks (for CompleteSnapshot) and how many this run sent.
fn upload_blocks(
    aws: &Aws,
    image: &Image,
    spath: &Path,
    state: &mut UploadState,
    jobs: usize,
) -> Result<(Vec<BlockSum>, u64)> {
    // Test hook: stop as if killed once this many blocks were stored.
    let stop_after: Option<u64> = std::env::var("AIWIMG_TEST_STOP_AFTER_BLOCKS")
        .ok()
        .and_then(|v| v.parse().ok());
    let total_blocks = image.size.div_ceil(BLOCK_SIZE as u64);
    let shared = Mutex::new(&mut *state);
    let failed: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let abort = AtomicBool::new(false);
    let sent = AtomicU64::new(0);
    let mut checksums = Vec::new();
    let snapshot = shared.lock().unwrap().snapshot_id.clone();
    let already: BTreeSet<u64> = shared.lock().unwrap().done.clone();
    let last_report = Mutex::new(Instant::now());
    let (tx, rx) = mpsc::sync_channel::<(u64, Vec<u8>, [u8; 32])>(jobs.max(1));
    let rx = Mutex::new(rx);
    std::thread::scope(|scope| -> Result<()> {
        for _ in 0..jobs.max(1) {
            scope.spawn(|| loop {
                let next = rx.lock().unwrap().recv();
                let Ok((index, data, sha)) = next else { return };
                if abort.load(Ordering::Relaxed) {
                    continue;
                }
                if let Err(e) = aws.put_block(&snapshot, index, &data, &sha) {
                    abort.store(true, Ordering::Relaxed);
                    failed
                        .lock()
                        .unwrap()
                        .get_or_insert(e.context(format!("PutSnapshotBlock {index}")));
                    continue;
                }
                let n = sent.fetch_add(1, Ordering::Relaxed) + 1;
                let mut st = shared.lock().unwrap();
                st.done.insert(index);
                if let Err(e) = save_state(spath, &st) {
                    abort.store(true, Ordering::Relaxed);
                    failed.lock().unwrap().get_or_insert(e);
                }
                if stop_after == Some(n) {
                    eprintln!("AIWIMG_TEST_STOP_AFTER_BLOCKS: stopping after {n} blocks");
                    std::process::exit(86);
                }
                let mut last = last_report.lock().unwrap();
                if last.elapsed() > Duration::from_secs(10) {
                    *last = Instant::now();
                    eprintln!(
                        "  {} blocks stored (block {index} of {total_blocks})",
                        st.done.len()
                    );
                }
            });
        }
        let r = for_each_data_block(&image.path, |index, data, sha| {
            checksums.push((index, sha));
            if !already.contains(&index) {
                tx.send((index, data, sha))
                    .map_err(|_| anyhow!("upload workers stopped"))?;
            }
            Ok(!abort.load(Ordering::Relaxed))
        });
        drop(tx);
        r
    })?;
    if let Some(e) = failed.into_inner().unwrap() {
        return Err(e.context(format!(
            "uploading {} to snapshot {snapshot}; progress is kept in {}: run the same command again to resume",
            image.path.display(),
            spath.display()
        )));
    }
    Ok((checksums, sent.into_inner()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_image_is_registered_with_its_uefi_variable_store() {
        let plain = register_params("n", "d", "snap-1", None, false);
        assert!(plain
            .iter()
            .all(|(k, _)| *k != "UefiData" && *k != "TpmSupport"));
        assert!(plain.contains(&("BootMode", "uefi".to_string())));
        let with_tpm = register_params("n", "d", "snap-1", None, true);
        assert!(with_tpm.contains(&("TpmSupport", "v2.0".to_string())));
        let signed = register_params("n", "d", "snap-1", Some("QU1aTlVFRkk="), false);
        assert_eq!(
            signed
                .iter()
                .find(|(k, _)| *k == "UefiData")
                .map(|(_, v)| v.as_str()),
            Some("QU1aTlVFRkk=")
        );
    }
}
