//! Issue 14: promises that slow and hostile peers must not break. A close-delimited
//! HTTP response arrives whole to a slow reader; a header timeout never cuts the
//! responses owed before it; a relay forwards everything it received from a peer
//! before that peer's reset, then the reset.

mod util;

use std::io::{ErrorKind, Write};
use std::os::fd::AsFd;
use std::sync::mpsc;
use std::time::Duration;

use edgepoll::sys::socket::set_linger_zero;
use util::*;

/// How long a slow client waits before it starts reading: past a 1 s header timeout.
const SLOW_READER_WAIT: Duration = Duration::from_millis(2500);

/// Where the head of the response at the start of `raw` ends (after its blank line).
#[track_caller]
fn head_end(raw: &[u8]) -> usize {
    raw.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
        .unwrap_or_else(|| panic!("no complete response head in {} bytes", raw.len()))
}

/// A client asks for an 8 MiB body on a connection that closes after it, then does
/// not read for longer than `--header-timeout`: the response is owed, not timed out,
/// and must arrive whole, followed by FIN (issue 14, item 1).
fn a_close_delimited_response_arrives_whole_to_a_slow_reader(request: &[u8]) {
    const SIZE: usize = 8 << 20;
    let body = pattern(14, 0, SIZE);
    let server = http_server(1, |c| {
        c.http.body = body.clone();
        c.http.header_timeout = Duration::from_secs(1);
    });
    let mut client = connect(server.local_addr());
    client.write_all(request).unwrap();
    std::thread::sleep(SLOW_READER_WAIT);
    let (raw, ending) = read_until_end(&mut client);
    let start = head_end(&raw);
    let head = String::from_utf8_lossy(&raw[..start]);
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains("\r\nContent-Length: 8388608\r\n"), "{head}");
    let got = raw.len() - start;
    assert_eq!(
        got, SIZE,
        "response cut: got {got} of {SIZE} body bytes, then {ending:?}"
    );
    assert_same(&body, &raw[start..]);
    assert_eq!(ending, Ending::Fin);
}

