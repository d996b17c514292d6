//! The validated configuration that the command line builds and tests construct.
//!
//! - `parse`: the value parsers flags and file keys share (sizes, durations,
//!   addresses, headers).
//! - [`settings`]: what one source (the flags, a file) sets, the merge of flags over
//!   file, and [`load`], which applies the result over the defaults and validates it.
//! - [`file`](mod@file): the TOML configuration file (`--config FILE`).
//! - `cidr`: address ranges (`--trusted-proxy`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

mod cidr;
pub mod file;
mod logging;
mod parse;
pub mod settings;

pub use cidr::{parse_cidr, Cidr};
pub use logging::{
    parse_log_format, parse_log_target, parse_sample, AccessLogConfig, LogFormat, LogTarget,
};
pub use parse::{
    parse_duration, parse_escaped, parse_header, parse_keepalive, parse_listen,
    parse_metrics_listen, parse_resolve_interval, parse_size, parse_upstream, parse_user_timeout,
    HostPort,
};
pub use settings::{load, Body, LoadError, Loaded, Settings};

/// What the server does with the bytes of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every byte back to its sender, in order.
    Echo,
    /// A fixed HTTP/1.1 response to every request, keep-alive and pipelining.
    Http,
    /// A TCP proxy: each client connection is relayed to one of the upstreams.
    Relay,
}

impl Mode {
    /// The name used on the command line, in logs and in `edgepoll_build_info`.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Echo => "echo",
            Mode::Http => "http",
            Mode::Relay => "relay",
        }
    }

    /// The mode `name` names, as the subcommand and the `mode` key spell it.
    pub fn from_name(name: &str) -> Option<Mode> {
        [Mode::Echo, Mode::Http, Mode::Relay]
            .into_iter()
            .find(|m| m.name() == name)
    }

    /// The listen address a mode uses when none is given.
    pub fn default_listen(self) -> SocketAddr {
        match self {
            Mode::Echo => SocketAddr::from(([127, 0, 0, 1], 7000)),
            Mode::Http => SocketAddr::from(([127, 0, 0, 1], 8080)),
            Mode::Relay => SocketAddr::from(([127, 0, 0, 1], 7001)),
        }
    }
}

/// Default accept backlog; the kernel caps it at net.core.somaxconn.
pub const DEFAULT_BACKLOG: u32 = 4096;
/// Default connection limit across all workers.
pub const DEFAULT_MAX_CONNECTIONS: usize = 100_000;
/// Default outbound cap per connection: enough to absorb a burst several times the
/// socket send buffer, small enough that 10,000 stalled readers hold at most 2.5 GiB.
pub const DEFAULT_MAX_PENDING_BYTES: usize = 256 * 1024;
/// Default idle timeout of relay mode (echo and http have none).
pub const DEFAULT_RELAY_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Default time open connections get to flush on SIGTERM.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a connection gets to send its whole PROXY header (`--accept-proxy`):
/// the protocol's own advice is "at least 3 seconds to cover a TCP retransmit", and a
/// proxy sends the header in its first segment, so 5 s is slack for a loaded proxy
/// while a silent or dribbling peer holds its descriptor for little longer.
pub const DEFAULT_PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Keepalive on relay's upstream sockets unless `--tcp-keepalive` says otherwise: an
/// upstream host that dies or is cut off without a FIN or reset would otherwise hold
/// its pair until `--idle-timeout` (10 minutes), and a firewall or NAT between relay
/// and upstream that forgets idle flows (AWS NLB after 350 s, conntrack) would cut a
/// quiet pool connection silently. Probes after 60 s of silence, every 10 s, 6
/// unanswered: a dead upstream is found within 2 minutes, and a live one costs one
/// small packet a minute each way. Client sockets keep the kernel's default (off):
/// clients are many, often behind links that charge per packet, and the idle timeout
/// bounds them.
pub const DEFAULT_UPSTREAM_KEEPALIVE: Keepalive = Keepalive {
    idle: Duration::from_secs(60),
    interval: Duration::from_secs(10),
    count: 6,
};

/// Default `--resolve-interval`: Kubernetes headless Services and DNS records with
/// short TTLs change within a minute; a lookup every 30 s costs the resolver nothing.
pub const DEFAULT_RESOLVE_INTERVAL: Duration = Duration::from_secs(30);
/// Default address of the Prometheus endpoint.
pub const DEFAULT_METRICS_LISTEN: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    9464,
));

