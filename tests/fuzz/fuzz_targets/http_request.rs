//! Fuzzes the HTTP request handler: arbitrary bytes, split at an arbitrary point as two
//! reads would split them, must never panic, never consume more than it was given, and
//! must give the same answer however the input is split. Answered within a small
//! output room (as backpressure answers a client that does not read), every call's
//! output stays within the room plus one response, and the answers add up to the
//! same bytes.
#![no_main]

use edgepoll::config::HttpConfig;
use edgepoll::mode::http::{feed_all, Responder, Session};
use libfuzzer_sys::fuzz_target;

/// A keep-alive response to HTTP/1.0 with a 100 Continue before it is the largest
/// answer one request gets; errors are shorter.
const ONE_RESPONSE: usize = 512;

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
    let limit = data[0] as usize + 1;
    let input = &data[1..];
    let whole = feed_all(&responder, &[input]);
    let split = split.min(input.len());
    let parts = feed_all(&responder, &[&input[..split], &input[split..]]);
    assert_eq!(
        whole, parts,
        "the answer depends on where the input was split"
    );

    let mut session = Session::default();
    let mut held = input.to_vec();
    let mut answered = Vec::new();
    let mut counts = [0u64; 6];
    loop {
        let mut out = Vec::new();
        let f = responder.feed_within(&mut session, &held, limit, &mut out, &mut counts);
        assert!(out.len() <= limit + ONE_RESPONSE, "output past the room");
        assert!(f.consumed <= held.len(), "consumed more than it was given");
        answered.extend_from_slice(&out);
        if f.close {
            break;
        }
        held.drain(..f.consumed);
        if !f.stalled {
            break;
        }
    }
    assert_eq!(whole.0, answered, "answers within the room differ");
});
