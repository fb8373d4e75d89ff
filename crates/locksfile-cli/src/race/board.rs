//! The racers' board: memory shared by every racer (an anonymous
//! `MAP_SHARED` mapping made before the fork), written only while holding
//! a track's lock, in which collisions, lost counts, order breaks and each
//! racer's wait times show.

use std::sync::atomic::{AtomicU64, Ordering};

use super::waits::{WaitHistogram, WAIT_BUCKETS};

/// Board layout, in 64-bit words; each racer and track gets its own
/// 64-byte line so the racers do not slow each other through false sharing.
pub const LINE: usize = 8;
pub const COLLISIONS: usize = 0;
pub const ORDER_BREAKS: usize = 1;
pub const DEADLOCK_RETRIES: usize = 2;
pub const MSG_CLAIM: usize = 3;
pub const MSG_LEN: usize = 4;
pub const MSG_AT: usize = LINE;
pub const MSG_WORDS: usize = 4 * LINE;
pub const FIRST_RACER_LINE: usize = 5;
/// Words of a racer's wait times (buckets and the longest wait), in
/// whole lines, after the tracks' lines.
const WAIT_WORDS: usize = (WAIT_BUCKETS + 1).div_ceil(LINE) * LINE;

pub struct Board<'a> {
    pub w: &'a [AtomicU64],
    pub procs: usize,
    pub tracks: u64,
}

