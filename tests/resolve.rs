//! Relay's upstream names follow DNS, over real loopback sockets. The test controls a
//! name's addresses with a hosts(5) file (`--hosts-file`) that it rewrites while the
//! relay runs; the upstreams listen on 127.0.0.2, 127.0.0.3, ... (every 127.x address
//! is loopback on Linux, no setup needed) on one port, as the pods behind a headless
//! Service do. Each rewrite is a new file renamed over the old one, as an operator's
//! tooling (or kubelet's) replaces it, so a lookup never reads half a file.

mod util;

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use edgepoll::config::{self, parse_upstream, Settings};
use edgepoll::metrics::{AddressChange, ConnectError, ResolveResult};
use edgepoll::{CloseReason, Config, Mode, Server};
use util::*;

/// The tests that start a resolver run one at a time: one of them counts the
/// resolver threads of this process.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// A hosts file in a directory of this test's own, removed with it on drop.
struct HostsFile {
    dir: PathBuf,
    path: PathBuf,
}

impl HostsFile {
    fn new(test: &str, text: &str) -> HostsFile {
        let dir =
            std::env::temp_dir().join(format!("edgepoll-resolve-{}-{test}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let hosts = HostsFile {
            path: dir.join("hosts"),
            dir,
        };
        hosts.write(text);
        hosts
    }

    /// Replaces the file's text at once.
    fn write(&self, text: impl AsRef<[u8]>) {
        let next = self.dir.join("hosts.next");
        std::fs::write(&next, text).unwrap();
        std::fs::rename(&next, &self.path).unwrap();
    }

    fn remove(&self) {
        std::fs::remove_file(&self.path).unwrap();
    }
}

impl Drop for HostsFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `127.0.0.{host}:{port}`.
fn pod(host: u8, port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, host], port))
}

/// Echo servers on 127.0.0.{h}:PORT for each of `hosts`, one port for all; returns
/// the port and the servers.
fn pods(hosts: &[u8]) -> (u16, Vec<Server>) {
    for _ in 0..20 {
        let port = std::net::TcpListener::bind(pod(hosts[0], 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let started: Result<Vec<Server>, _> = hosts
            .iter()
            .map(|&h| {
                let mut config = Config::new(Mode::Echo);
                config.listen = vec![pod(h, port)];
                config.workers = 1;
                config.metrics_listen = None;
                Server::start(config)
            })
            .collect();
        if let Ok(servers) = started {
            return (port, servers);
        }
        // Someone took the port on one of the addresses meanwhile: another one.
    }
    panic!("no port free on every one of 127.0.0.{hosts:?}");
}

/// A relay in front of `upstreams` (as `--upstream` takes them) that looks names up
/// in `hosts` every 100 ms, built the way the command line builds it.
fn relay(upstreams: &[&str], hosts: &HostsFile, tweak: impl FnOnce(&mut Settings)) -> Server {
    let mut settings = Settings {
        listen: Some(vec!["127.0.0.1:0".parse().unwrap()]),
        workers: Some(1),
        metrics_listen: Some(None),
        upstreams: Some(
            upstreams
                .iter()
                .map(|u| parse_upstream(u).unwrap())
                .collect(),
        ),
        resolve_interval: Some(Some(Duration::from_millis(100))),
        hosts_file: Some(hosts.path.clone()),
        ..Settings::default()
    };
    tweak(&mut settings);
    let config = config::load(Some(Mode::Relay), settings, None)
        .expect("the configuration loads")
        .config;
    Server::start(config).expect("relay starts")
}

fn connects(relay: &Server, addr: SocketAddr) -> u64 {
    relay.metrics().upstream_connects(&addr.to_string())
}

fn active(relay: &Server, addr: SocketAddr) -> i64 {
    relay.metrics().upstream_active(&addr.to_string())
}

fn resolutions(relay: &Server, name: &str, result: ResolveResult) -> u64 {
    relay.metrics().upstream_resolutions(name, result)
}

fn changes(relay: &Server, name: &str, change: AddressChange) -> u64 {
    relay.metrics().upstream_address_changes(name, change)
}

/// `n` clients one after another, each echoing its own bytes through the relay.
fn clients(relay: &Server, n: u64) {
    for i in 0..n {
        let mut s = connect(relay.local_addr());
        echo_roundtrip(&mut s, &pattern(i, 0, 1000));
    }
}

/// Threads of this process named `name` now.
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == name)
        .count()
}

