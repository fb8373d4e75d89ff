//! The mapping of a sidecar, and [`TableLock`]: the table with its robust
//! mutex held. All of this engine's `unsafe` is here (see the safety note
//! of the engine's module).
//!
//! A `TableLock` exists only while this thread holds the mutex: [`Map::lock`]
//! takes it to make one, and dropping it lets it go. The accessors that hand
//! out `&mut` into the shared table (header, slots, waiters, bucket heads,
//! records) are its methods, and what they return borrows it, so no such
//! reference is made without the mutex or kept after it went. [`Map`]
//! itself hands out only the words used atomically (gate, lanes, fast lists,
//! wake words), which are touched without the mutex too.
//!
//! Every index these accessors take may have been read from the table, so
//! none is trusted: one out of range makes no reference into the table but
//! notes the table corrupt for this call ([`found_corrupt`]) and hands out a
//! blank entry of the guard's own instead, so that the call runs to its end
//! without a panic and then answers `SidecarProblem::Corrupt`.
#![allow(unsafe_code)]

use std::cell::{Cell, UnsafeCell};
use std::io;
use std::mem::size_of;
use std::ops::Range;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::cancel::{Armed, Cancel};
use crate::span::INDEX_END;
use crate::sys;

use super::lane::listed;
use super::layout::{
    Header, Proc, Rec, Slot, StatEntry, Waiter, BUCKETS, BUCKETS_AT, FAST_HOLDS, GATE_AT, LANES_AT,
    LANE_WAITING, LISTS_AT, MUTEX_AT, NIL, PROCS, PROCS_AT, RECORDS, RECORDS_AT, SIZE, SLOTS,
    SLOTS_AT, STATS_AT, STAT_ENTRIES, WAITERS, WAITERS_AT, WAKES_AT,
};

thread_local! {
    /// What the current call found out of range in the table, if anything.
    static CORRUPT: Cell<Option<&'static str>> = const { Cell::new(None) };
}

/// Note that the table is corrupt (`what` was out of range or inconsistent):
/// the call on this thread answers an error once it is done.
pub(super) fn found_corrupt(what: &'static str) {
    CORRUPT.with(|c| {
        if c.get().is_none() {
            c.set(Some(what));
        }
    });
}

/// What the current call found corrupt, if anything; forgets it.
pub(super) fn take_corrupt() -> Option<&'static str> {
    CORRUPT.with(Cell::take)
}

/// Whether the current call found the table corrupt so far.
pub(super) fn is_corrupt() -> bool {
    CORRUPT.with(Cell::get).is_some()
}

/// A mapped sidecar.
pub(super) struct Map {
    base: *mut u8,
}

// SAFETY: the mapping is plain shared memory; every access goes through
// the table's mutex (or atomics), as the module's safety note says.
unsafe impl Send for Map {}
// SAFETY: as above.
unsafe impl Sync for Map {}

impl Map {
    /// Map the sidecar open as `fd`, which the caller checked is [`SIZE`]
    /// bytes long.
    pub(super) fn new(fd: BorrowedFd<'_>) -> io::Result<Map> {
        Ok(Map {
            base: sys::map_shared(fd, SIZE)?,
        })
    }

    fn mutex(&self) -> *mut libc::pthread_mutex_t {
        // SAFETY: MUTEX_AT is inside the mapping and suitably aligned.
        unsafe { self.base.add(MUTEX_AT).cast() }
    }

    /// The gate of the fast lane: 0 while no record or waiter spans more
    /// than one index, so that a lane word alone tells whether an index is
    /// free; 1 otherwise. Written only under the mutex.
    pub(super) fn gate(&self) -> &AtomicU32 {
        // SAFETY: inside the header page, aligned, only used atomically.
        unsafe { &*self.base.add(GATE_AT).cast::<AtomicU32>() }
    }

