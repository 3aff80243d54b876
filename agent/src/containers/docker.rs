//! The real runtime: the Docker Engine API on `/run/docker.sock`, through the
//! `bollard` crate. bollard is async; the agent is not, so this owns a tokio
//! current-thread runtime and blocks on each call (several threads may block
//! on it at once: the background pulls and the status loop).

use super::{
    ContainerRuntime, ContainerSpec, ContainerUsage, ManagedContainer, RegistryAuth,
    LABEL_MANAGED_BY, MANAGED_BY,
};
use bollard::auth::DockerCredentials;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder, StatsOptionsBuilder, StopContainerOptionsBuilder,
};
use bollard::Docker;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

pub const DOCKER_SOCKET: &str = "/run/docker.sock";

pub struct DockerRuntime {
    docker: Docker,
    rt: tokio::runtime::Runtime,
    /// Per container: (its CPU time, the system's CPU time) at the last
    /// report, so CPU % is over one report interval from one-shot stats
    /// (a streamed sample would hold each report up by a second per container).
    last_cpu: std::sync::Mutex<HashMap<String, (u64, u64)>>,
}

fn msg(e: bollard::errors::Error) -> String {
    match e {
        bollard::errors::Error::DockerResponseServerError {
            status_code,
            message,
        } => {
            format!("Docker answered {status_code}: {message}")
        }
        e => format!("Docker: {e}"),
    }
}

impl DockerRuntime {
    /// Connects to Docker on `socket`; `Err` says why not (no socket: no Docker on this node).
    pub fn connect(socket: &Path) -> Result<Self, String> {
        if !socket.exists() {
            return Err(format!(
                "no Docker on this node ({} does not exist): container actions are refused",
                socket.display()
            ));
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the Docker client's runtime: {e}"))?;
        let docker =
            Docker::connect_with_unix(&socket.to_string_lossy(), 120, bollard::API_DEFAULT_VERSION)
                .map_err(|e| format!("cannot use {}: {e}", socket.display()))?;
        Ok(DockerRuntime {
            docker,
            rt,
            last_cpu: Default::default(),
        })
    }
}

/// `repo[:tag]` split for `POST /images/create` (`fromImage`, `tag`); a digest stays in the name.
fn split_tag(image: &str) -> (&str, &str) {
    if image.contains('@') {
        return (image, "");
    }
    match image.rfind(':') {
        Some(i) if !image[i..].contains('/') => (&image[..i], &image[i + 1..]),
        _ => (image, "latest"),
    }
}

impl ContainerRuntime for DockerRuntime {
    fn check(&self) -> Result<(), String> {
        self.rt
            .block_on(self.docker.ping())
            .map(|_| ())
            .map_err(msg)
    }

    fn pull(&self, image: &str, auth: Option<&RegistryAuth>) -> Result<(), String> {
        let (from, tag) = split_tag(image);
        let mut opts = CreateImageOptionsBuilder::default().from_image(from);
        if !tag.is_empty() {
            opts = opts.tag(tag);
        }
        let creds = auth.map(|a| DockerCredentials {
            username: Some(a.username.clone()),
            password: Some(a.password.clone()),
            serveraddress: Some(a.server.clone()),
            ..Default::default()
        });
        self.rt.block_on(async {
            let mut s = self.docker.create_image(Some(opts.build()), None, creds);
            while let Some(item) = s.next().await {
                item.map_err(msg)?;
            }
            Ok(())
        })
    }

    fn create_and_start(&self, spec: &ContainerSpec) -> Result<String, String> {
        let host = HostConfig {
            binds: Some(spec.binds.clone()),
            auto_remove: Some(spec.auto_remove),
            memory_reservation: spec.memory_reservation,
            cpu_shares: spec.cpu_shares,
            runtime: spec.gpu.then(|| "nvidia".to_string()),
            ..Default::default()
        };
        let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        if spec.gpu {
            env.push("NVIDIA_VISIBLE_DEVICES=all".into());
        }
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            env: Some(env),
            cmd: (!spec.cmd.is_empty()).then(|| spec.cmd.clone()),
            labels: Some(spec.labels.clone().into_iter().collect()),
            host_config: Some(host),
            ..Default::default()
        };
        let opts = CreateContainerOptionsBuilder::default()
            .name(&spec.name)
            .build();
        self.rt.block_on(async {
            let created = self
                .docker
                .create_container(Some(opts), body)
                .await
                .map_err(msg)?;
            self.docker
                .start_container(&created.id, None)
                .await
                .map_err(msg)?;
            Ok(created.id)
        })
    }

