//! `Mode::Shm` beyond what every mode does (those suites run it through
//! `mode_tests!`): killed processes, deadlock cycles, fair grants, mixed
//! engines, bad sidecars, a full table, a directory closed to the user.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use locksfile::shm::{verify, Snapshot};
use locksfile::{Error, Kind, LockFile, Mode, SidecarProblem, Wait};

fn shm(path: &Path) -> LockFile {
    open(path, Mode::Shm)
}

fn sidecar(path: &Path) -> std::path::PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push("-shm");
    s.into()
}

/// A small xorshift generator: each child its own sequence.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Spin for about `d`: a random moment to strike at, not a wait for
/// anything.
fn spin(d: Duration) {
    let until = Instant::now() + d;
    while Instant::now() < until {
        std::hint::spin_loop();
    }
}

/// One random operation on a handle, of the kinds a killed process may be
/// in the middle of: taking, converting, releasing, waiting.
fn random_op(lf: &LockFile, rng: &mut Rng) {
    let start = rng.below(12);
    // Single indices half the time: exclusive ones go through the fast
    // lane, which a kill must not break either.
    let span = match rng.below(8) {
        0 => locksfile::Span::to_end(start).unwrap(),
        1 => locksfile::Span::ALL,
        2..=3 => locksfile::Span::new(start, start + 2 + rng.below(3)).unwrap(),
        _ => locksfile::Span::new(start, start + 1).unwrap(),
    };
    let kind = if rng.below(2) == 0 {
        Kind::Shared
    } else {
        Kind::Exclusive
    };
    let wait = match rng.below(4) {
        0 => Wait::NonBlocking,
        1 => Wait::Blocking,
        _ => Wait::Timeout(Duration::from_micros(rng.below(2000))),
    };
    match rng.below(5) {
        0 | 1 => {
            let _ = lf.acquire(kind, span, wait);
        }
        2 => {
            let _ = lf.release(span);
        }
        3 => {
            if let Ok(g) = lf.read(span.start()) {
                let _ = locksfile::ReadGuard::try_upgrade(g);
            }
        }
        _ => {
            let _ = lf.conflicts(kind, span);
        }
    }
}

/// At least 1,000 processes killed at random moments while they take,
/// convert, release and wait for locks on one table: the table stays
/// consistent, and a fresh owner then takes every lock.
#[test]
fn kill_torture() {
    let _s = serial();
    let (_dir, path) = lock_path();
    drop(shm(&path));
    const AT_ONCE: usize = 4;
    const KILLS: usize = 1000;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let spawn = |seed: u64| {
        let path = path.clone();
        fork(move || {
            let mut rng = Rng(seed | 1);
            let lf = shm(&path);
            loop {
                random_op(&lf, &mut rng);
            }
        })
    };
    let mut children: Vec<Child> = (0..AT_ONCE).map(|i| spawn(i as u64 + 7)).collect();
    let mut killed = 0;
    while killed < KILLS {
        spin(Duration::from_micros(rng.below(3000)));
        let victim = rng.below(AT_ONCE as u64) as usize;
        let mut c = std::mem::replace(&mut children[victim], spawn(rng.next()));
        c.kill(libc::SIGKILL);
        let exit = c.wait();
        assert_eq!(exit, Exit::Signal(libc::SIGKILL), "{}", c.message());
        killed += 1;
    }
    for mut c in children {
        c.kill(libc::SIGKILL);
        assert_eq!(c.wait(), Exit::Signal(libc::SIGKILL));
    }
    verify(&path).expect("table consistent after the kills");
    let fresh = shm(&path);
    let started = Instant::now();
    let all = fresh
        .write_for(.., Duration::from_secs(2))
        .expect("a fresh owner takes every lock");
    assert!(started.elapsed() < Duration::from_millis(500));
    verify(&path).expect("table consistent after the fresh owner");
    let snap = Snapshot::read(&path).unwrap();
    assert_eq!(snap.holders.len(), 1, "{snap:?}");
    assert_eq!(snap.holders[0].owner, fresh.table_owner().unwrap());
    assert!(snap.waiters.is_empty(), "{snap:?}");
    drop(all);
}

/// A holder killed while another owner waits: the waiter has the lock
/// within 100 ms of the kill.
#[test]
fn killed_holders_waiter_gets_the_lock_within_100ms() {
    let _s = serial();
    let (_dir, path) = lock_path();
    for kind in [Kind::Exclusive, Kind::Shared] {
        let holding = hold_elsewhere(&path, Mode::Shm, kind, 0..4);
        let lf = shm(&path);
        let (tx, rx) = mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                let g = lf.write(2).unwrap();
                tx.send(Instant::now()).unwrap();
                drop(g);
            });
            wait_for_waiter(&path, 2, None);
            let killed = Instant::now();
            // SAFETY: plain syscall on our own child.
            unsafe { libc::kill(holding.pid() as i32, libc::SIGKILL) };
            let granted = rx.recv_timeout(STUCK).expect("granted");
            let late = granted.saturating_duration_since(killed);
            assert!(
                late < Duration::from_millis(100),
                "granted {late:?} after the kill"
            );
        });
        drop(holding);
    }
}

