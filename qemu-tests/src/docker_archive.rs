//! A tiny container image in `docker save` format, made without a Docker
//! engine: one layer holding a static x86-64 program that prints a line.
//! `docker load` accepts it and `docker run` prints [`HELLO_LINE`].

use anyhow::{ensure, Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::path::Path;

/// What the container prints.
pub const HELLO_LINE: &str = "hello from an aiwimg test container";
/// The tag `docker load` gives it.
pub const HELLO_TAG: &str = "aiwimg-test/hello:1";

/// A static Linux x86-64 ELF executable that writes `message` to stdout and
/// exits 0: write(1, msg, len); exit(0). No libc, no loader.
pub fn hello_elf(message: &str) -> Vec<u8> {
    const BASE: u64 = 0x40_0000;
    const HEADERS: u64 = 64 + 56;
    let msg = message.as_bytes();
    let len = u32::try_from(msg.len()).expect("short message");
    let mut code: Vec<u8> = Vec::new();
    code.extend([0xb8, 1, 0, 0, 0]); // mov eax, 1 (write)
    code.extend([0xbf, 1, 0, 0, 0]); // mov edi, 1 (stdout)
    code.extend([0x48, 0x8d, 0x35]); // lea rsi, [rip + disp32]
    let disp_at = code.len();
    code.extend([0, 0, 0, 0]);
    let after_lea = code.len();
    code.push(0xba); // mov edx, len
    code.extend(len.to_le_bytes());
    code.extend([0x0f, 0x05]); // syscall
    code.extend([0xb8, 60, 0, 0, 0]); // mov eax, 60 (exit)
    code.extend([0x31, 0xff]); // xor edi, edi
    code.extend([0x0f, 0x05]); // syscall
    let disp = u32::try_from(code.len() - after_lea).expect("small");
    code[disp_at..disp_at + 4].copy_from_slice(&disp.to_le_bytes());
    code.extend(msg);
    let file_size = HEADERS + code.len() as u64;

    let mut elf: Vec<u8> = Vec::new();
    // ELF header
    elf.extend(b"\x7fELF");
    elf.extend([2, 1, 1, 0]); // 64-bit, little endian, version 1, System V ABI
    elf.extend([0; 8]);
    elf.extend(2u16.to_le_bytes()); // ET_EXEC
    elf.extend(0x3eu16.to_le_bytes()); // x86-64
    elf.extend(1u32.to_le_bytes());
    elf.extend((BASE + HEADERS).to_le_bytes()); // entry
    elf.extend(64u64.to_le_bytes()); // program headers right after this header
    elf.extend(0u64.to_le_bytes()); // no section headers
    elf.extend(0u32.to_le_bytes());
    elf.extend(64u16.to_le_bytes());
    elf.extend(56u16.to_le_bytes());
    elf.extend(1u16.to_le_bytes());
    elf.extend([0; 6]); // shentsize, shnum, shstrndx
                        // One PT_LOAD mapping the whole file read + execute.
    elf.extend(1u32.to_le_bytes());
    elf.extend(5u32.to_le_bytes());
    elf.extend(0u64.to_le_bytes());
    elf.extend(BASE.to_le_bytes());
    elf.extend(BASE.to_le_bytes());
    elf.extend(file_size.to_le_bytes());
    elf.extend(file_size.to_le_bytes());
    elf.extend(0x1000u64.to_le_bytes());
    elf.extend(code);
    elf
}

/// A file in a ustar archive.
struct TarEntry<'a> {
    name: &'a str,
    mode: u32,
    data: &'a [u8],
}

