//! The acceptor: one thread that owns the listening sockets, accepts connections and
//! hands them to the workers round-robin.
//!
//! # Running out of descriptors
//!
//! When accept4 fails with EMFILE or ENFILE the connection stays in the accept queue,
//! the listener stays readable, and a naive loop spins. The acceptor instead keeps one
//! spare descriptor open (on /dev/null): it closes the spare, accepts the waiting
//! connection, closes it at once (counted as `fd_limit`), and reopens the spare, so
//! the client learns immediately and the queue drains. If the spare cannot be reopened,
//! the acceptor stops accepting for [`EXHAUSTED_PAUSE`] and tries again. Workers keep
//! serving their connections throughout; the episode is logged once when it begins and
//! once when it ends.

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::access_log::Origin;
use crate::config::{Cidr, Config};
use crate::keepalive::PeerTimeouts;
use crate::limits::Limits;
use crate::metrics::{Metrics, RejectReason};
use crate::shutdown::Lifecycle;
use crate::sys::epoll::{Epoll, Events, READ_INTEREST};
use crate::sys::eventfd::EventFd;
use crate::sys::socket;
use crate::worker::{Msg, WorkerHandle};

/// How long accepting stops when descriptors are exhausted and no spare is left, or
/// when the kernel is short of memory (ENOBUFS, ENOMEM).
pub const EXHAUSTED_PAUSE: Duration = Duration::from_millis(100);

/// Token of the acceptor's wake-up eventfd; listener i has token i.
const WAKE: u64 = u64::MAX;

/// A bound, listening socket.
pub(crate) struct Listener {
    pub fd: OwnedFd,
    pub addr: SocketAddr,
}

pub(crate) struct Acceptor {
    epoll: Epoll,
    listeners: Vec<Listener>,
    wake: Arc<EventFd>,
    workers: Vec<WorkerHandle>,
    /// Index of the worker that gets the next connection.
    next: usize,
    /// The spare descriptor given up to shed a connection when descriptors run out.
    reserve: Option<OwnedFd>,
    limits: Arc<Limits>,
    lifecycle: Arc<Lifecycle>,
    metrics: Arc<Metrics>,
    /// Connections shed in the current fd-exhaustion episode; None outside one.
    exhausted: Option<u64>,
    /// Accepting is paused until then.
    paused_until: Option<Instant>,
    /// Told once a reload's pause has begun (see [`Acceptor::pause`]).
    paused: crossbeam_channel::Sender<()>,
    /// `--backlog`, for a listener that listens again after an abandoned reload.
    backlog: u32,
    /// With `--accept-proxy`, the `--trusted-proxy` ranges: a connection from
    /// anywhere else is closed at once, and one from inside them is counted per
    /// address only once its PROXY header names its client (see `mode::proxy::accept`).
    trusted: Option<Vec<Cidr>>,
    /// `--tcp-keepalive` and `--tcp-user-timeout` of client sockets, which they
    /// inherit from the listener (see `crate::keepalive`).
    clients: PeerTimeouts,
    /// Per listener: its queue may still hold connections whose handshake completed
    /// before the listener had this configuration's options (at start, where a
    /// reload or systemd handed it over, and after a reload that failed); those get
    /// the options one by one. Cleared once the queue has been seen empty.
    predating: Vec<bool>,
}

impl Acceptor {
    pub(crate) fn new(
        listeners: Vec<Listener>,
        workers: Vec<WorkerHandle>,
        limits: Arc<Limits>,
        lifecycle: Arc<Lifecycle>,
        metrics: Arc<Metrics>,
        paused: crossbeam_channel::Sender<()>,
        config: &Config,
    ) -> io::Result<(Acceptor, Arc<EventFd>)> {
        let epoll = Epoll::new()?;
        let wake = Arc::new(EventFd::new()?);
        epoll.add(wake.as_fd(), WAKE, READ_INTEREST)?;
        for (i, l) in listeners.iter().enumerate() {
            epoll.add(l.fd.as_fd(), i as u64, READ_INTEREST)?;
        }
        let predating = vec![true; listeners.len()];
        let acceptor = Acceptor {
            epoll,
            listeners,
            wake: Arc::clone(&wake),
            workers,
            next: 0,
            reserve: open_reserve().ok(),
            limits,
            lifecycle,
            metrics,
            exhausted: None,
            paused_until: None,
            paused,
            backlog: config.backlog,
            trusted: config.accept_proxy.then(|| config.trusted_proxies.clone()),
            clients: PeerTimeouts::clients(config),
            predating,
        };
        Ok((acceptor, wake))
    }