    fn stop_and_remove(&self, id: &str, grace: Duration) -> Result<(), String> {
        let stop = StopContainerOptionsBuilder::default()
            .t(grace.as_secs().min(i32::MAX as u64) as i32)
            .build();
        let rm = RemoveContainerOptionsBuilder::default().force(true).build();
        self.rt.block_on(async {
            // Already stopped (304) or gone with AutoRemove (404) is fine.
            match self.docker.stop_container(id, Some(stop)).await {
                Ok(()) => {}
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 304 | 404,
                    ..
                }) => {}
                Err(e) => return Err(msg(e)),
            }
            match self.docker.remove_container(id, Some(rm)).await {
                Ok(())
                | Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404 | 409,
                    ..
                }) => Ok(()),
                Err(e) => Err(msg(e)),
            }
        })
    }

    fn pause(&self, id: &str) -> Result<(), String> {
        self.rt
            .block_on(self.docker.pause_container(id))
            .map_err(msg)
    }

    fn unpause(&self, id: &str) -> Result<(), String> {
        self.rt
            .block_on(self.docker.unpause_container(id))
            .map_err(msg)
    }

    fn list_managed(&self) -> Result<Vec<ManagedContainer>, String> {
        let label = format!("{LABEL_MANAGED_BY}={MANAGED_BY}");
        let filters: HashMap<String, Vec<String>> =
            HashMap::from([("label".to_string(), vec![label])]);
        let opts = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let list = self
            .rt
            .block_on(self.docker.list_containers(Some(opts)))
            .map_err(msg)?;
        Ok(list
            .into_iter()
            .map(|c| ManagedContainer {
                id: c.id.unwrap_or_default(),
                name: c
                    .names
                    .and_then(|n| n.first().cloned())
                    .unwrap_or_default()
                    .trim_start_matches('/')
                    .to_string(),
                labels: c.labels.unwrap_or_default().into_iter().collect(),
                state: c
                    .state
                    .map(|s| s.to_string())
                    .unwrap_or_default()
                    .to_ascii_lowercase(),
            })
            .collect())
    }

    fn usage(&self, id: &str) -> Option<ContainerUsage> {
        let opts = StatsOptionsBuilder::default()
            .stream(false)
            .one_shot(true)
            .build();
        let st = self.rt.block_on(async {
            let mut s = self.docker.stats(id, Some(opts));
            s.next().await
        })?;
        let st = st.ok()?;
        let cpu = st.cpu_stats.as_ref();
        let now = (
            cpu.and_then(|c| c.cpu_usage.as_ref())
                .and_then(|u| u.total_usage)
                .unwrap_or(0),
            cpu.and_then(|c| c.system_cpu_usage).unwrap_or(0),
        );
        let before = self
            .last_cpu
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), now);
        let mem = st.memory_stats.as_ref();
        Some(ContainerUsage {
            cpu_percent: before.map(|b| cpu_percent(b, now)).unwrap_or(0.0),
            memory_used: mem.and_then(|m| m.usage).unwrap_or(0),
            memory_limit: mem.and_then(|m| m.limit).unwrap_or(0),
        })
    }

    fn load_archive(&self, path: &Path) -> Result<Vec<String>, String> {
        use std::io::Read;
        let file = std::fs::File::open(path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        // Streamed in 1 MiB chunks: an archive may be gigabytes.
        let chunks = futures_util::stream::unfold(file, |mut f| async move {
            let mut buf = vec![0u8; 1 << 20];
            match f.read(&mut buf) {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok::<_, std::io::Error>(bytes::Bytes::from(buf)), f))
                }
                Err(e) => Some((Err(e), f)),
            }
        });
        let opts = bollard::query_parameters::ImportImageOptionsBuilder::default()
            .quiet(true)
            .build();
        self.rt.block_on(async {
            let mut s = self.docker.import_image_stream(opts, chunks, None);
            let mut loaded = Vec::new();
            while let Some(item) = s.next().await {
                let info = item.map_err(msg)?;
                if let Some(line) = info.stream {
                    let line = line.trim();
                    if !line.is_empty() {
                        loaded.push(line.to_string());
                    }
                }
            }
            Ok(loaded)
        })
    }

    fn has_image(&self, reference: &str) -> Result<bool, String> {
        match self.rt.block_on(self.docker.inspect_image(reference)) {
            Ok(_) => Ok(true),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(false),
            Err(e) => Err(msg(e)),
        }
    }
}

