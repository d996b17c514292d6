//! Echo: every byte back to its sender, in order.
//!
//! Bytes read are written straight back from the worker buffer; only what the socket
//! does not take goes into the connection's outbound buffer. Reading is limited to the
//! room left under the cap, so a peer that never reads holds at most the cap.

use std::io;
use std::os::fd::AsFd;

use super::{
    after_read, begin, caught_up, finish, pause, read_room, send, Conn, Ctx, Step, READ_BUDGET,
};
use crate::conn::flags;
use crate::metrics::CloseReason;
use crate::sys::socket;

/// Serves `conn`: flushes what is owed, then reads and echoes until EAGAIN, a short
/// read, the budget or the cap. `readable` says an edge reported input. Once the peer
/// has closed (or the socket has an error: [`flags::HUP_SEEN`]), short reads are not
/// taken as "drained" and reading goes on until the 0 or the error it will return.
#[inline]
pub fn serve(conn: &mut Conn, ctx: &mut Ctx<'_>, readable: bool) -> Step {
    if let Some(step) = begin(conn, ctx, readable) {
        return step;
    }

    let mut budget = READ_BUDGET;
    loop {
        let room = read_room(conn, ctx);
        if room == 0 {
            // Rule 3: stop reading at the cap. Input left in the kernel will get no new
            // edge, so READ_PENDING makes the worker come back when the buffer drains.
            return pause(conn, ctx);
        }
        let want = ctx.buf.len().min(room).min(budget);
        match socket::read(conn.fd.as_fd(), &mut ctx.buf[..want]) {
            Ok(0) => {
                conn.set(flags::PEER_FIN | flags::INPUT_DONE);
                return finish(conn, ctx);
            }
            Ok(n) => {
                ctx.counters.received += n as u64;
                conn.last_active_ms = ctx.now_ms;
                // The echo goes straight from the worker buffer; only what the socket
                // does not take is copied into the outbound buffer.
                if let Err(step) = send(conn, ctx.counters, &ctx.buf[..n]) {
                    return step;
                }
                if let Some(step) = after_read(conn, ctx, n, want, &mut budget) {
                    return step;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return caught_up(conn, ctx),
            Err(e) => return Step::Close(CloseReason::of_error(&e)),
        }
    }
}
