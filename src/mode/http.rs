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
    after_read, begin, caught_up, finish, lingered, pause, read_room, send, Io, Step, READ_BUDGET,
};
use crate::config::HttpConfig;
use crate::conn::{flags, Conn};
use crate::http1::{content_length, has_token, is_chunked, Chunked};
use crate::metrics::http_index as idx;
use crate::metrics::CloseReason;
use crate::sys::socket;

/// Most headers a request may carry; more gets 431.
pub const MAX_HEADERS: usize = 64;

/// Methods answered with the fixed response; any other gets 405.
const METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"];

/// What a connection carries between reads.
#[derive(Debug, Default)]
pub struct Session {
    /// Unconsumed input: a partial request head or chunk-size line.
    pending: Vec<u8>,
    /// The body of the last request, being skipped.
    body: Body,
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
                };
            }
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            let head_len = match req.parse(rest) {
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
                    };
                }
                Err(httparse::Error::TooManyHeaders) => {
                    return self.error(out, counts, idx::HEADERS_TOO_LARGE, pos)
                }
                Err(httparse::Error::Version) => {
                    return self.error(out, counts, idx::VERSION_NOT_SUPPORTED, pos)
                }
                Err(_) => return self.error(out, counts, idx::BAD_REQUEST, pos),
            };
            if head_len > self.max_header_bytes {
                return self.error(out, counts, idx::HEADERS_TOO_LARGE, pos);
            }
            pos += head_len;
            let method = req.method.unwrap_or("");
            if !METHODS.contains(&method) {
                return self.error(out, counts, idx::METHOD_NOT_ALLOWED, pos);
            }
            let http10 = req.version == Some(0);
            let mut close = http10;
            let mut host = false;
            let mut length: Option<u64> = None;
            let mut chunked = false;
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
            // unambiguous (a Transfer-Encoding that does not end in chunked, or one next
            // to a Content-Length, is how requests get smuggled).
            if (!http10 && !host) || (encoded && (!chunked || length.is_some())) {
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

/// Serves an HTTP connection: flushes what is owed, then reads requests and answers
/// them, one write per read's worth. `out` is the worker's batch buffer, empty on entry
/// and on return.
pub fn serve(
    conn: &mut Conn,
    io: &mut Io<'_>,
    readable: bool,
    r: &Responder,
    out: &mut Vec<u8>,
) -> Step {
    if let Some(step) = begin(conn, io, readable) {
        return step;
    }
    let mut budget = READ_BUDGET;
    loop {
        if read_room(conn, io) == 0 {
            // Rule 3: a client that pipelines without reading stops being read. The
            // responses to one read can take the buffer past the cap by at most what
            // one read's requests produce.
            return pause(conn, io);
        }
        let want = io.buf.len().min(budget);
        match socket::read(conn.fd.as_fd(), &mut io.buf[..want]) {
            Ok(0) => {
                // A request cut off by the FIN gets no answer: there is no one to read it.
                conn.set(flags::PEER_FIN | flags::INPUT_DONE);
                conn.session = None;
                return finish(conn, io);
            }
            Ok(n) => {
                io.counters.received += n as u64;
                conn.last_active_ms = io.now_ms;
                let feed = feed_session(conn, r, &io.buf[..n], out, &mut io.counters.http);
                let sent = if out.is_empty() {
                    Ok(())
                } else {
                    send(conn, io.counters, out)
                };
                out.clear();
                if let Err(step) = sent {
                    return step;
                }
                if feed.close {
                    if feed.error {
                        conn.set(flags::PROTO_ERROR);
                    }
                    conn.set(flags::INPUT_DONE);
                    conn.session = None;
                    return finish(conn, io);
                }
                // The header timeout runs while a head is incomplete.
                if feed.partial_head {
                    if conn.deadline_ms == 0 {
                        conn.deadline_ms = io.now_ms + r.header_timeout_ms;
                    }
                } else {
                    conn.deadline_ms = 0;
                }
                if let Some(step) = after_read(conn, io, n, want, &mut budget) {
                    return step;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return caught_up(conn, io),
            Err(e) => return Step::Close(CloseReason::of_error(&e)),
        }
    }
}

/// Feeds `data` to the connection's session, keeping any incomplete rest in a session
/// allocated only for as long as it is needed.
fn feed_session(
    conn: &mut Conn,
    r: &Responder,
    data: &[u8],
    out: &mut Vec<u8>,
    counts: &mut [u64; 6],
) -> Feed {
    let mut local = Session::default();
    let session: &mut Session = match conn.session.as_mut() {
        Some(boxed) => boxed,
        None => &mut local,
    };
    let feed = if session.pending.is_empty() {
        let f = r.feed(session, data, out, counts);
        if f.consumed < data.len() && !f.close {
            session.pending.extend_from_slice(&data[f.consumed..]);
        }
        f
    } else {
        let mut input = std::mem::take(&mut session.pending);
        input.extend_from_slice(data);
        let f = r.feed(session, &input, out, counts);
        input.drain(..f.consumed);
        session.pending = input;
        f
    };
    let idle = session.is_idle();
    if idle {
        conn.session = None;
    } else if conn.session.is_none() {
        conn.session = Some(Box::new(local));
    }
    feed
}

/// The connection's deadline passed: a lingering close ends, or a request head took
/// longer than `--header-timeout` (slowloris), which gets 408 and the close.
pub fn on_deadline(conn: &mut Conn, io: &mut Io<'_>, r: &Responder, out: &mut Vec<u8>) -> Step {
    if let Some(step) = lingered(conn) {
        return step;
    }
    // Read what is queued first, so that the close sends FIN after the 408, not a RST
    // that would destroy it.
    loop {
        match socket::read(conn.fd.as_fd(), io.buf) {
            Ok(0) => break,
            Ok(n) => io.counters.received += n as u64,
            Err(_) => break,
        }
    }
    r.timeout_response(out, &mut io.counters.http);
    let _ = send(conn, io.counters, out);
    out.clear();
    Step::Close(CloseReason::HeaderTimeout)
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
