//! Relay: a TCP proxy. Each client connection becomes a pair, (client socket,
//! upstream socket), owned by the worker that owns the client.
//!
//! # A pair
//!
//! Both sockets are registered in the worker's epoll once, edge-triggered, with the
//! same slab token; the upstream side's token has its top bit set
//! ([`Token::upstream`]). Whichever socket fires, the pair is served as a whole: each
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
//! (a reset) aborts both: the pair is closed with SO_LINGER 0, so the other peer gets
//! a reset too rather than a clean FIN that would pass truncated data off as complete.
//!
//! # Upstreams
//!
//! The upstream connect is non-blocking and bounded by `--connect-timeout`. An
//! upstream that refuses, is unreachable or times out is marked failed for
//! `--fail-timeout` (shared by all workers) and skipped; the client goes on to the
//! next upstream, up to `--connect-retries` tries, and is closed (reason
//! `upstream_error`) when none is left. Bytes the client sends meanwhile are kept, under
//! the same cap, and forwarded once an upstream is connected.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use prometheus::IntGauge;

use super::{room, Io, Step, READ_BUDGET, READ_BUFFER_SIZE};
use crate::config::{Balance, RelayConfig};
use crate::conn::{Conn, Outbound, Token};
use crate::metrics::{CloseReason, ConnectError, Counters, Metrics, UpstreamMetrics};
use crate::sys::epoll::{Epoll, SOCKET_INTEREST};
use crate::sys::socket;
use crate::sys::splice::{splice, Pipe};

/// One upstream and what every worker knows of it.
pub struct Upstream {
    pub addr: SocketAddr,
    /// The `upstream` label of its metrics: the address.
    pub label: String,
    /// Until when (ms of [`Upstreams::now_ms`]) it is skipped; 0: it is live.
    failed_until_ms: AtomicU64,
    metrics: UpstreamMetrics,
}

/// The upstreams of a relay server, shared by its workers.
pub struct Upstreams {
    list: Vec<Upstream>,
    epoch: Instant,
    balance: Balance,
    fail_timeout_ms: u64,
    tries: usize,
    connect_timeout_ms: u64,
    splice: bool,
    proxy_v2: bool,
}

impl Upstreams {
    pub fn new(config: &RelayConfig, metrics: &Metrics) -> Upstreams {
        let list = config
            .upstreams
            .iter()
            .map(|&addr| {
                let label = addr.to_string();
                Upstream {
                    addr,
                    metrics: metrics.upstream(&label),
                    label,
                    failed_until_ms: AtomicU64::new(0),
                }
            })
            .collect();
        Upstreams {
            list,
            epoch: Instant::now(),
            balance: config.balance,
            fail_timeout_ms: config.fail_timeout.as_millis() as u64,
            tries: config.tries(),
            connect_timeout_ms: (config.connect_timeout.as_millis() as u64).max(1),
            splice: config.splice,
            proxy_v2: config.send_proxy_v2,
        }
    }

    pub fn list(&self) -> &[Upstream] {
        &self.list
    }

    /// Milliseconds since start, plus one so that 0 can mean "never failed".
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Whether upstream `i` may be tried. A lone upstream is never skipped: there is
    /// nowhere else to send the client (nginx does the same).
    fn is_live(&self, i: usize, now_ms: u64) -> bool {
        self.list.len() == 1 || self.list[i].failed_until_ms.load(Ordering::Relaxed) <= now_ms
    }

    /// Counts a failed connect to upstream `i`, and marks it failed unless the error
    /// was ours (out of descriptors or ports) rather than the upstream's.
    fn failed(&self, i: usize, reason: ConnectError, err: &io::Error) {
        let up = &self.list[i];
        up.metrics.errors[reason as usize].inc();
        if reason == ConnectError::Error || self.fail_timeout_ms == 0 {
            tracing::debug!(upstream = %up.addr, "connect failed: {err}");
            return;
        }
        let now = self.now_ms();
        let was_live = up
            .failed_until_ms
            .swap(now + self.fail_timeout_ms, Ordering::Relaxed)
            <= now;
        if was_live {
            // Once per failure episode, not once per client.
            tracing::warn!(
                upstream = %up.addr,
                "connect failed ({}: {err}); skipping it for {} ms",
                reason.as_str(),
                self.fail_timeout_ms
            );
        }
    }
}

/// A worker's relay state: the shared upstreams and its own round-robin position.
pub struct Relay {
    upstreams: Arc<Upstreams>,
    next: usize,
}

