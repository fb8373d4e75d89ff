//! The owner's fast path in shm mode (`owner/fast.rs`): a lone hold of one
//! index taken and let go with no mutex, and everything that must close it
//! (a second hold, another thread of the handle, statistics), each checked
//! against other owners in this process and in another one.

mod common;

use common::*;
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use locksfile::{Error, Kind, LockFile, Mode, Threads, Wait};

/// A shm handle whose threads exclude each other (the default).
fn shm(path: &Path) -> LockFile {
    LockFile::options().mode(Mode::Shm).open(path).unwrap()
}

fn shm_shared_threads(path: &Path) -> LockFile {
    LockFile::options()
        .mode(Mode::Shm)
        .threads(Threads::Share)
        .open(path)
        .unwrap()
}

fn would_block<T: std::fmt::Debug>(r: Result<T, Error>) {
    match r {
        Err(Error::WouldBlock { .. }) => {}
        other => panic!("expected WouldBlock, got {other:?}"),
    }
}

/// Another handle (another owner) is kept out of a lone fast hold, of
/// either kind and either API, and gets it once it is let go; and the
/// same when the hold is made the usual way (beside another lock).
#[test]
fn another_owner_is_kept_out_fast_and_slow() {
    let (_dir, path) = lock_path();
    let a = shm(&path);
    let b = shm(&path);
    for beside in [false, true] {
        // With two other locks held, the fast path's slots are full: the
        // usual way.
        let other = beside.then(|| (a.write(100).unwrap(), a.write(101).unwrap()));
        {
            let g = a.try_write(5).unwrap();
            would_block(b.try_read(5));
            would_block(b.try_write(5));
            assert_eq!(a.held().iter().filter(|(s, _)| s.start() == 5).count(), 1);
            drop(g);
        }
        drop(b.try_write(5).unwrap());
        {
            let g = a.try_read(5).unwrap();
            drop(b.try_read(5).unwrap());
            would_block(b.try_write(5));
            drop(g);
        }
        a.acquire(Kind::Exclusive, 5, Wait::NonBlocking).unwrap();
        would_block(b.acquire(Kind::Shared, 5, Wait::NonBlocking));
        a.release(5).unwrap();
        b.acquire(Kind::Exclusive, 5, Wait::NonBlocking).unwrap();
        would_block(a.try_read(5));
        b.release(5).unwrap();
        a.acquire(Kind::Shared, 5, Wait::NonBlocking).unwrap();
        b.acquire(Kind::Shared, 5, Wait::NonBlocking).unwrap();
        would_block(b.try_write(5));
        a.release(5).unwrap();
        b.release(5).unwrap();
        drop(other);
        assert!(a.held().is_empty() && b.held().is_empty());
    }
}

/// A blocking take waits for a fast hold of another owner and is granted
/// when it is let go.
#[test]
fn a_wait_ends_when_a_fast_hold_is_let_go() {
    let (_dir, path) = lock_path();
    let a = shm(&path);
    let g = a.try_write(9).unwrap();
    let path2 = path.clone();
    let waiter = thread::spawn(move || {
        let b = shm(&path2);
        let w = b.write_for(9, Duration::from_secs(20)).map(drop);
        w.is_ok()
    });
    thread::sleep(Duration::from_millis(50));
    drop(g);
    assert!(waiter.join().unwrap());
}

/// Holds of one thread compose with the fast hold they close, whatever
/// the order they go in; what is left held is exactly what is asked.
#[test]
fn nested_holds_take_the_fast_hold_over() {
    let (_dir, path) = lock_path();
    let a = shm(&path);
    let b = shm(&path);
    let outer = a.try_write(3).unwrap();
    let inner = a.try_read(3).unwrap();
    let other = a.try_write(4).unwrap();
    drop(outer);
    // Still held shared by the inner guard.
    drop(b.try_read(3).unwrap());
    would_block(b.try_write(3));
    drop(inner);
    drop(b.try_write(3).unwrap());
    would_block(b.try_write(4));
    drop(other);
    drop(b.try_write(4).unwrap());
    // A fast explicit lock, converted, kept over a guard, released.
    a.acquire(Kind::Shared, 7, Wait::NonBlocking).unwrap();
    a.acquire(Kind::Exclusive, 7, Wait::NonBlocking).unwrap();
    assert_eq!(a.held_explicitly(), vec![(span(7), Kind::Exclusive)]);
    let g = a.try_read(7).unwrap();
    a.release(7).unwrap();
    assert_eq!(a.held(), vec![(span(7), Kind::Shared)]);
    drop(g);
    assert!(a.held().is_empty());
    drop(b.try_write(7).unwrap());
    // An upgrade of a fast read guard.
    let r = a.try_read(8).unwrap();
    let w = r.try_upgrade().unwrap();
    would_block(b.try_read(8));
    drop(w);
    drop(b.try_write(8).unwrap());
    // Releasing everything takes a fast explicit lock too.
    a.acquire(Kind::Exclusive, 11, Wait::NonBlocking).unwrap();
    a.release_all().unwrap();
    drop(b.try_write(11).unwrap());
}

