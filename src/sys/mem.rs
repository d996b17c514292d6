//! Machine memory.

use super::syscall;

/// Physical memory in bytes (sysconf _SC_PHYS_PAGES x _SC_PAGESIZE).
pub fn physical_memory() -> Option<u64> {
    // SAFETY: sysconf takes an integer name and returns a value or -1.
    let pages = syscall!(sysconf(libc::_SC_PHYS_PAGES)).ok()?;
    // SAFETY: as above.
    let page = syscall!(sysconf(libc::_SC_PAGESIZE)).ok()?;
    Some(pages as u64 * page as u64)
}
