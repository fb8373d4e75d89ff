//! Timed waits: on time, never early, cheap while waiting, quick to see a
//! release; and signals during kernel waits.
//!
//! The issue asks for "within 10 ms after the deadline" and "within 2 ms of
//! a release on an idle machine". These tests run on shared machines, so
//! they assert looser bounds that still fail if the waits were built wrong
//! (a coarse poll, a busy loop, a missed deadline), and print what they saw.

mod common;

use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::*;
use locksfile::{Error, Kind, LockFile, Mode, Wait};

/// Bound on lateness after a deadline (the target is 10 ms).
const LATE: Duration = Duration::from_millis(50);

/// One way of asking for a lock with a time limit.
type TimedTry<'a> = dyn Fn() -> Result<(), Error> + 'a;

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(r, 0);
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn timed_out<T: std::fmt::Debug>(r: Result<T, Error>) {
    match r {
        Err(Error::TimedOut { .. }) => {}
        other => panic!("expected TimedOut, got {other:?}"),
    }
}

#[test]
fn timed_waits_end_on_time_never_early() {
    let _s = serial();
    let (_dir, path) = lock_path();
    for mode in MODES {
        let lf = open(&path, mode);
        // The holder must be another owner: another process in process mode.
        let held = Pipe::new();
        let done = Pipe::new();
        let p = &path;
        let holder = fork(|| {
            let h = open(p, mode);
            let _g = h.write(0..10).unwrap();
            held.send(b'h');
            done.expect(b'd');
        });
        held.expect(b'h');
        let mut first = Vec::new();
        for ms in [0u64, 1, 20, 100, 250] {
            let d = Duration::from_millis(ms);
            let tries: [(&str, Box<TimedTry>); 5] = [
                ("write_for", Box::new(|| lf.write_for(3, d).map(drop))),
                ("read_for", Box::new(|| lf.read_for(0..20, d).map(drop))),
                (
                    "write_until",
                    Box::new(|| lf.write_until(9.., Instant::now() + d).map(drop)),
                ),
                (
                    "acquire Timeout",
                    Box::new(|| lf.acquire(Kind::Shared, 5, Wait::Timeout(d))),
                ),
                (
                    "acquire Deadline",
                    Box::new(|| lf.acquire(Kind::Exclusive, 5, Wait::Deadline(Instant::now() + d))),
                ),
            ];
            for (name, f) in tries.iter() {
                // A single scheduling hiccup of a loaded machine may make
                // one attempt late; a wait built wrong is late every time.
                let mut best = Duration::MAX;
                for attempt in 0..3 {
                    let t0 = Instant::now();
                    let r = f();
                    let took = t0.elapsed();
                    timed_out(r);
                    assert!(
                        took >= d,
                        "{mode} {name} {d:?}: returned early after {took:?}"
                    );
                    if attempt == 0 {
                        first.push(took - d);
                    }
                    best = best.min(took - d);
                    if best < LATE {
                        break;
                    }
                }
                assert!(best < LATE, "{mode} {name} {d:?}: returned {best:?} late");
            }
            assert!(lf.held().is_empty());
        }
        // A deadline already passed: one try, then TimedOut at once.
        let t0 = Instant::now();
        timed_out(lf.write_until(0, t0 - Duration::from_millis(5)));
        assert!(t0.elapsed() < LATE);
        first.sort();
        let median = first[first.len() / 2];
        let worst = first[first.len() - 1];
        eprintln!("{mode}: lateness after a deadline: median {median:?}, worst {worst:?}");
        assert!(median < Duration::from_millis(10), "{first:?}");
        done.send(b'd');
        holder.join();

        // Free: a timed wait takes it at once.
        let t0 = Instant::now();
        let g = lf.write_for(0..10, Duration::from_secs(5)).unwrap();
        assert!(t0.elapsed() < LATE);
        drop(g);
        let g = lf.read_until(3, Instant::now()).unwrap();
        drop(g);
    }
}

/// The CPU a thread burns while it waits out a timed wait: under 5% of a
/// core, measured on the waiting thread's own CPU clock.
#[test]
fn timed_wait_is_cheap_while_waiting() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let holder = open(&path, Mode::Ofd);
    let _g = holder.write(0).unwrap();
    let lf = open(&path, Mode::Ofd);
    let window = Duration::from_millis(300);
    // Other work on a loaded machine inflates the cost of each wake-up; a
    // wait that spins is over the bound in every window, so the best of
    // three windows is what is held to it.
    let mut shares = Vec::new();
    for _ in 0..3 {
        let cpu0 = thread_cpu();
        let t0 = Instant::now();
        timed_out(lf.write_for(0, window));
        let wall = t0.elapsed();
        let cpu = thread_cpu() - cpu0;
        let share = cpu.as_secs_f64() / wall.as_secs_f64();
        eprintln!(
            "timed wait: {cpu:?} of CPU over {wall:?} ({:.2}%)",
            share * 100.0
        );
        shares.push(share);
        if share < 0.05 {
            break;
        }
    }
    let best = shares.iter().copied().fold(f64::MAX, f64::min);
    assert!(best < 0.05, "a timed wait used {shares:?} of a core");
}

