//! The explicit API and guards, mixed, as other processes see them:
//! conversion in place, partial and full release, what `held` and
//! `conflicts` report, the holder carried by `WouldBlock`, and how errors
//! turn into `std::io::Error`.

mod common;

use std::io::ErrorKind;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use locksfile::{Error, Holder, Kind, LockFile, Mode, ReadGuard, SpanError, Wait, WriteGuard};

/// Converting a write lock to a read lock in place lets a reader in and
/// keeps a writer out: a third process already waiting for a write lock
/// does not slip in between (no unlock happens on the way).
fn convert_in_place(mode: Mode, use_guard: bool) {
    let _s = serial();
    let (_dir, path) = lock_path();
    let p = &path;
    let me = pid();
    let lf = Arc::new(open(p, mode));
    let mut guard = None;
    if use_guard {
        guard = Some(WriteGuard::acquire(lf.clone(), 0..4, Wait::NonBlocking).unwrap());
    } else {
        lf.acquire(Kind::Exclusive, 0..4, Wait::NonBlocking)
            .unwrap();
    }

    let writer_msg = Pipe::new();
    let writer = fork(|| {
        let w = open(p, mode);
        writer_msg.send(b'b');
        let g = w.write(1).unwrap();
        writer_msg.send(b'w');
        drop(g);
    });
    writer_msg.expect(b'b');
    wait_for_waiter(p, 1, pid_in(mode, writer.pid));

    let reader_msg = Pipe::new();
    let reader_go = Pipe::new();
    let reader = fork(|| {
        let r = open(p, mode);
        reader_msg.send(b'b');
        let g = r.read(2).unwrap();
        reader_msg.send(b'r');
        reader_go.expect(b'x');
        drop(g);
    });
    reader_msg.expect(b'b');
    wait_for_waiter(p, 2, pid_in(mode, reader.pid));

    // Convert.
    let _read_guard = match guard.take() {
        Some(g) => Some(WriteGuard::downgrade(g)),
        None => {
            lf.acquire(Kind::Shared, 0..4, Wait::NonBlocking).unwrap();
            None
        }
    };
    assert_eq!(lf.held(), vec![(span(0..4), Kind::Shared)]);
    reader_msg.expect(b'r');
    // The writer still waits: it was never let in.
    wait_for_waiter(p, 1, pid_in(mode, writer.pid));
    assert_eq!(writer_msg.try_recv(Duration::ZERO), None);
    let h = probe(p, Kind::Exclusive, 0..4).expect("read locks remain");
    assert_eq!(h.kind, Kind::Shared);
    if mode == Mode::Process {
        assert!(h.pid == Some(me) || h.pid == Some(reader.pid), "{h:?}");
    }

    // Both readers go: the writer gets in.
    drop(_read_guard);
    lf.release_all().unwrap();
    reader_go.send(b'x');
    reader.join();
    writer_msg.expect(b'w');
    writer.join();
    assert_eq!(probe(p, Kind::Exclusive, ..), None);
}

mode_tests! { explicit_conversion_in_place => |m| convert_in_place(m, false) }

mode_tests! { guard_downgrade_in_place => |m| convert_in_place(m, true) }

