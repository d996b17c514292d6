//! Fuzzes the HTTP request handler: arbitrary bytes, split at an arbitrary point as two
//! reads would split them, must never panic, never consume more than it was given, and
//! must give the same answer however the input is split.
#![no_main]

use edgepoll::config::HttpConfig;
use edgepoll::mode::http::{feed_all, Responder};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let config = HttpConfig {
        max_header_bytes: 1024,
        ..HttpConfig::default()
    };
    let responder = Responder::new(&config);
    let split = data[0] as usize % data.len();
    let input = &data[1..];
    let whole = feed_all(&responder, &[input]);
    let split = split.min(input.len());
    let parts = feed_all(&responder, &[&input[..split], &input[split..]]);
    assert_eq!(
        whole, parts,
        "the answer depends on where the input was split"
    );
});