    /// The lane word of bucket `l`.
    #[inline(always)]
    pub(super) fn lane(&self, l: usize) -> &AtomicU64 {
        let l = if l < BUCKETS {
            l
        } else {
            found_corrupt("a lane number");
            l % BUCKETS
        };
        // SAFETY: in range, inside the mapping, aligned, only used atomically.
        unsafe { &*self.base.add(LANES_AT).cast::<AtomicU64>().add(l) }
    }

    /// Statistics entry `i` (see [`STATS_AT`]), read and written without
    /// the mutex.
    pub(super) fn stat_entry(&self, i: usize) -> &StatEntry {
        let i = i.min(STAT_ENTRIES - 1);
        // SAFETY: in range, inside the mapping, aligned (64), and every
        // field atomic.
        unsafe { &*self.base.add(STATS_AT).cast::<StatEntry>().add(i) }
    }

    /// The upper half of lane `l`'s word, where waiters for a fast hold
    /// sleep (it holds the flags and the owner).
    pub(super) fn lane_half(&self, l: usize) -> *const u32 {
        let lane: *const AtomicU64 = self.lane(l);
        // SAFETY: within the lane word; the upper half on a little-endian
        // machine (the only kind this engine builds for, as futexes are
        // Linux's and the layout is fixed).
        unsafe {
            lane.cast::<u32>()
                .add(usize::from(cfg!(target_endian = "little")))
        }
    }

    /// Wake whoever sleeps on lane `l`, if the word it left was `old`.
    pub(super) fn woke_lane(&self, l: usize, old: u64) {
        if old & LANE_WAITING != 0 {
            // SAFETY: an aligned word of the mapping, which outlives `self`.
            unsafe { sys::futex_wake_all_raw(self.lane_half(l)) };
        }
    }

    /// The lanes where owner slot `s` may have a fast hold, each as
    /// lane + 1 (0: a free entry): listed before the hold is taken, struck
    /// off after it went, so that whoever must find every fast hold (of an
    /// owner, or over a long span) reads these instead of every lane.
    #[inline(always)]
    pub(super) fn fast_list(&self, s: u32) -> &[AtomicU32; FAST_HOLDS] {
        let s = if (s as usize) < SLOTS {
            s
        } else {
            found_corrupt("an owner slot number");
            s % SLOTS as u32
        };
        // SAFETY: in range, inside the mapping, aligned, only used atomically.
        unsafe {
            &*self
                .base
                .add(LISTS_AT + s as usize * 64)
                .cast::<[AtomicU32; FAST_HOLDS]>()
        }
    }

