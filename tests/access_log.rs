//! The access log (`--access-log`) over real loopback sockets: one record per closed
//! connection in every mode, whose bytes, addresses, reason and side match what the
//! test's own clients did and what the metrics counted; the same values as JSON;
//! resets, refusing and closing upstreams, timeouts, the queue, the drain, a reload's
//! move and PROXY headers; exact sampling; a writer stalled by a pipe nobody reads
//! or failing on a full disk, which must cost the workers nothing and lose no record
//! uncounted; a reopen (SIGUSR1) after a rename that neither loses nor repeats a
//! record; bad settings refused; `--log-format json`.
//!
//! The hostile peers here reset, stall the log's reader, refuse connects and hang
//! around until a timeout; the log must still say exactly what happened.

mod util;

use std::collections::{BTreeMap, HashMap};
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use edgepoll::config::{parse_cidr, LogFormat, LogTarget};
use edgepoll::metrics::AccessLogResult;
use edgepoll::mode::proxy;
use edgepoll::{CloseReason, Config, Server};
use util::*;

// ---------------------------------------------------------------------------------
// Records as the test reads them
// ---------------------------------------------------------------------------------

/// One record: its line and its fields in the order written, each value in its text
/// form (a JSON record's `null` as `-`, its `statuses` object as `status_CODE` keys).
#[derive(Debug, Clone)]
struct Rec {
    line: String,
    fields: Vec<(String, String)>,
}

impl Rec {
    #[track_caller]
    fn get(&self, key: &str) -> &str {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("no {key} in {}", self.line))
    }

    #[track_caller]
    fn num(&self, key: &str) -> u64 {
        let v = self.get(key);
        v.parse()
            .unwrap_or_else(|_| panic!("{key}={v} is not a count in {}", self.line))
    }

    #[track_caller]
    fn addr(&self, key: &str) -> SocketAddr {
        let v = self.get(key);
        v.parse()
            .unwrap_or_else(|_| panic!("{key}={v} is not an address in {}", self.line))
    }

    /// The keys in the order written, `status_*` left out.
    fn keys(&self) -> Vec<&str> {
        self.fields
            .iter()
            .map(|(k, _)| k.as_str())
            .filter(|k| !k.starts_with("status_"))
            .collect()
    }

    /// `status_CODE` counts, keyed by code.
    fn statuses(&self) -> BTreeMap<u16, u64> {
        self.fields
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("status_")?.parse().ok()?, v.parse().ok()?)))
            .collect()
    }

    /// Asserts each `(key, value)`.
    #[track_caller]
    fn expect(&self, want: &[(&str, &dyn ToString)]) {
        for (key, value) in want {
            assert_eq!(self.get(key), value.to_string(), "{key} in {}", self.line);
        }
    }
}

fn parse_text(line: &str) -> Rec {
    assert!(
        line.starts_with("time="),
        "a text record opens with its time: {line}"
    );
    let mut fields: Vec<(String, String)> = Vec::new();
    for pair in line.split(' ') {
        let (k, v) = pair
            .split_once('=')
            .unwrap_or_else(|| panic!("{pair:?} is not key=value in {line}"));
        assert!(!k.is_empty() && !v.is_empty(), "{pair:?} in {line}");
        assert!(
            fields.iter().all(|(seen, _)| seen != k),
            "{k} twice in {line}"
        );
        fields.push((k.into(), v.into()));
    }
    Rec {
        line: line.into(),
        fields,
    }
}

/// Keys whose JSON value must be a whole number.
const COUNTS: &[&str] = &[
    "worker",
    "retries",
    "bytes_in",
    "bytes_out",
    "upstream_bytes_out",
    "upstream_bytes_in",
    "duration_ms",
    "requests",
];
/// Keys whose JSON value must be a string, or null where unknown (addresses).
const STRINGS: &[&str] = &["time", "mode", "reason", "ended_by", "stage"];
const ADDRESSES: &[&str] = &["client", "peer", "listen", "upstream"];

fn parse_json(line: &str) -> Rec {
    let value: serde_json::Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    let object = value
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {line}"));
    // The order the keys were written in: where each top-level key stands in the line.
    let mut keys: Vec<(usize, &String)> = object
        .keys()
        .map(|k| (line.find(&format!("\"{k}\":")).unwrap(), k))
        .collect();
    keys.sort();
    let mut fields = Vec::new();
    for (_, key) in keys {
        let v = &object[key];
        let k = key.as_str();
        if k == "statuses" {
            let codes = v
                .as_object()
                .unwrap_or_else(|| panic!("statuses is not an object: {line}"));
            for (code, n) in codes {
                let n = n
                    .as_u64()
                    .unwrap_or_else(|| panic!("statuses.{code} is not a count: {line}"));
                fields.push((format!("status_{code}"), n.to_string()));
            }
            continue;
        }
        let text = if COUNTS.contains(&k) {
            v.as_u64()
                .unwrap_or_else(|| panic!("{k} is not a whole number: {line}"))
                .to_string()
        } else if STRINGS.contains(&k) {
            v.as_str()
                .unwrap_or_else(|| panic!("{k} is not a string: {line}"))
                .to_string()
        } else if ADDRESSES.contains(&k) {
            match v {
                serde_json::Value::Null => "-".into(),
                serde_json::Value::String(s) => s.clone(),
                _ => panic!("{k} is neither an address nor null: {line}"),
            }
        } else if k == "connect_ms" {
            match v {
                serde_json::Value::Null => "-".into(),
                // Written with three decimals, as text writes it.
                serde_json::Value::Number(n) => format!("{:.3}", n.as_f64().unwrap()),
                _ => panic!("connect_ms is neither a number nor null: {line}"),
            }
        } else if k == "reset" {
            v.as_bool()
                .unwrap_or_else(|| panic!("reset is not a bool: {line}"))
                .to_string()
        } else {
            panic!("unknown key {k} in {line}");
        };
        fields.push((k.to_string(), text));
    }
    Rec {
        line: line.into(),
        fields,
    }
}

/// Every record in the file at `path` (none if it does not exist); each line whole.
fn read_log(path: &Path) -> Vec<Rec> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == ErrorKind::NotFound => return Vec::new(),
        Err(e) => panic!("read {}: {e}", path.display()),
    };
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "{} ends in the middle of a line",
        path.display()
    );
    text.lines().map(parse_line).collect()
}

fn parse_line(line: &str) -> Rec {
    if line.starts_with('{') {
        parse_json(line)
    } else {
        parse_text(line)
    }
}

/// The keys every record of `mode` has, in order (http's `status_*` come after).
fn layout(mode: &str) -> Vec<&'static str> {
    let mut keys = vec!["time", "worker", "mode", "client", "peer", "listen"];
    if mode == "relay" {
        keys.extend(["upstream", "connect_ms", "retries"]);
    }
    keys.extend(["bytes_in", "bytes_out"]);
    if mode == "relay" {
        keys.extend(["upstream_bytes_out", "upstream_bytes_in"]);
    }
    keys.extend(["duration_ms", "reason", "reset", "ended_by"]);
    match mode {
        "relay" => keys.push("stage"),
        "http" => keys.push("requests"),
        _ => {}
    }
    keys
}

