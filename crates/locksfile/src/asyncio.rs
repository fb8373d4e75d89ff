//! Waiting for locks from async code, on tokio (the `tokio` feature).
//!
//! A lock that is free is taken at once, on the calling task. Otherwise the
//! wait moves to tokio's blocking pool (`spawn_blocking`), where it is one
//! wait for the engine (its place in a fair queue, the kernel's or the
//! server's deadlock detection), timed or not, with a [`Cancel`] that
//! dropping the future cancels: the engine is woken where it sleeps (a
//! futex, a timer signal that interrupts `F_SETLKW`, the server's cancel
//! request), so no thread stays asleep in the kernel, and a lock the pool
//! thread gets after the drop is released at once: nothing stays held.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::into_span::IntoSpan;
use crate::{Cancel, Error, LockFile, Party, ReadGuard, Threads, Wait, WriteGuard};

/// Cancels the wait when the future that owns it is dropped, finished or not.
struct CancelOnDrop(Cancel);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

impl LockFile {
    /// Wait for a shared lock on `span` without blocking the runtime: the
    /// async form of [`read`](Self::read) and [`read_for`](Self::read_for)
    /// (`timeout` of `None`: no limit). The guard owns a clone of the `Arc`.
    ///
    /// Dropping the future (cancelling it, or a `select!` that another
    /// branch won) ends the wait at once, holding nothing. Needs a tokio
    /// runtime.
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
            wait_async(lf, timeout, move |lf, w, c| {
                ReadGuard::acquire_cancellable(lf, span, w, c)
            })
            .await
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
            wait_async(lf, timeout, move |lf, w, c| {
                WriteGuard::acquire_cancellable(lf, span, w, c)
            })
            .await
        }
    }
}

/// Try `take` at once; on contention run it on the blocking pool as one
/// wait until granted, timed out, failed or cancelled (the future dropped).
async fn wait_async<G, F>(lf: Arc<LockFile>, timeout: Option<Duration>, take: F) -> Result<G, Error>
where
    F: Fn(Arc<LockFile>, Wait, &Cancel) -> Result<G, Error> + Send + 'static,
    G: Send + 'static,
{
    // `None`, or a deadline past what `Instant` holds: no limit.
    let wait = match timeout.and_then(|t| Instant::now().checked_add(t)) {
        Some(deadline) => Wait::Deadline(deadline),
        None => Wait::Blocking,
    };
    let cancel = Cancel::new();
    // Each take is a party of its own, as a task moves between threads
    // and a thread runs many tasks: async guards exclude each other, as
    // tokio's `RwLock` guards do, and do not compose.
    let party = match lf.threads() {
        Threads::Exclude => Some(Party::new()),
        Threads::Share => None,
    };
    let as_party = || party.map(Party::enter);
    let first = {
        let _as = as_party();
        take(Arc::clone(&lf), Wait::NonBlockingNoHolder, &cancel)
    };
    let refused = match first {
        Err(e @ Error::WouldBlock { .. }) => e,
        other => return other,
    };
    if matches!(wait, Wait::Deadline(d) if Instant::now() >= d) {
        return Err(refused.into_timed_out());
    }
    let _cancel_on_drop = CancelOnDrop(cancel.clone());
    let waiting = tokio::task::spawn_blocking(move || {
        let _as = party.map(Party::enter);
        match take(lf, wait, &cancel) {
            // Got after the future went: nobody will take the guard, so
            // it goes here (were the future dropped just after this check,
            // the guard would be dropped with the task's unclaimed output).
            Ok(_) if cancel.is_cancelled() => Err(Error::Cancelled),
            other => other,
        }
    });
    match waiting.await {
        Ok(outcome) => outcome,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // The runtime is shutting down: the wait was ended, nothing held.
        Err(_) => Err(Error::Cancelled),
    }
}
