//! The byte pattern edgeload sends to echo services and verifies on the way back.
//!
//! Byte `p` of the stream of connection `seed` comes from a 65,521-byte random table
//! (65,521 is prime): with `q = p + seed·K`, it is `table[(q mod P + (q div P)·J) mod P]`.
//! Within one pass over the table, consecutive bytes are consecutive table entries, so
//! filling and checking are `memcpy` and `memcmp` of table runs. A dropped, repeated or
//! reordered byte shows up, even a slip of exactly one table length, because each pass
//! starts at a different offset (J); different connections start at different places.

/// Table length: prime, so streams of different seeds do not line up.
const P: usize = 65_521;
/// Stride between the seeds' starting points.
const K: u64 = 7_919;
/// Shift of the table between passes.
const J: usize = 4_099;

/// The shared random table.
#[derive(Clone)]
pub struct Pattern {
    table: Box<[u8]>,
}

impl Default for Pattern {
    fn default() -> Self {
        Pattern::new()
    }
}

impl Pattern {
    pub fn new() -> Pattern {
        // xorshift64*: deterministic, so any edgeload can verify any other's stream.
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let table = (0..P)
            .map(|_| {
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
            })
            .collect();
        Pattern { table }
    }

    /// Calls `f(table_run, start)` for consecutive runs covering `len` bytes of
    /// stream `seed` from `offset`; `start` is the run's position within those bytes.
    fn runs(&self, seed: u64, offset: u64, len: usize, mut f: impl FnMut(&[u8], usize) -> bool) {
        let mut done = 0;
        while done < len {
            let q = offset + done as u64 + seed.wrapping_mul(K) % (P as u64 * 1024);
            let pass = (q / P as u64) as usize;
            let r = (q % P as u64) as usize;
            let idx = (r + pass % P * J) % P;
            // The run ends at the end of this pass or of the table, whichever is first.
            let take = (P - r).min(P - idx).min(len - done);
            if !f(&self.table[idx..idx + take], done) {
                return;
            }
            done += take;
        }
    }

    /// Writes bytes `offset..offset + out.len()` of stream `seed` into `out`.
    pub fn fill(&self, seed: u64, offset: u64, out: &mut [u8]) {
        self.runs(seed, offset, out.len(), |run, at| {
            out[at..at + run.len()].copy_from_slice(run);
            true
        });
    }

    /// Appends `len` bytes of stream `seed` from `offset` to `out`.
    pub fn extend(&self, seed: u64, offset: u64, len: usize, out: &mut Vec<u8>) {
        out.reserve(len);
        self.runs(seed, offset, len, |run, _| {
            out.extend_from_slice(run);
            true
        });
    }

    /// The index of the first byte of `got` that differs from stream `seed` at
    /// `offset`, or None if all match.
    pub fn first_mismatch(&self, seed: u64, offset: u64, got: &[u8]) -> Option<usize> {
        let mut bad = None;
        self.runs(seed, offset, got.len(), |run, at| {
            let part = &got[at..at + run.len()];
            if part != run {
                bad = Some(at + part.iter().zip(run).position(|(a, b)| a != b).unwrap_or(0));
                return false;
            }
            true
        });
        bad
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_and_check_agree_at_any_offset_and_split() {
        let p = Pattern::new();
        let mut whole = vec![0u8; 3 * P + 17];
        p.fill(5, 123, &mut whole);
        assert_eq!(p.first_mismatch(5, 123, &whole), None);
        // Any split point gives the same bytes.
        for split in [0, 1, P - 200, P, 2 * P + 3] {
            let mut a = Vec::new();
            p.extend(5, 123, split, &mut a);
            p.extend(5, 123 + split as u64, whole.len() - split, &mut a);
            assert_eq!(a, whole);
        }
    }

    #[test]
    fn a_flipped_dropped_or_slipped_byte_is_found() {
        let p = Pattern::new();
        let mut buf = vec![0u8; 4 * P];
        p.fill(9, 0, &mut buf);
        let mut flipped = buf.clone();
        flipped[1000] ^= 1;
        assert_eq!(p.first_mismatch(9, 0, &flipped), Some(1000));
        // One byte dropped: everything after it is shifted.
        let dropped = [&buf[..500], &buf[501..]].concat();
        assert_eq!(p.first_mismatch(9, 0, &dropped), Some(500));
        // A slip of exactly one table length.
        assert!(p.first_mismatch(9, 0, &buf[P..2 * P]).is_some());
        // Another connection's stream is not this one's.
        assert!(p.first_mismatch(10, 0, &buf[..64]).is_some());
    }
}
