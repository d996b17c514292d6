//! The metrics endpoint and the exactness of the published counters.

mod util;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use util::*;

fn server_with_metrics(workers: usize) -> edgepoll::Server {
    echo_server(workers, |c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap())
    })
}

#[test]
fn a_scrape_shows_exact_counts_after_known_traffic() {
    const M: usize = 10;
    let server = server_with_metrics(2);
    let addr = server.local_addr();
    let metrics = server.metrics_addr().unwrap();
    let mut k = 0u64;
    for i in 0..M {
        let mut c = connect(addr);
        let data = pattern(i as u64, 0, 1000 + i * 137);
        echo_roundtrip(&mut c, &data);
        k += data.len() as u64;
    }
    // All closed (dropped above); wait one publish interval past the last close.
    wait_for("every close and byte to be published", || {
        total(&server, |s| s.closed_total()) == M as u64
            && total(&server, |s| s.received_bytes) == k
            && total(&server, |s| s.sent_bytes) == k
    });
    let (status, head, body) = http_get(metrics, "/metrics");
    assert_eq!(status, 200);
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert_eq!(
        sum_samples(&body, "edgepoll_connections_accepted_total"),
        M as f64
    );
    assert_eq!(
        sum_samples(&body, "edgepoll_connections_closed_total"),
        M as f64
    );
    assert_eq!(
        sample(
            &body,
            "edgepoll_connections_closed_total{reason=\"eof\",worker=\"0\"}"
        ),
        Some((M / 2) as f64)
    );
    assert_eq!(sum_samples(&body, "edgepoll_connections_active"), 0.0);
    assert_eq!(
        sum_samples(&body, "edgepoll_received_bytes_total"),
        k as f64
    );
    assert_eq!(sum_samples(&body, "edgepoll_sent_bytes_total"), k as f64);
    assert_eq!(
        sample(&body, "edgepoll_connection_duration_seconds_count"),
        Some(M as f64)
    );
    assert_eq!(
        sample(
            &body,
            "edgepoll_build_info{mode=\"echo\",version=\"0.1.0\"}"
        ),
        Some(1.0)
    );
    for family in [
        "process_open_fds",
        "process_max_fds",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_start_time_seconds",
    ] {
        assert!(body.contains(&format!("\n{family} ")), "missing {family}");
    }
    // Every family has HELP and TYPE lines.
    for line in body.lines().filter(|l| l.starts_with("edgepoll_")) {
        let name = line.split(['{', ' ']).next().unwrap();
        let base = name
            .trim_end_matches("_bucket")
            .trim_end_matches("_sum")
            .trim_end_matches("_count");
        assert!(
            body.contains(&format!("# TYPE {base} ")),
            "no TYPE for {name}"
        );
    }
}

#[test]
fn active_connections_are_a_live_gauge() {
    let server = server_with_metrics(1);
    let conns: Vec<_> = (0..3).map(|_| connect(server.local_addr())).collect();
    let metrics = server.metrics_addr().unwrap();
    wait_for("three active", || {
        sample(
            &http_get(metrics, "/metrics").2,
            "edgepoll_connections_active{worker=\"0\"}",
        ) == Some(3.0)
    });
    drop(conns);
    wait_for("zero active", || {
        sample(
            &http_get(metrics, "/metrics").2,
            "edgepoll_connections_active{worker=\"0\"}",
        ) == Some(0.0)
    });
}

#[test]
fn health_readiness_and_errors() {
    let server = server_with_metrics(1);
    let m = server.metrics_addr().unwrap();
    assert_eq!(
        http_get(m, "/healthz"),
        (200, http_get(m, "/healthz").1, "ok\n".into())
    );
    assert_eq!(http_get(m, "/readyz").0, 200);
    assert_eq!(http_get(m, "/nope").0, 404);
    assert_eq!(http_get(m, "/metrics?x=1").0, 200);

    let raw = |req: &[u8]| {
        let mut s = connect(m);
        s.write_all(req).unwrap();
        let (resp, _) = read_to_end(&mut s);
        String::from_utf8(resp).unwrap()
    };
    let post = raw(b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        post.starts_with("HTTP/1.1 405 ") && post.contains("Allow: GET, HEAD"),
        "{post}"
    );
    assert!(raw(b"GARBAGE\x01\r\n\r\n").starts_with("HTTP/1.1 400 "));
    let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(10_000));
    assert!(raw(huge.as_bytes()).starts_with("HTTP/1.1 400 "));
    let head = raw(b"HEAD /metrics HTTP/1.1\r\n\r\n");
    assert!(
        head.starts_with("HTTP/1.1 200 ") && head.ends_with("\r\n\r\n"),
        "{head}"
    );

    server.begin_drain();
    assert_eq!(http_get(m, "/readyz").0, 503);
    assert_eq!(http_get(m, "/healthz").0, 200);
}

