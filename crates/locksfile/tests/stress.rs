//! A random multi-process stress test, checked by an oracle that does not
//! trust the crate's bookkeeping.
//!
//! Several forked processes run several threads each; every thread takes
//! and drops guards, converts them, and changes its handle's explicit layer
//! over random spans of a small index range, so that changes often span
//! pieces of mixed kinds and are refused part-way by other owners. Every
//! owner marks what it claims in a table in shared memory (marked after a
//! lock is had, cleared before it goes), and two checks judge the run:
//!
//! * a *violation* is an exclusive claim of one owner overlapping any claim
//!   of another owner: two owners believed they held conflicting locks;
//! * a *mismatch* is the kernel's own list of an owner's locks (read from
//!   `/proc/self/fdinfo`) differing from that owner's claims, wherever one
//!   thread alone acts for the owner, so the claims are exact.
//!
//! Waits are non-blocking, timed, or, where that cannot deadlock (OFD
//! locks have no deadlock detection), without a deadline: by an owner that
//! holds nothing (see `Owner::gate`), or by the one owner at a time that
//! holds the `TOKEN` while everyone else waits with a deadline or holds
//! nothing.
//!
//! Besides: every worker must finish in time (a stuck one is killed and
//! counted as hung), and no lock may be left in the kernel at the end.
//!
//! `LOCKSFILE_STRESS_SECS` sets the run time per mode (default 3 s),
//! `LOCKSFILE_STRESS_SEED` the seed.

mod common;

use std::io::Write;
use std::ops::Range;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use common::{fd_locks, fork, lock_path, open, proc_locks, serial, Child, Exit, Shared};
use locksfile::{Error, Kind, LockFile, Mode, ReadGuard, Span, Wait, WriteGuard};

const PROCS: usize = 3;
const THREADS: usize = 3;
/// Indices 0..16 get one column each; column 16 stands for 16 and all
/// beyond, which only spans to the end reach.
const COLS: usize = 17;
const LAST: u64 = 16;
const MAX_GUARDS: usize = 4;

// Counters, after the claim rows.
const OPS: usize = 0;
const VIOLATIONS: usize = 1;
const MISMATCHES: usize = 2;
const LEFTOVER: usize = 3;
const ERRORS: usize = 4;
const REFUSED: usize = 5;
/// Refused changes over indices the owner already held: the part-way case.
const REFUSED_OVER_OWN: usize = 6;
/// Waits without a deadline while holding nothing.
const BLOCKING: usize = 7;
/// Waits without a deadline while holding locks.
const BLOCKING_HOLDING: usize = 8;
/// Nonzero while some owner waits without a deadline holding locks.
const TOKEN: usize = 9;
const COUNTERS: usize = 10;
/// Then one slot per process: how many of its threads finished.
const DONE: usize = COUNTERS;

/// Print from a forked child: the harness captures `eprintln!` into the
/// child's memory, where it would be lost.
fn say(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

/// xorshift64*: a reproducible stream per worker, no dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // splitmix64 of the seed, so that neighbouring seeds differ.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }

    fn kind(&mut self) -> Kind {
        if self.one_in(2) {
            Kind::Shared
        } else {
            Kind::Exclusive
        }
    }

    /// A short wait, with or without a deadline, or none at all.
    fn wait(&mut self) -> Wait {
        match self.below(4) {
            0 => Wait::NonBlocking,
            1 => Wait::NonBlockingNoHolder,
            2 => Wait::Timeout(Duration::from_micros(self.below(3000))),
            _ => Wait::Deadline(Instant::now() + Duration::from_micros(self.below(3000))),
        }
    }
}

/// A span over the table: `end == None` runs to the end of the index space.
#[derive(Clone, Copy, Debug)]
struct Sp {
    start: u64,
    end: Option<u64>,
}

impl Sp {
    /// `narrow`: nearly always one index (in shm mode, the fast lane's
    /// work, with a wide span now and then to shut and open its gate).
    fn random(rng: &mut Rng, narrow: bool) -> Sp {
        let start = rng.below(LAST);
        if rng.one_in(if narrow { 64 } else { 8 }) {
            return Sp { start, end: None };
        }
        // One index half the time (nearly always when narrow): the common
        // case, and in shm mode the fast lane's.
        let single = if narrow {
            !rng.one_in(16)
        } else {
            rng.one_in(2)
        };
        let len = if single { 1 } else { 1 + rng.below(6) };
        let end = (start + len).min(LAST);
        Sp {
            start,
            end: Some(end),
        }
    }