/// Upgrading a read guard waits for the other reader and keeps its read
/// lock meanwhile; `try_upgrade` gives the guard back while a reader is
/// in the way.
fn upgrade(mode: Mode) {
    let _s = serial();
    let (_dir, path) = lock_path();
    let p = &path;
    let me = pid();
    let lf = Arc::new(open(p, mode));
    let g = ReadGuard::acquire(lf.clone(), 5..8, Wait::NonBlocking).unwrap();

    let held = Pipe::new();
    let go = Pipe::new();
    let other = fork(|| {
        let o = open(p, mode);
        let g = o.try_read(6).unwrap();
        held.send(b'h');
        go.expect(b'x');
        drop(g);
    });
    held.expect(b'h');

    let g = match ReadGuard::try_upgrade(g) {
        Ok(_) => panic!("upgraded past another reader"),
        Err(g) => g,
    };
    assert_eq!(ReadGuard::span(&g), span(5..8));
    assert_eq!(lf.held(), vec![(span(5..8), Kind::Shared)]);
    let (g, e) = ReadGuard::upgrade_with(g, Wait::Timeout(Duration::from_millis(20))).unwrap_err();
    assert!(matches!(e, Error::TimedOut { .. }), "{e:?}");
    assert_eq!(lf.held(), vec![(span(5..8), Kind::Shared)]);

    let upgrader = std::thread::spawn(move || ReadGuard::upgrade(g).map_err(|(_, e)| e));
    wait_for_waiter(p, 5, pid_in(mode, me));
    // Meanwhile our read lock is still there.
    assert_eq!(
        probe(p, Kind::Exclusive, 5),
        Some(holder(mode, 5..8, Kind::Shared, me))
    );
    go.send(b'x');
    other.join();
    let w = upgrader.join().unwrap().expect("upgraded");
    assert_eq!(WriteGuard::span(&w), span(5..8));
    assert_eq!(
        probe(p, Kind::Shared, 0..10),
        Some(holder(mode, 5..8, Kind::Exclusive, me))
    );
    let r = WriteGuard::downgrade(w);
    assert_eq!(
        probe(p, Kind::Exclusive, 0..10),
        Some(holder(mode, 5..8, Kind::Shared, me))
    );
    ReadGuard::unlock(r).unwrap();
    assert_eq!(probe(p, Kind::Exclusive, ..), None);
}

mode_tests! { upgrade_waits_for_readers => upgrade }

/// Release of a sub-range, `release_all` leaving guards alone, and what
/// `held` / `held_explicitly` report, checked against another process.
fn release_parts(mode: Mode) {
    let _s = serial();
    let (_dir, path) = lock_path();
    let me = pid();
    let lf = open(&path, mode);
    lf.acquire(Kind::Exclusive, 0..10, Wait::NonBlocking)
        .unwrap();
    lf.release(3..5).unwrap();
    assert_eq!(
        lf.held(),
        vec![
            (span(0..3), Kind::Exclusive),
            (span(5..10), Kind::Exclusive)
        ]
    );
    assert_eq!(probe(&path, Kind::Exclusive, 3..5), None);
    assert_eq!(
        probe(&path, Kind::Shared, 2),
        Some(holder(mode, 0..3, Kind::Exclusive, me))
    );
    assert_eq!(
        probe(&path, Kind::Shared, 5..),
        Some(holder(mode, 5..10, Kind::Exclusive, me))
    );
    // Releasing what is not held is harmless.
    lf.release(3..5).unwrap();
    lf.release(1000..).unwrap();

    let g = lf.read(20..22).unwrap();
    let w = lf.write(8..12).unwrap();
    lf.acquire(Kind::Shared, 30, Wait::NonBlocking).unwrap();
    assert_eq!(
        lf.held_explicitly(),
        vec![
            (span(0..3), Kind::Exclusive),
            (span(5..10), Kind::Exclusive),
            (span(30), Kind::Shared)
        ]
    );
    lf.release_all().unwrap();
    assert!(lf.held_explicitly().is_empty());
    // The guards stay, and so do their locks.
    assert_eq!(
        lf.held(),
        vec![(span(8..12), Kind::Exclusive), (span(20..22), Kind::Shared)]
    );
    assert_eq!(probe(&path, Kind::Exclusive, 0..8), None);
    assert_eq!(
        probe(&path, Kind::Shared, 0..20),
        Some(holder(mode, 8..12, Kind::Exclusive, me))
    );
    assert_eq!(
        probe(&path, Kind::Exclusive, 13..),
        Some(holder(mode, 20..22, Kind::Shared, me))
    );
    assert_eq!(probe(&path, Kind::Exclusive, 30), None);
    WriteGuard::unlock(w).unwrap();
    drop(g);
    assert!(lf.held().is_empty());
    assert_eq!(probe(&path, Kind::Exclusive, ..), None);
}

mode_tests! { release_parts_and_all => release_parts }

