//! QEMU harness for aiwimg images.
pub mod edge_controller;
