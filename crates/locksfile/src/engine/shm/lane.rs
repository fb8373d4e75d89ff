//! The fast lane: one index taken and let go by compare-and-swap on its
//! bucket's lane word, with no mutex; a wait on another owner's fast hold;
//! and what the mutex holder does to lanes (making them slow, taking fast
//! holds over as records, the gate). The word's encoding is in
//! `layout.rs`; what touches the words alone is written once, over any
//! atomics ([`Lanes`]), so that `lane/model.rs` runs it under `loom`.
//!
//! # The protocol
//!
//! The shared words, who writes them, and under which lock:
//!
//! | word | written by | how |
//! |---|---|---|
//! | lane word, per bucket | a fast call (no lock) | `EMPTY -> own word`, `own word -> EMPTY`: CAS only |
//! | | a waiter (no lock) | `word -> word \| WAITING`: CAS only |
//! | | the mutex holder | anything, by CAS while the word may be fast (store only over `SLOW` or `MOVING`) |
//! | gate | the mutex holder | store (`SeqCst`) |
//! | an owner's fast list | its own calls (no lock) | an entry `0 -> lane + 1` before its word goes in, `lane + 1 -> 0` after it went: CAS only |
//! | | its fast path (no lock, one call at a time per slot) | a kept entry ([`KEPT`], one per slot of that path) `other lane + 1 -> lane + 1` before its word goes in, when the owner has no word in the other lane; left as it is when the word goes: CAS only |
//! | | the mutex holder | `lane + 1 -> 0` by CAS; a dead owner's list stored 0 |
//! | bucket heads, records | the mutex holder | plain writes (fast calls never read them) |
//!
//! The lane word's states (`F(o,i,k)` is `LANE_FAST | k | o << 40 | i`,
//! `W` is `LANE_WAITING`, `M` is `LANE_MOVING`):
//!
//! | from | to | by | when |
//! |---|---|---|---|
//! | `EMPTY` | `F(o,i,k)` | owner `o`, fast | granted only if the gate then reads open and the word is still there (I3) |
//! | `F` (with or without `W`) | `EMPTY` | owner `o`, fast | a release, or the take-back of a word not granted; wakes if `W` was set (I5) |
//! | `F` | `F \| W` | a waiter | before it sleeps on the word's upper half (I5) |
//! | `EMPTY` | `SLOW` | the mutex holder | it needs the bucket (`enter_lane`) |
//! | `F` (with or without `W`) | `F \| M`, then `SLOW` | the mutex holder | adoption: the hold becomes a record of `o` in between (I4) |
//! | `F` (with or without `W`) | `SLOW` | the mutex holder | gate closed and the table could not grant it: taken away, never granted (I3), or the owner's own call turning its words into records (I6) |
//! | `F` | `EMPTY` | the mutex holder | the owner is dead or leaving (`clear_fast`) |
//! | `SLOW` | `EMPTY` | the mutex holder | its bucket has no record and no single-index waiter (`leave`) |
//! | `F \| M` | `SLOW` or `F` | a repair | the adoption is finished or undone, as the record shows (I4) |
//!
//! The invariants, cited where an ordering or a step relies on one:
//!
//! - **I1** A lane word is `F(o,i,k)` only while bucket `bucket(i)` holds
//!   no record and no single-index waiter: the table sees every hold
//!   there through the word. The mutex holder makes the lane slow before
//!   it lets anything into the bucket (a record goes into the bucket
//!   first and the lane is taken right after, under one guard, so that an
//!   adoption in between sees that record in its way).
//! - **I2** While the gate is open no record or waiter spans more than one
//!   index; it is closed before such a record or waiter exists, and
//!   opened only by a guard that finds none.
//! - **I3** (the gate/lane pairing) A fast word is granted only when, after
//!   writing it, its taker reads the gate open and then the word still in
//!   its lane, all `SeqCst`. A guard that closes the gate and then reads
//!   the lanes (`SeqCst`) sees every word that will be granted. The
//!   argument, once: the taker's CAS (`SeqCst`) precedes its gate load in
//!   the single total order of `SeqCst` operations, and the closer's gate
//!   store precedes its lane loads. If the taker's gate load comes before
//!   the close in that order, it read 0 and the closer's later lane load
//!   comes after the CAS, so it reads the word (or a later one). If it
//!   comes after, it reads the gate closed and the word is not granted.
//!   Store buffering, where each reads the other's old value, is the one
//!   outcome the total order rules out, and the one `Release`/`Acquire`
//!   would allow. A gate that closed and opened again between the CAS and
//!   the gate load is caught by the second lane load: a guard that took
//!   the word away meanwhile left `SLOW` or `EMPTY` there.
//! - **I4** Only the mutex holder takes a word away or over, and only by
//!   CAS from the word it read, so a fast call's CAS from its own word
//!   fails once that happened and it goes to the mutex. Adoption writes
//!   `M` before the record and `SLOW` after it (`Release`), so a repair
//!   after a death in between finds `M` and the record, or `M` alone.
//! - **I5** No lost wake-up: a waiter sleeps only on a word carrying `W`
//!   that it saw (the futex compares it), and every change away from a
//!   word carrying `W` is a CAS or swap from that very word, followed by a
//!   wake. A mark changes nothing else: whoever acts on a word retries
//!   when only `W` was added meanwhile.
//! - **I6** An owner's own words on a span it changes under the mutex turn
//!   `SLOW`, not `EMPTY`, before the records that replace them go in: no
//!   fast call of another owner can come between.
//! - **I7** Every fast word is listed on its owner's list from before it is
//!   written until after it went (`SeqCst` list CAS before the lane CAS),
//!   so a scan of the lists after closing the gate finds every word that
//!   can be granted (I3); removals are swaps of one entry of that lane,
//!   never stores, as threads of one owner list at once. An entry may
//!   outlive its word (a kept entry, so that a pair on one index lists
//!   nothing): a scan finds no word of the owner there and goes on.
//!   Anyone but the owner strikes an entry off only after taking the
//!   owner's word from that lane away, under the mutex, and before the
//!   lane can be empty again; so the owner's fast path, reading the lane
//!   empty (`Acquire`) and then a kept entry naming that lane, reads an
//!   entry that lists it until its word is in.
//! - **I8** A lane word read without the mutex is acted on only by CAS from
//!   it, so a stale read costs a failed CAS and a retry, never a wrong
//!   write: such reads are `Relaxed`, or `Acquire` where what follows reads
//!   what the word's writer wrote before it (the records of `SLOW`).

