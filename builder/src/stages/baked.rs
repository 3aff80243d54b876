//! What a profile bakes beside the packages (part of the customize stage):
//!
//! - `[[container_images]]`: docker-save or OCI archive files, each checked
//!   against its pinned sha256 and image config digest, copied to
//!   `/usr/lib/aiware/images/<sha256>.tar` and listed in image.json (aiw-agent
//!   loads them into Docker at first boot) and in manifest.json;
//! - `vendor_agent`: the vendor's `aiware-agent` binary, checked against its
//!   sha256, at `/usr/local/bin/aiware-agent` with a real `aiware-agent.service`
//!   (aiw-agent's own `Alias=aiware-agent.service` is dropped from the image).
//!
//! The cache key of the customize stage holds the sha256 of each file as read
//! at planning time (never only the pinned value), and the copies made into
//! the tree are hashed again, so a file changed between the two is an error,
//! never a stale image.

use crate::cache::{sha256_file, KeyBuilder};
use crate::profile::{ContainerImage, VendorAgent};
use aiw_agent::modes::{BakedImage, BAKED_IMAGES_DIR, VENDOR_AGENT_PATH};
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// The vendor agent's unit: started by aiw-agent once the node is configured
/// (no [Install]: never started on its own, so never with stale settings).
/// The vendor's install script runs `aiware-agent agent`.
pub const VENDOR_AGENT_UNIT: &str = "\
[Unit]
Description=aiWARE agent (the vendor's binary, baked by aiwimg; started by aiw-agent)
Documentation=file:///usr/share/doc/aiwimg/README.md
After=aiw-agent.service docker.service network-online.target
Wants=docker.service network-online.target
# Written by aiw-agent from the launch settings before it starts this unit.
ConditionPathExists=/run/aiware/aiware-agent.env

[Service]
EnvironmentFile=/run/aiware/aiware-agent.env
ExecStart=/usr/local/bin/aiware-agent agent
Restart=always
RestartSec=5
RestartSteps=10
RestartMaxDelaySec=300
StartLimitIntervalSec=0
";

/// The line of `agent/units/aiw-agent.service` that makes it aiware-agent.service too.
pub const ALIAS_LINE: &str = "Alias=aiware-agent.service";

/// An archive as read: its digests, format and tags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedArchive {
    /// Of the file as hashed ([`check_archive`]), or as pinned ([`describe`]).
    pub sha256: String,
    pub image_id: String,
    pub format: String,
    pub tags: Vec<String>,
}

/// Members of a tar, by name, read in one pass (data of others is skipped by seeking).
fn read_members(path: &Path, wanted: &[String]) -> Result<HashMap<String, Vec<u8>>> {
    use std::io::Read;
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut ar = tar::Archive::new(f);
    let mut out = HashMap::new();
    for e in ar
        .entries_with_seek()
        .with_context(|| format!("{} is not a tar archive", path.display()))?
    {
        let mut e = e.with_context(|| format!("reading {}", path.display()))?;
        let name = e
            .path()?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        if wanted.contains(&name) {
            if e.size() > 64 << 20 {
                bail!("{}: {name} is over 64 MiB", path.display());
            }
            let mut data = Vec::new();
            e.read_to_end(&mut data)?;
            out.insert(name, data);
        }
    }
    Ok(out)
}

fn digest_of(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// `sha256:<hex>` → `blobs/sha256/<hex>` (OCI image layout).
fn blob_path(digest: &str) -> Result<String> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()))
        .with_context(|| format!("digest {digest:?} is not sha256:<64 hex>"))?;
    Ok(format!("blobs/sha256/{hex}"))
}

