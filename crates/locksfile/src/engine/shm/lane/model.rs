//! The fast lane under `loom` (`RUSTFLAGS="--cfg loom"`, run by
//! `scripts/test`): two or three threads over the scenarios of its
//! historical bugs (`model/scenarios.rs`), in the interleavings `loom`'s
//! bounded search explores up to `LOOM_MAX_PREEMPTIONS`.
//!
//! What runs is the real code of everything done to the words without the
//! mutex (`take`, `confirm`, `empty`, `let_go`, with and without the kept
//! entry, `in_way`, `mark`, the lists' `unlist`) and of every step the mutex holder takes on them
//! (`close_gate`, `open_gate`, `scan`, `listed`, `swap_word`, `adopted`,
//! `give_back`), over `loom`'s atomics. The mutex side around those steps
//! (`adopt`, `enter_lane`, `adopt_range` lane by lane and through the
//! lists, `leave`, `end_fast`, records put in and trimmed, and after a
//! holder stopped, `settle_lanes`) is mirrored here step by step over a
//! small table of records behind a `loom` mutex, standing in for the
//! robust one: a holder that stops lets it go marked, as the kernel does a
//! dead holder's robust mutex, and the next one repairs first. Lane `l` is
//! the bucket of index `l`. A futex is a `loom` mutex and condition
//! variable: a sleeper compares the word under it, a waker takes it to
//! wake, as the kernel's hash-bucket lock does; the model's sleeps have no
//! timeout, so a lost wake-up is a deadlock `loom` reports.
//!
//! `loom` takes `SeqCst` accesses for `AcqRel` ones (its README), which
//! would let both sides of the gate/lane pair (I3) read old values. Each
//! `SeqCst` access is modelled as C++20 compiles it: the access between two
//! `SeqCst` fences, which `loom` does model. That is at least as strong as
//! the access itself, so a bug that lives only in the difference would go
//! unseen. Before the first fence each such access bumps one counter (see
//! [`sc_point`]), so that `loom`'s search can switch threads there.
//!
//! What is not modelled, and why:
//!
//! - An owner whose process dies while it holds a fast word, not the
//!   mutex: the table finds it dead through its liveness lock (`fcntl` on
//!   the sidecar, which `loom` cannot model) and ends its words under the
//!   mutex by `end_fast` to empty, the steps modelled for an owner's own
//!   words; the dead owner takes no step meanwhile. The death that races
//!   with fast calls is the mutex holder's, between the steps of an
//!   adoption: `an_owner_stopping_mid_adoption` stops one there.
//! - A repair meeting a word that is no lane word at all, or a dead
//!   owner's fast word: both are plain swaps under the mutex, after which
//!   the repair goes on as modelled.
//! - Records running out (`adopt` answering `false`): a count under the
//!   mutex, with no lane word touched on that path.
//! - Waits through the table (queued waiters and their wake words): they
//!   touch no lane word but through `enter_lane`, which is modelled.
//!
//! Each historical exclusion bug can be put back, one at a time, by
//! naming it in `LOCKSFILE_MUTATION`; `each_historical_bug_is_caught`
//! runs this binary once per bug and asks that its scenario fails.

use std::sync::atomic::Ordering::{self, AcqRel, Acquire, Relaxed, Release, SeqCst};
use std::sync::OnceLock;

use loom::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, AtomicUsize};
use loom::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::super::layout::{
    conflict, fast_of, fast_word, is_fast, lane_index, lane_kind, lane_owner, EXCLUSIVE,
    FAST_HOLDS, LANE_EMPTY, LANE_MOVING, LANE_SLOW,
};
use super::{
    adopted, close_gate, give_back, in_way, let_go, listed, mark, open_gate, scan, swap_word, take,
    Lanes, Took, Word,
};

/// The historical bug `LOCKSFILE_MUTATION` names is `name`.
pub(super) fn mutated(name: &str) -> bool {
    static NAMED: OnceLock<Option<String>> = OnceLock::new();
    NAMED
        .get_or_init(|| std::env::var("LOCKSFILE_MUTATION").ok())
        .as_deref()
        == Some(name)
}

/// Whether a `SeqCst` access gets its fences (not with `weak-gate`, the
/// pair weakened to `Release`/`Acquire`).
fn fenced(order: Ordering) -> bool {
    order == SeqCst && !mutated("weak-gate")
}

fn fence_if(yes: bool) {
    if yes {
        fence(SeqCst);
    }
}

loom::lazy_static! {
    /// Bumped by every `SeqCst` access, before its first fence: see
    /// [`sc_point`].
    static ref SC_POINTS: AtomicUsize = AtomicUsize::new(0);
}

