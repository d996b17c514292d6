//! Relay's active health checks over real loopback sockets: an upstream that accepts
//! and then says nothing (a stopped process), one whose accept queue is full, one that
//! refuses; rise and fall; the verdict every worker follows; what happens when every
//! upstream is down.

mod util;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use edgepoll::config::{CheckKind, HealthCheck};
use edgepoll::metrics::CheckResult;
use edgepoll::{Config, Server};
use util::*;

/// Probes every 100 ms, 100 ms to answer, down after 2 failures, up after 2 passes:
/// quick enough for a test, slow enough for a loaded machine's loopback.
fn send_expect() -> HealthCheck {
    let mut check = HealthCheck::new(CheckKind::SendExpect);
    check.interval = Duration::from_millis(100);
    check.timeout = Duration::from_millis(100);
    check.rise = 2;
    check.fall = 2;
    check.send = b"PING\n".to_vec();
    check.expect = b"PING\n".to_vec();
    check
}

fn checked_relay(upstreams: Vec<SocketAddr>, check: HealthCheck) -> Server {
    relay_server(2, upstreams, |c: &mut Config| {
        c.relay.health_check = Some(check);
        c.relay.connect_timeout = Duration::from_millis(500);
    })
}

fn is_up(relay: &Server, addr: SocketAddr) -> bool {
    relay.metrics().upstream_up(&addr.to_string()) == 1
}

fn connects(relay: &Server, addr: SocketAddr) -> u64 {
    relay.metrics().upstream_connects(&addr.to_string())
}

/// `n` clients one after another, each echoing a line through the relay with a
/// bounded wait; returns how many got their line back.
fn echo_clients(relay: &Server, n: usize) -> usize {
    (0..n)
        .filter(|i| {
            let mut s = connect(relay.local_addr());
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let line = format!("client {i}\n");
            s.write_all(line.as_bytes()).unwrap();
            let mut back = vec![0; line.len()];
            s.read_exact(&mut back).is_ok() && back == line.as_bytes()
        })
        .count()
}

