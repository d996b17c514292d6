//! TCP sockets: listen, accept4, connect, read, write and the options edgepoll sets.
//!
//! Every descriptor is created non-blocking and close-on-exec, and goes straight into
//! an `OwnedFd`. Writes use MSG_NOSIGNAL, so a peer that resets raises EPIPE, never
//! SIGPIPE.

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::syscall;

/// Creates a listening TCP socket bound to `addr` with the given backlog.
///
/// SO_REUSEADDR lets a restarted server bind while old connections sit in
/// TIME_WAIT. IPv6 sockets are IPV6_V6ONLY so that `[::]:P` and `0.0.0.0:P` can both be
/// listened on, as separate `--listen` flags, without EADDRINUSE.
pub fn listen(addr: SocketAddr, backlog: u32) -> io::Result<OwnedFd> {
    let fd = new_socket(&addr).map_err(|e| super::context(e, format!("socket for {addr}")))?;
    set_int_option(fd.as_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)
        .map_err(|e| super::context(e, format!("setsockopt SO_REUSEADDR on {addr}")))?;
    if addr.is_ipv6() {
        set_int_option(fd.as_fd(), libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)
            .map_err(|e| super::context(e, format!("setsockopt IPV6_V6ONLY on {addr}")))?;
    }
    let (raw, len) = to_raw(&addr);
    // SAFETY: `raw` is a valid sockaddr of `len` bytes for the socket's family.
    syscall!(bind(
        fd.as_raw_fd(),
        &raw as *const _ as *const libc::sockaddr,
        len
    ))
    .map_err(|e| super::context(e, format!("bind {addr}")))?;
    let backlog = backlog.min(i32::MAX as u32) as i32;
    // SAFETY: plain call on a descriptor we own.
    syscall!(listen(fd.as_raw_fd(), backlog))
        .map_err(|e| super::context(e, format!("listen {addr}")))?;
    Ok(fd)
}

