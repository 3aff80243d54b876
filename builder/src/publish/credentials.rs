//! AWS credentials and region the way the AWS CLI and SDKs find them, for the
//! sources that need no network: environment variables, then the shared
//! credentials and config files for AWS_PROFILE (default `default`).

use super::sigv4::Credentials;
use anyhow::{bail, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The environment the chain reads, so tests can give their own.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

fn home(env: &dyn Env) -> Option<PathBuf> {
    env.var("HOME").map(PathBuf::from)
}

fn profile_name(env: &dyn Env) -> String {
    env.var("AWS_PROFILE")
        .or_else(|| env.var("AWS_DEFAULT_PROFILE"))
        .unwrap_or_else(|| "default".into())
}

fn credentials_file(env: &dyn Env) -> Option<PathBuf> {
    env.var("AWS_SHARED_CREDENTIALS_FILE")
        .map(PathBuf::from)
        .or_else(|| home(env).map(|h| h.join(".aws/credentials")))
}

fn config_file(env: &dyn Env) -> Option<PathBuf> {
    env.var("AWS_CONFIG_FILE")
        .map(PathBuf::from)
        .or_else(|| home(env).map(|h| h.join(".aws/config")))
}

/// Sections of an INI file: name -> key -> value.
pub fn parse_ini(text: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut section = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_string();
            out.entry(section.clone()).or_default();
        } else if let Some((k, v)) = line.split_once('=') {
            out.entry(section.clone())
                .or_default()
                .insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    out
}

fn read_section(path: &Path, section: &str) -> Option<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).ok()?;
    parse_ini(&text).remove(section)
}

fn keys_from(s: &BTreeMap<String, String>) -> Option<Credentials> {
    Some(Credentials {
        access_key_id: s.get("aws_access_key_id")?.clone(),
        secret_access_key: s.get("aws_secret_access_key")?.clone(),
        session_token: s
            .get("aws_session_token")
            .or_else(|| s.get("aws_security_token"))
            .cloned(),
    })
}

/// Environment, then the credentials file, then the config file.
pub fn load(env: &dyn Env) -> Result<Credentials> {
    if let (Some(id), Some(secret)) = (
        env.var("AWS_ACCESS_KEY_ID"),
        env.var("AWS_SECRET_ACCESS_KEY"),
    ) {
        return Ok(Credentials {
            access_key_id: id,
            secret_access_key: secret,
            session_token: env.var("AWS_SESSION_TOKEN"),
        });
    }
    let profile = profile_name(env);
    let cred_file = credentials_file(env);
    if let Some(c) = cred_file
        .as_deref()
        .and_then(|f| read_section(f, &profile))
        .as_ref()
        .and_then(keys_from)
    {
        return Ok(c);
    }
    let cfg_section = if profile == "default" {
        "default".to_string()
    } else {
        format!("profile {profile}")
    };
    let cfg_file = config_file(env);
    if let Some(c) = cfg_file
        .as_deref()
        .and_then(|f| read_section(f, &cfg_section))
        .as_ref()
        .and_then(keys_from)
    {
        return Ok(c);
    }
    bail!(
        "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and \
         AWS_SESSION_TOKEN for temporary ones), or put aws_access_key_id and \
         aws_secret_access_key in profile {profile:?} of {} (AWS_PROFILE picks the \
         profile). SSO, credential_process and instance roles are not read: export \
         such credentials first (aws configure export-credentials --format env)",
        cred_file
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "~/.aws/credentials".into())
    )
}

/// `--region`, then AWS_REGION, AWS_DEFAULT_REGION, then the profile's
/// `region` in the config file.
pub fn region(given: Option<&str>, env: &dyn Env) -> Result<String> {
    let from_config = || {
        let profile = profile_name(env);
        let section = if profile == "default" {
            "default".to_string()
        } else {
            format!("profile {profile}")
        };
        config_file(env)
            .and_then(|f| read_section(&f, &section))
            .and_then(|s| s.get("region").cloned())
    };
    let r = given
        .map(str::to_string)
        .or_else(|| env.var("AWS_REGION"))
        .or_else(|| env.var("AWS_DEFAULT_REGION"))
        .or_else(from_config);
    match r {
        Some(r)
            if !r.is_empty()
                && r.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') =>
        {
            Ok(r)
        }
        Some(r) => bail!("region {r:?} is not an AWS region name (like us-east-1)"),
        None => bail!("no AWS region: pass --region or set AWS_REGION"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct MapEnv(BTreeMap<&'static str, String>);
    impl Env for MapEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).cloned()
        }
    }

    #[test]
    fn environment_first_then_profiles() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(".aws")).unwrap();
        std::fs::write(
            dir.path().join(".aws/credentials"),
            "[default]\naws_access_key_id = AKDEFAULT\naws_secret_access_key = s1\n\n\
             [ci]\naws_access_key_id=AKCI\naws_secret_access_key=s2\naws_session_token=t2\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join(".aws/config"),
            "[default]\nregion = eu-west-1\n[profile ci]\nregion = us-west-2\n\
             [profile cfgonly]\naws_access_key_id = AKCFG\naws_secret_access_key = s3\n",
        )
        .unwrap();
        let home = dir.path().display().to_string();
        let mut env = MapEnv(BTreeMap::from([("HOME", home)]));
        let c = load(&env).unwrap();
        assert_eq!(c.access_key_id, "AKDEFAULT");
        assert_eq!(c.session_token, None);
        assert_eq!(region(None, &env).unwrap(), "eu-west-1");

        env.0.insert("AWS_PROFILE", "ci".into());
        let c = load(&env).unwrap();
        assert_eq!(
            (c.access_key_id.as_str(), c.session_token.as_deref()),
            ("AKCI", Some("t2"))
        );
        assert_eq!(region(None, &env).unwrap(), "us-west-2");
        assert_eq!(region(Some("ap-south-1"), &env).unwrap(), "ap-south-1");

        env.0.insert("AWS_PROFILE", "cfgonly".into());
        assert_eq!(load(&env).unwrap().access_key_id, "AKCFG");

        env.0.insert("AWS_ACCESS_KEY_ID", "AKENV".into());
        env.0.insert("AWS_SECRET_ACCESS_KEY", "s4".into());
        env.0.insert("AWS_SESSION_TOKEN", "t4".into());
        env.0.insert("AWS_REGION", "ca-central-1".into());
        let c = load(&env).unwrap();
        assert_eq!(
            (c.access_key_id.as_str(), c.session_token.as_deref()),
            ("AKENV", Some("t4"))
        );
        assert_eq!(region(None, &env).unwrap(), "ca-central-1");

        env.0.insert("AWS_PROFILE", "nosuch".into());
        env.0.remove("AWS_ACCESS_KEY_ID");
        let e = load(&env).unwrap_err().to_string();
        assert!(
            e.contains("no AWS credentials") && e.contains("nosuch"),
            "{e}"
        );
        assert!(region(Some("US East"), &env).is_err());
    }
}