/// Guards and explicit locks compose at the strongest kind; dropping a
/// guard only lowers to what the rest still needs.
fn guards_and_explicit_compose(mode: Mode) {
    let _s = serial();
    let (_dir, path) = lock_path();
    let me = pid();
    let lf = open(&path, mode);

    lf.acquire(Kind::Shared, 0..4, Wait::NonBlocking).unwrap();
    let w = lf.write(2).unwrap();
    assert_eq!(
        lf.held(),
        vec![
            (span(0..2), Kind::Shared),
            (span(2), Kind::Exclusive),
            (span(3), Kind::Shared)
        ]
    );
    assert_eq!(
        probe(&path, Kind::Shared, 0..4),
        Some(holder(mode, 2, Kind::Exclusive, me))
    );
    drop(w);
    // Back to the explicit read lock, not unlocked.
    assert_eq!(lf.held(), vec![(span(0..4), Kind::Shared)]);
    assert_eq!(
        probe(&path, Kind::Exclusive, 2),
        Some(holder(mode, 0..4, Kind::Shared, me))
    );
    assert_eq!(probe(&path, Kind::Shared, 0..4), None);

    // An explicit write over a read guard, then released: the guard's read
    // lock stays.
    let r = lf.read(10..12).unwrap();
    lf.acquire(Kind::Exclusive, 9..13, Wait::NonBlocking)
        .unwrap();
    let r2 = lf.read(11).unwrap();
    assert_eq!(
        probe(&path, Kind::Shared, 9..13),
        Some(holder(mode, 9..13, Kind::Exclusive, me))
    );
    lf.release(9..13).unwrap();
    assert_eq!(
        lf.held(),
        vec![(span(0..4), Kind::Shared), (span(10..12), Kind::Shared)]
    );
    assert_eq!(probe(&path, Kind::Shared, 9..13), None);
    assert_eq!(
        probe(&path, Kind::Exclusive, 9..13),
        Some(holder(mode, 10..12, Kind::Shared, me))
    );
    drop(r);
    // r2 still covers 11.
    assert_eq!(
        probe(&path, Kind::Exclusive, 9..13),
        Some(holder(mode, 11, Kind::Shared, me))
    );
    drop(r2);

    // Two write guards on overlapping spans of one handle.
    let a = lf.write(20..25).unwrap();
    let b = lf.try_write(23..30).unwrap();
    drop(a);
    assert_eq!(
        probe(&path, Kind::Shared, 20..30),
        Some(holder(mode, 23..30, Kind::Exclusive, me))
    );
    drop(b);
    assert_eq!(lf.held(), vec![(span(0..4), Kind::Shared)]);

    // Last explicit call wins, downwards too.
    lf.acquire(Kind::Exclusive, 0..4, Wait::NonBlocking)
        .unwrap();
    lf.acquire(Kind::Shared, 1..3, Wait::NonBlocking).unwrap();
    assert_eq!(
        lf.held(),
        vec![
            (span(0), Kind::Exclusive),
            (span(1..3), Kind::Shared),
            (span(3), Kind::Exclusive)
        ]
    );
    assert_eq!(
        probe(&path, Kind::Exclusive, 1..3),
        Some(holder(mode, 1..3, Kind::Shared, me))
    );
    drop(lf);
    assert_eq!(probe(&path, Kind::Exclusive, ..), None);
}

mode_tests! { guards_and_explicit_compose => guards_and_explicit_compose }

/// Asking again for what is held at the same kind changes nothing, as the
/// kernel and the bookkeeping both see it.
#[test]
fn acquiring_what_is_held_changes_nothing() {
    let _s = serial();
    let (_dir, path) = lock_path();
    for mode in MODES {
        let lf = open(&path, mode);
        lf.acquire(Kind::Exclusive, 0..4, Wait::NonBlocking)
            .unwrap();
        let kernel = fd_locks(&lf);
        assert_eq!(kernel.len(), 1, "{kernel:?}");
        assert!(
            kernel[0].contains("WRITE") && kernel[0].ends_with(" 0 3"),
            "{kernel:?}"
        );
        let held = lf.held();
        lf.acquire(Kind::Exclusive, 0..4, Wait::NonBlocking)
            .unwrap();
        lf.acquire(Kind::Exclusive, 1..3, Wait::Blocking).unwrap();
        let g = lf.try_write(2).unwrap();
        let r = lf.try_read(0..4).unwrap();
        assert_eq!(fd_locks(&lf), kernel);
        assert_eq!(lf.held(), held);
        drop(g);
        drop(r);
        assert_eq!(fd_locks(&lf), kernel);
        assert_eq!(lf.held(), held);
        assert_eq!(lf.held_explicitly(), vec![(span(0..4), Kind::Exclusive)]);
        assert_eq!(
            probe(&path, Kind::Shared, ..),
            Some(holder(mode, 0..4, Kind::Exclusive, pid()))
        );
    }
}