    fn span(self) -> Span {
        match self.end {
            Some(e) => Span::new(self.start, e),
            None => Span::to_end(self.start),
        }
        .expect("valid span")
    }

    fn cols(self) -> Range<usize> {
        self.start as usize..self.end.map_or(COLS, |e| e as usize)
    }
}

/// The claims of every owner, and the counters, in shared memory.
struct Table<'a> {
    slots: &'a [AtomicU64],
    owners: usize,
}

impl Table<'_> {
    fn claim(&self, owner: usize, col: usize, kind: Kind) -> &AtomicU64 {
        let k = usize::from(kind == Kind::Exclusive);
        &self.slots[(owner * COLS + col) * 2 + k]
    }

    fn counter(&self, i: usize) -> &AtomicU64 {
        &self.slots[self.owners * COLS * 2 + i]
    }

    fn count(&self, i: usize) {
        self.counter(i).fetch_add(1, SeqCst);
    }

    fn get(&self, i: usize) -> u64 {
        self.counter(i).load(SeqCst)
    }

    /// Claim `kind` on `cols` (the lock is held), then look for conflicts.
    fn mark(&self, owner: usize, cols: Range<usize>, kind: Kind) {
        for c in cols.clone() {
            self.claim(owner, c, kind).fetch_add(1, SeqCst);
        }
        self.check(owner, cols, kind, "after marking");
    }

    /// Look for conflicts once more, then give up the claim (before the
    /// lock goes).
    fn unmark(&self, owner: usize, cols: Range<usize>, kind: Kind) {
        self.check(owner, cols.clone(), kind, "before clearing");
        for c in cols {
            let was = self.claim(owner, c, kind).fetch_sub(1, SeqCst);
            assert!(
                was > 0,
                "test bug: owner {owner} clears {kind} on {c} it never claimed"
            );
        }
    }

    /// Every column of `cols` where another owner claims something that
    /// conflicts with `kind` is a violation. Both sides write their claim
    /// before they read the others' (all `SeqCst`), so of two conflicting
    /// claims at least the later one sees the earlier.
    fn check(&self, owner: usize, cols: Range<usize>, kind: Kind, when: &str) {
        for c in cols {
            for other in (0..self.owners).filter(|&o| o != owner) {
                let x = self.claim(other, c, Kind::Exclusive).load(SeqCst);
                let s = match kind {
                    Kind::Exclusive => self.claim(other, c, Kind::Shared).load(SeqCst),
                    Kind::Shared => 0,
                };
                if x + s > 0 {
                    let n = self.counter(VIOLATIONS).fetch_add(1, SeqCst);
                    if n < 5 {
                        say(&format!(
                            "violation {when}: owner {owner} claims {kind} on {c}, \
                             owner {other} claims {s} shared and {x} exclusive there"
                        ));
                    }
                }
            }
        }
    }

    /// What an owner claims, column by column, at the strongest kind.
    fn row(&self, owner: usize) -> [Option<Kind>; COLS] {
        let mut row = [None; COLS];
        for (c, cell) in row.iter_mut().enumerate() {
            if self.claim(owner, c, Kind::Exclusive).load(SeqCst) > 0 {
                *cell = Some(Kind::Exclusive);
            } else if self.claim(owner, c, Kind::Shared).load(SeqCst) > 0 {
                *cell = Some(Kind::Shared);
            }
        }
        row
    }
}

/// The kernel's list of the locks held through `lf`, as table columns; an
/// `Err` for a lock the table cannot express (past index 16 but not to the
/// end), which no span of this test asks for.
fn kernel_row(lf: &LockFile) -> Result<[Option<Kind>; COLS], String> {
    let mut row = [None; COLS];
    for line in fd_locks(lf) {
        // FAMILY ADVISORY READ|WRITE PID DEV:INO START END|EOF
        let f: Vec<&str> = line.split_whitespace().collect();
        let kind = if f[2] == "WRITE" {
            Kind::Exclusive
        } else {
            Kind::Shared
        };
        let start: u64 = f[5].parse().expect("lock start");
        let last: Option<u64> = f[6].parse().ok();
        if start > LAST || last.is_some_and(|l| l >= LAST) {
            return Err(line);
        }
        for (c, cell) in row.iter_mut().enumerate() {
            let b = c as u64;
            if b >= start && last.is_none_or(|l| b <= l) {
                *cell = Some(kind);
            }
        }
    }
    Ok(row)
}

