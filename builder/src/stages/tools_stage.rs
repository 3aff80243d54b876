//! Stage 1: the tools tree (see `tools.rs`).

use crate::cache::{KeyBuilder, Slot};
use crate::pipeline::BuildContext;
use crate::run::run_cmd;
use crate::tools::{TOOLS_PACKAGES, TOOLS_SUITE};
use anyhow::Result;
use std::path::Path;

pub fn slot(ctx: &BuildContext) -> Slot {
    let pkgs: Vec<String> = TOOLS_PACKAGES.iter().map(|s| s.to_string()).collect();
    let key = KeyBuilder::new("tools")
        .field("suite", TOOLS_SUITE)
        .field("mirror", ctx.mirror.as_deref().unwrap_or(""))
        .list("packages", &pkgs)
        .finish();
    ctx.cache.slot("tools", &key)
}

pub fn make(ctx: &BuildContext, tmp: &Path) -> Result<()> {
    let archives = ctx.cache.root.join("apt-archives");
    std::fs::create_dir_all(&archives)?;
    let mut cmd = super::mmdebstrap(&archives);
    cmd.args(["--variant=apt", "--mode=root", "--format=directory"])
        .arg(format!("--include={}", TOOLS_PACKAGES.join(",")))
        .arg(TOOLS_SUITE)
        .arg(tmp.join("root"));
    if let Some(m) = &ctx.mirror {
        cmd.arg(m);
    }
    let _lock = crate::cache::FileLock::exclusive(&ctx.cache.root.join("apt-archives.lock"))?;
    run_cmd("making the tools tree with mmdebstrap", &mut cmd)?;
    Ok(())
}