/// `conflicts` and `WouldBlock` name the lock in the way: its span, its
/// kind, and in process mode the holding process.
fn holders_named(mode: Mode) {
    let _s = serial();
    let (_dir, path) = lock_path();
    let p = &path;
    let held = Pipe::new();
    let go = Pipe::new();
    let child = fork(|| {
        let lf = open(p, mode);
        lf.acquire(Kind::Shared, 0..5, Wait::NonBlocking).unwrap();
        lf.acquire(Kind::Exclusive, 7, Wait::NonBlocking).unwrap();
        held.send(b'h');
        go.expect(b'x');
    });
    held.expect(b'h');
    let c = child.pid;
    let lf = open(p, mode);
    let h = |s: locksfile::Span, kind| Some(holder(mode, s, kind, c));
    assert_eq!(
        lf.conflicts(Kind::Exclusive, 0..10).unwrap(),
        h(span(0..5), Kind::Shared)
    );
    assert_eq!(
        lf.conflicts(Kind::Shared, 0..10).unwrap(),
        h(span(7), Kind::Exclusive)
    );
    assert_eq!(lf.conflicts(Kind::Shared, 0..5).unwrap(), None);
    assert_eq!(lf.conflicts(Kind::Exclusive, 5..7).unwrap(), None);
    assert_eq!(lf.conflicts(Kind::Exclusive, 8..).unwrap(), None);
    assert_eq!(
        lf.conflicts(Kind::Shared, ..).unwrap(),
        h(span(7), Kind::Exclusive)
    );

    let would_block = |r: Result<(), Error>| match r {
        Err(Error::WouldBlock { holder, .. }) => holder,
        other => panic!("expected WouldBlock, got {other:?}"),
    };
    assert_eq!(
        would_block(lf.try_write(3).map(drop)),
        h(span(0..5), Kind::Shared)
    );
    assert_eq!(
        would_block(lf.try_read(6..9).map(drop)),
        h(span(7), Kind::Exclusive)
    );
    assert_eq!(
        would_block(lf.acquire(Kind::Exclusive, 4..8, Wait::NonBlocking)),
        h(span(0..5), Kind::Shared)
    );
    let g = lf.try_read(0..5).unwrap();
    // Our own locks are never reported as conflicts.
    lf.acquire(Kind::Exclusive, 20..30, Wait::NonBlocking)
        .unwrap();
    assert_eq!(lf.conflicts(Kind::Exclusive, 20..30).unwrap(), None);
    assert_eq!(
        lf.conflicts(Kind::Exclusive, 0..6).unwrap(),
        h(span(0..5), Kind::Shared)
    );
    drop(g);

    // The message names the holder too.
    let e = lf.try_write(7).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("exclusive") && msg.contains('7'), "{msg}");
    if mode == Mode::Process {
        assert!(msg.contains(&c.to_string()), "{msg}");
    }
    go.send(b'x');
    child.join();
    assert_eq!(lf.conflicts(Kind::Exclusive, ..).unwrap(), None);
    assert!(lf.try_write(..).is_ok());
}

mode_tests! { holders_named => holders_named }

fn io_kind(e: Error) -> (ErrorKind, String) {
    let msg = e.to_string();
    let io: std::io::Error = e.into();
    // The original error is kept inside.
    let inner = io
        .get_ref()
        .and_then(|i| i.downcast_ref::<Error>())
        .expect("locksfile::Error inside");
    assert_eq!(inner.to_string(), msg);
    (io.kind(), msg)
}

