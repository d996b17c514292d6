//! The resolver: one thread per process that looks the upstream names up again every
//! `--resolve-interval` and, when the addresses changed, replaces the set every worker
//! picks from ([`Upstreams::replace`]). Kubernetes headless Services and DNS records
//! with short TTLs change addresses while edgepoll runs; this is what follows them.
//!
//! - A lookup (getaddrinfo, or the `--hosts-file` first) blocks, for seconds when a DNS
//!   server does not answer: it runs on this thread only, never on a worker. Workers
//!   see a new set through the generation counter at their next pick.
//! - An address that appears joins the set; one that vanishes gets no new client, and
//!   its pairs finish normally (they hold it by their [`super::Lease`]). An address
//!   still present keeps its `Upstream`: verdict, pair count and metrics go on.
//! - A lookup that fails, or answers no address, keeps the name's previous addresses:
//!   a DNS outage must not empty the set. It is logged once per failure episode and
//!   counted every time.
//! - IP literals are never looked up; an address both given as a literal and answered
//!   for a name stays while either has it.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::hosts::{self, Hosts};
use super::Upstreams;
use crate::config::{HostPort, RelayConfig};
use crate::metrics::{AddressChange, Metrics, NameMetrics, ResolveResult};
use crate::sys::eventfd::EventFd;
use crate::sys::poll;

/// How long stopping waits for a lookup in progress. A DNS server that does not answer
/// keeps getaddrinfo for up to its timeouts (5 s per try by default); a drain or a
/// reload must not wait that long for a thread that only reads names. Past this, the
/// thread is left to end by itself when the lookup returns: it sees the stop flag then
/// and touches nothing shared on the way out.
const STOP_WAIT: Duration = Duration::from_secs(1);

/// The running resolver; stopped and joined on drop.
pub struct Resolver {
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
    /// Disconnected when the thread has returned (its sender is dropped on the way out,
    /// by a panic too).
    exited: crossbeam_channel::Receiver<()>,
}

impl Resolver {
    /// Starts following the names among `relay`'s upstreams every
    /// `relay.resolve_interval`. None when there is nothing to follow: no name, or
    /// names looked up at start-up only.
    pub fn start(
        upstreams: Arc<Upstreams>,
        relay: &RelayConfig,
        metrics: &Metrics,
    ) -> io::Result<Option<Resolver>> {
        let Some(interval) = relay.resolve_interval else {
            return Ok(None);
        };
        if relay.names().next().is_none() {
            return Ok(None);
        }
        let mut follower = Follower::new(upstreams, relay, metrics);
        let names: Vec<&str> = follower.names().map(|n| n.label.as_str()).collect();
        tracing::info!(
            "following upstream name{} {} every {interval:?}{}",
            if names.len() == 1 { "" } else { "s" },
            names.join(", "),
            match &relay.hosts_file {
                Some(path) => format!(" (hosts file {} first)", path.display()),
                None => String::new(),
            }
        );
        let stop = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(EventFd::new()?);
        let (exiting, exited) = crossbeam_channel::bounded::<()>(0);
        let thread = std::thread::Builder::new()
            .name("edgepoll-dns".into())
            .spawn({
                let (stop, wake) = (Arc::clone(&stop), Arc::clone(&wake));
                move || {
                    let _exiting = exiting;
                    run(&mut follower, interval, &stop, &wake);
                }
            })?;
        Ok(Some(Resolver {
            stop,
            wake,
            thread: Some(thread),
            exited,
        }))
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.wake.wake();
        match self.exited.recv_timeout(STOP_WAIT) {
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                tracing::debug!("a lookup of an upstream name is still in progress; its thread ends when it returns");
            }
            _ => {
                if let Some(t) = self.thread.take() {
                    let _ = t.join();
                }
            }
        }
    }
}

/// Waits out `interval`, looks every name up, and again, until `stop`.
fn run(follower: &mut Follower, interval: Duration, stop: &AtomicBool, wake: &EventFd) {
    loop {
        let due = Instant::now() + interval;
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let left = due.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            // Rounded up, so that a wake-up never comes a millisecond early and spins.
            let timeout_ms = left.as_micros().div_ceil(1000).min(60_000) as i32;
            let mut fds = [poll::poll_fd(wake.as_fd(), poll::POLLIN)];
            if let Err(e) = poll::poll(&mut fds, timeout_ms) {
                tracing::error!("upstream names are no longer followed: {e}");
                return;
            }
            if fds[0].revents != 0 {
                let _ = wake.drain();
            }
        }
        follower.round(stop);
    }
}

/// One `upstream` entry as the resolver follows it.
enum Source {
    /// An IP literal: never looked up.
    Fixed(SocketAddr),
    Name(Name),
}

