//! The parsers of flag and key values: sizes, durations, addresses, headers. Each
//! error says what was given and what is expected; the caller adds the flag or key.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use super::Keepalive;

/// Parses `--header 'Name: value'`.
pub fn parse_header(s: &str) -> Result<(String, String), String> {
    let (name, value) = s
        .split_once(':')
        .ok_or_else(|| format!("invalid header '{s}': expected 'Name: value'"))?;
    Ok((name.trim().to_string(), value.trim().to_string()))
}

/// Parses a byte count: a plain number, or one with a binary suffix (`K`/`KiB`,
/// `M`/`MiB`, `G`/`GiB`; case-insensitive). `256KiB` is 262144.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(split);
    let n: usize = digits.parse().map_err(|_| {
        format!("invalid size '{s}': expected a number of bytes such as 262144 or 256KiB")
    })?;
    let unit: usize = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => {
            return Err(format!(
                "invalid size '{s}': unknown unit '{suffix}' (use KiB, MiB or GiB)"
            ))
        }
    };
    n.checked_mul(unit)
        .ok_or_else(|| format!("invalid size '{s}': too large"))
}

/// Parses a duration as wrk writes them: `10s`, `2m`, `500ms`, `1h`, or a plain
/// number of seconds (`2.5`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number.parse().map_err(|_| {
        format!("invalid duration '{s}': expected e.g. 10, 2.5, 500ms, 10s, 2m or 1h")
    })?;
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "us" => 0.000_001,
        "m" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "invalid duration '{s}': unknown unit '{other}' (use ms, s, m or h)"
            ))
        }
    };
    let secs = value * scale;
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("invalid duration '{s}': out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses `--tcp-keepalive`: `IDLE:INTERVAL:COUNT`, the two durations as
/// [`parse_duration`] takes them (`60s:10s:6`, `60:10:6`, `2m:30s:4`), or `off`. The
/// ranges the kernel accepts are checked with the rest of the configuration
/// ([`Keepalive::validate`]).
pub fn parse_keepalive(s: &str) -> Result<Option<Keepalive>, String> {
    let t = s.trim();
    if t == "off" {
        return Ok(None);
    }
    let hint = "expected IDLE:INTERVAL:COUNT such as 60s:10s:6, or off";
    let parts: Vec<&str> = t.split(':').collect();
    let [idle, interval, count] = parts[..] else {
        return Err(format!("invalid keepalive '{s}': {hint}"));
    };
    let idle = parse_duration(idle).map_err(|e| format!("invalid keepalive '{s}': IDLE: {e}"))?;
    let interval =
        parse_duration(interval).map_err(|e| format!("invalid keepalive '{s}': INTERVAL: {e}"))?;
    let count = count.trim().parse::<u32>().map_err(|_| {
        format!("invalid keepalive '{s}': COUNT '{count}' is not a whole number of probes; {hint}")
    })?;
    Ok(Some(Keepalive {
        idle,
        interval,
        count,
    }))
}

/// Parses `--tcp-user-timeout`: a duration as [`parse_duration`] takes it, or `off`.
pub fn parse_user_timeout(s: &str) -> Result<Option<Duration>, String> {
    match s.trim() {
        "off" => Ok(None),
        t => parse_duration(t).map(Some),
    }
}

/// Parses a listen address: `IP:PORT` (`[::1]:7000` for IPv6), or `HOST:PORT`
/// resolved now, which yields every address the name has.
pub fn parse_listen(s: &str) -> Result<Vec<SocketAddr>, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(vec![addr]);
    }
    use std::net::ToSocketAddrs;
    let hint = "expected HOST:PORT such as 127.0.0.1:7000, [::1]:7000 or localhost:7000";
    let addrs: Vec<SocketAddr> = s
        .to_socket_addrs()
        .map_err(|e| format!("invalid address '{s}': {e}; {hint}"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!(
            "invalid address '{s}': the name has no address; {hint}"
        ));
    }
    Ok(addrs)
}