fn show(row: &[Option<Kind>; COLS]) -> String {
    row.iter()
        .map(|k| match k {
            None => '.',
            Some(Kind::Shared) => 'S',
            Some(Kind::Exclusive) => 'X',
        })
        .collect()
}

/// A handle and the test's own copy of its explicit layer (last call wins).
/// The mutex is held across each explicit call, so calls and copy agree.
struct Handle {
    lf: LockFile,
    explicit: Mutex<[Option<Kind>; COLS]>,
}

/// One owner as seen from the process it lives in.
struct Owner {
    row: usize,
    /// Held shared by a thread for as long as it holds guards; held
    /// exclusively by a thread that acts alone for the owner (the explicit
    /// layers are emptied first), which is when the claims are exact and
    /// when a wait without a deadline cannot deadlock: the owner holds
    /// nothing, so no one waits for it, and whoever it waits for waits
    /// with a deadline or is the one owner holding the `TOKEN`, whose own
    /// wait ends by the same argument.
    gate: RwLock<()>,
    handles: Vec<usize>,
    threads: usize,
}

enum Guard<'a> {
    R(ReadGuard<&'a LockFile>, Sp),
    W(WriteGuard<&'a LockFile>, Sp),
}

struct Worker<'a> {
    t: &'a Table<'a>,
    owner: &'a Owner,
    handles: &'a [Handle],
    h: usize,
    rng: Rng,
    guards: Vec<Guard<'a>>,
    /// Spans of one index nearly always (see [`Sp::random`]).
    narrow: bool,
}

/// Whether a failed acquisition is an allowed refusal; anything else is a
/// failure of the test.
fn refusal(e: &Error) -> bool {
    e.is_contention() || matches!(e, Error::Deadlock)
}

