//! VMware: the OVF environment (`ovf-env.xml`, whose `user-data` property the
//! OVA declares) on the CD-ROM vSphere attaches for the ISO transport (volume
//! label `OVF ENV`), or through guestinfo (`guestinfo.ovfEnv`); and guestinfo
//! `guestinfo.userdata` with `guestinfo.userdata.encoding` (`base64`/`b64` or
//! `gzip+base64`/`gz+b64`), read with `vmware-rpctool`. The platform's host
//! name and SSH keys come from the OVF properties `hostname`/`local-hostname`
//! and `public-keys`, or from `guestinfo.metadata` (NoCloud-style meta-data).

use super::seedfs::SeedFs;
use super::{Datasource, DsError, LaunchData, PlatformMeta};
use crate::paths::Paths;
use base64::Engine;
use std::io::Read;
use std::time::Instant;

/// Volume labels of the OVF environment ISO as `/dev/disk/by-label` names them
/// (udev writes the space as `\x20`), the ones cloud-init's ds-identify accepts.
pub const OVF_ENV_LABELS: &[&str] = &[
    "OVF\\x20ENV",
    "ovf\\x20env",
    "OVF ENV",
    "ovf env",
    "OVFENV",
    "ovfenv",
];

/// Names the environment file is found under on that ISO.
const OVF_ENV_FILES: &[&str] = &["ovf-env.xml", "ovf_env.xml"];

pub struct VmwareSource {
    rpctool: String,
    /// `(paths, by-label name)` of an OVF environment ISO, when one is present.
    ovf_iso: Option<(Paths, String)>,
}

impl VmwareSource {
    pub fn new(rpctool: &str) -> Self {
        VmwareSource {
            rpctool: rpctool.into(),
            ovf_iso: None,
        }
    }

    /// Reads the OVF environment from the ISO at `/dev/disk/by-label/<label>` first.
    pub fn with_ovf_iso(mut self, paths: Paths, label: &str) -> Self {
        self.ovf_iso = Some((paths, label.into()));
        self
    }

    /// `Ok(None)` when the key is not set (rpctool exits non-zero with "No value found").
    fn info_get(&self, key: &str) -> Result<Option<String>, DsError> {
        let out = std::process::Command::new(&self.rpctool)
            .arg(format!("info-get {key}"))
            .output()
            .map_err(|e| DsError::Failed {
                source_name: "vmware",
                message: format!("cannot run {}: {e}", self.rpctool),
            })?;
        if !out.status.success() {
            return Ok(None);
        }
        let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ok((!v.is_empty()).then_some(v))
    }

    fn ovf_env_from_iso(&self, paths: &Paths, label: &str) -> Result<Option<String>, DsError> {
        let fail = |message: String| DsError::Failed {
            source_name: "vmware",
            message,
        };
        let fs = SeedFs::open(paths, label).map_err(fail)?;
        for name in OVF_ENV_FILES {
            if let Some(b) = fs.read(name).map_err(fail)? {
                return Ok(Some(String::from_utf8_lossy(&b).into_owned()));
            }
        }
        Err(fail(format!(
            "the OVF environment CD-ROM ({label}) holds no ovf-env.xml"
        )))
    }
}

pub fn decode(value: &str, encoding: Option<&str>) -> Result<Vec<u8>, String> {
    let b64 = |s: &str| {
        let c: String = s.split_ascii_whitespace().collect();
        base64::engine::general_purpose::STANDARD
            .decode(c)
            .map_err(|e| format!("not base64: {e}"))
    };
    match encoding.map(str::to_ascii_lowercase).as_deref() {
        None | Some("") => Ok(value.as_bytes().to_vec()),
        Some("base64" | "b64") => b64(value),
        Some("gzip+base64" | "gz+b64") => {
            let z = b64(value)?;
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&z[..])
                .take(crate::userdata::MAX_USER_DATA as u64)
                .read_to_end(&mut out)
                .map_err(|e| format!("not gzip: {e}"))?;
            Ok(out)
        }
        Some(other) => Err(format!(
            "guestinfo.userdata.encoding {other:?} is not base64 or gzip+base64"
        )),
    }
}

/// What an OVF environment document says.
#[derive(Debug, Default, PartialEq)]
pub struct OvfEnv {
    /// `Environment`'s `oe:id`, else vSphere's `ve:vCenterId`.
    pub id: Option<String>,
    /// `PropertySection` entries `(oe:key, oe:value)`, in order.
    pub properties: Vec<(String, String)>,
}

