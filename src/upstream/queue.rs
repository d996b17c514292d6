//! The queue of clients waiting for an upstream slot (`--max-conns-per-upstream`,
//! `--max-queue`, `--queue-timeout`; HAProxy's `maxconn`, `maxqueue`, `timeout queue`).
//!
//! One queue per process, first come first served across workers. A client that
//! arrives when every upstream it may use is at its limit (or while others already
//! wait) takes a [`Ticket`] and waits on its worker, its bytes buffered under the
//! usual caps. Whenever a slot may have freed (a pair released its [`Lease`], an
//! upstream came up) [`Queue::dispatch`] takes slots for the waiters at the head and
//! sends each its lease through its worker's channel ([`Grant`]). A waiter that is
//! gone by then (closed, timed out) drops the lease it is sent, which frees the slot
//! for the next one. A ticket removes its waiter from the queue when dropped.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use parking_lot::Mutex;
use prometheus::{Histogram, IntGauge};

use super::{Lease, Upstream};

/// Hands a waiter its lease: (worker, connection token, lease). Set by the server
/// once the workers exist; it sends on the worker's channel and wakes it.
pub type Grant = Box<dyn Fn(usize, u64, Lease) + Send + Sync>;

/// A waiting client.
struct Waiter {
    worker: usize,
    token: u64,
    since: Instant,
}

pub struct Queue {
    waiters: Mutex<VecDeque<Waiter>>,
    /// `waiters.len()`, readable without the lock (one load per new client).
    len: AtomicUsize,
    /// `--max-queue`.
    max: usize,
    grant: OnceLock<Grant>,
    /// `edgepoll_upstream_queue_length`.
    length: IntGauge,
    /// `edgepoll_upstream_queue_wait_seconds`: the wait of each client that got a slot.
    wait: Histogram,
}

impl Queue {
    pub fn new(max: usize, length: IntGauge, wait: Histogram) -> Queue {
        Queue {
            waiters: Mutex::new(VecDeque::new()),
            len: AtomicUsize::new(0),
            max,
            grant: OnceLock::new(),
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
        if waiters.len() >= self.max {
            return None;
        }
        waiters.push_back(Waiter {
            worker,
            token,
            since: Instant::now(),
        });
        self.set_len(waiters.len());
        Some(Ticket {
            queue: Arc::clone(self),
            worker,
            token,
        })
    }

    fn set_len(&self, len: usize) {
        self.len.store(len, Ordering::Relaxed);
        self.length.set(len as i64);
    }

    /// Gives `up`'s free slots to the waiters at the head, while it has room.
    pub fn dispatch(&self, up: &Arc<Upstream>) {
        while !self.is_empty() && up.is_up() && up.is_listed() {
            let Some(lease) = Lease::try_new(Arc::clone(up)) else {
                return;
            };
            let waiter = {
                let mut waiters = self.waiters.lock();
                let w = waiters.pop_front();
                self.set_len(waiters.len());
                w
            };
            // The lock is not held here: granting may drop a lease, which dispatches.
            match (waiter, self.grant.get()) {
                (Some(w), Some(grant)) => {
                    self.wait.observe(w.since.elapsed().as_secs_f64());
                    grant(w.worker, w.token, lease);
                }
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
    worker: usize,
    token: u64,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ticket(worker {}, token {:#x})", self.worker, self.token)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut waiters = self.queue.waiters.lock();
        if let Some(i) = waiters
            .iter()
            .position(|w| w.worker == self.worker && w.token == self.token)
        {
            waiters.remove(i);
            self.queue.set_len(waiters.len());
        }
    }
}
