//! Scoped locks: a guard holds its span until it is dropped or unlocked.
//!
//! Guards are generic over how they reach the [`LockFile`]: `&LockFile`
//! for the usual scoped use, `Arc<LockFile>` (or any other smart pointer)
//! for a guard that must outlive the borrow, as bindings need.

use std::fmt;
use std::ops::Deref;
use std::time::{Duration, Instant};

use crate::cancel::Cancel;
use crate::error::Error;
use crate::file::LockFile;
use crate::holds::Change;
use crate::into_span::IntoSpan;
use crate::kind::Kind;
use crate::party::Party;
use crate::span::Span;
use crate::wait::Wait;

/// The part both guards share: a hold of one kind on one span.
struct Hold<H: Deref<Target = LockFile>> {
    /// `None` once the hold was handed on or released.
    handle: Option<H>,
    span: Span,
    kind: Kind,
    /// Who it was taken for: the taking thread's party, wherever the
    /// guard goes since.
    party: Party,
}

/// A guard's change the usual way. Out of line and not generic, so that
/// the fast path around it (`LockFile::fast_take`) stays small enough to
/// be inlined where a guard is taken, and the guard comes back in
/// registers rather than through memory.
#[inline(never)]
fn change(
    lf: &LockFile,
    change: Change,
    wait: Wait,
    cancel: Option<&Cancel>,
    party: Party,
) -> Result<(), Error> {
    lf.change_or_cancel(change, wait, cancel, party)
}

impl<H: Deref<Target = LockFile>> Hold<H> {
    #[inline(always)]
    fn acquire(
        handle: H,
        span: impl IntoSpan,
        kind: Kind,
        wait: Wait,
        cancel: Option<&Cancel>,
    ) -> Result<Self, Error> {
        let span = span.into_span()?;
        let party = handle.party();
        if !handle.fast_take(span, kind, 0, party) {
            change(
                &handle,
                Change::Guard {
                    span,
                    from: None,
                    to: Some(kind),
                },
                wait,
                cancel,
                party,
            )?;
        }
        Ok(Hold {
            handle: Some(handle),
            span,
            kind,
            party,
        })
    }

    fn lockfile(&self) -> &LockFile {
        self.handle.as_deref().expect("a live guard has a handle")
    }

    /// Move to `to`; on failure the hold is unchanged.
    fn convert(&mut self, to: Kind, wait: Wait, cancel: Option<&Cancel>) -> Result<(), Error> {
        self.lockfile().change_or_cancel(
            Change::Guard {
                span: self.span,
                from: Some(self.kind),
                to: Some(to),
            },
            wait,
            cancel,
            self.party,
        )?;
        self.kind = to;
        Ok(())
    }

    /// The same hold at `kind`, handed on to another guard.
    fn into_kind(mut self, kind: Kind) -> Hold<H> {
        Hold {
            handle: self.handle.take(),
            span: self.span,
            kind,
            party: self.party,
        }
    }

    #[inline]
    fn release(&mut self) -> Result<(), Error> {
        match self.handle.take() {
            Some(h) if h.fast_release(self.span, Some(self.kind), 0, self.party) => Ok(()),
            Some(h) => change(
                &h,
                Change::Guard {
                    span: self.span,
                    from: Some(self.kind),
                    to: None,
                },
                Wait::NonBlocking,
                None,
                self.party,
            ),
            None => Ok(()),
        }
    }
}

impl<H: Deref<Target = LockFile>> Drop for Hold<H> {
    // Inline, so that dropping a guard calls the unlock directly: returns
    // made right after a system call measured costly on x86-64 (see
    // `sys::fcntl_lock_now`), so one level less saves more than its
    // instructions.
    #[inline]
    fn drop(&mut self) {
        // Only ever lowers, so it cannot block; `unlock` reports failures.
        let _ = self.release();
    }
}

/// A shared (read) lock on a span, held until dropped.
#[must_use = "if unused the lock is released at once"]
pub struct ReadGuard<H: Deref<Target = LockFile>> {
    hold: Hold<H>,
}

