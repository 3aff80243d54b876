//! QEMU harness for aiwimg images.
