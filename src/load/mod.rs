//! edgeload: a wrk-style load generator for echo (`tcp://`) and HTTP (`http://`)
//! services, on the same edge-triggered engine and `sys` layer as the server.
//!
//! - `engine`: one thread's epoll loop over its share of the connections.
//! - `plan`: `--rate` as a constant, a ramp or steps, and the exact schedule it gives.
//! - `series`: figures per step of the plan and per second (`--timeseries`,
//!   `--hdr-log`), merged from the threads as each second ends.
//! - `pattern`: the verified byte stream sent to echo services.
//! - `request`: the HTTP request sent (`-m`, `-H`, `--body`, `--http1.0`), built once.
//! - `http`: the incremental response parser.
//! - `report`: the wrk-like text, the JSON object and the merged statistics.
//! - `plot`: the latency percentile curve and requests/s and p99 over time, as SVG.
//! - `gates`: the CI limits a run must meet (`--max-p99`, `--min-rps`, ...).

pub mod engine;
pub mod gates;
pub mod http;
pub mod pattern;
pub mod plan;
pub mod plot;
pub mod report;
pub mod request;
pub mod series;

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

pub use gates::Gate;
pub use plan::RatePlan;
pub use report::Report;
pub use request::RequestSpec;

/// What edgeload talks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `tcp://HOST:PORT`: the echo protocol; every byte is verified.
    Echo { addr: SocketAddr },
    /// `http://HOST:PORT/PATH`: GET (or what [`RequestSpec`] says) with keep-alive.
    Http {
        addr: SocketAddr,
        host: String,
        path: String,
    },
}

impl Target {
    pub fn addr(&self) -> SocketAddr {
        match self {
            Target::Echo { addr } | Target::Http { addr, .. } => *addr,
        }
    }

    /// Parses `tcp://HOST:PORT` or `http://HOST[:PORT]/PATH`, resolving HOST now.
    pub fn parse(url: &str) -> Result<Target, LoadError> {
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            LoadError::Url(format!(
                "'{url}' has no scheme; use tcp://HOST:PORT or http://HOST:PORT/PATH"
            ))
        })?;
        match scheme {
            "tcp" => {
                let authority = rest.trim_end_matches('/');
                if authority.contains('/') {
                    return Err(LoadError::Url(format!("'{url}': a tcp:// URL has no path")));
                }
                Ok(Target::Echo {
                    addr: resolve(authority, None, url)?,
                })
            }
            "http" => {
                let (authority, path) = match rest.find('/') {
                    Some(i) => (&rest[..i], &rest[i..]),
                    None => (rest, "/"),
                };
                // The path goes into the request line as given: a space, CR, LF or
                // other control would split it or smuggle in a header.
                if let Some(c) = path.chars().find(|c| !c.is_ascii_graphic()) {
                    return Err(LoadError::Url(format!(
                        "{url:?}: the path holds {c:?}; percent-encode it (a space is %20)"
                    )));
                }
                let addr = resolve(authority, Some(80), url)?;
                Ok(Target::Http {
                    addr,
                    host: authority.to_string(),
                    path: path.to_string(),
                })
            }
            "https" => Err(LoadError::Url(format!(
                "'{url}': https is not supported; edgeload speaks plain HTTP/1.1"
            ))),
            other => Err(LoadError::Url(format!(
                "'{url}': unknown scheme '{other}'; use tcp:// or http://"
            ))),
        }
    }
}

fn resolve(authority: &str, default_port: Option<u16>, url: &str) -> Result<SocketAddr, LoadError> {
    if authority.is_empty() {
        return Err(LoadError::Url(format!("'{url}' has no host")));
    }
    let with_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.chars().all(|c| c.is_ascii_digit()) && !p.is_empty())
        && !authority.ends_with(']')
    {
        authority.to_string()
    } else if let Some(port) = default_port {
        format!("{authority}:{port}")
    } else {
        return Err(LoadError::Url(format!(
            "'{url}' needs a port: tcp://HOST:PORT"
        )));
    };
    with_port
        .to_socket_addrs()
        .map_err(|e| LoadError::Url(format!("'{url}': cannot resolve '{with_port}': {e}")))?
        .next()
        .ok_or_else(|| LoadError::Url(format!("'{url}': '{with_port}' has no address")))
}

/// Highest `--rate`: ten million requests a second, more than one machine's loopback
/// serves, and few enough that the schedule, which counts each request as it falls due
/// (and each never sent at the end), keeps up with the clock: at 1e9 a 1 s run took
/// 19 s.
const MAX_RATE: f64 = 1e7;

