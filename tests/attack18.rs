//! Review of the access log (issue 18) as a hostile peer: each test attacks one
//! promise of the README's "Access log" section over real loopback sockets and
//! checks the records against what the test's own peers did.
//!
//! - a burst of closes larger than a worker's buffer (4,096 records) from a writer
//!   that is healthy, only idle: no record may be lost;
//! - a reload's move: the moved relayed pair names its upstream, a moved
//!   connection's duration counts from its arrival and its listener is named as
//!   bound; a failed reload's connections keep their whole count;
//! - a worker whose loop fails: its clients did not end their connections;
//! - `ended_by` against what happened: a client that half-closed and then waited for
//!   an upstream that could not be connected, for a queue slot, for an idle timeout,
//!   for the drain, or for an upstream that reset;
//! - relay pairs failing in every stage (queue, connect, data), queue_full, retries;
//! - http's `requests` under a reset with responses still queued, and `--status`
//!   equal to an error status (one key, both counted);
//! - sampling on two workers, with resets and drain resets always logged;
//! - many reopens while records flow, a reopen without a file, SIGUSR1 without a
//!   file, a log file deleted or replaced under the server;
//! - byte counts through backpressure and splice;
//! - PROXY header clients over `--max-connections-per-ip` (not logged), IPv6 and
//!   wildcard listeners;
//! - `--log-format json`: every line JSON, a start-up failure and a worker's
//!   warning included; `--access-log stderr` to a pipe nobody reads must not stop a
//!   worker that has a warning to log.

mod util;

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgepoll::config::{LogFormat, LogTarget};
use edgepoll::metrics::AccessLogResult;
use edgepoll::{CloseReason, Config, Mode, Server};
use util::records::*;
use util::*;

// ---------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------

fn closed(server: &Server) -> u64 {
    total(server, |s| s.closed_total())
}

/// Waits for `closes` closes to be published, then for the writer to stop writing;
/// asserts that exactly `records` were written and none dropped.
#[track_caller]
fn settle(server: &Server, closes: u64, records: u64) {
    wait_for(&format!("{closes} closes"), || closed(server) >= closes);
    assert_eq!(closed(server), closes, "closes");
    assert_eq!(settled(|| written(server)), records, "records written");
    assert_eq!(dropped(server), 0, "records dropped");
}

/// [`settle`], then every record in the file at `path`.
#[track_caller]
fn logged(server: &Server, path: &std::path::Path, closes: u64, records: u64) -> Vec<Rec> {
    settle(server, closes, records);
    let recs = read_log(path);
    assert_eq!(recs.len() as u64, records, "records in {}", path.display());
    recs
}

/// The one record whose client is `addr`.
#[track_caller]
fn record_of(recs: &[Rec], addr: SocketAddr) -> Rec {
    let mine: Vec<&Rec> = recs.iter().filter(|r| r.addr("client") == addr).collect();
    assert_eq!(mine.len(), 1, "records of {addr}: {recs:#?}");
    mine[0].clone()
}

/// Moves every connection of `old` to `new` (a reload, in-process) and lets `old`
/// finish; returns how many moved.
fn move_all(old: Server, new: &Server) -> usize {
    let handover = old.hand_over(vec![false; old.local_addrs().len()]);
    let (mut done, mut moved) = (0, 0);
    while done < handover.workers {
        match handover.rx.recv_timeout(PATIENCE).expect("export") {
            Some(conn) => {
                new.adopt(conn);
                moved += 1;
            }
            None => done += 1,
        }
    }
    old.finish_hand_over();
    moved
}

/// A server of `config` on `old`'s listeners (the process a reload starts).
fn successor(old: &Server, mut config: Config) -> Server {
    let (listeners, _) = old.listeners().unwrap();
    config.metrics_listen = None;
    Server::start_with(
        config,
        edgepoll::Sockets {
            listeners,
            metrics: None,
        },
    )
    .expect("the new server starts")
}

/// Writes `req` and its FIN, then reads to the end; returns how the stream ended.
fn send_and_half_close(addr: SocketAddr, req: &[u8]) -> (SocketAddr, Vec<u8>, Ending) {
    let mut s = connect(addr);
    let me = s.local_addr().unwrap();
    s.write_all(req).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let (got, ending) = read_until_end(&mut s);
    (me, got, ending)
}

/// An upstream that accepts one connection, reads it to its FIN and then holds it,
/// silent, until `release` is dropped or sent to.
fn silent_upstream() -> (
    SocketAddr,
    std::sync::mpsc::Sender<()>,
    std::thread::JoinHandle<Vec<u8>>,
) {
    let (release, hold) = std::sync::mpsc::channel::<()>();
    let (addr, t) = upstream_once(move |mut s| {
        let (got, _) = read_until_end(&mut s);
        let _ = hold.recv_timeout(PATIENCE);
        got
    });
    (addr, release, t)
}

fn edgepoll() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edgepoll"))
}

/// Reads a child's stderr on a thread: every line, until it closes.
fn lines_of(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    rx
}

/// The address a start-up line names (text or JSON).
fn listening(log: &std::sync::mpsc::Receiver<String>, seen: &mut Vec<String>) -> SocketAddr {
    loop {
        let line = log
            .recv_timeout(PATIENCE)
            .unwrap_or_else(|_| panic!("no start-up line in {seen:#?}"));
        seen.push(line.clone());
        if let Some(after) = line.split(" listening on ").nth(1) {
            return after
                .split([' ', '"', '\\'])
                .next()
                .unwrap()
                .parse()
                .unwrap_or_else(|_| panic!("no address in {line}"));
        }
    }
}

// ---------------------------------------------------------------------------------
// 1: a burst of closes larger than a worker's buffer, to a healthy writer
// ---------------------------------------------------------------------------------

