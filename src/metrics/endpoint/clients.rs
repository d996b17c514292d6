//! The endpoint's clients: each one's exchange as a small state machine, and the set of
//! them with their deadlines, which is also the order in which they are evicted.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Instant;

use super::routes::{text, Routes};
use super::MAX_REQUEST_BYTES;
use crate::sys::epoll::{Epoll, SOCKET_INTEREST};
use crate::sys::socket;

/// What a client may send after its request while the lingering close waits for its
/// FIN. A scrape sends nothing more; past this the client is closed without waiting.
const LINGER_BYTES: usize = 64 * 1024;

/// The open clients: a slab indexed by token, and their deadlines in order.
#[derive(Default)]
pub(super) struct Clients {
    slots: Vec<Slot>,
    /// Indexes of empty slots.
    free: Vec<usize>,
    /// (deadline, token) of every open client, soonest first: the timer, and the
    /// eviction order (deadlines are accept times plus a constant, so soonest is oldest).
    deadlines: BTreeSet<(Instant, u64)>,
}

#[derive(Default)]
struct Slot {
    /// Bumped each time the slot is emptied, so that an event still queued for the
    /// client that held it is not taken for its successor's.
    generation: u32,
    client: Option<Client>,
}

impl Clients {
    pub(super) fn len(&self) -> usize {
        self.deadlines.len()
    }

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|&(t, _)| t)
    }

    pub(super) fn insert(
        &mut self,
        epoll: &Epoll,
        fd: OwnedFd,
        deadline: Instant,
    ) -> io::Result<()> {
        let index = self.free.pop().unwrap_or_else(|| {
            self.slots.push(Slot::default());
            self.slots.len() - 1
        });
        let slot = &mut self.slots[index];
        let token = u64::from(slot.generation) << 32 | index as u64;
        // Registered once, with every interest: a client moves from reading to
        // writing to reading again with no epoll_ctl.
        if let Err(e) = epoll.add(fd.as_fd(), token, SOCKET_INTEREST) {
            self.free.push(index);
            return Err(e);
        }
        slot.client = Some(Client {
            fd,
            token,
            deadline,
            phase: Phase::Request(Vec::new()),
        });
        self.deadlines.insert((deadline, token));
        Ok(())
    }

    /// The client `token` names, unless it has been closed since the event was queued.
    fn get_mut(&mut self, token: u64) -> Option<&mut Client> {
        let slot = self.slots.get_mut(slot_of(token))?;
        slot.client.as_mut().filter(|c| c.token == token)
    }

    /// Closes a client: dropping its descriptor also removes it from the epoll set.
    fn remove(&mut self, token: u64) {
        let index = slot_of(token);
        let Some(slot) = self.slots.get_mut(index) else {
            return;
        };
        if let Some(client) = slot.client.take_if(|c| c.token == token) {
            self.deadlines.remove(&(client.deadline, token));
            slot.generation = slot.generation.wrapping_add(1);
            self.free.push(index);
        }
    }

    pub(super) fn advance(&mut self, token: u64, scratch: &mut [u8], routes: &Routes) {
        let Some(client) = self.get_mut(token) else {
            // Closed earlier in this batch of events (expired or evicted); the event
            // belongs to a descriptor that no longer exists.
            return;
        };
        if client.advance(scratch, &|method, path| routes.answer(method, path)) == Step::Close {
            self.remove(token);
        }
    }

    /// Closes every client whose deadline has passed, with 408 to one still sending
    /// its request.
    pub(super) fn expire(&mut self, now: Instant) {
        while let Some(&(deadline, token)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            if let Some(client) = self.get_mut(token) {
                client.refuse(408, b"request timeout\n");
            }
            self.remove(token);
        }
    }

    /// Makes room: closes the oldest client not owed a response, or failing that the
    /// oldest of all. One cut off before its request is complete gets 503.
    pub(super) fn evict(&mut self) {
        let owed = |c: &Client| matches!(c.phase, Phase::Response { .. });
        let victim = self
            .deadlines
            .iter()
            .map(|&(_, token)| token)
            .find(|&t| {
                self.slots[slot_of(t)]
                    .client
                    .as_ref()
                    .is_some_and(|c| !owed(c))
            })
            .or_else(|| self.deadlines.first().map(|&(_, t)| t));
        if let Some(token) = victim {
            if let Some(client) = self.get_mut(token) {
                client.refuse(503, b"busy\n");
            }
            self.remove(token);
        }
    }
}

/// A token is the slot's generation in the high 32 bits and its index in the low 32.
fn slot_of(token: u64) -> usize {
    (token & u64::from(u32::MAX)) as usize
}

/// One connection to the endpoint.
struct Client {
    fd: OwnedFd,
    token: u64,
    /// Accept time plus [`CLIENT_TIMEOUT`](super::CLIENT_TIMEOUT); nothing the client does moves it.
    deadline: Instant,
    phase: Phase,
}

