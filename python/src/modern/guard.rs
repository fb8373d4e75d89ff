//! `Guard`: one lock on a span, held until released, and the cell
//! `LocksFile.close()` reaches it through.

use std::ffi::CString;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use locksfile::{Cancel, Error, Kind, LockFile, ReadGuard, Span, Wait, WriteGuard};
use pyo3::exceptions::{PyResourceWarning, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::errors::to_py;
use crate::forks::Born;
use crate::gil_cell::GilCell;
use crate::spans::span_to_range;
use crate::wait::{with_patience, Waits};

use super::fastcall::GuardCache;
use super::handle::Handle;
use super::outcomes::{Refused, GIVE_UP};

/// What a guard holds, and what became of it.
pub enum Held {
    Read(ReadGuard<Handle>),
    Write(WriteGuard<Handle>),
    /// Taken out by a thread that is converting it.
    Busy,
    Released,
    /// Released by `LocksFile.close()`.
    Closed,
}

impl Held {
    /// Whether a lock it held was taken away: its PostgreSQL session was
    /// lost, or a flock conversion of its owner (the core's `is_held`).
    fn lost(&self) -> bool {
        match self {
            Held::Read(g) => !g.is_held(),
            Held::Write(g) => !g.is_held(),
            Held::Busy | Held::Released | Held::Closed => false,
        }
    }

    /// A guard on `span`, waiting as `w` says; `cancel` ends the wait.
    pub fn take(
        lf: &Arc<LockFile>,
        kind: Kind,
        span: Span,
        w: Wait,
        cancel: Option<&Cancel>,
    ) -> Result<Held, Error> {
        Held::take_through(Handle::Shared(Arc::clone(lf)), kind, span, w, cancel)
    }

    /// As `take`, through `lf`.
    #[inline]
    pub fn take_through(
        lf: Handle,
        kind: Kind,
        span: Span,
        w: Wait,
        cancel: Option<&Cancel>,
    ) -> Result<Held, Error> {
        match (kind, cancel) {
            (Kind::Shared, None) => ReadGuard::acquire(lf, span, w).map(Held::Read),
            (Kind::Shared, Some(c)) => {
                ReadGuard::acquire_cancellable(lf, span, w, c).map(Held::Read)
            }
            (Kind::Exclusive, None) => WriteGuard::acquire(lf, span, w).map(Held::Write),
            (Kind::Exclusive, Some(c)) => {
                WriteGuard::acquire_cancellable(lf, span, w, c).map(Held::Write)
            }
        }
    }

    pub fn unlock(self) -> Result<(), Error> {
        match self {
            Held::Read(g) => ReadGuard::unlock(g),
            Held::Write(g) => WriteGuard::unlock(g),
            Held::Busy | Held::Released | Held::Closed => Ok(()),
        }
    }
}

/// A guard's span, set again when its guard object is reused (see
/// `GuardCache`: only while nothing else can see the guard).
pub struct SpanCell {
    start: AtomicU64,
    end: AtomicU64,
}

impl SpanCell {
    pub fn new(s: Span) -> SpanCell {
        SpanCell {
            start: AtomicU64::new(s.start()),
            end: AtomicU64::new(s.end()),
        }
    }

    pub fn get(&self) -> Span {
        Span::new(
            self.start.load(Ordering::Relaxed),
            self.end.load(Ordering::Relaxed),
        )
        .expect("a span stored whole")
    }

    pub fn set(&self, s: Span) {
        self.start.store(s.start(), Ordering::Relaxed);
        self.end.store(s.end(), Ordering::Relaxed);
    }
}

/// Which `Held` a slot holds (without the lock it holds).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum State {
    Read,
    Write,
    Busy,
    Released,
    Closed,
}

