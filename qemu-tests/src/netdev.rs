//! Guest networking that cannot reach a real network.
//!
//! There are exactly two kinds of NIC a test can give a VM, and neither can be
//! built unrestricted:
//! - [`UserNet`]: QEMU user networking, always `restrict=on`; host forwards
//!   bind 127.0.0.1 only and guest forwards end at a server on 127.0.0.1.
//! - [`SocketNic`]: a link to other VMs over UDP on 127.0.0.1, through a
//!   [`LoopbackLan`] hub run by the test.
//!
//! All addresses on the host side are [`LOOPBACK`]; the API takes port numbers,
//! never host addresses.

use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// The only host address a guest's traffic may reach.
pub const LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// A TCP port free on 127.0.0.1 right now.
pub fn free_tcp_port() -> Result<u16> {
    Ok(TcpListener::bind((LOOPBACK, 0))
        .context("binding 127.0.0.1:0 to find a free port")?
        .local_addr()?
        .port())
}

/// A UDP port free on 127.0.0.1 right now.
pub fn free_udp_port() -> Result<u16> {
    Ok(UdpSocket::bind((LOOPBACK, 0))
        .context("binding 127.0.0.1:0/udp to find a free port")?
        .local_addr()?
        .port())
}

/// A guest TCP port reachable from the host at `127.0.0.1:host_port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostFwd {
    pub guest_port: u16,
    pub host_port: u16,
}

/// Guest connections to `guest_addr:guest_port` carried to a server on
/// `127.0.0.1:host_port` (one `socat` per connection, so HTTP clients that open
/// several connections work; a chardev target would carry only one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestFwd {
    pub guest_addr: Ipv4Addr,
    pub guest_port: u16,
    pub host_port: u16,
}

/// QEMU user networking (slirp) with `restrict=on`: the guest reaches nothing
/// but its forwards. Fields are private so no unrestricted form can be built.
#[derive(Debug, Clone)]
pub struct UserNet {
    net: (Ipv4Addr, u8),
    host_fwds: Vec<HostFwd>,
    guest_fwds: Vec<GuestFwd>,
}

impl Default for UserNet {
    fn default() -> Self {
        UserNet {
            net: (Ipv4Addr::new(10, 0, 2, 0), 24),
            host_fwds: Vec::new(),
            guest_fwds: Vec::new(),
        }
    }
}

impl UserNet {
    pub fn new() -> Self {
        Self::default()
    }

    /// The virtual network the guest lives in (default 10.0.2.0/24, QEMU's).
    /// Cloud metadata doubles at 169.254.169.254 need `169.254.0.0/16` here,
    /// because guest forwards must lie inside this network.
    pub fn with_network(mut self, addr: Ipv4Addr, prefix: u8) -> Result<Self> {
        if !(4..=30).contains(&prefix) {
            bail!("user network prefix /{prefix} out of range: use /4 to /30");
        }
        self.net = (addr, prefix);
        self.validate()?;
        Ok(self)
    }

    /// Forward `guest_port` to a new free port on 127.0.0.1; returns that port.
    pub fn forward_guest_port(&mut self, guest_port: u16) -> Result<u16> {
        let host_port = free_tcp_port()?;
        self.host_fwds.push(HostFwd {
            guest_port,
            host_port,
        });
        Ok(host_port)
    }

    /// Carry guest connections to `guest_addr:guest_port` to `127.0.0.1:host_port`.
    pub fn forward_to_host(
        &mut self,
        guest_addr: Ipv4Addr,
        guest_port: u16,
        host_port: u16,
    ) -> Result<()> {
        self.guest_fwds.push(GuestFwd {
            guest_addr,
            guest_port,
            host_port,
        });
        self.validate()
    }

    pub fn host_fwds(&self) -> &[HostFwd] {
        &self.host_fwds
    }

    pub fn guest_fwds(&self) -> &[GuestFwd] {
        &self.guest_fwds
    }

