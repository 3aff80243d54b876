//! Datasource tests against local test doubles (127.0.0.1 only) and fixtures.

mod common;
use aiw_agent::datasource::retry::Backoff;
use aiw_agent::datasource::*;
use aiw_agent::paths::Paths;
use common::{header, MetadataServiceDouble};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn fast(b: &mut Backoff) {
    b.first = Duration::from_millis(10);
    b.max = Duration::from_millis(40);
}

fn soon(s: u64) -> Instant {
    Instant::now() + Duration::from_secs(s)
}

#[test]
fn ec2_imdsv2_token_flow() {
    let d = MetadataServiceDouble::start(|m, p, h| match (m, p) {
        ("PUT", "/latest/api/token")
            if header(h, "x-aws-ec2-metadata-token-ttl-seconds") == Some("21600") =>
        {
            (200, b"TOK1".to_vec())
        }
        ("GET", _) if header(h, "x-aws-ec2-metadata-token") != Some("TOK1") => (401, vec![]),
        ("GET", "/latest/meta-data/instance-id") => (200, b"i-0abc".to_vec()),
        ("GET", "/latest/user-data") => (200, b"AIWARE_MODE=engine\n".to_vec()),
        _ => (404, vec![]),
    });
    let ld = Ec2Source::new(&d.url).fetch(soon(5)).unwrap();
    assert_eq!(ld.instance_id.as_deref(), Some("i-0abc"));
    assert_eq!(ld.user_data.as_deref(), Some(&b"AIWARE_MODE=engine\n"[..]));
}

#[test]
fn ec2_404_is_no_user_data() {
    let d = MetadataServiceDouble::start(|m, p, _| match (m, p) {
        ("PUT", _) => (200, b"T".to_vec()),
        ("GET", "/latest/meta-data/instance-id") => (200, b"i-1".to_vec()),
        _ => (404, vec![]),
    });
    let ld = Ec2Source::new(&d.url).fetch(soon(5)).unwrap();
    assert_eq!(ld.user_data, None);
    assert_eq!(ld.instance_id.as_deref(), Some("i-1"));
}

#[test]
fn ec2_401_refreshes_the_token() {
    let puts = Arc::new(AtomicU32::new(0));
    let p2 = puts.clone();
    let d = MetadataServiceDouble::start(move |m, p, h| match (m, p) {
        ("PUT", _) => {
            let n = p2.fetch_add(1, Ordering::SeqCst) + 1;
            (200, format!("TOK{n}").into_bytes())
        }
        // The first token has "expired": only TOK2 is accepted.
        ("GET", _) if header(h, "x-aws-ec2-metadata-token") != Some("TOK2") => (401, vec![]),
        ("GET", "/latest/user-data") => (200, b"AIWARE_MODE=db\n".to_vec()),
        ("GET", _) => (200, b"i-2".to_vec()),
        _ => (404, vec![]),
    });
    let ld = Ec2Source::new(&d.url).fetch(soon(5)).unwrap();
    assert_eq!(ld.user_data.as_deref(), Some(&b"AIWARE_MODE=db\n"[..]));
    assert_eq!(puts.load(Ordering::SeqCst), 2);
}

#[test]
fn ec2_falls_back_to_imdsv1_only_when_the_token_put_is_refused() {
    let d = MetadataServiceDouble::start(|m, p, h| match (m, p) {
        ("PUT", _) => (403, vec![]),
        ("GET", _) if header(h, "x-aws-ec2-metadata-token").is_some() => (400, vec![]),
        ("GET", "/latest/user-data") => (200, b"AIWARE_MODE=nfs\n".to_vec()),
        _ => (200, b"i-3".to_vec()),
    });
    let ld = Ec2Source::new(&d.url).fetch(soon(5)).unwrap();
    assert_eq!(ld.user_data.as_deref(), Some(&b"AIWARE_MODE=nfs\n"[..]));
}

#[test]
fn azure_retries_410_429_and_404_then_decodes_base64() {
    let n = Arc::new(AtomicU32::new(0));
    let n2 = n.clone();
    let d = MetadataServiceDouble::start(move |_, p, h| {
        if header(h, "metadata") != Some("true") {
            return (400, vec![]);
        }
        if p.starts_with("/metadata/instance/compute/vmId") {
            return (200, b"vm-42".to_vec());
        }
        // Counted: the userData requests only (not the instance document).
        if !p.starts_with("/metadata/instance/compute/userData") {
            return (404, vec![]);
        }
        match n2.fetch_add(1, Ordering::SeqCst) {
            0 => (410, vec![]),
            1 => (429, vec![]),
            2 => (404, vec![]),
            3 => (503, vec![]),
            _ => (200, b"QUlXQVJFX01PREU9ZW5naW5lCg==".to_vec()),
        }
    });
    let mut src = AzureSource::new(&d.url);
    fast(&mut src.client.backoff);
    let ld = src.fetch(soon(5)).unwrap();
    assert_eq!(ld.user_data.as_deref(), Some(&b"AIWARE_MODE=engine\n"[..]));
    assert_eq!(ld.instance_id.as_deref(), Some("vm-42"));
    assert_eq!(n.load(Ordering::SeqCst), 5);
}

