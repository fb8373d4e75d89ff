//! The original's arguments, checked as strictly as it checked them.

use locksfile::{Mode, Span};
use pyo3::prelude::*;
use pyo3::types::PyBool;

use crate::exceptions::illegal_argument;
use crate::modes::{find_mode, one_of};
use crate::spans::lock_n_span;

macro_rules! strict_bool {
    ($name:ident, $arg:literal) => {
        /// A `bool` argument that refuses anything but `True` and `False`.
        #[derive(Clone, Copy)]
        pub struct $name(pub bool);

        impl<'a, 'py> FromPyObject<'a, 'py> for $name {
            type Error = PyErr;
            fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
                let py = obj.py();
                if obj.is(PyBool::new(py, true)) {
                    Ok($name(true))
                } else if obj.is(PyBool::new(py, false)) {
                    Ok($name(false))
                } else {
                    let ty = obj
                        .get_type()
                        .name()
                        .map(|n| n.to_string())
                        .unwrap_or_default();
                    Err(illegal_argument(
                        py,
                        format!(concat!($arg, " must be True or False, got {}"), ty),
                    ))
                }
            }
        }
    };
}

strict_bool!(WriteLockArg, "writeLock");
strict_bool!(BlockingArg, "blocking");
strict_bool!(VerboseArg, "verbose");

/// `lock_n`: an index or a `(start, count)` pair.
#[derive(Clone, Copy)]
pub struct LockN(pub Span);

impl LockN {
    pub fn zero() -> LockN {
        LockN(Span::with_count(0, 1).expect("lock 0 is a span"))
    }
}

impl<'a, 'py> FromPyObject<'a, 'py> for LockN {
    type Error = PyErr;
    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        lock_n_span(&obj).map(LockN)
    }
}

/// The modes with numbered locks, in the order `pylocksfile`'s messages
/// name them (its default first).
const NUMBERED_MODES: [Mode; 3] = [Mode::Process, Mode::Ofd, Mode::Shm];

/// `pylocksfile(mode=...)`: a `LocksFile` mode with numbered locks.
pub fn compat_mode(m: &Bound<'_, PyAny>) -> PyResult<Mode> {
    let py = m.py();
    let Ok(name) = m.extract::<String>() else {
        let ty = m
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_default();
        return Err(illegal_argument(
            py,
            format!("mode must be {}, got {ty}", one_of(&NUMBERED_MODES)),
        ));
    };
    if let Some(mode) = find_mode(&NUMBERED_MODES, &name) {
        return Ok(mode);
    }
    match find_mode(&[Mode::Flock], &name) {
        Some(flock) => Err(illegal_argument(
            py,
            format!(
                "mode \"{flock}\" locks the whole file only; pylocksfile needs numbered locks \
                 ({})",
                one_of(&NUMBERED_MODES)
            ),
        )),
        None => Err(illegal_argument(
            py,
            format!("mode must be {}, got {name:?}", one_of(&NUMBERED_MODES)),
        )),
    }
}
