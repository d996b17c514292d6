//! Echo mode over real loopback sockets: exact bytes, exact counters.

mod util;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgepoll::CloseReason;
use util::*;

#[test]
fn two_hundred_clients_with_mixed_payloads_get_every_byte_back() {
    let server = echo_server(2, |_| {});
    let addr = server.local_addr();
    let clients: Vec<_> = (0..200u64)
        .map(|id| {
            std::thread::spawn(move || {
                let mut stream = connect(addr);
                let mut offset = 0u64;
                // Sizes from 1 byte to 96 KiB, different for every client.
                let sizes = [1usize, 7, 64, 1000, 4096, 16_384, 65_537, 98_304];
                let mut sent = 0;
                for round in 0..8 {
                    let size = sizes[(id as usize + round) % sizes.len()];
                    let data = pattern(id, offset, size);
                    // Write and read concurrently so large payloads cannot deadlock.
                    let mut writer = stream.try_clone().unwrap();
                    let to_send = data.clone();
                    let w = std::thread::spawn(move || writer.write_all(&to_send).unwrap());
                    let mut back = vec![0u8; size];
                    stream.read_exact(&mut back).unwrap();
                    w.join().unwrap();
                    assert_same(&data, &back);
                    offset += size as u64;
                    sent += size;
                }
                sent
            })
        })
        .collect();
    let expected: usize = clients
        .into_iter()
        .map(|c| c.join().expect("client ok"))
        .sum();
    wait_for("every connection and byte to be counted", || {
        total(&server, |s| s.closed_total()) == 200
            && total(&server, |s| s.received_bytes) == expected as u64
            && total(&server, |s| s.sent_bytes) == expected as u64
    });
    let stats = server.stats();
    assert_eq!(stats.iter().map(|s| s.accepted).sum::<u64>(), 200);
    assert!(
        stats.iter().all(|s| s.accepted == 100),
        "round-robin over 2 workers: {stats:?}"
    );
    assert_eq!(total(&server, |s| s.received_bytes), expected as u64);
    assert_eq!(total(&server, |s| s.sent_bytes), expected as u64);
    assert_eq!(total(&server, |s| s.closed_for(CloseReason::Eof)), 200);
    assert_eq!(stats.iter().map(|s| s.active).sum::<i64>(), 0);
}

