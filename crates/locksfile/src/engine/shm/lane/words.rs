//! The words alone: every step either side of the fast lane takes on the
//! lane words (see the protocol and the invariants I1–I8 at the head of
//! `lane.rs`), written once over any atomics: the sidecar's ([`Map`]) in
//! the engine, `loom`'s in the model.

use super::*;

/// An atomic word of the fast lane.
pub(in crate::engine::shm) trait Word {
    type V: Copy + Eq;
    fn load(&self, order: Ordering) -> Self::V;
    fn store(&self, v: Self::V, order: Ordering);
    fn compare_exchange(
        &self,
        current: Self::V,
        new: Self::V,
        success: Ordering,
        failure: Ordering,
    ) -> Result<Self::V, Self::V>;
}

macro_rules! word {
    ($atomic:ty, $v:ty) => {
        impl Word for $atomic {
            type V = $v;
            #[inline(always)]
            fn load(&self, order: Ordering) -> $v {
                <$atomic>::load(self, order)
            }
            #[inline(always)]
            fn store(&self, v: $v, order: Ordering) {
                <$atomic>::store(self, v, order)
            }
            #[inline(always)]
            fn compare_exchange(&self, c: $v, n: $v, s: Ordering, f: Ordering) -> Result<$v, $v> {
                <$atomic>::compare_exchange(self, c, n, s, f)
            }
        }
    };
}
word!(AtomicU64, u64);
word!(AtomicU32, u32);

/// The words of the fast lane: a lane word per bucket, the gate, each
/// owner's fast list, and the wake of a lane's sleepers.
pub(in crate::engine::shm) trait Lanes {
    type W64: Word<V = u64>;
    type W32: Word<V = u32>;
    fn lane(&self, l: usize) -> &Self::W64;
    fn gate(&self) -> &Self::W32;
    fn fast_list(&self, s: u32) -> &[Self::W32; FAST_HOLDS];
    fn woke_lane(&self, l: usize, old: u64);

    /// Strike lane `l` off owner `s`'s list (I7). Entries are
    /// interchangeable: the list is right while it lists each lane at
    /// least as often as the owner has a word there, so every removal
    /// takes one entry of that lane off by a swap, never by a store over
    /// whatever an entry holds by then: threads of one owner list and
    /// strike off at once, and an entry struck off by another may already
    /// list a new lane. From the end: when the kept entry ([`KEPT`]) names
    /// the lane too, the entry of the word's own listing goes first, so
    /// that no entry outlives its word unseen by the one that keeps it.
    #[inline(always)]
    fn unlist(&self, s: u32, l: usize) {
        let v = l as u32 + 1;
        if !mutated("list-remove-by-store") {
            // A look first, so that the entries of other lanes cost no
            // locked instruction each (a CAS that fails is one too). A stale
            // look misses an entry at most; the swaps below then find it.
            for e in self.fast_list(s).iter().rev() {
                // AcqRel on success: I7, as below.
                if e.load(Ordering::Relaxed) == v
                    && e.compare_exchange(v, 0, Ordering::AcqRel, Ordering::Relaxed)
                        .is_ok()
                {
                    return;
                }
            }
        }
        for e in self.fast_list(s).iter().rev() {
            if mutated("list-remove-by-store") {
                // As before the fix: a look, then a store.
                if e.load(Ordering::Relaxed) == v {
                    e.store(0, Ordering::Release);
                    return;
                }
                continue;
            }
            // AcqRel: I7 (the entry may be listed again at once).
            if e.compare_exchange(v, 0, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                return;
            }
        }
    }
}

/// The lanes owner `s` lists, each once (entries may repeat a lane, I7):
/// read by the mutex holder after closing the gate, `SeqCst` as the
/// second of the closer's pair (I3) against the list CAS before a word.
pub(in crate::engine::shm) fn listed<M: Lanes>(m: &M, s: u32) -> impl Iterator<Item = usize> + '_ {
    let mut seen = [0u32; FAST_HOLDS];
    m.fast_list(s).iter().enumerate().filter_map(move |(k, e)| {
        // I3, I7: after the gate's close, against the list CAS.
        let v = e.load(Ordering::SeqCst);
        if v == 0 || seen[..k].contains(&v) {
            return None;
        }
        seen[k] = v;
        Some((v - 1) as usize % BUCKETS)
    })
}