/// How soon a timed waiter sees a release. The holder keeps the lock for a
/// while first (the scenario, not synchronisation: the waiter has announced
/// itself, and the result does not depend on which runs first), so the
/// waiter is deep in its polling when the lock goes.
#[test]
fn timed_wait_gets_the_lock_soon_after_release() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let holder = open(&path, Mode::Ofd);
    let mut late = Vec::new();
    for round in 0..8u64 {
        let g = holder.write(0).unwrap();
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let p = path.clone();
        let waiter = std::thread::spawn(move || {
            let lf = LockFile::open(&p).unwrap();
            ready_tx.send(()).unwrap();
            let g = lf.write_for(0, Duration::from_secs(10)).unwrap();
            tx.send(Instant::now()).unwrap();
            drop(g);
        });
        ready_rx.recv_timeout(STUCK).unwrap();
        // Hold for 20 to 41 ms, to land at different points of the poll.
        std::thread::sleep(Duration::from_millis(20 + round * 3));
        drop(g);
        let released = Instant::now();
        let got = rx.recv_timeout(STUCK).expect("the waiter got the lock");
        waiter.join().unwrap();
        late.push(got.saturating_duration_since(released));
    }
    late.sort();
    let median = late[late.len() / 2];
    let worst = *late.last().unwrap();
    eprintln!("release to acquisition: median {median:?}, worst {worst:?}");
    assert!(
        median < Duration::from_millis(10),
        "median {median:?}: {late:?}"
    );
    // One hiccup of a loaded machine is forgiven, not two.
    let second_worst = late[late.len() - 2];
    assert!(second_worst < LATE, "{late:?}");
}

/// A timed wait behind a sibling thread of the same handle that sleeps in
/// the kernel on the same span still ends on time.
#[test]
fn timed_wait_behind_a_sibling_thread_ends_on_time() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let other = open(&path, Mode::Ofd);
    let g = other.write(0).unwrap();
    let lf = Arc::new(open(&path, Mode::Ofd));
    let sleeper = {
        let lf = lf.clone();
        std::thread::spawn(move || {
            lf.acquire(Kind::Exclusive, 0, Wait::Blocking).unwrap();
            lf.release(0).unwrap();
        })
    };
    wait_for_waiter(&path, 0, None);
    let d = Duration::from_millis(60);
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let t0 = Instant::now();
        timed_out(lf.write_for(0, d));
        let took = t0.elapsed();
        assert!(took >= d, "early: {took:?}");
        best = best.min(took - d);
        if best < LATE {
            break;
        }
    }
    assert!(best < LATE, "{best:?} late");
    drop(g);
    sleeper.join().unwrap();
    assert!(lf.held().is_empty());
    assert!(other.try_write(0).is_ok());
}

/// Where the child's signal handler counts: a slot of memory shared with
/// the parent, so the parent knows when the handler has run.
static SIGNALS: AtomicPtr<AtomicU64> = AtomicPtr::new(std::ptr::null_mut());

extern "C" fn count_signal(_: libc::c_int) {
    let p = SIGNALS.load(Ordering::SeqCst);
    if !p.is_null() {
        // SAFETY: set to a slot of a shared mapping that outlives the child.
        unsafe { (*p).fetch_add(1, Ordering::SeqCst) };
    }
}

/// Install a SIGUSR1 handler without SA_RESTART, so the signal interrupts
/// `F_SETLKW` with EINTR (only ever called in a forked child).
fn catch_sigusr1(counter: &AtomicU64) {
    SIGNALS.store(
        counter as *const AtomicU64 as *mut AtomicU64,
        Ordering::SeqCst,
    );
    // SAFETY: a zeroed sigaction with a plain handler that only touches an
    // atomic; installed in a single-threaded child.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = count_signal as *const () as usize;
        sa.sa_flags = 0;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
    }
}

