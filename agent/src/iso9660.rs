//! Reads top-level files of an ISO 9660 image (Joliet names), enough for a
//! NoCloud or config-drive seed made by `cloud-localds`/`genisoimage -J -r`,
//! without mounting it.

use std::io::{Read, Seek, SeekFrom};

const SECTOR: u64 = 2048;

/// Reads the file at `path` (e.g. `user-data`, `openstack/latest/user_data`) of the image.
/// `Ok(None)`: not present; `Err`: not an ISO 9660 image or unreadable.
pub fn read_file<R: Read + Seek>(img: &mut R, path: &str) -> Result<Option<Vec<u8>>, String> {
    let (mut lba, mut len, joliet) = root_dir(img)?;
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    for (i, want) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let Some((elba, elen, is_dir)) = find(img, lba, len, want, joliet)? else {
            return Ok(None);
        };
        if last {
            if is_dir {
                return Ok(None);
            }
            if elen > 16 << 20 {
                return Err(format!("{path} is larger than 16 MiB"));
            }
            let mut buf = vec![0; elen as usize];
            img.seek(SeekFrom::Start(elba as u64 * SECTOR))
                .map_err(|e| e.to_string())?;
            img.read_exact(&mut buf).map_err(|e| e.to_string())?;
            return Ok(Some(buf));
        }
        if !is_dir {
            return Ok(None);
        }
        lba = elba;
        len = elen;
    }
    Ok(None)
}

/// The volume label (volume identifier) of the image.
pub fn volume_id<R: Read + Seek>(img: &mut R) -> Result<String, String> {
    let pvd = descriptor(img, 1)?.ok_or("no primary volume descriptor")?;
    Ok(String::from_utf8_lossy(&pvd[40..72]).trim().to_string())
}

fn descriptor<R: Read + Seek>(img: &mut R, kind: u8) -> Result<Option<Vec<u8>>, String> {
    for i in 16..64u64 {
        let mut d = vec![0u8; SECTOR as usize];
        img.seek(SeekFrom::Start(i * SECTOR))
            .map_err(|e| e.to_string())?;
        if img.read_exact(&mut d).is_err() {
            return Err("not an ISO 9660 image (too short)".into());
        }
        if &d[1..6] != b"CD001" {
            return Err("not an ISO 9660 image".into());
        }
        if d[0] == 255 {
            return Ok(None);
        }
        let is_joliet =
            d[0] == 2 && d[88] == b'%' && d[89] == b'/' && matches!(d[90], b'@' | b'C' | b'E');
        if (kind == 2 && is_joliet) || (kind == 1 && d[0] == 1) {
            return Ok(Some(d));
        }
    }
    Ok(None)
}

fn root_dir<R: Read + Seek>(img: &mut R) -> Result<(u32, u32, bool), String> {
    let (d, joliet) = match descriptor(img, 2)? {
        Some(d) => (d, true),
        None => (
            descriptor(img, 1)?.ok_or("no primary volume descriptor")?,
            false,
        ),
    };
    let r = &d[156..190];
    Ok((le32(&r[2..6]), le32(&r[10..14]), joliet))
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn find<R: Read + Seek>(
    img: &mut R,
    lba: u32,
    len: u32,
    want: &str,
    joliet: bool,
) -> Result<Option<(u32, u32, bool)>, String> {
    let len = len.min(4 << 20) as usize;
    let mut dir = vec![0u8; len];
    img.seek(SeekFrom::Start(lba as u64 * SECTOR))
        .map_err(|e| e.to_string())?;
    img.read_exact(&mut dir)
        .map_err(|e| format!("directory unreadable: {e}"))?;
    let mut off = 0usize;
    while off < dir.len() {
        let rl = dir[off] as usize;
        if rl == 0 {
            off = (off / SECTOR as usize + 1) * SECTOR as usize;
            continue;
        }
        if off + rl > dir.len() || rl < 34 {
            break;
        }
        let rec = &dir[off..off + rl];
        let nl = rec[32] as usize;
        if 33 + nl <= rl {
            let raw = &rec[33..33 + nl];
            let name = if joliet {
                let u: Vec<u16> = raw
                    .chunks_exact(2)
                    .map(|c| u16::from_be_bytes([c[0], c[1]]))
                    .collect();
                String::from_utf16_lossy(&u)
            } else {
                String::from_utf8_lossy(raw).to_ascii_lowercase()
            };
            let name = name
                .split(';')
                .next()
                .unwrap_or("")
                .trim_end_matches('.')
                .to_string();
            let plain = !joliet && name.replace('_', "-") == want.replace('_', "-");
            if name == want || plain {
                return Ok(Some((
                    le32(&rec[2..6]),
                    le32(&rec[10..14]),
                    rec[25] & 2 != 0,
                )));
            }
        }
        off += rl;
    }
    Ok(None)
}
