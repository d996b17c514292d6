//! Relay mode over real loopback sockets: exact bytes both ways, half-close, resets,
//! failing upstreams, bounded memory, the PROXY v2 header, balancing, drain.

mod util;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::mpsc;
use std::time::Duration;

use edgepoll::config::Balance;
use edgepoll::metrics::ConnectError;
use edgepoll::{CloseReason, Config, Mode, Server};
use util::*;

fn many_pairs_transfer_exact_bytes(splice: bool) {
    let upstream = echo_server(2, |_| {});
    let relay = relay_server(2, vec![upstream.local_addr()], |c| c.relay.splice = splice);
    let addr = relay.local_addr();
    const CLIENTS: u64 = 32;
    const SIZE: usize = 1 << 20;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| {
            std::thread::spawn(move || {
                let mut stream = connect(addr);
                let data = pattern(id, 0, SIZE);
                // Both directions at once: the writer never waits for the echo.
                let mut writer = stream.try_clone().unwrap();
                let to_send = data.clone();
                let w = std::thread::spawn(move || {
                    for chunk in to_send.chunks(7919) {
                        writer.write_all(chunk).unwrap();
                    }
                    writer.shutdown(Shutdown::Write).unwrap();
                });
                let (back, clean) = read_to_end(&mut stream);
                w.join().unwrap();
                assert!(clean, "client {id}: the relay closed with an error");
                assert_same(&data, &back);
            })
        })
        .collect();
    for c in clients {
        c.join().expect("client ok");
    }
    let n = CLIENTS * SIZE as u64;
    wait_for("every pair to close and every byte to be counted", || {
        total(&relay, |s| s.closed_for(CloseReason::Eof)) == CLIENTS
            && total(&relay, |s| s.sent_bytes) == n
    });
    assert_eq!(total(&relay, |s| s.received_bytes), n);
    assert_eq!(total(&relay, |s| s.upstream_sent_bytes), n);
    assert_eq!(total(&relay, |s| s.upstream_received_bytes), n);
    assert_eq!(total(&relay, |s| s.closed_total()), CLIENTS);
    assert_eq!(relay.buffered_bytes(), 0);
    let label = upstream.local_addr().to_string();
    assert_eq!(relay.metrics().upstream_connects(&label), CLIENTS);
    assert_eq!(relay.metrics().upstream_active(&label), 0);
}

#[test]
fn many_pairs_transfer_exact_bytes_both_ways_by_copying() {
    many_pairs_transfer_exact_bytes(false);
}

#[test]
fn many_pairs_transfer_exact_bytes_both_ways_with_splice() {
    many_pairs_transfer_exact_bytes(true);
}

#[test]
fn a_client_fin_reaches_the_upstream_and_the_answer_still_comes_back() {
    let (up, t) = upstream_once(|mut s| {
        let (request, clean) = read_to_end(&mut s);
        assert!(clean);
        // Answer only after the client's FIN: the other direction must still flow.
        s.write_all(b"answer to ").unwrap();
        s.write_all(&request).unwrap();
    });
    let relay = relay_server(1, vec![up], |_| {});
    let mut client = connect(relay.local_addr());
    client.write_all(b"the question").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let (back, clean) = read_to_end(&mut client);
    t.join().unwrap();
    assert!(clean);
    assert_eq!(back, b"answer to the question");
    wait_for("the pair to close cleanly", || {
        total(&relay, |s| s.closed_for(CloseReason::Eof)) == 1
    });
}

#[test]
fn an_upstream_fin_reaches_the_client_and_the_client_can_still_send() {
    let (up, t) = upstream_once(|mut s| {
        s.write_all(b"banner").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        read_to_end(&mut s)
    });
    let relay = relay_server(1, vec![up], |_| {});
    let mut client = connect(relay.local_addr());
    let (banner, clean) = read_to_end(&mut client);
    assert!(clean, "the upstream's FIN arrives as a clean EOF");
    assert_eq!(banner, b"banner");
    client.write_all(b"sent after the upstream's FIN").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let (got, clean) = t.join().unwrap();
    assert!(clean);
    assert_eq!(got, b"sent after the upstream's FIN");
    wait_for("the pair to close cleanly", || {
        total(&relay, |s| s.closed_for(CloseReason::Eof)) == 1
    });
    assert_eq!(total(&relay, |s| s.active as u64), 0);
}

