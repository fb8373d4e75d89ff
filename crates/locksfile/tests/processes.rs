//! Locks between real processes: the original's two-process script, a
//! hand-over-hand ring, a killed holder, kernel deadlock detection, and
//! process mode's one-owner-per-file rule.

mod common;

use std::sync::atomic::Ordering;

use common::*;
use locksfile::{Error, Kind, Mode, Wait, INDEX_END};

/// The original's `testReadWriteLocks`: two processes that block each other
/// at every step, rebuilt so that the parent (holding nothing) checks who
/// holds what after each step, from outside.
fn seed_scenario(mode: Mode) {
    let _s = serial();
    let (_dir, path) = lock_path();
    let to_a = Pipe::new();
    let from_a = Pipe::new();
    let to_b = Pipe::new();
    let from_b = Pipe::new();
    let path = &path;

    let a = fork(|| {
        let lf = open(path, mode);
        to_a.expect(1);
        lf.acquire(Kind::Shared, 0, Wait::NonBlocking).unwrap();
        lf.acquire(Kind::Exclusive, (1, 3), Wait::NonBlocking)
            .unwrap();
        assert_eq!(
            lf.held(),
            vec![(span(0), Kind::Shared), (span(1..4), Kind::Exclusive)]
        );
        from_a.send(1);

        // Convert lock 2 to shared in place, as the original's `with` block did.
        to_a.expect(4);
        lf.acquire(Kind::Shared, 2, Wait::NonBlocking).unwrap();
        assert_eq!(
            lf.held(),
            vec![
                (span(0), Kind::Shared),
                (span(1), Kind::Exclusive),
                (span(2), Kind::Shared),
                (span(3), Kind::Exclusive)
            ]
        );
        from_a.send(4);

        to_a.expect(6);
        lf.release((0, 1)).unwrap();
        from_a.send(6);

        to_a.expect(7);
        from_a.send(b'b');
        lf.acquire(Kind::Exclusive, 0, Wait::Blocking).unwrap();
        assert_eq!(
            lf.held(),
            vec![
                (span(0..2), Kind::Exclusive),
                (span(2), Kind::Shared),
                (span(3), Kind::Exclusive)
            ]
        );
        from_a.send(7);

        to_a.expect(9);
        lf.release((3, 997)).unwrap();
        assert_eq!(
            lf.held(),
            vec![(span(0..2), Kind::Exclusive), (span(2), Kind::Shared)]
        );
        from_a.send(9);

        to_a.expect(10);
        lf.release_all().unwrap();
        assert!(lf.held().is_empty());
        from_a.send(10);

        to_a.expect(13);
        lf.acquire(Kind::Exclusive, .., Wait::NonBlocking).unwrap();
        from_a.send(13);
        to_a.expect(14);
        // Ends in `_exit` still holding everything: the kernel frees it.
        std::mem::forget(lf);
    });
    let a_pid = a.pid;

    let b = fork(|| {
        let lf = open(path, mode);
        to_b.expect(2);
        lf.acquire(Kind::Shared, 0, Wait::NonBlocking).unwrap();
        match lf.acquire(Kind::Exclusive, 0, Wait::NonBlocking) {
            Err(Error::WouldBlock { holder, .. }) => {
                assert_eq!(holder, Some(holder_of(mode, 0, Kind::Shared, a_pid)))
            }
            other => panic!("exclusive 0 over A's shared lock: {other:?}"),
        }
        match lf.try_read(2) {
            Err(Error::WouldBlock { holder, .. }) => {
                assert_eq!(holder, Some(holder_of(mode, 1..4, Kind::Exclusive, a_pid)))
            }
            other => panic!("shared 2 under A's exclusive lock: {other:?}"),
        }
        assert_eq!(
            lf.conflicts(Kind::Shared, 0..10).unwrap(),
            Some(holder_of(mode, 1..4, Kind::Exclusive, a_pid))
        );
        // A failed attempt changes nothing.
        assert_eq!(lf.held(), vec![(span(0), Kind::Shared)]);
        from_b.send(2);

        to_b.expect(3);
        from_b.send(b'b');
        lf.acquire(Kind::Shared, 2, Wait::Blocking).unwrap();
        from_b.send(3);

        to_b.expect(5);
        from_b.send(b'b');
        lf.acquire(Kind::Exclusive, 0, Wait::Blocking).unwrap();
        assert_eq!(
            lf.held(),
            vec![(span(0), Kind::Exclusive), (span(2), Kind::Shared)]
        );
        from_b.send(5);

        to_b.expect(8);
        lf.release_all().unwrap();
        from_b.send(8);

        to_b.expect(11);
        lf.acquire(Kind::Exclusive, .., Wait::NonBlocking).unwrap();
        from_b.send(11);

        to_b.expect(12);
        drop(lf);
        from_b.send(12);
    });
    let b_pid = b.pid;

    // 1: A reads 0 and writes 1..4.
    to_a.send(1);
    from_a.expect(1);
    assert_eq!(
        probe(path, Kind::Exclusive, 0),
        Some(holder_of(mode, 0, Kind::Shared, a_pid))
    );
    assert_eq!(
        probe(path, Kind::Shared, 0..10),
        Some(holder_of(mode, 1..4, Kind::Exclusive, a_pid))
    );
    assert_eq!(probe(path, Kind::Exclusive, 4..), None);

    // 2: B shares 0 with A and is kept out of 1..4.
    to_b.send(2);
    from_b.expect(2);
    let h = probe(path, Kind::Exclusive, 0).expect("0 is read-locked");
    assert_eq!((h.span, h.kind), (span(0), Kind::Shared));

    // 3: B waits for a read lock on 2, which A holds exclusively.
    to_b.send(3);
    from_b.expect(b'b');
    wait_for_waiter(path, 2, pid_in(mode, b_pid));
    assert_eq!(from_b.try_recv(std::time::Duration::ZERO), None);
    assert_eq!(
        probe(path, Kind::Shared, 2),
        Some(holder_of(mode, 1..4, Kind::Exclusive, a_pid))
    );

    // 4: A turns 2 into a read lock: B gets its read lock next to it.
    to_a.send(4);
    from_a.expect(4);
    from_b.expect(3);
    let h = probe(path, Kind::Exclusive, 2).expect("2 is read-locked");
    assert_eq!((h.span, h.kind), (span(2), Kind::Shared));
    assert_eq!(
        probe(path, Kind::Shared, 1),
        Some(holder_of(mode, 1, Kind::Exclusive, a_pid))
    );
    assert_eq!(
        probe(path, Kind::Shared, 3),
        Some(holder_of(mode, 3, Kind::Exclusive, a_pid))
    );

    // 5: B waits to write 0, which A still reads.
    to_b.send(5);
    from_b.expect(b'b');
    wait_for_waiter(path, 0, pid_in(mode, b_pid));
    assert_eq!(from_b.try_recv(std::time::Duration::ZERO), None);

    // 6: A lets go of 0: B gets it exclusively.
    to_a.send(6);
    from_a.expect(6);
    from_b.expect(5);
    assert_eq!(
        probe(path, Kind::Shared, 0),
        Some(holder_of(mode, 0, Kind::Exclusive, b_pid))
    );

    // 7: A waits to write 0, which B now holds.
    to_a.send(7);
    from_a.expect(b'b');
    wait_for_waiter(path, 0, pid_in(mode, a_pid));
    assert_eq!(from_a.try_recv(std::time::Duration::ZERO), None);

    // 8: B lets go of everything: A gets 0.
    to_b.send(8);
    from_b.expect(8);
    from_a.expect(7);
    assert_eq!(
        probe(path, Kind::Shared, 0),
        Some(holder_of(mode, 0..2, Kind::Exclusive, a_pid))
    );
    assert_eq!(
        probe(path, Kind::Exclusive, 2),
        Some(holder_of(mode, 2, Kind::Shared, a_pid))
    );
    assert_eq!(
        probe(path, Kind::Shared, 3),
        Some(holder_of(mode, 3, Kind::Exclusive, a_pid))
    );

    // 9: A releases 3..1000 (the original's `(3, 997)`).
    to_a.send(9);
    from_a.expect(9);
    assert_eq!(probe(path, Kind::Exclusive, 3..1000), None);
    assert_eq!(
        probe(path, Kind::Shared, 0..1000),
        Some(holder_of(mode, 0..2, Kind::Exclusive, a_pid))
    );

    // 10: A releases everything.
    to_a.send(10);
    from_a.expect(10);
    assert_eq!(probe(path, Kind::Exclusive, ..), None);

    // 11, 12: B takes the whole index space, then drops its handle.
    to_b.send(11);
    from_b.expect(11);
    assert_eq!(
        probe(path, Kind::Shared, INDEX_END - 1),
        Some(holder_of(mode, .., Kind::Exclusive, b_pid))
    );
    to_b.send(12);
    from_b.expect(12);
    assert_eq!(probe(path, Kind::Shared, ..), None);
    b.join();

    // 13: A takes everything and ends without releasing: the kernel frees it.
    to_a.send(13);
    from_a.expect(13);
    assert_eq!(
        probe(path, Kind::Shared, 7),
        Some(holder_of(mode, .., Kind::Exclusive, a_pid))
    );
    to_a.send(14);
    a.join();
    assert_eq!(probe(path, Kind::Shared, ..), None);
}