impl OvfEnv {
    pub fn property(&self, key: &str) -> Option<&str> {
        self.properties
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `hostname` (or cloud-init's `local-hostname`) and `public-keys`, the
    /// properties an OVA declares for them.
    pub fn platform(&self) -> PlatformMeta {
        let hostname = self
            .property("local-hostname")
            .filter(|h| !h.trim().is_empty())
            .or_else(|| self.property("hostname"))
            .and_then(super::platform_hostname);
        PlatformMeta {
            hostname,
            ssh_keys: self
                .property("public-keys")
                .map(|k| super::public_keys_value(&serde_json::Value::String(k.into())))
                .unwrap_or_default(),
            ..PlatformMeta::default()
        }
    }

    /// The `user-data` property: base64 as vSphere users give it (cloud-init
    /// decodes it too), or plain text when it is not base64. `None` when empty.
    pub fn user_data(&self) -> Option<Vec<u8>> {
        let v = self.property("user-data")?;
        let compact: String = v.split_ascii_whitespace().collect();
        if compact.is_empty() {
            return None;
        }
        Some(
            base64::engine::general_purpose::STANDARD
                .decode(compact.as_bytes())
                .unwrap_or_else(|_| v.as_bytes().to_vec()),
        )
    }
}

/// Parses an OVF environment (`ovf-env.xml`): enough XML for its flat
/// elements and attributes, whatever the namespace prefixes.
pub fn parse_ovf_env(xml: &str) -> Result<OvfEnv, String> {
    let mut env = OvfEnv::default();
    let mut seen_env = false;
    let mut rest = xml;
    while let Some(i) = rest.find('<') {
        rest = &rest[i + 1..];
        if rest.starts_with('?') || rest.starts_with('/') {
            continue;
        }
        if let Some(after) = rest.strip_prefix("!--") {
            rest = after.find("-->").map(|j| &after[j + 3..]).unwrap_or("");
            continue;
        }
        if rest.starts_with('!') {
            continue;
        }
        let end = tag_end(rest).ok_or("an element is not closed with '>'")?;
        let tag = &rest[..end];
        rest = &rest[end + 1..];
        let name_len = tag
            .find(|c: char| c.is_whitespace() || c == '/')
            .unwrap_or(tag.len());
        let local = local_name(&tag[..name_len]);
        let attrs = attributes(&tag[name_len..])?;
        let get = |want: &str| {
            attrs
                .iter()
                .find(|(k, _)| local_name(k) == want)
                .map(|(_, v)| v.clone())
        };
        match local {
            "Environment" => {
                seen_env = true;
                env.id = get("id")
                    .filter(|s| !s.is_empty())
                    .or_else(|| get("vCenterId").filter(|s| !s.is_empty()));
            }
            "Property" => {
                if let Some(k) = get("key") {
                    env.properties.push((k, get("value").unwrap_or_default()));
                }
            }
            _ => {}
        }
    }
    if !seen_env {
        return Err("not an OVF environment: no <Environment> element".into());
    }
    Ok(env)
}

/// Index of the `>` closing a tag, outside quoted attribute values.
fn tag_end(s: &str) -> Option<usize> {
    let mut quote: Option<char> = None;
    for (i, c) in s.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '>') => return Some(i),
            _ => {}
        }
    }
    None
}

fn local_name(n: &str) -> &str {
    n.rsplit(':').next().unwrap_or(n)
}

