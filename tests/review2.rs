//! Second hostile review: timers after the wheel's hint and arm fast path, lingering
//! closes, bare LF, the per-worker room share, relayed pair endings.

mod util;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use util::*;

/// Reads until the stream ends or `limit` passes; returns bytes, ending, elapsed.
fn read_end_within(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, Ending, Duration) {
    s.set_read_timeout(Some(limit)).unwrap();
    let start = Instant::now();
    let (b, e) = read_until_end(s);
    (b, e, start.elapsed())
}

// ---------------------------------------------------------------- timers

/// Idle timeout in echo mode still fires after many re-arms (traffic every 40 ms for
/// 1.5 s), with a far wheel span (long linger next to a 300 ms idle).
#[test]
fn t01_echo_idle_timeout_fires_after_many_rearms() {
    let server = echo_server(1, |c| c.idle_timeout = Some(Duration::from_millis(300)));
    let mut s = connect(server.local_addr());
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(1500) {
        echo_roundtrip(&mut s, b"x");
        std::thread::sleep(Duration::from_millis(40));
    }
    let (_, ending, took) = read_end_within(&mut s, Duration::from_secs(5));
    assert!(
        took < Duration::from_secs(2),
        "idle close took {took:?} ({ending:?})"
    );
}

/// http: idle 300 ms next to a 40 s header timeout (the wheel clamps the header
/// deadline); the idle timeout fires after keep-alive traffic.
#[test]
fn t02_http_idle_timeout_with_far_header_timeout() {
    let server = http_server(1, |c| {
        c.idle_timeout = Some(Duration::from_millis(300));
        c.http.header_timeout = Duration::from_secs(60);
    });
    let mut s = connect(server.local_addr());
    for _ in 0..20 {
        s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
        let (st, _, closed) = read_responses(&mut s, 1);
        assert_eq!((st, closed), (vec![200], false));
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, ending, took) = read_end_within(&mut s, Duration::from_secs(5));
    assert!(
        took < Duration::from_secs(2),
        "idle close took {took:?} ({ending:?})"
    );
}

/// The server sat idle (no connection) for longer than the wheel's whole span, then a
/// connection's idle timeout still fires on time. Span: 10 ms tick x (5 s / 10 + 3).
#[test]
fn t03_idle_timeout_after_the_server_sat_idle_past_the_span() {
    let server = echo_server(1, |c| c.idle_timeout = Some(Duration::from_millis(300)));
    {
        let mut s = connect(server.local_addr());
        echo_roundtrip(&mut s, b"warm");
    }
    std::thread::sleep(Duration::from_millis(5_500));
    let mut s = connect(server.local_addr());
    echo_roundtrip(&mut s, b"x");
    let (_, ending, took) = read_end_within(&mut s, Duration::from_secs(5));
    assert!(
        took < Duration::from_secs(2),
        "idle close took {took:?} ({ending:?})"
    );
}

/// Slowloris: one byte every 100 ms with idle 300 ms; the header timeout (1.5 s) gives
/// 408.
#[test]
fn t04_slowloris_gets_408_next_to_short_idle() {
    let server = http_server(1, |c| {
        c.idle_timeout = Some(Duration::from_millis(300));
        c.http.header_timeout = Duration::from_millis(1500);
    });
    let mut s = connect(server.local_addr());
    let start = Instant::now();
    let head = b"GET / HTTP/1.1\r\nHost: a\r\nX-Long: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut got = Vec::new();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    for &b in head.iter().cycle().take(100) {
        if s.write_all(&[b]).is_err() {
            break;
        }
        let mut buf = [0u8; 512];
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(_) => break,
        }
        if !got.is_empty() || start.elapsed() > Duration::from_secs(6) {
            break;
        }
    }
    let took = start.elapsed();
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 408 "),
        "after {took:?}: {text:?}"
    );
    assert!(took < Duration::from_secs(3), "{took:?}");
}

