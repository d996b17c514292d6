//! Relay's per-upstream limits and the queue in front of them, over real loopback
//! sockets: clients past the limit wait (their bytes kept), get the next free slot in
//! arrival order across workers, and are closed when the queue is full or their wait
//! runs out; a client that leaves the queue gives its place up.

mod util;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::time::Duration;

use edgepoll::{CloseReason, Server};
use util::*;

fn limited_relay(
    workers: usize,
    upstreams: Vec<SocketAddr>,
    limit: usize,
    queue: usize,
    timeout: Duration,
) -> Server {
    relay_server(workers, upstreams, |c| {
        c.relay.max_conns_per_upstream = Some(limit);
        c.relay.max_queue = queue;
        c.relay.queue_timeout = timeout;
    })
}

/// A client whose pair is established: a line went through and back.
fn connected_client(relay: &Server, line: &[u8]) -> TcpStream {
    let mut s = connect(relay.local_addr());
    echo_roundtrip(&mut s, line);
    s
}

/// A client that connects and sends `early` while it waits in the queue.
fn queued_client(relay: &Server, early: &[u8], queued_before: i64) -> TcpStream {
    let mut s = connect(relay.local_addr());
    s.write_all(early).unwrap();
    wait_for("the client to be queued", || {
        relay.metrics().queue_length() == queued_before + 1
    });
    s
}

/// Reads exactly `expected.len()` bytes and compares them.
#[track_caller]
fn expect_back(s: &mut TcpStream, expected: &[u8]) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut back = vec![0; expected.len()];
    s.read_exact(&mut back)
        .expect("the queued client's bytes come back");
    assert_eq!(back, expected);
}

/// Nothing arrives within a short while: the client is still waiting.
#[track_caller]
fn expect_nothing_yet(s: &mut TcpStream) {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("a queued client got {other:?} before a slot freed"),
    }
}

#[test]
fn clients_past_the_limit_wait_with_their_bytes_and_are_served_as_slots_free() {
    let up = echo_server(1, |_| {});
    let relay = limited_relay(2, vec![up.local_addr()], 2, 2, Duration::from_secs(30));
    let label = up.local_addr().to_string();
    let a = connected_client(&relay, b"a\n");
    let b = connected_client(&relay, b"b\n");
    assert_eq!(relay.metrics().upstream_active(&label), 2);

    let mut c = queued_client(&relay, b"early c\n", 0);
    let mut d = queued_client(&relay, b"early d\n", 1);
    assert_eq!(
        relay.metrics().upstream_active(&label),
        2,
        "the limit was passed"
    );
    expect_nothing_yet(&mut c);

    // The queue is full: the next client is reset at once, and counted.
    let mut e = connect(relay.local_addr());
    let (_, ending) = read_until_end(&mut e);
    assert_reset("the client past a full queue", 0, ending);
    wait_for("the queue_full close to be counted", || {
        total(&relay, |s| s.closed_for(CloseReason::QueueFull)) == 1
    });

    // A slot frees: the first waiter gets it, with the bytes it sent while waiting.
    drop(a);
    expect_back(&mut c, b"early c\n");
    assert_eq!(relay.metrics().queue_length(), 1);
    expect_nothing_yet(&mut d);
    drop(b);
    expect_back(&mut d, b"early d\n");
    assert_eq!(relay.metrics().queue_length(), 0);
    assert_eq!(relay.metrics().queue_waits(), 2);
    echo_roundtrip(&mut c, b"and more");
    echo_roundtrip(&mut d, b"and more");
    assert_eq!(relay.metrics().upstream_active(&label), 2);
    assert_eq!(relay.metrics().upstream_connects(&label), 4);
}

#[test]
fn a_client_waiting_past_the_queue_timeout_is_reset_and_counted() {
    let up = echo_server(1, |_| {});
    let relay = limited_relay(1, vec![up.local_addr()], 1, 10, Duration::from_millis(300));
    let mut holder = connected_client(&relay, b"hold\n");
    let mut waiter = queued_client(&relay, b"never sent on", 0);
    let (got, ending) = read_until_end(&mut waiter);
    assert_reset("the client whose wait ran out", got.len(), ending);
    wait_for("the queue_timeout close to be counted", || {
        total(&relay, |s| s.closed_for(CloseReason::QueueTimeout)) == 1
    });
    assert_eq!(relay.metrics().queue_length(), 0);
    assert_eq!(relay.metrics().queue_waits(), 0);
    // The holder never noticed.
    echo_roundtrip(&mut holder, b"still here");
}

#[test]
fn a_client_that_leaves_the_queue_gives_its_place_up() {
    let up = echo_server(1, |_| {});
    let relay = limited_relay(1, vec![up.local_addr()], 1, 10, Duration::from_secs(30));
    let holder = connected_client(&relay, b"hold\n");
    let quitter = queued_client(&relay, b"bye", 0);
    // It gives up (a reset). A client that only half-closes stays queued: it may
    // still want its answer, as a half-closed client of any relayed pair does.
    edgepoll::sys::socket::set_linger_zero(quitter.as_fd()).unwrap();
    drop(quitter);
    wait_for("the quitter to leave the queue", || {
        relay.metrics().queue_length() == 0
    });
    let mut next = queued_client(&relay, b"mine\n", 0);
    drop(holder);
    // The slot goes to the client still waiting, not to the one that left.
    expect_back(&mut next, b"mine\n");
    assert_eq!(relay.metrics().queue_waits(), 1);
}

#[test]
fn slots_go_to_waiters_in_arrival_order_across_workers() {
    let up = echo_server(1, |_| {});
    // Four workers: consecutive clients land on different workers, so each slot
    // crosses from the worker that freed it to the one whose client waits longest.
    let relay = limited_relay(4, vec![up.local_addr()], 1, 10, Duration::from_secs(30));
    let mut holder = connected_client(&relay, b"hold\n");
    let waiters: Vec<TcpStream> = (0..4)
        .map(|i| queued_client(&relay, format!("w{i}\n").as_bytes(), i))
        .collect();
    for (i, mut w) in waiters.into_iter().enumerate() {
        // The holder leaves; the longest waiter, and only it, gets the slot.
        drop(holder);
        expect_back(&mut w, format!("w{i}\n").as_bytes());
        assert_eq!(relay.metrics().queue_length(), 3 - i as i64);
        holder = w;
    }
    assert_eq!(relay.metrics().queue_waits(), 4);
}

#[test]
fn each_upstream_has_its_own_limit_and_waiters_take_whichever_frees() {
    let a = echo_server(1, |_| {});
    let b = echo_server(1, |_| {});
    let relay = limited_relay(
        1,
        vec![a.local_addr(), b.local_addr()],
        1,
        10,
        Duration::from_secs(30),
    );
    let first = connected_client(&relay, b"1\n");
    let second = connected_client(&relay, b"2\n");
    let (la, lb) = (a.local_addr().to_string(), b.local_addr().to_string());
    assert_eq!(relay.metrics().upstream_active(&la), 1);
    assert_eq!(relay.metrics().upstream_active(&lb), 1);
    let mut third = queued_client(&relay, b"3\n", 0);
    // Whichever upstream frees, the waiter takes it.
    drop(second);
    expect_back(&mut third, b"3\n");
    assert_eq!(relay.metrics().upstream_active(&la), 1);
    assert_eq!(relay.metrics().upstream_active(&lb), 1);
    drop(first);
}
