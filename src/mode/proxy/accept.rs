//! A connection's first phase with `--accept-proxy`: its PROXY header.
//!
//! The acceptor has already refused every source outside `--trusted-proxy`. The
//! worker then holds the connection in [`State::AwaitingProxy`]: no mode has seen it,
//! it is not yet counted as accepted or active, and it counts against
//! `--max-connections` but not yet against `--max-connections-per-ip` (whose address
//! the header is about to name).
//!
//! # Reading the header
//!
//! Each wake-up peeks (MSG_PEEK) at most [`inbound::MAX_LEN`] bytes and asks
//! [`inbound::read`]. Incomplete: wait for the next edge (new bytes raise one whether
//! or not earlier ones were read), so a header dribbled a byte at a time works. Once
//! it is complete, exactly its bytes are read off the socket, and whatever followed it
//! (a client's first request, sent in the same segment) stays in the kernel, where the
//! mode reads it as if the header had never been there. Peeking rather than reading
//! into a buffer of our own means a connection awaiting its header holds no memory
//! beyond its slab slot, and that a reload moves it with nothing to copy: its bytes
//! are in the socket, which moves.
//!
//! # Refusals
//!
//! A connection whose header is malformed, missing (the peer closes, resets or sends
//! something else), or not complete by `--proxy-header-timeout`, is closed and counted
//! in `edgepoll_connections_rejected_total{reason="proxy_header"}`; one whose header
//! names a client already at `--max-connections-per-ip`, in `reason="per_ip_limit"`.
//! Either way the mode never sees it, and it is never counted as accepted or closed.
//! A refusal is logged at debug level with its reason and the proxy's address.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;

use super::inbound::{self, Error};
use crate::conn::flags;
use crate::metrics::RejectReason;
use crate::mode::{Conn, Ctx, Handler, State, Step, Wake};
use crate::sys::socket;

/// Serves a connection awaiting its header; once the header is read, the mode takes
/// over within the same call ([`Handler::start`]).
pub fn serve(conn: &mut Conn, ctx: &mut Ctx<'_>, wake: Wake, handler: &mut Handler) -> Step {
    let State::AwaitingProxy { deadline_ms } = conn.state else {
        return Step::Close(crate::metrics::CloseReason::Error);
    };
    if let Wake::Timer = wake {
        if deadline_ms > ctx.now_ms {
            return Step::Idle; // the wheel fired early
        }
        return refuse(
            conn,
            "no complete PROXY header within --proxy-header-timeout",
        );
    }
    let fd = conn.fd.as_fd();
    let want = inbound::MAX_LEN.min(ctx.buf.len());
    let seen = match socket::peek(fd, &mut ctx.buf[..want]) {
        Ok(0) => return refuse(conn, "closed before sending a PROXY header"),
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Idle,
        Err(e) => return refuse_err(conn, &e),
    };
    // Header bytes are traffic: a slow proxy is not idle (`--idle-timeout`).
    conn.last_active_ms = ctx.now_ms;
    let header = match inbound::read(&ctx.buf[..seen]) {
        Ok(h) => h,
        // The peer hung up (or failed) with only part of a header sent: no more is
        // coming.
        Err(Error::Incomplete) if conn.has(flags::HUP_SEEN) => {
            return refuse(conn, "ended in the middle of its PROXY header")
        }
        Err(Error::Incomplete) => return Step::Idle,
        Err(Error::Invalid(why)) => return refuse(conn, why),
    };
    // The peeked bytes are in the socket's queue, so this read returns all of them.
    match socket::read(fd, &mut ctx.buf[..header.len]) {
        Ok(n) if n == header.len => {}
        Ok(_) => return refuse(conn, "its PROXY header vanished from the socket"),
        Err(e) => return refuse_err(conn, &e),
    }
    // The header is not the client's data: it is not counted in received bytes, so
    // that echo's and relay's byte counters still compare equal both ways.
    let peer = match socket::peer_addr(fd) {
        Ok(peer) => peer,
        Err(e) => return refuse_err(conn, &e),
    };
    // LOCAL, UNKNOWN and UNSPEC name no client: the proxy itself is the client (a
    // health check), and counts as one.
    let client = header.addrs.map_or(peer, |(src, _)| src);
    if let Some(permit) = conn.permit.as_mut() {
        if let Err(reason) = permit.attribute(client, header.addrs.is_some()) {
            tracing::debug!(
                proxy = %peer,
                %client,
                "PROXY header names a client over --max-connections-per-ip; closing"
            );
            return Step::Reject(reason);
        }
    }
    tracing::debug!(
        proxy = %peer,
        %client,
        version = header.version,
        "PROXY header accepted"
    );
    handler.start(conn, ctx, header.addrs)
}

fn refuse(conn: &Conn, why: &str) -> Step {
    tracing::debug!(
        proxy = %peer_of(conn),
        "PROXY header refused: {why}; closing"
    );
    Step::Reject(RejectReason::ProxyHeader)
}

fn refuse_err(conn: &Conn, err: &io::Error) -> Step {
    tracing::debug!(
        proxy = %peer_of(conn),
        "awaiting a PROXY header: {err}; closing"
    );
    Step::Reject(RejectReason::ProxyHeader)
}

/// The proxy's address for a log line (evaluated only when debug logging is on).
fn peer_of(conn: &Conn) -> String {
    socket::peer_addr(conn.fd.as_fd())
        .map(|a: SocketAddr| a.to_string())
        .unwrap_or_else(|_| "(gone)".to_string())
}