impl Relay {
    /// Worker `id` starts its round-robin at a different upstream from its neighbours.
    pub fn new(upstreams: Arc<Upstreams>, id: usize) -> Relay {
        let next = id % upstreams.list.len().max(1);
        Relay { upstreams, next }
    }

    pub fn connect_timeout_ms(&self) -> u64 {
        self.upstreams.connect_timeout_ms
    }

    /// The next upstream to try, or None when every one is marked failed.
    fn pick(&mut self) -> Option<usize> {
        let ups = &self.upstreams;
        let n = ups.list.len();
        let now = ups.now_ms();
        let mut best: Option<(usize, i64)> = None;
        for k in 0..n {
            let i = (self.next + k) % n;
            if !ups.is_live(i, now) {
                continue;
            }
            match ups.balance {
                Balance::RoundRobin => {
                    best = Some((i, 0));
                    break;
                }
                Balance::LeastConn => {
                    let active = ups.list[i].metrics.active.get();
                    if best.is_none_or(|(_, a)| active < a) {
                        best = Some((i, active));
                    }
                }
            }
        }
        let (i, _) = best?;
        self.next = (i + 1) % n;
        Some(i)
    }
}

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
}

/// The relay half of a connection: its upstream socket and both directions.
#[derive(Debug, Default)]
pub struct Pair {
    upstream: Option<OwnedFd>,
    /// Counts this pair in its upstream's `edgepoll_upstream_connections_active`.
    active: Option<IntGauge>,
    /// Index of the upstream in use.
    index: usize,
    /// Set while the connect is in progress.
    connecting_since: Option<Instant>,
    /// Upstreams tried for this client.
    tries: u32,
    c2u: Half,
    u2c: Half,
}

impl Pair {
    /// Bytes held in user space for both directions.
    pub fn pending(&self) -> usize {
        self.c2u.pending() + self.u2c.pending()
    }

    /// Drops the upstream socket (which leaves the epoll set) and its count.
    fn release(&mut self) {
        self.upstream = None;
        if let Some(g) = self.active.take() {
            g.dec();
        }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.release();
    }
}

/// Which socket of a pair an event is for, and what it reported.
#[derive(Debug, Clone, Copy)]
pub struct Edge {
    pub upstream: bool,
    pub readable: bool,
    /// EPOLLRDHUP or EPOLLHUP.
    pub hup: bool,
    /// EPOLLERR.
    pub error: bool,
}

/// What serving a pair needs from the worker besides the connection.
pub struct Ctx<'a> {
    pub relay: &'a mut Relay,
    pub epoll: &'a Epoll,
    pub token: Token,
}

/// Sets up a new client: the PROXY header if asked for, the pipes with `--splice`,
/// and the first upstream connect.
pub fn open(conn: &mut Conn, io: &mut Io<'_>, ctx: &mut Ctx<'_>) -> Step {
    let ups = &ctx.relay.upstreams;
    let mut pair = Box::<Pair>::default();
    if ups.proxy_v2 {
        let addrs = socket::peer_addr(conn.fd.as_fd())
            .and_then(|src| Ok((src, socket::local_addr(conn.fd.as_fd())?)));
        match addrs {
            Ok((src, dst)) => {
                let mut header = Vec::with_capacity(super::proxy::MAX_LEN);
                super::proxy::encode(src, dst, &mut header);
                io.counters.global_room -= header.len() as i64;
                pair.c2u.pending = Some(Box::new(Outbound::from_vec(header)));
            }
            // The client is already gone (ENOTCONN).
            Err(e) => return Step::Close(CloseReason::of_error(&e)),
        }
    }
    if ups.splice {
        match (Pipe::new(), Pipe::new()) {
            (Ok(a), Ok(b)) => {
                pair.c2u.pipe = Some(a);
                pair.u2c.pipe = Some(b);
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!("{e}; this pair is relayed by copying");
            }
        }
    }
    conn.relay = Some(pair);
    connect_next(conn, io, ctx)
}

