//! The PROXY header a trusted proxy sends before its client's bytes (HAProxy's
//! proxy-protocol.txt, sections 2.1 and 2.2), read strictly: version 1 (one text
//! line) or version 2 (binary), nothing else.
//!
//! [`read`] looks at the bytes received so far and gives one of three answers: a
//! complete header (its length and the addresses it names); [`Error::Incomplete`], a
//! strict prefix of a header this reader would accept (wait for more); or
//! [`Error::Invalid`], bytes that no continuation can turn into a header (close now).
//! A byte that cannot belong to a header is refused as soon as it arrives, not at the
//! deadline, and the answers are monotonic: more bytes never turn `Invalid` into
//! anything else, and never change a complete header (the `proxy_header` fuzz target
//! checks both).
//!
//! Version 1, at most [`V1_MAX_LEN`] bytes with its CRLF:
//!
//! ```text
//! PROXY TCP4 192.0.2.1 198.51.100.7 51000 7001\r\n
//! PROXY TCP6 2001:db8::1 ::1 51000 7001\r\n
//! PROXY UNKNOWN[ anything]\r\n          (the connection's own addresses stand)
//! ```
//!
//! Exactly one space between fields; IPv4 as four decimal numbers without leading
//! zeros; IPv6 as hexadecimal groups and colons (at most one `::`, the last 32 bits
//! possibly dotted, as inet_ntop writes `::ffff:192.0.2.1`); ports in decimal
//! without leading zeros; a CR or LF alone, or any byte that is not printable ASCII,
//! is an error. Version 2: see [`V2`].

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use super::SIGNATURE;

/// The longest version 1 header, CRLF included: `PROXY UNKNOWN` with two full IPv6
/// addresses and ports (section 2.1).
pub const V1_MAX_LEN: usize = 107;

/// The most address and TLV bytes a version 2 header may announce here. The format
/// allows 65,535; real proxies send their addresses (at most 216 bytes, for AF_UNIX)
/// and a few TLVs (ALPN, authority, a unique ID of at most 128 bytes, SSL names, a
/// cloud's endpoint ID), well under this. A larger announcement is refused at once,
/// so a header never makes a connection hold more than [`MAX_LEN`] bytes unread.
pub const V2_MAX_ADDRESS_LEN: usize = 2048;

/// The most bytes the reader ever needs to see: a version 2 header at its cap.
pub const MAX_LEN: usize = 16 + V2_MAX_ADDRESS_LEN;

/// How every version 1 header begins.
const V1_PREFIX: &[u8] = b"PROXY ";

/// A complete header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// 1 or 2.
    pub version: u8,
    /// Its length in bytes: what to consume before the client's own bytes.
    pub len: usize,
    /// The client and the address it connected to; None when the header names no
    /// addresses (v1 `UNKNOWN`, v2 `LOCAL`, `UNSPEC`, or a v2 family other than TCP over
    /// IPv4 or IPv6), and the connection's own addresses stand.
    pub addrs: Option<(SocketAddr, SocketAddr)>,
}

/// Why bytes are not (yet) a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// A strict prefix of a header this reader accepts: more bytes are needed.
    Incomplete,
    /// Not a header, and no bytes that could follow make one; the reason, for the log.
    Invalid(&'static str),
}

/// Reads the header at the start of `buf` (see the module docs). Never looks past
/// [`MAX_LEN`] bytes, and never panics.
pub fn read(buf: &[u8]) -> Result<Received, Error> {
    match buf.first() {
        None => Err(Error::Incomplete),
        Some(b'\r') => V2::new_checked(buf).map(|h| Received {
            version: 2,
            len: h.len(),
            addrs: h.addresses(),
        }),
        Some(b'P') => read_v1(buf),
        Some(_) => Err(Error::Invalid("neither a PROXY v1 line nor a v2 signature")),
    }
}

/// A version 2 header (section 2.2), validated once by [`V2::new_checked`]; no
/// accessor can index out of bounds after it.
///
/// ```text
/// 0..12   signature  \r\n\r\n\0\r\nQUIT\n
/// 12      version (high nibble, 2) and command (low: 0 LOCAL, 1 PROXY)
/// 13      family (high: 0 UNSPEC, 1 INET, 2 INET6, 3 UNIX) and protocol (low: 0
///         UNSPEC, 1 STREAM, 2 DGRAM)
/// 14..16  length of what follows, big-endian: addresses, then TLVs (skipped)
/// ```
///
/// Checked: the version is 2; the command LOCAL or PROXY; the family and protocol
/// among those listed (others "must be rejected as invalid by receivers"); the length
/// at most [`V2_MAX_ADDRESS_LEN`]; and, for PROXY, at least the address block its
/// family needs (12, 36 or 216 bytes). LOCAL ignores the family and its addresses
/// ("the receiver must use the real connection endpoints"); so do UNSPEC, UDP and
/// UNIX, which a receiver may treat as UNSPEC.
#[derive(Debug, Clone, Copy)]
pub struct V2<'a> {
    /// Exactly the header's bytes, 16 + its length.
    buf: &'a [u8],
}

