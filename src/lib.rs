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
//! - [`sys`]: every `unsafe` block and libc call (epoll, eventfd, sockets, splice and
//!   pipes, signals, rlimits, timer slack, poll and select for the benchmark that
//!   compares them, a counting allocator for tests), as thin safe wrappers returning
//!   `io::Result`.
//! - [`config`]: the validated configuration the command line builds.
//! - [`server`]: starts the acceptor, the workers and the metrics endpoint; the handle
//!   tests use.
//! - `acceptor`: the accept loop, the connection limit, fd-exhaustion handling and the
//!   round-robin hand-off.
//! - `worker`: the event loop: `epoll_wait`, the ready list, idle timers, dispatch to a
//!   mode, publishing counters.
//! - [`conn`]: the connection slab, tokens with generations, the outbound buffer.
//! - [`timer`]: the idle-timeout wheel.
//! - [`mode`]: protocol handlers: `echo`, `http` (a fixed response, keep-alive and
//!   pipelining), `relay` (a TCP proxy: pairs, upstream selection and failover,
//!   splice) and `proxy` (the PROXY protocol v2 header).
//! - [`http1`]: the chunked-body decoder and header helpers http mode uses.
//! - [`metrics`]: the Prometheus registry, per-worker counters and the `/metrics`,
//!   `/healthz`, `/readyz` endpoint.
//! - [`load`]: the engine behind `edgeload`: per-thread epoll loops, the verified
//!   echo pattern, the HTTP response parser, reports and plots.
//! - `src/bin/edgepoll.rs`, `src/bin/edgeload.rs`: argument parsing, logging and
//!   signals only.
#![deny(unsafe_code)]

mod acceptor;
pub mod config;
pub mod conn;
pub mod http1;
pub mod limits;
pub mod load;
pub mod metrics;
pub mod mode;
pub mod server;
pub mod shutdown;
pub mod sys;
pub mod timer;
mod worker;

pub use config::{Config, Mode};
pub use metrics::{CloseReason, RejectReason, WorkerStats};
pub use server::{Server, StartError};
