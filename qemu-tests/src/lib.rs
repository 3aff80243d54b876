//! QEMU harness for aiwimg images.
//!
//! Boots built images the way users will (UEFI/OVMF, virtio disk, NoCloud
//! seed, serial console to a file) and checks them from outside as users would.
//! Guests reach no real network: see [`netdev`].
//!
//! - [`case::TestCase`]: one slow test: its work dir, deadline and lock.
//! - [`vm::Vm`]: a VM; [`power`]: its QEMU kept across guest resets;
//!   [`ssh::GuestSsh`]: commands in it.
//! - [`test_images`]: the built image for a profile.
//! - [`checks`]: what users check on a node (failed units, ports, mounts).
//! - [`docker_archive`]: a tiny image for `docker load`, made without Docker.
//! - [`node`]: a node joining the Edge API test controller.
//! - [`edge_controller`]: the Edge API test controller (a test double).
//! - [`update_server`]: the A/B update tests' key, versions and update folder.

pub mod accel;
pub mod case;
pub mod checks;
pub mod cloud_doubles;
pub mod console;
pub mod deadline;
pub mod docker_archive;
pub mod edge_controller;
pub mod firmware;
pub mod http_request;
pub mod local_registry;
pub mod netdev;
pub mod node;
pub mod power;
pub mod process;
pub mod seed;
pub mod ssh;
pub mod test_ca;
pub mod test_images;
pub mod test_repo;
pub mod tls_front;
pub mod update_server;
pub mod vm;

pub use case::TestCase;
pub use console::AgentReport;
pub use deadline::Deadline;
pub use seed::UserData;
pub use vm::{DiskFormat, DriveBus, ExtraDrive, Vm};
