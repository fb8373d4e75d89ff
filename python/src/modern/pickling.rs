//! How a `LocksFile` pickles: as its target and the open options given
//! (kept here), made again by its type's `__new__`, never its locks.

use locksfile::Threads;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

/// `__reduce__`'s answer for an object made again by its type's `__new__`
/// with `args` and `kwargs` (`copyreg.__newobj_ex__`, which pickle turns
/// into its own opcode), with a subclass instance's `__dict__` as state.
pub(super) fn pickled_as_new<'py>(
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

/// The constructor's open options, kept for pickling.
#[derive(Clone, Copy)]
pub(super) struct Given {
    pub(super) create: bool,
    pub(super) permissions: u32,
    pub(super) follow_symlinks: bool,
    pub(super) threads: Threads,
    /// `stats=`: `None` as `LOCKSFILE_STATS` says.
    pub(super) stats: Option<bool>,
}

impl Given {
    pub(super) const DEFAULT: Given = Given {
        create: true,
        permissions: 0o644,
        follow_symlinks: false,
        threads: Threads::Exclude,
        stats: None,
    };
}

/// ``threads=`` as Python code passes it.
pub(super) fn parse_threads(name: &str) -> PyResult<Threads> {
    match name {
        "exclude" => Ok(Threads::Exclude),
        "share" => Ok(Threads::Share),
        other => Err(PyValueError::new_err(format!(
            "threads must be \"exclude\" or \"share\", got {other:?}"
        ))),
    }
}