/// Reads the archive: a docker-save tarball (`manifest.json`) or an OCI image
/// layout (`index.json`); one image per archive. The config digest is the
/// sha256 of the config file itself, computed here, not taken on trust. Only
/// the small members are read (`sha256` is left empty: see [`check_archive`]).
pub fn inspect_archive(path: &Path) -> Result<CheckedArchive> {
    let top = read_members(path, &["manifest.json".into(), "index.json".into()])?;
    let sha256 = String::new();
    if let Some(m) = top.get("manifest.json") {
        let m: serde_json::Value = serde_json::from_slice(m)
            .with_context(|| format!("{}: manifest.json is not JSON", path.display()))?;
        let entries = m.as_array().map(Vec::as_slice).unwrap_or_default();
        if entries.len() != 1 {
            bail!(
                "{}: manifest.json lists {} images; bake one image per archive",
                path.display(),
                entries.len()
            );
        }
        let config = entries[0]["Config"]
            .as_str()
            .with_context(|| format!("{}: manifest.json has no Config", path.display()))?
            .to_string();
        let data = read_members(path, std::slice::from_ref(&config))?;
        let data = data
            .get(&config)
            .with_context(|| format!("{}: the config {config} is not in it", path.display()))?;
        let tags = entries[0]["RepoTags"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t.as_str().map(String::from))
            .collect();
        return Ok(CheckedArchive {
            sha256,
            image_id: digest_of(data),
            format: "docker-save".into(),
            tags,
        });
    }
    let Some(index) = top.get("index.json") else {
        bail!(
            "{} has neither manifest.json (docker save) nor index.json (OCI layout)",
            path.display()
        );
    };
    let mut index: serde_json::Value = serde_json::from_slice(index)
        .with_context(|| format!("{}: index.json is not JSON", path.display()))?;
    let mut tags = Vec::new();
    // An index may point at an index (multi-platform): follow it, taking linux/amd64.
    for _ in 0..3 {
        let manifests = index["manifests"].as_array().cloned().unwrap_or_default();
        let pick = manifests
            .iter()
            .find(|m| {
                m["platform"].is_null()
                    || (m["platform"]["os"] == "linux" && m["platform"]["architecture"] == "amd64")
            })
            .with_context(|| format!("{}: index.json has no linux/amd64 image", path.display()))?;
        for key in [
            "io.containerd.image.name",
            "org.opencontainers.image.ref.name",
        ] {
            if let Some(t) = pick["annotations"][key].as_str() {
                if key.starts_with("io.") || tags.is_empty() {
                    tags.retain(|x: &String| x != t);
                    tags.push(t.to_string());
                }
            }
        }
        let digest = pick["digest"].as_str().unwrap_or_default().to_string();
        let blob = blob_path(&digest)?;
        let data = read_members(path, std::slice::from_ref(&blob))?;
        let data = data
            .get(&blob)
            .with_context(|| format!("{}: blob {digest} is not in it", path.display()))?;
        if digest_of(data) != digest {
            bail!(
                "{}: blob {digest} does not have that digest",
                path.display()
            );
        }
        let doc: serde_json::Value = serde_json::from_slice(data)
            .with_context(|| format!("{}: {digest} is not JSON", path.display()))?;
        if doc["manifests"].is_array() {
            index = doc;
            continue;
        }
        let config = doc["config"]["digest"]
            .as_str()
            .with_context(|| format!("{}: manifest {digest} has no config", path.display()))?
            .to_string();
        let cblob = blob_path(&config)?;
        let c = read_members(path, std::slice::from_ref(&cblob))?;
        let c = c
            .get(&cblob)
            .with_context(|| format!("{}: config {config} is not in it", path.display()))?;
        if digest_of(c) != config {
            bail!(
                "{}: config {config} does not have that digest",
                path.display()
            );
        }
        // Only tags that name an image: the bare `ref.name` of some tools is a tag alone.
        tags.retain(|t| t.contains(':') || t.contains('/'));
        return Ok(CheckedArchive {
            sha256,
            image_id: config,
            format: "oci".into(),
            tags,
        });
    }
    bail!("{}: index.json nests too deep", path.display())
}

/// Checks one profile entry against the file as it is now.
pub fn check_archive(c: &ContainerImage) -> Result<CheckedArchive> {
    let where_ = format!("[[container_images]] {}", c.archive.display());
    if !c.archive.is_file() {
        bail!("{where_}: no such file");
    }
    let mut a = inspect_archive(&c.archive).with_context(|| where_.clone())?;
    a.sha256 = sha256_file(&c.archive)?;
    if a.sha256 != c.sha256 {
        bail!(
            "{where_}: the file's sha256 is {}, the profile pins {}: if the new archive is \
             meant, pin its sha256 (and image_id)",
            a.sha256,
            c.sha256
        );
    }
    check_pins(c, &a, &where_)?;
    Ok(a)
}

