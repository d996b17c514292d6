//! Connections: the per-worker slab, tokens with generations, and the outbound buffer.
//!
//! An idle connection costs a slab slot (`Slot`, at most 128 bytes on x86-64 with
//! the largest inline mode state) and at most one timer entry (8 bytes). Its outbound
//! buffer exists only while a short write has left bytes behind.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::limits::ConnPermit;
use crate::sys::socket;

/// Identifies a registration in a worker's epoll: slot index in the low 32 bits,
/// the slot's generation in the next 31, and in the top bit the side of a relayed
/// pair (0: the client socket, 1: its upstream socket). A slot's generation changes
/// every time it is freed, so an event still queued for a closed connection cannot
/// reach the connection that reuses its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token(pub u64);

impl Token {
    /// The worker's own wake-up eventfd. Slot indexes never reach it, because a
    /// slab never grows past `u32::MAX - 1` slots.
    pub const WAKE: Token = Token(u64::MAX);

    const UPSTREAM: u64 = 1 << 63;

    fn new(index: u32, generation: u32) -> Token {
        Token(((generation as u64) << 32) | index as u64)
    }

    fn index(self) -> usize {
        (self.0 & 0xffff_ffff) as usize
    }

    /// The slab slot this token names: a dense index, for tables kept beside the slab.
    #[inline]
    pub fn slot(self) -> usize {
        self.index()
    }

    fn generation(self) -> u32 {
        (self.0 >> 32) as u32 & GENERATION_MASK
    }

    /// The token of the upstream socket paired with this (client) connection.
    #[inline]
    pub fn upstream(self) -> Token {
        Token(self.0 | Token::UPSTREAM)
    }

    /// Whether this token names the upstream side of a pair.
    #[inline]
    pub fn is_upstream(self) -> bool {
        self.0 & Token::UPSTREAM != 0 && self != Token::WAKE
    }

    /// The token of the connection itself (its client side).
    #[inline]
    pub fn client(self) -> Token {
        Token(self.0 & !Token::UPSTREAM)
    }
}

/// Generations use 31 bits; the top bit of a token is the side of a pair.
const GENERATION_MASK: u32 = 0x7fff_ffff;

/// State bits of a connection.
pub mod flags {
    /// The peer sent FIN: no more input will come.
    pub const PEER_FIN: u16 = 1 << 0;
    /// Reading stopped before EAGAIN (budget or cap), so input may be queued in the
    /// kernel with no edge left to announce it: the worker must come back by itself.
    pub const READ_PENDING: u16 = 1 << 1;
    /// The connection is on the worker's ready list.
    pub const IN_READY: u16 = 1 << 2;
    /// Reading is paused because the outbound buffer is at its cap.
    pub const PAUSED: u16 = 1 << 3;
    /// The server is draining: the connection is served until its input is caught up.
    pub const DRAINING: u16 = 1 << 4;
    /// No more input will be served (peer FIN, or draining caught up).
    pub const INPUT_DONE: u16 = 1 << 5;
    /// We sent FIN (draining): further input is read and discarded until the peer
    /// closes, so that close(2) never turns into a RST that destroys unsent data.
    pub const WRITE_SHUT: u16 = 1 << 6;
    /// An event reported EPOLLRDHUP, EPOLLHUP or EPOLLERR. From then on a short read
    /// no longer means "drained": the FIN or error behind the data has had its only
    /// edge already, so reading goes on until it returns 0 or the error.
    pub const HUP_SEEN: u16 = 1 << 7;
    /// The connection is closing because the peer broke the protocol (an HTTP error
    /// response was sent): its close counts as `protocol_error`.
    pub const PROTO_ERROR: u16 = 1 << 8;
    /// The connection is closing because a request head took longer than the header
    /// timeout (a 408 was sent): its close counts as `header_timeout`.
    pub const TIMED_OUT: u16 = 1 << 9;
}