    /// The lanes owner `s` lists, each once (see [`listed`]).
    pub(super) fn listed_lanes(&self, s: u32) -> impl Iterator<Item = usize> + '_ {
        listed(self, s)
    }

    /// Waiter entry `i`'s futex word.
    pub(super) fn wake_word(&self, i: usize) -> &AtomicU32 {
        let i = if i < WAITERS {
            i
        } else {
            found_corrupt("a waiter entry number");
            i % WAITERS
        };
        // SAFETY: in range, inside the mapping, aligned, and only ever used
        // atomically.
        unsafe { &*self.base.add(WAKES_AT).cast::<AtomicU32>().add(i) }
    }

    /// Make the mutex of a fresh table: robust and process-shared.
    ///
    /// # Safety
    /// No one uses the table: the caller holds the sidecar's DMS byte
    /// exclusively, so no one else has it mapped and in use.
    pub(super) unsafe fn init_mutex(&self) -> io::Result<()> {
        // SAFETY: as the caller promises; the mutex memory is ours.
        unsafe { sys::robust_mutex_init(self.mutex()) }
    }

    /// Sleep on the upper half of lane `l`'s word while it reads
    /// `expected`, for at most `nap` (`futex_wait`).
    pub(super) fn sleep_on_lane(&self, l: usize, expected: u32, nap: Duration) -> io::Result<()> {
        // SAFETY: an aligned word of the mapping, which outlives the call.
        unsafe { sys::futex_wait_raw(self.lane_half(l), expected, nap) }
    }

    /// Arm `cancel` to bump and wake waiter entry `i`'s word. The waker is
    /// taken back when the result is dropped, which borrows the mapping.
    pub(super) fn arm_cancel<'a>(&'a self, cancel: &'a Cancel, i: usize) -> Armed<'a> {
        // SAFETY: the word is in this mapping, which the result borrows, so
        // it stays mapped until the waker is taken back.
        let waker = unsafe { sys::WordWaker::new(self.wake_word(i)) };
        cancel.arm(Box::new(move || waker.wake()))
    }

    /// Whether process `pid` has an owner slot: asked without the mutex,
    /// only of a mutex that stays taken (see `sys::robust_mutex_lock`),
    /// so each slot's words are read atomically.
    #[cold]
    fn is_user(&self, pid: u32) -> bool {
        // SAFETY: inside the header, aligned; read atomically, as the mutex
        // is another's.
        let hwm = unsafe {
            &*self
                .base
                .add(std::mem::offset_of!(Header, slot_hwm))
                .cast::<AtomicU32>()
        };
        (0..(hwm.load(Ordering::Relaxed) as usize).min(SLOTS)).any(|s| {
            // SAFETY: inside the mapping, aligned; `used` then `pid` lead
            // each slot (see `layout.rs`).
            let words = unsafe {
                &*self
                    .base
                    .add(SLOTS_AT + s * size_of::<Slot>())
                    .cast::<[AtomicU32; 2]>()
            };
            words[0].load(Ordering::Relaxed) == 1 && words[1].load(Ordering::Relaxed) == pid
        })
    }

    /// Take the table's mutex. `Err` for a mutex left unrecoverable, and
    /// (of kind `InvalidData`) for one whose bytes no holder can have left.
    pub(super) fn lock(&self) -> io::Result<(TableLock<'_>, bool)> {
        // SAFETY: the mutex was initialised by the table's first opener and
        // stays mapped while `self` lives.
        let died = match unsafe { sys::robust_mutex_lock(self.mutex(), &|pid| self.is_user(pid)) }?
        {
            sys::Locked::Clean => false,
            sys::Locked::OwnerDied => true,
        };
        let mut g = TableLock {
            map: self,
            woken: [0; WAKE_LIST],
            n_woken: 0,
            wake_upto: 0,
            entered: [0; ENTERED],
            n_entered: 0,
            repairing: false,
            ahead: None,
            renew: 0,
            blank: UnsafeCell::new(Blank::NEW),
            sane: true,
            my_proc: NIL,
        };
        g.recheck();
        Ok((g, died))
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: `base` is the mapping `map_shared` made, unused from here.
        unsafe { sys::unmap(self.base, SIZE) };
    }
}

/// The entries `0..n` of the region at byte `at` of the sidecar open as
/// `fd`, `size` bytes each, that lie in pages holding data: the only ones
/// that can be other than zero. A scan over every entry of a region reads
/// these alone, so that it neither takes time for nor allocates the pages
/// of a table never used (see `layout.rs`).
pub(super) fn touched(fd: BorrowedFd<'_>, at: usize, size: usize, n: usize) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    for r in sys::data_ranges(fd, at as u64, (size * n) as u64) {
        let lo = (r.start as usize - at) / size;
        let hi = (r.end as usize - at).div_ceil(size).min(n);
        match out.last_mut() {
            Some(last) if last.end >= lo => last.end = last.end.max(hi),
            _ => out.push(lo..hi),
        }
    }
    out
}

/// Fewest records ever used whose pages a table gives back once none is in
/// use (a megabyte of them).
pub(super) const SHRINK_AT: usize = (1 << 20) / size_of::<Rec>();

/// How many waiters a guard wakes one by one; beyond that it wakes all.
pub(super) const WAKE_LIST: usize = 8;
/// How many slow lanes a guard looks at giving back; a lane past these
/// stays slow until a later call there finds its bucket empty.
pub(super) const ENTERED: usize = 8;

