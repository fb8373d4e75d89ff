//! The fast lane: one index taken and let go by compare-and-swap on its
//! bucket's lane word, with no mutex; a wait on another owner's fast hold;
//! and what the mutex holder does to lanes (making them slow, taking fast
//! holds over as records, the gate). The word's encoding is in
//! `layout.rs`, the argument in `docs/DESIGN.md`.
//!
//! Who writes a lane word: a fast call, only from `LANE_EMPTY` to its own
//! word and from its own word back to `LANE_EMPTY`; a waiter, adding
//! `LANE_WAITING` to the word it waits on; the mutex holder, anything. The
//! gate is written under the mutex only. An owner's fast list is written by
//! its own calls (an entry listed before its word is written, struck off
//! after it went) and by the mutex holder, by atomic instructions alone.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::engine::Until;
use crate::error::Error;
use crate::kind::Kind;
use crate::span::{Span, INDEX_END};

use super::layout::{
    bucket, code, conflict, fast_of, fast_word, is_fast, lane_index, lane_kind, lane_of,
    lane_owner, Rec, BUCKETS, EXCLUSIVE, LANE_EMPTY, LANE_INDEX_MAX, LANE_MOVING, LANE_SHARED,
    LANE_SLOW, LANE_WAITING, NIL, RECORDS, SLOTS,
};
use super::records::{Near, FINE_SCAN};
use super::table::{TableLock, ENTERED};
use super::Shm;

/// How a wait for another owner's fast hold waits on its lane before it
/// sleeps there: `pause`s watching the word (128 are about 3 µs here), then
/// times it gives the CPU away. On the ring race with 8 processes on 2
/// CPUs (semaphores in the same runs) this ran in about 0.7 of the
/// semaphores' time, against 0.8 to 1 for the table's wait alone, and
/// sleeping at once was slowest; 32 to 256 watches and 10 to 40 yields
/// were within the noise of each other.
pub(super) const LANE_SPINS: u32 = 128;
pub(super) const LANE_YIELDS: u32 = 20;
/// The longest a wait sleeps on a fast hold's lane before the table's
/// wait takes over (and looks for dead holders and deadlocks): detection
/// of both is this much later for a fast hold.
pub(super) const LANE_NAP: Duration = Duration::from_millis(5);