/// 6,000 connections on one worker, all closed at once by a stop (no drain time):
/// more records than the worker's buffer holds (4,096), offered faster than an idle
/// writer's tick. The writer is healthy (a file on a local disk), so the README's
/// "when its buffer is full (the disk is slow, a pipe is full, the file is
/// unwritable) the record is dropped" does not apply: every record must be written.
#[test]
fn a_burst_of_closes_past_a_workers_buffer_loses_no_record() {
    let dir = LogDir::new("burst");
    let path = dir.path("access.log");
    const N: usize = 6000;
    let server = echo_server(1, |c| {
        log_to(c, &path, LogFormat::Text);
        c.max_connections = 2 * N;
    });
    let metrics = Arc::clone(server.metrics());
    let addr = server.local_addr();
    let clients: Vec<TcpStream> = (0..N).map(|_| connect(addr)).collect();
    wait_for("every connection open", || server.open_connections() == N);
    // Let the writer find nothing for a while, as on a quiet server.
    std::thread::sleep(Duration::from_millis(300));
    drop(server);
    let dropped = metrics.access_log_records(AccessLogResult::Dropped);
    let written = metrics.access_log_records(AccessLogResult::Written);
    assert_eq!(
        (written, dropped),
        (N as u64, 0),
        "a healthy writer lost records"
    );
    let recs = read_log(&path);
    assert_eq!(recs.len(), N);
    let mut ids: Vec<SocketAddr> = recs.iter().map(|r| r.addr("client")).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), N, "one record per connection");
    for r in &recs {
        r.expect(&[
            ("reason", &"shutdown"),
            ("reset", &false),
            ("ended_by", &"edgepoll"),
        ]);
    }
    drop(clients);
}

// ---------------------------------------------------------------------------------
// 2: a reload's move
// ---------------------------------------------------------------------------------

/// A relayed pair a reload moved still relays to its upstream, and its record must
/// name that upstream (README: "`-` (null) if none was").
#[test]
fn a_moved_relayed_pair_names_its_upstream() {
    let dir = LogDir::new("moved-relay");
    let (old_log, new_log) = (dir.path("old.log"), dir.path("new.log"));
    let upstream = echo_server(1, |_| {});
    let up = upstream.local_addr();
    let old = relay_server(1, vec![up], |c| log_to(c, &old_log, LogFormat::Text));
    let addr = old.local_addr();
    let mut client = connect(addr);
    let me = client.local_addr().unwrap();
    echo_roundtrip(&mut client, &pattern(1, 0, 1000));

    let mut config = Config::new(Mode::Relay);
    config.workers = 1;
    config.relay.upstreams = vec![up];
    log_to(&mut config, &new_log, LogFormat::Json);
    let new = successor(&old, config);
    assert_eq!(move_all(old, &new), 1);

    echo_roundtrip(&mut client, &pattern(2, 0, 234));
    client.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_until_end(&mut client), (Vec::new(), Ending::Fin));
    let recs = logged(&new, &new_log, 1, 1);
    assert!(read_log(&old_log).is_empty());
    recs[0].expect(&[
        ("client", &me),
        ("listen", &addr),
        ("upstream", &up),
        // Connected in the process before: not known here.
        ("connect_ms", &"-"),
        ("retries", &0),
        ("bytes_in", &234),
        ("bytes_out", &234),
        ("upstream_bytes_out", &234),
        ("upstream_bytes_in", &234),
        ("reason", &"eof"),
        ("reset", &false),
        ("ended_by", &"client"),
        ("stage", &"data"),
    ]);
}

/// README: "A connection a reload moved is logged by the process that closes it, with
/// the bytes and time counted there". The new server runs a while before the move,
/// as one does whose predecessor is slow to hand over; the record's duration may
/// not reach back before the arrival.
#[test]
fn a_moved_connections_duration_counts_from_its_arrival() {
    let dir = LogDir::new("moved-duration");
    let new_log = dir.path("new.log");
    let old = echo_server(1, |_| {});
    let mut client = connect(old.local_addr());
    echo_roundtrip(&mut client, &pattern(1, 0, 100));
    let mut config = Config::new(Mode::Echo);
    config.workers = 1;
    log_to(&mut config, &new_log, LogFormat::Text);
    let new = successor(&old, config);
    // The connection is old by now, and so is the new server's worker.
    std::thread::sleep(Duration::from_millis(1500));

    let arrival = Instant::now();
    assert_eq!(move_all(old, &new), 1);
    echo_roundtrip(&mut client, &pattern(2, 0, 100));
    client.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_until_end(&mut client), (Vec::new(), Ending::Fin));
    let recs = logged(&new, &new_log, 1, 1);
    let here = arrival.elapsed().as_millis() as u64;
    assert!(
        recs[0].num("duration_ms") <= here,
        "{} ms here, but the record says {}",
        here,
        recs[0].line
    );
    recs[0].expect(&[("bytes_in", &100), ("bytes_out", &100)]);
}

/// README: "`listen`: the listening address that accepted it, as bound
/// (`0.0.0.0:6380` for a wildcard)". A connection moved by a reload came through the
/// same listener.
#[test]
fn a_moved_connection_names_its_wildcard_listener_as_bound() {
    let dir = LogDir::new("moved-wildcard");
    let (old_log, new_log) = (dir.path("old.log"), dir.path("new.log"));
    let old = echo_server(1, |c| {
        c.listen = vec!["0.0.0.0:0".parse().unwrap()];
        log_to(c, &old_log, LogFormat::Text);
    });
    let bound = old.local_addr();
    assert!(bound.ip().is_unspecified());
    let target: SocketAddr = format!("127.0.0.1:{}", bound.port()).parse().unwrap();
    // One closed before the move, for what a new connection's record says.
    let mut first = connect(target);
    echo_roundtrip(&mut first, b"before");
    first.shutdown(Shutdown::Write).unwrap();
    read_until_end(&mut first);
    let before = logged(&old, &old_log, 1, 1);
    before[0].expect(&[("listen", &bound)]);

    let mut client = connect(target);
    echo_roundtrip(&mut client, b"moved");
    let mut config = Config::new(Mode::Echo);
    config.workers = 1;
    log_to(&mut config, &new_log, LogFormat::Text);
    let new = successor(&old, config);
    assert_eq!(move_all(old, &new), 1);
    client.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_until_end(&mut client), (Vec::new(), Ending::Fin));
    let recs = logged(&new, &new_log, 1, 1);
    recs[0].expect(&[("listen", &bound)]);
}

