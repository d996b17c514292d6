//! getrlimit(2)/setrlimit(2) for the open-file limit.

use std::io;

use super::syscall;

/// The open-file limit: `(soft, hard)`.
pub fn nofile() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct through a valid pointer.
    syscall!(getrlimit(libc::RLIMIT_NOFILE, &mut lim))
        .map_err(|e| super::context(e, "getrlimit RLIMIT_NOFILE"))?;
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// Sets the soft open-file limit, keeping the hard one. Child processes inherit it.
pub fn set_nofile_soft(soft: u64) -> io::Result<()> {
    let (_, hard) = nofile()?;
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads one valid rlimit struct.
    syscall!(setrlimit(libc::RLIMIT_NOFILE, &lim))
        .map(drop)
        .map_err(|e| super::context(e, format!("setrlimit RLIMIT_NOFILE {soft}")))
}
