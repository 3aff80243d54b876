//! Stage 3: customize the root filesystem into the immutable layout, then
//! pack it as the erofs root image.
//!
//! - overlays copied in order (`*.tera` files rendered with the profile);
//! - aiw-agent, its units, modes.toml and image.json installed;
//! - `/usr/lib/os-release` gets IMAGE_ID / IMAGE_VERSION;
//! - `/etc/machine-id` empty (first boot), no SSH host keys baked;
//! - `/var` emptied into `/usr/share/factory/var`, re-created on the
//!   persistent /var partition by tmpfiles `C` lines at boot;
//! - mode services disabled (the agent starts those the node is launched with).

use crate::cache::{remove_tree, sha256_file, KeyBuilder, Slot};
use crate::pipeline::BuildContext;
use crate::run::{run_cmd, Cmd};
use crate::stages::baked;
use crate::tools::{Bind, ToolsTree};
use aiw_agent::modes::ImageInfo;
use anyhow::{bail, Context, Result};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Units that come with mode packages but must not start on their own.
const MODE_HELPER_UNITS: &[&str] = &["docker.socket", "containerd.service"];
/// Units every node runs, whatever its modes.
const ALWAYS_ENABLED: &[&str] = &["systemd-networkd.service", "systemd-resolved.service"];
/// Units no node runs: systemd loads the DRM core early for a graphical
/// console a headless node does not have (a GPU image's nvidia-drm still
/// pulls it in as a dependency); e2scrub checks ext4 on LVM snapshots and a
/// node has no LVM (its reaper took 3-12 s of a TCG boot); the dpkg database
/// is part of the read-only root, a daily backup of it to /var is noise.
/// systemd-boot-update copies the image's systemd-boot over the ESP's when
/// it is newer: after an A/B update that would put an unsigned boot loader
/// in place of the one the build signed (and Secure Boot would refuse the
/// next boot); the ESP's boot loader is the build's, changed by no node.
/// nfs-blkmap serves pNFS block layouts (SAN volumes shared over NFS), which
/// the guide's NFS cache never uses: a daemon started at every boot for nothing.
/// Kerberos NFS (auth-rpcgss-module, rpc-gssd) runs only with an
/// /etc/krb5.keytab, which the read-only /etc never has; yet pulled in by
/// nfs-client.target, rpc-gssd's requirement mounted rpc_pipefs (and loaded
/// sunrpc) at every boot: ~1 s of a TCG boot. The journal's message catalog
/// is compiled on a first boot into /var for `journalctl -x` only (0.4 s).
/// configfs (sys-kernel-config.mount, and loading its module) serves kernel
/// targets (NVMe-oF, LIO, USB gadgets) no node is.
const MASKED: &[&str] = &[
    "modprobe@drm.service",
    "e2scrub_reap.service",
    "e2scrub_all.timer",
    "dpkg-db-backup.timer",
    "systemd-boot-update.service",
    "nfs-blkmap.service",
    "auth-rpcgss-module.service",
    "rpc-gssd.service",
    "systemd-journal-catalog-update.service",
    "sys-kernel-config.mount",
];
/// Services whose socket starts them when first asked instead of at boot:
/// rpcbind is asked only by NFSv3 locking (rpc.statd) and an NFS server, and
/// its socket (enabled) keeps port 111 bound, for them and for the firewall.
const ON_DEMAND: &[(&str, &str)] = &[("rpcbind.service", "rpcbind.socket")];

/// Where the agent binary comes from: built from `agent/`, or given.
pub enum AgentInput {
    Source { files: Vec<PathBuf> },
    Binary(PathBuf),
}

impl AgentInput {
    pub fn resolve(ctx: &BuildContext) -> Result<Self> {
        if let Some(b) = &ctx.opts.agent_bin {
            if !b.is_file() {
                bail!("--agent-bin {}: no such file", b.display());
            }
            return Ok(AgentInput::Binary(b.clone()));
        }
        let p = &ctx.opts.project;
        Ok(AgentInput::Source {
            files: vec![
                p.join("agent/src"),
                p.join("agent/Cargo.toml"),
                p.join("agent/units"),
                p.join("agent/templates"),
                // [profile.release] and [workspace.dependencies] (versions
                // and features the agent inherits).
                p.join("Cargo.toml"),
            ],
        })
    }

    fn add_to_key(&self, k: &mut KeyBuilder, project: &Path) -> Result<()> {
        match self {
            AgentInput::Binary(b) => {
                k.field("agent-bin", &sha256_file(b)?);
                k.path("agent-units", &project.join("agent/units"))?;
            }
            AgentInput::Source { files } => {
                for f in files {
                    let rel = f.strip_prefix(project).unwrap_or(f);
                    k.path(&format!("agent:{}", rel.display()), f)?;
                }
                let lock = std::fs::read_to_string(project.join("Cargo.lock"))
                    .context("reading Cargo.lock")?;
                let manifest = std::fs::read_to_string(project.join("agent/Cargo.toml"))
                    .context("reading agent/Cargo.toml")?;
                k.list(
                    "agent:locked-packages",
                    &agent_locked_packages(&lock, &manifest)?,
                );
                k.field("agent:rustc", &rustc_version()?);
            }
        }
        Ok(())
    }

