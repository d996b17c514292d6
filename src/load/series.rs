//! Figures over the run: per step of a `--rate` plan, and per second.
//!
//! - A step's figures count the requests that fell due in it (its latencies, its
//!   accounting), so a step that overloads the server is charged for what it caused
//!   even when the answers come later; its errors are those that happened during it.
//! - A second's figures count what happened in it: requests answered, errors, and the
//!   latencies recorded. Each thread keeps one histogram for its current second and
//!   hands it over at the boundary ([`Interval`]); the main thread merges the threads'
//!   intervals of the same second, writes the line (`--timeseries`, `--hdr-log`) and
//!   keeps only a few numbers of it ([`Second`]), so memory does not grow with a
//!   histogram per second.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::Sender;

use hdrhistogram::serialization::interval_log::IntervalLogWriterBuilder;
use hdrhistogram::serialization::V2DeflateSerializer;
use hdrhistogram::Histogram;
use serde_json::json;

use super::engine::{histogram, Errors, Stats};

/// What the requests that fell due in one step of a `--rate` plan did.
#[derive(Debug, Clone)]
pub struct StepStats {
    /// The step's target, requests per second in total.
    pub rate: f64,
    pub duration: Duration,
    pub due: u64,
    pub sent: u64,
    pub answered: u64,
    pub timed_out: u64,
    pub failed: u64,
    pub outstanding: u64,
    pub unsent: u64,
    /// Errors that happened while this step was the current one.
    pub errors: Errors,
    /// From the due time: answered, timed-out and outstanding requests of this step.
    pub latency: Histogram<u64>,
}

impl StepStats {
    pub fn new(rate: f64, duration: Duration) -> StepStats {
        StepStats {
            rate,
            duration,
            due: 0,
            sent: 0,
            answered: 0,
            timed_out: 0,
            failed: 0,
            outstanding: 0,
            unsent: 0,
            errors: Errors::default(),
            latency: histogram(),
        }
    }

    /// Adds another thread's figures for the same step (rates are each thread's share).
    pub fn add(&mut self, o: &StepStats) {
        self.rate += o.rate;
        self.due += o.due;
        self.sent += o.sent;
        self.answered += o.answered;
        self.timed_out += o.timed_out;
        self.failed += o.failed;
        self.outstanding += o.outstanding;
        self.unsent += o.unsent;
        self.errors.add(&o.errors);
        // Same bounds, so adding cannot fail.
        let _ = self.latency.add(&o.latency);
    }

    pub fn requests_per_sec(&self) -> f64 {
        self.answered as f64 / self.duration.as_secs_f64().max(1e-9)
    }

    pub fn json(&self, index: usize) -> serde_json::Value {
        let h = &self.latency;
        json!({
            "step": index + 1,
            "start_s": self.duration.as_secs_f64() * index as f64,
            "duration_s": self.duration.as_secs_f64(),
            "target_rate": self.rate,
            "requests_per_sec": self.requests_per_sec(),
            "latency_us": {
                "count": h.len(),
                "p50": h.value_at_percentile(50.0),
                "p99": h.value_at_percentile(99.0),
                "p99.9": h.value_at_percentile(99.9),
                "max": h.max(),
            },
            "errors": errors_json(&self.errors),
            "due": self.due,
            "sent": self.sent,
            "answered": self.answered,
            "timed_out": self.timed_out,
            "failed": self.failed,
            "outstanding": self.outstanding,
            "unsent": self.unsent,
        })
    }
}

pub fn errors_json(e: &Errors) -> serde_json::Value {
    json!({
        "connect": e.connect, "read": e.read, "write": e.write,
        "timeout": e.timeout, "mismatch": e.mismatch, "extra": e.extra,
        "non_2xx": e.non_2xx,
        "total": e.total(),
    })
}

/// One thread's second, handed to the main thread at the second's end.
#[derive(Debug)]
pub struct Interval {
    /// 0 for the run's first second.
    pub second: u32,
    /// Requests answered in it.
    pub requests: u64,
    /// Open loop: requests that fell due in it.
    pub due: u64,
    pub errors: Errors,
    /// Latencies recorded in it (from the due time, open loop).
    pub latency: Histogram<u64>,
}

