//! aiw-agent: the first-boot agent of aiwimg images.
//!
//! Pipeline (see [`agent`]): [`datasource`] → [`userdata`] → [`settings`] →
//! [`apply`] (with [`systemd`]) → [`node`] (baked images, mode containers or
//! the vendor's agent) → [`controller::join`] → status reports, whose
//! replies carry the controller's actions: [`controller::actions`] parses them,
//! [`controller::tasks`] carries them out on a [`containers::ContainerRuntime`]
//! (Docker, [`containers::docker`]) → [`status`] and [`metrics`]. [`update`]:
//! A/B image updates (systemd-sysupdate) and the boot health check.
pub mod agent;
pub mod apply;
pub mod cloud_values;
pub mod containers;
pub mod controller;
pub mod datasource;
pub mod files;
pub mod firewall;
pub mod gpu;
pub mod host;
pub mod hostname;
pub mod iso9660;
/// Kept so `crate::join` paths keep working.
pub use controller::join;
pub mod log;
pub mod metrics;
pub mod modes;
pub mod node;
pub mod os_config;
pub mod paths;
pub mod platform;
pub mod registry_trust;
pub mod services;
pub mod settings;
pub mod status;
pub mod storage;
pub mod swap;
pub mod systemd;
pub mod tls;
pub mod update;
pub mod userdata;
pub mod users;
pub mod validate;
