//! What a call that did not get its lock ends with: the refusal it
//! raises (or returns), and the errors of a closed `LocksFile`.

use locksfile::Error;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::errors::to_py;
use crate::wait::Patience;

/// What a wait's try returns once its object was closed or its guard
/// released: any error but `Interrupted` ends a wait at once. A wait that
/// is already waiting when that happens is cancelled instead (`Waits`).
pub const GIVE_UP: Error = Error::WouldBlock {
    holder: None,
    at: None,
};

/// What a call makes of another owner in the way once it stops waiting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
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
    pub fn from_args(blocking: bool, timeout: Option<f64>) -> PyResult<(Patience, Refused)> {
        let patience = Patience::from_args(blocking, timeout)?;
        let refused = if blocking && timeout.is_some() {
            Refused::TimedOut
        } else {
            Refused::WouldBlock
        };
        Ok((patience, refused))
    }

    /// The exception for `e`: a refusal after a timeout is `LockTimeout`.
    pub fn error(self, py: Python<'_>, e: Error) -> PyErr {
        match e {
            e @ Error::WouldBlock { .. } if self == Refused::TimedOut => {
                to_py(py, e.into_timed_out())
            }
            e => to_py(py, e),
        }
    }
}

/// The error of any call on a closed `LocksFile`, as a closed file's.
pub fn closed_error() -> PyErr {
    PyValueError::new_err("I/O operation on a closed LocksFile")
}

/// The error of a call whose `LocksFile` was closed while it waited.
pub fn closed_while_waiting() -> PyErr {
    PyValueError::new_err("the LocksFile was closed while this call waited; nothing is held")
}