/// A ustar archive of regular files (mtime 0, root-owned: reproducible).
fn tar(entries: &[TarEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let mut h = [0u8; 512];
        assert!(e.name.len() < 100, "tar name too long: {}", e.name);
        h[..e.name.len()].copy_from_slice(e.name.as_bytes());
        let octal = |h: &mut [u8; 512], at: usize, width: usize, v: u64| {
            let s = format!("{v:0w$o}\0", w = width - 1);
            h[at..at + width].copy_from_slice(s.as_bytes());
        };
        octal(&mut h, 100, 8, u64::from(e.mode));
        octal(&mut h, 108, 8, 0);
        octal(&mut h, 116, 8, 0);
        octal(&mut h, 124, 12, e.data.len() as u64);
        octal(&mut h, 136, 12, 0);
        h[156] = b'0';
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[265..269].copy_from_slice(b"root");
        h[297..301].copy_from_slice(b"root");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        out.extend(h);
        out.extend(e.data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// The `docker save` archive of [`HELLO_TAG`]: `/hello` prints [`HELLO_LINE`].
pub fn hello_image_archive() -> Vec<u8> {
    let program = hello_elf(&format!("{HELLO_LINE}\n"));
    image_archive(
        HELLO_TAG,
        &[TarEntry {
            name: "hello",
            mode: 0o755,
            data: &program,
        }],
        &["/hello"],
    )
}

/// The tag of [`task_image_archive`].
pub const TASK_TAG: &str = "aiwimg-test/task:1";
/// Where the task image holds busybox (no applet links: call it by path).
pub const TASK_BUSYBOX: &str = "/busybox";
/// The host's static busybox (Debian's busybox-static, set up by
/// `setup-host.sh --tests`), the one program of the task image.
const HOST_BUSYBOX: &str = "/bin/busybox";

/// A TEST DOUBLE of an aiWARE engine's image: [`TASK_BUSYBOX`] (Debian's
/// static busybox) and nothing else, so a host action's `commandLine` can
/// write files, sleep and print (`/busybox sh -c ...`). Its default command
/// sleeps, as a long task would.
pub fn task_image_archive() -> Result<Vec<u8>> {
    let busybox = std::fs::read(HOST_BUSYBOX).with_context(|| {
        format!("reading {HOST_BUSYBOX} for the task test image (apt-get install busybox-static; builder/setup-host.sh --tests does)")
    })?;
    // A dynamically linked busybox would find no loader in the image.
    ensure!(
        !elf_wants_a_loader(&busybox),
        "{HOST_BUSYBOX} is not statically linked: install busybox-static (it replaces busybox)"
    );
    Ok(image_archive(
        TASK_TAG,
        &[TarEntry {
            name: &TASK_BUSYBOX[1..],
            mode: 0o755,
            data: &busybox,
        }],
        &[TASK_BUSYBOX, "sleep", "3600"],
    ))
}

/// Whether an ELF executable names a program interpreter (PT_INTERP): a
/// dynamically linked one does, a static one does not.
fn elf_wants_a_loader(elf: &[u8]) -> bool {
    let u16_at = |at: usize| {
        elf.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let (Some(ph_off), Some(ph_size), Some(ph_num)) = (
        elf.get(0x20..0x28)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize),
        u16_at(0x36),
        u16_at(0x38),
    ) else {
        return true;
    };
    (0..usize::from(ph_num)).any(|i| {
        let at = ph_off + i * usize::from(ph_size);
        elf.get(at..at + 4) == Some(&3u32.to_le_bytes()[..])
    })
}

/// A `docker save` archive of one image: `manifest.json`, the config, one
/// `layer.tar` holding `files`; `cmd` is its default command.
fn image_archive(tag: &str, files: &[TarEntry], cmd: &[&str]) -> Vec<u8> {
    image_archive_and_id(tag, files, cmd).0
}

/// [`image_archive`] and the image's id (`sha256:` of its config, what
/// `docker image inspect -f '{{.Id}}'` says once loaded).
fn image_archive_and_id(tag: &str, files: &[TarEntry], cmd: &[&str]) -> (Vec<u8>, String) {
    let layer = tar(files);
    let layer_id = sha256_hex(&layer);
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": { "Cmd": cmd, "Env": ["PATH=/"] },
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{layer_id}")] },
        "history": [{ "created": "1970-01-01T00:00:00Z", "created_by": "aiwimg qemu-tests" }],
    }))
    .expect("json");
    let config_id = sha256_hex(&config);
    let config_name = format!("{config_id}.json");
    let layer_name = format!("{layer_id}/layer.tar");
    let manifest = serde_json::to_vec(&json!([{
        "Config": config_name,
        "RepoTags": [tag],
        "Layers": [layer_name],
    }]))
    .expect("json");
    let archive = tar(&[
        TarEntry {
            name: &config_name,
            mode: 0o644,
            data: &config,
        },
        TarEntry {
            name: &layer_name,
            mode: 0o644,
            data: &layer,
        },
        TarEntry {
            name: "manifest.json",
            mode: 0o644,
            data: &manifest,
        },
    ]);
    (archive, format!("sha256:{config_id}"))
}

