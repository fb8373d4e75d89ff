//! `LocksFile`: the Python class, over its `Owner`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use locksfile::{Kind, LockFile, Mode, Threads};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};

use crate::errors::to_py;
use crate::holder::PyHolder;
use crate::kinds::{kind_and_span, kind_name, parse_kind};
use crate::modes::parse_mode;
use crate::mutex::lock_mutex;
use crate::paths::check_path;
use crate::spans::{plain_index, py_span, span_to_range};
use crate::wait::Patience;
use crate::with_block::{warn_no_lock, Exit};

use super::async_wait::{async_helper, PyWait};
use super::guard::PyGuard;
use super::outcomes::{closed_error, Refused};
use super::owner::Owner;
use super::pickling::{parse_threads, pickled_as_new, Given};
use super::thread_owners::ThreadOwners;

/// A lock file: many numbered reader/writer locks, lock ``n`` being byte
/// ``n`` of the file, whose content is never touched.
///
/// ``LocksFile(path=None, mode="ofd", *, create=True, permissions=0o644,
/// follow_symlinks=False, thread_local=False, threads="exclude",
/// on_lost=None, stats=None)``; ``path`` may also name a lock namespace on
/// a PostgreSQL server (``postgresql://...?name=NAME``). Without a path a fresh private lock file
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
/// Threads sharing one object exclude each other (``threads="exclude"``,
/// the default): each thread, and each asyncio task, is a party of the
/// object's owner, whose takes compose with its own and wait for (or are
/// refused by) another party's; a cycle of parties is ``DeadlockError``.
/// ``threads="share"`` makes the object's locks every thread's, as the
/// original ``pylocksfile`` has them. ``thread_local=True`` (not in process
/// mode) gives each thread an owner of its own instead, opened on its first
/// call and closed when the thread ends (its explicit locks released then;
/// its guards live until released); ``held()`` is then per thread.
/// ``stats=True`` records lock statistics (``stats()``); ``on_lost`` is
/// called, on a server, once the session and its locks are gone.
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
    /// What its guards and asyncio waits share with it (`Arc`: a wait
    /// keeps it).
    owner: Arc<Owner>,
    path: Py<PyString>,
    mode: Mode,
    /// The file `LocksFile()` created for want of a path, removed on close.
    temp: Mutex<Option<TempFile>>,
    /// What pickling hands to the constructor again: a server target as
    /// given (its password too: never shown, never in an error), a file's
    /// path made absolute.
    target: Py<PyString>,
    /// The open options as given, pickled with the target.
    given: Given,
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

impl Drop for PyLocksFile {
    fn drop(&mut self) {
        // The kept guard holds the owner's cache: let go of it (collection
        // runs with the GIL held).
        Python::attach(|py| self.owner.guard_cache.clear(py));
        self.remove_temp();
    }
}

impl PyLocksFile {
    fn remove_temp(&self) {
        // A forked child's copy must not take the parent's file away.
        if !self.owner.born.forked() {
            if let Some(t) = lock_mutex(&self.temp).take() {
                t.remove();
            }
        }
    }

