//! The shared-memory engine ([`Mode::Shm`](crate::Mode::Shm)): a lock table
//! in a sidecar file (`<lock path>-shm`) that every owner maps, guarded by
//! one robust process-shared mutex.
//!
//! # Safety
//!
//! The table is memory shared with other processes. It is only read or
//! written while this process holds the table's mutex (a [`Guard`]), which
//! every process takes before touching it, except the wake-up word, which
//! is only ever used atomically. Every index read from the table is bounds
//! checked before use, so a scribbled table can make us panic but never
//! touch memory outside the mapping. The mapping lives as long as the
//! [`Shm`] that made it; a file whose size is not the table's is refused
//! before it is mapped. A sidecar cut short by someone else while mapped
//! makes the next access fault (`SIGBUS`): no check before an access could
//! close the window before it, so that is out of scope (and documented).
//!
//! # One table per lock file
//!
//! Users hold the lock file's [`IN_USE`] byte shared; only an opener that
//! gets it exclusively sets a table up, so a sidecar removed or replaced
//! while in use (or a lock file renamed) is refused, never set up beside
//! the table in use. A lock file with several names is refused: tables are
//! found by name.
//!
//! # Crash safety
//!
//! Lock records never move, and an owner's process writes only its own
//! owners' records (and frees the records of owners proven dead). Every
//! index over them (hash chains, per-owner lists, the free list, counters)
//! is derived, and rebuilt from the record array whenever the mutex comes
//! back `EOWNERDEAD`. A record half-written by a dying owner over-locks
//! until that owner is found dead; it never frees another owner's lock.
//!
//! # Liveness
//!
//! Each owner takes a slot and holds an OFD write lock on byte
//! `LIVENESS + slot` of the sidecar through its own open file description:
//! the owner is dead when that byte is free (`F_OFD_GETLK`). No pid is
//! trusted, so pid reuse and pid namespaces do not matter.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{Abilities, Engine, Until};
use crate::error::{Error, Holder, NotRegular, SidecarProblem};
use crate::span::{Span, INDEX_END};
use crate::sys::{self, Family, FileType, LockType, OpenHow, Range};
use crate::Kind;

const MAGIC: u64 = u64::from_le_bytes(*b"LKFSHM\x00\x01");
const VERSION: u32 = 4;

/// Owner slots: owners (handles) using one table at once.
pub(crate) const SLOTS: usize = 1024;
/// Waiter entries: threads waiting at once.
pub(crate) const WAITERS: usize = 1024;
/// Lock records: pieces held at once, by all owners together.
pub(crate) const RECORDS: usize = 65536;
/// Hash buckets for single-index records.
const BUCKETS: usize = 65536;

/// Byte of the sidecar every user holds shared while it has the table
/// open; the first opener finds it free and (re)initialises the table.
const DMS: i64 = 1 << 32;
/// Byte `LIVENESS + slot` is write-locked by the owner in `slot`.
const LIVENESS: i64 = DMS + 1;

/// Byte of the *lock file* every user of its table holds shared (an OFD
/// read lock through a description of its own), from before it joins the
/// table until after it has let go of it. Whoever gets it exclusively is
/// the only opener, and only then may a table be set up; an opener that
/// cannot finds the sidecar in use, or refuses it as
/// [`SidecarProblem::Replaced`]. It is past the last index
/// ([`INDEX_END`]), so no kernel-mode span but an open-ended one (`a..`,
/// which then meets it) ever covers it, and it tells kernel-mode opens
/// that a table is in use without looking for the sidecar.
pub(crate) const IN_USE: i64 = i64::MAX;

/// How long a waiter sleeps before it checks its blockers are alive: a
/// killed holder's waiter gets the lock within this (plus a few µs).
pub(crate) const LIVENESS_SLICE: Duration = Duration::from_millis(50);

/// Tries after yielding the CPU before a wait queues and sleeps: a lock
/// held for a moment (hand-over-hand, more processes than cores) is mostly
/// free again once a few others have run, and giving the CPU to them costs
/// less than sleeping and being woken. Measured on the ring race: 10 and
/// more tries beat 2 (and 0, sleeping at once) clearly with 8 processes on
/// 2 CPUs; where no one else wants the CPU each try is a moment.
const YIELDS_BEFORE_QUEUEING: u32 = 10;

/// How a wait for another owner's fast hold waits on its lane before it
/// sleeps there: `pause`s watching the word (128 are about 3 µs here), then
/// times it gives the CPU away. On the ring race with 8 processes on 2
/// CPUs (semaphores in the same runs) this ran in about 0.7 of the
/// semaphores' time, against 0.8 to 1 for the table's wait alone, and
/// sleeping at once was slowest; 32 to 256 watches and 10 to 40 yields
/// were within the noise of each other.
const LANE_SPINS: u32 = 128;
const LANE_YIELDS: u32 = 20;
/// The longest a wait sleeps on a fast hold's lane before the table's
/// wait takes over (and looks for dead holders and deadlocks): detection
/// of both is this much later for a fast hold.
const LANE_NAP: Duration = Duration::from_millis(5);

/// Spans up to this long are checked index by index in the hash; longer
/// ones walk every owner's records.
const FINE_SCAN: u64 = 64;

/// Records kept back for lowering, which may split a record and must
/// never be refused: a raise that would eat into them is refused instead.
const LOWER_RESERVE: usize = 256;

const NIL: u32 = u32::MAX;
const SHARED: u32 = 1;
const EXCLUSIVE: u32 = 2;

#[repr(C)]
struct Header {
    magic: u64,
    version: u32,
    _pad0: u32,
    size: u64,
    dev: u64,
    ino: u64,
    next_ticket: u64,
    next_nonce: u64,
    /// Derived: rebuilt by repair.
    free_head: u32,
    free_count: u32,
    coarse_head: u32,
    coarse_count: u32,
    waiting: u32,
    /// One past the last waiter entry in use.
    waiter_hwm: u32,
    /// Records from here on were never used: still zero, in no list, so
    /// their pages take no memory until needed.
    fresh: u32,
    /// Derived: one past the last owner slot in use, so that the scans
    /// over owners read only the slots there are.
    slot_hwm: u32,
}

/// A cache line each: an owner's every change writes its slot, and slots
/// sharing a line would pull it between the CPUs of their owners.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Slot {
    /// 1 when an owner has the slot.
    used: u32,
    pid: u32,
    nonce: u64,
    /// Derived: this owner's records.
    head: u32,
    records: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Rec {
    start: u64,
    end: u64,
    /// Slot + 1; 0 for a free record.
    owner: u32,
    kind: u32,
    /// Derived: next in the bucket, coarse or free list.
    next: u32,
    /// Derived: next and previous of the same owner.
    onext: u32,
    oprev: u32,
    _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Waiter {
    /// Slot + 1; 0 for a free entry.
    owner: u32,
    kind: u32,
    start: u64,
    end: u64,
    /// Given when it queued, never changed: with the owner, it names the
    /// entry (a waiting thread keeps it to find its entry again).
    ticket: u64,
    /// Its place in the queue: earlier (then, only after a crash in the
    /// middle of a reordering, the lower ticket) comes first. Its ticket
    /// when it queues; the deadlock search moves it ahead of requests it
    /// would otherwise wait behind in a cycle (see [`Guard::reorder`]).
    /// The places of the entries in use differ and are below the header's
    /// `next_ticket`.
    order: u64,
    /// When it started waiting, ns since the Unix epoch (for status).
    since_ns: u64,
    pid: u32,
    _pad: u32,
}

const fn align(x: usize) -> usize {
    (x + 4095) & !4095
}
/// The fast lane's gate (see [`Map::gate`]): a cache line of its own,
/// read by every fast call and written only when it opens or closes.
const GATE_AT: usize = 448;
const MUTEX_AT: usize = 512;
/// One futex word per waiter entry: a waiter sleeps on its own word, and a
/// release wakes only the waiters whose spans it touches.
const WAKES_AT: usize = 4096;
const SLOTS_AT: usize = align(WAKES_AT + WAITERS * size_of::<u32>());
const WAITERS_AT: usize = align(SLOTS_AT + SLOTS * size_of::<Slot>());
const BUCKETS_AT: usize = align(WAITERS_AT + WAITERS * size_of::<Waiter>());
const RECORDS_AT: usize = align(BUCKETS_AT + BUCKETS * size_of::<u32>());
/// Per owner slot, a cache line listing the lanes of its fast holds.
const LISTS_AT: usize = align(RECORDS_AT + RECORDS * size_of::<Rec>());
/// One lane word per hash bucket (see [`Map::lane`]).
const LANES_AT: usize = align(LISTS_AT + SLOTS * 64);
/// The sidecar's size: sparse, and only the pages touched take memory.
pub(crate) const SIZE: usize = align(LANES_AT + BUCKETS * size_of::<u64>());

const _: () = assert!(size_of::<Header>() <= GATE_AT);
const _: () = assert!(MUTEX_AT + size_of::<libc::pthread_mutex_t>() <= WAKES_AT);

/// The sidecar of a lock path: `<path>-shm`.
pub(crate) fn sidecar_path(lock_path: &Path) -> PathBuf {
    let mut s = lock_path.as_os_str().to_owned();
    s.push("-shm");
    PathBuf::from(s)
}

fn cstring(path: &Path) -> Result<CString, Error> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        Error::io(
            "open lock table",
            io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"),
        )
    })
}

/// The network file systems refused, by `f_type` (statfs(2)).
fn network_fs(magic: i64) -> Option<&'static str> {
    Some(match magic as u32 {
        0x6969 => "NFS",
        0x517B => "SMB",
        0xFF53_4D42 => "CIFS",
        0xFE53_4D42 => "SMB2",
        0x0102_1997 => "9p",
        0x00C3_6400 => "Ceph",
        0x5346_414F | 0x6B41_4653 => "AFS",
        0x6573_5546 => "FUSE",
        0x7375_7245 => "Coda",
        0x0BD0_0BD0 => "Lustre",
        0x4750_4653 => "GPFS",
        _ => return None,
    })
}

fn byte(at: i64) -> Range {
    Range { start: at, len: 1 }
}

fn conflict(a: u32, b: u32) -> bool {
    a == EXCLUSIVE || b == EXCLUSIVE
}

fn code(kind: Kind) -> u32 {
    match kind {
        Kind::Shared => SHARED,
        Kind::Exclusive => EXCLUSIVE,
    }
}

fn kind_of(code: u32) -> Kind {
    if code == EXCLUSIVE {
        Kind::Exclusive
    } else {
        Kind::Shared
    }
}

fn overlaps(s: u64, e: u64, t: u64, u: u64) -> bool {
    s < u && t < e
}

fn bucket(index: u64) -> usize {
    (index.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 48) as usize % BUCKETS
}

// ---- the fast lane ----
//
// A lane word per hash bucket lets one owner take one index, and let it
// go, with atomic instructions alone: no mutex, no record. A lane is
// - `LANE_EMPTY`: no record and no single-index waiter in its bucket;
// - `LANE_SLOW`: its bucket is the table's (records or waiters may be in
//   it): every call there takes the mutex;
// - a fast word: `LANE_FAST | slot << 48 | index`, owner `slot` holds
//   `index` exclusively (shared with `LANE_SHARED`; a second reader goes
//   through the table) and its bucket is otherwise empty;
// - the same with `LANE_MOVING`: a mutex holder is turning the fast hold
//   into a record (seen only by repair, after it died doing so);
// - and with `LANE_WAITING`: someone sleeps on the word's upper half (a
//   futex), to be woken by whoever changes the word next.
// A call under the mutex that needs a bucket first makes its lane slow,
// turning a fast hold there into a record (`Guard::enter_lane`), and gives
// the lane back when the bucket is empty again (`Guard::leave`). Records
// of more than one index (and waits for them) close the gate instead: a
// fast hold taken while it is closed is not granted (see `Shm::fast_raise`).

const LANE_EMPTY: u64 = 0;
const LANE_SLOW: u64 = 1;
const LANE_FAST: u64 = 1 << 63;
const LANE_MOVING: u64 = 1 << 62;
const LANE_SHARED: u64 = 1 << 61;
const LANE_WAITING: u64 = 1 << 60;
/// Indices the fast lane can name: the low 48 bits of its word.
const LANE_INDEX_MAX: u64 = (1 << 48) - 1;
const _: () = assert!(SLOTS <= 1 << 10);
/// Fast holds an owner may have at once (its list fills a cache line);
/// past them it takes locks through the mutex.
const FAST_HOLDS: usize = 16;

fn fast_word(slot: u32, index: u64, kind: u32) -> u64 {
    let shared = if kind == SHARED { LANE_SHARED } else { 0 };
    LANE_FAST | shared | (slot as u64) << 48 | index
}

fn lane_kind(w: u64) -> u32 {
    if w & LANE_SHARED != 0 {
        SHARED
    } else {
        EXCLUSIVE
    }
}

fn is_fast(w: u64) -> bool {
    w & LANE_FAST != 0
}

fn lane_owner(w: u64) -> u32 {
    ((w >> 48) & 0x3FF) as u32
}

fn lane_index(w: u64) -> u64 {
    w & LANE_INDEX_MAX
}

/// Whether lane word `w` is owner `o`'s fast hold (not being taken over)
/// on an index of `span`.
fn fast_of(w: u64, o: u32, span: &std::ops::Range<u64>) -> bool {
    is_fast(w) && w & LANE_MOVING == 0 && lane_owner(w) == o && span.contains(&lane_index(w))
}

/// The index `span` is, and its lane, when it is one index the fast lane
/// can name.
fn lane_of(span: Span) -> Option<(u64, usize)> {
    let i = span.start();
    (span.end() - i == 1 && i <= LANE_INDEX_MAX).then(|| (i, bucket(i)))
}

/// Record indices found by [`Guard::mine_near`]: on the stack unless
/// there are many.
#[derive(Default)]
struct Near {
    // Few: a span's neighbourhood holds few records of one owner, and
    // zeroing this is part of every call.
    fixed: [u32; 8],
    n: usize,
    more: Vec<u32>,
}

impl Near {
    fn push(&mut self, i: u32) {
        if self.n < self.fixed.len() {
            self.fixed[self.n] = i;
            self.n += 1;
        } else {
            self.more.push(i);
        }
    }

    fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.fixed[..self.n].iter().chain(&self.more).copied()
    }
}

/// A mapped sidecar.
struct Map {
    base: *mut u8,
}

// SAFETY: the mapping is plain shared memory; every access goes through
// the table's mutex (or atomics), as the module's safety note says.
unsafe impl Send for Map {}
// SAFETY: as above.
unsafe impl Sync for Map {}

// The accessors below hand out `&mut` into memory that other processes
// share: callers hold the table's mutex (a `Guard`), which every process
// takes before touching the table, so no one else writes it meanwhile.
// Each call makes a fresh, short-lived reference from the raw base pointer;
// the regions (header, slots, waiters, buckets, records) never overlap.
#[allow(clippy::mut_from_ref)]
impl Map {
    fn mutex(&self) -> *mut libc::pthread_mutex_t {
        // SAFETY: MUTEX_AT is inside the mapping and suitably aligned.
        unsafe { self.base.add(MUTEX_AT).cast() }
    }

    /// The gate of the fast lane: 0 while no record or waiter spans more
    /// than one index, so that a lane word alone tells whether an index is
    /// free; 1 otherwise. Written only under the mutex.
    fn gate(&self) -> &AtomicU32 {
        // SAFETY: inside the header page, aligned, only used atomically.
        unsafe { &*self.base.add(GATE_AT).cast::<AtomicU32>() }
    }

    /// The lane word of bucket `l`.
    #[inline(always)]
    fn lane(&self, l: usize) -> &AtomicU64 {
        assert!(l < BUCKETS, "lane {l} out of range");
        // SAFETY: in range, inside the mapping, aligned, only used atomically.
        unsafe { &*self.base.add(LANES_AT).cast::<AtomicU64>().add(l) }
    }

