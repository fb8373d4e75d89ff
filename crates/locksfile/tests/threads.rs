//! Threads of one process: separate OFD handles exclude each other, one
//! shared handle composes, process-mode handles are one owner.

mod common;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::*;
use locksfile::{Error, Kind, LockFile, Mode, ReadGuard, Wait, WriteGuard};

fn assert_send_sync<T: Send + Sync>() {}
fn assert_send<T: Send>() {}

#[test]
fn handles_and_owning_guards_cross_threads() {
    assert_send_sync::<LockFile>();
    assert_send::<WriteGuard<Arc<LockFile>>>();
    assert_send::<ReadGuard<Arc<LockFile>>>();
    assert_send_sync::<Error>();
}

/// Readers and writers on overlapping spans, each thread with its own OFD
/// handle. A state word counts readers (or is -1 for a writer) and every
/// entry checks it: a writer must find it 0, a reader never -1.
#[test]
fn separate_ofd_handles_exclude_each_other() {
    let _s = serial();
    let (_dir, path) = lock_path();
    const ITERS: u64 = 150;
    let state = AtomicI64::new(0);
    let violations = AtomicU64::new(0);
    let writes = AtomicU64::new(0);
    let start = Barrier::new(5);
    std::thread::scope(|s| {
        for t in 0..5u64 {
            let (path, state, violations, writes, start) =
                (&path, &state, &violations, &writes, &start);
            s.spawn(move || {
                let lf = open(path, Mode::Ofd);
                start.wait();
                for i in 0..ITERS {
                    let writer = t < 3;
                    // Overlapping spans of different shapes, and every way to wait.
                    let sp = match (t + i) % 3 {
                        0 => span(0..4),
                        1 => span(3),
                        _ => span(2..),
                    };
                    if writer {
                        let g = match i % 4 {
                            0 => Some(lf.write(sp).unwrap()),
                            1 => Some(lf.write_for(sp, Duration::from_secs(10)).unwrap()),
                            2 => {
                                lf.acquire(Kind::Exclusive, sp, Wait::Blocking).unwrap();
                                None
                            }
                            _ => loop {
                                match lf.try_write(sp) {
                                    Ok(g) => break Some(g),
                                    Err(Error::WouldBlock { .. }) => std::thread::yield_now(),
                                    Err(e) => panic!("{e}"),
                                }
                            },
                        };
                        if state
                            .compare_exchange(0, -1, Ordering::SeqCst, Ordering::SeqCst)
                            .is_err()
                        {
                            violations.fetch_add(1, Ordering::SeqCst);
                        }
                        // A non-atomic increment: lost updates show races.
                        let n = writes.load(Ordering::SeqCst);
                        std::thread::yield_now();
                        writes.store(n + 1, Ordering::SeqCst);
                        if state
                            .compare_exchange(-1, 0, Ordering::SeqCst, Ordering::SeqCst)
                            .is_err()
                        {
                            violations.fetch_add(1, Ordering::SeqCst);
                        }
                        match g {
                            Some(g) => WriteGuard::unlock(g).unwrap(),
                            None => lf.release(sp).unwrap(),
                        }
                    } else {
                        let g = lf.read(sp).unwrap();
                        if state.fetch_add(1, Ordering::SeqCst) < 0 {
                            violations.fetch_add(1, Ordering::SeqCst);
                        }
                        std::thread::yield_now();
                        if state.fetch_sub(1, Ordering::SeqCst) <= 0 {
                            violations.fetch_add(1, Ordering::SeqCst);
                        }
                        drop(g);
                    }
                }
                assert!(lf.held().is_empty());
            });
        }
    });
    assert_eq!(violations.load(Ordering::SeqCst), 0);
    assert_eq!(writes.load(Ordering::SeqCst), 3 * ITERS);
}

/// A thread asleep on a lock held through another handle of this process
/// wakes when that handle lets go.
#[test]
fn thread_waits_for_another_handle_of_the_same_process() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let a = open(&path, Mode::Ofd);
    let g = a.write(5..7).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(|| {
            let b = open(&path, Mode::Ofd);
            let g = b.read(6).unwrap();
            tx.send(b.held()).unwrap();
            drop(g);
        });
        wait_for_waiter(&path, 6, None);
        assert!(rx.try_recv().is_err(), "got past a held write lock");
        drop(g);
        let held = rx.recv_timeout(STUCK).expect("woken after the release");
        assert_eq!(held, vec![(span(6), Kind::Shared)]);
    });
}

