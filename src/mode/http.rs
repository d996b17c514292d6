//! HTTP mode: the same fixed HTTP/1.1 response to every request, as fast as the kernel
//! allows, and a correct error for every malformed or hostile request.
//!
//! [`Responder::feed`] is the whole protocol as a pure function of bytes in and bytes
//! out, so it is tested and fuzzed without sockets; [`serve`] is the socket glue.
//! Every complete request in one read is answered, in order, into the worker's batch
//! buffer, and the batch goes out in one write. A request head split across reads is
//! kept in the connection's [`Session`], allocated only while something is incomplete.

use std::io::{self, Write as _};
use std::os::fd::AsFd;
use std::time::SystemTime;

use super::{
    after_read, begin, caught_up, finish, flush_owed, pause, read_room, send, Conn, Ctx, Step,
    READ_BUDGET,
};
use crate::config::HttpConfig;
use crate::conn::flags;
use crate::handover::wire::{Reader, WireError, Writer};
use crate::http1::{bare_lf, content_length, count_token, has_token, is_chunked, Chunked};
use crate::metrics::http_index as idx;
use crate::metrics::CloseReason;
use crate::sys::socket;

/// Most headers a request may carry; more gets 431.
pub const MAX_HEADERS: usize = 64;

/// Methods answered with the fixed response; any other gets 405.
const METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"];

/// What a connection carries between reads: inline in the connection, 16 bytes.
#[derive(Debug, Default)]
pub struct State {
    /// Input not yet answered: a partial request head or chunk-size line, a body
    /// being skipped, or requests held back by backpressure. Allocated only while
    /// something is incomplete or held.
    session: Option<Box<Session>>,
    /// Worker clock (ms) by which the request head being read must be complete
    /// (`--header-timeout`); 0 while no head is due (between keep-alive requests, or
    /// while the server itself holds input back).
    pub head_deadline_ms: u64,
}

impl State {
    /// A new connection: its first request head is due by `head_deadline_ms`.
    pub fn new(head_deadline_ms: u64) -> State {
        State {
            session: None,
            head_deadline_ms,
        }
    }

    /// Requests received and held back by backpressure, unanswered: what a close now
    /// would drop.
    pub fn owed(&self) -> usize {
        self.session
            .as_ref()
            .filter(|s| s.stalled)
            .map_or(0, |s| s.pending.len())
    }

    /// Writes the session for a hand-over to another process (see
    /// `crate::handover`): input not yet answered, the body being skipped, and the
    /// header deadline. Requests that arrive with it are answered by the new process's
    /// response.
    pub fn export(&self, w: &mut Writer, now_ms: u64) {
        w.u64(super::relay::time_left(self.head_deadline_ms, now_ms));
        let Some(s) = self.session.as_ref() else {
            w.u8(0);
            return;
        };
        w.u8(1).bytes(&s.pending).u8(s.stalled as u8);
        match s.body {
            Body::None => w.u8(0).u64(0),
            Body::Length(n) => w.u8(1).u64(n),
            Body::Chunked(c) => {
                let (part, remaining) = c.to_parts();
                w.u8(2 + part).u64(remaining)
            }
        };
    }

    /// Reads a session written by [`State::export`].
    pub fn import(r: &mut Reader<'_>, now_ms: u64) -> Result<State, WireError> {
        let head_deadline_ms = super::relay::deadline_in(r.u64()?, now_ms);
        if r.u8()? == 0 {
            return Ok(State {
                session: None,
                head_deadline_ms,
            });
        }
        let pending = r.bytes()?.to_vec();
        let stalled = r.u8()? != 0;
        let body = match (r.u8()?, r.u64()?) {
            (0, _) => Body::None,
            (1, n) => Body::Length(n),
            (k, remaining) => Body::Chunked(
                Chunked::from_parts(k - 2, remaining).ok_or(WireError("unknown body state"))?,
            ),
        };
        Ok(State {
            session: Some(Box::new(Session {
                pending,
                body,
                stalled,
            })),
            head_deadline_ms,
        })
    }

    fn is_stalled(&self) -> bool {
        self.session.as_ref().is_some_and(|s| s.stalled)
    }
}

/// The parser's state between reads.
#[derive(Debug, Default)]
pub struct Session {
    /// Unconsumed input: a partial request head or chunk-size line, or requests held
    /// back by backpressure (`stalled`).
    pending: Vec<u8>,
    /// The body of the last request, being skipped.
    body: Body,
    /// `pending` starts with requests not answered for want of output room.
    stalled: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Body {
    #[default]
    None,
    Length(u64),
    Chunked(Chunked),
}

impl Session {
    /// Nothing incomplete: the session can be freed.
    pub fn is_idle(&self) -> bool {
        self.pending.is_empty() && self.body == Body::None
    }
}

/// The outcome of feeding input to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feed {
    /// Input bytes used; the rest must be fed again with more (unless `close`).
    pub consumed: usize,
    /// Close once the responses are written: the client asked, or an error was sent.
    pub close: bool,
    /// An error response was sent.
    pub error: bool,
    /// The unconsumed rest is the start of a request head (the header timeout runs).
    pub partial_head: bool,
    /// Answering stopped because the output reached the limit given: the unconsumed
    /// rest holds requests not yet answered.
    pub stalled: bool,
}