    /// Accepts until the server starts draining, then closes the listeners and tells
    /// every worker to drain. A reload pauses it meanwhile (see [`Acceptor::pause`]).
    pub(crate) fn run(mut self) {
        let mut events = Events::with_capacity(self.listeners.len() + 1);
        // Connections may have queued between listen(2) and the first edge we can see.
        for i in 0..self.listeners.len() {
            self.accept_all(i);
        }
        loop {
            self.serve(&mut events);
            if self.lifecycle.is_draining() {
                break;
            }
            if let Some(drain) = self.lifecycle.handover() {
                if !self.pause(&drain, &mut events) {
                    return; // handed over: the new process serves the listeners
                }
                // The reload failed: accept again, from whatever queued meanwhile,
                // some of it under the new process's options.
                self.predating.fill(true);
                for i in 0..self.listeners.len() {
                    self.accept_all(i);
                }
            }
        }
        let _ = self.wake.drain();
        // Connections the kernel completed and queued are clients that already sent
        // their SYN, and often their data: closing the listener would reset them. They
        // are accepted and served like any open connection (draining), and only then
        // is the listener closed. A SYN that arrives between this last accept and the
        // close is still reset by the kernel; `--shutdown-delay` exists so that load
        // balancers stop sending before that moment.
        self.paused_until = None;
        for i in 0..self.listeners.len() {
            self.accept_all(i);
        }
        let addrs: Vec<String> = self.listeners.iter().map(|l| l.addr.to_string()).collect();
        // Closing the listeners makes new connection attempts fail at once (RST).
        self.listeners.clear();
        tracing::info!("stopped listening on {}", addrs.join(", "));
        self.drain_workers();
    }

    /// Accepts until draining or a hand-over begins.
    fn serve(&mut self, events: &mut Events) {
        while !self.lifecycle.is_draining() && self.lifecycle.handover().is_none() {
            let timeout = self
                .paused_until
                .map(|t| t.saturating_duration_since(Instant::now()));
            if let Err(e) = self.epoll.wait(events, timeout) {
                tracing::error!("acceptor: {e}");
                std::thread::sleep(EXHAUSTED_PAUSE);
                continue;
            }
            if self.lifecycle.is_draining() || self.lifecycle.handover().is_some() {
                return;
            }
            if let Some(until) = self.paused_until {
                if Instant::now() < until {
                    continue;
                }
                // Edges that came during the pause were consumed: try every listener.
                self.paused_until = None;
                for i in 0..self.listeners.len() {
                    self.accept_all(i);
                }
                continue;
            }
            for event in events.iter() {
                if event.token != WAKE && (event.token as usize) < self.listeners.len() {
                    self.accept_all(event.token as usize);
                }
            }
        }
    }

    /// A reload: stops accepting while the connections move. The queue of a listener
    /// the new process did not take (its address left the configuration) is emptied
    /// first, so those connections move with the others; a listener it took is shared
    /// with it, and its queue is the new process's to serve. Returns false once the
    /// hand-over is done (the listeners are closed: this process's descriptors only;
    /// the new process's keep the shared ones open), true if it was abandoned and
    /// accepting must go on.
    fn pause(&mut self, drain: &[bool], events: &mut Events) -> bool {
        self.paused_until = None;
        let mut stopped = Vec::new();
        for i in 0..self.listeners.len() {
            if drain.get(i).copied().unwrap_or(true) {
                self.accept_all(i);
                // From here a new client of this address is refused at once, never
                // accepted by the kernel into a queue nobody will serve.
                match socket::stop_listening(self.listeners[i].fd.as_fd()) {
                    Ok(()) => stopped.push(i),
                    Err(e) => tracing::warn!("{}: {e}", self.listeners[i].addr),
                }
            }
        }
        // Everything accepted above is in the workers' channels before this says so.
        let _ = self.paused.send(());
        loop {
            let _ = self.wake.drain();
            if self.lifecycle.handover().is_none() {
                for &i in &stopped {
                    if let Err(e) = socket::relisten(self.listeners[i].fd.as_fd(), self.backlog) {
                        tracing::error!("{}: {e}", self.listeners[i].addr);
                    }
                }
                return true;
            }
            if self.lifecycle.is_draining() {
                // The hand-over is complete: accepting anything now would take a
                // connection from the new process only to drop it.
                let addrs: Vec<String> = (0..self.listeners.len())
                    .filter(|&i| drain.get(i).copied().unwrap_or(true))
                    .map(|i| self.listeners[i].addr.to_string())
                    .collect();
                if !addrs.is_empty() {
                    tracing::info!("stopped listening on {}", addrs.join(", "));
                }
                self.listeners.clear();
                self.drain_workers();
                return false;
            }
            // Listener edges are ignored meanwhile; the wake-up says when to look.
            if let Err(e) = self.epoll.wait(events, None) {
                tracing::error!("acceptor: {e}");
                std::thread::sleep(EXHAUSTED_PAUSE);
            }
        }
    }

    fn drain_workers(&self) {
        let deadline = self.lifecycle.drain_deadline().unwrap_or_else(Instant::now);
        for worker in &self.workers {
            let _ = worker.tx.send(Msg::Drain(deadline));
            let _ = worker.waker.notify();
        }
    }

