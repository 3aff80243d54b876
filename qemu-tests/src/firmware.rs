//! OVMF, the UEFI firmware the VMs boot: code read-only, a fresh copy of the vars per VM.

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

/// Where Debian and Ubuntu put OVMF (package `ovmf`), 4 MiB builds first.
const CANDIDATES: &[(&str, &str)] = &[
    (
        "/usr/share/OVMF/OVMF_CODE_4M.fd",
        "/usr/share/OVMF/OVMF_VARS_4M.fd",
    ),
    (
        "/usr/share/OVMF/OVMF_CODE.fd",
        "/usr/share/OVMF/OVMF_VARS.fd",
    ),
    (
        "/usr/share/edk2/ovmf/OVMF_CODE.fd",
        "/usr/share/edk2/ovmf/OVMF_VARS.fd",
    ),
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ovmf {
    pub code: PathBuf,
    /// The pristine vars template; each VM gets its own copy.
    pub vars: PathBuf,
}

impl Ovmf {
    /// `AIWIMG_OVMF_CODE` + `AIWIMG_OVMF_VARS` when set, else the distro paths.
    pub fn locate() -> Result<Self> {
        if let (Ok(code), Ok(vars)) = (
            std::env::var("AIWIMG_OVMF_CODE"),
            std::env::var("AIWIMG_OVMF_VARS"),
        ) {
            let o = Ovmf {
                code: code.into(),
                vars: vars.into(),
            };
            if !o.code.is_file() || !o.vars.is_file() {
                bail!("AIWIMG_OVMF_CODE/AIWIMG_OVMF_VARS point at missing files: {o:?}");
            }
            return Ok(o);
        }
        for (code, vars) in CANDIDATES {
            if Path::new(code).is_file() && Path::new(vars).is_file() {
                return Ok(Ovmf {
                    code: code.into(),
                    vars: vars.into(),
                });
            }
        }
        bail!(
            "OVMF firmware not found (looked for {}); install the `ovmf` package \
             or set AIWIMG_OVMF_CODE and AIWIMG_OVMF_VARS",
            CANDIDATES
                .iter()
                .map(|(c, _)| *c)
                .collect::<Vec<_>>()
                .join(", ")
        )
    }

    /// OVMF built with Secure Boot (and SMM): `AIWIMG_OVMF_SECBOOT_CODE` when
    /// set, else Debian's `OVMF_CODE_4M.secboot.fd`; the vars template is the
    /// empty one (setup mode: no keys enrolled).
    pub fn locate_secure_boot() -> Result<Self> {
        let code = std::env::var("AIWIMG_OVMF_SECBOOT_CODE")
            .unwrap_or_else(|_| "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd".into());
        let vars = std::env::var("AIWIMG_OVMF_VARS")
            .unwrap_or_else(|_| "/usr/share/OVMF/OVMF_VARS_4M.fd".into());
        let o = Ovmf {
            code: code.into(),
            vars: vars.into(),
        };
        if !o.code.is_file() || !o.vars.is_file() {
            bail!(
                "OVMF with Secure Boot not found ({} and {}): install the `ovmf` package \
                 or set AIWIMG_OVMF_SECBOOT_CODE and AIWIMG_OVMF_VARS",
                o.code.display(),
                o.vars.display()
            );
        }
        Ok(o)
    }

    /// The two pflash drives: code read-only, `vars_copy` writable.
    pub fn pflash_args(&self, vars_copy: &Path) -> Vec<String> {
        vec![
            "-drive".into(),
            format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={}",
                self.code.display()
            ),
            "-drive".into(),
            format!("if=pflash,format=raw,unit=1,file={}", vars_copy.display()),
        ]
    }
}