// ---------------------------------------------------------------------------------
// 3: ended_by against what happened (relay)
// ---------------------------------------------------------------------------------

/// A client that sent its request and half-closed (as `nc -N` or an HTTP/1.0 client
/// does) while no upstream could be connected: README, "`upstream` (relay: ... or
/// could not be connected)". Its FIN is no abort.
#[test]
fn a_half_closed_client_whose_upstream_never_answers_the_connect_was_ended_by_upstream() {
    let dir = LogDir::new("ended-connect");
    let path = dir.path("access.log");
    let hole = blackhole();
    let relay = relay_server(1, vec![hole.addr], |c| {
        log_to(c, &path, LogFormat::Text);
        c.relay.connect_timeout = Duration::from_millis(300);
    });
    let (me, got, ending) = send_and_half_close(relay.local_addr(), b"request");
    assert_reset("client", got.len(), ending);
    let recs = logged(&relay, &path, 1, 1);
    recs[0].expect(&[
        ("client", &me),
        ("upstream", &hole.addr),
        ("connect_ms", &"-"),
        ("retries", &0),
        ("bytes_in", &7),
        ("upstream_bytes_out", &0),
        ("reason", &"upstream_error"),
        ("reset", &true),
        ("ended_by", &"upstream"),
        ("stage", &"connect"),
    ]);
}

/// A half-closed client that waited out the queue: README, "`edgepoll` (a timeout,
/// the drain, a refused request, a full queue)".
#[test]
fn a_half_closed_client_that_waited_out_the_queue_was_ended_by_edgepoll() {
    let dir = LogDir::new("ended-queue");
    let path = dir.path("access.log");
    let upstream = echo_server(1, |_| {});
    let relay = relay_server(1, vec![upstream.local_addr()], |c| {
        log_to(c, &path, LogFormat::Text);
        c.relay.max_conns_per_upstream = Some(1);
        c.relay.max_queue = 4;
        c.relay.queue_timeout = Duration::from_millis(300);
    });
    let mut holder = connect(relay.local_addr());
    echo_roundtrip(&mut holder, b"the only slot");
    let (me, got, ending) = send_and_half_close(relay.local_addr(), b"hello");
    assert_reset("queued client", got.len(), ending);
    let recs = logged(&relay, &path, 1, 1);
    recs[0].expect(&[
        ("client", &me),
        ("upstream", &"-"),
        ("reason", &"queue_timeout"),
        ("reset", &true),
        ("ended_by", &"edgepoll"),
        ("stage", &"queue"),
    ]);
    drop(holder);
}

/// A half-closed client whose upstream took the request and never answered: the pair
/// is closed by the idle timeout, and by the drain; edgepoll ended both.
#[test]
fn a_half_closed_pair_closed_by_a_timeout_or_the_drain_was_ended_by_edgepoll() {
    let dir = LogDir::new("ended-idle");
    for (name, drain) in [("idle.log", false), ("drain.log", true)] {
        let path = dir.path(name);
        let (up, release, t) = silent_upstream();
        let relay = relay_server(1, vec![up], |c| {
            log_to(c, &path, LogFormat::Text);
            if drain {
                c.drain_timeout = Duration::from_millis(300);
            } else {
                c.idle_timeout = Some(Duration::from_millis(300));
            }
        });
        let metrics = Arc::clone(relay.metrics());
        let addr = relay.local_addr();
        let client = std::thread::spawn(move || send_and_half_close(addr, b"hello"));
        wait_for("the request upstream", || {
            total(&relay, |s| s.upstream_sent_bytes) == 5
        });
        let mut relay = Some(relay);
        let want = if drain {
            relay.take().unwrap().shutdown();
            CloseReason::Shutdown
        } else {
            let r = relay.as_ref().unwrap();
            wait_for("the idle close", || closed(r) == 1);
            CloseReason::IdleTimeout
        };
        let (me, got, ending) = client.join().unwrap();
        assert_reset("client", got.len(), ending);
        drop(release);
        assert_eq!(t.join().unwrap(), b"hello");
        if let Some(relay) = &relay {
            settle(relay, 1, 1);
        }
        assert_eq!(metrics.access_log_records(AccessLogResult::Written), 1);
        let recs = read_log(&path);
        recs[0].expect(&[
            ("client", &me),
            ("bytes_in", &5),
            ("upstream_bytes_out", &5),
            ("reason", &want.as_str()),
            ("reset", &true),
            ("ended_by", &"edgepoll"),
            ("stage", &"data"),
        ]);
    }
}

/// A client that sent its whole request and half-closed, and an upstream that reset
/// in the middle of its answer: the upstream aborted the pair (HAProxy's `S`), not
/// the client, whose FIN was no abort.
#[test]
fn an_upstream_that_resets_after_the_clients_fin_ended_the_pair() {
    let dir = LogDir::new("ended-reset");
    let path = dir.path("access.log");
    let (up, t) = upstream_once(|mut s| {
        let (got, ending) = read_until_end(&mut s);
        assert_eq!((got.as_slice(), ending), (&b"hello"[..], Ending::Fin));
        s.write_all(b"partial").unwrap();
        edgepoll::sys::socket::set_linger_zero(s.as_fd()).unwrap();
    });
    let relay = relay_server(1, vec![up], |c| log_to(c, &path, LogFormat::Text));
    let (me, got, ending) = send_and_half_close(relay.local_addr(), b"hello");
    t.join().unwrap();
    assert_reset("client", got.len(), ending);
    let recs = logged(&relay, &path, 1, 1);
    recs[0].expect(&[
        ("client", &me),
        ("upstream", &up),
        ("bytes_in", &5),
        ("reason", &"reset"),
        ("reset", &true),
        ("ended_by", &"upstream"),
        ("stage", &"data"),
    ]);
}

