//! `Mode::Shm` under attack: killed waiters, a table on the edge of full,
//! queue-order cycles, a sidecar removed or cut short while in use, a lock
//! file renamed or given a second name. Each test states the guarantee it
//! holds the engine to.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use locksfile::shm::verify;
use locksfile::{Error, Kind, LockFile, Mode, SidecarProblem, Wait};

fn shm(path: &Path) -> LockFile {
    open(path, Mode::Shm)
}

fn sidecar(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push("-shm");
    s.into()
}

/// A process killed while queued loses its queued request: a later
/// request that would have deferred to it (fair queueing) is not held up
/// by the dead entry, neither without waiting nor while waiting.
#[test]
fn a_killed_waiter_does_not_hold_up_later_requests() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let holder = shm(&path);
    holder
        .acquire(Kind::Shared, 0..4, Wait::NonBlocking)
        .unwrap();
    let mut waiter = fork(|| {
        let lf = shm(&path);
        lf.acquire(Kind::Exclusive, 2, Wait::Blocking).unwrap();
        unreachable!("granted behind a live reader");
    });
    wait_for_waiter(&path, 2, Some(waiter.pid));
    waiter.kill(libc::SIGKILL);
    assert_eq!(waiter.wait(), Exit::Signal(libc::SIGKILL));

    // Compatible with every holder; only the dead waiter's entry is in
    // the way.
    let reader = shm(&path);
    reader
        .acquire(Kind::Shared, 1..3, Wait::NonBlocking)
        .expect("a reader beside a reader, behind a dead writer's queued request");
    reader.release_all().unwrap();

    // The same with the request already waiting when the waiter dies.
    let mut waiter = fork(|| {
        let lf = shm(&path);
        lf.acquire(Kind::Exclusive, 2, Wait::Blocking).unwrap();
        unreachable!("granted behind a live reader");
    });
    wait_for_waiter(&path, 2, Some(waiter.pid));
    std::thread::scope(|s| {
        let r = s.spawn(|| {
            // Queued behind the writer (fair), so it waits.
            let got = reader.acquire(Kind::Shared, 1..3, Wait::Timeout(STUCK));
            (got, Instant::now())
        });
        wait_for_waiters(&path, 2);
        let killed = Instant::now();
        waiter.kill(libc::SIGKILL);
        let (got, granted) = r.join().unwrap();
        got.expect("granted once the writer ahead of it died");
        let late = granted.saturating_duration_since(killed);
        assert!(
            late < Duration::from_millis(100),
            "granted {late:?} after the kill"
        );
    });
    assert_eq!(waiter.wait(), Exit::Signal(libc::SIGKILL));
    drop(reader);
    drop(holder);
    verify(&path).unwrap();
}

/// Fill the table with `filler`'s records until a raise is refused (while
/// the result lives, this process may use 65,536 of them).
#[must_use]
fn fill(filler: &LockFile, from: u64) -> (u64, Capped) {
    let cap = capped(65_536, usize::MAX);
    let mut taken = 0u64;
    loop {
        // Every other index, so no two records merge.
        match filler.acquire(Kind::Exclusive, from + 2 * taken, Wait::NonBlocking) {
            Ok(()) => taken += 1,
            Err(Error::TableFull { .. }) => return (taken, cap),
            Err(e) => panic!("{e}"),
        }
        assert!(taken < 100_000, "the table never filled");
    }
}

/// Whether `table` holds every index of `owner` at its kind or stronger:
/// the table may hold more than the owner's bookkeeping (a lowering it had
/// no record for), never less.
fn holds_at_least(table: &[(locksfile::Span, Kind)], owner: &[(locksfile::Span, Kind)]) -> bool {
    owner.iter().all(|(want, kind)| {
        (want.start()..want.end()).all(|i| {
            table.iter().any(|(have, k)| {
                have.start() <= i && i < have.end() && (*k == Kind::Exclusive || k == kind)
            })
        })
    })
}

