//! The run-mode model shared by the builder and the agent.
//!
//! The data lives in `images/modes.toml`; the builder reads it to choose
//! packages, the agent reads the copy baked at `/usr/lib/aiware/modes.toml` to
//! start services and open ports. What an image was built with is described by
//! [`ImageInfo`], baked at `/usr/lib/aiware/image.json`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

/// Where the builder bakes the mode table and image description.
pub const MODES_PATH: &str = "/usr/lib/aiware/modes.toml";
pub const IMAGE_INFO_PATH: &str = "/usr/lib/aiware/image.json";

/// The twelve run modes of the aiWARE install guide.
pub const KNOWN_MODES: [&str; 12] = [
    "api",
    "controller",
    "db",
    "es",
    "engine",
    "lb",
    "minio",
    "nfs",
    "nsq",
    "prometheus",
    "redis",
    "registry",
];

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModeTable {
    /// What every node has whatever its modes.
    #[serde(default)]
    pub common: CommonSpec,
    pub modes: BTreeMap<String, ModeSpec>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CommonSpec {
    #[serde(default)]
    pub packages: Vec<String>,
    #[serde(default)]
    pub services: Vec<String>,
    #[serde(default)]
    pub ports: Vec<Port>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModeSpec {
    pub description: String,
    #[serde(default)]
    pub packages: Vec<String>,
    #[serde(default)]
    pub services: Vec<String>,
    #[serde(default)]
    pub ports: Vec<Port>,
    /// Relative to `/var/opt/aiware`.
    #[serde(default)]
    pub directories: Vec<String>,
    #[serde(default)]
    pub sysctls: BTreeMap<String, String>,
    #[serde(default)]
    pub kernel_modules: Vec<String>,
    #[serde(default)]
    pub requires: Vec<String>,
    #[serde(default)]
    pub containerized: bool,
    /// System user that owns the mode's directories (the service's own user).
    #[serde(default)]
    pub owner: Option<String>,
    /// The aiWARE containers the mode runs, each under a unit of its own that
    /// aiw-agent writes at boot (see `node::mode_containers`).
    #[serde(default)]
    pub containers: Vec<ModeContainer>,
}

/// One container of a containerized mode (`[[modes.<mode>.containers]]`).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModeContainer {
    /// Docker's name for it, as the vendor names it (`aiware-controller`); the unit is `<name>.service`.
    pub name: String,
    /// Default image, overridden by the setting `<settings>_IMAGE`.
    pub image: String,
    /// Prefix of its settings: `<settings>_IMAGE`, `<settings>_ARGS`
    /// (arguments, whitespace separated, replacing `args`) and `<settings>_ENV`
    /// (extra `KEY=VALUE` words), e.g. `AIWARE_CONTROLLER`.
    pub settings: String,
    /// Published ports, `"9000"` or `"HOST:CONTAINER"`, optionally `/udp`.
    #[serde(default)]
    pub ports: Vec<String>,
    /// Bind mounts `"<folder under /opt/aiware>:<path in the container>"`.
    #[serde(default)]
    pub volumes: Vec<String>,
    /// Settings passed into it when set (names of `AIWARE_*` variables).
    #[serde(default)]
    pub env: Vec<String>,
    /// Gets `AIWARE_DB_HOST/PORT/NAME/USER/PASS`: the db mode's PostgreSQL
    /// when this node runs it, else the `AIWARE_DB_*` of an existing server.
    #[serde(default)]
    pub database: bool,
    /// Arguments after the image (its entrypoint's); empty: the image's own command.
    #[serde(default)]
    pub args: Vec<String>,
    /// `host` to share the node's network (no published ports); unset: Docker's bridge.
    #[serde(default)]
    pub network: Option<String>,
}

/// A docker image reference we accept: registry, path, tag and digest
/// characters only, so it never needs quoting and is never an option.
pub fn valid_image_ref(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && !s.starts_with(['-', '.', '/', ':', '@'])
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/:@".contains(c))
}

fn valid_env_key(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
}

impl ModeContainer {
    /// Checks one entry of the table; `Err` says what is wrong.
    pub fn check(&self) -> Result<(), String> {
        let n = &self.name;
        let ok_name = !n.is_empty()
            && n.len() <= 64
            && n.starts_with(|c: char| c.is_ascii_lowercase())
            && n.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !ok_name {
            return Err(format!(
                "container name {n:?}: lower-case letters, digits and '-' (it names the unit too)"
            ));
        }
        if !valid_image_ref(&self.image) {
            return Err(format!(
                "container {n}: image {:?} is not an image reference",
                self.image
            ));
        }
        if !self.settings.starts_with("AIWARE_") || !valid_env_key(&self.settings) {
            return Err(format!(
                "container {n}: settings {:?} must be an AIWARE_ prefix such as AIWARE_CONTROLLER",
                self.settings
            ));
        }
        for p in &self.ports {
            parse_published(p).map_err(|e| format!("container {n}: {e}"))?;
        }
        for v in &self.volumes {
            let (host, inside) = v.split_once(':').unwrap_or(("", ""));
            let bad = host.is_empty()
                || host.starts_with('/')
                || host.split('/').any(|x| x == ".." || x.is_empty())
                || !inside.starts_with('/')
                || v.contains(char::is_whitespace);
            if bad {
                return Err(format!(
                    "container {n}: volume {v:?} is not \"<folder under /opt/aiware>:/path/in/container\""
                ));
            }
        }
        for e in &self.env {
            if !valid_env_key(e) {
                return Err(format!("container {n}: env {e:?} is not a variable name"));
            }
        }
        match self.network.as_deref() {
            None | Some("host") => {}
            Some(o) => {
                return Err(format!(
                    "container {n}: network {o:?}: only \"host\" or unset"
                ))
            }
        }
        Ok(())
    }
}

/// `"9000"`, `"9002:9000"`, `"53/udp"` → (host port, container port, proto).
pub fn parse_published(p: &str) -> Result<(u16, u16, Proto), String> {
    let bad = || format!("port {p:?} is not \"PORT\" or \"HOST:CONTAINER\" (optionally /udp)");
    let (ports, proto) = match p.split_once('/') {
        Some((a, "udp")) => (a, Proto::Udp),
        Some((a, "tcp")) => (a, Proto::Tcp),
        Some(_) => return Err(bad()),
        None => (p, Proto::Tcp),
    };
    let num = |s: &str| s.parse::<u16>().ok().filter(|v| *v > 0).ok_or_else(bad);
    match ports.split_once(':') {
        Some((h, c)) => Ok((num(h)?, num(c)?, proto)),
        None => {
            let v = num(ports)?;
            Ok((v, v, proto))
        }
    }
}

/// A firewall port or port range, written `tcp/5432` or `tcp/5000-6000`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Port {
    pub proto: Proto,
    pub first: u16,
    pub last: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        if self.first == self.last {
            write!(f, "{proto}/{}", self.first)
        } else {
            write!(f, "{proto}/{}-{}", self.first, self.last)
        }
    }
}

