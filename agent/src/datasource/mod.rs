//! Datasources: where launch data (user-data, instance-id, and the platform's
//! own metadata: hostname, SSH keys, instance facts) comes from.
//!
//! Each is a small type behind [`Datasource`], in a file named after it. They
//! are chosen by evidence ([`identify`]: DMI strings, filesystem labels, the
//! kernel command line, local files) before any network is touched, the way
//! cloud-init's ds-identify does; no blind probing of link-local addresses.

pub mod azure;
mod cmdline;
mod configdrive;
mod ec2;
mod esp;
mod gce;
mod nocloud;
pub mod retry;
mod seedfs;
mod vmware;

pub use azure::AzureSource;
pub use cmdline::CmdlineSource;
pub use configdrive::ConfigDriveSource;
pub use ec2::Ec2Source;
pub use esp::EspSource;
pub use gce::GceSource;
pub use nocloud::NoCloudSource;
pub use vmware::VmwareSource;

use crate::paths::Paths;
use std::time::Instant;

/// What a datasource found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LaunchData {
    /// Raw user-data; `None` when the source has none (e.g. IMDS 404).
    pub user_data: Option<Vec<u8>>,
    /// The launch's identity; a new one replaces persisted settings.
    pub instance_id: Option<String>,
    /// What the platform says about the instance besides user-data.
    pub platform: PlatformMeta,
}

/// The platform's metadata (afterburn's job): what the user chose at launch
/// outside user-data (instance name, key pair) and what the cloud assigned.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PlatformMeta {
    /// Already checked with [`platform_hostname`].
    pub hostname: Option<String>,
    /// OpenSSH public key lines, for the image's admin user.
    pub ssh_keys: Vec<String>,
    /// The instance type or size (`m5.large`, `n2-standard-4`, `Standard_D4s_v5`).
    pub instance_type: Option<String>,
    pub region: Option<String>,
    /// Availability zone (or Azure's zone number).
    pub zone: Option<String>,
    pub private_ips: Vec<String>,
    pub public_ips: Vec<String>,
}

/// A platform's host name as the kernel can take it: the name itself when it
/// is a valid host name of at most 64 bytes (the kernel's and hostnamed's
/// limit), else its first label (GCE's `name.zone.c.project.internal` often is
/// longer; cloud-init sets the short name too). `None` when neither is valid.
pub fn platform_hostname(raw: &str) -> Option<String> {
    let name = raw.trim().trim_end_matches('.');
    let fits = |h: &str| h.len() <= 64 && crate::settings::valid_hostname(h);
    if fits(name) {
        return Some(name.to_string());
    }
    let short = name.split('.').next().unwrap_or("");
    if fits(short) {
        crate::log::info(&format!(
            "the platform's host name {name:?} is longer than 64 characters or not valid; using {short:?}"
        ));
        return Some(short.to_string());
    }
    crate::log::info(&format!(
        "the platform's host name {name:?} is not a valid host name (ignored)"
    ));
    None
}

/// SSH keys in the forms cloud-init accepts in NoCloud and OVF meta-data
/// (`public-keys`): one string of lines, a list of strings, or a map whose
/// values are keys (OpenStack's `public_keys` is `{name: key}`).
pub fn public_keys_value(v: &serde_json::Value) -> Vec<String> {
    let lines = |s: &str| -> Vec<String> {
        s.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(String::from)
            .collect()
    };
    match v {
        serde_json::Value::String(s) => lines(s),
        serde_json::Value::Array(a) => a.iter().flat_map(public_keys_value).collect(),
        serde_json::Value::Object(m) => m.values().flat_map(public_keys_value).collect(),
        _ => Vec::new(),
    }
}

/// A text answer trimmed, `None` when empty.
fn text(b: Option<Vec<u8>>) -> Option<String> {
    b.map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .filter(|s| !s.is_empty())
}

#[derive(Debug, thiserror::Error)]
pub enum DsError {
    #[error("{source_name}: gave up at the deadline while waiting for {what}: {last}")]
    Deadline {
        source_name: &'static str,
        what: String,
        last: String,
    },
    #[error("{source_name}: {message}")]
    Failed {
        source_name: &'static str,
        message: String,
    },
}

