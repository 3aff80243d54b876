//! Stage 2: the root filesystem, installed by mmdebstrap.
//!
//! Essential packages plus the profile's and its modes' packages, without
//! recommends, docs, man pages or locales. apt itself is not installed: the
//! image never needs a package manager at run time. The exact versions
//! installed are recorded as `packages.lock`, copied to `images/<p>.lock`;
//! `--locked` installs exactly those.

use crate::cache::{KeyBuilder, Slot};
use crate::host;
use crate::pipeline::BuildContext;
use crate::profile::{Profile, Repository};
use crate::run::{run_cmd, Cmd};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// dpkg path filters: what an appliance never reads.
const DPKG_EXCLUDES: &[&str] = &[
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/lintian/*",
];

/// Debian's kernel package wants an initramfs generator and runs it on
/// install; the image's own initrd is made by dracut in the tools tree, so the
/// generator is diverted to `true` while packages install (saves ~30 s a build)
/// and put back afterwards.
const INITRAMFS_HOOKS: &[&str] = &[
    "--essential-hook=chroot \"$1\" dpkg-divert --quiet --local --rename --add /usr/sbin/update-initramfs && ln -sf /bin/true \"$1\"/usr/sbin/update-initramfs",
    "--customize-hook=rm -f \"$1\"/usr/sbin/update-initramfs && chroot \"$1\" dpkg-divert --quiet --local --rename --remove /usr/sbin/update-initramfs",
    "--customize-hook=rm -f \"$1\"/boot/initrd.img*",
];

pub fn slot(ctx: &BuildContext) -> Result<Slot> {
    let p = &ctx.profile;
    let mut k = KeyBuilder::new("rootfs");
    k.field("suite", &p.suite)
        .field("mirror", ctx.mirror.as_deref().unwrap_or(""))
        .list("components", &p.components)
        .list("packages", &p.packages)
        .list("build-only", &p.build_only)
        .list("required-modules", &p.required_modules)
        .list(
            "dpkg-excludes",
            &DPKG_EXCLUDES
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
        )
        .list(
            "hooks",
            &INITRAMFS_HOOKS
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
        )
        .field("source_date_epoch", &p.source_date_epoch.to_string());
    if let Some(s) = module_signer(ctx) {
        // DKMS signs the modules it builds here with the db key: another
        // certificate, other modules. The certificate, never a path.
        k.field("module-signing-cert", &s.cert_sha256);
    }
    for r in &p.repositories {
        k.field("repo", &serde_json::to_string(r)?)
            .field("repo-url", &repo_url(r, &ctx.opts.repo_mirrors))
            .path("repo-key", &ctx.images_dir().join(&r.key))?;
    }
    if ctx.opts.locked {
        k.path("lock", &ctx.lock_path())?;
    }
    Ok(ctx.cache.slot("rootfs", &k.finish()))
}

/// The URL a repository is fetched from: its `--repo-mirror` if given.
pub fn repo_url(r: &Repository, mirrors: &BTreeMap<String, String>) -> String {
    mirrors
        .get(&r.name)
        .cloned()
        .or_else(|| r.url.clone())
        .unwrap_or_default()
}

/// Fails early, before any slow stage, when a third-party repository cannot
/// be reached or a `--repo-mirror` names no repository of the profile.
pub fn check_repositories(
    p: &Profile,
    mirrors: &BTreeMap<String, String>,
    images_dir: &Path,
) -> Result<()> {
    for name in mirrors.keys() {
        if !p.repositories.iter().any(|r| &r.name == name) {
            let known: Vec<&str> = p.repositories.iter().map(|r| r.name.as_str()).collect();
            bail!(
                "--repo-mirror {name}=...: profile {} has no repository {name:?} (it has: {})",
                p.name,
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            );
        }
    }
    for r in &p.repositories {
        let key = images_dir.join(&r.key);
        if !key.is_file() {
            bail!(
                "repository {:?} of profile {}: its signing key {} is missing; \
                 put the repository's key there (the profile pins fingerprint {})",
                r.name,
                p.name,
                key.display(),
                r.fingerprint
            );
        }
        host::check_key_fingerprint(&key, &r.fingerprint)
            .with_context(|| format!("repository {:?}: key {}", r.name, key.display()))?;
        let url = repo_url(r, mirrors);
        if url.is_empty() {
            bail!(
                "repository {:?} of profile {} ({}) has no URL in the profile: \
                 name the copy to use with --repo-mirror {}=URL",
                r.name,
                p.name,
                r.description
                    .as_deref()
                    .unwrap_or("third-party apt repository"),
                r.name
            );
        }
        let probe = if r.suite.ends_with('/') {
            format!("{}/{}Release", url.trim_end_matches('/'), r.suite)
        } else {
            format!("{}/dists/{}/Release", url.trim_end_matches('/'), r.suite)
        };
        if let Err(e) = host::probe_url(&probe) {
            bail!(
                "repository {:?} of profile {} cannot be reached at {url}: {e}\n  \
                 For an air-gapped or offline build, point it at a local mirror: \
                 --repo-mirror {}=URL",
                r.name,
                p.name,
                r.name
            );
        }
    }
    Ok(())
}

pub fn make(ctx: &BuildContext, tmp: &Path) -> Result<()> {
    let p = &ctx.profile;
    let archives = ctx.cache.root.join("apt-archives");
    std::fs::create_dir_all(&archives)?;
    let tree = tmp.join("tree");

    let include: Vec<String> = if ctx.opts.locked {
        let lock = std::fs::read_to_string(ctx.lock_path()).with_context(|| {
            format!(
                "--locked needs {}; build once without --locked to write it",
                ctx.lock_path().display()
            )
        })?;
        lock.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(String::from)
            .collect()
    } else {
        p.packages.clone()
    };

    let mut cmd = super::mmdebstrap(&archives);
    cmd.args(["--variant=essential", "--mode=root", "--format=directory"])
        .arg(format!("--components={}", p.components.join(",")))
        .arg(format!("--include={}", include.join(",")));
    for ex in DPKG_EXCLUDES {
        cmd.arg(format!("--dpkgopt={ex}"));
    }
    for h in INITRAMFS_HOOKS {
        cmd.arg(h);
    }
    // Third-party repositories go in as extra sources through setup hooks,
    // which run before apt's first update, so the base mirror stays whatever
    // the user chose (or mmdebstrap's own default).
    let keys = tmp.join("keys");
    std::fs::create_dir_all(&keys)?;
    for r in &p.repositories {
        let key = keys.join(format!("{}.asc", r.name));
        std::fs::copy(ctx.images_dir().join(&r.key), &key)
            .with_context(|| format!("repository {}: key {}", r.name, r.key))?;
        host::check_key_fingerprint(&key, &r.fingerprint)
            .with_context(|| format!("repository {}: key {}", r.name, r.key))?;
        let list = keys.join(format!("aiwimg-{}.list", r.name));
        std::fs::write(
            &list,
            format!(
                "deb [signed-by={}] {} {} {}\n",
                key.display(),
                repo_url(r, &ctx.opts.repo_mirrors),
                r.suite,
                r.components.join(" ")
            ),
        )?;
        cmd.arg(format!(
            "--setup-hook=cp {} \"$1\"/etc/apt/sources.list.d/",
            list.display()
        ));
    }
    cmd.arg("--customize-hook=rm -f \"$1\"/etc/apt/sources.list.d/aiwimg-*.list");
    if ctx.opts.locked {
        // The lock's versions are apt's candidates from the first package
        // on: the essential set mmdebstrap installs before the includes is
        // chosen by apt too, and once the archive had a newer libssl3t64 (a
        // security update) it took that one and the locked include then
        // needed a downgrade apt refused.
        let pref = keys.join("aiwimg-lock.pref");
        std::fs::write(&pref, lock_preferences(&include))?;
        cmd.arg(format!(
            "--setup-hook=mkdir -p \"$1\"/etc/apt/preferences.d && cp {} \"$1\"/etc/apt/preferences.d/",
            pref.display()
        ));
        cmd.arg("--customize-hook=rm -f \"$1\"/etc/apt/preferences.d/aiwimg-lock.pref");
    }
    // A signed image's kernel modules: DKMS signs what it builds with the key
    // at its default path (/var/lib/dkms/mok.key, the certificate beside it
    // as mok.pub) when one is there, and makes a throwaway key of its own
    // when not. Debian's kernel verifies module signatures against the UEFI
    // db too (its patch "KEYS: Make use of platform keyring for module
    // signature verify"), so modules signed with the db key load under
    // Secure Boot without shim or a MOK. The key is put in after the
    // essential packages (before dkms runs) from a private copy outside the
    // cache, and taken out before the tree is kept.
    let staged = module_signer(ctx)
        .map(crate::secure_boot::StagedKeys::new)
        .transpose()?;
    if let Some(keys) = &staged {
        cmd.arg(format!(
            "--essential-hook=mkdir -p \"$1\"/var/lib/dkms && \
             install -m 600 {dir}/db.key \"$1\"/var/lib/dkms/mok.key && \
             install -m 644 {dir}/db.crt \"$1\"/var/lib/dkms/mok.pub",
            dir = keys.path().display()
        ));
        cmd.arg("--customize-hook=rm -f \"$1\"/var/lib/dkms/mok.key \"$1\"/var/lib/dkms/mok.pub");
    }
    cmd.arg(&p.suite).arg(&tree);
    if let Some(m) = &ctx.mirror {
        cmd.arg(m);
    }
    {
        // The shared package cache is synced in and out by every mmdebstrap run.
        let _lock = crate::cache::FileLock::exclusive(&ctx.cache.root.join("apt-archives.lock"))?;
        run_cmd("installing the root filesystem with mmdebstrap", &mut cmd)?;
    }
    drop(staged);
    purge_build_only(&tree, &p.build_only)?;
    // After the purge: what ships must still hold the modules, built for its kernel.
    check_required_modules(&tree, &p.required_modules)?;
    if let Some(s) = module_signer(ctx) {
        check_module_signer(&tree, &p.required_modules, s)?;
    }

    let lock = run_cmd(
        "listing installed packages",
        Cmd::new("dpkg-query")
            .arg(format!("--admindir={}/var/lib/dpkg", tree.display()))
            .args(["-W", "-f", "${Package}=${Version}\n"]),
    )?;
    let mut lines: Vec<&str> = lock.lines().filter(|l| !l.is_empty()).collect();
    lines.sort();
    std::fs::write(tmp.join("packages.lock"), lines.join("\n") + "\n")?;
    Ok(())
}

/// apt preferences that make each `package=version` of a lock file apt's
/// candidate (priority 1001: above every archive, a downgrade allowed).
pub fn lock_preferences(lock: &[String]) -> String {
    let mut out = String::from("# Written by aiwimg for a --locked build.\n");
    for l in lock {
        if let Some((pkg, ver)) = l.split_once('=') {
            out.push_str(&format!(
                "\nPackage: {pkg}\nPin: version {ver}\nPin-Priority: 1001\n"
            ));
        }
    }
    out
}

/// The Secure Boot signing input when this profile builds kernel modules
/// (a `*-dkms` package): they must be signed with the db key to load.
fn module_signer(ctx: &BuildContext) -> Option<&crate::secure_boot::SigningInput> {
    let builds_modules = ctx.profile.packages.iter().any(|p| p.ends_with("-dkms"));
    ctx.signing.as_ref().filter(|_| builds_modules)
}

/// Every required module carries a signature by the db key: the signer
/// `modinfo` names is the certificate's issuer (a PKCS#7 module signature
/// names its key by issuer and serial). A DKMS that made its own key
/// instead would sign as "DKMS module signing key", and the node's kernel
/// would refuse the module under Secure Boot: better no image.
fn check_module_signer(
    tree: &Path,
    modules: &[String],
    signing: &crate::secure_boot::SigningInput,
) -> Result<()> {
    let want = crate::secure_boot::issuer_common_name(&signing.cert_der)
        .context("the Secure Boot certificate's issuer has no common name (CN)")?;
    for m in modules {
        let signer = modinfo_field(tree, m, "signer")?;
        if signer.trim() != want {
            bail!(
                "module {m} is signed by {:?}, not by the Secure Boot key ({want:?}): \
                 the node's kernel would refuse it under Secure Boot",
                signer.trim()
            );
        }
    }
    Ok(())
}

/// `modinfo -F field` of `module` for the image's kernel, run in the tree.
fn modinfo_field(tree: &Path, module: &str, field: &str) -> Result<String> {
    let kver = crate::stages::initrd::kernel_version(tree)?;
    run_cmd(
        &format!("reading a kernel module's {field}"),
        Cmd::new("chroot")
            .arg(tree)
            .args(["modinfo", "-k", &kver, "-F", field, module]),
    )
}

/// Every required module exists for the image's kernel, with its vermagic.
fn check_required_modules(tree: &Path, modules: &[String]) -> Result<()> {
    if modules.is_empty() {
        return Ok(());
    }
    let kver = crate::stages::initrd::kernel_version(tree)?;
    for m in modules {
        let out = modinfo_field(tree, m, "vermagic")
            .with_context(|| format!("module {m} was not built for the image kernel {kver}"))?;
        let vermagic = out.trim();
        if !vermagic.starts_with(&format!("{kver} ")) {
            bail!("module {m} has vermagic {vermagic:?}, not the image kernel {kver}");
        }
    }
    Ok(())
}

/// Purges what was installed only to build (compilers, headers), so it never
/// reaches the image. Dependencies are forced: nothing runs dpkg later.
fn purge_build_only(tree: &Path, patterns: &[String]) -> Result<()> {
    if patterns.is_empty() {
        return Ok(());
    }
    let installed = run_cmd(
        "listing installed packages",
        Cmd::new("dpkg-query")
            .arg(format!("--admindir={}/var/lib/dpkg", tree.display()))
            .args(["-W", "-f", "${Package}\n"]),
    )?;
    let victims: Vec<&str> = installed
        .lines()
        .filter(|p| patterns.iter().any(|pat| glob_match(pat, p)))
        .collect();
    // dkms goes first, alone: a DKMS source package's prerm runs `dkms
    // remove` (deleting the modules it built) only while dkms is installed,
    // so purging the sources afterwards keeps the built modules.
    let (first, rest): (Vec<&str>, Vec<&str>) = victims.iter().partition(|p| **p == "dkms");
    for batch in [first, rest] {
        if batch.is_empty() {
            continue;
        }
        run_cmd(
            "purging build-only packages",
            Cmd::new("chroot")
                .arg(tree)
                .args([
                    "dpkg",
                    "--purge",
                    "--force-depends",
                    "--force-remove-essential",
                ])
                .args(&batch),
        )?;
    }
    Ok(())
}

/// `*` matches any run of characters; nothing else is special.
pub fn glob_match(pat: &str, s: &str) -> bool {
    match pat.split_once('*') {
        None => pat == s,
        Some((head, rest)) => {
            let Some(tail) = s.strip_prefix(head) else {
                return false;
            };
            (0..=tail.len()).any(|i| tail.is_char_boundary(i) && glob_match(rest, &tail[i..]))
        }
    }
}

/// Copies the installed versions to `images/<profile>.lock`.
pub fn write_lock(ctx: &BuildContext, slot: &Slot) -> Result<()> {
    let body = std::fs::read_to_string(slot.dir.join("packages.lock"))?;
    let text = format!(
        "# Exact package versions of the {} image, written by `aiwimg build`.\n\
         # `aiwimg build --profile {} --locked` installs exactly these.\n{body}",
        ctx.profile.name, ctx.profile.name
    );
    let path = ctx.lock_path();
    if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Installed packages as (name, version), from a slot's `packages.lock`
/// (the rootfs slot's, or the copy the disk stage keeps).
pub fn installed(slot: &Slot) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(slot.dir.join("packages.lock"))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn a_lock_pins_each_version() {
        let p = super::lock_preferences(&["libssl3t64=3.5.9-1~deb13u1".into(), "bash=5.2".into()]);
        assert!(
            p.contains("Package: libssl3t64\nPin: version 3.5.9-1~deb13u1\nPin-Priority: 1001\n")
        );
        assert!(p.contains("Package: bash\nPin: version 5.2\n"));
    }

    #[test]
    fn globs() {
        assert!(glob_match("gcc*", "gcc-14"));
        assert!(glob_match("linux-headers-*", "linux-headers-6.12-amd64"));
        assert!(glob_match("lib*-dev", "libc6-dev"));
        assert!(!glob_match("gcc*", "libgcc-s1"));
        assert!(!glob_match("make", "makedev"));
        assert!(glob_match("make", "make"));
    }
}
