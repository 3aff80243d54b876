//! `[[container_images]] pull = "NAME:TAG@sha256:…"`: container images pulled
//! at build time from a registry the build host reaches, pinned by the digest
//! of their manifest.
//!
//! Runs before the stages are planned: each pull becomes a docker-save archive
//! in the cache (slot `pull/<key>`, keyed by the manifest digest and the name
//! the image gets on the node, never by the registry's address), and from then
//! on it is an archive entry like any other: hashed into the customize key,
//! baked under `/usr/lib/aiware/images/`, loaded into Docker at first boot.
//!
//! The pull itself is Debian's `skopeo` on the build host. Pulling by digest is
//! what pins it: skopeo checks the manifest it gets against the digest and
//! each blob against the manifest, so a registry that serves anything else
//! fails the build. A second build with the same digest reuses the cached
//! archive and does not contact the registry at all (an air-gapped rebuild).
//! Credentials are skopeo's own (`skopeo login`, `$REGISTRY_AUTH_FILE`,
//! `~/.docker/config.json`); they never enter the image, the cache or a log.

use crate::cache::{sha256_file, Cache, FileLock, KeyBuilder};
use crate::image_ref::Pinned;
use crate::profile::{ContainerImage, RegistryImage};
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::Command;

/// The file a pull slot holds.
const ARCHIVE: &str = "image.tar";
/// Its sha256, written when it is pulled.
const ARCHIVE_SHA256: &str = "image.tar.sha256";

/// The name the image gets in Docker on the node: the entry's `tag`, else
/// the reference's own `NAME:TAG`.
pub fn node_tag(image: &RegistryImage, pinned: &Pinned) -> Result<String> {
    if let Some(t) = &image.tag {
        return Ok(t.clone());
    }
    match &pinned.tag {
        Some(tag) => Ok(format!("{}:{tag}", pinned.repository)),
        None => bail!(
            "[[container_images]] pull = {:?}: say which name the image has on the node: \
             put the tag in the reference (NAME:TAG@sha256:…) or add tag = \"NAME:TAG\"",
            image.pull
        ),
    }
}

/// Pulls what is not cached yet; returns the archive entries to bake, with the
/// locks that keep their cache slots from eviction while this build runs.
pub fn resolve(
    cache: &Cache,
    images: &[RegistryImage],
    insecure: &[String],
) -> Result<(Vec<ContainerImage>, Vec<FileLock>)> {
    let mut out = Vec::new();
    let mut held = Vec::new();
    for image in images {
        let where_ = format!("[[container_images]] pull = {:?}", image.pull);
        let pinned = Pinned::parse(&image.pull).map_err(|e| anyhow::anyhow!("{where_}: {e}"))?;
        let tag = node_tag(image, &pinned)?;
        let key = KeyBuilder::new("pull")
            .field("manifest-digest", &pinned.digest)
            .field("node-tag", &tag)
            .field("format", "docker-archive")
            .finish();
        let slot = cache.slot("pull", &key);
        if slot.is_done() {
            eprintln!(
                "pull: {}@{} is in the cache ({}): not contacting the registry",
                pinned.repository,
                short(&pinned.digest),
                &key[..12]
            );
        } else {
            let tls_verify = !pinned
                .registry_host()
                .is_some_and(|h| insecure.iter().any(|i| i == h));
            slot.fill(|tmp| {
                let archive = tmp.join(ARCHIVE);
                pull(&pinned, &tag, tls_verify, &archive)?;
                // Hashed once, when pulled: the slot never changes afterwards.
                std::fs::write(tmp.join(ARCHIVE_SHA256), sha256_file(&archive)?)?;
                Ok(())
            })
            .with_context(|| where_.clone())?;
        }
        if let Some(lock) = slot.hold()? {
            held.push(lock);
        }
        let archive = slot.dir.join(ARCHIVE);
        let a = super::baked::inspect_archive(&archive).with_context(|| where_.clone())?;
        // What the pull recorded; a slot from before it did is hashed now.
        // The customize key hashes the file again as read then
        // (baked::check_archive), so a changed cache entry is still caught.
        let sha256 = match std::fs::read_to_string(slot.dir.join(ARCHIVE_SHA256)) {
            Ok(s) => s.trim().to_string(),
            Err(_) => sha256_file(&archive)?,
        };
        let entry = ContainerImage {
            sha256,
            archive,
            // The profile's pin when it has one (checked against the archive
            // just below), else what the pulled image is.
            image_id: Some(image.image_id.clone().unwrap_or_else(|| a.image_id.clone())),
            pulled_from: Some(image.pull.clone()),
        };
        super::baked::check_pins(&entry, &a, &where_)?;
        out.push(entry);
    }
    Ok((out, held))
}

fn short(digest: &str) -> &str {
    &digest[..digest.len().min(19)]
}

/// `skopeo copy docker://REPO@DIGEST docker-archive:DEST:TAG` for linux/amd64.
fn pull(pinned: &Pinned, tag: &str, tls_verify: bool, dest: &Path) -> Result<()> {
    let src = format!("docker://{}@{}", pinned.repository, pinned.digest);
    eprintln!(
        "pull: {src} as {tag} (skopeo{})",
        if tls_verify { "" } else { ", TLS not verified" }
    );
    let mut cmd = Command::new("skopeo");
    cmd.args(["copy", "--quiet", "--retry-times", "3"])
        .args(["--override-os", "linux", "--override-arch", "amd64"])
        .arg(format!("--src-tls-verify={tls_verify}"))
        .arg(&src)
        .arg(format!("docker-archive:{}:{tag}", dest.display()));
    let out = match cmd.output() {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "pulling {src} needs skopeo on the build host: apt-get install skopeo \
             (builder/setup-host.sh installs it)"
        ),
        Err(e) => return Err(e).context("running skopeo"),
    };
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let err = err.trim();
        let hint = if err.contains("manifest unknown") {
            "; the registry has no manifest with that digest (was the image pushed again? \
             `skopeo inspect` shows the current one)"
        } else if err.contains("http: server gave HTTP response to HTTPS client") {
            "; the registry speaks plain HTTP: name its host with --insecure-registry HOST:PORT \
             if that is meant"
        } else if err.contains("unauthorized") || err.contains("authentication required") {
            "; log in first: skopeo login REGISTRY (as the user that runs the build)"
        } else {
            ""
        };
        bail!("skopeo could not pull {src}: {err}{hint}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d() -> String {
        format!("sha256:{}", "ab".repeat(32))
    }

    #[test]
    fn the_node_tag_comes_from_the_entry_or_the_reference() {
        let img = |pull: String, tag: Option<&str>| RegistryImage {
            pull,
            tag: tag.map(String::from),
            image_id: None,
        };
        let with_tag = img(format!("127.0.0.1:5000/a/b:7@{}", d()), None);
        let p = Pinned::parse(&with_tag.pull).unwrap();
        assert_eq!(node_tag(&with_tag, &p).unwrap(), "127.0.0.1:5000/a/b:7");
        let renamed = img(with_tag.pull.clone(), Some("aiware/b:7"));
        assert_eq!(node_tag(&renamed, &p).unwrap(), "aiware/b:7");
        let bare = img(format!("127.0.0.1:5000/a/b@{}", d()), None);
        let p = Pinned::parse(&bare.pull).unwrap();
        let e = node_tag(&bare, &p).unwrap_err().to_string();
        assert!(e.contains("tag = "), "{e}");
    }
}
