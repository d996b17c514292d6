//! Settings from one source, the command line or a configuration file, each unset
//! unless that source gives it; [`load`] puts the flags over the file and applies the
//! result over the defaults of [`Config::new`], the one place defaults come from.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{
    file, Balance, CheckKind, Cidr, Config, ConfigError, HealthCheck, HostPort, Keepalive,
    LogFormat, LogTarget, Mode, UpstreamEntry,
};
use crate::upstream::hosts::{self, Hosts};

/// Where the body of http mode's response comes from. One setting with two spellings,
/// so that `--body` on the command line overrides `body-file` in a file and back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// `--body TEXT`, key `body`.
    Text(String),
    /// `--body-file FILE`, key `body-file`: read when the configuration is built.
    File(PathBuf),
}

/// What one source sets. Every field is named after its key and flag (`workers`,
/// `--workers`) and is None unless the source gives it; the meanings are those of the
/// [`Config`] fields of the same names.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings {
    /// `listen`: every address of every entry, resolved.
    pub listen: Option<Vec<SocketAddr>>,
    /// `workers`.
    pub workers: Option<usize>,
    /// `pin-workers`. A flag can only set it to true.
    pub pin_workers: Option<bool>,
    /// `backlog`.
    pub backlog: Option<u32>,
    /// `max-connections`.
    pub max_connections: Option<usize>,
    /// `max-connections-per-ip`.
    pub max_connections_per_ip: Option<usize>,
    /// `max-pending-bytes`.
    pub max_pending_bytes: Option<usize>,
    /// `max-buffered-bytes`.
    pub max_buffered_bytes: Option<usize>,
    /// `idle-timeout`.
    pub idle_timeout: Option<Duration>,
    /// `drain-timeout`.
    pub drain_timeout: Option<Duration>,
    /// `shutdown-delay`.
    pub shutdown_delay: Option<Duration>,
    /// `metrics-listen`; `Some(None)` is "off".
    pub metrics_listen: Option<Option<SocketAddr>>,
    /// `accept-proxy`. A flag can only set it to true.
    pub accept_proxy: Option<bool>,
    /// `trusted-proxy`, every range.
    pub trusted_proxies: Option<Vec<Cidr>>,
    /// `proxy-header-timeout`.
    pub proxy_header_timeout: Option<Duration>,
    /// `tcp-keepalive`, for client sockets and (relay) upstream sockets alike;
    /// `Some(None)` is "off".
    pub tcp_keepalive: Option<Option<Keepalive>>,
    /// `tcp-user-timeout`; `Some(None)` is "off".
    pub tcp_user_timeout: Option<Option<Duration>>,
    /// `access-log`; `Some(None)` is "off".
    pub access_log: Option<Option<LogTarget>>,
    /// `access-log-format`.
    pub access_log_format: Option<LogFormat>,
    /// `access-log-sample`.
    pub access_log_sample: Option<f64>,
    /// `log-format`.
    pub log_format: Option<LogFormat>,
    /// `body` or `body-file` (http).
    pub body: Option<Body>,
    /// `status` (http).
    pub status: Option<u16>,
    /// `content-type` (http).
    pub content_type: Option<String>,
    /// `header`, every one (http).
    pub headers: Option<Vec<(String, String)>>,
    /// `max-header-bytes` (http).
    pub max_header_bytes: Option<usize>,
    /// `header-timeout` (http).
    pub header_timeout: Option<Duration>,
    /// `upstream`: every entry as given, looked up when the configuration is built
    /// (relay).
    pub upstreams: Option<Vec<HostPort>>,
    /// `resolve-interval` (relay); `Some(None)` is "off".
    pub resolve_interval: Option<Option<Duration>>,
    /// `hosts-file` (relay).
    pub hosts_file: Option<PathBuf>,
    /// `balance` (relay).
    pub balance: Option<Balance>,
    /// `connect-timeout` (relay).
    pub connect_timeout: Option<Duration>,
    /// `fail-timeout` (relay).
    pub fail_timeout: Option<Duration>,
    /// `connect-retries` (relay).
    pub connect_retries: Option<usize>,
    /// `splice` (relay). A flag can only set it to true.
    pub splice: Option<bool>,
    /// `send-proxy-v2` (relay). A flag can only set it to true.
    pub send_proxy_v2: Option<bool>,
    /// `health-check` (relay); `Some(None)` is "off".
    pub health_check: Option<Option<CheckKind>>,
    /// `health-check-interval` (relay).
    pub health_check_interval: Option<Duration>,
    /// `health-check-timeout` (relay).
    pub health_check_timeout: Option<Duration>,
    /// `rise` (relay).
    pub rise: Option<u32>,
    /// `fall` (relay).
    pub fall: Option<u32>,
    /// `health-check-send` (relay), escapes decoded.
    pub health_check_send: Option<Vec<u8>>,
    /// `health-check-expect` (relay), escapes decoded.
    pub health_check_expect: Option<Vec<u8>>,
    /// `max-conns-per-upstream` (relay).
    pub max_conns_per_upstream: Option<usize>,
    /// `max-queue` (relay).
    pub max_queue: Option<usize>,
    /// `queue-timeout` (relay).
    pub queue_timeout: Option<Duration>,
}

