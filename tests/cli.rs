//! The `edgepoll` binary: flags, errors, the start-up line, and SIGTERM.

mod util;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use util::*;

fn edgepoll() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edgepoll"))
}

/// `edgepoll MODE --help` succeeds and names every one of `flags`.
#[track_caller]
fn assert_help_lists(mode: &str, flags: &[&str]) {
    let out = edgepoll().args([mode, "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in flags {
        assert!(help.contains(flag), "{mode} --help lacks {flag}:\n{help}");
    }
}

/// Runs `edgepoll ARGS` with the open-file limit at `nofile`, its log on a pipe.
fn spawn_with_nofile(
    nofile: u32,
    args: &str,
) -> (
    Running,
    std::io::Lines<BufReader<std::process::ChildStderr>>,
) {
    let bin = env!("CARGO_BIN_EXE_edgepoll");
    let mut child = Command::new("sh")
        .args(["-c", &format!("ulimit -n {nofile} && exec {bin} {args}")])
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stderr.take().unwrap()).lines();
    (Running(child), lines)
}

#[test]
fn help_lists_every_flag_with_an_example() {
    assert_help_lists(
        "echo",
        &[
            "--listen",
            "--workers",
            "--pin-workers",
            "--backlog",
            "--max-connections",
            "--max-pending-bytes",
            "--idle-timeout",
            "--drain-timeout",
            "--metrics-listen",
            "--accept-proxy",
            "--trusted-proxy",
            "--proxy-header-timeout",
            "--tcp-keepalive",
            "--tcp-user-timeout",
            "Example:",
        ],
    );
}

#[test]
fn http_help_lists_its_flags() {
    assert_help_lists(
        "http",
        &[
            "--body",
            "--body-file",
            "--status",
            "--content-type",
            "--header",
            "--max-header-bytes",
            "--header-timeout",
            "--max-connections-per-ip",
            "--max-buffered-bytes",
            "Example:",
        ],
    );
}

#[test]
fn relay_help_lists_its_flags() {
    assert_help_lists(
        "relay",
        &[
            "--upstream",
            "--balance",
            "least-conn",
            "--connect-timeout",
            "--fail-timeout",
            "--connect-retries",
            "--splice",
            "--send-proxy-v2",
            "--health-check",
            "send-expect",
            "--health-check-interval",
            "--health-check-timeout",
            "--rise",
            "--fall",
            "--health-check-send",
            "--health-check-expect",
            "--max-conns-per-upstream",
            "--max-queue",
            "--queue-timeout",
            "--resolve-interval",
            "--hosts-file",
            "--idle-timeout",
            "--tcp-keepalive",
            "upstream sockets 60s:10s:6",
            "Example:",
        ],
    );
}

#[test]
fn relay_logs_its_health_checks_and_upstream_limit_at_start_up() {
    let (_running, mut lines) = spawn_with_nofile(
        1024,
        "relay --listen 127.0.0.1:0 --metrics-listen off --workers 1 --upstream 127.0.0.1:6398 \
         --health-check send-expect --health-check-send PING\\r\\n --health-check-expect +PONG \
         --health-check-interval 500ms --rise 3 --fall 4 --max-conns-per-upstream 10",
    );
    let relaying = lines
        .by_ref()
        .map(|l| l.unwrap())
        .find(|l| l.contains("relaying to"))
        .expect("the relaying line");
    assert!(
        relaying.contains(
            "send-expect health checks every 500ms (timeout 500ms, rise 3, fall 4), \
             at most 10 per upstream, queue of 1024 for 5s"
        ),
        "{relaying}"
    );
}

