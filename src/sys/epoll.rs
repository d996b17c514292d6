//! epoll(7): one instance per worker, sockets registered once, edge-triggered.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::syscall;

/// Readiness the registration asks for. Sockets are registered with all of
/// them and never modified: `EPOLLET` reports each change once, so the worker never
/// needs `epoll_ctl` again to switch between reading and writing.
pub const SOCKET_INTEREST: u32 =
    (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;

/// Readiness for wake-up descriptors (eventfd) and listeners: input only, edge-triggered.
pub const READ_INTEREST: u32 = (libc::EPOLLIN | libc::EPOLLET) as u32;

/// An epoll instance, closed on drop.
#[derive(Debug)]
pub struct Epoll {
    fd: OwnedFd,
}

impl Epoll {
    /// Creates an instance that is not inherited by child processes.
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: epoll_create1 takes only flags and returns a new descriptor or -1.
        let fd = syscall!(epoll_create1(libc::EPOLL_CLOEXEC))
            .map_err(|e| super::context(e, "epoll_create1"))?;
        // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
        Ok(Epoll {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Registers `fd` with `interest`; events for it carry `token`.
    pub fn add(&self, fd: BorrowedFd<'_>, token: u64, interest: u32) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, "ADD", fd, token, interest)
    }

    /// Changes the interest of a registered `fd`. edgepoll never needs this (its
    /// sockets are edge-triggered and registered once); the `pollers` benchmark uses
    /// it to show what a level-triggered loop pays.
    pub fn modify(&self, fd: BorrowedFd<'_>, token: u64, interest: u32) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, "MOD", fd, token, interest)
    }

    /// Removes `fd` from the set. A socket leaves on its own when its last
    /// descriptor closes; one handed to another process (a reload) does not, so the
    /// worker that hands it over removes it.
    pub fn delete(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, "DEL", fd, 0, 0)
    }

    fn ctl(
        &self,
        op: libc::c_int,
        name: &str,
        fd: BorrowedFd<'_>,
        token: u64,
        interest: u32,
    ) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: interest,
            u64: token,
        };
        // SAFETY: both descriptors are valid for the duration of the call and `event`
        // is a valid, initialised epoll_event that the kernel only reads.
        syscall!(epoll_ctl(
            self.fd.as_raw_fd(),
            op,
            fd.as_raw_fd(),
            &mut event
        ))
        .map(drop)
        .map_err(|e| super::context(e, format!("epoll_ctl {name} fd {}", fd.as_raw_fd())))
    }

    /// Waits for events, at most `timeout` (None: forever, zero: do not block).
    /// An interrupted wait (EINTR) returns with no events rather than an error.
    pub fn wait(&self, events: &mut Events, timeout: Option<Duration>) -> io::Result<()> {
        let timeout_ms: i32 = match timeout {
            None => -1,
            // Round up so that a 0.4 ms timer does not turn into a busy zero-timeout loop.
            Some(d) => d.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32,
        };
        events.buf.clear();
        let capacity = events.buf.capacity().min(i32::MAX as usize) as i32;
        // SAFETY: the kernel writes at most `capacity` events into the vector's spare
        // capacity, which is that large; the length is set from its return value below.
        let n = match syscall!(epoll_wait(
            self.fd.as_raw_fd(),
            events.buf.as_mut_ptr(),
            capacity,
            timeout_ms
        )) {
            Ok(n) => n as usize,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(super::context(e, "epoll_wait")),
        };
        // SAFETY: epoll_wait initialised exactly `n <= capacity` entries.
        unsafe { events.buf.set_len(n) };
        Ok(())
    }
}

impl Epoll {
    /// Like [`Epoll::wait`], with a nanosecond timeout (epoll_pwait2, Linux 5.11) where
    /// the kernel has it, for schedules finer than a millisecond (edgeload's `--rate`).
    /// Falls back to `wait` where the call is missing or filtered.
    pub fn wait_precise(&self, events: &mut Events, timeout: Option<Duration>) -> io::Result<()> {
        static MISSING: AtomicBool = AtomicBool::new(false);
        if MISSING.load(Ordering::Relaxed) {
            return self.wait(events, timeout);
        }
        let ts = timeout.map(|d| libc::timespec {
            tv_sec: d.as_secs().min(i64::MAX as u64) as libc::time_t,
            tv_nsec: d.subsec_nanos() as libc::c_long,
        });
        let ts_ptr = ts
            .as_ref()
            .map_or(std::ptr::null(), |t| t as *const libc::timespec);
        events.buf.clear();
        let capacity = events.buf.capacity().min(i32::MAX as usize) as libc::c_int;
        // SAFETY: as in `wait`: the kernel writes at most `capacity` events into the
        // spare capacity; `ts_ptr` is null or points to a live timespec; no sigmask.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_epoll_pwait2,
                self.fd.as_raw_fd(),
                events.buf.as_mut_ptr(),
                capacity,
                ts_ptr,
                std::ptr::null::<libc::sigset_t>(),
                0usize,
            )
        };
        if ret < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOSYS) | Some(libc::EPERM) => {
                    MISSING.store(true, Ordering::Relaxed);
                    self.wait(events, timeout)
                }
                Some(libc::EINTR) => Ok(()),
                _ => Err(super::context(e, "epoll_pwait2")),
            };
        }
        // SAFETY: epoll_pwait2 initialised exactly `ret <= capacity` entries.
        unsafe { events.buf.set_len(ret as usize) };
        Ok(())
    }
}

impl AsFd for Epoll {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A reusable buffer of fired events, allocated once per worker.
pub struct Events {
    buf: Vec<libc::epoll_event>,
}

impl Events {
    pub fn with_capacity(capacity: usize) -> Events {
        Events {
            buf: Vec::with_capacity(capacity.max(1)),
        }
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The `i`-th fired event. The kernel struct is packed on x86-64, so its fields
    /// are copied out rather than borrowed.
    pub fn get(&self, i: usize) -> Event {
        let raw = self.buf[i];
        Event {
            token: raw.u64,
            flags: raw.events,
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = Event> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }
}

/// One fired event: the registration token and the kernel's readiness flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub token: u64,
    pub flags: u32,
}

impl Event {
    /// Input is available, or a read would not block (EOF or an error pending).
    pub fn is_readable(&self) -> bool {
        self.flags & (libc::EPOLLIN | libc::EPOLLPRI) as u32 != 0
    }

    /// The send buffer has room again.
    pub fn is_writable(&self) -> bool {
        self.flags & libc::EPOLLOUT as u32 != 0
    }

    /// The peer shut down its write side (EPOLLRDHUP), or both sides are gone
    /// (EPOLLHUP). A read will return what is left, then 0.
    pub fn is_read_closed(&self) -> bool {
        self.flags & (libc::EPOLLRDHUP | libc::EPOLLHUP) as u32 != 0
    }

    /// An error is pending on the socket (EPOLLERR); the next read or write reports it.
    pub fn is_error(&self) -> bool {
        self.flags & libc::EPOLLERR as u32 != 0
    }
}
