//! Shared memory for the shm table: mapping its file, and the robust,
//! process-shared mutex that guards it.
//!
//! # Safety
//!
//! `unmap` and the mutex calls are `unsafe fn`s: their callers promise the
//! mapping and the mutex are live, as each `# Safety` section says.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

/// `mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)`.
pub(crate) fn map_shared(fd: BorrowedFd<'_>, len: usize) -> io::Result<*mut u8> {
    // SAFETY: no fixed address, so nothing existing is replaced; the
    // caller checked that the file is at least `len` bytes long.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // The table is sparse and its words are found by hash: a fault wants
    // its one page, never the kernel's read-ahead around it. Without this,
    // a first touch of a hole in a fresh table on a disk file system (ext4)
    // reads in and zeroes a large folio, about a millisecond a page, while
    // the toucher may hold the table's mutex. Advice only: a failure
    // changes nothing but speed.
    // SAFETY: the range is the mapping just made.
    unsafe { libc::madvise(p, len, libc::MADV_RANDOM) };
    Ok(p.cast())
}

/// `munmap(ptr, len)`.
///
/// # Safety
/// `ptr` and `len` are a mapping made by [`map_shared`] that nothing uses
/// any more.
pub(crate) unsafe fn unmap(ptr: *mut u8, len: usize) {
    // SAFETY: as the caller promises.
    unsafe { libc::munmap(ptr.cast(), len) };
}

/// The parts of `at..at + len` of the file open as `fd` that hold data
/// (`SEEK_DATA`, `SEEK_HOLE`): what has ever been written there and not
/// given back. A scan of a sparse region reads only these, since reading a
/// hole of a shared mapping would allocate it. Where the file system cannot
/// tell, the whole of it.
pub(crate) fn data_ranges(fd: BorrowedFd<'_>, at: u64, len: u64) -> Vec<std::ops::Range<u64>> {
    let end = at + len;
    let seek = |from: u64, whence| {
        // SAFETY: lseek reads no memory; the descriptor is borrowed live.
        let r = unsafe { libc::lseek64(fd.as_raw_fd(), from as i64, whence) };
        (r >= 0)
            .then_some(r as u64)
            .ok_or_else(io::Error::last_os_error)
    };
    let mut out = Vec::new();
    let mut from = at;
    while from < end {
        let data = match seek(from, libc::SEEK_DATA) {
            Ok(d) => d,
            // No data from here to the end of the file.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            Err(_) => return std::iter::once(at..end).collect(),
        };
        if data >= end {
            break;
        }
        let hole = seek(data, libc::SEEK_HOLE).unwrap_or(end).min(end);
        out.push(data.max(at)..hole);
        if hole <= data {
            return std::iter::once(at..end).collect();
        }
        from = hole;
    }
    out
}

/// Give back the memory (or disk) behind `len` bytes of a shared mapping
/// at `ptr` (`MADV_REMOVE`): they read as zeros afterwards, in every
/// process. `false` where the file system cannot.
///
/// # Safety
/// `ptr..ptr + len` is page-aligned, inside a live shared mapping, and no
/// one reads or writes it meanwhile.
pub(crate) unsafe fn give_back(ptr: *mut u8, len: usize) -> bool {
    // SAFETY: as the caller promises.
    unsafe { libc::madvise(ptr.cast(), len, libc::MADV_REMOVE) == 0 }
}

/// `pthread_mutex_init` of a robust, process-shared mutex at `m`.
///
/// # Safety
/// `m` points to writable memory for a `pthread_mutex_t` that no one uses.
pub(crate) unsafe fn robust_mutex_init(m: *mut libc::pthread_mutex_t) -> io::Result<()> {
    // SAFETY: the attribute lives on our stack for the whole block; `m` is
    // as the caller promises.
    unsafe {
        let mut attr: libc::pthread_mutexattr_t = std::mem::zeroed();
        let mut r = libc::pthread_mutexattr_init(&mut attr);
        if r == 0 {
            r = libc::pthread_mutexattr_setpshared(&mut attr, libc::PTHREAD_PROCESS_SHARED);
        }
        if r == 0 {
            r = libc::pthread_mutexattr_setrobust(&mut attr, libc::PTHREAD_MUTEX_ROBUST);
        }
        if r == 0 {
            r = libc::pthread_mutex_init(m, &attr);
        }
        libc::pthread_mutexattr_destroy(&mut attr);
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
    }
    Ok(())
}

/// How taking a robust mutex went.
pub(crate) enum Locked {
    Clean,
    /// The previous holder died holding it: repair what it guards, then
    /// [`robust_mutex_consistent`].
    OwnerDied,
}

