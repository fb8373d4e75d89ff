//! Threads sharing one handle exclude each other by default, in every
//! engine and whatever their patience, while the takes of one thread
//! compose; `Threads::Share` keeps the handle's locks every thread's.
//!
//! The PostgreSQL cases need `--features postgres` and a server (see
//! `pg/mod.rs`); the tokio ones `--features tokio`.

mod common;
#[cfg(feature = "postgres")]
mod pg;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Barrier};
use std::time::{Duration, Instant};

use common::*;
use locksfile::{Cancel, Error, Kind, LockFile, Mode, Span, Threads, Wait, WriteGuard};

const LONG: Duration = Duration::from_secs(20);

/// Where the locks are: a file in one of the file modes, or a server.
struct Target {
    mode: Mode,
    _dir: Option<tempfile::TempDir>,
    path: PathBuf,
    #[cfg(feature = "postgres")]
    url: Option<String>,
}

impl Target {
    fn file(mode: Mode) -> Target {
        let (dir, path) = lock_path();
        Target {
            mode,
            _dir: Some(dir),
            path,
            #[cfg(feature = "postgres")]
            url: None,
        }
    }

    #[cfg(feature = "postgres")]
    fn server(test: &str) -> Option<Target> {
        let server = pg::server()?;
        Some(Target {
            mode: Mode::Postgres,
            _dir: None,
            path: PathBuf::new(),
            url: Some(pg::target(&server, test)),
        })
    }

    fn open_with(&self, threads: Threads) -> LockFile {
        #[cfg(feature = "postgres")]
        if let Some(url) = &self.url {
            return LockFile::options()
                .threads(threads)
                .connect(url)
                .unwrap_or_else(|e| panic!("connect {url}: {e}"));
        }
        LockFile::options()
            .mode(self.mode)
            .threads(threads)
            .open(&self.path)
            .unwrap_or_else(|e| panic!("open in {} mode: {e}", self.mode))
    }

    fn open(&self) -> LockFile {
        self.open_with(Threads::Exclude)
    }

    /// The span the tests lock: flock(2) has only the whole file.
    fn span(&self) -> Span {
        match self.mode {
            Mode::Flock => Span::ALL,
            _ => span(3..5),
        }
    }
}

/// Every target here: the file modes, and the server when one is given.
fn targets(test: &str) -> Vec<Target> {
    let _ = test;
    #[allow(unused_mut)]
    let mut all: Vec<Target> = [Mode::Ofd, Mode::Process, Mode::Flock, Mode::Shm]
        .into_iter()
        .map(Target::file)
        .collect();
    #[cfg(feature = "postgres")]
    all.extend(Target::server(test));
    all
}

/// How a thread waits for its write lock.
#[derive(Clone, Copy, Debug)]
enum Patience {
    Untimed,
    Timed,
    Interruptible,
    Cancellable,
}

const PATIENCES: [Patience; 4] = [
    Patience::Untimed,
    Patience::Timed,
    Patience::Interruptible,
    Patience::Cancellable,
];

fn write_with(lf: &LockFile, span: Span, p: Patience) -> WriteGuard<&LockFile> {
    let deadline = Instant::now() + LONG;
    let got = match p {
        Patience::Untimed => lf.write(span),
        Patience::Timed => lf.write_for(span, LONG),
        Patience::Interruptible => {
            WriteGuard::acquire(lf, span, Wait::DeadlineInterruptible(deadline))
        }
        Patience::Cancellable => {
            WriteGuard::acquire_cancellable(lf, span, Wait::Blocking, &Cancel::new())
        }
    };
    got.unwrap_or_else(|e| panic!("{p:?} write: {e}"))
}

/// Four threads share one handle and bump a counter under its write
/// lock, with a read and a yield between load and store so that any
/// overlap loses updates: at most one thread is ever inside, and no
/// update is lost. With the threads sharing the handle's locks instead,
/// several are inside at once.
#[test]
fn threads_sharing_a_handle_exclude_each_other_whatever_their_patience() {
    let _s = serial();
    for t in targets("thread-counter") {
        for p in PATIENCES {
            let iters: u64 = if t.mode == Mode::Postgres { 25 } else { 150 };
            let lf = t.open();
            let (inside, most, counter) =
                (AtomicUsize::new(0), AtomicUsize::new(0), AtomicU64::new(0));
            let start = Barrier::new(4);
            std::thread::scope(|s| {
                for _ in 0..4 {
                    s.spawn(|| {
                        start.wait();
                        for _ in 0..iters {
                            let g = write_with(&lf, t.span(), p);
                            let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            let c = counter.load(Ordering::SeqCst);
                            std::thread::yield_now();
                            counter.store(c + 1, Ordering::SeqCst);
                            inside.fetch_sub(1, Ordering::SeqCst);
                            drop(g);
                        }
                    });
                }
            });
            assert_eq!(most.load(Ordering::SeqCst), 1, "{} {p:?}", t.mode);
            assert_eq!(
                counter.load(Ordering::SeqCst),
                4 * iters,
                "{} {p:?}",
                t.mode
            );
        }
    }
}

