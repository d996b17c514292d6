//! Fuzzes edgeload's HTTP response parser: arbitrary bytes, split at an arbitrary
//! point, must never panic, never consume more than given, and give the same
//! responses however the input is split.
#![no_main]

use edgepoll::load::http::parse_all;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let input = &data[1..];
    let split = (data[0] as usize).min(input.len());
    let whole = parse_all(&[input]);
    let parts = parse_all(&[&input[..split], &input[split..]]);
    assert_eq!(whole, parts, "the responses depend on where the input was split");
});
