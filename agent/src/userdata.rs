//! User-data formats: `#cloud-config` YAML, `KEY=VALUE` lines (the guide's own
//! `export` snippets, parsed and never executed), TOML, MIME multipart, gzip
//! and base64, nested in any order up to a small depth.
//!
//! The result is a [`UserData`]: every `AIWARE_*` variable found plus the common
//! cloud-config keys (hostname, ssh_authorized_keys, write_files).

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Read;

/// Largest user-data we accept, before and after decompression.
pub const MAX_USER_DATA: usize = 16 << 20;
const MAX_DEPTH: usize = 6;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UserData {
    /// `AIWARE_*` variables, keys upper-case with the prefix.
    pub vars: BTreeMap<String, String>,
    pub hostname: Option<String>,
    pub ssh_authorized_keys: Vec<String>,
    pub write_files: Vec<WriteFile>,
    /// cloud-config `swap`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap: Option<crate::swap::Swap>,
    /// cloud-config `disk_setup`, `fs_setup` and `mounts`.
    #[serde(default, skip_serializing_if = "crate::storage::Storage::is_empty")]
    pub storage: crate::storage::Storage,
    /// cloud-config `users`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<crate::users::User>,
    /// cloud-config `groups`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<crate::users::Group>,
    /// cloud-config `ntp`, `timezone`, `ca_certs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ntp: Option<crate::os_config::Ntp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certs: Option<crate::os_config::CaCerts>,
    /// What the parser skipped or guessed, for the operator.
    pub warnings: Vec<String>,
    /// The formats met, outermost first (e.g. `gzip`, `cloud-config`).
    pub formats: Vec<String>,
    /// Where each of `vars` (and `hostname`) was last set, e.g.
    /// `MIME part 2 (text/cloud-config): aiware.mode`, for the warnings on
    /// settings given twice.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub origins: BTreeMap<String, String>,
    /// The MIME part being read (`MIME part 2`, `MIME part 1.3`), empty outside.
    #[serde(skip)]
    part: String,
}

impl UserData {
    fn place(&self, what: &str) -> String {
        if self.part.is_empty() {
            what.to_string()
        } else {
            format!("{}: {what}", self.part)
        }
    }

    /// Sets a variable; a different value given before is a warning naming
    /// both places and the one that wins (the later one, as cloud-init merges).
    fn set_var(&mut self, key: String, value: String, what: &str) {
        let place = self.place(what);
        if let Some(old) = self.vars.get(&key) {
            if *old != value {
                let before = self.origins.get(&key).cloned().unwrap_or_default();
                let (o, n) = if crate::settings::is_secret(&key) {
                    (
                        crate::settings::REDACTED.to_string(),
                        crate::settings::REDACTED.to_string(),
                    )
                } else {
                    (
                        crate::log::scrub_url_userinfo(old),
                        crate::log::scrub_url_userinfo(&value),
                    )
                };
                self.warnings.push(format!(
                    "{key} is given twice with different values: {before} sets {o:?}, \
                     {place} sets {n:?}; the later one ({place}) wins"
                ));
            }
        }
        self.origins.insert(key.clone(), place);
        self.vars.insert(key, value);
    }

