//! The merged result of a load test: wrk-like text, a JSON object for scripts.

use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::json;

use super::engine::Stats;
use super::gates::GateResult;
use super::plan::RatePlan;
use super::series::{errors_json, Second, StepStats};
use super::{LoadConfig, Target};

/// The percentiles printed with `--latency` and always put in the JSON.
pub const PERCENTILES: [f64; 6] = [50.0, 75.0, 90.0, 99.0, 99.9, 99.99];

/// Everything a load test measured, across threads.
#[derive(Debug, Clone)]
pub struct Report {
    pub url: String,
    /// `echo` or `http`.
    pub protocol: &'static str,
    pub threads: usize,
    pub connections: usize,
    pub depth: usize,
    /// Echo request size.
    pub size: Option<usize>,
    /// Open loop: the `--rate` plan.
    pub rate: Option<RatePlan>,
    /// A new connection per request.
    pub reconnect: bool,
    /// HTTP: the method and version sent (`GET`, `HTTP/1.1`); None for echo.
    pub request: Option<(String, &'static str)>,
    /// The run's length, `-d`: each thread stops at its end, and counts nothing after.
    pub duration: Duration,
    /// The run's nonce, in every echo connection's seed (`--seed` replays it).
    pub nonce: u64,
    /// The sum of every thread's measurements.
    pub stats: Stats,
    /// The CI gates asked for, checked against the figures above.
    pub gates: Vec<GateResult>,
    /// Each second of the run: requests answered, errors, percentiles.
    pub seconds: Vec<Second>,
    /// `--timeseries` or `--hdr-log` could not be written during the run (the file and
    /// why); the figures above stand.
    pub write_error: Option<String>,
}

impl Report {
    pub(crate) fn merge(
        config: &LoadConfig,
        duration: Duration,
        nonce: u64,
        stats: Vec<Stats>,
        seconds: Vec<Second>,
    ) -> Report {
        let echo = matches!(config.target, Target::Echo { .. });
        let total = stats.iter().fold(Stats::new(), |mut total, s| {
            total.add(s);
            total
        });
        let mut report = Report {
            url: config.url.clone(),
            protocol: if echo { "echo" } else { "http" },
            threads: config.threads,
            connections: config.connections,
            depth: config.depth,
            size: echo.then_some(config.size),
            rate: config.rate.clone(),
            reconnect: config.reconnect,
            request: (!echo).then(|| {
                let version = if config.request.http10 {
                    "HTTP/1.0"
                } else {
                    "HTTP/1.1"
                };
                (config.request.method().to_string(), version)
            }),
            duration,
            nonce,
            stats: total,
            gates: Vec::new(),
            seconds,
            write_error: None,
        };
        // The threads' shares of each step's rate add up to it, but not always exactly
        // in floating point: report the rate asked for.
        if let Some((rates, _)) = config.rate.as_ref().and_then(|p| p.steps()) {
            for (step, &rate) in report.stats.steps.iter_mut().zip(rates) {
                step.rate = rate;
            }
        }
        report.gates = config.gates.iter().map(|g| g.check(&report)).collect();
        report
    }

    /// The gates the run missed.
    pub fn failed_gates(&self) -> impl Iterator<Item = &GateResult> {
        self.gates.iter().filter(|g| !g.passed)
    }

    pub fn requests_per_sec(&self) -> f64 {
        self.stats.requests as f64 / self.duration.as_secs_f64().max(1e-9)
    }

    /// Latency at percentile `p` (0-100), in microseconds.
    pub fn percentile_us(&self, p: f64) -> u64 {
        self.stats.latency.value_at_percentile(p)
    }

    /// The service time (from each request's send time): open loop its own histogram,
    /// closed loop the latency itself.
    pub fn service(&self) -> &Histogram<u64> {
        if self.rate.is_some() {
            &self.stats.service
        } else {
            &self.stats.latency
        }
    }

    /// Open loop: requests sent late beyond those edgeload itself noticed late: they
    /// waited for a free connection (the server, or too few connections, could not
    /// keep up).
    fn late_waiting(&self) -> u64 {
        self.stats
            .sent_late
            .saturating_sub(self.stats.late_by_generator)
    }

