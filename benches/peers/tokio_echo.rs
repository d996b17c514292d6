//! The tokio echo server the benchmarks compare edgepoll against: the idiomatic one,
//! a task per connection with a 16 KiB buffer, on a multi-thread runtime with the
//! same number of workers as edgepoll.
//!
//!     tokio_echo ADDR WORKERS        prints "listening on ADDR" and serves until killed

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:0".into());
    let workers: usize = args.next().and_then(|w| w.parse().ok()).unwrap_or(1);
    if addr == "--bench" {
        return; // `cargo bench` runs every bench target; this one is a program.
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_io()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async move {
        let listener = TcpListener::bind(&addr).await.expect("bind");
        println!("listening on {}", listener.local_addr().unwrap());
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                continue;
            };
            let _ = socket.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if socket.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
}
