//! The claims the design rests on, measured: select and poll copy and scan every
//! descriptor on every call, so their cost grows with the descriptors watched, idle or
//! not; select cannot watch descriptor numbers of 1,024 and up; epoll reports only the
//! ready ones; edge-triggering saves work over level-triggering.
//!
//! Part 1, readiness round trip: one active TCP connection among K idle sockets, all
//! watched. One round trip is: write one byte into the connection, wait for readiness
//! (select, poll, epoll level-triggered, epoll edge-triggered), read the byte. K in 10,
//! 100, 1,000, 10,000. The idle sockets are UDP sockets bound to 127.0.0.1 (one
//! descriptor each, never readable), so that 10,000 of them fit under the open-file
//! limit; a kernel polls them through the same per-socket callback as a TCP socket.
//!
//! Part 2, echo loop: a server thread echoes 50 connections driven by a client thread
//! on the other core, once with a level-triggered loop (the classic one: one read per
//! readiness report, EPOLLOUT switched on with `epoll_ctl` when a write is short and
//! off when the buffer drains) and once edge-triggered (edgepoll's: registered once,
//! read until a short read). It counts the server's system calls per message and
//! its CPU time per message (CLOCK_THREAD_CPUTIME_ID).
//!
//!   cargo bench --bench pollers        # prints markdown; writes benches/pollers.svg
//!
//! Environment: POLLERS_BATCH_MS (default 200) and POLLERS_ECHO_SECS (default 2).

use std::io::{self, ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use edgepoll::sys::epoll::{Epoll, Events};
use edgepoll::sys::poll::{self, FdSet};
use edgepoll::sys::{rlimit, socket, thread};

const KS: [usize; 4] = [10, 100, 1_000, 10_000];
const BATCHES: usize = 5;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Poller {
    Select,
    Poll,
    EpollLevel,
    EpollEdge,
}

impl Poller {
    const ALL: [Poller; 4] = [
        Poller::Select,
        Poller::Poll,
        Poller::EpollLevel,
        Poller::EpollEdge,
    ];

    fn name(self) -> &'static str {
        match self {
            Poller::Select => "select",
            Poller::Poll => "poll",
            Poller::EpollLevel => "epoll (level)",
            Poller::EpollEdge => "epoll (edge)",
        }
    }

    fn colour(self) -> &'static str {
        match self {
            Poller::Select => "#d62728",
            Poller::Poll => "#ff7f0e",
            Poller::EpollLevel => "#1f77b4",
            Poller::EpollEdge => "#2ca02c",
        }
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pin(core: usize) {
    if let Some(ids) = core_affinity::get_core_ids() {
        if let Some(id) = ids.get(core % ids.len().max(1)) {
            core_affinity::set_for_current(*id);
        }
    }
}

/// A connected loopback pair: (client, server), both non-blocking.
fn tcp_pair() -> io::Result<(TcpStream, TcpStream)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let c = TcpStream::connect(l.local_addr()?)?;
    let (s, _) = l.accept()?;
    c.set_nodelay(true)?;
    s.set_nodelay(true)?;
    c.set_nonblocking(true)?;
    s.set_nonblocking(true)?;
    Ok((c, s))
}