// ---------------------------------------------------------------------------------
// 4: relay pairs failing in every stage
// ---------------------------------------------------------------------------------

/// A queued client that resets, and one that resets while its upstream connect hangs:
/// each is logged at the stage it stood in, as ended by the client; a client the full
/// queue turns away was stopped at the queue, by edgepoll.
#[test]
fn relay_pairs_failing_at_the_queue_and_the_connect_are_logged_where_they_stood() {
    let dir = LogDir::new("stages");
    let path = dir.path("queue.log");
    let upstream = echo_server(1, |_| {});
    let relay = relay_server(1, vec![upstream.local_addr()], |c| {
        log_to(c, &path, LogFormat::Json);
        c.relay.max_conns_per_upstream = Some(1);
        c.relay.max_queue = 1;
        c.relay.queue_timeout = Duration::from_secs(600);
    });
    let addr = relay.local_addr();
    let mut holder = connect(addr);
    echo_roundtrip(&mut holder, b"slot");
    let mut waiter = connect(addr);
    let waiter_addr = waiter.local_addr().unwrap();
    waiter.write_all(b"abc").unwrap();
    wait_for("the waiter's bytes", || {
        total(&relay, |s| s.received_bytes) == 7
    });
    // The queue (one place) is taken: the next client is turned away at once.
    let mut turned = connect(addr);
    let turned_addr = turned.local_addr().unwrap();
    let (got, ending) = read_until_end(&mut turned);
    assert_reset("turned away", got.len(), ending);
    edgepoll::sys::socket::set_linger_zero(waiter.as_fd()).unwrap();
    drop(waiter);
    let recs = logged(&relay, &path, 2, 2);
    record_of(&recs, waiter_addr).expect(&[
        ("upstream", &"-"),
        ("bytes_in", &3),
        ("reason", &"reset"),
        ("ended_by", &"client"),
        ("stage", &"queue"),
    ]);
    record_of(&recs, turned_addr).expect(&[
        ("upstream", &"-"),
        ("connect_ms", &"-"),
        ("retries", &0),
        ("reason", &"queue_full"),
        ("reset", &true),
        ("ended_by", &"edgepoll"),
        ("stage", &"queue"),
    ]);
    drop(holder);

    // While the upstream connect hangs: one client resets having sent nothing, and
    // is closed at once; one resets after sending 3 bytes, which are still owed to
    // the upstream (a direct connection would have had them), so its pair waits for
    // the connect, and closes when it times out.
    let path = dir.path("connect.log");
    let hole = blackhole();
    let relay = relay_server(1, vec![hole.addr], |c| {
        log_to(c, &path, LogFormat::Json);
        c.relay.connect_timeout = Duration::from_millis(300);
    });
    let mut clients = Vec::new();
    for data in [&b""[..], b"abc"] {
        let mut client = connect(relay.local_addr());
        clients.push((client.local_addr().unwrap(), data.len()));
        client.write_all(data).unwrap();
        wait_for("the client's bytes", || {
            total(&relay, |s| s.received_bytes) == 3 || data.is_empty()
        });
        edgepoll::sys::socket::set_linger_zero(client.as_fd()).unwrap();
        drop(client);
    }
    let recs = logged(&relay, &path, 2, 2);
    for (me, sent) in clients {
        record_of(&recs, me).expect(&[
            ("upstream", &hole.addr),
            ("connect_ms", &"-"),
            ("retries", &0),
            ("bytes_in", &sent),
            ("upstream_bytes_out", &0),
            ("reason", &"reset"),
            ("ended_by", &"client"),
            ("stage", &"connect"),
        ]);
    }
}

/// Two upstreams, one refusing and never skipped (`--fail-timeout 0`), picked in
/// turn: the retries of the records add up to the refused connects the metrics
/// counted, and every record names the upstream that answered, with a connect time.
#[test]
fn retries_count_the_upstreams_tried_before_the_one_used() {
    let dir = LogDir::new("retries");
    let path = dir.path("access.log");
    let upstream = echo_server(1, |_| {});
    let live = upstream.local_addr();
    let dead = dead_address();
    let relay = relay_server(1, vec![dead, live], |c| {
        log_to(c, &path, LogFormat::Text);
        c.relay.fail_timeout = Duration::ZERO;
    });
    const N: u64 = 3;
    for i in 0..N {
        let mut s = connect(relay.local_addr());
        echo_roundtrip(&mut s, &pattern(i, 0, 10));
        s.shutdown(Shutdown::Write).unwrap();
        assert_eq!(read_until_end(&mut s).1, Ending::Fin);
    }
    let recs = logged(&relay, &path, N, N);
    let refused = relay
        .metrics()
        .upstream_connect_errors(&dead.to_string(), edgepoll::metrics::ConnectError::Refused);
    assert!(refused > 0, "the turn came to the refusing upstream");
    assert_eq!(recs.iter().map(|r| r.num("retries")).sum::<u64>(), refused);
    for r in &recs {
        r.expect(&[("upstream", &live), ("reason", &"eof"), ("stage", &"data")]);
        assert_ne!(r.get("connect_ms"), "-", "{}", r.line);
    }
}

// ---------------------------------------------------------------------------------
// 5: byte counts through backpressure and splice
// ---------------------------------------------------------------------------------

