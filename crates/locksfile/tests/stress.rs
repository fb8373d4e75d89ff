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
//! * a *mismatch* is the engine's own list of an owner's locks (the
//!   kernel's, read from `/proc/self/fdinfo`; the shm table's, read from
//!   outside; the server's `pg_locks`, through another session) differing
//!   from that owner's claims, wherever one thread alone acts for the
//!   owner, so the claims are exact. After every wait that ended without
//!   the lock (timed out, cancelled, interrupted, refused, a dropped
//!   future) such a thread compares again: a failed wait holds nothing new.
//!
//! Every way of waiting is used: non-blocking tries, timeouts and deadlines
//! (short, so that many time out), `Wait::DeadlineInterruptible` and
//! `Wait::BlockingInterruptible` (another thread of the worker sends a
//! signal at a random moment), cancellable waits (another thread cancels
//! their `Cancel` at a random moment), and tokio's `read_async` /
//! `write_async` on a current-thread runtime of the worker thread, with a
//! timeout of their own or dropped through `tokio::time::timeout`. A wait
//! that could last forever (no deadline, no cancel, no drop) is only made
//! where that cannot deadlock (OFD locks have no deadlock detection): by an
//! owner that holds nothing (see `Owner::gate`), or by the one owner at a
//! time that holds the `TOKEN` while everyone else waits with a deadline or
//! holds nothing. The summary counts, for each kind of wait, how its waits
//! ended.
//!
//! Modes: OFD, process and shm over indices 0..16 and spans to the end;
//! flock over the whole file alone (every lock is `..`: the oracle claims
//! every column), where a conversion is not atomic (the kernel drops the
//! old lock first, see `Mode::Flock`), so the owner's shared claims are
//! withdrawn for the time of a call that may convert, and a conversion that
//! lost the lock (`Error::ConversionLost`) leaves the owner nothing; and,
//! with the `postgres` feature, PostgreSQL advisory locks on the server of
//! `LOCKSFILE_TEST_PG` (indices 0..16, no spans to the end).
//!
//! Besides: every worker must finish in time (a stuck one is killed and
//! counted as hung), and no lock may be left in the engine at the end.
//!
//! `LOCKSFILE_STRESS_SECS` sets the run time per mode (default 3 s),
//! `LOCKSFILE_STRESS_SEED` the seed. Needs the `tokio` feature:
//! `cargo test -p locksfile --features tokio,postgres --test stress`.

mod common;
#[cfg(feature = "postgres")]
mod pg;

use std::io::Write;
use std::ops::Range;
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use common::{fd_locks, fork, lock_path, open, proc_locks, serial, Child, Exit, Shared};
use locksfile::{Cancel, Error, Kind, LockFile, Mode, ReadGuard, Span, Wait, WriteGuard};

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
/// The most a bounded wait (deadline, cancel or dropped future) ran past
/// its end, in microseconds.
const LATE: usize = 10;
/// How the waits ended: `WAITS + kind * OUTCOMES.len() + outcome`.
const WAITS: usize = 11;
const COUNTERS: usize = WAITS + KINDS.len() * OUTCOMES.len();
/// Then one slot per process: how many of its threads finished.
const DONE: usize = COUNTERS;

/// The kinds of wait, as the summary names them.
const KINDS: [&str; 6] = [
    "non-blocking",
    "timed",
    "interruptible",
    "cancellable",
    "async",
    "untimed",
];
const NB: usize = 0;
const TIMED: usize = 1;
const INTR: usize = 2;
const CANCEL: usize = 3;
const ASYNC: usize = 4;
const UNTIMED: usize = 5;

/// How a wait ended, as the summary names it.
const OUTCOMES: [&str; 8] = [
    "granted",
    "busy",
    "timed out",
    "cancelled",
    "interrupted",
    "deadlock",
    "conversion lost",
    "dropped",
];
const GRANTED: usize = 0;
const DROPPED: usize = 7;

fn outcome_of(e: &Error) -> Option<usize> {
    Some(match e {
        Error::WouldBlock { .. } => 1,
        Error::TimedOut { .. } => 2,
        Error::Cancelled => 3,
        Error::Interrupted => 4,
        Error::Deadlock { .. } => 5,
        Error::ConversionLost { .. } => 6,
        _ => return None,
    })
}

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

    /// A short while: most timed waits and pokes end within it.
    fn short(&mut self) -> Duration {
        Duration::from_micros(self.below(3000))
    }

    /// A wait that is bound to end: no wait at all, a short timeout or
    /// deadline (interruptible or not, with a signal coming now and then),
    /// a wait of any patience whose `Cancel` another thread cancels soon,
    /// or (`futures`: where a guard is taken) a tokio wait with a timeout of
    /// its own or dropped soon.
    fn how(&mut self, futures: bool) -> How {
        let deadline = Instant::now() + self.short();
        match self.below(if futures { 12 } else { 10 }) {
            0 | 1 => How::Plain(Wait::NonBlocking),
            2 => How::Plain(Wait::NonBlockingNoHolder),
            3 => How::Plain(Wait::Timeout(self.short())),
            4 => How::Plain(Wait::Deadline(deadline)),
            5 | 6 => {
                let poke = self.one_in(2).then(|| self.short());
                How::Interruptible(Wait::DeadlineInterruptible(deadline), poke)
            }
            7..=9 => {
                let wait = match self.below(4) {
                    0 => Wait::Blocking,
                    1 => Wait::Timeout(self.short()),
                    2 => Wait::DeadlineInterruptible(deadline),
                    _ => Wait::NonBlocking,
                };
                How::Cancellable(wait, self.short())
            }
            _ => {
                let timeout = self.one_in(2).then(|| self.short());
                let drop_after = match timeout {
                    None => Some(self.short()),
                    Some(_) => self.one_in(2).then(|| self.short()),
                };
                How::Async(timeout, drop_after)
            }
        }
    }

    /// A wait that may last for ever, for where that cannot deadlock.
    fn untimed(&mut self, futures: bool) -> How {
        match self.below(if futures { 5 } else { 4 }) {
            0 | 1 => How::Plain(Wait::Blocking),
            2 => How::Interruptible(
                Wait::BlockingInterruptible,
                self.one_in(2).then(|| self.short()),
            ),
            3 => How::Cancellable(Wait::Blocking, Duration::from_millis(1 + self.below(20))),
            _ => How::Async(None, None),
        }
    }
}