/// The same counter through a handle opened with `Threads::Share`: the
/// threads are one holder, so more than one gets inside (the old way).
#[test]
fn threads_share_keeps_the_handles_locks_every_threads() {
    let _s = serial();
    for t in targets("thread-share") {
        let lf = t.open_with(Threads::Share);
        assert_eq!(lf.threads(), Threads::Share);
        let g = lf.write(t.span()).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                let inner = lf.try_write(t.span()).expect("a sharing thread composes");
                drop(inner);
                // And any thread may release the handle's explicit locks.
                lf.acquire(Kind::Exclusive, t.span(), Wait::NonBlocking)
                    .unwrap();
            });
        });
        lf.release(t.span()).unwrap();
        drop(g);
        assert!(lf.held().is_empty(), "{}", t.mode);
    }
}

/// One thread's takes compose (a read inside its write, the same write
/// again); another thread of the handle is refused, with this process
/// named as the holder, and gets in once the first lets go.
#[test]
fn one_threads_takes_compose_and_keep_the_others_out() {
    let _s = serial();
    for t in targets("thread-compose") {
        let lf = t.open();
        let outer = lf.write(t.span()).unwrap();
        let inner = lf
            .try_read(t.span())
            .expect("a read inside one's own write");
        let again = lf.try_write(t.span()).expect("one's own write again");
        std::thread::scope(|s| {
            s.spawn(|| {
                let e = lf.try_read(t.span()).unwrap_err();
                assert!(e.is_would_block(), "{} {e:?}", t.mode);
                if let Error::WouldBlock {
                    holder: Some(h), ..
                } = &e
                {
                    assert_eq!(h.pid, Some(std::process::id()));
                    assert_eq!(h.kind, Kind::Exclusive);
                } else {
                    panic!("{}: no holder in {e:?}", t.mode);
                }
            });
        });
        drop((inner, again));
        // A shared lock of one thread lets another thread's read in, and
        // keeps its write out.
        drop(outer);
        let read = lf.read(t.span()).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                let r = lf.try_read(t.span()).expect("readers share");
                assert!(lf.try_write(t.span()).unwrap_err().is_would_block());
                drop(r);
            });
        });
        drop(read);
        std::thread::scope(|s| {
            s.spawn(|| drop(lf.try_write(t.span()).expect("all released")));
        });
    }
}

/// Each thread has its own explicit layer: another thread's `acquire`
/// is kept out, and its `release` drops nothing of the first thread's.
#[test]
fn explicit_locks_are_the_calling_threads() {
    let _s = serial();
    for t in targets("thread-explicit") {
        let lf = t.open();
        lf.acquire(Kind::Exclusive, t.span(), Wait::NonBlocking)
            .unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                let e = lf
                    .acquire(Kind::Shared, t.span(), Wait::NonBlocking)
                    .unwrap_err();
                assert!(e.is_would_block(), "{} {e:?}", t.mode);
                lf.release(t.span()).unwrap();
                assert!(lf.held_explicitly().is_empty());
            });
        });
        assert_eq!(lf.held_explicitly(), vec![(t.span(), Kind::Exclusive)]);
        assert!(lf.try_write(t.span()).is_ok(), "{}: still ours", t.mode);
        lf.release(t.span()).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                lf.acquire(Kind::Exclusive, t.span(), Wait::NonBlocking)
                    .expect("released by its thread");
            });
        });
        // The other thread's layer is the handle's until released or closed.
        assert!(lf.try_read(t.span()).unwrap_err().is_would_block());
    }
}

