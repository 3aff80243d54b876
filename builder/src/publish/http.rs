//! A small signed HTTP client for AWS APIs over ureq: SigV4 on every attempt,
//! retries with capped, jittered exponential backoff on 5xx, throttling and
//! broken connections.

use super::sigv4::{self, Credentials};
use anyhow::{anyhow, Result};
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

/// One AWS service endpoint: where requests go and how they are signed.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `scheme://host[:port]`, no trailing slash.
    pub base: String,
    /// The Host header (and signed host).
    pub host: String,
    pub service: &'static str,
    pub region: String,
}

impl Endpoint {
    /// The service's regional endpoint, or `override_url` (a test double, a
    /// VPC endpoint) when given.
    pub fn new(service: &'static str, region: &str, override_url: Option<&str>) -> Result<Self> {
        let base = match override_url {
            Some(u) => u.trim_end_matches('/').to_string(),
            None => {
                let suffix = if region.starts_with("cn-") {
                    "amazonaws.com.cn"
                } else {
                    "amazonaws.com"
                };
                format!("https://{service}.{region}.{suffix}")
            }
        };
        let rest = base
            .strip_prefix("https://")
            .or_else(|| base.strip_prefix("http://"))
            .ok_or_else(|| anyhow!("endpoint {base:?}: expected http:// or https://"))?;
        if rest.contains('/') {
            anyhow::bail!("endpoint {base:?}: give scheme, host and port only, no path");
        }
        let host = rest
            .strip_suffix(":443")
            .filter(|_| base.starts_with("https://"))
            .or_else(|| {
                rest.strip_suffix(":80")
                    .filter(|_| base.starts_with("http://"))
            })
            .unwrap_or(rest)
            .to_string();
        Ok(Endpoint {
            base,
            host,
            service,
            region: region.to_string(),
        })
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A failed call, after retries where they apply.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("{method} {what}: HTTP {status} {code}: {message}")]
    Api {
        method: String,
        what: String,
        status: u16,
        code: String,
        message: String,
    },
    #[error("{method} {what}: {message}")]
    Transport {
        method: String,
        what: String,
        message: String,
    },
}

impl CallError {
    pub fn code(&self) -> Option<&str> {
        match self {
            CallError::Api { code, .. } => Some(code),
            CallError::Transport { .. } => None,
        }
    }
}

pub struct Retry {
    pub max_attempts: u32,
    pub base: Duration,
    pub cap: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        // AIWIMG_AWS_RETRY_BASE_MS shortens the waits in tests.
        let base_ms = std::env::var("AIWIMG_AWS_RETRY_BASE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(250);
        Retry {
            max_attempts: 8,
            base: Duration::from_millis(base_ms),
            cap: Duration::from_secs(20),
        }
    }
}

pub struct Client {
    agent: ureq::Agent,
    creds: Credentials,
    retry: Retry,
    jitter: AtomicU64,
    /// Attempts that were retried (for the summary).
    pub retries: AtomicU64,
}

const THROTTLING: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "RequestThrottled",
    "SlowDown",
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "InternalServerError",
    "InternalServerException",
    "ServiceUnavailable",
];

impl Client {
    pub fn new(creds: Credentials) -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(15))
            .timeout_read(Duration::from_secs(120))
            .timeout_write(Duration::from_secs(120))
            .user_agent(concat!("aiwimg/", env!("CARGO_PKG_VERSION")))
            .build();
        let seed = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
        Client {
            agent,
            creds,
            retry: Retry::default(),
            jitter: AtomicU64::new(seed),
            retries: AtomicU64::new(0),
        }
    }

    fn next_random(&self) -> u64 {
        // xorshift64*, shared between threads; good enough for jitter.
        let mut x = self.jitter.load(Ordering::Relaxed);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.jitter.store(x, Ordering::Relaxed);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Backoff before attempt `attempt` (1 = the first retry): full jitter
    /// over min(cap, base * 2^attempt).
    fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = self
            .retry
            .base
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.retry.cap);
        let ms = ceiling.as_millis().max(1) as u64;
        Duration::from_millis(ms / 2 + self.next_random() % (ms / 2 + 1))
    }

    /// Sends one signed request, retrying what AWS says to retry.
    pub fn call(
        &self,
        ep: &Endpoint,
        method: &str,
        path: &str,
        query: &[(String, String)],
        headers: &[(String, String)],
        body: &[u8],
    ) -> Result<Response, CallError> {
        let payload = sigv4::sha256_hex(body);
        let what = format!("{}{path}", ep.service);
        let mut url = format!("{}{}", ep.base, sigv4::uri_encode(path, true));
        if !query.is_empty() {
            let q: Vec<String> = query
                .iter()
                .map(|(k, v)| {
                    format!(
                        "{}={}",
                        sigv4::uri_encode(k, false),
                        sigv4::uri_encode(v, false)
                    )
                })
                .collect();
            url.push('?');
            url.push_str(&q.join("&"));
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let req = sigv4::Request {
                method,
                host: &ep.host,
                path,
                query,
                headers,
                payload_sha256: &payload,
            };
            let signed = sigv4::sign(&req, &self.creds, &ep.region, ep.service, SystemTime::now());
            let mut r = self.agent.request(method, &url);
            for (k, v) in headers.iter().chain(signed.iter()) {
                r = r.set(k, v);
            }
            let result = if body.is_empty() && method == "GET" {
                r.call()
            } else {
                r.send_bytes(body)
            };
            let (retryable, err) = match result {
                Ok(resp) => return Ok(read_response(resp)),
                Err(ureq::Error::Status(status, resp)) => {
                    let resp = read_response(resp);
                    let (code, message) = error_of(&resp);
                    let retryable =
                        status >= 500 || status == 429 || THROTTLING.iter().any(|t| *t == code);
                    (
                        retryable,
                        CallError::Api {
                            method: method.to_string(),
                            what: what.clone(),
                            status,
                            code,
                            message,
                        },
                    )
                }
                Err(ureq::Error::Transport(t)) => (
                    true,
                    CallError::Transport {
                        method: method.to_string(),
                        what: what.clone(),
                        message: t.to_string(),
                    },
                ),
            };
            if !retryable || attempt >= self.retry.max_attempts {
                return Err(err);
            }
            let wait = self.backoff(attempt);
            self.retries.fetch_add(1, Ordering::Relaxed);
            eprintln!(
                "  retrying ({err}); attempt {}/{} in {:.1}s",
                attempt + 1,
                self.retry.max_attempts,
                wait.as_secs_f64()
            );
            std::thread::sleep(wait);
        }
    }
}

