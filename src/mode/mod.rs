//! Protocol handlers. The worker owns the event loop, the buffers, the timers and the
//! counters; a mode only decides what bytes go where when a connection is served.

pub mod echo;
pub mod http;
pub mod moved;
pub mod proxy;
pub mod relay;

use std::io;
use std::os::fd::AsFd;

use crate::conn::{flags, Token};
use crate::metrics::{CloseReason, Counters, RejectReason};
use crate::sys::epoll::Epoll;
use crate::sys::socket;

/// A connection as the worker holds it: the generic connection with its mode's state.
pub type Conn = crate::conn::Conn<State>;

/// What a connection's mode keeps between events: one variant per mode, so a
/// connection carries only its own mode's fields.
#[derive(Debug)]
pub enum State {
    /// Echo keeps nothing beyond the connection itself.
    Echo,
    /// The request being parsed and the header deadline; inline, 16 bytes.
    Http(http::State),
    /// The upstream socket and both directions' buffers; boxed, since a pair is large
    /// and exists only in relay mode.
    Relay(Box<relay::Pair>),
    /// `--accept-proxy`: the PROXY header has not been read yet, and no mode has seen
    /// the connection ([`proxy::accept`]). Its bytes wait in the kernel; `deadline_ms`
    /// is when `--proxy-header-timeout` runs out (worker ms).
    AwaitingProxy { deadline_ms: u64 },
}

impl State {
    /// The mode's own deadline (header timeout, connect timeout) in worker ms; 0 for
    /// none.
    #[inline]
    pub fn deadline_ms(&self) -> u64 {
        match self {
            State::Echo => 0,
            State::Http(s) => s.head_deadline_ms,
            State::Relay(p) => p.deadline_ms(),
            State::AwaitingProxy { deadline_ms } => *deadline_ms,
        }
    }

    /// Bytes held in user-space buffers for a peer besides the connection's outbound
    /// buffer: what counts against `--max-buffered-bytes`.
    #[inline]
    pub fn buffered(&self) -> usize {
        match self {
            State::Relay(p) => p.buffered(),
            _ => 0,
        }
    }

    /// Bytes received or produced for each peer, (client, upstream), and not yet
    /// delivered (beyond the connection's outbound buffer): what a close now would
    /// drop.
    pub fn owed(&self) -> (usize, usize) {
        match self {
            State::Echo | State::AwaitingProxy { .. } => (0, 0),
            State::Http(s) => (s.owed(), 0),
            State::Relay(p) => p.owed(),
        }
    }

    /// Which sockets a close now must reset whatever they owe, (client, upstream):
    /// relay's sockets whose peer would otherwise take an unfinished stream for a
    /// finished one.
    pub fn must_abort(&self) -> (bool, bool) {
        match self {
            State::Relay(p) => p.must_abort(),
            _ => (false, false),
        }
    }

    /// At an idle timeout: whether the peers are still draining bytes the kernel
    /// holds for them (relay, whose traffic can all be in the kernel by then).
    pub fn kernel_progress(&mut self, client: std::os::fd::BorrowedFd<'_>) -> bool {
        match self {
            State::Relay(p) => p.kernel_progress(client),
            _ => false,
        }
    }

    /// Whether the connection is still in its PROXY header phase: not yet handed to
    /// its mode, nor counted as accepted or active.
    #[inline]
    pub fn awaits_proxy_header(&self) -> bool {
        matches!(self, State::AwaitingProxy { .. })
    }

    /// What the access log records of a relayed pair; None in other modes.
    pub fn relay_facts(&self) -> Option<crate::access_log::RelayFacts> {
        match self {
            State::Relay(p) => Some(p.facts()),
            _ => None,
        }
    }

    /// The upstream socket of a relayed pair.
    pub fn upstream_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        match self {
            State::Relay(p) => p.upstream_fd(),
            _ => None,
        }
    }
}

/// What a worker keeps for its mode: shared by all its connections.
pub enum Handler {
    Echo,
    Http(Box<http::Responder>),
    Relay(Box<relay::Relay>),
}

/// Why a connection is being served.
#[derive(Debug, Clone, Copy)]
pub enum Wake {
    /// It was just accepted.
    Open,
    /// An epoll event on one of its sockets.
    Edge(Edge),
    /// It is on the ready list (it spent its budget, or the server began draining).
    Ready,
    /// Its mode deadline passed.
    Timer,
    /// It just arrived from the process a reload replaced.
    Moved,
    /// Relay: a queued client was handed an upstream slot (in `Relay::granted`).
    Granted,
}

/// Which socket an event is for, and what it reported.
#[derive(Debug, Clone, Copy)]
pub struct Edge {
    /// The upstream socket of a relayed pair (else the client socket).
    pub upstream: bool,
    pub readable: bool,
    /// EPOLLRDHUP or EPOLLHUP.
    pub hup: bool,
    /// EPOLLERR.
    pub error: bool,
}

