//! `aiwimg inspect`: what an image is, and with `--verify`, whether it is
//! still exactly what was built.

use crate::cache::sha256_file;
use crate::gpt;
use crate::manifest::Manifest;
use crate::verity;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Finds the manifest for IMAGE: an output folder, its manifest.json, or any
/// file in it.
pub fn locate(image: &Path) -> Result<(PathBuf, Manifest)> {
    let dir = if image.is_dir() {
        image.to_path_buf()
    } else if image.is_file() {
        image.parent().unwrap_or(Path::new(".")).to_path_buf()
    } else {
        bail!("{}: no such image, file or folder", image.display());
    };
    let mpath = dir.join("manifest.json");
    let text = std::fs::read_to_string(&mpath).with_context(|| {
        format!(
            "{}: no manifest.json beside it; give the folder `aiwimg build` wrote",
            image.display()
        )
    })?;
    let m: Manifest =
        serde_json::from_str(&text).with_context(|| format!("reading {}", mpath.display()))?;
    Ok((dir, m))
}

pub fn run(image: &Path, verify: bool, json: bool) -> Result<()> {
    let (dir, m) = locate(image)?;
    let raw = m.file("raw").map(|f| dir.join(&f.name));
    let parts = match &raw {
        Some(r) => Some(gpt::read(&mut std::fs::File::open(r)?)?),
        None => None,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&m)?);
    } else {
        println!("image     {} {} ({})", m.image_id, m.version, m.description);
        println!("modes     {}", m.modes.join(", "));
        println!("kernel    {}", m.kernel_version);
        println!("roothash  {}", m.roothash);
        println!("cmdline   {}", m.cmdline);
        println!("packages  {} installed", m.packages.len());
        println!("input     {}", m.input_hash);
        match &m.secure_boot {
            Some(sb) => println!(
                "secure    signed for Secure Boot by {} (db certificate sha256 {}), enrollment {}",
                sb.db_subject,
                sb.db_cert_sha256,
                sb.enroll.as_str()
            ),
            None => println!("secure    not signed for Secure Boot"),
        }
        if let Some(parts) = &parts {
            println!("\npartitions (GPT of {}):", raw.as_ref().unwrap().display());
            println!(
                "  {:<3} {:<15} {:<20} {:>12} {:>10}  uuid",
                "#", "label", "type", "offset", "size"
            );
            for p in parts {
                println!(
                    "  {:<3} {:<15} {:<20} {:>12} {:>10}  {}",
                    p.number,
                    p.label,
                    p.type_name(),
                    p.offset(),
                    human(p.size()),
                    p.uuid
                );
            }
        }
        println!("\nfiles:");
        for f in &m.files {
            println!(
                "  {:<40} {:>10}  sha256 {}",
                f.name,
                human(f.size),
                f.sha256
            );
        }
    }
    if !verify {
        return Ok(());
    }
    let mut problems = Vec::new();
    for f in &m.files {
        let path = dir.join(&f.name);
        match (
            std::fs::metadata(&path).map_err(anyhow::Error::from),
            sha256_file(&path),
        ) {
            (Ok(meta), Ok(sum)) if meta.len() == f.size && sum == f.sha256 => {
                eprintln!("ok    {} sha256 and size match", f.name)
            }
            (Ok(_), Ok(_)) => problems.push(format!(
                "{}: sha256 or size differs from manifest.json",
                f.name
            )),
            (Err(e), _) | (_, Err(e)) => problems.push(format!("{}: {e}", f.name)),
        }
    }
    if !m
        .cmdline
        .split_whitespace()
        .any(|w| w == format!("roothash={}", m.roothash))
    {
        problems.push("the UKI command line in the manifest does not carry the roothash".into());
    }
    match (&raw, &parts) {
        (Some(raw), Some(parts)) => {
            // Root A's partitions carry the roothash's halves as UUIDs (what
            // the veritysetup generator opens), whatever their labels.
            let by_uuid = |first: bool| {
                let want = crate::update::uuid_from_roothash(&m.roothash, first).ok()?;
                parts.iter().find(|p| p.uuid.eq_ignore_ascii_case(&want))
            };
            let (data, hash) = (by_uuid(true), by_uuid(false));
            match (data, hash) {
                (Some(d), Some(h)) => {
                    let mut f = std::fs::File::open(raw)?;
                    match verity::verify(&mut f, d.offset(), h.offset()) {
                        Ok(root) if root == m.roothash => {
                            eprintln!("ok    dm-verity tree of root-a recomputed, roothash {root} matches")
                        }
                        Ok(root) => problems.push(format!(
                            "dm-verity roothash of root-a is {root}, manifest and UKI say {}",
                            m.roothash
                        )),
                        Err(e) => problems.push(format!("dm-verity of root-a: {e}")),
                    }
                }
                _ => problems.push("the raw image has no partitions with the roothash's UUIDs (root A and its verity)".into()),
            }
        }
        _ => problems.push(
            "no raw image among the outputs: build with --formats raw to verify the root".into(),
        ),
    }
    if let (Some(sb), Some(raw), Some(parts)) = (&m.secure_boot, &raw, &parts) {
        match verify_signatures(&dir, sb, raw, parts) {
            Ok(found) => problems.extend(found),
            Err(e) => problems.push(format!("Secure Boot signatures: {e:#}")),
        }
    }
    if problems.is_empty() {
        eprintln!("verified: {}", dir.display());
        Ok(())
    } else {
        bail!("verification failed:\n  {}", problems.join("\n  "))
    }
}

