//! Starting and stopping a server: the acceptor, the workers and the metrics endpoint.
//!
//! This is the handle tests and the binary use: [`Server::start`] binds and spawns,
//! [`Server::local_addrs`] tells which ports were bound, [`Server::stats`] reads the
//! published counters, and [`Server::shutdown`] drains and joins.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::acceptor::{Acceptor, Listener};
use crate::config::{Config, ConfigError};
use crate::metrics::endpoint::Endpoint;
use crate::metrics::{Metrics, WorkerStats};
use crate::sys::eventfd::EventFd;
use crate::sys::socket;
use crate::worker::{Msg, Worker, WorkerHandle};

/// State every thread of a server reads.
pub(crate) struct Shared {
    /// Connections handed to workers and not yet closed, for `--max-connections`.
    /// Touched once per connection, never per byte.
    pub open: AtomicUsize,
    /// Set when draining begins; `/readyz` answers 503 from then on.
    pub draining: AtomicBool,
    /// Open connections per client address, with `--max-connections-per-ip`.
    pub per_ip: Option<PerIpLimit>,
    /// Bytes in all outbound buffers; written by a worker only when one of its buffers
    /// grows or shrinks (the slow path), read once per loop turn.
    pub buffered: AtomicI64,
    /// `--max-buffered-bytes`.
    pub max_buffered: i64,
    /// Relay mode: the upstreams and their failure marks, shared by the workers.
    pub upstreams: Option<Arc<crate::mode::relay::Upstreams>>,
    deadline: Mutex<Option<Instant>>,
}

/// Open connections per client IP. The acceptor counts a connection in, its worker
/// counts it out: a lock taken twice per connection, never per byte.
pub(crate) struct PerIpLimit {
    limit: u32,
    open: Mutex<HashMap<IpAddr, u32>>,
}

impl PerIpLimit {
    /// Counts a new connection from `ip`, unless `ip` is at its limit.
    pub(crate) fn try_open(&self, ip: IpAddr) -> bool {
        let mut open = self.open.lock();
        let n = open.entry(ip).or_insert(0);
        if *n >= self.limit {
            return false;
        }
        *n += 1;
        true
    }

    /// Counts a connection from `ip` as closed.
    pub(crate) fn close(&self, ip: IpAddr) {
        let mut open = self.open.lock();
        if let Some(n) = open.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                // Forget the address, so the map holds only clients with connections.
                open.remove(&ip);
            }
        }
    }
}

impl Shared {
    pub(crate) fn drain_deadline(&self) -> Option<Instant> {
        *self.deadline.lock()
    }
}

/// A server that could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Bind(io::Error),
    #[error("metrics endpoint: {0}")]
    Metrics(io::Error),
    #[error("registering metrics: {0}")]
    Registry(#[from] prometheus::Error),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// A running server.
pub struct Server {
    config: Config,
    local_addrs: Vec<SocketAddr>,
    metrics: Arc<Metrics>,
    shared: Arc<Shared>,
    acceptor_wake: Option<Arc<EventFd>>,
    workers: Vec<WorkerHandle>,
    threads: Vec<JoinHandle<()>>,
    endpoint: Option<Endpoint>,
}

impl Server {
    /// Validates `config`, binds every listen address and the metrics endpoint, and
    /// starts the acceptor and the workers.
    pub fn start(config: Config) -> Result<Server, StartError> {
        config.validate()?;
        let mut listeners = Vec::with_capacity(config.listen.len());
        for &addr in &config.listen {
            let fd = socket::listen(addr, config.backlog).map_err(StartError::Bind)?;
            let addr = socket::local_addr(fd.as_fd()).map_err(StartError::Bind)?;
            listeners.push(Listener { fd, addr });
        }
        let local_addrs = listeners.iter().map(|l| l.addr).collect();
        let metrics = Metrics::new(&config)?;
        let shared = Arc::new(Shared {
            open: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            buffered: AtomicI64::new(0),
            max_buffered: config.max_buffered_bytes.min(i64::MAX as usize) as i64,
            per_ip: config.max_connections_per_ip.map(|limit| PerIpLimit {
                limit: limit.min(u32::MAX as usize) as u32,
                open: Mutex::new(HashMap::new()),
            }),
            deadline: Mutex::new(None),
            upstreams: (config.mode == crate::config::Mode::Relay)
                .then(|| Arc::new(crate::mode::relay::Upstreams::new(&config.relay, &metrics))),
        });
        let mut server = Server {
            config: config.clone(),
            local_addrs,
            metrics: Arc::clone(&metrics),
            shared: Arc::clone(&shared),
            acceptor_wake: None,
            workers: Vec::new(),
            threads: Vec::new(),
            endpoint: None,
        };
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
            let (worker, handle) =
                Worker::new(id, &config, metrics.worker(id), Arc::clone(&shared))?;
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
                    worker.run()
                })?;
            server.threads.push(thread);
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
            config.max_connections,
            Arc::clone(&shared),
            Arc::clone(&metrics),
        )?;
        server.acceptor_wake = Some(wake);
        let thread = std::thread::Builder::new()
            .name("edgepoll-accept".into())
            .spawn(move || acceptor.run())?;
        server.threads.push(thread);
        if let Some(addr) = config.metrics_listen {
            let endpoint = Endpoint::start(addr, Arc::clone(&metrics), Arc::clone(&shared))
                .map_err(StartError::Metrics)?;
            server.endpoint = Some(endpoint);
        }
        Ok(server)
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
        self.shared.buffered.load(Ordering::Relaxed)
    }

    /// Connections open now, across workers (exact, not published).
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::Relaxed)
    }

    /// Whether draining has begun.
    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::SeqCst)
    }

    /// Starts a graceful drain with the configured `drain_timeout`: the listeners close
    /// at once, connections flush what they owe, then the workers exit. Idempotent.
    pub fn begin_drain(&self) {
        self.begin_drain_within(self.config.drain_timeout);
    }

    fn begin_drain_within(&self, timeout: Duration) {
        {
            let mut deadline = self.shared.deadline.lock();
            if deadline.is_some() {
                return;
            }
            *deadline = Some(Instant::now() + timeout);
        }
        self.shared.draining.store(true, Ordering::SeqCst);
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
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("a server thread panicked");
            }
        }
        self.endpoint = None;
    }
}

impl Drop for Server {
    /// A server dropped without `shutdown` stops at once: open connections are closed.
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.begin_drain_within(Duration::ZERO);
            self.join_threads();
        }
    }
}
