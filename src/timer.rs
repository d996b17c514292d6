//! The timer wheel: at most one entry per connection, whatever its deadlines.
//!
//! A connection has several deadlines (idle timeout, HTTP header timeout, upstream
//! connect timeout, the end of a lingering close), each a field of the state that
//! needs it. The wheel holds one entry per connection, at the earliest of them (or
//! earlier). Traffic does not touch the wheel: a deadline that moves later leaves the
//! entry where it is, and when the entry comes due the worker works out the real
//! deadlines, acts on those that passed, and arms the entry again at the next one. Only
//! a deadline that moves earlier than the armed entry moves it. A closed connection's
//! entry is removed with it, so nothing accumulates.
//!
//! The connection keeps the tick of its entry (`Conn::timer`), so moving or removing
//! an entry looks through one slot, not the wheel.

use std::time::Duration;

use crate::conn::Token;

/// Slots per shortest timeout: that timeout is kept to within 1/64 of its length (a 10 s
/// header timeout fires between 10 and 10.16 s).
const SLOTS_PER_TIMEOUT: u64 = 64;
/// Never tick faster than this, whatever the timeout.
const MIN_TICK_MS: u64 = 10;
/// The wheel spans at most this many ticks; a deadline further out sits in the last
/// slot and is re-armed when it comes due (a 10-minute idle timeout next to a 10 s
/// header timeout re-arms a few times over its life). 4,096 empty slots cost 96 KiB
/// per worker.
const MAX_SLOTS: u64 = 4096;

/// A hashed timing wheel of connection tokens, in milliseconds of the worker clock.
#[derive(Debug)]
pub struct TimerWheel {
    tick_ms: u64,
    slots: Vec<Vec<Token>>,
    /// The first tick not yet expired.
    next_tick: u64,
    /// No armed entry sits before this tick (a lower bound: removals leave it), so
    /// finding the next deadline does not scan thousands of empty slots every loop
    /// turn when every entry is a far idle deadline.
    hint: u64,
    len: usize,
}

impl TimerWheel {
    /// A wheel for deadlines between `shortest` and `longest` ahead of now.
    pub fn new(shortest: Duration, longest: Duration) -> TimerWheel {
        let shortest_ms = (shortest.as_millis() as u64).max(1);
        let longest_ms = (longest.as_millis() as u64).max(shortest_ms);
        let tick_ms = (shortest_ms / SLOTS_PER_TIMEOUT).max(MIN_TICK_MS);
        // A deadline lies at most `longest` ahead of the last expiry, plus rounding.
        let n = (longest_ms / tick_ms + 3).min(MAX_SLOTS) as usize;
        TimerWheel {
            tick_ms,
            slots: vec![Vec::new(); n],
            next_tick: 0,
            hint: 0,
            len: 0,
        }
    }

    /// Number of armed entries.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The tick an entry for `deadline_ms` goes to: rounded up, never in the past, and
    /// no further than the last slot.
    fn tick_for(&self, deadline_ms: u64) -> u64 {
        let n = self.slots.len() as u64;
        deadline_ms
            .div_ceil(self.tick_ms)
            .clamp(self.next_tick, self.next_tick + n - 1)
    }

    /// Makes sure the connection `token`, whose entry is `armed` (its `Conn::timer`),
    /// comes due by `deadline_ms`. An entry already due by then stays; a later one
    /// moves. Returns without touching the wheel in the common case.
    #[inline]
    pub fn arm(&mut self, token: Token, armed: &mut u64, deadline_ms: u64) {
        // The common case, on every serve of a busy connection: its idle deadline
        // moved later, behind the entry it has. A multiply decides it, no division.
        if *armed != 0 && deadline_ms >= (*armed - 1) * self.tick_ms {
            return;
        }
        self.arm_slow(token, armed, deadline_ms);
    }

    #[inline(never)]
    fn arm_slow(&mut self, token: Token, armed: &mut u64, deadline_ms: u64) {
        let tick = self.tick_for(deadline_ms);
        if *armed != 0 {
            if *armed - 1 <= tick {
                return;
            }
            self.remove(token, *armed - 1);
        }
        let n = self.slots.len() as u64;
        self.slots[(tick % n) as usize].push(token);
        self.len += 1;
        self.hint = self.hint.min(tick);
        *armed = tick + 1;
    }

    /// Removes the connection's entry, if it has one (it is closing).
    pub fn disarm(&mut self, token: Token, armed: &mut u64) {
        if *armed != 0 {
            self.remove(token, *armed - 1);
            *armed = 0;
        }
    }

    fn remove(&mut self, token: Token, tick: u64) {
        let n = self.slots.len() as u64;
        let slot = &mut self.slots[(tick % n) as usize];
        if let Some(i) = slot.iter().position(|&t| t == token) {
            slot.swap_remove(i);
            self.len -= 1;
        }
    }

