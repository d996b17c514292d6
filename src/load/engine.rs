//! One edgeload thread: its own epoll instance, its share of the connections, its own
//! statistics. Sockets are registered once, edge-triggered, like the server's.
//!
//! Closed loop: each connection keeps `depth` requests in flight and sends the next as
//! soon as one completes. Open loop (`--rate`): the thread's requests fall due on a
//! fixed schedule, round-robin over its connections; a connection sends a due request
//! as soon as it has fewer than `depth` in flight, and the latency of every request is
//! measured from the moment it was due, so a stall delays and is charged to every
//! request behind it (no coordinated omission); the service time, from the moment it
//! was sent, is kept beside it.
//!
//! Every request ends in exactly one of: answered, timed out (recorded with what it
//! waited, at least the timeout), failed (its connection ended under it), outstanding at
//! the end (recorded with the end minus its due time) or, open loop only, never sent.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crossbeam_channel::Sender;

use super::http::ResponseParser;
use super::pattern::Pattern;
use super::plan::{RatePlan, Schedule};
use super::report::StatusCodes;
use super::series::{Interval, SecondClock, StepClock, StepStats};
use super::{LoadConfig, Progress, Target};
use crate::sys::epoll::{Epoll, Events, SOCKET_INTEREST};
use crate::sys::socket;

/// How often timeouts and pending reconnects are checked.
const SWEEP: Duration = Duration::from_millis(20);
/// Wait before reconnecting after a failed connect, so a dead server is not hammered.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(10);
/// Read buffer per thread.
const READ_BUFFER: usize = 64 * 1024;
/// Highest latency recorded, in microseconds (one hour); longer ones saturate.
pub const MAX_LATENCY_US: u64 = 3_600_000_000;
/// A request sent more than this after its due time was sent late.
pub const LATE: Duration = Duration::from_millis(1);

/// Errors by kind, as wrk reports them, plus verification mismatches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Errors {
    pub connect: u64,
    pub read: u64,
    pub write: u64,
    pub timeout: u64,
    /// Echo requests whose bytes came back different, once per request.
    pub mismatch: u64,
    /// Connections dropped because the server sent more than was asked for: echo bytes
    /// beyond everything sent, an HTTP response to no request.
    pub extra: u64,
    /// HTTP responses with a status outside 200-299.
    pub non_2xx: u64,
}

impl Errors {
    pub fn total(&self) -> u64 {
        self.connect
            + self.read
            + self.write
            + self.timeout
            + self.mismatch
            + self.extra
            + self.non_2xx
    }

    pub fn add(&mut self, o: &Errors) {
        self.connect += o.connect;
        self.read += o.read;
        self.write += o.write;
        self.timeout += o.timeout;
        self.mismatch += o.mismatch;
        self.extra += o.extra;
        self.non_2xx += o.non_2xx;
    }

    /// What was counted since `earlier`, a copy of these counters taken before.
    pub fn since(&self, earlier: &Errors) -> Errors {
        Errors {
            connect: self.connect - earlier.connect,
            read: self.read - earlier.read,
            write: self.write - earlier.write,
            timeout: self.timeout - earlier.timeout,
            mismatch: self.mismatch - earlier.mismatch,
            extra: self.extra - earlier.extra,
            non_2xx: self.non_2xx - earlier.non_2xx,
        }
    }
}

