//! Prometheus metrics: the registry, per-worker counters, and publishing.
//!
//! Workers never touch a shared atomic per read or write. Each counts in a plain
//! [`Counters`] struct and calls [`WorkerMetrics::publish`] at most once per loop turn
//! (in practice every [`PUBLISH_INTERVAL`], and before it goes to sleep), which adds the
//! deltas to label children that were looked up once at start-up.

pub mod carry;
pub mod endpoint;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus::core::Collector;
use prometheus::local::LocalHistogram;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::config::{Config, Mode};

/// Seconds since the Unix epoch, for timestamp gauges.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// How often a busy worker publishes its counters. A worker about to sleep publishes
/// at once, so an idle server's counters are exact.
pub const PUBLISH_INTERVAL: Duration = Duration::from_millis(100);

/// Number of [`CloseReason`]s.
pub const CLOSE_REASONS: usize = 10;

/// Why a connection was closed; the `reason` label of `edgepoll_connections_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer closed cleanly and was owed nothing more.
    Eof,
    /// The peer reset the connection (ECONNRESET, EPIPE, ECONNABORTED, or ENOTCONN
    /// from a shutdown after the reset).
    Reset,
    /// Any other socket error.
    Error,
    /// No traffic for `--idle-timeout`.
    IdleTimeout,
    /// Closed by the server's drain.
    Shutdown,
    /// An HTTP request head was not complete within `--header-timeout` (408 sent).
    HeaderTimeout,
    /// The peer broke the protocol (an HTTP error response was sent, then the close).
    ProtocolError,
    /// Relay: no upstream could be connected for this client.
    UpstreamError,
    /// Relay: every upstream was at `--max-conns-per-upstream` and the queue was full.
    QueueFull,
    /// Relay: no upstream slot freed within `--queue-timeout`.
    QueueTimeout,
}

impl CloseReason {
    pub const ALL: [CloseReason; CLOSE_REASONS] = [
        CloseReason::Eof,
        CloseReason::Reset,
        CloseReason::Error,
        CloseReason::IdleTimeout,
        CloseReason::Shutdown,
        CloseReason::HeaderTimeout,
        CloseReason::ProtocolError,
        CloseReason::UpstreamError,
        CloseReason::QueueFull,
        CloseReason::QueueTimeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Eof => "eof",
            CloseReason::Reset => "reset",
            CloseReason::Error => "error",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::Shutdown => "shutdown",
            CloseReason::HeaderTimeout => "header_timeout",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::UpstreamError => "upstream_error",
            CloseReason::QueueFull => "queue_full",
            CloseReason::QueueTimeout => "queue_timeout",
        }
    }

    /// Classifies a read, write or shutdown error. By kind rather than errno, so that
    /// errors that carry context (and so no raw errno) classify the same. ENOTCONN is
    /// what shutdown(2) says once the peer has reset the connection.
    pub fn of_error(err: &std::io::Error) -> CloseReason {
        use std::io::ErrorKind;
        match err.kind() {
            ErrorKind::ConnectionReset
            | ErrorKind::BrokenPipe
            | ErrorKind::ConnectionAborted
            | ErrorKind::NotConnected => CloseReason::Reset,
            _ => CloseReason::Error,
        }
    }
}

/// Why the acceptor (or, for what a PROXY header says, the worker before any mode saw
/// the connection) turned a connection away; the `reason` label of
/// `edgepoll_connections_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// `--max-connections` were already open.
    MaxConnections,
    /// The process or system ran out of file descriptors.
    FdLimit,
    /// The connection could not be set up (registration failed).
    Error,
    /// `--max-connections-per-ip` were already open from that address (with
    /// `--accept-proxy`, the address its PROXY header named).
    PerIpLimit,
    /// `--accept-proxy`: a source outside `--trusted-proxy`, or a PROXY header that
    /// was malformed, missing, or not complete by `--proxy-header-timeout`.
    ProxyHeader,
}

impl RejectReason {
    pub const ALL: [RejectReason; 5] = [
        RejectReason::MaxConnections,
        RejectReason::FdLimit,
        RejectReason::Error,
        RejectReason::PerIpLimit,
        RejectReason::ProxyHeader,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::MaxConnections => "max_connections",
            RejectReason::FdLimit => "fd_limit",
            RejectReason::Error => "error",
            RejectReason::PerIpLimit => "per_ip_limit",
            RejectReason::ProxyHeader => "proxy_header",
        }
    }
}

/// Connection-duration buckets, from a millisecond (a health check) to four hours (a
/// long-lived relay).
const DURATION_BUCKETS: [f64; 16] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0,
    14400.0,
];