/// Median nanoseconds per readiness round trip with `k` idle sockets watched, or None
/// where the poller cannot watch them (select past FD_SETSIZE).
fn round_trip_ns(kind: Poller, k: usize, batch: Duration) -> io::Result<Option<f64>> {
    let idle: Vec<UdpSocket> = (0..k)
        .map(|_| UdpSocket::bind("127.0.0.1:0"))
        .collect::<io::Result<_>>()?;
    let (mut client, mut server) = tcp_pair()?;
    let mut byte = [0u8; 1];

    // Each poller's "wait until the server socket is readable".
    let mut fds: Vec<poll::PollFd> = Vec::new();
    let mut watch = FdSet::new();
    let mut ready = FdSet::new();
    let epoll = Epoll::new()?;
    let mut events = Events::with_capacity(64);
    match kind {
        Poller::Select => {
            for s in &idle {
                if watch.insert(s.as_fd()).is_err() {
                    return Ok(None);
                }
            }
            if watch.insert(server.as_fd()).is_err() {
                return Ok(None);
            }
        }
        Poller::Poll => {
            fds = idle
                .iter()
                .map(|s| poll::poll_fd(s.as_fd(), poll::POLLIN))
                .collect();
            fds.push(poll::poll_fd(server.as_fd(), poll::POLLIN));
        }
        Poller::EpollLevel | Poller::EpollEdge => {
            let mut interest = libc::EPOLLIN as u32;
            if kind == Poller::EpollEdge {
                interest |= libc::EPOLLET as u32;
            }
            for (i, s) in idle.iter().enumerate() {
                epoll.add(s.as_fd(), i as u64, interest)?;
            }
            epoll.add(server.as_fd(), u64::MAX, interest)?;
        }
    }
    let mut one = |client: &mut TcpStream, server: &mut TcpStream| -> io::Result<()> {
        client.write_all(&[7])?;
        loop {
            let readable = match kind {
                Poller::Select => {
                    poll::select_readable(&watch, &mut ready, None)?;
                    ready.contains(server.as_fd())
                }
                Poller::Poll => {
                    poll::poll(&mut fds, -1)?;
                    fds.last().is_some_and(|f| f.revents & poll::POLLIN != 0)
                }
                Poller::EpollLevel | Poller::EpollEdge => {
                    epoll.wait(&mut events, None)?;
                    events.iter().any(|e| e.token == u64::MAX)
                }
            };
            if readable {
                break;
            }
        }
        match server.read(&mut byte) {
            Ok(1) => Ok(()),
            Ok(_) => Err(io::Error::other("the connection closed")),
            Err(e) => Err(e),
        }
    };
    // Warm up, then time batches of a fixed duration.
    for _ in 0..200 {
        one(&mut client, &mut server)?;
    }
    let mut per_batch = Vec::with_capacity(BATCHES);
    for _ in 0..BATCHES {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < batch {
            for _ in 0..16 {
                one(&mut client, &mut server)?;
            }
            n += 16;
        }
        per_batch.push(start.elapsed().as_nanos() as f64 / n as f64);
    }
    Ok(Some(median(&mut per_batch)))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The server's counts in one echo run.
#[derive(Default, Clone, Copy)]
struct EchoCounts {
    waits: u64,
    reads: u64,
    writes: u64,
    ctls: u64,
    bytes: u64,
    cpu: Duration,
}

/// How the echo client drives its connections.
#[derive(Clone, Copy)]
struct Load {
    name: &'static str,
    size: usize,
    depth: usize,
    /// The server sockets' SO_SNDBUF, when set: small, so writes come back short.
    send_buffer: Option<usize>,
}

const LOADS: [Load; 4] = [
    Load {
        name: "64 B ping-pong",
        size: 64,
        depth: 1,
        send_buffer: None,
    },
    Load {
        name: "64 B, 16 in flight",
        size: 64,
        depth: 16,
        send_buffer: None,
    },
    Load {
        name: "64 KiB, 4 in flight (bulk)",
        size: 65_536,
        depth: 4,
        send_buffer: None,
    },
    Load {
        name: "64 KiB, 4 in flight, 16 KiB send buffer (short writes)",
        size: 65_536,
        depth: 4,
        send_buffer: Some(16 * 1024),
    },
];

const ECHO_CONNS: usize = 50;

struct Slot {
    stream: TcpStream,
    /// Bytes read but not yet written back (only after a short write).
    out: Vec<u8>,
    /// Level-triggered: EPOLLOUT is switched on.
    want_out: bool,
}

/// The echo server: serves every connection until all have closed.
fn echo_server(conns: Vec<TcpStream>, edge: bool, load: Load) -> io::Result<EchoCounts> {
    pin(0);
    let epoll = Epoll::new()?;
    let base_in = libc::EPOLLIN as u32 | libc::EPOLLRDHUP as u32;
    let interest = if edge {
        base_in | libc::EPOLLOUT as u32 | libc::EPOLLET as u32
    } else {
        base_in
    };
    let mut slots: Vec<Option<Slot>> = Vec::new();
    for (i, stream) in conns.into_iter().enumerate() {
        stream.set_nonblocking(true)?;
        if let Some(bytes) = load.send_buffer {
            socket::set_send_buffer(stream.as_fd(), bytes)?;
        }
        epoll.add(stream.as_fd(), i as u64, interest)?;
        slots.push(Some(Slot {
            stream,
            out: Vec::new(),
            want_out: false,
        }));
    }
    let mut c = EchoCounts::default();
    let mut open = slots.len();
    let mut events = Events::with_capacity(256);
    let mut buf = vec![0u8; 65_536];
    let cpu0 = thread::cpu_time()?;
    while open > 0 {
        epoll.wait(&mut events, None)?;
        c.waits += 1;
        for i in 0..events.len() {
            let ev = events.get(i);
            let idx = ev.token as usize;
            let Some(slot) = slots[idx].as_mut() else {
                continue;
            };
            let mut closed = false;
            // Owed bytes first.
            if !slot.out.is_empty() && ev.is_writable() {
                c.writes += 1;
                match slot.stream.write(&slot.out) {
                    Ok(n) => {
                        c.bytes += n as u64;
                        slot.out.drain(..n);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => closed = true,
                }
                if slot.out.is_empty() && slot.want_out {
                    c.ctls += 1;
                    epoll.modify(slot.stream.as_fd(), idx as u64, interest)?;
                    slot.want_out = false;
                }
            }
            // Read: edge-triggered until a short read; level-triggered once per report.
            // Either way, not while output is owed (backpressure).
            let can_read = ev.is_readable() || ev.is_read_closed();
            while !closed && can_read && slot.out.is_empty() {
                c.reads += 1;
                match slot.stream.read(&mut buf) {
                    Ok(0) => closed = true,
                    Ok(n) => {
                        c.writes += 1;
                        let w = match slot.stream.write(&buf[..n]) {
                            Ok(w) => w,
                            Err(e) if e.kind() == ErrorKind::WouldBlock => 0,
                            Err(_) => {
                                closed = true;
                                0
                            }
                        };
                        c.bytes += w as u64;
                        if w < n && !closed {
                            slot.out.extend_from_slice(&buf[w..n]);
                            if !edge {
                                c.ctls += 1;
                                epoll.modify(
                                    slot.stream.as_fd(),
                                    idx as u64,
                                    interest | libc::EPOLLOUT as u32,
                                )?;
                                slot.want_out = true;
                            }
                        }
                        if !edge || n < buf.len() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => closed = true,
                }
            }
            if closed {
                slots[idx] = None;
                open -= 1;
            }
        }
    }
    c.cpu = thread::cpu_time()? - cpu0;
    Ok(c)
}

/// The client: keeps `load.depth` messages in flight on each connection for `secs`,
/// then closes them all.
fn echo_client(conns: Vec<TcpStream>, load: Load, secs: Duration) -> io::Result<u64> {
    pin(1);
    let epoll = Epoll::new()?;
    let msg = vec![0x5au8; load.size];
    // Per connection: bytes still to write, bytes still expected back.
    let mut to_write = vec![load.size * load.depth; conns.len()];
    let mut received = vec![0usize; conns.len()];
    let mut conns = conns;
    for (i, s) in conns.iter().enumerate() {
        s.set_nonblocking(true)?;
        epoll.add(
            s.as_fd(),
            i as u64,
            (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLET) as u32,
        )?;
    }
    let mut events = Events::with_capacity(256);
    let mut buf = vec![0u8; 65_536];
    let mut messages = 0u64;
    let start = Instant::now();
    let flush = |s: &mut TcpStream, left: &mut usize| -> io::Result<()> {
        while *left > 0 {
            let chunk = (*left).min(msg.len());
            match s.write(&msg[..chunk]) {
                Ok(n) => *left -= n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    };
    for (i, s) in conns.iter_mut().enumerate() {
        flush(s, &mut to_write[i])?;
    }
    while start.elapsed() < secs {
        epoll.wait(&mut events, Some(Duration::from_millis(50)))?;
        for k in 0..events.len() {
            let i = events.get(k).token as usize;
            let s = &mut conns[i];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => return Err(io::Error::other("the server closed")),
                    Ok(n) => {
                        received[i] += n;
                        let done = received[i] / load.size;
                        received[i] %= load.size;
                        messages += done as u64;
                        to_write[i] += done * load.size;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            flush(s, &mut to_write[i])?;
        }
    }
    drop(conns);
    Ok(messages)
}

fn echo_run(load: Load, edge: bool, secs: Duration) -> io::Result<(EchoCounts, u64)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let clients: Vec<TcpStream> = (0..ECHO_CONNS)
        .map(|_| {
            let s = TcpStream::connect(addr)?;
            s.set_nodelay(true)?;
            Ok(s)
        })
        .collect::<io::Result<_>>()?;
    let servers: Vec<TcpStream> = (0..ECHO_CONNS)
        .map(|_| {
            let (s, _) = l.accept()?;
            s.set_nodelay(true)?;
            Ok(s)
        })
        .collect::<io::Result<_>>()?;
    let server = std::thread::spawn(move || echo_server(servers, edge, load));
    let messages = echo_client(clients, load, secs)?;
    let counts = server
        .join()
        .map_err(|_| io::Error::other("the server thread panicked"))??;
    Ok((counts, messages))
}

fn svg(results: &[(Poller, Vec<Option<f64>>)]) -> String {
    use std::fmt::Write as _;
    let (w, h, left, right, top, bottom) = (760.0, 460.0, 80.0, 170.0, 40.0, 60.0);
    let all: Vec<f64> = results
        .iter()
        .flat_map(|(_, v)| v.iter().flatten().copied())
        .collect();
    let lo = all.iter().copied().fold(f64::MAX, f64::min).log10().floor();
    let hi = all.iter().copied().fold(0.0, f64::max).log10().ceil();
    let px = |i: usize| left + i as f64 / (KS.len() - 1) as f64 * (w - left - right);
    let py = |ns: f64| h - bottom - (ns.log10() - lo) / (hi - lo) * (h - top - bottom);
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">
<rect width="{w}" height="{h}" fill="white"/>
<text x="{}" y="24" text-anchor="middle" font-size="15">One readiness round trip with K idle sockets watched</text>
"##,
        (w - right + left) / 2.0
    );
    let mut d = lo;
    while d <= hi + 1e-9 {
        let y = py(10f64.powf(d));
        let label = match 10f64.powf(d) {
            v if v >= 1e6 => format!("{} ms", v / 1e6),
            v if v >= 1e3 => format!("{} µs", v / 1e3),
            v => format!("{v} ns"),
        };
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{label}</text>"##,
            w - right,
            left - 8.0,
            y + 4.0
        );
        d += 1.0;
    }
    for (i, k) in KS.iter().enumerate() {
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{}" text-anchor="middle">{k}</text>"##,
            px(i),
            h - bottom + 20.0
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{}" text-anchor="middle">K idle sockets (log scale)</text>
<text x="20" y="{:.1}" transform="rotate(-90 20 {:.1})" text-anchor="middle">time per round trip (log scale)</text>"##,
        (w - right + left) / 2.0,
        h - 18.0,
        (h - bottom + top) / 2.0,
        (h - bottom + top) / 2.0
    );
    for (n, (kind, values)) in results.iter().enumerate() {
        let points: Vec<String> = values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.map(|ns| format!("{:.1},{:.1}", px(i), py(ns))))
            .collect();
        let _ = writeln!(
            s,
            r##"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"##,
            kind.colour(),
            points.join(" ")
        );
        for p in &points {
            let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(
                s,
                r##"<circle cx="{x}" cy="{y}" r="3" fill="{}"/>"##,
                kind.colour()
            );
        }
        let ly = top + 20.0 + n as f64 * 20.0;
        let _ = writeln!(
            s,
            r##"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{}" stroke-width="2"/><text x="{}" y="{}">{}</text>"##,
            w - right + 15.0,
            w - right + 40.0,
            kind.colour(),
            w - right + 46.0,
            ly + 4.0,
            kind.name()
        );
    }
    s.push_str("</svg>\n");
    s
}

fn main() -> io::Result<()> {
    // `cargo bench` passes --bench; `cargo test --benches` would pass nothing and run
    // this too, so only run when asked to benchmark.
    if !std::env::args().any(|a| a == "--bench") {
        return Ok(());
    }
    if let Ok((soft, hard)) = rlimit::nofile() {
        if soft < hard {
            rlimit::set_nofile_soft(hard)?;
        }
    }
    let batch = Duration::from_millis(env_u64("POLLERS_BATCH_MS", 200));
    let echo_secs = Duration::from_secs(env_u64("POLLERS_ECHO_SECS", 2));
    pin(0);

    println!("### Readiness round trip: one active connection among K idle sockets\n");
    println!(
        "Median of {BATCHES} batches of {} ms each; one thread on core 0. select cannot watch \
         descriptor numbers from {} up.\n",
        batch.as_millis(),
        FdSet::LIMIT
    );
    let mut results: Vec<(Poller, Vec<Option<f64>>)> = Vec::new();
    for kind in Poller::ALL {
        let mut row = Vec::new();
        for &k in &KS {
            row.push(round_trip_ns(kind, k, batch)?);
        }
        results.push((kind, row));
    }
    print!("| poller |");
    for k in KS {
        print!(" K = {k} |");
    }
    println!(" K = 10,000 vs K = 10 |");
    println!("|---|---|---|---|---|---|");
    for (kind, row) in &results {
        print!("| {} |", kind.name());
        for v in row {
            match v {
                Some(ns) => print!(" {:.0} ns |", ns),
                None => print!(" cannot |"),
            }
        }
        match (row[0], row[KS.len() - 1]) {
            (Some(a), Some(b)) => println!(" {:.1}x |", b / a),
            _ => println!(" - |"),
        }
    }
    let chart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/pollers.svg");
    std::fs::write(&chart, svg(&results))?;
    println!("\nChart: `benches/pollers.svg`.\n");

    println!("### Echo loop: level- vs edge-triggered epoll\n");
    println!(
        "{ECHO_CONNS} connections; server thread on core 0, client on core 1; {} s per run, \
         3 runs each alternating, medians. System calls are the server's own, counted \
         in the loop; CPU from CLOCK_THREAD_CPUTIME_ID.\n",
        echo_secs.as_secs()
    );
    println!("| load | mode | messages/s | epoll_wait | read | write | epoll_ctl | syscalls per message | server CPU ns per message |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for load in LOADS {
        for edge in [false, true] {
            let mut runs: Vec<(EchoCounts, u64)> = Vec::new();
            for _ in 0..3 {
                runs.push(echo_run(load, edge, echo_secs)?);
            }
            let per_msg = |f: &dyn Fn(&EchoCounts) -> u64| {
                let mut v: Vec<f64> = runs
                    .iter()
                    .map(|(c, _)| f(c) as f64 / (c.bytes as f64 / load.size as f64))
                    .collect();
                median(&mut v)
            };
            let mut rate: Vec<f64> = runs
                .iter()
                .map(|(_, m)| *m as f64 / echo_secs.as_secs_f64())
                .collect();
            let waits = per_msg(&|c| c.waits);
            let reads = per_msg(&|c| c.reads);
            let writes = per_msg(&|c| c.writes);
            let ctls = per_msg(&|c| c.ctls);
            let total = per_msg(&|c| c.waits + c.reads + c.writes + c.ctls);
            let cpu = per_msg(&|c| c.cpu.as_nanos() as u64);
            println!(
                "| {} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.0} |",
                load.name,
                if edge { "edge" } else { "level" },
                median(&mut rate),
                waits,
                reads,
                writes,
                ctls,
                total,
                cpu
            );
        }
    }
    Ok(())
}
