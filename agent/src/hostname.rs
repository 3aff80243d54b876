//! Setting the node's host name as its transient hostname, through
//! `org.freedesktop.hostname1` (systemd-hostnamed), as afterburn does.
//!
//! hostnamed gives a static hostname (/etc/hostname) precedence over a
//! transient one: when /etc/hostname names something else (these images bake
//! `aiware` into their read-only /etc), `SetHostname` leaves the kernel's
//! hostname at the static one. The kernel's hostname is then set directly,
//! which is what `hostnamectl` shows as the transient hostname. Where that is
//! known beforehand (a read-only /etc/hostname naming another host, every
//! boot of these images), hostnamed is not asked at all: the call would
//! change nothing and costs hostnamed's start (0.7 s of the boot under TCG).

use std::path::PathBuf;

/// What setting a hostname needs from the system; a trait so tests record it.
pub trait HostnameBackend {
    /// hostnamed `SetHostname(name, interactive=false)`: the transient hostname.
    fn set_transient(&self, name: &str) -> Result<(), String>;
    /// hostnamed `SetStaticHostname`: writes /etc/hostname.
    fn set_static(&self, name: &str) -> Result<(), String>;
    fn kernel_hostname(&self) -> String;
    /// The static hostname (/etc/hostname's), if any.
    fn static_hostname(&self) -> Option<String>;
    /// sethostname(2).
    fn set_kernel_hostname(&self, name: &str) -> Result<(), String>;
    /// Whether /etc can be written (it is read-only on these images).
    fn etc_writable(&self) -> bool;
}

/// Sets `name`; returns how, for the journal.
pub fn set(b: &dyn HostnameBackend, name: &str) -> Result<String, String> {
    let mut notes = Vec::new();
    // Kept across reboots by hostnamed itself where /etc can hold it.
    if b.etc_writable() {
        match b.set_static(name) {
            Ok(()) => notes.push("written to /etc/hostname".to_string()),
            Err(e) => notes.push(format!("not written to /etc/hostname ({e})")),
        }
    } else if let Some(fixed) = b.static_hostname().filter(|s| s != name) {
        b.set_kernel_hostname(name)?;
        return Ok(format!(
            "set as the kernel's hostname (hostnamed would keep the static hostname {fixed:?} of the read-only /etc/hostname ahead of it)"
        ));
    }
    let transient = b.set_transient(name);
    if b.kernel_hostname() == name {
        notes.insert(0, "set through org.freedesktop.hostname1".into());
        return Ok(notes.join("; "));
    }
    let why = match transient {
        Ok(()) => format!(
            "hostnamed kept the static hostname {:?} of /etc/hostname ahead of it",
            b.kernel_hostname()
        ),
        Err(e) => e,
    };
    b.set_kernel_hostname(name)?;
    notes.insert(0, format!("set as the kernel's hostname ({why})"));
    Ok(notes.join("; "))
}

/// The real system: hostnamed on the system bus, the kernel, `<root>/etc`.
pub struct SystemHostname {
    pub etc: PathBuf,
}

const DEST: &str = "org.freedesktop.hostname1";
const PATH: &str = "/org/freedesktop/hostname1";

impl SystemHostname {
    fn call(&self, method: &str, name: &str) -> Result<(), String> {
        let conn = crate::systemd::system_bus(crate::systemd::BUS_WAIT_AT_BOOT)
            .map_err(|e| format!("cannot reach hostnamed on the system bus: {e}"))?;
        conn.call_method(Some(DEST), PATH, Some(DEST), method, &(name, false))
            .map(|_| ())
            .map_err(|e| format!("hostnamed {method}: {e}"))
    }
}

