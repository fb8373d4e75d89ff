//! Lock statistics with real processes: a handle's own figures in every
//! mode (uncontended and contended takes, a refusal, a timeout, a
//! deadlock where the engine reports them), and a shared-memory table's
//! table-wide figures, written by processes that are gone and read by a
//! third.

mod common;

use std::time::Duration;

use common::*;
use locksfile::{Error, Kind, LockFile, Mode, Scope, Span, Wait};

/// How long the other process holds while we wait: a floor for the wait.
const HOLD: Duration = Duration::from_millis(150);

/// Until `/proc/locks` lists a blocked `flock(2)` waiter on `path` (a
/// `-> FLOCK` line of its inode).
fn wait_for_flock_waiter(path: &std::path::Path) {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(path).unwrap().ino();
    let deadline = std::time::Instant::now() + STUCK;
    loop {
        let text = std::fs::read_to_string("/proc/locks").unwrap();
        let waiting = text.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1) == Some(&"->")
                && f.get(2) == Some(&"FLOCK")
                && f.get(6).and_then(|d| d.rsplit(':').next()) == Some(&ino.to_string()[..])
        });
        if waiting {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no flock waiter on {}",
            path.display()
        );
        std::thread::yield_now();
    }
}

fn recording(path: &std::path::Path, mode: Mode) -> LockFile {
    LockFile::options()
        .mode(mode)
        .stats(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open in {mode} mode: {e}"))
}

/// The span a mode can take, and the index its figures are under
/// (`flock` takes the whole file: "other indices").
fn span_of(mode: Mode) -> (Span, Option<u64>) {
    if mode == Mode::Flock {
        (Span::ALL, None)
    } else {
        (span(3), Some(3))
    }
}

fn handle_figures(mode: Mode) {
    let _s = serial();
    let (_dir, path) = lock_path();
    let (s, key) = span_of(mode);
    let me = recording(&path, mode);
    // Two uncontended takes.
    drop(me.write(s).unwrap());
    me.acquire(Kind::Shared, s, Wait::NonBlocking).unwrap();
    me.release(s).unwrap();

    let held = Pipe::new();
    let go = Pipe::new();
    let child_path = &path;
    let child = fork(|| {
        let lf = LockFile::options()
            .mode(mode)
            .stats(false)
            .open(child_path)
            .unwrap();
        let g = lf.write(s).unwrap();
        held.send(b'h');
        go.expect(b'w');
        // Release only once the parent is asleep waiting (the kernel lists
        // it, flock(2) waiters too): its wait is then at least HOLD.
        if mode == Mode::Flock {
            wait_for_flock_waiter(child_path);
        } else {
            wait_for_waiter(child_path, s.start(), None);
        }
        std::thread::sleep(HOLD);
        drop(g);
    });
    held.expect(b'h');
    assert!(matches!(me.try_write(s), Err(Error::WouldBlock { .. })));
    assert!(matches!(
        me.write_for(s, Duration::from_millis(30)),
        Err(Error::TimedOut { .. })
    ));
    go.send(b'w');
    drop(me.write(s).unwrap());
    child.join();

    let stats = me.stats().unwrap();
    let want = if mode == Mode::Shm {
        Scope::Table
    } else {
        Scope::Handle
    };
    assert_eq!(stats.scope, want, "{mode}");
    let l = stats
        .locks
        .iter()
        .find(|l| l.index == key)
        .unwrap_or_else(|| panic!("{mode}: no figures for {key:?}: {stats:?}"));
    assert_eq!(l.acquired, 3, "{mode}: {l:?}");
    assert_eq!(l.contended, 3, "{mode}: refused, timed out, waited: {l:?}");
    assert_eq!(l.timeouts, 1, "{mode}: {l:?}");
    assert_eq!(l.deadlocks, 0, "{mode}: {l:?}");
    assert_eq!(
        l.wait.count(),
        2,
        "{mode}: the timed-out and the granted wait"
    );
    assert!(l.wait.max() >= HOLD, "{mode}: {:?}", l.wait.max());
    assert!(l.wait.max() < STUCK, "{mode}: {:?}", l.wait.max());
    assert!(l.wait.p50() >= Duration::from_millis(30), "{mode}");
    assert_eq!(l.hold.count(), 3, "{mode}: {l:?}");
    let o = stats
        .owners
        .iter()
        .find(|o| o.pid == pid())
        .unwrap_or_else(|| panic!("{mode}: no owner {}: {stats:?}", pid()));
    assert_eq!((o.acquired, o.contended, o.timeouts), (3, 3, 1), "{mode}");
    assert!(o.command.as_deref().is_some_and(|c| !c.is_empty()));
    // Only the recording process counted: the child did not record.
    assert_eq!(stats.owners.len(), 1, "{mode}: {stats:?}");
}

#[test]
fn ofd_handle_figures() {
    handle_figures(Mode::Ofd);
}

#[test]
fn process_handle_figures() {
    handle_figures(Mode::Process);
}

#[test]
fn flock_handle_figures() {
    handle_figures(Mode::Flock);
}

#[test]
fn shm_handle_figures() {
    handle_figures(Mode::Shm);
}

/// A holds 0 and waits for 1; we hold 1 and ask for 0: the engines that
/// detect it refuse us, and it counts.
fn deadlock_counted(mode: Mode) {
    let _s = serial();
    let (_dir, path) = lock_path();
    let me = recording(&path, mode);
    let to_a = Pipe::new();
    let from_a = Pipe::new();
    let a = fork(|| {
        let lf = LockFile::options()
            .mode(mode)
            .stats(false)
            .open(&path)
            .unwrap();
        lf.acquire(Kind::Exclusive, 0, Wait::Blocking).unwrap();
        from_a.send(b'h');
        to_a.expect(b'1');
        lf.acquire(Kind::Exclusive, 1, Wait::Blocking).unwrap();
    });
    me.acquire(Kind::Exclusive, 1, Wait::Blocking).unwrap();
    from_a.expect(b'h');
    to_a.send(b'1');
    wait_for_waiter(&path, 1, None);
    let e = me.acquire(Kind::Exclusive, 0, Wait::Blocking).unwrap_err();
    assert!(matches!(e, Error::Deadlock { .. }), "{mode}: {e:?}");
    me.release_all().unwrap();
    a.join();
    let stats = me.stats().unwrap();
    let l0 = stats.locks.iter().find(|l| l.index == Some(0)).unwrap();
    assert_eq!(
        (l0.acquired, l0.contended, l0.deadlocks),
        (0, 1, 1),
        "{mode}: {l0:?}"
    );
    let l1 = stats.locks.iter().find(|l| l.index == Some(1)).unwrap();
    assert_eq!((l1.acquired, l1.deadlocks), (1, 0), "{mode}: {l1:?}");
    assert_eq!(l1.hold.count(), 1, "{mode}");
}

#[test]
fn process_mode_counts_deadlocks() {
    deadlock_counted(Mode::Process);
}

#[test]
fn shm_counts_deadlocks() {
    deadlock_counted(Mode::Shm);
}

/// Each index of a span counts; a span wider than `SPAN_INDICES` counts
/// once, under "other indices".
#[test]
fn spans_count_each_index() {
    let _s = serial();
    for mode in [Mode::Ofd, Mode::Shm] {
        let (_dir, path) = lock_path();
        let me = recording(&path, mode);
        drop(me.write(10..13).unwrap());
        drop(me.read(100..1000).unwrap());
        let stats = me.stats().unwrap();
        let got: Vec<(Option<u64>, u64, u64)> = stats
            .locks
            .iter()
            .map(|l| (l.index, l.acquired, l.hold.count()))
            .collect();
        assert_eq!(
            got,
            vec![
                (Some(10), 1, 1),
                (Some(11), 1, 1),
                (Some(12), 1, 1),
                (None, 1, 1)
            ],
            "{mode}"
        );
        assert_eq!(stats.owners[0].acquired, 2, "{mode}: each take once");
    }
}

/// A handle that does not record has no figures of its own; a table's
/// figures are there for any of its handles.
#[test]
fn figures_only_when_recorded() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let plain = LockFile::options()
        .mode(Mode::Ofd)
        .stats(false)
        .open(&path)
        .unwrap();
    drop(plain.write(1).unwrap());
    assert!(matches!(plain.stats(), Err(Error::Unsupported { .. })));

    let (_dir, path) = lock_path();
    let plain = LockFile::options()
        .mode(Mode::Shm)
        .stats(false)
        .open(&path)
        .unwrap();
    drop(plain.write(1).unwrap());
    let stats = plain.stats().unwrap();
    assert_eq!(stats.scope, Scope::Table);
    assert!(stats.locks.is_empty(), "{stats:?}");
    let me = recording(&path, Mode::Shm);
    drop(me.write(1).unwrap());
    assert_eq!(plain.stats().unwrap().locks[0].acquired, 1);
}

