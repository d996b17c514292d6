//! Relay's upstreams: the set every worker picks from, what each worker and the health
//! prober know of each upstream, and the lease a relayed pair holds on its upstream.
//!
//! # Up and down
//!
//! An upstream takes new clients while it is *up*. It goes down:
//! - by a passive failure: a connect that is refused, unreachable or times out. Without
//!   health checks it is then skipped for `--fail-timeout`; with health checks it stays
//!   down until `--rise` probes in a row pass;
//! - by `--fall` failed probes in a row (`health`), which is what finds an upstream
//!   that accepts connections and then says nothing (a stopped process).
//!
//! A client is never sent to a down upstream while another is up. When every upstream
//! is down, the client tries them anyway, in turn, up to `--connect-retries`: a verdict
//! may be stale, and closing the client would make an outage of what may be a blip.
//!
//! # The set changes
//!
//! The list is a snapshot (`Arc<[Arc<Upstream>]>`) behind a lock that only the
//! resolver (`resolve`) takes to replace it ([`Upstreams::replace`]); a worker re-reads
//! it only when the generation counter says it changed, one relaxed load per new
//! client. A pair holds its upstream by `Arc` ([`Lease`]), so an upstream that leaves
//! the set stays alive, counted, until its last pair closes. An address that comes
//! back while such pairs remain gets the same `Upstream` again, so that its verdict and
//! its count of pairs stay one.

pub mod health;
pub mod hosts;
pub mod queue;
pub mod resolve;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use parking_lot::{Mutex, RwLock};

use crate::config::{is_own_address, Balance, Config};
use crate::keepalive::PeerTimeouts;
use crate::metrics::{ConnectError, Metrics, UpstreamMetrics};
use queue::Queue;

/// One upstream address and what every worker knows of it.
pub struct Upstream {
    pub addr: SocketAddr,
    /// The `upstream` label of its metrics: the address.
    pub label: String,
    /// Without health checks: until when (ms of [`clock_ms`]) it is skipped after a
    /// failed connect; 0: never failed.
    failed_until_ms: AtomicU64,
    /// Held while the verdict, the skip or `listed` changes and the `up` gauge is set
    /// from them, so that two threads changing them at once cannot leave the gauge
    /// saying otherwise than the state. Changes are rare (never per client).
    transition: Mutex<()>,
    /// The health verdict: false from a failed connect (with health checks) or from
    /// `--fall` failed probes, until `--rise` probes pass. Always true without checks.
    up: AtomicBool,
    /// Pairs open or connecting to it, for `--max-conns-per-upstream`.
    conns: AtomicUsize,
    /// `--max-conns-per-upstream`; `usize::MAX` without one.
    limit: usize,
    /// Where clients wait for a slot when every upstream is at its limit.
    queue: Option<Arc<Queue>>,
    /// In the set: false once the resolver removed it, or for an upstream only pairs
    /// moved in by a reload hold. Waiting clients are never given a slot on it.
    listed: AtomicBool,
    pub metrics: UpstreamMetrics,
}

impl Upstream {
    fn new(
        addr: SocketAddr,
        metrics: &Metrics,
        limit: usize,
        queue: Option<Arc<Queue>>,
    ) -> Upstream {
        let label = addr.to_string();
        let metrics = metrics.upstream(&label);
        metrics.up.set(1);
        Upstream {
            transition: Mutex::new(()),
            addr,
            metrics,
            label,
            failed_until_ms: AtomicU64::new(0),
            up: AtomicBool::new(true),
            conns: AtomicUsize::new(0),
            limit,
            queue,
            listed: AtomicBool::new(true),
        }
    }

    /// Whether it is in the set (see `listed`).
    pub fn is_listed(&self) -> bool {
        self.listed.load(Ordering::Relaxed)
    }

    /// Whether it is below `--max-conns-per-upstream`.
    pub fn has_room(&self) -> bool {
        self.conns() < self.limit
    }

    /// The health verdict (always true without health checks).
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Pairs open or connecting to it now.
    pub fn conns(&self) -> usize {
        self.conns.load(Ordering::Relaxed)
    }

    /// Whether it may take a new client while others are up: its verdict is up and it
    /// is not skipped after a failed connect.
    pub fn is_live(&self) -> bool {
        self.is_up() && self.failed_until_ms.load(Ordering::Relaxed) <= clock_ms()
    }

    /// Sets the `up` gauge from the state; called with `transition` held.
    fn publish(&self) {
        let live = self.is_listed() && self.is_live();
        self.metrics.up.set(live as i64);
    }

    /// Sets the health verdict; returns whether it changed. An upstream that comes up
    /// takes waiting clients at once.
    fn set_up(self: &Arc<Self>, up: bool) -> bool {
        let changed = {
            let _t = self.transition.lock();
            let was = self.up.swap(up, Ordering::Relaxed);
            self.publish();
            was != up
        };
        if changed && up {
            self.dispatch();
        }
        changed
    }