use std::mem::size_of;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::engine::Until;
use crate::error::Error;
use crate::kind::Kind;
use crate::span::{Span, INDEX_END};

use super::layout::{
    bucket, code, conflict, fast_of, fast_word, is_fast, lane_index, lane_kind, lane_of,
    lane_owner, Rec, BUCKETS, EXCLUSIVE, FAST_HOLDS, LANES_AT, LANE_EMPTY, LANE_INDEX_MAX,
    LANE_MOVING, LANE_SHARED, LANE_SLOW, LANE_WAITING, LISTS_AT, NIL, SLOTS,
};
use super::records::{Near, FINE_SCAN};
use super::table::{touched, Map, TableLock, ENTERED};
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
        // Relaxed: written under the mutex alone, which we hold.
        self.map.gate().load(Ordering::Relaxed) == 0
    }

    /// Close the gate: from here on no fast hold is granted until a guard
    /// finds nothing spanning more than one index and opens it again.
    pub(super) fn close_gate(&mut self) {
        close_gate(self.map);
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
            && (0..self.waiter_hwm()).any(|i| {
                let w = self.waiter(i);
                // Wrapping: an entry corrupted to end before it starts
                // is caught by the check at lock time, never a panic here.
                w.owner != 0 && w.end.wrapping_sub(w.start) == 1 && bucket(w.start) == l
            })
    }

    /// Whether a waiter asks for more than one index.
    pub(super) fn waits_wide(&self) -> bool {
        let h = self.header();
        h.waiting > 0
            && (0..self.waiter_hwm()).any(|i| {
                let w = self.waiter(i);
                w.owner != 0 && w.end.wrapping_sub(w.start) > 1
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
            // Relaxed: `SLOW` is written by the mutex holder alone, and no
            // one else changes it.
            if self.map.lane(l).load(Ordering::Relaxed) == LANE_SLOW
                && self.head(l) == NIL
                && !self.waits_in(l)
            {
                give_back(self.map, l);
            }
        }
        self.n_entered = 0;
        if !self.gate_open() && self.header().coarse_count == 0 && !self.waits_wide() {
            open_gate(self.map);
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
    pub(super) fn adopt(&mut self, l: usize, w: u64) -> bool {
        let (o, i, kind) = (lane_owner(w), lane_index(w), lane_kind(w));
        if !self.gate_open() && !self.may_hold(o, i, kind) {
            // I3: its taker reads the gate closed, or the word gone.
            let Some(w) = swap_word(self.map, l, w, |_| LANE_SLOW) else {
                return true;
            };
            self.map.unlist(o, l);
            self.note_lane(l);
            self.map.woke_lane(l, w);
            return true;
        }
        if self.free_records() == 0 {
            return false;
        }
        // Moving first (I4): the owner's own release (or take-back) now
        // fails and goes to the mutex, which we hold.
        let Some(w) = swap_word(self.map, l, w, |w| w | LANE_MOVING) else {
            return true;
        };
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
        adopted(self.map, l);
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
            // I8: a fast word read here is acted on by CAS alone.
            let w = lane.load(Ordering::Acquire);
            if w == LANE_SLOW {
                self.note_lane(l);
                return true;
            }
            if w == LANE_EMPTY {
                // I1: slow before anything goes into the bucket.
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
                    let w = scan(self.map, l);
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
        // I7: every fast hold is on its owner's list (listed before taken).
        for o in 0..self.header().slot_hwm.min(SLOTS as u32) {
            let map = self.map;
            for l in map.listed_lanes(o) {
                loop {
                    let w = scan(self.map, l);
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
    /// next is kept as records. Slow, not empty (I6): the records that
    /// replace them go in next, and no fast call may come between.
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
            loop {
                // I8: acted on by CAS alone.
                let w = self.map.lane(l).load(Ordering::Acquire);
                if !fast_of(w, o, &span) {
                    break;
                }
                if let Some(w) = swap_word(self.map, l, w, |_| to) {
                    // I5.
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
        // Each step crosses a record or one of the owner's fast holds.
        for _ in 0..self.walk_limit() + FAST_HOLDS {
            match s.checked_sub(1).and_then(holds_at) {
                Some((t, _)) => s = t,
                None => break,
            }
        }
        for _ in 0..self.walk_limit() + FAST_HOLDS {
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
        // I8: read, not acted on; `me`'s word changes only by `me`'s own
        // calls or by the mutex holder (I4), which we are.
        let w = self.map.lane(bucket(i)).load(Ordering::Acquire);
        (w & !(LANE_SHARED | LANE_WAITING) == fast_word(me, i, EXCLUSIVE)).then(|| lane_kind(w))
    }

    /// Forget every fast hold of the owner in `slot` (dead or leaving).
    pub(super) fn clear_fast(&mut self, slot: u32) {
        self.end_fast(slot, 0..u64::MAX, LANE_EMPTY);
        // The owner is gone (or going): no call of its lists anything, so
        // a store is safe here alone (I7: removals are swaps otherwise).
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
            // I8, and I5: a marked word replaced is woken.
            let swapped = lane
                .compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire)
                .is_ok();
            if swapped {
                map.woke_lane(l, from);
            }
            swapped
        };
        loop {
            // I8: acted on by `swap` alone.
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
                let mut at = self.head(l);
                let mut made = false;
                let mut steps = 0;
                while at != NIL && steps < self.walk_limit() {
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
            let busy = self.head(l) != NIL || self.waits_in(l);
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
    /// owners' counts zeroed, the gate closed if anything is wide. Only
    /// the lanes and lists in pages of the sidecar open as `fd` that hold
    /// data: the others are empty.
    pub(super) fn settle_lanes(&mut self, fd: BorrowedFd<'_>) {
        for s in touched(fd, LISTS_AT, 64, SLOTS).into_iter().flatten() {
            let s = s as u32;
            if self.slot(s as usize).used != 1 {
                // No owner: no call lists anything there (I7, as in
                // `clear_fast`).
                for entry in self.map.fast_list(s) {
                    entry.store(0, Ordering::Release);
                }
            }
        }
        for l in touched(fd, LANES_AT, size_of::<u64>(), BUCKETS)
            .into_iter()
            .flatten()
        {
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
        in_way(w, self.slot, i, code(kind))
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
            // I8: acted on by CAS alone.
            let w = lane.load(Ordering::Acquire);
            if w == LANE_EMPTY {
                return Ok(self.fast_raise(span, kind, None));
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
            let Some(half) = mark(&**self.map, l, w) else {
                continue;
            };
            let slept = self.map.sleep_on_lane(l, half, nap);
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
    /// Take one index on the fast lane: two atomic instructions (the list
    /// entry and the word), or one when `keep` names a kept entry
    /// ([`KEPT`]) that lists the lane already; no mutex. `keep` is for the
    /// owner's fast path alone, whose takes through one entry come one at
    /// a time. `false`: not granted this way (the lane is not empty, or the
    /// gate is closed); the caller takes the mutex.
    #[inline(always)]
    pub(super) fn fast_raise(&self, span: Span, kind: Kind, keep: Option<usize>) -> bool {
        let Some((i, l)) = lane_of(span) else {
            return false;
        };
        // Relaxed: this owner's own flag.
        if self.has_deferred.load(Ordering::Relaxed) {
            return false;
        }
        match take(&**self.map, self.slot, i, l, code(kind), keep) {
            Took::Granted => true,
            Took::No => false,
            Took::Gone => {
                if keep.is_some() {
                    self.withdraw(i);
                }
                false
            }
        }
    }

    /// A take through the kept entry was not granted, but a mutex holder
    /// took its word first and may have made it a record of ours. The
    /// owner's fast path takes only while the owner holds nothing (F1 of
    /// `owner/fast.rs`), so what we hold at `i` is that record alone, and
    /// it goes: the fast path's refusal leaves nothing behind, whatever
    /// its caller does next (the usual way may never come to the engine
    /// for this index: a wait for another thread of the owner, a cancel).
    #[cold]
    #[inline(never)]
    fn withdraw(&self, i: u64) {
        // An error here is the table's, which the usual way meets next.
        if let Ok(mut g) = self.lock() {
            self.settle(&mut g);
            self.lower(&mut g, i, i + 1, 0);
        }
    }

    /// The second half of [`Shm::fast_raise`]: word `w` is in lane `l` (and
    /// listed); whether it is granted.
    #[cfg(test)]
    pub(super) fn confirm_fast(&self, l: usize, w: u64) -> bool {
        confirm(&**self.map, self.slot, l, w, false) == Took::Granted
    }

    /// Let go of one index held on the fast lane (taken with `keep` as
    /// [`Shm::fast_raise`] says). `false`: it is not (the table has taken
    /// the hold over, or it was never fast).
    #[inline(always)]
    pub(super) fn fast_lower(&self, span: Span, keep: bool) -> bool {
        let Some((i, l)) = lane_of(span) else {
            return false;
        };
        // Relaxed: this owner's own flag.
        if self.has_deferred.load(Ordering::Relaxed) {
            return false;
        }
        let_go(&**self.map, self.slot, i, l, keep)
    }
}

// The words alone: every step either side takes on the lane words,
// written once over any atomics (`lane/words.rs`).
mod words;
pub(super) use words::*;

#[cfg(all(test, loom))]
mod model;