    /// The binary to install, building it when needed.
    fn binary(&self, project: &Path) -> Result<PathBuf> {
        match self {
            AgentInput::Binary(b) => Ok(b.clone()),
            AgentInput::Source { .. } => {
                let target_dir = project.join("target");
                run_cmd(
                    "building aiw-agent (cargo build --release --target x86_64-unknown-linux-musl)",
                    Cmd::new("cargo")
                        .current_dir(project)
                        .args([
                            "build",
                            "--release",
                            "--locked",
                            "-p",
                            "aiw-agent",
                            "--target",
                            "x86_64-unknown-linux-musl",
                        ])
                        .env("CARGO_TARGET_DIR", &target_dir),
                )?;
                Ok(target_dir.join("x86_64-unknown-linux-musl/release/aiw-agent"))
            }
        }
    }
}

/// The packages of Cargo.lock the agent's build can use: every package
/// reachable from `aiw-agent` through the lock's dependency lists, as
/// `name version source checksum`. The lock lists each package's
/// dependencies for every platform and feature, so this is a superset of
/// what the musl build links (never a miss), yet a change to a builder or
/// test dependency leaves every image's customize stage cached.
/// The lock lists a workspace member's dev-dependencies among its
/// dependencies; `agent_manifest` (agent/Cargo.toml) says which of the
/// agent's are for its tests only, and those are not followed.
fn agent_locked_packages(lock: &str, agent_manifest: &str) -> Result<Vec<String>> {
    let manifest: toml::Value =
        toml::from_str(agent_manifest).context("agent/Cargo.toml is not TOML")?;
    let names = |table: Option<&toml::Value>| -> Vec<String> {
        table
            .and_then(|t| t.as_table())
            .into_iter()
            .flatten()
            .map(|(k, v)| {
                v.get("package")
                    .and_then(|p| p.as_str())
                    .unwrap_or(k)
                    .to_string()
            })
            .collect()
    };
    let mut built = names(manifest.get("dependencies"));
    built.extend(names(manifest.get("build-dependencies")));
    for t in manifest
        .get("target")
        .and_then(|t| t.as_table())
        .into_iter()
        .flatten()
    {
        built.extend(names(t.1.get("dependencies")));
        built.extend(names(t.1.get("build-dependencies")));
    }
    let tests_only: Vec<String> = names(manifest.get("dev-dependencies"))
        .into_iter()
        .filter(|n| !built.contains(n))
        .collect();
    let doc: toml::Value = toml::from_str(lock).context("Cargo.lock is not TOML")?;
    let pkgs = doc
        .get("package")
        .and_then(|p| p.as_array())
        .context("Cargo.lock has no [[package]] entries")?;
    let field =
        |p: &toml::Value, f: &str| p.get(f).and_then(|v| v.as_str()).unwrap_or("").to_string();
    // A dependency is named `name` when one version is locked, else
    // `name version` (and `name version (source)` when that is ambiguous too).
    let find = |dep: &str| -> Option<usize> {
        let mut words = dep.split_whitespace();
        let name = words.next()?;
        let version = words.next();
        pkgs.iter().position(|p| {
            field(p, "name") == name && version.is_none_or(|v| field(p, "version") == v)
        })
    };
    let start = pkgs
        .iter()
        .position(|p| field(p, "name") == "aiw-agent")
        .context("Cargo.lock has no aiw-agent package")?;
    let mut seen = vec![false; pkgs.len()];
    let mut todo = vec![start];
    seen[start] = true;
    while let Some(i) = todo.pop() {
        let deps = pkgs[i].get("dependencies").and_then(|d| d.as_array());
        for dep in deps.into_iter().flatten().filter_map(|d| d.as_str()) {
            let name = dep.split_whitespace().next().unwrap_or(dep);
            if i == start && tests_only.iter().any(|t| t == name) {
                continue;
            }
            let j = find(dep).with_context(|| {
                format!(
                    "Cargo.lock: {dep} (a dependency of {}) is not locked",
                    field(&pkgs[i], "name")
                )
            })?;
            if !seen[j] {
                seen[j] = true;
                todo.push(j);
            }
        }
    }
    let mut out: Vec<String> = pkgs
        .iter()
        .zip(&seen)
        .filter(|(_, s)| **s)
        .map(|(p, _)| {
            format!(
                "{} {} {} {}",
                field(p, "name"),
                field(p, "version"),
                field(p, "source"),
                field(p, "checksum")
            )
        })
        .collect();
    out.sort();
    Ok(out)
}

