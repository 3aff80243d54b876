//! One overall deadline per test: every wait in a test draws from the same budget.

use std::time::{Duration, Instant};

/// A point in time by which something must have happened.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    start: Instant,
    end: Instant,
}

impl Deadline {
    /// A deadline `budget` from now.
    pub fn after(budget: Duration) -> Self {
        let start = Instant::now();
        Deadline {
            start,
            end: start + budget,
        }
    }

    /// Time left, zero once passed.
    pub fn remaining(&self) -> Duration {
        self.end.saturating_duration_since(Instant::now())
    }

    pub fn expired(&self) -> bool {
        self.remaining().is_zero()
    }

    /// Time since the deadline was set.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// The whole budget this deadline was given.
    pub fn budget(&self) -> Duration {
        self.end - self.start
    }

    /// `want`, shortened so it does not run past the deadline.
    pub fn cap(&self, want: Duration) -> Duration {
        want.min(self.remaining())
    }

    /// Calls `f` every 5 s until it gives a value; errors count as "not yet"
    /// and the last one is in the message when the deadline passes.
    pub fn poll<T>(
        &self,
        what: &str,
        mut f: impl FnMut() -> anyhow::Result<Option<T>>,
    ) -> anyhow::Result<T> {
        let mut last = String::new();
        loop {
            match f() {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => {}
                Err(e) => last = format!("{e:#}"),
            }
            if self.expired() {
                anyhow::bail!("{what}: not before the deadline ({last})");
            }
            std::thread::sleep(self.cap(Duration::from_secs(5)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_never_exceeds_remaining() {
        let d = Deadline::after(Duration::from_secs(5));
        assert!(d.cap(Duration::from_secs(60)) <= Duration::from_secs(5));
        assert_eq!(d.cap(Duration::from_millis(10)), Duration::from_millis(10));
        assert!(!d.expired());
        let past = Deadline::after(Duration::ZERO);
        assert!(past.expired());
        assert_eq!(past.cap(Duration::from_secs(1)), Duration::ZERO);
    }

    #[test]
    fn poll_returns_the_value_or_names_the_last_error() {
        let d = Deadline::after(Duration::from_secs(5));
        let mut n = 0;
        let v = d.poll("counting", || {
            n += 1;
            Ok(Some(n))
        });
        assert_eq!(v.unwrap(), 1);
        let past = Deadline::after(Duration::ZERO);
        let e = past
            .poll::<()>("the thing", || anyhow::bail!("refused"))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "the thing: not before the deadline (refused)");
    }
}