impl Lanes for Map {
    type W64 = AtomicU64;
    type W32 = AtomicU32;
    #[inline(always)]
    fn lane(&self, l: usize) -> &AtomicU64 {
        Map::lane(self, l)
    }
    #[inline(always)]
    fn gate(&self) -> &AtomicU32 {
        Map::gate(self)
    }
    #[inline(always)]
    fn fast_list(&self, s: u32) -> &[AtomicU32; FAST_HOLDS] {
        Map::fast_list(self, s)
    }
    #[inline(always)]
    fn woke_lane(&self, l: usize, old: u64) {
        Map::woke_lane(self, l, old)
    }
}

/// Whether the historical bug `name` is put back: under the model
/// checker only, as `lane/model.rs` asks; never in a real build.
#[cfg(all(loom, test))]
fn mutated(name: &str) -> bool {
    super::model::mutated(name)
}
#[cfg(not(all(loom, test)))]
#[inline(always)]
fn mutated(_: &str) -> bool {
    false
}

/// The first of the entries of an owner's fast list that its fast path
/// keeps, one per slot of that path (`owner/fast.rs`): each lists the lane
/// of the last fast hold its slot took, and stays when the hold goes
/// (I7), so that a pair on one index lists nothing and strikes nothing
/// off. Written by the owner only through [`take`] with `keep` naming it
/// (its slot's takes are one at a time), struck off by anyone as every
/// entry is.
pub(in crate::engine::shm) const KEPT: usize = 0;
/// How many kept entries there are, one per slot of the owner's fast path;
/// the others are listed and struck off word by word.
pub(in crate::engine::shm) const KEPT_ENTRIES: usize = crate::engine::FAST_SLOTS;

/// What a fast take came to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(in crate::engine::shm) enum Took {
    Granted,
    /// Not taken, and nothing of it is left.
    No,
    /// Its word went in and a mutex holder took it from there before it
    /// was granted: taken away, or made a record of the owner (I3, I4).
    Gone,
}

/// Owner `me` takes index `i` (in lane `l`) at `kind` on the fast lane;
/// `keep`: through that kept entry ([`KEPT`]), and the word's release
/// keeps it too ([`let_go`] with `keep`).
#[inline(always)]
pub(in crate::engine::shm) fn take<M: Lanes>(
    m: &M,
    me: u32,
    i: u64,
    l: usize,
    kind: u32,
    keep: Option<usize>,
) -> Took {
    let lane = m.lane(l);
    // I8: a stale read costs the CAS below. Acquire: I7, whoever struck
    // the kept entry off did so before it let the lane be empty again.
    if lane.load(Ordering::Acquire) != LANE_EMPTY {
        return Took::No;
    }
    // I7: listed before the word is written, so that a scan of the lists
    // finds every fast hold.
    let listed = match keep {
        Some(k) => keep_listed(m, me, l, k),
        None => list(m, me, l),
    };
    if !listed {
        return Took::No;
    }
    let w = fast_word(me, i, kind);
    // I3: the first of the taker's pair, before its gate load.
    if lane
        .compare_exchange(LANE_EMPTY, w, Ordering::SeqCst, Ordering::Relaxed)
        .is_err()
    {
        if keep.is_none() {
            m.unlist(me, l);
        }
        return Took::No;
    }
    confirm(m, me, l, w, keep.is_some())
}

/// List lane `l` on a free entry of `me`'s list (not a kept one).
#[inline(always)]
fn list<M: Lanes>(m: &M, me: u32, l: usize) -> bool {
    m.fast_list(me)[KEPT + KEPT_ENTRIES..].iter().any(|e| {
        // A stale read costs the CAS, as I8 for lane words.
        e.load(Ordering::Relaxed) == 0
            && e.compare_exchange(0, l as u32 + 1, Ordering::SeqCst, Ordering::Relaxed)
                .is_ok()
    })
}

