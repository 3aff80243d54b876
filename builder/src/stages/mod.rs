//! The pipeline's stages, one file each, in build order.
pub mod baked;
pub mod customize;
pub mod disk;
pub mod initrd;
pub mod registry;
pub mod rootfs;
pub mod tools_stage;

use crate::run::Cmd;
use std::path::Path;

/// mmdebstrap with the shared apt archive cache: packages downloaded once are
/// reused by every later tools tree and root filesystem.
pub(crate) fn mmdebstrap(archives: &Path) -> Cmd {
    let a = archives.display().to_string();
    // In a private mount namespace: if the build is interrupted, the mounts
    // mmdebstrap made inside the tree vanish with it instead of staying behind.
    let mut cmd = Cmd::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--", "mmdebstrap"])
        .args(["--skip=download/empty", "--skip=essential/unlink"])
        .arg("--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/")
        .arg(format!("--setup-hook=sync-in {a} /var/cache/apt/archives/"))
        .arg(format!(
            "--customize-hook=sync-out /var/cache/apt/archives {a}"
        ))
        .arg("--customize-hook=rm -f \"$1\"/var/cache/apt/archives/*.deb")
        .arg("--aptopt=APT::Install-Recommends \"false\"");
    cmd
}
