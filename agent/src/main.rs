//! aiw-agent: the first-boot agent of aiwimg images.
//!
//!   aiw-agent [run]              configure the node and join the controller (the service)
//!   aiw-agent check FILE         validate user-data; prints resolved settings as JSON (secrets redacted)
//!          [--image image.json] [--modes modes.toml]   (defaults: this image's, when present)
//!   aiw-agent status [--json]    what the agent did on this boot
//!   aiw-agent update status|check|apply [VERSION] [--reboot]   A/B image updates
//!   aiw-agent health --boot [--timeout S]   the boot health check (aiw-boot-health.service)
//!
//! All paths are under AIW_AGENT_ROOT (default /).

use aiw_agent::agent::{Agent, AgentConfig, Outcome};
use aiw_agent::modes::{ImageInfo, ModeTable};
use aiw_agent::paths::Paths;
use aiw_agent::settings::Settings;
use aiw_agent::status::Status;
use aiw_agent::systemd::{DbusSystemd, NoSystemd, UnitControl};
use aiw_agent::validate::{self, ImageContext};
use aiw_agent::{log, userdata};
use std::process::ExitCode;

const USAGE: &str = "usage: aiw-agent [run] | check FILE [--image image.json] [--modes modes.toml] | status [--json]
       | update status [--json] | update check | update apply [VERSION] [--reboot]
       | health --boot [--timeout SECONDS]

  update status   the booted image version, the other slot's, an installed
                  version waiting for a reboot, and any rollback
  update check    ask the update server (systemd-sysupdate check-new)
  update apply    install the newest version (or VERSION) into the other
                  slot; --reboot boots it. Its first boots are counted: if the
                  boot health check fails them all, systemd-boot boots this
                  version again by itself
  health --boot   pass when aiw-agent is ready and the node's mode services
                  are active (run on a new version's counted boots)";

/// `aiw-agent status --json | head` ends quietly, as other Unix tools do,
/// instead of panicking on "Broken pipe" (found on a node). Only for the
/// one-shot commands: the daemon keeps Rust's ignored SIGPIPE, where a closed
/// socket is an error to handle, never a reason to die.
fn quiet_on_closed_pipe() {
    // SAFETY: setting a signal's disposition to its default has no
    // preconditions; nothing else in this process handles SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let paths = Paths::from_env();
    match args.first().map(String::as_str) {
        None | Some("run") => run(paths),
        Some("check") => {
            quiet_on_closed_pipe();
            check(&paths, &args[1..])
        }
        Some("status") => {
            quiet_on_closed_pipe();
            status(&paths, args.iter().any(|a| a == "--json"))
        }
        Some("update") => {
            quiet_on_closed_pipe();
            update(&paths, &args[1..])
        }
        Some("health") => health(&paths, &args[1..]),
        Some("-h" | "--help" | "help") => {
            quiet_on_closed_pipe();
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Some("--version" | "version") => {
            println!("aiw-agent {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some(other) => {
            eprintln!("aiw-agent: unknown command {other:?}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn run(paths: Paths) -> ExitCode {
    // Connected when first needed: the agent starts before D-Bus does.
    let units: Box<dyn UnitControl> = Box::new(DbusSystemd::at_first_call());
    let cfg = AgentConfig::for_system(paths);
    let agent = Agent::new(cfg, units.as_ref());
    let outcome = agent.run();
    if std::env::var_os("AIW_AGENT_EXIT_AFTER_HEARTBEATS").is_some() {
        return ExitCode::SUCCESS;
    }
    // The service stays up after every outcome, serving status and metrics;
    // a bad launch never fails the boot or restarts in a loop.
    if matches!(
        outcome,
        Outcome::Ready
            | Outcome::NoUserData
            | Outcome::Invalid(_)
            | Outcome::JoinFailed(_)
            | Outcome::NoPersistentStorage(_)
    ) {
        loop {
            std::thread::park();
        }
    }
    ExitCode::SUCCESS
}

fn check(paths: &Paths, args: &[String]) -> ExitCode {
    let mut file = None;
    let mut image_path = paths.image_json();
    let mut modes_path = paths.modes_toml();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--image" => image_path = it.next().map(Into::into).unwrap_or_default(),
            "--modes" => modes_path = it.next().map(Into::into).unwrap_or_default(),
            f if file.is_none() => file = Some(f.to_string()),
            other => {
                eprintln!("aiw-agent check: unexpected argument {other:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let Some(file) = file else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let data = if file == "-" {
        let mut b = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut b);
        b
    } else {
        match std::fs::read(&file) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("aiw-agent check: cannot read {file}: {e}");
                return ExitCode::from(2);
            }
        }
    };
    let image: Option<ImageInfo> = std::fs::read(&image_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let table = ModeTable::load(&modes_path).ok();
    let mut notes = Vec::new();
    if image.is_none() {
        notes.push(format!("no image description at {}: modes are checked against the guide only, not against an image", image_path.display()));
    }
    let (out, errs) = match userdata::parse(&data) {
        Err(e) => (
            serde_json::json!({"file": file, "valid": false, "errors": [e.0], "notes": notes}),
            vec![e.0],
        ),
        Ok(u) => {
            let formats = u.formats.clone();
            let s = Settings::from_user_data(u, None);
            log::add_secrets(s.secrets());
            let errs: Vec<String> = validate::validate(
                &s,
                &ImageContext {
                    table: table.as_ref(),
                    image: image.as_ref(),
                },
            )
            .iter()
            .map(|e| log::scrub(e))
            .collect();
            (
                serde_json::json!({
                    "file": file, "valid": errs.is_empty(), "formats": formats, "errors": errs,
                    "settings": s.redacted_json(), "notes": notes,
                    "image": image.as_ref().map(|i| i.profile.clone()),
                }),
                errs,
            )
        }
    };
    println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    if errs.is_empty() {
        ExitCode::SUCCESS
    } else {
        for e in &errs {
            eprintln!("aiw-agent check: invalid: {e}");
        }
        ExitCode::from(1)
    }
}

fn status(paths: &Paths, json: bool) -> ExitCode {
    let file = paths.status_file();
    let bytes = match std::fs::read(&file) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("aiw-agent status: {} not found: the agent has not run on this boot (systemctl status aiw-agent)", file.display());
            return ExitCode::from(3);
        }
        Err(e) => {
            eprintln!("aiw-agent status: cannot read {}: {e}", file.display());
            return ExitCode::from(3);
        }
    };
    let mut st: Status = match serde_json::from_slice(&bytes) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "aiw-agent status: {} is not a status this aiw-agent reads ({e}); was it written by another version?",
                file.display()
            );
            return ExitCode::from(3);
        }
    };
    // Service states now, not when the agent wrote them.
    if paths.is_real_root() {
        if let Ok(d) = DbusSystemd::connect() {
            for m in &mut st.modes {
                for (unit, state) in &mut m.services {
                    *state = d.active_state(unit);
                }
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&st).unwrap_or_default());
    } else {
        print!("{}", st.human());
    }
    ExitCode::SUCCESS
}

