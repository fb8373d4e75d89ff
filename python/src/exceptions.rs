//! The exception classes of `pylocksfile._errors`, and building them.
//!
//! They are plain Python classes (several of them have two OSError-family bases, which a Rust-defined
//! exception cannot express); they are looked up once and cached.

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

macro_rules! exception_types {
    ($($fn_name:ident => $class:literal),* $(,)?) => {
        $(
            pub fn $fn_name(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
                static CELL: PyOnceLock<Py<PyType>> = PyOnceLock::new();
                CELL.import(py, "pylocksfile._errors", $class)
            }
        )*
    };
}

exception_types! {
    locksfile_error => "LocksfileError",
    would_block_error => "WouldBlockError",
    deadlock_error => "DeadlockError",
    lock_timeout => "LockTimeout",
    invalid_span_error => "InvalidSpanError",
    forked_error => "ForkedError",
    read_only_error => "ReadOnlyLockFileError",
    not_regular_file_error => "NotRegularFileError",
    unsupported_error => "UnsupportedError",
    mixed_modes_error => "MixedModesError",
    lock_table_error => "LockTableError",
    lock_table_full_error => "LockTableFullError",
    illegal_argument_error => "IllegalArgumentError",
    illegal_with_statement => "IllegalWithStatement",
    no_lock_warning => "NoLockWarning",
}

/// Build an exception instance of `ty` from `(errno, message[, filename])`.
pub fn build(
    _py: Python<'_>,
    ty: PyResult<&Bound<'_, PyType>>,
    errno: Option<i32>,
    msg: String,
    filename: Option<String>,
) -> PyErr {
    let made = ty.and_then(|ty| match (errno, filename) {
        (Some(n), Some(f)) => ty.call1((n, msg, f)),
        (Some(n), None) => ty.call1((n, msg)),
        (None, _) => ty.call1((msg,)),
    });
    match made {
        Ok(obj) => PyErr::from_value(obj),
        Err(e) => e,
    }
}

/// `IllegalArgumentError(msg)`.
pub fn illegal_argument(py: Python<'_>, msg: impl Into<String>) -> PyErr {
    build(py, illegal_argument_error(py), None, msg.into(), None)
}

/// `IllegalWithStatement(msg)`.
pub fn illegal_with(py: Python<'_>, msg: impl Into<String>) -> PyErr {
    build(py, illegal_with_statement(py), None, msg.into(), None)
}

/// `InvalidSpanError(EINVAL, msg)`.
pub fn invalid_span(py: Python<'_>, msg: impl Into<String>) -> PyErr {
    build(
        py,
        invalid_span_error(py),
        Some(libc::EINVAL),
        msg.into(),
        None,
    )
}
