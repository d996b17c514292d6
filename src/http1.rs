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
    #[error("invalid trailer field line")]
    Trailer,
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

    /// Where the body stands, as two numbers (for a connection handed to another
    /// process): the part being read, and the data bytes left in the chunk.
    pub fn to_parts(self) -> (u8, u64) {
        match self.state {
            ChunkState::Size => (0, 0),
            ChunkState::Data { remaining } => (1, remaining),
            ChunkState::DataEnd => (2, 0),
            ChunkState::Trailers => (3, 0),
        }
    }

    /// The inverse of [`Chunked::to_parts`]; None for parts no body can be in.
    pub fn from_parts(part: u8, remaining: u64) -> Option<Chunked> {
        let state = match part {
            0 => ChunkState::Size,
            1 => ChunkState::Data { remaining },
            2 => ChunkState::DataEnd,
            3 => ChunkState::Trailers,
            _ => return None,
        };
        Some(Chunked { state })
    }

    /// Consumes body bytes from the front of `buf`. Returns how many were consumed and
    /// whether the body ended there. Fewer than `buf.len()` consumed without the end
    /// means a line is incomplete: call again with those bytes and more.
    pub fn feed(&mut self, buf: &[u8]) -> Result<(usize, bool), ChunkError> {
        let mut pos = 0;
        loop {
            let rest = &buf[pos..];
            match self.state {
                // Only the first MAX_LINE bytes are looked at, so that a line too
                // long gets the same error whether it arrived whole or in pieces.
                ChunkState::Size => match size_line(&rest[..rest.len().min(MAX_LINE)])? {
                    Some((n, size)) => {
                        pos += n;
                        self.state = if size == 0 {
                            ChunkState::Trailers
                        } else {
                            ChunkState::Data { remaining: size }
                        };
                    }
                    None if rest.len() >= MAX_LINE => return Err(ChunkError::LineTooLong),
                    None => return Ok((pos, false)),
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
                ChunkState::Trailers => match trailer_line(&rest[..rest.len().min(MAX_LINE)])? {
                    Some(2) => {
                        pos += 2;
                        self.state = ChunkState::Size;
                        return Ok((pos, true));
                    }
                    Some(n) => pos += n,
                    None if rest.len() >= MAX_LINE => return Err(ChunkError::TrailersTooLong),
                    None => return Ok((pos, false)),
                },
            }
        }
    }
}

/// Where a chunk-size line's parse is (RFC 9112 §7.1, §7.1.1):
/// `1*HEXDIG *( BWS ";" BWS name [ BWS "=" BWS ( token / quoted-string ) ] ) CRLF`.
#[derive(Clone, Copy)]
enum SizeAt {
    Size,
    /// Whitespace after a size or a value: only `;` may follow, not the line end.
    BwsSemi,
    /// After `;`, before a name.
    BwsName,
    Name,
    /// Whitespace after a name: `=` or `;` must follow, not the line end.
    AfterName,
    /// After `=`, before a value.
    BwsValue,
    Token,
    Quoted,
    /// After a backslash in a quoted string.
    QuotedPair,
    /// After a quoted string's closing quote.
    Quote,
    Cr,
}

/// Parses a chunk-size line at the front of `buf`: its length with the CRLF, and the
/// size; `None` while incomplete. Byte by byte, so that an invalid byte is an error as
/// soon as it arrives, however the input was split. An empty line, a line without
/// digits, or a bare LF taken as a line end is where a lenient parser and a strict
/// proxy split the body differently (request smuggling), so each is an error.
fn size_line(buf: &[u8]) -> Result<Option<(usize, u64)>, ChunkError> {
    use SizeAt::*;
    let mut at = Size;
    let mut size: u64 = 0;
    for (i, &b) in buf.iter().enumerate() {
        at = match at {
            Size if b.is_ascii_hexdigit() => {
                let digit = u64::from((b as char).to_digit(16).unwrap_or(0));
                // Wrapping would turn an oversized chunk into a small or last one.
                size = size
                    .checked_mul(16)
                    .and_then(|s| s.checked_add(digit))
                    .ok_or(ChunkError::Size)?;
                Size
            }
            Size if i == 0 => return Err(ChunkError::Size),
            Name if is_tchar(b) => Name,
            Token if is_tchar(b) => Token,
            BwsName if is_tchar(b) => Name,
            BwsName if is_ows(b) => BwsName,
            BwsValue if is_tchar(b) => Token,
            BwsValue if b == b'"' => Quoted,
            BwsValue if is_ows(b) => BwsValue,
            Quoted if b == b'"' => Quote,
            Quoted if b == b'\\' => QuotedPair,
            Quoted | QuotedPair if is_field_vchar(b) || is_ows(b) => Quoted,
            Name | AfterName if b == b'=' => BwsValue,
            Name | AfterName if is_ows(b) => AfterName,
            Size | Token | Quote | BwsSemi if is_ows(b) => BwsSemi,
            Size | Token | Quote | BwsSemi | Name | AfterName if b == b';' => BwsName,
            Size | Token | Quote | Name if b == b'\r' => Cr,
            Cr if b == b'\n' => return Ok(Some((i + 1, size))),
            _ => return Err(ChunkError::Size),
        };
    }
    Ok(None)
}