    fn set_hostname(&mut self, h: &str, what: &str) {
        let place = self.place(what);
        if let Some(old) = &self.hostname {
            if old != h {
                let before = self.origins.get("hostname").cloned().unwrap_or_default();
                self.warnings.push(format!(
                    "hostname is given twice with different values: {before} sets {old:?}, \
                     {place} sets {h:?}; the later one ({place}) wins"
                ));
            }
        }
        self.origins.insert("hostname".into(), place);
        self.hostname = Some(h.to_string());
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WriteFile {
    pub path: String,
    /// Decoded content (the `encoding` of the source is already applied).
    pub content: Vec<u8>,
    /// Octal permissions, default 0644.
    pub permissions: u32,
    pub append: bool,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

fn perr(s: impl Into<String>) -> ParseError {
    ParseError(s.into())
}

/// Parses raw user-data bytes of any supported format.
pub fn parse(data: &[u8]) -> Result<UserData, ParseError> {
    let mut out = UserData::default();
    parse_into(data, &mut out, 0)?;
    Ok(out)
}

fn parse_into(data: &[u8], out: &mut UserData, depth: usize) -> Result<(), ParseError> {
    if depth > MAX_DEPTH {
        return Err(perr(format!(
            "user-data is nested more than {MAX_DEPTH} levels deep (gzip/base64/multipart)"
        )));
    }
    if data.len() > MAX_USER_DATA {
        return Err(perr(format!(
            "user-data is {} bytes; the limit is {MAX_USER_DATA}",
            data.len()
        )));
    }
    if data.starts_with(&[0x1f, 0x8b]) {
        out.formats.push("gzip".into());
        return parse_into(&gunzip(data)?, out, depth + 1);
    }
    let text = std::str::from_utf8(data)
        .map_err(|e| perr(format!("user-data is neither gzip nor UTF-8 text ({e})")))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let trimmed = text.trim_start();
    if trimmed.is_empty() {
        out.formats.push("empty".into());
        return Ok(());
    }
    let first_line = trimmed.lines().next().unwrap_or("").trim_end();
    let lower = first_line.to_ascii_lowercase();
    if lower.starts_with("content-type:") || lower.starts_with("mime-version:") {
        out.formats.push("mime-multipart".into());
        return parse_mime(trimmed, out, depth);
    }
    if let Some(e) = refused_header(first_line) {
        return Err(perr(e));
    }
    if first_line == "#cloud-config-archive" {
        out.formats.push("cloud-config-archive".into());
        return parse_archive(trimmed, out, depth);
    }
    if first_line == "#cloud-config" || first_line.starts_with("#cloud-config ") {
        out.formats.push("cloud-config".into());
        let doc: Value = serde_yaml::from_str(trimmed)
            .map_err(|e| perr(format!("#cloud-config is not valid YAML: {e}")))?;
        return take_document(&doc, out, "cloud-config");
    }
    if first_line.starts_with("#!") && !looks_like_shell(first_line) {
        return Err(perr(format!(
            "user-data starts with {first_line:?}: scripts are not run on aiwimg images; \
             give AIWARE_* settings as KEY=VALUE lines, #cloud-config or TOML"
        )));
    }
    if let Some(decoded) = try_base64(trimmed) {
        out.formats.push("base64".into());
        return parse_into(&decoded, out, depth + 1);
    }
    if looks_like_toml(trimmed) {
        if let Ok(doc) = toml::from_str::<Value>(trimmed) {
            out.formats.push("toml".into());
            return take_document(&doc, out, "TOML");
        }
    }
    out.formats.push("env".into());
    parse_env(trimmed, out)
}

/// The first lines cloud-init gives a meaning aiwimg images do not: an error
/// saying so, instead of reading the text as KEY=VALUE lines.
fn refused_header(first_line: &str) -> Option<String> {
    let l = first_line.trim();
    let lower = l.to_ascii_lowercase();
    if lower.starts_with("#include") {
        let which = if lower.starts_with("#include-once") {
            "#include-once"
        } else {
            "#include"
        };
        return Some(format!(
            "user-data starts with {which}: cloud-init would download the URLs listed; \
             aiw-agent does not fetch user-data from URLs. Put the content itself in user-data \
             (MIME multipart can combine several parts)"
        ));
    }
    if lower.starts_with("## template:") || lower.starts_with("##template:") {
        return Some(format!(
            "user-data starts with {l:?}: aiw-agent does not render templates (cloud-init's \
             jinja with instance metadata such as v1.local_hostname); the instance's hostname, \
             region and type are taken from the platform without it. Write the values themselves"
        ));
    }
    if lower.starts_with("#cloud-boothook") {
        return Some(
            "user-data is a #cloud-boothook: boot hooks are scripts, and scripts are not run on \
             aiwimg images; give AIWARE_* settings and declarative #cloud-config keys instead"
                .into(),
        );
    }
    if lower.starts_with("#part-handler") {
        return Some(
            "user-data is a #part-handler: part handlers are Python code cloud-init would load; \
             aiw-agent runs no code from user-data. Use #cloud-config or KEY=VALUE parts"
                .into(),
        );
    }
    None
}

/// `#cloud-config-archive`: a YAML list of parts, each a string (cloud-config)
/// or a map with `content` and an optional `type` (a MIME type).
fn parse_archive(text: &str, out: &mut UserData, depth: usize) -> Result<(), ParseError> {
    let doc: Value = serde_yaml::from_str(text)
        .map_err(|e| perr(format!("#cloud-config-archive is not valid YAML: {e}")))?;
    let Value::Array(items) = doc else {
        return Err(perr(
            "#cloud-config-archive must be a list of parts (`- type: text/cloud-config` with `content:`)",
        ));
    };
    let outer = out.part.clone();
    for (i, item) in items.iter().enumerate() {
        let (ctype, content) = match item {
            Value::String(c) => ("text/cloud-config".to_string(), c.clone()),
            Value::Object(m) => {
                let content = match m.get("content") {
                    Some(Value::String(c)) => c.clone(),
                    None | Some(Value::Null) => String::new(),
                    Some(_) => {
                        return Err(perr(format!(
                            "#cloud-config-archive part {}: `content` must be a string",
                            i + 1
                        )))
                    }
                };
                let ctype = m
                    .get("type")
                    .and_then(Value::as_str)
                    .map(String::from)
                    .unwrap_or_else(|| guess_type(&content));
                (ctype, content)
            }
            _ => {
                return Err(perr(format!(
                    "#cloud-config-archive part {} must be a string or a map with `content`",
                    i + 1
                )))
            }
        };
        out.part = child_label(&outer, "archive part", i + 1);
        parse_part(&ctype, content.as_bytes(), out, depth)?;
    }
    out.part = outer;
    Ok(())
}

/// The MIME type a part without one has, from its first line (as cloud-init guesses).
fn guess_type(content: &str) -> String {
    let first = content.trim_start().lines().next().unwrap_or("");
    if first.starts_with("#cloud-config") {
        "text/cloud-config"
    } else {
        "text/plain"
    }
    .into()
}

fn child_label(outer: &str, what: &str, n: usize) -> String {
    if outer.is_empty() {
        format!("{what} {n}")
    } else {
        format!("{outer}.{n}")
    }
}

fn looks_like_shell(first_line: &str) -> bool {
    ["/sh", "/bash", "/dash", "env sh", "env bash"]
        .iter()
        .any(|s| first_line.ends_with(s) || first_line.contains(&format!("{s} ")))
}

fn gunzip(data: &[u8]) -> Result<Vec<u8>, ParseError> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(data)
        .take(MAX_USER_DATA as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| {
            perr(format!(
                "user-data looks gzipped but does not decompress: {e}"
            ))
        })?;
    if out.len() > MAX_USER_DATA {
        return Err(perr(format!(
            "gzipped user-data expands past {MAX_USER_DATA} bytes"
        )));
    }
    Ok(out)
}

/// Whole-text base64 (as EC2 consoles and Azure deliver it); `None` when the
/// text is not base64 or does not decode to something we can read.
fn try_base64(text: &str) -> Option<Vec<u8>> {
    let compact: String = text.split_ascii_whitespace().collect();
    if compact.len() < 8
        || !compact
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=')
        // KEY=VALUE text is also made of base64 characters; base64 of text has no '=' but at the end.
        || compact.trim_end_matches('=').contains('=')
    {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .ok()?;
    if decoded.starts_with(&[0x1f, 0x8b]) || std::str::from_utf8(&decoded).is_ok() {
        Some(decoded)
    } else {
        None
    }
}

fn looks_like_toml(text: &str) -> bool {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .any(|l| {
            (l.starts_with('[') && l.ends_with(']'))
                || l.split_once('=')
                    .is_some_and(|(k, v)| k.ends_with(' ') && v.starts_with(' '))
        })
}

/// Reads the document keys shared by cloud-config and TOML.
fn take_document(doc: &Value, out: &mut UserData, what: &str) -> Result<(), ParseError> {
    let Value::Object(map) = doc else {
        if doc.is_null() {
            return Ok(());
        }
        return Err(perr(format!("{what} must be a map of keys")));
    };
    for (key, val) in map {
        match key.as_str() {
            "aiware" => {
                let Value::Object(aw) = val else {
                    return Err(perr(format!(
                        "{what}: `aiware` must be a map such as `mode: [engine]`"
                    )));
                };
                for (k, v) in aw {
                    let name = aiware_key(k);
                    let value = scalar_or_list(v).ok_or_else(|| {
                        perr(format!(
                            "{what}: aiware.{k} must be a string, number, boolean or list"
                        ))
                    })?;
                    check_no_substitution(&name, &value, &format!("aiware.{k}"))?;
                    out.set_var(name, value, &format!("{what} aiware.{k}"));
                }
            }
            k if k.to_ascii_uppercase().starts_with("AIWARE_") => {
                let value = scalar_or_list(val)
                    .ok_or_else(|| perr(format!("{what}: {k} must be a string")))?;
                let name = k.to_ascii_uppercase();
                check_no_substitution(&name, &value, k)?;
                out.set_var(name, value, &format!("{what} {k}"));
            }
            "hostname" | "fqdn" => {
                let h = val
                    .as_str()
                    .ok_or_else(|| perr(format!("{what}: {key} must be a string")))?;
                // `hostname` wins over `fqdn` in the same document, as in cloud-init.
                if key == "hostname" || !map.contains_key("hostname") {
                    out.set_hostname(h, &format!("{what} {key}"));
                }
            }
            "ssh_authorized_keys" => {
                let Value::Array(keys) = val else {
                    return Err(perr(format!(
                        "{what}: ssh_authorized_keys must be a list of public keys"
                    )));
                };
                for k in keys {
                    let k = k.as_str().ok_or_else(|| {
                        perr(format!(
                            "{what}: ssh_authorized_keys entries must be strings"
                        ))
                    })?;
                    out.ssh_authorized_keys.push(k.trim().to_string());
                }
            }
            "write_files" => {
                let Value::Array(files) = val else {
                    return Err(perr(format!("{what}: write_files must be a list")));
                };
                for (i, f) in files.iter().enumerate() {
                    out.write_files.push(write_file(f, i, what)?);
                }
            }
            "swap" => {
                let Value::Object(m) = val else {
                    return Err(perr(format!(
                        "{what}: swap must be a map (filename, size, maxsize)"
                    )));
                };
                let size = |k: &str| match m.get(k) {
                    None | Some(Value::Null) => Ok(None),
                    Some(v) => crate::swap::parse_size(v)
                        .map_err(|e| perr(format!("{what}: swap.{k}: {e}"))),
                };
                let filename = match m.get("filename") {
                    None | Some(Value::Null) => crate::swap::DEFAULT_SWAP_FILE.to_string(),
                    Some(Value::String(f)) => f.clone(),
                    Some(_) => return Err(perr(format!("{what}: swap.filename must be a path"))),
                };
                // cloud-init: no size means no swap file.
                let sized = match m.get("size") {
                    None | Some(Value::Null) => Some(0),
                    Some(_) => size("size")?,
                };
                out.swap = Some(crate::swap::Swap {
                    filename,
                    size: sized,
                    maxsize: size("maxsize")?,
                });
            }
            "disk_setup" => out
                .storage
                .disks
                .extend(crate::storage::parse_disk_setup(val, what).map_err(perr)?),
            "fs_setup" => out
                .storage
                .filesystems
                .extend(crate::storage::parse_fs_setup(val, what).map_err(perr)?),
            "mounts" => out.storage.mounts.extend(
                crate::storage::parse_mounts(val, map.get("mount_default_fields"), what)
                    .map_err(perr)?,
            ),
            // Read with `mounts`.
            "mount_default_fields" => {}
            "users" => {
                let u = crate::users::parse_users(val, what, &mut out.warnings).map_err(perr)?;
                out.users.extend(u);
            }
            "groups" => out
                .groups
                .extend(crate::users::parse_groups(val, what).map_err(perr)?),
            "ntp" => {
                out.ntp =
                    Some(crate::os_config::parse_ntp(val, what, &mut out.warnings).map_err(perr)?)
            }
            "timezone" => {
                let tz = val.as_str().ok_or_else(|| {
                    perr(format!(
                        "{what}: timezone must be a name such as Europe/Berlin"
                    ))
                })?;
                out.timezone = Some(tz.trim().to_string());
            }
            "runcmd" | "bootcmd" => out.warnings.extend(commands_refused(key, val, what)),
            "packages"
            | "package_update"
            | "package_upgrade"
            | "package_reboot_if_required"
            | "apt" => out.warnings.push(format!(
                "{what}: `{key}` ignored: aiwimg images are immutable and install no packages \
                 at boot; packages are baked in at build time (the profile's `packages`)"
            )),
            "ca_certs" | "ca-certs" => {
                out.ca_certs = Some(crate::os_config::parse_ca_certs(val, what).map_err(perr)?)
            }
            other => out.warnings.push(format!(
                "{what}: key `{other}` is not used by aiwimg images (ignored)"
            )),
        }
    }
    Ok(())
}

/// `runcmd`/`bootcmd`: nothing runs; each command that a declarative key
/// replaces is named with that key.
fn commands_refused(key: &str, val: &Value, what: &str) -> Vec<String> {
    const INSTEAD: &[(&[&str], &str)] = &[
        (
            &[
                "mkfs",
                "mkfs.ext4",
                "mkfs.xfs",
                "parted",
                "sgdisk",
                "sfdisk",
                "fdisk",
                "mount",
            ],
            "disk_setup, fs_setup and mounts",
        ),
        (
            &["mkswap", "swapon", "fallocate"],
            "swap (or fs_setup with filesystem: swap)",
        ),
        (&["useradd", "adduser", "usermod"], "users"),
        (
            &["groupadd", "addgroup", "gpasswd"],
            "groups (members) or users (their groups)",
        ),
        (&["timedatectl", "ln"], "timezone (or ntp)"),
        (&["update-ca-certificates"], "ca_certs"),
        (&["hostnamectl", "hostname"], "hostname"),
        (
            &["apt", "apt-get", "dpkg"],
            "the profile's `packages`, baked in at build time",
        ),
        (
            &["export"],
            "AIWARE_* settings (KEY=VALUE user-data or the `aiware:` map)",
        ),
    ];
    let mut out = vec![format!(
        "{what}: `{key}` ignored: user-data is parsed, never executed, on aiwimg images"
    )];
    let Value::Array(cmds) = val else {
        return out;
    };
    for c in cmds {
        let line = match c {
            Value::String(s) => s.clone(),
            Value::Array(a) => a
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" "),
            _ => continue,
        };
        let words: Vec<&str> = line.split_whitespace().collect();
        let program = words
            .iter()
            .find(|w| !matches!(**w, "sudo" | "-E"))
            .map(|w| w.rsplit('/').next().unwrap_or(w))
            .unwrap_or("");
        if let Some((_, instead)) = INSTEAD.iter().find(|(progs, _)| {
            progs.contains(&program) || (program.starts_with("mkfs.") && progs.contains(&"mkfs"))
        }) {
            let shown: String = line.chars().take(60).collect();
            out.push(format!("{what}: `{shown}` in {key}: use {instead} instead"));
        }
    }
    out
}

/// `mode` → `AIWARE_MODE`, `AIWARE_MODE` stays.
fn aiware_key(k: &str) -> String {
    let up = k.to_ascii_uppercase().replace('-', "_");
    if up.starts_with("AIWARE_") {
        up
    } else {
        format!("AIWARE_{up}")
    }
}

fn scalar_or_list(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::Array(_) | Value::Object(_) | Value::Null => None,
                other => scalar_or_list(other),
            })
            .collect::<Option<Vec<_>>>()
            .map(|v| v.join(",")),
        _ => None,
    }
}