/// Asserts the fields every record carries: its layout, a close time since `since`
/// as RFC 3339 UTC with milliseconds, and `worker` among `workers`.
#[track_caller]
fn assert_shape(rec: &Rec, mode: &str, since: SystemTime, workers: u64) {
    let keys = layout(mode);
    assert_eq!(rec.keys(), keys, "{}", rec.line);
    // http's counts per status close the record.
    assert!(
        rec.fields[keys.len()..]
            .iter()
            .all(|(k, _)| k.starts_with("status_")),
        "{}",
        rec.line
    );
    if mode != "http" {
        assert!(rec.statuses().is_empty(), "{}", rec.line);
    }
    let time = rec.get("time");
    let b = time.as_bytes();
    assert!(
        b.len() == 24 && b[4] == b'-' && b[10] == b'T' && b[19] == b'.' && b[23] == b'Z',
        "time {time} is not RFC 3339 UTC with milliseconds"
    );
    let at = humantime::parse_rfc3339(time).unwrap();
    // Milliseconds are truncated: a close just after `since` may show a little before.
    assert!(
        at + Duration::from_millis(1) > since && at <= SystemTime::now(),
        "time {time} is not between the test's start and now"
    );
    assert!(rec.num("worker") < workers, "{}", rec.line);
    rec.num("duration_ms");
    assert_eq!(rec.get("mode"), mode, "{}", rec.line);
    if mode == "relay" && rec.get("connect_ms") != "-" {
        let ms = rec.get("connect_ms");
        let (whole, frac) = ms.split_once('.').expect("connect_ms with decimals");
        assert!(
            whole.parse::<u64>().is_ok() && frac.len() == 3 && frac.parse::<u32>().is_ok(),
            "connect_ms {ms} is not milliseconds with three decimals"
        );
    }
}

/// Records keyed by their client address; each client must have exactly one.
#[track_caller]
fn by_client(recs: &[Rec]) -> HashMap<SocketAddr, Rec> {
    let mut out = HashMap::new();
    for r in recs {
        let client = r.addr("client");
        if let Some(before) = out.insert(client, r.clone()) {
            panic!("two records for {client}:\n{}\n{}", before.line, r.line);
        }
    }
    out
}

// ---------------------------------------------------------------------------------
// Servers and their logs
// ---------------------------------------------------------------------------------

/// A directory of this test's own for log files, removed on drop.
struct LogDir(PathBuf);