/// 4 MiB each way through a 4 KiB cap (hundreds of pauses and resumes, the ready
/// list, partial writes), copied and spliced, and through echo: every count exact.
#[test]
fn byte_counts_are_exact_through_backpressure_and_splice() {
    const SIZE: usize = 4 << 20;
    let dir = LogDir::new("backpressure");
    let upstream = echo_server(1, |c| c.max_pending_bytes = 4096);
    for (name, mode) in [("echo", "echo"), ("copy", "relay"), ("splice", "relay")] {
        let path = dir.path(&format!("{name}.log"));
        let tweak = |c: &mut Config| {
            log_to(c, &path, LogFormat::Text);
            c.max_pending_bytes = 4096;
            c.relay.splice = name == "splice";
        };
        let server = if mode == "echo" {
            echo_server(1, tweak)
        } else {
            relay_server(1, vec![upstream.local_addr()], tweak)
        };
        let s = connect(server.local_addr());
        let me = s.local_addr().unwrap();
        let mut writer = s.try_clone().unwrap();
        let sending = std::thread::spawn(move || {
            for at in (0..SIZE).step_by(1 << 16) {
                writer.write_all(&pattern(7, at as u64, 1 << 16)).unwrap();
            }
            writer.shutdown(Shutdown::Write).unwrap();
        });
        let mut reader = s;
        let (back, ending) = read_until_end(&mut reader);
        sending.join().unwrap();
        assert_eq!(ending, Ending::Fin, "{name}");
        assert_same(&pattern(7, 0, SIZE), &back);
        let recs = logged(&server, &path, 1, 1);
        recs[0].expect(&[
            ("client", &me),
            ("bytes_in", &SIZE),
            ("bytes_out", &SIZE),
            ("reason", &"eof"),
            ("reset", &false),
        ]);
        if mode == "relay" {
            recs[0].expect(&[("upstream_bytes_out", &SIZE), ("upstream_bytes_in", &SIZE)]);
        }
    }
}

// ---------------------------------------------------------------------------------
// 6: http's counts
// ---------------------------------------------------------------------------------

/// A client pipelines requests without reading until every buffer is full, then
/// resets. What the record's `requests` says must agree with the README, beside the
/// bytes the server wrote: responses written to the client, and those still queued
/// for it (at most `--max-pending-bytes` of them) that the reset destroyed.
#[test]
fn http_requests_under_a_reset_count_what_the_readme_says() {
    const CAP: usize = 16 * 1024;
    let dir = LogDir::new("http-reset");
    let path = dir.path("access.log");
    let server = http_server(1, |c| {
        log_to(c, &path, LogFormat::Text);
        c.max_pending_bytes = CAP;
    });
    let addr = server.local_addr();
    let req = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n";
    // One response's size (the Date header has a fixed width).
    let mut one = connect(addr);
    one.write_all(req).unwrap();
    one.shutdown(Shutdown::Write).unwrap();
    let (resp, _) = read_until_end(&mut one);
    let r = resp.len() as u64;

    let s = connect(addr);
    let me = s.local_addr().unwrap();
    let burst: Vec<u8> = req.iter().copied().cycle().take(req.len() * 2000).collect();
    s.set_nonblocking(true).unwrap();
    let mut quiet_since: Option<Instant> = None;
    let mut at = 0;
    while quiet_since.is_none_or(|t| t.elapsed() < STALL) {
        match (&s).write(&burst[at..]) {
            Ok(n) => {
                at = (at + n) % req.len();
                quiet_since = None;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                quiet_since.get_or_insert_with(Instant::now);
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("write: {e}"),
        }
    }
    edgepoll::sys::socket::set_linger_zero(s.as_fd()).unwrap();
    drop(s);
    let recs = logged(&server, &path, 2, 2);
    let rec = record_of(&recs, me);
    let (requests, out) = (rec.num("requests"), rec.num("bytes_out"));
    assert_eq!(rec.status(200), requests, "{}", rec.line);
    rec.expect(&[("reason", &"reset"), ("reset", &true)]);
    // Made: every response written, and the ones queued behind them.
    assert!(
        requests * r >= out,
        "more written than {requests} responses of {r} bytes: {}",
        rec.line
    );
    assert!(
        requests * r - out <= CAP as u64 + r,
        "more queued than the cap holds ({requests} responses of {r} bytes): {}",
        rec.line
    );
}

// ---------------------------------------------------------------------------------
// 7: sampling on two workers
// ---------------------------------------------------------------------------------

/// `--access-log-sample 0.3` on two workers: of each worker's 7 clean closes exactly
/// floor(7 * 0.3) = 2 are logged, its 4th and 7th; every reset is logged, and so is
/// a close by the drain that had to reset (reason `shutdown`, which is clean only
/// without a reset).
#[test]
fn sampling_on_two_workers_is_exact_per_worker_and_never_skips_a_reset() {
    let dir = LogDir::new("sample-two");
    let path = dir.path("access.log");
    let server = echo_server(2, |c| {
        log_to(c, &path, LogFormat::Json);
        c.access_log.sample = 0.3;
        c.max_pending_bytes = 4096;
        c.drain_timeout = Duration::from_millis(300);
    });
    let metrics = Arc::clone(server.metrics());
    let addr = server.local_addr();
    let mut clean = Vec::new();
    for i in 0..14u64 {
        let (me, back, ending) = send_and_half_close(addr, &pattern(i, 0, 10 + i as usize));
        assert_eq!((back.len(), ending), (10 + i as usize, Ending::Fin));
        clean.push(me);
    }
    let mut resets = Vec::new();
    for i in 0..3u64 {
        let mut s = connect(addr);
        resets.push(s.local_addr().unwrap());
        echo_roundtrip(&mut s, &pattern(100 + i, 0, 5));
        edgepoll::sys::socket::set_linger_zero(s.as_fd()).unwrap();
    }
    settle(&server, 17, 4 + 3);
    // One that never reads its echo: the drain must reset it.
    let stuck = connect(addr);
    let stuck_addr = stuck.local_addr().unwrap();
    write_until_stalled(&stuck, 9, 64 << 20);
    server.shutdown();
    assert_eq!(metrics.access_log_records(AccessLogResult::Written), 8);
    assert_eq!(metrics.access_log_records(AccessLogResult::Dropped), 0);
    let recs = read_log(&path);
    let logged_clean: Vec<SocketAddr> = recs
        .iter()
        .filter(|r| r.get("reason") == "eof")
        .map(|r| r.addr("client"))
        .collect();
    // Round robin: client i on worker i % 2; each worker's 4th and 7th.
    let mut want = vec![clean[6], clean[7], clean[12], clean[13]];
    want.sort();
    let mut got = logged_clean.clone();
    got.sort();
    assert_eq!(got, want);
    for a in &resets {
        record_of(&recs, *a).expect(&[("reason", &"reset")]);
    }
    record_of(&recs, stuck_addr).expect(&[
        ("reason", &"shutdown"),
        ("reset", &true),
        ("ended_by", &"edgepoll"),
    ]);
    drop(stuck);
}

// ---------------------------------------------------------------------------------
// 8: reopening
// ---------------------------------------------------------------------------------

/// Ten renames and reopens while clients keep closing on two workers: every record
/// is in exactly one of the eleven files, none lost, none twice.
#[test]
fn many_reopens_while_records_flow_put_each_record_in_exactly_one_file() {
    let dir = LogDir::new("reopens");
    let path = dir.path("access.log");
    let server = echo_server(2, |c| log_to(c, &path, LogFormat::Text));
    let addr = server.local_addr();
    let served = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let (served, stop) = (Arc::clone(&served), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut ids = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let i = ids.len() as u64;
                let size = 1 + (i as usize * 31) % 500;
                let (me, back, ending) = send_and_half_close(addr, &pattern(i, 0, size));
                assert_eq!((back.len(), ending), (size, Ending::Fin));
                ids.push((me, size as u64));
                served.fetch_add(1, Ordering::Relaxed);
            }
            ids
        })
    };
    for k in 0..10 {
        let at = served.load(Ordering::Relaxed);
        wait_for("more churn", || served.load(Ordering::Relaxed) >= at + 20);
        std::fs::rename(&path, dir.path(&format!("access.log.{k}"))).unwrap();
        assert!(server.reopen_access_log(), "reopen {k}");
    }
    let at = served.load(Ordering::Relaxed);
    wait_for("churn after the last reopen", || {
        served.load(Ordering::Relaxed) >= at + 20
    });
    stop.store(true, Ordering::Relaxed);
    let mut want = churn.join().unwrap();
    let n = want.len() as u64;
    settle(&server, n, n);
    let mut got = Vec::new();
    for k in 0..10 {
        let recs = read_log(&dir.path(&format!("access.log.{k}")));
        assert!(!recs.is_empty(), "file {k} got no record");
        got.extend(recs);
    }
    got.extend(read_log(&path));
    let mut got: Vec<(SocketAddr, u64)> = got
        .iter()
        .map(|r| (r.addr("client"), r.num("bytes_in")))
        .collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
}