/// A name, its addresses as last answered, and its failure episode.
struct Name {
    host: String,
    port: u16,
    /// `host:port`, as given: the `name` label and what the log says.
    label: String,
    /// In the order they first appeared: the ones still present keep their places, so
    /// that a resolver that rotates its answers (DNS round-robin) changes nothing.
    addrs: Vec<SocketAddr>,
    /// The last lookup failed or answered no address; warned once, until one succeeds.
    failing: bool,
    metrics: NameMetrics,
}

/// What the resolver thread owns: every entry in the order given, and the set it last
/// made of them.
struct Follower {
    upstreams: Arc<Upstreams>,
    sources: Vec<Source>,
    hosts_file: Option<PathBuf>,
    /// The union of every source's addresses, as last given to the workers.
    set: Vec<SocketAddr>,
}

impl Follower {
    fn new(upstreams: Arc<Upstreams>, relay: &RelayConfig, metrics: &Metrics) -> Follower {
        let sources = relay
            .upstream_entries
            .iter()
            .map(|e| match &e.given {
                HostPort::Ip(addr) => Source::Fixed(*addr),
                HostPort::Name(host, port) => {
                    let label = e.given.to_string();
                    Source::Name(Name {
                        host: host.clone(),
                        port: *port,
                        metrics: metrics.name(&label),
                        label,
                        addrs: e.addrs.clone(),
                        failing: false,
                    })
                }
            })
            .collect();
        let mut follower = Follower {
            upstreams,
            sources,
            hosts_file: relay.hosts_file.clone(),
            set: Vec::new(),
        };
        // The set the server started with: `relay.upstreams`, built the same way.
        follower.set = follower.union();
        follower
    }

    fn names(&self) -> impl Iterator<Item = &Name> {
        self.sources.iter().filter_map(|s| match s {
            Source::Name(n) => Some(n),
            Source::Fixed(_) => None,
        })
    }

    /// Every source's addresses, each once, in the order the entries were given.
    fn union(&self) -> Vec<SocketAddr> {
        let mut set: Vec<SocketAddr> = Vec::new();
        for source in &self.sources {
            let addrs = match source {
                Source::Fixed(addr) => std::slice::from_ref(addr),
                Source::Name(n) => &n.addrs[..],
            };
            for a in addrs {
                if !set.contains(a) {
                    set.push(*a);
                }
            }
        }
        set
    }

    /// Looks every name up (the hosts file read once for all), and gives the workers
    /// a new set if the union changed. Stops between two lookups once `stop` is set.
    fn round(&mut self, stop: &AtomicBool) {
        let hosts: Result<Option<Hosts>, String> = match &self.hosts_file {
            Some(path) => Hosts::read(path)
                .map(Some)
                .map_err(|e| format!("hosts-file {e}")),
            None => Ok(None),
        };
        let mut changes: Vec<(usize, Change)> = Vec::new();
        for (i, source) in self.sources.iter_mut().enumerate() {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let Source::Name(name) = source else {
                continue;
            };
            let answer = match &hosts {
                Ok(hosts) => hosts::lookup(&name.host, name.port, hosts.as_ref())
                    .map_err(|e| format!("getaddrinfo: {e}")),
                Err(e) => Err(e.clone()),
            };
            if let Some(change) = name.update(answer) {
                changes.push((i, change));
            }
        }
        let set = self.union();
        if set != self.set {
            self.upstreams.replace(&set);
            self.set = set;
        }
        // Told once the workers can see it: a change counted is a change made.
        for (i, change) in changes {
            if let Source::Name(name) = &self.sources[i] {
                name.report(&change);
            }
        }
    }
}

impl Name {
    /// Takes one lookup's answer: counts it, and applies it unless it failed or was
    /// empty. Returns what changed, for [`Name::report`] once the set is replaced.
    fn update(&mut self, answer: Result<Vec<SocketAddr>, String>) -> Option<Change> {
        let found = match answer {
            Ok(found) if !found.is_empty() => found,
            Ok(_) => {
                self.metrics.resolutions[ResolveResult::Empty as usize].inc();
                self.fail("the name has no address");
                return None;
            }
            Err(why) => {
                self.metrics.resolutions[ResolveResult::Failed as usize].inc();
                self.fail(&why);
                return None;
            }
        };
        self.metrics.resolutions[ResolveResult::Ok as usize].inc();
        if self.failing {
            self.failing = false;
            tracing::info!("upstream {}: the name resolves again", self.label);
        }
        let change = Change {
            added: found
                .iter()
                .filter(|a| !self.addrs.contains(a))
                .copied()
                .collect(),
            removed: self
                .addrs
                .iter()
                .filter(|a| !found.contains(a))
                .copied()
                .collect(),
        };
        if change.added.is_empty() && change.removed.is_empty() {
            return None;
        }
        self.addrs.retain(|a| found.contains(a));
        self.addrs.extend(&change.added);
        Some(change)
    }

