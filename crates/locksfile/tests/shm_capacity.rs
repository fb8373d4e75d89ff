//! The shm table at scale: 10 million records held at once, 100,000
//! owners of one table, the sidecar's memory growing with use and given
//! back once released, and crash safety, fairness, deadlock detection and
//! the fast lane while the table grows past what a small table holds.
//!
//! The two largest run only in release builds (`scripts/test` runs them
//! with `--release`): in a debug build, filling 10 million records takes
//! minutes.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Instant;

use common::*;
use locksfile::{Error, Kind, LockFile, Mode, Wait};

/// Bytes of memory (or disk) the sidecar of `path` takes now.
fn sidecar_bytes(path: &Path) -> u64 {
    let mut s = path.as_os_str().to_owned();
    s.push("-shm");
    std::fs::metadata(s).expect("sidecar").blocks() * 512
}

fn shm(path: &Path) -> LockFile {
    open(path, Mode::Shm)
}

/// The ns one uncontended exclusive pair on `i` takes, the median of 7
/// rounds of 2,000 (reported, not asserted: the benchmark compares).
fn pair_ns(lf: &LockFile, i: u64) -> f64 {
    let mut rounds: Vec<f64> = (0..7)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..2000 {
                drop(lf.try_write(i).unwrap());
            }
            t.elapsed().as_nanos() as f64 / 2000.0
        })
        .collect();
    rounds.sort_by(f64::total_cmp);
    rounds[3]
}

/// A table far past 65,536 records (the old fixed capacity): 10 million
/// single-index locks held by one owner, every other index so that none
/// merge. Another owner is refused each held index it tries and gets the
/// free ones; the sidecar's memory grows to hold them and is given back
/// once they are released; the table verifies throughout.
#[test]
#[cfg_attr(debug_assertions, ignore = "release builds only (scripts/test)")]
fn ten_million_records_held_at_once() {
    const N: u64 = 10_000_000;
    let _s = serial();
    let (_dir, path) = lock_path();
    let holder = shm(&path);
    let other = shm(&path);
    let fresh = sidecar_bytes(&path);
    let one = pair_ns(&other, 1);
    let t = Instant::now();
    for k in 0..N {
        holder
            .acquire(Kind::Exclusive, 2 * k, Wait::NonBlocking)
            .unwrap_or_else(|e| panic!("lock {k} of {N}: {e}"));
    }
    let filled = t.elapsed();
    let full = sidecar_bytes(&path);
    assert!(
        full > fresh + N * 40,
        "10 million records in {full} bytes (fresh: {fresh})"
    );
    // Exclusion holds everywhere in the table, and the free indices
    // between the held ones are free.
    for k in (0..N).step_by(99_991) {
        assert!(
            matches!(
                other.acquire(Kind::Shared, 2 * k, Wait::NonBlocking),
                Err(Error::WouldBlock { .. })
            ),
            "index {} held by another owner was granted",
            2 * k
        );
        other
            .acquire(Kind::Exclusive, 2 * k + 1, Wait::NonBlocking)
            .unwrap();
        other.release(2 * k + 1).unwrap();
    }
    let at_full = pair_ns(&other, 1);
    locksfile::shm::verify(&path).unwrap();
    assert_eq!(holder.held().len() as u64, N);
    eprintln!(
        "10M records: filled in {filled:?}, sidecar {fresh} -> {full} bytes; \
         pair of another owner {one:.0} ns at 0 held, {at_full:.0} ns at 10M"
    );
    holder.release_all().unwrap();
    let released = sidecar_bytes(&path);
    assert!(
        released < full / 2,
        "released: the sidecar still takes {released} of {full} bytes"
    );
    locksfile::shm::verify(&path).unwrap();
    // And the table is as good as new.
    holder
        .acquire(Kind::Exclusive, 0..N, Wait::NonBlocking)
        .unwrap();
    assert!(other.try_write(5).is_err());
    eprintln!("released: {released} bytes");
}