/// The toolchain that builds the agent: another rustc makes another binary.
fn rustc_version() -> Result<String> {
    let out = std::process::Command::new("rustc")
        .arg("-vV")
        .output()
        .context("running rustc -vV (the agent is built from source)")?;
    if !out.status.success() {
        bail!(
            "rustc -vV failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn slot(ctx: &BuildContext, rootfs: &Slot, agent: &AgentInput) -> Result<Slot> {
    let p = &ctx.profile;
    let mut k = KeyBuilder::new("customize");
    k.key("rootfs", &rootfs.key)
        // Bump when make() changes what it produces from the same inputs.
        .field("recipe", "9")
        // The unit states baked in, so that editing these lists is never a
        // cached old tree (no recipe bump to forget).
        .field("unit-states", &unit_state_lists())
        .field("overlay-context", &overlay_context(ctx).to_string())
        .list("overlays", &p.overlays)
        .field("image-version", &ctx.opts.image_version)
        .field("image-info", &serde_json::to_string(&image_info(ctx)?)?)
        .path("modes.toml", &ctx.images_dir().join("modes.toml"))?
        .field("update-url", &p.update_url)
        .field("update-tries", &p.update_tries.to_string())
        // How the erofs is packed: other bytes, same files.
        .field("root-compression", &p.root_compression);
    if let Some(key) = &p.update_keyring {
        k.path("update-keyring", key)?;
    }
    for o in &p.overlays {
        k.path(
            &format!("overlay:{o}"),
            &ctx.opts.project.join("overlays").join(o),
        )?;
    }
    agent.add_to_key(&mut k, &ctx.opts.project)?;
    // Archives and the vendor binary by their content as read now.
    baked::add_to_key(&mut k, &p.container_images, p.vendor_agent.as_ref())?;
    Ok(ctx.cache.slot("customize", &k.finish()))
}

/// What `*.tera` overlay files see as `profile`: the profile's fields that
/// describe the node. Disk-only keys (ESP size, kernel command line) are left
/// out so that changing them does not redo this stage.
pub fn overlay_context(ctx: &BuildContext) -> serde_json::Value {
    let p = &ctx.profile;
    serde_json::json!({
        "name": p.name,
        "description": p.description,
        "modes": p.modes,
        "packages": p.packages,
        "gpu": p.gpu,
        "docker_default_runtime": p.docker_default_runtime,
        "suite": p.suite,
        "version": ctx.opts.image_version,
    })
}

pub fn image_info(ctx: &BuildContext) -> Result<ImageInfo> {
    Ok(ImageInfo {
        profile: ctx.profile.name.clone(),
        version: ctx.opts.image_version.clone(),
        modes: ctx.profile.modes.clone(),
        profiles: ctx.all_profiles.clone(),
        gpu: ctx.profile.gpu,
        vendor_agent: ctx.profile.vendor_agent.as_ref().map(|v| v.sha256.clone()),
        container_images: ctx
            .profile
            .container_images
            .iter()
            .map(baked::describe)
            .collect::<Result<_>>()?,
    })
}

pub fn make(
    ctx: &BuildContext,
    tools: &ToolsTree,
    rootfs: &Slot,
    agent: &AgentInput,
    tmp: &Path,
) -> Result<()> {
    let agent_bin = agent.binary(&ctx.opts.project)?;
    let tree = tmp.join("tree");
    run_cmd(
        "copying the root filesystem",
        Cmd::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(rootfs.dir.join("tree"))
            .arg(&tree),
    )?;

    for o in &ctx.profile.overlays {
        let dir = ctx.opts.project.join("overlays").join(o);
        if !dir.is_dir() {
            bail!(
                "profile {}: overlay {o:?} does not exist (expected folder {})",
                ctx.profile.name,
                dir.display()
            );
        }
        apply_overlay(&dir, &tree, &overlay_context(ctx))?;
    }
    install_agent(ctx, &agent_bin, &tree)?;
    // sysupdate.d transfer files and the update keyring (A/B updates).
    crate::update::install(&ctx.profile, &tree)?;
    write_os_release(ctx, &tree)?;
    clear_per_machine_state(&tree)?;
    point_launch_configured_files_at_run(&tree)?;
    // apt's record of which packages came in as dependencies reflects how they
    // were asked for (--locked names every one), not what is installed, and apt
    // never runs on the immutable image: without it a --locked build is
    // bit-identical to the build that wrote the lock file.
    let _ = std::fs::remove_file(tree.join("var/lib/apt/extended_states"));
    move_var_to_factory(&tree)?;
    set_unit_states(ctx, tools, &tree)?;
    for d in ["efi", "opt/aiware", "cache", "var"] {
        std::fs::create_dir_all(tree.join(d))?;
    }

    // The UKI's .osrel section is made from this copy.
    std::fs::copy(tree.join("usr/lib/os-release"), tmp.join("os-release"))?;
    let erofs = tmp.join("root.erofs");
    // The file system's UUID names what is in it, not how it was asked for:
    // the rootfs key differs between a --locked build and the build that wrote
    // the lock, the installed packages do not.
    let fs_id = KeyBuilder::new("erofs-uuid")
        .path("packages", &rootfs.dir.join("packages.lock"))?
        .field("profile", &ctx.profile.name)
        .field("image-version", &ctx.opts.image_version)
        .finish();
    tools.run(
        "packing the root as erofs",
        &[
            "mkfs.erofs",
            "--quiet",
            &format!("-z{}", ctx.profile.root_compression),
            &format!("-T{}", ctx.profile.source_date_epoch),
            "--ignore-mtime",
            &format!("-U{}", uuid_from_key(&fs_id)),
            "/out/root.erofs",
            "/tree",
        ],
        &[
            Bind {
                host: tmp,
                inside: "/out",
            },
            Bind {
                host: &tree,
                inside: "/tree",
            },
        ],
    )?;
    anyhow::ensure!(erofs.is_file(), "mkfs.erofs wrote no image");
    remove_tree(&tree)?;
    Ok(())
}

/// A UUID string from the first 128 bits of a hex key (reproducible IDs).
pub fn uuid_from_key(key: &str) -> String {
    format!(
        "{}-{}-{}-{}-{}",
        &key[0..8],
        &key[8..12],
        &key[12..16],
        &key[16..20],
        &key[20..32]
    )
}

/// Copies an overlay tree into the image; `x.tera` is rendered to `x`.
pub fn apply_overlay(src: &Path, tree: &Path, profile: &serde_json::Value) -> Result<()> {
    let mut tctx = tera::Context::new();
    tctx.insert("profile", profile);
    copy_overlay_dir(src, src, tree, &tctx)
}

fn copy_overlay_dir(root: &Path, dir: &Path, tree: &Path, tctx: &tera::Context) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let rel = path.strip_prefix(root).unwrap();
        let meta = std::fs::symlink_metadata(&path)?;
        let mut dest = tree.join(rel);
        if meta.file_type().is_symlink() {
            let _ = std::fs::remove_file(&dest);
            std::os::unix::fs::symlink(std::fs::read_link(&path)?, &dest)?;
        } else if meta.is_dir() {
            std::fs::create_dir_all(&dest)?;
            copy_overlay_dir(root, &path, tree, tctx)?;
        } else {
            let bytes = if path.extension().is_some_and(|x| x == "tera") {
                dest.set_extension("");
                let text = std::fs::read_to_string(&path)?;
                tera::Tera::one_off(&text, tctx, false)
                    .map_err(|e| anyhow::anyhow!("rendering {}: {e:?}", path.display()))?
                    .into_bytes()
            } else {
                std::fs::read(&path)?
            };
            // Replace, never write through, a link a package left at that path.
            if std::fs::symlink_metadata(&dest).is_ok() {
                std::fs::remove_file(&dest)?;
            }
            std::fs::write(&dest, bytes).with_context(|| format!("writing {}", dest.display()))?;
            std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        }
    }
    Ok(())
}

