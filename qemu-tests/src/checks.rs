//! What users check on a node, as reusable functions over SSH.

use crate::console::{find_trouble, Trouble};
use crate::deadline::Deadline;
use crate::vm::Vm;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::BTreeSet;

/// Units `systemctl --failed` lists.
pub fn failed_units(vm: &Vm, dl: &Deadline) -> Result<Vec<String>> {
    let out = vm.check(
        "systemctl list-units --failed --plain --no-legend --no-pager",
        dl,
    )?;
    Ok(parse_failed_units(&out))
}

pub fn parse_failed_units(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect()
}

/// Fails if any unit failed, showing `systemctl status` of each.
pub fn assert_no_failed_units(vm: &Vm, dl: &Deadline) -> Result<()> {
    let failed = failed_units(vm, dl)?;
    if failed.is_empty() {
        return Ok(());
    }
    let status = vm
        .run(
            &format!("systemctl status --no-pager -n 15 {}", failed.join(" ")),
            dl,
        )
        .map(|o| o.stdout)
        .unwrap_or_default();
    bail!(
        "failed units in VM {}: {}\n{status}",
        vm.name(),
        failed.join(", ")
    )
}

/// `systemctl is-active UNIT` (active, inactive, failed, activating, ...).
pub fn unit_state(vm: &Vm, unit: &str, dl: &Deadline) -> Result<String> {
    Ok(vm
        .run(&format!("systemctl is-active {unit}"), dl)?
        .stdout
        .trim()
        .to_string())
}

/// Fails unless every unit is active.
pub fn assert_active(vm: &Vm, units: &[&str], dl: &Deadline) -> Result<()> {
    let mut bad = Vec::new();
    for u in units {
        let mut s = unit_state(vm, u, dl)?;
        // Under TCG a unit can still be starting after the agent's report (dockerd takes seconds).
        while (s == "activating" || s == "reloading") && !dl.expired() {
            std::thread::sleep(dl.cap(std::time::Duration::from_secs(3)));
            s = unit_state(vm, u, dl)?;
        }
        if s != "active" {
            bad.push(format!("{u} is {s}"));
        }
    }
    if !bad.is_empty() {
        bail!("VM {}: {}", vm.name(), bad.join(", "));
    }
    Ok(())
}

/// Fails if any unit is active (modes that must not run).
pub fn assert_not_active(vm: &Vm, units: &[&str], dl: &Deadline) -> Result<()> {
    let mut bad = Vec::new();
    for u in units {
        let s = unit_state(vm, u, dl)?;
        if s == "active" || s == "activating" {
            bad.push(format!("{u} is {s}"));
        }
    }
    if !bad.is_empty() {
        bail!("VM {}: must not run: {}", vm.name(), bad.join(", "));
    }
    Ok(())
}

/// TCP ports listening in the guest (`ss -Hltn`).
pub fn listening_ports(vm: &Vm, dl: &Deadline) -> Result<BTreeSet<u16>> {
    Ok(parse_ss_ports(&vm.check("ss -Hltn", dl)?))
}

pub fn parse_ss_ports(out: &str) -> BTreeSet<u16> {
    out.lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(|local| local.rsplit(':').next()?.parse().ok())
        .collect()
}

/// Waits (within `dl`) until every port is listening; services may still be starting.
pub fn wait_listening(vm: &Vm, ports: &[u16], dl: &Deadline) -> Result<()> {
    loop {
        let open = listening_ports(vm, dl)?;
        let missing: Vec<u16> = ports
            .iter()
            .copied()
            .filter(|p| !open.contains(p))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if dl.expired() {
            bail!(
                "VM {}: ports {missing:?} not listening before the deadline (listening: {open:?})",
                vm.name()
            );
        }
        std::thread::sleep(dl.cap(std::time::Duration::from_secs(3)));
    }
}

/// One mount as `findmnt` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub target: String,
    pub source: String,
    pub fstype: String,
    pub options: Vec<String>,
    pub size: u64,
}

impl Mount {
    pub fn has_option(&self, opt: &str) -> bool {
        self.options.iter().any(|o| o == opt)
    }
}

/// The mount at exactly `target`.
pub fn mount_at(vm: &Vm, target: &str, dl: &Deadline) -> Result<Mount> {
    let out = vm.check(
        &format!("findmnt -J -b -o TARGET,SOURCE,FSTYPE,OPTIONS,SIZE --mountpoint {target}"),
        dl,
    )?;
    parse_findmnt(&out).with_context(|| format!("findmnt of {target} in VM {}", vm.name()))
}

pub fn parse_findmnt(json: &str) -> Result<Mount> {
    let v: Value = serde_json::from_str(json).context("findmnt output is not JSON")?;
    let fs = v["filesystems"]
        .get(0)
        .context("findmnt lists no filesystem")?;
    let text = |k: &str| fs[k].as_str().unwrap_or_default().to_string();
    let size = match &fs["size"] {
        Value::Number(n) => n.as_u64().unwrap_or(0),
        Value::String(s) => s.parse().unwrap_or(0),
        _ => 0,
    };
    Ok(Mount {
        target: text("target"),
        source: text("source"),
        fstype: text("fstype"),
        options: text("options").split(',').map(String::from).collect(),
        size,
    })
}