fn holder_of(mode: Mode, s: impl locksfile::IntoSpan, kind: Kind, pid: u32) -> locksfile::Holder {
    holder(mode, s, kind, pid)
}

mode_tests! { seed_two_process_scenario => seed_scenario }

/// K processes go round a ring of N tracks R times, hand over hand: take
/// the next track, then let go of the current one. Under the locks each
/// writes itself into a per-track occupant slot in shared memory, so two
/// processes on one track, or one overtaking another, show up in the
/// counts and logs.
fn ring(mode: Mode) {
    const K: usize = 3;
    const N: usize = 7;
    const R: usize = 30;
    const LOG: usize = K * R + K;
    let _s = serial();
    let (_dir, path) = lock_path();
    let path = &path;
    // Layout: [violations, occupant[N], visits[N], log[N][LOG]].
    let mem = Shared::new(1 + 2 * N + N * LOG);
    let m = mem.slots();
    let violations = &m[0];
    let occupant = &m[1..1 + N];
    let visits = &m[1 + N..1 + 2 * N];
    let log = &m[1 + 2 * N..];
    let start_of = |p: usize| p * N / K;

    let enter = |t: usize, me: u64| {
        if occupant[t].swap(me, Ordering::SeqCst) != 0 {
            violations.fetch_add(1, Ordering::SeqCst);
        }
        let i = visits[t].fetch_add(1, Ordering::SeqCst) as usize;
        assert!(i < LOG, "too many visits to track {t}");
        log[t * LOG + i].store(me, Ordering::SeqCst);
        // Give anyone wrongly let in the chance to show up.
        std::thread::yield_now();
        if occupant[t].load(Ordering::SeqCst) != me {
            violations.fetch_add(1, Ordering::SeqCst);
        }
    };
    let leave = |t: usize, me: u64| {
        if occupant[t].swap(0, Ordering::SeqCst) != me {
            violations.fetch_add(1, Ordering::SeqCst);
        }
    };

    let ready = Pipe::new();
    let go: Vec<Pipe> = (0..K).map(|_| Pipe::new()).collect();
    let mut children = Vec::new();
    for p in 0..K {
        let (ready, go) = (&ready, &go[p]);
        children.push(fork(move || {
            let me = p as u64 + 1;
            let lf = open(path, mode);
            let mut cur = start_of(p);
            // Odd processes use the explicit API, even ones guards.
            let explicit = p % 2 == 1;
            let mut guard = None;
            if explicit {
                lf.acquire(Kind::Exclusive, cur as u64, Wait::NonBlocking)
                    .unwrap();
            } else {
                guard = Some(lf.try_write(cur as u64).unwrap());
            }
            enter(cur, me);
            ready.send(p as u8);
            go.expect(b'g');
            for _ in 0..R * N {
                let next = (cur + 1) % N;
                if explicit {
                    lf.acquire(Kind::Exclusive, next as u64, Wait::Blocking)
                        .unwrap();
                    enter(next, me);
                    leave(cur, me);
                    lf.release(cur as u64).unwrap();
                    assert_eq!(lf.held(), vec![(span(next as u64), Kind::Exclusive)]);
                } else {
                    let g = lf.write(next as u64).unwrap();
                    enter(next, me);
                    leave(cur, me);
                    drop(guard.replace(g));
                }
                cur = next;
            }
            leave(cur, me);
        }));
    }
    for _ in 0..K {
        ready.recv();
    }
    for g in &go {
        g.send(b'g');
    }
    for c in children {
        c.join();
    }

    assert_eq!(
        violations.load(Ordering::SeqCst),
        0,
        "mutual exclusion broken"
    );
    for t in 0..N {
        let starters = (0..K).filter(|&p| start_of(p) == t).count();
        let n = visits[t].load(Ordering::SeqCst) as usize;
        assert_eq!(n, K * R + starters, "visits to track {t}");
        assert!(occupant[t].load(Ordering::SeqCst) == 0);
        let seq: Vec<u64> = (0..n)
            .map(|i| log[t * LOG + i].load(Ordering::SeqCst))
            .collect();
        // Nobody overtakes: every track sees the processes in one fixed
        // cyclic order, the order they stand in around the ring.
        let mut first: Vec<u64> = seq[..K].to_vec();
        first.sort_unstable();
        first.dedup();
        assert_eq!(first.len(), K, "track {t}: first visits {:?}", &seq[..K]);
        for i in K..n {
            assert_eq!(
                seq[i],
                seq[i - K],
                "track {t}: order broken at visit {i}: {seq:?}"
            );
        }
    }
    assert_eq!(probe(path, Kind::Exclusive, ..), None);
}

