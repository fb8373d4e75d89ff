//! Named, file-backed, byte-range reader/writer locks for processes on Linux.
//!
//! One lock file holds many numbered locks: lock `n` is byte `n` of the
//! file, locked with `fcntl` record locks ([`Mode::Flock`] instead takes
//! one `flock(2)` lock on the whole file, to exclude the tools that use
//! those; [`Mode::Shm`] keeps the locks in a shared-memory table beside
//! the file, at the cost of a futex, with deadlock detection and fair
//! queues). Locks are shared (read) or exclusive (write), taken over whole
//! spans of consecutive indices in one call, converted in place, waited
//! for with or without a deadline, and released when their guard or handle
//! goes away. The file's content is never touched.
//!
//! ```
//! use locksfile::{Kind, LockFile, Wait};
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("data.lock");
//! let a = LockFile::open(&path)?;
//! let b = LockFile::open(&path)?;       // OFD mode: a second owner
//!
//! let g = a.write(0..10)?;              // exclusive on 0..10
//! assert!(b.try_read(5).is_err());      // b is kept out
//! assert!(b.try_read(10).is_ok());      // but 10 is free
//! drop(g);
//!
//! b.acquire(Kind::Shared, (3, 2), Wait::NonBlocking)?; // the original's (start, count)
//! assert_eq!(b.held().len(), 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! A guard that must sit beside its `Arc<LockFile>` in a struct, or move
//! to another thread, owns a clone of the `Arc`: [`LockFile::write_owned`]
//! and friends ([`OwnedWriteGuard`]).
//!
//! With the `tokio` feature, [`LockFile::read_async`] and
//! [`LockFile::write_async`] wait without blocking a tokio runtime, and a
//! dropped future ends its wait with nothing held (module `asyncio`).
//!
//! See `docs/DESIGN.md` for the model: the modes, how holds compose,
//! why releasing never blocks, and what threads and forks get.
//!
//! # Deadlocks
//! In process mode the kernel refuses a wait that would close a cycle
//! between processes ([`Error::Deadlock`]). In OFD mode (the default) it
//! detects nothing: two owners that each wait for a lock the other holds
//! wait forever, and two readers of one span that both upgrade are such a
//! pair (see [`ReadGuard::upgrade`]). Wait with a timeout where that can
//! happen, or use [`Mode::Shm`], which refuses the wait that would close
//! any cycle of owners with [`Error::Deadlock`] (a cycle that runs through
//! the fair queue's order alone is broken by reordering the queue, as
//! PostgreSQL does, instead; threads sharing one
//! handle are one owner there: a cycle through a handle counts even if
//! another of its threads could still release).
//!
//! # How long a lock lives
//! - An OFD lock belongs to the open file description, not to the process:
//!   a child made by `fork` that has not called `exec` shares it, so a
//!   holder's forked children (`multiprocessing` with the fork start
//!   method, say) keep its locks after the holder dies, until they exit
//!   too. The handle refuses to work in the child ([`Error::Forked`]) and
//!   never releases the parent's locks, but it cannot close the child's
//!   inherited descriptor for it. Process-mode locks are never inherited.
//! - Locks belong to the file (its inode), not to its name. Deleting or
//!   renaming a file over a lock file that is in use splits the lock: the
//!   processes that opened the old file keep excluding each other, and
//!   those that open the path afterwards lock a different file. Never
//!   delete or replace a lock file that may be in use.
#![deny(unsafe_code)]
#![warn(missing_docs)]

#[cfg(feature = "tokio")]
pub mod asyncio;
mod cancel;
mod descriptors;
mod engine;
mod error;
mod file;
mod guard;
mod holds;
mod into_span;
mod kind;
mod owned;
mod owner;
mod party;
mod registry;
mod segmap;
mod span;
mod stats;
mod sys;
mod wait;

/// Reading a [`Mode::Shm`] lock table from outside: who holds what, who
/// waits (for `locksfile status` and the like).
pub mod shm {
    #[doc(hidden)]
    pub use crate::engine::shm::{cap_for_tests, regions, verify};
    pub use crate::engine::shm::{read_stats, HeldLock, Snapshot, WaitingLock};

    /// The byte of the lock file (past the last index) on which every
    /// user of its table holds an OFD read lock while it uses it: lock
    /// listings such as `/proc/locks` show it, and it is no user's lock.
    pub const IN_USE_BYTE: u64 = crate::engine::shm::IN_USE as u64;
}

pub use cancel::Cancel;
#[cfg(feature = "postgres")]
pub use engine::pg::facts::ServerFacts;
#[cfg(feature = "postgres")]
pub use engine::pg::setup::{server_setup_sql, set_up_server};
pub use engine::Abilities;
pub use error::{
    At, Error, ErrorKind, Holder, NotRegular, Result, ServerHolder, ServerLock, SidecarProblem,
    SpanError, TlsError,
};
pub use file::mode::{Mode, Threads, UnknownMode};
pub use file::open::OpenOptions;
pub use file::LockFile;
pub use guard::{ReadGuard, WriteGuard};
pub use into_span::IntoSpan;
pub use kind::Kind;
pub use owned::{OwnedReadGuard, OwnedWriteGuard};
pub use party::{Entered, Party};
pub use span::{Span, INDEX_END};
pub use stats::{Histogram, LockStats, OwnerStats, Scope, Stats, HIST_BUCKETS, SPAN_INDICES};
pub use wait::Wait;

/// Choose the signal that interrupts a timed or cancellable wait asleep in
/// the kernel (`F_SETLKW`, `flock(2)`; see `docs/DESIGN.md`): a real-time
/// signal number, or `None` for none, after which such waits poll (and the
/// kernel's deadlock detection no longer sees them). By default the first
/// such wait installs a do-nothing handler (without `SA_RESTART`) on
/// `SIGRTMIN + 7`, or on the signal the environment variable
/// `LOCKSFILE_WAKE_SIGNAL` names (`off` for none); a signal that already
/// has another handler is left alone (waits then poll).
///
/// # Errors
/// [`Error::Io`] when `signal` is not a real-time signal or already has a
/// handler that is not locksfile's.
pub fn set_wake_signal(signal: Option<i32>) -> Result<()> {
    sys::set_wake_signal(signal).map_err(|e| Error::io("set the wake signal", e))
}

/// The signal that interrupts timed and cancellable kernel waits, if any
/// (see [`set_wake_signal`]); looks it up and installs its handler on the
/// first call.
pub fn wake_signal() -> Option<i32> {
    sys::wake_signal()
}
