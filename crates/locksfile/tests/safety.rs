//! Bad input and the promises about the files we touch: symlinks, things
//! that are not regular files, read-only files, permission bits, file
//! content, close-on-exec descriptors, and spans that never reach the kernel.

mod common;

use std::fs;
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use locksfile::{Error, Kind, LockFile, Mode, NotRegular, ReadGuard, SpanError, Wait, INDEX_END};

fn not_regular(r: Result<LockFile, Error>, want: NotRegular, path: &Path) {
    match r {
        Err(Error::NotRegularFile { path: p, found }) => {
            assert_eq!(found, want, "{}", p.display());
            assert_eq!(p, std::path::absolute(path).unwrap());
        }
        other => panic!(
            "{}: expected NotRegularFile({want:?}), got {other:?}",
            path.display()
        ),
    }
}

/// Open in a thread and give up after a bound, so a hanging open fails the
/// test instead of hanging it.
fn open_bounded(path: &Path, mode: Mode, follow: bool) -> Result<LockFile, Error> {
    let (tx, rx) = mpsc::channel();
    let p = path.to_path_buf();
    std::thread::spawn(move || {
        let r = LockFile::options()
            .mode(mode)
            .follow_symlinks(follow)
            .open(&p);
        let _ = tx.send(r);
    });
    rx.recv_timeout(Duration::from_secs(5))
        .unwrap_or_else(|_| panic!("opening {} hung", path.display()))
}

