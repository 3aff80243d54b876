//! A/B updates with systemd-sysupdate (257): the slot sizes and partition
//! labels of the disk, the names of the files an update server serves, the
//! node's transfer files and its keyring.
//!
//! systemd-sysupdate writes a new version into the partition labelled
//! `_empty` (or the oldest unprotected version's), sets the partition UUID
//! taken from the file name (`@u`), and relabels it `<IMAGE_ID>_<version>`.
//! With only `roothash=` on the UKI's command line, the veritysetup generator
//! opens the partitions whose UUIDs are the roothash's two halves, so each
//! UKI finds its own root and a fallback to the older UKI boots the older
//! root.

use crate::openpgp;
use crate::profile::Profile;
use anyhow::{bail, Context, Result};
use std::path::Path;

const MIB: u64 = 1 << 20;

/// GPT partition names hold 36 UTF-16 characters.
pub const GPT_LABEL_MAX: usize = 36;
/// The label systemd-sysupdate looks for when it needs a free slot.
pub const EMPTY_LABEL: &str = "_empty";

/// Where the node keeps the public key it checks SHA256SUMS.gpg with.
/// systemd-sysupdate 257 (Debian) reads `/etc/systemd/import-pubring.gpg`
/// when it exists, else `/usr/lib/systemd/import-pubring.gpg`; v258 renamed
/// the latter `.pgp`. Ours is written at both /usr/lib names, the /etc ones
/// are removed, so the vendor keyring of systemd-container (Fedora, Ubuntu,
/// openSUSE keys) is never trusted.
pub const KEYRING_PATHS: [&str; 2] = [
    "usr/lib/systemd/import-pubring.gpg",
    "usr/lib/systemd/import-pubring.pgp",
];
pub const KEYRING_REMOVED: [&str; 2] = [
    "etc/systemd/import-pubring.gpg",
    "etc/systemd/import-pubring.pgp",
];

/// The sizes of the four root partitions, the same for every version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slots {
    pub root: u64,
    pub verity: u64,
}

impl Slots {
    /// A root slot of `root_mib` MiB and the verity slot its hash tree needs:
    /// 32-byte SHA-256 hashes of 4 KiB blocks (1/128 of the data, plus the
    /// upper levels), a superblock and 2 MiB of slack, rounded to MiB.
    pub fn for_root_mib(root_mib: u64) -> Slots {
        let root = root_mib * MIB;
        let blocks = root / 4096;
        let mut hash_blocks = 0;
        let mut level = blocks;
        while level > 1 {
            level = level.div_ceil(128);
            hash_blocks += level;
        }
        let verity = ((hash_blocks + 1) * 4096 + 2 * MIB).div_ceil(MIB) * MIB;
        Slots { root, verity }
    }

    /// Fails, saying by how much and what to change, when a version's root or
    /// hash tree is larger than its slot.
    pub fn check_fits(&self, profile: &str, root: u64, verity: u64) -> Result<()> {
        if root > self.root {
            bail!(
                "the root file system ({} MiB) does not fit its {} MiB slot: \
                 raise `root_slot_mib` of profile {profile} (a disk keeps its slot \
                 size for life, so nodes already deployed cannot take this version)",
                root.div_ceil(MIB),
                self.root / MIB
            );
        }
        if verity > self.verity {
            bail!(
                "the dm-verity hash tree ({verity} bytes) does not fit its {} byte slot",
                self.verity
            );
        }
        Ok(())
    }
}

/// The labels of root A and its verity partition for `image_id`/`version`,
/// as the transfer files' target patterns (`%M_@v`, `%M_@v_verity`) match.
pub fn labels(image_id: &str, version: &str) -> Result<(String, String)> {
    if version.is_empty() || version.contains(['_', '+', '/', ' ']) {
        bail!("version {version:?}: systemd-sysupdate versions may not contain '_', '+', '/' or spaces");
    }
    let root = format!("{image_id}_{version}");
    let verity = format!("{root}_verity");
    if verity.chars().count() > GPT_LABEL_MAX {
        bail!(
            "partition label {verity:?} is {} characters, GPT allows {GPT_LABEL_MAX}: \
             use a shorter profile name or image version",
            verity.chars().count()
        );
    }
    Ok((root, verity))
}

