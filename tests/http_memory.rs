//! Issue 14, item 2: http output is bounded by `--max-pending-bytes` and
//! `--max-buffered-bytes` however many requests one read holds. Alone in its own test
//! binary so that no other test's allocations move the resident-set figure.

mod util;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use util::*;

/// `--max-pending-bytes`: what one connection may hold for a peer that does not read.
const CAP: usize = 256 * 1024;
/// `--max-buffered-bytes`: what all connections together may hold.
const GLOBAL_CAP: usize = 1024 * 1024;
/// Response body size.
const BODY: usize = 16 * 1024;
/// One whole response: the body and a head well under 256 bytes. A connection may
/// finish the response it has begun past its cap, so this is the stated slack per
/// connection.
const RESPONSE: usize = BODY + 256;
const CLIENTS: usize = 4;
/// One burst per client: as many whole pipelined requests as fit in 64 KiB, the
/// worker's read size (each answered by a 16 KiB response if nothing stops it).
const BURST: usize = 64 * 1024;
/// What the server's output may hold: every connection at its cap plus one response.
const BOUND: usize = CLIENTS * (CAP + RESPONSE);
/// Resident-set slack beyond `BOUND` for everything else that may grow meanwhile
/// (allocator arenas, the worker's scratch space, the unparsed rest of each burst kept
/// while its connection is paused): generous, and still far below one connection's
/// unbounded output (2,427 responses, about 40 MB).
const RESIDENT_SLACK: u64 = 8 << 20;

#[test]
fn four_pipelining_clients_that_never_read_hold_the_output_to_the_caps() {
    let server = http_server(1, |c| {
        c.http.body = vec![b'x'; BODY];
        c.max_pending_bytes = CAP;
        c.max_buffered_bytes = GLOBAL_CAP;
    });
    let addr = server.local_addr();
    // Warm up: the worker's buffers and a response path exist before the baseline.
    let mut warm = connect(addr);
    warm.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .unwrap();
    let (_, clean) = read_to_end(&mut warm);
    assert!(clean);
    drop(warm);

    const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    let burst = REQUEST.repeat(BURST / REQUEST.len());
    let before = resident_bytes();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let mut c = connect(addr);
            c.write_all(&burst).unwrap();
            c
        })
        .collect();
    let mut peak_buffered = 0i64;
    let mut peak_resident = before;
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(2500) {
        peak_buffered = peak_buffered.max(server.buffered_bytes());
        peak_resident = peak_resident.max(resident_bytes());
        std::thread::sleep(Duration::from_millis(10));
    }
    let grown = peak_resident.saturating_sub(before);
    eprintln!(
        "{CLIENTS} clients x {} pipelined requests: peak buffered {peak_buffered} bytes, \
         resident set grew {grown} bytes (bound {BOUND} + {RESIDENT_SLACK})",
        burst.len() / REQUEST.len()
    );
    assert!(
        peak_buffered as usize <= BOUND,
        "the server held {peak_buffered} bytes of output; caps allow {BOUND}"
    );
    assert!(
        grown <= BOUND as u64 + RESIDENT_SLACK,
        "the resident set grew {grown} bytes; caps allow {BOUND} plus {RESIDENT_SLACK}"
    );
    // The clients are served once they read: the first response is whole.
    for mut c in clients {
        let mut first = vec![0u8; 64];
        c.read_exact(&mut first).unwrap();
        assert!(first.starts_with(b"HTTP/1.1 200 OK\r\n"));
    }
}
