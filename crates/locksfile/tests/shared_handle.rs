//! Threads sharing one handle's locks ([`Threads::Share`]; by default
//! they exclude each other, see `threads.rs`): a thread sleeping in the kernel for a lock
//! never makes another thread's release block, and the kernel ends up
//! holding exactly what the bookkeeping says.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use locksfile::{Error, Kind, LockFile, Threads, Wait};

/// A handle whose threads share its locks.
fn shared(path: &Path) -> LockFile {
    LockFile::options()
        .threads(Threads::Share)
        .open(path)
        .unwrap()
}

/// Blocked waiters on `path`'s inode, as `/proc/locks` lists them (`->`).
fn waiters(path: &Path) -> usize {
    let ino = std::fs::metadata(path).unwrap().ino();
    let locks = std::fs::read_to_string("/proc/locks").unwrap();
    locks
        .lines()
        .filter(|l| l.contains("->"))
        .filter(|l| {
            l.split_whitespace()
                .any(|w| w.rsplit(':').next() == Some(&ino.to_string()) && w.contains(':'))
        })
        .count()
}

/// Wait until a thread is asleep in the kernel on `path` (bounded).
fn until_waiting(path: &Path) {
    let t0 = Instant::now();
    while waiters(path) == 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "no waiter appeared");
        std::thread::yield_now();
    }
}

#[test]
fn release_while_a_sibling_thread_waits_never_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.lock");
    let lf = shared(&path);
    let other = shared(&path);
    let observer = shared(&path);

    let g1 = lf.read(0..4u64).unwrap();
    other.acquire(Kind::Shared, 5, Wait::NonBlocking).unwrap();

    std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            let w = lf.write(3..6u64).unwrap();
            // Once granted, 3..6 is ours exclusively.
            assert!(observer.conflicts(Kind::Shared, 3..6u64).unwrap().is_some());
            drop(w);
        });
        // Should an assertion below fail, free the waiter so the scope can end.
        struct Unblock<'a>(&'a LockFile);
        impl Drop for Unblock<'_> {
            fn drop(&mut self) {
                let _ = self.0.release_all();
            }
        }
        let _unblock = Unblock(&other);
        until_waiting(&path);

        // Lowering over a span a sibling is sleeping on goes ahead at once.
        drop(g1);
        assert_eq!(observer.conflicts(Kind::Exclusive, 0..3u64).unwrap(), None);
        // A change that needs a raise inside the busy span does not barge in.
        assert!(matches!(
            lf.try_write(4u64),
            Err(Error::WouldBlock { holder: None, .. })
        ));
        let t0 = Instant::now();
        assert!(matches!(
            lf.write_for(4u64, Duration::from_millis(30)),
            Err(Error::TimedOut { .. })
        ));
        assert!(t0.elapsed() >= Duration::from_millis(30));
        // An interruptible wait behind the sibling comes back to its caller
        // (to look at signals) instead of sleeping until the sibling is done.
        assert!(matches!(
            lf.acquire(Kind::Exclusive, 4, Wait::BlockingInterruptible),
            Err(Error::Interrupted)
        ));
        assert_eq!(lf.held_explicitly(), vec![]);
        // A read elsewhere in the busy span must also wait for the sibling
        // (the kernel's state there is in flux), but a read outside it is free.
        assert!(matches!(lf.try_read(3u64), Err(Error::WouldBlock { .. })));
        let r7 = lf.try_read(7u64).unwrap();

        other.release(5).unwrap();
        waiter.join().unwrap();
        let r3 = lf.try_read(3u64).unwrap();
        drop(r7);

        // The sibling's write is gone; only our read on 3 is left.
        assert_eq!(
            lf.held(),
            vec![(locksfile::Span::new(3, 4).unwrap(), Kind::Shared)]
        );
        assert!(observer.conflicts(Kind::Exclusive, 3u64).unwrap().is_some());
        assert_eq!(observer.conflicts(Kind::Shared, 3u64).unwrap(), None);
        assert_eq!(observer.conflicts(Kind::Exclusive, 4..).unwrap(), None);
        drop(r3);
    });
    assert!(lf.held().is_empty());
    assert_eq!(observer.conflicts(Kind::Exclusive, ..).unwrap(), None);
}

#[test]
fn failed_wait_gives_back_what_it_took() {
    // A wait over two pieces that gets the first and times out on the
    // second must leave the first as it was.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("partial.lock");
    let lf = shared(&path);
    let other = shared(&path);
    let observer = shared(&path);

    // 2..4 held exclusively by a guard: the write on 0..8 must raise 0..2
    // and 4..8, and 6 is taken by another owner.
    let g = lf.write(2..4u64).unwrap();
    other.acquire(Kind::Shared, 6, Wait::NonBlocking).unwrap();
    assert!(matches!(
        lf.acquire(
            Kind::Exclusive,
            0..8u64,
            Wait::Timeout(Duration::from_millis(20))
        ),
        Err(Error::TimedOut { .. })
    ));
    assert_eq!(
        lf.held(),
        vec![(locksfile::Span::new(2, 4).unwrap(), Kind::Exclusive)]
    );
    assert_eq!(observer.conflicts(Kind::Exclusive, 0..2u64).unwrap(), None);
    assert_eq!(observer.conflicts(Kind::Exclusive, 4..6u64).unwrap(), None);
    assert!(observer.conflicts(Kind::Shared, 2..4u64).unwrap().is_some());
    drop(g);
    other.release_all().unwrap();
    assert_eq!(observer.conflicts(Kind::Exclusive, ..).unwrap(), None);
}

#[test]
fn non_blocking_names_the_holder_unless_asked_not_to() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("holder.lock");
    let lf = shared(&path);
    let other = shared(&path);
    other
        .acquire(Kind::Exclusive, 3, Wait::NonBlocking)
        .unwrap();

    match lf.acquire(Kind::Shared, 2..5u64, Wait::NonBlocking) {
        Err(Error::WouldBlock {
            holder: Some(h), ..
        }) => {
            assert_eq!(h.span, locksfile::Span::new(3, 4).unwrap());
            assert_eq!(h.kind, Kind::Exclusive);
            assert_eq!(h.pid, None, "OFD locks have no pid");
        }
        other => panic!("expected WouldBlock with a holder, got {other:?}"),
    }
    assert!(matches!(
        lf.acquire(Kind::Shared, 2..5u64, Wait::NonBlockingNoHolder),
        Err(Error::WouldBlock { holder: None, .. })
    ));
    assert!(lf.held().is_empty());
    other.release_all().unwrap();
    lf.acquire(Kind::Shared, 2..5u64, Wait::NonBlockingNoHolder)
        .unwrap();
    assert_eq!(lf.held().len(), 1);
}
