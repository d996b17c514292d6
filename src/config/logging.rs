//! The logging settings: the per-connection access log (`--access-log`,
//! `--access-log-format`, `--access-log-sample`) and the format of edgepoll's own log
//! lines (`--log-format`).

use std::path::PathBuf;

/// Where `--access-log` writes its records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogTarget {
    /// Standard error, beside edgepoll's own log lines (the journal under systemd, the
    /// container's log under Kubernetes).
    Stderr,
    /// A file, opened for append (and created, mode 0644); reopened on SIGUSR1.
    File(PathBuf),
}

/// How log lines are written: `--access-log-format` and `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One line of space-separated `key=value` pairs (logfmt).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// The access log: one record per closed connection (per relayed pair).
#[derive(Debug, Clone, PartialEq)]
pub struct AccessLogConfig {
    /// Where records go; None: no access log (the default).
    pub target: Option<LogTarget>,
    pub format: LogFormat,
    /// The share of cleanly ended connections (`eof`, `shutdown`) that get a record,
    /// from 0 (exclusive) to 1; every other close is logged whatever the sample.
    pub sample: f64,
}

impl Default for AccessLogConfig {
    fn default() -> AccessLogConfig {
        AccessLogConfig {
            target: None,
            format: LogFormat::Text,
            sample: 1.0,
        }
    }
}

impl AccessLogConfig {
    /// A sample outside (0, 1], said in the words of the flag.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.sample > 0.0 && self.sample <= 1.0) {
            return Err(format!(
                "access-log-sample (--access-log-sample) must be greater than 0 and at most 1, got {}",
                self.sample
            ));
        }
        Ok(())
    }
}

/// `--access-log PATH|stderr|off`. A path that is not absolute is taken as given
/// (from the working directory; the configuration file resolves its own against its
/// directory).
pub fn parse_log_target(s: &str) -> Result<Option<LogTarget>, String> {
    match s {
        "off" | "none" => Ok(None),
        "stderr" | "-" => Ok(Some(LogTarget::Stderr)),
        "" => Err("an empty path; give a file, \"stderr\" or \"off\"".into()),
        path => Ok(Some(LogTarget::File(PathBuf::from(path)))),
    }
}

/// `--access-log-format` and `--log-format`: `text` or `json`.
pub fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    match s {
        "text" | "logfmt" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        other => Err(format!("unknown log format '{other}': text or json")),
    }
}

/// `--access-log-sample`: a ratio, `0.01`, or a percentage, `1%`.
pub fn parse_sample(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let (number, scale) = match t.strip_suffix('%') {
        Some(n) => (n.trim(), 100.0),
        None => (t, 1.0),
    };
    let v: f64 = number
        .parse()
        .map_err(|_| format!("invalid ratio '{s}': a number from 0 to 1, or a percentage"))?;
    let ratio = v / scale;
    if !(ratio > 0.0 && ratio <= 1.0) {
        return Err(format!(
            "invalid ratio '{s}': must be greater than 0 and at most 1 (100%)"
        ));
    }
    Ok(ratio)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_formats_and_samples_parse_or_say_why() {
        assert_eq!(parse_log_target("off"), Ok(None));
        assert_eq!(parse_log_target("stderr"), Ok(Some(LogTarget::Stderr)));
        assert_eq!(
            parse_log_target("/var/log/edgepoll/access.log"),
            Ok(Some(LogTarget::File("/var/log/edgepoll/access.log".into())))
        );
        assert!(parse_log_target("").is_err());
        assert_eq!(parse_log_format("json"), Ok(LogFormat::Json));
        assert_eq!(parse_log_format("text"), Ok(LogFormat::Text));
        assert_eq!(
            parse_log_format("xml"),
            Err("unknown log format 'xml': text or json".into())
        );
        assert_eq!(parse_sample("0.25"), Ok(0.25));
        assert_eq!(parse_sample("1"), Ok(1.0));
        assert_eq!(parse_sample("5%"), Ok(0.05));
        assert!(parse_sample("0").is_err());
        assert!(parse_sample("1.5").is_err());
        assert!(parse_sample("-0.1").is_err());
        assert!(parse_sample("NaN").is_err());
        assert!(parse_sample("half").is_err());
    }
}
