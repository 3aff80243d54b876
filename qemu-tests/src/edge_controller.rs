//! Edge API test controller: a test double of the proprietary aiWARE controller.
//!
//! It implements the subset of the Edge API that host membership uses
//! (`shared/edge-api/openapi-subset.yaml`), under the base path `/edge/v1`:
//!
//! - `GET  /edge/v1/version`                 (no token needed, as the guide's curl shows)
//! - `POST /edge/v1/host/register`           (bearer: the init token)
//! - `POST /edge/v1/host/{HostID}/updatestatus` (bearer: that host's token or the init token)
//! - `GET  /edge/v1/hosts`                   (bearer: the init token or any host token)
//! - `POST /edge/v1/host/{HostID}/drain|pause|resume|terminate` (bearer: the init
//!   token, as an admin): sets the host's mode, sent in every later reply
//!   (`resume` sets `continue`)
//! - `POST /edge/v1/test-only/host/{HostID}/actions` (bearer: the init token):
//!   NOT in the Edge API, for tests only: a `HostAction` fragment
//!   (`launchContainer[]`, `terminateContainer[]`, `pullDockerImages[]`,
//!   `registries[]`, ...) queued for that host
//!
//! The controller's side of host actions: each host has a mode and a queue of
//! actions; the reply to its next updatestatus carries the mode and everything
//! queued (lists concatenated), and empties the queue. Every status report is
//! kept ([`HostRecord::statuses`]).
//!
//! It records what each host sent, answers registration with a hostID, a
//! hostToken and the NFS cache (`mount[]` with `local_path`), re-registers a
//! known `info.hostID` as the same host, and can be made to refuse connections
//! ([`EdgeTestController::set_down`]) or to answer 401 to everything
//! ([`EdgeTestController::set_unauthorized`]).
//!
//! The HTTP/1.1 server is deliberately tiny (one thread per connection,
//! `Content-Length` bodies, `Connection: close`), enough for agents and curl.

use crate::http_request::HttpRequest;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Base path of the Edge API, as in the guide's `AIWARE_CONTROLLER=http://IP:9000/edge/v1`.
pub const BASE_PATH: &str = "/edge/v1";
/// Answer of `GET /version`, in the guide's format.
pub const VERSION_TEXT: &str = "Build number: edge-test-controller, Build time: 2021-04-27_19:30:26, Build commit hash: test-double";

/// The NFS cache the controller tells hosts to mount (`HostMountInfo`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NfsCache {
    pub ips: Vec<String>,
    pub server_path: String,
    pub local_path: String,
    pub options: String,
    pub port: u16,
    pub cache_number: u32,
    pub priority: u32,
}

impl Default for NfsCache {
    fn default() -> Self {
        NfsCache {
            ips: vec!["127.0.0.1".into()],
            server_path: "/opt/aiware/nfs".into(),
            local_path: "/cache".into(),
            options: "nfsvers=4,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,noresvport"
                .into(),
            port: 2049,
            cache_number: 0,
            priority: 10,
        }
    }
}

/// What the controller knows about one host.
#[derive(Debug, Clone, Serialize)]
pub struct HostRecord {
    pub host_id: String,
    #[serde(skip)]
    pub host_token: String,
    /// How many times `/host/register` was called for this host.
    pub registrations: u32,
    /// The last `HostRegisterRequest` body.
    pub register_request: Value,
    /// Every `HostStatus` body received, oldest first.
    pub statuses: Vec<Value>,
    pub created_unix: u64,
    pub last_update_unix: u64,
    /// `continue`, `drain`, `pause` or `terminate`: in every reply.
    pub mode: String,
    /// Actions for the reply to the next updatestatus.
    pub queued: Vec<Value>,
    /// Every admin request (`drain`, `pause`, ...) with its body, oldest first.
    pub admin_requests: Vec<(String, Value)>,
}

impl HostRecord {
    fn new(host_id: String, host_token: String, now: u64) -> Self {
        HostRecord {
            host_id,
            host_token,
            registrations: 0,
            register_request: Value::Null,
            statuses: Vec::new(),
            created_unix: now,
            last_update_unix: now,
            mode: "continue".into(),
            queued: Vec::new(),
            admin_requests: Vec::new(),
        }
    }

