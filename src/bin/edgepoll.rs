//! `edgepoll`: argument parsing, logging and signals; the server is the library's.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use edgepoll::config::{self, parse_duration, parse_listen, parse_size, Config, Mode};
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
        (default info)."
)]
struct Cli {
    #[command(subcommand)]
    mode: Command,
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
    /// Upstream to relay to, IP:PORT or HOST:PORT (resolved at start-up; a name with
    /// several addresses adds each); repeat for several
    #[arg(short, long = "upstream", value_name = "ADDR", required = true, value_parser = parse_listen)]
    upstreams: Vec<Vec<SocketAddr>>,

    /// How a client's upstream is picked
    #[arg(long, value_enum, default_value = "round-robin")]
    balance: BalanceArg,

    /// An upstream connect not complete by then fails (reason timeout)
    #[arg(long, value_name = "SECS", default_value = "5", value_parser = parse_duration)]
    connect_timeout: Duration,

    /// An upstream whose connect failed is skipped for this long (0: never skipped);
    /// a lone upstream is never skipped
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_duration)]
    fail_timeout: Duration,

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
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BalanceArg {
    /// Each upstream in turn
    RoundRobin,
    /// The upstream with the fewest open connections
    LeastConn,
}

impl UpstreamArgs {
    fn apply(self, r: &mut config::RelayConfig) {
        let mut upstreams: Vec<SocketAddr> = Vec::new();
        for addr in self.upstreams.into_iter().flatten() {
            if !upstreams.contains(&addr) {
                upstreams.push(addr);
            }
        }
        r.upstreams = upstreams;
        r.balance = match self.balance {
            BalanceArg::RoundRobin => config::Balance::RoundRobin,
            BalanceArg::LeastConn => config::Balance::LeastConn,
        };
        r.connect_timeout = self.connect_timeout;
        r.fail_timeout = self.fail_timeout;
        r.connect_retries = self.connect_retries;
        r.splice = self.splice;
        r.send_proxy_v2 = self.send_proxy_v2;
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
    body_file: Option<std::path::PathBuf>,

    /// Response status code
    #[arg(long, value_name = "CODE", default_value_t = 200)]
    status: u16,

    /// Content-Type of the response
    #[arg(long, value_name = "TYPE", default_value = "text/plain")]
    content_type: String,

    /// Extra response header; repeat for several
    #[arg(long = "header", value_name = "'Name: value'", value_parser = config::parse_header)]
    headers: Vec<(String, String)>,

    /// A request head larger than this gets 431 and the connection is closed
    #[arg(long, value_name = "BYTES", default_value = "8KiB", value_parser = parse_size)]
    max_header_bytes: usize,

    /// A request head not complete this long after it began (or after the connection
    /// opened) gets 408 and the connection is closed (slowloris)
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_duration)]
    header_timeout: Duration,
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
    #[arg(long, value_name = "N", default_value_t = config::DEFAULT_BACKLOG)]
    backlog: u32,

    /// Open connections allowed; beyond it new ones are accepted and closed at once
    /// (counted as rejected). Lowered to fit the open-file limit if needed [default: 100000]
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,

    /// Connections allowed from one client IP; beyond it new ones are accepted and
    /// closed at once (counted as rejected, reason per_ip_limit) [default: off]
    #[arg(long, value_name = "N")]
    max_connections_per_ip: Option<usize>,

    /// Outbound bytes held per connection for a peer that does not read; at the cap the
    /// server stops reading from it (e.g. 262144, 256KiB, 1MiB)
    #[arg(long, value_name = "BYTES", default_value = "256KiB", value_parser = parse_size)]
    max_pending_bytes: usize,

    /// Outbound bytes all connections together may hold; past it, connections that hold
    /// buffered bytes stop reading until the total falls (e.g. 4GiB) [default: a quarter
    /// of physical memory]
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    max_buffered_bytes: Option<usize>,

    /// Close connections (relayed pairs) with no traffic either way for this long
    /// (e.g. 300, 30s, 5m) [default: off for echo and http, 10m for relay]
    #[arg(long, value_name = "SECS", value_parser = parse_duration)]
    idle_timeout: Option<Duration>,

    /// On SIGTERM/SIGINT, time open connections get to flush what they owe
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_duration)]
    drain_timeout: Duration,

    /// Address of the Prometheus endpoint (/metrics, /healthz, /readyz), or "off"
    #[arg(long, value_name = "ADDR|off", default_value = "127.0.0.1:9464")]
    metrics_listen: String,
}

impl ResponseArgs {
    fn apply(self, h: &mut config::HttpConfig) -> anyhow::Result<()> {
        if let Some(body) = self.body {
            h.body = body.into_bytes();
        }
        if let Some(path) = self.body_file {
            h.body = std::fs::read(&path)
                .map_err(|e| anyhow::anyhow!("--body-file {}: {e}", path.display()))?;
        }
        h.status = self.status;
        h.content_type = self.content_type;
        h.headers = self.headers;
        h.max_header_bytes = self.max_header_bytes;
        h.header_timeout = self.header_timeout;
        Ok(())
    }
}

