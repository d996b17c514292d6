//! Shutdown signals, taken synchronously.
//!
//! SIGINT, SIGTERM, SIGHUP and SIGUSR1 are blocked in the main thread before any other thread starts,
//! so every thread inherits the mask and none is interrupted; the main thread then
//! collects them with sigtimedwait(2). No handler runs, so nothing async-signal-unsafe
//! can happen. SIGPIPE needs no handling: every socket write uses MSG_NOSIGNAL.

use std::io;
use std::mem::MaybeUninit;
use std::time::Duration;

use super::syscall;

/// The signals that ask edgepoll to drain and exit (SIGINT, SIGTERM), to reload
/// (SIGHUP), or to reopen its access log (SIGUSR1, after logrotate).
pub struct ShutdownSignals {
    set: libc::sigset_t,
}

impl ShutdownSignals {
    /// Blocks SIGINT, SIGTERM, SIGHUP and SIGUSR1 in the calling thread. Call it before spawning
    /// threads so they inherit the mask.
    pub fn block() -> io::Result<ShutdownSignals> {
        let mut set = MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: sigemptyset initialises the set; sigaddset and pthread_sigmask get
        // valid pointers to that initialised set.
        let set = unsafe {
            libc::sigemptyset(set.as_mut_ptr());
            let mut set = set.assume_init();
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGHUP);
            libc::sigaddset(&mut set, libc::SIGUSR1);
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if rc != 0 {
                return Err(super::context(
                    io::Error::from_raw_os_error(rc),
                    "pthread_sigmask SIG_BLOCK",
                ));
            }
            set
        };
        Ok(ShutdownSignals { set })
    }

    /// Waits up to `timeout` for one of the signals; returns its number, or None.
    pub fn wait(&self, timeout: Duration) -> io::Result<Option<i32>> {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: the set is initialised, the info pointer may be null, `ts` is valid.
        match syscall!(sigtimedwait(&self.set, std::ptr::null_mut(), &ts)) {
            Ok(sig) => Ok(Some(sig)),
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(None),
            Err(e) => Err(super::context(e, "sigtimedwait")),
        }
    }
}

/// Sends signal `sig` to process `pid` (kill(2)).
pub fn send(pid: u32, sig: i32) -> io::Result<()> {
    // SAFETY: kill takes plain integers.
    syscall!(kill(pid as libc::pid_t, sig))
        .map(drop)
        .map_err(|e| super::context(e, format!("kill {pid}")))
}

/// The name of a shutdown signal, for logs.
pub fn name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        libc::SIGUSR1 => "SIGUSR1",
        _ => "signal",
    }
}
