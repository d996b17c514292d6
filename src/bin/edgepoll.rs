//! `edgepoll`: argument parsing, logging and signals; the server is the library's.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use edgepoll::config::{
    self, parse_duration, parse_escaped, parse_keepalive, parse_listen, parse_metrics_listen,
    parse_resolve_interval, parse_size, parse_upstream, parse_user_timeout, Body, Config, HostPort,
    LoadError, LogFormat, Mode, Settings,
};
use edgepoll::handover;
use edgepoll::keepalive::PeerTimeouts;
use edgepoll::metrics::endpoint::Endpoint;
use edgepoll::sys::{rlimit, signal::ShutdownSignals, socket, systemd};
use edgepoll::{Server, Sockets, StartError};

#[derive(Parser)]
#[command(
    name = "edgepoll",
    version,
    about = "An edge-triggered epoll TCP server: echo, TCP relay and HTTP load-test targets",
    long_about = "An edge-triggered epoll TCP server: echo, TCP relay and HTTP load-test targets.\n\n\
        One acceptor thread hands connections round-robin to N workers, each with its own \
        edge-triggered epoll instance. Prometheus metrics are served on --metrics-listen. \
        SIGTERM or SIGINT drains: listeners close at once, open connections get \
        --drain-timeout to flush, then the process exits 0. Log level from RUST_LOG \
        (default info).\n\n\
        Settings can also come from a TOML file (--config FILE) whose keys are the flags' \
        names and `mode`: `edgepoll --config FILE` runs the mode the file names, \
        `edgepoll MODE --config FILE [FLAGS]` lets flags override the file, and \
        `edgepoll check --config FILE` validates it without starting.",
    arg_required_else_help = true
)]
struct Cli {
    /// TOML configuration file: keys are the flags' names (max-pending-bytes = "256KiB"),
    /// plus mode = "echo"|"http"|"relay"; flags given as well override it
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,

    /// Format of edgepoll's own log lines on stderr: text, or json (one object per
    /// line, for Loki, Vector or Elasticsearch) [default: text]
    #[arg(long, value_name = "text|json", global = true, value_parser = config::parse_log_format)]
    log_format: Option<LogFormat>,

    /// The mode to run, or check; without one, the file's mode key says
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Echo every byte back to its sender, in order.
    #[command(
        after_help = "Example:\n  edgepoll echo --listen 0.0.0.0:7000 --listen [::]:7000 --workers 4 --idle-timeout 300"
    )]
    Echo(ServerArgs),
    /// Answer every HTTP/1.1 request with one fixed response (keep-alive, pipelining),
    /// a load-test target for wrk and edgeload.
    #[command(
        after_help = "Example:\n  edgepoll http --listen 0.0.0.0:8080 --body-file index.html --content-type text/html --header 'Cache-Control: no-store'"
    )]
    Http(HttpArgs),
    /// Relay every client connection to an upstream (a TCP proxy), with backpressure
    /// both ways, half-close forwarding and upstream failover.
    #[command(
        after_help = "Example:\n  edgepoll relay --listen 0.0.0.0:6380 --upstream 10.0.0.5:6379 --upstream 10.0.0.6:6379 --balance least-conn --idle-timeout 10m"
    )]
    Relay(RelayArgs),
    /// Validate the configuration file (--config) without starting: values, addresses,
    /// the body file. Exits 0 if it would start, 2 with the key and the reason if not.
    #[command(after_help = "Example:\n  edgepoll check --config /etc/edgepoll.toml")]
    Check,
}

/// Flags of relay mode.
#[derive(Args)]
struct RelayArgs {
    #[command(flatten)]
    server: ServerArgs,

    #[command(flatten)]
    upstream: UpstreamArgs,
}

/// The upstreams of relay mode and their handling.
#[derive(Args)]
struct UpstreamArgs {
    /// Upstream to relay to, IP:PORT or HOST:PORT (a name with several addresses adds
    /// each, and is looked up again every --resolve-interval); repeat for several
    #[arg(
        short,
        long = "upstream",
        value_name = "ADDR",
        required_unless_present = "config",
        value_parser = parse_upstream
    )]
    upstreams: Vec<HostPort>,

    /// Look upstream names up again this often: addresses that appear get clients,
    /// those that vanish get none (their pairs finish); 0 or off: at start-up only
    /// [default: 30]
    #[arg(long, value_name = "SECS|off")]
    resolve_interval: Option<String>,

    /// Look upstream names up in this hosts(5)-format file first (read anew at every
    /// lookup), then through the system resolver
    #[arg(long, value_name = "FILE")]
    hosts_file: Option<PathBuf>,

    /// How a client's upstream is picked [default: round-robin]
    #[arg(long, value_enum)]
    balance: Option<BalanceArg>,

    /// An upstream connect not complete by then fails (reason timeout) [default: 5]
    #[arg(long, value_name = "SECS", value_parser = parse_duration)]
    connect_timeout: Option<Duration>,

    /// An upstream whose connect failed is skipped for this long (0: never skipped);
    /// a lone upstream is never skipped [default: 10]
    #[arg(long, value_name = "SECS", value_parser = parse_duration)]
    fail_timeout: Option<Duration>,

    /// Upstreams tried per client before it is closed [default: the number of upstreams]
    #[arg(long, value_name = "N")]
    connect_retries: Option<usize>,

    /// Move bytes with splice(2) through a pipe pair per connection pair, without
    /// copying them through user space (4 more descriptors per pair)
    #[arg(long)]
    splice: bool,

    /// Begin each upstream connection with a PROXY protocol v2 header carrying the
    /// client's address
    #[arg(long)]
    send_proxy_v2: bool,

    #[command(flatten)]
    health: HealthArgs,

    /// Pairs open or connecting to one upstream at most; a client arriving when every
    /// upstream is at it waits in a queue [default: no limit]
    #[arg(long, value_name = "N")]
    max_conns_per_upstream: Option<usize>,

    /// Clients that may wait for an upstream slot; one more is closed (queue_full)
    /// [default: 1024]
    #[arg(long, value_name = "N")]
    max_queue: Option<usize>,

    /// A client waiting longer for an upstream slot is closed (queue_timeout) [default: 5]
    #[arg(long, value_name = "SECS", value_parser = parse_duration)]
    queue_timeout: Option<Duration>,
}