    /// Lines that say a run did not measure what was asked: open loop, requests the
    /// generator or the server could not keep on schedule.
    pub fn warnings(&self) -> Vec<String> {
        let s = &self.stats;
        let mut w = Vec::new();
        let Some(plan) = &self.rate else {
            return w;
        };
        let rate = plan.describe();
        let due = s.due.max(1);
        if s.late_by_generator * 100 > due {
            w.push(format!(
                "edgeload itself fell behind: it noticed {} of {} requests more than 1 ms \
                 after they fell due; the latencies include that delay (add threads with \
                 -t, or lower --rate)",
                s.late_by_generator, s.due
            ));
        }
        let waiting = self.late_waiting();
        if s.unsent > 0 || waiting * 100 > due {
            // A connection that is not open is not free either: say so, or a dead or
            // full listener reads as a slow server.
            let connects = match s.errors.connect {
                0 => String::new(),
                n => format!(" ({n} connects failed or timed out)"),
            };
            w.push(format!(
                "the server could not keep up with --rate {rate}: {} requests were \
                 sent late and {} never sent, waiting for one of {} connections x depth \
                 {} to be free{connects}; achieved {:.0} requests/s",
                waiting,
                s.unsent,
                self.connections,
                self.depth,
                self.requests_per_sec()
            ));
        }
        w
    }

    /// The wrk-like report.
    pub fn text(&self, percentiles: bool) -> String {
        let mut o = String::new();
        let secs = self.duration.as_secs_f64();
        let _ = writeln!(
            o,
            "Running {} test @ {}",
            human_duration(self.duration),
            self.url
        );
        let what = match self.size {
            Some(size) => format!("{size}-byte echo requests, every byte verified"),
            None => {
                let (method, version) = match &self.request {
                    Some((m, v)) => (m.as_str(), *v),
                    None => ("GET", "HTTP/1.1"),
                };
                if self.reconnect {
                    format!("{version} {method}")
                } else {
                    format!("{version} {method}, keep-alive")
                }
            }
        };
        let what = if self.reconnect {
            format!("{what}, a new connection per request")
        } else {
            what
        };
        let _ = writeln!(
            o,
            "  {} threads and {} connections, depth {}, {what}",
            self.threads, self.connections, self.depth
        );
        if let Some(plan) = &self.rate {
            let what = match plan {
                RatePlan::Constant(r) => format!("constant rate {r:.0} requests/s"),
                RatePlan::Ramp { from, to } => format!(
                    "rate ramping from {from:.0} to {to:.0} requests/s over {}",
                    human_duration(self.duration)
                ),
                RatePlan::Steps { rates, step } => {
                    let list: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
                    format!(
                        "rate in steps of {}: {} requests/s",
                        human_duration(*step),
                        list.join(", ")
                    )
                }
            };
            let _ = writeln!(o, "  {what}; latency measured from each request's due time");
        }
        let _ = writeln!(o, "  Latency      Avg       Stdev     Max       +/- Stdev");
        let open = self.rate.is_some();
        let row = |o: &mut String, label: &str, h: &Histogram<u64>| {
            let _ = writeln!(
                o,
                "  {label:<13}{:<9} {:<9} {:<9} {:.2}%",
                human_us(h.mean()),
                human_us(h.stdev()),
                human_us(h.max() as f64),
                within_stdev(h)
            );
        };
        if open {
            row(&mut o, "  from due", &self.stats.latency);
            row(&mut o, "  from send", &self.stats.service);
        } else {
            row(&mut o, "", &self.stats.latency);
        }
        if percentiles {
            if open {
                let _ = writeln!(o, "  Latency Distribution  from due  from send");
            } else {
                let _ = writeln!(o, "  Latency Distribution");
            }
            for p in PERCENTILES {
                let _ = write!(
                    o,
                    "  {:>8}%  {}",
                    format_pct(p),
                    if open {
                        format!("{:>18}", human_us(self.percentile_us(p) as f64))
                    } else {
                        human_us(self.percentile_us(p) as f64)
                    }
                );
                if open {
                    let _ = write!(
                        o,
                        "  {:>9}",
                        human_us(self.stats.service.value_at_percentile(p) as f64)
                    );
                }
                o.push('\n');
            }
        }
        let _ = writeln!(
            o,
            "  {} requests in {:.2}s, {} read, {} written",
            self.stats.requests,
            secs,
            human_bytes(self.stats.bytes_read as f64),
            human_bytes(self.stats.bytes_written as f64)
        );
        let st = &self.stats;
        let due = if open {
            format!("{} due, {} sent: ", st.due, st.sent)
        } else {
            format!("{} sent: ", st.sent)
        };
        let _ = write!(
            o,
            "  Requests: {due}{} answered, {} timed out, {} failed, {} outstanding at the end",
            st.requests, st.timed_out, st.failed, st.outstanding
        );
        if open {
            let _ = write!(
                o,
                ", {} never sent; {} sent late (over 1 ms after due); {} noticed late by edgeload",
                st.unsent, st.sent_late, st.late_by_generator
            );
        }
        o.push('\n');
        let e = &self.stats.errors;
        let _ = writeln!(
            o,
            "  Errors: connect {}, read {}, write {}, timeout {}, mismatch {}, extra {}, non-2xx {}",
            e.connect, e.read, e.write, e.timeout, e.mismatch, e.extra, e.non_2xx
        );
        if self.protocol == "http" {
            let s = &self.stats.status;
            let _ = writeln!(
                o,
                "  Status: 1xx {}, 2xx {}, 3xx {}, 4xx {}, 5xx {}, other {}",
                s[1], s[2], s[3], s[4], s[5], s[0]
            );
            if percentiles {
                let mut line = String::from("  Status codes:");
                for (code, n) in self.stats.codes.seen() {
                    let _ = write!(line, " {code}: {} ", thousands(n));
                }
                if s[0] > 0 {
                    let _ = write!(line, " other: {} ", thousands(s[0]));
                }
                let _ = writeln!(o, "{}", line.trim_end());
            }
        }
        if !self.stats.steps.is_empty() {
            steps_text(&mut o, &self.stats.steps);
        }
        let _ = writeln!(o, "Requests/sec: {:>10.2}", self.requests_per_sec());
        let _ = writeln!(
            o,
            "Transfer/sec: {:>10}",
            human_bytes(self.stats.bytes_read as f64 / secs.max(1e-9))
        );
        for w in self.warnings() {
            let _ = writeln!(o, "Warning: {w}");
        }
        o
    }

