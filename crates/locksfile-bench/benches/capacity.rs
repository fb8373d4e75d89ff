//! The shm table at scale: the cost of one uncontended exclusive guard pair
//! (`lf.try_write(5)` dropped) against the size of the table around it.
//!
//! - `capacity_held`: another owner of the same table holds N single-index
//!   locks, N = 1, 1,000, 100,000, 1,000,000 and 10,000,000, on even
//!   indices 0, 2, 4, ... (never adjacent, so none merge); the pair takes
//!   index 5, which no one else holds. One table and one filler: the locks
//!   are added as N grows, so the table is filled to 10 million once.
//! - `capacity_owners`: N other owners of the table open at once, N = 1,
//!   100, 10,000 and 100,000, each holding one lock on an index of its own.
//!   Each handle takes a descriptor, so the owners are spread over forked
//!   processes, each opening up to min(20,000, RLIMIT_NOFILE hard - 256);
//!   they are added as N grows, wait on a pipe, and leave when it closes.
//!
//! Each group also measures the process-shared `pthread_rwlock_t` write
//! pair (`pthread_rwlock_pshared`), the floor the curve is set beside.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use locksfile::{Kind, LockFile, Mode, Wait};
use locksfile_bench::{ScratchDir, SharedRwLocks};

/// The index the measured pair takes: held by no one else.
const N: u64 = 5;
const HELD: [u64; 5] = [1, 1_000, 100_000, 1_000_000, 10_000_000];
const OWNERS: [usize; 4] = [1, 100, 10_000, 100_000];
/// The owners' indices start here, clear of the measured one.
const OWNER_BASE: u64 = 1_000;
const ID: &str = "shm guard pair";

fn shm(path: &Path) -> LockFile {
    LockFile::options()
        .mode(Mode::Shm)
        .open(path)
        .expect("open shm")
}

fn pthread_row(g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    let rw = SharedRwLocks::new(1).expect("mmap");
    g.bench_function("pthread_rwlock_pshared", |b| {
        b.iter(|| {
            rw.write(0);
            rw.unlock(0);
        })
    });
}

fn capacity_held(c: &mut Criterion) {
    let dir = ScratchDir::new("capacity-held").expect("scratch dir");
    let path = dir.file("held.lock");
    let mut g = c.benchmark_group("capacity_held");
    pthread_row(&mut g);
    let filler = shm(&path);
    let lf = shm(&path);
    let mut held = 0u64;
    for n in HELD {
        let t = Instant::now();
        for k in held..n {
            filler
                .acquire(Kind::Exclusive, 2 * k, Wait::NonBlocking)
                .unwrap_or_else(|e| panic!("lock {k} of {n}: {e}"));
        }
        if n - held > 100_000 {
            eprintln!(
                "capacity_held: {} more locks in {:?}",
                n - held,
                t.elapsed()
            );
        }
        held = n;
        g.bench_with_input(BenchmarkId::new(ID, n), &n, |b, _| {
            b.iter(|| drop(lf.try_write(N).expect("try_write")))
        });
    }
    g.finish();
    let t = Instant::now();
    drop(filler);
    eprintln!("capacity_held: {held} locks released in {:?}", t.elapsed());
}

/// A pipe: (read end, write end).
fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: valid out-array of two descriptors.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(r, 0, "pipe: {}", io::Error::last_os_error());
    // SAFETY: two fresh descriptors, owned by nothing else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// One byte from `fd`, or `None` at end of file (or on an error).
fn read_byte(fd: RawFd) -> Option<u8> {
    let mut b = 0u8;
    loop {
        // SAFETY: valid descriptor and one-byte buffer.
        let n = unsafe { libc::read(fd, (&mut b as *mut u8).cast(), 1) };
        match n {
            1 => return Some(b),
            -1 if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => continue,
            _ => return None,
        }
    }
}