fn write_file(f: &Value, i: usize, what: &str) -> Result<WriteFile, ParseError> {
    let at = |m: &str| perr(format!("{what}: write_files[{i}]: {m}"));
    let path = f["path"]
        .as_str()
        .ok_or_else(|| at("`path` is missing"))?
        .to_string();
    let raw = match &f["content"] {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        _ => return Err(at("`content` must be a string")),
    };
    let encoding = f["encoding"]
        .as_str()
        .unwrap_or("text")
        .to_ascii_lowercase();
    let content = match encoding.as_str() {
        "text" | "" => raw.into_bytes(),
        "b64" | "base64" => b64(&raw).map_err(|e| at(&format!("base64 content: {e}")))?,
        "gz+b64" | "gzip+base64" | "gz+base64" | "gzip+b64" => {
            gunzip(&b64(&raw).map_err(|e| at(&format!("base64 content: {e}")))?)?
        }
        other => {
            return Err(at(&format!(
                "encoding {other:?} is not one of text, b64, gzip+base64"
            )))
        }
    };
    let permissions = match &f["permissions"] {
        Value::Null => 0o644,
        Value::String(s) => u32::from_str_radix(s.trim_start_matches("0o"), 8)
            .ok()
            .filter(|p| *p <= 0o7777)
            .ok_or_else(|| at(&format!("permissions {s:?} is not octal like '0644'")))?,
        // An integer is the mode itself, as cloud-init takes it: `0o600` is
        // 384, `493` is 0755, `0x1ed` too. (An unquoted `0644` is not an
        // integer to this YAML reader but the string "0644": octal above.)
        Value::Number(n) => n
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .filter(|p| *p <= 0o7777)
            .ok_or_else(|| {
                at(&format!(
                    "permissions {n} is not a file mode (0 to 0o7777, e.g. '0644', 0o644 or 420)"
                ))
            })?,
        _ => return Err(at("permissions must be octal like '0644'")),
    };
    let append = f["append"].as_bool().unwrap_or(false);
    Ok(WriteFile {
        path,
        content,
        permissions,
        append,
    })
}