/// A holder that forked a child and died: the child inherited the
/// holder's descriptors but not its life, so the lock is freed.
#[test]
fn forked_child_does_not_keep_a_dead_holder_alive() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let ready = Pipe::new();
    let grandchild_pid = Pipe::new();
    let holder = fork(|| {
        let lf = shm(&path);
        lf.acquire(Kind::Exclusive, 0, Wait::NonBlocking).unwrap();
        let g = fork(|| loop {
            std::thread::park();
        });
        grandchild_pid.send_u64(u64::from(g.pid));
        std::mem::forget(g);
        ready.send(b'r');
        loop {
            std::thread::park();
        }
    });
    ready.expect(b'r');
    let grandchild = grandchild_pid.recv_u64() as i32;
    let lf = shm(&path);
    assert!(lf.try_write(0).is_err());
    holder.kill(libc::SIGKILL);
    let mut holder = holder;
    assert_eq!(holder.wait(), Exit::Signal(libc::SIGKILL));
    let g = lf.write_for(0, Duration::from_millis(200));
    // SAFETY: plain syscalls on the grandchild, reparented to init or us.
    unsafe {
        libc::kill(grandchild, libc::SIGKILL);
    }
    drop(g.expect("the dead holder's lock is free though its child lives"));
}

/// `n` owners in `n` processes, each holding lock `i` and then waiting for
/// lock `i + 1` (the last for lock 0): the one that closes the cycle gets
/// `Error::Deadlock`, holds nothing more, and once it lets go every other
/// wait is granted.
fn cycle(n: usize) {
    let _s = serial();
    let (_dir, path) = lock_path();
    let ready = Pipe::new();
    let go: Vec<Pipe> = (0..n).map(|_| Pipe::new()).collect();
    let result: Vec<Pipe> = (0..n).map(|_| Pipe::new()).collect();
    let children: Vec<Child> = (0..n)
        .map(|i| {
            let (path, go, result, ready) = (&path, &go[i], &result[i], &ready);
            fork(move || {
                let lf = shm(path);
                lf.acquire(Kind::Exclusive, i as u64, Wait::NonBlocking)
                    .unwrap();
                ready.send(b'h');
                go.expect(b'g');
                let r = lf.acquire(Kind::Exclusive, ((i + 1) % n) as u64, Wait::Blocking);
                result.send(match r {
                    Ok(()) => b'o',
                    Err(Error::Deadlock { .. }) => b'd',
                    Err(_) => b'e',
                });
                // Dropping the handle lets the next one in the chain go.
            })
        })
        .collect();
    for _ in 0..n {
        ready.expect(b'h');
    }
    for i in 0..n - 1 {
        go[i].send(b'g');
        wait_for_waiter(&path, ((i + 1) % n) as u64, Some(children[i].pid));
    }
    go[n - 1].send(b'g');
    assert_eq!(result[n - 1].recv(), b'd', "the wait closing the cycle");
    for i in (0..n - 1).rev() {
        assert_eq!(result[i].recv(), b'o', "owner {i} granted in turn");
    }
    for c in children {
        c.join();
    }
}

#[test]
fn deadlock_cycle_of_2() {
    cycle(2);
}

#[test]
fn deadlock_cycle_of_3() {
    cycle(3);
}

#[test]
fn deadlock_cycle_of_20() {
    cycle(20);
}

/// Two readers of one lock in two processes both upgrade: the second
/// upgrade closes a cycle and fails, keeping its shared lock until it lets
/// go; then the first upgrade is granted.
#[test]
fn two_upgraders_deadlock() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let ready = Pipe::new();
    let go: Vec<Pipe> = (0..2).map(|_| Pipe::new()).collect();
    let result: Vec<Pipe> = (0..2).map(|_| Pipe::new()).collect();
    let children: Vec<Child> = (0..2)
        .map(|i| {
            let (path, go, result, ready) = (&path, &go[i], &result[i], &ready);
            fork(move || {
                let lf = shm(path);
                let r = lf.read(0..4).unwrap();
                ready.send(b'h');
                go.expect(b'g');
                match locksfile::ReadGuard::upgrade(r) {
                    Ok(w) => {
                        result.send(b'o');
                        drop(w);
                    }
                    Err((r, Error::Deadlock { .. })) => {
                        // Still shared: the refused upgrade changed nothing.
                        assert_eq!(
                            lf.held(),
                            vec![(locksfile::Span::new(0, 4).unwrap(), Kind::Shared)]
                        );
                        result.send(b'd');
                        drop(r);
                    }
                    Err((_, e)) => panic!("{e}"),
                };
            })
        })
        .collect();
    ready.expect(b'h');
    ready.expect(b'h');
    go[0].send(b'g');
    wait_for_waiter(&path, 0, Some(children[0].pid));
    go[1].send(b'g');
    assert_eq!(result[1].recv(), b'd');
    assert_eq!(result[0].recv(), b'o');
    for c in children {
        c.join();
    }
}

