//! Opens N idle connections to ADDR and holds them until its standard input closes,
//! for the memory-per-idle-connection benchmark (benches/idle_memory.sh).
//!
//!     idle_clients ADDR N            prints "holding N" once all are connected

use std::io::Read;
use std::net::TcpStream;

fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_default();
    if addr == "--bench" || addr.is_empty() {
        return; // `cargo bench` runs every bench target; this one is a program.
    }
    let n: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(10_000);
    let (soft, hard) = edgepoll::sys::rlimit::nofile().expect("getrlimit");
    if soft < hard {
        edgepoll::sys::rlimit::set_nofile_soft(hard).expect("setrlimit");
    }
    let conns: Vec<TcpStream> = (0..n)
        .map(|i| TcpStream::connect(&addr).unwrap_or_else(|e| panic!("connection {i}: {e}")))
        .collect();
    println!("holding {}", conns.len());
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
}
