//! Relay: a TCP proxy. Each client connection becomes a pair, (client socket,
//! upstream socket), owned by the worker that owns the client.
//!
//! # A pair
//!
//! Both sockets are registered in the worker's epoll once, edge-triggered, with the
//! same slab token; the upstream side's token has its top bit set
//! ([`Token::upstream`](crate::conn::Token::upstream)). Whichever socket fires, the pair is served as a whole: each
//! direction (client → upstream, upstream → client) first writes what it owes its
//! destination, then reads its source if an edge said it may have input.
//!
//! # Backpressure
//!
//! A direction reads from its source straight into the worker buffer and writes it on
//! to the destination; only what the destination does not take is kept, in that
//! direction's buffer, capped at `--max-pending-bytes`. At the cap the direction stops
//! reading its source, and resumes when the destination's EPOLLOUT edge lets the
//! buffer drain, exactly as echo does (the worker's rule 3). A pair therefore holds at
//! most two caps whatever its peers do. With `--splice` the buffer is a pipe, and a
//! direction reads its source only when its pipe is empty.
//!
//! # Half-close and reset
//!
//! A FIN read from one side is forwarded with `shutdown(SHUT_WR)` to the other once
//! everything read before it is written; the other direction keeps flowing. The pair
//! closes when both directions have forwarded their FIN. An error on either socket
//! (a reset) fails the pair: what that socket's peer sent before the error is still
//! read and forwarded (a direct connection would have read it), no FIN is forwarded,
//! and once the other socket's kernel send queue has drained the pair is closed. The
//! worker's close rule then resets both sockets, so the other peer gets a reset too
//! rather than a clean FIN that would pass truncated data off as complete.
//!
//! # Upstreams
//!
//! Which upstream a client gets, and whether an upstream is up, is
//! [`crate::upstream`]'s business. The upstream connect is non-blocking and bounded by
//! `--connect-timeout`. An upstream that refuses, is unreachable or times out is
//! marked down (for `--fail-timeout`, or with health checks until probes pass) and
//! the client goes on to the next upstream, up to `--connect-retries` tries, and is
//! reset (reason `upstream_error`) when none is left. Bytes the client sends
//! meanwhile are kept, under the same cap, and forwarded once an upstream is
//! connected.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use super::{room, Conn, Ctx, Edge, Step, READ_BUDGET, READ_BUFFER_SIZE};
use crate::access_log::{Ended, RelayFacts, Stage};
use crate::conn::Outbound;
use crate::handover::wire::{Reader, WireError, Writer};
use crate::metrics::{CloseReason, ConnectError, Counters};
use crate::sys::epoll::SOCKET_INTEREST;
use crate::sys::socket;
use crate::sys::splice::{splice, Pipe};
use crate::upstream::queue::Ticket;
use crate::upstream::{Lease, Pick, Picker, Upstreams};

/// A worker's relay state: the shared upstreams and its own view of them.
pub struct Relay {
    upstreams: Arc<Upstreams>,
    picker: Picker,
    /// The worker's id: where the queue sends this worker's clients their slots.
    id: usize,
    /// A slot just granted to one of this worker's queued clients, and when that
    /// client began to wait, for [`granted`].
    pub granted: Option<(Lease, Instant)>,
}

impl Relay {
    pub fn new(upstreams: Arc<Upstreams>, id: usize) -> Relay {
        let picker = Picker::new(&upstreams, id);
        Relay {
            upstreams,
            picker,
            id,
            granted: None,
        }
    }
}

/// How often a failed pair looks at whether the healthy socket's kernel send queue
/// has drained, so that its reset can go: often enough that the reset follows within
/// a blink, rarely enough that a thousand such pairs cost nothing.
const RESET_POLL_MS: u64 = 50;

/// State bits of one direction.
mod half {
    /// The source may have input: an edge said so and no read has hit EAGAIN since.
    pub const READY: u8 = 1 << 0;
    /// The source hung up or has an error: a short read no longer means drained.
    pub const HUP: u8 = 1 << 1;
    /// The source sent its FIN.
    pub const EOF: u8 = 1 << 2;
    /// The FIN has been forwarded to the destination.
    pub const SHUT: u8 = 1 << 3;
    /// Reading is paused at the cap (counted once per episode).
    pub const PAUSED: u8 = 1 << 4;
    /// The source failed (a reset): no more input will come from it.
    pub const GONE: u8 = 1 << 5;
    /// The pair failed: a FIN is never forwarded, since the pair ends in a reset
    /// and a FIN before it would pass the stream off as complete.
    pub const NO_FIN: u8 = 1 << 6;
}

/// One direction of a pair: bytes read from its source and not yet written to its
/// destination.
#[derive(Debug, Default)]
struct Half {
    /// Copied bytes owed to the destination; None when nothing is owed.
    pending: Option<Box<Outbound>>,
    /// With `--splice`: the pipe the bytes pass through, and how many are in it.
    pipe: Option<Pipe>,
    in_pipe: u32,
    /// PROXY header bytes at the front of `pending` not yet written: they are counted
    /// apart from relayed bytes.
    header_left: u32,
    flags: u8,
}

impl Half {
    fn has(&self, f: u8) -> bool {
        self.flags & f != 0
    }

