//! Protocol handlers. The worker owns the event loop, the buffers, the timers and the
//! counters; a mode only decides what bytes go where when a connection is served.

pub mod echo;
pub mod http;
pub mod proxy;
pub mod relay;

use std::io;
use std::os::fd::AsFd;

use crate::conn::{flags, Conn};
use crate::metrics::{CloseReason, Counters};
use crate::sys::socket;

/// What a mode needs from its worker while it serves one connection.
pub struct Io<'a> {
    /// The worker's read buffer, reused by every connection.
    pub buf: &'a mut [u8],
    /// `--max-pending-bytes`: the outbound cap behind backpressure.
    pub cap: usize,
    /// The worker's plain counters.
    pub counters: &'a mut Counters,
    /// Worker clock in ms, for activity stamps and deadlines.
    pub now_ms: u64,
}

/// How a connection stands after it was served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Waiting for the next edge.
    Idle,
    /// It spent its budget with input still queued: serve it again before sleeping.
    Again,
    /// Close it.
    Close(CloseReason),
}

/// Bytes a connection may read per wake-up before others get their turn: four reads
/// of the worker buffer, enough to amortise the wake-up, small enough that a bulk
/// sender delays the others by well under a millisecond.
pub const READ_BUDGET: usize = 4 * READ_BUFFER_SIZE;

/// The worker's read buffer: 64 KiB moves a bulk stream in a few large syscalls and
/// is allocated once per worker, not per connection.
pub const READ_BUFFER_SIZE: usize = 64 * 1024;

/// How long a closing connection that has sent its FIN waits for the peer to close
/// before the server closes anyway (as nginx's lingering_timeout).
pub const LINGER_MS: u64 = 5_000;

/// Writes what the connection owes; `Err(step)` if it must close.
#[inline]
pub(crate) fn flush_owed(conn: &mut Conn, io: &mut Io<'_>) -> Result<(), Step> {
    if conn.outbound.is_some() {
        match conn.flush() {
            Ok(n) => {
                if n > 0 {
                    io.counters.sent += n as u64;
                    io.counters.global_room += n as i64;
                    conn.last_active_ms = io.now_ms;
                }
            }
            Err(e) => return Err(Step::Close(CloseReason::of_error(&e))),
        }
    }
    if conn.has(flags::PAUSED) && conn.pending() < io.cap {
        conn.clear(flags::PAUSED);
    }
    Ok(())
}

/// Bytes the connection may read now; 0 means pause. Two bounds apply:
/// `--max-pending-bytes` for the connection, and `--max-buffered-bytes` for all
/// outbound buffers together. Under the global bound a connection that holds buffered
/// bytes may read only what the remaining room could absorb, and none once it is gone:
/// the holders pause first. A connection that holds nothing is never paused by it
/// (it would get no EPOLLOUT edge to wake it), but reads at most [`SMALL_READ`] at a
/// time past the bound, so the bound is exceeded by at most that per connection.
#[inline]
pub(crate) fn read_room(conn: &Conn, io: &Io<'_>) -> usize {
    room(conn.pending(), io)
}

/// [`read_room`] for a buffer that holds `pending` bytes.
#[inline]
pub(crate) fn room(pending: usize, io: &Io<'_>) -> usize {
    let global = io.counters.global_room.max(0) as usize;
    let allowed = if pending == 0 {
        global.max(SMALL_READ)
    } else {
        global
    };
    io.cap.saturating_sub(pending).min(allowed)
}

/// The read size of a connection that holds nothing once all outbound buffers are at
/// `--max-buffered-bytes`.
pub const SMALL_READ: usize = 4096;

/// Marks a connection paused by backpressure (counted once per episode); the worker
/// comes back to it when its buffer drains.
#[inline]
pub(crate) fn pause(conn: &mut Conn, io: &mut Io<'_>) -> Step {
    if !conn.has(flags::PAUSED) {
        conn.set(flags::PAUSED);
        io.counters.pauses += 1;
    }
    conn.set(flags::READ_PENDING);
    Step::Idle
}

