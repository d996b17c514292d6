//! The health prober: one thread per process that probes every upstream on its own
//! schedule and publishes the verdict every worker reads ([`Upstream::is_up`]).
//!
//! A probe is a non-blocking connect (`tcp`), followed for `send-expect` by a write of
//! the configured bytes and reads until the answer begins with the expected bytes.
//! All probes in flight are watched with one poll(2) call: a prober watches a few
//! dozen sockets at most and none of them is a client's, so the worker's
//! edge-triggered machinery would buy nothing here. Probes never run on a worker.
//!
//! Verdict: `fall` failed probes in a row take an up upstream down, `rise` passed
//! ones bring a down upstream back (HAProxy's `check rise/fall`). A worker that marks
//! an upstream down after a failed connect starts the count of passed probes afresh.
//! Each transition is logged once.
//!
//! Schedule: each upstream is probed every `interval`, each gap drawn within 10% of
//! it, and the first probe of each at a random point of the first interval, so that
//! the probes of many upstreams, and of many replicas, do not fall in step.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use super::{Upstream, Upstreams};
use crate::config::{CheckKind, HealthCheck};
use crate::metrics::CheckResult;
use crate::sys::eventfd::EventFd;
use crate::sys::poll::{self, PollFd};
use crate::sys::socket;

/// What a passed probe reads past the expected bytes before it closes, so that the
/// close is a FIN: a socket closed with unread bytes sends a reset instead.
const DRAIN_AFTER_PASS: usize = 65536;

