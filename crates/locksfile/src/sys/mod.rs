//! The only place this crate talks to the kernel: `fcntl.rs` (record
//! locks), `flock.rs` (whole-file locks), `open.rs` (opening and
//! inspecting files), `fork.rs` (telling an inherited handle), `shared.rs`
//! (the shm table's mapping and mutex), `futex.rs` (futex waits and
//! wakes), `signals.rs` (the wake signal, timers, naps) and `net.rs` (the
//! PostgreSQL session's socket).
//!
//! # Safety
//!
//! Every function here wraps one libc call (or one system call). The calls
//! take plain integers, a NUL-terminated path built from a `CString`, or a
//! pointer to a `flock`/`stat` struct that lives on our stack for the whole
//! call, so each `unsafe` block only has to show that the descriptor and
//! pointers it passes are valid. `unsafe_code` is allowed here, for this
//! module and the files below it, and nowhere else in the crate.
#![allow(unsafe_code)]

mod fcntl;
mod flock;
mod fork;
mod futex;
#[cfg(feature = "postgres")]
mod net;
mod open;
mod shared;
mod signals;

pub(crate) use fcntl::{get_lock, set_lock, Family, LockType, Range};
pub(crate) use flock::{flock_file, flock_locks, FlockOp};
pub(crate) use fork::{
    close_in_children, current_fork_generation, fork_generation, keep_in_children,
};
pub(crate) use futex::{futex_wait, futex_wait_raw, futex_wake_all, futex_wake_all_raw, WordWaker};
#[cfg(feature = "postgres")]
pub(crate) use net::{keepalive_of, peer_closed, peer_closed_within, set_keepalive, Keepalive};
pub(crate) use open::{
    fchmod, fs_type, fstat, ftruncate, is_writable, open, pread, stat, FileId, FileType, OpenHow,
};
pub(crate) use shared::{
    data_ranges, give_back, map_shared, robust_mutex_consistent, robust_mutex_init,
    robust_mutex_lock, robust_mutex_unlock, unmap, Locked,
};
#[cfg(feature = "postgres")]
pub(crate) use signals::block_signals_in_this_thread;
pub(crate) use signals::{nap, set_wake_signal, wake_signal, Alarm};

use std::os::fd::{BorrowedFd, RawFd};

/// Borrow a raw descriptor that the caller keeps open for `'a`.
#[inline]
pub(crate) fn borrow_raw<'a>(fd: RawFd) -> BorrowedFd<'a> {
    // SAFETY: callers only pass descriptors owned by an `OwnedFd` that lives
    // at least as long as the returned borrow (see `owner::Owner`).
    unsafe { BorrowedFd::borrow_raw(fd) }
}