/// What one thread measured, or (in a `Report`) all threads together.
///
/// The request accounting adds up: `sent = requests + timed_out + failed + outstanding`
/// and, open loop, `due = sent + unsent`.
#[derive(Debug, Clone)]
pub struct Stats {
    /// Requests answered (a whole response).
    pub requests: u64,
    /// Of those, the ones answered badly: echo bytes that differed, an HTTP status
    /// outside 200-299.
    pub bad_answered: u64,
    /// Requests written or queued to a connection.
    pub sent: u64,
    /// Open loop: requests that fell due in the run.
    pub due: u64,
    /// Requests given up at `--timeout`: the one that timed out and any pipelined
    /// behind it on the same connection.
    pub timed_out: u64,
    /// Requests whose connection ended under them (an error, a reset, a close by the
    /// server, a response that failed verification or parsing).
    pub failed: u64,
    /// Requests still unanswered when the run ended.
    pub outstanding: u64,
    /// Open loop: requests due and never sent (no connection was free for them).
    pub unsent: u64,
    /// Open loop: requests sent more than [`LATE`] after their due time.
    pub sent_late: u64,
    /// Open loop: requests the generator itself noticed more than [`LATE`] after they
    /// fell due (its thread was busy): late whatever the server did, sent or not.
    pub late_by_generator: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub errors: Errors,
    /// Responses by status class: index 1 for 1xx ... 5 for 5xx, 0 for anything else.
    pub status: [u64; 6],
    /// Responses by exact status code, 100 to 599 (the rest are `status[0]`).
    pub codes: StatusCodes,
    /// Latency in microseconds, from each request's due time (closed loop: from when it
    /// was sent): answered, timed-out and outstanding requests. A thread records each
    /// in its current second's histogram and adds that here as the second ends.
    pub latency: Histogram<u64>,
    /// Service time in microseconds, from when each request was sent; the same requests.
    pub service: Histogram<u64>,
    /// A `--rate` plan with steps: each step's figures (their sums are the totals).
    pub steps: Vec<StepStats>,
}

/// An empty latency histogram with edgeload's bounds.
pub fn histogram() -> Histogram<u64> {
    // 1 µs to 1 h at 3 significant digits, as wrk2 does.
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
        .expect("the bounds are constants that hdrhistogram accepts")
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            requests: 0,
            bad_answered: 0,
            sent: 0,
            due: 0,
            timed_out: 0,
            failed: 0,
            outstanding: 0,
            unsent: 0,
            sent_late: 0,
            late_by_generator: 0,
            bytes_read: 0,
            bytes_written: 0,
            errors: Errors::default(),
            status: [0; 6],
            codes: StatusCodes::new(),
            latency: histogram(),
            service: histogram(),
            steps: Vec::new(),
        }
    }
}

impl Stats {
    /// Adds another thread's figures to these.
    pub fn add(&mut self, other: &Stats) {
        self.requests += other.requests;
        self.bad_answered += other.bad_answered;
        self.sent += other.sent;
        self.due += other.due;
        self.timed_out += other.timed_out;
        self.failed += other.failed;
        self.outstanding += other.outstanding;
        self.unsent += other.unsent;
        self.sent_late += other.sent_late;
        self.late_by_generator += other.late_by_generator;
        self.bytes_read += other.bytes_read;
        self.bytes_written += other.bytes_written;
        self.errors.add(&other.errors);
        for (a, b) in self.status.iter_mut().zip(other.status) {
            *a += b;
        }
        self.codes.add(&other.codes);
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
        let _ = self.service.add(&other.service);
        if self.steps.is_empty() {
            self.steps = other.steps.clone();
        } else {
            for (a, b) in self.steps.iter_mut().zip(&other.steps) {
                a.add(b);
            }
        }
    }

    /// The figures of `step`, when the plan has steps.
    #[inline]
    fn step(&mut self, step: u32) -> Option<&mut StepStats> {
        self.steps.get_mut(step as usize)
    }
}

impl Default for Stats {
    fn default() -> Self {
        Stats::new()
    }
}

/// One live connection.
struct Conn {
    fd: OwnedFd,
    connected: bool,
    started: Instant,
    /// Identifies this connection's echo stream.
    seed: u64,
    /// Echo: stream bytes queued so far (the offset of the next request).
    sent: u64,
    /// Echo: stream bytes verified so far.
    verified: u64,
    /// Echo: the request already counted as mismatched, so it counts once.
    bad_request: Option<u64>,
    /// Bytes not yet written.
    out: Vec<u8>,
    out_pos: usize,
    /// Requests in flight, oldest first.
    in_flight: VecDeque<Pending>,
    /// HTTP: parser state and unparsed input.
    parser: ResponseParser,
    inbuf: Vec<u8>,
}

