//! Node profiles: `images/<name>.toml`, with `extends = [...]` chains.
//!
//! A profile file says what to add to its parents; [`Profile::load`] resolves
//! the chain into one flat [`Profile`] that the pipeline reads. Lists append
//! (parents first, duplicates dropped), scalars override (the child wins).

use aiw_agent::modes::{ModeTable, KNOWN_MODES};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// One profile file as written. Every key is optional so that a child can
/// name only what it changes.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileFile {
    /// One line for `aiwimg profiles`.
    pub description: Option<String>,
    /// Profiles this one builds on, resolved first, in order.
    #[serde(default)]
    pub extends: Vec<String>,
    /// Run modes baked into the image (rows of `images/modes.toml`).
    #[serde(default)]
    pub modes: Vec<String>,
    /// Debian packages beyond those the modes need.
    #[serde(default)]
    pub packages: Vec<String>,
    /// Debian mirror; unset means mmdebstrap's own default.
    pub mirror: Option<String>,
    /// Debian suite of the image.
    pub suite: Option<String>,
    /// Archive components (main, contrib, non-free, non-free-firmware).
    #[serde(default)]
    pub components: Vec<String>,
    /// Folders under `overlays/` copied into the image, in order.
    #[serde(default)]
    pub overlays: Vec<String>,
    /// Kernel command line words added to the UKI (the roothash is added by the build).
    #[serde(default)]
    pub kernel_cmdline: Vec<String>,
    /// Timestamp for reproducible package installs and file times.
    pub source_date_epoch: Option<u64>,
    /// mkfs.erofs compression of the root, e.g. "lz4", "zstd,3".
    pub root_compression: Option<String>,
    /// Size of the EFI system partition in MiB (it must hold two UKIs).
    pub esp_size_mib: Option<u64>,
    /// Size in MiB of each root slot (A and B are equal): fixed for the life
    /// of a disk, so every later version's root must fit it.
    pub root_slot_mib: Option<u64>,
    /// Base URL of the update server; the node fetches `<url>/<IMAGE_ID>/`.
    pub update_url: Option<String>,
    /// OpenPGP public key (armored or binary, relative to `images/`) that
    /// signs the update server's SHA256SUMS; baked in as the node's keyring.
    pub update_keyring: Option<String>,
    /// Boot tries of a newly installed version before systemd-boot falls back.
    pub update_tries: Option<u32>,
    /// Image carries the NVIDIA driver and container runtime.
    pub gpu: Option<bool>,
    /// UEFI Secure Boot: `true` refuses to build the image unsigned. The key
    /// and certificate come from `--secure-boot-key/--secure-boot-cert` or
    /// from the two keys below (paths relative to `images/`).
    pub secure_boot: Option<bool>,
    pub secure_boot_key: Option<String>,
    pub secure_boot_cert: Option<String>,
    /// loader.conf's `secure-boot-enroll` (off, manual, if-safe, force).
    pub secure_boot_enroll: Option<crate::secure_boot::Enroll>,
    /// Third-party apt repositories, each with a key pinned by fingerprint.
    #[serde(default)]
    pub repositories: Vec<Repository>,
    /// Package name patterns needed only to build the image (compilers,
    /// kernel headers, dkms): purged at the end of the rootfs stage.
    #[serde(default)]
    pub build_only: Vec<String>,
    /// Kernel modules the image must carry, built for the image's own kernel
    /// (checked by vermagic at the end of the rootfs stage).
    #[serde(default)]
    pub required_modules: Vec<String>,
    /// Docker's default runtime (e.g. "nvidia"); unset keeps runc.
    pub docker_default_runtime: Option<String>,
    /// The vendor's `aiware-agent` binary to bake at /usr/local/bin/aiware-agent:
    /// aiw-agent then configures the node and starts `aiware-agent.service`
    /// instead of joining the controller itself.
    pub vendor_agent: Option<VendorAgent>,
    /// Container images baked in, loaded into Docker at first boot
    /// (air-gapped nodes): from docker-save or OCI archive files, or pulled
    /// at build time from a registry, pinned by digest.
    #[serde(default)]
    pub container_images: Vec<ContainerImageEntry>,
}

