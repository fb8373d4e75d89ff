//! The PostgreSQL engine against a real server (see `pg/mod.rs` for how the
//! server is found): exclusion between handles and processes, kinds,
//! conversions, waits, deadlocks, death of holders and waiters, bad input.

mod pg;

use std::time::{Duration, Instant};

use locksfile::{Error, Kind, LockFile, Mode, ReadGuard, SpanError, Wait, WriteGuard};
use pg::{connect, psql, server, target, until, waiting, ChildProc};

/// Not a test: the body of the child processes the tests spawn.
#[test]
fn child() {
    pg::child_main();
}

macro_rules! server_or_skip {
    () => {
        match server() {
            Some(s) => s,
            None => return,
        }
    };
}

#[test]
fn two_handles_exclude_each_other_and_shared_locks_share() {
    let srv = server_or_skip!();
    let t = target(&srv, "excl");
    let a = connect(&t);
    let b = connect(&t);
    assert_eq!(a.mode(), Mode::Postgres);
    let abilities = a.abilities();
    assert!(abilities.detects_deadlocks && abilities.fair && abilities.releases_on_death);

    let g = a.write(0..10).unwrap();
    assert!(matches!(b.try_read(5), Err(Error::WouldBlock { .. })));
    assert!(b.try_read(10).is_ok());
    assert_eq!(
        a.held(),
        vec![(locksfile::Span::new(0, 10).unwrap(), Kind::Exclusive)]
    );
    drop(g);
    assert!(a.held().is_empty());

    let r1 = a.read(3..6).unwrap();
    let r2 = b.read(4..8).unwrap();
    assert!(matches!(b.try_write(3), Err(Error::WouldBlock { .. })));
    assert!(matches!(a.try_write(7), Err(Error::WouldBlock { .. })));
    drop((r1, r2));
    let _w = b.write(3..8).unwrap();

    // Another namespace on the same server is another set of locks.
    let other = connect(&target(&srv, "excl-other"));
    assert!(other.try_write(3..8).is_ok());
}

#[test]
fn explicit_calls_stack_nothing_on_the_server() {
    let srv = server_or_skip!();
    let t = target(&srv, "explicit");
    let a = connect(&t);
    let b = connect(&t);
    // The same lock asked for many ways reaches the server once.
    a.acquire(Kind::Exclusive, 5, Wait::NonBlocking).unwrap();
    a.acquire(Kind::Exclusive, 5, Wait::NonBlocking).unwrap();
    let g = a.write(5).unwrap();
    drop(g);
    a.release(5).unwrap();
    // One release freed it: the server held it once.
    b.acquire(Kind::Exclusive, 5, Wait::NonBlocking).unwrap();
    b.release_all().unwrap();
    assert!(a.try_write(5).is_ok());
}

#[test]
fn a_refused_span_takes_nothing() {
    let srv = server_or_skip!();
    let t = target(&srv, "allornone");
    let a = connect(&t);
    let b = connect(&t);
    let c = connect(&t);
    let _mid = b.write(3).unwrap();
    // Keys 1 and 2 come before the refused 3: none may stay held.
    assert!(matches!(a.try_write(1..6), Err(Error::WouldBlock { .. })));
    assert!(matches!(
        a.write_for(1..6, Duration::from_millis(100)),
        Err(Error::TimedOut { .. })
    ));
    assert!(a.held().is_empty());
    drop(c.try_write(1..3).expect("keys 1 and 2 free"));
    drop(c.try_write(4..6).expect("keys 4 and 5 free"));
    // Not even for the moment the server takes to end the failed
    // statement, which is long when it took thousands of keys first.
    let _last = b.write(4000).unwrap();
    for _ in 0..20 {
        assert!(matches!(
            a.write_for(4..4001, Duration::from_millis(2)),
            Err(Error::TimedOut { .. })
        ));
        assert!(a.held().is_empty());
        drop(
            c.try_write(4..4000)
                .expect("the failed statement's keys free"),
        );
    }
}