mode_tests! { hand_over_hand_ring => ring }

/// A holder killed with SIGKILL runs no destructor; the kernel frees its
/// locks and a waiter asleep in `F_SETLKW` in another process gets them.
fn killed_holder(mode: Mode, wait: Wait) {
    let _s = serial();
    let (_dir, path) = lock_path();
    let path = &path;
    let held = Pipe::new();
    let waiting = Pipe::new();
    let never = Pipe::new();
    let let_go = Pipe::new();
    let mut holder_proc = fork(|| {
        let lf = open(path, mode);
        let _g = lf.write(0..10).unwrap();
        held.send(b'h');
        // Wait to be killed.
        never.recv();
        panic!("the holder was not killed");
    });
    held.expect(b'h');
    let waiter = fork(|| {
        let lf = open(path, mode);
        // Still held when the wait starts.
        assert!(matches!(
            lf.try_write(5),
            Err(Error::WouldBlock {
                holder: Some(_),
                ..
            })
        ));
        waiting.send(b'w');
        let g = locksfile::WriteGuard::acquire(&lf, 5, wait).unwrap();
        assert_eq!(lf.held(), vec![(span(5), Kind::Exclusive)]);
        waiting.send(b'g');
        // Keep it until told, so the parent can see it held.
        let_go.expect(b'x');
        drop(g);
    });
    waiting.expect(b'w');
    if wait == Wait::Blocking {
        wait_for_waiter(path, 5, pid_in(mode, waiter.pid));
    }
    assert_eq!(waiting.try_recv(std::time::Duration::ZERO), None);
    assert_eq!(
        probe(path, Kind::Shared, 5),
        Some(holder(mode, 0..10, Kind::Exclusive, holder_proc.pid))
    );

    holder_proc.kill(libc::SIGKILL);
    assert_eq!(holder_proc.wait(), Exit::Signal(libc::SIGKILL));
    waiting.expect(b'g');
    assert_eq!(
        probe(path, Kind::Shared, 0..10),
        Some(holder(mode, 5, Kind::Exclusive, waiter.pid))
    );
    let_go.send(b'x');
    waiter.join();
    assert_eq!(probe(path, Kind::Shared, ..), None);
}

