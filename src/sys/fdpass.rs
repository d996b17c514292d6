//! Passing descriptors between processes over a Unix stream socket (SCM_RIGHTS, see
//! unix(7)): how a reload hands listening sockets and established connections to the
//! process that replaces this one.
//!
//! A message is sent with one sendmsg(2) carrying its descriptors as ancillary data.
//! On a stream socket the kernel attaches them to the first bytes of that message, and
//! a recvmsg(2) never returns bytes from two messages that carry different
//! descriptors, so the receiver reads each message's fixed-size head with
//! [`recv_with_fds`] (getting its descriptors) and the rest with plain reads.

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::syscall;

/// Most descriptors one message may carry. The kernel's own limit is 253
/// (SCM_MAX_FD); a connection needs at most 6 (a relayed pair with two pipes).
pub const MAX_FDS: usize = 64;

/// A connected pair of Unix stream sockets, both close-on-exec.
pub fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: socketpair writes two descriptors into a valid array of two ints.
    syscall!(socketpair(
        libc::AF_UNIX,
        libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
        0,
        fds.as_mut_ptr()
    ))
    .map_err(|e| super::context(e, "socketpair AF_UNIX"))?;
    // SAFETY: both descriptors are new and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Lets a child process inherit `fd` across exec (clears FD_CLOEXEC).
pub fn inherit(fd: BorrowedFd<'_>) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    // SAFETY: fcntl F_GETFD/F_SETFD take and return plain ints.
    let flags = syscall!(fcntl(raw, libc::F_GETFD))
        .map_err(|e| super::context(e, format!("fcntl F_GETFD fd {raw}")))?;
    // SAFETY: as above.
    syscall!(fcntl(raw, libc::F_SETFD, flags & !libc::FD_CLOEXEC))
        .map_err(|e| super::context(e, format!("fcntl F_SETFD fd {raw}")))?;
    Ok(())
}

/// Takes ownership of descriptor `raw` that this process inherited, after checking
/// that it is open; makes it close-on-exec again.
pub fn take_inherited(raw: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_GETFD only asks whether `raw` is an open descriptor.
    let flags = syscall!(fcntl(raw, libc::F_GETFD))
        .map_err(|e| super::context(e, format!("inherited fd {raw}")))?;
    // SAFETY: as above; sets the close-on-exec flag.
    syscall!(fcntl(raw, libc::F_SETFD, flags | libc::FD_CLOEXEC))
        .map_err(|e| super::context(e, format!("fcntl F_SETFD fd {raw}")))?;
    // SAFETY: the descriptor is open (checked above) and was handed to this process
    // for it alone to own; nothing else in the process refers to it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Sends all of `data` with `fds` attached to its first byte. Blocks (the socket is
/// blocking) until everything is written or the socket's send timeout passes.
pub fn send_with_fds(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    assert!(
        fds.len() <= MAX_FDS,
        "at most MAX_FDS descriptors per message"
    );
    let mut sent = 0;
    if !fds.is_empty() || !data.is_empty() {
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let payload = size_of::<RawFd>() * raw.len();
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
        // u64 elements keep the control buffer aligned for cmsghdr.
        let mut control = vec![0u64; space.div_ceil(8).max(1)];
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        // SAFETY: a zeroed msghdr is a valid empty one; the fields are set below.
        let mut msg: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !raw.is_empty() {
            msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = space as _;
            // SAFETY: the control buffer holds CMSG_SPACE(payload) bytes, so the first
            // header and `payload` bytes of data fit in it.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
                std::ptr::copy_nonoverlapping(
                    raw.as_ptr() as *const u8,
                    libc::CMSG_DATA(cmsg),
                    payload,
                );
            }
        }
        // SAFETY: `msg` points at a valid iovec and control buffer that outlive the call.
        let n = loop {
            match syscall!(sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other.map_err(|e| super::context(e, "sendmsg SCM_RIGHTS"))?,
            }
        };
        sent = n as usize;
    }
    while sent < data.len() {
        // SAFETY: writes from a valid slice.
        match syscall!(send(
            sock.as_raw_fd(),
            data[sent..].as_ptr() as *const libc::c_void,
            data.len() - sent,
            libc::MSG_NOSIGNAL
        )) {
            Ok(n) => sent += n as usize,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(super::context(e, "send on the hand-over socket")),
        }
    }
    Ok(())
}