#[test]
fn conflicts_names_the_holding_session() {
    let srv = server_or_skip!();
    let t = target(&srv, "names");
    let a = connect(&t);
    let b = connect(&t);
    let _g = a.write(7).unwrap();
    let h = b
        .conflicts(Kind::Shared, 0..100)
        .unwrap()
        .expect("a holder");
    assert_eq!(h.kind, Kind::Exclusive);
    assert_eq!(h.span, locksfile::Span::new(7, 8).unwrap());
    let s = h.server.expect("a server holder");
    assert_eq!(
        s.application_name(),
        format!("locksfile pid {}", std::process::id())
    );
    assert!(s.backend_pid > 0);
    assert_eq!(s.client_addr, None, "a Unix-socket client has no address");
    match b.try_read(7) {
        Err(Error::WouldBlock {
            holder: Some(h), ..
        }) => {
            assert!(h.to_string().contains("backend pid"), "{h}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(a.conflicts(Kind::Exclusive, 7).unwrap(), None);
}

#[test]
fn two_processes_exclude_each_other() {
    let srv = server_or_skip!();
    let t = target(&srv, "procs");
    let mut child = ChildProc::spawn("child", &t, "hold-x:4");
    child.ready();
    let me = connect(&t);
    match me.try_read(4) {
        Err(Error::WouldBlock {
            holder: Some(h), ..
        }) => {
            let s = h.server.unwrap();
            assert_eq!(
                s.application_name(),
                format!("locksfile pid {}", child.child.id())
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(me.try_read(5).is_ok());
}

#[test]
fn a_killed_holders_lock_goes_to_its_waiter_within_a_second() {
    let srv = server_or_skip!();
    let t = target(&srv, "killholder");
    let mut child = ChildProc::spawn("child", &t, "hold-x:1");
    child.ready();
    let me = connect(&t);
    let before = waiting(&srv, &t);
    std::thread::scope(|s| {
        let w = s.spawn(|| {
            let g = me.write_for(1, pg::STUCK).unwrap();
            let at = Instant::now();
            drop(g);
            at
        });
        until("our wait to reach the server", || {
            waiting(&srv, &t) > before
        });
        let killed = Instant::now();
        child.kill();
        let granted = w.join().unwrap();
        let took = granted - killed;
        assert!(
            took < Duration::from_secs(1),
            "granted {took:?} after the kill"
        );
    });
}

#[test]
fn a_killed_waiter_is_never_granted() {
    let srv = server_or_skip!();
    let t = target(&srv, "killwaiter");
    let me = connect(&t);
    let g = me.write(2).unwrap();
    let before = waiting(&srv, &t);
    let mut child = ChildProc::spawn("child", &t, "wait-x:2");
    child.ready();
    until("the child's wait to reach the server", || {
        waiting(&srv, &t) > before
    });
    let app = format!("locksfile pid {}", child.child.id());
    child.kill();
    // client_connection_check_interval ends the dead client's backend.
    until("the dead waiter's backend to end", || {
        psql(
            &srv,
            &format!("SELECT count(*) FROM pg_stat_activity WHERE application_name = '{app}'"),
        ) == "0"
    });
    drop(g);
    let other = connect(&t);
    assert!(other.try_write(2).is_ok(), "the dead waiter got the lock");
}

#[test]
fn shared_locks_upgrade_keeping_the_shared_lock_while_waiting() {
    let srv = server_or_skip!();
    let t = target(&srv, "upgrade");
    let a = connect(&t);
    let b = connect(&t);
    let c = connect(&t);
    let ra = a.read(1).unwrap();
    let rb = b.read(1).unwrap();
    let before = waiting(&srv, &t);
    std::thread::scope(|s| {
        let up = s.spawn(|| ReadGuard::upgrade(ra).map_err(|(_, e)| e).map(drop));
        until("the upgrade to wait", || waiting(&srv, &t) > before);
        // While it waits, a still holds its shared lock: no writer gets in,
        // and b's shared lock stands.
        assert!(matches!(c.try_write(1), Err(Error::WouldBlock { .. })));
        assert_eq!(a.held().len(), 1);
        drop(rb);
        up.join().unwrap().unwrap();
    });
    assert!(c.try_write(1).is_ok());
}

#[test]
fn a_downgrade_never_waits_even_with_a_writer_queued() {
    let srv = server_or_skip!();
    let t = target(&srv, "downgrade");
    let a = connect(&t);
    let b = connect(&t);
    let w = a.write(1..4).unwrap();
    let before = waiting(&srv, &t);
    std::thread::scope(|s| {
        let queued = s.spawn(|| drop(b.write_for(1..4, pg::STUCK).unwrap()));
        until("the writer to queue", || waiting(&srv, &t) > before);
        let t0 = Instant::now();
        let r = WriteGuard::downgrade(w);
        assert!(t0.elapsed() < Duration::from_millis(500));
        assert_eq!(
            a.held(),
            vec![(locksfile::Span::new(1, 4).unwrap(), Kind::Shared)]
        );
        drop(r);
        queued.join().unwrap();
    });
}

#[test]
fn a_two_owner_cycle_is_a_deadlock() {
    let srv = server_or_skip!();
    let t = target(&srv, "deadlock");
    let a = connect(&t);
    let b = connect(&t);
    let ga = a.write(1).unwrap();
    let gb = b.write(2).unwrap();
    let before = waiting(&srv, &t);
    let (ra, rb) = std::thread::scope(|s| {
        let wa = s.spawn(|| {
            let r = a.write_for(2, pg::STUCK).map(drop);
            // Whoever loses lets go, and the other gets through.
            drop(ga);
            r
        });
        until("a to wait", || waiting(&srv, &t) > before);
        let rb = b.write_for(1, pg::STUCK).map(drop);
        drop(gb);
        (wa.join().unwrap(), rb)
    });
    assert!(ra.is_ok() || rb.is_ok(), "{ra:?} {rb:?}");
    let deadlocks = [&ra, &rb]
        .iter()
        .filter(|r| matches!(r, Err(Error::Deadlock { .. })))
        .count();
    assert_eq!(deadlocks, 1, "{ra:?} {rb:?}");
}

#[test]
fn timed_waits_time_out_and_non_blocking_calls_do_not_wait() {
    let srv = server_or_skip!();
    let t = target(&srv, "timeouts");
    let a = connect(&t);
    let b = connect(&t);
    let _g = a.write(9).unwrap();
    let t0 = Instant::now();
    assert!(matches!(
        b.read_for(9, Duration::from_millis(200)),
        Err(Error::TimedOut { .. })
    ));
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(190) && took < Duration::from_secs(2),
        "{took:?}"
    );
    let t0 = Instant::now();
    assert!(b.try_write(9).is_err());
    assert!(t0.elapsed() < Duration::from_secs(1));
    assert!(b.held().is_empty());
    // The timeout was for that statement only: a later wait is untimed.
    std::thread::scope(|s| {
        let before = waiting(&srv, &t);
        let w = s.spawn(|| b.write(9).map(drop));
        until("b to wait", || waiting(&srv, &t) > before);
        drop(_g);
        w.join().unwrap().unwrap();
    });
}

#[test]
fn a_release_on_another_thread_is_not_held_up_by_a_wait() {
    let srv = server_or_skip!();
    let t = target(&srv, "sibling");
    let a = connect(&t);
    let b = connect(&t);
    let _gb = b.write(1).unwrap();
    let ga = a.write(5).unwrap();
    let before = waiting(&srv, &t);
    std::thread::scope(|s| {
        let w = s.spawn(|| a.write_for(1, pg::STUCK).map(drop));
        until("a to wait", || waiting(&srv, &t) > before);
        let t0 = Instant::now();
        drop(ga); // a's wait holds the session: the release cancels it
        assert!(t0.elapsed() < Duration::from_secs(1));
        // Released on the server at once, and the wait goes on.
        assert!(b.try_write(5).is_ok());
        // The wait must still be on (if it ended, say how).
        until("a to wait again", || {
            w.is_finished() || waiting(&srv, &t) > before
        });
        assert!(!w.is_finished(), "the wait ended: {:?}", w.join().unwrap());
        drop(_gb);
        w.join().unwrap().unwrap();
    });
}

#[test]
fn spans_past_the_cap_or_open_ended_are_refused() {
    let srv = server_or_skip!();
    let a = connect(&target(&srv, "cap"));
    assert!(matches!(
        a.try_write(0..5000),
        Err(Error::InvalidSpan(SpanError::TooLong))
    ));
    assert!(matches!(
        a.try_write(..),
        Err(Error::InvalidSpan(SpanError::TooLong))
    ));
    assert!(matches!(
        a.try_write(1u64 << 31),
        Err(Error::InvalidSpan(SpanError::PastServerKeys))
    ));
    // Releasing everything is fine.
    a.release_all().unwrap();
}

#[test]
fn ten_thousand_locks_in_one_session() {
    let srv = server_or_skip!();
    let t = target(&srv, "many");
    let a = connect(&t);
    let mut guards = Vec::new();
    for start in (0..10_240u64).step_by(4096) {
        guards.push(a.write(start..(start + 4096).min(10_240)).unwrap());
    }
    let b = connect(&t);
    assert!(b.try_read(10_239).is_err());
    assert!(b.try_read(10_240).is_ok());
    drop(guards);
    assert!(b.try_write(0..4096).is_ok());
}

#[test]
fn fencing_tokens_grow_with_every_grant() {
    let srv = server_or_skip!();
    let t = target(&srv, "fence");
    let a = connect(&t);
    let b = connect(&t);
    assert!(matches!(a.fence(3), Err(Error::NotHeld { index: 3 })));
    let g = a.write(3).unwrap();
    let t1 = a.fence(3).unwrap();
    drop(g);
    let g = b.write(3).unwrap();
    let t2 = b.fence(3).unwrap();
    assert!(t2 > t1);
    drop(g);
    let _r = a.read(3).unwrap();
    assert!(matches!(a.fence(3), Err(Error::NotHeld { .. })));
}

#[test]
fn a_terminated_session_reports_every_lock_lost() {
    let srv = server_or_skip!();
    // An application name of its own: terminating by it must not hit the
    // sessions of tests running beside this one.
    let app = format!("terminated-{}", std::process::id());
    let t = target(&format!("{srv}?application_name={app}"), "terminated");
    let a = connect(&t);
    let g = a.write(1..3).unwrap();
    let r = a.read(7).unwrap();
    assert!(!a.lost());
    assert!(g.is_held() && r.is_held());
    psql(
        &srv,
        &format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = '{app}'"
        ),
    );
    until("the loss to show", || a.lost());
    assert!(
        a.held().is_empty(),
        "held() shows a lock the server dropped"
    );
    assert!(
        !g.is_held() && !r.is_held(),
        "a guard of the lost session says it holds its lock"
    );
    drop(r);
    assert!(matches!(a.try_read(5), Err(Error::ConnectionLost { .. })));
    // Releasing what is lost is no error; the lock is free on the server.
    drop(g);
    assert!(connect(&t).try_write(1..3).is_ok());
}

/// `on_lost` fires by itself, with no call on the handle, once the server
/// ends the session, and the guards then say they hold nothing; a
/// callback on a handle dropped first never fires; a lock file refuses it.
#[test]
fn on_lost_fires_without_a_call_when_the_session_ends() {
    let srv = server_or_skip!();
    let app = format!("on-lost-{}", std::process::id());
    let t = target(&format!("{srv}?application_name={app}"), "on-lost");
    let a = connect(&t);
    let g = a.write(4).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    a.on_lost(move || tx.send(Instant::now()).unwrap()).unwrap();
    let dropped = connect(&format!(
        "{srv}?name=on-lost-dropped-{}",
        std::process::id()
    ));
    let (dtx, drx) = std::sync::mpsc::channel::<()>();
    dropped.on_lost(move || dtx.send(()).unwrap()).unwrap();
    drop(dropped);
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "fired while the session lives"
    );
    let terminated = Instant::now();
    psql(
        &srv,
        &format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = '{app}'"
        ),
    );
    let fired = rx.recv_timeout(pg::STUCK).expect("on_lost fired");
    eprintln!(
        "on_lost fired {:.1} ms after pg_terminate_backend returned",
        fired.saturating_duration_since(terminated).as_secs_f64() * 1e3
    );
    assert!(!g.is_held() && a.lost());
    assert!(
        drx.recv_timeout(Duration::from_millis(300)).is_err(),
        "a dropped handle's callback fired"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = LockFile::open(dir.path().join("x.lock")).unwrap();
    assert!(matches!(
        file.on_lost(|| ()),
        Err(Error::Unsupported { .. })
    ));
}

#[test]
fn bad_input_is_a_clear_error_within_the_timeout() {
    let srv = server_or_skip!();
    let kind = |r: Result<LockFile, Error>| match r {
        Err(Error::Connect { source, target }) => {
            assert!(!target.contains("hunter2"), "{target}");
            source.kind()
        }
        Err(e) => panic!("expected a connect error, got {e}"),
        Ok(_) => panic!("connected"),
    };
    use std::io::ErrorKind as K;
    assert_eq!(
        kind(LockFile::connect("postgresql://h/db")),
        K::InvalidInput
    );
    assert_eq!(
        kind(LockFile::connect(
            "postgresql://u:hunter2@h:notaport/db?name=x"
        )),
        K::InvalidInput
    );
    // No server behind this socket directory.
    let dir = tempfile::tempdir().unwrap();
    let down = format!(
        "postgresql://u:hunter2@{}/db?name=x",
        dir.path().display().to_string().replace('/', "%2F")
    );
    let e = LockFile::connect(&down).unwrap_err();
    assert!(!e.to_string().contains("hunter2"), "{e}");
    assert!(matches!(e, Error::Connect { .. }));
    // A server that accepts and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let t0 = Instant::now();
    let r = LockFile::options()
        .connect_timeout(Duration::from_millis(300))
        .connect(&format!(
            "postgresql://u:hunter2@127.0.0.1:{port}/db?name=x"
        ));
    assert_eq!(kind(r), K::TimedOut);
    assert!(t0.elapsed() < Duration::from_secs(2));
    // A role the server does not know.
    let stranger = target(&srv.replace("postgres@", "nosuchrole@"), "bad");
    assert_eq!(kind(LockFile::connect(&stranger)), K::PermissionDenied);
    // A wrong password for a role that must give one (scram-sha-256 in the
    // test cluster's pg_hba.conf); the right one connects.
    psql(&srv, "DROP ROLE IF EXISTS locksfile_pw");
    psql(
        &srv,
        "CREATE ROLE locksfile_pw LOGIN SUPERUSER PASSWORD 'right-one'",
    );
    let as_pw = |password: &str| {
        target(
            &srv.replace("postgres@", &format!("locksfile_pw:{password}@")),
            "pw",
        )
    };
    let e = LockFile::connect(&as_pw("hunter2")).unwrap_err();
    assert!(!e.to_string().contains("hunter2"), "{e}");
    assert_eq!(kind(Err(e)), K::PermissionDenied);
    let lf = LockFile::connect(&as_pw("right-one")).unwrap();
    lf.acquire(Kind::Exclusive, 1, Wait::NonBlocking).unwrap();
    // A database where the role may not create the namespace table.
    psql(&srv, "DROP DATABASE IF EXISTS locksfile_ro");
    psql(&srv, "DROP ROLE IF EXISTS locksfile_ro");
    psql(&srv, "CREATE ROLE locksfile_ro LOGIN");
    psql(&srv, "CREATE DATABASE locksfile_ro");
    let ro = target(
        &srv.replace("postgres@", "locksfile_ro@")
            .replace("/postgres", "/locksfile_ro"),
        "ro",
    );
    match LockFile::connect(&ro) {
        Err(Error::Server { code, .. }) => assert_eq!(code, "42501"),
        other => panic!("{:?}", other.map(|_| ())),
    }
    // Debug never shows the password either.
    let good = connect(&target(
        &srv.replace("postgres@", "postgres:hunter2@"),
        "dbg",
    ));
    assert!(!format!("{good:?}").contains("hunter2"));
    assert!(!good.path().display().to_string().contains("hunter2"));
}

#[test]
fn opening_a_path_in_postgres_mode_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let r = LockFile::options()
        .mode(Mode::Postgres)
        .open(dir.path().join("x"));
    assert!(matches!(r, Err(Error::Unsupported { .. })));
}

extern "C" fn on_signal(_: libc::c_int) {}

#[test]
fn a_signal_ends_an_interruptible_wait_holding_nothing() {
    let srv = server_or_skip!();
    let t = target(&srv, "interrupt");
    let a = connect(&t);
    let b = connect(&t);
    let _g = a.write(1..3).unwrap();
    // A handler without SA_RESTART, as Python installs them.
    // SAFETY: a handler that does nothing, installed once.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as *const () as usize;
        libc::sigaction(libc::SIGUSR2, &sa, std::ptr::null_mut());
    }
    let before = waiting(&srv, &t);
    let b = &b;
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel();
        let w = s.spawn(move || {
            // SAFETY: pthread_self has no preconditions.
            tx.send(unsafe { libc::pthread_self() } as usize).unwrap();
            b.acquire(Kind::Exclusive, 0..3, Wait::BlockingInterruptible)
        });
        let thread = rx.recv().unwrap();
        until("b to wait", || waiting(&srv, &t) > before);
        let t0 = Instant::now();
        // SAFETY: the thread is alive until joined below.
        unsafe { libc::pthread_kill(thread as libc::pthread_t, libc::SIGUSR2) };
        assert!(matches!(w.join().unwrap(), Err(Error::Interrupted)));
        assert!(t0.elapsed() < Duration::from_secs(1));
    });
    assert!(b.held().is_empty());
    until("the wait to leave the server", || {
        waiting(&srv, &t) == before
    });
    // Key 0 came before the busy ones: it must not stay held.
    assert!(connect(&t).try_write(0).is_ok());
}

