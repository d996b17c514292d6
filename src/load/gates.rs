//! CI gates: limits a run must meet (`--max-p99`, `--max-p999`, `--max-error-rate`,
//! `--min-rps`). Each is checked once the report is merged; a missed one makes
//! `edgeload` exit with status 3.
//!
//! The error rate is the share of attempts that did not succeed. Attempts are the
//! requests that ended (answered, timed out, failed with their connection; those still
//! outstanding at the end are left out) plus the connects that failed and the
//! connections dropped for extra bytes; the ones that did not succeed are all of those
//! but the requests answered well (not a mismatch, not a non-2xx). Each request counts
//! once however it went wrong, so the rate is never over 1. A server that answers 500
//! to half the requests has an error rate of 0.5.
//!
//! A gate with nothing to measure fails: a latency gate when no latency was recorded,
//! the error rate when there was no attempt at all. A CI job should not pass on a run
//! that measured nothing.

use std::time::Duration;

use serde_json::json;

use super::engine::Stats;
use super::report::{human_us, Report};
use super::LoadError;

/// One limit the run must meet.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Gate {
    /// `--max-p99`: the 99th percentile latency at most this.
    MaxP99(Duration),
    /// `--max-p999`: the 99.9th percentile latency at most this.
    MaxP999(Duration),
    /// `--max-error-rate`: errors per attempt at most this ratio (0 to 1).
    MaxErrorRate(f64),
    /// `--min-rps`: completed requests per second at least this.
    MinRps(f64),
}

/// A gate checked against a report.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GateResult {
    pub gate: Gate,
    /// What the run measured, in the gate's unit; None when there was nothing to
    /// measure.
    pub value: Option<f64>,
    pub passed: bool,
}

impl Gate {
    /// The gate's name in the JSON, its flag without the dashes.
    pub fn name(&self) -> &'static str {
        match self {
            Gate::MaxP99(_) => "max-p99",
            Gate::MaxP999(_) => "max-p999",
            Gate::MaxErrorRate(_) => "max-error-rate",
            Gate::MinRps(_) => "min-rps",
        }
    }

    /// The unit of `limit` and of the measured value.
    pub fn unit(&self) -> &'static str {
        match self {
            Gate::MaxP99(_) | Gate::MaxP999(_) => "us",
            Gate::MaxErrorRate(_) => "ratio",
            Gate::MinRps(_) => "requests/s",
        }
    }

    /// The limit, in `unit`.
    pub fn limit(&self) -> f64 {
        match *self {
            Gate::MaxP99(d) | Gate::MaxP999(d) => d.as_secs_f64() * 1e6,
            Gate::MaxErrorRate(r) => r,
            Gate::MinRps(r) => r,
        }
    }

    /// Refuses a limit that no run could meet or that means nothing.
    pub fn validate(&self) -> Result<(), LoadError> {
        let bad = |m: String| Err(LoadError::Config(m));
        match *self {
            Gate::MaxP99(d) | Gate::MaxP999(d) if d < Duration::from_micros(1) => bad(format!(
                "--{} must be at least 1us (latency is measured in microseconds)",
                self.name()
            )),
            Gate::MaxErrorRate(r) if !(0.0..=1.0).contains(&r) => bad(format!(
                "--max-error-rate must be between 0 and 1 (or 0% and 100%), not {r}"
            )),
            Gate::MinRps(r) if !(r.is_finite() && r > 0.0) => {
                bad("--min-rps must be a positive number of requests per second".to_string())
            }
            _ => Ok(()),
        }
    }

    /// Checks the gate against a finished run.
    pub fn check(&self, report: &Report) -> GateResult {
        let stats = &report.stats;
        let value = match self {
            Gate::MaxP99(_) => percentile(stats, 99.0),
            Gate::MaxP999(_) => percentile(stats, 99.9),
            Gate::MaxErrorRate(_) => error_rate(stats),
            Gate::MinRps(_) => Some(report.requests_per_sec()),
        };
        let passed = match (self, value) {
            (_, None) => false,
            (Gate::MinRps(min), Some(v)) => v >= *min,
            (_, Some(v)) => v <= self.limit(),
        };
        GateResult {
            gate: *self,
            value,
            passed,
        }
    }
}