impl TableLock<'_> {
    pub(super) fn gate_open(&self) -> bool {
        self.map.gate().load(Ordering::Relaxed) == 0
    }

    /// Close the gate: from here on no fast hold is granted until a guard
    /// finds nothing spanning more than one index and opens it again.
    pub(super) fn close_gate(&mut self) {
        if self.gate_open() {
            self.map.gate().store(1, Ordering::SeqCst);
        }
    }

    pub(super) fn note_lane(&mut self, l: usize) {
        let l = l as u32;
        if self.n_entered < ENTERED && !self.entered[..self.n_entered].contains(&l) {
            self.entered[self.n_entered] = l;
            self.n_entered += 1;
        }
    }

    /// Whether a single-index waiter's index is in bucket `l`.
    pub(super) fn waits_in(&self, l: usize) -> bool {
        let h = self.header();
        h.waiting > 0
            && (0..h.waiter_hwm as usize).any(|i| {
                let w = self.waiter(i);
                w.owner != 0 && w.end - w.start == 1 && bucket(w.start) == l
            })
    }

    /// Whether a waiter asks for more than one index.
    pub(super) fn waits_wide(&self) -> bool {
        let h = self.header();
        h.waiting > 0
            && (0..h.waiter_hwm as usize).any(|i| {
                let w = self.waiter(i);
                w.owner != 0 && w.end - w.start > 1
            })
    }

    /// Before the mutex goes: give back the lanes whose bucket is empty,
    /// and open the gate when nothing spans more than one index.
    pub(super) fn leave(&mut self) {
        if self.repairing {
            return;
        }
        for k in 0..self.n_entered {
            let l = self.entered[k] as usize;
            let lane = self.map.lane(l);
            if lane.load(Ordering::Relaxed) == LANE_SLOW
                && *self.bucket_head(l) == NIL
                && !self.waits_in(l)
            {
                lane.store(LANE_EMPTY, Ordering::Release);
            }
        }
        self.n_entered = 0;
        if !self.gate_open() && self.header().coarse_count == 0 && !self.waits_wide() {
            self.map.gate().store(0, Ordering::SeqCst);
        }
    }

    /// Whether owner `o` may hold index `i` at `kind` beside the records.
    /// Waiters are not asked: a fast hold granted before a waiter queued
    /// must never be taken away, and one that was not granted and is made
    /// a record instead only gets ahead of a waiter in that narrow window.
    pub(super) fn may_hold(&self, o: u32, i: u64, kind: u32) -> bool {
        self.conflicting_record(o, i, i + 1, kind).is_none()
    }

    /// Turn the fast word `w` in lane `l` into a record of its owner, so
    /// the table sees that hold. `false`: no record is free for it. With
    /// the gate closed, a fast word that the table could not grant was
    /// taken after the gate closed, so its taker will see the gate closed
    /// and not count it granted: that word is taken away instead.
    pub(super) fn adopt(&mut self, l: usize, mut w: u64) -> bool {
        let lane = self.map.lane(l);
        let (o, i, kind) = (lane_owner(w), lane_index(w), lane_kind(w));
        // A waiter may mark the word meanwhile: that changes nothing here.
        let base = w & !LANE_WAITING;
        let same = |x: u64| x & !LANE_WAITING == base;
        if !self.gate_open() && !self.may_hold(o, i, kind) {
            loop {
                match lane.compare_exchange(w, LANE_SLOW, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => break,
                    Err(now) if same(now) => w = now,
                    Err(_) => return true,
                }
            }
            self.map.unlist(o, l);
            self.note_lane(l);
            self.map.woke_lane(l, w);
            return true;
        }
        if self.header().free_count == 0 {
            return false;
        }
        // Moving first: the owner's own release (or take-back) now fails
        // and goes to the mutex, which we hold.
        loop {
            match lane.compare_exchange(w, w | LANE_MOVING, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(now) if same(now) => w = now,
                Err(_) => return true,
            }
        }
        let n = self.alloc();
        *self.rec(n) = Rec {
            start: i,
            end: i + 1,
            owner: 0,
            kind,
            next: NIL,
            onext: NIL,
            oprev: NIL,
            _pad: 0,
        };
        self.rec(n).owner = o + 1;
        self.link(n);
        lane.store(LANE_SLOW, Ordering::Release);
        self.map.unlist(o, l);
        self.note_lane(l);
        self.map.woke_lane(l, w);
        true
    }

    /// Make lane `l` slow, turning a fast hold there into a record; its
    /// bucket is then the table's until `leave` gives it back. `false`: no
    /// record is free for the fast hold.
    pub(super) fn enter_lane(&mut self, l: usize) -> bool {
        let lane = self.map.lane(l);
        loop {
            let w = lane.load(Ordering::Acquire);
            if w == LANE_SLOW {
                self.note_lane(l);
                return true;
            }
            if w == LANE_EMPTY {
                if lane
                    .compare_exchange(w, LANE_SLOW, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    self.note_lane(l);
                    return true;
                }
                continue;
            }
            if w & LANE_MOVING != 0 || !is_fast(w) {
                // Only a repair leaves these behind; put it right first.
                self.settle_lane(l);
                continue;
            }
            if !self.adopt(l, w) {
                return false;
            }
        }
    }

    /// Turn the fast holds on `s..e` into records. `false`: no record free.
    pub(super) fn adopt_range(&mut self, s: u64, e: u64) -> bool {
        if e - s <= FINE_SCAN {
            for i in s..e.min(LANE_INDEX_MAX + 1) {
                let l = bucket(i);
                loop {
                    let w = self.map.lane(l).load(Ordering::SeqCst);
                    if !is_fast(w) || lane_index(w) != i {
                        break;
                    }
                    if !self.adopt(l, w) {
                        return false;
                    }
                }
            }
            return true;
        }
        // Every fast hold is on its owner's list (listed before taken).
        for o in 0..self.header().slot_hwm.min(SLOTS as u32) {
            let map = self.map;
            for l in map.listed_lanes(o) {
                loop {
                    let w = self.map.lane(l).load(Ordering::SeqCst);
                    if !fast_of(w, o, &(s..e)) {
                        break;
                    }
                    if !self.adopt(l, w) {
                        return false;
                    }
                }
            }
        }
        true
    }

    /// Make the table see every hold in the way of a request for `pieces`:
    /// a single index's lane goes slow; a wider piece, or several pieces
    /// (whose wait spans from the first to the last), close the gate and
    /// turn the fast holds on that span into records. `false`: no record
    /// free.
    pub(super) fn prepare(&mut self, pieces: &[Span]) -> bool {
        if let (true, Some(first), Some(last)) = (pieces.len() > 1, pieces.first(), pieces.last()) {
            self.close_gate();
            if !self.adopt_range(first.start(), last.end()) {
                return false;
            }
        }
        for p in pieces {
            let (s, e) = (p.start(), p.end());
            if e - s == 1 {
                if !self.enter_lane(bucket(s)) {
                    return false;
                }
            } else {
                // Closed first: a fast hold taken on the piece from here on
                // is not granted, and the scan below sees every one before.
                self.close_gate();
                if !self.adopt_range(s, e) {
                    return false;
                }
            }
        }
        true
    }

    /// Owner `me` lets go of its fast holds on `s..e`: what it sets there
    /// next is kept as records. Slow, not empty: the records that replace
    /// them go in next, and no fast call may come between.
    pub(super) fn drop_own_fast(&mut self, me: u32, s: u64, e: u64) {
        for l in self.end_fast(me, s..e, LANE_SLOW) {
            self.map.unlist(me, l);
            self.note_lane(l);
        }
    }

    /// Turn every fast word of owner `o` on `span` into `to` (again while
    /// only a waiter's mark gets in the way), waking their sleepers; the
    /// lanes where it did.
    pub(super) fn end_fast(&self, o: u32, span: std::ops::Range<u64>, to: u64) -> Vec<usize> {
        let mut ended = Vec::new();
        for l in self.map.listed_lanes(o) {
            let lane = self.map.lane(l);
            loop {
                let w = lane.load(Ordering::Acquire);
                if !fast_of(w, o, &span) {
                    break;
                }
                if lane
                    .compare_exchange(w, to, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    self.map.woke_lane(l, w);
                    ended.push(l);
                    break;
                }
            }
        }
        ended
    }

    /// The whole run of indices owner `o` holds at `kind` around `s..e`,
    /// over its records and fast holds alike: the span the kernel would
    /// report, as it merges an owner's touching locks of one kind.
    pub(super) fn extent(&self, o: u32, kind: u32, mut s: u64, mut e: u64) -> (u64, u64) {
        let holds_at = |i: u64| -> Option<(u64, u64)> {
            if self.holds_fast(o, i) == Some(kind) {
                return Some((i, i + 1));
            }
            let mut near = Near::default();
            self.mine_near(o, i, i + 1, &mut near);
            let found = near.iter().map(|at| *self.rec(at)).find(|r| r.kind == kind);
            found.map(|r| (r.start, r.end))
        };
        for _ in 0..RECORDS {
            match s.checked_sub(1).and_then(holds_at) {
                Some((t, _)) => s = t,
                None => break,
            }
        }
        for _ in 0..RECORDS {
            match (e < INDEX_END).then(|| holds_at(e)).flatten() {
                Some((_, u)) => e = u,
                None => break,
            }
        }
        (s, e)
    }

    /// The kind at which `me` holds index `i` on the fast lane, if it does.
    pub(super) fn holds_fast(&self, me: u32, i: u64) -> Option<u32> {
        if i > LANE_INDEX_MAX {
            return None;
        }
        let w = self.map.lane(bucket(i)).load(Ordering::Acquire);
        (w & !(LANE_SHARED | LANE_WAITING) == fast_word(me, i, EXCLUSIVE)).then(|| lane_kind(w))
    }

    /// Forget every fast hold of the owner in `slot` (dead or leaving).
    pub(super) fn clear_fast(&mut self, slot: u32) {
        self.end_fast(slot, 0..u64::MAX, LANE_EMPTY);
        // The owner is gone (or going): no call of its lists anything.
        for entry in self.map.fast_list(slot) {
            entry.store(0, Ordering::Release);
        }
    }

    /// Put lane `l` right after a repair: a half-made adoption is finished
    /// or undone, a dead owner's fast hold dropped, a lane whose bucket is
    /// the table's made slow.
    pub(super) fn settle_lane(&mut self, l: usize) {
        let lane = self.map.lane(l);
        // Fast calls may change the lane meanwhile (only from empty, or
        // from their own word): every change here is a swap from what was
        // read, looked at again when it fails.
        let map = self.map;
        let swap = |from: u64, to: u64| {
            let swapped = lane
                .compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire)
                .is_ok();
            if swapped {
                map.woke_lane(l, from);
            }
            swapped
        };
        loop {
            let w = lane.load(Ordering::Acquire);
            if w != LANE_EMPTY && w != LANE_SLOW && !is_fast(w) {
                // Not a lane word at all: the bucket is the table's.
                if swap(w, LANE_SLOW) {
                    return;
                }
                continue;
            }
            if w & LANE_MOVING != 0 {
                let (o, i) = (lane_owner(w), lane_index(w));
                let mut at = *self.bucket_head(l);
                let mut made = false;
                let mut steps = 0;
                while at != NIL && steps < RECORDS {
                    let r = self.rec(at);
                    made |= r.owner == o + 1 && r.start == i && r.end == i + 1;
                    at = r.next;
                    steps += 1;
                }
                if swap(w, if made { LANE_SLOW } else { w & !LANE_MOVING }) && made {
                    self.map.unlist(o, l);
                }
                continue;
            }
            if is_fast(w) && self.slot(lane_owner(w) as usize).used != 1 {
                swap(w, LANE_EMPTY);
                continue;
            }
            let busy = *self.bucket_head(l) != NIL || self.waits_in(l);
            if busy && w == LANE_EMPTY {
                if swap(w, LANE_SLOW) {
                    return;
                }
                continue;
            }
            if busy && is_fast(w) && self.adopt(l, w) {
                // A fast hold beside records: the table takes it over.
                continue;
            }
            return;
        }
    }

    /// After the derived indices are rebuilt: every lane put right, dead
    /// owners' counts zeroed, the gate closed if anything is wide.
    pub(super) fn settle_lanes(&mut self) {
        for s in 0..SLOTS as u32 {
            if self.slot(s as usize).used != 1 {
                for entry in self.map.fast_list(s) {
                    entry.store(0, Ordering::Release);
                }
            }
        }
        for l in 0..BUCKETS {
            self.settle_lane(l);
        }
        if self.header().coarse_count > 0 || self.waits_wide() {
            self.close_gate();
        }
    }
}