/// Docker's formula over two samples of (container CPU ns, system CPU ns):
/// the share of all the host's CPUs, 0-100.
fn cpu_percent(before: (u64, u64), now: (u64, u64)) -> f64 {
    let d_cpu = now.0.saturating_sub(before.0) as f64;
    let d_sys = now.1.saturating_sub(before.1) as f64;
    if d_sys > 0.0 {
        (d_cpu / d_sys * 100.0).min(100.0)
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_split_for_the_pull_api() {
        assert_eq!(split_tag("alpine"), ("alpine", "latest"));
        assert_eq!(split_tag("reg:5000/a/b:1.2"), ("reg:5000/a/b", "1.2"));
        assert_eq!(split_tag("reg:5000/a/b"), ("reg:5000/a/b", "latest"));
        let d = "a/b@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        assert_eq!(split_tag(d), (d, ""));
    }

    #[test]
    fn cpu_percent_is_over_the_interval() {
        assert_eq!(cpu_percent((0, 0), (50, 200)), 25.0);
        assert_eq!(cpu_percent((100, 1000), (100, 1000)), 0.0);
        assert_eq!(
            cpu_percent((100, 1000), (50, 2000)),
            0.0,
            "a restarted container"
        );
    }

    /// A TEST DOUBLE of the Docker Engine API on a unix socket: canned
    /// answers, and every request kept, to check what bollard sends.
    struct FakeEngineApi {
        _dir: tempfile::TempDir,
        socket: std::path::PathBuf,
        seen: std::sync::Arc<std::sync::Mutex<Vec<Seen>>>,
    }

    /// method, path with query, headers, body
    type Seen = (String, String, String, String);

    impl FakeEngineApi {
        fn start() -> Self {
            use std::io::{BufRead, BufReader, Read, Write};
            let dir = tempfile::tempdir().unwrap();
            let socket = dir.path().join("docker.sock");
            let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
            let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let log = seen.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    let Ok(mut conn) = conn else { break };
                    let mut r = BufReader::new(conn.try_clone().unwrap());
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        continue;
                    }
                    let mut parts = line.split_whitespace();
                    let method = parts.next().unwrap_or("").to_string();
                    let path = parts.next().unwrap_or("").to_string();
                    let (mut len, mut headers) = (0usize, String::new());
                    loop {
                        let mut h = String::new();
                        r.read_line(&mut h).unwrap();
                        if h.trim().is_empty() {
                            break;
                        }
                        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap();
                        }
                        headers.push_str(&h);
                    }
                    let mut body = vec![0; len];
                    r.read_exact(&mut body).unwrap();
                    let p = path.split('?').next().unwrap_or("");
                    let (code, answer) = if p.ends_with("/_ping") {
                        (200, "OK".to_string())
                    } else if p.ends_with("/images/create") {
                        (
                            200,
                            "{\"status\":\"Pulling\"}\n{\"status\":\"Done\"}\n".into(),
                        )
                    } else if p.ends_with("/containers/create") {
                        (201, "{\"Id\":\"c0ffee\",\"Warnings\":[]}".into())
                    } else if p.ends_with("/containers/json") {
                        (200, r#"[{"Id":"c0ffee","Names":["/aiware-engine-L1"],"Labels":{"ai.veritone.aiware.launch-id":"L1"},"State":"paused"}]"#.into())
                    } else if p.ends_with("/stats") {
                        (200, r#"{"cpu_stats":{"cpu_usage":{"total_usage":100},"system_cpu_usage":1000},"memory_stats":{"usage":2048,"limit":4096}}"#.into())
                    } else if p.contains("/containers/gone") {
                        (404, r#"{"message":"No such container: gone"}"#.into())
                    } else {
                        (204, String::new())
                    };
                    log.lock().unwrap().push((
                        method,
                        path,
                        headers,
                        String::from_utf8_lossy(&body).into_owned(),
                    ));
                    let _ = write!(
                        conn,
                        "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                        answer.len()
                    );
                }
            });
            FakeEngineApi {
                _dir: dir,
                socket,
                seen,
            }
        }

        fn request(&self, path_part: &str) -> Seen {
            self.seen
                .lock()
                .unwrap()
                .iter()
                .find(|r| r.1.contains(path_part))
                .cloned()
                .unwrap_or_else(|| panic!("no request to {path_part}"))
        }
    }

    #[test]
    fn what_bollard_sends_to_the_engine_api() {
        let api = FakeEngineApi::start();
        let d = DockerRuntime::connect(&api.socket).unwrap();
        d.check().unwrap();
        let auth = RegistryAuth {
            server: "reg.example:5000".into(),
            username: "u".into(),
            password: "pw-secret".into(),
        };
        d.pull("reg.example:5000/a/b:1.2", Some(&auth)).unwrap();
        let (m, path, headers, _) = api.request("/images/create");
        assert_eq!(m, "POST");
        assert!(
            path.contains("fromImage=reg.example%3A5000%2Fa%2Fb") && path.contains("tag=1.2"),
            "{path}"
        );
        let reg = headers
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .starts_with("x-registry-auth:")
                    .then(|| l[16..].trim().to_string())
            })
            .expect("X-Registry-Auth");
        use base64::Engine as _;
        let decoded = base64::engine::general_purpose::URL_SAFE
            .decode(reg.trim_end_matches('='))
            .or_else(|_| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(reg.trim_end_matches('='))
            })
            .unwrap();
        let creds: serde_json::Value = serde_json::from_slice(&decoded).unwrap();
        assert_eq!(
            (creds["username"].as_str(), creds["password"].as_str()),
            (Some("u"), Some("pw-secret"))
        );

        let spec = ContainerSpec {
            name: "aiware-engine-L1".into(),
            image: "a/b:1".into(),
            env: vec![("AIWARE_ID".into(), "L1".into())],
            cmd: vec!["/task".into(), "a b; c".into()],
            binds: vec!["/cache:/cache".into()],
            labels: [("ai.veritone.aiware.launch-id".to_string(), "L1".to_string())].into(),
            memory_reservation: Some(1 << 28),
            cpu_shares: Some(512),
            gpu: true,
            auto_remove: true,
        };
        assert_eq!(d.create_and_start(&spec).unwrap(), "c0ffee");
        let (_, path, _, body) = api.request("/containers/create");
        assert!(path.contains("name=aiware-engine-L1"), "{path}");
        let b: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(b["Image"], "a/b:1");
        assert_eq!(b["Cmd"], serde_json::json!(["/task", "a b; c"]));
        assert_eq!(
            b["Env"],
            serde_json::json!(["AIWARE_ID=L1", "NVIDIA_VISIBLE_DEVICES=all"])
        );
        assert_eq!(b["Labels"]["ai.veritone.aiware.launch-id"], "L1");
        let h = &b["HostConfig"];
        assert_eq!(h["Binds"], serde_json::json!(["/cache:/cache"]));
        assert_eq!(
            (h["MemoryReservation"].as_i64(), h["CpuShares"].as_i64()),
            (Some(1 << 28), Some(512))
        );
        assert_eq!(
            (h["AutoRemove"].as_bool(), h["Runtime"].as_str()),
            (Some(true), Some("nvidia"))
        );
        assert_eq!(api.request("/containers/c0ffee/start").0, "POST");

        let list = d.list_managed().unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(
            (list[0].name.as_str(), list[0].state.as_str()),
            ("aiware-engine-L1", "paused")
        );
        assert_eq!(list[0].label(crate::containers::LABEL_LAUNCH_ID), "L1");
        let (_, path, _, _) = api.request("/containers/json");
        assert!(
            path.contains("all=true") && path.contains("managed-by"),
            "{path}"
        );

        let u = d.usage("c0ffee").unwrap();
        assert_eq!(
            (u.memory_used, u.memory_limit, u.cpu_percent),
            (2048, 4096, 0.0)
        );
        d.stop_and_remove("c0ffee", Duration::from_secs(7)).unwrap();
        assert!(api.request("/containers/c0ffee/stop").1.contains("t=7"));
        assert_eq!(api.request("/containers/c0ffee?").0, "DELETE");
        d.stop_and_remove("gone", Duration::from_secs(1)).unwrap();
        d.pause("c0ffee").unwrap();
        d.unpause("c0ffee").unwrap();
        assert!(api.request("/containers/c0ffee/unpause").0 == "POST");
    }

    #[test]
    fn no_socket_is_one_clear_reason() {
        let e = DockerRuntime::connect(Path::new("/nonexistent/docker.sock"))
            .err()
            .unwrap();
        assert!(e.contains("no Docker on this node"), "{e}");
    }

    /// A TEST DOUBLE of the Engine API's image endpoints: `POST /images/load`
    /// (a chunked body, as bollard streams it) and `GET /images/{ref}/json`.
    fn image_api() -> (
        tempfile::TempDir,
        std::path::PathBuf,
        std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    ) {
        use std::io::{BufRead, BufReader, Read, Write};
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("docker.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let body_seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let keep = body_seen.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { break };
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    continue;
                }
                let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                let (mut len, mut chunked) = (0usize, false);
                loop {
                    let mut h = String::new();
                    r.read_line(&mut h).unwrap();
                    if h.trim().is_empty() {
                        break;
                    }
                    let l = h.to_ascii_lowercase();
                    if let Some(v) = l.strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                    if l.starts_with("transfer-encoding:") && l.contains("chunked") {
                        chunked = true;
                    }
                }
                let mut body = Vec::new();
                if chunked {
                    loop {
                        let mut size = String::new();
                        r.read_line(&mut size).unwrap();
                        let n = usize::from_str_radix(size.trim(), 16).unwrap();
                        let mut c = vec![0; n + 2];
                        r.read_exact(&mut c).unwrap();
                        if n == 0 {
                            break;
                        }
                        body.extend_from_slice(&c[..n]);
                    }
                } else {
                    body.resize(len, 0);
                    r.read_exact(&mut body).unwrap();
                }
                let p = path.split('?').next().unwrap_or("");
                let (code, answer) = if p.ends_with("/images/load") {
                    keep.lock().unwrap().extend_from_slice(&body);
                    (
                        200,
                        "{\"stream\":\"Loaded image: aiware-controller:test\\n\"}\n".to_string(),
                    )
                } else if p.contains("/images/aiware-controller:test/json") {
                    (200, "{\"Id\":\"sha256:ab\"}".to_string())
                } else if p.contains("/images/") {
                    (404, "{\"message\":\"No such image\"}".to_string())
                } else {
                    (200, "OK".to_string())
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                    answer.len()
                );
            }
        });
        (dir, socket, body_seen)
    }

    #[test]
    fn an_archive_is_streamed_to_images_load() {
        let (dir, socket, seen) = image_api();
        let d = DockerRuntime::connect(&socket).unwrap();
        // Over one chunk, so the stream is really read in pieces.
        let data: Vec<u8> = (0..(3 << 20) + 17).map(|i| (i % 251) as u8).collect();
        let archive = dir.path().join("a.tar");
        std::fs::write(&archive, &data).unwrap();
        let loaded = d.load_archive(&archive).unwrap();
        assert_eq!(loaded, vec!["Loaded image: aiware-controller:test"]);
        assert!(*seen.lock().unwrap() == data, "the archive's bytes, whole");
        assert_eq!(d.has_image("aiware-controller:test"), Ok(true));
        assert_eq!(d.has_image("nope:1"), Ok(false));
        let e = d.load_archive(&dir.path().join("missing.tar")).unwrap_err();
        assert!(e.contains("cannot open"), "{e}");
    }
}