/// The tag of [`controller_image_archive`].
pub const CONTROLLER_TAG: &str = "aiwimg-test/edge-test-controller:1";
/// Where the controller image keeps its host list: in the controller mode's
/// volume (`controller:/opt/aiware/controller` in modes.toml), so it outlives
/// the container as a real controller's database does.
pub const CONTROLLER_STATE_FILE: &str = "/opt/aiware/controller/hosts.json";

/// A TEST DOUBLE of the `aiware-controller` image: the static (musl)
/// `edge-test-controller` at `/edge-test-controller`, serving the Edge API on
/// 9000, its init token and NFS export from the env aiw-agent gives the
/// controller container (`AIWARE_INIT_TOKEN`, `AIWARE_NFS_SERVER`,
/// `AIWARE_NFS_PATH`). Returns the archive and its image id (the profile's
/// `[[container_images]]` pins both).
pub fn controller_image_archive(program: &Path) -> Result<(Vec<u8>, String)> {
    let elf = std::fs::read(program)
        .with_context(|| format!("reading the edge-test-controller {}", program.display()))?;
    ensure!(
        !elf_wants_a_loader(&elf),
        "{} is dynamically linked: build it for x86_64-unknown-linux-musl",
        program.display()
    );
    Ok(image_archive_and_id(
        CONTROLLER_TAG,
        &[TarEntry {
            name: "edge-test-controller",
            mode: 0o755,
            data: &elf,
        }],
        &[
            "/edge-test-controller",
            "--listen",
            "0.0.0.0:9000",
            "--state-file",
            CONTROLLER_STATE_FILE,
        ],
    ))
}

/// Writes [`hello_image_archive`] to `path`.
pub fn write_hello_image(path: &Path) -> Result<()> {
    std::fs::write(path, hello_image_archive())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("aiwimg-oci-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn the_program_runs_and_prints_its_line() {
        let dir = scratch("elf");
        let p = dir.join("hello");
        std::fs::write(&p, hello_elf("it works\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        let out = Command::new(&p).output().unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "it works\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_archive_is_a_docker_save_tarball_that_tar_reads() {
        let dir = scratch("archive");
        let path = dir.join("hello.tar");
        write_hello_image(&path).unwrap();
        let out = Command::new("tar")
            .arg("-xvf")
            .arg(&path)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
        let entry = &manifest[0];
        assert_eq!(entry["RepoTags"][0], HELLO_TAG);
        let layer_name = entry["Layers"][0].as_str().unwrap();
        let layer = std::fs::read(dir.join(layer_name)).unwrap();
        let config: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.join(entry["Config"].as_str().unwrap())).unwrap(),
        )
        .unwrap();
        // docker load checks each layer against the config's diff_ids.
        assert_eq!(
            config["rootfs"]["diff_ids"][0],
            format!("sha256:{}", sha256_hex(&layer))
        );
        // The layer unpacks to an executable that prints the line.
        let rootfs = dir.join("rootfs");
        std::fs::create_dir_all(&rootfs).unwrap();
        let st = Command::new("tar")
            .arg("-xf")
            .arg(dir.join(layer_name))
            .current_dir(&rootfs)
            .status()
            .unwrap();
        assert!(st.success());
        let out = Command::new(rootfs.join("hello")).output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("{HELLO_LINE}\n")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_task_image_holds_a_static_busybox_that_runs_alone() {
        let dir = scratch("task");
        let path = dir.join("task.tar");
        std::fs::write(&path, task_image_archive().unwrap()).unwrap();
        assert!(Command::new("tar")
            .arg("-xf")
            .arg(&path)
            .current_dir(&dir)
            .status()
            .unwrap()
            .success());
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(manifest[0]["RepoTags"][0], TASK_TAG);
        let rootfs = dir.join("rootfs");
        std::fs::create_dir_all(&rootfs).unwrap();
        let layer = dir.join(manifest[0]["Layers"][0].as_str().unwrap());
        assert!(Command::new("tar")
            .arg("-xf")
            .arg(&layer)
            .current_dir(&rootfs)
            .status()
            .unwrap()
            .success());
        // Run with an empty environment, as in a bare container.
        let out = Command::new(rootfs.join(&TASK_BUSYBOX[1..]))
            .args(["sh", "-c", "sleep 0 && echo $((6 * 7))"])
            .env_clear()
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "42\n", "{out:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
