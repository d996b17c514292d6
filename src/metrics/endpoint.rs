//! The HTTP endpoint Prometheus and load balancers talk to: `/metrics`, `/healthz`,
//! `/readyz`.
//!
//! It runs on its own threads, never on a worker: one thread accepts, and each request
//! gets a short-lived thread with read and write timeouts, at most [`MAX_CLIENTS`] at
//! once, so a client that stalls costs one thread for [`CLIENT_TIMEOUT`] and nothing
//! else. Every response closes the connection; scrapes are seconds apart.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::Metrics;
use crate::shutdown::Lifecycle;
use crate::sys::epoll::{Epoll, Events, READ_INTEREST};
use crate::sys::eventfd::EventFd;
use crate::sys::socket;

/// Requests served at once; more get 503 straight from the accepting thread.
pub const MAX_CLIENTS: usize = 16;
/// A client must send its request, and take the response, within this.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head accepted; a scrape request is a few hundred bytes.
pub const MAX_REQUEST_BYTES: usize = 8192;

/// How soon a failed accept is retried.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

const LISTENER: u64 = 0;
const STOP: u64 = 1;

/// A running endpoint; stopped on drop.
pub struct Endpoint {
    addr: SocketAddr,
    stop: Arc<EventFd>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Endpoint {
    /// Binds `addr` and serves it on a new thread.
    pub(crate) fn start(
        addr: SocketAddr,
        metrics: Arc<Metrics>,
        shared: Arc<Lifecycle>,
    ) -> io::Result<Endpoint> {
        let listener = socket::listen(addr, 128)?;
        let addr = socket::local_addr(listener.as_fd())?;
        let epoll = Epoll::new()?;
        let stop = Arc::new(EventFd::new()?);
        epoll.add(listener.as_fd(), LISTENER, READ_INTEREST)?;
        epoll.add(stop.as_fd(), STOP, READ_INTEREST)?;
        let stopping = Arc::new(AtomicBool::new(false));
        let state = Arc::new(State {
            metrics,
            shared,
            clients: AtomicUsize::new(0),
        });
        let stopping2 = Arc::clone(&stopping);
        let thread = std::thread::Builder::new()
            .name("edgepoll-metrics".into())
            .spawn(move || {
                let mut events = Events::with_capacity(2);
                // After a failed accept (say EMFILE) the queued connection brings no new
                // edge, so retry on a timer until the queue is empty again.
                let mut retry = false;
                while !stopping2.load(Ordering::SeqCst) {
                    let timeout = retry.then_some(ACCEPT_RETRY);
                    if let Err(e) = epoll.wait(&mut events, timeout) {
                        tracing::error!("metrics endpoint: {e}");
                        return;
                    }
                    retry = !accept_all(&listener, &state, addr);
                }
            })?;
        Ok(Endpoint {
            addr,
            stop,
            stopping,
            thread: Some(thread),
        })
    }

    /// The bound address (the real port when port 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = self.stop.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct State {
    metrics: Arc<Metrics>,
    shared: Arc<Lifecycle>,
    clients: AtomicUsize,
}

/// Accepts until the queue is empty (true) or an error stops it (false).
fn accept_all(listener: &std::os::fd::OwnedFd, state: &Arc<State>, addr: SocketAddr) -> bool {
    loop {
        let fd = match socket::accept(listener.as_fd()) {
            Ok((fd, _)) => fd,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) => {
                tracing::debug!("accept4 on metrics endpoint {addr}: {e}");
                return false;
            }
        };
        let mut stream = TcpStream::from(fd);
        let busy = state.clients.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS;
        if busy || stream.set_nonblocking(false).is_err() {
            state.clients.fetch_sub(1, Ordering::SeqCst);
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            let _ = respond(&mut stream, 503, "text/plain", b"busy\n", false, &[]);
            continue;
        }
        let state = Arc::clone(state);
        let spawned = std::thread::Builder::new()
            .name("edgepoll-scrape".into())
            .spawn(move || {
                serve_client(stream, &state);
                state.clients.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            tracing::warn!("metrics endpoint: spawning a thread: {e}");
        }
    }
}

fn serve_client(mut stream: TcpStream, state: &State) {
    let _ = stream.set_read_timeout(Some(CLIENT_TIMEOUT));
    let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
    let mut buf = vec![0u8; MAX_REQUEST_BYTES];
    let mut len = 0;
    loop {
        if len == buf.len() {
            let _ = respond(
                &mut stream,
                400,
                "text/plain",
                b"request too large\n",
                false,
                &[],
            );
            return;
        }
        match stream.read(&mut buf[len..]) {
            Ok(0) => return,
            Ok(n) => len += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                let _ = respond(
                    &mut stream,
                    408,
                    "text/plain",
                    b"request timeout\n",
                    false,
                    &[],
                );
                return;
            }
            Err(_) => return,
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..len]) {
            Ok(httparse::Status::Partial) => continue,
            Ok(httparse::Status::Complete(_)) => {
                let method = req.method.unwrap_or("");
                let path = req.path.unwrap_or("");
                let (status, ctype, body) = route(method, path, state);
                let head_only = method == "HEAD";
                let extra: &[(&str, &str)] = if status == 405 {
                    &[("Allow", "GET, HEAD")]
                } else {
                    &[]
                };
                let _ = respond(&mut stream, status, ctype, &body, head_only, extra);
                return;
            }
            Err(_) => {
                let _ = respond(
                    &mut stream,
                    400,
                    "text/plain",
                    b"malformed request\n",
                    false,
                    &[],
                );
                return;
            }
        }
    }
}

/// Maps a request to (status, content type, body).
fn route(method: &str, path: &str, state: &State) -> (u16, &'static str, Vec<u8>) {
    let path = path.split('?').next().unwrap_or("");
    let known = matches!(path, "/metrics" | "/healthz" | "/readyz");
    if !known {
        return (
            404,
            "text/plain",
            b"not found; try /metrics, /healthz or /readyz\n".to_vec(),
        );
    }
    if method != "GET" && method != "HEAD" {
        return (405, "text/plain", b"method not allowed\n".to_vec());
    }
    match path {
        "/metrics" => (200, prometheus::TEXT_FORMAT, state.metrics.encode()),
        "/healthz" => (200, "text/plain", b"ok\n".to_vec()),
        _ if state.shared.is_draining() => (503, "text/plain", b"draining\n".to_vec()),
        _ => (200, "text/plain", b"ready\n".to_vec()),
    }
}

fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
    head_only: bool,
    extra: &[(&str, &str)],
) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        503 => "Service Unavailable",
        _ => "Unknown",
    };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in extra {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    stream.write_all(&out)?;
    stream.flush()
}
