//! Ending a wait from another thread or task.
//!
//! A [`Cancel`] is handed to a waiting call; [`Cancel::cancel`] from any
//! thread ends that wait with [`Error::Cancelled`](crate::Error::Cancelled),
//! holding nothing. The wait stays one wait for its engine (its place in a
//! fair queue, the kernel's or the server's deadlock detection) until then:
//! nothing is cut into slices. While it sleeps, the engine leaves a *waker*
//! here that reaches it where it sleeps (a futex word, a timer that
//! interrupts the thread's `F_SETLKW`, the server's cancel request), and
//! takes it back before it returns, under the same mutex that `cancel`
//! calls it under, so a waker never outlives what it points at.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// A waker an engine leaves while it sleeps.
pub(crate) type Waker = Box<dyn Fn() + Send>;

/// Ends a wait from another thread: see [`LockFile::acquire_cancellable`]
/// (crate::LockFile::acquire_cancellable). Clones share one state; once
/// cancelled it stays cancelled (a new wait needs a new `Cancel`).
///
/// ```
/// use locksfile::{Cancel, Error, Kind, LockFile, Wait};
/// let dir = tempfile::tempdir()?;
/// let a = LockFile::open(dir.path().join("data.lock"))?;
/// let b = LockFile::open(dir.path().join("data.lock"))?;
/// let _held = a.write(0)?;
/// let cancel = Cancel::new();
/// let c = cancel.clone();
/// std::thread::scope(|s| {
///     let waiter = s.spawn(|| b.acquire_cancellable(Kind::Exclusive, 0, Wait::Blocking, &c));
///     cancel.cancel();
///     assert!(matches!(waiter.join().unwrap(), Err(Error::Cancelled)));
/// });
/// assert!(b.held().is_empty());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Default)]
pub struct Cancel(Arc<Inner>);

#[derive(Default)]
struct Inner {
    cancelled: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl fmt::Debug for Cancel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cancel")
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

impl Cancel {
    /// A new, not yet cancelled token.
    pub fn new() -> Cancel {
        Cancel::default()
    }

    /// End the wait that uses this token (now, or as soon as it starts),
    /// from any thread. Returns at once; the waiting call then returns
    /// [`Error::Cancelled`](crate::Error::Cancelled) with nothing taken,
    /// unless the lock was granted first.
    pub fn cancel(&self) {
        self.0.cancelled.store(true, Ordering::SeqCst);
        if let Some(wake) = self.waker().as_ref() {
            wake();
        }
    }

    /// Whether [`cancel`](Self::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(Ordering::SeqCst)
    }

    fn waker(&self) -> MutexGuard<'_, Option<Waker>> {
        self.0.waker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Leave `wake` for [`cancel`](Self::cancel) to call until the returned
    /// value is dropped. Check [`is_cancelled`](Self::is_cancelled) after
    /// arming and before sleeping: a cancel that came before the arming
    /// called nothing.
    pub(crate) fn arm(&self, wake: Waker) -> Armed<'_> {
        *self.waker() = Some(wake);
        Armed(self)
    }
}

/// Takes the waker back when dropped (under the mutex `cancel` holds while
/// it calls it).
pub(crate) struct Armed<'a>(&'a Cancel);

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        *self.0.waker() = None;
    }
}
