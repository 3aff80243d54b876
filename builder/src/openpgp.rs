//! Just enough OpenPGP to pin a repository key by fingerprint (RFC 4880):
//! de-armor, read the first packet (the primary public key) and compute its
//! v4 fingerprint, SHA-1 over 0x99, a two-byte length and the packet body.

use anyhow::{bail, Context, Result};
use base64::Engine;
use sha1::{Digest, Sha1};

pub fn primary_fingerprint(data: &[u8]) -> Result<String> {
    let bin = if data.starts_with(b"-----BEGIN PGP") {
        dearmor(std::str::from_utf8(data).context("armored key is not text")?)?
    } else {
        data.to_vec()
    };
    let (tag, body) = first_packet(&bin)?;
    if tag != 6 {
        bail!("first packet has tag {tag}, not a public key (6)");
    }
    if body.first() != Some(&4) {
        bail!(
            "public key version {:?} is not supported (only v4)",
            body.first()
        );
    }
    let mut h = Sha1::new();
    h.update([0x99]);
    h.update((body.len() as u16).to_be_bytes());
    h.update(body);
    Ok(hex::encode_upper(h.finalize()))
}

pub fn dearmor(text: &str) -> Result<Vec<u8>> {
    let mut lines = text
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN PGP"));
    lines.next();
    // Headers end at the first empty line.
    let mut b64 = String::new();
    let mut in_headers = true;
    for l in lines {
        let l = l.trim();
        if in_headers {
            if l.is_empty() {
                in_headers = false;
            } else if !l.contains(':') {
                in_headers = false;
                b64.push_str(l);
            }
            continue;
        }
        if l.starts_with("-----END") || l.starts_with('=') {
            break;
        }
        b64.push_str(l);
    }
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .context("bad base64 in armored key")
}

fn first_packet(bin: &[u8]) -> Result<(u8, &[u8])> {
    let short = || anyhow::anyhow!("key data is truncated");
    let ctb = *bin.first().ok_or_else(short)?;
    if ctb & 0x80 == 0 {
        bail!("not an OpenPGP packet");
    }
    let (tag, len, start) = if ctb & 0x40 != 0 {
        // New format.
        let tag = ctb & 0x3f;
        let o = *bin.get(1).ok_or_else(short)? as usize;
        if o < 192 {
            (tag, o, 2)
        } else if o < 224 {
            let o2 = *bin.get(2).ok_or_else(short)? as usize;
            (tag, ((o - 192) << 8) + o2 + 192, 3)
        } else if o == 255 {
            let b = bin.get(2..6).ok_or_else(short)?;
            (
                tag,
                u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize,
                6,
            )
        } else {
            bail!("partial-length key packet is not supported");
        }
    } else {
        let tag = (ctb >> 2) & 0x0f;
        match ctb & 3 {
            0 => (tag, *bin.get(1).ok_or_else(short)? as usize, 2),
            1 => {
                let b = bin.get(1..3).ok_or_else(short)?;
                (tag, u16::from_be_bytes([b[0], b[1]]) as usize, 3)
            }
            2 => {
                let b = bin.get(1..5).ok_or_else(short)?;
                (
                    tag,
                    u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize,
                    5,
                )
            }
            _ => bail!("indeterminate-length key packet is not supported"),
        }
    };
    let body = bin.get(start..start + len).ok_or_else(short)?;
    Ok((tag, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Made with `gpg --quick-gen-key` for this test; gpg printed the fingerprint
    /// that is asserted here (an independent implementation's answer).
    const KEY: &str = include_str!("../tests/fixtures/test-repo-key.asc");
    const KEY_FPR: &str = include_str!("../tests/fixtures/test-repo-key.fpr");

    #[test]
    fn fingerprint_matches_gpg() {
        assert_eq!(primary_fingerprint(KEY.as_bytes()).unwrap(), KEY_FPR.trim());
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(primary_fingerprint(b"hello").is_err());
        assert!(primary_fingerprint(b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n\n!!!\n").is_err());
    }
}
