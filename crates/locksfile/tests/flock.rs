//! `Mode::Flock`: whole-file `flock(2)` locks that exclude, and are
//! excluded by, the tools that use them (util-linux `flock(1)`, Rust's
//! `File::lock`), between processes and between handles; only the whole
//! index space is a span; conversions keep the old lock when refused;
//! waits time out and wake; an inherited handle never frees the parent's
//! lock; nothing stays in the kernel after a handle goes.

mod common;

use common::*;
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use locksfile::{Error, Holder, Kind, LockFile, Mode, ReadGuard, Span, SpanError, Wait};

fn flock_mode(path: &Path) -> LockFile {
    open(path, Mode::Flock)
}

/// A util-linux `flock(1)` process holding `path` until released.
struct FlockCmd {
    child: std::process::Child,
}

impl FlockCmd {
    /// `flock ARGS PATH sh -c ...`, once it holds the lock.
    fn hold(path: &Path, args: &[&str]) -> FlockCmd {
        let mut child = Command::new("flock")
            .args(args)
            .arg(path)
            .args(["sh", "-c", "echo held; read _ || true"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run flock(1) from util-linux");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .expect("read from flock(1)");
        assert_eq!(line, "held\n", "flock(1) did not take the lock");
        FlockCmd { child }
    }

    /// flock(1) takes the lock itself, then runs the command.
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn release(mut self) {
        drop(self.child.stdin.take());
        let status = self.child.wait().expect("wait for flock(1)");
        assert!(status.success(), "flock(1) failed: {status}");
    }
}

impl Drop for FlockCmd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `flock -n ARGS PATH true`: 0 when it got the lock, 1 when busy.
fn flock_n(path: &Path, args: &[&str]) -> i32 {
    Command::new("flock")
        .arg("-n")
        .args(args)
        .arg(path)
        .arg("true")
        .status()
        .expect("run flock(1)")
        .code()
        .expect("flock(1) exited")
}

/// The `flock(2)` locks `/proc/locks` lists on `path`: (waiting, kind, pid).
fn flock_lines(path: &Path) -> Vec<(bool, Kind, i64)> {
    use std::os::unix::fs::MetadataExt;
    let ino = fs::metadata(path).unwrap().ino();
    let text = fs::read_to_string("/proc/locks").unwrap();
    let mut out = Vec::new();
    for line in text.lines() {
        let mut f: Vec<&str> = line.split_whitespace().skip(1).collect();
        let waiting = f.first() == Some(&"->");
        if waiting {
            f.remove(0);
        }
        if f.len() < 5 || f[0] != "FLOCK" {
            continue;
        }
        if f[4].rsplit(':').next().and_then(|s| s.parse().ok()) != Some(ino) {
            continue;
        }
        let kind = if f[2] == "WRITE" {
            Kind::Exclusive
        } else {
            Kind::Shared
        };
        out.push((waiting, kind, f[3].parse().unwrap()));
    }
    out
}

/// Wait until someone sleeps in a blocking flock(2) on `path`.
fn wait_for_flock_waiter(path: &Path) {
    let deadline = Instant::now() + STUCK;
    while !flock_lines(path).iter().any(|l| l.0) {
        assert!(Instant::now() < deadline, "no flock waiter on {path:?}");
        std::thread::yield_now();
    }
}

fn busy<T: std::fmt::Debug>(r: Result<T, Error>) -> Option<Holder> {
    match r {
        Err(Error::WouldBlock { holder, .. }) => holder,
        other => panic!("expected WouldBlock, got {other:?}"),
    }
}

fn whole(kind: Kind, pid: u32) -> Option<Holder> {
    Some(Holder {
        span: Span::ALL,
        kind,
        pid: Some(pid),
        server: None,
    })
}

#[test]
fn excluded_by_flock_command() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let lf = flock_mode(&path);

    let x = FlockCmd::hold(&path, &["-x"]);
    assert_eq!(busy(lf.try_write(..)), whole(Kind::Exclusive, x.pid()));
    assert_eq!(busy(lf.try_read(..)), whole(Kind::Exclusive, x.pid()));
    assert_eq!(
        lf.conflicts(Kind::Shared, ..).unwrap(),
        whole(Kind::Exclusive, x.pid())
    );
    // The issue itself: record locks never see a flock(2) lock.
    let ofd = open(&path, Mode::Ofd);
    drop(ofd.try_write(..).expect("OFD mode ignores flock(2)"));
    x.release();
    drop(lf.try_write(..).expect("free once flock(1) is gone"));

    let s = FlockCmd::hold(&path, &["-s"]);
    assert_eq!(busy(lf.try_write(..)), whole(Kind::Shared, s.pid()));
    let r = lf.try_read(..).expect("shared with flock -s");
    assert_eq!(lf.conflicts(Kind::Shared, ..).unwrap(), None);
    drop(r);
    s.release();
}

#[test]
fn excludes_flock_command() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let lf = flock_mode(&path);
    {
        let _w = lf.write(..).unwrap();
        assert_eq!(flock_n(&path, &["-x"]), 1);
        assert_eq!(flock_n(&path, &["-s"]), 1);
    }
    {
        let _r = lf.read(..).unwrap();
        assert_eq!(flock_n(&path, &["-x"]), 1);
        assert_eq!(flock_n(&path, &["-s"]), 0);
    }
    lf.acquire(Kind::Exclusive, .., Wait::NonBlocking).unwrap();
    assert_eq!(flock_n(&path, &["-s"]), 1);
    lf.release_all().unwrap();
    assert_eq!(flock_n(&path, &["-x"]), 0);
}