/// Sends bytes after what is owed, counting what went out now.
#[inline]
pub(crate) fn send(conn: &mut Conn, counters: &mut Counters, data: &[u8]) -> Result<(), Step> {
    match conn.send(data) {
        Ok(w) => {
            counters.sent += w as u64;
            counters.global_room -= (data.len() - w) as i64;
            let pending = conn.pending();
            if pending > counters.peak_pending {
                counters.peak_pending = pending;
            }
            Ok(())
        }
        Err(e) => Err(Step::Close(CloseReason::of_error(&e))),
    }
}

/// What every mode does first when a connection is served: flush what is owed, finish
/// a connection whose input is done, and decide whether to read at all (an edge
/// reported input, the peer hung up, or reading stopped early last time). `None` means
/// go on and read; READ_PENDING is cleared for the read that follows.
#[inline]
pub(crate) fn begin(conn: &mut Conn, io: &mut Io<'_>, readable: bool) -> Option<Step> {
    if let Err(step) = flush_owed(conn, io) {
        return Some(step);
    }
    if conn.has(flags::INPUT_DONE) {
        return Some(finish(conn, io));
    }
    if !(readable || conn.has(flags::HUP_SEEN) || conn.has(flags::READ_PENDING)) {
        return Some(Step::Idle);
    }
    conn.clear(flags::READ_PENDING);
    None
}

/// After a read of `n` bytes out of `want`, applies the edge-triggered rules: a short
/// read means the socket is drained (rule 1; not once the peer has hung up, when the
/// FIN or error behind the data has had its only edge), and a spent budget sends the
/// connection to the ready list (rule 2). `None` means read again.
#[inline]
pub(crate) fn after_read(
    conn: &mut Conn,
    io: &mut Io<'_>,
    n: usize,
    want: usize,
    budget: &mut usize,
) -> Option<Step> {
    *budget -= n;
    if n < want && !conn.has(flags::HUP_SEEN) {
        return Some(caught_up(conn, io));
    }
    if *budget == 0 {
        conn.set(flags::READ_PENDING);
        return Some(Step::Again);
    }
    None
}

/// Input is drained for now. A draining server stops serving input here.
#[inline]
pub(crate) fn caught_up(conn: &mut Conn, io: &mut Io<'_>) -> Step {
    if conn.has(flags::DRAINING) {
        conn.set(flags::INPUT_DONE);
        return finish(conn, io);
    }
    Step::Idle
}

/// Why a connection that is finishing ends, once the peer has closed too.
fn closing_reason(conn: &Conn) -> CloseReason {
    if conn.has(flags::PROTO_ERROR) {
        CloseReason::ProtocolError
    } else if conn.has(flags::DRAINING) {
        CloseReason::Shutdown
    } else {
        CloseReason::Eof
    }
}

/// No more input will be served: flush what is owed, then close. After a peer FIN
/// the connection closes once the last byte is written. Otherwise the server sends its
/// own FIN and discards input until the peer closes (a lingering close, bounded by
/// [`LINGER_MS`] or the drain deadline), so that close(2) never finds unread input and
/// answers with a RST that would destroy bytes still in flight.
pub(crate) fn finish(conn: &mut Conn, io: &mut Io<'_>) -> Step {
    if conn.pending() > 0 {
        return Step::Idle;
    }
    if conn.has(flags::PEER_FIN) {
        return Step::Close(closing_reason(conn));
    }
    if !conn.has(flags::WRITE_SHUT) {
        if let Err(e) = socket::shutdown_write(conn.fd.as_fd()) {
            return Step::Close(CloseReason::of_error(&e));
        }
        conn.set(flags::WRITE_SHUT);
        conn.deadline_ms = io.now_ms + LINGER_MS;
    }
    let mut budget = READ_BUDGET;
    loop {
        match socket::read(conn.fd.as_fd(), io.buf) {
            Ok(0) => return Step::Close(closing_reason(conn)),
            Ok(n) => {
                io.counters.received += n as u64;
                budget = budget.saturating_sub(n);
                if budget == 0 {
                    return Step::Again;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Idle,
            Err(e) => return Step::Close(CloseReason::of_error(&e)),
        }
    }
}

/// The connection's deadline passed: a lingering close ends here.
pub(crate) fn lingered(conn: &Conn) -> Option<Step> {
    conn.has(flags::WRITE_SHUT)
        .then(|| Step::Close(closing_reason(conn)))
}
