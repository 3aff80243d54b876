//! The containers of the containerized modes (`[[modes.<mode>.containers]]`
//! in modes.toml): for each chosen mode, aiw-agent checks the image is in
//! Docker (baked archives are loaded first, see `baked_images`; a missing one
//! is pulled once), writes the container's env file and a unit
//! `/run/systemd/system/<name>.service` (/ is read-only; /run is new each
//! boot, so units never outlive the settings that made them), and starts it.
//! A missing image or a failed pull is one error in `aiw-agent status` and the
//! unit is not started: no crash loop.
//!
//! Why `docker run` in the unit, not an `aiw-agent container-run` of our own:
//! the docker CLI is baked with every containerized mode, and in the
//! foreground `docker run` gives systemd what it supervises for free — the
//! unit lives as long as the container, its output is the unit's journal,
//! SIGTERM is forwarded (`--sig-proxy`), and `--rm` leaves nothing behind.
//! Nothing parses its output; what the agent needs to know (is the image
//! there, load it, pull it) it asks the Engine API through bollard before the
//! unit starts, and `--pull never` keeps the unit itself from ever pulling.

use crate::containers::{ContainerRuntime, RegistryAuth};
use crate::files::write_private;
use crate::modes::{parse_published, valid_image_ref, ModeContainer, ModeTable, Proto};
use crate::paths::Paths;
use crate::services::{DEFAULT_DB_NAME, DEFAULT_DB_USER};
use crate::settings::{is_secret, Settings};
use crate::systemd::UnitControl;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};

/// Where the units go (runtime units: / is read-only).
pub const UNIT_DIR: &str = "/run/systemd/system";
/// Env files (`<name>.env`) and secret files (`<name>/secrets/<KEY>`).
pub const RUN_DIR: &str = "/run/aiware/containers";
/// Where a container finds its secret settings as files (read-only).
pub const SECRETS_IN_CONTAINER: &str = "/run/secrets";
/// Label on every mode container (not the engines' managed-by label: host
/// actions never touch these).
pub const LABEL_MODE: &str = "ai.veritone.aiware.mode";
/// Name the host has inside a bridged container (for the db mode's PostgreSQL).
pub const HOST_ALIAS: &str = "host.docker.internal";

/// What one container needs on disk before its unit starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    pub mode: String,
    pub name: String,
    pub unit: String,
    pub image: String,
    pub unit_text: String,
    pub env: Vec<(String, String)>,
    /// Secret settings also given as files under [`SECRETS_IN_CONTAINER`].
    pub secrets: Vec<(String, String)>,
    /// Said once in the journal (e.g. no database configured).
    pub warnings: Vec<String>,
}

/// `<prefix>_ARGS`: whitespace-separated words.
fn args_of(c: &ModeContainer, s: &Settings) -> Vec<String> {
    match s.get(&format!("{}_ARGS", c.settings)) {
        Some(a) => a.split_whitespace().map(String::from).collect(),
        None => c.args.clone(),
    }
}

/// `<prefix>_ENV`: `KEY=VALUE` words.
fn extra_env(c: &ModeContainer, s: &Settings) -> Result<Vec<(String, String)>, String> {
    let key = format!("{}_ENV", c.settings);
    let Some(text) = s.get(&key) else {
        return Ok(Vec::new());
    };
    text.split_whitespace()
        .map(|w| {
            let (k, v) = w.split_once('=').unwrap_or((w, ""));
            let ok = !k.is_empty()
                && k.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if ok && w.contains('=') {
                Ok((k.to_string(), v.to_string()))
            } else {
                Err(format!("{key}: {w:?} is not KEY=VALUE"))
            }
        })
        .collect()
}

/// The image: `<prefix>_IMAGE` or the table's default.
pub fn image_of(c: &ModeContainer, s: &Settings) -> String {
    s.get(&format!("{}_IMAGE", c.settings))
        .unwrap_or(&c.image)
        .to_string()
}

