//! `--accept-proxy` over real loopback sockets: PROXY v1 and v2 headers accepted from
//! `--trusted-proxy` sources and refused from anyone else, in every mode; the bytes
//! after a header reaching the mode intact however the header arrives; malformed,
//! missing and late headers refused and counted; `--max-connections-per-ip` applied
//! to the client a header names; and a relay chain that delivers the original
//! client's address. The hostile peers here are proxies (trusted or not) that lie,
//! stall, dribble and cut.

mod util;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::Duration;

use edgepoll::config::parse_cidr;
use edgepoll::mode::proxy;
use edgepoll::{Config, RejectReason, Server};
use util::*;

/// Accept PROXY headers from loopback (every test client), with `timeout` for the
/// header.
fn from_loopback(c: &mut Config, timeout: Duration) {
    c.accept_proxy = true;
    c.trusted_proxies = vec![parse_cidr("127.0.0.0/8").unwrap()];
    c.proxy_header_timeout = timeout;
}

/// Long enough that any refusal seen within a test's [`PATIENCE`] came from the
/// header itself, never from the deadline.
const NO_DEADLINE: Duration = Duration::from_secs(600);

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn v1(src: &str, dst: &str) -> Vec<u8> {
    let (src, dst) = (sa(src), sa(dst));
    let proto = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {proto} {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
    .into_bytes()
}

fn v2(src: &str, dst: &str) -> Vec<u8> {
    let mut out = Vec::new();
    proxy::encode(sa(src), sa(dst), &mut out);
    out
}

/// A version 2 LOCAL header (a proxy's health check), with no addresses.
fn v2_local() -> Vec<u8> {
    let mut out = proxy::SIGNATURE.to_vec();
    out.extend_from_slice(&[0x20, 0x00, 0, 0]);
    out
}

fn rejected(server: &Server, reason: RejectReason) -> u64 {
    server.metrics().rejected(reason)
}

/// Sends `first` and expects the connection to be closed with nothing sent back.
#[track_caller]
fn expect_refused(addr: SocketAddr, first: &[u8]) {
    let mut s = connect(addr);
    let _ = s.write_all(first);
    let (got, _) = read_to_end(&mut s);
    assert!(
        got.is_empty(),
        "{:?} got {:?} back",
        String::from_utf8_lossy(first),
        String::from_utf8_lossy(&got)
    );
}

#[test]
fn a_header_and_the_first_bytes_in_one_segment_reach_echo_intact() {
    let server = echo_server(2, |c| from_loopback(c, NO_DEADLINE));
    let payload = pattern(7, 0, 100_000);
    for header in [
        v1("192.0.2.1:1111", "198.51.100.1:7000"),
        v2("192.0.2.2:2222", "198.51.100.1:7000"),
        v1("[2001:db8::3]:3333", "[2001:db8::ff]:7000"),
        v2("[2001:db8::4]:4444", "[2001:db8::ff]:7000"),
        v2_local(),
        b"PROXY UNKNOWN\r\n".to_vec(),
    ] {
        let mut client = connect(server.local_addr());
        // One write: the header and the first 100 KB arrive together.
        let mut first = header.clone();
        first.extend_from_slice(&payload);
        client.write_all(&first).unwrap();
        let mut back = vec![0u8; payload.len()];
        client.read_exact(&mut back).unwrap();
        assert_same(&payload, &back);
        echo_roundtrip(&mut client, b"and later bytes too");
    }
    wait_for("six connections to be counted", || {
        total(&server, |s| s.accepted) == 6
    });
    // The header is not the client's data.
    let each = payload.len() as u64 + 19;
    assert_eq!(total(&server, |s| s.received_bytes), 6 * each);
    assert_eq!(total(&server, |s| s.sent_bytes), 6 * each);
    assert_eq!(rejected(&server, RejectReason::ProxyHeader), 0);
}

#[test]
fn a_header_dribbled_one_byte_at_a_time_is_read_and_nothing_after_it_is_lost() {
    let server = echo_server(1, |c| from_loopback(c, NO_DEADLINE));
    for header in [
        v1("192.0.2.9:1", "198.51.100.1:7000"),
        v2("[2001:db8::9]:2", "[2001:db8::1]:7000"),
    ] {
        let mut client = connect(server.local_addr());
        for b in &header {
            client.write_all(&[*b]).unwrap();
            // Separate segments (TCP_NODELAY is on): one edge per byte.
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(server.open_connections(), 1);
        echo_roundtrip(&mut client, b"after a slow header");
    }
    assert_eq!(rejected(&server, RejectReason::ProxyHeader), 0);
    wait_for("both echoes to be counted", || {
        total(&server, |s| s.sent_bytes) == 2 * 19
    });
    assert_eq!(total(&server, |s| s.received_bytes), 2 * 19);
}

#[test]
fn http_answers_the_request_that_follows_the_header() {
    let server = http_server(1, |c| from_loopback(c, NO_DEADLINE));
    let mut client = connect(server.local_addr());
    let mut first = v2("192.0.2.1:1", "198.51.100.1:80");
    first.extend_from_slice(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n");
    client.write_all(&first).unwrap();
    let (statuses, raw, closed) = read_responses(&mut client, 2);
    assert_eq!((statuses, closed), (vec![200, 200], false));
    assert!(raw.ends_with(b"\r\n\r\nHello, World!"));
    // Only the first bytes are a header: a second one is an HTTP request line, whose
    // "version" is an address (505), not skipped.
    client
        .write_all(&v1("192.0.2.1:1", "198.51.100.1:80"))
        .unwrap();
    let (statuses, _, _) = read_responses(&mut client, 1);
    assert_eq!(statuses, vec![505]);
}

#[test]
fn relay_forwards_only_what_follows_the_header() {
    let (up, t) = upstream_once(|mut s| {
        let mut got = vec![0u8; 14];
        s.read_exact(&mut got).unwrap();
        s.write_all(b"pong").unwrap();
        got
    });
    let relay = relay_server(1, vec![up], |c| from_loopback(c, NO_DEADLINE));
    let mut client = connect(relay.local_addr());
    let mut first = v1("192.0.2.1:1", "198.51.100.1:80");
    first.extend_from_slice(b"ping");
    client.write_all(&first).unwrap();
    client.write_all(b" ping ping").unwrap();
    let mut pong = [0u8; 4];
    client.read_exact(&mut pong).unwrap();
    assert_eq!(&pong, b"pong");
    assert_eq!(t.join().unwrap(), b"ping ping ping");
}

#[test]
fn untrusted_sources_are_refused_at_once_even_with_a_valid_header() {
    // Loopback is not in the trusted range (TEST-NET-1, nothing is ever sent there).
    let server = echo_server(1, |c| {
        c.accept_proxy = true;
        c.trusted_proxies = vec![parse_cidr("192.0.2.0/24").unwrap()];
        c.proxy_header_timeout = NO_DEADLINE;
    });
    let mut first = v1("203.0.113.5:1", "198.51.100.1:7000");
    first.extend_from_slice(b"spoofed");
    expect_refused(server.local_addr(), &first);
    expect_refused(
        server.local_addr(),
        &v2("203.0.113.5:1", "198.51.100.1:7000"),
    );
    expect_refused(server.local_addr(), b"no header at all");
    // Silent: refused at accept, not at a deadline.
    expect_refused(server.local_addr(), b"");
    assert_eq!(rejected(&server, RejectReason::ProxyHeader), 4);
    assert_eq!(total(&server, |s| s.accepted), 0);
    assert_eq!(server.open_connections(), 0);
}

#[test]
fn missing_malformed_and_cut_headers_from_a_trusted_proxy_are_refused_and_counted() {
    let server = echo_server(2, |c| from_loopback(c, NO_DEADLINE));
    let mut too_long_v1 = b"PROXY UNKNOWN ".to_vec();
    too_long_v1.resize(120, b'f');
    let mut v2_over_cap = v2("192.0.2.1:1", "198.51.100.1:7000");
    v2_over_cap[14..16].copy_from_slice(&4000u16.to_be_bytes());
    let mut v2_version_1 = v2("192.0.2.1:1", "198.51.100.1:7000");
    v2_version_1[12] = 0x11;
    let mut v2_udp_family_short = v2("192.0.2.1:1", "198.51.100.1:7000");
    v2_udp_family_short[13] = 0x21; // IPv6 announced, 12 address bytes follow
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("no header, plain data", b"hello, echo\r\n".to_vec()),
        (
            "an HTTP request",
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
        ),
        ("TLS", vec![0x16, 0x03, 0x01, 0x00, 0xa5, 0x01]),
        (
            "a bare LF",
            b"PROXY TCP4 192.0.2.1 198.51.100.1 1 2\n".to_vec(),
        ),
        (
            "an octal-looking octet",
            b"PROXY TCP4 192.0.2.01 198.51.100.1 1 2\r\n".to_vec(),
        ),
        (
            "a port too large",
            b"PROXY TCP4 192.0.2.1 198.51.100.1 65536 2\r\n".to_vec(),
        ),
        (
            "TCP6 with IPv4",
            b"PROXY TCP6 192.0.2.1 198.51.100.1 1 2\r\n".to_vec(),
        ),
        (
            "two spaces",
            b"PROXY TCP4  192.0.2.1 198.51.100.1 1 2\r\n".to_vec(),
        ),
        ("no CRLF in 107 bytes", too_long_v1),
        ("v2 announcing 4000 bytes", v2_over_cap[..16].to_vec()),
        ("v2 version 1", v2_version_1),
        ("v2 too short for IPv6", v2_udp_family_short),
        (
            "lower-case proxy",
            b"proxy TCP4 192.0.2.1 198.51.100.1 1 2\r\n".to_vec(),
        ),
    ];
    for (i, (what, bytes)) in cases.iter().enumerate() {
        expect_refused(server.local_addr(), bytes);
        assert_eq!(
            rejected(&server, RejectReason::ProxyHeader),
            i as u64 + 1,
            "{what}"
        );
    }
    // Cut: part of a header, then FIN; or a reset; or nothing, then FIN.
    let header = v2("192.0.2.1:1", "198.51.100.1:7000");
    let mut half = connect(server.local_addr());
    half.write_all(&header[..20]).unwrap();
    half.shutdown(Shutdown::Write).unwrap();
    assert!(read_to_end(&mut half).0.is_empty());
    let mut silent = connect(server.local_addr());
    silent.shutdown(Shutdown::Write).unwrap();
    assert!(read_to_end(&mut silent).0.is_empty());
    let n = cases.len() as u64 + 2;
    assert_eq!(rejected(&server, RejectReason::ProxyHeader), n);
    let mut reset = connect(server.local_addr());
    reset.write_all(&header[..5]).unwrap();
    edgepoll::sys::socket::set_linger_zero(std::os::fd::AsFd::as_fd(&reset)).unwrap();
    drop(reset);
    wait_for("the reset to be refused", || {
        rejected(&server, RejectReason::ProxyHeader) == n + 1
    });
    wait_for("every refused connection to be gone", || {
        server.open_connections() == 0
    });
    // None reached the mode, and the server still serves a good one.
    let mut good = connect(server.local_addr());
    good.write_all(&header).unwrap();
    echo_roundtrip(&mut good, b"still serving");
    wait_for("the good one to be counted", || {
        total(&server, |s| s.accepted) == 1
    });
    assert_eq!(total(&server, |s| s.closed_total()), 0);
}

#[test]
fn a_header_not_complete_by_the_deadline_is_refused_while_others_are_served() {
    let server = echo_server(1, |c| from_loopback(c, Duration::from_millis(300)));
    let header = v1("192.0.2.1:1", "198.51.100.1:7000");
    let mut silent = connect(server.local_addr());
    let mut partial = connect(server.local_addr());
    partial.write_all(&header[..10]).unwrap();
    // A slowloris: a byte every 50 ms would take over a second for the whole line.
    let mut dribbler = connect(server.local_addr());
    let dribble = std::thread::spawn(move || {
        for b in header.iter() {
            if dribbler.write_all(&[*b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        read_to_end(&mut dribbler).0
    });
    let mut good = connect(server.local_addr());
    good.write_all(&v2("192.0.2.2:2", "198.51.100.1:7000"))
        .unwrap();
    echo_roundtrip(&mut good, b"served meanwhile");
    assert!(read_to_end(&mut silent).0.is_empty());
    assert!(read_to_end(&mut partial).0.is_empty());
    assert!(dribble.join().unwrap().is_empty());
    assert_eq!(rejected(&server, RejectReason::ProxyHeader), 3);
    echo_roundtrip(&mut good, b"and after");
    assert_eq!(server.open_connections(), 1);
    // Their timer entries left with them.
    wait_for("one timer entry", || {
        server
            .stats()
            .iter()
            .map(|s| s.timer_entries)
            .sum::<usize>()
            <= 1
    });
}

#[test]
fn the_per_ip_limit_counts_the_client_a_header_names_not_the_proxy() {
    let server = echo_server(2, |c| {
        from_loopback(c, NO_DEADLINE);
        c.max_connections_per_ip = Some(2);
    });
    let addr = server.local_addr();
    let open = |src: &str| {
        let mut s = connect(addr);
        let dst = if sa(src).is_ipv4() {
            "198.51.100.1:7000"
        } else {
            "[2001:db8::ff]:7000"
        };
        s.write_all(&v1(src, dst)).unwrap();
        s
    };
    // Five connections from one proxy, 127.0.0.1: the limit of 2 is per client.
    let mut a1 = open("192.0.2.1:1001");
    let mut a2 = open("192.0.2.1:1002");
    echo_roundtrip(&mut a1, b"a1");
    echo_roundtrip(&mut a2, b"a2");
    expect_refused(addr, &v2("192.0.2.1:1003", "198.51.100.1:7000"));
    assert_eq!(rejected(&server, RejectReason::PerIpLimit), 1);
    // The same client through IPv6 mapping is the same client.
    expect_refused(addr, &v1("[::ffff:192.0.2.1]:1004", "[::1]:7000"));
    assert_eq!(rejected(&server, RejectReason::PerIpLimit), 2);
    let mut b1 = open("192.0.2.2:2001");
    let mut b2 = open("192.0.2.2:2002");
    let mut c1 = open("[2001:db8::1]:3001");
    echo_roundtrip(&mut b1, b"b1");
    echo_roundtrip(&mut b2, b"b2");
    echo_roundtrip(&mut c1, b"c1");
    assert_eq!(server.open_connections(), 5);
    // A client gets its slot back when one of its connections closes.
    drop(a1);
    wait_for("a1 to be counted out", || server.open_connections() == 4);
    echo_roundtrip(&mut open("192.0.2.1:1005"), b"a again");
    // LOCAL (a health check) names no client: the proxy itself counts, 127.0.0.1.
    let mut h1 = connect(addr);
    h1.write_all(&v2_local()).unwrap();
    let mut h2 = connect(addr);
    h2.write_all(b"PROXY UNKNOWN\r\n").unwrap();
    echo_roundtrip(&mut h1, b"h1");
    echo_roundtrip(&mut h2, b"h2");
    expect_refused(addr, &v2_local());
    assert_eq!(rejected(&server, RejectReason::PerIpLimit), 3);
    assert_eq!(rejected(&server, RejectReason::ProxyHeader), 0);
    let _ = (a2, b1, b2, c1, h1, h2);
}

#[test]
fn a_relay_chain_delivers_the_original_clients_address_and_port() {
    // client -> relay1 (--send-proxy-v2) -> relay2 (--accept-proxy, --send-proxy-v2)
    // -> an upstream that parses the header it gets.
    let (up, t) = upstream_once(|mut s| {
        let mut got = vec![0u8; 28 + 5];
        s.read_exact(&mut got).unwrap();
        s.write_all(b"world").unwrap();
        got
    });
    let relay2 = relay_server(1, vec![up], |c| {
        from_loopback(c, NO_DEADLINE);
        c.relay.send_proxy_v2 = true;
    });
    let relay1 = relay_server(1, vec![relay2.local_addr()], |c| {
        c.relay.send_proxy_v2 = true;
    });
    let mut client = connect(relay1.local_addr());
    client.write_all(b"hello").unwrap();
    let mut back = [0u8; 5];
    client.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"world");
    let got = t.join().unwrap();
    let (header, len) = proxy::parse(&got).unwrap();
    assert_eq!(len, 28);
    assert_eq!(
        header,
        proxy::Header::Proxy {
            // Not relay1's address and port toward relay2: the client's own.
            src: client.local_addr().unwrap(),
            // And the address the client connected to, relay1's listener.
            dst: relay1.local_addr(),
        }
    );
    assert_eq!(&got[28..], b"hello");
    wait_for("relay2 to count the pair", || {
        total(&relay2, |s| s.upstream_proxy_header_bytes) == 28
    });
    // relay2 read relay1's 28-byte header and sent its own; neither is relayed data.
    assert_eq!(total(&relay2, |s| s.received_bytes), 5);
    assert_eq!(total(&relay2, |s| s.upstream_sent_bytes), 5);
    assert_eq!(rejected(&relay2, RejectReason::ProxyHeader), 0);
}

#[test]
fn a_relay_turns_a_v1_header_into_the_v2_header_of_the_same_client() {
    for (received, expect_src, expect_dst) in [
        (
            v1("203.0.113.7:4242", "192.0.2.1:443"),
            Some(sa("203.0.113.7:4242")),
            Some(sa("192.0.2.1:443")),
        ),
        // UNKNOWN names nobody: the proxy's connection stands, as without a header.
        (b"PROXY UNKNOWN\r\n".to_vec(), None, None),
    ] {
        let (up, t) = upstream_once(|mut s| {
            let mut got = vec![0u8; 28 + 2];
            s.read_exact(&mut got).unwrap();
            got
        });
        let relay = relay_server(1, vec![up], |c| {
            from_loopback(c, NO_DEADLINE);
            c.relay.send_proxy_v2 = true;
        });
        let mut proxy_conn = connect(relay.local_addr());
        let mut first = received;
        first.extend_from_slice(b"hi");
        proxy_conn.write_all(&first).unwrap();
        let got = t.join().unwrap();
        let (header, _) = proxy::parse(&got).unwrap();
        assert_eq!(
            header,
            proxy::Header::Proxy {
                src: expect_src.unwrap_or(proxy_conn.local_addr().unwrap()),
                dst: expect_dst.unwrap_or(relay.local_addr()),
            }
        );
        assert_eq!(&got[28..], b"hi");
    }
}

#[test]
fn a_connection_awaiting_its_header_at_a_drain_is_served_if_its_header_comes_in_time() {
    let server = echo_server(1, |c| from_loopback(c, NO_DEADLINE));
    let header = v2("192.0.2.1:1", "198.51.100.1:7000");
    let mut late = connect(server.local_addr());
    late.write_all(&header[..7]).unwrap();
    let mut never = connect(server.local_addr());
    never.write_all(&header[..7]).unwrap();
    wait_for("both to be held", || server.open_connections() == 2);
    server.begin_drain();
    let mut rest = header[7..].to_vec();
    rest.extend_from_slice(b"last words");
    late.write_all(&rest).unwrap();
    let mut back = [0u8; 10];
    late.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"last words");
    // Its echo, then FIN: the drain serves it like any connection.
    let (tail, clean) = read_to_end(&mut late);
    assert!(tail.is_empty() && clean);
    // The one whose header never came is refused at the drain deadline.
    assert!(read_to_end(&mut never).0.is_empty());
    assert_eq!(rejected(&server, RejectReason::ProxyHeader), 1);
    assert_eq!(total(&server, |s| s.accepted), 1);
}
