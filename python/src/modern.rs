//! `LocksFile`: the API for new code, with guards, timeouts and typed errors.

use std::ffi::CString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use locksfile::{
    Cancel, Entered, Error, Kind, LockFile, Mode, Party, ReadGuard, Span, Threads, Wait, WriteGuard,
};
use pyo3::exceptions::{PyResourceWarning, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};

use crate::errors::to_py;
use crate::holder::PyHolder;
use crate::kinds::{kind_and_span, kind_name, parse_kind};
use crate::modes::parse_mode;
use crate::mutex::lock_mutex;
use crate::paths::check_path;
use crate::spans::{py_span, span_to_range};
use crate::wait::{with_patience, Patience, Waits};
use crate::with_block::{warn_no_lock, WithBlocks};

enum Held {
    Read(ReadGuard<Arc<LockFile>>),
    Write(WriteGuard<Arc<LockFile>>),
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

    fn unlock(self) -> Result<(), Error> {
        match self {
            Held::Read(g) => ReadGuard::unlock(g),
            Held::Write(g) => WriteGuard::unlock(g),
            Held::Busy | Held::Released | Held::Closed => Ok(()),
        }
    }
}

struct GuardCell {
    held: Mutex<Held>,
    span: Span,
    /// The process that took it: in a forked child every method refuses
    /// before touching anything, so the parent's locks stay as they are.
    pid: u32,
    /// The upgrade waiting on it, if any: a release ends that wait.
    waits: Waits,
}

impl GuardCell {
    /// Release, leaving `end` (`Released` or `Closed`) behind. A guard that
    /// another thread is converting is marked at once and that thread's wait
    /// is cancelled; it unlocks what it holds as its wait ends (see
    /// `PyGuard::finish`).
    fn release(&self, end: Held) -> Result<(), Error> {
        let mut slot = lock_mutex(&self.held);
        if matches!(&*slot, Held::Released | Held::Closed) {
            return Ok(());
        }
        let held = std::mem::replace(&mut *slot, end);
        drop(slot);
        // After the mark: an upgrade that registers later sees it.
        self.waits.cancel_all();
        held.unlock()
    }
}

/// What a wait's try returns once its object was closed or its guard
/// released: any error but `Interrupted` ends a wait at once. A wait that
/// is already waiting when that happens is cancelled instead (`Waits`).
const GIVE_UP: Error = Error::WouldBlock {
    holder: None,
    at: None,
};

/// Why a `Guard` does not pickle, and what to send instead.
const GUARD_PICKLE: &str = "cannot pickle a Guard: its lock belongs to this process's owner. \
     Pass the LocksFile (it pickles as its path, mode and options, holding nothing) and the \
     span (guard.span), and take the lock again in the other process";

/// `__reduce__`'s answer for an object made again by its type's `__new__`
/// with `args` and `kwargs` (`copyreg.__newobj_ex__`, which pickle turns
/// into its own opcode), with a subclass instance's `__dict__` as state.
pub(crate) fn pickled_as_new<'py>(
    obj: &Bound<'py, PyAny>,
    args: Bound<'py, PyTuple>,
    kwargs: Bound<'py, PyDict>,
) -> PyResult<Bound<'py, PyTuple>> {
    let py = obj.py();
    let newobj = py.import("copyreg")?.getattr("__newobj_ex__")?;
    let call = PyTuple::new(
        py,
        [
            obj.get_type().into_any(),
            args.into_any(),
            kwargs.into_any(),
        ],
    )?;
    let state = match obj.getattr("__dict__") {
        Ok(d) if d.is_truthy()? => d,
        _ => py.None().into_bound(py),
    };
    PyTuple::new(py, [newobj, call.into_any(), state])
}

fn closed_error() -> PyErr {
    PyValueError::new_err("I/O operation on a closed LocksFile")
}

fn closed_while_waiting() -> PyErr {
    PyValueError::new_err("the LocksFile was closed while this call waited; nothing is held")
}

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
/// Inherited through ``fork``, every method raises ``ForkedError`` in the
/// child and never touches the parent's lock.
#[pyclass(name = "Guard", module = "pylocksfile", frozen, weakref)]
pub struct PyGuard {
    cell: Arc<GuardCell>,
    /// Entered by a `with` statement, which will release it: collection
    /// then has nothing to warn about.
    entered: AtomicBool,
}

impl PyGuard {
    fn new(cell: Arc<GuardCell>) -> PyGuard {
        PyGuard {
            cell,
            entered: AtomicBool::new(false),
        }
    }
}

/// A guard collected while it still held its lock, and never entered by a
/// `with`, was most likely dropped by mistake (`lf.write(5)` as a bare
/// statement releases at once): say so with a `ResourceWarning`, as an
/// unclosed file does. The lock is released right after, as before.
impl Drop for PyGuard {
    fn drop(&mut self) {
        if self.entered.load(Ordering::Relaxed) || std::process::id() != self.cell.pid {
            return;
        }
        if !matches!(
            &*lock_mutex(&self.cell.held),
            Held::Read(_) | Held::Write(_)
        ) {
            return;
        }
        let span = self.cell.span;
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
    fn not_forked(&self, py: Python<'_>) -> PyResult<()> {
        if std::process::id() != self.cell.pid {
            return Err(to_py(py, Error::Forked));
        }
        Ok(())
    }

    fn take_busy(&self, py: Python<'_>) -> PyResult<Held> {
        self.not_forked(py)?;
        let mut held = lock_mutex(&self.cell.held);
        match &*held {
            Held::Busy => Err(PyRuntimeError::new_err(
                "the guard is being converted by another thread",
            )),
            Held::Released => Err(PyRuntimeError::new_err("the guard was released")),
            Held::Closed => Err(PyValueError::new_err(
                "the guard was released by closing its LocksFile",
            )),
            _ => Ok(std::mem::replace(&mut *held, Held::Busy)),
        }
    }

    /// Whether the guard was released or its file closed (while busy).
    fn ended(&self) -> bool {
        matches!(&*lock_mutex(&self.cell.held), Held::Released | Held::Closed)
    }

    /// Put back what a conversion took out. If the guard was released or
    /// its file closed meanwhile, that release stands: `h` is unlocked and
    /// the conversion fails.
    fn finish(&self, py: Python<'_>, h: Held) -> PyResult<()> {
        let mut slot = lock_mutex(&self.cell.held);
        let closed = match &*slot {
            Held::Busy => {
                *slot = h;
                return Ok(());
            }
            other => matches!(other, Held::Closed),
        };
        drop(slot);
        h.unlock().map_err(|e| to_py(py, e))?;
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
        span_to_range(py, self.cell.span)
    }

    /// ``"shared"`` or ``"exclusive"``; None once released, or once the
    /// lock was lost (see ``held``).
    #[getter]
    fn kind(&self) -> Option<&'static str> {
        let held = lock_mutex(&self.cell.held);
        if held.lost() {
            return None;
        }
        match &*held {
            Held::Read(_) => Some("shared"),
            Held::Write(_) => Some("exclusive"),
            // Only an upgrade makes a guard busy; it is shared until that ends.
            Held::Busy => Some("shared"),
            Held::Released | Held::Closed => None,
        }
    }