/// `pause`s [`robust_mutex_lock`] spends watching the mutex before it
/// sleeps (about 30 µs here)...
const MUTEX_PATIENCE: u32 = 1280;
/// ... between looks that start 4 `pause`s apart and double up to this
/// (about 1.5 µs here). A holder on another CPU lets go within a
/// microsecond or so, and a look soon after catches it; backing off
/// further lets a running holder take the mutex again with its line still
/// in its cache rather than pulling the line back and forth. Measured on
/// the ring race (8 processes on 2 CPUs, interleaved with semaphores):
/// 1.08× the semaphores' time against 1.26× looking every 64 `pause`s and
/// about the same looking every 4; with 2 processes on disjoint indices of
/// one table 280–390 ns a pair against 550–1,000 ns looking every 4.
const MUTEX_MAX_GAP: u32 = 64;

/// The owner's thread id in a robust mutex's lock word (`FUTEX_TID_MASK`):
/// zero when the mutex is free, or its holder died (then the kernel left
/// only `FUTEX_OWNER_DIED`, and locking reports `EOWNERDEAD`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const FUTEX_TID_MASK: i32 = 0x3fff_ffff;

/// Whether the robust mutex `m` looks taken, by a plain read of its lock
/// word: glibc keeps the futex word first in `pthread_mutex_t` on Linux.
/// Waiters read rather than try to write, so that the line holding it is
/// not pulled away from the holder on every try (test and test-and-set).
///
/// # Safety
/// As [`robust_mutex_lock`].
#[inline]
unsafe fn looks_taken(m: *mut libc::pthread_mutex_t) -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: the word is an aligned i32 at the start of the mutex,
        // written by other threads only atomically (futex operations).
        let word = unsafe { &*(m as *const std::sync::atomic::AtomicI32) };
        word.load(std::sync::atomic::Ordering::Relaxed) & FUTEX_TID_MASK != 0
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = m;
        false
    }
}

/// `pthread_mutex_lock(m)` of a robust mutex, except that a mutex whose
/// bytes no holder can have left (see [`implausible`]) is an error of kind
/// `InvalidData` rather than a wait for ever. `is_user(pid)`: whether
/// process `pid` uses what the mutex guards, so that it may hold it.
///
/// # Safety
/// `m` points to a mutex made by [`robust_mutex_init`], mapped for as long
/// as the caller holds it.
#[inline]
pub(crate) unsafe fn robust_mutex_lock(
    m: *mut libc::pthread_mutex_t,
    is_user: &dyn Fn(u32) -> bool,
) -> io::Result<Locked> {
    // Held for well under a microsecond at a time: while its holder runs
    // on another CPU, waiting a moment is much cheaper than sleeping in the
    // kernel and being woken (a system call on each side).
    let mut gap = 4;
    let mut patience = MUTEX_PATIENCE;
    while patience > 0 {
        // SAFETY: as the caller promises.
        if !unsafe { looks_taken(m) } {
            // SAFETY: as the caller promises.
            match unsafe { libc::pthread_mutex_trylock(m) } {
                0 => return Ok(Locked::Clean),
                libc::EOWNERDEAD => return Ok(Locked::OwnerDied),
                libc::EBUSY => {}
                // SAFETY: as the caller promises.
                e => return Err(unsafe { failed(m, e) }),
            }
        }
        for _ in 0..gap {
            std::hint::spin_loop();
        }
        patience = patience.saturating_sub(gap);
        gap = (gap * 2).min(MUTEX_MAX_GAP);
    }
    // SAFETY: as the caller promises.
    unsafe { sleep_for_mutex(m, is_user) }
}

/// The first timed sleep on a contended mutex; each next one is twice as
/// long, up to [`MUTEX_STEP_MAX`]. A sleep ends early when the mutex is let
/// go (the futex wake), so the steps only bound how often a mutex that
/// stays taken is looked at.
const MUTEX_STEP: Duration = Duration::from_millis(25);
const MUTEX_STEP_MAX: Duration = Duration::from_millis(200);
/// How long a lock word naming a holder that cannot be one (gone, or of a
/// process that does not use the table) must stay unchanged before it is
/// taken for corrupt. Generous: a real holder lets go within microseconds
/// unless it is stopped, and a stopped holder that uses the table is
/// waited for; this only has to tell a word no one will ever change.
const MUTEX_STALE: Duration = Duration::from_secs(2);

