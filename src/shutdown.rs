//! The server's lifecycle as every thread sees it: running, draining (with its
//! deadline), or failed (a worker died).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use parking_lot::Mutex;

/// Shared by the acceptor, the workers, the metrics endpoint and the [`Server`]
/// handle.
///
/// [`Server`]: crate::Server
#[derive(Debug, Default)]
pub struct Lifecycle {
    /// Set when draining begins; `/readyz` answers 503 from then on.
    draining: AtomicBool,
    /// When the drain gives up on connections that still owe bytes.
    deadline: Mutex<Option<Instant>>,
    /// Why the server can no longer serve (a worker's event loop died); the binary
    /// exits non-zero on it, so that systemd or Kubernetes restarts the process.
    failure: Mutex<Option<String>>,
}

impl Lifecycle {
    pub fn new() -> Lifecycle {
        Lifecycle::default()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Starts the drain with `deadline`; false if it had already begun.
    pub fn begin_drain(&self, deadline: Instant) -> bool {
        let mut slot = self.deadline.lock();
        if slot.is_some() {
            return false;
        }
        *slot = Some(deadline);
        self.draining.store(true, Ordering::SeqCst);
        true
    }

    pub fn drain_deadline(&self) -> Option<Instant> {
        *self.deadline.lock()
    }

    /// Records that the server cannot go on; the first failure is kept.
    pub fn fail(&self, why: String) {
        let mut slot = self.failure.lock();
        if slot.is_none() {
            *slot = Some(why);
        }
    }

    /// Why the server failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().clone()
    }
}
