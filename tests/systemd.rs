//! The `edgepoll` binary under systemd, with no systemd installed: socket activation
//! (listening sockets handed over at fd 3, 4, ... with LISTEN_FDS and LISTEN_PID, as
//! `systemd-socket-activate` does) and readiness notifications on a NOTIFY_SOCKET the
//! test binds.

mod util;

use std::io::{BufRead, BufReader, ErrorKind, Lines, Read};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::AsFd;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{ChildStderr, Command, ExitStatus, Stdio};

use edgepoll::sys::systemd::spawn_activated;
use util::*;

/// The binary in echo mode with its log on a pipe, metrics off.
fn edgepoll_echo(listen: SocketAddr) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgepoll"));
    cmd.args(["echo", "--listen", &listen.to_string()])
        .args(["--workers", "2", "--metrics-listen", "off"])
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped());
    cmd
}

/// How the child exited, polled rather than waited for, so that a child that keeps
/// running fails the test instead of hanging it.
#[track_caller]
fn exit_status(child: &mut Running) -> ExitStatus {
    let mut status = None;
    wait_for("edgepoll to exit", || {
        status = child.0.try_wait().unwrap();
        status.is_some()
    });
    status.unwrap()
}

/// Reads the child's log up to its start-up line; returns every line read.
fn log_until_started(lines: &mut Lines<BufReader<ChildStderr>>) -> Vec<String> {
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let started = line.contains(" listening on ");
        seen.push(line);
        if started {
            return seen;
        }
    }
    panic!("no start-up line in:\n{}", seen.join("\n"));
}

/// A NOTIFY_SOCKET for one test: a datagram socket bound in a fresh temp folder.
struct NotifySocket {
    dir: PathBuf,
    path: PathBuf,
    socket: UnixDatagram,
}