#[test]
fn symlink_refused_unless_followed() {
    let _s = serial();
    let (dir, target) = lock_path();
    fs::write(&target, b"").unwrap();
    let link = dir.path().join("link.lock");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    for mode in MODES {
        let e = open_bounded(&link, mode, false);
        if let Err(Error::NotRegularFile { .. }) = &e {
        } else {
            panic!("{e:?}");
        }
        let io: std::io::Error = e.unwrap_err().into();
        assert_eq!(io.kind(), ErrorKind::InvalidInput);
        not_regular(open_bounded(&link, mode, false), NotRegular::Symlink, &link);

        // Opted in: the lock lands on the target.
        let lf = open_bounded(&link, mode, true).unwrap();
        assert_eq!(lf.path(), link.as_path());
        lf.acquire(Kind::Exclusive, 3, Wait::NonBlocking).unwrap();
        assert_eq!(
            probe(&target, Kind::Shared, 3),
            Some(holder(mode, 3, Kind::Exclusive, pid()))
        );
        drop(lf);
        assert_eq!(probe(&target, Kind::Shared, 3), None);
    }
    assert!(fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn dangling_symlink_refused_and_nothing_created() {
    let _s = serial();
    let (dir, target) = lock_path();
    let link = dir.path().join("dangling.lock");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    for mode in MODES {
        not_regular(open_bounded(&link, mode, false), NotRegular::Symlink, &link);
        assert!(!target.exists(), "the link's target was created");
    }
    // Followed on request, it creates the target.
    let lf = open_bounded(&link, Mode::Ofd, true).unwrap();
    assert!(fs::metadata(&target).unwrap().is_file());
    lf.acquire(Kind::Exclusive, 0, Wait::NonBlocking).unwrap();
    assert!(probe(&target, Kind::Shared, 0).is_some());
}

#[test]
fn symlink_to_directory_or_fifo_refused_either_way() {
    let _s = serial();
    let (dir, _) = lock_path();
    let sub = dir.path().join("sub");
    fs::create_dir(&sub).unwrap();
    let to_dir = dir.path().join("to-dir.lock");
    std::os::unix::fs::symlink(&sub, &to_dir).unwrap();
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    let to_fifo = dir.path().join("to-fifo.lock");
    std::os::unix::fs::symlink(&fifo, &to_fifo).unwrap();
    for mode in MODES {
        not_regular(
            open_bounded(&to_dir, mode, false),
            NotRegular::Symlink,
            &to_dir,
        );
        not_regular(
            open_bounded(&to_dir, mode, true),
            NotRegular::Directory,
            &to_dir,
        );
        not_regular(
            open_bounded(&to_fifo, mode, false),
            NotRegular::Symlink,
            &to_fifo,
        );
        not_regular(
            open_bounded(&to_fifo, mode, true),
            NotRegular::Fifo,
            &to_fifo,
        );
    }
}

#[test]
fn directory_refused() {
    let _s = serial();
    let dir = tempfile::tempdir().unwrap();
    for mode in MODES {
        let e = open_bounded(dir.path(), mode, false);
        not_regular(e, NotRegular::Directory, dir.path());
        let io: std::io::Error = open_bounded(dir.path(), mode, false).unwrap_err().into();
        assert_eq!(io.kind(), ErrorKind::IsADirectory);
    }
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: NUL-terminated path that outlives the call.
    let r = unsafe { libc::mkfifo(c.as_ptr(), 0o644) };
    assert_eq!(r, 0, "mkfifo: {}", std::io::Error::last_os_error());
}

#[test]
fn fifo_refused_without_hanging() {
    let _s = serial();
    let (_dir, path) = lock_path();
    mkfifo(&path);
    for mode in MODES {
        // No reader or writer on the other end: a blocking open would hang.
        not_regular(open_bounded(&path, mode, false), NotRegular::Fifo, &path);
        not_regular(
            LockFile::options().mode(mode).create(false).open(&path),
            NotRegular::Fifo,
            &path,
        );
    }
    assert!(fs::metadata(&path).unwrap().file_type().is_fifo());
}

#[test]
fn socket_refused() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    for mode in MODES {
        not_regular(open_bounded(&path, mode, false), NotRegular::Socket, &path);
    }
}

#[test]
fn device_refused() {
    let _s = serial();
    let null = Path::new("/dev/null");
    let before = fs::metadata(null).unwrap();
    for mode in MODES {
        not_regular(open_bounded(null, mode, false), NotRegular::Device, null);
        not_regular(
            LockFile::options().mode(mode).permissions(0o600).open(null),
            NotRegular::Device,
            null,
        );
    }
    let after = fs::metadata(null).unwrap();
    assert_eq!(before.mode(), after.mode());
}

#[test]
fn missing_file_without_create_is_not_found() {
    let _s = serial();
    let (_dir, path) = lock_path();
    for mode in MODES {
        let e = LockFile::options()
            .mode(mode)
            .create(false)
            .open(&path)
            .unwrap_err();
        assert!(matches!(e, Error::Open { .. }), "{e:?}");
        let io: std::io::Error = e.into();
        assert_eq!(io.kind(), ErrorKind::NotFound);
        assert!(!path.exists());
    }
}

/// An open that fails keeps the kernel's errno and the path as data, so
/// callers can tell a missing directory from a read-only file system or a
/// full descriptor table, also through the `io::Error` made from it.
#[test]
fn open_errors_keep_the_errno_and_the_path() {
    let _s = serial();
    let (dir, _) = lock_path();
    let path = dir.path().join("no-such-dir").join("x.lock");
    for mode in MODES {
        for create in [true, false] {
            let e = LockFile::options()
                .mode(mode)
                .create(create)
                .open(&path)
                .unwrap_err();
            let Error::Open {
                path: ref p,
                ref source,
            } = e
            else {
                panic!("{mode}: expected Error::Open, got {e:?}");
            };
            assert_eq!(p, &path);
            assert_eq!(source.raw_os_error(), Some(libc::ENOENT), "{source:?}");
            let shown = e.to_string();
            assert!(
                shown.contains(path.to_str().unwrap()) && shown.contains(&source.to_string()),
                "{shown}"
            );
            let inner = std::error::Error::source(&e).expect("a source");
            assert_eq!(inner.to_string(), source.to_string());
            // As an io::Error: the kind, the message with the path, and
            // the kernel's error (errno and all) as its source.
            let io: std::io::Error = e.into();
            assert_eq!(io.kind(), ErrorKind::NotFound);
            assert!(io.to_string().contains(path.to_str().unwrap()), "{io}");
            let kernel = std::error::Error::source(&io)
                .and_then(|s| s.downcast_ref::<std::io::Error>())
                .expect("the kernel's error as the source");
            assert_eq!(kernel.raw_os_error(), Some(libc::ENOENT));
        }
    }
    assert!(!dir.path().join("no-such-dir").exists());
}

/// With no descriptor left (`RLIMIT_NOFILE` reached), the open fails with
/// `EMFILE` itself, not a rewritten error without an errno.
#[test]
fn open_with_no_descriptor_left_says_emfile() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let p = &path;
    fork(|| {
        // open(2) takes the lowest free number and fails with EMFILE when
        // that is at or above the limit: set the limit right there.
        let mut lowest_free = 0;
        while fs::metadata(format!("/proc/self/fd/{lowest_free}")).is_ok() {
            lowest_free += 1;
        }
        let lim = libc::rlimit {
            rlim_cur: lowest_free,
            rlim_max: lowest_free,
        };
        // SAFETY: a valid rlimit struct for the call.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
        for mode in MODES {
            let e = LockFile::options().mode(mode).open(p).unwrap_err();
            match e {
                Error::Open { ref source, .. } => {
                    assert_eq!(source.raw_os_error(), Some(libc::EMFILE), "{e:?}")
                }
                e => panic!("{mode}: expected Error::Open, got {e:?}"),
            }
        }
    })
    .join();
}

