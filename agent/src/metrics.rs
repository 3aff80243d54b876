//! Prometheus metrics on port 8000 (`/metrics`), the agent port of the guide.
//! A tiny blocking HTTP/1.1 server: one short-lived thread per connection.

use crate::status::Status;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub fn render(st: &Status) -> String {
    let b = |v: bool| if v { 1 } else { 0 };
    let mut out = String::new();
    let mut m = |name: &str, help: &str, kind: &str, value: String| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    };
    m(
        "aiw_agent_joined",
        "1 when the host is registered with the controller",
        "gauge",
        b(st.join.state == "joined").to_string(),
    );
    m(
        "aiw_agent_settings_valid",
        "1 when the launch settings validated",
        "gauge",
        b(st.settings_valid).to_string(),
    );
    m(
        "aiw_agent_last_heartbeat_timestamp_seconds",
        "Unix time of the last accepted status report",
        "gauge",
        st.join.last_heartbeat_unix.unwrap_or(0).to_string(),
    );
    m(
        "aiw_agent_heartbeats_total",
        "Status reports accepted by the controller",
        "counter",
        st.join.heartbeats.to_string(),
    );
    if let Some(ms) = st.join.last_report_ms {
        m(
            "aiw_agent_last_report_seconds",
            "The last status report, from gathering its facts to the controller's reply",
            "gauge",
            format!("{:.3}", ms as f64 / 1000.0),
        );
    }
    m(
        "aiw_agent_errors_total",
        "Errors met since the agent started",
        "counter",
        st.errors_total.to_string(),
    );
    m(
        "aiw_agent_gpus",
        "NVIDIA GPUs found on PCI",
        "gauge",
        st.gpus.len().to_string(),
    );
    m(
        "aiw_agent_containers",
        "Containers of the controller's launches on this host (running or paused)",
        "gauge",
        st.actions.containers.len().to_string(),
    );
    m(
        "aiw_agent_action_errors_total",
        "Controller actions refused or failed since the agent started",
        "counter",
        st.actions.errors_total.to_string(),
    );
    if !st.actions.host_mode.is_empty() {
        out.push_str(&format!(
            "# HELP aiw_agent_host_mode The controller's mode for this host\n# TYPE aiw_agent_host_mode gauge\naiw_agent_host_mode{{mode=\"{}\"}} 1\n",
            st.actions.host_mode
        ));
    }
    out.push_str(
        "# HELP aiw_agent_mode Run modes enabled on this node\n# TYPE aiw_agent_mode gauge\n",
    );
    for md in &st.modes {
        out.push_str(&format!("aiw_agent_mode{{mode=\"{}\"}} 1\n", md.mode));
    }
    if let Some(u) = &st.update {
        // Versions are [A-Za-z0-9.~-] (the builder refuses others): safe in a label.
        out.push_str(&format!(
            "# HELP aiw_agent_image_info The booted image version and the other slot's\n# TYPE aiw_agent_image_info gauge\n\
             aiw_agent_image_info{{image_id=\"{}\",version=\"{}\",other_slot=\"{}\",pending_reboot=\"{}\"}} 1\n",
            u.image_id,
            u.booted,
            u.other_slot.as_deref().unwrap_or(""),
            u.pending_reboot.as_deref().unwrap_or("")
        ));
        out.push_str(&format!(
            "# HELP aiw_agent_image_rolled_back 1 when systemd-boot fell back from a newer version that failed its boots\n# TYPE aiw_agent_image_rolled_back gauge\n\
             aiw_agent_image_rolled_back{{from=\"{}\"}} {}\n",
            u.rolled_back_from.as_deref().unwrap_or(""),
            u8::from(u.rolled_back_from.is_some())
        ));
    }
    if let Some(v) = st.update_check.as_ref().and_then(|c| c.available.as_ref()) {
        out.push_str(&format!(
            "# HELP aiw_agent_image_update_available A newer image version on the update server\n# TYPE aiw_agent_image_update_available gauge\n\
             aiw_agent_image_update_available{{version=\"{v}\"}} 1\n"
        ));
    }
    out
}

/// Serves `/metrics` from the shared status until the process ends.
pub fn serve(addr: SocketAddr, status: Arc<Mutex<Status>>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let status = status.clone();
            std::thread::spawn(move || {
                let _ = answer(conn, &status);
            });
        }
    });
    Ok(local)
}

fn answer(mut s: TcpStream, status: &Mutex<Status>) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/");
    let (code, ctype, body) = match path {
        "/metrics" => (
            "200 OK",
            "text/plain; version=0.0.4",
            render(&status.lock().unwrap_or_else(|e| e.into_inner())),
        ),
        _ => ("404 Not Found", "text/plain", "see /metrics\n".into()),
    };
    write!(s, "HTTP/1.1 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())?;
    s.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_versions_and_a_rollback_are_exported() {
        let st = Status {
            update: Some(crate::update::UpdateFacts::from_parts(
                "aiware-engine",
                "2",
                &[
                    "aiware-engine_2.efi".into(),
                    "aiware-engine_3+0-3.efi".into(),
                ],
                &["aiware-engine_2".into(), "aiware-engine_3".into()],
            )),
            ..Default::default()
        };
        let m = render(&st);
        assert!(m.contains(
            "aiw_agent_image_info{image_id=\"aiware-engine\",version=\"2\",other_slot=\"3\",pending_reboot=\"\"} 1\n"
        ), "{m}");
        assert!(
            m.contains("aiw_agent_image_rolled_back{from=\"3\"} 1\n"),
            "{m}"
        );
        assert!(!m.contains("aiw_agent_image_update_available"));
    }
}