/// Prometheus' `/api/v1/targets` answer as (job, instance, health) rows.
pub fn parse_prometheus_targets(body: &str) -> Result<Vec<(String, String, String)>> {
    let v: Value = serde_json::from_str(body).context("Prometheus' targets are not JSON")?;
    Ok(v["data"]["activeTargets"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            (
                t["labels"]["job"].as_str().unwrap_or("").to_string(),
                t["labels"]["instance"].as_str().unwrap_or("").to_string(),
                t["health"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect())
}

/// `/` is read-only erofs on a device-mapper (verity) device.
pub fn assert_root_verity_erofs(vm: &Vm, dl: &Deadline) -> Result<Mount> {
    let root = mount_at(vm, "/", dl)?;
    if root.fstype != "erofs" || !root.has_option("ro") {
        bail!("/ must be read-only erofs, found {root:?}");
    }
    if !(root.source.starts_with("/dev/mapper/") || root.source.starts_with("/dev/dm-")) {
        bail!(
            "/ must sit on a dm-verity device, found source {}",
            root.source
        );
    }
    Ok(root)
}

/// `/var` is writable ext4 of at least `min_bytes` (it was grown to fill the disk).
pub fn assert_var_grown(vm: &Vm, min_bytes: u64, dl: &Deadline) -> Result<Mount> {
    let var = mount_at(vm, "/var", dl)?;
    if var.fstype != "ext4" || !var.has_option("rw") {
        bail!("/var must be read-write ext4, found {var:?}");
    }
    if var.size < min_bytes {
        bail!(
            "/var is {} MiB but should fill the disk (at least {} MiB)",
            var.size >> 20,
            min_bytes >> 20
        );
    }
    Ok(var)
}

/// Console trouble over all of the VM's boots, except lines matching `allowed`.
pub fn assert_console_clean(vm: &Vm, allowed: &[&str]) -> Result<()> {
    let trouble: Vec<Trouble> = find_trouble(&vm.console().lines())
        .into_iter()
        .filter(|t| !allowed.iter().any(|a| t.line.contains(a)))
        .collect();
    if !trouble.is_empty() {
        bail!(
            "VM {}: trouble on the console:\n{}",
            vm.name(),
            trouble
                .iter()
                .map(|t| format!("    {t}\n"))
                .collect::<String>()
        );
    }
    Ok(())
}

/// `aiw-agent status --json` parsed.
pub fn agent_status(vm: &Vm, dl: &Deadline) -> Result<Value> {
    let out = vm.check("aiw-agent status --json", dl)?;
    serde_json::from_str(&out)
        .with_context(|| format!("`aiw-agent status --json` did not print JSON:\n{out}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_targets_rows() {
        let body = r#"{"status":"success","data":{"activeTargets":[
            {"labels":{"job":"aiware-hosts","instance":"10.0.0.2:8000"},"health":"up"},
            {"labels":{"job":"node","instance":"localhost:9100"},"health":"down"}]}}"#;
        assert_eq!(
            parse_prometheus_targets(body).unwrap(),
            [
                ("aiware-hosts".into(), "10.0.0.2:8000".into(), "up".into()),
                ("node".into(), "localhost:9100".into(), "down".into())
            ]
        );
        assert!(parse_prometheus_targets("<html>").is_err());
    }

    #[test]
    fn parses_failed_units() {
        let out = "docker.service loaded failed failed Docker Application Container Engine\n\
                   nfs-server.service loaded failed failed NFS server and services\n";
        assert_eq!(
            parse_failed_units(out),
            ["docker.service", "nfs-server.service"]
        );
        assert!(parse_failed_units("").is_empty());
    }

    #[test]
    fn parses_listening_ports_v4_and_v6() {
        let out = "LISTEN 0 4096 0.0.0.0:22 0.0.0.0:*\n\
                   LISTEN 0 244 127.0.0.1:5432 0.0.0.0:*\n\
                   LISTEN 0 64 [::]:2049 [::]:*\n\
                   LISTEN 0 4096 *:9100 *:*\n";
        assert_eq!(parse_ss_ports(out), BTreeSet::from([22, 2049, 5432, 9100]));
    }

    #[test]
    fn parses_findmnt_json_old_and_new() {
        let new = r#"{"filesystems":[{"target":"/var","source":"/dev/vda4","fstype":"ext4",
                     "options":"rw,relatime","size":16106127360}]}"#;
        let m = parse_findmnt(new).unwrap();
        assert_eq!(m.fstype, "ext4");
        assert!(m.has_option("rw"));
        assert_eq!(m.size, 16106127360);
        let old = r#"{"filesystems":[{"target":"/","source":"/dev/mapper/root","fstype":"erofs",
                     "options":"ro,relatime","size":"314572800"}]}"#;
        let m = parse_findmnt(old).unwrap();
        assert_eq!(m.size, 314572800);
        assert!(m.has_option("ro"));
        assert!(parse_findmnt(r#"{"filesystems":[]}"#).is_err());
    }
}
