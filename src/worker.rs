//! The worker: one thread, one epoll instance, the connections the acceptor gave it.
//!
//! # The edge-triggered rules
//!
//! Every socket is registered once with `EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET` and
//! never modified, so the loop makes no `epoll_ctl` call after registration. That is
//! only correct if the loop keeps these rules:
//!
//! 1. An edge is reported once. After EPOLLIN a connection is read until EAGAIN or a
//!    short read (a stream socket is then drained, per epoll(7)); after EPOLLOUT its
//!    outbound buffer is written until it is empty or a write is short.
//! 2. Fairness: a connection may read [`READ_BUDGET`](crate::mode::READ_BUDGET) bytes per wake-up. When it spends
//!    the budget with input still queued it goes on the ready list, which is served
//!    after the fired events, and the next `epoll_wait` then does not block.
//! 3. Backpressure: output a short write leaves behind goes into the connection's
//!    outbound buffer, allocated only then and capped at `--max-pending-bytes`. At the
//!    cap the connection stops reading. No new EPOLLIN edge will come for input already
//!    queued, so the connection remembers it (`READ_PENDING`) and reads again as soon as
//!    an EPOLLOUT edge lets the buffer drain below the cap.
//! 4. EPOLLERR and EPOLLHUP are handled by the next read or write, which returns the
//!    error or the EOF. EPOLLRDHUP means the peer sends no more: what is owed is flushed,
//!    then the connection is closed.
//! 5. An event whose token names a freed or reused slab slot is stale (the connection
//!    was closed earlier in the same batch) and is ignored: the generation in the token
//!    no longer matches.
//!
//! # Relayed pairs
//!
//! In relay mode a connection owns a second socket, its upstream, registered in the
//! same epoll once with the same interest and the connection's token plus a side bit
//! ([`Token::upstream`](crate::conn::Token::upstream)). An event on either socket
//! serves the pair as a whole (`mode::relay`), the generation check of rule 5 covers
//! both, and the rules above hold for each direction: a direction reads its source
//! until a short read, pauses at the cap, and resumes when its destination's EPOLLOUT
//! edge lets its buffer drain.
//!
//! # Hand-off
//!
//! The acceptor sends new sockets over a channel and wakes the worker through an
//! eventfd only when the worker said it was about to sleep, so a busy worker is not
//! woken once per connection.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::config::{Config, Mode};
use crate::conn::{flags, Conn, Slab, Token};
use crate::metrics::{CloseReason, Counters, RejectReason, WorkerMetrics, PUBLISH_INTERVAL};
use crate::mode::http::Responder;
use crate::mode::relay::{self, Edge, Relay};
use crate::mode::{echo, http, Io, Step, LINGER_MS, READ_BUFFER_SIZE};
use crate::server::Shared;
use crate::sys::epoll::{Epoll, Events, READ_INTEREST, SOCKET_INTEREST};
use crate::sys::eventfd::EventFd;
use crate::timer::IdleWheel;

/// Events taken per `epoll_wait`: large enough to amortise the call under load,
/// small enough (12 KiB) to stay in cache.
const EVENTS_PER_WAIT: usize = 1024;

/// What the acceptor sends a worker.
pub(crate) enum Msg {
    /// A new connection, already non-blocking, with its client address when a
    /// per-address limit counts it.
    Conn(OwnedFd, Option<IpAddr>),
    /// Stop serving input, flush what is owed, and exit by the deadline.
    Drain(Instant),
}

/// The wake-up of one worker, shared with the acceptor.
pub(crate) struct Waker {
    eventfd: EventFd,
    /// Set by the worker just before a blocking wait; whoever clears it writes the
    /// eventfd. A worker that is awake is not woken once per connection.
    sleeping: AtomicBool,
}

impl Waker {
    fn new() -> io::Result<Waker> {
        Ok(Waker {
            eventfd: EventFd::new()?,
            sleeping: AtomicBool::new(false),
        })
    }

    /// Wakes the worker if it is (about to be) asleep. Call after sending a message.
    pub(crate) fn notify(&self) -> io::Result<()> {
        // Pairs with the fence in `Worker::wait`: either the worker sees our message
        // when it checks the channel, or we see its `sleeping` flag (Dekker's pattern).
        fence(Ordering::SeqCst);
        if self.sleeping.swap(false, Ordering::SeqCst) {
            self.eventfd.wake()?;
        }
        Ok(())
    }
}