/// Descriptors kept back from `--max-connections` for listeners, epoll instances,
/// eventfds and the acceptor's spare. The metrics endpoint's clients are kept back on
/// top of these when it runs, so that its port cannot push the workers into EMFILE.
const RESERVED_FDS: u64 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("edgepoll: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Names a worker to fail at start (fault injection for tests only).
const FAULT_WORKER_ENV: &str = "EDGEPOLL_TEST_FAIL_WORKER";

/// Exit status for a bad flag value, as clap uses for a bad flag.
const USAGE_ERROR: u8 = 2;

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let (mode, args, http, relay) = match cli.mode {
        Command::Echo(args) => (Mode::Echo, args, None, None),
        Command::Http(http) => (Mode::Http, http.server, Some(http.response), None),
        Command::Relay(relay) => (Mode::Relay, relay.server, None, Some(relay.upstream)),
    };
    let config = (|| {
        let mut config = Config::new(mode);
        if let Some(relay) = relay {
            relay.apply(&mut config.relay);
        }
        build_config(&mut config, args)?;
        if let Some(response) = http {
            response.apply(&mut config.http)?;
        }
        config.validate()?;
        Ok::<Config, anyhow::Error>(config)
    })();
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("edgepoll: {e:#}");
            return Ok(ExitCode::from(USAGE_ERROR));
        }
    };
    // Block SIGINT/SIGTERM before any thread starts, so all inherit the mask.
    let signals = ShutdownSignals::block()?;
    let sockets = listening_sockets(&config)?;
    let server = Server::start_with(config, sockets)?;
    let listen: Vec<String> = server.local_addrs().iter().map(|a| a.to_string()).collect();
    let metrics = match server.metrics_addr() {
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
        let ups: Vec<String> = r.upstreams.iter().map(|a| a.to_string()).collect();
        tracing::info!(
            "relaying to {} ({}, connect timeout {:?}, {} tr{} per client{}{})",
            ups.join(", "),
            r.balance.name(),
            r.connect_timeout,
            r.tries(),
            if r.tries() == 1 { "y" } else { "ies" },
            if r.splice { ", splice" } else { "" },
            if r.send_proxy_v2 { ", PROXY v2" } else { "" },
        );
    }
    announce_ready(&server);
    // Fault injection for the test that a dead worker stops the process (tests/cli.rs):
    // the named worker fails as if its epoll_wait had.
    if let Some(id) = std::env::var(FAULT_WORKER_ENV)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        server.inject_worker_failure(id);
    }
    let mut failure = None;
    let sig = loop {
        if let Some(sig) = signals.wait(Duration::from_millis(200))? {
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

/// The sockets to serve. Started by systemd with sockets (socket activation, e.g.
/// `edgepoll.socket`): those, and `--listen` is not bound, since the socket unit's
/// `ListenStream=` says where to listen; the metrics endpoint still binds
/// `--metrics-listen`. Otherwise every `--listen` address, bound here.
fn listening_sockets(config: &Config) -> anyhow::Result<Sockets> {
    let inherited = systemd::listen_fds()?;
    if inherited.is_empty() {
        return Ok(Sockets::bind(config)?);
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
    Ok(Sockets {
        listeners: inherited,
        metrics,
    })
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

/// Applies the flags every mode shares, and fits `--max-connections` to the
/// open-file limit.
fn build_config(config: &mut Config, args: ServerArgs) -> anyhow::Result<()> {
    if !args.listen.is_empty() {
        let mut listen: Vec<SocketAddr> = Vec::new();
        for addr in args.listen.into_iter().flatten() {
            if !listen.contains(&addr) {
                listen.push(addr);
            }
        }
        config.listen = listen;
    }
    if let Some(w) = args.workers {
        config.workers = w;
    }
    config.pin_workers = args.pin_workers;
    config.max_connections_per_ip = args.max_connections_per_ip;
    config.backlog = args.backlog;
    config.max_pending_bytes = args.max_pending_bytes;
    if let Some(b) = args.max_buffered_bytes {
        config.max_buffered_bytes = b;
    }
    if args.idle_timeout.is_some() {
        config.idle_timeout = args.idle_timeout;
    }
    config.drain_timeout = args.drain_timeout;
    config.metrics_listen = match args.metrics_listen.as_str() {
        "off" | "none" | "" => None,
        s => Some(
            *parse_listen(s)
                .map_err(|e| anyhow::anyhow!("--metrics-listen: {e}"))?
                .first()
                .expect("parse_listen returns at least one address"),
        ),
    };
    let explicit = args.max_connections.is_some();
    config.max_connections = args
        .max_connections
        .unwrap_or(config::DEFAULT_MAX_CONNECTIONS);
    fit_open_file_limit(config, explicit);
    Ok(())
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
