//! cloud-config `ntp`, `timezone` and `ca_certs`: the node's time servers,
//! time zone and trusted certificate authorities.
//!
//! The image's /etc is read-only, so each goes where the image points it:
//! - `ntp` → a drop-in of systemd-timesyncd in /run/systemd/timesyncd.conf.d
//!   (a configuration folder it reads beside /etc's), then timesyncd restarts;
//!   `enabled: false` stops it.
//! - `timezone` → /run/aiware/localtime, the link the image's /etc/localtime
//!   points at (UTC until the agent sets it: tmpfiles.d), to the zone's file.
//! - `ca_certs` → /run/aiware/ca-certificates.crt, the file the image's
//!   /etc/ssl/certs/ca-certificates.crt points at: the image's bundle (unless
//!   `remove_defaults`) and the certificates given. Docker (Go reads that
//!   file at its first TLS connection, a pull after the agent has run), the
//!   agent's own connections to the controller ([`crate::tls`]) and every
//!   OpenSSL or GnuTLS client of the image trust them.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ntp {
    /// false: no time synchronisation at all (cloud-init's `enabled`).
    pub enabled: bool,
    /// `servers` then `pools`: timesyncd treats both as names to ask.
    pub servers: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CaCerts {
    pub remove_defaults: bool,
    /// PEM text of each certificate given.
    pub trusted: Vec<String>,
}

/// What the image keeps of ca-certificates' bundle (see the builder's
/// customize stage, which moves it there).
pub const IMAGE_CA_BUNDLE: &str = "/usr/share/aiwimg/ca-certificates.crt";
pub const CA_BUNDLE: &str = "/run/aiware/ca-certificates.crt";
pub const LOCALTIME: &str = "/run/aiware/localtime";
pub const ZONEINFO: &str = "/usr/share/zoneinfo";
pub const TIMESYNCD_DROPIN: &str = "/run/systemd/timesyncd.conf.d/50-aiware.conf";

/// cloud-config `ntp: {enabled, ntp_client, servers, pools, …}`.
pub fn parse_ntp(v: &Value, what: &str, warnings: &mut Vec<String>) -> Result<Ntp, String> {
    let Value::Object(m) = v else {
        if v.is_null() {
            return Ok(Ntp {
                enabled: true,
                servers: Vec::new(),
            });
        }
        return Err(format!(
            "{what}: ntp must be a map (servers, pools, enabled)"
        ));
    };
    let mut ntp = Ntp {
        enabled: m.get("enabled").and_then(Value::as_bool).unwrap_or(true),
        servers: crate::cloud_values::string_list(
            m.get("servers"),
            &format!("{what}: ntp.servers"),
        )?,
    };
    ntp.servers.extend(crate::cloud_values::string_list(
        m.get("pools"),
        &format!("{what}: ntp.pools"),
    )?);
    for (k, v) in m {
        match k.as_str() {
            "enabled" | "servers" | "pools" => {}
            "ntp_client" => {
                let c = v.as_str().unwrap_or("");
                if !matches!(c, "auto" | "systemd-timesyncd" | "") {
                    warnings.push(format!(
                        "{what}: ntp.ntp_client {c:?}: aiwimg images keep time with \
                         systemd-timesyncd; the servers are given to it"
                    ));
                }
            }
            other => warnings.push(format!(
                "{what}: ntp.{other} is not used by systemd-timesyncd, the image's time \
                 client (ignored)"
            )),
        }
    }
    Ok(ntp)
}

/// cloud-config `ca_certs: {remove_defaults, trusted}` (also `ca-certs`).
pub fn parse_ca_certs(v: &Value, what: &str) -> Result<CaCerts, String> {
    let Value::Object(m) = v else {
        return Err(format!(
            "{what}: ca_certs must be a map (trusted: [PEM certificates], remove_defaults)"
        ));
    };
    let mut c = CaCerts {
        remove_defaults: m
            .get("remove_defaults")
            .or_else(|| m.get("remove-defaults"))
            .and_then(Value::as_bool)
            .unwrap_or(false),
        trusted: crate::cloud_values::string_list(
            m.get("trusted"),
            &format!("{what}: ca_certs.trusted"),
        )?,
    };
    for k in m.keys() {
        if !matches!(
            k.as_str(),
            "remove_defaults" | "remove-defaults" | "trusted"
        ) {
            return Err(format!(
                "{what}: ca_certs.{k} is not a ca_certs key (trusted, remove_defaults)"
            ));
        }
    }
    c.trusted.retain(|p| !p.trim().is_empty());
    Ok(c)
}

/// Problems with the three, checked with the other settings.
pub fn validate(ntp: Option<&Ntp>, timezone: Option<&str>, ca: Option<&CaCerts>) -> Vec<String> {
    let mut errs = Vec::new();
    if let Some(n) = ntp {
        for s in &n.servers {
            let ok = !s.is_empty()
                && s.len() <= 253
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
            if !ok {
                errs.push(format!("ntp: {s:?} is not a host name or address"));
            }
        }
    }
    if let Some(tz) = timezone {
        if !zone_name_ok(tz) {
            errs.push(not_a_zone(tz));
        }
    }
    if let Some(c) = ca {
        for (i, pem) in c.trusted.iter().enumerate() {
            match crate::tls::parse_pem(pem.as_bytes()) {
                Ok(certs) if !certs.is_empty() => {}
                Ok(_) => errs.push(format!(
                    "ca_certs.trusted[{i}] holds no certificate (-----BEGIN CERTIFICATE-----)"
                )),
                Err(e) => errs.push(format!("ca_certs.trusted[{i}] is not PEM: {e}")),
            }
        }
        if c.remove_defaults && c.trusted.is_empty() {
            errs.push(
                "ca_certs.remove_defaults with nothing trusted would leave the node trusting \
                 no one: give the certificates to trust"
                    .into(),
            );
        }
    }
    errs
}