/// An exclusive (write) lock on a span, held until dropped.
#[must_use = "if unused the lock is released at once"]
pub struct WriteGuard<H: Deref<Target = LockFile>> {
    hold: Hold<H>,
}

impl<H: Deref<Target = LockFile>> ReadGuard<H> {
    /// Take a shared lock on `span` through `handle`, waiting as `wait` says.
    /// [`LockFile::read`] and friends call self with `&LockFile`; call it
    /// with an `Arc<LockFile>` for a guard that owns its handle.
    ///
    /// # Errors
    /// As [`LockFile::acquire`].
    #[inline]
    pub fn acquire(handle: H, span: impl IntoSpan, wait: Wait) -> Result<Self, Error> {
        Hold::acquire(handle, span, Kind::Shared, wait, None).map(|hold| ReadGuard { hold })
    }

    /// As [`ReadGuard::acquire`], and [`Cancel::cancel`] from another
    /// thread ends the wait with [`Error::Cancelled`], holding nothing.
    ///
    /// # Errors
    /// As [`LockFile::acquire`], and [`Error::Cancelled`].
    pub fn acquire_cancellable(
        handle: H,
        span: impl IntoSpan,
        wait: Wait,
        cancel: &Cancel,
    ) -> Result<Self, Error> {
        Hold::acquire(handle, span, Kind::Shared, wait, Some(cancel)).map(|hold| ReadGuard { hold })
    }

    /// The span held.
    pub fn span(&self) -> Span {
        self.hold.span
    }

    /// Whether the lock is still held: `false` once the PostgreSQL session
    /// that held it is lost ([`LockFile::lost`]), whose locks the server
    /// then gave to others, or once a [`Mode::Flock`](crate::Mode::Flock)
    /// conversion of its owner was lost ([`Error::ConversionLost`]). Always
    /// `true` in the other modes, where a live guard's lock cannot be taken
    /// away.
    pub fn is_held(&self) -> bool {
        !self.hold.lockfile().locks_lost()
    }

    /// Convert to an exclusive lock in place, waiting for other readers.
    /// The shared lock is kept while waiting (Linux converts atomically).
    ///
    /// # Errors
    /// As [`LockFile::acquire`]; the read guard comes back with the error.
    ///
    /// # Deadlocks
    /// Two owners that both hold a shared lock on the same span and both
    /// upgrade wait for each other: each keeps its shared lock while it
    /// waits, so neither can be granted. In process mode the kernel sees
    /// the cycle and one of them gets [`Error::Deadlock`]; in OFD mode the
    /// kernel detects no deadlocks, and a [`Wait::Blocking`] upgrade on
    /// both sides waits forever. Upgrade with a timeout
    /// ([`ReadGuard::upgrade_with`] and [`Wait::Timeout`]) and, on
    /// [`Error::TimedOut`], drop the read guard and start again, or take
    /// the exclusive lock from the start when you may write.
    /// The same holds for any two owners that each wait for a lock the
    /// other holds (explicit [`LockFile::acquire`] calls included).
    pub fn upgrade(self) -> Result<WriteGuard<H>, (Self, Error)> {
        Self::upgrade_with(self, Wait::Blocking)
    }

    /// Convert to an exclusive lock if no one else holds the span.
    ///
    /// # Errors
    /// Gives the read guard back when another owner is in the way. In
    /// [`Mode::Flock`](crate::Mode::Flock) a refused conversion can lose
    /// the shared lock too ([`Error::ConversionLost`], which this form
    /// cannot report): the guard's [`is_held`](Self::is_held) says so, and
    /// [`upgrade_with`](Self::upgrade_with) returns the error.
    pub fn try_upgrade(self) -> Result<WriteGuard<H>, Self> {
        Self::upgrade_with(self, Wait::NonBlockingNoHolder).map_err(|(g, _)| g)
    }

