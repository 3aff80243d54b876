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
