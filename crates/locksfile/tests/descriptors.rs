//! Descriptors kept open for process-mode owners stay few, and keeping them
//! few never drops a process-mode lock.
//!
//! Closing any descriptor of a file drops every process-associated lock the
//! process holds on it, so while a process-mode handle of a file is open,
//! descriptors of other handles of that file are parked instead of closed.
//! These tests open and close handles by the thousand around such a lock
//! and count the process's descriptors in `/proc/self/fd`.

mod common;

use std::fs;
use std::sync::mpsc;

use common::*;
use locksfile::{Error, Kind, Mode, Wait};

const CYCLES: usize = 5_000;

fn open_fds() -> usize {
    fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .count()
}

#[test]
fn descriptors_stay_bounded_while_a_process_mode_lock_is_held() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let a = open(&path, Mode::Process);
    let before = open_fds();
    let g = a.write(0..4).unwrap();

    for i in 0..CYCLES {
        // An OFD handle that locks and unlocks through its descriptor.
        let b = open(&path, Mode::Ofd);
        b.acquire(Kind::Exclusive, 10, Wait::NonBlocking).unwrap();
        if i % 1000 == 0 {
            // A second OFD handle open at the same time has an open file
            // description of its own: the two exclude each other.
            let c = open(&path, Mode::Ofd);
            assert!(matches!(c.try_write(10), Err(Error::WouldBlock { .. })));
            c.acquire(Kind::Exclusive, 11, Wait::NonBlocking).unwrap();
            assert!(matches!(b.try_write(11), Err(Error::WouldBlock { .. })));
        }
        drop(b);
        // A process-mode handle of the same owner.
        let p = open(&path, Mode::Process);
        p.acquire(Kind::Shared, 20, Wait::NonBlocking).unwrap();
        drop(p);
    }
    let during = open_fds();
    assert!(
        during <= before + 2,
        "{CYCLES} open/close cycles left {} more descriptors open",
        during - before
    );
    // The lock was never dropped by a close, as another process sees it.
    assert_eq!(
        probe(&path, Kind::Shared, 0..30),
        Some(holder(Mode::Process, 0..4, Kind::Exclusive, pid()))
    );
    // The OFD and process-mode locks of the cycles went with their handles.
    assert_eq!(probe(&path, Kind::Exclusive, 4..30), None);
    assert_eq!(a.held(), vec![(span(0..4), Kind::Exclusive)]);

    // Once the owner holds nothing, parked descriptors are closed the next
    // time a handle of the file comes or goes.
    drop(g);
    drop(open(&path, Mode::Ofd));
    assert_eq!(open_fds(), before);
    drop(a);
    assert_eq!(open_fds(), before - 1);
}

/// A process-mode owner that could only open the file read-only takes a
/// writable descriptor an OFD handle leaves behind, and read-only files
/// keep their descriptors bounded too.
#[test]
fn read_only_files_stay_bounded_too() {
    let _s = serial();
    let (dir, path) = lock_path();
    fs::write(&path, b"").unwrap();
    let p = &path;
    // As root, permission bits are ignored: become nobody in a child.
    fork(|| {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(p, fs::Permissions::from_mode(0o444)).unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        // SAFETY: plain syscalls; the child is single-threaded.
        unsafe {
            if libc::geteuid() == 0 {
                assert_eq!(libc::setgid(65534), 0, "setgid");
                assert_eq!(libc::setuid(65534), 0, "setuid");
            }
        }
        let a = open(p, Mode::Process);
        assert!(!a.is_writable());
        let before = open_fds();
        let _g = a.read(0..4).unwrap();
        for _ in 0..1000 {
            let b = open(p, Mode::Ofd);
            assert!(!b.is_writable());
            b.acquire(Kind::Shared, 10, Wait::NonBlocking).unwrap();
            drop(b);
            drop(open(p, Mode::Process));
        }
        let during = open_fds();
        assert!(during <= before + 2, "{} more descriptors", during - before);
        assert_eq!(a.held(), vec![(span(0..4), Kind::Shared)]);
    })
    .join();
}

