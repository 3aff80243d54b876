//! Azure IMDS (`Metadata: true`): userData comes base64-encoded; 404, 410, 429
//! and 5xx are retried (IMDS answers them while the VM is still being set up).

use super::retry::{Outcome, RetryClient};
use super::{Datasource, DsError, LaunchData, PlatformMeta};
use base64::Engine;
use std::time::Instant;

pub struct AzureSource {
    base: String,
    pub client: RetryClient,
}

const API: &str = "api-version=2021-01-01&format=text";

impl AzureSource {
    pub fn new(base: &str) -> Self {
        AzureSource {
            base: base.trim_end_matches('/').into(),
            client: RetryClient::new("azure"),
        }
    }

    fn get(&self, path: &str, what: &str, deadline: Instant) -> Result<Vec<u8>, DsError> {
        let url = format!("{}/metadata/instance/compute/{path}?{API}", self.base);
        match self
            .client
            .call(what, deadline, &[404, 410, 429], None, &|a| {
                a.get(&url).set("Metadata", "true")
            })? {
            Outcome::Body(b) => Ok(b),
            Outcome::Status(c) => Err(DsError::Failed {
                source_name: "azure",
                message: format!("GET {path} answered HTTP {c}"),
            }),
        }
    }
}

impl Datasource for AzureSource {
    fn name(&self) -> &'static str {
        "azure"
    }
    fn fetch(&self, deadline: Instant) -> Result<LaunchData, DsError> {
        let vm_id = String::from_utf8_lossy(&self.get("vmId", "the vmId", deadline)?)
            .trim()
            .to_string();
        let raw = self.get("userData", "userData", deadline)?;
        let text: String = String::from_utf8_lossy(&raw)
            .split_ascii_whitespace()
            .collect();
        let user_data = if text.is_empty() {
            None
        } else {
            Some(
                base64::engine::general_purpose::STANDARD
                    .decode(text.as_bytes())
                    .map_err(|e| DsError::Failed {
                        source_name: "azure",
                        message: format!("userData is not base64: {e}"),
                    })?,
            )
        };
        Ok(LaunchData {
            user_data,
            instance_id: (!vm_id.is_empty()).then_some(vm_id),
            platform: self.platform(deadline),
        })
    }
}

impl AzureSource {
    /// The instance document (`/metadata/instance`, JSON): asked once IMDS has
    /// answered for vmId and userData, so a 404 here means this IMDS has no
    /// such document (not "not ready yet") and is not waited on.
    fn platform(&self, deadline: Instant) -> PlatformMeta {
        let url = format!("{}/metadata/instance?api-version=2021-01-01", self.base);
        let doc =
            match self
                .client
                .call("the instance metadata", deadline, &[410, 429], None, &|a| {
                    a.get(&url).set("Metadata", "true")
                }) {
                Ok(Outcome::Body(b)) => serde_json::from_slice::<serde_json::Value>(&b).ok(),
                Ok(Outcome::Status(c)) => {
                    crate::log::info(&format!(
                        "azure: GET /metadata/instance answered HTTP {c} (left out)"
                    ));
                    None
                }
                Err(e) => {
                    crate::log::info(&format!("{e} (left out)"));
                    None
                }
            };
        doc.map(|d| instance_platform(&d)).unwrap_or_default()
    }
}

/// The platform facts of an Azure IMDS instance document.
pub fn instance_platform(doc: &serde_json::Value) -> PlatformMeta {
    let c = &doc["compute"];
    let s = |v: &serde_json::Value| {
        v.as_str()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
    };
    let mut private_ips = Vec::new();
    let mut public_ips = Vec::new();
    for nic in doc["network"]["interface"].as_array().into_iter().flatten() {
        for family in ["ipv4", "ipv6"] {
            for a in nic[family]["ipAddress"].as_array().into_iter().flatten() {
                private_ips.extend(s(&a["privateIpAddress"]));
                public_ips.extend(s(&a["publicIpAddress"]));
            }
        }
    }
    PlatformMeta {
        hostname: s(&c["name"]).and_then(|h| super::platform_hostname(&h)),
        // Every key given at creation, whatever user's path it names: the
        // image's admin user is the one that logs in.
        ssh_keys: c["publicKeys"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|k| s(&k["keyData"]))
            .flat_map(|k| super::public_keys_value(&serde_json::Value::String(k)))
            .collect(),
        instance_type: s(&c["vmSize"]),
        region: s(&c["location"]),
        zone: s(&c["zone"]),
        private_ips,
        public_ips,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_document_gives_name_keys_size_location_and_addresses() {
        let doc = serde_json::json!({
            "compute": {
                "name": "ceo-engine", "vmSize": "Standard_D4s_v5", "location": "westeurope", "zone": "",
                "publicKeys": [{"keyData": "ssh-ed25519 AAAA1 azureuser\r\n", "path": "/home/azureuser/.ssh/authorized_keys"}],
            },
            "network": {"interface": [{"ipv4": {"ipAddress": [{"privateIpAddress": "10.1.0.4", "publicIpAddress": "20.30.40.50"}]},
                                        "ipv6": {"ipAddress": []}}]}
        });
        let p = instance_platform(&doc);
        assert_eq!(p.hostname.as_deref(), Some("ceo-engine"));
        assert_eq!(p.ssh_keys, ["ssh-ed25519 AAAA1 azureuser"]);
        assert_eq!(p.instance_type.as_deref(), Some("Standard_D4s_v5"));
        assert_eq!(p.region.as_deref(), Some("westeurope"));
        assert_eq!(p.zone, None, "an empty zone is no zone");
        assert_eq!(p.private_ips, ["10.1.0.4"]);
        assert_eq!(p.public_ips, ["20.30.40.50"]);
        assert_eq!(
            instance_platform(&serde_json::json!({})),
            PlatformMeta::default()
        );
    }
}
