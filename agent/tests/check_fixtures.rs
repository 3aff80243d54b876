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

#[test]
fn valid_files() {
    for (f, modes) in [
        ("engine-filled.env", "engine"),
        ("controller.cloud-config.yaml", "controller"),
        ("engine.toml", "engine"),
        ("multipart.mime", "registry"),
        ("nfs-db.gz.b64", "nfs"),
        ("nocloud/user-data", "engine"),
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
        for secret in [
            "6f1c1f4e-5d1e-4a55-9a0c-3b8f2d7e9a11",
            "lic-0123456789",
            "s3cret-db-pass",
        ] {
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
        ("bad-url.env", "must start with http://"),
    ] {
        let (code, out, err) = check(f);
        assert_eq!(code, 1, "{f}: {out}{err}");
        assert!(err.contains(why), "{f}: {err}");
    }
}
