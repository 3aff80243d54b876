//! The node's update policy from launch data, and what it does at each check.
//!
//!   AIWARE_UPDATE_POLICY  off | notify (default) | auto
//!   AIWARE_UPDATE_URL     the update server (else the image's `update_url`)
//!   AIWARE_UPDATE_VERSION install exactly this version, never a newer one
//!   AIWARE_UPDATE_WINDOW  HH:MM-HH:MM (UTC) when `auto` may install and reboot
//!   AIWARE_UPDATE_CHECK_INTERVAL  seconds between checks (default 21600)
//!
//! `notify` checks and reports what is available (status, metrics); `auto`
//! also installs it inside the window and reboots once the running tasks
//! ended (the node drains first, as for the controller's `drain`).

use super::{compare_versions, UpdateFacts};
use crate::settings::Settings;
use std::cmp::Ordering;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Off,
    Notify,
    Auto,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    pub url: Option<String>,
    pub pin: Option<String>,
    /// Minutes after midnight UTC, start and end (end may be before start:
    /// the window spans midnight).
    pub window: Option<(u32, u32)>,
    pub check_interval_s: u64,
}

pub const DEFAULT_CHECK_INTERVAL_S: u64 = 6 * 3600;

fn minutes(hhmm: &str) -> Option<u32> {
    let (h, m) = hhmm.trim().split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 60 + m)
}

impl Policy {
    /// The policy of `s`, or what is wrong with it.
    pub fn from_settings(s: &Settings) -> Result<Policy, Vec<String>> {
        let mut errs = Vec::new();
        let mode = match s.get("AIWARE_UPDATE_POLICY").map(str::trim) {
            None | Some("") | Some("notify") => Mode::Notify,
            Some("off") => Mode::Off,
            Some("auto") => Mode::Auto,
            Some(o) => {
                errs.push(format!(
                    "AIWARE_UPDATE_POLICY={o:?}: use off, notify or auto"
                ));
                Mode::Notify
            }
        };
        let url = s.get("AIWARE_UPDATE_URL").map(|u| u.trim().to_string());
        if let Some(u) = &url {
            if !(u.starts_with("http://") || u.starts_with("https://"))
                || u.contains(char::is_whitespace)
            {
                errs.push(format!(
                    "AIWARE_UPDATE_URL={u:?}: give the update server as http(s)://HOST[:PORT]/PATH"
                ));
            }
        }
        let pin = s.get("AIWARE_UPDATE_VERSION").map(|v| v.trim().to_string());
        if let Some(p) = &pin {
            if p.is_empty() || p.contains(['_', '+', '/', ' ']) {
                errs.push(format!(
                    "AIWARE_UPDATE_VERSION={p:?}: an image version has no '_', '+', '/' or spaces"
                ));
            }
        }
        let window = match s.get("AIWARE_UPDATE_WINDOW") {
            None => None,
            Some(w) => match w
                .split_once('-')
                .and_then(|(a, b)| Some((minutes(a)?, minutes(b)?)))
            {
                Some(x) => Some(x),
                None => {
                    errs.push(format!(
                        "AIWARE_UPDATE_WINDOW={w:?}: give HH:MM-HH:MM in UTC, e.g. 02:00-05:00"
                    ));
                    None
                }
            },
        };
        let check_interval_s = match s.get("AIWARE_UPDATE_CHECK_INTERVAL") {
            None => DEFAULT_CHECK_INTERVAL_S,
            Some(v) => match v.trim().parse::<u64>() {
                Ok(n) if n >= 5 => n,
                _ => {
                    errs.push(format!(
                        "AIWARE_UPDATE_CHECK_INTERVAL={v:?}: give seconds, at least 5"
                    ));
                    DEFAULT_CHECK_INTERVAL_S
                }
            },
        };
        if errs.is_empty() {
            Ok(Policy {
                mode,
                url,
                pin,
                window,
                check_interval_s,
            })
        } else {
            Err(errs)
        }
    }

    /// Whether `unix` (seconds, UTC) is inside the window (always without one).
    pub fn in_window(&self, unix: u64) -> bool {
        let Some((from, to)) = self.window else {
            return true;
        };
        let now = ((unix / 60) % (24 * 60)) as u32;
        if from <= to {
            (from..to).contains(&now)
        } else {
            now >= from || now < to
        }
    }

