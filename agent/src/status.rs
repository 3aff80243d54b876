//! What `aiw-agent status` shows, kept in /run/aiware/status.json (no secrets).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt::Write as _;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub agent_version: String,
    pub image: Option<Value>,
    /// `starting`, `invalid-settings`, `no-user-data`, `configured`, `joining`, `joined`.
    pub phase: String,
    pub datasource: Option<String>,
    pub datasource_reason: Option<String>,
    /// What the platform was told of this boot (Azure's "ready" report), or
    /// why it could not be.
    #[serde(default)]
    pub platform_checkin: Option<String>,
    pub evidence: Option<Value>,
    pub settings: Option<Value>,
    pub settings_valid: bool,
    pub validation_errors: Vec<String>,
    pub modes: Vec<ModeStatus>,
    pub ports: Vec<String>,
    pub join: JoinStatus,
    pub gpus: Vec<crate::gpu::Gpu>,
    /// The controller's actions on this host: mode, containers, refusals.
    #[serde(default)]
    pub actions: ActionStatus,
    /// A/B image versions: booted, other slot, pending, rollback.
    #[serde(default)]
    pub update: Option<crate::update::UpdateFacts>,
    /// The update policy and what its last check found.
    #[serde(default)]
    pub update_check: Option<UpdateCheck>,
    pub last_error: Option<String>,
    pub errors_total: u64,
    pub updated_unix: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UpdateCheck {
    /// `off`, `notify`, `auto`.
    pub policy: String,
    /// The newer version the server offers, if any.
    pub available: Option<String>,
    pub checked_unix: Option<u64>,
    /// What the policy did or why it could not.
    pub note: Option<String>,
    /// `auto` installed this version and reboots into it once running tasks end.
    #[serde(default)]
    pub reboot_for: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ModeStatus {
    pub mode: String,
    pub services: Vec<(String, String)>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JoinStatus {
    pub controller: Option<String>,
    /// `not-configured`, `waiting-for-controller`, `registering`, `joined`, `failed`.
    pub state: String,
    pub host_id: Option<String>,
    pub joined_unix: Option<u64>,
    pub last_heartbeat_unix: Option<u64>,
    pub heartbeats: u64,
    pub mounts: Vec<String>,
    /// The last status report, from gathering its facts (Docker's stats of
    /// every task container included) to the controller's reply, in ms.
    #[serde(default)]
    pub last_report_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ActionStatus {
    /// `continue`, `drain`, `pause`, `terminate`.
    pub host_mode: String,
    /// Why container actions cannot run (no Docker), if so.
    pub runtime_error: Option<String>,
    /// `containerStatus[]` of the last report.
    pub containers: Vec<Value>,
    /// The last refused or failed actions (newest last, at most 20).
    pub errors: Vec<String>,
    /// Actions refused or failed since the agent started.
    #[serde(default)]
    pub errors_total: u64,
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Status {
    pub fn human(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "aiw-agent {}  phase: {}", self.agent_version, self.phase);
        if let Some(img) = &self.image {
            let _ = writeln!(
                s,
                "image:      profile {} version {}",
                img["profile"].as_str().unwrap_or("?"),
                img["version"].as_str().unwrap_or("?")
            );
        }
        let _ = writeln!(
            s,
            "datasource: {} ({})",
            self.datasource.as_deref().unwrap_or("none"),
            self.datasource_reason
                .as_deref()
                .unwrap_or("no evidence of any")
        );
        if let Some(u) = &self.update {
            let _ = writeln!(s, "update:     {}", u.human());
        }
        if let Some(c) = &self.update_check {
            let _ = writeln!(
                s,
                "            policy {}; {}{}",
                c.policy,
                match &c.available {
                    Some(v) => format!("{v} available"),
                    None if c.checked_unix.is_some() => "up to date".to_string(),
                    None => "not checked yet".to_string(),
                },
                c.note
                    .as_deref()
                    .map(|n| format!("; {n}"))
                    .unwrap_or_default()
            );
        }
        if let Some(c) = &self.platform_checkin {
            let _ = writeln!(s, "platform:   {c}");
        }
        if !self.validation_errors.is_empty() {
            let _ = writeln!(s, "settings:   INVALID");
            for e in &self.validation_errors {
                let _ = writeln!(s, "  - {e}");
            }
        } else {
            let _ = writeln!(s, "settings:   valid");
        }
        if let Some(set) = &self.settings {
            if let Some(vars) = set["vars"].as_object() {
                for (k, v) in vars {
                    let _ = writeln!(s, "  {k}={}", v.as_str().unwrap_or(""));
                }
            }
            if let Some(w) = set["warnings"].as_array() {
                for w in w {
                    let _ = writeln!(s, "  warning: {}", w.as_str().unwrap_or(""));
                }
            }
        }
        let _ = writeln!(s, "modes:");
        if self.modes.is_empty() {
            let _ = writeln!(s, "  (none)");
        }
        for m in &self.modes {
            let svc: Vec<String> = m
                .services
                .iter()
                .map(|(u, st)| format!("{u} {st}"))
                .collect();
            let _ = writeln!(
                s,
                "  {:<11} {}",
                m.mode,
                if svc.is_empty() {
                    "(no services)".into()
                } else {
                    svc.join(", ")
                }
            );
        }
        let _ = writeln!(s, "ports:      {}", self.ports.join(" "));
        let j = &self.join;
        let _ = writeln!(
            s,
            "join:       {} (controller {})",
            j.state,
            j.controller.as_deref().unwrap_or("none")
        );
        if let Some(id) = &j.host_id {
            let _ = writeln!(
                s,
                "  hostID {id}, heartbeats {}, last at {}{}",
                j.heartbeats,
                j.last_heartbeat_unix
                    .map(|t| t.to_string())
                    .unwrap_or("-".into()),
                j.last_report_ms
                    .map(|ms| format!(" (took {ms} ms)"))
                    .unwrap_or_default()
            );
        }
        for m in &j.mounts {
            let _ = writeln!(s, "  mount {m}");
        }
        let a = &self.actions;
        if !a.host_mode.is_empty() {
            let _ = writeln!(
                s,
                "host mode:  {}, {} container(s){}",
                a.host_mode,
                a.containers.len(),
                a.runtime_error
                    .as_deref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            );
            for c in &a.containers {
                let _ = writeln!(
                    s,
                    "  launch {} engine {} {} {}",
                    c["launchID"].as_str().unwrap_or("?"),
                    c["engineID"].as_str().unwrap_or("?"),
                    c["state"].as_str().unwrap_or("?"),
                    c["dockerContainerId"]
                        .as_str()
                        .unwrap_or("?")
                        .get(..12)
                        .unwrap_or("")
                );
            }
            for e in &a.errors {
                let _ = writeln!(s, "  refused: {e}");
            }
        }
        if self.gpus.is_empty() {
            let _ = writeln!(s, "gpus:       none");
        } else {
            for g in &self.gpus {
                let _ = writeln!(s, "gpu:        {} {}", g.pci_address, g.name);
            }
        }
        let _ = writeln!(
            s,
            "last error: {}",
            self.last_error.as_deref().unwrap_or("none")
        );
        s
    }
}
