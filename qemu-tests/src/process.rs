//! Running host tools (ssh, qemu-img, genisoimage) with a time limit and captured output.

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// What a finished command gave back.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    /// Exit code; `None` when killed by a signal (or by our time limit).
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }
}

/// Runs `cmd` to completion or until `limit`, feeding it `stdin` when given.
pub fn run_with_limit(
    cmd: &mut Command,
    stdin: Option<&[u8]>,
    limit: Duration,
) -> Result<CmdOutput> {
    let program = format!("{:?}", cmd.get_program());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {program}: is it installed?"))?;
    let feeder = stdin.map(|data| {
        let data = data.to_vec();
        let mut pipe = child.stdin.take().expect("stdin piped");
        thread::spawn(move || {
            // The child may exit without reading everything; that is its answer.
            let _ = pipe.write_all(&data);
        })
    });
    let mut out_pipe = child.stdout.take().expect("stdout piped");
    let mut err_pipe = child.stderr.take().expect("stderr piped");
    let out_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out_pipe.read_to_end(&mut buf);
        buf
    });
    let err_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err_pipe.read_to_end(&mut buf);
        buf
    });
    let started = Instant::now();
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() >= limit {
            timed_out = true;
            let _ = child.kill();
            break child.wait()?;
        }
        thread::sleep(Duration::from_millis(50));
    };
    if let Some(f) = feeder {
        let _ = f.join();
    }
    let stdout = String::from_utf8_lossy(&out_reader.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned();
    Ok(CmdOutput {
        status: if timed_out { None } else { status.code() },
        stdout,
        stderr,
        timed_out,
    })
}

/// Runs a host tool that must succeed, with a clear error naming it otherwise.
pub fn run_checked(cmd: &mut Command, limit: Duration) -> Result<CmdOutput> {
    let shown = format!("{cmd:?}");
    let out = run_with_limit(cmd, None, limit)?;
    if out.timed_out {
        bail!("{shown} did not finish within {limit:?}");
    }
    if !out.success() {
        bail!(
            "{shown} failed with {:?}:\n{}{}",
            out.status,
            out.stdout,
            out.stderr
        );
    }
    Ok(out)
}

/// Whether `program` can be found on PATH (or is an existing path).
pub fn on_path(program: &str) -> bool {
    if program.contains('/') {
        return std::path::Path::new(program).exists();
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_output_and_status() {
        let out = run_with_limit(
            Command::new("sh").args(["-c", "cat; echo err >&2; exit 3"]),
            Some(b"hello"),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(out.stdout, "hello");
        assert_eq!(out.stderr, "err\n");
        assert_eq!(out.status, Some(3));
        assert!(!out.timed_out);
    }

    #[test]
    fn kills_at_the_limit() {
        let started = Instant::now();
        let out = run_with_limit(
            Command::new("sleep").arg("30"),
            None,
            Duration::from_millis(300),
        )
        .unwrap();
        assert!(out.timed_out);
        assert_eq!(out.status, None);
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn finds_programs_on_path() {
        assert!(on_path("sh"));
        assert!(!on_path("no-such-program-aiwimg"));
    }
}