fn zone_name_ok(tz: &str) -> bool {
    !tz.is_empty()
        && !tz.starts_with('/')
        && !tz.split('/').any(|c| c.is_empty() || c == "." || c == "..")
        && tz
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/_+-".contains(&b))
}

fn not_a_zone(tz: &str) -> String {
    format!(
        "timezone {tz:?} is not a time zone of the image (a name such as \
         Europe/Berlin, America/New_York or UTC, from {ZONEINFO})"
    )
}

/// The zone's file (e.g. `Europe/Berlin` → /usr/share/zoneinfo/Europe/Berlin).
pub fn zone_file(tz: &str, root: &Path) -> Result<String, String> {
    let path = format!("{ZONEINFO}/{tz}");
    if !zone_name_ok(tz) || !root.join(path.trim_start_matches('/')).is_file() {
        return Err(not_a_zone(tz));
    }
    Ok(path)
}

/// The timesyncd drop-in for `ntp` (None: timesyncd is stopped).
pub fn timesyncd_dropin(n: &Ntp) -> Option<String> {
    if !n.enabled {
        return None;
    }
    let mut t = String::from("# Written by aiw-agent from cloud-config `ntp`.\n[Time]\n");
    if !n.servers.is_empty() {
        t.push_str(&format!("NTP={}\n", n.servers.join(" ")));
    }
    Some(t)
}

/// The bundle /etc/ssl/certs/ca-certificates.crt resolves to.
pub fn ca_bundle(c: &CaCerts, image_bundle: &str) -> String {
    let mut out = String::new();
    if !c.remove_defaults {
        out.push_str(image_bundle);
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
    }
    for pem in &c.trusted {
        out.push_str(pem.trim());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(s: &str) -> Value {
        serde_yaml::from_str(s).unwrap()
    }

    #[test]
    fn ntp_servers_and_pools_go_to_timesyncd() {
        let mut w = Vec::new();
        let n = parse_ntp(
            &yaml("enabled: true\nntp_client: chrony\nservers: [10.0.0.2, ntp1.corp.example]\npools: [pool.corp.example]\npeers: [x]"),
            "c",
            &mut w,
        )
        .unwrap();
        assert_eq!(
            timesyncd_dropin(&n).unwrap(),
            "# Written by aiw-agent from cloud-config `ntp`.\n[Time]\nNTP=10.0.0.2 ntp1.corp.example pool.corp.example\n"
        );
        let w = w.join("\n");
        assert!(
            w.contains("ntp_client \"chrony\"") && w.contains("ntp.peers"),
            "{w}"
        );
        let off = parse_ntp(&yaml("enabled: false"), "c", &mut Vec::new()).unwrap();
        assert_eq!(timesyncd_dropin(&off), None);
        assert!(validate(Some(&n), None, None).is_empty());
        let bad = Ntp {
            enabled: true,
            servers: vec!["a b".into()],
        };
        assert!(validate(Some(&bad), None, None)[0].contains("\"a b\""));
        assert!(parse_ntp(&yaml("[a]"), "c", &mut Vec::new()).is_err());
    }

    #[test]
    fn a_timezone_must_be_a_zone_file_of_the_image() {
        let d = tempfile::tempdir().unwrap();
        let z = d.path().join("usr/share/zoneinfo/Europe");
        std::fs::create_dir_all(&z).unwrap();
        std::fs::write(z.join("Berlin"), "TZif").unwrap();
        assert_eq!(
            zone_file("Europe/Berlin", d.path()).unwrap(),
            "/usr/share/zoneinfo/Europe/Berlin"
        );
        for bad in [
            "Mars/Olympus",
            "../../etc/shadow",
            "/etc/passwd",
            "Europe",
            "",
        ] {
            let e = zone_file(bad, d.path()).unwrap_err();
            assert!(e.contains("is not a time zone"), "{bad}: {e}");
        }
        // Names alone are checked with the settings; files when applied.
        assert!(validate(None, Some("Mars/Olympus"), None).is_empty());
        assert!(!validate(None, Some("../x"), None).is_empty());
    }

    const PEM: &str =
        "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUXjZ2\n-----END CERTIFICATE-----";

    #[test]
    fn ca_certs_are_added_to_the_image_bundle() {
        let c = parse_ca_certs(
            &yaml(&format!(
                "trusted:\n  - |\n    {}\n",
                PEM.replace('\n', "\n    ")
            )),
            "c",
        )
        .unwrap();
        assert_eq!(c.trusted.len(), 1);
        assert!(!c.remove_defaults);
        let b = ca_bundle(&c, "IMAGE CAS");
        assert!(
            b.starts_with("IMAGE CAS\n-----BEGIN CERTIFICATE-----"),
            "{b}"
        );
        let only = CaCerts {
            remove_defaults: true,
            ..c.clone()
        };
        assert!(ca_bundle(&only, "IMAGE CAS").starts_with("-----BEGIN"));
        let none = CaCerts {
            remove_defaults: true,
            trusted: vec![],
        };
        assert!(validate(None, None, Some(&none))[0].contains("trusting no one"));
        let junk = CaCerts {
            remove_defaults: false,
            trusted: vec!["hello".into()],
        };
        assert!(validate(None, None, Some(&junk))[0].contains("trusted[0]"));
        assert!(parse_ca_certs(&yaml("trust: [x]"), "c").is_err());
    }
}
