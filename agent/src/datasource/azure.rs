//! Azure IMDS (`Metadata: true`): userData comes base64-encoded; 404, 410, 429
//! and 5xx are retried (IMDS answers them while the VM is still being set up).

use super::retry::{Outcome, RetryClient};
use super::{Datasource, DsError, LaunchData};
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
        })
    }
}
