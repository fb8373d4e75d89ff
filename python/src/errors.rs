//! Core errors as Python exceptions (the classes are in `exceptions`).

use locksfile::{Error, Holder, NotRegular};
use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;

use crate::exceptions::{
    build, deadlock_error, forked_error, invalid_span_error, lock_table_error,
    lock_table_full_error, lock_timeout, locksfile_error, mixed_modes_error,
    not_regular_file_error, read_only_error, unsupported_error, would_block_error,
};
use crate::holder::PyHolder;

/// The `Holder` object for an exception attribute.
pub fn holder_object(py: Python<'_>, h: &Holder) -> PyResult<Py<PyAny>> {
    Ok(Py::new(py, PyHolder::from(*h))?.into_any())
}

/// Map a core error to the matching Python exception.
pub fn to_py(py: Python<'_>, e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::WouldBlock { holder, .. } => {
            let err = build(py, would_block_error(py), Some(libc::EAGAIN), msg, None);
            if let Some(h) = holder {
                if let Ok(obj) = holder_object(py, &h) {
                    let _ = err.value(py).setattr("holder", obj);
                }
            }
            err
        }
        Error::Deadlock { .. } => build(py, deadlock_error(py), Some(libc::EDEADLK), msg, None),
        Error::TimedOut { .. } => build(py, lock_timeout(py), Some(libc::ETIMEDOUT), msg, None),
        Error::Interrupted => build(py, locksfile_error(py), Some(libc::EINTR), msg, None),
        Error::Cancelled => build(py, locksfile_error(py), Some(libc::ECANCELED), msg, None),
        Error::InvalidSpan(_) => build(py, invalid_span_error(py), Some(libc::EINVAL), msg, None),
        Error::Forked => build(py, forked_error(py), None, msg, None),
        Error::ReadOnly { ref path } => {
            let p = path.display().to_string();
            build(py, read_only_error(py), Some(libc::EBADF), msg, Some(p))
        }
        Error::NotRegularFile { ref path, found } => {
            let p = path.display().to_string();
            let errno = match found {
                NotRegular::Directory => libc::EISDIR,
                NotRegular::Symlink => libc::ELOOP,
                _ => libc::EINVAL,
            };
            build(py, not_regular_file_error(py), Some(errno), msg, Some(p))
        }
        Error::Unsupported { ref source, .. } => {
            let errno = source.raw_os_error().unwrap_or(libc::ENOLCK);
            build(py, unsupported_error(py), Some(errno), msg, None)
        }
        // OSError shows the filename after the message: the message
        // leaves the path out, so that it is named once.
        Error::MixedModes { ref path, in_use } => {
            let p = path.display().to_string();
            let msg = format!("in use with {in_use}, which this mode would not exclude");
            build(py, mixed_modes_error(py), Some(libc::EBUSY), msg, Some(p))
        }
        Error::NetworkFileSystem { ref path, .. } => {
            let p = path.display().to_string();
            build(
                py,
                unsupported_error(py),
                Some(libc::EOPNOTSUPP),
                msg,
                Some(p),
            )
        }
        Error::Sidecar { ref path, .. } => {
            let p = path.display().to_string();
            build(py, lock_table_error(py), Some(libc::EINVAL), msg, Some(p))
        }
        Error::TableFull { .. } => {
            build(py, lock_table_full_error(py), Some(libc::ENOLCK), msg, None)
        }
        // OSError(errno, strerror, filename) picks the fitting subclass
        // (FileNotFoundError, PermissionError, ...) and sets .errno and
        // .filename, as Python's own open() does.
        Error::Open { path, source } => match source.raw_os_error() {
            Some(n) => PyOSError::new_err((n, strerror(py, n, &source), path.into_os_string())),
            None => PyOSError::new_err(msg),
        },
        Error::Io { ref source, .. } => match source.raw_os_error() {
            Some(n) => PyOSError::new_err((n, msg)),
            None => PyOSError::new_err(msg),
        },
        // The server cannot be reached or refuses us: Python's own
        // exceptions for those.
        Error::Connect { ref source, .. } => match source.kind() {
            std::io::ErrorKind::InvalidInput => pyo3::exceptions::PyValueError::new_err(msg),
            std::io::ErrorKind::PermissionDenied => {
                pyo3::exceptions::PyPermissionError::new_err(msg)
            }
            std::io::ErrorKind::TimedOut => pyo3::exceptions::PyTimeoutError::new_err(msg),
            std::io::ErrorKind::ConnectionRefused => {
                pyo3::exceptions::PyConnectionRefusedError::new_err(msg)
            }
            _ => pyo3::exceptions::PyConnectionError::new_err(msg),
        },
        Error::ConnectionLost { .. } => pyo3::exceptions::PyConnectionAbortedError::new_err(msg),
        _ => build(py, locksfile_error(py), None, msg, None),
    }
}

/// The C library's text for `errno`, as Python's `os.strerror` gives it
/// (what `OSError` shows for its own errors), falling back to Rust's.
fn strerror(py: Python<'_>, errno: i32, source: &std::io::Error) -> String {
    py.import("os")
        .and_then(|os| os.call_method1("strerror", (errno,)))
        .and_then(|s| s.extract::<String>())
        .unwrap_or_else(|_| source.to_string())
}
