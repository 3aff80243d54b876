//! TEST DOUBLES of the cloud instance metadata services (EC2 IMDSv2, GCE
//! metadata server, Azure IMDS), served on 127.0.0.1 and reached from a guest
//! at 169.254.169.254:80 through a QEMU guest forward ([`metadata_net`]).
//!
//! Each implements its service's real protocol as far as a guest's first boot
//! uses it, including the refusals: EC2 answers 401 to a GET without a valid
//! session token; GCE answers 403 without `Metadata-Flavor: Google`; Azure
//! answers 400 without `Metadata: true` or `api-version`; all three refuse a
//! request carrying `X-Forwarded-For` (what keeps proxies from reaching them).
//! Every request and its answer is recorded so tests can show the flow.
//!
//! Besides user-data, each serves the platform metadata a guest agent reads
//! ([`InstanceFacts`]: a hostname, SSH keys, instance type, region/zone,
//! addresses) where its service does: EC2 `meta-data/*`, GCE `instance/*` and
//! `project/attributes/*`, Azure's `/metadata/instance` document. Azure's
//! wireserver (168.63.129.16: goal state and the VM's "ready" health report)
//! is a double of its own, reached through [`azure_net`].

use crate::netdev::{UserNet, LOOPBACK};
use anyhow::{Context, Result};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Where every cloud puts its metadata service.
pub const METADATA_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// Where a guest on [`metadata_net`] finds the Edge API test controller.
pub const CONTROLLER_ADDR_LINK_LOCAL: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 100);

/// A restricted user network (169.254.0.0/16) whose guest reaches
/// 169.254.169.254:80 → `127.0.0.1:metadata_port` and, when given,
/// [`CONTROLLER_ADDR_LINK_LOCAL`]:9000 → `127.0.0.1:controller_port`.
pub fn metadata_net(metadata_port: Option<u16>, controller_port: Option<u16>) -> Result<UserNet> {
    let mut net = UserNet::new().with_network(Ipv4Addr::new(169, 254, 0, 0), 16)?;
    if let Some(p) = metadata_port {
        net.forward_to_host(METADATA_ADDR, 80, p)?;
    }
    with_controller(net, controller_port)
}

/// `net` with [`CONTROLLER_ADDR_LINK_LOCAL`]:9000 → `127.0.0.1:controller_port` when given.
fn with_controller(mut net: UserNet, controller_port: Option<u16>) -> Result<UserNet> {
    if let Some(p) = controller_port {
        net.forward_to_host(
            CONTROLLER_ADDR_LINK_LOCAL,
            crate::node::CONTROLLER_GUEST_PORT,
            p,
        )?;
    }
    Ok(net)
}

/// Azure's wireserver address (the same in every region).
pub const WIRESERVER_ADDR: Ipv4Addr = Ipv4Addr::new(168, 63, 129, 16);

/// [`metadata_net`] widened to 168.0.0.0/7 (QEMU forwards only addresses
/// inside the user network, and this one holds both 169.254.169.254 and
/// Azure's wireserver), with 168.63.129.16:80 → `127.0.0.1:wireserver_port`.
pub fn azure_net(
    metadata_port: u16,
    wireserver_port: u16,
    controller_port: Option<u16>,
) -> Result<UserNet> {
    let mut net = UserNet::new().with_network(Ipv4Addr::new(168, 0, 0, 0), 7)?;
    net.forward_to_host(METADATA_ADDR, 80, metadata_port)?;
    net.forward_to_host(WIRESERVER_ADDR, 80, wireserver_port)?;
    with_controller(net, controller_port)
}

/// `AIWARE_CONTROLLER` for a guest on [`metadata_net`].
pub fn controller_url_link_local() -> String {
    format!(
        "http://{CONTROLLER_ADDR_LINK_LOCAL}:{}{}",
        crate::node::CONTROLLER_GUEST_PORT,
        crate::edge_controller::BASE_PATH
    )
}

/// Which service the double plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cloud {
    Ec2,
    Gce,
    Azure,
    /// Azure's wireserver (168.63.129.16): the goal state and the health
    /// ("ready") reports a provisioned VM posts.
    AzureWireServer,
}

/// One request the double answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    /// Path with the query string.
    pub target: String,
    pub status: u16,
    /// Whether the request carried the service's credential header
    /// (EC2 token, `Metadata-Flavor: Google`, `Metadata: true`).
    pub credential: bool,
}

