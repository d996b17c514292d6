//! The floor: the least an edge-triggered echo server can do per message, on the same
//! `sys` layer as edgepoll. One thread, one epoll instance, accept in the same loop,
//! read until EAGAIN and write back; no budget, no buffers, no metrics, no timers. A
//! short write drops the rest, so it is only fit for ping-pong loads that never fill a
//! socket buffer. edgepoll's CPU per message against this is the cost of everything it
//! does beyond the bare syscalls.
//!
//!     floor_echo ADDR                prints "listening on ADDR" and serves until killed

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use edgepoll::sys::epoll::{Epoll, Events, READ_INTEREST, SOCKET_INTEREST};
use edgepoll::sys::socket;

fn main() -> io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into());
    if addr == "--bench" {
        return Ok(()); // `cargo bench` runs every bench target; this one is a program.
    }
    let listener = socket::listen(addr.parse().expect("an IP:PORT"), 4096)?;
    println!("listening on {}", socket::local_addr(listener.as_fd())?);
    let epoll = Epoll::new()?;
    const LISTENER: u64 = u64::MAX;
    epoll.add(listener.as_fd(), LISTENER, READ_INTEREST)?;
    // Indexed by descriptor number, the cheapest lookup there is (a stale event for a
    // reused number only costs a read that finds nothing).
    let mut conns: Vec<Option<OwnedFd>> = Vec::new();
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        epoll.wait(&mut events, None)?;
        for event in events.iter() {
            if event.token == LISTENER {
                while let Ok((fd, _)) = socket::accept(listener.as_fd()) {
                    let _ = socket::set_nodelay(fd.as_fd());
                    let i = fd.as_raw_fd() as usize;
                    epoll.add(fd.as_fd(), i as u64, SOCKET_INTEREST)?;
                    if conns.len() <= i {
                        conns.resize_with(i + 1, || None);
                    }
                    conns[i] = Some(fd);
                }
                continue;
            }
            let Some(Some(fd)) = conns.get(event.token as usize) else {
                continue;
            };
            let mut close = false;
            loop {
                match socket::read(fd.as_fd(), &mut buf) {
                    Ok(0) => {
                        close = true;
                        break;
                    }
                    Ok(n) => {
                        if socket::write(fd.as_fd(), &buf[..n]).is_err() {
                            close = true;
                            break;
                        }
                        if n < buf.len() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        close = true;
                        break;
                    }
                }
            }
            if close {
                conns[event.token as usize] = None;
            }
        }
    }
}