/// A guard's `Held`, touched only with the GIL held, and whether it ended
/// (`Released` or `Closed`), readable without it.
///
/// Every call that reaches a guard's lock holds the GIL (these abi3
/// builds never run without one), so the GIL keeps them apart; a `Mutex`
/// here cost four locked instructions per `with lf.write(i):` block
/// (refilled at the take, emptied at the release), more than the rest of
/// the binding's work in it. The one reader without the GIL is an
/// upgrade's wait, which asks `ended` only (see there).
pub struct HeldSlot {
    held: GilCell<Held>,
    ended: AtomicBool,
}

// Each method reaches the value once, runs no Python code while it does
// and drops nothing there but what it put in: what it takes out is
// returned, for the caller to drop or unlock.
#[allow(unsafe_code)]
impl HeldSlot {
    pub fn new(h: Held) -> HeldSlot {
        let ended = matches!(h, Held::Released | Held::Closed);
        HeldSlot {
            held: GilCell::new(h),
            ended: AtomicBool::new(ended),
        }
    }

    /// Put `h` in; what was there is returned.
    pub fn replace(&self, py: Python<'_>, h: Held) -> Held {
        let ended = matches!(h, Held::Released | Held::Closed);
        // SAFETY: a move in and out runs no Python code.
        let old = unsafe { self.held.with(py, |slot| std::mem::replace(slot, h)) };
        self.ended.store(ended, Ordering::Relaxed);
        old
    }

    /// As `replace`, through exclusive access (no other reference exists).
    pub fn replace_mut(&mut self, h: Held) -> Held {
        *self.ended.get_mut() = matches!(h, Held::Released | Held::Closed);
        std::mem::replace(self.held.get_mut(), h)
    }

    /// Which `Held` it is.
    pub fn state(&self, py: Python<'_>) -> State {
        // SAFETY: a match runs no Python code.
        unsafe {
            self.held.with(py, |h| match h {
                Held::Read(_) => State::Read,
                Held::Write(_) => State::Write,
                Held::Busy => State::Busy,
                Held::Released => State::Released,
                Held::Closed => State::Closed,
            })
        }
    }

    /// `state`, and whether the lock held was taken away (`Held::lost`).
    pub fn state_lost(&self, py: Python<'_>) -> (State, bool) {
        let state = self.state(py);
        // SAFETY: the engine's `is_held` runs no Python code.
        let lost = unsafe { self.held.with(py, |h| h.lost()) };
        (state, lost)
    }

    /// Whether it is `Released` or `Closed`, from any thread, GIL or not.
    ///
    /// Relaxed is enough for its one reader without the GIL, an upgrade
    /// deciding whether to wait: the upgrade registered its wait with
    /// the guard's `Waits` with the GIL held and looks here only after
    /// releasing it. A release that came before that GIL hand-over is
    /// ordered before this load by the GIL, so the load sees it; one that
    /// came after holds the GIL after the registration, so its
    /// `cancel_all` sees the wait and ends it.
    pub fn ended(&self) -> bool {
        self.ended.load(Ordering::Relaxed)
    }
}

/// A guard's lock, shared with the `LocksFile` whose `close()` releases it.
pub struct GuardCell {
    pub held: HeldSlot,
    pub span: SpanCell,
    /// The process that took it: in a forked child every method refuses
    /// before touching anything, so the parent's locks stay as they are.
    pub born: Born,
    /// The upgrade waiting on it, if any: a release ends that wait.
    pub waits: Waits,
    /// A counted reference to the `LockFile` its lock was lent (see
    /// `Handle::lent`), given when the owner's own may go first: by
    /// `close()` while an upgrade has the lock out of the cell, or by the
    /// owner dropped while the lock lives. Let go once the lock is
    /// released. Declared after `held`, so dropped after it.
    pub keep: GilCell<Option<Arc<LockFile>>>,
}

impl GuardCell {
    /// Release, leaving `end` (`Released` or `Closed`) behind. A guard that
    /// another thread is converting is marked at once and that thread's wait
    /// is cancelled; it unlocks what it holds as its wait ends (see
    /// `PyGuard::finish`).
    pub fn release(&self, py: Python<'_>, end: Held) -> Result<(), Error> {
        if self.held.ended() {
            return Ok(());
        }
        let held = self.held.replace(py, end);
        // After the mark: an upgrade that registers later sees it.
        self.waits.cancel_all();
        if matches!(held, Held::Busy) {
            // The upgrade unlocks what it holds (`PyGuard::finish`), and
            // lets go of `keep` then.
            return Ok(());
        }
        let out = held.unlock();
        self.let_go(py);
        out
    }

