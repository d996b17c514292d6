//! splice(2) through a pipe: moving bytes from one socket to another without copying
//! them through user space.
//!
//! A socket cannot be spliced to a socket directly; the bytes go socket → pipe →
//! socket. The pipe is the relay's buffer for that direction: its capacity (64 KiB by
//! default) bounds what one direction holds in the kernel.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::syscall;

/// A non-blocking, close-on-exec pipe: bytes written to `write` are read from `read`.
#[derive(Debug)]
pub struct Pipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
}

impl Pipe {
    pub fn new() -> io::Result<Pipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two descriptors into a valid array of two ints.
        syscall!(pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC))
            .map_err(|e| super::context(e, "pipe2"))?;
        // SAFETY: both descriptors are new and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(Pipe { read, write })
    }

    /// Reads up to `buf.len()` bytes out of the pipe (with plain read(2), for when a
    /// pipe that holds bytes must be given up: they move back to user space).
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
        syscall!(read(
            self.read.as_raw_fd(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len()
        ))
        .map(|n| n as usize)
        .map_err(|e| super::context(e, "read from pipe"))
    }

    /// The pipe's capacity in bytes (F_GETPIPE_SZ).
    pub fn capacity(&self) -> io::Result<usize> {
        // SAFETY: F_GETPIPE_SZ takes no argument and returns the size.
        syscall!(fcntl(self.write.as_raw_fd(), libc::F_GETPIPE_SZ))
            .map(|n| n as usize)
            .map_err(|e| super::context(e, "fcntl F_GETPIPE_SZ"))
    }
}

/// Moves up to `len` bytes from `from` to `to` without blocking; one of the two must be
/// a pipe. `Ok(0)` from a socket is its FIN. EINTR is retried. EAGAIN means the socket
/// has nothing to give or the pipe no room to take (the caller tells them apart by
/// what it knows of the pipe).
#[inline]
pub fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: null offsets are valid for pipes and sockets; no memory is passed.
        match syscall!(splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK
        )) {
            Ok(n) => return Ok(n as usize),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;

    #[test]
    fn bytes_move_socket_to_pipe_to_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (b, _) = listener.accept().unwrap();
        let mut c = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (d, _) = listener.accept().unwrap();
        let pipe = Pipe::new().unwrap();
        assert!(pipe.capacity().unwrap() >= 4096);
        a.write_all(b"spliced").unwrap();
        // `b` is blocking, so the first splice waits for the bytes.
        let n = splice(b.as_fd(), pipe.write.as_fd(), 1 << 16).unwrap();
        assert_eq!(n, 7);
        assert_eq!(splice(pipe.read.as_fd(), d.as_fd(), n).unwrap(), 7);
        let mut got = [0u8; 7];
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"spliced");
        // An empty pipe has nothing to give.
        let e = splice(pipe.read.as_fd(), d.as_fd(), 10).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }
}