#[test]
fn new_clients_follow_the_name_while_an_open_pair_keeps_its_upstream_to_the_end() {
    let _one = one_at_a_time();
    let (port, _pods) = pods(&[2, 3]);
    let (old, new) = (pod(2, port), pod(3, port));
    let hosts = HostsFile::new("follow", "127.0.0.2 svc.test\n");
    let name = format!("svc.test:{port}");
    let relay = relay(&[&name], &hosts, |_| {});
    assert_eq!(relay.config().relay.upstreams, vec![old]);
    clients(&relay, 4);
    assert_eq!((connects(&relay, old), connects(&relay, new)), (4, 0));

    // A long-lived pair on the old address.
    let mut held = connect(relay.local_addr());
    echo_roundtrip(&mut held, &pattern(100, 0, 4096));
    assert_eq!(connects(&relay, old), 5);

    // The pod is replaced: the name now answers the new address only.
    hosts.write("127.0.0.3 svc.test\n");
    wait_for("the change to be counted", || {
        changes(&relay, &name, AddressChange::Added) == 1
    });
    assert_eq!(changes(&relay, &name, AddressChange::Removed), 1);

    // Every new client goes to the new address, though the old one still accepts.
    clients(&relay, 6);
    assert_eq!((connects(&relay, old), connects(&relay, new)), (5, 6));

    // The open pair keeps its upstream: every byte through, in order, to the end.
    let mut at = 4096u64;
    for _ in 0..8 {
        echo_roundtrip(&mut held, &pattern(100, at, 64 * 1024));
        at += 64 * 1024;
    }
    assert_eq!(active(&relay, old), 1);
    held.shutdown(Shutdown::Write).unwrap();
    let (rest, ending) = read_until_end(&mut held);
    assert_eq!((rest.len(), ending), (0, Ending::Fin));
    drop(held);
    wait_for("the old upstream's last pair to close", || {
        active(&relay, old) == 0
    });
    wait_for("the new upstream's pairs to close", || {
        active(&relay, new) == 0
    });
    assert_eq!(connects(&relay, old), 5, "a client went to the old address");
    assert_eq!(resolutions(&relay, &name, ResolveResult::Failed), 0);
    assert!(resolutions(&relay, &name, ResolveResult::Ok) >= 1);
    assert_eq!(
        total(&relay, |s| s.closed[CloseReason::UpstreamError as usize]),
        0
    );
}

#[test]
fn an_address_that_appears_takes_its_share_and_junk_in_the_file_changes_nothing() {
    let _one = one_at_a_time();
    let (port, _pods) = pods(&[2, 3]);
    let (a, b) = (pod(2, port), pod(3, port));
    let hosts = HostsFile::new("split", "127.0.0.2 svc.test\n");
    let name = format!("svc.test:{port}");
    let relay = relay(&[&name], &hosts, |_| {});
    clients(&relay, 2);

    // A second line for the name (an alias line), among lines a careless or hostile
    // writer left: binary bytes, impossible addresses, a 100 KB line, a zone.
    let mut text = b"127.0.0.2 svc.test\n\x00\xff\xfe garbage svc.test\n".to_vec();
    text.extend_from_slice(b"300.0.0.1 svc.test\nfe80::1%lo svc.test\n127.0.0.9\n");
    text.extend(std::iter::repeat_n(b'x', 100_000));
    text.extend_from_slice(b" svc.test\n127.0.0.3 other.test SVC.test # the second pod\n");
    hosts.write(&text);
    wait_for("the new address to be counted", || {
        changes(&relay, &name, AddressChange::Added) == 1
    });
    assert_eq!(changes(&relay, &name, AddressChange::Removed), 0);

    // One worker, round-robin over both: exactly half each.
    clients(&relay, 10);
    assert_eq!((connects(&relay, a), connects(&relay, b)), (2 + 5, 5));
}

#[test]
fn a_lookup_that_fails_keeps_the_set_and_the_name_is_followed_again_after() {
    let _one = one_at_a_time();
    let (port, _pods) = pods(&[2, 3]);
    let (a, b) = (pod(2, port), pod(3, port));
    // A name the system resolver refuses without asking a DNS server (glibc's
    // getaddrinfo rejects a host name with a '!' in it; checked with strace), so that
    // the lookup that falls through to it once the name leaves the file never leaves
    // this machine.
    let hosts = HostsFile::new("fail", "127.0.0.2 svc!.test\n");
    let name = format!("svc!.test:{port}");
    let relay = relay(&[&name], &hosts, |_| {});
    let failed = || resolutions(&relay, &name, ResolveResult::Failed);

    // The file becomes unreadable: every lookup fails, and the set stays.
    hosts.remove();
    wait_for("two failed lookups", || failed() >= 2);
    clients(&relay, 3);
    assert_eq!((connects(&relay, a), connects(&relay, b)), (3, 0));

    // The file is back, without the name: the system resolver has never heard of it.
    hosts.write("127.0.0.3 other.test\n");
    let before = failed();
    wait_for("two more failed lookups", || failed() >= before + 2);
    clients(&relay, 3);
    assert_eq!((connects(&relay, a), connects(&relay, b)), (6, 0));
    assert_eq!(changes(&relay, &name, AddressChange::Removed), 0);
    assert_eq!(resolutions(&relay, &name, ResolveResult::Ok), 0);

    // The name comes back, somewhere else: followed as before.
    hosts.write("127.0.0.3 svc!.test\n");
    wait_for("the change", || {
        changes(&relay, &name, AddressChange::Removed) == 1
    });
    clients(&relay, 3);
    assert_eq!((connects(&relay, a), connects(&relay, b)), (6, 3));
}

