//! `aiwimg build`: the whole pipeline, top to bottom.
//!
//! tools -> rootfs -> customize -> initrd -> disk -> outputs
//!
//! Each stage is a function from its inputs to an artifact in the cache, keyed
//! by the sha256 of those inputs (see `cache.rs`). `build` below is the one
//! place that shows the order; the stages live in `stages/`.

use crate::cache::{remove_tree, Cache, Slot};
use crate::host;
use crate::manifest::Manifest;
use crate::outputs::Format;
use crate::profile::Profile;
use crate::stages;
use crate::tools::ToolsTree;
use aiw_agent::modes::ModeTable;
use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Everything `aiwimg build` was asked for.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The project checkout: holds images/, overlays/, agent/.
    pub project: PathBuf,
    pub profile: String,
    pub output_dir: PathBuf,
    pub formats: Vec<Format>,
    pub cache_dir: PathBuf,
    /// Overrides the profile's mirror.
    pub mirror: Option<String>,
    pub image_version: String,
    /// Install exactly the versions of `images/<profile>.lock`.
    pub locked: bool,
    /// `--rebuild`: remove this image's cached stages (not the tools tree) first.
    pub rebuild: bool,
    /// A prebuilt aiw-agent instead of building it from `agent/`.
    pub agent_bin: Option<PathBuf>,
    /// `--repo-mirror NAME=URL`: a local mirror for a profile's third-party repository.
    pub repo_mirrors: BTreeMap<String, String>,
    /// `--insecure-registry HOST:PORT`: pull from it without verifying TLS.
    pub insecure_registries: Vec<String>,
    /// Print progress as JSON lines instead of text.
    pub json: bool,
    /// `--update-url`: overrides the profile's `update_url`.
    pub update_url: Option<String>,
    /// `--update-keyring`: overrides the profile's `update_keyring`.
    pub update_keyring: Option<PathBuf>,
    /// `--update-tries`: overrides the profile's `update_tries`.
    pub update_tries: Option<u32>,
    /// `--secure-boot-key/--secure-boot-cert`: sign for UEFI Secure Boot
    /// (override the profile's `secure_boot_key/secure_boot_cert`).
    pub secure_boot_key: Option<PathBuf>,
    pub secure_boot_cert: Option<PathBuf>,
    /// `--secure-boot-enroll`: overrides the profile's `secure_boot_enroll`.
    pub secure_boot_enroll: Option<crate::secure_boot::Enroll>,
}

/// What a stage did, for progress and for `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    pub stage: String,
    pub key: String,
    /// True unless the stage was built by this run.
    pub cached: bool,
    pub state: StageState,
    pub seconds: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StageState {
    /// Made by this build.
    Built,
    /// Reused from the cache.
    Cached,
    /// Not needed: every stage that reads it was cached.
    Unused,
}

/// Everything the stages read that is not the artifact of an earlier stage.
pub struct BuildContext {
    pub opts: BuildOptions,
    pub profile: Profile,
    pub modes: ModeTable,
    pub cache: Cache,
    /// Every profile's modes, baked into image.json.
    pub all_profiles: BTreeMap<String, Vec<String>>,
    /// The mirror in effect (command line over profile), None = mmdebstrap's default.
    pub mirror: Option<String>,
    /// What the disk stage signs with (and, in a profile that builds kernel
    /// modules, what DKMS signs them with in the rootfs stage); None: an
    /// unsigned image.
    pub signing: Option<crate::secure_boot::SigningInput>,
}

impl BuildContext {
    pub fn images_dir(&self) -> PathBuf {
        self.opts.project.join("images")
    }
    pub fn lock_path(&self) -> PathBuf {
        self.images_dir()
            .join(format!("{}.lock", self.profile.name))
    }
    pub fn image_name(&self) -> String {
        format!("aiware-{}_{}", self.profile.name, self.opts.image_version)
    }
}

pub struct BuildResult {
    pub output: PathBuf,
    pub manifest: Manifest,
    pub stages: Vec<StageReport>,
}

/// The cached stages, in pipeline order (also the cache's folder names).
pub const STAGES: [&str; 5] = ["tools", "rootfs", "customize", "initrd", "disk"];

