use aiw_agent::modes::ModeTable;
use aiwimg::outputs::Format;
use aiwimg::pipeline::{self, BuildOptions};
use aiwimg::profile::{list_profiles, Profile};
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Builds immutable appliance OS images for aiWARE Anywhere nodes.
///
/// An image is a GPT disk: systemd-boot and a unified kernel image on the ESP,
/// a read-only erofs root under dm-verity, and a /var partition created at
/// first boot to fill the disk. At launch, cloud user-data such as
/// AIWARE_MODE=engine picks the node's role; aiw-agent inside does the rest.
#[derive(Parser)]
#[command(name = "aiwimg", version, propagate_version = true)]
struct Cli {
    /// The aiwimg project folder (holds images/, overlays/, agent/).
    /// Default: found from the current folder upwards, then beside the binary.
    #[arg(long, global = true, env = "AIWIMG_PROJECT")]
    project: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

// Parsed once per run: the size of the `build` variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Build the image of a node profile (needs root).
    ///
    /// Stages: tools tree, root filesystem, customize, initrd, disk, outputs.
    /// Each stage is cached under --cache-dir by the sha256 of its inputs, so a
    /// second build with nothing changed reuses everything. Output goes to
    /// OUTPUT_DIR/PROFILE/ only when the whole build succeeded.
    ///
    /// Example: aiwimg build --profile engine --formats raw,qcow2
    Build {
        /// Node profile: a file images/PROFILE.toml (see `aiwimg profiles`).
        #[arg(long, short)]
        profile: String,
        /// Where the image folder is written.
        #[arg(long, default_value = "out")]
        output_dir: PathBuf,
        /// Comma-separated: raw, qcow2, vmdk, vhd, gce, raw.zst, ova.
        #[arg(long, default_value = "raw,qcow2")]
        formats: String,
        /// Stage cache (tools tree, packages, root filesystems, disks).
        #[arg(long, default_value = "/var/cache/aiwimg", env = "AIWIMG_CACHE_DIR")]
        cache_dir: PathBuf,
        /// Debian mirror URL for the image and the tools tree; overrides the
        /// profile's `mirror`. Unset: mmdebstrap's own default mirror.
        #[arg(long, env = "AIWIMG_MIRROR")]
        mirror: Option<String>,
        /// Point a profile's third-party repository at another URL (a local
        /// mirror for air-gapped builds): NAME=URL, repeatable.
        #[arg(long = "repo-mirror", value_name = "NAME=URL")]
        repo_mirrors: Vec<String>,
        /// A registry the build may pull `[[container_images]] pull` images
        /// from without verifying TLS (plain HTTP or a self-signed
        /// certificate): HOST:PORT as in the image reference, repeatable. The
        /// digest in the reference still pins what is pulled.
        #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
        insecure_registries: Vec<String>,
        /// IMAGE_VERSION written to os-release and the file names.
        #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
        image_version: String,
        /// Install exactly the package versions of images/PROFILE.lock.
        #[arg(long)]
        locked: bool,
        /// Make every stage of this image again (all but the tools tree)
        /// instead of reusing the cache, replacing the cached entries. With the
        /// same inputs the new image is bit-identical (add --locked to pin the
        /// packages): the way to check that a build reproduces.
        #[arg(long)]
        rebuild: bool,
        /// Use this aiw-agent binary instead of building agent/.
        #[arg(long)]
        agent_bin: Option<PathBuf>,
        /// Print stage reports and the result as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// The update server the image's systemd-sysupdate reads (overrides
        /// the profile's `update_url`).
        #[arg(long)]
        update_url: Option<String>,
        /// The public key that must sign the server's SHA256SUMS (overrides
        /// the profile's `update_keyring`).
        #[arg(long)]
        update_keyring: Option<PathBuf>,
        /// Boots a new version gets before systemd-boot falls back to the
        /// previous one, 1-9 (overrides the profile's `update_tries`).
        #[arg(long)]
        update_tries: Option<u32>,
        /// Sign systemd-boot and the UKI for UEFI Secure Boot with this db
        /// private key (PEM, no passphrase; read once, never copied into the
        /// image, the cache or a log). Overrides the profile's `secure_boot_key`.
        #[arg(long, requires = "secure_boot_cert", env = "AIWIMG_SECURE_BOOT_KEY")]
        secure_boot_key: Option<PathBuf>,
        /// The db certificate (PEM or DER) that goes with --secure-boot-key:
        /// the one firmware must trust (README, "Secure Boot").
        #[arg(long, requires = "secure_boot_key", env = "AIWIMG_SECURE_BOOT_CERT")]
        secure_boot_cert: Option<PathBuf>,
        /// Whether systemd-boot enrolls the certificate as PK, KEK and db on a
        /// machine in setup mode: off (default), manual (a boot menu entry),
        /// if-safe (by itself, in VMs only), force (by itself, anywhere).
        #[arg(long, value_enum)]
        secure_boot_enroll: Option<aiwimg::secure_boot::Enroll>,
    },
    /// List the node profiles with their run modes.
    Profiles {
        #[arg(long)]
        json: bool,
    },
    /// Show an image's partitions, roothash and manifest.
    ///
    /// IMAGE is the folder `aiwimg build` wrote or any file in it. With
    /// --verify, recompute the dm-verity tree of the root partition and the
    /// sha256 of every output file; any mismatch fails.
    Inspect {
        image: PathBuf,
        #[arg(long)]
        verify: bool,
        #[arg(long)]
        json: bool,
    },
    /// Publish a built image to a cloud, or its update files to an update server.
    #[command(subcommand)]
    Publish(Publish),
    /// List or prune the stage cache.
    ///
    /// Builds evict least recently used entries by themselves when the disk is
    /// short; `prune` is for taking the space back by hand.
    #[command(subcommand)]
    Cache(CacheCommand),
}