    /// Keep `lf` alive for the lock this cell was lent (`keep`).
    #[allow(unsafe_code)]
    pub fn keep_alive(&self, py: Python<'_>, lf: &Arc<LockFile>) {
        // SAFETY: storing a reference runs no Python code; the one it
        // replaces, if any, is dropped outside.
        let old = unsafe { self.keep.with(py, |k| k.replace(Arc::clone(lf))) };
        drop(old);
    }

    /// The lock is released: `keep`, if given, goes.
    #[allow(unsafe_code)]
    pub fn let_go(&self, py: Python<'_>) {
        // SAFETY: taking the value out runs no Python code; it is dropped
        // outside.
        let old = unsafe { self.keep.with(py, Option::take) };
        drop(old);
    }
}

/// Why a `Guard` does not pickle, and what to send instead.
const GUARD_PICKLE: &str = "cannot pickle a Guard: its lock belongs to this process's owner. \
     Pass the LocksFile (it pickles as its path, mode and options, holding nothing) and the \
     span (guard.span), and take the lock again in the other process";

/// A lock on a span, held until released: by ``release()``, at the end of a
/// ``with`` block, when the guard is collected, or when its ``LocksFile`` is
/// closed. Returned by ``LocksFile.read()``/``write()`` and their ``try_``
/// and ``_for`` forms, with the lock already taken.
///
/// Keep it in a name or a ``with`` statement: a bare ``lf.write(5)`` is
/// collected, and released, at once. A guard collected while it still
/// holds its lock and was never entered by ``with`` emits a
/// ``ResourceWarning``, as an unclosed file does.
///
/// ``with g:`` blocks of one guard may nest: the outermost block's end
/// releases it. A released guard cannot be entered (``RuntimeError``, or
/// ``ValueError`` once its ``LocksFile`` is closed): its block would run
/// without the lock.
///
/// Inherited through ``fork``, every method raises ``ForkedError`` in the
/// child and never touches the parent's lock.
// `freelist`: a guard object released is kept for the next one rather than
// freed (a `with lf.write(i):` block makes and frees one).
#[pyclass(name = "Guard", module = "pylocksfile", frozen, weakref, freelist = 16)]
pub struct PyGuard {
    pub cell: Arc<GuardCell>,
    /// How many `with` blocks it is in (`with g:` nested in `with g:`):
    /// only the outermost one's end releases it, so an outer block never
    /// goes on without its lock. Nonzero: collection has nothing to warn
    /// about (a `with` will release it).
    depth: AtomicU32,
    /// Its `LocksFile`'s slot for the last guard released.
    cache: Arc<GuardCache>,
}

impl PyGuard {
    pub fn new(cell: Arc<GuardCell>, cache: Arc<GuardCache>) -> PyGuard {
        PyGuard {
            cell,
            depth: AtomicU32::new(0),
            cache,
        }
    }

    /// Made again for a new lock: `GuardCache::take_unique` handed it over,
    /// so nothing else sees it.
    pub(crate) fn refill(&self, py: Python<'_>, span: Span, h: Held) {
        let old = self.cell.held.replace(py, h);
        // Released (by this guard, or by `close()`): nothing to unlock.
        drop(old);
        self.cell.span.set(span);
        self.depth.store(0, Ordering::Relaxed);
    }

    /// Release, then offer the guard to its `LocksFile` for reuse (see
    /// `GuardCache`: it is reused only if nothing else holds it).
    pub(crate) fn release_and_keep(slf: &Bound<'_, Self>) -> PyResult<()> {
        let me = slf.get();
        me.release_now(slf.py())?;
        me.cache.keep(slf.clone());
        Ok(())
    }
}

