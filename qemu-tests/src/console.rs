//! The guest's serial console, captured to a file: reading it as clean lines,
//! waiting for a line, and scanning it for signs of trouble.

use regex::Regex;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// How many console lines a timeout error shows.
pub const TAIL_LINES: usize = 40;

/// The console log of one VM (all its boots, appended).
#[derive(Debug, Clone)]
pub struct ConsoleLog {
    path: PathBuf,
}

/// A byte offset into the console log: waits look only at what came after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Mark(pub u64);

impl ConsoleLog {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        ConsoleLog { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The end of what has been written so far.
    pub fn mark(&self) -> Mark {
        Mark(std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0))
    }

    /// Clean lines written since `mark`.
    pub fn lines_since(&self, mark: Mark) -> Vec<String> {
        let raw = std::fs::read(&self.path).unwrap_or_default();
        let start = (mark.0 as usize).min(raw.len());
        clean_lines(&String::from_utf8_lossy(&raw[start..]))
    }

    /// All clean lines.
    pub fn lines(&self) -> Vec<String> {
        self.lines_since(Mark(0))
    }

    /// The last `n` clean lines, joined for an error message.
    pub fn tail(&self, n: usize) -> String {
        tail_of(&self.lines(), n)
    }
}

/// The last `n` of `lines`, indented, one per line.
pub fn tail_of(lines: &[String], n: usize) -> String {
    let start = lines.len().saturating_sub(n);
    let mut out = String::new();
    for l in &lines[start..] {
        out.push_str("    | ");
        out.push_str(l);
        out.push('\n');
    }
    if out.is_empty() {
        out.push_str("    (console empty)\n");
    }
    out
}

/// Splits raw console output into lines without terminal escapes, carriage
/// returns or other control characters; blank lines are dropped.
pub fn clean_lines(raw: &str) -> Vec<String> {
    static ESCAPES: OnceLock<Regex> = OnceLock::new();
    let escapes = ESCAPES.get_or_init(|| {
        // CSI sequences (colors, cursor moves, `ESC[=3h`), OSC, and two-byte escapes.
        Regex::new(r"\x1b\[[0-9;=?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[@-Z\\-_]").unwrap()
    });
    let stripped = escapes.replace_all(raw, "");
    stripped
        .split('\n')
        .map(|l| {
            // A carriage return mid-line means the rest overwrote the start.
            let l = l.trim_end_matches('\r');
            let l = l.rsplit('\r').next().unwrap_or(l);
            l.chars()
                .filter(|c| !c.is_control() || *c == '\t')
                .collect::<String>()
                .trim_end()
                .to_string()
        })
        .filter(|l| !l.is_empty())
        .collect()
}

/// A console line that means something went wrong in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trouble {
    pub kind: &'static str,
    pub line: String,
}

impl std::fmt::Display for Trouble {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind, self.line)
    }
}

fn trouble_patterns() -> &'static [(&'static str, Regex)] {
    static PATTERNS: OnceLock<Vec<(&'static str, Regex)>> = OnceLock::new();
    PATTERNS.get_or_init(|| {
        [
            (
                "emergency shell",
                r"(?i)emergency (mode|shell)|Entering emergency|give root password for maintenance",
            ),
            ("kernel panic", r"Kernel panic"),
            ("kernel oops", r"\bOops\b|\bBUG: |general protection fault"),
            (
                "verity error",
                r"(?i)verity.*(error|corrupt|fail|mismatch)|(error|corrupt|fail).*verity",
            ),
            ("I/O error", r"I/O error"),
            (
                "unit failed to start",
                r"Failed to start|Dependency failed for",
            ),
            ("device timeout", r"Timed out waiting for device"),
        ]
        .into_iter()
        .map(|(k, p)| (k, Regex::new(p).unwrap()))
        .collect()
    })
}

/// Every line of `lines` that matches a trouble pattern.
pub fn find_trouble(lines: &[String]) -> Vec<Trouble> {
    lines
        .iter()
        .filter_map(|line| {
            trouble_patterns()
                .iter()
                .find(|(_, re)| re.is_match(line))
                .map(|(kind, _)| Trouble {
                    kind,
                    line: line.clone(),
                })
        })
        .collect()
}

/// The agent's readiness contract on the console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentReport {
    /// `aiw-agent: ready ...`
    Ready(String),
    /// `aiw-agent: invalid settings: ...`
    InvalidSettings(String),
}

