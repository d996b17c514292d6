//! Dead peers found without waiting for the idle timeout: what `--tcp-keepalive` and
//! `--tcp-user-timeout` set on a socket, and where.
//!
//! - Client sockets get their options from the listener. Linux copies SO_KEEPALIVE,
//!   TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT and TCP_USER_TIMEOUT from a listening
//!   socket to each connection it accepts (checked by `tests/keepalive.rs`), so
//!   [`crate::server::Server`] sets them once per listener, and an accepted
//!   connection costs no system call for them. A listener a reload or systemd hands
//!   over is set too, off values included, so the new configuration replaces the
//!   old one.
//! - The copy is made when the handshake completes, not at accept(2): a connection
//!   already queued when a listener's options change keeps the old ones. So until a
//!   listener's queue has once been seen empty, the acceptor sets the options on each
//!   connection it accepts from it (`Acceptor`), and a connection a reload moves here
//!   gets them in the worker that adopts it.
//! - Relay's upstream sockets are new sockets: the worker sets them after socket(2),
//!   four or five calls per upstream connection when on, none when off.

use std::io;
use std::os::fd::BorrowedFd;
use std::time::Duration;

use crate::config::{Config, Keepalive};
use crate::sys::socket;

/// The keepalive and user timeout one kind of socket gets (clients, or relay's
/// upstreams).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PeerTimeouts {
    /// None: SO_KEEPALIVE off.
    pub keepalive: Option<Keepalive>,
    /// None: TCP_USER_TIMEOUT 0, the kernel's default.
    pub user_timeout: Option<Duration>,
}

impl PeerTimeouts {
    /// What client sockets get (every mode).
    pub fn clients(config: &Config) -> PeerTimeouts {
        PeerTimeouts {
            keepalive: config.tcp_keepalive,
            user_timeout: config.tcp_user_timeout,
        }
    }

    /// What relay's upstream sockets get.
    pub fn upstreams(config: &Config) -> PeerTimeouts {
        PeerTimeouts {
            keepalive: config.relay.upstream_keepalive,
            user_timeout: config.tcp_user_timeout,
        }
    }

    /// Sets every option, the ones that are off included, replacing whatever the
    /// socket had: for listeners and for sockets another process set up.
    pub fn apply(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.set(fd, true)
    }

    /// Sets only what differs from a new socket's defaults (keepalive off, no user
    /// timeout): for a socket this process has just created.
    pub fn apply_to_new(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.set(fd, false)
    }

    fn set(&self, fd: BorrowedFd<'_>, off_too: bool) -> io::Result<()> {
        match &self.keepalive {
            Some(k) => {
                // The timings first: turning SO_KEEPALIVE on arms the timer with them.
                socket::set_keepalive_idle(fd, k.idle.as_secs() as u32)?;
                socket::set_keepalive_interval(fd, k.interval.as_secs() as u32)?;
                socket::set_keepalive_count(fd, k.count)?;
                socket::set_keepalive(fd, true)?;
            }
            None if off_too => socket::set_keepalive(fd, false)?,
            None => {}
        }
        match self.user_timeout {
            // Validated to fit (Config::validate).
            Some(t) => socket::set_user_timeout(fd, t.as_millis() as u32)?,
            None if off_too => socket::set_user_timeout(fd, 0)?,
            None => {}
        }
        Ok(())
    }
}

impl std::fmt::Display for PeerTimeouts {
    /// For the start-up log: `keepalive 60s:10s:6, user timeout 30s`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.keepalive {
            Some(k) => write!(f, "keepalive {k}")?,
            None => write!(f, "keepalive off")?,
        }
        if let Some(t) = self.user_timeout {
            write!(f, ", user timeout {t:?}")?;
        }
        Ok(())
    }
}
