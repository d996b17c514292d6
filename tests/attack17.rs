//! Review 17: attacks on the promises of edgeload's rate plans, `--timeseries`,
//! `--hdr-log`, CI gates and HTTP request flags (README, `## edgeload`).
//!
//! Every test runs the real `edgeload` binary against a server in this process, over
//! loopback, and checks exact counts. No test asserts a speed.

mod util;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use util::load::TempFile;

use serde_json::Value;
use util::echo_server;

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

/// Waits for `child` at most `limit`, killing it past that; its stdout as JSON.
fn finish(mut child: Child, limit: Duration) -> (Value, i32) {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("edgeload did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    (
        serde_json::from_str(&stdout).unwrap_or(Value::Null),
        out.status.code().unwrap_or(-1),
    )
}

/// README: `--timeseries` gives "with `--rate` the requests that fell due in it" for
/// each second. When edgeload itself is held up (here: stopped with SIGSTOP for 2.5 s,
/// as a busy machine does for shorter), the requests due meanwhile were counted in the
/// second edgeload noticed them in: `--rate 100 -d 5s` wrote due 100, 30, 0, 270, 100.
/// The schedule puts exactly 100 due in each second, whatever edgeload was doing.
#[test]
fn a_second_counts_the_requests_that_fell_due_in_it_even_when_edgeload_was_held_up() {
    let server = echo_server(1, |_| {});
    let url = format!("tcp://{}", server.local_addr());
    let series = TempFile::new("held-up.csv");
    let child = Command::new(env!("CARGO_BIN_EXE_edgeload"))
        .args(["-c", "10", "-d", "5s", "--rate", "100", "--timeout", "10s"])
        .args(["--timeseries", series.arg(), "--json", &url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1300));
    signal(&child, "-STOP");
    std::thread::sleep(Duration::from_millis(2500));
    signal(&child, "-CONT");
    let (report, code) = finish(child, Duration::from_secs(30));
    assert_eq!(code, 0);
    assert_eq!(report["requests_due"].as_u64(), Some(500), "{report}");
    let text = series.read();
    let due: Vec<&str> = text
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(2).unwrap())
        .collect();
    assert_eq!(due, ["100"; 5], "{text}");
}

/// README: `--rate` is allowed up to its maximum and `-d` is how long the run lasts.
/// The schedule counts every due request one by one, both while running and after the
/// end (the requests never sent). When the maximum was 1e9, `--rate 1e9 -d 1s` against
/// a server that never answers ran 19.15 s (release build), and `-d 200ms` against an
/// echo server ran 3.4 s with 0 answered, reporting a 0.30 s run and blaming the
/// server. The maximum is now 1e7; the bound here is 30 times `-d`.
#[test]
fn a_run_at_the_highest_rate_allowed_ends_near_its_duration() {
    let server = echo_server(1, |_| {});
    let url = format!("tcp://{}", server.local_addr());
    let child = Command::new(env!("CARGO_BIN_EXE_edgeload"))
        .args(["-c", "2", "-d", "1s", "--rate", "1e7", "--json", &url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (report, code) = finish(child, Duration::from_secs(30));
    assert_eq!(code, 0);
    assert_eq!(report["requests_due"].as_u64(), Some(10_000_000));
}

/// An HTTP/1.0 server: reads the 4 pipelined requests of a connection, answers the
/// first and closes, as HTTP/1.0 without keep-alive does.
fn http10_answer_one_then_close() -> std::net::SocketAddr {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                while got.windows(4).filter(|w| w == b"\r\n\r\n").count() < 4 {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return, // the probe, or the end of the run
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok");
            });
        }
    });
    addr
}

