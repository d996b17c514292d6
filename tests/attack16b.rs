//! attack16b: hostile tests of `--accept-proxy` (a trusted proxy that lies, dribbles,
//! floods and resets, and a reload in the middle of a header), of upstream names that
//! follow DNS (a name that answers the relay's own listener, hundreds of addresses, an
//! address removed under bulk pairs, a flapping file) and of `--tcp-keepalive` on the
//! sockets those features create. Real loopback sockets; exact bytes and counters.

mod util;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use edgepoll::config::{self, parse_cidr, parse_upstream, Keepalive, Settings};
use edgepoll::metrics::{AddressChange, ResolveResult};
use edgepoll::mode::proxy;
use edgepoll::sys::socket;
use edgepoll::{CloseReason, Config, Mode, RejectReason, Server, Sockets};
use util::*;

// ---------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------

const NO_DEADLINE: Duration = Duration::from_secs(600);

fn from_loopback(c: &mut Config, timeout: Duration) {
    c.accept_proxy = true;
    c.trusted_proxies = vec![parse_cidr("127.0.0.0/8").unwrap()];
    c.proxy_header_timeout = timeout;
}

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

/// A raw v2 header: command, family, and `body` (addresses and TLVs).
fn v2_raw(cmd: u8, family: u8, body: &[u8]) -> Vec<u8> {
    let mut out = proxy::SIGNATURE.to_vec();
    out.push(0x20 | cmd);
    out.push(family);
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn rejected(server: &Server, reason: RejectReason) -> u64 {
    server.metrics().rejected(reason)
}

fn active(server: &Server) -> i64 {
    server.stats().iter().map(|s| s.active).sum()
}

fn timer_entries(server: &Server) -> usize {
    server.stats().iter().map(|s| s.timer_entries).sum()
}

/// Sends `first` and expects the connection closed with nothing sent back.
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

/// Writes `data` from another thread while reading as many bytes back here (so a
/// large echo never deadlocks on full buffers); returns what came back.
fn echo_big(stream: &TcpStream, data: Vec<u8>) -> Vec<u8> {
    let mut w = stream.try_clone().unwrap();
    let n = data.len();
    let writer = std::thread::spawn(move || w.write_all(&data).unwrap());
    let mut back = vec![0u8; n];
    let mut r = stream.try_clone().unwrap();
    r.read_exact(&mut back).unwrap();
    writer.join().unwrap();
    back
}

fn reset(stream: TcpStream) {
    socket::set_linger_zero(stream.as_fd()).unwrap();
    drop(stream);
}

// DNS helpers (as tests/resolve.rs builds them).

/// Resolver tests run one at a time: one counts the resolver threads of this process.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

struct HostsFile {
    dir: PathBuf,
    path: PathBuf,
}

impl HostsFile {
    fn new(test: &str, text: &str) -> HostsFile {
        let dir =
            std::env::temp_dir().join(format!("edgepoll-attack16b-{}-{test}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let hosts = HostsFile {
            path: dir.join("hosts"),
            dir,
        };
        hosts.write(text);
        hosts
    }

    fn write(&self, text: impl AsRef<[u8]>) {
        let next = self.dir.join("hosts.next");
        std::fs::write(&next, text).unwrap();
        std::fs::rename(&next, &self.path).unwrap();
    }

    fn remove(&self) {
        std::fs::remove_file(&self.path).unwrap();
    }
}

impl Drop for HostsFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn pod(host: u8, port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, host], port))
}

