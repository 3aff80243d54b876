//! The container runtime the controller's actions run on: one trait,
//! [`ContainerRuntime`], with the real Docker Engine API client in
//! [`docker`], [`Unavailable`] for a node without Docker, and an in-memory
//! test double in [`fake`].
//!
//! Every container the agent starts carries the labels below, so the list the
//! runtime keeps is the agent's memory: a restarted agent re-adopts what runs
//! and never starts a launchId twice.

pub mod docker;
pub mod fake;

use std::collections::BTreeMap;
use std::time::Duration;

/// Prefix of the labels on every container the agent starts.
pub const LABEL_PREFIX: &str = "ai.veritone.aiware";
/// `aiw-agent` on every container it manages (what [`ContainerRuntime::list_managed`] filters on).
pub const LABEL_MANAGED_BY: &str = "ai.veritone.aiware.managed-by";
pub const LABEL_LAUNCH_ID: &str = "ai.veritone.aiware.launch-id";
pub const LABEL_ENGINE_ID: &str = "ai.veritone.aiware.engine-id";
pub const LABEL_BUILD_ID: &str = "ai.veritone.aiware.build-id";
/// `engine` or `service` (the action's `containerType`).
pub const LABEL_CONTAINER_TYPE: &str = "ai.veritone.aiware.container-type";
/// Unix time the container started.
pub const LABEL_STARTED_UNIX: &str = "ai.veritone.aiware.started-unix";
/// Unix time its `runtimeTTL` is over (absent: no TTL).
pub const LABEL_EXPIRES_UNIX: &str = "ai.veritone.aiware.expires-unix";
pub const MANAGED_BY: &str = "aiw-agent";

/// What to create and start: everything comes from a validated launch action.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    /// In order; keys are validated (`[A-Za-z_][A-Za-z0-9_]*`).
    pub env: Vec<(String, String)>,
    /// argv, never a shell line; empty: the image's own command.
    pub cmd: Vec<String>,
    /// `host:container[:mode]`, as Docker's `Binds`.
    pub binds: Vec<String>,
    pub labels: BTreeMap<String, String>,
    /// Bytes (`softMinMemory`).
    pub memory_reservation: Option<i64>,
    /// Relative CPU weight, 1024 per CPU (`softMinvCPU`).
    pub cpu_shares: Option<i64>,
    /// Run with the NVIDIA runtime and every GPU.
    pub gpu: bool,
    pub auto_remove: bool,
}

/// A container the agent started, as the runtime lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct ManagedContainer {
    pub id: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Docker's state: `created`, `running`, `paused`, `exited`, ...
    pub state: String,
}

impl ManagedContainer {
    pub fn label(&self, key: &str) -> &str {
        self.labels.get(key).map(String::as_str).unwrap_or("")
    }
    /// Running or paused: it counts as on the host.
    pub fn is_live(&self) -> bool {
        matches!(
            self.state.as_str(),
            "running" | "paused" | "created" | "restarting"
        )
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ContainerUsage {
    /// Percent of the host's CPUs, 0-100.
    pub cpu_percent: f64,
    pub memory_used: u64,
    pub memory_limit: u64,
}

/// Credentials for one pull (from the action's `registries[]`).
#[derive(Clone, PartialEq)]
pub struct RegistryAuth {
    pub server: String,
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RegistryAuth {{ server: {:?}, username: {:?}, password: <redacted> }}",
            self.server, self.username
        )
    }
}

/// The container runtime, as the host actions use it. Errors are one line for
/// an operator (they go into the next status report).
pub trait ContainerRuntime: Send + Sync {
    /// `Err(why)` when there is no runtime to talk to.
    fn check(&self) -> Result<(), String>;
    fn pull(&self, image: &str, auth: Option<&RegistryAuth>) -> Result<(), String>;
    /// Creates and starts; returns the container id.
    fn create_and_start(&self, spec: &ContainerSpec) -> Result<String, String>;
    /// Stops (SIGTERM, SIGKILL after `grace`) and removes the container.
    fn stop_and_remove(&self, id: &str, grace: Duration) -> Result<(), String>;
    fn pause(&self, id: &str) -> Result<(), String>;
    fn unpause(&self, id: &str) -> Result<(), String>;
    /// Every container labelled [`LABEL_MANAGED_BY`] = [`MANAGED_BY`], stopped ones too.
    fn list_managed(&self) -> Result<Vec<ManagedContainer>, String>;
    /// CPU and memory now; `None` when the runtime cannot say.
    fn usage(&self, id: &str) -> Option<ContainerUsage>;
    /// Loads a docker-save or OCI archive file into the image store (`POST
    /// /images/load`); returns what the runtime says it loaded.
    fn load_archive(&self, path: &std::path::Path) -> Result<Vec<String>, String> {
        Err(format!(
            "this container runtime cannot load {}",
            path.display()
        ))
    }
    /// Whether an image (`name:tag` or `sha256:<id>`) is in the image store.
    fn has_image(&self, reference: &str) -> Result<bool, String> {
        Err(format!("this container runtime cannot look up {reference}"))
    }
}

/// The runtime of a node where there is none (no `/run/docker.sock`, or a
/// test root): every call fails with the same reason.
pub struct Unavailable {
    pub reason: String,
}

impl ContainerRuntime for Unavailable {
    fn check(&self) -> Result<(), String> {
        Err(self.reason.clone())
    }
    fn pull(&self, _: &str, _: Option<&RegistryAuth>) -> Result<(), String> {
        Err(self.reason.clone())
    }
    fn create_and_start(&self, _: &ContainerSpec) -> Result<String, String> {
        Err(self.reason.clone())
    }
    fn stop_and_remove(&self, _: &str, _: Duration) -> Result<(), String> {
        Err(self.reason.clone())
    }
    fn pause(&self, _: &str) -> Result<(), String> {
        Err(self.reason.clone())
    }
    fn unpause(&self, _: &str) -> Result<(), String> {
        Err(self.reason.clone())
    }
    fn list_managed(&self) -> Result<Vec<ManagedContainer>, String> {
        Ok(Vec::new())
    }
    fn usage(&self, _: &str) -> Option<ContainerUsage> {
        None
    }
    fn load_archive(&self, _: &std::path::Path) -> Result<Vec<String>, String> {
        Err(self.reason.clone())
    }
    fn has_image(&self, _: &str) -> Result<bool, String> {
        Err(self.reason.clone())
    }
}

/// The runtime for this node: Docker on `socket` if it is there, else [`Unavailable`].
pub fn for_system(socket: &std::path::Path) -> std::sync::Arc<dyn ContainerRuntime> {
    match docker::DockerRuntime::connect(socket) {
        Ok(d) => std::sync::Arc::new(d),
        Err(reason) => std::sync::Arc::new(Unavailable { reason }),
    }
}