/// Where a client is in its one exchange.
enum Phase {
    /// Receiving the request head: the bytes so far, at most [`MAX_REQUEST_BYTES`].
    Request(Vec<u8>),
    /// Sending the response: all of it, and how much has gone.
    Response { out: Vec<u8>, sent: usize },
    /// Answered and write side shut: dropping what the client still sends (`dropped`
    /// bytes so far) until its FIN.
    Linger { dropped: usize },
}

/// What the loop does with a client after driving it.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Wait for its next event (or its deadline).
    Wait,
    /// Close it.
    Close,
}

/// What a complete request head is answered with: the bytes of the whole response,
/// given the method and path.
type Answer<'a> = dyn Fn(&str, &str) -> Vec<u8> + 'a;

impl Client {
    /// Does everything the socket allows now, moving through the phases; edge-
    /// triggered, so each phase reads or writes until EAGAIN before it waits.
    fn advance(&mut self, scratch: &mut [u8], answer: &Answer<'_>) -> Step {
        loop {
            match &mut self.phase {
                Phase::Request(head) => match read_request(self.fd.as_fd(), head, scratch) {
                    Ok(Some(request)) => {
                        let out = match request {
                            Request::Complete { method, path } => answer(&method, &path),
                            Request::Malformed => text(400, b"malformed request\n"),
                            Request::TooLarge => text(400, b"request too large\n"),
                        };
                        self.phase = Phase::Response { out, sent: 0 };
                    }
                    Ok(None) => return Step::Wait,
                    Err(_) => return Step::Close,
                },
                Phase::Response { out, sent } => {
                    while *sent < out.len() {
                        match socket::write(self.fd.as_fd(), &out[*sent..]) {
                            Ok(n) => *sent += n,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Wait,
                            Err(_) => return Step::Close,
                        }
                    }
                    if socket::shutdown_write(self.fd.as_fd()).is_err() {
                        return Step::Close;
                    }
                    // The request phase may have stopped reading before EAGAIN, so no
                    // edge will announce what is already queued: read it now.
                    self.phase = Phase::Linger { dropped: 0 };
                }
                Phase::Linger { dropped } => loop {
                    match socket::read(self.fd.as_fd(), scratch) {
                        Ok(0) => return Step::Close,
                        Ok(n) if *dropped + n > LINGER_BYTES => return Step::Close,
                        Ok(n) => *dropped += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Wait,
                        Err(_) => return Step::Close,
                    }
                },
            }
        }
    }

    /// Best effort, for a client about to be closed: an error response if it is still
    /// sending its request, in one non-blocking write (a few dozen bytes always fit in
    /// an empty send buffer).
    fn refuse(&mut self, status: u16, body: &[u8]) {
        if let Phase::Request(_) = self.phase {
            let _ = socket::write(self.fd.as_fd(), &text(status, body));
        }
    }
}

/// A request head, once there is enough of it to answer.
enum Request {
    Complete { method: String, path: String },
    Malformed,
    TooLarge,
}

/// Reads until EAGAIN (Ok(None)), a complete or bad head (Ok(Some)), or EOF or an
/// error (Err: the client is gone or gave up, and gets nothing).
fn read_request(
    fd: BorrowedFd<'_>,
    head: &mut Vec<u8>,
    scratch: &mut [u8],
) -> io::Result<Option<Request>> {
    loop {
        let room = MAX_REQUEST_BYTES - head.len();
        if room == 0 {
            return Ok(Some(Request::TooLarge));
        }
        let room = room.min(scratch.len());
        let n = match socket::read(fd, &mut scratch[..room]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(e),
        };
        // Grow to the next power of two, never past the cap: a client that trickles
        // bytes costs what it sent, not a whole buffer.
        let want = (head.len() + n).next_power_of_two().min(MAX_REQUEST_BYTES);
        head.reserve_exact(want.saturating_sub(head.len()));
        head.extend_from_slice(&scratch[..n]);
        // A head can only end at a newline: parse when one arrives, not on every byte
        // of a trickling client.
        if scratch[..n].contains(&b'\n') {
            if let Some(request) = parse(head) {
                return Ok(Some(request));
            }
        }
    }
}

