//! systemd without libsystemd: readiness notifications (sd_notify(3)) and socket
//! activation (sd_listen_fds(3)).
//!
//! Notifications: a service that systemd starts as `Type=notify` finds in
//! NOTIFY_SOCKET the address of an AF_UNIX datagram socket (a path, or with a leading
//! '@' a name in the abstract namespace). A state change is one datagram of
//! newline-separated `KEY=value` lines: "READY=1" when it serves, "STOPPING=1" when it
//! drains. Without NOTIFY_SOCKET every notification does nothing. The variable is left
//! set: a process that a reload starts inherits it and announces itself through it.
//!
//! Socket activation: systemd (or `systemd-socket-activate`) binds and listens, then
//! starts the service with the sockets at fds 3, 4, ... and LISTEN_FDS=n,
//! LISTEN_PID=<the service's pid>. LISTEN_PID guards against variables leaked by a
//! parent that was itself activated: the fds are taken only if it names this process.
//! Every inherited socket is a connection listener, in the order of the socket unit's
//! `ListenStream=` lines. LISTEN_FDNAMES (the units' `FileDescriptorName=`) is not
//! read: names would matter only to tell a metrics socket apart, and the metrics
//! endpoint binds `--metrics-listen` itself.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::time::Duration;

use super::{socket, syscall};

/// The first inherited descriptor (SD_LISTEN_FDS_START): after stdin, stdout, stderr.
pub const LISTEN_FDS_START: RawFd = 3;

/// How long a notification may wait for room in systemd's receive queue. The send
/// blocks only if systemd has stopped reading; a drain must not hang on it.
const NOTIFY_SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// Sends `state` (newline-separated `KEY=value` lines) to the service manager as one
/// datagram. `Ok(false)` when NOTIFY_SOCKET is unset or empty: not started by systemd,
/// or not as `Type=notify`.
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(socket) if !socket.is_empty() => send_state(&socket, state).map(|()| true),
        _ => Ok(false),
    }
}

/// The service serves: systemd ends the start-up job and starts units ordered after it.
pub fn ready() -> io::Result<bool> {
    notify("READY=1")
}

/// A reload begins; a READY=1 must follow when it is done. `Type=notify-reload` needs
/// the CLOCK_MONOTONIC time with it, to match the message to the reload it requested.
pub fn reloading() -> io::Result<bool> {
    notify(&reloading_state(monotonic_usec()?))
}

/// The service drains and will exit: systemd shows it as deactivating.
pub fn stopping() -> io::Result<bool> {
    notify("STOPPING=1")
}

/// `pid` is now the service's main process: what a new process sends when it takes
/// over from the one a reload replaces (the unit needs `NotifyAccess=all`, since the
/// sender is not yet the main process).
pub fn main_pid(pid: u32) -> io::Result<bool> {
    notify(&format!("MAINPID={pid}"))
}

/// One line of free text that `systemctl status` shows.
pub fn status(text: &str) -> io::Result<bool> {
    notify(&status_state(text))
}

/// A newline would end the STATUS= line and start a bogus `KEY=value` line.
fn status_state(text: &str) -> String {
    format!("STATUS={}", text.replace('\n', " "))
}

fn reloading_state(monotonic_usec: u64) -> String {
    format!("RELOADING=1\nMONOTONIC_USEC={monotonic_usec}")
}

/// Sends one datagram to the NOTIFY_SOCKET address `socket` from a new unbound socket.
fn send_state(socket: &OsStr, state: &str) -> io::Result<()> {
    let shown = socket.to_string_lossy();
    let addr = notify_address(socket)?;
    // std creates it SOCK_CLOEXEC, so no child inherits it.
    let sender = UnixDatagram::unbound()
        .map_err(|e| super::context(e, "socket AF_UNIX SOCK_DGRAM for NOTIFY_SOCKET"))?;
    sender
        .set_write_timeout(Some(NOTIFY_SEND_TIMEOUT))
        .map_err(|e| super::context(e, "setsockopt SO_SNDTIMEO for NOTIFY_SOCKET"))?;
    let sent = sender
        .send_to_addr(state.as_bytes(), &addr)
        .map_err(|e| super::context(e, format!("sendto NOTIFY_SOCKET {shown}")))?;
    if sent != state.len() {
        // A datagram goes whole or not at all; this would be a kernel bug.
        return Err(io::Error::other(format!(
            "sendto NOTIFY_SOCKET {shown}: sent {sent} of {} bytes",
            state.len()
        )));
    }
    Ok(())
}