    /// Skips it until `until_ms` (0: no more); returns whether it was live before.
    fn skip_until(self: &Arc<Self>, until_ms: u64) -> bool {
        let was_live = {
            let _t = self.transition.lock();
            let was = self.failed_until_ms.swap(until_ms, Ordering::Relaxed);
            self.publish();
            was <= clock_ms()
        };
        if until_ms == 0 {
            self.dispatch();
        }
        was_live
    }

    fn set_listed(self: &Arc<Self>, listed: bool) {
        let _t = self.transition.lock();
        self.listed.store(listed, Ordering::Relaxed);
        self.publish();
    }

    /// Gives its free slots to waiting clients, if any wait.
    fn dispatch(self: &Arc<Self>) {
        if let Some(q) = self.queue.as_ref().filter(|q| !q.is_empty()) {
            q.dispatch(self);
        }
    }
}

/// Milliseconds on a clock every thread shares, plus one so that 0 can mean "never".
fn clock_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// A pair's hold on its upstream: counts it in the upstream's gauge and (for the
/// per-upstream limit) its connections, and gives both back on drop. No path
/// decrements by hand.
pub struct Lease {
    upstream: Arc<Upstream>,
}

impl Lease {
    /// Counts a pair on `upstream` until the lease is dropped, whatever the limit:
    /// for a pair that moved here in a reload, connected before this process existed.
    pub fn new(upstream: Arc<Upstream>) -> Lease {
        upstream.conns.fetch_add(1, Ordering::Relaxed);
        upstream.metrics.active.inc();
        Lease { upstream }
    }

    /// A lease if `upstream` is below its limit.
    pub fn try_new(upstream: Arc<Upstream>) -> Option<Lease> {
        upstream
            .conns
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < upstream.limit).then_some(n + 1)
            })
            .ok()?;
        upstream.metrics.active.inc();
        Some(Lease { upstream })
    }

    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lease({})", self.upstream.addr)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let up = &self.upstream;
        up.conns.fetch_sub(1, Ordering::Relaxed);
        up.metrics.active.dec();
        up.dispatch();
    }
}

/// What a new client gets.
pub enum Pick {
    /// An upstream, its slot taken.
    Go(Lease),
    /// Every upstream it may use is at its limit, or others already wait: queue.
    Full,
    /// No upstream is listed.
    Empty,
}

/// The upstreams of a relay server, shared by its workers, its health prober and its
/// resolver.
pub struct Upstreams {
    /// The current set; replaced whole, never edited in place.
    current: RwLock<Arc<[Arc<Upstream>]>>,
    /// Bumped after each replacement of `current`.
    generation: AtomicU64,
    balance: Balance,
    fail_timeout_ms: u64,
    connect_retries: Option<usize>,
    pub connect_timeout_ms: u64,
    /// `--queue-timeout` in ms.
    pub queue_timeout_ms: u64,
    pub splice: bool,
    pub proxy_v2: bool,
    /// Health checks run: a failed connect marks the upstream down until probes pass,
    /// instead of skipping it for `--fail-timeout`.
    checked: bool,
    /// For the metrics of upstreams that join later.
    metrics: Arc<Metrics>,
    /// `--max-conns-per-upstream`; `usize::MAX` without one.
    limit: usize,
    /// With `--max-conns-per-upstream`: the clients waiting for a slot.
    pub queue: Option<Arc<Queue>>,
    /// Keepalive and user timeout of upstream sockets (see `crate::keepalive`).
    pub timeouts: PeerTimeouts,
    /// Upstreams outside the set that pairs may still hold: those the resolver
    /// removed, and those made for pairs a reload moved here (`for_moved`). Only the
    /// resolver and a reload's import take this lock, never a worker's pick.
    outside: Mutex<HashMap<SocketAddr, Weak<Upstream>>>,
    /// The relay's own listening addresses, which never join the set.
    listening: Vec<SocketAddr>,
}

