//! `pylocksfile`: the original package's class, same calls, same answers.
//!
//! Implemented in Rust so that the common call, `acquire(writeLock=True,
//! lock_n=5)` then `release(5)`, costs little more than the two `fcntl`
//! calls it makes: arguments are checked here without allocating, the lock
//! is tried once with the GIL held, and only contention releases the GIL.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::ThreadId;

use locksfile::{Error, Kind, LockFile, Mode, Span, Threads, Wait};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyString, PyTuple};

use crate::errors::to_py;
use crate::exceptions::{illegal_argument, illegal_with};
use crate::mutex::lock_mutex;
use crate::paths::check_path;
use crate::wait::{continue_patience, with_patience, Patience};

use super::args::{compat_mode, LockN, VerboseArg, WriteLockArg};
use super::words::{holder_words, kind_word, locks};

/// A `with lf(...)` in progress: `lf(...)` records it, `__enter__` takes it.
struct WithEntry {
    thread: ThreadId,
    write: bool,
    span: Span,
    entered: bool,
}

/// A lock file holding many numbered reader/writer locks; lock ``n`` is byte
/// ``n`` of the file. A drop-in for ``pylocksfile.pylocksfile`` 0.0.6.
///
/// ``pylocksfile(locksfile_path=None, verbose=False, l_id=None, *,
/// mode="process")``: without a path a fresh private lock file (mode 0600)
/// is created in ``tempfile.gettempdir()``; it is left in place so other
/// processes can open ``locksfile_path``. An existing file is opened, never
/// truncated; a missing file is created with mode 0644. Symbolic links at
/// the lock path are refused. ``l_id`` (default: the pid as a string)
/// prefixes what ``verbose`` prints.
///
/// Locks are process-associated ``fcntl`` record locks, as in the original:
/// all objects on one file in one process are one owner to the kernel, and
/// the kernel detects deadlocks between processes. Other threads of the
/// process never wait for this process's own locks; use ``LocksFile`` for
/// locks that exclude threads. This default is what excludes processes
/// still running the original package.
///
/// ``mode`` picks other locks, as ``LocksFile``'s modes: ``"shm"``, a lock
/// table in shared memory (the sidecar ``<locksfile_path>-shm``), several
/// times cheaper per call, with deadlock detection between any owners and
/// fair grants; ``"ofd"``, open-file-description locks. In both each object
/// is its own owner (two objects exclude each other, even in one thread),
/// and neither excludes the original package, which takes process-mode
/// locks: every process sharing the locks must pick the same mode (shm
/// mode and the ``fcntl`` modes refuse each other's files with
/// ``MixedModesError``). ``"flock"`` is refused: it has no numbered locks.
///
/// After ``fork`` the child's object is a fresh owner of the same file: it
/// holds nothing at first, and nothing it does (including being deleted)
/// touches the parent's locks, as with the original.
#[pyclass(
    name = "pylocksfile",
    module = "pylocksfile",
    frozen,
    subclass,
    weakref
)]
pub struct Pylocksfile {
    /// Set by `__init__` (so that subclasses calling `super().__init__(...)`
    /// work as with the original's plain Python class).
    state: OnceLock<Open>,
    /// The handle this process uses when `handle` was inherited through fork.
    child: Mutex<Option<(u32, Arc<LockFile>)>>,
    verbose: AtomicBool,
    withs: Mutex<Vec<WithEntry>>,
}

/// What `__init__` opened.
struct Open {
    handle: Arc<LockFile>,
    path: Py<PyString>,
    path_buf: PathBuf,
    l_id: Py<PyAny>,
    /// Whether `l_id` was given (pickling passes it on then; the default
    /// is the opener's pid, the unpickling process's pid there).
    l_id_given: bool,
    /// The process that opened it.
    pid: u32,
    mode: Mode,
}