/// Upstream connect-time buckets, from 100 µs (loopback) to 10 s.
const CONNECT_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Why an upstream connect failed; the `reason` label of
/// `edgepoll_upstream_connect_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectError {
    /// The upstream answered with a reset (nothing listens there).
    Refused,
    /// No answer within `--connect-timeout`.
    Timeout,
    /// No route to the host or network.
    Unreachable,
    /// Anything else (out of descriptors, out of ephemeral ports, ...).
    Error,
}

impl ConnectError {
    pub const ALL: [ConnectError; 4] = [
        ConnectError::Refused,
        ConnectError::Timeout,
        ConnectError::Unreachable,
        ConnectError::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ConnectError::Refused => "refused",
            ConnectError::Timeout => "timeout",
            ConnectError::Unreachable => "unreachable",
            ConnectError::Error => "error",
        }
    }

    /// Classifies a failed connect.
    pub fn of(err: &std::io::Error) -> ConnectError {
        use std::io::ErrorKind;
        match err.kind() {
            ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset => ConnectError::Refused,
            ErrorKind::TimedOut => ConnectError::Timeout,
            ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => ConnectError::Unreachable,
            _ => ConnectError::Error,
        }
    }
}

/// The handles relay mode keeps for one upstream. Updated once per connection, never
/// per byte.
#[derive(Clone)]
pub struct UpstreamMetrics {
    pub errors: [IntCounter; 4],
    pub connect: Histogram,
    pub active: IntGauge,
    /// 1 while the upstream is taking new clients, 0 while marked down.
    pub up: IntGauge,
    /// Health-check probes, in the order of [`CheckResult::ALL`].
    pub checks: [IntCounter; 5],
}

/// How one active health-check probe ended (`edgepoll_upstream_health_checks_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckResult {
    /// Connected (and, with `send-expect`, the expected bytes came back).
    Passed,
    /// The connect was refused or failed.
    ConnectError,
    /// No connect, or not the expected answer, within `--health-check-timeout`.
    Timeout,
    /// The upstream closed (or reset) before the expected bytes came back.
    Closed,
    /// The upstream answered something other than the expected bytes.
    Mismatch,
}

impl CheckResult {
    pub const ALL: [CheckResult; 5] = [
        CheckResult::Passed,
        CheckResult::ConnectError,
        CheckResult::Timeout,
        CheckResult::Closed,
        CheckResult::Mismatch,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CheckResult::Passed => "passed",
            CheckResult::ConnectError => "connect_error",
            CheckResult::Timeout => "timeout",
            CheckResult::Closed => "closed",
            CheckResult::Mismatch => "mismatch",
        }
    }
}

/// How one lookup of an upstream name ended (`edgepoll_upstream_resolutions_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolveResult {
    /// At least one address.
    Ok,
    /// The lookup failed (or the hosts file could not be read).
    Failed,
    /// The lookup succeeded with no address.
    Empty,
}

impl ResolveResult {
    pub const ALL: [ResolveResult; 3] = [
        ResolveResult::Ok,
        ResolveResult::Failed,
        ResolveResult::Empty,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ResolveResult::Ok => "ok",
            ResolveResult::Failed => "failed",
            ResolveResult::Empty => "empty",
        }
    }
}

/// How a name's addresses changed (`edgepoll_upstream_address_changes_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressChange {
    Added,
    Removed,
}

impl AddressChange {
    pub const ALL: [AddressChange; 2] = [AddressChange::Added, AddressChange::Removed];

    pub fn as_str(self) -> &'static str {
        match self {
            AddressChange::Added => "added",
            AddressChange::Removed => "removed",
        }
    }
}

/// The handles the resolver keeps for one upstream name.
pub struct NameMetrics {
    /// Lookups, in the order of [`ResolveResult::ALL`].
    pub resolutions: [IntCounter; 3],
    /// Addresses that came and went, in the order of [`AddressChange::ALL`].
    pub changes: [IntCounter; 2],
}

/// The statuses http mode can answer with, in the order of `Counters::http`: the
/// configured one, then the error responses.
pub fn http_statuses(configured: u16) -> [u16; 6] {
    [configured, 400, 405, 408, 431, 505]
}

/// Index of each error status in [`http_statuses`].
pub mod http_index {
    pub const OK: usize = 0;
    pub const BAD_REQUEST: usize = 1;
    pub const METHOD_NOT_ALLOWED: usize = 2;
    pub const REQUEST_TIMEOUT: usize = 3;
    pub const HEADERS_TOO_LARGE: usize = 4;
    pub const VERSION_NOT_SUPPORTED: usize = 5;
}

