//! Every engine under every patience: whatever a caller's patience (no
//! limit, a timeout, a deadline signals may cut short, a `Cancel`, a tokio
//! future with or without a timeout), its wait is one wait for the engine,
//! so the engine's deadlock detection answers it, a fair queue serves it in
//! its turn, and a cancel, a dropped future or a signal ends it at once
//! holding nothing.
//!
//! Run with `cargo test -p locksfile --features tokio --test patience`; the
//! PostgreSQL cases also need `--features postgres` and a server (see
//! `pg/mod.rs`). The figures measured are printed: `--nocapture` shows them.

#![cfg(feature = "tokio")]

mod common;
#[cfg(feature = "postgres")]
mod pg;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Once};
use std::time::{Duration, Instant};

use common::*;
use locksfile::{Cancel, Error, Kind, LockFile, Mode, Span, Wait, WriteGuard};

/// The limit of the timed patiences: far beyond any step of a test, so a
/// wait that ends with `TimedOut` was not answered by its engine.
const LONG: Duration = Duration::from_secs(10);

/// How soon a deadlock is refused once its cycle closes (kernel, shm), and
/// how soon a cancel, a dropped future or a signal ends a wait.
const PROMPT: Duration = Duration::from_millis(100);

/// How soon a writer among busy readers is granted (fair engines).
const WRITER_GRANTED: Duration = Duration::from_secs(1);

/// How long each busy reader holds its read, and the stagger between them.
const READ_HELD: Duration = Duration::from_millis(200);
const READ_EVERY: Duration = Duration::from_millis(25);
const READERS: usize = 8;

/// How a caller waits for an exclusive lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Patience {
    /// `Wait::Blocking`.
    Untimed,
    /// `Wait::Timeout(LONG)`.
    Timed,
    /// `Wait::DeadlineInterruptible(now + LONG)`.
    TimedInterruptible,
    /// `acquire_cancellable(.., Wait::Blocking, ..)` with a `Cancel` never
    /// cancelled.
    Cancellable,
    /// `write_async(.., None)`.
    TokioUntimed,
    /// `write_async(.., Some(LONG))`.
    TokioTimed,
}

use Patience::*;

const PATIENCES: [Patience; 6] = [
    Untimed,
    Timed,
    TimedInterruptible,
    Cancellable,
    TokioUntimed,
    TokioTimed,
];

/// The patiences without tokio, and with it.
#[cfg(feature = "postgres")]
const WITHOUT_TOKIO: [Patience; 4] = [Untimed, Timed, TimedInterruptible, Cancellable];
#[cfg(feature = "postgres")]
const WITH_TOKIO: [Patience; 2] = [TokioUntimed, TokioTimed];

/// An exclusive lock taken with some patience; let go when dropped.
enum Taken {
    Explicit(Arc<LockFile>, Span),
    Guard { _held: WriteGuard<Arc<LockFile>> },
}