    /// Accepts from listener `i` until its queue is empty (its edge is spent).
    fn accept_all(&mut self, i: usize) {
        if self.lifecycle.accepting_held() {
            return;
        }
        loop {
            match socket::accept(self.listeners[i].fd.as_fd()) {
                Ok((fd, peer)) => {
                    if let Some(shed) = self.exhausted.take() {
                        tracing::info!(
                            "descriptors available again on {}; {shed} connections were shed",
                            self.listeners[i].addr
                        );
                        if self.reserve.is_none() {
                            self.reserve = open_reserve().ok();
                        }
                    }
                    if self.predating[i] {
                        // A peer that already reset makes this fail; the worker will
                        // see the reset.
                        let _ = self.clients.apply(fd.as_fd());
                    }
                    let listen = self.listeners[i].addr;
                    self.hand_off(fd, peer, listen);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.predating[i] = false;
                    return;
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)) => {
                    if !self.shed(i, &e) {
                        return;
                    }
                }
                // The connection died in the queue, or a firewall refused it: that
                // connection is lost, the listener is fine.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ECONNABORTED) | Some(libc::EPROTO) | Some(libc::EPERM)
                    ) => {}
                Err(e) => {
                    tracing::warn!(
                        "accept4 on {}: {e}; pausing {} ms",
                        self.listeners[i].addr,
                        EXHAUSTED_PAUSE.as_millis()
                    );
                    self.paused_until = Some(Instant::now() + EXHAUSTED_PAUSE);
                    return;
                }
            }
        }
    }

    /// Sheds one queued connection using the spare descriptor. Returns whether the
    /// caller should keep accepting.
    fn shed(&mut self, i: usize, err: &io::Error) -> bool {
        let addr = self.listeners[i].addr;
        if self.exhausted.is_none() {
            tracing::warn!(
                "accept4 on {addr}: {err}; shedding new connections until descriptors free up"
            );
            self.exhausted = Some(0);
        }
        let Some(reserve) = self.reserve.take() else {
            self.reserve = open_reserve().ok();
            if self.reserve.is_none() {
                self.paused_until = Some(Instant::now() + EXHAUSTED_PAUSE);
                return false;
            }
            return true;
        };
        drop(reserve);
        let shed = match socket::accept(self.listeners[i].fd.as_fd()) {
            Ok((fd, _)) => {
                // Counted before the close, so a client that sees the close also finds
                // it counted. Closing at once tells the client now, not at its timeout.
                self.metrics.reject(RejectReason::FdLimit);
                drop(fd);
                if let Some(n) = self.exhausted.as_mut() {
                    *n += 1;
                }
                true
            }
            Err(_) => false,
        };
        self.reserve = open_reserve().ok();
        if self.reserve.is_none() {
            // Someone else took the descriptor we freed: back off rather than spin.
            self.paused_until = Some(Instant::now() + EXHAUSTED_PAUSE);
            return false;
        }
        shed
    }

    /// Gives a new connection to the next worker, or closes it over a limit.
    fn hand_off(&mut self, fd: OwnedFd, peer: SocketAddr, listen: SocketAddr) {
        let acquired = match &self.trusted {
            None => self.limits.try_acquire(peer.ip()),
            Some(trusted) if trusted.iter().any(|t| t.contains(peer.ip())) => {
                self.limits.try_acquire_unattributed()
            }
            Some(_) => {
                // Only a trusted proxy may say who the client is: anyone else could
                // name any address. Counted before the close, as below.
                tracing::debug!(%peer, "not a --trusted-proxy; closing");
                self.metrics.reject(RejectReason::ProxyHeader);
                drop(fd);
                return;
            }
        };
        let permit = match acquired {
            Ok(permit) => permit,
            Err(reason) => {
                // Counted before the close, as in `shed`.
                self.metrics.reject(reason);
                drop(fd);
                return;
            }
        };
        // A peer that already reset makes this fail; the worker will see the reset.
        let _ = socket::set_nodelay(fd.as_fd());
        let origin = Origin {
            peer: Some(peer),
            listen: Some(listen),
        };
        let mut msg = Msg::Conn(fd, permit, origin);
        // A worker whose loop died has dropped its channel: the next one gets the
        // connection (the server is stopping by then; see `Lifecycle::fail`).
        for _ in 0..self.workers.len() {
            let worker = &self.workers[self.next % self.workers.len()];
            self.next = self.next.wrapping_add(1);
            match worker.tx.send(msg) {
                Ok(()) => {
                    if let Err(e) = worker.waker.notify() {
                        tracing::error!("waking a worker: {e}");
                    }
                    return;
                }
                Err(returned) => msg = returned.into_inner(),
            }
        }
        // No worker is left. Dropping the message closes the socket and gives the
        // permit back.
        self.metrics.reject(RejectReason::Error);
    }
}

fn open_reserve() -> io::Result<OwnedFd> {
    Ok(OwnedFd::from(File::open("/dev/null")?))
}