/// A file this process can only open read-only: as root (which ignores
/// permission bits) the child first becomes `nobody`.
fn read_only_file(mode: Mode) {
    let _s = serial();
    let (dir, path) = lock_path();
    fs::write(&path, b"read-only content").unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o444)).unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    if mode == Mode::Shm {
        // Every user must write the table, even one that can only read the
        // lock file: make its sidecar writable for all before the test.
        drop(open(&path, mode));
        let sidecar = dir.path().join("test.lock-shm");
        fs::set_permissions(&sidecar, fs::Permissions::from_mode(0o666)).unwrap();
    }
    let path = &path;
    let held = Pipe::new();
    let go_on = Pipe::new();
    let child = fork(|| {
        // SAFETY: plain syscalls; the child is single-threaded.
        unsafe {
            if libc::geteuid() == 0 {
                assert_eq!(libc::setgid(65534), 0, "setgid");
                assert_eq!(libc::setuid(65534), 0, "setuid");
            }
        }
        assert!(
            fs::OpenOptions::new().write(true).open(path).is_err(),
            "the file is still writable"
        );
        let lf = open(path, mode);
        assert!(!lf.is_writable());
        let fd = lf.as_fd_flags();
        assert_ne!(fd & libc::FD_CLOEXEC, 0);

        // Read locks work.
        let g = lf.try_read(0).unwrap();
        lf.acquire(Kind::Shared, 1..3, Wait::NonBlocking).unwrap();
        // Write locks are refused with a clear error, before the kernel.
        for r in [
            lf.try_write(5).map(drop),
            lf.write(5).map(drop),
            lf.write_for(5, Duration::from_millis(1)).map(drop),
            lf.acquire(Kind::Exclusive, 6, Wait::Blocking),
            lf.acquire(Kind::Exclusive, 1..3, Wait::NonBlocking),
        ] {
            match r {
                Err(Error::ReadOnly { path: p }) => assert_eq!(p, lf.path()),
                other => panic!("write lock on a read-only file: {other:?}"),
            }
        }
        let (g, e) = ReadGuard::upgrade(g).unwrap_err();
        assert!(matches!(e, Error::ReadOnly { .. }), "{e:?}");
        let io: std::io::Error = e.into();
        assert_eq!(io.kind(), ErrorKind::PermissionDenied);
        // Nothing changed by the refusals.
        assert_eq!(lf.held(), vec![(span(0..3), Kind::Shared)]);
        held.send(b'h');
        go_on.expect(b'g');
        drop(g);
    });
    held.expect(b'h');
    assert_eq!(
        probe(path, Kind::Exclusive, 0..10),
        Some(holder(mode, 0..3, Kind::Shared, child.pid))
    );
    go_on.send(b'g');
    child.join();
    assert_eq!(probe(path, Kind::Exclusive, ..), None);
    assert_eq!(fs::read(path).unwrap(), b"read-only content");
    assert_eq!(fs::metadata(path).unwrap().mode() & 0o7777, 0o444);
}

trait FdFlags {
    fn as_fd_flags(&self) -> i32;
}

impl FdFlags for LockFile {
    fn as_fd_flags(&self) -> i32 {
        use std::os::fd::AsFd;
        // SAFETY: F_GETFD on a live descriptor.
        let r = unsafe { libc::fcntl(self.as_fd().as_raw_fd(), libc::F_GETFD) };
        assert!(r >= 0, "F_GETFD: {}", std::io::Error::last_os_error());
        r
    }
}

mode_tests! { read_only_file_takes_read_locks_only => read_only_file }

