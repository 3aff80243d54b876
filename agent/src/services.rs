//! The native mode services configured from settings: what aiw-agent renders
//! under /run/aiware/<mode>/ (the baked /etc files of `overlays/mode-<mode>/`
//! point there), the passwords it generates, the owners of the mode folders
//! and the checks made before a service starts.
//!
//! | mode | unit | rendered here | data |
//! |---|---|---|---|
//! | db | postgresql.service (overlay unit) | postgresql.conf, pg_hba.conf, env, bootstrap.sql | /var/opt/aiware/postgres/<major> |
//! | nfs | nfs-server.service | /run/aiware/nfs/aiware.exports (= /etc/exports.d/aiware.exports) | /opt/aiware/nfs, /var/lib/nfs |
//! | redis | redis-server.service | /run/aiware/redis/redis.conf (included by /etc/redis/redis.conf) | /var/opt/aiware/redis |
//! | lb | haproxy.service | (baked /etc/haproxy/haproxy.cfg; certificates checked) | /opt/aiware/haproxy/certs |
//! | prometheus | prometheus.service | targets/*.json (file-SD, from the controller) | /var/opt/aiware/prometheus/data |
//! | registry | docker-registry.service | env (TLS from AIWARE_REGISTRY_CERT/_KEY, read by the baked drop-in), tls.crt, tls.key | /var/opt/aiware/registry |

use crate::files::write_private;
use crate::paths::Paths;
use crate::settings::Settings;
use std::collections::BTreeMap;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

pub const DEFAULT_DB_NAME: &str = "aiware";
pub const DEFAULT_DB_USER: &str = "aiware";
pub const NFS_EXPORT: &str = "/opt/aiware/nfs";
pub const CERT_DIR: &str = "/opt/aiware/haproxy/certs";

/// One file to write: absolute path on the node, contents, mode, owning user.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigFile {
    pub path: String,
    pub content: String,
    pub mode: u32,
    /// System user owning it (its primary group too); `None`: root.
    pub owner: Option<String>,
}

impl ConfigFile {
    fn new(path: &str, content: String, mode: u32, owner: Option<&str>) -> Self {
        ConfigFile {
            path: path.into(),
            content,
            mode,
            owner: owner.map(String::from),
        }
    }
}

fn tera_render(name: &str, text: &str, ctx: &tera::Context) -> Result<String, String> {
    let mut t = tera::Tera::default();
    t.autoescape_on(vec![]);
    t.add_raw_template(name, text)
        .map_err(|e| format!("template {name}: {e}"))?;
    t.render(name, ctx)
        .map_err(|e| format!("template {name}: {e:?}"))
}

/// `true` for a PostgreSQL identifier we accept unquoted: letters, digits, `_`.
pub fn valid_pg_identifier(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_lowercase() || ch == '_')
        && c.all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_')
        && s.len() <= 63
}

/// Where the registry mode's TLS pair and environment go (the overlay's
/// docker-registry.service.d/aiware.conf reads the environment file).
pub const REGISTRY_RUN_DIR: &str = "/run/aiware/registry";