/// The acceptor's handle on a worker.
pub(crate) struct WorkerHandle {
    pub tx: Sender<Msg>,
    pub waker: Arc<Waker>,
}

/// One worker's event loop and everything it owns.
/// What the worker needs to drive its mode.
enum ModeState {
    Echo,
    Http(Box<Responder>),
    Relay(Box<Relay>),
}

pub(crate) struct Worker {
    id: usize,
    mode: ModeState,
    /// The batch of responses one read produces (http), written in one write.
    out: Vec<u8>,
    /// Per-connection deadlines set by the mode (header timeout, lingering close).
    deadlines: IdleWheel,
    epoll: Epoll,
    events: Events,
    slab: Slab,
    /// Connections to serve again before the next blocking wait (rule 2).
    ready: Vec<Token>,
    /// The ready list being served; swapped with `ready` each turn, so both keep
    /// their capacity and no turn allocates.
    serving: Vec<Token>,
    /// One read buffer for every connection of this worker.
    buf: Box<[u8]>,
    rx: Receiver<Msg>,
    waker: Arc<Waker>,
    cap: usize,
    idle_timeout_ms: Option<u64>,
    wheel: Option<IdleWheel>,
    /// Scratch list for expired timer entries.
    due: Vec<Token>,
    clock: Instant,
    now_ms: u64,
    counters: Counters,
    metrics: WorkerMetrics,
    last_publish_ms: u64,
    published_active: i64,
    published_buffered: i64,
    shared: Arc<Shared>,
    drain_deadline: Option<Instant>,
    /// Client addresses of this worker's connections, kept only when
    /// `--max-connections-per-ip` is set, so that a close can be counted out.
    peer_ips: HashMap<Token, IpAddr>,
}

impl Worker {
    /// Creates worker `id` and the handle the acceptor uses to reach it.
    pub(crate) fn new(
        id: usize,
        config: &Config,
        metrics: WorkerMetrics,
        shared: Arc<Shared>,
    ) -> io::Result<(Worker, WorkerHandle)> {
        let epoll = Epoll::new()?;
        let waker = Arc::new(Waker::new()?);
        epoll.add(waker.eventfd.as_fd(), Token::WAKE.0, READ_INTEREST)?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let idle_timeout_ms = config.idle_timeout.map(|d| (d.as_millis() as u64).max(1));
        let worker = Worker {
            id,
            mode: match (config.mode, shared.upstreams.as_ref()) {
                (Mode::Relay, Some(ups)) => {
                    ModeState::Relay(Box::new(Relay::new(Arc::clone(ups), id)))
                }
                (Mode::Http, _) => ModeState::Http(Box::new(Responder::new(&config.http))),
                _ => ModeState::Echo,
            },
            out: Vec::new(),
            deadlines: IdleWheel::new(match config.mode {
                Mode::Relay => config.relay.connect_timeout,
                _ => config
                    .http
                    .header_timeout
                    .max(Duration::from_millis(LINGER_MS)),
            }),
            epoll,
            events: Events::with_capacity(EVENTS_PER_WAIT),
            slab: Slab::new(),
            ready: Vec::new(),
            serving: Vec::new(),
            buf: vec![0; READ_BUFFER_SIZE].into_boxed_slice(),
            rx,
            waker: Arc::clone(&waker),
            cap: config.max_pending_bytes,
            idle_timeout_ms,
            wheel: config.idle_timeout.map(IdleWheel::new),
            due: Vec::new(),
            clock: Instant::now(),
            now_ms: 0,
            counters: Counters::default(),
            metrics,
            last_publish_ms: 0,
            published_active: 0,
            published_buffered: 0,
            shared,
            drain_deadline: None,
            peer_ips: HashMap::new(),
        };
        Ok((worker, WorkerHandle { tx, waker }))
    }

