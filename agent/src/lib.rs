//! aiw-agent: the first-boot agent of aiwimg images.
//!
//! Pipeline (see [`agent`]): [`datasource`] → [`userdata`] → [`settings`] →
//! [`apply`] (with [`systemd`]) → [`join`] → [`status`] and [`metrics`].
pub mod agent;
pub mod apply;
pub mod datasource;
pub mod firewall;
pub mod gpu;
pub mod host;
pub mod iso9660;
pub mod join;
pub mod log;
pub mod metrics;
pub mod modes;
pub mod paths;
pub mod services;
pub mod settings;
pub mod status;
pub mod systemd;
pub mod tls;
pub mod userdata;