/// Before a `SeqCst` access's first fence, a `Relaxed` bump of one counter
/// that nothing reads: it changes no word and orders nothing, but it is an
/// access every `SeqCst` access of the other threads conflicts with.
/// `loom` puts a preemption only at an access that conflicts with the
/// last access to the same object, so without it the only switch before
/// a gate load goes between the fence and the load (the load may then
/// read the old gate, as the fence came first), and a thread's own loads
/// of a word hide another's: the run where the taker's gate load comes
/// after a whole close, take away and reopen was never explored.
fn sc_point(yes: bool) {
    if yes {
        SC_POINTS.fetch_add(1, Relaxed);
    }
}

macro_rules! loom_word {
    ($atomic:ty, $v:ty) => {
        impl Word for $atomic {
            type V = $v;
            fn load(&self, order: Ordering) -> $v {
                let f = fenced(order);
                sc_point(f);
                fence_if(f);
                let v = <$atomic>::load(self, if order == SeqCst { Acquire } else { order });
                fence_if(f);
                v
            }
            fn store(&self, v: $v, order: Ordering) {
                let f = fenced(order);
                sc_point(f);
                fence_if(f);
                <$atomic>::store(self, v, if order == SeqCst { Release } else { order });
                fence_if(f);
            }
            fn compare_exchange(&self, c: $v, n: $v, s: Ordering, f: Ordering) -> Result<$v, $v> {
                let fs = fenced(s);
                sc_point(fs);
                fence_if(fs);
                let s = if s == SeqCst { AcqRel } else { s };
                let f = if f == SeqCst { Acquire } else { f };
                let r = <$atomic>::compare_exchange(self, c, n, s, f);
                fence_if(fs);
                r
            }
        }
    };
}
loom_word!(AtomicU64, u64);
loom_word!(AtomicU32, u32);

const LANES: usize = 2;
const OWNERS: usize = 3;
/// A ghost count of an index's holders: shared ones count one each.
const X: usize = 1 << 8;

#[derive(Clone, Copy, Debug, PartialEq)]
struct Rec {
    owner: u32,
    start: u64,
    end: u64,
    kind: u32,
}

/// The words, the table behind its mutex, the futex, and the ghost
/// counts the assertions read.
struct World {
    lanes: [AtomicU64; LANES],
    gate: AtomicU32,
    lists: [[AtomicU32; FAST_HOLDS]; OWNERS],
    table: Mutex<Vec<Rec>>,
    futex: Mutex<()>,
    woken: Condvar,
    ghost: [AtomicUsize; LANES],
    /// The last mutex holder stopped holding it (the robust mutex's
    /// `EOWNERDEAD`): the next one repairs first. Read and written under
    /// the table's mutex alone.
    died: AtomicBool,
    /// Wide spans find fast holds through the owners' lists (I7), as
    /// `adopt_range` does over more than `FINE_SCAN` indices, rather than
    /// lane by lane.
    scan_lists: bool,
}

impl Lanes for World {
    type W64 = AtomicU64;
    type W32 = AtomicU32;
    fn lane(&self, l: usize) -> &AtomicU64 {
        &self.lanes[l]
    }
    fn gate(&self) -> &AtomicU32 {
        &self.gate
    }
    fn fast_list(&self, s: u32) -> &[AtomicU32; FAST_HOLDS] {
        &self.lists[s as usize]
    }
    /// As `Map::woke_lane`, with the futex's bucket lock.
    fn woke_lane(&self, _l: usize, old: u64) {
        if old & super::LANE_WAITING != 0 {
            let _bucket = self.futex.lock().unwrap();
            self.woken.notify_all();
        }
    }
}

impl World {
    fn new() -> Arc<World> {
        World::with(false)
    }