fn open_mode(path: &std::path::Path, mode: Mode) -> Result<LockFile, Error> {
    // A lock namespace on a server where a path is taken: a session of
    // its own (the file modes have no meaning there).
    // The original's locks are the object's, every thread's (fcntl process
    // locks): its threads share them, as its README says.
    let mut options = LockFile::options();
    options.threads(Threads::Share);
    if let Some(target) = path.to_str().filter(|t| LockFile::is_server_target(t)) {
        return options.connect(target);
    }
    options.mode(mode).open(path)
}

impl Pylocksfile {
    fn open(&self) -> PyResult<&Open> {
        self.state.get().ok_or_else(|| {
            pyo3::exceptions::PyRuntimeError::new_err(
                "pylocksfile.__init__ was not called (a subclass's __init__ must call it)",
            )
        })
    }

    /// `acquire(writeLock, lock_n, blocking)`, arguments checked (the
    /// Python method is in `fastcall`). The hot path: nothing to print, no
    /// contention, not forked: one try with the GIL held.
    pub fn acquire(
        &self,
        py: Python<'_>,
        write: bool,
        span: Span,
        blocking: bool,
    ) -> PyResult<bool> {
        let kind = if write { Kind::Exclusive } else { Kind::Shared };
        if !self.verbose() {
            let h = &self.open()?.handle;
            match h.acquire(kind, span, Wait::NonBlockingNoHolder) {
                Ok(()) => return Ok(true),
                Err(Error::WouldBlock { .. }) if !blocking => return Ok(false),
                first @ Err(Error::WouldBlock { .. }) => {
                    let r = continue_patience(py, Patience::Forever, first, None, |w, _| {
                        h.acquire(kind, span, w)
                    })?;
                    return self.outcome(py, kind, span, r, &[]);
                }
                Err(_) => {}
            }
        }
        self.do_acquire(py, kind, span, blocking)
    }

    /// `release(lock_n)`, argument checked (the Python method is in `fastcall`).
    pub fn release(&self, py: Python<'_>, span: Option<Span>) -> PyResult<()> {
        if let (Some(s), false) = (span, self.verbose()) {
            if self.open()?.handle.release(s).is_ok() {
                return Ok(());
            }
        }
        self.do_release(py, span)
    }

    /// The handle of this process: the original one, or after a fork a
    /// fresh one opened by path in the child.
    fn child_handle(&self, py: Python<'_>) -> PyResult<Arc<LockFile>> {
        let pid = std::process::id();
        let mut child = lock_mutex(&self.child);
        if let Some((p, h)) = &*child {
            if *p == pid {
                return Ok(Arc::clone(h));
            }
        }
        let open = self.open()?;
        let h = Arc::new(open_mode(&open.path_buf, open.mode).map_err(|e| to_py(py, e))?);
        // The old one, if any, was inherited too: dropping it here touches
        // no lock of any process.
        *child = Some((pid, Arc::clone(&h)));
        Ok(h)
    }

    /// The handle to use now (the slow way; the hot paths try `handle` first).
    fn current(&self, py: Python<'_>) -> PyResult<Arc<LockFile>> {
        let open = self.open()?;
        if std::process::id() == open.pid {
            Ok(Arc::clone(&open.handle))
        } else {
            self.child_handle(py)
        }
    }

    fn say(&self, py: Python<'_>, msg: &str) {
        let Some(open) = self.state.get() else {
            return;
        };
        let l_id = open
            .l_id
            .bind(py)
            .str()
            .map(|s| s.to_string())
            .unwrap_or_default();
        let line = format!("{l_id} - {msg}");
        let printed = py.import("builtins").and_then(|b| {
            let kwargs = pyo3::types::PyDict::new(py);
            kwargs.set_item("flush", true)?;
            b.getattr("print")?.call((line,), Some(&kwargs))
        });
        if let Err(e) = printed {
            e.write_unraisable(py, None);
        }
    }

    fn verbose(&self) -> bool {
        self.verbose.load(Ordering::Relaxed)
    }