impl GateResult {
    /// One line saying what was measured against what, e.g.
    /// `p99 812.00us > --max-p99 500us`.
    pub fn message(&self) -> String {
        let flag = self.gate.name();
        let (what, value, limit) = match self.gate {
            Gate::MaxP99(d) => ("p99", self.value.map(human_us), compact_duration(d)),
            Gate::MaxP999(d) => ("p99.9", self.value.map(human_us), compact_duration(d)),
            Gate::MaxErrorRate(r) => ("error rate", self.value.map(percent), percent(r)),
            Gate::MinRps(r) => (
                "requests/sec",
                self.value.map(|v| format!("{v:.2}")),
                format!("{r}"),
            ),
        };
        let Some(value) = value else {
            let why = match self.gate {
                Gate::MaxErrorRate(_) => "no request completed or failed",
                _ => "no latency recorded",
            };
            return format!("{what} not measured ({why}); --{flag} {limit}");
        };
        let op = match (self.passed, self.gate) {
            (true, Gate::MinRps(_)) => ">=",
            (false, Gate::MinRps(_)) => "<",
            (true, _) => "<=",
            (false, _) => ">",
        };
        format!("{what} {value} {op} --{flag} {limit}")
    }

    pub fn json(&self) -> serde_json::Value {
        json!({
            "gate": self.gate.name(),
            "limit": self.gate.limit(),
            "value": self.value,
            "unit": self.gate.unit(),
            "passed": self.passed,
        })
    }
}

/// Errors per attempt, as the module doc defines it; None without any attempt.
pub fn error_rate(stats: &Stats) -> Option<f64> {
    let e = &stats.errors;
    let unanswered = stats.timed_out + stats.failed + e.connect + e.extra;
    let attempts = stats.requests + unanswered;
    let bad = stats.bad_answered.min(stats.requests) + unanswered;
    (attempts > 0).then(|| bad as f64 / attempts as f64)
}

/// Latency at percentile `p` in microseconds; None without a response.
fn percentile(stats: &Stats, p: f64) -> Option<f64> {
    (!stats.latency.is_empty()).then(|| stats.latency.value_at_percentile(p) as f64)
}

/// Parses `--max-error-rate`: a ratio (`0.01`) or a percentage (`1%`), 0 to 1.
pub fn parse_ratio(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let (number, scale) = match t.strip_suffix('%') {
        Some(n) => (n.trim(), 0.01),
        None => (t, 1.0),
    };
    let ratio = number
        .parse::<f64>()
        .ok()
        .map(|v| v * scale)
        .filter(|r| (0.0..=1.0).contains(r))
        .ok_or_else(|| {
            format!("invalid ratio '{s}': expected 0 to 1 or 0% to 100%, e.g. 0.01 or 1%")
        })?;
    Ok(ratio)
}

/// A duration as a user would write it: `500us`, `5ms`, `2s`, `1.5ms`.
fn compact_duration(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us >= 1e6 && us % 1e6 == 0.0 {
        format!("{}s", us / 1e6)
    } else if us >= 1e3 {
        format!("{}ms", us / 1e3)
    } else {
        format!("{us}us")
    }
}

