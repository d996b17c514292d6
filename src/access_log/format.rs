//! Access log records as text: logfmt (`key=value` pairs separated by spaces) or one
//! JSON object per line. Both carry the same fields in the same order; a field that
//! does not apply to the mode is left out, one that applies but is unknown is `-` in
//! text and `null` in JSON. No value needs quoting or escaping: they are numbers,
//! addresses and words from fixed lists.

use std::io::Write;
use std::net::SocketAddr;

use super::Record;
use crate::config::LogFormat;
use crate::metrics::http_statuses;

/// Formats records for one server.
#[derive(Debug, Clone)]
pub struct Formatter {
    format: LogFormat,
    /// The statuses http mode answers with, in the order of `Record::http`.
    statuses: [u16; 6],
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
        }
    }

    /// Appends `r` as one line, newline included.
    pub fn write(&self, r: &Record, out: &mut Vec<u8>) {
        let json = self.format == LogFormat::Json;
        // The time opens the line; every other field follows a separator.
        let time = humantime::format_rfc3339_millis(r.time);
        let _ = if json {
            write!(out, "{{\"time\":\"{time}\"")
        } else {
            write!(out, "time={time}")
        };
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
            let _ = match v {
                Value::Str(s) if json => write!(out, "\"{s}\""),
                Value::Str(s) => write!(out, "{s}"),
                Value::Num(n) => write!(out, "{n}"),
                Value::Millis(n) => write!(out, "{n}"),
                Value::Micros(us) => write!(out, "{}.{:03}", us / 1000, us % 1000),
                Value::Bool(b) => write!(out, "{b}"),
                Value::Addr(Some(a)) if json => write!(out, "\"{a}\""),
                Value::Addr(Some(a)) => write!(out, "{a}"),
                Value::Addr(None) if json => write!(out, "null"),
                Value::Addr(None) => write!(out, "-"),
            };
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
