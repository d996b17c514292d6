//! The files in `deploy/` name metrics the binary actually exports: every metric in the
//! alert rules, the prometheus-adapter rule and the Grafana dashboard appears in a
//! live scrape of an edgepoll relay and an edgepoll http server (between them, every
//! family; Prometheus's own `up` is the only exception). The access log's deploy files
//! agree with each other: the logrotate snippet rotates the file the systemd unit lets
//! edgepoll write and the example configuration names, and signals the reopen.

mod util;

use std::collections::BTreeSet;
use std::time::Duration;

use edgepoll::{Config, Mode, Server};
use util::*;

/// Metric names in `text`: identifiers that start with `edgepoll_` or `process_`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let at_word_start =
            i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        let rest = &text[i..];
        if at_word_start && (rest.starts_with("edgepoll_") || rest.starts_with("process_")) {
            let len = rest
                .bytes()
                .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
                .count();
            names.insert(rest[..len].to_string());
            i += len;
        } else {
            i += 1;
        }
    }
    names
}

fn scrape(server: &Server) -> String {
    let addr = server.metrics_addr().expect("metrics endpoint");
    let (status, _, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200);
    body
}

fn server(mode: Mode, tweak: impl FnOnce(&mut Config)) -> Server {
    let mut config = Config::new(mode);
    config.listen = vec!["127.0.0.1:0".parse().unwrap()];
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    config.workers = 2;
    config.drain_timeout = Duration::from_secs(2);
    tweak(&mut config);
    Server::start(config).expect("server starts")
}

#[test]
fn every_metric_the_deploy_files_use_is_exported() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let files = [
        "prometheus/edgepoll.rules.yml",
        "kubernetes/prometheus-adapter.yaml",
        "kubernetes/hpa.yaml",
        "grafana/edgepoll.json",
    ];
    let relay = server(Mode::Relay, |c| {
        c.relay.upstreams = vec!["127.0.0.1:9".parse().unwrap()];
    });
    let http = server(Mode::Http, |_| {});
    let exported = metric_names(&(scrape(&relay) + &scrape(&http)));
    assert!(exported.contains("edgepoll_upstream_connect_errors_total"));
    assert!(exported.contains("edgepoll_http_requests_total"));
    let mut checked = 0;
    for file in files {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let used = metric_names(&text);
        assert!(!used.is_empty(), "{file} names no metric");
        for name in &used {
            assert!(
                exported.contains(name),
                "{file} uses {name}, which edgepoll does not export"
            );
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} metric uses found");
}

#[test]
fn the_name_scanner_finds_names_and_ignores_words_that_merely_contain_them() {
    let names = metric_names(
        "rate(edgepoll_sent_bytes_total[5m]) / process_max_fds{a=\"x\"} my_edgepoll_fake",
    );
    let want: BTreeSet<String> = ["edgepoll_sent_bytes_total", "process_max_fds"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(names, want);
}

fn deploy_file(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Where deploy/edgepoll.toml and deploy/logrotate/edgepoll put the access log.
const ACCESS_LOG: &str = "/var/log/edgepoll/access.log";

#[test]
fn the_logrotate_snippet_rotates_the_file_the_unit_lets_edgepoll_write() {
    let snippet = deploy_file("logrotate/edgepoll");
    let mut lines = snippet
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    assert_eq!(lines.next(), Some(format!("{ACCESS_LOG} {{").as_str()));
    let mut directives = BTreeSet::new();
    let mut script = Vec::new();
    let mut in_script = false;
    for line in lines.by_ref() {
        match line {
            "}" => break,
            "postrotate" => in_script = true,
            "endscript" => in_script = false,
            l if in_script => script.push(l),
            l => {
                directives.insert(l);
            }
        }
    }
    assert_eq!(lines.next(), None, "one block only");
    // Exactly these: `copytruncate`, say, would lose the records written between the
    // copy and the truncation, and edgepoll reopens on SIGUSR1 instead.
    let want: BTreeSet<&str> = [
        "daily",
        "rotate 14",
        "compress",
        "delaycompress",
        "missingok",
        "notifempty",
        "create 0644",
        "sharedscripts",
    ]
    .into_iter()
    .collect();
    assert_eq!(directives, want);
    assert!(
        script.contains(&"systemctl kill -s USR1 edgepoll.service"),
        "postrotate: {script:?}"
    );
    // The unit makes /var/log/edgepoll writable (ProtectSystem=strict leaves the rest
    // read-only), and the example configuration names the same file.
    let unit = deploy_file("systemd/edgepoll.service");
    let logs = unit
        .lines()
        .find_map(|l| l.strip_prefix("LogsDirectory="))
        .expect("the unit has a LogsDirectory=");
    assert_eq!(
        std::path::Path::new(ACCESS_LOG).parent(),
        Some(std::path::Path::new("/var/log").join(logs).as_path())
    );
    let toml = deploy_file("edgepoll.toml");
    assert!(
        toml.lines()
            .any(|l| l == format!("# access-log = \"{ACCESS_LOG}\"")),
        "deploy/edgepoll.toml does not name {ACCESS_LOG}"
    );
}

#[test]
fn logrotate_parses_the_snippet_where_it_is_installed() {
    let Some(logrotate) = [
        "/usr/sbin/logrotate",
        "/sbin/logrotate",
        "/usr/bin/logrotate",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists()) else {
        eprintln!("logrotate is not installed: skipped (tests/e2e/logrotate.sh needs it)");
        return;
    };
    let state =
        std::env::temp_dir().join(format!("edgepoll-logrotate-{}.state", std::process::id()));
    let out = std::process::Command::new(logrotate)
        .arg("-d")
        .arg("-s")
        .arg(&state)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/logrotate/edgepoll"
        ))
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&state);
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(!text.to_lowercase().contains("error"), "{text}");
    assert!(text.contains(ACCESS_LOG), "{text}");
}

#[test]
fn the_commented_access_log_keys_of_the_example_configuration_are_valid() {
    let keys = [
        "access-log",
        "access-log-format",
        "access-log-sample",
        "log-format",
    ];
    let mut uncommented = 0;
    let text: Vec<String> = deploy_file("edgepoll.toml")
        .lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(rest) if keys.iter().any(|k| rest.starts_with(&format!("{k} = "))) => {
                uncommented += 1;
                rest.to_owned()
            }
            _ => line.to_owned(),
        })
        .collect();
    assert_eq!(uncommented, keys.len());
    // `check` also looks for the log's directory, which this machine need not have:
    // the file's own path is kept, only its directory is this test's.
    let dir = std::env::temp_dir();
    let text: Vec<String> = text
        .into_iter()
        .map(|line| line.replace("/var/log/edgepoll/", &format!("{}/", dir.display())))
        .collect();
    let path = dir.join(format!(
        "edgepoll-deploy-access-log-{}.toml",
        std::process::id()
    ));
    std::fs::write(&path, text.join("\n")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edgepoll"))
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}
