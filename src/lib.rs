//! edgepoll: an edge-triggered epoll TCP server for echo, relay and HTTP load-test
//! targets.
//!
//! One acceptor thread accepts connections and hands them round-robin to N worker
//! threads; each worker owns its own edge-triggered epoll instance and drains every
//! socket until EAGAIN. See `worker` for the edge-triggered rules.
//!
//! ```no_run
//! use edgepoll::{Config, Mode, Server};
//!
//! let mut config = Config::new(Mode::Echo);
//! config.listen = vec!["127.0.0.1:0".parse().unwrap()];
//! config.metrics_listen = None;
//! let server = Server::start(config).unwrap();
//! println!("echoing on {}", server.local_addr());
//! server.shutdown();
//! ```
//!
//! # Layout
//!
//! - [`sys`]: every `unsafe` block and libc call (epoll, eventfd, sockets and their
//!   queue lengths, splice and pipes, signals, rlimits, descriptor passing
//!   (SCM_RIGHTS), systemd's readiness notifications and socket activation, timer
//!   slack, poll and select for the benchmark that compares them, a counting allocator
//!   for tests), as thin safe wrappers returning `io::Result`.
//! - [`config`]: the validated configuration the command line builds, from flags over
//!   a TOML configuration file (`config::file`) over defaults, merged and validated
//!   in one place ([`config::load`]); address ranges for `--trusted-proxy`.
//! - [`limits`]: `--max-connections`, `--max-connections-per-ip` and
//!   `--max-buffered-bytes`; a connection's counts are a [`limits::ConnPermit`] that
//!   gives them back on drop (attributed to a client once a PROXY header names it).
//! - [`keepalive`]: `--tcp-keepalive` and `--tcp-user-timeout`, set on listeners
//!   (accepted sockets inherit them), on connections that predate them, and on
//!   relay's upstream sockets.
//! - [`shutdown`]: the lifecycle every thread sees: not ready (`--shutdown-delay`),
//!   draining and its deadline, a reload's hand-over, and the failure of a worker.
//! - [`access_log`]: `--access-log`: the record a worker fills when a connection
//!   closes, the channel it offers it to (dropped, never waited for, when full), and
//!   the one thread that formats records (logfmt or JSON) and writes them.
//! - [`logs`]: edgepoll's own log lines, written to stderr by a thread of their own
//!   so that no worker waits on a stderr nobody reads.
//! - [`handover`]: reload: the messages that hand listeners, established connections
//!   and counters to the process that replaces this one, and their byte encoding.
//! - [`server`]: starts the acceptor, the workers and the metrics endpoint; the handle
//!   tests use.
//! - `acceptor`: the accept loop, permits, fd-exhaustion handling and the round-robin
//!   hand-off.
//! - `worker`: the event loop: `epoll_wait`, the ready list, timers, the one call
//!   into a mode, the close rule, publishing counters.
//! - [`conn`]: the connection slab, tokens with generations, the outbound buffer; a
//!   connection is generic over its mode's state and knows nothing about modes.
//! - [`timer`]: the timer wheel, at most one entry per connection.
//! - [`mode`]: protocol handlers and the state each keeps per connection
//!   ([`mode::State`]), dispatched in one place ([`mode::Handler::serve`]) through one
//!   context ([`mode::Ctx`]): `echo`, `http` (a fixed response, keep-alive and
//!   pipelining, output bounded by the room left), `relay` (a TCP proxy: pairs,
//!   connects and failover, splice), `proxy` (the PROXY protocol: the v2 header
//!   relay sends, and `--accept-proxy`'s v1/v2 reader and the header phase a
//!   connection goes through before its mode) and `moved` (a connection taken apart
//!   for a reload, and rebuilt).
//! - [`upstream`]: relay's upstreams: the set workers pick from, each upstream's
//!   up/down verdict and the lease a pair holds on it; `upstream::health`, the one
//!   thread that probes them (`--health-check`); `upstream::queue`, the clients
//!   waiting for a slot (`--max-conns-per-upstream`);
//!   `upstream::resolve`, the one thread
//!   that looks upstream names up again and changes the set (`--resolve-interval`);
//!   `upstream::hosts`, the lookup itself (`--hosts-file`, then getaddrinfo).
//! - [`http1`]: the chunked-body decoder and header helpers http mode uses.
//! - [`metrics`]: the Prometheus registry, per-worker counters, counters carried
//!   across a reload, and the `/metrics`, `/healthz`, `/readyz` endpoint.
//! - [`load`]: the engine behind `edgeload`: per-thread epoll loops, the verified
//!   echo pattern, the HTTP request builder and response parser, `--rate` plans
//!   (ramps, steps), figures per step and per second, reports, plots and CI gates.
//! - `src/bin/edgepoll.rs`, `src/bin/edgeload.rs`: argument parsing, logging and
//!   signals only.
//!
//! ## Before and after the state redesign (issue 14)
//!
//! Before, `server.rs` owned a `Shared` bag of atomics (open count, per-address map,
//! buffered bytes, drain flag) that the acceptor, the workers and the endpoint all
//! imported, and each close path decremented the counts by hand; `Conn` held every
//! mode's fields (`session`, `relay`, one `deadline_ms` for all), so `conn` and
//! `mode` imported each other; the worker built the mode context by hand three times
//! and kept two wheels whose entries piled up. Now the counts are permits
//! (`limits`), the lifecycle is `shutdown`, `Conn<S>` carries one mode-owned
//! `mode::State`, the worker calls `Handler::serve` in one place, and one
//! `TimerWheel` holds one entry per connection. Neither import cycle remains.
#![deny(unsafe_code)]

mod acceptor;
pub mod access_log;
pub mod config;
pub mod conn;
pub mod handover;
pub mod http1;
pub mod keepalive;
pub mod limits;
pub mod load;
pub mod logs;
pub mod metrics;
pub mod mode;
pub mod server;
pub mod shutdown;
pub mod sys;
pub mod timer;
pub mod upstream;
mod worker;

pub use config::{Config, Mode};
pub use metrics::{CloseReason, RejectReason, WorkerStats};
pub use server::{HandOver, Server, Sockets, StartError};