/// The registry and every metric family of one server.
pub struct Metrics {
    http_requests: IntCounterVec,
    /// The statuses of `Counters::http`, in http mode; empty otherwise.
    http_statuses: Vec<u16>,
    registry: Registry,
    accepted: IntCounterVec,
    closed: IntCounterVec,
    aborted: IntCounterVec,
    dropped: IntCounterVec,
    active: IntGaugeVec,
    rejected: IntCounterVec,
    received: IntCounterVec,
    sent: IntCounterVec,
    pauses: IntCounterVec,
    buffered: IntGaugeVec,
    duration: Histogram,
    /// Relay mode only (registered then): bytes to and from upstreams, per worker.
    up_received: IntCounterVec,
    up_sent: IntCounterVec,
    /// Relay mode only: PROXY protocol header bytes sent to upstreams, per worker.
    proxy_header: IntCounterVec,
    /// Relay mode only: per-upstream connect errors, connect time, open connections.
    upstream_errors: IntCounterVec,
    upstream_connect: HistogramVec,
    upstream_active: IntGaugeVec,
    upstream_up: IntGaugeVec,
    upstream_checks: IntCounterVec,
    queue_length: IntGauge,
    queue_wait: Histogram,
    /// Relay mode only: lookups of upstream names and the addresses they changed.
    upstream_resolutions: IntCounterVec,
    upstream_changes: IntCounterVec,
    /// Access log records by `result`: `written` by the writer thread, `dropped` by a
    /// worker whose buffer was full or by the writer when a write failed.
    access_log: IntCounterVec,
    /// Largest outbound buffer any one connection of worker i has held (library stats
    /// only: it shows that the cap holds).
    peak_pending: Vec<AtomicUsize>,
    /// Entries in worker i's timer wheel as last published (library stats only: it
    /// shows that entries do not pile up).
    timer_entries: Vec<AtomicUsize>,
    /// Reloads, as Prometheus names its own configuration reload metrics.
    pub reload: ReloadMetrics,
    /// Counters of the processes this one replaced, added at every scrape.
    carried: parking_lot::Mutex<Vec<prometheus::proto::MetricFamily>>,
}

/// What reloads did: kept by the process that reloads (a failure) or that a reload
/// started (a success).
pub struct ReloadMetrics {
    /// 1 while the last reload succeeded (or none was tried), 0 after a failure.
    pub last_successful: IntGauge,
    /// Reloads by `result`: `success` or `failure`.
    pub total: IntCounterVec,
    /// Unix time of the start of this process, or of the last successful reload.
    pub last_success_timestamp: prometheus::Gauge,
    /// Established connections received from the process a reload replaced.
    pub moved: IntCounter,
}

