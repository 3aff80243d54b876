//! The figures of this machine, side by side (`qemu-tests/bench.sh`; not a
//! test: it prints what it measured and fails only when a step fails).
//!
//! 1. builds of `engine`: cold (an empty stage cache, tools tree included;
//!    packages from the local apt archive when it has them), warm (nothing
//!    changed), after one overlay edit, and the raw.zst output alone;
//! 2. sizes: raw (apparent and allocated), qcow2, raw.zst, root erofs;
//! 3. a boot under QEMU of the engine image joining the Edge API test
//!    controller (a TEST DOUBLE): launch to ready-and-joined, the boot's
//!    phases from `systemd-analyze`, and a reboot;
//!    Part `tasks`: the engine carrying out the controller's work, 20
//!    launches of a locally made task image (preloaded) at once: received →
//!    running per launch (the agent's journal), its peak RSS with 20 task
//!    containers, and the status report's latency with 0 and with 20;
//! 4. aiw-agent on the guide's user-data: parse + validate (`check`), and
//!    parse + validate + apply + join + one status report (`run` in a
//!    throwaway root against the test controller), wall time and peak RSS;
//! 5. beside it, cloud-init from Debian's package in a throwaway root on the
//!    same cloud-config (`cloud-init schema --config-file`).
//!
//! Environment: BENCH_GUEST_CMD (a shell command run in the guest after
//! the first boot, its output printed), AIWIMG_BIN (the builder), AIWIMG_CACHE_DIR (default
//! /var/cache/aiwimg), BENCH_RUNS (repetitions of the small measurements, 10).

use anyhow::{bail, ensure, Context, Result};
use qemu_tests::checks::agent_status;
use qemu_tests::docker_archive::{task_image_archive, TASK_TAG};
use qemu_tests::edge_controller::launch_ids;
use qemu_tests::node::{joining_user_data, node_vm, start_controller, TEST_INIT_TOKEN};
use qemu_tests::test_images::{self, workspace_root};
use qemu_tests::{AgentReport, Deadline};
use serde_json::Value;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

struct Report {
    rows: Vec<(String, String)>,
}

impl Report {
    fn row(&mut self, what: &str, value: String) {
        println!("  {what:<58} {value}");
        self.rows.push((what.to_string(), value));
    }
    fn section(&self, title: &str) {
        println!("\n== {title}");
    }
}

fn secs(d: f64) -> String {
    format!("{d:8.1} s")
}

fn mib(bytes: u64) -> String {
    format!("{:8.1} MiB", bytes as f64 / 1048576.0)
}

fn ratio(ours: f64, theirs: f64) -> String {
    if ours <= 0.0 {
        return "n/a".into();
    }
    format!("{:.1}x", theirs / ours)
}

/// Runs a command to completion; its wall time and peak RSS (KiB, from
/// wait4's rusage: the process itself, which `chroot` and `sh -c exec` keep).
fn measured(cmd: &mut Command) -> Result<(Duration, u64, std::process::Output)> {
    use std::io::Read;
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let o = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out.read_to_end(&mut b);
        b
    });
    let e = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err.read_to_end(&mut b);
        b
    });
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our own child, not yet reaped; the pointers are valid.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    ensure!(
        r == pid,
        "wait4 failed: {}",
        std::io::Error::last_os_error()
    );
    let took = started.elapsed();
    let output = std::process::Output {
        status: std::process::ExitStatus::from_raw(status),
        stdout: o.join().unwrap_or_default(),
        stderr: e.join().unwrap_or_default(),
    };
    Ok((took, usage.ru_maxrss as u64, output))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Each stage of a build: name, state (built/cached/unused), seconds.
type StageTimes = Vec<(String, String, f64)>;