/// None while the head is incomplete.
fn parse(head: &[u8]) -> Option<Request> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Partial) => None,
        Ok(httparse::Status::Complete(_)) => Some(Request::Complete {
            method: req.method.unwrap_or("").to_string(),
            path: req.path.unwrap_or("").to_string(),
        }),
        Err(_) => Some(Request::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    use super::*;
    use crate::sys::epoll::Events;

    /// The server's end of a loopback connection, and the client's.
    fn pair() -> (OwnedFd, TcpStream) {
        let listener = socket::listen("127.0.0.1:0".parse().unwrap(), 4).unwrap();
        let peer = TcpStream::connect(socket::local_addr(listener.as_fd()).unwrap()).unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let (fd, _) = loop {
            match socket::accept(listener.as_fd()) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                r => break r.unwrap(),
            }
        };
        (fd, peer)
    }

    fn byte(i: usize) -> u8 {
        (i % 251) as u8
    }

    #[test]
    fn a_response_larger_than_the_socket_buffers_goes_out_on_later_edges() {
        // Twice the kernel's largest send and receive buffers together (4 MiB and 6 MiB
        // by default), so the first write pass must stop at EAGAIN.
        let most = |path: &str| -> usize {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let last = text.split_whitespace().last().and_then(|v| v.parse().ok());
            last.unwrap_or(8 << 20)
        };
        let len = 2 * (most("/proc/sys/net/ipv4/tcp_wmem") + most("/proc/sys/net/ipv4/tcp_rmem"));
        let (fd, mut peer) = pair();
        let epoll = Epoll::new().unwrap();
        epoll.add(fd.as_fd(), 7, SOCKET_INTEREST).unwrap();
        let mut client = Client {
            fd,
            token: 7,
            deadline: Instant::now(),
            phase: Phase::Response {
                out: (0..len).map(byte).collect(),
                sent: 0,
            },
        };
        let mut scratch = [0u8; 512];
        let answer = |_: &str, _: &str| unreachable!("the request is already answered");
        assert_eq!(client.advance(&mut scratch, &answer), Step::Wait);

        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            peer.read_to_end(&mut got).unwrap();
            got
        });
        let mut events = Events::with_capacity(4);
        let start = Instant::now();
        loop {
            assert!(start.elapsed() < Duration::from_secs(60), "never finished");
            epoll
                .wait(&mut events, Some(Duration::from_secs(1)))
                .unwrap();
            if !events.is_empty() && client.advance(&mut scratch, &answer) == Step::Close {
                break;
            }
        }
        let got = reader.join().unwrap();
        assert_eq!(got.len(), len);
        assert!(got.iter().enumerate().all(|(i, &b)| b == byte(i)));
    }

    #[test]
    fn eviction_takes_the_oldest_client_not_owed_a_response() {
        let epoll = Epoll::new().unwrap();
        let mut clients = Clients::default();
        let t0 = Instant::now();
        let mut peers = Vec::new();
        for i in 0..3 {
            let (fd, peer) = pair();
            clients
                .insert(&epoll, fd, t0 + Duration::from_secs(i))
                .unwrap();
            peers.push(peer);
        }
        let tokens: Vec<u64> = clients.deadlines.iter().map(|&(_, t)| t).collect();
        // Oldest: owed a response. Next: still sending its request. Newest: answered.
        clients.get_mut(tokens[0]).unwrap().phase = Phase::Response {
            out: b"x".to_vec(),
            sent: 0,
        };
        clients.get_mut(tokens[2]).unwrap().phase = Phase::Linger { dropped: 0 };

        clients.evict();
        assert!(clients.get_mut(tokens[1]).is_none());
        let mut refused = String::new();
        peers[1].read_to_string(&mut refused).unwrap();
        assert!(refused.starts_with("HTTP/1.1 503 "), "{refused}");

        clients.evict();
        assert!(clients.get_mut(tokens[2]).is_none());
        assert!(clients.get_mut(tokens[0]).is_some());
        // Only clients owed a response are left: the oldest of them goes.
        clients.evict();
        assert_eq!(clients.len(), 0);

        // A reused slot has a new generation, so the old tokens find nothing.
        let (fd, _peer) = pair();
        clients.insert(&epoll, fd, t0).unwrap();
        assert!(tokens.iter().all(|&t| clients.get_mut(t).is_none()));
        assert_eq!(clients.len(), 1);
    }

    #[test]
    fn a_head_is_held_in_no_more_than_the_cap() {
        let (fd, mut peer) = pair();
        let mut head = Vec::new();
        let mut scratch = vec![0u8; MAX_REQUEST_BYTES];
        peer.write_all(b"GET /metrics HTTP/1.1\r\nX: ").unwrap();
        peer.write_all(&[b'a'; MAX_REQUEST_BYTES]).unwrap();
        let start = Instant::now();
        let request = loop {
            assert!(start.elapsed() < Duration::from_secs(20));
            if let Some(r) = read_request(fd.as_fd(), &mut head, &mut scratch).unwrap() {
                break r;
            }
        };
        assert!(matches!(request, Request::TooLarge));
        assert_eq!(head.len(), MAX_REQUEST_BYTES);
        assert!(head.capacity() <= MAX_REQUEST_BYTES, "{}", head.capacity());
    }
}
