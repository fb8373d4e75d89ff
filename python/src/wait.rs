//! Waiting for locks without holding the GIL, and without deafness to Ctrl-C.
//!
//! Every wait first tries once with the GIL held (an uncontended lock costs
//! one system call and no GIL hand-over). When that meets contention the
//! wait goes on with the GIL released: a blocking wait sleeps in
//! `F_SETLKW` and a signal ends it with `Error::Interrupted` (nothing
//! held), so Python's handlers run (`KeyboardInterrupt` propagates) before
//! it sleeps again; a timed wait runs in slices of at most `SLICE` so the
//! handlers run between slices.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use locksfile::{Error, Wait};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// Longest stretch a timed wait spends deaf to signals.
const SLICE: Duration = Duration::from_millis(50);

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
    pub fn from_args(blocking: bool, timeout: Option<f64>) -> PyResult<Patience> {
        match timeout {
            None => Ok(if blocking {
                Patience::Forever
            } else {
                Patience::Never
            }),
            Some(t) if t.is_nan() || t < 0.0 => Err(PyValueError::new_err(format!(
                "timeout must be a non-negative number of seconds, got {t}"
            ))),
            Some(_) if !blocking => Err(PyValueError::new_err(
                "a timeout cannot be given with blocking=False",
            )),
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

/// Run `op` with `Wait::NonBlocking` first; on contention, wait as
/// `patience` says with the GIL released, calling `op` again with the
/// fitting `Wait`. Returns the last outcome; `Err` only for a Python
/// exception raised by a signal handler (nothing is held then).
pub fn with_patience<T, F>(
    py: Python<'_>,
    patience: Patience,
    mut op: F,
) -> PyResult<Result<T, Error>>
where
    F: FnMut(Wait) -> Result<T, Error> + Send,
    T: Send,
{
    // Only a caller that will not wait gets to see who is in the way; the
    // others save the F_GETLK that names the holder.
    let first = op(match patience {
        Patience::Never => Wait::NonBlocking,
        _ => Wait::NonBlockingNoHolder,
    });
    continue_patience(py, patience, first, op)
}

/// As [`with_patience`], given the outcome of the first try already made.
pub fn continue_patience<T, F>(
    py: Python<'_>,
    patience: Patience,
    first: Result<T, Error>,
    mut op: F,
) -> PyResult<Result<T, Error>>
where
    F: FnMut(Wait) -> Result<T, Error> + Send,
    T: Send,
{
    match (&first, patience) {
        (Err(Error::WouldBlock { .. }), Patience::Forever) => {
            // The core yields the CPU and tries again twice before it
            // sleeps in the kernel, so a lock held for a moment (a
            // hand-over-hand walk) is had without a sleep and a wake-up.
            loop {
                // A signal that came since the last try would not interrupt
                // the sleep below: run its handler now.
                py.check_signals()?;
                match py.detach(|| op(Wait::BlockingInterruptible)) {
                    Err(Error::Interrupted) => py.check_signals()?,
                    other => return Ok(other),
                }
            }
        }
        (Err(Error::WouldBlock { .. }), Patience::Until(deadline)) => loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(Err(Error::TimedOut));
            }
            let slice_end = deadline.min(now + SLICE);
            match py.detach(|| op(Wait::Deadline(slice_end))) {
                Err(Error::TimedOut) | Err(Error::Interrupted) => py.check_signals()?,
                other => return Ok(other),
            }
        },
        _ => Ok(first),
    }
}

/// Wait on a thread that another thread may stop: `op` is tried with
/// `Wait::Deadline` in slices of at most `SLICE`, up to `deadline` (`None`:
/// no limit), and `cancelled` is checked before each slice, so a
/// cancellation ends the wait within one slice and no thread is left
/// asleep in the kernel. `None` when cancelled (nothing held); otherwise
/// the last outcome, `Err(TimedOut)` once the deadline passes. Called with
/// the GIL released.
pub fn cancellable<T, F>(
    deadline: Option<Instant>,
    cancelled: &AtomicBool,
    mut op: F,
) -> Option<Result<T, Error>>
where
    F: FnMut(Wait) -> Result<T, Error>,
{
    loop {
        if cancelled.load(Ordering::Relaxed) {
            return None;
        }
        let now = Instant::now();
        let slice_end = match deadline {
            Some(d) if now >= d => return Some(Err(Error::TimedOut)),
            Some(d) => d.min(now + SLICE),
            None => now + SLICE,
        };
        match op(Wait::Deadline(slice_end)) {
            Err(Error::TimedOut) | Err(Error::Interrupted) => {}
            other => return Some(other),
        }
    }
}
