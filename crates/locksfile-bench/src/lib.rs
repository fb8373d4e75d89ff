//! Shared pieces of the benchmarks: thin wrappers over the raw calls the
//! peers are measured with (`fcntl` record locks, `flock(2)`, a
//! process-shared `pthread_rwlock_t`, POSIX named semaphores), a scratch
//! directory, and the fork-based hand-over-hand race.
//!
//! # Safety
//!
//! Every `unsafe` block wraps one libc call on a descriptor this crate
//! opened, a pointer into a mapping it made and keeps alive, or a
//! `fork`/`waitpid`/`_exit` in a process with a single thread.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use locksfile::{Kind, LockFile, Mode, Wait};

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Opens (creating it) a lock file for reading and writing, as the raw peers do.
pub fn open_rw(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

/// Raw `fcntl` record locks and `flock(2)`, with no bookkeeping at all.
pub mod raw {
    use super::*;

    /// Record-lock commands: open-file-description or process-associated,
    /// waiting or not.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Cmd {
        /// `F_OFD_SETLK`
        OfdSetlk,
        /// `F_OFD_SETLKW`
        OfdSetlkw,
        /// `F_SETLK`
        Setlk,
        /// `F_SETLKW`
        Setlkw,
    }

    impl Cmd {
        fn raw(self) -> libc::c_int {
            match self {
                Cmd::OfdSetlk => libc::F_OFD_SETLK,
                Cmd::OfdSetlkw => libc::F_OFD_SETLKW,
                Cmd::Setlk => libc::F_SETLK,
                Cmd::Setlkw => libc::F_SETLKW,
            }
        }
    }

    /// `l_type` of a record lock.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Type {
        /// `F_RDLCK`
        Read,
        /// `F_WRLCK`
        Write,
        /// `F_UNLCK`
        Unlock,
    }

    /// `fcntl(fd, cmd, &flock{type, start, len})`; `EINTR` is retried.
    #[inline]
    pub fn setlk(fd: RawFd, cmd: Cmd, ty: Type, start: i64, len: i64) -> io::Result<()> {
        // SAFETY: all-zero is a valid `flock` (plain integers); OFD locks need l_pid == 0.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = match ty {
            Type::Read => libc::F_RDLCK,
            Type::Write => libc::F_WRLCK,
            Type::Unlock => libc::F_UNLCK,
        } as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = start as libc::off_t;
        fl.l_len = len as libc::off_t;
        loop {
            // SAFETY: `fd` is open for the call and `fl` outlives it.
            match cvt(unsafe { libc::fcntl(fd, cmd.raw(), &mut fl as *mut libc::flock) }) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r.map(drop),
            }
        }
    }

    /// `flock(fd, op)` with `op` one of `LOCK_SH`, `LOCK_EX`, `LOCK_UN` (or'ed with `LOCK_NB`).
    #[inline]
    pub fn flock(fd: RawFd, op: libc::c_int) -> io::Result<()> {
        // SAFETY: plain integer arguments on an open descriptor.
        cvt(unsafe { libc::flock(fd, op) }).map(drop)
    }
}

/// An anonymous `MAP_SHARED` mapping of `n` process-shared `pthread_rwlock_t`s:
/// the floor for any lock between processes (no system call without contention).
pub struct SharedRwLocks {
    ptr: *mut libc::pthread_rwlock_t,
    n: usize,
}

impl SharedRwLocks {
    /// Maps and initialises `n` locks with `PTHREAD_PROCESS_SHARED`.
    pub fn new(n: usize) -> io::Result<SharedRwLocks> {
        let size = n * std::mem::size_of::<libc::pthread_rwlock_t>();
        // SAFETY: a fresh anonymous shared mapping; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = ptr as *mut libc::pthread_rwlock_t;
        // SAFETY: the attribute lives on the stack for the calls; each lock slot
        // lies inside the mapping made above.
        unsafe {
            let mut attr: libc::pthread_rwlockattr_t = std::mem::zeroed();
            libc::pthread_rwlockattr_init(&mut attr);
            libc::pthread_rwlockattr_setpshared(&mut attr, libc::PTHREAD_PROCESS_SHARED);
            for i in 0..n {
                libc::pthread_rwlock_init(ptr.add(i), &attr);
            }
            libc::pthread_rwlockattr_destroy(&mut attr);
        }
        Ok(SharedRwLocks { ptr, n })
    }

    /// `pthread_rwlock_wrlock` on lock `i`.
    #[inline]
    pub fn write(&self, i: usize) {
        assert!(i < self.n);
        // SAFETY: slot `i` is an initialised lock inside our live mapping.
        unsafe { libc::pthread_rwlock_wrlock(self.ptr.add(i)) };
    }

