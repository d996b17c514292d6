//! The configuration file over the real binary: `edgepoll --config FILE` serves what
//! the file says, a flag overrides the file, and `edgepoll check` accepts a valid file
//! and refuses an invalid one with status 2 and the key named.

mod util;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use util::*;

fn edgepoll() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edgepoll"))
}

/// A configuration file in a directory of this test process, removed on drop.
struct ConfigFile(PathBuf);

impl ConfigFile {
    fn new(name: &str, text: &str) -> ConfigFile {
        let dir = std::env::temp_dir().join(format!("edgepoll-config-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        ConfigFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs `edgepoll ARGS` and returns it with its start-up line, once it has logged it.
fn start(args: &[&str]) -> (Running, String) {
    let mut child = edgepoll()
        .args(args)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let running = Running(child);
    let mut seen = Vec::new();
    let line = loop {
        match lines.next() {
            Some(Ok(l)) if l.contains(" listening on ") => break l,
            Some(Ok(l)) => seen.push(l),
            _ => panic!(
                "{args:?}: no start-up line; the log was:\n{}",
                seen.join("\n")
            ),
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    (running, line)
}

/// The one listening address a start-up line names.
fn listening_on(line: &str) -> SocketAddr {
    let after = line.split(" listening on ").nth(1).unwrap();
    after.split(' ').next().unwrap().parse().unwrap()
}

fn check(file: &ConfigFile) -> Output {
    edgepoll()
        .args(["check", "--config", file.path()])
        .output()
        .unwrap()
}

#[test]
fn a_file_alone_starts_its_mode_on_its_address_and_serves_bytes() {
    // 127.0.0.2 is loopback too, and no default: the address came from the file.
    let file = ConfigFile::new(
        "echo.toml",
        "mode = \"echo\"\nlisten = \"127.0.0.2:0\"\nworkers = 3\nmetrics-listen = \"off\"\n",
    );
    let (_running, line) = start(&["--config", file.path()]);
    assert!(line.contains(" echo: "), "{line}");
    assert!(line.contains("with 3 workers; metrics off"), "{line}");
    let addr = listening_on(&line);
    assert_eq!(addr.ip().to_string(), "127.0.0.2", "{line}");
    let mut client = connect(addr);
    echo_roundtrip(&mut client, &pattern(1, 0, 64 * 1024));
}

#[test]
fn a_flag_overrides_the_file_and_the_file_fills_in_the_rest() {
    let file = ConfigFile::new(
        "override.toml",
        "mode = \"echo\"\nlisten = \"127.0.0.2:0\"\nworkers = 3\nmetrics-listen = \"off\"\n",
    );
    let (_running, line) = start(&["echo", "--config", file.path(), "--listen", "127.0.0.3:0"]);
    let addr = listening_on(&line);
    assert_eq!(addr.ip().to_string(), "127.0.0.3", "{line}");
    assert!(
        !line.contains("127.0.0.2"),
        "the file's address is replaced: {line}"
    );
    assert!(line.contains("with 3 workers"), "{line}");
    echo_roundtrip(&mut connect(addr), b"the flag's address");
}

#[test]
fn check_accepts_a_valid_file_and_says_what_it_would_run() {
    let body = ConfigFile::new("index.html", "<p>hello</p>");
    let file = ConfigFile::new(
        "valid.toml",
        r#"
        mode = "http"
        listen = ["127.0.0.1:8080", "[::1]:8080"]
        workers = 2
        max-pending-bytes = "256KiB"
        idle-timeout = "5m"
        drain-timeout = 20
        tcp-keepalive = "2m:20s:5"
        tcp-user-timeout = "30s"
        metrics-listen = "127.0.0.1:9464"
        body-file = "index.html"
        header = ["Cache-Control: no-store"]
        "#,
    );
    let out = check(&file);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        stdout.starts_with(&format!(
            "edgepoll: configuration {} is valid (http, 2 listeners on 127.0.0.1:8080, [::1]:8080, 2 workers, ",
            file.path()
        )),
        "{stdout}"
    );
    assert!(stdout.contains("metrics on 127.0.0.1:9464)"), "{stdout}");
    drop(body);
}

#[test]
fn the_proxy_keys_of_a_file_make_the_binary_read_proxy_headers() {
    let file = ConfigFile::new(
        "proxy.toml",
        r#"
        mode = "echo"
        listen = "127.0.0.1:0"
        metrics-listen = "off"
        accept-proxy = true
        trusted-proxy = ["192.0.2.0/24", "127.0.0.0/8"]
        proxy-header-timeout = "2s"
        "#,
    );
    let out = check(&file);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        stdout.contains(", PROXY headers from 192.0.2.0/24, 127.0.0.0/8)"),
        "{stdout}"
    );
    let (_running, line) = start(&["--config", file.path()]);
    let mut client = connect(listening_on(&line));
    client
        .write_all(b"PROXY TCP4 198.51.100.4 192.0.2.1 5000 7000\r\n")
        .unwrap();
    echo_roundtrip(&mut client, b"through the header");
    // Without trusted-proxy the file is refused, naming both keys.
    let lone = ConfigFile::new("lone.toml", "mode = \"echo\"\naccept-proxy = true\n");
    let out = check(&lone);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("accept-proxy (--accept-proxy) needs at least one trusted-proxy"),
        "{err}"
    );
}

#[test]
fn check_refuses_an_invalid_file_with_status_2_and_names_the_key() {
    for (text, key, reason) in [
        (
            "mode = \"echo\"\nwrokers = 4\n",
            "key wrokers",
            "unknown field",
        ),
        (
            "mode = \"echo\"\nmax-pending-bytes = \"12XB\"\n",
            "key max-pending-bytes",
            "invalid size '12XB'",
        ),
        (
            "mode = \"echo\"\nidle-timeout = \"5 days\"\n",
            "key idle-timeout",
            "invalid duration '5 days'",
        ),
        (
            "mode = \"echo\"\nlisten = [\"127.0.0.1:7000\", \"7000\"]\n",
            "key listen",
            "invalid address '7000'",
        ),
        (
            "mode = \"echo\"\nworkers = 0\n",
            "workers (--workers)",
            "must be between 1 and 1024, got 0",
        ),
        (
            "mode = \"echo\"\nworkers = \"four\"\n",
            "key workers",
            "invalid type: string \"four\"",
        ),
        (
            "mode = \"echo\"\nupstream = \"127.0.0.1:6379\"\n",
            "key upstream",
            "only relay mode has this key",
        ),
        (
            "mode = \"echo\"\nmax-pending-bytes = \"2GiB\"\n",
            "max-pending-bytes (--max-pending-bytes)",
            "must be at most 1GiB",
        ),
        (
            "mode = \"echo\"\nlisten = \"127.0.0.1:7000\"\nmetrics-listen = \"127.0.0.1:7000\"\n",
            "metrics-listen (--metrics-listen)",
            "is also a listen address",
        ),
        (
            "mode = \"echo\"\ntcp-keepalive = \"60s:10s\"\n",
            "key tcp-keepalive",
            "invalid keepalive '60s:10s': expected IDLE:INTERVAL:COUNT such as 60s:10s:6, or off",
        ),
        (
            "mode = \"echo\"\ntcp-keepalive = \"60:10:0\"\n",
            "tcp-keepalive (--tcp-keepalive)",
            "COUNT must be from 1 to 127 (TCP_KEEPCNT), got 0",
        ),
        (
            "mode = \"echo\"\ntcp-user-timeout = \"0.5ms\"\n",
            "tcp-user-timeout (--tcp-user-timeout)",
            "must be whole milliseconds up to 2147483647ms (TCP_USER_TIMEOUT), got 500µs",
        ),
        ("workers = 2\n", "no mode key", "add mode = \"echo\""),
        (
            "mode = \"relay\"\n",
            "upstream (--upstream)",
            "at least one",
        ),
        (
            "mode = \"relay\"\nupstream = \"db.svc:6379\"\nhosts-file = \"missing-hosts\"\n",
            "hosts-file (--hosts-file): read ",
            "missing-hosts: No such file",
        ),
        (
            "mode = \"relay\"\nupstream = \"127.0.0.1:6379\"\nresolve-interval = \"1ms\"\n",
            "resolve-interval (--resolve-interval)",
            "at least 10ms",
        ),
        (
            "mode = \"relay\"\nupstream = \"127.0.0.1:6379\"\nresolve-interval = \"soon\"\n",
            "key resolve-interval",
            "invalid duration 'soon'",
        ),
        (
            "mode = \"http\"\nbody-file = \"missing.html\"\n",
            "body-file (--body-file)",
            "No such file",
        ),
    ] {
        let file = ConfigFile::new("invalid.toml", text);
        let out = check(&file);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text:?}: {err}");
        assert!(out.stdout.is_empty(), "{text:?}: nothing on stdout");
        assert!(err.starts_with("edgepoll: "), "{text:?}: {err}");
        assert!(err.contains(key) && err.contains(reason), "{text:?}: {err}");
        if key.starts_with("key ") {
            // The place is the file and the key's line.
            let place = format!("{}:{}: {key}", file.path(), text.lines().count());
            assert!(err.contains(&place), "{text:?}: {err}");
        }
    }
}

#[test]
fn the_subcommand_and_the_files_mode_must_agree() {
    let file = ConfigFile::new("mode.toml", "mode = \"echo\"\n");
    let out = edgepoll()
        .args(["http", "--config", file.path()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("the subcommand is http but") && err.contains("has mode = \"echo\""),
        "{err}"
    );
}

#[test]
fn check_without_a_file_and_a_missing_file_are_usage_errors() {
    let out = edgepoll().arg("check").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("edgepoll check --config FILE"), "{err}");
    let out = edgepoll()
        .args(["check", "--config", "/nonexistent/edgepoll.toml"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("/nonexistent/edgepoll.toml: No such file"),
        "{err}"
    );
}

#[test]
fn the_example_file_in_deploy_is_valid() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/edgepoll.toml");
    let out = edgepoll()
        .args(["check", "--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        stdout.contains("is valid (echo, 1 listener on 0.0.0.0:7000, "),
        "{stdout}"
    );
    assert!(stdout.contains("metrics on 0.0.0.0:9464)"), "{stdout}");
}