/// A load test to run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub url: String,
    pub target: Target,
    /// Connections, spread over the threads.
    pub connections: usize,
    pub threads: usize,
    pub duration: Duration,
    /// Requests per second in total (constant, a ramp or steps); None: closed loop.
    pub rate: Option<RatePlan>,
    /// Echo request size in bytes.
    pub size: usize,
    /// Requests in flight per connection (pipelining).
    pub depth: usize,
    /// A request unanswered this long counts as a timeout and its connection is replaced.
    pub timeout: Duration,
    /// Close each connection after its response and open a new one (connection churn).
    pub reconnect: bool,
    /// HTTP: method, headers, body and version of the request; refused on `tcp://`.
    pub request: RequestSpec,
    /// Limits checked after the run; each result is in the report.
    pub gates: Vec<Gate>,
    /// The run's nonce, mixed into every echo connection's seed; None: a random one.
    pub nonce: Option<u64>,
    /// One line per second to this file: CSV if it ends in `.csv`, JSON lines otherwise.
    pub timeseries: Option<PathBuf>,
    /// An HdrHistogram interval log, one interval per second, to this file.
    pub hdr_log: Option<PathBuf>,
}

impl LoadConfig {
    /// wrk's defaults: 10 connections, 1 thread, 10 s; 64-byte echo requests, depth 1,
    /// 2 s timeout.
    pub fn new(target: Target, url: &str) -> LoadConfig {
        LoadConfig {
            url: url.to_string(),
            target,
            connections: 10,
            threads: 1,
            duration: Duration::from_secs(10),
            rate: None,
            size: 64,
            depth: 1,
            timeout: Duration::from_secs(2),
            reconnect: false,
            request: RequestSpec::default(),
            gates: Vec::new(),
            nonce: None,
            timeseries: None,
            hdr_log: None,
        }
    }

    pub fn validate(&self) -> Result<(), LoadError> {
        let bad = |m: &str| Err(LoadError::Config(m.to_string()));
        if self.connections == 0 {
            return bad("-c/--connections must be at least 1");
        }
        if self.threads == 0 {
            return bad("-t/--threads must be at least 1");
        }
        if self.threads > self.connections {
            return bad(
                "-c/--connections must be at least -t/--threads (each thread needs a connection)",
            );
        }
        if self.duration.is_zero() {
            return bad("-d/--duration must be greater than zero");
        }
        if self.size == 0 {
            return bad("--size must be at least 1 byte");
        }
        if self.depth == 0 {
            return bad("--depth must be at least 1");
        }
        if self.reconnect && self.depth != 1 {
            return bad("--reconnect sends one request per connection; it needs --depth 1");
        }
        if self.timeout.is_zero() {
            return bad("--timeout must be greater than zero");
        }
        if let Some(plan) = &self.rate {
            plan.validate().map_err(LoadError::Config)?;
            if let Some(implied) = plan.implied_duration() {
                if implied != self.duration {
                    return Err(LoadError::Config(format!(
                        "-d/--duration {:?} disagrees with --rate {}: the steps last {:?}; \
                         leave -d out (it defaults to steps x --step)",
                        self.duration,
                        plan.describe(),
                        implied
                    )));
                }
            }
            // Each thread's share falls due every 1/share seconds, a Duration: over
            // 1e9/s it rounds to zero (the schedule never catches up with the clock),
            // and a share under one request per 1e9 s does not fit one. A ramp or steps
            // pass through each of their rates, so each is held to this.
            for r in plan.rates() {
                if r > MAX_RATE || r / (self.connections as f64) < 1e-9 {
                    return Err(LoadError::Config(format!(
                        "--rate {r}: must be at most {MAX_RATE:e} requests per second, and at \
                         least {:e} with {} connections (one request per 1e9 s each)",
                        self.connections as f64 / 1e9,
                        self.connections
                    )));
                }
            }
        }
        for gate in &self.gates {
            gate.validate()?;
        }
        self.http_request()?;
        Ok(())
    }

    /// The bytes of one HTTP request (empty for echo), or why the flags that shape it
    /// are wrong.
    pub fn http_request(&self) -> Result<Vec<u8>, LoadError> {
        match &self.target {
            Target::Http { host, path, .. } => request::build_request(host, path, &self.request),
            Target::Echo { .. } => match self.request.http_only_flag() {
                Some(flag) => Err(LoadError::Config(format!(
                    "{flag} needs an http:// URL; {} is the echo protocol",
                    self.url
                ))),
                None => Ok(Vec::new()),
            },
        }
    }
}

