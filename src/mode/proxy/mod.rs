//! The PROXY protocol (HAProxy's proxy-protocol.txt): the prefix that tells the next
//! hop the client's real address.
//!
//! - Sending (relay's `--send-proxy-v2`): [`encode`] writes the version 2 header
//!   below; [`parse`] is its reference reader, for tests and the `proxy_v2` fuzz
//!   target.
//! - Receiving (`--accept-proxy`, every mode): [`inbound`] reads version 1 and 2
//!   headers strictly, and [`accept`] is a connection's first phase, in which the
//!   worker reads that header before any mode sees a byte.
//!
//! The version 2 header as [`encode`] writes it (section 2.2):
//!
//! ```text
//! 0..12   signature  \r\n\r\n\0\r\nQUIT\n
//! 12      0x21       version 2, command PROXY   (0x20: LOCAL)
//! 13      0x11       AF_INET, STREAM            (0x21: AF_INET6, STREAM; 0x00: UNSPEC)
//! 14..16  length of what follows, big-endian    (12 for IPv4, 36 for IPv6)
//! IPv4:   src addr (4), dst addr (4), src port (2), dst port (2)
//! IPv6:   src addr (16), dst addr (16), src port (2), dst port (2)
//! ```
//!
//! `src` is the client, `dst` the address the client connected to (edgepoll's
//! listening address). Everything is in network byte order.

pub mod accept;
pub mod inbound;

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// The 12-byte signature every v2 header begins with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The longest header [`encode`] writes (IPv6).
pub const MAX_LEN: usize = 16 + 36;

/// Appends the header for a client at `src` that connected to `dst`. When the two
/// families differ (which a V6ONLY listener never produces) both are written as IPv6,
/// IPv4 addresses mapped.
pub fn encode(src: SocketAddr, dst: SocketAddr, out: &mut Vec<u8>) {
    out.extend_from_slice(&SIGNATURE);
    out.push(0x21);
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
        }
    }
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    }
}

/// What a v2 header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// PROXY over TCP: the client and the address it connected to.
    Proxy { src: SocketAddr, dst: SocketAddr },
    /// LOCAL, or an address family this parser does not read: no addresses.
    Local,
}

/// Why bytes are not a v2 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// More bytes are needed.
    Incomplete,
    /// The signature, version, command or lengths are wrong.
    Invalid,
}

/// Parses a header at the start of `buf`; returns it and its length. The reference
/// reader for tests and the fuzz target, written from the specification.
pub fn parse(buf: &[u8]) -> Result<(Header, usize), ParseError> {
    let n = buf.len().min(SIGNATURE.len());
    if buf[..n] != SIGNATURE[..n] {
        return Err(ParseError::Invalid);
    }
    if buf.len() < 16 {
        return Err(ParseError::Incomplete);
    }
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Err(ParseError::Invalid);
    }
    let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    if buf.len() < 16 + len {
        return Err(ParseError::Incomplete);
    }
    let body = &buf[16..16 + len];
    let total = 16 + len;
    match ver_cmd & 0x0f {
        0 => return Ok((Header::Local, total)),
        1 => {}
        _ => return Err(ParseError::Invalid),
    }
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    match buf[13] {
        0x11 => {
            if len < 12 {
                return Err(ParseError::Invalid);
            }
            let s: [u8; 4] = [body[0], body[1], body[2], body[3]];
            let d: [u8; 4] = [body[4], body[5], body[6], body[7]];
            Ok((
                Header::Proxy {
                    src: SocketAddr::from((s, port(&body[8..]))),
                    dst: SocketAddr::from((d, port(&body[10..]))),
                },
                total,
            ))
        }
        0x21 => {
            if len < 36 {
                return Err(ParseError::Invalid);
            }
            let mut s = [0u8; 16];
            let mut d = [0u8; 16];
            s.copy_from_slice(&body[..16]);
            d.copy_from_slice(&body[16..32]);
            Ok((
                Header::Proxy {
                    src: SocketAddr::from((s, port(&body[32..]))),
                    dst: SocketAddr::from((d, port(&body[34..]))),
                },
                total,
            ))
        }
        _ => Ok((Header::Local, total)),
    }
}

