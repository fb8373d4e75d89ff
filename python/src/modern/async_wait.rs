//! `_Wait`: one asyncio wait for a lock, which `pylocksfile._async` drives.

use std::sync::Arc;
use std::time::Instant;

use locksfile::{Cancel, Error, Kind, LockFile, Party, Span, Wait};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

use crate::errors::to_py;
use crate::spans::span_to_range;
use crate::wait::Patience;

use super::guard::{Held, PyGuard, State};
use super::outcomes::{closed_error, closed_while_waiting, Refused, GIVE_UP};
use super::owner::Owner;

/// Hand a wait to its driver in `pylocksfile._async`.
pub fn async_helper<'py>(py: Python<'py>, name: &str, w: PyWait) -> PyResult<Bound<'py, PyAny>> {
    static MODULE: pyo3::sync::PyOnceLock<Py<pyo3::types::PyModule>> =
        pyo3::sync::PyOnceLock::new();
    let module =
        MODULE.get_or_try_init(py, || py.import("pylocksfile._async").map(Bound::unbind))?;
    module.bind(py).getattr(name)?.call1((Py::new(py, w)?,))
}

/// One asyncio wait (``pylocksfile._async`` drives it): tried once on the
/// event loop's thread, then, on contention, run in a thread of its own as
/// one wait for the engine, which ``cancel()`` (or closing the
/// ``LocksFile``) ends at once with nothing held. The owner is the one of
/// the thread that made it (the loop's), whatever thread waits.
///
/// The thread only ever takes a guard, for ``acquire_async`` too: a guard
/// raises what the owner holds and lowers nothing, so giving back a grant
/// the task never received (it was cancelled) is releasing that guard,
/// and the explicit layer is never touched by a wait that did not end in
/// the task. The task applies the explicit acquire with ``commit()``.
#[pyclass(name = "_Wait", module = "pylocksfile", frozen)]
pub struct PyWait {
    /// Who the lock is for: the task that made the wait (`None`: the
    /// object's threads share its locks).
    party: Option<Party>,
    /// The `LocksFile` it waits for, alive while the wait is.
    _object: Py<PyAny>,
    owner: Arc<Owner>,
    lf: Arc<LockFile>,
    kind: Kind,
    span: Span,
    /// `None`: no limit.
    deadline: Option<Instant>,
    /// What a refusal becomes once the wait ends.
    refused: Refused,
    /// `blocking=False`: `try_now()` raises a refusal, and there is no wait.
    blocking: bool,
    /// The explicit layer (`acquire_async`) rather than a guard.
    explicit: bool,
    /// Ends the wait: `cancel()` (a cancelled task), or `close()`.
    cancel: Cancel,
}

impl PyWait {
    /// A wait for `kind` on `span` of `object`, whose `Owner` is `owner`,
    /// with `blocking=` and `timeout=` as given; `explicit`: for the
    /// explicit layer (`acquire_async`) rather than a guard.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        object: &Bound<'_, PyAny>,
        owner: &Arc<Owner>,
        kind: Kind,
        span: Span,
        blocking: bool,
        timeout: Option<f64>,
        explicit: bool,
    ) -> PyResult<PyWait> {
        let py = object.py();
        let (patience, refused) = Refused::from_args(blocking, timeout)?;
        let deadline = match patience {
            Patience::Never => Some(Instant::now()),
            Patience::Forever => None,
            Patience::Until(d) => Some(d),
        };
        let lf = owner.lf_not_forked(py)?;
        let party = owner.wait_party(py)?;
        Ok(PyWait {
            party,
            _object: object.clone().unbind(),
            owner: Arc::clone(owner),
            lf,
            kind,
            span,
            deadline,
            refused,
            blocking,
            explicit,
            cancel: Cancel::new(),
        })
    }

    /// The Python value of a granted lock: its Guard, or True (explicit).
    fn granted(&self, py: Python<'_>, h: Option<Held>) -> PyResult<Py<PyAny>> {
        let owner = &self.owner;
        match h {
            Some(h) => Ok(owner.register(py, self.span, h)?.into_any().unbind()),
            None if owner.closed() => {
                // `close()` may have released everything before this lock was had.
                self.lf.release_all().map_err(|e| to_py(py, e))?;
                Err(closed_while_waiting())
            }
            None => {
                owner.with_blocks.took();
                Ok(pyo3::types::PyBool::new(py, true)
                    .to_owned()
                    .into_any()
                    .unbind())
            }
        }
    }
}

