//! Which registries Docker may pull from without verified TLS: at most one,
//! the cluster's own, and only when the launch data says it speaks plain HTTP.
//!
//! Every other registry is pulled from over TLS, verified against the
//! system's bundle (the image's CAs and cloud-config `ca_certs`: a private
//! registry's CA comes that way). Before this, every image trusted plain HTTP
//! from any host of 10/8, 172.16/12 and 192.168/16, so any machine on a
//! private network could serve a node its images.
//!
//! The cluster's registry, in order:
//! - `AIWARE_REGISTRY=http://HOST:PORT`: plain HTTP from that registry only
//!   (the user asked for it); `AIWARE_REGISTRY=HOST:PORT` or `https://…`: TLS.
//! - no `AIWARE_REGISTRY` and a plain-http controller (the guide's
//!   `http://IP:9000/edge/v1`): the controller's host on 5000, the guide's
//!   registry port ("HTTP, is used to pull engines and other containers";
//!   its controller node runs the registry mode). A cluster whose controller
//!   is reached over http is a plain-HTTP cluster already.
//! - otherwise none: TLS everywhere.
//!
//! Docker reads /etc/docker/daemon.json, which the image links to
//! [`DAEMON_JSON`]; tmpfiles.d points that at the image's own file
//! ([`IMAGE_DAEMON_JSON`], without `insecure-registries`) at every boot, so
//! Docker starting beside the agent is already TLS-only. When the launch
//! allows one plain-HTTP registry, the agent writes the file and asks Docker
//! to reload it (`insecure-registries` is among what dockerd reloads on
//! SIGHUP, its unit's `ExecReload`): no restart, running containers kept.
//! Loopback (127.0.0.0/8) is Docker's own exception: the registry mode's
//! node pushes to 127.0.0.1:5000 over either.

use crate::settings::Settings;
use serde_json::Value;

/// The file /etc/docker/daemon.json links to.
pub const DAEMON_JSON: &str = "/run/aiware/docker-daemon.json";
/// Docker's settings as the image was built (data-root, log driver, the
/// GPU image's runtimes), kept by the builder's customize stage.
pub const IMAGE_DAEMON_JSON: &str = "/usr/share/aiwimg/docker-daemon.json";
/// The guide's registry port, on the controller's host when no registry is named.
pub const GUIDE_REGISTRY_PORT: u16 = 5000;

/// The registry named by the launch data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterRegistry {
    /// `HOST:PORT` (or `HOST`) as image references name it.
    pub authority: String,
    pub plain_http: bool,
    /// Where it came from, for the log.
    pub from: &'static str,
}

/// `AIWARE_REGISTRY`'s `HOST[:PORT]` and whether it asks for plain HTTP, or
/// why it cannot be used. No credentials (`AIWARE_REGISTRY_USER` and
/// `_PASSWORD` carry them), no path.
pub fn parse_registry(value: &str) -> Result<(String, bool), String> {
    let v = value.trim();
    let (rest, plain_http) = if let Some(r) = v.strip_prefix("http://") {
        (r, true)
    } else if let Some(r) = v.strip_prefix("https://") {
        (r, false)
    } else if v.contains("://") {
        return Err("the scheme must be http:// or https:// (or none: TLS)".into());
    } else {
        (v, false)
    };
    let authority = rest.trim_end_matches('/');
    if authority.contains('/') {
        return Err(
            "names a path; give the registry's HOST:PORT only, e.g. http://10.0.0.5:5000".into(),
        );
    }
    // The same host and port rules as AIWARE_CONTROLLER's (never repeating
    // credentials in the message).
    crate::settings::check_url(&format!("https://{authority}"))?;
    Ok((authority.to_string(), plain_http))
}

/// The cluster's registry from the launch settings ([module docs](self)).
pub fn cluster_registry(s: &Settings) -> Option<ClusterRegistry> {
    if let Some(v) = s.get("AIWARE_REGISTRY") {
        let (authority, plain_http) = parse_registry(v).ok()?;
        return Some(ClusterRegistry {
            authority,
            plain_http,
            from: "AIWARE_REGISTRY",
        });
    }
    let rest = s.controller()?.strip_prefix("http://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let host = match authority.strip_prefix('[') {
        Some(v6) => format!("[{}]", v6.split(']').next()?),
        None => authority
            .rsplit_once(':')
            .map_or(authority, |(h, _)| h)
            .to_string(),
    };
    Some(ClusterRegistry {
        authority: format!("{host}:{GUIDE_REGISTRY_PORT}"),
        plain_http: true,
        from: "the plain-http controller's host, the guide's registry port",
    })
}