fn b64(s: &str) -> Result<Vec<u8>, base64::DecodeError> {
    let compact: String = s.split_ascii_whitespace().collect();
    base64::engine::general_purpose::STANDARD.decode(compact)
}

/// Rejects shell substitutions: user-data is parsed, never executed.
fn check_no_substitution(key: &str, value: &str, at: &str) -> Result<(), ParseError> {
    // The value is quoted back to help, except a secret's.
    let shown = if crate::settings::is_secret(key) {
        crate::settings::REDACTED.to_string()
    } else {
        crate::log::scrub_url_userinfo(value)
    };
    if value.contains("$(") || value.contains('`') {
        return Err(perr(format!(
            "{at}: {key} uses a command substitution ({shown}); user-data is parsed, never \
             executed, so nothing would run it. Run the command once yourself (e.g. uuidgen) \
             and paste its output as the value"
        )));
    }
    if value.contains('$') {
        return Err(perr(format!(
            "{at}: {key} refers to a shell variable ({shown}); user-data is parsed, never \
             executed. Write the value itself"
        )));
    }
    Ok(())
}

/// `KEY=VALUE` lines with optional `export` and quotes, as in the guide's snippets.
fn parse_env(text: &str, out: &mut UserData) -> Result<(), ParseError> {
    for (n, raw) in text.lines().enumerate() {
        let lineno = n + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let body = line
            .strip_prefix("export ")
            .map(str::trim_start)
            .unwrap_or(line);
        let assignment = body.split_once('=').filter(|(k, _)| {
            !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        });
        let Some((key, rest)) = assignment else {
            let cmd: String = line.chars().take(60).collect();
            out.warnings.push(format!(
                "line {lineno}: `{cmd}` is a command, not a KEY=VALUE setting; user-data is \
                 parsed, never executed (ignored)"
            ));
            continue;
        };
        let value = unquote(rest).map_err(|m| perr(format!("line {lineno}: {key}: {m}")))?;
        if !key.to_ascii_uppercase().starts_with("AIWARE_") {
            out.warnings.push(format!(
                "line {lineno}: {key} is not an AIWARE_* setting (ignored)"
            ));
            continue;
        }
        let single_quoted = rest.trim_start().starts_with('\'');
        if !single_quoted {
            check_no_substitution(key, &value, &format!("line {lineno}"))?;
        }
        out.set_var(key.to_ascii_uppercase(), value, &format!("line {lineno}"));
    }
    Ok(())
}

