//! Micro-benchmarks of the pieces on or near the per-message path:
//! publishing a worker's counters, the outbound buffer, http mode's request handling
//! and response encoding, the PROXY v2 header, the echo pattern used by edgeload, and
//! its HTTP response parser.
//!
//!     cargo bench --bench hot_path

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use edgepoll::config::HttpConfig;
use edgepoll::conn::Outbound;
use edgepoll::load::http::ResponseParser;
use edgepoll::load::pattern::Pattern;
use edgepoll::metrics::{Counters, Metrics};
use edgepoll::mode::http::{Responder, Session};
use edgepoll::{Config, Mode};

fn publish(c: &mut Criterion) {
    let mut config = Config::new(Mode::Echo);
    config.workers = 2;
    let metrics = Metrics::new(&config).unwrap();
    let mut worker = metrics.worker(0);
    let mut counters = Counters::default();
    // One publish with every counter changed: the cost a busy worker pays at most
    // ten times a second.
    c.bench_function("metrics/publish_all_changed", |b| {
        b.iter(|| {
            counters.received += 6400;
            counters.sent += 6400;
            counters.accepted += 1;
            counters.closed[0] += 1;
            counters.active += 1;
            worker.observe_duration(0.5);
            worker.publish(black_box(&mut counters));
        })
    });
    // What a worker pays per message instead: plain adds.
    c.bench_function("metrics/count_one_message", |b| {
        b.iter(|| {
            counters.received += black_box(64);
            counters.sent += black_box(64);
        })
    });
}

fn outbound(c: &mut Criterion) {
    let data = vec![7u8; 64];
    let mut g = c.benchmark_group("outbound");
    g.throughput(Throughput::Bytes(64));
    g.bench_function("push_consume_64B", |b| {
        let mut out = Outbound::from_slice(&data);
        b.iter(|| {
            out.push(black_box(&data));
            out.consume(64);
        })
    });
    g.finish();
}

fn pattern(c: &mut Criterion) {
    let p = Pattern::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut g = c.benchmark_group("pattern");
    g.throughput(Throughput::Bytes(buf.len() as u64));
    g.bench_function("fill_64KiB", |b| {
        b.iter(|| p.fill(black_box(3), 12_345, &mut buf))
    });
    p.fill(3, 12_345, &mut buf);
    g.bench_function("verify_64KiB", |b| {
        b.iter(|| assert!(p.first_mismatch(black_box(3), 12_345, &buf).is_none()))
    });
    g.finish();
}

fn http_response(c: &mut Criterion) {
    let one: &[u8] = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Fri, 27 Nov 2026 09:00:00 GMT\r\nContent-Type: text/plain\r\nContent-Length: 13\r\nConnection: keep-alive\r\n\r\nHello, World!";
    let sixteen = one.repeat(16);
    let mut g = c.benchmark_group("http_response");
    g.throughput(Throughput::Elements(16));
    g.bench_function("parse_16_pipelined", |b| {
        let mut parser = ResponseParser::new();
        b.iter(|| {
            let mut pos = 0;
            let mut n = 0;
            while let Ok((used, Some(_))) = parser.parse(&sixteen[pos..]) {
                pos += used;
                n += 1;
            }
            assert_eq!(n, 16);
        })
    });
    g.finish();
}

fn http_request(c: &mut Criterion) {
    let responder = Responder::new(&HttpConfig::default());
    // What wrk sends, 16 pipelined: parse each head, answer each into one batch.
    let one: &[u8] = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n";
    let sixteen = one.repeat(16);
    let mut g = c.benchmark_group("http_request");
    g.throughput(Throughput::Elements(16));
    g.bench_function("feed_16_pipelined", |b| {
        let mut session = Session::default();
        let mut out = Vec::with_capacity(16 * 256);
        let mut counts = [0u64; 6];
        b.iter(|| {
            out.clear();
            let f = responder.feed(&mut session, black_box(&sixteen), &mut out, &mut counts);
            assert_eq!(f.consumed, sixteen.len());
        })
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("feed_one", |b| {
        let mut session = Session::default();
        let mut out = Vec::with_capacity(256);
        let mut counts = [0u64; 6];
        b.iter(|| {
            out.clear();
            responder.feed(&mut session, black_box(one), &mut out, &mut counts)
        })
    });
    g.finish();
    // The Date line, rewritten once a second per worker.
    let mut responder = Responder::new(&HttpConfig::default());
    let mut t = std::time::SystemTime::now();
    c.bench_function("http_response/refresh_date", |b| {
        b.iter(|| {
            t += std::time::Duration::from_secs(1);
            responder.refresh_date(black_box(t));
        })
    });
}

fn proxy_header(c: &mut Criterion) {
    let src: std::net::SocketAddr = "192.0.2.1:51000".parse().unwrap();
    let dst: std::net::SocketAddr = "198.51.100.7:7001".parse().unwrap();
    let mut out = Vec::with_capacity(64);
    c.bench_function("proxy_v2/encode_ipv4", |b| {
        b.iter(|| {
            out.clear();
            edgepoll::mode::proxy::encode(black_box(src), black_box(dst), &mut out);
        })
    });
}

criterion_group!(
    benches,
    publish,
    outbound,
    http_request,
    proxy_header,
    pattern,
    http_response
);
criterion_main!(benches);