    /// Runs until a drain completes or its deadline passes.
    pub(crate) fn run(mut self) {
        loop {
            let timeout = self.next_timeout();
            if let Err(e) = self.wait(timeout) {
                tracing::error!(worker = self.id, "{e}; closing this worker's connections");
                break;
            }
            self.tick();
            self.counters.global_room =
                self.shared.max_buffered - self.shared.buffered.load(Ordering::Relaxed);
            self.take_messages();
            for i in 0..self.events.len() {
                let event = self.events.get(i);
                let token = Token(event.token);
                if token == Token::WAKE {
                    // Only resets the counter; the messages are taken every turn.
                    let _ = self.waker.eventfd.drain();
                    continue;
                }
                let edge = Edge {
                    upstream: token.is_upstream(),
                    readable: event.is_readable(),
                    hup: event.is_read_closed(),
                    error: event.is_error(),
                };
                self.serve(token.client(), Some(edge));
            }
            self.serve_ready();
            self.expire_idle();
            self.expire_deadlines();
            if self.now_ms.saturating_sub(self.last_publish_ms)
                >= PUBLISH_INTERVAL.as_millis() as u64
            {
                self.publish();
            }
            if let Some(deadline) = self.drain_deadline {
                if self.slab.is_empty() {
                    break;
                }
                if Instant::now() >= deadline {
                    tracing::warn!(
                        worker = self.id,
                        connections = self.slab.len(),
                        "drain timeout reached; closing the remaining connections"
                    );
                    break;
                }
            }
        }
        for token in self.slab.tokens() {
            self.close(token, CloseReason::Shutdown);
        }
        self.publish();
    }

