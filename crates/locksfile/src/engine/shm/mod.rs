//! The shared-memory engine ([`Mode::Shm`](crate::Mode::Shm)): a lock table
//! in a sidecar file (`<lock path>-shm`) that every owner maps, guarded by
//! one robust process-shared mutex.
//!
//! # Safety
//!
//! The table is memory shared with other processes. It is only read or
//! written while this process holds the table's mutex (a [`TableLock`], the
//! only maker of `&mut` into the table), which every process takes before
//! touching it, except the words only ever used atomically (wake words, the
//! gate, lanes, fast lists). Every index, count and span read from the
//! table is checked before use: a table written over makes the call that
//! finds it answer `SidecarProblem::Corrupt` (see `table.rs`), never panic,
//! hang on a cycle or touch memory outside the mapping, and nothing more is
//! written into it. Every process that can write the sidecar is trusted
//! not to do so on purpose: the check stops accidents, not an attacker. The mapping lives as long as the
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
//! Each process using the table takes a process entry and holds an OFD
//! write lock on byte `LIVENESS + entry` of the sidecar, through the one
//! open file description its owners share (`process.rs`); each owner takes
//! a slot naming that entry. An owner is dead when its entry's byte is
//! free (`F_OFD_GETLK`), or its entry was since reused (the slot keeps the
//! entry's nonce). No pid is trusted, so pid reuse and pid namespaces do
//! not matter.
//!
//! # Files
//!
//! `layout` (the structures, their offsets, the lane word), `table` (the
//! mapping and [`TableLock`]: every `unsafe` but the first opener's making
//! of the mutex in `sidecar`), `records`, `waits` (the queue, the grant
//! rule, the wait), `deadlock` (the search and the reordering), `lane` (the
//! fast lane), `repair` (setting up, liveness, repair, `verify`), `sidecar`
//! (opening and joining, the in-use marker), `process` (what a process's
//! owners share: mapping, descriptors, process entry), `snapshot`. This file is one
//! owner, [`Shm`]: joining, raising and lowering, deferred lowerings,
//! leaving.

mod deadlock;
mod lane;
mod layout;
mod process;
mod records;
mod repair;
mod sidecar;
mod snapshot;
mod stats;
mod table;
#[cfg(test)]
mod tests;
mod waits;

pub use repair::verify;

/// Records and owners this process may use of a table: all of them unless
/// a test asks for fewer, to see a table fill without filling gigabytes.
pub(super) static RECORD_CAP: AtomicUsize = AtomicUsize::new(RECORDS);
pub(super) static OWNER_CAP: AtomicUsize = AtomicUsize::new(SLOTS);

/// Let this process use at most `records` records and `owners` owner
/// slots of any table (fewer than there are), so that a test sees a table
/// fill without filling gigabytes of it. Not for use outside tests.
#[doc(hidden)]
pub fn cap_for_tests(records: usize, owners: usize) {
    RECORD_CAP.store(records, std::sync::atomic::Ordering::Relaxed);
    OWNER_CAP.store(owners, std::sync::atomic::Ordering::Relaxed);
}

/// The sidecar's regions as (name, offset, length) in bytes, for tests
/// that write over them.
#[doc(hidden)]
pub fn regions() -> Vec<(&'static str, u64, u64)> {
    layout::regions()
}
pub(crate) use sidecar::{table_in_use, IN_USE};
pub use snapshot::{HeldLock, Snapshot, WaitingLock};
pub use stats::read_stats;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{Abilities, Engine, Until};
use crate::error::{Error, Holder, SidecarProblem};
use crate::kind::Kind;
use crate::span::{Span, INDEX_END};
use crate::sys;

use self::lane::{KEPT, KEPT_ENTRIES};
use self::layout::{code, kind_of, lane_of, overlaps, NIL, RECORDS, SLOTS};
use self::process::Joined;
use self::repair::proc_alive;
use self::sidecar::{network_fs, real_path, sidecar_path};
use self::table::{is_corrupt, take_corrupt, TableLock};
use self::waits::{Blocker, Request, NO_ENTRY};
use std::sync::atomic::AtomicUsize;

/// One owner's locks in a shared-memory table.
pub(crate) struct Shm {
    /// The table as this process joined it, shared by its owners.
    map: Arc<Joined>,
    /// The lock file, for `as_fd` and the mixed-engine checks.
    lock_fd: Option<OwnedFd>,
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

/// The span `s..e` read from the table; a span that cannot be notes the
/// table corrupt (the call then answers that instead).
fn span_of(g: &TableLock<'_>, s: u64, e: u64) -> Span {
    if s < e && e <= INDEX_END {
        Span::from_checked(s, e)
    } else {
        g.corrupt("a span");
        Span::from_checked(0, 1)
    }
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
        let map = Joined::get(lock_path, lock_fd.as_fd(), &id, &sidecar)?;
        let shm = Shm {
            map,
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
        let claimed = shm.claim_slot();
        let mut shm = shm;
        shm.slot = shm.answer(claimed)?;
        Ok(shm)
    }

    /// `r`, unless this call found the table corrupt: then the error that
    /// says so (see `table.rs`).
    #[inline(always)]
    fn answer<T>(&self, r: Result<T, Error>) -> Result<T, Error> {
        match take_corrupt() {
            None => r,
            Some(what) => Err(self.corrupted(what)),
        }
    }

    /// The error [`Shm::answer`] will give, if this call found the table
    /// corrupt so far.
    fn corrupt_so_far(&self) -> Option<Error> {
        if is_corrupt() {
            take_corrupt().map(|what| {
                // Kept for `answer`.
                table::found_corrupt(what);
                self.corrupted(what)
            })
        } else {
            None
        }
    }

    #[cold]
    fn corrupted(&self, what: &'static str) -> Error {
        self.map.corrupted(what)
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.map.fd()
    }

    /// The lock file's descriptor.
    pub fn lock_fd(&self) -> BorrowedFd<'_> {
        self.lock_fd.as_ref().expect("open until dropped").as_fd()
    }

