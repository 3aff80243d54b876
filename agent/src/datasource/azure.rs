//! Azure IMDS (`Metadata: true`): userData comes base64-encoded; 404, 410, 429
//! and 5xx are retried (IMDS answers them while the VM is still being set up).
//!
//! And the provisioning "ready" report to the wireserver, as WALinuxAgent,
//! cloud-init and afterburn's `--check-in` make it: read the goal state
//! (`GET /machine/?comp=goalstate`), post a `Health` document with state
//! `Ready` for its incarnation, container and role instance (`POST
//! /machine/?comp=health`). Without it Azure marks the deployment failed
//! once its provisioning timeout is over, though the VM runs.

use super::retry::{Outcome, RetryClient};
use super::{Datasource, DsError, LaunchData, PlatformMeta};
use base64::Engine;
use std::time::Instant;

pub struct AzureSource {
    base: String,
    pub client: RetryClient,
}

const API: &str = "api-version=2021-01-01&format=text";

/// Azure's wireserver (the "fabric"): the same address in every region.
pub const WIRESERVER_ADDR: &str = "168.63.129.16";
/// The wireserver protocol version the goal state and health report speak.
const WIRESERVER_VERSION: &str = "2012-11-30";
/// Who reports, in `x-ms-agent-name`.
const AGENT_NAME: &str = "aiw-agent";

/// What the ready report needs from the goal state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoalState {
    pub incarnation: String,
    pub container_id: String,
    pub instance_id: String,
}

/// The goal state XML's incarnation, container and (first) role instance.
pub fn parse_goal_state(xml: &str) -> Result<GoalState, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("goal state is not XML: {e}"))?;
    let root = doc.root_element();
    if root.tag_name().name() != "GoalState" {
        return Err(format!(
            "goal state: root element <{}>, expected <GoalState>",
            root.tag_name().name()
        ));
    }
    // The first element named `name` on the path of names below `from`.
    let text_at = |path: &[&str]| -> Option<String> {
        let mut node = root;
        for name in path {
            node = node
                .children()
                .find(|c| c.is_element() && c.tag_name().name() == *name)?;
        }
        node.text()
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(String::from)
    };
    let need = |path: &[&str]| {
        text_at(path).ok_or_else(|| format!("goal state has no {}", path.join("/")))
    };
    Ok(GoalState {
        incarnation: need(&["Incarnation"])?,
        container_id: need(&["Container", "ContainerId"])?,
        instance_id: need(&[
            "Container",
            "RoleInstanceList",
            "RoleInstance",
            "InstanceId",
        ])?,
    })
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The `Health` document saying the role instance is `Ready`.
pub fn ready_report(g: &GoalState) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n\
<Health xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" xmlns:xsd=\"http://www.w3.org/2001/XMLSchema\">\n\
  <GoalStateIncarnation>{}</GoalStateIncarnation>\n\
  <Container>\n\
    <ContainerId>{}</ContainerId>\n\
    <RoleInstanceList>\n\
      <Role>\n\
        <InstanceId>{}</InstanceId>\n\
        <Health>\n\
          <State>Ready</State>\n\
        </Health>\n\
      </Role>\n\
    </RoleInstanceList>\n\
  </Container>\n\
</Health>\n",
        xml_escape(&g.incarnation),
        xml_escape(&g.container_id),
        xml_escape(&g.instance_id)
    )
}