#[test]
fn a_client_reset_resets_the_upstream() {
    let (got_tx, got_rx) = mpsc::channel();
    let (up, t) = upstream_once(move |mut s| {
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        got_tx.send(()).unwrap();
        s.read(&mut buf).map_err(|e| e.kind())
    });
    let relay = relay_server(1, vec![up], |_| {});
    let client = connect(relay.local_addr());
    (&client).write_all(b"hello").unwrap();
    got_rx.recv_timeout(PATIENCE).unwrap();
    edgepoll::sys::socket::set_linger_zero(client.as_fd()).unwrap();
    drop(client);
    assert_eq!(t.join().unwrap(), Err(ErrorKind::ConnectionReset));
    wait_for("the pair to close as reset", || {
        total(&relay, |s| s.closed_for(CloseReason::Reset)) == 1
    });
}

#[test]
fn an_upstream_reset_resets_the_client() {
    let (up, t) = upstream_once(|mut s| {
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        edgepoll::sys::socket::set_linger_zero(s.as_fd()).unwrap();
    });
    let relay = relay_server(1, vec![up], |_| {});
    let mut client = connect(relay.local_addr());
    client.write_all(b"hello").unwrap();
    t.join().unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(
        client.read(&mut buf).map_err(|e| e.kind()),
        Err(ErrorKind::ConnectionReset)
    );
    wait_for("the pair to close", || {
        total(&relay, |s| s.closed_total()) == 1
    });
}

#[test]
fn a_refusing_upstream_closes_the_client_promptly_and_is_counted() {
    let dead = dead_address();
    let relay = relay_server(1, vec![dead], |_| {});
    for _ in 0..2 {
        let mut client = connect(relay.local_addr());
        let (got, _) = read_to_end(&mut client);
        assert!(got.is_empty());
    }
    wait_for("both clients to be closed", || {
        total(&relay, |s| s.closed_for(CloseReason::UpstreamError)) == 2
    });
    // A lone upstream is never skipped, so each client tried it.
    let label = dead.to_string();
    assert_eq!(
        relay
            .metrics()
            .upstream_connect_errors(&label, ConnectError::Refused),
        2
    );
    assert_eq!(relay.metrics().upstream_active(&label), 0);
}

#[test]
fn clients_fail_over_to_the_next_upstream_and_the_failed_one_is_skipped() {
    let dead = dead_address();
    let live = echo_server(1, |_| {});
    let relay = relay_server(1, vec![dead, live.local_addr()], |_| {});
    for i in 0..4 {
        let mut client = connect(relay.local_addr());
        echo_roundtrip(&mut client, &pattern(i, 0, 1000));
    }
    // Only the first client tried the dead upstream; it was skipped afterwards.
    let metrics = relay.metrics();
    assert_eq!(
        metrics.upstream_connect_errors(&dead.to_string(), ConnectError::Refused),
        1
    );
    assert_eq!(metrics.upstream_connects(&live.local_addr().to_string()), 4);
}

#[test]
fn bytes_sent_before_the_upstream_connects_arrive_after_a_connect_timeout_failover() {
    // An upstream whose accept queue is full drops SYNs: its connects hang.
    let blackhole_fd =
        edgepoll::sys::socket::listen("127.0.0.1:0".parse().unwrap(), 0).expect("listen");
    let blackhole = edgepoll::sys::socket::local_addr(blackhole_fd.as_fd()).unwrap();
    let _filler = TcpStream::connect_timeout(&blackhole, Duration::from_secs(5)).unwrap();
    let live = echo_server(1, |_| {});
    let relay = relay_server(1, vec![blackhole, live.local_addr()], |c| {
        c.relay.connect_timeout = Duration::from_millis(300);
    });
    let mut client = connect(relay.local_addr());
    let early = pattern(7, 0, 50_000);
    client.write_all(&early).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let (back, clean) = read_to_end(&mut client);
    assert!(clean);
    assert_same(&early, &back);
    let metrics = relay.metrics();
    assert_eq!(
        metrics.upstream_connect_errors(&blackhole.to_string(), ConnectError::Timeout),
        1
    );
    assert_eq!(metrics.upstream_active(&blackhole.to_string()), 0);
    drop(blackhole_fd);
}

