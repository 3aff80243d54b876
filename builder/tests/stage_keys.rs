//! Each input changes the cache key of exactly the stages it feeds.
//! Keys are computed from a copy of the project; nothing is built.

use aiwimg::outputs::Format;
use aiwimg::pipeline::{BuildContext, BuildOptions, Plan};
use aiwimg::secure_boot::Enroll;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_symlink() {
            // Overlays bake links (e.g. to /run/aiware/...) that dangle here.
            std::os::unix::fs::symlink(std::fs::read_link(e.path()).unwrap(), &dest).unwrap();
        } else if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), &dest).unwrap();
        }
    }
}

/// A throwaway copy of the parts of the project that feed a build.
fn project_copy() -> tempfile::TempDir {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let d = tempfile::tempdir().unwrap();
    for sub in [
        "images",
        "overlays",
        "agent/src",
        "agent/units",
        "agent/templates",
    ] {
        if src.join(sub).is_dir() {
            copy_tree(&src.join(sub), &d.path().join(sub));
        }
    }
    for f in ["Cargo.lock", "agent/Cargo.toml"] {
        std::fs::copy(src.join(f), d.path().join(f)).unwrap();
    }
    d
}

fn opts(project: &Path, cache: &Path) -> BuildOptions {
    BuildOptions {
        project: project.to_path_buf(),
        profile: "engine".into(),
        output_dir: PathBuf::from("/nonexistent"),
        formats: vec![Format::Raw],
        cache_dir: cache.to_path_buf(),
        mirror: None,
        image_version: "1.0".into(),
        locked: false,
        rebuild: false,
        agent_bin: None,
        repo_mirrors: BTreeMap::new(),
        insecure_registries: Vec::new(),
        json: false,
        update_url: None,
        update_keyring: None,
        update_tries: None,
        secure_boot_key: None,
        secure_boot_cert: None,
        secure_boot_enroll: None,
    }
}

fn keys(o: BuildOptions) -> BTreeMap<&'static str, String> {
    let ctx = BuildContext::new(o).unwrap();
    let plan = Plan::new(&ctx).unwrap();
    plan.keys()
        .iter()
        .map(|(n, k)| (*n, k.to_string()))
        .collect()
}

fn changed(
    a: &BTreeMap<&'static str, String>,
    b: &BTreeMap<&'static str, String>,
) -> Vec<&'static str> {
    a.iter()
        .filter(|(n, k)| b[*n] != **k)
        .map(|(n, _)| *n)
        .collect()
}

fn append(path: &Path, text: &str) {
    let mut s = std::fs::read_to_string(path).unwrap();
    s.push_str(text);
    std::fs::write(path, s).unwrap();
}