/// Why no configuration could be built. Every message names the file, key or flag
/// involved; the binary exits with status 2 for each, as for a bad flag.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The configuration file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not TOML; toml's message quotes the line and points at the column.
    #[error("{}: {}", path.display(), message.trim_end())]
    Syntax { path: PathBuf, message: String },
    /// A key of the file whose value does not parse, is of the wrong type, does not
    /// exist or does not belong to the mode; `line` is the key's (from 1), if known.
    #[error("{}: key {key}: {reason}", place(path, *line))]
    Key {
        path: PathBuf,
        key: String,
        line: Option<usize>,
        reason: String,
    },
    /// A flag whose value does not parse (clap parses the others itself).
    #[error("--{flag}: {reason}")]
    Flag { flag: &'static str, reason: String },
    /// No mode was named, or the subcommand and the file name different ones.
    #[error("{0}")]
    Mode(String),
    /// The response body file could not be read.
    #[error("body-file (--body-file) {}: {source}", path.display())]
    BodyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The hosts file could not be read when the configuration was built; `source`
    /// names the call and the path.
    #[error("hosts-file (--hosts-file): {source}")]
    HostsFile {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The merged settings cannot run; `file` is the configuration file, if any.
    #[error("{}{error}", file.as_ref().map(|f| format!("{}: ", f.display())).unwrap_or_default())]
    Invalid {
        file: Option<PathBuf>,
        error: ConfigError,
    },
}

/// `path`, or `path:line` when the line is known, as compilers name a place in a file.
fn place(path: &Path, line: Option<usize>) -> String {
    match line {
        Some(line) => format!("{}:{line}", path.display()),
        None => path.display().to_string(),
    }
}

/// A configuration built by [`load`], with what its sources set.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The configuration, validated.
    pub config: Config,
    /// The flags over the file: None where the default applies, which tells an explicit
    /// `--max-connections 100000` from the default one.
    pub given: Settings,
}

/// Builds the configuration of `mode` (the subcommand, if one was named) from the
/// flags' settings over those of the configuration file `file`, over the mode's
/// defaults, and validates it. A mode named by both the subcommand and the file's
/// `mode` key must be the same.
pub fn load(mode: Option<Mode>, flags: Settings, file: Option<&Path>) -> Result<Loaded, LoadError> {
    let text = file.map(file::read).transpose()?;
    let (file_mode, from_file) = match (file, &text) {
        (Some(path), Some(text)) => file::parse(text, path)?,
        _ => (None, Settings::default()),
    };
    let mode = match (mode, file_mode, file) {
        (Some(cli), Some(key), Some(path)) if cli != key => {
            return Err(LoadError::Mode(format!(
                "the subcommand is {} but {} has mode = \"{}\"; drop one of them",
                cli.name(),
                path.display(),
                key.name()
            )))
        }
        (Some(mode), _, _) | (None, Some(mode), _) => mode,
        (None, None, Some(path)) => {
            let path = path.display();
            return Err(LoadError::Mode(format!(
                "{path}: no mode key; add mode = \"echo\" (or \"http\", \"relay\"), or name \
                 the mode: edgepoll echo --config {path}"
            )));
        }
        (None, None, None) => {
            let hint = "name one (edgepoll echo, http or relay) or give --config FILE";
            return Err(LoadError::Mode(format!("no mode: {hint}")));
        }
    };
    if let (Some((key, owner)), Some(path), Some(text)) =
        (from_file.key_foreign_to(mode), file, &text)
    {
        return Err(LoadError::Key {
            path: path.to_owned(),
            key: key.to_owned(),
            line: file::line_of_key(text, key),
            reason: format!(
                "only {} mode has this key, and the mode is {}",
                owner.name(),
                mode.name()
            ),
        });
    }
    let given = flags.over(from_file);
    let config = given.to_config(mode).map_err(|e| match e {
        LoadError::Invalid { error, .. } => LoadError::Invalid {
            file: file.map(Path::to_owned),
            error,
        },
        other => other,
    })?;
    Ok(Loaded { config, given })
}

