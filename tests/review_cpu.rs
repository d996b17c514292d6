//! Review guard, in its own test binary because it measures the process's CPU time:
//! peers that hold their connections in pathological states cost the server no CPU
//! (no connection left on the ready list, no timer re-armed every tick), and each
//! worker keeps at most one timer entry per connection.

mod util;

use std::io::Write;
use std::net::Shutdown;
use std::time::{Duration, Instant};

use util::*;

/// Guard: pathological peers that hold their connections (a relayed pair whose
/// upstream reset while its client, half-closed, reads nothing; an echo client,
/// half-closed, that reads nothing; an http client that pipelines and reads nothing)
/// cost no CPU while they hold, and the worker keeps one timer entry at most per
/// connection.
#[test]
fn guard_held_pathological_connections_cost_no_cpu() {
    use std::os::fd::AsFd;
    // Relay: the upstream sends 4 MiB and resets; the client half-closed and never
    // reads, so the pair holds the bytes it owes it.
    let (up, t) = upstream_once(|s| {
        let sent = write_until_stalled(&s, 40, 4 << 20);
        edgepoll::sys::socket::set_linger_zero(s.as_fd()).unwrap();
        sent
    });
    let relay = relay_server(1, vec![up], |c| c.max_pending_bytes = 8 << 20);
    let mut relay_client = connect(relay.local_addr());
    relay_client.shutdown(Shutdown::Write).unwrap();
    let up_sent = t.join().unwrap();
    // Echo: 8 MiB sent, then FIN, nothing read.
    let echo = echo_server(1, |c| c.max_pending_bytes = 16 << 20);
    let mut echo_client = connect(echo.local_addr());
    echo_client.write_all(&pattern(41, 0, 8 << 20)).unwrap();
    echo_client.shutdown(Shutdown::Write).unwrap();
    // http: pipelined requests for a 64 KiB body, never read.
    let http = http_server(1, |c| c.http.body = vec![b'y'; 64 << 10]);
    let http_client = connect(http.local_addr());
    let mut w = &http_client;
    w.write_all(&b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".repeat(2000))
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let before = process_cpu_time();
    let wall = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let used = process_cpu_time() - before;
    let share = used.as_secs_f64() / wall.elapsed().as_secs_f64();
    assert!(share < 0.05, "{:.1}% of a core while held", share * 100.0);
    for (name, server) in [("relay", &relay), ("echo", &echo), ("http", &http)] {
        let s = &server.stats()[0];
        assert_eq!(s.active, 1, "{name}: the connection is held");
        assert!(s.timer_entries <= 1, "{name}: {} entries", s.timer_entries);
    }
    // What the upstream sent before its reset reaches the half-closed client, then
    // the reset.
    let (got, ending) = read_until_end(&mut relay_client);
    assert_prefix(40, &got, up_sent);
    assert_eq!(got.len() as u64, up_sent);
    assert_reset("relay client", got.len(), ending);
    drop((echo_client, http_client));
}
