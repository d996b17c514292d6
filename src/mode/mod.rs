//! Protocol handlers. The worker owns the event loop, the buffers, the timers and the
//! counters; a mode only decides what bytes go where when a connection is served.

pub mod echo;

use crate::metrics::{CloseReason, Counters};

/// What a mode needs from its worker while it serves one connection.
pub struct Io<'a> {
    /// The worker's read buffer, reused by every connection.
    pub buf: &'a mut [u8],
    /// `--max-pending-bytes`: the outbound cap behind backpressure.
    pub cap: usize,
    /// The worker's plain counters.
    pub counters: &'a mut Counters,
    /// Worker clock in ms, for activity stamps.
    pub now_ms: u64,
}

/// How a connection stands after it was served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Waiting for the next edge.
    Idle,
    /// It spent its budget with input still queued: serve it again before sleeping.
    Again,
    /// Close it.
    Close(CloseReason),
}

/// Bytes a connection may read per wake-up before others get their turn: four reads
/// of the worker buffer, enough to amortise the wake-up, small enough that a bulk
/// sender delays the others by well under a millisecond.
pub const READ_BUDGET: usize = 4 * READ_BUFFER_SIZE;

/// The worker's read buffer: 64 KiB moves a bulk stream in a few large syscalls and
/// is allocated once per worker, not per connection.
pub const READ_BUFFER_SIZE: usize = 64 * 1024;