/// Serves `listener` as an echo upstream on a thread, from now on: the stopped
/// process resumes.
fn resume(listener: TcpListener) {
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

#[test]
fn a_stopped_upstream_that_still_accepts_gets_no_client_once_down_and_rejoins_after_rise() {
    let good = echo_server(1, |_| {});
    // Bound and listening, never accepting: the kernel completes every handshake and
    // the connection then hears nothing, as with `kill -STOP` on the upstream.
    let stopped = TcpListener::bind("127.0.0.1:0").unwrap();
    let stopped_addr = stopped.local_addr().unwrap();
    let relay = checked_relay(vec![good.local_addr(), stopped_addr], send_expect());

    wait_for("the stopped upstream to be marked down", || {
        !is_up(&relay, stopped_addr)
    });
    assert!(is_up(&relay, good.local_addr()));
    let label = stopped_addr.to_string();
    assert!(
        relay
            .metrics()
            .upstream_checks(&label, CheckResult::Timeout)
            >= 2
    );
    assert_eq!(
        relay.metrics().upstream_checks(&label, CheckResult::Passed),
        0
    );

    // Every client now goes to the good upstream, and every one is answered.
    let before = connects(&relay, good.local_addr());
    assert_eq!(echo_clients(&relay, 20), 20);
    assert_eq!(
        connects(&relay, stopped_addr),
        0,
        "a client went to the down upstream"
    );
    assert_eq!(connects(&relay, good.local_addr()) - before, 20);

    // The process resumes: after `rise` passed probes it takes clients again.
    resume(stopped);
    wait_for("the resumed upstream to rise", || {
        is_up(&relay, stopped_addr)
    });
    assert!(relay.metrics().upstream_checks(&label, CheckResult::Passed) >= 2);
    assert_eq!(echo_clients(&relay, 20), 20);
    assert!(
        connects(&relay, stopped_addr) > 0,
        "the risen upstream got no client"
    );
}

#[test]
fn an_upstream_whose_accept_queue_drops_syns_is_marked_down_by_tcp_checks() {
    let good = echo_server(1, |_| {});
    let hole = blackhole();
    let mut check = send_expect();
    check.kind = CheckKind::Tcp;
    check.send.clear();
    check.expect.clear();
    let relay = checked_relay(vec![hole.addr, good.local_addr()], check);
    wait_for("the black hole to be marked down", || {
        !is_up(&relay, hole.addr)
    });
    let label = hole.addr.to_string();
    assert!(
        relay
            .metrics()
            .upstream_checks(&label, CheckResult::Timeout)
            >= 2
    );
    assert!(
        relay
            .metrics()
            .upstream_checks(&good.local_addr().to_string(), CheckResult::Passed)
            >= 1
    );
    assert_eq!(echo_clients(&relay, 10), 10);
    assert_eq!(connects(&relay, hole.addr), 0);
    // No client even started a connect to it (a connect counts as active at once).
    assert_eq!(relay.metrics().upstream_active(&label), 0);
}

#[test]
fn a_wrong_answer_and_a_close_fail_the_probe() {
    // One upstream answers something else, one closes at once; both go down.
    let liar = TcpListener::bind("127.0.0.1:0").unwrap();
    let closer = TcpListener::bind("127.0.0.1:0").unwrap();
    let (liar_addr, closer_addr) = (liar.local_addr().unwrap(), closer.local_addr().unwrap());
    std::thread::spawn(move || {
        for s in liar.incoming() {
            let Ok(mut s) = s else { return };
            let _ = s.write_all(b"-ERR nope\r\n");
            // Held open, so the probe's verdict is the mismatch, not the close.
            std::thread::spawn(move || {
                let _ = s.read(&mut [0; 16]);
            });
        }
    });
    std::thread::spawn(move || {
        for s in closer.incoming() {
            drop(s);
        }
    });
    let relay = checked_relay(vec![liar_addr, closer_addr], send_expect());
    wait_for("both to be marked down", || {
        !is_up(&relay, liar_addr) && !is_up(&relay, closer_addr)
    });
    let m = relay.metrics();
    assert!(m.upstream_checks(&liar_addr.to_string(), CheckResult::Mismatch) >= 2);
    assert!(m.upstream_checks(&closer_addr.to_string(), CheckResult::Closed) >= 2);
    assert_eq!(
        m.upstream_checks(&liar_addr.to_string(), CheckResult::Passed),
        0
    );
}

#[test]
fn a_refused_connect_marks_an_upstream_down_at_once_until_probes_pass() {
    let good = echo_server(1, |_| {});
    let dead = dead_address();
    // Probes far apart: the failed connect, not a probe, must be what marks it down.
    let mut check = send_expect();
    check.interval = Duration::from_secs(3600);
    let relay = relay_server(1, vec![dead, good.local_addr()], |c| {
        c.relay.health_check = Some(check);
    });
    // The first client tries the dead upstream (worker 0 starts its turn there),
    // fails over, and is served.
    assert_eq!(echo_clients(&relay, 1), 1);
    assert_eq!(
        relay
            .metrics()
            .upstream_connect_errors(&dead.to_string(), edgepoll::metrics::ConnectError::Refused),
        1
    );
    assert!(!is_up(&relay, dead));
    // Down until probes pass, however long: no fail-timeout brings it back.
    assert_eq!(echo_clients(&relay, 10), 10);
    assert_eq!(
        relay
            .metrics()
            .upstream_connect_errors(&dead.to_string(), edgepoll::metrics::ConnectError::Refused),
        1,
        "a client was sent to an upstream marked down"
    );
}

#[test]
fn a_refused_upstream_rises_after_rise_probes_once_it_listens() {
    let good = echo_server(1, |_| {});
    let dead = dead_address();
    let relay = relay_server(1, vec![dead, good.local_addr()], |c| {
        c.relay.health_check = Some(send_expect());
    });
    wait_for("the dead upstream to be marked down", || {
        !is_up(&relay, dead)
    });
    let label = dead.to_string();
    assert!(
        relay
            .metrics()
            .upstream_checks(&label, CheckResult::ConnectError)
            >= 2
    );
    // It comes to life on the same port.
    let Ok(listener) = TcpListener::bind(dead) else {
        return; // the port was taken by someone else meanwhile: nothing to test
    };
    resume(listener);
    wait_for("it to rise", || is_up(&relay, dead));
    assert!(relay.metrics().upstream_checks(&label, CheckResult::Passed) >= 2);
}

#[test]
fn when_every_upstream_is_down_clients_try_them_anyway_in_turn() {
    // Both stopped: each accepts (kernel) and never answers a probe.
    let a = TcpListener::bind("127.0.0.1:0").unwrap();
    let b = TcpListener::bind("127.0.0.1:0").unwrap();
    let (a_addr, b_addr) = (a.local_addr().unwrap(), b.local_addr().unwrap());
    let relay = checked_relay(vec![a_addr, b_addr], send_expect());
    wait_for("both to be marked down", || {
        !is_up(&relay, a_addr) && !is_up(&relay, b_addr)
    });
    // Clients are still relayed: the verdict may be stale, and a client sent
    // somewhere is better than a client refused.
    let clients: Vec<TcpStream> = (0..4).map(|_| connect(relay.local_addr())).collect();
    wait_for("each client's upstream connect", || {
        connects(&relay, a_addr) + connects(&relay, b_addr) == 4
    });
    assert!(connects(&relay, a_addr) >= 1 && connects(&relay, b_addr) >= 1);
    drop(clients);
    drop((a, b));
}

#[test]
fn without_health_checks_the_up_gauge_follows_failed_and_successful_connects() {
    let good = echo_server(1, |_| {});
    let dead = dead_address();
    let relay = relay_server(1, vec![dead, good.local_addr()], |c| {
        c.relay.fail_timeout = Duration::from_millis(200);
    });
    assert!(is_up(&relay, dead));
    assert_eq!(echo_clients(&relay, 1), 1);
    assert!(!is_up(&relay, dead), "a refused upstream still shows up");
    assert!(is_up(&relay, good.local_addr()));
    // No prober: no probe is ever counted.
    assert_eq!(
        relay
            .metrics()
            .upstream_checks(&dead.to_string(), CheckResult::ConnectError),
        0
    );
}
