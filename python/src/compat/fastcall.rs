//! The two hot methods of `pylocksfile`, `acquire` and `release`, as raw
//! vectorcall methods (`METH_FASTCALL | METH_KEYWORDS`).
//!
//! Under the 3.9 stable ABI PyO3 builds methods as `METH_VARARGS |
//! METH_KEYWORDS`, so every `acquire(writeLock=True, lock_n=5)` would
//! allocate an argument tuple and a keyword dict and copy each keyword name
//! into a bytes object: that alone costs as much as a third of an
//! uncontended lock. The vectorcall convention has been what CPython's
//! method descriptors speak since 3.7 (it entered the limited API's headers
//! only in 3.10), so these two methods use it directly and match keyword
//! names by identity first (names in compiled code are interned).
//!
//! # Safety
//! The only unsafe code of the crate. CPython calls these functions with
//! the GIL held, `args` pointing at `nargs` positional arguments followed by
//! one value per name in `kwnames` (a tuple, or NULL), all borrowed for the
//! call, and `slf` the object the descriptor was looked up on; the
//! descriptor checks that `slf` is an instance of the class before calling.
//! The method definitions are leaked so they live as long as the class.
#![allow(unsafe_code)]

use std::ffi::{c_int, CStr};

use pyo3::exceptions::PyTypeError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyString, PyType};

use super::args::{BlockingArg, LockN, WriteLockArg};
use super::pylocksfile::Pylocksfile;
use crate::spans::plain_index;
use crate::trap::{add_method, trap};

/// `METH_FASTCALL`: in CPython's ABI since 3.7 (limited API headers: 3.10).
const METH_FASTCALL: c_int = 0x0080;

type FastWithKeywords = unsafe extern "C" fn(
    *mut ffi::PyObject,
    *const *mut ffi::PyObject,
    ffi::Py_ssize_t,
    *mut ffi::PyObject,
) -> *mut ffi::PyObject;

/// Parsed arguments: one slot per parameter, in order.
const MAX_PARAMS: usize = 3;

/// Add `acquire` and `release` to the `pylocksfile` class.
pub fn install(cls: &Bound<'_, PyType>) -> PyResult<()> {
    add(cls, c"acquire", ACQUIRE_DOC, acquire_raw)?;
    add(cls, c"release", RELEASE_DOC, release_raw)?;
    Ok(())
}

fn add(
    cls: &Bound<'_, PyType>,
    name: &'static CStr,
    doc: &'static CStr,
    f: FastWithKeywords,
) -> PyResult<()> {
    let meth = ffi::PyMethodDefPointer {
        // SAFETY: CPython calls `ml_meth` with the signature its flags
        // name (METH_FASTCALL | METH_KEYWORDS below), which is `f`'s; the
        // union field only records the pointer.
        PyCFunctionWithKeywords: unsafe {
            std::mem::transmute::<FastWithKeywords, ffi::PyCFunctionWithKeywords>(f)
        },
    };
    let name = name.to_str().expect("ASCII method name");
    add_method(cls, name, doc, METH_FASTCALL | ffi::METH_KEYWORDS, meth)
}

