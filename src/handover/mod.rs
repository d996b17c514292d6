//! Reload: handing a running server to a new process, listeners and established
//! connections included, so that no connection is refused, reset or cut.
//!
//! On SIGHUP the running process (the predecessor) starts the binary as it is now on
//! disk, with the same arguments, and gives it one end of a Unix socket pair (its
//! number in [`ENV`]). Over it:
//!
//! 1. `Hello` (predecessor → successor): the protocol version, the mode, and every
//!    listening socket (SCM_RIGHTS) with its address.
//! 2. The successor loads its configuration (the file as it is now), takes the
//!    listeners whose addresses it still has, binds the ones that are new, and
//!    starts: from here both processes accept on the shared listeners, so the accept
//!    queue never stops being served. It answers `Ready` (which listeners it took),
//!    or `Failed` with the reason, and the predecessor goes on serving as before.
//! 3. On `Ready` the predecessor stops accepting (emptying first the queue of any
//!    listener the successor did not take), takes every connection out of its
//!    workers, and sends each as a `Conn` message: its sockets and its state
//!    ([`crate::mode::moved`]). Then `Counters` (what it counted, so counters stay
//!    monotonic, see [`crate::metrics::carry`]) and `Done`, and it exits 0.
//!
//! Each message is a head (`u32` body length, `u8` kind, `u8` descriptor count) sent
//! with its descriptors in one sendmsg, then the body.

pub mod wire;

use std::ffi::OsString;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::metrics::carry;
use crate::mode::moved::Moved;
use crate::server::{Server, Sockets};
use crate::sys::{fdpass, socket};
use wire::{Reader, WireError, Writer};

/// The environment variable that gives the successor its end of the hand-over
/// socket, by descriptor number.
pub const ENV: &str = "EDGEPOLL_HANDOVER_FD";

/// The version of the messages and of the connection state encoding. A successor that
/// speaks another refuses the hand-over, and the predecessor goes on serving.
pub const PROTOCOL: u32 = 1;

/// How long the predecessor waits for the successor to start, and how long either
/// side waits on the other for any one message once the transfer runs.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Send and receive buffer of the hand-over socket (the kernel caps it at
/// net.core.wmem_max / rmem_max).
const HANDOVER_BUFFER: usize = 4 << 20;

/// Largest message body accepted: a connection's state is at most its buffers, each
/// capped by `--max-pending-bytes` (at most 1 GiB), so this is a corrupt length.
const MAX_BODY: usize = 4 << 30;

mod kind {
    pub const HELLO: u8 = 1;
    pub const READY: u8 = 2;
    pub const FAILED: u8 = 3;
    pub const CONN: u8 = 4;
    pub const COUNTERS: u8 = 5;
    pub const DONE: u8 = 6;
    pub const SENT: u8 = 7;
    pub const RECEIVED: u8 = 8;
}

/// Why a reload did not happen; the predecessor logs it and goes on serving.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("starting {exe}: {err}")]
    Spawn { exe: String, err: io::Error },
    #[error("the new process refused the reload: {0}")]
    Refused(String),
    #[error("the new process exited before it was ready ({0})")]
    Exited(String),
    #[error("the new process did not become ready within {0:?}")]
    Timeout(Duration),
    #[error("hand-over socket: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// One message.
struct Frame {
    kind: u8,
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
}

/// The framed hand-over socket.
struct Channel {
    sock: UnixStream,
}

impl Channel {
    fn send(&self, kind: u8, body: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let mut head = Vec::with_capacity(6 + body.len());
        head.extend_from_slice(&(body.len() as u32).to_le_bytes());
        head.push(kind);
        head.push(fds.len() as u8);
        head.extend_from_slice(body);
        fdpass::send_with_fds(self.sock.as_fd(), &head, fds)
    }

    /// The next message; None at a clean end of stream.
    fn recv(&self) -> io::Result<Option<Frame>> {
        let mut head = [0u8; 6];
        let mut fds = Vec::new();
        if !fdpass::recv_with_fds(self.sock.as_fd(), &mut head, &mut fds)? {
            return Ok(None);
        }
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        if len > MAX_BODY || fds.len() != head[5] as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "hand-over message: a corrupt head",
            ));
        }
        // The body carries no descriptors: a plain read, into memory not zeroed first.
        let mut body = Vec::with_capacity(len);
        (&self.sock).take(len as u64).read_to_end(&mut body)?;
        if body.len() < len {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if fds.len() != head[5] as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "hand-over message: descriptors in a message body",
            ));
        }
        Ok(Some(Frame {
            kind: head[4],
            body,
            fds,
        }))
    }
}

