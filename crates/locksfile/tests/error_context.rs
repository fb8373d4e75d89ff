//! Contention errors say where: the lock file, the span and the kind (and
//! the holder where known), each once.

mod common;

use std::thread;
use std::time::Duration;

use common::{lock_path, open, pid, serial};
use locksfile::{Error, Kind, Mode, Wait};

#[test]
fn a_timeout_names_the_file_and_the_span() {
    let _serial = serial();
    let (_dir, path) = lock_path();
    let a = open(&path, Mode::Ofd);
    let b = open(&path, Mode::Ofd);
    let _held = a.write(3..5).unwrap();
    let e = b.write_for(3..5, Duration::from_millis(20)).unwrap_err();
    assert!(matches!(e, Error::TimedOut { .. }), "{e:?}");
    let shown = path.display().to_string();
    assert_eq!(
        e.to_string(),
        format!("timed out waiting for an exclusive lock on 3..5 of {shown}")
    );
    let at = e.at().expect("where");
    assert_eq!(
        (at.kind, at.file.as_str()),
        (Kind::Exclusive, shown.as_str())
    );
}

#[test]
fn a_refusal_names_the_file_the_span_and_the_holder_once() {
    let _serial = serial();
    let (_dir, path) = lock_path();
    let a = open(&path, Mode::Shm);
    let b = open(&path, Mode::Shm);
    let _held = a.write(4).unwrap();
    let e = b
        .acquire(Kind::Shared, 3..6, Wait::NonBlocking)
        .unwrap_err();
    let msg = e.to_string();
    let shown = path.display().to_string();
    assert!(msg.contains("a shared lock on 3..6"), "{msg}");
    assert!(msg.contains(&format!("pid {}", pid())), "{msg}");
    assert_eq!(msg.matches(&shown).count(), 1, "{msg}");
}

#[test]
fn a_deadlock_names_the_file_and_the_span() {
    let _serial = serial();
    let (_dir, path) = lock_path();
    let a = open(&path, Mode::Shm);
    let b = open(&path, Mode::Shm);
    a.acquire(Kind::Shared, 7..9, Wait::NonBlocking).unwrap();
    b.acquire(Kind::Shared, 7..9, Wait::NonBlocking).unwrap();
    thread::scope(|s| {
        let upgrade = s.spawn(|| a.acquire(Kind::Exclusive, 7..9, Wait::Blocking));
        common::wait_for_waiters(&path, 1);
        let e = b
            .acquire(Kind::Exclusive, 7..9, Wait::Blocking)
            .unwrap_err();
        assert!(matches!(e, Error::Deadlock { .. }), "{e:?}");
        let msg = e.to_string();
        let shown = path.display().to_string();
        assert_eq!(
            msg,
            format!("waiting for an exclusive lock on 7..9 of {shown} would deadlock")
        );
        b.release_all().unwrap();
        upgrade.join().unwrap().unwrap();
    });
}
