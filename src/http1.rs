//! HTTP/1.1 pieces shared by the server's http mode and edgeload's response parser.

/// A chunked body (RFC 9112 §7.1) being skipped: sizes, data, CRLFs, trailers.
/// It never holds body bytes; it only says how many input bytes belong to the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunked {
    state: ChunkState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size,
    Data { remaining: u64 },
    DataEnd,
    Trailers,
}

/// What is wrong with a chunked body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("invalid chunk size line")]
    Size,
    #[error("chunk size line over {MAX_LINE} bytes")]
    LineTooLong,
    #[error("missing CRLF after chunk data")]
    DataEnd,
    #[error("trailer section over {MAX_LINE} bytes")]
    TrailersTooLong,
}

/// Longest chunk-size line or trailer line accepted, CRLF included.
pub const MAX_LINE: usize = 4096;

impl Default for Chunked {
    fn default() -> Self {
        Chunked::new()
    }
}

impl Chunked {
    pub fn new() -> Chunked {
        Chunked {
            state: ChunkState::Size,
        }
    }

    /// Consumes body bytes from the front of `buf`. Returns how many were consumed and
    /// whether the body ended there. Fewer than `buf.len()` consumed without the end
    /// means a line is incomplete: call again with those bytes and more.
    pub fn feed(&mut self, buf: &[u8]) -> Result<(usize, bool), ChunkError> {
        let mut pos = 0;
        loop {
            let rest = &buf[pos..];
            match self.state {
                ChunkState::Size => match httparse::parse_chunk_size(rest) {
                    Ok(httparse::Status::Complete((n, size))) => {
                        // The same limit whether the line arrived whole or in pieces.
                        if n > MAX_LINE {
                            return Err(ChunkError::LineTooLong);
                        }
                        pos += n;
                        self.state = if size == 0 {
                            ChunkState::Trailers
                        } else {
                            ChunkState::Data { remaining: size }
                        };
                    }
                    Ok(httparse::Status::Partial) => {
                        // The line will be at least one byte longer than what is here.
                        if rest.len() >= MAX_LINE {
                            return Err(ChunkError::LineTooLong);
                        }
                        return Ok((pos, false));
                    }
                    Err(_) => return Err(ChunkError::Size),
                },
                ChunkState::Data { remaining } => {
                    let take = remaining.min(rest.len() as u64);
                    pos += take as usize;
                    if take < remaining {
                        self.state = ChunkState::Data {
                            remaining: remaining - take,
                        };
                        return Ok((pos, false));
                    }
                    self.state = ChunkState::DataEnd;
                }
                ChunkState::DataEnd => {
                    if rest.len() < 2 {
                        if rest.first().is_some_and(|&b| b != b'\r') {
                            return Err(ChunkError::DataEnd);
                        }
                        return Ok((pos, false));
                    }
                    if &rest[..2] != b"\r\n" {
                        return Err(ChunkError::DataEnd);
                    }
                    pos += 2;
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
                        if rest.len() >= MAX_LINE {
                            return Err(ChunkError::TrailersTooLong);
                        }
                        return Ok((pos, false));
                    };
                    if eol + 2 > MAX_LINE {
                        return Err(ChunkError::TrailersTooLong);
                    }
                    pos += eol + 2;
                    if eol == 0 {
                        self.state = ChunkState::Size;
                        return Ok((pos, true));
                    }
                }
            }
        }
    }
}

/// Whether a comma-separated header value lists `token` (case-insensitive), as in
/// `Connection: keep-alive, Upgrade`.
pub fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Whether the last coding of a Transfer-Encoding value is `chunked`.
pub fn is_chunked(value: &[u8]) -> bool {
    value
        .rsplit(|&b| b == b',')
        .next()
        .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// Parses a Content-Length value: digits only (no sign, no spaces inside).
pub fn content_length(value: &[u8]) -> Option<u64> {
    let v = value.trim_ascii();
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn skip_all(body: &[u8], step: usize) -> Result<usize, ChunkError> {
        let mut c = Chunked::new();
        let mut held = Vec::new();
        let mut total = 0;
        for piece in body.chunks(step) {
            held.extend_from_slice(piece);
            let (n, done) = c.feed(&held)?;
            total += n;
            held.drain(..n);
            if done {
                return Ok(total);
            }
        }
        Ok(usize::MAX)
    }

    #[test]
    fn chunked_bodies_end_exactly_at_any_split() {
        let body = b"4\r\nwiki\r\n5;ext=x\r\npedia\r\n0\r\nTrailer: t\r\n\r\nNEXT";
        for step in 1..body.len() {
            assert_eq!(skip_all(body, step), Ok(body.len() - 4), "step {step}");
        }
    }

    #[test]
    fn chunked_errors() {
        assert_eq!(skip_all(b"zz\r\n", 100), Err(ChunkError::Size));
        assert_eq!(skip_all(b"1\r\naXY", 100), Err(ChunkError::DataEnd));
        let long_extension = [b"1;x=".as_slice(), &vec![b'a'; MAX_LINE + 10]].concat();
        assert_eq!(skip_all(&long_extension, 100), Err(ChunkError::LineTooLong));
        // A size too large for 64 bits is invalid, not a huge body.
        assert_eq!(
            skip_all(b"11111111111111111111\r\n", 100),
            Err(ChunkError::Size)
        );
    }

    #[test]
    fn header_values() {
        assert!(has_token(b"keep-alive, Upgrade", "upgrade"));
        assert!(!has_token(b"keep-alive", "close"));
        assert!(is_chunked(b"gzip, chunked"));
        assert!(!is_chunked(b"chunked, gzip"));
        assert_eq!(content_length(b" 42 "), Some(42));
        assert_eq!(content_length(b"+42"), None);
        assert_eq!(content_length(b"4 2"), None);
        assert_eq!(content_length(b""), None);
    }
}