    /// The time the next non-empty slot comes due, if any. Each empty slot is passed
    /// over once per turn of the wheel, not once per call: the scan moves the hint.
    pub fn next_deadline_ms(&mut self) -> Option<u64> {
        if self.len == 0 {
            return None;
        }
        let n = self.slots.len() as u64;
        let from = self.hint.max(self.next_tick);
        let tick = (from..self.next_tick + n).find(|t| !self.slots[(t % n) as usize].is_empty())?;
        self.hint = tick;
        Some(tick * self.tick_ms)
    }

    /// Moves every entry due by `now_ms` into `due`. The caller must clear the
    /// `Conn::timer` of each token it finds (they are no longer in the wheel).
    pub fn expire(&mut self, now_ms: u64, due: &mut Vec<Token>) {
        let end = now_ms / self.tick_ms;
        let n = self.slots.len() as u64;
        if self.len == 0 {
            // Nothing armed: the worker calls this every loop turn, so touch no slot.
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
        let mut wheel = TimerWheel::new(Duration::from_secs(1), Duration::from_secs(1));
        let (mut a, mut b) = (0, 0);
        let mut due = Vec::new();
        wheel.expire(0, &mut due);
        wheel.arm(Token(1), &mut a, 1000);
        wheel.arm(Token(2), &mut b, 500);
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
    fn the_next_deadline_is_found_after_removals_and_expiries() {
        let mut wheel = TimerWheel::new(Duration::from_secs(1), Duration::from_secs(600));
        let (mut near, mut far) = (0, 0);
        wheel.arm(Token(1), &mut far, 600_000);
        wheel.arm(Token(2), &mut near, 500);
        assert!(wheel.next_deadline_ms().unwrap() < 600);
        // The near entry leaves: the hint stays behind it, and the scan finds the far
        // one (once; later calls start from it).
        wheel.disarm(Token(2), &mut near);
        let far_at = wheel.next_deadline_ms().unwrap();
        assert!(
            far_at > 50_000,
            "clamped to the last slot, not lost: {far_at}"
        );
        assert_eq!(wheel.next_deadline_ms(), Some(far_at));
        // An entry armed earlier than the hint is found at once.
        wheel.arm(Token(3), &mut near, 2_000);
        assert!(wheel.next_deadline_ms().unwrap() <= 2_100);
        let mut due = Vec::new();
        wheel.expire(2_100, &mut due);
        assert_eq!(due, vec![Token(3)]);
        assert_eq!(wheel.next_deadline_ms(), Some(far_at));
    }

    #[test]
    fn a_connection_has_one_entry_however_its_deadline_moves() {
        let mut wheel = TimerWheel::new(Duration::from_secs(1), Duration::from_secs(600));
        let mut armed = 0;
        let token = Token(7);
        // A header deadline that comes and goes, next to a far idle deadline: the
        // pattern of a client flipping between complete and partial heads.
        for now in (0..12_000).step_by(40) {
            wheel.arm(token, &mut armed, now + 600_000);
            wheel.arm(token, &mut armed, now + 1_000);
            assert_eq!(wheel.len(), 1, "at {now} ms");
        }
        // Later deadlines never move the entry: it stays at the earliest.
        let before = armed;
        wheel.arm(token, &mut armed, 900_000);
        assert_eq!(armed, before);
        wheel.disarm(token, &mut armed);
        assert_eq!((wheel.len(), armed), (0, 0));
        let mut due = Vec::new();
        wheel.expire(10_000_000, &mut due);
        assert!(due.is_empty(), "a disarmed entry never fires");
    }

    #[test]
    fn a_late_expiry_takes_everything_due() {
        let mut wheel = TimerWheel::new(Duration::from_millis(100), Duration::from_millis(100));
        let mut due = Vec::new();
        let mut armed = [0u64; 10];
        for i in 0..10 {
            wheel.arm(Token(i), &mut armed[i as usize], 100 + i * 5);
        }
        wheel.expire(60_000, &mut due);
        assert_eq!(due.len(), 10);
        assert_eq!(wheel.len(), 0);
        // Arming after a long gap lands in the future, not in a passed slot.
        let mut late = 0;
        wheel.arm(Token(99), &mut late, 60_100);
        due.clear();
        wheel.expire(60_099, &mut due);
        assert!(due.is_empty());
        wheel.expire(60_110, &mut due);
        assert_eq!(due, vec![Token(99)]);
    }

    #[test]
    fn a_deadline_past_the_span_sits_in_the_last_slot() {
        let mut wheel = TimerWheel::new(Duration::from_secs(1), Duration::from_secs(3600));
        let mut armed = 0;
        wheel.arm(Token(1), &mut armed, 3_600_000);
        let at = wheel.next_deadline_ms().unwrap();
        assert!(at < 3_600_000, "fires early, to be re-armed: {at}");
        assert!(at >= (MAX_SLOTS - 1) * wheel.tick_ms);
    }
}
