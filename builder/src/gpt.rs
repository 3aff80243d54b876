//! Reading a GPT partition table (UEFI spec, chapter 5), for `aiwimg inspect`.

use anyhow::{bail, Result};
use std::io::{Read, Seek, SeekFrom};

#[derive(Debug, Clone)]
pub struct GptPartition {
    pub number: u32,
    pub type_guid: String,
    pub uuid: String,
    pub label: String,
    pub first_lba: u64,
    pub last_lba: u64,
}

impl GptPartition {
    pub fn offset(&self) -> u64 {
        self.first_lba * 512
    }
    pub fn size(&self) -> u64 {
        (self.last_lba + 1 - self.first_lba) * 512
    }
    /// The Discoverable Partitions name of the type, where we know it.
    pub fn type_name(&self) -> &'static str {
        match self.type_guid.as_str() {
            "c12a7328-f81f-11d2-ba4b-00a0c93ec93b" => "esp",
            "4f68bce3-e8cd-4db1-96e7-fbcaf984b709" => "root-x86-64",
            "2c7357ed-ebd2-46d9-aec1-23d437ec2bf5" => "root-x86-64-verity",
            "4d21b016-b534-45c2-a9fb-5c16e091fd2d" => "var",
            "0fc63daf-8483-4772-8e79-3d69d8477de4" => "linux-generic",
            _ => "other",
        }
    }
}

fn guid(b: &[u8]) -> String {
    format!(
        "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{}",
        u32::from_le_bytes(b[0..4].try_into().unwrap()),
        u16::from_le_bytes(b[4..6].try_into().unwrap()),
        u16::from_le_bytes(b[6..8].try_into().unwrap()),
        b[8],
        b[9],
        hex::encode(&b[10..16])
    )
}

/// Reads the primary GPT of a disk image with 512-byte sectors.
pub fn read<F: Read + Seek>(f: &mut F) -> Result<Vec<GptPartition>> {
    let mut hdr = [0u8; 92];
    f.seek(SeekFrom::Start(512))?;
    f.read_exact(&mut hdr)?;
    if &hdr[0..8] != b"EFI PART" {
        bail!("no GPT found (is this a raw disk image with 512-byte sectors?)");
    }
    let entries_lba = u64::from_le_bytes(hdr[72..80].try_into().unwrap());
    let count = u32::from_le_bytes(hdr[80..84].try_into().unwrap());
    let esize = u32::from_le_bytes(hdr[84..88].try_into().unwrap()) as usize;
    if !(128..=4096).contains(&esize) || count > 1024 {
        bail!("GPT header has implausible entry size {esize} or count {count}");
    }
    let mut table = vec![0u8; esize * count as usize];
    f.seek(SeekFrom::Start(entries_lba * 512))?;
    f.read_exact(&mut table)?;
    let mut out = Vec::new();
    for (i, e) in table.chunks(esize).enumerate() {
        if e[0..16].iter().all(|b| *b == 0) {
            continue;
        }
        let name: Vec<u16> = e[56..128]
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|c| *c != 0)
            .collect();
        out.push(GptPartition {
            number: i as u32 + 1,
            type_guid: guid(&e[0..16]),
            uuid: guid(&e[16..32]),
            label: String::from_utf16_lossy(&name),
            first_lba: u64::from_le_bytes(e[32..40].try_into().unwrap()),
            last_lba: u64::from_le_bytes(e[40..48].try_into().unwrap()),
        });
    }
    Ok(out)
}
