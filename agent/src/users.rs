//! cloud-config `users`: login accounts for people, on a node whose /etc is
//! read-only.
//!
//! cloud-init runs `useradd`, which writes /etc/passwd; here each user is a
//! JSON user record in /run/userdb (systemd's drop-in user database, read by
//! nss-systemd, which the image's nsswitch.conf lists after `files`), written
//! again at every boot from the launch data. What must last is on /var: the
//! home (/home is a link to /var/home) and so the user's files and the UID
//! that owns them. A user's UID is the owner of an existing home, the `uid`
//! given, or the lowest free one from 1000; each user gets a group of their
//! own name with the same number, as `useradd` does on Debian.
//!
//! Keys go to `~/.ssh/authorized_keys` (the first `AuthorizedKeysFile` of
//! the image's sshd), added when missing, as cloud-init does. `sudo` rules go
//! to /run/aiware/sudoers.d (included by the image's /etc/sudoers.d). Password
//! keys are refused: SSH takes keys only, and no password is ever stored.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeSet;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct User {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gecos: Option<String>,
    /// Supplementary groups (`groups: [docker, adm]` or `groups: docker, adm`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<String>,
    /// sudoers rules, e.g. `ALL=(ALL) NOPASSWD:ALL`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sudo: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub homedir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_create_home: bool,
}

impl User {
    pub fn home(&self) -> String {
        self.homedir
            .clone()
            .unwrap_or_else(|| format!("/home/{}", self.name))
    }
}

/// A group of cloud-config's top-level `groups`, with the accounts to put
/// in it (users of `users` or of the image, e.g. `root`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Group {
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<String>,
}

/// Parses cloud-config `groups` in cloud-init's forms: `groups: a, b`,
/// `groups: [a, {b: [root, ops]}]` or `groups: {a: null, b: [root]}`.
pub fn parse_groups(v: &Value, what: &str) -> Result<Vec<Group>, String> {
    let members = |name: &str, m: &Value| -> Result<Group, String> {
        let list = crate::cloud_values::string_list(Some(m), &format!("{what}: groups.{name}"))?;
        Ok(Group {
            name: name.to_string(),
            members: list
                .iter()
                .flat_map(|s| s.split(','))
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
        })
    };
    let from_map = |m: &serde_json::Map<String, Value>| -> Result<Vec<Group>, String> {
        m.iter().map(|(k, v)| members(k, v)).collect()
    };
    let names = |s: &str| -> Vec<Group> {
        s.split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(|n| Group {
                name: n.to_string(),
                members: Vec::new(),
            })
            .collect()
    };
    match v {
        Value::Null => Ok(Vec::new()),
        Value::String(s) => Ok(names(s)),
        Value::Object(m) => from_map(m),
        Value::Array(items) => {
            let mut out = Vec::new();
            for (i, item) in items.iter().enumerate() {
                match item {
                    Value::String(s) => out.extend(names(s)),
                    Value::Object(m) => out.extend(from_map(m)?),
                    _ => {
                        return Err(format!(
                            "{what}: groups[{i}] must be a name or {{name: [members]}}"
                        ))
                    }
                }
            }
            Ok(out)
        }
        _ => Err(format!(
            "{what}: groups must be a list of names or {{name: [members]}}"
        )),
    }
}

/// The first UID (and GID) of the accounts made here, as Debian's adduser.
const FIRST_UID: u32 = 1000;
const LAST_UID: u32 = 59999;
const DEFAULT_SHELL: &str = "/bin/bash";
/// Groups made here take a number from their name (the same on every boot
/// and every node, whatever else the launch holds), from the top of the
/// regular range where users, counted up from 1000, do not reach.
const GROUP_GIDS: std::ops::Range<u32> = 50000..60000;
/// Where the records go; nss-systemd reads them (no daemon needed).
pub const USERDB_DIR: &str = "/run/userdb";
pub const SUDOERS_DIR: &str = "/run/aiware/sudoers.d";

