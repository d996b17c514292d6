//! Access log records as text: logfmt (`key=value` pairs separated by spaces) or one
//! JSON object per line. Both carry the same fields in the same order; a field that
//! does not apply to the mode is left out, one that applies but is unknown is `-` in
//! text and `null` in JSON. No value needs quoting or escaping: they are numbers,
//! addresses and words from fixed lists.

use std::io::Write;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use super::Record;
use crate::config::LogFormat;
use crate::metrics::http_statuses;

/// Formats records for one server.
#[derive(Debug, Clone)]
pub struct Formatter {
    format: LogFormat,
    /// The statuses http mode answers with, in the order of `Record::http`.
    statuses: [u16; 6],
    /// The last second formatted, as Unix seconds and as `YYYY-MM-DDTHH:MM:SS`:
    /// records of one second share it, and only the milliseconds are written anew.
    second: Option<(u64, [u8; 19])>,
}

/// One value of a record.
enum Value {
    Str(&'static str),
    Num(u64),
    Millis(u64),
    /// Microseconds, written as milliseconds with three decimals.
    Micros(u64),
    Bool(bool),
    Addr(Option<SocketAddr>),
}

impl Formatter {
    /// `status`: the status http mode's configured response has.
    pub fn new(format: LogFormat, status: u16) -> Formatter {
        Formatter {
            format,
            statuses: http_statuses(status),
            second: None,
        }
    }