/// Reads exactly `buf.len()` bytes (a message head) and the descriptors attached to
/// them. Returns Ok(false) on a clean end of stream before the first byte.
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        let space = {
            // SAFETY: CMSG_SPACE only computes a size.
            unsafe { libc::CMSG_SPACE((size_of::<RawFd>() * MAX_FDS) as u32) as usize }
        };
        let mut control = vec![0u64; space.div_ceil(8)];
        let mut iov = libc::iovec {
            iov_base: buf[got..].as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len() - got,
        };
        // SAFETY: a zeroed msghdr is a valid empty one; the fields are set below.
        let mut msg: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        // SAFETY: `msg` points at a valid iovec and control buffer that outlive the
        // call; MSG_CMSG_CLOEXEC makes received descriptors close-on-exec at once.
        let n = match syscall!(recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC)) {
            Ok(n) => n as usize,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(super::context(e, "recvmsg on the hand-over socket")),
        };
        // Take ownership of every descriptor that arrived before anything can fail.
        // SAFETY: the kernel filled `msg_controllen` bytes of the control buffer with
        // well-formed headers; CMSG_NXTHDR walks only within them.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(cmsg);
                    let len = (*cmsg).cmsg_len as usize - (data as usize - cmsg as usize);
                    for i in 0..len / size_of::<RawFd>() {
                        let raw = std::ptr::read_unaligned((data as *const RawFd).add(i));
                        fds.push(OwnedFd::from_raw_fd(raw));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(io::Error::other(
                "recvmsg: descriptors were cut off (MSG_CTRUNC): more than MAX_FDS in one message",
            ));
        }
        if n == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    Ok(true)
}

/// Sets how long a blocking send or receive on `sock` may wait (SO_SNDTIMEO and
/// SO_RCVTIMEO): a hand-over never hangs on a peer process that stopped.
pub fn set_timeouts(sock: BorrowedFd<'_>, timeout: std::time::Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    for opt in [libc::SO_SNDTIMEO, libc::SO_RCVTIMEO] {
        // SAFETY: passes a valid timeval and its size.
        syscall!(setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            &tv as *const _ as *const libc::c_void,
            size_of::<libc::timeval>() as libc::socklen_t
        ))
        .map_err(|e| super::context(e, "setsockopt SO_SNDTIMEO/SO_RCVTIMEO"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn descriptors_and_bytes_arrive_together_message_by_message() {
        let (a, b) = socketpair().unwrap();
        let (p1, p2) = socketpair().unwrap();
        send_with_fds(a.as_fd(), b"head1body-one", &[p1.as_fd()]).unwrap();
        send_with_fds(a.as_fd(), b"head2", &[p2.as_fd(), p1.as_fd()]).unwrap();
        let mut fds = Vec::new();
        let mut head = [0u8; 5];
        assert!(recv_with_fds(b.as_fd(), &mut head, &mut fds).unwrap());
        assert_eq!(&head, b"head1");
        assert_eq!(fds.len(), 1);
        let mut body = [0u8; 8];
        assert!(recv_with_fds(b.as_fd(), &mut body, &mut fds).unwrap());
        assert_eq!(&body, b"body-one");
        assert_eq!(fds.len(), 1, "no descriptors with the rest of a message");
        assert!(recv_with_fds(b.as_fd(), &mut head, &mut fds).unwrap());
        assert_eq!(&head, b"head2");
        assert_eq!(fds.len(), 3);
        drop(a);
        assert!(!recv_with_fds(b.as_fd(), &mut head, &mut fds).unwrap());
    }
}
