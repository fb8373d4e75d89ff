//! `Mode::Shm` with its sidecar written over: random bytes, zeros or 0xff
//! over each region of the table, between uses and while in use. Whatever
//! the table then holds, every call answers (a lock, a refusal or a typed
//! error) within a bound, and no process panics or aborts, destructors
//! included.

mod common;

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use locksfile::{Error, Kind, LockFile, Mode, SidecarProblem, Wait};

/// How long one user's session against a written-over table may take.
const BOUND: Duration = Duration::from_secs(5);
/// A timed wait in a session: short, as the table may hold anything.
const PATIENCE: Duration = Duration::from_millis(30);

#[derive(Clone, Copy, Debug)]
enum Fill {
    Random(u64),
    Zeros,
    Ones,
}

const FILLS: [Fill; 3] = [Fill::Random(0x5eed_1234_abcd_0001), Fill::Zeros, Fill::Ones];

fn bytes(fill: Fill, len: usize) -> Vec<u8> {
    match fill {
        Fill::Zeros => vec![0; len],
        Fill::Ones => vec![0xff; len],
        Fill::Random(seed) => {
            // xorshift64*: reproducible without a dependency.
            let mut x = seed;
            (0..len)
                .map(|_| {
                    x ^= x >> 12;
                    x ^= x << 25;
                    x ^= x >> 27;
                    (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
                })
                .collect()
        }
    }
}

fn sidecar(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push("-shm");
    s.into()
}

/// Write `fill` over the region of `len` bytes at `at` of the sidecar, as
/// any process that can write it could (`pwrite`): over its first 64 KiB
/// and every page of it that holds data (`SEEK_DATA`), which is where a
/// small table's entries are: the whole region is gigabytes, sparse.
fn scribble(path: &Path, at: u64, len: u64, fill: Fill) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(sidecar(path))
        .expect("open sidecar");
    let end = at + len;
    let mut parts = vec![(at, len.min(1 << 16))];
    let mut from = at;
    while from < end {
        // SAFETY: lseek on a descriptor we own; no memory is involved.
        let data = unsafe { libc::lseek64(f.as_raw_fd(), from as i64, libc::SEEK_DATA) };
        if data < 0 || data as u64 >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek64(f.as_raw_fd(), data, libc::SEEK_HOLE) };
        let hole = if hole <= data {
            end
        } else {
            (hole as u64).min(end)
        };
        parts.push((data as u64, hole - data as u64));
        from = hole;
    }
    for (at, len) in parts {
        f.write_all_at(&bytes(fill, len as usize), at)
            .expect("write over sidecar");
    }
}

/// One user's session: open, take and release locks over the fast lane,
/// a record and a timed wait, and close. Each call may succeed or fail
/// with an error; it must not panic.
fn session(path: &Path) -> Vec<Error> {
    let mut errors = Vec::new();
    let lf = match LockFile::options().mode(Mode::Shm).open(path) {
        Ok(lf) => lf,
        Err(e) => return vec![e],
    };
    let mut note = |r: Result<(), Error>| {
        if let Err(e) = r {
            errors.push(e);
        }
    };
    note(lf.acquire(Kind::Exclusive, 3, Wait::Timeout(PATIENCE)));
    note(lf.acquire(Kind::Shared, 10..20, Wait::NonBlocking));
    note(lf.acquire(Kind::Exclusive, 7, Wait::Timeout(PATIENCE)));
    note(lf.acquire(Kind::Exclusive, 100..200, Wait::Timeout(PATIENCE)));
    note(lf.conflicts(Kind::Exclusive, 0..1000).map(drop));
    note(lf.release(3));
    note(lf.acquire(Kind::Shared, 12, Wait::NonBlocking));
    note(lf.release_all());
    drop(lf);
    errors
}

/// [`session`] on a thread of its own, failing the test if it panics or
/// does not end within [`BOUND`].
fn bounded_session(path: &Path, what: &str) -> Vec<Error> {
    let (tx, rx) = mpsc::channel();
    let p = path.to_path_buf();
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(|| session(&p));
        let _ = tx.send(r.map_err(|p| {
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        }));
    });
    match rx.recv_timeout(BOUND) {
        Ok(Ok(errors)) => errors,
        Ok(Err(msg)) => panic!("{what}: a session panicked: {msg}"),
        Err(_) => panic!("{what}: a session did not end within {BOUND:?}"),
    }
}

/// Once every user has gone, the next opener sets the table up afresh:
/// it works again, unless the magic number itself was written over (the
/// sidecar is then not recognised as a table and left alone).
fn works_again(path: &Path, what: &str) {
    let errors = bounded_session(path, what);
    let foreign = |e: &Error| {
        matches!(
            e,
            Error::Sidecar {
                problem: SidecarProblem::Foreign | SidecarProblem::NewerVersion { .. },
                ..
            }
        )
    };
    assert!(
        errors.iter().all(foreign),
        "{what}: after every user left: {errors:?}"
    );
}

