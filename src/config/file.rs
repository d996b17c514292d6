//! The configuration file (`--config FILE`): TOML whose keys are the flags' names
//! without the dashes in front, plus `mode`. toml reports syntax errors, keys of the
//! wrong type and unknown keys with their line and column; the values toml cannot
//! check (sizes, durations, addresses, headers) are parsed here by the flags' own
//! parsers, and their errors name the key.
//!
//! ```toml
//! mode = "echo"
//! listen = ["0.0.0.0:7000", "[::]:7000"]
//! max-pending-bytes = "256KiB"
//! idle-timeout = "5m"
//! metrics-listen = "off"
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

use super::settings::{Body, LoadError, Settings};
use super::{
    parse_cidr, parse_duration, parse_escaped, parse_header, parse_keepalive, parse_listen,
    parse_log_format, parse_log_target, parse_metrics_listen, parse_resolve_interval, parse_sample,
    parse_size, parse_upstream, parse_user_timeout, Balance, CheckKind, HostPort, LogTarget, Mode,
};

/// The file as written: every key optional, and nothing else allowed, so that a
/// misspelt key is an error rather than a setting silently ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ConfigFile {
    mode: Option<String>,
    listen: Option<Addresses>,
    workers: Option<usize>,
    pin_workers: Option<bool>,
    backlog: Option<u32>,
    max_connections: Option<usize>,
    max_connections_per_ip: Option<usize>,
    max_pending_bytes: Option<Quantity>,
    max_buffered_bytes: Option<Quantity>,
    idle_timeout: Option<Quantity>,
    drain_timeout: Option<Quantity>,
    shutdown_delay: Option<Quantity>,
    metrics_listen: Option<String>,
    accept_proxy: Option<bool>,
    trusted_proxy: Option<Ranges>,
    proxy_header_timeout: Option<Quantity>,
    tcp_keepalive: Option<String>,
    tcp_user_timeout: Option<Quantity>,
    access_log: Option<PathBuf>,
    access_log_format: Option<String>,
    access_log_sample: Option<Quantity>,
    log_format: Option<String>,
    body: Option<String>,
    body_file: Option<PathBuf>,
    status: Option<u16>,
    content_type: Option<String>,
    header: Option<Vec<String>>,
    max_header_bytes: Option<Quantity>,
    header_timeout: Option<Quantity>,
    upstream: Option<Addresses>,
    resolve_interval: Option<Quantity>,
    hosts_file: Option<PathBuf>,
    balance: Option<String>,
    connect_timeout: Option<Quantity>,
    fail_timeout: Option<Quantity>,
    connect_retries: Option<usize>,
    splice: Option<bool>,
    send_proxy_v2: Option<bool>,
    health_check: Option<String>,
    health_check_interval: Option<Quantity>,
    health_check_timeout: Option<Quantity>,
    rise: Option<u32>,
    fall: Option<u32>,
    health_check_send: Option<String>,
    health_check_expect: Option<String>,
    max_conns_per_upstream: Option<usize>,
    max_queue: Option<usize>,
    queue_timeout: Option<Quantity>,
}

/// The `log-format` key of the file at `path`, read before anything else so that
/// every log line of a start, the first included, is in that format. None when the
/// file cannot be read or parsed, or has no valid key: the full load that follows
/// reports why.
pub fn log_format_in(path: &Path) -> Option<super::LogFormat> {
    let text = std::fs::read_to_string(path).ok()?;
    let table: toml::Table = toml::from_str(&text).ok()?;
    parse_log_format(table.get("log-format")?.as_str()?).ok()
}