#[test]
fn server_locks_lists_holders_and_waiters() {
    let srv = server_or_skip!();
    let t = target(&srv, "list");
    let a = connect(&t);
    let b = connect(&t);
    let c = connect(&t);
    let _g = a.write(3..5).unwrap();
    let before = waiting(&srv, &t);
    std::thread::scope(|s| {
        let w = s.spawn(|| b.write_for(4, pg::STUCK).map(drop));
        until("b to wait", || waiting(&srv, &t) > before);
        let locks = c.server_locks().unwrap();
        let seen: Vec<(u64, Kind, bool)> = locks
            .iter()
            .map(|l| (l.holder.span.start(), l.holder.kind, l.granted))
            .collect();
        assert_eq!(
            seen,
            vec![
                (3, Kind::Exclusive, true),
                (4, Kind::Exclusive, true),
                (4, Kind::Exclusive, false)
            ]
        );
        drop(_g);
        w.join().unwrap().unwrap();
    });
}

/// Calls a thread of `lf`'s owner makes every 20 ms until `stop`: each needs
/// the session, so each cancels and restarts a sibling's wait, which
/// restarts the server's `deadlock_timeout` too.
fn keep_calling<'a>(
    s: &'a std::thread::Scope<'a, '_>,
    lf: &'a LockFile,
    stop: &'a std::sync::atomic::AtomicBool,
) {
    s.spawn(move || {
        let mut i = 0;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            drop(lf.try_read(1000 + i % 16));
            i += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
    });
}