/// Wait until `lf` (an owner of the table at `path`) has a request queued
/// that starts at `start`.
fn wait_until_queued(path: &Path, lf: &LockFile, start: u64) {
    let me = lf.table_owner().unwrap();
    let deadline = Instant::now() + STUCK;
    while !Snapshot::read(path)
        .unwrap()
        .waiters
        .iter()
        .any(|w| w.owner == me && w.span.start() == start)
    {
        assert!(
            Instant::now() < deadline,
            "no request of owner {me} queued at {start}"
        );
        std::thread::yield_now();
    }
}

/// PostgreSQL's "soft" cycle, closed by a request that waits for a lock:
/// C holds 0 shared; B waits for 0 exclusive (for C); A holds 1
/// exclusive and asks for 0 shared, which C's lock admits but which queues
/// behind B's earlier request; then C asks for 1 shared. C waits for A,
/// A behind B (queue order only), B for C. Putting A's request ahead of
/// B's breaks the cycle and makes none, so no one is told
/// `Error::Deadlock`: A is granted at once, C once A lets go, B last.
#[test]
fn a_cycle_through_queue_order_is_broken_by_moving_a_waiter_ahead() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let (a, b, c) = (shm(&path), shm(&path), shm(&path));
    c.acquire(Kind::Shared, 0, Wait::NonBlocking).unwrap();
    a.acquire(Kind::Exclusive, 1, Wait::NonBlocking).unwrap();
    let (order, done) = mpsc::channel();
    std::thread::scope(|s| {
        let bw = s.spawn(|| {
            let r = b.acquire(Kind::Exclusive, 0, Wait::Timeout(STUCK));
            order.send('b').unwrap();
            b.release_all().unwrap();
            r
        });
        wait_until_queued(&path, &b, 0);
        let aw = s.spawn(|| {
            let r = a.acquire(Kind::Shared, 0, Wait::Timeout(STUCK));
            order.send('a').unwrap();
            a.release_all().unwrap();
            r
        });
        wait_until_queued(&path, &a, 0);
        let r = c.acquire(Kind::Shared, 1, Wait::Timeout(STUCK));
        order.send('c').unwrap();
        // Let go whatever happened, so that the others end either way.
        c.release_all().unwrap();
        let (ra, rb) = (aw.join().unwrap(), bw.join().unwrap());
        assert!(
            matches!((&r, &ra, &rb), (Ok(()), Ok(()), Ok(()))),
            "C: {r:?}, A: {ra:?}, B: {rb:?}"
        );
    });
    let order: String = done.try_iter().collect();
    assert_eq!(
        order, "acb",
        "A first (moved ahead), C once A let go, B last"
    );
    verify(&path).unwrap();
}

/// The same cycle closed by the request that must move: C holds 0
/// shared, B waits for 0 exclusive (for C), A holds 1 exclusive, C waits
/// for 1 (for A); then A asks for 0 shared. Nothing A waits for is held
/// against it, only B's earlier request: A goes ahead of B, is granted
/// without waiting for anyone, and once it lets go C and then B are.
#[test]
fn a_request_closing_a_cycle_through_queue_order_goes_ahead() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let (a, b, c) = (shm(&path), shm(&path), shm(&path));
    c.acquire(Kind::Shared, 0, Wait::NonBlocking).unwrap();
    a.acquire(Kind::Exclusive, 1, Wait::NonBlocking).unwrap();
    std::thread::scope(|s| {
        let bw = s.spawn(|| {
            let r = b.acquire(Kind::Exclusive, 0, Wait::Timeout(STUCK));
            b.release_all().unwrap();
            r
        });
        wait_until_queued(&path, &b, 0);
        let cw = s.spawn(|| {
            let r = c.acquire(Kind::Shared, 1, Wait::Timeout(STUCK));
            c.release_all().unwrap();
            r
        });
        wait_until_queued(&path, &c, 1);
        let started = Instant::now();
        let r = a.acquire(Kind::Shared, 0, Wait::Timeout(STUCK));
        let took = started.elapsed();
        let held = a.held();
        a.release_all().unwrap();
        let (rc, rb) = (cw.join().unwrap(), bw.join().unwrap());
        assert!(
            matches!((&r, &rc, &rb), (Ok(()), Ok(()), Ok(()))),
            "A: {r:?}, C: {rc:?}, B: {rb:?}"
        );
        assert_eq!(
            held,
            vec![(span(0), Kind::Shared), (span(1), Kind::Exclusive)]
        );
        assert!(took < Duration::from_secs(1), "A waited {took:?}");
    });
    verify(&path).unwrap();
}