/// On a table that is full for raises, downgrades in the middle of an
/// exclusive lock (each splits a record and adds one) are never refused
/// (the engine's contract): once the records kept back for lowering are
/// gone, the table keeps the exclusive lock (over-locking, never
/// under-locking) and applies the downgrade at the owner's next call that
/// finds records.
#[test]
fn downgrades_on_a_full_table_never_panic_nor_lose_the_lock() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let owner = shm(&path);
    let base = 1_000_000u64;
    owner
        .acquire(Kind::Exclusive, base..base + 10_000, Wait::NonBlocking)
        .unwrap();
    let filler = shm(&path);
    let (_, _cap) = fill(&filler, 0);
    let me = owner.table_owner().unwrap();
    for k in 0..1_000u64 {
        let at = base + 1 + 2 * k;
        owner
            .acquire(Kind::Shared, at, Wait::NonBlocking)
            .unwrap_or_else(|e| panic!("downgrade of {at} (split number {k}): {e}"));
    }
    let table = table_held(&path, me);
    assert!(
        holds_at_least(&table, &owner.held()),
        "the table lost locks"
    );
    assert_ne!(table, owner.held(), "every downgrade found a record");
    // Others see the over-locking: the last downgraded index is still
    // exclusive in the table.
    let other = shm(&path);
    assert!(other
        .acquire(Kind::Shared, base + 1999, Wait::NonBlocking)
        .is_err());
    drop(filler);
    // The owner's next call finds records and applies what was deferred.
    owner
        .acquire(Kind::Exclusive, 0, Wait::NonBlocking)
        .unwrap();
    assert_eq!(table_held(&path, me), owner.held());
    other
        .acquire(Kind::Shared, base + 1999, Wait::NonBlocking)
        .unwrap();
    drop(other);
    drop(owner);
    verify(&path).unwrap();
}

/// Lowering is never refused (the engine's contract, which the owner
/// protocol and guard drops rely on): releases that split a lock keep
/// working on a table that is full for raises. Past the records kept back
/// for lowering, the table holds the released indices (never fewer than
/// the owner) until the owner's next call finds records.
#[test]
fn releases_on_a_full_table_never_fail() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let owner = shm(&path);
    let base = 1_000_000u64;
    owner
        .acquire(Kind::Exclusive, base..base + 10_000, Wait::NonBlocking)
        .unwrap();
    let filler = shm(&path);
    let (_, _cap) = fill(&filler, 0);
    let me = owner.table_owner().unwrap();
    for k in 0..1_000u64 {
        let at = base + 1 + 2 * k;
        owner
            .release(at)
            .unwrap_or_else(|e| panic!("release of {at} (split number {k}): {e}"));
    }
    assert!(holds_at_least(&table_held(&path, me), &owner.held()));
    let other = shm(&path);
    // Deferred: still held in the table.
    assert!(other
        .acquire(Kind::Exclusive, base + 1999, Wait::NonBlocking)
        .is_err());
    filler.release_all().unwrap();
    owner
        .acquire(Kind::Exclusive, 0, Wait::NonBlocking)
        .unwrap();
    assert_eq!(table_held(&path, me), owner.held());
    // Every other one of the first 2,000 indices is free for others.
    other
        .acquire(Kind::Exclusive, base + 1999, Wait::NonBlocking)
        .unwrap();
    assert!(other
        .acquire(Kind::Exclusive, base + 2000, Wait::NonBlocking)
        .is_err());
    drop(other);
    drop(filler);
    drop(owner);
    verify(&path).unwrap();
}