impl Metrics {
    /// Creates the registry for a server running `config`.
    pub fn new(config: &Config) -> prometheus::Result<Arc<Metrics>> {
        let (workers, mode) = (config.workers, config.mode);
        let registry = Registry::new();
        let http_requests = IntCounterVec::new(
            Opts::new(
                "edgepoll_http_requests_total",
                "HTTP requests answered, by response status.",
            ),
            &["worker", "status"],
        )?;
        let http_statuses: Vec<u16> = if mode == Mode::Http {
            registry.register(Box::new(http_requests.clone()))?;
            http_statuses(config.http.status).to_vec()
        } else {
            Vec::new()
        };
        let up_received = IntCounterVec::new(
            Opts::new(
                "edgepoll_upstream_received_bytes_total",
                "Relay: bytes read from upstreams (the upstream-to-client direction).",
            ),
            &["worker"],
        )?;
        let up_sent = IntCounterVec::new(
            Opts::new(
                "edgepoll_upstream_sent_bytes_total",
                "Relay: bytes written to upstreams (the client-to-upstream direction).",
            ),
            &["worker"],
        )?;
        let proxy_header = IntCounterVec::new(
            Opts::new(
                "edgepoll_upstream_proxy_header_bytes_total",
                "Relay: PROXY protocol v2 header bytes written to upstreams \
                 (not part of edgepoll_upstream_sent_bytes_total).",
            ),
            &["worker"],
        )?;
        let upstream_errors = IntCounterVec::new(
            Opts::new(
                "edgepoll_upstream_connect_errors_total",
                "Relay: upstream connects that failed, by upstream and reason.",
            ),
            &["upstream", "reason"],
        )?;
        let upstream_connect = HistogramVec::new(
            HistogramOpts::new(
                "edgepoll_upstream_connect_duration_seconds",
                "Relay: time from the start of an upstream connect to its success.",
            )
            .buckets(CONNECT_BUCKETS.to_vec()),
            &["upstream"],
        )?;
        let upstream_active = IntGaugeVec::new(
            Opts::new(
                "edgepoll_upstream_connections_active",
                "Relay: upstream connections open or connecting now.",
            ),
            &["upstream"],
        )?;
        let upstream_up = IntGaugeVec::new(
            Opts::new(
                "edgepoll_upstream_up",
                "Relay: 1 while the upstream takes new clients, 0 while it is marked down \
                 (by health checks, or by a failed connect).",
            ),
            &["upstream"],
        )?;
        let upstream_checks = IntCounterVec::new(
            Opts::new(
                "edgepoll_upstream_health_checks_total",
                "Relay: active health-check probes, by upstream and result.",
            ),
            &["upstream", "result"],
        )?;
        let queue_length = IntGauge::new(
            "edgepoll_upstream_queue_length",
            "Relay: clients waiting for an upstream slot (--max-conns-per-upstream).",
        )?;
        let queue_wait = Histogram::with_opts(
            HistogramOpts::new(
                "edgepoll_upstream_queue_wait_seconds",
                "Relay: how long each client that got an upstream slot waited for it.",
            )
            .buckets(CONNECT_BUCKETS.to_vec()),
        )?;
        let upstream_resolutions = IntCounterVec::new(
            Opts::new(
                "edgepoll_upstream_resolutions_total",
                "Relay: lookups of upstream names (every --resolve-interval), by name and \
                 result.",
            ),
            &["name", "result"],
        )?;
        let upstream_changes = IntCounterVec::new(
            Opts::new(
                "edgepoll_upstream_address_changes_total",
                "Relay: addresses that appeared in or vanished from an upstream name's \
                 lookups.",
            ),
            &["name", "change"],
        )?;
        if mode == Mode::Relay {
            let relay: Vec<Box<dyn Collector>> = vec![
                Box::new(queue_length.clone()),
                Box::new(queue_wait.clone()),
                Box::new(upstream_up.clone()),
                Box::new(upstream_checks.clone()),
                Box::new(upstream_resolutions.clone()),
                Box::new(upstream_changes.clone()),
                Box::new(up_received.clone()),
                Box::new(up_sent.clone()),
                Box::new(proxy_header.clone()),
                Box::new(upstream_errors.clone()),
                Box::new(upstream_connect.clone()),
                Box::new(upstream_active.clone()),
            ];
            for c in relay {
                registry.register(c)?;
            }
        }
        let accepted = IntCounterVec::new(
            Opts::new(
                "edgepoll_connections_accepted_total",
                "Connections handed to a worker.",
            ),
            &["worker"],
        )?;
        let closed = IntCounterVec::new(
            Opts::new(
                "edgepoll_connections_closed_total",
                "Connections closed, by reason.",
            ),
            &["worker", "reason"],
        )?;
        let aborted = IntCounterVec::new(
            Opts::new(
                "edgepoll_connections_aborted_total",
                "Connections closed with a reset because bytes owed to a peer would \
                 otherwise be lost, by close reason (a subset of the closed total).",
            ),
            &["worker", "reason"],
        )?;
        let dropped = IntCounterVec::new(
            Opts::new(
                "edgepoll_dropped_bytes_total",
                "Bytes received or produced for a peer and never delivered, because \
                 the connection was aborted, by close reason.",
            ),
            &["worker", "reason"],
        )?;
        let active = IntGaugeVec::new(
            Opts::new("edgepoll_connections_active", "Connections open now."),
            &["worker"],
        )?;
        let rejected = IntCounterVec::new(
            Opts::new(
                "edgepoll_connections_rejected_total",
                "Connections accepted and closed at once, by reason.",
            ),
            &["reason"],
        )?;
        let received = IntCounterVec::new(
            Opts::new("edgepoll_received_bytes_total", "Bytes read from clients."),
            &["worker"],
        )?;
        let sent = IntCounterVec::new(
            Opts::new("edgepoll_sent_bytes_total", "Bytes written to clients."),
            &["worker"],
        )?;
        let pauses = IntCounterVec::new(
            Opts::new(
                "edgepoll_backpressure_pauses_total",
                "Times reading from a connection paused because its outbound buffer was full.",
            ),
            &["worker"],
        )?;
        let buffered = IntGaugeVec::new(
            Opts::new(
                "edgepoll_outbound_buffered_bytes",
                "Bytes held in outbound buffers, owed to peers that have not read them yet.",
            ),
            &["worker"],
        )?;
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "edgepoll_connection_duration_seconds",
                "Lifetime of closed connections.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new(
                "edgepoll_build_info",
                "Version and mode of the running server; always 1.",
            ),
            &["version", "mode"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), mode.name()])
            .set(1);

        let collectors: Vec<Box<dyn Collector>> = vec![
            Box::new(accepted.clone()),
            Box::new(closed.clone()),
            Box::new(aborted.clone()),
            Box::new(dropped.clone()),
            Box::new(active.clone()),
            Box::new(rejected.clone()),
            Box::new(received.clone()),
            Box::new(sent.clone()),
            Box::new(pauses.clone()),
            Box::new(buffered.clone()),
            Box::new(duration.clone()),
            Box::new(build_info),
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        ];
        for c in collectors {
            registry.register(c)?;
        }
        // Create every labelled child now, so a scrape shows zeros rather than nothing
        // before the first connection, and workers never look labels up later.
        for w in 0..workers {
            let w = w.to_string();
            accepted.with_label_values(&[&w]);
            active.with_label_values(&[&w]);
            received.with_label_values(&[&w]);
            sent.with_label_values(&[&w]);
            pauses.with_label_values(&[&w]);
            buffered.with_label_values(&[&w]);
            up_received.with_label_values(&[&w]);
            up_sent.with_label_values(&[&w]);
            proxy_header.with_label_values(&[&w]);
            for reason in CloseReason::ALL {
                closed.with_label_values(&[&w, reason.as_str()]);
                aborted.with_label_values(&[&w, reason.as_str()]);
                dropped.with_label_values(&[&w, reason.as_str()]);
            }
            for status in &http_statuses {
                http_requests.with_label_values(&[&w, &status.to_string()]);
            }
        }
        for reason in RejectReason::ALL {
            rejected.with_label_values(&[reason.as_str()]);
        }
        let access_log = IntCounterVec::new(
            Opts::new(
                "edgepoll_access_log_records_total",
                "Access log records (--access-log), by result: written, or dropped \
                 because the writer could not keep up or the write failed.",
            ),
            &["result"],
        )?;
        registry.register(Box::new(access_log.clone()))?;
        for result in AccessLogResult::ALL {
            access_log.with_label_values(&[result.as_str()]);
        }
        let peak_pending = (0..workers).map(|_| AtomicUsize::new(0)).collect();
        let timer_entries = (0..workers).map(|_| AtomicUsize::new(0)).collect();
        let reload = ReloadMetrics {
            last_successful: IntGauge::new(
                "edgepoll_config_last_reload_successful",
                "Whether the last reload (SIGHUP) succeeded: 1, or 0 after a failed one.",
            )?,
            total: IntCounterVec::new(
                Opts::new(
                    "edgepoll_config_reloads_total",
                    "Reloads (SIGHUP), by result: success or failure.",
                ),
                &["result"],
            )?,
            last_success_timestamp: prometheus::Gauge::new(
                "edgepoll_config_last_reload_success_timestamp_seconds",
                "Unix time of the last successful reload, or of the start.",
            )?,
            moved: IntCounter::new(
                "edgepoll_reload_connections_moved_total",
                "Established connections received from the process a reload replaced.",
            )?,
        };
        registry.register(Box::new(reload.last_successful.clone()))?;
        registry.register(Box::new(reload.total.clone()))?;
        registry.register(Box::new(reload.last_success_timestamp.clone()))?;
        registry.register(Box::new(reload.moved.clone()))?;
        for result in ["success", "failure"] {
            reload.total.with_label_values(&[result]);
        }
        reload.last_successful.set(1);
        reload.last_success_timestamp.set(unix_now());
        Ok(Arc::new(Metrics {
            reload,
            carried: parking_lot::Mutex::new(Vec::new()),
            http_requests,
            http_statuses,
            registry,
            accepted,
            closed,
            aborted,
            dropped,
            active,
            rejected,
            received,
            sent,
            pauses,
            buffered,
            duration,
            up_received,
            up_sent,
            proxy_header,
            upstream_errors,
            upstream_connect,
            upstream_active,
            upstream_up,
            upstream_checks,
            queue_length,
            queue_wait,
            upstream_resolutions,
            upstream_changes,
            access_log,
            peak_pending,
            timer_entries,
        }))
    }

    /// The registry, for callers that add their own collectors.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The text exposition format of everything registered.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8192);
        // Encoding to a Vec cannot fail on I/O; a failure would be a metric family
        // without samples, which this registry never produces.
        if let Err(e) = TextEncoder::new().encode(&self.families(), &mut out) {
            tracing::error!("encoding metrics: {e}");
        }
        out
    }

    /// Every metric family as exported: this process's, plus the counters carried
    /// from the processes it replaced.
    pub fn families(&self) -> Vec<prometheus::proto::MetricFamily> {
        let mut families = self.registry.gather();
        carry::merge(&mut families, &self.carried.lock());
        families
    }

    /// Adds the counters of the process a reload replaced (see [`carry`]).
    pub fn carry(&self, families: Vec<prometheus::proto::MetricFamily>) {
        let mut carried = self.carried.lock();
        carry::merge(&mut carried, &families);
    }

    /// The handles worker `id` publishes to, looked up once.
    pub fn worker(self: &Arc<Self>, id: usize) -> WorkerMetrics {
        let w = id.to_string();
        WorkerMetrics {
            id,
            accepted: self.accepted.with_label_values(&[&w]),
            closed: CloseReason::ALL.map(|r| self.closed.with_label_values(&[&w, r.as_str()])),
            aborted: CloseReason::ALL.map(|r| self.aborted.with_label_values(&[&w, r.as_str()])),
            dropped: CloseReason::ALL.map(|r| self.dropped.with_label_values(&[&w, r.as_str()])),
            active: self.active.with_label_values(&[&w]),
            received: self.received.with_label_values(&[&w]),
            sent: self.sent.with_label_values(&[&w]),
            pauses: self.pauses.with_label_values(&[&w]),
            buffered: self.buffered.with_label_values(&[&w]),
            duration: self.duration.local(),
            up_received: self.up_received.with_label_values(&[&w]),
            up_sent: self.up_sent.with_label_values(&[&w]),
            proxy_header: self.proxy_header.with_label_values(&[&w]),
            http: self
                .http_statuses
                .iter()
                .map(|s| self.http_requests.with_label_values(&[&w, &s.to_string()]))
                .collect(),
            log_dropped: self.access_log(AccessLogResult::Dropped),
            metrics: Arc::clone(self),
        }
    }

    /// HTTP requests worker `worker` answered with `status`, as last published.
    pub fn http_requests(&self, worker: usize, status: u16) -> u64 {
        if !self.http_statuses.contains(&status) {
            return 0;
        }
        self.http_requests
            .with_label_values(&[&worker.to_string(), &status.to_string()])
            .get()
    }

    /// The handles relay mode updates for the upstream labelled `upstream`, with every
    /// error reason created at zero.
    pub fn upstream(&self, upstream: &str) -> UpstreamMetrics {
        UpstreamMetrics {
            errors: ConnectError::ALL.map(|r| {
                self.upstream_errors
                    .with_label_values(&[upstream, r.as_str()])
            }),
            connect: self.upstream_connect.with_label_values(&[upstream]),
            active: self.upstream_active.with_label_values(&[upstream]),
            up: self.upstream_up.with_label_values(&[upstream]),
            checks: CheckResult::ALL.map(|r| {
                self.upstream_checks
                    .with_label_values(&[upstream, r.as_str()])
            }),
        }
    }

    /// The queue's length gauge and wait histogram.
    pub fn upstream_queue(&self) -> (IntGauge, Histogram) {
        (self.queue_length.clone(), self.queue_wait.clone())
    }

    /// Clients waiting for an upstream slot now.
    pub fn queue_length(&self) -> i64 {
        self.queue_length.get()
    }

    /// Clients that got a slot after waiting (the wait histogram's count).
    pub fn queue_waits(&self) -> u64 {
        self.queue_wait.get_sample_count()
    }

    /// The handles the resolver updates for the upstream name `name` (`db.svc:6379`),
    /// with every result and change created at zero.
    pub fn name(&self, name: &str) -> NameMetrics {
        NameMetrics {
            resolutions: ResolveResult::ALL.map(|r| {
                self.upstream_resolutions
                    .with_label_values(&[name, r.as_str()])
            }),
            changes: AddressChange::ALL
                .map(|c| self.upstream_changes.with_label_values(&[name, c.as_str()])),
        }
    }

    /// Lookups of the upstream name `name` that ended with `result` so far.
    pub fn upstream_resolutions(&self, name: &str, result: ResolveResult) -> u64 {
        self.upstream_resolutions
            .with_label_values(&[name, result.as_str()])
            .get()
    }

    /// Addresses that `change`d in the lookups of the upstream name `name` so far.
    pub fn upstream_address_changes(&self, name: &str, change: AddressChange) -> u64 {
        self.upstream_changes
            .with_label_values(&[name, change.as_str()])
            .get()
    }

    /// Whether `upstream` takes new clients now (`edgepoll_upstream_up`).
    pub fn upstream_up(&self, upstream: &str) -> i64 {
        self.upstream_up.with_label_values(&[upstream]).get()
    }

    /// Health-check probes of `upstream` that ended with `result` so far.
    pub fn upstream_checks(&self, upstream: &str, result: CheckResult) -> u64 {
        self.upstream_checks
            .with_label_values(&[upstream, result.as_str()])
            .get()
    }

    /// Failed connects to `upstream` for `reason` so far.
    pub fn upstream_connect_errors(&self, upstream: &str, reason: ConnectError) -> u64 {
        self.upstream_errors
            .with_label_values(&[upstream, reason.as_str()])
            .get()
    }

    /// Connections to `upstream` open or connecting now.
    pub fn upstream_active(&self, upstream: &str) -> i64 {
        self.upstream_active.with_label_values(&[upstream]).get()
    }

    /// Successful connects to `upstream` so far (the histogram's count).
    pub fn upstream_connects(&self, upstream: &str) -> u64 {
        self.upstream_connect
            .with_label_values(&[upstream])
            .get_sample_count()
    }

    /// Counts a rejected connection (the acceptor, or a worker refusing a PROXY
    /// header; once per connection, not per byte).
    pub fn reject(&self, reason: RejectReason) {
        self.rejected.with_label_values(&[reason.as_str()]).inc();
    }

    /// Per-worker figures as last published.
    pub fn worker_stats(&self) -> Vec<WorkerStats> {
        (0..self.peak_pending.len())
            .map(|id| {
                let w = id.to_string();
                WorkerStats {
                    accepted: self.accepted.with_label_values(&[&w]).get(),
                    closed: CloseReason::ALL
                        .map(|r| self.closed.with_label_values(&[&w, r.as_str()]).get()),
                    aborted: CloseReason::ALL
                        .map(|r| self.aborted.with_label_values(&[&w, r.as_str()]).get()),
                    dropped_bytes: CloseReason::ALL
                        .map(|r| self.dropped.with_label_values(&[&w, r.as_str()]).get()),
                    active: self.active.with_label_values(&[&w]).get(),
                    received_bytes: self.received.with_label_values(&[&w]).get(),
                    sent_bytes: self.sent.with_label_values(&[&w]).get(),
                    backpressure_pauses: self.pauses.with_label_values(&[&w]).get(),
                    buffered_bytes: self.buffered.with_label_values(&[&w]).get(),
                    upstream_received_bytes: self.up_received.with_label_values(&[&w]).get(),
                    upstream_sent_bytes: self.up_sent.with_label_values(&[&w]).get(),
                    upstream_proxy_header_bytes: self.proxy_header.with_label_values(&[&w]).get(),
                    peak_pending_bytes: self.peak_pending[id].load(Ordering::Relaxed),
                    timer_entries: self.timer_entries[id].load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// Rejections so far, by reason.
    pub fn rejected(&self, reason: RejectReason) -> u64 {
        self.rejected.with_label_values(&[reason.as_str()]).get()
    }

    /// The counter of access log records with `result`.
    pub fn access_log(&self, result: AccessLogResult) -> IntCounter {
        self.access_log.with_label_values(&[result.as_str()])
    }

    /// Access log records so far with `result` (dropped ones as last published).
    pub fn access_log_records(&self, result: AccessLogResult) -> u64 {
        self.access_log(result).get()
    }
}

/// What became of an access log record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLogResult {
    Written,
    Dropped,
}

impl AccessLogResult {
    pub const ALL: [AccessLogResult; 2] = [AccessLogResult::Written, AccessLogResult::Dropped];

    pub fn as_str(self) -> &'static str {
        match self {
            AccessLogResult::Written => "written",
            AccessLogResult::Dropped => "dropped",
        }
    }
}

/// What one worker has published. `closed` is indexed like [`CloseReason::ALL`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerStats {
    pub accepted: u64,
    pub closed: [u64; CLOSE_REASONS],
    /// Closes that were resets because bytes were owed (a subset of `closed`).
    pub aborted: [u64; CLOSE_REASONS],
    /// Bytes those resets dropped.
    pub dropped_bytes: [u64; CLOSE_REASONS],
    pub active: i64,
    pub received_bytes: u64,
    pub sent_bytes: u64,
    pub backpressure_pauses: u64,
    pub buffered_bytes: i64,
    /// Relay: bytes read from and written to upstreams.
    pub upstream_received_bytes: u64,
    pub upstream_sent_bytes: u64,
    /// Relay: PROXY v2 header bytes sent, apart from the relayed bytes.
    pub upstream_proxy_header_bytes: u64,
    pub peak_pending_bytes: usize,
    /// Entries in the worker's timer wheel: at most one per open connection.
    pub timer_entries: usize,
}

