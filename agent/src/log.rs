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
    scrub_url_userinfo(&out)
}

/// Replaces the userinfo of every URL in `text` (`scheme://user:pass@host`)
/// by [`crate::settings::REDACTED`]: `scheme://<redacted>@host`. Whatever the
/// text is (an error, a warning, a JSON value), a password given inside a URL
/// never reaches a log line.
pub fn scrub_url_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The authority ends at the path, query, fragment, whitespace or a quote.
        let end = tail
            .find(|c: char| {
                matches!(c, '/' | '?' | '#' | '"' | '\'' | '<' | '>' | '`') || c.is_whitespace()
            })
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                out.push_str(crate::settings::REDACTED);
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_userinfo_is_scrubbed() {
        let t = "AIWARE_CONTROLLER=https://admin:hunter2-pw@c.example:9000/edge/v1: bad";
        let s = scrub(t);
        assert!(!s.contains("hunter2-pw") && !s.contains("admin:"), "{s}");
        assert!(
            s.contains("https://<redacted>@c.example:9000/edge/v1"),
            "{s}"
        );
        // A password containing '@' does not leak its tail either.
        let s = scrub("x http://u:p@ss@h/ y ftp://tok3n@h2 z");
        assert_eq!(s, "x http://<redacted>@h/ y ftp://<redacted>@h2 z");
        // JSON-quoted and several URLs; e-mail addresses outside URLs are kept.
        let s = scrub(r#"{"a":"http://u:pw1@h","b":"ops@example.com https://h/x@y"}"#);
        assert_eq!(
            s,
            r#"{"a":"http://<redacted>@h","b":"ops@example.com https://h/x@y"}"#
        );
        assert_eq!(scrub("no url: a://"), "no url: a://");
    }
}