/// The registry mode's files: its TLS pair from `AIWARE_REGISTRY_CERT` and
/// `AIWARE_REGISTRY_KEY` (PEM text or file paths; a certificate from the
/// cluster's CA, which every node trusts through cloud-config `ca_certs`),
/// given to the registry as `REGISTRY_HTTP_TLS_*` (the distribution
/// registry's own overrides of config.yml). Neither given: plain HTTP on
/// 5000, as the guide's registry.
fn registry_files(s: &Settings) -> Result<Vec<ConfigFile>, String> {
    let owner = Some("docker-registry");
    let env =
        |text: String| ConfigFile::new(&format!("{REGISTRY_RUN_DIR}/env"), text, 0o644, owner);
    let (cert, key) = match (s.get("AIWARE_REGISTRY_CERT"), s.get("AIWARE_REGISTRY_KEY")) {
        (None, None) => {
            return Ok(vec![env(
                "# Written by aiw-agent: no AIWARE_REGISTRY_CERT, plain HTTP.\n".into(),
            )])
        }
        (Some(c), Some(k)) => (c, k),
        _ => {
            return Err(
                "registry mode: AIWARE_REGISTRY_CERT and AIWARE_REGISTRY_KEY go together (the \
                 certificate and its private key, PEM text or file paths)"
                    .into(),
            )
        }
    };
    let (cert_pem, whence) = crate::tls::pem_value(cert, "certificate", &s.write_files)?;
    match crate::tls::parse_pem(&cert_pem) {
        Ok(c) if !c.is_empty() => {}
        _ => {
            return Err(format!(
                "AIWARE_REGISTRY_CERT: {whence} holds no PEM certificate"
            ))
        }
    }
    let (key_pem, whence) = crate::tls::pem_value(key, "private key", &s.write_files)?;
    if !crate::tls::holds_private_key(&key_pem) {
        return Err(format!(
            "AIWARE_REGISTRY_KEY: {whence} holds no PEM private key"
        ));
    }
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).trim().to_string() + "\n";
    Ok(vec![
        ConfigFile::new(
            &format!("{REGISTRY_RUN_DIR}/tls.crt"),
            text(cert_pem),
            0o644,
            owner,
        ),
        ConfigFile::new(
            &format!("{REGISTRY_RUN_DIR}/tls.key"),
            text(key_pem),
            0o600,
            owner,
        ),
        env(format!(
            "# Written by aiw-agent from AIWARE_REGISTRY_CERT and AIWARE_REGISTRY_KEY.\n\
             REGISTRY_HTTP_TLS_CERTIFICATE={REGISTRY_RUN_DIR}/tls.crt\n\
             REGISTRY_HTTP_TLS_KEY={REGISTRY_RUN_DIR}/tls.key\n"
        )),
    ])
}

/// Validation of the settings the native services read (added to `settings::validate`).
pub fn validate(s: &Settings, modes: &[String]) -> Vec<String> {
    let mut errs = Vec::new();
    let has = |m: &str| modes.iter().any(|x| x == m);
    if has("registry") {
        if let Err(e) = registry_files(s) {
            errs.push(e);
        }
    }
    if has("db") {
        for key in ["AIWARE_DB_NAME", "AIWARE_DB_USER"] {
            if let Some(v) = s.get(key) {
                if !valid_pg_identifier(v) {
                    errs.push(format!(
                        "{key}={v:?}: use lower-case letters, digits and '_' (starting with a letter or '_', at most 63)"
                    ));
                }
            }
        }
    }
    if has("nfs") {
        if let Some(p) = s.get("AIWARE_NFS_PERMITTED") {
            if let Err(e) = parse_permitted(p) {
                errs.push(format!("AIWARE_NFS_PERMITTED={p:?}: {e}"));
            }
        }
    }
    for key in [
        "AIWARE_REDIS_PASSWORD",
        "AIWARE_DB_PASS",
        "AIWARE_DB_PASSWORD",
    ] {
        if let Some(v) = s.get(key) {
            if v.chars().any(|c| c.is_control() || c == '"' || c == '\\') {
                errs.push(format!(
                    "{key}: the password must not contain quotes, backslashes or control characters"
                ));
            }
        }
    }
    errs
}

/// NFS clients: comma/space separated IP addresses, CIDR networks or host names; never `*`.
pub fn parse_permitted(text: &str) -> Result<Vec<String>, String> {
    let items: Vec<String> = text
        .split([',', ' '])
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(String::from)
        .collect();
    if items.is_empty() {
        return Err("no client given".into());
    }
    for i in &items {
        if i == "*" || i == "0.0.0.0/0" || i == "::/0" {
            return Err(format!(
                "{i} would export the cache to the world: name the cluster's networks, e.g. 10.0.0.0/16"
            ));
        }
        let ok = if let Some((a, len)) = i.split_once('/') {
            a.parse::<IpAddr>().is_ok() && len.parse::<u8>().is_ok()
        } else {
            i.parse::<IpAddr>().is_ok()
                || i.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        };
        if !ok {
            return Err(format!(
                "{i:?} is not an IP address, network (a.b.c.d/n) or host name"
            ));
        }
    }
    Ok(items)
}

