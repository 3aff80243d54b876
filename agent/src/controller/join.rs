//! Joining the controller over the Edge API: wait for `/version`, register
//! (`POST /host/register`), keep hostID/hostToken (0600), mount the NFS cache it
//! names, then report status (`POST /host/{id}/updatestatus`). A restart
//! re-registers with the kept hostID, so the controller keeps the same host.

use crate::paths::Paths;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct JoinRecord {
    pub controller: String,
    pub host_id: String,
    pub host_token: String,
    pub joined_unix: u64,
    #[serde(default)]
    pub mounts: Vec<Value>,
}

pub fn load(paths: &Paths) -> Option<JoinRecord> {
    serde_json::from_slice(&std::fs::read(paths.join_file()).ok()?).ok()
}

pub fn save(paths: &Paths, r: &JoinRecord) -> std::io::Result<()> {
    crate::files::write_private(
        &paths.join_file(),
        &serde_json::to_vec_pretty(r).unwrap_or_default(),
        0o600,
    )
}

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("the controller at {url} refused the token (HTTP 401): check AIWARE_INIT_TOKEN is the cluster's init token")]
    Unauthorized { url: String },
    #[error("the controller at {url} answered HTTP {code} to {what}: {body}")]
    Status {
        url: String,
        what: String,
        code: u16,
        body: String,
    },
    #[error("cannot reach the controller at {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("the controller's answer to {what} is not what the Edge API says: {message}")]
    Protocol { what: String, message: String },
}

pub struct EdgeClient {
    pub base: String,
    agent: ureq::Agent,
}

impl EdgeClient {
    /// A client for the Edge API at `base`; `controller_ca` is the value of
    /// `AIWARE_CONTROLLER_CA` (see `tls.rs`), used for https only.
    pub fn new(base: &str, controller_ca: Option<&str>) -> Result<Self, String> {
        let mut builder = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(3))
            .timeout(Duration::from_secs(15))
            .try_proxy_from_env(false);
        if base.starts_with("https://") {
            let extra = match controller_ca {
                // At run time write_files are on disk: read from there.
                Some(v) => crate::tls::controller_ca(v, &[])
                    .map_err(|e| format!("AIWARE_CONTROLLER_CA: {e}"))?,
                None => Vec::new(),
            };
            builder = builder.tls_config(crate::tls::client_config(&extra)?);
        }
        Ok(EdgeClient {
            base: base.trim_end_matches('/').to_string(),
            agent: builder.build(),
        })
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: Option<&Value>,
        what: &str,
    ) -> Result<Value, JoinError> {
        let url = format!("{}{path}", self.base);
        let req = self
            .agent
            .request(method, &url)
            .set("Authorization", &format!("Bearer {token}"))
            .set("Accept", "application/json");
        let res = match body {
            Some(b) => req
                .set("Content-Type", "application/json")
                .send_string(&b.to_string()),
            None => req.call(),
        };
        match res {
            Ok(r) => {
                let text = r.into_string().map_err(|e| JoinError::Protocol {
                    what: what.into(),
                    message: e.to_string(),
                })?;
                if text.trim().is_empty() {
                    return Ok(Value::Null);
                }
                serde_json::from_str(&text).map_err(|e| JoinError::Protocol {
                    what: what.into(),
                    message: format!("not JSON ({e})"),
                })
            }
            Err(ureq::Error::Status(401, _)) => Err(JoinError::Unauthorized {
                url: self.base.clone(),
            }),
            Err(ureq::Error::Status(code, r)) => {
                let body: String = r
                    .into_string()
                    .unwrap_or_default()
                    .chars()
                    .take(300)
                    .collect();
                Err(JoinError::Status {
                    url: self.base.clone(),
                    what: what.into(),
                    code,
                    body,
                })
            }
            Err(ureq::Error::Transport(t)) => Err(JoinError::Unreachable {
                url: self.base.clone(),
                message: transport_message(&t),
            }),
        }
    }

    pub fn version(&self, token: &str) -> Result<String, JoinError> {
        let v = self.send("GET", "/version", token, None, "GET /version")?;
        Ok(v["version"].as_str().unwrap_or("").to_string())
    }

    pub fn register(&self, init_token: &str, req: &Value) -> Result<Value, JoinError> {
        let v = self.send(
            "POST",
            "/host/register",
            init_token,
            Some(req),
            "POST /host/register",
        )?;
        for key in ["hostID", "hostToken"] {
            if v[key].as_str().filter(|s| !s.is_empty()).is_none() {
                return Err(JoinError::Protocol {
                    what: "POST /host/register".into(),
                    message: format!("no {key} in the reply"),
                });
            }
        }
        Ok(v)
    }

    pub fn update_status(
        &self,
        host_id: &str,
        token: &str,
        status: &Value,
    ) -> Result<Value, JoinError> {
        self.send(
            "POST",
            &format!("/host/{host_id}/updatestatus"),
            token,
            Some(status),
            "POST /host/{id}/updatestatus",
        )
    }

    pub fn hosts(&self, token: &str) -> Result<Value, JoinError> {
        self.send("GET", "/hosts", token, None, "GET /hosts")
    }
}