impl Shm {
    /// Whether lane word `w` is another owner's fast hold on index `i`.
    pub(super) fn fast_in_way(&self, w: u64, i: u64, kind: Kind) -> bool {
        is_fast(w)
            && w & LANE_MOVING == 0
            && lane_owner(w) != self.slot
            && lane_index(w) == i
            && conflict(code(kind), lane_kind(w))
    }

    /// Another owner's fast hold is in the way of one index: wait on its
    /// lane alone, with no mutex on either side, and take the index on the
    /// fast lane when it comes free. First watch the word (a holder that
    /// runs lets go within a step of its work), then give the CPU away (a
    /// holder that does not run needs it), then sleep on the word, marked
    /// so that whoever changes it next wakes us, as a semaphore's waiter
    /// would. `Ok(true)`: taken. `Ok(false)`: the table's wait takes over
    /// (which queues fairly and looks for deadlocks and dead holders), as
    /// the lane changed into something else, or after [`LANE_NAP`] of
    /// sleeping. `Err` only for a signal in an interruptible wait.
    pub(super) fn wait_on_lane(
        &self,
        span: Span,
        kind: Kind,
        until: Until<'_>,
    ) -> Result<bool, Error> {
        let Some((i, l)) = lane_of(span) else {
            return Ok(false);
        };
        let lane = self.map.lane(l);
        let (mut spins, mut yields) = (0, 0);
        let mut napping_since = None;
        loop {
            let w = lane.load(Ordering::Acquire);
            if w == LANE_EMPTY {
                return Ok(self.fast_raise(span, kind));
            }
            if !self.fast_in_way(w, i, kind) {
                return Ok(false);
            }
            if spins < LANE_SPINS {
                spins += 1;
                std::hint::spin_loop();
                continue;
            }
            if until.ended().is_some() {
                return Ok(false);
            }
            let now = Instant::now();
            if yields < LANE_YIELDS {
                yields += 1;
                std::thread::yield_now();
                continue;
            }
            let since = *napping_since.get_or_insert(now);
            let mut nap = LANE_NAP.saturating_sub(now - since);
            if let Some(left) = until.left() {
                nap = nap.min(left);
            }
            if nap.is_zero() {
                return Ok(false);
            }
            let marked = w | LANE_WAITING;
            if w != marked
                && lane
                    .compare_exchange(w, marked, Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
            {
                continue;
            }
            let slept = self.map.sleep_on_lane(l, (marked >> 32) as u32, nap);
            match slept.map_err(|e| e.raw_os_error()) {
                Err(Some(libc::EINTR)) if until.interruptible => return Err(Error::Interrupted),
                // Woken, interrupted or timed out: look again (the nap's
                // time left ends it).
                _ => {}
            }
        }
    }
}

impl Shm {
    /// Take one index on the fast lane: three atomic instructions, no
    /// mutex. `false`: not granted this way (the lane is not empty, or the
    /// gate is closed); the caller takes the mutex.
    #[inline(always)]
    pub(super) fn fast_raise(&self, span: Span, kind: Kind) -> bool {
        let Some((i, l)) = lane_of(span) else {
            return false;
        };
        let lane = self.map.lane(l);
        if self.has_deferred.load(Ordering::Relaxed) || lane.load(Ordering::Relaxed) != LANE_EMPTY {
            return false;
        }
        // Listed before the word is written, so that a scan of the lists
        // finds every fast hold.
        let listed = self.map.fast_list(self.slot).iter().any(|e| {
            e.load(Ordering::Relaxed) == 0
                && e.compare_exchange(0, l as u32 + 1, Ordering::SeqCst, Ordering::Relaxed)
                    .is_ok()
        });
        if !listed {
            return false;
        }
        let w = fast_word(self.slot, i, code(kind));
        if lane
            .compare_exchange(LANE_EMPTY, w, Ordering::SeqCst, Ordering::Relaxed)
            .is_err()
        {
            self.map.unlist(self.slot, l);
            return false;
        }
        self.confirm_fast(l, w)
    }