/// A thread of a process-mode owner asleep on a multi-piece span already
/// holds the pieces it got before the one it waits for, though the
/// bookkeeping shows them only once it wakes. Handles opened and closed
/// meanwhile must not close a descriptor then, even when the bookkeeping
/// says the owner holds nothing: that would drop those pieces.
#[test]
fn a_sleepers_partial_raises_survive_handles_coming_and_going() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let a = open(&path, Mode::Process);
    let p = &path;
    let other = hold_elsewhere(p, Mode::Process, Kind::Exclusive, 5);
    // Shared on 2 splits the sleeper's 0..6 into pieces: 0..2, 2..3 (an
    // upgrade) and 3..6, the one that has to wait.
    a.acquire(Kind::Shared, 2, Wait::NonBlocking).unwrap();
    let b = open(p, Mode::Process);
    std::thread::scope(|s| {
        let (tx, rx) = mpsc::channel();
        let b = &b;
        s.spawn(move || {
            tx.send(b.acquire(Kind::Exclusive, 0..6, Wait::Blocking))
                .unwrap();
        });
        wait_for_waiter(p, 3, Some(pid()));
        // Now the bookkeeping holds nothing; the kernel holds 0..3 for the
        // sleeper.
        a.release(2).unwrap();
        for _ in 0..50 {
            let c = open(p, Mode::Ofd);
            c.acquire(Kind::Shared, 20, Wait::NonBlocking).unwrap();
            drop(c);
            drop(open(p, Mode::Process));
        }
        assert_eq!(
            probe(p, Kind::Shared, 0..3),
            Some(holder(Mode::Process, 0..3, Kind::Exclusive, pid())),
            "the sleeper's first pieces were dropped while it slept"
        );
        assert!(rx.try_recv().is_err(), "the sleeper must still wait");
        other.release();
        rx.recv_timeout(STUCK).expect("the sleeper woke").unwrap();
    });
    assert_eq!(
        probe(p, Kind::Shared, 0..10),
        Some(holder(Mode::Process, 0..6, Kind::Exclusive, pid()))
    );
    assert_eq!(a.held(), vec![(span(0..6), Kind::Exclusive)]);
}

/// A process-mode owner that could only open its file read-only takes
/// exclusive locks once the file can be opened for writing, whether a new
/// process-mode handle opens it or an OFD handle left a writable descriptor
/// behind; no descriptor piles up on the way.
#[test]
fn a_read_only_owner_becomes_writable_with_its_file() {
    let _s = serial();
    let (dir, path) = lock_path();
    let p = &path;
    fork(|| {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        // SAFETY: plain syscalls; the child is single-threaded.
        unsafe {
            if libc::geteuid() == 0 {
                assert_eq!(libc::setgid(65534), 0, "setgid");
                assert_eq!(libc::setuid(65534), 0, "setuid");
            }
        }
        // Our own file, which we may chmod: read-only for now.
        fs::write(p, b"").unwrap();
        fs::set_permissions(p, fs::Permissions::from_mode(0o444)).unwrap();
        let a = open(p, Mode::Process);
        assert!(!a.is_writable());
        let _g = a.read(0).unwrap();
        let before = open_fds();
        for _ in 0..100 {
            drop(open(p, Mode::Process));
            drop(open(p, Mode::Ofd));
        }
        assert!(!a.is_writable());
        fs::set_permissions(p, fs::Permissions::from_mode(0o644)).unwrap();
        // An OFD handle opens it for writing and leaves that descriptor
        // parked; the next process-mode handle hands it to the owner.
        let b = open(p, Mode::Ofd);
        assert!(b.is_writable());
        drop(b);
        drop(open(p, Mode::Process));
        assert!(a.is_writable());
        a.acquire(Kind::Exclusive, 1, Wait::NonBlocking).unwrap();
        // `as_fd` is the descriptor locks go through now: the kernel lists
        // the exclusive lock just taken under it.
        assert!(
            kernel_held(&a).contains(&(span(1..2), Kind::Exclusive)),
            "{:?}",
            kernel_held(&a)
        );
        for _ in 0..100 {
            drop(open(p, Mode::Process));
            let c = open(p, Mode::Ofd);
            assert!(c.is_writable());
            drop(c);
        }
        let after = open_fds();
        assert!(after <= before + 3, "{} more descriptors", after - before);
        assert_eq!(
            a.held(),
            vec![(span(0..1), Kind::Shared), (span(1..2), Kind::Exclusive)]
        );
    })
    .join();
    // The file's bytes are untouched (and its mode is the test's own).
    assert_eq!(fs::read(&path).unwrap(), b"");
}

