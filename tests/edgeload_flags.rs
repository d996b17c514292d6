//! edgeload's request flags (-m, -H, --body, --body-file, --http1.0), exact status
//! counts and CI gates (--max-p99, --max-p999, --max-error-rate, --min-rps), run as
//! the real binary against small servers in this process that record the exact bytes
//! they receive.

mod util;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use util::PATIENCE;

fn edgeload() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edgeload"))
}

/// Requests recorded per server at most, so a long run cannot grow memory unbounded.
const RECORD_AT_MOST: usize = 10_000;

/// How the server answers the `n`th request (0-based) of a connection.
#[derive(Clone, Copy)]
struct Answer {
    head: &'static str,
    body: &'static str,
    /// Close the connection after this response.
    close: bool,
    /// Sleep this long before answering.
    delay: Duration,
}

const OK: Answer = Answer {
    head: "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n",
    body: "ok",
    close: false,
    delay: Duration::ZERO,
};

/// What a server received.
#[derive(Default)]
struct Recorded {
    /// Every complete request, byte for byte, in arrival order per connection.
    requests: Mutex<Vec<Vec<u8>>>,
    /// The bytes of each connection's first read that brought any.
    first_reads: Mutex<Vec<Vec<u8>>>,
    /// Connections that sent at least one request.
    talking: AtomicU64,
}

/// A server on its own thread, one thread per connection, that splits the stream into
/// requests (head, then a Content-Length body), records them and answers each as
/// `answer` says.
fn recording_server(answer: fn(usize) -> Answer) -> (SocketAddr, Arc<Recorded>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let recorded = Arc::new(Recorded::default());
    let r = Arc::clone(&recorded);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let r = Arc::clone(&r);
            std::thread::spawn(move || serve(stream, answer, &r));
        }
    });
    (addr, recorded)
}

fn serve(mut s: TcpStream, answer: fn(usize) -> Answer, recorded: &Recorded) {
    // Bounded: edgeload closes its connections when it exits.
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let mut served = 0usize;
    loop {
        let n = match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if served == 0 && buf.is_empty() {
            recorded
                .first_reads
                .lock()
                .unwrap()
                .push(chunk[..n].to_vec());
            recorded.talking.fetch_add(1, Ordering::Relaxed);
        }
        buf.extend_from_slice(&chunk[..n]);
        while let Some(len) = request_len(&buf) {
            let request: Vec<u8> = buf.drain(..len).collect();
            {
                let mut requests = recorded.requests.lock().unwrap();
                if requests.len() < RECORD_AT_MOST {
                    requests.push(request);
                }
            }
            let a = answer(served);
            served += 1;
            std::thread::sleep(a.delay);
            let response = format!("{}\r\n{}", a.head, a.body);
            if s.write_all(response.as_bytes()).is_err() || a.close {
                return;
            }
        }
    }
}

/// The length of the complete request at the front of `buf`, if there is one.
fn request_len(buf: &[u8]) -> Option<usize> {
    let head = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let text = String::from_utf8_lossy(&buf[..head]);
    let body: usize = text
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().unwrap())
        })
        .unwrap_or(0);
    (buf.len() >= head + body).then_some(head + body)
}

#[track_caller]
fn run(args: &[&str]) -> (Output, String, String) {
    let out = edgeload().args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stdout, stderr)
}

#[track_caller]
fn run_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (out, stdout, stderr) = run(&all);
    assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
    serde_json::from_str(&stdout).expect("one JSON object")
}

/// Asserts that every request the server recorded is `expected`, and that there were
/// at least as many as edgeload counted as answered.
#[track_caller]
fn assert_all_requests(recorded: &Recorded, expected: &[u8], answered: u64) {
    let requests = recorded.requests.lock().unwrap();
    assert!(
        requests.len() as u64 >= answered.min(RECORD_AT_MOST as u64) && answered > 0,
        "{} recorded, {answered} answered",
        requests.len()
    );
    for r in requests.iter() {
        assert_eq!(
            String::from_utf8_lossy(r),
            String::from_utf8_lossy(expected)
        );
        assert_eq!(r.as_slice(), expected);
    }
}