#[test]
fn each_input_changes_exactly_the_stages_it_feeds() {
    let p = project_copy();
    let cache = tempfile::tempdir().unwrap();
    let o = || opts(p.path(), cache.path());
    let base = keys(o());
    assert_eq!(base, keys(o()), "keys are stable");

    // Overlay file: customize and what is made from it (disk).
    append(&p.path().join("overlays/base/etc/motd.tera"), "edited\n");
    let k = keys(o());
    assert_eq!(changed(&base, &k), ["customize", "disk"]);

    // Agent source: customize (where the binary goes in) and disk.
    let base = k;
    append(&p.path().join("agent/src/lib.rs"), "\n// edited\n");
    let k = keys(o());
    assert_eq!(changed(&base, &k), ["customize", "disk"]);

    // Package list: the root filesystem and everything made from it, not the tools.
    let base = k;
    append(
        &p.path().join("images/engine.toml"),
        "packages = [\"less\"]\n",
    );
    let k = keys(o());
    assert_eq!(
        changed(&base, &k),
        ["customize", "disk", "initrd", "rootfs"]
    );

    // A disk-only profile key: the ESP size.
    let base = k;
    append(&p.path().join("images/engine.toml"), "esp_size_mib = 256\n");
    let k = keys(o());
    assert_eq!(changed(&base, &k), ["disk"]);

    // The A/B slot size: only the disk.
    let base = k;
    append(
        &p.path().join("images/engine.toml"),
        "root_slot_mib = 3072\n",
    );
    let k = keys(o());
    assert_eq!(changed(&base, &k), ["disk"]);

    // The root's compression is how customize packs the erofs: customize on.
    let base = k;
    append(
        &p.path().join("images/engine.toml"),
        "root_compression = \"lz4\"\n",
    );
    let k = keys(o());
    assert_eq!(changed(&base, &k), ["customize", "disk"]);

    // The update URL, tries and keyring are files in the root: customize on.
    let base = k;
    append(
        &p.path().join("images/engine.toml"),
        "update_url = \"http://10.0.2.100:8080/aiware\"\n",
    );
    let k = keys(o());
    assert_eq!(changed(&base, &k), ["customize", "disk"]);
    let base = k;
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/test-repo-key.asc"),
        p.path().join("images/update.asc"),
    )
    .unwrap();
    append(
        &p.path().join("images/engine.toml"),
        "update_keyring = \"update.asc\"\n",
    );
    let k = keys(o());
    assert_eq!(changed(&base, &k), ["customize", "disk"]);
    // The key's content, not its name, is in the key.
    let base = k;
    append(&p.path().join("images/update.asc"), "\n");
    let k = keys(o());
    assert_eq!(changed(&base, &k), ["customize", "disk"]);
    // --update-url and --update-keyring override the profile's.
    let mut ou = o();
    ou.update_url = Some("http://10.0.2.100:8080/other".into());
    assert_eq!(changed(&k, &keys(ou)), ["customize", "disk"]);
    let other = p.path().join("other.asc");
    std::fs::copy(p.path().join("images/update.asc"), &other).unwrap();
    append(&other, "\n");
    let mut ok = o();
    ok.update_keyring = Some(other);
    assert_eq!(changed(&k, &keys(ok)), ["customize", "disk"]);
    let mut ot = o();
    ot.update_tries = Some(2);
    assert_eq!(changed(&k, &keys(ot)), ["customize", "disk"]);

    // Kernel command line: only the UKI, so only the disk.
    let base = k;
    append(
        &p.path().join("images/engine.toml"),
        "kernel_cmdline = [\"mitigations=auto\"]\n",
    );
    let k = keys(o());
    assert_eq!(changed(&base, &k), ["disk"]);

    // Mirror: every package that is downloaded, so every stage.
    let base = k;
    let mut om = o();
    om.mirror = Some("http://127.0.0.1:9/debian".into());
    let k = keys(om);
    assert_eq!(
        changed(&base, &k),
        ["customize", "disk", "initrd", "rootfs", "tools"]
    );

    // The mode table feeds customize (baked in) and, through packages, rootfs.
    let base = keys(o());
    let modes = p.path().join("images/modes.toml");
    let text = std::fs::read_to_string(&modes).unwrap();
    std::fs::write(
        &modes,
        text.replace(
            "packages = [\"redis-server\"]",
            "packages = [\"redis-server\", \"redis-tools\"]",
        ),
    )
    .unwrap();
    let k = keys(o());
    assert_eq!(
        changed(&base, &k),
        ["customize", "disk"],
        "engine has no redis: only the baked table changes"
    );

    // Image version: os-release and file names.
    let base = k;
    let mut ov = o();
    ov.image_version = "1.1".into();
    assert_eq!(changed(&base, &keys(ov)), ["customize", "disk"]);
}

#[test]
fn secure_boot_signing_feeds_only_the_disk_by_its_certificate_never_the_key_path() {
    let p = project_copy();
    let cache = tempfile::tempdir().unwrap();
    let o = || opts(p.path(), cache.path());
    let base = keys(o());
    let d = tempfile::tempdir().unwrap();
    let cert_pem =
        |b: &str| format!("-----BEGIN CERTIFICATE-----\n{b}\n-----END CERTIFICATE-----\n");
    std::fs::write(d.path().join("db.crt"), cert_pem("MIIBAA==")).unwrap();
    std::fs::write(d.path().join("other.crt"), cert_pem("MIIBAQ==")).unwrap();
    for k in ["db.key", "moved.key"] {
        std::fs::write(d.path().join(k), "KEY").unwrap();
    }
    let signed = |key: &str, cert: &str, enroll: Option<Enroll>| {
        let mut s = o();
        s.secure_boot_key = Some(d.path().join(key));
        s.secure_boot_cert = Some(d.path().join(cert));
        s.secure_boot_enroll = enroll;
        keys(s)
    };
    let a = signed("db.key", "db.crt", None);
    assert_eq!(changed(&base, &a), ["disk"]);
    // The key file's path is not an input; the certificate and the mode are.
    assert_eq!(
        changed(&a, &signed("moved.key", "db.crt", None)),
        Vec::<&str>::new()
    );
    assert_eq!(changed(&a, &signed("db.key", "other.crt", None)), ["disk"]);
    assert_eq!(
        changed(&a, &signed("db.key", "db.crt", Some(Enroll::IfSafe))),
        ["disk"]
    );

    // A profile that builds kernel modules (a `*-dkms` package) has DKMS
    // sign them with the db key in the rootfs stage: signing it, or another
    // certificate, redoes the image from the rootfs on.
    let gpu = |cert: Option<&str>| {
        let mut g = o();
        g.profile = "engine-gpu".into();
        if let Some(c) = cert {
            g.secure_boot_key = Some(d.path().join("db.key"));
            g.secure_boot_cert = Some(d.path().join(c));
        }
        keys(g)
    };
    let all_but_tools = ["customize", "disk", "initrd", "rootfs"];
    let gpu_signed = gpu(Some("db.crt"));
    assert_eq!(changed(&gpu(None), &gpu_signed), all_but_tools);
    assert_eq!(changed(&gpu_signed, &gpu(Some("other.crt"))), all_but_tools);

    // `secure_boot = true` refuses an unsigned build.
    append(&p.path().join("images/engine.toml"), "secure_boot = true\n");
    let e = BuildContext::new(o()).err().unwrap().to_string();
    assert!(e.contains("--secure-boot-key"), "{e}");
}