/// Everything a running server needs to know. Build it with [`Config::new`] and adjust
/// the public fields; [`Config::validate`] runs when the server starts.
#[derive(Debug, Clone)]
pub struct Config {
    /// What to do with the bytes.
    pub mode: Mode,
    /// Addresses to listen on; port 0 picks a free port (see `Server::local_addrs`).
    pub listen: Vec<SocketAddr>,
    /// Number of worker threads, each with its own epoll instance.
    pub workers: usize,
    /// Pin worker i to core i (modulo the cores the process may use).
    pub pin_workers: bool,
    /// Accept queue length passed to listen(2).
    pub backlog: u32,
    /// Connections beyond this many open ones are accepted and closed at once.
    pub max_connections: usize,
    /// Connections from one client IP beyond this many are accepted and closed at
    /// once; None: no per-address limit.
    pub max_connections_per_ip: Option<usize>,
    /// Outbound bytes a connection may hold before the server stops reading from it.
    pub max_pending_bytes: usize,
    /// Outbound bytes all connections together may hold; past it, connections that
    /// hold buffered bytes stop reading until the total falls.
    pub max_buffered_bytes: usize,
    /// Close connections with no traffic for this long; None: never.
    pub idle_timeout: Option<Duration>,
    /// Time open connections get to flush what is owed once draining begins.
    pub drain_timeout: Duration,
    /// On SIGTERM, how long `/readyz` answers 503 while connections are still
    /// accepted, before the drain begins: time for a load balancer or a Kubernetes
    /// Service to take this instance out of rotation, so no client meets a closed port.
    pub shutdown_delay: Duration,
    /// Address of the Prometheus endpoint; None: no endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// Every connection begins with a PROXY protocol header (v1 or v2), from a source
    /// in `trusted_proxies`, and the client it names stands for the connection's peer
    /// (per-address limit, logs, relay's `send_proxy_v2`). Anything else is refused.
    pub accept_proxy: bool,
    /// The sources allowed to connect with `accept_proxy`; every other is refused at
    /// accept.
    pub trusted_proxies: Vec<Cidr>,
    /// With `accept_proxy`, a connection whose header is not complete this long after
    /// it was accepted is closed.
    pub proxy_header_timeout: Duration,
    /// TCP keepalive on client sockets (every mode); None: off (SO_KEEPALIVE 0, also
    /// on listeners a reload hands over with it on).
    pub tcp_keepalive: Option<Keepalive>,
    /// TCP_USER_TIMEOUT on client sockets and relay's upstream sockets: how long sent
    /// data may go unacknowledged before the kernel drops the connection; None: the
    /// kernel's default (TCP_USER_TIMEOUT 0).
    pub tcp_user_timeout: Option<Duration>,
    /// The per-connection access log (`--access-log`).
    pub access_log: AccessLogConfig,
    /// The format of edgepoll's own log lines (`--log-format`); the binary sets up
    /// logging with it, the library only carries it.
    pub log_format: LogFormat,
    /// The response and limits of http mode.
    pub http: HttpConfig,
    /// The upstreams and their handling in relay mode.
    pub relay: RelayConfig,
}

/// TCP keepalive as `--tcp-keepalive IDLE:INTERVAL:COUNT` gives it: after `idle`
/// without traffic either way the kernel sends a probe, then one every `interval`,
/// and drops the connection after `count` unanswered ones (with
/// `--tcp-user-timeout`, once that long has passed instead; see tcp(7)). The kernel
/// counts whole seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// TCP_KEEPIDLE.
    pub idle: Duration,
    /// TCP_KEEPINTVL.
    pub interval: Duration,
    /// TCP_KEEPCNT.
    pub count: u32,
}

/// The largest TCP_KEEPIDLE and TCP_KEEPINTVL the kernel accepts (MAX_TCP_KEEPIDLE,
/// MAX_TCP_KEEPINTVL), in seconds.
pub const MAX_KEEPALIVE_SECS: u64 = 32767;
/// The largest TCP_KEEPCNT the kernel accepts (MAX_TCP_KEEPCNT).
pub const MAX_KEEPALIVE_COUNT: u32 = 127;
/// The largest TCP_USER_TIMEOUT, in milliseconds: the kernel takes an int (24.8 days).
pub const MAX_USER_TIMEOUT_MS: u128 = i32::MAX as u128;

