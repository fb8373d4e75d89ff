//! Lock records: taking and freeing them, linking them into the derived
//! indices, finding an owner's, and setting a span for an owner (converting
//! in place, merging, splitting). All under the mutex ([`TableLock`]).
//!
//! Records never move. An owner sets only its own records; the mutex holder
//! also writes a record for a fast hold the table takes over (`lane.rs`, as
//! the hold's owner's) and frees the records of an owner it purges. Each
//! record's `next`, `onext` and `oprev`, each slot's `head` and `records`,
//! the bucket heads and the header's free and coarse lists and counters are
//! derived: `repair.rs` rebuilds them from the record array.

use std::sync::atomic::Ordering;

use crate::span::INDEX_END;

use super::layout::{
    bucket, conflict, fast_of, lane_kind, overlaps, Rec, LANE_MOVING, LANE_SLOW, NIL, RECORDS,
};
use super::table::TableLock;
use super::RECORD_CAP;

/// Spans up to this long are checked index by index in the hash; longer
/// ones walk every owner's records.
pub(super) const FINE_SCAN: u64 = 64;

/// Records kept back for lowering, which may split a record and must
/// never be refused: a raise that would eat into them is refused instead.
pub(super) const LOWER_RESERVE: usize = 256;

/// Record indices found by [`TableLock::mine_near`]: on the stack unless
/// there are many.
#[derive(Default)]
pub(super) struct Near {
    // Few: a span's neighbourhood holds few records of one owner, and
    // zeroing this is part of every call.
    pub(super) fixed: [u32; 8],
    pub(super) n: usize,
    pub(super) more: Vec<u32>,
}

impl Near {
    pub(super) fn push(&mut self, i: u32) {
        if self.n < self.fixed.len() {
            self.fixed[self.n] = i;
            self.n += 1;
        } else {
            self.more.push(i);
        }
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.fixed[..self.n].iter().chain(&self.more).copied()
    }
}