#[derive(Subcommand)]
enum CacheCommand {
    /// Every cached stage artifact, least recently used first, with its size.
    List {
        #[arg(long, default_value = "/var/cache/aiwimg", env = "AIWIMG_CACHE_DIR")]
        cache_dir: PathBuf,
    },
    /// Remove least recently used entries until the cache is at most
    /// --max-size, or until its filesystem has --keep-free left (or both).
    /// Entries a running build uses are kept.
    ///
    /// Example: aiwimg cache prune --max-size 20G   (0 empties the cache)
    ///
    /// Example: aiwimg cache prune --keep-free 10G  (room for VM disks beside it)
    #[command(group(clap::ArgGroup::new("bound").required(true).multiple(true).args(["max_size", "keep_free"])))]
    Prune {
        #[arg(long, default_value = "/var/cache/aiwimg", env = "AIWIMG_CACHE_DIR")]
        cache_dir: PathBuf,
        /// Size to shrink to: bytes, or with K, M, G, T (powers of 1024).
        #[arg(long, value_parser = parse_size)]
        max_size: Option<u64>,
        /// Free space the cache's filesystem must have afterwards (same units).
        #[arg(long, value_parser = parse_size)]
        keep_free: Option<u64>,
    },
}

/// Bytes `cache prune` frees: enough to bring the cache (`total`) down to
/// `max_size` and the filesystem's `free` up to `keep_free`.
fn prune_target(total: u64, max_size: Option<u64>, free: u64, keep_free: Option<u64>) -> u64 {
    let for_size = max_size.map_or(0, |m| total.saturating_sub(m));
    let for_free = keep_free.map_or(0, |k| k.saturating_sub(free));
    for_size.max(for_free)
}

/// "20G", "512M", "0", "1073741824".
fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("{s:?}: the unit must be K, M, G or T")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size (try 20G)"))?;
    if n.is_nan() || n < 0.0 {
        return Err(format!("{s:?}: a size cannot be negative"));
    }
    Ok((n * mult as f64) as u64)
}

