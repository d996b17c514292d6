//! Helpers shared by the integration tests: servers on 127.0.0.1:0, patterned payloads,
//! polling for published counters, and a minimal scrape client.
#![allow(dead_code)]

pub mod load;
pub mod records;

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use edgepoll::{Config, Mode, Server, WorkerStats};

/// How long a test waits for something that should happen within milliseconds.
/// Generous because CI machines are shared; a correct server never comes close.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// An echo server on an ephemeral loopback port with `workers` workers, no metrics
/// endpoint, and whatever `tweak` changes.
pub fn echo_server(workers: usize, tweak: impl FnOnce(&mut Config)) -> Server {
    let mut config = Config::new(Mode::Echo);
    config.listen = vec!["127.0.0.1:0".parse().unwrap()];
    config.workers = workers;
    config.metrics_listen = None;
    config.drain_timeout = Duration::from_secs(5);
    tweak(&mut config);
    Server::start(config).expect("server starts")
}

/// A blocking client with timeouts, so a broken server fails the test instead of hanging it.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream.set_write_timeout(Some(PATIENCE)).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// Deterministic bytes that differ per stream and per position, so a dropped, repeated
/// or reordered byte shows up as a mismatch (xorshift64*).
pub fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut i = offset;
    while out.len() < len {
        let block = i / 8;
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ block.wrapping_add(1);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let word = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        let start = (i % 8) as usize;
        let take = (8 - start).min(len - out.len());
        out.extend_from_slice(&word[start..start + take]);
        i += take as u64;
    }
    out
}

/// Sends `data` and reads exactly as many bytes back; panics with the first
/// differing offset.
#[track_caller]
pub fn echo_roundtrip(stream: &mut TcpStream, data: &[u8]) {
    stream.write_all(data).expect("write");
    let mut back = vec![0u8; data.len()];
    stream.read_exact(&mut back).expect("read echo");
    assert_same(data, &back);
}

#[track_caller]
pub fn assert_same(expected: &[u8], got: &[u8]) {
    assert_eq!(expected.len(), got.len(), "length differs");
    if let Some(i) = expected.iter().zip(got).position(|(a, b)| a != b) {
        panic!(
            "byte {i} differs: expected {:#04x}, got {:#04x}",
            expected[i], got[i]
        );
    }
}

/// Polls `cond` until it holds, or panics with `what` after [`PATIENCE`].
#[track_caller]
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > PATIENCE {
            panic!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sums a field over every worker's published stats.
pub fn total(server: &Server, field: impl Fn(&WorkerStats) -> u64) -> u64 {
    server.stats().iter().map(field).sum()
}

/// Reads until EOF or error; returns the bytes and whether it ended in a clean EOF.
pub fn read_to_end(stream: &mut TcpStream) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (out, false),
        }
    }
}

/// `GET path` over a fresh connection, or None if the connection failed before a
/// whole response came (refused, reset, closed early): for a scraper that, like
/// Prometheus, counts a failed scrape and tries again.
pub fn try_http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(PATIENCE)).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").ok()?;
    let (raw, clean) = read_to_end(&mut s);
    if !clean {
        return None;
    }
    let text = String::from_utf8(raw).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// `GET path` over a fresh connection; returns (status, head, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut s = connect(addr);
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let (raw, _) = read_to_end(&mut s);
    let text = String::from_utf8(raw).expect("utf-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    (status, head.to_string(), body.to_string())
}

/// The value of one sample line in a text exposition, e.g.
/// `edgepoll_received_bytes_total{worker="0"}`; None if absent.
pub fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        let value = rest.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