fn read_response(resp: ureq::Response) -> Response {
    let status = resp.status();
    let headers = resp
        .headers_names()
        .into_iter()
        .filter_map(|n| resp.header(&n).map(|v| (n.clone(), v.to_string())))
        .collect();
    let mut body = Vec::new();
    let _ = resp.into_reader().read_to_end(&mut body);
    Response {
        status,
        headers,
        body,
    }
}

/// The error code and message of a failed call: EC2's XML
/// (`<Code>`/`<Message>`) or a REST-JSON service's body and
/// `x-amzn-ErrorType` header.
pub fn error_of(resp: &Response) -> (String, String) {
    let text = resp.text();
    if let Some(code) = xml_tag(&text, "Code") {
        return (code, xml_tag(&text, "Message").unwrap_or_default());
    }
    let json: Option<serde_json::Value> = serde_json::from_slice(&resp.body).ok();
    let from_json = |k: &str| {
        json.as_ref()
            .and_then(|j| j.get(k))
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    let code = resp
        .header("x-amzn-ErrorType")
        .map(|c| c.split(':').next().unwrap_or(c).to_string())
        .or_else(|| from_json("__type"))
        .or_else(|| from_json("Reason"))
        .unwrap_or_else(|| format!("HTTP{}", resp.status));
    let message = from_json("Message")
        .or_else(|| from_json("message"))
        .unwrap_or_else(|| text.chars().take(300).collect());
    (code, message)
}

/// The text of the first `<tag>` element, entities decoded.
pub fn xml_tag(text: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = text.find(&open)? + open.len();
    let end = start + text[start..].find(&close)?;
    Some(
        text[start..end]
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let e = Endpoint::new("ebs", "eu-west-1", None).unwrap();
        assert_eq!(e.base, "https://ebs.eu-west-1.amazonaws.com");
        assert_eq!(e.host, "ebs.eu-west-1.amazonaws.com");
        let e = Endpoint::new("ec2", "us-east-1", Some("http://127.0.0.1:5000/")).unwrap();
        assert_eq!(e.base, "http://127.0.0.1:5000");
        assert_eq!(e.host, "127.0.0.1:5000");
        assert!(Endpoint::new("ec2", "us-east-1", Some("ftp://x")).is_err());
    }

    #[test]
    fn errors() {
        let xml = Response {
            status: 400,
            headers: vec![],
            body: b"<Response><Errors><Error><Code>RequestLimitExceeded</Code><Message>a &amp; b</Message></Error></Errors></Response>".to_vec(),
        };
        assert_eq!(
            error_of(&xml),
            ("RequestLimitExceeded".into(), "a & b".into())
        );
        let json = Response {
            status: 400,
            headers: vec![(
                "x-amzn-ErrorType".into(),
                "ValidationException:http://internal".into(),
            )],
            body: br#"{"Message":"bad block","Reason":"INVALID_BLOCK"}"#.to_vec(),
        };
        assert_eq!(
            error_of(&json),
            ("ValidationException".into(), "bad block".into())
        );
    }

    #[test]
    fn backoff_is_capped() {
        let c = Client::new(Credentials {
            access_key_id: "a".into(),
            secret_access_key: "b".into(),
            session_token: None,
        });
        for attempt in 1..40 {
            assert!(c.backoff(attempt) <= c.retry.cap);
        }
    }
}
