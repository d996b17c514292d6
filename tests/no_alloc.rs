//! The echo hot path allocates nothing per message in steady state. A counting global
//! allocator sees every allocation in this process (server and client threads alike).

mod util;

use std::io::{Read, Write};

use edgepoll::sys::alloc::Counting;
use util::*;

#[global_allocator]
static GLOBAL: Counting = Counting::new();

#[test]
fn ten_thousand_echoes_allocate_nothing() {
    const MESSAGES: u64 = 10_000;
    let server = echo_server(1, |_| {});
    let mut conns: Vec<_> = (0..4).map(|_| connect(server.local_addr())).collect();
    let mut buf = [0u8; 256];
    let msg = [42u8; 256];
    // Warm up: every connection registered, buffers and metrics children touched.
    for c in conns.iter_mut() {
        for _ in 0..100 {
            c.write_all(&msg).unwrap();
            c.read_exact(&mut buf).unwrap();
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(300));

    let before = GLOBAL.allocations();
    for i in 0..MESSAGES {
        let c = &mut conns[(i % 4) as usize];
        c.write_all(&msg).unwrap();
        c.read_exact(&mut buf).unwrap();
    }
    let allocations = GLOBAL.allocations() - before;
    eprintln!("{MESSAGES} echoed messages: {allocations} allocations in the whole process");
    // Anything proportional to the messages would be thousands; allow a handful for
    // whatever the runtime does on its own (a publish, a timer).
    assert!(
        allocations < 20,
        "{allocations} allocations for {MESSAGES} messages"
    );
    assert_eq!(buf, msg);
}