    /// Convert to an exclusive lock, waiting as `wait` says.
    ///
    /// # Errors
    /// As [`LockFile::acquire`]; the read guard comes back with the error.
    ///
    /// # Deadlocks
    /// See [`ReadGuard::upgrade`]: in OFD mode two owners upgrading the
    /// same span wait forever unless `wait` is timed.
    pub fn upgrade_with(self, wait: Wait) -> Result<WriteGuard<H>, (Self, Error)> {
        self.upgrade_or_cancel(wait, None)
    }

    /// As [`ReadGuard::upgrade_with`], and [`Cancel::cancel`] from another
    /// thread ends the wait with [`Error::Cancelled`] (the read guard comes
    /// back, still held).
    ///
    /// # Errors
    /// As [`ReadGuard::upgrade_with`], and [`Error::Cancelled`].
    pub fn upgrade_cancellable(
        self,
        wait: Wait,
        cancel: &Cancel,
    ) -> Result<WriteGuard<H>, (Self, Error)> {
        self.upgrade_or_cancel(wait, Some(cancel))
    }

    fn upgrade_or_cancel(
        mut self,
        wait: Wait,
        cancel: Option<&Cancel>,
    ) -> Result<WriteGuard<H>, (Self, Error)> {
        match self.hold.convert(Kind::Exclusive, wait, cancel) {
            Ok(()) => Ok(WriteGuard {
                hold: self.hold.into_kind(Kind::Exclusive),
            }),
            Err(e) => Err((self, e)),
        }
    }

    /// Release now, reporting what `Drop` cannot.
    ///
    /// # Errors
    /// A failed unlock call.
    pub fn unlock(mut self) -> Result<(), Error> {
        self.hold.release()
    }
}

impl<H: Deref<Target = LockFile>> WriteGuard<H> {
    /// Take an exclusive lock on `span` through `handle`, waiting as `wait` says.
    ///
    /// # Errors
    /// As [`LockFile::acquire`].
    #[inline]
    pub fn acquire(handle: H, span: impl IntoSpan, wait: Wait) -> Result<Self, Error> {
        Hold::acquire(handle, span, Kind::Exclusive, wait, None).map(|hold| WriteGuard { hold })
    }

    /// As [`WriteGuard::acquire`], and [`Cancel::cancel`] from another
    /// thread ends the wait with [`Error::Cancelled`], holding nothing.
    ///
    /// # Errors
    /// As [`LockFile::acquire`], and [`Error::Cancelled`].
    pub fn acquire_cancellable(
        handle: H,
        span: impl IntoSpan,
        wait: Wait,
        cancel: &Cancel,
    ) -> Result<Self, Error> {
        Hold::acquire(handle, span, Kind::Exclusive, wait, Some(cancel))
            .map(|hold| WriteGuard { hold })
    }

    /// The span held.
    pub fn span(&self) -> Span {
        self.hold.span
    }

    /// Whether the lock is still held: `false` once the PostgreSQL session
    /// that held it is lost ([`LockFile::lost`]), whose locks the server
    /// then gave to others, or once a [`Mode::Flock`](crate::Mode::Flock)
    /// conversion of its owner was lost ([`Error::ConversionLost`]). Always
    /// `true` in the other modes, where a live guard's lock cannot be taken
    /// away.
    pub fn is_held(&self) -> bool {
        !self.hold.lockfile().locks_lost()
    }

    /// Convert to a shared lock in place. Never blocks: a lock only gets weaker.
    pub fn downgrade(mut self) -> ReadGuard<H> {
        // Lowering cannot meet contention; a failed call leaves the kernel
        // holding the stronger lock, which is still a correct read lock.
        match self.hold.convert(Kind::Shared, Wait::NonBlocking, None) {
            // In a forked child nothing changed, so the hold keeps its kind.
            Ok(()) | Err(Error::Forked) => {}
            // The bookkeeping moved even though the kernel call failed.
            Err(_) => self.hold.kind = Kind::Shared,
        }
        let kind = self.hold.kind;
        ReadGuard {
            hold: self.hold.into_kind(kind),
        }
    }