impl Handler {
    /// A connection's state when it is accepted.
    pub fn new_state(&self, now_ms: u64) -> State {
        match self {
            Handler::Echo => State::Echo,
            Handler::Http(r) => State::Http(http::State::new(now_ms + r.header_timeout_ms)),
            Handler::Relay(_) => State::Relay(Box::default()),
        }
    }

    /// Serves one connection: the one place the worker hands a connection to its mode.
    #[inline]
    pub fn serve(&mut self, conn: &mut Conn, ctx: &mut Ctx<'_>, wake: Wake) -> Step {
        if let Wake::Edge(e) = wake {
            // Echo and http read the edge's flags from the connection; relay reads them
            // per socket of its pair.
            if e.hup || e.error {
                conn.set(flags::HUP_SEEN);
            }
        }
        // The one branch `--accept-proxy` costs every serve, on or off.
        if let State::AwaitingProxy { .. } = conn.state {
            return proxy::accept::serve(conn, ctx, wake, self);
        }
        match self {
            Handler::Echo => match wake {
                Wake::Timer | Wake::Open | Wake::Granted => Step::Idle,
                Wake::Moved => echo::serve(conn, ctx, false),
                _ => echo::serve(conn, ctx, matches!(wake, Wake::Edge(e) if e.readable)),
            },
            Handler::Http(r) => match wake {
                Wake::Timer => http::on_deadline(conn, ctx, r),
                Wake::Open | Wake::Granted => Step::Idle,
                Wake::Moved => http::serve(conn, ctx, false, r),
                _ => http::serve(conn, ctx, matches!(wake, Wake::Edge(e) if e.readable), r),
            },
            Handler::Relay(r) => match wake {
                Wake::Open => relay::open(conn, ctx, r, None),
                Wake::Timer => relay::on_deadline(conn, ctx, r),
                Wake::Edge(e) => relay::serve(conn, ctx, r, Some(e)),
                Wake::Ready => relay::serve(conn, ctx, r, None),
                Wake::Moved => relay::moved(conn, ctx, r),
                Wake::Granted => relay::granted(conn, ctx, r),
            },
        }
    }
}

impl Handler {
    /// Hands a connection whose PROXY header was just read to its mode, as if it had
    /// been accepted now: its mode state, its count as accepted and active, the
    /// mode's opening (relay's upstream connect, whose own PROXY header carries
    /// `proxied`, the addresses the received header named), and a read of what
    /// followed the header. The header phase spent the edge that announced those
    /// bytes, so the mode is given it again.
    pub fn start(
        &mut self,
        conn: &mut Conn,
        ctx: &mut Ctx<'_>,
        proxied: Option<(std::net::SocketAddr, std::net::SocketAddr)>,
    ) -> Step {
        conn.state = self.new_state(ctx.now_ms);
        conn.last_active_ms = ctx.now_ms;
        ctx.counters.accepted += 1;
        ctx.counters.active += 1;
        if let Handler::Relay(r) = self {
            let step = relay::open(conn, ctx, r, proxied);
            if step != Step::Idle {
                return step;
            }
        }
        let edge = Edge {
            upstream: false,
            readable: true,
            hup: conn.has(flags::HUP_SEEN),
            error: false,
        };
        self.serve(conn, ctx, Wake::Edge(edge))
    }
}

/// What a mode needs from its worker while it serves one connection.
pub struct Ctx<'a> {
    /// The worker's read buffer, reused by every connection.
    pub buf: &'a mut [u8],
    /// The batch of responses one read produces (http), written in one write; empty
    /// between calls.
    pub out: &'a mut Vec<u8>,
    /// `--max-pending-bytes`: the outbound cap behind backpressure.
    pub cap: usize,
    /// The worker's plain counters.
    pub counters: &'a mut Counters,
    /// Worker clock in ms, for activity stamps and deadlines.
    pub now_ms: u64,
    /// The worker's epoll, for the upstream socket of a relayed pair.
    pub epoll: &'a Epoll,
    /// The connection's token, for the same.
    pub token: Token,
}