/// Parses NOTIFY_SOCKET: an absolute path, or '@' and a name in the abstract namespace
/// (whose address starts with a NUL byte instead). Other forms (a relative path,
/// systemd 254's "vsock:" addresses) are refused, as libsystemd refuses them.
fn notify_address(socket: &OsStr) -> io::Result<UnixAddr> {
    let bytes = socket.as_bytes();
    let addr = match bytes.first() {
        Some(b'@') => UnixAddr::from_abstract_name(&bytes[1..]),
        Some(b'/') => UnixAddr::from_pathname(socket),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not an absolute path or an @abstract name",
        )),
    };
    addr.map_err(|e| super::context(e, format!("NOTIFY_SOCKET={}", socket.to_string_lossy())))
}

/// CLOCK_MONOTONIC in microseconds, the clock systemd's MONOTONIC_USEC= is in.
fn monotonic_usec() -> io::Result<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into a valid struct.
    syscall!(clock_gettime(libc::CLOCK_MONOTONIC, &mut ts))
        .map_err(|e| super::context(e, "clock_gettime CLOCK_MONOTONIC"))?;
    Ok(ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000)
}

/// The listening sockets systemd passed to this process (socket activation), each
/// checked to be a listening TCP socket and made non-blocking and close-on-exec; empty
/// when none were passed. LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES are unset whatever
/// they said, so that no child process takes them for its own.
///
/// Call it before starting any thread: unsetting a variable races with reading the
/// environment in another thread (the reason `remove_var` is unsafe in Rust 2024).
pub fn listen_fds() -> io::Result<Vec<OwnedFd>> {
    let listen_pid = std::env::var_os("LISTEN_PID");
    let listen_fds = std::env::var_os("LISTEN_FDS");
    for name in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(name);
    }
    take_listen_fds(
        std::process::id(),
        listen_pid.as_deref(),
        listen_fds.as_deref(),
    )
}

/// [`listen_fds`] once the variables are read: takes fds 3.. if `listen_pid` names
/// `our_pid`. Checks every fd before owning any, so that an error closes none of them.
fn take_listen_fds(
    our_pid: u32,
    listen_pid: Option<&OsStr>,
    listen_fds: Option<&OsStr>,
) -> io::Result<Vec<OwnedFd>> {
    let Some(listen_pid) = listen_pid else {
        return Ok(Vec::new());
    };
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
    let pid: u32 = parse_env(listen_pid).ok_or_else(|| {
        invalid(format!(
            "LISTEN_PID={}: not a process id",
            listen_pid.to_string_lossy()
        ))
    })?;
    // Meant for another process (a parent that was activated and leaked them), or
    // no count, which libsystemd too reads as none.
    let (true, Some(listen_fds)) = (pid == our_pid, listen_fds) else {
        return Ok(Vec::new());
    };
    let shown = listen_fds.to_string_lossy();
    let count: RawFd = parse_env(listen_fds)
        .filter(|n: &RawFd| (0..=RawFd::MAX - LISTEN_FDS_START).contains(n))
        .ok_or_else(|| invalid(format!("LISTEN_FDS={shown}: not a number of descriptors")))?;
    let fds = LISTEN_FDS_START..LISTEN_FDS_START + count;
    for raw in fds.clone() {
        // SAFETY: F_GETFD only reads the descriptor's flags; it fails with EBADF if
        // `raw` is not open, which must be found out before borrowing it.
        syscall!(fcntl(raw, libc::F_GETFD)).map_err(|e| {
            super::context(e, format!("LISTEN_FDS={shown}: fcntl F_GETFD fd {raw}"))
        })?;
        // SAFETY: `raw` is open (checked above) and nothing else in this process uses
        // it: systemd handed it to this process, and only this function takes it.
        let fd = unsafe { BorrowedFd::borrow_raw(raw) };
        socket::adopt_listener(fd)
            .map_err(|e| super::context(e, format!("LISTEN_FDS={shown}: fd {raw}")))?;
    }
    Ok(fds
        // SAFETY: each fd is open and a listening socket (checked above), handed to
        // this process to own, and owned by nothing else.
        .map(|raw| unsafe { OwnedFd::from_raw_fd(raw) })
        .collect())
}

