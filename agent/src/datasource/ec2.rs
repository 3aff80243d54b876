//! EC2 IMDSv2: PUT a session token (TTL header), then GET with it. 404 means
//! no user-data; 401 means the token expired: get a new one. IMDSv1 (no token)
//! only when the token PUT itself is refused.

use super::retry::{Outcome, RetryClient};
use super::{text, Datasource, DsError, LaunchData, PlatformMeta};
use std::cell::RefCell;
use std::time::Instant;

pub struct Ec2Source {
    base: String,
    pub client: RetryClient,
}

const TOKEN_TTL_HEADER: &str = "X-aws-ec2-metadata-token-ttl-seconds";
const TOKEN_HEADER: &str = "X-aws-ec2-metadata-token";

impl Ec2Source {
    pub fn new(base: &str) -> Self {
        Ec2Source {
            base: base.trim_end_matches('/').into(),
            client: RetryClient::new("ec2"),
        }
    }

    /// `Some(token)`, or `None` when IMDSv2 is refused (fall back to v1).
    fn token(&self, deadline: Instant) -> Result<Option<String>, DsError> {
        let url = format!("{}/latest/api/token", self.base);
        match self.client.call(
            "the IMDSv2 session token",
            deadline,
            &[429],
            Some(b""),
            &|a| a.put(&url).set(TOKEN_TTL_HEADER, "21600"),
        )? {
            Outcome::Body(b) => Ok(Some(String::from_utf8_lossy(&b).trim().to_string())),
            Outcome::Status(403..=405) => {
                crate::log::info("ec2: IMDSv2 token refused; falling back to IMDSv1");
                Ok(None)
            }
            Outcome::Status(c) => Err(DsError::Failed {
                source_name: "ec2",
                message: format!("token PUT answered HTTP {c}"),
            }),
        }
    }

    /// GET `path`; `Ok(None)` on 404. Refreshes the token on 401 (a few times).
    fn get(
        &self,
        path: &str,
        what: &str,
        token: &RefCell<Option<String>>,
        deadline: Instant,
    ) -> Result<Option<Vec<u8>>, DsError> {
        let url = format!("{}{path}", self.base);
        for _ in 0..4 {
            let tok = token.borrow().clone();
            let out = self.client.call(what, deadline, &[429], None, &|a| {
                let r = a.get(&url);
                match &tok {
                    Some(t) => r.set(TOKEN_HEADER, t),
                    None => r,
                }
            })?;
            match out {
                Outcome::Body(b) => return Ok(Some(b)),
                Outcome::Status(404) => return Ok(None),
                Outcome::Status(401) if tok.is_some() => {
                    crate::log::info("ec2: IMDS answered 401 (token expired); getting a new token");
                    *token.borrow_mut() = self.token(deadline)?;
                }
                Outcome::Status(c) => {
                    return Err(DsError::Failed {
                        source_name: "ec2",
                        message: format!("GET {path} answered HTTP {c}"),
                    })
                }
            }
        }
        Err(DsError::Failed {
            source_name: "ec2",
            message: format!("GET {path}: still 401 after refreshing the token"),
        })
    }
}

impl Ec2Source {
    /// The instance's metadata: each item is optional (404 when the instance
    /// has none, e.g. no key pair or no public address), and a failure to get
    /// one leaves it out rather than failing the launch data.
    fn platform(&self, token: &RefCell<Option<String>>, deadline: Instant) -> PlatformMeta {
        let item = |name: &str| -> Option<String> {
            let path = format!("/latest/meta-data/{name}");
            match self.get(&path, name, token, deadline) {
                Ok(b) => text(b),
                Err(e) => {
                    crate::log::info(&format!("{e} (left out)"));
                    None
                }
            }
        };
        let zone = item("placement/availability-zone");
        // placement/region is newer than the zone; the zone is the region plus a letter.
        let region = item("placement/region").or_else(|| {
            zone.as_deref()
                .map(|z| {
                    z.trim_end_matches(|c: char| c.is_ascii_alphabetic())
                        .to_string()
                })
                .filter(|r| !r.is_empty())
        });
        PlatformMeta {
            hostname: item("local-hostname").and_then(|h| super::platform_hostname(&h)),
            // The key pair chosen at launch; only index 0 holds an OpenSSH key.
            ssh_keys: item("public-keys/0/openssh-key")
                .map(|k| super::public_keys_value(&serde_json::Value::String(k)))
                .unwrap_or_default(),
            instance_type: item("instance-type"),
            region,
            zone,
            private_ips: item("local-ipv4").into_iter().collect(),
            public_ips: item("public-ipv4").into_iter().collect(),
        }
    }
}

/// How near a scheduled event must be for the node to drain for it.
pub const EVENT_DRAIN_WINDOW_S: u64 = 30 * 60;