    /// Acquire; `Ok(false)` for contention without waiting or a deadlock.
    fn do_acquire(&self, py: Python<'_>, kind: Kind, span: Span, blocking: bool) -> PyResult<bool> {
        let verbose = self.verbose();
        let before = if verbose {
            self.current(py)?.held_explicitly()
        } else {
            Vec::new()
        };
        let first = self
            .open()?
            .handle
            .acquire(kind, span, Wait::NonBlockingNoHolder);
        let outcome = match first {
            Ok(()) => Ok(()),
            first @ Err(Error::WouldBlock { .. }) if blocking => {
                let h = &self.open()?.handle;
                continue_patience(py, Patience::Forever, first, None, |w, _| {
                    h.acquire(kind, span, w)
                })?
            }
            Err(Error::Forked) => {
                let h = self.child_handle(py)?;
                let patience = if blocking {
                    Patience::Forever
                } else {
                    Patience::Never
                };
                with_patience(py, patience, None, |w, _| h.acquire(kind, span, w))?
            }
            Err(e) => Err(e),
        };
        self.outcome(py, kind, span, outcome, &before)
    }

    /// The answer to `acquire`: True, False (busy or deadlock), or an error.
    fn outcome(
        &self,
        py: Python<'_>,
        kind: Kind,
        span: Span,
        outcome: Result<(), Error>,
        before: &[(Span, Kind)],
    ) -> PyResult<bool> {
        let verbose = self.verbose();
        match outcome {
            Ok(()) => {
                if verbose {
                    self.say_acquired(py, kind, span, before);
                }
                Ok(true)
            }
            Err(Error::WouldBlock { holder, .. }) => {
                if verbose {
                    let why = holder.map_or_else(|| "busy".to_string(), |h| holder_words(&h));
                    self.say(
                        py,
                        &format!("{} {} not acquired: {why}", kind_word(kind), locks(span)),
                    );
                }
                Ok(false)
            }
            Err(Error::Deadlock { .. }) => {
                if verbose {
                    self.say(
                        py,
                        &format!(
                            "{} {} not acquired: {} detected a deadlock (EDEADLK); \
                             the request was dropped",
                            kind_word(kind),
                            locks(span),
                            match self.state.get().map(|o| o.mode) {
                                Some(Mode::Shm) => "the lock table",
                                _ => "the kernel",
                            }
                        ),
                    );
                }
                Ok(false)
            }
            Err(e) => Err(to_py(py, e)),
        }
    }

    fn say_acquired(&self, py: Python<'_>, kind: Kind, span: Span, before: &[(Span, Kind)]) {
        let mut msg = format!("{} {} acquired", kind_word(kind), locks(span));
        for (s, k) in before {
            if *k != kind {
                if let Some(part) = s.intersect(span) {
                    msg.push_str(&format!(
                        "; converted {} from {} to {}",
                        locks(part),
                        kind_word(*k),
                        kind_word(kind)
                    ));
                }
            }
        }
        self.say(py, &msg);
    }

    fn do_release(&self, py: Python<'_>, span: Option<Span>) -> PyResult<()> {
        let r = match span {
            Some(s) => self.open()?.handle.release(s),
            None => self.open()?.handle.release_all(),
        };
        let r = match r {
            Err(Error::Forked) => {
                let h = self.child_handle(py)?;
                match span {
                    Some(s) => h.release(s),
                    None => h.release_all(),
                }
            }
            r => r,
        };
        if self.verbose() {
            match span {
                Some(s) => self.say(py, &format!("released {}", locks(s))),
                None => self.say(py, "released all locks"),
            }
        }
        r.map_err(|e| to_py(py, e))
    }
}