impl Settings {
    /// These settings where they are set, `lower`'s elsewhere: the flags over a file.
    /// A list (`listen`, `upstream`, `header`, `trusted-proxy`) replaces the lower one
    /// whole.
    pub fn over(self, lower: Settings) -> Settings {
        // Destructured, so that a new setting cannot be left out of the merge.
        let Settings {
            listen,
            workers,
            pin_workers,
            backlog,
            max_connections,
            max_connections_per_ip,
            max_pending_bytes,
            max_buffered_bytes,
            idle_timeout,
            drain_timeout,
            shutdown_delay,
            metrics_listen,
            accept_proxy,
            trusted_proxies,
            proxy_header_timeout,
            tcp_keepalive,
            tcp_user_timeout,
            access_log,
            access_log_format,
            access_log_sample,
            log_format,
            body,
            status,
            content_type,
            headers,
            max_header_bytes,
            header_timeout,
            upstreams,
            resolve_interval,
            hosts_file,
            balance,
            connect_timeout,
            fail_timeout,
            connect_retries,
            splice,
            send_proxy_v2,
            health_check,
            health_check_interval,
            health_check_timeout,
            rise,
            fall,
            health_check_send,
            health_check_expect,
            max_conns_per_upstream,
            max_queue,
            queue_timeout,
        } = self;
        Settings {
            listen: listen.or(lower.listen),
            workers: workers.or(lower.workers),
            pin_workers: pin_workers.or(lower.pin_workers),
            backlog: backlog.or(lower.backlog),
            max_connections: max_connections.or(lower.max_connections),
            max_connections_per_ip: max_connections_per_ip.or(lower.max_connections_per_ip),
            max_pending_bytes: max_pending_bytes.or(lower.max_pending_bytes),
            max_buffered_bytes: max_buffered_bytes.or(lower.max_buffered_bytes),
            idle_timeout: idle_timeout.or(lower.idle_timeout),
            drain_timeout: drain_timeout.or(lower.drain_timeout),
            shutdown_delay: shutdown_delay.or(lower.shutdown_delay),
            metrics_listen: metrics_listen.or(lower.metrics_listen),
            accept_proxy: accept_proxy.or(lower.accept_proxy),
            trusted_proxies: trusted_proxies.or(lower.trusted_proxies),
            proxy_header_timeout: proxy_header_timeout.or(lower.proxy_header_timeout),
            tcp_keepalive: tcp_keepalive.or(lower.tcp_keepalive),
            tcp_user_timeout: tcp_user_timeout.or(lower.tcp_user_timeout),
            access_log: access_log.or(lower.access_log),
            access_log_format: access_log_format.or(lower.access_log_format),
            access_log_sample: access_log_sample.or(lower.access_log_sample),
            log_format: log_format.or(lower.log_format),
            body: body.or(lower.body),
            status: status.or(lower.status),
            content_type: content_type.or(lower.content_type),
            headers: headers.or(lower.headers),
            max_header_bytes: max_header_bytes.or(lower.max_header_bytes),
            header_timeout: header_timeout.or(lower.header_timeout),
            upstreams: upstreams.or(lower.upstreams),
            resolve_interval: resolve_interval.or(lower.resolve_interval),
            hosts_file: hosts_file.or(lower.hosts_file),
            balance: balance.or(lower.balance),
            connect_timeout: connect_timeout.or(lower.connect_timeout),
            fail_timeout: fail_timeout.or(lower.fail_timeout),
            connect_retries: connect_retries.or(lower.connect_retries),
            splice: splice.or(lower.splice),
            send_proxy_v2: send_proxy_v2.or(lower.send_proxy_v2),
            health_check: health_check.or(lower.health_check),
            health_check_interval: health_check_interval.or(lower.health_check_interval),
            health_check_timeout: health_check_timeout.or(lower.health_check_timeout),
            rise: rise.or(lower.rise),
            fall: fall.or(lower.fall),
            health_check_send: health_check_send.or(lower.health_check_send),
            health_check_expect: health_check_expect.or(lower.health_check_expect),
            max_conns_per_upstream: max_conns_per_upstream.or(lower.max_conns_per_upstream),
            max_queue: max_queue.or(lower.max_queue),
            queue_timeout: queue_timeout.or(lower.queue_timeout),
        }
    }

