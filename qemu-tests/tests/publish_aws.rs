//! `aiwimg publish aws` end to end against moto in server mode (a test double
//! of EBS and EC2) on 127.0.0.1, through a fault-injecting proxy:
//!
//! - retries: the proxy answers 503 to the first requests and 503 or a 400
//!   ThrottlingException to every 4th block; the upload still completes and
//!   every failed block is sent again;
//! - the snapshot's blocks, read back with boto3 (ListSnapshotBlocks,
//!   GetSnapshotBlock), equal the image's non-zero 512 KiB blocks; the AMI is
//!   in DescribeImages and RegisterImage named that snapshot, UEFI, ENA, x86_64;
//! - resume: an upload stopped after K blocks (test hook) and run again
//!   continues the same snapshot and sends exactly the missing blocks.
//!
//! moto 5's RegisterImage ignores BlockDeviceMapping (its AMIs point at a
//! snapshot of their own), so "the AMI refers to the snapshot" is checked on
//! the RegisterImage request the proxy saw, and DescribeImages shows the AMI.
//!
//! Needs moto[server] (builder/setup-host.sh --tests installs it into
//! /var/cache/aiwimg/moto-venv); fails, never skips, without it. The image is
//! `engine` built with --formats raw (cached: ~30 s), or AIWIMG_PUBLISH_IMAGE
//! (a folder aiwimg build wrote).

use serde_json::Value;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BLOCK: usize = 512 * 1024;

fn workspace() -> PathBuf {
    qemu_tests::test_images::workspace_root()
}

fn aiwimg() -> PathBuf {
    qemu_tests::test_images::aiwimg_bin().unwrap()
}

/// The image folder to publish: built once per test binary.
fn image_dir() -> PathBuf {
    static DIR: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut d = DIR.lock().unwrap();
    if let Some(p) = &*d {
        return p.clone();
    }
    let p = if let Some(p) = std::env::var_os("AIWIMG_PUBLISH_IMAGE") {
        PathBuf::from(p)
    } else {
        assert!(
            unsafe { libc_geteuid() } == 0,
            "building the image needs root (or set AIWIMG_PUBLISH_IMAGE to a built image folder)"
        );
        let out = workspace().join("target/qemu-tests/publish-aws/out");
        let o = Command::new(aiwimg())
            .arg("--project")
            .arg(workspace())
            .args([
                "build",
                "--profile",
                "engine",
                "--formats",
                "raw",
                "--output-dir",
            ])
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "aiwimg build failed:\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        out.join("engine")
    };
    *d = Some(p.clone());
    p
}

/// A copy of the image folder for one test (the state file lives beside the image).
fn image_copy(name: &str) -> (PathBuf, PathBuf) {
    let src = image_dir();
    let dir = workspace().join("target/qemu-tests/publish-aws").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("manifest.json")).unwrap()).unwrap();
    let raw = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["format"] == "raw")
        .expect("a raw image")["name"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::copy(src.join("manifest.json"), dir.join("manifest.json")).unwrap();
    let st = Command::new("cp")
        .args(["--reflink=auto", "--sparse=always"])
        .arg(src.join(&raw))
        .arg(dir.join(&raw))
        .status()
        .unwrap();
    assert!(st.success());
    (dir.clone(), dir.join(raw))
}

/// The non-zero 512 KiB blocks of the image (the last one zero-padded).
fn data_blocks(raw: &Path) -> BTreeSet<u64> {
    let mut f = std::fs::File::open(raw).unwrap();
    let mut out = BTreeSet::new();
    let mut i = 0;
    loop {
        let mut buf = vec![0u8; BLOCK];
        let mut n = 0;
        while n < BLOCK {
            let r = f.read(&mut buf[n..]).unwrap();
            if r == 0 {
                break;
            }
            n += r;
        }
        if n == 0 {
            break;
        }
        if buf.iter().any(|b| *b != 0) {
            out.insert(i);
        }
        if n < BLOCK {
            break;
        }
        i += 1;
    }
    out
}

fn moto_server() -> PathBuf {
    if let Some(p) = std::env::var_os("AIWIMG_MOTO_SERVER") {
        return PathBuf::from(p);
    }
    let venv = PathBuf::from("/var/cache/aiwimg/moto-venv/bin/moto_server");
    if venv.is_file() {
        return venv;
    }
    if let Some(p) = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("moto_server"))
            .find(|p| p.is_file())
    }) {
        return p;
    }
    panic!(
        "moto is not installed: this test needs moto[server] (a test double of EBS and EC2). \
         Run builder/setup-host.sh --tests (installs it into /var/cache/aiwimg/moto-venv), \
         or point AIWIMG_MOTO_SERVER at a moto_server binary"
    );
}

struct Moto {
    child: Child,
    port: u16,
    python: PathBuf,
}