/// The networks of addresses `ip/prefix` (e.g. from `ip -o addr`): 10.0.2.15/24 → 10.0.2.0/24.
pub fn networks_of(addrs: &[(IpAddr, u8)]) -> Vec<String> {
    let mut out: Vec<String> = addrs
        .iter()
        .filter(|(ip, _)| !ip.is_loopback())
        .filter(|(ip, _)| match ip {
            IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
            IpAddr::V4(_) => true,
        })
        .map(|(ip, len)| match ip {
            IpAddr::V4(v4) => {
                let len = (*len).min(32);
                let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                format!("{}/{len}", Ipv4Addr::from(u32::from(*v4) & mask))
            }
            IpAddr::V6(v6) => {
                let len = (*len).min(128);
                let mask = if len == 0 {
                    0
                } else {
                    u128::MAX << (128 - len)
                };
                format!("{}/{len}", Ipv6Addr::from(u128::from(*v6) & mask))
            }
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Parses `ip -o addr show` lines into (address, prefix length).
pub fn parse_ip_addr(text: &str) -> Vec<(IpAddr, u8)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        for w in words.windows(2) {
            if w[0] == "inet" || w[0] == "inet6" {
                if let Some((a, l)) = w[1].split_once('/') {
                    if let (Ok(a), Ok(l)) = (a.parse(), l.parse()) {
                        out.push((a, l));
                    }
                }
            }
        }
    }
    out
}

/// The networks this node is on (global scope), read with `ip -o addr`.
pub fn own_networks() -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["-o", "addr", "show", "scope", "global"])
        .output();
    match out {
        Ok(o) if o.status.success() => {
            networks_of(&parse_ip_addr(&String::from_utf8_lossy(&o.stdout)))
        }
        _ => Vec::new(),
    }
}

/// The exports file for the nfs mode.
pub fn nfs_exports(clients: &[String]) -> String {
    let mut s = String::from(
        "# Written by aiw-agent from AIWARE_NFS_PERMITTED (default: this node's networks).\n",
    );
    s.push_str(NFS_EXPORT);
    // `insecure`: the Edge API's mount options (its own example, and what
    // cloud NFS guides use) carry `noresvport`, so clients come from ports
    // above 1023; with the default `secure` the kernel server refuses them
    // and an NFSv4 mount fails with "Operation not permitted". Who may mount
    // is still limited to the permitted networks.
    for c in clients {
        s.push_str(&format!(
            " {c}(rw,sync,insecure,no_subtree_check,no_root_squash)"
        ));
    }
    s.push('\n');
    s
}

/// A secret kept in /var/lib/aiware/secrets/<name> (0600): read, or made once.
pub fn generated_secret(paths: &Paths, name: &str) -> Result<String, String> {
    let file = paths.state_dir().join("secrets").join(name);
    if let Ok(v) = std::fs::read_to_string(&file) {
        let v = v.trim().to_string();
        if !v.is_empty() {
            return Ok(v);
        }
    }
    let mut buf = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| format!("cannot read /dev/urandom: {e}"))?;
    let v = hex::encode(buf);
    write_private(&file, format!("{v}\n").as_bytes(), 0o600)
        .map_err(|e| format!("cannot keep {}: {e}", file.display()))?;
    Ok(v)
}

/// The settings with generated passwords filled in for the modes that need one.
pub fn with_generated_secrets(
    paths: &Paths,
    s: &Settings,
    modes: &[String],
) -> Result<Settings, String> {
    let mut out = s.clone();
    let has = |m: &str| modes.iter().any(|x| x == m);
    if has("db") && s.get("AIWARE_DB_PASS").is_none() {
        let v = match s.get("AIWARE_DB_PASSWORD") {
            Some(p) => p.to_string(),
            None => generated_secret(paths, "db-password")?,
        };
        out.vars.insert("AIWARE_DB_PASS".into(), v);
    }
    if has("redis") && s.get("AIWARE_REDIS_PASSWORD").is_none() {
        out.vars.insert(
            "AIWARE_REDIS_PASSWORD".into(),
            generated_secret(paths, "redis-password")?,
        );
    }
    Ok(out)
}

