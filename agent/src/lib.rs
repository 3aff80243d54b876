//! aiw-agent: the first-boot agent of aiwimg images.
pub mod datasource;
pub mod gpu;
pub mod host;
pub mod iso9660;
pub mod log;
pub mod modes;
pub mod paths;
pub mod settings;
pub mod systemd;
pub mod userdata;