/// Parses cloud-config `users`; what it cannot honour becomes a warning.
pub fn parse_users(v: &Value, what: &str, warnings: &mut Vec<String>) -> Result<Vec<User>, String> {
    let items: Vec<&Value> = match v {
        Value::Null => return Ok(Vec::new()),
        Value::Array(a) => a.iter().collect(),
        // cloud-init also takes a comma-separated string of names.
        Value::String(_) | Value::Object(_) => vec![v],
        _ => return Err(format!("{what}: users must be a list")),
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = format!("{what}: users[{i}]");
        match item {
            Value::String(s) => {
                for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                    if name == "default" {
                        warnings.push(format!(
                            "{at}: `default` adds no user on aiwimg images: the image's \
                             login is root, with the keys of `ssh_authorized_keys`"
                        ));
                    } else {
                        out.push(User {
                            name: name.to_string(),
                            ..User::default()
                        });
                    }
                }
            }
            Value::Object(m) => out.push(parse_user(m, &at, warnings)?),
            _ => return Err(format!("{at}: each user is a name or a map with `name`")),
        }
    }
    Ok(out)
}

fn parse_user(
    m: &serde_json::Map<String, Value>,
    at: &str,
    warnings: &mut Vec<String>,
) -> Result<User, String> {
    let string = |k: &str| -> Result<Option<String>, String> {
        match m.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(format!("{at}: `{k}` must be a string")),
        }
    };
    let list = |k: &str| crate::cloud_values::string_list(m.get(k), &format!("{at}: `{k}`"));
    let name = string("name")?.ok_or_else(|| format!("{at}: `name` is missing"))?;
    let mut user = User {
        name,
        gecos: string("gecos")?,
        groups: list("groups")?
            .iter()
            .flat_map(|g| g.split(','))
            .map(|g| g.trim().to_string())
            .filter(|g| !g.is_empty())
            .collect(),
        ssh_authorized_keys: list("ssh_authorized_keys")?
            .into_iter()
            .map(|k| k.trim().to_string())
            .collect(),
        sudo: list("sudo")?,
        shell: string("shell")?,
        homedir: string("homedir")?,
        uid: None,
        no_create_home: m
            .get("no_create_home")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    };
    user.uid = match m.get("uid") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(
            n.as_u64()
                .and_then(|u| u32::try_from(u).ok())
                .ok_or_else(|| format!("{at}: uid {n} is not a user number"))?,
        ),
        Some(Value::String(s)) => Some(
            s.parse()
                .map_err(|_| format!("{at}: uid {s:?} is not a user number"))?,
        ),
        Some(_) => return Err(format!("{at}: uid must be a number")),
    };
    for (k, v) in m {
        match k.as_str() {
            "name"
            | "gecos"
            | "groups"
            | "ssh_authorized_keys"
            | "sudo"
            | "shell"
            | "homedir"
            | "uid"
            | "no_create_home" => {}
            // Locking the password is all there is: none is ever set.
            "lock_passwd" => {
                if v == &Value::Bool(false) {
                    warnings.push(format!(
                        "{at}: lock_passwd: false has no effect: users of aiwimg images \
                         log in with SSH keys only and have no password"
                    ));
                }
            }
            "passwd" | "hashed_passwd" | "plain_text_passwd" => warnings.push(format!(
                "{at}: `{k}` ignored: users of aiwimg images log in with SSH keys only \
                 (ssh_authorized_keys); no password is stored"
            )),
            "ssh_import_id" => warnings.push(format!(
                "{at}: `ssh_import_id` ignored: the node fetches no keys from key servers; \
                 list them in ssh_authorized_keys"
            )),
            "primary_group" => warnings.push(format!(
                "{at}: `primary_group` ignored: each user's primary group is one of their \
                 own name; list other groups in `groups`"
            )),
            other => warnings.push(format!(
                "{at}: `{other}` is not used by aiwimg images (ignored)"
            )),
        }
    }
    Ok(user)
}