/// Starts a connect to the next live upstream, or gives up on the client.
fn connect_next(conn: &mut Conn, io: &mut Io<'_>, ctx: &mut Ctx<'_>) -> Step {
    let Some(pair) = conn.relay.as_deref_mut() else {
        return Step::Close(CloseReason::Error);
    };
    pair.release();
    loop {
        if pair.tries as usize >= ctx.relay.upstreams.tries {
            tracing::debug!(
                tries = pair.tries,
                "no upstream could be connected; closing the client"
            );
            return Step::Close(CloseReason::UpstreamError);
        }
        let Some(i) = ctx.relay.pick() else {
            tracing::debug!("every upstream is marked failed; closing the client");
            return Step::Close(CloseReason::UpstreamError);
        };
        pair.tries += 1;
        let ups = &ctx.relay.upstreams;
        let up = &ups.list[i];
        let started = Instant::now();
        let fd = match socket::connect_nonblocking(up.addr) {
            Ok(fd) => fd,
            Err(e) => {
                ups.failed(i, ConnectError::of(&e), &e);
                continue;
            }
        };
        // Relayed request/response traffic must not wait for Nagle.
        let _ = socket::set_nodelay(fd.as_fd());
        if let Err(e) = ctx
            .epoll
            .add(fd.as_fd(), ctx.token.upstream().0, SOCKET_INTEREST)
        {
            tracing::warn!("{e}; closing the client");
            return Step::Close(CloseReason::Error);
        }
        up.metrics.active.inc();
        pair.active = Some(up.metrics.active.clone());
        pair.index = i;
        pair.upstream = Some(fd);
        pair.connecting_since = Some(started);
        conn.deadline_ms = io.now_ms + ups.connect_timeout_ms;
        return Step::Idle;
    }
}

/// The connection's deadline passed: a connect that has not completed has timed out.
pub fn on_deadline(conn: &mut Conn, io: &mut Io<'_>, ctx: &mut Ctx<'_>) -> Step {
    let Some(pair) = conn.relay.as_deref_mut() else {
        return Step::Close(CloseReason::Error);
    };
    if pair.connecting_since.is_none() {
        return Step::Idle;
    }
    let err = io::Error::from(io::ErrorKind::TimedOut);
    ctx.relay
        .upstreams
        .failed(pair.index, ConnectError::Timeout, &err);
    connect_next(conn, io, ctx)
}

/// Serves a pair after an edge on either socket (`edge`), or from the ready list.
pub fn serve(conn: &mut Conn, io: &mut Io<'_>, ctx: &mut Ctx<'_>, edge: Option<Edge>) -> Step {
    let Some(pair) = conn.relay.as_deref_mut() else {
        return Step::Close(CloseReason::Error);
    };
    if let Some(edge) = edge {
        if edge.upstream && pair.connecting_since.is_some() {
            match connected(pair, &ctx.relay.upstreams) {
                Ok(()) => conn.deadline_ms = 0,
                Err(()) => return connect_next(conn, io, ctx),
            }
        }
        let Some(pair) = conn.relay.as_deref_mut() else {
            return Step::Close(CloseReason::Error);
        };
        let (h, fd) = if edge.upstream {
            (&mut pair.u2c, pair.upstream.as_ref().map(|f| f.as_fd()))
        } else {
            (&mut pair.c2u, Some(conn.fd.as_fd()))
        };
        if edge.readable || edge.hup {
            h.flags |= half::READY;
        }
        if edge.hup || edge.error {
            h.flags |= half::HUP;
        }
        if edge.error {
            // A reset shows as an error; catch it even if this direction is done
            // reading, so the other side learns of it now rather than at its next write.
            if let Some(Ok(Some(e))) = fd.map(socket::take_error) {
                return abort(conn, &e);
            }
        }
    }
    match pump_pair(conn, io) {
        Ok(step) => step,
        Err(e) => abort(conn, &e),
    }
}

/// Checks how the upstream connect ended: Ok once connected, Err (the upstream counted
/// and marked) if it failed.
fn connected(pair: &mut Pair, ups: &Upstreams) -> Result<(), ()> {
    let Some(fd) = pair.upstream.as_ref() else {
        return Err(());
    };
    match socket::take_error(fd.as_fd()) {
        Ok(None) => {
            if let Some(since) = pair.connecting_since.take() {
                ups.list[pair.index]
                    .metrics
                    .connect
                    .observe(since.elapsed().as_secs_f64());
            }
            Ok(())
        }
        Ok(Some(e)) | Err(e) => {
            ups.failed(pair.index, ConnectError::of(&e), &e);
            Err(())
        }
    }
}

/// Moves bytes both ways; closes the pair when both directions have finished.
fn pump_pair(conn: &mut Conn, io: &mut Io<'_>) -> io::Result<Step> {
    let client = conn.fd.as_fd();
    let Some(pair) = conn.relay.as_deref_mut() else {
        return Ok(Step::Close(CloseReason::Error));
    };
    let connected = pair.connecting_since.is_none();
    let upstream = pair
        .upstream
        .as_ref()
        .map(|f| f.as_fd())
        .filter(|_| connected);
    let mut moved = false;
    let mut again = pump(
        &mut pair.c2u,
        client,
        upstream,
        Dir::ToUpstream,
        io,
        &mut moved,
    )?;
    if let Some(up) = upstream {
        again |= pump(
            &mut pair.u2c,
            up,
            Some(client),
            Dir::ToClient,
            io,
            &mut moved,
        )?;
    }
    if moved {
        conn.last_active_ms = io.now_ms;
    }
    if pair.c2u.is_done() && pair.u2c.is_done() {
        return Ok(Step::Close(CloseReason::Eof));
    }
    Ok(if again { Step::Again } else { Step::Idle })
}