    /// Everything as one JSON object.
    pub fn json(&self) -> serde_json::Value {
        let secs = self.duration.as_secs_f64().max(1e-9);
        let e = &self.stats.errors;
        let s = &self.stats.status;
        let mut codes = serde_json::Map::new();
        for (code, n) in self.stats.codes.seen() {
            codes.insert(code.to_string(), json!(n));
        }
        if s[0] > 0 {
            codes.insert("other".into(), json!(s[0]));
        }
        let st = &self.stats;
        let open = self.rate.is_some();
        json!({
            "url": self.url,
            "protocol": self.protocol,
            "threads": self.threads,
            "connections": self.connections,
            "depth": self.depth,
            "size": self.size,
            "rate": self.rate.as_ref().map(|p| p.mean_rate(self.duration)),
            "rate_plan": self.rate.as_ref().map(plan_json),
            "steps": (!st.steps.is_empty()).then(|| {
                self.stats.steps.iter().enumerate().map(|(i, s)| s.json(i)).collect::<Vec<_>>()
            }),
            "reconnect": self.reconnect,
            "method": self.request.as_ref().map(|(m, _)| m),
            "http_version": self.request.as_ref().map(|(_, v)| v),
            "duration_s": self.duration.as_secs_f64(),
            "nonce": format!("{:016x}", self.nonce),
            "requests": self.stats.requests,
            "requests_per_sec": self.requests_per_sec(),
            "requests_due": open.then_some(st.due),
            "requests_sent": st.sent,
            "answered_bad": st.bad_answered,
            "timed_out": st.timed_out,
            "failed": st.failed,
            "outstanding": st.outstanding,
            "unsent": open.then_some(st.unsent),
            "sent_late": open.then_some(st.sent_late),
            "late_by_generator": open.then_some(st.late_by_generator),
            "warnings": self.warnings(),
            "bytes_read": self.stats.bytes_read,
            "bytes_written": self.stats.bytes_written,
            "bytes_read_per_sec": self.stats.bytes_read as f64 / secs,
            "errors": errors_json(e),
            "status": {"1xx": s[1], "2xx": s[2], "3xx": s[3], "4xx": s[4], "5xx": s[5], "other": s[0]},
            "status_codes": codes,
            "gates": self.gates.iter().map(GateResult::json).collect::<Vec<_>>(),
            "latency_us": histogram_json(&self.stats.latency),
            "service_time_us": histogram_json(self.service()),
        })
    }
}

/// The plan as JSON: `{"kind": "ramp", "from": 1000, "to": 20000}`.
fn plan_json(plan: &RatePlan) -> serde_json::Value {
    match plan {
        RatePlan::Constant(r) => json!({"kind": "constant", "rate": r}),
        RatePlan::Ramp { from, to } => json!({"kind": "ramp", "from": from, "to": to}),
        RatePlan::Steps { rates, step } => {
            json!({"kind": "steps", "rates": rates, "step_s": step.as_secs_f64()})
        }
    }
}

/// One line per step: where the server's knee is.
fn steps_text(o: &mut String, steps: &[StepStats]) {
    let _ = writeln!(
        o,
        "  Steps (requests counted in the step they fell due in; latency from due time)"
    );
    let _ = writeln!(
        o,
        "    step  target/s  achieved/s  p50       p99       p99.9     errors  due      answered  unsent"
    );
    for (i, s) in steps.iter().enumerate() {
        let h = &s.latency;
        let _ = writeln!(
            o,
            "    {:<5} {:<9.0} {:<11.1} {:<9} {:<9} {:<9} {:<7} {:<8} {:<9} {}",
            i + 1,
            s.rate,
            s.requests_per_sec(),
            human_us(h.value_at_percentile(50.0) as f64),
            human_us(h.value_at_percentile(99.0) as f64),
            human_us(h.value_at_percentile(99.9) as f64),
            s.errors.total(),
            s.due,
            s.answered,
            s.unsent
        );
    }
}

/// Responses by exact status code, 100 to 599. A fixed array, so counting one is an
/// index and an add on the hot path, and merging threads is adding arrays; boxed, so
/// that moving `Stats` stays cheap.
#[derive(Clone, PartialEq, Eq)]
pub struct StatusCodes(Box<[u64; 500]>);

impl StatusCodes {
    pub fn new() -> StatusCodes {
        StatusCodes(Box::new([0; 500]))
    }