impl<'a> V2<'a> {
    /// Validates the header at the start of `buf`; bytes after it are not looked at.
    pub fn new_checked(buf: &'a [u8]) -> Result<V2<'a>, Error> {
        let n = buf.len().min(SIGNATURE.len());
        if buf[..n] != SIGNATURE[..n] {
            return Err(Error::Invalid("not the PROXY v2 signature"));
        }
        let Some(&ver_cmd) = buf.get(12) else {
            return Err(Error::Incomplete);
        };
        if ver_cmd >> 4 != 2 {
            return Err(Error::Invalid("PROXY v2: the version is not 2"));
        }
        if ver_cmd & 0x0f > 1 {
            return Err(Error::Invalid(
                "PROXY v2: the command is neither LOCAL nor PROXY",
            ));
        }
        let Some(&family) = buf.get(13) else {
            return Err(Error::Incomplete);
        };
        if family >> 4 > 3 || family & 0x0f > 2 {
            return Err(Error::Invalid(
                "PROXY v2: an address family or protocol the format does not define",
            ));
        }
        let (Some(&hi), Some(&lo)) = (buf.get(14), buf.get(15)) else {
            return Err(Error::Incomplete);
        };
        let len = u16::from_be_bytes([hi, lo]) as usize;
        if len > V2_MAX_ADDRESS_LEN {
            return Err(Error::Invalid(
                "PROXY v2: more than 2048 address and TLV bytes announced",
            ));
        }
        if ver_cmd & 0x0f == 1 && len < address_len(family) {
            return Err(Error::Invalid(
                "PROXY v2: shorter than the addresses of its family",
            ));
        }
        match buf.get(..16 + len) {
            Some(buf) => Ok(V2 { buf }),
            None => Err(Error::Incomplete),
        }
    }

    /// The header's length in bytes.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether it is empty (never: a header has at least 16 bytes).
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// LOCAL: a connection of the proxy's own (a health check), not relayed.
    pub fn is_local(&self) -> bool {
        self.buf[12] & 0x0f == 0
    }

    /// The family and protocol byte.
    pub fn family(&self) -> u8 {
        self.buf[13]
    }

    /// The client and the address it connected to, for PROXY over TCP/IPv4 or
    /// TCP/IPv6; None otherwise (the connection's own addresses stand).
    pub fn addresses(&self) -> Option<(SocketAddr, SocketAddr)> {
        if self.is_local() {
            return None;
        }
        // new_checked saw at least address_len(family) bytes after the 16.
        let a = &self.buf[16..];
        let port = |i: usize| u16::from_be_bytes([a[i], a[i + 1]]);
        match self.family() {
            0x11 => {
                let src = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
                let dst = Ipv4Addr::new(a[4], a[5], a[6], a[7]);
                Some((
                    SocketAddr::from((src, port(8))),
                    SocketAddr::from((dst, port(10))),
                ))
            }
            0x21 => {
                let mut src = [0u8; 16];
                let mut dst = [0u8; 16];
                src.copy_from_slice(&a[..16]);
                dst.copy_from_slice(&a[16..32]);
                Some((
                    SocketAddr::from((Ipv6Addr::from(src), port(32))),
                    SocketAddr::from((Ipv6Addr::from(dst), port(34))),
                ))
            }
            _ => None,
        }
    }
}

/// The address block a PROXY header of `family` must carry: 2 addresses and, for IP,
/// 2 ports; none for an UNSPEC family or protocol.
fn address_len(family: u8) -> usize {
    if family & 0x0f == 0 {
        return 0;
    }
    match family >> 4 {
        1 => 12,
        2 => 36,
        3 => 216,
        _ => 0,
    }
}

/// Reads a version 1 line at the start of `buf`.
fn read_v1(buf: &[u8]) -> Result<Received, Error> {
    let n = buf.len().min(V1_PREFIX.len());
    if buf[..n] != V1_PREFIX[..n] {
        return Err(Error::Invalid("neither a PROXY v1 line nor a v2 signature"));
    }
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    for (i, &b) in window.iter().enumerate() {
        match b {
            b'\r' => match window.get(i + 1) {
                Some(b'\n') => {
                    let addrs = v1_addresses(&window[V1_PREFIX.len()..i])?;
                    return Ok(Received {
                        version: 1,
                        len: i + 2,
                        addrs,
                    });
                }
                Some(_) => return Err(Error::Invalid("PROXY v1: a CR not followed by LF")),
                None => break,
            },
            // Every byte before the CRLF is printable ASCII; a bare LF, a NUL or any
            // other control byte can never be part of the line.
            0x20..=0x7e => {}
            _ => {
                return Err(Error::Invalid(
                    "PROXY v1: a byte that is not printable ASCII before the CRLF",
                ))
            }
        }
    }
    if buf.len() >= V1_MAX_LEN {
        return Err(Error::Invalid("PROXY v1: no CRLF within 107 bytes"));
    }
    Err(Error::Incomplete)
}

/// The fields after `PROXY `, before the CRLF.
fn v1_addresses(fields: &[u8]) -> Result<Option<(SocketAddr, SocketAddr)>, Error> {
    // read_v1 let only printable ASCII through.
    let text = std::str::from_utf8(fields).map_err(|_| Error::Invalid("PROXY v1: not ASCII"))?;
    // "the receiver must ignore anything presented before the CRLF is found".
    if text == "UNKNOWN" || text.starts_with("UNKNOWN ") {
        return Ok(None);
    }
    // split(' ') yields an empty field for two spaces in a row, which no parser
    // below accepts: exactly one space between fields.
    let mut f = text.split(' ');
    let v6 = match f.next() {
        Some("TCP4") => false,
        Some("TCP6") => true,
        _ => {
            return Err(Error::Invalid(
                "PROXY v1: the protocol is not TCP4, TCP6 or UNKNOWN",
            ))
        }
    };
    let (Some(src), Some(dst), Some(sport), Some(dport), None) =
        (f.next(), f.next(), f.next(), f.next(), f.next())
    else {
        return Err(Error::Invalid(
            "PROXY v1: not 'PROXY TCP4|TCP6 SRC DST SPORT DPORT'",
        ));
    };
    let bad_port = Error::Invalid("PROXY v1: a port that is not 0 to 65535 without leading zeros");
    let sport = v1_port(sport).ok_or(bad_port)?;
    let dport = v1_port(dport).ok_or(bad_port)?;
    let (src, dst) = if v6 {
        let bad = Error::Invalid("PROXY v1: TCP6 with an address that is not IPv6");
        (
            SocketAddr::from((v1_ipv6(src).ok_or(bad)?, sport)),
            SocketAddr::from((v1_ipv6(dst).ok_or(bad)?, dport)),
        )
    } else {
        let bad = Error::Invalid("PROXY v1: TCP4 with an address that is not dotted IPv4");
        (
            SocketAddr::from((v1_ipv4(src).ok_or(bad)?, sport)),
            SocketAddr::from((v1_ipv4(dst).ok_or(bad)?, dport)),
        )
    };
    Ok(Some((src, dst)))
}

/// A decimal number of at most `max`, 1 to 5 digits, without a leading zero.
fn v1_number(s: &str, max: u32) -> Option<u32> {
    let digits = s.as_bytes();
    if digits.is_empty() || digits.len() > 5 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    if digits.len() > 1 && digits[0] == b'0' {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u32, |n, d| n * 10 + u32::from(d - b'0'));
    (n <= max).then_some(n)
}

fn v1_port(s: &str) -> Option<u16> {
    v1_number(s, 65535).map(|n| n as u16)
}

/// Exactly four decimal numbers 0 to 255 without leading zeros, one dot between each.
fn v1_ipv4(s: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = s.split('.');
    for o in octets.iter_mut() {
        *o = v1_number(parts.next()?, 255)? as u8;
    }
    parts.next().is_none().then_some(Ipv4Addr::from(octets))
}

/// Hexadecimal groups and colons, as an IPv6 address: at most one `::`, 128 bits in
/// all. The last 32 bits may be written as dotted IPv4, as inet_ntop writes an
/// IPv4-mapped address (`::ffff:192.0.2.1`) and HAProxy sends it; no zone (`%eth0`).
fn v1_ipv6(s: &str) -> Option<Ipv6Addr> {
    if s.is_empty()
        || !s
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
    {
        return None;
    }
    s.parse().ok()
}

/// The property the `proxy_header` fuzz target checks and `cargo test` replays on its
/// seed corpus; panics if it fails.
///
/// - Any bytes: no panic; a complete header lies within them and within
///   [`MAX_LEN`] (v1: [`V1_MAX_LEN`]).
/// - Monotonic: for every prefix, a complete header is the same header the whole
///   input gives, and `Invalid` means the whole input is `Invalid` too (so refusing
///   early never refuses what more bytes would have made valid), and no strict prefix
///   of a header is complete.
/// - Round trip: two addresses drawn from the input, written as a v2 header by
///   [`super::encode`] and as a v1 line, read back as themselves, with the input
///   after them untouched.
pub fn check(data: &[u8]) {
    let whole = read(data);
    if let Ok(h) = whole {
        assert!(
            h.len <= data.len(),
            "a header of {} in {} bytes",
            h.len,
            data.len()
        );
        assert!(h.len <= MAX_LEN);
        assert!(h.version == 2 || h.len <= V1_MAX_LEN);
    }
    for cut in 0..=data.len().min(MAX_LEN + 1) {
        match read(&data[..cut]) {
            Ok(h) => assert_eq!(Ok(h), whole, "a prefix of {cut} bytes"),
            Err(Error::Invalid(why)) => {
                assert!(
                    matches!(whole, Err(Error::Invalid(_))),
                    "a prefix of {cut} bytes is invalid ({why}), the whole is {whole:?}"
                )
            }
            Err(Error::Incomplete) => {}
        }
    }
    if data.len() < 37 {
        return;
    }
    let addr = |v6: bool, ip: &[u8], port: &[u8]| -> SocketAddr {
        let port = u16::from_be_bytes([port[0], port[1]]);
        if v6 {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&ip[..16]);
            SocketAddr::from((octets, port))
        } else {
            SocketAddr::from(([ip[0], ip[1], ip[2], ip[3]], port))
        }
    };
    let v6 = data[0] & 1 != 0;
    let src = addr(v6, &data[1..17], &data[33..35]);
    let dst = addr(v6, &data[17..33], &data[35..37]);
    let rest = &data[37..];
    let mut v2 = Vec::new();
    super::encode(src, dst, &mut v2);
    let v2_len = v2.len();
    v2.extend_from_slice(rest);
    let got = read(&v2).expect("an encoded v2 header reads back");
    assert_eq!((got.version, got.len), (2, v2_len));
    assert_eq!(got.addrs, Some((src, dst)));
    let mut v1 = format!(
        "PROXY {} {} {} {} {}\r\n",
        if v6 { "TCP6" } else { "TCP4" },
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
    .into_bytes();
    let v1_len = v1.len();
    assert!(v1_len <= V1_MAX_LEN);
    v1.extend_from_slice(rest);
    let got = read(&v1).expect("a v1 line reads back");
    assert_eq!((got.version, got.len), (1, v1_len));
    assert_eq!(got.addrs, Some((src, dst)));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn invalid(buf: &[u8]) -> &'static str {
        match read(buf) {
            Err(Error::Invalid(why)) => why,
            other => panic!(
                "{:?}: expected Invalid, got {other:?}",
                String::from_utf8_lossy(buf)
            ),
        }
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        let line = b"PROXY TCP4 192.0.2.1 198.51.100.7 51000 7001\r\nGET / HTTP/1.1\r\n";
        assert_eq!(
            read(line),
            Ok(Received {
                version: 1,
                len: 46,
                addrs: Some((v4("192.0.2.1:51000"), v4("198.51.100.7:7001")))
            })
        );
        let line = b"PROXY TCP6 2001:db8::1 ::1 0 65535\r\n";
        assert_eq!(
            read(line).unwrap().addrs,
            Some((v4("[2001:db8::1]:0"), v4("[::1]:65535")))
        );
        let mapped = b"PROXY TCP6 ::ffff:192.0.2.1 ::1 1 2\r\n";
        assert_eq!(
            read(mapped).unwrap().addrs,
            Some((v4("[::ffff:192.0.2.1]:1"), v4("[::1]:2")))
        );
        let full = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(full.len(), 104);
        assert_eq!(read(full).unwrap().len, 104);
        assert_eq!(
            read(b"PROXY UNKNOWN\r\n"),
            Ok(Received {
                version: 1,
                len: 15,
                addrs: None
            })
        );
        // The worst case of section 2.1: 107 bytes, CRLF included.
        let mut worst = b"PROXY UNKNOWN ".to_vec();
        worst.extend_from_slice(&[b'f'; 91]);
        worst.extend_from_slice(b"\r\n");
        assert_eq!(worst.len(), V1_MAX_LEN);
        assert_eq!(read(&worst).unwrap().len, V1_MAX_LEN);
    }