/// The predecessor's view of a successor it started.
pub struct Successor {
    child: Child,
    chan: Channel,
}

/// What the successor took, from its `Ready`.
#[derive(Debug)]
pub struct Ready {
    pub pid: u32,
    /// Per listener of the predecessor: whether the successor took it.
    pub taken: Vec<bool>,
}

/// Starts `exe` with `args` as the successor of `server`, and sends it the listeners.
/// `activated`: the listeners came from systemd, not from the configuration, so the
/// successor keeps them all whatever its `--listen` says, as this process did.
pub fn start_successor(
    server: &Server,
    exe: &Path,
    args: &[OsString],
    activated: bool,
) -> Result<Successor, ReloadError> {
    let (listeners, metrics) = server.listeners()?;
    if listeners.len() != server.local_addrs().len() {
        return Err(io::Error::other("the server is draining").into());
    }
    let (ours, theirs) = fdpass::socketpair()?;
    // Buffered bytes move through this socket: large buffers mean fewer switches
    // between the two processes per megabyte.
    for fd in [ours.as_fd(), theirs.as_fd()] {
        let _ = socket::set_send_buffer(fd, HANDOVER_BUFFER);
        let _ = socket::set_recv_buffer(fd, HANDOVER_BUFFER);
    }
    fdpass::inherit(theirs.as_fd())?;
    let child = Command::new(exe)
        .args(args)
        .env(ENV, theirs.as_raw_fd().to_string())
        .spawn()
        .map_err(|err| ReloadError::Spawn {
            exe: exe.display().to_string(),
            err,
        })?;
    drop(theirs);
    fdpass::set_timeouts(ours.as_fd(), START_TIMEOUT)?;
    let successor = Successor {
        child,
        chan: Channel {
            sock: UnixStream::from(ours),
        },
    };
    let mut w = Writer::default();
    w.u32(PROTOCOL)
        .str(server.config().mode.name())
        .u32(std::process::id())
        .u8(activated as u8)
        .u32(listeners.len() as u32);
    let mut fds: Vec<BorrowedFd<'_>> = Vec::new();
    for (fd, addr) in listeners.iter().zip(server.local_addrs()) {
        w.str(&addr.to_string());
        fds.push(fd.as_fd());
    }
    match (metrics.as_ref(), server.metrics_addr()) {
        (Some(fd), Some(addr)) => {
            w.u8(1).str(&addr.to_string());
            fds.push(fd.as_fd());
        }
        _ => {
            w.u8(0);
        }
    }
    let mut successor = successor;
    if let Err(e) = successor.chan.send(kind::HELLO, &w.buf, &fds) {
        let err = match e.kind() {
            // It exited before it read its hello.
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => {
                ReloadError::Exited(successor.exit_status())
            }
            _ => e.into(),
        };
        successor.abort();
        return Err(err);
    }
    Ok(successor)
}