    /// How long the next `epoll_wait` may block.
    fn next_timeout(&self) -> Option<Duration> {
        if !self.ready.is_empty() || !self.rx.is_empty() {
            return Some(Duration::ZERO);
        }
        let mut deadline_ms: Option<u64> = self.wheel.as_ref().and_then(|w| w.next_deadline_ms());
        if let Some(d) = self.deadlines.next_deadline_ms() {
            deadline_ms = Some(deadline_ms.map_or(d, |x| x.min(d)));
        }
        if self.is_dirty() {
            let publish_at = self.last_publish_ms + PUBLISH_INTERVAL.as_millis() as u64;
            deadline_ms = Some(deadline_ms.map_or(publish_at, |d| d.min(publish_at)));
        }
        let mut timeout = deadline_ms.map(|d| Duration::from_millis(d.saturating_sub(self.now_ms)));
        if let Some(deadline) = self.drain_deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            timeout = Some(timeout.map_or(left, |t| t.min(left)));
        }
        timeout
    }

    /// Waits for events; before a blocking wait, tells the acceptor to wake us.
    fn wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        if timeout == Some(Duration::ZERO) {
            return self.epoll.wait(&mut self.events, timeout);
        }
        self.waker.sleeping.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        let timeout = if self.rx.is_empty() {
            timeout
        } else {
            Some(Duration::ZERO)
        };
        let result = self.epoll.wait(&mut self.events, timeout);
        self.waker.sleeping.store(false, Ordering::Relaxed);
        result
    }

    fn tick(&mut self) {
        let now_ms = self.clock.elapsed().as_millis() as u64;
        if let ModeState::Http(r) = &mut self.mode {
            if now_ms / 1000 != self.now_ms / 1000 || now_ms == 0 {
                r.refresh_date(std::time::SystemTime::now());
            }
        }
        self.now_ms = now_ms;
    }

    fn take_messages(&mut self) {
        while let Ok(msg) = self.rx.try_recv() {
            match msg {
                Msg::Conn(fd, ip) => self.register(fd, ip),
                Msg::Drain(deadline) => self.begin_drain(deadline),
            }
        }
    }

    fn register(&mut self, fd: OwnedFd, ip: Option<IpAddr>) {
        let mut conn = Conn::new(fd, self.now_ms);
        if self.drain_deadline.is_some() {
            conn.set(flags::DRAINING | flags::READ_PENDING);
        }
        let token = self.slab.insert(conn);
        let Some(conn) = self.slab.get_mut(token) else {
            unreachable!("a token just issued names its connection");
        };
        if let Err(e) = self.epoll.add(conn.fd.as_fd(), token.0, SOCKET_INTEREST) {
            // ENOMEM or ENOSPC (fs.epoll.max_user_watches): refuse this one, keep serving.
            tracing::warn!(worker = self.id, "{e}; closing the new connection");
            self.slab.remove(token);
            self.shared.open.fetch_sub(1, Ordering::Relaxed);
            if let (Some(limit), Some(ip)) = (&self.shared.per_ip, ip) {
                limit.close(ip);
            }
            self.metrics.reject(RejectReason::Error);
            return;
        }
        if let Some(ip) = ip {
            self.peer_ips.insert(token, ip);
        }
        self.counters.accepted += 1;
        self.counters.active += 1;
        if let (Some(wheel), Some(timeout)) = (self.wheel.as_mut(), self.idle_timeout_ms) {
            wheel.schedule(token, self.now_ms + timeout);
        }
        if let ModeState::Http(r) = &self.mode {
            // The first request head must arrive within the header timeout too.
            let deadline = self.now_ms + r.header_timeout_ms;
            conn_deadline(&mut self.slab, token, deadline);
            self.deadlines.schedule(token, deadline);
        }
        if let ModeState::Relay(r) = &mut self.mode {
            let Some(conn) = self.slab.get_mut(token) else {
                unreachable!("a token just issued names its connection");
            };
            let mut io = Io {
                buf: &mut self.buf,
                cap: self.cap,
                counters: &mut self.counters,
                now_ms: self.now_ms,
            };
            let mut ctx = relay::Ctx {
                relay: r,
                epoll: &self.epoll,
                token,
            };
            let step = relay::open(conn, &mut io, &mut ctx);
            self.after_serve(token, 0, 0, step);
        }
        if self.drain_deadline.is_some() {
            self.push_ready(token);
        }
    }

    fn begin_drain(&mut self, deadline: Instant) {
        self.drain_deadline = Some(deadline);
        for token in self.slab.tokens() {
            if let Some(conn) = self.slab.get_mut(token) {
                conn.set(flags::DRAINING | flags::READ_PENDING);
            }
            self.push_ready(token);
        }
    }

    fn push_ready(&mut self, token: Token) {
        if let Some(conn) = self.slab.get_mut(token) {
            if !conn.has(flags::IN_READY) {
                conn.set(flags::IN_READY);
                self.ready.push(token);
            }
        }
    }

    /// Serves one connection after an edge on it (or on its upstream socket), or from
    /// the ready list (`edge` None), and acts on the outcome.
    fn serve(&mut self, token: Token, edge: Option<Edge>) {
        // Rule 5: a stale token finds no connection.
        let Some(conn) = self.slab.get_mut(token) else {
            return;
        };
        // Echo and http read the edge's flags from the connection; relay reads them
        // per socket of its pair.
        let readable = edge.is_some_and(|e| e.readable);
        if edge.is_some_and(|e| e.hup || e.error) {
            conn.set(flags::HUP_SEEN);
        }
        let before = conn.pending();
        let deadline_before = conn.deadline_ms;
        let mut io = Io {
            buf: &mut self.buf,
            cap: self.cap,
            counters: &mut self.counters,
            now_ms: self.now_ms,
        };
        let step = match &mut self.mode {
            ModeState::Echo => echo::serve(conn, &mut io, readable),
            ModeState::Http(r) => http::serve(conn, &mut io, readable, r, &mut self.out),
            ModeState::Relay(r) => {
                let mut ctx = relay::Ctx {
                    relay: r,
                    epoll: &self.epoll,
                    token,
                };
                relay::serve(conn, &mut io, &mut ctx, edge)
            }
        };
        self.after_serve(token, before, deadline_before, step);
    }

    /// Books what serving changed: buffered bytes, a new deadline, the next step.
    #[inline]
    fn after_serve(
        &mut self,
        token: Token,
        pending_before: usize,
        deadline_before: u64,
        step: Step,
    ) {
        if let Some(conn) = self.slab.get_mut(token) {
            let delta = conn.pending() as i64 - pending_before as i64;
            if delta != 0 {
                self.counters.buffered += delta;
                self.shared.buffered.fetch_add(delta, Ordering::Relaxed);
            }
            // An earlier deadline needs its own wheel entry; a later one is found by
            // the entry already there, which re-arms itself.
            let deadline = conn.deadline_ms;
            if deadline != 0 && (deadline_before == 0 || deadline < deadline_before) {
                self.deadlines.schedule(token, deadline);
            }
        }
        match step {
            Step::Idle => {}
            Step::Again => self.push_ready(token),
            Step::Close(reason) => self.close(token, reason),
        }
    }

    /// Serves the connections that spent their budget last time (rule 2). Any that
    /// spend it again go on the fresh ready list, for the next turn.
    fn serve_ready(&mut self) {
        std::mem::swap(&mut self.ready, &mut self.serving);
        let mut serving = std::mem::take(&mut self.serving);
        for &token in &serving {
            if let Some(conn) = self.slab.get_mut(token) {
                conn.clear(flags::IN_READY);
                self.serve(token, None);
            }
        }
        serving.clear();
        self.serving = serving;
    }

    fn expire_deadlines(&mut self) {
        self.deadlines.expire(self.now_ms, &mut self.due);
        let mut due = std::mem::take(&mut self.due);
        for &token in &due {
            let Some(conn) = self.slab.get_mut(token) else {
                continue; // closed since it was scheduled
            };
            let deadline = conn.deadline_ms;
            if deadline == 0 {
                continue; // cancelled
            }
            if deadline > self.now_ms {
                self.deadlines.schedule(token, deadline);
                continue;
            }
            conn.deadline_ms = 0;
            let before = conn.pending();
            let mut io = Io {
                buf: &mut self.buf,
                cap: self.cap,
                counters: &mut self.counters,
                now_ms: self.now_ms,
            };
            let step = match &mut self.mode {
                ModeState::Http(r) => http::on_deadline(conn, &mut io, r, &mut self.out),
                // Echo sets a deadline only for a lingering close.
                ModeState::Echo => crate::mode::lingered(conn).unwrap_or(Step::Idle),
                ModeState::Relay(r) => {
                    let mut ctx = relay::Ctx {
                        relay: r,
                        epoll: &self.epoll,
                        token,
                    };
                    relay::on_deadline(conn, &mut io, &mut ctx)
                }
            };
            self.after_serve(token, before, 0, step);
        }
        due.clear();
        self.due = due;
    }

    fn expire_idle(&mut self) {
        let (Some(wheel), Some(timeout)) = (self.wheel.as_mut(), self.idle_timeout_ms) else {
            return;
        };
        wheel.expire(self.now_ms, &mut self.due);
        let mut due = std::mem::take(&mut self.due);
        for &token in &due {
            let Some(conn) = self.slab.get_mut(token) else {
                continue; // closed since it was scheduled
            };
            let deadline = conn.last_active_ms + timeout;
            if deadline <= self.now_ms {
                self.close(token, CloseReason::IdleTimeout);
            } else if let Some(wheel) = self.wheel.as_mut() {
                wheel.schedule(token, deadline);
            }
        }
        due.clear();
        self.due = due;
    }

    fn close(&mut self, token: Token, reason: CloseReason) {
        let Some(conn) = self.slab.remove(token) else {
            return;
        };
        self.counters.closed[reason as usize] += 1;
        self.counters.active -= 1;
        let held = conn.pending() as i64;
        if held != 0 {
            self.counters.buffered -= held;
            self.counters.global_room += held;
            self.shared.buffered.fetch_sub(held, Ordering::Relaxed);
        }
        let lived_ms = self.now_ms.saturating_sub(conn.opened_ms);
        self.metrics.observe_duration(lived_ms as f64 / 1000.0);
        self.shared.open.fetch_sub(1, Ordering::Relaxed);
        if let Some(ip) = self.peer_ips.remove(&token) {
            if let Some(limit) = &self.shared.per_ip {
                limit.close(ip);
            }
        }
        // Dropping the socket closes it, which also removes it from the epoll set.
        drop(conn);
    }

    fn is_dirty(&self) -> bool {
        let c = &self.counters;
        c.accepted != 0
            || c.received != 0
            || c.sent != 0
            || c.up_received != 0
            || c.up_sent != 0
            || c.pauses != 0
            || c.closed.iter().any(|&n| n != 0)
            || c.http.iter().any(|&n| n != 0)
            || c.active != self.published_active
            || c.buffered != self.published_buffered
    }

    fn publish(&mut self) {
        self.last_publish_ms = self.now_ms;
        if !self.is_dirty() {
            return;
        }
        self.published_active = self.counters.active;
        self.published_buffered = self.counters.buffered;
        self.metrics.publish(&mut self.counters);
    }
}

/// Sets the deadline of the connection `token` names.
fn conn_deadline(slab: &mut Slab, token: Token, deadline_ms: u64) {
    if let Some(conn) = slab.get_mut(token) {
        conn.deadline_ms = deadline_ms;
    }
}