    fn pending(&self) -> usize {
        self.pending.as_ref().map_or(0, |p| p.len())
    }

    /// Everything read and not yet written on: copied bytes and bytes in the pipe.
    fn owed(&self) -> usize {
        self.pending() + self.in_pipe as usize
    }

    /// After the source's FIN: forwards it once nothing read before it is owed.
    fn forward_fin(&mut self, dst: Option<BorrowedFd<'_>>) -> io::Result<()> {
        if self.has(half::NO_FIN) {
            return Ok(());
        }
        if let (Some(dst), 0, false) = (dst, self.owed(), self.has(half::SHUT)) {
            socket::shutdown_write(dst)?;
            self.flags |= half::SHUT;
        }
        Ok(())
    }

    /// The source's FIN has reached the destination.
    fn is_done(&self) -> bool {
        self.has(half::SHUT)
    }

    /// No more input will come from the source (its FIN or its error was read).
    fn source_ended(&self) -> bool {
        self.has(half::EOF) || self.has(half::GONE)
    }
}

/// A socket of a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Upstream,
}

/// The relay state of a connection: its upstream socket and both directions.
#[derive(Debug, Default)]
pub struct Pair {
    upstream: Option<OwnedFd>,
    /// The upstream in use (or being connected to), counted while held.
    lease: Option<Lease>,
    /// The client's place in the queue while it waits for an upstream slot.
    ticket: Option<Ticket>,
    /// Worker clock (ms) by which a queued client must have a slot; 0 if not queued.
    queue_deadline_ms: u64,
    /// Set while the connect is in progress.
    connecting_since: Option<Instant>,
    /// Worker clock (ms) by which the connect must complete; 0 once connected.
    connect_deadline_ms: u64,
    /// Bytes in both sockets' kernel send queues at the last idle-timeout look.
    queued_seen: usize,
    /// After a failure, while the healthy side's kernel send queue still holds what
    /// was forwarded to it: when to look again (a reset now would destroy those
    /// bytes), and when to stop waiting.
    reset_check_ms: u64,
    reset_wait_until_ms: u64,
    /// Upstreams tried for this client.
    tries: u32,
    /// For the access log: the upstream last tried, how long its connect took (µs),
    /// and which side's stream ended first.
    last_upstream: Option<SocketAddr>,
    connect_us: Option<u32>,
    ended: Option<Ended>,
    /// The socket that failed (reset or error) and the reason the pair will close
    /// with. What that socket had sent before it failed is still forwarded; then the
    /// pair is aborted, so the other peer learns of the failure as a reset too.
    failed: Option<(Side, CloseReason)>,
    c2u: Half,
    u2c: Half,
}

impl Pair {
    /// What the access log records of this pair.
    pub fn facts(&self) -> RelayFacts {
        let stage = if self.ticket.is_some() {
            Stage::Queue
        } else if self.upstream.is_none() || self.connecting_since.is_some() {
            Stage::Connect
        } else {
            Stage::Data
        };
        RelayFacts {
            upstream: self.last_upstream,
            connect_us: self.connect_us,
            tries: self.tries,
            ended: self.ended,
            stage,
        }
    }

    /// Bytes held in user space for both directions (what counts against
    /// `--max-buffered-bytes`; a pipe's bytes are in the kernel).
    pub fn buffered(&self) -> usize {
        self.c2u.pending() + self.u2c.pending()
    }

    /// Bytes owed to each peer, (client, upstream): read from the other one and not
    /// yet written on (the PROXY header still queued is ours, not a peer's, and is
    /// not counted).
    pub fn owed(&self) -> (usize, usize) {
        (
            self.u2c.owed(),
            self.c2u.owed() - self.c2u.header_left as usize,
        )
    }

    /// The connect deadline while connecting, or the next look at a send queue
    /// that must drain before a reset; 0 otherwise.
    pub fn deadline_ms(&self) -> u64 {
        if self.connect_deadline_ms != 0 {
            self.connect_deadline_ms
        } else if self.queue_deadline_ms != 0 {
            self.queue_deadline_ms
        } else {
            self.reset_check_ms
        }
    }

    /// Which sockets a close now must reset, (client, upstream). A FIN on a socket
    /// tells its peer that the other peer finished, so it is sent only where that is
    /// true: a direction not finished (its source sent no FIN, or it was not
    /// forwarded) resets its destination. A client that sent its request and
    /// half-closed would otherwise read a cut answer as complete; an upstream would
    /// take a stalled upload for a whole one. After a failure, or for a client no
    /// upstream took, both are reset.
    pub fn must_abort(&self) -> (bool, bool) {
        if self.failed.is_some() || self.upstream.is_none() || self.connecting_since.is_some() {
            return (true, true);
        }
        (!self.u2c.is_done(), !self.c2u.is_done())
    }

    /// At an idle timeout: whether the peers are still taking bytes out of the
    /// kernel's send queues (their length changed since the last look), which the
    /// relay cannot see as traffic of its own. A client slowly reading a response
    /// that is all in the kernel is not idle.
    pub fn kernel_progress(&mut self, client: BorrowedFd<'_>) -> bool {
        let queued = socket::unsent_bytes(client).unwrap_or(0)
            + self
                .upstream
                .as_ref()
                .map_or(0, |up| socket::unsent_bytes(up.as_fd()).unwrap_or(0));
        let progressed = queued > 0 && queued != self.queued_seen;
        self.queued_seen = queued;
        progressed
    }

