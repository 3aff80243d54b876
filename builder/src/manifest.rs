//! `manifest.json`, written beside the outputs: what the image is and how to
//! check it.

use crate::stages::disk::{Layout, PartitionInfo};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub profile: String,
    pub version: String,
    pub image_id: String,
    pub description: String,
    /// Run modes baked in: AIWARE_MODE may pick any of them.
    pub modes: Vec<String>,
    pub gpu: bool,
    /// dm-verity root hash of root-A, also on the UKI's command line.
    pub roothash: String,
    pub kernel_version: String,
    pub cmdline: String,
    pub root_erofs_size: u64,
    pub partitions: Vec<PartitionInfo>,
    /// The A/B layout: slot sizes (fixed for the life of a disk), root A's
    /// labels and UUIDs. Absent in manifests from before A/B updates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<Layout>,
    /// Set when systemd-boot and the UKI are signed for UEFI Secure Boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_boot: Option<crate::secure_boot::SecureBootInfo>,
    /// What the image's systemd-sysupdate is set to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<UpdateInfo>,
    pub files: Vec<ManifestFile>,
    pub packages: Vec<Package>,
    /// The disk stage's cache key: the hash of every input of the image.
    pub input_hash: String,
    /// Container images baked in (`[[container_images]]`): archive sha256,
    /// image config digest, tags; aiw-agent loads them at first boot.
    #[serde(default)]
    pub container_images: Vec<aiw_agent::modes::BakedImage>,
    /// Which of them were pulled at build time, and from where.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pulled_images: Vec<PulledImage>,
    /// sha256 of the vendor's aiware-agent baked in (`vendor_agent`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor_agent: Option<String>,
}

/// A `[[container_images]] pull` entry as baked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PulledImage {
    /// The reference, pinned by its manifest digest.
    pub reference: String,
    /// sha256 of the archive baked (as in `container_images`).
    pub sha256: String,
}

/// The node's update settings baked in by the build.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpdateInfo {
    /// The transfer files' source is `<url>/<IMAGE_ID>/`.
    pub url: String,
    /// Boot tries of a newly installed version.
    pub tries: u32,
    /// The key SHA256SUMS.gpg must be signed with; None: the image refuses
    /// every update (an empty keyring).
    pub keyring_fingerprint: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestFile {
    pub name: String,
    pub format: String,
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Package {
    pub name: String,
    pub version: String,
}

impl Manifest {
    pub fn file(&self, format: &str) -> Option<&ManifestFile> {
        self.files.iter().find(|f| f.format == format)
    }
}