impl TableLock<'_> {
    pub(super) fn link(&mut self, i: u32) {
        self.relink_tier(i);
        let r = *self.rec(i);
        let slot = self.slot(r.owner.wrapping_sub(1) as usize);
        self.rec(i).onext = slot.head;
        self.rec(i).oprev = NIL;
        if slot.head != NIL {
            self.rec(slot.head).oprev = i;
        }
        slot.head = i;
        slot.records = slot.records.wrapping_add(1);
    }

    /// Take record `i` out of its bucket or the coarse list (not out of
    /// its owner's list).
    pub(super) fn unlink_tier(&mut self, i: u32) {
        let r = *self.rec(i);
        let h = self.header();
        let single = r.end.wrapping_sub(r.start) == 1;
        let head = if single {
            self.head(bucket(r.start))
        } else {
            self.count_down(&mut h.coarse_count, "the coarse list's count");
            h.coarse_head
        };
        if head == i {
            if single {
                self.set_head(bucket(r.start), r.next);
            } else {
                h.coarse_head = r.next;
            }
            return;
        }
        let mut at = head;
        let mut steps = 0;
        while at != NIL && steps <= self.walk_limit() {
            let next = self.rec(at).next;
            if next == i {
                self.rec(at).next = r.next;
                return;
            }
            at = next;
            steps += 1;
        }
    }

    /// A new record of slot `slot`'s, `start..end` at `kind`, not yet
    /// linked. Its owner is written last, so that a repair after a death
    /// in between finds it free or whole (I4).
    pub(super) fn new_record(&mut self, start: u64, end: u64, kind: u32, slot: u32) -> u32 {
        let n = self.alloc();
        *self.rec(n) = Rec {
            start,
            end,
            owner: 0,
            kind,
            next: NIL,
            onext: NIL,
            oprev: NIL,
            _pad: 0,
        };
        self.rec(n).owner = slot + 1;
        n
    }

    /// Records that may still be taken: the free ones, less those kept
    /// from this process by [`cap_for_tests`].
    pub(super) fn free_records(&self) -> usize {
        let kept = RECORDS - RECORD_CAP.load(Ordering::Relaxed).min(RECORDS);
        (self.header().free_count as usize).saturating_sub(kept)
    }

    pub(super) fn alloc(&mut self) -> u32 {
        let h = self.header();
        let i = if h.free_head != NIL {
            let i = h.free_head;
            h.free_head = self.rec(i).next;
            i
        } else {
            h.fresh = h.fresh.wrapping_add(1);
            h.fresh.wrapping_sub(1)
        };
        self.count_down(&mut h.free_count, "the free record count");
        i
    }

    pub(super) fn free(&mut self, i: u32) {
        let h = self.header();
        let r = self.rec(i);
        r.owner = 0;
        r.next = h.free_head;
        h.free_head = i;
        h.free_count = h.free_count.wrapping_add(1);
    }

    /// The first record of another owner in the way of `kind` on `s..e`.
    pub(super) fn conflicting_record(&self, me: u32, s: u64, e: u64, kind: u32) -> Option<u32> {
        let h = self.header();
        let hit = |r: &Rec| {
            r.owner != 0
                && r.owner != me + 1
                && overlaps(s, e, r.start, r.end)
                && conflict(kind, r.kind)
        };
        // Each walk is bounded by the records ever used (one list holds
        // each at most once); a bound shared by several walks would end a
        // later one early and miss a record in the way.
        if h.coarse_count > 0 {
            let mut at = h.coarse_head;
            let mut steps = 0;
            while at != NIL && steps < self.walk_limit() {
                if hit(self.rec(at)) {
                    return Some(at);
                }
                at = self.rec(at).next;
                steps += 1;
            }
        }
        if e - s <= FINE_SCAN {
            for i in s..e {
                let mut at = self.head(bucket(i));
                let mut steps = 0;
                while at != NIL && steps < self.walk_limit() {
                    let r = self.rec(at);
                    if r.start == i && hit(r) {
                        return Some(at);
                    }
                    at = r.next;
                    steps += 1;
                }
            }
            return None;
        }
        // A long span: every owner's single-index records.
        for o in 0..self.slot_hwm() {
            let slot = *self.slot(o);
            if slot.used != 1 || o as u32 == me || slot.records == 0 {
                continue;
            }
            let mut at = slot.head;
            let mut steps = 0;
            while at != NIL && steps < self.walk_limit() {
                let r = self.rec(at);
                if hit(r) {
                    return Some(at);
                }
                at = r.onext;
                steps += 1;
            }
        }
        None
    }

    /// Whether owner `me` holds any record that conflicts with `kind` on
    /// `s..e` (`kind` 0: any record at all).
    pub(super) fn holds_over(&self, me: u32, s: u64, e: u64, kind: u32) -> bool {
        let mut at = self.slot(me as usize).head;
        let mut steps = 0;
        while at != NIL && steps < self.walk_limit() {
            let r = self.rec(at);
            if overlaps(s, e, r.start, r.end) && (kind == 0 || conflict(kind, r.kind)) {
                return true;
            }
            at = r.onext;
            steps += 1;
        }
        false
    }

    /// Set `s..e` to `kind` (0: unlock) for owner `me`, converting in
    /// place, and merge with the owner's touching records of the same kind
    /// (as the kernel does, so an owner's records stay few). The caller
    /// checked there are free records: a split takes one, the new record
    /// one.
    pub(super) fn set(&mut self, me: u32, s: u64, e: u64, kind: u32) {
        // What `me` holds on the fast lane there is replaced by records.
        self.drop_own_fast(me, s, e);
        let mut near = Near::default();
        self.mine_near(
            me,
            s.saturating_sub(1),
            e.saturating_add(1).min(INDEX_END),
            &mut near,
        );
        let (mut ns, mut ne) = (s, e);
        let mut lowered = false;
        for at in near.iter() {
            let r = *self.rec(at);
            let over = overlaps(s, e, r.start, r.end);
            // Touching single indices stay apart while the gate is open: a
            // record of more than one index closes it.
            let touches = (r.end == s || r.start == e)
                && (e - s > 1 || r.end.wrapping_sub(r.start) > 1 || !self.gate_open());
            if kind != 0 && r.kind == kind && (over || touches) {
                // Same kind, overlapping or touching: the new record covers it.
                ns = ns.min(r.start);
                ne = ne.max(r.end);
                self.drop_record(at);
                continue;
            }
            if !over {
                continue;
            }
            lowered |= kind == 0 || r.kind > kind;
            if r.start < s && r.end > e {
                // Split: the right part becomes a new record, written in
                // full before the left part is trimmed.
                let n = self.new_record(e, r.end, r.kind, me);
                self.unlink_tier(at);
                self.rec(at).end = s;
                self.relink_tier(at);
                self.link(n);
            } else if r.start < s {
                self.unlink_tier(at);
                self.rec(at).end = s;
                self.relink_tier(at);
            } else if r.end > e {
                self.unlink_tier(at);
                self.rec(at).start = e;
                self.relink_tier(at);
            } else {
                self.drop_record(at);
            }
        }
        if kind != 0 {
            let n = self.new_record(ns, ne, kind, me);
            self.link(n);
        }
        if lowered {
            self.wake_waiters(s, e);
        }
    }

    /// Whether `me` holds all of `s..e` at `kind` or stronger (setting it
    /// to `kind` then only lowers).
    pub(super) fn covered(&self, me: u32, s: u64, e: u64, kind: u32) -> bool {
        let mut near = Near::default();
        self.mine_near(me, s, e, &mut near);
        let mut have = 0u64;
        for at in near.iter() {
            let r = self.rec(at);
            if r.kind >= kind {
                have = have.saturating_add(r.end.min(e).saturating_sub(r.start.max(s)));
            }
        }
        for l in self.map.listed_lanes(me) {
            let w = self.map.lane(l).load(Ordering::Acquire);
            if fast_of(w, me, &(s..e)) && lane_kind(w) >= kind {
                have += 1;
            }
        }
        have == e - s
    }

    /// Free record `i` of its owner, out of every list.
    pub(super) fn drop_record(&mut self, i: u32) {
        let r = *self.rec(i);
        self.unlink_tier(i);
        if r.end.wrapping_sub(r.start) == 1 {
            self.note_lane(bucket(r.start));
        }
        let slot = self.slot(r.owner.wrapping_sub(1) as usize);
        if r.oprev == NIL {
            slot.head = r.onext;
        } else {
            self.rec(r.oprev).onext = r.onext;
        }
        if r.onext != NIL {
            self.rec(r.onext).oprev = r.oprev;
        }
        self.count_down(&mut slot.records, "an owner's record count");
        self.free(i);
    }

    /// `me`'s records overlapping `lo..hi`: through the hash and the
    /// coarse list for a short span when the owner has many records, else
    /// through the owner's own list.
    pub(super) fn mine_near(&self, me: u32, lo: u64, hi: u64, out: &mut Near) {
        let slot = self.slot(me as usize);
        // One bound per walk (see `conflicting_record`).
        if slot.records > 16 && hi - lo <= FINE_SCAN + 2 {
            for i in lo..hi {
                let mut at = self.head(bucket(i));
                let mut steps = 0;
                while at != NIL && steps < self.walk_limit() {
                    let r = self.rec(at);
                    if r.owner == me + 1 && r.start == i {
                        out.push(at);
                    }
                    at = r.next;
                    steps += 1;
                }
            }
            let mut at = self.header().coarse_head;
            let mut steps = 0;
            while at != NIL && steps < self.walk_limit() {
                let r = self.rec(at);
                if r.owner == me + 1 && overlaps(lo, hi, r.start, r.end) {
                    out.push(at);
                }
                at = r.next;
                steps += 1;
            }
            return;
        }
        let mut at = slot.head;
        let mut steps = 0;
        while at != NIL && steps < self.walk_limit() {
            let r = self.rec(at);
            if overlaps(lo, hi, r.start, r.end) {
                out.push(at);
            }
            at = r.onext;
            steps += 1;
        }
    }

    /// Put record `i` back in its bucket (whose lane goes slow first) or
    /// the coarse list (the gate closes first).
    pub(super) fn relink_tier(&mut self, i: u32) {
        let r = *self.rec(i);
        if r.end.wrapping_sub(r.start) == 1 {
            let l = bucket(r.start);
            self.rec(i).next = self.head(l);
            self.set_head(l, i);
            // In the bucket first, so that an adoption the lane needs sees
            // this record in its way (fast calls never read buckets).
            let w = self.map.lane(l).load(Ordering::Acquire);
            if !self.repairing && w != LANE_SLOW && w & LANE_MOVING == 0 {
                // Callers keep records back for the adoptions this may make.
                if !self.enter_lane(l) {
                    self.corrupt("the free record count");
                }
            }
        } else {
            if !self.repairing {
                self.close_gate();
            }
            let h = self.header();
            self.rec(i).next = h.coarse_head;
            h.coarse_head = i;
            h.coarse_count = h.coarse_count.wrapping_add(1);
        }
    }

    /// Records setting `s..e` to `kind` takes when it only lowers what
    /// `me` holds there: unlocking takes one only to split a record around
    /// the span; a downgrade may split one and adds the lowered piece.
    pub(super) fn records_to_lower(&self, me: u32, s: u64, e: u64, kind: u32) -> usize {
        if kind != 0 {
            return 2;
        }
        let mut near = Near::default();
        self.mine_near(me, s, e, &mut near);
        let splits = near.iter().any(|at| {
            let r = self.rec(at);
            r.start < s && r.end > e
        });
        usize::from(splits)
    }

    /// Whether a raise of `pieces` pieces (each may split one record and
    /// add one) fits, keeping [`LOWER_RESERVE`] records for lowering.
    pub(super) fn has_room(&self, pieces: usize) -> bool {
        self.free_records() >= 2 * pieces + LOWER_RESERVE
    }
}
