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
    cmd.args(["echo", "--listen", &listen.to_string()])
        .args(["--workers", "2", "--metrics-listen", "off"]);
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
    if new.is_some() {
        d.pid = new
            .unwrap()
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
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n").unwrap();
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