#[pymethods]
impl Pylocksfile {
    /// An object with nothing open yet: `__init__` opens the lock file.
    #[new]
    #[pyo3(
        signature = (*_args, **_kwargs),
        text_signature = "(locksfile_path=None, verbose=False, l_id=None, *, mode='process')"
    )]
    fn new(
        _args: &Bound<'_, PyTuple>,
        _kwargs: Option<&Bound<'_, pyo3::types::PyDict>>,
    ) -> Pylocksfile {
        Pylocksfile {
            state: OnceLock::new(),
            child: Mutex::new(None),
            verbose: AtomicBool::new(false),
            withs: Mutex::new(Vec::new()),
        }
    }

    /// Open (or create) the lock file; see the class documentation.
    #[pyo3(signature = (locksfile_path = None, verbose = VerboseArg(false), l_id = None, *, mode = None))]
    fn __init__(
        &self,
        py: Python<'_>,
        locksfile_path: Option<&Bound<'_, PyAny>>,
        verbose: VerboseArg,
        l_id: Option<Py<PyAny>>,
        mode: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        if self.state.get().is_some() {
            return Err(pyo3::exceptions::PyRuntimeError::new_err(
                "pylocksfile objects cannot be initialized twice",
            ));
        }
        // Checked before anything is created: a bad mode loses nothing.
        let mode = match mode {
            None => Mode::Process,
            Some(m) => compat_mode(m)?,
        };
        let os = py.import("os")?;
        let os_path = os.getattr("path")?;
        let path: Bound<'_, PyAny> = match locksfile_path {
            None => {
                // mkstemp: a new file of our own, mode 0600, never an existing one.
                let made = py.import("tempfile")?.call_method(
                    "mkstemp",
                    (),
                    Some(&{
                        let kw = pyo3::types::PyDict::new(py);
                        kw.set_item("prefix", "pylocksfile-")?;
                        kw.set_item("suffix", ".lock")?;
                        kw
                    }),
                )?;
                let made = made.cast::<PyTuple>()?;
                os.call_method1("close", (made.get_item(0)?,))?;
                made.get_item(1)?
            }
            Some(p) => {
                if !(p.is_instance_of::<PyString>() || p.hasattr("__fspath__")?) {
                    let ty = p.get_type().name()?.to_string();
                    return Err(illegal_argument(
                        py,
                        format!("locksfile_path must be a str or os.PathLike, got {ty}"),
                    ));
                }
                let p = os.call_method1("fspath", (p,))?;
                if !p.is_instance_of::<PyString>() {
                    return Err(illegal_argument(py, "locksfile_path must name a str path"));
                }
                p
            }
        };
        let path = path.cast_into::<PyString>()?;
        let given = path.extract::<PathBuf>()?;
        if let Err(msg) = check_path(&given) {
            return Err(illegal_argument(py, format!("locksfile_path: {msg}")));
        }
        // The directory as the kernel will resolve it (`link/..` is the
        // parent of the link's target), not as `os.path` would rewrite it.
        let dir = os_path.call_method1("dirname", (&path,))?;
        let dir = if dir.is_truthy()? {
            dir
        } else {
            PyString::new(py, ".").into_any()
        };
        let server = given.to_str().is_some_and(LockFile::is_server_target);
        if !server && !os_path.call_method1("isdir", (&dir,))?.is_truthy()? {
            return Err(illegal_argument(
                py,
                format!("locksfile_path directory {dir} does not exist"),
            ));
        }
        // Handed over as written; the core makes it absolute, keeping `..`.
        let handle = match open_mode(&given, mode) {
            Ok(h) => h,
            Err(e @ Error::NotRegularFile { .. }) => {
                return Err(illegal_argument(py, format!("locksfile_path: {e}")))
            }
            Err(e) => return Err(to_py(py, e)),
        };
        let l_id_given = l_id.is_some();
        let l_id = match l_id {
            Some(l) => l,
            None => PyString::new(py, &std::process::id().to_string())
                .into_any()
                .unbind(),
        };
        // A server target is kept as given, to connect again after a fork
        // (the handle's own form leaves the password out); shown without.
        let path_buf = if server {
            given.clone()
        } else {
            handle.path().to_path_buf()
        };
        let abs = handle
            .path()
            .as_os_str()
            .into_pyobject(py)?
            .cast_into::<PyString>()?;
        let open = Open {
            handle: Arc::new(handle),
            path: abs.unbind(),
            path_buf,
            l_id,
            l_id_given,
            pid: std::process::id(),
            mode,
        };
        self.state.set(open).map_err(|_| {
            pyo3::exceptions::PyRuntimeError::new_err(
                "pylocksfile objects cannot be initialized twice",
            )
        })?;
        self.verbose.store(verbose.0, Ordering::Relaxed);
        Ok(())
    }

    /// The lock file's path made absolute, as the core opened it: joined
    /// to the working directory, ``..`` kept (the kernel resolves it).
    #[getter]
    fn locksfile_path(&self, py: Python<'_>) -> PyResult<Py<PyString>> {
        Ok(self.open()?.path.clone_ref(py))
    }

    /// The id printed before verbose messages (default: the pid as a string).
    #[getter]
    fn l_id(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(self.open()?.l_id.clone_ref(py))
    }

    /// Whether to print what is locked, converted and released.
    #[getter(verbose)]
    fn get_verbose(&self) -> bool {
        self.verbose()
    }

    #[setter(verbose)]
    fn set_verbose(&self, value: Option<VerboseArg>) -> PyResult<()> {
        match value {
            Some(v) => {
                self.verbose.store(v.0, Ordering::Relaxed);
                Ok(())
            }
            None => Err(pyo3::exceptions::PyAttributeError::new_err(
                "verbose cannot be deleted",
            )),
        }
    }

    /// ``with lf(writeLock=False, lock_n=0):`` acquires (blocking) on entry
    /// and releases ``lock_n`` on exit. The span is taken and released like
    /// ``acquire``/``release`` do, so inside ``with lf(lock_n=2)`` a lock 2
    /// held for writing before is converted to reading, and after the block
    /// lock 2 is released (the original's README example); other locks are
    /// untouched. ``with`` statements nest, each releasing its own span on
    /// exit, in each thread independently.
    ///
    /// The call returns a small context manager that remembers the
    /// arguments; its ``__enter__`` and ``__exit__`` call this object's,
    /// and ``with lf(...) as x`` binds ``x`` to this object. A call not
    /// used in a ``with`` statement leaves nothing behind, and a later
    /// bare ``with lf:`` raises ``IllegalWithStatement``.
    #[allow(non_snake_case)]
    #[pyo3(signature = (writeLock = WriteLockArg(false), lock_n = LockN::zero()))]
    fn __call__(
        slf: &Bound<'_, Self>,
        writeLock: WriteLockArg,
        lock_n: LockN,
    ) -> PyResult<WithStatement> {
        Ok(WithStatement {
            lf: slf.clone().unbind(),
            write: writeLock.0,
            span: lock_n.0,
        })
    }

    /// Acquire the span of the ``with lf(...)`` being entered;
    /// ``IllegalWithStatement`` for a bare ``with lf:``.
    fn __enter__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, Self>> {
        let py = slf.py();
        let me = slf.get();
        let thread = std::thread::current().id();
        let (write, span) = {
            let withs = lock_mutex(&me.withs);
            match withs.iter().rev().find(|e| e.thread == thread) {
                Some(e) if !e.entered => (e.write, e.span),
                _ => {
                    return Err(illegal_with(
                        py,
                        "use `with lf(writeLock=..., lock_n=...):`, not `with lf:`",
                    ))
                }
            }
        };
        let kind = if write { Kind::Exclusive } else { Kind::Shared };
        let forget_entry = || {
            let mut withs = lock_mutex(&me.withs);
            if let Some(i) = withs.iter().rposition(|e| e.thread == thread) {
                withs.remove(i);
            }
        };
        match me.do_acquire(py, kind, span, true) {
            Ok(true) => {
                let mut withs = lock_mutex(&me.withs);
                if let Some(e) = withs.iter_mut().rev().find(|e| e.thread == thread) {
                    e.entered = true;
                }
                Ok(slf.clone())
            }
            Ok(false) => {
                forget_entry();
                // A blocking acquire only fails this way on EDEADLK; running
                // the block without its lock would be worse than raising.
                Err(to_py(py, Error::Deadlock { at: None }))
            }
            Err(e) => {
                forget_entry();
                Err(e)
            }
        }
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, PyTuple>) -> PyResult<bool> {
        let thread = std::thread::current().id();
        let span = {
            let mut withs = lock_mutex(&self.withs);
            let Some(i) = withs.iter().rposition(|e| e.thread == thread && e.entered) else {
                return Err(illegal_with(py, "__exit__ without a matching __enter__"));
            };
            let span = withs[i].span;
            // Calls recorded after it and never entered are dropped with it.
            let mut j = withs.len();
            while j > i {
                j -= 1;
                if withs[j].thread == thread {
                    withs.remove(j);
                }
            }
            span
        };
        self.do_release(py, Some(span))?;
        Ok(false)
    }

    /// In shm mode, this object's owner id as ``_shm_table`` lists it;
    /// None otherwise. Not part of the public API.
    #[getter]
    fn _table_owner(&self, py: Python<'_>) -> PyResult<Option<u64>> {
        Ok(self.current(py)?.table_owner())
    }

    /// ``"process"`` (the default), ``"ofd"`` or ``"shm"``.
    #[getter]
    fn mode(&self) -> PyResult<String> {
        Ok(self.open()?.mode.to_string())
    }

    /// Pickled as its lock file's path (a server target as given),
    /// ``verbose``, ``l_id`` if given and ``mode``, never its locks:
    /// unpickling opens the file again, a new owner holding nothing, as
    /// after ``fork``. A subclass's ``__init__`` is not called again; its
    /// instance attributes are pickled with it.
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyTuple>> {
        let py = slf.py();
        let me = slf.get();
        let open = me.open()?;
        let kw = PyDict::new(py);
        kw.set_item("locksfile_path", open.path_buf.as_os_str())?;
        kw.set_item("verbose", me.verbose())?;
        if open.l_id_given {
            kw.set_item("l_id", open.l_id.bind(py))?;
        }
        if open.mode != Mode::Process {
            kw.set_item("mode", open.mode.to_string())?;
        }
        let extra = match slf.getattr("__dict__") {
            Ok(d) if d.is_truthy()? => d,
            _ => py.None().into_bound(py),
        };
        let newobj = py.import("copyreg")?.getattr("__newobj__")?;
        let state = PyTuple::new(py, [kw.into_any(), extra])?;
        PyTuple::new(
            py,
            [
                newobj,
                PyTuple::new(py, [slf.get_type()])?.into_any(),
                state.into_any(),
            ],
        )
    }

    /// Unpickling: opens what ``__reduce__`` recorded, as ``__init__``
    /// would with those arguments (the class's own, not a subclass's).
    fn __setstate__(
        slf: &Bound<'_, Self>,
        state: (Bound<'_, PyDict>, Option<Bound<'_, PyDict>>),
    ) -> PyResult<()> {
        let py = slf.py();
        let (kw, extra) = state;
        let path = kw.get_item("locksfile_path")?;
        let verbose = match kw.get_item("verbose")? {
            Some(v) => v.extract::<VerboseArg>()?,
            None => VerboseArg(false),
        };
        let l_id = kw.get_item("l_id")?.map(Bound::unbind);
        let mode = kw.get_item("mode")?;
        slf.get()
            .__init__(py, path.as_ref(), verbose, l_id, mode.as_ref())?;
        if let Some(extra) = extra {
            slf.getattr("__dict__")?.call_method1("update", (extra,))?;
        }
        Ok(())
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let open = self.open()?;
        Ok(format!(
            "pylocksfile(locksfile_path={}, l_id={}{})",
            open.path.bind(py).repr()?,
            open.l_id.bind(py).repr()?,
            match open.mode {
                Mode::Process => String::new(),
                m => format!(", mode={:?}", m.to_string()),
            }
        ))
    }
}

