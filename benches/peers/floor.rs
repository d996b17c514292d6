//! The floor: the least an edge-triggered server can do per message, on the same `sys`
//! layer as edgepoll. One thread, one epoll instance, accept in the same loop, read
//! until a short read or EAGAIN and answer; no budget, no buffers, no metrics, no
//! timers, no parsing. A short write drops the rest, so it is only fit for ping-pong
//! loads that never fill a socket buffer. edgepoll's CPU per message against this is
//! the cost of everything it does beyond the bare system calls, and a peer's CPU per
//! message against this is the least any epoll server's ratio to that peer can be.
//!
//! - `echo` (the default): every read written back.
//! - `--http`: a fixed 200 for every request head (every `\r\n\r\n`, found by a
//!   four-state matcher kept per connection, so a head split across reads counts
//!   once), all the answers to one read in one write. Only fit for wrk's GETs.
//! - `--relay HOST:PORT`: every accepted client paired with a blocking-connected
//!   upstream socket; each read is written to the other side of the pair. Only fit for
//!   request/response loads such as redis-benchmark's, not for bulk transfers.
//!
//!     floor ADDR [--http | --relay HOST:PORT]   prints "listening on ADDR", serves until killed

use std::io;
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use edgepoll::sys::epoll::{Epoll, Events, READ_INTEREST, SOCKET_INTEREST};
use edgepoll::sys::socket;

/// The answer to every request in `--http` mode: nginx's fields but `Server`, in nginx's
/// order.
const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nDate: Fri, 27 Nov 2026 00:00:00 GMT\r\n\
Content-Type: text/plain\r\nContent-Length: 13\r\nConnection: keep-alive\r\n\r\nHello, World!";

enum Mode {
    Echo,
    Http,
    Relay(String),
}

/// Sockets indexed by descriptor number, the cheapest lookup there is (a stale event
/// for a reused number only costs a read that finds nothing). The side tables are
/// used only by the mode they name, so the echo path touches `fds` alone.
#[derive(Default)]
struct Table {
    fds: Vec<Option<OwnedFd>>,
    /// `--relay`: the other socket of each pair.
    partner: Vec<usize>,
    /// `--http`: how much of "\r\n\r\n" each connection has matched so far.
    matched: Vec<u8>,
}

impl Table {
    fn insert(&mut self, epoll: &Epoll, fd: OwnedFd, partner: usize) -> io::Result<usize> {
        let i = fd.as_raw_fd() as usize;
        epoll.add(fd.as_fd(), i as u64, SOCKET_INTEREST)?;
        if self.fds.len() <= i {
            self.fds.resize_with(i + 1, || None);
            self.partner.resize(i + 1, 0);
            self.matched.resize(i + 1, 0);
        }
        self.fds[i] = Some(fd);
        self.partner[i] = partner;
        self.matched[i] = 0;
        Ok(i)
    }
}

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--bench") {
        return Ok(()); // `cargo bench` runs every bench target; this one is a program.
    }
    let mut mode = Mode::Echo;
    let mut addr = "127.0.0.1:0".to_string();
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--http" => mode = Mode::Http,
            "--relay" => mode = Mode::Relay(it.next().expect("--relay HOST:PORT")),
            _ => addr = arg,
        }
    }
    let listener = socket::listen(addr.parse().expect("an IP:PORT"), 4096)?;
    println!("listening on {}", socket::local_addr(listener.as_fd())?);
    // One copy of the loop per mode, each with its mode known at compile time, so the
    // echo loop carries no trace of the others.
    match mode {
        Mode::Echo => serve(listener, &Mode::Echo),
        Mode::Http => serve(listener, &Mode::Http),
        Mode::Relay(upstream) => serve(listener, &Mode::Relay(upstream)),
    }
}

#[inline(always)]
fn serve(listener: OwnedFd, mode: &Mode) -> io::Result<()> {
    let epoll = Epoll::new()?;
    const LISTENER: u64 = u64::MAX;
    epoll.add(listener.as_fd(), LISTENER, READ_INTEREST)?;
    let mut table = Table::default();
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 64 * 1024];
    let mut out: Vec<u8> = Vec::new();
    loop {
        epoll.wait(&mut events, None)?;
        for event in events.iter() {
            if event.token == LISTENER {
                while let Ok((fd, _)) = socket::accept(listener.as_fd()) {
                    let _ = socket::set_nodelay(fd.as_fd());
                    let Mode::Relay(upstream) = mode else {
                        table.insert(&epoll, fd, 0)?;
                        continue;
                    };
                    let up = TcpStream::connect(upstream.as_str())?;
                    up.set_nodelay(true)?;
                    up.set_nonblocking(true)?;
                    let client = fd.as_raw_fd() as usize;
                    let up = table.insert(&epoll, OwnedFd::from(up), client)?;
                    table.insert(&epoll, fd, up)?;
                }
                continue;
            }
            let i = event.token as usize;
            let close = match mode {
                Mode::Echo => match fd_at(&table.fds, i) {
                    Some(fd) => drain(fd, fd, &mut buf, None),
                    None => false,
                },
                Mode::Http => match fd_at(&table.fds, i) {
                    Some(fd) => drain(fd, fd, &mut buf, Some((&mut table.matched[i], &mut out))),
                    None => false,
                },
                Mode::Relay(_) => match (fd_at(&table.fds, i), fd_at(&table.fds, table.partner[i]))
                {
                    (Some(from), Some(to)) => drain(from, to, &mut buf, None),
                    (Some(_), None) => true,
                    (None, _) => false,
                },
            };
            if close {
                table.fds[i] = None;
                if matches!(mode, Mode::Relay(_)) {
                    table.fds[table.partner[i]] = None;
                }
            }
        }
    }
}

/// Reads `from` until a short read or EAGAIN, writing each read to `to`, or with
/// `http` (the connection's matcher and an output buffer) a response for each request
/// head completed. Returns true when the connection is to be closed (EOF, an error).
#[inline(always)]
fn drain(
    from: BorrowedFd<'_>,
    to: BorrowedFd<'_>,
    buf: &mut [u8],
    mut http: Option<(&mut u8, &mut Vec<u8>)>,
) -> bool {
    loop {
        let n = match socket::read(from, buf) {
            Ok(0) => return true,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        };
        let bytes = match &mut http {
            None => &buf[..n],
            Some((matched, out)) => {
                out.clear();
                for _ in 0..count_heads(matched, &buf[..n]) {
                    out.extend_from_slice(RESPONSE);
                }
                &out[..]
            }
        };
        if !bytes.is_empty() && socket::write(to, bytes).is_err() {
            return true;
        }
        if n < buf.len() {
            return false;
        }
    }
}

fn fd_at(fds: &[Option<OwnedFd>], i: usize) -> Option<BorrowedFd<'_>> {
    fds.get(i).and_then(Option::as_ref).map(|fd| fd.as_fd())
}

/// Counts the ends of request heads in `bytes`, carrying the partial match in `state`.
fn count_heads(state: &mut u8, bytes: &[u8]) -> usize {
    const END: &[u8; 4] = b"\r\n\r\n";
    let mut heads = 0;
    for &b in bytes {
        *state = if b == END[*state as usize] {
            *state + 1
        } else if b == b'\r' {
            1
        } else {
            0
        };
        if *state == 4 {
            heads += 1;
            *state = 0;
        }
    }
    heads
}