impl Keepalive {
    /// Checks the values against the ranges the kernel accepts, so that a bad value
    /// stops the start with a message instead of failing on every socket.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (what, option, d) in [
            ("IDLE", "TCP_KEEPIDLE", self.idle),
            ("INTERVAL", "TCP_KEEPINTVL", self.interval),
        ] {
            if d.subsec_nanos() != 0 || !(1..=MAX_KEEPALIVE_SECS).contains(&d.as_secs()) {
                return Err(ConfigError::Keepalive(format!(
                    "{what} must be whole seconds from 1 to {MAX_KEEPALIVE_SECS} ({option}), got {d:?}"
                )));
            }
        }
        if !(1..=MAX_KEEPALIVE_COUNT).contains(&self.count) {
            return Err(ConfigError::Keepalive(format!(
                "COUNT must be from 1 to {MAX_KEEPALIVE_COUNT} (TCP_KEEPCNT), got {}",
                self.count
            )));
        }
        Ok(())
    }
}

impl std::fmt::Display for Keepalive {
    /// As `--tcp-keepalive` takes it: `60s:10s:6`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}s:{}s:{}",
            self.idle.as_secs(),
            self.interval.as_secs(),
            self.count
        )
    }
}

/// How relay mode picks an upstream for a new client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// Each upstream in turn.
    RoundRobin,
    /// The upstream with the fewest relayed connections open now (ties in turn).
    LeastConn,
}

impl Balance {
    /// The name `--balance` takes.
    pub fn name(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round-robin",
            Balance::LeastConn => "least-conn",
        }
    }

    /// The policy `name` names, as `--balance` spells it.
    pub fn from_name(name: &str) -> Option<Balance> {
        [Balance::RoundRobin, Balance::LeastConn]
            .into_iter()
            .find(|b| b.name() == name)
    }
}

/// Where relay mode sends its clients, and how it treats upstreams that fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayConfig {
    /// Upstream addresses at start-up, each once: every IP literal given and every
    /// address of every name given. The resolver changes the set a running server
    /// picks from, never this.
    pub upstreams: Vec<SocketAddr>,
    /// The `upstream` entries as given, each with the addresses it had when the
    /// configuration was built; `upstreams` is their union, in order. Empty when
    /// `upstreams` was set directly (as tests do): every address is then fixed.
    pub upstream_entries: Vec<UpstreamEntry>,
    /// How often the names among the entries are looked up again; None: only at
    /// start-up.
    pub resolve_interval: Option<Duration>,
    /// A hosts(5) file where names are looked up before the system resolver, read
    /// anew at every lookup.
    pub hosts_file: Option<PathBuf>,
    /// How an upstream is picked for a new client.
    pub balance: Balance,
    /// A connect not complete by then counts as failed (reason `timeout`).
    pub connect_timeout: Duration,
    /// An upstream whose connect failed is skipped for this long. With a single
    /// upstream nothing is ever skipped (there would be nowhere else to go).
    pub fail_timeout: Duration,
    /// Upstreams tried per client before giving up on it; None: one try per upstream.
    pub connect_retries: Option<usize>,
    /// Move bytes with splice(2) through a pipe pair per connection pair.
    pub splice: bool,
    /// Begin every upstream connection with a PROXY protocol v2 header.
    pub send_proxy_v2: bool,
    /// Active health checks of every upstream; None: passive failover only.
    pub health_check: Option<HealthCheck>,
    /// Pairs open or connecting to one upstream at most; None: no limit.
    pub max_conns_per_upstream: Option<usize>,
    /// Clients that may wait for an upstream slot (with `max_conns_per_upstream`).
    pub max_queue: usize,
    /// How long a client may wait for an upstream slot.
    pub queue_timeout: Duration,
    /// TCP keepalive on upstream sockets: [`DEFAULT_UPSTREAM_KEEPALIVE`] unless
    /// `--tcp-keepalive` is given, which sets it for clients and upstreams alike;
    /// None: off.
    pub upstream_keepalive: Option<Keepalive>,
}

/// The longest `--max-queue`: a client that leaves the queue from its middle costs a
/// walk of it, so it stays short enough for that to be cheap.
pub const MAX_QUEUE: usize = 100_000;

/// One `upstream` entry and the addresses it had when the configuration was built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamEntry {
    pub given: HostPort,
    /// The literal's address, or every address of the name (at least one).
    pub addrs: Vec<SocketAddr>,
}

/// Whether `addr` is one of `listening` (this relay's own listeners): a client sent
/// there would come back as a new client, and again, until the descriptors ran out.
/// A wildcard listener (`0.0.0.0`, `[::]`) stands for every local address of its
/// family, which binding a UDP socket to the address tells apart (no packet is sent).
pub fn is_own_address(addr: SocketAddr, listening: &[SocketAddr]) -> bool {
    listening.iter().any(|l| {
        l.port() == addr.port()
            && (l.ip() == addr.ip()
                || (l.ip().is_unspecified()
                    && l.is_ipv4() == addr.is_ipv4()
                    && std::net::UdpSocket::bind((addr.ip(), 0)).is_ok()))
    })
}

