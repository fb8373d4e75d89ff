//! Waiting for locks without holding the GIL, and without deafness to Ctrl-C.
//!
//! Every wait first tries once with the GIL held (an uncontended lock costs
//! one system call and no GIL hand-over). When that meets contention the
//! wait goes on with the GIL released, as one wait for the engine whatever
//! its patience (`Wait::BlockingInterruptible`, or
//! `Wait::DeadlineInterruptible` for a timeout), so that fair queueing and
//! deadlock detection hold for it. A signal ends that wait with
//! `Error::Interrupted` (nothing held): Python's handlers run
//! (`KeyboardInterrupt` propagates) and only then does it wait again, for
//! the time left. A wait that had to wait is registered with a [`Waits`]
//! (its `LocksFile`'s, or its guard's), whose [`Waits::cancel_all`] ends it
//! at once (`Error::Cancelled`): that is how `close()` and a guard's release
//! reach a thread asleep in the engine.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use locksfile::{Cancel, Error, Wait};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// How long to wait, as the Python caller said it.
#[derive(Clone, Copy, Debug)]
pub enum Patience {
    /// Do not wait.
    Never,
    /// Wait as long as it takes.
    Forever,
    /// Wait until this instant at the latest.
    Until(Instant),
}

impl Patience {
    /// From `blocking=` and `timeout=` (seconds; `None` for no limit).
    /// `blocking=False` does not wait, whatever the timeout (as filelock
    /// does: the timeout is then not even looked at).
    pub fn from_args(blocking: bool, timeout: Option<f64>) -> PyResult<Patience> {
        if !blocking {
            return Ok(Patience::Never);
        }
        match timeout {
            None => Ok(Patience::Forever),
            Some(t) if t.is_nan() || t < 0.0 => Err(PyValueError::new_err(format!(
                "timeout must be a non-negative number of seconds, got {t}"
            ))),
            Some(0.0) => Ok(Patience::Never),
            Some(t) => match Duration::try_from_secs_f64(t)
                .ok()
                .and_then(|d| Instant::now().checked_add(d))
            {
                Some(deadline) => Ok(Patience::Until(deadline)),
                // Past what the clock can hold (`1e19`, `inf`): no limit,
                // not a deadline that has already passed.
                None => Ok(Patience::Forever),
            },
        }
    }
}

/// The waits in progress that one event must end: those of a `LocksFile`
/// (ended by `close()`) or of a guard (its upgrade, ended by its release).
/// A wait registers only once its first try failed, so an uncontended call
/// never touches it.
#[derive(Default)]
pub struct Waits {
    live: Mutex<Live>,
    /// How many waits are registered (changed under `live`'s lock), so
    /// that ending none, the common case of every guard's release, costs
    /// a load. A wait registers, then checks the event's state under a
    /// lock the event's side takes before calling `cancel_all`: either it
    /// sees the event, or the event's side sees it counted.
    count: AtomicUsize,
}

#[derive(Default)]
struct Live {
    next: u64,
    cancels: Vec<(u64, Cancel)>,
}

impl Waits {
    fn live(&self) -> MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Register `cancel` until the returned value is dropped. Check the
    /// event's state (closed, released) after this and before waiting: an
    /// event that came before the registration cancelled nothing.
    pub fn enter(&self, cancel: Cancel) -> Entered<'_> {
        let mut live = self.live();
        let id = live.next;
        live.next += 1;
        live.cancels.push((id, cancel.clone()));
        self.count.store(live.cancels.len(), Ordering::SeqCst);
        Entered {
            waits: self,
            id,
            cancel,
        }
    }

    /// End every registered wait now (from any thread).
    pub fn cancel_all(&self) {
        if self.count.load(Ordering::SeqCst) == 0 {
            return;
        }
        for (_, c) in &self.live().cancels {
            c.cancel();
        }
    }

    /// Forget every registered wait without ending it: in a forked child
    /// they are the parent's threads' waits, which must not be touched.
    pub fn forget_all(&self) {
        let mut live = self.live();
        live.cancels.clear();
        self.count.store(0, Ordering::SeqCst);
    }

    /// Forget every registered wait, with the object to oneself.
    pub fn clear(&mut self) {
        let live = self.live.get_mut().unwrap_or_else(|p| p.into_inner());
        live.cancels.clear();
        *self.count.get_mut() = 0;
    }
}

/// A registered wait; unregistered when dropped.
pub struct Entered<'a> {
    waits: &'a Waits,
    id: u64,
    cancel: Cancel,
}

impl Entered<'_> {
    pub fn cancel(&self) -> &Cancel {
        &self.cancel
    }
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        let mut live = self.waits.live();
        if let Some(i) = live.cancels.iter().position(|(id, _)| *id == self.id) {
            live.cancels.swap_remove(i);
        }
        self.waits.count.store(live.cancels.len(), Ordering::SeqCst);
    }
}

/// Run `op` with `Wait::NonBlocking` first (and no `Cancel`); on contention,
/// wait as `patience` says with the GIL released, calling `op` again with
/// the fitting `Wait` and the `Cancel` registered with `waits`. Returns the
/// last outcome (`Err(Cancelled)` when `waits` was cancelled); `Err` only
/// for a Python exception raised by a signal handler (nothing is held then).
pub fn with_patience<T, F>(
    py: Python<'_>,
    patience: Patience,
    waits: Option<&Waits>,
    mut op: F,
) -> PyResult<Result<T, Error>>
where
    F: FnMut(Wait, Option<&Cancel>) -> Result<T, Error> + Send,
    T: Send,
{
    // Only a caller that will not wait gets to see who is in the way; the
    // others save the F_GETLK that names the holder.
    let first = op(
        match patience {
            Patience::Never => Wait::NonBlocking,
            _ => Wait::NonBlockingNoHolder,
        },
        None,
    );
    continue_patience(py, patience, first, waits, op)
}

/// As [`with_patience`], given the outcome of the first try already made.
pub fn continue_patience<T, F>(
    py: Python<'_>,
    patience: Patience,
    first: Result<T, Error>,
    waits: Option<&Waits>,
    mut op: F,
) -> PyResult<Result<T, Error>>
where
    F: FnMut(Wait, Option<&Cancel>) -> Result<T, Error> + Send,
    T: Send,
{
    let wait = match (&first, patience) {
        (Err(Error::WouldBlock { .. }), Patience::Forever) => Wait::BlockingInterruptible,
        (Err(Error::WouldBlock { .. }), Patience::Until(deadline)) => {
            Wait::DeadlineInterruptible(deadline)
        }
        _ => return Ok(first),
    };
    let entered = waits.map(|w| w.enter(Cancel::new()));
    let cancel = entered.as_ref().map(Entered::cancel);
    loop {
        // A signal that came since the last try would not interrupt the
        // wait below: run its handler now.
        py.check_signals()?;
        // One wait for the engine until granted, refused, timed out or
        // cancelled; a signal ends it (nothing held) so that its handler
        // runs above, and the next round waits for the time left.
        match py.detach(|| op(wait, cancel)) {
            Err(Error::Interrupted) => continue,
            other => return Ok(other),
        }
    }
}