    /// `pthread_rwlock_rdlock` on lock `i`.
    #[inline]
    pub fn read(&self, i: usize) {
        assert!(i < self.n);
        // SAFETY: as in `write`.
        unsafe { libc::pthread_rwlock_rdlock(self.ptr.add(i)) };
    }

    /// `pthread_rwlock_unlock` on lock `i`.
    #[inline]
    pub fn unlock(&self, i: usize) {
        assert!(i < self.n);
        // SAFETY: as in `write`.
        unsafe { libc::pthread_rwlock_unlock(self.ptr.add(i)) };
    }
}

impl Drop for SharedRwLocks {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in `new`, used by no one any more.
        unsafe {
            libc::munmap(
                self.ptr as *mut libc::c_void,
                self.n * std::mem::size_of::<libc::pthread_rwlock_t>(),
            )
        };
    }
}

/// POSIX named semaphores (`sem_open`), one per track, each starting at 1.
/// The names are unlinked at once; forked children use the inherited mappings.
pub struct Semaphores {
    sems: Vec<*mut libc::sem_t>,
}

impl Semaphores {
    /// Creates `n` semaphores with value 1.
    pub fn new(n: usize) -> io::Result<Semaphores> {
        let mut sems = Vec::with_capacity(n);
        for i in 0..n {
            let name = CString::new(format!("/locksfile-bench-{}-{i}", std::process::id()))
                .expect("no NUL in the name");
            // SAFETY: a NUL-terminated name and the variadic mode and value sem_open expects.
            let s = unsafe {
                libc::sem_open(
                    name.as_ptr(),
                    libc::O_CREAT | libc::O_EXCL,
                    0o600 as libc::c_uint,
                    1 as libc::c_uint,
                )
            };
            if s == libc::SEM_FAILED {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: as above; the mapping stays valid after the name is gone.
            unsafe { libc::sem_unlink(name.as_ptr()) };
            sems.push(s);
        }
        Ok(Semaphores { sems })
    }

    /// `sem_wait` on track `i`, retrying `EINTR`.
    #[inline]
    pub fn wait(&self, i: usize) -> io::Result<()> {
        loop {
            // SAFETY: an open semaphore of ours.
            match cvt(unsafe { libc::sem_wait(self.sems[i]) }) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r.map(drop),
            }
        }
    }

    /// `sem_post` on track `i`.
    #[inline]
    pub fn post(&self, i: usize) -> io::Result<()> {
        // SAFETY: an open semaphore of ours.
        cvt(unsafe { libc::sem_post(self.sems[i]) }).map(drop)
    }
}

impl Drop for Semaphores {
    fn drop(&mut self) {
        for &s in &self.sems {
            // SAFETY: closing a semaphore opened in `new`.
            unsafe { libc::sem_close(s) };
        }
    }
}

/// A scratch directory under the system temp dir, removed on drop.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// Makes a fresh directory named after `tag` and this process.
    pub fn new(tag: &str) -> io::Result<ScratchDir> {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p =
            std::env::temp_dir().join(format!("locksfile-bench-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p)?;
        Ok(ScratchDir(p))
    }

    /// A path inside the directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The rings a race can run over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingKind {
    /// `locksfile`, OFD mode, explicit `acquire`/`release`.
    LocksfileOfd,
    /// `locksfile`, process mode, explicit `acquire`/`release`.
    LocksfileProcess,
    /// locksfile in shared-memory mode.
    LocksfileShm,
    /// Raw `F_OFD_SETLKW` / `F_UNLCK`, one byte per track.
    FcntlOfd,
    /// Raw `F_SETLKW` / `F_UNLCK`, one byte per track.
    FcntlPosix,
    /// One POSIX named semaphore per track.
    Semaphore,
    /// One process-shared `pthread_rwlock_t` per track in shared memory.
    PthreadRwlock,
}

impl RingKind {
    /// Every ring, in report order.
    pub const ALL: [RingKind; 7] = [
        RingKind::LocksfileOfd,
        RingKind::LocksfileProcess,
        RingKind::LocksfileShm,
        RingKind::FcntlOfd,
        RingKind::FcntlPosix,
        RingKind::Semaphore,
        RingKind::PthreadRwlock,
    ];

    /// The name used in the reports.
    pub fn name(self) -> &'static str {
        match self {
            RingKind::LocksfileOfd => "locksfile_ofd",
            RingKind::LocksfileProcess => "locksfile_process",
            RingKind::LocksfileShm => "locksfile_shm",
            RingKind::FcntlOfd => "fcntl_ofd",
            RingKind::FcntlPosix => "fcntl_posix",
            RingKind::Semaphore => "sem_open",
            RingKind::PthreadRwlock => "pthread_rwlock_pshared",
        }
    }
}