#[test]
#[allow(clippy::incompatible_msrv)] // File::lock is Rust 1.89; only this test needs it.
fn std_file_lock_both_ways() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let lf = flock_mode(&path);
    let f = fs::File::open(&path).unwrap();
    // flock(2) locks of two open file descriptions exclude each other in
    // one process too.
    let w = lf.write(..).unwrap();
    assert!(matches!(
        f.try_lock_shared(),
        Err(fs::TryLockError::WouldBlock)
    ));
    drop(w);
    f.lock_shared().unwrap();
    assert_eq!(busy(lf.try_write(..)), whole(Kind::Shared, pid()));
    drop(lf.try_read(..).unwrap());
    f.unlock().unwrap();
    f.lock().unwrap();
    busy(lf.try_read(..));
    f.unlock().unwrap();
    drop(lf.try_write(..).unwrap());
}

#[test]
fn handles_and_processes_share_and_exclude() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let a = flock_mode(&path);
    let b = flock_mode(&path);
    assert!(a.abilities().releases_on_death);
    assert!(!a.abilities().detects_deadlocks && !a.abilities().fair);
    assert_eq!(a.mode().to_string(), "flock");

    let ra = a.read(..).unwrap();
    let rb = b.read(..).unwrap();
    let c = flock_mode(&path);
    assert_eq!(busy(c.try_write(..)), whole(Kind::Shared, pid()));
    drop((ra, rb));
    let w = c.write(..).unwrap();
    assert_eq!(busy(a.try_read(..)), whole(Kind::Exclusive, pid()));
    assert_eq!(
        probe(&path, Kind::Shared, ..),
        None,
        "OFD probe sees no flock"
    );

    let step = Pipe::new();
    let done = Pipe::new();
    let parent = pid();
    let child = fork(|| {
        let lf = flock_mode(&path);
        assert_eq!(busy(lf.try_read(..)), whole(Kind::Exclusive, parent));
        step.send(1);
        // Granted once the parent lets go.
        let _w = lf.write(..).unwrap();
        done.send(2);
        step.expect(3);
    });
    step.expect(1);
    drop(w);
    done.expect(2);
    assert_eq!(busy(a.try_read(..)), whole(Kind::Exclusive, child.pid));
    step.send(3);
    child.join();
    drop(a.try_write(..).unwrap());
}

#[test]
fn only_the_whole_index_space() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let lf = flock_mode(&path);
    let not_whole = |r: Result<(), Error>| match r {
        Err(Error::InvalidSpan(SpanError::NotWholeFile)) => {}
        other => panic!("expected InvalidSpan(NotWholeFile), got {other:?}"),
    };
    for s in [span(0), span(0..10), span(5..), span((0, 1))] {
        not_whole(lf.try_read(s).map(drop));
        not_whole(lf.try_write(s).map(drop));
        not_whole(lf.write(s).map(drop));
        not_whole(lf.read_for(s, Duration::ZERO).map(drop));
        not_whole(lf.acquire(Kind::Shared, s, Wait::Blocking));
        not_whole(lf.release(s));
        not_whole(lf.conflicts(Kind::Exclusive, s).map(drop));
    }
    // Refused before anything reached the kernel.
    assert!(flock_lines(&path).is_empty());
    assert!(lf.held().is_empty());
    // The message says what to do.
    let msg = lf.try_read(3).unwrap_err().to_string();
    assert!(msg.contains("whole file") && msg.contains(".."), "{msg}");
    // Also while holding: the whole space is still fine, a part is not.
    let _g = lf.read(..).unwrap();
    not_whole(lf.release(0..1));
    assert_eq!(lf.held(), vec![(Span::ALL, Kind::Shared)]);
}