struct Progress {
    json: bool,
    total: usize,
    done: Vec<StageReport>,
    /// Shared locks on every slot this build uses: eviction leaves them alone.
    held: Vec<crate::cache::FileLock>,
}

impl Progress {
    /// Runs one cached stage when `needed`: reuses the slot when done, else
    /// fills it. A stage nothing downstream needs is reported and skipped.
    fn stage(
        &mut self,
        name: &str,
        slot: &Slot,
        needed: bool,
        make: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<()> {
        let n = self.done.len() + 1;
        let started = Instant::now();
        if !needed {
            return self.report(name, &slot.key, StageState::Unused, started);
        }
        let mut state = StageState::Cached;
        let mut lock = slot.hold()?;
        if lock.is_none() {
            if !self.json {
                eprintln!("[{n}/{}] {name:<9} building ...", self.total);
            }
            slot.fill(make)
                .with_context(|| format!("stage {name} failed"))?;
            state = StageState::Built;
            lock = slot.hold()?;
        }
        // None again only if another build evicted it in between.
        let lock = lock.with_context(|| {
            format!(
                "stage {name}: its artifact was evicted from the cache as soon as it was made; \
                 is another build short of disk space?"
            )
        })?;
        self.held.push(lock);
        self.report(name, &slot.key, state, started)
    }

    fn report(&mut self, name: &str, key: &str, state: StageState, started: Instant) -> Result<()> {
        let r = StageReport {
            stage: name.to_string(),
            key: key.to_string(),
            cached: state != StageState::Built,
            state,
            seconds: started.elapsed().as_secs_f64(),
        };
        let n = self.done.len() + 1;
        if self.json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            let what = match state {
                StageState::Built => "built    ",
                StageState::Cached => "cached   ",
                StageState::Unused => "not needed (later stages cached)",
            };
            eprintln!(
                "[{n}/{}] {:<9} {what} {:>6.1}s  key {}",
                self.total,
                name,
                r.seconds,
                &key[..12.min(key.len())]
            );
        }
        self.done.push(r);
        Ok(())
    }
}

/// The cache slot of every stage, computed from the inputs alone (nothing is
/// built): what `build` will reuse, and what the key tests compare.
pub struct Plan {
    pub tools: Slot,
    pub rootfs: Slot,
    pub agent: stages::customize::AgentInput,
    pub customize: Slot,
    pub initrd: Slot,
    pub disk: Slot,
}

impl Plan {
    pub fn new(ctx: &BuildContext) -> Result<Plan> {
        let tools = stages::tools_stage::slot(ctx);
        let rootfs = stages::rootfs::slot(ctx)?;
        let agent = stages::customize::AgentInput::resolve(ctx)?;
        let customize = stages::customize::slot(ctx, &rootfs, &agent)?;
        let initrd = stages::initrd::slot(ctx, &tools, &rootfs);
        let disk = stages::disk::slot(ctx, &tools, &customize, &initrd);
        Ok(Plan {
            tools,
            rootfs,
            agent,
            customize,
            initrd,
            disk,
        })
    }

    /// Which stages this build must run or reuse, walking back from the
    /// outputs, which read only the disk slot: a stage is needed when a
    /// stage that reads it has to be built. So a build whose disk is cached
    /// touches nothing else, and an evicted root filesystem is remade only
    /// when something built from it is missing too.
    pub fn needed(&self) -> Needed {
        let disk = true;
        let build_disk = !self.disk.is_done();
        let customize = build_disk;
        let initrd = build_disk;
        let build_customize = customize && !self.customize.is_done();
        let build_initrd = initrd && !self.initrd.is_done();
        // customize, initrd and disk all read the root tree and run tools.
        let rootfs = build_customize || build_initrd || build_disk;
        Needed {
            tools: rootfs,
            rootfs,
            customize,
            initrd,
            disk,
        }
    }