    /// Counts one response; a code outside 100-599 is not counted here.
    #[inline]
    pub fn count(&mut self, status: u16) {
        if let Some(n) = self.0.get_mut(usize::from(status).wrapping_sub(100)) {
            *n += 1;
        }
    }

    /// Responses with this code.
    pub fn get(&self, status: u16) -> u64 {
        self.0
            .get(usize::from(status).wrapping_sub(100))
            .copied()
            .unwrap_or(0)
    }

    pub fn add(&mut self, other: &StatusCodes) {
        for (a, b) in self.0.iter_mut().zip(other.0.iter()) {
            *a += b;
        }
    }

    /// The codes seen, in order, with their counts.
    pub fn seen(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        (100u16..)
            .zip(self.0.iter().copied())
            .filter(|&(_, n)| n > 0)
    }
}

impl Default for StatusCodes {
    fn default() -> Self {
        StatusCodes::new()
    }
}

impl std::fmt::Debug for StatusCodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.seen()).finish()
    }
}

/// `9812` as `9,812`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Share of samples within one standard deviation of the mean, as wrk prints it.
fn within_stdev(h: &Histogram<u64>) -> f64 {
    let (mean, sd) = (h.mean(), h.stdev());
    let total = h.len();
    if total == 0 {
        return 0.0;
    }
    let inside: u64 = h
        .iter_recorded()
        .filter(|v| (v.value_iterated_to() as f64 - mean).abs() <= sd)
        .map(|v| v.count_at_value())
        .sum();
    100.0 * inside as f64 / total as f64
}

fn histogram_json(h: &Histogram<u64>) -> serde_json::Value {
    let mut pct = serde_json::Map::new();
    for p in PERCENTILES {
        pct.insert(
            format!("p{}", format_pct(p)),
            json!(h.value_at_percentile(p)),
        );
    }
    json!({
        "count": h.len(),
        "min": h.min(),
        "mean": h.mean(),
        "stdev": h.stdev(),
        "max": h.max(),
        "percentiles": pct,
    })
}

/// `50`, `99.9`, `99.99`: no trailing zeros.
fn format_pct(p: f64) -> String {
    let s = format!("{p:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Microseconds as wrk prints them: `631.41us`, `5.51ms`, `1.20s`.
pub fn human_us(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.2}us")
    } else if us < 1_000_000.0 {
        format!("{:.2}ms", us / 1000.0)
    } else {
        format!("{:.2}s", us / 1_000_000.0)
    }
}

/// Bytes in binary units: `83.36MB` as wrk writes MiB.
pub fn human_bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = b;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.2}{}", UNITS[u])
}

fn human_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 1.0 && (s - s.round()).abs() < 0.05 {
        format!("{}s", s.round())
    } else {
        format!("{:.0}ms", s * 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(human_us(631.414), "631.41us");
        assert_eq!(human_us(5510.0), "5.51ms");
        assert_eq!(human_us(1_200_000.0), "1.20s");
        assert_eq!(human_bytes(87_408_000.0), "83.36MB");
        assert_eq!(format_pct(99.99), "99.99");
        assert_eq!(format_pct(50.0), "50");
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(9812), "9,812");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn status_codes_count_100_to_599_only() {
        let mut c = StatusCodes::new();
        for s in [200, 200, 404, 100, 599, 99, 600, 0, 999] {
            c.count(s);
        }
        let mut d = StatusCodes::new();
        d.count(404);
        c.add(&d);
        assert_eq!(
            c.seen().collect::<Vec<_>>(),
            vec![(100, 1), (200, 2), (404, 2), (599, 1)]
        );
        assert_eq!(c.get(404), 2);
        assert_eq!(c.get(600), 0);
        assert_eq!(format!("{c:?}"), "{100: 1, 200: 2, 404: 2, 599: 1}");
    }
}
