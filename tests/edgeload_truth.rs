//! edgeload against servers that misbehave on purpose (issue 20): each test is a peer
//! trying to make edgeload's verdict wrong, with the exact counts the report must show.
//!
//! - a swapping server sends every echo response to another connection than the one
//!   that asked: every answered request is a mismatch (none passes as correct), over
//!   reconnects and threads;
//! - a replaying server answers one run with the bytes a previous run sent: caught,
//!   unless the run is given the same `--seed`;
//! - a server that adds a byte to each response: one mismatch per bad response (or none
//!   when the extra byte trails a correct one), and the extra bytes counted as such;
//! - under `--rate`: a server that stops answering near the end, one that stalls once,
//!   and one slower than the rate: every request that fell due is accounted for.
//!
//! The tests run the real `edgeload` binary and read its JSON. `EDGELOAD_BIN` runs them
//! against another build (that is how the closing note's "before" figures were taken).

mod util;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use util::load::{assert_accounted, n};

use serde_json::Value;

const SIZE: usize = 64;

fn edgeload(args: &[&str], addr: SocketAddr) -> (Value, i32, String) {
    util::load::edgeload(args, &format!("tcp://{addr}"))
}

/// A listener whose connections are each served by `serve(stream, index)` on a thread
/// of their own; `index` counts accepted connections from 0.
fn spawn_server(serve: impl Fn(TcpStream, usize) + Send + Sync + 'static) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let serve = Arc::new(serve);
    std::thread::spawn(move || {
        for (index, stream) in listener.incoming().flatten().enumerate() {
            let serve = Arc::clone(&serve);
            std::thread::spawn(move || serve(stream, index));
        }
    });
    addr
}

/// Reads one request of `SIZE` bytes; None at the end.
fn read_request(s: &mut TcpStream) -> Option<[u8; SIZE]> {
    let mut req = [0u8; SIZE];
    s.read_exact(&mut req).ok().map(|()| req)
}

#[test]
fn a_server_that_swaps_responses_between_connections_never_gets_one_past() {
    // Requests wait in pairs: the second to arrive from another connection takes the
    // first's bytes, and the first takes the second's.
    type Waiting = Mutex<Option<(usize, [u8; SIZE], TcpStream)>>;
    let waiting: Arc<Waiting> = Arc::new(Mutex::new(None));
    let crossed = Arc::new(AtomicU64::new(0));
    let (w, c) = (Arc::clone(&waiting), Arc::clone(&crossed));
    let addr = spawn_server(move |mut s, index| {
        while let Some(req) = read_request(&mut s) {
            let mut slot = w.lock().unwrap();
            match slot.take() {
                Some((other, theirs, mut their_stream)) if other != index => {
                    // 64 bytes into an empty socket buffer: the writes do not block.
                    let a = s.write_all(&theirs).is_ok();
                    let b = their_stream.write_all(&req).is_ok();
                    c.fetch_add(u64::from(a) + u64::from(b), Ordering::Relaxed);
                }
                kept => *slot = kept.or(Some((index, req, s.try_clone().unwrap()))),
            }
        }
    });
    // Connections replaced after every request, on two threads: the old seeds repeated
    // here (slot 1's connection #11 had slot 7's connection #8's seed).
    let (v, code, _) = edgeload(
        &[
            "-c",
            "10",
            "-t",
            "2",
            "-d",
            "2s",
            "--reconnect",
            "--timeout",
            "500ms",
        ],
        addr,
    );
    let answered = n(&v, "requests");
    assert!(answered > 200, "{answered} answered");
    assert!(answered <= crossed.load(Ordering::Relaxed));
    assert_eq!(
        n(&v, "errors/mismatch"),
        answered,
        "every answer went to the wrong connection, and each must be caught"
    );
    assert_eq!(code, 1, "bytes differed");
    assert_accounted(&v);
}

