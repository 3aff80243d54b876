//! What the build host must have, checked before any slow stage so a missing
//! tool or a full disk is reported at once, with the fix.

use crate::cache::Slot;
use crate::outputs::Format;
use crate::pipeline::{BuildContext, BuildOptions, Needed, Plan};
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// Room a stage needs while it is built (its artifact plus temporary copies),
/// on the generous side of what the largest profile (anywhere) uses: tools
/// tree 0.3 GiB; rootfs tree 1.1 GiB plus packages being unpacked; customize
/// copies the tree (1.1 GiB) and packs it (0.6 GiB); the disk is sparse.
fn stage_space(stage: &str) -> u64 {
    match stage {
        "tools" => 700 * MIB,
        "rootfs" => 2 * GIB,
        "customize" => 2 * GIB,
        "initrd" => 200 * MIB,
        "disk" => 900 * MIB,
        _ => GIB,
    }
}

/// Room one output format needs (the raw disk is sparse, about 0.7 GiB used;
/// the compressed ones pass through a temporary file).
fn output_space(f: Format) -> u64 {
    match f {
        Format::Raw | Format::Vhd => 900 * MIB,
        Format::Qcow2 | Format::Vmdk | Format::RawZst => 700 * MIB,
        Format::Gce | Format::Ova => 1400 * MIB,
    }
}

pub fn check_build_host(opts: &BuildOptions) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "aiwimg build must run as root: it runs mmdebstrap, chroot and mounts. \
             Run it with sudo, or as root."
        );
    }
    need_tool("mmdebstrap", "mmdebstrap")?;
    need_tool("unshare", "util-linux")?;
    need_tool("dpkg-query", "dpkg")?;
    if opts.formats.iter().any(|f| f.needs_qemu_img()) {
        need_tool("qemu-img", "qemu-utils")?;
    }
    if opts.formats.contains(&Format::RawZst) {
        need_tool("zstd", "zstd")?;
        need_tool("bmaptool", "bmap-tools")?;
    }
    std::fs::create_dir_all(&opts.cache_dir)
        .with_context(|| format!("creating cache folder {}", opts.cache_dir.display()))?;
    std::fs::create_dir_all(&opts.output_dir)
        .with_context(|| format!("creating output folder {}", opts.output_dir.display()))?;
    Ok(())
}

/// Makes sure the stages this build runs and its outputs fit on disk. When
/// the cache's filesystem is short, the least recently used cache entries
/// this build does not use are evicted first (each one named); only when
/// that is not enough does the build stop, before any slow stage.
pub fn make_room(ctx: &BuildContext, plan: &Plan, need: &Needed) -> Result<()> {
    let opts = &ctx.opts;
    let to_build: Vec<(&str, &Slot)> = plan
        .slots()
        .into_iter()
        .zip(need.in_order())
        .filter(|((_, slot), needed)| *needed && !slot.is_done())
        .map(|(stage, _)| stage)
        .collect();
    let cache_need: u64 = to_build.iter().map(|(name, _)| stage_space(name)).sum();
    let output_need: u64 = opts.formats.iter().map(|f| output_space(*f)).sum();
    let same_fs = device_of(&opts.cache_dir)? == device_of(&opts.output_dir)?;
    let need_on_cache_fs = cache_need + if same_fs { output_need } else { 0 };

    let free = free_space(&opts.cache_dir)?;
    if free < need_on_cache_fs {
        let keep: Vec<&Path> = plan.slots().iter().map(|(_, s)| s.dir.as_path()).collect();
        let freed = ctx.cache.make_room(need_on_cache_fs - free, &keep, |e| {
            eprintln!(
                "cache: evicted {}/{} ({}, unused since {}) to make room",
                e.stage,
                &e.key[..12.min(e.key.len())],
                crate::inspect::human(e.size),
                ago(e.last_used)
            );
        })?;
        if freed > 0 {
            eprintln!("cache: {} freed", crate::inspect::human(freed));
        }
    }
    let stages: Vec<&str> = to_build.iter().map(|(n, _)| *n).collect();
    let what = if stages.is_empty() {
        "its outputs".to_string()
    } else {
        format!("stages {} and its outputs", stages.join(", "))
    };
    need_space(&opts.cache_dir, need_on_cache_fs, &what, "--cache-dir")?;
    if !same_fs {
        need_space(&opts.output_dir, output_need, "its outputs", "--output-dir")?;
    }
    Ok(())
}

fn device_of(path: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .dev())
}