/// The names of one version's files on the update server, as the transfer
/// files' source patterns match them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactNames {
    pub root: String,
    pub verity: String,
    pub uki: String,
}

/// `image_name` is `<IMAGE_ID>_<version>`; the UUIDs are the partitions'
/// (the roothash's halves), which sysupdate sets on the slot it writes.
pub fn artifact_names(image_name: &str, root_uuid: &str, verity_uuid: &str) -> ArtifactNames {
    ArtifactNames {
        root: format!("{image_name}.root.{root_uuid}.raw"),
        verity: format!("{image_name}.root-verity.{verity_uuid}.raw"),
        uki: format!("{image_name}.efi"),
    }
}

/// The UUID repart gives a verity data (`first`) or hash partition: the
/// first or last 128 bits of the roothash.
pub fn uuid_from_roothash(roothash: &str, first: bool) -> Result<String> {
    if roothash.len() != 64 || !roothash.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("roothash {roothash:?} is not 64 hex digits");
    }
    let h = if first {
        &roothash[..32]
    } else {
        &roothash[32..]
    };
    let h = h.to_ascii_lowercase();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    ))
}

/// `SHA256SUMS` as sha256sum writes it, sorted by name.
pub fn sha256sums(entries: &std::collections::BTreeMap<String, String>) -> String {
    entries
        .iter()
        .map(|(name, sum)| format!("{sum}  {name}\n"))
        .collect()
}

/// Reads a `SHA256SUMS` (`<hex>  name` or `<hex> *name` lines).
pub fn parse_sha256sums(text: &str) -> Result<std::collections::BTreeMap<String, String>> {
    let mut out = std::collections::BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let (sum, name) = line
            .split_once(' ')
            .with_context(|| format!("SHA256SUMS line {}: {line:?}", i + 1))?;
        let name = name.trim_start_matches([' ', '*']);
        if sum.len() != 64 || !sum.bytes().all(|b| b.is_ascii_hexdigit()) || name.is_empty() {
            bail!("SHA256SUMS line {}: {line:?}", i + 1);
        }
        out.insert(name.to_string(), sum.to_ascii_lowercase());
    }
    Ok(out)
}

/// The transfer files (name, text) of `/usr/lib/sysupdate.d/`: root and
/// verity first, the UKI last (they run in name order, and a version is
/// bootable only once its UKI is on the ESP).
pub fn transfer_files(url: &str, tries: u32) -> Vec<(String, String)> {
    let path = format!("{}/%M/", url.trim_end_matches('/'));
    let partition = |source: &str, target: &str, ptype: &str| {
        format!(
            "# Written by aiwimg: the profile's `update_url`.\n\
             [Transfer]\nProtectVersion=%A\n\n\
             [Source]\nType=url-file\nPath={path}\nMatchPattern={source}\n\n\
             [Target]\nType=partition\nPath=auto\nMatchPattern={target}\n\
             MatchPartitionType={ptype}\nPartitionFlags=0\nReadOnly=1\n"
        )
    };
    vec![
        (
            "10-root.transfer".into(),
            partition("%M_@v.root.@u.raw", "%M_@v", "root"),
        ),
        (
            "11-root-verity.transfer".into(),
            partition("%M_@v.root-verity.@u.raw", "%M_@v_verity", "root-verity"),
        ),
        (
            "20-uki.transfer".into(),
            format!(
                "# Written by aiwimg: the profile's `update_url` and `update_tries`.\n\
                 [Transfer]\nProtectVersion=%A\n\n\
                 [Source]\nType=url-file\nPath={path}\nMatchPattern=%M_@v.efi\n\n\
                 [Target]\nType=regular-file\nPath=/EFI/Linux\nPathRelativeTo=boot\n\
                 MatchPattern=%M_@v+@l-@d.efi %M_@v+@l.efi %M_@v.efi\n\
                 Mode=0444\nTriesLeft={tries}\nTriesDone=0\nInstancesMax=2\n"
            ),
        ),
    ]
}

