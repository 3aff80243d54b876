//! Google Compute Engine metadata server (`Metadata-Flavor: Google`), reached
//! by its IP so no DNS is needed; user-data is the `user-data` attribute.

use super::retry::{Outcome, RetryClient};
use super::{text, Datasource, DsError, LaunchData, PlatformMeta};
use std::time::Instant;

pub struct GceSource {
    base: String,
    pub client: RetryClient,
}

impl GceSource {
    pub fn new(base: &str) -> Self {
        GceSource {
            base: base.trim_end_matches('/').into(),
            client: RetryClient::new("gce"),
        }
    }

    fn get(&self, path: &str, what: &str, deadline: Instant) -> Result<Option<Vec<u8>>, DsError> {
        let url = format!("{}/computeMetadata/v1/{path}", self.base);
        match self.client.call(what, deadline, &[429], None, &|a| {
            a.get(&url).set("Metadata-Flavor", "Google")
        })? {
            Outcome::Body(b) => Ok(Some(b)),
            Outcome::Status(404) => Ok(None),
            Outcome::Status(c) => Err(DsError::Failed {
                source_name: "gce",
                message: format!("GET {path} answered HTTP {c}"),
            }),
        }
    }
}

impl Datasource for GceSource {
    fn name(&self) -> &'static str {
        "gce"
    }
    fn fetch(&self, deadline: Instant) -> Result<LaunchData, DsError> {
        let instance_id = self
            .get("instance/id", "the instance id", deadline)?
            .map(|b| String::from_utf8_lossy(&b).trim().to_string());
        let user_data = self.get("instance/attributes/user-data", "user-data", deadline)?;
        Ok(LaunchData {
            user_data,
            instance_id,
            platform: self.platform(deadline),
        })
    }
}

impl GceSource {
    /// The instance's metadata; each item is optional and a failure leaves it out.
    fn platform(&self, deadline: Instant) -> PlatformMeta {
        let item = |path: &str| -> Option<String> {
            match self.get(path, path, deadline) {
                Ok(b) => text(b),
                Err(e) => {
                    crate::log::info(&format!("{e} (left out)"));
                    None
                }
            }
        };
        // `projects/123/zones/us-central1-a` and `projects/123/machineTypes/n2-standard-4`.
        let last = |v: String| v.rsplit('/').next().unwrap_or("").to_string();
        let zone = item("instance/zone").map(last).filter(|z| !z.is_empty());
        let region = zone
            .as_deref()
            .and_then(|z| z.rsplit_once('-'))
            .map(|(r, _)| r.to_string());
        let instance_keys = item("instance/attributes/ssh-keys");
        let legacy_instance_keys = item("instance/attributes/sshKeys");
        // What Google's guest agent does: project keys are left out when the
        // instance blocks them or still has the legacy instance `sshKeys`.
        let block_project = item("instance/attributes/block-project-ssh-keys")
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
            || legacy_instance_keys.is_some();
        let mut lines: Vec<String> = [instance_keys, legacy_instance_keys]
            .into_iter()
            .flatten()
            .collect();
        if !block_project {
            lines.extend(item("project/attributes/ssh-keys"));
            lines.extend(item("project/attributes/sshKeys"));
        }
        let now = crate::status::now_unix();
        PlatformMeta {
            hostname: item("instance/hostname").and_then(|h| super::platform_hostname(&h)),
            ssh_keys: lines
                .iter()
                .flat_map(|l| ssh_keys_attribute(l, now))
                .collect(),
            instance_type: item("instance/machine-type")
                .map(last)
                .filter(|t| !t.is_empty()),
            region,
            zone,
            private_ips: item("instance/network-interfaces/0/ip")
                .into_iter()
                .collect(),
            public_ips: item("instance/network-interfaces/0/access-configs/0/external-ip")
                .into_iter()
                .collect(),
        }
    }
}

/// The keys of a GCE `ssh-keys` attribute: `user:key` lines; the user names
/// an account the image does not have (its one admin user takes every key).
/// Keys the console made with an `expireOn` in the past are left out.
pub fn ssh_keys_attribute(text: &str, now_unix: u64) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let key = match line.split_once(':') {
            Some((user, key)) if !user.contains(char::is_whitespace) => key.trim(),
            _ => line,
        };
        if let Some((_, meta)) = key.split_once(" google-ssh ") {
            let expire = serde_json::from_str::<serde_json::Value>(meta)
                .ok()
                .and_then(|m| m["expireOn"].as_str().and_then(unix_of_utc));
            if expire.is_some_and(|e| e <= now_unix) {
                continue;
            }
        }
        if !key.is_empty() {
            out.push(key.to_string());
        }
    }
    out
}

/// Seconds since the epoch of `YYYY-MM-DDTHH:MM:SS` (the offset, `+0000` on
/// GCE, is not applied); `None` when it is not that form.
fn unix_of_utc(s: &str) -> Option<u64> {
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    super::unix_of_civil(y, m, d, hh, mm, ss)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_keys_attribute_lines_drop_the_user_and_expired_keys() {
        let now = unix_of_utc("2025-06-01T00:00:00+0000").unwrap();
        assert_eq!(now, 1_748_736_000);
        let text = "alice:ssh-ed25519 AAAA1 alice@laptop\n\n\
            bob:ecdsa-sha2-nistp256 AAAA2 google-ssh {\"userName\":\"bob@x.com\",\"expireOn\":\"2025-05-31T23:59:59+0000\"}\n\
            carol:ssh-rsa AAAA3 google-ssh {\"userName\":\"carol@x.com\",\"expireOn\":\"2030-01-01T00:00:00+0000\"}\n\
            ssh-ed25519 AAAA4 no-user-part\n";
        assert_eq!(
            ssh_keys_attribute(text, now),
            [
                "ssh-ed25519 AAAA1 alice@laptop",
                "ssh-rsa AAAA3 google-ssh {\"userName\":\"carol@x.com\",\"expireOn\":\"2030-01-01T00:00:00+0000\"}",
                "ssh-ed25519 AAAA4 no-user-part",
            ]
        );
        assert_eq!(unix_of_utc("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(unix_of_utc("2024-02-29T12:00:00"), Some(1_709_208_000));
        assert_eq!(unix_of_utc("yesterday"), None);
    }
}