/// The forked owners' processes. They leave when `go` closes (dropping
/// their handles first); whatever happens, `Drop` reaps them, killing any
/// still there after a while, and they die with the bench's process
/// (`PR_SET_PDEATHSIG`).
struct Owners {
    pids: Vec<libc::pid_t>,
    go: Option<(OwnedFd, OwnedFd)>,
    opened: usize,
}

impl Owners {
    fn new() -> Owners {
        Owners {
            pids: Vec::new(),
            go: Some(pipe()),
            opened: 0,
        }
    }

    /// Forks one process that opens `n` owners of `path`, each locking an
    /// index of its own, and waits until they are all open.
    fn spawn(&mut self, path: &Path, n: usize) {
        let (go_r, go_w) = self.go.as_ref().expect("go pipe");
        let (go_r, go_w) = (go_r.as_raw_fd(), go_w.as_raw_fd());
        let (up_r, up_w) = pipe();
        let base = OWNER_BASE + self.opened as u64;
        // SAFETY: the child only opens handles, writes and reads its pipes
        // and then `_exit`s; it never returns into the bench.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            // SAFETY: plain syscalls in the child; it leaves with `_exit`.
            unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                libc::close(go_w);
            }
            let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let handles: Vec<LockFile> = (0..n)
                    .map(|k| {
                        let h = shm(path);
                        h.acquire(Kind::Exclusive, base + k as u64, Wait::NonBlocking)
                            .expect("owner's lock");
                        h
                    })
                    .collect();
                // SAFETY: valid descriptor and one-byte buffer.
                unsafe { libc::write(up_w.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
                // Until the bench closes `go` (or dies).
                while read_byte(go_r).is_some() {}
                drop(handles);
            }))
            .is_ok();
            // SAFETY: leaving the child without running the bench's code.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        self.pids.push(pid);
        drop(up_w);
        assert_eq!(
            read_byte(up_r.as_raw_fd()),
            Some(1),
            "a child could not open its {n} owners"
        );
        self.opened += n;
    }
}

impl Drop for Owners {
    fn drop(&mut self) {
        // Closing `go` tells the children to leave.
        self.go = None;
        let deadline = Instant::now() + Duration::from_secs(60);
        for &pid in &self.pids {
            loop {
                let mut status = 0;
                // SAFETY: our own child, not yet reaped.
                let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
                if r != 0 {
                    break;
                }
                if Instant::now() > deadline {
                    // SAFETY: as above; then reaped.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                        libc::waitpid(pid, &mut status, 0);
                    }
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// Raises RLIMIT_NOFILE's soft limit to the hard one; the owners a child
/// can open: min(20,000, hard limit - 256).
fn owners_per_child() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: valid pointer; raising the soft limit to the hard one.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
    let per = (lim.rlim_cur.min(1 << 20) as usize)
        .saturating_sub(256)
        .min(20_000);
    assert!(per >= 100, "descriptor limit {} too low", lim.rlim_cur);
    per
}

fn capacity_owners(c: &mut Criterion) {
    let per_child = owners_per_child();
    let dir = ScratchDir::new("capacity-owners").expect("scratch dir");
    let path = dir.file("owners.lock");
    let mut g = c.benchmark_group("capacity_owners");
    pthread_row(&mut g);
    let lf = shm(&path);
    let mut owners = Owners::new();
    for n in OWNERS {
        let t = Instant::now();
        while owners.opened < n {
            let k = per_child.min(n - owners.opened);
            owners.spawn(&path, k);
        }
        if n >= 10_000 {
            eprintln!(
                "capacity_owners: {n} owners in {} processes, the last opened in {:?}",
                owners.pids.len(),
                t.elapsed()
            );
        }
        g.bench_with_input(BenchmarkId::new(ID, n), &n, |b, _| {
            b.iter(|| drop(lf.try_write(N).expect("try_write")))
        });
    }
    g.finish();
    let t = Instant::now();
    drop(owners);
    eprintln!("capacity_owners: owners gone in {:?}", t.elapsed());
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    targets = capacity_held, capacity_owners
}
criterion_main!(benches);
