//! Issue 14, item 2, as a property of the HTTP session alone: however the input is
//! split into reads and however little room the server gives, the output one call
//! produces stays within the room plus one response, and answering within the room
//! (resuming as the room comes back) gives exactly the bytes answering all at once
//! gives. The fuzz target `http_request` checks the same on arbitrary bytes.

use edgepoll::config::HttpConfig;
use edgepoll::mode::http::{feed_all, Responder, Session};

/// Small deterministic generator (xorshift64*), so a failure names its case.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A pipeline of requests of every framing the server reads, now and then a bad one.
fn pipeline(rng: &mut Rng) -> Vec<u8> {
    let mut input = Vec::new();
    for _ in 0..rng.below(40) + 1 {
        let request: &[u8] = match rng.below(12) {
            0..=4 => b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            5 => b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n",
            6 => b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
            7 => b"PUT /y HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            8 => b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi",
            9 => b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
            10 => b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            _ => b"BREW / HTTP/1.1\r\nHost: a\r\n\r\n",
        };
        input.extend_from_slice(request);
    }
    input
}

/// Serves `reads` as the worker does with `limit` bytes of room per call: held input
/// is answered before more is taken, and a call that stalls is repeated once its
/// output is gone. Returns everything written, checking the bound on every call.
fn serve_within(r: &Responder, reads: &[&[u8]], limit: usize, one_response: usize) -> Vec<u8> {
    let mut session = Session::default();
    let mut held: Vec<u8> = Vec::new();
    let mut written = Vec::new();
    let mut counts = [0u64; 6];
    for read in reads {
        held.extend_from_slice(read);
        loop {
            let mut out = Vec::new();
            let f = r.feed_within(&mut session, &held, limit, &mut out, &mut counts);
            assert!(
                out.len() <= limit + one_response,
                "{} bytes of output for {limit} bytes of room",
                out.len()
            );
            assert!(f.consumed <= held.len());
            written.extend_from_slice(&out);
            if f.close {
                return written;
            }
            held.drain(..f.consumed);
            if !f.stalled {
                break;
            }
            assert!(!out.is_empty(), "a stalled call must have made progress");
        }
    }
    written
}

#[test]
fn output_stays_within_the_room_for_any_split_and_adds_up_to_the_unbounded_answer() {
    let r = Responder::new(&HttpConfig::default());
    // The largest single answer: a 100 Continue and a full keep-alive response.
    let one_response = 25
        + feed_all(&r, &[b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"])
            .0
            .len();
    let mut rng = Rng(0x1405_2026);
    for case in 0..3000 {
        let input = pipeline(&mut rng);
        let limit = match rng.below(3) {
            0 => 1,
            1 => rng.below(400) as usize + 1,
            _ => rng.below(8000) as usize + 1,
        };
        let mut cuts: Vec<usize> = (0..rng.below(6))
            .map(|_| rng.below(input.len() as u64) as usize)
            .collect();
        cuts.sort_unstable();
        let mut reads = Vec::new();
        let mut start = 0;
        for cut in cuts {
            reads.push(&input[start..cut]);
            start = cut;
        }
        reads.push(&input[start..]);
        let whole = feed_all(&r, &[&input]).0;
        let within = serve_within(&r, &reads, limit, one_response);
        assert!(
            whole == within,
            "case {case}: limit {limit}: bounded answers differ from the unbounded ones"
        );
    }
}
