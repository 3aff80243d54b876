//! `aiw-agent check` on the fixture files: what it accepts, what it refuses and why.

use std::process::Command;

fn check(file: &str) -> (i32, String, String) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(env!("CARGO_BIN_EXE_aiw-agent"))
        .args([
            "check",
            dir.join("tests/fixtures").join(file).to_str().unwrap(),
            "--modes",
            dir.join("../images/modes.toml").to_str().unwrap(),
        ])
        .env("AIW_AGENT_ROOT", "/nonexistent-root")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// Values the fixtures use as secrets: none may be printed by `check`.
const SECRETS: &[&str] = &[
    "6f1c1f4e-5d1e-4a55-9a0c-3b8f2d7e9a11",
    "lic-0123456789",
    "s3cret-db-pass",
    "pa55-in-the-url",
];

#[test]
fn valid_files() {
    for (f, modes) in [
        ("engine-filled.env", "engine"),
        ("controller.cloud-config.yaml", "controller"),
        ("engine.toml", "engine"),
        ("multipart.mime", "registry"),
        ("nfs-db.gz.b64", "nfs"),
        ("nocloud/user-data", "engine"),
        ("nested.mime", "registry"),
        ("archive.yaml", "registry"),
        ("twice.mime", "registry"),
        ("no-edge-path.env", "engine"),
        ("data-disk.yaml", "engine"),
        ("data-disk-mbr.yaml", "engine"),
        ("users-time-trust.yaml", "engine"),
        ("runcmd-instead.yaml", "engine"),
        ("instance-store.yaml", "engine"),
    ] {
        let (code, out, err) = check(f);
        assert_eq!(code, 0, "{f}: {out}{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["valid"], true);
        assert!(
            v["settings"]["modes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m == modes),
            "{f}: {out}"
        );
        for secret in SECRETS {
            assert!(
                !out.contains(secret) && !err.contains(secret),
                "{f} prints a secret"
            );
        }
    }
}

#[test]
fn invalid_files_say_why() {
    for (f, why) in [
        ("guide-controller.sh", "never executed"),
        ("guide-engine.sh", "command substitution"),
        ("unknown-mode.env", "unknown mode \"ftp\""),
        ("engine-no-controller.yaml", "needs AIWARE_CONTROLLER"),
        ("write-etc.yaml", "read-only"),
        ("data-disk-mkfs-cmd.yaml", "runs no commands from user-data"),
        ("data-disk-etc.yaml", "mount under /opt/aiware or /var"),
        ("users-bad.yaml", "\"Admin\" is not a user name"),
        ("bad-url.env", "must start with http://"),
        ("controller-userinfo.env", "user name or password"),
        (
            "include.txt",
            "starts with #include: cloud-init would download",
        ),
        ("include-once.txt", "starts with #include-once"),
        ("jinja.yaml", "does not render templates"),
        ("boothook.txt", "#cloud-boothook: boot hooks are scripts"),
        (
            "part-handler.py",
            "#part-handler: part handlers are Python code",
        ),
        (
            "archive-boothook.yaml",
            "archive part 1 is a text/cloud-boothook",
        ),
    ] {
        let (code, out, err) = check(f);
        assert_eq!(code, 1, "{f}: {out}{err}");
        assert!(err.contains(why), "{f}: {err}");
        for secret in SECRETS {
            assert!(
                !out.contains(secret) && !err.contains(secret),
                "{f} prints a secret: {out}{err}"
            );
        }
        // Not mistaken for KEY=VALUE text.
        assert!(!err.contains("AIWARE_MODE is not set"), "{f}: {err}");
    }
}

#[test]
fn odd_input_gets_warnings_that_say_what_happens() {
    let warnings = |f: &str| -> String {
        let (code, out, err) = check(f);
        assert_eq!(code, 0, "{f}: {out}{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["settings"]["warnings"].to_string()
    };
    let w = warnings("twice.mime");
    assert!(
        w.contains("AIWARE_MODE is given twice")
            && w.contains("MIME part 1: line 1 sets")
            && w.contains("the later one (MIME part 2: cloud-config aiware.mode) wins"),
        "{w}"
    );
    let w = warnings("no-edge-path.env");
    assert!(
        w.contains("http://10.0.2.100:9000/host/register")
            && w.contains("AIWARE_CONTROLLER=http://10.0.2.100:9000/edge/v1"),
        "{w}"
    );
    let w = warnings("nested.mime");
    assert_eq!(w, "[]", "nested parts read as text: {w}");
    let w = warnings("runcmd-instead.yaml");
    for want in [
        "`runcmd` ignored: user-data is parsed, never executed",
        "`mkswap /dev/vdc` in bootcmd: use swap",
        "`mkfs.ext4 -L aiware /dev/nvme1n1` in runcmd: use disk_setup, fs_setup and mounts",
        "`mount /dev/nvme1n1 /opt/aiware` in runcmd: use disk_setup",
        "`useradd -m ops` in runcmd: use users",
        "`timedatectl set-timezone Europe/Berlin` in runcmd: use timezone",
        "`sudo update-ca-certificates` in runcmd: use ca_certs",
        "`packages` ignored: aiwimg images are immutable",
    ] {
        assert!(w.contains(want), "{want}: {w}");
    }
    assert!(!w.contains("echo hello"), "{w}");
    let (_, out, _) = check("users-time-trust.yaml");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let s = &v["settings"];
    assert_eq!(s["users"][0]["name"], "ops", "{out}");
    assert_eq!(
        s["users"][0]["groups"],
        serde_json::json!(["docker", "adm"])
    );
    assert_eq!(s["users"][1]["sudo"], true);
    assert_eq!(
        s["groups"],
        serde_json::json!([{"name": "night-shift", "members": ["ops", "audit"]}, {"name": "cloud-users"}])
    );
    assert_eq!(s["timezone"], "Europe/Berlin");
    assert_eq!(
        s["ntp"]["servers"],
        serde_json::json!(["10.0.0.2", "0.pool.corp.example", "1.pool.corp.example"])
    );
    assert_eq!(s["ca_certs"]["trusted"], 1);
    assert!(
        s["warnings"].to_string().contains("`default` adds no user"),
        "{out}"
    );
    let (_, out, _) = check("controller-userinfo.env");
    assert!(
        out.contains("https://<redacted>@controller.example"),
        "{out}"
    );
}

/// `aiw-agent status --json | head` (the reader gone early) ends the command
/// quietly, never with a panic; a status file it cannot read says so.
#[test]
fn status_into_a_closed_pipe_and_an_unreadable_status() {
    use std::io::Read;
    use std::process::Stdio;
    let root = std::env::temp_dir().join(format!("aiw-status-pipe-{}", std::process::id()));
    let file = root.join("run/aiware/status.json");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    let big = aiw_agent::status::Status {
        validation_errors: vec!["a long reason ".repeat(8); 4000],
        ..Default::default()
    };
    std::fs::write(&file, serde_json::to_vec(&big).unwrap()).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_aiw-agent"))
        .args(["status", "--json"])
        .env("AIW_AGENT_ROOT", &root)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 16];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    // stdout is closed here: the rest of ~400 KB meets a closed pipe.
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(first.starts_with(b"{"), "{first:?}");
    assert!(!err.contains("panicked"), "{err}");
    assert_ne!(out.status.code(), Some(101), "{err}");

    std::fs::write(&file, b"{\"agent_version\": 3}").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_aiw-agent"))
        .args(["status"])
        .env("AIW_AGENT_ROOT", &root)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        err.contains("is not a status this aiw-agent reads") && !err.contains("not found"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&root);
}