impl std::str::FromStr for Port {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("port {s:?} is not of the form tcp/5432, udp/53 or tcp/5000-6000");
        let (proto, range) = s.split_once('/').ok_or_else(bad)?;
        let proto = match proto {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            _ => return Err(bad()),
        };
        let (first, last) = match range.split_once('-') {
            Some((a, b)) => (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?),
            None => {
                let p = range.parse().map_err(|_| bad())?;
                (p, p)
            }
        };
        if first == 0 || last < first {
            return Err(bad());
        }
        Ok(Port { proto, first, last })
    }
}

impl Serialize for Port {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ModeTableError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
}

impl ModeTable {
    pub fn load(path: &Path) -> Result<Self, ModeTableError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModeTableError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and checks the table: every guide mode present, no unknown mode,
    /// `requires` only naming modes of the table.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ModeTableError> {
        let err = |message: String| ModeTableError::Parse {
            path: origin.to_string(),
            message,
        };
        let table: ModeTable = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        for name in table.modes.keys() {
            if !KNOWN_MODES.contains(&name.as_str()) {
                return Err(err(format!(
                    "unknown mode [modes.{name}]; the guide's modes are {}",
                    KNOWN_MODES.join(", ")
                )));
            }
        }
        for known in KNOWN_MODES {
            if !table.modes.contains_key(known) {
                return Err(err(format!("mode {known} is missing from the table")));
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for (name, spec) in &table.modes {
            if !spec.containers.is_empty() && !spec.containerized {
                return Err(err(format!(
                    "[modes.{name}] has containers but is not containerized"
                )));
            }
            for c in &spec.containers {
                c.check().map_err(|e| err(format!("[modes.{name}] {e}")))?;
                if !names.insert(c.name.clone()) {
                    return Err(err(format!(
                        "[modes.{name}] container {} is named twice in the table",
                        c.name
                    )));
                }
            }
            for req in &spec.requires {
                if !table.modes.contains_key(req) {
                    return Err(err(format!(
                        "[modes.{name}] requires {req:?}, which is not a mode"
                    )));
                }
            }
        }
        Ok(table)
    }

    pub fn get(&self, mode: &str) -> Option<&ModeSpec> {
        self.modes.get(mode)
    }

    /// Packages to bake for a set of modes, common ones included, sorted and unique.
    pub fn packages_for<'a>(&'a self, modes: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        let mut out: Vec<String> = self.common.packages.clone();
        for m in modes {
            if let Some(spec) = self.modes.get(m) {
                out.extend(spec.packages.iter().cloned());
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// The units that every one of `modes` runs (docker.service for an image
    /// whose modes are all containerized or engines). Whatever a launch picks
    /// among those modes, these units run, so an image may start them at boot
    /// beside the agent instead of after it.
    pub fn services_of_every<'a>(&self, modes: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        let mut common: Option<Vec<String>> = None;
        for m in modes {
            let units = self
                .modes
                .get(m)
                .map(|s| s.services.clone())
                .unwrap_or_default();
            common = Some(match common {
                None => units,
                Some(c) => c.into_iter().filter(|u| units.contains(u)).collect(),
            });
        }
        let mut out = common.unwrap_or_default();
        out.sort();
        out.dedup();
        out
    }

    /// Every unit any mode may start: the agent keeps those of unchosen modes stopped.
    pub fn all_mode_services(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .modes
            .values()
            .flat_map(|m| m.services.iter().cloned())
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// What an image was built with, baked at [`IMAGE_INFO_PATH`].
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ImageInfo {
    pub profile: String,
    pub version: String,
    /// Modes baked into this image.
    pub modes: Vec<String>,
    /// Every profile the builder knew and its modes, so that a node asked for a
    /// mode it lacks can name the images that have it.
    pub profiles: BTreeMap<String, Vec<String>>,
    /// True for profiles that carry the NVIDIA driver and container runtime.
    #[serde(default)]
    pub gpu: bool,
    /// sha256 of the vendor's `aiware-agent` binary baked at
    /// [`VENDOR_AGENT_PATH`] (profile key `vendor_agent`): aiw-agent then
    /// configures the node and starts it instead of joining the controller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor_agent: Option<String>,
    /// Container images baked in (profile key `[[container_images]]`),
    /// loaded into Docker at first boot before any mode container starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub container_images: Vec<BakedImage>,
}

/// Where a profile's `vendor_agent` binary is baked (where the vendor's install script puts it).
pub const VENDOR_AGENT_PATH: &str = "/usr/local/bin/aiware-agent";
/// Folder of the baked image archives, each named `<sha256>.tar`.
pub const BAKED_IMAGES_DIR: &str = "/usr/lib/aiware/images";

/// One container image archive baked into the image.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BakedImage {
    /// Path of the archive on the node (under [`BAKED_IMAGES_DIR`]).
    pub archive: String,
    /// sha256 of the archive file (hex).
    pub sha256: String,
    /// The image's config digest, `sha256:<hex>` (what `docker image inspect` shows as Id).
    pub image_id: String,
    /// `docker-save` or `oci`.
    pub format: String,
    /// The names the archive gives the image (`RepoTags`, or the OCI ref names).
    #[serde(default)]
    pub tags: Vec<String>,
}

impl ImageInfo {
    pub fn profiles_with_mode(&self, mode: &str) -> Vec<&str> {
        self.profiles
            .iter()
            .filter(|(_, modes)| modes.iter().any(|m| m == mode))
            .map(|(p, _)| p.as_str())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo_table() -> ModeTable {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/modes.toml");
        ModeTable::load(&path).unwrap()
    }

    #[test]
    fn repo_mode_table_has_all_twelve_modes() {
        let t = repo_table();
        assert_eq!(t.modes.len(), 12);
        assert_eq!(
            t.get("es")
                .unwrap()
                .sysctls
                .get("vm.max_map_count")
                .map(String::as_str),
            Some("262144")
        );
        assert!(t
            .get("db")
            .unwrap()
            .ports
            .contains(&"tcp/5432".parse().unwrap()));
    }

    #[test]
    fn repo_containerized_modes_name_their_containers() {
        let t = repo_table();
        let c = &t.get("controller").unwrap().containers;
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].name, "aiware-controller");
        assert_eq!(c[0].image, "aiware-controller:latest");
        assert_eq!(c[0].settings, "AIWARE_CONTROLLER");
        assert!(c[0].database);
        assert!(c[0].env.contains(&"AIWARE_INIT_TOKEN".to_string()));
        for m in ["api", "es", "minio", "nsq"] {
            assert!(
                !t.get(m).unwrap().containers.is_empty(),
                "{m} runs containers"
            );
        }
        assert!(
            t.get("engine").unwrap().containers.is_empty(),
            "engines come from the controller"
        );
        // Every published port is one the mode opens in the firewall.
        for (name, spec) in &t.modes {
            for c in &spec.containers {
                if c.network.is_some() {
                    continue;
                }
                for p in &c.ports {
                    let (host, _, proto) = parse_published(p).unwrap();
                    assert!(
                        spec.ports
                            .iter()
                            .any(|o| o.proto == proto && o.first <= host && host <= o.last),
                        "{name}: {} publishes {p}, not opened",
                        c.name
                    );
                }
            }
        }
    }

    #[test]
    fn bad_containers_are_table_errors() {
        let base = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/modes.toml"),
        )
        .unwrap();
        let with = |extra: &str| {
            ModeTable::parse(&format!("{base}\n{extra}"), "m.toml")
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        let c =
            |fields: &str| format!("[[modes.api.containers]]\nsettings = \"AIWARE_X\"\n{fields}");
        assert!(with(&c("name = \"Bad Name\"\nimage = \"a\"")).contains("container name"));
        assert!(with(&c("name = \"x\"\nimage = \"a;rm -rf\"")).contains("not an image reference"));
        assert!(with(&c(
            "name = \"x\"\nimage = \"a\"\nvolumes = [\"../etc:/etc\"]"
        ))
        .contains("volume"));
        assert!(with(&c("name = \"x\"\nimage = \"a\"\nports = [\"70000\"]")).contains("port"));
        assert!(with(&c("name = \"aiware-controller\"\nimage = \"a\"")).contains("named twice"));
        assert!(with(
            "[[modes.db.containers]]\nname = \"x\"\nimage = \"a\"\nsettings = \"AIWARE_X\""
        )
        .contains("not containerized"));
        assert_eq!(
            with(&c(
                "name = \"x\"\nimage = \"reg:5000/a/b:1\"\nports = [\"1:2/udp\"]"
            )),
            ""
        );
    }

    #[test]
    fn port_syntax() {
        let p: Port = "tcp/5000-6000".parse().unwrap();
        assert_eq!((p.first, p.last), (5000, 6000));
        assert_eq!(p.to_string(), "tcp/5000-6000");
        assert!("tcp/0".parse::<Port>().is_err());
        assert!("sctp/1".parse::<Port>().is_err());
        assert!("tcp/9-3".parse::<Port>().is_err());
    }

    #[test]
    fn unknown_mode_and_unknown_key_are_errors() {
        let mut text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/modes.toml"),
        )
        .unwrap();
        text.push_str("\n[modes.ftp]\ndescription = \"x\"\n");
        let e = ModeTable::parse(&text, "m.toml").unwrap_err().to_string();
        assert!(e.contains("unknown mode [modes.ftp]"), "{e}");
        let e = ModeTable::parse("[modes.db]\ndescription=\"x\"\nport=[]\n", "m.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `port`"), "{e}");
    }

    #[test]
    fn packages_for_merges_common_and_dedups() {
        let t = repo_table();
        let p = t.packages_for(["engine", "controller"]);
        assert_eq!(p.iter().filter(|x| *x == "docker.io").count(), 1);
        assert!(p.contains(&"openssh-server".to_string()));
    }

    #[test]
    fn services_of_every_mode_is_the_intersection() {
        let t = repo_table();
        let docker = vec!["docker.service".to_string()];
        assert_eq!(t.services_of_every(["engine"]), docker);
        assert_eq!(t.services_of_every(["engine", "controller", "api"]), docker);
        // db runs PostgreSQL, not Docker: no unit is common.
        assert!(t.services_of_every(["engine", "db"]).is_empty());
        assert!(t
            .services_of_every(["db"])
            .contains(&"postgresql.service".to_string()));
        assert!(t.services_of_every([]).is_empty());
    }
}