/// Builds responses; one per worker, with the fixed part built once and the Date line
/// refreshed once a second.
pub struct Responder {
    /// Status line, Server, Content-Type, Content-Length and configured headers.
    head: Vec<u8>,
    body: Vec<u8>,
    /// `Date: <IMF-fixdate>\r\n`.
    date: [u8; DATE_LINE],
    date_secs: u64,
    max_header_bytes: usize,
    /// `--header-timeout` in ms.
    pub header_timeout_ms: u64,
}

/// "Date: Sun, 06 Nov 1994 08:49:37 GMT\r\n"
const DATE_LINE: usize = 37;

impl Responder {
    pub fn new(config: &HttpConfig) -> Responder {
        let mut head = Vec::new();
        let _ = write!(
            head,
            "HTTP/1.1 {} {}\r\nServer: edgepoll\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
            config.status,
            reason(config.status),
            config.content_type,
            config.body.len()
        );
        for (name, value) in &config.headers {
            let _ = write!(head, "{name}: {value}\r\n");
        }
        let mut r = Responder {
            head,
            body: config.body.clone(),
            date: [b' '; DATE_LINE],
            date_secs: u64::MAX,
            max_header_bytes: config.max_header_bytes,
            header_timeout_ms: config.header_timeout.as_millis() as u64,
        };
        r.refresh_date(SystemTime::now());
        r
    }

    /// Rewrites the Date line if the second has changed; no allocation.
    pub fn refresh_date(&mut self, now: SystemTime) {
        let secs = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if secs == self.date_secs {
            return;
        }
        self.date_secs = secs;
        let mut line = &mut self.date[..];
        let _ = write!(line, "Date: {}\r\n", httpdate::HttpDate::from(now));
    }

    /// Answers every complete request at the front of `input`, appending responses to
    /// `out` and counting them in `counts` (indexed like `metrics::http_statuses`).
    pub fn feed(
        &self,
        session: &mut Session,
        input: &[u8],
        out: &mut Vec<u8>,
        counts: &mut [u64; 6],
    ) -> Feed {
        self.feed_within(session, input, usize::MAX, out, counts)
    }

