//! Shared memory for the shm table: mapping its file, and the robust,
//! process-shared mutex that guards it.
//!
//! # Safety
//!
//! `unmap` and the mutex calls are `unsafe fn`s: their callers promise the
//! mapping and the mutex are live, as each `# Safety` section says.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

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

/// `pthread_mutex_lock(m)` of a robust mutex.
///
/// # Safety
/// `m` points to a mutex made by [`robust_mutex_init`], mapped for as long
/// as the caller holds it.
#[inline]
pub(crate) unsafe fn robust_mutex_lock(m: *mut libc::pthread_mutex_t) -> io::Result<Locked> {
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
                e => return Err(io::Error::from_raw_os_error(e)),
            }
        }
        for _ in 0..gap {
            std::hint::spin_loop();
        }
        patience = patience.saturating_sub(gap);
        gap = (gap * 2).min(MUTEX_MAX_GAP);
    }
    // SAFETY: as the caller promises.
    match unsafe { libc::pthread_mutex_lock(m) } {
        0 => Ok(Locked::Clean),
        libc::EOWNERDEAD => Ok(Locked::OwnerDied),
        e => Err(io::Error::from_raw_os_error(e)),
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