/// The property the `proxy_v2` fuzz target checks and `cargo test` replays on its seed
/// corpus; panics if it fails. Any bytes given to [`parse`] never panic it, and a
/// length it returns lies within them. Bytes long enough to name two addresses
/// (1 selector byte, 16 + 16 address bytes, 2 + 2 port bytes) are encoded and must
/// parse back to the same addresses, IPv4 mapped into IPv6 when the families differ.
pub fn check(data: &[u8]) {
    if let Ok((_, n)) = parse(data) {
        assert!(n <= data.len(), "parse claimed {n} of {} bytes", data.len());
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
    let src = addr(data[0] & 1 != 0, &data[1..17], &data[33..35]);
    let dst = addr(data[0] & 2 != 0, &data[17..33], &data[35..37]);
    let mut out = Vec::new();
    encode(src, dst, &mut out);
    assert!(out.len() <= MAX_LEN);
    let (header, n) = parse(&out).expect("an encoded header parses");
    assert_eq!(n, out.len());
    let same_family = src.is_ipv4() == dst.is_ipv4();
    let expect = |a: SocketAddr| match (same_family, a.ip()) {
        (false, IpAddr::V4(v4)) => SocketAddr::from((v4.to_ipv6_mapped(), a.port())),
        _ => a,
    };
    assert_eq!(
        header,
        Header::Proxy {
            src: expect(src),
            dst: expect(dst)
        }
    );
    // Every strict prefix is incomplete, never misread.
    for cut in 0..out.len() {
        assert_eq!(parse(&out[..cut]), Err(ParseError::Incomplete));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_matches_the_specification_byte_for_byte() {
        let mut out = Vec::new();
        encode(
            "192.0.2.1:51000".parse().unwrap(),
            "198.51.100.7:7001".parse().unwrap(),
            &mut out,
        );
        let mut want = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a".to_vec();
        want.extend_from_slice(&[0x21, 0x11, 0x00, 0x0c]);
        want.extend_from_slice(&[192, 0, 2, 1, 198, 51, 100, 7]);
        want.extend_from_slice(&[0xc7, 0x38, 0x1b, 0x59]); // 51000, 7001
        assert_eq!(out, want);
        assert_eq!(out.len(), 28);
        let (h, n) = parse(&out).unwrap();
        assert_eq!(n, 28);
        assert_eq!(
            h,
            Header::Proxy {
                src: "192.0.2.1:51000".parse().unwrap(),
                dst: "198.51.100.7:7001".parse().unwrap()
            }
        );
    }

    #[test]
    fn ipv6_and_mixed_families() {
        let mut out = Vec::new();
        let src: SocketAddr = "[2001:db8::1]:1".parse().unwrap();
        let dst: SocketAddr = "[::1]:2".parse().unwrap();
        encode(src, dst, &mut out);
        assert_eq!(out.len(), MAX_LEN);
        assert_eq!(&out[12..16], &[0x21, 0x21, 0, 36]);
        assert_eq!(parse(&out).unwrap(), (Header::Proxy { src, dst }, 52));

        out.clear();
        encode("10.0.0.1:5".parse().unwrap(), dst, &mut out);
        let (h, _) = parse(&out).unwrap();
        assert_eq!(
            h,
            Header::Proxy {
                src: "[::ffff:10.0.0.1]:5".parse().unwrap(),
                dst
            }
        );
    }

    #[test]
    fn truncated_and_foreign_bytes() {
        let mut out = Vec::new();
        encode(
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
            &mut out,
        );
        for cut in 0..out.len() {
            assert_eq!(parse(&out[..cut]), Err(ParseError::Incomplete), "cut {cut}");
        }
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4"), Err(ParseError::Invalid));
        let mut local = SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(parse(&local), Ok((Header::Local, 16)));
    }
}