#[derive(Subcommand)]
enum Publish {
    /// Upload the raw disk into an EBS snapshot (EBS direct APIs) and
    /// register an AMI from it (UEFI, ENA, x86_64); prints the AMI id.
    ///
    /// Credentials: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN,
    /// else the AWS_PROFILE profile of ~/.aws/credentials and ~/.aws/config.
    /// An interrupted upload resumes when the same command is run again.
    ///
    /// Example: aiwimg publish aws --image out/engine --region us-east-1
    Aws {
        /// The folder `aiwimg build` wrote (built with the raw format).
        #[arg(long)]
        image: PathBuf,
        /// AWS region; default AWS_REGION, AWS_DEFAULT_REGION, the profile's.
        #[arg(long)]
        region: Option<String>,
        /// AMI name; default IMAGE_ID-VERSION-UTCTIME.
        #[arg(long)]
        name: Option<String>,
        /// Send EBS and EC2 calls here instead of AWS (a test double).
        #[arg(long, env = "AWS_ENDPOINT_URL")]
        endpoint_url: Option<String>,
        /// Blocks uploaded in parallel.
        #[arg(long, default_value_t = 16)]
        jobs: usize,
        /// Register the AMI with a NitroTPM 2.0 (TpmSupport=v2.0). Images
        /// whose /var is sealed to the TPM (engine-tpm, overlay var-tpm2)
        /// need it: without a TPM they boot without /var and do not join.
        #[arg(long)]
        tpm: bool,
    },
    /// Add a build's update files (root, verity, UKI; see the build's
    /// update/ folder) to an update folder a plain HTTP server serves, and
    /// sign its SHA256SUMS as SHA256SUMS.gpg.
    ///
    /// Files go to REPO/IMAGE_ID/, beside earlier versions'. Serve REPO at
    /// the profile's `update_url`. The key must be the one the image bakes
    /// (`update_keyring`); without --sign-key nodes refuse the update.
    ///
    /// Example: aiwimg publish update --image out/engine --repo /srv/aiware --sign-key release.key
    Update {
        /// The folder `aiwimg build` wrote.
        #[arg(long)]
        image: PathBuf,
        /// The update server's folder.
        #[arg(long)]
        repo: PathBuf,
        /// Secret OpenPGP key (gpg --export-secret-keys) to sign with.
        #[arg(long)]
        sign_key: Option<PathBuf>,
        /// File with the signing key's passphrase.
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
    },
}