/// A docker-save archive of one tiny image; returns (bytes, config digest).
fn docker_save(salt: &str) -> (Vec<u8>, String) {
    use sha2::Digest;
    let mut b = tar::Builder::new(Vec::new());
    let config = format!(r#"{{"os":"linux","architecture":"amd64","salt":"{salt}"}}"#);
    let cid = hex::encode(sha2::Sha256::digest(config.as_bytes()));
    let manifest =
        format!(r#"[{{"Config":"{cid}.json","RepoTags":["aiware-controller:test"],"Layers":[]}}]"#);
    for (name, data) in [
        (format!("{cid}.json"), config.into_bytes()),
        ("manifest.json".to_string(), manifest.into_bytes()),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, data.as_slice()).unwrap();
    }
    (b.into_inner().unwrap(), format!("sha256:{cid}"))
}

#[test]
fn a_baked_archive_or_vendor_agent_feeds_customize_and_a_changed_one_is_never_missed() {
    use sha2::Digest;
    let p = project_copy();
    let cache = tempfile::tempdir().unwrap();
    let o = || opts(p.path(), cache.path());
    let base = keys(o());
    let (one, id1) = docker_save("one");
    let archive = p.path().join("images/controller-double.tar");
    std::fs::write(&archive, &one).unwrap();
    let sha1 = hex::encode(sha2::Sha256::digest(&one));
    let engine = p.path().join("images/engine.toml");
    let before = std::fs::read_to_string(&engine).unwrap();
    let pin = |sha: &str, id: &str| {
        std::fs::write(
            &engine,
            format!(
                "{before}\n[[container_images]]\narchive = \"controller-double.tar\"\nsha256 = \"{sha}\"\nimage_id = \"{id}\"\n"
            ),
        )
        .unwrap()
    };
    pin(&sha1, &id1);
    let k1 = keys(o());
    assert_eq!(changed(&base, &k1), ["customize", "disk"]);

    // Other bytes under the same pins: planning fails, no stale key.
    let (two, id2) = docker_save("two");
    std::fs::write(&archive, &two).unwrap();
    let ctx = BuildContext::new(o()).unwrap();
    let e = Plan::new(&ctx)
        .err()
        .expect("a changed archive is an error");
    assert!(format!("{e:#}").contains("the profile pins"), "{e:#}");
    // Re-pinned: a new key.
    pin(&hex::encode(sha2::Sha256::digest(&two)), &id2);
    let k2 = keys(o());
    assert_eq!(changed(&k1, &k2), ["customize", "disk"]);

    // The vendor's agent: its bytes are in the key too.
    let bin = p.path().join("images/aiware-agent");
    std::fs::write(&bin, b"vendor 1").unwrap();
    append(
        &engine,
        &format!(
            "vendor_agent = {{ binary = \"aiware-agent\", sha256 = \"{}\" }}\n",
            hex::encode(sha2::Sha256::digest(b"vendor 1"))
        ),
    );
    // (a top-level key after a table would belong to it: put it first)
    let text = std::fs::read_to_string(&engine).unwrap();
    let (head, vendor) = text.rsplit_once("vendor_agent").unwrap();
    std::fs::write(&engine, format!("vendor_agent{vendor}{head}")).unwrap();
    let k3 = keys(o());
    assert_eq!(changed(&k2, &k3), ["customize", "disk"]);
    std::fs::write(&bin, b"vendor 2").unwrap();
    let ctx = BuildContext::new(o()).unwrap();
    assert!(
        Plan::new(&ctx).is_err(),
        "a changed vendor binary is an error"
    );
}
