//! attack15: a hostile review of drain, reload (SIGHUP) / upgrade, the configuration
//! file and the systemd integration. Each test states the README promise it holds the
//! binary to; the ones that fail on the code as reviewed are findings.

mod util;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use util::*;

// ---------------------------------------------------------------------------------
// Helpers (the Daemon of tests/reload.rs, made to take any spawned child)
// ---------------------------------------------------------------------------------

/// A server process chain: the first process, and the one serving now.
struct Daemon {
    first: Child,
    pid: u32,
    addr: SocketAddr,
    metrics: Option<SocketAddr>,
    lines: Receiver<String>,
}

impl Daemon {
    fn start(args: &[&str]) -> Daemon {
        let mut cmd = Command::new(exe());
        cmd.args(args);
        Daemon::spawn(cmd, |mut c| c.spawn().unwrap())
    }

    fn spawn(mut cmd: Command, spawn: impl FnOnce(Command) -> Child) -> Daemon {
        cmd.env("RUST_LOG", "info").stderr(Stdio::piped());
        let mut child = spawn(cmd);
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
            metrics: None,
            lines,
        };
        let line = d.expect_line(" listening on ");
        let after = line.split(" listening on ").nth(1).unwrap();
        d.addr = after.split([' ', ',']).next().unwrap().parse().unwrap();
        d.metrics = line
            .split("metrics on http://")
            .nth(1)
            .map(|m| m.trim_end_matches("/metrics").parse().unwrap());
        d
    }

    /// The next log line containing `needle`, within `patience`.
    #[track_caller]
    fn expect_line_within(&self, needle: &str, patience: Duration) -> Option<String> {
        let until = Instant::now() + patience;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Some(line),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => return None,
                Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    #[track_caller]
    fn expect_line(&self, needle: &str) -> String {
        self.expect_line_within(needle, PATIENCE)
            .unwrap_or_else(|| panic!("no log line with {needle:?}"))
    }

    fn signal_pid(pid: u32, sig: &str) -> bool {
        Command::new("kill")
            .args([sig, &pid.to_string()])
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    }

    fn signal(&self, sig: &str) {
        assert!(Daemon::signal_pid(self.pid, sig), "kill {sig} {}", self.pid);
    }

    /// Parses the new pid out of the old process's " is serving; handing over" line.
    #[track_caller]
    fn follow_handover(&mut self) -> u32 {
        let line = self.expect_line(" is serving; handing over");
        self.pid = line
            .split("pid ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|s| s.parse().ok())
            .expect("the new pid");
        self.pid
    }

    /// Sends SIGHUP and follows the reload to its end: returns how long the old
    /// process lived after the signal.
    #[track_caller]
    fn reload(&mut self) -> Duration {
        let old = self.pid;
        let sent = Instant::now();
        self.signal("-HUP");
        self.follow_handover();
        self.expect_line("reloaded: took over from pid");
        self.wait_gone(old, sent);
        sent.elapsed()
    }

    #[track_caller]
    fn wait_gone(&mut self, old: u32, since: Instant) {
        while is_alive(old) {
            assert!(since.elapsed() < PATIENCE, "pid {old} did not exit");
            if old == self.first.id() {
                let _ = self.first.try_wait();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn scrape(&self) -> String {
        let (status, _, body) = http_get(self.metrics.expect("metrics on"), "/metrics");
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

/// Whether `pid` still runs (a zombie waiting for its reaper has exited).
fn is_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_edgepoll"))
}

/// A temporary directory removed when the test ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("edgepoll-a15-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `text` to `path` the way a configuration manager does: renamed over.
fn write_config(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A client with a short read timeout, for "is this still served" probes.
fn probe(addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Whether an echo round trip on a fresh connection to `addr` works within `timeout`.
fn echo_works(addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    let mut s = probe(addr, timeout).map_err(|e| format!("connect: {e}"))?;
    s.write_all(b"ping").map_err(|e| format!("write: {e}"))?;
    let mut back = [0u8; 4];
    s.read_exact(&mut back).map_err(|e| format!("read: {e}"))?;
    if &back != b"ping" {
        return Err(format!("got {back:?}"));
    }
    Ok(())
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------
// systemd
// ---------------------------------------------------------------------------------

/// README (Deployment, and the systemd merge): "socket-activated listeners are kept
/// across reloads". They are kept by the first reload only: the process a reload
/// starts never learns that its listeners came from systemd (`activated` is set only
/// on the non-reload start path of `run`), so the *second* reload keeps only what
/// `--listen` names, binds `--listen` and drains the socket systemd passed. systemd
/// still holds that socket, so clients connect and then hang forever in its queue.
#[test]
fn socket_activated_listener_is_still_served_after_the_second_reload() {
    let inherited = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = inherited.local_addr().unwrap();
    // A free port for --listen: a process that wrongly binds it succeeds.
    let listen = dead_address();
    let mut cmd = Command::new(exe());
    cmd.args(["echo", "--listen", &listen.to_string()]).args([
        "--workers",
        "2",
        "--metrics-listen",
        "off",
    ]);
    let mut d = Daemon::spawn(cmd, |cmd| {
        edgepoll::sys::systemd::spawn_activated(cmd, &[inherited.as_fd()]).unwrap()
    });
    assert_eq!(d.addr, addr);
    let mut client = connect(addr);
    echo_roundtrip(&mut client, b"before");
    for n in 1..=3 {
        d.reload();
        echo_roundtrip(&mut client, b"the moved connection");
        if let Err(e) = echo_works(addr, Duration::from_secs(3)) {
            panic!("after reload {n}: a new client of the socket systemd passed: {e}");
        }
        assert!(
            TcpStream::connect(listen).is_err(),
            "after reload {n}: --listen {listen} was bound although systemd passed the sockets"
        );
    }
}

// ---------------------------------------------------------------------------------
// signals
// ---------------------------------------------------------------------------------

/// README: SIGTERM drains and the process exits. A SIGTERM that arrives while a
/// reload runs (signals are blocked and taken one at a time by the main loop; SIGHUP
/// is dequeued first) is swallowed: the old process hands over and exits 0, and the
/// new one never hears of the SIGTERM and serves on. `kill -HUP; kill -TERM` (a
/// supervisor stopping the service right after a reload) leaves it running.
#[test]
fn sigterm_sent_during_a_reload_still_stops_the_service() {
    let mut d = Daemon::start(&[
        "echo",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--metrics-listen",
        "off",
        "--drain-timeout",
        "2",
    ]);
    let old = d.pid;
    let status = Command::new("sh")
        .args(["-c", &format!("kill -HUP {old}; kill -TERM {old}")])
        .status()
        .unwrap();
    assert!(status.success());
    let sent = Instant::now();
    // Either the reload is abandoned and the old process drains, or the new one takes
    // the SIGTERM over; whichever, within the drain timeout and some slack nothing
    // serves the port any more.
    let new = d.expect_line_within(" is serving; handing over", Duration::from_secs(5));
    if let Some(new) = new {
        d.pid = new
            .split("pid ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|s| s.parse().ok())
            .unwrap();
    }
    let deadline = Duration::from_secs(15);
    while sent.elapsed() < deadline {
        if TcpStream::connect(d.addr).is_err() && !is_alive(d.pid) && !is_alive(old) {
            return;
        }
        let _ = d.first.try_wait();
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "{:?} after `kill -HUP {old}; kill -TERM {old}`: pid {} still serves {} (old pid {old} alive: {})",
        deadline,
        d.pid,
        d.addr,
        is_alive(old)
    );
}

// ---------------------------------------------------------------------------------
// metrics endpoint across a reload
// ---------------------------------------------------------------------------------

/// README: a reload happens "without refusing, resetting or cutting a connection",
/// and the metrics listener is handed over like the others. A scrape whose request is
/// still arriving when the reload happens is cut: the old process stops its endpoint
/// (Server::join drops it) and closes the clients it holds.
#[test]
#[ignore = "known limitation, README \"Reload and upgrade\": a scrape the old endpoint accepted and has not answered is cut"]
fn a_scrape_in_flight_during_a_reload_is_answered() {
    let mut d = Daemon::start(&[
        "echo",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let metrics = d.metrics.unwrap();
    let mut s = connect(metrics);
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n")
        .unwrap();
    // Let the old endpoint accept it and read the first part.
    std::thread::sleep(Duration::from_millis(300));
    d.reload();
    let _ = s.write_all(b"\r\n");
    let (got, ending) = read_until_end(&mut s);
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "scrape cut by the reload: got {} bytes ({ending:?}): {:?}",
        got.len(),
        &text[..text.len().min(200)]
    );
}

// ---------------------------------------------------------------------------------
// relay state that moves
// ---------------------------------------------------------------------------------

/// An echo server on its own thread, for relay upstreams: every connection echoed
/// until EOF, then FIN.
fn echo_upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { break };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
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
                let _ = s.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

/// README: "deadlines (time left on ... connect timeouts)" and "Bytes the client sends
/// while the upstream is still connecting (or failing over) are kept ... and
/// forwarded once it is connected". A pair connecting to a black hole when the reload
/// happens times out in the new process and fails over to the next upstream, with the
/// client's early bytes.
#[test]
fn a_pair_connecting_to_a_black_hole_moves_and_fails_over() {
    let hole = blackhole();
    let good = echo_upstream();
    let (h, g) = (hole.addr.to_string(), good.to_string());
    let mut d = Daemon::start(&[
        "relay",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--metrics-listen",
        "127.0.0.1:0",
        "--upstream",
        &h,
        "--upstream",
        &g,
        "--connect-timeout",
        "2s",
    ]);
    let mut c = connect(d.addr);
    c.write_all(b"sent while connecting").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    d.reload();
    let mut back = vec![0u8; 21];
    c.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"sent while connecting");
    // The connect deadline was carried: ~1.7 s were left, not a fresh 2 s and more.
    assert!(t0.elapsed() < Duration::from_secs(6), "{:?}", t0.elapsed());
    echo_roundtrip(&mut c, b"and after");
    let text = d.scrape();
    assert_eq!(
        sample(
            &text,
            &format!(
                "edgepoll_upstream_connect_errors_total{{reason=\"timeout\",upstream=\"{h}\"}}"
            )
        ),
        Some(1.0),
        "{text}"
    );
}

/// README: a failed pair forwards what the failed side sent, then resets the other
/// peer once it has taken those bytes (or 5 s passed). A pair in that state moves:
/// the client still gets a correct prefix and then a reset, never a FIN.
#[test]
fn a_failed_pair_waiting_to_reset_moves_and_still_resets() {
    for splice in [false, true] {
        let (up, t) = upstream_once(|s| {
            let sent = write_until_stalled(&s, 31, 64 << 20);
            // An RST: the upstream crashed mid-answer.
            edgepoll::sys::socket::set_linger_zero(s.as_fd()).unwrap();
            drop(s);
            sent
        });
        let u = up.to_string();
        let mut args = vec![
            "relay",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--metrics-listen",
            "off",
            "--upstream",
            &u,
        ];
        if splice {
            args.push("--splice");
        }
        let mut d = Daemon::start(&args);
        let mut c = connect(d.addr);
        let sent = t.join().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        d.reload();
        let (got, ending) = read_until_end(&mut c);
        assert_prefix(31, &got, sent);
        assert_reset(&format!("client (splice {splice})"), got.len(), ending);
    }
}

/// Half-close in both orders, then a reload, then the other direction finishes:
/// every byte and exactly one FIN each way.
#[test]
fn half_closed_pairs_move_in_both_orders() {
    for splice in [false, true] {
        for client_first in [true, false] {
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            let (up, t) = upstream_once(move |mut s| {
                if client_first {
                    let mut req = Vec::new();
                    s.read_to_end(&mut req).unwrap();
                    assert_eq!(req, pattern(1, 0, 300_000));
                    rx.recv().unwrap(); // the reload is done
                    s.write_all(&pattern(2, 0, 300_000)).unwrap();
                    s.shutdown(std::net::Shutdown::Write).unwrap();
                } else {
                    s.write_all(&pattern(2, 0, 300_000)).unwrap();
                    s.shutdown(std::net::Shutdown::Write).unwrap();
                    let mut req = Vec::new();
                    s.read_to_end(&mut req).unwrap();
                    assert_eq!(req, pattern(1, 0, 300_000));
                }
            });
            let u = up.to_string();
            let mut args = vec![
                "relay",
                "--listen",
                "127.0.0.1:0",
                "--workers",
                "1",
                "--metrics-listen",
                "off",
                "--upstream",
                &u,
            ];
            if splice {
                args.push("--splice");
            }
            let mut d = Daemon::start(&args);
            let mut c = connect(d.addr);
            if client_first {
                c.write_all(&pattern(1, 0, 300_000)).unwrap();
                c.shutdown(std::net::Shutdown::Write).unwrap();
                std::thread::sleep(Duration::from_millis(200));
                d.reload();
                tx.send(()).unwrap();
                let (got, ending) = read_until_end(&mut c);
                assert_eq!(ending, Ending::Fin, "splice {splice} client first");
                assert_same(&pattern(2, 0, 300_000), &got);
            } else {
                let mut got = vec![0u8; 300_000];
                c.read_exact(&mut got).unwrap();
                assert_same(&pattern(2, 0, 300_000), &got);
                d.reload();
                c.write_all(&pattern(1, 0, 300_000)).unwrap();
                c.shutdown(std::net::Shutdown::Write).unwrap();
                let (rest, ending) = read_until_end(&mut c);
                assert_eq!(
                    (rest.len(), ending),
                    (0, Ending::Fin),
                    "splice {splice} upstream first"
                );
            }
            t.join().unwrap();
        }
    }
}

// ---------------------------------------------------------------------------------
// http state that moves
// ---------------------------------------------------------------------------------

/// README: "An HTTP connection moves between requests or in the middle of one: a
/// partial head, a body being skipped ...". Bodies cut at every kind of place.
#[test]
fn http_bodies_cut_anywhere_move_and_get_one_answer_each() {
    let mut d = Daemon::start(&[
        "http",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--metrics-listen",
        "off",
    ]);
    let cases: Vec<(&str, &[u8], &[u8])> = vec![
        (
            "mid content-length body",
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n12345",
            b"67890",
        ),
        (
            "mid chunk-size line",
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n1",
            b"0\r\n0123456789abcdef\r\n0\r\n\r\n",
        ),
        (
            "mid chunk data",
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nA\r\n01234",
            b"56789\r\n0\r\n\r\n",
        ),
        (
            "between chunk data and its CRLF",
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc",
            b"\r\n0\r\n\r\n",
        ),
        (
            "mid chunk extension",
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3;na",
            b"me=\"v\"\r\nabc\r\n0\r\n\r\n",
        ),
        (
            "in the trailers",
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: ",
            b"1\r\n\r\n",
        ),
        (
            "after the last chunk, before the final CRLF",
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n",
            b"\r\n",
        ),
        (
            "a bare CR at the cut",
            b"GET / HTTP/1.1\r\nHost: t\r",
            b"\n\r\n",
        ),
    ];
    let mut conns: Vec<TcpStream> = cases
        .iter()
        .map(|(_, first, _)| {
            let mut s = connect(d.addr);
            s.write_all(first).unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    d.reload();
    for ((what, _, rest), s) in cases.iter().zip(conns.iter_mut()) {
        s.write_all(rest).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let (statuses, _, closed) = read_responses(s, 2);
        assert_eq!(statuses, vec![200, 200], "{what} (closed: {closed})");
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut extra = [0u8; 1];
        assert!(
            matches!(s.read(&mut extra), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "{what}: nothing more"
        );
    }
}

/// A pipeliner that does not read, whose last request says Connection: close: after
/// the move every request is answered and then the connection ends with a FIN.
#[test]
fn connection_close_in_flight_moves_and_ends_in_fin() {
    let mut d = Daemon::start(&[
        "http",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--metrics-listen",
        "off",
        "--max-pending-bytes",
        "16KiB",
    ]);
    let get = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n";
    let mut s = connect(d.addr);
    // Few enough that the kernel's buffers and the server's one 64 KiB read take
    // them all before the client reads.
    let n = 2000;
    let mut all = get.repeat(n - 1);
    all.extend_from_slice(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    s.write_all(&all).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    d.reload();
    let (statuses, _, _) = read_responses(&mut s, n);
    assert_eq!(statuses.len(), n);
    let (rest, ending) = read_until_end(&mut s);
    assert_eq!((rest.len(), ending), (0, Ending::Fin));
}

/// README: "deadlines (time left on idle, header and connect timeouts)" move. A
/// slowloris head 3 s into a 4 s --header-timeout gets its 408 about 1 s after the
/// reload, not a fresh 4 s later.
#[test]
fn a_slowloris_keeps_its_header_deadline_across_a_reload() {
    let mut d = Daemon::start(&[
        "http",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--metrics-listen",
        "off",
        "--header-timeout",
        "4s",
    ]);
    let mut s = connect(d.addr);
    let opened = Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\nHo").unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    d.reload();
    let (statuses, _, _) = read_responses(&mut s, 1);
    let at = opened.elapsed();
    assert_eq!(statuses, vec![408]);
    assert!(
        at < Duration::from_millis(5500),
        "408 came {at:?} after the head began, with --header-timeout 4s"
    );
}

/// README: "Idle timeouts count from the last activity, wherever it happened."
#[test]
#[ignore = "known limitation, README \"Reload and upgrade\": idle time counts from the new worker's start when that is later"]
fn idle_timeout_counts_from_the_last_activity_before_the_reload() {
    let mut d = Daemon::start(&[
        "echo",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--metrics-listen",
        "off",
        "--idle-timeout",
        "4s",
    ]);
    let mut s = connect(d.addr);
    echo_roundtrip(&mut s, b"x");
    let active = Instant::now();
    std::thread::sleep(Duration::from_millis(2500));
    d.reload();
    let (_, ending) = read_until_end(&mut s);
    let at = active.elapsed();
    assert_eq!(ending, Ending::Fin);
    assert!(
        at < Duration::from_millis(5500) && at > Duration::from_millis(3800),
        "closed {at:?} after the last activity, with --idle-timeout 4s"
    );
}

// ---------------------------------------------------------------------------------
// counters, gauges and limits across reloads
// ---------------------------------------------------------------------------------

fn settle_scrape(d: &Daemon, ok: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        let text = d.scrape();
        if ok(&text) || start.elapsed() > Duration::from_secs(5) {
            return text;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// accepted - closed = active, once settled, through reloads that move connections
/// and churn that closes some; a moved connection is neither accepted nor closed
/// again; the duration histogram counts each close once.
#[test]
fn accepted_minus_closed_equals_active_across_reloads() {
    let mut d = Daemon::start(&[
        "echo",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let mut held: Vec<TcpStream> = (0..20).map(|_| connect(d.addr)).collect();
    for (i, s) in held.iter_mut().enumerate() {
        echo_roundtrip(s, &pattern(i as u64, 0, 100));
    }
    for round in 0..5 {
        for k in 0..10 {
            let mut s = connect(d.addr);
            echo_roundtrip(&mut s, &pattern(100 + k, 0, 10));
        }
        // One open connection that will close right after the move.
        let closing = connect(d.addr);
        d.reload();
        drop(closing);
        let _ = round;
    }
    let accepted = 20.0 + 5.0 * 11.0;
    let text = settle_scrape(&d, |t| {
        sum_samples(t, "edgepoll_connections_closed_total") == accepted - 20.0
    });
    let a = sum_samples(&text, "edgepoll_connections_accepted_total");
    let c = sum_samples(&text, "edgepoll_connections_closed_total");
    let active = sum_samples(&text, "edgepoll_connections_active");
    let hist = sample(&text, "edgepoll_connection_duration_seconds_count").unwrap_or(-1.0);
    let moved = sample(&text, "edgepoll_reload_connections_moved_total").unwrap_or(-1.0);
    assert_eq!(
        (a, c, active, hist, moved),
        (accepted, accepted - 20.0, 20.0, accepted - 20.0, 5.0 * 21.0),
        "(accepted, closed, active, duration count, moved)"
    );
    drop(held);
}

/// README: `edgepoll_outbound_buffered_bytes` is "bytes held in outbound buffers";
/// after a move the new process holds the same bytes, and once the peer reads them all
/// the gauge is back at 0 (never negative).
#[test]
fn buffered_bytes_gauge_follows_the_moved_bytes() {
    let mut d = Daemon::start(&[
        "echo",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let mut hoarder = connect(d.addr);
    let sent = write_until_stalled(&hoarder, 5, 64 << 20);
    let before = settle_scrape(&d, |t| {
        sum_samples(t, "edgepoll_outbound_buffered_bytes") > 0.0
    });
    let held = sum_samples(&before, "edgepoll_outbound_buffered_bytes");
    assert!(held > 0.0);
    d.reload();
    let after = settle_scrape(&d, |t| {
        sum_samples(t, "edgepoll_outbound_buffered_bytes") == held
    });
    assert_eq!(
        sum_samples(&after, "edgepoll_outbound_buffered_bytes"),
        held,
        "the moved connection's outbound buffer"
    );
    let mut back = vec![0u8; sent as usize];
    hoarder.read_exact(&mut back).unwrap();
    assert_same(&pattern(5, 0, sent as usize), &back);
    let done = settle_scrape(&d, |t| {
        sum_samples(t, "edgepoll_outbound_buffered_bytes") == 0.0
    });
    assert_eq!(sum_samples(&done, "edgepoll_outbound_buffered_bytes"), 0.0);
}

/// README: "if the reload lowered --max-connections below the count, new connections
/// are refused until it falls", and a moved connection counts against per-IP limits.
#[test]
fn lowered_limits_refuse_new_connections_until_the_moved_count_falls() {
    let dir = TempDir::new("limits");
    let file = dir.0.join("edgepoll.toml");
    let addr = dead_address();
    let cfg = |max: usize, per_ip: usize| {
        format!(
            "mode = \"echo\"\nlisten = \"{addr}\"\nworkers = 2\nmetrics-listen = \"127.0.0.1:0\"\n\
             max-connections = {max}\nmax-connections-per-ip = {per_ip}\n"
        )
    };
    write_config(&file, &cfg(10, 10));
    let mut d = Daemon::start(&["--config", file.to_str().unwrap()]);
    let mut held: Vec<TcpStream> = (0..8).map(|_| connect(addr)).collect();
    for s in held.iter_mut() {
        echo_roundtrip(s, b"in");
    }
    write_config(&file, &cfg(5, 100));
    d.reload();
    for s in held.iter_mut() {
        echo_roundtrip(s, b"moved");
    }
    // 8 open, limit 5: refused (accepted and closed at once).
    let mut extra = connect(addr);
    let (got, _) = read_until_end(&mut extra);
    assert!(got.is_empty());
    held.truncate(4);
    std::thread::sleep(Duration::from_millis(300));
    echo_works(addr, Duration::from_secs(5)).expect("4 open under a limit of 5");

    // Per-IP: 4 moved (plus none new) from 127.0.0.1 against a new per-IP limit of 4.
    write_config(&file, &cfg(100, 4));
    d.reload();
    let mut extra = connect(addr);
    let (got, _) = read_until_end(&mut extra);
    assert!(
        got.is_empty(),
        "a 5th connection from one IP with a per-IP limit of 4"
    );
    let text = d.scrape();
    assert_eq!(
        sample(
            &text,
            "edgepoll_connections_rejected_total{reason=\"max_connections\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "edgepoll_connections_rejected_total{reason=\"per_ip_limit\"}"
        ),
        Some(1.0)
    );
}

/// No descriptor leaks from reload to reload, in the old or the new process, with
/// relayed pairs and their splice pipes moving each time; no zombies left behind.
#[test]
fn no_descriptor_leaks_or_zombies_across_twenty_reloads() {
    let up = echo_upstream().to_string();
    let mut d = Daemon::start(&[
        "relay",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--metrics-listen",
        "127.0.0.1:0",
        "--upstream",
        &up,
        "--splice",
    ]);
    let mut held: Vec<TcpStream> = (0..10).map(|_| connect(d.addr)).collect();
    for (i, s) in held.iter_mut().enumerate() {
        echo_roundtrip(s, &pattern(i as u64, 0, 1000));
    }
    d.reload();
    let _ = d.scrape();
    std::thread::sleep(Duration::from_millis(300));
    let base = fd_count(d.pid);
    for _ in 0..20 {
        d.reload();
        for (i, s) in held.iter_mut().enumerate() {
            echo_roundtrip(s, &pattern(i as u64, 0, 1000));
        }
    }
    let _ = d.scrape();
    std::thread::sleep(Duration::from_millis(300));
    let after = fd_count(d.pid);
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", d.pid))
        .unwrap()
        .flatten()
        .map(|e| {
            format!(
                "{} -> {}",
                e.file_name().to_string_lossy(),
                std::fs::read_link(e.path())
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            )
        })
        .collect();
    assert_eq!(
        after,
        base,
        "descriptors after 1 reload vs 21:\n{}",
        fds.join("\n")
    );
    // Zombies that an edgepoll process (alive) failed to reap; orphans reparented to
    // the machine's init are init's to reap.
    let zombies: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|s| {
            let rest = s.rsplit(')').next().unwrap().trim_start();
            let ppid: u32 = rest.split(' ').nth(1).unwrap().parse().unwrap();
            s.contains("(edgepoll)")
                && rest.starts_with('Z')
                && std::fs::read_to_string(format!("/proc/{ppid}/comm"))
                    .is_ok_and(|c| c.trim() == "edgepoll")
        })
        .collect();
    assert!(zombies.is_empty(), "{zombies:?}");
}

// ---------------------------------------------------------------------------------
// a successor that breaks after Ready (a fake one, installed as the binary on disk)
// ---------------------------------------------------------------------------------

/// Not a test: the fake successor that `install_fake_successor` puts on disk. It
/// speaks the hand-over protocol up to `Ready` (taking every listener), then does
/// what A15_FAKE says: `die` exits at once (a successor that crashes while the
/// connections move).
#[test]
#[ignore]
fn fake_successor() {
    use edgepoll::handover::wire::{Reader, Writer};
    use edgepoll::sys::fdpass;
    use std::os::fd::{FromRawFd, OwnedFd};
    let Ok(raw) = std::env::var("EDGEPOLL_HANDOVER_FD") else {
        return;
    };
    let sock = unsafe { OwnedFd::from_raw_fd(raw.parse().unwrap()) };
    let mut head = [0u8; 6];
    let mut fds = Vec::new();
    assert!(fdpass::recv_with_fds(sock.as_fd(), &mut head, &mut fds).unwrap());
    let len = u32::from_le_bytes(head[..4].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len];
    assert!(fdpass::recv_with_fds(sock.as_fd(), &mut body, &mut fds).unwrap());
    let mut r = Reader::new(&body);
    let _version = r.u32().unwrap();
    let _mode = r.str().unwrap();
    let _pid = r.u32().unwrap();
    let _activated = r.u8().unwrap();
    let n = r.u32().unwrap();
    let mut w = Writer::default();
    w.u32(std::process::id()).u32(n);
    for _ in 0..n {
        w.u8(1);
    }
    let mut msg = (w.buf.len() as u32).to_le_bytes().to_vec();
    msg.extend_from_slice(&[2, 0]);
    msg.extend_from_slice(&w.buf);
    fdpass::send_with_fds(sock.as_fd(), &msg, &[]).unwrap();
    match std::env::var("A15_FAKE").as_deref() {
        Ok("die") => std::process::exit(3),
        _ => std::thread::sleep(Duration::from_secs(40)),
    }
}

/// Copies `from` over `to` the way a package manager installs (renamed over).
fn install(from: &Path, to: &Path) {
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

/// Puts at `at` a "binary" that is this test executable running `fake_successor`.
fn install_fake_successor(dir: &Path, at: &Path, behaviour: &str) {
    let me = std::env::current_exe().unwrap();
    let script = dir.join("fake.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nA15_FAKE={behaviour} exec {} fake_successor --exact --ignored --nocapture --test-threads 1 >/dev/null\n",
            me.display()
        ),
    )
    .unwrap();
    install(&script, at);
}

/// An upstream that, on every connection, sends `bytes` of stream 41 and then holds
/// the connection open.
fn talkative_upstream(bytes: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { break };
            std::thread::spawn(move || {
                let _ = s.write_all(&pattern(41, 0, bytes));
                std::thread::sleep(Duration::from_secs(60));
            });
        }
    });
    addr
}

/// README: "If the new process dies during the hand-over ... the old one takes back
/// every connection it had not yet sent, and accepts again". A successor that dies
/// right after `Ready` takes none; every relayed client, owed most of the upstream's
/// 8 MiB answer, gets all of it from the old process. (Before the fix, the old process
/// closed them with close(2): a cut stream and a FIN.)
#[test]
fn connections_a_failed_transfer_did_not_send_stay_served() {
    let dir = TempDir::new("fake-die-close");
    let installed = dir.0.join("edgepoll");
    install(&exe(), &installed);
    let up = talkative_upstream(8 << 20).to_string();
    let mut cmd = Command::new(&installed);
    cmd.args([
        "relay",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--metrics-listen",
        "off",
        "--upstream",
        &up,
    ]);
    let d = Daemon::spawn(cmd, |mut c| c.spawn().unwrap());
    let mut clients: Vec<TcpStream> = (0..4).map(|_| connect(d.addr)).collect();
    // Each client reads a little, then stops: the relay holds the rest for it.
    for c in clients.iter_mut() {
        let mut first = vec![0u8; 1000];
        c.read_exact(&mut first).unwrap();
        assert_same(&pattern(41, 0, 1000), &first);
    }
    std::thread::sleep(Duration::from_millis(500));
    install_fake_successor(&dir.0, &installed, "die");
    d.signal("-HUP");
    let line = d.expect_line("reload failed:");
    assert!(line.contains("0 went with it"), "{line}");
    for c in clients.iter_mut() {
        let mut rest = vec![0u8; (8 << 20) - 1000];
        c.read_exact(&mut rest).unwrap();
        assert_same(&pattern(41, 1000, rest.len()), &rest);
    }
}

/// README: "The sockets are never closed: the kernel's accept queue stays served
/// throughout". A successor that dies right after `Ready` takes the listeners down
/// with it: the old process has already closed its own, logs an error, exits 0, and
/// nothing serves the port any more.
#[test]
fn a_successor_that_dies_after_ready_does_not_take_the_service_down() {
    let dir = TempDir::new("fake-die-listen");
    let installed = dir.0.join("edgepoll");
    install(&exe(), &installed);
    let mut cmd = Command::new(&installed);
    cmd.args([
        "echo",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--metrics-listen",
        "off",
    ]);
    let mut d = Daemon::spawn(cmd, |mut c| c.spawn().unwrap());
    let mut client = connect(d.addr);
    echo_roundtrip(&mut client, b"before");
    install_fake_successor(&dir.0, &installed, "die");
    d.signal("-HUP");
    d.expect_line(" is serving; handing over");
    let line = d.expect_line("edgepoll:");
    std::thread::sleep(Duration::from_millis(500));
    let _ = d.first.try_wait();
    let served = echo_works(d.addr, Duration::from_secs(3));
    assert!(
        served.is_ok(),
        "after a successor died right after Ready: a new client of {}: {:?}; old process alive: {}; its last line: {line}",
        d.addr,
        served,
        is_alive(d.first.id())
    );
}

// ---------------------------------------------------------------------------------
// listeners and accept queues at the hand-over
// ---------------------------------------------------------------------------------

/// README: "What drains instead of moving: a listen address that left the
/// configuration ... the old one accepts what is queued on the old listener and
/// closes it, and those connections move like the others." A client that connects to
/// the old address once the hand-over has begun is either refused or served, never
/// accepted by the kernel and then reset. The successor keeps its copy of the old
/// listener (in `Predecessor::listeners`) open until the whole transfer is done, long
/// after the old process emptied the queue for the last time, so connections that
/// queue there meanwhile are reset when it finally closes.
#[test]
fn clients_of_a_listener_that_left_the_config_are_refused_or_served_never_reset() {
    let dir = TempDir::new("listen-left");
    let file = dir.0.join("edgepoll.toml");
    let old = dead_address();
    let new = dead_address();
    let cfg = |addr: SocketAddr| {
        format!(
            "mode = \"echo\"\nlisten = \"{addr}\"\nworkers = 2\nmetrics-listen = \"off\"\n\
             max-pending-bytes = \"4MiB\"\n"
        )
    };
    write_config(&file, &cfg(old));
    let mut d = Daemon::start(&["--config", file.to_str().unwrap()]);
    // Connections with full buffers make the transfer take a while.
    let hoarders: Vec<TcpStream> = (0..40)
        .map(|i| {
            std::thread::spawn(move || {
                let s = connect(old);
                write_until_stalled(&s, 200 + i, 16 << 20);
                s
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    write_config(&file, &cfg(new));
    d.signal("-HUP");
    // The old process has stopped accepting and is sending the connections.
    d.follow_handover();
    // Past the old process's last accept (it comes right after that line); the
    // transfer of the full buffers takes far longer.
    std::thread::sleep(Duration::from_millis(40));
    let late: Vec<std::io::Result<TcpStream>> = (0..5)
        .map(|_| {
            let s = TcpStream::connect_timeout(&old, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            (&s).write_all(b"hello")?;
            Ok(s)
        })
        .collect();
    d.expect_line("reloaded: took over from pid");
    let mut outcomes = Vec::new();
    for c in late {
        outcomes.push(match c {
            Err(e) => format!("refused ({e})"),
            Ok(mut s) => {
                let mut b = [0u8; 5];
                match s.read_exact(&mut b) {
                    Ok(()) if &b == b"hello" => "served".to_string(),
                    other => format!("CUT: connected, then {other:?}"),
                }
            }
        });
    }
    drop(hoarders);
    eprintln!("late clients: {outcomes:?}");
    assert!(
        outcomes.iter().all(|o| !o.starts_with("CUT")),
        "clients of the old address during the transfer: {outcomes:#?}"
    );
}

/// A full accept queue at the moment of the hand-over, on a listener that stays and
/// on one that left the configuration: every queued client is served. The old process
/// is stopped (SIGSTOP) while the clients connect, so they sit in the kernel's queues,
/// and gets its SIGHUP before it runs again.
#[test]
fn a_full_accept_queue_at_the_hand_over_is_served() {
    let dir = TempDir::new("backlog");
    let file = dir.0.join("edgepoll.toml");
    let (stays, leaves, added) = (dead_address(), dead_address(), dead_address());
    let cfg = |a: SocketAddr, b: SocketAddr| {
        format!(
            "mode = \"echo\"\nlisten = [\"{a}\", \"{b}\"]\nworkers = 2\nmetrics-listen = \"off\"\nbacklog = 64\n"
        )
    };
    write_config(&file, &cfg(stays, leaves));
    let mut d = Daemon::start(&["--config", file.to_str().unwrap()]);
    d.signal("-STOP");
    let mut queued: Vec<(SocketAddr, TcpStream)> = Vec::new();
    for i in 0..40u64 {
        for addr in [stays, leaves] {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(&pattern(i, 0, 100)).unwrap();
            queued.push((addr, s));
        }
    }
    write_config(&file, &cfg(stays, added));
    d.signal("-HUP");
    d.signal("-CONT");
    d.follow_handover();
    d.expect_line("reloaded: took over from pid");
    for (i, (addr, s)) in queued.iter_mut().enumerate() {
        let mut back = vec![0u8; 100];
        s.read_exact(&mut back)
            .unwrap_or_else(|e| panic!("queued client {i} of {addr}: {e}"));
        assert_same(&pattern(i as u64 / 2, 0, 100), &back);
    }
    echo_works(added, Duration::from_secs(3)).unwrap();
}

// ---------------------------------------------------------------------------------
// relay configuration changes across a reload
// ---------------------------------------------------------------------------------

fn relay_config(listen: SocketAddr, upstreams: &[SocketAddr], extra: &str) -> String {
    let ups: Vec<String> = upstreams.iter().map(|u| format!("\"{u}\"")).collect();
    format!(
        "mode = \"relay\"\nlisten = \"{listen}\"\nworkers = 1\nmetrics-listen = \"off\"\n\
         upstream = [{}]\nconnect-timeout = \"3s\"\n{extra}",
        ups.join(", ")
    )
}

/// README: a reload moves every established connection "without refusing, resetting
/// or cutting" it, and (relay.rs) "a connect in progress to such an upstream [one the
/// new configuration no longer lists] is given up, to start again with a listed one".
/// The pair keeps its count of tries, though, and the new configuration's
/// --connect-retries defaults to its number of upstreams: a client whose connect to
/// the removed upstream was in progress is reset without its new upstream ever being
/// tried.
#[test]
fn a_connect_in_progress_to_a_removed_upstream_restarts_with_the_new_one() {
    let dir = TempDir::new("upstream-swap");
    let file = dir.0.join("edgepoll.toml");
    let listen = dead_address();
    let hole = blackhole();
    let good = echo_upstream();
    write_config(&file, &relay_config(listen, &[hole.addr], ""));
    let mut d = Daemon::start(&["--config", file.to_str().unwrap()]);
    let mut c = connect(listen);
    c.write_all(b"early bytes").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    write_config(&file, &relay_config(listen, &[good], ""));
    d.reload();
    let mut back = vec![0u8; 11];
    match c.read_exact(&mut back) {
        Ok(()) => assert_eq!(&back, b"early bytes"),
        Err(e) => panic!("the client whose connect was given up on: {e}"),
    }
}

/// --splice turned on and off by reloads in the middle of a relayed transfer (pairs
/// keep their pipes or their buffers), and the upstream taken out of the
/// configuration: the established pair keeps it. Every byte arrives, then FIN.
#[test]
fn splice_toggled_and_upstream_removed_mid_transfer() {
    let dir = TempDir::new("splice-toggle");
    let file = dir.0.join("edgepoll.toml");
    let listen = dead_address();
    let up = echo_upstream();
    let other = echo_upstream();
    write_config(&file, &relay_config(listen, &[up], ""));
    let mut d = Daemon::start(&["--config", file.to_str().unwrap()]);
    let total: u64 = 48 << 20;
    let client = connect(listen);
    let mut reader = client.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut c = client;
        let mut off = 0u64;
        while off < total {
            let n = (256 * 1024).min(total - off) as usize;
            c.write_all(&pattern(77, off, n)).unwrap();
            off += n as u64;
        }
        c.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = std::sync::Arc::clone(&progress);
    let checker = std::thread::spawn(move || {
        let mut got = 0u64;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => panic!("read after {got} bytes: {e}"),
            };
            assert_same(&pattern(77, got, n), &buf[..n]);
            got += n as u64;
            seen.store(got, std::sync::atomic::Ordering::Relaxed);
        }
        got
    });
    let steps = [
        relay_config(listen, &[up], "splice = true\n"),
        relay_config(listen, &[up], ""),
        relay_config(listen, &[other], "splice = true\n"),
        relay_config(listen, &[other], "send-proxy-v2 = true\n"),
    ];
    for (i, cfg) in steps.iter().enumerate() {
        wait_for("the transfer to progress", || {
            progress.load(std::sync::atomic::Ordering::Relaxed) >= total * (i as u64 + 1) / 5
        });
        write_config(&file, cfg);
        d.reload();
    }
    writer.join().unwrap();
    assert_eq!(checker.join().unwrap(), total);
}

// ---------------------------------------------------------------------------------
// reload storms
// ---------------------------------------------------------------------------------

/// `kill -HUP` is "apply the configuration as it is now on disk". A second SIGHUP sent
/// to the old process after its successor has read the file, but while the old one is
/// still handing over, is swallowed: the old process exits without acting on it and
/// the successor never hears of it, so the configuration written in between is never
/// applied.
#[test]
fn a_second_sighup_during_a_hand_over_is_not_lost() {
    let dir = TempDir::new("double-hup");
    let file = dir.0.join("edgepoll.toml");
    let listen = dead_address();
    let cfg = |body: &str| {
        format!(
            "mode = \"http\"\nlisten = \"{listen}\"\nworkers = 2\nmetrics-listen = \"off\"\n\
             body = \"{body}\"\nmax-pending-bytes = \"4MiB\"\n"
        )
    };
    write_config(&file, &cfg("first"));
    let mut d = Daemon::start(&["--config", file.to_str().unwrap()]);
    // Pipeliners that do not read: their held requests and responses make the
    // hand-over take a while.
    let get = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n";
    let hoarders: Vec<TcpStream> = (0..30)
        .map(|_| {
            let s = connect(listen);
            (&s).write_all(&get.repeat(60_000)).unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    write_config(&file, &cfg("second"));
    let old = d.pid;
    d.signal("-HUP");
    // The successor has read the file once it logs its start-up line.
    d.expect_line(" listening on ");
    write_config(&file, &cfg("third"));
    let delivered = Daemon::signal_pid(old, "-HUP");
    d.follow_handover();
    d.expect_line("reloaded: took over from pid");
    if !delivered {
        eprintln!("the old process was already gone: nothing shown");
        return;
    }
    // Whatever happens next, within a few seconds "third" must be served.
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < Duration::from_secs(5) {
        let mut s = connect(listen);
        s.write_all(get).unwrap();
        let (_, raw, _) = read_responses(&mut s, 1);
        last = String::from_utf8_lossy(&raw).to_string();
        if last.ends_with("third") {
            // The second SIGHUP made a third process: follow the chain to it, so
            // that the end of the test stops it.
            d.follow_handover();
            drop(hoarders);
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "a SIGHUP that `kill` delivered to pid {old} after the file changed was never acted on: \
         still serving {:?}",
        last.rsplit("\r\n").next()
    );
}

// ---------------------------------------------------------------------------------
// drain through the binary
// ---------------------------------------------------------------------------------

/// README --drain-timeout: "the connections already queued in the kernel's accept
/// backlog are accepted and served (not reset), then the listeners close". The
/// process is stopped while the clients queue, so the backlog is full at SIGTERM.
#[test]
fn sigterm_with_a_full_accept_backlog_serves_every_queued_client() {
    let mut d = Daemon::start(&[
        "echo",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--metrics-listen",
        "off",
        "--backlog",
        "128",
    ]);
    d.signal("-STOP");
    let mut queued: Vec<TcpStream> = (0..100u64)
        .map(|i| {
            let mut s = TcpStream::connect_timeout(&d.addr, Duration::from_secs(2)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(&pattern(i, 0, 1000)).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            s
        })
        .collect();
    d.signal("-TERM");
    d.signal("-CONT");
    for (i, s) in queued.iter_mut().enumerate() {
        let (got, ending) = read_until_end(s);
        assert_eq!(ending, Ending::Fin, "queued client {i}");
        assert_same(&pattern(i as u64, 0, 1000), &got);
    }
    let status = d.first.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

/// README --shutdown-delay: /readyz answers 503 at once while edgepoll keeps accepting
/// and serving; a SIGHUP during the delay starts no reload; a second SIGTERM starts the
/// drain at once.
#[test]
fn shutdown_delay_keeps_serving_with_readyz_503_and_a_second_signal_drains() {
    let mut d = Daemon::start(&[
        "echo",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--metrics-listen",
        "127.0.0.1:0",
        "--shutdown-delay",
        "30s",
        "--drain-timeout",
        "5",
    ]);
    let metrics = d.metrics.unwrap();
    assert_eq!(http_get(metrics, "/readyz").0, 200);
    let mut held = connect(d.addr);
    echo_roundtrip(&mut held, b"before");
    d.signal("-TERM");
    d.expect_line("/readyz answers 503");
    assert_eq!(http_get(metrics, "/readyz").0, 503);
    echo_works(d.addr, Duration::from_secs(3)).expect("accepting during the delay");
    d.signal("-HUP");
    d.expect_line("SIGHUP received while shutting down");
    echo_works(d.addr, Duration::from_secs(3)).expect("accepting after an ignored SIGHUP");
    let text = d.scrape();
    assert_eq!(
        sum_samples(&text, "edgepoll_config_reloads_total"),
        0.0,
        "no reload counted"
    );
    echo_roundtrip(&mut held, b"still");
    let t = Instant::now();
    d.signal("-TERM");
    d.expect_line("draining now");
    // The held client is idle: it gets FIN at once, and the process exits 0.
    let (_, ending) = read_until_end(&mut held);
    assert_eq!(ending, Ending::Fin);
    let status = d.first.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(t.elapsed() < Duration::from_secs(10));
}

// ---------------------------------------------------------------------------------
// upgrade through a symlink; SIGHUP to the successor mid-transfer
// ---------------------------------------------------------------------------------

/// README: "The running process starts the binary at the path it was started from (a
/// package upgrade that replaced the file takes effect)". Deployments that switch a
/// symlink (`/usr/local/bin/edgepoll -> /opt/edgepoll-1.0/edgepoll`, update-
/// alternatives, Nix, Homebrew) upgrade by pointing the link at the new version, but
/// edgepoll remembers `current_exe()`, the link's *target*: the reload starts the old
/// version again and the upgrade silently does not happen.
#[test]
fn an_upgrade_that_switches_a_symlink_takes_effect() {
    let dir = TempDir::new("symlink-upgrade");
    std::fs::create_dir_all(dir.0.join("v1")).unwrap();
    std::fs::create_dir_all(dir.0.join("v2")).unwrap();
    let v1 = dir.0.join("v1/edgepoll");
    install(&exe(), &v1);
    let marker = dir.0.join("v2-ran");
    let v2 = dir.0.join("v2/edgepoll");
    std::fs::write(
        &v2,
        format!(
            "#!/bin/sh\ntouch {}\nexec {} \"$@\"\n",
            marker.display(),
            exe().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&v2, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let link = dir.0.join("edgepoll");
    std::os::unix::fs::symlink(&v1, &link).unwrap();
    let mut cmd = Command::new(&link);
    cmd.args([
        "echo",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--metrics-listen",
        "off",
    ]);
    let mut d = Daemon::spawn(cmd, |mut c| c.spawn().unwrap());
    // The upgrade: the link now names v2 (replaced atomically, as ln -sfn does).
    let tmp = dir.0.join("edgepoll.new");
    std::os::unix::fs::symlink(&v2, &tmp).unwrap();
    std::fs::rename(&tmp, &link).unwrap();
    d.signal("-HUP");
    let line = d.expect_line("SIGHUP received: reloading");
    d.follow_handover();
    d.expect_line("reloaded: took over from pid");
    assert!(
        marker.exists(),
        "the reload after the link moved to v2 started {} instead",
        line.split("reloading (")
            .nth(1)
            .unwrap_or("?")
            .trim_end_matches(')')
    );
}

/// A SIGHUP to the new process while it is still taking the connections in is kept
/// and acted on once it serves: two reloads, nothing lost.
#[test]
fn sighup_to_the_successor_during_its_take_over_reloads_again_safely() {
    let mut d = Daemon::start(&[
        "echo",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--metrics-listen",
        "127.0.0.1:0",
        "--max-pending-bytes",
        "4MiB",
    ]);
    let addr = d.addr;
    let hoarders: Vec<(TcpStream, u64)> = (0..20u64)
        .map(|i| {
            std::thread::spawn(move || {
                let s = connect(addr);
                let n = write_until_stalled(&s, 300 + i, 16 << 20);
                (s, n)
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    let mut idle = connect(d.addr);
    echo_roundtrip(&mut idle, b"x");
    d.signal("-HUP");
    let second = d.follow_handover();
    // The successor is taking the connections in now.
    assert!(Daemon::signal_pid(second, "-HUP"));
    d.expect_line("reloaded: took over from pid");
    d.follow_handover();
    assert_ne!(d.pid, second);
    d.expect_line("reloaded: took over from pid");
    for (i, (mut s, n)) in hoarders.into_iter().enumerate() {
        let mut back = vec![0u8; n as usize];
        s.read_exact(&mut back).unwrap();
        assert_same(&pattern(300 + i as u64, 0, n as usize), &back);
    }
    echo_roundtrip(&mut idle, b"y");
    let text = d.scrape();
    assert_eq!(
        sample(&text, "edgepoll_config_reloads_total{result=\"success\"}"),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, "edgepoll_reload_connections_moved_total"),
        Some(42.0)
    );
}

/// Observation, not a README promise: a successor that says Ready and then stops
/// reading (hung, or SIGSTOPped) holds the old process in `transfer` for
/// SO_SNDTIMEO (10 s) per blocked message; whatever was not sent by then is closed
/// with the old process. Run with --ignored to see the numbers.
#[test]
#[ignore]
fn observe_a_successor_that_hangs_after_ready() {
    let dir = TempDir::new("fake-hang");
    let installed = dir.0.join("edgepoll");
    install(&exe(), &installed);
    let mut cmd = Command::new(&installed);
    cmd.args([
        "echo",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--metrics-listen",
        "off",
        "--max-pending-bytes",
        "4MiB",
    ]);
    let mut d = Daemon::spawn(cmd, |mut c| c.spawn().unwrap());
    let hoarder = connect(d.addr);
    let sent = write_until_stalled(&hoarder, 9, 32 << 20);
    let mut idle = connect(d.addr);
    echo_roundtrip(&mut idle, b"x");
    install_fake_successor(&dir.0, &installed, "hang");
    let t = Instant::now();
    d.signal("-HUP");
    d.expect_line(" is serving; handing over");
    let line = d
        .expect_line_within("handing over to pid", Duration::from_secs(120))
        .unwrap();
    eprintln!("logged {:?} after SIGHUP", t.elapsed());
    let _ = d.first.wait();
    eprintln!("old process gone {:?} after SIGHUP: {line}", t.elapsed());
    let (got, ending) = read_until_end(&mut idle);
    eprintln!(
        "idle client: {} bytes then {ending:?}; hoarder had sent {sent}",
        got.len()
    );
}
