//! Container image references pinned by digest (`NAME[:TAG]@sha256:HEX`), as
//! a profile's `[[container_images]] pull` writes them. Read by the profile
//! (to refuse a bad one at load time) and by `stages::registry` (to pull it).

/// A registry reference pinned by digest, taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pinned {
    /// `[host[:port]/]path` without tag or digest.
    pub repository: String,
    /// The tag written in the reference, if any.
    pub tag: Option<String>,
    /// `sha256:<64 hex>`: the manifest's digest.
    pub digest: String,
}

impl Pinned {
    /// Parses `NAME[:TAG]@sha256:HEX`. A reference without a digest is refused:
    /// a tag can move, and the build must be reproducible.
    pub fn parse(reference: &str) -> Result<Pinned, String> {
        let Some((name, digest)) = reference.split_once('@') else {
            return Err(format!(
                "{reference:?} is not pinned by digest: write it as NAME:TAG@sha256:<64 hex> \
                 (`skopeo inspect docker://{reference}` shows the digest)"
            ));
        };
        let hex = digest.strip_prefix("sha256:").unwrap_or("");
        if hex.len() != 64
            || !hex
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        {
            return Err(format!(
                "{reference:?}: the digest must be sha256:<64 lower-case hex digits>"
            ));
        }
        // A colon after the last slash starts the tag; one before it is a port.
        let last_slash = name.rfind('/').map_or(0, |i| i + 1);
        let (repository, tag) = match name[last_slash..].find(':') {
            Some(i) => (&name[..last_slash + i], Some(&name[last_slash + i + 1..])),
            None => (name, None),
        };
        let ok_char = |c: char| c.is_ascii_alphanumeric() || "._-/:".contains(c);
        if repository.is_empty()
            || !repository.chars().all(ok_char)
            || repository.starts_with(['/', ':', '-', '.'])
        {
            return Err(format!(
                "{reference:?}: {repository:?} is not an image name"
            ));
        }
        if let Some(t) = tag {
            if t.is_empty()
                || t.len() > 128
                || !t
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            {
                return Err(format!("{reference:?}: {t:?} is not a tag"));
            }
        }
        Ok(Pinned {
            repository: repository.to_string(),
            tag: tag.map(String::from),
            digest: digest.to_string(),
        })
    }

    /// The registry's host (and port) when the name starts with one, as
    /// Docker reads it: a first part with a dot or a colon, or `localhost`.
    pub fn registry_host(&self) -> Option<&str> {
        let (first, rest) = self.repository.split_once('/')?;
        (!rest.is_empty() && (first.contains(['.', ':']) || first == "localhost")).then_some(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d() -> String {
        format!("sha256:{}", "ab".repeat(32))
    }

    #[test]
    fn references_are_taken_apart_ports_and_tags_apart() {
        let p = Pinned::parse(&format!("127.0.0.1:5000/aiware/controller:1.2@{}", d())).unwrap();
        assert_eq!(p.repository, "127.0.0.1:5000/aiware/controller");
        assert_eq!(p.tag.as_deref(), Some("1.2"));
        assert_eq!(p.digest, d());
        assert_eq!(p.registry_host(), Some("127.0.0.1:5000"));
        let p = Pinned::parse(&format!("registry.example.com:443/x@{}", d())).unwrap();
        assert_eq!(p.repository, "registry.example.com:443/x");
        assert_eq!(p.tag, None);
        let p = Pinned::parse(&format!("veritone/engine:latest@{}", d())).unwrap();
        assert_eq!(
            p.registry_host(),
            None,
            "docker.io style: no host in the name"
        );
        assert_eq!(p.tag.as_deref(), Some("latest"));
    }

    #[test]
    fn unpinned_or_malformed_references_are_refused_with_the_fix() {
        let e = Pinned::parse("registry.example.com/x:1.0").unwrap_err();
        assert!(
            e.contains("not pinned by digest") && e.contains("sha256"),
            "{e}"
        );
        let e = Pinned::parse("x:1@sha256:ABC").unwrap_err();
        assert!(e.contains("64 lower-case hex"), "{e}");
        for bad in ["", ":1", "x y:1", "x;rm:1", "/x:1", "x:bad tag"] {
            assert!(
                Pinned::parse(&format!("{bad}@{}", d())).is_err(),
                "{bad:?} accepted"
            );
        }
    }
}