/// One `[[container_images]]` entry as written: either `archive` + `sha256`
/// (+ `image_id`), or `pull` (+ `tag`, `image_id`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerImageEntry {
    #[serde(default)]
    pub archive: Option<PathBuf>,
    #[serde(default)]
    pub sha256: Option<String>,
    #[serde(default)]
    pub image_id: Option<String>,
    #[serde(default)]
    pub pull: Option<String>,
    #[serde(default)]
    pub tag: Option<String>,
}

/// `[[container_images]] pull = "NAME:TAG@sha256:…"`: pulled at build time
/// (`stages::registry`), then baked like an archive.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RegistryImage {
    /// A reference pinned by its manifest digest.
    pub pull: String,
    /// The name the image has in Docker on the node; default: the
    /// reference's own NAME:TAG.
    pub tag: Option<String>,
    /// The image's config digest, checked when given.
    pub image_id: Option<String>,
}

/// `vendor_agent = { binary = "...", sha256 = "..." }`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VendorAgent {
    /// A local file; a relative path is relative to `images/`.
    pub binary: PathBuf,
    /// sha256 the file must have (64 hex digits).
    pub sha256: String,
}

/// An archive to bake: a `[[container_images]] archive` entry, or a pulled image.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ContainerImage {
    /// A `docker save` or OCI image-layout tar; a relative path is relative to `images/`.
    pub archive: PathBuf,
    /// sha256 the archive file must have (64 hex digits).
    pub sha256: String,
    /// The image's config digest, `sha256:<64 hex>` (`docker image inspect -f
    /// '{{.Id}}'`): required for a docker-save archive, checked when given for OCI.
    pub image_id: Option<String>,
    /// The pinned reference it was pulled from (`pull` entries only).
    pub pulled_from: Option<String>,
}

/// A third-party apt repository.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Repository {
    /// Short name, used by `--repo-mirror NAME=URL`.
    pub name: String,
    /// Base URL of the repository (a `deb` line's URI). May be left out when
    /// every build must name its own copy with `--repo-mirror NAME=URL`.
    #[serde(default)]
    pub url: Option<String>,
    /// What the repository is, for error messages.
    #[serde(default)]
    pub description: Option<String>,
    /// Suite, or for flat repositories the path ending in `/`.
    pub suite: String,
    #[serde(default)]
    pub components: Vec<String>,
    /// Armored or binary OpenPGP key, path relative to `images/`.
    pub key: String,
    /// Fingerprint the key must have (40 hex digits, spaces allowed).
    pub fingerprint: String,
}

/// Each root slot unless a profile says otherwise: room for a root several
/// times today's (300-600 MiB), since the slots cannot grow later.
pub const DEFAULT_ROOT_SLOT_MIB: u64 = 2048;
/// Placeholder (the `.invalid` domain never resolves): a profile or the
/// node's launch data names the real server.
pub const DEFAULT_UPDATE_URL: &str = "http://update.invalid/aiware";

/// A resolved profile: the chain flattened, modes' packages added.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Profile {
    pub name: String,
    pub description: String,
    /// The chain that made it, root first.
    pub chain: Vec<String>,
    pub modes: Vec<String>,
    /// Packages to install: the profile's own and its modes', sorted.
    pub packages: Vec<String>,
    pub mirror: Option<String>,
    pub suite: String,
    pub components: Vec<String>,
    pub overlays: Vec<String>,
    pub kernel_cmdline: Vec<String>,
    pub source_date_epoch: u64,
    pub root_compression: String,
    pub esp_size_mib: u64,
    pub root_slot_mib: u64,
    pub update_url: String,
    /// Resolved against `images/`; unset bakes an empty keyring (every
    /// update is refused).
    pub update_keyring: Option<PathBuf>,
    pub update_tries: u32,
    pub gpu: bool,
    /// Refuse an unsigned build.
    pub secure_boot: bool,
    /// Resolved against `images/`.
    pub secure_boot_key: Option<PathBuf>,
    pub secure_boot_cert: Option<PathBuf>,
    pub secure_boot_enroll: Option<crate::secure_boot::Enroll>,
    pub repositories: Vec<Repository>,
    pub build_only: Vec<String>,
    pub required_modules: Vec<String>,
    pub docker_default_runtime: Option<String>,
    /// Paths resolved against `images/`.
    pub vendor_agent: Option<VendorAgent>,
    /// Paths resolved against `images/`; parents' first, one per sha256.
    /// Pulled images join them when the build resolves `registry_images`.
    pub container_images: Vec<ContainerImage>,
    /// `pull` entries, parents' first, one per reference.
    pub registry_images: Vec<RegistryImage>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("unknown profile {name:?}; known profiles: {}", known.join(", "))]
    Unknown { name: String, known: Vec<String> },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("profile `extends` cycle: {}", chain.join(" -> "))]
    Cycle { chain: Vec<String> },
}

