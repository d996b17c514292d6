//! Fuzzes the PROXY v1 and v2 header reader of `--accept-proxy`: arbitrary bytes must
//! never make it panic or claim more than it was given; its answers must be monotonic
//! (a prefix it refuses is refused whole, a header it reads is the same header however
//! many bytes follow); and addresses written as a v2 header or a v1 line must read back
//! as themselves (see `edgepoll::mode::proxy::inbound::check`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    edgepoll::mode::proxy::inbound::check(data);
});
