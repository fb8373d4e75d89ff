//! Telling an inherited handle from our own: a generation bumped in every
//! child of `fork`, and descriptors the child closes before it runs any
//! code of its own.
//!
//! # Safety
//!
//! The `pthread_atfork` hook runs in the child of a process that may have
//! had other threads mid-call: it only touches atomics and calls
//! `close(2)`, both async-signal-safe.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Once;

/// Bumped in every child right after `fork`, so that a handle can tell it
/// was inherited without paying for a `getpid` syscall on every operation.
static FORK_GENERATION: AtomicU64 = AtomicU64::new(0);

/// How many descriptors [`close_in_children`] can hold at once.
pub(crate) const CLOSE_IN_CHILDREN_MAX: usize = 4096;

/// Descriptors closed in every child right after `fork` (`-1`: free). A
/// fixed array of atomics, as the hook runs in the child of a process that
/// may have had other threads mid-call: no lock may be taken there.
static CLOSE_IN_CHILD: [AtomicI32; CLOSE_IN_CHILDREN_MAX] =
    [const { AtomicI32::new(-1) }; CLOSE_IN_CHILDREN_MAX];

/// Have every child made by `fork` from now on close `fd` at once, before
/// it runs any code of its own: `false` when the table is full.
pub(crate) fn close_in_children(fd: RawFd) -> bool {
    fork_generation();
    CLOSE_IN_CHILD.iter().any(|slot| {
        slot.compare_exchange(-1, fd, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    })
}

/// Undo [`close_in_children`] before `fd` is closed.
pub(crate) fn keep_in_children(fd: RawFd) {
    for slot in &CLOSE_IN_CHILD {
        if slot
            .compare_exchange(fd, -1, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            return;
        }
    }
}

extern "C" fn after_fork_in_child() {
    FORK_GENERATION.fetch_add(1, Ordering::Relaxed);
    for slot in &CLOSE_IN_CHILD {
        let fd = slot.swap(-1, Ordering::Relaxed);
        if fd >= 0 {
            // SAFETY: close(2) is async-signal-safe; the descriptor was
            // registered by its owner, which never closes it in a child.
            unsafe { libc::close(fd) };
        }
    }
}

/// The current fork generation; registers the `pthread_atfork` hook on first use.
pub(crate) fn fork_generation() -> u64 {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        // SAFETY: the handler is a plain `extern "C"` function that only
        // touches an atomic, which is async-signal-safe after fork.
        let r = unsafe { libc::pthread_atfork(None, None, Some(after_fork_in_child)) };
        assert_eq!(r, 0, "pthread_atfork failed");
    });
    FORK_GENERATION.load(Ordering::Relaxed)
}

/// The fork generation without registering anything (hot path).
#[inline]
pub(crate) fn current_fork_generation() -> u64 {
    FORK_GENERATION.load(Ordering::Relaxed)
}