/// Active health checks of relay's upstreams.
#[derive(Args)]
struct HealthArgs {
    /// Probe every upstream: `tcp` (the connect completes) or `send-expect` (send
    /// --health-check-send, the answer must begin with --health-check-expect) [default: off]
    #[arg(long, value_name = "KIND", value_enum)]
    health_check: Option<CheckArg>,

    /// Between two probes of an upstream, each spaced by +-10% [default: 2]
    #[arg(long, value_name = "SECS", value_parser = parse_duration)]
    health_check_interval: Option<Duration>,

    /// A probe not passed by then fails [default: 1, at most the interval]
    #[arg(long, value_name = "SECS", value_parser = parse_duration)]
    health_check_timeout: Option<Duration>,

    /// Passed probes in a row that bring a down upstream back [default: 2]
    #[arg(long, value_name = "N")]
    rise: Option<u32>,

    /// Failed probes in a row that take an upstream down [default: 3]
    #[arg(long, value_name = "N")]
    fall: Option<u32>,

    /// send-expect: bytes to send once connected; escapes \n \r \t \0 \\ \xHH
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
    health_check_send: Option<Bytes>,

    /// send-expect: what the answer must begin with; same escapes
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
    health_check_expect: Option<Bytes>,
}

/// Bytes a flag gives with escapes; a newtype, since clap reads a `Vec` as a list.
#[derive(Clone)]
struct Bytes(Vec<u8>);

