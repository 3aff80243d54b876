//! Facts about this host sent to the controller: name, IPs, CPUs, memory, disk.

use crate::paths::Paths;

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct HostFacts {
    pub hostname: String,
    pub ips: Vec<String>,
    pub num_cpu: usize,
    pub memory_bytes: u64,
    pub memory_available_bytes: u64,
    pub disk_available_root: u64,
    pub disk_available_var: u64,
}

pub fn gather(paths: &Paths) -> HostFacts {
    let mem = std::fs::read_to_string(paths.at("/proc/meminfo")).unwrap_or_default();
    let kb = |key: &str| -> u64 {
        mem.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    HostFacts {
        hostname: hostname(),
        ips: ips(),
        num_cpu: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        memory_bytes: kb("MemTotal:"),
        memory_available_bytes: kb("MemAvailable:"),
        disk_available_root: disk_available("/"),
        disk_available_var: disk_available(&paths.at("/var").to_string_lossy()),
    }
}

pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is valid for its length.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Non-loopback IPv4 and global IPv6 addresses of the host's interfaces.
pub fn ips() -> Vec<String> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills ifap with a list we free below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return out;
    }
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: cur points into the list from getifaddrs.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr is non-null and its family says which struct it is.
            let fam = unsafe { (*ifa.ifa_addr).sa_family } as i32;
            if fam == libc::AF_INET {
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                if !ip.is_loopback() {
                    out.push(ip.to_string());
                }
            } else if fam == libc::AF_INET6 {
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                if !ip.is_loopback() && (ip.segments()[0] & 0xffc0) != 0xfe80 {
                    out.push(ip.to_string());
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: ifap came from getifaddrs.
    unsafe { libc::freeifaddrs(ifap) };
    out.sort();
    out.dedup();
    out
}

pub fn disk_available(path: &str) -> u64 {
    let Ok(c) = std::ffi::CString::new(path) else {
        return 0;
    };
    // SAFETY: zeroed statvfs is a valid out-parameter.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid path and st a valid out-parameter.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return 0;
    }
    st.f_bavail as u64 * st.f_frsize as u64
}
