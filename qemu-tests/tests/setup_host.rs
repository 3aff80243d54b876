//! The README's two commands on a fresh Debian 12 machine (slow: needs root
//! and the host's Debian mirror). Run first by the README's test command.
//!
//! The package steps of `builder/setup-host.sh` run in throwaway Debian 12
//! roots made by mmdebstrap from the host's own apt sources, as a new user's
//! machine would be:
//! - command 1 then command 2: `setup-host.sh`, then `setup-host.sh --tests`,
//!   then `setup-host.sh` again (nothing left to do);
//! - command 2 alone: `setup-host.sh --tests` on a fresh root.
//!
//! Each root must end with QEMU, qemu-utils and mmdebstrap from one suite,
//! `qemu-system-x86_64` and `mmdebstrap` runnable. This is the check that
//! would have caught bookworm's `qemu-system-common` clash with the
//! backports `qemu-utils` (issue 12).
//!
//! Downloaded packages are kept in `<cache>/setup-check-debs` between runs.
//! The two roots are made side by side (apt and dpkg use one core each): each
//! starts from the kept packages and leaves what it downloaded in a folder of
//! its own, merged into the kept ones after both.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

fn workspace() -> PathBuf {
    qemu_tests::test_images::workspace_root()
}

/// The host's Debian apt sources (files mmdebstrap copies into the root),
/// without the backports file setup-host.sh itself writes: the root must
/// start as a fresh machine does.
fn host_apt_sources() -> Vec<PathBuf> {
    let mut files = Vec::new();
    let list = Path::new("/etc/apt/sources.list");
    if std::fs::read_to_string(list).is_ok_and(|s| {
        s.lines()
            .any(|l| l.trim_start().starts_with("deb ") && l.contains("bookworm"))
    }) {
        files.push(list.to_path_buf());
    }
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut found: Vec<PathBuf> = dir
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let name = p.file_name().unwrap().to_string_lossy().to_string();
                (name.ends_with(".sources") || name.ends_with(".list"))
                    && !name.starts_with("aiwimg-")
                    && std::fs::read_to_string(p)
                        .is_ok_and(|s| s.contains("bookworm") && !s.contains("bookworm-backports"))
            })
            .collect();
        found.sort();
        files.extend(found);
    }
    assert!(
        !files.is_empty(),
        "no bookworm apt source on this host (/etc/apt/sources.list, /etc/apt/sources.list.d): \
         the check makes its roots from the host's own mirror"
    );
    files
}

/// Makes a bookworm root, runs setup-host.sh in it once per entry of
/// `runs` (each a list of options, always with --packages-only), then checks
/// what it installed. The root itself is thrown away (mmdebstrap's null target).
/// Packages come from `cache` and go to `downloaded`.
fn fresh_root_then(name: &str, runs: &[&[&str]], cache: &Path, downloaded: &Path) -> String {
    let script = workspace().join("builder/setup-host.sh");
    let report = std::env::temp_dir().join(format!("aiwimg-setup-check-{name}.txt"));
    let _ = std::fs::remove_file(&report);
    let c = cache.display();
    let mut args: Vec<String> = vec![
        "--variant=apt".into(),
        "--skip=essential/unlink".into(),
        "--skip=download/empty".into(),
        "--include=ca-certificates".into(),
        format!("--setup-hook=mkdir -p {c} \"$1\"/var/cache/apt/archives"),
        format!("--setup-hook=sync-in {c} /var/cache/apt/archives/"),
        format!("--customize-hook=copy-in {} /root", script.display()),
    ];
    for (i, opts) in runs.iter().enumerate() {
        let o = opts.join(" ");
        args.push(format!(
            "--customize-hook=echo '== run {n}: setup-host.sh {o}' >&2; \
             chroot \"$1\" sh /root/setup-host.sh --packages-only {o} >&2",
            n = i + 1
        ));
    }
    // What the root ended with, read inside it.
    args.push(format!(
        "--customize-hook=chroot \"$1\" sh -c 'dpkg-query -W -f \"\\${{Package}} \\${{Version}}\\n\" \
         qemu-utils qemu-system-x86 qemu-system-common mmdebstrap 2>&1; \
         qemu-system-x86_64 --version | head -1; mmdebstrap --version; \
         qemu-img --version | head -1' > {}",
        report.display()
    ));
    args.push(format!(
        "--customize-hook=sync-out /var/cache/apt/archives {}",
        downloaded.display()
    ));
    args.push("bookworm".into());
    args.push("/dev/null".into());
    args.extend(host_apt_sources().iter().map(|p| p.display().to_string()));
    let started = Instant::now();
    let out = Command::new("mmdebstrap").args(&args).output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    let tail: Vec<&str> = log.lines().rev().take(40).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    assert!(
        out.status.success(),
        "{name}: setup-host.sh failed in a fresh Debian 12 root (runs {runs:?}):\n{}",
        tail.join("\n")
    );
    let report = std::fs::read_to_string(&report).unwrap();
    let said: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("== run ") || l.starts_with("setup-host.sh:"))
        .collect();
    eprintln!(
        "{name}: {runs:?} in a fresh bookworm root: ok in {:.0} s\n{}\n{report}",
        started.elapsed().as_secs_f64(),
        said.join("\n")
    );
    // A run after one with the same or more options has nothing to do.
    for i in 1..runs.len() {
        if runs[..i]
            .iter()
            .any(|before| runs[i].iter().all(|o| before.contains(o)))
        {
            let marker = format!("== run {}: ", i + 1);
            let this_run = log
                .split(&marker)
                .nth(1)
                .and_then(|after| after.split("== run ").next())
                .unwrap_or_else(|| panic!("{name}: no output of run {}", i + 1));
            assert!(
                !this_run.contains("Setting up") && !this_run.contains("Hit:"),
                "{name}: run {} ({:?}) did apt work again after a run that had done it:\n{this_run}",
                i + 1,
                runs[i]
            );
        }
    }
    report
}

