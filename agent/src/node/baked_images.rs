//! Container images baked into the image (profile key `[[container_images]]`,
//! listed in image.json): loaded into Docker at first boot, before any mode
//! container starts, once per archive digest. What was loaded is kept in
//! `/var/lib/aiware/images-loaded.json`; an archive listed there whose image
//! Docker no longer has (its data wiped) is loaded again.

use crate::containers::ContainerRuntime;
use crate::files::write_private;
use crate::modes::BakedImage;
use crate::paths::Paths;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const LOADED_FILE: &str = "/var/lib/aiware/images-loaded.json";

/// One archive loaded: keyed by its sha256 in [`LOADED_FILE`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Loaded {
    pub image_id: String,
    pub tags: Vec<String>,
    pub loaded_unix: u64,
}

#[derive(Debug, Default, PartialEq)]
pub struct LoadReport {
    /// Archives loaded now (`sha256 → what Docker said`).
    pub loaded: Vec<String>,
    /// Archives loaded at an earlier boot whose image Docker has.
    pub already: Vec<String>,
    /// One line each, for `aiw-agent status`.
    pub errors: Vec<String>,
}

fn read_state(paths: &Paths) -> BTreeMap<String, Loaded> {
    std::fs::read(paths.at(LOADED_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Loads each baked archive not loaded yet; never fails as a whole.
pub fn load_baked(paths: &Paths, rt: &dyn ContainerRuntime, images: &[BakedImage]) -> LoadReport {
    let mut report = LoadReport::default();
    if images.is_empty() {
        return report;
    }
    let mut state = read_state(paths);
    for img in images {
        let what = format!(
            "baked image {} ({})",
            img.tags
                .first()
                .map(String::as_str)
                .unwrap_or(&img.image_id),
            &img.sha256[..12.min(img.sha256.len())]
        );
        let present = |rt: &dyn ContainerRuntime| {
            !img.image_id.is_empty() && rt.has_image(&img.image_id).unwrap_or(false)
        };
        if state.contains_key(&img.sha256) && present(rt) {
            report.already.push(img.sha256.clone());
            continue;
        }
        let archive = paths.at(&img.archive);
        match rt.load_archive(&archive) {
            Ok(lines) => {
                if !img.image_id.is_empty() && !present(rt) {
                    report.errors.push(format!(
                        "{what}: Docker loaded {} but has no image {} afterwards",
                        img.archive, img.image_id
                    ));
                    continue;
                }
                crate::log::info(&format!("{what} loaded: {}", lines.join("; ")));
                state.insert(
                    img.sha256.clone(),
                    Loaded {
                        image_id: img.image_id.clone(),
                        tags: img.tags.clone(),
                        loaded_unix: crate::status::now_unix(),
                    },
                );
                report.loaded.push(img.sha256.clone());
            }
            Err(e) => report
                .errors
                .push(format!("{what}: cannot load {}: {e}", img.archive)),
        }
    }
    let json = serde_json::to_vec_pretty(&state).unwrap_or_default();
    if let Err(e) = write_private(&paths.at(LOADED_FILE), &json, 0o600) {
        report
            .errors
            .push(format!("cannot keep {LOADED_FILE}: {e}"));
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::containers::fake::FakeRuntime;

    fn baked(sha: &str, id: &str, tag: &str) -> BakedImage {
        BakedImage {
            archive: format!("/usr/lib/aiware/images/{sha}.tar"),
            sha256: sha.into(),
            image_id: id.into(),
            format: "docker-save".into(),
            tags: vec![tag.into()],
        }
    }

    #[test]
    fn each_archive_is_loaded_once_and_again_when_docker_lost_it() {
        let d = tempfile::tempdir().unwrap();
        let paths = Paths::new(d.path());
        let rt = FakeRuntime::new();
        let a = baked("aa", "sha256:1", "aiware-controller:test");
        let b = baked("bb", "sha256:2", "other:1");
        rt.add_archive(
            &paths.at(&a.archive),
            &["aiware-controller:test", "sha256:1"],
        );
        // b's archive is no image: its error does not stop a.
        let r = load_baked(&paths, &rt, &[a.clone(), b.clone()]);
        assert_eq!(r.loaded, vec!["aa"]);
        assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
        assert!(r.errors[0].contains("other:1") && r.errors[0].contains("cannot load"));
        assert_eq!(rt.has_image("aiware-controller:test"), Ok(true));

        // Next boot: nothing loaded again.
        let r = load_baked(&paths, &rt, std::slice::from_ref(&a));
        assert_eq!(
            (r.loaded.len(), r.already.clone()),
            (0, vec!["aa".to_string()])
        );
        let loads = |rt: &FakeRuntime| rt.calls().iter().filter(|c| c.starts_with("load ")).count();
        assert_eq!(loads(&rt), 2);

        // Docker's data wiped: loaded again, though the state file says it was.
        rt.forget_images();
        let r = load_baked(&paths, &rt, std::slice::from_ref(&a));
        assert_eq!(r.loaded, vec!["aa"]);
        assert_eq!(loads(&rt), 3);
        let state = read_state(&paths);
        assert_eq!(state["aa"].image_id, "sha256:1");
    }

    #[test]
    fn an_archive_without_its_image_id_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let paths = Paths::new(d.path());
        let rt = FakeRuntime::new();
        let a = baked("aa", "sha256:1", "x:1");
        rt.add_archive(&paths.at(&a.archive), &["x:1"]);
        let r = load_baked(&paths, &rt, &[a]);
        assert!(r.loaded.is_empty());
        assert!(
            r.errors[0].contains("has no image sha256:1"),
            "{:?}",
            r.errors
        );
    }
}
