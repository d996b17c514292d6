//! `--tcp-keepalive` and `--tcp-user-timeout`: the options are on the sockets, read
//! back with getsockopt, and the user timeout drops a peer that stops acknowledging.
//!
//! The server runs in this test's process, so the sockets it accepted and connected
//! are in this process's descriptor table: `socket::find_connection` finds one by its
//! two addresses in /proc/self/fd and duplicates it, and `socket::keepalive_options`
//! reads what the kernel has on it. That is the server's own socket, not a stand-in,
//! which a test hook or the listener's options alone would be.

mod util;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use edgepoll::config::{Keepalive, DEFAULT_UPSTREAM_KEEPALIVE};
use edgepoll::sys::socket::{self, KeepaliveOptions};
use edgepoll::{CloseReason, Config, Mode, Server, Sockets};
use util::*;

/// What the tests configure: values no kernel default has.
const KEEPALIVE: Keepalive = Keepalive {
    idle: Duration::from_secs(7),
    interval: Duration::from_secs(3),
    count: 4,
};
const USER_TIMEOUT: Duration = Duration::from_millis(12_345);

/// The options a socket has with `keepalive` and `user_timeout_ms` set.
fn on(keepalive: Keepalive, user_timeout_ms: u32) -> KeepaliveOptions {
    KeepaliveOptions {
        enabled: true,
        idle_secs: keepalive.idle.as_secs() as u32,
        interval_secs: keepalive.interval.as_secs() as u32,
        count: keepalive.count,
        user_timeout_ms,
    }
}

/// Whether a socket has keepalive off and no user timeout (its idle, interval and
/// count then do nothing, whatever they say).
#[track_caller]
fn assert_off(who: &str, got: KeepaliveOptions) {
    assert!(
        !got.enabled && got.user_timeout_ms == 0,
        "{who}: expected keepalive off and no user timeout, got {got:?}"
    );
}

/// A new descriptor of this process's socket from `local` to `peer`, once it exists
/// (an accepted connection has one once the acceptor has taken it).
fn socket_between(local: SocketAddr, peer: SocketAddr) -> OwnedFd {
    let mut found = None;
    wait_for(&format!("a socket from {local} to {peer}"), || {
        found = socket::find_connection(local, peer).unwrap();
        found.is_some()
    });
    found.unwrap()
}

/// The options of the server's end of `client`'s connection.
fn server_end(client: &TcpStream) -> KeepaliveOptions {
    let fd = socket_between(client.peer_addr().unwrap(), client.local_addr().unwrap());
    socket::keepalive_options(fd.as_fd()).unwrap()
}

/// The options of the relay's end of the connection `upstream` accepted.
fn relay_end(upstream: &TcpStream) -> KeepaliveOptions {
    let fd = socket_between(
        upstream.peer_addr().unwrap(),
        upstream.local_addr().unwrap(),
    );
    socket::keepalive_options(fd.as_fd()).unwrap()
}

fn tweak(keepalive: Option<Keepalive>, user_timeout: Option<Duration>) -> impl Fn(&mut Config) {
    move |c| {
        // As one `--tcp-keepalive` sets both (config::Settings::to_config).
        c.tcp_keepalive = keepalive;
        c.relay.upstream_keepalive = keepalive;
        c.tcp_user_timeout = user_timeout;
    }
}

/// An upstream the test plays itself: it accepts the relay's connection and answers
/// `ping` with `pong`, so the test holds the upstream's end of the pair.
struct Upstream {
    listener: TcpListener,
}

impl Upstream {
    fn new() -> Upstream {
        Upstream {
            listener: TcpListener::bind("127.0.0.1:0").unwrap(),
        }
    }

    fn addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap()
    }

    /// Relays `ping` from a new client to the upstream and `pong` back; returns the
    /// client and the upstream's end.
    fn pair(&self, relay: SocketAddr) -> (TcpStream, TcpStream) {
        let mut client = connect(relay);
        let (mut up, _) = self.listener.accept().unwrap();
        up.set_read_timeout(Some(PATIENCE)).unwrap();
        ping_pong(&mut client, &mut up);
        (client, up)
    }
}