pub const AGENT_READY: &str = "aiw-agent: ready";
pub const AGENT_INVALID: &str = "aiw-agent: invalid settings:";

/// The first agent report in `lines`, if any. Kernel timestamps or other
/// output interleaved before it on the same line are tolerated.
pub fn agent_report(lines: &[String]) -> Option<AgentReport> {
    lines.iter().find_map(|l| {
        if let Some(i) = l.find(AGENT_READY) {
            Some(AgentReport::Ready(l[i..].to_string()))
        } else {
            l.find(AGENT_INVALID)
                .map(|i| AgentReport::InvalidSettings(l[i..].to_string()))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(s: &[&str]) -> Vec<String> {
        s.iter().map(|l| l.to_string()).collect()
    }

    #[test]
    fn cleans_ovmf_and_systemd_escapes() {
        let raw = "\x1b[2J\x1b[01;01H\x1b[=3h\x1b[2J\x1b[01;01HBdsDxe: loading Boot0001\r\n\
                   [\x1b[0;32m  OK  \x1b[0m] Started ssh.service.\r\n\r\n\
                   Press ESC in 5 seconds\rPress ESC in 4 seconds\r\n";
        assert_eq!(
            clean_lines(raw),
            lines(&[
                "BdsDxe: loading Boot0001",
                "[  OK  ] Started ssh.service.",
                "Press ESC in 4 seconds"
            ])
        );
    }

    #[test]
    fn finds_each_kind_of_trouble() {
        let console = lines(&[
            "[  OK  ] Reached target multi-user.target.",
            "You are in emergency mode. After logging in, type \"journalctl -xb\"",
            "[   12.1] Kernel panic - not syncing: VFS: Unable to mount root fs",
            "[    3.2] Oops: 0000 [#1] PREEMPT SMP NOPTI",
            "[    4.0] device-mapper: verity: 254:0: data block 7 is corrupted",
            "[    5.0] blk_update_request: I/O error, dev vda, sector 2048",
            "[FAILED] Failed to start docker.service - Docker Application Container Engine.",
            "[ TIME ] Timed out waiting for device dev-disk-by\\x2dlabel-var.device.",
            "Loopback oopsie in a hostname is fine",
        ]);
        let kinds: Vec<&str> = find_trouble(&console).iter().map(|t| t.kind).collect();
        assert_eq!(
            kinds,
            [
                "emergency shell",
                "kernel panic",
                "kernel oops",
                "verity error",
                "I/O error",
                "unit failed to start",
                "device timeout"
            ]
        );
    }

    #[test]
    fn a_clean_boot_has_no_trouble() {
        let console = lines(&[
            "[    1.0] device-mapper: verity: sha256 using implementation \"sha256-generic\"",
            "[  OK  ] Started systemd-veritysetup@root.service - Integrity Protection Setup.",
            "[  OK  ] Finished systemd-repart.service - Repartition Root Disk.",
            "aiw-agent: ready mode=engine host=abc",
        ]);
        assert_eq!(find_trouble(&console), vec![]);
    }

    #[test]
    fn agent_report_is_found_even_interleaved() {
        assert_eq!(agent_report(&lines(&["booting", "nothing"])), None);
        assert_eq!(
            agent_report(&lines(&["[   30.1] xyz aiw-agent: ready modes=engine"])),
            Some(AgentReport::Ready("aiw-agent: ready modes=engine".into()))
        );
        assert_eq!(
            agent_report(&lines(&[
                "aiw-agent: invalid settings: unknown mode \"bogus\""
            ])),
            Some(AgentReport::InvalidSettings(
                "aiw-agent: invalid settings: unknown mode \"bogus\"".into()
            ))
        );
    }

    #[test]
    fn marks_limit_what_is_read() {
        let dir = std::env::temp_dir().join(format!("aiwimg-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.log");
        std::fs::write(&path, "first boot\naiw-agent: ready\n").unwrap();
        let log = ConsoleLog::new(&path);
        let mark = log.mark();
        assert!(agent_report(&log.lines_since(mark)).is_none());
        std::fs::write(&path, "first boot\naiw-agent: ready\nsecond boot\n").unwrap();
        assert_eq!(log.lines_since(mark), lines(&["second boot"]));
        assert!(log.tail(1).contains("second boot"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