/// The longest `--health-check-expect`: a probe reads at most this much of an answer.
pub const MAX_EXPECT: usize = 4096;

/// The longest `--health-check-send`: a probe is a handful of bytes, not an upload.
pub const MAX_SEND: usize = 65536;

/// What an active health-check probe does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckKind {
    /// The connect completes.
    Tcp,
    /// The connect completes, `send` is written, and the answer begins with `expect`.
    SendExpect,
}

impl CheckKind {
    /// The name `--health-check` takes.
    pub fn name(self) -> &'static str {
        match self {
            CheckKind::Tcp => "tcp",
            CheckKind::SendExpect => "send-expect",
        }
    }

    pub fn from_name(name: &str) -> Option<CheckKind> {
        [CheckKind::Tcp, CheckKind::SendExpect]
            .into_iter()
            .find(|k| k.name() == name)
    }
}

/// Active health checks (`--health-check` and the flags beside it): one prober per
/// process probes every upstream, and all workers see its verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub kind: CheckKind,
    /// Between two probes of one upstream (each spaced by up to 10% more or less, so
    /// that probes of many upstreams and replicas do not fall in step).
    pub interval: Duration,
    /// A probe not passed by then fails (`timeout`).
    pub timeout: Duration,
    /// Passed probes in a row that bring a down upstream back.
    pub rise: u32,
    /// Failed probes in a row that take an up upstream down.
    pub fall: u32,
    /// `send-expect`: the bytes written once connected (may be empty).
    pub send: Vec<u8>,
    /// `send-expect`: what the answer must begin with (not empty).
    pub expect: Vec<u8>,
}

impl HealthCheck {
    /// `kind` with the defaults: every 2 s, 1 s timeout, rise 2, fall 3 (HAProxy's).
    pub fn new(kind: CheckKind) -> HealthCheck {
        HealthCheck {
            kind,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            send: Vec::new(),
            expect: Vec::new(),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Relay(m));
        if self.interval < Duration::from_millis(10) {
            return bad("health-check-interval (--health-check-interval): at least 10ms".into());
        }
        if self.timeout.is_zero() {
            return Err(ConfigError::Zero("health-check-timeout"));
        }
        // A probe ends before the next is due, so `fall` failures take at most `fall`
        // intervals (each up to 10% longer) plus one timeout.
        if self.timeout > self.interval {
            return bad(format!(
                "health-check-timeout (--health-check-timeout) {:?}: at most the interval ({:?})",
                self.timeout, self.interval
            ));
        }
        if self.expect.len() > MAX_EXPECT {
            return bad(format!(
                "health-check-expect (--health-check-expect): at most {MAX_EXPECT} bytes, got {}",
                self.expect.len()
            ));
        }
        if self.send.len() > MAX_SEND {
            return bad(format!(
                "health-check-send (--health-check-send): at most {MAX_SEND} bytes, got {}",
                self.send.len()
            ));
        }
        for (key, n) in [("rise", self.rise), ("fall", self.fall)] {
            if !(1..=1000).contains(&n) {
                return bad(format!("{key} (--{key}): {n} is not between 1 and 1000"));
            }
        }
        match self.kind {
            CheckKind::SendExpect if self.expect.is_empty() => bad(
                "health-check-expect (--health-check-expect): send-expect needs the bytes \
                 the answer must begin with"
                    .into(),
            ),
            CheckKind::Tcp if !self.send.is_empty() || !self.expect.is_empty() => {
                bad("health-check-send/-expect: only with --health-check send-expect".into())
            }
            _ => Ok(()),
        }
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            upstreams: Vec::new(),
            upstream_entries: Vec::new(),
            resolve_interval: Some(DEFAULT_RESOLVE_INTERVAL),
            hosts_file: None,
            balance: Balance::RoundRobin,
            connect_timeout: Duration::from_secs(5),
            fail_timeout: Duration::from_secs(10),
            connect_retries: None,
            splice: false,
            send_proxy_v2: false,
            health_check: None,
            max_conns_per_upstream: None,
            max_queue: 1024,
            queue_timeout: Duration::from_secs(5),
            upstream_keepalive: Some(DEFAULT_UPSTREAM_KEEPALIVE),
        }
    }
}

/// The shortest `--resolve-interval`: shorter would be a busy loop, not a schedule
/// (the same floor as `--health-check-interval`).
pub const MIN_RESOLVE_INTERVAL: Duration = Duration::from_millis(10);