#[test]
fn method_headers_and_body_arrive_byte_for_byte_pipelined_in_one_write() {
    let (addr, recorded) = recording_server(|_| OK);
    let url = format!("http://{addr}/api/v1?x=1");
    let v = run_json(&[
        "-c",
        "2",
        "-d",
        "500ms",
        "--depth",
        "3",
        "-m",
        "POST",
        "-H",
        "Content-Type: application/json",
        "-H",
        "user-agent:   my-agent/2  ",
        "-H",
        "X-Repeat: a",
        "-H",
        "X-Repeat: b",
        "--body",
        "{\"k\": [1, 2]}",
        &url,
    ]);
    assert_eq!(v["errors"]["total"], 0, "{v}");
    let expected = format!(
        "POST /api/v1?x=1 HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         user-agent: my-agent/2\r\nX-Repeat: a\r\nX-Repeat: b\r\nContent-Length: 13\r\n\r\n\
         {{\"k\": [1, 2]}}"
    );
    assert_all_requests(
        &recorded,
        expected.as_bytes(),
        v["requests"].as_u64().unwrap(),
    );
    // --depth 3: each connection's first write is three requests, read at once.
    let first = recorded.first_reads.lock().unwrap();
    assert_eq!(first.len(), 2);
    for read in first.iter() {
        assert_eq!(read, &expected.repeat(3).into_bytes());
    }
}

#[test]
fn a_body_file_is_sent_as_is_and_host_can_be_replaced() {
    let (addr, recorded) = recording_server(|_| OK);
    // Every byte value, CR and LF and NUL among them, and more than one read's worth.
    let body: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let file = std::env::temp_dir().join(format!("edgeload-body-{}.bin", std::process::id()));
    std::fs::write(&file, &body).unwrap();
    let url = format!("http://{addr}/upload");
    let v = run_json(&[
        "-c",
        "1",
        "-d",
        "300ms",
        "-m",
        "PUT",
        "-H",
        "HOST: example.test",
        "--body-file",
        file.to_str().unwrap(),
        &url,
    ]);
    std::fs::remove_file(&file).unwrap();
    assert_eq!(v["errors"]["total"], 0, "{v}");
    let mut expected = b"PUT /upload HTTP/1.1\r\nUser-Agent: edgeload\r\nHOST: example.test\r\n\
Content-Length: 20000\r\n\r\n"
        .to_vec();
    expected.extend_from_slice(&body);
    assert_all_requests(&recorded, &expected, v["requests"].as_u64().unwrap());
}

#[test]
fn head_responses_with_a_content_length_and_no_body_complete() {
    let (addr, recorded) = recording_server(|_| Answer {
        head: "HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n",
        body: "",
        ..OK
    });
    let url = format!("http://{addr}/");
    // A parser that waited for the 1234 bytes would time every request out.
    let v = run_json(&[
        "-c",
        "2",
        "-d",
        "500ms",
        "--depth",
        "2",
        "--timeout",
        "200ms",
        "-m",
        "HEAD",
        &url,
    ]);
    assert_eq!(v["errors"]["total"], 0, "{v}");
    assert!(v["requests"].as_u64().unwrap() > 10, "{v}");
    let expected = format!("HEAD / HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: edgeload\r\n\r\n");
    assert_all_requests(
        &recorded,
        expected.as_bytes(),
        v["requests"].as_u64().unwrap(),
    );
}

#[test]
fn http10_asks_for_keep_alive_and_copes_with_a_server_that_closes() {
    let keeps = |_| Answer {
        head: "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n",
        ..OK
    };
    let (addr, recorded) = recording_server(keeps);
    let url = format!("http://{addr}/");
    let v = run_json(&["-c", "1", "-d", "300ms", "--http1.0", &url]);
    assert_eq!(v["errors"]["total"], 0, "{v}");
    let expected = format!(
        "GET / HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: edgeload\r\nConnection: keep-alive\r\n\r\n"
    );
    assert_all_requests(
        &recorded,
        expected.as_bytes(),
        v["requests"].as_u64().unwrap(),
    );
    // The server kept the one connection.
    assert_eq!(recorded.talking.load(Ordering::Relaxed), 1);

    // A server that ignores keep-alive and ends each body by closing.
    let closes = |_| Answer {
        head: "HTTP/1.0 200 OK\r\n",
        body: "until close",
        close: true,
        delay: Duration::ZERO,
    };
    let (addr, recorded) = recording_server(closes);
    let url = format!("http://{addr}/");
    let v = run_json(&["-c", "2", "-d", "300ms", "--http1.0", &url]);
    assert_eq!(v["errors"]["total"], 0, "{v}");
    let requests = v["requests"].as_u64().unwrap();
    assert!(requests > 2, "{v}");
    // One request per connection: every answered one came on a connection of its own.
    assert!(recorded.talking.load(Ordering::Relaxed) >= requests);
    assert_eq!(v["status_codes"], serde_json::json!({"200": requests}));
}

