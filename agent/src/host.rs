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

/// [`gather`], with the address this host reaches `controller` from listed
/// first in `ips`: on a node with several networks (a management NIC and the
/// cluster's), the controller and Prometheus use the first address.
pub fn gather_toward(paths: &Paths, controller: Option<&str>) -> HostFacts {
    let mut f = gather(paths);
    let src = controller.and_then(source_toward);
    f.ips = with_first(std::mem::take(&mut f.ips), src);
    f
}

/// The `host:port` of an `http://host[:port]/path` URL (port 80 or 443 when not given).
pub fn url_authority(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let auth = rest.split(['/', '?', '#']).next().unwrap_or("");
    let auth = auth.rsplit('@').next().unwrap_or(auth);
    if auth.is_empty() {
        return None;
    }
    let has_port = if auth.starts_with('[') {
        auth.contains("]:")
    } else {
        auth.contains(':')
    };
    if has_port {
        Some(auth.to_string())
    } else {
        let port = if scheme.eq_ignore_ascii_case("https") {
            443
        } else {
            80
        };
        Some(format!("{auth}:{port}"))
    }
}

/// The local address the kernel picks to reach `url`'s host (a connected UDP
/// socket: nothing is sent). `None` when there is no route yet or it is loopback.
pub fn source_toward(url: &str) -> Option<std::net::IpAddr> {
    use std::net::{ToSocketAddrs, UdpSocket};
    let dest = url_authority(url)?.to_socket_addrs().ok()?.next()?;
    let bind = if dest.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let s = UdpSocket::bind(bind).ok()?;
    s.connect(dest).ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// `ips` with `first` moved to the front when it is one of them.
pub fn with_first(mut ips: Vec<String>, first: Option<std::net::IpAddr>) -> Vec<String> {
    if let Some(first) = first.map(|f| f.to_string()) {
        if let Some(i) = ips.iter().position(|x| *x == first) {
            let ip = ips.remove(i);
            ips.insert(0, ip);
        }
    }
    ips
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
        hostname: chosen_hostname(paths).unwrap_or_else(hostname),
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

/// The name the agent set this boot (user-data's or the platform's), which
/// is what the controller should list even where the kernel's could not be set.
pub fn chosen_hostname(paths: &Paths) -> Option<String> {
    std::fs::read_to_string(paths.run_dir().join("hostname"))
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

/// Adds the instance facts of the platform's metadata to a register request
/// (`HostRegisterRequest`), in the fields `HostDetail` has for them:
/// - `serverTypeName` ("the name of server type"): `AIWARE_SERVER_TYPE`, else
///   the instance type (`m5.large`); the image version stays when neither is
///   known. The spec's other server-type field, `serverTypeID`, is a
///   controller-side uuid.
/// - `ips` ("IPs ... valid for this host"): the platform's private and public
///   addresses are added after the interfaces' (a public address is NAT'd and
///   on no interface), so the first stays the one toward the controller.
/// - `cloudProviderInstanceID` is already the datasource's instance id.
///
/// `HostDetail` has no field for the region or zone, and `HostStatus` none for
/// any of these, so they are not sent (the region reaches the containers as
/// `AIWARE_REGION`, see [`crate::platform::with_defaults`]).
pub fn add_platform_facts(
    paths: &Paths,
    s: &crate::settings::Settings,
    request: &mut serde_json::Value,
) {
    let p = crate::platform::for_settings(paths, s);
    let info = &mut request["info"];
    if let Some(t) = s.get("AIWARE_SERVER_TYPE").or(p.instance_type.as_deref()) {
        info["serverTypeName"] = serde_json::json!(t);
    }
    let mut ips: Vec<String> = info["ips"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    for ip in p.private_ips.iter().chain(&p.public_ips) {
        if !ips.contains(ip) {
            ips.push(ip.clone());
        }
    }
    info["ips"] = serde_json::json!(ips);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_toward_the_controller_comes_first() {
        let ips = vec!["10.0.2.15".to_string(), "192.168.76.11".to_string()];
        let first = Some("192.168.76.11".parse().unwrap());
        assert_eq!(
            with_first(ips.clone(), first),
            ["192.168.76.11", "10.0.2.15"]
        );
        // Not one of ours (or unknown): the order is kept.
        assert_eq!(
            with_first(ips.clone(), Some("10.9.9.9".parse().unwrap())),
            ips
        );
        assert_eq!(with_first(ips.clone(), None), ips);
    }

    #[test]
    fn authority_of_controller_urls() {
        let a = |u: &str| url_authority(u);
        assert_eq!(
            a("http://192.168.76.10:9000/edge/v1").as_deref(),
            Some("192.168.76.10:9000")
        );
        assert_eq!(
            a("http://ctl.example/edge/v1").as_deref(),
            Some("ctl.example:80")
        );
        assert_eq!(a("https://ctl.example").as_deref(), Some("ctl.example:443"));
        assert_eq!(
            a("http://[fd00::1]:9000/x").as_deref(),
            Some("[fd00::1]:9000")
        );
        assert_eq!(a("http://[fd00::1]/x").as_deref(), Some("[fd00::1]:80"));
        assert_eq!(a("no-scheme"), None);
        assert_eq!(a("http:///path"), None);
    }

    #[test]
    fn instance_facts_go_into_server_type_name_and_ips() {
        use crate::datasource::{LaunchData, PlatformMeta};
        use crate::settings::Settings;
        let t = tempfile::tempdir().unwrap();
        let paths = Paths::new(t.path());
        let ld = LaunchData {
            instance_id: Some("i-1".into()),
            platform: PlatformMeta {
                instance_type: Some("m5.large".into()),
                private_ips: vec!["10.0.0.5".into()],
                public_ips: vec!["3.4.5.6".into()],
                ..PlatformMeta::default()
            },
            ..LaunchData::default()
        };
        crate::platform::for_this_boot(&paths, Some(("ec2", &ld)));
        let s = Settings {
            instance_id: Some("i-1".into()),
            ..Settings::default()
        };
        let mut req = serde_json::json!({"info": {"serverTypeName": "1.2.3", "ips": ["10.0.0.5", "fd00::5"]}});
        add_platform_facts(&paths, &s, &mut req);
        assert_eq!(req["info"]["serverTypeName"], "m5.large");
        assert_eq!(
            req["info"]["ips"],
            serde_json::json!(["10.0.0.5", "fd00::5", "3.4.5.6"])
        );
        // AIWARE_SERVER_TYPE given wins; another instance's facts are not used.
        let mut s2 = s.clone();
        s2.vars.insert("AIWARE_SERVER_TYPE".into(), "big".into());
        let mut req = serde_json::json!({"info": {"serverTypeName": "1.2.3", "ips": []}});
        add_platform_facts(&paths, &s2, &mut req);
        assert_eq!(req["info"]["serverTypeName"], "big");
        let other = Settings {
            instance_id: Some("i-2".into()),
            ..Settings::default()
        };
        let mut req = serde_json::json!({"info": {"serverTypeName": "1.2.3", "ips": []}});
        add_platform_facts(&paths, &other, &mut req);
        assert_eq!(req["info"]["serverTypeName"], "1.2.3");
        assert_eq!(req["info"]["ips"], serde_json::json!([]));
    }

    #[test]
    fn the_hostname_the_agent_chose_is_the_one_reported() {
        let t = tempfile::tempdir().unwrap();
        let paths = Paths::new(t.path());
        assert_eq!(chosen_hostname(&paths), None);
        assert_eq!(gather(&paths).hostname, hostname());
        std::fs::create_dir_all(paths.run_dir()).unwrap();
        std::fs::write(paths.run_dir().join("hostname"), "ceo-engine\n").unwrap();
        assert_eq!(gather(&paths).hostname, "ceo-engine");
    }

    #[test]
    fn loopback_controller_gives_no_preferred_address() {
        assert_eq!(source_toward("http://127.0.0.1:9000/edge/v1"), None);
        assert_eq!(source_toward("garbage"), None);
    }
}