impl Moto {
    fn start(log: &Path) -> Moto {
        let bin = moto_server();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto did not listen on {port}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        // boto3 comes with moto: the python beside moto_server, else python3.
        let beside = bin.with_file_name("python3");
        let python = if beside.is_file() {
            beside
        } else {
            PathBuf::from("python3")
        };
        Moto {
            child,
            port,
            python,
        }
    }

    /// Reads the snapshot back with boto3 (an AWS client other than ours)
    /// and compares each block with the image; describes the AMI.
    fn read_back(&self, snapshot: &str, ami: &str, raw: &Path) -> Value {
        let o = Command::new(&self.python)
            .args(["-c", READ_BACK])
            .arg(format!("http://127.0.0.1:{}", self.port))
            .arg(snapshot)
            .arg(ami)
            .arg(raw)
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "boto3 read-back failed:\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).unwrap()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const READ_BACK: &str = r#"
import base64, hashlib, json, sys, boto3
url, snap, ami, raw = sys.argv[1:5]
kw = dict(endpoint_url=url, region_name="us-east-1")
ebs = boto3.client("ebs", **kw)
ec2 = boto3.client("ec2", **kw)
blocks, token = [], None
while True:
    args = dict(SnapshotId=snap)
    if token: args["NextToken"] = token
    r = ebs.list_snapshot_blocks(**args)
    blocks += r["Blocks"]
    token = r.get("NextToken")
    if not token: break
mismatch, checksum_bad = [], []
with open(raw, "rb") as f:
    for b in blocks:
        g = ebs.get_snapshot_block(SnapshotId=snap, BlockIndex=b["BlockIndex"], BlockToken=b["BlockToken"])
        data = g["BlockData"].read()
        f.seek(b["BlockIndex"] * 524288)
        want = f.read(524288).ljust(524288, b"\0")
        if data != want: mismatch.append(b["BlockIndex"])
        if g.get("Checksum") != base64.b64encode(hashlib.sha256(data).digest()).decode():
            checksum_bad.append(b["BlockIndex"])
img = ec2.describe_images(ImageIds=[ami])["Images"]
snaps = ec2.describe_snapshots(SnapshotIds=[snap])["Snapshots"]
print(json.dumps({
  "indexes": sorted(b["BlockIndex"] for b in blocks),
  "mismatch": mismatch, "checksum_bad": checksum_bad,
  "image": img[0] if img else None,
  "snapshot": snaps[0] if snaps else None,
}, default=str))
"#;

#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    status: u16,
    injected: bool,
    /// The form body of EC2 calls.
    form: String,
}

/// A fault-injecting HTTP proxy in front of moto: one request per connection.
struct Proxy {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
}

#[derive(Clone, Copy)]
struct Faults {
    /// Answer 503 to this many first requests.
    first: usize,
    /// Then fail every n-th PutSnapshotBlock (503 and 400 Throttling alternately).
    every_nth_put: usize,
}

impl Proxy {
    fn start(upstream: u16, faults: Faults) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let counters = Arc::new(Mutex::new((0usize, 0usize))); // requests, puts
        let s = seen.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (s, c) = (s.clone(), counters.clone());
                std::thread::spawn(move || {
                    let _ = handle(conn, upstream, faults, &s, &c);
                });
            }
        });
        Proxy { port, seen }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn take(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

fn handle(
    mut conn: TcpStream,
    upstream: u16,
    faults: Faults,
    seen: &Mutex<Vec<Seen>>,
    counters: &Mutex<(usize, usize)>,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    let head_end = loop {
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_string();
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let mut len = 0usize;
    let mut headers = Vec::new();
    for l in lines.filter(|l| !l.is_empty()) {
        let (k, v) = l.split_once(':').unwrap_or((l, ""));
        if k.eq_ignore_ascii_case("content-length") {
            len = v.trim().parse().unwrap_or(0);
        }
        if !k.eq_ignore_ascii_case("connection") {
            headers.push(l.to_string());
        }
    }
    while buf.len() < head_end + len {
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = &buf[head_end..];
    let is_put = method == "PUT" && path.contains("/blocks/");
    let inject = {
        let mut c = counters.lock().unwrap();
        c.0 += 1;
        if is_put {
            c.1 += 1;
        }
        if c.0 <= faults.first {
            Some(503)
        } else if is_put && faults.every_nth_put > 0 && c.1.is_multiple_of(faults.every_nth_put) {
            Some(if (c.1 / faults.every_nth_put).is_multiple_of(2) {
                400
            } else {
                503
            })
        } else {
            None
        }
    };
    let form = if path == "/" {
        String::from_utf8_lossy(body).into_owned()
    } else {
        String::new()
    };
    let status;
    if let Some(code) = inject {
        let (reason, etype, msg) = if code == 503 {
            (
                "Service Unavailable",
                "ServiceUnavailableException",
                "injected by the test proxy",
            )
        } else {
            (
                "Bad Request",
                "ThrottlingException",
                "Rate exceeded (injected by the test proxy)",
            )
        };
        let body = format!("{{\"Message\":\"{msg}\"}}");
        write!(
            conn,
            "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nx-amzn-ErrorType: {etype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        status = code;
    } else {
        let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
        let mut req = format!("{request_line}\r\n");
        for h in &headers {
            req.push_str(h);
            req.push_str("\r\n");
        }
        req.push_str("Connection: close\r\n\r\n");
        up.write_all(req.as_bytes())?;
        up.write_all(body)?;
        let mut resp = Vec::new();
        up.read_to_end(&mut resp)?;
        status = String::from_utf8_lossy(&resp[..resp.len().min(16)])
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        conn.write_all(&resp)?;
    }
    conn.flush()?;
    seen.lock().unwrap().push(Seen {
        method,
        path,
        status,
        injected: inject.is_some(),
        form,
    });
    Ok(())
}

/// Runs `aiwimg publish aws`; returns (exit code, stdout, stderr).
fn publish(
    dir: &Path,
    endpoint: &str,
    extra: &[(&str, &str)],
    args: &[&str],
) -> (i32, String, String) {
    let home = dir.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let mut cmd = Command::new(aiwimg());
    cmd.args(["publish", "aws", "--image"])
        .arg(dir)
        .args(["--region", "us-east-1", "--endpoint-url", endpoint])
        .args(args)
        // Credentials from the environment; no profile of the host's user.
        .env("HOME", &home)
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_ENDPOINT_URL")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_SESSION_TOKEN", "testing-session")
        .env("AIWIMG_AWS_RETRY_BASE_MS", "20");
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let started = Instant::now();
    let o = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    eprintln!(
        "publish aws ({:.1}s, {}):\n{}",
        started.elapsed().as_secs_f64(),
        o.status,
        stderr
            .lines()
            .filter(|l| !l.contains("retrying"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).trim().to_string(),
        stderr,
    )
}

fn put_indexes(seen: &[Seen], ok_only: bool) -> Vec<u64> {
    seen.iter()
        .filter(|s| s.method == "PUT" && s.path.contains("/blocks/"))
        .filter(|s| !ok_only || (!s.injected && s.status < 300))
        .map(|s| s.path.rsplit('/').next().unwrap().parse().unwrap())
        .collect()
}

fn snapshot_of(seen: &[Seen]) -> String {
    let ids: BTreeSet<String> = seen
        .iter()
        .filter(|s| s.path.starts_with("/snapshots/") && s.path.contains("/blocks/"))
        .map(|s| s.path.split('/').nth(2).unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 1, "blocks went to one snapshot: {ids:?}");
    ids.into_iter().next().unwrap()
}

fn check_read_back(moto: &Moto, snapshot: &str, ami: &str, raw: &Path) -> Value {
    let want = data_blocks(raw);
    let r = moto.read_back(snapshot, ami, raw);
    let got: BTreeSet<u64> = r["indexes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(
        got, want,
        "the snapshot holds exactly the image's data blocks"
    );
    assert_eq!(r["mismatch"], serde_json::json!([]), "blocks that differ");
    assert_eq!(r["checksum_bad"], serde_json::json!([]), "stored checksums");
    assert_eq!(r["image"]["ImageId"], ami, "{r}");
    eprintln!(
        "read back {} blocks of {snapshot} with boto3: all equal to the image; DescribeImages {ami}: name {}, state {}, BlockDeviceMappings {} (moto's own)",
        got.len(),
        r["image"]["Name"],
        r["image"]["State"],
        r["image"]["BlockDeviceMappings"]
    );
    r
}

#[test]
fn publish_retries_and_reads_back() {
    let (dir, raw) = image_copy("retries");
    let moto = Moto::start(&dir.join("moto.log"));
    let proxy = Proxy::start(
        moto.port,
        Faults {
            first: 3,
            every_nth_put: 6,
        },
    );
    let (code, ami, stderr) = publish(
        &dir,
        &proxy.url(),
        &[],
        &["--name", "aiwimg-test-engine", "--jobs", "4", "--tpm"],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(ami.starts_with("ami-"), "stdout is the AMI id: {ami:?}");
    let seen = proxy.take();
    let injected: Vec<&Seen> = seen.iter().filter(|s| s.injected).collect();
    assert!(injected.len() >= 4, "faults injected: {}", injected.len());
    assert!(stderr.contains("retrying"), "{stderr}");
    // Every block that failed was stored later.
    let failed_puts: BTreeSet<u64> = put_indexes(
        &injected.iter().map(|s| (*s).clone()).collect::<Vec<_>>(),
        false,
    )
    .into_iter()
    .collect();
    let ok_puts: BTreeSet<u64> = put_indexes(&seen, true).into_iter().collect();
    assert!(!failed_puts.is_empty());
    assert!(failed_puts.is_subset(&ok_puts), "{failed_puts:?}");
    let snapshot = snapshot_of(&seen);

    // RegisterImage named the snapshot, with UEFI, ENA and x86_64, and
    // (--tpm) a NitroTPM.
    let register = seen
        .iter()
        .find(|s| s.form.contains("Action=RegisterImage") && !s.injected && s.status == 200)
        .expect("a RegisterImage call");
    for want in [
        format!("BlockDeviceMapping.1.Ebs.SnapshotId={snapshot}"),
        "BlockDeviceMapping.1.DeviceName=%2Fdev%2Fxvda".into(),
        "RootDeviceName=%2Fdev%2Fxvda".into(),
        "BootMode=uefi".into(),
        "EnaSupport=true".into(),
        "Architecture=x86_64".into(),
        "VirtualizationType=hvm".into(),
        "Name=aiwimg-test-engine".into(),
        "TpmSupport=v2.0".into(),
    ] {
        assert!(
            register.form.contains(&want),
            "{want} not in {}",
            register.form
        );
    }
    // CompleteSnapshot came after the last stored block.
    let complete = seen
        .iter()
        .rposition(|s| s.path == format!("/snapshots/completion/{snapshot}") && s.status < 300)
        .expect("CompleteSnapshot");
    let last_put = seen
        .iter()
        .rposition(|s| s.method == "PUT" && s.status < 300)
        .unwrap();
    assert!(complete > last_put);

    let r = check_read_back(&moto, &snapshot, &ami, &raw);
    assert_eq!(r["image"]["Name"], "aiwimg-test-engine");
    assert!(!raw
        .with_file_name(format!(
            "{}.aws-upload.json",
            raw.file_name().unwrap().to_string_lossy()
        ))
        .exists());
    eprintln!(
        "retries: {} injected faults ({} on blocks), {} requests in all, {} blocks stored",
        injected.len(),
        failed_puts.len(),
        seen.len(),
        ok_puts.len()
    );
}

#[test]
fn interrupted_upload_resumes_the_same_snapshot() {
    let (dir, raw) = image_copy("resume");
    let moto = Moto::start(&dir.join("moto.log"));
    let proxy = Proxy::start(
        moto.port,
        Faults {
            first: 0,
            every_nth_put: 0,
        },
    );
    let k = 25;
    let (code, _, stderr) = publish(
        &dir,
        &proxy.url(),
        &[("AIWIMG_TEST_STOP_AFTER_BLOCKS", "25")],
        &["--jobs", "1"],
    );
    assert_eq!(code, 86, "the test hook stops the upload: {stderr}");
    let first = proxy.take();
    let state_path = raw.with_file_name(format!(
        "{}.aws-upload.json",
        raw.file_name().unwrap().to_string_lossy()
    ));
    let state: Value = serde_json::from_slice(&std::fs::read(&state_path).unwrap()).unwrap();
    let snapshot = snapshot_of(&first);
    assert_eq!(state["snapshot_id"], snapshot.as_str());
    assert_eq!(state["done"].as_array().unwrap().len(), k);
    let sent_first: BTreeSet<u64> = put_indexes(&first, true).into_iter().collect();
    assert_eq!(sent_first.len(), k);
    assert!(first
        .iter()
        .all(|s| !s.path.starts_with("/snapshots/completion")));

    let (code, ami, stderr) = publish(&dir, &proxy.url(), &[], &["--jobs", "4"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains(&format!("resuming snapshot {snapshot}")),
        "{stderr}"
    );
    let second = proxy.take();
    assert!(
        !second
            .iter()
            .any(|s| s.method == "POST" && s.path == "/snapshots"),
        "the rerun started a new snapshot"
    );
    assert_eq!(snapshot_of(&second), snapshot);
    let sent_second = put_indexes(&second, true);
    let sent_second_set: BTreeSet<u64> = sent_second.iter().copied().collect();
    assert_eq!(
        sent_second.len(),
        sent_second_set.len(),
        "a block sent twice"
    );
    assert!(
        sent_first.is_disjoint(&sent_second_set),
        "blocks stored before were sent again: {:?}",
        sent_first
            .intersection(&sent_second_set)
            .collect::<Vec<_>>()
    );
    let all: BTreeSet<u64> = sent_first.union(&sent_second_set).copied().collect();
    assert_eq!(all, data_blocks(&raw));
    check_read_back(&moto, &snapshot, &ami, &raw);
    eprintln!(
        "resume: first run stored {k} blocks and stopped; the rerun continued {snapshot} with the other {} blocks, none twice",
        sent_second_set.len()
    );
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