/// How a connection stands after it was served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Waiting for the next edge.
    Idle,
    /// It spent its budget with input still queued: serve it again before sleeping.
    Again,
    /// Close it. Whether the close is a FIN or a reset is the worker's one rule: a
    /// reset whenever anything is still owed to a peer.
    Close(CloseReason),
    /// Close a connection no mode has seen (its PROXY header was refused, or names a
    /// client over `--max-connections-per-ip`), counted as rejected for this reason,
    /// never as accepted or closed.
    Reject(RejectReason),
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
pub(crate) fn flush_owed(conn: &mut Conn, ctx: &mut Ctx<'_>) -> Result<(), Step> {
    if conn.outbound.is_some() {
        match conn.flush() {
            Ok(n) => {
                if n > 0 {
                    ctx.counters.sent += n as u64;
                    ctx.counters.global_room += n as i64;
                    conn.last_active_ms = ctx.now_ms;
                    if conn.linger_until_ms != 0 && !conn.has(flags::WRITE_SHUT) {
                        // A closing peer still taking what it is owed gets its
                        // LINGER_MS again: the bound is on stalling, not on reading
                        // slowly.
                        conn.linger_until_ms = ctx.now_ms + LINGER_MS;
                    }
                }
            }
            Err(e) => return Err(Step::Close(CloseReason::of_error(&e))),
        }
    }
    if conn.has(flags::PAUSED) && conn.outbound_len() < ctx.cap {
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
pub(crate) fn read_room(conn: &Conn, ctx: &Ctx<'_>) -> usize {
    room(conn.outbound_len(), ctx)
}

/// [`read_room`] for a buffer that holds `pending` bytes.
#[inline]
pub(crate) fn room(pending: usize, ctx: &Ctx<'_>) -> usize {
    let global = ctx.counters.global_room.max(0) as usize;
    let allowed = if pending == 0 {
        global.max(SMALL_READ)
    } else {
        global
    };
    ctx.cap.saturating_sub(pending).min(allowed)
}

/// The read size of a connection that holds nothing once all outbound buffers are at
/// `--max-buffered-bytes`.
pub const SMALL_READ: usize = 4096;

/// Marks a connection paused by backpressure (counted once per episode); the worker
/// comes back to it when its buffer drains.
#[inline]
pub(crate) fn pause(conn: &mut Conn, ctx: &mut Ctx<'_>) -> Step {
    if !conn.has(flags::PAUSED) {
        conn.set(flags::PAUSED);
        ctx.counters.pauses += 1;
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
            let pending = conn.outbound_len();
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
pub(crate) fn begin(conn: &mut Conn, ctx: &mut Ctx<'_>, readable: bool) -> Option<Step> {
    if let Err(step) = flush_owed(conn, ctx) {
        return Some(step);
    }
    if conn.has(flags::INPUT_DONE) {
        return Some(finish(conn, ctx));
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
    ctx: &mut Ctx<'_>,
    n: usize,
    want: usize,
    budget: &mut usize,
) -> Option<Step> {
    *budget -= n;
    if n < want && !conn.has(flags::HUP_SEEN) {
        return Some(caught_up(conn, ctx));
    }
    if *budget == 0 {
        conn.set(flags::READ_PENDING);
        return Some(Step::Again);
    }
    None
}

/// Input is drained for now. A draining server stops serving input here.
#[inline]
pub(crate) fn caught_up(conn: &mut Conn, ctx: &mut Ctx<'_>) -> Step {
    if conn.has(flags::DRAINING) {
        conn.set(flags::INPUT_DONE);
        return finish(conn, ctx);
    }
    Step::Idle
}

/// Why a connection that is finishing ends, once the peer has closed too (or its
/// lingering close gave up waiting).
pub(crate) fn closing_reason(conn: &Conn) -> CloseReason {
    if conn.has(flags::TIMED_OUT) {
        CloseReason::HeaderTimeout
    } else if conn.has(flags::PROTO_ERROR) {
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
pub(crate) fn finish(conn: &mut Conn, ctx: &mut Ctx<'_>) -> Step {
    if conn.outbound_len() > 0 {
        if conn.linger_until_ms == 0 && conn.has(flags::PROTO_ERROR | flags::TIMED_OUT) {
            // A peer that broke the protocol or timed out gets LINGER_MS at a time
            // to take what it is owed (each write that goes out renews it), not for
            // ever: one that stops reading is then reset.
            conn.linger_until_ms = ctx.now_ms + LINGER_MS;
        }
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
        if conn.linger_until_ms == 0 {
            conn.linger_until_ms = ctx.now_ms + LINGER_MS;
        }
    }
    let mut budget = READ_BUDGET;
    loop {
        match socket::read(conn.fd.as_fd(), ctx.buf) {
            Ok(0) => return Step::Close(closing_reason(conn)),
            Ok(n) => {
                ctx.counters.received += n as u64;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_connection_stays_small() {
        // The per-idle-connection budget of DESIGN.md is 256 bytes: a slab slot (the
        // connection and a 4-byte generation) with the largest inline mode state
        // (http's; relay's is boxed) stays well below it, timer entry included.
        let size = std::mem::size_of::<Option<Conn>>() + 4;
        assert!(size <= 128, "{size}");
        assert!(std::mem::size_of::<State>() <= 24);
    }
}
