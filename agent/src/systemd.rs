//! Starting and stopping units over D-Bus (`org.freedesktop.systemd1.Manager`),
//! runtime-enabled since /etc is read-only.

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long the boot-time agent waits for the system bus's socket to appear.
/// aiw-agent.service starts before sysinit.target (it reads its launch data
/// while early boot finishes), so dbus.socket may not listen yet; a connection
/// made while it listens but before dbus-daemon runs waits on the socket.
pub const BUS_WAIT_AT_BOOT: Duration = Duration::from_secs(60);

/// The system bus, waiting up to `wait` for its socket to exist (not when
/// `DBUS_SYSTEM_BUS_ADDRESS` names another).
pub fn system_bus(wait: Duration) -> Result<zbus::blocking::Connection, String> {
    let socket = std::path::Path::new("/run/dbus/system_bus_socket");
    let deadline = Instant::now() + wait;
    while std::env::var_os("DBUS_SYSTEM_BUS_ADDRESS").is_none()
        && !socket.exists()
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    zbus::blocking::Connection::system().map_err(|e| e.to_string())
}

pub trait UnitControl {
    /// Enables at runtime (under /run) and starts the units.
    fn enable_and_start(&self, units: &[String]) -> Result<(), String>;
    /// Stops the units and drops any runtime enablement.
    fn stop_and_disable(&self, units: &[String]) -> Result<(), String>;
    /// `active`, `inactive`, `failed`, ... or `unknown`.
    fn active_state(&self, unit: &str) -> String;
    /// Restarts the unit if it runs (a changed configuration read again).
    fn try_restart(&self, unit: &str) -> Result<(), String>;
    /// Asks a running (or starting) unit to read its configuration again,
    /// restarting it only if it cannot reload; nothing if it is stopped.
    fn try_reload(&self, unit: &str) -> Result<(), String>;
}

/// Whether a unit in this `ActiveState` runs or is on its way to (starting,
/// reloading): what must be stopped before its files are changed under it.
pub fn is_up_or_coming_up(active_state: &str) -> bool {
    matches!(active_state, "active" | "activating" | "reloading")
}

/// Asks logind to `PowerOff` or `Reboot` (what `systemctl poweroff|reboot`
/// ask for), without interactive authorization.
pub fn logind(method: &str) -> Result<(), String> {
    let conn = system_bus(Duration::ZERO)
        .map_err(|e| format!("cannot reach logind on the system bus: {e}"))?;
    conn.call_method(
        Some("org.freedesktop.login1"),
        "/org/freedesktop/login1",
        Some("org.freedesktop.login1.Manager"),
        method,
        &(false,),
    )
    .map(|_| ())
    .map_err(|e| format!("logind {method}: {e}"))
}

/// The real one: systemd on the system bus.
pub struct DbusSystemd {
    conn: OnceLock<Result<zbus::blocking::Connection, String>>,
    bus_wait: Duration,
}

const DEST: &str = "org.freedesktop.systemd1";
const PATH: &str = "/org/freedesktop/systemd1";
const MANAGER: &str = "org.freedesktop.systemd1.Manager";

impl DbusSystemd {
    /// Connected now (commands run by hand, after boot).
    pub fn connect() -> Result<Self, String> {
        let s = DbusSystemd {
            conn: OnceLock::new(),
            bus_wait: Duration::ZERO,
        };
        s.conn()?;
        Ok(s)
    }

    /// Connected at the first call, waiting for the bus then
    /// ([`BUS_WAIT_AT_BOOT`]): the boot-time agent finds its launch data
    /// before it needs systemd, while D-Bus is still starting.
    pub fn at_first_call() -> Self {
        DbusSystemd {
            conn: OnceLock::new(),
            bus_wait: BUS_WAIT_AT_BOOT,
        }
    }

