//! The access log (`--access-log`): one record per closed connection, per relayed
//! pair, as HAProxy's `option tcplog` and nginx's stream `access_log` give.
//!
//! A worker never formats, writes or waits for a record. While a connection lives it
//! keeps a [`Tally`] for it in a table indexed by slab slot (no allocation per
//! connection): the addresses it came with, and the bytes and HTTP responses the
//! worker's own counters grew by while serving it. At the close it fills a fixed-size
//! [`Record`] and offers it to its own bounded channel, which the writer thread
//! (`writer`) empties, formats (`format`) and writes in batches. A full channel (the
//! writer behind a slow disk or a full pipe) drops the record and counts it
//! (`edgepoll_access_log_records_total{result="dropped"}`); the worker goes on.

pub mod format;
mod writer;

use std::net::SocketAddr;
use std::time::SystemTime;

use crossbeam_channel::{Sender, TrySendError};

use crate::config::{Config, Mode};
use crate::metrics::{http_statuses, CloseReason, Counters};

pub use writer::AccessLog;

/// Records one worker may hold for the writer: at 50,000 closes a second per worker
/// (more than two cores manage) that is 80 ms of them, eight of the writer's 10 ms
/// turns, so only a writer that is stalled drops. About 1 MiB per worker while the
/// log is on.
pub const RECORDS_PER_WORKER: usize = 4096;

/// A worker whose buffer fills to this wakes the writer rather than wait for its
/// tick: a burst of closes (a stop that closes thousands of connections at once, a
/// load test's end) comes faster than an idle writer's 100 ms tick, and would
/// otherwise overflow a buffer that a healthy writer empties in a millisecond.
const NUDGE_AT: usize = RECORDS_PER_WORKER / 4;

/// Where a connection came from: its socket's peer and the listener that accepted
/// it. None where it is not known (a connection a reload moved here whose peer had
/// already reset).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Origin {
    pub peer: Option<SocketAddr>,
    pub listen: Option<SocketAddr>,
}

/// Which side ended a connection first (HAProxy's first termination letter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The client closed or reset first.
    Client,
    /// Relay: the upstream closed, reset or could not be connected first.
    Upstream,
    /// edgepoll ended it: a timeout, the drain, a refused request, a full queue.
    Edgepoll,
}

impl Ended {
    pub fn as_str(self) -> &'static str {
        match self {
            Ended::Client => "client",
            Ended::Upstream => "upstream",
            Ended::Edgepoll => "edgepoll",
        }
    }
}

/// Where a relayed pair stood when it closed (HAProxy's second termination letter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Waiting in the queue for an upstream slot.
    Queue,
    /// Connecting to an upstream (or no upstream could be connected).
    Connect,
    /// Relaying data.
    Data,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Queue => "queue",
            Stage::Connect => "connect",
            Stage::Data => "data",
        }
    }
}

/// What a relayed pair adds to its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayFacts {
    /// The upstream last connected to (or tried).
    pub upstream: Option<SocketAddr>,
    /// How long the connect to it took, in microseconds; None if it never completed.
    pub connect_us: Option<u32>,
    /// Upstreams tried for this client (1 when the first connect succeeded).
    pub tries: u32,
    /// The side whose stream ended first, if one did.
    pub ended: Option<Ended>,
    pub stage: Stage,
}

/// One closed connection: fixed size, no heap, so that filling and sending it costs
/// the worker a copy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Record {
    /// Wall-clock time of the close.
    pub time: SystemTime,
    pub worker: u16,
    pub mode: Mode,
    /// The client a PROXY header named (`--accept-proxy`), else the socket's peer.
    pub client: Option<SocketAddr>,
    /// The socket's peer: the address that connected (a proxy's, with
    /// `--accept-proxy`).
    pub peer: Option<SocketAddr>,
    pub listen: Option<SocketAddr>,
    /// From accept (or the arrival of a moved connection) to the close.
    pub duration_ms: u64,
    pub reason: CloseReason,
    /// The close was a reset (something was still owed to a peer).
    pub aborted: bool,
    pub ended: Ended,
    /// Bytes read from and written to the client.
    pub received: u64,
    pub sent: u64,
    /// Relay: bytes written to and read from the upstream.
    pub up_sent: u64,
    pub up_received: u64,
    /// Relay only.
    pub relay: Option<RelayFacts>,
    /// Http only: responses sent, indexed like `metrics::http_statuses`.
    pub http: Option<[u32; 6]>,
}