/// Once a killed holder is reaped its locks are free at once, to a call
/// that does not wait and to one that does: no waiter has to find it dead
/// at the end of a sleep first.
fn killed_holder_frees_locks_for_a_try(mode: Mode) {
    let _s = serial();
    let (_dir, path) = lock_path();
    let path = &path;
    let held = Pipe::new();
    let never = Pipe::new();
    let lf = open(path, mode);
    for round in 0..3 {
        let mut holder_proc = fork(|| {
            let lf = open(path, mode);
            let _w = lf.write(0..10).unwrap();
            let _r = lf.read(20).unwrap();
            // One index alone: in shm mode, a hold on the fast lane.
            let _f = lf.write(25).unwrap();
            held.send(b'h');
            never.recv();
            panic!("the holder was not killed");
        });
        held.expect(b'h');
        assert!(
            matches!(
                lf.try_write(5),
                Err(Error::WouldBlock {
                    holder: Some(_),
                    ..
                })
            ),
            "round {round}"
        );
        assert!(lf.try_write(25).is_err(), "round {round}");
        holder_proc.kill(libc::SIGKILL);
        assert_eq!(holder_proc.wait(), Exit::Signal(libc::SIGKILL));
        // The single index first (but in the last round): free at once to
        // a try, and to a wait before it would sleep.
        if round == 0 {
            drop(lf.try_write(25).expect("a dead holder's lock is free"));
        } else if round == 1 {
            let started = std::time::Instant::now();
            let g = lf.write_for(25, std::time::Duration::from_millis(45));
            drop(g.expect("a dead holder's lock is free to a wait"));
            assert!(started.elapsed() < std::time::Duration::from_millis(45));
        }
        let g = if round == 1 {
            // A wait finds the holder dead before it sleeps, well within
            // a liveness slice.
            let started = std::time::Instant::now();
            let g = lf
                .write_for(0..30, std::time::Duration::from_millis(45))
                .expect("a dead holder's locks are free to a wait");
            assert!(started.elapsed() < std::time::Duration::from_millis(45));
            g
        } else {
            lf.try_write(0..30).expect("a dead holder's locks are free")
        };
        assert_eq!(lf.held(), vec![(span(0..30), Kind::Exclusive)]);
        drop(g);
    }
    assert_eq!(probe(path, Kind::Exclusive, ..), None);
}