/// Tells the wireserver at `base` this VM is provisioned (goal state, then
/// the ready report), retrying until `deadline`; says what was reported.
pub fn report_ready(base: &str, deadline: Instant) -> Result<String, String> {
    let base = base.trim_end_matches('/');
    let client = RetryClient::new("azure wireserver");
    let retry_on = [404, 410, 429, 500, 502, 503, 504];
    let goal_url = format!("{base}/machine/?comp=goalstate");
    let xml = match client
        .call("the goal state", deadline, &retry_on, None, &|a| {
            a.get(&goal_url)
                .set("x-ms-version", WIRESERVER_VERSION)
                .set("x-ms-agent-name", AGENT_NAME)
        })
        .map_err(|e| e.to_string())?
    {
        Outcome::Body(b) => String::from_utf8_lossy(&b).into_owned(),
        Outcome::Status(c) => {
            return Err(format!("GET /machine/?comp=goalstate answered HTTP {c}"))
        }
    };
    let goal = parse_goal_state(&xml)?;
    let body = ready_report(&goal);
    let health_url = format!("{base}/machine/?comp=health");
    match client
        .call(
            "the ready report",
            deadline,
            &retry_on,
            Some(body.as_bytes()),
            &|a| {
                a.post(&health_url)
                    .set("x-ms-version", WIRESERVER_VERSION)
                    .set("x-ms-agent-name", AGENT_NAME)
                    .set("Content-Type", "text/xml;charset=utf-8")
            },
        )
        .map_err(|e| e.to_string())?
    {
        Outcome::Body(_) => Ok(format!(
            "reported Ready to the Azure wireserver (incarnation {}, instance {})",
            goal.incarnation, goal.instance_id
        )),
        Outcome::Status(c) => Err(format!("POST /machine/?comp=health answered HTTP {c}")),
    }
}

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

    const GOAL_STATE: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<GoalState xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:noNamespaceSchemaLocation="goalstate10.xsd">
  <Version>2012-11-30</Version>
  <Incarnation>7</Incarnation>
  <Machine><ExpectedState>Started</ExpectedState></Machine>
  <Container>
    <ContainerId>a1b2c3d4-0000-4000-8000-000000000001</ContainerId>
    <RoleInstanceList>
      <RoleInstance>
        <InstanceId>e5f6.ceo-engine_0</InstanceId>
        <State>Started</State>
      </RoleInstance>
    </RoleInstanceList>
  </Container>
</GoalState>"#;

    #[test]
    fn goal_state_gives_incarnation_container_and_instance() {
        let g = parse_goal_state(GOAL_STATE).unwrap();
        assert_eq!(
            g,
            GoalState {
                incarnation: "7".into(),
                container_id: "a1b2c3d4-0000-4000-8000-000000000001".into(),
                instance_id: "e5f6.ceo-engine_0".into(),
            }
        );
        let report = ready_report(&g);
        let doc = roxmltree::Document::parse(&report).unwrap();
        let text = |n: &str| {
            doc.descendants()
                .find(|x| x.tag_name().name() == n)
                .and_then(|x| x.text())
                .unwrap_or_default()
                .to_string()
        };
        assert_eq!(text("GoalStateIncarnation"), "7");
        assert_eq!(text("ContainerId"), g.container_id);
        assert_eq!(text("InstanceId"), g.instance_id);
        assert_eq!(text("State"), "Ready");
    }

    #[test]
    fn odd_goal_states_are_refused_or_escaped() {
        assert!(parse_goal_state("not xml").unwrap_err().contains("not XML"));
        assert!(parse_goal_state("<Health/>")
            .unwrap_err()
            .contains("<GoalState>"));
        let no_instance = GOAL_STATE.replace("<InstanceId>e5f6.ceo-engine_0</InstanceId>", "");
        assert!(parse_goal_state(&no_instance)
            .unwrap_err()
            .contains("RoleInstance/InstanceId"));
        // A value with markup in it stays text in the report.
        let hostile = GOAL_STATE.replace("e5f6.ceo-engine_0", "x&lt;/InstanceId&gt;&lt;State&gt;");
        let g = parse_goal_state(&hostile).unwrap();
        assert_eq!(g.instance_id, "x</InstanceId><State>");
        let report = ready_report(&g);
        let doc = roxmltree::Document::parse(&report).unwrap();
        assert_eq!(
            doc.descendants()
                .filter(|x| x.has_tag_name("State"))
                .count(),
            1
        );
    }

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