/// `aiwimg build --json`: the whole time and each stage's.
fn build(
    aiwimg: &Path,
    project: &Path,
    cache: &Path,
    out: &Path,
    formats: &str,
) -> Result<(f64, StageTimes, Value)> {
    let o = Command::new(aiwimg)
        .arg("--project")
        .arg(project)
        .args([
            "build",
            "--profile",
            "engine",
            "--json",
            "--formats",
            formats,
        ])
        .arg("--cache-dir")
        .arg(cache)
        .arg("--output-dir")
        .arg(out)
        .stderr(std::process::Stdio::inherit())
        .output()?;
    ensure!(o.status.success(), "aiwimg build failed ({})", o.status);
    let text = String::from_utf8_lossy(&o.stdout);
    let last: Value = serde_json::from_str(text.lines().last().context("no --json output")?)?;
    let stages = last["stages"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            (
                s["stage"].as_str().unwrap_or("").to_string(),
                s["state"].as_str().unwrap_or("").to_string(),
                s["seconds"].as_f64().unwrap_or(0.0),
            )
        })
        .collect();
    Ok((
        last["seconds"].as_f64().unwrap_or(0.0),
        stages,
        last["manifest"].clone(),
    ))
}

fn stage_line(stages: &[(String, String, f64)]) -> String {
    stages
        .iter()
        .map(|(s, st, t)| format!("{s} {st} {t:.1}s"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A copy of the project's inputs (no target/, no .git) for an overlay edit.
/// The whole cargo workspace, qemu-tests included: the build compiles the
/// agent from this copy, and cargo loads every member (the agent's tests
/// depend on qemu-tests).
fn project_copy(dst: &Path) -> Result<()> {
    let src = workspace_root();
    let _ = std::fs::remove_dir_all(dst);
    std::fs::create_dir_all(dst)?;
    for entry in [
        "Cargo.toml",
        "Cargo.lock",
        "agent",
        "builder",
        "images",
        "overlays",
        "qemu-tests",
    ] {
        let st = Command::new("cp")
            .arg("-a")
            .arg(src.join(entry))
            .arg(dst)
            .status()?;
        ensure!(st.success(), "copying {entry}");
    }
    Ok(())
}

fn main() -> Result<()> {
    ensure!(
        std::fs::read_to_string("/proc/self/status")?
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")),
        "run as root (image builds need it)"
    );
    let wanted: Vec<String> = std::env::args().skip(1).collect();
    const PARTS: &[&str] = &["builds", "boot", "tasks", "agent", "cloud-init"];
    if let Some(bad) = wanted.iter().find(|w| !PARTS.contains(&w.as_str())) {
        bail!(
            "unknown part {bad:?}: bench.sh [{}] (default: all)",
            PARTS.join("] [")
        );
    }
    let part = |p: &str| wanted.is_empty() || wanted.iter().any(|w| w == p);
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let aiwimg = test_images::aiwimg_bin()?;
    let cache = PathBuf::from(
        std::env::var("AIWIMG_CACHE_DIR").unwrap_or_else(|_| "/var/cache/aiwimg".into()),
    );
    let work = workspace_root().join("target/bench");
    std::fs::create_dir_all(&work)?;
    let mut r = Report { rows: Vec::new() };
    let bench_started = Instant::now();

    let mut image_dir = None;
    if part("builds") {
        image_dir = Some(builds(&mut r, &aiwimg, &cache, &work)?);
    }
    if part("boot") || part("tasks") {
        let image = match &image_dir {
            Some(d) => test_images::load(d)?,
            None => test_images::image_for("engine")?,
        };
        if part("boot") {
            boot(&mut r, &image, &work)?;
        }
        if part("tasks") {
            tasks(&mut r, &image, &work)?;
        }
    }
    let fixtures = workspace_root().join("agent/tests/fixtures");
    let mut ours = None;
    if part("agent") {
        ours = Some(agent_figures(&mut r, &work, runs, &fixtures)?);
    }
    if part("cloud-init") {
        cloud_init(&mut r, &cache, &fixtures, runs, ours);
    }
    println!(
        "\n== bench done in {:.0} s ({} figures)",
        bench_started.elapsed().as_secs_f64(),
        r.rows.len()
    );
    Ok(())
}

/// Part 1 and 2: the builds and the sizes; returns the image's folder.
fn builds(r: &mut Report, aiwimg: &Path, cache: &Path, work: &Path) -> Result<PathBuf> {
    // 1. Builds.
    r.section("builds of `engine` (aiwimg build --json)");
    let cold_cache = work.join("cold-cache");
    let _ = std::fs::remove_dir_all(&cold_cache);
    std::fs::create_dir_all(&cold_cache)?;
    let archives = cache.join("apt-archives");
    if archives.is_dir() {
        // Stage artifacts start empty; the .debs already downloaded are
        // reused, so the figure is the build's work, not this network's.
        std::os::unix::fs::symlink(&archives, cold_cache.join("apt-archives"))?;
    }
    let out = work.join("out");
    let (cold, stages, manifest) =
        build(aiwimg, &workspace_root(), &cold_cache, &out, "raw,qcow2")?;
    r.row(
        "cold build (empty stage cache, tools tree included)",
        format!("{}   [{}]", secs(cold), stage_line(&stages)),
    );
    let (warm, stages, _) = build(aiwimg, &workspace_root(), &cold_cache, &out, "raw,qcow2")?;
    r.row(
        "warm rebuild (nothing changed)",
        format!("{}   [{}]", secs(warm), stage_line(&stages)),
    );
    let copy = work.join("project");
    project_copy(&copy)?;
    let motd = copy.join("overlays/base/etc/motd.tera");
    let mut text = std::fs::read_to_string(&motd)?;
    text.push_str(&format!("\n# bench edit {}\n", std::process::id()));
    std::fs::write(&motd, text)?;
    let (edit, stages, _) = build(
        aiwimg,
        &copy,
        &cold_cache,
        &work.join("out-edit"),
        "raw,qcow2",
    )?;
    r.row(
        "rebuild after one overlay edit",
        format!("{}   [{}]", secs(edit), stage_line(&stages)),
    );
    let (zst, _, zman) = build(
        aiwimg,
        &workspace_root(),
        &cold_cache,
        &work.join("out-zst"),
        "raw.zst",
    )?;
    r.row("raw.zst output from a warm cache", secs(zst));
    r.row(
        "ratio cold / warm, cold / overlay edit",
        format!("{} , {}", ratio(warm, cold), ratio(edit, cold)),
    );

    // 2. Sizes.
    r.section("sizes");
    let dir = out.join("engine");
    let size_of = |m: &Value, suffix: &str| -> Option<u64> {
        m["files"].as_array()?.iter().find_map(|f| {
            f["name"]
                .as_str()
                .filter(|n| n.ends_with(suffix))
                .and(f["size"].as_u64())
        })
    };
    if let Some(raw) = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().ends_with(".raw"))
    {
        let md = raw.metadata()?;
        r.row(
            "raw (apparent / allocated)",
            format!("{} / {}", mib(md.len()), mib(md.blocks() * 512)),
        );
    }
    if let Some(q) = size_of(&manifest, ".qcow2") {
        r.row("qcow2", mib(q));
    }
    if let Some(z) = size_of(&zman, ".raw.zst") {
        r.row("raw.zst", mib(z));
    }
    if let Some(erofs) = manifest["root_erofs_size"].as_u64() {
        r.row("root erofs", mib(erofs));
    }

    Ok(dir)
}

/// The guest's CPUs since boot (/proc/stat, in USER_HZ) and the units that
/// used the most of them (their cgroups' cpu.stat: units still running;
/// kernel threads such as dm-verity's are in none). Under TCG the boot is
/// bound by the guest's CPUs more than by waits: where their time went says
/// what is worth removing.
const CPU_BY_UNIT: &str = r#"awk '/^cpu /{printf "all CPUs: busy %.1f s (user %.1f, system %.1f, irq %.1f), idle %.1f s, iowait %.1f s\n", ($2+$3+$4+$7+$8)/100, ($2+$3)/100, $4/100, ($7+$8)/100, $5/100, $6/100}' /proc/stat
for d in /sys/fs/cgroup/*.slice/*/ /sys/fs/cgroup/init.scope/; do awk -v u="$(basename "$d")" '/^usage_usec/{printf "%8.2f s  %s\n", $2/1e6, u}' "$d/cpu.stat"; done | sort -rn | head -14
echo "   (PID 1: user $(awk '{printf "%.2f s, system %.2f s", $14/100, $15/100}' /proc/1/stat))"
echo "   kernel threads:"; awk '$4 == 2 {c = $2; gsub(/[()]/, "", c); sub(/[\/:0-9].*/, "", c); t[c] += $14 + $15} END {for (k in t) printf "%8.2f s  %s\n", t[k]/100, k}' /proc/[0-9]*/stat 2>/dev/null | sort -rn | head -6"#;

/// Part 3: a boot and a reboot of the engine image.
fn boot(r: &mut Report, image: &qemu_tests::test_images::TestImage, work: &Path) -> Result<()> {
    // 3. A boot.
    r.section("boot of the engine image under QEMU (NoCloud seed, Edge API test controller)");
    let controller = start_controller()?;
    let vm_dir = work.join("vm");
    let _ = std::fs::remove_dir_all(&vm_dir);
    std::fs::create_dir_all(&vm_dir)?;
    let dl = Deadline::after(Duration::from_secs(900));
    let mut vm = node_vm(&vm_dir, "bench-engine", image, Some(&controller))?
        .user_data(joining_user_data("bench-engine", "engine"))
        .start()?;
    let joined = vm.wait_ready(&dl)?;
    ensure!(
        controller.hosts().len() == 1,
        "the test controller knows {} hosts",
        controller.hosts().len()
    );
    r.row(
        &format!(
            "launch to ready and joined ({:?})",
            qemu_tests::accel::accel().accel
        ),
        secs(joined.as_secs_f64()),
    );
    vm.wait_ssh(&dl)?;
    // First, before systemd-analyze's own questions to PID 1 add to its time.
    let cpu = vm.check(CPU_BY_UNIT, &dl)?;
    let analyze = vm.check("systemd-analyze", &dl)?;
    r.row(
        "systemd-analyze (first boot)",
        analyze.lines().next().unwrap_or("").trim().to_string(),
    );
    let chain = vm.check(
        "systemd-analyze critical-chain --no-pager aiw-agent.service",
        &dl,
    )?;
    let blame = vm.check("systemd-analyze blame --no-pager | head -8", &dl)?;
    manager_phases(r, &vm, &dl)?;
    println!("  critical chain of aiw-agent.service:\n{}", indent(&chain));
    println!("  slowest units:\n{}", indent(&blame));
    println!(
        "  CPU time from the kernel's start to ready and joined (+ one SSH login):\n{}",
        indent(&cpu)
    );
    let agent_phases = vm.check(
        "journalctl -b -u aiw-agent -o short-monotonic --no-pager | grep -E 'datasource|ready|joined|waiting' | head -8",
        &dl,
    )?;
    println!(
        "  the agent's phases (journal, seconds since kernel start):\n{}",
        indent(&agent_phases)
    );
    // A developer's probe: where a boot's time goes is found by asking the
    // booted guest (e.g. `systemctl list-units --all | wc -l`).
    if let Ok(cmd) = std::env::var("BENCH_GUEST_CMD") {
        let out = vm.check(&cmd, &dl)?;
        println!("  BENCH_GUEST_CMD {cmd:?}:\n{}", indent(&out));
    }
    let (rebooted, second_boot) = match vm.reboot(&dl)? {
        AgentReport::Ready(_) => (vm.since_boot(), vm.since_qemu_restart()),
        AgentReport::InvalidSettings(l) => bail!("after the reboot: {l}"),
    };
    // The reboot's figure counts the guest's shutdown too; the second boot's
    // (from the new QEMU process, as the first boot from its launch) is the
    // one to set beside the first boot.
    let second_boot = second_boot.context("the reboot did not start QEMU again")?;
    vm.wait_ssh(&dl)?;
    let analyze2 = vm.check("systemd-analyze", &dl)?;
    // The harness goes on in a new QEMU process at the guest's reset (vm.rs,
    // `-action reboot=shutdown`): under TCG a guest runs slower after a reset
    // in the same process (measured: reboot 59.7 s against 47.5 s in a new
    // process), which is the emulator's cost, not the node's.
    r.row(
        "reboot (`systemctl reboot`) to ready and joined",
        secs(rebooted.as_secs_f64()),
    );
    r.row(
        "  of which the shutdown, to the guest's reset",
        secs(rebooted.saturating_sub(second_boot).as_secs_f64()),
    );
    r.row(
        "  second boot: new QEMU process to ready and joined",
        secs(second_boot.as_secs_f64()),
    );
    r.row(
        "systemd-analyze (reboot)",
        analyze2.lines().next().unwrap_or("").trim().to_string(),
    );
    r.row(
        "ratio first boot / second boot",
        format!("{:.2}", joined.as_secs_f64() / second_boot.as_secs_f64()),
    );
    r.row(
        "(issue 12's figure, not re-measured here) mkosi trixie + cloud-init to multi-user",
        format!(
            "{}   ratio {}",
            secs(181.0),
            ratio(joined.as_secs_f64(), 181.0)
        ),
    );
    Ok(())
}

/// What systemd spent before any unit ran, in the initrd and after the
/// switch to the root: its security set-up, the generators, loading units
/// (`systemctl show`'s manager timestamps, microseconds since kernel start).
fn manager_phases(r: &mut Report, vm: &qemu_tests::Vm, dl: &Deadline) -> Result<()> {
    let props = [
        "InitRDGeneratorsStartTimestampMonotonic",
        "InitRDGeneratorsFinishTimestampMonotonic",
        "InitRDUnitsLoadStartTimestampMonotonic",
        "InitRDUnitsLoadFinishTimestampMonotonic",
        "SecurityStartTimestampMonotonic",
        "SecurityFinishTimestampMonotonic",
        "GeneratorsStartTimestampMonotonic",
        "GeneratorsFinishTimestampMonotonic",
        "UnitsLoadStartTimestampMonotonic",
        "UnitsLoadFinishTimestampMonotonic",
    ];
    let out = vm.check(&format!("systemctl show -p {}", props.join(" -p ")), dl)?;
    let us = |name: &str| -> f64 {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1e6
    };
    let span = |a: &str, b: &str| {
        let (a, b) = (us(a), us(b));
        if a > 0.0 && b >= a {
            format!("{} (at {:.1} s)", secs(b - a), a)
        } else {
            "not recorded".to_string()
        }
    };
    r.row(
        "initrd: generators",
        span(
            "InitRDGeneratorsStartTimestampMonotonic",
            "InitRDGeneratorsFinishTimestampMonotonic",
        ),
    );
    r.row(
        "initrd: loading units",
        span(
            "InitRDUnitsLoadStartTimestampMonotonic",
            "InitRDUnitsLoadFinishTimestampMonotonic",
        ),
    );
    r.row(
        "root: security set-up",
        span(
            "SecurityStartTimestampMonotonic",
            "SecurityFinishTimestampMonotonic",
        ),
    );
    r.row(
        "root: generators",
        span(
            "GeneratorsStartTimestampMonotonic",
            "GeneratorsFinishTimestampMonotonic",
        ),
    );
    r.row(
        "root: loading units",
        span(
            "UnitsLoadStartTimestampMonotonic",
            "UnitsLoadFinishTimestampMonotonic",
        ),
    );
    Ok(())
}

/// How many task containers part `tasks` runs at once.
const TASKS: usize = 20;

/// Part 3b: the controller's work on one engine: [`TASKS`] launches of a
/// preloaded task image in one reply.
fn tasks(r: &mut Report, image: &qemu_tests::test_images::TestImage, work: &Path) -> Result<()> {
    r.section(&format!(
        "an engine running the controller's tasks ({TASKS} launches of a preloaded image in one reply)"
    ));
    let controller = start_controller()?;
    let vm_dir = work.join("vm-tasks");
    let _ = std::fs::remove_dir_all(&vm_dir);
    std::fs::create_dir_all(&vm_dir)?;
    let dl = Deadline::after(Duration::from_secs(1200));
    let mut vm = node_vm(&vm_dir, "bench-tasks", image, Some(&controller))?
        .memory_mib(3072)
        .user_data(
            joining_user_data("bench-tasks", "engine").setting("AIWARE_AGENT_UPDATE_INTERVAL", "5"),
        )
        .start()?;
    vm.wait_ready(&dl)?;
    vm.wait_ssh(&dl)?;
    let host = controller
        .hosts()
        .first()
        .map(|h| h.host_id.clone())
        .context("the engine did not register")?;
    vm.check_with_input("docker load", &task_image_archive()?, &dl)?;
    let report_ms = |vm: &qemu_tests::Vm| -> Result<Vec<f64>> {
        // Five reports in a row, each read after the next heartbeat.
        let mut v = Vec::new();
        let mut beats = 0;
        while v.len() < 5 {
            let st = agent_status(vm, &dl)?;
            let b = st["join"]["heartbeats"].as_u64().unwrap_or(0);
            if b != beats {
                beats = b;
                if let Some(ms) = st["join"]["last_report_ms"].as_f64() {
                    v.push(ms);
                }
            }
            std::thread::sleep(Duration::from_secs(2));
        }
        Ok(v)
    };
    let idle = median(report_ms(&vm)?);
    let launches: Vec<Value> = (0..TASKS)
        .map(|i| {
            serde_json::json!({
                "launchId": format!("B-{i:02}"), "engineId": "eng-bench", "buildId": "build-1",
                "dockerImage": TASK_TAG,
            })
        })
        .collect();
    let after = controller.statuses(&host).len();
    let queued = Instant::now();
    ensure!(
        controller.queue_actions(&host, serde_json::json!({ "launchContainer": launches })),
        "the controller does not know the engine"
    );
    let all = controller
        .wait_for_status(&host, after, dl.cap(Duration::from_secs(600)), |s| {
            let running = s["containerStatus"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|c| c["state"] == "running")
                .count();
            running == TASKS && launch_ids(s).len() == TASKS
        })
        .with_context(|| {
            format!(
                "no report listed {TASKS} running tasks; the last: {}",
                controller
                    .statuses(&host)
                    .last()
                    .cloned()
                    .unwrap_or_default()
            )
        })?;
    let all_reported = queued.elapsed();
    ensure!(all["numContainers"] == TASKS, "counts in {all}");
    // The agent's own figure per launch: the action read → the container running.
    let journal = vm.check(
        "journalctl -b -u aiw-agent -o cat --no-pager | grep 'after the action arrived'",
        &dl,
    )?;
    let mut running: Vec<f64> = journal
        .lines()
        .filter_map(|l| {
            l.split("running ")
                .nth(1)?
                .split(" s after")
                .next()?
                .trim()
                .parse()
                .ok()
        })
        .collect();
    ensure!(
        running.len() == TASKS,
        "{} launch lines in the journal, expected {TASKS}:\n{journal}",
        running.len()
    );
    running.sort_by(f64::total_cmp);
    r.row(
        "launchContainer received → running, first of 20",
        secs(running[0]),
    );
    r.row(
        "launchContainer received → running, median / last of 20",
        format!(
            "{} / {}",
            secs(median(running.clone())).trim(),
            secs(running[TASKS - 1]).trim()
        ),
    );
    r.row(
        "20 launches queued → a report lists all 20 running",
        secs(all_reported.as_secs_f64()),
    );
    let busy = median(report_ms(&vm)?);
    r.row(
        "status report latency (gather + Docker stats + POST), median of 5",
        format!("{idle:.0} ms with 0 tasks, {busy:.0} ms with {TASKS}"),
    );
    let mem = vm.check(
        "grep -E '^Vm(HWM|RSS):' /proc/$(systemctl show -p MainPID --value aiw-agent)/status",
        &dl,
    )?;
    let kib = |key: &str| -> u64 {
        mem.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    r.row(
        &format!("aiw-agent peak RSS (VmHWM) with {TASKS} task containers"),
        format!(
            "{} (now {})",
            mib(kib("VmHWM:") * 1024).trim(),
            mib(kib("VmRSS:") * 1024).trim()
        ),
    );
    vm.shutdown(Duration::from_secs(60))?;
    Ok(())
}

/// Part 4: the agent on the guide's user-data; (cloud-config ms, peak KiB).
fn agent_figures(r: &mut Report, work: &Path, runs: usize, fixtures: &Path) -> Result<(f64, u64)> {
    // 4. The agent on the guide's user-data.
    r.section(&format!(
        "aiw-agent on the guide's user-data (median of {runs})"
    ));
    let agent = test_images::build_agent()?;
    let modes_toml = workspace_root().join("images/modes.toml");
    let image_json = work.join("image.json");
    std::fs::write(
        &image_json,
        serde_json::json!({"profile": "engine", "version": "bench", "modes": ["engine"],
            "profiles": {"engine": ["engine"]}, "gpu": false})
        .to_string(),
    )?;
    let check = |file: &str| -> Result<(f64, u64)> {
        let mut times = Vec::new();
        let mut rss = 0;
        for _ in 0..runs {
            let (t, kib, o) = measured(
                Command::new(&agent)
                    .arg("check")
                    .arg(fixtures.join(file))
                    .arg("--modes")
                    .arg(&modes_toml)
                    .arg("--image")
                    .arg(&image_json),
            )?;
            ensure!(
                o.status.success() || o.status.code() == Some(1),
                "aiw-agent check {file}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            times.push(t.as_secs_f64() * 1000.0);
            rss = rss.max(kib);
        }
        Ok((median(times), rss))
    };
    let (engine_ms, engine_rss) = check("guide-engine.sh")?;
    r.row(
        "check guide-engine.sh (parse + validate)",
        format!("{engine_ms:7.2} ms, peak RSS {engine_rss} KiB"),
    );
    let (cc_ms, cc_rss) = check("controller.cloud-config.yaml")?;
    r.row(
        "check controller.cloud-config.yaml (parse + validate)",
        format!("{cc_ms:7.2} ms, peak RSS {cc_rss} KiB"),
    );
    let (run_ms, run_rss) = agent_run(&agent, work, runs, &modes_toml, &image_json)?;
    r.row(
        "run: parse + validate + apply + join + 1 status report",
        format!("{run_ms:7.2} ms, peak RSS {run_rss} KiB"),
    );

    Ok((cc_ms, cc_rss))
}

/// Part 5: cloud-init on the same cloud-config, and the ratios to ours.
fn cloud_init(
    r: &mut Report,
    cache: &Path,
    fixtures: &Path,
    runs: usize,
    ours: Option<(f64, u64)>,
) {
    r.section(&format!(
        "cloud-init (Debian's package) on the same cloud-config (median of {runs})"
    ));
    match cloud_init_schema(cache, &fixtures.join("controller.cloud-config.yaml"), runs) {
        Ok((ms, kib, version)) => {
            r.row(
                &format!("cloud-init {version} schema --config-file (same file less `aiware:`)"),
                format!("{ms:7.2} ms, peak RSS {kib} KiB"),
            );
            if let Some((cc_ms, cc_rss)) = ours {
                r.row(
                    "ratio cloud-init / aiw-agent check (time, peak RSS)",
                    format!(
                        "{} , {}",
                        ratio(cc_ms, ms),
                        ratio(cc_rss as f64, kib as f64)
                    ),
                );
            }
        }
        Err(e) => r.row("cloud-init schema", format!("not measured: {e:#}")),
    }
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `aiw-agent run` in a throwaway root: ESP user-data (the guide's engine
/// variables, pointed at a test controller on loopback), the image's mode
/// table, no systemd reachable; exits after one status report.
fn agent_run(
    agent: &Path,
    work: &Path,
    runs: usize,
    modes_toml: &Path,
    image_json: &Path,
) -> Result<(f64, u64)> {
    let controller =
        qemu_tests::edge_controller::EdgeTestController::start("127.0.0.1:0", TEST_INIT_TOKEN)?;
    controller.set_nfs_cache(None);
    let mut times = Vec::new();
    let mut rss = 0;
    for i in 0..runs {
        let root = work.join(format!("agent-root-{i}"));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("efi/aiware"))?;
        std::fs::create_dir_all(root.join("usr/lib/aiware"))?;
        std::fs::copy(modes_toml, root.join("usr/lib/aiware/modes.toml"))?;
        std::fs::copy(image_json, root.join("usr/lib/aiware/image.json"))?;
        std::fs::write(
            root.join("efi/aiware/user-data"),
            format!(
                "export AIWARE_MODE=engine\nexport AIWARE_HOST_EXPIRE=false\n\
                 export AIWARE_LICENSE=bench-license\nexport AIWARE_CONTROLLER={}\n\
                 export AIWARE_INIT_TOKEN={TEST_INIT_TOKEN}\n",
                controller.url()
            ),
        )?;
        let (t, kib, o) = measured(
            Command::new(agent)
                .arg("run")
                .env("AIW_AGENT_ROOT", &root)
                .env("AIW_AGENT_EXIT_AFTER_HEARTBEATS", "1")
                .env("AIW_AGENT_DATASOURCE_DEADLINE", "5")
                .env("AIW_AGENT_METRICS_ADDR", "127.0.0.1:0")
                // Never the host's systemd: apply talks to no bus here.
                .env(
                    "DBUS_SYSTEM_BUS_ADDRESS",
                    "unix:path=/nonexistent/aiwimg-bench",
                ),
        )?;
        ensure!(
            o.status.success(),
            "aiw-agent run in {}: {}",
            root.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        times.push(t.as_secs_f64() * 1000.0);
        rss = rss.max(kib);
        let _ = std::fs::remove_dir_all(&root);
    }
    ensure!(
        controller.hosts().iter().any(|h| !h.statuses.is_empty()),
        "no status report reached the test controller"
    );
    Ok((median(times), rss))
}

/// Debian's cloud-init in a throwaway root (kept in the cache between
/// runs), timed on `cloud-init schema --config-file`.
fn cloud_init_schema(cache: &Path, config: &Path, runs: usize) -> Result<(f64, u64, String)> {
    let root = cache.join("bench-cloud-init-root");
    if !root.join("usr/bin/cloud-init").exists() {
        let _ = std::fs::remove_dir_all(&root);
        eprintln!("bench: making a trixie root with cloud-init (mmdebstrap, once)");
        let st = Command::new("mmdebstrap")
            .args(["--variant=apt", "--include=cloud-init", "trixie"])
            .arg(&root)
            .status()
            .context("running mmdebstrap")?;
        ensure!(st.success(), "mmdebstrap with cloud-init failed ({st})");
    }
    // cloud-init's schema refuses the `aiware:` key ("Additional properties
    // are not allowed"): it gets the same file without that block.
    let text = std::fs::read_to_string(config)?;
    let mut kept = Vec::new();
    let mut in_aiware = false;
    for line in text.lines() {
        let top_level = !line.starts_with(' ') && !line.starts_with('-') && !line.is_empty();
        if top_level {
            in_aiware = line.starts_with("aiware:");
        }
        if !in_aiware {
            kept.push(line);
        }
    }
    std::fs::write(root.join("tmp/user-data.yaml"), kept.join("\n") + "\n")?;
    let version = Command::new("chroot")
        .arg(&root)
        .args(["cloud-init", "--version"])
        .output()?;
    let version = String::from_utf8_lossy(&version.stdout)
        .split_whitespace()
        .last()
        .unwrap_or("")
        .to_string();
    let mut times = Vec::new();
    let mut rss = 0;
    for _ in 0..runs {
        let (t, kib, o) = measured(Command::new("chroot").arg(&root).args([
            "cloud-init",
            "schema",
            "--config-file",
            "/tmp/user-data.yaml",
        ]))?;
        if !o.status.success() {
            bail!(
                "cloud-init schema: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        times.push(t.as_secs_f64() * 1000.0);
        rss = rss.max(kib);
    }
    Ok((median(times), rss, version))
}