fn sql_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The files of the db mode. `pgbin`: the server's bin folder; `major`: its version.
pub fn postgres_files(s: &Settings, pgbin: &str, major: &str) -> Result<Vec<ConfigFile>, String> {
    let db = s.get("AIWARE_DB_NAME").unwrap_or(DEFAULT_DB_NAME);
    let user = s.get("AIWARE_DB_USER").unwrap_or(DEFAULT_DB_USER);
    let pass = s
        .get("AIWARE_DB_PASS")
        .or(s.get("AIWARE_DB_PASSWORD"))
        .ok_or("db mode: no password (AIWARE_DB_PASS) and none generated")?;
    let port = s.get("AIWARE_DB_PORT").unwrap_or("5432");
    if !valid_pg_identifier(db) || !valid_pg_identifier(user) {
        return Err(format!("db mode: invalid database {db:?} or user {user:?}"));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| format!("AIWARE_DB_PORT={port:?} is not a port"))?;
    let data = format!("/var/opt/aiware/postgres/{major}");
    let mut ctx = tera::Context::new();
    ctx.insert("data", &data);
    ctx.insert("port", &port);
    ctx.insert("db", db);
    ctx.insert("user", user);
    ctx.insert("pass", &sql_literal(pass));
    ctx.insert("db_lit", &sql_literal(db));
    ctx.insert("user_lit", &sql_literal(user));
    let o = Some("postgres");
    Ok(vec![
        ConfigFile::new(
            "/run/aiware/postgres/postgresql.conf",
            tera_render(
                "postgresql.conf",
                include_str!("../templates/postgresql.conf.tera"),
                &ctx,
            )?,
            0o600,
            o,
        ),
        ConfigFile::new(
            "/run/aiware/postgres/pg_hba.conf",
            tera_render(
                "pg_hba.conf",
                include_str!("../templates/pg_hba.conf.tera"),
                &ctx,
            )?,
            0o600,
            o,
        ),
        ConfigFile::new(
            "/run/aiware/postgres/bootstrap.sql",
            tera_render(
                "bootstrap.sql",
                include_str!("../templates/bootstrap.sql.tera"),
                &ctx,
            )?,
            0o600,
            o,
        ),
        ConfigFile::new(
            "/run/aiware/postgres/env",
            format!("PGBIN={pgbin}\nPGDATA={data}\n"),
            0o644,
            None,
        ),
    ])
}

/// The Redis settings of the redis mode (included by the baked /etc/redis/redis.conf).
pub fn redis_conf(s: &Settings) -> Result<ConfigFile, String> {
    let pass = s
        .get("AIWARE_REDIS_PASSWORD")
        .ok_or("redis mode: no password (AIWARE_REDIS_PASSWORD) and none generated")?;
    let mut ctx = tera::Context::new();
    ctx.insert("pass", pass);
    Ok(ConfigFile::new(
        "/run/aiware/redis/redis.conf",
        tera_render(
            "redis.conf",
            include_str!("../templates/redis.conf.tera"),
            &ctx,
        )?,
        0o600,
        Some("redis"),
    ))
}

/// The server's bin folder and major version of the newest PostgreSQL baked in.
pub fn find_postgres(paths: &Paths) -> Option<(String, String)> {
    let base = paths.at("/usr/lib/postgresql");
    let mut majors: Vec<u32> = std::fs::read_dir(&base)
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|m: &u32| base.join(m.to_string()).join("bin/postgres").exists())
        .collect();
    majors.sort();
    let m = majors.pop()?;
    Some((format!("/usr/lib/postgresql/{m}/bin"), m.to_string()))
}

/// The lb mode's certificates: present, and the key is the certificate's.
pub fn check_certs(paths: &Paths, domain: Option<&str>) -> Result<(), String> {
    let dir = paths.at(CERT_DIR);
    let cert = dir.join("server.pem");
    let key = dir.join("server.pem.key");
    let missing: Vec<&str> = [("server.pem", &cert), ("server.pem.key", &key)]
        .iter()
        .filter(|(_, p)| !p.is_file())
        .map(|(n, _)| *n)
        .collect();
    let domain = domain.unwrap_or("AIWARE_DOMAIN_NAME");
    if !missing.is_empty() {
        return Err(format!(
            "lb mode: missing {} in {CERT_DIR}: give the certificate and key of {domain} in user-data \
             (write_files to {CERT_DIR}/server.pem and {CERT_DIR}/server.pem.key, and ca.pem)",
            missing.join(" and ")
        ));
    }
    let pubkey = |args: &[&str]| -> Result<String, String> {
        let o = std::process::Command::new("openssl")
            .args(args)
            .output()
            .map_err(|e| format!("cannot run openssl: {e}"))?;
        if !o.status.success() {
            return Err(String::from_utf8_lossy(&o.stderr).trim().to_string());
        }
        Ok(String::from_utf8_lossy(&o.stdout).to_string())
    };
    let c = pubkey(&["x509", "-noout", "-pubkey", "-in", &cert.to_string_lossy()])
        .map_err(|e| format!("lb mode: {CERT_DIR}/server.pem is not a PEM certificate: {e}"))?;
    let k = pubkey(&["pkey", "-pubout", "-in", &key.to_string_lossy()])
        .map_err(|e| format!("lb mode: {CERT_DIR}/server.pem.key is not a PEM private key: {e}"))?;
    if c.trim() != k.trim() {
        return Err(format!(
            "lb mode: {CERT_DIR}/server.pem.key is not the key of {CERT_DIR}/server.pem \
             (their public keys differ): give the matching pair for {domain}"
        ));
    }
    Ok(())
}