    fn lock(&self) -> Result<TableLock<'_>, Error> {
        self.map.table()
    }

    fn full(&self, what: &'static str) -> Error {
        Error::TableFull {
            path: self.sidecar.clone(),
            what,
        }
    }

    /// Take a free slot, else a dead owner's: the lowest free one, so
    /// that the owners stay packed below `slot_hwm` (read by every scan
    /// over owners); straight past the mark when every slot below it is
    /// used. The slot names this process's entry, whose liveness is its.
    fn claim_slot(&self) -> Result<u32, Error> {
        let mut g = self.lock()?;
        let me = self.map.proc;
        let proc_nonce = g.process(me as usize).nonce;
        for pass in 0..2 {
            let (hwm, used) = (g.slot_hwm() as u32, g.header().slots_used);
            let from = if pass == 0 && used >= hwm { hwm } else { 0 };
            let cap = OWNER_CAP.load(Ordering::Relaxed).min(SLOTS);
            for s in from..cap as u32 {
                let used = g.slot(s as usize).used != 0;
                if used != (pass == 1) {
                    if pass == 1 && s >= hwm {
                        break;
                    }
                    continue;
                }
                if used && !g.purge_if_dead(self.fd(), s) {
                    continue;
                }
                if is_corrupt() {
                    // The caller answers the error.
                    return Ok(NIL);
                }
                let h = g.header();
                let nonce = h.next_nonce;
                h.next_nonce = h.next_nonce.wrapping_add(1);
                h.slot_hwm = h.slot_hwm.max(s + 1);
                h.slots_used = h.slots_used.wrapping_add(1);
                let slot = g.slot(s as usize);
                slot.pid = self.pid;
                slot.nonce = nonce;
                slot.head = NIL;
                slot.records = 0;
                slot.proc = me;
                slot.proc_nonce = proc_nonce;
                slot.used = 1;
                return Ok(s);
            }
        }
        Err(self.full("owners"))
    }

    /// This owner's id, as [`Snapshot`] shows it.
    pub fn owner_id(&self) -> u64 {
        let id = self
            .lock()
            .map(|g| g.slot(self.slot as usize).nonce)
            .unwrap_or(0);
        take_corrupt().map_or(id, |_| 0)
    }

    fn is_inherited(&self) -> bool {
        self.generation != sys::current_fork_generation()
    }

    fn holder_of(&self, g: &TableLock<'_>, b: Blocker) -> Holder {
        match b {
            Blocker::Record(r) => {
                let r = *g.rec(r);
                let (start, end) = g.extent(r.owner.wrapping_sub(1), r.kind, r.start, r.end);
                Holder {
                    span: span_of(g, start, end),
                    kind: kind_of(r.kind),
                    pid: Some(g.slot(r.owner.wrapping_sub(1) as usize).pid).filter(|&p| p > 0),
                    server: None,
                }
            }
            Blocker::Waiter(w) => {
                let w = *g.waiter(w as usize);
                Holder {
                    span: span_of(g, w.start, w.end),
                    kind: kind_of(w.kind),
                    pid: Some(w.pid).filter(|&p| p > 0),
                    server: None,
                }
            }
        }
    }
}

