//! Raw CPython entry points (`METH_FASTCALL` methods and slots written by
//! hand, in `compat/fastcall.rs` and `modern/fastcall.rs`): their body's
//! error or panic becomes the raised exception, as PyO3's trampolines do,
//! and each is installed on its class as a method descriptor.
#![allow(unsafe_code)]

use std::ffi::{c_int, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::ffi;
use pyo3::panic::PanicException;
use pyo3::prelude::*;
use pyo3::types::PyType;

/// Set `cls.name` to a method descriptor calling `meth` with the calling
/// convention `flags` names, documented by `doc` (CPython reads a text
/// signature from its head). The definition lives as long as the process.
pub fn add_method(
    cls: &Bound<'_, PyType>,
    name: &str,
    doc: &'static CStr,
    flags: c_int,
    meth: ffi::PyMethodDefPointer,
) -> PyResult<()> {
    let py = cls.py();
    let cname: &'static CStr = Box::leak(
        CString::new(name)
            .expect("ASCII method name")
            .into_boxed_c_str(),
    );
    let def: &'static mut ffi::PyMethodDef = Box::leak(Box::new(ffi::PyMethodDef {
        ml_name: cname.as_ptr(),
        ml_meth: meth,
        ml_flags: flags,
        ml_doc: doc.as_ptr(),
    }));
    // SAFETY: `cls` is a live type object and `def` is never freed.
    let descr = unsafe {
        Bound::from_owned_ptr_or_err(py, ffi::PyDescr_NewMethod(cls.as_type_ptr(), def))?
    };
    cls.setattr(name, descr)
}

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