/// 100,000 owners of one table at once (the old capacity: 1,024), spread
/// over processes (each handle has descriptors of its own), each holding
/// one index on the fast lane; the table lists every one of them, and
/// yet another owner locks and is refused as it should be.
#[test]
#[cfg_attr(debug_assertions, ignore = "release builds only (scripts/test)")]
fn a_hundred_thousand_owners() {
    const OWNERS: usize = 100_000;
    let _s = serial();
    let (_dir, path) = lock_path();
    // A descriptor a handle (its lock file; the sidecar's and the
    // marker's are shared by the process's handles), and room.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: valid pointer; raising the soft limit to the hard one.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
    let per_child = (lim.rlim_cur.min(1 << 20) as usize)
        .saturating_sub(256)
        .min(20_000);
    assert!(
        per_child >= 100,
        "descriptor limit {} too low",
        lim.rlim_cur
    );
    let first = shm(&path);
    let mut children = Vec::new();
    let mut ready = Vec::new();
    let go = Pipe::new();
    let mut opened = 0;
    let t = Instant::now();
    while opened < OWNERS {
        let n = per_child.min(OWNERS - opened);
        let base = opened as u64;
        let up = Pipe::new();
        let path = path.clone();
        let go = &go;
        let upw = &up;
        children.push(fork(move || {
            let handles: Vec<LockFile> = (0..n)
                .map(|k| {
                    let h = LockFile::options()
                        .mode(Mode::Shm)
                        .open(&path)
                        .unwrap_or_else(|e| panic!("owner {}: {e}", base as usize + k));
                    h.acquire(Kind::Exclusive, 1_000 + base + k as u64, Wait::NonBlocking)
                        .unwrap();
                    h
                })
                .collect();
            upw.send(1);
            go.expect(2);
            drop(handles);
        }));
        ready.push(up);
        opened += n;
    }
    for (up, child) in ready.iter().zip(&children) {
        assert_eq!(
            up.try_recv(STUCK * 6),
            Some(1),
            "child {} never opened its owners: {}",
            child.pid,
            child.message()
        );
    }
    let took = t.elapsed();
    let snap = locksfile::shm::Snapshot::read(&path).unwrap();
    assert_eq!(snap.holders.len(), OWNERS);
    // One more owner: it locks a free index, and is refused held ones.
    let last = shm(&path);
    let pair = pair_ns(&last, 5);
    for k in (0..OWNERS as u64).step_by(9_973) {
        assert!(last.try_write(1_000 + k).is_err());
    }
    eprintln!(
        "{OWNERS} owners (+2) in {} processes opened in {took:?}; pair {pair:.0} ns",
        children.len()
    );
    drop(last);
    for _ in &children {
        go.send(2);
    }
    for c in children {
        c.join();
    }
    drop(first);
    let alone = shm(&path);
    eprintln!("pair with 2 owners: {:.0} ns", pair_ns(&alone, 5));
    locksfile::shm::verify(&path).unwrap();
}

/// The table grows while its users are killed: a process taking records
/// past the old capacity (single indices and spans) is SIGKILLed at a
/// random point of its growth, again and again, while another waits for
/// one of its locks (untimed, queued: granted when the dead owner's locks
/// go) and a third holds one on the fast lane throughout. After each kill
/// the table verifies, the dead owner's locks are free, and the fast hold
/// still excludes.
#[test]
fn growth_survives_kills() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let fast = shm(&path);
    fast.acquire(Kind::Exclusive, 7, Wait::NonBlocking).unwrap();
    let mut seed = 0x9e37_79b9_u64;
    for round in 0..8 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let stop_after = 1 + seed % 40;
        let progress = Pipe::new();
        let p = path.clone();
        let pr = &progress;
        let grower = fork(move || {
            let lf = LockFile::options().mode(Mode::Shm).open(&p).unwrap();
            lf.acquire(Kind::Exclusive, 3, Wait::NonBlocking).unwrap();
            for k in 0u64.. {
                let at = 100 + 4 * k;
                if k % 7 == 0 {
                    lf.acquire(Kind::Shared, at..at + 3, Wait::NonBlocking)
                        .unwrap();
                } else {
                    lf.acquire(Kind::Exclusive, at, Wait::NonBlocking).unwrap();
                }
                if k % 1000 == 999 {
                    pr.send(1);
                }
            }
        });
        // A queued waiter for the grower's lock (and the fast hold stays).
        let waited = Pipe::new();
        let p = path.clone();
        let w = &waited;
        for _ in 0..stop_after {
            assert_eq!(
                progress.try_recv(STUCK),
                Some(1),
                "round {round}: the grower stalled: {}",
                grower.message()
            );
        }
        let waiter = fork(move || {
            let lf = LockFile::options().mode(Mode::Shm).open(&p).unwrap();
            lf.acquire(Kind::Exclusive, 3, Wait::Blocking).unwrap();
            assert!(lf.try_write(7).is_err(), "the fast hold was lost");
            w.send(1);
        });
        wait_for_waiter(&path, 3, Some(waiter.pid));
        grower.kill(libc::SIGKILL);
        let mut grower = grower;
        assert_eq!(grower.wait(), Exit::Signal(libc::SIGKILL));
        assert_eq!(
            waited.try_recv(STUCK),
            Some(1),
            "round {round}: the waiter was not granted after the kill"
        );
        waiter.join();
        locksfile::shm::verify(&path).unwrap_or_else(|e| panic!("round {round}: {e}"));
        let probe = shm(&path);
        probe
            .acquire(
                Kind::Exclusive,
                100..100 + 4 * 1000 * stop_after,
                Wait::NonBlocking,
            )
            .unwrap_or_else(|e| panic!("round {round}: the dead grower's locks: {e}"));
        assert!(probe.try_write(7).is_err(), "round {round}: fast hold lost");
    }
    // Everything released: the records' memory is given back.
    let grown = sidecar_bytes(&path);
    drop(fast);
    locksfile::shm::verify(&path).unwrap();
    let probe = shm(&path);
    drop(probe);
    let after = sidecar_bytes(&path);
    assert!(after < grown, "grown to {grown} bytes, still {after}");
}

