//! edgeload's figures over the run (issue 17, parts 2 and 3): `--rate` ramps and steps,
//! `--timeseries` (CSV and JSON lines), `--hdr-log`, and the second panel of `--plot`.
//!
//! Every test runs the real `edgeload` binary against a server in this process, over
//! loopback, and checks exact counts: the seconds and the steps add up to the report's
//! totals. The one tolerance is the issue's: a ramp's seconds follow the plan within 5%.

mod util;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use util::load::{edgeload, TempFile};

use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
use hdrhistogram::serialization::Deserializer;
use hdrhistogram::Histogram;
use serde_json::Value;
use util::echo_server;

#[track_caller]
fn n(v: &Value, path: &str) -> u64 {
    let mut at = v;
    for key in path.split('/') {
        at = &at[key];
    }
    at.as_u64()
        .unwrap_or_else(|| panic!("{path} is not a count: {at} in {v}"))
}

const ERROR_KINDS: [&str; 7] = [
    "connect", "read", "write", "timeout", "mismatch", "extra", "non_2xx",
];

/// The JSON lines of a `--timeseries` file.
fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The rows of a `--timeseries` CSV file as JSON-line-shaped objects, after checking
/// the header.
fn csv_rows(text: &str) -> Vec<Value> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("a header line").split(',').collect();
    assert_eq!(
        header,
        [
            "elapsed_s",
            "requests",
            "due",
            "errors_connect",
            "errors_read",
            "errors_write",
            "errors_timeout",
            "errors_mismatch",
            "errors_extra",
            "errors_non_2xx",
            "p50_us",
            "p99_us",
            "p99_9_us",
            "max_us"
        ]
    );
    lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            assert_eq!(f.len(), header.len(), "{l}");
            let num = |i: usize| f[i].parse::<u64>().unwrap_or_else(|_| panic!("{l}"));
            let mut errors = serde_json::Map::new();
            for (k, kind) in ERROR_KINDS.iter().enumerate() {
                errors.insert(kind.to_string(), num(3 + k).into());
            }
            serde_json::json!({
                "elapsed_s": f[0].parse::<f64>().unwrap(),
                "requests": num(1),
                "due": if f[2].is_empty() { Value::Null } else { num(2).into() },
                "errors": errors,
                "latency_us": {"p50": num(10), "p99": num(11), "p99.9": num(12), "max": num(13)},
            })
        })
        .collect()
}

/// One line per second of a run of `secs`, and every count adds up to the report's.
#[track_caller]
fn assert_seconds_add_up(lines: &[Value], report: &Value, secs: u64) {
    assert_eq!(lines.len() as u64, secs, "one line per second: {lines:?}");
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["elapsed_s"].as_f64(), Some(i as f64 + 1.0), "{line}");
    }
    let sum = |path: &str| lines.iter().map(|l| n(l, path)).sum::<u64>();
    assert_eq!(sum("requests"), n(report, "requests"), "answered");
    for kind in ERROR_KINDS {
        let path = format!("errors/{kind}");
        assert_eq!(sum(&path), n(report, &path), "{kind} errors");
    }
    if report["rate"].is_null() {
        assert!(lines.iter().all(|l| l["due"].is_null()));
    } else {
        assert_eq!(sum("due"), n(report, "requests_due"), "due");
    }
}

#[test]
fn a_ramp_follows_its_plan_second_by_second() {
    let server = echo_server(1, |_| {});
    let url = format!("tcp://{}", server.local_addr());
    let series = TempFile::new("ramp.jsonl");
    let (v, code, _) = edgeload(
        &[
            "-c",
            "8",
            "--rate",
            "200:1000",
            "-d",
            "4s",
            "--timeseries",
            series.arg(),
        ],
        &url,
    );
    assert_eq!(code, 0);
    assert_eq!(v["rate_plan"]["kind"], "ramp");
    // (200 + 1000) / 2 x 4 s; a request due in the last moment, behind a connection
    // still waiting for its answer, may go unsent, but is counted.
    assert!((2399..=2400).contains(&n(&v, "requests_due")), "{v}");
    assert!(n(&v, "unsent") <= 8, "{v}");
    assert_eq!(
        n(&v, "requests_due"),
        n(&v, "requests_sent") + n(&v, "unsent")
    );
    let lines = json_lines(&series.read());
    assert_seconds_add_up(&lines, &v, 4);
    // The plan's integral over each second: 200 t + 100 t^2.
    let planned = [300.0, 500.0, 700.0, 900.0];
    for (line, want) in lines.iter().zip(planned) {
        // Counted when the generator put them due, so a request due just before a
        // second's end may count in the next one; the sum is exact (checked above).
        let due = n(line, "due") as f64;
        assert!(
            (due - want).abs() <= want * 0.05,
            "due {due}, planned {want}"
        );
        let answered = n(line, "requests") as f64;
        assert!(
            (answered - want).abs() <= want * 0.05,
            "second ending at {}: {answered} answered, the plan says {want}",
            line["elapsed_s"]
        );
    }
}

