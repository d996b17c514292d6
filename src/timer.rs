//! The idle-timeout wheel: one entry per connection, re-armed lazily.
//!
//! Traffic does not touch the wheel: a connection only stores the time of its last
//! activity. When its slot comes due, the worker compares that time with the timeout
//! and either closes the connection or schedules it again at `last_active + timeout`.
//! Each connection is therefore in exactly one slot, and costs one 8-byte token.

use std::time::Duration;

use crate::conn::Token;

/// Slots per timeout: the timeout is kept to within 1/64 of its length (a 60 s timeout
/// fires between 60 and 61 s), with at most 64 wake-ups per timeout period.
const SLOTS_PER_TIMEOUT: u64 = 64;
/// Never tick faster than this, whatever the timeout.
const MIN_TICK_MS: u64 = 10;

/// A hashed timing wheel of connection tokens, in milliseconds of the worker clock.
#[derive(Debug)]
pub struct IdleWheel {
    tick_ms: u64,
    slots: Vec<Vec<Token>>,
    /// The first tick not yet expired.
    next_tick: u64,
    len: usize,
}

impl IdleWheel {
    pub fn new(timeout: Duration) -> IdleWheel {
        let timeout_ms = (timeout.as_millis() as u64).max(1);
        let tick_ms = (timeout_ms / SLOTS_PER_TIMEOUT).max(MIN_TICK_MS);
        // Deadlines lie at most one timeout ahead of the last expiry, plus rounding.
        let n = (timeout_ms / tick_ms + 3) as usize;
        IdleWheel {
            tick_ms,
            slots: vec![Vec::new(); n],
            next_tick: 0,
            len: 0,
        }
    }

    /// Number of scheduled entries.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Schedules `token` to come due at `deadline_ms` (rounded up to a tick).
    pub fn schedule(&mut self, token: Token, deadline_ms: u64) {
        let n = self.slots.len() as u64;
        let tick = deadline_ms
            .div_ceil(self.tick_ms)
            .clamp(self.next_tick, self.next_tick + n - 1);
        self.slots[(tick % n) as usize].push(token);
        self.len += 1;
    }

    /// The time the next non-empty slot comes due, if any.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        if self.len == 0 {
            return None;
        }
        let n = self.slots.len() as u64;
        (self.next_tick..self.next_tick + n)
            .find(|t| !self.slots[(t % n) as usize].is_empty())
            .map(|t| t * self.tick_ms)
    }

    /// Moves every entry due by `now_ms` into `due`.
    pub fn expire(&mut self, now_ms: u64, due: &mut Vec<Token>) {
        let end = now_ms / self.tick_ms;
        let n = self.slots.len() as u64;
        if self.len == 0 {
            // Nothing scheduled: the worker calls this every loop turn, so touch no slot.
            self.next_tick = self.next_tick.max(end + 1);
            return;
        }
        if end >= self.next_tick + n {
            // The clock passed every slot: take them all at once.
            for slot in &mut self.slots {
                due.append(slot);
            }
            self.len = 0;
            self.next_tick = end + 1;
            return;
        }
        while self.next_tick <= end {
            let slot = &mut self.slots[(self.next_tick % n) as usize];
            self.len -= slot.len();
            due.append(slot);
            self.next_tick += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_come_due_at_their_deadline_and_not_before() {
        // Deadlines are at most one timeout ahead of the clock, as the worker sets them.
        let mut wheel = IdleWheel::new(Duration::from_secs(1));
        let mut due = Vec::new();
        wheel.expire(0, &mut due);
        wheel.schedule(Token(1), 1000);
        wheel.schedule(Token(2), 500);
        let first = wheel.next_deadline_ms().unwrap();
        assert!((500..500 + wheel.tick_ms).contains(&first), "{first}");
        wheel.expire(499, &mut due);
        assert!(due.is_empty());
        wheel.expire(first, &mut due);
        assert_eq!(due, vec![Token(2)]);
        due.clear();
        wheel.expire(999, &mut due);
        assert!(due.is_empty());
        wheel.expire(1000 + wheel.tick_ms, &mut due);
        assert_eq!(due, vec![Token(1)]);
        assert!(wheel.is_empty());
        assert_eq!(wheel.next_deadline_ms(), None);
    }

    #[test]
    fn a_late_expiry_takes_everything_due() {
        let mut wheel = IdleWheel::new(Duration::from_millis(100));
        let mut due = Vec::new();
        for i in 0..10 {
            wheel.schedule(Token(i), 100 + i * 5);
        }
        wheel.expire(60_000, &mut due);
        assert_eq!(due.len(), 10);
        assert_eq!(wheel.len(), 0);
        // Scheduling after a long gap lands in the future, not in a passed slot.
        wheel.schedule(Token(99), 60_100);
        due.clear();
        wheel.expire(60_099, &mut due);
        assert!(due.is_empty());
        wheel.expire(60_110, &mut due);
        assert_eq!(due, vec![Token(99)]);
    }
}