/// The slow half of [`robust_mutex_lock`]: sleep in timed steps
/// (`pthread_mutex_timedlock`, which glibc 2.17 has, against
/// `CLOCK_REALTIME`; a jump of that clock only makes one step shorter or
/// longer), and after each step that timed out, look at the lock word.
///
/// # Safety
/// As [`robust_mutex_lock`].
#[cold]
unsafe fn sleep_for_mutex(
    m: *mut libc::pthread_mutex_t,
    is_user: &dyn Fn(u32) -> bool,
) -> io::Result<Locked> {
    let mut step = MUTEX_STEP;
    // The word last seen, and since when it reads so.
    let mut seen: Option<(u32, Instant)> = None;
    loop {
        let deadline = realtime_after(step);
        // SAFETY: as the caller promises; `deadline` is a valid timespec.
        match unsafe { libc::pthread_mutex_timedlock(m, &deadline) } {
            0 => return Ok(Locked::Clean),
            libc::EOWNERDEAD => return Ok(Locked::OwnerDied),
            libc::ETIMEDOUT => {}
            // SAFETY: as the caller promises.
            e => return Err(unsafe { failed(m, e) }),
        }
        step = (step * 2).min(MUTEX_STEP_MAX);
        // SAFETY: as the caller promises.
        let word = unsafe { lock_word(m) };
        let since = match seen {
            Some((w, since)) if w == word => since,
            _ => Instant::now(),
        };
        seen = Some((word, since));
        // SAFETY: as the caller promises.
        if let Some(why) = unsafe { implausible(m, word, since.elapsed(), is_user) } {
            return Err(io::Error::new(io::ErrorKind::InvalidData, why));
        }
    }
}

/// `CLOCK_REALTIME` now plus `d`, as the deadline of a timed lock.
fn realtime_after(d: Duration) -> libc::timespec {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer; CLOCK_REALTIME always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut now) };
    let nanos = now.tv_nsec as u64 + u64::from(d.subsec_nanos());
    libc::timespec {
        tv_sec: now.tv_sec + d.as_secs() as libc::time_t + (nanos / 1_000_000_000) as libc::time_t,
        tv_nsec: (nanos % 1_000_000_000) as _,
    }
}

/// An error `e` from locking `m`: `InvalidData` when the mutex's own bytes
/// are not what [`robust_mutex_init`] wrote (glibc answers `EINVAL`, or
/// worse, for a kind it does not know), else `e` as it is.
///
/// # Safety
/// As [`robust_mutex_lock`].
#[cold]
unsafe fn failed(m: *mut libc::pthread_mutex_t, e: i32) -> io::Error {
    // SAFETY: as the caller promises.
    if unsafe { !kind_as_made(m) } || e == libc::EDEADLK {
        // We never take the mutex twice: a word naming us is not ours.
        return io::Error::new(io::ErrorKind::InvalidData, "the mutex's bytes");
    }
    io::Error::from_raw_os_error(e)
}

/// The lock word, read plainly (see [`looks_taken`]).
///
/// # Safety
/// As [`robust_mutex_lock`].
unsafe fn lock_word(m: *mut libc::pthread_mutex_t) -> u32 {
    // SAFETY: as in `looks_taken`.
    let word = unsafe { &*(m as *const std::sync::atomic::AtomicU32) };
    word.load(std::sync::atomic::Ordering::Relaxed)
}

/// `FUTEX_WAITERS` of a futex word: someone sleeps on it.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const FUTEX_WAITERS: u32 = 0x8000_0000;

