//! One slow test: its work dir under `target/qemu-tests/<test>/`, its overall
//! deadline, and the slot that bounds how many VM tests run at once.
//!
//! `AIWIMG_VM_SLOTS=N` (default 1) lets N VM tests run together, in this
//! process and across processes (one lock file per slot). A boot under TCG is
//! mostly one chain of work, so on two cores two VMs of one vCPU each finish
//! sooner than the same two one after the other with two vCPUs each
//! (measured: both ready in 98 s, against 2 x 65 s); the VMs' default vCPU
//! count follows (see [`vcpus_per_vm`]).

use crate::console::ConsoleLog;
use crate::deadline::Deadline;
use crate::test_images::{ensure_free_space, qemu_tests_root, VM_TEST_FREE_BYTES};
use anyhow::{Context, Result};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// The default budget of one VM test under TCG.
pub const DEFAULT_BUDGET: Duration = Duration::from_secs(8 * 60);

/// A running test case (see [`TestCase::run`]).
pub struct TestCase {
    name: String,
    dir: PathBuf,
    deadline: Deadline,
    timings: Mutex<Vec<(String, Duration)>>,
}

/// Slots taken by this process's VM tests; lock files bound them across processes.
static SLOTS_TAKEN: Mutex<Vec<bool>> = Mutex::new(Vec::new());
static SLOT_FREED: Condvar = Condvar::new();