    /// What to install, given the node's facts and what the server offers
    /// (`check-new`'s answer). Never the version the node fell back from,
    /// never past a pin, never while an installed version waits for its reboot.
    pub fn wanted(&self, facts: &UpdateFacts, offered: Option<&str>) -> Option<String> {
        if self.mode == Mode::Off || facts.pending_reboot.is_some() {
            return None;
        }
        let v = match &self.pin {
            Some(pin) => pin.as_str(),
            None => offered?,
        };
        let newer = compare_versions(v, &facts.booted) == Ordering::Greater;
        let failed_before = facts.rolled_back_from.as_deref() == Some(v);
        (newer && !failed_before).then(|| v.to_string())
    }
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Off => "off",
        Mode::Notify => "notify",
        Mode::Auto => "auto",
    }
}

/// Checks the update server every `check_interval_s` (the first a minute
/// after boot) in a thread of its own, so a slow server never delays a
/// status report. `auto` installs inside the window, then asks the report
/// loop to drain (`reboot_for`) and reboots once the controller has been
/// told and no task runs.
pub fn spawn_checks(
    policy: Policy,
    paths: crate::paths::Paths,
    status: std::sync::Arc<std::sync::Mutex<crate::status::Status>>,
    power: std::sync::Arc<dyn crate::controller::tasks::PowerControl>,
) {
    use crate::status::{now_unix, UpdateCheck};
    let record = |status: &std::sync::Mutex<crate::status::Status>,
                  f: &dyn Fn(&mut UpdateCheck)| {
        if let Ok(mut st) = status.lock() {
            f(st.update_check.get_or_insert_with(Default::default));
        }
    };
    record(&status, &|c| c.policy = mode_name(policy.mode).into());
    if policy.mode == Mode::Off {
        return;
    }
    std::thread::spawn(move || {
        let mut wait = std::time::Duration::from_secs(policy.check_interval_s.min(60));
        loop {
            std::thread::sleep(wait);
            wait = std::time::Duration::from_secs(policy.check_interval_s);
            let Some(facts) = super::UpdateFacts::gather(&paths) else {
                return;
            };
            // What is installed changes under us too (`aiw-agent update apply`).
            refresh_facts(&status, &facts);
            let offered = match super::sysupdate::check_new() {
                Ok(v) => v,
                Err(e) => {
                    crate::log::info(&format!("update check failed: {e}"));
                    record(&status, &|c| c.note = Some(format!("check failed: {e}")));
                    continue;
                }
            };
            record(&status, &|c| {
                c.available = offered.clone();
                c.checked_unix = Some(now_unix());
                c.note = None;
            });
            if let Some(v) = &offered {
                crate::log::info(&format!("update available: {v} (booted {})", facts.booted));
            }
            if policy.mode != Mode::Auto {
                continue;
            }
            let target = policy
                .wanted(&facts, offered.as_deref())
                .or(facts.pending_reboot.clone());
            let Some(v) = target else { continue };
            if !policy.in_window(now_unix()) {
                record(&status, &|c| {
                    c.note = Some(format!("{v} waits for the update window"))
                });
                continue;
            }
            if facts.pending_reboot.as_deref() != Some(v.as_str()) {
                crate::log::console(&format!("installing image version {v}"));
                if let Err(e) = super::sysupdate::update(Some(&v), false) {
                    crate::log::console(&format!("installing {v} failed: {e}"));
                    record(&status, &|c| {
                        c.note = Some(format!("installing {v} failed: {e}"))
                    });
                    continue;
                }
            }
            if let Some(after) = super::UpdateFacts::gather(&paths) {
                refresh_facts(&status, &after);
            }
            record(&status, &|c| c.reboot_for = Some(v.clone()));
            reboot_when_drained(&status, power.as_ref(), &v);
            return;
        }
    });
}

fn refresh_facts(status: &std::sync::Mutex<crate::status::Status>, facts: &super::UpdateFacts) {
    if let Ok(mut st) = status.lock() {
        st.update = Some(facts.clone());
    }
}