    /// Every stage's slot, in pipeline order (names as in [`STAGES`]).
    pub fn slots(&self) -> [(&'static str, &Slot); 5] {
        [
            ("tools", &self.tools),
            ("rootfs", &self.rootfs),
            ("customize", &self.customize),
            ("initrd", &self.initrd),
            ("disk", &self.disk),
        ]
    }

    pub fn keys(&self) -> [(&'static str, &str); 5] {
        self.slots().map(|(name, slot)| (name, slot.key.as_str()))
    }
}

/// The stages a build uses (see [`Plan::needed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needed {
    pub tools: bool,
    pub rootfs: bool,
    pub customize: bool,
    pub initrd: bool,
    pub disk: bool,
}

impl Needed {
    /// In pipeline order, as [`Plan::slots`].
    pub fn in_order(&self) -> [bool; 5] {
        [
            self.tools,
            self.rootfs,
            self.customize,
            self.initrd,
            self.disk,
        ]
    }
}

impl BuildContext {
    /// Reads profiles and the mode table; checks nothing on the host.
    pub fn new(opts: BuildOptions) -> Result<BuildContext> {
        let images = opts.project.join("images");
        let modes = ModeTable::load(&images.join("modes.toml"))?;
        let mut profile = Profile::load(&images, &opts.profile, &modes)?;
        if let Some(u) = &opts.update_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                anyhow::bail!("--update-url {u:?} is not an http(s) URL");
            }
            profile.update_url = u.clone();
        }
        if let Some(k) = &opts.update_keyring {
            profile.update_keyring = Some(k.clone());
        }
        if let Some(t) = opts.update_tries {
            if !(1..=9).contains(&t) {
                anyhow::bail!("--update-tries {t}: give 1 to 9 boots");
            }
            profile.update_tries = t;
        }
        let mut all_profiles = BTreeMap::new();
        for name in crate::profile::list_profiles(&images)? {
            if let Ok(p) = Profile::load(&images, &name, &modes) {
                all_profiles.insert(name, p.modes);
            }
        }
        let mirror = opts.mirror.clone().or(profile.mirror.clone());
        let signing = signing_input(&opts, &profile)?;
        Ok(BuildContext {
            signing,
            cache: Cache::new(opts.cache_dir.clone())?,
            opts,
            profile,
            modes,
            all_profiles,
            mirror,
        })
    }
}

/// The Secure Boot key pair in effect: the command line's over the profile's.
fn signing_input(
    opts: &BuildOptions,
    profile: &Profile,
) -> Result<Option<crate::secure_boot::SigningInput>> {
    let key = opts
        .secure_boot_key
        .as_ref()
        .or(profile.secure_boot_key.as_ref());
    let cert = opts
        .secure_boot_cert
        .as_ref()
        .or(profile.secure_boot_cert.as_ref());
    let enroll = opts.secure_boot_enroll.or(profile.secure_boot_enroll);
    match (key, cert) {
        (Some(k), Some(c)) => Ok(Some(crate::secure_boot::SigningInput::new(
            k,
            c,
            enroll.unwrap_or(crate::secure_boot::Enroll::Off),
        )?)),
        (None, None) if profile.secure_boot => anyhow::bail!(
            "profile {} has `secure_boot = true`: give the db key and certificate to sign \
             with (--secure-boot-key FILE --secure-boot-cert FILE)",
            profile.name
        ),
        (None, None) if enroll.is_some() => anyhow::bail!(
            "--secure-boot-enroll / `secure_boot_enroll` needs a key to sign with \
             (--secure-boot-key FILE --secure-boot-cert FILE)"
        ),
        (None, None) => Ok(None),
        _ => anyhow::bail!(
            "Secure Boot signing needs both the key and the certificate \
             (--secure-boot-key FILE --secure-boot-cert FILE)"
        ),
    }
}