fn update(paths: &Paths, args: &[String]) -> ExitCode {
    use aiw_agent::update::{sysupdate, UpdateFacts};
    let flag = |f: &str| args.iter().any(|a| a == f);
    let Some(facts) = UpdateFacts::gather(paths) else {
        eprintln!("aiw-agent update: no IMAGE_ID/IMAGE_VERSION in /usr/lib/os-release: not an aiwimg node");
        return ExitCode::from(3);
    };
    match args.first().map(String::as_str) {
        None | Some("status") => {
            if flag("--json") {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&facts).unwrap_or_default()
                );
            } else {
                println!("{}", facts.human());
            }
            ExitCode::SUCCESS
        }
        Some("check") => match sysupdate::check_new() {
            Ok(Some(v)) => {
                println!("update available: {v} (booted {})", facts.booted);
                ExitCode::SUCCESS
            }
            Ok(None) => {
                println!(
                    "no newer version on the update server (booted {})",
                    facts.booted
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("aiw-agent update check: {e}");
                ExitCode::from(1)
            }
        },
        Some("apply") => {
            let version = args[1..].iter().find(|a| !a.starts_with("--"));
            if let Some(v) = &facts.pending_reboot {
                if version.is_none_or(|x| x == v) {
                    println!("{v} is installed already and boots at the next reboot");
                    return maybe_reboot(flag("--reboot"));
                }
            }
            if let Err(e) = sysupdate::update(version.map(String::as_str), true) {
                eprintln!("aiw-agent update apply: {e}");
                return ExitCode::from(1);
            }
            let after = UpdateFacts::gather(paths).unwrap_or(facts);
            match &after.pending_reboot {
                Some(v) => println!("installed {v}: it boots at the next reboot"),
                None => println!("nothing installed: {}", after.human()),
            }
            if after.pending_reboot.is_none() {
                return ExitCode::SUCCESS;
            }
            maybe_reboot(flag("--reboot"))
        }
        Some(other) => {
            eprintln!("aiw-agent update: unknown command {other:?}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn maybe_reboot(now: bool) -> ExitCode {
    if !now {
        return ExitCode::SUCCESS;
    }
    println!("rebooting");
    match aiw_agent::systemd::logind("Reboot") {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aiw-agent update: {e}");
            ExitCode::from(1)
        }
    }
}

/// `health --boot`: the line on the console says what decided.
fn health(paths: &Paths, args: &[String]) -> ExitCode {
    if !args.iter().any(|a| a == "--boot") {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    }
    let timeout = args
        .iter()
        .position(|a| a == "--timeout")
        .and_then(|i| args.get(i + 1))
        .and_then(|t| t.parse().ok())
        .unwrap_or(600);
    let units: Box<dyn UnitControl> = match DbusSystemd::connect() {
        Ok(d) => Box::new(d),
        Err(e) => Box::new(NoSystemd(e)),
    };
    let version = aiw_agent::update::UpdateFacts::gather(paths)
        .map(|f| f.booted)
        .unwrap_or_else(|| "?".into());
    match aiw_agent::update::health::boot_check(
        paths,
        units.as_ref(),
        std::time::Duration::from_secs(timeout),
        std::time::Duration::from_secs(2),
    ) {
        Ok(why) => {
            log::console(&format!("boot health: good: version {version}: {why}"));
            ExitCode::SUCCESS
        }
        Err(why) => {
            log::console(&format!(
                "boot health: FAILED: version {version}: {why}; rebooting (after its last try systemd-boot boots the previous version)"
            ));
            ExitCode::from(1)
        }
    }
}