/// Why a load test could not run.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}")]
    Url(String),
    #[error("{0}")]
    Config(String),
    #[error("cannot connect to {addr}: {source}")]
    Unreachable {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Live totals across threads, for a progress line.
#[derive(Debug, Default)]
pub struct Progress {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
}

/// Runs the load test. `on_tick` is called about once a second from this thread with
/// the elapsed time and the live totals.
pub fn run(
    config: &LoadConfig,
    mut on_tick: impl FnMut(Duration, &Progress),
) -> Result<Report, LoadError> {
    config.validate()?;
    let addr = config.target.addr();
    // One blocking probe, so that a wrong address is one clear error, not a flood of
    // connect errors in the report.
    TcpStream::connect_timeout(&addr, config.timeout.min(Duration::from_secs(5)))
        .map_err(|source| LoadError::Unreachable { addr, source })?;

    // Built once; every thread sends copies of it.
    let request: Arc<[u8]> = config.http_request()?.into();
    let progress = Arc::new(Progress::default());
    let nonce = config.nonce.unwrap_or_else(pattern::run_nonce);
    let config = Arc::new(config.clone());
    let mut recorder = series::Recorder::new(
        config.threads,
        config.duration,
        config.rate.is_some(),
        config.timeseries.as_deref(),
        config.hdr_log.as_deref(),
        SystemTime::now(),
    )
    .map_err(LoadError::Config)?;
    // Each thread hands over one interval per second; this thread merges and writes them.
    let (to_main, seconds) = crossbeam_channel::unbounded();
    let start = Instant::now();
    let end = start + config.duration;
    let mut handles = Vec::with_capacity(config.threads);
    for id in 0..config.threads {
        // Connections split as evenly as possible: the first `extra` threads get one more.
        let base = config.connections / config.threads;
        let extra = config.connections % config.threads;
        let conns = base + usize::from(id < extra);
        // Each thread puts its share of the plan due, on its own connections.
        let share = engine::Share {
            id,
            conns,
            plan: config
                .rate
                .as_ref()
                .map(|p| p.scaled(conns as f64 / config.connections as f64)),
            seconds: to_main.clone(),
        };
        let config = Arc::clone(&config);
        let progress = Arc::clone(&progress);
        let request = Arc::clone(&request);
        handles.push(
            std::thread::Builder::new()
                .name(format!("edgeload-{id}"))
                .spawn(move || {
                    engine::run_thread(share, nonce, &config, &request, start, end, &progress)
                })?,
        );
    }
    drop(to_main);
    let mut next_tick = start + Duration::from_secs(1);
    while !handles.iter().all(|h| h.is_finished()) {
        std::thread::sleep(Duration::from_millis(20));
        for interval in seconds.try_iter() {
            recorder.take(interval);
        }
        if Instant::now() >= next_tick {
            on_tick(start.elapsed(), &progress);
            next_tick += Duration::from_secs(1);
        }
    }
    for interval in seconds.try_iter() {
        recorder.take(interval);
    }
    let mut stats = Vec::with_capacity(handles.len());
    for h in handles {
        match h.join() {
            Ok(Ok(s)) => stats.push(s),
            Ok(Err(e)) => return Err(LoadError::Io(e)),
            Err(_) => {
                return Err(LoadError::Io(std::io::Error::other(
                    "a load thread panicked",
                )))
            }
        }
    }
    // A file that could not be written costs the file, not the run's report.
    let (seconds, write_error) = recorder.finish();
    // The run is `-d` long: every thread stops at `end`, and nothing that happens after
    // it is counted. The time until this thread saw them stop (it polls every 20 ms)
    // is not the run's, and dividing by it understated requests/s (and --min-rps).
    let mut report = Report::merge(&config, config.duration, nonce, stats, seconds);
    report.write_error = write_error;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            Target::parse("tcp://127.0.0.1:7000").unwrap(),
            Target::Echo {
                addr: "127.0.0.1:7000".parse().unwrap()
            }
        );
        assert_eq!(
            Target::parse("http://127.0.0.1:8080/x?y=1").unwrap(),
            Target::Http {
                addr: "127.0.0.1:8080".parse().unwrap(),
                host: "127.0.0.1:8080".into(),
                path: "/x?y=1".into()
            }
        );
        assert_eq!(
            Target::parse("http://[::1]").unwrap().addr(),
            "[::1]:80".parse().unwrap()
        );
        assert_eq!(
            Target::parse("http://localhost:81").unwrap().addr().port(),
            81
        );
        for (bad, says) in [
            ("ftp://x:1", "unknown scheme 'ftp'"),
            ("127.0.0.1:7000", "no scheme"),
            ("tcp://127.0.0.1", "needs a port"),
            ("https://x:1/", "not supported"),
            ("tcp://:7000", "cannot resolve"),
        ] {
            let e = Target::parse(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn zero_connections_is_a_config_error() {
        let t = Target::parse("tcp://127.0.0.1:1").unwrap();
        let mut c = LoadConfig::new(t, "tcp://127.0.0.1:1");
        c.connections = 0;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--connections"));
    }
}