/// One thread's current second: its latency histogram and where its counters stood
/// when it began, so a second's counts are differences and add up to the totals.
///
/// A request's latency is recorded here only: at each hand-over the second is added to
/// the thread's total (`Stats::latency`), so the per-second figures cost a histogram
/// addition once a second, not a second record per request.
pub struct SecondClock {
    index: u32,
    /// The index of the run's last second (a partial one counts).
    last: u32,
    ends: Instant,
    /// Latencies recorded in this second.
    latency: Histogram<u64>,
    at_start: (u64, u64, Errors),
    to_main: Sender<Interval>,
}

impl SecondClock {
    pub fn new(start: Instant, duration: Duration, to_main: Sender<Interval>) -> SecondClock {
        let seconds = duration.as_secs_f64().ceil().max(1.0) as u32;
        SecondClock {
            index: 0,
            last: seconds - 1,
            ends: start + Duration::from_secs(1),
            latency: histogram(),
            at_start: (0, 0, Errors::default()),
            to_main,
        }
    }

    /// Records a latency in this second (and so, at the hand-over, in the total).
    #[inline]
    pub fn record(&mut self, us: u64) {
        self.latency.saturating_record(us);
    }

    /// Hands over every second that ended by `now`; a second with nothing in it is
    /// handed over too, so a stall shows as zeros. The last second is handed over by
    /// [`SecondClock::finish`], with what the end of the run records.
    #[inline]
    pub fn tick(&mut self, now: Instant, stats: &mut Stats) {
        while now >= self.ends && self.index < self.last {
            self.hand_over(stats);
            self.ends += Duration::from_secs(1);
        }
    }

    /// The end of the run: hands over the current second and any left.
    pub fn finish(&mut self, stats: &mut Stats) {
        loop {
            let done = self.index >= self.last;
            self.hand_over(stats);
            if done {
                return;
            }
        }
    }

    fn hand_over(&mut self, stats: &mut Stats) {
        // Same bounds, so adding cannot fail.
        let _ = stats.latency.add(&self.latency);
        let (requests, due, errors) = &self.at_start;
        let interval = Interval {
            second: self.index,
            requests: stats.requests - requests,
            due: stats.due - due,
            errors: stats.errors.since(errors),
            latency: std::mem::replace(&mut self.latency, histogram()),
        };
        // The main thread outlives the load threads; if it is gone there is no one to
        // tell.
        let _ = self.to_main.send(interval);
        self.at_start = (stats.requests, stats.due, stats.errors);
        self.index += 1;
    }
}

/// One thread's current step of a `--rate` plan, by the clock: a step's errors are
/// the ones counted while it was current.
pub struct StepClock {
    current: usize,
    ends: Instant,
    length: Duration,
    errors_at_start: Errors,
}

impl StepClock {
    pub fn new(start: Instant, length: Duration) -> StepClock {
        StepClock {
            current: 0,
            ends: start + length,
            length,
            errors_at_start: Errors::default(),
        }
    }

    #[inline]
    pub fn tick(&mut self, now: Instant, stats: &mut Stats) {
        while now >= self.ends && self.current + 1 < stats.steps.len() {
            self.close(stats);
            self.current += 1;
            self.ends += self.length;
        }
    }

    /// The end of the run: the current step gets the errors since it began.
    pub fn finish(&mut self, stats: &mut Stats) {
        self.close(stats);
    }

    fn close(&mut self, stats: &mut Stats) {
        let errors = stats.errors.since(&self.errors_at_start);
        if let Some(step) = stats.steps.get_mut(self.current) {
            step.errors = errors;
        }
        self.errors_at_start = stats.errors;
    }
}

/// One second of the whole run, as the timeseries line and the plot use it.
#[derive(Debug, Clone, PartialEq)]
pub struct Second {
    /// Seconds from the start to the end of this one (the last may be shorter).
    pub elapsed_s: f64,
    pub length_s: f64,
    pub requests: u64,
    pub due: Option<u64>,
    pub errors: Errors,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    /// Latencies recorded in this second (answered, timed out, outstanding at the end).
    pub latency_count: u64,
}

impl Second {
    pub fn requests_per_sec(&self) -> f64 {
        self.requests as f64 / self.length_s.max(1e-9)
    }
}

/// Where the merged seconds go.
enum Lines {
    Csv(BufWriter<File>),
    Json(BufWriter<File>),
}

/// `--hdr-log`: the HdrHistogram interval log, one interval histogram per second.
struct HdrLog {
    out: BufWriter<File>,
    serializer: V2DeflateSerializer,
}

