//! Idle connections cost almost nothing in user space. Alone in its own test binary so
//! that no other test's allocations move the resident-set figure.

mod util;

use std::net::TcpStream;

use edgepoll::sys::rlimit;
use util::*;

#[test]
fn thousands_of_idle_connections_stay_under_a_kilobyte_each() {
    // Client and server share this process: two descriptors per connection.
    let (soft, hard) = rlimit::nofile().unwrap();
    if soft < hard {
        rlimit::set_nofile_soft(hard).unwrap();
    }
    let n = (((hard.min(20_000) as usize).saturating_sub(200)) / 2).min(5_000);
    assert!(
        n >= 400,
        "the open-file limit ({hard}) is too low for this test"
    );
    let server = echo_server(1, |c| {
        c.idle_timeout = Some(std::time::Duration::from_secs(600))
    });
    let addr = server.local_addr();
    // Warm up allocator arenas and thread stacks, then measure.
    let warm: Vec<TcpStream> = (0..100).map(|_| connect(addr)).collect();
    wait_for("warm-up connections", || server.open_connections() == 100);
    drop(warm);
    wait_for("warm-up closes", || server.open_connections() == 0);

    let mut clients = Vec::with_capacity(n);
    let before = resident_bytes();
    for _ in 0..n {
        clients.push(TcpStream::connect(addr).unwrap());
    }
    wait_for("every idle connection to be registered", || {
        server.open_connections() == n
    });
    wait_for("the active gauge", || server.stats()[0].active == n as i64);
    let grown = resident_bytes().saturating_sub(before);
    let per_conn = grown / n as u64;
    eprintln!("{n} idle connections: resident set grew {grown} bytes, {per_conn} per connection (client side included)");
    // The server's share is a 48-byte slot and an 8-byte timer entry; the bound leaves
    // room for the client's TcpStream and allocator slack, and fails loudly if a
    // connection ever gets its own buffer (4 KiB or more).
    assert!(per_conn < 1024, "{per_conn} bytes per idle connection");
    // And they all still work.
    let mut last = clients.pop().unwrap();
    last.set_read_timeout(Some(PATIENCE)).unwrap();
    echo_roundtrip(&mut last, b"still here");
}