/// uid and gid of a system user, from the node's /etc/passwd.
pub fn lookup_user(paths: &Paths, name: &str) -> Option<(u32, u32)> {
    let text = std::fs::read_to_string(paths.at("/etc/passwd")).ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 4 && f[0] == name).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

/// Writes the files (parent folder owned like the file), chowning when running as root.
pub fn write_files(paths: &Paths, files: &[ConfigFile], real_system: bool) -> Vec<String> {
    let mut errs = Vec::new();
    // The mode folders under /run/aiware are read by the services' users.
    let run = paths.run_dir();
    let _ = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&run);
    let _ = std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755));
    for f in files {
        let p = paths.at(&f.path);
        let ids = f.owner.as_deref().and_then(|u| lookup_user(paths, u));
        if f.owner.is_some() && ids.is_none() && real_system {
            errs.push(format!(
                "{}: no user {} on this image",
                f.path,
                f.owner.as_deref().unwrap_or_default()
            ));
            continue;
        }
        if let Some(dir) = p.parent() {
            if let Err(e) = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(dir)
            {
                errs.push(format!("cannot create {}: {e}", dir.display()));
                continue;
            }
            if real_system {
                if let Some((u, g)) = ids {
                    let _ = std::os::unix::fs::chown(dir, Some(u), Some(g));
                }
            } else if dir != run {
                let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
            }
        }
        if let Err(e) = write_private(&p, f.content.as_bytes(), f.mode) {
            errs.push(format!("cannot write {}: {e}", f.path));
            continue;
        }
        if real_system {
            if let Some((u, g)) = ids {
                if let Err(e) = std::os::unix::fs::chown(&p, Some(u), Some(g)) {
                    errs.push(format!("chown {}: {e}", f.path));
                }
            }
        }
    }
    errs
}

/// Gives a mode's folder to its service user (0750; postgres wants 0700).
pub fn own_dir(paths: &Paths, dir: &Path, owner: &str, real_system: bool) -> Result<(), String> {
    let mode = if owner == "postgres" { 0o700 } else { 0o750 };
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("chmod {}: {e}", dir.display()))?;
    if real_system {
        let (u, g) = lookup_user(paths, owner)
            .ok_or_else(|| format!("{}: no user {owner} on this image", dir.display()))?;
        std::os::unix::fs::chown(dir, Some(u), Some(g))
            .map_err(|e| format!("chown {owner} {}: {e}", dir.display()))?;
    }
    Ok(())
}

/// Everything the native services of `modes` need before they start; returns
/// the files written and problems met, and the units not to start (a failed check).
pub struct Prepared {
    pub errors: Vec<String>,
    pub skip_units: Vec<String>,
    pub env: BTreeMap<String, String>,
}