    #[test]
    fn v1_truncated_at_every_byte_is_incomplete() {
        let line = b"PROXY TCP4 192.0.2.1 198.51.100.7 51000 7001\r\n";
        for cut in 0..line.len() {
            assert_eq!(read(&line[..cut]), Err(Error::Incomplete), "cut {cut}");
        }
    }

    #[test]
    fn v1_impossible_lines_are_refused() {
        for (bad, why) in [
            (
                &b"PROXY TCP4 192.0.2.1 198.51.100.7 51000 7001\n"[..],
                "not printable",
            ),
            (
                b"PROXY TCP4 192.0.2.1 198.51.100.7 51000 7001\rX",
                "CR not followed",
            ),
            (
                b"PROXY TCP4  192.0.2.1 198.51.100.7 51000 7001\r\n",
                "not 'PROXY",
            ),
            (
                b"PROXY TCP4 192.0.2.1 198.51.100.7 51000 7001 \r\n",
                "not 'PROXY",
            ),
            (b"PROXY TCP4 192.0.2.1 198.51.100.7 51000\r\n", "not 'PROXY"),
            (
                b"PROXY TCP4 192.0.2.01 198.51.100.7 51000 7001\r\n",
                "dotted IPv4",
            ),
            (
                b"PROXY TCP4 192.0.2.256 198.51.100.7 51000 7001\r\n",
                "dotted IPv4",
            ),
            (
                b"PROXY TCP4 192.0.2 198.51.100.7 51000 7001\r\n",
                "dotted IPv4",
            ),
            (b"PROXY TCP4 ::1 198.51.100.7 51000 7001\r\n", "dotted IPv4"),
            (b"PROXY TCP6 192.0.2.1 ::1 51000 7001\r\n", "not IPv6"),
            (b"PROXY TCP6 ::1%lo ::1 51000 7001\r\n", "not IPv6"),
            (
                b"PROXY TCP6 ::ffff:192.0.2.01 ::1 51000 7001\r\n",
                "not IPv6",
            ),
            (b"PROXY TCP6 1::2::3 ::1 51000 7001\r\n", "not IPv6"),
            (
                b"PROXY TCP4 192.0.2.1 198.51.100.7 65536 7001\r\n",
                "a port",
            ),
            (
                b"PROXY TCP4 192.0.2.1 198.51.100.7 051000 7001\r\n",
                "a port",
            ),
            (b"PROXY TCP4 192.0.2.1 198.51.100.7 -1 7001\r\n", "a port"),
            (
                b"PROXY UDP4 192.0.2.1 198.51.100.7 51000 7001\r\n",
                "TCP4, TCP6 or UNKNOWN",
            ),
            (b"PROXY UNKNOWNX\r\n", "TCP4, TCP6 or UNKNOWN"),
            (
                b"PROXY tcp4 192.0.2.1 198.51.100.7 51000 7001\r\n",
                "TCP4, TCP6 or UNKNOWN",
            ),
            (
                b"PROXY TCP4 192.0.2.1 198.51.100.7 51000 7001\0\r\n",
                "not printable",
            ),
            (b"proxy TCP4", "neither"),
            (b"PROXYTCP4", "neither"),
            (b"GET / HTTP/1.1\r\n", "neither"),
            (b"\x16\x03\x01", "neither"),
        ] {
            let got = invalid(bad);
            assert!(
                got.contains(why),
                "{:?}: {got}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.extend_from_slice(&[b'f'; 92]);
        long.extend_from_slice(b"\r\n");
        assert_eq!(long.len(), V1_MAX_LEN + 1);
        assert!(invalid(&long).contains("no CRLF within 107"));
        // Refused at byte 107, not before, and not only at some deadline.
        assert_eq!(read(&long[..V1_MAX_LEN - 1]), Err(Error::Incomplete));
        assert!(invalid(&long[..V1_MAX_LEN]).contains("no CRLF"));
    }

    fn v2(cmd: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut out = SIGNATURE.to_vec();
        out.push(0x20 | cmd);
        out.push(family);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn v2_proxy_local_unspec_and_tlvs() {
        let mut body = vec![192, 0, 2, 1, 198, 51, 100, 7, 0xc7, 0x38, 0x1b, 0x59];
        let h = v2(1, 0x11, &body);
        assert_eq!(
            read(&h),
            Ok(Received {
                version: 2,
                len: 28,
                addrs: Some((v4("192.0.2.1:51000"), v4("198.51.100.7:7001")))
            })
        );
        // TLVs after the addresses (an ALPN "h2") are part of the header, skipped.
        body.extend_from_slice(&[0x01, 0x00, 0x02, b'h', b'2']);
        let mut h = v2(1, 0x11, &body);
        h.extend_from_slice(b"GET /");
        let got = read(&h).unwrap();
        assert_eq!((got.len, got.addrs.is_some()), (33, true));
        // LOCAL: the family and addresses are ignored; the connection's own stand.
        assert_eq!(read(&v2(0, 0x00, &[])).unwrap().addrs, None);
        assert_eq!(read(&v2(0, 0x11, &body)).unwrap().addrs, None);
        assert_eq!(read(&v2(0, 0x21, &[])).unwrap().len, 16);
        // PROXY with UNSPEC, UDP or UNIX: treated as UNSPEC (no addresses used).
        assert_eq!(read(&v2(1, 0x00, &[])).unwrap().addrs, None);
        assert_eq!(read(&v2(1, 0x12, &[0; 12])).unwrap().addrs, None);
        assert_eq!(read(&v2(1, 0x32, &[0; 216])).unwrap().addrs, None);
        let six = v2(
            1,
            0x21,
            &[[0u8; 15].as_slice(), &[1], &[0; 15], &[2], &[0, 80, 1, 187]].concat(),
        );
        assert_eq!(
            read(&six).unwrap().addrs,
            Some((v4("[::1]:80"), v4("[::2]:443")))
        );
    }

    #[test]
    fn v2_truncated_at_every_byte_is_incomplete() {
        let h = v2(1, 0x21, &[7; 36 + 20]);
        for cut in 0..h.len() {
            assert_eq!(read(&h[..cut]), Err(Error::Incomplete), "cut {cut}");
        }
        assert_eq!(read(&h).unwrap().len, 16 + 56);
    }

    #[test]
    fn v2_impossible_headers_are_refused_at_the_first_wrong_byte() {
        let mut sig = SIGNATURE.to_vec();
        sig[5] = b'X';
        assert!(invalid(&sig[..6]).contains("signature"));
        let mut h = v2(1, 0x11, &[0; 12]);
        h[12] = 0x11; // version 1 in binary
        assert!(invalid(&h[..13]).contains("version"));
        h[12] = 0x22; // command 2
        assert!(invalid(&h[..13]).contains("command"));
        h[12] = 0x21;
        for family in [0x41u8, 0x13, 0x1f, 0xf1] {
            h[13] = family;
            assert!(invalid(&h[..14]).contains("family"), "{family:#x}");
        }
        // Too short for its family, as a PROXY command.
        assert!(invalid(&v2(1, 0x11, &[0; 11])[..16]).contains("shorter"));
        assert!(invalid(&v2(1, 0x21, &[0; 12])).contains("shorter"));
        assert!(invalid(&v2(1, 0x31, &[0; 36])).contains("shorter"));
        // Over the cap: refused from the 16 bytes that announce it.
        let mut big = v2(1, 0x11, &[0; 12]);
        big[14..16].copy_from_slice(&((V2_MAX_ADDRESS_LEN + 1) as u16).to_be_bytes());
        assert!(invalid(&big[..16]).contains("2048"));
        let at_cap = v2(1, 0x11, &[0; V2_MAX_ADDRESS_LEN]);
        assert_eq!(read(&at_cap).unwrap().len, MAX_LEN);
    }

    #[test]
    fn the_encoder_and_the_reference_reader_agree_with_this_reader() {
        let mut out = Vec::new();
        let (src, dst) = (v4("[2001:db8::7]:1"), v4("[::1]:2"));
        super::super::encode(src, dst, &mut out);
        assert_eq!(read(&out).unwrap().addrs, Some((src, dst)));
        let (h, n) = super::super::parse(&out).unwrap();
        assert_eq!(n, read(&out).unwrap().len);
        assert_eq!(h, super::super::Header::Proxy { src, dst });
    }

    #[test]
    fn the_check_holds_on_hand_made_inputs() {
        check(b"");
        check(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nrest");
        check(&v2(1, 0x21, &[9; 60]));
        check(&[0x5a; 64]);
        check(&[1; 40]);
    }
}