fn check_one_qemu(name: &str, report: &str) {
    let version = |pkg: &str| {
        report
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{pkg} ")))
            .unwrap_or_else(|| panic!("{name}: {pkg} not installed:\n{report}"))
            .trim()
            .to_string()
    };
    let qemu = version("qemu-system-x86");
    assert_eq!(qemu, version("qemu-utils"), "{name}: {report}");
    assert_eq!(qemu, version("qemu-system-common"), "{name}: {report}");
    assert!(
        qemu.contains("bpo") || qemu.contains("deb13"),
        "{name}: QEMU {qemu} is bookworm's own (too old for OVMF 4M and trixie images)"
    );
    assert!(report.contains("QEMU emulator version"), "{name}: {report}");
    assert!(report.contains("mmdebstrap 1."), "{name}: {report}");
}

#[test]
fn the_readme_commands_set_up_a_fresh_debian_12_in_either_order() {
    assert_eq!(
        own_uid(),
        0,
        "run as root (mmdebstrap makes the throwaway roots with chroot and mounts)"
    );
    let cache = PathBuf::from(
        std::env::var("AIWIMG_CACHE_DIR").unwrap_or_else(|_| "/var/cache/aiwimg".into()),
    )
    .join("setup-check-debs");
    std::fs::create_dir_all(&cache).unwrap();

    // Command 1 (build) then command 2 (tests), then command 1 again; and
    // command 2 alone, then command 1 (nothing left to do).
    let cases: [(&str, &[&[&str]]); 2] = [
        ("build-then-tests", &[&[], &["--tests"], &[]]),
        ("tests-alone", &[&["--tests"], &[]]),
    ];
    std::thread::scope(|scope| {
        let roots: Vec<_> = cases
            .iter()
            .map(|&(name, runs)| {
                let (cache, downloaded) = (&cache, cache.join(format!(".from-{name}")));
                scope.spawn(move || {
                    let _ = std::fs::remove_dir_all(&downloaded);
                    std::fs::create_dir_all(&downloaded).unwrap();
                    let report = fresh_root_then(name, runs, cache, &downloaded);
                    keep_new_packages(&downloaded, cache);
                    (name, report)
                })
            })
            .collect();
        for root in roots {
            match root.join() {
                Ok((name, report)) => check_one_qemu(name, &report),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
    });
}

/// Moves the packages in `downloaded` that `cache` lacks into it.
fn keep_new_packages(downloaded: &Path, cache: &Path) {
    for entry in std::fs::read_dir(downloaded).unwrap().flatten() {
        let name = entry.file_name();
        if name.to_string_lossy().ends_with(".deb") && !cache.join(&name).exists() {
            std::fs::rename(entry.path(), cache.join(&name)).unwrap();
        }
    }
    let _ = std::fs::remove_dir_all(downloaded);
}

fn own_uid() -> u32 {
    // From /proc: no libc call for one number.
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}