pub trait Datasource {
    /// Short name shown in `aiw-agent status` (`nocloud`, `ec2`, ...).
    fn name(&self) -> &'static str;
    /// Fetches launch data, waiting at most until `deadline`.
    fn fetch(&self, deadline: Instant) -> Result<LaunchData, DsError>;
}

/// A datasource and the evidence it was chosen on.
pub struct Candidate {
    pub source: Box<dyn Datasource>,
    pub reason: String,
}

/// Where the cloud metadata services are; tests point them at 127.0.0.1.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub ec2: String,
    pub gce: String,
    pub azure: String,
    /// Azure's wireserver (`168.63.129.16`), told when the VM is provisioned.
    pub azure_wireserver: String,
    /// `vmware-rpctool` (or a test double of it).
    pub vmware_rpctool: String,
}

impl Default for Endpoints {
    fn default() -> Self {
        // GCE's metadata.google.internal is 169.254.169.254 as well; the IP needs no DNS.
        let imds =
            std::env::var("AIW_AGENT_IMDS_URL").unwrap_or_else(|_| "http://169.254.169.254".into());
        Endpoints {
            ec2: imds.clone(),
            gce: imds.clone(),
            azure: imds,
            azure_wireserver: std::env::var("AIW_AGENT_AZURE_WIRESERVER_URL")
                .unwrap_or_else(|_| format!("http://{}", azure::WIRESERVER_ADDR)),
            vmware_rpctool: "vmware-rpctool".into(),
        }
    }
}

/// Seconds since 1970 of a UTC date and time (Howard Hinnant's
/// days-from-civil); the metadata services write dates in their own forms
/// (GCE's key expiry, EC2's scheduled events) and parse them to this.
fn unix_of_civil(y: i64, m: i64, d: i64, hh: i64, mm: i64, ss: i64) -> Option<u64> {
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86400 + hh * 3600 + mm * 60 + ss).ok()
}

