//! Issue 19: a close that leaves bytes undelivered is a reset, in every mode, never a
//! FIN that passes truncated data off as complete. Each peer reads whatever arrived
//! and must then get ECONNRESET. A pair that finished cleanly both ways still ends
//! with FIN both ways (the guards at the end).

mod util;

use std::io::Write;
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::sync::mpsc;
use std::time::Duration;

use edgepoll::metrics::ConnectError;
use edgepoll::CloseReason;
use util::*;

/// The relay's cap per direction: small, so that a stalled upstream leaves most of a
/// large stream unsent.
const RELAY_CAP: usize = 64 * 1024;

/// More than every buffer between a client and a stalled upstream can hold.
const FLOOD: u64 = 64 << 20;

/// How a connection (or relayed pair) is cut while a peer is not reading.
#[derive(Clone, Copy)]
enum Cut {
    IdleTimeout,
    DrainTimeout,
}

/// A client floods a relay whose upstream accepts but does not read; the pair is cut
/// by `cut`. The upstream then reads what arrived: a prefix of the stream, then a
/// reset. The client, which never got all its bytes through, is reset too.
fn a_cut_with_bytes_owed_resets_both_peers(splice: bool, cut: Cut) {
    const SEED: u64 = 19;
    let (accepted_tx, accepted_rx) = mpsc::channel();
    let (read_tx, read_rx) = mpsc::channel::<()>();
    let (up, t) = upstream_once(move |mut s| {
        accepted_tx.send(()).unwrap();
        read_rx.recv().unwrap();
        read_until_end(&mut s)
    });
    let relay = relay_server(1, vec![up], |c| {
        c.relay.splice = splice;
        c.max_pending_bytes = RELAY_CAP;
        match cut {
            Cut::IdleTimeout => c.idle_timeout = Some(Duration::from_secs(1)),
            Cut::DrainTimeout => c.drain_timeout = Duration::from_secs(1),
        }
    });
    let mut client = connect(relay.local_addr());
    accepted_rx
        .recv_timeout(PATIENCE)
        .expect("the upstream accepts");
    let sent = write_until_stalled(&client, SEED, FLOOD);
    assert!(
        sent > 2 * RELAY_CAP as u64,
        "only {sent} bytes went in before the path filled"
    );
    match cut {
        Cut::IdleTimeout => wait_for("the idle timeout to close the pair", || {
            total(&relay, |s| s.closed_for(CloseReason::IdleTimeout)) == 1
        }),
        Cut::DrainTimeout => {
            relay.begin_drain();
            wait_for("the drain to end", || relay.is_finished());
        }
    }
    read_tx.send(()).unwrap();
    let (got, ending) = t.join().unwrap();
    let (back, client_ending) = read_until_end(&mut client);
    assert_prefix(SEED, &got, sent);
    assert!(
        (got.len() as u64) < sent,
        "premise: the relay was cut with bytes owed to the upstream"
    );
    assert_reset(
        &format!("upstream (client sent {sent} bytes; the client saw {client_ending:?})"),
        got.len(),
        ending,
    );
    assert!(back.is_empty(), "the upstream never sent anything");
    assert_reset("client", back.len(), client_ending);
}

#[test]
fn relay_idle_timeout_with_bytes_owed_resets_both_peers_by_copying() {
    a_cut_with_bytes_owed_resets_both_peers(false, Cut::IdleTimeout);
}

#[test]
fn relay_idle_timeout_with_bytes_owed_resets_both_peers_with_splice() {
    a_cut_with_bytes_owed_resets_both_peers(true, Cut::IdleTimeout);
}

#[test]
fn relay_drain_timeout_with_bytes_owed_resets_both_peers_by_copying() {
    a_cut_with_bytes_owed_resets_both_peers(false, Cut::DrainTimeout);
}

#[test]
fn relay_drain_timeout_with_bytes_owed_resets_both_peers_with_splice() {
    a_cut_with_bytes_owed_resets_both_peers(true, Cut::DrainTimeout);
}

/// Echo holds everything a client sent (the cap is above it) while the client reads
/// nothing; `cut` then ends the connection with bytes owed and nothing unread, so
/// only the server's choice of close decides between FIN and RST.
fn echo_cut_with_bytes_owed_resets_the_client(cut: Cut) {
    const SEED: u64 = 20;
    const SIZE: usize = 8 << 20;
    let server = echo_server(1, |c| {
        c.max_pending_bytes = 2 * SIZE;
        match cut {
            Cut::IdleTimeout => c.idle_timeout = Some(Duration::from_secs(1)),
            Cut::DrainTimeout => c.drain_timeout = Duration::from_secs(1),
        }
    });
    let mut client = connect(server.local_addr());
    client.write_all(&pattern(SEED, 0, SIZE)).unwrap();
    wait_for("the server to read every byte", || {
        total(&server, |s| s.received_bytes) == SIZE as u64
    });
    wait_for("the server to hold bytes it owes", || {
        server.buffered_bytes() > 0
    });
    match cut {
        Cut::IdleTimeout => wait_for("the idle timeout to close", || {
            total(&server, |s| s.closed_for(CloseReason::IdleTimeout)) == 1
        }),
        Cut::DrainTimeout => {
            server.begin_drain();
            wait_for("the drain to end", || server.is_finished());
        }
    }
    let (back, ending) = read_until_end(&mut client);
    assert_prefix(SEED, &back, SIZE as u64);
    assert!(
        back.len() < SIZE,
        "premise: the server closed with bytes owed"
    );
    assert_reset(
        &format!("echo client (owed {SIZE} bytes)"),
        back.len(),
        ending,
    );
    // The operator sees the abort and exactly the bytes it destroyed: those in the
    // outbound buffer and those in the kernel's send queue, everything the client
    // did not get.
    let reason = match cut {
        Cut::IdleTimeout => CloseReason::IdleTimeout,
        Cut::DrainTimeout => CloseReason::Shutdown,
    };
    wait_for("the abort to be counted", || {
        total(&server, |s| s.aborted_for(reason)) == 1
    });
    assert_eq!(
        total(&server, |s| s.dropped_for(reason)),
        (SIZE - back.len()) as u64
    );
}