    /// The first key set here that `mode` does not have (an `upstream` for echo), with
    /// the mode that has it; as the command line refuses `echo --upstream`. Keys of
    /// every mode (`listen` to `metrics-listen`, `tcp-keepalive`, `tcp-user-timeout`,
    /// the logging keys) are not listed.
    pub fn key_foreign_to(&self, mode: Mode) -> Option<(&'static str, Mode)> {
        let body_key = match self.body {
            Some(Body::File(_)) => "body-file",
            _ => "body",
        };
        let http = [
            (body_key, self.body.is_some()),
            ("status", self.status.is_some()),
            ("content-type", self.content_type.is_some()),
            ("header", self.headers.is_some()),
            ("max-header-bytes", self.max_header_bytes.is_some()),
            ("header-timeout", self.header_timeout.is_some()),
        ];
        let relay = [
            ("upstream", self.upstreams.is_some()),
            ("resolve-interval", self.resolve_interval.is_some()),
            ("hosts-file", self.hosts_file.is_some()),
            ("balance", self.balance.is_some()),
            ("connect-timeout", self.connect_timeout.is_some()),
            ("fail-timeout", self.fail_timeout.is_some()),
            ("connect-retries", self.connect_retries.is_some()),
            ("splice", self.splice.is_some()),
            ("send-proxy-v2", self.send_proxy_v2.is_some()),
            ("health-check", self.health_check.is_some()),
            (
                "health-check-interval",
                self.health_check_interval.is_some(),
            ),
            ("health-check-timeout", self.health_check_timeout.is_some()),
            ("rise", self.rise.is_some()),
            ("fall", self.fall.is_some()),
            ("health-check-send", self.health_check_send.is_some()),
            ("health-check-expect", self.health_check_expect.is_some()),
            (
                "max-conns-per-upstream",
                self.max_conns_per_upstream.is_some(),
            ),
            ("max-queue", self.max_queue.is_some()),
            ("queue-timeout", self.queue_timeout.is_some()),
        ];
        let http = http.map(|(key, set)| (key, set, Mode::Http));
        let relay = relay.map(|(key, set)| (key, set, Mode::Relay));
        let foreign = match mode {
            Mode::Echo => [&http[..], &relay[..]].concat(),
            Mode::Http => relay.to_vec(),
            Mode::Relay => http.to_vec(),
        };
        foreign
            .into_iter()
            .find(|(_, set, _)| *set)
            .map(|(key, _, owner)| (key, owner))
    }