/// Another thread of the handle holds something (on the fast path) while
/// this thread takes and lets go pairs: the threads exclude each other on
/// the held index, the pairs on other indices are granted, and the held
/// lock is intact, then let go for good.
#[test]
fn a_pair_of_one_thread_while_another_holds() {
    let (_dir, path) = lock_path();
    let a = Arc::new(shm(&path));
    let b = shm(&path);
    let held = Arc::new(Barrier::new(2));
    let done = Arc::new(Barrier::new(2));
    let holder = {
        let (a, held, done) = (a.clone(), held.clone(), done.clone());
        thread::spawn(move || {
            let g = a.try_write(1).unwrap();
            held.wait();
            done.wait();
            drop(g);
            a.acquire(Kind::Exclusive, 2, Wait::NonBlocking).unwrap();
            held.wait();
            done.wait();
            a.release(2).unwrap();
        })
    };
    for taken in [1, 2] {
        held.wait();
        for _ in 0..100 {
            drop(a.try_write(5).unwrap());
            drop(a.try_read(6).unwrap());
            a.acquire(Kind::Exclusive, 5, Wait::NonBlocking).unwrap();
            a.release(5).unwrap();
            // The other thread's: kept out.
            would_block(a.try_read(taken));
            would_block(a.acquire(Kind::Shared, taken, Wait::NonBlocking));
            would_block(b.try_read(taken));
        }
        done.wait();
    }
    holder.join().unwrap();
    drop(b.try_write(1).unwrap());
    drop(b.try_write(2).unwrap());
    assert!(a.held().is_empty());
}

/// Handles whose threads share: one thread's fast explicit lock is every
/// thread's, and another thread releases it.
#[test]
fn shared_threads_release_each_others_explicit_lock() {
    let (_dir, path) = lock_path();
    let a = Arc::new(shm_shared_threads(&path));
    let b = shm(&path);
    a.acquire(Kind::Exclusive, 12, Wait::NonBlocking).unwrap();
    let a2 = a.clone();
    thread::spawn(move || {
        assert_eq!(a2.held_explicitly(), vec![(span(12), Kind::Exclusive)]);
        a2.release(12).unwrap();
    })
    .join()
    .unwrap();
    drop(b.try_write(12).unwrap());
    a.acquire(Kind::Shared, 12, Wait::NonBlocking).unwrap();
    let a2 = a.clone();
    thread::spawn(move || a2.release(12).unwrap())
        .join()
        .unwrap();
    drop(b.try_write(12).unwrap());
}