impl RelayConfig {
    /// The entries given as names, which the resolver follows.
    pub fn names(&self) -> impl Iterator<Item = &UpstreamEntry> {
        self.upstream_entries
            .iter()
            .filter(|e| matches!(e.given, HostPort::Name(..)))
    }

    /// Upstreams tried per client at start-up (the set may change; see
    /// `upstream::Upstreams::tries`).
    pub fn tries(&self) -> usize {
        self.connect_retries.unwrap_or(self.upstreams.len()).max(1)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.upstreams.is_empty() {
            return Err(ConfigError::Relay(
                "upstream (--upstream): relay needs at least one HOST:PORT".into(),
            ));
        }
        if let Some(a) = self.upstreams.iter().find(|a| a.port() == 0) {
            return Err(ConfigError::Relay(format!(
                "upstream (--upstream) {a}: port 0 is not a destination"
            )));
        }
        if self.connect_timeout.is_zero() {
            return Err(ConfigError::Zero("connect-timeout"));
        }
        if self.connect_retries == Some(0) {
            return Err(ConfigError::Zero("connect-retries"));
        }
        if self
            .resolve_interval
            .is_some_and(|d| d < MIN_RESOLVE_INTERVAL)
        {
            return Err(ConfigError::Relay(format!(
                "resolve-interval (--resolve-interval) {:?}: at least {MIN_RESOLVE_INTERVAL:?}, \
                 or off (names looked up at start-up only)",
                self.resolve_interval.unwrap_or_default()
            )));
        }
        if let Some(check) = &self.health_check {
            check.validate()?;
        }
        if self.max_conns_per_upstream == Some(0) {
            return Err(ConfigError::Zero("max-conns-per-upstream"));
        }
        if self.max_queue > MAX_QUEUE {
            return Err(ConfigError::Relay(format!(
                "max-queue (--max-queue): at most {MAX_QUEUE}, got {}",
                self.max_queue
            )));
        }
        if self.queue_timeout.is_zero() {
            return Err(ConfigError::Zero("queue-timeout"));
        }
        if let Some(k) = &self.upstream_keepalive {
            k.validate()?;
        }
        Ok(())
    }
}

/// What http mode answers, and the limits it enforces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    /// Status code of the fixed response.
    pub status: u16,
    /// Body of the fixed response.
    pub body: Vec<u8>,
    pub content_type: String,
    /// Extra response headers, in order.
    pub headers: Vec<(String, String)>,
    /// A request head larger than this gets 431 and the connection is closed.
    pub max_header_bytes: usize,
    /// A request head not complete this long after it began (or after the connection
    /// opened) gets 408 and the connection is closed.
    pub header_timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            status: 200,
            body: b"Hello, World!".to_vec(),
            content_type: "text/plain".to_string(),
            headers: Vec::new(),
            max_header_bytes: 8 * 1024,
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// Response headers edgepoll writes itself, which `--header` may not set.
const RESERVED_HEADERS: [&str; 6] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "date",
    "content-type",
    "server",
];

impl HttpConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(200..=599).contains(&self.status) {
            return Err(ConfigError::Http(format!(
                "status (--status) must be a final status code from 200 to 599, got {}",
                self.status
            )));
        }
        if matches!(self.status, 204 | 304) && !self.body.is_empty() {
            return Err(ConfigError::Http(format!(
                "status (--status) {}: such responses have no body; set body (--body) to ''",
                self.status
            )));
        }
        if self.content_type.is_empty() || !is_field_value(&self.content_type) {
            return Err(ConfigError::Http(
                "content-type (--content-type) must be a non-empty header value".into(),
            ));
        }
        for (name, value) in &self.headers {
            if name.is_empty() || !name.bytes().all(is_token_byte) {
                return Err(ConfigError::Http(format!(
                    "header (--header): '{name}' is not a valid header name"
                )));
            }
            if !is_field_value(value) {
                return Err(ConfigError::Http(format!(
                    "header (--header) {name}: the value has a control character"
                )));
            }
            if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
                return Err(ConfigError::Http(format!(
                    "header (--header) {name}: edgepoll sets this header itself (use content-type or body)"
                )));
            }
        }
        if self.max_header_bytes < 64 {
            return Err(ConfigError::Http(
                "max-header-bytes (--max-header-bytes) must be at least 64".into(),
            ));
        }
        if self.header_timeout.is_zero() {
            return Err(ConfigError::Zero("header-timeout"));
        }
        Ok(())
    }
}

