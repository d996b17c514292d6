//! The operating-system layer: every `unsafe` block and every libc call lives here.
//!
//! Each wrapper is thin and safe: it takes and returns owned or borrowed file
//! descriptors (`OwnedFd`, `BorrowedFd`) and reports failures as `io::Result`, so a
//! descriptor is owned from the moment the kernel hands it over and closed exactly once.
//! Expected errnos that are not errors for the caller (EINTR on a wait) are absorbed
//! inside the wrapper.
#![allow(unsafe_code)]

pub mod alloc;
pub mod epoll;
pub mod eventfd;
pub mod fdpass;
pub mod mem;
pub mod poll;
pub mod rlimit;
pub mod signal;
pub mod socket;
pub mod splice;
pub mod systemd;
pub mod thread;

use std::io;

/// Turns the C convention "-1 and errno" into an `io::Result`.
///
/// Every libc call in this module goes through this one helper, so the error
/// always carries the errno of the call that failed.
pub(crate) fn cvt<T: IsMinusOne>(ret: T) -> io::Result<T> {
    if ret.is_minus_one() {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

pub(crate) trait IsMinusOne {
    fn is_minus_one(&self) -> bool;
}

impl IsMinusOne for i32 {
    fn is_minus_one(&self) -> bool {
        *self == -1
    }
}

impl IsMinusOne for i64 {
    fn is_minus_one(&self) -> bool {
        *self == -1
    }
}

impl IsMinusOne for isize {
    fn is_minus_one(&self) -> bool {
        *self == -1
    }
}

/// Calls a libc function and converts its "-1 and errno" result.
macro_rules! syscall {
    ($fn:ident ( $($arg:expr),* $(,)? )) => {{
        // SAFETY: every call site passes arguments that satisfy the libc contract of
        // `$fn`, as its own SAFETY comment explains.
        #[allow(unused_unsafe)]
        let ret = unsafe { libc::$fn($($arg),*) };
        $crate::sys::cvt(ret)
    }};
}
pub(crate) use syscall;

/// Adds the name of the failing system call (and what it acted on) to an error, as
/// the messages of this crate do: "accept4 on 127.0.0.1:7000: Too many open files".
pub fn context(err: io::Error, what: impl std::fmt::Display) -> io::Error {
    io::Error::new(err.kind(), format!("{what}: {err}"))
}