impl<'a> Worker<'a> {
    fn lf(&self) -> &'a LockFile {
        &self.handles[self.h].lf
    }

    fn op(&self) {
        self.t.count(OPS);
    }

    /// Count a refusal, and whether it came over indices the owner held.
    fn refused(&self, sp: Sp) {
        self.t.count(REFUSED);
        let row = self.t.row(self.owner.row);
        if sp.cols().any(|c| row[c].is_some()) {
            self.t.count(REFUSED_OVER_OWN);
        }
    }

    /// Keep a lock a moment, so that others run into it.
    fn hold(&mut self) {
        for _ in 0..self.rng.below(300) {
            std::hint::spin_loop();
        }
        if self.rng.one_in(8) {
            std::thread::yield_now();
        }
    }

    /// A span over what the owner holds, reaching past it on both sides:
    /// the change then raises pieces of mixed kinds at once.
    fn over_own(&mut self) -> Sp {
        let row = self.t.row(self.owner.row);
        let held: Vec<usize> = (0..LAST as usize).filter(|&c| row[c].is_some()).collect();
        if held.is_empty() {
            return Sp::random(&mut self.rng, self.narrow);
        }
        let a = held[self.rng.below(held.len() as u64) as usize] as u64;
        let b = held[self.rng.below(held.len() as u64) as usize] as u64;
        let start = a.min(b).saturating_sub(self.rng.below(3));
        if self.rng.one_in(4) {
            return Sp { start, end: None };
        }
        let end = (a.max(b) + 1 + self.rng.below(4)).min(LAST);
        Sp {
            start,
            end: Some(end),
        }
    }

    fn pick_span(&mut self) -> Sp {
        if self.rng.one_in(if self.narrow { 8 } else { 2 }) {
            self.over_own()
        } else {
            Sp::random(&mut self.rng, self.narrow)
        }
    }

    /// Compare the kernel with the claims; only where this thread acts
    /// alone for its owner.
    fn mirror(&self, what: &str) {
        let want = self.t.row(self.owner.row);
        let got = kernel_row(self.lf());
        if got.as_ref().ok() != Some(&want) {
            let n = self.t.counter(MISMATCHES).fetch_add(1, SeqCst);
            if n < 5 {
                let got = match got {
                    Ok(r) => show(&r),
                    Err(line) => line,
                };
                say(&format!(
                    "kernel differs from the claims of owner {} after {what}: \
                     claims {} kernel {got}",
                    self.owner.row,
                    show(&want)
                ));
            }
        }
    }

    fn new_guard(&mut self, wait: Wait) {
        let sp = self.pick_span();
        let kind = self.rng.kind();
        self.guard(kind, sp, wait);
    }

    /// Take a guard; whether it was had.
    fn guard(&mut self, kind: Kind, sp: Sp, wait: Wait) -> bool {
        let lf = self.lf();
        self.op();
        let g = match kind {
            Kind::Shared => ReadGuard::acquire(lf, sp.span(), wait).map(|g| Guard::R(g, sp)),
            Kind::Exclusive => WriteGuard::acquire(lf, sp.span(), wait).map(|g| Guard::W(g, sp)),
        };
        match g {
            Ok(g) => {
                let kind = match g {
                    Guard::R(..) => Kind::Shared,
                    Guard::W(..) => Kind::Exclusive,
                };
                self.t.mark(self.owner.row, sp.cols(), kind);
                self.guards.push(g);
                self.hold();
                true
            }
            Err(e) if refusal(&e) => {
                self.refused(sp);
                false
            }
            Err(e) => panic!("guard on {sp:?} waiting {wait:?}: {e}"),
        }
    }

    /// The case that once broke: a shared piece, a gap and an exclusive
    /// piece held, then one exclusive change from before the shared piece
    /// to past the exclusive one, which other owners often refuse beyond
    /// the exclusive piece, after the pieces before it were raised. A
    /// refused change must leave every piece as it was.
    fn part_way(&mut self) {
        let p = self.rng.below(LAST - 4);
        let q = p + 2 + self.rng.below(2);
        let shared = Sp {
            start: p,
            end: Some(p + 1),
        };
        let exclusive = Sp {
            start: q,
            end: Some(q + 1),
        };
        let start = p.saturating_sub(self.rng.below(3));
        let wide = Sp {
            start,
            end: (!self.rng.one_in(4)).then(|| (q + 2 + self.rng.below(4)).min(LAST)),
        };
        let held = if self.rng.one_in(2) {
            self.acquire(Kind::Shared, shared, Wait::NonBlocking)
                && self.acquire(Kind::Exclusive, exclusive, Wait::NonBlocking)
        } else {
            self.guard(Kind::Shared, shared, Wait::NonBlocking)
                && self.guard(Kind::Exclusive, exclusive, Wait::NonBlocking)
        };
        if !held {
            return;
        }
        let wait = self.rng.wait();
        if self.rng.one_in(2) {
            self.acquire(Kind::Exclusive, wide, wait);
        } else {
            self.guard(Kind::Exclusive, wide, wait);
        }
    }

    fn drop_guard(&mut self, i: usize) {
        let g = self.guards.swap_remove(i);
        let unlock = self.rng.one_in(2);
        self.op();
        match g {
            Guard::R(g, sp) => {
                self.t.unmark(self.owner.row, sp.cols(), Kind::Shared);
                if unlock {
                    ReadGuard::unlock(g).expect("unlock a read guard");
                }
            }
            Guard::W(g, sp) => {
                self.t.unmark(self.owner.row, sp.cols(), Kind::Exclusive);
                if unlock {
                    WriteGuard::unlock(g).expect("unlock a write guard");
                }
            }
        }
    }

    fn upgrade(&mut self, i: usize) {
        let Guard::R(..) = self.guards[i] else {
            return;
        };
        let Guard::R(g, sp) = self.guards.swap_remove(i) else {
            unreachable!()
        };
        self.op();
        let r = match self.rng.below(3) {
            0 => ReadGuard::try_upgrade(g).map_err(|g| (g, None)),
            _ => {
                let wait = self.rng.wait();
                ReadGuard::upgrade_with(g, wait).map_err(|(g, e)| (g, Some(e)))
            }
        };
        match r {
            Ok(w) => {
                // The shared lock was kept throughout, then became exclusive.
                self.t.mark(self.owner.row, sp.cols(), Kind::Exclusive);
                self.t.unmark(self.owner.row, sp.cols(), Kind::Shared);
                self.guards.push(Guard::W(w, sp));
                self.hold();
            }
            Err((g, e)) => {
                if let Some(e) = e {
                    assert!(refusal(&e), "upgrade of {sp:?}: {e}");
                }
                self.refused(sp);
                self.guards.push(Guard::R(g, sp));
            }
        }
    }

    fn downgrade(&mut self, i: usize) {
        let Guard::W(..) = self.guards[i] else {
            return;
        };
        let Guard::W(g, sp) = self.guards.swap_remove(i) else {
            unreachable!()
        };
        // Claim the weaker kind first, drop the stronger claim before the
        // lock weakens.
        self.t.mark(self.owner.row, sp.cols(), Kind::Shared);
        self.t.unmark(self.owner.row, sp.cols(), Kind::Exclusive);
        self.op();
        self.guards.push(Guard::R(WriteGuard::downgrade(g), sp));
    }

    /// An explicit `acquire`: the last call wins on every index of `sp`.
    fn acquire(&mut self, kind: Kind, sp: Sp, wait: Wait) -> bool {
        let handle = &self.handles[self.h];
        let mut layer = handle.explicit.lock().unwrap();
        let owner = self.owner.row;
        // Indices going from exclusive to shared lose their exclusive claim
        // before the call; a refused call changes nothing, so it comes back.
        let lowered: Vec<usize> = sp
            .cols()
            .filter(|&c| kind == Kind::Shared && layer[c] == Some(Kind::Exclusive))
            .collect();
        for &c in &lowered {
            self.t.unmark(owner, c..c + 1, Kind::Exclusive);
        }
        self.op();
        match handle.lf.acquire(kind, sp.span(), wait) {
            Ok(()) => {
                for c in sp.cols() {
                    match layer[c] {
                        Some(k) if k == kind && !lowered.contains(&c) => {}
                        old => {
                            self.t.mark(owner, c..c + 1, kind);
                            if old == Some(Kind::Shared) {
                                self.t.unmark(owner, c..c + 1, Kind::Shared);
                            }
                            layer[c] = Some(kind);
                        }
                    }
                }
                true
            }
            Err(e) if refusal(&e) => {
                for &c in &lowered {
                    self.t.mark(owner, c..c + 1, Kind::Exclusive);
                }
                drop(layer);
                self.refused(sp);
                false
            }
            Err(e) => panic!("acquire {kind} on {sp:?} waiting {wait:?}: {e}"),
        }
    }

    /// An explicit `release` of `sp`, or of everything.
    fn release(&mut self, h: usize, sp: Option<Sp>) {
        let handle = &self.handles[h];
        let mut layer = handle.explicit.lock().unwrap();
        let cols = sp.map_or(0..COLS, Sp::cols);
        for c in cols {
            if let Some(k) = layer[c].take() {
                self.t.unmark(self.owner.row, c..c + 1, k);
            }
        }
        self.op();
        match sp {
            Some(sp) => handle.lf.release(sp.span()),
            None => handle.lf.release_all(),
        }
        .expect("release");
    }

    /// One random step. `alone`: this thread acts alone for its owner.
    fn step(&mut self, alone: bool) {
        let what = self.rng.below(100);
        let n = self.guards.len();
        let label = match what {
            _ if self.rng.one_in(8) => {
                self.part_way();
                "a change over mixed pieces"
            }
            0..=24 if n < MAX_GUARDS => {
                let wait = self.rng.wait();
                self.new_guard(wait);
                "a guard"
            }
            25..=39 if n > 0 => {
                let i = self.rng.below(n as u64) as usize;
                self.drop_guard(i);
                "dropping a guard"
            }
            40..=51 if n > 0 => {
                let i = self.rng.below(n as u64) as usize;
                self.upgrade(i);
                "an upgrade"
            }
            52..=59 if n > 0 => {
                let i = self.rng.below(n as u64) as usize;
                self.downgrade(i);
                "a downgrade"
            }
            60..=84 => {
                let kind = self.rng.kind();
                let sp = self.pick_span();
                let wait = self.rng.wait();
                if self.acquire(kind, sp, wait) {
                    self.hold();
                }
                "an explicit acquire"
            }
            85..=94 => {
                let sp = Sp::random(&mut self.rng, self.narrow);
                self.release(self.h, Some(sp));
                "an explicit release"
            }
            95..=97 => {
                self.release(self.h, None);
                "release_all"
            }
            _ => {
                self.hold();
                "holding"
            }
        };
        if alone {
            self.mirror(label);
        }
    }

    fn drop_guards(&mut self) {
        while !self.guards.is_empty() {
            self.drop_guard(self.guards.len() - 1);
        }
    }

    /// Some steps among the other threads of the owner.
    fn session(&mut self) {
        let _g = self.owner.gate.read().unwrap();
        // A thread that has its handle to itself acts alone all along.
        let alone = self.owner.threads == 1;
        for _ in 0..1 + self.rng.below(12) {
            self.step(alone);
        }
        self.drop_guards();
        if alone {
            self.mirror("dropping the guards");
        }
    }

    /// Steps with the owner to this thread: the claims are exact, so the
    /// kernel must agree after every step. Starts from nothing held, which
    /// is when a wait without a deadline is safe.
    fn alone(&mut self) {
        let _g = self.owner.gate.write().unwrap();
        for &h in &self.owner.handles {
            self.release(h, None);
        }
        self.mirror("emptying the owner");
        if self.rng.one_in(2) {
            let sp = Sp::random(&mut self.rng, self.narrow);
            let kind = self.rng.kind();
            self.t.count(BLOCKING);
            match self.rng.below(3) {
                0 => {
                    self.op();
                    let g = self.lf().read(sp.span()).expect("blocking read");
                    self.t.mark(self.owner.row, sp.cols(), Kind::Shared);
                    self.guards.push(Guard::R(g, sp));
                }
                1 => {
                    self.op();
                    let g = self.lf().write(sp.span()).expect("blocking write");
                    self.t.mark(self.owner.row, sp.cols(), Kind::Exclusive);
                    self.guards.push(Guard::W(g, sp));
                }
                _ => assert!(self.acquire(kind, sp, Wait::Blocking)),
            }
            self.mirror("a blocking wait");
            self.hold();
        }
        for _ in 0..self.rng.below(16) {
            self.step(true);
        }
        // One owner at a time, across all processes, may also wait without
        // a deadline while it holds locks: whoever it waits for then either
        // waits with a deadline or holds nothing, so is bound to let go.
        if self.rng.one_in(2) {
            let token = self.t.counter(TOKEN);
            if token.compare_exchange(0, 1, SeqCst, SeqCst).is_ok() {
                self.wait_while_holding();
                token.store(0, SeqCst);
            }
        }
        self.drop_guards();
        self.mirror("dropping the guards");
    }

    /// An untimed upgrade, or an untimed change over what the owner holds
    /// (several raises, made and waited for one after the other).
    fn wait_while_holding(&mut self) {
        self.t.count(BLOCKING_HOLDING);
        let read = self.guards.iter().position(|g| matches!(g, Guard::R(..)));
        match (self.rng.below(3), read) {
            (0, Some(i)) => {
                let Guard::R(g, sp) = self.guards.swap_remove(i) else {
                    unreachable!()
                };
                self.op();
                match ReadGuard::upgrade(g) {
                    Ok(w) => {
                        self.t.mark(self.owner.row, sp.cols(), Kind::Exclusive);
                        self.t.unmark(self.owner.row, sp.cols(), Kind::Shared);
                        self.guards.push(Guard::W(w, sp));
                    }
                    Err((g, e)) => {
                        assert!(refusal(&e), "untimed upgrade of {sp:?}: {e}");
                        self.refused(sp);
                        self.guards.push(Guard::R(g, sp));
                    }
                }
            }
            (1, _) => {
                let sp = self.over_own();
                self.op();
                match self.lf().write(sp.span()) {
                    Ok(g) => {
                        self.t.mark(self.owner.row, sp.cols(), Kind::Exclusive);
                        self.guards.push(Guard::W(g, sp));
                    }
                    Err(e) if refusal(&e) => self.refused(sp),
                    Err(e) => panic!("untimed write over {sp:?}: {e}"),
                }
            }
            _ => {
                let sp = self.over_own();
                let kind = self.rng.kind();
                self.acquire(kind, sp, Wait::Blocking);
            }
        }
        self.mirror("a wait without a deadline while holding");
        self.hold();
    }

    fn run(&mut self, until: Instant) {
        while Instant::now() < until {
            if self.rng.one_in(5) {
                self.alone();
            } else {
                self.session();
            }
        }
        // An explicit lock must not outlive the thread that may release
        // it: a wait without a deadline in another process could be
        // waiting for it while this process waits for that one to end.
        // Within the gate: a sibling thread acting alone compares the
        // claims with the table, and this release (claims cleared, then
        // locks let go) must not land between its two reads.
        let _g = self.owner.gate.read().unwrap();
        self.release(self.h, None);
    }
}

