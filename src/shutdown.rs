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
    /// Set when the server should leave its load balancer (SIGTERM with
    /// `--shutdown-delay`, or draining): `/readyz` answers 503 from then on, while
    /// connections are still accepted until draining begins.
    unready: AtomicBool,
    /// Set when draining begins.
    draining: AtomicBool,
    /// A reload is handing the server to a new process: the acceptor stops. Listener
    /// i's accept queue is accepted first when entry i is true (the new process did
    /// not take that listener), and left to the new process otherwise.
    handing_over: Mutex<Option<Vec<bool>>>,
    /// The acceptor leaves connections in the accept queue until draining begins:
    /// a test hook standing for a process too busy to accept.
    hold_accepting: AtomicBool,
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

    /// Whether `/readyz` should still answer 200.
    pub fn is_ready(&self) -> bool {
        !self.unready.load(Ordering::SeqCst)
    }

    /// Tells load balancers to stop sending new connections (`/readyz` turns 503);
    /// accepting goes on until [`Lifecycle::begin_drain`].
    pub fn set_unready(&self) {
        self.unready.store(true, Ordering::SeqCst);
    }

    /// Stops the acceptor for a hand-over (see `handing_over`).
    pub fn begin_handover(&self, drain_listener: Vec<bool>) {
        *self.handing_over.lock() = Some(drain_listener);
    }

    /// The hand-over was abandoned: the acceptor accepts again.
    pub fn end_handover(&self) {
        *self.handing_over.lock() = None;
    }

    /// Whether a hand-over has begun, and which listeners to empty before it.
    pub fn handover(&self) -> Option<Vec<bool>> {
        self.handing_over.lock().clone()
    }

    /// Whether the acceptor should leave the accept queue alone for now.
    pub fn accepting_held(&self) -> bool {
        self.hold_accepting.load(Ordering::SeqCst) && !self.is_draining()
    }

    /// See `hold_accepting`.
    pub fn hold_accepting(&self) {
        self.hold_accepting.store(true, Ordering::SeqCst);
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
        self.unready.store(true, Ordering::SeqCst);
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