impl LogDir {
    fn new(test: &str) -> LogDir {
        let dir =
            std::env::temp_dir().join(format!("edgepoll-access-log-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        LogDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for LogDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Turns the access log on, to `path` in `format`.
fn log_to(c: &mut Config, path: &Path, format: LogFormat) {
    c.access_log.target = Some(LogTarget::File(path.to_path_buf()));
    c.access_log.format = format;
}

fn written(server: &Server) -> u64 {
    server
        .metrics()
        .access_log_records(AccessLogResult::Written)
}

fn dropped(server: &Server) -> u64 {
    server
        .metrics()
        .access_log_records(AccessLogResult::Dropped)
}

fn closed(server: &Server) -> u64 {
    total(server, |s| s.closed_total())
}

/// Waits for `closes` closes to be published, then for the writer to stop writing;
/// asserts that exactly `records` were written in all and none dropped.
#[track_caller]
fn settle(server: &Server, closes: u64, records: u64) {
    wait_for(&format!("{closes} closes"), || closed(server) >= closes);
    assert_eq!(closed(server), closes, "closes");
    assert_eq!(settled(|| written(server)), records, "records written");
    assert_eq!(dropped(server), 0, "records dropped");
}

/// [`settle`], for a server whose every record is in the file at `path`: returns
/// them.
#[track_caller]
fn logged(server: &Server, path: &Path, closes: u64, records: u64) -> Vec<Rec> {
    settle(server, closes, records);
    let recs = read_log(path);
    assert_eq!(recs.len() as u64, records, "records in {}", path.display());
    recs
}

/// What one of the test's clients did.
#[derive(Debug, Clone, Copy)]
struct Client {
    /// Its own address: what the record's client and peer must say.
    addr: SocketAddr,
    sent: u64,
    received: u64,
}

/// An echo client: sends `size` bytes of stream `seed`, its FIN, and reads the echo
/// to the server's FIN.
fn echo_client(server: SocketAddr, seed: u64, size: usize) -> Client {
    let mut s = connect(server);
    let addr = s.local_addr().unwrap();
    let data = pattern(seed, 0, size);
    s.write_all(&data).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let (back, ending) = read_until_end(&mut s);
    assert_eq!(ending, Ending::Fin, "client {seed}");
    assert_same(&data, &back);
    Client {
        addr,
        sent: size as u64,
        received: back.len() as u64,
    }
}

/// Sends `size` bytes of stream `seed`, reads them back, then resets the connection
/// (SO_LINGER 0): the server finds a reset where it waited for more.
fn resetting_client(server: SocketAddr, seed: u64, size: usize) -> Client {
    let mut s = connect(server);
    let addr = s.local_addr().unwrap();
    echo_roundtrip(&mut s, &pattern(seed, 0, size));
    edgepoll::sys::socket::set_linger_zero(s.as_fd()).unwrap();
    drop(s);
    Client {
        addr,
        sent: size as u64,
        received: size as u64,
    }
}

/// Sizes that differ per client, so that a record with another client's counts
/// shows.
fn size_of(i: u64) -> usize {
    1 + (i as usize * 7919) % 60_000
}

// ---------------------------------------------------------------------------------
// 1, 2: one record per connection in every mode, text and JSON alike
// ---------------------------------------------------------------------------------

fn echo_connections_get_one_exact_record_each(format: LogFormat, test: &str) {
    let dir = LogDir::new(test);
    let path = dir.path("access.log");
    let since = SystemTime::now();
    let server = echo_server(2, |c| log_to(c, &path, format));
    let addr = server.local_addr();
    const N: u64 = 10;
    let clients: Vec<Client> = (0..N).map(|i| echo_client(addr, i, size_of(i))).collect();

    let recs = logged(&server, &path, N, N);
    let by = by_client(&recs);
    for c in &clients {
        let r = by
            .get(&c.addr)
            .unwrap_or_else(|| panic!("no record for {}", c.addr));
        assert_shape(r, "echo", since, 2);
        r.expect(&[
            ("peer", &c.addr),
            ("listen", &addr),
            ("bytes_in", &c.sent),
            ("bytes_out", &c.received),
            ("reason", &"eof"),
            ("reset", &false),
            ("ended_by", &"client"),
        ]);
    }
    // Round robin over two workers: half each.
    for w in 0..2 {
        let n = recs.iter().filter(|r| r.num("worker") == w).count();
        assert_eq!(n as u64, N / 2, "records of worker {w}");
    }
    let sum = |k: &str| recs.iter().map(|r| r.num(k)).sum::<u64>();
    assert_eq!(sum("bytes_in"), total(&server, |s| s.received_bytes));
    assert_eq!(sum("bytes_out"), total(&server, |s| s.sent_bytes));
}

#[test]
fn echo_connections_get_one_exact_text_record_each() {
    echo_connections_get_one_exact_record_each(LogFormat::Text, "echo-text");
}

#[test]
fn echo_connections_get_one_exact_json_record_each() {
    echo_connections_get_one_exact_record_each(LogFormat::Json, "echo-json");
}

/// An upstream for `n` clients, one after another: it reads each to its FIN, answers
/// with `len / 3 + 5` bytes of stream `len`, and closes. The answer's size differs
/// from the request's, so each of a pair's four byte counts is told apart.
fn answering_upstream(n: usize) -> (SocketAddr, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        for _ in 0..n {
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(PATIENCE)).unwrap();
            let (got, ending) = read_until_end(&mut s);
            assert_eq!(ending, Ending::Fin);
            let answer = pattern(got.len() as u64, 0, got.len() / 3 + 5);
            s.write_all(&answer).unwrap();
        }
    });
    (addr, t)
}

fn relayed_pairs_get_one_exact_record_each(format: LogFormat, splice: bool, test: &str) {
    let dir = LogDir::new(test);
    let path = dir.path("access.log");
    const N: u64 = 10;
    let (up, upstream) = answering_upstream(N as usize);
    let since = SystemTime::now();
    let relay = relay_server(2, vec![up], |c| {
        log_to(c, &path, format);
        c.relay.splice = splice;
    });
    let addr = relay.local_addr();
    let clients: Vec<Client> = (0..N)
        .map(|i| {
            let mut s = connect(addr);
            let me = s.local_addr().unwrap();
            let size = size_of(i);
            s.write_all(&pattern(i, 0, size)).unwrap();
            s.shutdown(Shutdown::Write).unwrap();
            let (back, ending) = read_until_end(&mut s);
            assert_eq!(ending, Ending::Fin, "client {i}");
            assert_same(&pattern(size as u64, 0, size / 3 + 5), &back);
            Client {
                addr: me,
                sent: size as u64,
                received: back.len() as u64,
            }
        })
        .collect();
    upstream.join().unwrap();

    let recs = logged(&relay, &path, N, N);
    let by = by_client(&recs);
    for c in &clients {
        let r = &by[&c.addr];
        assert_shape(r, "relay", since, 2);
        assert_ne!(
            r.get("connect_ms"),
            "-",
            "a connected pair has a connect time"
        );
        r.expect(&[
            ("peer", &c.addr),
            ("listen", &addr),
            ("upstream", &up),
            ("retries", &0),
            ("bytes_in", &c.sent),
            ("bytes_out", &c.received),
            ("upstream_bytes_out", &c.sent),
            ("upstream_bytes_in", &c.received),
            ("reason", &"eof"),
            ("reset", &false),
            ("ended_by", &"client"),
            ("stage", &"data"),
        ]);
    }
    // The four counts of every pair add up to the four byte metrics.
    wait_for("every relayed byte to be published", || {
        total(&relay, |s| s.sent_bytes) == clients.iter().map(|c| c.received).sum::<u64>()
    });
    let sum = |k: &str| recs.iter().map(|r| r.num(k)).sum::<u64>();
    assert_eq!(sum("bytes_in"), total(&relay, |s| s.received_bytes));
    assert_eq!(sum("bytes_out"), total(&relay, |s| s.sent_bytes));
    assert_eq!(
        sum("upstream_bytes_out"),
        total(&relay, |s| s.upstream_sent_bytes)
    );
    assert_eq!(
        sum("upstream_bytes_in"),
        total(&relay, |s| s.upstream_received_bytes)
    );
}

#[test]
fn relayed_pairs_get_one_exact_text_record_each() {
    relayed_pairs_get_one_exact_record_each(LogFormat::Text, false, "relay-text");
}

/// Bytes spliced through the kernel's pipes are counted the same.
#[test]
fn spliced_pairs_get_one_exact_record_each() {
    relayed_pairs_get_one_exact_record_each(LogFormat::Text, true, "relay-splice");
}

#[test]
fn relayed_pairs_get_one_exact_json_record_each() {
    relayed_pairs_get_one_exact_record_each(LogFormat::Json, false, "relay-json");
}

fn http_connections_count_requests_and_statuses(format: LogFormat, test: &str) {
    let dir = LogDir::new(test);
    let path = dir.path("access.log");
    let since = SystemTime::now();
    let server = http_server(2, |c| log_to(c, &path, format));
    let addr = server.local_addr();
    const N: u64 = 8;
    // Client i pipelines i % 3 + 1 good requests; an even one ends with a bad one.
    let clients: Vec<(Client, u64, bool)> = (0..N)
        .map(|i| {
            let good = i % 3 + 1;
            let bad = i % 2 == 0;
            let mut req = String::new();
            for j in 0..good {
                req += &format!("GET /{i}/{j} HTTP/1.1\r\nHost: test\r\n\r\n");
            }
            if bad {
                req += "GARBAGE\r\n\r\n";
            }
            let mut s = connect(addr);
            let me = s.local_addr().unwrap();
            s.write_all(req.as_bytes()).unwrap();
            if !bad {
                s.shutdown(Shutdown::Write).unwrap();
            }
            let want = good as usize + usize::from(bad);
            let (statuses, raw, _) = read_responses(&mut s, want);
            let mut expected = vec![200; good as usize];
            if bad {
                expected.push(400);
            }
            assert_eq!(statuses, expected, "client {i}");
            let (rest, ending) = read_until_end(&mut s);
            assert_eq!(ending, Ending::Fin, "client {i}");
            let c = Client {
                addr: me,
                sent: req.len() as u64,
                received: (raw.len() + rest.len()) as u64,
            };
            // Closing after the server's FIN ends the refused one's lingering close.
            drop(s);
            (c, good, bad)
        })
        .collect();

    let recs = logged(&server, &path, N, N);
    let by = by_client(&recs);
    for (c, good, bad) in &clients {
        let r = &by[&c.addr];
        assert_shape(r, "http", since, 2);
        r.expect(&[
            ("peer", &c.addr),
            ("listen", &addr),
            ("bytes_in", &c.sent),
            ("bytes_out", &c.received),
            ("requests", &(good + u64::from(*bad))),
            ("reset", &false),
        ]);
        let mut statuses = BTreeMap::from([(200, *good)]);
        if *bad {
            statuses.insert(400, 1);
            r.expect(&[("reason", &"protocol_error"), ("ended_by", &"edgepoll")]);
        } else {
            r.expect(&[("reason", &"eof"), ("ended_by", &"client")]);
        }
        assert_eq!(r.statuses(), statuses, "{}", r.line);
    }
    let sum = |k: &str| recs.iter().map(|r| r.num(k)).sum::<u64>();
    assert_eq!(sum("bytes_in"), total(&server, |s| s.received_bytes));
    assert_eq!(sum("bytes_out"), total(&server, |s| s.sent_bytes));
    let per_status = |code: u16| {
        (0..2)
            .map(|w| server.metrics().http_requests(w, code))
            .sum::<u64>()
    };
    let logged_status = |code: u16| {
        recs.iter()
            .map(|r| r.statuses().get(&code).copied().unwrap_or(0))
            .sum::<u64>()
    };
    assert_eq!(logged_status(200), per_status(200));
    assert_eq!(logged_status(400), per_status(400));
    assert_eq!(logged_status(400), N / 2);
}

#[test]
fn http_text_records_count_requests_and_statuses() {
    http_connections_count_requests_and_statuses(LogFormat::Text, "http-text");
}

#[test]
fn http_json_records_count_requests_and_statuses() {
    http_connections_count_requests_and_statuses(LogFormat::Json, "http-json");
}

/// The same connection logged in text and in JSON carries the same values: two
/// servers, the same client behaviour, the records compared field by field (all but
/// what differs between two runs: time, duration, worker and the addresses).
#[test]
fn a_json_record_carries_exactly_what_the_text_one_does() {
    let dir = LogDir::new("same-values");
    let mut lines = Vec::new();
    for (format, name) in [(LogFormat::Text, "a.log"), (LogFormat::Json, "b.log")] {
        let path = dir.path(name);
        let (up, upstream) = answering_upstream(1);
        let relay = relay_server(1, vec![up], |c| log_to(c, &path, format));
        answered_client(relay.local_addr(), 4321);
        upstream.join().unwrap();
        let recs = logged(&relay, &path, 1, 1);
        lines.push(recs[0].clone());
    }
    let [text, json] = &lines[..] else {
        unreachable!()
    };
    assert!(json.line.starts_with('{') && !text.line.starts_with('{'));
    assert_eq!(text.keys(), json.keys());
    let varying = [
        "time",
        "duration_ms",
        "client",
        "peer",
        "listen",
        "upstream",
        "connect_ms",
    ];
    for ((k, tv), (_, jv)) in text.fields.iter().zip(&json.fields) {
        if !varying.contains(&k.as_str()) {
            assert_eq!(tv, jv, "{k}:\n{}\n{}", text.line, json.line);
        }
    }
}

/// Sends `size` bytes and its FIN through a relay in front of [`answering_upstream`]
/// and reads the answer.
fn answered_client(relay: SocketAddr, size: usize) -> Client {
    let mut s = connect(relay);
    let me = s.local_addr().unwrap();
    s.write_all(&pattern(1, 0, size)).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let (back, ending) = read_until_end(&mut s);
    assert_eq!(ending, Ending::Fin);
    assert_eq!(back.len(), size / 3 + 5);
    Client {
        addr: me,
        sent: size as u64,
        received: back.len() as u64,
    }
}

// ---------------------------------------------------------------------------------
// 3: how connections ended
// ---------------------------------------------------------------------------------

#[test]
fn a_client_that_resets_is_logged_as_a_reset_it_ended() {
    let dir = LogDir::new("client-reset");
    let path = dir.path("access.log");
    let server = echo_server(1, |c| {
        log_to(c, &path, LogFormat::Text);
        c.max_pending_bytes = 64 * 1024;
    });
    let addr = server.local_addr();
    // Nothing owed when it resets: the server's close is no reset of its own.
    let quiet = resetting_client(addr, 1, 3000);
    let recs = logged(&server, &path, 1, 1);
    recs[0].expect(&[
        ("client", &quiet.addr),
        ("bytes_in", &3000),
        ("bytes_out", &3000),
        ("reason", &"reset"),
        ("reset", &false),
        ("ended_by", &"client"),
    ]);

    // Mid-stream: it sends without reading until every buffer is full, then resets
    // with its echo still owed.
    let s = connect(addr);
    let me = s.local_addr().unwrap();
    let sent = write_until_stalled(&s, 2, 64 << 20);
    edgepoll::sys::socket::set_linger_zero(s.as_fd()).unwrap();
    drop(s);
    let recs = logged(&server, &path, 2, 2);
    let r = &by_client(&recs)[&me];
    r.expect(&[
        ("reason", &"reset"),
        ("reset", &true),
        ("ended_by", &"client"),
    ]);
    assert_eq!(total(&server, |s| s.aborted_for(CloseReason::Reset)), 1);
    // What it read and was written is what the metrics counted, less the first
    // client's.
    assert_eq!(
        r.num("bytes_in"),
        total(&server, |s| s.received_bytes) - 3000
    );
    assert_eq!(r.num("bytes_out"), total(&server, |s| s.sent_bytes) - 3000);
    assert!(r.num("bytes_in") <= sent && r.num("bytes_in") > 0);
    assert!(r.num("bytes_out") < r.num("bytes_in"), "{}", r.line);
}

#[test]
fn a_relayed_client_that_resets_mid_stream_ended_its_pair() {
    let dir = LogDir::new("relay-client-reset");
    let path = dir.path("access.log");
    let upstream = echo_server(1, |_| {});
    let relay = relay_server(1, vec![upstream.local_addr()], |c| {
        log_to(c, &path, LogFormat::Text)
    });
    let c = resetting_client(relay.local_addr(), 3, 5000);
    let recs = logged(&relay, &path, 1, 1);
    // The upstream is reset in turn: the pair's close is a reset, and counted.
    assert_eq!(total(&relay, |s| s.aborted_for(CloseReason::Reset)), 1);
    recs[0].expect(&[
        ("reset", &true),
        ("client", &c.addr),
        ("upstream", &upstream.local_addr()),
        ("bytes_in", &5000),
        ("bytes_out", &5000),
        ("upstream_bytes_out", &5000),
        ("upstream_bytes_in", &5000),
        ("reason", &"reset"),
        ("ended_by", &"client"),
        ("stage", &"data"),
    ]);
}

#[test]
fn an_upstream_that_resets_ended_its_pair_and_the_client_is_reset() {
    let dir = LogDir::new("upstream-reset");
    let path = dir.path("access.log");
    let (up, t) = upstream_once(|mut s| {
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        edgepoll::sys::socket::set_linger_zero(s.as_fd()).unwrap();
    });
    let relay = relay_server(1, vec![up], |c| log_to(c, &path, LogFormat::Text));
    let mut client = connect(relay.local_addr());
    let me = client.local_addr().unwrap();
    client.write_all(b"hello").unwrap();
    t.join().unwrap();
    let (got, ending) = read_until_end(&mut client);
    assert_reset("client", got.len(), ending);
    let recs = logged(&relay, &path, 1, 1);
    recs[0].expect(&[
        ("client", &me),
        ("upstream", &up),
        ("retries", &0),
        ("bytes_in", &5),
        ("bytes_out", &0),
        ("upstream_bytes_out", &5),
        ("upstream_bytes_in", &0),
        ("reason", &"reset"),
        ("reset", &true),
        ("ended_by", &"upstream"),
        ("stage", &"data"),
    ]);
}

#[test]
fn upstreams_that_refuse_give_upstream_error_at_the_connect_stage_with_the_retries() {
    let dir = LogDir::new("refused");
    let path = dir.path("access.log");
    let dead = [dead_address(), dead_address()];
    let relay = relay_server(1, dead.to_vec(), |c| log_to(c, &path, LogFormat::Text));
    let mut client = connect(relay.local_addr());
    let me = client.local_addr().unwrap();
    let (got, _) = read_to_end(&mut client);
    assert!(got.is_empty());
    drop(client);
    let recs = logged(&relay, &path, 1, 1);
    let r = &recs[0];
    assert_shape(r, "relay", SystemTime::UNIX_EPOCH, 1);
    // Both were tried: the record names the last.
    assert!(dead.contains(&r.addr("upstream")), "{}", r.line);
    // Nothing connected, so the client is reset, and that is counted.
    assert_eq!(
        total(&relay, |s| s.aborted_for(CloseReason::UpstreamError)),
        1
    );
    r.expect(&[
        ("reset", &true),
        ("client", &me),
        ("connect_ms", &"-"),
        ("retries", &1),
        ("bytes_in", &0),
        ("bytes_out", &0),
        ("upstream_bytes_out", &0),
        ("upstream_bytes_in", &0),
        ("reason", &"upstream_error"),
        ("ended_by", &"upstream"),
        ("stage", &"connect"),
    ]);
}

#[test]
fn an_upstream_that_closes_first_ended_its_pair() {
    let dir = LogDir::new("upstream-first");
    let path = dir.path("access.log");
    let (up, t) = upstream_once(|mut s| {
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        s.write_all(b"bye!!!").unwrap();
        // Dropped here: its FIN comes while the client still has its side open.
    });
    let relay = relay_server(1, vec![up], |c| log_to(c, &path, LogFormat::Text));
    let mut client = connect(relay.local_addr());
    let me = client.local_addr().unwrap();
    client.write_all(b"hello").unwrap();
    let (got, ending) = read_until_end(&mut client);
    assert_eq!((got.as_slice(), ending), (&b"bye!!!"[..], Ending::Fin));
    t.join().unwrap();
    drop(client);
    let recs = logged(&relay, &path, 1, 1);
    recs[0].expect(&[
        ("client", &me),
        ("upstream", &up),
        ("bytes_in", &5),
        ("bytes_out", &6),
        ("upstream_bytes_out", &5),
        ("upstream_bytes_in", &6),
        ("reason", &"eof"),
        ("reset", &false),
        ("ended_by", &"upstream"),
        ("stage", &"data"),
    ]);
}

#[test]
fn an_idle_timeout_was_ended_by_edgepoll_in_echo_and_relay() {
    let dir = LogDir::new("idle");
    let idle = |c: &mut Config| c.idle_timeout = Some(Duration::from_millis(300));

    let path = dir.path("echo.log");
    let server = echo_server(1, |c| {
        log_to(c, &path, LogFormat::Text);
        idle(c);
    });
    let mut s = connect(server.local_addr());
    let me = s.local_addr().unwrap();
    echo_roundtrip(&mut s, &pattern(4, 0, 100));
    let (rest, ending) = read_until_end(&mut s);
    assert_eq!((rest.len(), ending), (0, Ending::Fin));
    let recs = logged(&server, &path, 1, 1);
    recs[0].expect(&[
        ("client", &me),
        ("bytes_in", &100),
        ("bytes_out", &100),
        ("reason", &"idle_timeout"),
        ("reset", &false),
        ("ended_by", &"edgepoll"),
    ]);
    assert!(recs[0].num("duration_ms") >= 300, "{}", recs[0].line);

    let path = dir.path("relay.log");
    let upstream = echo_server(1, |_| {});
    let relay = relay_server(1, vec![upstream.local_addr()], |c| {
        log_to(c, &path, LogFormat::Text);
        idle(c);
    });
    let mut s = connect(relay.local_addr());
    let me = s.local_addr().unwrap();
    echo_roundtrip(&mut s, &pattern(5, 0, 100));
    // An idle pair is aborted, both peers reset: neither may take the close for a
    // stream's complete end.
    let (rest, ending) = read_until_end(&mut s);
    assert_reset("relayed client", rest.len(), ending);
    let recs = logged(&relay, &path, 1, 1);
    assert_eq!(
        total(&relay, |s| s.aborted_for(CloseReason::IdleTimeout)),
        1
    );
    recs[0].expect(&[
        ("reset", &true),
        ("client", &me),
        ("bytes_in", &100),
        ("bytes_out", &100),
        ("upstream_bytes_out", &100),
        ("upstream_bytes_in", &100),
        ("reason", &"idle_timeout"),
        ("ended_by", &"edgepoll"),
        ("stage", &"data"),
    ]);
}

#[test]
fn a_client_that_waited_out_the_queue_was_ended_by_edgepoll_at_the_queue_stage() {
    let dir = LogDir::new("queue");
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
    let mut waiter = connect(relay.local_addr());
    let me = waiter.local_addr().unwrap();
    let (got, ending) = read_until_end(&mut waiter);
    assert_reset("queued client", got.len(), ending);
    let recs = logged(&relay, &path, 1, 1);
    assert_eq!(
        total(&relay, |s| s.aborted_for(CloseReason::QueueTimeout)),
        1
    );
    recs[0].expect(&[
        ("client", &me),
        ("upstream", &"-"),
        ("connect_ms", &"-"),
        ("retries", &0),
        ("bytes_in", &0),
        ("bytes_out", &0),
        ("reason", &"queue_timeout"),
        ("reset", &true),
        ("ended_by", &"edgepoll"),
        ("stage", &"queue"),
    ]);
    assert!(recs[0].num("duration_ms") >= 300, "{}", recs[0].line);
    drop(holder);
    let recs = logged(&relay, &path, 2, 2);
    recs[1].expect(&[
        ("upstream", &upstream.local_addr()),
        ("bytes_in", &13),
        ("reason", &"eof"),
        ("stage", &"data"),
    ]);
}

/// The drain closes idle connections (reason `shutdown`, edgepoll's doing), and the
/// records of the last closes are in the file once `shutdown` returns.
#[test]
fn the_drains_closes_are_logged_before_shutdown_returns() {
    let dir = LogDir::new("drain");
    let path = dir.path("access.log");
    let server = echo_server(2, |c| log_to(c, &path, LogFormat::Text));
    let metrics = Arc::clone(server.metrics());
    let addr = server.local_addr();
    let (ready, roundtrips) = std::sync::mpsc::channel();
    let clients: Vec<_> = (0..3u64)
        .map(|i| {
            let ready = ready.clone();
            std::thread::spawn(move || {
                let mut s = connect(addr);
                let me = s.local_addr().unwrap();
                let size = size_of(i);
                echo_roundtrip(&mut s, &pattern(i, 0, size));
                ready.send(()).unwrap();
                let (rest, ending) = read_until_end(&mut s);
                assert_eq!((rest.len(), ending), (0, Ending::Fin), "client {i}");
                Client {
                    addr: me,
                    sent: size as u64,
                    received: size as u64,
                }
            })
        })
        .collect();
    for _ in 0..3 {
        roundtrips.recv_timeout(PATIENCE).unwrap();
    }
    server.shutdown();
    let clients: Vec<Client> = clients.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(metrics.access_log_records(AccessLogResult::Written), 3);
    let recs = read_log(&path);
    assert_eq!(recs.len(), 3);
    let by = by_client(&recs);
    for c in &clients {
        by[&c.addr].expect(&[
            ("bytes_in", &c.sent),
            ("bytes_out", &c.received),
            ("reason", &"shutdown"),
            ("reset", &false),
            ("ended_by", &"edgepoll"),
        ]);
    }
}

/// A connection a reload moves is logged once, by the server that closes it, with the
/// bytes and time since it arrived there; the one it left logs nothing of it.
#[test]
fn a_moved_connection_is_logged_once_by_the_server_that_closes_it() {
    let dir = LogDir::new("moved");
    let (old_log, new_log) = (dir.path("old.log"), dir.path("new.log"));
    let old = echo_server(1, |c| log_to(c, &old_log, LogFormat::Text));
    let addr = old.local_addr();
    let mut client = connect(addr);
    let me = client.local_addr().unwrap();
    echo_roundtrip(&mut client, &pattern(1, 0, 1000));

    let (listeners, _) = old.listeners().unwrap();
    let mut config = Config::new(edgepoll::Mode::Echo);
    config.workers = 1;
    config.metrics_listen = None;
    log_to(&mut config, &new_log, LogFormat::Text);
    let new = Server::start_with(
        config,
        edgepoll::Sockets {
            listeners,
            metrics: None,
        },
    )
    .expect("the new server starts");
    let handover = old.hand_over(vec![false]);
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
    assert_eq!(moved, 1);
    let old_metrics = Arc::clone(old.metrics());
    old.finish_hand_over();
    assert_eq!(old_metrics.access_log_records(AccessLogResult::Written), 0);
    assert!(
        read_log(&old_log).is_empty(),
        "the old server logged a move"
    );

    echo_roundtrip(&mut client, &pattern(2, 0, 234));
    client.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_until_end(&mut client), (Vec::new(), Ending::Fin));
    let recs = logged(&new, &new_log, 1, 1);
    recs[0].expect(&[
        ("client", &me),
        ("peer", &me),
        ("listen", &addr),
        ("bytes_in", &234),
        ("bytes_out", &234),
        ("reason", &"eof"),
        ("ended_by", &"client"),
    ]);
}