/// A cycle that runs through queue order: A holds 0 shared, B waits for
/// 0 exclusive (behind A), C holds 1 exclusive and asks for 0 shared
/// (compatible with A, but queued behind B), then A asks for 1: A waits
/// for C, C behind B, B for A. The cycle runs through queue order, so it
/// is broken by reordering, not reported: C's request goes ahead of B's
/// and is granted, A's once C lets go (its process ends), B's once A lets
/// go; no one gets `Error::Deadlock`.
#[test]
fn a_cycle_through_queue_order_is_broken_by_reordering() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let a = shm(&path);
    a.acquire(Kind::Shared, 0, Wait::NonBlocking).unwrap();
    let b = fork(|| {
        let lf = shm(&path);
        lf.acquire(Kind::Exclusive, 0, Wait::Timeout(STUCK))
            .unwrap();
    });
    wait_for_waiter(&path, 0, Some(b.pid));
    let c_holds = Pipe::new();
    let c = fork(|| {
        let lf = shm(&path);
        lf.acquire(Kind::Exclusive, 1, Wait::NonBlocking).unwrap();
        c_holds.send(b'c');
        lf.acquire(Kind::Shared, 0, Wait::Timeout(STUCK)).unwrap();
    });
    c_holds.expect(b'c');
    wait_for_waiter(&path, 0, Some(c.pid));
    let started = Instant::now();
    match a.acquire(Kind::Shared, 1, Wait::Timeout(STUCK)) {
        Ok(()) => {}
        other => panic!("expected a grant after {:?}: {other:?}", started.elapsed()),
    }
    assert_eq!(a.held(), vec![(span(0..2), Kind::Shared)]);
    a.release_all().unwrap();
    b.join();
    c.join();
    verify(&path).unwrap();
}

/// The sidecar removed while its table is in use (a cleaner of old files
/// in /tmp, a careless `rm`): a new opener must not set up a second table
/// beside the one the running owners use, where it would take a lock
/// another process holds.
#[test]
fn a_removed_sidecar_does_not_split_the_table() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let holding = hold_elsewhere(&path, Mode::Shm, Kind::Exclusive, 0);
    std::fs::remove_file(sidecar(&path)).unwrap();
    match LockFile::options().mode(Mode::Shm).open(&path) {
        Err(Error::Sidecar {
            problem: SidecarProblem::Replaced,
            ..
        }) => {}
        Err(e) => panic!("{e}"),
        Ok(lf) => {
            let got = lf.acquire(Kind::Exclusive, 0, Wait::NonBlocking);
            assert!(
                got.is_err(),
                "two owners hold index 0 exclusively: the new opener set up a second table"
            );
        }
    }
    assert!(
        !sidecar(&path).exists(),
        "the refused opener created a sidecar"
    );
    // An empty file put in its place is no better.
    std::fs::File::create(sidecar(&path)).unwrap();
    match LockFile::options().mode(Mode::Shm).open(&path) {
        Err(Error::Sidecar {
            problem: SidecarProblem::Replaced,
            ..
        }) => {}
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("set up a second table in an empty sidecar"),
    }
    assert_eq!(std::fs::metadata(sidecar(&path)).unwrap().len(), 0);
    holding.release();
    // Once the old table's users are gone, a new one is set up.
    let lf = shm(&path);
    lf.acquire(Kind::Exclusive, 0, Wait::NonBlocking).unwrap();
}

/// A kernel-mode open tells a table is in use from the lock file itself
/// (its users' in-use marker), so it is refused even when the sidecar
/// was removed; once the table's users are gone it opens.
#[test]
fn kernel_modes_see_a_table_in_use_without_its_sidecar() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let holding = hold_elsewhere(&path, Mode::Shm, Kind::Exclusive, 0);
    std::fs::remove_file(sidecar(&path)).unwrap();
    for mode in [Mode::Ofd, Mode::Process, Mode::Flock] {
        match LockFile::options().mode(mode).open(&path) {
            Err(Error::MixedModes { .. }) => {}
            Err(e) => panic!("{mode}: {e}"),
            Ok(_) => panic!("{mode} opened on a file whose table is in use"),
        }
    }
    holding.release();
    for mode in [Mode::Ofd, Mode::Process, Mode::Flock] {
        let lf = open(&path, mode);
        lf.acquire(Kind::Exclusive, 0.., Wait::NonBlocking).unwrap();
    }
}