/// A request sent and not yet answered.
#[derive(Debug, Clone, Copy)]
struct Pending {
    /// When it fell due; closed loop, when it was sent.
    due: Instant,
    sent: Instant,
    /// The step of the `--rate` plan it fell due in (0 without steps).
    step: u32,
}

/// When request `k` of the thread's schedule falls due, and its step; None past any
/// time an Instant holds (never within a run that validation allows).
fn due_at(schedule: Option<&Schedule>, start: Instant, k: u64) -> Option<(Instant, u32)> {
    let (secs, step) = schedule?.due(k);
    let at = start.checked_add(Duration::try_from_secs_f64(secs).ok()?)?;
    Some((at, step))
}

/// A connection position: the live connection, if any, and what survives reconnects.
struct Slot {
    generation: u32,
    conn: Option<Conn>,
    /// Open loop: requests due and not yet sent, `due_count` of them from request
    /// `due_first` of the thread's schedule on, every `conns`-th (the slots take them
    /// round-robin). Two numbers, not a queue of times: a server that never answers
    /// costs no memory however many requests fall due.
    due_first: u64,
    due_count: u64,
    /// Reconnect no earlier than this.
    retry_at: Option<Instant>,
}

struct Engine<'a> {
    id: usize,
    config: &'a LoadConfig,
    epoll: Epoll,
    slots: Vec<Slot>,
    pattern: Pattern,
    /// HTTP: `depth` copies of the request, sent in one write.
    request: Vec<u8>,
    buf: Box<[u8]>,
    stats: Stats,
    /// This second's latencies and counts, handed to the main thread as it ends.
    second: SecondClock,
    connections_made: u64,
    /// The run's nonce, mixed into every connection's seed.
    nonce: u64,
    /// Open loop: the thread's schedule, and its start.
    schedule: Option<Schedule>,
    start: Instant,
    stopping: bool,
}

/// One thread's part of a run.
pub struct Share {
    pub id: usize,
    pub conns: usize,
    /// Open loop: this thread's share of the `--rate` plan.
    pub plan: Option<RatePlan>,
    /// Where this thread's seconds go.
    pub seconds: Sender<Interval>,
}