fn parse_bytes(s: &str) -> Result<Bytes, String> {
    parse_escaped(s).map(Bytes)
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum CheckArg {
    /// The connect completes
    Tcp,
    /// The answer to --health-check-send begins with --health-check-expect
    SendExpect,
    /// No active checks (overrides a configuration file)
    Off,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BalanceArg {
    /// Each upstream in turn
    RoundRobin,
    /// The upstream with the fewest open connections
    LeastConn,
}

impl UpstreamArgs {
    fn apply(&self, s: &mut Settings) -> Result<(), LoadError> {
        if !self.upstreams.is_empty() {
            s.upstreams = Some(self.upstreams.clone());
        }
        s.resolve_interval = self
            .resolve_interval
            .as_deref()
            .map(parse_resolve_interval)
            .transpose()
            .map_err(|reason| LoadError::Flag {
                flag: "resolve-interval",
                reason,
            })?;
        s.hosts_file = self.hosts_file.clone();
        s.balance = self.balance.map(|b| match b {
            BalanceArg::RoundRobin => config::Balance::RoundRobin,
            BalanceArg::LeastConn => config::Balance::LeastConn,
        });
        s.connect_timeout = self.connect_timeout;
        s.fail_timeout = self.fail_timeout;
        s.connect_retries = self.connect_retries;
        s.splice = self.splice.then_some(true);
        s.send_proxy_v2 = self.send_proxy_v2.then_some(true);
        s.max_conns_per_upstream = self.max_conns_per_upstream;
        s.max_queue = self.max_queue;
        s.queue_timeout = self.queue_timeout;
        let h = &self.health;
        s.health_check = h.health_check.map(|k| match k {
            CheckArg::Tcp => Some(config::CheckKind::Tcp),
            CheckArg::SendExpect => Some(config::CheckKind::SendExpect),
            CheckArg::Off => None,
        });
        s.health_check_interval = h.health_check_interval;
        s.health_check_timeout = h.health_check_timeout;
        s.rise = h.rise;
        s.fall = h.fall;
        s.health_check_send = h.health_check_send.clone().map(|b| b.0);
        s.health_check_expect = h.health_check_expect.clone().map(|b| b.0);
        Ok(())
    }
}

/// Flags of http mode.
#[derive(Args)]
struct HttpArgs {
    #[command(flatten)]
    server: ServerArgs,

    #[command(flatten)]
    response: ResponseArgs,
}

/// The response and limits of http mode.
#[derive(Args)]
struct ResponseArgs {
    /// Response body [default: Hello, World!]
    #[arg(long, value_name = "TEXT", conflicts_with = "body_file")]
    body: Option<String>,

    /// Response body read from a file at start-up
    #[arg(long, value_name = "FILE")]
    body_file: Option<PathBuf>,

    /// Response status code [default: 200]
    #[arg(long, value_name = "CODE")]
    status: Option<u16>,

    /// Content-Type of the response [default: text/plain]
    #[arg(long, value_name = "TYPE")]
    content_type: Option<String>,

    /// Extra response header; repeat for several
    #[arg(long = "header", value_name = "'Name: value'", value_parser = config::parse_header)]
    headers: Vec<(String, String)>,

    /// A request head larger than this gets 431 and the connection is closed
    /// [default: 8KiB]
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    max_header_bytes: Option<usize>,

    /// A request head not complete this long after it began (or after the connection
    /// opened) gets 408 and the connection is closed (slowloris) [default: 10]
    #[arg(long, value_name = "SECS", value_parser = parse_duration)]
    header_timeout: Option<Duration>,
}

impl ResponseArgs {
    fn apply(&self, s: &mut Settings) {
        s.body = match (&self.body, &self.body_file) {
            (Some(text), _) => Some(Body::Text(text.clone())),
            (None, Some(path)) => Some(Body::File(path.clone())),
            (None, None) => None,
        };
        s.status = self.status;
        s.content_type = self.content_type.clone();
        if !self.headers.is_empty() {
            s.headers = Some(self.headers.clone());
        }
        s.max_header_bytes = self.max_header_bytes;
        s.header_timeout = self.header_timeout;
    }
}

/// Flags every mode shares.
#[derive(Args)]
struct ServerArgs {
    /// Address to listen on, IP:PORT or HOST:PORT; repeat for several. Port 0 picks a
    /// free port (the start-up log says which) [default: 127.0.0.1:7000 for echo,
    /// 127.0.0.1:8080 for http]
    #[arg(short, long = "listen", value_name = "ADDR", value_parser = parse_listen)]
    listen: Vec<Vec<SocketAddr>>,

    /// Worker threads, each with its own epoll instance [default: CPUs this process may use]
    #[arg(short, long, value_name = "N")]
    workers: Option<usize>,

    /// Pin worker i to core i (modulo the usable cores)
    #[arg(long)]
    pin_workers: bool,

    /// Accept queue length for listen(2); the kernel caps it at net.core.somaxconn
    /// [default: 4096]
    #[arg(long, value_name = "N")]
    backlog: Option<u32>,

    /// Open connections allowed; beyond it new ones are accepted and closed at once
    /// (counted as rejected). Lowered to fit the open-file limit if needed [default: 100000]
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,

    /// Connections allowed from one client IP; beyond it new ones are accepted and
    /// closed at once (counted as rejected, reason per_ip_limit) [default: off]
    #[arg(long, value_name = "N")]
    max_connections_per_ip: Option<usize>,

    /// Outbound bytes held per connection for a peer that does not read; at the cap the
    /// server stops reading from it (e.g. 262144, 256KiB, 1MiB) [default: 256KiB]
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    max_pending_bytes: Option<usize>,

    /// Outbound bytes all connections together may hold; past it, connections that hold
    /// buffered bytes stop reading until the total falls (e.g. 4GiB) [default: a quarter
    /// of physical memory]
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    max_buffered_bytes: Option<usize>,

    /// Close connections (relayed pairs) with no traffic either way for this long
    /// (e.g. 300, 30s, 5m) [default: off for echo and http, 10m for relay]
    #[arg(long, value_name = "SECS", value_parser = parse_duration)]
    idle_timeout: Option<Duration>,

    /// On SIGTERM/SIGINT, time open connections get to flush what they owe [default: 10]
    #[arg(long, value_name = "SECS", value_parser = parse_duration)]
    drain_timeout: Option<Duration>,

    /// On SIGTERM/SIGINT, keep accepting for this long with /readyz answering 503,
    /// so load balancers stop sending first; then drain [default: 0]
    #[arg(long, value_name = "SECS", value_parser = parse_duration)]
    shutdown_delay: Option<Duration>,

    /// Address of the Prometheus endpoint (/metrics, /healthz, /readyz), or "off"
    /// [default: 127.0.0.1:9464]
    #[arg(long, value_name = "ADDR|off")]
    metrics_listen: Option<String>,

    /// Every connection must begin with a PROXY protocol header (v1 or v2) from a
    /// --trusted-proxy; the client it names is the connection's (per-IP limit, logs,
    /// relay's --send-proxy-v2). Anything else is closed (counted as rejected, reason
    /// proxy_header)
    #[arg(long)]
    accept_proxy: bool,

    /// Source address range allowed to send PROXY headers, CIDR (10.0.0.0/8,
    /// 2001:db8::/32, or one address); repeat for several. Needed with
    /// --accept-proxy; connections from anywhere else are closed at once
    #[arg(long = "trusted-proxy", value_name = "CIDR", value_parser = config::parse_cidr)]
    trusted_proxies: Vec<config::Cidr>,

    /// With --accept-proxy: a connection whose PROXY header is not complete this long
    /// after it was accepted is closed [default: 5]
    #[arg(long, value_name = "SECS", value_parser = parse_duration)]
    proxy_header_timeout: Option<Duration>,

    /// TCP keepalive on client sockets (and relay's upstream sockets): probes after
    /// IDLE without traffic, every INTERVAL, and the connection is dropped after COUNT
    /// unanswered ones (e.g. 60s:10s:6 or 60:10:6), or "off" [default: off; relay's
    /// upstream sockets 60s:10s:6]
    #[arg(long, value_name = "IDLE:INTERVAL:COUNT|off")]
    tcp_keepalive: Option<String>,

    /// TCP_USER_TIMEOUT on client sockets (and relay's upstream sockets): sent data
    /// unacknowledged this long (a zero window included) drops the connection; with
    /// keepalive it replaces COUNT (e.g. 30s), or "off" [default: off]
    #[arg(long, value_name = "SECS|off")]
    tcp_user_timeout: Option<String>,

    /// One record per closed connection (per relayed pair), written by a thread of
    /// its own: to this file (reopened on SIGUSR1, for logrotate), to stderr, or off
    /// [default: off]
    #[arg(long, value_name = "PATH|stderr|off")]
    access_log: Option<String>,

    /// Access log records as logfmt (text) or one JSON object per line [default: text]
    #[arg(long, value_name = "text|json", value_parser = config::parse_log_format)]
    access_log_format: Option<LogFormat>,

    /// Share of cleanly ended connections (eof, shutdown) that get a record, e.g. 0.1
    /// or 10%; every other close (resets, errors, timeouts) is always logged
    /// [default: 1]
    #[arg(long, value_name = "RATIO", value_parser = config::parse_sample)]
    access_log_sample: Option<f64>,
}

impl ServerArgs {
    fn apply(&self, s: &mut Settings) -> Result<(), LoadError> {
        if !self.listen.is_empty() {
            s.listen = Some(self.listen.concat());
        }
        s.workers = self.workers;
        s.pin_workers = self.pin_workers.then_some(true);
        s.backlog = self.backlog;
        s.max_connections = self.max_connections;
        s.max_connections_per_ip = self.max_connections_per_ip;
        s.max_pending_bytes = self.max_pending_bytes;
        s.max_buffered_bytes = self.max_buffered_bytes;
        s.idle_timeout = self.idle_timeout;
        s.drain_timeout = self.drain_timeout;
        s.shutdown_delay = self.shutdown_delay;
        s.accept_proxy = self.accept_proxy.then_some(true);
        if !self.trusted_proxies.is_empty() {
            s.trusted_proxies = Some(self.trusted_proxies.clone());
        }
        s.proxy_header_timeout = self.proxy_header_timeout;
        s.metrics_listen = self
            .metrics_listen
            .as_deref()
            .map(parse_metrics_listen)
            .transpose()
            .map_err(|reason| LoadError::Flag {
                flag: "metrics-listen",
                reason,
            })?;
        s.tcp_keepalive = self
            .tcp_keepalive
            .as_deref()
            .map(parse_keepalive)
            .transpose()
            .map_err(|reason| LoadError::Flag {
                flag: "tcp-keepalive",
                reason,
            })?;
        s.tcp_user_timeout = self
            .tcp_user_timeout
            .as_deref()
            .map(parse_user_timeout)
            .transpose()
            .map_err(|reason| LoadError::Flag {
                flag: "tcp-user-timeout",
                reason,
            })?;
        s.access_log = self
            .access_log
            .as_deref()
            .map(config::parse_log_target)
            .transpose()
            .map_err(|reason| LoadError::Flag {
                flag: "access-log",
                reason,
            })?;
        s.access_log_format = self.access_log_format;
        s.access_log_sample = self.access_log_sample;
        Ok(())
    }
}

impl Cli {
    /// The mode the subcommand names, if any, and what its flags set. A flag left out
    /// sets nothing, so that the file or the default decides.
    fn flag_settings(&self) -> Result<(Option<Mode>, Settings), LoadError> {
        let mut s = Settings {
            log_format: self.log_format,
            ..Settings::default()
        };
        let mode = match &self.command {
            Some(Command::Echo(server)) => {
                server.apply(&mut s)?;
                Some(Mode::Echo)
            }
            Some(Command::Http(http)) => {
                http.server.apply(&mut s)?;
                http.response.apply(&mut s);
                Some(Mode::Http)
            }
            Some(Command::Relay(relay)) => {
                relay.server.apply(&mut s)?;
                relay.upstream.apply(&mut s)?;
                Some(Mode::Relay)
            }
            Some(Command::Check) | None => None,
        };
        Ok((mode, s))
    }
}

/// The one way from the command line to a configuration, for start-up, `check` and
/// a reload alike: the flags over the `--config` file over the defaults, validated,
/// with `--max-connections` fitted to the open-file limit (which this raises to the
/// hard limit).
fn load_config(cli: &Cli) -> Result<Config, LoadError> {
    let (mode, flags) = cli.flag_settings()?;
    let loaded = config::load(mode, flags, cli.config.as_deref())?;
    let mut config = loaded.config;
    fit_open_file_limit(&mut config, loaded.given.max_connections.is_some());
    Ok(config)
}

/// Descriptors kept back from `--max-connections` for listeners, epoll instances,
/// eventfds and the acceptor's spare. The metrics endpoint's clients are kept back on
/// top of these when it runs, so that its port cannot push the workers into EMFILE.
const RESERVED_FDS: u64 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `check` answers in one line; what start-up would log (the open-file limit) is
    // noise there unless it is a warning.
    let default_level = match cli.command {
        Some(Command::Check) => "warn",
        _ => "info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // The flag, else the file's key: logging starts before the configuration is
    // loaded, so that the load's own lines are in the chosen format.
    let format = cli
        .log_format
        .or_else(|| cli.config.as_deref().and_then(config::file::log_format_in));
    // Block SIGINT/SIGTERM/SIGHUP/SIGUSR1 first: before any thread starts (the stderr
    // thread below is the first), so all inherit the mask, and before the slow part
    // of a start, so that a signal sent to a process a reload has just started waits
    // for it instead of killing it.
    let signals = match ShutdownSignals::block() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("edgepoll: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Through a thread of its own: a worker never waits on a stderr nobody reads.
    let stderr = match edgepoll::logs::Stderr::start() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("edgepoll: spawning the stderr log thread: {e}");
            return ExitCode::FAILURE;
        }
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(stderr);
    let json = format.unwrap_or_default() == LogFormat::Json;
    match format.unwrap_or_default() {
        // One object per line: time, level, fields (message included), target and the
        // thread's name, which says which worker wrote it.
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_thread_names(true)
            .init(),
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
    }
    let check = matches!(cli.command, Some(Command::Check));
    let code = match run(cli, signals) {
        Ok(code) => code,
        Err(e) => {
            fatal(json && !check, &format!("{e:#}"));
            ExitCode::FAILURE
        }
    };
    edgepoll::logs::flush();
    code
}

/// The one line saying why edgepoll stops. With `--log-format json` it is a JSON line
/// like every other (a pipeline that reads JSON must not lose the line that says why
/// the service is down); `check` answers a person, in text.
fn fatal(json: bool, message: &str) {
    if json {
        tracing::error!("{message}");
    } else {
        // After the lines logged before it.
        edgepoll::logs::flush();
        eprintln!("edgepoll: {message}");
    }
}

/// Names a worker to fail at start (fault injection for tests only).
const FAULT_WORKER_ENV: &str = "EDGEPOLL_TEST_FAIL_WORKER";

/// Exit status for a bad flag value, as clap uses for a bad flag.
const USAGE_ERROR: u8 = 2;

fn run(cli: Cli, signals: ShutdownSignals) -> anyhow::Result<ExitCode> {
    // The binary a reload starts: the path as it is on disk now (an upgraded package
    // replaces the file), and the same arguments (a --config file is read anew).
    let exe = exe_path()?;
    let argv: Vec<OsString> = std::env::args_os().skip(1).collect();
    if matches!(cli.command, Some(Command::Check)) && cli.config.is_none() {
        fatal(
            false,
            "check needs the file to check: edgepoll check --config FILE",
        );
        return Ok(ExitCode::from(USAGE_ERROR));
    }
    // Started by a reload: the running process hands over its listeners and, once
    // this one serves, its connections. (Never for `check`.)
    let mut predecessor = match cli.command {
        Some(Command::Check) => None,
        _ => handover::predecessor()?,
    };
    // Listeners that came from systemd are kept across reloads whatever --listen says.
    let activated: bool;
    let config = match load_config(&cli) {
        Ok(c) => c,
        Err(e) => {
            let json = cli
                .log_format
                .or_else(|| cli.config.as_deref().and_then(config::file::log_format_in))
                == Some(LogFormat::Json);
            fatal(
                json && !matches!(cli.command, Some(Command::Check)),
                &e.to_string(),
            );
            if let Some(pred) = &predecessor {
                pred.fail(&e.to_string());
            }
            return Ok(ExitCode::from(USAGE_ERROR));
        }
    };
    if let (Some(Command::Check), Some(path)) = (&cli.command, &cli.config) {
        if let Err(why) = access_log_writable(&config) {
            fatal(
                false,
                &format!("{}: access-log (--access-log): {why}", path.display()),
            );
            return Ok(ExitCode::from(USAGE_ERROR));
        }
        println!(
            "edgepoll: configuration {} is valid ({})",
            path.display(),
            summary(&config)
        );
        return Ok(ExitCode::SUCCESS);
    }
    let mode = config.mode;
    let sockets = match predecessor.as_mut() {
        Some(pred) => match pred.sockets(&config) {
            Ok(s) => {
                activated = pred.activated();
                s
            }
            Err(why) => {
                pred.fail(&why);
                anyhow::bail!("cannot take over from pid {}: {why}", pred.pid);
            }
        },
        None => {
            let (sockets, from_systemd) = listening_sockets(&config)?;
            activated = from_systemd;
            sockets
        }
    };
    // After a reload, the metrics endpoint starts once the counters have moved (see
    // Server::serve_metrics); meanwhile its listener queues scrapes.
    let mut sockets = sockets;
    let held_metrics = match predecessor {
        Some(_) => sockets.metrics.take(),
        None => None,
    };
    let server = match Server::start_with(config, sockets) {
        Ok(server) => server,
        Err(e) => {
            if let Some(pred) = &predecessor {
                pred.fail(&e.to_string());
            }
            return Err(e.into());
        }
    };
    let listen: Vec<String> = server.local_addrs().iter().map(|a| a.to_string()).collect();
    let held_addr = held_metrics
        .as_ref()
        .and_then(|fd| edgepoll::sys::socket::local_addr(std::os::fd::AsFd::as_fd(fd)).ok());
    let metrics = match server.metrics_addr().or(held_addr) {
        Some(a) => format!("metrics on http://{a}/metrics"),
        None => "metrics off".to_string(),
    };
    let workers = server.config().workers;
    tracing::info!(
        "edgepoll {} {}: listening on {} with {workers} worker{}; {metrics}",
        env!("CARGO_PKG_VERSION"),
        mode.name(),
        listen.join(", "),
        if workers == 1 { "" } else { "s" },
    );
    if mode == Mode::Relay {
        let r = &server.config().relay;
        // A name is shown with the addresses it has now: `db.svc:6379 (10.0.0.5:6379)`.
        let ups: Vec<String> = r
            .upstream_entries
            .iter()
            .map(|e| match &e.given {
                HostPort::Ip(addr) => addr.to_string(),
                name => {
                    let addrs: Vec<String> = e.addrs.iter().map(|a| a.to_string()).collect();
                    format!("{name} ({})", addrs.join(", "))
                }
            })
            .collect();
        let follow = match (r.names().count(), r.resolve_interval) {
            (0, _) => String::new(),
            (_, Some(every)) => format!(", names looked up every {every:?}"),
            (_, None) => ", names looked up at start-up only".to_string(),
        };
        let checks = r.health_check.as_ref().map_or(String::new(), |c| {
            format!(
                ", {} health checks every {:?} (timeout {:?}, rise {}, fall {})",
                c.kind.name(),
                c.interval,
                c.timeout,
                c.rise,
                c.fall
            )
        });
        let limit = r.max_conns_per_upstream.map_or(String::new(), |n| {
            format!(
                ", at most {n} per upstream, queue of {} for {:?}",
                r.max_queue, r.queue_timeout
            )
        });
        tracing::info!(
            "relaying to {} ({}, connect timeout {:?}, {} tr{} per client{}{}, {}{checks}{limit}{follow})",
            ups.join(", "),
            r.balance.name(),
            r.connect_timeout,
            r.tries(),
            if r.tries() == 1 { "y" } else { "ies" },
            if r.splice { ", splice" } else { "" },
            if r.send_proxy_v2 { ", PROXY v2" } else { "" },
            PeerTimeouts::upstreams(server.config()),
        );
    }
    if server.config().accept_proxy {
        tracing::info!(
            "reading a PROXY header (v1 or v2) first on every connection, from {} only; \
             header timeout {:?}",
            trusted(server.config()),
            server.config().proxy_header_timeout
        );
    }
    let clients = PeerTimeouts::clients(server.config());
    if clients != PeerTimeouts::default() {
        tracing::info!("client sockets: TCP {clients}");
    }
    let successor = predecessor.is_some();
    if !successor {
        announce_ready(&server);
    }
    // Fault injection for the test that a dead worker stops the process (tests/cli.rs):
    // the named worker fails as if its epoll_wait had.
    if let Some(id) = std::env::var(FAULT_WORKER_ENV)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        server.inject_worker_failure(id);
    }
    if let Some(pred) = predecessor.take() {
        let started = Instant::now();
        let from = pred.pid;
        // Before the old process can exit: systemd must know the service's new main
        // process by then (NotifyAccess=all lets this one say so), or it would take
        // the old one's exit for the service's.
        notify_systemd("MAINPID", systemd::main_pid(std::process::id()));
        match pred.take_over(&server) {
            Ok(moved) => {
                let m = &server.metrics().reload;
                m.total.with_label_values(&["success"]).inc();
                m.last_successful.set(1);
                m.last_success_timestamp.set(edgepoll::metrics::unix_now());
                tracing::info!(
                    "reloaded: took over from pid {from} with {moved} connection{} moved in {} ms",
                    if moved == 1 { "" } else { "s" },
                    started.elapsed().as_millis()
                );
            }
            // The predecessor died or broke the protocol mid-transfer: what arrived is
            // served; what did not closed with it.
            Err(e) => tracing::error!("taking over from pid {from}: {e}"),
        }
    }
    let mut server = server;
    if let Some(fd) = held_metrics {
        server.serve_metrics(fd)?;
    }
    if successor {
        announce_ready(&server);
    }
    let mut failure = None;
    let sig = loop {
        if let Some(sig) = signals.wait(Duration::from_millis(200))? {
            if sig == libc::SIGUSR1 {
                reopen_access_log(&server);
                continue;
            }
            if sig == libc::SIGHUP {
                server = match reload(server, &exe, &argv, activated) {
                    Reloaded::HandedOver(pid) => {
                        forward_pending(&signals, pid)?;
                        return Ok(ExitCode::SUCCESS);
                    }
                    Reloaded::Failed(server) => *server,
                };
                continue;
            }
            break Some(sig);
        }
        if let Some(why) = server.failure() {
            failure = Some(why);
            break None;
        }
        if server.is_finished() {
            anyhow::bail!("the server stopped by itself; see the errors above");
        }
    };
    if let (Some(sig), false) = (sig, server.config().shutdown_delay.is_zero()) {
        let delay = server.config().shutdown_delay;
        server.set_unready();
        tracing::info!(
            "{} received: /readyz answers 503; accepting for {delay:?} more before draining",
            edgepoll::sys::signal::name(sig)
        );
        let until = std::time::Instant::now() + delay;
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            if let Some(again) = signals.wait(left.min(Duration::from_millis(200)))? {
                if again == libc::SIGUSR1 {
                    reopen_access_log(&server);
                    continue;
                }
                if again == libc::SIGHUP {
                    tracing::warn!("SIGHUP received while shutting down: no reload");
                    continue;
                }
                tracing::info!(
                    "{} received again: draining now",
                    edgepoll::sys::signal::name(again)
                );
                break;
            }
            if server.failure().is_some() {
                break;
            }
        }
    }
    match (sig, &failure) {
        (Some(sig), _) => tracing::info!(
            "{} received: draining {} connections for up to {:?}",
            edgepoll::sys::signal::name(sig),
            server.open_connections(),
            server.config().drain_timeout
        ),
        (None, Some(why)) => tracing::error!(
            "{why}; draining the other workers' {} connections for up to {:?}, then \
             exiting with status 1 so that the supervisor restarts edgepoll",
            server.open_connections(),
            server.config().drain_timeout
        ),
        (None, None) => unreachable!("the wait loop ends with a signal or a failure"),
    }
    announce_draining();
    server.begin_drain();
    while !server.is_finished() {
        if let Some(sig) = signals.wait(Duration::from_millis(50))? {
            if sig == libc::SIGUSR1 {
                reopen_access_log(&server);
                continue;
            }
            if sig == libc::SIGHUP {
                tracing::warn!("SIGHUP received while draining: no reload");
                continue;
            }
            tracing::warn!(
                "{} received again: exiting without finishing the drain",
                edgepoll::sys::signal::name(sig)
            );
            return Ok(ExitCode::from(1));
        }
    }
    server.join();
    if failure.is_some() {
        return Ok(ExitCode::FAILURE);
    }
    tracing::info!("drained; exiting");
    Ok(ExitCode::SUCCESS)
}