/// What the host tells the controller about itself.
pub struct HostReport<'a> {
    pub facts: &'a crate::host::HostFacts,
    pub modes: &'a [String],
    pub gpus: &'a [crate::gpu::Gpu],
    pub host_expire: bool,
    pub instance_id: Option<&'a str>,
    pub image_version: &'a str,
}

impl HostReport<'_> {
    pub fn status(&self, host_id: Option<&str>) -> Value {
        let f = self.facts;
        let mut v = json!({
            "hostIP": f.ips.first().cloned().unwrap_or_default(),
            "numCPU": f.num_cpu,
            "numGPU": self.gpus.len(),
            "GPUAvailable": self.gpus.len(),
            "memoryAvailable": f.memory_available_bytes,
            "memoryUsed": f.memory_bytes.saturating_sub(f.memory_available_bytes),
            "diskAvailableRoot": f.disk_available_root,
            "diskAvailableOptAiware": f.disk_available_var,
            "vCPUAvailable": f.num_cpu * 1024,
            "numContainers": 0,
            "numEngineInstances": 0,
        });
        if let Some(id) = host_id {
            v["hostID"] = json!(id);
        }
        v
    }

    pub fn register_request(&self, host_id: Option<&str>) -> Value {
        let f = self.facts;
        let has = |m: &str| self.modes.iter().any(|x| x == m);
        let gpu_type = self
            .gpus
            .first()
            .map(|g| g.name.clone())
            .unwrap_or_default();
        let mut info = json!({
            "hostname": f.hostname,
            "ips": f.ips,
            "numCPU": f.num_cpu,
            "memory": f.memory_bytes,
            "numGPU": self.gpus.len(),
            "gpuAvailable": self.gpus.len(),
            "gpu_type": gpu_type,
            "runModes": self.modes,
            "shouldExpire": self.host_expire,
            "agentLabel": "aiw-agent",
            "agentVersionNumber": env!("CARGO_PKG_VERSION"),
            "serverTypeName": self.image_version,
            "isEngine": has("engine"), "isController": has("controller"), "isDB": has("db"),
            "isNFS": has("nfs"), "isRegistry": has("registry"), "isPrometheus": has("prometheus"),
            "isAPI": has("api"), "isES": has("es"), "isLB": has("lb"), "isNSQ": has("nsq"),
            "isRedis": has("redis"),
        });
        if let Some(id) = host_id {
            info["hostID"] = json!(id);
        }
        if let Some(i) = self.instance_id {
            info["cloudProviderInstanceID"] = json!(i);
        }
        json!({
            "info": info,
            "launchConfig": { "modes": self.modes },
            "status": self.status(host_id),
        })
    }
}

