//! How long a call waits for a lock another owner holds.

use std::time::{Duration, Instant};

#[cfg(doc)]
use crate::error::Error;

/// How long to wait for a lock another owner holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Do not wait: fail with [`Error::WouldBlock`], naming the holder
    /// (one more `F_GETLK` call on contention).
    NonBlocking,
    /// Do not wait, and do not look up the holder: `WouldBlock { holder:
    /// None }`. For callers that go on to wait anyway.
    NonBlockingNoHolder,
    /// Sleep in the kernel (`F_SETLKW`) until granted; signals are retried.
    /// In process mode the kernel may answer [`Error::Deadlock`].
    Blocking,
    /// As `Blocking`, but a signal ends the wait with [`Error::Interrupted`]
    /// (nothing held) so the caller can run its handlers and decide. While
    /// it waits behind another thread of the same owner (which no signal
    /// can cut short) it also returns `Interrupted` every 20 ms, so callers
    /// call again in a loop.
    BlockingInterruptible,
    /// Wait at most this long, then fail with [`Error::TimedOut`]. A
    /// timeout that ends past what [`Instant`] can hold (`Duration::MAX`)
    /// sets no limit: it waits as [`Wait::Blocking`] does.
    Timeout(Duration),
    /// Wait until this instant at the latest, then fail with [`Error::TimedOut`].
    Deadline(Instant),
    /// As `Deadline`, but a signal ends the wait with [`Error::Interrupted`]
    /// (nothing held), as `BlockingInterruptible` does.
    DeadlineInterruptible(Instant),
}

impl Wait {
    /// `Blocking` when `block`, else `NonBlocking` (the original's `blocking=`).
    pub fn from_blocking(block: bool) -> Wait {
        if block {
            Wait::Blocking
        } else {
            Wait::NonBlocking
        }
    }
}