/// Ends a pair on an error: both sockets are closed with a reset.
fn abort(conn: &mut Conn, err: &io::Error) -> Step {
    tracing::debug!("relayed pair aborted: {err}");
    let _ = socket::set_linger_zero(conn.fd.as_fd());
    if let Some(up) = conn.relay.as_ref().and_then(|p| p.upstream.as_ref()) {
        let _ = socket::set_linger_zero(up.as_fd());
    }
    Step::Close(CloseReason::of_error(err))
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
    io: &mut Io<'_>,
    moved: &mut bool,
) -> io::Result<bool> {
    if let Some(dst) = dst {
        flush(h, dst, dir, io, moved)?;
    }
    if h.has(half::EOF) {
        h.forward_fin(dst)?;
        return Ok(false);
    }
    if !h.has(half::READY) {
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
            room(owed, io)
        };
        if room == 0 {
            // Rule 3: the source's input stays queued (READY stays set) until the
            // destination drains.
            if !h.has(half::PAUSED) {
                h.flags |= half::PAUSED;
                io.counters.pauses += 1;
            }
            return Ok(false);
        }
        h.flags &= !half::PAUSED;
        let want = room.min(budget).min(io.buf.len());
        let spliced = match (splicing, h.pipe.as_ref(), dst) {
            (true, Some(pipe), Some(dst)) => {
                Some(splice_once(&mut h.in_pipe, pipe, src, dst, want, dir, io))
            }
            _ => None,
        };
        let result = match spliced {
            Some(r) => r,
            None => copy_once(h, src, dst, want, dir, io),
        };
        match result {
            Ok(0) => {
                h.flags |= half::EOF;
                h.flags &= !half::READY;
                h.forward_fin(dst)?;
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
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                h.flags &= !half::READY;
                return Ok(false);
            }
            Err(e) if splicing && e.raw_os_error() == Some(libc::EINVAL) => {
                // This pair of descriptors cannot splice: copy from now on.
                tracing::debug!("splice: {e}; relaying this direction by copying");
                h.pipe = None;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Writes what the destination is owed: copied bytes first, then the pipe.
fn flush(
    h: &mut Half,
    dst: BorrowedFd<'_>,
    dir: Dir,
    io: &mut Io<'_>,
    moved: &mut bool,
) -> io::Result<()> {
    if let Some(out) = h.pending.as_mut() {
        let n = out.flush(dst)?;
        if n > 0 {
            dir.count_written(io.counters, n);
            io.counters.global_room += n as i64;
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
                    dir.count_written(io.counters, n);
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
fn copy_once(
    h: &mut Half,
    src: BorrowedFd<'_>,
    dst: Option<BorrowedFd<'_>>,
    want: usize,
    dir: Dir,
    io: &mut Io<'_>,
) -> io::Result<usize> {
    let n = socket::read(src, &mut io.buf[..want])?;
    if n == 0 {
        return Ok(0);
    }
    dir.count_read(io.counters, n);
    let data = &io.buf[..n];
    let written = match (dst, h.pending.as_mut()) {
        (Some(dst), None) => match socket::write(dst, data) {
            Ok(w) => w,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        },
        (_, Some(out)) => {
            out.push(data);
            io.counters.global_room -= n as i64;
            return Ok(n);
        }
        (None, None) => 0,
    };
    if written > 0 {
        dir.count_written(io.counters, written);
    }
    if written < n {
        h.pending = Some(Box::new(Outbound::from_slice(&data[written..])));
        io.counters.global_room -= (n - written) as i64;
        let held = h.pending();
        if held > io.counters.peak_pending {
            io.counters.peak_pending = held;
        }
    }
    Ok(n)
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
    io: &mut Io<'_>,
) -> io::Result<usize> {
    let n = splice(src, pipe.write.as_fd(), want)?;
    if n == 0 {
        return Ok(0);
    }
    dir.count_read(io.counters, n);
    *in_pipe = n as u32;
    match splice(pipe.read.as_fd(), dst, n) {
        Ok(m) => {
            *in_pipe -= m as u32;
            dir.count_written(io.counters, m);
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(e),
    }
    Ok(n)
}