    /// The one path of `read`, `write` and their `try_` and `_for` forms:
    /// a guard of `kind` on `span`, waiting as `patience` says; None when
    /// refused with `Refused::Nothing`.
    fn guard<'py>(
        &self,
        py: Python<'py>,
        span: &Bound<'_, PyAny>,
        kind: Kind,
        patience: Patience,
        refused: Refused,
    ) -> PyResult<Option<Bound<'py, PyGuard>>> {
        let span = py_span(span)?;
        let lf = self.owner.lf_not_forked(py)?;
        self.owner.guard(py, &lf, kind, span, patience, refused)
    }

    /// `read(span)` and `write(span)` (no keywords): the guard.
    pub(crate) fn guard_forever<'py>(
        &self,
        py: Python<'py>,
        span: &Bound<'_, PyAny>,
        kind: Kind,
    ) -> PyResult<Bound<'py, PyGuard>> {
        let span = match plain_index(span) {
            Some(s) => s,
            None => py_span(span)?,
        };
        self.owner.guard_forever(py, kind, span)
    }

    /// `read` and `write`: the guard, or the refusal raised.
    pub(crate) fn guard_or_raise<'py>(
        &self,
        py: Python<'py>,
        span: &Bound<'_, PyAny>,
        kind: Kind,
        blocking: bool,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyGuard>> {
        let (patience, refused) = Refused::from_args(blocking, timeout)?;
        Ok(self
            .guard(py, span, kind, patience, refused)?
            .expect("a refusal raises"))
    }

    /// The one path of `read_async`, `write_async` and `acquire_async`:
    /// the wait, handed to its driver's `helper`.
    #[allow(clippy::too_many_arguments)]
    fn wait_async<'py>(
        slf: &Bound<'py, Self>,
        helper: &str,
        kind: Kind,
        span: &Bound<'py, PyAny>,
        blocking: bool,
        timeout: Option<f64>,
        explicit: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let span = py_span(span)?;
        let owner = &slf.get().owner;
        let w = PyWait::new(slf.as_any(), owner, kind, span, blocking, timeout, explicit)?;
        async_helper(slf.py(), helper, w)
    }
}

/// A row of `LocksFile._server_locks()`: index, kind, backend pid, granted.
type ServerLockRow = (u64, &'static str, Option<u32>, bool);

impl PyLocksFile {
    /// `LocksFile("postgresql://...?name=NAME")`: a session on the server.
    /// Call `cb()` (on a thread of its own, holding the GIL) once the
    /// server session is gone; an exception it raises goes to
    /// `sys.unraisablehook`, as a finalizer's does.
    fn call_on_lost(&self, py: Python<'_>, cb: Py<PyAny>) -> PyResult<()> {
        let lf = self.owner.lf_not_forked(py)?;
        lf.on_lost(move || {
            Python::attach(|py| {
                if let Err(e) = cb.call0(py) {
                    e.write_unraisable(py, Some(cb.bind(py)));
                }
            })
        })
        .map_err(|e| to_py(py, e))
    }

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
            .detach(|| {
                let mut o = LockFile::options();
                if let Some(s) = given.stats {
                    o.stats(s);
                }
                o.threads(given.threads).connect(&text)
            })
            .map_err(|e| to_py(py, e))?;
        // The handle's own form of the target: never the password.
        let shown = PyString::new(py, &lf.path().display().to_string());
        Ok(PyLocksFile {
            owner: Arc::new(Owner::new(Arc::new(lf), None, given.threads)),
            path: shown.unbind(),
            mode: Mode::Postgres,
            temp: Mutex::new(None),
            target: target.clone().unbind(),
            given,
        })
    }
}