fn attributes(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut s = s.trim_start();
    while !s.is_empty() && !s.starts_with('/') {
        let eq = s.find('=').ok_or("an attribute has no value")?;
        let name = s[..eq].trim().to_string();
        let v = s[eq + 1..].trim_start();
        let q = v.chars().next().ok_or("an attribute has no value")?;
        if q != '"' && q != '\'' {
            return Err(format!("attribute {name} is not quoted"));
        }
        let close = v[1..].find(q).ok_or("an attribute value is not closed")?;
        out.push((name, unescape(&v[1..1 + close])));
        s = v[close + 2..].trim_start();
    }
    Ok(out)
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let Some(semi) = rest.find(';') else { break };
        let ent = &rest[1..semi];
        let ch = match ent {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ => ent
                .strip_prefix("#x")
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .or_else(|| ent.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        };
        match ch {
            Some(c) => {
                out.push(c);
                rest = &rest[semi + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

impl Datasource for VmwareSource {
    fn name(&self) -> &'static str {
        "vmware"
    }
    fn fetch(&self, _deadline: Instant) -> Result<LaunchData, DsError> {
        let fail = |message: String| DsError::Failed {
            source_name: "vmware",
            message,
        };
        // The OVF environment: the ISO transport, else the guestinfo one.
        let (doc, rpctool_usable) = match &self.ovf_iso {
            Some((paths, label)) => (self.ovf_env_from_iso(paths, label)?, false),
            None => (self.info_get("guestinfo.ovfEnv")?, true),
        };
        let mut ovf_platform = PlatformMeta::default();
        if let Some(doc) = doc {
            let env = parse_ovf_env(&doc).map_err(fail)?;
            let platform = env.platform();
            if let Some(data) = env.user_data() {
                let instance_id = env
                    .id
                    .clone()
                    .or_else(|| Some(super::digest_id("vmware", &data)));
                return Ok(LaunchData {
                    user_data: Some(data),
                    instance_id,
                    platform,
                });
            }
            crate::log::info("vmware: the OVF environment has no user-data property value");
            ovf_platform = platform;
        }
        let without_user_data = LaunchData {
            platform: ovf_platform.clone(),
            ..LaunchData::default()
        };
        if !rpctool_usable && !which(&self.rpctool) {
            // An OVF environment CD-ROM and no guestinfo tool: nothing more to ask.
            return Ok(without_user_data);
        }
        let Some(value) = self.info_get("guestinfo.userdata")? else {
            return Ok(without_user_data);
        };
        let enc = self.info_get("guestinfo.userdata.encoding")?;
        let data = decode(&value, enc.as_deref()).map_err(fail)?;
        let meta = self.guestinfo_metadata()?;
        let instance_id = meta
            .as_deref()
            .and_then(super::nocloud::meta_instance_id)
            .or_else(|| Some(super::digest_id("vmware", &data)));
        let platform = meta
            .as_deref()
            .map(super::nocloud::meta_platform)
            .filter(|p| *p != PlatformMeta::default())
            .unwrap_or(ovf_platform);
        Ok(LaunchData {
            user_data: Some(data),
            instance_id,
            platform,
        })
    }
}

impl VmwareSource {
    /// `guestinfo.metadata` decoded (`guestinfo.metadata.encoding` as for
    /// user-data); one that does not decode is left out, with a log line.
    fn guestinfo_metadata(&self) -> Result<Option<Vec<u8>>, DsError> {
        let Some(value) = self.info_get("guestinfo.metadata")? else {
            return Ok(None);
        };
        let enc = self.info_get("guestinfo.metadata.encoding")?;
        match decode(&value, enc.as_deref()) {
            Ok(m) => Ok(Some(m)),
            Err(e) => {
                crate::log::info(&format!("vmware: guestinfo.metadata: {e} (left out)"));
                Ok(None)
            }
        }
    }
}

/// Whether `tool` can be run: a path to a file, or a name found on `PATH`.
fn which(tool: &str) -> bool {
    if tool.contains('/') {
        return std::path::Path::new(tool).is_file();
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VSPHERE_ENV: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<Environment
     xmlns="http://schemas.dmtf.org/ovf/environment/1"
     xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
     xmlns:oe="http://schemas.dmtf.org/ovf/environment/1"
     xmlns:ve="http://www.vmware.com/schema/ovfenv"
     oe:id=""
     ve:vCenterId="vm-4242">
   <PlatformSection>
      <Kind>VMware ESXi</Kind>
      <Version>8.0.2</Version>
      <Vendor>VMware, Inc.</Vendor>
      <Locale>en</Locale>
   </PlatformSection>
   <!-- <Property oe:key="user-data" oe:value="commented out"/> -->
   <PropertySection>
         <Property oe:key="hostname" oe:value="a &amp; b"/>
         <Property oe:key="user-data" oe:value="QUlXQVJFX01PREU9ZW5naW5lCg=="/>
   </PropertySection>
   <ve:EthernetAdapterSection>
      <ve:Adapter ve:mac="00:50:56:aa:bb:cc" ve:network="VM Network" ve:unitNumber="7"/>
   </ve:EthernetAdapterSection>
</Environment>
"#;

    #[test]
    fn parses_a_vsphere_ovf_environment() {
        let env = parse_ovf_env(VSPHERE_ENV).unwrap();
        assert_eq!(env.id.as_deref(), Some("vm-4242"));
        assert_eq!(env.property("hostname"), Some("a & b"));
        assert_eq!(
            env.user_data().as_deref(),
            Some(&b"AIWARE_MODE=engine\n"[..])
        );
        assert_eq!(env.properties.len(), 2, "{env:?}");
        // "a & b" is no host name: left out rather than refused by hostnamed.
        assert_eq!(env.platform(), PlatformMeta::default());
    }

    #[test]
    fn ovf_properties_give_the_hostname_and_keys() {
        let env = parse_ovf_env(
            "<Environment oe:id='vm-7'><PropertySection>\
             <Property oe:key='hostname' oe:value='vsphere-engine'/>\
             <Property oe:key='public-keys' oe:value='ssh-ed25519 AAAA1 a@b&#10;ssh-rsa AAAA2 c@d'/>\
             <Property oe:key='user-data' oe:value='QUlXQVJFX01PREU9ZW5naW5lCg=='/>\
             </PropertySection></Environment>",
        )
        .unwrap();
        let p = env.platform();
        assert_eq!(p.hostname.as_deref(), Some("vsphere-engine"));
        assert_eq!(p.ssh_keys, ["ssh-ed25519 AAAA1 a@b", "ssh-rsa AAAA2 c@d"]);
    }

    #[test]
    fn user_data_property_may_be_plain_text_or_empty() {
        let env = parse_ovf_env(
            "<Environment oe:id='i-9'><PropertySection>\
             <Property oe:key='user-data' oe:value='#cloud-config&#10;aiware:&#x0A;  AIWARE_MODE: db'/>\
             </PropertySection></Environment>",
        )
        .unwrap();
        assert_eq!(env.id.as_deref(), Some("i-9"));
        assert_eq!(
            env.user_data().as_deref(),
            Some(&b"#cloud-config\naiware:\n  AIWARE_MODE: db"[..])
        );
        let empty = parse_ovf_env(
            r#"<Environment><Property oe:key="user-data" oe:value=""/></Environment>"#,
        )
        .unwrap();
        assert_eq!(empty.user_data(), None);
        assert!(parse_ovf_env("<Other/>").is_err());
        assert!(parse_ovf_env("<Environment oe:id=\"x").is_err());
    }

    #[test]
    fn reads_ovf_env_from_the_cdrom_without_rpctool() {
        let t = tempfile::tempdir().unwrap();
        let paths = Paths::new(t.path());
        let dir = paths.by_label().join("OVF\\x20ENV");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ovf-env.xml"), VSPHERE_ENV).unwrap();
        let src = VmwareSource::new("/nonexistent/vmware-rpctool")
            .with_ovf_iso(paths.clone(), "OVF\\x20ENV");
        let ld = src.fetch(Instant::now()).unwrap();
        assert_eq!(ld.user_data.as_deref(), Some(&b"AIWARE_MODE=engine\n"[..]));
        assert_eq!(ld.instance_id.as_deref(), Some("vm-4242"));
        // No user-data in the environment and no rpctool: none, not an error.
        std::fs::write(dir.join("ovf-env.xml"), "<Environment/>").unwrap();
        assert_eq!(src.fetch(Instant::now()).unwrap(), LaunchData::default());
        // A CD-ROM with that label but no environment file is an error.
        std::fs::remove_file(dir.join("ovf-env.xml")).unwrap();
        assert!(src.fetch(Instant::now()).is_err());
    }

    #[test]
    fn an_ovf_env_cdrom_is_evidence_of_vmware_with_or_without_dmi() {
        use crate::datasource::{gather_evidence, identify, Endpoints};
        let t = tempfile::tempdir().unwrap();
        let paths = Paths::new(t.path());
        let dir = paths.by_label().join("OVF\\x20ENV");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ovf-env.xml"), VSPHERE_ENV).unwrap();
        let c = identify(&paths, &Endpoints::default(), &gather_evidence(&paths));
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].source.name(), "vmware");
        assert_eq!(
            c[0].reason,
            "a CD-ROM labelled \"OVF ENV\" is present (OVF environment, ISO transport)"
        );
        let ld = c[0].source.fetch(Instant::now()).unwrap();
        assert_eq!(ld.user_data.as_deref(), Some(&b"AIWARE_MODE=engine\n"[..]));
        std::fs::create_dir_all(paths.dmi("x").parent().unwrap()).unwrap();
        std::fs::write(paths.dmi("sys_vendor"), "VMware, Inc.\n").unwrap();
        let c = identify(&paths, &Endpoints::default(), &gather_evidence(&paths));
        assert_eq!(c.len(), 1);
        assert!(
            c[0].reason
                .ends_with("; DMI sys_vendor is \"VMware, Inc.\""),
            "{}",
            c[0].reason
        );
    }
}