/// For `check`: whether the access log file could be opened for appending, without
/// creating it (as start-up would): an existing file is opened, a new one needs its
/// directory.
fn access_log_writable(config: &Config) -> Result<(), String> {
    let Some(config::LogTarget::File(path)) = &config.access_log.target else {
        return Ok(());
    };
    if path.exists() {
        return std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map(drop)
            .map_err(|e| format!("open {}: {e}", path.display()));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    if dir.is_dir() {
        Ok(())
    } else {
        Err(format!(
            "{}: the directory {} does not exist",
            path.display(),
            dir.display()
        ))
    }
}

/// SIGUSR1: the access log file is opened anew (logrotate renamed it), as nginx
/// does. Without a file, there is nothing to reopen.
fn reopen_access_log(server: &Server) {
    match &server.config().access_log.target {
        Some(config::LogTarget::File(_)) => {
            // The writer logs the outcome.
            server.reopen_access_log();
        }
        _ => tracing::info!("SIGUSR1 received: no access log file to reopen"),
    }
}

/// The sockets to serve. Started by systemd with sockets (socket activation, e.g.
/// `edgepoll.socket`): those, and `--listen` is not bound, since the socket unit's
/// `ListenStream=` says where to listen; the metrics endpoint still binds
/// `--metrics-listen`. Otherwise every `--listen` address, bound here.
fn listening_sockets(config: &Config) -> anyhow::Result<(Sockets, bool)> {
    let inherited = systemd::listen_fds()?;
    if inherited.is_empty() {
        return Ok((Sockets::bind(config)?, false));
    }
    let addrs: Vec<String> = inherited
        .iter()
        .map(|fd| socket::local_addr(fd.as_fd()).map(|a| a.to_string()))
        .collect::<std::io::Result<_>>()?;
    tracing::info!(
        "socket activation: serving the {} socket{} the service manager passed (LISTEN_FDS): {}",
        addrs.len(),
        if addrs.len() == 1 { "" } else { "s" },
        addrs.join(", ")
    );
    // The default is never "given", so only an address someone chose is reported.
    if config.listen != Config::new(config.mode).listen {
        let listen: Vec<String> = config.listen.iter().map(|a| a.to_string()).collect();
        tracing::info!(
            "--listen {} ignored: the inherited sockets replace it",
            listen.join(", ")
        );
    }
    let metrics = config
        .metrics_listen
        .map(Endpoint::bind)
        .transpose()
        .map_err(StartError::Metrics)?;
    Ok((
        Sockets {
            listeners: inherited,
            metrics,
        },
        true,
    ))
}

/// Tells systemd (`Type=notify`) that edgepoll serves, with a status line for
/// `systemctl status`. Does nothing when systemd did not ask (no NOTIFY_SOCKET).
fn announce_ready(server: &Server) {
    let addrs: Vec<String> = server.local_addrs().iter().map(|a| a.to_string()).collect();
    let status = format!(
        "serving {} on {}",
        server.config().mode.name(),
        addrs.join(", ")
    );
    // STATUS first, so that the unit shows it from the moment it is active.
    notify_systemd("STATUS", systemd::status(&status));
    notify_systemd("READY=1", systemd::ready());
}

/// Tells systemd that edgepoll drains and will exit.
fn announce_draining() {
    notify_systemd("STOPPING=1", systemd::stopping());
}

/// A notification that fails is logged, not fatal: systemd then times the unit out as
/// it would a service that never notifies, and the log says why.
fn notify_systemd(what: &str, sent: std::io::Result<bool>) {
    match sent {
        Ok(true) => tracing::debug!("systemd notified: {what}"),
        Ok(false) => {}
        Err(e) => tracing::warn!("telling systemd {what}: {e}"),
    }
}

/// How a reload ended for the running process.
enum Reloaded {
    /// The new process (this pid) serves everything: this one exits.
    HandedOver(u32),
    /// The new process could not start or refused: this one goes on serving.
    Failed(Box<Server>),
}

/// The path this binary was started by, as a path, not resolved: a reload starts
/// whatever that path names then. An upgrade that points a symlink at a new version
/// (`/usr/local/bin/edgepoll -> /opt/edgepoll-1.1/edgepoll`) takes effect, which the
/// resolved path of /proc/self/exe would miss. A bare name is looked up in PATH now,
/// as the shell did; relative paths are made absolute against the start directory.
fn exe_path() -> std::io::Result<PathBuf> {
    let arg0 = std::env::args_os().next().map(PathBuf::from);
    if let Some(arg0) = arg0 {
        if arg0.components().count() > 1 {
            return Ok(std::env::current_dir()?.join(arg0));
        }
        if let Some(path) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&path) {
                let candidate = dir.join(&arg0);
                if candidate.is_file() {
                    return Ok(if candidate.is_absolute() {
                        candidate
                    } else {
                        std::env::current_dir()?.join(candidate)
                    });
                }
            }
        }
    }
    std::env::current_exe()
}