#[test]
fn an_upstream_that_never_reads_holds_the_relay_to_its_cap_and_nothing_is_lost() {
    const CAP: usize = 64 * 1024;
    let (start_tx, start_rx) = mpsc::channel::<()>();
    let (up, t) = upstream_once(move |mut s| {
        // Read nothing until told, then everything.
        start_rx.recv().unwrap();
        read_to_end(&mut s).0
    });
    let relay = relay_server(1, vec![up], |c| c.max_pending_bytes = CAP);
    let mut client = connect(relay.local_addr());
    client.set_nonblocking(true).unwrap();
    let mut sent: Vec<u8> = Vec::new();
    let mut stalls = 0;
    let mut offset = 0u64;
    // Write until the relay stops taking bytes: every buffer on the way is full.
    while stalls < 20 {
        let chunk = pattern(3, offset, 16 * 1024);
        match client.write(&chunk) {
            Ok(n) => {
                sent.extend_from_slice(&chunk[..n]);
                offset += n as u64;
                stalls = 0;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                stalls += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("write: {e}"),
        }
    }
    wait_for("the relay to publish its buffer", || {
        relay.stats()[0].buffered_bytes > 0
    });
    let held = relay.buffered_bytes();
    assert!(
        held as usize <= CAP,
        "the relay holds {held} bytes, cap {CAP}"
    );
    assert!(relay.stats()[0].peak_pending_bytes <= CAP);
    assert!(relay.stats()[0].backpressure_pauses >= 1);
    // Sockets on the way hold the rest; the relay itself never more than the cap.
    assert!(sent.len() > CAP, "only {} bytes went in", sent.len());
    start_tx.send(()).unwrap();
    client.set_nonblocking(false).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let got = t.join().unwrap();
    assert_same(&sent, &got);
    wait_for("the buffer to be released", || relay.buffered_bytes() == 0);
}

#[test]
fn the_proxy_v2_header_carries_the_client_address_in_the_specified_layout() {
    let (up, t) = upstream_once(|mut s| {
        let mut got = vec![0u8; 28 + 5];
        s.read_exact(&mut got).unwrap();
        got
    });
    let relay = relay_server(1, vec![up], |c| c.relay.send_proxy_v2 = true);
    let mut client = connect(relay.local_addr());
    client.write_all(b"hello").unwrap();
    let got = t.join().unwrap();
    let client_port = client.local_addr().unwrap().port();
    let relay_port = relay.local_addr().port();
    // Written out from the specification, section 2.2, not from the encoder.
    let mut want = vec![
        0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, // signature
        0x21, // version 2, PROXY
        0x11, // TCP over IPv4
        0x00, 0x0C, // 12 address bytes follow
        127, 0, 0, 1, // source address: the client
        127, 0, 0, 1, // destination address: the relay's listener
    ];
    want.extend_from_slice(&client_port.to_be_bytes());
    want.extend_from_slice(&relay_port.to_be_bytes());
    want.extend_from_slice(b"hello");
    assert_eq!(got, want);
    let parsed = edgepoll::mode::proxy::parse(&got).unwrap();
    assert_eq!(parsed.1, 28);
    // The header is counted apart, so relayed bytes compare equal both ways.
    wait_for("the header and the bytes to be counted", || {
        total(&relay, |s| s.upstream_sent_bytes) == 5
    });
    assert_eq!(total(&relay, |s| s.received_bytes), 5);
    assert_eq!(total(&relay, |s| s.upstream_proxy_header_bytes), 28);
}

#[test]
fn least_conn_sends_a_new_client_to_the_emptier_upstream() {
    let a = echo_server(1, |_| {});
    let b = echo_server(1, |_| {});
    let (la, lb) = (a.local_addr().to_string(), b.local_addr().to_string());
    let relay = relay_server(1, vec![a.local_addr(), b.local_addr()], |c| {
        c.relay.balance = Balance::LeastConn;
    });
    let m = relay.metrics();
    let mut first = connect(relay.local_addr());
    echo_roundtrip(&mut first, b"1");
    let mut second = connect(relay.local_addr());
    echo_roundtrip(&mut second, b"2");
    assert_eq!((m.upstream_active(&la), m.upstream_active(&lb)), (1, 1));
    drop(second);
    wait_for("the second pair to close", || m.upstream_active(&lb) == 0);
    // Round-robin would pick `a` now; least-conn picks the empty `b`.
    let mut third = connect(relay.local_addr());
    echo_roundtrip(&mut third, b"3");
    assert_eq!((m.upstream_active(&la), m.upstream_active(&lb)), (1, 1));
    drop(first);
}

#[test]
fn an_idle_pair_is_closed_by_the_idle_timeout_and_both_peers_see_it() {
    let (up, t) = upstream_once(|mut s| read_to_end(&mut s));
    let relay = relay_server(1, vec![up], |c| {
        c.idle_timeout = Some(Duration::from_millis(300));
    });
    let mut client = connect(relay.local_addr());
    client.write_all(b"then silence").unwrap();
    let (got, _) = t.join().unwrap();
    assert_eq!(got, b"then silence");
    let (rest, _) = read_to_end(&mut client);
    assert!(rest.is_empty());
    wait_for("the close to be counted", || {
        total(&relay, |s| s.closed_for(CloseReason::IdleTimeout)) == 1
    });
}

#[test]
fn a_drain_relays_every_byte_in_flight_before_the_pairs_close() {
    let upstream = echo_server(1, |_| {});
    let relay = relay_server(1, vec![upstream.local_addr()], |_| {});
    let mut client = connect(relay.local_addr());
    const SIZE: usize = 8 << 20;
    let data = pattern(11, 0, SIZE);
    let mut writer = client.try_clone().unwrap();
    let to_send = data.clone();
    let w = std::thread::spawn(move || {
        for chunk in to_send.chunks(64 * 1024) {
            writer.write_all(chunk).unwrap();
        }
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut first = vec![0u8; 1024];
    client.read_exact(&mut first).unwrap();
    relay.begin_drain();
    let mut back = first;
    let (rest, clean) = read_to_end(&mut client);
    w.join().unwrap();
    back.extend_from_slice(&rest);
    assert!(clean);
    assert_same(&data, &back);
    wait_for("the drain to finish", || relay.is_finished());
    assert_eq!(total(&relay, |s| s.closed_for(CloseReason::Eof)), 1);
}

#[test]
fn an_ipv6_client_reaches_an_ipv6_upstream_with_a_v6_proxy_header() {
    let Ok(listener) = TcpListener::bind("[::1]:0") else {
        eprintln!("no IPv6 loopback here; skipping");
        return;
    };
    let up = listener.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut got = vec![0u8; 52 + 4];
        s.read_exact(&mut got).unwrap();
        s.write_all(b"pong").unwrap();
        got
    });
    let mut config = Config::new(Mode::Relay);
    config.listen = vec!["[::1]:0".parse().unwrap()];
    config.workers = 1;
    config.metrics_listen = None;
    config.relay.upstreams = vec![up];
    config.relay.send_proxy_v2 = true;
    let relay = Server::start(config).unwrap();
    let mut client = connect(relay.local_addr());
    client.write_all(b"ping").unwrap();
    let mut pong = [0u8; 4];
    client.read_exact(&mut pong).unwrap();
    assert_eq!(&pong, b"pong");
    let got = t.join().unwrap();
    // Family byte 0x21: TCP over IPv6; 36 address bytes follow.
    assert_eq!(&got[12..16], &[0x21, 0x21, 0x00, 0x24]);
    let (header, len) = edgepoll::mode::proxy::parse(&got).unwrap();
    assert_eq!(len, 52);
    assert_eq!(
        header,
        edgepoll::mode::proxy::Header::Proxy {
            src: client.local_addr().unwrap(),
            dst: relay.local_addr(),
        }
    );
    assert_eq!(&got[52..], b"ping");
}
