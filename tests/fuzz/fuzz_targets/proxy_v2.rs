//! Fuzzes the PROXY protocol v2 header writer and its reference reader: arbitrary
//! addresses must encode to a header that parses back to them, and arbitrary bytes
//! must never make the reader panic or overrun (see `edgepoll::mode::proxy::check`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    edgepoll::mode::proxy::check(data);
});
