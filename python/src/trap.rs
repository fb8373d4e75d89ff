//! Raw CPython entry points (`METH_FASTCALL` methods and slots written by
//! hand, in `compat/fastcall.rs` and `modern/fastcall.rs`): their body's
//! error or panic becomes the raised exception, as PyO3's trampolines do.

use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::ffi;
use pyo3::panic::PanicException;
use pyo3::prelude::*;

/// Run `f`, turning its error or panic into a raised exception (NULL).
#[inline(always)]
pub fn trap(
    py: Python<'_>,
    f: impl FnOnce() -> PyResult<*mut ffi::PyObject>,
) -> *mut ffi::PyObject {
    let err = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(obj)) => return obj,
        Ok(Err(e)) => e,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".into());
            PanicException::new_err(msg)
        }
    };
    err.restore(py);
    std::ptr::null_mut()
}