    pub fn upstream_fd(&self) -> Option<BorrowedFd<'_>> {
        self.upstream.as_ref().map(|f| f.as_fd())
    }

    /// Drops the upstream socket (which leaves the epoll set) and its count.
    fn release(&mut self) {
        self.upstream = None;
        self.lease = None;
    }
}

/// Records the first failure of a pair (its `failed`, both halves, and for the access
/// log the side that ended it: the one that failed, even if the other had finished
/// sending before, since a FIN is no abort).
fn fail(
    failed: &mut Option<(Side, CloseReason)>,
    ended: &mut Option<Ended>,
    halves: [&mut Half; 2],
    side: Side,
    err: &io::Error,
) {
    if failed.is_none() {
        tracing::debug!("relayed pair: {side:?} side failed: {err}");
        *failed = Some((side, CloseReason::of_error(err)));
        *ended = Some(match side {
            Side::Client => Ended::Client,
            Side::Upstream => Ended::Upstream,
        });
        for h in halves {
            h.flags |= half::NO_FIN;
        }
    }
}

/// The direction whose source is `side`.
fn from<'a>(c2u: &'a mut Half, u2c: &'a mut Half, side: Side) -> &'a mut Half {
    match side {
        Side::Client => c2u,
        Side::Upstream => u2c,
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.release();
    }
}

/// The relay state of a connection served by this mode.
fn pair(conn: &mut Conn) -> &mut Pair {
    match &mut conn.state {
        super::State::Relay(p) => p,
        // The worker gives a relay handler only connections it created.
        _ => unreachable!("a relay connection without relay state"),
    }
}

/// Sets up a new client: the PROXY header if asked for, the pipes with `--splice`,
/// and the first upstream connect. `proxied`: the client and the address it connected
/// to as a received PROXY header named them (`--accept-proxy`), which the header sent
/// upstream carries on, as HAProxy's `accept-proxy` with `send-proxy` does; without
/// it, the socket's own addresses.
pub fn open(
    conn: &mut Conn,
    ctx: &mut Ctx<'_>,
    relay: &mut Relay,
    proxied: Option<(SocketAddr, SocketAddr)>,
) -> Step {
    let ups = &relay.upstreams;
    if ups.proxy_v2 {
        let addrs = match proxied {
            Some(addrs) => Ok(addrs),
            None => socket::peer_addr(conn.fd.as_fd())
                .and_then(|src| Ok((src, socket::local_addr(conn.fd.as_fd())?))),
        };
        match addrs {
            Ok((src, dst)) => {
                let mut header = Vec::with_capacity(super::proxy::MAX_LEN);
                super::proxy::encode(src, dst, &mut header);
                ctx.counters.global_room -= header.len() as i64;
                let p = pair(conn);
                p.c2u.header_left = header.len() as u32;
                p.c2u.pending = Some(Box::new(Outbound::from_vec(header)));
            }
            // The client is already gone (ENOTCONN).
            Err(e) => return Step::Close(CloseReason::of_error(&e)),
        }
    }
    if ups.splice {
        match (Pipe::new(), Pipe::new()) {
            (Ok(a), Ok(b)) => {
                let p = pair(conn);
                p.c2u.pipe = Some(a);
                p.u2c.pipe = Some(b);
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!("{e}; this pair is relayed by copying");
            }
        }
    }
    connect_next(conn, ctx, relay)
}

/// Starts a connect to the next live upstream, queues the client when every upstream
/// is at its limit, or gives up on it.
fn connect_next(conn: &mut Conn, ctx: &mut Ctx<'_>, relay: &mut Relay) -> Step {
    let pair = pair(conn);
    pair.release();
    pair.connecting_since = None;
    pair.connect_deadline_ms = 0;
    if let Some((_, reason)) = pair.failed {
        return Step::Close(reason); // the client is gone: no point in another upstream
    }
    loop {
        let listed = relay.picker.list(&relay.upstreams).len();
        if pair.tries as usize >= relay.upstreams.tries(listed) {
            tracing::debug!(
                tries = pair.tries,
                "no upstream could be connected; resetting the client"
            );
            return Step::Close(CloseReason::UpstreamError);
        }
        let ups = &relay.upstreams;
        let lease = match relay.picker.pick(ups) {
            Pick::Go(lease) => lease,
            Pick::Full => return wait_in_queue(pair, ctx, relay),
            Pick::Empty => {
                tracing::debug!("no upstream is listed; resetting the client");
                return Step::Close(CloseReason::UpstreamError);
            }
        };
        match connect(pair, ctx, ups, lease) {
            Some(step) => return step,
            None => continue,
        }
    }
}

