//! The sidecar's layout: the structures shared through it, where each lies,
//! and the encoding of the lane words read without the mutex. Nothing here
//! touches memory (`table.rs` maps it). Changing any of it changes
//! [`VERSION`].
//!
//! Every region starts on a page, and the file is sparse: only the pages
//! touched take memory. Offsets in bytes (the test below checks them):
//!
//! ```text
//!  offset        hex           what                                 written by
//!           0   0x000000000   Header (below)                       the mutex holder
//!         448   0x0000001c0   gate: u32, its own cache line        the mutex holder, atomically
//!         512   0x000000200   the robust process-shared mutex      pthread
//!        4096   0x000001000   wake words: u32 per waiter entry     anyone, atomically
//!      528384   0x000081000   slots: Slot per owner, 64 B each     the mutex holder
//!     8916992   0x000881000   waiters: Waiter per entry, 56 B each the mutex holder
//!    16257024   0x000f81000   bucket heads: u32 per bucket         the mutex holder
//!    83365888   0x004f81000   records: Rec, 40 B each              the mutex holder
//!  5452075008   0x144f81000   fast lists: 64 B per slot            owners and the mutex holder, atomically
//!  5460463616   0x145781000   lane words: u64 per bucket           see `lane.rs`, atomically
//!  5594681344   0x14d781000   stats: StatEntry, 640 B each         any recording owner, atomically
//!  5595504640   0x14d84a000   processes: Proc per entry, 16 B each the mutex holder
//!  5597601792   0x14da4a000   end (SIZE): 5.2 GiB reserved, a few pages used when fresh
//! ```
//!
//! The header, whose first 40 bytes are read with `pread` before mapping
//! (`sidecar.rs`); 96 bytes:
//!
//! ```text
//!  +0 magic    +8 version   +16 size      +24 dev          +32 ino
//!  +40 next_ticket   +48 next_nonce  +56 free_head   +60 free_count
//!  +64 coarse_head   +68 coarse_count +72 waiting    +76 waiter_hwm
//!  +80 fresh   +84 slot_hwm   +88 slots_used  +92 proc_hwm
//! ```
//!
//! Beyond the memory, bytes of the sidecar serve as OFD record locks:
//! [`DMS`], held shared by every process using the table, and
//! [`LIVENESS`]` + p`, held exclusively by the process in entry `p`, through
//! the one description of the sidecar its owners share.
//!
//! Every field says who may write it and how, in these words:
//!
//! - *at creation*: by the opener that sets the table up, holding [`DMS`]
//!   exclusively (no one else has it mapped) and the mutex;
//! - *mutex held*: by whoever holds the table's robust mutex, with plain
//!   writes; read under the mutex too, except where a field says so;
//! - *by CAS without the mutex*: atomically, by any process, each change a
//!   compare-and-swap from the value read (the fast lane's words, whose
//!   protocol and invariants I1–I8 head `lane.rs`);
//! - *the owner's own threads*: only the threads of the owner in that
//!   slot, atomically;
//! - *repair*: the mutex holder after the previous one died, which
//!   rebuilds every field marked *derived* from the others.

use std::mem::size_of;

use crate::kind::Kind;
use crate::span::Span;

pub(super) const MAGIC: u64 = u64::from_le_bytes(*b"LKFSHM\x00\x01");
pub(super) const VERSION: u32 = 6;

// The capacities below are reservations, not allocations: the sidecar is
// a sparse file of their size, mapped whole, and only the pages that have
// been written take memory. A table grows page by page as it is used, with
// no step that moves or remaps anything, and gives the records' pages back
// once none is in use (`TableLock::shrink`). Scans that must see every
// entry in use stop at a high-water mark (`slot_hwm`, `waiter_hwm`,
// `fresh`) or visit only the pages that hold data (`Touched`), so that
// none touches, and so allocates, the pages never used.