/// The sidecar cut short by someone else while mapped. Its users' next
/// touch of the table faults (`SIGBUS`): the table is memory mapped from
/// the file, and no check before each access could close the window
/// between the check and the access, so that is out of scope (as for any
/// file-backed shared memory: the crate docs say so). What is guaranteed:
/// no new opener joins or resets the cut table while its users live (a
/// typed error, the file left as it is), and once they are gone the next
/// opener sets up a fresh table.
#[test]
fn a_truncated_sidecar_is_refused_to_new_openers() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let (opened, go) = (Pipe::new(), Pipe::new());
    let child = fork(|| {
        let lf = shm(&path);
        lf.acquire(Kind::Exclusive, 0, Wait::NonBlocking).unwrap();
        opened.send(b'o');
        go.expect(b'g');
        // Its table is cut short: closing it would touch it.
        std::mem::forget(lf);
    });
    opened.expect(b'o');
    std::fs::OpenOptions::new()
        .write(true)
        .open(sidecar(&path))
        .unwrap()
        .set_len(0)
        .unwrap();
    for _ in 0..2 {
        match LockFile::options().mode(Mode::Shm).open(&path) {
            Err(Error::Sidecar { .. }) => {}
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("joined or reset a table cut short under its users"),
        }
        assert_eq!(std::fs::metadata(sidecar(&path)).unwrap().len(), 0);
    }
    go.send(b'g');
    child.join();
    let lf = shm(&path);
    lf.acquire(Kind::Exclusive, 0, Wait::NonBlocking).unwrap();
    drop(lf);
    verify(&path).unwrap();
}