/// Reads the text of the file at `path`, for [`parse`].
pub fn read(path: &Path) -> Result<String, LoadError> {
    std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Parses `text`, the contents of the file at `path`. A relative `body-file` or
/// `hosts-file` is taken from the file's directory, not from wherever edgepoll was
/// started.
pub fn parse(text: &str, path: &Path) -> Result<(Option<Mode>, Settings), LoadError> {
    let file: ConfigFile = toml::from_str(text).map_err(|e| with_key(text, path, e))?;
    file.into_settings(path).map_err(|e| match e {
        LoadError::Key {
            path,
            key,
            line: None,
            reason,
        } => LoadError::Key {
            line: line_of_key(text, &key),
            path,
            key,
            reason,
        },
        other => other,
    })
}

/// The line (from 1) of the top-level `key` in `text`, if it is there.
pub fn line_of_key(text: &str, key: &str) -> Option<usize> {
    key_at(text, |k, _| k == key).map(|(_, line)| line)
}

/// toml's error for a key of the wrong type or an unknown key, as the key and the
/// reason; any other error (not TOML at all) as toml words it, with the line quoted.
fn with_key(text: &str, path: &Path, e: toml::de::Error) -> LoadError {
    let at = e.span().map(|span| span.start);
    match at.and_then(|at| key_at(text, |_, entry| entry.contains(&at))) {
        Some((key, line)) => LoadError::Key {
            path: path.to_owned(),
            key,
            line: Some(line),
            reason: e.message().to_owned(),
        },
        None => LoadError::Syntax {
            path: path.to_owned(),
            message: e.to_string(),
        },
    }
}

/// The first top-level key for which `found(key, span of key and value)` holds, and
/// the line it is on (from 1). None if `text` is not TOML.
fn key_at(
    text: &str,
    found: impl Fn(&str, std::ops::Range<usize>) -> bool,
) -> Option<(String, usize)> {
    let table = toml::de::DeTable::parse(text).ok()?;
    let (key, _) = table.get_ref().iter().find(|(key, value)| {
        found(
            key.get_ref(),
            key.span().start..value.span().end.max(key.span().end),
        )
    })?;
    let line = 1 + text[..key.span().start].matches('\n').count();
    Some((key.get_ref().to_string(), line))
}

impl ConfigFile {
    fn into_settings(self, path: &Path) -> Result<(Option<Mode>, Settings), LoadError> {
        let bad = |key: &'static str| {
            move |reason: String| LoadError::Key {
                path: path.to_owned(),
                key: key.to_owned(),
                line: None,
                reason,
            }
        };
        let mode = self
            .mode
            .map(|m| {
                Mode::from_name(&m).ok_or_else(|| {
                    bad("mode")(format!("unknown mode '{m}': expected echo, http or relay"))
                })
            })
            .transpose()?;
        let body = match (self.body, self.body_file) {
            (Some(_), Some(_)) => {
                return Err(bad("body-file")(
                    "conflicts with key body: give the body one way".into(),
                ))
            }
            (Some(text), None) => Some(Body::Text(text)),
            (None, Some(file)) => Some(Body::File(
                path.parent().unwrap_or(Path::new("")).join(file),
            )),
            (None, None) => None,
        };
        let headers = self
            .header
            .map(|all| all.iter().map(|h| parse_header(h)).collect())
            .transpose()
            .map_err(bad("header"))?;
        let balance = self
            .balance
            .map(|b| {
                Balance::from_name(&b).ok_or_else(|| {
                    format!("unknown balance '{b}': expected round-robin or least-conn")
                })
            })
            .transpose()
            .map_err(bad("balance"))?;
        let health_check = self
            .health_check
            .map(|k| match k.as_str() {
                "off" => Ok(None),
                k => CheckKind::from_name(k).map(Some).ok_or_else(|| {
                    format!("unknown health check '{k}': expected tcp, send-expect or off")
                }),
            })
            .transpose()
            .map_err(bad("health-check"))?;
        let escaped = |v: Option<String>, key: &'static str| {
            v.map(|v| parse_escaped(&v)).transpose().map_err(bad(key))
        };
        let beside = |file: PathBuf| path.parent().unwrap_or(Path::new("")).join(file);
        let settings = Settings {
            max_conns_per_upstream: self.max_conns_per_upstream,
            max_queue: self.max_queue,
            queue_timeout: duration(self.queue_timeout).map_err(bad("queue-timeout"))?,
            resolve_interval: self
                .resolve_interval
                .map(|q| match q {
                    Quantity::Text(s) => parse_resolve_interval(&s),
                    other => duration(Some(other)).map(|d| d.filter(|d| !d.is_zero())),
                })
                .transpose()
                .map_err(bad("resolve-interval"))?,
            hosts_file: self.hosts_file.map(beside),
            health_check,
            health_check_interval: duration(self.health_check_interval)
                .map_err(bad("health-check-interval"))?,
            health_check_timeout: duration(self.health_check_timeout)
                .map_err(bad("health-check-timeout"))?,
            rise: self.rise,
            fall: self.fall,
            health_check_send: escaped(self.health_check_send, "health-check-send")?,
            health_check_expect: escaped(self.health_check_expect, "health-check-expect")?,
            listen: addresses(self.listen).map_err(bad("listen"))?,
            workers: self.workers,
            pin_workers: self.pin_workers,
            backlog: self.backlog,
            max_connections: self.max_connections,
            max_connections_per_ip: self.max_connections_per_ip,
            max_pending_bytes: size(self.max_pending_bytes).map_err(bad("max-pending-bytes"))?,
            max_buffered_bytes: size(self.max_buffered_bytes).map_err(bad("max-buffered-bytes"))?,
            idle_timeout: duration(self.idle_timeout).map_err(bad("idle-timeout"))?,
            drain_timeout: duration(self.drain_timeout).map_err(bad("drain-timeout"))?,
            shutdown_delay: duration(self.shutdown_delay).map_err(bad("shutdown-delay"))?,
            metrics_listen: self
                .metrics_listen
                .map(|m| parse_metrics_listen(&m))
                .transpose()
                .map_err(bad("metrics-listen"))?,
            accept_proxy: self.accept_proxy,
            trusted_proxies: self
                .trusted_proxy
                .map(|Ranges(all)| all.iter().map(|r| parse_cidr(r)).collect())
                .transpose()
                .map_err(bad("trusted-proxy"))?,
            proxy_header_timeout: duration(self.proxy_header_timeout)
                .map_err(bad("proxy-header-timeout"))?,
            tcp_keepalive: self
                .tcp_keepalive
                .map(|k| parse_keepalive(&k))
                .transpose()
                .map_err(bad("tcp-keepalive"))?,
            tcp_user_timeout: user_timeout(self.tcp_user_timeout)
                .map_err(bad("tcp-user-timeout"))?,
            // A relative path is taken from the file's directory, as `body-file` is.
            access_log: self
                .access_log
                .map(|p| match p.to_str() {
                    Some(word) if !word.contains('/') => parse_log_target(word).map(|t| {
                        t.map(|t| match t {
                            LogTarget::File(f) => LogTarget::File(beside(f)),
                            stderr => stderr,
                        })
                    }),
                    _ => Ok(Some(LogTarget::File(beside(p)))),
                })
                .transpose()
                .map_err(bad("access-log"))?,
            access_log_format: self
                .access_log_format
                .map(|f| parse_log_format(&f))
                .transpose()
                .map_err(bad("access-log-format"))?,
            access_log_sample: self
                .access_log_sample
                .map(|q| match q {
                    Quantity::Whole(n) => parse_sample(&n.to_string()),
                    Quantity::Fraction(f) => parse_sample(&f.to_string()),
                    Quantity::Text(t) => parse_sample(&t),
                })
                .transpose()
                .map_err(bad("access-log-sample"))?,
            log_format: self
                .log_format
                .map(|f| parse_log_format(&f))
                .transpose()
                .map_err(bad("log-format"))?,
            body,
            status: self.status,
            content_type: self.content_type,
            headers,
            max_header_bytes: size(self.max_header_bytes).map_err(bad("max-header-bytes"))?,
            header_timeout: duration(self.header_timeout).map_err(bad("header-timeout"))?,
            upstreams: upstreams(self.upstream).map_err(bad("upstream"))?,
            balance,
            connect_timeout: duration(self.connect_timeout).map_err(bad("connect-timeout"))?,
            fail_timeout: duration(self.fail_timeout).map_err(bad("fail-timeout"))?,
            connect_retries: self.connect_retries,
            splice: self.splice,
            send_proxy_v2: self.send_proxy_v2,
        };
        Ok((mode, settings))
    }
}