#[test]
fn descriptors_are_close_on_exec() {
    let _s = serial();
    let (_dir, path) = lock_path();
    for mode in MODES {
        let lf = open(&path, mode);
        assert_ne!(lf.as_fd_flags() & libc::FD_CLOEXEC, 0, "{mode}");
        // A second handle (process mode shares one owner) too.
        let lf2 = open(&path, mode);
        assert_ne!(lf2.as_fd_flags() & libc::FD_CLOEXEC, 0, "{mode}");
    }
    // And through exec: a child program sees no descriptor of the file.
    let lf = open(&path, Mode::Process);
    lf.acquire(Kind::Exclusive, 0, Wait::NonBlocking).unwrap();
    let out = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg("ls -l /proc/$$/fd")
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        !listing.contains(path.to_str().unwrap()),
        "lock file descriptor leaked into exec'd child:\n{listing}"
    );
}

/// New files get exactly the mode asked for, whatever the umask, and the
/// umask is left alone. Run in a child: the umask is per process.
#[test]
fn new_file_gets_exact_mode_whatever_the_umask() {
    let _s = serial();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fork(|| {
        for (umask, perms, want) in [
            (0o077, None, 0o644),
            (0o022, None, 0o644),
            (0o000, None, 0o644),
            (0o077, Some(0o600), 0o600),
            (0o077, Some(0o666), 0o666),
            (0o027, Some(0o640), 0o640),
            (0o000, Some(0o600), 0o600),
            (0o777, Some(0o664), 0o664),
        ] {
            for mode in MODES {
                // SAFETY: plain syscall.
                unsafe { libc::umask(umask) };
                let p = d.join(format!("{umask:o}-{perms:?}-{mode}.lock"));
                let mut o = LockFile::options();
                o.mode(mode);
                if let Some(perms) = perms {
                    o.permissions(perms);
                }
                let lf = o.open(&p).unwrap();
                let got = fs::metadata(&p).unwrap().mode() & 0o7777;
                assert_eq!(got, want, "umask {umask:o}, asked {perms:?}, {mode}");
                // SAFETY: plain syscall; reading the umask means setting it.
                let now = unsafe { libc::umask(0o022) };
                assert_eq!(now, umask, "the umask was changed");
                assert_eq!(fs::metadata(&p).unwrap().len(), 0);
                drop(lf);
            }
        }
    })
    .join();
}

/// An existing file: its bytes, mode, size and times are what they were
/// after opening, locking every way, and dropping, in both modes.
#[test]
fn existing_file_unchanged_by_any_use() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let content: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
    fs::write(&path, &content).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
    let before = fs::metadata(&path).unwrap();
    for mode in MODES {
        for perms in [0o644, 0o600, 0o666] {
            let lf = LockFile::options()
                .mode(mode)
                .permissions(perms)
                .open(&path)
                .unwrap();
            let other = LockFile::options()
                .mode(mode)
                .permissions(perms)
                .open(&path)
                .unwrap();
            lf.acquire(Kind::Exclusive, 0..100, Wait::NonBlocking)
                .unwrap();
            lf.acquire(Kind::Shared, 50..5000, Wait::NonBlocking)
                .unwrap();
            {
                let g = lf.write(10_000..).unwrap();
                let r = locksfile::WriteGuard::downgrade(g);
                drop(r);
            }
            let g = other.read(7000).unwrap();
            lf.release(0..10).unwrap();
            // Process mode: `other` is the same owner, so no conflict;
            // OFD: its read guard is in the way.
            match lf.acquire(Kind::Exclusive, .., Wait::NonBlocking) {
                Ok(()) => assert_eq!(mode, Mode::Process),
                Err(Error::WouldBlock { .. }) => assert_ne!(mode, Mode::Process),
                Err(e) => panic!("{e}"),
            }
            drop(g);
            lf.release_all().unwrap();
            drop(other);
            drop(lf);
        }
    }
    let after = fs::metadata(&path).unwrap();
    assert_eq!(fs::read(&path).unwrap(), content);
    assert_eq!(after.mode(), before.mode());
    assert_eq!(after.mode() & 0o7777, 0o640);
    assert_eq!(after.len(), before.len());
    assert_eq!(after.uid(), before.uid());
    assert_eq!(
        (after.mtime(), after.mtime_nsec()),
        (before.mtime(), before.mtime_nsec())
    );
    assert_eq!(
        (after.ctime(), after.ctime_nsec()),
        (before.ctime(), before.ctime_nsec()),
        "the inode was changed (chmod or write)"
    );
}

/// An empty file stays empty however far past its end locks go.
#[test]
fn empty_file_stays_empty() {
    let _s = serial();
    let (_dir, path) = lock_path();
    for mode in MODES {
        let lf = open(&path, mode);
        lf.acquire(Kind::Exclusive, INDEX_END - 1, Wait::NonBlocking)
            .unwrap();
        let _g = lf.write(1u64 << 40..(1u64 << 40) + 10).unwrap();
        lf.acquire(Kind::Shared, .., Wait::NonBlocking).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), 0);
    }
    assert_eq!(fs::metadata(&path).unwrap().len(), 0);
    assert_eq!(fs::metadata(&path).unwrap().mode() & 0o7777, 0o644);
}

