//! Running out of file descriptors: the acceptor sheds new connections instead of
//! spinning, existing connections keep working, and it recovers by itself.
//!
//! The server runs in a child process (this test binary, re-executed with
//! `EDGEPOLL_FD_CHILD=1`) whose soft open-file limit is lowered to [`CHILD_FD_LIMIT`], so
//! the limit bites the server and not the test's own clients.

mod util;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use util::*;

const CHILD_FD_LIMIT: u64 = 48;
const CHILD_ENV: &str = "EDGEPOLL_FD_CHILD";

/// Not a test on its own: the server side, run only in the child process.
#[test]
fn fd_exhaustion_child() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    edgepoll::sys::rlimit::set_nofile_soft(CHILD_FD_LIMIT).unwrap();
    let mut config = edgepoll::Config::new(edgepoll::Mode::Echo);
    config.listen = vec!["127.0.0.1:0".parse().unwrap()];
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    config.workers = 1;
    config.drain_timeout = Duration::from_secs(1);
    let server = edgepoll::Server::start(config).unwrap();
    println!(
        "READY {} {}",
        server.local_addr(),
        server.metrics_addr().unwrap()
    );
    // Serve until the parent closes our stdin.
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    server.shutdown();
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_comm.split(' ').collect();
    // Fields 14 and 15 of proc(5), counted from 3 after the command name.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

/// Connects and asks for an echo of one byte: Some(stream) if served, None if shed.
fn try_serve(addr: SocketAddr) -> Option<std::net::TcpStream> {
    let mut s = connect(addr);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    if s.write_all(b"x").is_err() {
        return None;
    }
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(1) => {
            assert_eq!(&b, b"x");
            Some(s)
        }
        Ok(_) => None,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
        Err(e) => panic!("neither served nor shed: {e}"),
    }
}

#[test]
fn fd_exhaustion_never_spins_and_recovers() {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "fd_exhaustion_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    // libtest prints "test fd_exhaustion_child ... " on the same line, before ours.
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = lines
        .by_ref()
        .map(|l| l.unwrap())
        .find_map(|l| l.split_once("READY ").map(|(_, rest)| rest.to_string()))
        .expect("the child server starts");
    // Keep reading the child's stdout so its last lines never meet a closed pipe.
    std::thread::spawn(move || lines.for_each(drop));
    let mut parts = ready.split(' ');
    let addr: SocketAddr = parts.next().unwrap().parse().unwrap();
    let metrics: SocketAddr = parts.next().unwrap().parse().unwrap();

    // Far more clients than the child has descriptors for.
    let mut served = Vec::new();
    let mut shed = 0u64;
    for _ in 0..100 {
        match try_serve(addr) {
            Some(s) => served.push(s),
            None => shed += 1,
        }
    }
    eprintln!("served {}, shed {shed}", served.len());
    assert!(
        served.len() >= 10,
        "the server holds connections up to its limit"
    );
    assert!(shed >= 50, "the rest are shed, not left hanging");

    // Saturated, with clients still arriving: the server must not spin.
    let cpu_before = cpu_seconds(child.id());
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        if try_serve(addr).is_none() {
            shed += 1;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let cpu = cpu_seconds(child.id()) - cpu_before;
    eprintln!("child CPU over 2 s saturated: {cpu:.2} s");
    // A spinning acceptor burns the whole 2 s of a core.
    assert!(
        cpu < 0.5,
        "the server used {cpu:.2} s of CPU in 2 s while saturated"
    );

    // The connections it holds still work.
    for (i, s) in served.iter_mut().enumerate() {
        echo_roundtrip(s, format!("still served {i}").as_bytes());
    }

    // Free some descriptors: it recovers by itself, and counted every shed connection.
    let freed = 5;
    served.truncate(served.len() - freed);
    let mut body = String::new();
    wait_for("a scrape to succeed", || {
        let ok = std::panic::catch_unwind(|| http_get(metrics, "/metrics"));
        match ok {
            Ok((200, _, b)) => {
                body = b;
                true
            }
            _ => false,
        }
    });
    let counted = sample(
        &body,
        "edgepoll_connections_rejected_total{reason=\"fd_limit\"}",
    );
    assert_eq!(counted, Some(shed as f64));
    for _ in 0..freed - 2 {
        let mut s = try_serve(addr).expect("accepting again once descriptors are free");
        echo_roundtrip(&mut s, b"recovered");
        served.push(s);
    }

    drop(served);
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
}