    /// Release now, reporting what `Drop` cannot.
    ///
    /// # Errors
    /// A failed unlock call.
    pub fn unlock(mut self) -> Result<(), Error> {
        self.hold.release()
    }
}

impl<H: Deref<Target = LockFile>> fmt::Debug for ReadGuard<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReadGuard({})", self.hold.span)
    }
}

impl<H: Deref<Target = LockFile>> fmt::Debug for WriteGuard<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WriteGuard({})", self.hold.span)
    }
}

/// Scoped locks: a guard that releases when it drops.
impl LockFile {
    /// Wait for a shared lock on `span`; released when the guard drops.
    ///
    /// # Errors
    /// As [`acquire`](Self::acquire).
    #[inline]
    pub fn read(&self, span: impl IntoSpan) -> Result<ReadGuard<&Self>, Error> {
        ReadGuard::acquire(self, span, Wait::Blocking)
    }

    /// Wait for an exclusive lock on `span`; released when the guard drops.
    ///
    /// # Errors
    /// As [`acquire`](Self::acquire).
    #[inline]
    pub fn write(&self, span: impl IntoSpan) -> Result<WriteGuard<&Self>, Error> {
        WriteGuard::acquire(self, span, Wait::Blocking)
    }

    /// A shared lock on `span` if no one is in the way.
    ///
    /// # Errors
    /// [`Error::WouldBlock`] on conflict; else as [`acquire`](Self::acquire).
    #[inline]
    pub fn try_read(&self, span: impl IntoSpan) -> Result<ReadGuard<&Self>, Error> {
        ReadGuard::acquire(self, span, Wait::NonBlocking)
    }

    /// An exclusive lock on `span` if no one is in the way.
    ///
    /// # Errors
    /// [`Error::WouldBlock`] on conflict; else as [`acquire`](Self::acquire).
    #[inline]
    pub fn try_write(&self, span: impl IntoSpan) -> Result<WriteGuard<&Self>, Error> {
        WriteGuard::acquire(self, span, Wait::NonBlocking)
    }

    /// A shared lock on `span`, waiting at most `timeout`.
    ///
    /// # Errors
    /// [`Error::TimedOut`]; else as [`acquire`](Self::acquire).
    #[inline]
    pub fn read_for(
        &self,
        span: impl IntoSpan,
        timeout: Duration,
    ) -> Result<ReadGuard<&Self>, Error> {
        ReadGuard::acquire(self, span, Wait::Timeout(timeout))
    }

    /// An exclusive lock on `span`, waiting at most `timeout`.
    ///
    /// # Errors
    /// [`Error::TimedOut`]; else as [`acquire`](Self::acquire).
    #[inline]
    pub fn write_for(
        &self,
        span: impl IntoSpan,
        timeout: Duration,
    ) -> Result<WriteGuard<&Self>, Error> {
        WriteGuard::acquire(self, span, Wait::Timeout(timeout))
    }

    /// A shared lock on `span`, waiting until `deadline` at the latest.
    ///
    /// # Errors
    /// [`Error::TimedOut`]; else as [`acquire`](Self::acquire).
    #[inline]
    pub fn read_until(
        &self,
        span: impl IntoSpan,
        deadline: Instant,
    ) -> Result<ReadGuard<&Self>, Error> {
        ReadGuard::acquire(self, span, Wait::Deadline(deadline))
    }

    /// An exclusive lock on `span`, waiting until `deadline` at the latest.
    ///
    /// # Errors
    /// [`Error::TimedOut`]; else as [`acquire`](Self::acquire).
    #[inline]
    pub fn write_until(
        &self,
        span: impl IntoSpan,
        deadline: Instant,
    ) -> Result<WriteGuard<&Self>, Error> {
        WriteGuard::acquire(self, span, Wait::Deadline(deadline))
    }
}
