//! A connection on its way to another process (a reload): its descriptors, and its
//! state as bytes (`crate::handover::wire`). Everything a peer is owed or has sent
//! moves with it: the outbound buffer, unanswered input, relay buffers and pipes,
//! half-close flags and the time left on its deadlines. Bytes still in the kernel's
//! socket queues need no moving: the sockets themselves move.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use super::{http, relay, Conn, Handler, State};
use crate::conn::{flags, Outbound};
use crate::handover::wire::{Reader, WireError, Writer};

/// A connection taken out of a worker, ready to be sent.
#[derive(Debug)]
pub struct Moved {
    /// The client socket first, then the mode's own (a relay's upstream and pipes).
    pub fds: Vec<OwnedFd>,
    pub state: Vec<u8>,
    /// What the access log had counted of it, for a failed reload that gives it back
    /// to this process (`Server::resume`). Never sent: the next process counts the
    /// connection from its arrival, and [`Server::adopt`](crate::Server::adopt)
    /// drops it.
    pub log: Option<crate::access_log::Carried>,
}

/// Mode tags of the encoding.
const ECHO: u8 = 0;
const HTTP: u8 = 1;
const RELAY: u8 = 2;
/// A connection still awaiting its PROXY header, in any mode: only the time left on
/// its header deadline moves (its bytes are in the socket).
const AWAITING_PROXY: u8 = 3;

/// Tag of the optional part after the mode's: the client a PROXY header named,
/// `IP:PORT`, so the next process counts the connection as that client's.
///
/// Neither this part nor [`AWAITING_PROXY`] changes what an older binary wrote or
/// reads: both are written only for connections that went through `--accept-proxy`,
/// which an older binary cannot be configured with (its configuration would not
/// parse, and the reload fails before any connection moves). So the encoding keeps
/// its protocol version ([`crate::handover::PROTOCOL`]), and an upgrade from a binary
/// without `--accept-proxy` moves every connection as before.
const PROXIED_CLIENT: u8 = 1;

/// Flags that describe the peer and the stream, which move; the others describe this
/// worker's lists and are set anew by the receiving worker.
const MOVING_FLAGS: u16 = flags::PEER_FIN
    | flags::PAUSED
    | flags::INPUT_DONE
    | flags::WRITE_SHUT
    | flags::HUP_SEEN
    | flags::PROTO_ERROR
    | flags::TIMED_OUT
    | flags::DRAINING;

impl Handler {
    /// Takes `conn` apart for a hand-over. Its timer entry must already be disarmed;
    /// its permit is given back here (the receiving process counts it anew).
    pub fn export(&self, mut conn: Conn, now_ms: u64) -> Moved {
        let mut w = Writer::default();
        let mut fds = Vec::with_capacity(2);
        let tag = match conn.state {
            State::Echo => ECHO,
            State::Http(_) => HTTP,
            State::Relay(_) => RELAY,
            State::AwaitingProxy { .. } => AWAITING_PROXY,
        };
        w.u8(tag)
            .u16(conn.flags & MOVING_FLAGS)
            .bytes(conn.outbound.as_ref().map_or(&[][..], |o| o.as_slice()))
            .u64(now_ms.saturating_sub(conn.opened_ms))
            .u64(now_ms.saturating_sub(conn.last_active_ms))
            .u64(relay::time_left(conn.linger_until_ms, now_ms));
        match (&mut conn.state, self) {
            (State::Http(h), _) => h.export(&mut w, now_ms),
            (State::AwaitingProxy { deadline_ms }, _) => {
                w.u64(relay::time_left(*deadline_ms, now_ms));
            }
            (State::Relay(pair), Handler::Relay(_)) => {
                // The client socket goes first; the pair's own follow.
                let mut own = Vec::new();
                pair.export(&mut w, &mut own, now_ms);
                fds.extend(own);
            }
            _ => {}
        }
        if let Some(client) = conn.permit.as_ref().and_then(|p| p.proxied_client()) {
            w.u8(PROXIED_CLIENT).str(&client.to_string());
        }
        let Conn { fd, permit, .. } = conn;
        drop(permit);
        fds.insert(0, fd);
        Moved {
            fds,
            state: w.buf,
            log: None,
        }
    }

    /// Rebuilds a connection written by [`Handler::export`] (by this version of
    /// edgepoll, in any mode's process of the same mode), without its permit, which
    /// the caller takes for it; with the client a PROXY header named, if one did.
    pub fn import(
        &self,
        moved: Moved,
        now_ms: u64,
    ) -> Result<(Conn, Option<SocketAddr>), WireError> {
        let mut fds = moved.fds.into_iter();
        let fd = fds
            .next()
            .ok_or(WireError("a connection without its socket"))?;
        let mut r = Reader::new(&moved.state);
        let tag = r.u8()?;
        let moved_flags = r.u16()? & MOVING_FLAGS;
        let outbound = r.bytes()?;
        let age = r.u64()?;
        let idle = r.u64()?;
        let linger_left = r.u64()?;
        let state = match (tag, self) {
            (ECHO, Handler::Echo) => State::Echo,
            (HTTP, Handler::Http(_)) => State::Http(http::State::import(&mut r, now_ms)?),
            (RELAY, Handler::Relay(relay)) => State::Relay(Box::new(relay::Pair::import(
                &mut r, &mut fds, relay, now_ms,
            )?)),
            (AWAITING_PROXY, _) => State::AwaitingProxy {
                deadline_ms: relay::deadline_in(r.u64()?, now_ms),
            },
            _ => return Err(WireError("a connection of another mode")),
        };
        let proxied = if r.is_empty() {
            None
        } else if r.u8()? == PROXIED_CLIENT {
            let addr = r.str()?;
            Some(
                addr.parse::<SocketAddr>()
                    .map_err(|_| WireError("a proxied client that is not IP:PORT"))?,
            )
        } else {
            return Err(WireError("an unknown part after the mode's"));
        };
        if !r.is_empty() || fds.next().is_some() {
            return Err(WireError("more in a connection than its mode wrote"));
        }
        let mut conn = Conn::new(fd, now_ms, None, state);
        conn.opened_ms = now_ms.saturating_sub(age);
        conn.last_active_ms = now_ms.saturating_sub(idle);
        conn.linger_until_ms = relay::deadline_in(linger_left, now_ms);
        // Input may have arrived during the move, with its edge spent on the other
        // process: read without waiting for one.
        conn.flags = moved_flags | flags::READ_PENDING;
        if !outbound.is_empty() {
            conn.outbound = Some(Box::new(Outbound::from_slice(outbound)));
        }
        Ok((conn, proxied))
    }
}