/// A size or a duration as the file writes it: a number (of bytes, of seconds), or a
/// string with a unit that the flag's parser reads (`"256KiB"`, `"5m"`).
#[derive(Debug)]
enum Quantity {
    Whole(u64),
    Fraction(f64),
    Text(String),
}

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Quantity, D::Error> {
        struct QuantityVisitor;
        impl Visitor<'_> for QuantityVisitor {
            type Value = Quantity;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number, or a string with a unit such as \"256KiB\" or \"10s\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Quantity, E> {
                Ok(Quantity::Whole(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Quantity, E> {
                u64::try_from(v)
                    .map(Quantity::Whole)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Quantity, E> {
                Ok(Quantity::Fraction(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Quantity, E> {
                Ok(Quantity::Text(v.to_owned()))
            }
        }
        d.deserialize_any(QuantityVisitor)
    }
}

/// A byte count: a whole number, or a string for [`parse_size`].
fn size(q: Option<Quantity>) -> Result<Option<usize>, String> {
    q.map(|q| match q {
        Quantity::Whole(n) => parse_size(&n.to_string()),
        Quantity::Fraction(f) => Err(format!("invalid size {f}: a whole number of bytes")),
        Quantity::Text(s) => parse_size(&s),
    })
    .transpose()
}

/// A duration: a number of seconds, or a string for [`parse_duration`].
fn duration(q: Option<Quantity>) -> Result<Option<Duration>, String> {
    q.map(|q| match q {
        Quantity::Whole(n) => parse_duration(&n.to_string()),
        Quantity::Fraction(f) => parse_duration(&f.to_string()),
        Quantity::Text(s) => parse_duration(&s),
    })
    .transpose()
}

/// `tcp-user-timeout`: a duration as [`duration`] takes it, or `"off"`.
fn user_timeout(q: Option<Quantity>) -> Result<Option<Option<Duration>>, String> {
    match q {
        Some(Quantity::Text(s)) => parse_user_timeout(&s).map(Some),
        other => duration(other).map(|d| d.map(Some)),
    }
}

/// One address or a list of them, as `listen` and `upstream` take them.
#[derive(Debug)]
struct Addresses(Vec<String>);

impl<'de> Deserialize<'de> for Addresses {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Addresses, D::Error> {
        struct AddressesVisitor;
        impl<'de> Visitor<'de> for AddressesVisitor {
            type Value = Addresses;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an address \"HOST:PORT\" or a list of them")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Addresses, E> {
                Ok(Addresses(vec![v.to_owned()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Addresses, A::Error> {
                let mut all = Vec::new();
                while let Some(a) = seq.next_element::<String>()? {
                    all.push(a);
                }
                Ok(Addresses(all))
            }
        }
        d.deserialize_any(AddressesVisitor)
    }
}

/// One address range or a list of them, as `trusted-proxy` takes them.
#[derive(Debug)]
struct Ranges(Vec<String>);

impl<'de> Deserialize<'de> for Ranges {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Ranges, D::Error> {
        struct RangesVisitor;
        impl<'de> Visitor<'de> for RangesVisitor {
            type Value = Ranges;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an address range \"10.0.0.0/8\" or a list of them")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Ranges, E> {
                Ok(Ranges(vec![v.to_owned()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Ranges, A::Error> {
                let mut all = Vec::new();
                while let Some(a) = seq.next_element::<String>()? {
                    all.push(a);
                }
                Ok(Ranges(all))
            }
        }
        d.deserialize_any(RangesVisitor)
    }
}

/// Every address of every entry, resolved as `--listen` resolves them.
fn addresses(a: Option<Addresses>) -> Result<Option<Vec<std::net::SocketAddr>>, String> {
    let Some(Addresses(all)) = a else {
        return Ok(None);
    };
    let mut out = Vec::new();
    for s in &all {
        out.extend(parse_listen(s)?);
    }
    Ok(Some(out))
}

/// Every entry as given, names not looked up yet, as `--upstream` takes them.
fn upstreams(a: Option<Addresses>) -> Result<Option<Vec<HostPort>>, String> {
    a.map(|Addresses(all)| all.iter().map(|s| parse_upstream(s)).collect())
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> (Option<Mode>, Settings) {
        parse(text, Path::new("/etc/edgepoll/e.toml")).expect("parses")
    }

    /// The message of the error `text` gives.
    fn error(text: &str) -> String {
        parse(text, Path::new("e.toml")).unwrap_err().to_string()
    }

    #[test]
    fn every_key_is_read_into_its_setting() {
        let (mode, s) = parsed(
            r#"
            mode = "relay"
            listen = ["127.0.0.1:7000", "[::1]:7000"]
            workers = 3
            pin-workers = true
            backlog = 128
            max-connections = 1000
            max-connections-per-ip = 10
            max-pending-bytes = "64KiB"
            max-buffered-bytes = 1048576
            idle-timeout = "5m"
            drain-timeout = 2.5
            shutdown-delay = "5s"
            metrics-listen = "off"
            accept-proxy = true
            trusted-proxy = ["127.0.0.0/8", "2001:db8::/32"]
            proxy-header-timeout = "2s"
            tcp-keepalive = "2m:15s:4"
            tcp-user-timeout = "1500ms"
            access-log = "logs/access.log"
            access-log-format = "json"
            access-log-sample = "10%"
            log-format = "json"
            status = 404
            content-type = "text/html"
            header = ["Cache-Control: no-store", "X-A: b"]
            max-header-bytes = "16KiB"
            header-timeout = 3
            upstream = ["127.0.0.1:6379", "db.svc:6379"]
            resolve-interval = "10s"
            hosts-file = "hosts"
            balance = "least-conn"
            connect-timeout = "500ms"
            fail-timeout = 0
            connect-retries = 2
            splice = true
            send-proxy-v2 = false
            health-check = "send-expect"
            health-check-interval = "500ms"
            health-check-timeout = 0.25
            rise = 3
            fall = 4
            health-check-send = "PING\\r\\n"
            health-check-expect = "+PONG"
            max-conns-per-upstream = 100
            max-queue = 50
            queue-timeout = "2s"
            "#,
        );
        assert_eq!(mode, Some(Mode::Relay));
        let expected = Settings {
            listen: Some(vec![
                "127.0.0.1:7000".parse().unwrap(),
                "[::1]:7000".parse().unwrap(),
            ]),
            workers: Some(3),
            pin_workers: Some(true),
            backlog: Some(128),
            max_connections: Some(1000),
            max_connections_per_ip: Some(10),
            max_pending_bytes: Some(64 * 1024),
            max_buffered_bytes: Some(1 << 20),
            idle_timeout: Some(Duration::from_secs(300)),
            drain_timeout: Some(Duration::from_millis(2500)),
            shutdown_delay: Some(Duration::from_secs(5)),
            metrics_listen: Some(None),
            accept_proxy: Some(true),
            trusted_proxies: Some(vec![
                parse_cidr("127.0.0.0/8").unwrap(),
                parse_cidr("2001:db8::/32").unwrap(),
            ]),
            proxy_header_timeout: Some(Duration::from_secs(2)),
            tcp_keepalive: Some(Some(crate::config::Keepalive {
                idle: Duration::from_secs(120),
                interval: Duration::from_secs(15),
                count: 4,
            })),
            tcp_user_timeout: Some(Some(Duration::from_millis(1500))),
            access_log: Some(Some(crate::config::LogTarget::File(
                Path::new("/etc/edgepoll/logs/access.log").into(),
            ))),
            access_log_format: Some(crate::config::LogFormat::Json),
            access_log_sample: Some(0.1),
            log_format: Some(crate::config::LogFormat::Json),
            body: None,
            status: Some(404),
            content_type: Some("text/html".into()),
            headers: Some(vec![
                ("Cache-Control".into(), "no-store".into()),
                ("X-A".into(), "b".into()),
            ]),
            max_header_bytes: Some(16 * 1024),
            header_timeout: Some(Duration::from_secs(3)),
            upstreams: Some(vec![
                HostPort::Ip("127.0.0.1:6379".parse().unwrap()),
                HostPort::Name("db.svc".into(), 6379),
            ]),
            resolve_interval: Some(Some(Duration::from_secs(10))),
            hosts_file: Some("/etc/edgepoll/hosts".into()),
            balance: Some(Balance::LeastConn),
            connect_timeout: Some(Duration::from_millis(500)),
            fail_timeout: Some(Duration::ZERO),
            connect_retries: Some(2),
            splice: Some(true),
            send_proxy_v2: Some(false),
            health_check: Some(Some(CheckKind::SendExpect)),
            health_check_interval: Some(Duration::from_millis(500)),
            health_check_timeout: Some(Duration::from_millis(250)),
            rise: Some(3),
            fall: Some(4),
            health_check_send: Some(b"PING\r\n".to_vec()),
            health_check_expect: Some(b"+PONG".to_vec()),
            max_conns_per_upstream: Some(100),
            max_queue: Some(50),
            queue_timeout: Some(Duration::from_secs(2)),
        };
        assert_eq!(s, expected);
    }

    #[test]
    fn keepalive_and_user_timeout_take_off_and_plain_numbers() {
        let (_, s) = parsed("tcp-keepalive = \"off\"\ntcp-user-timeout = \"off\"");
        assert_eq!(s.tcp_keepalive, Some(None));
        assert_eq!(s.tcp_user_timeout, Some(None));
        let (_, s) = parsed("tcp-keepalive = \"60:10:6\"\ntcp-user-timeout = 30");
        assert_eq!(
            s.tcp_keepalive,
            Some(Some(crate::config::DEFAULT_UPSTREAM_KEEPALIVE))
        );
        assert_eq!(s.tcp_user_timeout, Some(Some(Duration::from_secs(30))));
    }

    #[test]
    fn an_empty_file_sets_nothing() {
        assert_eq!(parsed(""), (None, Settings::default()));
    }

    #[test]
    fn resolve_interval_off_and_a_hosts_file_beside_the_file() {
        for off in [
            "resolve-interval = \"off\"",
            "resolve-interval = 0",
            "resolve-interval = \"0s\"",
        ] {
            assert_eq!(parsed(off).1.resolve_interval, Some(None), "{off}");
        }
        assert_eq!(
            parsed("resolve-interval = 0.5").1.resolve_interval,
            Some(Some(Duration::from_millis(500)))
        );
        let (_, s) = parsed("hosts-file = \"/srv/hosts\"");
        assert_eq!(s.hosts_file, Some("/srv/hosts".into()));
    }

    #[test]
    fn a_relative_body_file_is_taken_from_the_files_directory() {
        let (_, s) = parsed("body-file = \"index.html\"");
        assert_eq!(s.body, Some(Body::File("/etc/edgepoll/index.html".into())));
        let (_, s) = parsed("body-file = \"/srv/index.html\"");
        assert_eq!(s.body, Some(Body::File("/srv/index.html".into())));
        let (_, s) = parsed("body = \"\"");
        assert_eq!(s.body, Some(Body::Text(String::new())));
    }

    #[test]
    fn values_that_do_not_parse_name_the_key_and_its_line() {
        for (text, expect) in [
            (
                "workers = 2\nmax-pending-bytes = \"12XB\"",
                "e.toml:2: key max-pending-bytes: invalid size '12XB': unknown unit 'XB'",
            ),
            (
                "max-header-bytes = 1.5",
                "e.toml:1: key max-header-bytes: invalid size 1.5",
            ),
            (
                "idle-timeout = \"5 days\"",
                "e.toml:1: key idle-timeout: invalid duration '5 days'",
            ),
            (
                "drain-timeout = -1",
                "e.toml:1: key drain-timeout: invalid value: integer `-1`",
            ),
            (
                "listen = [\n  \"127.0.0.1:7000\",\n  \"7000\",\n]",
                "e.toml:1: key listen: invalid address '7000'",
            ),
            (
                "upstream = \"nohost\"",
                "e.toml:1: key upstream: invalid address 'nohost'",
            ),
            (
                "resolve-interval = \"soon\"",
                "e.toml:1: key resolve-interval: invalid duration 'soon'",
            ),
            (
                "metrics-listen = \"9464\"",
                "e.toml:1: key metrics-listen: invalid address '9464'",
            ),
            (
                "workers = 1\ntcp-keepalive = \"60:10\"",
                "e.toml:2: key tcp-keepalive: invalid keepalive '60:10': expected IDLE:INTERVAL:COUNT",
            ),
            (
                "tcp-user-timeout = \"never\"",
                "e.toml:1: key tcp-user-timeout: invalid duration 'never'",
            ),
            (
                "header = [\"nocolon\"]",
                "e.toml:1: key header: invalid header",
            ),
            (
                "mode = \"gopher\"",
                "e.toml:1: key mode: unknown mode 'gopher'",
            ),
            (
                "trusted-proxy = \"10.0.0.1/8\"",
                "e.toml:1: key trusted-proxy: invalid address range '10.0.0.1/8': host bits set",
            ),
            (
                "proxy-header-timeout = \"soon\"",
                "e.toml:1: key proxy-header-timeout: invalid duration 'soon'",
            ),
            (
                "balance = \"random\"",
                "e.toml:1: key balance: unknown balance 'random'",
            ),
            (
                "body = \"x\"\nbody-file = \"y\"",
                "e.toml:2: key body-file: conflicts with key body",
            ),
        ] {
            let got = error(text);
            assert!(got.starts_with(expect), "{text:?}: {got}");
        }
    }

    #[test]
    fn wrong_types_and_unknown_keys_name_the_key_and_its_line() {
        for (text, expect) in [
            (
                "mode = \"echo\"\nworkers = \"four\"",
                "e.toml:2: key workers: invalid type: string \"four\", expected usize",
            ),
            (
                "idle-timeout = true",
                "e.toml:1: key idle-timeout: invalid type: boolean `true`, expected a number",
            ),
            (
                "listen = 7000",
                "e.toml:1: key listen: invalid type: integer `7000`, expected an address",
            ),
            (
                "splice = \"yes\"",
                "e.toml:1: key splice: invalid type: string \"yes\", expected a boolean",
            ),
            (
                "\nwrokers = 4",
                "e.toml:2: key wrokers: unknown field `wrokers`, expected one of `mode`",
            ),
            (
                "[server]\nworkers = 1",
                "e.toml:1: key server: unknown field `server`",
            ),
        ] {
            let got = error(text);
            assert!(got.starts_with(expect), "{text:?}: {got}");
        }
    }

    #[test]
    fn text_that_is_not_toml_is_quoted_with_its_line() {
        let got = error("workers = 4\nlisten = \n");
        assert!(
            got.starts_with("e.toml: TOML parse error at line 2"),
            "{got}"
        );
        let got = error("mode = \"echo\"\nmode = \"http\"");
        assert!(got.contains("duplicate key"), "{got}");
    }
}