#[test]
fn a_stalled_scrape_client_is_cut_and_does_not_block_others() {
    let server = server_with_metrics(1);
    let m = server.metrics_addr().unwrap();
    let mut stalled = connect(m);
    stalled.write_all(b"GET /metr").unwrap();
    // Others are served meanwhile.
    assert_eq!(http_get(m, "/metrics").0, 200);
    let start = Instant::now();
    let mut resp = String::new();
    stalled.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 408 "), "{resp}");
    let waited = start.elapsed();
    assert!(waited < edgepoll::metrics::endpoint::CLIENT_TIMEOUT + Duration::from_secs(5));
}

#[test]
fn metrics_can_be_turned_off() {
    let server = echo_server(1, |c| c.metrics_listen = None);
    assert!(server.metrics_addr().is_none());
}

#[test]
fn scrapes_succeed_while_idle_and_trickling_clients_hold_the_port() {
    let server = server_with_metrics(1);
    let m = server.metrics_addr().unwrap();
    // About 1,100 descriptors on the client side and at most MAX_CLIENTS on the
    // server's: far below the 20,000 the test machines allow.
    let idle = Crowd::idle(m, 1000);
    let trickling = Crowd::trickling(m, 100, Duration::from_secs(2));
    // Four scrapes over 6 s: the last comes after the first clients' deadlines, when
    // the crowds are replacing what the endpoint has cut.
    for i in 0..4 {
        if i > 0 {
            std::thread::sleep(Duration::from_secs(2));
        }
        let (status, head, body) = http_get(m, "/metrics");
        assert_eq!(status, 200, "scrape {i}: {head}\r\n\r\n{body}");
        // Real metric text: nobody has connected to the echo port.
        assert_eq!(
            sample(&body, "edgepoll_connections_accepted_total{worker=\"0\"}"),
            Some(0.0),
            "scrape {i}: {body}"
        );
    }
    let opened = idle.stop() + trickling.stop();
    assert!(opened >= 1100, "the crowd opened only {opened} connections");
}

#[test]
fn a_client_sending_one_byte_at_a_time_is_cut_at_its_deadline() {
    use std::io::ErrorKind::WouldBlock;
    let server = server_with_metrics(1);
    // Started before connecting, so it precedes the accept the deadline counts from.
    let start = Instant::now();
    let mut s = connect(server.metrics_addr().unwrap());
    s.write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ").unwrap();
    s.set_nonblocking(true).unwrap();
    let timeout = edgepoll::metrics::endpoint::CLIENT_TIMEOUT;
    let mut resp = Vec::new();
    let mut buf = [0u8; 512];
    let cut = loop {
        assert!(
            start.elapsed() < timeout + PATIENCE,
            "still open after {:?}",
            start.elapsed()
        );
        match s.read(&mut buf) {
            Ok(0) => break start.elapsed(),
            Ok(n) => resp.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == WouldBlock => {}
            // A byte that reached the closed socket is answered with a reset.
            Err(_) => break start.elapsed(),
        }
        if s.write(b"a").is_err() {
            break start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(cut >= timeout, "cut after {cut:?}, before its deadline");
    let resp = String::from_utf8_lossy(&resp);
    assert!(
        resp.is_empty() || resp.starts_with("HTTP/1.1 408 "),
        "{resp}"
    );
}

#[test]
fn clients_that_never_read_their_response_do_not_block_scrapes() {
    let server = server_with_metrics(1);
    let m = server.metrics_addr().unwrap();
    // More than MAX_CLIENTS, so that some of them are pushed out to make room.
    let silent: Vec<_> = (0..600)
        .map(|_| {
            let mut s = connect(m);
            s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
            s
        })
        .collect();
    for _ in 0..3 {
        let (status, _, body) = http_get(m, "/metrics");
        assert_eq!(status, 200);
        assert_eq!(
            sample(&body, "edgepoll_connections_accepted_total{worker=\"0\"}"),
            Some(0.0)
        );
    }
    drop(silent);
}
