//! edgeload against real servers on loopback: edgepoll's echo, a corrupting echo, and
//! small HTTP servers with every framing.

mod util;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use edgepoll::load::{self, LoadConfig, Target};
use util::*;

fn config(url: &str, tweak: impl FnOnce(&mut LoadConfig)) -> LoadConfig {
    let mut c = LoadConfig::new(Target::parse(url).unwrap(), url);
    c.duration = Duration::from_millis(1000);
    tweak(&mut c);
    c
}

fn edgeload() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edgeload"))
}

/// A server on its own thread: `serve` handles each connection on a thread of its own.
fn spawn_server(serve: fn(TcpStream)) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || serve(stream));
        }
    });
    addr
}

/// Echoes, but flips one byte in every thousand.
fn corrupting_echo(mut s: TcpStream) {
    let mut buf = [0u8; 4096];
    let mut pos = 0u64;
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        for b in &mut buf[..n] {
            if pos % 1000 == 999 {
                *b ^= 0x5a;
            }
            pos += 1;
        }
        if s.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

/// Reads requests and answers each with a response framed differently, written a
/// byte at a time for the third kind, so edgeload must handle every split.
fn mixed_http(mut s: TcpStream) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut served = 0usize;
    loop {
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.drain(..end + 4);
            let resp: &[u8] = match served % 3 {
                0 => b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
                1 => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwiki\r\n5\r\npedia\r\n0\r\n\r\n",
                _ => b"HTTP/1.1 201 Created\r\nContent-Length: 3\r\n\r\nabc",
            };
            let ok = if served % 3 == 2 {
                resp.iter()
                    .all(|b| s.write_all(std::slice::from_ref(b)).is_ok())
            } else {
                s.write_all(resp).is_ok()
            };
            if !ok {
                return;
            }
            served += 1;
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Answers every request with 500 and closes after every second one.
fn failing_http(mut s: TcpStream) {
    let mut chunk = [0u8; 4096];
    let mut served = 0;
    while let Ok(n) = s.read(&mut chunk) {
        if n == 0 {
            return;
        }
        served += 1;
        let close = if served % 2 == 0 {
            "Connection: close\r\n"
        } else {
            ""
        };
        let resp = format!("HTTP/1.1 500 Oops\r\nContent-Length: 2\r\n{close}\r\nno");
        if s.write_all(resp.as_bytes()).is_err() || !close.is_empty() {
            return;
        }
    }
}

#[test]
fn echo_against_edgepoll_counts_add_up_with_zero_errors() {
    let server = echo_server(2, |_| {});
    let url = format!("tcp://{}", server.local_addr());
    let c = config(&url, |c| {
        c.connections = 8;
        c.threads = 2;
        c.depth = 4;
        c.size = 100;
    });
    let r = load::run(&c, |_, _| {}).unwrap();
    assert_eq!(r.stats.errors.total(), 0, "{:?}", r.stats.errors);
    assert!(r.stats.requests > 100, "{} requests", r.stats.requests);
    // Every completed request is `size` bytes back; at most depth*connections more are
    // in flight at the end.
    let in_flight_max = (c.connections * c.depth * c.size) as u64;
    assert!(r.stats.bytes_read >= r.stats.requests * 100);
    assert!(r.stats.bytes_read - r.stats.requests * 100 <= in_flight_max);
    assert!(r.stats.bytes_written - r.stats.bytes_read <= in_flight_max);
    // Every request sent is answered or, at the end, outstanding (depth 4 on each of
    // the 8 connections), and each has a latency entry.
    assert_eq!(r.stats.outstanding, (c.connections * c.depth) as u64);
    assert_eq!(r.stats.sent, r.stats.requests + r.stats.outstanding);
    assert_eq!(r.stats.latency.len(), r.stats.sent);
    assert_eq!(r.stats.sent * 100, r.stats.bytes_written);
    wait_for("the server to count what edgeload wrote", || {
        total(&server, |s| s.received_bytes) == r.stats.bytes_written
    });
    // The 8 load connections, plus the one probe that checks the target is reachable.
    assert_eq!(total(&server, |s| s.accepted), 8 + 1);
}

#[test]
fn a_server_that_flips_bytes_is_caught_and_the_exit_status_says_so() {
    let addr = spawn_server(corrupting_echo);
    let url = format!("tcp://{addr}");
    let out = edgeload()
        .args(["-c", "2", "-d", "1s", "--size", "500", &url])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    let line = stdout.lines().find(|l| l.contains("Errors:")).unwrap();
    let mismatches: u64 = line
        .split("mismatch ")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(mismatches > 0, "{line}");
    assert!(stderr.contains("came back different"), "{stderr}");

    // The library agrees: with 500-byte requests every second request of each
    // connection holds a flip, so each connection counts floor(its requests / 2).
    let c = config(&url, |c| c.size = 500);
    let r = load::run(&c, |_, _| {}).unwrap();
    assert!(r.stats.requests > 10);
    let expected = r.stats.requests / 2;
    assert!(
        r.stats.errors.mismatch <= expected
            && expected - r.stats.errors.mismatch <= c.connections as u64,
        "{} of {}",
        r.stats.errors.mismatch,
        r.stats.requests
    );
}

#[test]
fn constant_rate_is_kept_within_five_percent() {
    let server = echo_server(1, |_| {});
    let url = format!("tcp://{}", server.local_addr());
    let c = config(&url, |c| {
        c.connections = 4;
        c.rate = Some(load::RatePlan::Constant(1000.0));
        c.duration = Duration::from_secs(3);
    });
    let r = load::run(&c, |_, _| {}).unwrap();
    assert_eq!(r.stats.errors.total(), 0);
    let expected = 3000.0;
    let off = (r.stats.requests as f64 - expected).abs() / expected;
    assert!(
        off < 0.05,
        "{} requests, expected about {expected}",
        r.stats.requests
    );
}

#[test]
fn http_with_every_framing_split_and_pipelined() {
    let addr = spawn_server(mixed_http);
    let url = format!("http://{addr}/");
    let r = load::run(
        &config(&url, |c| {
            c.connections = 4;
            c.depth = 8;
        }),
        |_, _| {},
    )
    .unwrap();
    assert_eq!(r.stats.errors.total(), 0, "{:?}", r.stats.errors);
    assert!(r.stats.requests > 100, "{}", r.stats.requests);
    assert_eq!(r.stats.status[2], r.stats.requests, "every response is 2xx");
}

#[test]
fn http_errors_and_server_closes_are_counted_not_fatal() {
    let addr = spawn_server(failing_http);
    let url = format!("http://{addr}/x");
    let r = load::run(&config(&url, |c| c.connections = 2), |_, _| {}).unwrap();
    assert!(r.stats.requests > 10);
    assert_eq!(r.stats.status[5], r.stats.requests);
    assert_eq!(r.stats.errors.non_2xx, r.stats.requests);
    assert_eq!(
        r.stats.errors.read, 0,
        "a Connection: close is not a read error"
    );
}

#[test]
fn json_and_plot_outputs() {
    let server = echo_server(1, |_| {});
    let url = format!("tcp://{}", server.local_addr());
    let svg = std::env::temp_dir().join(format!("edgeload-test-{}.svg", std::process::id()));
    let out = edgeload()
        .args(["-c", "2", "-d", "500ms", "--json", "--plot"])
        .arg(&svg)
        .arg(&url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["connections"], 2);
    assert_eq!(v["errors"]["total"], 0);
    assert!(v["requests"].as_u64().unwrap() > 0);
    assert!(v["latency_us"]["percentiles"]["p99.99"].as_u64().unwrap() > 0);
    let picture = std::fs::read_to_string(&svg).unwrap();
    std::fs::remove_file(&svg).unwrap();
    assert!(picture.starts_with("<svg") && picture.contains("<polyline"));
    assert!(picture.contains("99.99%"));
}

#[test]
fn bad_arguments_get_one_line_and_exit_2() {
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    for (args, says) in [
        (vec!["gopher://x:1".to_string()], "unknown scheme"),
        (
            vec!["-c".into(), "0".into(), "tcp://127.0.0.1:1".into()],
            "--connections must be at least 1",
        ),
        (
            vec![
                "-c".into(),
                "1".into(),
                "-t".into(),
                "2".into(),
                "tcp://127.0.0.1:1".into(),
            ],
            "at least -t",
        ),
        (vec![format!("tcp://{closed}")], "cannot connect to"),
        (
            vec!["-d".into(), "forever".into(), "tcp://127.0.0.1:1".into()],
            "invalid duration",
        ),
    ] {
        let out = edgeload().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn reconnect_opens_a_connection_per_request() {
    let server = echo_server(1, |_| {});
    let url = format!("tcp://{}", server.local_addr());
    let c = config(&url, |c| {
        c.connections = 4;
        c.reconnect = true;
        c.duration = Duration::from_millis(500);
    });
    let r = load::run(&c, |_, _| {}).unwrap();
    assert_eq!(r.stats.errors.total(), 0, "{:?}", r.stats.errors);
    assert!(r.stats.requests > 50, "{}", r.stats.requests);
    wait_for("every connection to be counted", || {
        server.open_connections() == 0
            && total(&server, |s| s.closed_total()) == total(&server, |s| s.accepted)
    });
    // One connection per completed request, plus the probe, plus at most one per
    // slot still waiting for its answer when the test ended. The counters are
    // published up to 100 ms after the permits are given back, so an equal pair can
    // be a stale one: read the count once it has stopped moving.
    let accepted = settled(|| total(&server, |s| s.accepted));
    assert!(
        accepted > r.stats.requests,
        "{accepted} connections for {} requests",
        r.stats.requests
    );
    assert!(
        accepted <= r.stats.requests + 1 + c.connections as u64,
        "{accepted} connections for {} requests",
        r.stats.requests
    );
    // --reconnect with pipelining is refused.
    let bad = config(&url, |c| {
        c.reconnect = true;
        c.depth = 2;
    });
    assert!(bad
        .validate()
        .unwrap_err()
        .to_string()
        .contains("--depth 1"));
}