impl NotifySocket {
    fn bind(test: &str) -> NotifySocket {
        let dir = std::env::temp_dir().join(format!("edgepoll-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket.set_read_timeout(Some(PATIENCE)).unwrap();
        NotifySocket { dir, path, socket }
    }

    /// The next notification, whole.
    #[track_caller]
    fn next(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = self.socket.recv(&mut buf).expect("a notification");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[track_caller]
    fn assert_none_pending(&self) {
        self.socket.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 4096];
        match self.socket.recv(&mut buf) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            other => panic!("unexpected notification: {other:?}"),
        }
        self.socket.set_nonblocking(false).unwrap();
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn an_inherited_socket_is_served_instead_of_listen_and_systemd_hears_ready_then_stopping() {
    let inherited = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = inherited.local_addr().unwrap();
    // --listen names a port this test holds: were it bound, the start would fail.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();
    let notify = NotifySocket::bind("systemd-ready");

    let mut cmd = edgepoll_echo(taken_addr);
    cmd.env("NOTIFY_SOCKET", &notify.path);
    let mut child = Running(spawn_activated(cmd, &[inherited.as_fd()]).unwrap());

    assert_eq!(notify.next(), format!("STATUS=serving echo on {addr}"));
    assert_eq!(notify.next(), "READY=1");
    let mut lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
    let log = log_until_started(&mut lines).join("\n");
    std::thread::spawn(move || lines.for_each(drop));
    assert!(
        log.contains(&format!(
            "socket activation: serving the 1 socket the service manager passed (LISTEN_FDS): {addr}"
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "--listen {taken_addr} ignored: the inherited sockets replace it"
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!("echo: listening on {addr} with 2 workers")),
        "{log}"
    );

    for seed in 0..3 {
        let mut client = connect(addr);
        echo_roundtrip(&mut client, &pattern(seed, 0, 64 * 1024));
    }
    notify.assert_none_pending();

    let pid = child.0.id();
    kill(pid, "-TERM");
    assert_eq!(notify.next(), "STOPPING=1");
    assert_eq!(exit_status(&mut child).code(), Some(0));
    notify.assert_none_pending();
}

#[test]
fn every_inherited_socket_is_served_in_the_order_passed() {
    let first = TcpListener::bind("127.0.0.1:0").unwrap();
    let second = TcpListener::bind("127.0.0.1:0").unwrap();
    let (a, b) = (first.local_addr().unwrap(), second.local_addr().unwrap());
    let cmd = edgepoll_echo("127.0.0.1:0".parse().unwrap());
    let mut child = Running(spawn_activated(cmd, &[first.as_fd(), second.as_fd()]).unwrap());
    let mut lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
    let log = log_until_started(&mut lines).join("\n");
    std::thread::spawn(move || lines.for_each(drop));
    assert!(
        log.contains(&format!("listening on {a}, {b} with")),
        "{log}"
    );
    for (seed, addr) in [a, b].into_iter().enumerate() {
        echo_roundtrip(&mut connect(addr), &pattern(seed as u64, 0, 4096));
    }
}

#[test]
fn a_socket_that_is_not_a_tcp_listener_is_refused_with_its_fd_named() {
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = udp.local_addr().unwrap();
    let cmd = edgepoll_echo("127.0.0.1:0".parse().unwrap());
    let mut child = Running(spawn_activated(cmd, &[udp.as_fd()]).unwrap());
    let status = exit_status(&mut child);
    let mut err = String::new();
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "edgepoll: LISTEN_FDS=1: fd 3: fd 3 ({addr}) is not a listening TCP socket"
        )),
        "{err}"
    );
}

#[test]
fn listen_variables_meant_for_another_process_are_ignored() {
    // A parent that was socket-activated and leaked its variables: LISTEN_PID names
    // it, not edgepoll, so edgepoll binds --listen as usual.
    let mut cmd = edgepoll_echo("127.0.0.1:0".parse().unwrap());
    cmd.env("LISTEN_PID", "1").env("LISTEN_FDS", "1");
    let mut child = Running(cmd.spawn().unwrap());
    let mut lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
    let log = log_until_started(&mut lines);
    std::thread::spawn(move || lines.for_each(drop));
    assert!(!log.join("\n").contains("socket activation"), "{log:?}");
    let started = log.last().unwrap();
    let addr: SocketAddr = started
        .split(" listening on ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|a| a.parse().ok())
        .expect("an address");
    assert_ne!(addr.port(), 0);
    echo_roundtrip(&mut connect(addr), b"bound, not inherited");
}

/// A reload under systemd: the old process says RELOADING=1 (with the monotonic time
/// Type=notify-reload asks for), the new one names itself the main process before the
/// old one exits, then says READY=1. The socket systemd passed is kept by the new
/// process even though --listen names another address, and an open connection moves.
#[test]
fn a_reload_tells_systemd_reloading_then_the_new_main_pid_then_ready_and_keeps_the_socket() {
    let inherited = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = inherited.local_addr().unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let notify = NotifySocket::bind("systemd-reload");
    let mut cmd = edgepoll_echo(taken.local_addr().unwrap());
    cmd.env("NOTIFY_SOCKET", &notify.path);
    let mut child = Running(spawn_activated(cmd, &[inherited.as_fd()]).unwrap());
    let mut lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
    log_until_started(&mut lines);
    std::thread::spawn(move || lines.for_each(drop));
    assert!(notify.next().starts_with("STATUS="));
    assert_eq!(notify.next(), "READY=1");
    let mut client = connect(addr);
    echo_roundtrip(&mut client, b"before");

    let old = child.0.id();
    kill(old, "-HUP");
    let reloading = notify.next();
    let mut parts = reloading.split('\n');
    assert_eq!(parts.next(), Some("RELOADING=1"));
    let usec: u64 = parts
        .next()
        .and_then(|p| p.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("MONOTONIC_USEC in {reloading:?}"));
    assert!(usec > 0);
    let main_pid: u32 = notify
        .next()
        .strip_prefix("MAINPID=")
        .and_then(|v| v.parse().ok())
        .expect("MAINPID=<new pid>");
    assert_ne!(main_pid, old);
    assert_eq!(notify.next(), format!("STATUS=serving echo on {addr}"));
    assert_eq!(notify.next(), "READY=1");
    assert!(exit_status(&mut child).success(), "the old process exits 0");

    echo_roundtrip(&mut client, b"moved to the new main pid");
    let mut fresh = connect(addr);
    echo_roundtrip(&mut fresh, b"the socket systemd passed is still served");
    kill(main_pid, "-TERM");
    assert_eq!(notify.next(), "STOPPING=1");
}