/// How many VM tests may run at once (`AIWIMG_VM_SLOTS`, default 1).
pub fn vm_slots() -> usize {
    std::env::var("AIWIMG_VM_SLOTS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| (1..=8).contains(n))
        .unwrap_or(1)
}

/// The vCPUs a VM gets unless its test says otherwise: the host's cores
/// shared among the VM slots (two cores: 2 with one slot, 1 with two).
pub fn vcpus_per_vm() -> u32 {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    (cores / vm_slots()).clamp(1, 2) as u32
}

/// One VM slot, held while a test runs: an index free in this process and
/// its lock file, locked (other processes hold theirs).
struct VmSlot {
    index: usize,
    _file: std::fs::File,
}

impl VmSlot {
    fn take(name: &str) -> VmSlot {
        let slots = vm_slots();
        let root = qemu_tests_root();
        std::fs::create_dir_all(&root).expect("creating target/qemu-tests");
        let waited = Instant::now();
        loop {
            let mut taken = SLOTS_TAKEN.lock().unwrap_or_else(|e| e.into_inner());
            if taken.len() < slots {
                taken.resize(slots, false);
            }
            for index in 0..slots {
                if taken[index] {
                    continue;
                }
                // Slot 0 keeps the lock file name of one-at-a-time runs.
                let file_name = if index == 0 {
                    ".vm-tests.lock".to_string()
                } else {
                    format!(".vm-tests.{index}.lock")
                };
                let file = std::fs::File::create(root.join(file_name))
                    .expect("creating a VM test lock file");
                let locked = match file.try_lock() {
                    Ok(()) => true,
                    Err(std::fs::TryLockError::WouldBlock) => false,
                    Err(std::fs::TryLockError::Error(e)) => {
                        panic!("locking a VM test lock file: {e}")
                    }
                };
                if locked {
                    taken[index] = true;
                    if waited.elapsed() > Duration::from_secs(1) {
                        eprintln!(
                            "qemu-tests: {name}: waited {:.0?} for another VM test",
                            waited.elapsed()
                        );
                    }
                    return VmSlot { index, _file: file };
                }
            }
            // Every slot busy (here or in another process): wait for one.
            let _ = SLOT_FREED
                .wait_timeout(taken, Duration::from_millis(500))
                .unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Drop for VmSlot {
    fn drop(&mut self) {
        let mut taken = SLOTS_TAKEN.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = taken.get_mut(self.index) {
            *t = false;
        }
        SLOT_FREED.notify_all();
    }
}

/// The last lines of each VM's console under `dir`: where a guest that
/// stopped answering ssh says why (a panic, I/O errors, a reboot).
fn console_tails(dir: &Path) -> String {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("console.log"))
        .filter(|p| p.is_file())
        .collect();
    logs.sort();
    logs.iter()
        .map(|p| {
            format!(
                "last console lines of {}:\n{}",
                p.display(),
                ConsoleLog::new(p).tail(15)
            )
        })
        .collect()
}

impl TestCase {
    /// Runs `body` as test `name`: waits for a free VM slot,
    /// makes a fresh work dir, starts the deadline, and turns an error or a
    /// panic into a failure that names the artifacts dir.
    pub fn run(name: &str, budget: Duration, body: impl FnOnce(&TestCase) -> Result<()>) {
        assert!(
            !name.is_empty() && name != "images" && !name.contains('/') && !name.starts_with('.'),
            "test name {name:?} would clash with target/qemu-tests/{name}"
        );
        let _slot = VmSlot::take(name);
        let root = qemu_tests_root();
        std::fs::create_dir_all(&root).expect("creating target/qemu-tests");
        if let Err(e) = ensure_free_space(&root, VM_TEST_FREE_BYTES) {
            panic!("{name}: {e:#}");
        }
        let dir = root.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the test's work dir");
        let case = TestCase {
            name: name.to_string(),
            dir: dir.clone(),
            deadline: Deadline::after(budget),
            timings: Mutex::default(),
        };
        eprintln!(
            "qemu-tests: {name}: start (budget {budget:.0?}, artifacts in {})",
            dir.display()
        );
        let outcome = catch_unwind(AssertUnwindSafe(|| body(&case)));
        let total = case.deadline.elapsed();
        let timings = case.timing_summary();
        match outcome {
            Ok(Ok(())) => {
                eprintln!("qemu-tests: {name}: PASSED in {total:.0?}{timings}");
                let _ = std::fs::write(
                    dir.join("RESULT"),
                    format!("passed in {total:.0?}{timings}\n"),
                );
            }
            Ok(Err(e)) => {
                let _ = std::fs::write(
                    dir.join("RESULT"),
                    format!("failed after {total:.0?}: {e:#}\n"),
                );
                panic!(
                    "{name} failed after {total:.0?}: {e:#}{timings}\n{}artifacts (console, journal, user-data): {}",
                    console_tails(&dir),
                    dir.display()
                );
            }
            Err(p) => {
                let _ = std::fs::write(dir.join("RESULT"), format!("panicked after {total:.0?}\n"));
                eprintln!(
                    "qemu-tests: {name}: FAILED after {total:.0?}{timings}; artifacts in {}",
                    dir.display()
                );
                resume_unwind(p)
            }
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The test's work and artifacts dir.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn deadline(&self) -> &Deadline {
        &self.deadline
    }

    /// Records and prints a timing (e.g. "boot to ready").
    pub fn timing(&self, what: &str, took: Duration) {
        eprintln!("qemu-tests: {}: {what}: {took:.1?}", self.name);
        self.timings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((what.to_string(), took));
    }

    fn timing_summary(&self) -> String {
        self.timings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(w, t)| format!("; {w} {t:.0?}"))
            .collect()
    }

    /// Writes a file into the artifacts dir.
    pub fn artifact(&self, name: &str, content: impl AsRef<[u8]>) -> Result<PathBuf> {
        let p = self.dir.join(name);
        std::fs::write(&p, content).with_context(|| format!("writing {}", p.display()))?;
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_fails_the_test_and_names_the_artifacts() {
        let err = catch_unwind(|| {
            TestCase::run("unit-case-error", Duration::from_secs(5), |c| {
                c.timing("step", Duration::from_millis(5));
                anyhow::bail!("guest said no")
            })
        })
        .unwrap_err();
        let msg = err.downcast_ref::<String>().unwrap();
        assert!(msg.contains("guest said no"), "{msg}");
        assert!(msg.contains("target/qemu-tests/unit-case-error"), "{msg}");
        assert!(msg.contains("step"), "{msg}");
        let _ = std::fs::remove_dir_all(qemu_tests_root().join("unit-case-error"));
    }

    #[test]
    fn a_passing_body_passes_with_its_own_dir() {
        let mut seen = PathBuf::new();
        TestCase::run("unit-case-ok", Duration::from_secs(5), |c| {
            seen = c.dir().to_path_buf();
            assert!(c.dir().is_dir());
            assert!(!c.deadline().expired());
            Ok(())
        });
        assert!(seen.ends_with("qemu-tests/unit-case-ok"));
        let _ = std::fs::remove_dir_all(qemu_tests_root().join("unit-case-ok"));
    }
}