    /// The second half of [`Shm::fast_raise`]: word `w` is in lane `l` (and
    /// listed); whether it is granted.
    #[inline(always)]
    pub(super) fn confirm_fast(&self, l: usize, w: u64) -> bool {
        let lane = self.map.lane(l);
        // Read after the word is written: a guard that closes the gate and
        // then looks at the lanes sees this word, or this read sees it
        // closed (both sequentially consistent).
        if self.map.gate().load(Ordering::SeqCst) == 0 {
            // Open, but it may have closed and opened again since the word
            // went in, and a mutex holder may have taken the word away
            // meanwhile: granted only if it is still there (it is then
            // seen by anyone who closes the gate from here on). If it was
            // made a record of ours instead, the slow way finds that.
            return lane.load(Ordering::SeqCst) & !LANE_WAITING == w;
        }
        // Closed: not granted. Take the word back, unless a mutex holder
        // has taken it over already (then it made it a record of ours if
        // the table could grant it, which the slow way finds).
        self.empty_lane(l, |now| now & !LANE_WAITING == w);
        false
    }

    /// Empty lane `l` while its word is ours as `ours` says (a waiter may
    /// mark it meanwhile), strike it off our list and wake the sleepers.
    /// Whether it was ours.
    #[inline(always)]
    pub(super) fn empty_lane(&self, l: usize, ours: impl Fn(u64) -> bool) -> bool {
        let lane = self.map.lane(l);
        loop {
            let w = lane.load(Ordering::Relaxed);
            if !ours(w) {
                return false;
            }
            if lane
                .compare_exchange(w, LANE_EMPTY, Ordering::Release, Ordering::Relaxed)
                .is_ok()
            {
                self.map.unlist(self.slot, l);
                self.map.woke_lane(l, w);
                return true;
            }
        }
    }

    /// Let go of one index held on the fast lane. `false`: it is not (the
    /// table has taken the hold over, or it was never fast).
    #[inline(always)]
    pub(super) fn fast_lower(&self, span: Span) -> bool {
        let Some((i, l)) = lane_of(span) else {
            return false;
        };
        if self.has_deferred.load(Ordering::Relaxed) {
            return false;
        }
        let ours = fast_word(self.slot, i, EXCLUSIVE);
        self.empty_lane(l, |w| w & !(LANE_SHARED | LANE_WAITING) == ours)
    }
}