/// A guard belongs to the thread that took it, wherever it is dropped.
#[test]
fn a_guard_moved_to_another_thread_releases_its_takers_lock() {
    let _s = serial();
    for t in targets("thread-move") {
        let lf = Arc::new(t.open());
        let (tx, rx) = mpsc::channel();
        let taker = {
            let lf = Arc::clone(&lf);
            let span = t.span();
            std::thread::spawn(move || tx.send(lf.write_owned(span).unwrap()).unwrap())
        };
        taker.join().unwrap();
        let g = rx.recv().unwrap();
        assert!(lf.try_read(t.span()).unwrap_err().is_would_block());
        std::thread::spawn(move || drop(g)).join().unwrap();
        drop(
            lf.try_write(t.span())
                .expect("released where it was dropped"),
        );
    }
}

/// Two threads holding one span shared and both upgrading would wait for
/// each other forever: the second to wait gets `Error::Deadlock`, and the
/// first gets its write lock once the refused one lets go.
#[test]
fn two_threads_upgrading_one_span_is_a_deadlock() {
    let _s = serial();
    for t in targets("thread-upgrade") {
        let lf = t.open();
        let both = Barrier::new(2);
        let outcomes: Vec<Result<(), Error>> = std::thread::scope(|s| {
            let run = || {
                let r = lf.read(t.span()).unwrap();
                both.wait();
                match r.upgrade_with(Wait::Timeout(LONG)) {
                    Ok(w) => {
                        drop(w);
                        Ok(())
                    }
                    Err((r, e)) => {
                        drop(r);
                        Err(e)
                    }
                }
            };
            let a = s.spawn(run);
            let b = s.spawn(run);
            vec![a.join().unwrap(), b.join().unwrap()]
        });
        let deadlocks = outcomes
            .iter()
            .filter(|o| matches!(o, Err(Error::Deadlock { .. })))
            .count();
        assert_eq!(deadlocks, 1, "{}: {outcomes:?}", t.mode);
        assert_eq!(
            outcomes.iter().filter(|o| o.is_ok()).count(),
            1,
            "{}: {outcomes:?}",
            t.mode
        );
    }
}

/// A thread waiting for another thread of its handle ends on its
/// deadline and on a cancel, holding nothing.
#[test]
fn a_wait_for_another_thread_ends_on_its_deadline_and_cancel() {
    let _s = serial();
    for t in targets("thread-patience") {
        let lf = t.open();
        let held = lf.write(t.span()).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                let t0 = Instant::now();
                let e = lf
                    .write_for(t.span(), Duration::from_millis(100))
                    .unwrap_err();
                assert!(matches!(e, Error::TimedOut { .. }), "{} {e:?}", t.mode);
                assert!(t0.elapsed() >= Duration::from_millis(100));
                let cancel = Cancel::new();
                let (tx, rx) = mpsc::channel();
                let canceller = cancel.clone();
                s.spawn(move || {
                    rx.recv().unwrap();
                    canceller.cancel();
                });
                tx.send(()).unwrap();
                let e = WriteGuard::acquire_cancellable(&lf, t.span(), Wait::Blocking, &cancel)
                    .unwrap_err();
                assert!(matches!(e, Error::Cancelled), "{} {e:?}", t.mode);
            });
        });
        drop(held);
        assert!(lf.held().is_empty(), "{}", t.mode);
    }
}

/// Tokio tasks sharing a handle exclude each other, though one thread
/// (each async take is a party of its own, as with tokio's `RwLock`).
#[cfg(feature = "tokio")]
#[test]
fn tokio_tasks_sharing_a_handle_exclude_each_other() {
    let _s = serial();
    for t in targets("thread-tokio") {
        {
            // One thread runs every task: only parties of their own tell
            // them apart.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let lf = Arc::new(t.open());
            let inside = Arc::new(AtomicUsize::new(0));
            let most = Arc::new(AtomicUsize::new(0));
            let iters = if t.mode == Mode::Postgres { 10 } else { 40 };
            rt.block_on(async {
                let mut tasks = Vec::new();
                for _ in 0..4 {
                    let (lf, inside, most, span) = (
                        Arc::clone(&lf),
                        Arc::clone(&inside),
                        Arc::clone(&most),
                        t.span(),
                    );
                    tasks.push(tokio::spawn(async move {
                        for _ in 0..iters {
                            let g = lf.write_async(span, Some(LONG)).await.unwrap();
                            let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            tokio::task::yield_now().await;
                            inside.fetch_sub(1, Ordering::SeqCst);
                            drop(g);
                        }
                    }));
                }
                for task in tasks {
                    task.await.unwrap();
                }
            });
            assert_eq!(most.load(Ordering::SeqCst), 1, "{}", t.mode);
        }
    }
}