/// Starts the connect of `pair` to the upstream of `lease`; None if it failed at once
/// (the upstream is marked, and the caller tries the next).
fn connect(pair: &mut Pair, ctx: &mut Ctx<'_>, ups: &Upstreams, lease: Lease) -> Option<Step> {
    pair.tries += 1;
    let up = lease.upstream();
    pair.last_upstream = Some(up.addr);
    let started = Instant::now();
    let fd = match socket::connect_nonblocking(up.addr) {
        Ok(fd) => fd,
        Err(e) => {
            ups.failed(up, ConnectError::of(&e), &e);
            return None;
        }
    };
    // Relayed request/response traffic must not wait for Nagle.
    let _ = socket::set_nodelay(fd.as_fd());
    // A new socket cannot fail these for a reason of its peer's; if it does, the
    // pair is relayed without them rather than refused.
    if let Err(e) = ups.timeouts.apply_to_new(fd.as_fd()) {
        tracing::debug!("{e}; relaying to {} without keepalive", up.addr);
    }
    if let Err(e) = ctx
        .epoll
        .add(fd.as_fd(), ctx.token.upstream().0, SOCKET_INTEREST)
    {
        tracing::warn!("{e}; resetting the client");
        return Some(Step::Close(CloseReason::Error));
    }
    pair.lease = Some(lease);
    pair.upstream = Some(fd);
    pair.connecting_since = Some(started);
    pair.connect_deadline_ms = ctx.now_ms + ups.connect_timeout_ms;
    Some(Step::Idle)
}

/// Every upstream is at `--max-conns-per-upstream`: the client waits for a slot, for
/// `--queue-timeout` at most, or is closed at once if the queue is full.
fn wait_in_queue(pair: &mut Pair, ctx: &mut Ctx<'_>, relay: &Relay) -> Step {
    let Some(queue) = relay.upstreams.queue.as_ref() else {
        // Without a limit no upstream is ever full.
        return Step::Close(CloseReason::UpstreamError);
    };
    match queue.join(relay.id, ctx.token.0) {
        Some(ticket) => {
            pair.ticket = Some(ticket);
            pair.queue_deadline_ms = ctx.now_ms + relay.upstreams.queue_timeout_ms;
            // A slot may have freed between the pick and the join; whoever freed it
            // saw no waiter. Look once more, now that this client waits.
            relay.upstreams.dispatch_all();
            Step::Idle
        }
        None => {
            tracing::debug!("every upstream is at its limit and the queue is full");
            Step::Close(CloseReason::QueueFull)
        }
    }
}

/// A queued client was handed a slot (in `relay.granted`): connect it.
pub fn granted(conn: &mut Conn, ctx: &mut Ctx<'_>, relay: &mut Relay) -> Step {
    let Some((lease, since)) = relay.granted.take() else {
        return Step::Idle;
    };
    let pair = pair(conn);
    if pair.ticket.take().is_none() {
        // Not waiting (any more): the slot goes back, to the next waiter.
        return Step::Idle;
    }
    if let Some(q) = &relay.upstreams.queue {
        q.waited(since);
    }
    pair.queue_deadline_ms = 0;
    match connect(pair, ctx, &relay.upstreams, lease) {
        Some(step) => step,
        None => connect_next(conn, ctx, relay),
    }
}

/// The pair's deadline passed: a connect that has not completed has timed out, or a
/// failed pair looks again at whether its reset can go.
pub fn on_deadline(conn: &mut Conn, ctx: &mut Ctx<'_>, relay: &mut Relay) -> Step {
    let pair = pair(conn);
    if pair.ticket.is_some() {
        if pair.queue_deadline_ms > ctx.now_ms {
            return Step::Idle;
        }
        tracing::debug!("no upstream slot freed within --queue-timeout; resetting the client");
        return Step::Close(CloseReason::QueueTimeout);
    }
    if pair.failed.is_some() && pair.connecting_since.is_none() {
        return pump_pair(conn, ctx);
    }
    if pair.connecting_since.is_none() || pair.connect_deadline_ms > ctx.now_ms {
        return Step::Idle;
    }
    let err = io::Error::from(io::ErrorKind::TimedOut);
    if let Some(lease) = &pair.lease {
        relay
            .upstreams
            .failed(lease.upstream(), ConnectError::Timeout, &err);
    }
    connect_next(conn, ctx, relay)
}

/// Serves a pair after an edge on either socket (`edge`), or from the ready list.
pub fn serve(conn: &mut Conn, ctx: &mut Ctx<'_>, relay: &mut Relay, edge: Option<Edge>) -> Step {
    if let Some(edge) = edge {
        let pair = pair(conn);
        if edge.upstream && pair.connecting_since.is_some() {
            match connected(pair, &relay.upstreams) {
                Ok(()) => pair.connect_deadline_ms = 0,
                Err(()) => return connect_next(conn, ctx, relay),
            }
        }
        let side = if edge.upstream {
            Side::Upstream
        } else {
            Side::Client
        };
        let client = conn.fd.as_fd();
        let Conn { state, .. } = conn;
        let super::State::Relay(pair) = state else {
            return Step::Close(CloseReason::Error);
        };
        let Pair {
            upstream,
            failed,
            ended,
            c2u,
            u2c,
            ..
        } = &mut **pair;
        let fd = match side {
            Side::Client => Some(client),
            Side::Upstream => upstream.as_ref().map(|f| f.as_fd()),
        };
        let h = from(c2u, u2c, side);
        if edge.readable || edge.hup {
            h.flags |= half::READY;
        }
        if edge.hup || edge.error {
            h.flags |= half::HUP;
        }
        if edge.error && h.source_ended() {
            // A reset on a socket no longer read: its error will surface through no
            // read, so take it now and let the other side learn of it.
            if let Some(Ok(Some(e))) = fd.map(socket::take_error) {
                fail(failed, ended, [c2u, u2c], side, &e);
            }
        }
        // Otherwise the error surfaces through the next read of that socket, after
        // every byte the peer sent before it: those are forwarded first.
    }
    pump_pair(conn, ctx)
}