/// Deadlock detection and a fair queue in a table that has grown past its
/// old capacity: with 70,000 records held by a third owner, two owners
/// that wait for each other are told (one of them gets
/// `Error::Deadlock`), and a queued writer is granted before readers
/// that came after it.
#[test]
fn deadlocks_found_in_a_grown_table() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let bulk = shm(&path);
    for k in 0..70_000u64 {
        bulk.acquire(Kind::Shared, 1_000 + 2 * k, Wait::NonBlocking)
            .unwrap();
    }
    let a_holds = Pipe::new();
    let b_holds = Pipe::new();
    let result = Pipe::new();
    let p = path.clone();
    let (ah, bh, res) = (&a_holds, &b_holds, &result);
    let a = fork(move || {
        let lf = LockFile::options().mode(Mode::Shm).open(&p).unwrap();
        lf.acquire(Kind::Exclusive, 1, Wait::NonBlocking).unwrap();
        ah.send(1);
        bh.expect(1);
        let r = lf.acquire(Kind::Exclusive, 2, Wait::Blocking);
        res.send(u8::from(matches!(r, Err(Error::Deadlock { .. }))));
        drop(lf);
    });
    let p = path.clone();
    let b = fork(move || {
        let lf = LockFile::options().mode(Mode::Shm).open(&p).unwrap();
        lf.acquire(Kind::Exclusive, 2, Wait::NonBlocking).unwrap();
        ah.expect(1);
        bh.send(1);
        let r = lf.acquire(Kind::Exclusive, 1, Wait::Blocking);
        res.send(u8::from(matches!(r, Err(Error::Deadlock { .. }))));
        drop(lf);
    });
    let first = result.try_recv(STUCK).expect("neither was told");
    let second = result.try_recv(STUCK).expect("the other never went on");
    assert_eq!(first + second, 1, "exactly one deadlock error");
    a.join();
    b.join();
    // A queued writer goes before readers that come after it.
    let writer_granted = Pipe::new();
    let p = path.clone();
    let wg = &writer_granted;
    let writer = fork(move || {
        let lf = LockFile::options().mode(Mode::Shm).open(&p).unwrap();
        lf.acquire(Kind::Exclusive, 1_000, Wait::Blocking).unwrap();
        wg.send(1);
    });
    wait_for_waiter(&path, 1_000, Some(writer.pid));
    let late = shm(&path);
    assert!(
        late.acquire(Kind::Shared, 1_000, Wait::NonBlocking)
            .is_err(),
        "a reader overtook the queued writer"
    );
    bulk.release(1_000).unwrap();
    assert_eq!(writer_granted.try_recv(STUCK), Some(1));
    writer.join();
    locksfile::shm::verify(&path).unwrap();
}