/// A cycle of two owners whose sibling threads keep calling (so the
/// server's own detector, which needs one uninterrupted `deadlock_timeout`,
/// never runs) still ends with exactly one `Deadlock`, the engine looking
/// for the cycle itself once a restarted wait has lasted that long.
#[test]
fn a_cycle_is_found_while_siblings_keep_restarting_the_waits() {
    let srv = server_or_skip!();
    let t = target(&srv, "restarted-cycle");
    let (a, b) = (connect(&t), connect(&t));
    a.acquire(Kind::Exclusive, 1, Wait::NonBlocking).unwrap();
    b.acquire(Kind::Exclusive, 2, Wait::NonBlocking).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let started = Instant::now();
    let (ra, rb) = std::thread::scope(|s| {
        keep_calling(s, &a, &stop);
        keep_calling(s, &b, &stop);
        let wa = s.spawn(|| {
            let r = a.acquire(Kind::Exclusive, 2, Wait::Timeout(Duration::from_secs(20)));
            if r.is_err() {
                a.release_all().unwrap();
            }
            r
        });
        let wb = s.spawn(|| {
            let r = b.acquire(Kind::Exclusive, 1, Wait::Timeout(Duration::from_secs(20)));
            if r.is_err() {
                b.release_all().unwrap();
            }
            r
        });
        let out = (wa.join().unwrap(), wb.join().unwrap());
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        out
    });
    let took = started.elapsed();
    println!("cycle with restarted waits ended after {took:?}: {ra:?} / {rb:?}");
    let deadlocks = [&ra, &rb]
        .iter()
        .filter(|r| matches!(r, Err(Error::Deadlock { .. })))
        .count();
    assert_eq!(deadlocks, 1, "{ra:?} / {rb:?}");
    assert!(ra.is_ok() || rb.is_ok(), "{ra:?} / {rb:?}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

/// A timed wait that queues behind a sibling's wait for the session ends
/// on its own deadline, not when the sibling's wait ends.
#[test]
fn a_timed_wait_behind_a_siblings_wait_ends_on_time() {
    let srv = server_or_skip!();
    let t = target(&srv, "behind-sibling");
    let (a, c) = (connect(&t), connect(&t));
    c.acquire(Kind::Exclusive, 5..7, Wait::NonBlocking).unwrap();
    std::thread::scope(|s| {
        let first = s.spawn(|| a.acquire(Kind::Exclusive, 5, Wait::Blocking));
        until("the first wait to reach the server", || {
            waiting(&srv, &t) == 1
        });
        let started = Instant::now();
        let r = a.acquire(
            Kind::Exclusive,
            6,
            Wait::Timeout(Duration::from_millis(200)),
        );
        let took = started.elapsed();
        assert!(matches!(r, Err(Error::TimedOut { .. })), "{r:?}");
        assert!(took < Duration::from_secs(1), "ended after {took:?}");
        c.release_all().unwrap();
        first.join().unwrap().unwrap();
    });
}

/// Each session holds a marker (an int8 advisory key, outside every
/// namespace's two-int4 keys) that shows it is the client's own; it never
/// shows among a namespace's locks.
#[test]
fn the_session_marker_is_held_but_never_listed() {
    let srv = server_or_skip!();
    let t = target(&srv, "marker");
    let a = connect(&t);
    let b = connect(&t);
    let _g = a.write(1).unwrap();
    let markers = psql(
        &srv,
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 \
         AND classid = x'6C6B6673'::int::oid AND granted",
    );
    assert!(markers.parse::<u32>().unwrap() >= 2, "{markers}");
    let seen: Vec<(u64, Kind)> = b
        .server_locks()
        .unwrap()
        .iter()
        .map(|l| (l.holder.span.start(), l.holder.kind))
        .collect();
    assert_eq!(seen, vec![(1, Kind::Exclusive)]);
    assert!(b.conflicts(Kind::Exclusive, 0..4096).unwrap().is_some());
    assert!(a.server_locks().unwrap().is_empty());
    assert!(a.conflicts(Kind::Exclusive, 0..4096).unwrap().is_none());
    // A direct session is its own: exclusion as ever.
    assert!(matches!(b.try_write(1), Err(Error::WouldBlock { .. })));
    assert!(b.try_write(2).is_ok());
}

/// PgBouncer in transaction mode hands the server session it used last to
/// the next client: a second handle opened while the first is idle would
/// share its session, where session locks are re-entrant and exclude
/// nobody. The engine refuses that connection; in session mode two handles
/// have sessions of their own and exclude each other. The target's
/// keepalive words reach the socket.
#[test]
fn a_transaction_pooler_is_refused_and_a_session_pooler_works() {
    let _srv = server_or_skip!();
    let Some(tx) = pg::bouncer::Bouncer::start("transaction") else {
        return;
    };
    let t = tx.target("pooler-tx");
    let first = connect(&t);
    match LockFile::connect(&t) {
        Err(Error::Connect { source, .. }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::Unsupported, "{source}");
            let said = source.to_string();
            assert!(said.contains("pool_mode = session"), "{said}");
            assert!(said.contains("transaction"), "{said}");
        }
        Ok(_) => panic!("a second client on a shared server session was let in"),
        Err(e) => panic!("{e}"),
    }
    // The refused client left no marker behind: once the first is gone,
    // a new client is the session's only one.
    drop(first);
    drop(connect(&t));
    drop(tx);

    let Some(session) = pg::bouncer::Bouncer::start("session") else {
        return;
    };
    let t = format!(
        "{}&keepalives_idle=7&keepalives_interval=3&keepalives_count=2&tcp_user_timeout=12000",
        session.target("pooler-session")
    );
    let a = connect(&t);
    let b = connect(&t);
    let _g = a.write(1).unwrap();
    assert!(matches!(b.try_write(1), Err(Error::WouldBlock { .. })));
    assert!(b.try_write(2).is_ok());
    // The keepalive timer of this process's sockets to the pooler: at most
    // the target's 7 s (the engine's default is 10 s).
    let out = std::process::Command::new("ss")
        .args(["-tnoH", "state", "established"])
        .output();
    if let Some(out) = out.ok().filter(|o| o.status.success()) {
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let port = t
            .split(':')
            .nth(2)
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .to_string();
        let ours: Vec<&str> = text
            .lines()
            .filter(|l| {
                l.split_whitespace()
                    .nth(3)
                    .is_some_and(|p| p.ends_with(&format!(":{port}")))
            })
            .collect();
        assert!(ours.len() >= 2, "no sockets to :{port} in\n{text}");
        for l in ours {
            let timer = l
                .split("timer:(keepalive,")
                .nth(1)
                .and_then(|r| r.split(',').next())
                .unwrap_or_else(|| panic!("no keepalive timer: {l}"));
            assert!(ss_seconds(timer) <= 7.0, "{l}");
        }
    }
}

/// A client whose statements a transaction-mode pooler moves to another
/// server session (its own is busy with another client's transaction) is
/// told its session is lost at its next lock call: its locks are not where
/// it took them.
#[test]
fn a_client_moved_to_another_server_session_is_lost() {
    let _srv = server_or_skip!();
    let Some(tx) = pg::bouncer::Bouncer::start("transaction") else {
        return;
    };
    let t = tx.target("pooler-moved");
    let a = connect(&t);
    let _g = a.write(1).unwrap();
    // Another client takes the server session `a` used last, and keeps it
    // in a transaction.
    let url = t.split("&name=").next().unwrap().to_string();
    let mut other = std::process::Command::new("psql")
        .args([&url, "-XAtq"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = other.stdin.take().unwrap();
    {
        use std::io::{BufRead, Write};
        writeln!(stdin, "BEGIN; SELECT 'in';").unwrap();
        let mut line = String::new();
        std::io::BufReader::new(other.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "in");
    }
    assert!(!a.lost());
    match a.try_write(2) {
        Err(Error::ConnectionLost { .. }) => {}
        other => panic!("{:?}", other.map(drop)),
    }
    assert!(a.lost());
    drop(stdin);
    other.wait().unwrap();
}

/// A timer as `ss` (iproute2 6) shows it, in seconds: `996ms`, `6.964ms`
/// (seconds, under 10), `29sec`, `1min39sec`.
fn ss_seconds(t: &str) -> f64 {
    let (min, rest) = match t.split_once("min") {
        Some((m, r)) => (m.parse::<f64>().unwrap(), r),
        None => (0.0, t),
    };
    let secs = if let Some(v) = rest.strip_suffix("ms") {
        if v.contains('.') {
            v.parse::<f64>().unwrap()
        } else {
            v.parse::<f64>().unwrap() / 1000.0
        }
    } else if let Some(v) = rest.strip_suffix("sec") {
        v.parse::<f64>().unwrap()
    } else {
        0.0
    };
    min * 60.0 + secs
}