/// Sum of every sample of a metric family, whatever its labels.
pub fn sum_samples(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// An http-mode server on an ephemeral loopback port, like [`echo_server`].
pub fn http_server(workers: usize, tweak: impl FnOnce(&mut Config)) -> Server {
    echo_server(workers, |c| {
        c.mode = Mode::Http;
        tweak(c);
    })
}

/// Reads HTTP responses until `n` are complete or the peer closes; returns their
/// statuses, the raw bytes, and whether the peer closed.
pub fn read_responses(stream: &mut TcpStream, n: usize) -> (Vec<u16>, Vec<u8>, bool) {
    let mut parser = edgepoll::load::http::ResponseParser::new();
    let mut statuses = Vec::new();
    let mut raw = Vec::new();
    let mut pos = 0;
    let mut buf = [0u8; 65536];
    loop {
        while statuses.len() < n {
            match parser.parse(&raw[pos..]) {
                Ok((used, Some(resp))) => {
                    pos += used;
                    statuses.push(resp.status);
                }
                Ok((used, None)) => {
                    pos += used;
                    break;
                }
                Err(e) => panic!("unparseable response: {e}"),
            }
        }
        if statuses.len() >= n {
            return (statuses, raw, false);
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return (statuses, raw, true),
            Ok(k) => raw.extend_from_slice(&buf[..k]),
        }
    }
}

/// A relay server on an ephemeral loopback port in front of `upstreams`, like
/// [`echo_server`].
pub fn relay_server(
    workers: usize,
    upstreams: Vec<SocketAddr>,
    tweak: impl FnOnce(&mut Config),
) -> Server {
    let mut config = Config::new(Mode::Relay);
    config.listen = vec!["127.0.0.1:0".parse().unwrap()];
    config.workers = workers;
    config.metrics_listen = None;
    config.drain_timeout = Duration::from_secs(5);
    config.relay.upstreams = upstreams;
    tweak(&mut config);
    Server::start(config).expect("relay starts")
}

/// An address where nothing listens: bound once, then released.
pub fn dead_address() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A one-connection upstream run by `serve` on its own thread; returns its address
/// and the thread.
pub fn upstream_once<T: Send + 'static>(
    serve: impl FnOnce(TcpStream) -> T + Send + 'static,
) -> (SocketAddr, std::thread::JoinHandle<T>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        s.set_write_timeout(Some(PATIENCE)).unwrap();
        serve(s)
    });
    (addr, t)
}

/// An address whose connects hang until they time out: a listener whose one-slot
/// accept queue is already full drops every SYN. It stays a black hole while this
/// value lives.
pub struct Blackhole {
    pub addr: SocketAddr,
    _listener: OwnedFd,
    _filler: TcpStream,
}

pub fn blackhole() -> Blackhole {
    let listener =
        edgepoll::sys::socket::listen("127.0.0.1:0".parse().unwrap(), 0).expect("listen");
    let addr = edgepoll::sys::socket::local_addr(listener.as_fd()).unwrap();
    let filler = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    Blackhole {
        addr,
        _listener: listener,
        _filler: filler,
    }
}

/// How a byte stream ended for its reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// `read` returned 0: the peer sent FIN, which says "that was everything".
    Fin,
    /// `read` failed; `ConnectionReset` when the peer sent RST.
    Error(ErrorKind),
}

/// Reads until the stream ends; returns every byte and how it ended. A read that
/// times out (after the stream's read timeout) ends it as `Error(WouldBlock)`.
pub fn read_until_end(stream: &mut TcpStream) -> (Vec<u8>, Ending) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (out, Ending::Fin),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return (out, Ending::Error(e.kind())),
        }
    }
}

/// Asserts that `who`'s stream, which ended after `got` bytes, ended in a reset: a
/// close that leaves bytes undelivered must never look like a complete stream.
#[track_caller]
pub fn assert_reset(who: &str, got: usize, ending: Ending) {
    match ending {
        Ending::Error(ErrorKind::ConnectionReset) => {}
        Ending::Fin => panic!("{who}: got EOF after {got} bytes, expected ECONNRESET"),
        Ending::Error(kind) => {
            panic!("{who}: got {kind:?} after {got} bytes, expected ECONNRESET")
        }
    }
}

/// Asserts that `got` is the first bytes of stream `seed` (see [`pattern`]), and no
/// more than the `sent` bytes of it that were written.
#[track_caller]
pub fn assert_prefix(seed: u64, got: &[u8], sent: u64) {
    assert!(
        got.len() as u64 <= sent,
        "received {} bytes, but only {sent} were sent",
        got.len()
    );
    assert_same(&pattern(seed, 0, got.len()), got);
}

/// How long writes must be refused before [`write_until_stalled`] calls the path full.
pub const STALL: Duration = Duration::from_millis(300);