fn parse_env<T: std::str::FromStr>(value: &OsStr) -> Option<T> {
    value.to_str()?.parse().ok()
}

/// Spawns `cmd` socket-activated, as `systemd-socket-activate` would: `listeners` at
/// fds 3, 4, ..., LISTEN_FDS set to their number and LISTEN_PID to the child's pid.
/// For tests: `cargo test` checks socket activation with nothing installed.
///
/// The parent cannot know the child's pid before the fork, so the child writes it into
/// its environment itself, and execs from the `pre_exec` hook with an environment and
/// arguments built beforehand (std would exec with its own copy of the environment,
/// which the hook cannot change). The child's environment is this process's with the
/// `env` and `env_remove` changes of `cmd` applied (`env_clear` is not seen), and no
/// LISTEN_FDNAMES; stdio, the working directory and the rest of `cmd` apply as usual.
///
/// A failure in the child (placing an fd, exec) ends it with status 127, as a shell
/// reports a command it cannot run, rather than as an error from `spawn`: the pipe
/// std reports such errors through may sit at one of fds 3.. and be overwritten.
#[doc(hidden)]
pub fn spawn_activated(mut cmd: Command, listeners: &[BorrowedFd<'_>]) -> io::Result<Child> {
    let count = RawFd::try_from(listeners.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many listeners"))?;
    // Copies above the target range, so that placing one at 3 + i in the child never
    // overwrites another not yet placed. Close-on-exec, so no other child inherits them.
    let staged = listeners
        .iter()
        .map(|fd| dup_at_least(*fd, LISTEN_FDS_START + count))
        .collect::<io::Result<Vec<OwnedFd>>>()?;
    let argv = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| c_string(a.to_owned()))
        .collect::<io::Result<Vec<CString>>>()?;
    let mut env: std::collections::BTreeMap<OsString, OsString> = std::env::vars_os().collect();
    for (key, value) in cmd.get_envs() {
        match value {
            Some(value) => env.insert(key.to_owned(), value.to_owned()),
            None => env.remove(key),
        };
    }
    for name in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        env.remove(OsStr::new(name));
    }
    env.insert("LISTEN_FDS".into(), count.to_string().into());
    let env = env
        .into_iter()
        .map(|(mut key, value)| {
            key.push("=");
            key.push(value);
            c_string(key)
        })
        .collect::<io::Result<Vec<CString>>>()?;
    let mut plan = ExecPlan::new(argv, env, staged);
    // SAFETY: the hook runs in the forked child and makes only async-signal-safe calls
    // (dup2, getpid, execvpe, _exit) and writes into memory it owns; see ExecPlan.
    unsafe { cmd.pre_exec(move || plan.exec_in_child()) };
    cmd.spawn()
}

/// What the forked child of [`spawn_activated`] needs to exec, built in the parent so
/// that the child allocates nothing (after a fork in a threaded process, malloc may be
/// locked forever by a thread that no longer exists).
struct ExecPlan {
    /// Kept alive for the pointers in `argv_ptrs`.
    _argv: Vec<CString>,
    /// Kept alive for the pointers in `env_ptrs`.
    _env: Vec<CString>,
    /// "LISTEN_PID=" and room for the digits and the NUL, which the child fills in.
    /// Touched only through `listen_pid_ptr` once that is taken.
    _listen_pid: Vec<u8>,
    listen_pid_ptr: *mut u8,
    argv_ptrs: Vec<*const libc::c_char>,
    env_ptrs: Vec<*const libc::c_char>,
    /// The listeners, to be placed at 3, 4, ... in the child.
    staged: Vec<OwnedFd>,
}

const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";
/// The prefix, 10 digits (a pid_t is at most 2^31 - 1) and the NUL.
const LISTEN_PID_ENTRY: usize = LISTEN_PID_PREFIX.len() + 10 + 1;