/// `ping` from the client arrives at the upstream, `pong` from it at the client.
#[track_caller]
fn ping_pong(client: &mut TcpStream, up: &mut TcpStream) {
    client.write_all(b"ping").unwrap();
    let mut got = [0u8; 4];
    up.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    up.write_all(b"pong").unwrap();
    client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"pong");
}

#[test]
fn the_kernel_gives_accepted_sockets_the_listeners_options_from_the_handshake_on() {
    // What the server relies on, checked on this kernel: accepted sockets inherit
    // all five options from the listener, so setting them there is enough...
    let listener = socket::listen("127.0.0.1:0".parse().unwrap(), 16).unwrap();
    let addr = socket::local_addr(listener.as_fd()).unwrap();
    let l = listener.as_fd();
    socket::set_keepalive_idle(l, 7).unwrap();
    socket::set_keepalive_interval(l, 3).unwrap();
    socket::set_keepalive_count(l, 4).unwrap();
    socket::set_keepalive(l, true).unwrap();
    socket::set_user_timeout(l, 12_345).unwrap();
    let _first = connect(addr);
    let (accepted, _) = socket::accept(l).unwrap();
    assert_eq!(
        socket::keepalive_options(accepted.as_fd()).unwrap(),
        on(KEEPALIVE, 12_345)
    );
    // ...but a connection whose handshake completed before a change keeps what the
    // listener had then, which is why the acceptor sets the options itself on what
    // was queued before them.
    let _queued = connect(addr);
    socket::set_keepalive(l, false).unwrap();
    socket::set_user_timeout(l, 0).unwrap();
    let (queued, _) = socket::accept(l).unwrap();
    assert_eq!(
        socket::keepalive_options(queued.as_fd()).unwrap(),
        on(KEEPALIVE, 12_345)
    );
    let _later = connect(addr);
    let (later, _) = socket::accept(l).unwrap();
    assert_off(
        "accepted after the change",
        socket::keepalive_options(later.as_fd()).unwrap(),
    );
}

#[test]
fn client_sockets_carry_the_configured_keepalive_and_user_timeout_in_every_mode() {
    let expected = on(KEEPALIVE, USER_TIMEOUT.as_millis() as u32);
    let set = tweak(Some(KEEPALIVE), Some(USER_TIMEOUT));

    let echo = echo_server(2, &set);
    let mut client = connect(echo.local_addr());
    echo_roundtrip(&mut client, b"echoed with keepalive");
    assert_eq!(server_end(&client), expected, "echo");
    // The listener has them too: that is where accepted sockets take them from.
    let (listeners, _) = echo.listeners().unwrap();
    assert_eq!(
        socket::keepalive_options(listeners[0].as_fd()).unwrap(),
        expected
    );

    let http = http_server(2, &set);
    let mut client = connect(http.local_addr());
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let (statuses, raw, closed) = read_responses(&mut client, 1);
    assert_eq!((statuses, closed), (vec![200], false));
    assert!(raw.ends_with(b"\r\n\r\nHello, World!"), "{raw:?}");
    assert_eq!(server_end(&client), expected, "http");

    let upstream = Upstream::new();
    let relay = relay_server(2, vec![upstream.addr()], &set);
    let (client, up) = upstream.pair(relay.local_addr());
    assert_eq!(server_end(&client), expected, "relay client");
    assert_eq!(relay_end(&up), expected, "relay upstream");
}

#[test]
fn by_default_only_relays_upstream_sockets_have_keepalive() {
    let echo = echo_server(1, |_| {});
    let mut client = connect(echo.local_addr());
    echo_roundtrip(&mut client, b"x");
    assert_off("echo client", server_end(&client));

    let upstream = Upstream::new();
    let relay = relay_server(1, vec![upstream.addr()], |_| {});
    let (client, up) = upstream.pair(relay.local_addr());
    assert_off("relay client", server_end(&client));
    assert_eq!(relay_end(&up), on(DEFAULT_UPSTREAM_KEEPALIVE, 0));
    assert_eq!(
        (
            DEFAULT_UPSTREAM_KEEPALIVE.idle,
            DEFAULT_UPSTREAM_KEEPALIVE.interval
        ),
        (Duration::from_secs(60), Duration::from_secs(10))
    );
    assert_eq!(DEFAULT_UPSTREAM_KEEPALIVE.count, 6);

    // `--tcp-keepalive off` turns the upstream default off; a user timeout alone
    // goes on both sockets.
    let relay = relay_server(1, vec![upstream.addr()], tweak(None, Some(USER_TIMEOUT)));
    let (client, up) = upstream.pair(relay.local_addr());
    for (who, got) in [
        ("client", server_end(&client)),
        ("upstream", relay_end(&up)),
    ] {
        assert!(!got.enabled, "{who}: {got:?}");
        assert_eq!(got.user_timeout_ms, 12_345, "{who}");
    }
}