/// Shell-like value: `"..."` (with \" \\ \$ \` escapes), `'...'`, or bare up to a
/// comment; `uuidgen`-style backticks are kept for the substitution check.
fn unquote(rest: &str) -> Result<String, String> {
    let rest = rest.trim_end();
    let mut chars = rest.chars().peekable();
    let mut out = String::new();
    match chars.peek() {
        Some('"') => {
            chars.next();
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '\\' => match chars.next() {
                        Some(e @ ('"' | '\\' | '$' | '`')) => {
                            // An escaped $ or ` is literal: mark it so the check lets it pass.
                            if e == '$' || e == '`' {
                                return Err(format!(
                                    "escaped {e:?} in a value is not supported; write the value plainly"
                                ));
                            }
                            out.push(e)
                        }
                        Some(o) => {
                            out.push('\\');
                            out.push(o)
                        }
                        None => return Err("ends inside a double-quoted value".into()),
                    },
                    '"' => {
                        closed = true;
                        break;
                    }
                    c => out.push(c),
                }
            }
            if !closed {
                return Err("has an unclosed double quote".into());
            }
        }
        Some('\'') => {
            chars.next();
            let mut closed = false;
            for c in chars.by_ref() {
                if c == '\'' {
                    closed = true;
                    break;
                }
                out.push(c);
            }
            if !closed {
                return Err("has an unclosed single quote".into());
            }
        }
        _ => {
            for c in chars.by_ref() {
                if c == '#' && out.ends_with(char::is_whitespace) {
                    break;
                }
                out.push(c);
            }
            return Ok(out.trim_end().to_string());
        }
    }
    let tail: String = chars.collect();
    let tail = tail.trim();
    if !tail.is_empty() && !tail.starts_with('#') {
        return Err(format!("unexpected text after the closing quote: {tail:?}"));
    }
    Ok(out)
}

/// MIME multipart (as `cloud-init devel make-mime` and write-mime-multipart make it).
fn parse_mime(text: &str, out: &mut UserData, depth: usize) -> Result<(), ParseError> {
    let (headers, body) = split_headers(text);
    let ctype = header(&headers, "content-type").unwrap_or_default();
    if !ctype.to_ascii_lowercase().starts_with("multipart/") {
        // A single MIME part.
        let data = decode_part(&headers, body)?;
        return parse_part(&ctype, &data, out, depth);
    }
    parse_multipart(&ctype, body, out, depth)
}

/// The body of a `multipart/*` entity: its parts, each read by its own type;
/// a part that is itself multipart is read the same way (nested, as cloud-init does).
fn parse_multipart(
    ctype: &str,
    body: &str,
    out: &mut UserData,
    depth: usize,
) -> Result<(), ParseError> {
    if depth > MAX_DEPTH {
        return Err(perr(format!(
            "user-data is nested more than {MAX_DEPTH} levels deep (gzip/base64/multipart)"
        )));
    }
    let boundary = mime_param(ctype, "boundary")
        .ok_or_else(|| perr("MIME user-data: multipart Content-Type without a boundary"))?;
    if boundary.is_empty() {
        return Err(perr("MIME user-data: empty multipart boundary"));
    }
    let delim = format!("--{boundary}");
    let mut parts = 0;
    let outer = out.part.clone();
    for chunk in body.split(delim.as_str()).skip(1) {
        if chunk.starts_with("--") {
            break;
        }
        let chunk = chunk
            .strip_prefix("\r\n")
            .or_else(|| chunk.strip_prefix('\n'))
            .unwrap_or(chunk);
        let (ph, pbody) = split_headers(chunk);
        let pbody = pbody
            .strip_suffix("\r\n")
            .or_else(|| pbody.strip_suffix('\n'))
            .unwrap_or(pbody);
        let pct = header(&ph, "content-type").unwrap_or_else(|| "text/plain".into());
        parts += 1;
        out.part = child_label(&outer, "MIME part", parts);
        if pct
            .to_ascii_lowercase()
            .trim_start()
            .starts_with("multipart/")
        {
            out.formats.push("mime-multipart".into());
            let data = decode_part(&ph, pbody)?;
            let inner = std::str::from_utf8(&data)
                .map_err(|e| perr(format!("{}: multipart body is not UTF-8 ({e})", out.part)))?;
            parse_multipart(&pct, inner, out, depth + 1)?;
        } else {
            let data = decode_part(&ph, pbody)?;
            parse_part(&pct, &data, out, depth)?;
        }
    }
    out.part = outer;
    if parts == 0 {
        return Err(perr(format!(
            "MIME user-data: no part found with boundary {boundary:?}"
        )));
    }
    Ok(())
}