/// One forked worker process: `THREADS` threads over its owners.
fn worker(
    t: &Table,
    path: &std::path::Path,
    mode: Mode,
    p: usize,
    seed: u64,
    until: Instant,
    narrow: bool,
) {
    // Process mode: one owner per process, every thread with a handle of
    // its own (they compose). OFD mode: threads 0 and 1 share one handle
    // (one owner of two threads), thread 2 has its own.
    let (owners, handle_of): (Vec<Owner>, [usize; THREADS]) = match mode {
        Mode::Process => (
            vec![Owner {
                row: p,
                gate: RwLock::new(()),
                handles: (0..THREADS).collect(),
                threads: THREADS,
            }],
            [0, 1, 2],
        ),
        Mode::Ofd | Mode::Shm => (
            vec![
                Owner {
                    row: 2 * p,
                    gate: RwLock::new(()),
                    handles: vec![0],
                    threads: 2,
                },
                Owner {
                    row: 2 * p + 1,
                    gate: RwLock::new(()),
                    handles: vec![1],
                    threads: 1,
                },
            ],
            [0, 0, 1],
        ),
        Mode::Flock | Mode::Postgres => {
            unreachable!("the stress table runs on lock files with byte ranges")
        }
    };
    let nhandles = owners.iter().map(|o| o.handles.len()).sum();
    let handles: Vec<Handle> = (0..nhandles)
        .map(|_| Handle {
            lf: open(path, mode),
            explicit: Mutex::new([None; COLS]),
        })
        .collect();
    let owner_of = |h: usize| owners.iter().find(|o| o.handles.contains(&h)).unwrap();

    std::thread::scope(|s| {
        for (th, &h) in handle_of.iter().enumerate() {
            let handles = &handles;
            let owner = owner_of(h);
            s.spawn(move || {
                let r = panic::catch_unwind(AssertUnwindSafe(|| {
                    let mut w = Worker {
                        t,
                        owner,
                        handles,
                        h,
                        rng: Rng::new(seed ^ (((p * THREADS + th) as u64) << 32)),
                        guards: Vec::new(),
                        narrow,
                    };
                    w.run(until);
                    w.drop_guards();
                }));
                if let Err(e) = r {
                    t.count(ERRORS);
                    let msg = e
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    say(&format!("worker {p}.{th} failed: {msg}"));
                }
                t.count(DONE + p);
            });
        }
    });

    // Every thread is done: empty the explicit layers; the kernel must then
    // hold nothing for any owner of this process.
    for o in &owners {
        for &h in &o.handles {
            let mut layer = handles[h].explicit.lock().unwrap();
            for c in 0..COLS {
                if let Some(k) = layer[c].take() {
                    t.unmark(o.row, c..c + 1, k);
                }
            }
            handles[h].lf.release_all().expect("release_all");
        }
        let left = fd_locks(&handles[o.handles[0]].lf);
        if !left.is_empty() {
            say(&format!(
                "owner {} holds after releasing all: {left:?}",
                o.row
            ));
            t.counter(LEFTOVER).fetch_add(left.len() as u64, SeqCst);
        }
    }
}