/// A tchar of RFC 9110 §5.6.2.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Visible characters, spaces and tabs only: no CR, LF or other controls.
fn is_field_value(v: &str) -> bool {
    v.bytes().all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

impl Config {
    /// The defaults of `mode`: its listen address, one worker per usable CPU, the
    /// metrics endpoint on 127.0.0.1:9464.
    pub fn new(mode: Mode) -> Config {
        Config {
            mode,
            listen: vec![mode.default_listen()],
            workers: default_workers(),
            pin_workers: false,
            backlog: DEFAULT_BACKLOG,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_ip: None,
            max_pending_bytes: DEFAULT_MAX_PENDING_BYTES,
            max_buffered_bytes: default_max_buffered_bytes(),
            // A relayed pair whose peers both went quiet (a half-open pair whose other
            // peer vanished) must not live forever; nginx's proxy_timeout is 10m too.
            idle_timeout: (mode == Mode::Relay).then_some(DEFAULT_RELAY_IDLE_TIMEOUT),
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            shutdown_delay: Duration::ZERO,
            metrics_listen: Some(DEFAULT_METRICS_LISTEN),
            accept_proxy: false,
            trusted_proxies: Vec::new(),
            proxy_header_timeout: DEFAULT_PROXY_HEADER_TIMEOUT,
            tcp_keepalive: None,
            tcp_user_timeout: None,
            access_log: AccessLogConfig::default(),
            log_format: LogFormat::Text,
            http: HttpConfig::default(),
            relay: RelayConfig::default(),
        }
    }

    /// Checks the values that would make a server misbehave rather than fail to bind.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.listen.is_empty() {
            return Err(ConfigError::NoListenAddress);
        }
        if self.workers == 0 || self.workers > MAX_WORKERS {
            return Err(ConfigError::Workers(self.workers));
        }
        if self.backlog == 0 {
            return Err(ConfigError::Zero("backlog"));
        }
        if self.max_connections == 0 {
            return Err(ConfigError::Zero("max-connections"));
        }
        if self.max_connections_per_ip == Some(0) {
            return Err(ConfigError::Zero("max-connections-per-ip"));
        }
        if self.max_pending_bytes == 0 {
            return Err(ConfigError::Zero("max-pending-bytes"));
        }
        if self.max_pending_bytes > MAX_PENDING_BYTES {
            return Err(ConfigError::PendingTooLarge(self.max_pending_bytes));
        }
        if let Some(m) = self.metrics_listen {
            if self.listen.contains(&m) && m.port() != 0 {
                return Err(ConfigError::MetricsOnListen(m));
            }
        }
        if self.mode == Mode::Relay {
            let listening: Vec<SocketAddr> = self
                .listen
                .iter()
                .copied()
                .filter(|l| l.port() != 0)
                .collect();
            if let Some(a) = self
                .relay
                .upstreams
                .iter()
                .find(|&&a| is_own_address(a, &listening))
            {
                return Err(ConfigError::Relay(format!(
                    "upstream (--upstream) {a} is this relay's own listen address: every \
                     client would be relayed back to it"
                )));
            }
        }
        if self.max_buffered_bytes == 0 {
            return Err(ConfigError::Zero("max-buffered-bytes"));
        }
        if self.idle_timeout == Some(Duration::ZERO) {
            return Err(ConfigError::Zero("idle-timeout"));
        }
        // Like HAProxy's accept-proxy, and as the protocol requires ("the receiver
        // MUST NOT try to guess whether the protocol header is present"), the header
        // is all or nothing, and only from the ranges named: neither flag means
        // anything without the other.
        match (self.accept_proxy, self.trusted_proxies.is_empty()) {
            (true, true) => return Err(ConfigError::AcceptProxyUntrusted),
            (false, false) => return Err(ConfigError::TrustedWithoutAccept),
            _ => {}
        }
        if self.proxy_header_timeout.is_zero() {
            return Err(ConfigError::Zero("proxy-header-timeout"));
        }
        if let Some(k) = &self.tcp_keepalive {
            k.validate()?;
        }
        if let Some(t) = self.tcp_user_timeout {
            if t.is_zero() {
                return Err(ConfigError::Zero("tcp-user-timeout"));
            }
            if t.subsec_nanos() % 1_000_000 != 0 || t.as_millis() > MAX_USER_TIMEOUT_MS {
                return Err(ConfigError::UserTimeout(t));
            }
        }
        self.access_log.validate().map_err(ConfigError::AccessLog)?;
        if self.mode == Mode::Http {
            self.http.validate()?;
        }
        if self.mode == Mode::Relay {
            self.relay.validate()?;
        }
        Ok(())
    }
}