#[pymethods]
impl PyLocksFile {
    #[new]
    #[pyo3(
        signature = (path = None, mode = "ofd", *, create = true, permissions = 0o644, follow_symlinks = false, thread_local = false, threads = "exclude", on_lost = None, stats = None),
        text_signature = "(path=None, mode='ofd', *, create=True, permissions=0o644, follow_symlinks=False, thread_local=False, threads='exclude', on_lost=None, stats=None)"
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
        on_lost: Option<Py<PyAny>>,
        stats: Option<bool>,
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
            stats,
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
                let me = Self::connect(py, &path, mode, thread_local, given)?;
                if let Some(cb) = on_lost {
                    me.call_on_lost(py, cb)?;
                }
                return Ok(me);
            }
        }
        if on_lost.is_some() {
            return Err(PyValueError::new_err(
                "on_lost= is for server targets: a lock file's locks are lost only with the process",
            ));
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
        if let Some(s) = stats {
            options.stats(s);
        }
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
            Some(ThreadOwners::new(py, options, &lf)?)
        } else {
            None
        };
        Ok(PyLocksFile {
            owner: Arc::new(Owner::new(lf, threads, given.threads)),
            path: abs.clone().unbind(),
            mode,
            temp: Mutex::new(temp),
            target: abs.clone().unbind(),
            given,
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
        self.owner.closed()
    }

    /// Whether the file could be opened for writing (exclusive locks need it).
    #[getter]
    fn writable(&self, py: Python<'_>) -> PyResult<bool> {
        Ok(self.owner.lf_not_forked(py)?.is_writable())
    }

    /// Wait for a shared lock on ``span`` and return its ``Guard``.
    /// ``timeout`` (seconds) raises ``LockTimeout`` when it passes;
    /// ``blocking=False`` does not wait (the timeout is ignored) and raises
    /// ``WouldBlockError`` when another owner is in the way.
    #[pyo3(signature = (span, *, blocking = true, timeout = None))]
    fn read<'py>(
        &self,
        py: Python<'py>,
        span: &Bound<'_, PyAny>,
        blocking: bool,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyGuard>> {
        self.guard_or_raise(py, span, Kind::Shared, blocking, timeout)
    }

    /// Wait for an exclusive lock on ``span`` and return its ``Guard``.
    /// ``timeout`` (seconds) raises ``LockTimeout`` when it passes;
    /// ``blocking=False`` does not wait (the timeout is ignored) and raises
    /// ``WouldBlockError`` when another owner is in the way.
    #[pyo3(signature = (span, *, blocking = true, timeout = None))]
    fn write<'py>(
        &self,
        py: Python<'py>,
        span: &Bound<'_, PyAny>,
        blocking: bool,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyGuard>> {
        self.guard_or_raise(py, span, Kind::Exclusive, blocking, timeout)
    }

    /// A shared lock on ``span`` if no other owner is in the way, else None.
    fn try_read<'py>(
        &self,
        py: Python<'py>,
        span: &Bound<'_, PyAny>,
    ) -> PyResult<Option<Bound<'py, PyGuard>>> {
        self.guard(py, span, Kind::Shared, Patience::Never, Refused::Nothing)
    }

    /// An exclusive lock on ``span`` if no other owner is in the way, else None.
    fn try_write<'py>(
        &self,
        py: Python<'py>,
        span: &Bound<'_, PyAny>,
    ) -> PyResult<Option<Bound<'py, PyGuard>>> {
        self.guard(py, span, Kind::Exclusive, Patience::Never, Refused::Nothing)
    }

    /// A shared lock on ``span``, waiting at most ``timeout`` seconds
    /// (``LockTimeout`` after that).
    fn read_for<'py>(
        &self,
        py: Python<'py>,
        span: &Bound<'_, PyAny>,
        timeout: f64,
    ) -> PyResult<Bound<'py, PyGuard>> {
        self.read(py, span, true, Some(timeout))
    }

    /// An exclusive lock on ``span``, waiting at most ``timeout`` seconds
    /// (``LockTimeout`` after that).
    fn write_for<'py>(
        &self,
        py: Python<'py>,
        span: &Bound<'_, PyAny>,
        timeout: f64,
    ) -> PyResult<Bound<'py, PyGuard>> {
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
        let lf = self.owner.lf_not_forked(py)?;
        self.owner.acquire(py, &lf, kind, span, patience, refused)
    }

    /// Drop the explicit locks on ``span`` (all of them when None). Guards
    /// keep theirs. Releasing what is not held is harmless; never blocks.
    #[pyo3(signature = (span = None))]
    fn release(&self, py: Python<'_>, span: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let span = span.map(py_span).transpose()?;
        // A thread that has no owner yet holds nothing to release.
        let Some(lf) = self.owner.lf_if_open(py, false)? else {
            return Ok(());
        };
        let _as_task = self.owner.as_task(py)?;
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
            .owner
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
        Ok(self
            .owner
            .lf_if_open(py, false)?
            .is_some_and(|lf| lf.lost()))
    }

    /// A fencing token for ``index``, held exclusively (a PostgreSQL
    /// target): grows with every call for that lock, whoever makes it.
    fn fence(&self, py: Python<'_>, index: u64) -> PyResult<u64> {
        let lf = self.owner.lf_not_forked(py)?;
        py.detach(|| lf.fence(index)).map_err(|e| to_py(py, e))
    }

    /// Lock statistics as a dict (see ``locksfile stats --json``):
    /// table-wide for ``mode="shm"``, else this object's own; recorded
    /// only with ``stats=True`` (or ``LOCKSFILE_STATS=1``).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let lf = self.owner.lf_not_forked(py)?;
        let s = py.detach(|| lf.stats()).map_err(|e| to_py(py, e))?;
        super::stats::to_dict(py, &s)
    }

    /// This object's explicit locks only (the calling thread's with
    /// ``thread_local=True``), as ``held()`` lists them.
    fn held_explicitly<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let _as_task = self.owner.as_task(py)?;
        let items = self
            .owner
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
        self.owner
            .lf_not_forked(py)?
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
        Ok(self.owner.lf_not_forked(py)?.as_fd().as_raw_fd())
    }

    /// In shm mode, this owner's id as ``_shm_table`` lists it (the calling
    /// thread's with ``thread_local=True``); None in the kernel modes. Not
    /// part of the public API.
    #[getter]
    fn _table_owner(&self, py: Python<'_>) -> PyResult<Option<u64>> {
        Ok(self.owner.lf_not_forked(py)?.table_owner())
    }

    /// For a PostgreSQL target: every lock other sessions hold or wait for
    /// in its namespace, as ``(index, kind, backend_pid, granted)`` tuples
    /// (``locksfile status``'s view, a snapshot), for tests and tools.
    /// ``UnsupportedError`` for a lock file. Not part of the public API.
    fn _server_locks(&self, py: Python<'_>) -> PyResult<Vec<ServerLockRow>> {
        let lf = self.owner.lf_not_forked(py)?;
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
        Self::wait_async(
            slf,
            "GuardRequest",
            Kind::Shared,
            span,
            blocking,
            timeout,
            false,
        )
    }

    /// As ``read_async``, for an exclusive lock.
    #[pyo3(signature = (span, *, blocking = true, timeout = None))]
    fn write_async<'py>(
        slf: &Bound<'py, Self>,
        span: &Bound<'py, PyAny>,
        blocking: bool,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        Self::wait_async(
            slf,
            "GuardRequest",
            Kind::Exclusive,
            span,
            blocking,
            timeout,
            false,
        )
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
        Self::wait_async(slf, "acquire", kind, span, blocking, timeout, true)
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
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        self.owner.close(py);
        self.remove_temp();
        Ok(())
    }

    /// Takes no lock: the with statement closes the handle at its end
    /// (nested blocks, or blocks of several threads: at the end of the last
    /// one open, so no block loses its locks to another's end). A block
    /// that ends without taking a lock through it (holding none at its
    /// start) emits ``NoLockWarning``, unless it raised.
    fn __enter__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, Self>> {
        let me = slf.get();
        let held = !me.owner.lf_not_forked(slf.py())?.held().is_empty();
        me.owner.with_blocks.enter(held);
        Ok(slf.clone())
    }

    #[pyo3(signature = (*exc))]
    fn __exit__(&self, py: Python<'_>, exc: &Bound<'_, PyTuple>) -> PyResult<bool> {
        let Exit { no_lock, last } = self.owner.with_blocks.exit();
        if last {
            self.close(py)?;
        }
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
        me.owner.with_blocks.took();
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
        if me.owner.threads.is_some() {
            kw.set_item("thread_local", true)?;
        }
        if given.threads != default.threads {
            kw.set_item("threads", "share")?;
        }
        if let Some(s) = given.stats {
            kw.set_item("stats", s)?;
        }
        pickled_as_new(slf.as_any(), PyTuple::new(py, [&me.target])?, kw)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "LocksFile({}, mode={:?}{}{}{})",
            self.path.bind(py).repr()?,
            self.mode.to_string(),
            if self.owner.threads.is_some() {
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
