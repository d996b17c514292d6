//! poll(2) and select(2). The `pollers` benchmark measures what epoll saves over
//! them; the health prober (`upstream::health`) uses poll for its few probe sockets.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use super::syscall;

/// One entry of a poll(2) set (a plain C struct: descriptor, requested and returned
/// events).
pub type PollFd = libc::pollfd;

/// Readable (POLLIN) for `poll`.
pub const POLLIN: i16 = libc::POLLIN;

/// Writable (POLLOUT) for `poll`: a non-blocking connect has completed, or failed.
pub const POLLOUT: i16 = libc::POLLOUT;

/// An entry asking for `events` on `fd`.
pub fn poll_fd(fd: BorrowedFd<'_>, events: i16) -> PollFd {
    PollFd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    }
}

/// Waits until one of `fds` is ready or `timeout_ms` passes (-1: forever); the kernel
/// fills in each `revents`. Returns how many entries have events. EINTR returns 0.
pub fn poll(fds: &mut [PollFd], timeout_ms: i32) -> io::Result<usize> {
    // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs the kernel may write.
    match syscall!(poll(
        fds.as_mut_ptr(),
        fds.len() as libc::nfds_t,
        timeout_ms
    )) {
        Ok(n) => Ok(n as usize),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
        Err(e) => Err(super::context(e, "poll")),
    }
}

/// A select(2) descriptor set. It holds descriptors below [`FdSet::LIMIT`] only:
/// select cannot watch a larger descriptor number, which is one of its limits.
#[derive(Clone)]
pub struct FdSet {
    set: libc::fd_set,
    /// Highest descriptor in the set, -1 when empty.
    max: i32,
}

impl FdSet {
    /// FD_SETSIZE: descriptors from this number up cannot be watched by select.
    pub const LIMIT: i32 = libc::FD_SETSIZE as i32;

    pub fn new() -> FdSet {
        // SAFETY: an all-zero fd_set is a valid (empty) set, which FD_ZERO also makes.
        let mut set: libc::fd_set = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid fd_set.
        unsafe { libc::FD_ZERO(&mut set) };
        FdSet { set, max: -1 }
    }

    /// Adds `fd`; EINVAL if its number is at or above [`FdSet::LIMIT`].
    pub fn insert(&mut self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let raw = fd.as_raw_fd();
        if !(0..Self::LIMIT).contains(&raw) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "select cannot watch descriptor {raw}: FD_SETSIZE is {}",
                    Self::LIMIT
                ),
            ));
        }
        // SAFETY: `raw` is below FD_SETSIZE, so FD_SET stays inside the set.
        unsafe { libc::FD_SET(raw, &mut self.set) };
        self.max = self.max.max(raw);
        Ok(())
    }

    /// Whether `fd` is in the set (after select: whether it is ready).
    pub fn contains(&self, fd: BorrowedFd<'_>) -> bool {
        let raw = fd.as_raw_fd();
        // SAFETY: `raw` is checked to be below FD_SETSIZE, so FD_ISSET reads inside the set.
        (0..Self::LIMIT).contains(&raw) && unsafe { libc::FD_ISSET(raw, &self.set) }
    }
}

impl Default for FdSet {
    fn default() -> Self {
        FdSet::new()
    }
}

/// select(2) for readability over `watch`. select overwrites the set it is given, so
/// `watch` is copied into `ready` first, as every select loop must do on every call;
/// on return `ready` holds the readable descriptors. EINTR returns 0.
pub fn select_readable(
    watch: &FdSet,
    ready: &mut FdSet,
    timeout: Option<Duration>,
) -> io::Result<usize> {
    ready.set = watch.set;
    ready.max = watch.max;
    let mut tv = timeout.map(|t| libc::timeval {
        tv_sec: t.as_secs() as libc::time_t,
        tv_usec: t.subsec_micros() as libc::suseconds_t,
    });
    let tvp = tv
        .as_mut()
        .map_or(std::ptr::null_mut(), |t| t as *mut libc::timeval);
    // SAFETY: `ready.set` is a valid fd_set whose descriptors are all below
    // FD_SETSIZE, nfds is one above the highest, and `tvp` is null or a valid timeval.
    match syscall!(select(
        watch.max + 1,
        &mut ready.set,
        std::ptr::null_mut(),
        std::ptr::null_mut(),
        tvp
    )) {
        Ok(n) => Ok(n as usize),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
        Err(e) => Err(super::context(e, "select")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;

    #[test]
    fn poll_and_select_see_the_one_readable_socket() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        let idle = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (_idle_peer, _) = l.accept().unwrap();
        let mut fds = [poll_fd(idle.as_fd(), POLLIN), poll_fd(b.as_fd(), POLLIN)];
        assert_eq!(poll(&mut fds, 0).unwrap(), 0);
        a.write_all(b"x").unwrap();
        assert_eq!(poll(&mut fds, 5000).unwrap(), 1);
        assert_eq!(fds[0].revents, 0);
        assert_ne!(fds[1].revents & POLLIN, 0);

        let mut watch = FdSet::new();
        watch.insert(idle.as_fd()).unwrap();
        watch.insert(b.as_fd()).unwrap();
        let mut ready = FdSet::new();
        assert_eq!(
            select_readable(&watch, &mut ready, Some(Duration::ZERO)).unwrap(),
            1
        );
        assert!(ready.contains(b.as_fd()));
        assert!(!ready.contains(idle.as_fd()));
    }
}