/// Checks each EFI binary the disk stage signed, as it is on the raw image's
/// ESP, against the db certificate in the output folder (the one firmware
/// is given): `sbverify` recomputes the Authenticode digest of the binary
/// and checks the signature over it, so a changed byte anywhere in the UKI
/// (its command line and roothash included) fails here as it would in
/// firmware. Returns the problems found.
fn verify_signatures(
    dir: &Path,
    sb: &crate::secure_boot::SecureBootInfo,
    raw: &Path,
    parts: &[gpt::GptPartition],
) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    let cert = dir.join(crate::secure_boot::SLOT_DIR).join("db.crt");
    let der = crate::secure_boot::cert_der(
        &std::fs::read(&cert)
            .with_context(|| format!("{}: the db certificate is missing", cert.display()))?,
    )
    .with_context(|| format!("{}", cert.display()))?;
    let sum = crate::secure_boot::cert_sha256(&der);
    if sum != sb.db_cert_sha256 {
        problems.push(format!(
            "{}: sha256 {sum}, but the image was signed for {}",
            cert.display(),
            sb.db_cert_sha256
        ));
        return Ok(problems);
    }
    let esp = parts
        .iter()
        .find(|p| p.type_name() == "esp")
        .context("the raw image has no ESP")?;
    let tmp = tempfile::tempdir()?;
    for (i, path) in sb.signed.iter().enumerate() {
        let copy = tmp.path().join(format!("{i}.efi"));
        let out = std::process::Command::new("mcopy")
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-n")
            .arg("-i")
            .arg(format!("{}@@{}", raw.display(), esp.offset()))
            .arg(format!("::{path}"))
            .arg(&copy)
            .output()
            .context("running mcopy (Debian package mtools; builder/setup-host.sh installs it)")?;
        if !out.status.success() {
            problems.push(format!(
                "ESP {path}: cannot be read ({})",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
            continue;
        }
        let out = std::process::Command::new("sbverify")
            .arg("--cert")
            .arg(&cert)
            .arg(&copy)
            .output()
            .context(
                "running sbverify (Debian package sbsigntool; builder/setup-host.sh installs it)",
            )?;
        if out.status.success() {
            eprintln!(
                "ok    ESP {path}: Secure Boot signature verified against {}",
                cert.display()
            );
        } else {
            let said = String::from_utf8_lossy(&out.stderr);
            let said = said.lines().last().unwrap_or("").trim().to_string();
            problems.push(format!(
                "ESP {path}: its signature does not verify against {} (sbverify: {said})",
                cert.display()
            ));
        }
    }
    Ok(problems)
}

pub fn human(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}