fn install_agent(ctx: &BuildContext, bin: &Path, tree: &Path) -> Result<()> {
    let dest = tree.join("usr/bin/aiw-agent");
    std::fs::copy(bin, &dest).with_context(|| format!("installing {}", bin.display()))?;
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o755))?;
    let units = ctx.opts.project.join("agent/units");
    if !units.join("aiw-agent.service").is_file() {
        bail!(
            "{} has no aiw-agent.service: the image would boot without its agent \
             (a project copy given with --project needs agent/units too)",
            units.display()
        );
    }
    {
        for e in std::fs::read_dir(&units)? {
            let e = e?;
            let to = tree.join("usr/lib/systemd/system").join(e.file_name());
            std::fs::copy(e.path(), &to)?;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644))?;
        }
    }
    let lib = tree.join("usr/lib/aiware");
    std::fs::create_dir_all(&lib)?;
    std::fs::copy(ctx.images_dir().join("modes.toml"), lib.join("modes.toml"))?;
    std::fs::write(
        lib.join("image.json"),
        serde_json::to_string_pretty(&image_info(ctx)?)? + "\n",
    )?;
    baked::install(
        tree,
        &ctx.profile.container_images,
        ctx.profile.vendor_agent.as_ref(),
    )?;
    Ok(())
}

