//! One slow test: its work dir under `target/qemu-tests/<test>/`, its overall
//! deadline, and the lock that keeps VM tests one at a time (two cores).

use crate::deadline::Deadline;
use crate::test_images::qemu_tests_root;
use anyhow::{Context, Result};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
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

/// Serializes VM tests within this process; the lock file does it across processes.
static VM_TESTS: Mutex<()> = Mutex::new(());

impl TestCase {
    /// Runs `body` as test `name`: waits for any other VM test to finish,
    /// makes a fresh work dir, starts the deadline, and turns an error or a
    /// panic into a failure that names the artifacts dir.
    pub fn run(name: &str, budget: Duration, body: impl FnOnce(&TestCase) -> Result<()>) {
        assert!(
            !name.is_empty() && name != "images" && !name.contains('/') && !name.starts_with('.'),
            "test name {name:?} would clash with target/qemu-tests/{name}"
        );
        let _guard = VM_TESTS.lock().unwrap_or_else(|e| e.into_inner());
        let root = qemu_tests_root();
        std::fs::create_dir_all(&root).expect("creating target/qemu-tests");
        let lock = std::fs::File::create(root.join(".vm-tests.lock"))
            .expect("creating the VM test lock file");
        let waited = Instant::now();
        lock.lock().expect("locking the VM test lock file");
        if waited.elapsed() > Duration::from_secs(1) {
            eprintln!(
                "qemu-tests: {name}: waited {:.0?} for another VM test",
                waited.elapsed()
            );
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
                    "{name} failed after {total:.0?}: {e:#}{timings}\nartifacts (console, journal, user-data): {}",
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