mode_tests! { killed_holders_locks_are_free_to_a_try => killed_holder_frees_locks_for_a_try }

mode_tests! {
    killed_holder_frees_locks_for_waiter => |m| killed_holder(m, Wait::Blocking),
    killed_holder_frees_locks_for_timed_waiter => |m| killed_holder(m, Wait::Timeout(STUCK)),
}

/// A holds 0 and sleeps waiting for 1; B holds 1 and asks for 0: in process
/// mode the kernel sees the cycle and B gets `Error::Deadlock`, holding
/// exactly what it held before.
#[test]
fn kernel_reports_deadlock_in_process_mode() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let path = &path;
    let to_a = Pipe::new();
    let from_a = Pipe::new();
    let to_b = Pipe::new();
    let from_b = Pipe::new();
    let a = fork(|| {
        let lf = open(path, Mode::Process);
        lf.acquire(Kind::Exclusive, 0, Wait::NonBlocking).unwrap();
        from_a.send(b'h');
        to_a.expect(b'w');
        from_a.send(b'b');
        lf.acquire(Kind::Exclusive, 1, Wait::Blocking).unwrap();
        assert_eq!(lf.held(), vec![(span(0..2), Kind::Exclusive)]);
        from_a.send(b'g');
    });
    let a_pid = a.pid;
    from_a.expect(b'h');
    let b = fork(|| {
        let lf = open(path, Mode::Process);
        lf.acquire(Kind::Exclusive, 1, Wait::NonBlocking).unwrap();
        from_b.send(b'h');
        to_b.expect(b'd');
        let e = lf.acquire(Kind::Exclusive, 0, Wait::Blocking).unwrap_err();
        assert!(matches!(e, Error::Deadlock { .. }), "{e:?}");
        assert_eq!(lf.held(), vec![(span(1), Kind::Exclusive)]);
        // The guard form says the same.
        let e = lf.write(0..2).unwrap_err();
        assert!(matches!(e, Error::Deadlock { .. }), "{e:?}");
        assert_eq!(lf.held(), vec![(span(1), Kind::Exclusive)]);
        let io: std::io::Error = e.into();
        assert_eq!(io.kind(), std::io::ErrorKind::Deadlock);
        // Still kept out of 0 by A, and holding 1.
        match lf.try_write(0) {
            Err(Error::WouldBlock {
                holder: Some(h), ..
            }) => {
                assert_eq!(h, holder(Mode::Process, 0, Kind::Exclusive, a_pid))
            }
            other => panic!("{other:?}"),
        }
        from_b.send(b'd');
        to_b.expect(b'r');
        lf.release(1).unwrap();
        from_b.send(b'r');
    });
    from_b.expect(b'h');
    to_a.send(b'w');
    from_a.expect(b'b');
    wait_for_waiter(path, 1, Some(a_pid));
    to_b.send(b'd');
    from_b.expect(b'd');
    assert_eq!(from_a.try_recv(std::time::Duration::ZERO), None);
    to_b.send(b'r');
    from_b.expect(b'r');
    from_a.expect(b'g');
    b.join();
    a.join();
}