/// What each racing process owns: made in the child after `fork`.
enum Racer<'a> {
    Locksfile(LockFile),
    Fcntl(File, raw::Cmd),
    Sem(&'a Semaphores),
    Pthread(&'a SharedRwLocks),
}

impl Racer<'_> {
    #[inline]
    fn lock(&self, t: usize) -> io::Result<()> {
        match self {
            Racer::Locksfile(lf) => lf
                .acquire(Kind::Exclusive, t as u64, Wait::Blocking)
                .map_err(Into::into),
            Racer::Fcntl(f, cmd) => raw::setlk(f.as_raw_fd(), *cmd, raw::Type::Write, t as i64, 1),
            Racer::Sem(s) => s.wait(t),
            Racer::Pthread(p) => {
                p.write(t);
                Ok(())
            }
        }
    }

    #[inline]
    fn unlock(&self, t: usize) -> io::Result<()> {
        match self {
            Racer::Locksfile(lf) => lf.release(t as u64).map_err(Into::into),
            Racer::Fcntl(f, cmd) => raw::setlk(f.as_raw_fd(), *cmd, raw::Type::Unlock, t as i64, 1),
            Racer::Sem(s) => s.post(t),
            Racer::Pthread(p) => {
                p.unlock(t);
                Ok(())
            }
        }
    }

    /// The seed's race: take track 0, then for every later step take the
    /// next track before letting go of the previous one.
    fn race(&self, tracks: usize, rounds: usize) -> io::Result<()> {
        let total = tracks * rounds;
        self.lock(0)?;
        for step in 1..total {
            self.lock(step % tracks)?;
            self.unlock((step - 1) % tracks)?;
        }
        self.unlock((total - 1) % tracks)
    }
}

/// Shape of a race: processes, tracks (locks in the ring), rounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Racing processes.
    pub procs: usize,
    /// Locks in the ring; more than `procs`, or the ring can close on itself.
    pub tracks: usize,
    /// Times each process goes round the ring.
    pub rounds: usize,
}

/// One prepared ring: the file or shared objects every racer uses.
pub struct Ring {
    kind: RingKind,
    path: PathBuf,
    sems: Option<Semaphores>,
    rw: Option<SharedRwLocks>,
    /// The shm ring's table, joined for as long as the ring lives, as the
    /// other rings' semaphores and rwlocks are made once: otherwise every
    /// race would set a fresh table up (its last user gone, the next first
    /// opener resets the sidecar) and fault its pages in from the file
    /// system while the race runs.
    _table: Option<LockFile>,
}

impl Ring {
    /// Prepares a ring of `tracks` locks of `kind`; lock files go in `dir`.
    pub fn new(kind: RingKind, tracks: usize, dir: &ScratchDir) -> io::Result<Ring> {
        let path = dir.file(&format!("{}.lock", kind.name()));
        drop(open_rw(&path)?);
        let sems = match kind {
            RingKind::Semaphore => Some(Semaphores::new(tracks)?),
            _ => None,
        };
        let rw = match kind {
            RingKind::PthreadRwlock => Some(SharedRwLocks::new(tracks)?),
            _ => None,
        };
        let table = match kind {
            RingKind::LocksfileShm => Some(LockFile::options().mode(Mode::Shm).open(&path)?),
            _ => None,
        };
        Ok(Ring {
            kind,
            path,
            sems,
            rw,
            _table: table,
        })
    }