/// "5 min ago", "3 days ago".
pub fn ago(t: std::time::SystemTime) -> String {
    let secs = t.elapsed().map(|d| d.as_secs()).unwrap_or(0);
    match secs {
        s if s < 120 => format!("{s} s ago"),
        s if s < 7200 => format!("{} min ago", s / 60),
        s if s < 172_800 => format!("{} h ago", s / 3600),
        s => format!("{} days ago", s / 86_400),
    }
}

pub fn find_in_path(tool: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

fn need_tool(tool: &str, package: &str) -> Result<()> {
    if find_in_path(tool).is_none() {
        bail!("{tool} is not installed on this host: install the Debian package {package} (apt-get install {package})");
    }
    Ok(())
}

/// Free bytes on the filesystem holding `path`.
pub fn free_space(path: &Path) -> Result<u64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid C string and st a valid out pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        bail!(
            "cannot read free space of {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

fn need_space(path: &Path, need: u64, what: &str, flag: &str) -> Result<()> {
    let free = free_space(path)?;
    if free < need {
        bail!(
            "too little disk space: {} has {:.1} GiB free, and this build needs about {:.1} GiB \
             there for {what} (cache entries other builds use were kept); free some space, \
             run `aiwimg cache prune`, or choose another folder with {flag}",
            path.display(),
            free as f64 / GIB as f64,
            need as f64 / GIB as f64
        );
    }
    Ok(())
}

/// Checks that a Debian mirror answers for `suite` before mmdebstrap runs.
pub fn check_mirror(mirror: &str, suite: &str) -> Result<()> {
    // A full `deb ...` line or several mirrors: leave it to apt.
    if mirror.contains(' ') {
        return Ok(());
    }
    let release = format!("{}/dists/{suite}/Release", mirror.trim_end_matches('/'));
    probe_url(&release).map_err(|e| {
        anyhow::anyhow!(
            "the mirror {mirror} does not answer for suite {suite} ({e}); \
             check --mirror (or `mirror =` in the profile)"
        )
    })
}

/// Fetches the head of `url` (http, file, or a plain path; https is checked by
/// connecting). Errors say what went wrong in a few words.
pub fn probe_url(url: &str) -> std::result::Result<(), String> {
    if let Some(path) = url
        .strip_prefix("file://")
        .or_else(|| url.strip_prefix("copy://"))
    {
        return if Path::new(path).is_file() {
            Ok(())
        } else {
            Err(format!("{path} does not exist"))
        };
    }
    if url.starts_with('/') {
        return if Path::new(url).is_file() {
            Ok(())
        } else {
            Err(format!("{url} does not exist"))
        };
    }
    let (tls, rest) = if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else {
        return Err(format!("{url} is not an http, https or file URL"));
    };
    let (hostport, path) = rest.split_once('/').unwrap_or((rest, ""));
    let hostport = if hostport.contains(':') && !hostport.ends_with(']') {
        hostport.to_string()
    } else {
        format!("{hostport}:{}", if tls { 443 } else { 80 })
    };
    let addr = hostport
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {hostport}: {e}"))?
        .next()
        .ok_or_else(|| format!("{hostport} has no address"))?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("cannot connect to {hostport}: {e}"))?;
    if tls {
        return Ok(());
    }
    s.set_read_timeout(Some(Duration::from_secs(15))).ok();
    let host = hostport
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(&hostport);
    write!(
        s,
        "HEAD /{path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: aiwimg\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut head = [0u8; 64];
    let n = s.read(&mut head).map_err(|e| format!("no answer: {e}"))?;
    let line = String::from_utf8_lossy(&head[..n]);
    let status = line.split_whitespace().nth(1).unwrap_or("");
    if status.starts_with('2') || status.starts_with('3') {
        Ok(())
    } else {
        Err(format!(
            "HTTP {} for /{path}",
            if status.is_empty() { "?" } else { status }
        ))
    }
}

/// Checks that an OpenPGP key file (armored or binary) has the pinned
/// fingerprint (the v4 fingerprint of its primary key).
pub fn check_key_fingerprint(path: &Path, want: &str) -> Result<()> {
    let data = std::fs::read(path)?;
    let got = crate::openpgp::primary_fingerprint(&data)
        .with_context(|| format!("reading OpenPGP key {}", path.display()))?;
    let want: String = want
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_uppercase();
    if got != want {
        bail!("key fingerprint is {got}, but the profile pins {want}: refusing the key");
    }
    Ok(())
}