/// Writes stream `seed` (see [`pattern`]) without blocking until `limit` bytes are
/// written or no byte has been taken for [`STALL`]: every buffer on the way is full.
/// Returns the bytes written; the stream is left blocking.
pub fn write_until_stalled(mut stream: &TcpStream, seed: u64, limit: u64) -> u64 {
    const CHUNK: u64 = 64 * 1024;
    stream.set_nonblocking(true).unwrap();
    let mut sent = 0u64;
    let mut chunk = pattern(seed, 0, CHUNK.min(limit) as usize);
    let mut chunk_at = 0u64;
    let mut refused_since: Option<Instant> = None;
    while sent < limit {
        if sent - chunk_at == chunk.len() as u64 {
            chunk = pattern(seed, sent, CHUNK.min(limit - sent) as usize);
            chunk_at = sent;
        }
        match stream.write(&chunk[(sent - chunk_at) as usize..]) {
            Ok(n) => {
                sent += n as u64;
                refused_since = None;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if refused_since.get_or_insert_with(Instant::now).elapsed() >= STALL {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("write after {sent} bytes: {e}"),
        }
    }
    stream.set_nonblocking(false).unwrap();
    sent
}

/// Polls `value` until it has not changed for 500 ms (or [`PATIENCE`] passes) and
/// returns it: for counters that stop moving once every buffer on the way is full.
pub fn settled(mut value: impl FnMut() -> u64) -> u64 {
    let start = Instant::now();
    let mut last = value();
    let mut since = Instant::now();
    while since.elapsed() < Duration::from_millis(500) && start.elapsed() < PATIENCE {
        std::thread::sleep(Duration::from_millis(20));
        let now = value();
        if now != last {
            last = now;
            since = Instant::now();
        }
    }
    last
}

/// This process's resident set (server and clients alike), from /proc/self/statm.
pub fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split(' ').nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// Clients that hold a port the way broken or hostile ones do, from a thread of their
/// own: `n` connections, each silent or sending one more byte of a request head that
/// never ends at every pass. One the server closes or answers is replaced at the next
/// pass, at most [`Crowd::REPLACE_PER_PASS`] a pass, so the pressure lasts until
/// [`Crowd::stop`] and the rate of new connections stays bounded.
pub struct Crowd {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<usize>>,
}

impl Crowd {
    /// Replacements per pass: enough to refill a crowd the server thins out, few enough
    /// that ephemeral ports and TIME_WAIT entries stay far from their limits.
    pub const REPLACE_PER_PASS: usize = 200;

    /// `n` connections that send nothing; checked every 500 ms.
    pub fn idle(addr: SocketAddr, n: usize) -> Crowd {
        Crowd::start(addr, n, Duration::from_millis(500), false)
    }

    /// `n` connections that send `GET /metrics HTTP/1.1` and a header line, then one
    /// more byte of that line every `every`, never finishing the head.
    pub fn trickling(addr: SocketAddr, n: usize, every: Duration) -> Crowd {
        Crowd::start(addr, n, every, true)
    }

    fn start(addr: SocketAddr, n: usize, pass: Duration, trickle: bool) -> Crowd {
        let open = move || -> Option<TcpStream> {
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
            if trickle {
                s.set_nodelay(true).ok()?;
                (&s).write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ").ok()?;
            }
            s.set_nonblocking(true).ok()?;
            Some(s)
        };
        let mut conns: Vec<Option<TcpStream>> = (0..n).map(|_| open()).collect();
        let mut opened = conns.iter().flatten().count();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !sleep_unless(&stopping, pass) {
                let mut budget = Crowd::REPLACE_PER_PASS;
                for slot in conns.iter_mut() {
                    let alive = slot.as_mut().is_some_and(|s| {
                        // Anything readable (a response, EOF, a reset) means the server
                        // is done with this connection.
                        let quiet = matches!(s.read(&mut buf),
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock);
                        quiet && (!trickle || s.write(b"a").is_ok())
                    });
                    if !alive && budget > 0 {
                        budget -= 1;
                        *slot = open();
                        opened += usize::from(slot.is_some());
                    }
                }
            }
            opened
        });
        Crowd {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops and closes the crowd; returns how many connections it opened in all.
    pub fn stop(mut self) -> usize {
        self.finish()
    }

    fn finish(&mut self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().map_or(0, |t| t.join().unwrap_or(0))
    }
}

impl Drop for Crowd {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Sleeps `d` in short steps; returns early, with true, once `stop` is set.
fn sleep_unless(stop: &AtomicBool, d: Duration) -> bool {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if stop.load(Ordering::SeqCst) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.load(Ordering::SeqCst)
}

/// CPU time this process has used (user + system), from /proc/self/stat: for guards
/// that a held pathological peer costs no CPU (a spin shows as a whole core).
pub fn process_cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_comm.split(' ').collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the comm.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// A child process that is killed when the test ends, even by a failed assertion.
pub struct Running(pub std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends `sig` (`"-TERM"`, `"-HUP"`, ...) to process `pid` with kill(1).
#[track_caller]
pub fn kill(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}