/// Two processes record into one table and exit; a third reads both
/// from outside while the table lives.
#[test]
fn table_figures_outlive_their_processes() {
    let _s = serial();
    let (_dir, path) = lock_path();
    // Keeps the table in use (and records nothing).
    let keeper = LockFile::options()
        .mode(Mode::Shm)
        .stats(false)
        .open(&path)
        .unwrap();
    let mut pids = Vec::new();
    for takes in [vec![5u64, 5], vec![5, 6]] {
        let child = fork(|| {
            let lf = recording(&path, Mode::Shm);
            for i in takes {
                drop(lf.write(i).unwrap());
            }
        });
        pids.push(child.pid);
        child.join();
    }
    let stats = locksfile::shm::read_stats(&path).unwrap().unwrap();
    assert_eq!(stats.scope, Scope::Table);
    let got: Vec<(Option<u64>, u64, u64)> = stats
        .locks
        .iter()
        .map(|l| (l.index, l.acquired, l.hold.count()))
        .collect();
    assert_eq!(got, vec![(Some(5), 3, 3), (Some(6), 1, 1)]);
    let mut owners: Vec<(u32, u64)> = stats.owners.iter().map(|o| (o.pid, o.acquired)).collect();
    owners.sort();
    let mut want = vec![(pids[0], 2), (pids[1], 2)];
    want.sort();
    assert_eq!(owners, want);
    assert_eq!(keeper.stats().unwrap(), stats);
    drop(keeper);
    // No one uses the table: nothing to read.
    assert_eq!(locksfile::shm::read_stats(&path).unwrap(), None);
}