impl Upstreams {
    /// The upstreams of `full`, for a relay listening on `listening` (an upstream
    /// there is left out, with an error logged: see [`is_own_address`]).
    pub fn new(full: &Config, metrics: &Arc<Metrics>, listening: &[SocketAddr]) -> Arc<Upstreams> {
        let config = &full.relay;
        let limit = config.max_conns_per_upstream.unwrap_or(usize::MAX);
        Arc::new_cyclic(|set| {
            let queue = config.max_conns_per_upstream.map(|_| {
                let (length, wait) = metrics.upstream_queue();
                Arc::new(Queue::new(config.max_queue, length, wait, set.clone()))
            });
            let mut list: Vec<Arc<Upstream>> = Vec::with_capacity(config.upstreams.len());
            for &addr in &config.upstreams {
                if is_own_address(addr, listening) {
                    tracing::error!(
                        upstream = %addr,
                        "this upstream is the relay's own listener; it gets no client"
                    );
                    continue;
                }
                // Each address once: the prober and the metrics know an upstream by it.
                if list.iter().all(|u| u.addr != addr) {
                    list.push(Arc::new(Upstream::new(addr, metrics, limit, queue.clone())));
                }
            }
            Upstreams {
                current: RwLock::new(list.into()),
                generation: AtomicU64::new(0),
                balance: config.balance,
                fail_timeout_ms: config.fail_timeout.as_millis() as u64,
                connect_retries: config.connect_retries,
                connect_timeout_ms: (config.connect_timeout.as_millis() as u64).max(1),
                queue_timeout_ms: (config.queue_timeout.as_millis() as u64).max(1),
                splice: config.splice,
                proxy_v2: config.send_proxy_v2,
                checked: config.health_check.is_some(),
                metrics: Arc::clone(metrics),
                limit,
                queue,
                timeouts: PeerTimeouts::upstreams(full),
                outside: Mutex::new(HashMap::new()),
                listening: listening.to_vec(),
            }
        })
    }

    /// The current set.
    pub fn list(&self) -> Arc<[Arc<Upstream>]> {
        Arc::clone(&self.current.read())
    }

    /// The upstream at `addr` in the current set.
    pub fn find(&self, addr: SocketAddr) -> Option<Arc<Upstream>> {
        self.current.read().iter().find(|u| u.addr == addr).cloned()
    }

    /// A new member of the set at `addr`, with the set's limit and queue.
    pub fn member(&self, addr: SocketAddr) -> Arc<Upstream> {
        Arc::new(Upstream::new(
            addr,
            &self.metrics,
            self.limit,
            self.queue.clone(),
        ))
    }

    /// The upstream a pair moved in by a reload was connected to: the listed one at
    /// `addr`, or one outside the set (counted under its address, given no new client); whether it is
    /// listed. One lock around both looks, which the resolver's `replace` also takes,
    /// so that an address it adds meanwhile never ends up with two `Upstream`s.
    pub fn for_moved(&self, addr: SocketAddr) -> (Arc<Upstream>, bool) {
        let mut outside = self.outside.lock();
        if let Some(up) = self.find(addr) {
            return (up, true);
        }
        if let Some(up) = outside.get(&addr).and_then(Weak::upgrade) {
            return (up, false);
        }
        let up = self.member(addr);
        up.set_listed(false);
        outside.retain(|_, w| w.strong_count() > 0);
        outside.insert(addr, Arc::downgrade(&up));
        (up, false)
    }

    /// Makes `addrs` the set (the resolver's doing): an address already in the set
    /// keeps its `Upstream` (verdict, pair count, metrics); one that left while pairs
    /// still held it gets that one back; a new one starts up. An upstream that leaves
    /// gets no new client, and lives until its last pair closes. Workers see the new
    /// set at their next pick.
    pub fn replace(&self, addrs: &[SocketAddr]) {
        let own: Vec<SocketAddr> = addrs
            .iter()
            .copied()
            .filter(|&a| is_own_address(a, &self.listening))
            .collect();
        for addr in &own {
            tracing::error!(
                upstream = %addr,
                "a name answered the relay's own listener; it is left out of the set"
            );
        }
        let addrs: Vec<SocketAddr> = addrs.iter().copied().filter(|a| !own.contains(a)).collect();
        let addrs = &addrs[..];
        let old = self.list();
        let mut outside = self.outside.lock();
        let list: Vec<Arc<Upstream>> = addrs
            .iter()
            .map(|&addr| {
                old.iter()
                    .find(|u| u.addr == addr)
                    .cloned()
                    .or_else(|| outside.remove(&addr).and_then(|w| w.upgrade()))
                    .unwrap_or_else(|| self.member(addr))
            })
            .collect();
        for up in &list {
            up.set_listed(true);
        }
        for up in old.iter().filter(|u| !addrs.contains(&u.addr)) {
            up.set_listed(false);
            outside.insert(up.addr, Arc::downgrade(up));
        }
        // The upstreams whose last pair has closed.
        outside.retain(|_, w| w.strong_count() > 0);
        let list: Arc<[Arc<Upstream>]> = list.into();
        *self.current.write() = Arc::clone(&list);
        self.generation.fetch_add(1, Ordering::Release);
        drop(outside);
        // A new upstream has free slots: clients waiting for one take them now.
        self.dispatch_all();
    }

    /// Upstreams tried per client: `--connect-retries`, or one try per upstream.
    pub fn tries(&self, listed: usize) -> usize {
        self.connect_retries.unwrap_or(listed).max(1)
    }