    /// Logs and counts a change: `upstream db.svc:6379: added 10.0.0.7:6379, removed
    /// 10.0.0.5:6379`.
    fn report(&self, change: &Change) {
        let (added, removed) = (&change.added, &change.removed);
        self.metrics.changes[AddressChange::Added as usize].inc_by(added.len() as u64);
        self.metrics.changes[AddressChange::Removed as usize].inc_by(removed.len() as u64);
        let said = match (added.is_empty(), removed.is_empty()) {
            (false, true) => format!("added {}", list(added)),
            (true, false) => format!("removed {}", list(removed)),
            _ => format!("added {}, removed {}", list(added), list(removed)),
        };
        tracing::info!("upstream {}: {said}; now {}", self.label, list(&self.addrs));
    }

    /// A lookup failed or answered nothing: the addresses stay; warned once an episode.
    fn fail(&mut self, why: &str) {
        if self.failing {
            return;
        }
        self.failing = true;
        tracing::warn!(
            "upstream {}: {why}; keeping its address{} {} until it resolves again",
            self.label,
            if self.addrs.len() == 1 { "" } else { "es" },
            list(&self.addrs)
        );
    }
}

/// The addresses that appeared in and vanished from one name's answer.
struct Change {
    added: Vec<SocketAddr>,
    removed: Vec<SocketAddr>,
}

/// `10.0.0.5:6379 10.0.0.6:6379`: addresses as the log lists them.
fn list(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Mode};

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn name(metrics: &Metrics, addrs: &[&str]) -> Name {
        Name {
            host: "svc.test".into(),
            port: 6379,
            label: "svc.test:6379".into(),
            addrs: addrs.iter().map(|a| addr(a)).collect(),
            failing: false,
            metrics: metrics.name("svc.test:6379"),
        }
    }

    fn count(metrics: &Metrics, result: ResolveResult) -> u64 {
        metrics.upstream_resolutions("svc.test:6379", result)
    }

    #[test]
    fn a_rotated_answer_changes_nothing_and_a_change_keeps_the_survivors_in_place() {
        let metrics = Metrics::new(&Config::new(Mode::Relay)).unwrap();
        let mut n = name(&metrics, &["10.0.0.5:6379", "10.0.0.6:6379"]);
        assert!(n
            .update(Ok(vec![addr("10.0.0.6:6379"), addr("10.0.0.5:6379")]))
            .is_none());
        assert_eq!(n.addrs, [addr("10.0.0.5:6379"), addr("10.0.0.6:6379")]);
        let change = n
            .update(Ok(vec![addr("10.0.0.7:6379"), addr("10.0.0.6:6379")]))
            .unwrap();
        assert_eq!(change.added, [addr("10.0.0.7:6379")]);
        assert_eq!(change.removed, [addr("10.0.0.5:6379")]);
        assert_eq!(n.addrs, [addr("10.0.0.6:6379"), addr("10.0.0.7:6379")]);
        // Counted when reported (after the set is replaced), not before.
        let changes = |c| metrics.upstream_address_changes("svc.test:6379", c);
        assert_eq!(changes(AddressChange::Added), 0);
        n.report(&change);
        assert_eq!(changes(AddressChange::Added), 1);
        assert_eq!(changes(AddressChange::Removed), 1);
        assert_eq!(count(&metrics, ResolveResult::Ok), 2);
    }

    #[test]
    fn a_failed_or_empty_lookup_keeps_the_addresses_and_is_counted_each_time() {
        let metrics = Metrics::new(&Config::new(Mode::Relay)).unwrap();
        let mut n = name(&metrics, &["10.0.0.5:6379"]);
        assert!(n.update(Err("getaddrinfo: no".into())).is_none());
        assert!(n.failing);
        assert!(n.update(Ok(Vec::new())).is_none());
        assert!(n.update(Err("getaddrinfo: no".into())).is_none());
        assert_eq!(n.addrs, [addr("10.0.0.5:6379")]);
        assert_eq!(count(&metrics, ResolveResult::Failed), 2);
        assert_eq!(count(&metrics, ResolveResult::Empty), 1);
        assert_eq!(count(&metrics, ResolveResult::Ok), 0);
        assert!(n.update(Ok(vec![addr("10.0.0.5:6379")])).is_none());
        assert!(!n.failing, "the episode ends with a lookup that answers");
    }
}