#[test]
fn a_connection_close_response_arrives_whole_to_a_reader_slower_than_the_header_timeout() {
    a_close_delimited_response_arrives_whole_to_a_slow_reader(
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
}

#[test]
fn an_http_1_0_response_arrives_whole_to_a_reader_slower_than_the_header_timeout() {
    a_close_delimited_response_arrives_whole_to_a_slow_reader(b"GET / HTTP/1.0\r\n\r\n");
}

/// A complete request followed by the start of a second head that never completes,
/// from a client that reads only after the header timeout. The 408 is due, but
/// "after the responses already owed": the client gets the whole 200 and then the 408
/// and FIN, or, if the server gives up on the bytes it owes, a reset (issue 19). A
/// clean FIN after a cut 200 is what neither allows.
#[test]
fn a_header_timeout_never_passes_off_a_cut_response_as_complete() {
    const SIZE: usize = 4 << 20;
    let body = pattern(15, 0, SIZE);
    let server = http_server(1, |c| {
        c.http.body = body.clone();
        c.http.header_timeout = Duration::from_secs(1);
    });
    let mut client = connect(server.local_addr());
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHo")
        .unwrap();
    std::thread::sleep(SLOW_READER_WAIT);
    let (raw, ending) = read_until_end(&mut client);
    if ending == Ending::Error(ErrorKind::ConnectionReset) {
        return;
    }
    let start = head_end(&raw);
    let got = (raw.len() - start).min(SIZE);
    assert_eq!(
        got, SIZE,
        "the 200 was cut at {got} of {SIZE} body bytes, then {ending:?}"
    );
    assert_same(&body, &raw[start..start + SIZE]);
    let rest = String::from_utf8_lossy(&raw[start + SIZE..]);
    assert!(rest.starts_with("HTTP/1.1 408 "), "after the 200: {rest:?}");
    assert_eq!(ending, Ending::Fin);
}

/// What a relay read from one peer before that peer reset is forwarded to the other
/// whole, and only then the reset: the other peer, which starts reading only after the
/// reset, gets at least every byte the relay had counted, in order, then ECONNRESET
/// (issue 14, item 6). `from_upstream` picks the peer that sends and resets.
fn bytes_read_before_a_reset_are_forwarded_first(splice: bool, from_upstream: bool) {
    const SEED: u64 = 66;
    // By copying, the cap holds the whole stream, so the relay reads all of it; with
    // splice the relay reads what its pipe takes.
    const SIZE: u64 = 4 << 20;
    let (ready_tx, ready_rx) = mpsc::channel::<u64>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (up, t) = upstream_once(move |mut s| {
        if from_upstream {
            ready_tx.send(write_until_stalled(&s, SEED, SIZE)).unwrap();
            go_rx.recv().unwrap();
            set_linger_zero(s.as_fd()).unwrap();
            (Vec::new(), Ending::Fin)
        } else {
            ready_tx.send(0).unwrap();
            go_rx.recv().unwrap();
            read_until_end(&mut s)
        }
    });
    let relay = relay_server(1, vec![up], |c| {
        c.relay.splice = splice;
        c.max_pending_bytes = 2 * SIZE as usize;
    });
    let mut client = Some(connect(relay.local_addr()));
    let mut sent = ready_rx.recv_timeout(PATIENCE).unwrap();
    let relayed = if from_upstream {
        settled(|| total(&relay, |s| s.upstream_received_bytes))
    } else {
        let resetting = client.take().unwrap();
        sent = write_until_stalled(&resetting, SEED, SIZE);
        let relayed = settled(|| total(&relay, |s| s.received_bytes));
        set_linger_zero(resetting.as_fd()).unwrap();
        drop(resetting);
        relayed
    };
    assert!(
        relayed > 0,
        "premise: the relay read bytes before the reset"
    );
    go_tx.send(()).unwrap();
    let (got, ending, who) = if from_upstream {
        t.join().unwrap();
        // Not a speed bound: the relay may see the reset before the client reads.
        std::thread::sleep(Duration::from_millis(500));
        let (got, ending) = read_until_end(client.as_mut().unwrap());
        (got, ending, "client")
    } else {
        std::thread::sleep(Duration::from_millis(500));
        let (got, ending) = t.join().unwrap();
        (got, ending, "upstream")
    };
    assert_prefix(SEED, &got, sent);
    assert!(
        got.len() as u64 >= relayed,
        "{who}: got {} bytes, then {ending:?}; the relay had read {relayed} \
         (of {sent} sent) before the reset",
        got.len()
    );
    assert_reset(who, got.len(), ending);
}

#[test]
fn upstream_bytes_sent_before_its_reset_reach_the_client_first_by_copying() {
    bytes_read_before_a_reset_are_forwarded_first(false, true);
}

#[test]
fn upstream_bytes_sent_before_its_reset_reach_the_client_first_with_splice() {
    bytes_read_before_a_reset_are_forwarded_first(true, true);
}

#[test]
fn client_bytes_sent_before_its_reset_reach_the_upstream_first_by_copying() {
    bytes_read_before_a_reset_are_forwarded_first(false, false);
}

#[test]
fn client_bytes_sent_before_its_reset_reach_the_upstream_first_with_splice() {
    bytes_read_before_a_reset_are_forwarded_first(true, false);
}

/// A client that keeps flipping between a complete and a partial request head moves
/// its header deadline dozens of times a second, next to a far idle deadline: its
/// worker still holds one timer entry for it, and none once it is gone (issue 14,
/// item 4; the worker used to add an entry per flip, about 150 a second).
#[test]
fn a_connection_flipping_between_complete_and_partial_heads_holds_one_timer_entry() {
    let server = http_server(1, |c| {
        c.http.header_timeout = Duration::from_secs(1);
        c.idle_timeout = Some(Duration::from_secs(60));
    });
    let mut client = connect(server.local_addr());
    let started = std::time::Instant::now();
    let mut flips = 0;
    let mut most = 0;
    while started.elapsed() < Duration::from_secs(3) {
        // A whole request and the start of the next: the header timeout starts.
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HT")
            .unwrap();
        std::thread::sleep(Duration::from_millis(10));
        // The rest of it: the head is complete, the deadline is cleared.
        client.write_all(b"TP/1.1\r\nHost: a\r\n\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(10));
        flips += 1;
        most = most.max(server.stats()[0].timer_entries);
    }
    assert!(flips > 50, "only {flips} flips");
    assert!(most <= 1, "{most} timer entries for one connection");
    let (statuses, _, _) = read_responses(&mut client, 2 * flips);
    assert!(statuses.iter().all(|&s| s == 200));
    drop(client);
    wait_for("the closed connection's entry to leave the wheel", || {
        let s = &server.stats()[0];
        s.active == 0 && s.timer_entries == 0
    });
}
