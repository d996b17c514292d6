//! Replays the fuzz targets' checked-in seed corpora as a regular test, with the same
//! property the fuzz target checks: no panic, and the same answer however the input is
//! split between two reads.

use edgepoll::config::HttpConfig;
use edgepoll::mode::http::{feed_all, Responder};

#[test]
fn the_http_seed_corpus_answers_the_same_at_every_split() {
    let config = HttpConfig {
        max_header_bytes: 1024,
        ..HttpConfig::default()
    };
    let responder = Responder::new(&config);
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz/corpus/http_request");
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        let input = &data[1..];
        let whole = feed_all(&responder, &[input]);
        for split in 0..=input.len() {
            let parts = feed_all(&responder, &[&input[..split], &input[split..]]);
            assert_eq!(whole, parts, "split at {split}");
        }
        files += 1;
    }
    assert!(files >= 10, "the corpus is there");
}

#[test]
fn the_http_response_seed_corpus_parses_the_same_at_every_split() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz/corpus/http_response");
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        let input = &data[1..];
        let whole = edgepoll::load::http::parse_all(&[input]);
        for split in 0..=input.len() {
            let parts = edgepoll::load::http::parse_all(&[&input[..split], &input[split..]]);
            assert_eq!(whole, parts, "split at {split}");
        }
        files += 1;
    }
    assert!(files >= 5, "the corpus is there");
}

#[test]
fn the_proxy_v2_seed_corpus_round_trips() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz/corpus/proxy_v2");
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        edgepoll::mode::proxy::check(&data);
        // Every prefix too: truncated input must not panic the reader either.
        for cut in 0..data.len() {
            edgepoll::mode::proxy::check(&data[..cut]);
        }
        files += 1;
    }
    assert!(files >= 10, "the corpus is there");
}
