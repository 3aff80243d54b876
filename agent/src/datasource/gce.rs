//! Google Compute Engine metadata server (`Metadata-Flavor: Google`), reached
//! by its IP so no DNS is needed; user-data is the `user-data` attribute.

use super::retry::{Outcome, RetryClient};
use super::{Datasource, DsError, LaunchData};
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
        })
    }
}
