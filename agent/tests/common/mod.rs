//! Test doubles shared by the integration tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// A scripted HTTP server on 127.0.0.1 standing in for a cloud metadata
/// service (IMDS test double). `handler(method, path, headers) -> (status, body)`.
pub struct MetadataServiceDouble {
    pub url: String,
    pub log: Arc<Mutex<Vec<String>>>,
}

type Handler = dyn Fn(&str, &str, &[(String, String)]) -> (u16, Vec<u8>) + Send + Sync;

impl MetadataServiceDouble {
    pub fn start(
        handler: impl Fn(&str, &str, &[(String, String)]) -> (u16, Vec<u8>) + Send + Sync + 'static,
    ) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let h: Arc<Handler> = Arc::new(handler);
        let log2 = log.clone();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let h = h.clone();
                let log = log2.clone();
                std::thread::spawn(move || serve(s, &*h, &log));
            }
        });
        MetadataServiceDouble { url, log }
    }
    pub fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

fn serve(mut s: TcpStream, h: &Handler, log: &Mutex<Vec<String>>) {
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    if r.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut it = line.split_whitespace();
    let method = it.next().unwrap_or("").to_string();
    let path = it.next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).unwrap_or(0) == 0 || l.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    let _ = r.read_exact(&mut body);
    log.lock().unwrap().push(format!("{method} {path}"));
    let (code, out) = h(&method, &path, &headers);
    let _ = write!(
        s,
        "HTTP/1.1 {code} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        out.len()
    );
    let _ = s.write_all(&out);
}

pub fn header<'a>(h: &'a [(String, String)], k: &str) -> Option<&'a str> {
    h.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
}