/// The same cycle in OFD mode is not detected: both sleep until one of
/// them goes away. Killing A lets B through.
#[test]
fn no_deadlock_detection_in_ofd_mode() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let path = &path;
    let from_a = Pipe::new();
    let to_a = Pipe::new();
    let from_b = Pipe::new();
    let mut a = fork(|| {
        let lf = open(path, Mode::Ofd);
        lf.acquire(Kind::Exclusive, 0, Wait::NonBlocking).unwrap();
        from_a.send(b'h');
        to_a.expect(b'w');
        let r = lf.acquire(Kind::Exclusive, 1, Wait::Blocking);
        panic!("A woke up from a deadlock it should sleep in: {r:?}");
    });
    from_a.expect(b'h');
    let b = fork(|| {
        let lf = open(path, Mode::Ofd);
        lf.acquire(Kind::Exclusive, 1, Wait::NonBlocking).unwrap();
        from_b.send(b'h');
        lf.acquire(Kind::Exclusive, 0, Wait::Blocking).unwrap();
        assert_eq!(lf.held(), vec![(span(0..2), Kind::Exclusive)]);
        from_b.send(b'g');
    });
    from_b.expect(b'h');
    to_a.send(b'w');
    wait_for_waiters(path, 2);
    assert_eq!(from_b.try_recv(std::time::Duration::ZERO), None);
    a.kill(libc::SIGKILL);
    assert_eq!(a.wait(), Exit::Signal(libc::SIGKILL));
    from_b.expect(b'g');
    b.join();
}

