//! Per-thread settings.

use std::io;

use super::syscall;

/// Sets the calling thread's timer slack (prctl PR_SET_TIMERSLACK). The default of
/// 50 µs lets the kernel fire a timed wait up to that late, which would show up as
/// latency in a sub-millisecond request schedule.
pub fn set_timer_slack(nanos: u64) -> io::Result<()> {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument; the rest are ignored.
    syscall!(prctl(
        libc::PR_SET_TIMERSLACK,
        nanos as libc::c_ulong,
        0,
        0,
        0
    ))
    .map(drop)
    .map_err(|e| super::context(e, "prctl PR_SET_TIMERSLACK"))
}

/// CPU time the calling thread has used (CLOCK_THREAD_CPUTIME_ID).
pub fn cpu_time() -> io::Result<std::time::Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into a valid struct.
    syscall!(clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts))
        .map_err(|e| super::context(e, "clock_gettime CLOCK_THREAD_CPUTIME_ID"))?;
    Ok(std::time::Duration::new(
        ts.tv_sec as u64,
        ts.tv_nsec as u32,
    ))
}
