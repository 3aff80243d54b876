//! Output: `console` lines go to stdout (journal and console, as the unit says),
//! `info` lines to stderr (journal only). Every line is scrubbed of the secrets
//! registered with [`add_secrets`] first.

use std::io::Write;
use std::sync::Mutex;

static SECRETS: Mutex<Vec<String>> = Mutex::new(Vec::new());

pub fn add_secrets(values: impl IntoIterator<Item = String>) {
    let mut s = SECRETS.lock().unwrap_or_else(|e| e.into_inner());
    for v in values {
        if v.len() >= 4 && !s.contains(&v) {
            s.push(v);
        }
    }
}

pub fn scrub(text: &str) -> String {
    let s = SECRETS.lock().unwrap_or_else(|e| e.into_inner());
    let mut out = text.to_string();
    for v in s.iter() {
        out = out.replace(v.as_str(), crate::settings::REDACTED);
    }
    out
}

/// A line for the operator on the console (and the journal).
pub fn console(msg: &str) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "aiw-agent: {}", scrub(msg));
    let _ = o.flush();
}

/// A line for the journal only.
pub fn info(msg: &str) {
    let _ = writeln!(std::io::stderr().lock(), "aiw-agent: {}", scrub(msg));
}