    /// Appends `r` as one line, newline included.
    pub fn write(&mut self, r: &Record, out: &mut Vec<u8>) {
        let json = self.format == LogFormat::Json;
        // The time opens the line; every other field follows a separator.
        out.extend_from_slice(if json { b"{\"time\":\"" } else { b"time=" });
        self.push_time(out, r.time);
        if json {
            out.push(b'"');
        }
        let field = |out: &mut Vec<u8>, key: &str, v: Value| {
            out.push(if json { b',' } else { b' ' });
            if json {
                out.push(b'"');
                out.extend_from_slice(key.as_bytes());
                out.extend_from_slice(b"\":");
            } else {
                out.extend_from_slice(key.as_bytes());
                out.push(b'=');
            }
            // Writes to a Vec cannot fail.
            // Numbers and addresses are written by hand: core::fmt took half of the
            // writer's time (benches/README.md, the access log).
            match v {
                Value::Str(s) if json => {
                    out.push(b'"');
                    out.extend_from_slice(s.as_bytes());
                    out.push(b'"');
                }
                Value::Str(s) => out.extend_from_slice(s.as_bytes()),
                Value::Num(n) | Value::Millis(n) => push_num(out, n),
                Value::Micros(us) => {
                    push_num(out, us / 1000);
                    out.push(b'.');
                    push_padded(out, us % 1000, 3);
                }
                Value::Bool(b) => out.extend_from_slice(if b { b"true" } else { b"false" }),
                Value::Addr(Some(a)) if json => {
                    out.push(b'"');
                    push_addr(out, a);
                    out.push(b'"');
                }
                Value::Addr(Some(a)) => push_addr(out, a),
                Value::Addr(None) if json => out.extend_from_slice(b"null"),
                Value::Addr(None) => out.push(b'-'),
            }
        };
        field(out, "worker", Value::Num(r.worker as u64));
        field(out, "mode", Value::Str(r.mode.name()));
        field(out, "client", Value::Addr(r.client));
        field(out, "peer", Value::Addr(r.peer));
        field(out, "listen", Value::Addr(r.listen));
        if let Some(relay) = &r.relay {
            field(out, "upstream", Value::Addr(relay.upstream));
            match relay.connect_us {
                Some(us) => field(out, "connect_ms", Value::Micros(us as u64)),
                None => field(out, "connect_ms", Value::Addr(None)),
            }
            field(
                out,
                "retries",
                Value::Num(relay.tries.saturating_sub(1) as u64),
            );
        }
        field(out, "bytes_in", Value::Num(r.received));
        field(out, "bytes_out", Value::Num(r.sent));
        if r.relay.is_some() {
            field(out, "upstream_bytes_out", Value::Num(r.up_sent));
            field(out, "upstream_bytes_in", Value::Num(r.up_received));
        }
        field(out, "duration_ms", Value::Millis(r.duration_ms));
        field(out, "reason", Value::Str(r.reason.as_str()));
        field(out, "reset", Value::Bool(r.aborted));
        field(out, "ended_by", Value::Str(r.ended.as_str()));
        if let Some(relay) = &r.relay {
            field(out, "stage", Value::Str(relay.stage.as_str()));
        }
        if let Some(http) = &r.http {
            let total: u64 = http.iter().map(|&n| n as u64).sum();
            field(out, "requests", Value::Num(total));
            if json {
                out.extend_from_slice(b",\"statuses\":{");
                let mut any = false;
                for (status, &n) in self.statuses.iter().zip(http) {
                    if n > 0 {
                        if any {
                            out.push(b',');
                        }
                        let _ = write!(out, "\"{status}\":{n}");
                        any = true;
                    }
                }
                out.push(b'}');
            } else {
                for (status, &n) in self.statuses.iter().zip(http) {
                    if n > 0 {
                        let _ = write!(out, " status_{status}={n}");
                    }
                }
            }
        }
        if json {
            out.push(b'}');
        }
        out.push(b'\n');
    }
}

impl Formatter {
    /// Appends `t` as RFC 3339 in UTC with milliseconds: `2026-11-29T01:52:07.412Z`.
    fn push_time(&mut self, out: &mut Vec<u8>, t: SystemTime) {
        let Ok(since) = t.duration_since(UNIX_EPOCH) else {
            let _ = write!(out, "{}", humantime::format_rfc3339_millis(t));
            return;
        };
        let secs = since.as_secs();
        let prefix = match self.second {
            Some((s, prefix)) if s == secs => prefix,
            _ => {
                let mut prefix = [0u8; 19];
                // `YYYY-MM-DDTHH:MM:SSZ`: the first 19 bytes are the prefix (years
                // past 9999 are not formatted here).
                let whole = humantime::format_rfc3339_seconds(UNIX_EPOCH + since).to_string();
                if whole.len() != 20 {
                    out.extend_from_slice(whole.as_bytes());
                    return;
                }
                prefix.copy_from_slice(&whole.as_bytes()[..19]);
                self.second = Some((secs, prefix));
                prefix
            }
        };
        out.extend_from_slice(&prefix);
        out.push(b'.');
        push_padded(out, since.subsec_millis() as u64, 3);
        out.push(b'Z');
    }
}

/// Appends `n` in decimal.
fn push_num(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Appends `n` in decimal with leading zeros to `width` digits (`n` has at most that
/// many).
fn push_padded(out: &mut Vec<u8>, n: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut i = digits.len();
    let mut n = n;
    while n > 0 && i > 0 {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.extend_from_slice(&digits[digits.len() - width.max(digits.len() - i)..]);
}

/// Appends an address as `SocketAddr`'s Display does: `1.2.3.4:80`, `[::1]:80`.
fn push_addr(out: &mut Vec<u8>, a: SocketAddr) {
    match a {
        SocketAddr::V4(v4) => {
            for (i, octet) in v4.ip().octets().iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                push_num(out, *octet as u64);
            }
            out.push(b':');
            push_num(out, v4.port() as u64);
        }
        // Rarer, and its zero-run compression is Display's to get right.
        SocketAddr::V6(_) => {
            let _ = write!(out, "{a}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access_log::{Ended, RelayFacts, Stage};
    use crate::config::Mode;
    use crate::metrics::CloseReason;
    use std::time::{Duration, UNIX_EPOCH};

    fn record() -> Record {
        Record {
            time: UNIX_EPOCH + Duration::from_millis(1_795_000_000_123),
            worker: 1,
            mode: Mode::Relay,
            client: Some("203.0.113.7:51000".parse().unwrap()),
            peer: Some("127.0.0.1:40000".parse().unwrap()),
            listen: Some("127.0.0.1:6380".parse().unwrap()),
            duration_ms: 1520,
            reason: CloseReason::Eof,
            aborted: false,
            ended: Ended::Client,
            received: 18,
            sent: 7,
            up_sent: 18,
            up_received: 7,
            relay: Some(RelayFacts {
                upstream: Some("[::1]:6379".parse().unwrap()),
                connect_us: Some(215),
                tries: 2,
                ended: Some(Ended::Client),
                stage: Stage::Data,
            }),
            http: None,
        }
    }

    #[test]
    fn a_relay_record_in_text_is_one_logfmt_line() {
        let mut out = Vec::new();
        Formatter::new(LogFormat::Text, 200).write(&record(), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "time=2026-11-18T11:06:40.123Z worker=1 mode=relay client=203.0.113.7:51000 \
             peer=127.0.0.1:40000 listen=127.0.0.1:6380 upstream=[::1]:6379 connect_ms=0.215 \
             retries=1 bytes_in=18 bytes_out=7 upstream_bytes_out=18 upstream_bytes_in=7 \
             duration_ms=1520 reason=eof reset=false ended_by=client stage=data\n"
        );
    }

    #[test]
    fn json_records_parse_and_unknowns_are_null() {
        let mut r = record();
        r.relay.as_mut().unwrap().connect_us = None;
        r.relay.as_mut().unwrap().upstream = None;
        let mut out = Vec::new();
        Formatter::new(LogFormat::Json, 200).write(&r, &mut out);
        assert_eq!(out.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["time"], "2026-11-18T11:06:40.123Z");
        assert_eq!(v["client"], "203.0.113.7:51000");
        assert_eq!(v["upstream"], serde_json::Value::Null);
        assert_eq!(v["connect_ms"], serde_json::Value::Null);
        assert_eq!(v["upstream_bytes_out"], 18);
        assert_eq!(v["reset"], false);
    }

    #[test]
    fn hand_written_numbers_addresses_and_times_match_display() {
        for n in [0u64, 7, 10, 99, 65535, u32::MAX as u64, u64::MAX] {
            let mut out = Vec::new();
            push_num(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
        for (n, text) in [(0u64, "000"), (5, "005"), (42, "042"), (999, "999")] {
            let mut out = Vec::new();
            push_padded(&mut out, n, 3);
            assert_eq!(out, text.as_bytes());
        }
        for a in [
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "10.0.0.5:6379",
            "[::1]:80",
        ] {
            let a: SocketAddr = a.parse().unwrap();
            let mut out = Vec::new();
            push_addr(&mut out, a);
            assert_eq!(out, a.to_string().as_bytes());
        }
        let mut f = Formatter::new(LogFormat::Text, 200);
        for ms in [
            0u64,
            1,
            999,
            1000,
            86_399_999,
            1_795_000_000_123,
            253_402_300_799_999,
        ] {
            let t = UNIX_EPOCH + Duration::from_millis(ms);
            let mut out = Vec::new();
            f.push_time(&mut out, t);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                humantime::format_rfc3339_millis(t).to_string()
            );
        }
    }

    #[test]
    fn http_records_count_requests_per_status() {
        let mut r = record();
        r.mode = Mode::Http;
        r.relay = None;
        r.http = Some([3, 1, 0, 0, 0, 0]);
        let mut out = Vec::new();
        Formatter::new(LogFormat::Text, 204).write(&r, &mut out);
        let line = String::from_utf8(out).unwrap();
        assert!(
            line.ends_with("ended_by=client requests=4 status_204=3 status_400=1\n"),
            "{line}"
        );
        let mut out = Vec::new();
        Formatter::new(LogFormat::Json, 204).write(&r, &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["requests"], 4);
        assert_eq!(v["statuses"]["204"], 3);
        assert_eq!(v["statuses"]["400"], 1);
        assert!(v.get("upstream").is_none());
    }
}