/// List lane `l` on `me`'s kept entry `k`: nothing to do when it lists `l`
/// already; else it is moved there from the lane it names, unless a word
/// of `me` is still in that lane that no other entry lists: then `false`
/// (the take goes the usual way; a free entry would outlive the word, as
/// its release keeps it).
#[inline(always)]
fn keep_listed<M: Lanes>(m: &M, me: u32, l: usize, k: usize) -> bool {
    let v = l as u32 + 1;
    let e = &m.fast_list(me)[k];
    loop {
        // Acquire, with the lane's (see `take`): an entry struck off is
        // read struck off.
        let now = e.load(Ordering::Acquire);
        if now == v || (now != 0 && mutated("kept-entry-trusted")) {
            return true;
        }
        if now != 0 {
            // I7: an entry goes only when its word went.
            let w = m.lane((now - 1) as usize % BUCKETS).load(Ordering::Acquire);
            // Another entry naming that lane stays while the word does (I7).
            if is_fast(w)
                && lane_owner(w) == me
                && !m
                    .fast_list(me)
                    .iter()
                    .enumerate()
                    .any(|(j, o)| j != k && o.load(Ordering::Acquire) == now)
            {
                return false;
            }
        }
        // SeqCst: as the list CAS of `list`, before the word (I3, I7).
        if e.compare_exchange(now, v, Ordering::SeqCst, Ordering::Relaxed)
            .is_ok()
        {
            return true;
        }
    }
}

/// The second half of [`take`]: word `w` is in lane `l` (and listed);
/// whether it is granted.
#[inline(always)]
pub(in crate::engine::shm) fn confirm<M: Lanes>(
    m: &M,
    me: u32,
    l: usize,
    w: u64,
    keep: bool,
) -> Took {
    // I3: read after the word is written: a guard that closes the gate and
    // then looks at the lanes sees this word, or this read sees it closed.
    if m.gate().load(Ordering::SeqCst) == 0 {
        if mutated("grant-on-open-gate") {
            return Took::Granted;
        }
        // I3: open, but it may have closed and opened again since the word
        // went in, and a mutex holder may have taken the word away
        // meanwhile: granted only if it is still there (it is then seen by
        // anyone who closes the gate from here on). If it was made a record
        // of ours instead, the slow way finds that.
        return if m.lane(l).load(Ordering::SeqCst) & !LANE_WAITING == w {
            Took::Granted
        } else {
            Took::Gone
        };
    }
    // Closed: not granted. Take the word back, unless a mutex holder has
    // taken it over already (I4: then it made it a record of ours if the
    // table could grant it, which the slow way finds).
    if empty(m, me, l, keep, |now| now & !LANE_WAITING == w) {
        Took::No
    } else {
        Took::Gone
    }
}

/// Empty lane `l` while its word is `me`'s as `ours` says (a waiter may
/// mark it meanwhile, I5), strike it off the list (unless the kept entry
/// lists it, `keep`) and wake the sleepers. Whether it was ours.
#[inline(always)]
pub(in crate::engine::shm) fn empty<M: Lanes>(
    m: &M,
    me: u32,
    l: usize,
    keep: bool,
    ours: impl Fn(u64) -> bool,
) -> bool {
    let lane = m.lane(l);
    loop {
        // I8: acted on by the CAS below alone.
        let w = lane.load(Ordering::Relaxed);
        if !ours(w) {
            return false;
        }
        // Release: whoever next takes the index reads what the holder wrote.
        // It fails once a mutex holder took the word away or over (I4).
        if lane
            .compare_exchange(w, LANE_EMPTY, Ordering::Release, Ordering::Relaxed)
            .is_ok()
        {
            if !keep {
                m.unlist(me, l);
            }
            // I5: woken from the very word replaced.
            let woke = if mutated("release-no-wake") {
                w & !LANE_WAITING
            } else {
                w
            };
            m.woke_lane(l, woke);
            return true;
        }
    }
}