/// Wait until the child's handler has run `n` times in all.
fn until_handled(counter: &AtomicU64, n: u64) {
    let deadline = Instant::now() + STUCK;
    while counter.load(Ordering::SeqCst) < n {
        assert!(Instant::now() < deadline, "signal {n} not handled");
        std::thread::yield_now();
    }
}

/// A signal ends a `BlockingInterruptible` wait with `Interrupted`, holding
/// nothing; a `Blocking` wait goes back to sleep and gets the lock.
fn signals(mode: Mode) {
    let _s = serial();
    let (_dir, path) = lock_path();
    let p = &path;
    let shared = Shared::new(1);
    let handled = &shared.slots()[0];
    let holder = open(p, mode);
    let g = holder.write(0..3).unwrap();
    let step = Pipe::new();
    let go = Pipe::new();
    let child = fork(|| {
        catch_sigusr1(handled);
        let lf = open(p, mode);
        lf.acquire(Kind::Shared, 10, Wait::NonBlocking).unwrap();
        step.send(b'i');
        let e = lf
            .acquire(Kind::Exclusive, 1, Wait::BlockingInterruptible)
            .unwrap_err();
        assert!(matches!(e, Error::Interrupted), "{e:?}");
        let io: std::io::Error = e.into();
        assert_eq!(io.kind(), std::io::ErrorKind::Interrupted);
        // Nothing taken, nothing lost.
        assert_eq!(lf.held(), vec![(span(10), Kind::Shared)]);
        step.send(b'b');
        go.expect(b'g');
        let g = lf.write(1).unwrap();
        assert_eq!(
            lf.held(),
            vec![(span(1), Kind::Exclusive), (span(10), Kind::Shared)]
        );
        step.send(b'w');
        go.expect(b'x');
        drop(g);
    });
    let waiter = pid_in(mode, child.pid);

    step.expect(b'i');
    wait_for_waiter(p, 1, waiter);
    child.kill(libc::SIGUSR1);
    step.expect(b'b');
    assert_eq!(handled.load(Ordering::SeqCst), 1);
    assert_eq!(
        probe(p, Kind::Shared, 0..5),
        Some(common::holder(mode, 0..3, Kind::Exclusive, pid()))
    );

    go.send(b'g');
    wait_for_waiter(p, 1, waiter);
    child.kill(libc::SIGUSR1);
    // Once the handler has run the wait was cut short; the child must be
    // back asleep in the kernel, not out with an error.
    until_handled(handled, 2);
    wait_for_waiter(p, 1, waiter);
    child.kill(libc::SIGUSR1);
    until_handled(handled, 3);
    wait_for_waiter(p, 1, waiter);
    assert_eq!(step.try_recv(Duration::ZERO), None);
    drop(g);
    step.expect(b'w');
    assert_eq!(
        probe(p, Kind::Shared, 0..5),
        Some(common::holder(mode, 1, Kind::Exclusive, child.pid))
    );
    go.send(b'x');
    child.join();
}

mode_tests! { signals_during_kernel_waits => signals }

/// A timeout too long for the clock to hold (`Duration::MAX`, or a deadline
/// centuries away) means "as long as it takes": the waiter sleeps in the
/// kernel like a blocking wait, and gets the lock once the holder lets go,
/// instead of giving up at once.
#[test]
fn a_timeout_past_the_clocks_range_waits_as_long_as_it_takes() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let huge = [Duration::MAX, Duration::from_secs(u64::MAX / 2)];
    for mode in MODES {
        for (round, timeout) in huge.into_iter().enumerate() {
            let lf = open(&path, mode);
            let p = &path;
            let holder = hold_elsewhere(p, mode, Kind::Exclusive, 0..4);
            std::thread::scope(|s| {
                let (tx, rx) = mpsc::channel();
                let lf = &lf;
                s.spawn(move || {
                    let r = if round == 0 {
                        lf.read_for(2, timeout).map(drop)
                    } else {
                        lf.acquire(Kind::Exclusive, 2, Wait::Timeout(timeout))
                    };
                    tx.send(r).unwrap();
                });
                assert!(
                    matches!(
                        rx.recv_timeout(Duration::from_millis(300)),
                        Err(mpsc::RecvTimeoutError::Timeout)
                    ),
                    "{mode}: a wait of {timeout:?} ended early"
                );
                // Asleep in F_SETLKW, as a blocking wait.
                wait_for_waiter(p, 2, waiter_pid(mode, pid()));
                holder.release();
                match rx.recv_timeout(STUCK) {
                    Ok(Ok(())) => {}
                    other => panic!("{mode}: after the release: {other:?}"),
                }
            });
            lf.release_all().unwrap();
        }
    }
}