/// Parses a trailer line at the front of `buf` (RFC 9112 §7.1.2): a field line
/// `name ":" value CRLF`, or the empty line that ends the body. Returns its length with
/// the CRLF (2 for the empty line); `None` while incomplete. Held to the rules of a
/// request head: CRLF only, no obs-fold, no whitespace before the colon.
fn trailer_line(buf: &[u8]) -> Result<Option<usize>, ChunkError> {
    let mut in_value = false;
    for (i, &b) in buf.iter().enumerate() {
        match b {
            b'\r' if i == 0 || in_value => {
                return match buf.get(i + 1) {
                    Some(b'\n') => Ok(Some(i + 2)),
                    Some(_) => Err(ChunkError::Trailer),
                    None => Ok(None),
                };
            }
            _ if in_value && (is_field_vchar(b) || is_ows(b)) => {}
            b':' if i > 0 => in_value = true,
            _ if !in_value && is_tchar(b) => {}
            _ => return Err(ChunkError::Trailer),
        }
    }
    Ok(None)
}

fn is_ows(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// A token character (RFC 9110 §5.6.2).
pub(crate) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A visible character or obs-text (RFC 9110 §5.5): what a field value holds besides
/// SP and HTAB.
pub(crate) fn is_field_vchar(b: u8) -> bool {
    (0x21..=0x7e).contains(&b) || b >= 0x80
}

/// Where the first LF not preceded by CR is in `buf`. RFC 9112 §2.2 lets a recipient
/// take a bare LF as a line end; a server behind a proxy must not, since the proxy may
/// not, and then the two disagree on where a request ends.
pub fn bare_lf(buf: &[u8]) -> Option<usize> {
    // Every request head goes through this, so it jumps from LF to LF with memchr's
    // vectorised search (a wrk head has three) instead of looking at every byte.
    memchr::memchr_iter(b'\n', buf).find(|&i| i == 0 || buf[i - 1] != b'\r')
}

/// Whether a comma-separated header value lists `token` (case-insensitive), as in
/// `Connection: keep-alive, Upgrade`.
pub fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// How many times a comma-separated header value lists `token` (case-insensitive).
pub fn count_token(value: &[u8], token: &str) -> usize {
    value
        .split(|&b| b == b',')
        .filter(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
        .count()
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
    if v.is_empty() {
        return None;
    }
    // One pass; a value past u64 is as invalid as a sign or a space.
    v.iter().try_fold(0u64, |n, &b| {
        if b.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
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

    /// Feeds `body` as two reads cut at `at`, keeping the unconsumed rest as callers do.
    fn skip_split(body: &[u8], at: usize) -> Result<usize, ChunkError> {
        let mut c = Chunked::new();
        let (n, done) = c.feed(&body[..at])?;
        if done {
            return Ok(n);
        }
        let (m, done) = c.feed(&body[n..])?;
        Ok(if done { n + m } else { usize::MAX })
    }

    /// Chunked bodies RFC 9112 §7.1 does not allow, each of which some parser reads
    /// as a different framing: a size line without digits or with a bare LF, an
    /// extension that is not `;name[=token|quoted]`, a trailer that is not a field line.
    const INVALID_CHUNKED: &[(&str, &[u8])] = &[
        ("empty size line", b"\r\n\r\n"),
        ("size line of whitespace", b" \r\n\r\n"),
        ("extension without a size", b";x\r\n\r\n"),
        ("bare LF ending a size line", b"3\nabc\r\n0\r\n\r\n"),
        ("bare LF in an extension", b"3;x\nabc\r\n0\r\n\r\n"),
        (
            "bare LF in a quoted extension",
            b"3;x=\"\n\"\r\nabc\r\n0\r\n\r\n",
        ),
        ("bare CR in an extension", b"3;x\ry\r\nabc\r\n0\r\n\r\n"),
        ("extension without a name", b"3;=x\r\nabc\r\n0\r\n\r\n"),
        ("extension with an empty value", b"3;x=\r\nabc\r\n0\r\n\r\n"),
        (
            "extension name with a space inside",
            b"3;x y\r\nabc\r\n0\r\n\r\n",
        ),
        ("whitespace after an extension", b"3;x \r\nabc\r\n0\r\n\r\n"),
        (
            "control byte in an extension",
            b"3;x=\x01\r\nabc\r\n0\r\n\r\n",
        ),
        ("NUL in an extension", b"3;x\x00\r\nabc\r\n0\r\n\r\n"),
        (
            "unterminated quoted extension",
            b"3;x=\"a\r\nabc\r\n0\r\n\r\n",
        ),
        ("whitespace after a size", b"3 \r\nabc\r\n0\r\n\r\n"),
        ("whitespace before a size", b" 3\r\nabc\r\n0\r\n\r\n"),
        (
            "size over 64 bits",
            b"10000000000000003\r\nabc\r\n0\r\n\r\n",
        ),
        ("size of 16 f and one more digit", b"ffffffffffffffff0\r\n"),
        ("size with 0x", b"0x3\r\nabc\r\n0\r\n\r\n"),
        ("size with a sign", b"+3\r\nabc\r\n0\r\n\r\n"),
        ("bare LF after data", b"3\r\nabc\n0\r\n\r\n"),
        ("bare LF ending a trailer", b"0\r\nX: y\n\r\n"),
        ("bare LF ending the trailers", b"0\r\n\n"),
        ("bare CR in a trailer", b"0\r\nX: a\rb\r\n\r\n"),
        ("NUL in a trailer", b"0\r\nX: a\x00b\r\n\r\n"),
        ("trailer without a colon", b"0\r\nnot a field\r\n\r\n"),
        ("trailer with an empty name", b"0\r\n: v\r\n\r\n"),
        ("whitespace before a trailer colon", b"0\r\nX : v\r\n\r\n"),
        ("obs-fold in the trailers", b"0\r\nX: a\r\n b\r\n\r\n"),
    ];

    #[test]
    fn invalid_chunked_bodies_are_errors_however_they_are_split() {
        let mut accepted = Vec::new();
        for &(name, body) in INVALID_CHUNKED {
            let mut results: Vec<_> = (0..=body.len()).map(|at| skip_split(body, at)).collect();
            results.push(skip_all(body, 1));
            if let Some(r) = results.iter().find(|r| r.is_ok()) {
                accepted.push(format!("{name}: {r:?}"));
            }
        }
        assert!(accepted.is_empty(), "\n{}", accepted.join("\n"));
    }

    #[test]
    fn chunked_bodies_rfc_9112_allows_end_exactly_at_any_split() {
        let body = b"3 ;a = b\t; c=\"q;\\\"x\"\r\nabc\r\n00A;d\r\n0123456789\r\n\
ffffffffffffffff\r\n";
        // A size of 2^64 - 1 is valid: it is skipped, not held, so only its size line
        // is checked here.
        assert_eq!(skip_all(body, 1), Ok(usize::MAX));
        let body = b"3 ;a = b\t; c=\"q;\\\"x\"\r\nabc\r\n00A;d\r\n0123456789\r\n\
000;e=\"\"\r\nX-T: v\t1\r\nY:\r\n\r\nNEXT";
        for at in 0..=body.len() {
            assert_eq!(skip_split(body, at), Ok(body.len() - 4), "split at {at}");
        }
        assert_eq!(skip_all(body, 1), Ok(body.len() - 4));
    }

    #[test]
    fn bare_lf_is_an_lf_without_its_cr() {
        assert_eq!(bare_lf(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"), None);
        assert_eq!(bare_lf(b"\nGET"), Some(0));
        assert_eq!(bare_lf(b"a\r\nb\nc\n"), Some(4));
        assert_eq!(bare_lf(b"\r\n\n"), Some(2));
        assert_eq!(bare_lf(b"\n\r"), Some(0));
        assert_eq!(bare_lf(b"a\r"), None);
    }

    #[test]
    fn header_values() {
        assert!(has_token(b"keep-alive, Upgrade", "upgrade"));
        assert!(!has_token(b"keep-alive", "close"));
        assert!(is_chunked(b"gzip, chunked"));
        assert!(!is_chunked(b"chunked, gzip"));
        assert_eq!(count_token(b"chunked, Chunked", "chunked"), 2);
        assert_eq!(count_token(b"gzip, chunked", "chunked"), 1);
        assert_eq!(content_length(b" 42 "), Some(42));
        assert_eq!(content_length(b"+42"), None);
        assert_eq!(content_length(b"4 2"), None);
        assert_eq!(content_length(b""), None);
        assert_eq!(content_length(b"007"), Some(7));
        assert_eq!(content_length(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(content_length(b"18446744073709551616"), None);
    }
}