#[test]
fn echo_drain_timeout_with_bytes_owed_resets_a_client_that_never_reads() {
    echo_cut_with_bytes_owed_resets_the_client(Cut::DrainTimeout);
}

#[test]
fn echo_idle_timeout_with_bytes_owed_resets_a_client_that_never_reads() {
    echo_cut_with_bytes_owed_resets_the_client(Cut::IdleTimeout);
}

/// Guard: a client paused at the cap (its input unread in the kernel) is reset at
/// the drain deadline; a server that discarded that input to avoid the kernel's RST
/// would turn this into a FIN.
#[test]
fn echo_drain_timeout_resets_a_client_paused_at_the_cap() {
    const SEED: u64 = 21;
    let server = echo_server(1, |c| {
        c.max_pending_bytes = 64 * 1024;
        c.drain_timeout = Duration::from_secs(1);
    });
    let mut client = connect(server.local_addr());
    let sent = write_until_stalled(&client, SEED, FLOOD);
    wait_for("the pause at the cap", || {
        server.stats()[0].backpressure_pauses >= 1
    });
    server.begin_drain();
    wait_for("the drain to end", || server.is_finished());
    let (back, ending) = read_until_end(&mut client);
    assert_prefix(SEED, &back, sent);
    assert!((back.len() as u64) < sent, "premise: bytes were owed");
    assert_reset(
        &format!("echo client (sent {sent} bytes)"),
        back.len(),
        ending,
    );
}

/// A client sends a request and its FIN while the first upstream's connect hangs;
/// that one times out and the next refuses. The relay read the request and can
/// deliver it nowhere: a direct client would have been refused, so this one must be
/// reset, not answered with an empty, clean stream.
#[test]
fn a_client_that_sent_data_before_every_upstream_failed_is_reset() {
    const SEED: u64 = 22;
    const SIZE: usize = 100_000;
    let hole = blackhole();
    let dead = dead_address();
    let relay = relay_server(1, vec![hole.addr, dead], |c| {
        c.relay.connect_timeout = Duration::from_secs(1);
    });
    let mut client = connect(relay.local_addr());
    client.write_all(&pattern(SEED, 0, SIZE)).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let (back, ending) = read_until_end(&mut client);
    wait_for("the client to be closed for want of an upstream", || {
        total(&relay, |s| s.closed_for(CloseReason::UpstreamError)) == 1
    });
    // Premise: the relay took the whole request before giving up.
    assert_eq!(total(&relay, |s| s.received_bytes), SIZE as u64);
    let m = relay.metrics();
    assert_eq!(
        m.upstream_connect_errors(&hole.addr.to_string(), ConnectError::Timeout),
        1
    );
    assert_eq!(
        m.upstream_connect_errors(&dead.to_string(), ConnectError::Refused),
        1
    );
    assert!(back.is_empty());
    assert_reset("client", back.len(), ending);
}

/// Guard: a pair that finishes cleanly both ways ends with FIN both ways, exact
/// bytes, and no reset afterwards.
fn a_clean_pair_ends_with_fin_both_ways(splice: bool) {
    const SEED: u64 = 23;
    const SIZE: usize = 1 << 20;
    let (up, t) = upstream_once(|mut s| {
        let (request, ending) = read_until_end(&mut s);
        // Answer after the client's FIN, then send our own.
        s.write_all(&request).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        (request, ending, s)
    });
    let relay = relay_server(1, vec![up], |c| c.relay.splice = splice);
    let mut client = connect(relay.local_addr());
    let data = pattern(SEED, 0, SIZE);
    client.write_all(&data).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let (back, ending) = read_until_end(&mut client);
    let (request, up_ending, upstream) = t.join().unwrap();
    assert_eq!(up_ending, Ending::Fin, "the upstream saw the client's FIN");
    assert_same(&data, &request);
    assert_eq!(ending, Ending::Fin, "the client saw the upstream's FIN");
    assert_same(&data, &back);
    wait_for("the pair to close as eof", || {
        total(&relay, |s| s.closed_for(CloseReason::Eof)) == 1
    });
    assert_eq!(total(&relay, |s| s.closed_total()), 1);
    // A reset after the FINs would leave a pending error on a socket.
    for (who, fd) in [("client", client.as_fd()), ("upstream", upstream.as_fd())] {
        let err = edgepoll::sys::socket::take_error(fd).unwrap();
        assert!(err.is_none(), "{who} socket: {err:?} after a clean end");
    }
}

#[test]
fn guard_a_clean_pair_ends_with_fin_both_ways_by_copying() {
    a_clean_pair_ends_with_fin_both_ways(false);
}

#[test]
fn guard_a_clean_pair_ends_with_fin_both_ways_with_splice() {
    a_clean_pair_ends_with_fin_both_ways(true);
}