/// The largest `--max-pending-bytes`: a connection's buffer moves in one hand-over
/// message on a reload, whose lengths are 32 bits; and a gigabyte per connection is
/// past any use.
pub const MAX_PENDING_BYTES: usize = 1 << 30;

/// An upper bound that catches a typo (`--workers 10000`) before it spawns threads.
pub const MAX_WORKERS: usize = 1024;

/// A quarter of physical memory (1 GiB if it cannot be read): room for the kernel's
/// own socket buffers and everything else on the machine.
pub fn default_max_buffered_bytes() -> usize {
    crate::sys::mem::physical_memory().map_or(1 << 30, |m| (m / 4) as usize)
}

/// The number of CPUs this process may run on (affinity mask and cgroup quota).
pub fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// A configuration that cannot run. Each message names the setting both ways, as the
/// configuration file's key and as the flag (`workers (--workers) ...`), since either
/// may have set it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("at least one listen address (--listen) is required")]
    NoListenAddress,
    #[error("workers (--workers) must be between 1 and {MAX_WORKERS}, got {0}")]
    Workers(usize),
    #[error("{0} (--{0}) must be greater than zero")]
    Zero(&'static str),
    #[error("max-pending-bytes (--max-pending-bytes) must be at most 1GiB, got {0}")]
    PendingTooLarge(usize),
    #[error("metrics-listen (--metrics-listen) {0} is also a listen address (--listen)")]
    MetricsOnListen(std::net::SocketAddr),
    #[error(
        "accept-proxy (--accept-proxy) needs at least one trusted-proxy (--trusted-proxy \
         CIDR): without one, every connection would be refused"
    )]
    AcceptProxyUntrusted,
    #[error(
        "trusted-proxy (--trusted-proxy) is set but accept-proxy (--accept-proxy) is not: \
         no PROXY header would be read; add accept-proxy or remove trusted-proxy"
    )]
    TrustedWithoutAccept,
    #[error("tcp-keepalive (--tcp-keepalive): {0}")]
    Keepalive(String),
    #[error("tcp-user-timeout (--tcp-user-timeout) must be whole milliseconds up to {MAX_USER_TIMEOUT_MS}ms (TCP_USER_TIMEOUT), got {0:?}")]
    UserTimeout(Duration),
    #[error("{0}")]
    AccessLog(String),
    #[error("{0}")]
    Http(String),
    #[error("{0}")]
    Relay(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pending_cap_past_a_gigabyte_and_metrics_on_a_listen_address_are_refused() {
        let mut config = Config::new(Mode::Echo);
        config.max_pending_bytes = MAX_PENDING_BYTES + 1;
        assert_eq!(
            config.validate(),
            Err(ConfigError::PendingTooLarge(MAX_PENDING_BYTES + 1))
        );
        config.max_pending_bytes = MAX_PENDING_BYTES;
        assert_eq!(config.validate(), Ok(()));
        config.metrics_listen = Some(config.listen[0]);
        assert_eq!(
            config.validate(),
            Err(ConfigError::MetricsOnListen(config.listen[0]))
        );
    }

    #[test]
    fn accept_proxy_and_trusted_proxy_need_each_other() {
        let mut config = Config::new(Mode::Echo);
        config.accept_proxy = true;
        assert_eq!(config.validate(), Err(ConfigError::AcceptProxyUntrusted));
        config.trusted_proxies = vec![parse_cidr("127.0.0.0/8").unwrap()];
        assert_eq!(config.validate(), Ok(()));
        config.proxy_header_timeout = Duration::ZERO;
        assert_eq!(
            config.validate().unwrap_err().to_string(),
            "proxy-header-timeout (--proxy-header-timeout) must be greater than zero"
        );
        config.proxy_header_timeout = DEFAULT_PROXY_HEADER_TIMEOUT;
        config.accept_proxy = false;
        let err = config.validate().unwrap_err();
        assert_eq!(err, ConfigError::TrustedWithoutAccept);
        assert!(err.to_string().starts_with(
            "trusted-proxy (--trusted-proxy) is set but accept-proxy (--accept-proxy) is not"
        ));
    }

    #[test]
    fn keepalive_and_user_timeout_outside_the_kernels_ranges_are_refused() {
        let secs = Duration::from_secs;
        let mut config = Config::new(Mode::Echo);
        let k = |idle, interval, count| Keepalive {
            idle,
            interval,
            count,
        };
        for (keepalive, message) in [
            (
                k(secs(0), secs(10), 6),
                "tcp-keepalive (--tcp-keepalive): IDLE must be whole seconds from 1 to 32767 (TCP_KEEPIDLE), got 0ns",
            ),
            (
                k(secs(32768), secs(10), 6),
                "tcp-keepalive (--tcp-keepalive): IDLE must be whole seconds from 1 to 32767 (TCP_KEEPIDLE), got 32768s",
            ),
            (
                k(Duration::from_millis(1500), secs(10), 6),
                "tcp-keepalive (--tcp-keepalive): IDLE must be whole seconds from 1 to 32767 (TCP_KEEPIDLE), got 1.5s",
            ),
            (
                k(secs(60), Duration::from_millis(500), 6),
                "tcp-keepalive (--tcp-keepalive): INTERVAL must be whole seconds from 1 to 32767 (TCP_KEEPINTVL), got 500ms",
            ),
            (
                k(secs(60), secs(10), 0),
                "tcp-keepalive (--tcp-keepalive): COUNT must be from 1 to 127 (TCP_KEEPCNT), got 0",
            ),
            (
                k(secs(60), secs(10), 128),
                "tcp-keepalive (--tcp-keepalive): COUNT must be from 1 to 127 (TCP_KEEPCNT), got 128",
            ),
        ] {
            config.tcp_keepalive = Some(keepalive);
            assert_eq!(config.validate().unwrap_err().to_string(), message);
        }
        config.tcp_keepalive = Some(k(secs(32767), secs(32767), 127));
        assert_eq!(config.validate(), Ok(()));
        config.tcp_keepalive = Some(k(secs(1), secs(1), 1));
        assert_eq!(config.validate(), Ok(()));

        config.tcp_user_timeout = Some(Duration::ZERO);
        assert_eq!(
            config.validate().unwrap_err().to_string(),
            "tcp-user-timeout (--tcp-user-timeout) must be greater than zero"
        );
        config.tcp_user_timeout = Some(Duration::from_micros(1500));
        assert_eq!(
            config.validate().unwrap_err().to_string(),
            "tcp-user-timeout (--tcp-user-timeout) must be whole milliseconds up to 2147483647ms (TCP_USER_TIMEOUT), got 1.5ms"
        );
        config.tcp_user_timeout = Some(Duration::from_millis(1 << 31));
        assert!(config.validate().is_err());
        config.tcp_user_timeout = Some(Duration::from_millis((1 << 31) - 1));
        assert_eq!(config.validate(), Ok(()));

        // Relay's upstream keepalive is checked as well, under the same flag.
        let mut relay = Config::new(Mode::Relay);
        relay.relay.upstreams = vec!["127.0.0.1:6379".parse().unwrap()];
        assert_eq!(
            relay.relay.upstream_keepalive,
            Some(DEFAULT_UPSTREAM_KEEPALIVE)
        );
        assert_eq!(relay.validate(), Ok(()));
        relay.relay.upstream_keepalive = Some(k(secs(60), secs(10), 200));
        assert!(relay
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("tcp-keepalive (--tcp-keepalive): COUNT"));
    }

    #[test]
    fn defaults_are_valid() {
        let config = Config::new(Mode::Echo);
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.listen, vec!["127.0.0.1:7000".parse().unwrap()]);
        assert!(config.workers >= 1);
    }

    #[test]
    fn http_responses_that_cannot_be_sent_are_rejected() {
        let mut config = Config::new(Mode::Http);
        assert_eq!(config.listen, vec!["127.0.0.1:8080".parse().unwrap()]);
        assert_eq!(config.validate(), Ok(()));
        config.http.status = 99;
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--status"));
        config.http.status = 204;
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("no body"));
        config.http.body.clear();
        assert_eq!(config.validate(), Ok(()));
        config.http.headers = vec![("X-Ok".into(), "yes".into())];
        assert_eq!(config.validate(), Ok(()));
        config.http.headers = vec![("Content-Length".into(), "5".into())];
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("sets this header itself"));
        config.http.headers = vec![("Bad Name".into(), "x".into())];
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("not a valid header name"));
        config.http.headers = vec![("X-Split".into(), "a\r\nInjected: 1".into())];
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("control character"));
    }

    #[test]
    fn nonsense_values_are_rejected_with_the_key_and_flag_name() {
        let mut config = Config::new(Mode::Echo);
        config.workers = 0;
        assert_eq!(config.validate(), Err(ConfigError::Workers(0)));
        config.workers = 2;
        config.max_pending_bytes = 0;
        let err = config.validate().unwrap_err();
        assert_eq!(
            err.to_string(),
            "max-pending-bytes (--max-pending-bytes) must be greater than zero"
        );
        config.max_pending_bytes = 1;
        config.listen.clear();
        assert_eq!(config.validate(), Err(ConfigError::NoListenAddress));
    }
}