/// When a wait that starts at `start` must end, if it must.
fn deadline(start: Instant, w: Wait) -> Option<Instant> {
    match w {
        Wait::NonBlocking | Wait::NonBlockingNoHolder => Some(start),
        Wait::Timeout(d) => Some(start + d),
        Wait::Deadline(d) | Wait::DeadlineInterruptible(d) => Some(d),
        Wait::Blocking | Wait::BlockingInterruptible => None,
    }
}

/// How a call waits.
#[derive(Clone, Copy, Debug)]
enum How {
    Plain(Wait),
    /// An interruptible wait, and a signal to the thread after a while.
    Interruptible(Wait, Option<Duration>),
    /// The `_cancellable` call, cancelled from another thread after a while.
    Cancellable(Wait, Duration),
    /// `read_async` / `write_async` with this timeout, the future dropped
    /// (through `tokio::time::timeout`) after a while.
    Async(Option<Duration>, Option<Duration>),
}

impl How {
    fn kind(self) -> usize {
        match self {
            How::Plain(Wait::NonBlocking | Wait::NonBlockingNoHolder) => NB,
            How::Plain(Wait::Blocking) => UNTIMED,
            How::Plain(_) => TIMED,
            How::Interruptible(..) => INTR,
            How::Cancellable(..) => CANCEL,
            How::Async(..) => ASYNC,
        }
    }
}

/// Another thread of the worker process that cancels waits and interrupts
/// them with a signal at the moments asked for.
struct Poker {
    state: Mutex<Pokes>,
    cv: Condvar,
}

#[derive(Default)]
struct Pokes {
    next: u64,
    due: Vec<(u64, Instant, Poke)>,
    stop: bool,
}

enum Poke {
    Cancel(Cancel),
    Signal(libc::pthread_t),
}

/// The signal that interrupts waits (a handler without `SA_RESTART`).
const POKE_SIGNAL: i32 = libc::SIGUSR1;

extern "C" fn on_poke(_: libc::c_int) {}

fn install_poke_handler() {
    // SAFETY: a zeroed sigaction with a do-nothing handler and no flags
    // (so no SA_RESTART: interrupted calls fail with EINTR).
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_poke as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::sigemptyset(&mut sa.sa_mask);
        let r = libc::sigaction(POKE_SIGNAL, &sa, std::ptr::null_mut());
        assert_eq!(r, 0, "sigaction: {}", std::io::Error::last_os_error());
    }
}

impl Poker {
    fn new() -> Poker {
        Poker {
            state: Mutex::new(Pokes::default()),
            cv: Condvar::new(),
        }
    }

    /// Do `poke` after `after`, unless disarmed first.
    fn arm(&self, after: Duration, poke: Poke) -> u64 {
        let mut s = self.state.lock().unwrap();
        s.next += 1;
        let id = s.next;
        s.due.push((id, Instant::now() + after, poke));
        self.cv.notify_one();
        id
    }

    /// No poke of `id` from now on (a signal is sent under the same mutex,
    /// so none reaches the thread after this).
    fn disarm(&self, id: u64) {
        self.state.lock().unwrap().due.retain(|(i, ..)| *i != id);
    }

    fn stop(&self) {
        self.state.lock().unwrap().stop = true;
        self.cv.notify_one();
    }

