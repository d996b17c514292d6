//! Replays the fuzz targets' checked-in seed corpora as a regular test, with the same
//! property the fuzz target checks: no panic, and the same answer however the input is
//! split between two reads.

use edgepoll::config::HttpConfig;
use edgepoll::mode::http::{feed_all, Responder};

/// The seed inputs of fuzz target `target`, checked in under tests/fuzz/corpus.
fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz/corpus")
        .join(target);
    std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| std::fs::read(entry.unwrap().path()).unwrap())
        .collect()
}

#[test]
fn the_http_seed_corpus_answers_the_same_at_every_split() {
    let config = HttpConfig {
        max_header_bytes: 1024,
        ..HttpConfig::default()
    };
    let responder = Responder::new(&config);
    let seeds = corpus("http_request");
    assert!(seeds.len() >= 10, "the corpus is there");
    for data in &seeds {
        let input = &data[1..];
        let whole = feed_all(&responder, &[input]);
        for split in 0..=input.len() {
            let parts = feed_all(&responder, &[&input[..split], &input[split..]]);
            assert_eq!(whole, parts, "split at {split}");
        }
    }
}

#[test]
fn the_http_response_seed_corpus_parses_the_same_at_every_split() {
    let seeds = corpus("http_response");
    assert!(seeds.len() >= 5, "the corpus is there");
    for data in &seeds {
        let input = &data[1..];
        let whole = edgepoll::load::http::parse_all(&[input]);
        for split in 0..=input.len() {
            let parts = edgepoll::load::http::parse_all(&[&input[..split], &input[split..]]);
            assert_eq!(whole, parts, "split at {split}");
        }
    }
}

#[test]
fn the_proxy_v2_seed_corpus_round_trips() {
    let seeds = corpus("proxy_v2");
    assert!(seeds.len() >= 10, "the corpus is there");
    for data in &seeds {
        edgepoll::mode::proxy::check(data);
        // Every prefix too: truncated input must not panic the reader either.
        for cut in 0..data.len() {
            edgepoll::mode::proxy::check(&data[..cut]);
        }
    }
}

#[test]
fn the_proxy_header_seed_corpus_holds_the_readers_properties() {
    let seeds = corpus("proxy_header");
    assert!(seeds.len() >= 20, "the corpus is there");
    for data in &seeds {
        // check() tries every prefix itself.
        edgepoll::mode::proxy::inbound::check(data);
    }
}