impl Successor {
    /// Waits for the successor to start serving (or to refuse, or to die).
    pub fn wait_ready(&mut self) -> Result<Ready, ReloadError> {
        let started = Instant::now();
        let frame = match self.chan.recv() {
            Ok(Some(f)) => f,
            Ok(None) => return Err(ReloadError::Exited(self.exit_status())),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ReloadError::Timeout(started.elapsed()))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
                ) =>
            {
                return Err(ReloadError::Exited(self.exit_status()))
            }
            Err(e) => return Err(e.into()),
        };
        let mut r = Reader::new(&frame.body);
        match frame.kind {
            kind::READY => {
                let pid = r.u32()?;
                let n = r.u32()?;
                let mut taken = Vec::new();
                for _ in 0..n {
                    taken.push(r.u8()? != 0);
                }
                Ok(Ready { pid, taken })
            }
            kind::FAILED => Err(ReloadError::Refused(r.str()?.to_string())),
            _ => Err(WireError("expected Ready or Failed").into()),
        }
    }

    /// How the child ended, for the log; waits a moment for it to exit.
    fn exit_status(&mut self) -> String {
        let until = Instant::now() + Duration::from_secs(1);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.to_string(),
                Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(10)),
                Ok(None) => return "still running".into(),
                Err(e) => return e.to_string(),
            }
        }
    }

    /// Gives up on the successor: it is killed and reaped.
    pub fn abort(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Hands `server`'s connections to the successor, which has said `ready`, then
    /// stops `server` and sends its counters. Returns the connections moved.
    ///
    /// Every connection stays open here too until the successor confirms it has read
    /// them all. If it does not (it died, or hangs past [`START_TIMEOUT`]), it is
    /// killed and every connection goes back to `server`, which accepts again and
    /// serves on: [`TransferError::Resumed`].
    pub fn transfer(self, server: Server, ready: &Ready) -> Result<usize, TransferError> {
        let n = server.local_addrs().len();
        let drain: Vec<bool> = (0..n)
            .map(|i| !ready.taken.get(i).copied().unwrap_or(false))
            .collect();
        let handover = server.hand_over(drain);
        let mut moved = 0;
        let mut done = 0;
        let mut failed = None;
        let mut unsent = Vec::new();
        while done < handover.workers {
            let Ok(item) = handover.rx.recv() else {
                break; // every worker is gone
            };
            let Some(conn) = item else {
                done += 1;
                continue;
            };
            if failed.is_some() {
                unsent.push(conn);
                continue;
            }
            let fds: Vec<BorrowedFd<'_>> = conn.fds.iter().map(|f| f.as_fd()).collect();
            let result = self.chan.send(kind::CONN, &conn.state, &fds);
            drop(fds);
            // Kept until the successor says it has them all: a successor that dies
            // with messages unread in its socket takes those sockets nowhere, and
            // this process's descriptors of them are still good.
            unsent.push(conn);
            match result {
                Ok(()) => moved += 1,
                Err(e) => failed = Some(e),
            }
        }
        if failed.is_none() {
            let mut w = Writer::default();
            w.u64(moved as u64);
            let acked =
                self.chan
                    .send(kind::SENT, &w.buf, &[])
                    .and_then(|()| match self.chan.recv()? {
                        Some(f) if f.kind == kind::RECEIVED => Ok(()),
                        Some(_) => Err(io::Error::other("expected Received")),
                        None => Err(io::ErrorKind::UnexpectedEof.into()),
                    });
            if let Err(e) = acked {
                failed = Some(e);
            }
        }
        if let Some(error) = failed {
            // Killed before the connections come back, so that it serves none of them.
            self.abort();
            let kept = unsent.len();
            server.resume(unsent);
            return Err(TransferError::Resumed {
                server: Box::new(server),
                error,
                lost: 0,
                kept,
            });
        }
        drop(unsent);
        let metrics = std::sync::Arc::clone(server.metrics());
        // The workers publish their last counts as they exit.
        server.finish_hand_over();
        let sent = (|| {
            self.chan
                .send(kind::COUNTERS, &carry::snapshot(&metrics.families()), &[])?;
            let mut w = Writer::default();
            w.u64(moved as u64);
            self.chan.send(kind::DONE, &w.buf, &[])
        })();
        sent.map_err(TransferError::Counters)?;
        Ok(moved)
    }
}

/// A hand-over that did not complete.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The successor stopped taking connections; this process serves on with what
    /// it had not sent.
    #[error("the new process stopped taking connections ({error}): {lost} went with it, {kept} stay here")]
    Resumed {
        server: Box<Server>,
        error: io::Error,
        /// Connections sent before it stopped, lost with it.
        lost: usize,
        /// Connections this process took back.
        kept: usize,
    },
    /// Every connection moved, but the counters could not follow.
    #[error("sending the counters: {0}")]
    Counters(io::Error),
}

/// The successor's view of the process it replaces.
pub struct Predecessor {
    chan: Channel,
    pub pid: u32,
    mode: String,
    /// The predecessor's listeners came from systemd: keep them all.
    activated: bool,
    listeners: Vec<(SocketAddr, Option<OwnedFd>)>,
    metrics: Option<(SocketAddr, Option<OwnedFd>)>,
}

/// If this process was started by a reload, connects to its predecessor and takes the
/// listeners it offers. The variable is removed, so that a process this one starts
/// does not inherit it.
pub fn predecessor() -> Result<Option<Predecessor>, ReloadError> {
    let Some(value) = std::env::var_os(ENV) else {
        return Ok(None);
    };
    // The binary calls this before it starts any thread, so changing the environment
    // races with nothing.
    std::env::remove_var(ENV);
    let raw: i32 = value
        .to_str()
        .and_then(|v| v.parse().ok())
        .filter(|&fd| fd > 2)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{ENV}={value:?} is not a descriptor number"),
            )
        })?;
    let sock = fdpass::take_inherited(raw)?;
    fdpass::set_timeouts(sock.as_fd(), START_TIMEOUT)?;
    let chan = Channel {
        sock: UnixStream::from(sock),
    };
    let frame = chan
        .recv()?
        .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
    if frame.kind != kind::HELLO {
        return Err(WireError("expected Hello").into());
    }
    let mut r = Reader::new(&frame.body);
    let version = r.u32()?;
    let mode = r.str()?.to_string();
    let pid = r.u32()?;
    let activated = r.u8()? != 0;
    let mut fds = frame.fds.into_iter();
    let mut pred = Predecessor {
        chan,
        pid,
        mode,
        activated,
        listeners: Vec::new(),
        metrics: None,
    };
    if version != PROTOCOL {
        pred.fail(&format!(
            "the new binary speaks hand-over protocol {PROTOCOL}, the running one {version}: \
             restart instead of reloading"
        ));
        return Err(ReloadError::Refused("protocol version".into()));
    }
    let n = r.u32()?;
    for _ in 0..n {
        let addr = parse_addr(r.str()?)?;
        pred.listeners.push((addr, fds.next()));
    }
    if r.u8()? == 1 {
        let addr = parse_addr(r.str()?)?;
        pred.metrics = Some((addr, fds.next()));
    }
    Ok(Some(pred))
}

