//! Chaos soak: a few hundred clients at once, each cycling through hostile and normal
//! behaviours, against one server. Afterwards no verifying client lost or saw a
//! corrupted byte, the server still answers, and connections, descriptors and memory
//! are back where they started. Runs 3 s in `cargo test`; `EDGEPOLL_SOAK_SECS=60`
//! (as `.ci/run` sets) makes it a real soak. Prints its figures.

mod util;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgepoll::sys::socket::set_linger_zero;
use util::*;

const CLIENTS: u64 = 300;

#[derive(Default)]
struct Tally {
    verified_bytes: AtomicU64,
    corrupted: AtomicU64,
    exchanges: AtomicU64,
    resets: AtomicU64,
    half_closes: AtomicU64,
    never_read: AtomicU64,
    idles: AtomicU64,
    garbage: AtomicU64,
    churn: AtomicU64,
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    statm.split(' ').nth(1).unwrap().parse::<u64>().unwrap() * 4096
}

/// A tiny deterministic generator, so every client's choices differ but repeat.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn client(id: u64, addr: SocketAddr, until: Instant, tally: &Tally) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (id + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
    let mut seq = 0u64;
    while Instant::now() < until {
        seq += 1;
        let seed = id << 32 | seq;
        let Ok(mut s) = TcpStream::connect(addr) else {
            continue;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
        match rng.below(7) {
            0 => {
                // Verified echo of a few messages of mixed sizes.
                let mut offset = 0u64;
                for _ in 0..1 + rng.below(4) {
                    let len = 1 + rng.below(40_000) as usize;
                    let data = pattern(seed, offset, len);
                    let mut back = vec![0u8; len];
                    let mut w = s.try_clone().unwrap();
                    let sender = std::thread::spawn(move || w.write_all(&data).is_ok());
                    let ok = s.read_exact(&mut back).is_ok();
                    assert!(
                        sender.join().unwrap() && ok,
                        "a verifying client lost its echo"
                    );
                    if back != pattern(seed, offset, len) {
                        tally.corrupted.fetch_add(1, Ordering::Relaxed);
                    }
                    tally
                        .verified_bytes
                        .fetch_add(len as u64, Ordering::Relaxed);
                    offset += len as u64;
                }
                tally.exchanges.fetch_add(1, Ordering::Relaxed);
            }
            1 => {
                // Half-close: everything comes back, then EOF.
                let data = pattern(seed, 0, 1 + rng.below(100_000) as usize);
                let mut w = s.try_clone().unwrap();
                let to_send = data.clone();
                let sender = std::thread::spawn(move || {
                    w.write_all(&to_send).unwrap();
                    w.shutdown(Shutdown::Write).unwrap();
                });
                let (back, eof) = read_to_end(&mut s);
                sender.join().unwrap();
                assert!(eof, "half-closed client did not get a clean EOF");
                if back != data {
                    tally.corrupted.fetch_add(1, Ordering::Relaxed);
                }
                tally
                    .verified_bytes
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                tally.half_closes.fetch_add(1, Ordering::Relaxed);
            }
            2 => {
                // Reset mid-stream.
                let _ = s.write_all(&pattern(seed, 0, 1 + rng.below(200_000) as usize));
                let _ = set_linger_zero(s.as_fd());
                tally.resets.fetch_add(1, Ordering::Relaxed);
            }
            3 => {
                // Never reads: writes until the server stops taking bytes, then leaves.
                let _ = s.set_write_timeout(Some(Duration::from_millis(100)));
                let chunk = pattern(seed, 0, 64 * 1024);
                for _ in 0..64 {
                    if s.write_all(&chunk).is_err() {
                        break;
                    }
                }
                tally.never_read.fetch_add(1, Ordering::Relaxed);
            }
            4 => {
                // Connect and idle.
                std::thread::sleep(Duration::from_millis(rng.below(300)));
                tally.idles.fetch_add(1, Ordering::Relaxed);
            }
            5 => {
                // Random garbage, then leave without reading.
                let junk: Vec<u8> = (0..1 + rng.below(5000)).map(|_| rng.next() as u8).collect();
                let _ = s.write_all(&junk);
                tally.garbage.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                // Open-close churn.
                drop(s);
                for _ in 0..10 {
                    let _ = TcpStream::connect(addr);
                }
                tally.churn.fetch_add(11, Ordering::Relaxed);
                continue;
            }
        }
    }
}

/// The soaks count the process's descriptors and memory, so they must not overlap.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn soak_secs() -> u64 {
    std::env::var("EDGEPOLL_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
}