#[test]
fn an_http_header_timeout_is_one_408_request_ended_by_edgepoll() {
    let dir = LogDir::new("header-timeout");
    let path = dir.path("access.log");
    let server = http_server(1, |c| {
        log_to(c, &path, LogFormat::Json);
        c.http.header_timeout = Duration::from_millis(300);
    });
    let mut s = connect(server.local_addr());
    let me = s.local_addr().unwrap();
    let head = b"GET / HTTP/1.1\r\nHost: test\r\n\r\nGET /slow HTTP/1.1\r\nHo";
    s.write_all(head).unwrap();
    let (statuses, raw, _) = read_responses(&mut s, 2);
    assert_eq!(statuses, vec![200, 408]);
    let (rest, ending) = read_until_end(&mut s);
    assert_eq!(ending, Ending::Fin);
    drop(s);
    let recs = logged(&server, &path, 1, 1);
    recs[0].expect(&[
        ("client", &me),
        ("bytes_in", &head.len()),
        ("bytes_out", &(raw.len() + rest.len())),
        ("requests", &2),
        ("reason", &"header_timeout"),
        ("ended_by", &"edgepoll"),
    ]);
    assert_eq!(recs[0].statuses(), BTreeMap::from([(200, 1), (408, 1)]));
}

#[test]
fn with_accept_proxy_the_client_is_the_headers_and_the_peer_the_proxys() {
    let dir = LogDir::new("proxy");
    let path = dir.path("access.log");
    let server = echo_server(1, |c| {
        log_to(c, &path, LogFormat::Json);
        c.accept_proxy = true;
        c.trusted_proxies = vec![parse_cidr("127.0.0.0/8").unwrap()];
        c.proxy_header_timeout = Duration::from_secs(600);
    });
    let addr = server.local_addr();
    let mut v2 = Vec::new();
    proxy::encode(
        "[2001:db8::7]:4000".parse().unwrap(),
        "[2001:db8::1]:443".parse().unwrap(),
        &mut v2,
    );
    let headers: [(&[u8], &str); 2] = [
        (
            b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 7000\r\n",
            "203.0.113.7:51000",
        ),
        (&v2, "[2001:db8::7]:4000"),
    ];
    let mut proxies = Vec::new();
    for (i, (header, _)) in headers.iter().enumerate() {
        let mut s = connect(addr);
        proxies.push(s.local_addr().unwrap());
        let data = pattern(i as u64, 0, 777 + i);
        s.write_all(header).unwrap();
        s.write_all(&data).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let (back, ending) = read_until_end(&mut s);
        assert_eq!(ending, Ending::Fin);
        assert_same(&data, &back);
    }
    // A proxy whose header is garbage is refused, not closed: no record.
    let mut s = connect(addr);
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let _ = read_to_end(&mut s);
    wait_for("the refusal", || {
        server
            .metrics()
            .rejected(edgepoll::RejectReason::ProxyHeader)
            == 1
    });
    let recs = logged(&server, &path, 2, 2);
    let by = by_client(&recs);
    for (i, (_, client)) in headers.iter().enumerate() {
        let r = &by[&client.parse().unwrap()];
        // The header's bytes are not the client's: only its data is counted.
        r.expect(&[
            ("peer", &proxies[i]),
            ("listen", &addr),
            ("bytes_in", &(777 + i)),
            ("bytes_out", &(777 + i)),
            ("reason", &"eof"),
        ]);
    }
}

