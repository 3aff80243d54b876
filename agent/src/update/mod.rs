//! A/B updates on the node: what is booted, what waits in the other slot,
//! whether systemd-boot fell back, and the boot health check that decides
//! whether a new version is kept.
//!
//! The moving parts are systemd's, not ours: systemd-sysupdate writes a new
//! version into the spare root/verity slots and its UKI onto the ESP as
//! `<IMAGE_ID>_<v>+3-0.efi`; systemd-boot counts its tries; `boot-complete.target`
//! (pulled in by systemd-bless-boot's generator on counted boots only) needs
//! [`health`]'s check, and `systemd-bless-boot` renames the UKI `…_<v>.efi`
//! when it passed. A failed check reboots; when the tries are used up the UKI
//! is `+0-N`, sorts last, and systemd-boot boots the previous version, whose
//! UKI's `roothash=` opens the previous root. This module only reads those
//! facts back (file names on the ESP, partition labels) and runs
//! `systemd-sysupdate` ([`sysupdate`]) for `aiw-agent update`.

pub mod health;
pub mod policy;
pub mod sysupdate;

use crate::paths::Paths;
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::fmt::Write as _;

/// Where the ESP is mounted on our images (an automount, see the ESP user-data path).
pub const ESP_UKI_DIR: &str = "/efi/EFI/Linux";

/// One UKI on the ESP, from its file name `<IMAGE_ID>_<version>[+LEFT[-DONE]].efi`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Uki {
    pub version: String,
    /// None: not counted (blessed, or the version the disk was made with).
    pub tries_left: Option<u32>,
    pub tries_done: u32,
}

impl Uki {
    /// systemd-boot's "bad" entries: counted and no tries left.
    pub fn is_bad(&self) -> bool {
        self.tries_left == Some(0)
    }

    pub fn parse(image_id: &str, file_name: &str) -> Option<Uki> {
        let stem = file_name.strip_suffix(".efi")?;
        let rest = stem.strip_prefix(image_id)?.strip_prefix('_')?;
        let (version, counter) = match rest.split_once('+') {
            Some((v, c)) => (v, Some(c)),
            None => (rest, None),
        };
        if version.is_empty() || version.contains('_') {
            return None;
        }
        let (tries_left, tries_done) = match counter {
            None => (None, 0),
            Some(c) => {
                let (l, d) = c.split_once('-').unwrap_or((c, "0"));
                (Some(l.parse().ok()?), d.parse().ok()?)
            }
        };
        Some(Uki {
            version: version.to_string(),
            tries_left,
            tries_done,
        })
    }
}

/// Orders versions as systemd does (`strverscmp_improved`) for the versions
/// we make: runs of digits compare as numbers, other characters as bytes,
/// and a `~` sorts before everything (a pre-release).
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (Some(b'~'), Some(b'~')) => {
                a = &a[1..];
                b = &b[1..];
                continue;
            }
            (Some(b'~'), _) => return Ordering::Less,
            (_, Some(b'~')) => return Ordering::Greater,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let na = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let nb = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (da, db) = (trim_zeros(&a[..na]), trim_zeros(&b[..nb]));
                let o = da.len().cmp(&db.len()).then_with(|| da.cmp(db));
                if o != Ordering::Equal {
                    return o;
                }
                a = &a[na..];
                b = &b[nb..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn trim_zeros(d: &[u8]) -> &[u8] {
    let n = d.iter().take_while(|c| **c == b'0').count();
    &d[n..]
}

/// The node's versions, as `aiw-agent status` and `aiw-agent update status` show them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UpdateFacts {
    pub image_id: String,
    /// IMAGE_VERSION of the running root (each UKI opens its own root).
    pub booted: String,
    /// The other root slot's version, None when it is still `_empty`.
    pub other_slot: Option<String>,
    /// Installed and newer than the booted version, with tries left: the
    /// next boot tries it.
    pub pending_reboot: Option<String>,
    /// A newer version whose tries ran out: systemd-boot fell back from it.
    pub rolled_back_from: Option<String>,
    /// This boot is being counted (a new version's trial boot, not yet blessed).
    pub on_trial: bool,
    /// The UKIs on the ESP, newest first.
    pub ukis: Vec<Uki>,
}