    /// The `HostAction` for the next reply: the mode and every queued action; empties the queue.
    fn take_action(&mut self) -> Value {
        let mut out = serde_json::Map::new();
        for a in self.queued.drain(..) {
            let Value::Object(m) = a else { continue };
            for (k, v) in m {
                match (out.get_mut(&k), v) {
                    (Some(Value::Array(have)), Value::Array(more)) => have.extend(more),
                    (_, v) => {
                        out.insert(k, v);
                    }
                }
            }
        }
        out.insert("mode".into(), json!(self.mode));
        Value::Object(out)
    }

    /// `info.runModes` as sent at registration.
    pub fn run_modes(&self) -> Vec<String> {
        self.register_request["info"]["runModes"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[derive(Default)]
struct State {
    hosts: BTreeMap<String, HostRecord>,
    nfs: Option<NfsCache>,
    unauthorized: bool,
    requests: u64,
    /// Where the host list is kept across restarts (see [`EdgeTestController::keep_state_in`]).
    state_file: Option<std::path::PathBuf>,
}

/// One host as kept in the state file: what the real controller keeps in its
/// database (the token included, so hosts' tokens stay valid across restarts).
#[derive(Serialize, Deserialize)]
struct KeptHost {
    host_id: String,
    host_token: String,
    registrations: u32,
    register_request: Value,
    #[serde(default)]
    last_status: Option<Value>,
    #[serde(default)]
    mode: Option<String>,
    created_unix: u64,
    last_update_unix: u64,
}

impl State {
    fn save(&self) -> std::io::Result<()> {
        let Some(path) = &self.state_file else {
            return Ok(());
        };
        let kept: Vec<KeptHost> = self
            .hosts
            .values()
            .map(|h| KeptHost {
                host_id: h.host_id.clone(),
                host_token: h.host_token.clone(),
                registrations: h.registrations,
                register_request: h.register_request.clone(),
                last_status: h.statuses.last().cloned(),
                mode: Some(h.mode.clone()),
                created_unix: h.created_unix,
                last_update_unix: h.last_update_unix,
            })
            .collect();
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&kept)?)?;
        std::fs::rename(&tmp, path)
    }
}

struct Shared {
    init_token: String,
    state: Mutex<State>,
    changed: Condvar,
}

/// A running Edge API test controller. Dropping it stops it.
pub struct EdgeTestController {
    shared: Arc<Shared>,
    addr: SocketAddr,
    acceptor: Mutex<Option<Acceptor>>,
}

struct Acceptor {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl EdgeTestController {
    /// Starts listening on `addr` (use `127.0.0.1:0` in tests for a free port).
    pub fn start(addr: &str, init_token: &str) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            init_token: init_token.to_string(),
            state: Mutex::new(State {
                nfs: Some(NfsCache::default()),
                ..State::default()
            }),
            changed: Condvar::new(),
        });
        let acceptor = spawn_acceptor(listener, shared.clone());
        Ok(EdgeTestController {
            shared,
            addr,
            acceptor: Mutex::new(Some(acceptor)),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The value for `AIWARE_CONTROLLER`: `http://ADDR/edge/v1`.
    pub fn url(&self) -> String {
        format!("http://{}{}", self.addr, BASE_PATH)
    }

    /// Down: the port is closed (connections refused). Up: it listens again on the same port.
    pub fn set_down(&self, down: bool) {
        let mut acc = self.acceptor.lock().unwrap();
        if down {
            if let Some(a) = acc.take() {
                a.stop.store(true, Ordering::SeqCst);
                // Wake the blocking accept so the listener is dropped now.
                let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
                let _ = a.thread.join();
            }
        } else if acc.is_none() {
            let mut tries = 0;
            let listener = loop {
                match TcpListener::bind(self.addr) {
                    Ok(l) => break l,
                    Err(e) if tries < 50 => {
                        tries += 1;
                        let _ = e;
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(e) => panic!("edge test controller cannot re-bind {}: {e}", self.addr),
                }
            };
            *acc = Some(spawn_acceptor(listener, self.shared.clone()));
        }
    }

    /// When set, every request needing a token is answered 401.
    pub fn set_unauthorized(&self, on: bool) {
        self.shared.state.lock().unwrap().unauthorized = on;
    }

    /// Keeps the host list (hostIDs, tokens, what hosts sent last) in `path`,
    /// as the real controller keeps it in its database: hosts already there are
    /// loaded now, and every registration or status report rewrites it. A
    /// restarted controller thus knows its hosts, their IDs and tokens.
    pub fn keep_state_in(&self, path: &std::path::Path) -> std::io::Result<usize> {
        let mut st = self.shared.state.lock().unwrap();
        if path.exists() {
            let kept: Vec<KeptHost> = serde_json::from_slice(&std::fs::read(path)?)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            for k in kept {
                let mut h = HostRecord::new(k.host_id.clone(), k.host_token, k.created_unix);
                h.registrations = k.registrations;
                h.register_request = k.register_request;
                h.statuses = k.last_status.into_iter().collect();
                h.last_update_unix = k.last_update_unix;
                h.mode = k.mode.unwrap_or_else(|| "continue".into());
                st.hosts.insert(k.host_id, h);
            }
        }
        st.state_file = Some(path.to_path_buf());
        st.save()?;
        Ok(st.hosts.len())
    }

    /// The NFS cache given in registration replies; `None` gives no mount.
    pub fn set_nfs_cache(&self, nfs: Option<NfsCache>) {
        self.shared.state.lock().unwrap().nfs = nfs;
    }

    /// Every host registered so far, by hostID.
    pub fn hosts(&self) -> Vec<HostRecord> {
        self.shared
            .state
            .lock()
            .unwrap()
            .hosts
            .values()
            .cloned()
            .collect()
    }

    /// Queues a `HostAction` fragment (e.g. `{"launchContainer": [...]}`) for
    /// the reply to `host_id`'s next updatestatus. False: no such host.
    pub fn queue_actions(&self, host_id: &str, action: Value) -> bool {
        let mut st = self.shared.state.lock().unwrap();
        match st.hosts.get_mut(host_id) {
            Some(h) => {
                h.queued.push(action);
                true
            }
            None => false,
        }
    }

    /// Sets the mode sent to `host_id` in every later reply, as the admin endpoints do.
    pub fn set_mode(&self, host_id: &str, mode: &str) -> bool {
        let mut st = self.shared.state.lock().unwrap();
        match st.hosts.get_mut(host_id) {
            Some(h) => {
                h.mode = mode.to_string();
                true
            }
            None => false,
        }
    }

    /// Every status report `host_id` sent, oldest first.
    pub fn statuses(&self, host_id: &str) -> Vec<Value> {
        let st = self.shared.state.lock().unwrap();
        st.hosts
            .get(host_id)
            .map(|h| h.statuses.clone())
            .unwrap_or_default()
    }

    /// Waits until `pred` holds for some status report of `host_id` sent
    /// after the first `after` ones; returns that report.
    pub fn wait_for_status(
        &self,
        host_id: &str,
        after: usize,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        let mut found = None;
        self.wait_for(timeout, |hosts| {
            found = hosts
                .iter()
                .find(|h| h.host_id == host_id)
                .and_then(|h| h.statuses.iter().skip(after).find(|s| pred(s)).cloned());
            found.is_some()
        });
        found
    }

    /// `GET /edge/v1/hosts` as a client sees it (over loopback, with the
    /// init token): the `HostDetail` list the controller serves.
    pub fn list_hosts(&self) -> std::io::Result<Vec<Value>> {
        let (code, v) = http(
            self.addr,
            "GET",
            "/edge/v1/hosts",
            &self.shared.init_token,
            "",
        )?;
        if code != 200 {
            return Err(std::io::Error::other(format!(
                "GET /edge/v1/hosts answered {code}: {v}"
            )));
        }
        Ok(v["result"].as_array().cloned().unwrap_or_default())
    }

    /// Requests handled so far (any path, any answer).
    pub fn requests(&self) -> u64 {
        self.shared.state.lock().unwrap().requests
    }

    /// Waits until `pred` holds for the host list, or the timeout passes.
    pub fn wait_for(&self, timeout: Duration, mut pred: impl FnMut(&[HostRecord]) -> bool) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut st = self.shared.state.lock().unwrap();
        loop {
            let hosts: Vec<HostRecord> = st.hosts.values().cloned().collect();
            if pred(&hosts) {
                return true;
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap()
                .0;
        }
    }
}

impl Drop for EdgeTestController {
    fn drop(&mut self) {
        self.set_down(true);
    }
}

/// The Docker label aiw-agent puts the launchId in (`docker ps --filter label=...`).
pub const LAUNCH_LABEL: &str = "ai.veritone.aiware.launch-id";

/// The `containerStatus[]` entry of a `HostStatus` report for `launch`.
pub fn container_of(status: &Value, launch: &str) -> Option<Value> {
    status["containerStatus"]
        .as_array()?
        .iter()
        .find(|c| c["launchID"] == launch)
        .cloned()
}

/// The launchIDs a `HostStatus` report lists in `containerStatus[]`.
pub fn launch_ids(status: &Value) -> Vec<String> {
    status["containerStatus"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| c["launchID"].as_str().unwrap_or("").to_string())
        .collect()
}

fn spawn_acceptor(listener: TcpListener, shared: Arc<Shared>) -> Acceptor {
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let thread = std::thread::spawn(move || {
        for conn in listener.incoming() {
            if stop2.load(Ordering::SeqCst) {
                break;
            }
            if let Ok(stream) = conn {
                let shared = shared.clone();
                std::thread::spawn(move || {
                    let _ = serve_connection(stream, &shared);
                });
            }
        }
    });
    Acceptor { stop, thread }
}

type Request = HttpRequest;

fn read_request(stream: &TcpStream) -> std::io::Result<Option<Request>> {
    HttpRequest::read(stream, 16 << 20)
}

fn serve_connection(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let Some(req) = read_request(&stream)? else {
        return Ok(());
    };
    let (status, body) = handle(&req, shared);
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Error",
    };
    let body = body.to_string();
    write!(
        stream,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nX-Aiware-Version: {VERSION_TEXT}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

fn error(status: u16, id: &str, description: &str) -> (u16, Value) {
    (status, json!({"id": id, "description": description}))
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A random UUID v4 from the kernel's random source.
fn uuid_v4() -> String {
    let mut b = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn handle(req: &Request, shared: &Shared) -> (u16, Value) {
    let mut st = shared.state.lock().unwrap();
    st.requests += 1;
    let Some(path) = req.path().strip_prefix(BASE_PATH) else {
        return error(404, "not_found", "the Edge API lives under /edge/v1");
    };
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    if segs == ["version"] {
        return if req.method == "GET" {
            (200, json!({ "version": VERSION_TEXT }))
        } else {
            error(405, "method_not_allowed", "use GET")
        };
    }
    let token = req.bearer().unwrap_or("");
    let is_init = !token.is_empty() && token == shared.init_token;
    let host_of_token = st
        .hosts
        .values()
        .find(|h| h.host_token == token && !token.is_empty())
        .map(|h| h.host_id.clone());
    if st.unauthorized {
        return error(
            401,
            "not_authorized",
            "token rejected (test controller set to 401)",
        );
    }
    let result = match (req.method.as_str(), segs.as_slice()) {
        ("POST", ["host", "register"]) => {
            if !is_init {
                return error(401, "not_authorized", "register needs the init token");
            }
            let Ok(body) = serde_json::from_slice::<Value>(&req.body) else {
                return error(400, "bad_request", "body is not JSON");
            };
            let asked = body["info"]["hostID"].as_str().unwrap_or("").to_string();
            let now = now_unix();
            let host_id = if st.hosts.contains_key(&asked) {
                asked
            } else {
                uuid_v4()
            };
            let nfs = st.nfs.clone();
            let rec = st
                .hosts
                .entry(host_id.clone())
                .or_insert_with(|| HostRecord::new(host_id.clone(), uuid_v4(), now));
            rec.registrations += 1;
            rec.register_request = body;
            rec.last_update_unix = now;
            let mounts: Vec<Value> = nfs
                .iter()
                .map(|n| {
                    json!({
                        "mountType": "nfs", "ips": n.ips, "server_path": n.server_path,
                        "local_path": n.local_path, "options": n.options, "port": n.port,
                        "cache_number": n.cache_number, "priority": n.priority,
                    })
                })
                .collect();
            (
                200,
                json!({
                    "hostID": rec.host_id,
                    "hostToken": rec.host_token,
                    "mount": mounts,
                    "configProperties": { "localCacheDirectory": "/cache" },
                    "status": { "mode": rec.mode },
                }),
            )
        }
        ("POST", ["host", id, "updatestatus"]) => {
            let id = id.to_string();
            if !(is_init || host_of_token.as_deref() == Some(id.as_str())) {
                return error(
                    401,
                    "not_authorized",
                    "updatestatus needs this host's token",
                );
            }
            let Ok(body) = serde_json::from_slice::<Value>(&req.body) else {
                return error(400, "bad_request", "body is not JSON");
            };
            match st.hosts.get_mut(&id) {
                None => error(404, "not_found", "no such host; register first"),
                Some(rec) => {
                    rec.statuses.push(body);
                    rec.last_update_unix = now_unix();
                    (200, rec.take_action())
                }
            }
        }
        ("POST", ["host", id, op @ ("drain" | "pause" | "resume" | "terminate")]) => {
            if !is_init {
                return error(
                    401,
                    "not_authorized",
                    "admin operations need the init token",
                );
            }
            let body = serde_json::from_slice::<Value>(&req.body).unwrap_or(Value::Null);
            match st.hosts.get_mut(*id) {
                None => error(404, "not_found", "no such host"),
                Some(rec) => {
                    rec.mode = if *op == "resume" { "continue" } else { op }.to_string();
                    rec.admin_requests.push((op.to_string(), body));
                    (200, json!({"success": true, "count": 1}))
                }
            }
        }
        ("POST", ["test-only", "host", id, "actions"]) => {
            if !is_init {
                return error(
                    401,
                    "not_authorized",
                    "test-only actions need the init token",
                );
            }
            let Ok(body @ Value::Object(_)) = serde_json::from_slice::<Value>(&req.body) else {
                return error(
                    400,
                    "bad_request",
                    "body is not a JSON object (a HostAction fragment)",
                );
            };
            match st.hosts.get_mut(*id) {
                None => error(404, "not_found", "no such host"),
                Some(rec) => {
                    rec.queued.push(body);
                    (200, json!({"success": true, "count": rec.queued.len()}))
                }
            }
        }
        ("GET", ["hosts"]) => {
            if !(is_init || host_of_token.is_some()) {
                return error(401, "not_authorized", "listing hosts needs a token");
            }
            let result: Vec<Value> = st.hosts.values().map(host_detail).collect();
            (
                200,
                json!({"count": result.len(), "offset": 0, "limit": result.len(), "result": result, "success": true}),
            )
        }
        (_, ["host", "register"])
        | (_, ["host", _, "updatestatus" | "drain" | "pause" | "resume" | "terminate"])
        | (_, ["test-only", "host", _, "actions"])
        | (_, ["hosts"]) => error(405, "method_not_allowed", "method not allowed"),
        _ => error(404, "not_found", "not in the Edge API subset"),
    };
    if result.0 == 200 && req.method == "POST" {
        if let Err(e) = st.save() {
            eprintln!("edge-test-controller: cannot keep the host list: {e}");
        }
    }
    shared.changed.notify_all();
    result
}

/// One request to the controller at `addr` as its clients send it: (status
/// code, JSON body or `Null`).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: &str,
) -> std::io::Result<(u16, Value)> {
    let (code, body) = crate::http_request::send(addr, method, path, Some(token), body)?;
    Ok((code, serde_json::from_str(&body).unwrap_or(Value::Null)))
}

/// A `HostDetail` built from what the host sent.
fn host_detail(h: &HostRecord) -> Value {
    let mut d = match &h.register_request["info"] {
        Value::Object(m) => Value::Object(m.clone()),
        _ => json!({}),
    };
    d["hostID"] = json!(h.host_id);
    d["isActive"] = json!(true);
    d["lastUpdateDateTime"] = json!(h.last_update_unix);
    if let Some(last) = h.statuses.last() {
        d["lastStatus"] = last.clone();
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(addr: SocketAddr, method: &str, path: &str, token: &str, body: &str) -> (u16, Value) {
        super::http(addr, method, path, token, body).unwrap()
    }

    #[test]
    fn register_update_list_and_reregister_same_host() {
        let c = EdgeTestController::start("127.0.0.1:0", "init-tok").unwrap();
        let a = c.addr();
        let (code, v) = http(a, "GET", "/edge/v1/version", "", "");
        assert_eq!(code, 200);
        assert!(v["version"].as_str().unwrap().contains("Build number"));
        let (code, _) = http(a, "POST", "/edge/v1/host/register", "wrong", "{}");
        assert_eq!(code, 401);
        let req = r#"{"info":{"runModes":["engine"],"numCPU":2}}"#;
        let (code, v) = http(a, "POST", "/edge/v1/host/register", "init-tok", req);
        assert_eq!(code, 200);
        let id = v["hostID"].as_str().unwrap().to_string();
        let tok = v["hostToken"].as_str().unwrap().to_string();
        assert_eq!(v["mount"][0]["local_path"], "/cache");
        let path = format!("/edge/v1/host/{id}/updatestatus");
        assert_eq!(http(a, "POST", &path, "nope", "{}").0, 401);
        assert_eq!(http(a, "POST", &path, &tok, r#"{"numCPU":2}"#).0, 200);
        let (code, v) = http(a, "GET", "/edge/v1/hosts", &tok, "");
        assert_eq!(code, 200);
        assert_eq!(v["count"], 1);
        assert_eq!(v["result"][0]["runModes"][0], "engine");
        let again = format!(r#"{{"info":{{"hostID":"{id}","runModes":["engine"]}}}}"#);
        let (_, v) = http(a, "POST", "/edge/v1/host/register", "init-tok", &again);
        assert_eq!(v["hostID"].as_str().unwrap(), id);
        let hosts = c.hosts();
        assert_eq!(hosts.len(), 1);
        assert_eq!(hosts[0].registrations, 2);
        assert_eq!(hosts[0].statuses.len(), 1);
        assert_eq!(hosts[0].run_modes(), vec!["engine".to_string()]);
    }

    #[test]
    fn a_restarted_controller_with_a_state_file_keeps_its_hosts_and_tokens() {
        let dir = std::env::temp_dir().join(format!("edge-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("hosts.json");
        let (id, tok) = {
            let c = EdgeTestController::start("127.0.0.1:0", "init").unwrap();
            assert_eq!(c.keep_state_in(&file).unwrap(), 0);
            let req = r#"{"info":{"runModes":["engine"],"numCPU":2}}"#;
            let (_, v) = http(c.addr(), "POST", "/edge/v1/host/register", "init", req);
            let id = v["hostID"].as_str().unwrap().to_string();
            let tok = v["hostToken"].as_str().unwrap().to_string();
            let path = format!("/edge/v1/host/{id}/updatestatus");
            assert_eq!(
                http(c.addr(), "POST", &path, &tok, r#"{"numCPU":2}"#).0,
                200
            );
            (id, tok)
        };
        // A new process: the same host, its token still good, its last status known.
        let c = EdgeTestController::start("127.0.0.1:0", "init").unwrap();
        assert_eq!(c.keep_state_in(&file).unwrap(), 1);
        let path = format!("/edge/v1/host/{id}/updatestatus");
        assert_eq!(
            http(c.addr(), "POST", &path, &tok, r#"{"numCPU":3}"#).0,
            200
        );
        let again = format!(r#"{{"info":{{"hostID":"{id}","runModes":["engine"]}}}}"#);
        let (_, v) = http(c.addr(), "POST", "/edge/v1/host/register", "init", &again);
        assert_eq!(v["hostID"].as_str().unwrap(), id);
        let (_, v) = http(c.addr(), "GET", "/edge/v1/hosts", &tok, "");
        assert_eq!(v["count"], 1);
        assert_eq!(v["result"][0]["lastStatus"]["numCPU"], 3);
        let h = &c.hosts()[0];
        assert_eq!((h.registrations, h.statuses.len()), (2, 2));
        // A state file that is not ours is an error, not an empty cluster.
        std::fs::write(&file, "nope").unwrap();
        let c = EdgeTestController::start("127.0.0.1:0", "init").unwrap();
        assert!(c.keep_state_in(&file).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn admin_modes_and_queued_actions_reach_the_next_status_reply() {
        let c = EdgeTestController::start("127.0.0.1:0", "init").unwrap();
        let a = c.addr();
        let (_, v) = http(a, "POST", "/edge/v1/host/register", "init", "{}");
        assert_eq!(v["status"]["mode"], "continue");
        let id = v["hostID"].as_str().unwrap().to_string();
        let tok = v["hostToken"].as_str().unwrap().to_string();
        let up = format!("/edge/v1/host/{id}/updatestatus");
        let queue = format!("/edge/v1/test-only/host/{id}/actions");
        assert_eq!(
            http(a, "POST", &queue, &tok, "{}").0,
            401,
            "a host token is no admin"
        );
        assert_eq!(http(a, "POST", &queue, "init", "[1]").0, 400);
        let l1 = r#"{"launchContainer":[{"launchId":"L1"}]}"#;
        let l2 = r#"{"launchContainer":[{"launchId":"L2"}],"terminateContainer":[{"dockerContainerId":"x"}]}"#;
        assert_eq!(http(a, "POST", &queue, "init", l1).0, 200);
        assert_eq!(http(a, "POST", &queue, "init", l2).0, 200);
        let (_, r) = http(a, "POST", &up, &tok, r#"{"numContainers":0}"#);
        assert_eq!(r["mode"], "continue");
        assert_eq!(r["launchContainer"].as_array().unwrap().len(), 2);
        assert_eq!(r["terminateContainer"][0]["dockerContainerId"], "x");
        let (_, r) = http(a, "POST", &up, &tok, "{}");
        assert!(r.get("launchContainer").is_none(), "delivered once: {r}");
        let drain = format!("/edge/v1/host/{id}/drain");
        let (code, v) = http(a, "POST", &drain, "init", r#"{"reason":"user"}"#);
        assert_eq!((code, v["success"].clone()), (200, json!(true)));
        assert_eq!(http(a, "POST", &up, &tok, "{}").1["mode"], "drain");
        assert_eq!(http(a, "POST", &up, &tok, "{}").1["mode"], "drain", "kept");
        http(a, "POST", &format!("/edge/v1/host/{id}/pause"), "init", "");
        assert_eq!(http(a, "POST", &up, &tok, "{}").1["mode"], "pause");
        http(a, "POST", &format!("/edge/v1/host/{id}/resume"), "init", "");
        assert_eq!(http(a, "POST", &up, &tok, "{}").1["mode"], "continue");
        assert_eq!(
            http(a, "POST", "/edge/v1/host/nope/drain", "init", "{}").0,
            404
        );
        assert_eq!(http(a, "GET", &drain, "init", "").0, 405);
        assert_eq!(c.statuses(&id).len(), 6);
        assert_eq!(c.statuses(&id)[0]["numContainers"], 0);
        let h = &c.hosts()[0];
        assert_eq!(
            h.admin_requests[0],
            ("drain".to_string(), json!({"reason": "user"}))
        );
        assert!(c.queue_actions(&id, json!({"pullDockerImages": [{"dockerImage": "a"}]})));
        assert!(!c.queue_actions("nope", json!({})));
        assert_eq!(
            http(a, "POST", &up, &tok, "{}").1["pullDockerImages"][0]["dockerImage"],
            "a"
        );
    }

    #[test]
    fn down_refuses_then_up_serves_on_same_port() {
        let c = EdgeTestController::start("127.0.0.1:0", "t").unwrap();
        c.set_down(true);
        assert!(TcpStream::connect(c.addr()).is_err());
        c.set_down(false);
        assert_eq!(http(c.addr(), "GET", "/edge/v1/version", "", "").0, 200);
        c.set_unauthorized(true);
        assert_eq!(http(c.addr(), "GET", "/edge/v1/hosts", "t", "").0, 401);
    }
}
