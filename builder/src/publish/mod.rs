//! `aiwimg publish`: puts a built image where users launch it.
//!
//! - [`aws`]: the raw disk into an EBS snapshot through the EBS direct APIs,
//!   then an AMI (UEFI, ENA, x86_64).
//! - [`sigv4`], [`http`]: the signed, retrying client it uses.
//! - [`credentials`]: the standard AWS environment and profile chain.
//! - [`update`]: a build's update files into a folder an HTTP server serves
//!   to the nodes' systemd-sysupdate, SHA256SUMS signed with gpg.

pub mod aws;
pub mod credentials;
pub mod http;
pub mod sigv4;
pub mod update;