impl HostnameBackend for SystemHostname {
    fn set_transient(&self, name: &str) -> Result<(), String> {
        self.call("SetHostname", name)
    }
    fn set_static(&self, name: &str) -> Result<(), String> {
        self.call("SetStaticHostname", name)
    }
    fn kernel_hostname(&self) -> String {
        crate::host::hostname()
    }
    fn static_hostname(&self) -> Option<String> {
        read_static_hostname(&std::fs::read_to_string(self.etc.join("hostname")).ok()?)
    }
    fn set_kernel_hostname(&self, name: &str) -> Result<(), String> {
        // SAFETY: pointer and length describe name's bytes.
        let rc = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
        if rc != 0 {
            return Err(format!(
                "sethostname({name}): {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }
    fn etc_writable(&self) -> bool {
        let Ok(c) = std::ffi::CString::new(self.etc.as_os_str().as_encoded_bytes()) else {
            return false;
        };
        // SAFETY: c is a valid NUL-terminated path. A read-only mount gives EROFS.
        unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
    }
}

/// The name in /etc/hostname's text as hostnamed reads it: the first line
/// that is neither empty nor a comment.
fn read_static_hostname(text: &str) -> Option<String> {
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
}

/// A TEST DOUBLE of [`HostnameBackend`]: hostnamed's precedence rule over a
/// pretend kernel hostname, every call recorded.
#[derive(Default)]
pub struct RecordingHostname {
    pub static_hostname: std::sync::Mutex<Option<String>>,
    pub kernel: std::sync::Mutex<String>,
    pub etc_writable: bool,
    /// hostnamed cannot be reached (no system bus).
    pub no_bus: bool,
    pub calls: std::sync::Mutex<Vec<String>>,
}

impl RecordingHostname {
    fn record(&self, c: String) {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).push(c);
    }
}

impl HostnameBackend for RecordingHostname {
    fn set_transient(&self, name: &str) -> Result<(), String> {
        self.record(format!("SetHostname {name}"));
        if self.no_bus {
            return Err("cannot reach hostnamed on the system bus".into());
        }
        // hostnamed's context_update_kernel_hostname: the static name wins.
        let st = self.static_hostname.lock().unwrap().clone();
        *self.kernel.lock().unwrap() = st.unwrap_or_else(|| name.to_string());
        Ok(())
    }
    fn set_static(&self, name: &str) -> Result<(), String> {
        self.record(format!("SetStaticHostname {name}"));
        if self.no_bus {
            return Err("cannot reach hostnamed on the system bus".into());
        }
        *self.static_hostname.lock().unwrap() = Some(name.to_string());
        *self.kernel.lock().unwrap() = name.to_string();
        Ok(())
    }
    fn kernel_hostname(&self) -> String {
        self.kernel.lock().unwrap().clone()
    }
    fn static_hostname(&self) -> Option<String> {
        self.static_hostname.lock().unwrap().clone()
    }
    fn set_kernel_hostname(&self, name: &str) -> Result<(), String> {
        self.record(format!("sethostname {name}"));
        *self.kernel.lock().unwrap() = name.to_string();
        Ok(())
    }
    fn etc_writable(&self) -> bool {
        self.etc_writable
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image_like(static_name: Option<&str>, etc_writable: bool) -> RecordingHostname {
        RecordingHostname {
            static_hostname: std::sync::Mutex::new(static_name.map(String::from)),
            kernel: std::sync::Mutex::new(static_name.unwrap_or("localhost").into()),
            etc_writable,
            ..RecordingHostname::default()
        }
    }

    #[test]
    fn without_a_static_hostname_hostnamed_sets_it() {
        let b = image_like(None, false);
        let how = set(&b, "ceo-engine").unwrap();
        assert_eq!(how, "set through org.freedesktop.hostname1");
        assert_eq!(b.kernel_hostname(), "ceo-engine");
        assert_eq!(*b.calls.lock().unwrap(), ["SetHostname ceo-engine"]);
    }

    #[test]
    fn the_baked_static_hostname_on_a_read_only_etc_is_overridden_in_the_kernel() {
        let b = image_like(Some("aiware"), false);
        let how = set(&b, "ceo-engine").unwrap();
        assert_eq!(b.kernel_hostname(), "ceo-engine");
        assert!(how.contains("static hostname \"aiware\""), "{how}");
        // hostnamed is not asked: it would keep "aiware".
        assert_eq!(*b.calls.lock().unwrap(), ["sethostname ceo-engine"]);
        assert_eq!(b.static_hostname.lock().unwrap().as_deref(), Some("aiware"));
    }

    #[test]
    fn a_writable_etc_keeps_it_as_the_static_hostname() {
        let b = image_like(Some("aiware"), true);
        let how = set(&b, "ceo-engine").unwrap();
        assert_eq!(
            how,
            "set through org.freedesktop.hostname1; written to /etc/hostname"
        );
        assert_eq!(
            b.static_hostname.lock().unwrap().as_deref(),
            Some("ceo-engine")
        );
    }

    #[test]
    fn no_system_bus_falls_back_to_the_kernel() {
        let b = RecordingHostname {
            no_bus: true,
            ..image_like(None, false)
        };
        let how = set(&b, "n1").unwrap();
        assert!(how.contains("cannot reach hostnamed"), "{how}");
        assert_eq!(b.kernel_hostname(), "n1");
    }

    #[test]
    fn the_static_hostname_already_named_goes_through_hostnamed() {
        let b = image_like(Some("ceo-engine"), false);
        let how = set(&b, "ceo-engine").unwrap();
        assert_eq!(how, "set through org.freedesktop.hostname1");
        assert_eq!(*b.calls.lock().unwrap(), ["SetHostname ceo-engine"]);
    }

    #[test]
    fn the_static_hostname_is_the_first_line_that_is_not_a_comment() {
        assert_eq!(
            read_static_hostname("# baked by aiwimg\n\n  aiware \nother\n").as_deref(),
            Some("aiware")
        );
        assert_eq!(read_static_hostname("# nothing\n\n"), None);
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("hostname"), "aiware\n").unwrap();
        let s = SystemHostname {
            etc: t.path().to_path_buf(),
        };
        assert_eq!(s.static_hostname().as_deref(), Some("aiware"));
    }

    #[test]
    fn a_read_only_directory_is_not_writable() {
        let t = tempfile::tempdir().unwrap();
        let s = SystemHostname {
            etc: t.path().to_path_buf(),
        };
        assert!(s.etc_writable());
        let missing = SystemHostname {
            etc: t.path().join("missing"),
        };
        assert!(!missing.etc_writable());
    }
}
