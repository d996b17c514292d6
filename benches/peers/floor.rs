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
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

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

/// One accepted or upstream socket, indexed by its descriptor number.
struct Conn {
    fd: OwnedFd,
    /// The other socket of a relayed pair.
    partner: Option<usize>,
    /// `--http`: how much of "\r\n\r\n" has been matched so far.
    matched: u8,
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
    let epoll = Epoll::new()?;
    const LISTENER: u64 = u64::MAX;
    epoll.add(listener.as_fd(), LISTENER, READ_INTEREST)?;
    // Indexed by descriptor number, the cheapest lookup there is (a stale event for a
    // reused number only costs a read that finds nothing).
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 64 * 1024];
    let mut out: Vec<u8> = Vec::new();
    let register = |fd: OwnedFd, partner: Option<usize>, conns: &mut Vec<Option<Conn>>| {
        let i = fd.as_raw_fd() as usize;
        epoll.add(fd.as_fd(), i as u64, SOCKET_INTEREST)?;
        if conns.len() <= i {
            conns.resize_with(i + 1, || None);
        }
        conns[i] = Some(Conn {
            fd,
            partner,
            matched: 0,
        });
        Ok::<usize, io::Error>(i)
    };
    loop {
        epoll.wait(&mut events, None)?;
        for event in events.iter() {
            if event.token == LISTENER {
                while let Ok((fd, _)) = socket::accept(listener.as_fd()) {
                    let _ = socket::set_nodelay(fd.as_fd());
                    let Mode::Relay(upstream) = &mode else {
                        register(fd, None, &mut conns)?;
                        continue;
                    };
                    let up = TcpStream::connect(upstream.as_str())?;
                    up.set_nodelay(true)?;
                    up.set_nonblocking(true)?;
                    let client = fd.as_raw_fd() as usize;
                    let up = register(OwnedFd::from(up), Some(client), &mut conns)?;
                    register(fd, Some(up), &mut conns)?;
                }
                continue;
            }
            let i = event.token as usize;
            let mut close = false;
            while let Some(Some(conn)) = conns.get_mut(i) {
                let n = match socket::read(conn.fd.as_fd(), &mut buf) {
                    Ok(0) => {
                        close = true;
                        break;
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        close = true;
                        break;
                    }
                };
                let (target, reply) = match &mode {
                    Mode::Echo => (i, &buf[..n]),
                    Mode::Http => {
                        out.clear();
                        for _ in 0..count_heads(&mut conn.matched, &buf[..n]) {
                            out.extend_from_slice(RESPONSE);
                        }
                        (i, &out[..])
                    }
                    Mode::Relay(_) => (conn.partner.unwrap_or(i), &buf[..n]),
                };
                let written = match conns.get(target) {
                    Some(Some(to)) if !reply.is_empty() => socket::write(to.fd.as_fd(), reply),
                    _ => Ok(0),
                };
                if written.is_err() {
                    close = true;
                    break;
                }
                if n < buf.len() {
                    break;
                }
            }
            if close {
                if let Some(conn) = conns.get_mut(i).and_then(Option::take) {
                    if let Some(p) = conn.partner {
                        conns[p] = None;
                    }
                }
            }
        }
    }
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