/// What a worker counts for one open connection.
#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    origin: Origin,
    /// Worker clock (ms) when it came to this worker: its accept, or its arrival from
    /// the process a reload replaced (whose time is that process's to log).
    since_ms: u64,
    received: u64,
    sent: u64,
    up_sent: u64,
    up_received: u64,
    http: [u32; 6],
}

/// What a connection's tally had counted when a reload took it out of its worker,
/// given back with it if the reload fails, so that its record still counts from its
/// accept: its tally, and its age then.
#[derive(Debug, Clone, Copy)]
pub struct Carried {
    tally: Tally,
    age_ms: u64,
}

/// The worker's counters as they were before a connection was served: what they grew
/// by afterwards is that connection's.
#[derive(Debug, Clone, Copy, Default)]
struct Snapshot {
    received: u64,
    sent: u64,
    up_sent: u64,
    up_received: u64,
    http: [u64; 6],
}

impl Snapshot {
    #[inline]
    fn of(c: &Counters) -> Snapshot {
        Snapshot {
            received: c.received,
            sent: c.sent,
            up_sent: c.up_sent,
            up_received: c.up_received,
            http: c.http,
        }
    }
}

/// What a close tells the log, beside the tally.
#[derive(Debug, Clone, Copy)]
pub struct Close {
    pub reason: CloseReason,
    pub aborted: bool,
    /// Worker clock (ms) now.
    pub now_ms: u64,
    /// The client a PROXY header named.
    pub proxied: Option<SocketAddr>,
    pub relay: Option<RelayFacts>,
    /// edgepoll closed it because it failed itself (a worker's event loop).
    pub failed_here: bool,
}

/// One worker's side of the access log.
pub struct WorkerLog {
    tx: Sender<Record>,
    /// Wakes the writer when `tx` holds [`NUDGE_AT`] records.
    nudge: Sender<()>,
    tallies: Vec<Tally>,
    /// The counters before the connection being served was served.
    before: Snapshot,
    worker: u16,
    mode: Mode,
    /// Http: the index of the error status equal to the configured one
    /// (`--status 400`), whose count goes under the configured one's, so that a
    /// record names each status once.
    same_status: Option<usize>,
    /// `--access-log-sample`, in millionths ([`SAMPLE_WHOLE`] is 1).
    sample: u32,
    /// The server's listening addresses as bound, to name the listener of a
    /// connection a reload moved here (its socket knows only its local address).
    listeners: Vec<SocketAddr>,
    /// Sampling credit, in millionths: each cleanly ended connection adds `sample`, and
    /// a record is written whenever a whole one has built up, so that exactly
    /// floor(n * sample) of n are logged, spread evenly. Whole numbers, because a float
    /// credit misses: ten additions of 0.1 come to 0.9999999999999999, and a 10%
    /// sample logged none of its first ten.
    credit: u32,
}

/// A sample of 1 (every record), in the millionths [`WorkerLog`] counts in: exact for
/// any ratio given with up to six decimals (0.000001, 0.0001%).
const SAMPLE_WHOLE: u32 = 1_000_000;

/// `ratio` (0 < ratio <= 1, as validated) in millionths; at least one, so that a
/// sample too small to express still logs now and then rather than never.
fn millionths(ratio: f64) -> u32 {
    ((ratio * SAMPLE_WHOLE as f64).round() as u32).clamp(1, SAMPLE_WHOLE)
}