/// Owner `me` lets go of index `i` (in lane `l`) held on the fast lane,
/// taken with `keep` as [`take`] says. `false`: it is not (the table took
/// it over, or it never was).
#[inline(always)]
pub(in crate::engine::shm) fn let_go<M: Lanes>(
    m: &M,
    me: u32,
    i: u64,
    l: usize,
    keep: bool,
) -> bool {
    let ours = fast_word(me, i, EXCLUSIVE);
    empty(m, me, l, keep, |w| {
        w & !(LANE_SHARED | LANE_WAITING) == ours
    })
}

/// Whether lane word `w` is another owner's (not `me`'s) fast hold on
/// index `i` that conflicts with `kind`.
pub(in crate::engine::shm) fn in_way(w: u64, me: u32, i: u64, kind: u32) -> bool {
    is_fast(w)
        && w & LANE_MOVING == 0
        && lane_owner(w) != me
        && lane_index(w) == i
        && conflict(kind, lane_kind(w))
}

/// A waiter marks word `w` of lane `l` (I5), so whoever changes it next
/// wakes it: the upper half to sleep on while it reads so, or `None` when
/// the word changed first (look again).
#[inline(always)]
pub(in crate::engine::shm) fn mark<M: Lanes>(m: &M, l: usize, w: u64) -> Option<u32> {
    let marked = w | LANE_WAITING;
    // AcqRel: I8; the sleep that follows compares the word in the kernel.
    if w != marked
        && m.lane(l)
            .compare_exchange(w, marked, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
    {
        return None;
    }
    Some((marked >> 32) as u32)
}

/// The mutex holder closes the gate.
pub(in crate::engine::shm) fn close_gate<M: Lanes>(m: &M) {
    // Relaxed: the gate is written under the mutex alone, which we hold.
    if m.gate().load(Ordering::Relaxed) == 0 {
        // I3: the first of the closer's pair, before its lane loads.
        m.gate().store(1, Ordering::SeqCst);
    }
}

/// The mutex holder opens the gate (I2: nothing spans more than one index).
pub(in crate::engine::shm) fn open_gate<M: Lanes>(m: &M) {
    // I3: in the total order with the takers' gate loads.
    m.gate().store(0, Ordering::SeqCst);
}

/// The mutex holder reads lane `l` after closing the gate.
pub(in crate::engine::shm) fn scan<M: Lanes>(m: &M, l: usize) -> u64 {
    // I3: the second of the closer's pair.
    m.lane(l).load(Ordering::SeqCst)
}

/// The mutex holder turns word `w` of lane `l` into `to` by CAS, again
/// while only a waiter's mark gets in the way (I5): the word replaced, or
/// `None` when it became something else.
pub(in crate::engine::shm) fn swap_word<M: Lanes>(
    m: &M,
    l: usize,
    mut w: u64,
    to: impl Fn(u64) -> u64,
) -> Option<u64> {
    let base = w & !LANE_WAITING;
    loop {
        // AcqRel: I4 (the fast owner's CAS from its word then fails), and
        // what the owner wrote before its word is ours to read.
        match m
            .lane(l)
            .compare_exchange(w, to(w), Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => return Some(w),
            Err(now) if now & !LANE_WAITING == base && !mutated("no-mark-retry") => w = now,
            Err(_) => return None,
        }
    }
}

/// The mutex holder ends an adoption: the record is in, the lane is slow.
pub(in crate::engine::shm) fn adopted<M: Lanes>(m: &M, l: usize) {
    // Release, over `MOVING` only the mutex holder writes (I4).
    m.lane(l).store(LANE_SLOW, Ordering::Release);
}

/// The mutex holder gives lane `l` back to the fast lane (I1: its bucket
/// is empty).
pub(in crate::engine::shm) fn give_back<M: Lanes>(m: &M, l: usize) {
    // Release: over `SLOW`, which only the mutex holder writes; a taker's
    // CAS reads it.
    m.lane(l).store(LANE_EMPTY, Ordering::Release);
}