/// Settings checks for the containers of the chosen modes (added to `settings::validate`).
pub fn validate(s: &Settings, table: &ModeTable, modes: &[String]) -> Vec<String> {
    let mut errs = Vec::new();
    for m in modes {
        for c in table
            .get(m)
            .map(|x| x.containers.as_slice())
            .unwrap_or_default()
        {
            let key = format!("{}_IMAGE", c.settings);
            if let Some(i) = s.get(&key) {
                if !valid_image_ref(i) {
                    errs.push(format!(
                        "{key}={i:?} is not an image reference (name[:tag][@sha256:digest], no spaces or shell characters)"
                    ));
                }
            }
            let key = format!("{}_ARGS", c.settings);
            if s.get(&key)
                .is_some_and(|a| a.chars().any(|ch| ch.is_control() && ch != '\n'))
            {
                errs.push(format!("{key}: control characters are not allowed"));
            }
            if let Err(e) = extra_env(c, s) {
                errs.push(e);
            }
        }
    }
    errs
}

/// The database settings of a container with `database = true`.
fn db_env(s: &Settings, modes: &[String], host_net: bool) -> Result<Vec<(String, String)>, String> {
    let host = match s.get("AIWARE_DB_HOST") {
        Some(h) => h.to_string(),
        None if modes.iter().any(|m| m == "db") => {
            if host_net { "127.0.0.1" } else { HOST_ALIAS }.to_string()
        }
        None => {
            return Err(
                "no database: run the db mode on this node, or set AIWARE_DB_HOST (and \
                 AIWARE_DB_PASS) for an existing PostgreSQL server"
                    .into(),
            )
        }
    };
    let mut env = vec![
        ("AIWARE_DB_HOST".to_string(), host),
        (
            "AIWARE_DB_PORT".into(),
            s.get("AIWARE_DB_PORT").unwrap_or("5432").into(),
        ),
        (
            "AIWARE_DB_NAME".into(),
            s.get("AIWARE_DB_NAME").unwrap_or(DEFAULT_DB_NAME).into(),
        ),
        (
            "AIWARE_DB_USER".into(),
            s.get("AIWARE_DB_USER").unwrap_or(DEFAULT_DB_USER).into(),
        ),
    ];
    if let Some(p) = s.get("AIWARE_DB_PASS").or(s.get("AIWARE_DB_PASSWORD")) {
        env.push(("AIWARE_DB_PASS".into(), p.into()));
    }
    Ok(env)
}

/// One word of a unit's ExecStart: bare when plain, else double-quoted with
/// C escapes; `%` and `$` doubled (systemd's specifiers and variables).
pub fn exec_word(w: &str) -> String {
    let plain = !w.is_empty()
        && w.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_./:=@,+-".contains(c));
    let q = if plain {
        w.to_string()
    } else {
        let mut o = String::from("\"");
        for c in w.chars() {
            match c {
                '\\' => o.push_str("\\\\"),
                '"' => o.push_str("\\\""),
                '\n' | '\r' | '\t' => o.push(' '),
                c => o.push(c),
            }
        }
        o.push('"');
        o
    };
    q.replace('%', "%%").replace('$', "$$")
}