fn pods(hosts: &[u8]) -> (u16, Vec<Server>) {
    for _ in 0..20 {
        let port = std::net::TcpListener::bind(pod(hosts[0], 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let started: Result<Vec<Server>, _> = hosts
            .iter()
            .map(|&h| {
                let mut config = Config::new(Mode::Echo);
                config.listen = vec![pod(h, port)];
                config.workers = 1;
                config.metrics_listen = None;
                Server::start(config)
            })
            .collect();
        if let Ok(servers) = started {
            return (port, servers);
        }
    }
    panic!("no port free on every one of 127.0.0.{hosts:?}");
}

fn relay_named(
    listen: SocketAddr,
    upstreams: &[&str],
    hosts: &HostsFile,
    tweak: impl FnOnce(&mut Settings),
) -> Server {
    let mut settings = Settings {
        listen: Some(vec![listen]),
        workers: Some(1),
        metrics_listen: Some(None),
        upstreams: Some(
            upstreams
                .iter()
                .map(|u| parse_upstream(u).unwrap())
                .collect(),
        ),
        resolve_interval: Some(Some(Duration::from_millis(100))),
        hosts_file: Some(hosts.path.clone()),
        ..Settings::default()
    };
    tweak(&mut settings);
    let config = config::load(Some(Mode::Relay), settings, None)
        .expect("the configuration loads")
        .config;
    Server::start(config).expect("relay starts")
}

fn up_active(relay: &Server, addr: SocketAddr) -> i64 {
    relay.metrics().upstream_active(&addr.to_string())
}

fn up_gauge(relay: &Server, addr: SocketAddr) -> i64 {
    relay.metrics().upstream_up(&addr.to_string())
}

fn connects(relay: &Server, addr: SocketAddr) -> u64 {
    relay.metrics().upstream_connects(&addr.to_string())
}

fn changes(relay: &Server, name: &str, change: AddressChange) -> u64 {
    relay.metrics().upstream_address_changes(name, change)
}

fn resolutions(relay: &Server, name: &str, result: ResolveResult) -> u64 {
    relay.metrics().upstream_resolutions(name, result)
}

fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == name)
        .count()
}