/// Threads of two handles hammer two indices with guard pairs of both
/// kinds and explicit pairs, so that fast holds, take-overs and the usual
/// way race: no two writers (nor a writer and a reader) are ever inside at
/// once, and everything is let go at the end.
#[test]
fn threads_and_owners_race_through_both_paths() {
    let (_dir, path) = lock_path();
    let handles = [Arc::new(shm(&path)), Arc::new(shm(&path))];
    // Per index: -1 a writer is inside, n > 0 readers.
    let inside: Arc<[AtomicI64; 2]> = Arc::new([AtomicI64::new(0), AtomicI64::new(0)]);
    let granted = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..6)
        .map(|t| {
            let lf = handles[t % 2].clone();
            let (inside, granted) = (inside.clone(), granted.clone());
            thread::spawn(move || {
                for n in 0..3000u64 {
                    let i = ((n + t as u64) % 2) as usize;
                    let kind = if (n / 2 + t as u64) % 3 == 0 {
                        Kind::Shared
                    } else {
                        Kind::Exclusive
                    };
                    let explicit = n % 5 == 0;
                    let got = if explicit {
                        lf.acquire(kind, i as u64, Wait::NonBlocking).is_ok()
                    } else {
                        let inside_now = || {
                            enter(&inside[i], kind);
                            std::hint::spin_loop();
                            leave(&inside[i], kind);
                        };
                        match kind {
                            Kind::Shared => lf.try_read(i as u64).map(|g| {
                                inside_now();
                                drop(g)
                            }),
                            Kind::Exclusive => lf.try_write(i as u64).map(|g| {
                                inside_now();
                                drop(g)
                            }),
                        }
                        .is_ok()
                    };
                    if got {
                        granted.fetch_add(1, Ordering::Relaxed);
                    }
                    if explicit && got {
                        enter(&inside[i], kind);
                        leave(&inside[i], kind);
                        lf.release(i as u64).unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(granted.load(Ordering::Relaxed) > 0);
    for lf in &handles {
        assert!(lf.held().is_empty());
    }
    let c = shm(&path);
    drop(c.try_write(0..2).unwrap());
}

fn enter(at: &AtomicI64, kind: Kind) {
    match kind {
        Kind::Exclusive => {
            let was = at.swap(-1, Ordering::SeqCst);
            assert_eq!(was, 0, "a writer got in beside another holder");
        }
        Kind::Shared => {
            let was = at.fetch_add(1, Ordering::SeqCst);
            assert!(was >= 0, "a reader got in beside a writer");
        }
    }
}

fn leave(at: &AtomicI64, kind: Kind) {
    match kind {
        Kind::Exclusive => at.store(0, Ordering::SeqCst),
        Kind::Shared => {
            at.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// With statistics on, pairs are counted (they go the usual way).
#[test]
fn statistics_count_every_pair() {
    let (_dir, path) = lock_path();
    let lf = LockFile::options()
        .mode(Mode::Shm)
        .stats(true)
        .open(&path)
        .unwrap();
    for _ in 0..10 {
        drop(lf.try_write(21).unwrap());
        drop(lf.try_read(21).unwrap());
        lf.acquire(Kind::Exclusive, 21, Wait::NonBlocking).unwrap();
        lf.release(21).unwrap();
    }
    let stats = lf.stats().unwrap();
    let at = stats
        .locks
        .iter()
        .find(|l| l.index == Some(21))
        .expect("index 21 counted");
    assert_eq!(at.acquired, 30);
    assert_eq!(at.hold.count(), 30);
}

/// A fast hold in a process that forks: the child's inherited handle
/// refuses everything and its drop (and its guard's) lets go of nothing;
/// a handle of the child's own is kept out; the parent lets go normally.
#[test]
fn a_forked_child_never_releases_a_fast_hold() {
    let _s = serial();
    let (_dir, path) = lock_path();
    // Alone, beside a second fast hold, and beside two more locks (the
    // usual way's bookkeeping holds all three).
    for more in [0, 1, 2] {
        let beside = more > 0;
        let lf = Arc::new(shm(&path));
        let g = locksfile::WriteGuard::acquire(lf.clone(), 5, Wait::NonBlocking).unwrap();
        if beside {
            lf.acquire(Kind::Shared, 6, Wait::NonBlocking).unwrap();
        }
        if more == 2 {
            lf.acquire(Kind::Shared, 9, Wait::NonBlocking).unwrap();
        }
        assert_eq!(lf.fast_holds(), [1, 2, 0][more]);
        let mut inherited = Some((g, lf.clone()));
        let child = fork(|| {
            let (g, lf) = inherited.take().unwrap();
            assert!(matches!(lf.try_write(7), Err(Error::Forked)));
            assert!(matches!(
                lf.acquire(Kind::Shared, 8, Wait::NonBlocking),
                Err(Error::Forked)
            ));
            assert!(matches!(lf.release(6), Err(Error::Forked)));
            drop(g);
            drop(lf);
            let own = shm(&path);
            would_block(own.try_read(5));
            if beside {
                would_block(own.try_write(6));
            }
        });
        child.join();
        let other = shm(&path);
        would_block(other.try_read(5));
        if beside {
            would_block(other.try_write(6));
            drop(other.try_read(6).unwrap());
        }
        if more == 2 {
            would_block(other.try_write(9));
        }
        drop(inherited);
        lf.release_all().unwrap();
        drop(other.try_write(5..10).unwrap());
    }
}

/// Two processes race guard pairs on one index through their fast paths,
/// each adding one to a counter in a file under the lock: a race between
/// them would lose an addition (or read a file cut short).
#[test]
fn two_processes_race_on_one_index() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let data = path.with_extension("data");
    std::fs::write(&data, 0u64.to_le_bytes()).unwrap();
    let work = |path: &Path, data: &Path| {
        let lf = shm(path);
        for _ in 0..2000 {
            let g = lf.write(0).unwrap();
            // Read, then write back one more: lost updates show a race.
            let n = u64::from_le_bytes(std::fs::read(data).unwrap().try_into().unwrap());
            std::fs::write(data, (n + 1).to_le_bytes()).unwrap();
            drop(g);
        }
    };
    let child = fork(|| work(&path, &data));
    work(&path, &data);
    child.join();
    let n = u64::from_le_bytes(std::fs::read(&data).unwrap().try_into().unwrap());
    assert_eq!(n, 4000);
}

/// A thread that waits for a sibling's wait in the engine to end finds
/// the fast path closed when it goes on: the sibling's wait, ended with
/// nothing got, left the handle quiet and opened the path meanwhile.
/// Before, the waking thread took its lock with the path open, so that a
/// later explicit release took the fast way's "nothing is held" and left
/// the lock in the table.
#[test]
fn a_thread_woken_by_a_siblings_wait_closes_the_fast_path_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.lock");
    let other = shm(&path);
    other
        .acquire(Kind::Exclusive, 5, Wait::NonBlocking)
        .unwrap();
    let h = Arc::new(shm_shared_threads(&path));
    let cancel = locksfile::Cancel::new();
    let (tx, rx) = std::sync::mpsc::channel();
    let sibling = {
        let (h, cancel, tx) = (h.clone(), cancel.clone(), tx.clone());
        thread::spawn(move || {
            tx.send(tid()).unwrap();
            // Waits in the engine over 4..6 (5 is the other owner's).
            h.acquire_cancellable(Kind::Exclusive, 4..6, Wait::Blocking, &cancel)
        })
    };
    asleep_in_kernel(rx.recv().unwrap());
    let waker = {
        let (h, tx) = (h.clone(), tx.clone());
        thread::spawn(move || {
            tx.send(tid()).unwrap();
            // 4 is in the sibling's wait: this waits for that wait to end.
            h.acquire(Kind::Exclusive, 4, Wait::Blocking)
        })
    };
    asleep_in_kernel(rx.recv().unwrap());
    cancel.cancel();
    assert!(matches!(sibling.join().unwrap(), Err(Error::Cancelled)));
    waker.join().unwrap().unwrap();
    would_block(other.acquire(Kind::Exclusive, 4, Wait::NonBlocking));
    h.release(4).unwrap();
    // Let go in the table too.
    other
        .acquire(Kind::Exclusive, 4, Wait::NonBlocking)
        .unwrap();
    assert!(h.held().is_empty());
}

/// A walk hand over hand stays on the fast path: the next index is taken
/// in the second slot before the last is let go, both kept outside the
/// bookkeeping; another owner, in this process and in another one, is kept
/// out of both, and gets the last once it is let go.
#[test]
fn a_walk_hand_over_hand_keeps_both_holds_fast() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let a = shm(&path);
    let b = shm(&path);
    let (to_child, to_parent) = (Pipe::new(), Pipe::new());
    let child = fork(|| {
        let c = shm(&path);
        // For each step the parent names: both indices are refused.
        loop {
            let step = to_child.recv() as u64;
            if step == 0 {
                break;
            }
            for i in [step, step + 1] {
                would_block(c.try_read(i));
            }
            to_parent.send(1);
        }
    });
    a.acquire(Kind::Exclusive, 1, Wait::NonBlocking).unwrap();
    let mut guards = std::collections::HashMap::new();
    for step in 1..40u64 {
        let next = step + 1;
        // Explicit locks and guards in turn.
        if next % 2 == 0 {
            a.acquire(Kind::Exclusive, next, Wait::NonBlocking).unwrap();
        } else {
            guards.insert(next, a.try_write(next).unwrap());
        }
        // Another owner's try makes a fast hold a record of the table (and
        // the path then stays closed while the owner holds anything): the
        // first steps are left alone, the later ones are checked by both.
        let checked = step >= 30;
        if !checked {
            assert_eq!(
                a.fast_holds(),
                2,
                "step {step}: both holds on the fast path"
            );
        } else {
            for i in [step, next] {
                would_block(b.try_read(i));
            }
            to_child.send(step as u8);
            to_parent.expect(1);
        }
        // Let go of the last, each the way it was taken.
        match guards.remove(&step) {
            Some(g) => drop(g),
            None => a.release(step).unwrap(),
        }
        if !checked {
            assert_eq!(a.fast_holds(), 1, "step {step}");
        }
        drop(b.try_read(step).unwrap());
    }
    to_child.send(0);
    child.join();
    a.release(40).unwrap();
    assert_eq!(a.fast_holds(), 0);
    assert!(a.held().is_empty());
    drop(b.try_write(40).unwrap());
}

/// A third hold goes the usual way and takes both fast holds over: others
/// are still kept out of all three, each is let go the usual way, and the
/// path opens again once the owner holds nothing.
#[test]
fn a_third_hold_takes_both_fast_holds_over() {
    let (_dir, path) = lock_path();
    let a = shm(&path);
    let b = shm(&path);
    let g1 = a.write(1).unwrap();
    a.acquire(Kind::Shared, 2, Wait::NonBlocking).unwrap();
    assert_eq!(a.fast_holds(), 2);
    let g3 = a.write(3).unwrap();
    assert_eq!(a.fast_holds(), 0, "taken over into the bookkeeping");
    would_block(b.try_read(1));
    drop(b.try_read(2).unwrap());
    would_block(b.try_write(2));
    would_block(b.try_read(3));
    assert_eq!(
        a.held(),
        vec![
            (locksfile::Span::new(1, 2).unwrap(), Kind::Exclusive),
            (locksfile::Span::new(2, 3).unwrap(), Kind::Shared),
            (locksfile::Span::new(3, 4).unwrap(), Kind::Exclusive),
        ]
    );
    drop(g1);
    drop(b.try_write(1).unwrap());
    a.release_all().unwrap();
    drop(b.try_write(2).unwrap());
    would_block(b.try_read(3));
    drop(g3);
    assert!(a.held().is_empty());
    // Quiet again: the next pair is fast.
    let g = a.write(7).unwrap();
    assert_eq!(a.fast_holds(), 1);
    drop(g);
    drop(b.try_write(7).unwrap());
    drop(b.try_write(3).unwrap());
}

/// Two fast holds on neighbouring indices read as one lock to another
/// owner's probe, as the kernel merges an owner's touching locks; a
/// release over both (`release_all`, and a wide lowering) lets go of
/// both; a take of an index already held in the other slot (nesting,
/// conversion) goes the usual way and keeps the lock.
#[test]
fn two_fast_holds_merge_and_go_together() {
    let (_dir, path) = lock_path();
    let a = shm(&path);
    let b = shm(&path);
    a.acquire(Kind::Exclusive, 10, Wait::NonBlocking).unwrap();
    a.acquire(Kind::Exclusive, 11, Wait::NonBlocking).unwrap();
    assert_eq!(a.fast_holds(), 2);
    match b.try_read(10) {
        Err(Error::WouldBlock {
            holder: Some(h), ..
        }) => assert_eq!(h.span, locksfile::Span::new(10, 12).unwrap()),
        other => panic!("expected WouldBlock with a holder, got {other:?}"),
    }
    a.release_all().unwrap();
    drop(b.try_write(10..12).unwrap());
    // Nesting: a guard over an explicit lock of the same index.
    a.acquire(Kind::Shared, 20, Wait::NonBlocking).unwrap();
    let g = a.write(20).unwrap();
    would_block(b.try_read(20));
    drop(g);
    drop(b.try_read(20).unwrap());
    would_block(b.try_write(20));
    // Conversion of one of two fast holds.
    a.acquire(Kind::Shared, 21, Wait::NonBlocking).unwrap();
    a.acquire(Kind::Exclusive, 21, Wait::NonBlocking).unwrap();
    would_block(b.try_read(21));
    a.release(20..22).unwrap();
    drop(b.try_write(20..22).unwrap());
    assert!(a.held().is_empty());
}