impl Ec2Source {
    /// Whether EC2 says this instance is about to go: a spot interruption
    /// notice (`spot/instance-action`, two minutes ahead) or a scheduled event
    /// (`events/maintenance/scheduled`) starting within
    /// [`EVENT_DRAIN_WINDOW_S`]. `None`: nothing announced.
    pub fn interruption_notice(
        &self,
        now_unix: u64,
        deadline: Instant,
    ) -> Result<Option<String>, DsError> {
        let token = RefCell::new(self.token(deadline)?);
        if let Some(b) = self.get(
            "/latest/meta-data/spot/instance-action",
            "the spot instance action",
            &token,
            deadline,
        )? {
            let v: serde_json::Value = serde_json::from_slice(&b).unwrap_or_default();
            return Ok(Some(format!(
                "EC2 spot interruption: {} at {}",
                v["action"].as_str().unwrap_or("stop"),
                v["time"].as_str().unwrap_or("an announced time")
            )));
        }
        let events = self.get(
            "/latest/meta-data/events/maintenance/scheduled",
            "the scheduled events",
            &token,
            deadline,
        )?;
        Ok(events.and_then(|b| soon_event(&b, now_unix)))
    }
}

/// The first scheduled event neither completed nor canceled whose start is
/// within [`EVENT_DRAIN_WINDOW_S`] (or past, or unreadable: drain to be safe).
pub fn soon_event(body: &[u8], now_unix: u64) -> Option<String> {
    let events: Vec<serde_json::Value> = serde_json::from_slice(body).ok()?;
    events.iter().find_map(|e| {
        let state = e["State"].as_str().unwrap_or("");
        if matches!(state, "completed" | "canceled" | "Completed" | "Canceled") {
            return None;
        }
        let not_before = e["NotBefore"].as_str().unwrap_or("");
        let soon = aws_event_time(not_before).is_none_or(|t| t <= now_unix + EVENT_DRAIN_WINDOW_S);
        soon.then(|| {
            format!(
                "EC2 scheduled event {} ({}) from {not_before}",
                e["Code"].as_str().unwrap_or("?"),
                e["Description"].as_str().unwrap_or("")
            )
        })
    })
}

/// `21 Jan 2019 09:00:43 GMT` (the events' date form) as Unix seconds.
pub fn aws_event_time(s: &str) -> Option<u64> {
    let mut it = s.split_whitespace();
    let day: i64 = it.next()?.parse().ok()?;
    let month = match it.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: i64 = it.next()?.parse().ok()?;
    let mut hms = it.next()?.split(':').map(|x| x.parse::<i64>().ok());
    let (h, m, sec) = (hms.next()??, hms.next()??, hms.next()??);
    if it.next()? != "GMT" || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    super::unix_of_civil(year, month, day, h, m, sec)
}

impl Datasource for Ec2Source {
    fn name(&self) -> &'static str {
        "ec2"
    }
    fn fetch(&self, deadline: Instant) -> Result<LaunchData, DsError> {
        let token = RefCell::new(self.token(deadline)?);
        let instance_id = self
            .get(
                "/latest/meta-data/instance-id",
                "the instance-id",
                &token,
                deadline,
            )?
            .map(|b| String::from_utf8_lossy(&b).trim().to_string());
        let user_data = self.get("/latest/user-data", "user-data", &token, deadline)?;
        Ok(LaunchData {
            user_data,
            instance_id,
            platform: self.platform(&token, deadline),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_dates_as_ec2_writes_them() {
        // 2019-01-21T09:00:43Z
        assert_eq!(
            aws_event_time("21 Jan 2019 09:00:43 GMT"),
            Some(1_548_061_243)
        );
        assert_eq!(
            aws_event_time("29 Feb 2024 00:00:00 GMT"),
            Some(1_709_164_800)
        );
        for bad in [
            "",
            "21 Foo 2019 09:00:43 GMT",
            "21 Jan 2019 09:00 GMT",
            "2019-01-21T09:00:43Z",
            "32 Jan 2019 09:00:43 GMT",
        ] {
            assert_eq!(aws_event_time(bad), None, "{bad}");
        }
    }

    #[test]
    fn only_a_near_open_event_drains() {
        let now = 1_548_061_243 - 3600; // an hour before 09:00:43
        let ev = |state: &str, when: &str| {
            format!(
                r#"[{{"Code": "system-reboot", "Description": "scheduled reboot", "State": "{state}", "NotBefore": "{when}"}}]"#
            )
        };
        assert_eq!(
            soon_event(ev("active", "21 Jan 2019 09:00:43 GMT").as_bytes(), now),
            None,
            "an hour ahead"
        );
        let n = soon_event(
            ev("active", "21 Jan 2019 09:00:43 GMT").as_bytes(),
            now + 1800,
        )
        .unwrap();
        assert!(
            n.contains("system-reboot") && n.contains("21 Jan 2019"),
            "{n}"
        );
        assert_eq!(
            soon_event(ev("completed", "21 Jan 2019 08:00:00 GMT").as_bytes(), now),
            None
        );
        assert_eq!(
            soon_event(ev("canceled", "21 Jan 2019 08:00:00 GMT").as_bytes(), now),
            None
        );
        assert!(
            soon_event(ev("active", "someday").as_bytes(), now).is_some(),
            "unreadable: drain"
        );
        assert_eq!(soon_event(b"[]", now), None);
        assert_eq!(soon_event(b"not json", now), None);
    }
}