/// The shared trampoline: GIL token, self, argument slots, panics. Made
/// once per method (generic and inlined), so that its body is a direct
/// call rather than one through a pointer.
///
/// # Safety
/// As the module documentation says of CPython's call.
#[inline(always)]
unsafe fn call<B>(
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
    names: &[&'static str],
    interned: &[&Bound<'_, PyString>],
    body: B,
) -> *mut ffi::PyObject
where
    B: for<'a, 'py> FnOnce(
        &Pylocksfile,
        Python<'py>,
        &[Option<Borrowed<'a, 'py, PyAny>>],
    ) -> PyResult<Py<PyAny>>,
{
    // SAFETY: called by CPython with the GIL held.
    let py = unsafe { Python::assume_attached() };
    trap(py, || -> PyResult<*mut ffi::PyObject> {
        // SAFETY: `slf` is a live object for the call, and an instance of
        // the class (or a subclass): the method descriptor checked that
        // before calling (`PyDescr_NewMethod`'s descriptors do).
        let me = unsafe { Borrowed::from_ptr(py, slf).cast_unchecked::<Pylocksfile>() };
        let nargs = usize::try_from(nargs).unwrap_or(0);
        let mut slots: [Option<Borrowed<'_, '_, PyAny>>; MAX_PARAMS] = [None; MAX_PARAMS];
        let method = names[0];
        let params = &names[1..];
        if nargs > params.len() {
            return Err(PyTypeError::new_err(format!(
                "{method}() takes at most {} arguments ({nargs} given)",
                params.len()
            )));
        }
        for (i, slot) in slots.iter_mut().take(nargs).enumerate() {
            // SAFETY: `args` holds `nargs` borrowed positional arguments.
            *slot = Some(unsafe { Borrowed::from_ptr(py, *args.add(i)) });
        }
        if !kwnames.is_null() {
            // SAFETY: a non-NULL `kwnames` is a tuple of str, borrowed for the call.
            // Read with the tuple's own calls (no iterator, no new references).
            let nkw = usize::try_from(unsafe { ffi::PyTuple_Size(kwnames) }).unwrap_or(0);
            for k in 0..nkw {
                // SAFETY: `k` is in range; the item is borrowed from the tuple.
                let name = unsafe {
                    Borrowed::from_ptr(py, ffi::PyTuple_GetItem(kwnames, k as ffi::Py_ssize_t))
                };
                let at = match interned.iter().position(|s| name.as_ptr() == s.as_ptr()) {
                    Some(at) => at,
                    None => interned
                        .iter()
                        .position(|s| name.eq(*s).unwrap_or(false))
                        .ok_or_else(|| {
                            PyTypeError::new_err(format!(
                                "{method}() got an unexpected keyword argument {}",
                                name.repr().map(|r| r.to_string()).unwrap_or_default()
                            ))
                        })?,
                };
                if slots[at].is_some() {
                    return Err(PyTypeError::new_err(format!(
                        "{method}() got multiple values for argument '{}'",
                        params[at]
                    )));
                }
                // SAFETY: the keyword values follow the positional ones.
                slots[at] = Some(unsafe { Borrowed::from_ptr(py, *args.add(nargs + k)) });
            }
        }
        body(me.get(), py, &slots[..params.len()]).map(Py::into_ptr)
    })
}

const ACQUIRE_DOC: &CStr = c"acquire($self, writeLock=False, lock_n=0, blocking=True)
--

Lock ``lock_n`` (an index, or ``(start, count)`` as a tuple or list)
for reading (shared) or, with ``writeLock=True``, for writing
(exclusive). Locks this object already holds in that span are
converted in place: the last call wins.

Returns True when held. With ``blocking=False`` returns False at
once if another owner holds a conflicting lock. A blocking call
returns False when the kernel (process mode) or the lock table (shm
mode) reports that waiting would deadlock (``EDEADLK``); nothing was
acquired then. A blocking wait releases
the GIL and is interrupted by Ctrl-C (``KeyboardInterrupt``, nothing
acquired). Bad arguments raise ``IllegalArgumentError``.";

const RELEASE_DOC: &CStr = c"release($self, lock_n=None)
--

Release ``lock_n`` (an index or ``(start, count)``), or every lock
this object holds when ``lock_n`` is None. Releasing what is not
held is harmless. Never blocks.";

unsafe extern "C" fn acquire_raw(
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: GIL held (CPython's call); see `call`.
    let py = unsafe { Python::assume_attached() };
    let interned = [
        pyo3::intern!(py, "writeLock"),
        pyo3::intern!(py, "lock_n"),
        pyo3::intern!(py, "blocking"),
    ];
    // SAFETY: forwarded from CPython's call.
    unsafe {
        call(
            slf,
            args,
            nargs,
            kwnames,
            &["acquire", "writeLock", "lock_n", "blocking"],
            &interned,
            |me, py, a| {
                let write = match a[0] {
                    Some(v) => v.extract::<WriteLockArg>()?.0,
                    None => false,
                };
                let span = match a[1] {
                    Some(v) => match plain_index(&v) {
                        Some(s) => LockN(s),
                        None => v.extract::<LockN>()?,
                    },
                    None => LockN::zero(),
                };
                let blocking = match a[2] {
                    Some(v) => v.extract::<BlockingArg>()?.0,
                    None => true,
                };
                let held = me.acquire(py, write, span.0, blocking)?;
                Ok(pyo3::types::PyBool::new(py, held)
                    .to_owned()
                    .into_any()
                    .unbind())
            },
        )
    }
}

unsafe extern "C" fn release_raw(
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: GIL held (CPython's call); see `call`.
    let py = unsafe { Python::assume_attached() };
    let interned = [pyo3::intern!(py, "lock_n")];
    // SAFETY: forwarded from CPython's call.
    unsafe {
        call(
            slf,
            args,
            nargs,
            kwnames,
            &["release", "lock_n"],
            &interned,
            |me, py, a| {
                let span = match a[0] {
                    Some(v) if !v.is_none() => match plain_index(&v) {
                        Some(s) => Some(s),
                        None => Some(v.extract::<LockN>()?.0),
                    },
                    _ => None,
                };
                me.release(py, span)?;
                Ok(py.None())
            },
        )
    }
}