/// What an accessor hands out for an index out of range: entries that hold
/// nothing (no owner, no next), fresh at each use.
#[derive(Clone, Copy)]
pub(super) struct Blank {
    slot: Slot,
    process: Proc,
    waiter: Waiter,
    rec: Rec,
    head: u32,
}

impl Blank {
    const NEW: Blank = Blank {
        slot: Slot {
            used: 0,
            pid: 0,
            nonce: 0,
            head: NIL,
            records: 0,
            proc: NIL,
            _pad: 0,
            proc_nonce: 0,
        },
        process: Proc {
            used: 0,
            pid: 0,
            nonce: 0,
        },
        waiter: Waiter {
            owner: 0,
            kind: 0,
            start: 0,
            end: 0,
            ticket: 0,
            order: 0,
            since_ns: 0,
            pid: 0,
            _pad: 0,
        },
        rec: Rec {
            start: 0,
            end: 0,
            owner: 0,
            kind: 0,
            next: NIL,
            onext: NIL,
            oprev: NIL,
            _pad: 0,
        },
        head: NIL,
    };
}

/// The table, with its mutex held.
pub(super) struct TableLock<'a> {
    pub(super) map: &'a Map,
    /// Waiter entries to wake once the mutex is let go (their words are
    /// bumped already)...
    pub(super) woken: [u32; WAKE_LIST],
    pub(super) n_woken: usize,
    /// ... or every entry below this.
    pub(super) wake_upto: usize,
    /// Lanes made slow (or whose bucket lost a record) under this guard,
    /// given back to the fast lane when their bucket is empty.
    pub(super) entered: [u32; ENTERED],
    pub(super) n_entered: usize,
    /// Rebuilding the derived indices: lanes are put right afterwards.
    pub(super) repairing: bool,
    /// The place in the queue the deadlock search gave the request it
    /// looked at, not queued yet: it queues there (see [`TableLock::reorder`]).
    pub(super) ahead: Option<u64>,
    /// Waiter entry + 1 (0: none) to wake once the mutex is let go, after
    /// its own waiting thread read its word: that thread's request was
    /// moved ahead, and must look again instead of sleeping.
    pub(super) renew: u32,
    /// Handed out for an index out of range (see the module's note).
    blank: UnsafeCell<Blank>,
    /// The process entry of the caller's process (`NIL`: none, as for a
    /// reader from outside), which liveness probes through its own
    /// descriptor cannot see held (see [`TableLock::slot_alive`]).
    pub(super) my_proc: u32,
    /// Whether the header's bounds and the queued spans held when last
    /// checked ([`TableLock::recheck`]); code that trusts them (the
    /// fast lane's scans) runs only on a sane table.
    pub(super) sane: bool,
}

impl Drop for TableLock<'_> {
    fn drop(&mut self) {
        // Nothing more is written into a table found corrupt: its lanes
        // stay slow and its gate closed, which is only slower.
        if self.sane && !is_corrupt() {
            self.leave();
            self.shrink();
        }
        // SAFETY: we hold the mutex.
        unsafe { sys::robust_mutex_unlock(self.map.mutex()) };
        if self.renew > 0 {
            let word = self.map.wake_word(self.renew as usize - 1);
            word.fetch_add(1, Ordering::Release);
        }
        if self.wake_upto > 0 {
            for i in 0..self.wake_upto.min(WAITERS) {
                sys::futex_wake_all(self.map.wake_word(i));
            }
        } else {
            for &i in &self.woken[..self.n_woken] {
                sys::futex_wake_all(self.map.wake_word(i as usize));
            }
        }
    }
}

