//! `edgeload`: argument parsing and output; the engine is the library's `load` module.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use edgepoll::config::{parse_duration, parse_size};
use edgepoll::load::gates::parse_ratio;
use edgepoll::load::{self, Gate, LoadConfig, LoadError, Target};

#[derive(Parser)]
#[command(
    name = "edgeload",
    version,
    about = "A wrk-style load generator for TCP echo (every byte verified) and HTTP",
    after_help = "Examples:\n  \
        edgeload -c 50 -d 10s --latency tcp://127.0.0.1:7000\n  \
        edgeload -c 100 -t 2 --depth 16 http://127.0.0.1:8080/\n  \
        edgeload -c 10 --rate 5000 -d 30s --latency --plot latency.svg tcp://127.0.0.1:7000\n  \
        edgeload -c 50 --rate 1000:20000 -d 60s --timeseries run.csv http://127.0.0.1:8080/\n  \
        edgeload -c 50 --rate 1000,5000,10000 --step 10s --hdr-log run.hlog http://127.0.0.1:8080/\n  \
        edgeload -m POST -H 'Content-Type: application/json' --body '{\"k\":1}' http://127.0.0.1:8080/api\n  \
        edgeload -d 10s --max-p99 5ms --max-error-rate 1% --min-rps 1000 http://127.0.0.1:8080/\n\n\
        Exit status:\n  \
        0  success, every gate met\n  \
        1  an echoed byte differed from what was sent, or more came back than was\n     \
        sent (wins over 3 when both happen)\n  \
        2  bad arguments or an unreachable target\n  \
        3  a CI gate (--max-p99, --max-p999, --max-error-rate, --min-rps) was missed;\n     \
        each missed gate is one 'edgeload: gate failed: ...' line on stderr"
)]
struct Cli {
    /// Connections to keep open, spread over the threads
    #[arg(
        short = 'c',
        long = "connections",
        value_name = "CONNS",
        default_value_t = 10
    )]
    connections: usize,

    /// Threads, each with its own epoll instance
    #[arg(
        short = 't',
        long = "threads",
        value_name = "THREADS",
        default_value_t = 1
    )]
    threads: usize,

    /// Test duration (10s, 2m, 500ms, 500us) [default: 10s; with --step, the steps x
    /// --step]
    #[arg(short = 'd', long = "duration", value_name = "DURATION", value_parser = parse_duration)]
    duration: Option<Duration>,

    /// Open loop: requests per second in total, constant (5000), a linear ramp over the
    /// run (1000:20000) or a list of rates held --step each (1000,5000,10000); latency
    /// is then measured from each request's due time, so stalls are not hidden
    /// [default: closed loop]
    #[arg(long, value_name = "RATE|FROM:TO|R1,R2,...")]
    rate: Option<String>,

    /// How long each rate of a --rate list is held (10s); each step is reported on
    /// its own
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    step: Option<Duration>,

    /// Echo request size (tcp:// only), e.g. 64, 4KiB
    #[arg(long, value_name = "BYTES", default_value = "64", value_parser = parse_size)]
    size: usize,

    /// Requests in flight per connection (pipelining)
    #[arg(long, value_name = "N", default_value_t = 1)]
    depth: usize,

    /// A request unanswered this long (2s, 500ms, 500us) counts as a timeout and its
    /// connection is replaced
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    timeout: Duration,

    /// Close each connection after its response and open a new one: measures
    /// connection churn (connect, one request, close)
    #[arg(long)]
    reconnect: bool,

    /// HTTP method (http:// only), e.g. POST, HEAD
    #[arg(short = 'm', long = "method", value_name = "METHOD")]
    method: Option<String>,

    /// A request header 'Name: value' (http:// only; repeatable); replaces edgeload's
    /// Host or User-Agent of the same name
    #[arg(short = 'H', long = "header", value_name = "'NAME: VALUE'")]
    header: Vec<String>,

    /// Request body (http:// only), sent with Content-Length
    #[arg(long, value_name = "TEXT", conflicts_with = "body_file")]
    body: Option<String>,

    /// Request body read from FILE (http:// only), sent with Content-Length
    #[arg(long = "body-file", value_name = "FILE")]
    body_file: Option<std::path::PathBuf>,

    /// Send HTTP/1.0 requests, with Connection: keep-alive unless -H sets Connection
    #[arg(long = "http1.0")]
    http10: bool,

    /// Print latency percentiles (50, 75, 90, 99, 99.9, 99.99) and, for HTTP, the
    /// count of each status code
    #[arg(long)]
    latency: bool,

    /// CI gate: exit 3 if the 99th percentile latency is over DURATION (500us, 5ms)
    #[arg(long = "max-p99", value_name = "DURATION", value_parser = parse_duration)]
    max_p99: Option<Duration>,

    /// CI gate: exit 3 if the 99.9th percentile latency is over DURATION
    #[arg(long = "max-p999", value_name = "DURATION", value_parser = parse_duration)]
    max_p999: Option<Duration>,

    /// CI gate: exit 3 if errors / attempts is over RATIO (0.01 or 1%); attempts are
    /// responses plus connect, read, write and timeout errors
    #[arg(long = "max-error-rate", value_name = "RATIO", value_parser = parse_ratio)]
    max_error_rate: Option<f64>,

    /// CI gate: exit 3 if fewer than N requests per second completed
    #[arg(long = "min-rps", value_name = "N")]
    min_rps: Option<f64>,

    /// Print one JSON object instead of the text report
    #[arg(long)]
    json: bool,

    /// Write the latency percentile curve, and requests/s and p99 per second below it,
    /// to this SVG file
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<std::path::PathBuf>,

    /// Write one line per second (requests answered, errors by kind, p50, p99, p99.9,
    /// max): CSV if FILE ends in .csv, JSON lines otherwise
    #[arg(long, value_name = "FILE")]
    timeseries: Option<std::path::PathBuf>,

    /// Write an HdrHistogram interval log (one latency histogram per second, in
    /// microseconds), as HdrHistogram's log readers and plotters read it
    #[arg(long = "hdr-log", value_name = "FILE")]
    hdr_log: Option<std::path::PathBuf>,

    /// The run's nonce, in hex, as the JSON's "nonce" printed it: replays a run's exact
    /// echo byte streams [default: random, so no two runs send the same bytes]
    #[arg(long, value_name = "HEX", value_parser = parse_nonce)]
    seed: Option<u64>,

    /// tcp://HOST:PORT (echo) or http://HOST:PORT/PATH
    url: String,
}

