//! Edge API test controller (a test double of the aiWARE controller) as a
//! program, for baking into a controller image through an overlay.
//!
//! Usage: edge-test-controller [--listen ADDR] [--nfs-server IP] [--nfs-path PATH]
//!        [--state-file FILE]   (the host list kept across restarts, as a real controller's DB)
//! The init token is read from `AIWARE_INIT_TOKEN`, or from the file named by
//! `--init-token-file` (never from the command line, so it is not in `ps`).
//! The NFS export told to hosts defaults to `AIWARE_NFS_SERVER` and
//! `AIWARE_NFS_PATH`: the env aiw-agent gives the `aiware-controller`
//! container, so the same program runs as an overlay or as that container.

use qemu_tests::edge_controller::{EdgeTestController, NfsCache};

/// SIGTERM ends the program at once. As a container's PID 1 it would
/// otherwise be ignored (the kernel drops signals PID 1 has no handler for):
/// every `docker stop` waited its 10 s for SIGKILL. The host list is saved
/// after each change, so nothing is lost.
extern "C" fn exit_on_sigterm(_: libc::c_int) {
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(0) }
}

fn main() {
    // SAFETY: installs a handler that only calls an async-signal-safe function.
    unsafe {
        libc::signal(
            libc::SIGTERM,
            exit_on_sigterm as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
    let mut listen = "0.0.0.0:9000".to_string();
    let mut token = std::env::var("AIWARE_INIT_TOKEN").ok();
    let mut nfs = NfsCache::default();
    if let Some(ip) = std::env::var("AIWARE_NFS_SERVER")
        .ok()
        .filter(|v| !v.is_empty())
    {
        nfs.ips = vec![ip];
    }
    if let Some(path) = std::env::var("AIWARE_NFS_PATH")
        .ok()
        .filter(|v| !v.is_empty())
    {
        nfs.server_path = path;
    }
    let mut no_nfs = false;
    let mut state_file: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || {
            args.next().unwrap_or_else(|| {
                eprintln!("edge-test-controller: {a} needs a value");
                std::process::exit(2)
            })
        };
        match a.as_str() {
            "--listen" => listen = val(),
            "--init-token-file" => {
                let path = val();
                match std::fs::read_to_string(&path) {
                    Ok(t) => token = Some(t.trim().to_string()),
                    Err(e) => {
                        eprintln!("edge-test-controller: cannot read {path}: {e}");
                        std::process::exit(2)
                    }
                }
            }
            "--nfs-server" => nfs.ips = vec![val()],
            "--nfs-path" => nfs.server_path = val(),
            "--no-nfs" => no_nfs = true,
            "--state-file" => state_file = Some(val()),
            "-h" | "--help" => {
                println!("edge-test-controller [--listen ADDR] [--init-token-file FILE] [--nfs-server IP] [--nfs-path PATH] [--no-nfs] [--state-file FILE]\n(init token from AIWARE_INIT_TOKEN or --init-token-file; NFS defaults from AIWARE_NFS_SERVER, AIWARE_NFS_PATH)");
                return;
            }
            other => {
                eprintln!("edge-test-controller: unknown argument {other}");
                std::process::exit(2)
            }
        }
    }
    let Some(token) = token.filter(|t| !t.is_empty()) else {
        eprintln!("edge-test-controller: set AIWARE_INIT_TOKEN or --init-token-file");
        std::process::exit(2)
    };
    let c = match EdgeTestController::start(&listen, &token) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("edge-test-controller: cannot listen on {listen}: {e}");
            std::process::exit(1)
        }
    };
    c.set_nfs_cache(if no_nfs { None } else { Some(nfs) });
    if let Some(f) = &state_file {
        match c.keep_state_in(std::path::Path::new(f)) {
            Ok(n) => println!("edge-test-controller: {n} hosts known from {f}"),
            Err(e) => {
                eprintln!("edge-test-controller: cannot use the state file {f}: {e}");
                std::process::exit(1)
            }
        }
    }
    println!("edge-test-controller (test double): serving {}", c.url());
    loop {
        std::thread::park();
    }
}
