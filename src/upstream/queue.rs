//! The queue of clients waiting for an upstream slot (`--max-conns-per-upstream`,
//! `--max-queue`, `--queue-timeout`; HAProxy's `maxconn`, `maxqueue`, `timeout queue`).
//!
//! One queue per process, first come first served across workers. A client that
//! arrives when every upstream it may use is at its limit (or while others already
//! wait) takes a [`Ticket`] and waits on its worker, its bytes buffered under the
//! usual caps. Whenever a slot may have freed (a pair released its [`Lease`], an
//! upstream came up or joined the set) [`Queue::dispatch`] takes slots for the
//! waiters at the head and sends each its lease through its worker's channel
//! ([`Grant`]). A slot is handed out by the rule new clients follow
//! ([`Upstreams::may_take`]): on a live upstream, or on any when none is live. A
//! waiter that is gone by then (closed, timed out) drops the lease it is sent, which
//! frees the slot for the next one. A ticket removes its waiter when dropped.
//!
//! Waiters are kept in arrival order under a sequence number, so that one leaving
//! from the middle (a reset) costs a lookup, not a walk of the queue.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Instant;

use parking_lot::Mutex;
use prometheus::{Histogram, IntGauge};

use super::{Lease, Upstream, Upstreams};

/// Hands a waiter its lease: (worker, connection token, lease, when it began to wait).
/// Set by the server once the workers exist; it sends on the worker's channel and
/// wakes it.
pub type Grant = Box<dyn Fn(usize, u64, Lease, Instant) + Send + Sync>;

/// A waiting client.
struct Waiter {
    worker: usize,
    token: u64,
    since: Instant,
}

#[derive(Default)]
struct Waiters {
    /// By sequence number: the first entry waited longest.
    by_seq: BTreeMap<u64, Waiter>,
    next_seq: u64,
}

pub struct Queue {
    waiters: Mutex<Waiters>,
    /// `waiters.len()`, readable without the lock (one load per new client).
    len: AtomicUsize,
    /// `--max-queue`.
    max: usize,
    grant: OnceLock<Grant>,
    /// The set, for the rule of which upstream a waiter may be given.
    set: Weak<Upstreams>,
    /// `edgepoll_upstream_queue_length`.
    length: IntGauge,
    /// `edgepoll_upstream_queue_wait_seconds`: the wait of each client that got a slot.
    wait: Histogram,
}

impl Queue {
    pub fn new(max: usize, length: IntGauge, wait: Histogram, set: Weak<Upstreams>) -> Queue {
        Queue {
            waiters: Mutex::new(Waiters::default()),
            len: AtomicUsize::new(0),
            max,
            grant: OnceLock::new(),
            set,
            length,
            wait,
        }
    }

    /// Sets how waiters are handed their lease (once).
    pub fn set_grant(&self, grant: Grant) {
        let _ = self.grant.set(grant);
    }

    /// Clients waiting now.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Puts a client at the tail; None when the queue is full.
    pub fn join(self: &Arc<Self>, worker: usize, token: u64) -> Option<Ticket> {
        let mut waiters = self.waiters.lock();
        if waiters.by_seq.len() >= self.max {
            return None;
        }
        let seq = waiters.next_seq;
        waiters.next_seq += 1;
        waiters.by_seq.insert(
            seq,
            Waiter {
                worker,
                token,
                since: Instant::now(),
            },
        );
        self.set_len(waiters.by_seq.len());
        Some(Ticket {
            queue: Arc::clone(self),
            seq,
        })
    }

    fn set_len(&self, len: usize) {
        self.len.store(len, Ordering::Relaxed);
        self.length.set(len as i64);
    }

    /// Records the wait of a client that took its slot.
    pub fn waited(&self, since: Instant) {
        self.wait.observe(since.elapsed().as_secs_f64());
    }

    /// Gives `up`'s free slots to the waiters at the head, while it has room and may
    /// take them.
    pub fn dispatch(&self, up: &Arc<Upstream>) {
        let Some(set) = self.set.upgrade() else {
            return;
        };
        while !self.is_empty() && set.may_take(up) {
            let Some(lease) = Lease::try_new(Arc::clone(up)) else {
                return;
            };
            let waiter = {
                let mut waiters = self.waiters.lock();
                let w = waiters.by_seq.pop_first().map(|(_, w)| w);
                self.set_len(waiters.by_seq.len());
                w
            };
            // The lock is not held here: granting may drop a lease, which dispatches.
            match (waiter, self.grant.get()) {
                (Some(w), Some(grant)) => grant(w.worker, w.token, lease, w.since),
                // Emptied meanwhile (dropping the lease gives the slot back), or no
                // worker to send to yet.
                _ => return,
            }
        }
    }
}

/// A client's place in the queue; leaving it (drop) removes the client if it is
/// still waiting.
pub struct Ticket {
    queue: Arc<Queue>,
    seq: u64,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ticket({})", self.seq)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut waiters = self.queue.waiters.lock();
        if waiters.by_seq.remove(&self.seq).is_some() {
            self.queue.set_len(waiters.by_seq.len());
        }
    }
}