    fn run(&self) {
        let mut s = self.state.lock().unwrap();
        while !s.stop {
            let now = Instant::now();
            s.due.retain(|(_, at, poke)| {
                if *at > now {
                    return true;
                }
                match poke {
                    Poke::Cancel(c) => c.cancel(),
                    // SAFETY: the thread is alive: it disarms (under this
                    // mutex) before it returns from the wait.
                    Poke::Signal(t) => unsafe {
                        libc::pthread_kill(*t, POKE_SIGNAL);
                    },
                }
                false
            });
            let next = s.due.iter().map(|(_, at, _)| *at).min();
            let sleep = next.map_or(Duration::from_millis(100), |at| {
                at.saturating_duration_since(Instant::now())
            });
            s = self.cv.wait_timeout(s, sleep).unwrap().0;
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
    /// The whole index space, the only span in flock mode.
    const ALL: Sp = Sp {
        start: 0,
        end: None,
    };

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

/// The spans a mode's workload uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// Any span over 0..16 and to the end.
    Ranges,
    /// Nearly always one index (in shm mode, the fast lane's work, with a
    /// wide span now and then to shut and open its gate).
    Narrow,
    /// Only `..` (flock mode).
    Whole,
    /// Spans within 0..16, none to the end (PostgreSQL: at most 4096 keys).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    Bounded,
}

impl Shape {
    fn to_end(self) -> bool {
        matches!(self, Shape::Ranges | Shape::Narrow)
    }

    fn random(self, rng: &mut Rng) -> Sp {
        if self == Shape::Whole {
            return Sp::ALL;
        }
        let narrow = self == Shape::Narrow;
        let start = rng.below(LAST);
        if self.to_end() && rng.one_in(if narrow { 64 } else { 8 }) {
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

    fn count_wait(&self, kind: usize, outcome: usize) {
        self.count(WAITS + kind * OUTCOMES.len() + outcome);
    }

    /// How each kind of wait ended, for the summary.
    fn waits(&self) -> String {
        let mut parts = Vec::new();
        for (k, name) in KINDS.iter().enumerate() {
            let ends: Vec<String> = OUTCOMES
                .iter()
                .enumerate()
                .filter_map(|(o, what)| {
                    let n = self.get(WAITS + k * OUTCOMES.len() + o);
                    (n > 0).then(|| format!("{n} {what}"))
                })
                .collect();
            if !ends.is_empty() {
                parts.push(format!("{name}: {}", ends.join(", ")));
            }
        }
        parts.join("; ")
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

    /// Withdraw every `kind` claim of `owner` (one thread acts alone for
    /// it); what [`Table::restore`] puts back.
    fn withdraw(&self, owner: usize, kind: Kind) -> [u64; COLS] {
        let mut saved = [0; COLS];
        for (c, n) in saved.iter_mut().enumerate() {
            *n = self.claim(owner, c, kind).swap(0, SeqCst);
        }
        saved
    }

    /// Put withdrawn claims back (the locks are held again), then look
    /// for conflicts.
    fn restore(&self, owner: usize, kind: Kind, saved: [u64; COLS]) {
        for (c, n) in saved.iter().enumerate() {
            self.claim(owner, c, kind).fetch_add(*n, SeqCst);
        }
        let cols: Vec<usize> = (0..COLS).filter(|&c| saved[c] > 0).collect();
        for c in cols {
            self.check(owner, c..c + 1, kind, "after restoring");
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

type Row = [Option<Kind>; COLS];

/// The kernel's list of the locks held through `lf`, as table columns; an
/// `Err` for a lock the table cannot express (past index 16 but not to the
/// end), which no span of this test asks for.
fn kernel_row(lf: &LockFile) -> Result<Row, String> {
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

/// The server's list (`pg_locks`, read through `probe`, another session)
/// of the locks the session with backend pid `backend` holds, as table
/// columns.
#[cfg(feature = "postgres")]
fn server_row(probe: &LockFile, backend: u32) -> Result<Row, String> {
    let mut row = [None; COLS];
    let locks = probe
        .server_locks()
        .map_err(|e| format!("server_locks: {e}"))?;
    for l in locks {
        let h = l.holder;
        if !l.granted || h.server.map(|s| s.backend_pid) != Some(backend) {
            continue;
        }
        let i = h.span.start();
        if h.span.end() != i + 1 || i >= LAST {
            return Err(format!("{h}"));
        }
        let cell = &mut row[i as usize];
        if *cell != Some(Kind::Exclusive) {
            *cell = Some(h.kind);
        }
    }
    Ok(row)
}

fn show(row: &Row) -> String {
    row.iter()
        .map(|k| match k {
            None => '.',
            Some(Kind::Shared) => 'S',
            Some(Kind::Exclusive) => 'X',
        })
        .collect()
}

/// Where the locks live.
#[derive(Clone, Debug)]
enum Place {
    File(PathBuf),
    /// A PostgreSQL target (with its `name=`).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    Server(String),
}

impl Place {
    fn open(&self, mode: Mode) -> LockFile {
        match self {
            Place::File(path) => open(path, mode),
            #[cfg(feature = "postgres")]
            Place::Server(target) => pg::connect(target),
            #[cfg(not(feature = "postgres"))]
            Place::Server(_) => unreachable!("server targets need the postgres feature"),
        }
    }
}

/// A handle and the test's own copy of its explicit layer (last call wins).
/// The mutex is held across each explicit call, so calls and copy agree.
struct Handle {
    lf: Arc<LockFile>,
    explicit: Mutex<Row>,
    /// PostgreSQL: the backend pid of the handle's session.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    backend: u32,
}

/// The engine's own view of what an owner holds.
struct View {
    /// PostgreSQL: a session of its own that reads `pg_locks`.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    probe: Option<LockFile>,
}

impl View {
    /// PostgreSQL: the backend pid of `lf`'s session, found by a lock of
    /// its own past the table (`row` tells the owners apart).
    fn backend(&self, lf: &LockFile, row: usize) -> u32 {
        match &self.probe {
            None => 0,
            #[cfg(feature = "postgres")]
            Some(probe) => {
                let i = 1000 + row as u64;
                lf.acquire(Kind::Exclusive, i, Wait::NonBlocking)
                    .expect("a lock of its own");
                let holder = probe.conflicts(Kind::Exclusive, i).expect("conflicts");
                lf.release(i).expect("release");
                holder
                    .and_then(|h| h.server)
                    .expect("the server names the session")
                    .backend_pid
            }
            #[cfg(not(feature = "postgres"))]
            Some(_) => {
                let _ = (lf, row);
                unreachable!()
            }
        }
    }

    fn row(&self, h: &Handle) -> Result<Row, String> {
        match &self.probe {
            None => kernel_row(&h.lf),
            #[cfg(feature = "postgres")]
            Some(probe) => server_row(probe, h.backend),
            #[cfg(not(feature = "postgres"))]
            Some(_) => unreachable!(),
        }
    }
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

enum Guard {
    R(ReadGuard<Arc<LockFile>>, Sp),
    W(WriteGuard<Arc<LockFile>>, Sp),
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a tokio runtime")
}

struct Worker<'a> {
    t: &'a Table<'a>,
    owner: &'a Owner,
    handles: &'a [Handle],
    view: &'a View,
    poker: &'a Poker,
    h: usize,
    rng: Rng,
    guards: Vec<Guard>,
    shape: Shape,
    /// This thread acts alone for its owner right now.
    alone: bool,
    /// A conversion lost the owner's lock (flock mode): every holder of the
    /// owner must let go.
    lost: bool,
    /// The runtime of this thread's async waits.
    rt: Option<tokio::runtime::Runtime>,
    /// A dropped future's wait may still be ending on the runtime's pool.
    orphans: bool,
    /// Whether tokio waits are made.
    futures: bool,
}

impl Worker<'_> {
    fn lf(&self) -> &Arc<LockFile> {
        &self.handles[self.h].lf
    }

    fn op(&self) {
        self.t.count(OPS);
    }

    fn whole(&self) -> bool {
        self.shape == Shape::Whole
    }

    fn random_span(&mut self) -> Sp {
        self.shape.random(&mut self.rng)
    }

    /// A kind to ask for. In flock mode a thread that shares its owner asks
    /// for shared locks only: an exclusive one would convert the shared
    /// lock its siblings' claims stand on, which flock(2) drops for a
    /// moment (see [`Worker::converting`]).
    fn pick_kind(&mut self) -> Kind {
        let kind = self.rng.kind();
        if self.whole() && !self.alone {
            Kind::Shared
        } else {
            kind
        }
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
        if self.whole() {
            return Sp::ALL;
        }
        let row = self.t.row(self.owner.row);
        let held: Vec<usize> = (0..LAST as usize).filter(|&c| row[c].is_some()).collect();
        if held.is_empty() {
            return self.random_span();
        }
        let a = held[self.rng.below(held.len() as u64) as usize] as u64;
        let b = held[self.rng.below(held.len() as u64) as usize] as u64;
        let start = a.min(b).saturating_sub(self.rng.below(3));
        if self.shape.to_end() && self.rng.one_in(4) {
            return Sp { start, end: None };
        }
        let end = (a.max(b) + 1 + self.rng.below(4)).min(LAST);
        Sp {
            start,
            end: Some(end),
        }
    }

    fn pick_span(&mut self) -> Sp {
        if self
            .rng
            .one_in(if self.shape == Shape::Narrow { 8 } else { 2 })
        {
            self.over_own()
        } else {
            self.random_span()
        }
    }

    /// Compare the engine with the claims; only where this thread acts
    /// alone for its owner.
    fn mirror(&self, what: &str) {
        let want = self.t.row(self.owner.row);
        let got = self.view.row(&self.handles[self.h]);
        if got.as_ref().ok() != Some(&want) {
            self.mismatch(what, &want, got);
        }
    }

    fn mismatch(&self, what: &str, want: &Row, got: Result<Row, String>) {
        let n = self.t.counter(MISMATCHES).fetch_add(1, SeqCst);
        if n < 5 {
            let got = match got {
                Ok(r) => show(&r),
                Err(line) => line,
            };
            say(&format!(
                "engine differs from the claims of owner {} after {what}: \
                 claims {} engine {got}",
                self.owner.row,
                show(want)
            ));
        }
    }

    /// Wait for the waits of dropped futures to end (they are cancelled,
    /// and a lock got meanwhile is let go on the runtime's pool): a new
    /// runtime, the old one dropped, which waits for its pool.
    fn reap(&mut self) {
        if self.orphans {
            self.rt = None;
            self.rt = Some(runtime());
            self.orphans = false;
        }
    }

    /// Whether asking for `kind` over everything may convert the owner's
    /// shared lock in flock mode: flock(2) drops the old lock before it
    /// asks for the new one, so a refused upgrade holds nothing for a
    /// moment (and `Error::ConversionLost` if another owner got in). The
    /// owner's shared claims are withdrawn for the call, then: only a
    /// thread acting alone for its owner converts (see `pick_kind`), so
    /// they are all its own.
    fn converting(&self, kind: Kind) -> Option<[u64; COLS]> {
        if !self.whole() || kind != Kind::Exclusive {
            return None;
        }
        assert!(
            self.alone,
            "test bug: a conversion in flock mode among siblings"
        );
        let row = self.t.row(self.owner.row);
        (row[0] == Some(Kind::Shared)).then(|| self.t.withdraw(self.owner.row, Kind::Shared))
    }

    /// After a call that may have converted: the shared claims come back,
    /// unless the conversion lost the lock.
    fn converted(&mut self, saved: Option<[u64; COLS]>, r: Result<(), &Error>) {
        let Some(saved) = saved else { return };
        if let Err(Error::ConversionLost { .. }) = r {
            self.lost = true;
        } else {
            self.t.restore(self.owner.row, Kind::Shared, saved);
        }
    }

    /// After a lost conversion: the owner holds nothing, whatever its
    /// holders say (their claims are withdrawn already); every holder lets
    /// go, without clearing claims.
    fn abandon(&mut self) {
        if !self.lost {
            return;
        }
        self.lost = false;
        self.guards.clear();
        let handle = &self.handles[self.h];
        let mut layer = handle.explicit.lock().unwrap();
        *layer = [None; COLS];
        handle
            .lf
            .release_all()
            .expect("release_all after a lost conversion");
        drop(layer);
        self.mirror("a lost conversion");
    }

    /// Run a synchronous call as `how` says: with a signal or a cancel
    /// armed on the poker for its time. `f` gets the wait and the cancel.
    fn call<T>(&self, how: How, f: impl FnOnce(Wait, Option<&Cancel>) -> T) -> T {
        let start = Instant::now();
        let end = match how {
            How::Plain(w) | How::Interruptible(w, _) => deadline(start, w),
            How::Cancellable(w, after) => {
                Some(deadline(start, w).map_or(start + after, |d| d.min(start + after)))
            }
            How::Async(..) => None,
        };
        let r = self.call_as(how, f);
        self.late(end, how);
        r
    }

    /// Count how far past `end` this is; say so past a quarter second.
    fn late(&self, end: Option<Instant>, how: How) {
        if let Some(end) = end {
            let us = Instant::now().saturating_duration_since(end).as_micros() as u64;
            self.t.counter(LATE).fetch_max(us, SeqCst);
            if us > 250_000 {
                say(&format!(
                    "owner {}: a wait ended {:.1} ms past its end, waiting {how:?}",
                    self.owner.row,
                    us as f64 / 1000.0
                ));
            }
        }
    }

    fn call_as<T>(&self, how: How, f: impl FnOnce(Wait, Option<&Cancel>) -> T) -> T {
        match how {
            How::Plain(w) => f(w, None),
            How::Interruptible(w, poke) => {
                // SAFETY: plain call.
                let me = unsafe { libc::pthread_self() };
                let id = poke.map(|d| self.poker.arm(d, Poke::Signal(me)));
                let r = f(w, None);
                if let Some(id) = id {
                    self.poker.disarm(id);
                }
                r
            }
            How::Cancellable(w, after) => {
                let cancel = Cancel::new();
                let id = self.poker.arm(after, Poke::Cancel(cancel.clone()));
                let r = f(w, Some(&cancel));
                self.poker.disarm(id);
                r
            }
            How::Async(..) => unreachable!("async waits take guards"),
        }
    }

    /// Count how a wait ended; whether the lock was had. A refusal of any
    /// kind changes nothing; any other error fails the test.
    fn ended(&mut self, how: How, sp: Sp, r: Result<(), &Error>, what: &str) -> bool {
        match r {
            Ok(()) => {
                self.t.count_wait(how.kind(), GRANTED);
                true
            }
            Err(e) => {
                let Some(outcome) = outcome_of(e) else {
                    panic!("{what} on {sp:?} waiting {how:?}: {e}");
                };
                if matches!(e, Error::ConversionLost { .. }) {
                    assert!(
                        self.lost,
                        "{what} on {sp:?} waiting {how:?}: {e} from a call that converts nothing"
                    );
                }
                self.t.count_wait(how.kind(), outcome);
                self.refused(sp);
                false
            }
        }
    }

    fn new_guard(&mut self) {
        let sp = self.pick_span();
        let kind = self.pick_kind();
        let how = self.rng.how(self.futures);
        self.guard(kind, sp, how);
    }

    /// Take a guard; whether it was had.
    fn guard(&mut self, kind: Kind, sp: Sp, how: How) -> bool {
        if let How::Async(timeout, drop_after) = how {
            return self.async_guard(kind, sp, timeout, drop_after);
        }
        let lf = Arc::clone(self.lf());
        self.op();
        let saved = self.converting(kind);
        let g = self.call(how, |w, c| match (kind, c) {
            (Kind::Shared, None) => ReadGuard::acquire(lf, sp.span(), w).map(|g| Guard::R(g, sp)),
            (Kind::Shared, Some(c)) => {
                ReadGuard::acquire_cancellable(lf, sp.span(), w, c).map(|g| Guard::R(g, sp))
            }
            (Kind::Exclusive, None) => {
                WriteGuard::acquire(lf, sp.span(), w).map(|g| Guard::W(g, sp))
            }
            (Kind::Exclusive, Some(c)) => {
                WriteGuard::acquire_cancellable(lf, sp.span(), w, c).map(|g| Guard::W(g, sp))
            }
        });
        self.converted(saved, g.as_ref().map(|_| ()));
        if !self.ended(how, sp, g.as_ref().map(|_| ()), "a guard") {
            return false;
        }
        self.t.mark(self.owner.row, sp.cols(), kind);
        self.guards.push(g.unwrap());
        self.hold();
        true
    }

    /// A guard through `read_async` / `write_async`, on this thread's
    /// runtime; the future dropped after `drop_after` if still waiting.
    fn async_guard(
        &mut self,
        kind: Kind,
        sp: Sp,
        mut timeout: Option<Duration>,
        mut drop_after: Option<Duration>,
    ) -> bool {
        let how = How::Async(timeout, drop_after);
        let saved = self.converting(kind);
        // A conversion must report how it ended (a lost one above all),
        // which a dropped future cannot: it times out instead.
        if saved.is_some() {
            if let Some(d) = drop_after.take() {
                timeout = Some(timeout.map_or(d, |t| t.min(d)));
            }
        }
        let lf = Arc::clone(self.lf());
        let span = sp.span();
        self.op();
        let start = Instant::now();
        let end = timeout
            .into_iter()
            .chain(drop_after)
            .min()
            .map(|d| start + d);
        let rt = self.rt.as_ref().expect("a runtime");
        let got: Option<Result<Guard, Error>> = rt.block_on(async move {
            match kind {
                Kind::Shared => {
                    let f = lf.read_async(span, timeout);
                    match drop_after {
                        Some(d) => tokio::time::timeout(d, f).await.ok(),
                        None => Some(f.await),
                    }
                    .map(|r| r.map(|g| Guard::R(g, sp)))
                }
                Kind::Exclusive => {
                    let f = lf.write_async(span, timeout);
                    match drop_after {
                        Some(d) => tokio::time::timeout(d, f).await.ok(),
                        None => Some(f.await),
                    }
                    .map(|r| r.map(|g| Guard::W(g, sp)))
                }
            }
        });
        self.late(end, how);
        let Some(g) = got else {
            // Dropped while waiting: nothing held (once its wait has ended).
            self.t.count_wait(ASYNC, DROPPED);
            self.refused(sp);
            self.orphans = true;
            if self.alone {
                self.reap();
            }
            return false;
        };
        self.converted(saved, g.as_ref().map(|_| ()));
        if !self.ended(how, sp, g.as_ref().map(|_| ()), "an async guard") {
            return false;
        }
        self.t.mark(self.owner.row, sp.cols(), kind);
        self.guards.push(g.unwrap());
        self.hold();
        true
    }

    /// The case that once broke: a shared piece, a gap and an exclusive
    /// piece held, then one exclusive change from before the shared piece
    /// to past the exclusive one, which other owners often refuse beyond
    /// the exclusive piece, after the pieces before it were raised. A
    /// refused change must leave every piece as it was.
    fn part_way(&mut self) {
        if self.whole() {
            return;
        }
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
            end: (!self.shape.to_end() || !self.rng.one_in(4))
                .then(|| (q + 2 + self.rng.below(4)).min(LAST)),
        };
        let nb = How::Plain(Wait::NonBlocking);
        let held = if self.rng.one_in(2) {
            self.acquire(Kind::Shared, shared, nb) && self.acquire(Kind::Exclusive, exclusive, nb)
        } else {
            self.guard(Kind::Shared, shared, nb) && self.guard(Kind::Exclusive, exclusive, nb)
        };
        if !held {
            return;
        }
        if self.rng.one_in(2) {
            let how = self.rng.how(false);
            self.acquire(Kind::Exclusive, wide, how);
        } else {
            let how = self.rng.how(self.futures);
            self.guard(Kind::Exclusive, wide, how);
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

    /// Upgrade read guard `i` waiting as `how` says (`None`: `try_upgrade`).
    #[allow(clippy::result_large_err)] // a refused upgrade hands its guard back
    fn upgrade(&mut self, i: usize, how: Option<How>) {
        let Guard::R(..) = self.guards[i] else {
            return;
        };
        if self.whole() && !self.alone {
            // See `pick_kind`.
            return;
        }
        let Guard::R(g, sp) = self.guards.swap_remove(i) else {
            unreachable!()
        };
        self.op();
        let saved = self.converting(Kind::Exclusive);
        let (r, how) = match how {
            // `try_upgrade` gives the guard back without the error, so a
            // conversion it lost in flock mode (`Error::ConversionLost`:
            // the guard then holds nothing) would go unnoticed by the test
            // as by any caller: there, `upgrade_with` tries instead.
            None if self.whole() => (
                ReadGuard::upgrade_with(g, Wait::NonBlockingNoHolder),
                How::Plain(Wait::NonBlockingNoHolder),
            ),
            None => (
                ReadGuard::try_upgrade(g).map_err(|g| {
                    (
                        g,
                        Error::WouldBlock {
                            holder: None,
                            at: None,
                        },
                    )
                }),
                How::Plain(Wait::NonBlockingNoHolder),
            ),
            Some(how) => (
                self.call(how, |w, c| match c {
                    None => ReadGuard::upgrade_with(g, w),
                    Some(c) => ReadGuard::upgrade_cancellable(g, w, c),
                }),
                how,
            ),
        };
        self.converted(saved, r.as_ref().map(|_| ()).map_err(|(_, e)| e));
        let ok = self.ended(
            how,
            sp,
            r.as_ref().map(|_| ()).map_err(|(_, e)| e),
            "an upgrade",
        );
        match r {
            Ok(w) => {
                assert!(ok);
                // The shared lock was kept throughout, then became exclusive.
                self.t.mark(self.owner.row, sp.cols(), Kind::Exclusive);
                self.t.unmark(self.owner.row, sp.cols(), Kind::Shared);
                self.guards.push(Guard::W(w, sp));
                self.hold();
            }
            Err((g, Error::ConversionLost { .. })) => {
                // Its claim went with the others (see `abandon`).
                drop(g);
            }
            Err((g, _)) => self.guards.push(Guard::R(g, sp)),
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
    fn acquire(&mut self, kind: Kind, sp: Sp, how: How) -> bool {
        let handles = self.handles;
        let handle = &handles[self.h];
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
        let saved = self.converting(kind);
        let r = self.call(how, |w, c| match c {
            None => handle.lf.acquire(kind, sp.span(), w),
            Some(c) => handle.lf.acquire_cancellable(kind, sp.span(), w, c),
        });
        self.converted(saved, r.as_ref().copied());
        if self.ended(how, sp, r.as_ref().copied(), "an explicit acquire") {
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
        } else {
            if !self.lost {
                for &c in &lowered {
                    self.t.mark(owner, c..c + 1, Kind::Exclusive);
                }
            }
            false
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

    /// One random step.
    fn step(&mut self) {
        let what = self.rng.below(100);
        let n = self.guards.len();
        let label = match what {
            _ if self.rng.one_in(8) => {
                self.part_way();
                "a change over mixed pieces"
            }
            0..=24 if n < MAX_GUARDS => {
                self.new_guard();
                "a guard"
            }
            25..=39 if n > 0 => {
                let i = self.rng.below(n as u64) as usize;
                self.drop_guard(i);
                "dropping a guard"
            }
            40..=51 if n > 0 => {
                let i = self.rng.below(n as u64) as usize;
                let how = (!self.rng.one_in(3)).then(|| self.rng.how(false));
                self.upgrade(i, how);
                "an upgrade"
            }
            52..=59 if n > 0 => {
                let i = self.rng.below(n as u64) as usize;
                self.downgrade(i);
                "a downgrade"
            }
            60..=84 => {
                let kind = self.pick_kind();
                let sp = self.pick_span();
                let how = self.rng.how(false);
                if self.acquire(kind, sp, how) {
                    self.hold();
                }
                "an explicit acquire"
            }
            85..=94 => {
                let sp = self.random_span();
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
        self.abandon();
        if self.alone {
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
        self.alone = self.owner.threads == 1;
        for _ in 0..1 + self.rng.below(12) {
            self.step();
        }
        self.drop_guards();
        // No wait of this thread may go on past the gate.
        self.reap();
        if self.alone {
            self.mirror("dropping the guards");
        }
        self.alone = false;
    }

    /// Steps with the owner to this thread: the claims are exact, so the
    /// engine must agree after every step. Starts from nothing held, which
    /// is when a wait without a deadline is safe.
    fn alone(&mut self) {
        let _g = self.owner.gate.write().unwrap();
        self.alone = true;
        for &h in &self.owner.handles {
            self.release(h, None);
        }
        self.mirror("emptying the owner");
        if self.rng.one_in(2) {
            let sp = self.random_span();
            let kind = self.rng.kind();
            let how = self.rng.untimed(self.futures);
            self.t.count(BLOCKING);
            match self.rng.below(3) {
                0 => {
                    // The plain calls, whose guards borrow the handle: held
                    // for this step only.
                    let handles = self.handles;
                    let lf = &handles[self.h].lf;
                    let (owner, cols) = (self.owner.row, sp.cols());
                    self.op();
                    let got = match kind {
                        Kind::Shared => lf.read(sp.span()).map(|g| (Some(g), None)),
                        Kind::Exclusive => lf.write(sp.span()).map(|g| (None, Some(g))),
                    };
                    let plain = How::Plain(Wait::Blocking);
                    let e = got.as_ref().map(|_| ());
                    if self.ended(plain, sp, e, "a blocking read or write") {
                        self.t.mark(owner, cols.clone(), kind);
                        self.mirror("a blocking read or write");
                        self.hold();
                        self.t.unmark(owner, cols, kind);
                    }
                    drop(got);
                }
                1 => {
                    self.guard(kind, sp, how);
                }
                _ => {
                    let how = if matches!(how, How::Async(..)) {
                        How::Plain(Wait::Blocking)
                    } else {
                        how
                    };
                    self.acquire(kind, sp, how);
                }
            }
            self.mirror("a wait without a deadline");
            self.hold();
        }
        for _ in 0..self.rng.below(16) {
            self.step();
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
        self.reap();
        self.mirror("dropping the guards");
        self.alone = false;
    }

    /// An untimed upgrade, or an untimed change over what the owner holds
    /// (several raises, made and waited for one after the other).
    fn wait_while_holding(&mut self) {
        self.t.count(BLOCKING_HOLDING);
        let read = self.guards.iter().position(|g| matches!(g, Guard::R(..)));
        let how = self.rng.untimed(self.futures);
        match (self.rng.below(3), read) {
            (0, Some(i)) => {
                let how = if matches!(how, How::Async(..)) {
                    How::Plain(Wait::Blocking)
                } else {
                    how
                };
                self.upgrade(i, Some(how));
            }
            (1, _) => {
                let sp = self.over_own();
                self.guard(Kind::Exclusive, sp, how);
            }
            _ => {
                let sp = self.over_own();
                let kind = self.rng.kind();
                let how = if matches!(how, How::Async(..)) {
                    How::Plain(Wait::Blocking)
                } else {
                    how
                };
                self.acquire(kind, sp, how);
            }
        }
        self.abandon();
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
fn worker(t: &Table, place: &Place, mode: Mode, p: usize, seed: u64, until: Instant, shape: Shape) {
    install_poke_handler();
    // Process mode: one owner per process, every thread with a handle of
    // its own (they compose). Other modes: threads 0 and 1 share one
    // handle (one owner of two threads), thread 2 has its own.
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
        _ => (
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
    };
    let nhandles = owners.iter().map(|o| o.handles.len()).sum();
    let view = View {
        probe: matches!(place, Place::Server(_)).then(|| place.open(mode)),
    };
    let owner_of = |h: usize| owners.iter().find(|o| o.handles.contains(&h)).unwrap();
    let handles: Vec<Handle> = (0..nhandles)
        .map(|h| {
            let lf = Arc::new(place.open(mode));
            let backend = view.backend(&lf, owner_of(h).row);
            Handle {
                lf,
                explicit: Mutex::new([None; COLS]),
                backend,
            }
        })
        .collect();
    let poker = Poker::new();

    std::thread::scope(|s| {
        s.spawn(|| poker.run());
        let threads: Vec<_> = handle_of
            .iter()
            .enumerate()
            .map(|(th, &h)| {
                let (handles, view, poker) = (&handles, &view, &poker);
                let owner = owner_of(h);
                s.spawn(move || {
                    let r = panic::catch_unwind(AssertUnwindSafe(|| {
                        let mut w = Worker {
                            t,
                            owner,
                            handles,
                            view,
                            poker,
                            h,
                            rng: Rng::new(seed ^ (((p * THREADS + th) as u64) << 32)),
                            guards: Vec::new(),
                            shape,
                            alone: false,
                            lost: false,
                            rt: Some(runtime()),
                            orphans: false,
                            futures: true,
                        };
                        w.run(until);
                        w.drop_guards();
                        w.reap();
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
                })
            })
            .collect();
        for th in threads {
            let _ = th.join();
        }
        poker.stop();
    });

    // Every thread is done: empty the explicit layers; the engine must then
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
        let left = view.row(&handles[o.handles[0]]);
        if left != Ok([None; COLS]) {
            say(&format!(
                "owner {} holds after releasing all: {left:?}",
                o.row
            ));
            t.count(LEFTOVER);
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
    let (_dir, path) = lock_path();
    stress_with(mode, &Place::File(path), Shape::Ranges);
}

/// The same with spans of one index nearly always.
fn stress_narrow(mode: Mode) {
    let (_dir, path) = lock_path();
    stress_with(mode, &Place::File(path), Shape::Narrow);
}

/// What is left in the engine once every owner is gone, seen from a fresh
/// handle (and `/proc/locks` for a file).
fn left_over(mode: Mode, place: &Place) -> u64 {
    match place {
        Place::File(path) => {
            let probe = open(path, Mode::Ofd);
            let mut n = 0;
            if let Some(h) = probe.conflicts(Kind::Exclusive, 0..).expect("conflicts") {
                println!("left in the kernel: {h}");
                n += 1;
            }
            if mode == Mode::Flock {
                let f = LockFile::options()
                    .mode(Mode::Flock)
                    .open(path)
                    .expect("open in flock mode");
                let taken = f.try_write(..).map(drop);
                if let Err(e) = taken {
                    println!("left in the kernel (flock): {e}");
                    n += 1;
                }
            }
            n + proc_locks(path).len() as u64
        }
        #[cfg(feature = "postgres")]
        Place::Server(target) => {
            let locks = pg::connect(target).server_locks().expect("server_locks");
            for l in &locks {
                println!("left on the server: {:?}", l);
            }
            locks.len() as u64
        }
        #[cfg(not(feature = "postgres"))]
        Place::Server(_) => unreachable!(),
    }
}

fn stress_with(mode: Mode, place: &Place, shape: Shape) {
    let _s = serial();
    let secs: f64 = env_or("LOCKSFILE_STRESS_SECS", 3.0);
    let seed: u64 = env_or("LOCKSFILE_STRESS_SEED", 0x5eed)
        ^ match mode {
            Mode::Process => 1,
            Mode::Flock => 2,
            Mode::Postgres => 3,
            _ => 0,
        };
    if let Place::File(path) = place {
        drop(open(path, mode)); // create the file before anyone races to
    }
    let owners = match mode {
        Mode::Process => PROCS,
        _ => 2 * PROCS,
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
            let t = &t;
            fork(move || worker(t, place, mode, p, seed, until, shape))
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
            match place {
                Place::File(path) => println!(
                    "worker {p} (pid {}) stuck; locks on the file: {:?} {:?}",
                    c.pid,
                    proc_locks(path),
                    locksfile::shm::Snapshot::read(path)
                ),
                #[cfg(feature = "postgres")]
                Place::Server(target) => println!(
                    "worker {p} (pid {}) stuck; locks on the server: {:?}",
                    c.pid,
                    pg::connect(target).server_locks()
                ),
                #[cfg(not(feature = "postgres"))]
                Place::Server(_) => unreachable!(),
            }
            c.kill(libc::SIGKILL);
            assert_eq!(c.wait(), Exit::Signal(libc::SIGKILL));
            hangs += (THREADS as u64 - t.get(DONE + p)).max(1);
        }
    }

    // All owners are gone: a fresh one must find everything free.
    let leftover = t.get(LEFTOVER) + left_over(mode, place);

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
         ({} refused, {} of them over own locks, untimed waits: {} holding nothing, {} holding locks; \
         waits: {}; a bounded wait ended at most {:.1} ms late; {secs} s, seed {seed:#x})",
        match shape {
            Shape::Narrow => " (narrow)",
            _ => "",
        },
        t.get(REFUSED),
        t.get(REFUSED_OVER_OWN),
        t.get(BLOCKING),
        t.get(BLOCKING_HOLDING),
        t.waits(),
        t.get(LATE) as f64 / 1000.0,
    ));
    // A child that failed outside its threads reports its panic here.
    for c in ended {
        c.join();
    }
    assert_eq!(violations, 0, "owners held conflicting locks");
    assert_eq!(mismatches, 0, "the engine disagreed with an owner's claims");
    assert_eq!(hangs, 0, "workers stuck");
    assert_eq!(leftover, 0, "locks left in the engine");
    assert_eq!(errors, 0, "workers failed");
    // The run must have done its job: many operations, changes refused
    // part-way over locks the owner held, and waits of every kind.
    assert!(ops > 1000, "only {ops} operations");
    assert!(
        t.get(REFUSED_OVER_OWN) > 0,
        "no change refused over own locks"
    );
    for (k, name) in KINDS.iter().enumerate() {
        let granted = t.get(WAITS + k * OUTCOMES.len() + GRANTED);
        assert!(granted > 0, "no {name} wait was granted");
    }
}

mode_tests! { stress => stress }
mode_tests! { stress_narrow => stress_narrow }

/// Flock mode: every lock is the whole file.
#[test]
fn stress_flock() {
    let (_dir, path) = lock_path();
    stress_with(Mode::Flock, &Place::File(path), Shape::Whole);
}

/// PostgreSQL advisory locks on the test server (`LOCKSFILE_TEST_PG`).
#[cfg(feature = "postgres")]
#[test]
fn stress_postgres() {
    let Some(server) = pg::server() else { return };
    let target = pg::target(&server, "stress");
    stress_with(Mode::Postgres, &Place::Server(target), Shape::Bounded);
}