impl Shm {
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
            if g.covered(me, s, e, k) && !is_corrupt() {
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
        let blocker = g.blocker(None, req);
        if is_corrupt() {
            return Ok(false);
        }
        if let Some(b) = blocker {
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
        let proc = self.lock()?.slot(owner as usize).proc;
        if proc == self.map.proc || (proc_alive(self.fd(), proc) && !is_corrupt()) {
            return Ok(false);
        }
        if !self.lock()?.purge_if_dead(self.fd(), owner) {
            return Ok(false);
        }
        self.raise(span, kind, true)
    }

    /// Set `s..e` to `kind` (0: unlock), which only lowers what this owner
    /// holds there: never refused. A lowering that would split a record
    /// when the table has no record left for it is deferred instead: the
    /// table keeps the stronger lock (over-locking, which only delays
    /// others) until a later call of this owner finds the records.
    fn lower(&self, g: &mut TableLock<'_>, s: u64, e: u64, kind: u32) {
        // A lowering takes at most two records (see `records_to_lower`):
        // counting them exactly matters only when the table is nearly full.
        // Three more for the fast holds of other indices in the buckets of
        // the single-index records this may leave (each end, the middle).
        let free = g.free_records();
        if is_corrupt() {
            // Nothing more is written into a table found corrupt.
            return;
        }
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
    fn settle(&self, g: &mut TableLock<'_>) {
        if self.has_deferred.load(Ordering::Relaxed) {
            self.settle_slow(g);
        }
    }

    #[cold]
    #[inline(never)]
    fn settle_slow(&self, g: &mut TableLock<'_>) {
        let mut d = self.deferred.lock().unwrap_or_else(|p| p.into_inner());
        d.retain(|&(s, e, kind)| {
            if is_corrupt() || g.free_records() < g.records_to_lower(self.slot, s, e, kind) + 3 {
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
}

impl Drop for Shm {
    fn drop(&mut self) {
        if self.is_inherited() {
            // The parent's: its table is not ours (the shared part knows
            // too, and forgets the parent's descriptors).
            return;
        }
        if self.slot != NIL {
            if let Ok(mut g) = self.lock() {
                g.purge(self.slot);
            }
            // A corrupt table is left as it is: its next first opener
            // sets it up afresh.
            let _ = take_corrupt();
        }
        if let Some(lock_fd) = self.lock_fd.take() {
            crate::descriptors::close(self.dev, self.ino, lock_fd);
        }
    }
}

impl Shm {
    #[inline(always)]
    fn try_set_inner(&self, span: Span, kind: Option<Kind>) -> Result<bool, Error> {
        match kind {
            None => {
                if self.fast_lower(span, false) {
                    return Ok(true);
                }
                let mut g = self.lock()?;
                self.settle(&mut g);
                self.lower(&mut g, span.start(), span.end(), 0);
                Ok(true)
            }
            Some(k) if self.fast_raise(span, k, None) => Ok(true),
            Some(k) => self.raise(span, k, true),
        }
    }

    fn try_set_before_wait_inner(&self, span: Span, kind: Kind) -> Result<bool, Error> {
        if self.fast_raise(span, kind, None) {
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

    fn probe_inner(&self, span: Span, kind: Kind) -> Result<Option<Holder>, Error> {
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

    /// The owner's fast hold of `span` at `kind` becomes a record (its
    /// lane is made slow, adopting the word), so that `fast_lower` fails
    /// on it from now on; whether the owner still holds it.
    fn fast_take_over_inner(&self, span: Span, kind: Kind) -> Result<bool, Error> {
        let mut g = self.lock()?;
        self.settle(&mut g);
        let pieces = [span];
        if !g.prepare(&pieces) {
            return Err(self.full("lock records"));
        }
        Ok(g.covered(self.slot, span.start(), span.end(), code(kind)))
    }

    fn unlock_all_inner(&self) -> Result<(), Error> {
        let mut g = self.lock()?;
        if !is_corrupt() {
            g.set(self.slot, 0, INDEX_END, 0);
        }
        self.forget_deferred(0, INDEX_END);
        Ok(())
    }
}

/// Each call answers through [`Shm::answer`]: an error if it found the
/// table corrupt, whatever it did otherwise.
impl Engine for Shm {
    fn shared_stats(&self) -> Option<&dyn crate::stats::Shared> {
        Some(&**self.map)
    }

    #[inline]
    fn try_set(&self, span: Span, kind: Option<Kind>) -> Result<bool, Error> {
        self.answer(self.try_set_inner(span, kind))
    }

    #[inline]
    fn try_set_before_wait(&self, span: Span, kind: Kind) -> Result<bool, Error> {
        self.answer(self.try_set_before_wait_inner(span, kind))
    }

    fn wait_set(&self, span: Span, kind: Kind, until: Until<'_>) -> Result<(), Error> {
        self.answer(self.wait_all(&[span], kind, until))
    }

    fn wait_set_all(
        &self,
        pieces: &[Span],
        kind: Kind,
        until: Until<'_>,
    ) -> Option<Result<(), Error>> {
        Some(self.answer(self.wait_all(pieces, kind, until)))
    }

    fn probe(&self, span: Span, kind: Kind) -> Result<Option<Holder>, Error> {
        self.answer(self.probe_inner(span, kind))
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
        self.answer(self.unlock_all_inner())
    }

    fn fast_lane(&self) -> bool {
        true
    }

    // No `answer` on the fast lane: its words are found by a bucket and a
    // slot that are in range by construction, so it notes nothing corrupt
    // (a word written over fails the CAS, and the usual way finds it).
    #[inline(always)]
    // Each slot of the owner's fast path keeps its list entry from pair
    // to pair.
    fn fast_take(&self, span: Span, kind: Kind, slot: usize) -> bool {
        debug_assert!(slot < KEPT_ENTRIES, "a slot of the fast path");
        self.fast_raise(span, kind, Some(KEPT + slot))
    }

    #[inline(always)]
    fn fast_release(&self, span: Span) -> bool {
        self.fast_lower(span, true)
    }

    fn fast_take_over(&self, span: Span, kind: Kind) -> Result<bool, Error> {
        self.answer(self.fast_take_over_inner(span, kind))
    }
}