impl UpdateFacts {
    /// From the booted root's os-release, the ESP's UKIs and the disk's partition labels.
    pub fn gather(paths: &Paths) -> Option<UpdateFacts> {
        let osrel = std::fs::read_to_string(paths.at("/usr/lib/os-release")).ok()?;
        let field = |k: &str| {
            osrel.lines().find_map(|l| {
                l.strip_prefix(k)
                    .and_then(|r| r.strip_prefix('='))
                    .map(|v| v.trim_matches('"').to_string())
            })
        };
        let image_id = field("IMAGE_ID")?;
        let booted = field("IMAGE_VERSION")?;
        let names: Vec<String> = std::fs::read_dir(paths.at(ESP_UKI_DIR))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let labels: Vec<String> = std::fs::read_dir(paths.at("/dev/disk/by-partlabel"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        Some(UpdateFacts::from_parts(&image_id, &booted, &names, &labels))
    }

    pub fn from_parts(
        image_id: &str,
        booted: &str,
        uki_names: &[String],
        labels: &[String],
    ) -> UpdateFacts {
        let mut ukis: Vec<Uki> = uki_names
            .iter()
            .filter_map(|n| Uki::parse(image_id, n))
            .collect();
        ukis.sort_by(|a, b| compare_versions(&b.version, &a.version));
        let newer = |u: &&Uki| compare_versions(&u.version, booted) == Ordering::Greater;
        let rolled_back_from = ukis
            .iter()
            .filter(newer)
            .find(|u| u.is_bad())
            .map(|u| u.version.clone());
        let pending_reboot = ukis
            .iter()
            .filter(newer)
            .find(|u| !u.is_bad())
            .map(|u| u.version.clone());
        let on_trial = ukis
            .iter()
            .any(|u| u.version == booted && u.tries_left.is_some());
        // Root slots are labelled `<IMAGE_ID>_<version>`, verity `…_verity`.
        let other_slot = labels
            .iter()
            .filter_map(|l| l.strip_prefix(image_id)?.strip_prefix('_'))
            .filter(|v| !v.contains('_') && *v != booted)
            .max_by(|a, b| compare_versions(a, b))
            .map(str::to_string);
        UpdateFacts {
            image_id: image_id.to_string(),
            booted: booted.to_string(),
            other_slot,
            pending_reboot,
            rolled_back_from,
            on_trial,
            ukis,
        }
    }

    pub fn human(&self) -> String {
        let mut s = String::new();
        let _ = write!(s, "booted {} {}", self.image_id, self.booted);
        if self.on_trial {
            s.push_str(" (on trial: marked good once the boot health check passes)");
        }
        let _ = write!(
            s,
            "; other slot: {}",
            self.other_slot.as_deref().unwrap_or("empty")
        );
        if let Some(v) = &self.pending_reboot {
            let _ = write!(s, "; {v} installed, boots at the next reboot");
        }
        if let Some(v) = &self.rolled_back_from {
            let _ = write!(
                s,
                "; rolled back from {v} (it failed its boots; it stays installed and is not retried)"
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn uki_names_as_sysupdate_and_systemd_boot_write_them() {
        let p = |n| Uki::parse("aiware-engine", n);
        assert_eq!(
            p("aiware-engine_2.0.0+3-0.efi"),
            Some(Uki {
                version: "2.0.0".into(),
                tries_left: Some(3),
                tries_done: 0
            })
        );
        assert_eq!(p("aiware-engine_2.0.0+2.efi").unwrap().tries_left, Some(2));
        assert!(p("aiware-engine_3+0-3.efi").unwrap().is_bad());
        assert_eq!(p("aiware-engine_1.0.0.efi").unwrap().tries_left, None);
        assert_eq!(p("aiware-engine-gpu_1.efi"), None, "another image's UKI");
        assert_eq!(p("aiware-engine_1.0.0.conf"), None);
        assert_eq!(p("aiware-engine_1+x-1.efi"), None);
    }

    #[test]
    fn versions_compare_as_systemd_does() {
        use Ordering::*;
        assert_eq!(compare_versions("1.10.0", "1.9.0"), Greater);
        assert_eq!(compare_versions("2", "10"), Less);
        assert_eq!(compare_versions("1.0", "1.0"), Equal);
        assert_eq!(compare_versions("1.0~rc1", "1.0"), Less);
        assert_eq!(compare_versions("1.0.1", "1.0"), Greater);
        assert_eq!(compare_versions("007", "7"), Equal);
    }

    #[test]
    fn a_fallback_from_a_bad_version_is_seen() {
        let f = UpdateFacts::from_parts(
            "aiware-engine",
            "2",
            &names(&["aiware-engine_2.efi", "aiware-engine_3+0-3.efi"]),
            &names(&[
                "ESP",
                "aiw-var",
                "aiware-engine_2",
                "aiware-engine_2_verity",
                "aiware-engine_3",
                "aiware-engine_3_verity",
            ]),
        );
        assert_eq!(f.rolled_back_from.as_deref(), Some("3"));
        assert_eq!(f.pending_reboot, None, "a bad version is not pending");
        assert_eq!(f.other_slot.as_deref(), Some("3"));
        assert!(!f.on_trial);
        assert!(f.human().contains("rolled back from 3"), "{}", f.human());
    }

    #[test]
    fn an_installed_update_waits_for_a_reboot_and_a_trial_boot_is_seen() {
        let f = UpdateFacts::from_parts(
            "aiware-engine",
            "1",
            &names(&["aiware-engine_1.efi", "aiware-engine_2+3-0.efi"]),
            &names(&["aiware-engine_1", "aiware-engine_2", "_empty"]),
        );
        assert_eq!(f.pending_reboot.as_deref(), Some("2"));
        assert_eq!(f.rolled_back_from, None);
        let t = UpdateFacts::from_parts(
            "aiware-engine",
            "2",
            &names(&["aiware-engine_1.efi", "aiware-engine_2+2-1.efi"]),
            &names(&["aiware-engine_1", "aiware-engine_2"]),
        );
        assert!(t.on_trial);
        assert_eq!(t.other_slot.as_deref(), Some("1"));
        assert_eq!(t.pending_reboot, None);
        let fresh = UpdateFacts::from_parts(
            "aiware-engine",
            "1",
            &names(&["aiware-engine_1.efi"]),
            &names(&["aiware-engine_1", "aiware-engine_1_verity", "_empty"]),
        );
        assert_eq!(fresh.other_slot, None);
        assert!(fresh.human().contains("other slot: empty"));
    }
}
