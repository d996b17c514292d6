//! An incremental HTTP/1.1 response parser for edgeload: any status, any framing
//! (Content-Length, chunked, until close), split at any byte, pipelined back to back.
//! Bodies are counted and dropped, never buffered.

use std::mem::MaybeUninit;

use crate::http1::{content_length, has_token, is_chunked, ChunkError, Chunked};

/// A finished response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// The server will close after this response (`Connection: close`, or HTTP/1.0
    /// without keep-alive, or a body delimited by the close itself).
    pub close: bool,
}

/// A response that cannot be parsed; the connection must be dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("malformed response head: {0}")]
    Head(String),
    #[error("response head over {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("malformed chunked body: {0}")]
    Chunk(ChunkError),
    #[error("invalid Content-Length")]
    ContentLength,
}

/// Largest response head accepted.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header lines accepted in one response head.
const MAX_HEADERS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    Body { remaining: u64 },
    Chunked(Chunked),
    UntilClose,
}

/// Parser state of one connection.
#[derive(Debug)]
pub struct ResponseParser {
    state: State,
    status: u16,
    close: bool,
    /// The requests are HEAD: a response ends with its head (RFC 9112 §6.3), though it
    /// may carry the Content-Length or Transfer-Encoding a GET would have had.
    head: bool,
}

impl Default for ResponseParser {
    fn default() -> Self {
        ResponseParser::new()
    }
}

impl ResponseParser {
    pub fn new() -> ResponseParser {
        ResponseParser::for_request(false)
    }

    /// A parser for the responses to requests that are all HEAD (`head`), or all not.
    pub fn for_request(head: bool) -> ResponseParser {
        ResponseParser {
            state: State::Head,
            status: 0,
            close: false,
            head,
        }
    }

    /// Whether the parser is between responses (nothing partial is held).
    pub fn is_idle(&self) -> bool {
        self.state == State::Head
    }