/// Polls `cond` for up to `limit`; whether it came true (never panics).
fn within(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

// ---------------------------------------------------------------------------------
// DNS
// ---------------------------------------------------------------------------------

/// A name that comes to answer the relay's own listening address must not make the
/// relay connect to itself: each such connect is accepted as a new client, which is
/// relayed to the same address again, and one client becomes a chain of pairs that
/// only `--max-connections` (or the descriptor limit) ends, taking the whole server's
/// capacity with it.
#[test]
fn a_name_that_resolves_to_the_relays_own_listener_does_not_make_it_a_loop() {
    let _one = one_at_a_time();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = pod(1, port);
    // At first the name answers an address where nothing listens.
    let hosts = HostsFile::new("self-loop", "127.0.0.3 loop.test\n");
    let name = format!("loop.test:{port}");
    let relay = relay_named(listen, &[&name], &hosts, |s| {
        s.max_connections = Some(40);
    });
    // DNS now answers the relay's own listener.
    hosts.write("127.0.0.1 loop.test\n");
    wait_for("the change to be counted", || {
        changes(&relay, &name, AddressChange::Added) == 1
    });

    let mut client = connect(relay.local_addr());
    let _ = client.write_all(b"ping");
    let _ = read_to_end(&mut client);
    drop(client);
    within(Duration::from_secs(10), || relay.open_connections() == 0);
    std::thread::sleep(Duration::from_millis(300)); // the counters are published
    let accepted = total(&relay, |s| s.accepted);
    let over = rejected(&relay, RejectReason::MaxConnections);
    let own = connects(&relay, listen);
    assert!(
        accepted == 1 && over == 0 && own == 0,
        "one client made the relay connect to its own listener {own} times: \
         {accepted} connections accepted, {over} refused at --max-connections"
    );
}

/// Hundreds of addresses for one name: the set takes them all, a client is served
/// through the one that answers, a failed lookup (the file gone) keeps all of them,
/// and the answer shrinking to one address removes exactly the others.
#[test]
fn hundreds_of_addresses_for_one_name_survive_a_failed_lookup_and_shrink_exactly() {
    let _one = one_at_a_time();
    let (port, _pods) = pods(&[2]);
    let mut text = String::new();
    for h in 2..=251u8 {
        text.push_str(&format!("127.0.0.{h} many.test\n"));
    }
    let hosts = HostsFile::new("many", "127.0.0.2 many.test\n");
    let name = format!("many.test:{port}");
    let relay = relay_named(sa("127.0.0.1:0"), &[&name], &hosts, |s| {
        s.connect_retries = Some(300);
    });
    hosts.write(&text);
    wait_for("249 addresses to be added", || {
        changes(&relay, &name, AddressChange::Added) == 249
    });
    // Every client reaches the one live pod, whatever dead addresses it tries first.
    for i in 0..5 {
        let mut s = connect(relay.local_addr());
        echo_roundtrip(&mut s, &pattern(i, 0, 2000));
    }
    assert_eq!(connects(&relay, pod(2, port)), 5);
    // The file vanishes: lookups fail, the 250 addresses stay.
    hosts.remove();
    let failed = resolutions(&relay, &name, ResolveResult::Failed);
    wait_for("two failed lookups", || {
        resolutions(&relay, &name, ResolveResult::Failed) >= failed + 2
    });
    assert_eq!(changes(&relay, &name, AddressChange::Removed), 0);
    let mut s = connect(relay.local_addr());
    echo_roundtrip(&mut s, b"still served during the outage");
    drop(s);
    hosts.write("127.0.0.2 many.test\n");
    wait_for("249 addresses to be removed", || {
        changes(&relay, &name, AddressChange::Removed) == 249
    });
    assert_eq!(changes(&relay, &name, AddressChange::Added), 249);
    for h in [3u8, 100, 251] {
        assert_eq!(
            up_gauge(&relay, pod(h, port)),
            0,
            "127.0.0.{h} left the set"
        );
    }
    wait_for("every pair to close", || relay.open_connections() == 0);
    assert_eq!(up_active(&relay, pod(2, port)), 0);
    drop(relay);
    // The thread has returned when `drop` does; its /proc entry can outlive the join
    // by a moment (the kernel wakes the joiner before it reaps the task).
    assert!(
        within(Duration::from_secs(5), || threads_named("edgepoll-dns")
            == 0),
        "the resolver stops with the server"
    );
}

/// An address removed while bulk pairs run both ways: every byte of every pair
/// arrives, in order; the removed address's gauges fall to 0 once its pairs close;
/// nothing is aborted.
#[test]
fn an_address_removed_under_bulk_pairs_keeps_every_byte_and_its_gauges_fall_to_zero() {
    let _one = one_at_a_time();
    let (port, _pods) = pods(&[2, 3]);
    let (old, new) = (pod(2, port), pod(3, port));
    let hosts = HostsFile::new("bulk", "127.0.0.2 bulk.test\n");
    let name = format!("bulk.test:{port}");
    let relay = relay_named(sa("127.0.0.1:0"), &[&name], &hosts, |s| {
        s.workers = Some(2);
    });
    let pairs: Vec<TcpStream> = (0..4).map(|_| connect(relay.local_addr())).collect();
    let mut sent = 0u64;
    for (i, p) in pairs.iter().enumerate() {
        let data = pattern(i as u64, 0, 300_000);
        assert_same(&data, &echo_big(p, data.clone()));
        sent += data.len() as u64;
    }
    assert_eq!(up_active(&relay, old), 4);
    hosts.write("127.0.0.3 bulk.test\n");
    wait_for("the removal", || {
        changes(&relay, &name, AddressChange::Removed) == 1
    });
    assert_eq!(up_gauge(&relay, old), 0);
    // The pairs go on, in both directions at once, after the removal.
    let threads: Vec<_> = pairs
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            std::thread::spawn(move || {
                let data = pattern(i as u64, 300_000, 700_000);
                assert_same(&data, &echo_big(&p, data.clone()));
                p.shutdown(Shutdown::Write).unwrap();
                let mut p = p;
                let (rest, ending) = read_until_end(&mut p);
                assert_eq!((rest.len(), ending), (0, Ending::Fin));
                data.len() as u64
            })
        })
        .collect();
    for t in threads {
        sent += t.join().unwrap();
    }
    let mut s = connect(relay.local_addr());
    echo_roundtrip(&mut s, b"new client");
    sent += 10;
    drop(s);
    assert_eq!(connects(&relay, new), 1);
    wait_for("every pair to close", || relay.open_connections() == 0);
    wait_for("the old address's pairs to be counted out", || {
        up_active(&relay, old) == 0
    });
    wait_for("the new address's pair to be counted out", || {
        up_active(&relay, new) == 0
    });
    wait_for("the counters to settle", || {
        total(&relay, |s| s.sent_bytes) == sent && active(&relay) == 0
    });
    assert_eq!(total(&relay, |s| s.received_bytes), sent);
    assert_eq!(total(&relay, |s| s.upstream_sent_bytes), sent);
    assert_eq!(total(&relay, |s| s.upstream_received_bytes), sent);
    let aborted: u64 = CloseReason::ALL
        .iter()
        .map(|&r| total(&relay, |s| s.aborted_for(r)))
        .sum();
    assert_eq!(aborted, 0);
    assert_eq!(up_gauge(&relay, old), 0);
    assert_eq!(up_gauge(&relay, new), 1);
}