    /// [`Responder::feed`], but no request is started once `out` holds `limit` bytes:
    /// the output owed stays within `limit` plus one response, and the rest of the
    /// input is left unconsumed (`stalled`) until there is room again. This is how
    /// backpressure bounds output rather than input: one read of tiny pipelined
    /// requests would otherwise produce thousands of responses at once.
    pub fn feed_within(
        &self,
        session: &mut Session,
        input: &[u8],
        limit: usize,
        out: &mut Vec<u8>,
        counts: &mut [u64; 6],
    ) -> Feed {
        let mut pos = 0;
        loop {
            let rest = &input[pos..];
            match session.body {
                Body::Length(remaining) => {
                    let take = remaining.min(rest.len() as u64);
                    pos += take as usize;
                    session.body = if take == remaining {
                        Body::None
                    } else {
                        Body::Length(remaining - take)
                    };
                    if session.body != Body::None {
                        return Feed {
                            consumed: pos,
                            close: false,
                            error: false,
                            partial_head: false,
                            stalled: false,
                        };
                    }
                    continue;
                }
                Body::Chunked(mut chunked) => match chunked.feed(rest) {
                    Ok((n, done)) => {
                        pos += n;
                        if done {
                            session.body = Body::None;
                            continue;
                        }
                        session.body = Body::Chunked(chunked);
                        return Feed {
                            consumed: pos,
                            close: false,
                            error: false,
                            partial_head: false,
                            stalled: false,
                        };
                    }
                    Err(_) => return self.error(out, counts, idx::BAD_REQUEST, pos),
                },
                Body::None => {}
            }
            if rest.is_empty() {
                return Feed {
                    consumed: pos,
                    close: false,
                    error: false,
                    partial_head: false,
                    stalled: false,
                };
            }
            if out.len() >= limit {
                return Feed {
                    consumed: pos,
                    close: false,
                    error: false,
                    partial_head: false,
                    stalled: true,
                };
            }
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            // Only the first --max-header-bytes are judged, so that a head too long gets
            // 431 wherever the reads split it, even if it is also wrong past the limit.
            let judged = rest.len().min(self.max_header_bytes);
            let parsed = req.parse(&rest[..judged]);
            // httparse takes a bare LF as a line end, as RFC 9112 §2.2 allows; a proxy
            // in front may not, and then the two disagree on where the request ends.
            let seen = match parsed {
                Ok(httparse::Status::Complete(n)) => n,
                _ => judged,
            };
            let clean =
                matches!(parsed, Ok(httparse::Status::Complete(n)) if crlf_only(&rest[..n], &req));
            if !clean {
                if let Some(lf) = bare_lf(&rest[..seen]) {
                    return self.error(out, counts, error_before(&rest[..lf]), pos);
                }
            }
            let head_len = match parsed {
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial) => {
                    // The head will be at least one byte longer than what is here, so
                    // this is the same limit as for a head that arrives whole.
                    if rest.len() >= self.max_header_bytes {
                        return self.error(out, counts, idx::HEADERS_TOO_LARGE, pos);
                    }
                    return Feed {
                        consumed: pos,
                        close: false,
                        error: false,
                        partial_head: true,
                        stalled: false,
                    };
                }
                Err(e) => return self.error(out, counts, parse_error(e), pos),
            };
            pos += head_len;
            let method = req.method.unwrap_or("");
            if !METHODS.contains(&method) {
                return self.error(out, counts, idx::METHOD_NOT_ALLOWED, pos);
            }
            let http10 = req.version == Some(0);
            let mut close = http10;
            let mut host = false;
            let mut length: Option<u64> = None;
            // Whether the last coding is chunked, and how many of the codings are chunked.
            let mut chunked = false;
            let mut chunked_codings = 0;
            let mut encoded = false;
            let mut expect_continue = false;
            for h in req.headers.iter() {
                let name = h.name;
                if name.eq_ignore_ascii_case("host") {
                    if host {
                        return self.error(out, counts, idx::BAD_REQUEST, pos); // two Hosts
                    }
                    host = true;
                } else if name.eq_ignore_ascii_case("content-length") {
                    match content_length(h.value) {
                        Some(n) if length.is_none_or(|l| l == n) => length = Some(n),
                        _ => return self.error(out, counts, idx::BAD_REQUEST, pos),
                    }
                } else if name.eq_ignore_ascii_case("transfer-encoding") {
                    encoded = true;
                    chunked = is_chunked(h.value);
                    chunked_codings += count_token(h.value, "chunked");
                } else if name.eq_ignore_ascii_case("connection") {
                    if has_token(h.value, "close") {
                        close = true;
                    } else if http10 && has_token(h.value, "keep-alive") {
                        close = false;
                    }
                } else if name.eq_ignore_ascii_case("expect") && has_token(h.value, "100-continue")
                {
                    expect_continue = true;
                }
            }
            // RFC 9112: an HTTP/1.1 request needs exactly one Host; a body length must be
            // unambiguous, since a proxy that reads it another way is how requests get
            // smuggled: chunked is the last coding and applied once (§6.1, over every
            // Transfer-Encoding line), never next to a Content-Length (§6.3), and
            // Transfer-Encoding in HTTP/1.0, which predates it, is faulty framing.
            let framing_ok =
                !encoded || (chunked && chunked_codings == 1 && length.is_none() && !http10);
            if (!http10 && !host) || !framing_ok {
                return self.error(out, counts, idx::BAD_REQUEST, pos);
            }
            session.body = if chunked {
                Body::Chunked(Chunked::new())
            } else {
                match length {
                    Some(n) if n > 0 => Body::Length(n),
                    _ => Body::None,
                }
            };
            if expect_continue && session.body != Body::None && !close {
                out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
            }
            out.extend_from_slice(&self.head);
            out.extend_from_slice(&self.date);
            if close {
                out.extend_from_slice(b"Connection: close\r\n");
            } else if http10 {
                out.extend_from_slice(b"Connection: keep-alive\r\n");
            }
            out.extend_from_slice(b"\r\n");
            if method != "HEAD" {
                out.extend_from_slice(&self.body);
            }
            counts[idx::OK] += 1;
            if close {
                return Feed {
                    consumed: pos,
                    close: true,
                    error: false,
                    partial_head: false,
                    stalled: false,
                };
            }
        }
    }

    /// Appends the error response for `counts[index]`'s status, after the responses
    /// already written for earlier requests, and asks for the close.
    fn error(
        &self,
        out: &mut Vec<u8>,
        counts: &mut [u64; 6],
        index: usize,
        consumed: usize,
    ) -> Feed {
        self.error_response(out, counts, index);
        Feed {
            consumed,
            close: true,
            error: true,
            partial_head: false,
            stalled: false,
        }
    }

    fn error_response(&self, out: &mut Vec<u8>, counts: &mut [u64; 6], index: usize) {
        let status = crate::metrics::http_statuses(0)[index];
        let _ = write!(
            out,
            "HTTP/1.1 {status} {}\r\nServer: edgepoll\r\n",
            reason(status)
        );
        out.extend_from_slice(&self.date);
        if index == idx::METHOD_NOT_ALLOWED {
            out.extend_from_slice(b"Allow: GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH\r\n");
        }
        out.extend_from_slice(b"Content-Length: 0\r\nConnection: close\r\n\r\n");
        counts[index] += 1;
    }

    /// The 408 for a request head that did not complete in time.
    pub fn timeout_response(&self, out: &mut Vec<u8>, counts: &mut [u64; 6]) {
        self.error_response(out, counts, idx::REQUEST_TIMEOUT);
    }
}