#[test]
fn relay_resolves_and_logs_its_upstreams_and_fits_pairs_to_the_open_file_limit() {
    let (running, mut lines) = spawn_with_nofile(
        256,
        "relay --listen 127.0.0.1:0 --metrics-listen off --workers 2 --upstream localhost:6399 --upstream 127.0.0.1:6398 --splice --max-connections 5000",
    );
    let mut seen = Vec::new();
    for line in lines.by_ref().map(|l| l.unwrap()) {
        let done = line.contains("relaying to");
        seen.push(line);
        if done {
            break;
        }
    }
    let text = seen.join("\n");
    // 256 descriptors, less 64 reserved and 2 per worker, over 6 per spliced pair.
    assert!(
        text.contains("--max-connections lowered from 5000 to 31"),
        "{text}"
    );
    let relaying = seen.last().unwrap();
    assert!(relaying.contains("relaying to"), "{text}");
    // The name was resolved at start-up; both upstreams are listed.
    assert!(relaying.contains("127.0.0.1:6399"), "{relaying}");
    assert!(relaying.contains("127.0.0.1:6398"), "{relaying}");
    assert!(
        relaying.contains("round-robin") && relaying.contains("splice"),
        "{relaying}"
    );
    drop(running);
}

#[test]
fn bad_flags_get_one_clear_line_and_exit_2() {
    for (args, expect) in [
        (
            vec!["echo", "--workers", "0"],
            "workers (--workers) must be between 1 and 1024, got 0",
        ),
        (vec!["echo", "--listen", "7000"], "expected HOST:PORT"),
        (
            vec!["echo", "--max-pending-bytes", "lots"],
            "invalid size 'lots'",
        ),
        (vec!["echo", "--idle-timeout", "5 days"], "invalid duration"),
        (vec!["gopher"], "unrecognized subcommand"),
        (
            vec!["http", "--status", "99"],
            "status (--status) must be a final status code",
        ),
        (
            vec!["http", "--header", "Content-Length: 5"],
            "sets this header itself",
        ),
        (
            vec!["http", "--body-file", "/nonexistent/body"],
            "body-file (--body-file) /nonexistent/body",
        ),
        (vec!["relay"], "--upstream <ADDR>"),
        (
            vec!["relay", "--upstream", "127.0.0.1:0"],
            "port 0 is not a destination",
        ),
        (
            vec![
                "relay",
                "--upstream",
                "127.0.0.1:6379",
                "--balance",
                "random",
            ],
            "invalid value 'random'",
        ),
        (
            vec![
                "relay",
                "--upstream",
                "127.0.0.1:6379",
                "--connect-retries",
                "0",
            ],
            "connect-retries (--connect-retries) must be greater than zero",
        ),
        (
            vec!["relay", "--upstream", "127.0.0.1:6379", "--rise", "3"],
            "rise (--rise): only with health-check (--health-check tcp|send-expect)",
        ),
        (
            vec![
                "relay",
                "--upstream",
                "127.0.0.1:6379",
                "--health-check",
                "send-expect",
            ],
            "health-check-expect (--health-check-expect): send-expect needs the bytes",
        ),
        (
            vec![
                "relay",
                "--upstream",
                "127.0.0.1:6379",
                "--health-check",
                "send-expect",
                "--health-check-expect",
                "\\q",
            ],
            "unknown escape '\\q'",
        ),
        (
            vec!["relay", "--upstream", "127.0.0.1:6379", "--max-queue", "5"],
            "max-queue (--max-queue): only with max-conns-per-upstream",
        ),
        (
            vec![
                "relay",
                "--upstream",
                "127.0.0.1:6379",
                "--max-conns-per-upstream",
                "0",
            ],
            "max-conns-per-upstream (--max-conns-per-upstream) must be greater than zero",
        ),
        (
            vec!["echo", "--accept-proxy"],
            "accept-proxy (--accept-proxy) needs at least one trusted-proxy",
        ),
        (
            vec!["http", "--trusted-proxy", "10.0.0.0/8"],
            "trusted-proxy (--trusted-proxy) is set but accept-proxy (--accept-proxy) is not",
        ),
        (
            vec!["echo", "--accept-proxy", "--trusted-proxy", "10.0.0.1/8"],
            "host bits set below /8; did you mean 10.0.0.0/8?",
        ),
        (
            vec![
                "echo",
                "--accept-proxy",
                "--trusted-proxy",
                "::1",
                "--proxy-header-timeout",
                "0",
            ],
            "proxy-header-timeout (--proxy-header-timeout) must be greater than zero",
        ),
        (
            vec![
                "relay",
                "--listen",
                "127.0.0.1:47001",
                "--upstream",
                "127.0.0.1:47001",
            ],
            "upstream (--upstream) 127.0.0.1:47001 is this relay's own listen address",
        ),
        (
            vec![
                "relay",
                "--listen",
                "0.0.0.0:47002",
                "--upstream",
                "127.0.0.1:47002",
            ],
            "upstream (--upstream) 127.0.0.1:47002 is this relay's own listen address",
        ),
        (
            vec!["relay", "--upstream", "db.svc", "--resolve-interval", "5"],
            "invalid address 'db.svc': expected HOST:PORT",
        ),
        (
            vec![
                "relay",
                "--upstream",
                "127.0.0.1:6379",
                "--resolve-interval",
                "soon",
            ],
            "--resolve-interval: invalid duration 'soon'",
        ),
        (
            vec![
                "relay",
                "--upstream",
                "127.0.0.1:6379",
                "--resolve-interval",
                "5ms",
            ],
            "resolve-interval (--resolve-interval) 5ms: at least 10ms, or off",
        ),
        (
            vec![
                "relay",
                "--upstream",
                "db.svc:6379",
                "--hosts-file",
                "/nonexistent/hosts",
            ],
            "hosts-file (--hosts-file): read /nonexistent/hosts: No such file or directory",
        ),
    ] {
        let out = edgepoll().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(expect), "{args:?}: {err}");
    }
}