/// A listener as a previous process left it: keepalive on `old`, user timeout 9 s,
/// with one client whose handshake completed before the new server starts.
fn handed_listener(old: Option<Keepalive>) -> (OwnedFd, TcpStream) {
    let listener = socket::listen("127.0.0.1:0".parse().unwrap(), 16).unwrap();
    let l = listener.as_fd();
    match old {
        Some(k) => {
            socket::set_keepalive_idle(l, k.idle.as_secs() as u32).unwrap();
            socket::set_keepalive_interval(l, k.interval.as_secs() as u32).unwrap();
            socket::set_keepalive_count(l, k.count).unwrap();
            socket::set_keepalive(l, true).unwrap();
        }
        None => socket::set_keepalive(l, false).unwrap(),
    }
    socket::set_user_timeout(l, 9_000).unwrap();
    let queued = connect(socket::local_addr(l).unwrap());
    (listener, queued)
}

fn start_on(listener: OwnedFd, set: impl Fn(&mut Config)) -> Server {
    let mut config = Config::new(Mode::Echo);
    config.workers = 1;
    config.metrics_listen = None;
    set(&mut config);
    Server::start_with(
        config,
        Sockets {
            listeners: vec![listener],
            metrics: None,
        },
    )
    .expect("server starts")
}

#[test]
fn a_handed_over_listener_takes_this_configuration_off_included_and_so_do_queued_clients() {
    // A reload (or systemd) hands over a listener with keepalive on; this process's
    // configuration has it off. Its listener, the client queued before it started,
    // and a new client all end up off.
    let (listener, mut queued) = handed_listener(Some(KEEPALIVE));
    let server = start_on(listener, tweak(None, None));
    echo_roundtrip(&mut queued, b"queued before the start");
    assert_off("queued client", server_end(&queued));
    let mut fresh = connect(server.local_addr());
    echo_roundtrip(&mut fresh, b"after the start");
    assert_off("new client", server_end(&fresh));
    let (listeners, _) = server.listeners().unwrap();
    assert_off(
        "listener",
        socket::keepalive_options(listeners[0].as_fd()).unwrap(),
    );
    drop(listeners);
    server.shutdown();

    // And the other way: off before, on now.
    let (listener, mut queued) = handed_listener(None);
    let server = start_on(listener, tweak(Some(KEEPALIVE), Some(USER_TIMEOUT)));
    let expected = on(KEEPALIVE, 12_345);
    echo_roundtrip(&mut queued, b"queued before the start");
    assert_eq!(server_end(&queued), expected, "queued client");
    let mut fresh = connect(server.local_addr());
    echo_roundtrip(&mut fresh, b"after the start");
    assert_eq!(server_end(&fresh), expected, "new client");
}

#[test]
fn a_reload_gives_the_connections_it_moves_the_new_configuration() {
    // The old relay probes both sockets of its pair; the new one has keepalive off.
    // The pair moves in this process, as a reload moves it between two: the old
    // server's workers export it, the new server adopts it.
    let upstream = Upstream::new();
    let old = relay_server(
        1,
        vec![upstream.addr()],
        tweak(Some(KEEPALIVE), Some(USER_TIMEOUT)),
    );
    let (mut client, mut up) = upstream.pair(old.local_addr());
    let expected = on(KEEPALIVE, 12_345);
    assert_eq!(server_end(&client), expected, "client, before the move");
    assert_eq!(relay_end(&up), expected, "upstream, before the move");

    let (listeners, _) = old.listeners().unwrap();
    let mut config = Config::new(Mode::Relay);
    config.workers = 1;
    config.metrics_listen = None;
    config.relay.upstreams = vec![upstream.addr()];
    tweak(None, None)(&mut config);
    let new = Server::start_with(
        config,
        Sockets {
            listeners,
            metrics: None,
        },
    )
    .expect("the new server starts");
    // The new server took the shared listener: the old one drains nothing.
    let handover = old.hand_over(vec![false]);
    let mut done = 0;
    let mut moved = 0;
    while done < handover.workers {
        match handover
            .rx
            .recv_timeout(PATIENCE)
            .expect("the old workers export")
        {
            Some(conn) => {
                new.adopt(conn);
                moved += 1;
            }
            None => done += 1,
        }
    }
    assert_eq!(moved, 1);
    old.finish_hand_over();

    ping_pong(&mut client, &mut up);
    assert_off("client, after the move", server_end(&client));
    assert_off("upstream, after the move", relay_end(&up));
    assert_eq!(new.open_connections(), 1);
}