/// The status (as a `counts` index) for a request head httparse rejects.
fn parse_error(e: httparse::Error) -> usize {
    match e {
        httparse::Error::TooManyHeaders => idx::HEADERS_TOO_LARGE,
        httparse::Error::Version => idx::VERSION_NOT_SUPPORTED,
        _ => idx::BAD_REQUEST,
    }
}

/// The status (as a `counts` index) for a head cut short at a bare LF: what the bytes
/// before it already earn, else 400. The same answer as when the head arrives in pieces
/// and the part before the LF is judged alone.
fn error_before(before_lf: &[u8]) -> usize {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    match httparse::Request::new(&mut headers).parse(before_lf) {
        Err(e) => parse_error(e),
        _ => idx::BAD_REQUEST,
    }
}

/// Whether every line of a complete head that httparse accepted ends in CRLF, read
/// off where httparse found its parts instead of by scanning every byte: httparse
/// allows an LF only as a line end (and folding is refused), so the line ends are the
/// empty lines before the request line, the two bytes before each header name, and
/// the last four bytes. False sends the caller to [`bare_lf`] for the position.
fn crlf_only(head: &[u8], req: &httparse::Request<'_, '_>) -> bool {
    let base = head.as_ptr() as usize;
    let offset = |part: &[u8]| (part.as_ptr() as usize).wrapping_sub(base);
    let Some(method) = req.method else {
        return false;
    };
    let start = offset(method.as_bytes());
    if start > head.len() || start % 2 != 0 || !head[..start].chunks(2).all(|p| p == b"\r\n") {
        return false;
    }
    if !head.ends_with(b"\r\n\r\n") {
        return false;
    }
    req.headers.iter().all(|h| {
        let at = offset(h.name.as_bytes());
        at >= 2 && at <= head.len() && &head[at - 2..at] == b"\r\n"
    })
}

/// The reason phrase of the statuses edgepoll sends, and a generic one otherwise.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Status",
    }
}

/// Feeds `reads` to a fresh session as consecutive reads, keeping each unconsumed
/// rest as the server does. Returns every byte written and whether the connection
/// would close. For tests and the fuzz target: the protocol without sockets.
pub fn feed_all(r: &Responder, reads: &[&[u8]]) -> (Vec<u8>, bool, [u64; 6]) {
    let mut session = Session::default();
    let mut held: Vec<u8> = Vec::new();
    let mut out = Vec::new();
    let mut counts = [0u64; 6];
    for read in reads {
        held.extend_from_slice(read);
        let f = r.feed(&mut session, &held, &mut out, &mut counts);
        assert!(f.consumed <= held.len(), "consumed more than it was given");
        if f.close {
            return (out, true, counts);
        }
        held.drain(..f.consumed);
    }
    (out, false, counts)
}

