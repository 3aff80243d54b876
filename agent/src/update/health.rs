//! The boot health check (`aiw-agent health --boot`, run by
//! `aiw-boot-health.service`, which `boot-complete.target` requires).
//!
//! It passes when aiw-agent reached ready for the node's modes and every
//! service of those modes is active; it fails when aiw-agent failed, the
//! launch settings are invalid on this version, a mode service failed, or
//! none of that is decided within the timeout. Only local facts count: a
//! controller that does not answer is the network's fault, not the image's,
//! and must never roll a fleet back. The unit's `FailureAction=reboot` makes
//! a failed check use up one of the version's tries.

use crate::paths::Paths;
use crate::status::Status;
use crate::systemd::UnitControl;
use std::time::{Duration, Instant};

/// Phases in which aiw-agent has done its part of the boot.
const READY_PHASES: &[&str] = &["configured", "joined", "no-user-data"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Good(String),
    Bad(String),
    /// Not decided yet: why.
    Wait(String),
}

/// Judges one look at the node: the agent's status file (None if not yet
/// written), aiw-agent.service's state and the mode services' states.
pub fn judge(status: Option<&Status>, agent_state: &str, services: &[(String, String)]) -> Verdict {
    if agent_state == "failed" {
        return Verdict::Bad("aiw-agent.service failed".into());
    }
    let Some(st) = status else {
        return Verdict::Wait("aiw-agent has not written its status yet".into());
    };
    if st.phase == "invalid-settings" {
        return Verdict::Bad(format!(
            "the launch settings are invalid on this version: {}",
            st.validation_errors
                .first()
                .map(String::as_str)
                .unwrap_or("(no detail)")
        ));
    }
    if !READY_PHASES.contains(&st.phase.as_str()) {
        return Verdict::Wait(format!("aiw-agent is {}", st.phase));
    }
    if let Some((u, _)) = services.iter().find(|(_, s)| s == "failed") {
        return Verdict::Bad(format!("{u} failed"));
    }
    let waiting: Vec<&str> = services
        .iter()
        .filter(|(_, s)| s != "active")
        .map(|(u, _)| u.as_str())
        .collect();
    if !waiting.is_empty() {
        return Verdict::Wait(format!("not active yet: {}", waiting.join(", ")));
    }
    let modes: Vec<&str> = st.modes.iter().map(|m| m.mode.as_str()).collect();
    Verdict::Good(if modes.is_empty() {
        format!("aiw-agent is ready ({}), no run modes", st.phase)
    } else {
        format!(
            "aiw-agent is ready ({}) and the services of {} are active",
            st.phase,
            modes.join(",")
        )
    })
}

/// Looks every `poll` until the verdict is decided or `timeout` passed.
pub fn boot_check(
    paths: &Paths,
    units: &dyn UnitControl,
    timeout: Duration,
    poll: Duration,
) -> Result<String, String> {
    let until = Instant::now() + timeout;
    loop {
        let status: Option<Status> = std::fs::read(paths.status_file())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let services: Vec<(String, String)> = status
            .iter()
            .flat_map(|s| s.modes.iter())
            .flat_map(|m| m.services.iter())
            .map(|(u, _)| (u.clone(), units.active_state(u)))
            .collect();
        let last = match judge(
            status.as_ref(),
            &units.active_state("aiw-agent.service"),
            &services,
        ) {
            Verdict::Good(why) => return Ok(why),
            Verdict::Bad(why) => return Err(why),
            Verdict::Wait(why) => why,
        };
        if Instant::now() >= until {
            return Err(format!("not healthy after {} s: {last}", timeout.as_secs()));
        }
        std::thread::sleep(poll);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::ModeStatus;

    fn st(phase: &str) -> Status {
        Status {
            phase: phase.into(),
            modes: vec![ModeStatus {
                mode: "engine".into(),
                services: vec![("docker.service".into(), "active".into())],
            }],
            ..Default::default()
        }
    }

    fn svc(state: &str) -> Vec<(String, String)> {
        vec![("docker.service".into(), state.into())]
    }

    #[test]
    fn ready_with_active_services_is_good() {
        assert!(matches!(
            judge(Some(&st("joined")), "active", &svc("active")),
            Verdict::Good(w) if w.contains("engine")
        ));
        assert!(matches!(
            judge(Some(&st("configured")), "active", &svc("active")),
            Verdict::Good(_)
        ));
    }

    #[test]
    fn a_controller_that_does_not_answer_is_not_the_images_fault() {
        // "configured": modes up, the join still retrying in the background.
        let mut s = st("configured");
        s.join.state = "waiting-for-controller".into();
        assert!(matches!(
            judge(Some(&s), "active", &svc("active")),
            Verdict::Good(_)
        ));
    }

    #[test]
    fn failures_are_bad_and_the_undecided_waits() {
        assert!(matches!(
            judge(Some(&st("joined")), "failed", &svc("active")),
            Verdict::Bad(w) if w.contains("aiw-agent.service failed")
        ));
        let mut inv = st("invalid-settings");
        inv.validation_errors = vec!["AIWARE_MODE: unknown mode \"x\"".into()];
        assert!(matches!(
            judge(Some(&inv), "active", &[]),
            Verdict::Bad(w) if w.contains("unknown mode")
        ));
        assert!(matches!(
            judge(Some(&st("joined")), "active", &svc("failed")),
            Verdict::Bad(w) if w.contains("docker.service failed")
        ));
        assert!(matches!(
            judge(Some(&st("joined")), "active", &svc("activating")),
            Verdict::Wait(w) if w.contains("docker.service")
        ));
        assert!(matches!(
            judge(Some(&st("starting")), "activating", &[]),
            Verdict::Wait(_)
        ));
        assert!(matches!(judge(None, "activating", &[]), Verdict::Wait(_)));
    }
}