/// Everything one container needs; `s` is the effective settings (generated passwords in).
pub fn plan(
    mode: &str,
    c: &ModeContainer,
    s: &Settings,
    modes: &[String],
) -> Result<Planned, String> {
    let image = image_of(c, s);
    if !valid_image_ref(&image) {
        return Err(format!("image {image:?} is not an image reference"));
    }
    let host_net = c.network.as_deref() == Some("host");
    let mut warnings = Vec::new();
    let mut env: Vec<(String, String)> = Vec::new();
    for k in &c.env {
        if let Some(v) = s.get(k) {
            env.push((k.clone(), v.to_string()));
        }
    }
    let mut local_db = false;
    if c.database {
        match db_env(s, modes, host_net) {
            Ok(e) => {
                local_db = e[0].1 == HOST_ALIAS;
                env.extend(e);
            }
            Err(e) => warnings.push(format!("{}: {e}", c.name)),
        }
    }
    env.extend(extra_env(c, s)?);
    // Docker's env files are one line per variable.
    for (_, v) in env.iter_mut() {
        *v = v.replace(['\n', '\r'], " ");
    }
    let secrets: Vec<(String, String)> =
        env.iter().filter(|(k, _)| is_secret(k)).cloned().collect();

    let name = &c.name;
    let mut argv: Vec<String> = [
        "/usr/bin/docker",
        "run",
        "--rm",
        "--name",
        name,
        "--pull",
        "never",
        // The unit's journal has the output; `docker logs` reads the local log.
        "--log-driver",
        "local",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    argv.push(format!("--env-file={RUN_DIR}/{name}.env"));
    argv.push(format!("--label={LABEL_MODE}={mode}"));
    if host_net {
        argv.push("--network=host".into());
    } else {
        for p in &c.ports {
            let (h, ct, proto) = parse_published(p)?;
            let suffix = if proto == Proto::Udp { "/udp" } else { "" };
            argv.push(format!("--publish={h}:{ct}{suffix}"));
        }
        if local_db {
            argv.push(format!("--add-host={HOST_ALIAS}:host-gateway"));
        }
    }
    for v in &c.volumes {
        let (host, inside) = v.split_once(':').unwrap_or((v, v));
        argv.push(format!("--volume=/opt/aiware/{host}:{inside}"));
    }
    if !secrets.is_empty() {
        argv.push(format!(
            "--volume={RUN_DIR}/{name}/secrets:{SECRETS_IN_CONTAINER}:ro"
        ));
    }
    argv.push(image.clone());
    argv.extend(args_of(c, s));
    let exec: Vec<String> = argv.iter().map(|w| exec_word(w)).collect();
    let unit_text = format!(
        "# Written by aiw-agent at boot from modes.toml and the launch settings.\n\
         [Unit]\n\
         Description=aiWARE {mode} container {name}\n\
         Documentation=file:///usr/share/doc/aiwimg/README.md\n\
         After=docker.service aiw-agent.service network-online.target\n\
         Requires=docker.service\n\
         Wants=network-online.target\n\
         # Restarts back off (below) and never give up.\n\
         StartLimitIntervalSec=0\n\
         \n\
         [Service]\n\
         ExecStartPre=-/usr/bin/docker rm --force {name}\n\
         ExecStart={}\n\
         ExecStop=/usr/bin/docker stop --time 30 {name}\n\
         Restart=always\n\
         RestartSec=5\n\
         RestartSteps=10\n\
         RestartMaxDelaySec=300\n\
         TimeoutStartSec=120\n\
         TimeoutStopSec=45\n\
         StandardOutput=journal\n\
         StandardError=journal\n\
         SyslogIdentifier={name}\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        exec.join(" ")
    );
    Ok(Planned {
        mode: mode.to_string(),
        name: name.clone(),
        unit: format!("{name}.service"),
        image,
        unit_text,
        env,
        secrets,
        warnings,
    })
}

/// What happened to one container, for `aiw-agent status`.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerState {
    pub mode: String,
    pub unit: String,
    /// `started`, or why not.
    pub state: String,
}

#[derive(Debug, Default)]
pub struct BringUp {
    pub containers: Vec<ContainerState>,
    pub errors: Vec<String>,
}

/// Credentials of `AIWARE_REGISTRY` for an image it serves.
fn auth_for(image: &str, s: &Settings) -> Option<RegistryAuth> {
    let (host, _) = crate::registry_trust::parse_registry(s.get("AIWARE_REGISTRY")?).ok()?;
    image
        .starts_with(&format!("{host}/"))
        .then(|| RegistryAuth {
            server: host.to_string(),
            username: s.get("AIWARE_REGISTRY_USER").unwrap_or("").to_string(),
            password: s.get("AIWARE_REGISTRY_PASSWORD").unwrap_or("").to_string(),
        })
}