    /// Whether a waiting client may be given a slot on `up`: by the rule of
    /// [`Picker::pick`], it is live, or no listed upstream is.
    pub fn may_take(&self, up: &Upstream) -> bool {
        up.is_listed() && (up.is_live() || !self.current.read().iter().any(|u| u.is_live()))
    }

    /// Gives the free slots of every listed upstream to waiting clients: after the
    /// set changed, and when a client joins the queue (a slot may have freed, or an
    /// upstream's skip ended, with no one there to hand it on).
    pub fn dispatch_all(&self) {
        if self.queue.as_ref().is_some_and(|q| !q.is_empty()) {
            for up in self.list().iter() {
                up.dispatch();
            }
        }
    }

    /// Counts a failed connect to `up`, and marks it down unless the error was ours
    /// (out of descriptors or ports) rather than the upstream's.
    pub fn failed(&self, up: &Arc<Upstream>, reason: ConnectError, err: &io::Error) {
        up.metrics.errors[reason as usize].inc();
        if reason == ConnectError::Error {
            tracing::debug!(upstream = %up.addr, "connect failed: {err}");
            return;
        }
        if self.checked {
            if up.set_up(false) {
                tracing::warn!(
                    upstream = %up.addr,
                    "upstream down: connect failed ({}: {err}); no new clients until \
                     health checks pass",
                    reason.as_str()
                );
            }
            return;
        }
        if self.fail_timeout_ms == 0 {
            tracing::debug!(upstream = %up.addr, "connect failed: {err}");
            return;
        }
        if up.skip_until(clock_ms() + self.fail_timeout_ms) {
            // Once per failure episode, not once per client.
            tracing::warn!(
                upstream = %up.addr,
                "connect failed ({}: {err}); skipping it for {} ms",
                reason.as_str(),
                self.fail_timeout_ms
            );
        }
    }

    /// A connect to `up` succeeded: without health checks, a skip after a failed
    /// connect ends (it took a client whose every other upstream was down).
    pub fn connected(&self, up: &Arc<Upstream>) {
        if !self.checked && up.failed_until_ms.load(Ordering::Relaxed) != 0 {
            up.skip_until(0);
        }
    }
}

/// A worker's view of the upstreams: its snapshot of the set and its own
/// round-robin position.
pub struct Picker {
    list: Arc<[Arc<Upstream>]>,
    generation: u64,
    next: usize,
    /// Scratch list of candidates, kept so that picking allocates nothing.
    order: Vec<usize>,
}

impl Picker {
    /// Worker `id` starts its round-robin at a different upstream from its neighbours.
    pub fn new(upstreams: &Upstreams, id: usize) -> Picker {
        let list = upstreams.list();
        let next = id % list.len().max(1);
        Picker {
            generation: upstreams.generation.load(Ordering::Acquire),
            list,
            next,
            order: Vec::new(),
        }
    }

    /// The current set, re-read if the resolver replaced it.
    pub fn list(&mut self, upstreams: &Upstreams) -> &[Arc<Upstream>] {
        let generation = upstreams.generation.load(Ordering::Acquire);
        if generation != self.generation {
            self.list = upstreams.list();
            self.generation = generation;
        }
        &self.list
    }

    /// A slot for a new client: on the next live upstream in turn with room (or, with
    /// `least-conn`, the live one with room and the fewest pairs); when none is live,
    /// on the next one in turn with room whatever its state. [`Pick::Full`] when
    /// those are all at their limit, or when clients already wait (they go first).
    pub fn pick(&mut self, upstreams: &Upstreams) -> Pick {
        let n = self.list(upstreams).len();
        if n == 0 {
            return Pick::Empty;
        }
        if upstreams.queue.as_ref().is_some_and(|q| !q.is_empty()) {
            // Those waiting go first. A slot that freed with no one to hand it on (an
            // upstream whose skip ended) goes to them now.
            upstreams.dispatch_all();
            return Pick::Full;
        }
        let any_live = self.list.iter().any(|u| u.is_live());
        // Candidates in turn from `next`; least-conn tries the least loaded first.
        let mut order = std::mem::take(&mut self.order);
        order.clear();
        order.extend(
            (0..n)
                .map(|k| (self.next + k) % n)
                .filter(|&i| !any_live || self.list[i].is_live()),
        );
        if upstreams.balance == Balance::LeastConn {
            // Stable: ties stay in turn.
            order.sort_by_key(|&i| self.list[i].conns());
        }
        let mut picked = None;
        for &i in &order {
            if let Some(lease) = Lease::try_new(Arc::clone(&self.list[i])) {
                self.next = (i + 1) % n;
                picked = Some(lease);
                break;
            }
        }
        self.order = order;
        picked.map_or(Pick::Full, Pick::Go)
    }
}