#[test]
fn each_step_is_reported_on_its_own_and_the_steps_add_up() {
    let server = echo_server(1, |_| {});
    let url = format!("tcp://{}", server.local_addr());
    // No -d: the run lasts the steps.
    let (v, code, _) = edgeload(&["-c", "4", "--rate", "200,600", "--step", "1s"], &url);
    assert_eq!(code, 0);
    assert_eq!(v["duration_s"].as_f64().map(|d| d.round()), Some(2.0));
    let steps = v["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 2);
    for (step, rate) in steps.iter().zip([200u64, 600]) {
        assert_eq!(step["target_rate"].as_f64(), Some(rate as f64));
        let due = n(step, "due");
        assert!(due.abs_diff(rate) <= 1, "{due} due at {rate}/s for 1 s");
        assert_eq!(due, n(step, "sent") + n(step, "unsent"));
        assert_eq!(
            n(step, "sent"),
            n(step, "answered") + n(step, "timed_out") + n(step, "failed") + n(step, "outstanding")
        );
        assert_eq!(
            n(step, "latency_us/count"),
            n(step, "answered") + n(step, "timed_out") + n(step, "outstanding")
        );
        assert!(n(step, "latency_us/p99") >= n(step, "latency_us/p50"));
    }
    let sum = |path: &str| steps.iter().map(|s| n(s, path)).sum::<u64>();
    assert_eq!(sum("answered"), n(&v, "requests"));
    assert_eq!(sum("due"), n(&v, "requests_due"));
    assert_eq!(sum("unsent"), n(&v, "unsent"));
    assert_eq!(sum("outstanding"), n(&v, "outstanding"));
    assert_eq!(sum("errors/total"), n(&v, "errors/total"));
    assert_eq!(sum("latency_us/count"), n(&v, "latency_us/count"));
}

#[test]
fn the_text_report_has_a_line_per_step() {
    let server = echo_server(1, |_| {});
    let url = format!("tcp://{}", server.local_addr());
    let out = Command::new(env!("CARGO_BIN_EXE_edgeload"))
        .args(["-c", "2", "--rate", "100,300", "--step", "500ms", &url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("rate in steps of 500ms: 100, 300 requests/s"),
        "{text}"
    );
    let rows: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.contains("step  target/s"))
        .skip(1)
        .take_while(|l| l.starts_with("    "))
        .collect();
    assert_eq!(rows.len(), 2, "{text}");
    assert!(rows[0].trim_start().starts_with("1     100"), "{text}");
    assert!(rows[1].trim_start().starts_with("2     300"), "{text}");
}

#[test]
fn the_csv_timeseries_has_a_header_and_a_line_per_second_adding_up() {
    let server = echo_server(1, |_| {});
    let url = format!("tcp://{}", server.local_addr());
    let series = TempFile::new("closed.csv");
    let (v, code, _) = edgeload(&["-c", "4", "-d", "3s", "--timeseries", series.arg()], &url);
    assert_eq!(code, 0);
    let rows = csv_rows(&series.read());
    assert_seconds_add_up(&rows, &v, 3);
    assert!(rows.iter().all(|r| n(r, "requests") > 0));
}

/// Echoes for the first 700 ms of each connection, then reads and never answers.
fn echo_then_stall(mut s: TcpStream) {
    let began = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if began.elapsed() < Duration::from_millis(700) && s.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

#[test]
fn a_stall_shows_as_seconds_of_zeros_in_json_lines() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || echo_then_stall(stream));
        }
    });
    let series = TempFile::new("stall.jsonl");
    let (v, code, _) = edgeload(
        &[
            "-c",
            "2",
            "-d",
            "3s",
            "--timeout",
            "10s",
            "--timeseries",
            series.arg(),
        ],
        &format!("tcp://{addr}"),
    );
    assert_eq!(code, 0);
    let lines = json_lines(&series.read());
    assert_seconds_add_up(&lines, &v, 3);
    assert!(n(&lines[0], "requests") > 0);
    // The middle second: nothing answered, nothing recorded, still a line.
    let quiet = &lines[1];
    assert_eq!(n(quiet, "requests"), 0, "{quiet}");
    for p in ["p50", "p99", "p99.9", "max"] {
        assert_eq!(n(quiet, &format!("latency_us/{p}")), 0, "{quiet}");
    }
    assert_eq!(n(quiet, "errors/total"), 0);
    // The two requests still waiting at the end are recorded in the last second.
    assert_eq!(n(&v, "outstanding"), 2);
    assert_eq!(n(&lines[2], "requests"), 0);
    assert!(n(&lines[2], "latency_us/max") >= 2_000_000, "{}", lines[2]);
}