/// Runs one thread's share of the test until `end`. `request` is one HTTP request's
/// bytes (empty for echo), built once for all threads.
pub fn run_thread(
    share: Share,
    nonce: u64,
    config: &LoadConfig,
    request: &[u8],
    start: Instant,
    end: Instant,
    progress: &Progress,
) -> io::Result<Stats> {
    let Share {
        id,
        conns,
        plan,
        seconds,
    } = share;
    let mut stats = Stats::new();
    let mut step_clock = None;
    if let Some((rates, step)) = plan.as_ref().and_then(RatePlan::steps) {
        stats.steps = rates.iter().map(|&r| StepStats::new(r, step)).collect();
        step_clock = Some(StepClock::new(start, step));
    }
    let mut engine = Engine {
        id,
        config,
        epoll: Epoll::new()?,
        slots: (0..conns)
            .map(|_| Slot {
                generation: 0,
                conn: None,
                due_first: 0,
                due_count: 0,
                retry_at: None,
            })
            .collect(),
        pattern: Pattern::new(),
        request: request.to_vec(),
        buf: vec![0u8; READ_BUFFER].into_boxed_slice(),
        stats,
        second: SecondClock::new(start, end - start, seconds),
        connections_made: 0,
        nonce,
        schedule: plan.map(|p| Schedule::new(&p, end - start)),
        start,
        stopping: false,
    };
    for i in 0..conns {
        engine.connect(i, start);
    }
    if engine.schedule.is_some() {
        // Sends must leave on schedule; a failure only costs precision.
        let _ = crate::sys::thread::set_timer_slack(1);
    }
    let schedule = engine.schedule.clone();
    let due_at = |k: u64| due_at(schedule.as_ref(), start, k);
    let mut events = Events::with_capacity(1024);
    let mut scheduled: u64 = 0;
    let mut next_due = due_at(0);
    let mut next_sweep = start + SWEEP;
    let mut published = (0u64, 0u64);
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        engine.fall_due(now, &mut next_due, &mut scheduled, &mut step_clock);
        engine.tick(now, &mut step_clock);
        if now >= next_sweep {
            engine.sweep(now);
            next_sweep = now + SWEEP;
            publish_progress(&engine.stats, progress, &mut published);
        }
        let mut wake = end.min(next_sweep);
        if let Some((due, _)) = next_due {
            wake = wake.min(due);
        }
        engine
            .epoll
            .wait_precise(&mut events, Some(wake.saturating_duration_since(now)))?;
        let now = Instant::now();
        if now >= end {
            // The run is over: what arrived now is not handled, so no request is sent
            // after the end; their requests are outstanding, recorded to the end.
            break;
        }
        // Requests due while the thread waited (or was held up) count in the seconds
        // they fell due in; what these events do happened in this second (and step).
        engine.fall_due(now, &mut next_due, &mut scheduled, &mut step_clock);
        engine.tick(now, &mut step_clock);
        for event in events.iter() {
            let i = (event.token & 0xffff_ffff) as usize;
            let generation = (event.token >> 32) as u32;
            if i >= engine.slots.len() || engine.slots[i].generation != generation {
                continue; // an event for a connection already replaced
            }
            let closed = event.is_read_closed() || event.is_error();
            engine.handle(
                i,
                event.is_readable() || closed,
                closed,
                event.is_writable(),
                now,
            );
        }
    }
    engine.stopping = true;
    // Requests that fell due after the loop last looked, before the end.
    while let Some((due, step)) = next_due.filter(|&(due, _)| due < end) {
        engine.tick(due, &mut step_clock);
        scheduled += 1;
        next_due = due_at(scheduled);
        engine.stats.due += 1;
        engine.stats.unsent += 1;
        if let Some(s) = engine.stats.step(step) {
            s.due += 1;
            s.unsent += 1;
        }
    }
    engine.finish(end);
    if let Some(clock) = step_clock.as_mut() {
        clock.finish(&mut engine.stats);
    }
    // The last second, with what the end recorded; the total latency is now complete.
    engine.second.finish(&mut engine.stats);
    publish_progress(&engine.stats, progress, &mut published);
    Ok(engine.stats)
}

/// Adds what this thread did since the last call to the live totals.
fn publish_progress(stats: &Stats, progress: &Progress, published: &mut (u64, u64)) {
    let (r, e) = (stats.requests, stats.errors.total());
    progress
        .requests
        .fetch_add(r - published.0, Ordering::Relaxed);
    progress
        .errors
        .fetch_add(e - published.1, Ordering::Relaxed);
    *published = (r, e);
}