impl WorkerStats {
    pub fn closed_for(&self, reason: CloseReason) -> u64 {
        self.closed[reason as usize]
    }

    pub fn closed_total(&self) -> u64 {
        self.closed.iter().sum()
    }

    pub fn aborted_for(&self, reason: CloseReason) -> u64 {
        self.aborted[reason as usize]
    }

    pub fn dropped_for(&self, reason: CloseReason) -> u64 {
        self.dropped_bytes[reason as usize]
    }
}

/// A worker's unpublished counts: plain integers, touched on the hot path.
#[derive(Debug, Default)]
pub struct Counters {
    pub accepted: u64,
    pub closed: [u64; CLOSE_REASONS],
    /// Closes that were resets because bytes were owed, by reason.
    pub aborted: [u64; CLOSE_REASONS],
    /// Bytes those resets dropped, by reason.
    pub dropped: [u64; CLOSE_REASONS],
    pub received: u64,
    pub sent: u64,
    /// Relay: bytes read from and written to upstreams.
    pub up_received: u64,
    pub up_sent: u64,
    /// Relay: PROXY header bytes written to upstreams.
    pub proxy_header: u64,
    pub pauses: u64,
    /// Connections open now (a level, not a delta).
    pub active: i64,
    /// Outbound bytes held now (a level, kept by the worker at publish time).
    pub buffered: i64,
    /// Largest outbound buffer seen (a level).
    pub peak_pending: usize,
    /// Entries in the worker's timer wheel (a level, set at publish time).
    pub timer_entries: usize,
    /// HTTP responses by status, indexed like [`http_statuses`].
    pub http: [u64; 6],
    /// Access log records this worker could not hand to the writer (its buffer full).
    pub log_dropped: u64,
    /// Room left under `--max-buffered-bytes` as this worker sees it: refreshed from
    /// the shared total every loop turn, then kept exact for this worker's own changes.
    /// Not published.
    pub global_room: i64,
}

