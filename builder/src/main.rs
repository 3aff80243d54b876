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
        /// IMAGE_VERSION written to os-release and the file names.
        #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
        image_version: String,
        /// Install exactly the package versions of images/PROFILE.lock.
        #[arg(long)]
        locked: bool,
        /// Use this aiw-agent binary instead of building agent/.
        #[arg(long)]
        agent_bin: Option<PathBuf>,
        /// Print stage reports and the result as JSON on stdout.
        #[arg(long)]
        json: bool,
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
    /// Publish a built image to a cloud.
    #[command(subcommand)]
    Publish(Publish),
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
            image_version,
            locked,
            agent_bin,
            json,
        } => {
            let project = find_project(cli.project)?;
            let mut mirrors = BTreeMap::new();
            for rm in repo_mirrors {
                let (n, u) = rm
                    .split_once('=')
                    .with_context(|| format!("--repo-mirror {rm:?}: expected NAME=URL"))?;
                mirrors.insert(n.to_string(), u.to_string());
            }
            if image_version.is_empty() || image_version.contains(['/', ' ', '_']) {
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
                agent_bin,
                repo_mirrors: mirrors,
                json,
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
        Command::Publish(Publish::Aws {
            image,
            region,
            name,
            endpoint_url,
            jobs,
        }) => {
            let ami = aiwimg::publish::aws::publish(&aiwimg::publish::aws::PublishOptions {
                image,
                region,
                name,
                endpoint_url,
                jobs,
            })?;
            println!("{ami}");
            Ok(())
        }
    }
}