fn valid_name(n: &str) -> bool {
    let b = n.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && (b[0].is_ascii_lowercase() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-')
}

/// Problems that stop the groups being made (checked with the other settings).
pub fn validate_groups(groups: &[Group], users: &[User]) -> Vec<String> {
    let mut errs = Vec::new();
    for g in groups {
        if !valid_name(&g.name) {
            errs.push(format!(
                "groups: {:?} is not a group name (lower-case letters, digits, '_' and '-', \
                 starting with a letter, at most 32)",
                g.name
            ));
        } else if users.iter().any(|u| u.name == g.name) {
            errs.push(format!(
                "groups: {} is a user of `users`, whose own group has that name already",
                g.name
            ));
        }
        for m in g.members.iter().filter(|m| !valid_name(m)) {
            errs.push(format!(
                "groups: {}: member {m:?} is not a user name",
                g.name
            ));
        }
    }
    errs
}

/// Problems that stop the users being made (checked with the other settings).
pub fn validate(users: &[User]) -> Vec<String> {
    let mut errs = Vec::new();
    let mut seen = BTreeSet::new();
    for u in users {
        let n = &u.name;
        if !valid_name(n) {
            errs.push(format!(
                "users: {n:?} is not a user name (lower-case letters, digits, '_' and '-', \
                 starting with a letter, at most 32)"
            ));
            continue;
        }
        if !seen.insert(n.clone()) {
            errs.push(format!("users: {n} is listed twice"));
        }
        if let Some(uid) = u.uid {
            if !(FIRST_UID..=LAST_UID).contains(&uid) {
                errs.push(format!(
                    "users: {n}: uid {uid} is outside {FIRST_UID}-{LAST_UID}, the range of people's accounts"
                ));
            }
        }
        for g in &u.groups {
            if !valid_name(g) {
                errs.push(format!("users: {n}: {g:?} is not a group name"));
            }
        }
        let home = u.home();
        let writable = ["/home/", "/var/"].iter().any(|p| home.starts_with(p));
        if !writable || home.split('/').any(|c| c == "..") || home.ends_with('/') {
            errs.push(format!(
                "users: {n}: homedir {home:?} must be under /home or /var (the root is read-only)"
            ));
        }
        if let Some(sh) = &u.shell {
            if !sh.starts_with('/') || sh.contains(char::is_whitespace) {
                errs.push(format!("users: {n}: shell {sh:?} must be an absolute path"));
            }
        }
        for r in &u.sudo {
            if r.contains('\n') || r.trim().is_empty() {
                errs.push(format!(
                    "users: {n}: each sudo rule is one line such as \"ALL=(ALL) NOPASSWD:ALL\""
                ));
            }
        }
        for k in &u.ssh_authorized_keys {
            if let Err(e) = crate::settings::check_public_key(k) {
                errs.push(format!("users: {n}: {e}"));
            }
        }
        if let Some(g) = &u.gecos {
            if g.contains(['\n', ':']) {
                errs.push(format!("users: {n}: gecos may not hold ':' or a new line"));
            }
        }
    }
    errs
}

/// The names and numbers of /etc/passwd or /etc/group under `root`.
fn etc_entries(root: &Path, file: &str) -> Vec<(String, u32)> {
    std::fs::read_to_string(root.join("etc").join(file))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some((f.first()?.to_string(), f.get(2)?.parse().ok()?))
        })
        .collect()
}

/// A user with the numbers chosen for this node.
#[derive(Debug, Clone, PartialEq)]
pub struct Account {
    pub user: User,
    pub uid: u32,
}

/// UIDs: an existing home's owner (so files keep their owner across boots
/// and launches; `homes_owned` is false where homes are not chowned, in
/// tests), else `uid`, else the lowest free from 1000.
pub fn assign_uids(users: &[User], root: &Path, homes_owned: bool) -> Result<Vec<Account>, String> {
    let passwd = etc_entries(root, "passwd");
    let group = etc_entries(root, "group");
    let mut taken: BTreeSet<u32> = passwd.iter().chain(&group).map(|(_, n)| *n).collect();
    // A home left by a user no longer in the launch data keeps its number:
    // a new user must not become the owner of someone else's files.
    let homes_of_others: BTreeSet<u32> = if homes_owned {
        std::fs::read_dir(root.join("var/home"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                !users
                    .iter()
                    .any(|u| Path::new(&u.home()).file_name() == Some(&e.file_name()))
            })
            .filter_map(|e| e.metadata().ok().map(|m| m.uid()))
            .filter(|id| *id >= FIRST_UID)
            .collect()
    } else {
        BTreeSet::new()
    };
    taken.extend(homes_of_others);
    let mut out: Vec<Option<u32>> = Vec::new();
    for u in users {
        if let Some((_, id)) = passwd.iter().find(|(n, _)| *n == u.name) {
            return Err(format!(
                "users: {} is already an account of the image (uid {id}); root's keys are \
                 the top-level ssh_authorized_keys",
                u.name
            ));
        }
        if group.iter().any(|(n, _)| *n == u.name) {
            return Err(format!(
                "users: {} is the name of one of the image's groups; choose another name",
                u.name
            ));
        }
        let owner = std::fs::metadata(root.join(u.home().trim_start_matches('/')))
            .ok()
            .map(|m| m.uid())
            .filter(|id| homes_owned && *id >= FIRST_UID);
        let id = owner.or(u.uid);
        if let Some(id) = id {
            if !taken.insert(id) {
                return Err(format!("users: {}: uid {id} is used already", u.name));
            }
        }
        out.push(id);
    }
    let mut next = FIRST_UID;
    users
        .iter()
        .zip(out)
        .map(|(u, id)| {
            let uid = match id {
                Some(id) => id,
                None => {
                    while taken.contains(&next) {
                        next += 1;
                    }
                    if next > LAST_UID {
                        return Err("users: no free uid left".to_string());
                    }
                    taken.insert(next);
                    next
                }
            };
            Ok(Account {
                user: u.clone(),
                uid,
            })
        })
        .collect()
}