/// A cycle of locks held (A holds 0 and waits for 1, B holds 1 and asks
/// for 0) is one no queue order breaks: B's request fails with
/// `Error::Deadlock` at once, holding nothing more, and A's is granted
/// once B lets go; exactly one of the two is refused.
#[test]
fn a_cycle_of_held_locks_is_one_deadlock() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let (a, b) = (shm(&path), shm(&path));
    a.acquire(Kind::Exclusive, 0, Wait::NonBlocking).unwrap();
    b.acquire(Kind::Exclusive, 1, Wait::NonBlocking).unwrap();
    std::thread::scope(|s| {
        let aw = s.spawn(|| {
            let r = a.acquire(Kind::Exclusive, 1, Wait::Timeout(STUCK));
            a.release_all().unwrap();
            r
        });
        wait_until_queued(&path, &a, 1);
        let started = Instant::now();
        let r = b.acquire(Kind::Exclusive, 0, Wait::Timeout(STUCK));
        let took = started.elapsed();
        assert_eq!(b.held(), vec![(span(1), Kind::Exclusive)]);
        b.release_all().unwrap();
        let ra = aw.join().unwrap();
        assert!(matches!(r, Err(Error::Deadlock { .. })), "B: {r:?}");
        assert!(ra.is_ok(), "A: {ra:?}");
        assert!(took < Duration::from_secs(1), "B waited {took:?}");
    });
    verify(&path).unwrap();
}

/// A cycle through queue order that also runs through held locks alone
/// stays a deadlock: C holds 0 shared and 2 exclusive, B waits for 0
/// exclusive (for C), A holds 5 exclusive and asks for 0..3 shared (for
/// C's 2, and behind B), then C asks for 5. Moving A ahead of B leaves
/// C -> A -> C, so C is told `Error::Deadlock`.
#[test]
fn a_cycle_that_queue_order_cannot_break_is_a_deadlock() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let (a, b, c) = (shm(&path), shm(&path), shm(&path));
    c.acquire(Kind::Shared, 0, Wait::NonBlocking).unwrap();
    c.acquire(Kind::Exclusive, 2, Wait::NonBlocking).unwrap();
    a.acquire(Kind::Exclusive, 5, Wait::NonBlocking).unwrap();
    std::thread::scope(|s| {
        let bw = s.spawn(|| {
            let r = b.acquire(Kind::Exclusive, 0, Wait::Timeout(STUCK));
            b.release_all().unwrap();
            r
        });
        wait_until_queued(&path, &b, 0);
        let aw = s.spawn(|| {
            let r = a.acquire(Kind::Shared, 0..3, Wait::Timeout(STUCK));
            a.release_all().unwrap();
            r
        });
        wait_until_queued(&path, &a, 0);
        let r = c.acquire(Kind::Shared, 5, Wait::Timeout(STUCK));
        c.release_all().unwrap();
        assert!(matches!(r, Err(Error::Deadlock { .. })), "C: {r:?}");
        assert!(bw.join().unwrap().is_ok());
        assert!(aw.join().unwrap().is_ok());
    });
    verify(&path).unwrap();
}

/// Four processes keep overlapping read locks busy (there is always a
/// reader on index 5); a writer is granted within a bounded time, as the
/// readers that come after it queue behind it.
#[test]
fn writer_granted_among_busy_readers() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let shared = Shared::new(5);
    let stop = 4;
    let counts = shared.slots();
    let readers: Vec<Child> = (0..4u64)
        .map(|i| {
            let path = &path;
            fork(move || {
                let lf = shm(path);
                while counts[stop].load(SeqCst) == 0 {
                    let g = lf.read(i..i + 8).unwrap();
                    counts[i as usize].fetch_add(1, SeqCst);
                    spin(Duration::from_micros(300));
                    drop(g);
                }
            })
        })
        .collect();
    // Wait until every reader has gone round a few times.
    let deadline = Instant::now() + STUCK;
    while (0..4).any(|i| counts[i].load(SeqCst) < 20) {
        assert!(Instant::now() < deadline, "readers never got going");
        std::thread::yield_now();
    }
    let writer = shm(&path);
    let started = Instant::now();
    let w = writer.write_for(5, Duration::from_secs(5));
    let took = started.elapsed();
    counts[stop].store(1, SeqCst);
    let w = w.expect("writer granted");
    assert!(took < Duration::from_secs(1), "writer waited {took:?}");
    drop(w);
    for r in readers {
        r.join();
    }
}