impl Profile {
    /// Loads `images/<name>.toml` and everything it extends.
    pub fn load(images_dir: &Path, name: &str, modes: &ModeTable) -> Result<Profile, ProfileError> {
        let mut files = Vec::new();
        let mut stack = Vec::new();
        collect_chain(images_dir, name, &mut stack, &mut files)?;
        let path_of = |n: &str| images_dir.join(format!("{n}.toml"));

        let mut p = Profile {
            name: name.to_string(),
            description: String::new(),
            chain: Vec::new(),
            modes: Vec::new(),
            packages: Vec::new(),
            mirror: None,
            suite: "trixie".into(),
            components: Vec::new(),
            overlays: Vec::new(),
            kernel_cmdline: Vec::new(),
            source_date_epoch: 0,
            root_compression: "lz4hc,9".into(),
            esp_size_mib: 128,
            root_slot_mib: DEFAULT_ROOT_SLOT_MIB,
            update_url: DEFAULT_UPDATE_URL.into(),
            update_keyring: None,
            update_tries: 3,
            gpu: false,
            secure_boot: false,
            secure_boot_key: None,
            secure_boot_cert: None,
            secure_boot_enroll: None,
            repositories: Vec::new(),
            build_only: Vec::new(),
            required_modules: Vec::new(),
            docker_default_runtime: None,
            vendor_agent: None,
            container_images: Vec::new(),
            registry_images: Vec::new(),
        };
        for (fname, f) in files {
            p.chain.push(fname.clone());
            if let Some(d) = f.description {
                p.description = d;
            }
            append_unique(&mut p.modes, f.modes);
            append_unique(&mut p.packages, f.packages);
            append_unique(&mut p.components, f.components);
            append_unique(&mut p.overlays, f.overlays);
            append_unique(&mut p.kernel_cmdline, f.kernel_cmdline);
            p.mirror = f.mirror.or(p.mirror);
            p.suite = f.suite.unwrap_or(p.suite);
            p.source_date_epoch = f.source_date_epoch.unwrap_or(p.source_date_epoch);
            p.root_compression = f.root_compression.unwrap_or(p.root_compression);
            p.esp_size_mib = f.esp_size_mib.unwrap_or(p.esp_size_mib);
            p.root_slot_mib = f.root_slot_mib.unwrap_or(p.root_slot_mib);
            p.update_url = f.update_url.unwrap_or(p.update_url);
            p.update_tries = f.update_tries.unwrap_or(p.update_tries);
            if let Some(k) = f.update_keyring {
                p.update_keyring = Some(images_dir.join(k));
            }
            p.gpu = f.gpu.unwrap_or(p.gpu);
            p.secure_boot = f.secure_boot.unwrap_or(p.secure_boot);
            if let Some(k) = f.secure_boot_key {
                p.secure_boot_key = Some(images_dir.join(k));
            }
            if let Some(c) = f.secure_boot_cert {
                p.secure_boot_cert = Some(images_dir.join(c));
            }
            p.secure_boot_enroll = f.secure_boot_enroll.or(p.secure_boot_enroll);
            append_unique(&mut p.build_only, f.build_only);
            append_unique(&mut p.required_modules, f.required_modules);
            p.docker_default_runtime = f.docker_default_runtime.or(p.docker_default_runtime);
            let invalid = |message: String| ProfileError::Invalid {
                path: path_of(&fname),
                message,
            };
            if let Some(mut v) = f.vendor_agent {
                check_sha256(&v.sha256)
                    .map_err(|m| invalid(format!("key `vendor_agent`: sha256 {m}")))?;
                v.binary = images_dir.join(&v.binary);
                p.vendor_agent = Some(v);
            }
            for c in f.container_images {
                match entry(c, images_dir).map_err(invalid)? {
                    Baked::Archive(c) => {
                        p.container_images.retain(|x| x.sha256 != c.sha256);
                        p.container_images.push(c);
                    }
                    Baked::Pull(r) => {
                        p.registry_images.retain(|x| x.pull != r.pull);
                        p.registry_images.push(r);
                    }
                }
            }
            for repo in f.repositories {
                let invalid = |message: String| ProfileError::Invalid {
                    path: path_of(&fname),
                    message,
                };
                check_fingerprint(&repo.fingerprint).map_err(|m| {
                    invalid(format!("[[repositories]] {}: fingerprint {m}", repo.name))
                })?;
                p.repositories.retain(|r| r.name != repo.name);
                p.repositories.push(repo);
            }
        }
        let own = path_of(name);
        for m in &p.modes {
            if !KNOWN_MODES.contains(&m.as_str()) {
                return Err(ProfileError::Invalid {
                    path: own,
                    message: format!(
                        "key `modes`: unknown run mode {m:?}; run modes are {}",
                        KNOWN_MODES.join(", ")
                    ),
                });
            }
        }
        for m in &p.modes {
            for req in &modes.get(m).map(|s| s.requires.clone()).unwrap_or_default() {
                if !p.modes.contains(req) {
                    return Err(ProfileError::Invalid {
                        path: own,
                        message: format!("key `modes`: mode {m:?} requires mode {req:?}, add it"),
                    });
                }
            }
        }
        if !(p.update_url.starts_with("http://") || p.update_url.starts_with("https://"))
            || p.update_url.contains(char::is_whitespace)
        {
            return Err(ProfileError::Invalid {
                path: own,
                message: format!("key `update_url`: {:?} is not an http(s) URL", p.update_url),
            });
        }
        if !(1..=9).contains(&p.update_tries) {
            return Err(ProfileError::Invalid {
                path: own,
                message: format!("key `update_tries`: {} is not 1..9", p.update_tries),
            });
        }
        if p.root_slot_mib < 64 {
            return Err(ProfileError::Invalid {
                path: own,
                message: format!("key `root_slot_mib`: {} MiB is too small", p.root_slot_mib),
            });
        }
        if p.components.is_empty() {
            p.components.push("main".into());
        }
        if p.description.is_empty() {
            return Err(ProfileError::Invalid {
                path: own,
                message: "key `description` is missing (here or in a profile it extends)".into(),
            });
        }
        p.modes.sort();
        // Each baked mode brings its overlay `overlays/mode-<mode>/` when there
        // is one: the /etc files of its packages, pointed at /run and /var.
        if let Some(project) = images_dir.parent() {
            let mode_overlays: Vec<String> = p
                .modes
                .iter()
                .map(|m| format!("mode-{m}"))
                .filter(|o| project.join("overlays").join(o).is_dir())
                .collect();
            append_unique(&mut p.overlays, mode_overlays);
        }
        let mode_pkgs = modes.packages_for(p.modes.iter().map(String::as_str));
        append_unique(&mut p.packages, mode_pkgs);
        p.packages.sort();
        Ok(p)
    }
}