/// Owner slots: owners (handles) using one table at once.
pub(crate) const SLOTS: usize = 1 << 17;
/// Waiter entries: threads waiting at once.
pub(crate) const WAITERS: usize = 1 << 17;
/// Lock records: pieces held at once, by all owners together (40 bytes of
/// memory each while in use: 5 GiB for all).
pub(crate) const RECORDS: usize = 1 << 27;
/// Hash buckets for single-index records: 10 million records held spread
/// at under one per bucket.
pub(super) const BUCKETS: usize = 1 << 24;

/// Byte of the sidecar every user holds shared while it has the table
/// open; the first opener finds it free and (re)initialises the table.
pub(super) const DMS: i64 = 1 << 32;
/// Byte `LIVENESS + p` is write-locked by the process in entry `p`.
pub(super) const LIVENESS: i64 = DMS + 1;
/// Process entries: processes using one table at once.
pub(crate) const PROCS: usize = SLOTS;

pub(super) const NIL: u32 = u32::MAX;
pub(super) const SHARED: u32 = 1;
pub(super) const EXCLUSIVE: u32 = 2;

/// The table's header. Read before mapping (its first 40 bytes, with
/// `pread`, by any opener) and under the mutex.
#[repr(C)]
pub(super) struct Header {
    /// [`MAGIC`]. At creation, last of all: a table with its magic number
    /// is complete.
    pub(super) magic: u64,
    /// [`VERSION`]. At creation.
    pub(super) version: u32,
    pub(super) _pad0: u32,
    /// [`SIZE`]. At creation.
    pub(super) size: u64,
    /// The lock file's device and inode, which the sidecar belongs to. At
    /// creation.
    pub(super) dev: u64,
    pub(super) ino: u64,
    /// The next waiter's ticket (and place in the queue). Mutex held (a
    /// waiter queuing; repair raises it past every ticket in use).
    pub(super) next_ticket: u64,
    /// The next owner's nonce. Mutex held (an owner claiming its slot).
    pub(super) next_nonce: u64,
    /// Derived: the free records' list and count. Mutex held (records
    /// taken and given back).
    pub(super) free_head: u32,
    pub(super) free_count: u32,
    /// Derived: the list and count of records of more than one index.
    /// Mutex held (records linked and unlinked).
    pub(super) coarse_head: u32,
    pub(super) coarse_count: u32,
    /// Waiter entries in use. Mutex held (a waiter queuing or leaving the
    /// queue; repair).
    pub(super) waiting: u32,
    /// One past the last waiter entry in use. Mutex held, as `waiting`.
    pub(super) waiter_hwm: u32,
    /// Records from here on were never used: still zero, in no list, so
    /// their pages take no memory until needed. Mutex held (a record
    /// taken from the fresh ones; repair).
    pub(super) fresh: u32,
    /// Derived: one past the last owner slot in use, so that the scans
    /// over owners read only the slots there are. Mutex held (an owner
    /// claiming or leaving its slot).
    pub(super) slot_hwm: u32,
    /// Derived: owner slots in use, so that a new owner looks for a free
    /// slot below `slot_hwm` only when there is one. Mutex held (an owner
    /// claiming or leaving its slot, or a dead owner's slot purged).
    pub(super) slots_used: u32,
    /// One past the last process entry ever claimed. Mutex held (a process
    /// claiming its entry); only grows while the table lives.
    pub(super) proc_hwm: u32,
}

/// A cache line each: an owner's every change writes its slot, and slots
/// sharing a line would pull it between the CPUs of their owners.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub(super) struct Slot {
    /// 1 when an owner has the slot. Mutex held (an owner claiming or
    /// leaving it, or a dead owner's slot purged). Also read without the
    /// mutex, atomically, by a wait for a mutex that stays taken (is its
    /// holder a user?).
    pub(super) used: u32,
    /// The owner's process id, as its process sees it. Mutex held, with
    /// `used`; read as `used` is.
    pub(super) pid: u32,
    /// Names this owner apart from the slot's earlier and later ones.
    /// Mutex held, when the slot is claimed.
    pub(super) nonce: u64,
    /// Derived: the head of this owner's list of records, and their count.
    /// Mutex held (records linked and unlinked).
    pub(super) head: u32,
    pub(super) records: u32,
    /// The owner's process entry ([`Proc`]) and that entry's nonce when
    /// the slot was claimed: the owner lives while that entry does. Mutex
    /// held, when the slot is claimed.
    pub(super) proc: u32,
    pub(super) _pad: u32,
    pub(super) proc_nonce: u64,
}