fn new_socket(addr: &SocketAddr) -> io::Result<OwnedFd> {
    let domain = match addr {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: socket takes only integer arguments and returns a new descriptor.
    let fd = syscall!(socket(
        domain,
        libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        0
    ))?;
    // SAFETY: `fd` is new and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Accepts one connection as a non-blocking, close-on-exec socket.
/// `Err(WouldBlock)` means the accept queue is empty.
pub fn accept(listener: BorrowedFd<'_>) -> io::Result<(OwnedFd, SocketAddr)> {
    let mut storage = MaybeUninit::<libc::sockaddr_storage>::zeroed();
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes of address into `storage`.
    let fd = syscall!(accept4(
        listener.as_raw_fd(),
        storage.as_mut_ptr() as *mut libc::sockaddr,
        &mut len,
        libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC
    ))?;
    // SAFETY: `fd` is new and owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: zeroed storage is a valid sockaddr_storage; accept4 filled its prefix.
    let storage = unsafe { storage.assume_init() };
    let addr = from_raw(&storage).unwrap_or(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
    Ok((fd, addr))
}

/// Starts a non-blocking connect. The socket becomes writable when the connect
/// completes; `take_error` then tells whether it succeeded.
pub fn connect_nonblocking(addr: SocketAddr) -> io::Result<OwnedFd> {
    let fd = new_socket(&addr).map_err(|e| super::context(e, format!("socket for {addr}")))?;
    let (raw, len) = to_raw(&addr);
    // SAFETY: `raw` is a valid sockaddr of `len` bytes for the socket's family.
    match syscall!(connect(
        fd.as_raw_fd(),
        &raw as *const _ as *const libc::sockaddr,
        len
    )) {
        Ok(_) => Ok(fd),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(fd),
        Err(e) => Err(super::context(e, format!("connect {addr}"))),
    }
}

/// Reads into `buf`. `Ok(0)` is the peer's FIN; EINTR is retried.
///
/// A raw `recvfrom` system call rather than glibc's `recv`: glibc's is a thread
/// cancellation point and brackets the call with enable/disable-asynccancel, about 60
/// instructions a call, which callgrind put at a fifth of edgepoll's user-space cost
/// per echoed message. edgepoll never cancels threads.
#[inline]
pub fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`; the null
        // address and length say no source address is wanted.
        match syscall!(syscall(
            libc::SYS_recvfrom,
            fd.as_raw_fd() as libc::c_long,
            buf.as_mut_ptr() as libc::c_long,
            buf.len() as libc::c_long,
            0 as libc::c_long,
            0 as libc::c_long,
            0 as libc::c_long
        )) {
            Ok(n) => return Ok(n as usize),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Copies up to `buf.len()` received bytes into `buf` without consuming them
/// (MSG_PEEK): the next read returns them again. `Ok(0)` is the peer's FIN with
/// nothing before it; EINTR is retried. The PROXY header reader peeks, so that the
/// bytes after the header stay in the kernel for the mode, as if the header had never
/// been there. New bytes arriving raise a new EPOLLIN edge whether or not earlier ones
/// were read, so peeking does not break the edge-triggered rules.
pub fn peek(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
        match syscall!(recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            libc::MSG_PEEK
        )) {
            Ok(n) => return Ok(n as usize),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(super::context(
                    e,
                    format!("recv MSG_PEEK fd {}", fd.as_raw_fd()),
                ))
            }
        }
    }
}

/// Writes from `buf` without raising SIGPIPE; EINTR is retried. A raw `sendto`, for
/// the reason [`read`] gives.
#[inline]
pub fn write(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: the kernel reads at most `buf.len()` bytes from `buf`; a null address
        // of length 0 sends on the connected socket.
        match syscall!(syscall(
            libc::SYS_sendto,
            fd.as_raw_fd() as libc::c_long,
            buf.as_ptr() as libc::c_long,
            buf.len() as libc::c_long,
            libc::MSG_NOSIGNAL as libc::c_long,
            0 as libc::c_long,
            0 as libc::c_long
        )) {
            Ok(n) => return Ok(n as usize),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Sends FIN after everything already written: the peer reads EOF, and can still send.
pub fn shutdown_write(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain call on a valid descriptor.
    syscall!(shutdown(fd.as_raw_fd(), libc::SHUT_WR))
        .map(drop)
        .map_err(|e| super::context(e, format!("shutdown SHUT_WR fd {}", fd.as_raw_fd())))
}

/// Stops a listening socket from taking connections without closing it
/// (shutdown(SHUT_RD) on a listener): new SYNs are refused, and [`relisten`] makes it
/// listen again on the same address. Whatever is still queued is reset, so the caller
/// accepts its queue first.
pub fn stop_listening(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain call on a valid descriptor.
    syscall!(shutdown(fd.as_raw_fd(), libc::SHUT_RD))
        .map(drop)
        .map_err(|e| super::context(e, format!("shutdown SHUT_RD fd {}", fd.as_raw_fd())))
}

/// Makes a socket [`stop_listening`] stopped listen again.
pub fn relisten(fd: BorrowedFd<'_>, backlog: u32) -> io::Result<()> {
    let backlog = backlog.min(i32::MAX as u32) as i32;
    // SAFETY: plain call on a valid descriptor.
    syscall!(listen(fd.as_raw_fd(), backlog))
        .map(drop)
        .map_err(|e| super::context(e, format!("listen fd {}", fd.as_raw_fd())))
}

/// Disables Nagle's algorithm: an echo or a response goes out at once instead of
/// waiting for the ACK of the previous one (which delayed ACKs hold back for up to 40 ms).
pub fn set_nodelay(fd: BorrowedFd<'_>) -> io::Result<()> {
    set_int_option(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)
        .map_err(|e| super::context(e, format!("setsockopt TCP_NODELAY fd {}", fd.as_raw_fd())))
}

/// Turns TCP keepalive on or off (SO_KEEPALIVE): with it on, a connection idle for
/// TCP_KEEPIDLE seconds is probed, and one whose peer stopped answering is dropped
/// (reads and writes then fail with ETIMEDOUT).
pub fn set_keepalive(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    set_int_option(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, on as i32)
        .map_err(|e| super::context(e, format!("setsockopt SO_KEEPALIVE fd {}", fd.as_raw_fd())))
}

/// Seconds without traffic before the first keepalive probe (TCP_KEEPIDLE, 1 to
/// 32767 in the kernel).
pub fn set_keepalive_idle(fd: BorrowedFd<'_>, secs: u32) -> io::Result<()> {
    set_int_option(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_KEEPIDLE,
        clamp_int(secs as u64),
    )
    .map_err(|e| super::context(e, format!("setsockopt TCP_KEEPIDLE fd {}", fd.as_raw_fd())))
}

/// Seconds between unanswered keepalive probes (TCP_KEEPINTVL, 1 to 32767).
pub fn set_keepalive_interval(fd: BorrowedFd<'_>, secs: u32) -> io::Result<()> {
    set_int_option(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_KEEPINTVL,
        clamp_int(secs as u64),
    )
    .map_err(|e| super::context(e, format!("setsockopt TCP_KEEPINTVL fd {}", fd.as_raw_fd())))
}

/// Unanswered keepalive probes after which the connection is dropped (TCP_KEEPCNT, 1
/// to 127).
pub fn set_keepalive_count(fd: BorrowedFd<'_>, count: u32) -> io::Result<()> {
    set_int_option(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_KEEPCNT,
        clamp_int(count as u64),
    )
    .map_err(|e| super::context(e, format!("setsockopt TCP_KEEPCNT fd {}", fd.as_raw_fd())))
}

/// Milliseconds sent data may stay unacknowledged (a zero window included) before the
/// kernel drops the connection with ETIMEDOUT (TCP_USER_TIMEOUT); 0 restores the
/// kernel's default (retries per net.ipv4.tcp_retries2). With keepalive on, it also
/// replaces TCP_KEEPCNT: probes go on until this long has passed (tcp(7)).
pub fn set_user_timeout(fd: BorrowedFd<'_>, ms: u32) -> io::Result<()> {
    set_int_option(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_USER_TIMEOUT,
        clamp_int(ms as u64),
    )
    .map_err(|e| {
        super::context(
            e,
            format!("setsockopt TCP_USER_TIMEOUT fd {}", fd.as_raw_fd()),
        )
    })
}

/// A value for an int option; the callers' values are validated well below this.
fn clamp_int(v: u64) -> i32 {
    v.min(i32::MAX as u64) as i32
}

/// The keepalive and user-timeout options of a socket, as the kernel reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepaliveOptions {
    /// SO_KEEPALIVE.
    pub enabled: bool,
    /// TCP_KEEPIDLE, seconds.
    pub idle_secs: u32,
    /// TCP_KEEPINTVL, seconds.
    pub interval_secs: u32,
    /// TCP_KEEPCNT.
    pub count: u32,
    /// TCP_USER_TIMEOUT, milliseconds; 0 is the kernel's default.
    pub user_timeout_ms: u32,
}

/// Reads a socket's [`KeepaliveOptions`] (five getsockopt calls): what tests and the
/// operator's own tools see.
pub fn keepalive_options(fd: BorrowedFd<'_>) -> io::Result<KeepaliveOptions> {
    let get = |level, name, what: &str| {
        get_int_option(fd, level, name)
            .map(|v| v.max(0) as u32)
            .map_err(|e| super::context(e, format!("getsockopt {what} fd {}", fd.as_raw_fd())))
    };
    Ok(KeepaliveOptions {
        enabled: get(libc::SOL_SOCKET, libc::SO_KEEPALIVE, "SO_KEEPALIVE")? != 0,
        idle_secs: get(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, "TCP_KEEPIDLE")?,
        interval_secs: get(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, "TCP_KEEPINTVL")?,
        count: get(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, "TCP_KEEPCNT")?,
        user_timeout_ms: get(
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            "TCP_USER_TIMEOUT",
        )?,
    })
}

/// A new descriptor of this process's TCP socket bound to `local` and connected to
/// `peer`, if it has one: found through /proc/self/fd, duplicated
/// (F_DUPFD_CLOEXEC), and checked after the duplication, so a descriptor closed and
/// reused meanwhile is never mistaken for it. A server started through the library
/// runs in the test's process, so a test reads the options of the very sockets the
/// server accepted and connected (with [`keepalive_options`]).
pub fn find_connection(local: SocketAddr, peer: SocketAddr) -> io::Result<Option<OwnedFd>> {
    let dir = std::fs::read_dir("/proc/self/fd")
        .map_err(|e| super::context(e, "read_dir /proc/self/fd"))?;
    for entry in dir.flatten() {
        let Some(raw) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        // Not a socket, or already closed: skip it without a system call on it.
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().starts_with("socket:["));
        if !is_socket {
            continue;
        }
        // SAFETY: fcntl F_DUPFD_CLOEXEC takes plain ints; a number that is no longer
        // open fails with EBADF and nothing else happens.
        let Ok(dup) = syscall!(fcntl(raw, libc::F_DUPFD_CLOEXEC, 0)) else {
            continue;
        };
        // SAFETY: `dup` is new and owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(dup) };
        let matches = local_addr(fd.as_fd()).is_ok_and(|a| a == local)
            && peer_addr(fd.as_fd()).is_ok_and(|a| a == peer);
        if matches {
            return Ok(Some(fd));
        }
    }
    Ok(None)
}

/// Sets the socket's send buffer (SO_SNDBUF; the kernel doubles the value for its
/// bookkeeping and disables autotuning for this socket). The `pollers` benchmark uses
/// a small one to make writes short, as a slow reader does.
pub fn set_send_buffer(fd: BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
    set_int_option(
        fd,
        libc::SOL_SOCKET,
        libc::SO_SNDBUF,
        bytes.min(i32::MAX as usize) as i32,
    )
    .map_err(|e| super::context(e, format!("setsockopt SO_SNDBUF fd {}", fd.as_raw_fd())))
}

/// Sets the socket's receive buffer (SO_RCVBUF), as [`set_send_buffer`] does.
pub fn set_recv_buffer(fd: BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
    set_int_option(
        fd,
        libc::SOL_SOCKET,
        libc::SO_RCVBUF,
        bytes.min(i32::MAX as usize) as i32,
    )
    .map_err(|e| super::context(e, format!("setsockopt SO_RCVBUF fd {}", fd.as_raw_fd())))
}

/// Makes the next close send RST instead of FIN (SO_LINGER with a zero timeout).
/// Used to abort a connection, and by tests to play a peer that resets.
pub fn set_linger_zero(fd: BorrowedFd<'_>) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: passes a valid linger struct and its size.
    syscall!(setsockopt(
        fd.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_LINGER,
        &linger as *const _ as *const libc::c_void,
        size_of::<libc::linger>() as libc::socklen_t
    ))
    .map(drop)
    .map_err(|e| super::context(e, format!("setsockopt SO_LINGER fd {}", fd.as_raw_fd())))
}

/// The pending socket error (SO_ERROR), cleared by reading it; None if there is none.
pub fn take_error(fd: BorrowedFd<'_>) -> io::Result<Option<io::Error>> {
    let value = get_int_option(fd, libc::SOL_SOCKET, libc::SO_ERROR)
        .map_err(|e| super::context(e, format!("getsockopt SO_ERROR fd {}", fd.as_raw_fd())))?;
    Ok((value != 0).then(|| io::Error::from_raw_os_error(value)))
}

/// Bytes received and not yet read (FIONREAD, which is SIOCINQ on a TCP socket). A
/// close uses it to tell whether input would be dropped unread.
pub fn unread_bytes(fd: BorrowedFd<'_>) -> io::Result<usize> {
    queue_len(fd, libc::FIONREAD, "ioctl FIONREAD")
}

/// Bytes written and not yet acknowledged by the peer (TIOCOUTQ, which is SIOCOUTQ on
/// a TCP socket): what an abort destroys in the kernel's send queue.
pub fn unsent_bytes(fd: BorrowedFd<'_>) -> io::Result<usize> {
    queue_len(fd, libc::TIOCOUTQ, "ioctl TIOCOUTQ")
}

fn queue_len(fd: BorrowedFd<'_>, request: libc::Ioctl, what: &str) -> io::Result<usize> {
    let mut value: libc::c_int = 0;
    // SAFETY: both requests write one int into a valid int.
    syscall!(ioctl(
        fd.as_raw_fd(),
        request,
        &mut value as *mut libc::c_int
    ))
    .map(|_| value.max(0) as usize)
    .map_err(|e| super::context(e, format!("{what} fd {}", fd.as_raw_fd())))
}

/// The address a socket is bound to (the real port after binding port 0).
pub fn local_addr(fd: BorrowedFd<'_>) -> io::Result<SocketAddr> {
    socket_name(fd, libc::getsockname, "getsockname")
}

/// The address of the peer a socket is connected to.
pub fn peer_addr(fd: BorrowedFd<'_>) -> io::Result<SocketAddr> {
    socket_name(fd, libc::getpeername, "getpeername")
}

/// getsockname(2) or getpeername(2), which share their signature.
fn socket_name(
    fd: BorrowedFd<'_>,
    call: unsafe extern "C" fn(
        libc::c_int,
        *mut libc::sockaddr,
        *mut libc::socklen_t,
    ) -> libc::c_int,
    name: &str,
) -> io::Result<SocketAddr> {
    let mut storage = MaybeUninit::<libc::sockaddr_storage>::zeroed();
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `call` is getsockname or getpeername, and the kernel writes at most `len`
    // bytes of address into `storage`.
    let ret = unsafe {
        call(
            fd.as_raw_fd(),
            storage.as_mut_ptr() as *mut libc::sockaddr,
            &mut len,
        )
    };
    super::cvt(ret).map_err(|e| super::context(e, format!("{name} fd {}", fd.as_raw_fd())))?;
    // SAFETY: zeroed storage is valid; the call filled its prefix.
    let storage = unsafe { storage.assume_init() };
    from_raw(&storage).ok_or_else(|| io::Error::other(format!("{name}: not an inet socket")))
}

fn set_int_option(fd: BorrowedFd<'_>, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: passes a valid int and its size.
    syscall!(setsockopt(
        fd.as_raw_fd(),
        level,
        name,
        &value as *const i32 as *const libc::c_void,
        size_of::<i32>() as libc::socklen_t
    ))
    .map(drop)
}

fn get_int_option(fd: BorrowedFd<'_>, level: i32, name: i32) -> io::Result<i32> {
    let mut value: i32 = 0;
    let mut len = size_of::<i32>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into a valid int.
    syscall!(getsockopt(
        fd.as_raw_fd(),
        level,
        name,
        &mut value as *mut i32 as *mut libc::c_void,
        &mut len
    ))?;
    Ok(value)
}

fn to_raw(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn from_raw(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match storage.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin = unsafe { &*(storage as *const _ as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6 = unsafe { &*(storage as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Takes over a listening socket this process did not bind (socket activation, or a
/// reload handing it down): checks that it is a listening TCP socket, makes it
/// non-blocking (the acceptor accepts until EAGAIN) and close-on-exec, and returns
/// the address it is bound to.
pub fn adopt_listener(fd: BorrowedFd<'_>) -> io::Result<SocketAddr> {
    let raw = fd.as_raw_fd();
    let kind = get_int_option(fd, libc::SOL_SOCKET, libc::SO_TYPE)
        .map_err(|e| super::context(e, format!("getsockopt SO_TYPE fd {raw}")))?;
    let listening = get_int_option(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN)
        .map_err(|e| super::context(e, format!("getsockopt SO_ACCEPTCONN fd {raw}")))?;
    let addr = local_addr(fd)?;
    if kind != libc::SOCK_STREAM || listening == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("fd {raw} ({addr}) is not a listening TCP socket"),
        ));
    }
    set_nonblocking_cloexec(fd)?;
    Ok(addr)
}

/// Sets O_NONBLOCK and FD_CLOEXEC on a descriptor this process was handed.
pub fn set_nonblocking_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    // SAFETY: fcntl with F_GETFL/F_SETFL/F_GETFD/F_SETFD takes and returns plain ints.
    let status = syscall!(fcntl(raw, libc::F_GETFL))
        .map_err(|e| super::context(e, format!("fcntl F_GETFL fd {raw}")))?;
    // SAFETY: as above.
    syscall!(fcntl(raw, libc::F_SETFL, status | libc::O_NONBLOCK))
        .map_err(|e| super::context(e, format!("fcntl F_SETFL O_NONBLOCK fd {raw}")))?;
    // SAFETY: as above.
    let fd_flags = syscall!(fcntl(raw, libc::F_GETFD))
        .map_err(|e| super::context(e, format!("fcntl F_GETFD fd {raw}")))?;
    // SAFETY: as above.
    syscall!(fcntl(raw, libc::F_SETFD, fd_flags | libc::FD_CLOEXEC))
        .map_err(|e| super::context(e, format!("fcntl F_SETFD FD_CLOEXEC fd {raw}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_listener_stopped_refuses_and_listens_again_on_the_same_port() {
        // An explicit port stays bound through the shutdown (a port the kernel
        // picked for port 0 does not: it is picked anew).
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = free.local_addr().unwrap();
        drop(free);
        let fd = listen(addr, 16).unwrap();
        assert!(std::net::TcpStream::connect(addr).is_ok());
        stop_listening(fd.as_fd()).unwrap();
        assert_eq!(
            std::net::TcpStream::connect(addr).unwrap_err().kind(),
            io::ErrorKind::ConnectionRefused
        );
        relisten(fd.as_fd(), 16).unwrap();
        assert_eq!(local_addr(fd.as_fd()).unwrap(), addr);
        assert!(std::net::TcpStream::connect(addr).is_ok());
    }

    use super::*;

    #[test]
    fn raw_address_round_trip() {
        for addr in ["127.0.0.1:7000", "[::1]:8080", "[fe80::1%2]:1", "0.0.0.0:0"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let (raw, _) = to_raw(&addr);
            assert_eq!(from_raw(&raw), Some(addr));
        }
    }

    #[test]
    fn listen_on_port_zero_reports_the_bound_port() {
        let fd = listen("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let addr = local_addr(fd.as_fd()).unwrap();
        assert_eq!(addr.ip(), Ipv4Addr::LOCALHOST);
        assert_ne!(addr.port(), 0);
    }

    #[test]
    fn accept_on_an_empty_queue_would_block() {
        let fd = listen("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let err = accept(fd.as_fd()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }
}