/// A guard collected while it still held its lock, and never entered by a
/// `with`, was most likely dropped by mistake (`lf.write(5)` as a bare
/// statement releases at once): say so with a `ResourceWarning`, as an
/// unclosed file does. The lock is released right after, as before.
///
/// The cell stays in its `LocksFile`'s list for a later guard to reuse, so
/// the lock it may still hold is taken out of it here, and dropped (released,
/// or in a forked child left to the parent, as the core's guards do).
impl Drop for PyGuard {
    fn drop(&mut self) {
        // SAFETY: a Guard is dropped by its deallocation, which CPython
        // runs with the GIL held.
        #[allow(unsafe_code)]
        let py = unsafe { Python::assume_attached() };
        if !matches!(self.cell.held.state(py), State::Read | State::Write) {
            return;
        }
        // Warned while the lock is still in the cell: the warning runs
        // Python code, which may close the `LocksFile` or let it go, and
        // either must still reach the lock (it may be lent the owner's
        // handle, see `Handle::lent`). It is released right after.
        if self.depth.load(Ordering::Relaxed) == 0 && !self.cell.born.forked() {
            self.warn_unreleased();
        }
        let held = self.cell.held.replace(py, Held::Released);
        drop(held);
        self.cell.let_go(py);
    }
}

impl PyGuard {
    fn warn_unreleased(&self) {
        let span = self.cell.span.get();
        Python::attach(|py| {
            // Collection may happen while an exception propagates: keep it.
            let pending = PyErr::take(py);
            let span = span_to_range(py, span)
                .and_then(|r| r.repr())
                .map(|r| r.to_string())
                .unwrap_or_else(|_| span.to_string());
            let msg = format!(
                "unreleased Guard {span} collected; its lock is released now. \
                 Use `with lf.write(...):`, or bind the guard to a name and call release()"
            );
            let msg = CString::new(msg).expect("no NUL in the message");
            let category = py.get_type::<PyResourceWarning>();
            if let Err(e) = PyErr::warn(py, category.as_any(), &msg, 1) {
                // A filter made it an error: report it as unclosed files do.
                e.write_unraisable(py, None);
            }
            if let Some(e) = pending {
                e.restore(py);
            }
        });
    }
}

impl PyGuard {
    /// `__enter__`'s work (the method itself is in `fastcall`). A guard
    /// released already cannot be entered: its block would run without
    /// the lock it names.
    pub(crate) fn enter(&self, py: Python<'_>) -> PyResult<()> {
        self.not_forked(py)?;
        match self.cell.held.state(py) {
            State::Released => Err(PyRuntimeError::new_err(
                "cannot enter a released Guard: its block would run without the lock. \
                 Take the lock again (`with lf.write(...):`)",
            )),
            State::Closed => Err(PyValueError::new_err(
                "cannot enter a Guard released by closing its LocksFile: its block would \
                 run without the lock",
            )),
            State::Read | State::Write | State::Busy => {
                // The GIL orders every change of `depth`: a plain load and
                // store, no locked instruction on the with statement's path.
                let depth = self.depth.load(Ordering::Relaxed);
                self.depth.store(depth.saturating_add(1), Ordering::Relaxed);
                Ok(())
            }
        }
    }

    /// `__exit__`'s work: release, unless this block is nested in another
    /// `with` of the same guard, whose end releases it.
    pub(crate) fn exit(slf: &Bound<'_, Self>) -> PyResult<()> {
        let me = slf.get();
        me.not_forked(slf.py())?;
        let depth = me.depth.load(Ordering::Relaxed);
        if depth > 1 {
            me.depth.store(depth - 1, Ordering::Relaxed);
            return Ok(());
        }
        if depth != 0 {
            me.depth.store(0, Ordering::Relaxed);
        }
        PyGuard::release_and_keep(slf)
    }

    /// `release()` and `__exit__`'s work.
    pub(crate) fn release_now(&self, py: Python<'_>) -> PyResult<()> {
        self.not_forked(py)?;
        self.cell
            .release(py, Held::Released)
            .map_err(|e| to_py(py, e))
    }

