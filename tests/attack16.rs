//! attack16: a hostile review of relay's active health checks (`src/upstream/health.rs`)
//! and the per-upstream limit with its queue (`src/upstream/queue.rs`). Each test names
//! the README promise it holds the code to; the ones that fail on the code as reviewed
//! are findings, and are left failing.
//!
//! Tests that need the machine to themselves (a thread count, a CPU guard) take the
//! write side of [`SERIAL`]; every other test takes the read side, so they still run
//! in parallel with each other.

mod util;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use edgepoll::config::{CheckKind, HealthCheck};
use edgepoll::metrics::{CheckResult, ConnectError};
use edgepoll::{CloseReason, Config, Server};
use util::*;

// ---------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------

static SERIAL: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    SERIAL.read().unwrap_or_else(|e| e.into_inner())
}

fn alone() -> RwLockWriteGuard<'static, ()> {
    SERIAL.write().unwrap_or_else(|e| e.into_inner())
}

/// A health check of `kind` probing every `interval_ms`, failing after `timeout_ms`.
fn check(
    kind: CheckKind,
    interval_ms: u64,
    timeout_ms: u64,
    send: &[u8],
    expect: &[u8],
) -> HealthCheck {
    let mut c = HealthCheck::new(kind);
    // A timeout above the interval is refused since the fix of
    // a_hung_upstream_is_down_within_fall_intervals_plus_the_timeout.
    c.interval = Duration::from_millis(interval_ms.max(timeout_ms));
    c.timeout = Duration::from_millis(timeout_ms);
    c.rise = 2;
    c.fall = 2;
    c.send = send.to_vec();
    c.expect = expect.to_vec();
    c
}

/// An upstream whose every connection is served by `serve` on a thread of its own.
fn upstream_each(serve: impl Fn(TcpStream) + Send + Sync + 'static) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let serve = Arc::new(serve);
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { return };
            let _ = s.set_read_timeout(Some(PATIENCE));
            let _ = s.set_write_timeout(Some(PATIENCE));
            let serve = Arc::clone(&serve);
            std::thread::spawn(move || serve(s));
        }
    });
    addr
}

/// Reads exactly `n` bytes (a probe's request); false if the stream ended first.
fn read_n(s: &mut TcpStream, n: usize) -> bool {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).is_ok()
}

/// Keeps the connection until its peer ends it; returns how it ended.
fn hold(mut s: TcpStream) -> Ending {
    read_until_end(&mut s).1
}

/// Echoes until EOF, then sends FIN.
fn echo(mut s: TcpStream) {
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = s.shutdown(Shutdown::Write);
}

/// An upstream that accepts (its process is alive enough for the kernel and the
/// accept loop) and never reads nor answers: a hung process.
fn hung_upstream() -> SocketAddr {
    let held = Arc::new(Mutex::new(Vec::new()));
    upstream_each(move |s| held.lock().unwrap().push(s))
}

/// An echo upstream that can be made to hang (new connections are accepted and never
/// read) and resume.
struct Switchable {
    addr: SocketAddr,
    hang: Arc<AtomicBool>,
}

impl Switchable {
    fn new(hung: bool) -> Switchable {
        let hang = Arc::new(AtomicBool::new(hung));
        let held = Arc::new(Mutex::new(Vec::new()));
        let h = Arc::clone(&hang);
        let addr = upstream_each(move |s| {
            if h.load(Ordering::SeqCst) {
                held.lock().unwrap().push(s);
            } else {
                echo(s);
            }
        });
        Switchable { addr, hang }
    }

    fn set_hung(&self, hung: bool) {
        self.hang.store(hung, Ordering::SeqCst);
    }
}

fn is_up(relay: &Server, addr: SocketAddr) -> bool {
    relay.metrics().upstream_up(&addr.to_string()) == 1
}

fn connects(relay: &Server, addr: SocketAddr) -> u64 {
    relay.metrics().upstream_connects(&addr.to_string())
}

fn active(relay: &Server, addr: SocketAddr) -> i64 {
    relay.metrics().upstream_active(&addr.to_string())
}

fn checks(relay: &Server, addr: SocketAddr, result: CheckResult) -> u64 {
    relay.metrics().upstream_checks(&addr.to_string(), result)
}

fn all_checks(relay: &Server, addr: SocketAddr) -> u64 {
    CheckResult::ALL
        .iter()
        .map(|&r| checks(relay, addr, r))
        .sum()
}

fn connect_errors(relay: &Server, addr: SocketAddr, reason: ConnectError) -> u64 {
    relay
        .metrics()
        .upstream_connect_errors(&addr.to_string(), reason)
}

fn closed(relay: &Server, reason: CloseReason) -> u64 {
    total(relay, |s| s.closed_for(reason))
}

fn aborted(relay: &Server, reason: CloseReason) -> u64 {
    total(relay, |s| s.aborted_for(reason))
}

fn limit(c: &mut Config, per_upstream: usize, queue: usize, timeout: Duration) {
    c.relay.max_conns_per_upstream = Some(per_upstream);
    c.relay.max_queue = queue;
    c.relay.queue_timeout = timeout;
}

/// A client that connects and sends `early`, then waits until the queue has grown.
fn queued_client(relay: &Server, early: &[u8], queued_before: i64) -> TcpStream {
    let mut s = connect(relay.local_addr());
    s.write_all(early).unwrap();
    wait_for("the client to be queued", || {
        relay.metrics().queue_length() == queued_before + 1
    });
    s
}

/// Reads exactly `expected.len()` bytes within 10 s and compares them; the panic
/// says how the stream ended instead.
#[track_caller]
fn expect_back(s: &mut TcpStream, expected: &[u8], who: &str) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut back = vec![0; expected.len()];
    if let Err(e) = s.read_exact(&mut back) {
        panic!(
            "{who}: expected its bytes {:?} back, but the read failed: {e}",
            String::from_utf8_lossy(expected)
        );
    }
    assert_eq!(back, expected, "{who}");
}

/// Nothing arrives within `ms`: the client is still waiting, neither served nor closed.
#[track_caller]
fn still_waiting(s: &mut TcpStream, ms: u64, why: impl FnOnce() -> String) {
    s.set_read_timeout(Some(Duration::from_millis(ms))).unwrap();
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("a waiting client got {other:?}: {}", why()),
    }
}

