//! `FakeRuntime`: a TEST DOUBLE of the container runtime, in memory. It keeps
//! what Docker would (containers, their labels and state, pulled images) and
//! records every call, so tests check what the agent asked for. Shared by
//! unit tests and `agent/tests/`; nothing in the agent uses it.

use super::{ContainerRuntime, ContainerSpec, ContainerUsage, ManagedContainer, RegistryAuth};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct FakeContainer {
    pub id: String,
    pub spec: ContainerSpec,
    pub state: String,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    containers: BTreeMap<String, FakeContainer>,
    pulled: Vec<(String, Option<RegistryAuth>)>,
    calls: Vec<String>,
    failing_pulls: Vec<String>,
    pull_delay: Duration,
    /// Archive path → the image references loading it adds.
    archives: BTreeMap<std::path::PathBuf, Vec<String>>,
    /// Images in the store besides pulled ones (loaded or given).
    images: Vec<String>,
}

#[derive(Default)]
pub struct FakeRuntime {
    inner: Mutex<Inner>,
}

impl FakeRuntime {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every container ever created and not removed, with its spec.
    pub fn containers(&self) -> Vec<FakeContainer> {
        self.lock().containers.values().cloned().collect()
    }

    /// Containers created so far whose launch-id label is `launch_id` (removed ones excluded).
    pub fn by_launch(&self, launch_id: &str) -> Vec<FakeContainer> {
        self.containers()
            .into_iter()
            .filter(|c| {
                c.spec
                    .labels
                    .get(super::LABEL_LAUNCH_ID)
                    .map(String::as_str)
                    == Some(launch_id)
            })
            .collect()
    }

    /// Every pull: image and the credentials given.
    pub fn pulled(&self) -> Vec<(String, Option<RegistryAuth>)> {
        self.lock().pulled.clone()
    }

    /// Every call as a line: `pull IMG`, `create NAME`, `stop ID`, `pause ID`, ...
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    /// Pulls of `image` fail from now on.
    pub fn fail_pulls_of(&self, image: &str) {
        self.lock().failing_pulls.push(image.to_string());
    }

    /// Each pull takes this long (to show pulls do not block status reports).
    pub fn set_pull_delay(&self, d: Duration) {
        self.lock().pull_delay = d;
    }

    /// The container exits on its own (AutoRemove: it is gone).
    pub fn exit(&self, id: &str) {
        let mut i = self.lock();
        let remove = i.containers.get(id).is_some_and(|c| c.spec.auto_remove);
        if remove {
            i.containers.remove(id);
        } else if let Some(c) = i.containers.get_mut(id) {
            c.state = "exited".into();
        }
    }

    /// A container the agent did not start in this process (a previous agent did).
    pub fn adopt_existing(&self, spec: ContainerSpec) -> String {
        let mut i = self.lock();
        i.next_id += 1;
        let id = format!("{:012x}{}", 0xfa4e_0000u64 + i.next_id, "e".repeat(52));
        i.containers.insert(
            id.clone(),
            FakeContainer {
                id: id.clone(),
                spec,
                state: "running".into(),
            },
        );
        id
    }
}

impl ContainerRuntime for FakeRuntime {
    fn check(&self) -> Result<(), String> {
        Ok(())
    }

    fn pull(&self, image: &str, auth: Option<&RegistryAuth>) -> Result<(), String> {
        let delay = {
            let mut i = self.lock();
            i.calls.push(format!("pull {image}"));
            i.pull_delay
        };
        std::thread::sleep(delay);
        let mut i = self.lock();
        if i.failing_pulls.iter().any(|f| f == image) {
            return Err(format!("pull access denied for {image} (fake runtime)"));
        }
        i.pulled.push((image.to_string(), auth.cloned()));
        Ok(())
    }