/// A kernel-mode open is refused while the file's table is in use, and a
/// `Shm` open while the file has kernel locks: nothing silently fails to
/// exclude.
#[test]
fn mixed_engines_are_refused() {
    let _s = serial();
    let (_dir, path) = lock_path();
    {
        // A table in use (even by a handle that holds nothing).
        let _t = shm(&path);
        for mode in [Mode::Ofd, Mode::Process, Mode::Flock] {
            match LockFile::options().mode(mode).open(&path) {
                Err(Error::MixedModes { path: p, in_use }) => {
                    assert_eq!(p, path);
                    assert_eq!(in_use, "a shared-memory lock table");
                }
                other => panic!("{mode} open beside a table in use: {other:?}"),
            }
        }
    }
    // Not in use any more: kernel modes open again.
    drop(open(&path, Mode::Ofd));

    // A process-mode owner of the file in this process that holds nothing
    // while the table comes into use: further kernel-mode handles (which
    // would join it or borrow its descriptors) are refused too, and the
    // refusals close nothing that would drop its locks later.
    let p = open(&path, Mode::Process);
    let t = shm(&path);
    for mode in [Mode::Process, Mode::Ofd, Mode::Flock] {
        assert!(
            matches!(
                LockFile::options().mode(mode).open(&path),
                Err(Error::MixedModes { .. })
            ),
            "{mode}"
        );
    }
    drop(t);
    p.acquire(Kind::Exclusive, 9, Wait::NonBlocking).unwrap();
    drop(open(&path, Mode::Ofd));
    assert_eq!(
        probe(&path, Kind::Shared, 9),
        Some(holder(Mode::Process, 9, Kind::Exclusive, pid()))
    );
    drop(p);

    for (mode, what) in [
        (Mode::Ofd, "fcntl record locks"),
        (Mode::Process, "fcntl record locks"),
        (Mode::Flock, "flock(2) locks"),
    ] {
        let holding = hold_elsewhere(
            &path,
            mode,
            Kind::Shared,
            if mode == Mode::Flock {
                locksfile::Span::ALL
            } else {
                locksfile::Span::new(3, 4).unwrap()
            },
        );
        match LockFile::options().mode(Mode::Shm).open(&path) {
            Err(e @ Error::MixedModes { .. }) => {
                let Error::MixedModes { in_use, .. } = &e else {
                    unreachable!()
                };
                assert_eq!(*in_use, what);
                let io: std::io::Error = e.into();
                assert_eq!(io.kind(), std::io::ErrorKind::ResourceBusy);
            }
            other => panic!("shm open beside {mode} locks: {other:?}"),
        }
        holding.release();
    }
    drop(shm(&path));
}

fn sidecar_problem(path: &Path) -> SidecarProblem {
    match LockFile::options().mode(Mode::Shm).open(path) {
        Err(Error::Sidecar { path: p, problem }) => {
            assert_eq!(p, sidecar(path));
            problem
        }
        other => panic!("open with a bad sidecar: {other:?}"),
    }
}