#[test]
fn deadline_is_reached_and_named() {
    let d = MetadataServiceDouble::start(|_, _, _| (503, vec![]));
    let mut src = GceSource::new(&d.url);
    fast(&mut src.client.backoff);
    let t = Instant::now();
    let e = src
        .fetch(Instant::now() + Duration::from_millis(300))
        .unwrap_err()
        .to_string();
    assert!(t.elapsed() < Duration::from_secs(3));
    assert!(e.contains("deadline") && e.contains("gce"), "{e}");
}

#[test]
fn gce_sends_metadata_flavor() {
    let d = MetadataServiceDouble::start(|_, p, h| {
        if header(h, "metadata-flavor") != Some("Google") {
            return (403, vec![]);
        }
        match p {
            "/computeMetadata/v1/instance/id" => (200, b"123".to_vec()),
            "/computeMetadata/v1/instance/attributes/user-data" => {
                (200, b"#cloud-config\naiware: {mode: engine}\n".to_vec())
            }
            _ => (404, vec![]),
        }
    });
    let ld = GceSource::new(&d.url).fetch(soon(5)).unwrap();
    assert_eq!(ld.instance_id.as_deref(), Some("123"));
    assert!(ld.user_data.is_some());
}

fn fixtures() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[test]
fn nocloud_seed_made_by_cloud_localds_is_read_without_mounting() {
    let t = tempfile::tempdir().unwrap();
    let paths = Paths::new(t.path());
    std::fs::create_dir_all(paths.by_label()).unwrap();
    std::os::unix::fs::symlink(
        fixtures().join("nocloud/seed.iso"),
        paths.by_label().join("cidata"),
    )
    .unwrap();
    let ev = gather_evidence(&paths);
    let c = identify(&paths, &Endpoints::default(), &ev);
    assert_eq!(c[0].source.name(), "nocloud");
    assert!(c[0].reason.contains("cidata"));
    let ld = c[0].source.fetch(soon(1)).unwrap();
    assert_eq!(ld.instance_id.as_deref(), Some("iid-aiwimg-fixture-1"));
    let u = aiw_agent::userdata::parse(&ld.user_data.unwrap()).unwrap();
    assert_eq!(u.vars["AIWARE_MODE"], "engine");
}

#[test]
fn identify_by_dmi_cmdline_and_esp_never_probes_blindly() {
    let t = tempfile::tempdir().unwrap();
    let paths = Paths::new(t.path());
    // Nothing at all: no candidate, so no network probe.
    assert!(identify(&paths, &Endpoints::default(), &gather_evidence(&paths)).is_empty());
    let dmi = paths.dmi("x");
    std::fs::create_dir_all(dmi.parent().unwrap()).unwrap();
    std::fs::write(paths.dmi("sys_vendor"), "Amazon EC2\n").unwrap();
    std::fs::create_dir_all(paths.cmdline().parent().unwrap()).unwrap();
    std::fs::write(
        paths.cmdline(),
        "root=/dev/vda2 ro aiware.mode=engine aiware.controller=http://10.0.0.5:9000/edge/v1\n",
    )
    .unwrap();
    std::fs::create_dir_all(paths.esp_user_data().parent().unwrap()).unwrap();
    std::fs::write(paths.esp_user_data(), "AIWARE_MODE=db\n").unwrap();
    let c = identify(&paths, &Endpoints::default(), &gather_evidence(&paths));
    let names: Vec<&str> = c.iter().map(|c| c.source.name()).collect();
    assert_eq!(names, ["esp", "cmdline", "ec2"]);
    let ld = c[1].source.fetch(soon(1)).unwrap();
    let u = aiw_agent::userdata::parse(&ld.user_data.unwrap()).unwrap();
    assert_eq!(u.vars["AIWARE_CONTROLLER"], "http://10.0.0.5:9000/edge/v1");
    std::fs::write(paths.dmi("sys_vendor"), "").unwrap();
    std::fs::write(
        paths.dmi("chassis_asset_tag"),
        "7783-7084-3265-9085-8269-3286-77",
    )
    .unwrap();
    let c = identify(&paths, &Endpoints::default(), &gather_evidence(&paths));
    assert_eq!(c.last().unwrap().source.name(), "azure");
}

#[test]
fn vmware_guestinfo_gzip_base64_through_an_rpctool_double() {
    use std::io::Write;
    let t = tempfile::tempdir().unwrap();
    let mut gz = Vec::new();
    {
        let mut e = flate2::write::GzEncoder::new(&mut gz, flate2::Compression::default());
        e.write_all(b"AIWARE_MODE=registry\n").unwrap();
    }
    use base64::Engine;
    let b = base64::engine::general_purpose::STANDARD.encode(&gz);
    let tool = t.path().join("vmware-rpctool-double");
    std::fs::write(&tool, format!("#!/bin/sh\ncase \"$1\" in\n'info-get guestinfo.userdata') echo {b};;\n'info-get guestinfo.userdata.encoding') echo gzip+base64;;\n*) echo 'No value found'; exit 1;;\nesac\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
    let ld = VmwareSource::new(tool.to_str().unwrap())
        .fetch(soon(1))
        .unwrap();
    assert_eq!(
        ld.user_data.as_deref(),
        Some(&b"AIWARE_MODE=registry\n"[..])
    );
}