/// The user record (https://systemd.io/USER_RECORD) of an account.
pub fn user_record(a: &Account, shell_exists: impl Fn(&str) -> bool) -> Value {
    let shell = a
        .user
        .shell
        .clone()
        .unwrap_or_else(|| DEFAULT_SHELL.to_string());
    let shell = if shell_exists(&shell) {
        shell
    } else {
        "/bin/sh".to_string()
    };
    let mut r = serde_json::json!({
        "userName": a.user.name,
        "uid": a.uid,
        "gid": a.uid,
        "homeDirectory": a.user.home(),
        "shell": shell,
        "disposition": "regular",
        "memberOf": a.user.groups,
    });
    if let Some(g) = &a.user.gecos {
        r["realName"] = Value::String(g.clone());
    }
    r
}

/// Writes the records, sudo rules, homes and keys. Returns what was done and
/// the problems met; `chown` is false in tests run without privileges.
pub fn apply(
    users: &[User],
    groups: &[Group],
    root: &Path,
    chown: bool,
) -> (Vec<String>, Vec<String>) {
    let mut done = Vec::new();
    let mut problems = Vec::new();
    let userdb = root.join(USERDB_DIR.trim_start_matches('/'));
    let sudoers = root.join(SUDOERS_DIR.trim_start_matches('/'));
    // This boot's records replace any written earlier in it.
    for dir in [&userdb, &sudoers] {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    if users.is_empty() && groups.is_empty() {
        return (done, problems);
    }
    let accounts = match assign_uids(users, root, chown) {
        Ok(a) => a,
        Err(e) => return (done, vec![e]),
    };
    let image_groups = etc_entries(root, "group");
    // Groups named in `groups`, and those a user is put in that nothing
    // has (cloud-init makes those too), that the image does not have.
    let mut new_groups: Vec<Group> = Vec::new();
    let wanted = groups.iter().cloned().chain(users.iter().flat_map(|u| {
        u.groups.iter().map(|g| Group {
            name: g.clone(),
            members: Vec::new(),
        })
    }));
    for g in wanted {
        if image_groups.iter().any(|(n, _)| *n == g.name) || users.iter().any(|u| u.name == g.name)
        {
            continue;
        }
        match new_groups.iter_mut().find(|n| n.name == g.name) {
            Some(n) => n.members.extend(g.members),
            None => new_groups.push(g),
        }
    }
    let mut taken: BTreeSet<u32> = etc_entries(root, "passwd")
        .iter()
        .chain(&image_groups)
        .map(|(_, n)| *n)
        .chain(accounts.iter().map(|a| a.uid))
        .collect();
    for g in &new_groups {
        match write_group(g, group_gid(&g.name, &mut taken), &userdb) {
            Ok(d) => done.push(d),
            Err(e) => problems.push(format!("groups: {}: {e}", g.name)),
        }
    }
    // Members named by `groups` (users listing the group in their own
    // `groups` are written with them), of every group, new or the image's.
    let accounts_known = |m: &str| {
        users.iter().any(|u| u.name == m) || etc_entries(root, "passwd").iter().any(|(n, _)| n == m)
    };
    for g in groups {
        for m in &g.members {
            if !accounts_known(m) {
                problems.push(format!(
                    "groups: {}: {m} is neither a user of `users` nor of the image",
                    g.name
                ));
            } else if let Err(e) = write_membership(&userdb, m, &g.name) {
                problems.push(format!("groups: {}: {e}", g.name));
            }
        }
    }
    let known_groups: BTreeSet<String> = image_groups
        .into_iter()
        .map(|(n, _)| n)
        .chain(users.iter().map(|u| u.name.clone()))
        .chain(new_groups.iter().map(|g| g.name.clone()))
        .collect();
    for a in &accounts {
        match write_account(a, root, &userdb, &sudoers, &known_groups, chown) {
            Ok(d) => done.push(d),
            Err(e) => problems.push(format!("users: {}: {e}", a.user.name)),
        }
    }
    (done, problems)
}

/// A group's number: from its name (FNV-1a), the next free one on a collision.
fn group_gid(name: &str, taken: &mut BTreeSet<u32>) -> u32 {
    let hash = name.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    let span = GROUP_GIDS.end - GROUP_GIDS.start;
    let mut gid = GROUP_GIDS.start + hash % span;
    while taken.contains(&gid) {
        gid = GROUP_GIDS.start + (gid - GROUP_GIDS.start + 1) % span;
    }
    taken.insert(gid);
    gid
}

/// Readable by everyone, as /etc/passwd is: each process resolves names
/// itself (nss-systemd reads the files in the caller). The agent's umask is
/// 0077, so modes are set, not asked for.
fn userdb_dir(userdb: &Path) -> Result<(), String> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .create(userdb)
        .and_then(|()| std::fs::set_permissions(userdb, std::fs::Permissions::from_mode(0o755)))
        .map_err(|e| format!("cannot create /run/userdb: {e}"))
}

