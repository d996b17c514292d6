//! Access log records as a test reads them (`--access-log`): each line parsed strictly
//! (text: `key=value` pairs, no key twice; JSON: one object whose values have the
//! types the README gives), with the fields in the order written.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use edgepoll::config::{LogFormat, LogTarget};
use edgepoll::metrics::AccessLogResult;
use edgepoll::{Config, Server};

/// One record: its line and its fields in order, each value in its text form (a JSON
/// `null` as `-`, its `statuses` object as `status_CODE` keys).
#[derive(Debug, Clone)]
pub struct Rec {
    pub line: String,
    pub fields: Vec<(String, String)>,
}

impl Rec {
    #[track_caller]
    pub fn get(&self, key: &str) -> &str {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("no {key} in {}", self.line))
    }

    #[track_caller]
    pub fn num(&self, key: &str) -> u64 {
        let v = self.get(key);
        v.parse()
            .unwrap_or_else(|_| panic!("{key}={v} is not a count in {}", self.line))
    }

    #[track_caller]
    pub fn addr(&self, key: &str) -> SocketAddr {
        let v = self.get(key);
        v.parse()
            .unwrap_or_else(|_| panic!("{key}={v} is not an address in {}", self.line))
    }

    /// The count of `status_CODE`, 0 if absent.
    pub fn status(&self, code: u16) -> u64 {
        let key = format!("status_{code}");
        self.fields
            .iter()
            .find(|(k, _)| *k == key)
            .map_or(0, |(_, v)| v.parse().unwrap())
    }

    /// Asserts each `(key, value)`.
    #[track_caller]
    pub fn expect(&self, want: &[(&str, &dyn ToString)]) {
        for (key, value) in want {
            assert_eq!(self.get(key), value.to_string(), "{key} in {}", self.line);
        }
    }
}

/// Parses one line, text or JSON; panics on anything malformed.
#[track_caller]
pub fn parse_line(line: &str) -> Rec {
    if line.starts_with('{') {
        parse_json(line)
    } else {
        parse_text(line)
    }
}

#[track_caller]
fn parse_text(line: &str) -> Rec {
    assert!(line.starts_with("time="), "not a text record: {line}");
    let mut fields: Vec<(String, String)> = Vec::new();
    for pair in line.split(' ') {
        let (k, v) = pair
            .split_once('=')
            .unwrap_or_else(|| panic!("{pair:?} is not key=value in {line}"));
        assert!(!k.is_empty() && !v.is_empty(), "{pair:?} in {line}");
        assert!(
            fields.iter().all(|(seen, _)| seen != k),
            "{k} twice: {line}"
        );
        fields.push((k.into(), v.into()));
    }
    Rec {
        line: line.into(),
        fields,
    }
}

const COUNTS: &[&str] = &[
    "worker",
    "retries",
    "bytes_in",
    "bytes_out",
    "upstream_bytes_out",
    "upstream_bytes_in",
    "duration_ms",
    "requests",
];
const STRINGS: &[&str] = &["time", "mode", "reason", "ended_by", "stage"];
const ADDRESSES: &[&str] = &["client", "peer", "listen", "upstream"];

#[track_caller]
fn parse_json(line: &str) -> Rec {
    let value: serde_json::Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    let object = value
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {line}"));
    let mut keys: Vec<(usize, &String)> = object
        .keys()
        .map(|k| (line.find(&format!("\"{k}\":")).unwrap(), k))
        .collect();
    keys.sort();
    let mut fields = Vec::new();
    for (_, key) in keys {
        let v = &object[key];
        let k = key.as_str();
        if k == "statuses" {
            for (code, n) in v.as_object().expect("statuses is an object") {
                let n = n.as_u64().expect("a status count is a whole number");
                fields.push((format!("status_{code}"), n.to_string()));
            }
            continue;
        }
        let text = if COUNTS.contains(&k) {
            v.as_u64()
                .unwrap_or_else(|| panic!("{k} is not a whole number: {line}"))
                .to_string()
        } else if STRINGS.contains(&k) {
            v.as_str()
                .unwrap_or_else(|| panic!("{k} is not a string: {line}"))
                .to_string()
        } else if ADDRESSES.contains(&k) {
            match v {
                serde_json::Value::Null => "-".into(),
                serde_json::Value::String(s) => s.clone(),
                _ => panic!("{k} is neither an address nor null: {line}"),
            }
        } else if k == "connect_ms" {
            match v {
                serde_json::Value::Null => "-".into(),
                serde_json::Value::Number(n) => format!("{:.3}", n.as_f64().unwrap()),
                _ => panic!("connect_ms is neither a number nor null: {line}"),
            }
        } else if k == "reset" {
            v.as_bool()
                .unwrap_or_else(|| panic!("reset is not a bool: {line}"))
                .to_string()
        } else {
            panic!("unknown key {k} in {line}");
        };
        fields.push((k.to_string(), text));
    }
    Rec {
        line: line.into(),
        fields,
    }
}

/// Every record in the file at `path` (none if it does not exist); each line whole.
#[track_caller]
pub fn read_log(path: &Path) -> Vec<Rec> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => panic!("read {}: {e}", path.display()),
    };
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "{} ends in the middle of a line",
        path.display()
    );
    text.lines().map(parse_line).collect()
}

/// A directory of one test's own for log files, removed on drop.
pub struct LogDir(pub PathBuf);

impl LogDir {
    pub fn new(test: &str) -> LogDir {
        let dir = std::env::temp_dir().join(format!("edgepoll-r18-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        LogDir(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for LogDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Turns the access log on, to `path` in `format`.
pub fn log_to(c: &mut Config, path: &Path, format: LogFormat) {
    c.access_log.target = Some(LogTarget::File(path.to_path_buf()));
    c.access_log.format = format;
}

pub fn written(server: &Server) -> u64 {
    server
        .metrics()
        .access_log_records(AccessLogResult::Written)
}

pub fn dropped(server: &Server) -> u64 {
    server
        .metrics()
        .access_log_records(AccessLogResult::Dropped)
}