/// A request for a span with a hole the owner already holds (A holds 5
/// and asks for 0..10, so it waits for 0..5 and 6..10 at once) must be
/// seen by the deadlock search exactly as the grant rule treats it. A
/// waits behind W's queued request on 9..12 (fair queueing), W behind H's
/// lock on 11, and H then asks for 5, which A holds: H must not wait
/// forever (it is granted, or one of the three gets `Error::Deadlock`).
#[test]
fn a_span_around_a_held_hole_takes_part_in_the_deadlock_search() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let (h_holds, h_go, h_result) = (Pipe::new(), Pipe::new(), Pipe::new());
    let h = fork(|| {
        let lf = shm(&path);
        lf.acquire(Kind::Shared, 11, Wait::NonBlocking).unwrap();
        h_holds.send(b'h');
        h_go.expect(b'g');
        let r = lf.acquire(Kind::Shared, 5, Wait::Timeout(Duration::from_secs(3)));
        h_result.send(match r {
            Ok(()) => b'o',
            Err(Error::Deadlock { .. }) => b'd',
            Err(Error::TimedOut { .. }) => b't',
            Err(e) => panic!("{e}"),
        });
    });
    h_holds.expect(b'h');
    let w = fork(|| {
        let lf = shm(&path);
        match lf.acquire(Kind::Exclusive, 9..12, Wait::Timeout(STUCK)) {
            Ok(()) | Err(Error::Deadlock { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    });
    wait_for_waiter(&path, 9, Some(w.pid));
    let a = shm(&path);
    a.acquire(Kind::Exclusive, 5, Wait::NonBlocking).unwrap();
    let got = std::thread::scope(|s| {
        let t = s.spawn(|| {
            let r = a.acquire(Kind::Exclusive, 0..10, Wait::Timeout(STUCK));
            a.release_all().unwrap();
            r
        });
        // A is granted at once or queues.
        let deadline = Instant::now() + STUCK;
        while !t.is_finished() && !shm_waiters(&path).iter().any(|w| w.span.start() == 0) {
            assert!(Instant::now() < deadline, "A neither granted nor queued");
            std::thread::yield_now();
        }
        h_go.send(b'g');
        let h_got = h_result.recv();
        (h_got, t.join().unwrap())
    });
    assert_ne!(
        got.0, b't',
        "H waited 3 s in a cycle H -> A (5) -> W (queue order) -> H (11) that was never reported"
    );
    match got.1 {
        Ok(()) | Err(Error::Deadlock { .. }) => {}
        Err(e) => panic!("A: {e}"),
    }
    h.join();
    w.join();
    verify(&path).unwrap();
}

/// A lock file with two names (hard links): the kernel modes lock the one
/// file whatever the name, but a table is found by name, so two names
/// would make two tables that do not exclude each other. A file with more
/// than one name is refused by every name, with a typed error and nothing
/// created; a handle opened before the second name appeared keeps its
/// locks, and once the file has one name again it opens on that table.
#[test]
fn hard_links_to_one_lock_file_share_its_locks() {
    let _s = serial();
    let (dir, path) = lock_path();
    let before = shm(&path);
    before
        .acquire(Kind::Exclusive, 0, Wait::NonBlocking)
        .unwrap();
    let other_name = dir.path().join("other-name.lock");
    std::fs::hard_link(&path, &other_name).unwrap();
    for name in [&path, &other_name] {
        match LockFile::options().mode(Mode::Shm).open(name) {
            Err(Error::Sidecar {
                problem: SidecarProblem::HardLinked { links: 2 },
                ..
            }) => {}
            Err(e) => panic!("{}: {e}", name.display()),
            Ok(_) => panic!("{} opened with two names", name.display()),
        }
    }
    assert!(!sidecar(&other_name).exists(), "a second table was made");
    assert_eq!(before.held(), vec![(span(0), Kind::Exclusive)]);
    std::fs::remove_file(&other_name).unwrap();
    let after = shm(&path);
    assert!(after
        .acquire(Kind::Exclusive, 0, Wait::NonBlocking)
        .is_err());
    drop(before);
    after
        .acquire(Kind::Exclusive, 0, Wait::NonBlocking)
        .unwrap();
    drop(after);
    verify(&path).unwrap();
}

/// The lock file renamed while its table is in use: the new name has no
/// sidecar, and the in-use marker on the file tells the table in use is
/// elsewhere, so an opener by the new name is refused (nothing created)
/// until the old table's users are gone.
#[test]
fn a_lock_file_renamed_in_use_does_not_split_the_table() {
    let _s = serial();
    let (dir, path) = lock_path();
    let holding = hold_elsewhere(&path, Mode::Shm, Kind::Exclusive, 0);
    let new_name = dir.path().join("new-name.lock");
    std::fs::rename(&path, &new_name).unwrap();
    match LockFile::options().mode(Mode::Shm).open(&new_name) {
        Err(Error::Sidecar {
            problem: SidecarProblem::Replaced,
            ..
        }) => {}
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("opened a second table beside the one in use"),
    }
    assert!(!sidecar(&new_name).exists(), "a second table was made");
    holding.release();
    let lf = shm(&new_name);
    lf.acquire(Kind::Exclusive, 0, Wait::NonBlocking).unwrap();
}

/// The last index and spans to the end meet as in the kernel modes: a
/// single index at the top conflicts with `a..`, an open-ended span with
/// the top index, and releasing them leaves the table consistent.
#[test]
fn the_last_index_and_open_ended_spans_conflict() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let top = locksfile::INDEX_END - 1;
    let a = shm(&path);
    let b = shm(&path);
    a.acquire(Kind::Exclusive, top, Wait::NonBlocking).unwrap();
    assert!(b.acquire(Kind::Shared, 0.., Wait::NonBlocking).is_err());
    assert!(b
        .acquire(Kind::Shared, top - 70.., Wait::NonBlocking)
        .is_err());
    b.acquire(Kind::Shared, 0..top, Wait::NonBlocking).unwrap();
    a.acquire(Kind::Shared, top, Wait::NonBlocking).unwrap();
    b.acquire(Kind::Shared, 5.., Wait::NonBlocking).unwrap();
    assert!(a.acquire(Kind::Exclusive, top, Wait::NonBlocking).is_err());
    b.release(top).unwrap();
    a.acquire(Kind::Exclusive, top, Wait::NonBlocking).unwrap();
    assert_eq!(
        b.held(),
        vec![(locksfile::Span::new(0, top).unwrap(), Kind::Shared)]
    );
    assert_eq!(table_held(&path, b.table_owner().unwrap()), b.held());
    drop(a);
    drop(b);
    verify(&path).unwrap();
}
