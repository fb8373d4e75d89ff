//! Guards that own their handle: [`LockFile::read_owned`] and friends, as
//! tokio's `RwLock::read_owned`.
//!
//! A guard borrowed from a `LockFile` cannot sit in a struct beside the
//! `Arc<LockFile>` it came from; one that holds its own clone of the `Arc`
//! can, and can be moved to another thread or returned from a function.
//! The guards are the same types ([`ReadGuard`] and [`WriteGuard`] over
//! `Arc<LockFile>`), so everything a borrowed guard does, an owned one does.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::into_span::IntoSpan;
use crate::{Error, LockFile, ReadGuard, Wait, WriteGuard};

/// A shared lock that owns a clone of its handle's `Arc`
/// ([`LockFile::read_owned`]).
pub type OwnedReadGuard = ReadGuard<Arc<LockFile>>;

/// An exclusive lock that owns a clone of its handle's `Arc`
/// ([`LockFile::write_owned`]).
pub type OwnedWriteGuard = WriteGuard<Arc<LockFile>>;

impl LockFile {
    /// As [`read`](Self::read), and the guard owns a clone of the `Arc`.
    ///
    /// # Errors
    /// As [`acquire`](Self::acquire).
    ///
    /// # Examples
    /// ```
    /// use std::sync::Arc;
    /// use locksfile::{LockFile, OwnedWriteGuard};
    ///
    /// struct Table {
    ///     lock: Arc<LockFile>,
    ///     row: OwnedWriteGuard, // beside the handle, no borrow
    /// }
    ///
    /// let dir = tempfile::tempdir()?;
    /// let lock = Arc::new(LockFile::open(dir.path().join("data.lock"))?);
    /// let row = lock.write_owned(7)?;
    /// let t = Table { lock, row };
    /// std::thread::spawn(move || drop(t)).join().unwrap();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn read_owned(self: &Arc<Self>, span: impl IntoSpan) -> Result<OwnedReadGuard, Error> {
        ReadGuard::acquire(Arc::clone(self), span, Wait::Blocking)
    }

    /// As [`write`](Self::write), and the guard owns a clone of the `Arc`.
    ///
    /// # Errors
    /// As [`acquire`](Self::acquire).
    pub fn write_owned(self: &Arc<Self>, span: impl IntoSpan) -> Result<OwnedWriteGuard, Error> {
        WriteGuard::acquire(Arc::clone(self), span, Wait::Blocking)
    }

    /// As [`try_read`](Self::try_read), and the guard owns a clone of the `Arc`.
    ///
    /// # Errors
    /// [`Error::WouldBlock`] on conflict; else as [`acquire`](Self::acquire).
    pub fn try_read_owned(self: &Arc<Self>, span: impl IntoSpan) -> Result<OwnedReadGuard, Error> {
        ReadGuard::acquire(Arc::clone(self), span, Wait::NonBlocking)
    }

    /// As [`try_write`](Self::try_write), and the guard owns a clone of the `Arc`.
    ///
    /// # Errors
    /// [`Error::WouldBlock`] on conflict; else as [`acquire`](Self::acquire).
    pub fn try_write_owned(
        self: &Arc<Self>,
        span: impl IntoSpan,
    ) -> Result<OwnedWriteGuard, Error> {
        WriteGuard::acquire(Arc::clone(self), span, Wait::NonBlocking)
    }

    /// As [`read_for`](Self::read_for), and the guard owns a clone of the `Arc`.
    ///
    /// # Errors
    /// [`Error::TimedOut`]; else as [`acquire`](Self::acquire).
    pub fn read_for_owned(
        self: &Arc<Self>,
        span: impl IntoSpan,
        timeout: Duration,
    ) -> Result<OwnedReadGuard, Error> {
        ReadGuard::acquire(Arc::clone(self), span, Wait::Timeout(timeout))
    }

    /// As [`write_for`](Self::write_for), and the guard owns a clone of the `Arc`.
    ///
    /// # Errors
    /// [`Error::TimedOut`]; else as [`acquire`](Self::acquire).
    pub fn write_for_owned(
        self: &Arc<Self>,
        span: impl IntoSpan,
        timeout: Duration,
    ) -> Result<OwnedWriteGuard, Error> {
        WriteGuard::acquire(Arc::clone(self), span, Wait::Timeout(timeout))
    }

    /// As [`read_until`](Self::read_until), and the guard owns a clone of the `Arc`.
    ///
    /// # Errors
    /// [`Error::TimedOut`]; else as [`acquire`](Self::acquire).
    pub fn read_until_owned(
        self: &Arc<Self>,
        span: impl IntoSpan,
        deadline: Instant,
    ) -> Result<OwnedReadGuard, Error> {
        ReadGuard::acquire(Arc::clone(self), span, Wait::Deadline(deadline))
    }

    /// As [`write_until`](Self::write_until), and the guard owns a clone of the `Arc`.
    ///
    /// # Errors
    /// [`Error::TimedOut`]; else as [`acquire`](Self::acquire).
    pub fn write_until_owned(
        self: &Arc<Self>,
        span: impl IntoSpan,
        deadline: Instant,
    ) -> Result<OwnedWriteGuard, Error> {
        WriteGuard::acquire(Arc::clone(self), span, Wait::Deadline(deadline))
    }
}
