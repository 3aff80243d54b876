//! `manifest.json`, written beside the outputs: what the image is and how to
//! check it.

use crate::stages::disk::PartitionInfo;
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
    pub files: Vec<ManifestFile>,
    pub packages: Vec<Package>,
    /// The disk stage's cache key: the hash of every input of the image.
    pub input_hash: String,
    /// Container images baked in (`[[container_images]]`): archive sha256,
    /// image config digest, tags; aiw-agent loads them at first boot.
    #[serde(default)]
    pub container_images: Vec<aiw_agent::modes::BakedImage>,
    /// sha256 of the vendor's aiware-agent baked in (`vendor_agent`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor_agent: Option<String>,
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