/// The keyring as gpg's `--keyring` reads it (binary packets), and its
/// primary key's fingerprint; None when the profile names no key.
pub fn keyring(profile: &Profile) -> Result<Option<(Vec<u8>, String)>> {
    let Some(path) = &profile.update_keyring else {
        return Ok(None);
    };
    let data = std::fs::read(path)
        .with_context(|| format!("reading the update keyring {}", path.display()))?;
    let fpr = openpgp::primary_fingerprint(&data)
        .with_context(|| format!("update keyring {}", path.display()))?;
    let bin = if data.starts_with(b"-----BEGIN PGP") {
        openpgp::dearmor(std::str::from_utf8(&data)?)?
    } else {
        data
    };
    Ok(Some((bin, fpr)))
}

/// Writes the transfer files and the keyring into the image tree. Without a
/// keyring the file is empty: sysupdate then refuses every update.
pub fn install(profile: &Profile, tree: &Path) -> Result<()> {
    let dir = tree.join("usr/lib/sysupdate.d");
    std::fs::create_dir_all(&dir)?;
    for (name, text) in transfer_files(&profile.update_url, profile.update_tries) {
        std::fs::write(dir.join(name), text)?;
    }
    let key = keyring(profile)?.map(|(k, _)| k).unwrap_or_default();
    for p in KEYRING_PATHS {
        let path = tree.join(p);
        std::fs::create_dir_all(path.parent().unwrap())?;
        std::fs::write(&path, &key)?;
    }
    for p in KEYRING_REMOVED {
        match std::fs::remove_file(tree.join(p)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_hold_their_hash_tree() {
        let s = Slots::for_root_mib(2048);
        assert_eq!(s.root, 2048 * MIB);
        // 524288 blocks: 4096 + 32 + 1 hash blocks, a superblock, 2 MiB.
        assert_eq!(s.verity, 19 * MIB);
        assert_eq!(s.verity % MIB, 0);
        assert!(s.verity > s.root / 128);
    }

    #[test]
    fn a_root_larger_than_its_slot_fails_clearly() {
        let s = Slots::for_root_mib(512);
        s.check_fits("engine", 512 * MIB, MIB).unwrap();
        let e = s
            .check_fits("engine", 512 * MIB + 1, MIB)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("513 MiB") && e.contains("root_slot_mib") && e.contains("engine"),
            "{e}"
        );
        assert!(s.check_fits("engine", MIB, s.verity + 1).is_err());
    }

    #[test]
    fn labels_follow_the_patterns_and_gpt_limits() {
        let (r, v) = labels("aiware-engine-gpu", "1.0.0").unwrap();
        assert_eq!(r, "aiware-engine-gpu_1.0.0");
        assert_eq!(v, "aiware-engine-gpu_1.0.0_verity");
        assert!(labels("aiware-engine", "1.0_0").is_err());
        assert!(labels("aiware-engine", "1+2").is_err());
        let e = labels("aiware-engine-gpu", "2026.12.02-rc1.long")
            .unwrap_err()
            .to_string();
        assert!(e.contains("36"), "{e}");
    }

    #[test]
    fn uuids_are_the_roothash_halves() {
        let h = "ce450fbdbdfa8687a38defe8d573eb158384d58a40ce59d845c4c93320e541ff";
        // What systemd-repart gave the partitions of a real build.
        assert_eq!(
            uuid_from_roothash(h, true).unwrap(),
            "ce450fbd-bdfa-8687-a38d-efe8d573eb15"
        );
        assert_eq!(
            uuid_from_roothash(h, false).unwrap(),
            "8384d58a-40ce-59d8-45c4-c93320e541ff"
        );
        assert!(uuid_from_roothash("abc", true).is_err());
    }

    #[test]
    fn transfer_files_render_from_settings() {
        let files = transfer_files("http://10.0.2.100:8080/aiware/", 2);
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "10-root.transfer",
                "11-root-verity.transfer",
                "20-uki.transfer"
            ]
        );
        for (_, t) in &files {
            assert!(
                t.contains("\nPath=http://10.0.2.100:8080/aiware/%M/\n"),
                "{t}"
            );
            assert!(t.contains("ProtectVersion=%A\n"));
        }
        assert!(files[0].1.contains("MatchPattern=%M_@v.root.@u.raw\n"));
        assert!(files[0].1.contains("MatchPartitionType=root\n"));
        assert!(files[1].1.contains("MatchPattern=%M_@v_verity\n"));
        assert!(files[1].1.contains("MatchPartitionType=root-verity\n"));
        let uki = &files[2].1;
        assert!(uki.contains("TriesLeft=2\n") && uki.contains("InstancesMax=2\n"));
        assert!(uki.contains("PathRelativeTo=boot\n"));
    }

    /// The served names match the transfer files' source patterns with
    /// %M = IMAGE_ID and @v = the version, and nothing else: the root
    /// pattern does not take the verity file.
    #[test]
    fn artifact_names_match_the_source_patterns() {
        let n = artifact_names("aiware-engine_1.2.0", "u1", "u2");
        assert_eq!(n.root, "aiware-engine_1.2.0.root.u1.raw");
        assert_eq!(n.verity, "aiware-engine_1.2.0.root-verity.u2.raw");
        assert_eq!(n.uki, "aiware-engine_1.2.0.efi");
        assert!(!n.verity.contains(".root."));
    }

    #[test]
    fn sha256sums_round_trip() {
        let mut m = std::collections::BTreeMap::new();
        m.insert("b.efi".to_string(), "ab".repeat(32));
        m.insert("a.raw".to_string(), "cd".repeat(32));
        let text = sha256sums(&m);
        assert!(text.starts_with(&format!("{}  a.raw\n", "cd".repeat(32))));
        assert_eq!(parse_sha256sums(&text).unwrap(), m);
        let star = format!("{} *x\n", "ef".repeat(32));
        assert_eq!(parse_sha256sums(&star).unwrap()["x"], "ef".repeat(32));
        assert!(parse_sha256sums("nothex  x\n").is_err());
    }

    #[test]
    fn install_replaces_vendor_keyrings() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path();
        std::fs::create_dir_all(tree.join("usr/lib/systemd")).unwrap();
        std::fs::create_dir_all(tree.join("etc/systemd")).unwrap();
        std::fs::write(tree.join(KEYRING_PATHS[0]), b"vendor keys").unwrap();
        std::fs::write(tree.join(KEYRING_REMOVED[0]), b"vendor keys").unwrap();
        let mut p = test_profile();
        p.update_keyring =
            Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/test-repo-key.asc"));
        install(&p, tree).unwrap();
        let key = std::fs::read(tree.join(KEYRING_PATHS[0])).unwrap();
        assert_eq!(key, std::fs::read(tree.join(KEYRING_PATHS[1])).unwrap());
        // Binary packets: a public key packet first, with the fixture's fingerprint.
        assert!(key[0] & 0x80 != 0);
        let fpr = include_str!("../tests/fixtures/test-repo-key.fpr").trim();
        assert_eq!(openpgp::primary_fingerprint(&key).unwrap(), fpr);
        assert!(!tree.join(KEYRING_REMOVED[0]).exists());
        assert!(tree.join("usr/lib/sysupdate.d/20-uki.transfer").is_file());
        // No key named: an empty keyring, never the vendor's.
        p.update_keyring = None;
        install(&p, tree).unwrap();
        assert!(std::fs::read(tree.join(KEYRING_PATHS[0]))
            .unwrap()
            .is_empty());
    }

    fn test_profile() -> Profile {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        std::fs::create_dir_all(&images).unwrap();
        std::fs::write(images.join("t.toml"), "description = 't'\n").unwrap();
        let modes = aiw_agent::modes::ModeTable::load(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/modes.toml"),
        )
        .unwrap();
        Profile::load(&images, "t", &modes).unwrap()
    }
}