/// A file that flaps between two answers (and sometimes vanishes) while clients keep
/// coming: every client is served, the set never empties, and the gauges end at 0.
#[test]
fn a_flapping_hosts_file_never_empties_the_set_and_loses_no_client() {
    let _one = one_at_a_time();
    let (port, _pods) = pods(&[2, 3]);
    let hosts = HostsFile::new("flap", "127.0.0.2 flap.test\n");
    let name = format!("flap.test:{port}");
    let relay = relay_named(sa("127.0.0.1:0"), &[&name], &hosts, |s| {
        s.resolve_interval = Some(Some(Duration::from_millis(10)));
    });
    let held = connect(relay.local_addr());
    let mut held = held;
    echo_roundtrip(&mut held, b"held");
    for round in 0..60u64 {
        match round % 4 {
            0 => hosts.write("127.0.0.3 flap.test\n"),
            1 => hosts.remove(),
            2 => hosts.write("127.0.0.2 flap.test\n127.0.0.3 flap.test\n"),
            _ => hosts.write("# nothing for the name\n127.0.0.9 other.test\n"),
        }
        let mut s = connect(relay.local_addr());
        echo_roundtrip(&mut s, &pattern(round, 0, 500));
        echo_roundtrip(&mut held, &pattern(1000 + round, 0, 100));
    }
    drop(held);
    wait_for("every pair to close", || relay.open_connections() == 0);
    for h in [2u8, 3] {
        wait_for("the gauges to fall to 0", || {
            up_active(&relay, pod(h, port)) == 0
        });
    }
    assert_eq!(
        total(&relay, |s| s.closed[CloseReason::UpstreamError as usize]),
        0
    );
}

// ---------------------------------------------------------------------------------
// PROXY
// ---------------------------------------------------------------------------------

/// Hundreds of half-headers from a trusted proxy: held within --max-connections, each
/// with no buffer, never counted active or accepted; the ones over the limit refused;
/// every permit and timer entry given back.
#[test]
fn hundreds_of_half_headers_are_bounded_and_every_count_comes_back() {
    let server = echo_server(1, |c| {
        from_loopback(c, NO_DEADLINE);
        c.max_connections = 150;
    });
    let header = v2("192.0.2.1:1", "198.51.100.1:7000");
    let mut held = Vec::new();
    for _ in 0..150 {
        let mut s = connect(server.local_addr());
        s.write_all(&header[..7]).unwrap();
        held.push(s);
    }
    wait_for("150 to be held", || server.open_connections() == 150);
    for _ in 0..50 {
        expect_refused(server.local_addr(), &header[..7]);
    }
    assert_eq!(rejected(&server, RejectReason::MaxConnections), 50);
    assert_eq!(server.open_connections(), 150);
    assert_eq!(active(&server), 0);
    assert_eq!(total(&server, |s| s.accepted), 0);
    assert_eq!(server.buffered_bytes(), 0);
    // 50 complete their header and are served; 50 close; 50 reset.
    let mut rest = header[7..].to_vec();
    rest.extend_from_slice(b"hello");
    let mut done = Vec::new();
    for (i, mut s) in held.into_iter().enumerate() {
        match i % 3 {
            0 => {
                s.write_all(&rest).unwrap();
                let mut back = [0u8; 5];
                s.read_exact(&mut back).unwrap();
                assert_eq!(&back, b"hello");
                done.push(s);
            }
            1 => s.shutdown(Shutdown::Write).unwrap(),
            _ => reset(s),
        }
    }
    drop(done);
    wait_for("every connection to be gone", || {
        server.open_connections() == 0
    });
    wait_for("every count to settle", || {
        total(&server, |s| s.accepted) == 50 && active(&server) == 0
    });
    assert_eq!(rejected(&server, RejectReason::ProxyHeader), 100);
    assert_eq!(total(&server, |s| s.received_bytes), 250);
    wait_for("no timer entry left", || timer_entries(&server) == 0);
}