fn put_record(userdb: &Path, file: &str, body: &Value) -> Result<(), String> {
    let p = userdb.join(file);
    std::fs::write(&p, body.to_string() + "\n")
        .and_then(|()| std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)))
        .map_err(|e| format!("writing {file}: {e}"))
}

fn link_record(userdb: &Path, file: &str, to: &str) -> Result<(), String> {
    let p = userdb.join(file);
    let _ = std::fs::remove_file(&p);
    std::os::unix::fs::symlink(to, p).map_err(|e| format!("linking {file}: {e}"))
}

/// Not empty: systemd reads an empty drop-in as masked, and the membership
/// would be skipped.
fn write_membership(userdb: &Path, user: &str, group: &str) -> Result<(), String> {
    userdb_dir(userdb)?;
    let m = serde_json::json!({"userName": user, "groupName": group});
    put_record(userdb, &format!("{user}:{group}.membership"), &m)
}

fn write_group(g: &Group, gid: u32, userdb: &Path) -> Result<String, String> {
    userdb_dir(userdb)?;
    let record = serde_json::json!({"groupName": g.name, "gid": gid, "disposition": "regular"});
    put_record(userdb, &format!("{}.group", g.name), &record)?;
    link_record(
        userdb,
        &format!("{gid}.group"),
        &format!("{}.group", g.name),
    )?;
    Ok(format!("groups: {} (gid {gid})", g.name))
}