    /// Parses from the front of `buf`. Returns how many bytes were consumed and the
    /// response they completed, if any. Call again with the rest while it completes
    /// responses; `(n, None)` means it needs more input (keep `buf[n..]`).
    pub fn parse(&mut self, buf: &[u8]) -> Result<(usize, Option<Response>), ParseError> {
        let mut pos = 0;
        loop {
            let rest = &buf[pos..];
            match self.state {
                State::Head => {
                    // Left uninitialised: httparse writes the ones it fills, and
                    // zeroing 64 of them (2 KiB) cost more than parsing a short head.
                    let mut headers =
                        [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
                    let mut resp = httparse::Response::new(&mut []);
                    let n = match httparse::ParserConfig::default()
                        .parse_response_with_uninit_headers(&mut resp, rest, &mut headers)
                    {
                        // The same limit whether the head arrived whole or in pieces.
                        Ok(httparse::Status::Complete(n)) if n > MAX_HEAD => {
                            return Err(ParseError::HeadTooLarge)
                        }
                        Ok(httparse::Status::Complete(n)) => n,
                        Ok(httparse::Status::Partial) => {
                            // The head will be at least one byte longer than this.
                            if rest.len() >= MAX_HEAD {
                                return Err(ParseError::HeadTooLarge);
                            }
                            return Ok((pos, None));
                        }
                        Err(e) => return Err(ParseError::Head(e.to_string())),
                    };
                    pos += n;
                    let status = resp.code.unwrap_or(0);
                    let http10 = resp.version == Some(0);
                    let mut close = http10;
                    let mut chunked = false;
                    let mut length: Option<u64> = None;
                    for h in resp.headers.iter() {
                        // The length picks the one name to compare, if any.
                        match h.name.len() {
                            10 if h.name.eq_ignore_ascii_case("connection") => {
                                if has_token(h.value, "close") {
                                    close = true;
                                } else if has_token(h.value, "keep-alive") {
                                    close = false;
                                }
                            }
                            17 if h.name.eq_ignore_ascii_case("transfer-encoding") => {
                                chunked = is_chunked(h.value);
                            }
                            14 if h.name.eq_ignore_ascii_case("content-length") => {
                                let n = content_length(h.value).ok_or(ParseError::ContentLength)?;
                                if length.is_some_and(|l| l != n) {
                                    return Err(ParseError::ContentLength);
                                }
                                length = Some(n);
                            }
                            _ => {}
                        }
                    }
                    if (100..200).contains(&status) && status != 101 {
                        continue; // interim response (100 Continue): the real one follows
                    }
                    self.status = status;
                    self.close = close;
                    if self.head || status == 204 || status == 304 {
                        return Ok((pos, Some(self.done())));
                    }
                    if chunked {
                        self.state = State::Chunked(Chunked::new());
                    } else if let Some(n) = length {
                        if n == 0 {
                            return Ok((pos, Some(self.done())));
                        }
                        self.state = State::Body { remaining: n };
                    } else {
                        self.close = true;
                        self.state = State::UntilClose;
                    }
                }
                State::Body { remaining } => {
                    let take = remaining.min(rest.len() as u64);
                    pos += take as usize;
                    if take == remaining {
                        return Ok((pos, Some(self.done())));
                    }
                    self.state = State::Body {
                        remaining: remaining - take,
                    };
                    return Ok((pos, None));
                }
                State::Chunked(mut chunked) => {
                    let (n, done) = chunked.feed(rest).map_err(ParseError::Chunk)?;
                    pos += n;
                    if done {
                        return Ok((pos, Some(self.done())));
                    }
                    self.state = State::Chunked(chunked);
                    return Ok((pos, None));
                }
                State::UntilClose => return Ok((buf.len(), None)),
            }
        }
    }

    /// The peer closed. Completes a body delimited by the close; None if nothing was
    /// in progress or a response was cut short.
    pub fn eof(&mut self) -> Option<Response> {
        if self.state == State::UntilClose {
            return Some(self.done());
        }
        None
    }

    fn done(&mut self) -> Response {
        self.state = State::Head;
        Response {
            status: self.status,
            close: self.close,
        }
    }
}

/// Parses `reads` as consecutive reads of one connection, keeping each unparsed rest,
/// then the close. Returns the responses, or the error that stopped parsing. For tests
/// and the fuzz target.
pub fn parse_all(reads: &[&[u8]]) -> Result<Vec<Response>, ParseError> {
    let mut parser = ResponseParser::new();
    let mut held: Vec<u8> = Vec::new();
    let mut out = Vec::new();
    for read in reads {
        held.extend_from_slice(read);
        loop {
            let (n, resp) = parser.parse(&held)?;
            assert!(n <= held.len(), "consumed more than it was given");
            held.drain(..n);
            match resp {
                Some(r) => out.push(r),
                None => break,
            }
        }
    }
    if let Some(r) = parser.eof() {
        out.push(r);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes, as a socket might deliver it, and
    /// returns the responses.
    fn feed(input: &[u8], step: usize) -> Result<Vec<Response>, ParseError> {
        let reads: Vec<&[u8]> = input.chunks(step.max(1)).collect();
        parse_all(&reads)
    }

    const PIPELINED: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello\
HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n10;ext=1\r\n0123456789abcdef\r\n0\r\nX-Trailer: t\r\n\r\n\
HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n\
HTTP/1.1 503 Busy\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

    #[test]
    fn pipelined_responses_split_at_every_byte_boundary() {
        let expected = vec![
            Response {
                status: 200,
                close: false,
            },
            Response {
                status: 404,
                close: false,
            },
            Response {
                status: 204,
                close: false,
            },
            Response {
                status: 503,
                close: true,
            },
        ];
        for step in 1..=PIPELINED.len() {
            assert_eq!(feed(PIPELINED, step).unwrap(), expected, "step {step}");
        }
    }

    #[test]
    fn a_body_delimited_by_close_and_http10() {
        let r = feed(b"HTTP/1.0 200 OK\r\n\r\nsome body", 3).unwrap();
        assert_eq!(
            r,
            vec![Response {
                status: 200,
                close: true
            }]
        );
        let r = feed(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\nx",
            1,
        )
        .unwrap();
        assert_eq!(
            r,
            vec![Response {
                status: 200,
                close: false
            }]
        );
    }

    #[test]
    fn responses_to_head_end_with_their_head() {
        let input: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n\
HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n\
HTTP/1.1 200 OK\r\n\r\n\
HTTP/1.1 503 Busy\r\nContent-Length: 9\r\nConnection: close\r\n\r\n";
        let statuses = |head: bool| {
            let mut parser = ResponseParser::for_request(head);
            let mut rest = input;
            let mut out = Vec::new();
            while let Ok((n, Some(r))) = parser.parse(rest) {
                out.push((r.status, r.close));
                rest = &rest[n..];
            }
            (out, parser.is_idle())
        };
        assert_eq!(
            statuses(true),
            (
                vec![(200, false), (404, false), (200, false), (503, true)],
                true
            )
        );
        // Read as the answer to a GET, the first one's body eats the next head.
        assert_eq!(statuses(false).0, vec![(200, false)]);
    }

    #[test]
    fn malformed_responses_are_errors() {
        assert!(feed(b"HTTX/1.1 200 OK\r\n\r\n", 100).is_err());
        assert!(feed(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", 100).is_err());
        assert!(feed(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            100
        )
        .is_err());
        assert!(feed(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\naXX",
            100
        )
        .is_err());
        let huge = [
            b"HTTP/1.1 200 OK\r\nX: ".as_slice(),
            &vec![b'a'; MAX_HEAD + 10],
        ]
        .concat();
        assert_eq!(feed(&huge, 4096), Err(ParseError::HeadTooLarge));
    }
}
