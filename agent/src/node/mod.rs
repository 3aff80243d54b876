//! The node's own aiWARE services, after the settings are applied and before
//! the controller is joined: baked container images loaded into Docker, then
//! either the vendor's agent started (a profile that bakes it) or the mode
//! containers started by aiw-agent.
//!
//! launch data → settings → apply (native services) → **node** → controller

pub mod baked_images;
pub mod mode_containers;
pub mod vendor_agent;

use crate::containers::ContainerRuntime;
use crate::modes::{ImageInfo, ModeTable};
use crate::paths::Paths;
use crate::settings::Settings;
use crate::systemd::UnitControl;
use std::time::{Duration, Instant};

/// What [`start`] did, for `aiw-agent status`.
#[derive(Debug, Default)]
pub struct NodeReport {
    /// `(mode, unit, state)` of each mode container, and of the vendor agent.
    pub units: Vec<(String, String, String)>,
    pub errors: Vec<String>,
    /// The vendor's agent runs: aiw-agent must not register the host itself.
    pub vendor_agent: bool,
    pub images: baked_images::LoadReport,
}

/// Waits for the runtime to answer (Docker starting), at most `limit`.
fn wait_for(rt: &dyn ContainerRuntime, limit: Duration) -> Result<(), String> {
    let until = Instant::now() + limit;
    loop {
        match rt.check() {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= until => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// What [`start`] runs against.
pub struct Node<'a> {
    pub paths: &'a Paths,
    pub units: &'a dyn UnitControl,
    pub rt: &'a dyn ContainerRuntime,
    pub table: &'a ModeTable,
    /// How long Docker may take to answer (it starts with the modes).
    pub docker_wait: Duration,
}

/// `s` is the effective settings (generated passwords filled in).
pub fn start(n: &Node, image: Option<&ImageInfo>, s: &Settings, modes: &[String]) -> NodeReport {
    let Node {
        paths,
        units,
        rt,
        table,
        docker_wait,
    } = *n;
    let mut r = NodeReport::default();
    let vendor = image.is_some_and(|i| i.vendor_agent.is_some());
    let containerized = modes
        .iter()
        .any(|m| table.get(m).is_some_and(|x| x.containerized));
    let baked = image
        .map(|i| i.container_images.as_slice())
        .unwrap_or_default();
    let has_containers = modes
        .iter()
        .any(|m| table.get(m).is_some_and(|x| !x.containers.is_empty()));
    let docker_needed = (containerized && !baked.is_empty()) || (has_containers && !vendor);
    let docker = if docker_needed {
        wait_for(rt, docker_wait).map_err(|e| format!("Docker is not answering: {e}"))
    } else {
        Ok(())
    };
    if let Err(e) = &docker {
        r.errors.push(e.clone());
    }
    if docker.is_ok() && containerized {
        r.images = baked_images::load_baked(paths, rt, baked);
        r.errors.extend(r.images.errors.clone());
    }
    if vendor {
        r.vendor_agent = true;
        let state = match vendor_agent::start(paths, units, s) {
            Ok(()) => "started".to_string(),
            Err(e) => {
                r.errors.push(e.clone());
                format!("not started: {e}")
            }
        };
        r.units
            .push(("vendor".into(), vendor_agent::UNIT.into(), state));
        return r;
    }
    if has_containers {
        if let Err(e) = &docker {
            for m in modes {
                for c in table
                    .get(m)
                    .map(|x| x.containers.as_slice())
                    .unwrap_or_default()
                {
                    r.units.push((
                        m.clone(),
                        format!("{}.service", c.name),
                        format!("not started: {e}"),
                    ));
                }
            }
            return r;
        }
        let b = mode_containers::bring_up(paths, units, rt, table, s, modes);
        r.errors.extend(b.errors);
        r.units
            .extend(b.containers.into_iter().map(|c| (c.mode, c.unit, c.state)));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::containers::fake::FakeRuntime;
    use crate::containers::Unavailable;
    use crate::modes::BakedImage;
    use crate::systemd::RecordingUnits;
    use std::path::Path;

    fn table() -> ModeTable {
        ModeTable::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/modes.toml"))
            .unwrap()
    }

    fn image(vendor: bool, baked: Vec<BakedImage>) -> ImageInfo {
        ImageInfo {
            profile: "controller".into(),
            version: "1".into(),
            modes: vec!["controller".into(), "db".into()],
            profiles: Default::default(),
            gpu: false,
            vendor_agent: vendor.then(|| "ab".repeat(32)),
            container_images: baked,
        }
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

    #[test]
    fn baked_images_load_before_the_mode_containers_start() {
        let d = tempfile::tempdir().unwrap();
        let paths = Paths::new(d.path());
        let rt = FakeRuntime::new();
        let units = RecordingUnits::default();
        let b = BakedImage {
            archive: "/usr/lib/aiware/images/aa.tar".into(),
            sha256: "aa".into(),
            image_id: "sha256:1".into(),
            format: "docker-save".into(),
            tags: vec!["aiware-controller:latest".into()],
        };
        rt.add_archive(
            &paths.at(&b.archive),
            &["aiware-controller:latest", "sha256:1"],
        );
        let s = settings(&[("AIWARE_INIT_TOKEN", "t")]);
        let modes = vec!["controller".to_string()];
        let r = start(
            &Node {
                paths: &paths,
                units: &units,
                rt: &rt,
                table: &table(),
                docker_wait: Duration::ZERO,
            },
            Some(&image(false, vec![b])),
            &s,
            &modes,
        );
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(r.images.loaded, vec!["aa"]);
        let calls = rt.calls();
        assert!(calls[0].starts_with("load "), "{calls:?}");
        assert!(
            !calls.iter().any(|c| c.starts_with("pull")),
            "the baked image is not pulled"
        );
        assert_eq!(
            r.units,
            vec![(
                "controller".into(),
                "aiware-controller.service".into(),
                "started".into()
            )]
        );
        assert!(!r.vendor_agent);
    }

    #[test]
    fn with_the_vendor_agent_it_starts_and_no_mode_container_does() {
        let d = tempfile::tempdir().unwrap();
        let paths = Paths::new(d.path());
        let rt = FakeRuntime::new();
        let units = RecordingUnits::default();
        let s = settings(&[("AIWARE_MODE", "controller")]);
        let r = start(
            &Node {
                paths: &paths,
                units: &units,
                rt: &rt,
                table: &table(),
                docker_wait: Duration::ZERO,
            },
            Some(&image(true, vec![])),
            &s,
            &["controller".into()],
        );
        assert!(r.vendor_agent);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(
            *units.calls.lock().unwrap(),
            vec!["start aiware-agent.service"]
        );
        assert!(paths.at(vendor_agent::ENV_FILE).is_file());
        assert!(rt.calls().is_empty());
    }

    #[test]
    fn no_docker_is_one_error_per_container_and_nothing_started() {
        let d = tempfile::tempdir().unwrap();
        let paths = Paths::new(d.path());
        let rt = Unavailable {
            reason: "no Docker on this node".into(),
        };
        let units = RecordingUnits::default();
        let r = start(
            &Node {
                paths: &paths,
                units: &units,
                rt: &rt,
                table: &table(),
                docker_wait: Duration::ZERO,
            },
            None,
            &settings(&[]),
            &["controller".into()],
        );
        assert_eq!(
            r.errors,
            vec!["Docker is not answering: no Docker on this node"]
        );
        assert!(r.units[0].2.starts_with("not started: Docker"));
        assert!(units.calls.lock().unwrap().is_empty());
        // An engine node without baked images needs nothing here.
        let r = start(
            &Node {
                paths: &paths,
                units: &units,
                rt: &rt,
                table: &table(),
                docker_wait: Duration::ZERO,
            },
            None,
            &settings(&[]),
            &["engine".into()],
        );
        assert!(r.errors.is_empty() && r.units.is_empty());
    }
}