    fn with(scan_lists: bool) -> Arc<World> {
        Arc::new(World {
            lanes: std::array::from_fn(|_| AtomicU64::new(LANE_EMPTY)),
            gate: AtomicU32::new(0),
            lists: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU32::new(0))),
            table: Mutex::new(Vec::new()),
            futex: Mutex::new(()),
            woken: Condvar::new(),
            ghost: std::array::from_fn(|_| AtomicUsize::new(0)),
            died: AtomicBool::new(false),
            scan_lists,
        })
    }

    /// `futex_wait` on lane `l`'s upper half while it reads `half`.
    fn sleep(&self, l: usize, half: u32) {
        let bucket = self.futex.lock().unwrap();
        if (Word::load(&self.lanes[l], SeqCst) >> 32) as u32 == half {
            drop(self.woken.wait(bucket).unwrap());
        }
    }

    /// A thread now holds index `i` at `kind`: no one else may hold it in
    /// a conflicting way.
    fn enter(&self, i: u64, kind: u32) {
        let add = if kind == EXCLUSIVE { X } else { 1 };
        let before = self.ghost[i as usize].fetch_add(add, AcqRel);
        let fine = if kind == EXCLUSIVE {
            before == 0
        } else {
            before < X
        };
        assert!(
            fine,
            "two owners hold index {i} (count {before:#x} before a {kind} hold)"
        );
    }

    fn exit(&self, i: u64, kind: u32) {
        let sub = if kind == EXCLUSIVE { X } else { 1 };
        self.ghost[i as usize].fetch_sub(sub, AcqRel);
    }

    /// Before the threads start: owner `o` holds index `i` on the fast
    /// lane, as `take` leaves it.
    fn fast_held(&self, o: u32, i: u64, kind: u32) {
        Word::store(&self.lists[o as usize][0], i as u32 + 1, Relaxed);
        Word::store(&self.lanes[i as usize], fast_word(o, i, kind), Relaxed);
        self.enter(i, kind);
    }

    /// Before the threads start: owner `o` holds `s..e` as a record, wide
    /// ones behind the closed gate.
    fn record_held(&self, o: u32, s: u64, e: u64, kind: u32) {
        let mut g = self.lock();
        g.link(Rec {
            owner: o,
            start: s,
            end: e,
            kind,
        });
        drop(g);
        for i in s..e {
            self.enter(i, kind);
        }
    }

    /// The table's mutex; after a holder stopped with it, the repair
    /// first (as `Shm::lock` on `EOWNERDEAD`).
    fn lock(&self) -> Guard<'_> {
        let mut g = Guard {
            w: self,
            recs: self.table.lock().unwrap(),
            entered: Vec::new(),
            stopped: false,
        };
        if self.died.load(Relaxed) {
            g.settle_lanes();
            self.died.store(false, Relaxed);
        }
        g
    }

    /// `try_set` raising one index: the fast lane, else the table.
    fn take_one(&self, o: u32, i: u64, kind: u32) -> bool {
        self.take_one_keeping(o, i, kind, None)
    }

    /// `try_set` letting one index go: the fast lane, else the table.
    fn let_go_one(&self, o: u32, i: u64) {
        self.let_go_one_keeping(o, i, false)
    }

    /// As `take_one`; `keep`: as the owner's fast path takes, through that
    /// kept entry.
    fn take_one_keeping(&self, o: u32, i: u64, kind: u32, keep: Option<usize>) -> bool {
        match take(self, o, i, i as usize, kind, keep) {
            Took::Granted => return true,
            // As `Shm::withdraw`: a record made of the word goes.
            Took::Gone if keep.is_some() => self.lock().lower(o, i, i + 1, 0),
            _ => {}
        }
        self.lock().raise(o, i, i + 1, kind)
    }

    fn let_go_one_keeping(&self, o: u32, i: u64, keep: bool) {
        if !let_go(self, o, i, i as usize, keep) {
            self.lock().lower(o, i, i + 1, 0);
        }
    }

    /// `wait_on_lane` for index `i` (without its watching and yielding,
    /// and with sleeps that end only when woken), then the table's try.
    fn wait_one(&self, o: u32, i: u64, kind: u32) -> bool {
        let l = i as usize;
        loop {
            let w = Word::load(&self.lanes[l], Acquire);
            if w == LANE_EMPTY {
                if take(self, o, i, l, kind, None) == Took::Granted {
                    return true;
                }
                break;
            }
            if !in_way(w, o, i, kind) {
                break;
            }
            if let Some(half) = mark(self, l, w) {
                self.sleep(l, half);
            }
        }
        self.lock().raise(o, i, i + 1, kind)
    }
}

/// The mirror of `TableLock`'s lane work, over the model's records.
struct Guard<'a> {
    w: &'a World,
    recs: MutexGuard<'a, Vec<Rec>>,
    entered: Vec<usize>,
    /// Its holder stopped (died) with the mutex: nothing more is done.
    stopped: bool,
}

/// How far `adopt_until` goes before its holder stops.
#[derive(Clone, Copy, PartialEq)]
enum Step {
    /// The word is `MOVING`, no record yet.
    Moving,
    /// The record is in, the word still `MOVING`.
    Record,
    /// The adoption is done.
    Done,
}

