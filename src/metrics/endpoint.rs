//! The HTTP endpoint Prometheus and load balancers talk to: `/metrics`, `/healthz`,
//! `/readyz`.
//!
//! It runs on one thread of its own, never on a worker: a non-blocking, edge-triggered
//! epoll loop that answers one request per connection and closes it (scrapes are
//! seconds apart). Whatever the other clients of the port do, a scrape gets in and gets
//! its answer:
//!
//! - Each client has an absolute deadline, [`CLIENT_TIMEOUT`] after it was accepted, to
//!   send its request and take the response. One that sends a byte a second is cut at
//!   the same moment as one that sends nothing; one cut before its request is complete
//!   gets 408.
//! - At most [`MAX_CLIENTS`] are open. A connection that arrives with every slot taken
//!   closes the oldest client not owed a response (still sending its request, or
//!   already answered), the way nginx reuses idle keep-alive connections; only when
//!   every client is owed one does the oldest of those go. Accepts per loop turn are
//!   capped, so a newcomer has several turns to send its request before a burst of
//!   newer connections could push it out.
//! - A client holds at most its request head ([`MAX_REQUEST_BYTES`]) or its response.
//! - After the response the write side is shut and whatever else the client sent is
//!   read and dropped until it closes (a lingering close: closing with unread input
//!   would send a reset that can destroy the response in flight), within the deadline.
//! - When accept4 fails for want of descriptors, accepting pauses for
//!   [`ACCEPT_RETRY`] instead of spinning on a listener that stays readable.

mod clients;
mod routes;

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::Metrics;
use crate::shutdown::Lifecycle;
use crate::sys::epoll::{Epoll, Events, READ_INTEREST};
use crate::sys::eventfd::EventFd;
use crate::sys::socket;
use clients::Clients;
use routes::Routes;

/// Clients open at once. Far more than Prometheus servers and probes need, so idle or
/// slow connections are pushed out long before a scrape is at risk; yet a small share
/// of the descriptors (the limit is usually tens of thousands), and memory of at most
/// this many request heads or responses (4 KiB each for a one-worker scrape, ~1 KiB
/// more per worker).
pub const MAX_CLIENTS: usize = 512;
/// A client must send its request and take the response within this of being accepted.
/// A scrape on a working network takes milliseconds; this leaves a slow network room
/// while a slot held for nothing is given back soon.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head accepted; a scrape request is a few hundred bytes.
pub const MAX_REQUEST_BYTES: usize = 8192;
/// How soon accepting is retried after accept4 failed (EMFILE, ENFILE, ENOBUFS): the
/// connection stays queued and brings no new edge, and retrying at once would spin.
pub const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Accepts per loop turn: a burst needs MAX_CLIENTS / ACCEPT_BUDGET = 8 turns, each
/// reading every client whose request has arrived, before it can push out a newcomer.
const ACCEPT_BUDGET: usize = 64;
/// Listen backlog: a burst of connections waits in the queue for its turn, rather than
/// having its SYNs dropped and retried a second later (the kernel caps it at somaxconn).
const BACKLOG: u32 = MAX_CLIENTS as u32;
/// Events taken per `epoll_wait`.
const EVENTS: usize = 256;

/// Tokens of the two descriptors that are not clients. A client token's low 32 bits
/// are its slot, below MAX_CLIENTS, so these two can never collide with one.
const LISTENER: u64 = u64::MAX;
const STOP: u64 = u64::MAX - 1;

