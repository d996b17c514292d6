//! Starting and stopping a server: the acceptor, the workers and the metrics endpoint.
//!
//! This is the handle tests and the binary use: [`Server::start`] binds and spawns,
//! [`Server::local_addrs`] tells which ports were bound, [`Server::stats`] reads the
//! published counters, and [`Server::shutdown`] drains and joins.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::acceptor::{Acceptor, Listener};
use crate::access_log::AccessLog;
use crate::config::{Config, ConfigError, Mode};
use crate::conn::Token;
use crate::keepalive::PeerTimeouts;
use crate::limits::Limits;
use crate::metrics::endpoint::Endpoint;
use crate::metrics::{Metrics, WorkerStats};
use crate::mode::moved::Moved;
use crate::shutdown::Lifecycle;
use crate::sys::eventfd::EventFd;
use crate::sys::socket;
use crate::upstream::health::Prober;
use crate::upstream::resolve::Resolver;
use crate::upstream::Upstreams;
use crate::worker::{Msg, Waker, Worker, WorkerHandle, WorkerShared};
use crossbeam_channel::Sender;

/// A server that could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Bind(io::Error),
    #[error("metrics endpoint: {0}")]
    Metrics(io::Error),
    #[error("access log (--access-log): {0}")]
    AccessLog(io::Error),
    #[error("registering metrics: {0}")]
    Registry(#[from] prometheus::Error),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// The listening sockets a server serves: bound by [`Sockets::bind`] from the
/// configuration, or taken over from systemd (socket activation) or from the
/// process a reload replaces.
#[derive(Debug, Default)]
pub struct Sockets {
    /// The connection listeners, in the order the acceptor serves them.
    pub listeners: Vec<OwnedFd>,
    /// The metrics endpoint's listener, if the endpoint runs.
    pub metrics: Option<OwnedFd>,
}

impl Sockets {
    /// Binds every `config.listen` address and the metrics address.
    pub fn bind(config: &Config) -> Result<Sockets, StartError> {
        let mut sockets = Sockets::default();
        for &addr in &config.listen {
            let fd = socket::listen(addr, config.backlog).map_err(StartError::Bind)?;
            sockets.listeners.push(fd);
        }
        if let Some(addr) = config.metrics_listen {
            sockets.metrics = Some(Endpoint::bind(addr).map_err(StartError::Metrics)?);
        }
        Ok(sockets)
    }
}

/// The connections of a server being handed over (see [`Server::hand_over`]).
pub struct HandOver {
    /// Each connection, and one `None` per worker when it is done.
    pub rx: crossbeam_channel::Receiver<Option<Moved>>,
    /// Workers that will send their `None`.
    pub workers: usize,
}

/// A running server.
pub struct Server {
    config: Config,
    local_addrs: Vec<SocketAddr>,
    metrics: Arc<Metrics>,
    limits: Arc<Limits>,
    lifecycle: Arc<Lifecycle>,
    acceptor_wake: Option<Arc<EventFd>>,
    workers: Vec<WorkerHandle>,
    threads: Vec<JoinHandle<()>>,
    acceptor_thread: Option<JoinHandle<()>>,
    /// The acceptor says here that a reload's pause has begun.
    acceptor_paused: crossbeam_channel::Receiver<()>,
    endpoint: Option<Endpoint>,
    /// Second descriptors of the listeners (in `local_addrs` order) and of the
    /// metrics listener, for a reload to hand to the new process.
    /// Dropped when draining begins: a listener must close with the acceptor's
    /// descriptor, and a second one would keep it open.
    listener_dups: parking_lot::Mutex<Vec<OwnedFd>>,
    metrics_dup: Option<OwnedFd>,
    /// The worker that gets the next connection moved in by a reload.
    next_adopt: std::sync::atomic::AtomicUsize,
    /// Relay with `--health-check`: the thread that probes the upstreams.
    prober: Option<Prober>,
    /// Relay with upstream names and `--resolve-interval`: the thread that looks them
    /// up again and changes the set.
    resolver: Option<Resolver>,
    /// `--access-log`: the writer thread, stopped (after the workers, whose last
    /// records it writes) when the server is joined.
    access_log: Option<AccessLog>,
}

impl Server {
    /// Validates `config`, binds every listen address and the metrics endpoint, and
    /// starts the acceptor and the workers.
    pub fn start(config: Config) -> Result<Server, StartError> {
        config.validate()?;
        let sockets = Sockets::bind(&config)?;
        Server::start_with(config, sockets)
    }

    /// Starts a server on sockets already listening: `sockets.listeners` replace the
    /// addresses of `config.listen`, and `sockets.metrics` (if any) serves the
    /// endpoint, which is off without it.
    pub fn start_with(config: Config, sockets: Sockets) -> Result<Server, StartError> {
        config.validate()?;
        let clients = PeerTimeouts::clients(&config);
        let mut listeners = Vec::with_capacity(sockets.listeners.len());
        for fd in sockets.listeners {
            let addr = socket::adopt_listener(fd.as_fd()).map_err(StartError::Bind)?;
            // Accepted sockets inherit these (see `crate::keepalive`); a listener
            // handed over by a reload or by systemd gets this configuration's, off
            // values included.
            clients
                .apply(fd.as_fd())
                .map_err(|e| StartError::Bind(crate::sys::context(e, addr)))?;
            listeners.push(Listener { fd, addr });
        }
        let local_addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.addr).collect();
        let listener_dups = listeners
            .iter()
            .map(|l| l.fd.try_clone())
            .collect::<io::Result<Vec<_>>>()?;
        let metrics = Metrics::new(&config)?;
        let access_log = AccessLog::start(&config, &metrics).map_err(StartError::AccessLog)?;
        let shared = WorkerShared {
            limits: Limits::new(
                config.max_connections,
                config.max_connections_per_ip,
                config.max_buffered_bytes,
            ),
            lifecycle: Arc::new(Lifecycle::new()),
            upstreams: (config.mode == Mode::Relay)
                .then(|| Upstreams::new(&config, &metrics, &local_addrs)),
        };
        let (paused_tx, acceptor_paused) = crossbeam_channel::bounded(1);
        let mut server = Server {
            config: config.clone(),
            local_addrs,
            metrics: Arc::clone(&metrics),
            limits: Arc::clone(&shared.limits),
            lifecycle: Arc::clone(&shared.lifecycle),
            acceptor_wake: None,
            workers: Vec::new(),
            threads: Vec::new(),
            acceptor_thread: None,
            acceptor_paused,
            endpoint: None,
            listener_dups: parking_lot::Mutex::new(listener_dups),
            metrics_dup: None,
            next_adopt: std::sync::atomic::AtomicUsize::new(0),
            prober: None,
            resolver: None,
            access_log,
        };
        if let (Some(ups), Some(check)) = (&shared.upstreams, &config.relay.health_check) {
            server.prober = Some(Prober::start(Arc::clone(ups), check.clone())?);
        }
        if let Some(ups) = &shared.upstreams {
            server.resolver = Resolver::start(Arc::clone(ups), &config.relay, &metrics)?;
        }
        // On any error below, dropping `server` stops what has started.
        let cores = if config.pin_workers {
            core_affinity::get_core_ids()
        } else {
            None
        };
        if config.pin_workers && cores.as_ref().is_none_or(|c| c.is_empty()) {
            tracing::warn!("--pin-workers: the usable cores are unknown; workers are not pinned");
        }
        for id in 0..config.workers {
            let log = server
                .access_log
                .as_ref()
                .and_then(|l| l.worker(id, &config, &server.local_addrs));
            let (worker, handle) = Worker::new(id, &config, metrics.worker(id), &shared, log)?;
            let lifecycle = Arc::clone(&shared.lifecycle);
            server.workers.push(handle);
            let core = cores
                .as_ref()
                .filter(|c| !c.is_empty())
                .map(|c| c[id % c.len()]);
            let thread = std::thread::Builder::new()
                .name(format!("edgepoll-w{id}"))
                .spawn(move || {
                    if let Some(core) = core {
                        if !core_affinity::set_for_current(core) {
                            tracing::warn!(worker = id, "could not pin to core {}", core.id);
                        }
                    }
                    // A panic is a bug, never a peer's doing; it fails the server like
                    // an event-loop error does, so the process exits non-zero.
                    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| worker.run()));
                    let why = match outcome {
                        Ok(Ok(())) => return,
                        Ok(Err(e)) => format!("worker {id} stopped: {e}"),
                        Err(_) => format!("worker {id} panicked"),
                    };
                    tracing::error!(
                        "{why}; the server cannot serve its share of connections and must be restarted"
                    );
                    lifecycle.fail(why);
                })?;
            server.threads.push(thread);
        }
        if let Some(queue) = shared.upstreams.as_ref().and_then(|u| u.queue.as_ref()) {
            let workers: Vec<(Sender<Msg>, Arc<Waker>)> = server
                .workers
                .iter()
                .map(|w| (w.tx.clone(), Arc::clone(&w.waker)))
                .collect();
            queue.set_grant(Box::new(move |worker, token, lease, since| {
                if let Some((tx, waker)) = workers.get(worker) {
                    // A worker that has exited drops the message, and with it the
                    // lease, which frees the slot for the next waiter.
                    if tx.send(Msg::Granted(Token(token), lease, since)).is_ok() {
                        let _ = waker.notify();
                    }
                }
            }));
        }
        let handles = server
            .workers
            .iter()
            .map(|w| WorkerHandle {
                tx: w.tx.clone(),
                waker: Arc::clone(&w.waker),
            })
            .collect();
        let (acceptor, wake) = Acceptor::new(
            listeners,
            handles,
            Arc::clone(&shared.limits),
            Arc::clone(&shared.lifecycle),
            Arc::clone(&metrics),
            paused_tx,
            &config,
        )?;
        server.acceptor_wake = Some(wake);
        let thread = std::thread::Builder::new()
            .name("edgepoll-accept".into())
            .spawn(move || acceptor.run())?;
        server.acceptor_thread = Some(thread);
        if let Some(fd) = sockets.metrics {
            server.serve_metrics(fd)?;
        }
        Ok(server)
    }

    /// Starts the metrics endpoint on `listener`, if it does not run yet. A reload
    /// starts it only once the counters of the process it replaces have arrived, so
    /// that no scrape ever sees a counter go down.
    pub fn serve_metrics(&mut self, listener: OwnedFd) -> Result<(), StartError> {
        if self.endpoint.is_some() {
            return Ok(());
        }
        self.metrics_dup = Some(listener.try_clone()?);
        let endpoint = Endpoint::start(
            listener,
            Arc::clone(&self.metrics),
            Arc::clone(&self.lifecycle),
        )
        .map_err(StartError::Metrics)?;
        self.endpoint = Some(endpoint);
        Ok(())
    }

    /// The configuration the server runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The first bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addrs[0]
    }

    /// Every bound address, in `--listen` order, with the real ports.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// The bound address of the metrics endpoint, if it runs.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.endpoint.as_ref().map(|e| e.addr())
    }

    /// The registry and metric families.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Per-worker counters as last published (workers publish within
    /// [`crate::metrics::PUBLISH_INTERVAL`] of a change).
    pub fn stats(&self) -> Vec<WorkerStats> {
        self.metrics.worker_stats()
    }

    /// Bytes held in outbound buffers now, across workers.
    pub fn buffered_bytes(&self) -> i64 {
        self.limits.buffered()
    }

    /// Connections open now, across workers (exact, not published).
    pub fn open_connections(&self) -> usize {
        self.limits.open()
    }

    /// Whether draining has begun.
    pub fn is_draining(&self) -> bool {
        self.lifecycle.is_draining()
    }

    /// Why the server can no longer serve, if it cannot: a worker's event loop
    /// failed. The process should exit non-zero, so its supervisor restarts it.
    pub fn failure(&self) -> Option<String> {
        self.lifecycle.failure()
    }

    /// Makes worker `id` fail as if its `epoll_wait` had: fault injection for tests
    /// of [`Server::failure`] and of the binary's exit status.
    #[doc(hidden)]
    pub fn inject_worker_failure(&self, id: usize) {
        if let Some(w) = self.workers.get(id) {
            let _ = w.tx.send(Msg::Fail);
            let _ = w.waker.notify();
        }
    }

    /// Makes the acceptor leave new connections in the kernel's accept queue until
    /// the drain begins, as a process too busy to accept would: a test hook for what
    /// the drain does with a full backlog.
    #[doc(hidden)]
    pub fn hold_accepting(&self) {
        self.lifecycle.hold_accepting();
    }

    /// Tells load balancers to stop sending connections (`/readyz` answers 503) while
    /// connections are still accepted: the start of `--shutdown-delay`.
    pub fn set_unready(&self) {
        self.lifecycle.set_unready();
    }

    /// Starts a graceful drain with the configured `drain_timeout`: the connections
    /// already in the accept queues are accepted, then the listeners close;
    /// connections flush what they owe, then the workers exit. Idempotent.
    pub fn begin_drain(&self) {
        self.begin_drain_within(self.config.drain_timeout);
    }

    fn begin_drain_within(&self, timeout: Duration) {
        if !self.lifecycle.begin_drain(Instant::now() + timeout) {
            return;
        }
        self.listener_dups.lock().clear();
        match &self.acceptor_wake {
            Some(wake) => {
                if let Err(e) = wake.wake() {
                    tracing::error!("waking the acceptor: {e}");
                }
            }
            // No acceptor (start failed half-way): tell the workers directly.
            None => {
                for w in &self.workers {
                    let _ = w.tx.send(Msg::Drain(Instant::now() + timeout));
                    let _ = w.waker.notify();
                }
            }
        }
    }

    /// Whether every acceptor and worker thread has exited.
    pub fn is_finished(&self) -> bool {
        self.threads.iter().all(|t| t.is_finished())
            && self
                .acceptor_thread
                .as_ref()
                .is_none_or(|t| t.is_finished())
    }

    /// New descriptors of the listening sockets (in [`Server::local_addrs`] order;
    /// none once draining has begun) and of the metrics listener, for a reload to
    /// hand to the process that replaces this one.
    pub fn listeners(&self) -> io::Result<(Vec<OwnedFd>, Option<OwnedFd>)> {
        let listeners = self
            .listener_dups
            .lock()
            .iter()
            .map(|fd| fd.try_clone())
            .collect::<io::Result<Vec<_>>>()?;
        let metrics = self
            .metrics_dup
            .as_ref()
            .map(|fd| fd.try_clone())
            .transpose()?;
        Ok((listeners, metrics))
    }

    /// Stops accepting and takes every connection out of the workers, for a reload.
    /// Listener i's accept queue is emptied into the workers first when
    /// `drain_listener[i]` is true (the new process did not take it); the others are
    /// left to the new process. Each connection then arrives on the returned channel,
    /// and one `None` per worker says that worker is done. The workers and the paused
    /// acceptor stay: [`Server::finish_hand_over`] ends them once the new process has
    /// everything, [`Server::resume`] serves on if it failed.
    pub fn hand_over(&self, drain_listener: Vec<bool>) -> HandOver {
        self.lifecycle.begin_handover(drain_listener);
        self.wake_acceptor();
        // What the acceptor took from the queues is in the workers' channels, ahead
        // of the export below. The acceptor answers within one loop turn; the bound
        // only keeps a dead acceptor thread from hanging the reload.
        if self
            .acceptor_paused
            .recv_timeout(Duration::from_secs(5))
            .is_err()
        {
            tracing::error!("the acceptor did not pause for the hand-over");
        }
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut workers = 0;
        for w in &self.workers {
            if w.tx.send(Msg::Export(tx.clone())).is_ok() {
                workers += 1;
                let _ = w.waker.notify();
            }
        }
        HandOver { rx, workers }
    }

    /// The new process has every connection: the acceptor closes this process's
    /// descriptors of the listeners (without accepting from them again), the empty
    /// workers exit, and the endpoint stops.
    pub fn finish_hand_over(self) {
        self.begin_drain_within(Duration::ZERO);
        self.join();
    }

    /// Sets this server's `--tcp-keepalive` and `--tcp-user-timeout` on its listeners
    /// again: a reload that failed after the new process started may have left that
    /// process's on them (the listeners are shared).
    pub fn restore_listener_options(&self) {
        let clients = PeerTimeouts::clients(&self.config);
        for (fd, addr) in self.listener_dups.lock().iter().zip(&self.local_addrs) {
            if let Err(e) = clients.apply(fd.as_fd()) {
                tracing::error!("{addr}: {e}");
            }
        }
    }

    /// The hand-over failed: `unsent` connections (taken out of the workers but never
    /// sent) come back, and the acceptor accepts again.
    pub fn resume(&self, unsent: Vec<Moved>) {
        // Before the acceptor takes the queues again (see `Acceptor::pause`).
        self.restore_listener_options();
        for moved in unsent {
            self.give_to_worker(moved);
        }
        self.lifecycle.end_handover();
        self.wake_acceptor();
    }

    fn wake_acceptor(&self) {
        if let Some(wake) = &self.acceptor_wake {
            if let Err(e) = wake.wake() {
                tracing::error!("waking the acceptor: {e}");
            }
        }
    }

    /// Gives a connection that a reload moved here to the next worker.
    pub fn adopt(&self, mut moved: Moved) {
        // Its record counts from its arrival here (the process it left counted the
        // rest), even when that process is this one's test twin.
        moved.log = None;
        if self.give_to_worker(moved) {
            self.metrics.reload.moved.inc();
        }
    }

    fn give_to_worker(&self, moved: Moved) -> bool {
        let n = self.workers.len();
        let mut msg = Msg::Adopt(moved);
        for _ in 0..n {
            let i = self
                .next_adopt
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                % n;
            match self.workers[i].tx.send(msg) {
                Ok(()) => {
                    let _ = self.workers[i].waker.notify();
                    return true;
                }
                Err(returned) => msg = returned.into_inner(),
            }
        }
        tracing::error!("no worker left to take a connection that moved here");
        false
    }

    /// Waits for the acceptor and workers to exit (after [`Server::begin_drain`]), then
    /// stops the metrics endpoint.
    pub fn join(mut self) {
        self.join_threads();
    }

    /// Drains with the configured timeout and waits for the end.
    pub fn shutdown(self) {
        self.begin_drain();
        self.join();
    }

    fn join_threads(&mut self) {
        for t in self
            .acceptor_thread
            .take()
            .into_iter()
            .chain(self.threads.drain(..))
        {
            if t.join().is_err() {
                tracing::error!("a server thread panicked");
            }
        }
        // The workers have written their last records; the writer writes them out.
        self.access_log = None;
        self.endpoint = None;
    }

    /// Reopens the access log file (SIGUSR1, after logrotate renamed it): every record
    /// of a connection closed before the call is in the old file when this returns,
    /// and each later one is in exactly one of the two.
    /// False if there is no file to reopen or it could not be opened (the old one
    /// stays in use, and the log says why).
    pub fn reopen_access_log(&self) -> bool {
        self.access_log.as_ref().is_some_and(|l| l.reopen())
    }
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("mode", &self.config.mode)
            .field("local_addrs", &self.local_addrs)
            .field("open_connections", &self.open_connections())
            .finish_non_exhaustive()
    }
}

impl Drop for Server {
    /// A server dropped without `shutdown` stops at once: open connections are closed.
    fn drop(&mut self) {
        if !self.threads.is_empty() || self.acceptor_thread.is_some() {
            self.begin_drain_within(Duration::ZERO);
            self.join_threads();
        }
    }
}