    /// The upper half of lane `l`'s word, where waiters for a fast hold
    /// sleep (it holds the flags and the owner).
    fn lane_half(&self, l: usize) -> *const u32 {
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
    fn woke_lane(&self, l: usize, old: u64) {
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
    fn fast_list(&self, s: u32) -> &[AtomicU32; FAST_HOLDS] {
        assert!((s as usize) < SLOTS, "slot {s} out of range");
        // SAFETY: in range, inside the mapping, aligned, only used atomically.
        unsafe {
            &*self
                .base
                .add(LISTS_AT + s as usize * 64)
                .cast::<[AtomicU32; FAST_HOLDS]>()
        }
    }

    /// Strike lane `l` off owner `s`'s list.
    /// The lanes owner `s` lists, each once (entries may repeat a lane).
    fn listed_lanes(&self, s: u32) -> impl Iterator<Item = usize> + '_ {
        let mut seen = [0u32; FAST_HOLDS];
        self.fast_list(s)
            .iter()
            .enumerate()
            .filter_map(move |(k, e)| {
                let v = e.load(Ordering::SeqCst);
                if v == 0 || seen[..k].contains(&v) {
                    return None;
                }
                seen[k] = v;
                Some((v - 1) as usize % BUCKETS)
            })
    }

    /// Entries are interchangeable: the list is right while it lists each
    /// lane at least as often as the owner has a word there, so every
    /// removal takes one entry of that lane off by a swap, never by a
    /// store over whatever an entry holds by then (threads of one owner
    /// list and strike off at once).
    fn unlist(&self, s: u32, l: usize) {
        let v = l as u32 + 1;
        for e in self.fast_list(s) {
            if e.compare_exchange(v, 0, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                return;
            }
        }
    }

    /// Waiter entry `i`'s futex word.
    fn wake_word(&self, i: usize) -> &AtomicU32 {
        assert!(i < WAITERS, "waiter index {i} out of range");
        // SAFETY: in range, inside the mapping, aligned, and only ever used
        // atomically.
        unsafe { &*self.base.add(WAKES_AT).cast::<AtomicU32>().add(i) }
    }

    /// Take the table's mutex. `Err` only for a mutex left unrecoverable.
    fn lock(&self) -> io::Result<(Guard<'_>, bool)> {
        // SAFETY: the mutex was initialised by the table's first opener and
        // stays mapped while `self` lives.
        let died = match unsafe { sys::robust_mutex_lock(self.mutex()) }? {
            sys::Locked::Clean => false,
            sys::Locked::OwnerDied => true,
        };
        Ok((
            Guard {
                map: self,
                woken: [0; WAKE_LIST],
                n_woken: 0,
                wake_upto: 0,
                entered: [0; ENTERED],
                n_entered: 0,
                repairing: false,
                ahead: None,
                renew: 0,
            },
            died,
        ))
    }

    fn header(&self) -> &mut Header {
        // SAFETY: only called through a Guard (the mutex is held).
        unsafe { &mut *self.base.cast::<Header>() }
    }

    // One element at a time, never a slice: a reference to a whole array
    // would overlap every other reference made into it meanwhile.

    /// Owner slot `i`.
    fn slot(&self, i: usize) -> &mut Slot {
        assert!(i < SLOTS, "slot {i} out of range");
        // SAFETY: as `header`; in range, inside the mapping, aligned.
        unsafe { &mut *self.base.add(SLOTS_AT).cast::<Slot>().add(i) }
    }

    /// Waiter entry `i`.
    fn waiter(&self, i: usize) -> &mut Waiter {
        assert!(i < WAITERS, "waiter {i} out of range");
        // SAFETY: as `slot`.
        unsafe { &mut *self.base.add(WAITERS_AT).cast::<Waiter>().add(i) }
    }

    /// The head of hash bucket `i`.
    fn bucket_head(&self, i: usize) -> &mut u32 {
        assert!(i < BUCKETS, "bucket {i} out of range");
        // SAFETY: as `slot`.
        unsafe { &mut *self.base.add(BUCKETS_AT).cast::<u32>().add(i) }
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: `base` is the mapping `map_shared` made, unused from here.
        unsafe { sys::unmap(self.base, SIZE) };
    }
}

/// How many waiters a guard wakes one by one; beyond that it wakes all.
const WAKE_LIST: usize = 8;
/// How many slow lanes a guard looks at giving back; a lane past these
/// stays slow until a later call there finds its bucket empty.
const ENTERED: usize = 8;

/// The table, with its mutex held.
struct Guard<'a> {
    map: &'a Map,
    /// Waiter entries to wake once the mutex is let go (their words are
    /// bumped already)...
    woken: [u16; WAKE_LIST],
    n_woken: usize,
    /// ... or every entry below this.
    wake_upto: usize,
    /// Lanes made slow (or whose bucket lost a record) under this guard,
    /// given back to the fast lane when their bucket is empty.
    entered: [u32; ENTERED],
    n_entered: usize,
    /// Rebuilding the derived indices: lanes are put right afterwards.
    repairing: bool,
    /// The place in the queue the deadlock search gave the request it
    /// looked at, not queued yet: it queues there (see [`Guard::reorder`]).
    ahead: Option<u64>,
    /// Waiter entry + 1 (0: none) to wake once the mutex is let go, after
    /// its own waiting thread read its word: that thread's request was
    /// moved ahead, and must look again instead of sleeping.
    renew: u32,
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        self.leave();
        // SAFETY: we hold the mutex.
        unsafe { sys::robust_mutex_unlock(self.map.mutex()) };
        if self.renew > 0 {
            let word = self.map.wake_word(self.renew as usize - 1);
            word.fetch_add(1, Ordering::Release);
        }
        if self.wake_upto > 0 {
            for i in 0..self.wake_upto {
                sys::futex_wake_all(self.map.wake_word(i));
            }
        } else {
            for &i in &self.woken[..self.n_woken] {
                sys::futex_wake_all(self.map.wake_word(i as usize));
            }
        }
    }
}

/// Tells whether an owner's slot is alive, through some descriptor of the
/// sidecar that is not that owner's.
fn alive(fd: BorrowedFd<'_>, slot: u32) -> bool {
    match sys::get_lock(
        fd,
        Family::Ofd,
        LockType::Write,
        byte(LIVENESS + slot as i64),
    ) {
        Ok(found) => found.is_some(),
        // Unknown: never free a lock on a guess.
        Err(_) => true,
    }
}

/// A place in the queue: a waiter's `(order, ticket)`, earlier first.
type Place = (u64, u64);

impl Waiter {
    fn place(&self) -> Place {
        (self.order, self.ticket)
    }
}

/// The most moves [`Guard::reorder`] makes at once to break the cycles
/// through one request, and the most sets of moves it tries.
const MAX_MOVES: usize = 16;
const REORDER_TRIALS: u32 = 64;

/// The entries of `queue` (earliest first) in an order that puts `a`
/// ahead of `b` for each `(a, b)` of `moves` and moves no one else, as
/// PostgreSQL's `TopoSort`: built from the back, each step taking the
/// latest entry that need not come ahead of an entry still left, so each
/// `a` lands just ahead of the earliest `b` it must pass. `None` when the
/// moves contradict each other (or name an entry not in `queue`).
fn topo_sort(queue: &[(Place, u32)], moves: &[(u32, u32)]) -> Option<Vec<u32>> {
    let n = queue.len();
    let at = |e: u32| queue.iter().position(|q| q.1 == e);
    let mut pairs = Vec::with_capacity(moves.len());
    // How many entries still left each entry must come ahead of.
    let mut ahead_of = vec![0u32; n];
    for &(a, b) in moves {
        let (a, b) = (at(a)?, at(b)?);
        ahead_of[a] += 1;
        pairs.push((a, b));
    }
    let mut left = vec![true; n];
    let mut out = vec![0; n];
    let mut top = n;
    for slot in (0..n).rev() {
        while top > 0 && !left[top - 1] {
            top -= 1;
        }
        let k = (0..top).rev().find(|&k| left[k] && ahead_of[k] == 0)?;
        left[k] = false;
        out[slot] = queue[k].1;
        for &(a, b) in &pairs {
            if b == k {
                ahead_of[a] -= 1;
            }
        }
    }
    Some(out)
}

/// A request as the grant rule sees it.
#[derive(Clone, Copy)]
struct Request<'p> {
    me: u32,
    pieces: &'p [Span],
    kind: u32,
    /// The ticket of its waiter entry, which holds its place in the queue
    /// ([`Guard::place_of`]); `u64::MAX` for a request not queued yet
    /// (its place is past every entry).
    ticket: u64,
    /// Where that entry is, if the caller knows ([`NO_ENTRY`] if not): a
    /// hint that saves a walk over the waiter entries under the mutex.
    entry: u32,
}

/// [`Request::entry`] when the caller does not know it.
const NO_ENTRY: u32 = u32::MAX;

/// What stands in the way of a request.
enum Blocker {
    Record(u32),
    Waiter(u32),
}