/// Headers split at every byte (the longest v1 TCP6 line, a v2 with TLVs), then a
/// megabyte at once; and a header followed by a megabyte in one write: every byte
/// echoed, none of the header counted.
#[test]
fn headers_split_at_every_byte_or_followed_by_a_megabyte_leave_the_stream_exact() {
    let server = echo_server(2, |c| from_loopback(c, NO_DEADLINE));
    let full = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n".to_vec();
    let mut body = vec![10, 0, 0, 1, 10, 0, 0, 2, 0, 1, 0, 2];
    // TLVs: an ALPN, a unique ID of 128 bytes, and a NOOP whose length says 300 (more
    // than the header holds; the header's own length is what counts).
    body.extend_from_slice(&[0x01, 0x00, 0x02, b'h', b'2']);
    body.push(0x05);
    body.extend_from_slice(&128u16.to_be_bytes());
    body.extend_from_slice(&[0xab; 128]);
    body.extend_from_slice(&[0x04, 0x01, 0x2c]);
    let tlvs = v2_raw(1, 0x11, &body);
    let mut expected = 0u64;
    for (i, header) in [full, tlvs].into_iter().enumerate() {
        let mut s = connect(server.local_addr());
        for b in &header {
            s.write_all(&[*b]).unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
        let data = pattern(50 + i as u64, 0, 1 << 20);
        assert_same(&data, &echo_big(&s, data.clone()));
        expected += data.len() as u64;
    }
    for header in [
        v1("192.0.2.1:1", "198.51.100.1:7000"),
        v2("[2001:db8::1]:1", "[2001:db8::2]:7000"),
    ] {
        let mut s = connect(server.local_addr());
        let data = pattern(60, 0, 1 << 20);
        let mut first = header.clone();
        first.extend_from_slice(&data);
        // One write: the header and the megabyte together.
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || w.write_all(&first).unwrap());
        let mut back = vec![0u8; data.len()];
        s.read_exact(&mut back).unwrap();
        writer.join().unwrap();
        assert_same(&data, &back);
        // The header was consumed: nothing more comes back than the data.
        s.shutdown(Shutdown::Write).unwrap();
        let (tail, clean) = read_to_end(&mut s);
        assert_eq!((tail.len(), clean), (0, true));
        expected += data.len() as u64;
    }
    wait_for("the counters", || {
        total(&server, |s| s.received_bytes) == expected
    });
    wait_for("the echoes", || {
        total(&server, |s| s.sent_bytes) == expected
    });
    assert_eq!(rejected(&server, RejectReason::ProxyHeader), 0);
    assert_eq!(total(&server, |s| s.accepted), 4);
}