/// `O_ACCMODE` of the descriptor a handle locks through, from
/// `/proc/self/fdinfo`.
fn access_mode(lf: &locksfile::LockFile) -> u32 {
    use std::os::fd::{AsFd, AsRawFd};
    let info = fs::read_to_string(format!("/proc/self/fdinfo/{}", lf.as_fd().as_raw_fd())).unwrap();
    let flags = info
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .expect("a flags line");
    u32::from_str_radix(flags.trim(), 8).unwrap() & 0o3
}

#[test]
fn write_false_opens_read_only_and_takes_shared_locks() {
    let _s = serial();
    for mode in [Mode::Ofd, Mode::Process] {
        let (_dir, path) = lock_path();
        let lf = locksfile::LockFile::options()
            .mode(mode)
            .write(false)
            .open(&path)
            .unwrap();
        assert!(path.exists(), "{mode}: created");
        assert_eq!(access_mode(&lf), 0, "{mode}: O_RDONLY");
        assert!(!lf.is_writable());
        let _g = lf.read(0..4).unwrap();
        assert!(matches!(lf.try_write(5), Err(Error::ReadOnly { .. })));
        // Opening it again for writing still can.
        let w = open(&path, Mode::Ofd);
        assert_eq!(access_mode(&w), 2, "{mode}: O_RDWR");
        assert!(w.try_write(5).is_ok());
    }
}

#[test]
fn open_fd_locks_through_the_callers_open_file_description() {
    let _s = serial();
    let (dir, path) = lock_path();
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .unwrap();
    let lf = locksfile::LockFile::options()
        .open_fd(file.try_clone().unwrap().into())
        .unwrap();
    assert!(lf.is_writable());
    lf.acquire(Kind::Exclusive, 0..2, Wait::NonBlocking)
        .unwrap();
    // Another open file description conflicts; one more duplicate of
    // `file` is the same owner to the kernel.
    let other = open(&path, Mode::Ofd);
    assert!(other.try_read(1).is_err());
    let same = locksfile::LockFile::options()
        .open_fd(file.try_clone().unwrap().into())
        .unwrap();
    assert_eq!(same.conflicts(Kind::Exclusive, 0..2).unwrap(), None);
    drop(same);
    assert!(
        other.try_read(1).is_err(),
        "a handle that took nothing drops nothing"
    );
    drop(lf);
    assert!(other.try_read(1).is_ok(), "the handle unlocks what it took");

    // Read-only descriptors take shared locks only; write(false) makes a
    // writable one so too; other files are refused.
    let ro = locksfile::LockFile::options()
        .open_fd(fs::File::open(&path).unwrap().into())
        .unwrap();
    assert!(!ro.is_writable());
    assert!(matches!(ro.try_write(3), Err(Error::ReadOnly { .. })));
    let shared_only = locksfile::LockFile::options()
        .write(false)
        .open_fd(file.try_clone().unwrap().into())
        .unwrap();
    assert!(!shared_only.is_writable());
    let refused =
        locksfile::LockFile::options().open_fd(fs::File::open(dir.path()).unwrap().into());
    assert!(matches!(refused, Err(Error::NotRegularFile { .. })));
}