/// Every error becomes an `std::io::Error` of a fitting kind.
#[test]
fn errors_convert_to_io_errors() {
    let _s = serial();
    let (dir, path) = lock_path();
    let a = open(&path, Mode::Ofd);
    let b = open(&path, Mode::Ofd);
    let _g = a.write(0).unwrap();

    let e = b.try_write(0).unwrap_err();
    assert!(e.is_contention());
    assert_eq!(io_kind(e).0, ErrorKind::WouldBlock);

    let e = b.write_for(0, Duration::from_millis(1)).unwrap_err();
    assert!(matches!(e, Error::TimedOut { .. }));
    assert!(e.is_contention());
    assert_eq!(io_kind(e).0, ErrorKind::TimedOut);

    #[allow(clippy::reversed_empty_ranges)]
    let e = b.try_write(3..1).unwrap_err();
    assert!(!e.is_contention());
    assert_eq!(io_kind(e).0, ErrorKind::InvalidInput);

    let e = LockFile::open(dir.path()).unwrap_err();
    assert_eq!(io_kind(e).0, ErrorKind::IsADirectory);

    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&path, &link).unwrap();
    let e = LockFile::open(&link).unwrap_err();
    let (kind, msg) = io_kind(e);
    assert_eq!(kind, ErrorKind::InvalidInput);
    assert!(msg.contains("symbolic link"), "{msg}");

    let e = LockFile::options()
        .create(false)
        .open(dir.path().join("missing"))
        .unwrap_err();
    let (kind, msg) = io_kind(e);
    assert_eq!(kind, ErrorKind::NotFound);
    assert!(msg.contains("missing"), "{msg}");

    assert_eq!(Wait::from_blocking(true), Wait::Blocking);
    assert_eq!(Wait::from_blocking(false), Wait::NonBlocking);

    // Holder's own formatting.
    let h = Holder {
        span: span(3..5),
        kind: Kind::Shared,
        pid: Some(42),
        server: None,
    };
    assert!(h.to_string().contains("42"));
}

/// The handle reports what it was opened with.
#[test]
fn handle_reports_mode_path_and_writability() {
    let _s = serial();
    let (_dir, path) = lock_path();
    for mode in MODES {
        let lf = open(&path, mode);
        assert_eq!(lf.mode(), mode);
        assert_eq!(lf.path(), path.as_path());
        assert!(lf.path().is_absolute());
        assert!(lf.is_writable());
        assert!(format!("{lf:?}").contains(&format!("{mode:?}")));
    }
    assert_eq!(Mode::default(), Mode::Ofd);
    assert_eq!(LockFile::open(&path).unwrap().mode(), Mode::Ofd);
}

/// Indices of any integer type name the same spans; negative ones are
/// refused before anything is locked; unsuffixed literals work.
#[test]
fn indices_of_any_integer_type() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let lf = open(&path, Mode::Ofd);
    let i: usize = 3;
    assert_eq!(lf.write(i).unwrap().span(), span(3u64));
    assert_eq!(lf.write(2u8..5u8).unwrap().span(), span(2u64..5));
    assert_eq!(lf.write(2u32..=4u32).unwrap().span(), span(2u64..5));
    assert_eq!(lf.write(7usize..).unwrap().span(), span(7u64..));
    assert_eq!(lf.write(..3u16).unwrap().span(), span(0u64..3));
    assert_eq!(lf.write(..=3i64).unwrap().span(), span(0u64..4));
    assert_eq!(lf.write(10..20).unwrap().span(), span(10u64..20));
    lf.acquire(Kind::Shared, (4usize, 2usize), Wait::NonBlocking)
        .unwrap();
    assert_eq!(lf.held(), vec![(span(4u64..6), Kind::Shared)]);
    for r in [
        lf.try_write(-1).map(drop),
        lf.try_write(-3..2).map(drop),
        lf.acquire(Kind::Shared, (-1, 2), Wait::NonBlocking),
    ] {
        assert!(
            matches!(r, Err(Error::InvalidSpan(SpanError::Negative))),
            "{r:?}"
        );
    }
    assert!(matches!(
        lf.try_write(u128::MAX),
        Err(Error::InvalidSpan(SpanError::Overflow))
    ));
    assert_eq!(lf.held(), vec![(span(4u64..6), Kind::Shared)]);
}

/// Guard operations read as methods too (`g.span()`, `g.upgrade()`), not
/// only as associated functions.
#[test]
fn guard_operations_are_methods() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let lf = open(&path, Mode::Ofd);
    let r = lf.read(1..3).unwrap();
    assert_eq!(r.span(), span(1u64..3));
    let w = r.try_upgrade().map_err(|_| "refused").unwrap();
    assert_eq!(fd_locks(&lf).len(), 1);
    assert!(fd_locks(&lf)[0].contains("WRITE"), "{:?}", fd_locks(&lf));
    let r = w.downgrade();
    assert!(fd_locks(&lf)[0].contains("READ"), "{:?}", fd_locks(&lf));
    let w = r.upgrade().map_err(|(_, e)| e).unwrap();
    w.unlock().unwrap();
    assert_eq!(fd_locks(&lf), Vec::<String>::new());
}