impl Drop for Taken {
    fn drop(&mut self) {
        if let Taken::Explicit(lf, s) = self {
            lf.release(*s).expect("release");
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime")
}

impl Patience {
    /// The `Wait` of a patience that waits through `acquire`.
    fn wait(self) -> Wait {
        match self {
            Untimed | Cancellable => Wait::Blocking,
            Timed => Wait::Timeout(LONG),
            TimedInterruptible => Wait::DeadlineInterruptible(Instant::now() + LONG),
            TokioUntimed | TokioTimed => unreachable!("a tokio wait takes a timeout"),
        }
    }

    /// Take `s` exclusively through `lf`, waiting with this patience.
    fn write(self, lf: &Arc<LockFile>, s: Span) -> Result<Taken, Error> {
        let taken = |r: Result<(), Error>| r.map(|()| Taken::Explicit(Arc::clone(lf), s));
        match self {
            Untimed | Timed | TimedInterruptible => {
                taken(lf.acquire(Kind::Exclusive, s, self.wait()))
            }
            Cancellable => {
                let never = Cancel::new();
                taken(lf.acquire_cancellable(Kind::Exclusive, s, self.wait(), &never))
            }
            TokioUntimed | TokioTimed => {
                let timeout = (self == TokioTimed).then_some(LONG);
                // Dropped (its pool joined) before returning, so no thread
                // of it is left when a test forks next.
                let rt = runtime();
                rt.block_on(lf.write_async(s, timeout))
                    .map(|g| Taken::Guard { _held: g })
            }
        }
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: one clock for every process, so that
/// forked owners' instants compare.
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(r, 0);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The waiting lines of `/proc/locks` for the file at `path`, of any type
/// (record locks, OFD locks and `flock(2)`, which `common::proc_locks`
/// leaves out).
fn kernel_waiters(path: &Path) -> usize {
    let ino = fs::metadata(path).expect("stat lock file").ino();
    let text = fs::read_to_string("/proc/locks").expect("read /proc/locks");
    text.lines()
        .filter(|l| {
            // "N: -> TYPE ADVISORY KIND PID MAJ:MIN:INO START END"
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1) == Some(&"->")
                && f.get(6)
                    .and_then(|d| d.rsplit(':').next())
                    .and_then(|i| i.parse::<u64>().ok())
                    == Some(ino)
        })
        .count()
}

/// The requests waiting in the namespace `observer` looks at (another
/// session's view of `pg_locks`).
#[cfg(feature = "postgres")]
fn server_waiters(observer: &LockFile) -> usize {
    observer
        .server_locks()
        .expect("server_locks")
        .iter()
        .filter(|l| !l.granted)
        .count()
}

/// Where the locks of a test live: a lock file in some mode, or a
/// PostgreSQL namespace (with a session that watches it).
enum Space {
    File {
        _dir: tempfile::TempDir,
        path: PathBuf,
        mode: Mode,
    },
    #[cfg(feature = "postgres")]
    Server { target: String, observer: LockFile },
}

/// A lock another owner holds until [`Elsewhere::release`].
enum Elsewhere {
    Process(Holding),
    #[cfg(feature = "postgres")]
    Session(LockFile),
}

impl Elsewhere {
    fn release(self) {
        match self {
            Elsewhere::Process(h) => h.release(),
            #[cfg(feature = "postgres")]
            Elsewhere::Session(lf) => lf.release_all().expect("release"),
        }
    }
}

impl Space {
    /// A fresh space for `mode`; `None` when it is a server and there is
    /// none (the test is skipped, or fails under `LOCKSFILE_REQUIRE_PG`).
    fn new(mode: Mode, test: &str) -> Option<Space> {
        if mode == Mode::Postgres {
            #[cfg(feature = "postgres")]
            {
                let target = pg::target(&pg::server()?, test);
                let observer = pg::connect(&target);
                return Some(Space::Server { target, observer });
            }
            #[cfg(not(feature = "postgres"))]
            {
                let _ = test;
                return None;
            }
        }
        let (dir, path) = lock_path();
        Some(Space::File {
            _dir: dir,
            path,
            mode,
        })
    }

    fn handle(&self) -> Arc<LockFile> {
        match self {
            Space::File { path, mode, .. } => Arc::new(open(path, *mode)),
            #[cfg(feature = "postgres")]
            Space::Server { target, .. } => Arc::new(pg::connect(target)),
        }
    }

    /// The span the test locks: `..` in flock mode (its only span), lock 0
    /// elsewhere.
    fn span(&self) -> Span {
        match self {
            Space::File {
                mode: Mode::Flock, ..
            } => Span::ALL,
            _ => span(0),
        }
    }

    /// `span()` held exclusively by another owner: a forked process for a
    /// lock file (another owner in every mode), another session on a server.
    fn hold_elsewhere(&self) -> Elsewhere {
        match self {
            Space::File { path, mode, .. } => {
                Elsewhere::Process(hold_elsewhere(path, *mode, Kind::Exclusive, self.span()))
            }
            #[cfg(feature = "postgres")]
            Space::Server { target, .. } => {
                let lf = pg::connect(target);
                lf.acquire(Kind::Exclusive, self.span(), Wait::NonBlocking)
                    .expect("free");
                Elsewhere::Session(lf)
            }
        }
    }

    /// How many requests wait: the kernel's list, the shm table's, or the
    /// server's.
    fn waiters(&self) -> usize {
        match self {
            Space::File { path, .. } => kernel_waiters(path) + shm_waiters(path).len(),
            #[cfg(feature = "postgres")]
            Space::Server { observer, .. } => server_waiters(observer),
        }
    }

    /// Wait until at least `n` requests wait.
    fn wait_for_waiters(&self, n: usize) {
        let start = Instant::now();
        while self.waiters() < n {
            assert!(
                start.elapsed() < STUCK,
                "fewer than {n} waiters after {STUCK:?}"
            );
            match self {
                Space::File { .. } => std::thread::yield_now(),
                #[cfg(feature = "postgres")]
                Space::Server { .. } => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    }

    /// That another owner takes `span()` at once, without waiting (nothing
    /// of an ended wait is left in its way, queued or held).
    fn taken_at_once_by_another(&self) {
        self.hold_elsewhere().release();
    }
}

/// One test per engine of a lock file: `engine_tests! { name => f }`
/// defines `name::ofd`, `::process`, `::flock` and `::shm`, each
/// `f(mode)`; the PostgreSQL engine's test is written beside it.
macro_rules! engine_tests {
    ($($name:ident => $f:expr),* $(,)?) => {$(
        mod $name {
            use super::*;

            #[test]
            fn ofd() {
                ($f)(Mode::Ofd)
            }

            #[test]
            fn process() {
                ($f)(Mode::Process)
            }

            #[test]
            fn flock() {
                ($f)(Mode::Flock)
            }

            #[test]
            fn shm() {
                ($f)(Mode::Shm)
            }
        }
    )*};
}

// ---------------------------------------------------------------------
// 1. Deadlock cycles

/// How an owner's wait in a cycle ended, and when (monotonic ns).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Granted,
    Deadlock,
}

struct Waited {
    end: End,
    start_ns: u64,
    end_ns: u64,
}

/// What a cycle did: each owner's wait, in owner order.
fn judge_cycle(what: &str, waits: &[Waited], limit: Duration) -> Duration {
    let n = waits.len();
    let deadlocked: Vec<usize> = (0..n).filter(|&i| waits[i].end == End::Deadlock).collect();
    assert_eq!(
        deadlocked.len(),
        1,
        "{what}: exactly one owner must be refused with Deadlock: {:?}",
        waits.iter().map(|w| w.end).collect::<Vec<_>>()
    );
    // The cycle closes when the last owner starts waiting.
    let closed = waits.iter().map(|w| w.start_ns).max().unwrap();
    let refused = waits[deadlocked[0]].end_ns;
    let took = Duration::from_nanos(refused.saturating_sub(closed));
    println!(
        "deadlock {what}: owner {} refused {:.2} ms after the cycle closed",
        deadlocked[0],
        ms(took)
    );
    assert!(
        took < limit,
        "{what}: Deadlock came {took:?} after the cycle closed (limit {limit:?})"
    );
    took
}

/// A cycle of `n` forked owners in `mode`: owner `i` holds lock `i`, then
/// waits for lock `(i + 1) % n` with `p`. Returns how long after the cycle
/// closed the refusal came.
fn cycle_of_processes(mode: Mode, n: usize, p: Patience) -> Duration {
    let (_dir, path) = lock_path();
    let path = &path;
    let ready: Vec<Pipe> = (0..n).map(|_| Pipe::new()).collect();
    let go: Vec<Pipe> = (0..n).map(|_| Pipe::new()).collect();
    let out: Vec<Pipe> = (0..n).map(|_| Pipe::new()).collect();
    let mut children = Vec::new();
    for i in 0..n {
        let (ready, go, out) = (&ready[i], &go[i], &out[i]);
        children.push(fork(move || {
            let lf = Arc::new(open(path, mode));
            let mine = span(i as u64);
            lf.acquire(Kind::Exclusive, mine, Wait::NonBlocking)
                .expect("own lock free");
            ready.send(b'h');
            go.expect(b'g');
            let start_ns = mono_ns();
            let r = p.write(&lf, span(((i + 1) % n) as u64));
            let end_ns = mono_ns();
            let tag = match &r {
                Ok(_) => b'G',
                Err(Error::Deadlock { .. }) => b'D',
                Err(e) => {
                    out.send(b'E');
                    panic!("owner {i} ({p:?}): {e:?}");
                }
            };
            // The refused owner lets its own lock go, which unwinds the
            // cycle; each granted one lets both go.
            drop(r);
            lf.release(mine).expect("release");
            out.send(tag);
            out.send_u64(start_ns);
            out.send_u64(end_ns);
        }));
    }
    for r in &ready {
        r.expect(b'h');
    }
    for i in 0..n - 1 {
        go[i].send(b'g');
        wait_for_waiter(
            path,
            ((i + 1) % n) as u64,
            waiter_pid(mode, children[i].pid),
        );
    }
    go[n - 1].send(b'g');
    let mut waits = Vec::new();
    for (i, o) in out.iter().enumerate() {
        let tag = o.recv();
        if tag == b'E' {
            // Fails with the owner's panic message.
            children.swap_remove(i).join();
            unreachable!("owner {i} failed");
        }
        let start_ns = o.recv_u64();
        let end_ns = o.recv_u64();
        let end = if tag == b'D' {
            End::Deadlock
        } else {
            End::Granted
        };
        waits.push(Waited {
            end,
            start_ns,
            end_ns,
        });
    }
    for c in children {
        c.join();
    }
    judge_cycle(&format!("{mode} n={n} {p:?}"), &waits, PROMPT)
}

fn deadlock_cycles(mode: Mode) {
    let _s = serial();
    let mut figures = Vec::new();
    for n in [2, 3] {
        for p in PATIENCES {
            figures.push((n, p, cycle_of_processes(mode, n, p)));
        }
    }
    for (n, p, took) in figures {
        println!(
            "deadlock figure {mode} cycle of {n}, {p:?}: {:.2} ms",
            ms(took)
        );
    }
}

mod deadlock_cycles {
    use super::*;

    #[test]
    fn process() {
        deadlock_cycles(Mode::Process)
    }

    #[test]
    fn shm() {
        deadlock_cycles(Mode::Shm)
    }

    #[cfg(feature = "postgres")]
    #[test]
    fn postgres() {
        cycles_of_sessions(&WITHOUT_TOKIO)
    }

    #[cfg(feature = "postgres")]
    #[test]
    fn postgres_tokio() {
        cycles_of_sessions(&WITH_TOKIO)
    }

    /// Every cycle size and patience of `patiences` at once, each in its
    /// own namespace, owners as sessions in threads (the server sees one
    /// backend each): a refusal needs `deadlock_timeout` (1 s by default)
    /// to come.
    #[cfg(feature = "postgres")]
    fn cycles_of_sessions(patiences: &[Patience]) {
        let _s = serial();
        let Some(srv) = pg::server() else { return };
        let limit = Duration::from_secs(2);
        let figures: Vec<(usize, Patience, Duration)> = std::thread::scope(|s| {
            let runs: Vec<_> = [2, 3]
                .into_iter()
                .flat_map(|n| patiences.iter().map(move |&p| (n, p)))
                .map(|(n, p)| {
                    let srv = &srv;
                    s.spawn(move || (n, p, cycle_of_sessions(srv, n, p, limit)))
                })
                .collect();
            runs.into_iter().map(|r| r.join().unwrap()).collect()
        });
        for (n, p, took) in figures {
            println!(
                "deadlock figure postgres cycle of {n}, {p:?}: {:.2} ms",
                ms(took)
            );
        }
    }
}

/// As [`cycle_of_processes`] on a server, each owner a session of its own
/// waiting on a thread of its own.
#[cfg(feature = "postgres")]
fn cycle_of_sessions(srv: &str, n: usize, p: Patience, limit: Duration) -> Duration {
    let name = format!("cycle{n}-{}", format!("{p:?}").to_lowercase());
    let target = pg::target(srv, &name);
    let observer = pg::connect(&target);
    let owners: Vec<Arc<LockFile>> = (0..n).map(|_| Arc::new(pg::connect(&target))).collect();
    for (i, o) in owners.iter().enumerate() {
        o.acquire(Kind::Exclusive, i as u64, Wait::NonBlocking)
            .expect("own lock free");
    }
    let waits = std::thread::scope(|s| {
        let (tx, rx) = mpsc::channel();
        let mut go = Vec::new();
        for (i, lf) in owners.iter().enumerate() {
            let (go_tx, go_rx) = mpsc::channel::<()>();
            go.push(go_tx);
            let tx = tx.clone();
            s.spawn(move || {
                go_rx.recv().unwrap();
                let start_ns = mono_ns();
                let r = p.write(lf, span(((i + 1) % n) as u64));
                let end_ns = mono_ns();
                let end = match &r {
                    Ok(_) => Ok(End::Granted),
                    Err(Error::Deadlock { .. }) => Ok(End::Deadlock),
                    Err(e) => Err(format!("{e:?}")),
                };
                drop(r);
                lf.release(i as u64).expect("release");
                tx.send((i, end, start_ns, end_ns)).unwrap();
            });
        }
        drop(tx);
        for (i, g) in go.iter().enumerate().take(n - 1) {
            g.send(()).unwrap();
            let start = Instant::now();
            while server_waiters(&observer) < i + 1 {
                assert!(start.elapsed() < STUCK, "owner {i} never waited");
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        go[n - 1].send(()).unwrap();
        let mut waits: Vec<Option<Waited>> = (0..n).map(|_| None).collect();
        for (i, end, start_ns, end_ns) in rx.iter() {
            let end = end.unwrap_or_else(|e| panic!("owner {i} ({p:?}) failed: {e}"));
            waits[i] = Some(Waited {
                end,
                start_ns,
                end_ns,
            });
        }
        waits.into_iter().map(Option::unwrap).collect::<Vec<_>>()
    });
    judge_cycle(&format!("postgres n={n} {p:?}"), &waits, limit)
}

// ---------------------------------------------------------------------
// 2. A writer among busy readers

/// Readers, each its own process, that keep lock 0 read-locked: reader `k`
/// starts `k * READ_EVERY` after the first and holds each read
/// `READ_HELD`, then reads again, so a new read starts every `READ_EVERY`
/// and reads always overlap. Returns once all of them read.
fn busy_readers(space: &Space, stop: &AtomicU64) -> Vec<Child> {
    let started = Pipe::new();
    let children: Vec<Child> = (0..READERS)
        .map(|k| {
            let started = &started;
            fork(move || {
                let lf = space.handle();
                std::thread::sleep(READ_EVERY * k as u32);
                let mut first = true;
                loop {
                    let g = lf.read(0).expect("read");
                    if first {
                        started.send(b's');
                        first = false;
                    }
                    std::thread::sleep(READ_HELD);
                    drop(g);
                    if stop.load(Ordering::SeqCst) != 0 {
                        break;
                    }
                }
            })
        })
        .collect();
    for _ in 0..READERS {
        started.expect(b's');
    }
    children
}

fn writer_among_readers(mode: Mode, patiences: &[Patience]) {
    let _s = serial();
    let mut figures = Vec::new();
    for &p in patiences {
        let Some(space) = Space::new(mode, &format!("busy-{}", format!("{p:?}").to_lowercase()))
        else {
            return;
        };
        let stop = Shared::new(1);
        let stop = &stop.slots()[0];
        let readers = busy_readers(&space, stop);
        let lf = space.handle();
        let start = Instant::now();
        let g = p.write(&lf, span(0)).expect("the writer is granted");
        let took = start.elapsed();
        drop(g);
        stop.store(1, Ordering::SeqCst);
        for r in readers {
            r.join();
        }
        println!(
            "writer among {READERS} busy readers, {mode}, {p:?}: granted after {:.1} ms",
            ms(took)
        );
        assert!(
            took < WRITER_GRANTED,
            "{mode} {p:?}: the writer waited {took:?} among busy readers"
        );
        figures.push((p, took));
    }
    for (p, took) in figures {
        println!("writer figure {mode} {p:?}: {:.1} ms", ms(took));
    }
}

mod writer_among_busy_readers {
    use super::*;

    #[test]
    fn shm() {
        writer_among_readers(Mode::Shm, &PATIENCES)
    }

    #[cfg(feature = "postgres")]
    #[test]
    fn postgres() {
        writer_among_readers(Mode::Postgres, &WITHOUT_TOKIO)
    }

    #[cfg(feature = "postgres")]
    #[test]
    fn postgres_tokio() {
        writer_among_readers(Mode::Postgres, &WITH_TOKIO)
    }
}

// ---------------------------------------------------------------------
// 3. Queue order among mixed patience

/// The writers of [`queue_order`]: A timed, B tokio with no limit, C with
/// no limit.
const MIXED: [(&str, Patience); 3] = [("A", Timed), ("B", TokioUntimed), ("C", Untimed)];

/// A holder holds lock 0; the writers queue in turn, each a handle of its
/// own on a thread of its own; letting go in turn grants them in the order
/// they queued.
fn queue_order(mode: Mode, writers: [(&'static str, Patience); 3]) {
    let _s = serial();
    let Some(space) = Space::new(mode, "order") else {
        return;
    };
    let holder = space.handle();
    let held = holder.write(0).expect("free");
    std::thread::scope(|s| {
        let (granted_tx, granted) = mpsc::channel();
        let mut release = Vec::new();
        for (n, (name, p)) in writers.into_iter().enumerate() {
            let lf = space.handle();
            let (release_tx, release_rx) = mpsc::channel::<()>();
            release.push(release_tx);
            let granted_tx = granted_tx.clone();
            s.spawn(move || {
                let g = p.write(&lf, span(0)).expect("granted");
                granted_tx.send(name).unwrap();
                release_rx.recv().unwrap();
                drop(g);
            });
            space.wait_for_waiters(n + 1);
        }
        drop(held);
        let mut order = Vec::new();
        for r in &release {
            order.push(granted.recv_timeout(STUCK).expect("a grant"));
            // No one else is granted while it holds.
            assert!(granted.try_recv().is_err());
            r.send(()).unwrap();
        }
        println!("queue order {mode} {writers:?}: {order:?}");
        assert_eq!(order, ["A", "B", "C"], "{mode}: grants out of queue order");
    });
}

mod queue_order_of_mixed_patience {
    use super::*;

    #[test]
    fn shm() {
        queue_order(Mode::Shm, MIXED)
    }

    #[cfg(feature = "postgres")]
    #[test]
    fn postgres() {
        queue_order(Mode::Postgres, MIXED)
    }

    /// As `postgres`, with B cancellable instead of on tokio.
    #[cfg(feature = "postgres")]
    #[test]
    fn postgres_without_tokio() {
        queue_order(
            Mode::Postgres,
            [("A", Timed), ("B", Cancellable), ("C", Untimed)],
        )
    }
}

// ---------------------------------------------------------------------
// 4. Ending waits: cancels, dropped futures, deadlines, signals

/// A wait with a `Cancel` that another thread cancels ends within
/// `PROMPT` with `Cancelled`, holding nothing, and another owner then
/// takes the lock at once; for every patience the `Cancel` combines with.
fn cancel_from_another_thread(mode: Mode) {
    let _s = serial();
    let Some(space) = Space::new(mode, "cancel") else {
        return;
    };
    let s = space.span();
    for p in [Untimed, Timed, TimedInterruptible] {
        let what = format!("{p:?}");
        let lf = space.handle();
        let holder = space.hold_elsewhere();
        let cancel = Cancel::new();
        let (r, took) = std::thread::scope(|sc| {
            let waiter = sc.spawn(|| {
                let r = lf.acquire_cancellable(Kind::Exclusive, s, p.wait(), &cancel);
                (r, Instant::now())
            });
            space.wait_for_waiters(1);
            let cancelled = Instant::now();
            cancel.cancel();
            let (r, ended) = waiter.join().unwrap();
            (r, ended - cancelled)
        });
        println!(
            "cancel {mode} {what}: the wait ended {:.2} ms after the cancel",
            ms(took)
        );
        assert!(matches!(r, Err(Error::Cancelled)), "{mode} {what}: {r:?}");
        assert!(
            took < PROMPT,
            "{mode} {what}: ended {took:?} after the cancel"
        );
        assert!(lf.held().is_empty(), "{mode} {what}: {:?}", lf.held());
        holder.release();
        space.taken_at_once_by_another();
        drop(lf);
    }
}

/// A dropped tokio future ends its wait within `PROMPT`: the pool thread
/// lets go of its clone of the handle (nothing is left asleep), nothing is
/// held, and another owner takes the lock at once.
fn dropped_future(mode: Mode) {
    let _s = serial();
    let Some(space) = Space::new(mode, "dropped") else {
        return;
    };
    let s = space.span();
    for timeout in [None, Some(LONG)] {
        let lf = space.handle();
        let holder = space.hold_elsewhere();
        let rt = runtime();
        let mine = &lf;
        let took = rt.block_on(async {
            let lf = Arc::clone(mine);
            let waiter = tokio::spawn(async move { lf.write_async(s, timeout).await });
            // Once the pool thread waits it holds a clone: the test's, the
            // future's and the pool closure's.
            let start = Instant::now();
            while Arc::strong_count(mine) < 3 {
                assert!(start.elapsed() < STUCK, "the wait never reached the pool");
                tokio::task::yield_now().await;
            }
            space.wait_for_waiters(1);
            waiter.abort();
            let aborted = Instant::now();
            assert!(waiter.await.unwrap_err().is_cancelled());
            while Arc::strong_count(mine) > 1 {
                assert!(
                    aborted.elapsed() < STUCK,
                    "the pool thread never stopped waiting"
                );
                std::thread::yield_now();
            }
            aborted.elapsed()
        });
        drop(rt);
        println!(
            "dropped future {mode} timeout {timeout:?}: the pool's wait ended {:.2} ms after the drop",
            ms(took)
        );
        assert!(
            took < PROMPT,
            "{mode}: the wait went on {took:?} after the drop"
        );
        assert!(lf.held().is_empty(), "{mode}: {:?}", lf.held());
        holder.release();
        space.taken_at_once_by_another();
    }
}

engine_tests! {
    a_cancelled_wait_ends_at_once_holding_nothing => cancel_from_another_thread,
    a_dropped_future_ends_its_wait_at_once => dropped_future,
}

#[cfg(feature = "postgres")]
mod on_a_server {
    use super::*;

    #[test]
    fn a_cancelled_wait_ends_at_once_holding_nothing() {
        cancel_from_another_thread(Mode::Postgres)
    }

    #[test]
    fn a_dropped_future_ends_its_wait_at_once() {
        dropped_future(Mode::Postgres)
    }

    /// Connecting, locking, releasing and dropping the last handle inside
    /// a task, where tokio refuses nested runtimes, works and frees the lock.
    #[test]
    fn a_handle_lives_and_dies_inside_a_task() {
        let Some(space) = Space::new(Mode::Postgres, "in-task") else {
            return;
        };
        let Space::Server { target, .. } = &space else {
            unreachable!()
        };
        let rt = runtime();
        let t = target.clone();
        rt.block_on(async move {
            let lf = Arc::new(pg::connect(&t));
            let g = lf.write_async(0, None).await.expect("free");
            assert!(g.is_held());
            drop(g);
            let _g = lf.write(1).expect("free");
            // The guard, then the last handle, dropped in the task.
        });
        let other = space.handle();
        assert!(
            other.try_write(0..2).is_ok(),
            "the dropped handle kept a lock"
        );
    }
}

/// A timed kernel wait that nobody answers ends with `TimedOut` near its
/// deadline (the timer signal wakes `F_SETLKW` / `flock`), holding nothing.
fn timed_kernel_wait_times_out(mode: Mode) {
    let _s = serial();
    let space = Space::new(mode, "timeout").expect("a lock file");
    let lf = space.handle();
    let holder = space.hold_elsewhere();
    let timeout = Duration::from_millis(300);
    let start = Instant::now();
    let r = lf.acquire(Kind::Exclusive, space.span(), Wait::Timeout(timeout));
    let took = start.elapsed();
    println!(
        "timed wait {mode}: TimedOut after {:.1} ms ({:.1} ms past the deadline)",
        ms(took),
        ms(took.saturating_sub(timeout))
    );
    assert!(matches!(r, Err(Error::TimedOut { .. })), "{mode}: {r:?}");
    assert!(took >= timeout, "{mode}: ended early, after {took:?}");
    assert!(
        took < timeout + PROMPT,
        "{mode}: ended {took:?} after a {timeout:?} timeout"
    );
    assert!(lf.held().is_empty());
    holder.release();
}

/// How many SIGUSR1 the handler has seen.
static HANDLED: AtomicU64 = AtomicU64::new(0);

extern "C" fn count_signal(_: libc::c_int) {
    HANDLED.fetch_add(1, Ordering::SeqCst);
}

/// A SIGUSR1 handler without SA_RESTART, so a signal interrupts the
/// system call a waiting thread sleeps in (only threads the tests send it
/// to get it).
fn catch_sigusr1() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction with a plain handler that only touches
        // an atomic.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = count_signal as *const () as usize;
            sa.sa_flags = 0;
            libc::sigemptyset(&mut sa.sa_mask);
            assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
        }
    });
}

fn signal_thread(thread: libc::pthread_t) {
    // SAFETY: the thread is alive (it waits, and is joined later).
    let r = unsafe { libc::pthread_kill(thread, libc::SIGUSR1) };
    assert_eq!(r, 0, "pthread_kill");
}

/// A signal sent to the waiting thread ends a `DeadlineInterruptible`
/// wait with `Interrupted`, holding nothing; it does not end a `Timeout`
/// wait, which goes on and is granted once the holder lets go.
fn signals_end_only_interruptible_waits(mode: Mode) {
    let _s = serial();
    catch_sigusr1();
    let space = Space::new(mode, "signals").expect("a lock file");
    let s = space.span();
    let lf = space.handle();
    let holder = space.hold_elsewhere();

    // Interruptible: ended by the signal.
    let (r, took) = std::thread::scope(|sc| {
        let (tid_tx, tid_rx) = mpsc::channel();
        let lf = &lf;
        let waiter = sc.spawn(move || {
            // SAFETY: plain calls.
            tid_tx
                .send(unsafe { (libc::pthread_self(), libc::gettid()) })
                .unwrap();
            let r = lf.acquire(
                Kind::Exclusive,
                s,
                Wait::DeadlineInterruptible(Instant::now() + LONG),
            );
            (r, Instant::now())
        });
        let (tid, kernel_tid) = tid_rx.recv().unwrap();
        space.wait_for_waiters(1);
        asleep_in_kernel(kernel_tid);
        let sent = Instant::now();
        signal_thread(tid);
        let (r, ended) = waiter.join().unwrap();
        (r, ended - sent)
    });
    println!(
        "signal {mode} DeadlineInterruptible: ended {:.2} ms after the signal",
        ms(took)
    );
    assert!(matches!(r, Err(Error::Interrupted)), "{mode}: {r:?}");
    assert!(took < PROMPT, "{mode}: ended {took:?} after the signal");
    assert!(lf.held().is_empty(), "{mode}: {:?}", lf.held());

    // Timed but not interruptible: waits through the signal.
    let before = HANDLED.load(Ordering::SeqCst);
    let r = std::thread::scope(|sc| {
        let (tid_tx, tid_rx) = mpsc::channel();
        let lf = &lf;
        let waiter = sc.spawn(move || {
            // SAFETY: plain call.
            tid_tx.send(unsafe { libc::pthread_self() }).unwrap();
            lf.acquire(Kind::Exclusive, s, Wait::Timeout(LONG))
        });
        let tid = tid_rx.recv().unwrap();
        space.wait_for_waiters(1);
        signal_thread(tid);
        let start = Instant::now();
        while HANDLED.load(Ordering::SeqCst) == before {
            assert!(start.elapsed() < STUCK, "the signal was never handled");
            std::thread::yield_now();
        }
        // Back asleep, still waiting.
        space.wait_for_waiters(1);
        assert!(
            !waiter.is_finished(),
            "{mode}: the signal ended a Timeout wait"
        );
        holder.release();
        waiter.join().unwrap()
    });
    assert!(r.is_ok(), "{mode}: a Timeout wait ended by a signal: {r:?}");
    assert_eq!(lf.held(), vec![(s, Kind::Exclusive)]);
    lf.release_all().unwrap();
    space.taken_at_once_by_another();
}

/// Both, over the kernel engines (and the shm table's futex waits for the
/// signals).
mod kernel_waits {
    use super::*;

    #[test]
    fn time_out_near_their_deadline_ofd() {
        timed_kernel_wait_times_out(Mode::Ofd)
    }

    #[test]
    fn time_out_near_their_deadline_process() {
        timed_kernel_wait_times_out(Mode::Process)
    }

    #[test]
    fn time_out_near_their_deadline_flock() {
        timed_kernel_wait_times_out(Mode::Flock)
    }

    #[test]
    fn signals_end_only_interruptible_waits_ofd() {
        signals_end_only_interruptible_waits(Mode::Ofd)
    }

    #[test]
    fn signals_end_only_interruptible_waits_process() {
        signals_end_only_interruptible_waits(Mode::Process)
    }

    #[test]
    fn signals_end_only_interruptible_waits_flock() {
        signals_end_only_interruptible_waits(Mode::Flock)
    }

    #[test]
    fn signals_end_only_interruptible_waits_shm() {
        signals_end_only_interruptible_waits(Mode::Shm)
    }
}