#[test]
fn refused_upgrade_keeps_the_shared_lock() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let lf = flock_mode(&path);
    let other = FlockCmd::hold(&path, &["-s"]);
    let r = lf.read(..).unwrap();
    let shared = vec!["FLOCK  ADVISORY  READ".to_string()];
    let ours = |lf: &LockFile| -> Vec<String> {
        fd_locks(lf)
            .iter()
            .map(|l| {
                l.split(' ')
                    .filter(|w| !w.is_empty())
                    .take(3)
                    .collect::<Vec<_>>()
                    .join("  ")
            })
            .collect()
    };
    assert_eq!(ours(&lf), shared);

    // flock(2) drops the shared lock before it refuses the exclusive one;
    // the engine takes it back, so the refusal changes nothing.
    let r = ReadGuard::try_upgrade(r).expect_err("another reader is in the way");
    assert_eq!(ours(&lf), shared);
    assert_eq!(lf.held(), vec![(Span::ALL, Kind::Shared)]);
    let r = match ReadGuard::upgrade_with(r, Wait::Timeout(Duration::from_millis(30))) {
        Err((r, Error::TimedOut { .. })) => r,
        other => panic!("expected a timed-out upgrade, got {other:?}"),
    };
    assert_eq!(ours(&lf), shared);
    let e = lf
        .acquire(Kind::Exclusive, .., Wait::NonBlocking)
        .unwrap_err();
    assert_eq!(busy::<()>(Err(e)), whole(Kind::Shared, other.pid()));
    assert_eq!(ours(&lf), shared);

    // With the other reader gone, our shared lock is what keeps writers out.
    other.release();
    assert_eq!(flock_n(&path, &["-x"]), 1);
    let w = ReadGuard::try_upgrade(r).expect("alone now");
    assert_eq!(ours(&lf), vec!["FLOCK  ADVISORY  WRITE".to_string()]);
    drop(w);
    assert!(flock_lines(&path).is_empty());
}

#[test]
fn waiting_upgrade_keeps_the_shared_lock() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let lf = Arc::new(flock_mode(&path));
    let other = FlockCmd::hold(&path, &["-s"]);
    let r = ReadGuard::acquire(lf.clone(), .., Wait::Blocking).unwrap();
    let upgrader = std::thread::spawn(move || ReadGuard::upgrade(r).map(drop).map_err(|(_, e)| e));
    // A blocking flock(LOCK_EX) would drop our shared lock and sleep as a
    // waiter; the poll keeps the shared lock and never shows as one. Each
    // of its rare tries drops the lock for a moment (flock(2) converts by
    // unlocking first), which a sample may catch.
    let mut without = 0;
    for _ in 0..200 {
        let lines = flock_lines(&path);
        assert!(!lines.iter().any(|l| l.0), "a waiter: {lines:?}");
        if !lines.contains(&(false, Kind::Shared, i64::from(pid()))) {
            without += 1;
        }
        std::thread::yield_now();
    }
    assert!(
        without < 20,
        "our shared lock was gone in {without} of 200 samples"
    );
    other.release();
    upgrader.join().unwrap().expect("upgraded once alone");
    assert!(flock_lines(&path).is_empty());
}

#[test]
fn timed_and_blocking_waits() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let lf = Arc::new(flock_mode(&path));
    let x = FlockCmd::hold(&path, &["-x"]);
    for wait in [Duration::ZERO, Duration::from_millis(40)] {
        let t = Instant::now();
        assert!(matches!(
            lf.write_for(.., wait),
            Err(Error::TimedOut { .. })
        ));
        assert!(matches!(lf.read_for(.., wait), Err(Error::TimedOut { .. })));
        assert!(t.elapsed() >= wait * 2);
    }
    assert!(lf.held().is_empty());

    // An untimed wait sleeps in the kernel and wakes on the release.
    let waiter = {
        let lf = lf.clone();
        std::thread::spawn(move || lf.write(..).map(drop))
    };
    wait_for_flock_waiter(&path);
    x.release();
    waiter.join().unwrap().unwrap();

    // A timed wait polls, and sees the release too.
    let x = FlockCmd::hold(&path, &["-s"]);
    let waiter = {
        let lf = lf.clone();
        std::thread::spawn(move || lf.write_for(.., STUCK).map(drop))
    };
    x.release();
    waiter.join().unwrap().unwrap();
    assert!(flock_lines(&path).is_empty());
}