/// Writes to `server` without reading until every buffer on the way is full: the
/// server's socket then holds echoed bytes the client's zero window will not take.
fn hold_a_zero_window(server: SocketAddr, seed: u64) -> (TcpStream, u64) {
    let client = connect(server);
    let sent = write_until_stalled(&client, seed, 256 << 20);
    assert!(sent < 256 << 20, "the server never stopped taking bytes");
    (client, sent)
}

#[test]
fn the_user_timeout_drops_a_client_that_leaves_its_echo_unacknowledged() {
    // A client that never reads advertises a zero window once its receive buffer is
    // full, and the kernel probes it forever: without a user timeout (and with
    // echo's default of no idle timeout) it holds its connection and the server's
    // buffers for good. With one, the server's kernel gives up on it.
    let cut = echo_server(1, tweak(None, Some(Duration::from_secs(1))));
    let control = echo_server(1, |_| {});
    let (mut client, sent) = hold_a_zero_window(cut.local_addr(), 1);
    let (_held, _) = hold_a_zero_window(control.local_addr(), 2);

    wait_for("the user timeout to drop the client", || {
        total(&cut, |s| s.closed_total()) == 1
    });
    let stats = |s: &Server, f: &dyn Fn(&edgepoll::WorkerStats) -> u64| total(s, f);
    assert_eq!(stats(&cut, &|s| s.closed_for(CloseReason::Error)), 1);
    // Owed bytes were destroyed: an abort, never a FIN.
    assert_eq!(stats(&cut, &|s| s.aborted_for(CloseReason::Error)), 1);
    assert_eq!(cut.open_connections(), 0);
    // What the client finally reads is a prefix of what it sent, then a reset.
    let unsent = socket::unsent_bytes(client.as_fd()).unwrap() as u64;
    let (got, ending) = read_until_end(&mut client);
    assert_prefix(1, &got, sent);
    assert_reset("the client", got.len(), ending);
    // The server dropped exactly what it had taken and the client never got.
    assert_eq!(
        stats(&cut, &|s| s.dropped_for(CloseReason::Error)),
        sent - unsent - got.len() as u64
    );

    // The same client against a server without the option is still held.
    assert_eq!(control.open_connections(), 1);
    assert_eq!(total(&control, |s| s.closed_total()), 0);
}

#[test]
fn the_user_timeout_drops_an_upstream_that_stops_reading_and_resets_the_client() {
    // The upstream accepts and never reads: the relay's upstream socket sits on a
    // zero window with the client's bytes. The user timeout ends the pair, and the
    // client learns it from a reset.
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let relay = relay_server(1, vec![upstream.local_addr().unwrap()], |c| {
        c.tcp_user_timeout = Some(Duration::from_secs(1));
    });
    let client = connect(relay.local_addr());
    let (_silent, _) = upstream.accept().unwrap();
    let sent = write_until_stalled(&client, 3, 256 << 20);
    assert!(sent < 256 << 20, "the relay never stopped taking bytes");

    wait_for("the user timeout to drop the upstream", || {
        total(&relay, |s| s.closed_total()) == 1
    });
    assert_eq!(total(&relay, |s| s.closed_for(CloseReason::Error)), 1);
    assert_eq!(total(&relay, |s| s.aborted_for(CloseReason::Error)), 1);
    let mut client = client;
    let (got, ending) = read_until_end(&mut client);
    assert_eq!(got.len(), 0, "the upstream never sent anything");
    assert_reset("the client", 0, ending);
}