/// Capped exponential backoff for controller waits.
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Self {
        Backoff { next: first, max }
    }
    pub fn next_wait(&mut self) -> Duration {
        let w = self.next;
        self.next = (self.next * 2).min(self.max);
        w
    }
}

/// Waits for the controller's `/version`, then registers. Waits while the
/// controller is unreachable or answers 5xx; stops on 401 or at `deadline`.
/// `register_request(hostID)` makes the body of each try (facts gathered then:
/// the node's addresses may still be coming up while it waits).
pub fn join(
    client: &EdgeClient,
    init_token: &str,
    register_request: &mut dyn FnMut(Option<&str>) -> Value,
    previous: Option<&JoinRecord>,
    backoff: &mut Backoff,
    deadline: Option<Instant>,
    on_wait: &mut dyn FnMut(&str),
) -> Result<Value, JoinError> {
    loop {
        let res = client.version(init_token).and_then(|_| {
            let id = previous
                .filter(|p| p.controller == client.base)
                .map(|p| p.host_id.as_str());
            client.register(init_token, &register_request(id))
        });
        match res {
            Ok(v) => return Ok(v),
            Err(e @ JoinError::Unauthorized { .. }) => return Err(e),
            Err(
                e @ JoinError::Status {
                    code: 400..=499, ..
                },
            ) if !matches!(
                e,
                JoinError::Status {
                    code: 404 | 429,
                    ..
                }
            ) =>
            {
                return Err(e)
            }
            Err(e) => {
                let wait = backoff.next_wait();
                if deadline.is_some_and(|d| Instant::now() + wait > d) {
                    return Err(e);
                }
                on_wait(&format!(
                    "waiting {:.1}s for the controller ({e})",
                    wait.as_secs_f32()
                ));
                std::thread::sleep(wait);
            }
        }
    }
}

/// ureq's transport error, with the cause a user can act on for TLS: an
/// unknown issuer means the controller's CA is not trusted.
fn transport_message(t: &ureq::Transport) -> String {
    let mut m = t.to_string();
    let mut source = std::error::Error::source(t);
    while let Some(e) = source {
        let text = e.to_string();
        if !m.contains(&text) {
            m.push_str(&format!(": {text}"));
        }
        source = e.source();
    }
    if m.contains("UnknownIssuer") {
        m.push_str(
            " (the controller's certificate is not from a CA this node trusts: give its CA \
             in AIWARE_CONTROLLER_CA)",
        );
    }
    m
}