/// A ratio as a percentage without trailing zeros: `1%`, `0.5%`, `50.125%`.
fn percent(r: f64) -> String {
    let s = format!("{:.4}", r * 100.0);
    format!("{}%", s.trim_end_matches('0').trim_end_matches('.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::engine::Errors;

    fn report(latencies_us: &[u64], errors: Errors, secs: f64) -> Report {
        let mut stats = Stats::new();
        for &l in latencies_us {
            stats.requests += 1;
            stats.latency.record(l).unwrap();
        }
        stats.errors = errors;
        Report {
            url: "http://127.0.0.1:1/".into(),
            protocol: "http",
            threads: 1,
            connections: 1,
            depth: 1,
            size: None,
            rate: None,
            reconnect: false,
            request: None,
            duration: Duration::from_secs_f64(secs),
            nonce: 0,
            stats,
            gates: Vec::new(),
            seconds: Vec::new(),
            write_error: None,
        }
    }

    #[test]
    fn ratios_and_percentages() {
        assert_eq!(parse_ratio("0.01"), Ok(0.01));
        assert_eq!(parse_ratio("1%"), Ok(0.01));
        assert_eq!(parse_ratio(" 50 % "), Ok(0.5));
        assert_eq!(parse_ratio("0"), Ok(0.0));
        assert_eq!(parse_ratio("100%"), Ok(1.0));
        for bad in ["", "%", "x", "1.5", "101%", "-1%", "NaN", "0.1%%"] {
            let e = parse_ratio(bad).unwrap_err();
            assert!(e.contains("invalid ratio"), "{bad}: {e}");
        }
    }

    #[test]
    fn latency_gates_compare_the_percentile() {
        // 99 fast responses and one slow one: p99 is fast, p99.9 is the slow one.
        let mut lat = vec![100; 99];
        lat.push(20_000);
        let r = report(&lat, Errors::default(), 1.0);
        let p99 = Gate::MaxP99(Duration::from_micros(500)).check(&r);
        assert!(p99.passed);
        assert_eq!(p99.value, Some(100.0));
        assert_eq!(p99.message(), "p99 100.00us <= --max-p99 500us");
        let p999 = Gate::MaxP999(Duration::from_millis(5)).check(&r);
        assert!(!p999.passed);
        // HdrHistogram reports the top of the 3-digit bucket 20,000 falls in.
        assert_eq!(p999.message(), "p99.9 20.02ms > --max-p999 5ms");
        assert!(Gate::MaxP999(Duration::from_secs(2)).check(&r).passed);
        // Equal to the limit passes.
        assert!(Gate::MaxP99(Duration::from_micros(100)).check(&r).passed);
    }

    #[test]
    fn error_rate_counts_failed_attempts_in_the_denominator() {
        // 6 responses of which 2 non-2xx, plus 2 timeouts: 4 errors in 8 attempts.
        let errors = Errors {
            timeout: 2,
            non_2xx: 2,
            ..Errors::default()
        };
        let mut r = report(&[100; 6], errors, 1.0);
        r.stats.timed_out = 2;
        r.stats.bad_answered = 2;
        assert_eq!(error_rate(&r.stats), Some(0.5));
        let g = Gate::MaxErrorRate(0.01).check(&r);
        assert!(!g.passed);
        assert_eq!(g.message(), "error rate 50% > --max-error-rate 1%");
        assert!(Gate::MaxErrorRate(0.5).check(&r).passed);
        assert_eq!(
            error_rate(&report(&[100; 3], Errors::default(), 1.0).stats),
            Some(0.0)
        );
    }

    #[test]
    fn min_rps_and_gates_with_nothing_measured() {
        let r = report(&[100; 50], Errors::default(), 2.0);
        let g = Gate::MinRps(25.0).check(&r);
        assert!(g.passed, "{}", g.message());
        let g = Gate::MinRps(1e9).check(&r);
        assert!(!g.passed);
        assert_eq!(g.message(), "requests/sec 25.00 < --min-rps 1000000000");

        let empty = report(&[], Errors::default(), 1.0);
        for gate in [
            Gate::MaxP99(Duration::from_secs(1)),
            Gate::MaxP999(Duration::from_secs(1)),
            Gate::MaxErrorRate(1.0),
        ] {
            let g = gate.check(&empty);
            assert!(!g.passed && g.value.is_none(), "{gate:?}");
            assert!(g.message().contains("not measured"), "{}", g.message());
        }
        let j = Gate::MaxP99(Duration::from_micros(1500))
            .check(&empty)
            .json();
        assert_eq!(
            j,
            json!({"gate": "max-p99", "limit": 1500.0, "value": null, "unit": "us", "passed": false})
        );
    }

    #[test]
    fn limits_that_mean_nothing_are_refused() {
        assert!(Gate::MaxP99(Duration::ZERO).validate().is_err());
        assert!(Gate::MaxP999(Duration::from_nanos(500)).validate().is_err());
        assert!(Gate::MaxP99(Duration::from_micros(500)).validate().is_ok());
        assert!(Gate::MaxErrorRate(1.5).validate().is_err());
        assert!(Gate::MaxErrorRate(0.0).validate().is_ok());
        assert!(Gate::MinRps(0.0).validate().is_err());
        assert!(Gate::MinRps(f64::INFINITY).validate().is_err());
        assert_eq!(compact_duration(Duration::from_micros(1500)), "1.5ms");
        assert_eq!(compact_duration(Duration::from_secs(2)), "2s");
        assert_eq!(compact_duration(Duration::from_millis(2500)), "2500ms");
    }
}