/// Every third response of a connection is 404, the rest 200.
fn two_in_three_ok(n: usize) -> Answer {
    if n % 3 == 2 {
        Answer {
            head: "HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n",
            body: "no",
            ..OK
        }
    } else {
        OK
    }
}

#[test]
fn latency_reports_the_exact_count_of_each_status() {
    let (addr, _) = recording_server(two_in_three_ok);
    let url = format!("http://{addr}/");
    // One connection, one request at a time: the responses counted are exactly the
    // connection's first `requests`, so the 404s are every third of them.
    let v = run_json(&["-c", "1", "-d", "500ms", &url]);
    let requests = v["requests"].as_u64().unwrap();
    assert!(requests > 3, "{v}");
    let not_found = requests / 3;
    assert_eq!(
        v["status_codes"],
        serde_json::json!({"200": requests - not_found, "404": not_found})
    );
    assert_eq!(v["errors"]["non_2xx"], not_found);

    let (out, stdout, stderr) = run(&["-c", "1", "-d", "500ms", "--latency", &url]);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let requests: u64 = stdout
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .unwrap()
        .0
        .parse()
        .unwrap();
    let not_found = requests / 3;
    let line = stdout
        .lines()
        .find(|l| l.contains("Status codes:"))
        .unwrap();
    assert_eq!(
        line,
        format!(
            "  Status codes: 200: {}  404: {}",
            thousands(requests - not_found),
            thousands(not_found)
        )
    );
}

fn thousands(n: u64) -> String {
    edgepoll::load::report::thousands(n)
}

#[test]
fn bad_combinations_exit_2_naming_the_flag() {
    let tcp = "tcp://127.0.0.1:1";
    let http = "http://127.0.0.1:1/";
    let cases: &[(&[&str], &str)] = &[
        (&["--body", "x", "--body-file", "f", http], "--body"),
        (
            &["--body", "x", tcp],
            "--body/--body-file needs an http:// URL",
        ),
        (
            &["--body-file", "/dev/null", tcp],
            "--body/--body-file needs an http://",
        ),
        (&["-m", "POST", tcp], "-m/--method needs an http:// URL"),
        (&["-H", "X-A: 1", tcp], "-H/--header needs an http:// URL"),
        (&["--http1.0", tcp], "--http1.0 needs an http:// URL"),
        (&["-m", "GE T", http], "-m/--method"),
        (&["-H", "no colon", http], "-H/--header"),
        (&["-H", "X-A: 1\r\nX-B: 2", http], "CR or LF"),
        (&["-H", "X A: 1", http], "-H/--header"),
        (
            &["-H", "Content-Length: 5", "--body", "hello", http],
            "Content-Length",
        ),
        (
            &["-H", "Transfer-Encoding: chunked", http],
            "Transfer-Encoding",
        ),
        (&["-H", "Connection: close", http], "--reconnect"),
        (
            &["--body-file", "/nonexistent/edgeload-body", http],
            "--body-file",
        ),
        (&["--max-p99", "0", http], "--max-p99"),
        (&["--max-p999", "5 parsecs", http], "invalid duration"),
        (&["--max-error-rate", "2", http], "invalid ratio"),
        (&["--max-error-rate", "150%", http], "invalid ratio"),
        (&["--min-rps", "0", http], "--min-rps"),
    ];
    for (args, says) in cases {
        let (out, stdout, stderr) = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(stdout.is_empty(), "{args:?}: {stdout}");
    }
}

fn slow(_: usize) -> Answer {
    Answer {
        delay: Duration::from_millis(20),
        ..OK
    }
}