fn find_project(given: Option<PathBuf>) -> Result<PathBuf> {
    let is_project = |p: &Path| p.join("images/modes.toml").is_file();
    if let Some(p) = given {
        if !is_project(&p) {
            bail!(
                "{} is not an aiwimg project (no images/modes.toml)",
                p.display()
            );
        }
        return Ok(p);
    }
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        candidates.extend(cwd.ancestors().map(Path::to_path_buf));
    }
    if let Ok(exe) = std::env::current_exe() {
        candidates.extend(exe.ancestors().map(Path::to_path_buf));
    }
    candidates
        .into_iter()
        .find(|p| is_project(p))
        .map(|p| p.canonicalize().unwrap_or(p))
        .context("cannot find the aiwimg project (a folder with images/modes.toml): run from inside it or pass --project")
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Build {
            profile,
            output_dir,
            formats,
            cache_dir,
            mirror,
            repo_mirrors,
            insecure_registries,
            image_version,
            locked,
            rebuild,
            agent_bin,
            json,
            update_url,
            update_keyring,
            update_tries,
            secure_boot_key,
            secure_boot_cert,
            secure_boot_enroll,
        } => {
            let project = find_project(cli.project)?;
            let mut mirrors = BTreeMap::new();
            for rm in repo_mirrors {
                let (n, u) = rm
                    .split_once('=')
                    .with_context(|| format!("--repo-mirror {rm:?}: expected NAME=URL"))?;
                mirrors.insert(n.to_string(), u.to_string());
            }
            // No '_' or '+': systemd-sysupdate splits names on them.
            if image_version.is_empty() || image_version.contains(['/', ' ', '_', '+']) {
                bail!("--image-version {image_version:?}: use letters, digits, dots and dashes");
            }
            let opts = BuildOptions {
                project,
                profile,
                output_dir,
                formats: Format::parse_list(&formats)?,
                cache_dir,
                mirror,
                image_version,
                locked,
                rebuild,
                agent_bin,
                repo_mirrors: mirrors,
                insecure_registries,
                json,
                update_url,
                update_keyring,
                update_tries,
                secure_boot_key,
                secure_boot_cert,
                secure_boot_enroll,
            };
            let started = std::time::Instant::now();
            let r = pipeline::build(opts)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "output": r.output,
                        "seconds": started.elapsed().as_secs_f64(),
                        "stages": r.stages,
                        "manifest": r.manifest,
                    })
                );
            } else {
                eprintln!(
                    "built {} {} in {:.1}s -> {}",
                    r.manifest.image_id,
                    r.manifest.version,
                    started.elapsed().as_secs_f64(),
                    r.output.display()
                );
                for f in &r.manifest.files {
                    eprintln!("  {:<40} {:>10}", f.name, aiwimg::inspect::human(f.size));
                }
                eprintln!("  roothash {}", r.manifest.roothash);
            }
            Ok(())
        }
        Command::Profiles { json } => {
            let project = find_project(cli.project)?;
            let images = project.join("images");
            let modes = ModeTable::load(&images.join("modes.toml"))?;
            let mut rows = Vec::new();
            for name in list_profiles(&images)? {
                rows.push(Profile::load(&images, &name, &modes)?);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!("{:<12} {:<52} description", "profile", "run modes");
                for p in rows {
                    let m = if p.modes.is_empty() {
                        "-".to_string()
                    } else {
                        p.modes.join(",")
                    };
                    println!("{:<12} {:<52} {}", p.name, m, p.description);
                }
            }
            Ok(())
        }
        Command::Inspect {
            image,
            verify,
            json,
        } => aiwimg::inspect::run(&image, verify, json),
        Command::Cache(CacheCommand::List { cache_dir }) => {
            let cache = aiwimg::cache::Cache::new(cache_dir)?;
            let entries = cache.entries()?;
            println!("{:<10} {:<14} {:>10}  last used", "stage", "key", "size");
            let mut total = 0;
            for e in &entries {
                total += e.size;
                let when = aiwimg::host::ago(e.last_used);
                println!(
                    "{:<10} {:<14} {:>10}  {when}",
                    e.stage,
                    &e.key[..12.min(e.key.len())],
                    aiwimg::inspect::human(e.size)
                );
            }
            println!(
                "{} entries, {} in {}",
                entries.len(),
                aiwimg::inspect::human(total),
                cache.root.display()
            );
            Ok(())
        }
        Command::Cache(CacheCommand::Prune {
            cache_dir,
            max_size,
            keep_free,
        }) => {
            let free = aiwimg::host::free_space(&cache_dir)?;
            let cache = aiwimg::cache::Cache::new(cache_dir)?;
            let total: u64 = cache.entries()?.iter().map(|e| e.size).sum();
            let want = prune_target(total, max_size, free, keep_free);
            let freed = cache.make_room(want, &[], |e| {
                println!(
                    "removed {}/{} ({})",
                    e.stage,
                    &e.key[..12.min(e.key.len())],
                    aiwimg::inspect::human(e.size)
                )
            })?;
            let left: u64 = cache.entries()?.iter().map(|e| e.size).sum();
            println!(
                "freed {}; the cache now holds {}{}",
                aiwimg::inspect::human(freed),
                aiwimg::inspect::human(left),
                if freed < want {
                    " (entries a running build uses were kept)"
                } else {
                    ""
                }
            );
            if let Some(k) = keep_free {
                let now = aiwimg::host::free_space(&cache.root)?;
                if now < k {
                    anyhow::bail!(
                        "{} has {} free after pruning, less than --keep-free {}: \
                         what fills the disk is not in the cache",
                        cache.root.display(),
                        aiwimg::inspect::human(now),
                        aiwimg::inspect::human(k)
                    );
                }
            }
            Ok(())
        }
        Command::Publish(Publish::Aws {
            image,
            region,
            name,
            endpoint_url,
            jobs,
            tpm,
        }) => {
            let ami = aiwimg::publish::aws::publish(&aiwimg::publish::aws::PublishOptions {
                image,
                region,
                name,
                endpoint_url,
                jobs,
                tpm,
            })?;
            println!("{ami}");
            Ok(())
        }
        Command::Publish(Publish::Update {
            image,
            repo,
            sign_key,
            passphrase_file,
        }) => {
            let p = aiwimg::publish::update::publish(&aiwimg::publish::update::PublishOptions {
                image,
                repo,
                sign_key,
                passphrase_file,
            })?;
            eprintln!(
                "published {} to {} ({} new files, {})",
                p.version,
                p.dir.display(),
                p.added.len(),
                match &p.signed_by {
                    Some(f) => format!("SHA256SUMS signed by {f}"),
                    None => "SHA256SUMS unsigned".into(),
                }
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_size, prune_target};

    #[test]
    fn prune_frees_what_the_larger_bound_asks() {
        const G: u64 = 1 << 30;
        assert_eq!(prune_target(30 * G, Some(20 * G), 50 * G, None), 10 * G);
        assert_eq!(prune_target(30 * G, None, 4 * G, Some(10 * G)), 6 * G);
        assert_eq!(
            prune_target(30 * G, Some(28 * G), 4 * G, Some(10 * G)),
            6 * G
        );
        assert_eq!(prune_target(30 * G, Some(40 * G), 50 * G, Some(10 * G)), 0);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("20G"), Ok(20 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("1.5K"), Ok(1536));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("20X").unwrap_err().contains("unit"));
        assert!(parse_size("-1G").unwrap_err().contains("negative"));
        assert!(parse_size("lots").is_err());
    }
}
