//! The tools tree: a Debian trixie tree holding every tool that makes images
//! (systemd-repart, ukify, systemd-boot, erofs-utils, dracut, ...), so the
//! host's own versions never matter (mkosi's ToolsTree idea). Commands run in
//! it through `chroot` inside a private mount namespace, with the work folders
//! bound in; nothing is left mounted on the host afterwards.

use crate::run::{run_cmd, Cmd};
use anyhow::Result;
use std::path::{Path, PathBuf};

/// Packages of the tools tree. Changing this list changes the tools key.
pub const TOOLS_PACKAGES: &[&str] = &[
    "systemd",
    "systemd-repart",
    "systemd-ukify",
    "systemd-boot",
    "systemd-boot-efi",
    "systemd-cryptsetup",
    "udev",
    "erofs-utils",
    "dosfstools",
    "mtools",
    "cryptsetup-bin",
    "dracut-core",
    "e2fsprogs",
    "kmod",
    "zstd",
    "fdisk",
    "python3-pefile",
    "binutils",
    "cpio",
    "util-linux",
    "gnupg",
    "sqv",
    // Secure Boot: efitools' cert-to-efi-sig-list/sign-efi-sig-list for the
    // enrollment files, openssl to check the key against its certificate,
    // libfaketime to pin the signatures' signing time (reproducible builds),
    // systemd-sbsign (systemd) signs the EFI binaries.
    "efitools",
    "openssl",
    "faketime",
    // virt-fw-vars: the UEFI variable store AWS takes at RegisterImage
    // (`--uefi-data`) with our PK, KEK and db in it.
    "python3-virt-firmware",
];

pub const TOOLS_SUITE: &str = "trixie";

/// A folder of the host seen inside the tools tree at `inside`.
pub struct Bind<'a> {
    pub host: &'a Path,
    pub inside: &'a str,
}

pub struct ToolsTree {
    pub root: PathBuf,
}

impl ToolsTree {
    /// Runs `args` inside the tools tree with `binds` mounted.
    pub fn run(&self, what: &str, args: &[&str], binds: &[Bind]) -> Result<String> {
        let mut script = String::from(
            "set -e; T=\"$1\"; shift; \
             mount -t proc proc \"$T/proc\"; mount --rbind /dev \"$T/dev\"; \
             mount -t sysfs sys \"$T/sys\"; mount -t tmpfs tmp \"$T/tmp\"; ",
        );
        let mut argv: Vec<String> = vec![self.root.display().to_string()];
        // Binds travel as positional parameters so no path needs shell quoting.
        let nbinds = binds.len();
        for (i, b) in binds.iter().enumerate() {
            let host_idx = i * 2 + 1;
            let inside_idx = i * 2 + 2;
            script.push_str(&format!(
                "mkdir -p \"$T${{{inside_idx}}}\"; mount --bind \"${{{host_idx}}}\" \"$T${{{inside_idx}}}\"; "
            ));
            argv.push(b.host.display().to_string());
            argv.push(b.inside.to_string());
        }
        script.push_str(&format!("shift {}; exec chroot \"$T\" \"$@\"", nbinds * 2));
        let mut cmd = Cmd::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "--", "/bin/sh", "-c"])
            .arg(&script)
            .arg("aiwimg-tools")
            .args(&argv)
            .args(args.iter().copied())
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("SYSTEMD_LOG_LEVEL", "notice");
        run_cmd(what, &mut cmd)
    }
}