/// Whether the child has ended, without reaping it (its `join` does).
fn has_ended(c: &Child) -> bool {
    // SAFETY: a zeroed siginfo_t is a valid out-parameter; the child is ours
    // and unreaped.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let r = libc::waitid(
            libc::P_PID,
            c.pid,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        );
        assert_eq!(r, 0, "waitid: {}", std::io::Error::last_os_error());
        info.si_pid() != 0
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn stress(mode: Mode) {
    stress_with(mode, false);
}

/// The same with spans of one index nearly always.
fn stress_narrow(mode: Mode) {
    stress_with(mode, true);
}

fn stress_with(mode: Mode, narrow: bool) {
    let _s = serial();
    let secs: f64 = env_or("LOCKSFILE_STRESS_SECS", 3.0);
    let seed: u64 = env_or("LOCKSFILE_STRESS_SEED", 0x5eed) ^ u64::from(mode == Mode::Process);
    let (_dir, path) = lock_path();
    drop(open(&path, mode)); // create the file before anyone races to
    let owners = match mode {
        Mode::Ofd | Mode::Shm => 2 * PROCS,
        Mode::Process => PROCS,
        Mode::Flock | Mode::Postgres => {
            unreachable!("the stress table runs on lock files with byte ranges")
        }
    };
    let shared = Shared::new(owners * COLS * 2 + COUNTERS + PROCS);
    let t = Table {
        slots: shared.slots(),
        owners,
    };
    let run = Duration::from_secs_f64(secs);
    let until = Instant::now() + run;
    // Generous, for a loaded machine: a worker ends its step a few
    // milliseconds after `until`, unless it is stuck.
    let limit = until + run + Duration::from_secs(10);

    let children: Vec<Child> = (0..PROCS)
        .map(|p| {
            let (t, path) = (&t, &path);
            fork(move || worker(t, path, mode, p, seed, until, narrow))
        })
        .collect();

    let mut hangs = 0;
    let mut ended = Vec::new();
    for (p, mut c) in children.into_iter().enumerate() {
        while !has_ended(&c) && Instant::now() < limit {
            std::thread::sleep(Duration::from_millis(10));
        }
        if has_ended(&c) {
            ended.push(c);
        } else {
            println!(
                "worker {p} (pid {}) stuck; locks on the file: {:?} {:?}",
                c.pid,
                proc_locks(&path),
                locksfile::shm::Snapshot::read(&path)
            );
            c.kill(libc::SIGKILL);
            assert_eq!(c.wait(), Exit::Signal(libc::SIGKILL));
            hangs += (THREADS as u64 - t.get(DONE + p)).max(1);
        }
    }

    // All owners are gone: a fresh one must find the whole file free.
    let probe = open(&path, Mode::Ofd);
    let mut leftover = t.get(LEFTOVER);
    if let Some(h) = probe.conflicts(Kind::Exclusive, 0..).expect("conflicts") {
        println!("left in the kernel: {h}");
        leftover += 1;
    }
    leftover += proc_locks(&path).len() as u64;

    let (ops, violations, mismatches, errors) = (
        t.get(OPS),
        t.get(VIOLATIONS),
        t.get(MISMATCHES),
        t.get(ERRORS),
    );
    // Straight to standard error, past the harness's capture, so that every
    // run (CI's too) shows its figures.
    say(&format!(
        "stress {mode}{}: {ops} operations, {violations} violations, {mismatches} mismatches, \
         {hangs} hangs, {leftover} leftover, {errors} errors \
         ({} refused, {} of them over own locks, untimed waits: {} holding nothing, {} holding locks; {secs} s, seed {seed:#x})",
        if narrow { " (narrow)" } else { "" },
        t.get(REFUSED),
        t.get(REFUSED_OVER_OWN),
        t.get(BLOCKING),
        t.get(BLOCKING_HOLDING),
    ));
    // A child that failed outside its threads reports its panic here.
    for c in ended {
        c.join();
    }
    assert_eq!(violations, 0, "owners held conflicting locks");
    assert_eq!(mismatches, 0, "the kernel disagreed with an owner's claims");
    assert_eq!(hangs, 0, "workers stuck");
    assert_eq!(leftover, 0, "locks left in the kernel");
    assert_eq!(errors, 0, "workers failed");
    // The run must have done its job: many operations, and changes refused
    // part-way over locks the owner held.
    assert!(ops > 1000, "only {ops} operations");
    assert!(
        t.get(REFUSED_OVER_OWN) > 0,
        "no change refused over own locks"
    );
}

mode_tests! { stress => stress }
mode_tests! { stress_narrow => stress_narrow }