impl Board<'_> {
    pub fn words_for(procs: usize, tracks: usize) -> usize {
        (FIRST_RACER_LINE + procs + tracks) * LINE + procs * WAIT_WORDS
    }

    /// Racer `racer`'s wait times: its buckets, then its longest wait.
    fn waits(&self, racer: usize) -> &[AtomicU64] {
        let at = (FIRST_RACER_LINE + self.procs + self.tracks as usize) * LINE + racer * WAIT_WORDS;
        &self.w[at..at + WAIT_BUCKETS + 1]
    }

    /// Written once by each racer, at its end (steps record into a
    /// private histogram: the board's lines are busy enough).
    pub fn put_waits(&self, racer: usize, h: &WaitHistogram) {
        let w = self.waits(racer);
        for (slot, &n) in w.iter().zip(&h.buckets) {
            slot.store(n, Ordering::Relaxed);
        }
        w[WAIT_BUCKETS].store(h.max_us, Ordering::Release);
    }

    /// Every racer's wait times together.
    pub fn all_waits(&self) -> WaitHistogram {
        let mut all = WaitHistogram::default();
        for r in 0..self.procs {
            let w = self.waits(r);
            let mut h = WaitHistogram {
                max_us: w[WAIT_BUCKETS].load(Ordering::Acquire),
                ..WaitHistogram::default()
            };
            for (b, slot) in h.buckets.iter_mut().zip(w) {
                *b = slot.load(Ordering::Relaxed);
            }
            all.merge(&h);
        }
        all
    }
    pub fn pos(&self, racer: usize) -> &AtomicU64 {
        &self.w[(FIRST_RACER_LINE + racer) * LINE]
    }
    pub fn occupant(&self, track: u64) -> &AtomicU64 {
        &self.w[(FIRST_RACER_LINE + self.procs + track as usize) * LINE]
    }
    pub fn counter(&self, track: u64) -> &AtomicU64 {
        &self.w[(FIRST_RACER_LINE + self.procs + track as usize) * LINE + 1]
    }
    pub fn start_of(&self, racer: usize) -> u64 {
        racer as u64 * self.tracks / self.procs as u64
    }

    /// Count a problem in `counter` (if any) and keep the first message.
    pub fn note(&self, counter: Option<usize>, msg: impl FnOnce() -> String) {
        if let Some(c) = counter {
            self.w[c].fetch_add(1, Ordering::Relaxed);
        }
        if self.w[MSG_CLAIM]
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            let msg = msg();
            let bytes = &msg.as_bytes()[..msg.len().min(MSG_WORDS * 8)];
            for (k, chunk) in bytes.chunks(8).enumerate() {
                let mut b = [0u8; 8];
                b[..chunk.len()].copy_from_slice(chunk);
                self.w[MSG_AT + k].store(u64::from_le_bytes(b), Ordering::Relaxed);
            }
            self.w[MSG_LEN].store(bytes.len() as u64, Ordering::Release);
        }
    }

    pub fn first_message(&self) -> Option<String> {
        let len = self.w[MSG_LEN].load(Ordering::Acquire) as usize;
        if len == 0 {
            return None;
        }
        let mut bytes = Vec::with_capacity(len);
        for k in 0..len.div_ceil(8) {
            bytes.extend_from_slice(&self.w[MSG_AT + k].load(Ordering::Relaxed).to_le_bytes());
        }
        bytes.truncate(len);
        Some(String::from_utf8_lossy(&bytes).into_owned())
    }

    pub fn enter(&self, racer: usize, at: u64, count: bool) {
        let track = at % self.tracks;
        let before = self
            .occupant(track)
            .swap(racer as u64 + 1, Ordering::AcqRel);
        if before != 0 {
            self.note(Some(COLLISIONS), || {
                format!(
                    "racer {racer} entered track {track} (lap {}) while racer {} was on it",
                    at / self.tracks,
                    before - 1
                )
            });
        }
        if count {
            // A plain read-modify-write: only the lock keeps it whole.
            let c = self.counter(track).load(Ordering::Acquire);
            self.counter(track).store(c + 1, Ordering::Release);
        }
        self.pos(racer).store(at, Ordering::Release);
    }

    pub fn leave(&self, racer: usize, at: u64) {
        let track = at % self.tracks;
        let before = self.occupant(track).swap(0, Ordering::AcqRel);
        if before != racer as u64 + 1 {
            self.note(Some(COLLISIONS), || {
                let found = match before {
                    0 => "nobody".to_string(),
                    b => format!("racer {}", b - 1),
                };
                format!("racer {racer} left track {track} and found {found} on it")
            });
        }
    }

    pub fn check_order(&self, racer: usize, at: u64) {
        let k = self.procs;
        if k < 2 {
            return;
        }
        let n = self.tracks as i64;
        let p = at as i64;
        let next = (racer + 1) % k;
        let prev = (racer + k - 1) % k;
        let ahead = self.pos(next).load(Ordering::Acquire) as i64 + if next == 0 { n } else { 0 };
        let behind = self.pos(prev).load(Ordering::Acquire) as i64 - if racer == 0 { n } else { 0 };
        if !(p < ahead && ahead < p + n && p - n < behind && behind < p) {
            self.note(Some(ORDER_BREAKS), || {
                format!(
                    "order broken: racer {racer} at position {p} has racer {next} at {ahead} \
                     ahead and racer {prev} at {behind} behind (ring of {n})"
                )
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn board(words: &[AtomicU64], procs: usize, tracks: u64) -> Board<'_> {
        Board {
            w: words,
            procs,
            tracks,
        }
    }

    fn words(procs: usize, tracks: usize) -> Vec<AtomicU64> {
        (0..Board::words_for(procs, tracks))
            .map(|_| AtomicU64::new(0))
            .collect()
    }

    #[test]
    fn order_check_accepts_the_ring_and_catches_overtaking_and_lapping() {
        let w = words(3, 10);
        let b = board(&w, 3, 10);
        let place = |p: [u64; 3]| {
            for (r, at) in p.into_iter().enumerate() {
                b.pos(r).store(at, Ordering::Relaxed);
            }
        };
        let breaks = || w[ORDER_BREAKS].load(Ordering::Relaxed);
        assert_eq!((b.start_of(0), b.start_of(1), b.start_of(2)), (0, 3, 6));

        place([1, 3, 6]);
        b.check_order(0, 1);
        place([12, 18, 20]); // a lap on, still in order
        b.check_order(1, 18);
        b.check_order(2, 20);
        b.check_order(0, 12);
        assert_eq!(breaks(), 0);

        place([4, 3, 6]); // racer 0 passed racer 1
        b.check_order(0, 4);
        assert_eq!(breaks(), 1);
        place([1, 11, 6]); // racer 1 a lap ahead of racer 0: also behind it
        b.check_order(0, 1);
        assert_eq!(breaks(), 2);
        place([10, 13, 20]); // racer 2 caught up with racer 0 a lap on
        b.check_order(2, 20);
        assert_eq!(breaks(), 3);
        assert!(b
            .first_message()
            .unwrap()
            .starts_with("order broken: racer 0"));
    }

    #[test]
    fn wait_times_of_every_racer_add_up() {
        let w = words(3, 10);
        let b = board(&w, 3, 10);
        for r in 0..3 {
            let mut h = WaitHistogram::default();
            for _ in 0..=r {
                h.record(std::time::Duration::from_micros(100 << r));
            }
            b.put_waits(r, &h);
        }
        // The waits lie past every track: the tracks' words are untouched.
        assert!((0..10).all(|t| b.counter(t).load(Ordering::Relaxed) == 0));
        let all = b.all_waits();
        assert_eq!((all.count(), all.max_us), (6, 400));
        assert_eq!(all.buckets[6], 1);
        assert_eq!(all.buckets[8], 3);
    }

    #[test]
    fn occupancy_and_counts() {
        let w = words(2, 4);
        let b = board(&w, 2, 4);
        b.enter(0, 1, true);
        b.leave(0, 1);
        b.enter(1, 5, true); // track 1 again, a lap on
        assert_eq!(w[COLLISIONS].load(Ordering::Relaxed), 0);
        b.enter(0, 1, true); // racer 1 is still on track 1
        assert_eq!(w[COLLISIONS].load(Ordering::Relaxed), 1);
        b.leave(1, 5); // finds racer 0 there
        assert_eq!(w[COLLISIONS].load(Ordering::Relaxed), 2);
        assert_eq!(b.counter(1).load(Ordering::Relaxed), 3);
        assert!(b
            .first_message()
            .unwrap()
            .contains("while racer 1 was on it"));
    }
}