/// Empty, reversed and overflowing spans are refused before any system
/// call; the edges of the index space are accepted.
#[test]
fn bad_spans_never_reach_the_kernel() {
    let _s = serial();
    let (_dir, path) = lock_path();
    for mode in MODES {
        let lf = open(&path, mode);
        #[allow(clippy::reversed_empty_ranges)]
        let bad: Vec<(Result<(), Error>, SpanError)> = vec![
            (
                lf.acquire(Kind::Shared, 5..5, Wait::NonBlocking),
                SpanError::Empty,
            ),
            (
                lf.acquire(Kind::Shared, (5, 0), Wait::NonBlocking),
                SpanError::Empty,
            ),
            (
                lf.acquire(Kind::Shared, 7..3, Wait::NonBlocking),
                SpanError::Reversed,
            ),
            (
                lf.acquire(Kind::Shared, 7..=3, Wait::NonBlocking),
                SpanError::Reversed,
            ),
            (
                lf.acquire(Kind::Exclusive, INDEX_END, Wait::NonBlocking),
                SpanError::Overflow,
            ),
            (
                lf.acquire(Kind::Exclusive, INDEX_END.., Wait::NonBlocking),
                SpanError::Overflow,
            ),
            (
                lf.acquire(Kind::Exclusive, 0..INDEX_END + 1, Wait::NonBlocking),
                SpanError::Overflow,
            ),
            (
                lf.acquire(Kind::Exclusive, 0..=INDEX_END, Wait::NonBlocking),
                SpanError::Overflow,
            ),
            (
                lf.acquire(Kind::Exclusive, (u64::MAX, 2), Wait::NonBlocking),
                SpanError::Overflow,
            ),
            (
                lf.acquire(Kind::Exclusive, (INDEX_END - 1, 2), Wait::NonBlocking),
                SpanError::Overflow,
            ),
            (
                lf.acquire(Kind::Exclusive, u64::MAX, Wait::Blocking),
                SpanError::Overflow,
            ),
            (lf.release(3..3), SpanError::Empty),
            (lf.release(INDEX_END..), SpanError::Overflow),
            (lf.try_write(9..2).map(drop), SpanError::Reversed),
            (lf.read(0..0).map(drop), SpanError::Empty),
            (
                lf.write_for(1..=u64::MAX, Duration::from_secs(1)).map(drop),
                SpanError::Overflow,
            ),
            (lf.conflicts(Kind::Shared, 4..4).map(drop), SpanError::Empty),
        ];
        for (i, (r, want)) in bad.into_iter().enumerate() {
            match r {
                Err(Error::InvalidSpan(e)) => {
                    assert_eq!(e, want, "case {i}");
                    let io: std::io::Error = Error::InvalidSpan(e).into();
                    assert_eq!(io.kind(), ErrorKind::InvalidInput);
                }
                other => panic!("case {i}: expected InvalidSpan({want:?}), got {other:?}"),
            }
        }
        assert!(lf.held().is_empty());
        assert_eq!(probe(&path, Kind::Exclusive, ..), None);

        // The last index, and a span to the end, are real.
        lf.acquire(Kind::Exclusive, INDEX_END - 1, Wait::NonBlocking)
            .unwrap();
        lf.acquire(Kind::Shared, (INDEX_END - 3, 2), Wait::NonBlocking)
            .unwrap();
        assert_eq!(
            lf.held(),
            vec![
                (span(INDEX_END - 3..INDEX_END - 1), Kind::Shared),
                (span(INDEX_END - 1..), Kind::Exclusive)
            ]
        );
        assert_eq!(
            probe(&path, Kind::Shared, INDEX_END - 2..),
            Some(holder(mode, INDEX_END - 1.., Kind::Exclusive, pid()))
        );
        lf.release_all().unwrap();
        lf.acquire(Kind::Exclusive, 100.., Wait::NonBlocking)
            .unwrap();
        assert_eq!(
            probe(&path, Kind::Shared, INDEX_END - 1),
            Some(holder(mode, 100.., Kind::Exclusive, pid()))
        );
        assert_eq!(probe(&path, Kind::Shared, 0..100), None);
    }
}