    fn join(&self) -> io::Result<Racer<'_>> {
        Ok(match self.kind {
            RingKind::LocksfileOfd => {
                Racer::Locksfile(LockFile::options().mode(Mode::Ofd).open(&self.path)?)
            }
            RingKind::LocksfileProcess => {
                Racer::Locksfile(LockFile::options().mode(Mode::Process).open(&self.path)?)
            }
            RingKind::LocksfileShm => {
                Racer::Locksfile(LockFile::options().mode(Mode::Shm).open(&self.path)?)
            }
            RingKind::FcntlOfd => Racer::Fcntl(open_rw(&self.path)?, raw::Cmd::OfdSetlkw),
            RingKind::FcntlPosix => Racer::Fcntl(open_rw(&self.path)?, raw::Cmd::Setlkw),
            RingKind::Semaphore => Racer::Sem(self.sems.as_ref().expect("made in new")),
            RingKind::PthreadRwlock => Racer::Pthread(self.rw.as_ref().expect("made in new")),
        })
    }

    /// Runs one race: forks `shape.procs` children that each join the ring,
    /// say they are ready on a pipe and wait on a second pipe, which the
    /// parent then closes so that all start at once. Each child stamps
    /// `CLOCK_MONOTONIC` when it starts and after its last release into a
    /// shared page; the race lasts from the first start to the last finish
    /// (process exit and reaping are left out).
    ///
    /// Call it from a process with a single thread.
    pub fn race(&self, shape: Shape) -> io::Result<Duration> {
        assert!(shape.tracks > shape.procs, "the ring needs a free track");
        let stamps = Stamps::new(2 * shape.procs)?;
        let (ready_r, ready_w) = pipe()?;
        let (go_r, go_w) = pipe()?;
        let mut pids = Vec::with_capacity(shape.procs);
        for p in 0..shape.procs {
            // SAFETY: the caller is single-threaded, so the child may run any code.
            let pid = cvt(unsafe { libc::fork() })?;
            if pid == 0 {
                // SAFETY: plain descriptor calls in the child, which ends in `_exit`
                // so no destructor or atexit handler of the parent runs twice.
                unsafe {
                    libc::close(go_w);
                    libc::close(ready_r);
                    let code = match self.join() {
                        Ok(racer) => {
                            let b = [1u8];
                            libc::write(ready_w, b.as_ptr().cast(), 1);
                            let mut buf = [0u8];
                            while libc::read(go_r, buf.as_mut_ptr().cast(), 1) < 0 {}
                            stamps.stamp(2 * p);
                            let r = racer.race(shape.tracks, shape.rounds);
                            stamps.stamp(2 * p + 1);
                            match r {
                                Ok(()) => 0,
                                Err(_) => 2,
                            }
                        }
                        Err(_) => 3,
                    };
                    libc::_exit(code);
                }
            }
            pids.push(pid);
        }
        // SAFETY: closing our own descriptors and reading into a stack buffer.
        unsafe {
            libc::close(ready_w);
            libc::close(go_r);
            let mut got = 0;
            let mut buf = [0u8; 64];
            while got < shape.procs {
                let n = libc::read(ready_r, buf.as_mut_ptr().cast(), buf.len());
                if n == 0 {
                    break;
                }
                if n > 0 {
                    got += n as usize;
                }
            }
            libc::close(ready_r);
        }
        // SAFETY: our own descriptor; EOF releases every child at once.
        unsafe { libc::close(go_w) };
        let mut failed = None;
        for pid in pids {
            let mut status = 0;
            // SAFETY: reaping our own child into a stack integer.
            while unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
                failed = Some(status);
            }
        }
        let first = (0..shape.procs).map(|p| stamps.get(2 * p)).min();
        let last = (0..shape.procs).map(|p| stamps.get(2 * p + 1)).max();
        let elapsed = Duration::from_nanos(last.unwrap_or(0).saturating_sub(first.unwrap_or(0)));
        match failed {
            Some(status) => Err(io::Error::other(format!(
                "{} race child failed (wait status {status:#x})",
                self.kind.name()
            ))),
            None => Ok(elapsed),
        }
    }
}

/// `CLOCK_MONOTONIC` stamps in a `MAP_SHARED` page, written by forked
/// children and read by the parent after it has reaped them.
struct Stamps {
    ptr: *mut u64,
    n: usize,
}

impl Stamps {
    fn new(n: usize) -> io::Result<Stamps> {
        // SAFETY: a fresh anonymous shared mapping; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                n * 8,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Stamps { ptr: ptr.cast(), n })
    }

    fn stamp(&self, i: usize) {
        assert!(i < self.n);
        // SAFETY: a stack timespec for the call; slot `i` lies in our mapping.
        unsafe {
            let mut ts: libc::timespec = std::mem::zeroed();
            libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
            std::ptr::write_volatile(
                self.ptr.add(i),
                ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64,
            );
        }
    }

    fn get(&self, i: usize) -> u64 {
        assert!(i < self.n);
        // SAFETY: slot `i` lies in our mapping; the writer has been reaped.
        unsafe { std::ptr::read_volatile(self.ptr.add(i)) }
    }
}

impl Drop for Stamps {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in `new`.
        unsafe { libc::munmap(self.ptr.cast(), self.n * 8) };
    }
}

fn pipe() -> io::Result<(RawFd, RawFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    Ok((fds[0], fds[1]))
}

/// The median of some durations (sorted in place).
pub fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let n = xs.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}