/// What `lf(writeLock=..., lock_n=...)` returns: the arguments of one
/// `with` statement. Entering it records them on the `pylocksfile` for the
/// length of that object's `__enter__` (looked up on its type, so a
/// subclass's `__enter__`/`__exit__` run as with the original) and no
/// longer; a call never entered leaves nothing behind.
#[pyclass(name = "_WithStatement", module = "pylocksfile", frozen)]
pub struct WithStatement {
    lf: Py<Pylocksfile>,
    write: bool,
    span: Span,
}

#[pymethods]
impl WithStatement {
    fn __enter__(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let lf = self.lf.bind(py);
        let me = lf.get();
        let thread = std::thread::current().id();
        lock_mutex(&me.withs).push(WithEntry {
            thread,
            write: self.write,
            span: self.span,
            entered: false,
        });
        // The class itself: its own `__enter__` directly; a subclass: through
        // the type, so an override runs.
        let entered = if lf.get_type().is(py.get_type::<Pylocksfile>()) {
            Pylocksfile::__enter__(lf).map(Bound::into_any)
        } else {
            lf.get_type()
                .getattr("__enter__")
                .and_then(|f| f.call1((lf,)))
        };
        // Whatever `__enter__` did, this statement's record is entered or gone.
        let mut withs = lock_mutex(&me.withs);
        if let Some(i) = withs.iter().rposition(|e| e.thread == thread && !e.entered) {
            withs.remove(i);
        }
        entered.map(Bound::unbind)
    }