impl Guard<'_> {
    /// Wake the waiters whose requests overlap `s..e`: something there
    /// was released, or a request they queued behind went away.
    fn wake_waiters(&mut self, s: u64, e: u64) {
        let h = self.map.header();
        if h.waiting == 0 {
            return;
        }
        for i in 0..h.waiter_hwm as usize {
            let w = *self.map.waiter(i);
            if w.owner != 0 && overlaps(s, e, w.start, w.end) {
                self.wake(i);
            }
        }
    }

    fn wake(&mut self, i: usize) {
        self.map.wake_word(i).fetch_add(1, Ordering::Release);
        if self.wake_upto > 0 {
            self.wake_upto = self.wake_upto.max(i + 1);
        } else if self.n_woken < WAKE_LIST {
            self.woken[self.n_woken] = i as u16;
            self.n_woken += 1;
        } else {
            self.wake_upto = WAITERS;
        }
    }

    /// Wake every waiter (a dead owner's locks went, or the table was
    /// repaired).
    fn wake_everyone(&mut self) {
        let upto = self.map.header().waiter_hwm as usize;
        for i in 0..upto {
            self.map.wake_word(i).fetch_add(1, Ordering::Release);
        }
        self.wake_upto = self.wake_upto.max(upto);
    }

    #[allow(clippy::mut_from_ref)]
    fn rec(&self, i: u32) -> &mut Rec {
        assert!((i as usize) < RECORDS, "record index {i} out of range");
        // SAFETY: in range; the mutex is held (see `Map`); a reference to
        // one record only, so references to different records never overlap.
        unsafe { &mut *self.map.base.add(RECORDS_AT).cast::<Rec>().add(i as usize) }
    }

    // ---- derived indices ----

    fn link(&mut self, i: u32) {
        self.relink_tier(i);
        let r = *self.rec(i);
        let slot = self.map.slot((r.owner - 1) as usize);
        self.rec(i).onext = slot.head;
        self.rec(i).oprev = NIL;
        if slot.head != NIL {
            self.rec(slot.head).oprev = i;
        }
        slot.head = i;
        slot.records += 1;
    }

    /// Take record `i` out of its bucket or the coarse list (not out of
    /// its owner's list).
    fn unlink_tier(&mut self, i: u32) {
        let r = *self.rec(i);
        let h = self.map.header();
        let head: &mut u32 = if r.end - r.start == 1 {
            self.map.bucket_head(bucket(r.start))
        } else {
            h.coarse_count -= 1;
            &mut h.coarse_head
        };
        if *head == i {
            *head = r.next;
            return;
        }
        let mut at = *head;
        let mut steps = 0;
        while at != NIL && steps <= RECORDS {
            let next = self.rec(at).next;
            if next == i {
                self.rec(at).next = r.next;
                return;
            }
            at = next;
            steps += 1;
        }
    }

    fn alloc(&mut self) -> u32 {
        let h = self.map.header();
        let i = if h.free_head != NIL {
            let i = h.free_head;
            h.free_head = self.rec(i).next;
            i
        } else {
            h.fresh += 1;
            h.fresh - 1
        };
        h.free_count -= 1;
        i
    }

    fn free(&mut self, i: u32) {
        let h = self.map.header();
        let r = self.rec(i);
        r.owner = 0;
        r.next = h.free_head;
        h.free_head = i;
        h.free_count += 1;
    }

    /// Rebuild every derived index from the records, slots and waiters,
    /// dropping whatever does not validate. Dead owners (their liveness
    /// byte free, probed through `fd`) lose their slot and everything.
    /// `me` is the repairer's own slot (`NIL` for none): its liveness
    /// lock is held through `fd`, which `F_OFD_GETLK` does not report.
    fn repair(&mut self, fd: BorrowedFd<'_>, me: u32) {
        self.repairing = true;
        let h = self.map.header();
        h.slot_hwm = 0;
        for s in 0..SLOTS {
            let slot = self.map.slot(s);
            let dead = s as u32 != me && !alive(fd, s as u32);
            if slot.used != 0 && (slot.used != 1 || dead) {
                slot.used = 0;
            }
            if slot.used == 1 {
                h.slot_hwm = s as u32 + 1;
            }
            slot.head = NIL;
            slot.records = 0;
        }
        let map = self.map;
        let valid = |owner: u32, kind: u32, start: u64, end: u64| {
            owner >= 1
                && owner as usize <= SLOTS
                && map.slot((owner - 1) as usize).used == 1
                && (kind == SHARED || kind == EXCLUSIVE)
                && start < end
                && end <= INDEX_END
        };
        h.waiting = 0;
        h.waiter_hwm = 0;
        for i in 0..WAITERS {
            let w = *self.map.waiter(i);
            if w.owner != 0 && valid(w.owner, w.kind, w.start, w.end) {
                h.waiting += 1;
                h.waiter_hwm = i as u32 + 1;
            } else {
                self.map.waiter(i).owner = 0;
            }
        }
        self.renumber_queue();
        for b in 0..BUCKETS {
            *self.map.bucket_head(b) = NIL;
        }
        h.free_head = NIL;
        h.coarse_head = NIL;
        h.coarse_count = 0;
        let fresh = h.fresh.min(RECORDS as u32);
        h.fresh = fresh;
        h.free_count = RECORDS as u32 - fresh;
        for i in (0..fresh).rev() {
            let r = *self.rec(i);
            if r.owner != 0 && valid(r.owner, r.kind, r.start, r.end) {
                self.link(i);
            } else {
                self.free(i);
            }
        }
        self.settle_lanes();
        self.repairing = false;
        // Waiters of the dead owner's locks must look again.
        self.wake_everyone();
    }

    /// Make the places in the queue of the entries in use differ and lie
    /// below `next_ticket` (past every ticket too), keeping their order: a
    /// reordering cut short by a death may have left two equal.
    fn renumber_queue(&mut self) {
        let h = self.map.header();
        let mut queue: Vec<(Place, usize)> = (0..h.waiter_hwm as usize)
            .filter(|&i| self.map.waiter(i).owner != 0)
            .map(|i| (self.map.waiter(i).place(), i))
            .collect();
        queue.sort_unstable();
        let mut free = 0u64;
        for (_, i) in queue {
            let w = self.map.waiter(i);
            w.order = w.order.max(free);
            free = w.order.saturating_add(1);
            h.next_ticket = h.next_ticket.max(free).max(w.ticket.saturating_add(1));
        }
    }

    /// Set up a fresh table (the caller holds the sidecar exclusively).
    fn init(&mut self, dev: u64, ino: u64) {
        let h = self.map.header();
        h.version = VERSION;
        h.size = SIZE as u64;
        h.dev = dev;
        h.ino = ino;
        h.next_ticket = 1;
        h.next_nonce = 1;
        for i in 0..WAITERS {
            self.map.waiter(i).owner = 0;
        }
        for s in 0..SLOTS {
            self.map.slot(s).used = 0;
        }
        // The records are zero (the file was just truncated): none in use,
        // all fresh, their pages untouched.
        for b in 0..BUCKETS {
            *self.map.bucket_head(b) = NIL;
        }
        h.free_head = NIL;
        h.fresh = 0;
        h.free_count = RECORDS as u32;
        h.coarse_head = NIL;
        h.coarse_count = 0;
        h.waiting = 0;
        h.waiter_hwm = 0;
        h.slot_hwm = 0;
        // The lanes and fast counts are zero too: every lane empty.
        self.map.gate().store(0, Ordering::SeqCst);
        for s in 0..SLOTS {
            let s = self.map.slot(s);
            s.head = NIL;
            s.records = 0;
        }
    }

    // ---- owners ----

    /// Free everything of the owner in `slot` and the slot itself.
    fn purge(&mut self, slot: u32) {
        self.clear_fast(slot);
        let mut at = self.map.slot(slot as usize).head;
        let mut steps = 0;
        while at != NIL && steps < RECORDS {
            let next = self.rec(at).onext;
            let r = *self.rec(at);
            if r.end - r.start == 1 {
                self.note_lane(bucket(r.start));
            }
            self.unlink_tier(at);
            self.free(at);
            at = next;
            steps += 1;
        }
        let s = self.map.slot(slot as usize);
        s.head = NIL;
        s.records = 0;
        s.used = 0;
        let h = self.map.header();
        while h.slot_hwm > 0 && self.map.slot(h.slot_hwm as usize - 1).used == 0 {
            h.slot_hwm -= 1;
        }
        for i in 0..h.waiter_hwm as usize {
            let w = self.map.waiter(i);
            if w.owner == slot + 1 {
                w.owner = 0;
                h.waiting -= 1;
            }
        }
        self.wake_everyone();
        self.shrink_waiters();
    }

    /// Purge `slot` if its owner is dead; whether it was.
    fn purge_if_dead(&mut self, fd: BorrowedFd<'_>, slot: u32) -> bool {
        if self.map.slot(slot as usize).used == 1 && !alive(fd, slot) {
            self.purge(slot);
            return true;
        }
        false
    }

    fn shrink_waiters(&mut self) {
        let h = self.map.header();
        while h.waiter_hwm > 0 && self.map.waiter(h.waiter_hwm as usize - 1).owner == 0 {
            h.waiter_hwm -= 1;
        }
    }

    // ---- the grant rule ----

    /// The first record of another owner in the way of `kind` on `s..e`.
    fn conflicting_record(&self, me: u32, s: u64, e: u64, kind: u32) -> Option<u32> {
        let h = self.map.header();
        let hit = |r: &Rec| {
            r.owner != 0
                && r.owner != me + 1
                && overlaps(s, e, r.start, r.end)
                && conflict(kind, r.kind)
        };
        let mut steps = 0;
        if h.coarse_count > 0 {
            let mut at = h.coarse_head;
            while at != NIL && steps < RECORDS {
                if hit(self.rec(at)) {
                    return Some(at);
                }
                at = self.rec(at).next;
                steps += 1;
            }
        }
        if e - s <= FINE_SCAN {
            for i in s..e {
                let mut at = *self.map.bucket_head(bucket(i));
                while at != NIL && steps < RECORDS {
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
        for o in 0..h.slot_hwm.min(SLOTS as u32) as usize {
            let slot = *self.map.slot(o);
            if slot.used != 1 || o as u32 == me || slot.records == 0 {
                continue;
            }
            let mut at = slot.head;
            while at != NIL && steps < RECORDS {
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
    fn holds_over(&self, me: u32, s: u64, e: u64, kind: u32) -> bool {
        let mut at = self.map.slot(me as usize).head;
        let mut steps = 0;
        while at != NIL && steps < RECORDS {
            let r = self.rec(at);
            if overlaps(s, e, r.start, r.end) && (kind == 0 || conflict(kind, r.kind)) {
                return true;
            }
            at = r.onext;
            steps += 1;
        }
        false
    }

    /// Whether `req` converts: its owner holds part of the span it changes
    /// (from its first piece to its last). A conversion queues behind no
    /// one, as PostgreSQL's lock manager has it.
    fn is_conversion(&self, req: Request<'_>) -> bool {
        let s = req.pieces.first().map_or(0, |p| p.start());
        let e = req.pieces.last().map_or(0, |p| p.end());
        self.holds_over(req.me, s, e, 0)
    }

    /// Where `req` stands in the queue: its entry's place, or past every
    /// entry when it is not queued.
    fn place_of(&self, req: Request<'_>) -> Place {
        if req.ticket == u64::MAX {
            return (u64::MAX, u64::MAX);
        }
        self.entry_of(req)
            .map_or((u64::MAX, req.ticket), |i| self.map.waiter(i).place())
    }

    /// The waiter entry of `req`, if it is queued.
    fn entry_of(&self, req: Request<'_>) -> Option<usize> {
        if req.ticket == u64::MAX {
            return None;
        }
        let is_it = |i: usize| {
            let w = self.map.waiter(i);
            w.owner == req.me + 1 && w.ticket == req.ticket
        };
        let hwm = self.map.header().waiter_hwm as usize;
        let hint = req.entry as usize;
        if hint < hwm && is_it(hint) {
            return Some(hint);
        }
        (0..hwm).find(|&i| is_it(i))
    }

    /// Whether `req` (not a conversion), standing at `at` in the queue,
    /// queues behind the earlier waiter `w` of another owner: their spans
    /// overlap and their kinds conflict, unless the requester's own locks
    /// hold `w` up (that would be a cycle fcntl never had). The grant rule
    /// and the deadlock search both ask this, so every wait the rule makes
    /// is an edge the search sees.
    fn defers_to(&self, req: Request<'_>, at: Place, w: &Waiter) -> bool {
        w.owner != 0
            && w.owner != req.me + 1
            && w.place() < at
            && conflict(req.kind, w.kind)
            && req
                .pieces
                .iter()
                .any(|p| overlaps(p.start(), p.end(), w.start, w.end))
            && !self.holds_over(req.me, w.start, w.end, w.kind)
    }

    /// The first earlier waiter `req` must let go first (fair queueing).
    fn deferred_to(&self, req: Request<'_>) -> Option<u32> {
        let h = self.map.header();
        if h.waiting == 0 || self.is_conversion(req) {
            return None;
        }
        let at = self.place_of(req);
        (0..h.waiter_hwm as usize)
            .position(|i| self.defers_to(req, at, &*self.map.waiter(i)))
            .map(|i| i as u32)
    }

    /// What is in the way of `req`, if anything. With `life`, owners in
    /// the way are checked for life first (through that descriptor), and
    /// purged when dead; without, the answer may name a dead owner, which
    /// the caller then checks with the mutex let go: the check is a system
    /// call, and the mutex is everyone's.
    fn blocker(&mut self, life: Option<BorrowedFd<'_>>, req: Request<'_>) -> Option<Blocker> {
        for p in req.pieces {
            while let Some(r) = self.conflicting_record(req.me, p.start(), p.end(), req.kind) {
                let owner = self.rec(r).owner - 1;
                if !life.is_some_and(|fd| self.purge_if_dead(fd, owner)) {
                    return Some(Blocker::Record(r));
                }
            }
        }
        // A queued request of a dead owner would be deferred to forever:
        // nothing else ever probes an owner that holds nothing in the way.
        while let Some(w) = self.deferred_to(req) {
            let owner = self.map.waiter(w as usize).owner - 1;
            if !life.is_some_and(|fd| self.purge_if_dead(fd, owner)) {
                return Some(Blocker::Waiter(w));
            }
        }
        None
    }

    /// The owner slot of a blocker.
    fn owner_of(&self, b: &Blocker) -> u32 {
        match *b {
            Blocker::Record(r) => self.rec(r).owner - 1,
            Blocker::Waiter(w) => self.map.waiter(w as usize).owner - 1,
        }
    }

    /// Every owner in the way of `req`, standing at `place` in the queue, for
    /// the deadlock search: `f(owner, None)` for each holder of a
    /// conflicting record (a *hard* edge), `f(owner, Some(entry))` for
    /// each earlier waiter entry it defers to (a *soft* edge). An owner
    /// may come more than once.
    fn each_blocker(&self, req: Request<'_>, place: Place, mut f: impl FnMut(u32, Option<u32>)) {
        let h = self.map.header();
        for o in 0..h.slot_hwm.min(SLOTS as u32) as usize {
            let slot = *self.map.slot(o);
            if slot.used != 1 || o as u32 == req.me {
                continue;
            }
            let mut at = slot.head;
            let mut steps = 0;
            while at != NIL && steps < RECORDS {
                let r = self.rec(at);
                if conflict(req.kind, r.kind)
                    && req
                        .pieces
                        .iter()
                        .any(|p| overlaps(p.start(), p.end(), r.start, r.end))
                {
                    f(o as u32, None);
                    break;
                }
                at = r.onext;
                steps += 1;
            }
        }
        if h.waiting == 0 || self.is_conversion(req) {
            return;
        }
        for i in 0..h.waiter_hwm as usize {
            let w = *self.map.waiter(i);
            if self.defers_to(req, place, &w) {
                f(w.owner - 1, Some(i as u32));
            }
        }
    }

    /// [`Guard::each_blocker`] of the request of waiter entry `i` (in use).
    fn each_entry_blocker(&self, i: usize, f: impl FnMut(u32, Option<u32>)) {
        let w = *self.map.waiter(i);
        let piece = [Span::from_checked(w.start, w.end)];
        let req = Request {
            me: w.owner - 1,
            pieces: &piece,
            kind: w.kind,
            ticket: w.ticket,
            entry: i as u32,
        };
        self.each_blocker(req, w.place(), f);
    }

    /// Whether waiting for `req` would close a cycle of waiting owners
    /// that no rearrangement of the queue breaks: `true` is
    /// `Error::Deadlock`.
    ///
    /// An owner waits for another along a *hard* edge (for a record the
    /// other holds) or a *soft* one (behind the other's earlier queued
    /// request, as [`Guard::defers_to`] has it). First a search from the
    /// blockers of `req` through the waits of their owners, over every
    /// owner slot (no depth limit), tells whether any cycle runs back to
    /// `req`'s owner; when none does (the common case) that is all, at the
    /// cost this search always had. Owners met on a cycle are checked for
    /// life, and dead ones purged before looking again. A cycle left is
    /// then broken by rearranging the queue where that can be done, as
    /// PostgreSQL's deadlock check does ([`Guard::reorder`]): only a cycle
    /// of locks held, or of soft edges that no tried rearrangement
    /// reverses without closing another cycle, is a deadlock.
    fn closes_cycle(&mut self, fd: BorrowedFd<'_>, req: Request<'_>) -> bool {
        let mut seen = [false; SLOTS];
        let mut stack = Vec::new();
        self.each_blocker(req, self.place_of(req), |o, _| stack.push(o));
        let mut found = false;
        while let Some(o) = stack.pop() {
            if o == req.me {
                found = true;
                break;
            }
            if std::mem::replace(&mut seen[o as usize], true) {
                continue;
            }
            let h = self.map.header();
            for i in 0..h.waiter_hwm as usize {
                if self.map.waiter(i).owner == o + 1 {
                    self.each_entry_blocker(i, |b, _| stack.push(b));
                }
            }
        }
        if !found {
            return false;
        }
        // A dead owner on the way breaks the cycle once purged: check
        // everyone this search met, then look again.
        let mut purged = false;
        for (o, was_seen) in seen.iter().enumerate() {
            if *was_seen && o as u32 != req.me {
                purged |= self.purge_if_dead(fd, o as u32);
            }
        }
        if purged {
            return self.closes_cycle(fd, req);
        }
        !self.reorder(req)
    }

    /// Break every cycle of waits through `req` by rearranging the queue,
    /// as PostgreSQL's deadlock check does (its lock manager's README,
    /// `DeadLockCheckRecurse`, `TopoSort`): whether it did.
    ///
    /// A cycle that passes through a soft edge (an entry `a` queued
    /// behind an earlier conflicting entry `b`) is broken by moving `a`
    /// just ahead of `b`. Each cycle found offers its soft edges as such
    /// *moves*, tried in turn on top of the moves already chosen, and the
    /// whole queue is laid out again for each set of moves from its order
    /// before the search ([`topo_sort`]): every `a` lands just ahead of
    /// the earliest `b` it must pass, everyone else keeps their order, and
    /// the places the entries had are handed out again in the new order.
    /// A set of moves is taken when no cycle then runs through `req`, nor
    /// through the owner of any entry moved or passed (a move makes new
    /// edges only there: an entry passed may now defer to the one that
    /// passed it); the entries moved or passed are woken, as one moved
    /// ahead may be granted now. A request not queued yet takes part as a
    /// provisional entry, and queues at the place it was given
    /// ([`Guard::ahead`]), looking again at once ([`Guard::renew`]); so
    /// does a queued request moved ahead.
    ///
    /// What it does not do: a cycle of hard edges alone is a deadlock as
    /// before. Cycles not through `req` or a moved owner are left to their
    /// owners' own searches (PostgreSQL does the same), and a set of moves
    /// that leaves a moved owner in any cycle is refused. At most
    /// [`MAX_MOVES`] moves together and [`REORDER_TRIALS`] sets are tried,
    /// after which the cycle counts as a deadlock; owners met only by the
    /// searches made here are not checked for life. Grants are still
    /// decided by the records: a move only changes whom a request waits
    /// behind, never what two owners may hold at once.
    fn reorder(&mut self, req: Request<'_>) -> bool {
        let (start, provisional) = if req.ticket == u64::MAX {
            // The request as the entry it will be once queued.
            let Some((i, ticket)) = self.push_waiter(req.me, 0, req.pieces, req.kind, None) else {
                return false;
            };
            (
                Request {
                    ticket,
                    entry: i,
                    ..req
                },
                Some(i as usize),
            )
        } else {
            (req, None)
        };
        let h = self.map.header();
        let mut queue: Vec<(Place, u32)> = (0..h.waiter_hwm as usize)
            .filter(|&i| self.map.waiter(i).owner != 0)
            .map(|i| (self.map.waiter(i).place(), i as u32))
            .collect();
        queue.sort_unstable();
        let mut moves = Vec::new();
        let mut trials = REORDER_TRIALS;
        // No move breaks a cycle of locks held: look for one first.
        let broken = self.find_cycle(start, start.me, false, true).is_none()
            && self.try_moves(start, &queue, &mut moves, &mut trials);
        if !broken {
            self.arrange(&queue, &[]);
        }
        let own = self.entry_of(start);
        for &(place, i) in &queue {
            let w = *self.map.waiter(i as usize);
            if w.place() == place {
                continue;
            }
            if Some(i as usize) == provisional {
                self.ahead = Some(w.order);
            } else if Some(i as usize) == own {
                self.renew = i + 1;
            } else {
                self.wake(i as usize);
            }
        }
        if let Some(i) = provisional {
            let w = self.map.waiter(i);
            w.owner = 0;
            self.map.header().waiting -= 1;
            self.shrink_waiters();
        }
        broken
    }

    /// One step of [`Guard::reorder`]: lay the queue out for `moves`, look
    /// for a cycle, and if there is one try each of its soft edges as one
    /// more move. Whether a set of moves that leaves no cycle was found
    /// (the queue is then laid out for it).
    fn try_moves(
        &mut self,
        start: Request<'_>,
        queue: &[(Place, u32)],
        moves: &mut Vec<(u32, u32)>,
        trials: &mut u32,
    ) -> bool {
        if !self.arrange(queue, moves) {
            return false;
        }
        let mut cycle = self.find_cycle(start, start.me, false, false);
        if cycle.is_none() {
            let mut owners: Vec<u32> = moves
                .iter()
                .flat_map(|&(a, b)| [a, b])
                .map(|e| self.map.waiter(e as usize).owner - 1)
                .collect();
            owners.sort_unstable();
            owners.dedup();
            cycle = owners
                .into_iter()
                .find_map(|o| self.find_cycle(start, o, true, false));
        }
        let Some(soft) = cycle else {
            return true;
        };
        if moves.len() >= MAX_MOVES {
            return false;
        }
        for edge in soft {
            if moves.contains(&edge) {
                continue;
            }
            if *trials == 0 {
                return false;
            }
            *trials -= 1;
            moves.push(edge);
            if self.try_moves(start, queue, moves, trials) {
                return true;
            }
            moves.pop();
        }
        false
    }

    /// Give the entries of `queue` (as it was, earliest first) places that
    /// put `a` ahead of `b` for each move `(a, b)` and keep everyone else
    /// in order ([`topo_sort`]): the places they had, in the new order.
    /// `false` (nothing changed): the moves contradict each other.
    fn arrange(&mut self, queue: &[(Place, u32)], moves: &[(u32, u32)]) -> bool {
        let Some(order) = topo_sort(queue, moves) else {
            return false;
        };
        for (&(place, _), e) in queue.iter().zip(order) {
            self.map.waiter(e as usize).order = place.0;
        }
        true
    }

    /// A cycle of waits back to owner `o`, given as its soft edges
    /// (waiting entry, entry it defers to), none for a cycle of locks
    /// held; `None` if there is no cycle. The search starts from `start`
    /// (of owner `o`), or with `whole` from every queued request of `o`;
    /// with `hard_only` it follows hard edges alone.
    fn find_cycle(
        &self,
        start: Request<'_>,
        o: u32,
        whole: bool,
        hard_only: bool,
    ) -> Option<Vec<(u32, u32)>> {
        /// How the search first reached an owner: from which owner, and
        /// through which soft edge (none: a hard one).
        #[derive(Clone, Copy)]
        struct Step {
            from: u32,
            soft: Option<(u32, u32)>,
        }
        let hwm = self.map.header().waiter_hwm as usize;
        let mut via: Vec<Option<Step>> = vec![None; SLOTS];
        let mut stack: Vec<(u32, Step)> = Vec::new();
        let expand = |stack: &mut Vec<(u32, Step)>, from: u32| {
            for i in 0..hwm {
                if self.map.waiter(i).owner == from + 1 {
                    self.each_entry_blocker(i, |b, w| {
                        if !(hard_only && w.is_some()) {
                            let soft = w.map(|w| (i as u32, w));
                            stack.push((b, Step { from, soft }));
                        }
                    });
                }
            }
        };
        if whole {
            expand(&mut stack, o);
        } else {
            let from = self.entry_of(start).map_or(NIL, |i| i as u32);
            self.each_blocker(start, self.place_of(start), |b, w| {
                if !(hard_only && w.is_some()) {
                    let soft = w.map(|w| (from, w)).filter(|_| from != NIL);
                    stack.push((b, Step { from: o, soft }));
                }
            });
        }
        while let Some((b, step)) = stack.pop() {
            if b == o {
                let mut soft = Vec::new();
                let mut s = step;
                for _ in 0..=SLOTS {
                    soft.extend(s.soft);
                    if s.from == o {
                        break;
                    }
                    s = via[s.from as usize]?;
                }
                return Some(soft);
            }
            if via[b as usize].is_some() {
                continue;
            }
            via[b as usize] = Some(step);
            expand(&mut stack, b);
        }
        None
    }

    // ---- changes ----

    /// Set `s..e` to `kind` (0: unlock) for owner `me`, converting in
    /// place, and merge with the owner's touching records of the same kind
    /// (as the kernel does, so an owner's records stay few). The caller
    /// checked there are free records: a split takes one, the new record
    /// one.
    fn set(&mut self, me: u32, s: u64, e: u64, kind: u32) {
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
                && (e - s > 1 || r.end - r.start > 1 || !self.gate_open());
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
                let n = self.alloc();
                *self.rec(n) = Rec {
                    start: e,
                    end: r.end,
                    owner: 0,
                    kind: r.kind,
                    next: NIL,
                    onext: NIL,
                    oprev: NIL,
                    _pad: 0,
                };
                self.rec(n).owner = me + 1;
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
            let n = self.alloc();
            *self.rec(n) = Rec {
                start: ns,
                end: ne,
                owner: 0,
                kind,
                next: NIL,
                onext: NIL,
                oprev: NIL,
                _pad: 0,
            };
            self.rec(n).owner = me + 1;
            self.link(n);
        }
        if lowered {
            self.wake_waiters(s, e);
        }
    }

    /// Whether `me` holds all of `s..e` at `kind` or stronger (setting it
    /// to `kind` then only lowers).
    fn covered(&self, me: u32, s: u64, e: u64, kind: u32) -> bool {
        let mut near = Near::default();
        self.mine_near(me, s, e, &mut near);
        let mut have = 0;
        for at in near.iter() {
            let r = self.rec(at);
            if r.kind >= kind {
                have += r.end.min(e) - r.start.max(s);
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
    fn drop_record(&mut self, i: u32) {
        let r = *self.rec(i);
        self.unlink_tier(i);
        if r.end - r.start == 1 {
            self.note_lane(bucket(r.start));
        }
        let slot = self.map.slot((r.owner - 1) as usize);
        if r.oprev == NIL {
            slot.head = r.onext;
        } else {
            self.rec(r.oprev).onext = r.onext;
        }
        if r.onext != NIL {
            self.rec(r.onext).oprev = r.oprev;
        }
        slot.records -= 1;
        self.free(i);
    }

    /// `me`'s records overlapping `lo..hi`: through the hash and the
    /// coarse list for a short span when the owner has many records, else
    /// through the owner's own list.
    fn mine_near(&self, me: u32, lo: u64, hi: u64, out: &mut Near) {
        let slot = self.map.slot(me as usize);
        let mut steps = 0;
        if slot.records > 16 && hi - lo <= FINE_SCAN + 2 {
            for i in lo..hi {
                let mut at = *self.map.bucket_head(bucket(i));
                while at != NIL && steps < RECORDS {
                    let r = self.rec(at);
                    if r.owner == me + 1 && r.start == i {
                        out.push(at);
                    }
                    at = r.next;
                    steps += 1;
                }
            }
            let mut at = self.map.header().coarse_head;
            while at != NIL && steps < 2 * RECORDS {
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
        while at != NIL && steps < RECORDS {
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
    fn relink_tier(&mut self, i: u32) {
        let r = *self.rec(i);
        if r.end - r.start == 1 {
            let l = bucket(r.start);
            let b = self.map.bucket_head(l);
            self.rec(i).next = *b;
            *b = i;
            // In the bucket first, so that an adoption the lane needs sees
            // this record in its way (fast calls never read buckets).
            let w = self.map.lane(l).load(Ordering::Acquire);
            if !self.repairing && w != LANE_SLOW && w & LANE_MOVING == 0 {
                // Callers keep records back for the adoptions this may make.
                let entered = self.enter_lane(l);
                debug_assert!(entered, "no record for an adoption");
            }
        } else {
            if !self.repairing {
                self.close_gate();
            }
            let h = self.map.header();
            self.rec(i).next = h.coarse_head;
            h.coarse_head = i;
            h.coarse_count += 1;
        }
    }

    /// Records setting `s..e` to `kind` takes when it only lowers what
    /// `me` holds there: unlocking takes one only to split a record around
    /// the span; a downgrade may split one and adds the lowered piece.
    fn records_to_lower(&self, me: u32, s: u64, e: u64, kind: u32) -> usize {
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
    fn has_room(&self, pieces: usize) -> bool {
        self.map.header().free_count as usize >= 2 * pieces + LOWER_RESERVE
    }

    /// Queue a request: at the end, or where the deadlock search put it
    /// ([`Guard::ahead`]), and then it looks again before it sleeps.
    fn add_waiter(&mut self, me: u32, pid: u32, pieces: &[Span], kind: u32) -> Option<(u32, u64)> {
        let ahead = self.ahead.take();
        let queued = self.push_waiter(me, pid, pieces, kind, ahead)?;
        if ahead.is_some() {
            self.renew = queued.0 + 1;
        }
        Some(queued)
    }

    /// Take a waiter entry and a ticket for a request; its place in the
    /// queue is `order`, or its ticket (the end of the queue).
    fn push_waiter(
        &mut self,
        me: u32,
        pid: u32,
        pieces: &[Span],
        kind: u32,
        order: Option<u64>,
    ) -> Option<(u32, u64)> {
        let h = self.map.header();
        let i = (0..WAITERS).position(|i| self.map.waiter(i).owner == 0)?;
        let ticket = h.next_ticket;
        h.next_ticket += 1;
        let w = self.map.waiter(i);
        *w = Waiter {
            owner: 0,
            kind,
            start: pieces.first().map_or(0, |p| p.start()),
            end: pieces.last().map_or(0, |p| p.end()),
            ticket,
            order: order.unwrap_or(ticket),
            since_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
            pid,
            _pad: 0,
        };
        w.owner = me + 1;
        h.waiting += 1;
        h.waiter_hwm = h.waiter_hwm.max(i as u32 + 1);
        Some((i as u32, ticket))
    }

    /// Take waiter entry `i` out of the queue. `wake`: wake the later
    /// waiters that may have deferred to it; needless when it was granted
    /// one piece, as every waiter that deferred to it conflicts with that
    /// piece, now held.
    fn remove_waiter(&mut self, me: u32, i: u32, ticket: u64, wake: bool) {
        let w = self.map.waiter(i as usize);
        if w.owner == me + 1 && w.ticket == ticket {
            w.owner = 0;
            let (s, e) = (w.start, w.end);
            self.map.header().waiting -= 1;
            self.shrink_waiters();
            if wake {
                self.wake_waiters(s, e);
            }
        }
    }
}

// ---- the fast lane, under the mutex ----
impl Guard<'_> {
    fn gate_open(&self) -> bool {
        self.map.gate().load(Ordering::Relaxed) == 0
    }

    /// Close the gate: from here on no fast hold is granted until a guard
    /// finds nothing spanning more than one index and opens it again.
    fn close_gate(&mut self) {
        if self.gate_open() {
            self.map.gate().store(1, Ordering::SeqCst);
        }
    }

    fn note_lane(&mut self, l: usize) {
        let l = l as u32;
        if self.n_entered < ENTERED && !self.entered[..self.n_entered].contains(&l) {
            self.entered[self.n_entered] = l;
            self.n_entered += 1;
        }
    }

    /// Whether a single-index waiter's index is in bucket `l`.
    fn waits_in(&self, l: usize) -> bool {
        let h = self.map.header();
        h.waiting > 0
            && (0..h.waiter_hwm as usize).any(|i| {
                let w = self.map.waiter(i);
                w.owner != 0 && w.end - w.start == 1 && bucket(w.start) == l
            })
    }

    /// Whether a waiter asks for more than one index.
    fn waits_wide(&self) -> bool {
        let h = self.map.header();
        h.waiting > 0
            && (0..h.waiter_hwm as usize).any(|i| {
                let w = self.map.waiter(i);
                w.owner != 0 && w.end - w.start > 1
            })
    }

    /// Before the mutex goes: give back the lanes whose bucket is empty,
    /// and open the gate when nothing spans more than one index.
    fn leave(&mut self) {
        if self.repairing {
            return;
        }
        for k in 0..self.n_entered {
            let l = self.entered[k] as usize;
            let lane = self.map.lane(l);
            if lane.load(Ordering::Relaxed) == LANE_SLOW
                && *self.map.bucket_head(l) == NIL
                && !self.waits_in(l)
            {
                lane.store(LANE_EMPTY, Ordering::Release);
            }
        }
        self.n_entered = 0;
        if !self.gate_open() && self.map.header().coarse_count == 0 && !self.waits_wide() {
            self.map.gate().store(0, Ordering::SeqCst);
        }
    }

    /// Whether owner `o` may hold index `i` at `kind` beside the records.
    /// Waiters are not asked: a fast hold granted before a waiter queued
    /// must never be taken away, and one that was not granted and is made
    /// a record instead only gets ahead of a waiter in that narrow window.
    fn may_hold(&self, o: u32, i: u64, kind: u32) -> bool {
        self.conflicting_record(o, i, i + 1, kind).is_none()
    }

    /// Turn the fast word `w` in lane `l` into a record of its owner, so
    /// the table sees that hold. `false`: no record is free for it. With
    /// the gate closed, a fast word that the table could not grant was
    /// taken after the gate closed, so its taker will see the gate closed
    /// and not count it granted: that word is taken away instead.
    fn adopt(&mut self, l: usize, mut w: u64) -> bool {
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
        if self.map.header().free_count == 0 {
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
    fn enter_lane(&mut self, l: usize) -> bool {
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
    fn adopt_range(&mut self, s: u64, e: u64) -> bool {
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
        for o in 0..self.map.header().slot_hwm.min(SLOTS as u32) {
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
    fn prepare(&mut self, pieces: &[Span]) -> bool {
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
    fn drop_own_fast(&mut self, me: u32, s: u64, e: u64) {
        for l in self.end_fast(me, s..e, LANE_SLOW) {
            self.map.unlist(me, l);
            self.note_lane(l);
        }
    }

    /// Turn every fast word of owner `o` on `span` into `to` (again while
    /// only a waiter's mark gets in the way), waking their sleepers; the
    /// lanes where it did.
    fn end_fast(&self, o: u32, span: std::ops::Range<u64>, to: u64) -> Vec<usize> {
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
    fn extent(&self, o: u32, kind: u32, mut s: u64, mut e: u64) -> (u64, u64) {
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
    fn holds_fast(&self, me: u32, i: u64) -> Option<u32> {
        if i > LANE_INDEX_MAX {
            return None;
        }
        let w = self.map.lane(bucket(i)).load(Ordering::Acquire);
        (w & !(LANE_SHARED | LANE_WAITING) == fast_word(me, i, EXCLUSIVE)).then(|| lane_kind(w))
    }

    /// Forget every fast hold of the owner in `slot` (dead or leaving).
    fn clear_fast(&mut self, slot: u32) {
        self.end_fast(slot, 0..u64::MAX, LANE_EMPTY);
        // The owner is gone (or going): no call of its lists anything.
        for entry in self.map.fast_list(slot) {
            entry.store(0, Ordering::Release);
        }
    }

    /// Put lane `l` right after a repair: a half-made adoption is finished
    /// or undone, a dead owner's fast hold dropped, a lane whose bucket is
    /// the table's made slow.
    fn settle_lane(&mut self, l: usize) {
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
                let mut at = *self.map.bucket_head(l);
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
            if is_fast(w) && self.map.slot(lane_owner(w) as usize).used != 1 {
                swap(w, LANE_EMPTY);
                continue;
            }
            let busy = *self.map.bucket_head(l) != NIL || self.waits_in(l);
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
    fn settle_lanes(&mut self) {
        for s in 0..SLOTS as u32 {
            if self.map.slot(s as usize).used != 1 {
                for entry in self.map.fast_list(s) {
                    entry.store(0, Ordering::Release);
                }
            }
        }
        for l in 0..BUCKETS {
            self.settle_lane(l);
        }
        if self.map.header().coarse_count > 0 || self.waits_wide() {
            self.close_gate();
        }
    }
}

/// One owner's locks in a shared-memory table.
pub(crate) struct Shm {
    map: Map,
    /// This owner's sidecar descriptor, carrying its liveness lock and its
    /// share of the sidecar's DMS byte. `None` once forgotten in a child.
    fd: Option<OwnedFd>,
    /// The lock file, for `as_fd` and the mixed-engine checks.
    lock_fd: Option<OwnedFd>,
    /// A description of the lock file of this owner's own, holding its
    /// [`IN_USE`] byte shared. `None` once dropped.
    mark: Option<OwnedFd>,
    /// Lowerings the table had no record for (start, end, kind; disjoint),
    /// applied by a later call that finds the records; the table holds
    /// more than the owner meanwhile, never less.
    deferred: std::sync::Mutex<Vec<(u64, u64, u32)>>,
    has_deferred: std::sync::atomic::AtomicBool,
    pub dev: u64,
    pub ino: u64,
    slot: u32,
    /// This process's id (the handle is unusable in a child), for status.
    pid: u32,
    writable: bool,
    generation: u64,
    sidecar: PathBuf,
}

impl std::fmt::Debug for Shm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shm")
            .field("sidecar", &self.sidecar)
            .field("slot", &self.slot)
            .finish_non_exhaustive()
    }
}

/// Open `<lock path>-shm`, creating it (if `create`) with the lock file's
/// permission bits when missing, by the lock file's rules.
fn open_sidecar(sidecar: &Path, mode: u32, write: bool, create: bool) -> Result<OwnedFd, Error> {
    let c = cstring(sidecar)?;
    let open_err = |e: io::Error| -> Error {
        match e.raw_os_error() {
            Some(libc::ELOOP) => Error::NotRegularFile {
                path: sidecar.to_path_buf(),
                found: NotRegular::Symlink,
            },
            Some(libc::EISDIR) => Error::NotRegularFile {
                path: sidecar.to_path_buf(),
                found: NotRegular::Directory,
            },
            _ => Error::Open {
                path: sidecar.to_path_buf(),
                source: e,
            },
        }
    };
    let how = |create_exclusive| OpenHow {
        write,
        create_exclusive,
        create: false,
        follow: false,
        mode,
    };
    let fd = loop {
        if write && create {
            match sys::open(&c, how(true)) {
                Ok(fd) => {
                    sys::fchmod(fd.as_fd(), mode)
                        .map_err(|e| Error::io("set lock table mode", e))?;
                    break fd;
                }
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(open_err(e)),
            }
        }
        match sys::open(&c, how(false)) {
            Ok(fd) => break fd,
            Err(e) if write && create && e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(open_err(e)),
        }
    };
    let id = sys::fstat(fd.as_fd()).map_err(|e| Error::io("fstat lock table", e))?;
    if id.file_type != FileType::Regular {
        return Err(Error::NotRegularFile {
            path: sidecar.to_path_buf(),
            found: NotRegular::Other,
        });
    }
    Ok(fd)
}

fn set_byte(fd: BorrowedFd<'_>, ty: LockType, at: i64, wait: bool) -> io::Result<()> {
    loop {
        match sys::set_lock(fd, Family::Ofd, ty, byte(at), wait) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            r => return r,
        }
    }
}

fn is_contention(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES))
}

/// Map the sidecar open as `fd` through a new open file description of
/// it. A mapping keeps its open file description alive, and children
/// inherit mappings: mapped through `fd`, a forked child would keep the
/// owner's liveness lock (held through `fd`'s description) after the owner
/// died.
fn map_table(fd: BorrowedFd<'_>) -> io::Result<Map> {
    let again = reopen(fd, true)?;
    Ok(Map {
        base: sys::map_shared(again.as_fd(), SIZE)?,
    })
}

/// Read the header's first fields with `pread` (never through a mapping,
/// which a short file would fault).
fn read_header(fd: BorrowedFd<'_>) -> io::Result<(u64, u32, u64, u64, u64)> {
    let mut buf = [0u8; 40];
    let n = sys::pread(fd, &mut buf, 0)?;
    if n < buf.len() {
        return Ok((0, 0, 0, 0, 0));
    }
    let u64_at = |i: usize| u64::from_ne_bytes(buf[i..i + 8].try_into().expect("8 bytes"));
    let version = u32::from_ne_bytes(buf[8..12].try_into().expect("4 bytes"));
    Ok((u64_at(0), version, u64_at(16), u64_at(24), u64_at(32)))
}

/// Join the table in `sidecar` for the lock file (dev, ino): reset it if
/// no one uses it, else check it and map it. Only the `first` opener (it
/// holds the lock file's [`IN_USE`] byte exclusively) may set a table up;
/// any other gets `Ok(None)` where it would have to: the table in use is
/// not this file, or its users are coming or going (try again).
fn join(
    sidecar: &Path,
    fd: BorrowedFd<'_>,
    dev: u64,
    ino: u64,
    first: bool,
) -> Result<Option<Map>, Error> {
    let bad = |problem| Error::Sidecar {
        path: sidecar.to_path_buf(),
        problem,
    };
    let io_err = |op| move |e| Error::io(op, e);
    // A table whose first opener died while setting it up has no magic
    // number yet: whoever holds it shared lets go and tries again, until
    // one opener finds the DMS byte free and sets it up.
    for _ in 0..1000 {
        match set_byte(fd, LockType::Write, DMS, false) {
            Ok(()) if !first => {
                // Others hold the lock file's marker but not this table.
                set_byte(fd, LockType::Unlock, DMS, false).map_err(io_err("unlock lock table"))?;
                return Ok(None);
            }
            Ok(()) => {
                // No one has the table open: reset it, unless it is not
                // ours (a file of the table's size that starts with zeros
                // is ours, its setting up cut short).
                let st = sys::fstat(fd).map_err(io_err("fstat lock table"))?;
                if st.size > 0 {
                    let (magic, version, ..) =
                        read_header(fd).map_err(io_err("read lock table"))?;
                    let unfinished = magic == 0 && st.size == SIZE as u64;
                    if magic != MAGIC && !unfinished {
                        return Err(bad(SidecarProblem::Foreign));
                    }
                    if version > VERSION {
                        return Err(bad(SidecarProblem::NewerVersion { found: version }));
                    }
                }
                sys::ftruncate(fd, 0).map_err(io_err("reset lock table"))?;
                sys::ftruncate(fd, SIZE as u64).map_err(io_err("size lock table"))?;
                let map = map_table(fd).map_err(io_err("map lock table"))?;
                // SAFETY: we hold the DMS byte exclusively, so no one else
                // has the table mapped and in use; the mutex memory is ours.
                unsafe { sys::robust_mutex_init(map.mutex()) }
                    .map_err(io_err("initialise lock table mutex"))?;
                {
                    let (mut g, _) = map.lock().map_err(io_err("lock table mutex"))?;
                    g.init(dev, ino);
                    // Last: a table with its magic number is complete.
                    g.map.header().magic = MAGIC;
                }
                // Atomic conversion: no opener slips in between.
                set_byte(fd, LockType::Read, DMS, false).map_err(io_err("share lock table"))?;
                return Ok(Some(map));
            }
            Err(e) if is_contention(&e) => {
                // In use, or being set up: wait for a share.
                set_byte(fd, LockType::Read, DMS, true).map_err(io_err("share lock table"))?;
                let (magic, ..) = read_header(fd).map_err(io_err("read lock table"))?;
                let st = sys::fstat(fd).map_err(io_err("fstat lock table"))?;
                if magic == 0 && (st.size == 0 || st.size == SIZE as u64) {
                    set_byte(fd, LockType::Unlock, DMS, false)
                        .map_err(io_err("unlock lock table"))?;
                    if !first {
                        // Only a first opener sets a table up.
                        return Ok(None);
                    }
                    std::thread::yield_now();
                    continue;
                }
                let map = check_and_map(sidecar, fd, Some((dev, ino)))?;
                return Ok(Some(map));
            }
            Err(e) => return Err(Error::io("lock lock table", e)),
        }
    }
    Err(Error::io(
        "open lock table",
        io::Error::other("its first opener never finished setting it up"),
    ))
}

/// Check a sidecar in use (magic, version, size, lock file) and map it.
fn check_and_map(
    sidecar: &Path,
    fd: BorrowedFd<'_>,
    lock_file: Option<(u64, u64)>,
) -> Result<Map, Error> {
    let bad = |problem| Error::Sidecar {
        path: sidecar.to_path_buf(),
        problem,
    };
    let st = sys::fstat(fd).map_err(|e| Error::io("fstat lock table", e))?;
    let (magic, version, size, dev, ino) =
        read_header(fd).map_err(|e| Error::io("read lock table", e))?;
    if magic != MAGIC {
        return Err(bad(SidecarProblem::Foreign));
    }
    if version != VERSION {
        return Err(bad(SidecarProblem::NewerVersion { found: version }));
    }
    if st.size != SIZE as u64 || size != SIZE as u64 {
        return Err(bad(SidecarProblem::WrongSize {
            found: st.size,
            expected: SIZE as u64,
        }));
    }
    if let Some(id) = lock_file {
        if (dev, ino) != id {
            return Err(bad(SidecarProblem::OtherLockFile));
        }
    }
    map_table(fd).map_err(|e| Error::io("map lock table", e))
}

/// The path the lock file really has (symlinks resolved), so that every
/// name that reaches it through a symlink finds one sidecar. The kernel
/// tells it for the open descriptor; `given` where it cannot.
fn real_path(given: &Path, fd: BorrowedFd<'_>) -> PathBuf {
    match std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())) {
        Ok(p) if p.is_absolute() && !p.as_os_str().as_bytes().ends_with(b" (deleted)") => p,
        _ => given.to_path_buf(),
    }
}

/// Whether the sidecar of `lock_path` is in use (someone holds its DMS
/// byte): a kernel-mode open must then be refused.
pub(crate) fn table_in_use(lock_path: &Path, lock_fd: Option<BorrowedFd<'_>>) -> bool {
    if let Some(fd) = lock_fd {
        match sys::get_lock(fd, Family::Ofd, LockType::Write, byte(IN_USE)) {
            Ok(None) => return false,
            // Starting at the marker (the kernel tells a lock on the last
            // byte as running to the end): a table's user. Anything else
            // covering it is a kernel lock on `a..`: ask the sidecar.
            Ok(Some(b)) if b.range.start == IN_USE => return true,
            _ => {}
        }
    }
    let real = match lock_fd {
        Some(fd) => real_path(lock_path, fd),
        None => std::fs::canonicalize(lock_path).unwrap_or_else(|_| lock_path.to_path_buf()),
    };
    let sidecar = sidecar_path(&real);
    let Ok(c) = CString::new(sidecar.as_os_str().as_bytes()) else {
        return false;
    };
    let how = OpenHow {
        write: false,
        create_exclusive: false,
        create: false,
        follow: false,
        mode: 0,
    };
    let Ok(fd) = sys::open(&c, how) else {
        return false;
    };
    match sys::fstat(fd.as_fd()) {
        Ok(id) if id.file_type == FileType::Regular => {}
        _ => return false,
    }
    matches!(
        sys::get_lock(fd.as_fd(), Family::Ofd, LockType::Write, byte(DMS)),
        Ok(Some(_))
    )
}

/// What kernel locks the lock file has, if any: `Shm` refuses to join
/// then.
fn kernel_locks(lock_fd: BorrowedFd<'_>, dev: u64, ino: u64) -> Option<&'static str> {
    // Every index, not the in-use marker other users of the table hold.
    let all = Range {
        start: 0,
        len: IN_USE,
    };
    if let Ok(Some(_)) = sys::get_lock(lock_fd, Family::Ofd, LockType::Write, all) {
        return Some("fcntl record locks");
    }
    if let Ok(lines) = sys::flock_locks(dev, ino) {
        if !lines.is_empty() {
            return Some("flock(2) locks");
        }
    }
    None
}

/// Take `s..e` out of the (disjoint) spans of `d`.
fn subtract(d: &mut Vec<(u64, u64, u32)>, s: u64, e: u64) {
    let mut rest = Vec::new();
    d.retain_mut(|(t, u, kind)| {
        if !overlaps(s, e, *t, *u) {
            return true;
        }
        if *u > e {
            rest.push((e, *u, *kind));
        }
        *u = s.min(*u);
        *t < *u
    });
    d.extend(rest);
}

/// A new open file description of the file open as `fd`.
fn reopen(fd: BorrowedFd<'_>, write: bool) -> io::Result<OwnedFd> {
    let proc =
        CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL in a number");
    let how = OpenHow {
        write,
        create_exclusive: false,
        create: false,
        follow: true,
        mode: 0,
    };
    let again = sys::open(&proc, how)?;
    let (a, b) = (sys::fstat(fd)?, sys::fstat(again.as_fd())?);
    if (a.dev, a.ino) != (b.dev, b.ino) {
        return Err(io::Error::other(
            "the file changed while being opened again",
        ));
    }
    Ok(again)
}

/// Take the lock file's [`IN_USE`] byte through `mark`: exclusively when
/// no one else holds it (`true`: the first opener, the only one that may
/// set a table up), else shared, once no first opener is setting up. A
/// read-only description can only share it: it is first when no one else
/// holds it (two such openers at once may both be; the sidecar's DMS byte
/// still lets only one set the table up).
fn take_marker(mark: BorrowedFd<'_>, write: bool) -> io::Result<bool> {
    if !write {
        set_byte(mark, LockType::Read, IN_USE, true)?;
        return Ok(sys::get_lock(mark, Family::Ofd, LockType::Write, byte(IN_USE))?.is_none());
    }
    match set_byte(mark, LockType::Write, IN_USE, false) {
        Ok(()) => return Ok(true),
        Err(e) if is_contention(&e) => {}
        Err(e) => return Err(e),
    }
    set_byte(mark, LockType::Read, IN_USE, true)?;
    // Everyone else may have gone meanwhile: then this opener is first.
    match set_byte(mark, LockType::Write, IN_USE, false) {
        Ok(()) => Ok(true),
        Err(e) if is_contention(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Tries of [`join_marked`] while others hold the marker but not the table
/// (openers that have not joined it yet): the first few after yielding,
/// the rest after 1 ms each.
const MARKED_TRIES: u32 = 200;

/// Take the in-use marker through `mark` and join the table in `sidecar`:
/// its descriptor (carrying a share of the DMS byte) and mapping. Holding
/// the marker shared while the sidecar is missing, or no one holds its DMS
/// byte, means the table in use was removed or replaced: refused, nothing
/// created or reset.
fn join_marked(
    sidecar: &Path,
    mark: BorrowedFd<'_>,
    write: bool,
    id: &sys::FileId,
) -> Result<(OwnedFd, Map), Error> {
    let replaced = || Error::Sidecar {
        path: sidecar.to_path_buf(),
        problem: SidecarProblem::Replaced,
    };
    for attempt in 0..MARKED_TRIES {
        let first = take_marker(mark, write).map_err(|e| Error::io("lock lock file", e))?;
        let fd = match open_sidecar(sidecar, id.mode, true, first) {
            Ok(fd) => Some(fd),
            // Removed, or (read-only openers) not created yet.
            Err(Error::Open { source, .. })
                if !first && source.raw_os_error() == Some(libc::ENOENT) =>
            {
                None
            }
            Err(e) => return Err(e),
        };
        let Some(fd) = fd else {
            set_byte(mark, LockType::Unlock, IN_USE, false)
                .map_err(|e| Error::io("unlock lock file", e))?;
            pause(attempt);
            continue;
        };
        let raw = fd.as_raw_fd();
        // A child must never keep this owner alive, nor the table in use.
        if !sys::close_in_children(raw) {
            return Err(Error::TableFull {
                path: sidecar.to_path_buf(),
                what: "shm handles in this process",
            });
        }
        let joined = join(sidecar, fd.as_fd(), id.dev, id.ino, first);
        if !matches!(joined, Ok(Some(_))) {
            sys::keep_in_children(raw);
        }
        match joined {
            Ok(Some(map)) => {
                if first {
                    // Atomic conversion: the table is set up.
                    if let Err(e) = set_byte(mark, LockType::Read, IN_USE, false) {
                        sys::keep_in_children(raw);
                        return Err(Error::io("share lock file", e));
                    }
                }
                return Ok((fd, map));
            }
            Ok(None) => {
                drop(fd);
                set_byte(mark, LockType::Unlock, IN_USE, false)
                    .map_err(|e| Error::io("unlock lock file", e))?;
                pause(attempt);
            }
            Err(e) => return Err(e),
        }
    }
    Err(replaced())
}

/// Between tries of [`join_marked`]: others' openings take microseconds,
/// unless they are descheduled.
fn pause(attempt: u32) {
    if attempt < 10 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl Shm {
    /// Join the table of the lock file open as `lock_fd` at `lock_path`.
    pub fn open(lock_path: &Path, lock_fd: OwnedFd, writable: bool) -> Result<Shm, Error> {
        let id = sys::fstat(lock_fd.as_fd()).map_err(|e| Error::io("fstat lock file", e))?;
        let fs = sys::fs_type(lock_fd.as_fd()).map_err(|e| Error::io("statfs lock file", e))?;
        if let Some(fs) = network_fs(fs) {
            return Err(Error::NetworkFileSystem {
                path: lock_path.to_path_buf(),
                fs,
            });
        }
        let sidecar = sidecar_path(&real_path(lock_path, lock_fd.as_fd()));
        if id.nlink > 1 {
            // The table is found by name: each name would have its own.
            return Err(Error::Sidecar {
                path: sidecar,
                problem: SidecarProblem::HardLinked { links: id.nlink },
            });
        }
        if let Some(in_use) = kernel_locks(lock_fd.as_fd(), id.dev, id.ino) {
            return Err(Error::MixedModes {
                path: lock_path.to_path_buf(),
                in_use,
            });
        }
        // The in-use marker goes through a description of its own, which
        // no child inherits: a child must never keep the table in use.
        let write = sys::is_writable(lock_fd.as_fd()).unwrap_or(false);
        let mark = reopen(lock_fd.as_fd(), write).map_err(|e| Error::io("open lock file", e))?;
        if !sys::close_in_children(mark.as_raw_fd()) {
            return Err(Error::TableFull {
                path: sidecar,
                what: "shm handles in this process",
            });
        }
        let joined = join_marked(&sidecar, mark.as_fd(), write, &id);
        let (fd, map) = match joined {
            Ok(j) => j,
            Err(e) => {
                sys::keep_in_children(mark.as_raw_fd());
                return Err(e);
            }
        };
        let mut shm = Shm {
            map,
            fd: Some(fd),
            mark: Some(mark),
            deferred: Default::default(),
            has_deferred: Default::default(),
            lock_fd: Some(lock_fd),
            dev: id.dev,
            ino: id.ino,
            slot: NIL,
            pid: std::process::id(),
            writable,
            generation: sys::fork_generation(),
            sidecar,
        };
        shm.slot = shm.claim_slot()?;
        Ok(shm)
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_ref().expect("open until dropped").as_fd()
    }

    /// The lock file's descriptor.
    pub fn lock_fd(&self) -> BorrowedFd<'_> {
        self.lock_fd.as_ref().expect("open until dropped").as_fd()
    }

    fn lock(&self) -> Result<Guard<'_>, Error> {
        let (mut g, died) = self
            .map
            .lock()
            .map_err(|e| Error::io("lock table mutex", e))?;
        if died {
            g.repair(self.fd(), self.slot);
            // SAFETY: we hold the mutex.
            unsafe { sys::robust_mutex_consistent(self.map.mutex()) };
        }
        Ok(g)
    }

    fn full(&self, what: &'static str) -> Error {
        Error::TableFull {
            path: self.sidecar.clone(),
            what,
        }
    }

    /// Take a free slot (or a dead owner's) and its liveness byte.
    fn claim_slot(&self) -> Result<u32, Error> {
        let mut g = self.lock()?;
        for pass in 0..2 {
            for s in 0..SLOTS as u32 {
                let used = g.map.slot(s as usize).used != 0;
                if used != (pass == 1) {
                    continue;
                }
                // Getting the byte proves the slot's last owner gone.
                match set_byte(self.fd(), LockType::Write, LIVENESS + s as i64, false) {
                    Ok(()) => {}
                    Err(e) if is_contention(&e) => continue,
                    Err(e) => return Err(Error::io("lock owner slot", e)),
                }
                if used {
                    g.purge(s);
                }
                let h = g.map.header();
                let nonce = h.next_nonce;
                h.next_nonce += 1;
                h.slot_hwm = h.slot_hwm.max(s + 1);
                let slot = g.map.slot(s as usize);
                slot.pid = self.pid;
                slot.nonce = nonce;
                slot.head = NIL;
                slot.records = 0;
                slot.used = 1;
                return Ok(s);
            }
        }
        Err(self.full("owners"))
    }

    /// This owner's id, as [`Snapshot`] shows it.
    pub fn owner_id(&self) -> u64 {
        self.lock()
            .map(|g| g.map.slot(self.slot as usize).nonce)
            .unwrap_or(0)
    }

    fn is_inherited(&self) -> bool {
        self.generation != sys::current_fork_generation()
    }

    fn holder_of(&self, g: &Guard<'_>, b: Blocker) -> Holder {
        match b {
            Blocker::Record(r) => {
                let r = *g.rec(r);
                let (start, end) = g.extent(r.owner - 1, r.kind, r.start, r.end);
                Holder {
                    span: Span::from_checked(start, end),
                    kind: kind_of(r.kind),
                    pid: Some(g.map.slot((r.owner - 1) as usize).pid).filter(|&p| p > 0),
                    server: None,
                }
            }
            Blocker::Waiter(w) => {
                let w = *g.map.waiter(w as usize);
                Holder {
                    span: Span::from_checked(w.start, w.end),
                    kind: kind_of(w.kind),
                    pid: Some(w.pid).filter(|&p| p > 0),
                    server: None,
                }
            }
        }
    }

    /// Whether lane word `w` is another owner's fast hold on index `i`.
    fn fast_in_way(&self, w: u64, i: u64, kind: Kind) -> bool {
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
    fn wait_on_lane(&self, span: Span, kind: Kind, until: Until<'_>) -> Result<bool, Error> {
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
            // SAFETY: an aligned word of the mapping, which outlives the call.
            let slept =
                unsafe { sys::futex_wait_raw(self.map.lane_half(l), (marked >> 32) as u32, nap) };
            match slept.map_err(|e| e.raw_os_error()) {
                Err(Some(libc::EINTR)) if until.interruptible => return Err(Error::Interrupted),
                // Woken, interrupted or timed out: look again (the nap's
                // time left ends it).
                _ => {}
            }
        }
    }

    /// Wait until every piece can be raised to `kind` at once, then raise
    /// them all; on any error nothing changed.
    fn wait_all(&self, pieces: &[Span], kind: Kind, until: Until<'_>) -> Result<(), Error> {
        if let [span] = pieces {
            if self.wait_on_lane(*span, kind, until)? {
                return Ok(());
            }
        }
        let kind = code(kind);
        let me = self.slot;
        let mut g = self.lock()?;
        self.settle(&mut g);
        let mut queued: Option<(u32, u64)> = None;
        let mut slice_over = false;
        let mut yields = 0;
        // While queued, a cancel bumps and wakes our futex word.
        let mut armed = None;
        loop {
            let (entry, ticket) = queued.unwrap_or((NO_ENTRY, u64::MAX));
            let req = Request {
                me,
                pieces,
                kind,
                ticket,
                entry,
            };
            // Owners in the way are checked for life (a system call) only
            // before the wait queues and sleeps, gives up, or goes on after
            // a slice with no wake-up (a holder that dies wakes no one): a
            // lock held for a moment is mostly free again before that.
            let ended = until.ended();
            let expired = ended.is_some();
            let about_to_queue = queued.is_none() && yields >= YIELDS_BEFORE_QUEUEING;
            let life = (slice_over || expired || about_to_queue).then(|| self.fd());
            let outcome = if !g.prepare(pieces) {
                Some(Err(self.full("lock records")))
            } else if g.blocker(life, req).is_none() {
                if g.has_room(pieces.len()) {
                    for p in pieces {
                        g.set(me, p.start(), p.end(), kind);
                        self.forget_deferred(p.start(), p.end());
                    }
                    Some(Ok(()))
                } else {
                    Some(Err(self.full("lock records")))
                }
            } else if (about_to_queue || slice_over) && g.closes_cycle(self.fd(), req) {
                Some(Err(Error::Deadlock { at: None }))
            } else {
                ended.map(Err)
            };
            if let Some(outcome) = outcome {
                if let Some((i, t)) = queued {
                    let one_piece_granted = outcome.is_ok() && pieces.len() == 1;
                    g.remove_waiter(me, i, t, !one_piece_granted);
                }
                return outcome;
            }
            if queued.is_none() && yields < YIELDS_BEFORE_QUEUEING {
                // A lock held for a moment (hand-over-hand, more processes
                // than cores) is often free once its holder has run: give
                // the CPU away and look again before queueing and sleeping.
                yields += 1;
                drop(g);
                std::thread::yield_now();
                g = self.lock()?;
                continue;
            }
            if queued.is_none() {
                queued = Some(
                    g.add_waiter(me, self.pid, pieces, kind)
                        .ok_or_else(|| self.full("waiters"))?,
                );
            }
            let word = self.map.wake_word(queued.map_or(0, |q| q.0) as usize);
            if let (Some(c), None) = (until.cancel, &armed) {
                // SAFETY: the word is in our mapping, which outlives this
                // call; `armed` is dropped before the call returns.
                let waker = unsafe { sys::WordWaker::new(word) };
                armed = Some(c.arm(Box::new(move || waker.wake())));
            }
            let seen = word.load(Ordering::Acquire);
            drop(g);
            let mut sleep = LIVENESS_SLICE;
            if let Some(left) = until.left() {
                sleep = sleep.min(left);
            }
            // A cancel after `seen` was read changes the word, so the sleep
            // ends at once; one before it is seen here.
            let woke = if until.ended().is_some() {
                Ok(())
            } else {
                sys::futex_wait(word, seen, sleep)
            };
            slice_over = false;
            let interrupted = match woke {
                Ok(()) => false,
                Err(e) if e.raw_os_error() == Some(libc::ETIMEDOUT) => {
                    slice_over = true;
                    false
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => until.interruptible,
                Err(e) => {
                    let mut g = self.lock()?;
                    if let Some((i, t)) = queued {
                        g.remove_waiter(me, i, t, true);
                    }
                    return Err(Error::io("futex wait", e));
                }
            };
            g = self.lock()?;
            self.settle(&mut g);
            if interrupted {
                if let Some((i, t)) = queued {
                    g.remove_waiter(me, i, t, true);
                }
                return Err(Error::Interrupted);
            }
        }
    }
}

impl Shm {
    /// Take one index on the fast lane: three atomic instructions, no
    /// mutex. `false`: not granted this way (the lane is not empty, or the
    /// gate is closed); the caller takes the mutex.
    #[inline(always)]
    fn fast_raise(&self, span: Span, kind: Kind) -> bool {
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
    fn confirm_fast(&self, l: usize, w: u64) -> bool {
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
    fn empty_lane(&self, l: usize, ours: impl Fn(u64) -> bool) -> bool {
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
    fn fast_lower(&self, span: Span) -> bool {
        let Some((i, l)) = lane_of(span) else {
            return false;
        };
        if self.has_deferred.load(Ordering::Relaxed) {
            return false;
        }
        let ours = fast_word(self.slot, i, EXCLUSIVE);
        self.empty_lane(l, |w| w & !(LANE_SHARED | LANE_WAITING) == ours)
    }

    /// Raise `span` to `kind` without waiting; `Ok(false)` when another
    /// owner is in the way. With `check_life`, an owner in the way is first
    /// checked for life (with the mutex let go) and purged when dead.
    #[inline(always)]
    fn raise(&self, span: Span, kind: Kind, check_life: bool) -> Result<bool, Error> {
        let mut g = self.lock()?;
        let me = self.slot;
        self.settle(&mut g);
        let (s, e, k) = (span.start(), span.end(), code(kind));
        let pieces = [span];
        // Before the room is counted: turning fast holds into records
        // takes records too.
        let prepared = g.prepare(&pieces);
        // Only a nearly full table asks whether this only lowers (which may
        // use the records kept back for lowering, and is never refused).
        if !prepared || !g.has_room(1) {
            if g.covered(me, s, e, k) {
                self.lower(&mut g, s, e, k);
                return Ok(true);
            }
            return Err(self.full("lock records"));
        }
        let req = Request {
            me,
            pieces: &pieces,
            kind: k,
            ticket: u64::MAX,
            entry: NO_ENTRY,
        };
        if let Some(b) = g.blocker(None, req) {
            if !check_life {
                return Ok(false);
            }
            let owner = g.owner_of(&b);
            drop(g);
            return self.refused(owner, span, kind);
        }
        g.set(me, s, e, k);
        self.forget_deferred(s, e);
        Ok(true)
    }

    /// A raise found `owner` in the way: if that owner is alive, refused;
    /// if it died, purge it and try again. The check runs with the mutex
    /// let go (a system call), so a refusal never makes others wait on it.
    #[cold]
    #[inline(never)]
    fn refused(&self, owner: u32, span: Span, kind: Kind) -> Result<bool, Error> {
        // Each try again follows a purge, so this ends.
        if alive(self.fd(), owner) || !self.lock()?.purge_if_dead(self.fd(), owner) {
            return Ok(false);
        }
        self.raise(span, kind, true)
    }

    /// Set `s..e` to `kind` (0: unlock), which only lowers what this owner
    /// holds there: never refused. A lowering that would split a record
    /// when the table has no record left for it is deferred instead: the
    /// table keeps the stronger lock (over-locking, which only delays
    /// others) until a later call of this owner finds the records.
    fn lower(&self, g: &mut Guard<'_>, s: u64, e: u64, kind: u32) {
        // A lowering takes at most two records (see `records_to_lower`):
        // counting them exactly matters only when the table is nearly full.
        // Three more for the fast holds of other indices in the buckets of
        // the single-index records this may leave (each end, the middle).
        let free = g.map.header().free_count as usize;
        if free >= 5 || free >= g.records_to_lower(self.slot, s, e, kind) + 3 {
            g.set(self.slot, s, e, kind);
            self.forget_deferred(s, e);
        } else {
            let mut d = self.deferred.lock().unwrap_or_else(|p| p.into_inner());
            subtract(&mut d, s, e);
            d.push((s, e, kind));
            self.has_deferred.store(true, Ordering::Relaxed);
        }
    }

    /// Apply the deferred lowerings there are records for now.
    #[inline(always)]
    fn settle(&self, g: &mut Guard<'_>) {
        if self.has_deferred.load(Ordering::Relaxed) {
            self.settle_slow(g);
        }
    }

    #[cold]
    #[inline(never)]
    fn settle_slow(&self, g: &mut Guard<'_>) {
        let mut d = self.deferred.lock().unwrap_or_else(|p| p.into_inner());
        d.retain(|&(s, e, kind)| {
            if (g.map.header().free_count as usize) < g.records_to_lower(self.slot, s, e, kind) + 3
            {
                return true;
            }
            g.set(self.slot, s, e, kind);
            false
        });
        self.has_deferred.store(!d.is_empty(), Ordering::Relaxed);
    }

    /// `s..e` was just set explicitly: no deferred lowering may change it.
    #[inline(always)]
    fn forget_deferred(&self, s: u64, e: u64) {
        if self.has_deferred.load(Ordering::Relaxed) {
            self.forget_deferred_slow(s, e);
        }
    }

    #[cold]
    #[inline(never)]
    fn forget_deferred_slow(&self, s: u64, e: u64) {
        let mut d = self.deferred.lock().unwrap_or_else(|p| p.into_inner());
        subtract(&mut d, s, e);
        self.has_deferred.store(!d.is_empty(), Ordering::Relaxed);
    }

    /// Let go of the in-use marker, before the table (whoever holds the
    /// marker holds the table, but for openers on their way in).
    fn drop_mark(&mut self) {
        if let Some(mark) = self.mark.take() {
            let _ = set_byte(mark.as_fd(), LockType::Unlock, IN_USE, false);
            sys::keep_in_children(mark.as_raw_fd());
            // Through the registry: a close may drop process-mode locks.
            crate::registry::close(self.dev, self.ino, mark);
        }
    }
}

impl Drop for Shm {
    fn drop(&mut self) {
        let fd = self.fd.take().expect("open until dropped");
        if self.is_inherited() {
            // The parent's: its descriptor was closed at fork (the number
            // may be another file's by now) and its table is not ours.
            std::mem::forget(fd);
            std::mem::forget(self.mark.take());
            if let Some(lock_fd) = self.lock_fd.take() {
                drop(lock_fd);
            }
            return;
        }
        if self.slot != NIL {
            self.fd = Some(fd);
            if let Ok(mut g) = self.lock() {
                g.purge(self.slot);
            }
            self.drop_mark();
            sys::keep_in_children(self.fd().as_raw_fd());
            // Closing drops the liveness byte and our share of the table.
            drop(self.fd.take());
        } else {
            self.drop_mark();
            sys::keep_in_children(fd.as_raw_fd());
            drop(fd);
        }
        if let Some(lock_fd) = self.lock_fd.take() {
            crate::registry::close(self.dev, self.ino, lock_fd);
        }
    }
}

impl Engine for Shm {
    #[inline]
    fn try_set(&self, span: Span, kind: Option<Kind>) -> Result<bool, Error> {
        match kind {
            None => {
                if self.fast_lower(span) {
                    return Ok(true);
                }
                let mut g = self.lock()?;
                self.settle(&mut g);
                self.lower(&mut g, span.start(), span.end(), 0);
                Ok(true)
            }
            Some(k) if self.fast_raise(span, k) => Ok(true),
            Some(k) => self.raise(span, k, true),
        }
    }

    #[inline]
    fn try_set_before_wait(&self, span: Span, kind: Kind) -> Result<bool, Error> {
        if self.fast_raise(span, kind) {
            return Ok(true);
        }
        // Another owner's fast hold on this very index: refused without
        // the mutex; the wait that follows sleeps on its lane.
        if let Some((i, l)) = lane_of(span) {
            if self.fast_in_way(self.map.lane(l).load(Ordering::Acquire), i, kind) {
                return Ok(false);
            }
        }
        self.raise(span, kind, false)
    }

    fn wait_set(&self, span: Span, kind: Kind, until: Until<'_>) -> Result<(), Error> {
        self.wait_all(&[span], kind, until)
    }

    fn wait_set_all(
        &self,
        pieces: &[Span],
        kind: Kind,
        until: Until<'_>,
    ) -> Option<Result<(), Error>> {
        Some(self.wait_all(pieces, kind, until))
    }

    fn probe(&self, span: Span, kind: Kind) -> Result<Option<Holder>, Error> {
        let mut g = self.lock()?;
        self.settle(&mut g);
        let pieces = [span];
        if !g.prepare(&pieces) {
            return Err(self.full("lock records"));
        }
        let req = Request {
            me: self.slot,
            pieces: &pieces,
            kind: code(kind),
            ticket: u64::MAX,
            entry: NO_ENTRY,
        };
        Ok(g.blocker(Some(self.fd()), req)
            .map(|b| self.holder_of(&g, b)))
    }

    fn writable(&self) -> bool {
        self.writable
    }

    fn abilities(&self) -> Abilities {
        Abilities {
            detects_deadlocks: true,
            fair: true,
            releases_on_death: true,
        }
    }

    fn unlock_all(&self) -> Result<(), Error> {
        let mut g = self.lock()?;
        g.set(self.slot, 0, INDEX_END, 0);
        self.forget_deferred(0, INDEX_END);
        Ok(())
    }
}

impl Guard<'_> {
    /// Check the derived indices against the records: every record in use
    /// is in its owner's list and its tier exactly once, every free one in
    /// the free list, and the counters agree.
    fn verify(&self) -> Result<(), String> {
        let mut seen_owner = vec![0u8; RECORDS];
        let mut seen_tier = vec![0u8; RECORDS];
        let h = self.map.header();
        for o in 0..SLOTS {
            let slot = *self.map.slot(o);
            if slot.used != 0 && o >= h.slot_hwm as usize {
                return Err(format!("slot {o} in use past the mark {}", h.slot_hwm));
            }
            let mut at = slot.head;
            let mut n = 0;
            while at != NIL {
                if at as usize >= RECORDS {
                    return Err("owner list out of range".into());
                }
                let r = *self.rec(at);
                if slot.used != 1 || r.owner as usize != o + 1 {
                    return Err(format!("record {at} in the list of slot {o} is not its"));
                }
                seen_owner[at as usize] += 1;
                n += 1;
                if n > RECORDS {
                    return Err(format!("slot {o}'s list loops"));
                }
                at = r.onext;
            }
            if n != slot.records as usize {
                return Err(format!("slot {o} counts {} records, has {n}", slot.records));
            }
        }
        let mut walk = |mut at: u32, what: &str| -> Result<usize, String> {
            let mut n = 0;
            while at != NIL {
                if at as usize >= RECORDS {
                    return Err("chain out of range".into());
                }
                let r = *self.rec(at);
                seen_tier[at as usize] += 1;
                n += 1;
                if n > RECORDS {
                    return Err(format!("{what} loops"));
                }
                at = r.next;
            }
            Ok(n)
        };
        let coarse = walk(h.coarse_head, "the coarse list")?;
        if coarse != h.coarse_count as usize {
            return Err(format!("coarse list {coarse}, counter {}", h.coarse_count));
        }
        for b in 0..BUCKETS {
            walk(*self.map.bucket_head(b), "a bucket")?;
        }
        let free = walk(h.free_head, "the free list")?;
        let fresh = h.fresh as usize;
        if fresh > RECORDS || free + (RECORDS - fresh) != h.free_count as usize {
            return Err(format!(
                "free list {free} and {} fresh, counter {}",
                RECORDS.saturating_sub(fresh),
                h.free_count
            ));
        }
        for i in 0..RECORDS {
            let r = *self.rec(i as u32);
            let used = r.owner != 0;
            if i >= fresh {
                if used || seen_tier[i] != 0 || seen_owner[i] != 0 {
                    return Err(format!("fresh record {i} is in use or in a list"));
                }
                continue;
            }
            if seen_tier[i] != 1 || seen_owner[i] != u8::from(used) {
                return Err(format!(
                    "record {i} (owner {}) is in {} index chains and {} owner lists",
                    r.owner, seen_tier[i], seen_owner[i]
                ));
            }
            if used && (r.start >= r.end || !(r.kind == SHARED || r.kind == EXCLUSIVE)) {
                return Err(format!("record {i} is malformed"));
            }
        }
        let waiting = (0..WAITERS)
            .filter(|&i| self.map.waiter(i).owner != 0)
            .count();
        if waiting != h.waiting as usize {
            return Err(format!("{waiting} waiters, counter {}", h.waiting));
        }
        let mut places = Vec::new();
        for i in 0..WAITERS {
            let w = *self.map.waiter(i);
            if w.owner == 0 {
                continue;
            }
            if i >= h.waiter_hwm as usize {
                return Err(format!("waiter {i} in use past the mark {}", h.waiter_hwm));
            }
            if w.ticket >= h.next_ticket || w.order >= h.next_ticket {
                return Err(format!(
                    "waiter {i}: ticket {} or place {} not below the next ticket {}",
                    w.ticket, w.order, h.next_ticket
                ));
            }
            places.push(w.order);
        }
        places.sort_unstable();
        if places.windows(2).any(|p| p[0] == p[1]) {
            return Err(format!(
                "two waiters share a place in the queue: {places:?}"
            ));
        }
        self.verify_lanes()
    }

    /// The fast lane against the table: an empty or fast lane's bucket is
    /// empty, a fast word names a live slot and an index of its bucket, no
    /// owner has more fast holds than its count, an open gate means
    /// nothing spans more than one index.
    fn verify_lanes(&self) -> Result<(), String> {
        for l in 0..BUCKETS {
            let w = self.map.lane(l).load(Ordering::Acquire);
            if w == LANE_SLOW {
                continue;
            }
            if w != LANE_EMPTY && (!is_fast(w) || w & LANE_MOVING != 0) {
                return Err(format!("lane {l} reads {w:#x}"));
            }
            if *self.map.bucket_head(l) != NIL || self.waits_in(l) {
                return Err(format!("lane {l} is not slow, but its bucket is in use"));
            }
            if is_fast(w) {
                let o = lane_owner(w);
                if self.map.slot(o as usize).used != 1 || bucket(lane_index(w)) != l {
                    return Err(format!(
                        "lane {l}: fast hold {w:#x} of no owner, or misplaced"
                    ));
                }
            }
        }
        for l in 0..BUCKETS {
            let w = self.map.lane(l).load(Ordering::Acquire);
            if is_fast(w)
                && !self
                    .map
                    .fast_list(lane_owner(w))
                    .iter()
                    .any(|e| e.load(Ordering::Acquire) == l as u32 + 1)
            {
                return Err(format!(
                    "lane {l}: fast hold {w:#x} not on its owner's list"
                ));
            }
        }
        if self.gate_open() && (self.map.header().coarse_count > 0 || self.waits_wide()) {
            return Err("the gate is open while something spans more than one index".into());
        }
        Ok(())
    }
}

/// Check a lock table's internal consistency (its derived indices against
/// its records), for tests: `Err` says what is wrong.
#[doc(hidden)]
pub fn verify(lock_path: &Path) -> Result<(), String> {
    let lock_path = std::fs::canonicalize(lock_path).map_err(|e| e.to_string())?;
    let sidecar = sidecar_path(&lock_path);
    let c = cstring(&sidecar).map_err(|e| e.to_string())?;
    let how = OpenHow {
        write: true,
        create_exclusive: false,
        create: false,
        follow: false,
        mode: 0,
    };
    let fd = sys::open(&c, how).map_err(|e| e.to_string())?;
    set_byte(fd.as_fd(), LockType::Read, DMS, true).map_err(|e| e.to_string())?;
    let (magic, ..) = read_header(fd.as_fd()).map_err(|e| e.to_string())?;
    if magic == 0 {
        // Its first opener died setting it up: the next opener starts it
        // afresh, and there is nothing to check yet.
        return Ok(());
    }
    let map = check_and_map(&sidecar, fd.as_fd(), None).map_err(|e| e.to_string())?;
    let (mut g, died) = map.lock().map_err(|e| e.to_string())?;
    if died {
        g.repair(fd.as_fd(), NIL);
        // SAFETY: we hold the mutex.
        unsafe { sys::robust_mutex_consistent(map.mutex()) };
    }
    g.verify()
}

// ---- snapshots ----

/// One lock in a table snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldLock {
    /// The process that opened the owning handle.
    pub pid: u32,
    /// The owner's id: unique per table while it lives (a registration
    /// counter, never reused while the table is in use).
    pub owner: u64,
    /// The indices held.
    pub span: Span,
    /// Shared or exclusive.
    pub kind: Kind,
}

/// One queued request in a table snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaitingLock {
    /// The waiting process.
    pub pid: u32,
    /// The waiting owner's id (see [`HeldLock::owner`]).
    pub owner: u64,
    /// The indices asked for (for a request of several pieces, from the
    /// first to the last).
    pub span: Span,
    /// The kind asked for.
    pub kind: Kind,
    /// When the wait began.
    pub since: std::time::SystemTime,
}

/// What a [`Mode::Shm`](crate::Mode::Shm) lock table holds, read without
/// joining it: for `locksfile status` and the like.
///
/// ```
/// use locksfile::{shm::Snapshot, LockFile, Mode};
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("data.lock");
/// let lf = LockFile::options().mode(Mode::Shm).open(&path)?;
/// let _g = lf.write(3..5)?;
/// let snap = Snapshot::read(&path)?;
/// assert_eq!(snap.holders.len(), 1);
/// assert_eq!(snap.holders[0].pid, std::process::id());
/// assert!(snap.waiters.is_empty());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Snapshot {
    /// Every lock held, ordered by start index.
    pub holders: Vec<HeldLock>,
    /// Every queued request, in queue order: oldest first, but where the
    /// deadlock search moved a request ahead to break a cycle.
    pub waiters: Vec<WaitingLock>,
}

impl Snapshot {
    /// Read the table of the lock file at `lock_path` (its sidecar is
    /// `<lock_path>-shm`). A table no one uses, or none at all, reads as
    /// empty. Owners found dead are left out. The snapshot may be stale by
    /// the time it returns.
    ///
    /// # Errors
    /// [`Error::Open`] when the sidecar cannot be opened for reading and
    /// writing (taking the table's mutex writes to it); [`Error::Sidecar`]
    /// for a file that is not a lock table; [`Error::Io`].
    pub fn read(lock_path: impl AsRef<Path>) -> Result<Snapshot, Error> {
        let lock_path = std::fs::canonicalize(lock_path.as_ref())
            .or_else(|_| std::path::absolute(lock_path.as_ref()))
            .unwrap_or_else(|_| lock_path.as_ref().to_path_buf());
        let sidecar = sidecar_path(&lock_path);
        let fd = match open_sidecar(&sidecar, 0, false, false) {
            Ok(_) => {
                // Exists: open it for writing without creating anything.
                let c = cstring(&sidecar)?;
                let how = OpenHow {
                    write: true,
                    create_exclusive: false,
                    create: false,
                    follow: false,
                    mode: 0,
                };
                sys::open(&c, how).map_err(|e| Error::Open {
                    path: sidecar.clone(),
                    source: e,
                })?
            }
            Err(Error::Open { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {
                return Ok(Snapshot::default())
            }
            Err(e) => return Err(e),
        };
        // A share of the DMS byte keeps the table from being reset while
        // we read; if no one else holds it, no one uses the table.
        match sys::get_lock(fd.as_fd(), Family::Ofd, LockType::Write, byte(DMS)) {
            Ok(Some(_)) => {}
            Ok(None) => return Ok(Snapshot::default()),
            Err(e) => return Err(Error::io("probe lock table", e)),
        }
        set_byte(fd.as_fd(), LockType::Read, DMS, true)
            .map_err(|e| Error::io("share lock table", e))?;
        let (magic, ..) = read_header(fd.as_fd()).map_err(|e| Error::io("read lock table", e))?;
        if magic == 0 {
            // Being set up afresh (its first opener died at it): empty.
            return Ok(Snapshot::default());
        }
        let map = check_and_map(&sidecar, fd.as_fd(), None)?;
        let (mut g, died) = map.lock().map_err(|e| Error::io("lock table mutex", e))?;
        if died {
            g.repair(fd.as_fd(), NIL);
            // SAFETY: we hold the mutex.
            unsafe { sys::robust_mutex_consistent(map.mutex()) };
        }
        let mut snap = Snapshot::default();
        let slots: Vec<Slot> = (0..SLOTS).map(|s| *g.map.slot(s)).collect();
        let live: Vec<bool> = (0..SLOTS as u32)
            .map(|s| slots[s as usize].used == 1 && alive(fd.as_fd(), s))
            .collect();
        for (o, slot) in slots.iter().enumerate() {
            if !live[o] {
                continue;
            }
            let mut at = slot.head;
            let mut steps = 0;
            while at != NIL && steps < RECORDS {
                let r = *g.rec(at);
                at = r.onext;
                steps += 1;
                if r.owner as usize != o + 1 || r.start >= r.end || r.end > INDEX_END {
                    continue;
                }
                snap.holders.push(HeldLock {
                    pid: slot.pid,
                    owner: slot.nonce,
                    span: Span::from_checked(r.start, r.end),
                    kind: kind_of(r.kind),
                });
            }
        }
        for o in (0..SLOTS).filter(|&o| live[o]) {
            for l in g.map.listed_lanes(o as u32) {
                let w = g.map.lane(l).load(Ordering::Acquire);
                if is_fast(w) && lane_owner(w) as usize == o {
                    let i = lane_index(w);
                    snap.holders.push(HeldLock {
                        pid: slots[o].pid,
                        owner: slots[o].nonce,
                        span: Span::from_checked(i, i + 1),
                        kind: kind_of(lane_kind(w)),
                    });
                }
            }
        }
        let mut waiters: Vec<(Place, WaitingLock)> = Vec::new();
        for i in 0..WAITERS {
            let w = *g.map.waiter(i);
            if w.owner == 0 || w.owner as usize > SLOTS || !live[(w.owner - 1) as usize] {
                continue;
            }
            if w.start >= w.end || w.end > INDEX_END {
                continue;
            }
            waiters.push((
                w.place(),
                WaitingLock {
                    pid: w.pid,
                    owner: slots[(w.owner - 1) as usize].nonce,
                    span: Span::from_checked(w.start, w.end),
                    kind: kind_of(w.kind),
                    since: std::time::UNIX_EPOCH + Duration::from_nanos(w.since_ns),
                },
            ));
        }
        drop(g);
        drop(map);
        waiters.sort_by_key(|(t, _)| *t);
        snap.waiters = waiters.into_iter().map(|(_, w)| w).collect();
        snap.holders.sort_by_key(|h| (h.span.start(), h.owner));
        Ok(snap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_file_systems_are_named() {
        assert_eq!(network_fs(0x6969), Some("NFS"));
        assert_eq!(network_fs(0xFF53_4D42_u32 as i32 as i64), Some("CIFS"));
        assert_eq!(network_fs(0xFE53_4D42), Some("SMB2"));
        assert_eq!(network_fs(0x0102_1997), Some("9p"));
        assert_eq!(network_fs(0x00C3_6400), Some("Ceph"));
        assert_eq!(network_fs(0x6573_5546), Some("FUSE"));
        // tmpfs, ext4, btrfs, xfs, overlayfs: local.
        for local in [0x0102_1994, 0xEF53, 0x9123_683E, 0x5846_5342, 0x794C_7630] {
            assert_eq!(network_fs(local), None, "{local:#x}");
        }
    }

    /// A process that dies holding the table's mutex: the next owner to
    /// take it repairs the table, and keeps its own locks (its liveness
    /// lock is invisible through its own descriptor) while the dead
    /// process's owner loses its.
    #[test]
    fn repair_after_a_death_in_the_mutex_keeps_the_living() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.lock");
        let open = || {
            let fd = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .unwrap();
            Shm::open(&path, fd.into(), true).unwrap()
        };
        let a = open();
        assert!(a
            .try_set(Span::new(0, 4).unwrap(), Some(Kind::Exclusive))
            .unwrap());
        // SAFETY: the child only makes plain calls and `_exit`s.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let b = open();
            let ok = b
                .try_set(Span::new(10, 12).unwrap(), Some(Kind::Shared))
                .unwrap();
            let g = b.lock().unwrap();
            std::mem::forget(g);
            // SAFETY: ends the child holding the mutex, as a kill would.
            unsafe { libc::_exit(i32::from(!ok)) };
        }
        let mut status = 0;
        // SAFETY: our child; valid out-pointer.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert_eq!(status, 0);
        // The mutex comes back EOWNERDEAD: repaired under `a`.
        assert!(a
            .probe(Span::new(10, 12).unwrap(), Kind::Exclusive)
            .unwrap()
            .is_none());
        let g = a.lock().unwrap();
        g.verify().unwrap();
        assert_eq!(g.map.slot(a.slot as usize).records, 1);
        assert_eq!((0..SLOTS).filter(|&s| g.map.slot(s).used == 1).count(), 1);
        drop(g);
        let c = open();
        assert!(!c
            .try_set(Span::new(2, 3).unwrap(), Some(Kind::Shared))
            .unwrap());
        assert!(c
            .try_set(Span::new(10, 12).unwrap(), Some(Kind::Exclusive))
            .unwrap());
    }

    /// Each entry that must pass another lands just ahead of it; no one
    /// else moves; contradicting moves are refused.
    #[test]
    fn topo_sort_moves_only_what_it_must() {
        let queue: Vec<(Place, u32)> = [7, 8, 9, 10, 11]
            .iter()
            .map(|&e| ((e as u64, e as u64), e))
            .collect();
        assert_eq!(topo_sort(&queue, &[]), Some(vec![7, 8, 9, 10, 11]));
        assert_eq!(topo_sort(&queue, &[(10, 8)]), Some(vec![7, 10, 8, 9, 11]));
        assert_eq!(
            topo_sort(&queue, &[(10, 8), (11, 7)]),
            Some(vec![11, 7, 10, 8, 9])
        );
        // 11 must pass 9, and 10 must pass 11: 10 goes first of the three.
        assert_eq!(
            topo_sort(&queue, &[(11, 9), (10, 11)]),
            Some(vec![7, 8, 10, 11, 9])
        );
        assert_eq!(topo_sort(&queue, &[(10, 8), (8, 10)]), None);
        assert_eq!(topo_sort(&queue, &[(10, 3)]), None);
    }

    /// A reordering cut short by a death may leave two waiters at one
    /// place: repair gives them distinct places, in their order.
    #[test]
    fn repair_separates_waiters_left_at_one_place() {
        let (_dir, [a, b]) = handles::<2>();
        let mut g = a.lock().unwrap();
        let (i, ti) = g.push_waiter(a.slot, 0, &[one(1)], SHARED, None).unwrap();
        let (j, tj) = g.push_waiter(b.slot, 0, &[one(2)], SHARED, None).unwrap();
        let place = g.map.waiter(i as usize).order;
        g.map.waiter(j as usize).order = place;
        assert!(g.verify().is_err());
        g.repair(a.fd(), a.slot);
        g.verify().unwrap();
        let (wi, wj) = (*g.map.waiter(i as usize), *g.map.waiter(j as usize));
        assert_eq!((wi.owner, wj.owner), (a.slot + 1, b.slot + 1));
        assert!(wi.place() < wj.place() && wi.order != wj.order);
        g.remove_waiter(a.slot, i, ti, false);
        g.remove_waiter(b.slot, j, tj, false);
        g.verify().unwrap();
    }

    fn open_shm(path: &Path) -> Shm {
        let fd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .unwrap();
        Shm::open(path, fd.into(), true).unwrap()
    }

    /// `N` owners of a fresh table (the directory goes with the first).
    fn handles<const N: usize>() -> (tempfile::TempDir, [Shm; N]) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.lock");
        (dir, std::array::from_fn(|_| open_shm(&path)))
    }

    fn one(i: u64) -> Span {
        Span::new(i, i + 1).unwrap()
    }

    fn lane_of(shm: &Shm, i: u64) -> u64 {
        shm.map.lane(bucket(i)).load(Ordering::SeqCst)
    }

    #[test]
    fn the_fast_lane_gives_way_to_the_table_and_comes_back() {
        let (_dir, [a, b]) = handles();
        assert!(a.try_set(one(5), Some(Kind::Exclusive)).unwrap());
        assert_eq!(
            lane_of(&a, 5),
            fast_word(a.slot, 5, EXCLUSIVE),
            "taken on the fast lane"
        );
        // A wide request sees the fast hold: refused, and told whose it is.
        assert!(!b
            .try_set(Span::new(0, 10).unwrap(), Some(Kind::Shared))
            .unwrap());
        assert!(!b.try_set(Span::ALL, Some(Kind::Exclusive)).unwrap());
        let h = b.probe(one(5), Kind::Shared).unwrap().expect("held");
        assert_eq!((h.span, h.kind), (one(5), Kind::Exclusive));
        // The probe made the hold a record: the lane is the table's now.
        assert_eq!(lane_of(&a, 5), LANE_SLOW);
        a.lock().unwrap().verify().unwrap();
        // Its release goes through the mutex, and gives the lane back.
        assert!(!a.fast_lower(one(5)));
        assert!(a.try_set(one(5), None).unwrap());
        assert_eq!(lane_of(&a, 5), LANE_EMPTY);
        assert!(
            b.map.gate().load(Ordering::SeqCst) == 0,
            "nothing wide is left"
        );
        assert!(b
            .try_set(Span::new(0, 10).unwrap(), Some(Kind::Shared))
            .unwrap());
        // Shared over 0..10 closes the gate: no fast hold meanwhile, and the
        // slow way refuses what it covers.
        assert!(
            !a.fast_raise(one(20), Kind::Exclusive),
            "the gate is closed"
        );
        assert!(!a.try_set(one(5), Some(Kind::Exclusive)).unwrap());
        assert!(a.try_set(one(20), Some(Kind::Exclusive)).unwrap());
        assert!(b.try_set(Span::new(0, 10).unwrap(), None).unwrap());
        assert!(a.try_set(one(20), None).unwrap());
        a.lock().unwrap().verify().unwrap();
        assert_eq!(b.map.gate().load(Ordering::SeqCst), 0, "open again");
        assert!(a.fast_raise(one(20), Kind::Shared));
    }

    #[test]
    fn a_shared_fast_hold_admits_readers_and_converts() {
        let (_dir, [a, b, c]) = handles();
        assert!(a.try_set(one(5), Some(Kind::Shared)).unwrap());
        assert_eq!(lane_of(&a, 5), fast_word(a.slot, 5, SHARED));
        // A second reader goes through the table, which takes a's over.
        assert!(b.try_set(one(5), Some(Kind::Shared)).unwrap());
        assert_eq!(lane_of(&a, 5), LANE_SLOW);
        assert!(!c.try_set(one(5), Some(Kind::Exclusive)).unwrap());
        assert!(b.try_set(one(5), None).unwrap());
        assert!(a.try_set(one(5), None).unwrap());
        assert_eq!(lane_of(&a, 5), LANE_EMPTY);
        // Upgrade and downgrade of a fast hold, seen by others.
        assert!(a.try_set(one(5), Some(Kind::Shared)).unwrap());
        assert!(a.try_set(one(5), Some(Kind::Exclusive)).unwrap());
        assert!(!c.try_set(one(5), Some(Kind::Shared)).unwrap());
        assert!(a.try_set(one(5), Some(Kind::Shared)).unwrap());
        assert!(c.try_set(one(5), Some(Kind::Shared)).unwrap());
        assert!(!b.try_set(one(5), Some(Kind::Exclusive)).unwrap());
        a.lock().unwrap().verify().unwrap();
        assert!(c.try_set(one(5), None).unwrap());
        assert!(a.try_set(one(5), None).unwrap());
        assert!(b.try_set(one(5), Some(Kind::Exclusive)).unwrap());
        a.lock().unwrap().verify().unwrap();
    }

    #[test]
    fn a_waiter_sleeping_on_a_fast_hold_is_woken_by_its_release() {
        let (_dir, [a, b]) = handles();
        // Unwoken, b would take 5 only when its nap ends (LANE_NAP after it
        // began): woken, at once. A busy machine may delay a wake-up now
        // and then, so one quick round in five is asked for.
        let mut quickest = Duration::MAX;
        for _ in 0..5 {
            assert!(a.try_set(one(5), Some(Kind::Exclusive)).unwrap());
            std::thread::scope(|s| {
                let waiter = s.spawn(|| {
                    b.wait_set(one(5), Kind::Exclusive, Until::FOREVER)
                        .map(|()| Instant::now())
                });
                // Until b sleeps on the lane (it marks the word first).
                let until = Instant::now() + Duration::from_secs(10);
                while lane_of(&a, 5) & LANE_WAITING == 0 {
                    assert!(Instant::now() < until, "b never slept on the lane");
                    std::thread::yield_now();
                }
                let released = Instant::now();
                assert!(a.try_set(one(5), None).unwrap());
                let granted = waiter.join().unwrap().unwrap();
                quickest = quickest.min(granted - released);
            });
            // Taken on the fast lane, and let go again.
            assert_eq!(lane_of(&a, 5), fast_word(b.slot, 5, EXCLUSIVE));
            assert!(b.try_set(one(5), None).unwrap());
        }
        assert!(quickest < LANE_NAP / 2, "never woken: {quickest:?}");
    }

    #[test]
    fn a_word_a_waiter_marks_meanwhile_is_still_taken_over() {
        let (_dir, [a, b]) = handles();
        assert!(a.try_set(one(5), Some(Kind::Exclusive)).unwrap());
        let l = bucket(5);
        let w = lane_of(&a, 5);
        // A waiter marks the word after the table read it.
        a.map.lane(l).store(w | LANE_WAITING, Ordering::SeqCst);
        let mut g = b.lock().unwrap();
        assert!(g.adopt(l, w));
        assert_eq!(
            g.map.lane(l).load(Ordering::SeqCst),
            LANE_SLOW,
            "taken over"
        );
        drop(g);
        assert!(!b
            .try_set(Span::new(0, 1000).unwrap(), Some(Kind::Exclusive))
            .unwrap());
        b.lock().unwrap().verify().unwrap();
        assert!(a.try_set(one(5), None).unwrap());
        assert!(b
            .try_set(Span::new(0, 1000).unwrap(), Some(Kind::Exclusive))
            .unwrap());
    }

    #[test]
    fn a_reader_is_not_kept_waiting_by_a_fast_reader() {
        let (_dir, [a, b, c]) = handles();
        assert!(a.try_set(one(5), Some(Kind::Shared)).unwrap());
        assert!(b.try_set_before_wait(one(5), Kind::Shared).unwrap());
        assert!(!c.try_set_before_wait(one(5), Kind::Exclusive).unwrap());
    }

    #[test]
    fn a_fast_hold_taken_after_the_gate_closed_is_taken_away() {
        let (_dir, [a, b, c]) = handles();
        assert!(b
            .try_set(Span::new(0, 10).unwrap(), Some(Kind::Exclusive))
            .unwrap());
        // As if `a` wrote its word after the gate closed and has not yet
        // read the gate: the table must not count that hold granted.
        half_taken(&a, 5);
        // `c` comes to that lane: it takes the word away, as b holds 5.
        assert!(!c.try_set(one(5), Some(Kind::Exclusive)).unwrap());
        // Taken away (off a's list too), and the empty lane given back.
        assert_eq!(lane_of(&a, 5), LANE_EMPTY);
        assert_eq!(a.map.fast_list(a.slot)[0].load(Ordering::SeqCst), 0);
        let h = c.probe(one(5), Kind::Shared).unwrap().expect("held by b");
        assert_eq!(h.span, Span::new(0, 10).unwrap());
        c.lock().unwrap().verify().unwrap();
        // a holds nothing at 5: once b lets go, c gets it.
        assert!(b.try_set(Span::ALL, None).unwrap());
        assert!(c.try_set(one(5), Some(Kind::Exclusive)).unwrap());
        assert!(c.try_set(one(5), None).unwrap());
        // With nothing in the way the same word is granted as a record.
        assert!(c
            .try_set(Span::new(30, 40).unwrap(), Some(Kind::Shared))
            .unwrap());
        half_taken(&a, 7);
        assert!(!c.try_set(one(7), Some(Kind::Shared)).unwrap());
        let h = c.probe(one(7), Kind::Shared).unwrap().expect("held by a");
        assert_eq!((h.span, h.pid), (one(7), Some(std::process::id())));
        c.lock().unwrap().verify().unwrap();
        assert!(a.try_set(one(7), None).unwrap());
        assert!(c.try_set(one(7), Some(Kind::Shared)).unwrap());
    }

    /// As if `shm` had written its fast word for `i` and not yet read the
    /// gate: its list entry and the word, as `fast_raise` leaves them.
    fn half_taken(shm: &Shm, i: u64) -> (usize, u64) {
        let l = bucket(i);
        let w = fast_word(shm.slot, i, EXCLUSIVE);
        shm.map.fast_list(shm.slot)[0].store(l as u32 + 1, Ordering::SeqCst);
        shm.map.lane(l).store(w, Ordering::SeqCst);
        (l, w)
    }

    #[test]
    fn a_word_taken_away_while_the_gate_was_closed_is_not_granted_once_it_opens() {
        let (_dir, [a, b, c]) = handles();
        assert!(b
            .try_set(Span::new(0, 10).unwrap(), Some(Kind::Exclusive))
            .unwrap());
        let (l, w) = half_taken(&a, 5);
        // c takes the word away (b holds 5), then b lets go: the gate opens.
        assert!(!c.try_set(one(5), Some(Kind::Exclusive)).unwrap());
        assert!(b.try_set(Span::new(0, 10).unwrap(), None).unwrap());
        assert_eq!(a.map.gate().load(Ordering::SeqCst), 0);
        // a now reads the gate open: not granted, as its word is gone.
        assert!(!a.confirm_fast(l, w));
        assert!(c.try_set(one(5), Some(Kind::Exclusive)).unwrap());
        assert!(!a.try_set(one(5), Some(Kind::Exclusive)).unwrap());
        a.lock().unwrap().verify().unwrap();
    }

    #[test]
    fn a_record_trimmed_to_one_index_keeps_a_late_fast_word_out() {
        let (_dir, [a, m, c]) = handles();
        assert!(m
            .try_set(Span::new(3, 10).unwrap(), Some(Kind::Exclusive))
            .unwrap());
        let (l, w) = half_taken(&a, 3);
        // m's record shrinks to 3..4, whose lane holds a's late word: the
        // table must see m's record in its way and take the word away.
        assert!(m.try_set(Span::new(4, 10).unwrap(), None).unwrap());
        assert_ne!(a.map.lane(l).load(Ordering::SeqCst), w);
        assert!(!a.confirm_fast(l, w));
        m.lock().unwrap().verify().unwrap();
        let h = c.probe(one(3), Kind::Shared).unwrap().expect("m holds 3");
        assert_eq!(h.span, one(3));
        // a holds nothing: once m lets go, c gets 3.
        assert!(m.try_set(one(3), None).unwrap());
        assert!(c.try_set(one(3), Some(Kind::Exclusive)).unwrap());
        c.lock().unwrap().verify().unwrap();
    }

    #[test]
    fn a_death_while_adopting_a_fast_hold_keeps_it() {
        for made in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("t.lock");
            let a = open_shm(&path);
            assert!(a.try_set(one(5), Some(Kind::Exclusive)).unwrap());
            // SAFETY: the child only makes plain calls and `_exit`s.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                let b = open_shm(&path);
                let mut g = b.lock().unwrap();
                let l = bucket(5);
                let w = g.map.lane(l).load(Ordering::SeqCst);
                g.map.lane(l).store(w | LANE_MOVING, Ordering::SeqCst);
                if made {
                    let n = g.alloc();
                    *g.rec(n) = Rec {
                        start: 5,
                        end: 6,
                        owner: lane_owner(w) + 1,
                        kind: EXCLUSIVE,
                        next: NIL,
                        onext: NIL,
                        oprev: NIL,
                        _pad: 0,
                    };
                    g.link(n);
                }
                std::mem::forget(g);
                // SAFETY: ends the child holding the mutex, as a kill would.
                unsafe { libc::_exit(0) };
            }
            let mut status = 0;
            // SAFETY: our child; valid out-pointer.
            assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
            assert_eq!(status, 0);
            let c = open_shm(&path);
            assert!(
                !c.try_set(one(5), Some(Kind::Shared)).unwrap(),
                "made: {made}"
            );
            c.lock().unwrap().verify().unwrap();
            assert!(a.try_set(one(5), None).unwrap());
            assert!(
                c.try_set(one(5), Some(Kind::Shared)).unwrap(),
                "made: {made}"
            );
            c.lock().unwrap().verify().unwrap();
        }
    }

    #[test]
    fn this_file_system_is_local() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::File::create(dir.path().join("x")).unwrap();
        let t = sys::fs_type(f.as_fd()).unwrap();
        assert_eq!(network_fs(t), None, "{t:#x}");
    }
}
