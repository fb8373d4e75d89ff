//! Lock engines: where "this owner holds this span at this kind" is made
//! true.
//!
//! The owner protocol (`owner.rs`) and the hold bookkeeping (`holds.rs`)
//! sit above the [`Engine`] trait and know nothing of how an engine keeps
//! its locks, in the spirit of `lock_api::RawRwLock`: a few required
//! operations on one owner's locks, and what the engine can do beyond
//! them told as [`Abilities`]. The engines: [`fcntl::Fcntl`] (record
//! locks, OFD or process-associated), `flock` (whole-file `flock(2)`),
//! `shm` (a table in shared memory) and `pg` (PostgreSQL advisory locks);
//! tests also run the protocol on [`fake::Fake`], a lock table in memory
//! that makes no system call.
//!
//! One wait, whatever the patience: [`Until`] carries an optional
//! deadline, whether a signal ends the wait, and an optional `Cancel` that
//! another thread (a dropped future, a cancelled asyncio task, `close()`)
//! fires. Each engine makes *one* wait of it from start to grant or
//! give-up, so its promises (a place in a fair queue, the kernel's or the
//! server's deadlock detection) hold for timed, interruptible and async
//! callers; nothing above cuts waits into slices. A sleeping engine leaves
//! a waker in the `Cancel` (taken back before it returns, under the mutex
//! `cancel()` holds). The `fcntl` and `flock` engines yield and retry
//! twice, then sleep in `F_SETLKW`/`flock`; for a deadline or a cancel
//! they arm a per-thread kernel timer (`timer_create` with
//! `SIGEV_THREAD_ID`) that sends a real-time *wake signal* whose handler
//! does nothing and has no `SA_RESTART`, so the sleep returns `EINTR` and
//! the wait looks at why, as `flock -w` does; the timer fires again every
//! 2 ms until the wait ends, so a signal landing just before the thread
//! enters the kernel cannot strand it. Polling instead would lose the
//! kernel's `EDEADLK` for every timed wait, and wake a waiter up to 1 ms
//! after a release where sleeping takes microseconds. The signal is
//! `SIGRTMIN + 7` (or `LOCKSFILE_WAKE_SIGNAL`, or `set_wake_signal`); one
//! that already has a handler is left alone, and timed kernel waits then
//! poll. The shm engine sleeps on its waiter's futex with the deadline and
//! keeps its ticket; a cancel bumps and wakes that word. The PostgreSQL
//! engine runs one statement with `lock_timeout` = the time left, ended by
//! the server's cancel request.
//!
//! What every engine must guarantee (the protocol relies on it):
//! - A refused or failed call changes nothing: the owner holds exactly
//!   what it held before, piece by piece.
//! - Lowering (to a weaker kind, or unlocking) is never refused and never
//!   blocks.
//! - Setting a span the owner partly holds converts it in place, and a
//!   raise that waits keeps what the owner already held meanwhile.
//! - An owner never conflicts with itself.

pub(crate) mod fcntl;
pub(crate) mod flock;
#[cfg(feature = "postgres")]
pub(crate) mod pg;
pub(crate) mod shm;

#[cfg(test)]
pub(crate) mod fake;

#[cfg(feature = "postgres")]
pub(crate) use pg::is_target as is_server_target;
/// Whether a shared-memory lock table of the file is in use, which
/// opening in another mode refuses.
pub(crate) use shm::table_in_use;

use std::time::{Duration, Instant};

/// Holds an owner's fast path keeps at once, each in a slot of its own
/// (`owner/fast.rs`): [`Engine::fast_take`]'s `slot` is below this.
pub(crate) const FAST_SLOTS: usize = 2;

use crate::cancel::Cancel;
use crate::error::{Error, Holder};
use crate::kind::Kind;
use crate::span::Span;

/// How long an interruptible wait that cannot be cut short by a signal
/// (behind a sibling thread, or polling) sleeps before it returns
/// [`Error::Interrupted`], so that its caller can look at signals.
pub(crate) const INTERRUPT_SLICE: Duration = Duration::from_millis(20);

/// How long [`Engine::wait_set`] may wait, and what else ends the wait.
/// Whatever its patience, an engine makes one wait of it, from start to
/// grant or give-up (one place in a queue, one `F_SETLKW`, one statement),
/// so that fair grants and deadlock detection hold for every caller.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Until<'a> {
    /// Give up at this instant ([`Error::TimedOut`]).
    pub deadline: Option<Instant>,
    /// A signal ends the wait ([`Error::Interrupted`]); else signals are
    /// waited through.
    pub interruptible: bool,
    /// Another thread may end the wait ([`Error::Cancelled`]).
    pub cancel: Option<&'a Cancel>,
}

impl<'a> Until<'a> {
    /// Until granted: no deadline, deaf to signals, not cancellable.
    #[cfg(test)]
    pub const FOREVER: Until<'static> = Until {
        deadline: None,
        interruptible: false,
        cancel: None,
    };

    /// Why the wait must end now, if it must: cancelled, or past its
    /// deadline. Engines ask before they sleep and whenever they wake.
    pub fn ended(&self) -> Option<Error> {
        if self.cancel.is_some_and(Cancel::is_cancelled) {
            return Some(Error::Cancelled);
        }
        if self.deadline.is_some_and(|t| Instant::now() >= t) {
            return Some(Error::TimedOut { at: None });
        }
        None
    }

    /// Why the wait must end after a signal woke it: as [`Until::ended`],
    /// else [`Error::Interrupted`] if signals end it.
    pub fn ended_by_signal(&self) -> Option<Error> {
        self.ended()
            .or_else(|| self.interruptible.then_some(Error::Interrupted))
    }

    /// How long the wait may still sleep: `None` for no limit.
    pub fn left(&self) -> Option<Duration> {
        self.deadline
            .map(|t| t.saturating_duration_since(Instant::now()))
    }
}