pub(crate) fn check_pins(c: &ContainerImage, a: &CheckedArchive, where_: &str) -> Result<()> {
    match &c.image_id {
        Some(id) if *id != a.image_id => bail!(
            "{where_}: the image's config digest is {}, the profile pins image_id {id}",
            a.image_id
        ),
        None if a.format == "docker-save" => bail!(
            "{where_}: a docker-save archive must be pinned by its image config digest too: \
             add image_id = \"{}\"",
            a.image_id
        ),
        _ => {}
    }
    Ok(())
}

/// What image.json and manifest.json say of an entry: read from the archive's
/// small members (the whole file is hashed by [`check_archive`] for the key).
pub fn describe(c: &ContainerImage) -> Result<BakedImage> {
    let where_ = format!("[[container_images]] {}", c.archive.display());
    let a = inspect_archive(&c.archive).with_context(|| where_.clone())?;
    check_pins(c, &a, &where_)?;
    Ok(BakedImage {
        archive: format!("{BAKED_IMAGES_DIR}/{}.tar", c.sha256),
        sha256: c.sha256.clone(),
        image_id: a.image_id,
        format: a.format,
        tags: a.tags,
    })
}

/// Checks the vendor binary; returns its sha256.
pub fn check_vendor_agent(v: &VendorAgent) -> Result<String> {
    if !v.binary.is_file() {
        bail!("vendor_agent: {} is not a file", v.binary.display());
    }
    let sha = sha256_file(&v.binary)?;
    if sha != v.sha256 {
        bail!(
            "vendor_agent: {} has sha256 {sha}, the profile pins {}",
            v.binary.display(),
            v.sha256
        );
    }
    Ok(sha)
}

/// The customize key's inputs: each archive and the vendor binary as read now.
pub fn add_to_key(
    k: &mut KeyBuilder,
    images: &[ContainerImage],
    vendor: Option<&VendorAgent>,
) -> Result<()> {
    for c in images {
        let a = check_archive(c)?;
        k.field(
            "container-image",
            &format!(
                "{} {} {} {}",
                a.sha256,
                a.image_id,
                a.format,
                a.tags.join(",")
            ),
        );
    }
    if let Some(v) = vendor {
        k.field("vendor-agent", &check_vendor_agent(v)?);
    }
    Ok(())
}

/// Copies a file into the tree and checks the copy has `sha256`.
fn copy_checked(from: &Path, to: &Path, sha256: &str, mode: u32) -> Result<()> {
    if let Some(d) = to.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::copy(from, to).with_context(|| format!("copying {}", from.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))?;
    let got = sha256_file(to)?;
    if got != sha256 {
        bail!(
            "{} changed while the image was being built (sha256 now {got}, pinned {sha256})",
            from.display()
        );
    }
    Ok(())
}