fn write_files(paths: &Paths, p: &Planned) -> Result<(), String> {
    let dir = paths.at(RUN_DIR);
    let mut env = String::from("# Written by aiw-agent (0600): read by docker run --env-file.\n");
    for (k, v) in &p.env {
        env.push_str(&format!("{k}={v}\n"));
    }
    let io = |what: String| move |e: std::io::Error| format!("cannot write {what}: {e}");
    write_private(&dir.join(format!("{}.env", p.name)), env.as_bytes(), 0o600)
        .map_err(io(format!("{RUN_DIR}/{}.env", p.name)))?;
    let secrets = dir.join(&p.name).join("secrets");
    let _ = std::fs::remove_dir_all(&secrets);
    if !p.secrets.is_empty() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&secrets)
            .map_err(io(secrets.display().to_string()))?;
        for (k, v) in &p.secrets {
            write_private(&secrets.join(k), v.as_bytes(), 0o600)
                .map_err(io(format!("{}/{k}", secrets.display())))?;
        }
    }
    for d in p
        .unit_text
        .lines()
        .filter_map(|l| l.strip_prefix("ExecStart="))
    {
        // The volumes' host folders, made before Docker would make them root 0755 itself.
        for w in d
            .split(' ')
            .filter_map(|w| w.strip_prefix("--volume=/opt/aiware/"))
        {
            let folder = w.split(':').next().unwrap_or("");
            let path = paths.var_opt_aiware().join(folder);
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(&path)
                .and_then(|_| {
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                })
                .map_err(io(path.display().to_string()))?;
        }
    }
    let unit = paths.at(UNIT_DIR).join(&p.unit);
    std::fs::create_dir_all(paths.at(UNIT_DIR)).map_err(io(UNIT_DIR.to_string()))?;
    write_private(&unit, p.unit_text.as_bytes(), 0o644).map_err(io(unit.display().to_string()))
}