/// Serves an HTTP connection: flushes what is owed, answers requests held back by
/// backpressure, then reads requests and answers them, one write per read's worth.
/// The responses produced are bounded by the room under both caps (plus one
/// response), never by how much input one read brought.
pub fn serve(conn: &mut Conn, ctx: &mut Ctx<'_>, readable: bool, r: &Responder) -> Step {
    if conn.has(flags::INPUT_DONE) && state(conn).is_stalled() {
        // The peer sent FIN with requests still held back: answer them as it reads.
        if let Err(step) = flush_owed(conn, ctx) {
            return step;
        }
        return finish_requests(conn, ctx, r);
    }
    if let Some(step) = begin(conn, ctx, readable) {
        return step;
    }
    let mut budget = READ_BUDGET;
    loop {
        let mut room = read_room(conn, ctx);
        if room == 0 {
            // Rule 3: a client that pipelines without reading stops being read, and
            // what it already sent stays unanswered until it reads.
            return pause(conn, ctx);
        }
        if state(conn).is_stalled() {
            let feed = feed_session(conn, r, &[], room, ctx);
            if let Some(step) = answered(conn, ctx, feed, r) {
                return step;
            }
            if feed.stalled {
                conn.set(flags::READ_PENDING);
                continue;
            }
            // The held requests' answers took some of the room: what is left bounds
            // the answers to what is read now (the cap held twice over before).
            room = read_room(conn, ctx);
            if room == 0 {
                return pause(conn, ctx);
            }
        }
        let want = ctx.buf.len().min(budget);
        match socket::read(conn.fd.as_fd(), &mut ctx.buf[..want]) {
            Ok(0) => {
                // A request cut off by the FIN gets no answer: there is no one to read
                // it. Requests held back by backpressure are still owed (the peer may
                // read after its FIN), so they are answered first.
                conn.set(flags::PEER_FIN | flags::INPUT_DONE);
                return finish_requests(conn, ctx, r);
            }
            Ok(n) => {
                ctx.counters.received += n as u64;
                conn.last_active_ms = ctx.now_ms;
                let input = std::mem::take(&mut ctx.buf);
                let feed = feed_session(conn, r, &input[..n], room, ctx);
                ctx.buf = input;
                if let Some(step) = answered(conn, ctx, feed, r) {
                    return step;
                }
                if feed.stalled {
                    // Come back for the held requests before reading more (even if
                    // this read drained the socket: no edge will announce them).
                    conn.set(flags::READ_PENDING);
                    budget = budget.saturating_sub(n);
                    if budget == 0 {
                        return Step::Again;
                    }
                    continue;
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

/// The http state of a connection served by this mode.
fn state(conn: &mut Conn) -> &mut State {
    match &mut conn.state {
        super::State::Http(s) => s,
        // The worker gives an http handler only connections it created.
        _ => unreachable!("an http connection without http state"),
    }
}

/// Sends the responses a feed produced and books its outcome; `Some` ends the serve.
fn answered(conn: &mut Conn, ctx: &mut Ctx<'_>, feed: Feed, r: &Responder) -> Option<Step> {
    let sent = if ctx.out.is_empty() {
        Ok(())
    } else {
        send(conn, ctx.counters, ctx.out)
    };
    ctx.out.clear();
    if ctx.out.capacity() > MAX_KEPT_BATCH {
        // One huge response (a big --body-file) must not keep its batch for good.
        ctx.out.shrink_to(MAX_KEPT_BATCH);
    }
    if let Err(step) = sent {
        return Some(step);
    }
    let state = state(conn);
    if feed.close {
        state.session = None;
        state.head_deadline_ms = 0;
        if feed.error {
            conn.set(flags::PROTO_ERROR);
        }
        conn.set(flags::INPUT_DONE);
        return Some(finish(conn, ctx));
    }
    // The header timeout runs while the peer owes us the rest of a head, not while
    // we hold its requests back.
    if feed.partial_head {
        if state.head_deadline_ms == 0 {
            state.head_deadline_ms = ctx.now_ms + r.header_timeout_ms;
        }
    } else {
        state.head_deadline_ms = 0;
    }
    None
}

/// The peer sent FIN: answers what backpressure held back (within the room, coming
/// back as the peer reads), then finishes.
fn finish_requests(conn: &mut Conn, ctx: &mut Ctx<'_>, r: &Responder) -> Step {
    loop {
        if !state(conn).is_stalled() {
            state(conn).session = None;
            state(conn).head_deadline_ms = 0;
            return finish(conn, ctx);
        }
        let room = read_room(conn, ctx);
        if room == 0 {
            // The EPOLLOUT edge that drains the buffer brings the worker back
            // through `begin`, which finishes once nothing is owed.
            return Step::Idle;
        }
        let feed = feed_session(conn, r, &[], room, ctx);
        if let Some(step) = answered(conn, ctx, feed, r) {
            return step;
        }
    }
}

/// A batch buffer that grew past this is shrunk back after use: 256 KiB covers a
/// read's worth of typical responses without reallocating.
const MAX_KEPT_BATCH: usize = 256 * 1024;

/// Feeds `data` to the connection's session, within `limit` bytes of output, keeping
/// any incomplete or held-back rest in a session allocated only for as long as it is
/// needed.
fn feed_session(
    conn: &mut Conn,
    r: &Responder,
    data: &[u8],
    limit: usize,
    ctx: &mut Ctx<'_>,
) -> Feed {
    let counts = &mut ctx.counters.http;
    let out = &mut *ctx.out;
    let state = state(conn);
    let mut local = Session::default();
    let session: &mut Session = match state.session.as_mut() {
        Some(boxed) => boxed,
        None => &mut local,
    };
    let feed = if session.pending.is_empty() {
        let f = r.feed_within(session, data, limit, out, counts);
        if f.consumed < data.len() && !f.close {
            session.pending.extend_from_slice(&data[f.consumed..]);
        }
        f
    } else {
        let mut input = std::mem::take(&mut session.pending);
        input.extend_from_slice(data);
        let f = r.feed_within(session, &input, limit, out, counts);
        input.drain(..f.consumed);
        session.pending = input;
        f
    };
    session.stalled = feed.stalled;
    if session.is_idle() {
        state.session = None;
    } else if state.session.is_none() {
        state.session = Some(Box::new(local));
    }
    feed
}

/// The connection's mode deadline passed: a request head took longer than
/// `--header-timeout` (slowloris). It gets 408, after any responses still owed, and a
/// lingering close, so that the 408 is not destroyed by a reset.
pub fn on_deadline(conn: &mut Conn, ctx: &mut Ctx<'_>, r: &Responder) -> Step {
    let state = state(conn);
    if state.head_deadline_ms == 0 || state.head_deadline_ms > ctx.now_ms {
        return Step::Idle; // cleared, or moved later since the timer was armed
    }
    state.head_deadline_ms = 0;
    state.session = None;
    r.timeout_response(ctx.out, &mut ctx.counters.http);
    let sent = send(conn, ctx.counters, ctx.out);
    ctx.out.clear();
    if let Err(step) = sent {
        return step;
    }
    conn.set(flags::TIMED_OUT | flags::INPUT_DONE);
    finish(conn, ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn responder() -> Responder {
        let mut r = Responder::new(&HttpConfig::default());
        r.refresh_date(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000));
        r
    }

    fn run(r: &Responder, pieces: &[&[u8]]) -> (Vec<u8>, bool, [u64; 6]) {
        feed_all(r, pieces)
    }

    const OK: &str = "HTTP/1.1 200 OK\r\nServer: edgepoll\r\nContent-Type: text/plain\r\nContent-Length: 13\r\nDate: Tue, 14 Nov 2023 22:13:20 GMT\r\n";

    #[test]
    fn pipelined_requests_split_at_every_byte_get_the_same_bytes() {
        let r = responder();
        let input = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\
POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
PUT /y HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
HEAD / HTTP/1.1\r\nHost: a\r\n\r\n";
        let expected =
            format!("{OK}\r\nHello, World!{OK}\r\nHello, World!{OK}\r\nHello, World!{OK}\r\n");
        let (whole, close, counts) = run(&r, &[input]);
        assert_eq!(String::from_utf8(whole).unwrap(), expected);
        assert!(!close);
        assert_eq!(counts[idx::OK], 4);
        for split in 1..input.len() {
            let (out, close, _) = run(&r, &[&input[..split], &input[split..]]);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                expected,
                "split at {split}"
            );
            assert!(!close);
        }
        // One byte at a time, too.
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(String::from_utf8(run(&r, &bytes).0).unwrap(), expected);
    }

    #[test]
    fn connection_semantics() {
        let r = responder();
        let (out, close, _) = run(
            &r,
            &[b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGET / HTTP/1.1\r\n"],
        );
        assert!(close, "Connection: close ends the connection");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("{OK}Connection: close\r\n\r\nHello, World!")
        );
        let (out, close, _) = run(&r, &[b"GET / HTTP/1.0\r\n\r\n"]);
        assert!(close, "HTTP/1.0 closes by default");
        assert!(String::from_utf8(out)
            .unwrap()
            .contains("Connection: close\r\n"));
        let (out, close, _) = run(&r, &[b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"]);
        assert!(!close, "HTTP/1.0 may ask for keep-alive");
        assert!(String::from_utf8(out)
            .unwrap()
            .contains("Connection: keep-alive\r\n"));
        let (out, _, _) = run(
            &r,
            &[
                b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n",
                b"hi",
            ],
        );
        assert!(String::from_utf8(out)
            .unwrap()
            .starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK"));
    }

    #[test]
    fn errors_follow_the_answers_already_owed() {
        let r = responder();
        let (out, close, counts) = run(&r, &[b"GET / HTTP/1.1\r\nHost: a\r\n\r\nBREW / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"]);
        assert!(close);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with(&format!(
                "{OK}\r\nHello, World!HTTP/1.1 405 Method Not Allowed\r\n"
            )),
            "{text}"
        );
        assert_eq!(
            text.matches("HTTP/1.1").count(),
            2,
            "nothing is answered after the error"
        );
        assert_eq!((counts[idx::OK], counts[idx::METHOD_NOT_ALLOWED]), (1, 1));
    }

    const BAD_REQUEST: &str = "HTTP/1.1 400 Bad Request\r\nServer: edgepoll\r\nDate: Tue, 14 Nov 2023 22:13:20 GMT\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

    /// A chunked POST with `body` after its head.
    macro_rules! chunked {
        ($body:literal) => {
            concat!(
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
                $body
            )
            .as_bytes()
        };
    }

    /// Requests a front proxy could frame differently from a lenient server (RFC 9112
    /// §2.2, §5, §6.1, §7.1), each with the 200s owed before its 400: a chunked body is
    /// checked after its head was answered.
    const STRICT_400: &[(&str, &[u8], u64)] = &[
        ("bare LF before the request line", b"\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", 0),
        ("bare LF after an empty line", b"\r\n\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", 0),
        ("bare LF ending the request line", b"GET / HTTP/1.1\nHost: a\r\n\r\n", 0),
        ("bare LF ending a header", b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n", 0),
        ("bare LF ending the head", b"GET / HTTP/1.1\r\nHost: a\r\n\n", 0),
        ("bare LF line endings only", b"GET / HTTP/1.1\nHost: a\n\n", 0),
        ("bare LF in the next request", b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\nHost: a\n\n", 1),
        ("bare LF right after a body", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", 1),
        ("bare CR in the request line", b"GET / HTTP/1.1\rHost: a\r\n\r\n", 0),
        ("bare CR in a header value", b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n", 0),
        ("whitespace before a colon", b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 0),
        ("whitespace before the first header", b"GET / HTTP/1.1\r\n Host: a\r\n\r\n", 0),
        ("obs-fold line folding", b"GET / HTTP/1.1\r\nHost: a\r\nX: b\r\n c\r\n\r\n", 0),
        ("two spaces in the request line", b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 0),
        ("NUL in a header value", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 0),
        // Past the 16 or 32 bytes that httparse checks at a time with SIMD.
        ("DEL deep in a header value", b"GET / HTTP/1.1\r\nHost: a\r\nX: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\x7fb\r\n\r\n", 0),
        ("vertical tab deep in a header value", b"GET / HTTP/1.1\r\nHost: a\r\nX: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\x0bb\r\n\r\n", 0),
        ("bare LF deep in a header value", b"GET / HTTP/1.1\r\nHost: a\r\nX: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\nb\r\n\r\n", 0),
        ("Content-Length with a plus sign", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\nx", 0),
        ("Content-Length with a space inside", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1 0\r\n\r\n", 0),
        ("Content-Length over 64 bits", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 18446744073709551616\r\n\r\n", 0),
        ("Transfer-Encoding on HTTP/1.0", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 0),
        ("Transfer-Encoding: chunked, chunked", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", 0),
        ("chunked in two Transfer-Encoding headers", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 0),
        ("chunked, then another coding", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n0\r\n\r\n", 0),
        ("empty chunk-size line", chunked!("\r\n\r\n"), 1),
        ("chunk-size line of whitespace", chunked!(" \r\n\r\n"), 1),
        ("chunk extension without a size", chunked!(";x\r\n\r\n"), 1),
        ("bare LF ending a chunk-size line", chunked!("3\nabc\r\n0\r\n\r\n"), 1),
        ("bare LF in a chunk extension", chunked!("3;x\nabc\r\n0\r\n\r\n"), 1),
        ("bare CR in a chunk extension", chunked!("3;x\ry\r\nabc\r\n0\r\n\r\n"), 1),
        ("chunk extension without a name", chunked!("3;=x\r\nabc\r\n0\r\n\r\n"), 1),
        ("control byte in a chunk extension", chunked!("3;x=\x01\r\nabc\r\n0\r\n\r\n"), 1),
        ("unterminated quoted chunk extension", chunked!("3;x=\"a\r\nabc\r\n0\r\n\r\n"), 1),
        ("whitespace after a chunk size", chunked!("3 \r\nabc\r\n0\r\n\r\n"), 1),
        ("chunk size over 64 bits", chunked!("10000000000000003\r\nabc\r\n0\r\n\r\n"), 1),
        ("chunk size with 0x", chunked!("0x3\r\nabc\r\n0\r\n\r\n"), 1),
        ("chunk size with a sign", chunked!("+3\r\nabc\r\n0\r\n\r\n"), 1),
        ("bare LF after chunk data", chunked!("3\r\nabc\n0\r\n\r\n"), 1),
        ("bare LF ending a trailer", chunked!("0\r\nX: y\n\r\n"), 1),
        ("bare LF ending the trailers", chunked!("0\r\n\n"), 1),
        ("bare CR in a trailer", chunked!("0\r\nX: a\rb\r\n\r\n"), 1),
        ("trailer line without a colon", chunked!("0\r\nnot a field\r\n\r\n"), 1),
        ("obs-fold in the trailers", chunked!("0\r\nX: a\r\n b\r\n\r\n"), 1),
    ];

    /// The input whole, one byte per read, and cut in two at every byte.
    fn every_split(input: &[u8]) -> Vec<Vec<&[u8]>> {
        let mut splits = vec![vec![input], input.chunks(1).collect()];
        splits.extend((1..input.len()).map(|at| vec![&input[..at], &input[at..]]));
        splits
    }

    /// The status codes in `out`, for failure messages.
    fn statuses(out: &[u8]) -> Vec<String> {
        let text = String::from_utf8_lossy(out);
        text.match_indices("HTTP/1.1 ")
            .map(|(i, _)| text[i + 9..i + 12].to_string())
            .collect()
    }

    #[test]
    fn each_rfc_9112_leniency_gets_400_and_close_however_it_is_split() {
        let r = responder();
        let mut failures = Vec::new();
        for &(name, input, oks) in STRICT_400 {
            let mut counts = [0u64; 6];
            counts[idx::OK] = oks;
            counts[idx::BAD_REQUEST] = 1;
            let ok = format!("{OK}\r\nHello, World!");
            let want = (
                format!("{}{BAD_REQUEST}", ok.repeat(oks as usize)).into_bytes(),
                true,
                counts,
            );
            for reads in every_split(input) {
                let got = run(&r, &reads);
                if got != want {
                    let sizes: Vec<usize> = reads.iter().map(|p| p.len()).collect();
                    failures.push(format!(
                        "{name}: reads of {sizes:?} got {:?}, close: {}",
                        statuses(&got.0),
                        got.1
                    ));
                    break;
                }
            }
        }
        assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    }

    #[test]
    fn a_bare_lf_gets_what_the_bytes_before_it_earned_however_split() {
        let config = HttpConfig {
            max_header_bytes: 100,
            ..HttpConfig::default()
        };
        let mut r = Responder::new(&config);
        r.refresh_date(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000));
        let many: String = (0..70).map(|i| format!("X{i}:v\r\n")).collect();
        let cases: Vec<(&str, Vec<u8>, usize)> = vec![
            (
                "a bad version before it",
                b"GET / HTTP/1.2\nHost: a\n\n".to_vec(),
                idx::VERSION_NOT_SUPPORTED,
            ),
            (
                "too many headers before it",
                format!("GET / HTTP/1.1\r\n{many}Host: a\n\n").into_bytes(),
                idx::HEADERS_TOO_LARGE,
            ),
            (
                "past --max-header-bytes",
                format!("GET / HTTP/1.1\r\nX: {}\n\r\n", "a".repeat(100)).into_bytes(),
                idx::HEADERS_TOO_LARGE,
            ),
            (
                "before --max-header-bytes in a head that goes past it",
                format!("GET / HTTP/1.1\nX: {}\r\n\r\n", "a".repeat(100)).into_bytes(),
                idx::BAD_REQUEST,
            ),
        ];
        for (name, input, index) in &cases {
            let whole = run(&r, &[input]);
            let mut counts = [0u64; 6];
            counts[*index] = 1;
            assert_eq!((whole.1, whole.2), (true, counts), "{name}");
            for reads in every_split(input) {
                assert_eq!(run(&r, &reads), whole, "{name}: {reads:?}");
            }
        }
    }

    #[test]
    fn strict_framing_still_accepts_what_rfc_9112_allows() {
        let r = responder();
        // An empty line before a request line (§2.2), chunk extensions with BWS, a
        // quoted value holding ';' and an escaped quote (§7.1.1), leading zeros and
        // upper-case hex, a trailer field (§7.1.2), and codings before chunked, in one
        // header or two (§6.1).
        let input = b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n\
POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
3 ;a = b\t; c=\"q;\\\"x\"\r\nabc\r\n00A;d\r\n0123456789\r\n000\r\nX-T: v\t1\r\n\r\n\
POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n\
POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let expected = format!("{OK}\r\nHello, World!").repeat(4);
        for reads in every_split(input) {
            let (out, close, counts) = run(&r, &reads);
            assert_eq!(String::from_utf8(out).unwrap(), expected, "{reads:?}");
            assert!(!close);
            assert_eq!(counts[idx::OK], 4);
        }
    }

    #[test]
    fn a_growing_partial_head_is_cut_at_the_limit() {
        let config = HttpConfig {
            max_header_bytes: 100,
            ..HttpConfig::default()
        };
        let r = Responder::new(&config);
        let mut pieces: Vec<Vec<u8>> = vec![b"GET / HTTP/1.1\r\nHost: a\r\nX: ".to_vec()];
        pieces.extend((0..20).map(|_| b"aaaaaaaaaa".to_vec()));
        let refs: Vec<&[u8]> = pieces.iter().map(|p| p.as_slice()).collect();
        let (out, close, counts) = run(&r, &refs);
        assert!(close);
        assert!(String::from_utf8(out)
            .unwrap()
            .starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"));
        assert_eq!(counts[idx::HEADERS_TOO_LARGE], 1);
    }
}
