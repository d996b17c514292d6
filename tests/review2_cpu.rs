//! Review 2, in its own binary because it measures the process's CPU time: a failed
//! relayed pair polling its healthy socket's send queue (TIOCOUTQ) each tick of a
//! fine wheel (10 ms tick from a 100 ms connect timeout) costs no CPU to speak of.

mod util;

use std::net::Shutdown;
use std::time::{Duration, Instant};

use util::*;

fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_comm.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

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
    let before = cpu_time();
    let wall = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_time() - before;
    let share = used.as_secs_f64() / wall.elapsed().as_secs_f64();
    assert!(
        share < 0.05,
        "{:.1}% of a core while 20 failed pairs wait",
        share * 100.0
    );
}