/// The intervals of an HdrHistogram interval log: (start, length, histogram).
fn read_hdr_log(path: &Path) -> Vec<(f64, f64, Histogram<u64>)> {
    let bytes = std::fs::read(path).unwrap();
    let mut deserializer = Deserializer::new();
    IntervalLogIterator::new(&bytes)
        .filter_map(|entry| match entry.expect("the log parses") {
            LogEntry::Interval(i) => {
                let raw = base64_decode(i.encoded_histogram());
                let h: Histogram<u64> = deserializer
                    .deserialize(&mut raw.as_slice())
                    .expect("a V2 deflate histogram");
                Some((
                    i.start_timestamp().as_secs_f64(),
                    i.duration().as_secs_f64(),
                    h,
                ))
            }
            _ => None,
        })
        .collect()
}

/// Standard base64 (the interval log's encoding), without a crate for it.
fn base64_decode(s: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for &c in s.as_bytes().iter().filter(|&&c| c != b'=') {
        acc = (acc << 6) | u32::from(value(c));
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

#[test]
fn the_hdr_log_reads_back_with_every_latency_of_the_report() {
    let server = echo_server(1, |_| {});
    let url = format!("tcp://{}", server.local_addr());
    let log = TempFile::new("run.hlog");
    let (v, code, _) = edgeload(
        &[
            "-c",
            "4",
            "--rate",
            "500",
            "-d",
            "2500ms",
            "--hdr-log",
            log.arg(),
        ],
        &url,
    );
    assert_eq!(code, 0);
    let text = log.read();
    assert!(text.contains("#[BaseTime: "), "{text}");
    assert!(
        text.contains("\"StartTimestamp\",\"Interval_Length\""),
        "{text}"
    );
    let intervals = read_hdr_log(&log.0);
    let starts: Vec<(f64, f64)> = intervals.iter().map(|(s, l, _)| (*s, *l)).collect();
    assert_eq!(starts, [(0.0, 1.0), (1.0, 1.0), (2.0, 0.5)]);
    let total: u64 = intervals.iter().map(|(_, _, h)| h.len()).sum();
    assert_eq!(total, n(&v, "latency_us/count"));
    let mut merged = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).unwrap();
    for (_, _, h) in &intervals {
        merged.add(h).unwrap();
    }
    assert_eq!(merged.max(), n(&v, "latency_us/max"));
    assert_eq!(
        merged.value_at_percentile(99.0),
        n(&v, "latency_us/percentiles/p99")
    );
}

#[test]
fn the_plot_has_the_panel_over_time() {
    let server = echo_server(1, |_| {});
    let url = format!("tcp://{}", server.local_addr());
    let plot = TempFile::new("plot.svg");
    let (_, code, _) = edgeload(&["-c", "2", "-d", "2s", "--plot", plot.arg()], &url);
    assert_eq!(code, 0);
    let svg = plot.read();
    assert!(svg.contains("Latency by percentile"));
    assert!(svg.contains("Over time:"));
    // The percentile curve, then requests/s and p99 with a point per second.
    assert_eq!(svg.matches("<polyline").count(), 3, "{svg}");
    let last = svg.rsplit("<polyline").next().unwrap();
    let points = last
        .split("points=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();
    assert_eq!(points.split(' ').count(), 2, "{last}");
}

#[test]
fn bad_plans_exit_2_naming_the_flag() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("tcp://{}", listener.local_addr().unwrap());
    for (args, says) in [
        (&["--rate", "0"][..], "--rate"),
        (&["--rate=-100"], "positive"),
        (&["--rate", "100:0"], "positive"),
        (&["--rate", "100,0", "--step", "1s"], "positive"),
        (&["--rate", "abc"], "invalid --rate"),
        (&["--rate", "100:"], "invalid --rate"),
        (&["--rate", "1:2:3"], "invalid --rate"),
        (&["--rate", "100,,200", "--step", "1s"], "invalid --rate"),
        (&["--rate", "100,200"], "needs --step"),
        (&["--step", "1s"], "--step needs a list"),
        (&["--rate", "100", "--step", "1s"], "--step needs a list"),
        (
            &["--rate", "100:200", "--step", "1s"],
            "--step needs a list",
        ),
        (
            &["--rate", "100,200", "--step", "0s"],
            "--step must be greater",
        ),
        (&["--rate", "100:2e9"], "must be at most"),
        (&["--rate", "100,2e9", "--step", "1s"], "must be at most"),
        (
            &["--rate", "100,200", "--step", "1s", "-d", "5s"],
            "-d/--duration 5s disagrees",
        ),
        (
            &["--timeseries", "/nonexistent-dir/x.csv", "-d", "100ms"],
            "--timeseries /nonexistent-dir/x.csv",
        ),
        (
            &["--hdr-log", "/nonexistent-dir/x.hlog", "-d", "100ms"],
            "--hdr-log /nonexistent-dir/x.hlog",
        ),
    ] {
        let (_, code, stderr) = edgeload(args, &url);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.starts_with("edgeload: "), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    // An explicit -d that agrees with the steps is fine.
    let (v, code, _) = edgeload(
        &["--rate", "50,100", "--step", "200ms", "-d", "400ms"],
        &url,
    );
    assert_eq!(code, 0, "{v}");
}