/// Docker's daemon.json: the image's, with `insecure-registries` holding the
/// one plain-HTTP registry or nothing.
pub fn daemon_json(image: &str, plain_http: Option<&str>) -> Result<String, String> {
    let mut v: Value = serde_json::from_str(image)
        .map_err(|e| format!("the image's {IMAGE_DAEMON_JSON} is not JSON: {e}"))?;
    let Some(m) = v.as_object_mut() else {
        return Err(format!(
            "the image's {IMAGE_DAEMON_JSON} is not a JSON object"
        ));
    };
    match plain_http {
        Some(a) => {
            m.insert("insecure-registries".into(), Value::from(vec![a]));
        }
        None => {
            m.remove("insecure-registries");
        }
    }
    let mut text = serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?;
    text.push('\n');
    Ok(text)
}

/// What the node trusts, for the log.
pub fn describe(r: Option<&ClusterRegistry>) -> String {
    match r {
        Some(r) if r.plain_http => format!(
            "registry trust: plain HTTP from {} only ({}); every other registry over verified TLS",
            r.authority, r.from
        ),
        Some(r) => format!(
            "registry trust: the cluster's registry {} and every other over verified TLS",
            r.authority
        ),
        None => "registry trust: every registry over verified TLS".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(text: &str) -> Settings {
        Settings::from_user_data(crate::userdata::parse(text.as_bytes()).unwrap(), None)
    }

    #[test]
    fn the_launch_names_the_one_plain_http_registry() {
        let r = |t: &str| cluster_registry(&settings(t));
        let named = r("AIWARE_REGISTRY=http://10.0.0.7:5000/\nAIWARE_CONTROLLER=http://10.0.0.5:9000/edge/v1\n").unwrap();
        assert_eq!(
            (named.authority.as_str(), named.plain_http, named.from),
            ("10.0.0.7:5000", true, "AIWARE_REGISTRY")
        );
        let tls = r("AIWARE_REGISTRY=registry.corp.example:443\nAIWARE_CONTROLLER=http://10.0.0.5:9000/edge/v1\n").unwrap();
        assert!(!tls.plain_http);
        assert!(
            !r("AIWARE_REGISTRY=https://registry.corp.example\n")
                .unwrap()
                .plain_http
        );
        // The guide's cluster: the controller's host, port 5000, over http.
        let guide = r("AIWARE_CONTROLLER=http://10.0.0.5:9000/edge/v1\n").unwrap();
        assert_eq!(
            (guide.authority.as_str(), guide.plain_http),
            ("10.0.0.5:5000", true)
        );
        let v6 = r("AIWARE_CONTROLLER=http://[fd00::5]:9000/edge/v1\n").unwrap();
        assert_eq!(v6.authority, "[fd00::5]:5000");
        // A controller over https asks for no plain HTTP anywhere.
        assert_eq!(
            r("AIWARE_CONTROLLER=https://edge.corp.example/edge/v1\n"),
            None
        );
        assert_eq!(r("AIWARE_MODE=registry\n"), None);
    }

    #[test]
    fn registry_values_that_cannot_be_used_say_why_without_secrets() {
        for (v, want) in [
            ("ftp://r:5000", "scheme"),
            ("http://r:5000/v2/x", "path"),
            ("http://user:hunter2@r:5000", "user name or password"),
            ("http://r:99999", "port"),
            ("http://", "no host"),
        ] {
            let e = parse_registry(v).unwrap_err();
            assert!(e.contains(want), "{v}: {e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn daemon_json_keeps_the_image_settings_and_only_the_one_registry() {
        let image = r#"{"data-root": "/var/lib/docker", "insecure-registries": ["10.0.0.0/8"],
            "runtimes": {"nvidia": {"path": "/usr/bin/nvidia-container-runtime"}}}"#;
        let tls: Value = serde_json::from_str(&daemon_json(image, None).unwrap()).unwrap();
        assert_eq!(tls.get("insecure-registries"), None);
        assert_eq!(
            tls["runtimes"]["nvidia"]["path"],
            "/usr/bin/nvidia-container-runtime"
        );
        let one: Value =
            serde_json::from_str(&daemon_json(image, Some("10.0.0.7:5000")).unwrap()).unwrap();
        assert_eq!(
            one["insecure-registries"],
            serde_json::json!(["10.0.0.7:5000"])
        );
        assert_eq!(one["data-root"], "/var/lib/docker");
        assert!(daemon_json("[1]", None)
            .unwrap_err()
            .contains("not a JSON object"));
        assert!(daemon_json("{", None).unwrap_err().contains("not JSON"));
    }
}
