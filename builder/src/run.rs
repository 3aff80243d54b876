//! Running external tools: one place that captures their output and turns a
//! failure into an error that says what was being done and what the tool said.

use anyhow::{bail, Context, Result};
use std::ffi::OsStr;
use std::process::{Command, Stdio};

pub struct Cmd {
    inner: Command,
}

impl Cmd {
    pub fn new(program: &str) -> Self {
        Cmd {
            inner: Command::new(program),
        }
    }
    pub fn arg(&mut self, a: impl AsRef<OsStr>) -> &mut Self {
        self.inner.arg(a);
        self
    }
    pub fn args<I, S>(&mut self, a: I) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.inner.args(a);
        self
    }
    pub fn env(&mut self, k: &str, v: impl AsRef<OsStr>) -> &mut Self {
        self.inner.env(k, v);
        self
    }
    pub fn current_dir(&mut self, d: impl AsRef<std::path::Path>) -> &mut Self {
        self.inner.current_dir(d);
        self
    }
    fn describe(&self) -> String {
        let mut s = self.inner.get_program().to_string_lossy().to_string();
        for a in self.inner.get_args().take(12) {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    }
}

/// Runs the command; returns its stdout. On failure the error names `what`,
/// the command and the last lines of its output.
pub fn run_cmd(what: &str, cmd: &mut Cmd) -> Result<String> {
    let out = cmd
        .inner
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{what}: cannot start {}", cmd.describe()))?;
    if !out.status.success() {
        let mut text = String::from_utf8_lossy(&out.stderr).to_string();
        text.push_str(&String::from_utf8_lossy(&out.stdout));
        let tail: Vec<&str> = text.lines().rev().take(25).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "{what} failed ({}): {}\n  {}",
            out.status,
            cmd.describe(),
            tail.join("\n  ")
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}
