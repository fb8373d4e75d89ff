//! The shape of the API: telling "would block" apart without matching
//! fields (`Error::kind`, `is_would_block`, the `io::Error` kind), and
//! guards that own their handle (`write_owned` and friends), which can sit
//! in a struct beside the `Arc<LockFile>` and move to another thread.

use std::sync::Arc;
use std::time::{Duration, Instant};

use locksfile::{
    Error, ErrorKind, IntoSpan, Kind, LockFile, OwnedWriteGuard, ReadGuard, SpanError, Wait,
};

fn pair() -> (tempfile::TempDir, LockFile, LockFile) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shape.lock");
    let a = LockFile::open(&path).unwrap();
    let b = LockFile::open(&path).unwrap();
    (dir, a, b)
}

#[test]
fn would_block_is_one_comparison() {
    let (_dir, a, b) = pair();
    let _g = a.write(0..4).unwrap();

    let e = b.try_write(2).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WouldBlock);
    assert!(e.is_would_block());
    // The struct form still carries the holder and where.
    assert!(
        matches!(&e, Error::WouldBlock { holder: Some(h), at: Some(_) } if h.kind == Kind::Exclusive)
    );
    assert_eq!(
        std::io::Error::from(e).kind(),
        std::io::ErrorKind::WouldBlock
    );

    let e = b.acquire(Kind::Shared, 3, Wait::NonBlocking).unwrap_err();
    assert!(e.is_would_block());

    let e = b.write_for(1, Duration::from_millis(20)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut);
    assert!(!e.is_would_block());
    assert_eq!(std::io::Error::from(e).kind(), std::io::ErrorKind::TimedOut);

    let e = b.try_write(5..5).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidSpan);
    assert!(matches!(e, Error::InvalidSpan(SpanError::Empty)));

    // Free indices are granted.
    assert!(b.try_write(4).is_ok());
}

/// Each variant maps to the kind of the same name.
#[test]
fn every_kind_names_its_variant() {
    let cases = [
        (
            Error::WouldBlock {
                holder: None,
                at: None,
            },
            ErrorKind::WouldBlock,
        ),
        (Error::Deadlock { at: None }, ErrorKind::Deadlock),
        (Error::TimedOut { at: None }, ErrorKind::TimedOut),
        (Error::Interrupted, ErrorKind::Interrupted),
        (Error::Cancelled, ErrorKind::Cancelled),
        (Error::Forked, ErrorKind::Forked),
        (Error::NotHeld { index: 3 }, ErrorKind::NotHeld),
        (
            Error::ConversionLost { held: Kind::Shared },
            ErrorKind::ConversionLost,
        ),
    ];
    for (e, k) in cases {
        assert_eq!(e.kind(), k, "{e:?}");
        assert_eq!(
            format!("{:?}", e.kind()),
            format!("{e:?}").split([' ', '{', '(']).next().unwrap()
        );
    }
}

/// A struct holding the handle and a guard of it side by side.
struct Row {
    lock: Arc<LockFile>,
    guard: OwnedWriteGuard,
}

#[test]
fn owned_guard_lives_beside_its_handle_and_moves_to_another_thread() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("owned.lock");
    let lock = Arc::new(LockFile::open(&path).unwrap());
    let guard = lock.write_owned(3..6).unwrap();
    let row = Row { lock, guard };

    let other = LockFile::open(&path).unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let t = std::thread::spawn(move || {
        assert_eq!(row.guard.span(), (3..6).into_span().unwrap());
        assert_eq!(row.lock.held().len(), 1);
        rx.recv().unwrap();
        drop(row);
    });
    // Held while the other thread has it.
    assert_eq!(
        other.try_write(4).unwrap_err().kind(),
        ErrorKind::WouldBlock
    );
    assert_eq!(other.try_read(5).unwrap_err().kind(), ErrorKind::WouldBlock);
    assert!(other.try_write(6).is_ok());
    tx.send(()).unwrap();
    t.join().unwrap();
    // Released on drop.
    drop(other.try_write(3..6).unwrap());
}

#[test]
fn owned_forms_mirror_the_borrowed_ones() {
    let (_dir, a, b) = pair();
    let a = Arc::new(a);
    let b = Arc::new(b);
    let short = Duration::from_millis(20);

    let r = a.read_owned(0..2).unwrap();
    let r2 = b.try_read_owned(0..2).unwrap();
    assert_eq!(
        b.try_write_owned(0).unwrap_err().kind(),
        ErrorKind::WouldBlock
    );
    assert_eq!(
        b.write_for_owned(0, short).unwrap_err().kind(),
        ErrorKind::TimedOut
    );
    assert_eq!(
        b.write_until_owned(1, Instant::now() + short)
            .unwrap_err()
            .kind(),
        ErrorKind::TimedOut
    );
    drop((r, r2));

    let w = a.try_write_owned(0..2).unwrap();
    assert_eq!(
        b.try_read_owned(1).unwrap_err().kind(),
        ErrorKind::WouldBlock
    );
    assert_eq!(
        b.read_for_owned(1, short).unwrap_err().kind(),
        ErrorKind::TimedOut
    );
    assert_eq!(
        b.read_until_owned(0, Instant::now() + short)
            .unwrap_err()
            .kind(),
        ErrorKind::TimedOut
    );
    // The guard keeps the handle alive: the caller's Arc can go first.
    drop(a);
    let r = w.downgrade();
    let got = b.read_for_owned(0..2, Duration::from_secs(5)).unwrap();
    drop(r);
    let w = ReadGuard::try_upgrade(got).expect("no one else reads");
    assert_eq!(w.span(), (0..2).into_span().unwrap());
    drop(w);
    drop(b.write_owned(0..2).unwrap());
}