impl std::fmt::Display for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} -> {}{}",
            self.method,
            self.target,
            self.status,
            if self.credential {
                ""
            } else {
                " (no credential)"
            }
        )
    }
}

/// The platform metadata a double serves (defaults: [`InstanceFacts::of`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InstanceFacts {
    pub hostname: String,
    /// EC2: the key pair (index 0); GCE: instance `ssh-keys` as `aiware:key`
    /// lines; Azure: `compute.publicKeys`.
    pub ssh_keys: Vec<String>,
    /// GCE: the `ssh-keys` project attribute (the other clouds have none).
    pub project_ssh_keys: Vec<String>,
    pub instance_type: String,
    pub region: String,
    pub zone: String,
    pub private_ip: String,
    /// `None`: the instance has no public address (EC2 answers 404).
    pub public_ip: Option<String>,
}

/// A well-formed OpenSSH key no one holds the private half of: what the
/// doubles serve until a test gives its own (to log in with).
pub const DOUBLE_SSH_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGFpd2ltZy10ZXN0LWRvdWJsZS1ub3QtYS1yZWFsLWtleQ aiwimg-double";
/// GCE's project-wide key of the double.
pub const GCE_PROJECT_SSH_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGFpd2ltZy1nY2UtcHJvamVjdC1rZXktbm90LXJlYWwx project-admin";

impl InstanceFacts {
    /// What each cloud's double says by default, in its own forms.
    pub fn of(cloud: Cloud) -> Self {
        match cloud {
            Cloud::Ec2 => InstanceFacts {
                hostname: "ip-172-31-5-10.ec2.internal".into(),
                ssh_keys: vec![DOUBLE_SSH_KEY.into()],
                project_ssh_keys: vec![],
                instance_type: "m5.xlarge".into(),
                region: "us-east-1".into(),
                zone: "us-east-1a".into(),
                private_ip: "172.31.5.10".into(),
                public_ip: Some("54.80.1.2".into()),
            },
            Cloud::Gce => InstanceFacts {
                hostname: "gce-engine.us-central1-a.c.aiwimg-test.internal".into(),
                ssh_keys: vec![DOUBLE_SSH_KEY.into()],
                project_ssh_keys: vec![GCE_PROJECT_SSH_KEY.into()],
                instance_type: "n2-standard-4".into(),
                region: "us-central1".into(),
                zone: "us-central1-a".into(),
                private_ip: "10.128.0.7".into(),
                public_ip: Some("34.66.1.2".into()),
            },
            Cloud::Azure | Cloud::AzureWireServer => InstanceFacts {
                hostname: "azure-engine".into(),
                ssh_keys: vec![DOUBLE_SSH_KEY.into()],
                project_ssh_keys: vec![],
                instance_type: "Standard_D4s_v5".into(),
                region: "westeurope".into(),
                zone: "1".into(),
                private_ip: "10.1.0.4".into(),
                public_ip: Some("20.50.1.2".into()),
            },
        }
    }
}

/// The numeric GCE project the double's `zones/` and `machineTypes/` paths name.
const GCE_PROJECT_NUMBER: &str = "123456789012";

#[derive(Default)]
struct State {
    user_data: Option<Vec<u8>>,
    facts: InstanceFacts,
    seen: Vec<Seen>,
    tokens: Vec<String>,
    /// Bodies of the wireserver's `POST /machine/?comp=health`.
    health_reports: Vec<String>,
    /// EC2 `spot/instance-action` (404 while `None`).
    spot_action: Option<String>,
    /// EC2 `events/maintenance/scheduled` (`[]` while `None`).
    scheduled_events: Option<String>,
}

/// A metadata service double on 127.0.0.1 (stops when dropped).
pub struct MetadataDouble {
    cloud: Cloud,
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

/// The instance ids the doubles report.
pub const EC2_INSTANCE_ID: &str = "i-0a1b2c3d4e5f60718";
pub const GCE_INSTANCE_ID: &str = "4520851231872618123";
pub const AZURE_VM_ID: &str = "3c5c6d8e-2a7b-4f1e-9d0a-5b6c7d8e9f01";

impl MetadataDouble {
    /// Serves `cloud`'s protocol on a free 127.0.0.1 port, with `user_data`
    /// (`None`: the instance was launched without any).
    pub fn start(cloud: Cloud, user_data: Option<&[u8]>) -> Result<Self> {
        let listener = TcpListener::bind((LOOPBACK, 0))
            .context("binding the metadata service double on 127.0.0.1")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State {
            user_data: user_data.map(<[u8]>::to_vec),
            facts: InstanceFacts::of(cloud),
            ..State::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || {
                let counter = AtomicU64::new(1);
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            let _ = serve(cloud, s, &state, &counter);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            });
        }
        Ok(MetadataDouble {
            cloud,
            addr,
            state,
            stop,
        })
    }