impl Guard<'_> {
    fn gate_open(&self) -> bool {
        Word::load(&self.w.gate, Relaxed) == 0
    }

    fn conflicting(&self, o: u32, s: u64, e: u64, kind: u32) -> bool {
        self.recs
            .iter()
            .any(|r| r.owner != o && r.start < e && s < r.end && conflict(kind, r.kind))
    }

    fn note_lane(&mut self, l: usize) {
        if !self.entered.contains(&l) {
            self.entered.push(l);
        }
    }

    /// As `TableLock::adopt` (records never run out here).
    fn adopt(&mut self, l: usize, w: u64) {
        self.adopt_until(l, w, Step::Done);
    }

    /// `adopt`, up to `step`.
    fn adopt_until(&mut self, l: usize, w: u64, step: Step) {
        let (o, i, kind) = (lane_owner(w), lane_index(w), lane_kind(w));
        if !self.gate_open() && self.conflicting(o, i, i + 1, kind) {
            let Some(w) = swap_word(self.w, l, w, |_| LANE_SLOW) else {
                return;
            };
            self.w.unlist(o, l);
            self.note_lane(l);
            self.w.woke_lane(l, w);
            return;
        }
        let Some(w) = swap_word(self.w, l, w, |w| w | LANE_MOVING) else {
            return;
        };
        if step == Step::Moving {
            return;
        }
        self.recs.push(Rec {
            owner: o,
            start: i,
            end: i + 1,
            kind,
        });
        if step == Step::Record {
            return;
        }
        adopted(self.w, l);
        self.w.unlist(o, l);
        self.note_lane(l);
        self.w.woke_lane(l, w);
    }

    /// As `TableLock::enter_lane`.
    fn enter_lane(&mut self, l: usize) {
        loop {
            let w = Word::load(&self.w.lanes[l], Acquire);
            if w == LANE_SLOW {
                self.note_lane(l);
                return;
            }
            if w == LANE_EMPTY {
                if Word::compare_exchange(&self.w.lanes[l], w, LANE_SLOW, AcqRel, Acquire).is_ok() {
                    self.note_lane(l);
                    return;
                }
                continue;
            }
            self.adopt(l, w);
        }
    }

    /// As `TableLock::adopt_range`: over a short span lane by lane (with
    /// `no-mark-retry` as before the fix, one look per index), over a long
    /// one (`scan_lists`) through the owners' lists.
    fn adopt_range(&mut self, s: u64, e: u64) {
        if self.w.scan_lists {
            for o in 0..OWNERS as u32 {
                for l in listed(self.w, o) {
                    loop {
                        let w = scan(self.w, l);
                        if !fast_of(w, o, &(s..e)) {
                            break;
                        }
                        self.adopt(l, w);
                    }
                }
            }
            return;
        }
        for i in s..e {
            let l = i as usize;
            loop {
                let w = scan(self.w, l);
                if !is_fast(w) || lane_index(w) != i {
                    break;
                }
                self.adopt(l, w);
                if mutated("no-mark-retry") {
                    break;
                }
            }
        }
    }

    /// The holder stops here, as a process dies: the mutex goes (the
    /// kernel lets a robust mutex go and marks it), nothing else is done.
    fn stop(mut self) {
        self.stopped = true;
        self.w.died.store(true, Relaxed);
    }

    /// As `TableLock::settle_lanes` after a holder died (the dead holder
    /// here had no records, waits or fast holds of its own, so only the
    /// lanes are put right).
    fn settle_lanes(&mut self) {
        for l in 0..LANES {
            self.settle_lane(l);
        }
        if self.recs.iter().any(|r| r.end - r.start > 1) {
            close_gate(self.w);
        }
    }

    /// As `TableLock::settle_lane` (every owner of a fast word is alive):
    /// a half-made adoption finished or undone as the record shows (I4),
    /// a lane whose bucket holds a record made slow.
    fn settle_lane(&mut self, l: usize) {
        let lane = &self.w.lanes[l];
        loop {
            let w = Word::load(lane, Acquire);
            let swap = |to: u64| {
                let swapped = Word::compare_exchange(lane, w, to, AcqRel, Acquire).is_ok();
                if swapped {
                    self.w.woke_lane(l, w);
                }
                swapped
            };
            if w & LANE_MOVING != 0 {
                let (o, i) = (lane_owner(w), lane_index(w));
                let made = self
                    .recs
                    .iter()
                    .any(|r| r.owner == o && r.start == i && r.end == i + 1);
                let undone = if mutated("undo-moving-to-empty") {
                    LANE_EMPTY
                } else {
                    w & !LANE_MOVING
                };
                if swap(if made { LANE_SLOW } else { undone }) && made {
                    self.w.unlist(o, l);
                }
                continue;
            }
            let busy = self
                .recs
                .iter()
                .any(|r| r.end - r.start == 1 && r.start == l as u64);
            if busy && w == LANE_EMPTY {
                if swap(LANE_SLOW) {
                    return;
                }
                continue;
            }
            if busy && is_fast(w) {
                self.adopt(l, w);
                continue;
            }
            return;
        }
    }

    /// As `TableLock::end_fast` (`drop_own_fast` with `to` slow, I6).
    fn end_fast(&mut self, o: u32, s: u64, e: u64, to: u64) {
        let listed: Vec<usize> = self.w.lists[o as usize]
            .iter()
            .map(|e| Word::load(e, SeqCst))
            .filter(|&v| v != 0)
            .map(|v| (v - 1) as usize)
            .collect();
        for l in listed {
            loop {
                let w = Word::load(&self.w.lanes[l], Acquire);
                if !fast_of(w, o, &(s..e)) {
                    break;
                }
                if let Some(w) = swap_word(self.w, l, w, |_| to) {
                    self.w.woke_lane(l, w);
                    self.w.unlist(o, l);
                    self.note_lane(l);
                    break;
                }
            }
        }
    }

    /// As `relink_tier`: a single index into its bucket, then its lane
    /// taken (I1); a wider record behind the closed gate (I2).
    fn link(&mut self, r: Rec) {
        if r.end - r.start == 1 {
            let l = r.start as usize;
            if mutated("lane-before-bucket") {
                self.enter_lane(l);
                self.recs.push(r);
                return;
            }
            self.recs.push(r);
            let w = Word::load(&self.w.lanes[l], Acquire);
            if w != LANE_SLOW && w & LANE_MOVING == 0 {
                self.enter_lane(l);
            }
        } else {
            close_gate(self.w);
            self.recs.push(r);
        }
    }

    /// As `prepare` for one piece.
    fn prepare(&mut self, s: u64, e: u64) {
        if e - s == 1 {
            self.enter_lane(s as usize);
        } else {
            close_gate(self.w);
            self.adopt_range(s, e);
        }
    }

    /// As `set`: owner `o`'s holds on `s..e` become `kind` (0: none).
    fn set(&mut self, o: u32, s: u64, e: u64, kind: u32) {
        let to = if mutated("drop-to-empty") {
            LANE_EMPTY
        } else {
            LANE_SLOW
        };
        self.end_fast(o, s, e, to);
        let mine: Vec<Rec> = self
            .recs
            .iter()
            .copied()
            .filter(|r| r.owner == o && r.start < e && s < r.end)
            .collect();
        self.recs.retain(|r| !mine.contains(r));
        for r in mine {
            if r.start < s {
                self.link(Rec { end: s, ..r });
            }
            if e < r.end {
                self.link(Rec { start: e, ..r });
            }
            for i in r.start.max(s)..r.end.min(e) {
                self.note_lane(i as usize);
            }
        }
        if kind != 0 {
            self.link(Rec {
                owner: o,
                start: s,
                end: e,
                kind,
            });
        }
    }

    /// A raise through the table: `false` when refused.
    fn raise(mut self, o: u32, s: u64, e: u64, kind: u32) -> bool {
        self.prepare(s, e);
        if self.conflicting(o, s, e, kind) {
            return false;
        }
        self.set(o, s, e, kind);
        true
    }

    fn lower(mut self, o: u32, s: u64, e: u64, kind: u32) {
        self.set(o, s, e, kind);
    }
}

impl Drop for Guard<'_> {
    /// As `TableLock::leave`, then the table's own check: no two owners'
    /// records conflict.
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        for &l in &self.entered {
            let single = self
                .recs
                .iter()
                .any(|r| r.end - r.start == 1 && r.start == l as u64);
            if Word::load(&self.w.lanes[l], Relaxed) == LANE_SLOW && !single {
                give_back(self.w, l);
            }
        }
        if !self.gate_open() && self.recs.iter().all(|r| r.end - r.start == 1) {
            open_gate(self.w);
        }
        for (k, a) in self.recs.iter().enumerate() {
            for b in &self.recs[..k] {
                let clash = a.owner != b.owner
                    && a.start < b.end
                    && b.start < a.end
                    && conflict(a.kind, b.kind);
                assert!(!clash, "two owners' records conflict: {a:?} and {b:?}");
            }
        }
    }
}

mod scenarios;