fn read_trim(p: &std::path::Path) -> String {
    std::fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Facts the choice is made on, kept for `status`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Evidence {
    pub sys_vendor: String,
    pub product_name: String,
    pub product_version: String,
    pub chassis_asset_tag: String,
    pub board_vendor: String,
    pub bios_vendor: String,
    pub labels: Vec<String>,
    pub cmdline_keys: Vec<String>,
    pub esp_file: bool,
}

pub fn gather_evidence(paths: &Paths) -> Evidence {
    let labels = std::fs::read_dir(paths.by_label())
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_else(|_| Vec::new());
    let cmdline = read_trim(&paths.cmdline());
    Evidence {
        sys_vendor: read_trim(&paths.dmi("sys_vendor")),
        product_name: read_trim(&paths.dmi("product_name")),
        product_version: read_trim(&paths.dmi("product_version")),
        chassis_asset_tag: read_trim(&paths.dmi("chassis_asset_tag")),
        board_vendor: read_trim(&paths.dmi("board_vendor")),
        bios_vendor: read_trim(&paths.dmi("bios_vendor")),
        labels,
        cmdline_keys: cmdline::aiware_args(&cmdline)
            .into_iter()
            .map(|(k, _)| k)
            .collect(),
        esp_file: paths.esp_user_data().is_file(),
    }
}

/// Azure's fixed chassis asset tag.
const AZURE_ASSET_TAG: &str = "7783-7084-3265-9085-8269-3286-77";

/// Datasources to try, in order, each with the evidence that put it there.
pub fn identify(paths: &Paths, ep: &Endpoints, ev: &Evidence) -> Vec<Candidate> {
    let mut out: Vec<Candidate> = Vec::new();
    let mut add =
        |source: Box<dyn Datasource>, reason: String| out.push(Candidate { source, reason });
    for label in ["cidata", "CIDATA"] {
        if ev.labels.iter().any(|l| l == label) {
            add(
                Box::new(NoCloudSource::new(paths.clone(), label)),
                format!("a filesystem labelled {label} is present"),
            );
            break;
        }
    }
    if ev.labels.iter().any(|l| l == "config-2" || l == "CONFIG-2") {
        add(
            Box::new(ConfigDriveSource::new(paths.clone())),
            "a filesystem labelled config-2 is present (OpenStack config drive)".into(),
        );
    }
    if ev.esp_file {
        add(
            Box::new(EspSource::new(paths.clone())),
            "the ESP holds /efi/aiware/user-data".into(),
        );
    }
    if !ev.cmdline_keys.is_empty() {
        add(
            Box::new(CmdlineSource::new(paths.clone())),
            format!("the kernel command line has {}", ev.cmdline_keys.join(" ")),
        );
    }
    let dmi = [
        &ev.sys_vendor,
        &ev.product_name,
        &ev.product_version,
        &ev.bios_vendor,
        &ev.board_vendor,
        &ev.chassis_asset_tag,
    ];
    let any = |needle: &str| dmi.iter().any(|v| v.to_ascii_lowercase().contains(needle));
    if ev.chassis_asset_tag == AZURE_ASSET_TAG {
        add(
            Box::new(AzureSource::new(&ep.azure)),
            format!("DMI chassis_asset_tag is Azure's {AZURE_ASSET_TAG}"),
        );
    } else if any("amazon") || ev.product_version.to_ascii_lowercase().contains("amazon") {
        add(
            Box::new(Ec2Source::new(&ep.ec2)),
            format!(
                "DMI says Amazon EC2 (sys_vendor {:?}, product_version {:?})",
                ev.sys_vendor, ev.product_version
            ),
        );
    } else if any("google") {
        add(
            Box::new(GceSource::new(&ep.gce)),
            format!(
                "DMI says Google Compute Engine (product_name {:?})",
                ev.product_name
            ),
        );
    }
    // VMware: the OVF environment CD-ROM (vSphere's ISO transport) and/or DMI.
    let ovf_label = vmware::OVF_ENV_LABELS
        .iter()
        .find(|l| ev.labels.iter().any(|x| x == *l));
    let vmware_dmi = ev.sys_vendor.to_ascii_lowercase().contains("vmware");
    if ovf_label.is_some() || vmware_dmi {
        let mut src = VmwareSource::new(&ep.vmware_rpctool);
        let mut why = Vec::new();
        if let Some(l) = ovf_label {
            src = src.with_ovf_iso(paths.clone(), l);
            why.push(format!(
                "a CD-ROM labelled {:?} is present (OVF environment, ISO transport)",
                l.replace("\\x20", " ")
            ));
        }
        if vmware_dmi {
            why.push(format!("DMI sys_vendor is {:?}", ev.sys_vendor));
        }
        add(Box::new(src), why.join("; "));
    }
    out
}

/// A stable id for launch data that carries none: its digest.
pub fn digest_id(prefix: &str, data: &[u8]) -> String {
    use sha2::Digest;
    format!(
        "{prefix}-{}",
        &hex::encode(sha2::Sha256::digest(data))[..16]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_hostnames_fit_the_kernel_or_are_shortened_or_dropped() {
        let h = |s: &str| platform_hostname(s);
        assert_eq!(h("ceo-engine\n").as_deref(), Some("ceo-engine"));
        assert_eq!(
            h("ip-10-0-0-5.ec2.internal.").as_deref(),
            Some("ip-10-0-0-5.ec2.internal")
        );
        let long = format!("{}.europe-west4-b.c.project.internal", "n".repeat(40));
        assert_eq!(h(&long), Some("n".repeat(40)));
        assert_eq!(h(&"x".repeat(65)), None);
        assert_eq!(h("under_score"), None);
        assert_eq!(h(""), None);
    }

    #[test]
    fn public_keys_as_text_list_or_map() {
        let v = |y: &str| public_keys_value(&serde_yaml::from_str(y).unwrap());
        assert_eq!(
            v("|\n  ssh-ed25519 A a\n  # note\n\n  ssh-rsa B b\n"),
            ["ssh-ed25519 A a", "ssh-rsa B b"]
        );
        assert_eq!(
            v("[ssh-ed25519 A a, [ssh-rsa B b]]"),
            ["ssh-ed25519 A a", "ssh-rsa B b"]
        );
        assert_eq!(v("{k1: ssh-ed25519 A a}"), ["ssh-ed25519 A a"]);
        assert!(v("42").is_empty());
    }
}