/// An `upstream` entry as given. An IP literal is an address that never changes; a
/// name is looked up when the configuration is built and, with `--resolve-interval`,
/// again and again while the server runs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPort {
    /// `IP:PORT` (`[IPv6]:PORT`).
    Ip(SocketAddr),
    /// `HOST:PORT` whose host is not an IP literal.
    Name(String, u16),
}

impl fmt::Display for HostPort {
    /// As written on the command line: `10.0.0.5:6379`, `[::1]:6379`, `db.svc:6379`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPort::Ip(addr) => addr.fmt(f),
            HostPort::Name(host, port) => write!(f, "{host}:{port}"),
        }
    }
}

/// Parses an upstream: `IP:PORT` (`[::1]:6379` for IPv6) or `HOST:PORT`, without
/// looking the name up (that happens when the configuration is built, after
/// `--hosts-file` is known).
pub fn parse_upstream(s: &str) -> Result<HostPort, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(HostPort::Ip(addr));
    }
    let hint = "expected HOST:PORT such as 10.0.0.5:6379, [::1]:6379 or db.svc:6379";
    let bad = |why: &str| format!("invalid address '{s}': {why}{hint}");
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(bad(""));
    };
    if host.is_empty() || host.contains([':', '[', ']']) || host.contains(char::is_whitespace) {
        return Err(bad("not a host name; "));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| bad("the port is not a number from 0 to 65535; "))?;
    Ok(HostPort::Name(host.to_string(), port))
}

/// Parses `--resolve-interval`: a duration as [`parse_duration`] takes it, or `off`
/// (also `0`) for names looked up once, at start-up.
pub fn parse_resolve_interval(s: &str) -> Result<Option<Duration>, String> {
    if s.trim() == "off" {
        return Ok(None);
    }
    let d = parse_duration(s).map_err(|e| format!("{e}, or off"))?;
    Ok((!d.is_zero()).then_some(d))
}

/// Parses the metrics endpoint's address: an address as [`parse_listen`] takes it (its
/// first one if a name has several), or `off` (also `none` or empty) for no endpoint.
pub fn parse_metrics_listen(s: &str) -> Result<Option<SocketAddr>, String> {
    match s {
        "off" | "none" | "" => Ok(None),
        s => Ok(parse_listen(s)?.first().copied()),
    }
}