/// What a lock mode offers beyond mutual exclusion; see
/// [`LockFile::abilities`](crate::LockFile::abilities).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Abilities {
    /// A wait that would close a cycle of waiting owners fails with
    /// [`Error::Deadlock`] instead of waiting forever.
    pub detects_deadlocks: bool,
    /// Waiters are served in order: a stream of readers cannot starve a
    /// waiting writer.
    pub fair: bool,
    /// A holder that dies loses its locks, and its waiters get them.
    pub releases_on_death: bool,
}

/// One owner's locks in some lock table.
///
/// Methods take `&self` and may be called from several threads of the
/// owner at once: the protocol calls [`Engine::wait_set`] without holding
/// its own mutex, so that other threads can release meanwhile.
pub(crate) trait Engine: Send + Sync {
    /// Set `span` to `kind` for this owner (`None` unlocks) without
    /// waiting. `Ok(false)` when another owner is in the way; then nothing
    /// changed.
    fn try_set(&self, span: Span, kind: Option<Kind>) -> Result<bool, Error>;

    /// [`Engine::try_set`] raising `span` to `kind`, for a caller that
    /// follows a refusal with [`Engine::wait_set`]: the engine may leave
    /// work to the wait that the wait does anyway (the shared-memory
    /// engine leaves the check that the owner in the way is alive).
    fn try_set_before_wait(&self, span: Span, kind: Kind) -> Result<bool, Error> {
        self.try_set(span, Some(kind))
    }

    /// Raise `span` to `kind`, waiting as `until` says. On any error
    /// nothing changed.
    fn wait_set(&self, span: Span, kind: Kind, until: Until<'_>) -> Result<(), Error>;

    /// Raise every one of `pieces` to `kind` at once, waiting as `until`
    /// says, so the owner never holds part of them while it waits; on any
    /// error nothing changed. `None`: the engine cannot, and the protocol
    /// waits piece by piece with [`Engine::wait_set`].
    fn wait_set_all(
        &self,
        pieces: &[Span],
        kind: Kind,
        until: Until<'_>,
    ) -> Option<Result<(), Error>> {
        let _ = (pieces, kind, until);
        None
    }

    /// The first lock of another owner in the way of `kind` on `span`.
    fn probe(&self, span: Span, kind: Kind) -> Result<Option<Holder>, Error>;

    /// Whether exclusive locks can be had at all (not through a file that
    /// could only be opened read-only).
    fn writable(&self) -> bool;

    /// What the engine offers beyond the required operations.
    fn abilities(&self) -> Abilities;

    /// Refuse, before anything is tried, a span this engine can never
    /// take (`locks`: the change takes locks; else it releases or looks).
    fn check_span(&self, span: Span, locks: bool) -> Result<(), Error> {
        let _ = (span, locks);
        Ok(())
    }

    /// Why the owner's locks are gone while its guards live, if they are
    /// (a lost server session, a lost conversion): new locks are refused
    /// with it.
    fn locks_lost(&self) -> Option<Error> {
        None
    }

    /// Whether the owner's server session is lost, and every lock with it.
    fn session_lost(&self) -> bool {
        false
    }

    /// The server target without its password, for an engine that keeps
    /// its locks on a server rather than for a file.
    fn target(&self) -> Option<&str> {
        None
    }

    /// The table-wide statistics of an engine that keeps them for every
    /// owner of its table (`stats.rs`); `None`: the owner keeps its own.
    fn shared_stats(&self) -> Option<&dyn crate::stats::Shared> {
        None
    }

    /// Whether the engine has a fast lane: one index taken and let go
    /// with a few atomic instructions ([`Engine::fast_take`],
    /// [`Engine::fast_release`]), which the owner's own fast path
    /// (`owner/fast.rs`) then uses for its lone holds.
    fn fast_lane(&self) -> bool {
        false
    }

    /// Raise the one index `span` to `kind` on the fast lane, for an
    /// owner that holds nothing else there; `false`: not granted this way
    /// (the caller goes the usual way, [`Engine::try_set`], which also
    /// finds whatever the engine made of a word it took away meanwhile).
    /// Only called when [`Engine::fast_lane`] says so, for slot `slot` of
    /// the owner's fast path (`owner/fast.rs`): one call at a time per
    /// slot, and while no call of the owner but the fast path's runs (F1,
    /// F4); the hold it takes goes only by [`Engine::fast_release`] or
    /// [`Engine::fast_take_over`].
    #[inline(always)]
    fn fast_take(&self, span: Span, kind: Kind, slot: usize) -> bool {
        let _ = (span, kind, slot);
        false
    }

    /// Let go of the one index `span` held on the fast lane; `false`: it
    /// is not held that way (anymore), and nothing changed.
    #[inline(always)]
    fn fast_release(&self, span: Span) -> bool {
        let _ = span;
        false
    }

    /// Make the owner's hold of the one index `span` at `kind`, taken by
    /// [`Engine::fast_take`], one that [`Engine::fast_release`] no longer
    /// lets go: `Ok(true)` when the owner still holds it (from now on the
    /// usual way), `Ok(false)` when it was let go already (a
    /// `fast_release` made meanwhile). On an error nothing changed.
    fn fast_take_over(&self, span: Span, kind: Kind) -> Result<bool, Error> {
        let _ = (span, kind);
        Ok(true)
    }

    /// Drop every lock of this owner, which is going away.
    fn unlock_all(&self) -> Result<(), Error> {
        self.try_set(Span::ALL, None).map(drop)
    }
}