/// A process using the table: every owner of it names this entry, and
/// the process holds an OFD write lock on byte [`LIVENESS`]` + entry` of
/// the sidecar, through the one description its owners share, for as long
/// as it has any. So the kernel's lock list of the sidecar holds an entry
/// or two per process, however many owners each has (every `fcntl` and
/// every `close` of the file walks that list).
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct Proc {
    /// 1 while a process has the entry. Mutex held (claimed by a process's
    /// first owner, freed by its last, or found dead and reused).
    pub(super) used: u32,
    /// Its process id (for status). Mutex held, when claimed.
    pub(super) pid: u32,
    /// Names this claim of the entry apart from earlier and later ones.
    /// Mutex held, when claimed (from the header's `next_nonce`).
    pub(super) nonce: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct Rec {
    /// The span held, `start..end`. Mutex held (set, trimmed, split; an
    /// adoption writes a fast hold's index here).
    pub(super) start: u64,
    pub(super) end: u64,
    /// Slot + 1; 0 for a free record. Mutex held; written last when a
    /// record is made, so that a repair after a death in between finds it
    /// free or whole (I4).
    pub(super) owner: u32,
    /// [`SHARED`] or [`EXCLUSIVE`]. Mutex held.
    pub(super) kind: u32,
    /// Derived: next in the bucket, coarse or free list. Mutex held.
    pub(super) next: u32,
    /// Derived: next and previous of the same owner. Mutex held.
    pub(super) onext: u32,
    pub(super) oprev: u32,
    pub(super) _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
/// A waiter entry: a thread waiting for a span. Every field is written
/// with the mutex held, by the waiting thread when it queues and leaves
/// (or by whoever purges a dead owner, or repairs); its wake word, apart
/// (see [`WAKES_AT`]), is what is touched without the mutex.
pub(super) struct Waiter {
    /// Slot + 1; 0 for a free entry. Mutex held.
    pub(super) owner: u32,
    /// The kind and span asked for. Mutex held, when it queues.
    pub(super) kind: u32,
    pub(super) start: u64,
    pub(super) end: u64,
    /// Given when it queued, never changed: with the owner, it names the
    /// entry (a waiting thread keeps it to find its entry again). Mutex
    /// held.
    pub(super) ticket: u64,
    /// Its place in the queue: earlier (then, only after a crash in the
    /// middle of a reordering, the lower ticket) comes first. Its ticket
    /// when it queues; the deadlock search moves it ahead of requests it
    /// would otherwise wait behind in a cycle (see [`TableLock::reorder`]).
    /// The places of the entries in use differ and are below the header's
    /// `next_ticket`. Mutex held (queuing, the deadlock search, repair).
    pub(super) order: u64,
    /// When it started waiting, ns since the Unix epoch (for status).
    /// Mutex held, when it queues.
    pub(super) since_ns: u64,
    /// The waiting process's id (for status). Mutex held, when it queues.
    pub(super) pid: u32,
    pub(super) _pad: u32,
}

pub(super) const fn align(x: usize) -> usize {
    (x + 4095) & !4095
}

/// The fast lane's gate (see [`Map::gate`]): a cache line of its own,
/// read by every fast call (`SeqCst`, I3) and written only when it opens
/// or closes: mutex held, by atomic store.
pub(super) const GATE_AT: usize = 448;
/// The table's robust, process-shared mutex: at creation
/// (`pthread_mutex_init`); then by `pthread` alone, and by the kernel
/// when its holder dies (marking it, through the holder's robust list).
/// Bytes in it that no holder can have left are a corrupt table, found by
/// a wait that does not end (`sys::robust_mutex_lock`).
pub(super) const MUTEX_AT: usize = 512;
/// One futex word per waiter entry: a waiter sleeps on its own word, and a
/// release wakes only the waiters whose spans it touches. Bumped
/// atomically by whoever wakes the entry, mutex held or just after letting
/// it go, or without the mutex by a thread that cancels the wait; slept on
/// by the entry's waiting thread.
pub(super) const WAKES_AT: usize = 4096;
/// The owner slots ([`Slot`]).
pub(super) const SLOTS_AT: usize = align(WAKES_AT + WAITERS * size_of::<u32>());
/// The waiter entries ([`Waiter`]).
pub(super) const WAITERS_AT: usize = align(SLOTS_AT + SLOTS * size_of::<Slot>());
/// Derived: the head of each hash bucket's list of single-index records
/// (`NIL`: none). Mutex held; never read by a fast call (I1 keeps its
/// lane slow while it lists anything).
pub(super) const BUCKETS_AT: usize = align(WAITERS_AT + WAITERS * size_of::<Waiter>());
/// The lock records ([`Rec`]).
pub(super) const RECORDS_AT: usize = align(BUCKETS_AT + BUCKETS * size_of::<u32>());
/// Per owner slot, a cache line listing the lanes of its fast holds
/// (lane + 1; 0 a free entry). By CAS without the mutex: an entry
/// `0 -> lane + 1` by the owner's own threads before a word goes in, and
/// `lane + 1 -> 0` by them or by the mutex holder after it went (I7); a
/// dead owner's entries stored 0, mutex held.
pub(super) const LISTS_AT: usize = align(RECORDS_AT + RECORDS * size_of::<Rec>());
/// One lane word per hash bucket (see [`Map::lane`]). By CAS without the
/// mutex, by fast calls, waiters and the mutex holder alike; stored only
/// by the mutex holder over `SLOW` or `MOVING`. The transitions are the
/// table at the head of `lane.rs`.
pub(super) const LANES_AT: usize = align(LISTS_AT + SLOTS * 64);
/// Lock statistics (`stats.rs` in the crate and here): [`STAT_LOCKS`]
/// entries keyed by index, one for "other indices", [`STAT_OWNERS`] keyed
/// by process id, one for "other owners". Written by any owner that
/// records, *without the mutex*: a key by CAS `0 -> key` (never changed
/// again while the table lives), the figures by relaxed atomic adds (and
/// `fetch_max`). Read the same way, by anyone, so a reader may see a take
/// half counted (its acquisition and not yet its hold, a bucket and not
/// yet the count): torn, but every figure only grows. Untrusted like
/// everything here: a key or figure may be anything, and is only ever
/// reported, never used to index memory.
pub(super) const STATS_AT: usize = align(LANES_AT + BUCKETS * size_of::<u64>());
/// The process entries ([`Proc`]), after the statistics.
pub(super) const PROCS_AT: usize = align(STATS_AT + STAT_ENTRIES * size_of::<StatEntry>());
/// Per-index statistics entries (then one for other indices).
pub(super) const STAT_LOCKS: usize = 1024;
/// Per-process statistics entries (then one for other owners).
pub(super) const STAT_OWNERS: usize = 256;
/// Every statistics entry.
pub(super) const STAT_ENTRIES: usize = STAT_LOCKS + 1 + STAT_OWNERS + 1;
/// How many entries a key's search looks at before it settles for the
/// "other" entry.
pub(super) const STAT_PROBES: usize = 32;
/// The words of a histogram in an entry: its buckets, then the sum and
/// the maximum (microseconds). The count is the buckets' sum: one atomic
/// add fewer per sample.
pub(super) const HIST_WORDS: usize = crate::stats::HIST_BUCKETS + 2;

/// One statistics entry (see [`STATS_AT`]); every field atomic.
#[repr(C, align(64))]
pub(super) struct StatEntry {
    /// 0: unused; else index + 1, or the process id.
    pub(super) key: std::sync::atomic::AtomicU64,
    /// Acquired, contended, timeouts, deadlocks.
    pub(super) counts: [std::sync::atomic::AtomicU64; 4],
    pub(super) wait: [std::sync::atomic::AtomicU64; HIST_WORDS],
    pub(super) hold: [std::sync::atomic::AtomicU64; HIST_WORDS],
}

/// The sidecar's size: sparse, and only the pages touched take memory.
pub(crate) const SIZE: usize = align(PROCS_AT + PROCS * size_of::<Proc>());

/// The sidecar's regions as (name, offset, length) in bytes, for tests
/// that write over them.
pub(crate) fn regions() -> Vec<(&'static str, u64, u64)> {
    let r = |name, at: usize, len: usize| (name, at as u64, len as u64);
    vec![
        r("header", 0, size_of::<Header>()),
        r("header counters", 40, size_of::<Header>() - 40),
        r("gate", GATE_AT, size_of::<u32>()),
        r("mutex", MUTEX_AT, size_of::<libc::pthread_mutex_t>()),
        r("wake words", WAKES_AT, WAITERS * size_of::<u32>()),
        r("slots", SLOTS_AT, SLOTS * size_of::<Slot>()),
        r("waiters", WAITERS_AT, WAITERS * size_of::<Waiter>()),
        r("bucket heads", BUCKETS_AT, BUCKETS * size_of::<u32>()),
        r("records", RECORDS_AT, RECORDS * size_of::<Rec>()),
        r("fast lists", LISTS_AT, SLOTS * 64),
        r("lane words", LANES_AT, BUCKETS * size_of::<u64>()),
        r("stats", STATS_AT, STAT_ENTRIES * size_of::<StatEntry>()),
        r("processes", PROCS_AT, PROCS * size_of::<Proc>()),
    ]
}

const _: () = assert!(size_of::<Header>() <= GATE_AT);
const _: () = assert!(MUTEX_AT + size_of::<libc::pthread_mutex_t>() <= WAKES_AT);

pub(super) fn conflict(a: u32, b: u32) -> bool {
    a == EXCLUSIVE || b == EXCLUSIVE
}

pub(super) fn code(kind: Kind) -> u32 {
    match kind {
        Kind::Shared => SHARED,
        Kind::Exclusive => EXCLUSIVE,
    }
}

pub(super) fn kind_of(code: u32) -> Kind {
    if code == EXCLUSIVE {
        Kind::Exclusive
    } else {
        Kind::Shared
    }
}

pub(super) fn overlaps(s: u64, e: u64, t: u64, u: u64) -> bool {
    s < u && t < e
}

/// Indices whose lanes share a page: a run of them, hashed as one.
const LANE_RUN: u64 = 4096 / size_of::<u64>() as u64;

/// The hash bucket (and lane) of `index`. A run of [`LANE_RUN`]
/// consecutive indices has its lanes in one page, the runs scattered by a
/// multiplicative hash: the indices a program uses are mostly neighbours,
/// and a page fault or TLB entry per index would cost more than the lock
/// (the lanes span 128 MiB, sparse). Within the page, neighbours are two
/// cache lines apart (never in one line, nor in the pair of lines a CPU
/// fetches together), so that processes taking neighbouring indices, as
/// hand over hand, do not pull one line between them. Strides, even of a
/// run's length, still meet distinct buckets.
pub(super) fn bucket(index: u64) -> usize {
    let runs = BUCKETS as u64 / LANE_RUN;
    let run =
        (index / LANE_RUN).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - runs.trailing_zeros());
    let o = index % LANE_RUN;
    // 64 lines of 8 lanes: offset `o` goes to line 2(o mod 32) + (o / 32
    // mod 2), a one-to-one map of `o mod 64` onto the lines.
    let line = (o % 32) * 2 + (o / 32) % 2;
    ((run % runs) * LANE_RUN + line * 8 + o / 64) as usize
}

// ---- the fast lane ----
//
// A lane word per hash bucket lets one owner take one index, and let it
// go, with atomic instructions alone: no mutex, no record. A lane is
// - `LANE_EMPTY`: no record and no single-index waiter in its bucket;
// - `LANE_SLOW`: its bucket is the table's (records or waiters may be in
//   it): every call there takes the mutex;
// - a fast word: `LANE_FAST | slot << 40 | index`, owner `slot` holds
//   `index` exclusively (shared with `LANE_SHARED`; a second reader goes
//   through the table) and its bucket is otherwise empty;
// - the same with `LANE_MOVING`: a mutex holder is turning the fast hold
//   into a record (seen only by repair, after it died doing so);
// - and with `LANE_WAITING`: someone sleeps on the word's upper half (a
//   futex), to be woken by whoever changes the word next.
// A call under the mutex that needs a bucket first makes its lane slow,
// turning a fast hold there into a record (`TableLock::enter_lane`), and gives
// the lane back when the bucket is empty again (`TableLock::leave`). Records
// of more than one index (and waits for them) close the gate instead: a
// fast hold taken while it is closed is not granted (see `Shm::fast_raise`).

pub(super) const LANE_EMPTY: u64 = 0;
pub(super) const LANE_SLOW: u64 = 1;
pub(super) const LANE_FAST: u64 = 1 << 63;
pub(super) const LANE_MOVING: u64 = 1 << 62;
pub(super) const LANE_SHARED: u64 = 1 << 61;
pub(super) const LANE_WAITING: u64 = 1 << 60;
/// Indices the fast lane can name: the low 40 bits of its word (higher
/// ones are locked through the table).
pub(super) const LANE_INDEX_MAX: u64 = (1 << 40) - 1;
/// The owner slot's bits in a lane word, above the index.
const LANE_SLOT_SHIFT: u32 = 40;
const LANE_SLOT_MASK: u64 = (1 << 20) - 1;
const _: () = assert!(SLOTS as u64 <= LANE_SLOT_MASK + 1);
const _: () = assert!((LANE_SLOT_MASK << LANE_SLOT_SHIFT) & LANE_WAITING == 0);
/// Fast holds an owner may have at once (its list fills a cache line);
/// past them it takes locks through the mutex.
pub(super) const FAST_HOLDS: usize = 16;

pub(super) fn fast_word(slot: u32, index: u64, kind: u32) -> u64 {
    let shared = if kind == SHARED { LANE_SHARED } else { 0 };
    LANE_FAST | shared | (slot as u64 & LANE_SLOT_MASK) << LANE_SLOT_SHIFT | index
}

pub(super) fn lane_kind(w: u64) -> u32 {
    if w & LANE_SHARED != 0 {
        SHARED
    } else {
        EXCLUSIVE
    }
}

pub(super) fn is_fast(w: u64) -> bool {
    w & LANE_FAST != 0
}

pub(super) fn lane_owner(w: u64) -> u32 {
    ((w >> LANE_SLOT_SHIFT) & LANE_SLOT_MASK) as u32
}

pub(super) fn lane_index(w: u64) -> u64 {
    w & LANE_INDEX_MAX
}

/// Whether lane word `w` is owner `o`'s fast hold (not being taken over)
/// on an index of `span`.
pub(super) fn fast_of(w: u64, o: u32, span: &std::ops::Range<u64>) -> bool {
    is_fast(w) && w & LANE_MOVING == 0 && lane_owner(w) == o && span.contains(&lane_index(w))
}

/// The index `span` is, and its lane, when it is one index the fast lane
/// can name.
pub(super) fn lane_of(span: Span) -> Option<(u64, usize)> {
    let i = span.start();
    (span.end() - i == 1 && i <= LANE_INDEX_MAX).then(|| (i, bucket(i)))
}

#[cfg(test)]
mod tests {
    use std::mem::offset_of;
    use std::sync::atomic::AtomicU32;

    use super::*;

    /// A run of indices fills its page of lanes one to one, neighbours
    /// never in one pair of cache lines; runs land apart.
    #[test]
    fn neighbours_share_a_page_and_no_line() {
        for base in [0u64, LANE_RUN, 7 * LANE_RUN, 1 << 40] {
            let lanes: Vec<usize> = (base..base + LANE_RUN).map(bucket).collect();
            let page = lanes[0] / LANE_RUN as usize;
            assert!(lanes.iter().all(|&l| l / LANE_RUN as usize == page));
            let mut seen = lanes.clone();
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen.len(), LANE_RUN as usize, "one to one");
            for w in lanes.windows(2) {
                assert_ne!(
                    w[0] * 8 / 128,
                    w[1] * 8 / 128,
                    "neighbours in one line pair"
                );
            }
        }
        let pages: std::collections::HashSet<usize> = (0..1000u64)
            .map(|r| bucket(r * LANE_RUN) / LANE_RUN as usize)
            .collect();
        assert!(pages.len() > 950, "runs crowd into {} pages", pages.len());
    }

    /// The diagrams in this file's header, read back: each offset there is
    /// the real one.
    #[test]
    fn the_diagrams_tell_the_real_layout() {
        let doc: Vec<&str> = include_str!("layout.rs")
            .lines()
            .filter_map(|l| l.strip_prefix("//!"))
            .collect();
        let at = |what: &str| -> usize {
            let line = doc
                .iter()
                .find(|l| {
                    let mut w = l.split_whitespace();
                    w.next().is_some_and(|t| t.parse::<usize>().is_ok()) && l.contains(what)
                })
                .unwrap_or_else(|| panic!("no line for {what}"));
            let mut w = line.split_whitespace();
            let dec: usize = w.next().unwrap().parse().unwrap();
            let hex = w.next().unwrap().trim_start_matches("0x");
            assert_eq!(usize::from_str_radix(hex, 16).unwrap(), dec, "{line}");
            dec
        };
        assert_eq!(at("Header (below)"), 0);
        assert_eq!(at("gate:"), GATE_AT);
        assert_eq!(at("process-shared mutex"), MUTEX_AT);
        assert_eq!(at("wake words:"), WAKES_AT);
        assert_eq!(at("slots:"), SLOTS_AT);
        assert_eq!(at("waiters:"), WAITERS_AT);
        assert_eq!(at("bucket heads:"), BUCKETS_AT);
        assert_eq!(at("records:"), RECORDS_AT);
        assert_eq!(at("fast lists:"), LISTS_AT);
        assert_eq!(at("lane words:"), LANES_AT);
        assert_eq!(at("stats:"), STATS_AT);
        assert_eq!(at("processes:"), PROCS_AT);
        assert_eq!(at("end (SIZE)"), SIZE);
        assert_eq!(size_of::<StatEntry>(), 640);
        assert_eq!(size_of::<Slot>(), 64);
        assert_eq!(size_of::<Proc>(), 16);
        assert_eq!(size_of::<Waiter>(), 56);
        assert_eq!(size_of::<Rec>(), 40);
        assert_eq!(size_of::<[AtomicU32; FAST_HOLDS]>(), 64);

        // The header's fields: every `+offset name` pair.
        let header = doc
            .iter()
            .skip_while(|l| !l.contains("96 bytes"))
            .take_while(|l| !l.contains("Beyond"));
        let mut named = 0;
        for pair in header.flat_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.chunks(2)
                .filter(|c| c.len() == 2 && c[0].starts_with('+'))
                .map(|c| (c[0][1..].parse::<usize>().unwrap(), c[1].to_string()))
                .collect::<Vec<_>>()
        }) {
            let (off, name) = pair;
            let real = match name.as_str() {
                "magic" => offset_of!(Header, magic),
                "version" => offset_of!(Header, version),
                "size" => offset_of!(Header, size),
                "dev" => offset_of!(Header, dev),
                "ino" => offset_of!(Header, ino),
                "next_ticket" => offset_of!(Header, next_ticket),
                "next_nonce" => offset_of!(Header, next_nonce),
                "free_head" => offset_of!(Header, free_head),
                "free_count" => offset_of!(Header, free_count),
                "coarse_head" => offset_of!(Header, coarse_head),
                "coarse_count" => offset_of!(Header, coarse_count),
                "waiting" => offset_of!(Header, waiting),
                "waiter_hwm" => offset_of!(Header, waiter_hwm),
                "fresh" => offset_of!(Header, fresh),
                "slot_hwm" => offset_of!(Header, slot_hwm),
                "slots_used" => offset_of!(Header, slots_used),
                "proc_hwm" => offset_of!(Header, proc_hwm),
                other => panic!("no header field {other}"),
            };
            assert_eq!(off, real, "{name}");
            named += 1;
        }
        assert_eq!(named, 17, "every field but the padding");
        assert_eq!(size_of::<Header>(), 96);
    }
}