    /// The defaults of `mode` with every setting given here applied, the body file
    /// read, and the result validated.
    pub fn to_config(&self, mode: Mode) -> Result<Config, LoadError> {
        let mut c = Config::new(mode);
        if let Some(listen) = &self.listen {
            c.listen = without_repeats(listen);
        }
        c.workers = self.workers.unwrap_or(c.workers);
        c.pin_workers = self.pin_workers.unwrap_or(c.pin_workers);
        c.backlog = self.backlog.unwrap_or(c.backlog);
        c.max_connections = self.max_connections.unwrap_or(c.max_connections);
        if self.max_connections_per_ip.is_some() {
            c.max_connections_per_ip = self.max_connections_per_ip;
        }
        c.max_pending_bytes = self.max_pending_bytes.unwrap_or(c.max_pending_bytes);
        c.max_buffered_bytes = self.max_buffered_bytes.unwrap_or(c.max_buffered_bytes);
        if self.idle_timeout.is_some() {
            c.idle_timeout = self.idle_timeout;
        }
        c.drain_timeout = self.drain_timeout.unwrap_or(c.drain_timeout);
        c.shutdown_delay = self.shutdown_delay.unwrap_or(c.shutdown_delay);
        c.metrics_listen = self.metrics_listen.unwrap_or(c.metrics_listen);
        c.accept_proxy = self.accept_proxy.unwrap_or(c.accept_proxy);
        if let Some(trusted) = &self.trusted_proxies {
            let mut once: Vec<Cidr> = Vec::with_capacity(trusted.len());
            for t in trusted {
                if !once.contains(t) {
                    once.push(*t);
                }
            }
            c.trusted_proxies = once;
        }
        c.proxy_header_timeout = self.proxy_header_timeout.unwrap_or(c.proxy_header_timeout);
        // One setting for both kinds of socket: given, it replaces relay's upstream
        // default too, so `off` turns keepalive off everywhere.
        if let Some(keepalive) = self.tcp_keepalive {
            c.tcp_keepalive = keepalive;
            c.relay.upstream_keepalive = keepalive;
        }
        c.tcp_user_timeout = self.tcp_user_timeout.unwrap_or(c.tcp_user_timeout);
        if let Some(target) = &self.access_log {
            c.access_log.target = target.clone();
        }
        c.access_log.format = self.access_log_format.unwrap_or(c.access_log.format);
        c.access_log.sample = self.access_log_sample.unwrap_or(c.access_log.sample);
        c.log_format = self.log_format.unwrap_or(c.log_format);

        let h = &mut c.http;
        match &self.body {
            Some(Body::Text(text)) => h.body = text.clone().into_bytes(),
            // Read only in http mode: no other mode sends it (and no other takes the flag).
            Some(Body::File(path)) if mode == Mode::Http => {
                h.body = std::fs::read(path).map_err(|source| LoadError::BodyFile {
                    path: path.clone(),
                    source,
                })?
            }
            Some(Body::File(_)) | None => {}
        }
        h.status = self.status.unwrap_or(h.status);
        if let Some(t) = &self.content_type {
            h.content_type = t.clone();
        }
        if let Some(headers) = &self.headers {
            h.headers = headers.clone();
        }
        h.max_header_bytes = self.max_header_bytes.unwrap_or(h.max_header_bytes);
        h.header_timeout = self.header_timeout.unwrap_or(h.header_timeout);

        let r = &mut c.relay;
        if mode == Mode::Relay {
            r.hosts_file = self.hosts_file.clone();
            if let Some(given) = &self.upstreams {
                r.upstream_entries = self.look_up(given)?;
                let all: Vec<SocketAddr> = r
                    .upstream_entries
                    .iter()
                    .flat_map(|e| e.addrs.iter().copied())
                    .collect();
                r.upstreams = without_repeats(&all);
            }
        }
        r.resolve_interval = self.resolve_interval.unwrap_or(r.resolve_interval);
        r.balance = self.balance.unwrap_or(r.balance);
        r.connect_timeout = self.connect_timeout.unwrap_or(r.connect_timeout);
        r.fail_timeout = self.fail_timeout.unwrap_or(r.fail_timeout);
        if self.connect_retries.is_some() {
            r.connect_retries = self.connect_retries;
        }
        r.splice = self.splice.unwrap_or(r.splice);
        r.send_proxy_v2 = self.send_proxy_v2.unwrap_or(r.send_proxy_v2);
        r.health_check = self.health_check()?;
        if self.max_conns_per_upstream.is_none() {
            let stray = [
                ("max-queue", self.max_queue.is_some()),
                ("queue-timeout", self.queue_timeout.is_some()),
            ];
            if let Some((key, _)) = stray.iter().find(|(_, set)| *set) {
                return Err(LoadError::Invalid {
                    file: None,
                    error: ConfigError::Relay(format!(
                        "{key} (--{key}): only with max-conns-per-upstream (--max-conns-per-upstream N)"
                    )),
                });
            }
        }
        r.max_conns_per_upstream = self.max_conns_per_upstream;
        r.max_queue = self.max_queue.unwrap_or(r.max_queue);
        r.queue_timeout = self.queue_timeout.unwrap_or(r.queue_timeout);

        c.validate()
            .map_err(|error| LoadError::Invalid { file: None, error })?;
        Ok(c)
    }
}

impl Settings {
    /// Each of `given` (once) with its addresses: names looked up in `hosts-file`
    /// first, then through the system resolver. A name that cannot be looked up, or
    /// has no address, stops the start: there would be nothing to relay to.
    fn look_up(&self, given: &[HostPort]) -> Result<Vec<UpstreamEntry>, LoadError> {
        let hosts = match &self.hosts_file {
            Some(path) => Some(Hosts::read(path).map_err(|source| LoadError::HostsFile {
                path: path.clone(),
                source,
            })?),
            None => None,
        };
        let invalid = |why: String| LoadError::Invalid {
            file: None,
            error: ConfigError::Relay(why),
        };
        let mut entries = Vec::with_capacity(given.len());
        for g in without_repeats(given) {
            let addrs = match &g {
                HostPort::Ip(addr) => vec![*addr],
                HostPort::Name(host, port) => hosts::lookup(host, *port, hosts.as_ref())
                    .map_err(|e| invalid(format!("upstream (--upstream) {g}: {e}")))?,
            };
            if addrs.is_empty() {
                return Err(invalid(format!(
                    "upstream (--upstream) {g}: the name has no address"
                )));
            }
            entries.push(UpstreamEntry { given: g, addrs });
        }
        Ok(entries)
    }

