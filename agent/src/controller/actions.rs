//! The controller's `HostAction` (reply to register, field `status`, and to
//! every updatestatus), parsed into typed actions. Unknown fields are ignored;
//! a malformed or unsafe entry becomes a [`Refusal`] (reported in the next
//! status), never an error of the whole action and never anything a shell sees.

use serde_json::Value;

/// The host's mode (`HostActionModeEnum`; `resume` and `normal` are read as `continue`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Continue,
    Drain,
    Pause,
    Terminate,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Continue => "continue",
            Mode::Drain => "drain",
            Mode::Pause => "pause",
            Mode::Terminate => "terminate",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    pub launch_id: String,
    pub engine_id: String,
    pub build_id: String,
    pub image: String,
    pub env: Vec<(String, String)>,
    pub command: Vec<String>,
    pub runtime_ttl_s: Option<u64>,
    pub soft_min_memory: Option<i64>,
    pub soft_min_vcpu: Option<i64>,
    pub is_gpu: bool,
    pub container_type: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Pull {
    pub image: String,
    pub engine_id: String,
    pub build_id: String,
}

#[derive(Clone, PartialEq)]
pub struct Registry {
    /// `host[:port]`, scheme and path dropped.
    pub host: String,
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Registry {{ host: {:?}, username: {:?}, password: <redacted> }}",
            self.host, self.username
        )
    }
}

/// An action not carried out, and why (reported as `actionErrors[]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// Where it was: `launchContainer[2]`, `mode`, ...
    pub action: String,
    pub launch_id: Option<String>,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostActions {
    pub mode: Option<Mode>,
    pub launches: Vec<Launch>,
    /// `dockerContainerId`s.
    pub terminates: Vec<String>,
    pub pulls: Vec<Pull>,
    pub registries: Vec<Registry>,
    pub refused: Vec<Refusal>,
}

impl HostActions {
    pub fn is_empty(&self) -> bool {
        self.mode.is_none()
            && self.launches.is_empty()
            && self.terminates.is_empty()
            && self.pulls.is_empty()
            && self.refused.is_empty()
    }

    /// Every secret in it, for log scrubbing: registry passwords, env values
    /// under a secret-looking key, and any env value of 12 characters or more
    /// (shorter ones such as `true` or `engine` would blank out log lines).
    /// Env values are never logged nor reported anyway.
    pub fn secrets(&self) -> Vec<String> {
        let mut s: Vec<String> = self.registries.iter().map(|r| r.password.clone()).collect();
        for l in &self.launches {
            s.extend(
                l.env
                    .iter()
                    .filter(|(k, v)| crate::settings::is_secret(k) || v.len() >= 12)
                    .map(|(_, v)| v.clone()),
            );
        }
        s
    }

    /// The credentials for `image`'s registry, if `registries[]` has them.
    pub fn auth_for(&self, image: &str) -> Option<&Registry> {
        find_auth(&self.registries, image)
    }
}

pub fn find_auth<'a>(registries: &'a [Registry], image: &str) -> Option<&'a Registry> {
    let host = registry_host(image);
    let strip443 = |h: &str| h.strip_suffix(":443").unwrap_or(h).to_ascii_lowercase();
    registries
        .iter()
        .find(|r| strip443(&r.host) == strip443(&host))
}

/// The registry an image reference pulls from (`docker.io` when it names none).
pub fn registry_host(image: &str) -> String {
    match image.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            first.to_ascii_lowercase()
        }
        _ => "docker.io".into(),
    }
}

