//! eventfd(2): the wake-up a thread sends another thread's epoll loop.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::syscall;

/// A non-blocking eventfd counter, closed on drop.
#[derive(Debug)]
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd takes an initial value and flags, and returns a new descriptor.
        let fd = syscall!(eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC))
            .map_err(|e| super::context(e, "eventfd"))?;
        // SAFETY: `fd` is new and owned by nobody else.
        Ok(EventFd {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Adds one to the counter, which makes the descriptor readable. A counter
    /// that is already at its maximum (EAGAIN) is readable anyway, so that is success.
    pub fn wake(&self) -> io::Result<()> {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to a descriptor we own.
        match syscall!(write(
            self.fd.as_raw_fd(),
            &one as *const u64 as *const libc::c_void,
            8
        )) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(super::context(e, "write eventfd")),
        }
    }

    /// Resets the counter to zero so that the next `wake` is a new edge.
    pub fn drain(&self) -> io::Result<()> {
        let mut value: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64 from a descriptor we own.
        match syscall!(read(
            self.fd.as_raw_fd(),
            &mut value as *mut u64 as *mut libc::c_void,
            8
        )) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(super::context(e, "read eventfd")),
        }
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