    /// The host port that reaches `guest_port`, if forwarded.
    pub fn host_port_for(&self, guest_port: u16) -> Option<u16> {
        self.host_fwds
            .iter()
            .find(|f| f.guest_port == guest_port)
            .map(|f| f.host_port)
    }

    fn contains(&self, addr: Ipv4Addr) -> bool {
        let (net, prefix) = self.net;
        let mask = u32::MAX << (32 - u32::from(prefix));
        u32::from(addr) & mask == u32::from(net) & mask
    }

    fn validate(&self) -> Result<()> {
        for f in &self.guest_fwds {
            if !self.contains(f.guest_addr) {
                bail!(
                    "guest forward {}:{} lies outside the user network {}/{}: QEMU only \
                     forwards addresses inside it; widen it with UserNet::with_network",
                    f.guest_addr,
                    f.guest_port,
                    self.net.0,
                    self.net.1
                );
            }
        }
        Ok(())
    }

    /// The `-netdev` value. `restrict=on` is always there: it is what keeps
    /// guest packets from being routed out through the host.
    pub fn netdev_arg(&self, id: &str) -> String {
        let mut arg = format!("user,id={id},restrict=on,net={}/{}", self.net.0, self.net.1);
        for f in &self.host_fwds {
            arg.push_str(&format!(
                ",hostfwd=tcp:{LOOPBACK}:{}-:{}",
                f.host_port, f.guest_port
            ));
        }
        for f in &self.guest_fwds {
            // `cmd:` runs once per guest connection; spaces are fine, commas would need doubling.
            arg.push_str(&format!(
                ",guestfwd=tcp:{}:{}-cmd:socat - TCP:{LOOPBACK}:{}",
                f.guest_addr, f.guest_port, f.host_port
            ));
        }
        arg
    }
}

/// A NIC on a [`LoopbackLan`]: QEMU sends its frames as UDP datagrams from
/// `127.0.0.1:local_port` to the hub at `127.0.0.1:hub_port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketNic {
    local_port: u16,
    hub_port: u16,
    mac: String,
}

impl SocketNic {
    pub fn mac(&self) -> &str {
        &self.mac
    }

    pub fn netdev_arg(&self, id: &str) -> String {
        format!(
            "socket,id={id},udp={LOOPBACK}:{},localaddr={LOOPBACK}:{}",
            self.hub_port, self.local_port
        )
    }
}

/// A private Ethernet segment between VMs: a hub on 127.0.0.1 that copies each
/// frame to every other member. No host interface, no route out.
pub struct LoopbackLan {
    hub_port: u16,
    members: Arc<Mutex<BTreeSet<u16>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    next_mac: u8,
}

impl LoopbackLan {
    pub fn start() -> Result<Self> {
        let socket = UdpSocket::bind((LOOPBACK, 0)).context("binding the LAN hub on 127.0.0.1")?;
        socket.set_read_timeout(Some(Duration::from_millis(200)))?;
        let hub_port = socket.local_addr()?.port();
        let members: Arc<Mutex<BTreeSet<u16>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let members = members.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut frame = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((len, from)) = socket.recv_from(&mut frame) else {
                        continue;
                    };
                    // Only members on loopback take part; anything else is dropped.
                    let SocketAddr::V4(from) = from else { continue };
                    if *from.ip() != LOOPBACK {
                        continue;
                    }
                    let peers: Vec<u16> = {
                        let m = members.lock().unwrap_or_else(|e| e.into_inner());
                        if !m.contains(&from.port()) {
                            continue;
                        }
                        m.iter().copied().filter(|p| *p != from.port()).collect()
                    };
                    for port in peers {
                        let _ = socket.send_to(&frame[..len], (LOOPBACK, port));
                    }
                }
            })
        };
        Ok(LoopbackLan {
            hub_port,
            members,
            stop,
            thread: Some(thread),
            next_mac: 1,
        })
    }

    /// A new NIC on this LAN, with a MAC unique on it (52:54:00:aa:<hub>:<n>).
    pub fn attach(&mut self) -> Result<SocketNic> {
        let local_port = free_udp_port()?;
        self.members
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(local_port);
        let mac = format!(
            "52:54:00:aa:{:02x}:{:02x}",
            self.hub_port & 0xff,
            self.next_mac
        );
        self.next_mac = self.next_mac.wrapping_add(1);
        Ok(SocketNic {
            local_port,
            hub_port: self.hub_port,
            mac,
        })
    }

    pub fn hub_port(&self) -> u16 {
        self.hub_port
    }
}