/// Merges the threads' intervals second by second and writes them out.
pub struct Recorder {
    threads: usize,
    duration: Duration,
    open_loop: bool,
    /// Seconds some threads have handed over, waiting for the rest.
    waiting: BTreeMap<u32, (usize, Interval)>,
    lines: Option<(Lines, PathBuf)>,
    hdr: Option<(HdrLog, PathBuf)>,
    /// Every second so far, in order.
    pub seconds: Vec<Second>,
    /// The first write error, reported when the run ends.
    failed: Option<String>,
}

fn create(path: &Path, flag: &str) -> Result<BufWriter<File>, String> {
    File::create(path)
        .map(BufWriter::new)
        .map_err(|e| format!("{flag} {}: {e}", path.display()))
}

impl Recorder {
    /// Creates the files asked for (an error names the flag and the file).
    pub fn new(
        threads: usize,
        duration: Duration,
        open_loop: bool,
        timeseries: Option<&Path>,
        hdr_log: Option<&Path>,
        started: SystemTime,
    ) -> Result<Recorder, String> {
        let lines = match timeseries {
            Some(path) => {
                let mut out = create(path, "--timeseries")?;
                let csv = path
                    .extension()
                    .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
                let lines = if csv {
                    writeln!(
                        out,
                        "elapsed_s,requests,due,errors_connect,errors_read,errors_write,\
                         errors_timeout,errors_mismatch,errors_extra,errors_non_2xx,\
                         p50_us,p99_us,p99_9_us,max_us"
                    )
                    .map_err(|e| format!("--timeseries {}: {e}", path.display()))?;
                    Lines::Csv(out)
                } else {
                    Lines::Json(out)
                };
                Some((lines, path.to_path_buf()))
            }
            None => None,
        };
        let hdr = match hdr_log {
            Some(path) => {
                let mut out = create(path, "--hdr-log")?;
                let mut serializer = V2DeflateSerializer::new();
                IntervalLogWriterBuilder::new()
                    .add_comment("[Logged with edgeload]")
                    .add_comment("[Histogram log format version 1.3]")
                    .add_comment(
                        "[Values and Interval_Max in microseconds; from the due time under --rate]",
                    )
                    .with_start_time(started)
                    .with_base_time(started)
                    .begin_log_with(&mut out, &mut serializer)
                    .map(drop)
                    .and_then(|()| {
                        writeln!(
                            out,
                            "\"StartTimestamp\",\"Interval_Length\",\"Interval_Max\",\
                             \"Interval_Compressed_Histogram\""
                        )
                    })
                    .map_err(|e| format!("--hdr-log {}: {e}", path.display()))?;
                Some((HdrLog { out, serializer }, path.to_path_buf()))
            }
            None => None,
        };
        Ok(Recorder {
            threads,
            duration,
            open_loop,
            waiting: BTreeMap::new(),
            lines,
            hdr,
            seconds: Vec::new(),
            failed: None,
        })
    }

    /// Takes one thread's interval; writes every second all threads have handed over.
    pub fn take(&mut self, interval: Interval) {
        match self.waiting.get_mut(&interval.second) {
            Some((n, merged)) => {
                *n += 1;
                merged.requests += interval.requests;
                merged.due += interval.due;
                merged.errors.add(&interval.errors);
                let _ = merged.latency.add(&interval.latency);
            }
            None => {
                self.waiting.insert(interval.second, (1, interval));
            }
        }
        // A thread hands its seconds over in order, so when every thread has handed
        // over a second, every earlier one is complete too.
        while let Some(entry) = self.waiting.first_entry() {
            if entry.get().0 < self.threads {
                break;
            }
            let (_, interval) = entry.remove();
            self.write(interval);
        }
    }

    fn write(&mut self, i: Interval) {
        let begin = Duration::from_secs(u64::from(i.second));
        let end = (begin + Duration::from_secs(1)).min(self.duration.max(begin));
        let h = &i.latency;
        let second = Second {
            elapsed_s: end.as_secs_f64(),
            length_s: (end - begin).as_secs_f64(),
            requests: i.requests,
            due: self.open_loop.then_some(i.due),
            errors: i.errors,
            p50_us: h.value_at_percentile(50.0),
            p99_us: h.value_at_percentile(99.0),
            p999_us: h.value_at_percentile(99.9),
            max_us: h.max(),
            latency_count: h.len(),
        };
        if let Some((lines, path)) = &mut self.lines {
            // Out to the file once a second, so the lines are there as the run goes
            // (for `tail -f`, or a run cut short), not only at its end.
            let written = write_line(lines, &second).and_then(|()| match lines {
                Lines::Csv(out) | Lines::Json(out) => out.flush(),
            });
            if let Err(e) = written {
                let e = format!("--timeseries {}: {e}", path.display());
                self.failed.get_or_insert(e);
            }
        }
        if let Some((log, path)) = &mut self.hdr {
            // A builder with no headers writes nothing: this only borrows the file and the
            // serializer for one interval.
            let written = IntervalLogWriterBuilder::new()
                .begin_log_with(&mut log.out, &mut log.serializer)
                .and_then(|mut w| {
                    w.write_histogram(h, begin, end - begin, None)
                        .map_err(|e| io::Error::other(format!("{e:?}")))
                })
                .and_then(|_| log.out.flush());
            if let Err(e) = written {
                let e = format!("--hdr-log {}: {e}", path.display());
                self.failed.get_or_insert(e);
            }
        }
        self.seconds.push(second);
    }