    /// Whether the lock is still held by this guard: False once released,
    /// and once it was taken away (its PostgreSQL session was lost, see
    /// ``LocksFile.lost()``, or a flock conversion of its owner was lost).
    #[getter]
    fn held(&self) -> bool {
        let held = lock_mutex(&self.cell.held);
        !matches!(&*held, Held::Released | Held::Closed) && !held.lost()
    }

    /// Release the lock now. Releasing twice is harmless. Released while
    /// another thread upgrades it, the guard stays released: that upgrade
    /// fails (``RuntimeError``) and unlocks what it holds when its wait ends.
    fn release(&self, py: Python<'_>) -> PyResult<()> {
        self.not_forked(py)?;
        self.cell.release(Held::Released).map_err(|e| to_py(py, e))
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
                let e = match (e, refused) {
                    (e @ Error::WouldBlock { .. }, Refused::TimedOut) => e.into_timed_out(),
                    (e, _) => e,
                };
                Err(to_py(py, e))
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

    fn __enter__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, Self>> {
        slf.get().not_forked(slf.py())?;
        slf.get().entered.store(true, Ordering::Relaxed);
        Ok(slf.clone())
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, PyTuple>) -> PyResult<bool> {
        self.release(py)?;
        Ok(false)
    }

    /// A guard does not pickle: its lock belongs to this process's owner.
    /// ``TypeError``, saying to pass the ``LocksFile`` and the span instead.
    fn __reduce__(&self) -> PyResult<()> {
        Err(PyTypeError::new_err(GUARD_PICKLE))
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let held = lock_mutex(&self.cell.held);
        let state = match &*held {
            _ if held.lost() => "lost",
            Held::Read(_) => "shared",
            Held::Write(_) => "exclusive",
            Held::Busy => "converting",
            Held::Released | Held::Closed => "released",
        };
        drop(held);
        Ok(format!(
            "<Guard {} {state}>",
            span_to_range(py, self.cell.span)?.repr()?
        ))
    }
}

/// A lock file: many numbered reader/writer locks, lock ``n`` being byte
/// ``n`` of the file, whose content is never touched.
///
/// ``LocksFile(path=None, mode="ofd", *, create=True, permissions=0o644,
/// follow_symlinks=False, thread_local=False)``. Without a path a fresh private lock file
/// (mode 0600) is created in ``tempfile.gettempdir()``, and removed again
/// by ``close()`` (or when the object is collected).
///
/// ``mode="ofd"`` (default): open-file-description locks; each object is
/// its own owner, so two objects exclude each other even between threads
/// of one process. ``mode="process"``: classic POSIX locks; every object on
/// one file in one process is the same owner, and the kernel detects
/// deadlocks between processes (``DeadlockError``). ``mode="flock"``:
/// ``flock(2)`` on the whole file, the lock ``filelock``, ``portalocker``,
/// ``fcntl.flock`` and ``flock(1)`` take, which the other two modes never
/// meet; each object is its own owner, the only span is the whole index
/// space (``slice(None)``; any other raises ``InvalidSpanError``), and a
/// conversion is not atomic (see the README). ``mode="shm"``: a lock table
/// in shared memory, in the sidecar file ``<path>-shm`` beside the lock
/// file (created with the same permission bits; everyone using the locks
/// must be able to write it); each object is its own owner as in OFD mode,
/// a lock and its release cost a few atomic operations instead of two
/// system calls, every deadlock is detected (``DeadlockError``), grants
/// are fair (a stream of readers cannot starve a writer), and a holder
/// that dies loses its locks within about 50 ms. It never meets the
/// kernel's locks: opening a file in shm mode while it has ``fcntl`` or
/// ``flock`` locks, or in another mode while its table is in use, raises
/// ``MixedModesError``; a network file system raises ``UnsupportedError``.
///
/// Threads sharing one object are one owner: they do not exclude each
/// other (in shm mode they are also one owner to deadlock detection: a
/// cycle through the object counts even if another of its threads could
/// still release). ``thread_local=True`` (not in process mode) gives each thread its own
/// owner, opened on its first call and closed when the thread ends (its
/// explicit locks released then; its guards live until released), so the
/// threads of one object exclude each other; ``held()`` is then per thread.
///
/// Spans are an int (one lock), a ``range`` with step 1, a ``slice`` with
/// step 1 (``slice(3, None)`` runs to the end), or a ``(start, count)``
/// pair. Locks are taken two ways that mix: guards (``read``/``write``...)
/// and the explicit ``acquire``/``release`` layer, where the last call on
/// an index wins. An index stays locked while either covers it, at the
/// strongest kind asked for.
///
/// Blocking waits release the GIL and end with ``KeyboardInterrupt`` on
/// Ctrl-C, with nothing half-held. An object inherited through ``fork``
/// raises ``ForkedError`` in the child and never touches the parent's
/// locks: open the path again there.
///
/// After ``close()`` every call raises ``ValueError`` (as a closed file
/// does), and calls that were waiting in other threads end with it too,
/// holding nothing; see ``close()``.
#[pyclass(name = "LocksFile", module = "pylocksfile", frozen, subclass, weakref)]
pub struct PyLocksFile {
    handle: Mutex<Option<Arc<LockFile>>>,
    guards: Mutex<Vec<Weak<GuardCell>>>,
    /// The waits in progress on this object (any thread's), which
    /// `close()` ends.
    waits: Waits,
    path: Py<PyString>,
    mode: Mode,
    /// The process that opened it: `held()` answers from bookkeeping
    /// without a system call, so it checks for a fork itself.
    pid: u32,
    /// `thread_local=True`: an owner per thread, opened on first use.
    threads: Option<ThreadOwners>,
    /// The file `LocksFile()` created for want of a path, removed on close.
    temp: Mutex<Option<TempFile>>,
    /// What pickling hands to the constructor again: a server target as
    /// given (its password too: never shown, never in an error), a file's
    /// path made absolute.
    target: Py<PyString>,
    /// The open options as given, pickled with the target.
    given: Given,
    /// The with statements open on it, and whether their blocks took a lock.
    with_blocks: WithBlocks,
}

/// The constructor's open options, kept for pickling.
#[derive(Clone, Copy)]
struct Given {
    create: bool,
    permissions: u32,
    follow_symlinks: bool,
    threads: Threads,
}

impl Given {
    const DEFAULT: Given = Given {
        create: true,
        permissions: 0o644,
        follow_symlinks: false,
        threads: Threads::Exclude,
    };
}

/// ``threads=`` as Python code passes it.
fn parse_threads(name: &str) -> PyResult<Threads> {
    match name {
        "exclude" => Ok(Threads::Exclude),
        "share" => Ok(Threads::Share),
        other => Err(PyValueError::new_err(format!(
            "threads must be \"exclude\" or \"share\", got {other:?}"
        ))),
    }
}

/// The party of each asyncio task that took a lock: tasks of one loop
/// (one thread) exclude each other as threads do, and a task's takes
/// compose, whether it awaits them or calls the blocking forms.
#[pyclass(name = "_TaskParty", module = "pylocksfile", frozen)]
pub struct TaskParty(Party);

/// The running asyncio task's party, if this thread runs one now.
fn task_party(py: Python<'_>) -> PyResult<Option<Party>> {
    use pyo3::sync::PyOnceLock;
    static RUNNING: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    static CURRENT: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    static PARTIES: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    let running = RUNNING.get_or_try_init(py, || {
        py.import("asyncio")?
            .getattr("_get_running_loop")
            .map(Bound::unbind)
    })?;
    let event_loop = running.bind(py).call0()?;
    if event_loop.is_none() {
        return Ok(None);
    }
    let current = CURRENT.get_or_try_init(py, || {
        py.import("asyncio")?
            .getattr("current_task")
            .map(Bound::unbind)
    })?;
    let task = current.bind(py).call1((event_loop,))?;
    if task.is_none() {
        return Ok(None);
    }
    let parties = PARTIES.get_or_try_init(py, || {
        py.import("weakref")?
            .getattr("WeakKeyDictionary")?
            .call0()
            .map(Bound::unbind)
    })?;
    let parties = parties.bind(py);
    if let Ok(p) = parties.call_method1("get", (&task,))?.cast::<TaskParty>() {
        return Ok(Some(p.get().0));
    }
    let party = Party::new();
    parties.set_item(&task, Py::new(py, TaskParty(party))?)?;
    Ok(Some(party))
}

/// A lock file this object created itself (no path was given): removed by
/// `close()` or collection, if the path still names that file.
struct TempFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl TempFile {
    fn remove(self) {
        use std::os::unix::fs::MetadataExt;
        // Only the file we made: a file renamed over it since is someone else's.
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if m.dev() == self.dev && m.ino() == self.ino {
                // Nothing to report: close() must not fail on a file already gone.
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// The owners of a `thread_local=True` object: one `LockFile` per thread,
/// kept in a `threading.local`, so that it is closed (and its explicit
/// locks released) when its thread ends. `close()` reaches them through
/// `slots`.
struct ThreadOwners {
    local: Py<PyAny>,
    slots: Mutex<Vec<Weak<Slot>>>,
    open: locksfile::OpenOptions,
    abs_path: PathBuf,
}

type Slot = Mutex<Option<Arc<LockFile>>>;

/// What a thread's `threading.local` keeps: that thread's owner.
#[pyclass(name = "_ThreadOwner", module = "pylocksfile", frozen)]
pub struct ThreadSlot {
    slot: Arc<Slot>,
}

impl ThreadOwners {
    fn add(&self, py: Python<'_>, lf: &Arc<LockFile>) -> PyResult<()> {
        let slot = Arc::new(Mutex::new(Some(Arc::clone(lf))));
        {
            let mut slots = lock_mutex(&self.slots);
            slots.retain(|w| w.strong_count() > 0);
            slots.push(Arc::downgrade(&slot));
        }
        self.local.bind(py).setattr(
            pyo3::intern!(py, "owner"),
            Py::new(py, ThreadSlot { slot })?,
        )
    }

    /// This thread's owner; opened now when `open` and it has none yet.
    fn current(&self, py: Python<'_>, open: bool) -> PyResult<Option<Arc<LockFile>>> {
        let local = self.local.bind(py);
        if let Ok(obj) = local.getattr(pyo3::intern!(py, "owner")) {
            let slot = obj.cast::<ThreadSlot>()?;
            // Emptied by close().
            return lock_mutex(&slot.get().slot)
                .as_ref()
                .map(|lf| Some(Arc::clone(lf)))
                .ok_or_else(closed_error);
        }
        if !open {
            return Ok(None);
        }
        let lf = Arc::new(self.open.open(&self.abs_path).map_err(|e| to_py(py, e))?);
        self.add(py, &lf)?;
        Ok(Some(lf))
    }

    /// Release and close every thread's owner (`close()`).
    fn close_all(&self, forked: bool) {
        let slots = std::mem::take(&mut *lock_mutex(&self.slots));
        for slot in slots.iter().filter_map(Weak::upgrade) {
            if let Some(lf) = lock_mutex(&slot).take() {
                if !forked {
                    let _ = lf.release_all();
                }
            }
        }
    }
}

impl Drop for PyLocksFile {
    fn drop(&mut self) {
        self.remove_temp();
    }
}

impl PyLocksFile {
    /// Inside an asyncio task, take locks for the task (see `TaskParty`)
    /// until the returned value is dropped.
    fn as_task(&self, py: Python<'_>) -> PyResult<Option<Entered>> {
        if self.given.threads == Threads::Share {
            return Ok(None);
        }
        Ok(task_party(py)?.map(Party::enter))
    }

    /// This thread's handle, unless closed or inherited through fork.
    fn lf_not_forked(&self, py: Python<'_>) -> PyResult<Arc<LockFile>> {
        Ok(self.lf_if_open(py, true)?.expect("opened when missing"))
    }

    /// As `lf_not_forked`, but a thread of a `thread_local=True` object
    /// that has no owner yet gets `None` rather than a new one.
    fn lf_if_open(&self, py: Python<'_>, open: bool) -> PyResult<Option<Arc<LockFile>>> {
        let lf = lock_mutex(&self.handle)
            .as_ref()
            .map(Arc::clone)
            .ok_or_else(closed_error)?;
        if std::process::id() != self.pid {
            return Err(to_py(py, Error::Forked));
        }
        match &self.threads {
            None => Ok(Some(lf)),
            Some(t) => t.current(py, open),
        }
    }

    fn remove_temp(&self) {
        // A forked child's copy must not take the parent's file away.
        if std::process::id() == self.pid {
            if let Some(t) = lock_mutex(&self.temp).take() {
                t.remove();
            }
        }
    }

    /// Wrap a lock just taken in a guard that `close()` can reach.
    fn register(&self, span: Span, h: Held) -> PyResult<PyGuard> {
        let cell = Arc::new(GuardCell {
            held: Mutex::new(h),
            span,
            pid: self.pid,
            waits: Waits::default(),
        });
        // Under the guards' lock, so `close()` (which closes first,
        // then takes the guards) either sees this guard or we see it closed.
        let mut guards = lock_mutex(&self.guards);
        if self.closed() {
            // Closed by another thread while this one waited.
            drop(guards);
            let _ = cell.release(Held::Closed);
            return Err(closed_while_waiting());
        }
        guards.retain(|w| w.strong_count() > 0);
        guards.push(Arc::downgrade(&cell));
        self.with_blocks.took();
        Ok(PyGuard::new(cell))
    }

    fn guard(
        &self,
        py: Python<'_>,
        span: &Bound<'_, PyAny>,
        kind: Kind,
        patience: Patience,
        refused: Refused,
    ) -> PyResult<Option<PyGuard>> {
        let span = py_span(span)?;
        let lf = self.lf_not_forked(py)?;
        let _as_task = self.as_task(py)?;
        let outcome = with_patience(py, patience, Some(&self.waits), |w, cancel| {
            if self.closed() {
                return Err(GIVE_UP);
            }
            take_guard(&lf, kind, span, w, cancel)
        })?;
        match outcome {
            Ok(h) => self.register(span, h).map(Some),
            Err(_) if self.closed() => Err(closed_while_waiting()),
            Err(Error::WouldBlock { .. }) if matches!(refused, Refused::Nothing) => Ok(None),
            Err(e @ Error::WouldBlock { .. }) if matches!(refused, Refused::TimedOut) => {
                Err(to_py(py, e.into_timed_out()))
            }
            Err(e) => Err(to_py(py, e)),
        }
    }

    /// The wait behind `read_async`/`write_async`/`acquire_async`.
    fn async_wait(
        slf: &Bound<'_, Self>,
        kind: Kind,
        span: &Bound<'_, PyAny>,
        blocking: bool,
        timeout: Option<f64>,
        explicit: bool,
    ) -> PyResult<PyWait> {
        let py = slf.py();
        let span = py_span(span)?;
        let (patience, refused) = Refused::from_args(blocking, timeout)?;
        let deadline = match patience {
            Patience::Never => Some(Instant::now()),
            Patience::Forever => None,
            Patience::Until(d) => Some(d),
        };
        let lf = slf.get().lf_not_forked(py)?;
        // The task's party, wherever the wait runs; one of its own when
        // made outside a task.
        let party = match slf.get().given.threads {
            Threads::Share => None,
            Threads::Exclude => Some(task_party(py)?.unwrap_or_else(Party::new)),
        };
        Ok(PyWait {
            party,
            owner: slf.clone().unbind(),
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
}

/// A row of `LocksFile._server_locks()`: index, kind, backend pid, granted.
type ServerLockRow = (u64, &'static str, Option<u32>, bool);

/// Hand a wait to its driver in `pylocksfile._async`.
fn async_helper<'py>(py: Python<'py>, name: &str, w: PyWait) -> PyResult<Bound<'py, PyAny>> {
    static MODULE: pyo3::sync::PyOnceLock<Py<pyo3::types::PyModule>> =
        pyo3::sync::PyOnceLock::new();
    let module =
        MODULE.get_or_try_init(py, || py.import("pylocksfile._async").map(Bound::unbind))?;
    module.bind(py).getattr(name)?.call1((Py::new(py, w)?,))
}

/// What a call makes of another owner in the way once it stops waiting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refused {
    /// Returns None (`try_read`, `try_write`).
    Nothing,
    /// Raises `WouldBlockError` (`blocking=False`; no timeout, waited for ever).
    WouldBlock,
    /// Raises `LockTimeout` (a `timeout` passed).
    TimedOut,
}

impl Refused {
    /// The patience and refusal of `blocking=` and `timeout=`: with
    /// `blocking=False` the timeout is ignored, as filelock does.
    fn from_args(blocking: bool, timeout: Option<f64>) -> PyResult<(Patience, Refused)> {
        let patience = Patience::from_args(blocking, timeout)?;
        let refused = if blocking && timeout.is_some() {
            Refused::TimedOut
        } else {
            Refused::WouldBlock
        };
        Ok((patience, refused))
    }
}

/// A guard on `span`, waiting as `w` says; `cancel` ends the wait.
fn take_guard(
    lf: &Arc<LockFile>,
    kind: Kind,
    span: Span,
    w: Wait,
    cancel: Option<&Cancel>,
) -> Result<Held, Error> {
    let lf = Arc::clone(lf);
    match (kind, cancel) {
        (Kind::Shared, None) => ReadGuard::acquire(lf, span, w).map(Held::Read),
        (Kind::Shared, Some(c)) => ReadGuard::acquire_cancellable(lf, span, w, c).map(Held::Read),
        (Kind::Exclusive, None) => WriteGuard::acquire(lf, span, w).map(Held::Write),
        (Kind::Exclusive, Some(c)) => {
            WriteGuard::acquire_cancellable(lf, span, w, c).map(Held::Write)
        }
    }
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
    owner: Py<PyLocksFile>,
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
    /// The Python value of a granted lock: its Guard, or True (explicit).
    fn granted(&self, py: Python<'_>, h: Option<Held>) -> PyResult<Py<PyAny>> {
        let owner = self.owner.get();
        match h {
            Some(h) => Ok(Py::new(py, owner.register(self.span, h)?)?.into_any()),
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
        if self.owner.get().closed() {
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
            take_guard(&self.lf, self.kind, self.span, w, None).map(Some)
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
        let owner = self.owner.get();
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
            take_guard(&self.lf, self.kind, self.span, wait, Some(&self.cancel))
        });
        match outcome {
            Ok(h) => self.granted(py, Some(h)).map(Some),
            Err(_) if owner.closed() => Err(closed_while_waiting()),
            Err(Error::Cancelled) => Ok(None),
            Err(e @ Error::WouldBlock { .. }) if matches!(self.refused, Refused::TimedOut) => {
                Err(to_py(py, e.into_timed_out()))
            }
            Err(e) => Err(to_py(py, e)),
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
        if !self.explicit || cell.span != self.span {
            return Err(PyRuntimeError::new_err(
                "commit() takes the guard that wait() of an acquire_async returned",
            ));
        }
        // Taken out of the guard: `close()` no longer reaches it, and the
        // lock is ours to unlock below.
        let h = {
            let mut slot = lock_mutex(&cell.held);
            match &*slot {
                Held::Read(_) | Held::Write(_) => std::mem::replace(&mut *slot, Held::Released),
                Held::Closed => return Err(closed_while_waiting()),
                Held::Busy | Held::Released => {
                    return Err(PyRuntimeError::new_err(
                        "the guard of this acquire_async was released before it was committed",
                    ))
                }
            }
        };
        let _as_task = self.party.map(Party::enter);
        let outcome = if self.owner.get().closed() {
            Err(GIVE_UP)
        } else {
            self.lf
                .acquire(self.kind, self.span, Wait::NonBlockingNoHolder)
        };
        let unlocked = h.unlock();
        match outcome {
            Err(_) if self.owner.get().closed() => Err(closed_while_waiting()),
            Ok(()) if self.owner.get().closed() => {
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

impl PyLocksFile {
    /// `LocksFile("postgresql://...?name=NAME")`: a session on the server.
    fn connect(
        py: Python<'_>,
        target: &Bound<'_, PyString>,
        mode: Mode,
        thread_local: bool,
        given: Given,
    ) -> PyResult<Self> {
        let text = target.extract::<String>()?;
        if mode != Mode::Ofd {
            return Err(PyValueError::new_err(
                "mode applies to lock files: a PostgreSQL target has its own mode",
            ));
        }
        if thread_local {
            return Err(PyValueError::new_err(
                "thread_local=True is for lock files: give each thread its own \
                 LocksFile(target), each a server session",
            ));
        }
        let lf = py
            .detach(|| LockFile::options().threads(given.threads).connect(&text))
            .map_err(|e| to_py(py, e))?;
        // The handle's own form of the target: never the password.
        let shown = PyString::new(py, &lf.path().display().to_string());
        Ok(PyLocksFile {
            handle: Mutex::new(Some(Arc::new(lf))),
            guards: Mutex::new(Vec::new()),
            waits: Waits::default(),
            path: shown.unbind(),
            mode: Mode::Postgres,
            pid: std::process::id(),
            threads: None,
            temp: Mutex::new(None),
            target: target.clone().unbind(),
            given,
            with_blocks: WithBlocks::default(),
        })
    }
}

#[pymethods]
impl PyLocksFile {
    #[new]
    #[pyo3(
        signature = (path = None, mode = "ofd", *, create = true, permissions = 0o644, follow_symlinks = false, thread_local = false, threads = "exclude"),
        text_signature = "(path=None, mode='ofd', *, create=True, permissions=0o644, follow_symlinks=False, thread_local=False, threads='exclude')"
    )]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        path: Option<&Bound<'_, PyAny>>,
        mode: &str,
        create: bool,
        permissions: u32,
        follow_symlinks: bool,
        thread_local: bool,
        threads: &str,
    ) -> PyResult<Self> {
        let mode = parse_mode(mode).map_err(PyValueError::new_err)?;
        let threads = parse_threads(threads)?;
        if permissions > 0o7777 {
            return Err(PyValueError::new_err("permissions must be at most 0o7777"));
        }
        if thread_local && mode == Mode::Process {
            return Err(PyValueError::new_err(
                "thread_local=True needs mode=\"ofd\", \"flock\" or \"shm\": in process mode all \
                 threads of a process are one owner, whatever the objects",
            ));
        }
        let given = Given {
            create,
            permissions,
            follow_symlinks,
            threads,
        };
        let os = py.import("os")?;
        let made_here = path.is_none();
        let path = match path {
            None => {
                let kw = pyo3::types::PyDict::new(py);
                kw.set_item("prefix", "locksfile-")?;
                kw.set_item("suffix", ".lock")?;
                let made = py
                    .import("tempfile")?
                    .call_method("mkstemp", (), Some(&kw))?;
                let made = made.cast::<PyTuple>()?;
                os.call_method1("close", (made.get_item(0)?,))?;
                made.get_item(1)?
            }
            Some(p) => os.call_method1("fspath", (p,))?,
        };
        let path = path.cast_into::<PyString>().map_err(|_| {
            PyTypeError::new_err("path must be a str or an os.PathLike giving a str")
        })?;
        // A path that is not valid UTF-8 (surrogate escapes) is a file.
        if let Ok(text) = path.extract::<String>() {
            if LockFile::is_server_target(&text) {
                return Self::connect(py, &path, mode, thread_local, given);
            }
        }
        let path_buf = path.extract::<PathBuf>()?;
        check_path(&path_buf).map_err(PyValueError::new_err)?;
        // Handed over as written: the core makes it absolute without
        // touching `..`, so `link/../x.lock` is resolved by the kernel,
        // symlink first, as every other opener of the same string does.
        let mut options = LockFile::options();
        options
            .mode(mode)
            .create(create)
            .permissions(permissions)
            .follow_symlinks(follow_symlinks)
            .threads(threads);
        let opened = options.open(&path_buf);
        let temp = made_here.then(|| {
            use std::os::unix::fs::MetadataExt;
            std::fs::symlink_metadata(&path_buf).ok().map(|m| TempFile {
                path: path_buf.clone(),
                dev: m.dev(),
                ino: m.ino(),
            })
        });
        let temp = temp.flatten();
        let lf = match opened {
            Ok(lf) => Arc::new(lf),
            Err(e) => {
                if let Some(t) = temp {
                    t.remove();
                }
                return Err(to_py(py, e));
            }
        };
        let abs = lf
            .path()
            .as_os_str()
            .into_pyobject(py)?
            .cast_into::<PyString>()?;
        let threads = if thread_local {
            let t = ThreadOwners {
                local: py.import("threading")?.call_method0("local")?.unbind(),
                slots: Mutex::new(Vec::new()),
                open: options,
                abs_path: lf.path().to_path_buf(),
            };
            t.add(py, &lf)?;
            Some(t)
        } else {
            None
        };
        Ok(PyLocksFile {
            handle: Mutex::new(Some(lf)),
            guards: Mutex::new(Vec::new()),
            waits: Waits::default(),
            path: abs.clone().unbind(),
            mode,
            pid: std::process::id(),
            threads,
            temp: Mutex::new(temp),
            target: abs.clone().unbind(),
            given,
            with_blocks: WithBlocks::default(),
        })
    }

    /// The lock file's path made absolute, as the core opened it: joined
    /// to the working directory, ``..`` kept (the kernel resolves it,
    /// symbolic links first, as for any other opener of the same string).
    #[getter]
    fn path(&self, py: Python<'_>) -> Py<PyString> {
        self.path.clone_ref(py)
    }

    /// ``"ofd"``, ``"process"``, ``"flock"`` or ``"shm"``.
    #[getter]
    fn mode(&self) -> String {
        self.mode.to_string()
    }

    /// Whether ``close()`` was called.
    #[getter]
    fn closed(&self) -> bool {
        lock_mutex(&self.handle).is_none()
    }

    /// Whether the file could be opened for writing (exclusive locks need it).
    #[getter]
    fn writable(&self, py: Python<'_>) -> PyResult<bool> {
        Ok(self.lf_not_forked(py)?.is_writable())
    }

    /// Wait for a shared lock on ``span`` and return its ``Guard``.
    /// ``timeout`` (seconds) raises ``LockTimeout`` when it passes;
    /// ``blocking=False`` does not wait (the timeout is ignored) and raises
    /// ``WouldBlockError`` when another owner is in the way.
    #[pyo3(signature = (span, *, blocking = true, timeout = None))]
    fn read(
        &self,
        py: Python<'_>,
        span: &Bound<'_, PyAny>,
        blocking: bool,
        timeout: Option<f64>,
    ) -> PyResult<PyGuard> {
        let (p, refused) = Refused::from_args(blocking, timeout)?;
        Ok(self
            .guard(py, span, Kind::Shared, p, refused)?
            .expect("a refusal raises"))
    }

    /// Wait for an exclusive lock on ``span`` and return its ``Guard``.
    /// ``timeout`` (seconds) raises ``LockTimeout`` when it passes;
    /// ``blocking=False`` does not wait (the timeout is ignored) and raises
    /// ``WouldBlockError`` when another owner is in the way.
    #[pyo3(signature = (span, *, blocking = true, timeout = None))]
    fn write(
        &self,
        py: Python<'_>,
        span: &Bound<'_, PyAny>,
        blocking: bool,
        timeout: Option<f64>,
    ) -> PyResult<PyGuard> {
        let (p, refused) = Refused::from_args(blocking, timeout)?;
        Ok(self
            .guard(py, span, Kind::Exclusive, p, refused)?
            .expect("a refusal raises"))
    }

    /// A shared lock on ``span`` if no other owner is in the way, else None.
    fn try_read(&self, py: Python<'_>, span: &Bound<'_, PyAny>) -> PyResult<Option<PyGuard>> {
        self.guard(py, span, Kind::Shared, Patience::Never, Refused::Nothing)
    }

    /// An exclusive lock on ``span`` if no other owner is in the way, else None.
    fn try_write(&self, py: Python<'_>, span: &Bound<'_, PyAny>) -> PyResult<Option<PyGuard>> {
        self.guard(py, span, Kind::Exclusive, Patience::Never, Refused::Nothing)
    }

    /// A shared lock on ``span``, waiting at most ``timeout`` seconds
    /// (``LockTimeout`` after that).
    fn read_for(&self, py: Python<'_>, span: &Bound<'_, PyAny>, timeout: f64) -> PyResult<PyGuard> {
        self.read(py, span, true, Some(timeout))
    }

    /// An exclusive lock on ``span``, waiting at most ``timeout`` seconds
    /// (``LockTimeout`` after that).
    fn write_for(
        &self,
        py: Python<'_>,
        span: &Bound<'_, PyAny>,
        timeout: f64,
    ) -> PyResult<PyGuard> {
        self.write(py, span, true, Some(timeout))
    }

    /// Lock ``span`` at ``kind`` (``"shared"``/``"exclusive"``) in the
    /// explicit layer, converting what it holds there in place. Without
    /// waiting (``blocking=False``, which ignores ``timeout``) a conflict
    /// raises ``WouldBlockError``; with ``timeout`` (seconds)
    /// ``LockTimeout``; in process and shm mode a deadlock raises
    /// ``DeadlockError``. On any error nothing changed.
    #[pyo3(signature = (kind, span, *, blocking = true, timeout = None))]
    fn acquire(
        &self,
        py: Python<'_>,
        kind: &Bound<'_, PyAny>,
        span: &Bound<'_, PyAny>,
        blocking: bool,
        timeout: Option<f64>,
    ) -> PyResult<()> {
        let kind = parse_kind(kind)?;
        let span = py_span(span)?;
        let (patience, refused) = Refused::from_args(blocking, timeout)?;
        let lf = self.lf_not_forked(py)?;
        let _as_task = self.as_task(py)?;
        let outcome = with_patience(py, patience, Some(&self.waits), |w, cancel| {
            if self.closed() {
                return Err(GIVE_UP);
            }
            match cancel {
                Some(c) => lf.acquire_cancellable(kind, span, w, c),
                None => lf.acquire(kind, span, w),
            }
        })?;
        match outcome {
            Err(_) if self.closed() => Err(closed_while_waiting()),
            Ok(()) if self.closed() => {
                // Closed by another thread while this one waited: `close()`
                // may have released everything before this lock was had.
                lf.release_all().map_err(|e| to_py(py, e))?;
                Err(closed_while_waiting())
            }
            Ok(()) => {
                self.with_blocks.took();
                Ok(())
            }
            Err(e @ Error::WouldBlock { .. }) if matches!(refused, Refused::TimedOut) => {
                Err(to_py(py, e.into_timed_out()))
            }
            Err(e) => Err(to_py(py, e)),
        }
    }

    /// Drop the explicit locks on ``span`` (all of them when None). Guards
    /// keep theirs. Releasing what is not held is harmless; never blocks.
    #[pyo3(signature = (span = None))]
    fn release(&self, py: Python<'_>, span: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let span = span.map(py_span).transpose()?;
        // A thread that has no owner yet holds nothing to release.
        let Some(lf) = self.lf_if_open(py, false)? else {
            return Ok(());
        };
        let _as_task = self.as_task(py)?;
        let r = match span {
            Some(s) => lf.release(s),
            None => lf.release_all(),
        };
        r.map_err(|e| to_py(py, e))
    }

    /// What this owner (with ``thread_local=True``, the calling thread's)
    /// holds, guards and explicit locks together, as a
    /// sorted list of ``(range, "shared" | "exclusive")``. In process mode
    /// that is every object of this file in this process.
    fn held<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let items = self
            .lf_if_open(py, false)?
            .map(|lf| lf.held())
            .unwrap_or_default()
            .into_iter()
            .map(|(s, k)| Ok((span_to_range(py, s)?, kind_name(k))))
            .collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, items)
    }

    /// Whether the server session is lost, and every lock with it (a
    /// PostgreSQL target; always ``False`` for a lock file). Checked
    /// without a round trip.
    fn lost(&self, py: Python<'_>) -> PyResult<bool> {
        Ok(self.lf_if_open(py, false)?.is_some_and(|lf| lf.lost()))
    }

    /// A fencing token for ``index``, held exclusively (a PostgreSQL
    /// target): grows with every call for that lock, whoever makes it.
    fn fence(&self, py: Python<'_>, index: u64) -> PyResult<u64> {
        let lf = self.lf_not_forked(py)?;
        py.detach(|| lf.fence(index)).map_err(|e| to_py(py, e))
    }

    /// This object's explicit locks only (the calling thread's with
    /// ``thread_local=True``), as ``held()`` lists them.
    fn held_explicitly<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let _as_task = self.as_task(py)?;
        let items = self
            .lf_if_open(py, false)?
            .map(|lf| lf.held_explicitly())
            .unwrap_or_default()
            .into_iter()
            .map(|(s, k)| Ok((span_to_range(py, s)?, kind_name(k))))
            .collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, items)
    }

    /// The first lock of another owner that would conflict with ``kind``
    /// on ``span`` (``F_GETLK``), as a ``Holder``, or None. A snapshot.
    ///
    /// ``conflicts(kind, span)``, the order of ``acquire`` and of the Rust
    /// ``LockFile::conflicts``; ``conflicts(span)`` asks about an exclusive
    /// lock. The arguments are told apart by type (a kind is a ``str``,
    /// a span never is), so the former order ``conflicts(span, kind)``
    /// still works; ``span=`` and ``kind=`` may be given by keyword.
    #[pyo3(
        signature = (*args, span = None, kind = None),
        text_signature = "($self, /, *args, span=..., kind=None)"
    )]
    fn conflicts(
        &self,
        py: Python<'_>,
        args: &Bound<'_, PyTuple>,
        span: Option<&Bound<'_, PyAny>>,
        kind: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Option<PyHolder>> {
        let (span, kind) = kind_and_span("conflicts", args, span, kind)?;
        let kind = match kind {
            Some(k) => parse_kind(&k)?,
            None => Kind::Exclusive,
        };
        let span = py_span(&span)?;
        self.lf_not_forked(py)?
            .conflicts(kind, span)
            .map(|h| h.map(PyHolder::from))
            .map_err(|e| to_py(py, e))
    }

    /// The descriptor locks go through (the calling thread's with
    /// ``thread_local=True``); in shm mode, the lock file's descriptor
    /// (the locks are in the table). Do not close it: in process mode
    /// that drops every lock the process holds on the file.
    fn fileno(&self, py: Python<'_>) -> PyResult<i32> {
        use std::os::fd::{AsFd, AsRawFd};
        Ok(self.lf_not_forked(py)?.as_fd().as_raw_fd())
    }

    /// In shm mode, this owner's id as ``_shm_table`` lists it (the calling
    /// thread's with ``thread_local=True``); None in the kernel modes. Not
    /// part of the public API.
    #[getter]
    fn _table_owner(&self, py: Python<'_>) -> PyResult<Option<u64>> {
        Ok(self.lf_not_forked(py)?.table_owner())
    }

    /// For a PostgreSQL target: every lock other sessions hold or wait for
    /// in its namespace, as ``(index, kind, backend_pid, granted)`` tuples
    /// (``locksfile status``'s view, a snapshot), for tests and tools.
    /// ``UnsupportedError`` for a lock file. Not part of the public API.
    fn _server_locks(&self, py: Python<'_>) -> PyResult<Vec<ServerLockRow>> {
        let lf = self.lf_not_forked(py)?;
        let locks = py.detach(|| lf.server_locks()).map_err(|e| to_py(py, e))?;
        Ok(locks
            .iter()
            .map(|l| {
                (
                    l.holder.span.start(),
                    kind_name(l.holder.kind),
                    l.holder.server.map(|s| s.backend_pid),
                    l.granted,
                )
            })
            .collect())
    }

    /// ``await lf.read_async(span, timeout=None)``, or ``async with
    /// lf.read_async(span) as g:``: a shared lock without blocking the
    /// event loop. On contention the wait runs in a thread of its own, as
    /// one wait for the lock (its place in a fair queue and deadlock
    /// detection kept); cancelling the task ends it at once, with nothing
    /// held and the thread gone. ``LockTimeout`` when ``timeout`` seconds
    /// pass. The owner is the calling thread's.
    #[pyo3(signature = (span, *, blocking = true, timeout = None))]
    fn read_async<'py>(
        slf: &Bound<'py, Self>,
        span: &Bound<'py, PyAny>,
        blocking: bool,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let w = Self::async_wait(slf, Kind::Shared, span, blocking, timeout, false)?;
        async_helper(slf.py(), "GuardRequest", w)
    }