/// A trusted peer that lies in the ways the format allows: TLV lengths that overrun
/// the header (the header's length rules), a header at the 2,048-byte cap followed
/// at once by data, a second header (data for the mode), `UNKNOWN` with trailing
/// junk, ports 0 and 65535. And the ways it does not: a zone, a port over 65535, a v2
/// PROXY too short for its family, a v1 line with a NUL.
#[test]
fn lying_headers_are_read_to_their_exact_length_or_refused() {
    let server = echo_server(1, |c| from_loopback(c, NO_DEADLINE));
    let addr = server.local_addr();
    let mut at_cap_body = vec![192, 0, 2, 1, 198, 51, 100, 1, 0, 1, 0, 2];
    at_cap_body.extend_from_slice(&[0x04, 0xff, 0xff]); // a NOOP claiming 65535
    at_cap_body.resize(2048, 0x5a);
    let accepted_cases: Vec<Vec<u8>> = vec![
        v2_raw(1, 0x11, &at_cap_body),
        b"PROXY UNKNOWN ffff::1 whatever 99999 -1 junk\r\n".to_vec(),
        b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n".to_vec(),
        b"PROXY TCP6 ::ffff:192.0.2.1 ::1 1 2\r\n".to_vec(),
        v2_raw(0, 0x31, &[0u8; 5]), // LOCAL: the family and its length ignored
        v2_raw(1, 0x12, &[0u8; 12]), // UDP: treated as UNSPEC
    ];
    for (i, header) in accepted_cases.iter().enumerate() {
        let mut s = connect(addr);
        let mut first = header.clone();
        // A second header right after the first is the client's data.
        let second = v1("192.0.2.7:7", "198.51.100.1:7000");
        first.extend_from_slice(&second);
        first.extend_from_slice(b"tail");
        s.write_all(&first).unwrap();
        let mut back = vec![0u8; second.len() + 4];
        s.read_exact(&mut back).unwrap();
        assert_eq!(&back[..second.len()], &second[..], "case {i}");
        assert_eq!(&back[second.len()..], b"tail", "case {i}");
    }
    assert_eq!(rejected(&server, RejectReason::ProxyHeader), 0);
    let refused_cases: Vec<Vec<u8>> = vec![
        b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n".to_vec(),
        b"PROXY TCP6 fe80::1%25eth0 ::1 1 2\r\n".to_vec(),
        b"PROXY TCP4 192.0.2.1 198.51.100.1 1 99999\r\n".to_vec(),
        b"PROXY TCP4 192.0.2.1 198.51.100.1 +1 2\r\n".to_vec(),
        b"PROXY TCP4 192.0.2.1 198.51.100.1 1 2\0\r\n".to_vec(),
        b"PROXY UNKNOWN\r\r\n".to_vec(),
        v2_raw(1, 0x21, &[0u8; 35]),
        v2_raw(1, 0x11, &[0u8; 11]),
        v2_raw(2, 0x11, &[0u8; 12]),
        v2_raw(1, 0x41, &[0u8; 12]),
    ];
    for (i, bad) in refused_cases.iter().enumerate() {
        expect_refused(addr, bad);
        assert_eq!(
            rejected(&server, RejectReason::ProxyHeader),
            i as u64 + 1,
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    wait_for("every connection to be gone", || {
        server.open_connections() == 0
    });
    wait_for("every served one to be counted", || {
        total(&server, |s| s.accepted) == accepted_cases.len() as u64
    });
}

/// `--max-connections-per-ip` counted on the header's client and given back exactly,
/// however its connections end (FIN, reset, header never completed, refused over the
/// limit), over several rounds.
#[test]
fn per_ip_counts_of_header_clients_are_given_back_exactly_under_churn() {
    let server = echo_server(2, |c| {
        from_loopback(c, Duration::from_millis(400));
        c.max_connections_per_ip = Some(2);
    });
    let addr = server.local_addr();
    let open = |src: &str| {
        let mut s = connect(addr);
        s.write_all(&v1(src, "198.51.100.1:7000")).unwrap();
        s
    };
    let mut refused = 0;
    for round in 0..5u16 {
        let mut a = open(&format!("192.0.2.1:{}", 1000 + round));
        let mut b = open(&format!("192.0.2.1:{}", 2000 + round));
        echo_roundtrip(&mut a, b"a");
        echo_roundtrip(&mut b, b"b");
        // The third from the same client, through either version: refused.
        expect_refused(
            addr,
            &v2(&format!("192.0.2.1:{}", 3000 + round), "198.51.100.1:7000"),
        );
        refused += 1;
        assert_eq!(rejected(&server, RejectReason::PerIpLimit), refused);
        // Half-headers naming nobody yet hold no per-IP count.
        let mut half = connect(addr);
        half.write_all(b"PROXY TCP4 192.0.2.1 ").unwrap();
        // Another client is not affected.
        let mut c = open(&format!("192.0.2.2:{}", 1000 + round));
        echo_roundtrip(&mut c, b"c");
        // End them in different ways.
        a.shutdown(Shutdown::Write).unwrap();
        let _ = read_to_end(&mut a);
        reset(b);
        drop(c);
        assert!(
            read_to_end(&mut half).0.is_empty(),
            "refused at the deadline"
        );
        wait_for("every connection of the round to be gone", || {
            server.open_connections() == 0
        });
    }
    assert_eq!(rejected(&server, RejectReason::ProxyHeader), 5);
    // Exactly two again.
    let mut a = open("192.0.2.1:9001");
    let mut b = open("192.0.2.1:9002");
    echo_roundtrip(&mut a, b"a");
    echo_roundtrip(&mut b, b"b");
    expect_refused(addr, &v1("192.0.2.1:9003", "198.51.100.1:7000"));
    assert_eq!(rejected(&server, RejectReason::PerIpLimit), refused + 1);
    drop((a, b));
    wait_for("all gone", || server.open_connections() == 0);
    wait_for("active back to 0", || active(&server) == 0);
    wait_for("17 accepted", || {
        total(&server, |s| s.accepted) == 5 * 3 + 2
    });
}

/// `--idle-timeout` closes connections "with no traffic in either direction for this
/// long". A header's bytes are traffic: a connection whose header arrived slowly and
/// completed recently is not idle. (The connection's activity stamp is its accept
/// time until the mode first reads, so the idle timeout runs from the accept.)
#[test]
fn the_idle_timeout_counts_a_slow_headers_bytes_as_traffic() {
    let server = echo_server(1, |c| {
        from_loopback(c, NO_DEADLINE);
        c.idle_timeout = Some(Duration::from_millis(1000));
    });
    let mut s = connect(server.local_addr());
    // 20 bytes, one every 30 ms: the header completes about 600 ms after the accept.
    let header = v1("192.0.2.1:1", "198.51.100.1:7000");
    for b in &header[..header.len() - 1] {
        s.write_all(&[*b]).unwrap();
        std::thread::sleep(Duration::from_millis(600 / header.len() as u64));
    }
    s.write_all(&header[header.len() - 1..]).unwrap();
    // 600 ms after the last byte of traffic: well inside the 1 s idle timeout.
    std::thread::sleep(Duration::from_millis(600));
    s.write_all(b"still here").unwrap();
    let mut back = [0u8; 10];
    let got = s.read_exact(&mut back);
    assert!(
        got.is_ok() && &back == b"still here",
        "closed as idle {} ms after its header's last byte: {got:?} (closed: {:?})",
        600,
        total(&server, |s| s.closed_for(CloseReason::IdleTimeout))
    );
}

/// A peer that sends its header (and some data) and then resets, or resets halfway:
/// nothing stays counted, in echo and in relay (no upstream pair left behind).
#[test]
fn a_proxy_that_resets_around_its_header_leaves_no_count_behind() {
    let echo = echo_server(1, |c| from_loopback(c, NO_DEADLINE));
    let upstream = echo_server(1, |_| {});
    let relay = relay_server(1, vec![upstream.local_addr()], |c| {
        from_loopback(c, NO_DEADLINE);
        c.relay.send_proxy_v2 = true;
    });
    let header = v2("192.0.2.1:1", "198.51.100.1:7000");
    for server in [&echo, &relay] {
        for cut in [header.len(), header.len() + 3, 9] {
            let mut s = connect(server.local_addr());
            let mut first = header.clone();
            first.extend_from_slice(b"abc");
            s.write_all(&first[..cut]).unwrap();
            std::thread::sleep(Duration::from_millis(20));
            reset(s);
        }
        wait_for("every connection to be gone", || {
            server.open_connections() == 0
        });
        wait_for("active back to 0", || active(server) == 0);
        wait_for("each of the three to be counted once", || {
            total(server, |s| s.accepted) + rejected(server, RejectReason::ProxyHeader) == 3
        });
        std::thread::sleep(Duration::from_millis(200)); // two publish intervals
        assert_eq!(
            total(server, |s| s.accepted) + rejected(server, RejectReason::ProxyHeader),
            3
        );
    }
    wait_for("the relay's upstream pairs to be counted out", || {
        up_active(&relay, upstream.local_addr()) == 0
    });
    wait_for("the upstream's connections to be gone", || {
        upstream.open_connections() == 0
    });
}

/// A reload with connections in the middle of their header: the new process (which no
/// longer has `--accept-proxy`) finishes the header of one, counts it as the header's
/// client, refuses the one that never completes at the deadline it brought along, and
/// serves new clients without a header.
#[test]
fn a_reload_in_the_middle_of_a_header_keeps_its_deadline_and_counts_the_header_client() {
    let old = echo_server(1, |c| from_loopback(c, Duration::from_millis(1500)));
    let header = v1("192.0.2.1:4242", "198.51.100.1:7000");
    let mut finishing = connect(old.local_addr());
    finishing.write_all(&header[..9]).unwrap();
    let mut never = connect(old.local_addr());
    never.write_all(&header[..9]).unwrap();
    wait_for("both held", || old.open_connections() == 2);

    let (listeners, _) = old.listeners().unwrap();
    let mut config = Config::new(Mode::Echo);
    config.workers = 1;
    config.metrics_listen = None;
    config.max_connections_per_ip = Some(1);
    let new = Server::start_with(
        config,
        Sockets {
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
    assert_eq!(moved, 2);
    old.finish_hand_over();
    wait_for("both adopted", || new.open_connections() == 2);
    assert_eq!(active(&new), 0, "a connection mid-header is not active");

    let mut rest = header[9..].to_vec();
    rest.extend_from_slice(b"after the move");
    finishing.write_all(&rest).unwrap();
    let mut back = [0u8; 14];
    finishing.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"after the move");
    // The one that never completes is refused at the deadline it brought.
    assert!(read_to_end(&mut never).0.is_empty());
    assert_eq!(rejected(&new, RejectReason::ProxyHeader), 1);
    // New clients come without a header; 127.0.0.1 is not the header's client, so the
    // per-IP limit of 1 lets one in.
    let mut plain = connect(new.local_addr());
    echo_roundtrip(&mut plain, b"no header here");
    expect_refused(new.local_addr(), b"a second from 127.0.0.1");
    assert_eq!(rejected(&new, RejectReason::PerIpLimit), 1);
    wait_for("two accepted", || total(&new, |s| s.accepted) == 2);
    drop((finishing, plain));
    wait_for("all gone", || new.open_connections() == 0);
    wait_for("active 0", || active(&new) == 0);
}

// ---------------------------------------------------------------------------------
// Keepalive
// ---------------------------------------------------------------------------------

const KA: Keepalive = Keepalive {
    idle: Duration::from_secs(7),
    interval: Duration::from_secs(3),
    count: 4,
};

fn socket_between(local: SocketAddr, peer: SocketAddr) -> std::os::fd::OwnedFd {
    let mut found = None;
    wait_for(&format!("a socket from {local} to {peer}"), || {
        found = socket::find_connection(local, peer).unwrap();
        found.is_some()
    });
    found.unwrap()
}

/// The keepalive options are on a connection still in its header phase, and on the
/// upstream socket of an address that joined by DNS.
#[test]
fn keepalive_is_on_connections_mid_header_and_on_upstreams_added_by_dns() {
    let server = echo_server(1, |c| {
        from_loopback(c, NO_DEADLINE);
        c.tcp_keepalive = Some(KA);
        c.tcp_user_timeout = Some(Duration::from_millis(4321));
    });
    let mut s = connect(server.local_addr());
    s.write_all(b"PROXY TC").unwrap();
    wait_for("held", || server.open_connections() == 1);
    let fd = socket_between(s.peer_addr().unwrap(), s.local_addr().unwrap());
    let got = socket::keepalive_options(fd.as_fd()).unwrap();
    assert!(
        got.enabled
            && got.idle_secs == 7
            && got.interval_secs == 3
            && got.count == 4
            && got.user_timeout_ms == 4321,
        "{got:?}"
    );
    drop(fd);

    let _one = one_at_a_time();
    let listener2 = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    let port = listener2.local_addr().unwrap().port();
    let listener3 = match std::net::TcpListener::bind(pod(3, port)) {
        Ok(l) => l,
        Err(_) => return, // the port is taken on 127.0.0.3; nothing to check
    };
    let hosts = HostsFile::new("keepalive", "127.0.0.2 ka.test\n");
    let name = format!("ka.test:{port}");
    let relay = relay_named(sa("127.0.0.1:0"), &[&name], &hosts, |_| {});
    hosts.write("127.0.0.3 ka.test\n");
    wait_for("the change", || {
        changes(&relay, &name, AddressChange::Added) == 1
    });
    let mut client = connect(relay.local_addr());
    client.write_all(b"ping").unwrap();
    let (mut up, _) = listener3.accept().unwrap();
    up.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut got = [0u8; 4];
    up.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    let fd = socket_between(up.peer_addr().unwrap(), up.local_addr().unwrap());
    let got = socket::keepalive_options(fd.as_fd()).unwrap();
    assert!(
        got.enabled && got.idle_secs == 60 && got.interval_secs == 10 && got.count == 6,
        "the default upstream keepalive on a DNS-added upstream: {got:?}"
    );
    drop(listener2);
}