/// Profile names in `images/` (every `*.toml` but the mode table), sorted.
pub fn list_profiles(images_dir: &Path) -> std::io::Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(images_dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "toml") {
            let stem = path.file_stem().unwrap().to_string_lossy().to_string();
            if stem != "modes" {
                out.push(stem);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn collect_chain(
    images_dir: &Path,
    name: &str,
    stack: &mut Vec<String>,
    out: &mut Vec<(String, ProfileFile)>,
) -> Result<(), ProfileError> {
    if stack.iter().any(|s| s == name) {
        let mut chain = stack.clone();
        chain.push(name.to_string());
        return Err(ProfileError::Cycle { chain });
    }
    if out.iter().any(|(n, _)| n == name) {
        return Ok(()); // diamond: already merged through another parent
    }
    let path = images_dir.join(format!("{name}.toml"));
    if name == "modes" || name.contains('/') || !path.is_file() {
        return Err(ProfileError::Unknown {
            name: name.to_string(),
            known: list_profiles(images_dir).unwrap_or_default(),
        });
    }
    let text = std::fs::read_to_string(&path).map_err(|source| ProfileError::Read {
        path: path.clone(),
        source,
    })?;
    let file: ProfileFile = toml::from_str(&text).map_err(|e| ProfileError::Invalid {
        path: path.clone(),
        message: e.to_string().trim_end().to_string(),
    })?;
    stack.push(name.to_string());
    for parent in &file.extends {
        collect_chain(images_dir, parent, stack, out).map_err(|e| match e {
            ProfileError::Unknown { name: n, known } => ProfileError::Invalid {
                path: path.clone(),
                message: format!(
                    "key `extends`: unknown profile {n:?}; known profiles: {}",
                    known.join(", ")
                ),
            },
            other => other,
        })?;
    }
    stack.pop();
    out.push((name.to_string(), file));
    Ok(())
}

fn append_unique(into: &mut Vec<String>, items: Vec<String>) {
    let mut seen: BTreeSet<String> = into.iter().cloned().collect();
    for i in items {
        if seen.insert(i.clone()) {
            into.push(i);
        }
    }
}

/// 64 lower-case hex digits.
enum Baked {
    Archive(ContainerImage),
    Pull(RegistryImage),
}

/// Checks one `[[container_images]]` entry: an archive or a pull, never both.
fn entry(c: ContainerImageEntry, images_dir: &Path) -> Result<Baked, String> {
    let name = match (&c.archive, &c.pull) {
        (Some(a), None) => a.display().to_string(),
        (None, Some(p)) => p.clone(),
        _ => {
            return Err(
                "[[container_images]]: give either archive = \"FILE\" (with sha256) or \
                 pull = \"NAME:TAG@sha256:…\""
                    .into(),
            )
        }
    };
    if let Some(id) = &c.image_id {
        check_sha256(id.strip_prefix("sha256:").unwrap_or("")).map_err(|_| {
            format!("[[container_images]] {name}: image_id {id:?} is not sha256:<64 hex digits>")
        })?;
    }
    if let Some(pull) = c.pull {
        if c.sha256.is_some() {
            return Err(format!(
                "[[container_images]] {name}: a pulled image is pinned by the digest in `pull`; \
                 `sha256` is for archive files"
            ));
        }
        crate::image_ref::Pinned::parse(&pull)
            .map_err(|e| format!("[[container_images]] pull: {e}"))?;
        return Ok(Baked::Pull(RegistryImage {
            pull,
            tag: c.tag,
            image_id: c.image_id,
        }));
    }
    if c.tag.is_some() {
        return Err(format!(
            "[[container_images]] {name}: `tag` is for pulled images; an archive names its own"
        ));
    }
    let sha256 = c
        .sha256
        .ok_or_else(|| format!("[[container_images]] {name}: sha256 of the file is missing"))?;
    check_sha256(&sha256).map_err(|m| format!("[[container_images]] {name}: sha256 {m}"))?;
    Ok(Baked::Archive(ContainerImage {
        archive: images_dir.join(c.archive.unwrap_or_default()),
        sha256,
        image_id: c.image_id,
        pulled_from: None,
    }))
}

fn check_sha256(s: &str) -> Result<(), String> {
    if s.len() == 64
        && s.chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    {
        Ok(())
    } else {
        Err(format!("{s:?} is not 64 lower-case hex digits"))
    }
}

fn check_fingerprint(fpr: &str) -> Result<(), String> {
    let hex: String = fpr.chars().filter(|c| !c.is_whitespace()).collect();
    if hex.len() == 40 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(format!("{fpr:?} is not 40 hex digits"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> ModeTable {
        ModeTable::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/modes.toml"))
            .unwrap()
    }

    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(d.path().join(format!("{name}.toml")), text).unwrap();
        }
        d
    }

    #[test]
    fn repo_profiles_all_resolve() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images");
        let names = list_profiles(&dir).unwrap();
        for want in [
            "base",
            "controller",
            "engine",
            "engine-gpu",
            "coreless",
            "anywhere",
        ] {
            assert!(
                names.contains(&want.to_string()),
                "{want} missing: {names:?}"
            );
        }
        for n in names {
            Profile::load(&dir, &n, &table()).unwrap_or_else(|e| panic!("{n}: {e}"));
        }
        let any = Profile::load(&dir, "anywhere", &table()).unwrap();
        assert_eq!(any.modes.len(), 12);
        let eng = Profile::load(&dir, "engine", &table()).unwrap();
        assert_eq!(eng.modes, vec!["engine"]);
        assert!(eng.packages.contains(&"docker.io".to_string()));
        assert!(eng.packages.contains(&"linux-image-amd64".to_string()));
    }

    #[test]
    fn extends_merges_lists_and_overrides_scalars() {
        let d = dir_with(&[
            (
                "a",
                "description='a'\npackages=['x','y']\nsuite='trixie'\nesp_size_mib=64\noverlays=['base']",
            ),
            ("b", "extends=['a']\npackages=['y','z']\nesp_size_mib=96\nmodes=['db']\noverlays=['db','base']"),
        ]);
        let p = Profile::load(d.path(), "b", &table()).unwrap();
        assert_eq!(p.chain, vec!["a", "b"]);
        assert_eq!(p.description, "a");
        assert_eq!(p.esp_size_mib, 96);
        assert_eq!(p.overlays, vec!["base", "db"]);
        for pkg in ["x", "y", "z", "postgresql", "openssh-server"] {
            assert!(p.packages.contains(&pkg.to_string()), "{pkg}");
        }
        assert_eq!(p.packages.iter().filter(|x| *x == "y").count(), 1);
    }

    #[test]
    fn misspelt_key_names_file_key_and_allowed_keys() {
        let d = dir_with(&[("p", "description='p'\npakages=['x']\n")]);
        let e = Profile::load(d.path(), "p", &table())
            .unwrap_err()
            .to_string();
        assert!(e.contains("p.toml"), "{e}");
        assert!(e.contains("unknown field `pakages`"), "{e}");
        assert!(e.contains("`packages`"), "allowed keys listed: {e}");
    }

    #[test]
    fn unknown_profile_lists_known_ones() {
        let d = dir_with(&[("alpha", "description='a'"), ("beta", "description='b'")]);
        let e = Profile::load(d.path(), "gamma", &table())
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"gamma\"") && e.contains("alpha, beta"), "{e}");
        let d = dir_with(&[("c", "description='c'\nextends=['nope']")]);
        let e = Profile::load(d.path(), "c", &table())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("c.toml") && e.contains("extends") && e.contains("nope"),
            "{e}"
        );
    }

    #[test]
    fn extends_cycle_is_reported_with_its_path() {
        let d = dir_with(&[
            ("a", "description='a'\nextends=['b']"),
            ("b", "extends=['c']"),
            ("c", "extends=['a']"),
        ]);
        let e = Profile::load(d.path(), "a", &table())
            .unwrap_err()
            .to_string();
        assert!(e.contains("a -> b -> c -> a"), "{e}");
    }

    #[test]
    fn vendor_agent_and_container_images_resolve_against_images() {
        let sha = "ab".repeat(32);
        let d = dir_with(&[
            (
                "a",
                &format!("description='a'\n[[container_images]]\narchive='x.tar'\nsha256='{sha}'\nimage_id='sha256:{sha}'"),
            ),
            (
                "b",
                &format!("extends=['a']\nvendor_agent={{binary='bin/aiware-agent', sha256='{sha}'}}\n[[container_images]]\narchive='/abs/y.tar'\nsha256='{}'", "cd".repeat(32)),
            ),
        ]);
        let p = Profile::load(d.path(), "b", &table()).unwrap();
        let v = p.vendor_agent.unwrap();
        assert_eq!(v.binary, d.path().join("bin/aiware-agent"));
        assert_eq!(p.container_images.len(), 2);
        assert_eq!(p.container_images[0].archive, d.path().join("x.tar"));
        assert_eq!(p.container_images[1].archive, Path::new("/abs/y.tar"));
        assert_eq!(p.container_images[1].image_id, None);
        let a = Profile::load(d.path(), "a", &table()).unwrap();
        assert!(a.vendor_agent.is_none());

        let d = dir_with(&[(
            "p",
            "description='p'\n[[container_images]]\narchive='x.tar'\nsha256='ABC'",
        )]);
        let e = Profile::load(d.path(), "p", &table())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("container_images") && e.contains("64 lower-case hex"),
            "{e}"
        );
        let d = dir_with(&[(
            "p",
            &format!("description='p'\n[[container_images]]\narchive='x.tar'\nsha256='{sha}'\nimage_id='{sha}'"),
        )]);
        let e = Profile::load(d.path(), "p", &table())
            .unwrap_err()
            .to_string();
        assert!(e.contains("image_id") && e.contains("sha256:<64"), "{e}");
    }

    #[test]
    fn pulled_images_are_pinned_by_digest_and_never_mixed_with_archives() {
        let sha = "ab".repeat(32);
        let r = format!("127.0.0.1:5000/aiware/c:1@sha256:{sha}");
        let d = dir_with(&[
            (
                "a",
                &format!("description='a'\n[[container_images]]\npull='{r}'\ntag='aiware/c:1'"),
            ),
            // The child names the same reference again: one entry, the child's.
            (
                "b",
                &format!("extends=['a']\n[[container_images]]\npull='{r}'"),
            ),
        ]);
        let a = Profile::load(d.path(), "a", &table()).unwrap();
        assert_eq!(a.registry_images.len(), 1);
        assert_eq!(a.registry_images[0].tag.as_deref(), Some("aiware/c:1"));
        assert!(a.container_images.is_empty());
        let b = Profile::load(d.path(), "b", &table()).unwrap();
        assert_eq!(b.registry_images.len(), 1);
        assert_eq!(b.registry_images[0].tag, None);

        for (body, want) in [
            ("pull='x/y:1'".to_string(), "not pinned by digest"),
            (
                format!("pull='{r}'\nsha256='{sha}'"),
                "`sha256` is for archive files",
            ),
            (format!("archive='x.tar'\npull='{r}'"), "either archive"),
            ("tag='x:1'".to_string(), "either archive"),
            (
                format!("archive='x.tar'\nsha256='{sha}'\ntag='x:1'"),
                "`tag` is for pulled",
            ),
            (
                "archive='x.tar'".to_string(),
                "sha256 of the file is missing",
            ),
        ] {
            let d = dir_with(&[(
                "p",
                &format!("description='p'\n[[container_images]]\n{body}"),
            )]);
            let e = Profile::load(d.path(), "p", &table())
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{body}: {e}");
        }
    }

    #[test]
    fn unknown_mode_and_bad_fingerprint_are_errors() {
        let d = dir_with(&[("p", "description='p'\nmodes=['engine','ftp']")]);
        let e = Profile::load(d.path(), "p", &table())
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown run mode \"ftp\""), "{e}");
        let d = dir_with(&[(
            "p",
            "description='p'\n[[repositories]]\nname='r'\nurl='http://127.0.0.1/'\nsuite='./'\nkey='k.asc'\nfingerprint='ABCD'",
        )]);
        let e = Profile::load(d.path(), "p", &table())
            .unwrap_err()
            .to_string();
        assert!(e.contains("fingerprint") && e.contains("40 hex"), "{e}");
    }
}
