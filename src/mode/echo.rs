//! Echo: every byte back to its sender, in order.
//!
//! Bytes read are written straight back from the worker buffer; only what the socket
//! does not take goes into the connection's outbound buffer. Reading is limited to the
//! room left under the cap, so a peer that never reads holds at most the cap.

use std::io;
use std::os::fd::AsFd;

use super::{after_read, begin, caught_up, finish, pause, read_room, send, Io, Step, READ_BUDGET};
use crate::conn::{flags, Conn};
use crate::metrics::CloseReason;
use crate::sys::socket;

/// Serves `conn`: flushes what is owed, then reads and echoes until EAGAIN, a short
/// read, the budget or the cap. `readable` says an edge reported input. Once the peer
/// has closed (or the socket has an error: [`flags::HUP_SEEN`]), short reads are not
/// taken as "drained" and reading goes on until the 0 or the error it will return.
#[inline]
pub fn serve(conn: &mut Conn, io: &mut Io<'_>, readable: bool) -> Step {
    if let Some(step) = begin(conn, io, readable) {
        return step;
    }

    let mut budget = READ_BUDGET;
    loop {
        let room = read_room(conn, io);
        if room == 0 {
            // Rule 3: stop reading at the cap. Input left in the kernel will get no new
            // edge, so READ_PENDING makes the worker come back when the buffer drains.
            return pause(conn, io);
        }
        let want = io.buf.len().min(room).min(budget);
        match socket::read(conn.fd.as_fd(), &mut io.buf[..want]) {
            Ok(0) => {
                conn.set(flags::PEER_FIN | flags::INPUT_DONE);
                return finish(conn, io);
            }
            Ok(n) => {
                io.counters.received += n as u64;
                conn.last_active_ms = io.now_ms;
                // The echo goes straight from the worker buffer; only what the socket
                // does not take is copied into the outbound buffer.
                if let Err(step) = send(conn, io.counters, &io.buf[..n]) {
                    return step;
                }
                if let Some(step) = after_read(conn, io, n, want, &mut budget) {
                    return step;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return caught_up(conn, io),
            Err(e) => return Step::Close(CloseReason::of_error(&e)),
        }
    }
}
