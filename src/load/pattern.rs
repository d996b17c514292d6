//! The byte pattern edgeload sends to echo services and verifies on the way back.
//!
//! Byte `p` of the stream of connection `seed` comes from a 65,521-byte random table
//! (65,521 is prime): with `q = p + seed·K`, it is `table[(q mod P + (q div P)·J) mod P]`,
//! XORed with byte `p mod 8` of the seed. Within one pass over the table, consecutive
//! bytes are consecutive table entries, so filling and checking are copies and
//! comparisons of table runs, eight bytes at a time. A dropped, repeated or reordered
//! byte shows up, even a slip of exactly one table length, because each pass starts at a
//! different offset (J).
//!
//! Every connection of a run has its own seed ([`connection_seed`]: a bijection of the
//! thread, the connection's number in the thread, and a random run nonce), and the seed
//! is the key the bytes are XORed with: two streams with different seeds differ in at
//! least one of every eight consecutive positions wherever in the table they are, so a
//! response of eight bytes or more that went to the wrong connection, or was replayed
//! from another run, never passes as correct.

/// Table length: prime, so streams of different seeds do not line up.
const P: usize = 65_521;
/// Stride between the seeds' starting points.
const K: u64 = 7_919;
/// Shift of the table between passes.
const J: usize = 4_099;

/// The seed of a thread's `counter`-th connection in the run with this `nonce`: distinct
/// for every (thread, counter) pair (thread below 2^24, counter below 2^40), since it is
/// a composition of bijections of `thread << 40 | counter`; a different nonce gives a
/// different set of seeds.
pub fn connection_seed(nonce: u64, thread: usize, counter: u64) -> u64 {
    let index = ((thread as u64) << 40) | (counter & ((1 << 40) - 1));
    mix(mix(index) ^ nonce)
}

/// A random nonce for a run, from the operating system's randomness (through std's
/// hash seeds, so no dependency is needed for eight bytes).
pub fn run_nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    );
    h.finish()
}

/// splitmix64's finaliser: a bijection of u64 that spreads every input bit.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The key as eight bytes, rotated so that index 0 is the key byte of stream position
/// `offset`.
fn key_at(seed: u64, offset: u64) -> u64 {
    seed.rotate_right(8 * (offset % 8) as u32)
}

/// XORs `buf` (stream bytes from position `offset`) with the key.
fn xor_key(buf: &mut [u8], seed: u64, offset: u64) {
    let k = key_at(seed, offset).to_le_bytes();
    let mut chunks = buf.chunks_exact_mut(8);
    let k64 = u64::from_le_bytes(k);
    for c in &mut chunks {
        // The chunk is exactly eight bytes (chunks_exact).
        let v = u64::from_le_bytes(c.try_into().unwrap()) ^ k64;
        c.copy_from_slice(&v.to_le_bytes());
    }
    for (b, k) in chunks.into_remainder().iter_mut().zip(k) {
        *b ^= k;
    }
}

/// The index of the first byte where `got` differs from `run` XOR the key (stream bytes
/// from position `offset`).
fn first_keyed_diff(got: &[u8], run: &[u8], seed: u64, offset: u64) -> Option<usize> {
    let k = key_at(seed, offset).to_le_bytes();
    let k64 = u64::from_le_bytes(k);
    let whole = got.len() / 8 * 8;
    for (n, (g, r)) in got[..whole]
        .chunks_exact(8)
        .zip(run[..whole].chunks_exact(8))
        .enumerate()
    {
        // Both chunks are exactly eight bytes (chunks_exact).
        let g = u64::from_le_bytes(g.try_into().unwrap());
        let r = u64::from_le_bytes(r.try_into().unwrap());
        let d = g ^ r ^ k64;
        if d != 0 {
            return Some(n * 8 + (d.trailing_zeros() / 8) as usize);
        }
    }
    (whole..got.len()).find(|&j| got[j] != run[j] ^ k[j - whole])
}

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
        xor_key(out, seed, offset);
    }

    /// Appends `len` bytes of stream `seed` from `offset` to `out`.
    pub fn extend(&self, seed: u64, offset: u64, len: usize, out: &mut Vec<u8>) {
        out.reserve(len);
        let start = out.len();
        self.runs(seed, offset, len, |run, _| {
            out.extend_from_slice(run);
            true
        });
        xor_key(&mut out[start..], seed, offset);
    }

    /// The index of the first byte of `got` that differs from stream `seed` at
    /// `offset`, or None if all match.
    pub fn first_mismatch(&self, seed: u64, offset: u64, got: &[u8]) -> Option<usize> {
        let mut bad = None;
        self.runs(seed, offset, got.len(), |run, at| {
            let part = &got[at..at + run.len()];
            if let Some(d) = first_keyed_diff(part, run, seed, offset + at as u64) {
                bad = Some(at + d);
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

    #[test]
    fn seeds_are_distinct_over_threads_reconnects_and_runs() {
        // Property: any number of connections over any number of threads, each thread
        // numbering its connections from 1 as it opens (and reopens) them.
        let mut seen = std::collections::HashSet::new();
        for nonce in [0u64, 1, 0xdead_beef, u64::MAX] {
            for thread in [0usize, 1, 2, 63, 1 << 20] {
                for counter in (1..3000u64).chain([1 << 39, (1 << 40) - 1]) {
                    assert!(
                        seen.insert(connection_seed(nonce, thread, counter)),
                        "nonce {nonce} thread {thread} counter {counter}"
                    );
                }
            }
        }
        // The nonce comes from the OS: two runs do not share one.
        assert_ne!(run_nonce(), run_nonce());
    }

    #[test]
    fn a_response_from_any_other_stream_fails_wherever_it_starts() {
        // The worst case of a crossed response: another connection whose stream sits at
        // the same table position (the old seeds collided outright; seeds P·1024 apart
        // still start at the same place). Only the key tells them apart, and any eight
        // bytes cover every key byte.
        let p = Pattern::new();
        for (a, b) in [(1u64, 2u64), (23, 23 ^ 1 << 8), (7, 7 + (P as u64 * 1024))] {
            for offset in [0u64, 64, 3, 65_520, 1 << 33] {
                let mut theirs = vec![0u8; 8];
                p.fill(b, offset, &mut theirs);
                assert!(
                    p.first_mismatch(a, offset, &theirs).is_some(),
                    "{a} {b} {offset}"
                );
            }
        }
        // And streams of many seeds at their own offsets never match one another.
        let seeds: Vec<u64> = (1..200).map(|c| connection_seed(42, 0, c)).collect();
        let mut bufs = Vec::new();
        for &s in &seeds {
            let mut b = vec![0u8; 64];
            p.fill(s, 640, &mut b);
            bufs.push(b);
        }
        for (i, &s) in seeds.iter().enumerate() {
            for (j, b) in bufs.iter().enumerate() {
                assert_eq!(p.first_mismatch(s, 640, b).is_none(), i == j, "{i} {j}");
            }
        }
    }

    #[test]
    fn keyed_check_finds_the_exact_byte() {
        let p = Pattern::new();
        for len in [1usize, 7, 8, 9, 63, 64, 1000] {
            for offset in [0u64, 5, 8, 13] {
                let mut buf = vec![0u8; len];
                p.fill(77, offset, &mut buf);
                assert_eq!(p.first_mismatch(77, offset, &buf), None);
                for at in [0, len / 2, len - 1] {
                    let mut bad = buf.clone();
                    bad[at] ^= 0x80;
                    assert_eq!(
                        p.first_mismatch(77, offset, &bad),
                        Some(at),
                        "{len} {offset}"
                    );
                }
            }
        }
    }
}