    fn conn(&self) -> Result<&zbus::blocking::Connection, String> {
        self.conn
            .get_or_init(|| {
                system_bus(self.bus_wait)
                    .map_err(|e| format!("cannot reach systemd on the system bus: {e}"))
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// `enabled` (linked in /etc or /usr), `enabled-runtime`, `disabled`,
    /// `static`, ... or `unknown`.
    fn unit_file_state(&self, unit: &str) -> String {
        self.call("GetUnitFileState", &(unit,))
            .and_then(|m| m.body().deserialize::<String>().map_err(|e| e.to_string()))
            .unwrap_or_else(|_| "unknown".into())
    }

    fn call<B>(&self, method: &str, body: &B) -> Result<zbus::message::Message, String>
    where
        B: serde::Serialize + zbus::zvariant::DynamicType,
    {
        self.conn()?
            .call_method(Some(DEST), PATH, Some(MANAGER), method, body)
            .map_err(|e| format!("systemd {method}: {e}"))
    }
}

impl UnitControl for DbusSystemd {
    fn enable_and_start(&self, units: &[String]) -> Result<(), String> {
        if units.is_empty() {
            return Ok(());
        }
        // Units the image enables itself (what every mode of the image runs,
        // e.g. Docker on an engine image) are already starting: enabling them
        // again and reloading systemd would only cost time (3 s under TCG).
        let to_enable: Vec<String> = units
            .iter()
            .filter(|u| self.unit_file_state(u) != "enabled")
            .cloned()
            .collect();
        if !to_enable.is_empty() {
            // runtime=true: the symlinks go to /run/systemd/system, /etc stays
            // untouched. The reload also picks up unit files written under /run
            // since the last one (the mode containers' units).
            self.call("EnableUnitFiles", &(to_enable, true, true))?;
            self.call("Reload", &())?;
        }
        let mut errs = Vec::new();
        for u in units {
            if let Err(e) = self.call("StartUnit", &(u.as_str(), "replace")) {
                errs.push(format!("{u}: {e}"));
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs.join("; "))
        }
    }

    fn stop_and_disable(&self, units: &[String]) -> Result<(), String> {
        let mut errs = Vec::new();
        // What would start a unit again (docker.socket for docker.service, at
        // boot on an image that starts Docker beside the agent) stops first.
        let mut all: Vec<String> = Vec::new();
        for u in units {
            all.extend(self.unit_property_strings(u, "TriggeredBy"));
            all.push(u.clone());
        }
        for u in &all {
            if let Err(e) = self.call("StopUnit", &(u.as_str(), "replace")) {
                if !e.contains("NoSuchUnit") && !e.contains("not loaded") {
                    errs.push(format!("{u}: {e}"));
                }
            }
        }
        let _ = self.call("DisableUnitFiles", &(units.to_vec(), true));
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs.join("; "))
        }
    }

    fn active_state(&self, unit: &str) -> String {
        self.unit_property(unit, "ActiveState")
            .and_then(|v| String::try_from(v).ok())
            .unwrap_or_else(|| "unknown".into())
    }

    fn try_restart(&self, unit: &str) -> Result<(), String> {
        self.call("TryRestartUnit", &(unit, "replace"))
            .map(|_| ())
            .map_err(|e| format!("{unit}: {e}"))
    }
    fn try_reload(&self, unit: &str) -> Result<(), String> {
        // A unit still starting gets its reload queued after the start.
        self.call("ReloadOrTryRestartUnit", &(unit, "replace"))
            .map(|_| ())
            .map_err(|e| format!("{unit}: {e}"))
    }
}

impl DbusSystemd {
    /// A property of `org.freedesktop.systemd1.Unit`; None when the unit or
    /// the property cannot be read.
    fn unit_property(&self, unit: &str, name: &str) -> Option<zbus::zvariant::OwnedValue> {
        let path: zbus::zvariant::OwnedObjectPath = self
            .call("LoadUnit", &(unit,))
            .ok()?
            .body()
            .deserialize()
            .ok()?;
        self.conn()
            .ok()?
            .call_method(
                Some(DEST),
                path.as_str(),
                Some("org.freedesktop.DBus.Properties"),
                "Get",
                &("org.freedesktop.systemd1.Unit", name),
            )
            .ok()?
            .body()
            .deserialize::<zbus::zvariant::OwnedValue>()
            .ok()
    }

    /// A property holding unit names (`TriggeredBy`, `Wants`, ...).
    fn unit_property_strings(&self, unit: &str, name: &str) -> Vec<String> {
        self.unit_property(unit, name)
            .and_then(|v| Vec::<String>::try_from(v).ok())
            .unwrap_or_default()
    }
}

/// A test double that records what was asked and keeps unit states in memory.
#[derive(Default)]
pub struct RecordingUnits {
    pub calls: Mutex<Vec<String>>,
    pub states: Mutex<std::collections::BTreeMap<String, String>>,
}

impl UnitControl for RecordingUnits {
    fn enable_and_start(&self, units: &[String]) -> Result<(), String> {
        for u in units {
            self.calls.lock().unwrap().push(format!("start {u}"));
            self.states
                .lock()
                .unwrap()
                .insert(u.clone(), "active".into());
        }
        Ok(())
    }
    fn stop_and_disable(&self, units: &[String]) -> Result<(), String> {
        for u in units {
            self.calls.lock().unwrap().push(format!("stop {u}"));
            self.states
                .lock()
                .unwrap()
                .insert(u.clone(), "inactive".into());
        }
        Ok(())
    }
    fn active_state(&self, unit: &str) -> String {
        self.states
            .lock()
            .unwrap()
            .get(unit)
            .cloned()
            .unwrap_or_else(|| "inactive".into())
    }
    fn try_restart(&self, unit: &str) -> Result<(), String> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("try-restart {unit}"));
        Ok(())
    }
    fn try_reload(&self, unit: &str) -> Result<(), String> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("try-reload {unit}"));
        Ok(())
    }
}

/// Used where there is no system bus (e.g. `status` as a user): reports unknown.
pub struct NoSystemd(pub String);

impl UnitControl for NoSystemd {
    fn enable_and_start(&self, _: &[String]) -> Result<(), String> {
        Err(self.0.clone())
    }
    fn stop_and_disable(&self, _: &[String]) -> Result<(), String> {
        Err(self.0.clone())
    }
    fn active_state(&self, _: &str) -> String {
        "unknown".into()
    }
    fn try_restart(&self, _: &str) -> Result<(), String> {
        Err(self.0.clone())
    }
    fn try_reload(&self, _: &str) -> Result<(), String> {
        Err(self.0.clone())
    }
}

#[cfg(test)]
mod state_tests {
    use super::is_up_or_coming_up;

    #[test]
    fn a_unit_still_starting_counts_as_up() {
        for up in ["active", "activating", "reloading"] {
            assert!(is_up_or_coming_up(up), "{up}");
        }
        for down in ["inactive", "failed", "deactivating", "unknown", ""] {
            assert!(!is_up_or_coming_up(down), "{down}");
        }
    }
}