#[test]
fn written_over_between_uses() {
    let _s = serial();
    for (name, at, len) in locksfile::shm::regions() {
        for fill in FILLS {
            let what = format!("{name} with {fill:?} between uses");
            let (_dir, path) = lock_path();
            bounded_session(&path, &what);
            scribble(&path, at, len, fill);
            bounded_session(&path, &what);
            works_again(&path, &what);
        }
    }
}

#[test]
fn written_over_in_use() {
    let _s = serial();
    for (name, at, len) in locksfile::shm::regions() {
        for fill in FILLS {
            let what = format!("{name} with {fill:?} in use");
            let (_dir, path) = lock_path();
            let ready = Pipe::new();
            let go = Pipe::new();
            let mut child = fork(|| {
                let a = open(&path, Mode::Shm);
                let b = open(&path, Mode::Shm);
                a.acquire(Kind::Exclusive, 5, Wait::NonBlocking).unwrap();
                a.acquire(Kind::Shared, 10..20, Wait::NonBlocking).unwrap();
                a.acquire(Kind::Exclusive, 40..44, Wait::NonBlocking)
                    .unwrap();
                b.acquire(Kind::Shared, 15, Wait::NonBlocking).unwrap();
                std::thread::scope(|s| {
                    // A waiter entry in the table while it is written over.
                    let waiting = s.spawn(|| {
                        let _ = b.acquire(Kind::Exclusive, 41, Wait::Timeout(PATIENCE * 10));
                    });
                    wait_for_waiters(&path, 1);
                    ready.send(1);
                    go.expect(2);
                    waiting.join().unwrap();
                });
                // Ok or a typed error; never a panic.
                let _ = a.release(5);
                let _ = b.release_all();
                let _ = a.release_all();
                drop(b);
                drop(a);
            });
            assert_eq!(
                ready.try_recv(STUCK),
                Some(1),
                "{what}: the child never got ready"
            );
            scribble(&path, at, len, fill);
            bounded_session(&path, &what);
            go.send(2);
            let exit = child.wait();
            assert_eq!(
                exit,
                Exit::Code(0),
                "{what}: the child ended badly: {}",
                child.message()
            );
            works_again(&path, &what);
        }
    }
}

/// `FUTEX_WAITERS` in a robust mutex's lock word: someone sleeps on it.
const FUTEX_WAITERS: u32 = 0x8000_0000;

/// `f` on a thread of its own: its answer, or a failure naming `what` if
/// none comes within [`STUCK`] (the thread is then left behind, stuck).
fn within_bound<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(STUCK)
        .unwrap_or_else(|_| panic!("{what}: no answer within {STUCK:?}: the call hangs"))
}

/// The table's robust mutex with its lock word written over by a value a
/// plain `pthread_mutex_lock` would sleep on for ever, since no holder
/// that will ever let go is named there: a live thread of a process that
/// does not use the table, a thread that is gone (which the kernel never
/// marked dead, as it held nothing), and sleepers with no holder at all.
/// The next call that takes the mutex answers that the table is corrupt,
/// within a bound, and so does the handle's close.
#[test]
fn a_mutex_word_naming_no_holder_is_an_error() {
    let _s = serial();
    let (_, mutex_at, _) = locksfile::shm::regions()
        .into_iter()
        .find(|r| r.0 == "mutex")
        .expect("the mutex region");
    let stay = Pipe::new();
    // Its pid is its main thread's id.
    let bystander = fork(|| stay.expect(1));
    let mut gone = fork(|| {});
    assert_eq!(gone.wait(), Exit::Code(0));
    let words = [
        ("a live thread of another process", bystander.pid),
        ("a thread that is gone", gone.pid | FUTEX_WAITERS),
        ("sleepers and no holder", FUTEX_WAITERS),
    ];
    for (what, word) in words {
        let (_dir, path) = lock_path();
        // Kept open, so that the table is not made afresh under it.
        let keeper = open(&path, Mode::Shm);
        keeper
            .acquire(Kind::Exclusive, 100..200, Wait::NonBlocking)
            .unwrap();
        keeper.release_all().unwrap();
        OpenOptions::new()
            .write(true)
            .open(sidecar(&path))
            .expect("open sidecar")
            .write_all_at(&word.to_ne_bytes(), mutex_at)
            .expect("write the lock word");
        let answer = within_bound(what, move || {
            let r = keeper.acquire(Kind::Exclusive, 0..10, Wait::NonBlocking);
            drop(keeper);
            r
        });
        assert!(
            matches!(
                answer,
                Err(Error::Sidecar {
                    problem: SidecarProblem::Corrupt {
                        what: "the table's mutex"
                    },
                    ..
                })
            ),
            "{what}: {answer:?}"
        );
    }
    stay.send(1);
    bystander.join();
}