fn parse_part(
    ctype: &str,
    data: &[u8],
    out: &mut UserData,
    depth: usize,
) -> Result<(), ParseError> {
    let ct = ctype
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let at = if out.part.is_empty() {
        "MIME user-data".to_string()
    } else {
        out.part.clone()
    };
    let refused = match ct.as_str() {
        "text/x-include-url" | "text/x-include-once-url" => Some(format!(
            "{at} is {ct}: cloud-init would download the URLs listed; aiw-agent does not fetch \
             user-data from URLs. Put the content itself in the part"
        )),
        "text/jinja2" => Some(format!(
            "{at} is {ct}: aiw-agent does not render jinja templates; write the values themselves"
        )),
        "text/cloud-boothook" => Some(format!(
            "{at} is a {ct}: boot hooks are scripts, and scripts are not run on aiwimg images; \
             use AIWARE_* settings and declarative #cloud-config keys"
        )),
        "text/part-handler" => Some(format!(
            "{at} is a {ct}: part handlers are Python code; aiw-agent runs no code from user-data"
        )),
        _ => None,
    };
    if let Some(e) = refused {
        return Err(perr(e));
    }
    if ct.starts_with("multipart/") {
        let text = std::str::from_utf8(data)
            .map_err(|e| perr(format!("{at}: multipart body is not UTF-8 ({e})")))?;
        out.formats.push("mime-multipart".into());
        return parse_multipart(ctype, text, out, depth + 1);
    }
    match ct.as_str() {
        "text/cloud-config-archive" => {
            let text = std::str::from_utf8(data)
                .map_err(|e| perr(format!("{at}: cloud-config-archive is not UTF-8 ({e})")))?;
            out.formats.push("cloud-config-archive".into());
            parse_archive(text, out, depth + 1)
        }
        "text/cloud-config"
        | "text/x-shellscript"
        | "text/plain"
        | "text/x-aiware-env"
        | "application/toml"
        | "text/toml"
        | "application/gzip"
        | "application/x-gzip"
        | "text/x-shellscript-per-boot"
        | "text/x-shellscript-per-instance"
        | "text/x-shellscript-per-once"
        | "" => {
            if ct == "text/cloud-config" && !data.starts_with(b"#cloud-config") {
                let mut d = b"#cloud-config\n".to_vec();
                d.extend_from_slice(data);
                return parse_into(&d, out, depth + 1);
            }
            parse_into(data, out, depth + 1)
        }
        other => {
            out.warnings.push(format!(
                "{at}: type {other} is not used by aiwimg images (ignored)"
            ));
            Ok(())
        }
    }
}

fn split_headers(text: &str) -> (Vec<(String, String)>, &str) {
    let (head, body) = match (text.find("\r\n\r\n"), text.find("\n\n")) {
        (Some(a), Some(b)) if a < b => (&text[..a], &text[a + 4..]),
        (_, Some(b)) => (&text[..b], &text[b + 2..]),
        (Some(a), None) => (&text[..a], &text[a + 4..]),
        (None, None) => (text, ""),
    };
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in head.lines() {
        if line.starts_with([' ', '\t']) {
            if let Some(last) = headers.last_mut() {
                last.1.push(' ');
                last.1.push_str(line.trim());
            }
        } else if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    (headers, body)
}

fn header(h: &[(String, String)], name: &str) -> Option<String> {
    h.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
}

fn mime_param(ctype: &str, name: &str) -> Option<String> {
    ctype.split(';').skip(1).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        (k.trim().eq_ignore_ascii_case(name)).then(|| v.trim().trim_matches('"').to_string())
    })
}