/// Mounts what the registration reply's `mount[]` names (NFS). Returns one
/// line per mount for status, or the error.
pub fn mount_all(
    paths: &Paths,
    mounts: &[Value],
    real_system: bool,
) -> Vec<Result<String, String>> {
    let mut sorted: Vec<&Value> = mounts.iter().collect();
    sorted.sort_by_key(|m| m["priority"].as_i64().unwrap_or(0));
    sorted
        .into_iter()
        .map(|m| {
            let kind = m["mountType"].as_str().unwrap_or("nfs");
            let local = m["local_path"].as_str().unwrap_or("/cache");
            let server = m["ips"].as_array().and_then(|a| a.first()).and_then(|v| v.as_str()).unwrap_or("");
            let rpath = m["server_path"].as_str().unwrap_or("");
            let opts = m["options"].as_str().unwrap_or("nfsvers=4");
            if kind != "nfs" {
                return Err(format!("mount type {kind} for {local} is not supported (only nfs)"));
            }
            if server.is_empty() || rpath.is_empty() || !local.starts_with('/') {
                return Err(format!("the controller's mount for {local:?} lacks ips, server_path or an absolute local_path"));
            }
            let src = if server.contains(':') { format!("[{server}]:{rpath}") } else { format!("{server}:{rpath}") };
            let line = format!("{src} on {local} (nfs, {opts})");
            if !real_system {
                return Ok(format!("{line} [not mounted: test root {}]", paths.root.display()));
            }
            // The share is this node's own export (the controller, which
            // also runs the nfs mode): the folder itself, bind-mounted. NFS
            // to oneself can deadlock under memory pressure, and at shutdown
            // nfs-server stops before /cache is unmounted, so the unmount
            // hangs until systemd's stop timeout (90 s on every reboot).
            if is_own_address(server, &crate::host::ips()) && std::path::Path::new(rpath).is_dir() {
                let line = format!("{rpath} on {local} (this node's own export: bind mount)");
                if is_mounted_as(local, |_| true) {
                    return Ok(line);
                }
                if let Err(e) = std::fs::create_dir_all(local) {
                    return Err(format!("cannot create mount point {local}: {e}"));
                }
                return match std::process::Command::new("mount").args(["--bind", rpath, local]).output() {
                    Ok(o) if o.status.success() => Ok(line),
                    Ok(o) => Err(format!("bind {rpath} on {local} failed: {}", String::from_utf8_lossy(&o.stderr).trim())),
                    Err(e) => Err(format!("cannot run mount: {e}")),
                };
            }
            // A local bind (the fallback below) is not the share: mount over it.
            if is_mounted_as(local, |fstype| fstype.starts_with("nfs")) {
                return Ok(line);
            }
            if let Err(e) = std::fs::create_dir_all(local) {
                return Err(format!("cannot create mount point {local}: {e}"));
            }
            match std::process::Command::new("mount").args(["-t", "nfs", "-o", opts, &src, local]).output() {
                Ok(o) if o.status.success() => Ok(line),
                Ok(o) => Err(format!("mount {src} on {local} failed: {}", String::from_utf8_lossy(&o.stderr).trim())),
                Err(e) => Err(format!("cannot run mount: {e}")),
            }
        })
        .collect()
}

/// Whether `server` (an address from the controller's `mount[].ips`) is one
/// of `own` (this node's addresses, [`crate::host::ips`]).
fn is_own_address(server: &str, own: &[String]) -> bool {
    let parse = |a: &str| {
        a.trim_matches(|c| c == '[' || c == ']')
            .parse::<std::net::IpAddr>()
            .ok()
    };
    parse(server).is_some_and(|s| own.iter().any(|o| parse(o) == Some(s)))
}

/// Whether `local` is a mount point whose filesystem type passes `fstype`.
fn is_mounted_as(local: &str, fstype: impl Fn(&str) -> bool) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| t.lines().any(|l| mountinfo_has(l, local, &fstype)))
        .unwrap_or(false)
}

/// One `/proc/self/mountinfo` line: field 5 is the mount point, and the type
/// is the first field after the ` - ` separator (optional fields come before).
fn mountinfo_has(line: &str, local: &str, fstype: &impl Fn(&str) -> bool) -> bool {
    let Some((head, tail)) = line.split_once(" - ") else {
        return false;
    };
    head.split_whitespace().nth(4) == Some(local)
        && tail.split_whitespace().next().is_some_and(fstype)
}

/// Where an engine's `/cache` lives when the controller names no share: on
/// `/var`, so it is writable (the root is read-only) and survives reboots.
pub const LOCAL_CACHE: &str = "/var/opt/aiware/engine/cache";