/// Bakes the archives and the vendor agent into `tree`.
pub fn install(tree: &Path, images: &[ContainerImage], vendor: Option<&VendorAgent>) -> Result<()> {
    for c in images {
        describe(c)?;
        let dest = tree
            .join(BAKED_IMAGES_DIR.trim_start_matches('/'))
            .join(format!("{}.tar", c.sha256));
        copy_checked(&c.archive, &dest, &c.sha256, 0o644)?;
    }
    let unit = tree.join("usr/lib/systemd/system/aiw-agent.service");
    if let Some(v) = vendor {
        let dest = tree.join(VENDOR_AGENT_PATH.trim_start_matches('/'));
        copy_checked(&v.binary, &dest, &v.sha256, 0o755)?;
        let to = tree.join("usr/lib/systemd/system/aiware-agent.service");
        std::fs::write(&to, VENDOR_AGENT_UNIT)?;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644))?;
        // aiware-agent.service is the vendor's now: aiw-agent is no alias of it.
        let text = std::fs::read_to_string(&unit)
            .with_context(|| format!("reading {}", unit.display()))?;
        let kept: String = text
            .lines()
            .filter(|l| l.trim() != ALIAS_LINE)
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&unit, kept)?;
    } else if unit.is_file()
        && !std::fs::read_to_string(&unit)?
            .lines()
            .any(|l| l.trim() == ALIAS_LINE)
    {
        bail!(
            "{} lacks {ALIAS_LINE}: `service aiware-agent status` would fail on this image",
            unit.display()
        );
    }
    Ok(())
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use std::path::PathBuf;

    fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    /// A docker-save archive of one image tagged `tag`; returns (bytes, config digest).
    pub fn docker_save(tag: &str, salt: &str) -> (Vec<u8>, String) {
        let layer = tar_of(&[("hello", salt.as_bytes())]);
        let config = format!(r#"{{"os":"linux","architecture":"amd64","salt":"{salt}"}}"#);
        let cid = hex::encode(Sha256::digest(config.as_bytes()));
        let manifest =
            format!(r#"[{{"Config":"{cid}.json","RepoTags":["{tag}"],"Layers":["l/layer.tar"]}}]"#);
        (
            tar_of(&[
                (&format!("{cid}.json"), config.as_bytes()),
                ("l/layer.tar", &layer),
                ("manifest.json", manifest.as_bytes()),
            ]),
            format!("sha256:{cid}"),
        )
    }

    fn oci(tag: &str) -> (Vec<u8>, String) {
        let config = br#"{"os":"linux","architecture":"amd64"}"#;
        let cd = digest_of(config);
        let manifest = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{cd}","size":{}}},"layers":[]}}"#,
            config.len()
        );
        let md = digest_of(manifest.as_bytes());
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"digest":"{md}","annotations":{{"io.containerd.image.name":"{tag}","org.opencontainers.image.ref.name":"1"}}}}]}}"#
        );
        (
            tar_of(&[
                ("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#),
                (&blob_path(&cd).unwrap(), config),
                (&blob_path(&md).unwrap(), manifest.as_bytes()),
                ("index.json", index.as_bytes()),
            ]),
            cd,
        )
    }

    fn write(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        p
    }

    fn sha(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    #[test]
    fn docker_save_archive_is_read_and_checked_against_its_pins() {
        let d = tempfile::tempdir().unwrap();
        let (bytes, cid) = docker_save("aiware-controller:test", "a");
        let archive = write(d.path(), "c.tar", &bytes);
        let a = inspect_archive(&archive).unwrap();
        assert_eq!(a.image_id, cid);
        assert_eq!(a.format, "docker-save");
        assert_eq!(a.tags, vec!["aiware-controller:test"]);
        let mut entry = ContainerImage {
            archive: archive.clone(),
            sha256: sha(&bytes),
            image_id: Some(cid.clone()),
            pulled_from: None,
        };
        let checked = check_archive(&entry).unwrap();
        assert_eq!(checked.sha256, sha(&bytes));
        assert_eq!((checked.image_id, checked.tags), (a.image_id, a.tags));
        let described = describe(&entry).unwrap();
        assert_eq!(
            described.archive,
            format!("/usr/lib/aiware/images/{}.tar", sha(&bytes))
        );
        assert_eq!(described.format, "docker-save");
        entry.image_id = None;
        let e = check_archive(&entry).unwrap_err().to_string();
        assert!(e.contains(&format!("add image_id = \"{cid}\"")), "{e}");
        entry.image_id = Some(format!("sha256:{}", "0".repeat(64)));
        let e = check_archive(&entry).unwrap_err().to_string();
        assert!(e.contains("config digest is"), "{e}");
        entry.image_id = Some(cid);
        entry.sha256 = "0".repeat(64);
        let e = check_archive(&entry).unwrap_err().to_string();
        assert!(e.contains("the profile pins"), "{e}");
    }

    #[test]
    fn oci_archive_is_followed_to_its_config() {
        let d = tempfile::tempdir().unwrap();
        let (bytes, cd) = oci("aiware-api:1");
        let archive = write(d.path(), "o.tar", &bytes);
        let a = inspect_archive(&archive).unwrap();
        assert_eq!(
            (a.format.as_str(), a.image_id.as_str()),
            ("oci", cd.as_str())
        );
        assert_eq!(a.tags, vec!["aiware-api:1"]);
        // OCI without image_id is accepted (the sha256 of the file pins it all).
        check_archive(&ContainerImage {
            archive,
            sha256: sha(&bytes),
            image_id: None,
            pulled_from: None,
        })
        .unwrap();
        let junk = write(d.path(), "j.tar", &tar_of(&[("x", b"y")]));
        let e = inspect_archive(&junk).unwrap_err().to_string();
        assert!(e.contains("neither manifest.json"), "{e}");
    }

    #[test]
    fn a_changed_archive_changes_the_key_or_fails() {
        let d = tempfile::tempdir().unwrap();
        let (one, cid1) = docker_save("x:1", "one");
        let archive = write(d.path(), "c.tar", &one);
        let entry = ContainerImage {
            archive: archive.clone(),
            sha256: sha(&one),
            image_id: Some(cid1),
            pulled_from: None,
        };
        let key = |images: &[ContainerImage]| -> Result<String> {
            let mut k = KeyBuilder::new("customize");
            add_to_key(&mut k, images, None)?;
            Ok(k.finish())
        };
        let k1 = key(std::slice::from_ref(&entry)).unwrap();
        assert_ne!(k1, key(&[]).unwrap());
        // Same pins, other bytes: never the old key, an error.
        let (two, cid2) = docker_save("x:1", "two");
        std::fs::write(&archive, &two).unwrap();
        assert!(key(std::slice::from_ref(&entry)).is_err());
        let repinned = ContainerImage {
            sha256: sha(&two),
            image_id: Some(cid2),
            ..entry
        };
        let k2 = key(std::slice::from_ref(&repinned)).unwrap();
        assert_ne!(k1, k2);
    }

    #[test]
    fn install_bakes_archives_and_the_vendor_agent() {
        let d = tempfile::tempdir().unwrap();
        let tree = d.path().join("tree");
        let units = tree.join("usr/lib/systemd/system");
        std::fs::create_dir_all(&units).unwrap();
        let ours = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/units/aiw-agent.service"),
        )
        .unwrap();
        assert!(
            ours.lines().any(|l| l == ALIAS_LINE),
            "the repo unit has the alias"
        );
        std::fs::write(units.join("aiw-agent.service"), &ours).unwrap();
        let (bytes, cid) = docker_save("x:1", "a");
        let entry = ContainerImage {
            archive: write(d.path(), "c.tar", &bytes),
            sha256: sha(&bytes),
            image_id: Some(cid),
            pulled_from: None,
        };
        // Without a vendor agent: our unit keeps its alias.
        install(&tree, std::slice::from_ref(&entry), None).unwrap();
        let baked = tree.join(format!("usr/lib/aiware/images/{}.tar", entry.sha256));
        assert_eq!(std::fs::read(&baked).unwrap(), bytes);
        assert!(!units.join("aiware-agent.service").exists());
        // With one: binary at the vendor's path, a real unit, the alias gone.
        let bin = write(d.path(), "aiware-agent", b"\x7fELF vendor");
        let v = VendorAgent {
            binary: bin.clone(),
            sha256: sha(b"\x7fELF vendor"),
        };
        install(&tree, &[], Some(&v)).unwrap();
        let dest = tree.join("usr/local/bin/aiware-agent");
        assert_eq!(std::fs::read(&dest).unwrap(), b"\x7fELF vendor");
        assert_eq!(
            std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777,
            0o755
        );
        let unit = std::fs::read_to_string(units.join("aiware-agent.service")).unwrap();
        assert!(
            unit.contains("ExecStart=/usr/local/bin/aiware-agent agent"),
            "{unit}"
        );
        assert!(unit.contains("EnvironmentFile=/run/aiware/aiware-agent.env"));
        let ours_now = std::fs::read_to_string(units.join("aiw-agent.service")).unwrap();
        assert!(!ours_now.contains("Alias="), "{ours_now}");
        assert!(ours_now.contains("WantedBy=multi-user.target"));
        let bad = VendorAgent {
            binary: bin,
            sha256: "0".repeat(64),
        };
        let e = check_vendor_agent(&bad).unwrap_err().to_string();
        assert!(e.contains("the profile pins"), "{e}");
    }
}