impl Engine<'_> {
    /// Moves to the second (and step) `now` is in.
    #[inline]
    fn tick(&mut self, now: Instant, steps: &mut Option<StepClock>) {
        self.second.tick(now, &mut self.stats);
        if let Some(clock) = steps.as_mut() {
            clock.tick(now, &mut self.stats);
        }
    }

    /// Puts every request due by `now` on its connection and sends what can go. Each
    /// is counted in the second (and step) it fell due in, not the one the thread
    /// noticed it in: a thread held up across seconds still gives each second its due.
    fn fall_due(
        &mut self,
        now: Instant,
        next_due: &mut Option<(Instant, u32)>,
        scheduled: &mut u64,
        steps: &mut Option<StepClock>,
    ) {
        let conns = self.slots.len() as u64;
        while let Some((due, step)) = next_due.filter(|&(due, _)| due <= now) {
            self.tick(due, steps);
            let i = (*scheduled % conns) as usize;
            let slot = &mut self.slots[i];
            if slot.due_count == 0 {
                slot.due_first = *scheduled;
            }
            slot.due_count += 1;
            if now.duration_since(due) > LATE {
                self.stats.late_by_generator += 1;
            }
            *scheduled += 1;
            *next_due = due_at(self.schedule.as_ref(), self.start, *scheduled);
            self.stats.due += 1;
            if let Some(s) = self.stats.step(step) {
                s.due += 1;
            }
            self.pump(i, now);
        }
    }

    fn is_echo(&self) -> bool {
        matches!(self.config.target, Target::Echo { .. })
    }

    /// Opens a new connection in slot `i`.
    fn connect(&mut self, i: usize, now: Instant) {
        let slot = &mut self.slots[i];
        slot.generation = slot.generation.wrapping_add(1);
        slot.conn = None;
        slot.retry_at = None;
        let token = ((slot.generation as u64) << 32) | i as u64;
        let fd = match socket::connect_nonblocking(self.config.target.addr()) {
            Ok(fd) => fd,
            Err(_) => {
                self.stats.errors.connect += 1;
                self.slots[i].retry_at = Some(now + RECONNECT_BACKOFF);
                return;
            }
        };
        if self.epoll.add(fd.as_fd(), token, SOCKET_INTEREST).is_err() {
            self.stats.errors.connect += 1;
            self.slots[i].retry_at = Some(now + RECONNECT_BACKOFF);
            return;
        }
        self.connections_made += 1;
        // Distinct for every connection of the run, on every thread, and from run to
        // run (the nonce), so no two streams are alike.
        let seed = super::pattern::connection_seed(self.nonce, self.id, self.connections_made);
        self.slots[i].conn = Some(Conn {
            fd,
            connected: false,
            started: now,
            seed,
            sent: 0,
            verified: 0,
            bad_request: None,
            out: Vec::new(),
            out_pos: 0,
            in_flight: VecDeque::new(),
            // A response to HEAD has no body, whatever its Content-Length says.
            parser: ResponseParser::for_request(self.config.request.is_head()),
            inbuf: Vec::new(),
        });
    }

    /// Drops the connection in slot `i` and opens another at once. Requests still in
    /// flight on it failed with it.
    fn replace(&mut self, i: usize, now: Instant) {
        if let Some(conn) = self.slots[i].conn.take() {
            self.stats.failed += conn.in_flight.len() as u64;
            if !self.stats.steps.is_empty() {
                for p in &conn.in_flight {
                    if let Some(s) = self.stats.step(p.step) {
                        s.failed += 1;
                    }
                }
            }
        }
        if !self.stopping {
            self.connect(i, now);
        }
    }

    /// The end of the run: what is still in flight is outstanding, recorded with the
    /// time it has waited; what is still due was never sent.
    fn finish(&mut self, end: Instant) {
        let open_loop = self.config.rate.is_some();
        let conns = self.slots.len() as u64;
        let steps = self.stats.step(0).is_some();
        for slot in &mut self.slots {
            self.stats.unsent += slot.due_count;
            // Each step's share, only when there are steps.
            for j in 0..if steps { slot.due_count } else { 0 } {
                let k = slot.due_first + j * conns;
                if let Some((_, step)) = due_at(self.schedule.as_ref(), self.start, k) {
                    if let Some(s) = self.stats.step(step) {
                        s.unsent += 1;
                    }
                }
            }
            slot.due_count = 0;
            if let Some(conn) = slot.conn.as_mut() {
                for p in conn.in_flight.drain(..) {
                    self.stats.outstanding += 1;
                    if let Some(s) = self.stats.step(p.step) {
                        s.outstanding += 1;
                    }
                    record(&mut self.stats, &mut self.second, p, end, open_loop);
                }
            }
        }
    }

    /// Serves one event. `closed`: the peer hung up or an error is pending, so the
    /// read goes on to the close or the error.
    fn handle(&mut self, i: usize, readable: bool, closed: bool, writable: bool, now: Instant) {
        let Some(conn) = self.slots[i].conn.as_mut() else {
            return;
        };
        if !conn.connected {
            if !(writable || readable) {
                return;
            }
            match socket::take_error(conn.fd.as_fd()) {
                Ok(None) => {
                    conn.connected = true;
                    let _ = socket::set_nodelay(conn.fd.as_fd());
                    self.pump(i, now);
                }
                _ => {
                    // Nothing was sent on a connection that never connected.
                    self.stats.errors.connect += 1;
                    self.slots[i].conn = None;
                    self.slots[i].retry_at = Some(now + RECONNECT_BACKOFF);
                }
            }
            return;
        }
        if writable && !self.flush(i, now) {
            return;
        }
        if readable {
            self.read(i, closed, now);
        }
    }

    /// Queues as many requests as the connection may have in flight, then writes.
    fn pump(&mut self, i: usize, now: Instant) {
        let depth = self.config.depth;
        let size = self.config.size;
        let open_loop = self.config.rate.is_some();
        let echo = self.is_echo();
        let conns = self.slots.len() as u64;
        let slot = &mut self.slots[i];
        let Some(conn) = slot.conn.as_mut() else {
            return;
        };
        if !conn.connected || self.stopping {
            return;
        }
        let mut added = 0;
        while conn.in_flight.len() < depth {
            let (measured_from, step) = if open_loop {
                if slot.due_count == 0 {
                    break;
                }
                let k = slot.due_first;
                slot.due_first += conns;
                slot.due_count -= 1;
                // It was due when it was scheduled, so it has a time.
                let (at, step) = due_at(self.schedule.as_ref(), self.start, k).unwrap_or((now, 0));
                if now.duration_since(at) > LATE {
                    self.stats.sent_late += 1;
                }
                if let Some(s) = self.stats.step(step) {
                    s.sent += 1;
                }
                (at, step)
            } else {
                (now, 0)
            };
            self.stats.sent += 1;
            if echo {
                self.pattern
                    .extend(conn.seed, conn.sent, size, &mut conn.out);
                conn.sent += size as u64;
            } else {
                added += 1;
            }
            conn.in_flight.push_back(Pending {
                due: measured_from,
                sent: now,
                step,
            });
        }
        if added > 0 {
            // HTTP requests are identical; pipelined ones go out in one write.
            for _ in 0..added {
                conn.out.extend_from_slice(&self.request);
            }
        }
        self.flush(i, now);
    }

    /// Writes pending output. Returns false if the connection was replaced.
    fn flush(&mut self, i: usize, now: Instant) -> bool {
        let Some(conn) = self.slots[i].conn.as_mut() else {
            return false;
        };
        while conn.out_pos < conn.out.len() {
            match socket::write(conn.fd.as_fd(), &conn.out[conn.out_pos..]) {
                Ok(n) => {
                    conn.out_pos += n;
                    self.stats.bytes_written += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(_) => {
                    self.stats.errors.write += 1;
                    self.replace(i, now);
                    return false;
                }
            }
        }
        conn.out.clear();
        conn.out_pos = 0;
        true
    }

    /// Reads what the socket holds, then sends what the connection may. A read that
    /// fills less than the buffer has drained the socket (epoll(7)), and data that
    /// comes later raises a new edge, so the loop stops there rather than spend a
    /// system call on the EAGAIN (one `recvfrom` per response instead of two);
    /// after a hang-up (`closed`) it reads on to the 0 that reports it, which no
    /// later edge would announce.
    fn read(&mut self, i: usize, closed: bool, now: Instant) {
        let echo = self.is_echo();
        loop {
            let Some(conn) = self.slots[i].conn.as_mut() else {
                return;
            };
            match socket::read(conn.fd.as_fd(), &mut self.buf) {
                Ok(0) => {
                    let mut clean = conn.in_flight.is_empty();
                    if !echo {
                        if let Some(resp) = conn.parser.eof() {
                            self.complete_http(i, resp.status, now);
                            clean = self.slots[i]
                                .conn
                                .as_ref()
                                .is_some_and(|c| c.in_flight.is_empty());
                        }
                    }
                    if !clean {
                        self.stats.errors.read += 1;
                    }
                    self.replace(i, now);
                    return;
                }
                Ok(n) => {
                    self.stats.bytes_read += n as u64;
                    let ok = if echo {
                        self.on_echo(i, n, now)
                    } else {
                        self.on_http(i, n, now)
                    };
                    if !ok {
                        self.replace(i, now);
                        return;
                    }
                    if n < self.buf.len() && !closed {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.stats.errors.read += 1;
                    self.replace(i, now);
                    return;
                }
            }
        }
        self.pump(i, now);
    }

    /// Verifies `n` echoed bytes in `self.buf`; completes requests at their boundaries.
    /// Returns false if the connection must be replaced.
    fn on_echo(&mut self, i: usize, n: usize, now: Instant) -> bool {
        let open_loop = self.config.rate.is_some();
        let size = self.config.size as u64;
        let mut at = 0;
        while at < n {
            let Some(conn) = self.slots[i].conn.as_mut() else {
                return false;
            };
            if conn.verified >= conn.sent {
                // More bytes than were sent: not a request's answer, so not a mismatch
                // (the requests before were judged on their own bytes); the stream
                // cannot be trusted any more.
                self.stats.errors.extra += 1;
                return false;
            }
            let request = conn.verified / size;
            let boundary = ((request + 1) * size).min(conn.sent);
            let take = ((boundary - conn.verified) as usize).min(n - at);
            let got = &self.buf[at..at + take];
            if self
                .pattern
                .first_mismatch(conn.seed, conn.verified, got)
                .is_some()
                && conn.bad_request != Some(request)
            {
                conn.bad_request = Some(request);
                self.stats.errors.mismatch += 1;
            }
            conn.verified += take as u64;
            at += take;
            if conn.verified % size == 0 {
                if let Some(p) = conn.in_flight.pop_front() {
                    self.stats.requests += 1;
                    self.stats.bad_answered += u64::from(conn.bad_request == Some(request));
                    if let Some(s) = self.stats.step(p.step) {
                        s.answered += 1;
                    }
                    record(&mut self.stats, &mut self.second, p, now, open_loop);
                }
                if self.config.reconnect && conn.in_flight.is_empty() {
                    // Connection churn: this connection has done its one exchange.
                    // Bytes read with its answer are beyond everything sent.
                    if at < n {
                        self.stats.errors.extra += 1;
                    }
                    return false;
                }
            }
        }
        true
    }

    /// Parses `n` bytes of HTTP responses from `self.buf`. Returns false if the
    /// connection must be replaced.
    fn on_http(&mut self, i: usize, n: usize, now: Instant) -> bool {
        let Some(conn) = self.slots[i].conn.as_mut() else {
            return false;
        };
        // Whole responses are parsed where the read put them; only a partial one is
        // copied, into `inbuf`, to be finished by the next read.
        let held = !conn.inbuf.is_empty();
        if held {
            conn.inbuf.extend_from_slice(&self.buf[..n]);
        }
        let mut pos = 0;
        loop {
            let Some(conn) = self.slots[i].conn.as_mut() else {
                return false;
            };
            let input: &[u8] = if held { &conn.inbuf } else { &self.buf[..n] };
            if pos == input.len() {
                // All parsed: no call to find that nothing is left.
                conn.inbuf.clear();
                return true;
            }
            match conn.parser.parse(&input[pos..]) {
                Ok((used, Some(resp))) => {
                    pos += used;
                    if !self.complete_http(i, resp.status, now) {
                        return false;
                    }
                    if resp.close || self.config.reconnect {
                        // The server closes after this one, or --reconnect asks for a
                        // new connection per request; with --reconnect, bytes read
                        // after its one answer answer nothing. The close itself is not
                        // an error, but requests pipelined behind it fail with the
                        // connection: a close with requests outstanding is a read
                        // error, so that failed requests are in the errors (and the
                        // error report agrees with the error-rate gate).
                        let lost = self.slots[i]
                            .conn
                            .as_ref()
                            .is_some_and(|c| !c.in_flight.is_empty());
                        if resp.close && lost {
                            self.stats.errors.read += 1;
                        }
                        let rest = if held {
                            self.slots[i].conn.as_ref().map_or(0, |c| c.inbuf.len())
                        } else {
                            n
                        };
                        if self.config.reconnect && !resp.close && pos < rest {
                            self.stats.errors.extra += 1;
                        }
                        return false;
                    }
                }
                Ok((used, None)) => {
                    pos += used;
                    if held {
                        conn.inbuf.drain(..pos);
                    } else {
                        conn.inbuf.extend_from_slice(&self.buf[pos..n]);
                    }
                    return true;
                }
                Err(_) => {
                    self.stats.errors.read += 1;
                    return false;
                }
            }
        }
    }

    /// Counts one HTTP response. Returns false if none was outstanding.
    fn complete_http(&mut self, i: usize, status: u16, now: Instant) -> bool {
        let open_loop = self.config.rate.is_some();
        let Some(conn) = self.slots[i].conn.as_mut() else {
            return false;
        };
        let Some(p) = conn.in_flight.pop_front() else {
            self.stats.errors.extra += 1; // a response to nothing
            return false;
        };
        self.stats.requests += 1;
        if let Some(s) = self.stats.step(p.step) {
            s.answered += 1;
        }
        record(&mut self.stats, &mut self.second, p, now, open_loop);
        let class = (status / 100) as usize;
        self.stats.status[if (1..=5).contains(&class) { class } else { 0 }] += 1;
        self.stats.codes.count(status);
        if !(200..300).contains(&status) {
            self.stats.errors.non_2xx += 1;
            self.stats.bad_answered += 1;
        }
        true
    }

    /// Times out stalled requests and connects, and retries failed connects.
    fn sweep(&mut self, now: Instant) {
        let open_loop = self.config.rate.is_some();
        for i in 0..self.slots.len() {
            let slot = &self.slots[i];
            match &slot.conn {
                None => {
                    if slot.retry_at.is_some_and(|t| t <= now) {
                        self.connect(i, now);
                    }
                }
                Some(conn) if !conn.connected => {
                    if now.duration_since(conn.started) > self.config.timeout {
                        self.stats.errors.connect += 1;
                        self.replace(i, now);
                    }
                }
                Some(conn) => {
                    if conn
                        .in_flight
                        .front()
                        .is_some_and(|p| now.duration_since(p.sent) > self.config.timeout)
                    {
                        self.stats.errors.timeout += 1;
                        // Given up: recorded with what each waited, at least the timeout
                        // for the first; the rest were pipelined behind it.
                        if let Some(conn) = self.slots[i].conn.as_mut() {
                            for p in conn.in_flight.drain(..) {
                                self.stats.timed_out += 1;
                                if let Some(s) = self.stats.step(p.step) {
                                    s.timed_out += 1;
                                }
                                record(&mut self.stats, &mut self.second, p, now, open_loop);
                            }
                        }
                        self.replace(i, now);
                    }
                }
            }
        }
    }
}

/// Records one request's latency from its due time: in this second's histogram, which
/// is added to the total as the second ends, and in its step's when the plan has
/// steps; open loop, also its service time from its send time (closed loop they are
/// the same, and the report uses `latency` for both).
#[inline]
fn record(stats: &mut Stats, second: &mut SecondClock, p: Pending, now: Instant, open_loop: bool) {
    let us = |from: Instant| {
        now.saturating_duration_since(from)
            .as_micros()
            .clamp(1, MAX_LATENCY_US as u128) as u64
    };
    let latency = us(p.due);
    second.record(latency);
    if let Some(step) = stats.step(p.step) {
        step.latency.saturating_record(latency);
    }
    if open_loop {
        stats.service.saturating_record(us(p.sent));
    }
}