fn parse_addr(s: &str) -> Result<SocketAddr, WireError> {
    s.parse().map_err(|_| WireError("a listener address"))
}

/// Whether a listener bound to `bound` serves the configured address `wanted` (port 0
/// asks for any port, so any bound port of that IP serves it).
fn serves(bound: SocketAddr, wanted: SocketAddr) -> bool {
    bound == wanted || (wanted.port() == 0 && bound.ip() == wanted.ip())
}

impl Predecessor {
    /// The listening sockets for `config`: the predecessor's where the address is
    /// still configured (all of them if systemd gave them), new ones bound for new
    /// addresses. A mode change cannot be applied in place and is refused.
    pub fn sockets(&mut self, config: &Config) -> Result<Sockets, String> {
        if config.mode.name() != self.mode {
            return Err(format!(
                "the mode cannot change on a reload ({} to {}); restart instead",
                self.mode,
                config.mode.name()
            ));
        }
        let mut sockets = Sockets::default();
        if self.activated {
            for (_, fd) in &mut self.listeners {
                sockets.listeners.extend(fd.take());
            }
        } else {
            for &wanted in &config.listen {
                let handed = self
                    .listeners
                    .iter_mut()
                    .find(|(bound, fd)| fd.is_some() && serves(*bound, wanted))
                    .and_then(|(_, fd)| fd.take());
                let fd = match handed {
                    Some(fd) => fd,
                    None => socket::listen(wanted, config.backlog).map_err(|e| e.to_string())?,
                };
                sockets.listeners.push(fd);
            }
        }
        if let Some(wanted) = config.metrics_listen {
            let handed = self
                .metrics
                .as_mut()
                .filter(|(bound, _)| serves(*bound, wanted))
                .and_then(|(_, fd)| fd.take());
            sockets.metrics = Some(match handed {
                Some(fd) => fd,
                None => crate::metrics::endpoint::Endpoint::bind(wanted)
                    .map_err(|e| format!("metrics endpoint: {e}"))?,
            });
        }
        Ok(sockets)
    }

    /// Whether the predecessor's listeners came from systemd (socket activation):
    /// this process keeps them all, and tells its own successor so in turn.
    pub fn activated(&self) -> bool {
        self.activated
    }

    /// Tells the predecessor that this process cannot take over, and why; it goes on
    /// serving.
    pub fn fail(&self, why: &str) {
        let mut w = Writer::default();
        w.str(why);
        let _ = self.chan.send(kind::FAILED, &w.buf, &[]);
    }

    /// Tells the predecessor that `server` is serving, then takes in its connections
    /// and counters. Returns the connections moved. Runs on the main thread before
    /// it waits for signals.
    pub fn take_over(self, server: &Server) -> Result<usize, ReloadError> {
        let mut w = Writer::default();
        w.u32(std::process::id()).u32(self.listeners.len() as u32);
        for (_, fd) in &self.listeners {
            // Taken when its descriptor moved into the server.
            w.u8(fd.is_none() as u8);
        }
        self.chan.send(kind::READY, &w.buf, &[])?;
        let mut moved = 0usize;
        loop {
            let frame = self
                .chan
                .recv()?
                .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
            match frame.kind {
                kind::CONN => {
                    server.adopt(Moved {
                        fds: frame.fds,
                        state: frame.body,
                        log: None,
                    });
                    moved += 1;
                }
                kind::COUNTERS => server.metrics().carry(carry::restore(&frame.body)?),
                kind::SENT => self.chan.send(kind::RECEIVED, &[], &[])?,
                kind::DONE => return Ok(moved),
                _ => return Err(WireError("unexpected message during the transfer").into()),
            }
        }
    }
}