    fn create_and_start(&self, spec: &ContainerSpec) -> Result<String, String> {
        let mut i = self.lock();
        i.calls.push(format!("create {}", spec.name));
        if i.containers.values().any(|c| c.spec.name == spec.name) {
            return Err(format!(
                "Conflict. The container name \"/{}\" is already in use",
                spec.name
            ));
        }
        i.next_id += 1;
        let id = format!("{:012x}{}", 0xc0de_0000u64 + i.next_id, "d".repeat(52));
        i.containers.insert(
            id.clone(),
            FakeContainer {
                id: id.clone(),
                spec: spec.clone(),
                state: "running".into(),
            },
        );
        Ok(id)
    }

    fn stop_and_remove(&self, id: &str, grace: Duration) -> Result<(), String> {
        let mut i = self.lock();
        i.calls
            .push(format!("stop {id} grace {}s", grace.as_secs()));
        i.containers
            .remove(id)
            .map(|_| ())
            .ok_or_else(|| format!("No such container: {id}"))
    }

    fn pause(&self, id: &str) -> Result<(), String> {
        let mut i = self.lock();
        i.calls.push(format!("pause {id}"));
        match i.containers.get_mut(id) {
            Some(c) if c.state == "running" => {
                c.state = "paused".into();
                Ok(())
            }
            Some(c) => Err(format!("container {id} is {}, not running", c.state)),
            None => Err(format!("No such container: {id}")),
        }
    }

    fn unpause(&self, id: &str) -> Result<(), String> {
        let mut i = self.lock();
        i.calls.push(format!("unpause {id}"));
        match i.containers.get_mut(id) {
            Some(c) if c.state == "paused" => {
                c.state = "running".into();
                Ok(())
            }
            Some(c) => Err(format!("container {id} is {}, not paused", c.state)),
            None => Err(format!("No such container: {id}")),
        }
    }

    fn list_managed(&self) -> Result<Vec<ManagedContainer>, String> {
        Ok(self
            .lock()
            .containers
            .values()
            .filter(|c| {
                c.spec
                    .labels
                    .get(super::LABEL_MANAGED_BY)
                    .map(String::as_str)
                    == Some(super::MANAGED_BY)
            })
            .map(|c| ManagedContainer {
                id: c.id.clone(),
                name: c.spec.name.clone(),
                labels: c.spec.labels.clone(),
                state: c.state.clone(),
            })
            .collect())
    }

    fn usage(&self, id: &str) -> Option<ContainerUsage> {
        self.lock().containers.get(id).map(|c| ContainerUsage {
            cpu_percent: 12.5,
            memory_used: c.spec.memory_reservation.unwrap_or(0) as u64 / 2 + 1024,
            memory_limit: 0,
        })
    }

    fn load_archive(&self, path: &std::path::Path) -> Result<Vec<String>, String> {
        let mut i = self.lock();
        i.calls.push(format!("load {}", path.display()));
        let Some(refs) = i.archives.get(path).cloned() else {
            return Err(format!(
                "{}: not an image archive (fake runtime)",
                path.display()
            ));
        };
        i.images.extend(refs.iter().cloned());
        Ok(refs.iter().map(|r| format!("Loaded image: {r}")).collect())
    }

    fn has_image(&self, reference: &str) -> Result<bool, String> {
        let i = self.lock();
        Ok(i.images.iter().any(|x| x == reference) || i.pulled.iter().any(|(x, _)| x == reference))
    }
}

impl FakeRuntime {
    /// Loading the archive at `path` adds `refs` (tags and `sha256:<id>`) to the store.
    pub fn add_archive(&self, path: &std::path::Path, refs: &[&str]) {
        self.lock().archives.insert(
            path.to_path_buf(),
            refs.iter().map(|r| r.to_string()).collect(),
        );
    }

    /// An image in the store (baked or preloaded) without a pull.
    pub fn add_image(&self, reference: &str) {
        self.lock().images.push(reference.to_string());
    }

    /// Forgets every image (Docker's data wiped).
    pub fn forget_images(&self) {
        let mut i = self.lock();
        i.images.clear();
        i.pulled.clear();
    }
}