/// A sidecar that is not a table, is a newer version's, or has the wrong
/// size while in use: a clear error, the file left as it was, no crash.
#[test]
fn bad_sidecars_are_refused() {
    let _s = serial();
    let (_dir, path) = lock_path();
    fs::write(&path, b"").unwrap();

    let foreign: Vec<u8> = b"not a lock table, but somebody's data\n".repeat(100);
    fs::write(sidecar(&path), &foreign).unwrap();
    assert_eq!(sidecar_problem(&path), SidecarProblem::Foreign);
    assert_eq!(fs::read(sidecar(&path)).unwrap(), foreign);

    // Our magic, a newer version.
    let mut newer = b"LKFSHM\x00\x01".to_vec();
    newer.extend_from_slice(&99u32.to_ne_bytes());
    newer.resize(4096, 0);
    fs::write(sidecar(&path), &newer).unwrap();
    assert_eq!(
        sidecar_problem(&path),
        SidecarProblem::NewerVersion { found: 99 }
    );
    assert_eq!(fs::read(sidecar(&path)).unwrap(), newer);

    // A table no one uses, truncated: the first opener resets it.
    fs::remove_file(sidecar(&path)).unwrap();
    drop(shm(&path));
    fs::OpenOptions::new()
        .write(true)
        .open(sidecar(&path))
        .unwrap()
        .set_len(4096)
        .unwrap();
    drop(shm(&path));

    // Truncated while in use (by another process, which never touches it
    // again): refused, never mapped past its end.
    let ready = Pipe::new();
    let user = fork(|| {
        let _lf = shm(&path);
        ready.send(b'r');
        loop {
            std::thread::park();
        }
    });
    ready.expect(b'r');
    let full = fs::metadata(sidecar(&path)).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(sidecar(&path))
        .unwrap()
        .set_len(8192)
        .unwrap();
    assert_eq!(
        sidecar_problem(&path),
        SidecarProblem::WrongSize {
            found: 8192,
            expected: full
        }
    );
    user.kill(libc::SIGKILL);
    let mut user = user;
    assert_eq!(user.wait(), Exit::Signal(libc::SIGKILL));

    // The lock file replaced while its table is in use.
    let ready = Pipe::new();
    let user = fork(|| {
        let _lf = shm(&path);
        ready.send(b'r');
        loop {
            std::thread::park();
        }
    });
    ready.expect(b'r');
    let other = path.with_extension("new");
    fs::write(&other, b"").unwrap();
    fs::rename(&other, &path).unwrap();
    assert_eq!(sidecar_problem(&path), SidecarProblem::OtherLockFile);
    user.kill(libc::SIGKILL);
    let mut user = user;
    assert_eq!(user.wait(), Exit::Signal(libc::SIGKILL));
    // No one uses the old table now: the first opener takes it over.
    drop(shm(&path));
}

/// The sidecar path must be a regular file and is never followed.
#[test]
fn sidecar_symlink_or_directory_refused() {
    let _s = serial();
    let (dir, path) = lock_path();
    let target = dir.path().join("elsewhere");
    fs::write(&target, b"precious").unwrap();
    std::os::unix::fs::symlink(&target, sidecar(&path)).unwrap();
    match LockFile::options().mode(Mode::Shm).open(&path) {
        Err(Error::NotRegularFile { path: p, .. }) => assert_eq!(p, sidecar(&path)),
        other => panic!("{other:?}"),
    }
    assert_eq!(fs::read(&target).unwrap(), b"precious");
    fs::remove_file(sidecar(&path)).unwrap();
    fs::create_dir(sidecar(&path)).unwrap();
    assert!(matches!(
        LockFile::options().mode(Mode::Shm).open(&path),
        Err(Error::NotRegularFile { .. })
    ));
}

/// Records run out: the raise that does not fit is refused with
/// `Error::TableFull`, changing nothing; lowering still works, and after
/// it the raise fits again. Owners run out the same way. The table's real
/// capacities are gigabytes of memory (`shm_capacity.rs` fills 10 million
/// records and 100,000 owners); this process is given 65,536 records and
/// 1,024 owners of them, so the table fills in a moment.
#[test]
fn full_table_is_a_clear_error() {
    let _s = serial();
    let _cap = capped(65_536, 1024);
    let (_dir, path) = lock_path();
    let lf = shm(&path);
    let mut taken = 0u64;
    let refused = loop {
        // Every other index, so no two records merge.
        match lf.acquire(Kind::Exclusive, 2 * taken, Wait::NonBlocking) {
            Ok(()) => taken += 1,
            Err(e) => break e,
        }
        assert!(taken < 100_000, "the table never filled");
    };
    match &refused {
        Error::TableFull { path: p, what } => {
            assert_eq!(*p, sidecar(&path));
            assert_eq!(*what, "lock records");
        }
        e => panic!("{e}"),
    }
    assert!(taken > 60_000, "only {taken} records");
    let held = lf.held();
    assert_eq!(held.len() as u64, taken);
    // Another owner is refused too, without waiting, for a span (which
    // needs a record; one free index alone would go by the fast lane).
    let other = shm(&path);
    let free = 2 * taken + 1..2 * taken + 3;
    assert!(matches!(
        other.acquire(Kind::Shared, free, Wait::Blocking),
        Err(Error::TableFull { .. })
    ));
    assert!(other.held().is_empty());
    // Lowering works on a full table (splitting a record needs none).
    lf.acquire(Kind::Shared, 0, Wait::NonBlocking).unwrap();
    lf.release(2).unwrap();
    lf.release(4).unwrap();
    lf.acquire(Kind::Exclusive, 2 * taken, Wait::NonBlocking)
        .unwrap();
    drop(other);
    drop(lf);
    verify(&path).unwrap();

    // Owners.
    let mut handles = Vec::new();
    let refused = loop {
        match LockFile::options().mode(Mode::Shm).open(&path) {
            Ok(h) => handles.push(h),
            Err(e) => break e,
        }
        assert!(handles.len() <= 2000, "owners never ran out");
    };
    assert!(
        matches!(refused, Error::TableFull { what: "owners", .. }),
        "{refused}"
    );
    assert_eq!(handles.len(), 1024);
    handles.pop();
    drop(shm(&path));
}