#[test]
fn keepalive_values_the_kernel_would_refuse_stop_the_start_with_exactly_one_line() {
    let relay = ["relay", "--upstream", "127.0.0.1:6379"];
    for (args, expect) in [
        (
            vec!["echo", "--tcp-keepalive", "60:10"],
            "--tcp-keepalive: invalid keepalive '60:10': expected IDLE:INTERVAL:COUNT such as 60s:10s:6, or off",
        ),
        (
            vec!["echo", "--tcp-keepalive", "60s:10s:many"],
            "--tcp-keepalive: invalid keepalive '60s:10s:many': COUNT 'many' is not a whole number of probes; expected IDLE:INTERVAL:COUNT such as 60s:10s:6, or off",
        ),
        (
            vec!["echo", "--tcp-keepalive", "0:10:6"],
            "tcp-keepalive (--tcp-keepalive): IDLE must be whole seconds from 1 to 32767 (TCP_KEEPIDLE), got 0ns",
        ),
        (
            vec!["http", "--tcp-keepalive", "60:10h:6"],
            "tcp-keepalive (--tcp-keepalive): INTERVAL must be whole seconds from 1 to 32767 (TCP_KEEPINTVL), got 36000s",
        ),
        (
            vec!["echo", "--tcp-keepalive", "500ms:10s:6"],
            "tcp-keepalive (--tcp-keepalive): IDLE must be whole seconds from 1 to 32767 (TCP_KEEPIDLE), got 500ms",
        ),
        (
            [&relay[..], &["--tcp-keepalive", "60:10:128"]].concat(),
            "tcp-keepalive (--tcp-keepalive): COUNT must be from 1 to 127 (TCP_KEEPCNT), got 128",
        ),
        (
            vec!["echo", "--tcp-user-timeout", "0"],
            "tcp-user-timeout (--tcp-user-timeout) must be greater than zero",
        ),
        (
            vec!["echo", "--tcp-user-timeout", "30d"],
            "--tcp-user-timeout: invalid duration '30d': unknown unit 'd' (use ms, s, m or h)",
        ),
        (
            vec!["echo", "--tcp-user-timeout", "600h"],
            "tcp-user-timeout (--tcp-user-timeout) must be whole milliseconds up to 2147483647ms (TCP_USER_TIMEOUT), got 2160000s",
        ),
    ] {
        let out = edgepoll().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err, format!("edgepoll: {expect}\n"), "{args:?}");
    }
}