impl Drop for LoopbackLan {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A VM NIC: one of the two restricted kinds.
#[derive(Debug, Clone)]
pub enum Nic {
    User(UserNet),
    Lan(SocketNic),
}

impl Nic {
    pub fn netdev_arg(&self, id: &str) -> String {
        match self {
            Nic::User(u) => u.netdev_arg(id),
            Nic::Lan(s) => s.netdev_arg(id),
        }
    }

    pub fn device_arg(&self, id: &str) -> String {
        match self {
            Nic::User(_) => format!("virtio-net-pci,netdev={id}"),
            Nic::Lan(s) => format!("virtio-net-pci,netdev={id},mac={}", s.mac),
        }
    }
}

/// Checks a complete QEMU command line against the network rule: every
/// `-netdev` is `user` with `restrict=on` or `socket` on 127.0.0.1; no `-net`,
/// `-nic`, tap or bridge. The harness runs it on every command it builds.
pub fn check_isolated(args: &[String]) -> Result<()> {
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "-net" | "-nic" => bail!("{arg} is not allowed: use -netdev through netdev::Nic"),
            "-netdev" => {
                let value = it.next().map(String::as_str).unwrap_or_default();
                check_netdev(value)?;
            }
            _ => {}
        }
    }
    Ok(())
}

fn check_netdev(value: &str) -> Result<()> {
    let mut parts = value.split(',');
    let kind = parts.next().unwrap_or_default();
    let opts: Vec<&str> = parts.collect();
    match kind {
        "user" => {
            if !opts.contains(&"restrict=on") {
                bail!("user netdev without restrict=on would let the guest out: {value}");
            }
            for opt in &opts {
                if let Some(fwd) = opt.strip_prefix("hostfwd=") {
                    if !fwd.starts_with(&format!("tcp:{LOOPBACK}:")) {
                        bail!("hostfwd must bind 127.0.0.1: {fwd}");
                    }
                }
                if let Some(fwd) = opt.strip_prefix("guestfwd=") {
                    let target = fwd.split_once('-').map(|(_, t)| t).unwrap_or_default();
                    if target != format!("cmd:socat - TCP:{LOOPBACK}:{}", port_suffix(target)) {
                        bail!("guestfwd must end at a server on 127.0.0.1: {fwd}");
                    }
                }
            }
            Ok(())
        }
        "socket" => {
            for opt in &opts {
                if let Some((key, addr)) = opt.split_once('=') {
                    if ["udp", "localaddr", "listen", "connect"].contains(&key)
                        && !addr.starts_with(&format!("{LOOPBACK}:"))
                    {
                        bail!("socket netdev must stay on 127.0.0.1: {opt}");
                    }
                    if key == "mcast" {
                        bail!("multicast socket netdevs can leave the machine: {value}");
                    }
                }
            }
            Ok(())
        }
        other => bail!("netdev type {other:?} is not allowed (only user with restrict=on, or socket on 127.0.0.1)"),
    }
}

