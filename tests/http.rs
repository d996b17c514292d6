//! http mode over real loopback sockets.

mod util;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use edgepoll::mode::http::reason;
use edgepoll::CloseReason;
use util::*;

const PIPELINE: &[u8] = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n\
POST /form HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\n\r\nhello world\
PUT /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n\
DELETE /d HTTP/1.1\r\nHost: t\r\n\r\n";

/// The responses to PIPELINE with the Date value blanked.
fn expected_pipeline() -> String {
    let one = "HTTP/1.1 200 OK\r\nServer: edgepoll\r\nContent-Type: text/plain\r\nContent-Length: 13\r\nDate: *\r\n\r\n";
    format!("{one}Hello, World!{one}Hello, World!{one}Hello, World!{one}Hello, World!")
}

/// Replaces every Date value with `*`, checking it is an IMF-fixdate first.
fn blank_dates(raw: &[u8]) -> String {
    let text = String::from_utf8(raw.to_vec()).unwrap();
    let mut out = String::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("Date: ") {
        out.push_str(&rest[..i + 6]);
        let end = rest[i..].find("\r\n").unwrap() + i;
        let date = &rest[i + 6..end];
        assert!(
            date.ends_with(" GMT") && date.len() == 29,
            "not an IMF-fixdate: {date}"
        );
        out.push('*');
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

#[test]
fn pipelined_requests_split_at_every_byte_boundary_get_exact_responses() {
    let server = http_server(2, |_| {});
    let addr = server.local_addr();
    let expected = expected_pipeline();
    for split in 1..PIPELINE.len() {
        let mut s = connect(addr);
        s.write_all(&PIPELINE[..split]).unwrap();
        s.flush().unwrap();
        std::thread::sleep(Duration::from_micros(300));
        s.write_all(&PIPELINE[split..]).unwrap();
        let (statuses, raw, _) = read_responses(&mut s, 4);
        assert_eq!(statuses, vec![200; 4], "split at {split}");
        assert_eq!(blank_dates(&raw), expected, "split at {split}");
    }
    // Exactly four 200s per connection: nothing answered twice, nothing dropped.
    wait_for("every request counted", || {
        (0..2)
            .map(|w| server.metrics().http_requests(w, 200))
            .sum::<u64>()
            == 4 * (PIPELINE.len() as u64 - 1)
    });
}

#[test]
fn sixteen_pipelined_requests_in_one_packet_get_sixteen_responses_in_order() {
    let server = http_server(1, |_| {});
    let mut s = connect(server.local_addr());
    let sixteen = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n".repeat(16);
    s.write_all(&sixteen).unwrap();
    let (statuses, raw, _) = read_responses(&mut s, 16);
    assert_eq!(statuses, vec![200; 16]);
    assert_eq!(raw.len() % 16, 0, "sixteen identical responses");
    // That they leave in one write is checked with strace in tests/e2e/http.sh.
}

/// Sends `request` on a new connection and reads until the server closes; returns the
/// status lines received and whether the read ended in a clean EOF (not a timeout).
fn status_lines_for(addr: std::net::SocketAddr, request: &[u8]) -> (Vec<String>, bool) {
    let mut s = connect(addr);
    // Every case here is closed by the server at once; a connection left open is the
    // failure, and it should not cost the full PATIENCE to find out.
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request).unwrap();
    let (raw, eof) = read_to_end(&mut s);
    (status_lines(&raw), eof)
}

/// The status line of every response in `raw`.
fn status_lines(raw: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(raw);
    // The fixed body is "Hello, World!", so every "HTTP/1.1 " starts a status line.
    text.match_indices("HTTP/1.1 ")
        .map(|(i, _)| text[i..].split("\r\n").next().unwrap().to_string())
        .collect()
}

#[test]
fn malformed_and_hostile_requests_get_the_exact_status_and_a_close() {
    let server = http_server(2, |c| c.http.max_header_bytes = 8 * 1024);
    let addr = server.local_addr();
    let many_headers: String = (0..100).map(|i| format!("X-{i}: v\r\n")).collect();
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(9000)
    );
    let chunked = |body: &[u8]| {
        [
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".as_slice(),
            body,
        ]
        .concat()
    };
    let cases: Vec<(&str, Vec<u8>, Vec<u16>)> = vec![
        ("garbage", b"GARBAGE\r\n\r\n".to_vec(), vec![400]),
        ("binary", b"\x00\x01\x02\x03\r\n\r\n".to_vec(), vec![400]),
        ("no Host in 1.1", b"GET / HTTP/1.1\r\n\r\n".to_vec(), vec![400]),
        ("two Hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".to_vec(), vec![400]),
        ("HTTP/2.0", b"GET / HTTP/2.0\r\nHost: t\r\n\r\n".to_vec(), vec![505]),
        ("HTTP/1.2", b"GET / HTTP/1.2\r\nHost: t\r\n\r\n".to_vec(), vec![505]),
        ("TRACE", b"TRACE / HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(), vec![405]),
        ("CONNECT", b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(), vec![405]),
        ("unknown method", b"BREW /pot HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(), vec![405]),
        ("bad header line", b"GET / HTTP/1.1\r\nHost: t\r\nNo colon here\r\n\r\n".to_vec(), vec![400]),
        ("bad Content-Length", b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1x\r\n\r\n".to_vec(), vec![400]),
        ("negative Content-Length", b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n".to_vec(), vec![400]),
        ("conflicting Content-Lengths", b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab".to_vec(), vec![400]),
        ("Transfer-Encoding with Content-Length", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n".to_vec(), vec![400]),
        ("Transfer-Encoding not chunked", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n".to_vec(), vec![400]),
        ("bad chunk size after a good head", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec(), vec![200, 400]),
        ("chunk without its CRLF", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY".to_vec(), vec![200, 400]),
        ("head over --max-header-bytes", huge.into_bytes(), vec![431]),
        ("too many headers", format!("GET / HTTP/1.1\r\nHost: t\r\n{many_headers}\r\n").into_bytes(), vec![431]),
        ("a good request, then garbage", b"GET / HTTP/1.1\r\nHost: t\r\n\r\n\x16\x03\x01garbage\r\n\r\n".to_vec(), vec![200, 400]),
        ("HTTP/1.0 without Host closes after one", b"GET / HTTP/1.0\r\n\r\nGET / HTTP/1.0\r\n\r\n".to_vec(), vec![200]),
        ("Connection: close", b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(), vec![200]),
        // Where a front proxy and edgepoll could disagree on where a request ends
        // (request smuggling): RFC 9112 without its leniencies.
        ("bare LF before the request line", b"\nGET / HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(), vec![400]),
        ("bare LF ending the request line", b"GET / HTTP/1.1\nHost: t\r\n\r\n".to_vec(), vec![400]),
        ("bare LF ending a header", b"GET / HTTP/1.1\r\nHost: t\nX: y\r\n\r\n".to_vec(), vec![400]),
        ("bare LF ending the head", b"GET / HTTP/1.1\r\nHost: t\r\n\n".to_vec(), vec![400]),
        ("bare LF line endings only", b"GET / HTTP/1.1\nHost: t\n\n".to_vec(), vec![400]),
        ("bare CR in the request line", b"GET / HTTP/1.1\rHost: t\r\n\r\n".to_vec(), vec![400]),
        ("bare CR in a header value", b"GET / HTTP/1.1\r\nHost: t\rX: y\r\n\r\n".to_vec(), vec![400]),
        ("whitespace before a colon", b"GET / HTTP/1.1\r\nHost : t\r\n\r\n".to_vec(), vec![400]),
        ("whitespace before the first header", b"GET / HTTP/1.1\r\n Host: t\r\n\r\n".to_vec(), vec![400]),
        ("obs-fold line folding", b"GET / HTTP/1.1\r\nHost: t\r\nX: a\r\n b\r\n\r\n".to_vec(), vec![400]),
        ("two spaces in the request line", b"GET  / HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(), vec![400]),
        ("NUL in a header value", b"GET / HTTP/1.1\r\nHost: t\r\nX: a\x00b\r\n\r\n".to_vec(), vec![400]),
        ("Content-Length with a plus sign", b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: +1\r\n\r\nx".to_vec(), vec![400]),
        ("Content-Length with a space inside", b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1 0\r\n\r\n".to_vec(), vec![400]),
        ("Transfer-Encoding on HTTP/1.0", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(), vec![400]),
        ("Transfer-Encoding: chunked, chunked", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n".to_vec(), vec![400]),
        ("chunked in two Transfer-Encoding headers", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(), vec![400]),
        ("empty chunk-size line", chunked(b"\r\n\r\n"), vec![200, 400]),
        ("chunk-size line of whitespace", chunked(b" \r\n\r\n"), vec![200, 400]),
        ("chunk extension without a size", chunked(b";x\r\n\r\n"), vec![200, 400]),
        ("bare LF ending a chunk-size line", chunked(b"3\nabc\r\n0\r\n\r\n"), vec![200, 400]),
        ("bare LF in a chunk extension", chunked(b"3;x\nabc\r\n0\r\n\r\n"), vec![200, 400]),
        ("bare CR in a chunk extension", chunked(b"3;x\ry\r\nabc\r\n0\r\n\r\n"), vec![200, 400]),
        ("chunk extension without a name", chunked(b"3;=x\r\nabc\r\n0\r\n\r\n"), vec![200, 400]),
        ("control byte in a chunk extension", chunked(b"3;x=\x01\r\nabc\r\n0\r\n\r\n"), vec![200, 400]),
        ("whitespace after a chunk size", chunked(b"3 \r\nabc\r\n0\r\n\r\n"), vec![200, 400]),
        ("chunk size over 64 bits", chunked(b"10000000000000003\r\nabc\r\n0\r\n\r\n"), vec![200, 400]),
        ("chunk size with 0x", chunked(b"0x3\r\nabc\r\n0\r\n\r\n"), vec![200, 400]),
        ("chunk size with a sign", chunked(b"+3\r\nabc\r\n0\r\n\r\n"), vec![200, 400]),
        ("bare LF after chunk data", chunked(b"3\r\nabc\n0\r\n\r\n"), vec![200, 400]),
        ("bare LF ending a trailer", chunked(b"0\r\nX: y\n\r\n"), vec![200, 400]),
        ("bare LF ending the trailers", chunked(b"0\r\n\n"), vec![200, 400]),
        ("bare CR in a trailer", chunked(b"0\r\nX: a\rb\r\n\r\n"), vec![200, 400]),
        ("trailer line without a colon", chunked(b"0\r\nnot a field\r\n\r\n"), vec![200, 400]),
        ("obs-fold in the trailers", chunked(b"0\r\nX: a\r\n b\r\n\r\n"), vec![200, 400]),
    ];
    let mut failures = Vec::new();
    for (name, request, expected) in &cases {
        let (lines, eof) = status_lines_for(addr, request);
        let want: Vec<String> = expected
            .iter()
            .map(|&code| format!("HTTP/1.1 {code} {}", reason(code)))
            .collect();
        if lines != want || !eof {
            failures.push(format!("{name}: got {lines:?}, closed: {eof}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // None of it disturbed anyone else.
    let mut s = connect(addr);
    s.write_all(PIPELINE).unwrap();
    assert_eq!(read_responses(&mut s, 4).0, vec![200; 4]);
    let closes = cases.len() as u64;
    wait_for("every close to be counted", || {
        total(&server, |s| s.closed_total()) == closes
    });
    // The two that asked to close end as eof; every error as protocol_error.
    assert_eq!(total(&server, |s| s.closed_for(CloseReason::Eof)), 2);
    assert_eq!(
        total(&server, |s| s.closed_for(CloseReason::ProtocolError)),
        closes - 2
    );
    // Each answer is counted under its status, the four pipelined 200s included.
    for code in [200, 400, 405, 431, 505] {
        let sent = cases
            .iter()
            .flat_map(|(_, _, statuses)| statuses)
            .filter(|&&c| c == code)
            .count() as u64
            + if code == 200 { 4 } else { 0 };
        let counted: u64 = (0..2)
            .map(|w| server.metrics().http_requests(w, code))
            .sum();
        assert_eq!(counted, sent, "responses counted as {code}");
    }
}

#[test]
fn a_bare_lf_split_across_reads_at_every_byte_still_gets_400_and_a_close() {
    let server = http_server(1, |_| {});
    let addr = server.local_addr();
    let cases: [(&[u8], Vec<&str>); 2] = [
        (
            b"GET / HTTP/1.1\r\nHost: t\nX: y\r\n\r\n",
            vec!["HTTP/1.1 400 Bad Request"],
        ),
        (
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3;x\nabc\r\n0\r\n\r\n",
            vec!["HTTP/1.1 200 OK", "HTTP/1.1 400 Bad Request"],
        ),
    ];
    let mut failures = Vec::new();
    for (request, want) in &cases {
        for split in 1..request.len() {
            let mut s = connect(addr);
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(&request[..split]).unwrap();
            s.flush().unwrap();
            std::thread::sleep(Duration::from_micros(300));
            // The server may have answered and shut its side already; it still reads.
            let _ = s.write_all(&request[split..]);
            let (raw, eof) = read_to_end(&mut s);
            let lines = status_lines(&raw);
            if &lines != want || !eof {
                failures.push(format!("split at {split}: got {lines:?}, closed: {eof}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn keep_alive_serves_many_requests_on_one_connection_and_http10_can_keep_alive() {
    let server = http_server(1, |_| {});
    let mut s = connect(server.local_addr());
    for _ in 0..200 {
        s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        assert_eq!(read_responses(&mut s, 1).0, vec![200]);
    }
    s.write_all(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .unwrap();
    let (st, raw, closed) = read_responses(&mut s, 1);
    assert_eq!(st, vec![200]);
    assert!(!closed && String::from_utf8_lossy(&raw).contains("Connection: keep-alive"));
    // A HEAD response has headers only (a response parser cannot know that, so read
    // up to the blank line and check nothing follows before the next response).
    s.write_all(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        raw.push(byte[0]);
    }
    assert!(String::from_utf8_lossy(&raw).contains("Content-Length: 13\r\n"));
    let (st, next, _) = read_responses(&mut s, 1);
    assert_eq!(st, vec![200]);
    assert!(
        next.starts_with(b"HTTP/1.1 200 OK"),
        "HEAD had no body before the next response"
    );
    wait_for("203 requests counted", || {
        server.metrics().http_requests(0, 200) == 203
    });
    assert_eq!(server.stats()[0].accepted, 1);
}

#[test]
fn expect_100_continue_gets_continue_then_the_response() {
    let server = http_server(1, |_| {});
    let mut s = connect(server.local_addr());
    s.write_all(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        .unwrap();
    let mut first = [0u8; 25];
    s.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(b"data").unwrap();
    assert_eq!(read_responses(&mut s, 1).0, vec![200]);
    // The body was consumed, not taken as the next request.
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    assert_eq!(read_responses(&mut s, 1).0, vec![200]);
}

#[test]
fn slowloris_gets_408_and_others_are_served_meanwhile() {
    let server = http_server(1, |c| c.http.header_timeout = Duration::from_millis(400));
    let addr = server.local_addr();
    // Before the connects: the server's timer starts when it registers the connection,
    // after the connect returns (CI once saw the 408 under 400 ms from an `Instant`
    // taken after them, the test thread descheduled in between).
    let start = Instant::now();
    let mut slow = connect(addr);
    let mut silent = connect(addr);
    // A head that trickles in and never completes.
    let mut fast = connect(addr);
    for piece in [
        &b"GET / HT"[..],
        b"TP/1.1\r\n",
        b"Host: t\r\n",
        b"X-A: 1\r\n",
    ] {
        slow.write_all(piece).unwrap();
        fast.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        assert_eq!(read_responses(&mut fast, 1).0, vec![200]);
        std::thread::sleep(Duration::from_millis(60));
    }
    let (statuses, closed) = (read_responses(&mut slow, usize::MAX).0, true);
    assert_eq!(statuses, vec![408]);
    assert!(closed);
    // The worker's clock counts whole milliseconds, so the timer may fire up to 1 ms
    // before 400 ms of real time have passed.
    assert!(start.elapsed() >= Duration::from_millis(399));
    // A connection that never sends anything gets the same.
    assert_eq!(read_responses(&mut silent, usize::MAX).0, vec![408]);
    // Between requests a keep-alive connection is not timed out by the header timer.
    fast.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(read_responses(&mut fast, 1).0, vec![200]);
    wait_for("both 408 closes counted", || {
        total(&server, |s| s.closed_for(CloseReason::HeaderTimeout)) == 2
    });
    assert_eq!(server.metrics().http_requests(0, 408), 2);
}

#[test]
fn configured_response_status_body_and_headers() {
    let server = http_server(1, |c| {
        c.http.status = 503;
        c.http.body = b"{\"busy\":true}".to_vec();
        c.http.content_type = "application/json".into();
        c.http.headers = vec![
            ("Retry-After".into(), "5".into()),
            ("X-Edge".into(), "yes".into()),
        ];
    });
    let mut s = connect(server.local_addr());
    s.write_all(b"GET /anything HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let (st, raw, _) = read_responses(&mut s, 1);
    assert_eq!(st, vec![503]);
    assert_eq!(
        blank_dates(&raw),
        "HTTP/1.1 503 Service Unavailable\r\nServer: edgepoll\r\nContent-Type: application/json\r\nContent-Length: 13\r\nRetry-After: 5\r\nX-Edge: yes\r\nDate: *\r\n\r\n{\"busy\":true}"
    );
}

#[test]
fn a_client_that_pipelines_without_reading_is_paused_and_then_served_fully() {
    const REQUESTS: usize = 50_000;
    let server = http_server(1, |c| c.max_pending_bytes = 64 * 1024);
    let mut s = connect(server.local_addr());
    let mut writer = s.try_clone().unwrap();
    let w = std::thread::spawn(move || {
        let req = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n".repeat(1000);
        for _ in 0..REQUESTS / 1000 {
            writer.write_all(&req).unwrap();
        }
    });
    wait_for("reading to pause", || {
        server.stats()[0].backpressure_pauses >= 1
    });
    let (statuses, _, closed) = read_responses(&mut s, REQUESTS);
    w.join().unwrap();
    assert!(!closed);
    assert_eq!(statuses.len(), REQUESTS);
    assert!(statuses.iter().all(|&c| c == 200));
    // The cap is soft by at most one read's worth of responses.
    let peak = server.stats()[0].peak_pending_bytes;
    assert!(
        peak <= 64 * 1024 + 64 * 1024 / 26 * 120,
        "peak outbound {peak}"
    );
}

#[test]
fn drain_closes_idle_keep_alive_connections() {
    let server = http_server(1, |c| c.drain_timeout = Duration::from_secs(5));
    let mut s = connect(server.local_addr());
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    assert_eq!(read_responses(&mut s, 1).0, vec![200]);
    server.begin_drain();
    let (rest, eof) = read_to_end(&mut s);
    assert!(rest.is_empty() && eof);
    drop(s);
    server.join();
}

#[test]
fn wrk_style_load_from_edgeload_gets_only_200s() {
    let server = http_server(2, |_| {});
    let url = format!("http://{}/", server.local_addr());
    let mut c = edgepoll::load::LoadConfig::new(edgepoll::load::Target::parse(&url).unwrap(), &url);
    c.connections = 8;
    c.depth = 16;
    c.duration = Duration::from_millis(800);
    let r = edgepoll::load::run(&c, |_, _| {}).unwrap();
    assert_eq!(r.stats.errors.total(), 0, "{:?}", r.stats.errors);
    assert!(r.stats.requests > 1000);
    assert_eq!(r.stats.status[2], r.stats.requests);
}