#[test]
fn the_start_up_log_says_what_keepalive_each_kind_of_socket_gets() {
    // The log's lines, each within PATIENCE, so a missing line fails the test rather
    // than hanging it.
    let log = |args: &str| {
        let (running, lines) = spawn_with_nofile(1024, args);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        (running, move || {
            rx.recv_timeout(PATIENCE).expect("a log line")
        })
    };
    let (running, mut next) = log(
        "relay --listen 127.0.0.1:0 --metrics-listen off --workers 1 --upstream 127.0.0.1:6399 --tcp-keepalive 2m:15s:4 --tcp-user-timeout 30s",
    );
    let relaying = std::iter::repeat_with(&mut next)
        .find(|l| l.contains("relaying to"))
        .unwrap();
    assert!(
        relaying.ends_with(
            "(round-robin, connect timeout 5s, 1 try per client, keepalive 120s:15s:4, user timeout 30s)"
        ),
        "{relaying}"
    );
    let clients = next();
    assert!(
        clients.ends_with("client sockets: TCP keepalive 120s:15s:4, user timeout 30s"),
        "{clients}"
    );
    drop(running);
    // The default: upstreams probed, clients left as the kernel has them.
    let (running, mut next) = log(
        "relay --listen 127.0.0.1:0 --metrics-listen off --workers 1 --upstream 127.0.0.1:6399",
    );
    let relaying = std::iter::repeat_with(&mut next)
        .find(|l| l.contains("relaying to"))
        .unwrap();
    assert!(relaying.ends_with(", keepalive 60s:10s:6)"), "{relaying}");
    drop(running);
}

#[test]
fn a_taken_port_is_reported_with_the_address_and_exit_1() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap().to_string();
    let out = edgepoll()
        .args(["echo", "--listen", &addr, "--metrics-listen", "off"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("bind {addr}: Address already in use")),
        "{err}"
    );
}

/// Starts the binary on ephemeral ports and returns it with the addresses its
/// start-up line names.
fn spawn_server(extra: &[&str]) -> (Running, SocketAddr, Option<SocketAddr>) {
    let mut child = edgepoll()
        .args(["echo", "--listen", "127.0.0.1:0", "--workers", "2"])
        .args(extra)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let line = lines
        .by_ref()
        .map(|l| l.unwrap())
        .find(|l| l.contains(" listening on "))
        .expect("a start-up line");
    std::thread::spawn(move || lines.for_each(drop));
    let after = line.split(" listening on ").nth(1).unwrap();
    let listen: SocketAddr = after.split(' ').next().unwrap().parse().unwrap();
    assert!(line.contains("with 2 workers"), "{line}");
    let metrics = line
        .split("metrics on http://")
        .nth(1)
        .map(|m| m.trim_end_matches("/metrics").parse().unwrap());
    (Running(child), listen, metrics)
}

