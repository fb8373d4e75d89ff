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
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Once;

/// Bumped in every child right after `fork`, so that a handle can tell it
/// was inherited without paying for a `getpid` syscall on every operation.
static FORK_GENERATION: AtomicU64 = AtomicU64::new(0);

/// How many descriptors [`close_in_children`] can hold at once (two per
/// shm handle).
pub(crate) const CLOSE_IN_CHILDREN_MAX: usize = 1 << 16;

/// One past the last entry of [`CLOSE_IN_CHILD`] ever taken: the child's
/// hook looks no further. Only grows.
static CLOSE_IN_CHILD_HWM: AtomicUsize = AtomicUsize::new(0);

/// Where [`close_in_children`] starts looking for a free entry: just past
/// the last taken, or at the last given back.
static CLOSE_IN_CHILD_HINT: AtomicUsize = AtomicUsize::new(0);

/// Descriptors closed in every child right after `fork` (`-1`: free). A
/// fixed array of atomics, as the hook runs in the child of a process that
/// may have had other threads mid-call: no lock may be taken there.
static CLOSE_IN_CHILD: [AtomicI32; CLOSE_IN_CHILDREN_MAX] =
    [const { AtomicI32::new(-1) }; CLOSE_IN_CHILDREN_MAX];

/// Have every child made by `fork` from now on close `fd` at once, before
/// it runs any code of its own: `false` when the table is full.
pub(crate) fn close_in_children(fd: RawFd) -> bool {
    fork_generation();
    let from = CLOSE_IN_CHILD_HINT.load(Ordering::Relaxed) % CLOSE_IN_CHILDREN_MAX;
    let order = (from..CLOSE_IN_CHILDREN_MAX).chain(0..from);
    for i in order {
        if CLOSE_IN_CHILD[i].load(Ordering::Relaxed) != -1 {
            continue;
        }
        // The mark first: a fork by another thread right after the entry
        // is taken must find it below the mark.
        CLOSE_IN_CHILD_HWM.fetch_max(i + 1, Ordering::AcqRel);
        if CLOSE_IN_CHILD[i]
            .compare_exchange(-1, fd, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            CLOSE_IN_CHILD_HINT.store(i + 1, Ordering::Relaxed);
            return true;
        }
    }
    false
}

/// Undo [`close_in_children`] before `fd` is closed.
pub(crate) fn keep_in_children(fd: RawFd) {
    let hwm = CLOSE_IN_CHILD_HWM.load(Ordering::Acquire);
    for (i, slot) in CLOSE_IN_CHILD[..hwm].iter().enumerate().rev() {
        if slot
            .compare_exchange(fd, -1, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            CLOSE_IN_CHILD_HINT.store(i, Ordering::Relaxed);
            return;
        }
    }
}

extern "C" fn after_fork_in_child() {
    FORK_GENERATION.fetch_add(1, Ordering::Relaxed);
    let hwm = CLOSE_IN_CHILD_HWM.load(Ordering::Acquire);
    for slot in &CLOSE_IN_CHILD[..hwm.min(CLOSE_IN_CHILDREN_MAX)] {
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