/// The statistics region written over (keys and figures garbage, then
/// all ones) while a recording owner uses the table: taking, releasing
/// and reading go on without a panic, the figures wrong but bounded.
#[test]
fn a_written_over_region_never_panics() {
    use std::os::unix::fs::FileExt;
    let _s = serial();
    let (_dir, path) = lock_path();
    let lf = recording(&path, Mode::Shm);
    drop(lf.write(1).unwrap());
    let (_, at, len) = locksfile::shm::regions()
        .into_iter()
        .find(|r| r.0 == "stats")
        .expect("the stats region is listed");
    let mut sidecar = path.as_os_str().to_owned();
    sidecar.push("-shm");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(sidecar)
        .unwrap();
    let mut x = 0x5eed_1234_abcd_0001u64;
    let random: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect();
    for garbage in [random, vec![0xff; len as usize]] {
        f.write_all_at(&garbage, at).unwrap();
        for i in 0..2000u64 {
            drop(lf.write(i).unwrap());
        }
        let _ = lf.stats().unwrap();
        let _ = locksfile::shm::read_stats(&path).unwrap();
    }
}

/// A table in use by an older version (its header says 4, the layout
/// before the statistics region) is refused with a clear error, and
/// `locksfile::shm::read_stats` refuses it too, without a panic.
#[test]
fn an_older_table_in_use_is_refused() {
    use std::os::unix::fs::FileExt;
    let _s = serial();
    let (_dir, path) = lock_path();
    let user = LockFile::options().mode(Mode::Shm).open(&path).unwrap();
    let mut sidecar = path.as_os_str().to_owned();
    sidecar.push("-shm");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(sidecar)
        .unwrap();
    f.write_all_at(&4u32.to_ne_bytes(), 8).unwrap();
    let older = |e: Error| match e {
        Error::Sidecar {
            problem: locksfile::SidecarProblem::NewerVersion { found: 4 },
            ..
        } => e.to_string(),
        other => panic!("{other:?}"),
    };
    // Another process (this one has the table joined already, and its
    // next handles share it).
    let p = &path;
    fork(move || {
        let msg = older(LockFile::options().mode(Mode::Shm).open(p).unwrap_err());
        assert!(msg.contains("version 4"), "{msg}");
    })
    .join();
    older(locksfile::shm::read_stats(&path).unwrap_err());
    drop(user);
}