// SAFETY: the raw pointers point into the CStrings and the buffer the plan owns,
// whose heap memory never moves; only the forked child (a copy of the memory) writes
// through them.
unsafe impl Send for ExecPlan {}
// SAFETY: as above; a shared plan is only read.
unsafe impl Sync for ExecPlan {}

impl ExecPlan {
    fn new(argv: Vec<CString>, env: Vec<CString>, staged: Vec<OwnedFd>) -> ExecPlan {
        let mut listen_pid = LISTEN_PID_PREFIX.to_vec();
        listen_pid.resize(LISTEN_PID_ENTRY, 0);
        // One raw pointer for both the environment array and the child's write: a
        // pointer from `as_mut_ptr` stays valid while no reference to the contents is made.
        let listen_pid_ptr = listen_pid.as_mut_ptr();
        let null = std::iter::once(std::ptr::null());
        let argv_ptrs = argv
            .iter()
            .map(|a| a.as_ptr())
            .chain(null.clone())
            .collect();
        let env_ptrs = env
            .iter()
            .map(|e| e.as_ptr())
            .chain(std::iter::once(listen_pid_ptr as *const libc::c_char))
            .chain(null)
            .collect();
        ExecPlan {
            _argv: argv,
            _env: env,
            _listen_pid: listen_pid,
            listen_pid_ptr,
            argv_ptrs,
            env_ptrs,
            staged,
        }
    }

    /// Runs in the forked child: places the listeners, writes LISTEN_PID, execs. Never
    /// returns.
    fn exec_in_child(&mut self) -> io::Result<()> {
        for (i, fd) in self.staged.iter().enumerate() {
            // dup2 clears close-on-exec on the copy, so the program inherits it.
            // SAFETY: both are plain descriptor numbers; the source is open.
            if unsafe { libc::dup2(fd.as_raw_fd(), LISTEN_FDS_START + i as RawFd) } == -1 {
                // SAFETY: _exit is async-signal-safe and ends only this child.
                unsafe { libc::_exit(127) };
            }
        }
        // SAFETY: getpid has no preconditions.
        let pid = unsafe { libc::getpid() };
        // SAFETY: the buffer has LISTEN_PID_ENTRY bytes, the prefix and room for 10
        // digits and a NUL after it; nothing else refers to it in the child.
        let digits = unsafe {
            std::slice::from_raw_parts_mut(
                self.listen_pid_ptr.add(LISTEN_PID_PREFIX.len()),
                LISTEN_PID_ENTRY - LISTEN_PID_PREFIX.len(),
            )
        };
        write_decimal(digits, pid as u32);
        // SAFETY: the program and both arrays are NUL-terminated strings and
        // null-terminated pointer arrays into memory the plan owns. execvpe returns
        // only on failure, and _exit then ends the child.
        unsafe {
            libc::execvpe(
                self.argv_ptrs[0],
                self.argv_ptrs.as_ptr(),
                self.env_ptrs.as_ptr(),
            );
            libc::_exit(127)
        }
    }
}

/// Writes `n` in decimal and a NUL into `out`, without allocating.
fn write_decimal(out: &mut [u8], mut n: u32) {
    let mut digits = [0u8; 10];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for (slot, digit) in out.iter_mut().zip(digits[..len].iter().rev()) {
        *slot = *digit;
    }
    out[len] = 0;
}