    /// The health checks the `health-check*`, `rise` and `fall` settings ask for. Any
    /// of them without `health-check` is refused rather than silently ignored.
    fn health_check(&self) -> Result<Option<HealthCheck>, LoadError> {
        let Some(kind) = self.health_check.flatten() else {
            let stray = [
                (
                    "health-check-interval",
                    self.health_check_interval.is_some(),
                ),
                ("health-check-timeout", self.health_check_timeout.is_some()),
                ("rise", self.rise.is_some()),
                ("fall", self.fall.is_some()),
                ("health-check-send", self.health_check_send.is_some()),
                ("health-check-expect", self.health_check_expect.is_some()),
            ];
            return match stray.iter().find(|(_, set)| *set) {
                Some((key, _)) => Err(LoadError::Invalid {
                    file: None,
                    error: ConfigError::Relay(format!(
                        "{key} (--{key}): only with health-check (--health-check tcp|send-expect)"
                    )),
                }),
                None => Ok(None),
            };
        };
        let mut check = HealthCheck::new(kind);
        check.interval = self.health_check_interval.unwrap_or(check.interval);
        // The default timeout never exceeds the interval: a probe ends before the next.
        check.timeout = self
            .health_check_timeout
            .unwrap_or(check.timeout.min(check.interval));
        check.rise = self.rise.unwrap_or(check.rise);
        check.fall = self.fall.unwrap_or(check.fall);
        check.send = self.health_check_send.clone().unwrap_or_default();
        check.expect = self.health_check_expect.clone().unwrap_or_default();
        Ok(Some(check))
    }
}