#[test]
fn a_64_mib_stream_comes_back_intact() {
    const TOTAL: usize = 64 << 20;
    const CHUNK: usize = 1 << 20;
    let server = echo_server(2, |_| {});
    let mut stream = connect(server.local_addr());
    let mut writer = stream.try_clone().unwrap();
    let w = std::thread::spawn(move || {
        for i in 0..TOTAL / CHUNK {
            writer
                .write_all(&pattern(42, (i * CHUNK) as u64, CHUNK))
                .unwrap();
        }
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut buf = vec![0u8; CHUNK];
    for i in 0..TOTAL / CHUNK {
        stream.read_exact(&mut buf).unwrap();
        assert_same(&pattern(42, (i * CHUNK) as u64, CHUNK), &buf);
    }
    w.join().unwrap();
    let (rest, eof) = read_to_end(&mut stream);
    assert!(
        rest.is_empty() && eof,
        "{} extra bytes, clean eof: {eof}",
        rest.len()
    );
    wait_for("the close and every byte to be counted", || {
        total(&server, |s| s.closed_total()) == 1
            && total(&server, |s| s.received_bytes) == TOTAL as u64
            && total(&server, |s| s.sent_bytes) == TOTAL as u64
    });
}

#[test]
fn half_close_gets_every_byte_back_then_eof() {
    let server = echo_server(1, |_| {});
    let mut stream = connect(server.local_addr());
    let data = pattern(7, 0, 1 << 20);
    let mut writer = stream.try_clone().unwrap();
    let to_send = data.clone();
    let w = std::thread::spawn(move || {
        writer.write_all(&to_send).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let (back, eof) = read_to_end(&mut stream);
    w.join().unwrap();
    assert!(eof, "the server closes cleanly after the last byte");
    assert_same(&data, &back);
    wait_for("an eof close", || {
        total(&server, |s| s.closed_for(CloseReason::Eof)) == 1
    });
}

#[test]
fn a_client_that_does_not_read_holds_at_most_the_cap_and_then_gets_everything() {
    const CAP: usize = 256 * 1024;
    const TOTAL: usize = 64 << 20;
    const CHUNK: usize = 256 * 1024;
    let server = echo_server(1, |c| c.max_pending_bytes = CAP);
    let mut stream = connect(server.local_addr());
    let mut writer = stream.try_clone().unwrap();
    let written = Arc::new(AtomicUsize::new(0));
    let progress = Arc::clone(&written);
    let w = std::thread::spawn(move || {
        for i in 0..TOTAL / CHUNK {
            writer
                .write_all(&pattern(9, (i * CHUNK) as u64, CHUNK))
                .unwrap();
            progress.fetch_add(CHUNK, Ordering::SeqCst);
        }
    });

    // Without a reader, the server fills its outbound buffer to the cap and stops
    // reading; then the kernel buffers fill and the writer blocks.
    wait_for("reading to pause at the cap", || {
        server.stats()[0].backpressure_pauses >= 1 && server.stats()[0].buffered_bytes == CAP as i64
    });
    let stalled_at = written.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(300));
    let later = written.load(Ordering::SeqCst);
    assert!(later < TOTAL, "the writer is held back, not finished");
    assert!(
        later - stalled_at <= 16 << 20,
        "the server kept reading: {stalled_at} -> {later}"
    );
    let stats = &server.stats()[0];
    assert_eq!(stats.buffered_bytes, CAP as i64, "{stats:?}");
    assert_eq!(stats.peak_pending_bytes, CAP, "{stats:?}");

    // Now read: every byte arrives, in order, and the cap held throughout.
    let mut buf = vec![0u8; CHUNK];
    for i in 0..TOTAL / CHUNK {
        stream.read_exact(&mut buf).unwrap();
        assert_same(&pattern(9, (i * CHUNK) as u64, CHUNK), &buf);
    }
    w.join().unwrap();
    wait_for("the buffer to drain and every byte to be counted", || {
        let s = &server.stats()[0];
        s.buffered_bytes == 0 && s.received_bytes == TOTAL as u64 && s.sent_bytes == TOTAL as u64
    });
    let stats = &server.stats()[0];
    assert!(stats.peak_pending_bytes <= CAP, "{stats:?}");
}

#[test]
fn a_reset_mid_stream_closes_only_that_connection() {
    let server = echo_server(1, |_| {});
    let addr = server.local_addr();
    let mut steady = connect(addr);
    echo_roundtrip(&mut steady, &pattern(1, 0, 10_000));

    let mut rude = connect(addr);
    // 4 MiB unread by us: the server is mid-echo when the reset lands.
    let mut writer = rude.try_clone().unwrap();
    let w = std::thread::spawn(move || {
        let _ = writer.write_all(&pattern(2, 0, 4 << 20));
    });
    let mut first = [0u8; 1000];
    rude.read_exact(&mut first).unwrap();
    edgepoll::sys::socket::set_linger_zero(rude.as_fd()).unwrap();
    drop(rude);
    let _ = w.join();

    wait_for("the reset to be counted", || {
        total(&server, |s| s.closed_for(CloseReason::Reset)) == 1
    });
    for i in 0..20u64 {
        echo_roundtrip(&mut steady, &pattern(1, 10_000 + i * 5000, 5000));
    }
    assert_eq!(total(&server, |s| s.closed_total()), 1);
    assert_eq!(server.open_connections(), 1);
}

#[test]
fn connections_are_spread_round_robin() {
    const M: u64 = 41;
    const N: usize = 4;
    let server = echo_server(N, |_| {});
    let conns: Vec<TcpStream> = (0..M).map(|_| connect(server.local_addr())).collect();
    wait_for("every connection to be accepted", || {
        total(&server, |s| s.accepted) == M
    });
    for (i, s) in server.stats().iter().enumerate() {
        let share = M / N as u64;
        assert!(
            s.accepted == share || s.accepted == share + 1,
            "worker {i} got {} of {M} over {N} workers",
            s.accepted
        );
        assert_eq!(s.active, s.accepted as i64);
    }
    drop(conns);
}

#[test]
fn connections_over_the_limit_are_closed_at_once_and_counted() {
    let server = echo_server(2, |c| c.max_connections = 3);
    let addr = server.local_addr();
    let mut held: Vec<TcpStream> = (0..3).map(|_| connect(addr)).collect();
    for (i, s) in held.iter_mut().enumerate() {
        echo_roundtrip(s, &pattern(i as u64, 0, 100));
    }
    let mut extra = connect(addr);
    let _ = extra.write_all(b"anyone?");
    let (got, _) = read_to_end(&mut extra);
    assert!(got.is_empty(), "the fourth connection got an echo");
    assert_eq!(
        server
            .metrics()
            .rejected(edgepoll::RejectReason::MaxConnections),
        1
    );

    // Room again once one closes.
    drop(held.pop());
    wait_for("the close to free a slot", || {
        server.open_connections() == 2
    });
    let mut again = connect(addr);
    echo_roundtrip(&mut again, b"welcome back");
    for s in held.iter_mut() {
        echo_roundtrip(s, b"still here");
    }
}

#[test]
fn idle_connections_are_closed_and_busy_ones_are_not() {
    let server = echo_server(1, |c| c.idle_timeout = Some(Duration::from_millis(500)));
    let addr = server.local_addr();
    let mut idle = connect(addr);
    let mut busy = connect(addr);
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(1500) {
        echo_roundtrip(&mut busy, b"ping");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (got, eof) = read_to_end(&mut idle);
    assert!(
        got.is_empty() && eof,
        "the idle connection was closed cleanly"
    );
    echo_roundtrip(&mut busy, b"still open");
    wait_for("the idle close to be counted", || {
        total(&server, |s| s.closed_for(CloseReason::IdleTimeout)) == 1
    });
    assert_eq!(total(&server, |s| s.closed_total()), 1);
}

#[test]
fn listens_on_ipv6_and_ipv4_at_once() {
    let mut config = edgepoll::Config::new(edgepoll::Mode::Echo);
    config.listen = vec!["127.0.0.1:0".parse().unwrap(), "[::1]:0".parse().unwrap()];
    config.workers = 1;
    config.metrics_listen = None;
    let server = match edgepoll::Server::start(config) {
        Ok(s) => s,
        Err(e) if e.to_string().contains("Cannot assign requested address") => {
            eprintln!("skipped: this machine has no IPv6 loopback ({e})");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let addrs = server.local_addrs().to_vec();
    assert!(addrs[0].is_ipv4() && addrs[1].is_ipv6());
    for addr in addrs {
        assert_ne!(addr.port(), 0);
        echo_roundtrip(&mut connect(addr), format!("hello {addr}").as_bytes());
    }
}

#[test]
fn port_zero_reports_the_bound_port_and_a_taken_port_is_a_clear_error() {
    let server = echo_server(1, |_| {});
    let taken = server.local_addr();
    let mut config = edgepoll::Config::new(edgepoll::Mode::Echo);
    config.listen = vec![taken];
    config.metrics_listen = None;
    let err = edgepoll::Server::start(config).expect_err("second bind fails");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("bind {taken}")) && msg.contains("in use"),
        "{msg}"
    );
}

#[test]
fn connections_over_the_per_ip_limit_are_closed_and_other_addresses_are_not_affected() {
    let server = echo_server(2, |c| {
        c.max_connections_per_ip = Some(3);
        c.listen = vec!["127.0.0.1:0".parse().unwrap(), "[::1]:0".parse().unwrap()];
    });
    let (v4, v6) = (server.local_addrs()[0], server.local_addrs()[1]);
    let mut held: Vec<TcpStream> = (0..3).map(|_| connect(v4)).collect();
    for s in held.iter_mut() {
        echo_roundtrip(s, b"within the limit");
    }
    let mut fourth = connect(v4);
    let _ = fourth.write_all(b"one too many");
    let (got, _) = read_to_end(&mut fourth);
    assert!(
        got.is_empty(),
        "the fourth connection from 127.0.0.1 got an echo"
    );
    assert_eq!(
        server
            .metrics()
            .rejected(edgepoll::RejectReason::PerIpLimit),
        1
    );
    // Another address has its own allowance.
    echo_roundtrip(&mut connect(v6), b"from ::1");
    // And 127.0.0.1 gets a slot back when one of its connections closes.
    drop(held.pop());
    wait_for("the close to be counted out", || {
        server.open_connections() == 2
    });
    echo_roundtrip(&mut connect(v4), b"welcome back");
    assert_eq!(
        server
            .metrics()
            .rejected(edgepoll::RejectReason::PerIpLimit),
        1
    );
}

#[test]
fn the_global_buffer_bound_pauses_holders_and_everyone_gets_every_byte() {
    const LIMIT: usize = 256 * 1024;
    const TOTAL: usize = 8 << 20;
    const CHUNK: usize = 64 * 1024;
    let server = echo_server(1, |c| {
        c.max_pending_bytes = 1 << 20;
        c.max_buffered_bytes = LIMIT;
    });
    let clients: Vec<TcpStream> = (0..4).map(|_| connect(server.local_addr())).collect();
    let writers: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(id, c)| {
            let mut w = c.try_clone().unwrap();
            std::thread::spawn(move || {
                for i in 0..TOTAL / CHUNK {
                    w.write_all(&pattern(id as u64, (i * CHUNK) as u64, CHUNK))
                        .unwrap();
                }
            })
        })
        .collect();
    // Nobody reads: the buffers fill until the global bound stops them.
    wait_for("the holders to pause", || {
        server.stats()[0].backpressure_pauses >= 4
    });
    std::thread::sleep(Duration::from_millis(200));
    let held = server.buffered_bytes();
    // Each connection alone could hold 1 MiB; together they stop at 256 KiB, past it
    // by at most one small read per connection that held nothing when it was reached.
    assert!(
        held as usize <= LIMIT + 4 * edgepoll::mode::SMALL_READ,
        "{held} bytes buffered"
    );
    assert!(
        held as usize >= LIMIT / 2,
        "{held} bytes buffered: the bound, not the cap, stopped them"
    );
    let readers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(id, mut c)| {
            std::thread::spawn(move || {
                let mut buf = vec![0u8; CHUNK];
                for i in 0..TOTAL / CHUNK {
                    c.read_exact(&mut buf).unwrap();
                    assert_same(&pattern(id as u64, (i * CHUNK) as u64, CHUNK), &buf);
                }
            })
        })
        .collect();
    for t in writers.into_iter().chain(readers) {
        t.join().unwrap();
    }
    wait_for("the buffers to empty", || server.buffered_bytes() == 0);
}

#[test]
fn a_dead_worker_is_reported_and_skipped_by_the_acceptor() {
    let server = echo_server(2, |_| {});
    server.inject_worker_failure(0);
    let started = std::time::Instant::now();
    let why = loop {
        if let Some(why) = server.failure() {
            break why;
        }
        assert!(started.elapsed() < PATIENCE, "no failure reported");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(why, "worker 0 stopped: injected worker failure");
    // Every new connection goes to the worker that is left, and none is refused.
    for i in 0..6 {
        let mut client = connect(server.local_addr());
        echo_roundtrip(&mut client, &pattern(i, 0, 1000));
    }
    assert_eq!(server.metrics().rejected(edgepoll::RejectReason::Error), 0);
}

#[test]
fn every_reject_reason_is_exported_at_zero_before_the_first_rejection() {
    let server = echo_server(1, |c| c.max_connections_per_ip = Some(4));
    let text = String::from_utf8(server.metrics().encode()).unwrap();
    for reason in edgepoll::RejectReason::ALL {
        let line = format!(
            "edgepoll_connections_rejected_total{{reason=\"{}\"}} 0",
            reason.as_str()
        );
        assert!(text.contains(&line), "{line} missing from:\n{text}");
    }
}
