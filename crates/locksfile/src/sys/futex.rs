//! Futex waits and wakes on words in shared memory, and the waker a
//! [`Cancel`](crate::Cancel) uses to rouse a waiter asleep on one.
//!
//! # Safety
//!
//! The kernel only reads the word; the raw forms are `unsafe fn`s whose
//! callers promise it is aligned and stays mapped for the call.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// `futex(word, FUTEX_WAIT, expected, timeout)` on a word in shared memory
/// (no `FUTEX_PRIVATE_FLAG`: other processes wake it). `Ok(())` when woken
/// or the word had changed; `ETIMEDOUT` and `EINTR` come back as errors.
pub(crate) fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) -> io::Result<()> {
    // SAFETY: `word` is a live, aligned 32-bit word.
    unsafe { futex_wait_raw(word.as_ptr(), expected, timeout) }
}

/// `futex(word, FUTEX_WAKE, INT_MAX)`: wake every waiter on `word`.
pub(crate) fn futex_wake_all(word: &AtomicU32) {
    // SAFETY: `word` is a live, aligned 32-bit word.
    unsafe { futex_wake_all_raw(word.as_ptr()) }
}

/// `futex(word, FUTEX_WAIT, expected, timeout)` on the 32-bit half of a
/// word used as a 64-bit atomic elsewhere (the kernel reads it only).
/// `Ok` also when the word did not hold `expected`.
///
/// # Safety
/// `word` is aligned and stays mapped for the call.
pub(crate) unsafe fn futex_wait_raw(
    word: *const u32,
    expected: u32,
    timeout: Duration,
) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: as the caller promises; `ts` outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word,
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        )
    };
    if r == -1 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EAGAIN) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

/// `futex(word, FUTEX_WAKE, INT_MAX)` on a word as [`futex_wait_raw`] has it.
///
/// # Safety
/// `word` is aligned and stays mapped for the call.
pub(crate) unsafe fn futex_wake_all_raw(word: *const u32) {
    // SAFETY: as the caller promises.
    unsafe {
        libc::syscall(libc::SYS_futex, word, libc::FUTEX_WAKE, libc::c_int::MAX);
    }
}

/// A futex word a [`Cancel`](crate::Cancel)'s waker changes and wakes, so
/// that a waiter asleep on it (or about to sleep on the value it read)
/// looks again.
pub(crate) struct WordWaker(*const AtomicU32);

// SAFETY: the word is an atomic in a shared mapping; the waker is only
// called while the waiter that made it keeps the mapping alive (it takes
// the waker back before it returns).
unsafe impl Send for WordWaker {}

impl WordWaker {
    /// # Safety
    /// `word` stays mapped until the waker is dropped.
    pub(crate) unsafe fn new(word: &AtomicU32) -> WordWaker {
        WordWaker(word as *const AtomicU32)
    }

    pub(crate) fn wake(&self) {
        // SAFETY: as `new` was promised.
        let word = unsafe { &*self.0 };
        word.fetch_add(1, Ordering::SeqCst);
        futex_wake_all(word);
    }
}