    fn not_forked(&self, py: Python<'_>) -> PyResult<()> {
        if self.cell.born.forked() {
            return Err(to_py(py, Error::Forked));
        }
        Ok(())
    }

    fn take_busy(&self, py: Python<'_>) -> PyResult<Held> {
        self.not_forked(py)?;
        match self.cell.held.state(py) {
            State::Busy => Err(PyRuntimeError::new_err(
                "the guard is being converted by another thread",
            )),
            State::Released => Err(PyRuntimeError::new_err("the guard was released")),
            State::Closed => Err(PyValueError::new_err(
                "the guard was released by closing its LocksFile",
            )),
            State::Read | State::Write => Ok(self.cell.held.replace(py, Held::Busy)),
        }
    }

    /// Whether the guard was released or its file closed (while busy;
    /// asked without the GIL).
    fn ended(&self) -> bool {
        self.cell.held.ended()
    }

    /// Put back what a conversion took out. If the guard was released or
    /// its file closed meanwhile, that release stands: `h` is unlocked and
    /// the conversion fails.
    fn finish(&self, py: Python<'_>, h: Held) -> PyResult<()> {
        let closed = match self.cell.held.state(py) {
            State::Busy => {
                // Busy holds nothing: the value given back is dropped bare.
                drop(self.cell.held.replace(py, h));
                return Ok(());
            }
            other => other == State::Closed,
        };
        let unlocked = h.unlock();
        self.cell.let_go(py);
        unlocked.map_err(|e| to_py(py, e))?;
        Err(if closed {
            PyValueError::new_err(
                "the LocksFile was closed while the guard was converting; nothing is held",
            )
        } else {
            PyRuntimeError::new_err(
                "the guard was released while it was converting; nothing is held",
            )
        })
    }
}