/// Checks how the upstream connect ended: Ok once connected, Err (the upstream counted
/// and marked) if it failed.
fn connected(pair: &mut Pair, ups: &Upstreams) -> Result<(), ()> {
    let (Some(fd), Some(lease)) = (pair.upstream.as_ref(), pair.lease.as_ref()) else {
        return Err(());
    };
    let up = lease.upstream();
    match socket::take_error(fd.as_fd()) {
        Ok(None) => {
            if let Some(since) = pair.connecting_since.take() {
                let took = since.elapsed();
                up.metrics.connect.observe(took.as_secs_f64());
                pair.connect_us = Some(took.as_micros().min(u32::MAX as u128) as u32);
            }
            ups.connected(up);
            Ok(())
        }
        Ok(Some(e)) | Err(e) => {
            ups.failed(up, ConnectError::of(&e), &e);
            Err(())
        }
    }
}

/// A failed read of a direction's source, or a failed write to its destination.
enum Fault {
    Src(io::Error),
    Dst(io::Error),
}

/// Moves bytes both ways; closes the pair when both directions have finished, or when
/// everything a failed socket sent before it failed has been forwarded.
fn pump_pair(conn: &mut Conn, ctx: &mut Ctx<'_>) -> Step {
    let client = conn.fd.as_fd();
    let Conn {
        state,
        last_active_ms,
        ..
    } = conn;
    let super::State::Relay(pair) = state else {
        return Step::Close(CloseReason::Error);
    };
    let Pair {
        upstream,
        connecting_since,
        failed,
        c2u,
        u2c,
        reset_check_ms,
        reset_wait_until_ms,
        ticket,
        ended,
        ..
    } = &mut **pair;
    let upstream = upstream
        .as_ref()
        .map(|f| f.as_fd())
        .filter(|_| connecting_since.is_none());
    let mut moved = false;
    let mut again = false;
    // A fault in one direction changes what the other may do, so a pass that meets
    // one runs again (at most twice: a pair fails once).
    for _ in 0..2 {
        let failed_side = failed.map(|(side, _)| side);
        // (the failed side, the error, whether it came from reading that side)
        let mut fault = None;
        // Nothing goes to a socket that failed; what it sent is still forwarded.
        if failed_side != Some(Side::Upstream) {
            match pump(c2u, client, upstream, Dir::ToUpstream, ctx, &mut moved) {
                Ok(a) => again |= a,
                Err(Fault::Src(e)) => fault = Some((Side::Client, e, true)),
                Err(Fault::Dst(e)) => fault = Some((Side::Upstream, e, false)),
            }
        }
        if let (Some(up), None, true) = (upstream, &fault, failed_side != Some(Side::Client)) {
            match pump(u2c, up, Some(client), Dir::ToClient, ctx, &mut moved) {
                Ok(a) => again |= a,
                Err(Fault::Src(e)) => fault = Some((Side::Upstream, e, true)),
                Err(Fault::Dst(e)) => fault = Some((Side::Client, e, false)),
            }
        }
        let Some((side, err, read_failed)) = fault else {
            break;
        };
        let first = failed.is_none();
        fail(failed, ended, [&mut *c2u, &mut *u2c], side, &err);
        let from_failed = from(c2u, u2c, side);
        if read_failed {
            // The read that returned the error ends that direction.
            from_failed.flags |= half::GONE;
        } else if !from_failed.source_ended() {
            // A write to it failed: read what it had sent before its error; the
            // read that returns the error (or EOF) ends that direction.
            from_failed.flags |= half::READY | half::HUP;
        }
        if !first {
            break;
        }
    }
    if moved {
        *last_active_ms = ctx.now_ms;
    }
    // Once per pair, when a source first ends (a failure is noted where it happens):
    // one test of both halves' flags in the common case.
    if (c2u.flags | u2c.flags) & (half::EOF | half::GONE) != 0 && ended.is_none() {
        *ended = match (*failed, c2u.source_ended(), u2c.source_ended()) {
            (Some((Side::Client, _)), ..) | (None, true, _) => Some(Ended::Client),
            (Some((Side::Upstream, _)), ..) | (None, false, true) => Some(Ended::Upstream),
            (None, false, false) => None,
        };
    }
    if let (Some((_, reason)), Some(_)) = (*failed, ticket.as_ref()) {
        // A queued client that failed (reset) gave up its wait: it has no upstream to
        // hand what it sent to, nor will it ever.
        return Step::Close(reason);
    }
    if let Some((side, reason)) = *failed {
        // A failed pair gets LINGER_MS from its failure to hand the other peer what
        // the failed one sent; a peer that does not take it by then is reset anyway.
        if *reset_wait_until_ms == 0 {
            *reset_wait_until_ms = ctx.now_ms + super::LINGER_MS;
            *reset_check_ms = *reset_wait_until_ms;
        }
        let out_of_time = ctx.now_ms >= *reset_wait_until_ms;
        let from_failed = from(c2u, u2c, side);
        let forwarded = from_failed.source_ended() && from_failed.owed() == 0;
        if !forwarded && !out_of_time {
            return if again { Step::Again } else { Step::Idle };
        }
        // Everything the failed peer sent has been written on. The reset must not
        // overtake it: it would destroy what still sits in the healthy socket's
        // kernel send queue. Look again each tick until that queue is empty.
        let healthy = match side {
            Side::Client => upstream,
            Side::Upstream => Some(client),
        };
        let unsent = healthy.map_or(0, |fd| socket::unsent_bytes(fd).unwrap_or(0));
        if unsent > 0 && !out_of_time {
            *reset_check_ms = ctx.now_ms + RESET_POLL_MS;
            return Step::Idle;
        }
        *reset_check_ms = 0;
        return Step::Close(reason);
    }
    if c2u.is_done() && u2c.is_done() {
        return Step::Close(CloseReason::Eof);
    }
    if again {
        Step::Again
    } else {
        Step::Idle
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    ToUpstream,
    ToClient,
}

impl Dir {
    fn count_read(self, c: &mut Counters, n: usize) {
        match self {
            Dir::ToUpstream => c.received += n as u64,
            Dir::ToClient => c.up_received += n as u64,
        }
    }

    fn count_written(self, c: &mut Counters, n: usize) {
        match self {
            Dir::ToUpstream => c.up_sent += n as u64,
            Dir::ToClient => c.sent += n as u64,
        }
    }
}

/// One direction: writes what `dst` is owed, then reads `src` while it may have input,
/// the budget lasts and the buffer has room. `dst` is None while the upstream is
/// connecting: what is read is kept. Returns whether the budget ran out with input
/// still there (serve again before sleeping).
fn pump(
    h: &mut Half,
    src: BorrowedFd<'_>,
    dst: Option<BorrowedFd<'_>>,
    dir: Dir,
    ctx: &mut Ctx<'_>,
    moved: &mut bool,
) -> Result<bool, Fault> {
    if let Some(dst) = dst {
        flush(h, dst, dir, ctx, moved).map_err(Fault::Dst)?;
    }
    if h.has(half::EOF) {
        h.forward_fin(dst).map_err(Fault::Dst)?;
        return Ok(false);
    }
    if h.has(half::GONE) || !h.has(half::READY) {
        return Ok(false);
    }
    let mut budget = READ_BUDGET;
    loop {
        let splicing = h.pipe.is_some() && h.pending.is_none() && dst.is_some();
        let owed = h.owed();
        let room = if splicing {
            // The pipe is the buffer: read the source only into an empty pipe, so
            // that EAGAIN can only mean the socket has nothing (see `splice`).
            if owed == 0 {
                READ_BUFFER_SIZE
            } else {
                0
            }
        } else {
            room(owed, ctx)
        };
        if room == 0 {
            // Rule 3: the source's input stays queued (READY stays set) until the
            // destination drains.
            if !h.has(half::PAUSED) {
                h.flags |= half::PAUSED;
                ctx.counters.pauses += 1;
            }
            return Ok(false);
        }
        h.flags &= !half::PAUSED;
        let want = room.min(budget).min(ctx.buf.len());
        let spliced = match (splicing, h.pipe.as_ref(), dst) {
            (true, Some(pipe), Some(dst)) => {
                Some(splice_once(&mut h.in_pipe, pipe, src, dst, want, dir, ctx))
            }
            _ => None,
        };
        let result = match spliced {
            Some(r) => r,
            None => copy_once(h, src, dst, want, dir, ctx),
        };
        match result {
            Ok(0) => {
                h.flags |= half::EOF;
                h.flags &= !half::READY;
                h.forward_fin(dst).map_err(Fault::Dst)?;
                return Ok(false);
            }
            Ok(n) => {
                *moved = true;
                budget -= n.min(budget);
                // A short copy read drains a stream socket (rule 1), unless the
                // source hung up, when the FIN or error behind the data had its only
                // edge. A short splice proves nothing: the pipe may have run out of
                // slots before the socket ran out of bytes.
                if n < want && !splicing && !h.has(half::HUP) {
                    h.flags &= !half::READY;
                    return Ok(false);
                }
                if budget == 0 {
                    return Ok(true);
                }
            }
            Err(Fault::Src(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                h.flags &= !half::READY;
                return Ok(false);
            }
            Err(Fault::Src(e) | Fault::Dst(e))
                if splicing && e.raw_os_error() == Some(libc::EINVAL) =>
            {
                // This pair of descriptors cannot splice: copy from now on, starting
                // with whatever the pipe already holds.
                tracing::debug!("splice: {e}; relaying this direction by copying");
                unpipe(h, ctx).map_err(Fault::Src)?;
            }
            Err(fault) => return Err(fault),
        }
    }
}

/// Gives up a direction's pipe, moving the bytes it holds into the copy buffer.
fn unpipe(h: &mut Half, ctx: &mut Ctx<'_>) -> io::Result<()> {
    let Some(pipe) = h.pipe.take() else {
        return Ok(());
    };
    while h.in_pipe > 0 {
        let want = (h.in_pipe as usize).min(ctx.buf.len());
        let n = pipe.read(&mut ctx.buf[..want])?;
        if n == 0 {
            break;
        }
        let data = &ctx.buf[..n];
        match h.pending.as_mut() {
            Some(out) => out.push(data),
            None => h.pending = Some(Box::new(Outbound::from_slice(data))),
        }
        ctx.counters.global_room -= n as i64;
        h.in_pipe -= n as u32;
    }
    h.in_pipe = 0;
    Ok(())
}

/// Writes what the destination is owed: copied bytes first, then the pipe.
fn flush(
    h: &mut Half,
    dst: BorrowedFd<'_>,
    dir: Dir,
    ctx: &mut Ctx<'_>,
    moved: &mut bool,
) -> io::Result<()> {
    if let Some(out) = h.pending.as_mut() {
        let n = out.flush(dst)?;
        if n > 0 {
            // The PROXY header goes first; it is not relayed data.
            let header = n.min(h.header_left as usize);
            h.header_left -= header as u32;
            ctx.counters.proxy_header += header as u64;
            dir.count_written(ctx.counters, n - header);
            ctx.counters.global_room += n as i64;
            *moved = true;
        }
        if out.is_empty() {
            h.pending = None;
        }
    }
    if h.in_pipe > 0 && h.pending.is_none() {
        if let Some(pipe) = h.pipe.as_ref() {
            match splice(pipe.read.as_fd(), dst, h.in_pipe as usize) {
                Ok(n) => {
                    h.in_pipe -= n as u32;
                    dir.count_written(ctx.counters, n);
                    *moved = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// Reads up to `want` bytes from `src` into the worker buffer and writes them on to
/// `dst`; what `dst` does not take (or everything, while there is no `dst`) is kept.
/// Bytes read before a failed write are kept too, so a close counts them as dropped.
fn copy_once(
    h: &mut Half,
    src: BorrowedFd<'_>,
    dst: Option<BorrowedFd<'_>>,
    want: usize,
    dir: Dir,
    ctx: &mut Ctx<'_>,
) -> Result<usize, Fault> {
    let n = socket::read(src, &mut ctx.buf[..want]).map_err(Fault::Src)?;
    if n == 0 {
        return Ok(0);
    }
    dir.count_read(ctx.counters, n);
    let data = &ctx.buf[..n];
    let (written, failure) = match (dst, h.pending.as_mut()) {
        (Some(dst), None) => match socket::write(dst, data) {
            Ok(w) => (w, None),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => (0, None),
            Err(e) => (0, Some(e)),
        },
        (_, Some(out)) => {
            out.push(data);
            ctx.counters.global_room -= n as i64;
            return Ok(n);
        }
        (None, None) => (0, None),
    };
    if written > 0 {
        dir.count_written(ctx.counters, written);
    }
    if written < n {
        h.pending = Some(Box::new(Outbound::from_slice(&data[written..])));
        ctx.counters.global_room -= (n - written) as i64;
        let held = h.pending();
        if held > ctx.counters.peak_pending {
            ctx.counters.peak_pending = held;
        }
    }
    match failure {
        Some(e) => Err(Fault::Dst(e)),
        None => Ok(n),
    }
}

/// Splices up to `want` bytes from `src` into the (empty) pipe and on to `dst`; what
/// `dst` does not take stays in the pipe.
fn splice_once(
    in_pipe: &mut u32,
    pipe: &Pipe,
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    want: usize,
    dir: Dir,
    ctx: &mut Ctx<'_>,
) -> Result<usize, Fault> {
    let n = splice(src, pipe.write.as_fd(), want).map_err(Fault::Src)?;
    if n == 0 {
        return Ok(0);
    }
    dir.count_read(ctx.counters, n);
    *in_pipe = n as u32;
    match splice(pipe.read.as_fd(), dst, n) {
        Ok(m) => {
            *in_pipe -= m as u32;
            dir.count_written(ctx.counters, m);
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(Fault::Dst(e)),
    }
    Ok(n)
}

/// A deadline (worker ms, 0 for none) as the time left from `now_ms`, for a hand-over:
/// the two processes' clocks differ. A deadline already due stays due (1 ms).
pub(crate) fn time_left(deadline_ms: u64, now_ms: u64) -> u64 {
    if deadline_ms == 0 {
        0
    } else {
        deadline_ms.saturating_sub(now_ms).max(1)
    }
}

/// The inverse of [`time_left`] in the receiving process.
pub(crate) fn deadline_in(left_ms: u64, now_ms: u64) -> u64 {
    if left_ms == 0 {
        0
    } else {
        now_ms + left_ms
    }
}

impl Half {
    fn export(&mut self, w: &mut Writer, fds: &mut Vec<OwnedFd>) {
        w.bytes(self.pending.as_ref().map_or(&[][..], |p| p.as_slice()));
        match self.pipe.take() {
            Some(pipe) => {
                w.u8(1);
                fds.push(pipe.read);
                fds.push(pipe.write);
            }
            None => {
                w.u8(0);
            }
        }
        w.u32(self.in_pipe).u32(self.header_left).u8(self.flags);
    }

    fn import(
        r: &mut Reader<'_>,
        fds: &mut impl Iterator<Item = OwnedFd>,
    ) -> Result<Half, WireError> {
        let pending = r.bytes()?;
        let pipe = match r.u8()? {
            0 => None,
            _ => Some(Pipe {
                read: fds
                    .next()
                    .ok_or(WireError("a pipe without its descriptors"))?,
                write: fds
                    .next()
                    .ok_or(WireError("a pipe without its descriptors"))?,
            }),
        };
        let in_pipe = r.u32()?;
        let header_left = r.u32()?;
        // The source may have input that arrived during the move: look without an edge.
        let flags = r.u8()? | half::READY;
        if header_left as usize > pending.len() || (pipe.is_none() && in_pipe != 0) {
            return Err(WireError("a relay direction's counts disagree"));
        }
        Ok(Half {
            pending: (!pending.is_empty()).then(|| Box::new(Outbound::from_slice(pending))),
            pipe,
            in_pipe,
            header_left,
            flags,
        })
    }
}

impl Pair {
    /// Writes the pair for a hand-over to another process (see `crate::handover`):
    /// its upstream socket and pipes go to `fds` in order, its bytes and states to `w`.
    pub fn export(&mut self, w: &mut Writer, fds: &mut Vec<OwnedFd>, now_ms: u64) {
        let addr = self.lease.as_ref().map(|l| l.upstream().addr);
        match (self.upstream.take(), addr) {
            (Some(fd), Some(addr)) => {
                fds.push(fd);
                w.u8(1).str(&addr.to_string());
            }
            _ => {
                w.u8(0);
            }
        }
        self.release();
        w.u8(self.connecting_since.is_some() as u8)
            .u64(time_left(self.connect_deadline_ms, now_ms))
            .u64(time_left(self.reset_check_ms, now_ms))
            .u64(time_left(self.reset_wait_until_ms, now_ms))
            .u32(self.tries);
        match self.failed {
            None => w.u8(0).u8(0),
            Some((side, reason)) => w.u8(1 + (side == Side::Upstream) as u8).u8(reason as u8),
        };
        self.c2u.export(w, fds);
        self.u2c.export(w, fds);
    }

    /// Reads a pair written by [`Pair::export`]. Its upstream is matched to this
    /// process's upstream list by address; an established pair whose upstream is no
    /// longer listed keeps it (counted under its address, and never given a new client), and a
    /// connect in progress to such an upstream is given up, to start again with a
    /// listed one when the pair is first served.
    pub fn import(
        r: &mut Reader<'_>,
        fds: &mut impl Iterator<Item = OwnedFd>,
        relay: &Relay,
        now_ms: u64,
    ) -> Result<Pair, WireError> {
        let mut pair = Pair::default();
        let mut gave_up = false;
        if r.u8()? == 1 {
            let fd = fds
                .next()
                .ok_or(WireError("an upstream without its descriptor"))?;
            let addr: SocketAddr = r
                .str()?
                .parse()
                .map_err(|_| WireError("an upstream address that does not parse"))?;
            pair.upstream = Some(fd);
            let connecting = r.u8()? == 1;
            if connecting && relay.upstreams.find(addr).is_none() {
                // Its upstream left the configuration: not a failed try.
                pair.upstream = None;
                gave_up = true;
            } else {
                let (up, _) = relay.upstreams.for_moved(addr);
                pair.lease = Some(Lease::new(up));
                // The access log names the upstream a moved pair relays to.
                pair.last_upstream = Some(addr);
                if connecting {
                    pair.connecting_since = Some(Instant::now());
                }
            }
        } else {
            r.u8()?;
        }
        let connect_left = r.u64()?;
        if pair.connecting_since.is_some() {
            pair.connect_deadline_ms = deadline_in(connect_left, now_ms);
        }
        pair.reset_check_ms = deadline_in(r.u64()?, now_ms);
        pair.reset_wait_until_ms = deadline_in(r.u64()?, now_ms);
        let tries = r.u32()?;
        pair.tries = if gave_up { 0 } else { tries };
        let failed_side = r.u8()?;
        let reason = r.u8()?;
        pair.failed = match failed_side {
            0 => None,
            n => {
                let reason = *CloseReason::ALL
                    .get(reason as usize)
                    .ok_or(WireError("unknown close reason"))?;
                Some((if n == 1 { Side::Client } else { Side::Upstream }, reason))
            }
        };
        pair.c2u = Half::import(r, fds)?;
        pair.u2c = Half::import(r, fds)?;
        Ok(pair)
    }
}

/// A pair that has just arrived from another process: its upstream socket joins this
/// worker's epoll, and a pair whose connect was given up on import connects anew.
pub fn moved(conn: &mut Conn, ctx: &mut Ctx<'_>, relay: &mut Relay) -> Step {
    let p = pair(conn);
    match p.upstream.as_ref() {
        Some(up) => {
            // Set by the process it comes from: this one's options apply from now on.
            let _ = relay.upstreams.timeouts.apply(up.as_fd());
            if let Err(e) = ctx
                .epoll
                .add(up.as_fd(), ctx.token.upstream().0, SOCKET_INTEREST)
            {
                tracing::warn!("{e}; resetting a relayed pair that moved here");
                return Step::Close(CloseReason::Error);
            }
        }
        None if p.failed.is_none() => return connect_next(conn, ctx, relay),
        None => {}
    }
    serve(conn, ctx, relay, None)
}