/// `Server::reopen_access_log`: "False if there is no file to reopen". A log on
/// stderr has none.
#[test]
fn a_reopen_of_a_log_on_stderr_says_there_was_no_file() {
    let server = echo_server(1, |c| c.access_log.target = Some(LogTarget::Stderr));
    assert!(!server.reopen_access_log());
    let off = echo_server(1, |_| {});
    assert!(!off.reopen_access_log());
}

/// SIGUSR1 to a binary without an access log file (off, and stderr) changes nothing:
/// it keeps serving and drains with status 0. (Its default action would kill it.)
#[test]
fn sigusr1_without_a_log_file_leaves_the_binary_serving() {
    for log in ["off", "stderr"] {
        let mut child = edgepoll()
            .args(["echo", "--listen", "127.0.0.1:0", "--workers", "1"])
            .args(["--metrics-listen", "off", "--access-log", log])
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log_lines = lines_of(&mut child);
        let mut seen = Vec::new();
        let addr = listening(&log_lines, &mut seen);
        let mut child = Running(child);
        for _ in 0..3 {
            kill(child.0.id(), "-USR1");
            loop {
                let l = log_lines
                    .recv_timeout(PATIENCE)
                    .expect("a line for SIGUSR1");
                if l.contains("no access log file to reopen") {
                    break;
                }
            }
        }
        let mut s = connect(addr);
        echo_roundtrip(&mut s, b"still here");
        drop(s);
        kill(child.0.id(), "-TERM");
        assert_eq!(child.0.wait().unwrap().code(), Some(0), "{log}");
    }
}

// ---------------------------------------------------------------------------------
// 9: addresses
// ---------------------------------------------------------------------------------

/// A PROXY header naming a client over `--max-connections-per-ip` is refused before
/// any mode sees it: no record, a rejection counted. The admitted one's record names
/// the header's client.
#[test]
fn a_proxied_client_over_its_per_ip_limit_gets_no_record() {
    let dir = LogDir::new("proxy-per-ip");
    let path = dir.path("access.log");
    let server = echo_server(1, |c| {
        log_to(c, &path, LogFormat::Text);
        c.accept_proxy = true;
        c.trusted_proxies = vec![edgepoll::config::parse_cidr("127.0.0.0/8").unwrap()];
        c.proxy_header_timeout = Duration::from_secs(600);
        c.max_connections_per_ip = Some(1);
    });
    let addr = server.local_addr();
    let mut first = connect(addr);
    let proxy = first.local_addr().unwrap();
    first
        .write_all(b"PROXY TCP4 192.0.2.1 198.51.100.1 1001 7000\r\n")
        .unwrap();
    echo_roundtrip(&mut first, b"first");
    let mut second = connect(addr);
    second
        .write_all(b"PROXY TCP4 192.0.2.1 198.51.100.1 1002 7000\r\nsecond")
        .unwrap();
    let (got, _) = read_until_end(&mut second);
    assert!(got.is_empty());
    wait_for("the refusal", || {
        server
            .metrics()
            .rejected(edgepoll::RejectReason::PerIpLimit)
            == 1
    });
    first.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_until_end(&mut first).1, Ending::Fin);
    let recs = logged(&server, &path, 1, 1);
    recs[0].expect(&[
        ("client", &"192.0.2.1:1001"),
        ("peer", &proxy),
        ("bytes_in", &5),
        ("bytes_out", &5),
    ]);
}