/// An engine writes each launch's scratch and results under `/cache`. The
/// guide mounts the cluster's NFS share there; a controller that gives no
/// `mount[]` (a single-node setup, or one whose engines keep their cache
/// local) would leave `/cache` as the image's empty read-only folder, and
/// every launch would fail with "Read-only file system". So `/cache` becomes a
/// bind of [`LOCAL_CACHE`] unless something is mounted there already; a later
/// NFS mount from the controller stacks on top of it.
pub fn local_cache_fallback(
    paths: &Paths,
    cache: &str,
    real_system: bool,
) -> Result<Option<String>, String> {
    let local = paths.at(LOCAL_CACHE);
    std::fs::create_dir_all(&local)
        .map_err(|e| format!("cannot create {}: {e}", local.display()))?;
    if !real_system {
        return Ok(None);
    }
    if is_mounted_as(cache, |_| true) {
        return Ok(None);
    }
    std::fs::create_dir_all(cache)
        .map_err(|e| format!("cannot create mount point {cache}: {e}"))?;
    match std::process::Command::new("mount")
        .args(["--bind", LOCAL_CACHE, cache])
        .output()
    {
        Ok(o) if o.status.success() => Ok(Some(format!(
            "{LOCAL_CACHE} on {cache} (local: the controller named no share)"
        ))),
        Ok(o) => Err(format!(
            "bind {LOCAL_CACHE} on {cache} failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("cannot run mount: {e}")),
    }
}

/// Prometheus file-based discovery from `GET /hosts`: every host's agent (8000)
/// and node exporter (9100).
pub fn prometheus_targets(hosts: &Value) -> Value {
    let mut groups = Vec::new();
    for h in hosts["result"].as_array().into_iter().flatten() {
        let Some(ip) = h["ips"]
            .as_array()
            .and_then(|a| a.first())
            .and_then(|v| v.as_str())
        else {
            continue;
        };
        let ip = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip.to_string()
        };
        let mut targets = vec![format!("{ip}:8000"), format!("{ip}:9100")];
        // Controllers also serve their own metrics on 8001.
        if h["runModes"]
            .as_array()
            .is_some_and(|m| m.iter().any(|m| m == "controller"))
        {
            targets.push(format!("{ip}:8001"));
        }
        groups.push(json!({
            "targets": targets,
            "labels": { "host_id": h["hostID"], "hostname": h["hostname"] },
        }));
    }
    Value::Array(groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A/B updates: a rollback boots the previous version on the same /var,
    /// so this version must read a join record a newer one wrote.
    #[test]
    fn a_join_record_from_a_newer_version_still_reads() {
        let newer = r#"{"controller":"http://10.0.0.5:9000/edge/v1","host_id":"h1",
            "host_token":"t","joined_unix":5,"mounts":[],"field_of_version_9":{"x":1}}"#;
        let r: JoinRecord = serde_json::from_str(newer).unwrap();
        assert_eq!(r.host_id, "h1");
    }

    const NFS: &str =
        "36 25 0:33 / /cache rw,relatime shared:12 - nfs4 10.0.0.5:/opt/aiware/nfs rw,vers=4.2";
    const BIND: &str =
        "37 25 254:3 /var/opt/aiware/engine/cache /cache rw,relatime - ext4 /dev/vda3 rw";

    #[test]
    fn mountinfo_reads_the_type_after_the_optional_fields() {
        let nfs = |t: &str| t.starts_with("nfs");
        assert!(mountinfo_has(NFS, "/cache", &nfs));
        assert!(
            !mountinfo_has(BIND, "/cache", &nfs),
            "a local bind is not the share"
        );
        assert!(mountinfo_has(BIND, "/cache", &|_: &str| true));
        assert!(!mountinfo_has(NFS, "/cache/engine", &nfs));
        assert!(!mountinfo_has("garbage", "/cache", &nfs));
    }

    #[test]
    fn a_share_at_one_of_this_nodes_addresses_is_its_own_export() {
        let own = vec!["192.168.76.10".to_string(), "fd00::10".to_string()];
        assert!(is_own_address("192.168.76.10", &own));
        assert!(is_own_address("[fd00::10]", &own));
        assert!(is_own_address("fd00:0::10", &own));
        assert!(!is_own_address("192.168.76.11", &own));
        assert!(!is_own_address("controller.local", &own));
        assert!(!is_own_address("", &own));
    }

    #[test]
    fn the_local_cache_is_made_under_a_test_root_and_nothing_is_mounted() {
        let d = tempfile::tempdir().unwrap();
        let paths = Paths::new(d.path());
        assert_eq!(local_cache_fallback(&paths, "/cache", false), Ok(None));
        assert!(d.path().join("var/opt/aiware/engine/cache").is_dir());
    }
}