// ---------------------------------------------------------------------------------
// 4: sampling
// ---------------------------------------------------------------------------------

/// `--access-log-sample` on one worker: of `n` clean closes exactly `n * ratio` are
/// logged, every `1 / ratio`-th one; the resets that follow are all logged.
fn sampling_logs_exactly_its_share(sample: &str, n: u64, every: u64, test: &str) {
    let ratio = edgepoll::config::parse_sample(sample).unwrap();
    let dir = LogDir::new(test);
    let path = dir.path("access.log");
    let server = echo_server(1, |c| {
        log_to(c, &path, LogFormat::Text);
        c.access_log.sample = ratio;
    });
    let addr = server.local_addr();
    let clean: Vec<Client> = (0..n).map(|i| echo_client(addr, i, size_of(i))).collect();
    let recs = logged(&server, &path, n, n / every);
    // Spread evenly: the every-th, 2*every-th, ... clean close.
    let want: Vec<(SocketAddr, u64)> = clean
        .iter()
        .skip(every as usize - 1)
        .step_by(every as usize)
        .map(|c| (c.addr, c.sent))
        .collect();
    let got: Vec<(SocketAddr, u64)> = recs
        .iter()
        .map(|r| (r.addr("client"), r.num("bytes_in")))
        .collect();
    assert_eq!(got, want);

    // Resets in between clean closes are always logged, and take no clean one's turn.
    let mut resets = Vec::new();
    for i in 0..3 {
        resets.push(resetting_client(addr, 100 + i, 10 + i as usize).addr);
        echo_client(addr, 200 + i, 10);
    }
    let recs = logged(&server, &path, n + 6, n / every + 3);
    let new: Vec<SocketAddr> = recs[(n / every) as usize..]
        .iter()
        .map(|r| {
            assert_eq!(r.get("reason"), "reset", "{}", r.line);
            r.addr("client")
        })
        .collect();
    assert_eq!(new, resets);
}