#[test]
fn chaos_soak_loses_nothing_and_leaks_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let server = echo_server(2, |c| {
        c.idle_timeout = Some(Duration::from_secs(5));
        c.max_pending_bytes = 128 * 1024;
    });
    soak("chaos soak", &server, &[]);
}

#[test]
fn chaos_soak_through_the_relay_loses_nothing_and_leaks_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Each relayed connection holds four descriptors in this process (the client, the
    // relay's two sockets, the echo server's socket).
    if let Ok((soft, hard)) = edgepoll::sys::rlimit::nofile() {
        if soft < hard {
            edgepoll::sys::rlimit::set_nofile_soft(hard).unwrap();
        }
    }
    let upstream = echo_server(2, |c| {
        c.idle_timeout = Some(Duration::from_secs(5));
        c.max_pending_bytes = 128 * 1024;
    });
    let mut config = edgepoll::Config::new(edgepoll::Mode::Relay);
    config.listen = vec!["127.0.0.1:0".parse().unwrap()];
    config.workers = 2;
    config.metrics_listen = None;
    config.idle_timeout = Some(Duration::from_secs(5));
    config.max_pending_bytes = 128 * 1024;
    config.relay.upstreams = vec![upstream.local_addr()];
    let relay = edgepoll::Server::start(config).unwrap();
    soak("chaos soak through the relay", &relay, &[&upstream]);
    let label = upstream.local_addr().to_string();
    assert_eq!(relay.metrics().upstream_active(&label), 0);
    let errors: u64 = edgepoll::metrics::ConnectError::ALL
        .iter()
        .map(|&r| relay.metrics().upstream_connect_errors(&label, r))
        .sum();
    assert_eq!(errors, 0, "upstream connects failed");
}

/// Runs the clients against `server` (and, behind it, `behind`), then checks that
/// nothing was lost or leaked.
fn soak(label: &str, server: &edgepoll::Server, behind: &[&edgepoll::Server]) {
    let secs = soak_secs();
    let addr = server.local_addr();
    // Warm up, then take the baselines.
    echo_roundtrip(&mut connect(addr), b"warm");
    wait_for("the warm-up close", || {
        server.open_connections() == 0 && behind.iter().all(|b| b.open_connections() == 0)
    });
    let fds_before = open_fds();
    let rss_before = resident_bytes();

    let tally = Arc::new(Tally::default());
    let until = Instant::now() + Duration::from_secs(secs);
    let threads: Vec<_> = (0..CLIENTS)
        .map(|id| {
            let tally = Arc::clone(&tally);
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || client(id, addr, until, &tally))
                .unwrap()
        })
        .collect();
    for t in threads {
        t.join().expect("a client thread failed");
    }

    // Still answering.
    echo_roundtrip(&mut connect(addr), b"still here after the storm");
    for s in std::iter::once(server).chain(behind.iter().copied()) {
        wait_for("every connection to be closed", || {
            s.open_connections() == 0
        });
        wait_for("the active gauge to publish 0", || {
            s.stats().iter().map(|w| w.active).sum::<i64>() == 0
        });
        wait_for("outbound buffers to empty", || s.buffered_bytes() == 0);
    }
    let fds_after = open_fds();
    let rss_after = resident_bytes();
    let t = &tally;
    let accepted = total(server, |s| s.accepted);
    eprintln!(
        "{label}: {secs} s, {CLIENTS} clients, {accepted} connections accepted; verified {} bytes in {} exchanges and {} half-closes, {} corrupted; faults: {} resets, {} never-read, {} idle, {} garbage, {} churn; fds {} -> {}; RSS {} -> {} KiB",
        t.verified_bytes.load(Ordering::Relaxed),
        t.exchanges.load(Ordering::Relaxed),
        t.half_closes.load(Ordering::Relaxed),
        t.corrupted.load(Ordering::Relaxed),
        t.resets.load(Ordering::Relaxed),
        t.never_read.load(Ordering::Relaxed),
        t.idles.load(Ordering::Relaxed),
        t.garbage.load(Ordering::Relaxed),
        t.churn.load(Ordering::Relaxed),
        fds_before,
        fds_after,
        rss_before / 1024,
        rss_after / 1024,
    );
    assert_eq!(t.corrupted.load(Ordering::Relaxed), 0);
    assert!(t.verified_bytes.load(Ordering::Relaxed) > 0);
    assert_eq!(fds_after, fds_before, "descriptors leaked");
    // Client threads' stacks and the allocator's caches stay mapped; a leak per
    // connection would grow with the thousands of connections made.
    assert!(
        rss_after < rss_before + 64 * 1024 * 1024,
        "RSS grew from {rss_before} to {rss_after}"
    );
}