/// Stops the containers of modes not chosen (units an earlier run wrote),
/// then readies and starts those of the chosen modes.
pub fn bring_up(
    paths: &Paths,
    units: &dyn UnitControl,
    rt: &dyn ContainerRuntime,
    table: &ModeTable,
    s: &Settings,
    modes: &[String],
) -> BringUp {
    let mut out = BringUp::default();
    let chosen = |m: &str| modes.iter().any(|x| x == m);
    let stale: Vec<String> = table
        .modes
        .iter()
        .filter(|(m, _)| !chosen(m))
        .flat_map(|(_, spec)| spec.containers.iter())
        .map(|c| format!("{}.service", c.name))
        .filter(|u| paths.at(UNIT_DIR).join(u).exists())
        .collect();
    if !stale.is_empty() {
        if let Err(e) = units.stop_and_disable(&stale) {
            out.errors
                .push(format!("stopping containers of modes not chosen: {e}"));
        }
        for u in &stale {
            let _ = std::fs::remove_file(paths.at(UNIT_DIR).join(u));
        }
    }
    let mut start = Vec::new();
    for m in modes {
        for c in table
            .get(m)
            .map(|x| x.containers.as_slice())
            .unwrap_or_default()
        {
            let unit = format!("{}.service", c.name);
            let not_started = |why: String, out: &mut BringUp| {
                out.errors
                    .push(format!("mode {m}: container {}: {why}", c.name));
                out.containers.push(ContainerState {
                    mode: m.clone(),
                    unit: unit.clone(),
                    state: format!("not started: {why}"),
                });
            };
            let p = match plan(m, c, s, modes) {
                Ok(p) => p,
                Err(e) => {
                    not_started(e, &mut out);
                    continue;
                }
            };
            for w in &p.warnings {
                crate::log::info(&format!("warning: mode {m}: {w}"));
            }
            let present = match rt.has_image(&p.image) {
                Ok(true) => Ok(()),
                Ok(false) => rt
                    .pull(&p.image, auth_for(&p.image, s).as_ref())
                    .map_err(|e| {
                        format!(
                        "image {} is not on this node and pulling it failed: {e}; bake it into \
                         the image ([[container_images]]) or set {}_IMAGE to an image a \
                         reachable registry serves",
                        p.image, c.settings
                    )
                    }),
                Err(e) => Err(format!("cannot ask Docker for image {}: {e}", p.image)),
            };
            if let Err(e) = present.and_then(|_| write_files(paths, &p)) {
                not_started(e, &mut out);
                continue;
            }
            out.containers.push(ContainerState {
                mode: m.clone(),
                unit: unit.clone(),
                state: "started".into(),
            });
            start.push(unit);
        }
    }
    if let Err(e) = units.enable_and_start(&start) {
        out.errors.push(format!("starting mode containers: {e}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::containers::fake::FakeRuntime;
    use crate::systemd::RecordingUnits;
    use std::path::Path;

    fn table() -> ModeTable {
        ModeTable::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/modes.toml"))
            .unwrap()
    }

    fn settings(vars: &[(&str, &str)]) -> Settings {
        Settings {
            vars: vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    fn controller(t: &ModeTable) -> ModeContainer {
        t.get("controller").unwrap().containers[0].clone()
    }

    fn exec_line(p: &Planned) -> String {
        p.unit_text
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .unwrap()
            .to_string()
    }

    #[test]
    fn controller_unit_runs_the_vendor_named_container_with_the_db_modes_postgres() {
        let t = table();
        let s = settings(&[
            ("AIWARE_INIT_TOKEN", "tok-123456"),
            ("AIWARE_LICENSE", "lic"),
            ("AIWARE_DB_PASS", "pw"),
        ]);
        let modes = vec!["controller".to_string(), "db".to_string()];
        let p = plan("controller", &controller(&t), &s, &modes).unwrap();
        assert_eq!(p.unit, "aiware-controller.service");
        let x = exec_line(&p);
        assert!(
            x.starts_with("/usr/bin/docker run --rm --name aiware-controller --pull never"),
            "{x}"
        );
        for w in [
            "--env-file=/run/aiware/containers/aiware-controller.env",
            "--publish=9000:9000",
            "--publish=8001:8001",
            "--volume=/opt/aiware/controller:/opt/aiware/controller",
            "--add-host=host.docker.internal:host-gateway",
            "--volume=/run/aiware/containers/aiware-controller/secrets:/run/secrets:ro",
            "--label=ai.veritone.aiware.mode=controller",
        ] {
            assert!(x.split(' ').any(|y| y == w), "{w} missing from {x}");
        }
        assert!(x.ends_with(" aiware-controller:latest"), "{x}");
        let env: std::collections::BTreeMap<_, _> = p.env.iter().cloned().collect();
        assert_eq!(env["AIWARE_DB_HOST"], HOST_ALIAS);
        assert_eq!(env["AIWARE_DB_NAME"], "aiware");
        assert_eq!(env["AIWARE_DB_PASS"], "pw");
        assert_eq!(env["AIWARE_INIT_TOKEN"], "tok-123456");
        // The secrets never go on the command line, they are files.
        assert!(!p.unit_text.contains("tok-123456") && !p.unit_text.contains("=pw"));
        let sec: Vec<&str> = p.secrets.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            sec,
            ["AIWARE_INIT_TOKEN", "AIWARE_LICENSE", "AIWARE_DB_PASS"]
        );
        for l in [
            "After=docker.service aiw-agent.service",
            "Requires=docker.service",
            "Restart=always",
            "RestartSteps=10",
            "RestartMaxDelaySec=300",
            "StartLimitIntervalSec=0",
        ] {
            assert!(p.unit_text.contains(l), "{l}");
        }
    }

    #[test]
    fn image_args_and_env_come_from_settings_quoted_for_systemd() {
        let t = table();
        let s = settings(&[
            ("AIWARE_CONTROLLER_IMAGE", "reg:5000/aiwimg-test/controller-double:1"),
            ("AIWARE_CONTROLLER_ARGS", "--listen 0.0.0.0:9000 --init-token-file /run/secrets/AIWARE_INIT_TOKEN --note 50%$HOME"),
            ("AIWARE_CONTROLLER_ENV", "NFS_SERVER=10.0.0.2 DEBUG=1"),
            ("AIWARE_DB_HOST", "db.lan"),
        ]);
        let p = plan("controller", &controller(&t), &s, &["controller".into()]).unwrap();
        assert_eq!(p.image, "reg:5000/aiwimg-test/controller-double:1");
        let x = exec_line(&p);
        assert!(
            x.ends_with(" reg:5000/aiwimg-test/controller-double:1 --listen 0.0.0.0:9000 --init-token-file /run/secrets/AIWARE_INIT_TOKEN --note \"50%%$$HOME\""),
            "{x}"
        );
        assert!(
            !x.contains("--add-host"),
            "an existing server: no host alias"
        );
        assert!(p.env.contains(&("NFS_SERVER".into(), "10.0.0.2".into())));
        assert!(p.env.contains(&("AIWARE_DB_HOST".into(), "db.lan".into())));
        // No db mode and no AIWARE_DB_HOST: a warning, the container still runs.
        let p = plan(
            "controller",
            &controller(&t),
            &settings(&[]),
            &["controller".into()],
        )
        .unwrap();
        assert!(p.warnings[0].contains("no database"), "{:?}", p.warnings);
        // Bad settings are validation errors.
        let bad = settings(&[
            ("AIWARE_CONTROLLER_IMAGE", "x; reboot"),
            ("AIWARE_CONTROLLER_ENV", "=1"),
        ]);
        let e = validate(&bad, &t, &["controller".into()]);
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(validate(&bad, &t, &["engine".into()]).is_empty());
        assert_eq!(exec_word("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }

    #[test]
    fn bring_up_starts_present_images_and_reports_missing_ones_once() {
        let t = table();
        let d = tempfile::tempdir().unwrap();
        let paths = Paths::new(d.path());
        let units = RecordingUnits::default();
        let rt = FakeRuntime::new();
        rt.add_archive(Path::new("/a.tar"), &["aiware-controller:latest"]);
        rt.load_archive(Path::new("/a.tar")).unwrap();
        rt.fail_pulls_of("minio/minio:latest");
        let s = settings(&[
            ("AIWARE_INIT_TOKEN", "tok-123456"),
            ("AIWARE_MINIO_SECRET_KEY", "k"),
        ]);
        let modes = vec!["controller".to_string(), "minio".to_string()];
        let r = bring_up(&paths, &units, &rt, &t, &s, &modes);
        assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
        assert!(r.errors[0].contains("mode minio: container aiware-minio: image minio/minio:latest is not on this node and pulling it failed"), "{}", r.errors[0]);
        assert!(r.errors[0].contains("AIWARE_MINIO_IMAGE"));
        assert_eq!(
            *units.calls.lock().unwrap(),
            vec!["start aiware-controller.service"]
        );
        assert_eq!(r.containers[0].state, "started");
        assert!(r.containers[1].state.starts_with("not started: image"));
        // The present image was not pulled; the missing one once.
        assert_eq!(
            rt.calls()
                .iter()
                .filter(|c| c.starts_with("pull"))
                .collect::<Vec<_>>(),
            ["pull minio/minio:latest"]
        );
        let unit = paths.at("/run/systemd/system/aiware-controller.service");
        assert!(std::fs::read_to_string(&unit)
            .unwrap()
            .contains("--name aiware-controller"));
        assert!(!paths
            .at("/run/systemd/system/aiware-minio.service")
            .exists());
        let env = std::fs::read_to_string(paths.at("/run/aiware/containers/aiware-controller.env"))
            .unwrap();
        assert!(env.contains("AIWARE_INIT_TOKEN=tok-123456\n"), "{env}");
        let mode = |p: &str| std::fs::metadata(paths.at(p)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("/run/aiware/containers/aiware-controller.env"), 0o600);
        assert_eq!(
            std::fs::read_to_string(
                paths.at("/run/aiware/containers/aiware-controller/secrets/AIWARE_INIT_TOKEN")
            )
            .unwrap(),
            "tok-123456"
        );
        assert!(paths.at("/var/opt/aiware/controller").is_dir());

        // Next run with only minio chosen: the controller's unit is stopped and gone.
        let units = RecordingUnits::default();
        let r = bring_up(&paths, &units, &rt, &t, &s, &["engine".to_string()]);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(
            *units.calls.lock().unwrap(),
            vec!["stop aiware-controller.service"]
        );
        assert!(!unit.exists());
    }
}