/// A directory the user cannot write: the sidecar cannot be created, and
/// the open fails naming it (run as root, the check runs as `nobody`).
#[test]
fn directory_without_write_permission() {
    let _s = serial();
    let (dir, path) = lock_path();
    fs::write(&path, b"").unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let path = &path;
    fork(|| {
        // SAFETY: plain syscalls; the child is single-threaded.
        unsafe {
            if libc::geteuid() == 0 {
                assert_eq!(libc::setgid(65534), 0, "setgid");
                assert_eq!(libc::setuid(65534), 0, "setuid");
            }
        }
        match LockFile::options().mode(Mode::Shm).open(path) {
            Err(Error::Open { path: p, source }) => {
                assert_eq!(p, sidecar(path));
                assert_eq!(source.raw_os_error(), Some(libc::EACCES));
            }
            other => panic!("{other:?}"),
        }
        // Kernel modes need no sidecar.
        drop(open(path, Mode::Ofd));
    })
    .join();
}

/// The table lists holders and waiters with their pids, spans, kinds and
/// owners, without joining it.
#[test]
fn snapshot_lists_holders_and_waiters() {
    let _s = serial();
    let (_dir, path) = lock_path();
    assert_eq!(Snapshot::read(&path).unwrap(), Snapshot::default());
    let holding = hold_elsewhere(&path, Mode::Shm, Kind::Exclusive, 10..);
    let lf = shm(&path);
    let _r = lf.read(0..3).unwrap();
    std::thread::scope(|s| {
        let waiter = s.spawn(|| lf.write_for(12, Duration::from_secs(10)).map(drop));
        wait_for_waiter(&path, 12, Some(pid()));
        let snap = Snapshot::read(&path).unwrap();
        assert_eq!(snap.holders.len(), 2, "{snap:?}");
        assert_eq!(snap.holders[0].pid, pid());
        assert_eq!(snap.holders[0].span, locksfile::Span::new(0, 3).unwrap());
        assert_eq!(snap.holders[0].kind, Kind::Shared);
        assert_eq!(snap.holders[0].owner, lf.table_owner().unwrap());
        assert_eq!(snap.holders[1].pid, holding.pid());
        assert_eq!(snap.holders[1].span, locksfile::Span::to_end(10).unwrap());
        assert_eq!(snap.holders[1].kind, Kind::Exclusive);
        assert_eq!(snap.waiters.len(), 1);
        assert_eq!(snap.waiters[0].pid, pid());
        assert_eq!(snap.waiters[0].kind, Kind::Exclusive);
        assert_eq!(snap.waiters[0].span, locksfile::Span::new(12, 13).unwrap());
        assert!(snap.waiters[0].since <= std::time::SystemTime::now());
        holding.release();
        waiter.join().unwrap().unwrap();
    });
}

/// `conflicts()` names a queued waiter when it is what a request would
/// wait behind (fair queueing), with its pid.
#[test]
fn fair_try_defers_to_a_queued_writer() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let holding = hold_elsewhere(&path, Mode::Shm, Kind::Shared, 0..4);
    let writer = shm(&path);
    let reader = shm(&path);
    std::thread::scope(|s| {
        let w = s.spawn(|| writer.write_for(2, Duration::from_secs(10)).map(drop));
        wait_for_waiter(&path, 2, Some(pid()));
        // A new reader would be granted by fcntl; here it queues behind
        // the writer.
        assert!(reader.try_read(1..3).is_err());
        let h = reader.conflicts(Kind::Shared, 1..3).unwrap().unwrap();
        assert_eq!(h.kind, Kind::Exclusive);
        assert_eq!(h.pid, Some(pid()));
        // Not overlapping the writer's request: granted.
        drop(reader.try_read(3).unwrap());
        holding.release();
        w.join().unwrap().unwrap();
    });
}