/// The connect timeout to a black hole still fires, next to a short idle timeout.
#[test]
fn t05_connect_timeout_to_a_blackhole_fires() {
    let hole = blackhole();
    let server = relay_server(1, vec![hole.addr], |c| {
        c.relay.connect_timeout = Duration::from_millis(400);
        c.idle_timeout = Some(Duration::from_secs(60));
    });
    let mut s = connect(server.local_addr());
    s.write_all(b"hello").unwrap();
    let (_, ending, took) = read_end_within(&mut s, Duration::from_secs(8));
    assert!(took < Duration::from_secs(3), "took {took:?} ({ending:?})");
}

/// A lingering close after a 400 whose response the client never reads (a big body
/// that stays in the outbound buffer) still ends: reset within LINGER_MS + margin.
#[test]
fn t06_error_response_never_read_is_reset_after_linger() {
    let server = http_server(1, |c| {
        c.http.body = vec![b'z'; 8 << 20];
        c.max_pending_bytes = 64 << 20;
        c.idle_timeout = None;
    });
    let s = connect(server.local_addr());
    let mut w = &s;
    // Many requests for the big body then a bad one; never read.
    for _ in 0..4 {
        w.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
    }
    w.write_all(b"BAD\n\n").unwrap();
    wait_for("the connection to register", || {
        total(&server, |w| w.active as u64) == 1
    });
    let start = Instant::now();
    wait_for("the connection to be closed", || {
        total(&server, |w| w.active as u64) == 0 || start.elapsed() > Duration::from_secs(12)
    });
    let took = start.elapsed();
    assert!(took < Duration::from_secs(9), "still open after {took:?}");
}

// ---------------------------------------------------------------- bare LF

fn status_of(pieces: &[&[u8]], split: bool) -> (String, bool) {
    let server = http_server(1, |_| {});
    let mut s = connect(server.local_addr());
    for p in pieces {
        if split {
            for b in p.iter() {
                s.write_all(&[*b]).unwrap();
                std::thread::sleep(Duration::from_millis(2));
            }
        } else {
            s.write_all(p).unwrap();
        }
    }
    let (raw, ending, _) = read_end_within(&mut s, Duration::from_secs(5));
    (
        String::from_utf8_lossy(&raw).into_owned(),
        ending == Ending::Fin,
    )
}

#[test]
fn t07_bare_lf_anywhere_gets_400() {
    let cases: &[&[u8]] = &[
        b"GET / HTTP/1.1\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\n\n",
        b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n",
        b"\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"\r\n\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\n\r\n",
        b"GET / HTTP/1.1\r\n\n",
        b"GET / HTTP/1.0\n\n",
    ];
    let mut bad = Vec::new();
    for &case in cases {
        for split in [false, true] {
            let (text, _) = status_of(&[case], split);
            if !text.starts_with("HTTP/1.1 400 ") {
                bad.push(format!(
                    "{:?} split={split}: {:?}",
                    String::from_utf8_lossy(case),
                    text.lines().next()
                ));
            }
        }
    }
    // After a body: the next request begins with a bare LF.
    for split in [false, true] {
        let (text, _) = status_of(
            &[b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nab\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"],
            split,
        );
        if !(text.starts_with("HTTP/1.1 200 ")
            && text.matches("HTTP/1.1 ").count() == 2
            && text.contains("HTTP/1.1 400 "))
        {
            bad.push(format!(
                "after a body split={split}: {:?}",
                text.lines()
                    .filter(|l| l.starts_with("HTTP"))
                    .collect::<Vec<_>>()
            ));
        }
    }
    assert!(bad.is_empty(), "{bad:#?}");
}

// ---------------------------------------------------------------- room share

/// `--max-buffered-bytes` tiny with one worker: an echo connection still makes
/// progress (8 MiB round trip, client reading and writing concurrently).
#[test]
fn t08_echo_progresses_with_a_tiny_global_room() {
    let server = echo_server(1, |c| c.max_buffered_bytes = 1);
    let s = connect(server.local_addr());
    let mut r = s.try_clone().unwrap();
    let n = 8 << 20;
    let writer = std::thread::spawn(move || {
        let mut w = &s;
        w.write_all(&pattern(5, 0, n)).unwrap();
        s
    });
    r.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = vec![0u8; n];
    r.read_exact(&mut got).expect("the echo made progress");
    assert_same(&pattern(5, 0, n), &got);
    drop(writer.join());
}

/// Same with four workers and one connection: the share is room/4.
#[test]
fn t09_echo_progresses_with_a_tiny_room_many_workers() {
    let server = echo_server(4, |c| c.max_buffered_bytes = 3);
    let s = connect(server.local_addr());
    let mut r = s.try_clone().unwrap();
    let n = 8 << 20;
    let writer = std::thread::spawn(move || {
        let mut w = &s;
        w.write_all(&pattern(6, 0, n)).unwrap();
        s
    });
    r.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = vec![0u8; n];
    r.read_exact(&mut got).expect("the echo made progress");
    assert_same(&pattern(6, 0, n), &got);
    drop(writer.join());
}

/// http with a tiny room, 1 worker: pipelined requests for a 256 KiB body all answered.
#[test]
fn t10_http_pipelined_progresses_with_a_tiny_room() {
    let server = http_server(1, |c| {
        c.max_buffered_bytes = 1;
        c.http.body = vec![b'q'; 256 << 10];
    });
    let s = connect(server.local_addr());
    let mut r = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut w = &s;
        w.write_all(&b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".repeat(64))
            .unwrap();
        s
    });
    r.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (st, _, closed) = read_responses(&mut r, 64);
    assert_eq!((st.len(), closed), (64, false));
    drop(writer.join());
}