impl WorkerLog {
    fn new(
        tx: Sender<Record>,
        nudge: Sender<()>,
        worker: usize,
        config: &Config,
        listeners: &[SocketAddr],
    ) -> WorkerLog {
        let mode = config.mode;
        WorkerLog {
            tx,
            nudge,
            listeners: listeners.to_vec(),
            tallies: Vec::new(),
            before: Snapshot::default(),
            worker: worker as u16,
            mode,
            same_status: {
                let statuses = http_statuses(config.http.status);
                (1..statuses.len()).find(|&i| statuses[i] == statuses[0])
            },
            sample: millionths(config.access_log.sample),
            credit: 0,
        }
    }

    /// A connection took slab slot `slot` at `now_ms` (worker clock).
    pub fn opened(&mut self, slot: usize, origin: Origin, now_ms: u64) {
        if slot >= self.tallies.len() {
            // The table grows with the slab (a high-water mark), never per connection.
            self.tallies.resize(slot + 1, Tally::default());
        }
        self.tallies[slot] = Tally {
            origin,
            since_ms: now_ms,
            ..Tally::default()
        };
    }

    /// What the connection in `slot` has counted so far, for it to take along when a
    /// reload takes it out (`now_ms`: worker clock).
    pub fn carry(&self, slot: usize, now_ms: u64) -> Option<Carried> {
        let tally = *self.tallies.get(slot)?;
        Some(Carried {
            tally,
            age_ms: now_ms.saturating_sub(tally.since_ms),
        })
    }

    /// A connection a failed reload gave back took slab slot `slot`: its tally goes
    /// on from where it was.
    pub fn resumed(&mut self, slot: usize, carried: Carried, now_ms: u64) {
        self.opened(slot, carried.tally.origin, now_ms);
        self.tallies[slot] = Tally {
            since_ms: now_ms.saturating_sub(carried.age_ms),
            ..carried.tally
        };
    }

    /// The listener, as bound, that accepted a connection whose local address is
    /// `local`: the one bound to that address, else a wildcard of the same port and
    /// family (`0.0.0.0:6380`, `[::]:6380`), else `local` itself.
    pub fn listener(&self, local: SocketAddr) -> SocketAddr {
        listener_of(local, &self.listeners)
    }

    /// A connection is about to be served: the counters as they are now.
    #[inline]
    pub fn before(&mut self, c: &Counters) {
        self.before = Snapshot::of(c);
    }

    /// Adds what the worker's counters grew by since [`WorkerLog::before`] to the
    /// connection in `slot`.
    #[inline]
    pub fn served(&mut self, slot: usize, c: &Counters) {
        let before = self.before;
        let Some(t) = self.tallies.get_mut(slot) else {
            return;
        };
        // The counters only grow between two publishes, and no publish happens
        // while a connection is served; saturating all the same, so that a change to
        // that order could skew a record but never stop a worker.
        t.received += c.received.saturating_sub(before.received);
        t.sent += c.sent.saturating_sub(before.sent);
        t.up_sent += c.up_sent.saturating_sub(before.up_sent);
        t.up_received += c.up_received.saturating_sub(before.up_received);
        for (n, (now, was)) in t.http.iter_mut().zip(c.http.iter().zip(before.http)) {
            *n = n.saturating_add(now.saturating_sub(was).min(u32::MAX as u64) as u32);
        }
    }

