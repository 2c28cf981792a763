//! A circuit breaker per target: after `failures` consecutive failures the target is left out
//! for `open_for`; then one probe request may try it (half-open), and its outcome closes the
//! breaker or opens it again.
//!
//! The closed state, which is nearly always the state, costs two atomic loads per request and
//! no lock.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

#[derive(Debug)]
pub struct Breaker {
    state: AtomicU8,
    consecutive_failures: AtomicU32,
    /// When it last opened, in milliseconds on the caller's clock.
    opened_at_ms: AtomicU64,
    /// Whether the half-open probe is out.
    probing: AtomicBool,
}

/// What [`Breaker::acquire`] granted: an ordinary request, or the one probe of a half-open
/// breaker, whose outcome decides the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    Normal,
    Probe,
}

/// A state change the caller reports (the `gateway_breaker_open` gauge).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Opened,
    Closed,
}

#[derive(Debug, Clone, Copy)]
pub struct BreakerPolicy {
    pub failures: u32,
    pub open_for: Duration,
}

impl Default for Breaker {
    fn default() -> Self {
        Self {
            state: AtomicU8::new(CLOSED),
            consecutive_failures: AtomicU32::new(0),
            opened_at_ms: AtomicU64::new(0),
            probing: AtomicBool::new(false),
        }
    }
}

impl Breaker {
    /// Whether a request could be sent now, without taking anything (for choosing a target).
    pub fn available(&self, policy: &BreakerPolicy, now_ms: u64) -> bool {
        match self.state.load(Ordering::Acquire) {
            CLOSED => true,
            OPEN => self.open_elapsed(policy, now_ms),
            _ => !self.probing.load(Ordering::Acquire),
        }
    }

    /// Lets a request through, or not. In the half-open state only one request at a time.
    pub fn acquire(&self, policy: &BreakerPolicy, now_ms: u64) -> Option<Permit> {
        match self.state.load(Ordering::Acquire) {
            CLOSED => Some(Permit::Normal),
            OPEN => {
                if !self.open_elapsed(policy, now_ms) {
                    return None;
                }
                // Whoever moves it to half-open, the probe goes to whoever takes it first.
                let _ = self.state.compare_exchange(
                    OPEN,
                    HALF_OPEN,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
                self.take_probe()
            }
            _ => self.take_probe(),
        }
    }

    fn take_probe(&self) -> Option<Permit> {
        if self.state.load(Ordering::Acquire) != HALF_OPEN {
            return None;
        }
        self.probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| Permit::Probe)
    }

    fn open_elapsed(&self, policy: &BreakerPolicy, now_ms: u64) -> bool {
        let opened = self.opened_at_ms.load(Ordering::Acquire);
        now_ms.saturating_sub(opened) >= policy.open_for.as_millis() as u64
    }

    /// The target answered: whatever the state, it closes.
    pub fn success(&self, permit: Permit) -> Option<Transition> {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
        if permit == Permit::Probe {
            self.probing.store(false, Ordering::Release);
        }
        // Read before writing: the shared line is only written when the state changes.
        if self.state.load(Ordering::Acquire) == CLOSED {
            return None;
        }
        (self.state.swap(CLOSED, Ordering::AcqRel) != CLOSED).then_some(Transition::Closed)
    }

    /// The target failed: a failed probe reopens at once; otherwise the failure is counted.
    pub fn failure(
        &self,
        policy: &BreakerPolicy,
        permit: Permit,
        now_ms: u64,
    ) -> Option<Transition> {
        let failures = self.consecutive_failures.fetch_add(1, Ordering::AcqRel).saturating_add(1);
        match permit {
            Permit::Probe => {
                self.opened_at_ms.store(now_ms, Ordering::Release);
                self.state.store(OPEN, Ordering::Release);
                self.probing.store(false, Ordering::Release);
                None
            }
            Permit::Normal if failures >= policy.failures.max(1) => {
                self.opened_at_ms.store(now_ms, Ordering::Release);
                self.state
                    .compare_exchange(CLOSED, OPEN, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                    .then_some(Transition::Opened)
            }
            Permit::Normal => None,
        }
    }

    /// The request ended without saying anything about the target (the client went away, the
    /// upstream asked to slow down): a probe's slot is handed to the next request.
    pub fn release(&self, permit: Permit) {
        if permit == Permit::Probe {
            self.probing.store(false, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: BreakerPolicy =
        BreakerPolicy { failures: 3, open_for: Duration::from_millis(100) };

    #[test]
    fn opens_after_consecutive_failures_only() {
        let b = Breaker::default();
        for _ in 0..2 {
            assert_eq!(b.failure(&POLICY, Permit::Normal, 0), None);
        }
        assert_eq!(b.success(Permit::Normal), None);
        for _ in 0..2 {
            b.failure(&POLICY, Permit::Normal, 0);
        }
        assert_eq!(b.failure(&POLICY, Permit::Normal, 10), Some(Transition::Opened));
        assert_eq!(b.acquire(&POLICY, 50), None);
        assert!(!b.available(&POLICY, 109));
    }

    #[test]
    fn half_open_lets_one_probe_through() {
        let b = Breaker::default();
        for _ in 0..3 {
            b.failure(&POLICY, Permit::Normal, 0);
        }
        assert!(b.available(&POLICY, 100));
        assert_eq!(b.acquire(&POLICY, 100), Some(Permit::Probe));
        assert_eq!(b.acquire(&POLICY, 100), None, "a second request waits for the probe");
        // A failed probe opens it again, from now.
        b.failure(&POLICY, Permit::Probe, 120);
        assert_eq!(b.acquire(&POLICY, 200), None);
        assert_eq!(b.acquire(&POLICY, 220), Some(Permit::Probe));
        // A probe that says nothing frees the slot; a successful one closes.
        b.release(Permit::Probe);
        assert_eq!(b.acquire(&POLICY, 220), Some(Permit::Probe));
        assert_eq!(b.success(Permit::Probe), Some(Transition::Closed));
        assert_eq!(b.acquire(&POLICY, 221), Some(Permit::Normal));
        assert_eq!(b.failure(&POLICY, Permit::Normal, 222), None, "the count starts over");
    }
}