#[test]
fn an_address_that_comes_back_while_its_pairs_remain_counts_them_still() {
    let _one = one_at_a_time();
    let (port, _pods) = pods(&[2, 3]);
    let (a, b) = (pod(2, port), pod(3, port));
    let hosts = HostsFile::new("back", "127.0.0.2 svc.test\n");
    let name = format!("svc.test:{port}");
    let relay = relay(&[&name], &hosts, |s| {
        s.balance = Some(edgepoll::config::Balance::LeastConn)
    });
    let mut held: Vec<_> = (0..2).map(|_| connect(relay.local_addr())).collect();
    for (i, s) in held.iter_mut().enumerate() {
        echo_roundtrip(s, &pattern(i as u64, 0, 100));
    }

    // The address leaves, and comes back while its two pairs are open.
    hosts.write("127.0.0.3 svc.test\n");
    wait_for("the removal", || {
        changes(&relay, &name, AddressChange::Removed) == 1
    });
    hosts.write("127.0.0.3 svc.test\n127.0.0.2 svc.test\n");
    wait_for("the return", || {
        changes(&relay, &name, AddressChange::Added) == 2
    });

    // Least-conn still sees its two pairs: the next two clients (kept open) both go
    // to the other address. Had it come back counting none, one of them would be sent
    // to it.
    for i in 0..2 {
        let mut s = connect(relay.local_addr());
        echo_roundtrip(&mut s, &pattern(10 + i, 0, 100));
        held.push(s);
    }
    assert_eq!((connects(&relay, a), connects(&relay, b)), (2, 2));
    assert_eq!((active(&relay, a), active(&relay, b)), (2, 2));
    drop(held);
    wait_for("every pair to close", || {
        active(&relay, a) == 0 && active(&relay, b) == 0
    });
}

#[test]
fn an_ip_literal_stays_whatever_a_name_that_shares_its_address_answers() {
    let _one = one_at_a_time();
    let (port, _pods) = pods(&[2, 3, 4]);
    let (a, b, c) = (pod(2, port), pod(3, port), pod(4, port));
    let hosts = HostsFile::new("literal", "127.0.0.2 svc.test\n127.0.0.3 svc.test\n");
    let name = format!("svc.test:{port}");
    let literal = a.to_string();
    let relay = relay(&[&literal, &name], &hosts, |_| {});
    assert_eq!(relay.config().relay.upstreams, vec![a, b]);

    // The name leaves both addresses, the literal's among them, for a third.
    hosts.write("127.0.0.4 svc.test\n");
    wait_for("the change", || {
        changes(&relay, &name, AddressChange::Removed) == 2
    });
    clients(&relay, 4);
    assert_eq!(
        (
            connects(&relay, a),
            connects(&relay, b),
            connects(&relay, c)
        ),
        (2, 0, 2)
    );
    // The literal is never looked up.
    for result in [
        ResolveResult::Ok,
        ResolveResult::Failed,
        ResolveResult::Empty,
    ] {
        assert_eq!(resolutions(&relay, &literal, result), 0);
    }
}

#[test]
fn the_default_connect_retries_follow_the_size_of_the_set() {
    let _one = one_at_a_time();
    // 127.0.0.2 refuses (nothing listens there); 127.0.0.3 serves.
    let (port, _pods) = pods(&[3]);
    let (dead, live) = (pod(2, port), pod(3, port));
    let hosts = HostsFile::new("tries", "127.0.0.2 svc.test\n");
    let name = format!("svc.test:{port}");
    // A failed upstream is never skipped, so every client starts its turn there.
    let relay = relay(&[&name], &hosts, |s| s.fail_timeout = Some(Duration::ZERO));

    // One upstream, one try: the client is reset.
    let mut s = connect(relay.local_addr());
    // The reset may come before the write does, and then the write reports it.
    match s.write_all(b"hello") {
        Ok(()) => {
            let (got, ending) = read_until_end(&mut s);
            assert_reset(
                "the client of a set of one dead upstream",
                got.len(),
                ending,
            );
        }
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
    }

    // The name gains the live address: two upstreams, two tries, and the client that
    // meets the dead one first is served by the other.
    hosts.write("127.0.0.2 svc.test\n127.0.0.3 svc.test\n");
    wait_for("the change", || {
        changes(&relay, &name, AddressChange::Added) == 1
    });
    clients(&relay, 1);
    let refused = relay
        .metrics()
        .upstream_connect_errors(&dead.to_string(), ConnectError::Refused);
    assert_eq!((refused, connects(&relay, live)), (2, 1));
}

