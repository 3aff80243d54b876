//! Applying settings to the node: persisted state, directories, sysctls,
//! kernel modules, SSH keys and hostname (user-data's and the platform's), write_files, rendered config files and
//! the mode services. Settings flow one way: settings → files → units.

use crate::files::write_private;
use crate::modes::ModeTable;
use crate::paths::Paths;
use crate::settings::Settings;
use crate::systemd::UnitControl;
use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

pub fn save_settings(paths: &Paths, s: &Settings) -> std::io::Result<()> {
    let dir = paths.state_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    write_private(
        &paths.settings_file(),
        &serde_json::to_vec_pretty(s).unwrap_or_default(),
        0o600,
    )
}

pub fn load_settings(paths: &Paths) -> Option<Settings> {
    serde_json::from_slice(&std::fs::read(paths.settings_file()).ok()?).ok()
}

/// The services of the chosen modes, and of the other modes (to keep stopped).
pub fn split_services(table: &ModeTable, modes: &[String]) -> (Vec<String>, Vec<String>) {
    let mut wanted: BTreeSet<String> = BTreeSet::new();
    for m in modes {
        if let Some(spec) = table.get(m) {
            wanted.extend(spec.services.iter().cloned());
        }
    }
    let others = table
        .all_mode_services()
        .into_iter()
        .filter(|s| !wanted.contains(s))
        .collect();
    (wanted.into_iter().collect(), others)
}

/// Ports open on a node with these modes (common ones included), for status and the firewall.
pub fn ports(table: &ModeTable, modes: &[String]) -> Vec<String> {
    let mut p: BTreeSet<crate::modes::Port> = table.common.ports.iter().copied().collect();
    for m in modes {
        if let Some(spec) = table.get(m) {
            p.extend(spec.ports.iter().copied());
        }
    }
    p.into_iter().map(|p| p.to_string()).collect()
}

pub struct Applier<'a> {
    pub paths: &'a Paths,
    pub table: &'a ModeTable,
    pub units: &'a dyn UnitControl,
    /// False in tests: no modprobe, sethostname or mounts on the real system.
    pub real_system: bool,
}