#[allow(clippy::mut_from_ref)]
impl TableLock<'_> {
    /// After a repair that followed `EOWNERDEAD`: the mutex works again
    /// (`pthread_mutex_consistent`).
    pub(super) fn consistent(&self) {
        // SAFETY: we hold the mutex.
        unsafe { sys::robust_mutex_consistent(self.map.mutex()) };
    }

    // The accessors below hand out `&mut` into memory that other processes
    // share. Each call makes a fresh, short-lived reference from the raw
    // base pointer; the regions (header, slots, waiters, buckets, records)
    // never overlap.

    /// The header.
    pub(super) fn header(&self) -> &mut Header {
        // SAFETY: `self` holds the mutex, which every process takes before
        // touching the table, so no one else writes it meanwhile; the
        // reference borrows `self`, so it goes before the mutex does.
        unsafe { &mut *self.map.base.cast::<Header>() }
    }

    // One element at a time, never a slice: a reference to a whole array
    // would overlap every other reference made into it meanwhile.

    /// Note the table corrupt and hand out a blank entry instead.
    #[cold]
    #[inline(never)]
    fn blank(&self, what: &'static str) -> &mut Blank {
        found_corrupt(what);
        // SAFETY: the blank is this guard's own and only ever reached
        // through here; like the table's entries, each use is a fresh,
        // short-lived reference (its entry is reset by the caller).
        unsafe { &mut *self.blank.get() }
    }

    /// Note the table found inconsistent under this guard (see
    /// [`found_corrupt`]).
    pub(super) fn corrupt(&self, what: &'static str) {
        found_corrupt(what);
    }

    /// Check what code trusts without checking it again: the header's
    /// counters and list heads in range, and the span of every queued
    /// request (walked by the fast lane's scans). A table found otherwise
    /// is noted corrupt. Cheap: the queue is short, and empty unless
    /// someone waits.
    pub(super) fn recheck(&mut self) {
        let h = self.header();
        let head = |i: u32| i == NIL || (i as usize) < RECORDS;
        let mut sane = h.slot_hwm as usize <= SLOTS
            && h.waiter_hwm as usize <= WAITERS
            && h.waiting as usize <= WAITERS
            && h.fresh as usize <= RECORDS
            && h.free_count as usize <= RECORDS
            && h.coarse_count as usize <= RECORDS
            && head(h.free_head)
            && head(h.coarse_head);
        if sane && h.waiting > 0 {
            sane = (0..h.waiter_hwm as usize).all(|i| {
                let w = self.waiter(i);
                w.owner == 0 || (w.owner as usize <= SLOTS && w.start < w.end && w.end <= INDEX_END)
            });
        }
        if !sane {
            self.corrupt("the header or the queue");
        }
        self.sane = sane;
    }

    /// Once no record is in use, give the pages of the records ever used
    /// and of the bucket heads back (see `layout.rs`): a table that held
    /// millions of locks takes no more memory than a fresh one once they
    /// are released. Below [`SHRINK_AT`] records it keeps them (cheaper to
    /// reuse than to fault in again).
    pub(super) fn shrink(&mut self) {
        let h = self.header();
        if h.free_count as usize != RECORDS || (h.fresh as usize) < SHRINK_AT {
            return;
        }
        // Checked by `recheck` already; clamped again, as what is given
        // back must never reach past the records.
        let used = super::layout::align((h.fresh as usize).min(RECORDS) * size_of::<Rec>());
        // First forget them: every record fresh again, as after a crash
        // here (a fresh record is written whole before use).
        h.fresh = 0;
        h.free_head = NIL;
        // SAFETY: page-aligned ranges inside the mapping; records and
        // bucket heads are read and written only with the mutex held,
        // which we hold, and none is in use (every head is `NIL`, stored
        // as zero). Where the file system cannot, the pages stay.
        unsafe {
            sys::give_back(self.map.base.add(RECORDS_AT), used);
            sys::give_back(self.map.base.add(BUCKETS_AT), BUCKETS * size_of::<u32>());
        }
    }

    /// How many steps any walk along a list of records may take: one per
    /// record ever used (`fresh`), as only those can be in a list; a walk
    /// still going then has met a loop, which a corrupt table may have.
    pub(super) fn walk_limit(&self) -> usize {
        (self.header().fresh as usize).min(RECORDS) + 1
    }

    /// The header's `slot_hwm`, at most [`SLOTS`].
    pub(super) fn slot_hwm(&self) -> usize {
        let n = self.header().slot_hwm as usize;
        if n > SLOTS {
            self.corrupt("the owner slot mark");
        }
        n.min(SLOTS)
    }

    /// The header's `waiter_hwm`, at most [`WAITERS`].
    pub(super) fn waiter_hwm(&self) -> usize {
        let n = self.header().waiter_hwm as usize;
        if n > WAITERS {
            self.corrupt("the waiter entry mark");
        }
        n.min(WAITERS)
    }

    /// Take one from a counter of the table, which must not be 0.
    pub(super) fn count_down(&self, n: &mut u32, what: &'static str) {
        match n.checked_sub(1) {
            Some(m) => *n = m,
            None => self.corrupt(what),
        }
    }

    /// Owner slot `i`.
    pub(super) fn slot(&self, i: usize) -> &mut Slot {
        if i >= SLOTS {
            let b = &mut self.blank("an owner slot number").slot;
            *b = Blank::NEW.slot;
            return b;
        }
        // SAFETY: as `header`; in range, inside the mapping, aligned.
        unsafe { &mut *self.map.base.add(SLOTS_AT).cast::<Slot>().add(i) }
    }

    /// Process entry `i`.
    pub(super) fn process(&self, i: usize) -> &mut Proc {
        if i >= PROCS {
            let b = &mut self.blank("a process entry number").process;
            *b = Blank::NEW.process;
            return b;
        }
        // SAFETY: as `slot`.
        unsafe { &mut *self.map.base.add(PROCS_AT).cast::<Proc>().add(i) }
    }

    /// The header's `proc_hwm`, at most [`PROCS`].
    pub(super) fn proc_hwm(&self) -> usize {
        let n = self.header().proc_hwm as usize;
        if n > PROCS {
            self.corrupt("the process entry mark");
        }
        n.min(PROCS)
    }

    /// Waiter entry `i`.
    pub(super) fn waiter(&self, i: usize) -> &mut Waiter {
        if i >= WAITERS {
            let b = &mut self.blank("a waiter entry number").waiter;
            *b = Blank::NEW.waiter;
            return b;
        }
        // SAFETY: as `slot`.
        unsafe { &mut *self.map.base.add(WAITERS_AT).cast::<Waiter>().add(i) }
    }

    /// The head of hash bucket `i` (`NIL`: empty). Stored complemented, so
    /// that a page of heads never written reads as empty buckets: a fresh
    /// table needs no writing over its buckets, and clearing them is
    /// giving their pages back.
    pub(super) fn head(&self, i: usize) -> u32 {
        !*self.head_word(i)
    }

    /// Make record `at` (or `NIL`) the head of hash bucket `i`.
    pub(super) fn set_head(&self, i: usize, at: u32) {
        *self.head_word(i) = !at;
    }

    fn head_word(&self, i: usize) -> &mut u32 {
        if i >= BUCKETS {
            let b = &mut self.blank("a bucket number").head;
            *b = !Blank::NEW.head;
            return b;
        }
        // SAFETY: as `slot`.
        unsafe { &mut *self.map.base.add(BUCKETS_AT).cast::<u32>().add(i) }
    }

    /// Record `i`.
    pub(super) fn rec(&self, i: u32) -> &mut Rec {
        if i as usize >= RECORDS {
            let b = &mut self.blank("a record number").rec;
            *b = Blank::NEW.rec;
            return b;
        }
        // SAFETY: as `header`; in range; a reference to one record only, so
        // references to different records never overlap.
        unsafe { &mut *self.map.base.add(RECORDS_AT).cast::<Rec>().add(i as usize) }
    }
}