#[test]
fn latency_gates_fail_with_exit_3_when_missed_and_pass_when_met() {
    let (addr, _) = recording_server(slow);
    let url = format!("http://{addr}/");
    // Every response takes at least 20 ms.
    let (out, stdout, stderr) = run(&[
        "-c",
        "2",
        "-d",
        "500ms",
        "--json",
        "--max-p99",
        "5ms",
        "--max-p999",
        "500us",
        &url,
    ]);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    let failed: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("edgeload: gate failed: "))
        .collect();
    assert_eq!(failed.len(), 2, "{stderr}");
    assert!(
        failed[0].starts_with("edgeload: gate failed: p99 "),
        "{stderr}"
    );
    assert!(failed[0].ends_with(" > --max-p99 5ms"), "{stderr}");
    assert!(
        failed[1].starts_with("edgeload: gate failed: p99.9 "),
        "{stderr}"
    );
    assert!(failed[1].ends_with(" > --max-p999 500us"), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let gates = v["gates"].as_array().unwrap();
    assert_eq!(gates.len(), 2);
    assert_eq!(gates[0]["gate"], "max-p99");
    assert_eq!(gates[0]["limit"], 5000.0);
    assert_eq!(gates[0]["unit"], "us");
    assert_eq!(gates[0]["passed"], false);
    assert!(gates[0]["value"].as_f64().unwrap() >= 20_000.0, "{v}");
    assert_eq!(gates[1]["gate"], "max-p999");
    assert_eq!(gates[1]["limit"], 500.0);

    let (out, _, stderr) = run(&[
        "-c",
        "2",
        "-d",
        "500ms",
        "--max-p99",
        "2s",
        "--max-p999",
        "2s",
        &url,
    ]);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("gate failed"), "{stderr}");
}

/// Every second response of a connection is a 500.
fn half_failing(n: usize) -> Answer {
    if n % 2 == 1 {
        Answer {
            head: "HTTP/1.1 500 Oops\r\nContent-Length: 2\r\n",
            body: "no",
            ..OK
        }
    } else {
        OK
    }
}

#[test]
fn the_error_rate_gate_takes_a_ratio_or_a_percentage() {
    let (addr, _) = recording_server(half_failing);
    let url = format!("http://{addr}/");
    for limit in ["0.1", "10%"] {
        let (out, stdout, stderr) = run(&[
            "-c",
            "1",
            "-d",
            "300ms",
            "--json",
            "--max-error-rate",
            limit,
            &url,
        ]);
        assert_eq!(out.status.code(), Some(3), "{limit}: {stderr}");
        let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        // One connection, answers in order: the 500s are every second response.
        let requests = v["requests"].as_u64().unwrap();
        assert!(requests > 3, "{v}");
        assert_eq!(v["errors"]["total"], requests / 2, "{v}");
        let rate = (requests / 2) as f64 / requests as f64;
        // (serde_json reads floats back to within an ulp or so.)
        let value = v["gates"][0]["value"].as_f64().unwrap();
        assert!((value - rate).abs() < 1e-12, "{value} {rate}");
        assert_eq!(v["gates"][0]["limit"], 0.1);
        assert!(
            stderr.contains("edgeload: gate failed: error rate ")
                && stderr.contains("% > --max-error-rate 10%"),
            "{stderr}"
        );
    }
    for limit in ["0.5", "50%"] {
        let (out, _, stderr) = run(&["-c", "1", "-d", "300ms", "--max-error-rate", limit, &url]);
        assert_eq!(out.status.code(), Some(0), "{limit}: {stderr}");
    }
}

#[test]
fn min_rps_and_durations_in_microseconds() {
    let (addr, _) = recording_server(|_| OK);
    let url = format!("http://{addr}/");
    let (out, _, stderr) = run(&["-c", "1", "-d", "300ms", "--min-rps", "1e12", &url]);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("edgeload: gate failed: requests/sec ")
            && stderr.contains(" < --min-rps 1000000000000"),
        "{stderr}"
    );
    // -d, --timeout and the gates all take `us`.
    let (out, _, stderr) = run(&[
        "-c",
        "1",
        "-d",
        "300000us",
        "--timeout",
        "1500000us",
        "--min-rps",
        "1",
        &url,
    ]);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}

/// Echoes, but flips every thousandth byte.
fn corrupting_echo(mut s: TcpStream) {
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut buf = [0u8; 4096];
    let mut pos = 0u64;
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            return;
        }
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

#[test]
fn differing_bytes_outrank_a_missed_gate() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            std::thread::spawn(move || corrupting_echo(s));
        }
    });
    let url = format!("tcp://{addr}");
    let (out, _, stderr) = run(&[
        "-c",
        "1",
        "-d",
        "300ms",
        "--size",
        "500",
        "--min-rps",
        "1e12",
        &url,
    ]);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("gate failed: requests/sec"), "{stderr}");
    assert!(stderr.contains("came back different"), "{stderr}");
}