impl Applier<'_> {
    /// Stops every mode service: used when settings are invalid.
    /// The firewall opens only the common ports (SSH stays reachable).
    pub fn stop_all(&self) -> Result<(), String> {
        let fw = self.firewall(&[]);
        self.units
            .stop_and_disable(&self.table.all_mode_services())?;
        fw
    }

    /// Loads the nftables ruleset opening the ports of `modes` (and the common ones).
    pub fn firewall(&self, modes: &[String]) -> Result<(), String> {
        let open: Vec<crate::modes::Port> = ports(self.table, modes)
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect();
        crate::firewall::load(self.paths, &open, self.real_system)
    }

    /// Applies valid settings; returns the problems met (none is fatal to the others).
    pub fn apply(&self, s: &Settings) -> Vec<String> {
        let mut errs = Vec::new();
        let modes = s.modes();
        if let Err(e) = save_settings(self.paths, s) {
            errs.push(format!(
                "cannot persist settings in {}: {e}",
                self.paths.state_dir().display()
            ));
        }
        // Data disks first: the mode directories below, Docker's data and
        // the swap file may live on them.
        errs.extend(self.storage(s));
        // Before any service starts: they read the zone and the trusted CAs.
        errs.extend(self.os_config(s));
        errs.extend(self.registry_trust(s));
        for m in &modes {
            let Some(spec) = self.table.get(m) else {
                continue;
            };
            for d in &spec.directories {
                let p = self.paths.var_opt_aiware().join(d);
                if let Err(e) = std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(&p)
                {
                    errs.push(format!("cannot create {}: {e}", p.display()));
                } else if let Some(owner) = &spec.owner {
                    if let Err(e) =
                        crate::services::own_dir(self.paths, &p, owner, self.real_system)
                    {
                        errs.push(e);
                    }
                } else if let Err(e) =
                    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
                {
                    // The agent runs with UMask=0077: 0755 said explicitly.
                    errs.push(format!("chmod 0755 {}: {e}", p.display()));
                }
            }
            for (k, v) in &spec.sysctls {
                let p = self.paths.proc_sys().join(k.replace('.', "/"));
                if let Err(e) = std::fs::write(&p, v) {
                    errs.push(format!(
                        "sysctl {k}={v} (mode {m}): cannot write {}: {e}",
                        p.display()
                    ));
                }
            }
            for km in &spec.kernel_modules {
                if self.real_system {
                    match std::process::Command::new("modprobe")
                        .arg("--")
                        .arg(km)
                        .status()
                    {
                        Ok(st) if st.success() => {}
                        Ok(st) => errs.push(format!("modprobe {km} (mode {m}) exited with {st}")),
                        Err(e) => errs.push(format!("cannot run modprobe {km}: {e}")),
                    }
                }
            }
        }
        errs.extend(self.apply_access(s));
        for f in &s.write_files {
            if let Err(e) = self.write_file(f) {
                errs.push(e);
            }
        }
        // Before the role services start: they may need the memory.
        if let Some(sw) = &s.swap {
            let facts = crate::host::gather_toward(self.paths, None);
            let bytes = crate::swap::size_for(sw, facts.memory_bytes, facts.disk_available_var);
            match crate::swap::ensure(&self.paths.at(&sw.filename), bytes, self.real_system) {
                Ok(said) => crate::log::info(&said),
                Err(e) => errs.push(e),
            }
        }
        // Network settings from user-data (/etc is read-only): systemd-networkd
        // is already up, so it is told to read them now. Static addresses on a
        // cluster network without DHCP come this way.
        if self.real_system && writes_network_config(&s.write_files) {
            match std::process::Command::new("networkctl")
                .arg("reload")
                .status()
            {
                Ok(st) if st.success() => {}
                Ok(st) => errs.push(format!("networkctl reload exited with {st}")),
                Err(e) => errs.push(format!("cannot run networkctl reload: {e}")),
            }
        }
        // Passwords not given are generated once and kept (0600) in /var/lib/aiware/secrets.
        let effective = match crate::services::with_generated_secrets(self.paths, s, &modes) {
            Ok(e) => e,
            Err(e) => {
                errs.push(e);
                s.clone()
            }
        };
        // AIWARE_SERVER_TYPE and AIWARE_REGION not given: the instance's own.
        let effective = crate::platform::with_defaults(
            effective,
            &crate::platform::for_settings(self.paths, s),
        );
        crate::log::add_secrets(effective.secrets());
        let prepared = crate::services::prepare(self.paths, &effective, &modes, self.real_system);
        errs.extend(prepared.errors);
        if let Err(e) = self.render_env(&effective) {
            errs.push(e);
        }
        if let Err(e) = self.firewall(&modes) {
            errs.push(e);
        }
        let (mut wanted, mut others) = split_services(self.table, &modes);
        // A service whose configuration failed its check stays stopped.
        wanted.retain(|u| !prepared.skip_units.contains(u));
        others.extend(prepared.skip_units);
        if let Err(e) = self.units.stop_and_disable(&others) {
            errs.push(format!("stopping services of modes not chosen: {e}"));
        }
        if let Err(e) = self.units.enable_and_start(&wanted) {
            errs.push(format!("starting mode services: {e}"));
        }
        errs
    }

    /// cloud-config `disk_setup`, `fs_setup`, `mounts` ([`crate::storage`]).
    /// Docker and containerd are stopped while their data folder is mounted
    /// over (the image starts Docker at boot beside the agent); the mode
    /// services started below bring Docker back on the mounted disk.
    fn storage(&self, s: &Settings) -> Vec<String> {
        if s.storage.is_empty() || !self.real_system {
            return Vec::new();
        }
        let mut errs = Vec::new();
        if crate::storage::mounts_under_docker(&s.storage) {
            let units: Vec<String> = ["docker.socket", "docker.service", "containerd.service"]
                .iter()
                .map(|u| u.to_string())
                .collect();
            // Also while still starting: Docker starts as soon as /var is
            // mounted, so the agent may well come here during its start.
            if units
                .iter()
                .any(|u| crate::systemd::is_up_or_coming_up(&self.units.active_state(u)))
            {
                crate::log::info("storage: stopping Docker while its data folder is mounted");
                if let Err(e) = self.units.stop_and_disable(&units) {
                    errs.push(format!("stopping Docker before mounting its data: {e}"));
                }
            }
        }
        let (done, problems) = crate::storage::apply(
            &s.storage,
            &crate::storage::SystemDevices,
            &self.paths.at("/"),
            &self.paths.run_dir(),
        );
        for d in done {
            crate::log::info(&d);
        }
        errs.extend(problems);
        errs
    }

    /// What keeps the node reachable: SSH keys and hostname, from user-data
    /// and from the platform's metadata of the same instance. Applied even
    /// when the aiWARE settings are invalid, so the operator can log in and
    /// look; and at every boot, since nothing on the read-only /etc keeps them.
    pub fn apply_access(&self, s: &Settings) -> Vec<String> {
        let mut errs = Vec::new();
        let platform = crate::platform::for_settings(self.paths, s);
        if let Err(e) = self.ssh_keys(&crate::platform::authorized_keys(s, &platform)) {
            errs.push(e);
        }
        if let Some((h, from)) = crate::platform::hostname(s, &platform) {
            match self.hostname(h) {
                Ok(how) => crate::log::info(&format!("hostname {h} (from {from}): {how}")),
                Err(e) => errs.push(e),
            }
        }
        // Checked again here: this runs for invalid settings too (where
        // `settings::validate` already refused the launch), and any invalid
        // user leaves them all out, as one bad entry may be a typo of another.
        let bad = crate::users::validate(&s.users).len()
            + crate::users::validate_groups(&s.groups, &s.users).len();
        if bad == 0 {
            let (done, problems) =
                crate::users::apply(&s.users, &s.groups, &self.paths.at("/"), self.real_system);
            done.iter().for_each(|d| crate::log::info(d));
            errs.extend(problems);
        }
        errs
    }

    /// cloud-config `ntp`, `timezone`, `ca_certs` ([`crate::os_config`]):
    /// each into the /run file the image's /etc links to.
    fn os_config(&self, s: &Settings) -> Vec<String> {
        use crate::os_config as os;
        let mut errs = Vec::new();
        let at = |p: &str| self.paths.at(p);
        if let Some(tz) = &s.timezone {
            match os::zone_file(tz, &at("/")) {
                Ok(file) => match crate::files::replace_with_link(&at(os::LOCALTIME), &file) {
                    Ok(()) => crate::log::info(&format!("timezone {tz}")),
                    Err(e) => errs.push(format!("cannot set the time zone {tz}: {e}")),
                },
                Err(e) => errs.push(e),
            }
        }
        if let Some(c) = &s.ca_certs {
            let image = std::fs::read_to_string(at(os::IMAGE_CA_BUNDLE)).unwrap_or_default();
            match crate::files::write_public(
                &at(os::CA_BUNDLE),
                os::ca_bundle(c, &image).as_bytes(),
            ) {
                Ok(()) => crate::log::info(&format!(
                    "ca_certs: {} certificate(s) trusted{}",
                    c.trusted.len(),
                    if c.remove_defaults {
                        ", the image's own removed"
                    } else {
                        " beside the image's own"
                    }
                )),
                Err(e) => errs.push(format!("cannot write {}: {e}", os::CA_BUNDLE)),
            }
        }
        if let Some(n) = &s.ntp {
            let unit = "systemd-timesyncd.service".to_string();
            let dropin = at(os::TIMESYNCD_DROPIN);
            match os::timesyncd_dropin(n) {
                Some(text) => {
                    // Already written this boot (the agent ran again): timesyncd
                    // has read it. /run is new at every boot, so a boot's first
                    // run always restarts timesyncd, which started before it.
                    let same = std::fs::read_to_string(&dropin).is_ok_and(|t| t == text);
                    let r = crate::files::write_public(&dropin, text.as_bytes())
                        .map_err(|e| format!("cannot write {}: {e}", os::TIMESYNCD_DROPIN))
                        .and_then(|()| {
                            if self.real_system && !same {
                                self.units.try_restart(&unit)
                            } else {
                                Ok(())
                            }
                        });
                    match r {
                        Ok(()) => crate::log::info(&format!(
                            "ntp: systemd-timesyncd asks {}",
                            if n.servers.is_empty() {
                                "the image's default servers".to_string()
                            } else {
                                n.servers.join(", ")
                            }
                        )),
                        Err(e) => errs.push(format!("ntp: {e}")),
                    }
                }
                None => {
                    let _ = std::fs::remove_file(&dropin);
                    match self.units.stop_and_disable(&[unit]) {
                        Ok(()) => crate::log::info("ntp: disabled, systemd-timesyncd stopped"),
                        Err(e) => errs.push(format!("ntp: stopping systemd-timesyncd: {e}")),
                    }
                }
            }
        }
        errs
    }

    /// Docker's trusted registries ([`crate::registry_trust`]): the image's
    /// daemon.json, with the one plain-HTTP registry the launch allows.
    fn registry_trust(&self, s: &Settings) -> Vec<String> {
        use crate::registry_trust as rt;
        let Ok(image) = std::fs::read_to_string(self.paths.at(rt::IMAGE_DAEMON_JSON)) else {
            return Vec::new(); // an image without Docker
        };
        let registry = rt::cluster_registry(s);
        let plain = registry
            .as_ref()
            .filter(|r| r.plain_http)
            .map(|r| r.authority.as_str());
        let text = match rt::daemon_json(&image, plain) {
            Ok(t) => t,
            Err(e) => return vec![e],
        };
        let file = self.paths.at(rt::DAEMON_JSON);
        let json = |t: &str| serde_json::from_str::<serde_json::Value>(t).ok();
        // What Docker read at its start (tmpfiles' link to the image's file,
        // or this boot's earlier write): nothing to do when it is the same.
        let current = std::fs::read_to_string(&file).ok();
        if current.as_deref().and_then(json) != json(&text) {
            if let Err(e) = crate::files::write_public(&file, text.as_bytes()) {
                return vec![format!("cannot write {}: {e}", rt::DAEMON_JSON)];
            }
            let docker = "docker.service";
            let state = self.units.active_state(docker);
            if matches!(state.as_str(), "active" | "activating" | "reloading") {
                if let Err(e) = self.units.try_reload(docker) {
                    return vec![format!("registry trust: reloading Docker: {e}")];
                }
            }
        }
        crate::log::info(&rt::describe(registry.as_ref()));
        Vec::new()
    }

    fn ssh_keys(&self, keys: &[String]) -> Result<(), String> {
        let dir = self.paths.ssh_root_dir();
        let parent = dir.parent().unwrap_or(&dir).to_path_buf();
        let mk = |p: &Path, mode: u32| -> Result<(), String> {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(mode)
                .create(p)
                .map_err(|e| format!("cannot create {}: {e}", p.display()))?;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
                .map_err(|e| format!("chmod {}: {e}", p.display()))
        };
        // sshd StrictModes: every directory on the way root-owned and not group/world-writable.
        mk(&parent, 0o755)?;
        mk(&dir, 0o700)?;
        let mut text = String::new();
        for k in keys {
            text.push_str(k);
            text.push('\n');
        }
        write_private(&dir.join("authorized_keys"), text.as_bytes(), 0o600)
            .map_err(|e| format!("cannot write authorized_keys: {e}"))
    }

    /// /run/aiware/hostname (what the agent registers with), then the
    /// system's hostname ([`crate::hostname`]); returns how it was set.
    fn hostname(&self, h: &str) -> Result<String, String> {
        write_private(
            &self.paths.run_dir().join("hostname"),
            format!("{h}\n").as_bytes(),
            0o644,
        )
        .map_err(|e| format!("cannot write /run/aiware/hostname: {e}"))?;
        if !self.real_system {
            return Ok("written to /run/aiware/hostname only (not a real system)".into());
        }
        crate::hostname::set(
            &crate::hostname::SystemHostname {
                etc: self.paths.at("/etc"),
            },
            h,
        )
    }

    fn write_file(&self, f: &crate::userdata::WriteFile) -> Result<(), String> {
        crate::settings::check_write_path(&f.path)?;
        let p = self.paths.at(&f.path);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).map_err(|e| format!("write_files {}: {e}", f.path))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .append(f.append)
            .truncate(!f.append)
            .mode(f.permissions)
            .open(&p)
            .map_err(|e| format!("write_files {}: {e}", f.path))?;
        file.write_all(&f.content)
            .map_err(|e| format!("write_files {}: {e}", f.path))?;
        file.set_permissions(std::fs::Permissions::from_mode(f.permissions))
            .map_err(|e| format!("write_files {}: {e}", f.path))
    }

    /// /run/aiware/aiware.env for the aiWARE containers, rendered from its template.
    fn render_env(&self, s: &Settings) -> Result<(), String> {
        let mut tera = tera::Tera::default();
        tera.add_raw_template("aiware.env", include_str!("../templates/aiware.env.tera"))
            .map_err(|e| format!("template aiware.env: {e}"))?;
        let mut ctx = tera::Context::new();
        ctx.insert("root", s.get("AIWARE_ROOT").unwrap_or("/opt/aiware"));
        ctx.insert("cache_dir", s.get("AIWARE_CACHE_DIR").unwrap_or("/cache"));
        let vars: Vec<(&String, String)> = s
            .vars
            .iter()
            .filter(|(k, _)| *k != "AIWARE_ROOT" && *k != "AIWARE_CACHE_DIR")
            .map(|(k, v)| (k, v.replace(['\n', '\r'], " ")))
            .collect();
        ctx.insert("vars", &vars);
        let text = tera
            .render("aiware.env", &ctx)
            .map_err(|e| format!("template aiware.env: {e}"))?;
        write_private(
            &self.paths.run_dir().join("aiware.env"),
            text.as_bytes(),
            0o600,
        )
        .map_err(|e| format!("cannot write aiware.env: {e}"))
    }
}