/// The label children one worker publishes to.
pub struct WorkerMetrics {
    id: usize,
    accepted: IntCounter,
    closed: [IntCounter; CLOSE_REASONS],
    aborted: [IntCounter; CLOSE_REASONS],
    dropped: [IntCounter; CLOSE_REASONS],
    active: IntGauge,
    received: IntCounter,
    sent: IntCounter,
    pauses: IntCounter,
    buffered: IntGauge,
    /// Buffers observations locally; `flush` adds them to the shared histogram.
    duration: LocalHistogram,
    up_received: IntCounter,
    up_sent: IntCounter,
    proxy_header: IntCounter,
    /// HTTP requests by status (http mode only), indexed like [`http_statuses`].
    http: Vec<IntCounter>,
    log_dropped: IntCounter,
    metrics: Arc<Metrics>,
}

impl WorkerMetrics {
    /// Counts a connection the worker could not take on.
    pub fn reject(&self, reason: RejectReason) {
        self.metrics.reject(reason);
    }

    /// Records the lifetime of a closed connection (buffered until `publish`).
    pub fn observe_duration(&mut self, seconds: f64) {
        self.duration.observe(seconds);
    }

    /// Adds the deltas in `c` to the registry, zeroes them, and sets the gauges.
    pub fn publish(&mut self, c: &mut Counters) {
        fn add(counter: &IntCounter, delta: &mut u64) {
            if *delta != 0 {
                counter.inc_by(*delta);
                *delta = 0;
            }
        }
        // Bytes before connections, and closes last, so that a reader who sees a close
        // also sees the bytes that connection moved.
        add(&self.received, &mut c.received);
        add(&self.sent, &mut c.sent);
        add(&self.up_received, &mut c.up_received);
        add(&self.up_sent, &mut c.up_sent);
        add(&self.proxy_header, &mut c.proxy_header);
        add(&self.pauses, &mut c.pauses);
        add(&self.log_dropped, &mut c.log_dropped);
        for (counter, delta) in self.http.iter().zip(c.http.iter_mut()) {
            add(counter, delta);
        }
        self.buffered.set(c.buffered);
        self.metrics.peak_pending[self.id].fetch_max(c.peak_pending, Ordering::Relaxed);
        self.metrics.timer_entries[self.id].store(c.timer_entries, Ordering::Relaxed);
        self.duration.flush();
        add(&self.accepted, &mut c.accepted);
        self.active.set(c.active);
        // Aborts and their dropped bytes before the closes they are part of.
        for (counter, delta) in self.dropped.iter().zip(c.dropped.iter_mut()) {
            add(counter, delta);
        }
        for (counter, delta) in self.aborted.iter().zip(c.aborted.iter_mut()) {
            add(counter, delta);
        }
        for (counter, delta) in self.closed.iter().zip(c.closed.iter_mut()) {
            add(counter, delta);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[test]
    fn resets_classify_as_reset_even_with_context_attached() {
        let raw = io::Error::from_raw_os_error(libc::ECONNRESET);
        assert_eq!(CloseReason::of_error(&raw), CloseReason::Reset);
        // sys::context keeps the kind but not the errno.
        let wrapped = crate::sys::context(
            io::Error::from_raw_os_error(libc::ENOTCONN),
            "shutdown SHUT_WR fd 7",
        );
        assert_eq!(wrapped.raw_os_error(), None);
        assert_eq!(CloseReason::of_error(&wrapped), CloseReason::Reset);
        let pipe = io::Error::from_raw_os_error(libc::EPIPE);
        assert_eq!(CloseReason::of_error(&pipe), CloseReason::Reset);
        let other = io::Error::from_raw_os_error(libc::EIO);
        assert_eq!(CloseReason::of_error(&other), CloseReason::Error);
    }
}