/// Parses a `HostAction`. `Value::Null` or `{}` is no action.
pub fn parse(v: &Value) -> HostActions {
    let mut out = HostActions::default();
    let Some(obj) = v.as_object() else {
        if !v.is_null() {
            out.refused
                .push(refusal("HostAction", None, "is not a JSON object"));
        }
        return out;
    };
    match obj.get("mode") {
        None | Some(Value::Null) => {}
        Some(Value::String(m)) => match m.to_ascii_lowercase().as_str() {
            "continue" | "resume" | "normal" | "" => out.mode = Some(Mode::Continue),
            "drain" => out.mode = Some(Mode::Drain),
            "pause" => out.mode = Some(Mode::Pause),
            "terminate" => out.mode = Some(Mode::Terminate),
            _ => out.refused.push(refusal(
                "mode",
                None,
                &format!(
                    "unknown mode {:?} (continue, drain, pause, terminate)",
                    clip(m)
                ),
            )),
        },
        Some(_) => out.refused.push(refusal("mode", None, "is not a string")),
    }
    for (i, r) in list(obj, "registries", &mut out.refused) {
        match parse_registry(r) {
            Ok(r) => out.registries.push(r),
            Err(e) => out
                .refused
                .push(refusal(&format!("registries[{i}]"), None, &e)),
        }
    }
    for (i, l) in list(obj, "launchContainer", &mut out.refused) {
        match parse_launch(l) {
            Ok(l) => out.launches.push(l),
            Err((id, e)) => out
                .refused
                .push(refusal(&format!("launchContainer[{i}]"), id, &e)),
        }
    }
    for (i, t) in list(obj, "terminateContainer", &mut out.refused) {
        match t["dockerContainerId"].as_str() {
            Some(id) if is_container_ref(id) => out.terminates.push(id.to_string()),
            _ => out.refused.push(refusal(
                &format!("terminateContainer[{i}]"),
                None,
                "dockerContainerId is missing or not a container id",
            )),
        }
    }
    for (i, p) in list(obj, "pullDockerImages", &mut out.refused) {
        let image = p["dockerImage"].as_str().unwrap_or("");
        match check_image_ref(image) {
            Ok(()) => out.pulls.push(Pull {
                image: image.to_string(),
                engine_id: p["engineID"].as_str().unwrap_or("").to_string(),
                build_id: p["buildID"].as_str().unwrap_or("").to_string(),
            }),
            Err(e) => out
                .refused
                .push(refusal(&format!("pullDockerImages[{i}]"), None, &e)),
        }
    }
    out
}

fn refusal(action: &str, launch_id: Option<String>, reason: &str) -> Refusal {
    Refusal {
        action: action.into(),
        launch_id,
        reason: reason.into(),
    }
}

/// What the controller sent, cut short and made printable, for a reason text.
fn clip(s: &str) -> String {
    s.chars()
        .take(80)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn list<'a>(
    obj: &'a serde_json::Map<String, Value>,
    key: &str,
    refused: &mut Vec<Refusal>,
) -> Vec<(usize, &'a Value)> {
    match obj.get(key) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.iter().enumerate().collect(),
        Some(_) => {
            refused.push(refusal(key, None, "is not a list"));
            Vec::new()
        }
    }
}

fn parse_registry(r: &Value) -> Result<Registry, String> {
    let url = r["dockerRegistryURL"].as_str().unwrap_or("");
    let host = url
        .trim()
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or("")
        .to_string();
    if host.is_empty()
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
    {
        return Err(format!(
            "dockerRegistryURL {:?} is not a registry host",
            clip(url)
        ));
    }
    Ok(Registry {
        host,
        username: r["dockerUsername"].as_str().unwrap_or("").to_string(),
        // A token stands in for the password where only a token is given.
        password: r["dockerPassword"]
            .as_str()
            .filter(|p| !p.is_empty())
            .or_else(|| r["token"].as_str())
            .unwrap_or("")
            .to_string(),
    })
}