/// Whether user-data's `write_files` writes systemd-networkd configuration
/// (`/run/systemd/network/*`), which networkd reads only when reloaded.
pub fn writes_network_config(files: &[crate::userdata::WriteFile]) -> bool {
    files.iter().any(|f| {
        f.path
            .strip_prefix(NETWORKD_RUNTIME_DIR)
            .is_some_and(|rest| !rest.is_empty() && !rest.contains('/'))
    })
}

/// Where user-data puts systemd-networkd files (.network, .netdev, .link).
pub const NETWORKD_RUNTIME_DIR: &str = "/run/systemd/network/";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::userdata::WriteFile;

    fn wf(path: &str) -> WriteFile {
        WriteFile {
            path: path.into(),
            content: b"x".to_vec(),
            permissions: 0o644,
            append: false,
        }
    }

    #[test]
    fn docker_reloads_only_when_the_launch_changes_its_trusted_registries() {
        use crate::registry_trust::{DAEMON_JSON, IMAGE_DAEMON_JSON};
        let d = tempfile::tempdir().unwrap();
        let paths = Paths::new(d.path());
        let image = r#"{"data-root": "/var/lib/docker", "log-driver": "journald"}"#;
        crate::files::write_public(&paths.at(IMAGE_DAEMON_JSON), image.as_bytes()).unwrap();
        // What tmpfiles makes at boot: the link to the image's own file.
        std::fs::create_dir_all(paths.at("/run/aiware")).unwrap();
        std::os::unix::fs::symlink(paths.at(IMAGE_DAEMON_JSON), paths.at(DAEMON_JSON)).unwrap();
        let table = ModeTable {
            common: Default::default(),
            modes: Default::default(),
        };
        let units = crate::systemd::RecordingUnits::default();
        units
            .states
            .lock()
            .unwrap()
            .insert("docker.service".into(), "active".into());
        let applier = Applier {
            paths: &paths,
            table: &table,
            units: &units,
            real_system: false,
        };
        let launch = |text: &str| {
            Settings::from_user_data(crate::userdata::parse(text.as_bytes()).unwrap(), None)
        };
        // TLS only, as the image already is: the link stays, no reload.
        let tls = launch("AIWARE_CONTROLLER=https://edge.example/edge/v1\n");
        assert!(applier.registry_trust(&tls).is_empty());
        assert!(paths.at(DAEMON_JSON).is_symlink());
        assert!(units.calls.lock().unwrap().is_empty());
        // One plain-HTTP registry: written, Docker reloaded once.
        let http = launch("AIWARE_REGISTRY=http://10.0.0.7:5000\n");
        assert!(applier.registry_trust(&http).is_empty());
        let written = std::fs::read_to_string(paths.at(DAEMON_JSON)).unwrap();
        assert!(written.contains("\"10.0.0.7:5000\"") && written.contains("journald"));
        assert_eq!(*units.calls.lock().unwrap(), ["try-reload docker.service"]);
        // The agent run again in the same boot: nothing new for Docker.
        assert!(applier.registry_trust(&http).is_empty());
        assert_eq!(units.calls.lock().unwrap().len(), 1);
        // The image's own file is never touched.
        assert_eq!(
            std::fs::read_to_string(paths.at(IMAGE_DAEMON_JSON)).unwrap(),
            image
        );
    }

    #[test]
    fn only_networkd_files_make_networkd_reload() {
        assert!(writes_network_config(&[
            wf("/opt/aiware/haproxy/certs/server.pem"),
            wf("/run/systemd/network/10-cluster.network"),
        ]));
        assert!(!writes_network_config(&[wf("/run/aiware/x")]));
        assert!(!writes_network_config(&[wf("/run/systemd/network/")]));
        assert!(!writes_network_config(&[wf(
            "/run/systemd/network/a/b.conf"
        )]));
        assert!(!writes_network_config(&[wf("/var/run/systemd/networkx")]));
        assert!(!writes_network_config(&[]));
    }
}