/// Threads of this process named `name`.
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == name)
        .count()
}

// ---------------------------------------------------------------------------------
// Findings: tests that fail on the code as reviewed
// ---------------------------------------------------------------------------------

/// README, Relay semantics: "a client is never sent to an upstream marked down while
/// another is up" (without health checks, "marked down" is "skipped for
/// `--fail-timeout`"); Upstream limits: a client waits when every upstream it may use
/// is full.
///
/// `Queue::dispatch` gives a slot on any upstream for which `is_up()` holds, and without
/// health checks that is always true: the fail-timeout (`failed_until_ms`) that
/// `Picker::pick` honours is ignored. The client that joins the queue dispatches every
/// upstream (`wait_in_queue`), so it is handed a slot on the upstream that just refused,
/// connects there, fails, queues, is handed it again, and is reset with
/// `upstream_error` once its tries are spent, while the live upstream it should wait
/// for is merely busy.
#[test]
fn a_waiter_is_never_handed_a_slot_on_an_upstream_skipped_for_fail_timeout() {
    let _g = shared();
    let good = echo_server(1, |_| {});
    let dead = dead_address();
    let relay = relay_server(1, vec![dead, good.local_addr()], |c| {
        c.relay.fail_timeout = Duration::from_secs(60);
        limit(c, 1, 10, Duration::from_secs(30));
    });
    // Worker 0 starts its turn at `dead`: the first client is refused there, fails
    // over, and holds the good upstream's only slot.
    let mut holder = connect(relay.local_addr());
    echo_roundtrip(&mut holder, b"holder\n");
    assert_eq!(connect_errors(&relay, dead, ConnectError::Refused), 1);
    assert!(!is_up(&relay, dead), "the refused upstream is skipped now");

    // The only live upstream is full: the next client must wait for it.
    let mut waiter = connect(relay.local_addr());
    // (The write itself may already meet the reset, and a read after it then sees 0.)
    let wrote = waiter.write_all(b"waiter\n");
    still_waiting(&mut waiter, 500, || {
        format!(
            "(its write: {wrote:?}) it was sent to the upstream skipped for --fail-timeout ({} refused connects \
             there, upstream_error closes {}), while the live one it waits for is busy",
            connect_errors(&relay, dead, ConnectError::Refused),
            closed(&relay, CloseReason::UpstreamError)
        )
    });
    drop(holder);
    expect_back(&mut waiter, b"waiter\n", "the waiter");
    assert_eq!(
        connect_errors(&relay, dead, ConnectError::Refused),
        1,
        "a queued client was sent to the upstream skipped for --fail-timeout"
    );
}

/// README, Relay semantics: "When every upstream is down, clients try them anyway ...
/// refusing every client would turn a blip into an outage"; Upstream limits: "When a
/// pair closes ... its free slots go to the clients at the head of the queue at once".
///
/// `Queue::dispatch` returns at once for an upstream that is not `is_up()`, so when
/// every upstream is down (here: a health check that never matches) a freed slot is
/// never handed to a waiter, and `Picker::pick` answers `Full` to every new client as
/// long as someone waits. The waiter, and every client behind it, is reset by
/// `--queue-timeout` while the slot sits free.
#[test]
fn when_every_upstream_is_down_a_freed_slot_still_goes_to_the_waiter() {
    let _g = shared();
    let up = echo_server(1, |_| {});
    let addr = up.local_addr();
    let mut c = check(CheckKind::SendExpect, 50, 200, b"PING\n", b"NOPE");
    c.fall = 1;
    let relay = relay_server(1, vec![addr], |cfg| {
        cfg.relay.health_check = Some(c);
        limit(cfg, 1, 10, Duration::from_secs(3));
    });
    wait_for("the lone upstream to be marked down", || {
        !is_up(&relay, addr)
    });

    // Every upstream is down: clients are relayed anyway, and this one takes the slot.
    let mut holder = connect(relay.local_addr());
    echo_roundtrip(&mut holder, b"holder\n");
    let mut waiter = queued_client(&relay, b"waiter\n", 0);
    drop(holder);
    wait_for("the holder's slot to be given back", || {
        active(&relay, addr) <= 1
    });
    waiter
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let waited = Instant::now();
    let mut back = [0u8; 7];
    if let Err(e) = waiter.read_exact(&mut back) {
        std::thread::sleep(Duration::from_millis(200)); // let the workers publish
        panic!(
            "the waiter got no slot though the only upstream's slot was free: {e} after \
             {:?}; queue_timeout closes: {}, slots in use: {}",
            waited.elapsed(),
            closed(&relay, CloseReason::QueueTimeout),
            active(&relay, addr)
        );
    }
    assert_eq!(&back, b"waiter\n");
    assert_eq!(closed(&relay, CloseReason::QueueTimeout), 0);
}

/// README, Health checks: "Probes close with FIN". A `send-expect` probe reads only
/// `--health-check-expect`'s length and then drops its socket; when the answer was
/// longer (the README's own example: expect `+PONG` against Redis's `+PONG\r\n`), the
/// unread bytes make the kernel close with RST instead (`health.rs` `advance`, the
/// probe dropped in `run` with bytes still in its receive queue).
#[test]
fn probes_close_with_fin_even_when_the_answer_is_longer_than_expect() {
    let _g = shared();
    let (tx, endings) = std::sync::mpsc::channel::<Ending>();
    let tx = Mutex::new(tx);
    let redis = upstream_each(move |mut s| {
        if !read_n(&mut s, 6) {
            return;
        }
        let _ = s.write_all(b"+PONG\r\n");
        let ending = hold(s);
        let _ = tx.lock().unwrap().send(ending);
    });
    let relay = relay_server(1, vec![redis], |c| {
        c.relay.health_check = Some(check(CheckKind::SendExpect, 50, 500, b"PING\r\n", b"+PONG"));
    });
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(endings.recv_timeout(PATIENCE).expect("a probe"));
    }
    wait_for("three passed probes", || {
        checks(&relay, redis, CheckResult::Passed) >= 3
    });
    assert!(
        seen.iter().all(|e| *e == Ending::Fin),
        "the upstream saw its probes end as {seen:?}, not with FIN"
    );
}

