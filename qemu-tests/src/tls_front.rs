//! TLS in front of a plain-HTTP test server: with the Edge API test
//! controller behind it, a TEST DOUBLE of a controller reached over https
//! whose certificate comes from a private CA (made per test, never stored).
//!
//! Each connection: the TLS handshake, one HTTP request read whole (headers
//! and `Content-Length` body), passed to the upstream, and its answer (the
//! test controller closes after one) sent back. Listens on loopback only.

use crate::test_ca::TestCa;
use anyhow::{Context, Result};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

pub struct TlsFront {
    addr: SocketAddr,
    ca_pem: String,
}

impl TlsFront {
    /// Serves TLS on 127.0.0.1 (a free port) for `upstream`, with a
    /// certificate for `names` (IP addresses or DNS names, as the client
    /// will dial them) signed by a fresh CA.
    pub fn start(upstream: SocketAddr, names: &[&str]) -> Result<TlsFront> {
        Self::start_with_ca(upstream, names, &TestCa::new()?)
    }

    /// The same, with a certificate from `ca` (the cluster's CA of a test).
    pub fn start_with_ca(upstream: SocketAddr, names: &[&str], ca: &TestCa) -> Result<TlsFront> {
        let leaf = ca.issue(names, "edge-test-controller (TEST DOUBLE)")?;
        let chain = vec![CertificateDer::from(leaf.cert_der)];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key_der));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .context("the test server certificate")?;
        let config = Arc::new(config);

        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let config = config.clone();
                std::thread::spawn(move || {
                    let _ = serve(conn, config, upstream);
                });
            }
        });
        Ok(TlsFront {
            addr,
            ca_pem: ca.pem(),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The CA certificate (PEM) a client must trust: `AIWARE_CONTROLLER_CA`.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }
}

fn serve(tcp: TcpStream, config: Arc<rustls::ServerConfig>, upstream: SocketAddr) -> Result<()> {
    tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
    let conn = rustls::ServerConnection::new(config)?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let request = read_one_request(&mut tls)?;
    let mut up = TcpStream::connect(upstream)?;
    up.set_read_timeout(Some(Duration::from_secs(30)))?;
    up.write_all(&request)?;
    up.shutdown(Shutdown::Write)?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer)?;
    tls.write_all(&answer)?;
    tls.conn.send_close_notify();
    tls.flush()?;
    Ok(())
}

/// Headers up to the blank line, then `Content-Length` bytes of body.
fn read_one_request(r: &mut impl Read) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                buf.truncate(end + 4 + len);
                return Ok(buf);
            }
        }
        let n = r.read(&mut chunk)?;
        anyhow::ensure!(n > 0, "the client closed before a whole request");
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_read_whole_and_no_further() {
        let mut r: &[u8] = b"POST /x HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcEXTRA";
        assert_eq!(
            read_one_request(&mut r).unwrap(),
            b"POST /x HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"
        );
        let mut r: &[u8] = b"GET / HTTP/1.1\r\n\r\n";
        assert_eq!(read_one_request(&mut r).unwrap(), b"GET / HTTP/1.1\r\n\r\n");
        let mut r: &[u8] = b"GET / HTTP/1.1\r\n";
        assert!(read_one_request(&mut r).is_err());
    }
}