    /// Flushes the files: every second, and the first error while writing them, naming
    /// the file (the run's figures stand without the file).
    pub fn finish(mut self) -> (Vec<Second>, Option<String>) {
        // Threads that ended early (an error) left seconds incomplete: write them too.
        let rest: Vec<u32> = self.waiting.keys().copied().collect();
        for s in rest {
            if let Some((_, i)) = self.waiting.remove(&s) {
                self.write(i);
            }
        }
        let mut result = match self.failed.take() {
            Some(e) => Err(e),
            None => Ok(()),
        };
        if let Some((lines, path)) = &mut self.lines {
            let out = match lines {
                Lines::Csv(o) | Lines::Json(o) => o,
            };
            if let Err(e) = out.flush() {
                result = result.and(Err(format!("--timeseries {}: {e}", path.display())));
            }
        }
        if let Some((log, path)) = &mut self.hdr {
            if let Err(e) = log.out.flush() {
                result = result.and(Err(format!("--hdr-log {}: {e}", path.display())));
            }
        }
        (self.seconds, result.err())
    }
}

fn write_line(lines: &mut Lines, s: &Second) -> io::Result<()> {
    let e = &s.errors;
    match lines {
        Lines::Csv(out) => writeln!(
            out,
            "{:.3},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            s.elapsed_s,
            s.requests,
            s.due.map(|d| d.to_string()).unwrap_or_default(),
            e.connect,
            e.read,
            e.write,
            e.timeout,
            e.mismatch,
            e.extra,
            e.non_2xx,
            s.p50_us,
            s.p99_us,
            s.p999_us,
            s.max_us
        ),
        Lines::Json(out) => {
            let line = json!({
                "elapsed_s": (s.elapsed_s * 1000.0).round() / 1000.0,
                "requests": s.requests,
                "due": s.due,
                "errors": errors_json(e),
                "latency_us": {
                    "p50": s.p50_us, "p99": s.p99_us, "p99.9": s.p999_us, "max": s.max_us,
                },
            });
            writeln!(out, "{line}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interval(second: u32, requests: u64, latencies: &[u64]) -> Interval {
        let mut latency = histogram();
        for &l in latencies {
            latency.record(l).unwrap();
        }
        Interval {
            second,
            requests,
            due: requests,
            errors: Errors::default(),
            latency,
        }
    }

    #[test]
    fn a_second_is_written_once_every_thread_has_handed_it_over() {
        let mut r = Recorder::new(
            2,
            Duration::from_millis(2500),
            true,
            None,
            None,
            SystemTime::now(),
        )
        .unwrap();
        r.take(interval(0, 3, &[100, 100, 100]));
        r.take(interval(1, 0, &[]));
        assert!(r.seconds.is_empty());
        r.take(interval(0, 1, &[900]));
        assert_eq!(r.seconds.len(), 1);
        r.take(interval(1, 0, &[]));
        r.take(interval(2, 5, &[50; 5]));
        r.take(interval(2, 0, &[]));
        let (s, write_error) = r.finish();
        assert_eq!(write_error, None);
        assert_eq!(s.len(), 3);
        assert_eq!(
            (s[0].requests, s[0].p50_us, s[0].max_us, s[0].elapsed_s),
            (4, 100, 900, 1.0)
        );
        // A second with nothing answered is a line of zeros.
        assert_eq!((s[1].requests, s[1].p99_us, s[1].max_us), (0, 0, 0));
        // The last second is the half that was left.
        assert_eq!((s[2].elapsed_s, s[2].length_s), (2.5, 0.5));
        assert_eq!(s[2].requests_per_sec(), 10.0);
    }
}