#[test]
fn a_quarter_sample_logs_exactly_every_fourth_clean_close_and_every_reset() {
    sampling_logs_exactly_its_share("0.25", 40, 4, "sample-quarter");
}

#[test]
fn a_ten_percent_sample_logs_exactly_every_tenth_clean_close() {
    // 0.1 has no exact binary form: ten of it added up fall short of 1.
    sampling_logs_exactly_its_share("10%", 40, 10, "sample-tenth");
}

// ---------------------------------------------------------------------------------
// 5: a stalled writer
// ---------------------------------------------------------------------------------

/// The log is a FIFO whose reader never reads until the end: the pipe fills, the
/// writer blocks in write(2), the workers' buffers fill. Every connection must still
/// be served and closed, the records that found no room dropped and counted, and
/// once the reader drains, every record is either read or counted as dropped.
#[test]
fn a_stalled_writer_never_stalls_a_worker_and_every_record_is_written_or_counted() {
    let dir = LogDir::new("stalled");
    let fifo = dir.path("access.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success(), "mkfifo {}", fifo.display());
    // Opened first, so that the server's open finds a reader and does not wait.
    let mut reader = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let server = echo_server(2, |c| log_to(c, &fifo, LogFormat::Text));
    let addr = server.local_addr();

    const THREADS: u64 = 4;
    const PER_THREAD: u64 = 5000;
    const N: u64 = THREADS * PER_THREAD;
    let served = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..THREADS)
        .map(|t| {
            let served = Arc::clone(&served);
            std::thread::spawn(move || {
                for i in 0..PER_THREAD {
                    echo_client(addr, t * PER_THREAD + i, 16);
                    served.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for c in clients {
        c.join().expect("every client served byte-exact");
    }
    assert_eq!(served.load(Ordering::Relaxed), N);
    wait_for("every close published", || closed(&server) == N);
    assert_eq!(total(&server, |s| s.closed_for(CloseReason::Eof)), N);

    let lost = settled(|| dropped(&server));
    let done = written(&server);
    assert!(lost > 0, "a full pipe and full buffers drop records");
    // The writer still holds what it is blocked on: neither written nor dropped yet.
    assert!(done + lost < N, "written {done} + dropped {lost} of {N}");

    // The reader drains: everything held is written, nothing more is lost.
    let mut text = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut drain = |text: &mut Vec<u8>| loop {
        match reader.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => text.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(e) => panic!("read the FIFO: {e}"),
        }
    };
    wait_for("every record written or counted as dropped", || {
        drain(&mut text);
        written(&server) + dropped(&server) >= N
    });
    assert_eq!(written(&server) + dropped(&server), N);
    assert_eq!(dropped(&server), lost, "no drop once the reader reads");
    let done = written(&server);
    drop(server);
    wait_for("the writer to close the FIFO", || drain(&mut text));
    let text = String::from_utf8(text).unwrap();
    assert!(text.ends_with('\n'));
    let recs: Vec<Rec> = text.lines().map(parse_text).collect();
    assert_eq!(
        recs.len() as u64,
        done,
        "every record counted written was read"
    );
    for r in &recs {
        r.expect(&[
            ("listen", &addr),
            ("bytes_in", &16),
            ("bytes_out", &16),
            ("reason", &"eof"),
        ]);
    }
}

/// A log whose every write fails (a full disk: /dev/full answers ENOSPC): each record
/// is counted as dropped, none as written, and the connections do not notice.
#[test]
fn a_log_on_a_full_disk_counts_every_record_dropped() {
    let full = Path::new("/dev/full");
    let server = echo_server(2, |c| log_to(c, full, LogFormat::Text));
    let addr = server.local_addr();
    const N: u64 = 50;
    for i in 0..N {
        echo_client(addr, i, size_of(i));
    }
    wait_for("every close published", || closed(&server) == N);
    wait_for("every record counted", || {
        written(&server) + dropped(&server) >= N
    });
    assert_eq!(settled(|| dropped(&server)), N);
    assert_eq!(written(&server), 0);
}

// ---------------------------------------------------------------------------------
// 6: reopen after a rename
// ---------------------------------------------------------------------------------

/// Identities of the clients in `recs`: address and bytes sent.
fn identities(recs: &[Rec]) -> Vec<(SocketAddr, u64)> {
    let mut ids: Vec<_> = recs
        .iter()
        .map(|r| (r.addr("client"), r.num("bytes_in")))
        .collect();
    ids.sort();
    ids
}

fn ids_of(clients: &[Client]) -> Vec<(SocketAddr, u64)> {
    let mut ids: Vec<_> = clients.iter().map(|c| (c.addr, c.sent)).collect();
    ids.sort();
    ids
}

#[test]
fn a_reopen_after_a_rename_splits_the_records_with_none_lost_or_repeated() {
    let dir = LogDir::new("reopen");
    let path = dir.path("access.log");
    let server = echo_server(2, |c| log_to(c, &path, LogFormat::Text));
    let addr = server.local_addr();
    let first: Vec<Client> = (0..5)
        .map(|i| echo_client(addr, i, 1 + i as usize))
        .collect();
    logged(&server, &path, 5, 5);
    std::fs::rename(&path, dir.path("access.log.1")).unwrap();
    assert!(server.reopen_access_log(), "the reopen succeeds");
    let second: Vec<Client> = (5..12)
        .map(|i| echo_client(addr, i, 1 + i as usize))
        .collect();
    settle(&server, 12, 12);
    assert_eq!(identities(&read_log(&path)), ids_of(&second));
    assert_eq!(
        identities(&read_log(&dir.path("access.log.1"))),
        ids_of(&first)
    );

    // Now while clients keep closing: each record lands in one file or the other.
    let served = Arc::new(AtomicU64::new(0));
    let reopened = Arc::new(AtomicBool::new(false));
    let churn = {
        let (served, reopened) = (Arc::clone(&served), Arc::clone(&reopened));
        std::thread::spawn(move || {
            let mut clients = Vec::new();
            let mut after = 0;
            // 100 more once the reopen is done, so both files get some.
            while after < 100 {
                let i = clients.len() as u64;
                clients.push(echo_client(addr, 1000 + i, 100 + i as usize));
                served.fetch_add(1, Ordering::Relaxed);
                if reopened.load(Ordering::Relaxed) {
                    after += 1;
                }
            }
            clients
        })
    };
    wait_for("some churn", || served.load(Ordering::Relaxed) >= 100);
    std::fs::rename(&path, dir.path("access.log.2")).unwrap();
    assert!(server.reopen_access_log(), "the reopen succeeds");
    reopened.store(true, Ordering::Relaxed);
    let churned = churn.join().unwrap();
    let n = churned.len() as u64;
    settle(&server, 12 + n, 12 + n);
    let mut before = read_log(&dir.path("access.log.2"));
    let after = read_log(&path);
    // The 7 before the churn, every client served before the reopen was called, and
    // at least the last one served after it.
    assert!(before.len() >= 107, "{} before the reopen", before.len());
    assert!(!after.is_empty(), "none after the reopen");
    before.retain(|r| r.num("bytes_in") >= 100);
    let mut both = before;
    both.extend(after);
    assert_eq!(identities(&both), ids_of(&churned));
}

/// A reopen that cannot open the path (its directory is gone) says so, and records
/// go on to the file opened before: none is lost.
#[test]
fn a_failed_reopen_keeps_writing_to_the_old_file() {
    let dir = LogDir::new("reopen-fails");
    std::fs::create_dir(dir.path("logs")).unwrap();
    let path = dir.path("logs").join("access.log");
    let server = echo_server(1, |c| log_to(c, &path, LogFormat::Text));
    let addr = server.local_addr();
    let first: Vec<Client> = (0..3)
        .map(|i| echo_client(addr, i, 1 + i as usize))
        .collect();
    settle(&server, 3, 3);
    std::fs::rename(dir.path("logs"), dir.path("moved")).unwrap();
    assert!(!server.reopen_access_log(), "a reopen that failed says so");
    let second: Vec<Client> = (3..7)
        .map(|i| echo_client(addr, i, 1 + i as usize))
        .collect();
    settle(&server, 7, 7);
    let mut all = first;
    all.extend(second);
    let old = dir.path("moved").join("access.log");
    assert_eq!(identities(&read_log(&old)), ids_of(&all));
    assert!(!path.exists());
}

/// Reads the binary's stderr until its start-up line; returns the address it names
/// and leaves a thread draining the rest into the returned channel.
fn started(child: &mut std::process::Child) -> (SocketAddr, std::sync::mpsc::Receiver<String>) {
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let line = loop {
        match lines.next() {
            Some(Ok(l)) if l.contains(" listening on ") => break l,
            Some(Ok(l)) => seen.push(l),
            _ => panic!("no start-up line; the log was:\n{}", seen.join("\n")),
        }
    };
    let (tx, rx) = std::sync::mpsc::channel();
    for l in seen {
        let _ = tx.send(l);
    }
    let _ = tx.send(line.clone());
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let after = line.split(" listening on ").nth(1).unwrap();
    let addr = after
        .split([' ', '"', '\\'])
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("no address in {line}"));
    (addr, rx)
}

fn edgepoll() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edgepoll"))
}

#[test]
fn sigusr1_after_a_rename_reopens_the_binarys_log_with_none_lost_or_repeated() {
    let dir = LogDir::new("sigusr1");
    let path = dir.path("access.log");
    let mut child = edgepoll()
        .args(["echo", "--listen", "127.0.0.1:0", "--workers", "2"])
        .args(["--metrics-listen", "off", "--access-log"])
        .arg(&path)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (addr, _log) = started(&mut child);
    let mut child = Running(child);
    let pid = child.0.id();
    // Whole lines only: the file may be read in the middle of a write.
    let count =
        |p: &Path| std::fs::read(p).map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count());

    let first: Vec<Client> = (0..5)
        .map(|i| echo_client(addr, i, 1 + i as usize))
        .collect();
    wait_for("5 records", || count(&path) >= 5);
    let rotated = dir.path("access.log.1");
    std::fs::rename(&path, &rotated).unwrap();
    kill(pid, "-USR1");
    wait_for("the new file", || path.exists());
    let second: Vec<Client> = (5..12)
        .map(|i| echo_client(addr, i, 1 + i as usize))
        .collect();
    wait_for("7 records in the new file", || count(&path) >= 7);

    kill(pid, "-TERM");
    let status = child.0.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert_eq!(identities(&read_log(&rotated)), ids_of(&first));
    assert_eq!(identities(&read_log(&path)), ids_of(&second));
}

// ---------------------------------------------------------------------------------
// 7: settings refused
// ---------------------------------------------------------------------------------

#[test]
fn a_log_path_that_cannot_be_opened_fails_the_start_naming_it() {
    let dir = LogDir::new("unwritable");
    let path = dir.path("no-such-dir").join("access.log");
    let mut config = Config::new(edgepoll::Mode::Echo);
    config.listen = vec!["127.0.0.1:0".parse().unwrap()];
    config.workers = 1;
    config.metrics_listen = None;
    log_to(&mut config, &path, LogFormat::Text);
    let err = Server::start(config)
        .expect_err("the start fails")
        .to_string();
    assert!(
        err.contains(&format!("open {}", path.display())) && err.contains("No such file"),
        "{err}"
    );

    let out = edgepoll()
        .args(["echo", "--listen", "127.0.0.1:0", "--metrics-listen", "off"])
        .arg("--access-log")
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(!err.contains(" listening on "), "{err}");
}

#[test]
fn a_sample_outside_zero_to_one_is_refused_by_flag_and_by_file() {
    for bad in ["0", "1.5", "150%", "-0.5", "NaN"] {
        let out = edgepoll()
            .args(["echo", "--listen", "127.0.0.1:0", "--access-log", "off"])
            .arg(format!("--access-log-sample={bad}"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {err}");
        assert!(err.contains("--access-log-sample"), "{bad}: {err}");
        assert!(
            err.contains(&format!("invalid ratio '{bad}'")),
            "{bad}: {err}"
        );
    }
    let dir = LogDir::new("sample-file");
    for bad in ["0", "1.5", "\"150%\""] {
        let file = dir.path("bad.toml");
        std::fs::write(
            &file,
            format!("mode = \"echo\"\naccess-log = \"stderr\"\naccess-log-sample = {bad}\n"),
        )
        .unwrap();
        let out = edgepoll()
            .args(["check", "--config"])
            .arg(&file)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {err}");
        assert!(
            err.contains("access-log-sample") && err.contains("invalid ratio"),
            "{bad}: {err}"
        );
    }
    // And a good one passes.
    let file = dir.path("good.toml");
    std::fs::write(
        &file,
        "mode = \"echo\"\naccess-log = \"stderr\"\naccess-log-sample = \"10%\"\n",
    )
    .unwrap();
    let out = edgepoll()
        .args(["check", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

// ---------------------------------------------------------------------------------
// 8: --log-format json
// ---------------------------------------------------------------------------------

/// The file's `log-format` key applies from the first line, before the file is
/// even fully loaded.
#[test]
fn the_files_log_format_key_makes_the_start_up_line_json() {
    let dir = LogDir::new("log-format-file");
    let file = dir.path("edgepoll.toml");
    std::fs::write(
        &file,
        "mode = \"echo\"\nlisten = \"127.0.0.1:0\"\nmetrics-listen = \"off\"\n\
         log-format = \"json\"\n",
    )
    .unwrap();
    let mut child = edgepoll()
        .arg("--config")
        .arg(&file)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (_, log) = started(&mut child);
    let _child = Running(child);
    let first: Vec<String> = log.try_iter().collect();
    assert!(!first.is_empty());
    for line in &first {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["message"].is_string(), "{line}");
    }
}

#[test]
fn with_log_format_json_every_stderr_line_is_a_json_object() {
    let mut child = edgepoll()
        .args(["--log-format", "json", "echo", "--listen", "127.0.0.1:0"])
        .args(["--workers", "2", "--metrics-listen", "off"])
        .args(["--access-log", "stderr", "--access-log-format", "json"])
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (addr, log) = started(&mut child);
    let mut child = Running(child);
    let clients: Vec<Client> = (0..4)
        .map(|i| echo_client(addr, i, 10 + i as usize))
        .collect();
    // The drain writes what the writer has not yet.
    kill(child.0.id(), "-TERM");
    assert_eq!(child.0.wait().unwrap().code(), Some(0));

    let lines: Vec<String> = log.iter().collect();
    let mut messages = 0;
    let mut records = Vec::new();
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v.is_object(), "{line}");
        if v.get("mode").is_some() {
            records.push(parse_json(line));
        } else {
            assert!(v["message"].is_string(), "no message: {line}");
            assert!(v["level"].is_string(), "no level: {line}");
            messages += 1;
        }
    }
    assert!(messages >= 2, "start-up and stop lines: {lines:?}");
    assert_eq!(identities(&records), ids_of(&clients));
}