/// A running endpoint; stopped on drop.
pub struct Endpoint {
    addr: SocketAddr,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Endpoint {
    /// Binds `addr` as the endpoint's listener, with the endpoint's own backlog.
    pub fn bind(addr: SocketAddr) -> io::Result<OwnedFd> {
        socket::listen(addr, BACKLOG)
    }

    /// Serves `listener` (bound by [`Endpoint::bind`], or inherited) on a new thread.
    pub(crate) fn start(
        listener: OwnedFd,
        metrics: Arc<Metrics>,
        shared: Arc<Lifecycle>,
    ) -> io::Result<Endpoint> {
        let addr = socket::local_addr(listener.as_fd())?;
        let epoll = Epoll::new()?;
        let stop = EventFd::new()?;
        epoll.add(listener.as_fd(), LISTENER, READ_INTEREST)?;
        // The registration outlives this borrow: the loop only needs the event, and
        // `Endpoint` keeps the eventfd open until the thread has been joined.
        epoll.add(stop.as_fd(), STOP, READ_INTEREST)?;
        let server = Loop {
            addr,
            epoll,
            listener,
            routes: Routes::new(metrics, shared),
            clients: Clients::default(),
            scratch: vec![0; MAX_REQUEST_BYTES].into_boxed_slice(),
            // The listener may already have connections queued from before it was
            // registered: look once without waiting for an edge.
            backlog: true,
            paused_until: None,
        };
        let thread = std::thread::Builder::new()
            .name("edgepoll-metrics".into())
            .spawn(move || server.run())?;
        Ok(Endpoint {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// The bound address (the real port when port 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        let _ = self.stop.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The endpoint's event loop and everything it owns.
struct Loop {
    /// The bound address, for log lines.
    addr: SocketAddr,
    epoll: Epoll,
    listener: OwnedFd,
    routes: Routes,
    clients: Clients,
    /// One read buffer for every client; a client keeps only the bytes it sent.
    scratch: Box<[u8]>,
    /// Connections may be waiting in the accept queue: an edge arrived, or the last
    /// turn spent its budget before accept4 said EAGAIN.
    backlog: bool,
    /// Set after accept4 failed for want of resources; no accepting before then.
    paused_until: Option<Instant>,
}

impl Loop {
    fn run(mut self) {
        let mut events = Events::with_capacity(EVENTS);
        loop {
            let timeout = self.timeout(Instant::now());
            if let Err(e) = self.epoll.wait(&mut events, timeout) {
                tracing::error!("metrics endpoint {}: {e}; it stops", self.addr);
                return;
            }
            for event in events.iter() {
                match event.token {
                    STOP => return,
                    LISTENER => self.backlog = true,
                    // Readable, writable, hung up or failed: the client's next read or
                    // write finds out which, so every event just drives it on.
                    token => self.clients.advance(token, &mut self.scratch, &self.routes),
                }
            }
            let now = Instant::now();
            if self.paused_until.is_some_and(|t| t <= now) {
                self.paused_until = None;
            }
            if self.backlog && self.paused_until.is_none() {
                self.accept(now);
            }
            self.clients.expire(now);
        }
    }

    /// How long `epoll_wait` may sleep: until the next deadline or the end of an accept
    /// pause; not at all when accepting was cut short by its budget.
    fn timeout(&self, now: Instant) -> Option<Duration> {
        if self.backlog && self.paused_until.is_none() {
            return Some(Duration::ZERO);
        }
        let wake = match (self.clients.next_deadline(), self.paused_until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        wake.map(|t| t.saturating_duration_since(now))
    }

    /// Accepts up to [`ACCEPT_BUDGET`] connections, making room for each.
    fn accept(&mut self, now: Instant) {
        for _ in 0..ACCEPT_BUDGET {
            let fd = match socket::accept(self.listener.as_fd()) {
                Ok((fd, _)) => fd,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.backlog = false;
                    return;
                }
                // The connection died in the queue, or a firewall refused it: that
                // connection is lost, the listener is fine.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ECONNABORTED) | Some(libc::EPROTO) | Some(libc::EPERM)
                    ) =>
                {
                    continue
                }
                Err(e) => {
                    tracing::debug!(
                        "accept4 on metrics endpoint {}: {e}; retrying in {} ms",
                        self.addr,
                        ACCEPT_RETRY.as_millis()
                    );
                    self.paused_until = Some(now + ACCEPT_RETRY);
                    return;
                }
            };
            if self.clients.len() >= MAX_CLIENTS {
                self.clients.evict();
            }
            if let Err(e) = self.clients.insert(&self.epoll, fd, now + CLIENT_TIMEOUT) {
                tracing::debug!("metrics endpoint {}: {e}", self.addr);
            }
        }
    }
}