/// IPv6 addresses in JSON and text: quoted strings that parse back.
#[test]
fn ipv6_addresses_are_valid_in_both_formats() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("no IPv6 loopback here; skipped");
        return;
    }
    let dir = LogDir::new("ipv6");
    for format in [LogFormat::Json, LogFormat::Text] {
        let path = dir.path(format.as_str());
        let server = echo_server(1, |c| {
            c.listen = vec!["[::1]:0".parse().unwrap()];
            log_to(c, &path, format);
        });
        let (me, back, ending) = send_and_half_close(server.local_addr(), b"v6");
        assert_eq!((back.as_slice(), ending), (&b"v6"[..], Ending::Fin));
        let recs = logged(&server, &path, 1, 1);
        recs[0].expect(&[
            ("client", &me),
            ("peer", &me),
            ("listen", &server.local_addr()),
        ]);
        assert!(me.is_ipv6());
    }
}

// ---------------------------------------------------------------------------------
// 10: --log-format json
// ---------------------------------------------------------------------------------

#[track_caller]
fn assert_all_json(lines: &[String]) {
    assert!(!lines.is_empty());
    for line in lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["message"].is_string() || v["mode"].is_string(), "{line}");
    }
}

/// With `--log-format json`, a server that cannot start (its address is taken)
/// says so in JSON too: a pipeline that reads JSON must not lose the one line that
/// says why the service is down.
#[test]
fn with_log_format_json_a_failed_start_is_a_json_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let out = edgepoll()
        .args(["--log-format", "json", "echo", "--metrics-listen", "off"])
        .arg("--listen")
        .arg(taken.local_addr().unwrap().to_string())
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<String> = text.lines().map(String::from).collect();
    assert_all_json(&lines);
    assert!(text.contains("Address already in use"), "{text}");
}

/// A worker's warning (the drain timed out on a client that never reads) is a JSON
/// line naming the worker's thread, like every other line.
#[test]
fn with_log_format_json_a_workers_warning_is_a_json_line() {
    let mut child = edgepoll()
        .args(["--log-format", "json", "echo", "--listen", "127.0.0.1:0"])
        .args(["--workers", "1", "--metrics-listen", "off"])
        .args(["--drain-timeout", "300ms", "--max-pending-bytes", "4096"])
        .args(["--access-log", "stderr", "--access-log-format", "json"])
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = lines_of(&mut child);
    let mut lines = Vec::new();
    let addr = listening(&log, &mut lines);
    let mut child = Running(child);
    let stuck = connect(addr);
    write_until_stalled(&stuck, 1, 64 << 20);
    kill(child.0.id(), "-TERM");
    assert_eq!(child.0.wait().unwrap().code(), Some(0));
    lines.extend(log.iter());
    assert_all_json(&lines);
    let warning = lines
        .iter()
        .find(|l| l.contains("drain timeout reached"))
        .unwrap_or_else(|| panic!("no drain warning: {lines:#?}"));
    let v: serde_json::Value = serde_json::from_str(warning).unwrap();
    assert_eq!(v["level"], "WARN", "{warning}");
    assert_eq!(v["threadName"], "edgepoll-w0", "{warning}");
    let record = lines
        .iter()
        .find(|l| l.contains("\"mode\":\"echo\""))
        .unwrap_or_else(|| panic!("no record: {lines:#?}"));
    let rec = parse_line(record);
    rec.expect(&[("reason", &"shutdown"), ("reset", &true)]);
    drop(stuck);
}

/// `--status 400`: the configured response and the error response for a bad request
/// share a code. The record must say it once (a key twice is not logfmt, and a JSON
/// object with a key twice loses one count in most parsers), with both counted.
#[test]
fn a_configured_status_equal_to_an_error_status_is_counted_under_one_key() {
    let dir = LogDir::new("status-twice");
    for format in [LogFormat::Text, LogFormat::Json] {
        let path = dir.path(format.as_str());
        let server = http_server(1, |c| {
            log_to(c, &path, format);
            c.http.status = 400;
        });
        let mut s = connect(server.local_addr());
        s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\nGARBAGE\r\n\r\n")
            .unwrap();
        let (statuses, _, _) = read_responses(&mut s, 2);
        assert_eq!(statuses, vec![400, 400]);
        assert_eq!(read_until_end(&mut s).1, Ending::Fin);
        drop(s);
        let recs = logged(&server, &path, 1, 1);
        recs[0].expect(&[("requests", &2), ("status_400", &2)]);
        let keys: Vec<&str> = recs[0]
            .fields
            .iter()
            .map(|(k, _)| k.as_str())
            .filter(|k| k.starts_with("status_"))
            .collect();
        assert_eq!(keys, ["status_400"], "{}", recs[0].line);
        if format == LogFormat::Json {
            assert_eq!(
                recs[0].line.matches("\"400\"").count(),
                1,
                "{}",
                recs[0].line
            );
        }
    }
}

/// A reload that fails gives its connections back to the process they never left
/// (`Server::resume`): a record must count all of their bytes, as the metrics did,
/// not only those after the failed attempt.
#[test]
fn a_connection_a_failed_reload_gave_back_keeps_its_whole_count() {
    let dir = LogDir::new("resumed");
    let path = dir.path("access.log");
    let server = echo_server(2, |c| log_to(c, &path, LogFormat::Text));
    let addr = server.local_addr();
    let mut clients: Vec<TcpStream> = (0..2).map(|_| connect(addr)).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        echo_roundtrip(c, &pattern(i as u64, 0, 1000));
    }
    let handover = server.hand_over(vec![false]);
    let (mut done, mut taken) = (0, Vec::new());
    while done < handover.workers {
        match handover.rx.recv_timeout(PATIENCE).expect("export") {
            Some(conn) => taken.push(conn),
            None => done += 1,
        }
    }
    assert_eq!(taken.len(), 2);
    // The successor died: everything comes back.
    server.resume(taken);
    let mut ids = Vec::new();
    for (i, mut c) in clients.into_iter().enumerate() {
        ids.push(c.local_addr().unwrap());
        echo_roundtrip(&mut c, &pattern(10 + i as u64, 0, 234));
        c.shutdown(Shutdown::Write).unwrap();
        assert_eq!(read_until_end(&mut c), (Vec::new(), Ending::Fin));
    }
    let recs = logged(&server, &path, 2, 2);
    for me in ids {
        record_of(&recs, me).expect(&[
            ("listen", &addr),
            ("bytes_in", &1234),
            ("bytes_out", &1234),
            ("reason", &"eof"),
        ]);
    }
}