pub fn build(opts: BuildOptions) -> Result<BuildResult> {
    let mut ctx = BuildContext::new(opts)?;
    host::check_build_host(&ctx.opts)?;
    if let Some(m) = &ctx.mirror {
        host::check_mirror(m, &ctx.profile.suite)?;
    }
    stages::rootfs::check_repositories(&ctx.profile, &ctx.opts.repo_mirrors, &ctx.images_dir())?;
    // Pulled images become archives (cached by digest) before the keys are
    // computed, so the customize key covers them as it covers any archive.
    let (pulled, _pulls_held) = stages::registry::resolve(
        &ctx.cache,
        &ctx.profile.registry_images,
        &ctx.opts.insecure_registries,
    )?;
    ctx.profile.container_images.extend(pulled);
    // Reproducible timestamps for every tool that honours it.
    std::env::set_var(
        "SOURCE_DATE_EPOCH",
        ctx.profile.source_date_epoch.to_string(),
    );
    let plan = Plan::new(&ctx)?;
    if ctx.opts.rebuild {
        // The tools tree is the builder's toolchain, not part of the image.
        for (stage, slot) in plan.slots().into_iter().skip(1) {
            if slot.remove()? {
                eprintln!("cache: --rebuild removed {stage}/{}", &slot.key[..12]);
            }
        }
    }
    let need = plan.needed();
    host::make_room(&ctx, &plan, &need)?;
    let mut progress = Progress {
        json: ctx.opts.json,
        total: 6,
        done: Vec::new(),
        held: Vec::new(),
    };

    // 1. Tools tree: every image tool runs in it.
    progress.stage("tools", &plan.tools, need.tools, |tmp| {
        stages::tools_stage::make(&ctx, tmp)
    })?;
    let tools = ToolsTree {
        root: plan.tools.dir.join("root"),
    };

    // 2. Root filesystem: packages installed by mmdebstrap, lock file written.
    progress.stage("rootfs", &plan.rootfs, need.rootfs, |tmp| {
        stages::rootfs::make(&ctx, tmp)
    })?;

    // 3. Customize: overlays, agent, immutable layout; ends as the erofs root.
    progress.stage("customize", &plan.customize, need.customize, |tmp| {
        stages::customize::make(&ctx, &tools, &plan.rootfs, &plan.agent, tmp)
    })?;

    // 4. Initrd: systemd + veritysetup, only the drivers boot needs.
    progress.stage("initrd", &plan.initrd, need.initrd, |tmp| {
        stages::initrd::make(&tools, &plan.rootfs, tmp)
    })?;

    // 5. Disk: GPT with ESP (systemd-boot + UKI with the roothash), root A/B.
    progress.stage("disk", &plan.disk, need.disk, |tmp| {
        stages::disk::make(
            &ctx,
            &tools,
            &plan.rootfs,
            &plan.customize,
            &plan.initrd,
            tmp,
        )
    })?;
    // The disk slot keeps the package list: the rootfs slot may be gone.
    if !ctx.opts.locked {
        stages::rootfs::write_lock(&ctx, &plan.disk)?;
    }

    // 6. Outputs: converted in a temporary folder, moved into place on success.
    let started = Instant::now();
    let final_dir = ctx.opts.output_dir.join(&ctx.profile.name);
    // Already there from this very disk, in these formats: nothing to write
    // (test suites ask for the same image once per test binary; each copy
    // and checksum of a multi-GiB raw costs half a minute).
    if !ctx.opts.rebuild {
        if let Some(manifest) = crate::outputs::up_to_date(&ctx, &plan.disk, &final_dir) {
            progress.report("outputs", &manifest.input_hash, StageState::Cached, started)?;
            return Ok(BuildResult {
                output: final_dir,
                manifest,
                stages: progress.done,
            });
        }
    }
    let tmp_dir = ctx.opts.output_dir.join(format!(
        ".{}.partial-{}",
        ctx.profile.name,
        std::process::id()
    ));
    remove_tree(&tmp_dir)?;
    std::fs::create_dir_all(&tmp_dir).with_context(|| format!("creating {}", tmp_dir.display()))?;
    let manifest = match crate::outputs::write_all(&ctx, &plan.disk, &tmp_dir) {
        Ok(m) => m,
        Err(e) => {
            let _ = remove_tree(&tmp_dir);
            return Err(e.context("stage outputs failed"));
        }
    };
    remove_tree(&final_dir)?;
    std::fs::rename(&tmp_dir, &final_dir)?;
    progress.report("outputs", &manifest.input_hash, StageState::Built, started)?;

    Ok(BuildResult {
        output: final_dir,
        manifest,
        stages: progress.done,
    })
}