fn write_account(
    a: &Account,
    root: &Path,
    userdb: &Path,
    sudoers: &Path,
    known_groups: &BTreeSet<String>,
    chown: bool,
) -> Result<String, String> {
    let u = &a.user;
    let io = |what: &str, e: std::io::Error| format!("{what}: {e}");
    userdb_dir(userdb)?;
    let exists = |p: &str| root.join(p.trim_start_matches('/')).is_file();
    put_record(userdb, &format!("{}.user", u.name), &user_record(a, exists))?;
    link_record(
        userdb,
        &format!("{}.user", a.uid),
        &format!("{}.user", u.name),
    )?;
    let group = serde_json::json!({"groupName": u.name, "gid": a.uid, "disposition": "regular"});
    put_record(userdb, &format!("{}.group", u.name), &group)?;
    link_record(
        userdb,
        &format!("{}.group", a.uid),
        &format!("{}.group", u.name),
    )?;
    let mut missing = Vec::new();
    for g in &u.groups {
        if known_groups.contains(g) {
            write_membership(userdb, &u.name, g)?;
        } else {
            missing.push(g.as_str());
        }
    }
    let mut what = vec![format!("uid {}", a.uid)];
    if !u.sudo.is_empty() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(sudoers)
            .map_err(|e| io("cannot create the sudo rules' folder", e))?;
        let text: String = u.sudo.iter().map(|r| format!("{} {r}\n", u.name)).collect();
        // sudo skips names with a '.', and reads only files others cannot write.
        let f = sudoers.join(format!("90-user-{}", u.name));
        std::fs::write(&f, text).map_err(|e| io("writing the sudo rules", e))?;
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o440))
            .map_err(|e| io("chmod the sudo rules", e))?;
        what.push("sudo".into());
    }
    if !u.no_create_home {
        let home = root.join(u.home().trim_start_matches('/'));
        let made = !home.exists();
        let ssh = home.join(".ssh");
        for (d, mode) in [(&home, 0o700), (&ssh, 0o700)] {
            if !d.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(mode)
                    .create(d)
                    .map_err(|e| io(&format!("cannot create {}", d.display()), e))?;
                own(d, a.uid, chown)?;
            }
        }
        let added = add_keys(&ssh.join("authorized_keys"), &u.ssh_authorized_keys)?;
        own(&ssh.join("authorized_keys"), a.uid, chown)?;
        what.push(format!(
            "home {}{}",
            u.home(),
            if made { " made" } else { " kept" }
        ));
        what.push(format!(
            "{} of {} keys added",
            added,
            u.ssh_authorized_keys.len()
        ));
    } else if !u.ssh_authorized_keys.is_empty() {
        what.push("no home: its keys have nowhere to go".into());
    }
    if !missing.is_empty() {
        what.push(format!(
            "not in groups the image lacks: {}",
            missing.join(", ")
        ));
    }
    Ok(format!("users: {} ({})", u.name, what.join(", ")))
}

fn own(p: &Path, uid: u32, chown: bool) -> Result<(), String> {
    if chown {
        std::os::unix::fs::chown(p, Some(uid), Some(uid))
            .map_err(|e| format!("chown {}: {e}", p.display()))?;
    }
    Ok(())
}

/// Adds each key not there yet (a key the user added by hand stays).
fn add_keys(file: &Path, keys: &[String]) -> Result<usize, String> {
    let mut text = std::fs::read_to_string(file).unwrap_or_default();
    let have: BTreeSet<String> = text.lines().map(|l| l.trim().to_string()).collect();
    let mut added = 0;
    for k in keys {
        if !have.contains(k) {
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(k);
            text.push('\n');
            added += 1;
        }
    }
    std::fs::write(file, &text).map_err(|e| format!("writing {}: {e}", file.display()))?;
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("chmod {}: {e}", file.display()))?;
    Ok(added)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(s: &str) -> Value {
        serde_yaml::from_str(s).unwrap()
    }

    const DOC: &str = "
- default
- name: ops
  gecos: Night Operator
  groups: [docker, adm]
  sudo: ALL=(ALL) NOPASSWD:ALL
  shell: /bin/bash
  lock_passwd: true
  ssh_authorized_keys:
    - ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOps ops@laptop
- name: audit
  groups: docker, adm
  sudo: false
  passwd: $6$abc