const USAGE_ERROR: u8 = 2;
const MISMATCH: u8 = 1;
const GATE_FAILED: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let target = match Target::parse(&cli.url) {
        Ok(t) => t,
        Err(e) => return usage_error(&e),
    };
    let mut config = LoadConfig::new(target, &cli.url);
    config.connections = cli.connections;
    config.threads = cli.threads;
    let plan = match (&cli.rate, cli.step) {
        (Some(rate), step) => match load::RatePlan::parse(rate, step) {
            Ok(plan) => Some(plan),
            Err(e) => return usage_error(&e),
        },
        (None, Some(_)) => {
            return usage_error(&"--step needs a list of rates: --rate R1,R2,... --step DURATION")
        }
        (None, None) => None,
    };
    // Steps set the run's length; an explicit -d must agree (validate says so if not).
    config.duration = cli
        .duration
        .or_else(|| plan.as_ref().and_then(|p| p.implied_duration()))
        .unwrap_or(Duration::from_secs(10));
    config.rate = plan;
    config.timeseries = cli.timeseries.clone();
    config.hdr_log = cli.hdr_log.clone();
    config.size = cli.size;
    config.depth = cli.depth;
    config.timeout = cli.timeout;
    config.reconnect = cli.reconnect;
    config.nonce = cli.seed;
    config.request.method = cli.method.clone();
    config.request.headers = cli.header.clone();
    config.request.http10 = cli.http10;
    config.request.body = match (&cli.body, &cli.body_file) {
        (Some(text), _) => Some(text.clone().into_bytes()),
        (None, Some(path)) => match std::fs::read(path) {
            Ok(bytes) => Some(bytes),
            Err(e) => return usage_error(&format!("--body-file {}: {e}", path.display())),
        },
        (None, None) => None,
    };
    config.gates = [
        cli.max_p99.map(Gate::MaxP99),
        cli.max_p999.map(Gate::MaxP999),
        cli.max_error_rate.map(Gate::MaxErrorRate),
        cli.min_rps.map(Gate::MinRps),
    ]
    .into_iter()
    .flatten()
    .collect();
    if let Err(e) = config.validate() {
        return usage_error(&e);
    }
    if let Some(path) = &cli.plot {
        // A path that cannot be written is a bad argument, found before the run (after
        // it, the failure would cost the run and take exit 1, the mismatch status).
        if let Err(e) = std::fs::File::create(path) {
            return usage_error(&format!("--plot {}: {e}", path.display()));
        }
    }

    let bar = if std::io::stderr().is_terminal() && !cli.json {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_message(format!(
            "running {:?} test @ {}",
            config.duration, config.url
        ));
        Some(bar)
    } else {
        None
    };
    let report = load::run(&config, |elapsed, progress| {
        if let Some(bar) = &bar {
            let req = progress.requests.load(std::sync::atomic::Ordering::Relaxed);
            let err = progress.errors.load(std::sync::atomic::Ordering::Relaxed);
            bar.set_message(format!(
                "{:>4.0}s  {:>10.0} req/s  {err} errors",
                elapsed.as_secs_f64(),
                req as f64 / elapsed.as_secs_f64().max(1e-9)
            ));
            bar.tick();
        }
    });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let report = match report {
        Ok(r) => r,
        Err(e @ (LoadError::Url(_) | LoadError::Config(_) | LoadError::Unreachable { .. })) => {
            return usage_error(&e);
        }
        Err(e) => {
            eprintln!("edgeload: {e}");
            return ExitCode::FAILURE;
        }
    };
    if cli.json {
        println!("{}", report.json());
    } else {
        print!("{}", report.text(cli.latency));
    }
    // A file asked for that could not be written: the report above stands.
    let mut write_failed = false;
    if let Some(path) = &cli.plot {
        if let Err(e) = std::fs::write(path, load::plot::svg(&report)) {
            eprintln!("edgeload: --plot {}: {e}", path.display());
            write_failed = true;
        }
    }
    if let Some(e) = &report.write_error {
        eprintln!("edgeload: {e}");
        write_failed = true;
    }
    let mut gate_failed = false;
    for gate in report.failed_gates() {
        eprintln!("edgeload: gate failed: {}", gate.message());
        gate_failed = true;
    }
    let e = &report.stats.errors;
    if e.mismatch > 0 || (e.extra > 0 && report.protocol == "echo") {
        eprintln!(
            "edgeload: {} echo requests came back different from what was sent, and {} \
             connections received bytes beyond what was sent",
            e.mismatch, e.extra
        );
        // Wrong bytes outrank a missed gate: the figures of a corrupting server mean
        // little.
        return ExitCode::from(MISMATCH);
    }
    if write_failed {
        // As a file that could not be created: not the wrong-bytes status.
        return ExitCode::from(USAGE_ERROR);
    }
    if gate_failed {
        return ExitCode::from(GATE_FAILED);
    }
    ExitCode::SUCCESS
}

fn parse_nonce(s: &str) -> Result<u64, String> {
    u64::from_str_radix(s.trim_start_matches("0x"), 16)
        .map_err(|_| format!("invalid --seed '{s}': expected up to 16 hex digits"))
}

fn usage_error(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("edgeload: {e}");
    ExitCode::from(USAGE_ERROR)
}