    pub fn cloud(&self) -> Cloud {
        self.cloud
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces the user-data served from now on.
    pub fn set_user_data(&self, user_data: Option<&[u8]>) {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .user_data = user_data.map(<[u8]>::to_vec);
    }

    /// Replaces the platform metadata served from now on.
    pub fn set_instance_facts(&self, facts: InstanceFacts) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).facts = facts;
    }

    /// The SSH keys served as the instance's own (e.g. the test's key, to log in with).
    pub fn set_ssh_keys(&self, keys: &[&str]) {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .facts
            .ssh_keys = keys.iter().map(|k| k.to_string()).collect();
    }

    /// The platform metadata served now.
    pub fn instance_facts(&self) -> InstanceFacts {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .facts
            .clone()
    }

    /// Every request answered so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .seen
            .clone()
    }

    /// EC2: announces a spot interruption (`{"action": "terminate", "time":
    /// "..."}` at `spot/instance-action`), or withdraws it with `None`.
    pub fn set_spot_interruption(&self, action: Option<&str>) {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .spot_action = action.map(String::from);
    }

    /// EC2: the `events/maintenance/scheduled` document (a JSON array).
    pub fn set_scheduled_events(&self, events: &str) {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .scheduled_events = Some(events.to_string());
    }

    /// The health reports posted to the wireserver double, in order.
    pub fn health_reports(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .health_reports
            .clone()
    }

    /// The log as lines, for test output.
    pub fn log(&self) -> String {
        self.seen()
            .iter()
            .map(|s| format!("  {s}\n"))
            .collect::<String>()
    }
}

impl Drop for MetadataDouble {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

use crate::http_request::HttpRequest;

type Request = HttpRequest;

fn read_request(s: &TcpStream) -> Result<Request> {
    HttpRequest::read(s, 1 << 20)?.context("the client sent no request")
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Error",
    }
}

/// One connection, one request, one answer (`Connection: close`).
fn serve(cloud: Cloud, mut s: TcpStream, state: &Mutex<State>, counter: &AtomicU64) -> Result<()> {
    s.set_nonblocking(false)?;
    let req = read_request(&s)?;
    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
    let (status, body, credential, extra) = match cloud {
        Cloud::Ec2 => ec2(&req, &mut st, counter),
        Cloud::Gce => gce(&req, &st),
        Cloud::Azure => azure(&req, &st),
        Cloud::AzureWireServer => wireserver(&req, &mut st),
    };
    st.seen.push(Seen {
        method: req.method.clone(),
        target: req.target.clone(),
        status,
        credential,
    });
    drop(st);
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Length: {}\r\nContent-Type: text/plain\r\nConnection: close\r\n",
        reason(status),
        body.len()
    );
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    s.write_all(&body)?;
    s.flush()?;
    Ok(())
}