- build, ci
";

    #[test]
    fn cloud_init_forms_are_read() {
        let mut w = Vec::new();
        let u = parse_users(&yaml(DOC), "cloud-config", &mut w).unwrap();
        let names: Vec<&str> = u.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["ops", "audit", "build", "ci"]);
        assert_eq!(u[0].groups, ["docker", "adm"]);
        assert_eq!(u[1].groups, ["docker", "adm"]);
        assert_eq!(u[0].sudo, ["ALL=(ALL) NOPASSWD:ALL"]);
        assert!(u[1].sudo.is_empty());
        assert_eq!(u[0].gecos.as_deref(), Some("Night Operator"));
        assert_eq!(u[0].home(), "/home/ops");
        let w = w.join("\n");
        assert!(w.contains("`default` adds no user"), "{w}");
        assert!(w.contains("`passwd` ignored"), "{w}");
        assert!(validate(&u).is_empty(), "{:?}", validate(&u));
    }

    #[test]
    fn bad_users_are_refused_with_the_reason() {
        let mut w = Vec::new();
        let u = parse_users(
            &yaml(
                "- name: Root!\n- name: a\n  homedir: /etc/a\n- name: b\n  uid: 0\n- name: b\n  sudo: \"x\\ny\"\n- name: c\n  ssh_authorized_keys: [hello]",
            ),
            "c",
            &mut w,
        )
        .unwrap();
        let e = validate(&u).join("\n");
        for want in [
            "\"Root!\" is not a user name",
            "homedir \"/etc/a\" must be under /home or /var",
            "uid 0 is outside",
            "b is listed twice",
            "each sudo rule is one line",
            "c: ",
        ] {
            assert!(e.contains(want), "{want}: {e}");
        }
        assert!(parse_users(&yaml("- [a]"), "c", &mut w).is_err());
        assert!(parse_users(&yaml("- gecos: x"), "c", &mut w)
            .unwrap_err()
            .contains("`name` is missing"));
    }

    fn system(root: &Path) {
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(
            root.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/bash\n_apt:x:42:65534::/nonexistent:/usr/sbin/nologin\n",
        )
        .unwrap();
        std::fs::write(
            root.join("etc/group"),
            "root:x:0:\nadm:x:4:\ndocker:x:1000:\n",
        )
        .unwrap();
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::write(root.join("bin/bash"), "").unwrap();
    }

    #[test]
    fn records_memberships_sudo_and_keys_are_written_and_kept_across_boots() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        system(root);
        let mut w = Vec::new();
        let users = parse_users(&yaml(DOC), "c", &mut w).unwrap();
        let (done, problems) = apply(&users, &[], root, false);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(done.len(), 4, "{done:?}");
        let db = root.join("run/userdb");
        let rec: Value =
            serde_json::from_str(&std::fs::read_to_string(db.join("ops.user")).unwrap()).unwrap();
        // 1000 is the docker group's: the first free number is 1001.
        assert_eq!(rec["uid"], 1001);
        assert_eq!(rec["gid"], 1001);
        assert_eq!(rec["homeDirectory"], "/home/ops");
        assert_eq!(rec["realName"], "Night Operator");
        assert_eq!(rec["shell"], "/bin/bash");
        assert_eq!(
            std::fs::read_link(db.join("1001.user")).unwrap(),
            Path::new("ops.user")
        );
        assert!(db.join("ops:docker.membership").is_file());
        // An empty one would be read as masked (no membership).
        assert!(
            std::fs::metadata(db.join("ops:adm.membership"))
                .unwrap()
                .len()
                > 0
        );
        // Every process reads them (its own name lookups), whatever the umask.
        for f in ["", "ops.user", "ops.group", "ops:adm.membership"] {
            let mode = std::fs::metadata(db.join(f)).unwrap().permissions().mode();
            assert_eq!(
                mode & 0o777,
                if f.is_empty() { 0o755 } else { 0o644 },
                "{f}"
            );
        }
        assert!(db.join("ops:adm.membership").is_file());
        assert!(db.join("ops.group").is_file() && db.join("1001.group").is_symlink());
        let sudo = std::fs::read_to_string(root.join("run/aiware/sudoers.d/90-user-ops")).unwrap();
        assert_eq!(sudo, "ops ALL=(ALL) NOPASSWD:ALL\n");
        assert!(!root.join("run/aiware/sudoers.d/90-user-audit").exists());
        let keys = root.join("home/ops/.ssh/authorized_keys");
        assert_eq!(
            std::fs::read_to_string(&keys).unwrap(),
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOps ops@laptop\n"
        );
        let uids: Vec<u32> = ["audit", "build", "ci"]
            .iter()
            .map(|n| {
                let r: Value = serde_json::from_str(
                    &std::fs::read_to_string(db.join(format!("{n}.user"))).unwrap(),
                )
                .unwrap();
                r["uid"].as_u64().unwrap() as u32
            })
            .collect();
        assert_eq!(uids, [1002, 1003, 1004]);

        // A key added by hand stays; the next boot writes the same again.
        std::fs::write(
            &keys,
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOps ops@laptop\nssh-rsa AAAAB3 mine\n",
        )
        .unwrap();
        std::fs::remove_dir_all(root.join("run")).unwrap();
        let (done, problems) = apply(&users, &[], root, false);
        assert!(problems.is_empty(), "{problems:?}");
        assert!(
            done[0].contains("home /home/ops kept") && done[0].contains("0 of 1 keys added"),
            "{done:?}"
        );
        assert!(std::fs::read_to_string(&keys).unwrap().contains("mine"));
        // Dropped from the launch data: its records go (its home stays).
        let (_, problems) = apply(&users[..1], &[], root, false);
        assert!(problems.is_empty());
        assert!(!db.join("audit.user").exists() && root.join("home/audit").is_dir());
    }

    #[test]
    fn groups_get_numbers_from_their_names_and_their_members() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        system(root);
        let mut w = Vec::new();
        let users = parse_users(
            &yaml("- name: ops\n  groups: [docker, night-shift]\n"),
            "c",
            &mut w,
        )
        .unwrap();
        let groups = parse_groups(
            &yaml("- admins: [root, ops]\n- cloud-users\n- docker: ops"),
            "c",
        )
        .unwrap();
        assert_eq!(groups.len(), 3);
        assert_eq!(groups[0].members, ["root", "ops"]);
        let (done, problems) = apply(&users, &groups, root, false);
        assert!(problems.is_empty(), "{problems:?}");
        let db = root.join("run/userdb");
        let gid = |g: &str| -> u64 {
            let r: Value = serde_json::from_str(
                &std::fs::read_to_string(db.join(format!("{g}.group"))).unwrap(),
            )
            .unwrap();
            r["gid"].as_u64().unwrap()
        };
        // The image's docker is not made again; the user's unknown group is
        // made, as cloud-init does.
        assert!(!db.join("docker.group").exists());
        let made: Vec<u64> = ["admins", "cloud-users", "night-shift"].map(gid).to_vec();
        assert!(made.iter().all(|g| (50000..60000).contains(g)), "{made:?}");
        assert!(
            done.iter().any(|d| d.starts_with("groups: admins (gid 5")),
            "{done:?}"
        );
        for m in ["root:admins", "ops:admins", "ops:docker", "ops:night-shift"] {
            assert!(db.join(format!("{m}.membership")).is_file(), "{m}");
        }
        // The same number whatever else the launch holds.
        std::fs::remove_dir_all(root.join("run")).unwrap();
        let (_, problems) = apply(&users, &groups[..1], root, false);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(gid("admins"), made[0]);
        // A member nobody knows, a group named like a user: said, not made.
        let odd = parse_groups(&yaml("{auditors: [ghost]}"), "c").unwrap();
        let (_, problems) = apply(&[], &odd, root, false);
        assert!(problems[0].contains("ghost is neither"), "{problems:?}");
        let clash = parse_groups(&yaml("[ops]"), "c").unwrap();
        assert!(validate_groups(&clash, &users)[0].contains("user of `users`"));
        assert!(parse_groups(&yaml("[[x]]"), "c").is_err());
    }

    #[test]
    fn a_new_user_never_gets_the_number_of_a_home_left_behind() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        system(root);
        let gone = root.join("var/home/ops");
        std::fs::create_dir_all(&gone).unwrap();
        if std::os::unix::fs::chown(&gone, Some(1001), Some(1001)).is_err() {
            eprintln!("not root: chown is not possible, the case is not run");
            return;
        }
        let dev = User {
            name: "dev".into(),
            homedir: Some("/var/home/dev".into()),
            ..User::default()
        };
        let a = assign_uids(std::slice::from_ref(&dev), root, true).unwrap();
        assert_eq!(a[0].uid, 1002, "1000 is docker's, 1001 ops's home's");
        // ops again: their own home's number.
        let ops = User {
            name: "ops".into(),
            homedir: Some("/var/home/ops".into()),
            ..User::default()
        };
        let a = assign_uids(&[dev, ops], root, true).unwrap();
        assert_eq!((a[0].uid, a[1].uid), (1002, 1001));
    }

    #[test]
    fn names_of_the_image_are_not_taken_over() {
        let d = tempfile::tempdir().unwrap();
        system(d.path());
        for n in ["root", "docker"] {
            let u = [User {
                name: n.into(),
                ..User::default()
            }];
            let (_, problems) = apply(&u, &[], d.path(), false);
            assert!(
                problems.len() == 1 && problems[0].contains(n),
                "{problems:?}"
            );
        }
        // A uid given that the image uses is refused too.
        let u = [User {
            name: "x".into(),
            uid: Some(1000),
            ..User::default()
        }];
        assert!(apply(&u, &[], d.path(), false).1[0].contains("uid 1000 is used"));
    }
}
