//! The node's inbound firewall: nftables, default deny. Open: established
//! traffic, loopback, ICMP, DHCP replies, and exactly the ports of the modes
//! enabled on this node plus the common ones (SSH, agent metrics, node
//! exporter). Written to /run/aiware/nftables.conf and loaded with `nft -f`;
//! only the agent's own table `inet aiware` is touched (Docker keeps its own).

use crate::files::write_private;
use crate::modes::{Port, Proto};
use crate::paths::Paths;

pub const TABLE: &str = "aiware";

fn set(ports: &[Port], proto: Proto) -> Option<String> {
    let items: Vec<String> = ports
        .iter()
        .filter(|p| p.proto == proto)
        .map(|p| {
            if p.first == p.last {
                p.first.to_string()
            } else {
                format!("{}-{}", p.first, p.last)
            }
        })
        .collect();
    (!items.is_empty()).then(|| items.join(", "))
}

/// The ruleset for these open ports (sorted, deduplicated by the caller or not).
pub fn ruleset(ports: &[Port]) -> String {
    let mut ports = ports.to_vec();
    ports.sort();
    ports.dedup();
    let mut s = String::new();
    s.push_str("# Written by aiw-agent: inbound default deny; the ports of this node's modes.\n");
    // Declaring then deleting the table makes the load idempotent and atomic.
    s.push_str(&format!("table inet {TABLE}\ndelete table inet {TABLE}\n"));
    s.push_str(&format!("table inet {TABLE} {{\n"));
    s.push_str("  chain input {\n");
    s.push_str("    type filter hook input priority filter; policy drop;\n");
    s.push_str("    ct state established,related accept\n");
    s.push_str("    ct state invalid drop\n");
    s.push_str("    iif \"lo\" accept\n");
    s.push_str("    meta l4proto { icmp, ipv6-icmp } accept\n");
    s.push_str("    udp sport 67 udp dport 68 accept comment \"DHCPv4 replies\"\n");
    s.push_str("    udp sport 547 udp dport 546 accept comment \"DHCPv6 replies\"\n");
    if let Some(t) = set(&ports, Proto::Tcp) {
        s.push_str(&format!("    tcp dport {{ {t} }} accept\n"));
    }
    if let Some(u) = set(&ports, Proto::Udp) {
        s.push_str(&format!("    udp dport {{ {u} }} accept\n"));
    }
    s.push_str("    counter comment \"dropped\"\n");
    s.push_str("  }\n}\n");
    s
}

/// Writes the ruleset and loads it (when `real_system`).
pub fn load(paths: &Paths, ports: &[Port], real_system: bool) -> Result<(), String> {
    let text = ruleset(ports);
    let file = paths.run_dir().join("nftables.conf");
    write_private(&file, text.as_bytes(), 0o644)
        .map_err(|e| format!("cannot write {}: {e}", file.display()))?;
    if !real_system {
        return Ok(());
    }
    let out = std::process::Command::new("nft")
        .arg("-f")
        .arg(&file)
        .output()
        .map_err(|e| format!("firewall: cannot run nft: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "firewall: nft -f {} failed: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modes::ModeTable;

    fn p(s: &str) -> Port {
        s.parse().unwrap()
    }

    #[test]
    fn default_deny_with_exactly_the_given_ports() {
        let r = ruleset(&[
            p("tcp/5432"),
            p("tcp/22"),
            p("tcp/22"),
            p("udp/53"),
            p("tcp/4150-4161"),
        ]);
        assert!(r.contains("policy drop;"), "{r}");
        assert!(r.contains("ct state established,related accept"));
        assert!(r.contains("iif \"lo\" accept"));
        assert!(
            r.contains("tcp dport { 22, 4150-4161, 5432 } accept"),
            "{r}"
        );
        assert!(r.contains("udp dport { 53 } accept"), "{r}");
        assert!(!r.contains("flush ruleset"), "Docker's tables must survive");
    }

    #[test]
    fn no_ports_means_no_port_rule() {
        let r = ruleset(&[]);
        assert!(!r.contains("dport {"), "{r}");
        assert!(r.contains("policy drop;"));
    }

    #[test]
    fn modes_ports_from_the_mode_table() {
        let t = ModeTable::parse(
            &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../images/modes.toml"))
                .unwrap(),
            "modes.toml",
        )
        .unwrap();
        let ports = |m: &[&str]| -> Vec<Port> {
            let modes: Vec<String> = m.iter().map(|s| s.to_string()).collect();
            crate::apply::ports(&t, &modes)
                .iter()
                .map(|s| s.parse().unwrap())
                .collect()
        };
        let r = ruleset(&ports(&["db", "redis"]));
        assert!(
            r.contains("tcp dport { 22, 5432, 6379, 8000, 9100 } accept"),
            "{r}"
        );
        let r = ruleset(&ports(&[]));
        assert!(r.contains("tcp dport { 22, 8000, 9100 } accept"), "{r}");
        let r = ruleset(&ports(&["lb", "nfs"]));
        assert!(
            r.contains("tcp dport { 22, 80, 443, 2049, 8000, 9100 } accept"),
            "{r}"
        );
    }

    #[test]
    fn nft_accepts_the_ruleset_when_available() {
        // `nft -c` checks syntax without loading (needs CAP_NET_ADMIN on some kernels).
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("r.nft");
        std::fs::write(&f, ruleset(&[p("tcp/22"), p("tcp/5000-5001")])).unwrap();
        match std::process::Command::new("nft")
            .arg("-c")
            .arg("-f")
            .arg(&f)
            .output()
        {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                let err = String::from_utf8_lossy(&o.stderr);
                if err.contains("Operation not permitted") || err.contains("netlink") {
                    eprintln!("nft -c not permitted here: {err}");
                } else {
                    panic!("nft -c rejected the ruleset: {err}");
                }
            }
            Err(_) => eprintln!("no nft on this host: syntax not checked"),
        }
    }
}