/// relay with a tiny room, 1 worker: 8 MiB through both ways.
#[test]
fn t11_relay_progresses_with_a_tiny_room() {
    for splice in [false, true] {
        let n = 8 << 20;
        let (up, t) = upstream_once(move |mut s| {
            let mut r = s.try_clone().unwrap();
            let echo = std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                let mut total = 0;
                loop {
                    match r.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => {
                            total += k;
                            if s.write_all(&buf[..k]).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = s.shutdown(Shutdown::Write);
                total
            });
            echo.join().unwrap()
        });
        let server = relay_server(1, vec![up], |c| {
            c.max_buffered_bytes = 1;
            c.relay.splice = splice;
        });
        let s = connect(server.local_addr());
        let mut r = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let mut w = &s;
            w.write_all(&pattern(7, 0, n)).unwrap();
            w.flush().unwrap();
            s.shutdown(Shutdown::Write).unwrap();
            s
        });
        r.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let (got, ending) = read_until_end(&mut r);
        assert_eq!((got.len(), ending), (n, Ending::Fin), "splice={splice}");
        assert_same(&pattern(7, 0, n), &got);
        drop(writer.join());
        t.join().unwrap();
    }
}

// ---------------------------------------------------------------- relay endings

/// Client half-closes; upstream reads everything, answers fully and closes: FIN both
/// ways, whatever the order and with or without splice.
#[test]
fn t12_relay_half_close_then_full_answer_ends_with_fin() {
    for splice in [false, true] {
        for delay in [0u64, 100] {
            let (up, t) = upstream_once(move |mut s| {
                let mut got = Vec::new();
                let (_, ending) = {
                    let mut buf = vec![0u8; 65536];
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) => break (0, Ending::Fin),
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                            Err(e) => break (0, Ending::Error(e.kind())),
                        }
                    }
                };
                std::thread::sleep(Duration::from_millis(delay));
                s.write_all(&pattern(9, 0, 1 << 20)).unwrap();
                drop(s);
                (got.len(), ending)
            });
            let server = relay_server(1, vec![up], |c| c.relay.splice = splice);
            let mut s = connect(server.local_addr());
            s.write_all(&pattern(8, 0, 300_000)).unwrap();
            s.shutdown(Shutdown::Write).unwrap();
            let (got, ending) = read_until_end(&mut s);
            let (up_got, up_ending) = t.join().unwrap();
            assert_eq!(
                (up_got, up_ending, got.len(), ending),
                (300_000, Ending::Fin, 1 << 20, Ending::Fin),
                "splice={splice} delay={delay}"
            );
        }
    }
}

// ---------------------------------------------------------------- linger vs a reader

/// Reads at about `rate` bytes/s until the stream ends; returns bytes and ending.
fn read_slowly(s: &mut TcpStream, rate: usize) -> (Vec<u8>, Ending) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let chunk = rate / 20;
    let mut out = Vec::new();
    let mut buf = vec![0u8; chunk];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, Ending::Fin),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => return (out, Ending::Error(e.kind())),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Twelve pipelined requests for a 1 MiB body, then one with a bare LF (400). The
