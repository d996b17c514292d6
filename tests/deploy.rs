//! The files in `deploy/` name metrics the binary actually exports: every metric in the
//! alert rules, the prometheus-adapter rule and the Grafana dashboard appears in a
//! live scrape of an edgepoll relay and an edgepoll http server (between them, every
//! family; Prometheus's own `up` is the only exception).

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