/// Reboots once the controller has had a report saying the node drains and
/// no task runs (at once on a node that reports to no controller).
fn reboot_when_drained(
    status: &std::sync::Mutex<crate::status::Status>,
    power: &dyn crate::controller::tasks::PowerControl,
    version: &str,
) {
    let (joined, beats) = status
        .lock()
        .map(|s| (s.join.state == "joined", s.join.heartbeats))
        .unwrap_or((false, 0));
    loop {
        let drained = status.lock().is_ok_and(|s| {
            !joined || (s.join.heartbeats > beats + 1 && s.actions.containers.is_empty())
        });
        if drained {
            crate::log::console(&format!("rebooting into image version {version}"));
            match power.reboot() {
                Ok(()) => return,
                Err(e) => crate::log::console(&format!("cannot reboot: {e}")),
            }
        }
        std::thread::sleep(std::time::Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::userdata::UserData;

    fn policy(vars: &[(&str, &str)]) -> Result<Policy, Vec<String>> {
        let mut u = UserData::default();
        for (k, v) in vars {
            u.vars.insert(k.to_string(), v.to_string());
        }
        Policy::from_settings(&Settings::from_user_data(u, None))
    }

    fn facts(booted: &str) -> UpdateFacts {
        UpdateFacts {
            image_id: "aiware-engine".into(),
            booted: booted.into(),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_and_errors() {
        let p = policy(&[]).unwrap();
        assert_eq!(p.mode, Mode::Notify);
        assert_eq!(p.check_interval_s, DEFAULT_CHECK_INTERVAL_S);
        let errs = policy(&[
            ("AIWARE_UPDATE_POLICY", "sometimes"),
            ("AIWARE_UPDATE_URL", "ftp://x"),
            ("AIWARE_UPDATE_WINDOW", "2-5"),
            ("AIWARE_UPDATE_VERSION", "2_0"),
            ("AIWARE_UPDATE_CHECK_INTERVAL", "1"),
        ])
        .unwrap_err();
        assert_eq!(errs.len(), 5, "{errs:?}");
        assert!(errs[0].contains("off, notify or auto"));
    }

    #[test]
    fn windows_may_span_midnight() {
        let p = policy(&[("AIWARE_UPDATE_WINDOW", "22:00-02:30")]).unwrap();
        let at = |h: u64, m: u64| 86400 * 400 + h * 3600 + m * 60;
        assert!(p.in_window(at(23, 0)));
        assert!(p.in_window(at(2, 29)));
        assert!(!p.in_window(at(2, 30)));
        assert!(!p.in_window(at(12, 0)));
        let day = policy(&[("AIWARE_UPDATE_WINDOW", "02:00-05:00")]).unwrap();
        assert!(day.in_window(at(3, 0)) && !day.in_window(at(5, 0)));
        assert!(policy(&[]).unwrap().in_window(at(12, 0)));
    }

    #[test]
    fn never_the_failed_version_again_never_past_a_pin() {
        let p = policy(&[("AIWARE_UPDATE_POLICY", "auto")]).unwrap();
        assert_eq!(p.wanted(&facts("1"), Some("2")).as_deref(), Some("2"));
        assert_eq!(p.wanted(&facts("2"), None), None);
        let mut back = facts("2");
        back.rolled_back_from = Some("3".into());
        assert_eq!(p.wanted(&back, Some("3")), None, "no reinstall loop");
        assert_eq!(p.wanted(&back, Some("4")).as_deref(), Some("4"));
        let mut waiting = facts("1");
        waiting.pending_reboot = Some("2".into());
        assert_eq!(p.wanted(&waiting, Some("3")), None);
        let pinned = policy(&[
            ("AIWARE_UPDATE_POLICY", "auto"),
            ("AIWARE_UPDATE_VERSION", "2"),
        ])
        .unwrap();
        assert_eq!(pinned.wanted(&facts("1"), Some("5")).as_deref(), Some("2"));
        assert_eq!(pinned.wanted(&facts("2"), Some("5")), None);
        let off = policy(&[("AIWARE_UPDATE_POLICY", "off")]).unwrap();
        assert_eq!(off.wanted(&facts("1"), Some("2")), None);
    }
}