/// Threads sharing one handle are one owner: their guards compose instead
/// of excluding each other, and each drop lowers only what it alone held.
#[test]
fn threads_sharing_a_handle_compose() {
    let _s = serial();
    for mode in MODES {
        let (_dir, path) = lock_path();
        let lf = Arc::new(open(&path, mode));
        let observer = open(&path, other_mode(mode));
        let (to_t1, t1_rx) = mpsc::channel::<()>();
        let (t1_tx, from_t1) = mpsc::channel::<()>();
        let t1 = {
            let lf = lf.clone();
            std::thread::spawn(move || {
                let g = WriteGuard::acquire(lf, 0..4, Wait::NonBlocking).unwrap();
                t1_tx.send(()).unwrap();
                t1_rx.recv().unwrap();
                drop(g);
                t1_tx.send(()).unwrap();
            })
        };
        from_t1.recv_timeout(STUCK).unwrap();
        // Same owner: no waiting, no conflict.
        let t2 = {
            let lf = lf.clone();
            std::thread::spawn(move || {
                let g = WriteGuard::acquire(lf.clone(), 2..6, Wait::NonBlocking).unwrap();
                let r = ReadGuard::acquire(lf.clone(), 0..8, Wait::NonBlocking).unwrap();
                (g, r)
            })
        };
        let (g2, r2) = t2.join().unwrap();
        assert_eq!(
            lf.held(),
            vec![(span(0..6), Kind::Exclusive), (span(6..8), Kind::Shared)]
        );
        to_t1.send(()).unwrap();
        from_t1.recv_timeout(STUCK).unwrap();
        t1.join().unwrap();
        // T1's 0..4 went back to the read guard's kind where T2 doesn't write.
        assert_eq!(
            lf.held(),
            vec![
                (span(0..2), Kind::Shared),
                (span(2..6), Kind::Exclusive),
                (span(6..8), Kind::Shared)
            ]
        );
        assert_eq!(
            observer.conflicts(Kind::Shared, 0..8).unwrap(),
            Some(holder(mode, 2..6, Kind::Exclusive, pid()))
        );
        assert!(observer.try_read(0..2).is_ok());
        assert!(observer.try_write(0..2).is_err());
        drop(g2);
        assert!(observer.try_write(2..6).is_err());
        assert!(observer.try_read(2..6).is_ok());
        drop(r2);
        assert!(lf.held().is_empty());
        assert!(observer.try_write(..).is_ok());
    }
}

/// Process mode: every handle of the file in this process is one owner,
/// so threads with their own handles do not exclude each other, and the
/// index stays locked until the last of them lets go.
#[test]
fn process_mode_handles_in_threads_do_not_exclude() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let barrier = Barrier::new(2);
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|s| {
        for _ in 0..2 {
            let (path, barrier, tx) = (&path, &barrier, tx.clone());
            s.spawn(move || {
                let lf = open(path, Mode::Process);
                let g = lf.try_write(0).expect("same owner: never kept out");
                barrier.wait();
                tx.send(lf.held()).unwrap();
                // Both hold it; the first to drop must not free it.
                barrier.wait();
                drop(g);
                barrier.wait();
            });
        }
        for _ in 0..2 {
            assert_eq!(rx.recv().unwrap(), vec![(span(0), Kind::Exclusive)]);
        }
    });
    assert_eq!(probe(&path, Kind::Shared, 0), None);

    // The first drop keeps the lock for the second.
    let h1 = open(&path, Mode::Process);
    let h2 = open(&path, Mode::Process);
    let (g1, g2) = std::thread::scope(|s| {
        let a = s.spawn(|| h1.write(3).unwrap());
        let b = s.spawn(|| h2.write(3).unwrap());
        (a.join().unwrap(), b.join().unwrap())
    });
    drop(g1);
    assert_eq!(
        probe(&path, Kind::Shared, 3),
        Some(holder(Mode::Process, 3, Kind::Exclusive, pid()))
    );
    drop(g2);
    assert_eq!(probe(&path, Kind::Shared, 3), None);
}

/// A guard that owns its handle through an `Arc` can be dropped on another
/// thread; the lock goes with it.
#[test]
fn owning_guard_dropped_on_another_thread() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let lf = Arc::new(open(&path, Mode::Ofd));
    let other = open(&path, Mode::Ofd);
    let g = WriteGuard::acquire(lf.clone(), 10..20, Wait::Blocking).unwrap();
    assert!(other.try_read(15).is_err());
    std::thread::spawn(move || drop(g)).join().unwrap();
    assert!(other.try_write(10..20).is_ok());
    assert!(lf.held().is_empty());
}