fn port_suffix(target: &str) -> &str {
    target.rsplit(':').next().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_net_is_always_restricted_and_loopback_only() {
        let mut net = UserNet::new();
        let port = net.forward_guest_port(22).unwrap();
        net.forward_to_host(Ipv4Addr::new(10, 0, 2, 100), 9000, 4321)
            .unwrap();
        let arg = net.netdev_arg("n0");
        assert!(arg.starts_with("user,id=n0,restrict=on,"), "{arg}");
        assert!(
            arg.contains(&format!("hostfwd=tcp:127.0.0.1:{port}-:22")),
            "{arg}"
        );
        assert!(
            arg.contains("guestfwd=tcp:10.0.2.100:9000-cmd:socat - TCP:127.0.0.1:4321"),
            "{arg}"
        );
        assert_eq!(net.host_port_for(22), Some(port));
        check_isolated(&["-netdev".into(), arg]).unwrap();
    }

    #[test]
    fn guest_forward_outside_the_network_is_refused() {
        let mut net = UserNet::new();
        let err = net
            .forward_to_host(Ipv4Addr::new(169, 254, 169, 254), 80, 1234)
            .unwrap_err();
        assert!(err.to_string().contains("with_network"), "{err}");
        let mut wide = UserNet::new()
            .with_network(Ipv4Addr::new(169, 254, 0, 0), 16)
            .unwrap();
        wide.forward_to_host(Ipv4Addr::new(169, 254, 169, 254), 80, 1234)
            .unwrap();
    }

    #[test]
    fn unrestricted_or_outward_netdevs_are_rejected() {
        let bad = [
            vec!["-netdev", "user,id=n0"],
            vec!["-netdev", "user,id=n0,restrict=off"],
            vec!["-netdev", "user,id=n0,restrict=on,hostfwd=tcp::2222-:22"],
            vec![
                "-netdev",
                "user,id=n0,restrict=on,hostfwd=tcp:0.0.0.0:2222-:22",
            ],
            vec![
                "-netdev",
                "user,id=n0,restrict=on,guestfwd=tcp:10.0.2.100:80-tcp:192.0.2.1:80",
            ],
            vec!["-netdev", "tap,id=n0,ifname=tap0"],
            vec!["-netdev", "bridge,id=n0,br=br0"],
            vec!["-netdev", "socket,id=n0,mcast=230.0.0.1:1234"],
            vec!["-netdev", "socket,id=n0,connect=192.0.2.1:1234"],
            vec!["-nic", "user"],
            vec!["-net", "nic"],
        ];
        for args in bad {
            let args: Vec<String> = args.into_iter().map(String::from).collect();
            assert!(check_isolated(&args).is_err(), "accepted {args:?}");
        }
    }

    #[test]
    fn lan_nics_stay_on_loopback_and_have_distinct_macs() {
        let mut lan = LoopbackLan::start().unwrap();
        let a = lan.attach().unwrap();
        let b = lan.attach().unwrap();
        assert_ne!(a.mac(), b.mac());
        let arg = Nic::Lan(a).netdev_arg("l0");
        assert!(arg.starts_with("socket,id=l0,udp=127.0.0.1:"), "{arg}");
        check_isolated(&["-netdev".into(), arg]).unwrap();
    }

    #[test]
    fn lan_hub_copies_frames_between_members_only() {
        let mut lan = LoopbackLan::start().unwrap();
        let a = lan.attach().unwrap();
        let b = lan.attach().unwrap();
        let sock_a = UdpSocket::bind((LOOPBACK, a.local_port)).unwrap();
        let sock_b = UdpSocket::bind((LOOPBACK, b.local_port)).unwrap();
        sock_b
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        sock_a
            .send_to(b"frame-from-a", (LOOPBACK, lan.hub_port()))
            .unwrap();
        let mut buf = [0u8; 64];
        let (n, _) = sock_b.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"frame-from-a");
        // A stranger's datagram is not relayed.
        let stranger = UdpSocket::bind((LOOPBACK, 0)).unwrap();
        stranger
            .send_to(b"intruder", (LOOPBACK, lan.hub_port()))
            .unwrap();
        sock_b
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        assert!(sock_b.recv_from(&mut buf).is_err());
    }
}