/// Signals that arrived for this process while it handed over (a stop right after a
/// reload, or another reload) are meant for the service, which the new process now
/// is: they go to it.
fn forward_pending(signals: &ShutdownSignals, pid: u32) -> anyhow::Result<()> {
    while let Some(sig) = signals.wait(Duration::ZERO)? {
        let name = edgepoll::sys::signal::name(sig);
        match edgepoll::sys::signal::send(pid, sig) {
            Ok(()) => tracing::info!("{name} arrived during the hand-over: passed to pid {pid}"),
            Err(e) => tracing::warn!("{name} arrived during the hand-over: {e}"),
        }
    }
    Ok(())
}

/// SIGHUP: starts the binary on disk with the same arguments as this process's
/// successor and hands it the listeners and the connections. On any failure before
/// the successor is ready, it is killed and this process goes on as before; the
/// failure is logged and counted.
fn reload(server: Server, exe: &std::path::Path, args: &[OsString], activated: bool) -> Reloaded {
    let started = Instant::now();
    tracing::info!("SIGHUP received: reloading ({})", exe.display());
    notify_systemd("RELOADING=1", systemd::reloading());
    let attempt =
        handover::start_successor(&server, exe, args, activated).and_then(|mut s| {
            match s.wait_ready() {
                Ok(ready) => Ok((s, ready)),
                Err(e) => {
                    s.abort();
                    Err(e)
                }
            }
        });
    let (successor, ready) = match attempt {
        Ok(pair) => pair,
        Err(e) => {
            // The new process may have set its options on the shared listeners.
            server.restore_listener_options();
            let m = &server.metrics().reload;
            m.total.with_label_values(&["failure"]).inc();
            m.last_successful.set(0);
            tracing::error!("reload failed: {e}; still serving with the running configuration");
            notify_systemd("READY=1", systemd::ready());
            return Reloaded::Failed(Box::new(server));
        }
    };
    tracing::info!(
        "pid {} is serving; handing over {} connections",
        ready.pid,
        server.open_connections()
    );
    match successor.transfer(server, &ready) {
        Ok(moved) => tracing::info!(
            "handed over to pid {} ({moved} connections) in {} ms; exiting",
            ready.pid,
            started.elapsed().as_millis()
        ),
        Err(handover::TransferError::Resumed {
            server,
            error,
            lost,
            kept,
        }) => {
            let m = &server.metrics().reload;
            m.total.with_label_values(&["failure"]).inc();
            m.last_successful.set(0);
            tracing::error!(
                "reload failed: pid {} stopped taking connections ({error}); {lost} went with it; \
                 still serving {kept} and accepting with the running configuration",
                ready.pid
            );
            notify_systemd("MAINPID", systemd::main_pid(std::process::id()));
            notify_systemd("READY=1", systemd::ready());
            return Reloaded::Failed(server);
        }
        Err(e) => tracing::error!("handing over to pid {}: {e}; exiting", ready.pid),
    }
    Reloaded::HandedOver(ready.pid)
}