    /// The connection in `slot` closed: its record goes to the writer unless sampled
    /// out. Returns false if it had to be dropped (the writer's buffer is full).
    pub fn closed(&mut self, slot: usize, close: Close) -> bool {
        let t = self.tallies.get(slot).copied().unwrap_or_default();
        let clean = matches!(close.reason, CloseReason::Eof | CloseReason::Shutdown);
        if clean && !close.aborted && self.sample < SAMPLE_WHOLE {
            self.credit += self.sample;
            if self.credit < SAMPLE_WHOLE {
                return true;
            }
            self.credit -= SAMPLE_WHOLE;
        }
        let ended = match close.relay {
            _ if close.failed_here => Ended::Edgepoll,
            Some(r) => match close.reason {
                // The pair's own account: the side that failed, or that finished first.
                CloseReason::Reset | CloseReason::Error | CloseReason::Eof => {
                    r.ended.unwrap_or(Ended::Client)
                }
                // No upstream could be connected, whatever the client had sent.
                CloseReason::UpstreamError => Ended::Upstream,
                // A timeout, the drain or the queue: edgepoll's decision, even when a
                // side had already sent its FIN (a half-close is no end).
                _ => Ended::Edgepoll,
            },
            None => match close.reason {
                CloseReason::Eof | CloseReason::Reset | CloseReason::Error => Ended::Client,
                // A timeout, the drain or a refused request: edgepoll's decision,
                // whether or not the client had also finished sending.
                _ => Ended::Edgepoll,
            },
        };
        let record = Record {
            time: SystemTime::now(),
            worker: self.worker,
            mode: self.mode,
            client: close.proxied.or(t.origin.peer),
            peer: t.origin.peer,
            listen: t.origin.listen,
            duration_ms: close.now_ms.saturating_sub(t.since_ms),
            reason: close.reason,
            aborted: close.aborted,
            ended,
            received: t.received,
            sent: t.sent,
            up_sent: t.up_sent,
            up_received: t.up_received,
            relay: close.relay.map(|mut r| {
                if close.reason == CloseReason::QueueFull {
                    // Turned away at the queue: that is where it stood.
                    r.stage = Stage::Queue;
                }
                r
            }),
            http: (self.mode == Mode::Http).then(|| {
                let mut http = t.http;
                if let Some(i) = self.same_status {
                    http[0] = http[0].saturating_add(std::mem::take(&mut http[i]));
                }
                http
            }),
        };
        match self.tx.try_send(record) {
            Ok(()) => {
                // Only this worker adds to its buffer, so a burst passes this length
                // exactly once on its way up; a nudge already waiting is enough.
                if self.tx.len() == NUDGE_AT {
                    let _ = self.nudge.try_send(());
                }
                true
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => false,
        }
    }
}

fn listener_of(local: SocketAddr, listeners: &[SocketAddr]) -> SocketAddr {
    if listeners.contains(&local) {
        return local;
    }
    listeners
        .iter()
        .copied()
        .find(|l| {
            l.port() == local.port() && l.ip().is_unspecified() && l.is_ipv4() == local.is_ipv4()
        })
        .unwrap_or(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_address_names_its_listener_as_bound() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let listeners = [
            a("127.0.0.1:80"),
            a("0.0.0.0:81"),
            a("[::]:81"),
            a("[::]:82"),
        ];
        assert_eq!(
            listener_of(a("127.0.0.1:80"), &listeners),
            a("127.0.0.1:80")
        );
        assert_eq!(listener_of(a("10.0.0.2:81"), &listeners), a("0.0.0.0:81"));
        assert_eq!(listener_of(a("[::1]:81"), &listeners), a("[::]:81"));
        // Dual stack: an IPv4 client of [::] has a mapped local address.
        assert_eq!(
            listener_of(a("[::ffff:10.0.0.2]:82"), &listeners),
            a("[::]:82")
        );
        // Not ours (a listener a reload gave up): the address itself.
        assert_eq!(listener_of(a("10.0.0.2:83"), &listeners), a("10.0.0.2:83"));
    }

    #[test]
    fn a_tally_stays_within_what_the_readme_says() {
        // README: "each open connection costs at most 128 bytes more".
        assert!(
            std::mem::size_of::<Tally>() <= 128,
            "{}",
            std::mem::size_of::<Tally>()
        );
    }

    #[test]
    fn ratios_become_exact_millionths() {
        assert_eq!(millionths(1.0), SAMPLE_WHOLE);
        assert_eq!(millionths(0.1), 100_000);
        assert_eq!(millionths(0.3), 300_000);
        assert_eq!(millionths(0.000001), 1);
        assert_eq!(millionths(1e-9), 1, "never rounded down to never");
    }
}