#[test]
fn inherited_handle_never_frees_the_parents_lock() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let lf = Arc::new(flock_mode(&path));
    let mut w = Some(locksfile::WriteGuard::acquire(lf.clone(), .., Wait::Blocking).unwrap());
    let mut inherited = Some(lf);
    let child = fork(|| {
        let lf = inherited.take().unwrap();
        let w = w.take().unwrap();
        assert!(matches!(lf.try_read(..), Err(Error::Forked)));
        assert!(matches!(lf.release_all(), Err(Error::Forked)));
        assert!(matches!(lf.conflicts(Kind::Shared, ..), Err(Error::Forked)));
        // The open file description, and its lock, is shared with the
        // parent: neither the guard nor the handle may unlock it.
        drop(w);
        drop(lf);
    });
    child.join();
    let lf = inherited.unwrap();
    assert_eq!(flock_n(&path, &["-s"]), 1);
    assert_eq!(lf.held(), vec![(Span::ALL, Kind::Exclusive)]);
    assert_eq!(
        flock_lines(&path),
        vec![(false, Kind::Exclusive, i64::from(pid()))]
    );
}

#[test]
fn nothing_held_after_drop_and_file_untouched() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let lf = flock_mode(&path);
    let before = fs::metadata(&path).unwrap();
    {
        let r = lf.read(..).unwrap();
        let w = ReadGuard::upgrade(r).unwrap();
        let r = locksfile::WriteGuard::downgrade(w);
        assert_eq!(
            flock_lines(&path),
            vec![(false, Kind::Shared, i64::from(pid()))]
        );
        drop(r);
    }
    assert!(flock_lines(&path).is_empty());
    lf.acquire(Kind::Exclusive, .., Wait::Blocking).unwrap();
    let _g = lf.read(..).unwrap();
    assert_eq!(flock_lines(&path).len(), 1);
    drop(_g);
    drop(lf);
    assert!(flock_lines(&path).is_empty());
    let after = fs::metadata(&path).unwrap();
    assert_eq!(after.len(), 0);
    assert_eq!(after.permissions().mode(), before.permissions().mode());
    assert_eq!(before.permissions().mode() & 0o777, 0o644);
}

#[test]
fn does_not_mix_with_record_locks() {
    let _s = serial();
    let (_dir, path) = lock_path();
    // Modes never fall back to one another: each excludes its own kind.
    let f = flock_mode(&path);
    let _w = f.write(..).unwrap();
    for mode in MODES {
        if mode == Mode::Shm {
            // The table would not exclude flock(2) users either: refused.
            let e = LockFile::options().mode(mode).open(&path).unwrap_err();
            assert!(matches!(e, locksfile::Error::MixedModes { .. }), "{e}");
            continue;
        }
        drop(
            open(&path, mode)
                .try_write(..)
                .expect("record locks ignore flock(2)"),
        );
    }
}

#[test]
fn closing_a_flock_handle_keeps_process_mode_locks() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let p = open(&path, Mode::Process);
    p.acquire(Kind::Exclusive, 0, Wait::NonBlocking).unwrap();
    // Closing any descriptor of the file would drop the process's record
    // locks on it: a flock handle's descriptor is parked, not closed, and
    // the next flock handle takes it again rather than open one more.
    let open_fds = || fs::read_dir("/proc/self/fd").unwrap().count();
    let mut after_first = None;
    for _ in 0..3 {
        let f = flock_mode(&path);
        drop(f.write(..).unwrap());
        drop(f);
        assert_eq!(
            probe(&path, Kind::Shared, 0),
            Some(holder(Mode::Process, 0, Kind::Exclusive, pid()))
        );
        assert_eq!(*after_first.get_or_insert_with(open_fds), open_fds());
    }
    assert!(flock_lines(&path).is_empty());
}
