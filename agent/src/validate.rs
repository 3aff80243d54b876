//! Launch settings checked against the image they are to run on (its mode
//! table and description) and against what each part of the node reads:
//! the step between `settings` (what launch data said) and the node acting
//! on it. Every problem is reported, each a full sentence saying the fix.
//! Kept out of `settings` so that data flows one way: settings know nothing
//! of services, containers or registries; this module knows them all.

use crate::modes::{ImageInfo, ModeTable, KNOWN_MODES};
use crate::settings::*;
use std::net::IpAddr;

/// What validation is checked against: the mode table and the image's description.
pub struct ImageContext<'a> {
    pub table: Option<&'a ModeTable>,
    pub image: Option<&'a ImageInfo>,
}

/// Checks settings; returns every problem found, each a full sentence saying the fix.
pub fn validate(s: &Settings, ctx: &ImageContext) -> Vec<String> {
    let mut errs = Vec::new();
    if let Err(e) = crate::update::policy::Policy::from_settings(s) {
        errs.extend(e);
    }
    let modes = s.modes();
    if s.get("AIWARE_MODE").is_none() {
        let baked = ctx
            .image
            .map(|i| format!(" (this image has: {})", i.modes.join(", ")))
            .unwrap_or_default();
        errs.push(format!(
            "AIWARE_MODE is not set: set it to the run modes of this node, e.g. AIWARE_MODE=engine{baked}"
        ));
    }
    for m in &modes {
        if !KNOWN_MODES.contains(&m.as_str()) {
            errs.push(format!(
                "unknown mode {m:?} in AIWARE_MODE; the guide's run modes are {}",
                KNOWN_MODES.join(", ")
            ));
            continue;
        }
        if let Some(img) = ctx.image {
            if !img.modes.iter().any(|b| b == m) {
                let with = img.profiles_with_mode(m);
                let hint = if with.is_empty() {
                    "no profile has it".to_string()
                } else {
                    format!("profiles that have it: {}", with.join(", "))
                };
                errs.push(format!(
                    "mode {m:?} is not baked into this image (profile {}, modes {}); {hint}",
                    img.profile,
                    img.modes.join(", ")
                ));
            }
        }
        if let Some(spec) = ctx.table.and_then(|t| t.get(m)) {
            for req in &spec.requires {
                if let Some(img) = ctx.image {
                    if !img.modes.contains(req) {
                        errs.push(format!(
                            "mode {m:?} requires mode {req:?}, which this image lacks"
                        ));
                    }
                }
            }
        }
    }
    errs.extend(crate::services::validate(s, &modes));
    if let Some(t) = ctx.table {
        errs.extend(crate::node::mode_containers::validate(s, t, &modes));
    }
    let has = |m: &str| modes.iter().any(|x| x == m);
    if has("engine") && s.controller().is_none() {
        errs.push(
            "mode engine needs AIWARE_CONTROLLER, the controller's Edge API URL, e.g. \
             AIWARE_CONTROLLER=http://IP_OF_ADMIN_NODE:9000/edge/v1"
                .into(),
        );
    }
    if let Some(v) = s.get("AIWARE_REGISTRY") {
        if let Err(e) = crate::registry_trust::parse_registry(v) {
            let shown = crate::log::scrub_url_userinfo(v);
            errs.push(format!("AIWARE_REGISTRY={shown}: {e}"));
        }
    }
    if let Some(url) = s.controller() {
        if let Err(e) = check_url(url) {
            let shown = crate::log::scrub_url_userinfo(url);
            errs.push(format!("AIWARE_CONTROLLER={shown}: {e}"));
        }
        if let Some(ca) = s.get("AIWARE_CONTROLLER_CA") {
            if let Err(e) = crate::tls::controller_ca(ca, &s.write_files) {
                errs.push(format!("AIWARE_CONTROLLER_CA: {e}"));
            } else if !url.starts_with("https://") {
                errs.push(format!(
                    "AIWARE_CONTROLLER_CA is set but AIWARE_CONTROLLER={url} is not https"
                ));
            }
        }
        if s.get("AIWARE_INIT_TOKEN").is_none() {
            errs.push(
                "AIWARE_CONTROLLER is set but AIWARE_INIT_TOKEN is not: the node needs the \
                 cluster's init token to register"
                    .into(),
            );
        }
    }
    if (has("controller") || has("engine")) && s.get("AIWARE_LICENSE").is_none() {
        errs.push(
            "AIWARE_LICENSE is not set: the guide requires a license key on controller and \
             engine nodes"
                .into(),
        );
    }
    if has("controller") && s.get("AIWARE_INIT_TOKEN").is_none() {
        errs.push(
            "mode controller needs AIWARE_INIT_TOKEN (the cluster's admin bearer token; run \
             uuidgen once and paste its output)"
                .into(),
        );
    }
    if has("lb") && s.get("AIWARE_DOMAIN_NAME").is_none() {
        errs.push("mode lb needs AIWARE_DOMAIN_NAME, the name its certificate is for".into());
    }
    for (k, v) in &s.vars {
        if v.starts_with('<') && v.ends_with('>') {
            let shown = if is_secret(k) { REDACTED } else { v.as_str() };
            errs.push(format!(
                "{k} is still the guide's placeholder {shown}: put the real value"
            ));
        }
    }
    if let Some(v) = s.get("AIWARE_HOST_EXPIRE") {
        if !matches!(v.to_ascii_lowercase().as_str(), "true" | "false") {
            errs.push(format!("AIWARE_HOST_EXPIRE={v}: must be true or false"));
        }
    }
    for k in [
        "AIWARE_AGENT_UPDATE_INTERVAL",
        "AIWARE_DB_PORT",
        "AIWARE_AGENT_PORT",
    ] {
        if let Some(v) = s.get(k) {
            if v.parse::<u32>().ok().filter(|n| *n > 0).is_none() {
                errs.push(format!("{k}={v}: must be a positive whole number"));
            }
        }
    }
    if let Some(ip) = s.get("AIWARE_HOST_IP") {
        if ip.parse::<IpAddr>().is_err() {
            errs.push(format!("AIWARE_HOST_IP={ip}: not an IPv4 or IPv6 address"));
        }
    }
    if let Some(h) = &s.hostname {
        if !valid_hostname(h) {
            errs.push(format!(
                "hostname {h:?}: use letters, digits and '-', labels of 1-63 characters, at most 253 in all"
            ));
        }
    }
    for f in &s.write_files {
        if let Err(e) = check_write_path(&f.path) {
            errs.push(e);
        }
    }
    if let Some(sw) = &s.swap {
        let f = &sw.filename;
        if !f.starts_with("/var/") || f.split('/').any(|c| c == "..") || f.ends_with('/') {
            errs.push(format!(
                "swap.filename {f:?}: the swap file must be a file under /var (the root is read-only), e.g. {}",
                crate::swap::DEFAULT_SWAP_FILE
            ));
        }
    }
    errs.extend(crate::storage::validate(&s.storage));
    errs.extend(crate::users::validate(&s.users));
    errs.extend(crate::users::validate_groups(&s.groups, &s.users));
    errs.extend(crate::os_config::validate(
        s.ntp.as_ref(),
        s.timezone.as_deref(),
        s.ca_certs.as_ref(),
    ));
    for k in &s.ssh_authorized_keys {
        if let Err(e) = check_public_key(k) {
            errs.push(e);
        }
    }
    errs
}