fn parse_launch(l: &Value) -> Result<Launch, (Option<String>, String)> {
    let raw_id = l["launchId"].as_str().unwrap_or("");
    if !is_id(raw_id) {
        return Err((
            None,
            format!(
                "launchId {:?} is missing or not an id ([A-Za-z0-9._-], 1-128)",
                clip(raw_id)
            ),
        ));
    }
    let id = Some(raw_id.to_string());
    let fail = |e: String| (id.clone(), e);
    let engine_id = l["engineId"].as_str().unwrap_or("");
    if !is_id(engine_id) {
        return Err(fail(format!(
            "engineId {:?} is missing or not an id ([A-Za-z0-9._-], 1-128)",
            clip(engine_id)
        )));
    }
    let build_id = l["buildId"].as_str().unwrap_or("");
    if !build_id.is_empty() && !is_id(build_id) {
        return Err(fail(format!("buildId {:?} is not an id", clip(build_id))));
    }
    let image = l["dockerImage"].as_str().unwrap_or("");
    check_image_ref(image).map_err(fail)?;
    let mut env = Vec::new();
    match &l["env"] {
        Value::Null => {}
        Value::Array(a) => {
            for (i, kv) in a.iter().enumerate() {
                let key = kv["key"].as_str().unwrap_or("");
                if !is_env_key(key) {
                    return Err(fail(format!(
                        "env[{i}].key {:?} is not a variable name ([A-Za-z_][A-Za-z0-9_]*)",
                        clip(key)
                    )));
                }
                let value = match &kv["value"] {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    _ => return Err(fail(format!("env[{i}].value of {key} is not a string"))),
                };
                if value.contains('\0') {
                    return Err(fail(format!("env[{i}].value of {key} contains a NUL byte")));
                }
                env.push((key.to_string(), value));
            }
        }
        _ => return Err(fail("env is not a list".into())),
    }
    let mut command = Vec::new();
    match &l["containerConfig"]["commandLine"] {
        Value::Null => {}
        Value::Array(a) => {
            for (i, arg) in a.iter().enumerate() {
                match arg.as_str() {
                    Some(s) if !s.contains('\0') => command.push(s.to_string()),
                    _ => {
                        return Err(fail(format!(
                            "containerConfig.commandLine[{i}] is not a string"
                        )))
                    }
                }
            }
        }
        _ => return Err(fail("containerConfig.commandLine is not a list".into())),
    }
    let num = |key: &str| -> Result<Option<i64>, (Option<String>, String)> {
        match &l[key] {
            Value::Null => Ok(None),
            v => match v.as_i64() {
                Some(n) if n >= 0 => Ok(Some(n)),
                _ => Err(fail(format!("{key} is not a whole number >= 0"))),
            },
        }
    };
    let runtime_ttl_s = num("runtimeTTL")?.filter(|n| *n > 0).map(|n| n as u64);
    let soft_min_memory = num("softMinMemory")?.filter(|n| *n > 0);
    let soft_min_vcpu = num("softMinvCPU")?.filter(|n| *n > 0);
    let is_gpu = match &l["isGPU"] {
        Value::Null => false,
        Value::Bool(b) => *b,
        _ => return Err(fail("isGPU is not true or false".into())),
    } || l["gpuType"]
        .as_str()
        .is_some_and(|t| !t.is_empty() && t != "none");
    let container_type = match l["containerType"].as_str().unwrap_or("engine") {
        t @ ("engine" | "service") => t.to_string(),
        t => {
            return Err(fail(format!(
                "containerType {:?} is not engine or service",
                clip(t)
            )))
        }
    };
    Ok(Launch {
        launch_id: raw_id.to_string(),
        engine_id: engine_id.to_string(),
        build_id: build_id.to_string(),
        image: image.to_string(),
        env,
        command,
        runtime_ttl_s,
        soft_min_memory,
        soft_min_vcpu,
        is_gpu,
        container_type,
        name: clip(l["name"].as_str().unwrap_or("")),
    })
}

/// An id the agent puts in paths, names and labels: `[A-Za-z0-9][A-Za-z0-9._-]{0,127}`, no `..`.
pub fn is_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && !s.contains("..")
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