    /// As ``read_async``, for an exclusive lock.
    #[pyo3(signature = (span, *, blocking = true, timeout = None))]
    fn write_async<'py>(
        slf: &Bound<'py, Self>,
        span: &Bound<'py, PyAny>,
        blocking: bool,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let w = Self::async_wait(slf, Kind::Exclusive, span, blocking, timeout, false)?;
        async_helper(slf.py(), "GuardRequest", w)
    }

    /// ``await lf.acquire_async(kind, span, timeout=None)``: ``acquire``
    /// without blocking the event loop, waiting as ``read_async`` does. A
    /// cancelled call leaves the explicit locks as they were.
    #[pyo3(signature = (kind, span, *, blocking = true, timeout = None))]
    fn acquire_async<'py>(
        slf: &Bound<'py, Self>,
        kind: &Bound<'py, PyAny>,
        span: &Bound<'py, PyAny>,
        blocking: bool,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let kind = parse_kind(kind)?;
        let w = Self::async_wait(slf, kind, span, blocking, timeout, true)?;
        async_helper(slf.py(), "acquire", w)
    }

    /// Release everything (explicit locks and every live guard) and close
    /// the handle. Closing twice is harmless.
    ///
    /// Calls of other threads (and asyncio waits) still waiting for a lock
    /// of this object end at once: they release what they got and raise
    /// ``ValueError`` (closed), so nothing stays held. An upgrade in
    /// progress on one of its guards ends the same way.
    ///
    /// In a forked child it closes the child's copy and releases nothing:
    /// the parent's locks stay.
    fn close(&self) -> PyResult<()> {
        let lf = lock_mutex(&self.handle).take();
        let forked = std::process::id() != self.pid;
        // Closed first: a wait that registers from now on sees it.
        if forked {
            // The parent's threads' waits: not this process's to end.
            self.waits.forget_all();
        } else {
            self.waits.cancel_all();
        }
        let guards = std::mem::take(&mut *lock_mutex(&self.guards));
        for g in guards.iter().filter_map(Weak::upgrade) {
            if forked {
                // Mark it closed without unlocking: the locks are the parent's.
                *lock_mutex(&g.held) = Held::Closed;
            } else {
                let _ = g.release(Held::Closed);
            }
        }
        if let Some(lf) = lf {
            if !forked {
                let _ = lf.release_all();
            }
        }
        if let Some(t) = &self.threads {
            t.close_all(forked);
        }
        self.remove_temp();
        Ok(())
    }

    /// Takes no lock: the with statement closes the handle at its end.
    /// A block that ends without taking a lock through it (holding none
    /// at its start) emits ``NoLockWarning``, unless it raised.
    fn __enter__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, Self>> {
        let me = slf.get();
        let held = !me.lf_not_forked(slf.py())?.held().is_empty();
        me.with_blocks.enter(held);
        Ok(slf.clone())
    }

    #[pyo3(signature = (*exc))]
    fn __exit__(&self, py: Python<'_>, exc: &Bound<'_, PyTuple>) -> PyResult<bool> {
        let no_lock = self.with_blocks.exit();
        self.close()?;
        // A block that raised may have stopped before its lock: no guess.
        let raised = exc.get_item(0).is_ok_and(|t| !t.is_none());
        if no_lock && !raised {
            let mode = match self.mode {
                Mode::Ofd | Mode::Postgres => String::new(),
                m => format!(", mode='{m}'"),
            };
            warn_no_lock(
                py,
                &format!("LocksFile({}{mode})", self.path.bind(py).repr()?),
            )?;
        }
        Ok(false)
    }

    /// Pickled as its target (the absolute path, or the server URL as
    /// given), mode and the options given, never its locks: unpickling
    /// opens the target again, a new owner holding nothing (so it can be
    /// passed to ``multiprocessing`` and ``ProcessPoolExecutor`` workers).
    /// ``ValueError`` once closed.
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyTuple>> {
        let py = slf.py();
        let me = slf.get();
        if me.closed() {
            return Err(closed_error());
        }
        // Its locks are taken through the copy: a with block that hands
        // it to other processes did take them through it.
        me.with_blocks.took();
        let kw = PyDict::new(py);
        if !matches!(me.mode, Mode::Ofd | Mode::Postgres) {
            kw.set_item("mode", me.mode.to_string())?;
        }
        let (given, default) = (me.given, Given::DEFAULT);
        if given.create != default.create {
            kw.set_item("create", given.create)?;
        }
        if given.permissions != default.permissions {
            kw.set_item("permissions", given.permissions)?;
        }
        if given.follow_symlinks != default.follow_symlinks {
            kw.set_item("follow_symlinks", given.follow_symlinks)?;
        }
        if me.threads.is_some() {
            kw.set_item("thread_local", true)?;
        }
        if given.threads != default.threads {
            kw.set_item("threads", "share")?;
        }
        pickled_as_new(slf.as_any(), PyTuple::new(py, [&me.target])?, kw)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "LocksFile({}, mode={:?}{}{}{})",
            self.path.bind(py).repr()?,
            self.mode.to_string(),
            if self.threads.is_some() {
                ", thread_local=True"
            } else {
                ""
            },
            if self.given.threads == Threads::Share {
                ", threads='share'"
            } else {
                ""
            },
            if self.closed() { ", closed" } else { "" }
        ))
    }
}

/// ``_shm_table(path)``: what the shm lock table of ``path`` holds, read
/// from outside without joining it, for tests and tools: a dict with
/// ``"holders"`` and ``"waiters"``, lists of ``(pid, owner, start, stop,
/// kind)`` (``stop`` exclusive; ``INDEX_END`` for spans to the end;
/// ``owner`` is the table's id of the handle). Empty when no one uses the
/// table. Not part of the public API.
#[pyfunction]
pub fn _shm_table<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyDict>> {
    let snap = py
        .detach(|| locksfile::shm::Snapshot::read(&path))
        .map_err(|e| to_py(py, e))?;
    let row = |pid: u32, owner: u64, span: Span, kind: Kind| {
        (pid, owner, span.start(), span.end(), kind_name(kind))
    };
    let out = PyDict::new(py);
    let holders: Vec<_> = snap
        .holders
        .iter()
        .map(|h| row(h.pid, h.owner, h.span, h.kind))
        .collect();
    let waiters: Vec<_> = snap
        .waiters
        .iter()
        .map(|w| row(w.pid, w.owner, w.span, w.kind))
        .collect();
    out.set_item("holders", holders)?;
    out.set_item("waiters", waiters)?;
    Ok(out)
}
