//! Review 2, in its own binary because it measures the process's CPU time: a failed
//! relayed pair polling its healthy socket's send queue (TIOCOUTQ) each tick of a
//! fine wheel (10 ms tick from a 100 ms connect timeout) costs no CPU to speak of.

mod util;

use std::net::Shutdown;
use std::time::{Duration, Instant};

use util::*;

#[test]
fn failed_pair_waiting_on_a_kernel_send_queue_costs_no_cpu() {
    use std::os::fd::AsFd;
    let mut pairs = Vec::new();
    let mut threads = Vec::new();
    let mut servers = Vec::new();
    for i in 0..20 {
        // 256 KiB fits in the kernel buffers: everything is forwarded, and the pair
        // waits on TIOCOUTQ for the client, who never reads.
        let (up, t) = upstream_once(move |s| {
            let mut w = &s;
            std::io::Write::write_all(&mut w, &pattern(50 + i, 0, 256 << 10)).unwrap();
            std::thread::sleep(Duration::from_millis(100));
            edgepoll::sys::socket::set_linger_zero(s.as_fd()).unwrap();
        });
        threads.push(t);
        let relay = relay_server(1, vec![up], |c| {
            c.relay.connect_timeout = Duration::from_millis(100);
        });
        let client = connect(relay.local_addr());
        client.shutdown(Shutdown::Write).unwrap();
        pairs.push(client);
        servers.push(relay);
    }
    for t in threads {
        t.join().unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    let before = process_cpu_time();
    let wall = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let used = process_cpu_time() - before;
    let share = used.as_secs_f64() / wall.elapsed().as_secs_f64();
    assert!(
        share < 0.05,
        "{:.1}% of a core while 20 failed pairs wait",
        share * 100.0
    );
}