/// A worker whose event loop fails closes its connections (reason `error`): its
/// clients did nothing, so the records must not say they ended them.
#[test]
fn connections_closed_by_a_failed_worker_were_ended_by_edgepoll() {
    let dir = LogDir::new("worker-failed");
    let path = dir.path("access.log");
    let server = echo_server(1, |c| log_to(c, &path, LogFormat::Text));
    let mut s = connect(server.local_addr());
    let me = s.local_addr().unwrap();
    echo_roundtrip(&mut s, b"fine so far");
    server.inject_worker_failure(0);
    assert_eq!(read_until_end(&mut s), (Vec::new(), Ending::Fin));
    wait_for("the failure", || server.failure().is_some());
    let recs = logged(&server, &path, 1, 1);
    recs[0].expect(&[
        ("client", &me),
        ("bytes_in", &11),
        ("reason", &"error"),
        ("reset", &false),
        ("ended_by", &"edgepoll"),
    ]);
}

/// The log file deleted under a running server (not renamed, as logrotate does): the
/// writer goes on writing to the file it has open, unseen, and counts those records
/// written, as the README says; SIGUSR1's reopen creates the path anew and later
/// records are there. A file put in its place is not written until the reopen.
#[test]
fn a_deleted_or_replaced_log_file_is_written_again_after_a_reopen() {
    let dir = LogDir::new("deleted");
    let path = dir.path("access.log");
    let server = echo_server(1, |c| log_to(c, &path, LogFormat::Text));
    let addr = server.local_addr();
    let client = |i: u64| send_and_half_close(addr, &pattern(i, 0, 10)).0;
    client(0);
    settle(&server, 1, 1);
    std::fs::remove_file(&path).unwrap();
    client(1);
    settle(&server, 2, 2);
    assert!(
        !path.exists(),
        "the writer does not recreate a deleted file by itself"
    );
    std::fs::write(&path, "").unwrap();
    client(2);
    settle(&server, 3, 3);
    assert!(
        read_log(&path).is_empty(),
        "a file put in its place is not written"
    );
    assert!(server.reopen_access_log());
    let later = client(3);
    settle(&server, 4, 4);
    let recs = read_log(&path);
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].addr("client"), later);
}

/// `--access-log stderr` to a pipe nobody reads (a stalled log collector): the
/// records fill the pipe and the writer blocks on it. A worker that then has a line
/// of its own to log (an upstream that refuses, once per `--fail-timeout`) must not
/// block on stderr behind the records: "A worker never blocks on a log". Every client
/// must be served, byte-exact.
#[test]
fn a_worker_with_a_warning_does_not_block_behind_a_stalled_stderr_log() {
    let upstream = echo_server(1, |_| {});
    let mut child = edgepoll()
        .args(["relay", "--listen", "127.0.0.1:0", "--workers", "1"])
        .args(["--metrics-listen", "off", "--access-log", "stderr"])
        .args(["--fail-timeout", "10ms"])
        .arg("--upstream")
        .arg(upstream.local_addr().to_string())
        .arg("--upstream")
        .arg(dead_address().to_string())
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read up to the start-up line, then never again.
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let addr = loop {
        let mut line = String::new();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "no start-up line");
        if let Some(after) = line.split(" listening on ").nth(1) {
            break after
                .split(' ')
                .next()
                .unwrap()
                .parse::<SocketAddr>()
                .unwrap();
        }
    };
    let child = Running(child);
    // A few thousand records fill any pipe; refused connects keep warning meanwhile.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut served = 0u64;
    while Instant::now() < deadline || served < 3000 {
        let mut s = connect(addr);
        echo_roundtrip(&mut s, &pattern(served, 0, 100));
        served += 1;
        if served % 500 == 0 {
            // Past the refusing upstream's skip: it is tried, and warned about, again.
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    drop(child);
    drop(stderr);
}

/// README (HTTP semantics): "a client that pipelines without reading holds at most
/// that [`--max-pending-bytes`] plus one response". The access log's count of
/// responses made against bytes written showed more held than that; here the peak
/// of the outbound buffer itself, for a client that writes requests until every
/// buffer is full and never reads.
#[test]
fn an_http_client_that_pipelines_without_reading_holds_at_most_the_cap_plus_one_response() {
    const CAP: usize = 16 * 1024;
    let server = http_server(1, |c| c.max_pending_bytes = CAP);
    let addr = server.local_addr();
    let req = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n";
    let mut one = connect(addr);
    one.write_all(req).unwrap();
    one.shutdown(Shutdown::Write).unwrap();
    let r = read_until_end(&mut one).0.len();
    let burst: Vec<u8> = req.iter().copied().cycle().take(req.len() * 2000).collect();
    for _ in 0..3 {
        let s = connect(addr);
        s.set_nonblocking(true).unwrap();
        let mut quiet_since: Option<Instant> = None;
        let mut at = 0;
        while quiet_since.is_none_or(|t| t.elapsed() < STALL) {
            match (&s).write(&burst[at..]) {
                Ok(n) => {
                    at = (at + n) % req.len();
                    quiet_since = None;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    quiet_since.get_or_insert_with(Instant::now);
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("write: {e}"),
            }
        }
        let peak = settled(|| server.stats()[0].peak_pending_bytes as u64) as usize;
        assert!(
            peak <= CAP + r,
            "peak outbound {peak}, cap {CAP}, response {r}"
        );
    }
}