/// README, flag table: `send-expect` "passes when the answer begins with
/// `--health-check-expect`", whatever its length (the configuration accepted any). The
/// probe read at most 4096 bytes, so at 4096 it asked `recvfrom` for 0 bytes, took the
/// 0 for the upstream's FIN and failed the probe as `closed`: an upstream that answered
/// exactly was marked down. Fixed by refusing an expect past 4096 bytes with a clear
/// error, and a 4096-byte one passes.
#[test]
fn an_expect_longer_than_4096_bytes_can_pass() {
    let _g = shared();
    let up = echo_server(1, |_| {});
    let addr = up.local_addr();
    let long = pattern(16, 0, 5000);
    let mut config = edgepoll::Config::new(edgepoll::Mode::Relay);
    config.relay.upstreams = vec![addr];
    config.relay.health_check = Some(check(CheckKind::SendExpect, 50, 1000, &long, &long));
    assert_eq!(
        config.validate().unwrap_err().to_string(),
        "health-check-expect (--health-check-expect): at most 4096 bytes, got 5000"
    );
    let bytes = pattern(16, 0, 4096);
    let relay = relay_server(1, vec![addr], |c| {
        c.relay.health_check = Some(check(CheckKind::SendExpect, 50, 50, &bytes, &bytes));
    });
    wait_for("three probes", || all_checks(&relay, addr) >= 3);
    assert_eq!(
        checks(&relay, addr, CheckResult::Closed),
        0,
        "an echo upstream answering the expected 4096 bytes failed its probes as closed"
    );
    assert!(is_up(&relay, addr));
}

/// README, Health checks: "After `--fall` x `--health-check-interval` (plus the
/// timeout) at most, no new client goes to a hung upstream". `--health-check-timeout`
/// could be set above the interval (only its default was capped), and a target starts
/// its next probe only once the last one ended, so a hung upstream was probed once per
/// timeout: marked down after `fall` x timeout, past the promise. Fixed by refusing a
/// timeout above the interval; the bound then holds by construction (each gap at most
/// 1.1 x interval, as the README now says).
#[test]
fn a_hung_upstream_is_down_within_fall_intervals_plus_the_timeout() {
    let mut config = edgepoll::Config::new(edgepoll::Mode::Relay);
    config.relay.upstreams = vec!["127.0.0.1:9".parse().unwrap()];
    let mut c = HealthCheck::new(CheckKind::SendExpect);
    c.interval = Duration::from_millis(100);
    c.timeout = Duration::from_millis(1000);
    c.send = b"PING\n".to_vec();
    c.expect = b"PING\n".to_vec();
    config.relay.health_check = Some(c);
    assert_eq!(
        config.validate().unwrap_err().to_string(),
        "health-check-timeout (--health-check-timeout) 1s: at most the interval (100ms)"
    );
}

/// The library accepts the same upstream twice (`RelayConfig::validate` does not
/// refuse it; only the command line's settings drop repeats). The prober keys its
/// targets by address (`HashMap<SocketAddr, Target>`), so the second `Upstream` of
/// that address is never probed and stays up: once the first is marked down, clients
/// still go to the hung upstream through the second, while its gauge (shared by
/// label) says 0.
#[test]
fn a_repeated_upstream_address_is_never_sent_clients_once_marked_down() {
    let _g = shared();
    let good = echo_server(1, |_| {});
    let hung = hung_upstream();
    let relay = relay_server(1, vec![hung, hung, good.local_addr()], |c| {
        c.relay.health_check = Some(check(CheckKind::SendExpect, 50, 150, b"PING\n", b"PING\n"));
    });
    wait_for("the hung upstream to be marked down", || {
        !is_up(&relay, hung)
    });
    let clients: Vec<TcpStream> = (0..10).map(|_| connect(relay.local_addr())).collect();
    wait_for("every client's upstream connect", || {
        connects(&relay, hung) + connects(&relay, good.local_addr()) == 10
    });
    assert_eq!(
        connects(&relay, hung),
        0,
        "clients were sent to an upstream whose gauge says down"
    );
    drop(clients);
}

// ---------------------------------------------------------------------------------
// Attacks that hold: health checks
// ---------------------------------------------------------------------------------