fn c_string(s: OsString) -> io::Result<CString> {
    CString::new(s.into_vec()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// A close-on-exec copy of `fd` numbered `min` or above (fcntl F_DUPFD_CLOEXEC).
fn dup_at_least(fd: BorrowedFd<'_>, min: RawFd) -> io::Result<OwnedFd> {
    let raw = fd.as_raw_fd();
    // SAFETY: F_DUPFD_CLOEXEC takes a descriptor and a number and returns a new one.
    let copy = syscall!(fcntl(raw, libc::F_DUPFD_CLOEXEC, min))
        .map_err(|e| super::context(e, format!("fcntl F_DUPFD_CLOEXEC fd {raw}")))?;
    // SAFETY: `copy` is new and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(copy) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A name no other test (or concurrent test run) uses.
    fn unique(what: &str) -> String {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        format!("edgepoll-{what}-{}-{n}", std::process::id())
    }

    #[track_caller]
    fn receive(receiver: &UnixDatagram) -> Vec<u8> {
        receiver
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = receiver.recv(&mut buf).expect("a notification");
        buf[..n].to_vec()
    }

    #[test]
    fn a_state_arrives_as_exactly_one_datagram_at_a_path() {
        let dir = std::env::temp_dir().join(unique("notify"));
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("notify.sock");
        let receiver = UnixDatagram::bind(&path).unwrap();
        send_state(path.as_os_str(), "READY=1\nSTATUS=serving").unwrap();
        send_state(path.as_os_str(), "STOPPING=1").unwrap();
        assert_eq!(receive(&receiver), b"READY=1\nSTATUS=serving");
        assert_eq!(receive(&receiver), b"STOPPING=1");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_leading_at_names_an_abstract_socket() {
        let name = unique("notify-abstract");
        let receiver = UnixDatagram::bind_addr(&UnixAddr::from_abstract_name(&name).unwrap())
            .expect("bind an abstract socket");
        send_state(OsStr::new(&format!("@{name}")), "READY=1").unwrap();
        assert_eq!(receive(&receiver), b"READY=1");
    }

    #[test]
    fn a_relative_or_foreign_address_is_refused_by_name() {
        for bad in ["notify.sock", "vsock:2:1234"] {
            let err = send_state(OsStr::new(bad), "READY=1").unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
            assert_eq!(
                err.to_string(),
                format!("NOTIFY_SOCKET={bad}: not an absolute path or an @abstract name")
            );
        }
    }

    #[test]
    fn sending_to_a_socket_nobody_bound_names_the_call_and_the_path() {
        let path = std::env::temp_dir().join(unique("nobody"));
        let err = send_state(path.as_os_str(), "READY=1").unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("sendto NOTIFY_SOCKET {}: ", path.display())),
            "{err}"
        );
    }

    #[test]
    fn states_are_formatted_as_systemd_reads_them() {
        assert_eq!(status_state("serving\necho"), "STATUS=serving echo");
        assert_eq!(
            reloading_state(12_345_678),
            "RELOADING=1\nMONOTONIC_USEC=12345678"
        );
        let a = monotonic_usec().unwrap();
        let b = monotonic_usec().unwrap();
        assert!(a > 0 && b >= a, "{a} then {b}");
    }

    #[test]
    fn listen_fds_for_another_process_or_none_are_ignored() {
        let ours = std::process::id();
        let other = (ours + 1).to_string();
        let taken = |pid: Option<&str>, fds: Option<&str>| {
            take_listen_fds(ours, pid.map(OsStr::new), fds.map(OsStr::new))
        };
        assert!(taken(Some(&other), Some("1")).unwrap().is_empty());
        assert!(taken(None, Some("1")).unwrap().is_empty());
        assert!(taken(Some(&ours.to_string()), Some("0"))
            .unwrap()
            .is_empty());
        assert!(taken(Some(&ours.to_string()), None).unwrap().is_empty());
    }

    #[test]
    fn malformed_listen_variables_are_errors_that_name_them() {
        let ours = std::process::id().to_string();
        let err = take_listen_fds(1, Some(OsStr::new("x1")), None).unwrap_err();
        assert_eq!(err.to_string(), "LISTEN_PID=x1: not a process id");
        for fds in ["-1", "two", ""] {
            let err = take_listen_fds(
                std::process::id(),
                Some(OsStr::new(&ours)),
                Some(OsStr::new(fds)),
            )
            .unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("LISTEN_FDS={fds}: not a number of descriptors")
            );
        }
    }

    #[test]
    fn decimals_are_written_with_a_nul() {
        let mut out = [0xffu8; 11];
        write_decimal(&mut out, 4_194_304);
        assert_eq!(&out[..8], b"4194304\0");
        write_decimal(&mut out, 0);
        assert_eq!(&out[..2], b"0\0");
        write_decimal(&mut out, u32::MAX);
        assert_eq!(&out, b"4294967295\0");
    }
}