/// `items` in order, each once: a name that resolves to an address given as well
/// must not bind it twice, nor be followed twice.
fn without_repeats<T: PartialEq + Clone>(items: &[T]) -> Vec<T> {
    let mut out: Vec<T> = Vec::with_capacity(items.len());
    for a in items {
        if !out.contains(a) {
            out.push(a.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file in a directory of this test's own, removed when the value drops.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, text: &str) -> TempFile {
            let dir =
                std::env::temp_dir().join(format!("edgepoll-settings-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn flags_win_the_file_fills_in_and_the_rest_stays_unset() {
        let flags = Settings {
            listen: Some(vec![addr("127.0.0.1:7100")]),
            body: Some(Body::Text("flag".into())),
            ..Settings::default()
        };
        let file = Settings {
            listen: Some(vec![addr("127.0.0.1:7200"), addr("127.0.0.1:7201")]),
            workers: Some(3),
            body: Some(Body::File("index.html".into())),
            headers: Some(vec![("X-A".into(), "b".into())]),
            ..Settings::default()
        };
        let merged = flags.over(file);
        assert_eq!(
            merged,
            Settings {
                // A list replaces the file's whole, and --body replaces body-file.
                listen: Some(vec![addr("127.0.0.1:7100")]),
                body: Some(Body::Text("flag".into())),
                workers: Some(3),
                headers: Some(vec![("X-A".into(), "b".into())]),
                ..Settings::default()
            }
        );
    }

    #[test]
    fn unset_settings_keep_the_defaults_of_the_mode() {
        for mode in [Mode::Echo, Mode::Http] {
            let built = Settings::default().to_config(mode).unwrap();
            let defaults = Config::new(mode);
            assert_eq!(format!("{built:?}"), format!("{defaults:?}"));
        }
        let relay = Settings {
            upstreams: Some(vec![HostPort::Ip(addr("127.0.0.1:6379"))]),
            ..Settings::default()
        };
        let built = relay.to_config(Mode::Relay).unwrap();
        assert_eq!(
            built.idle_timeout,
            Some(crate::config::DEFAULT_RELAY_IDLE_TIMEOUT)
        );
        assert_eq!(
            built.relay,
            crate::config::RelayConfig {
                upstreams: vec![addr("127.0.0.1:6379")],
                upstream_entries: vec![UpstreamEntry {
                    given: HostPort::Ip(addr("127.0.0.1:6379")),
                    addrs: vec![addr("127.0.0.1:6379")],
                }],
                ..Default::default()
            }
        );
    }

    #[test]
    fn tcp_keepalive_sets_clients_and_upstreams_and_off_turns_both_off() {
        let relay = |tcp_keepalive| {
            Settings {
                upstreams: Some(vec![HostPort::Ip(addr("127.0.0.1:6379"))]),
                tcp_keepalive,
                ..Settings::default()
            }
            .to_config(Mode::Relay)
            .unwrap()
        };
        let unset = relay(None);
        assert_eq!(unset.tcp_keepalive, None);
        assert_eq!(
            unset.relay.upstream_keepalive,
            Some(crate::config::DEFAULT_UPSTREAM_KEEPALIVE)
        );
        let off = relay(Some(None));
        assert_eq!(
            (off.tcp_keepalive, off.relay.upstream_keepalive),
            (None, None)
        );
        let k = Keepalive {
            idle: Duration::from_secs(30),
            interval: Duration::from_secs(5),
            count: 3,
        };
        let on = relay(Some(Some(k)));
        assert_eq!(
            (on.tcp_keepalive, on.relay.upstream_keepalive),
            (Some(k), Some(k))
        );
        // A flag's off overrides a file's keepalive, as metrics-listen's does.
        let flags = Settings {
            tcp_keepalive: Some(None),
            tcp_user_timeout: Some(None),
            ..Settings::default()
        };
        let file = Settings {
            tcp_keepalive: Some(Some(k)),
            tcp_user_timeout: Some(Some(Duration::from_secs(9))),
            ..Settings::default()
        };
        let merged = flags.over(file).to_config(Mode::Echo).unwrap();
        assert_eq!(
            (merged.tcp_keepalive, merged.tcp_user_timeout),
            (None, None)
        );
    }

    #[test]
    fn a_repeated_address_is_bound_once() {
        let s = Settings {
            listen: Some(vec![addr("127.0.0.1:7000"), addr("127.0.0.1:7000")]),
            ..Settings::default()
        };
        assert_eq!(
            s.to_config(Mode::Echo).unwrap().listen,
            vec![addr("127.0.0.1:7000")]
        );
    }

    #[test]
    fn load_puts_flags_over_the_file_over_the_defaults() {
        let file = TempFile::new(
            "over.toml",
            r#"
            mode = "http"
            listen = "127.0.0.1:7300"
            workers = 3
            status = 404
            body = ""
            max-pending-bytes = "1KiB"
            "#,
        );
        let flags = Settings {
            workers: Some(2),
            ..Settings::default()
        };
        let loaded = load(None, flags, Some(&file.0)).unwrap();
        let c = loaded.config;
        assert_eq!(c.mode, Mode::Http);
        assert_eq!(c.listen, vec![addr("127.0.0.1:7300")]);
        assert_eq!(c.workers, 2);
        assert_eq!(c.http.status, 404);
        assert_eq!(c.max_pending_bytes, 1024);
        assert_eq!(c.drain_timeout, crate::config::DEFAULT_DRAIN_TIMEOUT);
        assert_eq!(loaded.given.max_connections, None);
    }

    #[test]
    fn the_mode_comes_from_the_subcommand_or_the_file_and_they_must_agree() {
        let echo = TempFile::new("echo.toml", "mode = \"echo\"\n");
        let none = TempFile::new("none.toml", "workers = 2\n");
        let ok = |mode, file: &TempFile| load(mode, Settings::default(), Some(&file.0));
        assert_eq!(ok(None, &echo).unwrap().config.mode, Mode::Echo);
        assert_eq!(ok(Some(Mode::Echo), &echo).unwrap().config.mode, Mode::Echo);
        assert_eq!(ok(Some(Mode::Http), &none).unwrap().config.mode, Mode::Http);
        let err = ok(Some(Mode::Http), &echo).unwrap_err().to_string();
        assert!(err.starts_with("the subcommand is http but "), "{err}");
        assert!(err.contains("echo.toml has mode = \"echo\""), "{err}");
        let err = ok(None, &none).unwrap_err().to_string();
        assert!(err.contains("none.toml: no mode key"), "{err}");
    }

    #[test]
    fn a_key_of_another_mode_is_refused_with_the_mode_that_has_it() {
        let file = TempFile::new(
            "foreign.toml",
            "mode = \"echo\"\nupstream = \"127.0.0.1:6379\"\n",
        );
        let err = load(None, Settings::default(), Some(&file.0)).unwrap_err();
        assert!(
            err.to_string().ends_with(
                "foreign.toml:2: key upstream: only relay mode has this key, and the mode is echo"
            ),
            "{err}"
        );
    }

    #[test]
    fn invalid_values_name_the_file_the_key_and_the_flag() {
        let file = TempFile::new("zero.toml", "mode = \"echo\"\nworkers = 0\n");
        let err = load(None, Settings::default(), Some(&file.0)).unwrap_err();
        assert!(
            err.to_string()
                .ends_with("zero.toml: workers (--workers) must be between 1 and 1024, got 0"),
            "{err}"
        );
        let err = load(
            Some(Mode::Echo),
            Settings {
                workers: Some(0),
                ..Settings::default()
            },
            None,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "workers (--workers) must be between 1 and 1024, got 0"
        );
        let missing = Path::new("/nonexistent/edgepoll.toml");
        let err = load(None, Settings::default(), Some(missing)).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("/nonexistent/edgepoll.toml: No such file"),
            "{err}"
        );
    }

    #[test]
    fn names_are_looked_up_in_the_hosts_file_and_kept_beside_their_addresses() {
        let hosts = TempFile::new("hosts", "127.0.0.2 svc.test\n127.0.0.3 svc.test\n");
        let svc = HostPort::Name("svc.test".into(), 6379);
        let literal = HostPort::Ip(addr("127.0.0.3:6379"));
        let s = Settings {
            upstreams: Some(vec![literal.clone(), svc.clone(), svc.clone()]),
            hosts_file: Some(hosts.0.clone()),
            ..Settings::default()
        };
        let r = s.to_config(Mode::Relay).unwrap().relay;
        // The address both give is relayed to once; the name is followed once.
        assert_eq!(
            r.upstreams,
            vec![addr("127.0.0.3:6379"), addr("127.0.0.2:6379")]
        );
        assert_eq!(
            r.upstream_entries,
            vec![
                UpstreamEntry {
                    given: literal,
                    addrs: vec![addr("127.0.0.3:6379")],
                },
                UpstreamEntry {
                    given: svc,
                    addrs: vec![addr("127.0.0.2:6379"), addr("127.0.0.3:6379")],
                },
            ]
        );
        assert_eq!(r.names().count(), 1);
        assert_eq!(
            r.resolve_interval,
            Some(crate::config::DEFAULT_RESOLVE_INTERVAL)
        );
        assert_eq!(r.hosts_file.as_deref(), Some(hosts.0.as_path()));
    }

    #[test]
    fn a_missing_hosts_file_and_a_short_interval_stop_the_start() {
        let s = Settings {
            upstreams: Some(vec![HostPort::Name("svc.test".into(), 6379)]),
            hosts_file: Some("/nonexistent/hosts".into()),
            ..Settings::default()
        };
        let err = s.to_config(Mode::Relay).unwrap_err().to_string();
        assert!(
            err.starts_with("hosts-file (--hosts-file): read /nonexistent/hosts: No such file"),
            "{err}"
        );
        let s = Settings {
            upstreams: Some(vec![HostPort::Ip(addr("127.0.0.2:6379"))]),
            resolve_interval: Some(Some(Duration::from_millis(5))),
            ..Settings::default()
        };
        let err = s.to_config(Mode::Relay).unwrap_err().to_string();
        assert!(
            err.starts_with("resolve-interval (--resolve-interval) 5ms: at least 10ms"),
            "{err}"
        );
        let s = Settings {
            upstreams: Some(vec![HostPort::Ip(addr("127.0.0.2:6379"))]),
            resolve_interval: Some(None),
            ..Settings::default()
        };
        assert_eq!(
            s.to_config(Mode::Relay).unwrap().relay.resolve_interval,
            None
        );
    }

    #[test]
    fn the_body_file_is_read_and_a_missing_one_named() {
        let body = TempFile::new("body.html", "<p>hi</p>");
        let file = TempFile::new("body.toml", "mode = \"http\"\nbody-file = \"body.html\"\n");
        let c = load(None, Settings::default(), Some(&file.0))
            .unwrap()
            .config;
        assert_eq!(c.http.body, b"<p>hi</p>");
        drop(body);
        let err = load(None, Settings::default(), Some(&file.0))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("body-file (--body-file) "), "{err}");
        assert!(err.contains("body.html: No such file"), "{err}");
    }
}
