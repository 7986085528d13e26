//! The global budget: how many sessions and session sandboxes mcpbox holds at once across all
//! servers (`mcpbox.maxSessionsTotal`, `mcpbox.maxSandboxes`). A session takes a [`Slot`] before
//! anything is started for it and gives it back when it ends (the slot's drop); over the budget
//! the open is refused (HTTP 503 with `Retry-After`) and nothing is started.
//!
//! Also [`Every`], a rate limiter for log lines about refusals.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Which budget refused a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Exhausted {
    #[error("mcpbox holds its maximum of {0} sessions across all servers (mcpbox.maxSessionsTotal)")]
    Sessions(usize),
    #[error("mcpbox runs its maximum of {0} session sandboxes across all servers (mcpbox.maxSandboxes)")]
    Sandboxes(usize),
}

pub struct Budget {
    max_sessions: usize,
    max_sandboxes: usize,
    sessions: AtomicUsize,
    sandboxes: AtomicUsize,
    refusals: Every,
}

/// A session's share of the budget, returned when dropped.
pub struct Slot {
    budget: Arc<Budget>,
    sandbox: bool,
}

impl Budget {
    pub fn new(max_sessions: usize, max_sandboxes: usize) -> Arc<Self> {
        Arc::new(Budget {
            max_sessions,
            max_sandboxes,
            sessions: AtomicUsize::new(0),
            sandboxes: AtomicUsize::new(0),
            refusals: Every::new(Duration::from_secs(10)),
        })
    }

    /// Take a session (and, for `isolation: "session"`, a sandbox) or say which budget is spent.
    pub fn acquire(self: &Arc<Self>, sandbox: bool) -> Result<Slot, Exhausted> {
        let r = self.take(sandbox);
        if let Err(e) = &r {
            if let Some(n) = self.refusals.hit() {
                tracing::warn!("refused {n} new session(s) in the last 10 s: {e}");
            }
        }
        r
    }

    fn take(self: &Arc<Self>, sandbox: bool) -> Result<Slot, Exhausted> {
        if self.sessions.fetch_add(1, Ordering::SeqCst) >= self.max_sessions {
            self.sessions.fetch_sub(1, Ordering::SeqCst);
            return Err(Exhausted::Sessions(self.max_sessions));
        }
        if sandbox && self.sandboxes.fetch_add(1, Ordering::SeqCst) >= self.max_sandboxes {
            self.sandboxes.fetch_sub(1, Ordering::SeqCst);
            self.sessions.fetch_sub(1, Ordering::SeqCst);
            return Err(Exhausted::Sandboxes(self.max_sandboxes));
        }
        Ok(Slot { budget: self.clone(), sandbox })
    }

    /// (sessions, session sandboxes) held now.
    pub fn in_use(&self) -> (usize, usize) {
        (self.sessions.load(Ordering::SeqCst), self.sandboxes.load(Ordering::SeqCst))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.budget.sessions.fetch_sub(1, Ordering::SeqCst);
        if self.sandbox {
            self.budget.sandboxes.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// At most one log line per period: [`Every::hit`] counts an event and, when a line is due,
/// returns how many events it stands for.
pub struct Every {
    period: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl Every {
    pub fn new(period: Duration) -> Self {
        Every { period, state: Mutex::new((None, 0)) }
    }

    pub fn hit(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.1 += 1;
        if s.0.is_some_and(|t| t.elapsed() < self.period) {
            return None;
        }
        let n = s.1;
        *s = (Some(Instant::now()), 0);
        Some(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_and_sandboxes_are_bounded_and_returned() {
        let b = Budget::new(3, 2);
        let a = b.acquire(true).unwrap();
        let _c = b.acquire(true).unwrap();
        assert_eq!(b.acquire(true).err(), Some(Exhausted::Sandboxes(2)));
        // a shared-server session needs no sandbox
        let s = b.acquire(false).unwrap();
        assert_eq!(b.acquire(false).err(), Some(Exhausted::Sessions(3)));
        assert_eq!(b.in_use(), (3, 2));
        drop(a);
        assert_eq!(b.in_use(), (2, 1));
        let _d = b.acquire(true).unwrap();
        drop(s);
        assert_eq!(b.in_use(), (2, 2));
    }

    #[test]
    fn every_logs_once_per_period_with_the_count() {
        let e = Every::new(Duration::from_secs(3600));
        assert_eq!(e.hit(), Some(1));
        assert_eq!(e.hit(), None);
        assert_eq!(e.hit(), None);
        let e = Every::new(Duration::ZERO);
        assert_eq!(e.hit(), Some(1));
        assert_eq!(e.hit(), Some(1));
    }
}