#[test]
fn a_replay_of_another_run_is_caught_unless_it_is_given_the_same_seed() {
    // Run 1 against a recording echo: the first connection that sends bytes is kept.
    let recorded = Arc::new(Mutex::new(Vec::<u8>::new()));
    let r = Arc::clone(&recorded);
    let echo = spawn_server(move |mut s, _| {
        let mut mine = Vec::new();
        while let Some(req) = read_request(&mut s) {
            mine.extend_from_slice(&req);
            if s.write_all(&req).is_err() {
                break;
            }
        }
        let mut r = r.lock().unwrap();
        if r.is_empty() {
            *r = mine;
        }
    });
    let (first, code, _) = edgeload(&["-c", "1", "-d", "500ms"], echo);
    assert_eq!((n(&first, "errors/total"), code), (0, 0));
    let nonce = first["nonce"]
        .as_str()
        .expect("the report names its nonce")
        .to_string();
    // Wait for the recording connection to have ended.
    for _ in 0..200 {
        if !recorded.lock().unwrap().is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let old = Arc::new(recorded.lock().unwrap().clone());
    assert!(old.len() >= 100 * SIZE, "run 1 sent {} bytes", old.len());
    // The replaying server answers each request with the bytes run 1 sent at the same
    // place of its stream (and echoes past the end of the recording).
    let replay = spawn_server(move |mut s, _| {
        let mut at = 0;
        while let Some(req) = read_request(&mut s) {
            let answer = old.get(at..at + SIZE).unwrap_or(&req);
            at += SIZE;
            if s.write_all(answer).is_err() {
                break;
            }
        }
    });
    // 100 requests, all within the recording: every one is a replay.
    let args = ["-c", "1", "-d", "1s", "--rate", "100"];
    let (v, code, _) = edgeload(&args, replay);
    assert!(n(&v, "requests") >= 50);
    assert_eq!(
        n(&v, "errors/mismatch"),
        n(&v, "requests"),
        "replayed bytes passed"
    );
    assert_eq!(code, 1);
    assert_accounted(&v);
    // The same seed sends the same bytes, so the replay is exactly right: the server
    // above replays faithfully, and --seed reproduces a run.
    let (v, code, _) = edgeload(&[&args[..], &["--seed", &nonce]].concat(), replay);
    assert_eq!((n(&v, "errors/total"), code), (0, 0), "{v}");
}

/// Echoes each request with one byte more: before it (`prepend`), or after it.
fn one_byte_more(prepend: bool) -> SocketAddr {
    spawn_server(move |mut s, _| {
        while let Some(req) = read_request(&mut s) {
            let answer = if prepend {
                [&b"X"[..], &req].concat()
            } else {
                [&req[..], b"X"].concat()
            };
            if s.write_all(&answer).is_err() {
                break;
            }
        }
    })
}

#[test]
fn a_response_one_byte_too_long_is_one_mismatch_and_one_extra() {
    // 'X' first: the request's 64 bytes are wrong (one mismatch) and the 65th byte is
    // beyond everything sent (one extra; the connection is replaced). The old count was
    // two mismatches per bad response.
    let (v, code, _) = edgeload(&["-c", "5", "-d", "1s"], one_byte_more(true));
    let answered = n(&v, "requests");
    assert!(answered > 50, "{answered}");
    assert_eq!(n(&v, "errors/mismatch"), answered);
    assert_eq!(n(&v, "errors/extra"), answered);
    assert_eq!(code, 1);
    assert_accounted(&v);
    // 'X' last: the request's bytes are right; only the extra byte is wrong.
    let (v, code, stderr) = edgeload(&["-c", "5", "-d", "1s"], one_byte_more(false));
    let answered = n(&v, "requests");
    assert!(answered > 50, "{answered}");
    assert_eq!(n(&v, "errors/mismatch"), 0);
    assert_eq!(n(&v, "errors/extra"), answered);
    assert_eq!(code, 1, "more came back than was sent: {stderr}");
    assert_accounted(&v);
}

/// An echo server that answers the first `answer` requests (over all connections) and
/// then reads but never answers.
fn stops_answering_after(answer: u64) -> SocketAddr {
    let count = Arc::new(AtomicU64::new(0));
    spawn_server(move |mut s, _| {
        while let Some(req) = read_request(&mut s) {
            if count.fetch_add(1, Ordering::Relaxed) >= answer {
                // Hold the connection open, answering nothing.
                while read_request(&mut s).is_some() {}
                return;
            }
            if s.write_all(&req).is_err() {
                return;
            }
        }
    })
}

#[test]
fn requests_a_stalled_server_holds_at_the_end_are_outstanding_and_the_rest_never_sent() {
    // 1,000/s for 3 s; the server answers 2,000 and stalls for the last second.
    let addr = stops_answering_after(2000);
    let (v, code, _) = edgeload(&["-c", "10", "-d", "3s", "--rate", "1000"], addr);
    assert_eq!(code, 0);
    assert_accounted(&v);
    let due = n(&v, "requests_due");
    assert!((2999..=3001).contains(&due), "{due} due");
    assert_eq!(n(&v, "requests"), 2000);
    assert_eq!(n(&v, "timed_out") + n(&v, "failed"), 0);
    // Each connection holds its one unanswered request at the end.
    assert_eq!(n(&v, "outstanding"), 10);
    assert_eq!(n(&v, "unsent"), due - 2010);
    // The stalled requests waited from about 2 s to the end: the tail shows it.
    let p999 = n(&v, "latency_us/percentiles/p99.9");
    assert!(p999 >= 500_000, "p99.9 {p999} us hides the stall");
    assert!(n(&v, "latency_us/max") >= 500_000);
    let warnings = v["warnings"].to_string();
    assert!(warnings.contains("could not keep up"), "{warnings}");
}

#[test]
fn a_timed_out_request_is_recorded_at_least_at_the_timeout() {
    // Answers 100, then nothing: with a 300 ms timeout the held requests time out,
    // their connections are replaced, and the new connections' requests are held too.
    let addr = stops_answering_after(100);
    let (v, _, _) = edgeload(
        &["-c", "2", "-d", "2s", "--rate", "200", "--timeout", "300ms"],
        addr,
    );
    assert_accounted(&v);
    assert_eq!(n(&v, "requests"), 100);
    let timed_out = n(&v, "timed_out");
    assert!(timed_out >= 2, "{timed_out}");
    assert_eq!(
        n(&v, "errors/timeout"),
        timed_out,
        "depth 1: one request each"
    );
    // Timed-out and outstanding requests have latency entries, and they are the
    // slowest: at least the timeout (they are over 0.01% of the entries).
    assert_eq!(
        n(&v, "latency_us/count"),
        100 + timed_out + n(&v, "outstanding")
    );
    assert!(n(&v, "latency_us/percentiles/p99.99") >= 300_000);
}

#[test]
fn a_stall_once_shows_in_the_latency_from_due_and_not_in_the_service_time() {
    // 1,000/s for 2 s on one connection; the 500th request is held 200 ms.
    let held = Arc::new(AtomicU64::new(0));
    let addr = spawn_server(move |mut s, _| {
        while let Some(req) = read_request(&mut s) {
            if held.fetch_add(1, Ordering::Relaxed) == 499 {
                std::thread::sleep(Duration::from_millis(200));
            }
            if s.write_all(&req).is_err() {
                return;
            }
        }
    });
    let (v, code, _) = edgeload(&["-c", "1", "-d", "2s", "--rate", "1000"], addr);
    assert_eq!(code, 0);
    assert_accounted(&v);
    assert_eq!(
        n(&v, "requests") + n(&v, "outstanding"),
        n(&v, "requests_sent")
    );
    // About 200 requests fell due during the stall and were sent after it: measured
    // from their due time they waited up to 200 ms (10% of the run: p99.9 and p99
    // show it); from their send time only the one held was slow (1 in 2,000: p99.9
    // does not).
    let corrected = n(&v, "latency_us/percentiles/p99.9");
    let service = n(&v, "service_time_us/percentiles/p99.9");
    assert!(corrected >= 150_000, "corrected p99.9 {corrected} us");
    assert!(n(&v, "latency_us/percentiles/p99") >= 100_000);
    assert!(service < 100_000, "service p99.9 {service} us");
    assert!(n(&v, "service_time_us/max") >= 200_000, "the held one");
    assert!(n(&v, "sent_late") >= 100, "{}", n(&v, "sent_late"));
}

#[test]
fn a_server_slower_than_the_rate_leaves_requests_unsent_and_says_so() {
    // One response at a time, 2.5 ms each: at most 400/s against --rate 1000.
    let gate = Arc::new(Mutex::new(()));
    let answered = Arc::new(AtomicU64::new(0));
    let a = Arc::clone(&answered);
    let addr = spawn_server(move |mut s, _| {
        while let Some(req) = read_request(&mut s) {
            let _one_at_a_time = gate.lock().unwrap();
            std::thread::sleep(Duration::from_micros(2500));
            if s.write_all(&req).is_err() {
                return;
            }
            a.fetch_add(1, Ordering::Relaxed);
        }
    });
    let (v, code, _) = edgeload(&["-c", "10", "-d", "3s", "--rate", "1000"], addr);
    assert_eq!(code, 0);
    assert_accounted(&v);
    let (due, done) = (n(&v, "requests_due"), n(&v, "requests"));
    assert!((2999..=3001).contains(&due), "{due} due");
    assert!(done <= 1250, "{done} answered at 400/s");
    // What the server wrote was read, or is still outstanding at the end.
    let written = answered.load(Ordering::Relaxed);
    assert!(done <= written && written <= done + n(&v, "outstanding"));
    assert!(n(&v, "unsent") >= 1700, "{}", n(&v, "unsent"));
    assert!(n(&v, "sent_late") > 0);
    let warnings = v["warnings"].to_string();
    assert!(
        warnings.contains("the server could not keep up"),
        "{warnings}"
    );
}

#[test]
fn requests_due_behind_a_server_that_never_answers_cost_no_memory() {
    // A server that accepts and never reads: at --rate 1,000,000 for 2 s, up to two
    // million requests fall due behind one busy connection. Keeping a time per due
    // request (as edgeload did) held them all: 36 MB here at 2 s (debug build), 76 MB
    // at 3 s in the review; two numbers per connection now (6.6 MB in all here).
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().flatten() {
            held.push(s);
        }
    });
    let bin = std::env::var("EDGELOAD_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_edgeload").to_string());
    let mut child = Command::new(bin)
        .args([
            "-c",
            "1",
            "-d",
            "2s",
            "--timeout",
            "10s",
            "--rate",
            "1000000",
            "--json",
        ])
        .arg(format!("tcp://{addr}"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The peak resident size, read until the process is gone (VmHWM never falls).
    let status = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0u64;
    while child.try_wait().unwrap().is_none() {
        if let Ok(text) = std::fs::read_to_string(&status) {
            if let Some(kib) = text
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
            {
                peak_kib = peak_kib.max(kib);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    eprintln!("peak {peak_kib} KiB: {out}");
    assert!(
        peak_kib < 16 * 1024,
        "{peak_kib} KiB resident, {} requests answered",
        v["requests"]
    );
    assert_accounted(&v);
    let unsent = n(&v, "unsent");
    assert!(unsent >= 500_000, "{unsent} never sent");
}