fn write_os_release(ctx: &BuildContext, tree: &Path) -> Result<()> {
    let path = tree.join("usr/lib/os-release");
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    let mut out: String = old
        .lines()
        .filter(|l| {
            ![
                "IMAGE_ID=",
                "IMAGE_VERSION=",
                "VARIANT=",
                "VARIANT_ID=",
                "PRETTY_NAME=",
            ]
            .iter()
            .any(|k| l.starts_with(k))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let debian = old
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .unwrap_or("\"Debian\"")
        .trim_matches('"')
        .to_string();
    out.push_str(&format!(
        "PRETTY_NAME=\"aiWARE {} node {} ({debian})\"\nVARIANT=\"aiWARE {} node\"\nVARIANT_ID=aiware-{}\nIMAGE_ID=aiware-{}\nIMAGE_VERSION={}\n",
        ctx.profile.name,
        ctx.opts.image_version,
        ctx.profile.name,
        ctx.profile.name,
        ctx.profile.name,
        ctx.opts.image_version
    ));
    std::fs::write(&path, out)?;
    Ok(())
}

/// What must differ between machines is never baked.
fn clear_per_machine_state(tree: &Path) -> Result<()> {
    std::fs::write(tree.join("etc/machine-id"), b"")?;
    let _ = std::fs::remove_file(tree.join("var/lib/dbus/machine-id"));
    for e in std::fs::read_dir(tree.join("etc/ssh"))? {
        let e = e?;
        if e.file_name().to_string_lossy().starts_with("ssh_host_") {
            std::fs::remove_file(e.path())?;
        }
    }
    std::fs::write(tree.join("etc/hostname"), b"aiware\n")?;
    let _ = std::fs::remove_file(tree.join("var/cache/ldconfig/aux-cache"));
    // DKMS 3 makes a module signing key when it first builds; the modules are
    // built already, and a key in the image would be every node's key.
    for f in ["var/lib/dkms/mok.key", "var/lib/dkms/mok.pub"] {
        let _ = std::fs::remove_file(tree.join(f));
    }
    per_node_snakeoil(tree)?;
    let keys = private_keys(tree);
    if !keys.is_empty() {
        bail!(
            "the image would carry private keys, the same on every node: {}. \
             Make them on the node at first boot, or deliver them with launch data",
            keys.iter()
                .map(|k| format!("/{}", k.strip_prefix(tree).unwrap_or(k).display()))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// Moves the image's own copy of a file the launch data may change to
/// `kept` (an absolute path on the node) and links `file` to `run`.
/// Nothing to do when `file` is already a link (the tree done before).
fn keep_and_link_into_run(tree: &Path, file: &str, kept: &str, run: &str) -> Result<()> {
    let path = tree.join(file);
    let meta =
        std::fs::symlink_metadata(&path).with_context(|| format!("the image has no /{file}"))?;
    if meta.is_file() {
        let kept = tree.join(kept.trim_start_matches('/'));
        std::fs::create_dir_all(kept.parent().unwrap())?;
        std::fs::rename(&path, &kept)?;
        std::os::unix::fs::symlink(run, &path)?;
    }
    Ok(())
}

/// Files of the read-only /etc that cloud-config sets per node become links
/// into /run, where the agent writes them at boot; tmpfiles.d
/// (overlays/base/usr/lib/tmpfiles.d/aiware.conf) points each at the image's
/// own default first, so the node is whole before the agent runs or without
/// it. `/etc/localtime` is a link in the base overlay (timezone); here:
/// - the CA bundle (`ca_certs`): moved to the agent's `IMAGE_CA_BUNDLE`, its
///   path a link to /run/aiware/ca-certificates.crt;
/// - Docker's daemon.json (the trusted registries, `aiw_agent::registry_trust`):
///   moved to `IMAGE_DAEMON_JSON`, its path a link to /run/aiware/docker-daemon.json;
/// - `/home` (`users`): a link to /var/home, as on Fedora CoreOS and Flatcar,
///   so a user's home is persistent and at the path cloud-init gives it.
fn point_launch_configured_files_at_run(tree: &Path) -> Result<()> {
    use aiw_agent::{os_config, registry_trust};
    keep_and_link_into_run(
        tree,
        "etc/ssl/certs/ca-certificates.crt",
        os_config::IMAGE_CA_BUNDLE,
        os_config::CA_BUNDLE,
    )
    .context("package ca-certificates")?;
    if tree.join("usr/bin/dockerd").exists() || tree.join("etc/docker/daemon.json").exists() {
        keep_and_link_into_run(
            tree,
            "etc/docker/daemon.json",
            registry_trust::IMAGE_DAEMON_JSON,
            registry_trust::DAEMON_JSON,
        )
        .context("the base overlay's Docker settings")?;
    }
    let home = tree.join("home");
    if std::fs::symlink_metadata(&home).is_ok_and(|m| m.is_dir()) {
        // Only an empty /home: nothing the packages put there is hidden.
        std::fs::remove_dir(&home).context("/home of the image is not empty")?;
    }
    if std::fs::symlink_metadata(&home).is_err() {
        std::os::unix::fs::symlink("var/home", &home)?;
    }
    // sudo refuses rule files others can write; git keeps no modes but x.
    let sudoers = tree.join("etc/sudoers.d/50-aiwimg");
    if sudoers.is_file() {
        std::fs::set_permissions(&sudoers, std::fs::Permissions::from_mode(0o440))?;
    }
    Ok(())
}

/// Where aiw-snakeoil-cert.service writes each node's own pair.
const SNAKEOIL_DIR: &str = "/var/lib/aiwimg/ssl-cert";

/// ssl-cert's "snakeoil" pair (PostgreSQL's TLS by default) was made when
/// the package was installed: its paths become links to a pair each node
/// makes on its first boot (agent/units/aiw-snakeoil-cert.service).
fn per_node_snakeoil(tree: &Path) -> Result<()> {
    let pairs = [
        ("etc/ssl/private", "ssl-cert-snakeoil.key"),
        ("etc/ssl/certs", "ssl-cert-snakeoil.pem"),
    ];
    if !tree.join(pairs[0].0).join(pairs[0].1).exists() {
        return Ok(());
    }
    for (dir, name) in pairs {
        let p = tree.join(dir).join(name);
        let _ = std::fs::remove_file(&p);
        std::os::unix::fs::symlink(format!("{SNAKEOIL_DIR}/{name}"), &p)
            .with_context(|| format!("linking {}", p.display()))?;
    }
    // The OpenSSL hash link named after the baked certificate's subject.
    for e in std::fs::read_dir(tree.join("etc/ssl/certs"))?.flatten() {
        if std::fs::read_link(e.path()).is_ok_and(|t| t.as_os_str() == "ssl-cert-snakeoil.pem") {
            std::fs::remove_file(e.path())?;
        }
    }
    Ok(())
}

/// Files holding a PEM private key where packages and overlays put state
/// (not /usr: libraries ship test vectors there).
pub fn private_keys(tree: &Path) -> Vec<PathBuf> {
    fn walk(p: &Path, found: &mut Vec<PathBuf>) {
        let Ok(meta) = std::fs::symlink_metadata(p) else {
            return;
        };
        if meta.is_dir() {
            let mut entries: Vec<_> = std::fs::read_dir(p)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .collect();
            entries.sort();
            for e in entries {
                walk(&e, found);
            }
        } else if meta.is_file() && meta.len() < (1 << 20) {
            let data = std::fs::read(p).unwrap_or_default();
            let pem = b"PRIVATE KEY-----";
            if data.windows(pem.len()).any(|w| w == pem) {
                found.push(p.to_path_buf());
            }
        }
    }
    let mut found = Vec::new();
    for d in ["etc", "var", "root", "home", "srv", "opt"] {
        walk(&tree.join(d), &mut found);
    }
    found
}

/// `/var` of the image is a fresh partition made at first boot; what packages
/// put there is kept in `/usr/share/factory/var` and copied over by tmpfiles
/// when missing (the systemd factory convention).
fn move_var_to_factory(tree: &Path) -> Result<()> {
    let var = tree.join("var");
    let factory = tree.join("usr/share/factory/var");
    std::fs::create_dir_all(factory.parent().unwrap())?;
    remove_tree(&factory)?;
    // Caches and logs of the build are not state worth shipping.
    for junk in [
        "cache/apt",
        "lib/apt",
        "log/apt",
        "log/dpkg.log",
        "log/alternatives.log",
        "log/bootstrap.log",
    ] {
        remove_tree(&var.join(junk))?;
    }
    run_cmd(
        "moving /var to /usr/share/factory/var",
        Cmd::new("cp").args(["-a"]).arg(&var).arg(&factory),
    )?;
    let mut rules = String::from(
        "# Written by aiwimg: re-creates on the /var partition what packages put in /var.\n",
    );
    let mut top: Vec<_> = std::fs::read_dir(&factory)?.collect::<std::io::Result<_>>()?;
    top.sort_by_key(|e| e.file_name());
    for e in top {
        let name = e.file_name().to_string_lossy().to_string();
        let meta = std::fs::symlink_metadata(e.path())?;
        if meta.is_dir() {
            rules.push_str(&format!(
                "d /var/{name} {:04o} {} {} -\n",
                meta.mode() & 0o7777,
                meta.uid(),
                meta.gid()
            ));
            let mut sub: Vec<_> = std::fs::read_dir(e.path())?.collect::<std::io::Result<_>>()?;
            sub.sort_by_key(|e| e.file_name());
            for s in sub {
                let sname = s.file_name().to_string_lossy().to_string();
                // Links are re-made as links: `C` would follow them from the
                // factory folder, where a relative target points elsewhere.
                if let Ok(target) = std::fs::read_link(s.path()) {
                    rules.push_str(&format!(
                        "L /var/{name}/{sname} - - - - {}\n",
                        target.display()
                    ));
                    continue;
                }
                rules.push_str(&format!(
                    "C /var/{name}/{sname} - - - - /usr/share/factory/var/{name}/{sname}\n"
                ));
            }
        } else if let Ok(target) = std::fs::read_link(e.path()) {
            rules.push_str(&format!("L /var/{name} - - - - {}\n", target.display()));
        } else {
            rules.push_str(&format!(
                "C /var/{name} - - - - /usr/share/factory/var/{name}\n"
            ));
        }
    }
    std::fs::write(
        tree.join("usr/lib/tmpfiles.d/00-aiwimg-factory-var.conf"),
        rules,
    )?;
    remove_tree(&var)?;
    std::fs::create_dir(&var)?;
    // The mount point of the private /var/tmp of units with
    // PrivateTmp=disconnected (systemd-resolved): they start before the /var
    // partition is mounted, and a namespace needs the folder in the root.
    std::fs::create_dir(var.join("tmp"))?;
    std::fs::set_permissions(var.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
    Ok(())
}

/// MODE_HELPER_UNITS, ALWAYS_ENABLED, MASKED and ON_DEMAND as one text, for
/// the stage's key.
fn unit_state_lists() -> String {
    format!("{MODE_HELPER_UNITS:?} {ALWAYS_ENABLED:?} {MASKED:?} {ON_DEMAND:?}")
}

fn unit_exists(tree: &Path, unit: &str) -> bool {
    [
        "usr/lib/systemd/system",
        "lib/systemd/system",
        "etc/systemd/system",
    ]
    .iter()
    .any(|d| tree.join(d).join(unit).exists())
}

/// Enables what every node runs and disables what only modes start, baked
/// into /etc since /etc is read-only at run time.
fn set_unit_states(ctx: &BuildContext, tools: &ToolsTree, tree: &Path) -> Result<()> {
    let mut disable: Vec<String> = ctx.modes.all_mode_services();
    disable.extend(MODE_HELPER_UNITS.iter().map(|s| s.to_string()));
    // What every mode of this image runs (Docker on an engine image) starts at
    // boot beside the agent: whatever mode a launch picks, it needs them, and
    // started by the agent they would only begin once it had read the launch
    // data (15 s later under TCG). A launch refused as invalid stops them.
    let every_mode = ctx
        .modes
        .services_of_every(ctx.profile.modes.iter().map(String::as_str));
    disable.retain(|u| {
        !ctx.modes.common.services.contains(u) && !every_mode.contains(u) && unit_exists(tree, u)
    });
    disable.extend(
        ON_DEMAND
            .iter()
            .filter(|(service, _)| unit_exists(tree, service))
            .map(|(service, _)| service.to_string()),
    );
    disable.sort();
    disable.dedup();
    let mut enable: Vec<String> = ALWAYS_ENABLED.iter().map(|s| s.to_string()).collect();
    // After the disable above, which took the socket too (`Also=`).
    enable.extend(ON_DEMAND.iter().map(|(_, socket)| socket.to_string()));
    enable.extend(ctx.modes.common.services.iter().cloned());
    enable.extend(every_mode);
    let units = ctx.opts.project.join("agent/units");
    if let Ok(rd) = std::fs::read_dir(&units) {
        for e in rd.flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            if text.contains("[Install]") {
                enable.push(e.file_name().to_string_lossy().to_string());
            }
        }
    }
    // Overlay units with an [Install] section are enabled too.
    for dir in ["usr/lib/systemd/system"] {
        for o in &ctx.profile.overlays {
            let d = ctx.opts.project.join("overlays").join(o).join(dir);
            if let Ok(rd) = std::fs::read_dir(&d) {
                for e in rd.flatten() {
                    let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                    if text.contains("[Install]") {
                        enable.push(e.file_name().to_string_lossy().to_string());
                    }
                }
            }
        }
    }
    enable.retain(|u| unit_exists(tree, u));
    enable.sort();
    enable.dedup();
    let bind = [Bind {
        host: tree,
        inside: "/image",
    }];
    if !disable.is_empty() {
        let mut args = vec!["systemctl", "--root=/image", "--no-reload", "disable"];
        args.extend(disable.iter().map(String::as_str));
        tools.run(
            "disabling mode services and on-demand services",
            &args,
            &bind,
        )?;
    }
    let mut args = vec!["systemctl", "--root=/image", "--no-reload", "enable"];
    args.extend(enable.iter().map(String::as_str));
    tools.run("enabling node services", &args, &bind)?;
    let mut args = vec!["systemctl", "--root=/image", "--no-reload", "mask"];
    args.extend(MASKED.iter().copied());
    tools.run("masking units no node needs", &args, &bind)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(tree: &Path, rel: &str, body: &str) {
        let p = tree.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    }

    /// A lock in Cargo's own form: the agent uses a (two versions of b, so
    /// named with their version) and nothing of the builder's d.
    const LOCK: &str = r#"
version = 4

[[package]]
name = "aiw-agent"
version = "0.1.0"
dependencies = ["a", "b 2.0.0", "t"]

[[package]]
name = "t"
version = "1.0.0"
source = "registry+https://example.invalid/index"
checksum = "tt"

[[package]]
name = "aiwimg"
version = "0.1.0"
dependencies = ["aiw-agent", "d"]

[[package]]
name = "a"
version = "1.0.0"
source = "registry+https://example.invalid/index"
checksum = "aa"
dependencies = ["b 1.0.0"]

[[package]]
name = "b"
version = "1.0.0"
source = "registry+https://example.invalid/index"
checksum = "b1"

[[package]]
name = "b"
version = "2.0.0"
source = "registry+https://example.invalid/index"
checksum = "b2"

[[package]]
name = "d"
version = "1.0.0"
source = "registry+https://example.invalid/index"
checksum = "dd"
"#;

    /// t is for the agent's tests only.
    const MANIFEST: &str =
        "[dependencies]\na = \"1\"\nbee = { package = \"b\", version = \"2\" }\n\
        [dev-dependencies]\nt = \"1\"\na = \"1\"\n";

    #[test]
    fn agent_key_covers_the_agents_locked_packages_and_no_others() {
        let got = agent_locked_packages(LOCK, MANIFEST).unwrap();
        let names: Vec<&str> = got.iter().map(|l| l.split(' ').next().unwrap()).collect();
        assert_eq!(names, ["a", "aiw-agent", "b", "b"], "{got:?}");
        assert!(got
            .iter()
            .any(|l| l.starts_with("b 1.0.0 ") && l.ends_with(" b1")));
        // A builder dependency moving on leaves the agent's packages as they are.
        let builder_moved = LOCK.replace("checksum = \"dd\"", "checksum = \"d2\"");
        assert_eq!(
            agent_locked_packages(&builder_moved, MANIFEST).unwrap(),
            got
        );
        // An agent dependency moving on (even one reached through another) does not.
        let agent_moved = LOCK.replace("checksum = \"b1\"", "checksum = \"b9\"");
        assert_ne!(agent_locked_packages(&agent_moved, MANIFEST).unwrap(), got);
        // A dependency missing from the lock is an error, not a smaller key.
        let broken = LOCK.replace("dependencies = [\"b 1.0.0\"]", "dependencies = [\"c\"]");
        assert!(agent_locked_packages(&broken, MANIFEST).is_err());
    }

    #[test]
    fn the_workspace_lock_gives_the_agent_without_builder_or_tests() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
        let lock = std::fs::read_to_string(format!("{root}/Cargo.lock")).unwrap();
        let manifest = std::fs::read_to_string(format!("{root}/agent/Cargo.toml")).unwrap();
        let got = agent_locked_packages(&lock, &manifest).unwrap();
        let has = |n: &str| got.iter().any(|l| l.split(' ').next() == Some(n));
        assert!(
            has("aiw-agent") && has("bollard") && has("serde"),
            "{got:?}"
        );
        // Its test-only dependencies (qemu-tests, which brings the builder).
        assert!(
            !has("aiwimg") && !has("qemu-tests") && !has("rcgen"),
            "{got:?}"
        );
    }

    #[test]
    fn launch_configured_files_link_into_run_with_the_image_defaults_kept() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path();
        put(t, "etc/ssl/certs/ca-certificates.crt", "BUNDLE");
        put(t, "etc/docker/daemon.json", "{}");
        put(
            t,
            "etc/sudoers.d/50-aiwimg",
            "@includedir /run/aiware/sudoers.d\n",
        );
        std::fs::create_dir_all(t.join("home")).unwrap();
        point_launch_configured_files_at_run(t).unwrap();
        let link = |p: &str| std::fs::read_link(t.join(p)).unwrap();
        assert_eq!(
            link("etc/ssl/certs/ca-certificates.crt"),
            Path::new("/run/aiware/ca-certificates.crt")
        );
        let kept = |p: &str| std::fs::read_to_string(t.join(p.trim_start_matches('/'))).unwrap();
        assert_eq!(kept(aiw_agent::os_config::IMAGE_CA_BUNDLE), "BUNDLE");
        assert_eq!(
            link("etc/docker/daemon.json"),
            Path::new(aiw_agent::registry_trust::DAEMON_JSON)
        );
        assert_eq!(kept(aiw_agent::registry_trust::IMAGE_DAEMON_JSON), "{}");
        assert_eq!(link("home"), Path::new("var/home"));
        let mode = std::fs::metadata(t.join("etc/sudoers.d/50-aiwimg"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o440);
        // Again on the same tree (nothing to move): unchanged, no error.
        point_launch_configured_files_at_run(t).unwrap();
        assert_eq!(link("home"), Path::new("var/home"));
        // A /home a package filled is not hidden.
        let d2 = tempfile::tempdir().unwrap();
        put(d2.path(), "etc/ssl/certs/ca-certificates.crt", "B");
        put(d2.path(), "home/someone/.profile", "x");
        assert!(point_launch_configured_files_at_run(d2.path()).is_err());
    }

    const KEY: &str =
        "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEI\n-----END PRIVATE KEY-----\n";

    #[test]
    fn baked_private_keys_are_found_outside_usr() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path();
        put(t, "var/lib/dkms/mok.key", KEY);
        put(t, "etc/app/tls.key", &KEY.replace("PRIVATE", "EC PRIVATE"));
        put(t, "etc/app/tls.pem", "-----BEGIN CERTIFICATE-----\n");
        put(t, "usr/lib/python3/dist-packages/x/tests/key.pem", KEY);
        assert_eq!(
            private_keys(t),
            [t.join("etc/app/tls.key"), t.join("var/lib/dkms/mok.key")]
        );
    }

    #[test]
    fn the_snakeoil_pair_and_dkms_key_leave_the_image() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path();
        put(t, "etc/machine-id", "0123\n");
        put(t, "etc/ssh/ssh_host_ed25519_key", KEY);
        put(t, "etc/ssl/private/ssl-cert-snakeoil.key", KEY);
        put(
            t,
            "etc/ssl/certs/ssl-cert-snakeoil.pem",
            "-----BEGIN CERTIFICATE-----\n",
        );
        std::os::unix::fs::symlink("ssl-cert-snakeoil.pem", t.join("etc/ssl/certs/62742064.0"))
            .unwrap();
        put(t, "var/lib/dkms/mok.key", KEY);
        put(t, "var/lib/dkms/mok.pub", "cert");
        clear_per_machine_state(t).unwrap();
        assert!(private_keys(t).is_empty());
        assert_eq!(
            std::fs::read_link(t.join("etc/ssl/private/ssl-cert-snakeoil.key")).unwrap(),
            Path::new("/var/lib/aiwimg/ssl-cert/ssl-cert-snakeoil.key")
        );
        assert!(!t.join("etc/ssl/certs/62742064.0").exists());
        assert!(!t.join("var/lib/dkms/mok.pub").exists());

        // An overlay's key is refused, by name.
        put(t, "etc/aiware/license.key", KEY);
        let err = clear_per_machine_state(t).unwrap_err().to_string();
        assert!(err.contains("/etc/aiware/license.key"), "{err}");
    }
}