/// One client connection, owned by one worker. `S` is the protocol state a mode keeps
/// for it (see `mode::State`); this module knows nothing about modes.
#[derive(Debug)]
pub struct Conn<S> {
    /// The socket; closing it also removes it from the worker's epoll.
    pub fd: OwnedFd,
    /// Bytes owed to the peer that a short write left behind; None when nothing is owed.
    pub outbound: Option<Box<Outbound>>,
    /// Worker clock (ms) at accept, for the connection duration histogram.
    pub opened_ms: u64,
    /// Worker clock (ms) of the last byte read or written, for the idle timeout.
    pub last_active_ms: u64,
    /// Worker clock (ms) at which a lingering close (after our FIN) gives up waiting for
    /// the peer's; 0 for none.
    pub linger_until_ms: u64,
    /// The tick of this connection's one timer-wheel entry, plus one; 0 when it has
    /// none. Kept by [`crate::timer::TimerWheel`].
    pub timer: u64,
    /// This connection's share of the connection limits, given back on drop.
    pub permit: Option<ConnPermit>,
    /// Bits from [`flags`].
    pub flags: u16,
    /// What the mode keeps between events.
    pub state: S,
}

impl<S> Conn<S> {
    pub fn new(fd: OwnedFd, now_ms: u64, permit: Option<ConnPermit>, state: S) -> Conn<S> {
        Conn {
            fd,
            outbound: None,
            opened_ms: now_ms,
            last_active_ms: now_ms,
            linger_until_ms: 0,
            timer: 0,
            permit,
            flags: 0,
            state,
        }
    }

    #[inline]
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    #[inline]
    pub fn set(&mut self, flag: u16) {
        self.flags |= flag;
    }

    #[inline]
    pub fn clear(&mut self, flag: u16) {
        self.flags &= !flag;
    }

    /// Bytes owed to the client in the outbound buffer.
    #[inline]
    pub fn outbound_len(&self) -> usize {
        self.outbound.as_ref().map_or(0, |o| o.len())
    }

    /// Writes as much of the outbound buffer as the socket takes, and frees the buffer
    /// once it is empty. Returns the bytes written.
    pub fn flush(&mut self) -> io::Result<usize> {
        let Some(out) = self.outbound.as_mut() else {
            return Ok(0);
        };
        let written = out.flush(self.fd.as_fd())?;
        if out.is_empty() {
            self.outbound = None;
        }
        Ok(written)
    }

    /// Sends `data`: straight to the socket when nothing is queued before it, and what
    /// the socket does not take into the outbound buffer. Returns bytes written now.
    /// The caller keeps what it sends within its cap.
    #[inline]
    pub fn send(&mut self, data: &[u8]) -> io::Result<usize> {
        if let Some(out) = self.outbound.as_mut() {
            out.push(data);
            return Ok(0);
        }
        let written = match socket::write(self.fd.as_fd(), data) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        if written < data.len() {
            self.outbound = Some(Box::new(Outbound::from_slice(&data[written..])));
        }
        Ok(written)
    }
}

/// Bytes owed to a peer, in order. A plain vector with a read position: pushes append,
/// flushes advance the position, and the consumed front is reclaimed by moving the
/// rest down once it is at least half the buffer (each byte moves at most once on
/// average).
#[derive(Debug)]
pub struct Outbound {
    buf: Vec<u8>,
    pos: usize,
}

impl Outbound {
    pub fn from_slice(data: &[u8]) -> Outbound {
        Outbound::from_vec(data.to_vec())
    }

    /// Bytes already in a vector, owed in full.
    pub fn from_vec(buf: Vec<u8>) -> Outbound {
        Outbound { buf, pos: 0 }
    }