fn decode_part(h: &[(String, String)], body: &str) -> Result<Vec<u8>, ParseError> {
    match header(h, "content-transfer-encoding")
        .map(|e| e.to_ascii_lowercase())
        .as_deref()
    {
        Some("base64") => b64(body).map_err(|e| perr(format!("MIME part: bad base64: {e}"))),
        _ => Ok(body.as_bytes().to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_lines_with_export_quotes_and_commands() {
        let u = parse(
            b"#!/bin/bash\nexport AIWARE_MODE=controller,db,nfs\nexport AIWARE_HOST_EXPIRE=false\n\
              AIWARE_LICENSE=\"abc def\"\nAIWARE_DB_PASS='p$ss'\necho \"hello\"\nFOO=1\n",
        )
        .unwrap();
        assert_eq!(u.vars["AIWARE_MODE"], "controller,db,nfs");
        assert_eq!(u.vars["AIWARE_LICENSE"], "abc def");
        assert_eq!(u.vars["AIWARE_DB_PASS"], "p$ss");
        assert_eq!(u.warnings.len(), 2, "{:?}", u.warnings);
        assert_eq!(u.formats, vec!["env"]);
    }

    #[test]
    fn substitutions_are_rejected_with_why() {
        let e = parse(b"export AIWARE_INIT_TOKEN=`uuidgen`\n")
            .unwrap_err()
            .0;
        assert!(e.contains("never executed") && e.contains("uuidgen"), "{e}");
        let e = parse(b"AIWARE_INIT_TOKEN=$(uuidgen)\n").unwrap_err().0;
        assert!(e.contains("command substitution"), "{e}");
    }

    #[test]
    fn cloud_config_aiware_map() {
        let u = parse(
            b"#cloud-config\nhostname: eng1\nssh_authorized_keys: [\"ssh-ed25519 AAAA x\"]\n\
              aiware:\n  mode: [engine]\n  controller: http://10.0.2.2:9000/edge/v1\n  host_expire: false\n\
              write_files:\n- path: /var/opt/x\n  content: aGk=\n  encoding: b64\n  permissions: '0600'\n",
        )
        .unwrap();
        assert_eq!(u.vars["AIWARE_MODE"], "engine");
        assert_eq!(u.vars["AIWARE_HOST_EXPIRE"], "false");
        assert_eq!(u.hostname.as_deref(), Some("eng1"));
        assert_eq!(u.write_files[0].content, b"hi");
        assert_eq!(u.write_files[0].permissions, 0o600);
        // Every form cloud-init takes: quoted or bare octal, 0o, an integer mode.
        for (form, mode) in [
            ("'0600'", 0o600),
            ("0600", 0o600),
            ("'0o755'", 0o755),
            ("0o755", 0o755),
            ("493", 0o755),
            ("420", 0o644),
            ("0x1ed", 0o755),
            ("'644'", 0o644),
        ] {
            let u = parse(
                format!("#cloud-config\naiware:\n  mode: engine\nwrite_files:\n- path: /var/opt/x\n  content: hi\n  permissions: {form}\n")
                    .as_bytes(),
            )
            .unwrap_or_else(|e| panic!("{form}: {e:?}"));
            assert_eq!(u.write_files[0].permissions, mode, "{form}");
        }
        // swap, as cloud-init's documentation writes it.
        let u = parse(b"#cloud-config\naiware:\n  mode: engine\nswap:\n  filename: /var/swap.img\n  size: auto\n  maxsize: 2G\n").unwrap();
        assert_eq!(
            u.swap,
            Some(crate::swap::Swap {
                filename: "/var/swap.img".into(),
                size: None,
                maxsize: Some(2 << 30)
            })
        );
        let u =
            parse(b"#cloud-config\naiware:\n  mode: engine\nswap:\n  size: 67108864\n").unwrap();
        let sw = u.swap.unwrap();
        assert_eq!(
            (sw.filename.as_str(), sw.size),
            ("/var/swap.img", Some(64 << 20))
        );
        assert_eq!(
            parse(b"#cloud-config\nswap:\n  filename: /var/s\n")
                .unwrap()
                .swap
                .unwrap()
                .size,
            Some(0),
            "no size: no swap, as in cloud-init"
        );
        for bad in [
            "swap: 1G",
            "swap:\n  size: lots",
            "swap:\n  filename: 3\n  size: 1G",
        ] {
            assert!(
                parse(format!("#cloud-config\n{bad}\n").as_bytes()).is_err(),
                "{bad}"
            );
        }
        for bad in ["'0999'", "70000", "-1", "'rw-r--r--'", "true"] {
            let e = parse(
                format!("#cloud-config\naiware:\n  mode: engine\nwrite_files:\n- path: /var/opt/x\n  content: hi\n  permissions: {bad}\n")
                    .as_bytes(),
            );
            assert!(e.is_err(), "{bad} was taken");
        }
    }

    #[test]
    fn toml_gzip_base64_and_mime() {
        let toml = b"hostname = \"n1\"\n[aiware]\nmode = [\"engine\", \"registry\"]\n";
        let u = parse(toml).unwrap();
        assert_eq!(u.vars["AIWARE_MODE"], "engine,registry");
        assert_eq!(u.formats, vec!["toml"]);

        let mut gz = Vec::new();
        {
            use std::io::Write;
            let mut e = flate2::write::GzEncoder::new(&mut gz, flate2::Compression::default());
            e.write_all(b"AIWARE_MODE=db\n").unwrap();
        }
        let b = base64::engine::general_purpose::STANDARD.encode(&gz);
        let u = parse(b.as_bytes()).unwrap();
        assert_eq!(u.vars["AIWARE_MODE"], "db");
        assert_eq!(u.formats, vec!["base64", "gzip", "env"]);

        let mime = "Content-Type: multipart/mixed; boundary=\"XX\"\nMIME-Version: 1.0\n\n--XX\n\
                    Content-Type: text/cloud-config\n\n#cloud-config\nhostname: m\n\n--XX\n\
                    Content-Type: text/x-shellscript\nContent-Transfer-Encoding: base64\n\n\
                    QUlXQVJFX01PREU9bmZzCg==\n--XX--\n";
        let u = parse(mime.as_bytes()).unwrap();
        assert_eq!(u.hostname.as_deref(), Some("m"));
        assert_eq!(u.vars["AIWARE_MODE"], "nfs");
    }

    #[test]
    fn include_and_templates_are_refused_clearly() {
        for (text, want) in [
            (
                "#include\nhttp://example.invalid/ud\n",
                "#include: cloud-init would download",
            ),
            (
                "#include-once\nhttps://example.invalid/ud\n",
                "#include-once",
            ),
            (
                "## template: jinja\n#cloud-config\nhostname: {{ v1.local_hostname }}\n",
                "does not render templates",
            ),
            (
                "#cloud-boothook\n#!/bin/sh\necho hi\n",
                "boot hooks are scripts",
            ),
            (
                "#part-handler\ndef list_types():\n  return []\n",
                "Python code",
            ),
        ] {
            let e = parse(text.as_bytes()).unwrap_err().0;
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(
                !e.contains("AIWARE_MODE") && !e.contains("is a command"),
                "{e}"
            );
        }
        let mime = "Content-Type: multipart/mixed; boundary=\"B\"\n\n--B\nContent-Type: text/x-include-url\n\nhttp://x/\n--B--\n";
        let e = parse(mime.as_bytes()).unwrap_err().0;
        assert!(e.contains("MIME part 1 is text/x-include-url"), "{e}");
    }

    #[test]
    fn nested_multipart_is_read_by_part_type() {
        let mime = "Content-Type: multipart/mixed; boundary=\"OUT\"\nMIME-Version: 1.0\n\n--OUT\n\
                    Content-Type: multipart/alternative; boundary=\"IN\"\n\n--IN\n\
                    Content-Type: text/cloud-config\n\nhostname: inner\naiware:\n  mode: engine\n\n--IN\n\
                    Content-Type: text/x-shellscript\n\nAIWARE_LICENSE=lic-nested\n--IN--\n\n--OUT\n\
                    Content-Type: text/plain\n\nAIWARE_HOST_EXPIRE=false\n--OUT--\n";
        let u = parse(mime.as_bytes()).unwrap();
        assert_eq!(u.hostname.as_deref(), Some("inner"));
        assert_eq!(u.vars["AIWARE_MODE"], "engine");
        assert_eq!(u.vars["AIWARE_LICENSE"], "lic-nested");
        assert_eq!(u.vars["AIWARE_HOST_EXPIRE"], "false");
        // Nothing was read as a stray KEY=VALUE line of the inner boundary or headers.
        assert!(u.warnings.is_empty(), "{:?}", u.warnings);
        assert_eq!(u.origins["AIWARE_LICENSE"], "MIME part 1.2: line 1");
        // Nesting is bounded.
        let mut deep = String::from("AIWARE_MODE=db\n");
        for i in 0..12 {
            deep = format!(
                "Content-Type: multipart/mixed; boundary=\"b{i}\"\n\n--b{i}\n{deep}\n--b{i}--\n"
            );
        }
        let e = parse(deep.as_bytes()).unwrap_err().0;
        assert!(e.contains("nested more than"), "{e}");
    }

    #[test]
    fn cloud_config_archive_parts() {
        let text = "#cloud-config-archive\n- type: text/cloud-config\n  content: |\n    hostname: arch\n\
                    - content: \"AIWARE_MODE=registry\\n\"\n- \"#cloud-config\\naiware:\\n  host_expire: true\\n\"\n";
        let u = parse(text.as_bytes()).unwrap();
        assert_eq!(u.hostname.as_deref(), Some("arch"));
        assert_eq!(u.vars["AIWARE_MODE"], "registry");
        assert_eq!(u.vars["AIWARE_HOST_EXPIRE"], "true");
        let e = parse(b"#cloud-config-archive\n- type: text/cloud-boothook\n  content: echo\n")
            .unwrap_err()
            .0;
        assert!(
            e.contains("archive part 1") && e.contains("boot hooks"),
            "{e}"
        );
        assert!(parse(b"#cloud-config-archive\nkey: value\n").is_err());
    }

    #[test]
    fn a_setting_given_twice_warns_with_both_places() {
        let u = parse(b"AIWARE_MODE=engine\nAIWARE_MODE=engine\nAIWARE_MODE=db\n").unwrap();
        assert_eq!(u.vars["AIWARE_MODE"], "db");
        assert_eq!(u.warnings.len(), 1, "{:?}", u.warnings);
        let w = &u.warnings[0];
        assert!(
            w.contains("line 2 sets \"engine\"")
                && w.contains("line 3 sets \"db\"")
                && w.contains("(line 3) wins"),
            "{w}"
        );
        let mime = "Content-Type: multipart/mixed; boundary=\"B\"\n\n--B\nContent-Type: text/plain\n\n\
                    AIWARE_MODE=engine\nAIWARE_INIT_TOKEN=first-tok-1\n--B\nContent-Type: text/cloud-config\n\n\
                    aiware:\n  mode: controller\n  init_token: second-tok-2\n--B--\n";
        let u = parse(mime.as_bytes()).unwrap();
        assert_eq!(u.vars["AIWARE_MODE"], "controller");
        let all = u.warnings.join("\n");
        assert!(
            all.contains("MIME part 1: line 1 sets \"engine\"")
                && all.contains("MIME part 2: cloud-config aiware.mode sets \"controller\"")
                && all.contains("the later one (MIME part 2: cloud-config aiware.mode) wins"),
            "{all}"
        );
        // Secret values are named by place only.
        assert!(all.contains("AIWARE_INIT_TOKEN is given twice"), "{all}");
        assert!(
            !all.contains("first-tok-1") && !all.contains("second-tok-2"),
            "{all}"
        );
    }

    #[test]
    fn empty_and_garbage() {
        assert_eq!(parse(b"").unwrap().vars.len(), 0);
        assert!(parse(&[0xff, 0xfe, 0x00]).is_err());
        assert!(parse(b"#!/usr/bin/python3\nprint(1)\n").is_err());
        assert!(parse(b"AIWARE_MODE=\"engine\n").is_err());
    }
}
