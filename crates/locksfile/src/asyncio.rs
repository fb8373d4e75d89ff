//! Waiting for locks from async code, on tokio (the `tokio` feature).
//!
//! A lock that is free is taken at once, on the calling task. Otherwise the
//! wait moves to tokio's blocking pool (`spawn_blocking`), where it runs as
//! timed waits ([`Wait::Deadline`]) of at most [`SLICE`] each, checking
//! between them a flag that dropping the future sets. So a dropped
//! (cancelled) future leaves no thread asleep in the kernel for more than
//! one slice, and a lock the pool thread gets after the drop is released at
//! once: nothing stays held. An untimed `F_SETLKW` could not be woken that
//! way, which is why even waits without a timeout go in slices.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::span::IntoSpan;
use crate::{Error, LockFile, ReadGuard, Wait, WriteGuard};

/// The longest a pool thread waits before it looks at the cancellation flag.
pub const SLICE: Duration = Duration::from_millis(50);

/// Sets the flag when the future that owns it is dropped, finished or not.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl LockFile {
    /// Wait for a shared lock on `span` without blocking the runtime: the
    /// async form of [`read`](Self::read) and [`read_for`](Self::read_for)
    /// (`timeout` of `None`: no limit). The guard owns a clone of the `Arc`.
    ///
    /// Dropping the future (cancelling it, or a `select!` that another
    /// branch won) ends the wait within [`SLICE`](crate::asyncio::SLICE),
    /// holding nothing. Needs a tokio runtime.
    ///
    /// # Errors
    /// [`Error::TimedOut`] when `timeout` passes; else as
    /// [`acquire`](Self::acquire).
    ///
    /// # Examples
    /// ```
    /// use std::sync::Arc;
    /// let dir = tempfile::tempdir()?;
    /// let lf = Arc::new(locksfile::LockFile::open(dir.path().join("data.lock"))?);
    /// let rt = tokio::runtime::Builder::new_current_thread().build()?;
    /// let g = rt.block_on(lf.read_async(0..4, None))?;
    /// drop(g);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn read_async(
        self: &Arc<Self>,
        span: impl IntoSpan + 'static,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<ReadGuard<Arc<LockFile>>, Error>> + Send + 'static {
        let lf = Arc::clone(self);
        let span = span.into_span();
        async move {
            let span = span?;
            wait_async(lf, timeout, move |lf, w| ReadGuard::acquire(lf, span, w)).await
        }
    }

    /// Wait for an exclusive lock on `span` without blocking the runtime:
    /// the async form of [`write`](Self::write) and
    /// [`write_for`](Self::write_for), as [`read_async`](Self::read_async).
    ///
    /// # Errors
    /// [`Error::TimedOut`] when `timeout` passes; else as
    /// [`acquire`](Self::acquire).
    pub fn write_async(
        self: &Arc<Self>,
        span: impl IntoSpan + 'static,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<WriteGuard<Arc<LockFile>>, Error>> + Send + 'static {
        let lf = Arc::clone(self);
        let span = span.into_span();
        async move {
            let span = span?;
            wait_async(lf, timeout, move |lf, w| WriteGuard::acquire(lf, span, w)).await
        }
    }
}

/// Try `take` at once; on contention run it on the blocking pool in slices
/// until granted, timed out, failed or cancelled (the future dropped).
async fn wait_async<G, F>(lf: Arc<LockFile>, timeout: Option<Duration>, take: F) -> Result<G, Error>
where
    F: Fn(Arc<LockFile>, Wait) -> Result<G, Error> + Send + 'static,
    G: Send + 'static,
{
    // `None`, or a deadline past what `Instant` holds: no limit.
    let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
    match take(Arc::clone(&lf), Wait::NonBlockingNoHolder) {
        Err(Error::WouldBlock { .. }) => {}
        other => return other,
    }
    if deadline.is_some_and(|d| Instant::now() >= d) {
        return Err(Error::TimedOut);
    }
    let cancelled = Arc::new(AtomicBool::new(false));
    let _cancel_on_drop = CancelOnDrop(Arc::clone(&cancelled));
    let waiting = tokio::task::spawn_blocking(move || loop {
        if cancelled.load(Ordering::Relaxed) {
            return Err(Error::Interrupted);
        }
        let now = Instant::now();
        let slice_end = match deadline {
            Some(d) if now >= d => return Err(Error::TimedOut),
            Some(d) => d.min(now + SLICE),
            None => now + SLICE,
        };
        match take(Arc::clone(&lf), Wait::Deadline(slice_end)) {
            Err(Error::TimedOut) | Err(Error::Interrupted) => {}
            // Got after the future went: nobody will take the guard, so
            // it goes here (were the flag set just after this check, the
            // guard would be dropped with the task's unclaimed output).
            Ok(_) if cancelled.load(Ordering::Relaxed) => return Err(Error::Interrupted),
            other => return other,
        }
    });
    match waiting.await {
        Ok(outcome) => outcome,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // The runtime is shutting down: the wait was ended, nothing held.
        Err(_) => Err(Error::Interrupted),
    }
}