    /// Bytes not yet written.
    #[inline]
    pub fn len(&self) -> usize {
        self.buf.len() - self.pos
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends bytes after everything already owed.
    pub fn push(&mut self, data: &[u8]) {
        if self.pos > 0 && self.pos >= self.buf.len() / 2 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The bytes not yet written.
    pub fn as_slice(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// Marks `n` bytes as written.
    pub fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len());
        self.pos += n;
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
    }

    /// Writes until empty or until the socket stops taking bytes (a short write or
    /// EAGAIN). Returns the bytes written; errors other than EAGAIN are returned.
    pub fn flush(&mut self, fd: BorrowedFd<'_>) -> io::Result<usize> {
        let mut total = 0;
        while !self.is_empty() {
            let want = self.len();
            match socket::write(fd, self.as_slice()) {
                Ok(n) => {
                    self.consume(n);
                    total += n;
                    if n < want {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(total)
    }
}

/// A generation-checked slab of connections: O(1) insert, lookup and removal, slots
/// reused through a free list.
#[derive(Debug)]
pub struct Slab<T> {
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
    len: usize,
}

#[derive(Debug)]
struct Slot<T> {
    generation: u32,
    conn: Option<T>,
}

impl<T> Default for Slab<T> {
    fn default() -> Slab<T> {
        Slab {
            slots: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Slab<T> {
    pub fn new() -> Slab<T> {
        Slab::default()
    }

    /// Number of live connections.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Stores a connection and returns the token its events will carry.
    pub fn insert(&mut self, conn: T) -> Token {
        self.len += 1;
        if let Some(index) = self.free.pop() {
            let slot = &mut self.slots[index as usize];
            debug_assert!(slot.conn.is_none());
            slot.conn = Some(conn);
            return Token::new(index, slot.generation);
        }
        let index = self.slots.len();
        assert!(index < u32::MAX as usize, "connection slab is full");
        self.slots.push(Slot {
            generation: 0,
            conn: Some(conn),
        });
        Token::new(index as u32, 0)
    }

    /// The connection `token` names, if it is still the one that token was issued for.
    #[inline]
    pub fn get_mut(&mut self, token: Token) -> Option<&mut T> {
        let slot = self.slots.get_mut(token.index())?;
        if slot.generation != token.generation() {
            return None;
        }
        slot.conn.as_mut()
    }

    /// Removes the connection `token` names; its slot gets a new generation.
    pub fn remove(&mut self, token: Token) -> Option<T> {
        let slot = self.slots.get_mut(token.index())?;
        if slot.generation != token.generation() {
            return None;
        }
        let conn = slot.conn.take()?;
        slot.generation = slot.generation.wrapping_add(1) & GENERATION_MASK;
        self.free.push(token.index() as u32);
        self.len -= 1;
        Some(conn)
    }

    /// Tokens of every live connection.
    pub fn tokens(&self) -> Vec<Token> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.conn.is_some())
            .map(|(i, s)| Token::new(i as u32, s.generation))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dummy_fd() -> OwnedFd {
        let file = std::fs::File::open("/dev/null").unwrap();
        OwnedFd::from(file)
    }

    #[test]
    fn a_stale_token_does_not_reach_the_connection_that_reuses_its_slot() {
        let mut slab: Slab<Conn<()>> = Slab::new();
        let a = slab.insert(Conn::new(dummy_fd(), 0, None, ()));
        assert!(slab.remove(a).is_some());
        let b = slab.insert(Conn::new(dummy_fd(), 1, None, ()));
        assert_eq!(a.index(), b.index(), "the slot is reused");
        assert!(slab.get_mut(a).is_none());
        assert!(slab.remove(a).is_none());
        assert_eq!(slab.get_mut(b).unwrap().opened_ms, 1);
        assert_eq!(slab.len(), 1);
        assert_eq!(slab.tokens(), vec![b]);
    }

    #[test]
    fn upstream_tokens_name_the_same_slot_and_wrap_generations() {
        let mut slab: Slab<Conn<()>> = Slab::new();
        let a = slab.insert(Conn::new(dummy_fd(), 0, None, ()));
        assert!(!a.is_upstream());
        let up = a.upstream();
        assert!(up.is_upstream());
        assert_eq!(up.client(), a);
        assert!(!Token::WAKE.is_upstream());
        // Force the generation to its last value and free the slot: it wraps to 0
        // without touching the side bit.
        slab.slots[0].generation = GENERATION_MASK;
        let b = Token::new(0, GENERATION_MASK);
        assert!(slab.remove(b).is_some());
        assert_eq!(slab.slots[0].generation, 0);
        let c = slab.insert(Conn::new(dummy_fd(), 0, None, ()));
        assert!(!c.is_upstream());
        assert_eq!(c.generation(), 0);
    }

    #[test]
    fn outbound_keeps_order_across_pushes_and_partial_consumes() {
        let mut out = Outbound::from_slice(b"abcdef");
        out.consume(4);
        out.push(b"ghij");
        assert_eq!(out.as_slice(), b"efghij");
        out.consume(6);
        assert!(out.is_empty());
        out.push(b"k");
        assert_eq!(out.as_slice(), b"k");
    }
}