/// Why lock word `word`, unchanged for `stale` (while timed waits on it
/// ran out), can be no state a holder left, if it can be none:
///
/// - the mutex's kind is not what [`robust_mutex_init`] wrote;
/// - it names this very thread, which is waiting, not holding;
/// - it names no holder but has sleepers (`FUTEX_WAITERS` alone): an
///   unlock leaves 0 and a dead holder's word gets `FUTEX_OWNER_DIED`, so
///   nothing would ever wake them;
/// - for [`MUTEX_STALE`]: it names a thread that does not exist (a holder
///   that dies is marked by the kernel, through its robust list), or one
///   of a process that does not use what the mutex guards.
///
/// A word naming a thread of a process that uses it (this one included) is
/// waited on for as long as it takes: that process may be stopped (by a
/// signal or a debugger) in its critical section, and such a word written
/// by garbage cannot be told from it. So is any word on a system where the
/// layout of glibc's mutex is not known (`None` always). A holder in
/// another pid namespace writes its thread id as its namespace numbers it,
/// which `/proc` here may not know: held unchanged for [`MUTEX_STALE`],
/// its mutex is taken for corrupt, which only a holder stopped that long
/// could see.
///
/// # Safety
/// As [`robust_mutex_lock`].
#[cold]
unsafe fn implausible(
    m: *mut libc::pthread_mutex_t,
    word: u32,
    stale: Duration,
    is_user: &dyn Fn(u32) -> bool,
) -> Option<&'static str> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: as the caller promises.
        if unsafe { !kind_as_made(m) } {
            return Some("the mutex's kind");
        }
        let tid = word & FUTEX_TID_MASK as u32;
        if tid == 0 {
            return (word == FUTEX_WAITERS && stale > Duration::ZERO)
                .then_some("the mutex's lock word (sleepers, no holder)");
        }
        // SAFETY: a plain system call.
        if tid as libc::pid_t == unsafe { libc::syscall(libc::SYS_gettid) } as libc::pid_t {
            return Some("the mutex's lock word (names its waiter)");
        }
        if stale < MUTEX_STALE {
            return None;
        }
        match thread_group(tid) {
            Some(None) => Some("the mutex's lock word (names a thread that is gone)"),
            Some(Some(pid)) if !is_user(pid) => {
                Some("the mutex's lock word (names a process not using the table)")
            }
            // A user, or /proc cannot tell.
            _ => None,
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = (m, word, stale, is_user);
        None
    }
}

/// The process of thread `tid`: `Some(None)` when no such thread exists,
/// `None` when `/proc` cannot tell.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn thread_group(tid: u32) -> Option<Option<u32>> {
    match std::fs::read_to_string(format!("/proc/{tid}/status")) {
        Ok(status) => status
            .lines()
            .find_map(|l| l.strip_prefix("Tgid:"))
            .and_then(|v| v.trim().parse().ok())
            .map(Some),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Told apart from a /proc that is not there at all.
            std::path::Path::new("/proc/self/status")
                .exists()
                .then_some(None)
        }
        Err(_) => None,
    }
}

/// Whether mutex `m`'s kind (its type, robustness and sharing, glibc's
/// `__kind`) is what [`robust_mutex_init`] writes: read off a mutex made
/// here the same way, once. `true` where glibc's layout is not known.
///
/// # Safety
/// As [`robust_mutex_lock`].
unsafe fn kind_as_made(m: *mut libc::pthread_mutex_t) -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // glibc's `__pthread_mutex_s`: `__lock`, `__count`, `__owner`, then
        // on 64-bit `__nusers` and `__kind`, on 32-bit `__kind`.
        const KIND_AT: usize = if cfg!(target_pointer_width = "64") {
            16
        } else {
            12
        };
        // Type, robust, priority protocol and process-shared bits; not the
        // elision bits, which a glibc tunable may set differently.
        const KIND_MASK: i32 = 0xff;
        static MADE: std::sync::OnceLock<Option<i32>> = std::sync::OnceLock::new();
        let kind_of = |m: *const libc::pthread_mutex_t| {
            // SAFETY: inside the mutex, aligned; read as an atomic since
            // other processes may write the mapping.
            let k =
                unsafe { &*(m.cast::<u8>().add(KIND_AT) as *const std::sync::atomic::AtomicI32) };
            k.load(std::sync::atomic::Ordering::Relaxed) & KIND_MASK
        };
        let made = MADE.get_or_init(|| {
            // SAFETY: a zeroed mutex of our own, made and destroyed here.
            unsafe {
                let mut local: libc::pthread_mutex_t = std::mem::zeroed();
                robust_mutex_init(&mut local).ok()?;
                let k = kind_of(&local);
                libc::pthread_mutex_destroy(&mut local);
                Some(k)
            }
        });
        made.is_none_or(|k| kind_of(m) == k)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = m;
        true
    }
}

/// `pthread_mutex_consistent(m)`, after repairing.
///
/// # Safety
/// As [`robust_mutex_lock`], and the caller holds `m`.
pub(crate) unsafe fn robust_mutex_consistent(m: *mut libc::pthread_mutex_t) {
    // SAFETY: as the caller promises.
    unsafe { libc::pthread_mutex_consistent(m) };
}

/// `pthread_mutex_unlock(m)`.
///
/// # Safety
/// As [`robust_mutex_lock`], and the caller holds `m`.
#[inline]
pub(crate) unsafe fn robust_mutex_unlock(m: *mut libc::pthread_mutex_t) {
    // SAFETY: as the caller promises.
    unsafe { libc::pthread_mutex_unlock(m) };
}