type Answer = (u16, Vec<u8>, bool, Vec<(&'static str, String)>);

/// The goal state's incarnation, container and role instance the wireserver
/// double serves (a ready report must name them).
pub const WIRESERVER_INCARNATION: &str = "3";
pub const WIRESERVER_CONTAINER_ID: &str = "9f0e1d2c-3b4a-4c5d-8e7f-a0b1c2d3e4f5";
pub const WIRESERVER_INSTANCE_ID: &str = "7d6c5b4a.azure-engine_0";

/// Azure's wireserver, the part a provisioning agent uses: every request
/// needs `x-ms-version` (its credential here); `GET /machine/?comp=goalstate`
/// answers the goal state XML, `POST /machine/?comp=health` takes a health
/// report (kept, see [`MetadataDouble::health_reports`]).
fn wireserver(req: &Request, st: &mut State) -> Answer {
    if req.header("x-ms-version").is_none_or(str::is_empty) {
        return (400, b"x-ms-version header required".to_vec(), false, vec![]);
    }
    match (req.method.as_str(), req.path(), req.query("comp")) {
        ("GET", "/machine/" | "/machine", Some("goalstate")) => (
            200,
            format!(
                "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n\
<GoalState xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" xsi:noNamespaceSchemaLocation=\"goalstate10.xsd\">\n\
  <Version>2012-11-30</Version>\n\
  <Incarnation>{WIRESERVER_INCARNATION}</Incarnation>\n\
  <Machine><ExpectedState>Started</ExpectedState><StopRolesDeadlineHint>300000</StopRolesDeadlineHint></Machine>\n\
  <Container>\n\
    <ContainerId>{WIRESERVER_CONTAINER_ID}</ContainerId>\n\
    <RoleInstanceList>\n\
      <RoleInstance>\n\
        <InstanceId>{WIRESERVER_INSTANCE_ID}</InstanceId>\n\
        <State>Started</State>\n\
      </RoleInstance>\n\
    </RoleInstanceList>\n\
  </Container>\n\
</GoalState>\n"
            )
            .into_bytes(),
            true,
            vec![],
        ),
        ("POST", "/machine/" | "/machine", Some("health")) => {
            st.health_reports
                .push(String::from_utf8_lossy(&req.body).into_owned());
            (200, vec![], true, vec![])
        }
        _ => (404, vec![], true, vec![]),
    }
}

/// EC2 IMDSv2 (tokens required, as on instances launched with
/// `HttpTokens=required`): PUT /latest/api/token with a TTL of 1..=21600 s
/// gives a token; every GET needs it in `X-aws-ec2-metadata-token`.
fn ec2(req: &Request, st: &mut State, counter: &AtomicU64) -> Answer {
    const TTL: &str = "X-aws-ec2-metadata-token-ttl-seconds";
    const TOKEN: &str = "X-aws-ec2-metadata-token";
    if req.header("X-Forwarded-For").is_some() {
        return (403, b"Forbidden".to_vec(), false, vec![]);
    }
    if req.method == "PUT" && req.path() == "/latest/api/token" {
        let ttl: Option<u32> = req.header(TTL).and_then(|v| v.parse().ok());
        return match ttl {
            Some(t @ 1..=21600) => {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let token = format!("AQAEAaiwimgTestDoubleToken{n:08}==");
                st.tokens.push(token.clone());
                (200, token.into_bytes(), true, vec![(TTL, t.to_string())])
            }
            _ => (400, b"Bad Request".to_vec(), false, vec![]),
        };
    }
    if req.method != "GET" {
        return (405, vec![], false, vec![]);
    }
    let valid = req
        .header(TOKEN)
        .is_some_and(|t| st.tokens.iter().any(|k| k == t));
    if !valid {
        return (401, b"Unauthorized".to_vec(), false, vec![]);
    }
    let f = &st.facts;
    let item = |v: Option<&str>| match v {
        Some(v) if !v.is_empty() => (200, v.as_bytes().to_vec(), true, vec![]),
        _ => (404, b"Not Found".to_vec(), true, vec![]),
    };
    match req.path() {
        "/latest/meta-data/local-hostname" => item(Some(&f.hostname)),
        "/latest/meta-data/public-keys/0/openssh-key" => {
            item(f.ssh_keys.first().map(String::as_str))
        }
        "/latest/meta-data/instance-type" => item(Some(&f.instance_type)),
        "/latest/meta-data/placement/region" => item(Some(&f.region)),
        "/latest/meta-data/placement/availability-zone" => item(Some(&f.zone)),
        "/latest/meta-data/local-ipv4" => item(Some(&f.private_ip)),
        "/latest/meta-data/public-ipv4" => item(f.public_ip.as_deref()),
        "/latest/meta-data/instance-id" => (200, EC2_INSTANCE_ID.into(), true, vec![]),
        "/latest/meta-data/spot/instance-action" => item(st.spot_action.as_deref()),
        "/latest/meta-data/events/maintenance/scheduled" => {
            item(Some(st.scheduled_events.as_deref().unwrap_or("[]")))
        }
        "/latest/user-data" => match &st.user_data {
            Some(u) => (200, u.clone(), true, vec![]),
            None => (404, b"Not Found".to_vec(), true, vec![]),
        },
        _ => (404, b"Not Found".to_vec(), true, vec![]),
    }
}

/// GCE metadata server: `Metadata-Flavor: Google` on every request (echoed
/// in every answer); user-data is the instance attribute `user-data`.
fn gce(req: &Request, st: &State) -> Answer {
    let flavor = vec![("Metadata-Flavor", "Google".to_string())];
    if req.header("X-Forwarded-For").is_some() {
        return (403, vec![], false, flavor);
    }
    if req.header("Metadata-Flavor") != Some("Google") {
        return (
            403,
            b"Missing Metadata-Flavor:Google header.".to_vec(),
            false,
            flavor,
        );
    }
    if req.method != "GET" {
        return (405, vec![], true, flavor);
    }
    let f = &st.facts;
    let lines = |keys: &[String]| {
        keys.iter()
            .map(|k| format!("aiware:{k}\n"))
            .collect::<String>()
    };
    let item = |v: Option<String>| match v {
        Some(v) if !v.is_empty() => (200, v.into_bytes(), true, flavor.clone()),
        _ => (404, vec![], true, flavor.clone()),
    };
    match req.path() {
        "/computeMetadata/v1/instance/hostname" => item(Some(f.hostname.clone())),
        "/computeMetadata/v1/instance/machine-type" => item(Some(format!(
            "projects/{GCE_PROJECT_NUMBER}/machineTypes/{}",
            f.instance_type
        ))),
        "/computeMetadata/v1/instance/zone" => item(Some(format!(
            "projects/{GCE_PROJECT_NUMBER}/zones/{}",
            f.zone
        ))),
        "/computeMetadata/v1/instance/network-interfaces/0/ip" => item(Some(f.private_ip.clone())),
        "/computeMetadata/v1/instance/network-interfaces/0/access-configs/0/external-ip" => {
            item(f.public_ip.clone())
        }
        "/computeMetadata/v1/instance/attributes/ssh-keys" => item(Some(lines(&f.ssh_keys))),
        "/computeMetadata/v1/project/attributes/ssh-keys" => item(Some(lines(&f.project_ssh_keys))),
        "/computeMetadata/v1/instance/id" => (200, GCE_INSTANCE_ID.into(), true, flavor),
        "/computeMetadata/v1/instance/attributes/user-data" => match &st.user_data {
            Some(u) => (200, u.clone(), true, flavor),
            None => (404, vec![], true, flavor),
        },
        _ => (404, vec![], true, flavor),
    }
}

/// Azure IMDS: `Metadata: true` and an `api-version` on every request;
/// `compute/userData` is base64 (empty when the VM has none).
fn azure(req: &Request, st: &State) -> Answer {
    let bad = |msg: &str| {
        (
            400,
            format!("{{ \"error\": \"{msg}\" }}").into_bytes(),
            false,
            vec![],
        )
    };
    if req.header("X-Forwarded-For").is_some() {
        return bad("Bad request. Request contains X-Forwarded-For header");
    }
    if req.header("Metadata") != Some("true") {
        return bad("Bad request. Required metadata header not specified");
    }
    if req.query("api-version").is_none_or(str::is_empty) {
        return bad("Bad request. api-version was not specified in the request");
    }
    if req.method != "GET" {
        return (405, vec![], true, vec![]);
    }
    match req.path() {
        "/metadata/instance" => (
            200,
            azure_instance_document(&st.facts).into_bytes(),
            true,
            vec![],
        ),
        "/metadata/instance/compute/vmId" => (200, AZURE_VM_ID.into(), true, vec![]),
        "/metadata/instance/compute/userData" => (
            200,
            st.user_data
                .as_deref()
                .map(base64)
                .unwrap_or_default()
                .into_bytes(),
            true,
            vec![],
        ),
        _ => (404, vec![], true, vec![]),
    }
}

/// The `/metadata/instance` JSON document (the parts a guest agent reads).
fn azure_instance_document(f: &InstanceFacts) -> String {
    let keys: Vec<serde_json::Value> = f
        .ssh_keys
        .iter()
        .map(|k| {
            serde_json::json!({"keyData": format!("{k}\r\n"), "path": "/home/azureuser/.ssh/authorized_keys"})
        })
        .collect();
    serde_json::json!({
        "compute": {
            "name": f.hostname, "vmId": AZURE_VM_ID, "vmSize": f.instance_type,
            "location": f.region, "zone": f.zone, "osType": "Linux",
            "osProfile": {"adminUsername": "azureuser", "computerName": f.hostname},
            "publicKeys": keys,
        },
        "network": {"interface": [{
            "ipv4": {"ipAddress": [{"privateIpAddress": f.private_ip,
                                    "publicIpAddress": f.public_ip.clone().unwrap_or_default()}],
                     "subnet": [{"address": "10.1.0.0", "prefix": "24"}]},
            "ipv6": {"ipAddress": []},
            "macAddress": "000D3A1B2C3D",
        }]},
    })
    .to_string()
}

/// Standard base64 with padding (what Azure and vSphere carry user-data in).
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Sends one raw HTTP request; returns (status, body).
    fn ask(
        d: &MetadataDouble,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
    ) -> (u16, String) {
        let mut s = TcpStream::connect(d.addr).unwrap();
        let mut req = format!("{method} {target} HTTP/1.1\r\nHost: 169.254.169.254\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if method == "PUT" {
            req.push_str("Content-Length: 0\r\n");
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let status = out[9..12].parse().unwrap();
        let body = out.split_once("\r\n\r\n").unwrap().1.to_string();
        (status, body)
    }

    #[test]
    fn ec2_refuses_gets_without_a_valid_token() {
        let d = MetadataDouble::start(Cloud::Ec2, Some(b"AIWARE_MODE=engine\n")).unwrap();
        assert_eq!(ask(&d, "GET", "/latest/user-data", &[]).0, 401);
        assert_eq!(
            ask(
                &d,
                "GET",
                "/latest/user-data",
                &[("X-aws-ec2-metadata-token", "forged")]
            )
            .0,
            401
        );
        assert_eq!(ask(&d, "PUT", "/latest/api/token", &[]).0, 400);
        let ttl = ("X-aws-ec2-metadata-token-ttl-seconds", "21600");
        assert_eq!(
            ask(
                &d,
                "PUT",
                "/latest/api/token",
                &[ttl, ("X-Forwarded-For", "1.2.3.4")]
            )
            .0,
            403
        );
        let (st, token) = ask(&d, "PUT", "/latest/api/token", &[ttl]);
        assert_eq!(st, 200);
        let auth = ("X-aws-ec2-metadata-token", token.as_str());
        assert_eq!(
            ask(&d, "GET", "/latest/user-data", &[auth]),
            (200, "AIWARE_MODE=engine\n".into())
        );
        assert_eq!(
            ask(&d, "GET", "/latest/meta-data/instance-id", &[auth]),
            (200, EC2_INSTANCE_ID.into())
        );
        d.set_user_data(None);
        assert_eq!(ask(&d, "GET", "/latest/user-data", &[auth]).0, 404);
        let seen = d.seen();
        assert_eq!(seen.len(), 8);
        assert_eq!(
            seen[0].to_string(),
            "GET /latest/user-data -> 401 (no credential)"
        );
    }

    #[test]
    fn gce_needs_the_metadata_flavor_header() {
        let d = MetadataDouble::start(Cloud::Gce, Some(b"#cloud-config\n")).unwrap();
        let ud = "/computeMetadata/v1/instance/attributes/user-data";
        assert_eq!(ask(&d, "GET", ud, &[]).0, 403);
        assert_eq!(
            ask(&d, "GET", ud, &[("Metadata-Flavor", "Google")]),
            (200, "#cloud-config\n".into())
        );
        assert_eq!(
            ask(
                &d,
                "GET",
                ud,
                &[("Metadata-Flavor", "Google"), ("X-Forwarded-For", "x")]
            )
            .0,
            403
        );
        d.set_user_data(None);
        assert_eq!(ask(&d, "GET", ud, &[("Metadata-Flavor", "Google")]).0, 404);
    }

    #[test]
    fn azure_needs_metadata_true_and_an_api_version_and_answers_base64() {
        let d = MetadataDouble::start(Cloud::Azure, Some(b"#cloud-config\n")).unwrap();
        let ud = "/metadata/instance/compute/userData?api-version=2021-01-01&format=text";
        assert_eq!(ask(&d, "GET", ud, &[]).0, 400);
        assert_eq!(
            ask(
                &d,
                "GET",
                "/metadata/instance/compute/userData",
                &[("Metadata", "true")]
            )
            .0,
            400
        );
        assert_eq!(
            ask(&d, "GET", ud, &[("Metadata", "true")]),
            (200, "I2Nsb3VkLWNvbmZpZwo=".into())
        );
        d.set_user_data(None);
        assert_eq!(
            ask(&d, "GET", ud, &[("Metadata", "true")]),
            (200, String::new())
        );
    }

    #[test]
    fn each_double_serves_hostname_keys_and_instance_facts() {
        let d = MetadataDouble::start(Cloud::Ec2, None).unwrap();
        let ttl = ("X-aws-ec2-metadata-token-ttl-seconds", "60");
        let (_, token) = ask(&d, "PUT", "/latest/api/token", &[ttl]);
        let auth = [("X-aws-ec2-metadata-token", token.as_str())];
        let get = |p: &str| ask(&d, "GET", &format!("/latest/meta-data/{p}"), &auth);
        assert_eq!(
            get("local-hostname"),
            (200, "ip-172-31-5-10.ec2.internal".into())
        );
        assert_eq!(
            get("public-keys/0/openssh-key"),
            (200, DOUBLE_SSH_KEY.into())
        );
        assert_eq!(get("instance-type"), (200, "m5.xlarge".into()));
        assert_eq!(
            get("placement/availability-zone"),
            (200, "us-east-1a".into())
        );
        assert_eq!(get("public-ipv4"), (200, "54.80.1.2".into()));
        d.set_instance_facts(InstanceFacts {
            public_ip: None,
            ..InstanceFacts::of(Cloud::Ec2)
        });
        d.set_ssh_keys(&[]);
        assert_eq!(get("public-ipv4").0, 404);
        assert_eq!(get("public-keys/0/openssh-key").0, 404);
        assert_eq!(get("instance-id").0, 200, "unchanged");

        let g = MetadataDouble::start(Cloud::Gce, None).unwrap();
        let google = [("Metadata-Flavor", "Google")];
        let get = |p: &str| ask(&g, "GET", &format!("/computeMetadata/v1/{p}"), &google);
        assert_eq!(
            get("instance/zone"),
            (200, "projects/123456789012/zones/us-central1-a".into())
        );
        assert_eq!(
            get("instance/machine-type"),
            (
                200,
                "projects/123456789012/machineTypes/n2-standard-4".into()
            )
        );
        assert_eq!(
            get("instance/attributes/ssh-keys"),
            (200, format!("aiware:{DOUBLE_SSH_KEY}\n"))
        );
        assert_eq!(
            get("project/attributes/ssh-keys"),
            (200, format!("aiware:{GCE_PROJECT_SSH_KEY}\n"))
        );
        assert_eq!(get("instance/attributes/sshKeys").0, 404);
        assert_eq!(
            ask(&g, "GET", "/computeMetadata/v1/instance/hostname", &[]).0,
            403
        );

        let a = MetadataDouble::start(Cloud::Azure, None).unwrap();
        let (st, doc) = ask(
            &a,
            "GET",
            "/metadata/instance?api-version=2021-01-01",
            &[("Metadata", "true")],
        );
        assert_eq!(st, 200);
        let doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
        assert_eq!(doc["compute"]["name"], "azure-engine");
        assert_eq!(doc["compute"]["vmSize"], "Standard_D4s_v5");
        assert_eq!(
            doc["compute"]["publicKeys"][0]["keyData"],
            format!("{DOUBLE_SSH_KEY}\r\n")
        );
        assert_eq!(
            doc["network"]["interface"][0]["ipv4"]["ipAddress"][0]["publicIpAddress"],
            "20.50.1.2"
        );
        assert_eq!(
            ask(&a, "GET", "/metadata/instance", &[("Metadata", "true")]).0,
            400
        );
    }

    #[test]
    fn base64_matches_the_standard_alphabet_and_padding() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(
            base64(b"AIWARE_MODE=engine\n"),
            "QUlXQVJFX01PREU9ZW5naW5lCg=="
        );
    }

    #[test]
    fn the_metadata_net_reaches_only_loopback_doubles() {
        let net = metadata_net(Some(4001), Some(4002)).unwrap();
        let arg = net.netdev_arg("n");
        assert!(arg.contains("restrict=on,net=169.254.0.0/16"), "{arg}");
        assert!(
            arg.contains("guestfwd=tcp:169.254.169.254:80-cmd:socat - TCP:127.0.0.1:4001"),
            "{arg}"
        );
        assert!(
            arg.contains("guestfwd=tcp:169.254.0.100:9000-cmd:socat - TCP:127.0.0.1:4002"),
            "{arg}"
        );
        assert_eq!(
            controller_url_link_local(),
            "http://169.254.0.100:9000/edge/v1"
        );
    }
}