/// A wait made of several single indices (4 and 6 new, 5 an upgrade)
/// queues as one span, and the fast lane lets no one take an index of it
/// meanwhile, nor takes a fast lock away from an earlier holder.
#[test]
fn a_wait_of_single_pieces_keeps_the_fast_lane_out() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let (w, x, p) = (shm(&path), shm(&path), shm(&path));
    // p holds 8 on the fast lane before anyone waits.
    let early = p.try_write(8).unwrap();
    let _five = w.read(5).unwrap();
    x.acquire(Kind::Exclusive, 6, Wait::NonBlocking).unwrap();
    std::thread::scope(|s| {
        let waiting = s.spawn(|| w.write_for(4..7, Duration::from_secs(10)).map(drop));
        wait_for_waiter(&path, 4, Some(pid()));
        // 4 is free, but w asked first.
        assert!(p.try_write(4).is_err());
        assert!(p.try_read(4).is_err());
        // What p held before stays p's.
        assert!(x.try_write(8).is_err());
        x.release(6).unwrap();
        waiting.join().unwrap().unwrap();
    });
    assert!(p.try_write(4).is_ok());
    drop(early);
    verify(&path).unwrap();
}

/// An owner that holds part of a span and asks for all of it converts,
/// so it queues behind no one, also when the rest of the span comes in
/// several pieces: here it would otherwise wait behind a waiter that waits
/// behind a waiter that waits for it, a cycle no one would see.
#[test]
fn multi_piece_conversion_queues_behind_no_one() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let (x, y, z) = (shm(&path), shm(&path), shm(&path));
    x.acquire(Kind::Exclusive, 2, Wait::NonBlocking).unwrap();
    std::thread::scope(|s| {
        let yw = s.spawn(|| y.write(2..).map(drop));
        wait_for_waiter(&path, 2, Some(pid()));
        let zw = s.spawn(|| z.write(3..6).map(drop));
        wait_for_waiter(&path, 3, Some(pid()));
        // Raises 1 and 3..6 (2 is held): granted at once.
        let r = x.acquire(Kind::Exclusive, 1..6, Wait::Timeout(Duration::from_secs(2)));
        x.release_all().unwrap();
        yw.join().unwrap().unwrap();
        zw.join().unwrap().unwrap();
        r.expect("a conversion waits for no queued request");
    });
}

/// What the mode says it offers, and its name.
#[test]
fn abilities_and_name() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let lf = shm(&path);
    let a = lf.abilities();
    assert!(a.detects_deadlocks && a.fair && a.releases_on_death);
    assert_eq!(lf.mode().to_string(), "shm");
    assert!(lf.table_owner().is_some());
    assert_eq!(
        open(&path.with_extension("other"), Mode::Ofd).table_owner(),
        None
    );
}

/// A lock file on a FUSE file system (mounted with `bindfs` where the
/// machine has it and lets us mount): refused, naming the file system.
/// Where it cannot mount, the test says so and checks nothing more; the
/// classification itself is unit-tested in the engine.
#[test]
fn fuse_mount_refused() {
    let _s = serial();
    let src = tempfile::tempdir().unwrap();
    let mnt = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("bindfs")
        .arg(src.path())
        .arg(mnt.path())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("fuse_mount_refused: cannot mount with bindfs here; not run");
        return;
    }
    let path = mnt.path().join("data.lock");
    let r = LockFile::options().mode(Mode::Shm).open(&path);
    let unmounted = std::process::Command::new("umount")
        .arg(mnt.path())
        .status()
        .is_ok_and(|s| s.success());
    match r {
        Err(e @ Error::NetworkFileSystem { .. }) => {
            let Error::NetworkFileSystem { path: p, fs } = &e else {
                unreachable!()
            };
            assert_eq!(*p, path);
            assert_eq!(*fs, "FUSE");
            assert!(e.to_string().contains("FUSE"), "{e}");
        }
        other => panic!("shm on FUSE: {other:?}"),
    }
    assert!(unmounted, "umount {}", mnt.path().display());
    // Nothing was created beside it.
    assert!(!src.path().join("data.lock-shm").exists());
}

/// A long span is checked against every record in its way, however many
/// lists the search walks: records of more than one index (listed in the
/// coarse list and again in their owner's list) ahead of another owner's
/// one lock in the way must not end the search before it.
#[test]
fn a_long_span_meets_a_lock_behind_many_records() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let a = shm(&path);
    let b = shm(&path);
    let c = shm(&path);
    for k in 0..5u64 {
        a.acquire(
            Kind::Shared,
            1000 + 10 * k..1002 + 10 * k,
            Wait::NonBlocking,
        )
        .unwrap();
    }
    b.acquire(Kind::Exclusive, 500u64, Wait::NonBlocking)
        .unwrap();
    assert!(
        matches!(
            c.acquire(Kind::Shared, 0..200_000u64, Wait::NonBlocking),
            Err(Error::WouldBlock { .. })
        ),
        "a shared span over another owner's exclusive lock was granted"
    );
    assert!(c.held().is_empty());
    drop(b);
    c.acquire(Kind::Shared, 0..200_000u64, Wait::NonBlocking)
        .unwrap();
}