/// Parses bytes written with escapes: `\n`, `\r`, `\t`, `\0`, `\\` and `\xHH`; any
/// other character stands for itself (its UTF-8 bytes).
pub fn parse_escaped(s: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            let mut utf8 = [0; 4];
            out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
            continue;
        }
        let byte = match chars.next() {
            Some('n') => b'\n',
            Some('r') => b'\r',
            Some('t') => b'\t',
            Some('0') => 0,
            Some('\\') => b'\\',
            Some('x') => {
                let hex: String = chars.by_ref().take(2).collect();
                u8::from_str_radix(&hex, 16)
                    .ok()
                    .filter(|_| hex.len() == 2)
                    .ok_or_else(|| format!("'\\x{hex}' is not \\x and two hex digits"))?
            }
            Some(other) => return Err(format!("unknown escape '\\{other}'")),
            None => return Err("a lone '\\' at the end".into()),
        };
        out.push(byte);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_bytes() {
        assert_eq!(parse_escaped(r"PING\r\n"), Ok(b"PING\r\n".to_vec()));
        assert_eq!(parse_escaped(r"a\x00\xffb\\"), Ok(b"a\x00\xffb\\".to_vec()));
        assert_eq!(parse_escaped("é"), Ok("é".as_bytes().to_vec()));
        assert!(parse_escaped(r"\q").unwrap_err().contains("unknown escape"));
        assert!(parse_escaped(r"\x4")
            .unwrap_err()
            .contains("two hex digits"));
        assert!(parse_escaped("x\\").unwrap_err().contains("lone"));
    }

    #[test]
    fn headers() {
        assert_eq!(parse_header("X-A:  b c "), Ok(("X-A".into(), "b c".into())));
        assert!(parse_header("nocolon").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("262144"), Ok(262_144));
        assert_eq!(parse_size("256KiB"), Ok(262_144));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert!(parse_size("12XB").unwrap_err().contains("unknown unit"));
        assert!(parse_size("").is_err());
        assert!(parse_size("-1").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2.5"), Ok(Duration::from_millis(2500)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5d").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn keepalives() {
        let k = |idle, interval, count| {
            Ok(Some(Keepalive {
                idle: Duration::from_secs(idle),
                interval: Duration::from_secs(interval),
                count,
            }))
        };
        assert_eq!(parse_keepalive("60s:10s:6"), k(60, 10, 6));
        assert_eq!(parse_keepalive("60:10:6"), k(60, 10, 6));
        assert_eq!(parse_keepalive("2m:30s:4"), k(120, 30, 4));
        assert_eq!(parse_keepalive("off"), Ok(None));
        assert_eq!(
            parse_keepalive("60:10").unwrap_err(),
            "invalid keepalive '60:10': expected IDLE:INTERVAL:COUNT such as 60s:10s:6, or off"
        );
        assert!(parse_keepalive("60:10:6:1").is_err());
        assert!(parse_keepalive("on").is_err());
        assert!(parse_keepalive("1d:10:6")
            .unwrap_err()
            .starts_with("invalid keepalive '1d:10:6': IDLE: invalid duration '1d'"));
        assert!(parse_keepalive("60:x:6")
            .unwrap_err()
            .starts_with("invalid keepalive '60:x:6': INTERVAL: invalid duration 'x'"));
        assert!(parse_keepalive("60:10:-1")
            .unwrap_err()
            .starts_with("invalid keepalive '60:10:-1': COUNT '-1' is not a whole number"));
    }

    #[test]
    fn user_timeouts() {
        assert_eq!(parse_user_timeout("30s"), Ok(Some(Duration::from_secs(30))));
        assert_eq!(
            parse_user_timeout("1500ms"),
            Ok(Some(Duration::from_millis(1500)))
        );
        assert_eq!(parse_user_timeout("off"), Ok(None));
        assert!(parse_user_timeout("soon").is_err());
    }

    #[test]
    fn upstreams_keep_names_and_literals_apart() {
        assert_eq!(
            parse_upstream("10.0.0.5:6379"),
            Ok(HostPort::Ip("10.0.0.5:6379".parse().unwrap()))
        );
        assert_eq!(
            parse_upstream("[::1]:6379"),
            Ok(HostPort::Ip("[::1]:6379".parse().unwrap()))
        );
        let name = parse_upstream("db.svc:6379").unwrap();
        assert_eq!(name, HostPort::Name("db.svc".into(), 6379));
        assert_eq!(name.to_string(), "db.svc:6379");
        for (bad, why) in [
            ("nohost", "invalid address 'nohost': expected HOST:PORT"),
            (":6379", "not a host name"),
            ("::1:6379", "not a host name"),
            ("db svc:6379", "not a host name"),
            ("db.svc:", "the port is not a number"),
            ("db.svc:65536", "the port is not a number"),
        ] {
            let err = parse_upstream(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn resolve_intervals() {
        assert_eq!(
            parse_resolve_interval("30s"),
            Ok(Some(Duration::from_secs(30)))
        );
        assert_eq!(
            parse_resolve_interval("100ms"),
            Ok(Some(Duration::from_millis(100)))
        );
        assert_eq!(parse_resolve_interval("off"), Ok(None));
        assert_eq!(parse_resolve_interval("0"), Ok(None));
        let err = parse_resolve_interval("soon").unwrap_err();
        assert!(
            err.contains("invalid duration 'soon'") && err.ends_with("or off"),
            "{err}"
        );
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(
            parse_listen("[::1]:7000"),
            Ok(vec!["[::1]:7000".parse().unwrap()])
        );
        assert_eq!(
            parse_listen("127.0.0.1:0"),
            Ok(vec!["127.0.0.1:0".parse().unwrap()])
        );
        assert!(parse_listen("7000").unwrap_err().contains("HOST:PORT"));
    }
}