/// client reads all the time at ~1 MB/s, so it needs ~12 s for the twelve valid
/// responses; the lingering close set when the 400 was queued resets it 5 s later,
/// destroying valid 200 responses it was busy taking.
#[test]
fn a_slow_steady_reader_behind_a_400_gets_every_valid_response() {
    let server = http_server(1, |c| {
        c.http.body = vec![b'z'; 1 << 20];
        c.max_pending_bytes = 64 << 20;
        c.max_buffered_bytes = 64 << 20;
    });
    let mut s = connect(server.local_addr());
    let mut req = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".repeat(12);
    req.extend_from_slice(b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n");
    s.write_all(&req).unwrap();
    let start = Instant::now();
    let (got, ending) = read_slowly_for(&mut s, 1_000_000, Duration::from_secs(8));
    let took = start.elapsed();
    // By 8 s a steady reader at 1 MB/s must still be receiving (not reset).
    assert!(
        ending == Ending::Error(ErrorKind::WouldBlock) || ending == Ending::Fin,
        "after {took:?}: {} bytes, {} complete 200s, then {ending:?}",
        got.len(),
        String::from_utf8_lossy(&got)
            .matches("HTTP/1.1 200 ")
            .count()
    );
}

/// [`read_slowly`], stopping (as `Error(WouldBlock)`) after `limit`.
fn read_slowly_for(s: &mut TcpStream, rate: usize, limit: Duration) -> (Vec<u8>, Ending) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let start = Instant::now();
    let chunk = rate / 20;
    let mut out = Vec::new();
    let mut buf = vec![0u8; chunk];
    loop {
        if start.elapsed() > limit {
            return (out, Ending::Error(ErrorKind::WouldBlock));
        }
        match s.read(&mut buf) {
            Ok(0) => return (out, Ending::Fin),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => return (out, Ending::Error(e.kind())),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A client reads steadily (about 3 s for all of it) the 4 MiB its upstream sent,
/// all of which sits in the kernel's send queues once the relay has moved it, with
/// `--idle-timeout 1s`. The relay itself moves nothing for that time, but the client is
/// taking bytes: the pair is not idle, and the client gets every byte. When the
/// upstream then finished cleanly the client also gets FIN; when it reset, the client
/// still gets every byte it sent before the reset (within the 5 s a failed pair has).
/// The review found the pair reset at about 1.1 s, after 1.25 MiB.
fn a_client_draining_the_kernel_queue_is_not_idle(splice: bool, upstream_resets: bool) {
    use std::os::fd::AsFd;
    let n = 4 << 20;
    let (up, t) = upstream_once(move |mut s| {
        s.write_all(&pattern(13, 0, n)).unwrap();
        if upstream_resets {
            std::thread::sleep(Duration::from_millis(200));
            edgepoll::sys::socket::set_linger_zero(s.as_fd()).unwrap();
        }
    });
    let server = relay_server(1, vec![up], |c| {
        c.relay.splice = splice;
        c.idle_timeout = Some(Duration::from_secs(1));
        c.max_pending_bytes = 64 << 20;
        c.max_buffered_bytes = 64 << 20;
    });
    let mut s = connect(server.local_addr());
    let start = Instant::now();
    let (got, ending) = read_slowly(&mut s, 1_300_000);
    t.join().unwrap();
    let took = start.elapsed();
    assert!(
        got.len() == n,
        "after {took:?}: {} of the {n} bytes the upstream sent, {ending:?}",
        got.len()
    );
}

#[test]
fn a_client_draining_the_kernel_queue_of_a_failed_pair_gets_every_byte() {
    a_client_draining_the_kernel_queue_is_not_idle(false, true);
}

#[test]
fn a_client_draining_the_kernel_queue_of_a_finished_pair_gets_every_byte() {
    a_client_draining_the_kernel_queue_is_not_idle(false, false);
}

#[test]
fn a_client_draining_the_kernel_queue_of_a_finished_pair_gets_every_byte_with_splice() {
    a_client_draining_the_kernel_queue_is_not_idle(true, false);
}