/// What `check` reports of a valid configuration: the mode, the listeners, the
/// workers, the connection limit (as fitted to the open-file limit), the metrics
/// endpoint and, for relay, the upstreams.
/// The `--trusted-proxy` ranges, for a log line.
fn trusted(config: &Config) -> String {
    let ranges: Vec<String> = config
        .trusted_proxies
        .iter()
        .map(|c| c.to_string())
        .collect();
    ranges.join(", ")
}

fn summary(config: &Config) -> String {
    let plural =
        |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    let list = |addrs: &[SocketAddr]| {
        addrs
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut parts = vec![
        config.mode.name().to_string(),
        format!(
            "{} on {}",
            plural(config.listen.len(), "listener", "listeners"),
            list(&config.listen)
        ),
        plural(config.workers, "worker", "workers"),
        format!("at most {} connections", config.max_connections),
        match config.metrics_listen {
            Some(a) => format!("metrics on {a}"),
            None => "metrics off".to_string(),
        },
    ];
    if config.mode == Mode::Relay {
        let ups = &config.relay.upstreams;
        parts.push(format!(
            "{} {}",
            plural(ups.len(), "upstream", "upstreams"),
            list(ups)
        ));
    }
    if config.accept_proxy {
        parts.push(format!("PROXY headers from {}", trusted(config)));
    }
    parts.join(", ")
}

/// Raises the soft open-file limit to the hard one, and lowers `--max-connections` to
/// what that limit can hold, as Redis does with maxclients.
fn fit_open_file_limit(config: &mut Config, explicit: bool) {
    let (soft, hard) = match rlimit::nofile() {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("{e}; keeping --max-connections {}", config.max_connections);
            return;
        }
    };
    let mut limit = soft;
    if soft < hard {
        match rlimit::set_nofile_soft(hard) {
            Ok(()) => limit = hard,
            Err(e) => tracing::warn!("{e}; the open-file limit stays at {soft}"),
        }
    }
    let metrics_clients = match config.metrics_listen {
        Some(_) => edgepoll::metrics::endpoint::MAX_CLIENTS as u64,
        None => 0,
    };
    let reserved = RESERVED_FDS + 2 * config.workers as u64 + metrics_clients;
    // A relayed client holds its upstream socket too, and with --splice two pipes.
    let per_connection = match (config.mode, config.relay.splice) {
        (Mode::Relay, true) => 6,
        (Mode::Relay, false) => 2,
        _ => 1,
    };
    let capacity = (limit.saturating_sub(reserved) / per_connection).max(1);
    if (config.max_connections as u64) > capacity {
        let msg = format!(
            "open-file limit is {limit}: --max-connections lowered from {} to {capacity}",
            config.max_connections
        );
        if explicit {
            tracing::warn!("{msg}; raise it with ulimit -n or LimitNOFILE=");
        } else {
            tracing::info!("{msg}");
        }
        config.max_connections = capacity as usize;
    } else {
        tracing::debug!("open-file limit {limit}, room for {capacity} connections");
    }
}