#[test]
fn the_resolver_thread_exists_only_while_there_is_a_name_to_follow() {
    let _one = one_at_a_time();
    let (port, _pods) = pods(&[2]);
    let hosts = HostsFile::new("thread", "127.0.0.2 svc.test\n");
    let name = format!("svc.test:{port}");
    // (A previous test's joined thread can linger in /proc for a moment.)
    wait_for("no resolver thread", || threads_named("edgepoll-dns") == 0);

    let following = relay(&[&name], &hosts, |_| {});
    // A thread names itself once it runs, which may be just after `start` returns.
    wait_for("the resolver thread", || threads_named("edgepoll-dns") == 1);
    drop(following);
    wait_for("the resolver thread to end with its server", || {
        threads_named("edgepoll-dns") == 0
    });

    // Looked up once, at start-up: no thread, and a change in the file is not seen
    // in the time that three lookups would have taken.
    let once = relay(&[&name], &hosts, |s| s.resolve_interval = Some(None));
    assert_eq!(once.config().relay.upstreams, vec![pod(2, port)]);
    hosts.write("127.0.0.3 svc.test\n");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(threads_named("edgepoll-dns"), 0);
    clients(&once, 2);
    assert_eq!(connects(&once, pod(2, port)), 2);
    assert_eq!(resolutions(&once, &name, ResolveResult::Ok), 0);
    drop(once);
    // Only IP literals: nothing to follow, no thread.
    let literal = pod(2, port).to_string();
    let fixed = relay(&[&literal], &hosts, |_| {});
    assert_eq!(threads_named("edgepoll-dns"), 0);
    drop(fixed);
}

/// The binary logs each change once, and each failure episode once however many
/// lookups fail in it.
#[test]
fn the_binary_logs_a_change_and_warns_once_per_failure_episode() {
    let _one = one_at_a_time();
    let (port, _pods) = pods(&[2, 3]);
    let hosts = HostsFile::new("log", "127.0.0.2 svc.test\n");
    let name = format!("svc.test:{port}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgepoll"))
        .args(["relay", "--listen", "127.0.0.1:0", "--workers", "1"])
        .args(["--metrics-listen", "127.0.0.1:0", "--upstream", &name])
        .args(["--resolve-interval", "50ms", "--hosts-file"])
        .arg(&hosts.path)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let running = Running(child);
    let mut next_line = |what: &str| -> String {
        match lines
            .by_ref()
            .map(|l| l.unwrap())
            .find(|l| l.contains(what))
        {
            Some(line) => line,
            None => panic!("the log ended without a line with {what:?}"),
        }
    };
    let started = next_line(" listening on ");
    let metrics: SocketAddr = started
        .split("metrics on http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no metrics address in {started:?}"));
    let relaying = next_line("relaying to");
    assert!(
        relaying.contains(&format!("{name} (127.0.0.2:{port})"))
            && relaying.contains("names looked up every 50ms"),
        "{relaying}"
    );

    hosts.write("127.0.0.3 svc.test\n");
    let changed = next_line(&format!("upstream {name}: "));
    assert!(
        changed.ends_with(&format!(
            "upstream {name}: added 127.0.0.3:{port}, removed 127.0.0.2:{port}; now 127.0.0.3:{port}"
        )),
        "{changed}"
    );

    hosts.remove();
    let failed_series =
        format!("edgepoll_upstream_resolutions_total{{name=\"{name}\",result=\"failed\"}}");
    let scrape = || {
        let (_, _, body) = http_get(metrics, "/metrics");
        sample(&body, &failed_series).unwrap_or(0.0)
    };
    wait_for("five failed lookups", || scrape() >= 5.0);
    hosts.write("127.0.0.3 svc.test\n");
    // Everything logged from the change to the recovery: one warning for the episode.
    let mut warnings = Vec::new();
    let back = loop {
        let line = next_line(&format!("upstream {name}: "));
        if line.ends_with("the name resolves again") {
            break line;
        }
        warnings.push(line);
    };
    assert!(
        back.ends_with(&format!("upstream {name}: the name resolves again")),
        "{back}"
    );
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert!(
        warnings[0].contains(" WARN ")
            && warnings[0].contains(&format!(
                "upstream {name}: hosts-file read {}: No such file or directory (os error 2); \
                 keeping its address 127.0.0.3:{port} until it resolves again",
                hosts.path.display()
            )),
        "{}",
        warnings[0]
    );
    drop(running);
}