#[pymethods]
impl PyGuard {
    /// The indices held, as a ``range``.
    #[getter]
    fn span<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        span_to_range(py, self.cell.span.get())
    }

    /// ``"shared"`` or ``"exclusive"``; None once released, or once the
    /// lock was lost (see ``held``).
    #[getter]
    fn kind(&self, py: Python<'_>) -> Option<&'static str> {
        let (state, lost) = self.cell.held.state_lost(py);
        if lost {
            return None;
        }
        match state {
            State::Read => Some("shared"),
            State::Write => Some("exclusive"),
            // Only an upgrade makes a guard busy; it is shared until that ends.
            State::Busy => Some("shared"),
            State::Released | State::Closed => None,
        }
    }

    /// Whether the lock is still held by this guard: False once released,
    /// and once it was taken away (its PostgreSQL session was lost, see
    /// ``LocksFile.lost()``, or a flock conversion of its owner was lost).
    #[getter]
    fn held(&self, py: Python<'_>) -> bool {
        let (state, lost) = self.cell.held.state_lost(py);
        !matches!(state, State::Released | State::Closed) && !lost
    }

    /// Release the lock now. Releasing twice is harmless. Released while
    /// another thread upgrades it, the guard stays released: that upgrade
    /// fails (``RuntimeError``) and unlocks what it holds when its wait ends.
    fn release(slf: &Bound<'_, Self>) -> PyResult<()> {
        PyGuard::release_and_keep(slf)
    }

    /// Convert a shared lock to exclusive in place (the shared lock is kept
    /// while waiting). ``blocking=False`` raises ``WouldBlockError`` at once
    /// on conflict (a ``timeout`` given with it is ignored); ``timeout``
    /// (seconds) raises ``LockTimeout``. On those
    /// failures the guard still holds its shared lock. Returns the guard.
    ///
    /// If another thread releases the guard (or closes its ``LocksFile``)
    /// while this call waits, the release stands: the wait ends at once,
    /// unlocks everything the guard held and raises ``RuntimeError``
    /// (``ValueError`` for a closed file).
    ///
    /// Deadlocks
    /// ---------
    /// Two owners that both hold a shared lock on the same span and both
    /// upgrade it wait for each other. In process mode the kernel sees that
    /// and one of them gets ``DeadlockError``; in shm mode the table sees
    /// it, between any owners (threads with separate objects too), and the
    /// upgrade that closes the cycle gets ``DeadlockError`` keeping its
    /// shared lock. In OFD mode (the default) and flock mode nothing detects
    /// deadlocks: both wait forever. Give such upgrades a ``timeout`` (both
    /// then raise ``LockTimeout`` and keep their shared lock) or use
    /// ``blocking=False``, or take the exclusive lock at once.
    #[pyo3(signature = (*, blocking = true, timeout = None))]
    fn upgrade<'py>(
        slf: &Bound<'py, Self>,
        blocking: bool,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, Self>> {
        let py = slf.py();
        let me = slf.get();
        let (patience, refused) = Refused::from_args(blocking, timeout)?;
        let g = match me.take_busy(py)? {
            Held::Read(g) => g,
            other => {
                me.finish(py, other)?;
                return Ok(slf.clone());
            }
        };
        let mut slot = Some(g);
        let outcome = with_patience(py, patience, Some(&me.cell.waits), |w, cancel| {
            let g = slot.take().expect("the read guard is back between tries");
            if me.ended() {
                slot = Some(g);
                return Err(GIVE_UP);
            }
            let upgraded = match cancel {
                Some(c) => ReadGuard::upgrade_cancellable(g, w, c),
                None => ReadGuard::upgrade_with(g, w),
            };
            match upgraded {
                Ok(wg) => Ok(wg),
                Err((g, e)) => {
                    slot = Some(g);
                    Err(e)
                }
            }
        });
        match outcome {
            Ok(Ok(wg)) => {
                me.finish(py, Held::Write(wg))?;
                Ok(slf.clone())
            }
            Ok(Err(e)) => {
                me.finish(
                    py,
                    Held::Read(slot.take().expect("the read guard came back")),
                )?;
                Err(refused.error(py, e))
            }
            Err(e) => {
                // A signal handler's exception wins over a release meanwhile.
                let _ = me.finish(
                    py,
                    Held::Read(slot.take().expect("the read guard came back")),
                );
                Err(e)
            }
        }
    }

    /// Convert an exclusive lock to shared in place; never blocks. Returns the guard.
    fn downgrade<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, Self>> {
        let py = slf.py();
        let me = slf.get();
        let h = me.take_busy(py)?;
        me.finish(
            py,
            match h {
                Held::Write(g) => Held::Read(WriteGuard::downgrade(g)),
                other => other,
            },
        )?;
        Ok(slf.clone())
    }

    // `__enter__` and `__exit__` are replaced by raw methods at import
    // (`super::fastcall`), which do the same; these give their signatures.
    fn __enter__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, Self>> {
        slf.get().enter(slf.py())?;
        Ok(slf.clone())
    }

    #[pyo3(signature = (exc_type = None, exc = None, tb = None))]
    fn __exit__(
        slf: &Bound<'_, Self>,
        exc_type: Option<&Bound<'_, PyAny>>,
        exc: Option<&Bound<'_, PyAny>>,
        tb: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        let _ = (exc_type, exc, tb);
        PyGuard::exit(slf)?;
        Ok(false)
    }

    /// A guard does not pickle: its lock belongs to this process's owner.
    /// ``TypeError``, saying to pass the ``LocksFile`` and the span instead.
    fn __reduce__(&self) -> PyResult<()> {
        Err(PyTypeError::new_err(GUARD_PICKLE))
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let state = match self.cell.held.state_lost(py) {
            (_, true) => "lost",
            (State::Read, _) => "shared",
            (State::Write, _) => "exclusive",
            (State::Busy, _) => "converting",
            (State::Released | State::Closed, _) => "released",
        };
        Ok(format!(
            "<Guard {} {state}>",
            span_to_range(py, self.cell.span.get())?.repr()?
        ))
    }
}