pub fn prepare(paths: &Paths, s: &Settings, modes: &[String], real_system: bool) -> Prepared {
    let mut p = Prepared {
        errors: Vec::new(),
        skip_units: Vec::new(),
        env: BTreeMap::new(),
    };
    let has = |m: &str| modes.iter().any(|x| x == m);
    let mut files = Vec::new();
    if has("db") {
        match find_postgres(paths) {
            Some((bin, major)) => match postgres_files(s, &bin, &major) {
                Ok(f) => files.extend(f),
                Err(e) => {
                    p.errors.push(e);
                    p.skip_units.push("postgresql.service".into());
                }
            },
            None => {
                p.errors
                    .push("db mode: no PostgreSQL server in /usr/lib/postgresql".into());
                p.skip_units.push("postgresql.service".into());
            }
        }
    }
    if has("redis") {
        match redis_conf(s) {
            Ok(f) => files.push(f),
            Err(e) => {
                p.errors.push(e);
                p.skip_units.push("redis-server.service".into());
            }
        }
    }
    if has("registry") {
        match registry_files(s) {
            Ok(f) => files.extend(f),
            Err(e) => {
                p.errors.push(e);
                p.skip_units.push("docker-registry.service".into());
            }
        }
    }
    if has("nfs") {
        let clients = match s.get("AIWARE_NFS_PERMITTED") {
            Some(t) => parse_permitted(t).unwrap_or_default(),
            None => own_networks(),
        };
        if clients.is_empty() {
            p.errors.push(
                "nfs mode: no AIWARE_NFS_PERMITTED and this node has no network to export to"
                    .into(),
            );
            p.skip_units.push("nfs-server.service".into());
        } else {
            files.push(ConfigFile::new(
                "/run/aiware/nfs/aiware.exports",
                nfs_exports(&clients),
                0o644,
                None,
            ));
        }
    }
    if has("prometheus") {
        let dir = paths.prometheus_sd_dir();
        if let Err(e) = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&dir)
            // Read by the prometheus user: 0755 whatever the agent's umask.
            .and_then(|_| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)))
        {
            p.errors
                .push(format!("cannot create {}: {e}", dir.display()));
        }
    }
    if has("lb") {
        if let Err(e) = check_certs(paths, s.get("AIWARE_DOMAIN_NAME")) {
            p.errors.push(e);
            p.skip_units.push("haproxy.service".into());
        }
    }
    p.errors.extend(write_files(paths, &files, real_system));
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(vars: &[(&str, &str)]) -> Settings {
        Settings {
            vars: vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn registry_serves_tls_only_with_a_whole_pair() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["10.0.0.5".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (cert, key) = (cert.pem(), key.serialize_pem());
        let files = registry_files(&settings(&[
            ("AIWARE_REGISTRY_CERT", &cert),
            ("AIWARE_REGISTRY_KEY", &key),
        ]))
        .unwrap();
        let by_name = |n: &str| files.iter().find(|f| f.path.ends_with(n)).unwrap();
        assert_eq!(by_name("tls.key").mode, 0o600);
        assert_eq!(by_name("tls.key").owner.as_deref(), Some("docker-registry"));
        assert!(by_name("tls.crt")
            .content
            .starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(by_name("/env")
            .content
            .contains("REGISTRY_HTTP_TLS_KEY=/run/aiware/registry/tls.key\n"));
        // Neither: plain HTTP, the environment file says so.
        let plain = registry_files(&settings(&[])).unwrap();
        assert_eq!(plain.len(), 1);
        assert!(!plain[0].content.contains("REGISTRY_HTTP_TLS"));
        // Half a pair, or the two swapped: refused, the key never repeated.
        let errs = validate(
            &settings(&[("AIWARE_REGISTRY_CERT", &cert)]),
            &["registry".into()],
        );
        assert!(errs[0].contains("go together"), "{errs:?}");
        let swapped = settings(&[
            ("AIWARE_REGISTRY_CERT", &key),
            ("AIWARE_REGISTRY_KEY", &cert),
        ]);
        let e = registry_files(&swapped).unwrap_err();
        assert!(
            e.contains("no PEM certificate") && !e.contains("PRIVATE"),
            "{e}"
        );
        // Not a registry node: not its business.
        assert!(validate(&swapped, &["engine".into()]).is_empty());
        // From files, e.g. written by write_files.
        let d = tempfile::tempdir().unwrap();
        let (c, k) = (d.path().join("r.crt"), d.path().join("r.key"));
        std::fs::write(&c, &cert).unwrap();
        std::fs::write(&k, &key).unwrap();
        let from_files = settings(&[
            ("AIWARE_REGISTRY_CERT", c.to_str().unwrap()),
            ("AIWARE_REGISTRY_KEY", k.to_str().unwrap()),
        ]);
        assert_eq!(registry_files(&from_files).unwrap().len(), 3);
        // From write_files of the same launch, not on disk yet at the check.
        let mut first_boot = settings(&[
            ("AIWARE_REGISTRY_CERT", "/var/lib/aiware/tls/registry.crt"),
            ("AIWARE_REGISTRY_KEY", "/var/lib/aiware/tls/registry.key"),
        ]);
        for (path, text) in [("registry.crt", &cert), ("registry.key", &key)] {
            first_boot.write_files.push(crate::userdata::WriteFile {
                path: format!("/var/lib/aiware/tls/{path}"),
                content: text.as_bytes().to_vec(),
                permissions: 0o600,
                append: false,
            });
        }
        assert!(validate(&first_boot, &["registry".into()]).is_empty());
    }

    #[test]
    fn postgres_config_from_settings() {
        let s = settings(&[
            ("AIWARE_DB_NAME", "aiware_db"),
            ("AIWARE_DB_USER", "veritone"),
            ("AIWARE_DB_PASS", "pa'ss"),
        ]);
        let f = postgres_files(&s, "/usr/lib/postgresql/17/bin", "17").unwrap();
        let get = |n: &str| f.iter().find(|x| x.path.ends_with(n)).unwrap();
        let conf = &get("postgresql.conf").content;
        assert!(conf.contains("listen_addresses = '*'"), "{conf}");
        assert!(conf.contains("port = 5432"));
        assert!(conf.contains("data_directory = '/var/opt/aiware/postgres/17'"));
        assert!(conf.contains("hba_file = '/run/aiware/postgres/pg_hba.conf'"));
        let hba = &get("pg_hba.conf").content;
        assert!(hba.contains("host all all samenet scram-sha-256"), "{hba}");
        assert!(!hba.contains("trust"), "{hba}");
        let sql = &get("bootstrap.sql").content;
        assert!(
            sql.contains("CREATE ROLE veritone LOGIN PASSWORD 'pa''ss'"),
            "{sql}"
        );
        assert!(
            sql.contains("CREATE DATABASE aiware_db OWNER veritone"),
            "{sql}"
        );
        assert_eq!(get("bootstrap.sql").mode, 0o600);
        assert_eq!(get("bootstrap.sql").owner.as_deref(), Some("postgres"));
        assert_eq!(
            get("/env").content,
            "PGBIN=/usr/lib/postgresql/17/bin\nPGDATA=/var/opt/aiware/postgres/17\n"
        );
    }

    #[test]
    fn db_names_are_validated() {
        let s = settings(&[("AIWARE_DB_NAME", "x; DROP"), ("AIWARE_DB_USER", "ok_1")]);
        let e = validate(&s, &["db".into()]);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("AIWARE_DB_NAME"));
        assert!(validate(&s, &["engine".into()]).is_empty());
    }

    #[test]
    fn generated_passwords_are_kept_0600_and_reused() {
        let d = tempfile::tempdir().unwrap();
        let paths = Paths::new(d.path());
        let s = settings(&[("AIWARE_MODE", "db,redis")]);
        let modes = s.modes();
        let a = with_generated_secrets(&paths, &s, &modes).unwrap();
        let b = with_generated_secrets(&paths, &s, &modes).unwrap();
        let pw = a.get("AIWARE_DB_PASS").unwrap();
        assert_eq!(pw.len(), 48);
        assert_eq!(Some(pw), b.get("AIWARE_DB_PASS"));
        assert_ne!(a.get("AIWARE_REDIS_PASSWORD"), a.get("AIWARE_DB_PASS"));
        let f = paths.state_dir().join("secrets/db-password");
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A given password wins and nothing is generated for it.
        let given = settings(&[("AIWARE_MODE", "redis"), ("AIWARE_REDIS_PASSWORD", "given")]);
        let g = with_generated_secrets(&paths, &given, &given.modes()).unwrap();
        assert_eq!(g.get("AIWARE_REDIS_PASSWORD"), Some("given"));
    }

    #[test]
    fn redis_config_has_the_password_and_data_on_var() {
        let s = settings(&[("AIWARE_REDIS_PASSWORD", "s3cret")]);
        let f = redis_conf(&s).unwrap();
        assert!(
            f.content.contains("requirepass \"s3cret\""),
            "{}",
            f.content
        );
        assert!(f.content.contains("dir /var/opt/aiware/redis"));
        assert!(f.content.contains("port 6379"));
        assert!(redis_conf(&settings(&[])).is_err());
    }

    #[test]
    fn nfs_exports_to_permitted_or_own_networks_never_the_world() {
        assert_eq!(
            parse_permitted("10.0.0.0/16, 192.168.1.7 node-3").unwrap(),
            vec!["10.0.0.0/16", "192.168.1.7", "node-3"]
        );
        assert!(parse_permitted("*").is_err());
        assert!(parse_permitted("0.0.0.0/0").is_err());
        assert!(parse_permitted("a(b)").is_err());
        let text = "2: ens3    inet 10.0.2.15/24 brd 10.0.2.255 scope global dynamic ens3\\\n\
                    2: ens3    inet6 fec0::5054:ff:fe12:3456/64 scope site dynamic\\\n\
                    1: lo    inet 127.0.0.1/8 scope host lo";
        let nets = networks_of(&parse_ip_addr(text));
        assert_eq!(nets, vec!["10.0.2.0/24", "fec0::/64"]);
        let e = nfs_exports(&nets);
        assert!(e.contains(
            "/opt/aiware/nfs 10.0.2.0/24(rw,sync,insecure,no_subtree_check,no_root_squash) fec0::/64("
        ));
    }

    #[test]
    fn certificates_missing_or_mismatched_are_clear_errors() {
        let d = tempfile::tempdir().unwrap();
        let paths = Paths::new(d.path());
        let e = check_certs(&paths, Some("aiware.example.com")).unwrap_err();
        assert!(e.contains("missing server.pem and server.pem.key"), "{e}");
        assert!(e.contains("aiware.example.com"), "{e}");
        if std::process::Command::new("openssl")
            .arg("version")
            .output()
            .is_err()
        {
            eprintln!("no openssl on this host: pair check not exercised");
            return;
        }
        let dir = paths.at(CERT_DIR);
        std::fs::create_dir_all(&dir).unwrap();
        let mk = |name: &str| {
            let st = std::process::Command::new("openssl")
                .args([
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                ])
                .args(["-nodes", "-days", "1", "-subj", "/CN=aiware.example.com"])
                .arg("-keyout")
                .arg(dir.join(format!("{name}.key")))
                .arg("-out")
                .arg(dir.join(format!("{name}.pem")))
                .output()
                .unwrap();
            assert!(st.status.success());
        };
        mk("a");
        mk("b");
        std::fs::rename(dir.join("a.pem"), dir.join("server.pem")).unwrap();
        std::fs::rename(dir.join("b.key"), dir.join("server.pem.key")).unwrap();
        let e = check_certs(&paths, Some("aiware.example.com")).unwrap_err();
        assert!(e.contains("is not the key of"), "{e}");
        std::fs::rename(dir.join("a.key"), dir.join("server.pem.key")).unwrap();
        check_certs(&paths, None).unwrap();
    }

    #[test]
    fn users_come_from_the_images_passwd() {
        let d = tempfile::tempdir().unwrap();
        let paths = Paths::new(d.path());
        std::fs::create_dir_all(paths.at("/etc")).unwrap();
        std::fs::write(
            paths.at("/etc/passwd"),
            "root:x:0:0::/root:/bin/sh\npostgres:x:102:105::/var/lib/postgresql:/bin/bash\n",
        )
        .unwrap();
        assert_eq!(lookup_user(&paths, "postgres"), Some((102, 105)));
        assert_eq!(lookup_user(&paths, "redis"), None);
    }

    #[test]
    fn prepare_renders_under_run_aiware() {
        let d = tempfile::tempdir().unwrap();
        let paths = Paths::new(d.path());
        std::fs::create_dir_all(paths.at("/usr/lib/postgresql/17/bin")).unwrap();
        std::fs::write(paths.at("/usr/lib/postgresql/17/bin/postgres"), "").unwrap();
        let s = settings(&[
            ("AIWARE_MODE", "db,nfs,redis,lb,prometheus"),
            ("AIWARE_NFS_PERMITTED", "10.1.0.0/16"),
        ]);
        let modes = s.modes();
        let s = with_generated_secrets(&paths, &s, &modes).unwrap();
        let p = prepare(&paths, &s, &modes, false);
        // No certificates given: the lb mode's error, and haproxy kept stopped.
        assert_eq!(p.skip_units, vec!["haproxy.service"]);
        assert_eq!(p.errors.len(), 1, "{:?}", p.errors);
        for f in [
            "/run/aiware/postgres/postgresql.conf",
            "/run/aiware/postgres/bootstrap.sql",
            "/run/aiware/redis/redis.conf",
            "/run/aiware/nfs/aiware.exports",
        ] {
            assert!(paths.at(f).is_file(), "{f} not written");
        }
        let ex = std::fs::read_to_string(paths.at("/run/aiware/nfs/aiware.exports")).unwrap();
        assert!(ex.contains("/opt/aiware/nfs 10.1.0.0/16("), "{ex}");
        let sd = std::fs::metadata(paths.prometheus_sd_dir()).unwrap();
        assert_eq!(
            sd.permissions().mode() & 0o777,
            0o755,
            "prometheus reads it"
        );
    }
}