/// README: a failed request's latency entry is "none (a failure is not a latency; it
/// is in the errors)", and `read` errors include "a close with requests outstanding".
/// `--http1.0 --depth 4` against a server that answers one request and closes left 3
/// requests failed per connection and no error at all (672 failed, errors 0 in 0.5 s),
/// while `--max-error-rate 1%` failed with "error rate 75%": the report said no error
/// and the gate said three in four. Each such close is one `read` error.
#[test]
fn requests_lost_behind_an_http10_close_are_in_the_errors() {
    let addr = http10_answer_one_then_close();
    let out = Command::new(env!("CARGO_BIN_EXE_edgeload"))
        .args([
            "-c",
            "1",
            "--depth",
            "4",
            "-d",
            "500ms",
            "--http1.0",
            "--json",
        ])
        .arg(format!("http://{addr}/"))
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("{v}");
    let failed = v["failed"].as_u64().unwrap();
    let read = v["errors"]["read"].as_u64().unwrap();
    assert!(failed > 0, "{v}");
    assert_eq!(failed, 3 * read, "3 requests lost per close: {v}");
    assert_eq!(v["errors"]["total"].as_u64(), Some(read), "{v}");
}

/// README: `--timeseries` "writes one line per second as the run goes". The lines
/// were held in a buffer until the run ended: 2.7 s into a 4 s run the file was still
/// empty, so neither `tail -f` nor a run cut short saw a second of it. Here the first
/// second's line must be in the file while the 6 s run is still going.
#[test]
fn the_timeseries_is_written_as_the_run_goes() {
    let server = echo_server(1, |_| {});
    let url = format!("tcp://{}", server.local_addr());
    let series = TempFile::new("live.jsonl");
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgeload"))
        .args(["-c", "2", "-d", "6s", "--rate", "100"])
        .args(["--timeseries", series.arg(), &url])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen_while_running = false;
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        let text = std::fs::read_to_string(&series.0).unwrap_or_default();
        if text.lines().next().is_some_and(|l| l.ends_with('}')) {
            seen_while_running = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(seen_while_running, "no line before the run ended");
}

/// README: exit 1 means wrong bytes came back; a `--timeseries` or `--hdr-log` file
/// that cannot be had is exit 2, one line saying what. A file that opens but cannot be
/// written (`/dev/full`, a full disk) ended the run with exit 1 and no report at all:
/// the run was lost for its side file. The report must still be printed.
#[test]
fn a_timeseries_that_cannot_be_written_costs_neither_the_report_nor_exit_1() {
    if !std::path::Path::new("/dev/full").exists() {
        return;
    }
    let server = echo_server(1, |_| {});
    let url = format!("tcp://{}", server.local_addr());
    for flag in ["--timeseries", "--hdr-log", "--plot"] {
        let out = Command::new(env!("CARGO_BIN_EXE_edgeload"))
            .args(["-c", "1", "-d", "300ms", "--rate", "10", flag, "/dev/full"])
            .args(["--json", &url])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        assert_eq!(v["requests_due"].as_u64(), Some(3), "{flag}: {v} {stderr}");
        assert_eq!(out.status.code(), Some(2), "{flag}: {stderr}");
        assert!(stderr.contains(flag), "{flag}: {stderr}");
    }
}

/// README: `--min-rps N` fails "if fewer than N requests per second completed". The
/// requests are those answered by the run's end, `-d` after its start, but they were
/// divided by the time until the main thread, polling every 20 ms, saw the threads
/// end: `--rate 100 -d 1s` with all 100 answered reported 98.6 to 99.0 requests/s, and
/// `--min-rps 100` failed (exit 3) on a run that did exactly 100 per second.
#[test]
fn requests_per_second_are_per_second_of_the_run() {
    let server = echo_server(1, |_| {});
    let url = format!("tcp://{}", server.local_addr());
    let out = Command::new(env!("CARGO_BIN_EXE_edgeload"))
        .args(["-c", "2", "-d", "1s", "--rate", "100", "--min-rps", "100"])
        .args(["--json", &url])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("{v}");
    let requests = v["requests"].as_u64().unwrap();
    assert_eq!(v["duration_s"].as_f64(), Some(1.0), "{v}");
    assert_eq!(v["requests_per_sec"].as_f64(), Some(requests as f64), "{v}");
    assert_eq!(
        v["gates"][0]["value"].as_f64(),
        Some(requests as f64),
        "{v}"
    );
    if requests == 100 {
        assert_eq!(out.status.code(), Some(0), "{v}");
    }
}