/// README, Health checks and the metrics table: each probe is counted once, under the
/// result its upstream earned. Upstreams that answer byte by byte, answer the prefix
/// then garbage, answer a megabyte, answer wrong, read and reset, read and half-close,
/// never read, or refuse; `fall` 2: the failing ones go down, the others stay up.
#[test]
fn each_hostile_upstream_earns_exactly_its_own_probe_result() {
    let _g = shared();
    let hold_after = |answer: &'static [u8]| {
        move |mut s: TcpStream| {
            if read_n(&mut s, 5) {
                let _ = s.write_all(answer);
                hold(s);
            }
        }
    };
    let slow = upstream_each(|mut s| {
        if read_n(&mut s, 5) {
            for b in b"PONG\n" {
                if s.write_all(&[*b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            hold(s);
        }
    });
    let prefix_then_garbage = upstream_each(hold_after(b"PONG\n\xff\x00garbage"));
    let huge = upstream_each(|mut s| {
        if read_n(&mut s, 5) {
            let _ = s.write_all(b"PONG\n");
            let chunk = vec![b'x'; 65536];
            for _ in 0..16 {
                if s.write_all(&chunk).is_err() {
                    return;
                }
            }
            hold(s);
        }
    });
    let liar = upstream_each(hold_after(b"-ERR\n"));
    let resetter = upstream_each(|mut s| {
        if read_n(&mut s, 5) {
            edgepoll::sys::socket::set_linger_zero(s.as_fd()).unwrap();
        }
    });
    let half_closer = upstream_each(|mut s| {
        if read_n(&mut s, 5) {
            let _ = s.shutdown(Shutdown::Write);
            hold(s);
        }
    });
    let deaf = hung_upstream();
    let dead = dead_address();
    let cases = [
        (slow, CheckResult::Passed),
        (prefix_then_garbage, CheckResult::Passed),
        (huge, CheckResult::Passed),
        (liar, CheckResult::Mismatch),
        (resetter, CheckResult::Closed),
        (half_closer, CheckResult::Closed),
        (deaf, CheckResult::Timeout),
        (dead, CheckResult::ConnectError),
    ];
    let relay = relay_server(1, cases.iter().map(|c| c.0).collect(), |c| {
        c.relay.health_check = Some(check(CheckKind::SendExpect, 100, 500, b"PING\n", b"PONG\n"));
    });
    wait_for("three probes of each", || {
        cases.iter().all(|&(a, _)| all_checks(&relay, a) >= 3)
    });
    for (i, &(addr, expected)) in cases.iter().enumerate() {
        let counts: Vec<(CheckResult, u64)> = CheckResult::ALL
            .iter()
            .map(|&r| (r, checks(&relay, addr, r)))
            .collect();
        let total: u64 = counts.iter().map(|c| c.1).sum();
        assert_eq!(
            checks(&relay, addr, expected),
            total,
            "case {i}: expected only {expected:?}, got {counts:?}"
        );
        let want_up = expected == CheckResult::Passed;
        wait_for("the verdict", || is_up(&relay, addr) == want_up);
    }
}

/// README, Health checks: an upstream that was up and hangs (a stopped process) gets
/// no new client once marked down, from any worker; once it resumes, `rise` passed
/// probes bring it back and it takes clients again.
#[test]
fn an_upstream_that_hangs_while_serving_gets_no_client_once_down_and_rejoins() {
    let _g = shared();
    let good = echo_server(1, |_| {});
    let flaky = Switchable::new(false);
    let relay = relay_server(4, vec![flaky.addr, good.local_addr()], |c| {
        c.relay.health_check = Some(check(CheckKind::SendExpect, 50, 200, b"PING\n", b"PING\n"));
    });
    wait_for("passed probes", || {
        checks(&relay, flaky.addr, CheckResult::Passed) >= 2
    });
    let echo_clients = |n: usize| {
        for i in 0..n {
            let mut s = connect(relay.local_addr());
            echo_roundtrip(&mut s, format!("client {i}\n").as_bytes());
        }
    };
    echo_clients(20);
    assert!(connects(&relay, flaky.addr) > 0);

    flaky.set_hung(true);
    wait_for("the hung upstream to be marked down", || {
        !is_up(&relay, flaky.addr)
    });
    let before = (
        connects(&relay, flaky.addr),
        connects(&relay, good.local_addr()),
    );
    echo_clients(40);
    assert_eq!(
        connects(&relay, flaky.addr),
        before.0,
        "a client went to the upstream marked down"
    );
    assert_eq!(connects(&relay, good.local_addr()), before.1 + 40);

    flaky.set_hung(false);
    wait_for("the resumed upstream to rise", || is_up(&relay, flaky.addr));
    echo_clients(20);
    assert!(connects(&relay, flaky.addr) > before.0);
}

/// The prober copes with hundreds of upstreams: 150 hung ones (never accepting) and
/// two good ones; every hung one goes down, the good ones only ever pass, and every
/// client goes to a good one.
#[test]
fn a_hundred_and_fifty_hung_upstreams_are_all_found_and_get_no_client() {
    let _g = shared();
    let hung: Vec<TcpListener> = (0..150)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let goods = [echo_server(1, |_| {}), echo_server(1, |_| {})];
    let mut addrs: Vec<SocketAddr> = hung.iter().map(|l| l.local_addr().unwrap()).collect();
    addrs.extend(goods.iter().map(|g| g.local_addr()));
    let relay = relay_server(2, addrs.clone(), |c| {
        c.relay.health_check = Some(check(CheckKind::SendExpect, 100, 100, b"PING\n", b"PING\n"));
        c.relay.connect_timeout = Duration::from_secs(1);
    });
    wait_for("every hung upstream to be marked down", || {
        addrs[..150].iter().all(|&a| !is_up(&relay, a))
    });
    for g in &goods {
        let a = g.local_addr();
        assert!(is_up(&relay, a));
        assert!(checks(&relay, a, CheckResult::Passed) >= 1);
        assert_eq!(
            all_checks(&relay, a),
            checks(&relay, a, CheckResult::Passed)
        );
    }
    for &a in &addrs[..150] {
        assert_eq!(checks(&relay, a, CheckResult::Passed), 0, "{a}");
    }
    for i in 0..20 {
        let mut s = connect(relay.local_addr());
        echo_roundtrip(&mut s, format!("client {i}\n").as_bytes());
    }
    let to_hung: u64 = addrs[..150].iter().map(|&a| connects(&relay, a)).sum();
    assert_eq!(to_hung, 0, "clients went to hung upstreams");
    drop(hung);
}

/// The prober thread stops with the server, whether dropped or shut down: no
/// `edgepoll-health` thread is left behind.
#[test]
fn the_prober_thread_stops_with_the_server() {
    let _g = alone();
    let hung = hung_upstream();
    let before = threads_named("edgepoll-health");
    let start = || {
        relay_server(2, vec![hung], |c| {
            // Long interval and timeout: the prober sleeps in poll(2) when stopped.
            c.relay.health_check = Some(check(CheckKind::SendExpect, 30_000, 20_000, b"P", b"P"));
        })
    };
    let relay = start();
    // (A new thread names itself once it runs.)
    wait_for("the prober thread", || {
        threads_named("edgepoll-health") == before + 1
    });
    drop(relay);
    // The /proc entry of a joined thread can outlive the join by a moment.
    wait_for("no prober thread after drop", || {
        threads_named("edgepoll-health") == before
    });
    let relay = start();
    // (A new thread names itself once it runs.)
    wait_for("the prober thread", || {
        threads_named("edgepoll-health") == before + 1
    });
    relay.shutdown();
    // The /proc entry of a joined thread can outlive the join by a moment.
    wait_for("no prober thread after shutdown", || {
        threads_named("edgepoll-health") == before
    });
}

/// The prober never spins: with probes hanging on a deaf upstream, trickling from a
/// slow one and failing on a resetting one, the process uses a small fraction of a
/// core (a spin would show as a whole core).
#[test]
fn the_prober_costs_no_cpu_while_probes_hang_trickle_or_fail() {
    let _g = alone();
    let deaf = hung_upstream();
    let trickler = upstream_each(|mut s| {
        if read_n(&mut s, 1) {
            // One byte of the answer every 100 ms, never the whole of it in time.
            for b in b"PONGPONGPONG" {
                if s.write_all(&[*b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    });
    let resetter = upstream_each(|s| {
        edgepoll::sys::socket::set_linger_zero(s.as_fd()).unwrap();
    });
    let relay = relay_server(2, vec![deaf, trickler, resetter], |c| {
        c.relay.health_check = Some(check(
            CheckKind::SendExpect,
            300,
            250,
            b"P",
            b"PONGPONGPONGPONG",
        ));
    });
    std::thread::sleep(Duration::from_millis(500));
    let cpu = process_cpu_time();
    std::thread::sleep(Duration::from_secs(2));
    let used = process_cpu_time() - cpu;
    assert!(
        used < Duration::from_millis(500),
        "the process used {used:?} of CPU in 2 s with probes hanging"
    );
    assert!(all_checks(&relay, deaf) >= 3 && all_checks(&relay, trickler) >= 3);
    assert_eq!(checks(&relay, trickler, CheckResult::Passed), 0);
}

// ---------------------------------------------------------------------------------
// Attacks that hold: the queue
// ---------------------------------------------------------------------------------

/// README, Upstream limits: a client past a full queue and one whose wait ran out are
/// reset, each counted once (closed and aborted), the bytes the waiter sent counted as
/// dropped; the queue gauge follows exactly, and no slot is taken by either.
#[test]
fn queue_full_and_queue_timeout_are_resets_counted_once_and_take_no_slot() {
    let _g = shared();
    let up = echo_server(1, |_| {});
    let addr = up.local_addr();
    let relay = relay_server(1, vec![addr], |c| {
        limit(c, 1, 1, Duration::from_millis(600));
    });
    let mut holder = connect(relay.local_addr());
    echo_roundtrip(&mut holder, b"hold\n");
    let mut waiter = queued_client(&relay, b"abc", 0);
    wait_for("the waiter's bytes to be read", || {
        total(&relay, |s| s.received_bytes) == 5 + 3
    });

    let mut past = connect(relay.local_addr());
    let (got, ending) = read_until_end(&mut past);
    assert_reset("the client past the full queue", got.len(), ending);
    assert_eq!(relay.metrics().queue_length(), 1);

    let (got, ending) = read_until_end(&mut waiter);
    assert_reset("the client whose wait ran out", got.len(), ending);
    wait_for("both closes to be counted", || {
        closed(&relay, CloseReason::QueueFull) == 1
            && closed(&relay, CloseReason::QueueTimeout) == 1
    });
    let settled_closes = settled(|| total(&relay, |s| s.closed_total()));
    assert_eq!(settled_closes, 2, "closes counted more than once");
    assert_eq!(aborted(&relay, CloseReason::QueueFull), 1);
    assert_eq!(aborted(&relay, CloseReason::QueueTimeout), 1);
    assert_eq!(
        total(&relay, |s| s.dropped_for(CloseReason::QueueTimeout)),
        3
    );
    assert_eq!(relay.metrics().queue_length(), 0);
    assert_eq!(relay.metrics().queue_waits(), 0);
    assert_eq!(active(&relay, addr), 1);
    assert_eq!(connects(&relay, addr), 1);
    echo_roundtrip(&mut holder, b"still here");
    drop(holder);
    wait_for("the slot to be given back", || active(&relay, addr) == 0);
}

/// README, Upstream limits: "When ... an upstream comes up, its free slots go to the
/// clients at the head of the queue at once". An upstream that rises with no pair on
/// it takes the waiter, which the busy live upstream would have kept waiting.
#[test]
fn an_upstream_rising_with_no_pair_takes_the_waiter_at_once() {
    let _g = shared();
    let good = echo_server(1, |_| {});
    let flaky = Switchable::new(true);
    let relay = relay_server(1, vec![flaky.addr, good.local_addr()], |c| {
        let mut hc = check(CheckKind::SendExpect, 50, 200, b"PING\n", b"PING\n");
        hc.fall = 1;
        hc.rise = 1;
        c.relay.health_check = Some(hc);
        limit(c, 1, 10, Duration::from_secs(30));
    });
    wait_for("the hung upstream to be marked down", || {
        !is_up(&relay, flaky.addr)
    });
    let mut holder = connect(relay.local_addr());
    echo_roundtrip(&mut holder, b"holder\n");
    assert_eq!(connects(&relay, flaky.addr), 0);
    let mut waiter = queued_client(&relay, b"waiter\n", 0);
    flaky.set_hung(false);
    expect_back(
        &mut waiter,
        b"waiter\n",
        "the waiter, once an upstream rose",
    );
    assert_eq!(connects(&relay, flaky.addr), 1);
    assert_eq!(relay.metrics().queue_length(), 0);
    assert_eq!(relay.metrics().queue_waits(), 1);
    echo_roundtrip(&mut holder, b"untouched\n");
}

/// README, Upstream limits: a waiter's "bytes are kept meanwhile, under
/// `--max-pending-bytes` ... and forwarded once it is connected"; "one that only
/// half-closes stays". A waiter that sends until every buffer on the way is full
/// (reading paused at the cap) and then half-closes gets every byte echoed, in order,
/// then a FIN, once a slot frees.
#[test]
fn a_waiter_that_fills_its_buffers_and_half_closes_gets_everything_then_fin() {
    let _g = shared();
    let up = echo_server(1, |_| {});
    let relay = relay_server(1, vec![up.local_addr()], |c| {
        c.max_pending_bytes = 64 * 1024;
        limit(c, 1, 10, Duration::from_secs(30));
    });
    let mut holder = connect(relay.local_addr());
    echo_roundtrip(&mut holder, b"holder\n");
    let waiter = queued_client(&relay, b"", 0);
    let sent = write_until_stalled(&waiter, 77, 64 << 20);
    assert!(sent > 64 * 1024);
    waiter.shutdown(Shutdown::Write).unwrap();
    wait_for("the waiter's read to pause at the cap", || {
        total(&relay, |s| s.backpressure_pauses) >= 1
    });
    assert_eq!(relay.metrics().queue_length(), 1);
    drop(holder);
    let mut reader = waiter.try_clone().unwrap();
    let (got, ending) = read_until_end(&mut reader);
    assert_eq!(got.len() as u64, sent);
    assert_same(&pattern(77, 0, sent as usize), &got);
    assert_eq!(ending, Ending::Fin);
    wait_for("the pair to close cleanly", || {
        closed(&relay, CloseReason::Eof) == 2
    });
}

/// A client reset while its upstream connect is in progress gives its slot back at
/// once, and the waiter gets it; the waiter's own reset while connecting frees it too.
/// Nothing counts a connect error: the upstream did nothing wrong.
#[test]
fn a_client_reset_while_connecting_hands_its_slot_to_the_waiter() {
    let _g = shared();
    let hole = blackhole();
    let relay = relay_server(1, vec![hole.addr], |c| {
        c.relay.connect_timeout = Duration::from_secs(20);
        limit(c, 1, 10, Duration::from_secs(30));
    });
    let first = connect(relay.local_addr());
    wait_for("the first client's connect", || {
        active(&relay, hole.addr) == 1
    });
    let second = queued_client(&relay, b"", 0);
    edgepoll::sys::socket::set_linger_zero(first.as_fd()).unwrap();
    drop(first);
    wait_for("the waiter to get the slot", || {
        relay.metrics().queue_length() == 0 && relay.metrics().queue_waits() == 1
    });
    assert_eq!(active(&relay, hole.addr), 1);
    edgepoll::sys::socket::set_linger_zero(second.as_fd()).unwrap();
    drop(second);
    wait_for("every slot to be given back", || {
        active(&relay, hole.addr) == 0 && relay.open_connections() == 0
    });
    wait_for("both resets to be counted", || {
        closed(&relay, CloseReason::Reset) == 2
    });
    for r in ConnectError::ALL {
        assert_eq!(connect_errors(&relay, hole.addr, r), 0, "{r:?}");
    }
}

/// README, Upstream limits: "A client granted a slot whose connect then fails fails
/// over like any client, and queues again if every upstream is full." The granted
/// client's connect to a black hole times out; it queues again and is served by the
/// live upstream once that frees, with the bytes it sent at the start.
#[test]
fn a_granted_client_whose_connect_times_out_queues_again_and_is_served() {
    let _g = shared();
    let good = echo_server(1, |_| {});
    let hole = blackhole();
    let relay = relay_server(1, vec![hole.addr, good.local_addr()], |c| {
        // Probes far apart: the failed connect is what marks the hole down.
        c.relay.health_check = Some(check(CheckKind::Tcp, 3_600_000, 1000, b"", b""));
        c.relay.connect_timeout = Duration::from_millis(1500);
        limit(c, 1, 10, Duration::from_secs(30));
    });
    // Worker 0's turn starts at the hole: this client holds its slot, connecting.
    let stuck = connect(relay.local_addr());
    wait_for("the stuck connect", || active(&relay, hole.addr) == 1);
    let mut holder = connect(relay.local_addr());
    echo_roundtrip(&mut holder, b"holder\n");
    let mut waiter = queued_client(&relay, b"waiter\n", 0);
    // The stuck client leaves: its slot, on the hole, goes to the waiter.
    edgepoll::sys::socket::set_linger_zero(stuck.as_fd()).unwrap();
    drop(stuck);
    wait_for(
        "the waiter's connect to time out and the waiter to queue again",
        || {
            connect_errors(&relay, hole.addr, ConnectError::Timeout) == 1
                && relay.metrics().queue_length() == 1
        },
    );
    assert!(!is_up(&relay, hole.addr));
    drop(holder);
    expect_back(&mut waiter, b"waiter\n", "the waiter queued twice");
    assert_eq!(relay.metrics().queue_waits(), 2);
    assert_eq!(active(&relay, hole.addr), 0);
    assert_eq!(closed(&relay, CloseReason::UpstreamError), 0);
}

/// README, Relay semantics: "a client is never sent to an upstream marked down while
/// another is up", in the queue too: with the only up upstream full, the waiter is not
/// handed the free slot of the down one, and takes the up one's when it frees.
#[test]
fn a_waiter_never_takes_the_free_slot_of_a_down_upstream_while_another_is_up() {
    let _g = shared();
    let good = echo_server(1, |_| {});
    // Answers probes wrongly, and would answer a relayed client the same way.
    let liar = upstream_each(|mut s| {
        let _ = s.write_all(b"-ERR\n");
        hold(s);
    });
    let relay = relay_server(2, vec![liar, good.local_addr()], |c| {
        c.relay.health_check = Some(check(CheckKind::SendExpect, 50, 200, b"PING\n", b"PING\n"));
        limit(c, 1, 10, Duration::from_secs(30));
    });
    wait_for("the liar to be marked down", || !is_up(&relay, liar));
    let mut holder = connect(relay.local_addr());
    echo_roundtrip(&mut holder, b"holder\n");
    let mut waiter = queued_client(&relay, b"waiter\n", 0);
    still_waiting(&mut waiter, 300, || {
        "it should wait for the up upstream".into()
    });
    assert_eq!(active(&relay, liar), 0);
    drop(holder);
    expect_back(&mut waiter, b"waiter\n", "the waiter");
    assert_eq!(
        connects(&relay, liar),
        0,
        "a client went to the down upstream"
    );
    assert_eq!(relay.metrics().queue_waits(), 1);
}

/// A worker that stops (fault injection: its event loop fails) closes its pairs, and
/// their slots go to a client waiting on another worker; the stopped worker's own
/// waiter leaves the queue. The gauges end at zero.
#[test]
fn a_stopped_worker_gives_its_slots_to_waiters_on_other_workers() {
    let _g = shared();
    let up = echo_server(1, |_| {});
    let addr = up.local_addr();
    let relay = relay_server(2, vec![addr], |c| {
        limit(c, 1, 10, Duration::from_secs(30));
    });
    // The acceptor deals connections in turn: holder on worker 0, waiters on 1 and 0.
    let mut holder = connect(relay.local_addr());
    echo_roundtrip(&mut holder, b"holder\n");
    let mut on_one = queued_client(&relay, b"on one\n", 0);
    let mut on_zero = queued_client(&relay, b"on zero\n", 1);
    relay.inject_worker_failure(0);
    let (_, ending) = read_until_end(&mut holder);
    assert_reset("the stopped worker's pair", 0, ending);
    let (_, ending) = read_until_end(&mut on_zero);
    assert_reset("the stopped worker's waiter", 0, ending);
    expect_back(&mut on_one, b"on one\n", "the waiter on the running worker");
    assert_eq!(relay.metrics().queue_length(), 0);
    assert_eq!(active(&relay, addr), 1);
    drop(on_one);
    wait_for("the slot to be given back", || active(&relay, addr) == 0);
}

/// Slots never leak and nothing deadlocks under churn across four workers: clients
/// that read their echo and close, reset at once (queued, connecting or connected),
/// or read and then reset, against two slots and a short queue. Every client ends
/// (served, or reset by a full queue); then the queue, the slots and the
/// connections all return to zero, and accepted = closed.
#[test]
fn a_churn_of_clients_closing_in_every_state_leaks_no_slot() {
    let _g = shared();
    let up = echo_server(2, |_| {});
    let addr = up.local_addr();
    let relay = relay_server(4, vec![addr], |c| {
        limit(c, 2, 8, Duration::from_secs(10));
    });
    let served = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let threads: Vec<_> = (0..6u64)
        .map(|t| {
            let relay_addr = relay.local_addr();
            let served = Arc::clone(&served);
            std::thread::spawn(move || {
                for i in 0..30u64 {
                    let mut s = connect(relay_addr);
                    let data = pattern(t * 1000 + i, 0, 64);
                    if s.write_all(&data).is_err() {
                        continue;
                    }
                    match (t + i) % 4 {
                        // Reset at once, in whatever state the pair is.
                        1 => {}
                        3 => std::thread::sleep(Duration::from_millis(i % 5)),
                        // Read the echo (or learn of a full queue), then close.
                        _ => {
                            let mut back = vec![0u8; 64];
                            match s.read_exact(&mut back) {
                                Ok(()) => {
                                    assert_eq!(back, data);
                                    served.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(e) => assert_ne!(
                                    e.kind(),
                                    ErrorKind::WouldBlock,
                                    "a client hung: neither served nor reset"
                                ),
                            }
                            if (t + i) % 4 == 0 {
                                continue; // a plain close
                            }
                        }
                    }
                    let _ = edgepoll::sys::socket::set_linger_zero(s.as_fd());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    wait_for("every connection, slot and waiter to be gone", || {
        relay.open_connections() == 0
            && active(&relay, addr) == 0
            && relay.metrics().queue_length() == 0
    });
    wait_for("accepted = closed", || {
        total(&relay, |s| s.accepted) == 180 && total(&relay, |s| s.closed_total()) == 180
    });
    assert!(served.load(Ordering::Relaxed) > 0);
    wait_for("the upstream's connections to close", || {
        up.open_connections() == 0
    });
}

/// README, Relay semantics (Drain) and Upstream limits: during a drain a waiter whose
/// slot frees is connected and served; a waiter still waiting and a pair still open
/// at the deadline are reset (`shutdown`); the queue and the slots end at zero.
#[test]
fn a_drain_serves_the_waiter_a_slot_frees_for_and_resets_the_rest() {
    let _g = shared();
    let up = echo_server(1, |_| {});
    let addr = up.local_addr();
    let relay = relay_server(2, vec![addr], |c| {
        c.drain_timeout = Duration::from_secs(2);
        limit(c, 1, 10, Duration::from_secs(30));
    });
    let mut holder = connect(relay.local_addr());
    echo_roundtrip(&mut holder, b"holder\n");
    let mut first = queued_client(&relay, b"first\n", 0);
    let mut second = queued_client(&relay, b"second\n", 1);
    relay.begin_drain();
    // The holder finishes cleanly (both FINs), which frees its slot.
    holder.shutdown(Shutdown::Write).unwrap();
    let (rest, ending) = read_until_end(&mut holder);
    assert_eq!((rest.len(), ending), (0, Ending::Fin));
    expect_back(&mut first, b"first\n", "the first waiter, during the drain");
    let (got, ending) = read_until_end(&mut second);
    assert_reset(
        "the waiter still waiting at the drain deadline",
        got.len(),
        ending,
    );
    let (got, ending) = read_until_end(&mut first);
    assert_reset(
        "the pair still open at the drain deadline",
        got.len(),
        ending,
    );
    wait_for("the workers to exit", || relay.is_finished());
    assert_eq!(relay.metrics().queue_length(), 0);
    assert_eq!(active(&relay, addr), 0);
    assert_eq!(closed(&relay, CloseReason::Shutdown), 2);
    assert_eq!(closed(&relay, CloseReason::QueueTimeout), 0);
}

// ---------------------------------------------------------------------------------
// Reload (SIGHUP) with queued clients, over the real binary
// ---------------------------------------------------------------------------------

/// The Daemon of tests/reload.rs, trimmed.
struct Daemon {
    first: Child,
    pid: u32,
    addr: SocketAddr,
    metrics: SocketAddr,
    lines: Receiver<String>,
}

impl Daemon {
    fn start(args: &[&str]) -> Daemon {
        let mut child = Command::new(PathBuf::from(env!("CARGO_BIN_EXE_edgepoll")))
            .args(args)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("EDGEPOLL_TEST_LOG").is_some() {
                    eprintln!("{line}");
                }
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut d = Daemon {
            first: child,
            pid,
            addr: "0.0.0.0:0".parse().unwrap(),
            metrics: "0.0.0.0:0".parse().unwrap(),
            lines,
        };
        let line = d.expect_line(" listening on ");
        let after = line.split(" listening on ").nth(1).unwrap();
        d.addr = after.split([' ', ',']).next().unwrap().parse().unwrap();
        d.metrics = line
            .split("metrics on http://")
            .nth(1)
            .map(|m| m.trim_end_matches("/metrics").parse().unwrap())
            .expect("a metrics endpoint");
        d
    }

    #[track_caller]
    fn expect_line(&self, needle: &str) -> String {
        let until = Instant::now() + PATIENCE;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => panic!("no log line with {needle:?}"),
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("the log ended before a line with {needle:?}")
                }
            }
        }
    }

    #[track_caller]
    fn reload(&mut self) {
        let old = self.pid;
        kill(self.pid, "-HUP");
        let line = self.expect_line(" is serving; handing over");
        self.pid = line
            .split("pid ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|s| s.parse().ok())
            .expect("the new pid");
        self.expect_line("reloaded: took over from pid");
        let until = Instant::now() + PATIENCE;
        while std::fs::read_to_string(format!("/proc/{old}/stat")).is_ok_and(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with(['Z', 'X'])
        }) {
            assert!(Instant::now() < until, "pid {old} did not exit");
            if old == self.first.id() {
                let _ = self.first.try_wait();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn scrape(&self) -> String {
        let (status, _, body) = http_get(self.metrics, "/metrics");
        assert_eq!(status, 200);
        body
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.pid.to_string()])
            .stderr(Stdio::null())
            .status();
        let _ = self.first.kill();
        let _ = self.first.wait();
    }
}

/// README, Upstream limits: "A reload moves queued clients like any other: they queue
/// again in the new process". Two queued clients with bytes sent while waiting survive
/// a reload, are served in order of the slots freeing in the new process, and the new
/// process's queue and slot gauges end at zero.
#[test]
fn queued_clients_survive_a_reload_and_the_gauges_end_at_zero() {
    let _g = shared();
    let up = echo_server(1, |_| {});
    let u = up.local_addr().to_string();
    let mut d = Daemon::start(&[
        "relay",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--metrics-listen",
        "127.0.0.1:0",
        "--upstream",
        &u,
        "--max-conns-per-upstream",
        "1",
        "--max-queue",
        "10",
        "--queue-timeout",
        "30s",
    ]);
    let gauge = |d: &Daemon, series: &str| sample(&d.scrape(), series).unwrap_or(-1.0);
    let active_series = format!("edgepoll_upstream_connections_active{{upstream=\"{u}\"}}");
    let mut holder = connect(d.addr);
    echo_roundtrip(&mut holder, b"holder\n");
    let mut w1 = connect(d.addr);
    w1.write_all(b"w1\n").unwrap();
    wait_for("w1 to queue", || {
        gauge(&d, "edgepoll_upstream_queue_length") == 1.0
    });
    let mut w2 = connect(d.addr);
    w2.write_all(b"w2\n").unwrap();
    wait_for("w2 to queue", || {
        gauge(&d, "edgepoll_upstream_queue_length") == 2.0
    });

    d.reload();
    echo_roundtrip(&mut holder, b"moved\n");
    drop(holder);
    // One slot: one waiter gets it, the other keeps waiting.
    w1.set_nonblocking(true).unwrap();
    w2.set_nonblocking(true).unwrap();
    let until = Instant::now() + PATIENCE;
    let mut got = [Vec::new(), Vec::new()];
    while got.iter().all(|g| g.len() < 3) {
        assert!(
            Instant::now() < until,
            "no waiter was served after the reload"
        );
        for (w, g) in [&mut w1, &mut w2].into_iter().zip(got.iter_mut()) {
            let mut buf = [0u8; 16];
            match w.read(&mut buf) {
                Ok(0) => panic!("a waiter got EOF"),
                Ok(n) => g.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("a waiter failed: {e}"),
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    for (w, g) in [&mut w1, &mut w2].into_iter().zip(got.iter_mut()) {
        let mut buf = [0u8; 16];
        if let Ok(n) = w.read(&mut buf) {
            g.extend_from_slice(&buf[..n]);
        }
    }
    assert!(
        got == [b"w1\n".to_vec(), Vec::new()] || got == [Vec::new(), b"w2\n".to_vec()],
        "exactly one waiter has the one slot: {got:?}"
    );
    drop(w1);
    drop(w2);
    wait_for("the slot and the queue to empty", || {
        let text = d.scrape();
        sample(&text, &active_series) == Some(0.0)
            && sample(&text, "edgepoll_upstream_queue_length") == Some(0.0)
    });
}

/// The metrics table: `edgepoll_upstream_up` is "1 while the upstream takes new
/// clients". After a reload that removes an upstream, the new process counts the pair
/// still open there under the removed address (`Upstreams::for_moved`), and
/// `Upstream::new` sets that address's `up` gauge to 1: an upstream that will never
/// take a client again shows as up, forever (the series is never removed), and an
/// alert on `edgepoll_upstream_up == 0` or a dashboard of live upstreams is misled.
#[test]
fn an_upstream_removed_by_a_reload_does_not_show_as_up() {
    let _g = shared();
    let a = echo_server(1, |_| {});
    let b = echo_server(1, |_| {});
    let (la, lb) = (a.local_addr(), b.local_addr());
    let dir = std::env::temp_dir().join(format!("edgepoll-a16-removed-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("edgepoll.toml");
    let listen = dead_address();
    let metrics = dead_address();
    let config = |ups: &[SocketAddr]| {
        let ups: Vec<String> = ups.iter().map(|u| format!("\"{u}\"")).collect();
        format!(
            "mode = \"relay\"\nlisten = \"{listen}\"\nworkers = 1\nmetrics-listen = \"{metrics}\"\n\
             upstream = [{}]\n",
            ups.join(", ")
        )
    };
    let write = |text: String| {
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
    };
    write(config(&[la, lb]));
    let mut d = Daemon::start(&["--config", file.to_str().unwrap()]);
    // Worker 0's turn starts at the first upstream.
    let mut c = connect(d.addr);
    echo_roundtrip(&mut c, b"on a\n");
    let up_a = format!("edgepoll_upstream_up{{upstream=\"{la}\"}}");
    let active_a = format!("edgepoll_upstream_connections_active{{upstream=\"{la}\"}}");
    assert_eq!(sample(&d.scrape(), &active_a), Some(1.0));

    write(config(&[lb]));
    d.reload();
    echo_roundtrip(&mut c, b"moved\n");
    let text = d.scrape();
    assert_eq!(
        sample(&text, &active_a),
        Some(1.0),
        "the moved pair is counted"
    );
    drop(c);
    wait_for("the moved pair to close", || {
        sample(&d.scrape(), &active_a) == Some(0.0)
    });
    let up = sample(&d.scrape(), &up_a);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        up.is_none() || up == Some(0.0),
        "the removed upstream {la} shows {up_a} = {up:?} in the new process"
    );
}