/// Process mode: two handles on one file in one process are one owner.
/// Dropping either never drops locks held through the other, and their
/// holds compose. Checked from another process.
#[test]
fn process_mode_handles_share_one_owner() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let me = pid();
    let h1 = open(&path, Mode::Process);
    let h2 = open(&path, Mode::Process);
    h1.acquire(Kind::Exclusive, 0..4, Wait::NonBlocking)
        .unwrap();
    // Same owner: h2 is not kept out, and its read lock composes with h1's
    // write lock (the index stays exclusive).
    h2.acquire(Kind::Shared, 2..6, Wait::NonBlocking).unwrap();
    assert_eq!(
        h1.held(),
        vec![(span(0..4), Kind::Exclusive), (span(4..6), Kind::Shared)]
    );
    assert_eq!(h1.held(), h2.held());
    assert_eq!(h2.held_explicitly(), vec![(span(2..6), Kind::Shared)]);
    assert_eq!(
        probe(&path, Kind::Shared, 0..10),
        Some(holder(Mode::Process, 0..4, Kind::Exclusive, me))
    );

    // h1 lets go: what h2 asked for stays, at h2's kind.
    h1.release_all().unwrap();
    assert_eq!(
        probe(&path, Kind::Exclusive, 0..10),
        Some(holder(Mode::Process, 2..6, Kind::Shared, me))
    );
    assert_eq!(probe(&path, Kind::Shared, 0..10), None);

    // A guard through h1 and explicit locks through h2; then h1 goes.
    let g = h1.write(20..22).unwrap();
    h2.acquire(Kind::Exclusive, 30, Wait::NonBlocking).unwrap();
    drop(g);
    drop(h1);
    assert_eq!(
        probe(&path, Kind::Shared, 20..40),
        Some(holder(Mode::Process, 30, Kind::Exclusive, me))
    );
    assert_eq!(
        probe(&path, Kind::Exclusive, 0..10),
        Some(holder(Mode::Process, 2..6, Kind::Shared, me))
    );

    // A third handle opened and dropped (the classic close() pitfall) and
    // an OFD handle on the same file opened and dropped: nothing is lost.
    drop(open(&path, Mode::Process));
    drop(open(&path, Mode::Ofd));
    {
        // An OFD handle of the same process is another owner: kept out.
        let o = open(&path, Mode::Ofd);
        assert!(matches!(
            o.try_write(30),
            Err(Error::WouldBlock { holder: Some(h), .. }) if h == holder(Mode::Process, 30, Kind::Exclusive, me)
        ));
    }
    assert_eq!(
        probe(&path, Kind::Shared, 30),
        Some(holder(Mode::Process, 30, Kind::Exclusive, me))
    );

    // The last handle going frees everything.
    drop(h2);
    assert_eq!(probe(&path, Kind::Exclusive, ..), None);
}

/// Process mode through two paths to one file (a hard link): still one owner.
#[test]
fn process_mode_owner_is_per_inode_not_per_path() {
    let _s = serial();
    let (dir, path) = lock_path();
    let me = pid();
    let h1 = open(&path, Mode::Process);
    let other = dir.path().join("other-name.lock");
    std::fs::hard_link(&path, &other).unwrap();
    let h2 = open(&other, Mode::Process);
    h1.acquire(Kind::Exclusive, 1, Wait::NonBlocking).unwrap();
    h2.acquire(Kind::Exclusive, 1, Wait::NonBlocking).unwrap();
    drop(h2);
    assert_eq!(
        probe(&path, Kind::Shared, 1),
        Some(holder(Mode::Process, 1, Kind::Exclusive, me))
    );
    drop(h1);
    assert_eq!(probe(&path, Kind::Shared, 1), None);
}

/// In OFD mode two handles of one process are two owners: one keeps the
/// other out, and dropping one frees only its own locks.
#[test]
fn ofd_handles_in_one_process_are_separate_owners() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let h1 = open(&path, Mode::Ofd);
    let h2 = open(&path, Mode::Ofd);
    h1.acquire(Kind::Exclusive, 0..4, Wait::NonBlocking)
        .unwrap();
    match h2.try_read(2) {
        Err(Error::WouldBlock {
            holder: Some(h), ..
        }) => {
            assert_eq!(h, holder(Mode::Ofd, 0..4, Kind::Exclusive, 0))
        }
        other => panic!("{other:?}"),
    }
    h2.acquire(Kind::Exclusive, 10, Wait::NonBlocking).unwrap();
    drop(h2);
    assert_eq!(probe(&path, Kind::Shared, 4..), None);
    assert_eq!(
        probe(&path, Kind::Shared, 0..),
        Some(holder(Mode::Ofd, 0..4, Kind::Exclusive, 0))
    );
    drop(h1);
    assert_eq!(probe(&path, Kind::Shared, ..), None);
}