pub fn is_env_key(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

/// A container id (hex, 12-64) or a launchId.
fn is_container_ref(s: &str) -> bool {
    is_id(s)
}

/// Docker's reference grammar (distribution/reference), strictly:
/// `[domain[:port]/]component(/component)*[:tag][@algo:hex]`.
pub fn check_image_ref(image: &str) -> Result<(), String> {
    let bad = |why: &str| {
        Err(format!(
            "dockerImage {:?} is not a valid image reference: {why}",
            clip(image)
        ))
    };
    if image.is_empty() {
        return bad("empty");
    }
    if image.len() > 255 {
        return bad("longer than 255 characters");
    }
    let (rest, digest) = match image.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (image, None),
    };
    if let Some(d) = digest {
        let Some((algo, hex)) = d.split_once(':') else {
            return bad("digest is not algorithm:hex");
        };
        let algo_ok = !algo.is_empty()
            && algo.split(['+', '.', '_', '-']).all(|p| {
                !p.is_empty()
                    && p.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            });
        if !algo_ok || hex.len() < 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return bad("digest is not algorithm:hex");
        }
    }
    let (name, tag) = match rest.rfind(':') {
        Some(i) if !rest[i..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
        _ => (rest, None),
    };
    if let Some(t) = tag {
        let b = t.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 128
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(c));
        if !ok {
            return bad("tag is not [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}");
        }
    }
    let mut parts: Vec<&str> = name.split('/').collect();
    if parts.len() > 1
        && (parts[0].contains('.') || parts[0].contains(':') || parts[0] == "localhost")
    {
        let domain = parts.remove(0);
        let (host, port) = match domain.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (domain, None),
        };
        if let Some(p) = port {
            if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return bad("registry port is not a number");
            }
        }
        let label_ok = |l: &str| {
            let b = l.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        };
        if !host.split('.').all(label_ok) {
            return bad("registry host is not a host name");
        }
    }
    for c in &parts {
        if !path_component_ok(c) {
            return bad(
                "a path component is not lowercase [a-z0-9] joined by '.', '_', '__' or '-'",
            );
        }
    }
    Ok(())
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn path_component_ok(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !alnum_lower(b[0]) || !alnum_lower(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum_lower(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum_lower(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-')) {
            return false;
        }
    }
    true
}

fn alnum_lower(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn image_refs_follow_the_reference_grammar() {
        for ok in [
            "alpine",
            "alpine:3.19",
            "library/alpine:latest",
            "registry.central.aiware.com:443/engines/foo-bar:1.0",
            "10.0.2.2:5000/task",
            "localhost/a__b/c.d-e",
            "ghcr.io/x/y@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "a/b:v1@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert!(
                check_image_ref(ok).is_ok(),
                "{ok}: {:?}",
                check_image_ref(ok)
            );
        }
        for bad in [
            "",
            "alpine;rm -rf /",
            "alpine && reboot",
            "$(reboot)",
            "`id`",
            "Alpine",
            "a//b",
            "a/b:",
            "a:b:c",
            "-alpine",
            "alpine|sh",
            "reg:port/x",
            "a/b@sha256:xyz",
            "a b",
            "a\nb",
            "../etc/passwd",
        ] {
            assert!(check_image_ref(bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_image_ref(&"a".repeat(256)).is_err());
    }

    #[test]
    fn env_keys_and_ids() {
        assert!(is_env_key("AIWARE_X") && is_env_key("_a1"));
        for k in ["", "1A", "A-B", "A B", "A;B", "A=B", "$A"] {
            assert!(!is_env_key(k), "{k:?}");
        }
        assert!(is_id("6f1c1f4e-5d1e-4a55-9a0c-3b8f2d7e9a11"));
        for i in ["", "../x", "a/b", ".x", "a b", "a;b"] {
            assert!(!is_id(i), "{i:?}");
        }
    }

    #[test]
    fn a_full_action_parses_and_unknown_fields_are_ignored() {
        let v = json!({
            "mode": "drain", "somethingNew": {"x": 1}, "agentProxyEnabled": true,
            "registries": [{"dockerRegistryURL": "https://reg.example:5000/", "dockerUsername": "u", "dockerPassword": "pw-secret", "name": "r"}],
            "launchContainer": [{
                "launchId": "L1", "engineId": "E1", "buildId": "B1", "dockerImage": "reg.example:5000/eng:1",
                "env": [{"key": "A", "value": "1"}], "containerConfig": {"commandLine": ["run", "--x=1; rm"]},
                "runtimeTTL": 60, "softMinMemory": 1048576, "softMinvCPU": 512, "isGPU": false,
                "containerType": "engine", "unknown": 5
            }],
            "terminateContainer": [{"dockerContainerId": "abc123"}],
            "pullDockerImages": [{"dockerImage": "x/y:1", "engineID": "E2", "buildID": "B2"}],
        });
        let a = parse(&v);
        assert!(a.refused.is_empty(), "{:?}", a.refused);
        assert_eq!(a.mode, Some(Mode::Drain));
        let l = &a.launches[0];
        assert_eq!(
            (
                l.launch_id.as_str(),
                l.engine_id.as_str(),
                l.build_id.as_str()
            ),
            ("L1", "E1", "B1")
        );
        assert_eq!(
            l.command,
            ["run", "--x=1; rm"],
            "argv is kept verbatim: no shell sees it"
        );
        assert_eq!(
            (l.runtime_ttl_s, l.soft_min_memory, l.soft_min_vcpu),
            (Some(60), Some(1048576), Some(512))
        );
        assert_eq!(a.terminates, ["abc123"]);
        assert_eq!(a.pulls[0].image, "x/y:1");
        assert_eq!(a.auth_for("reg.example:5000/eng:1").unwrap().username, "u");
        assert!(a.auth_for("docker.io/eng:1").is_none());
        assert!(a.secrets().contains(&"pw-secret".to_string()));
        assert!(
            !format!("{:?}", a).contains("pw-secret"),
            "Debug hides passwords"
        );
    }

    #[test]
    fn bad_entries_are_refused_one_by_one() {
        let v = json!({
            "mode": "explode",
            "launchContainer": [
                {"launchId": "L1", "engineId": "E1", "dockerImage": "alpine;reboot"},
                {"launchId": "L2", "engineId": "E1", "dockerImage": "alpine", "env": [{"key": "A;B", "value": "x"}]},
                {"launchId": "../L3", "engineId": "E1", "dockerImage": "alpine"},
                {"launchId": "L4", "engineId": "E1", "dockerImage": "alpine", "runtimeTTL": "soon"},
                {"launchId": "L5", "engineId": "E1", "dockerImage": "alpine"},
                "not an object",
            ],
            "terminateContainer": "abc",
        });
        let a = parse(&v);
        assert_eq!(a.mode, None);
        assert_eq!(a.launches.len(), 1);
        assert_eq!(a.launches[0].launch_id, "L5");
        let where_: Vec<&str> = a.refused.iter().map(|r| r.action.as_str()).collect();
        assert_eq!(
            where_,
            [
                "mode",
                "launchContainer[0]",
                "launchContainer[1]",
                "launchContainer[2]",
                "launchContainer[3]",
                "launchContainer[5]",
                "terminateContainer"
            ]
        );
        assert_eq!(a.refused[1].launch_id.as_deref(), Some("L1"));
        assert!(a.refused[1].reason.contains("not a valid image reference"));
        assert!(a.refused[2].reason.contains("not a variable name"));
        assert!(parse(&json!("x")).refused.len() == 1);
        assert!(parse(&Value::Null).is_empty());
        assert!(parse(&json!({})).is_empty());
    }

    #[test]
    fn registry_host_defaults_to_docker_hub() {
        assert_eq!(registry_host("alpine"), "docker.io");
        assert_eq!(registry_host("user/alpine"), "docker.io");
        assert_eq!(registry_host("Reg.X:5000/a"), "reg.x:5000");
        let r = vec![Registry {
            host: "registry.central.aiware.com:443".into(),
            username: "u".into(),
            password: "p".into(),
        }];
        assert!(find_auth(&r, "registry.central.aiware.com/e:1").is_some());
    }
}