#[pymethods]
impl PyWait {
    /// One try without waiting: the Guard (True once the explicit acquire
    /// is made), or None when another owner is in the way (a call with
    /// ``blocking=False`` raises ``WouldBlockError`` instead).
    fn try_now(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        if self.owner.closed() {
            return Err(closed_error());
        }
        let raise = !self.blocking;
        // Only a call that will not wait gets to see who is in the way.
        let w = if raise {
            Wait::NonBlocking
        } else {
            Wait::NonBlockingNoHolder
        };
        let _as_task = self.party.map(Party::enter);
        let outcome = if self.explicit {
            // On the loop's thread, with nothing to cancel in between: the
            // explicit acquire itself.
            self.lf.acquire(self.kind, self.span, w).map(|()| None)
        } else {
            Held::take(&self.lf, self.kind, self.span, w, None).map(Some)
        };
        match outcome {
            Ok(h) => self.granted(py, h).map(Some),
            Err(Error::WouldBlock { .. }) if !raise => Ok(None),
            Err(e) => Err(to_py(py, e)),
        }
    }

    /// Wait, as one wait for the engine, until granted, timed out
    /// (``LockTimeout``), closed (``ValueError``) or cancelled (None,
    /// nothing held). Releases the GIL. Returns a Guard, for the explicit
    /// layer too (hand it to ``commit()``). A grant that came as the wait
    /// was cancelled is returned: the caller releases it.
    fn wait(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        let owner = &self.owner;
        let wait = match self.deadline {
            Some(d) => Wait::Deadline(d),
            None => Wait::Blocking,
        };
        let party = self.party;
        let outcome = py.detach(|| {
            let _as_task = party.map(Party::enter);
            // Registered before the closed check, so that `close()` either
            // is seen here or cancels the wait.
            let _entered = owner.waits.enter(self.cancel.clone());
            if owner.closed() {
                return Err(GIVE_UP);
            }
            Held::take(&self.lf, self.kind, self.span, wait, Some(&self.cancel))
        });
        match outcome {
            Ok(h) => self.granted(py, Some(h)).map(Some),
            Err(_) if owner.closed() => Err(closed_while_waiting()),
            Err(Error::Cancelled) => Ok(None),
            Err(e) => Err(self.refused.error(py, e)),
        }
    }

    /// The explicit acquire of an ``acquire_async`` whose task received
    /// the grant: apply it, then release ``guard`` (what ``wait()``
    /// returned), also when this raises.
    ///
    /// The guard holds the kind asked for over the span, so the owner
    /// does: the acquire raises nothing in the engine and only lowers what
    /// the explicit layer held stronger, so it is never refused and never
    /// waits (only a raise waits, also for a sibling thread's wait over
    /// the span), whatever other threads of the owner did meanwhile with
    /// the explicit layer or their guards. Only a guard that stopped
    /// holding can fail it: closed (``ValueError``, nothing applied), a
    /// lost PostgreSQL session or flock conversion (the engine's error,
    /// nothing applied).
    fn commit(&self, py: Python<'_>, guard: &Bound<'_, PyGuard>) -> PyResult<()> {
        let cell = &guard.get().cell;
        if !self.explicit || cell.span.get() != self.span {
            return Err(PyRuntimeError::new_err(
                "commit() takes the guard that wait() of an acquire_async returned",
            ));
        }
        // Taken out of the guard: `close()` no longer reaches it, and the
        // lock is ours to unlock below.
        let h = {
            match cell.held.state(py) {
                State::Read | State::Write => cell.held.replace(py, Held::Released),
                State::Closed => return Err(closed_while_waiting()),
                State::Busy | State::Released => {
                    return Err(PyRuntimeError::new_err(
                        "the guard of this acquire_async was released before it was committed",
                    ))
                }
            }
        };
        let _as_task = self.party.map(Party::enter);
        let outcome = if self.owner.closed() {
            Err(GIVE_UP)
        } else {
            self.lf
                .acquire(self.kind, self.span, Wait::NonBlockingNoHolder)
        };
        let unlocked = h.unlock();
        cell.let_go(py);
        match outcome {
            Err(_) if self.owner.closed() => Err(closed_while_waiting()),
            Ok(()) if self.owner.closed() => {
                // `close()` may have released everything before the acquire.
                self.lf.release_all().map_err(|e| to_py(py, e))?;
                Err(closed_while_waiting())
            }
            Ok(()) => unlocked.map_err(|e| to_py(py, e)),
            Err(Error::WouldBlock { .. }) => Err(PyRuntimeError::new_err(
                "internal error: the explicit acquire of an acquire_async was refused \
                 while its guard held the span; nothing changed",
            )),
            Err(e) => Err(to_py(py, e)),
        }
    }

    /// End ``wait()`` at once, from another thread (or before it starts).
    fn cancel(&self) {
        self.cancel.cancel();
    }

    /// The span asked for, as a ``range``.
    #[getter]
    fn span<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        span_to_range(py, self.span)
    }
}