    #[pyo3(signature = (*exc))]
    fn __exit__(&self, py: Python<'_>, exc: &Bound<'_, PyTuple>) -> PyResult<Py<PyAny>> {
        let lf = self.lf.bind(py);
        if lf.get_type().is(py.get_type::<Pylocksfile>()) {
            let suppress = lf.get().__exit__(py, exc)?;
            return Ok(PyBool::new(py, suppress).to_owned().into_any().unbind());
        }
        let mut args = vec![lf.clone().into_any()];
        args.extend(exc.iter());
        lf.get_type()
            .getattr("__exit__")?
            .call1(PyTuple::new(py, args)?)
            .map(Bound::unbind)
    }

    /// A ``with lf(...)`` statement does not pickle: ``TypeError``, saying
    /// to pass the ``pylocksfile`` object and the lock numbers instead.
    fn __reduce__(&self) -> PyResult<()> {
        Err(pyo3::exceptions::PyTypeError::new_err(
            "cannot pickle a `with lf(...)` statement: pass the pylocksfile object (it pickles \
             as its path and arguments, holding nothing) and lock_n, and take the lock again \
             in the other process",
        ))
    }

    /// Everything else is the `pylocksfile`'s, as when the call returned it.
    fn __getattr__<'py>(
        &self,
        py: Python<'py>,
        name: &Bound<'py, PyString>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.lf.bind(py).getattr(name)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "<with {}(writeLock={}, lock_n={}) statement>",
            self.lf.bind(py).get_type().name()?,
            if self.write { "True" } else { "False" },
            if self.span.count() == 1 {
                self.span.start().to_string()
            } else {
                format!("({}, {})", self.span.start(), self.span.count())
            }
        ))
    }
}

impl Drop for Pylocksfile {
    fn drop(&mut self) {
        // The handles release everything as they drop; only the message is ours.
        if !self.verbose.load(Ordering::Relaxed) {
            return;
        }
        let Some(open) = self.state.get() else {
            return;
        };
        let pid = std::process::id();
        let ours =
            pid == open.pid || matches!(&*lock_mutex(&self.child), Some((p, _)) if *p == pid);
        if ours {
            let _ = Python::try_attach(|py| self.say(py, "deleted: releasing all locks"));
        }
    }
}