/// The running prober; stopped and joined on drop.
pub struct Prober {
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl Prober {
    /// Starts probing `upstreams` as `check` says.
    pub fn start(upstreams: Arc<Upstreams>, check: HealthCheck) -> io::Result<Prober> {
        let stop = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(EventFd::new()?);
        let thread = std::thread::Builder::new()
            .name("edgepoll-health".into())
            .spawn({
                let (stop, wake) = (Arc::clone(&stop), Arc::clone(&wake));
                move || run(&upstreams, &check, &stop, &wake)
            })?;
        Ok(Prober {
            stop,
            wake,
            thread: Some(thread),
        })
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.wake.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Where a probe is.
enum Phase {
    Connecting,
    /// Connected; `sent` bytes of the request written.
    Sending {
        sent: usize,
    },
    /// Request written; the answer so far.
    Reading {
        got: Vec<u8>,
    },
}

struct Probe {
    fd: OwnedFd,
    phase: Phase,
    deadline: Instant,
}

/// One upstream as the prober sees it.
struct Target {
    upstream: Arc<Upstream>,
    /// When the next probe starts.
    due: Instant,
    probe: Option<Probe>,
    /// Probes in a row whose result disagrees with the verdict `streak_of`.
    streak: u32,
    streak_of: bool,
}

/// A small xorshift generator for the jitter: no need for more, and no dependency.
struct Jitter(u64);

impl Jitter {
    fn new() -> Jitter {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            ^ (u64::from(std::process::id()) << 32);
        Jitter(seed | 1)
    }

    /// A fraction in [0, 1).
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn run(upstreams: &Upstreams, check: &HealthCheck, stop: &AtomicBool, wake: &EventFd) {
    let mut jitter = Jitter::new();
    let mut targets: HashMap<SocketAddr, Target> = HashMap::new();
    let mut generation = u64::MAX;
    let mut fds: Vec<PollFd> = Vec::new();
    let mut order: Vec<SocketAddr> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let current = upstreams.generation.load(Ordering::Acquire);
        if current != generation {
            generation = current;
            let list = upstreams.list();
            targets.retain(|addr, _| list.iter().any(|u| u.addr == *addr));
            for up in list.iter() {
                targets.entry(up.addr).or_insert_with(|| Target {
                    streak_of: up.is_up(),
                    upstream: Arc::clone(up),
                    due: now + check.interval.mul_f64(jitter.next()),
                    probe: None,
                    streak: 0,
                });
            }
        }
        let mut next_wake = now + check.interval;
        fds.clear();
        order.clear();
        fds.push(poll::poll_fd(wake.as_fd(), poll::POLLIN));
        for (addr, t) in targets.iter_mut() {
            if t.probe.is_none() && t.due <= now {
                t.due = now + check.interval.mul_f64(0.9 + 0.2 * jitter.next());
                match start(t.upstream.addr, check, now) {
                    Ok(p) => t.probe = Some(p),
                    Err(_) => verdict(t, check, CheckResult::ConnectError),
                }
            }
            if let Some(p) = &t.probe {
                if p.deadline <= now {
                    t.probe = None;
                    verdict(t, check, CheckResult::Timeout);
                }
            }
            match &t.probe {
                Some(p) => {
                    let events = match p.phase {
                        Phase::Connecting | Phase::Sending { .. } => poll::POLLOUT,
                        Phase::Reading { .. } => poll::POLLIN,
                    };
                    fds.push(poll::poll_fd(p.fd.as_fd(), events));
                    order.push(*addr);
                    next_wake = next_wake.min(p.deadline);
                }
                None => next_wake = next_wake.min(t.due),
            }
        }
        let timeout = next_wake.saturating_duration_since(Instant::now());
        // Rounded up, so that a wake-up never comes a millisecond early and spins.
        let timeout_ms = timeout.as_micros().div_ceil(1000).min(60_000) as i32;
        if let Err(e) = poll::poll(&mut fds, timeout_ms) {
            tracing::error!("health checks stop: {e}");
            return;
        }
        if fds[0].revents != 0 {
            let _ = wake.drain();
        }
        for (entry, addr) in fds[1..].iter().zip(&order) {
            if entry.revents == 0 {
                continue;
            }
            let Some(t) = targets.get_mut(addr) else {
                continue;
            };
            if let Some(result) = advance(t, check) {
                t.probe = None;
                verdict(t, check, result);
            }
        }
    }
}

/// Starts a probe of `addr`.
fn start(addr: SocketAddr, check: &HealthCheck, now: Instant) -> io::Result<Probe> {
    let fd = socket::connect_nonblocking(addr)?;
    Ok(Probe {
        fd,
        phase: Phase::Connecting,
        deadline: now + check.timeout,
    })
}

/// Moves a probe on after poll said its socket is ready; the result once it has one.
fn advance(t: &mut Target, check: &HealthCheck) -> Option<CheckResult> {
    let p = t.probe.as_mut()?;
    loop {
        match &mut p.phase {
            Phase::Connecting => {
                match socket::take_error(p.fd.as_fd()) {
                    Ok(None) => {}
                    Ok(Some(_)) | Err(_) => return Some(CheckResult::ConnectError),
                }
                if check.kind == CheckKind::Tcp {
                    return Some(CheckResult::Passed);
                }
                p.phase = Phase::Sending { sent: 0 };
            }
            Phase::Sending { sent } => {
                while *sent < check.send.len() {
                    match socket::write(p.fd.as_fd(), &check.send[*sent..]) {
                        Ok(n) => *sent += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                        Err(_) => return Some(CheckResult::Closed),
                    }
                }
                p.phase = Phase::Reading { got: Vec::new() };
            }
            Phase::Reading { got } => {
                let mut buf = [0u8; 512];
                loop {
                    let want = (check.expect.len() - got.len()).min(buf.len());
                    match socket::read(p.fd.as_fd(), &mut buf[..want]) {
                        Ok(0) => return Some(CheckResult::Closed),
                        Ok(n) => {
                            got.extend_from_slice(&buf[..n]);
                            if !check.expect.starts_with(got) {
                                return Some(CheckResult::Mismatch);
                            }
                            if got.len() == check.expect.len() {
                                drain(p.fd.as_fd(), &mut buf);
                                return Some(CheckResult::Passed);
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                        Err(_) => return Some(CheckResult::Closed),
                    }
                }
            }
        }
    }
}

/// Reads what has arrived past the expected answer (`+PONG` of `+PONG\r\n`), up to
/// [`DRAIN_AFTER_PASS`], so that the probe's close is a FIN rather than a reset.
/// Bytes that arrive later still make the kernel answer them with a reset.
fn drain(fd: std::os::fd::BorrowedFd<'_>, buf: &mut [u8]) {
    let mut read = 0;
    while read < DRAIN_AFTER_PASS {
        match socket::read(fd, buf) {
            Ok(n) if n > 0 => read += n,
            _ => return,
        }
    }
}

/// Counts a probe's result and applies `rise`/`fall` to the upstream's verdict.
fn verdict(t: &mut Target, check: &HealthCheck, result: CheckResult) {
    let up = &t.upstream;
    up.metrics.checks[result as usize].inc();
    let is_up = up.is_up();
    if is_up != t.streak_of {
        // A worker marked it down after a failed connect (or it came back): count
        // from the verdict as it is now.
        t.streak_of = is_up;
        t.streak = 0;
    }
    let passed = result == CheckResult::Passed;
    if passed == is_up {
        t.streak = 0;
        return;
    }
    t.streak += 1;
    let needed = if is_up { check.fall } else { check.rise };
    if t.streak < needed {
        return;
    }
    t.streak = 0;
    t.streak_of = !is_up;
    if up.set_up(!is_up) {
        if is_up {
            tracing::warn!(
                upstream = %up.addr,
                "upstream down: {needed} health checks failed in a row (last: {}); no new clients",
                result.as_str()
            );
        } else {
            tracing::info!(upstream = %up.addr, "upstream up: {needed} health checks passed in a row");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_in_its_range_and_varies() {
        let mut j = Jitter::new();
        let draws: Vec<f64> = (0..1000).map(|_| j.next()).collect();
        assert!(draws.iter().all(|&x| (0.0..1.0).contains(&x)));
        let low = draws.iter().filter(|&&x| x < 0.5).count();
        assert!((350..650).contains(&low), "{low} of 1000 below one half");
    }
}
