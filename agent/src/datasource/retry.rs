//! The one retrying HTTP client every network datasource uses: capped
//! exponential backoff under an overall deadline, every wait logged.

use super::DsError;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            first: Duration::from_millis(250),
            max: Duration::from_secs(5),
        }
    }
}

/// The answer to one request once retries are over.
#[derive(Debug)]
pub enum Outcome {
    Body(Vec<u8>),
    /// A status the caller decides about (404, 401, 403...).
    Status(u16),
}

pub struct RetryClient {
    pub agent: ureq::Agent,
    pub backoff: Backoff,
    pub source_name: &'static str,
}

impl RetryClient {
    pub fn new(source_name: &'static str) -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(2))
            .timeout(Duration::from_secs(5))
            .redirects(0)
            .try_proxy_from_env(false)
            .build();
        RetryClient {
            agent,
            backoff: Backoff::default(),
            source_name,
        }
    }

    /// Sends `make()` (with `body` if given) until it answers with a status not in
    /// `retry_on` (5xx is always retried) or the deadline passes.
    pub fn call(
        &self,
        what: &str,
        deadline: Instant,
        retry_on: &[u16],
        body: Option<&[u8]>,
        make: &dyn Fn(&ureq::Agent) -> ureq::Request,
    ) -> Result<Outcome, DsError> {
        let mut wait = self.backoff.first;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let req = make(&self.agent)
                .timeout(left.clamp(Duration::from_millis(50), Duration::from_secs(5)));
            let res = match body {
                Some(b) => req.send_bytes(b),
                None => req.call(),
            };
            let why = match res {
                Ok(resp) => {
                    let mut buf = Vec::new();
                    use std::io::Read;
                    match resp
                        .into_reader()
                        .take(crate::userdata::MAX_USER_DATA as u64 + 1)
                        .read_to_end(&mut buf)
                    {
                        Ok(_) => return Ok(Outcome::Body(buf)),
                        Err(e) => format!("reading the answer failed: {e}"),
                    }
                }
                Err(ureq::Error::Status(code, _)) if code >= 500 || retry_on.contains(&code) => {
                    format!("HTTP {code}")
                }
                Err(ureq::Error::Status(code, _)) => return Ok(Outcome::Status(code)),
                Err(ureq::Error::Transport(t)) => t.to_string(),
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(DsError::Deadline {
                    source_name: self.source_name,
                    what: what.into(),
                    last: why,
                });
            }
            let nap = wait.min(left);
            crate::log::info(&format!(
                "{}: waiting {:.1}s for {what} ({why}); {:.0}s left before giving up",
                self.source_name,
                nap.as_secs_f32(),
                left.as_secs_f32()
            ));
            std::thread::sleep(nap);
            wait = (wait * 2).min(self.backoff.max);
        }
    }
}