#[test]
fn sigterm_drains_owed_bytes_and_exits_0() {
    let (mut child, addr, metrics) =
        spawn_server(&["--metrics-listen", "127.0.0.1:0", "--drain-timeout", "10"]);
    let metrics = metrics.expect("the start-up line names the metrics address");
    assert_eq!(http_get(metrics, "/readyz").0, 200);

    let mut client = connect(addr);
    let data = pattern(11, 0, 512 * 1024);
    client.write_all(&data).unwrap();
    // Let the server read what it can before the signal.
    std::thread::sleep(Duration::from_millis(200));

    let pid = child.0.id();
    kill(pid, "-TERM");
    let (back, eof) = read_to_end(&mut client);
    assert!(eof, "clean end after the last owed byte");
    assert_same(&data, &back);
    drop(client);
    let status = child.0.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

/// `--shutdown-delay`: on SIGTERM `/readyz` turns 503 at once while new connections
/// are still accepted and served for the delay; then the drain closes the port.
#[test]
fn shutdown_delay_keeps_accepting_while_readyz_is_503() {
    let (mut child, addr, metrics) =
        spawn_server(&["--metrics-listen", "127.0.0.1:0", "--shutdown-delay", "2"]);
    let metrics = metrics.expect("the start-up line names the metrics address");
    assert_eq!(http_get(metrics, "/readyz").0, 200);
    let mut before = connect(addr);
    echo_roundtrip(&mut before, b"before");

    let signalled = std::time::Instant::now();
    let pid = child.0.id();
    kill(pid, "-TERM");
    wait_for("/readyz to turn 503", || {
        http_get(metrics, "/readyz").0 == 503
    });
    // A load balancer that has not noticed yet still gets served, and so does the
    // connection that was open.
    let mut late = connect(addr);
    echo_roundtrip(&mut late, b"still accepted during the delay");
    echo_roundtrip(&mut before, b"still served");
    assert!(
        signalled.elapsed() < Duration::from_millis(1500),
        "the checks above ran inside the delay"
    );
    drop((before, late));
    // A reload asked for while shutting down is not one: the process goes on stopping.
    kill(pid, "-HUP");

    wait_for("the drain to close the port", || {
        std::net::TcpStream::connect(addr).is_err()
    });
    assert!(
        signalled.elapsed() >= Duration::from_secs(2),
        "not before the delay"
    );
    assert_eq!(child.0.wait().unwrap().code(), Some(0));
}

#[test]
fn pin_workers_puts_worker_i_on_core_i() {
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    if cores.is_empty() {
        eprintln!("skipped: the usable cores are unknown here");
        return;
    }
    let (child, addr, _) = spawn_server(&["--pin-workers", "--metrics-listen", "off"]);
    // One connection per worker (round-robin): each has run, so each has pinned itself.
    for _ in 0..2 {
        echo_roundtrip(&mut connect(addr), b"pinned");
    }
    for worker in 0..2 {
        let name = format!("edgepoll-w{worker}");
        let task = std::fs::read_dir(format!("/proc/{}/task", child.0.id()))
            .unwrap()
            .flatten()
            .find(|t| {
                std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name)
            })
            .expect("the worker thread exists");
        let status = std::fs::read_to_string(task.path().join("status")).unwrap();
        let allowed = status
            .lines()
            .find(|l| l.starts_with("Cpus_allowed_list:"))
            .unwrap();
        let core = cores[worker % cores.len()].id.to_string();
        assert_eq!(
            allowed.split_whitespace().nth(1),
            Some(core.as_str()),
            "{name}: {allowed}"
        );
    }
}

#[test]
fn a_low_open_file_limit_lowers_max_connections_and_says_so() {
    let (running, mut lines) = spawn_with_nofile(
        256,
        "echo --listen 127.0.0.1:0 --metrics-listen off --workers 2 --max-connections 5000",
    );
    let warning = lines
        .by_ref()
        .map(|l| l.unwrap())
        .find(|l| l.contains("open-file limit"))
        .expect("a line about the open-file limit");
    // 256 descriptors, less 64 reserved and 2 per worker.
    assert!(
        warning.contains("open-file limit is 256: --max-connections lowered from 5000 to 188"),
        "{warning}"
    );
    drop(running);
}

#[test]
fn a_worker_whose_event_loop_dies_stops_the_process_with_status_1() {
    let mut child = edgepoll()
        .args(["echo", "--listen", "127.0.0.1:0", "--workers", "2"])
        .args(["--drain-timeout", "5", "--metrics-listen", "off"])
        .env("RUST_LOG", "info")
        .env("EDGEPOLL_TEST_FAIL_WORKER", "1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut child = Running(child);
    let log = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<String>>()
    });
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "the process kept running with a dead worker"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = log.join().unwrap().join("\n");
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("worker 1 stopped: injected worker failure"),
        "{log}"
    );
    assert!(log.contains("exiting with status 1"), "{log}");
}

#[test]
fn the_metrics_endpoints_clients_are_kept_back_from_max_connections() {
    let (running, mut lines) = spawn_with_nofile(
        1024,
        "echo --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --workers 2 --max-connections 5000",
    );
    let warning = lines
        .by_ref()
        .map(|l| l.unwrap())
        .find(|l| l.contains("open-file limit"))
        .expect("a line about the open-file limit");
    // 1024 descriptors, less 64 reserved, 2 per worker and 512 for metrics clients.
    assert_eq!(edgepoll::metrics::endpoint::MAX_CLIENTS, 512);
    assert!(
        warning.contains("open-file limit is 1024: --max-connections lowered from 5000 to 444"),
        "{warning}"
    );
    drop(running);
}
