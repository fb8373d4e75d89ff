//! The three calls of every `with lf.write(i):` block (`write` or `read`,
//! `Guard.__enter__`, `Guard.__exit__`) in CPython's own conventions,
//! installed over PyO3's after the classes are made.
//!
//! PyO3's wrapper of a method costs about 170 instructions a call (its
//! trampoline, the attach guard, the argument description walked for
//! every call) where the lock itself costs about 400. Here `write(i)` with
//! one positional argument is a `METH_FASTCALL` method that goes straight
//! to the take; any other form of `read`/`write` (keywords, a bad count)
//! is handed to PyO3's method, kept aside, so that it parses and words its
//! errors exactly as before, and the signatures and docstrings shown are
//! PyO3's. `__enter__` and `__exit__` are descriptors of our own (see
//! `BoundMethod` below): looked up on a guard, as a `with` statement does,
//! they answer a small untracked object called through vectorcall rather
//! than a new bound method each.
//!
//! # Safety
//! CPython calls these functions with the GIL held, `args` pointing at
//! `nargs` positional arguments followed by one value per name in
//! `kwnames` (a tuple, or NULL), all borrowed for the call, and `slf` an
//! instance of the class or a subclass (the method descriptor checks that
//! before calling; the bound objects hold a guard checked by exact type).
//! Method definitions, specs and types are leaked so they live as long as
//! the classes. abi3 builds never run without a GIL, so state touched only
//! by these calls needs no lock.
#![allow(unsafe_code)]

use std::ffi::{c_int, CString};

use locksfile::Kind;
use pyo3::exceptions::PyTypeError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

use super::guard::PyGuard;
use super::locks_file::PyLocksFile;
use crate::trap::{add_method, trap};

/// `METH_FASTCALL`: in CPython's ABI since 3.7 (limited API headers: 3.10).
const METH_FASTCALL: c_int = 0x0080;

type FastWithKeywords = unsafe extern "C" fn(
    *mut ffi::PyObject,
    *const *mut ffi::PyObject,
    ffi::Py_ssize_t,
    *mut ffi::PyObject,
) -> *mut ffi::PyObject;

/// PyO3's `read` and `write`, for every call but `(span)`.
static READ: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static WRITE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
/// PyO3's `Guard.__exit__`, for calls with keywords.
static EXIT: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// Put the raw methods in place (at import, once the classes exist).
pub fn install(py: Python<'_>) -> PyResult<()> {
    let lf = py.get_type::<PyLocksFile>();
    for (name, keep, f) in [
        ("read", &READ, read_raw as FastWithKeywords),
        ("write", &WRITE, write_raw as FastWithKeywords),
    ] {
        let old = lf.getattr(name)?;
        let doc = doc_of(name, &old)?;
        let _ = keep.set(py, old.unbind());
        // SAFETY: `f` has the signature of METH_FASTCALL | METH_KEYWORDS.
        let meth = ffi::PyMethodDefPointer {
            PyCFunctionWithKeywords: unsafe {
                std::mem::transmute::<FastWithKeywords, ffi::PyCFunctionWithKeywords>(f)
            },
        };
        add_method(&lf, name, doc, METH_FASTCALL | ffi::METH_KEYWORDS, meth)?;
    }
    let guard = py.get_type::<PyGuard>();
    WEAKLIST_OFFSET.store(
        guard.getattr("__weakrefoffset__")?.extract::<isize>()?,
        std::sync::atomic::Ordering::Relaxed,
    );
    // PyO3's `__enter__` and `__exit__`, for the class's view of them and
    // for the calls the fast paths below do not take.
    let _ = ENTER.set(py, guard.getattr("__enter__")?.unbind());
    let _ = EXIT.set(py, guard.getattr("__exit__")?.unbind());
    install_bound(py, &guard)?;
    Ok(())
}

/// PyO3's docstring of a method with its text signature, as CPython reads
/// it from `ml_doc` (`name(sig)\n--\n\n` first), leaked.
fn doc_of(name: &str, old: &Bound<'_, PyAny>) -> PyResult<&'static std::ffi::CStr> {
    let sig = old
        .getattr("__text_signature__")?
        .extract::<Option<String>>()?;
    let doc = old.getattr("__doc__")?.extract::<Option<String>>()?;
    let mut text = String::new();
    if let Some(sig) = sig {
        text.push_str(&format!("{name}{sig}\n--\n\n"));
    }
    text.push_str(doc.as_deref().unwrap_or(""));
    let c =
        CString::new(text).map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()))?;
    Ok(Box::leak(c.into_boxed_c_str()))
}

/// `read`/`write`: `(span)` taken here; anything else by PyO3's method.
///
/// # Safety
/// As the module documentation says of CPython's call.
#[inline(always)]
unsafe fn take_raw(
    kind: Kind,
    slow: &PyOnceLock<Py<PyAny>>,
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: called by CPython with the GIL held.
    let py = unsafe { Python::assume_attached() };
    trap(py, || {
        if nargs == 1 && kwnames.is_null() {
            // SAFETY: `slf` is an instance (checked by the descriptor) and
            // `args` holds one borrowed argument.
            let (me, span) = unsafe {
                (
                    Borrowed::from_ptr(py, slf).cast_unchecked::<PyLocksFile>(),
                    Borrowed::from_ptr(py, *args),
                )
            };
            let g = me.get().guard_forever(py, &span, kind)?;
            return Ok(g.into_ptr());
        }
        // `(span, blocking=True|False, timeout=None|float|int)`: plain
        // values only, anything else (and every error) PyO3's way.
        // SAFETY: forwarded from CPython's call.
        if let Some((blocking, timeout)) = unsafe { plain_keywords(py, args, nargs, kwnames) } {
            // SAFETY: as above.
            let (me, span) = unsafe {
                (
                    Borrowed::from_ptr(py, slf).cast_unchecked::<PyLocksFile>(),
                    Borrowed::from_ptr(py, *args),
                )
            };
            let g = me
                .get()
                .guard_or_raise(py, &span, kind, blocking, timeout)?;
            return Ok(g.into_ptr());
        }
        // SAFETY: forwarded from CPython's call.
        unsafe { call_slow(py, slow, slf, args, nargs, kwnames) }
    })
}

/// `blocking` and `timeout` of a call `(span, **kw)` whose keywords are
/// only those two with values PyO3 would take as they are (`True`/`False`;
/// `None`, a float or an int); `None` for any other call.
///
/// # Safety
/// As the module documentation says of CPython's call.
unsafe fn plain_keywords(
    py: Python<'_>,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> Option<(bool, Option<f64>)> {
    if nargs != 1 || kwnames.is_null() {
        return None;
    }
    let (blocking_name, timeout_name) = (
        pyo3::intern!(py, "blocking").as_ptr(),
        pyo3::intern!(py, "timeout").as_ptr(),
    );
    let (mut blocking, mut timeout) = (None, None);
    // SAFETY: a non-NULL `kwnames` is a tuple of str; values follow the
    // positional argument.
    unsafe {
        let n = ffi::PyTuple_Size(kwnames);
        for k in 0..n {
            let name = ffi::PyTuple_GetItem(kwnames, k);
            let value = Borrowed::from_ptr(py, *args.offset(1 + k));
            if name == blocking_name && blocking.is_none() {
                let b = value.cast::<pyo3::types::PyBool>().ok()?;
                blocking = Some(b.is_true());
            } else if name == timeout_name && timeout.is_none() {
                timeout = Some(if value.is_none() {
                    None
                } else if value.is_exact_instance_of::<pyo3::types::PyFloat>()
                    || value.is_exact_instance_of::<pyo3::types::PyInt>()
                {
                    Some(value.extract::<f64>().ok()?)
                } else {
                    return None;
                });
            } else {
                return None;
            }
        }
    }
    Some((blocking.unwrap_or(true), timeout.flatten()))
}

/// Call PyO3's method `slow` with the arguments of a vectorcall.
///
/// # Safety
/// As the module documentation says of CPython's call.
unsafe fn call_slow(
    py: Python<'_>,
    slow: &PyOnceLock<Py<PyAny>>,
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> PyResult<*mut ffi::PyObject> {
    // SAFETY: `nargs` positional arguments then one per keyword name.
    let all = unsafe {
        let nkw = if kwnames.is_null() {
            0
        } else {
            ffi::PyTuple_Size(kwnames)
        };
        let n = usize::try_from(nargs + nkw).unwrap_or(0);
        if n == 0 {
            &[]
        } else {
            std::slice::from_raw_parts(args, n)
        }
    };
    let npos = usize::try_from(nargs).unwrap_or(0);
    // SAFETY: every pointer is a live object borrowed for the call.
    let me = unsafe { Borrowed::from_ptr(py, slf) };
    let mut pos = vec![me.to_owned()];
    pos.extend(
        all[..npos]
            .iter()
            // SAFETY: a live object borrowed for the call.
            .map(|&a| unsafe { Borrowed::from_ptr(py, a) }.to_owned()),
    );
    let kwargs = PyDict::new(py);
    if !kwnames.is_null() {
        // SAFETY: a non-NULL `kwnames` is a tuple of str.
        let names = unsafe { Borrowed::from_ptr(py, kwnames) };
        let names = names.cast::<PyTuple>().map_err(PyErr::from)?;
        for (k, name) in names.iter().enumerate() {
            // SAFETY: the keyword values follow the positional ones.
            kwargs.set_item(name, unsafe { Borrowed::from_ptr(py, all[npos + k]) })?;
        }
    }
    let method = slow
        .get(py)
        .ok_or_else(|| PyTypeError::new_err("method not installed"))?;
    let out = method
        .bind(py)
        .call(PyTuple::new(py, pos)?, Some(&kwargs))?;
    Ok(out.into_ptr())
}

unsafe extern "C" fn write_raw(
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: forwarded from CPython's call.
    unsafe { take_raw(Kind::Exclusive, &WRITE, slf, args, nargs, kwnames) }
}

unsafe extern "C" fn read_raw(
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: forwarded from CPython's call.
    unsafe { take_raw(Kind::Shared, &READ, slf, args, nargs, kwnames) }
}

/// `Guard.__enter__()`: the guard itself.
unsafe extern "C" fn enter_raw(
    slf: *mut ffi::PyObject,
    _unused: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: called by CPython with the GIL held.
    let py = unsafe { Python::assume_attached() };
    trap(py, || {
        // SAFETY: `slf` is a Guard (checked by the descriptor; Guard has
        // no subclasses).
        let me = unsafe { Borrowed::from_ptr(py, slf).cast_unchecked::<PyGuard>() };
        me.get().enter(py)?;
        Ok(me.to_owned().into_ptr())
    })
}

/// `Guard.__exit__(exc_type=None, exc=None, tb=None)`: release (at the
/// end of the outermost block of the guard); never swallows the block's
/// exception. Keywords, or too many arguments: PyO3's method, which words
/// the error as before.
unsafe extern "C" fn exit_raw(
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: called by CPython with the GIL held.
    let py = unsafe { Python::assume_attached() };
    trap(py, || {
        if nargs > 3 || !kwnames.is_null() {
            // SAFETY: forwarded from CPython's call.
            return unsafe { call_slow(py, &EXIT, slf, args, nargs, kwnames) };
        }
        // SAFETY: `slf` is a Guard (checked by the descriptor).
        let me = unsafe { Borrowed::from_ptr(py, slf).cast_unchecked::<PyGuard>() };
        PyGuard::exit(&me)?;
        Ok(pyo3::types::PyBool::new(py, false).to_owned().into_ptr())
    })
}

/// Where the byte offset of a Guard's weak-reference list is (the type's
/// `__weakrefoffset__`), read at import.
static WEAKLIST_OFFSET: std::sync::atomic::AtomicIsize = std::sync::atomic::AtomicIsize::new(0);

/// The last guard object of a `LocksFile` to be released, kept so that the
/// next take reuses it (with its cell) instead of making one: a `with
/// lf.write(i):` block then allocates and frees nothing.
///
/// A guard is reused only when this slot holds its one reference and no
/// weak reference names it: nothing else can see the object, so it becomes
/// the new guard unseen. A guard kept by anyone (a name, a container, a
/// weak reference) is never reused: it stays released, and its `release()`
/// or `__exit__` can never reach a newer guard's lock.
///
/// The slot holds a strong reference, and the guard holds this cache: the
/// `LocksFile` empties the slot when closed or collected (`clear`).
#[derive(Default)]
pub struct GuardCache {
    slot: std::sync::atomic::AtomicPtr<ffi::PyObject>,
}

impl GuardCache {
    /// Whether something holds a weak reference to `g`.
    fn weakly_referenced(g: &Bound<'_, PyGuard>) -> bool {
        let offset = WEAKLIST_OFFSET.load(std::sync::atomic::Ordering::Relaxed);
        if offset <= 0 {
            return true;
        }
        // SAFETY: `offset` is the type's `tp_weaklistoffset`: a pointer
        // field of every instance (Guard has no subclasses), read with
        // the GIL held.
        unsafe {
            let field = g
                .as_ptr()
                .cast::<u8>()
                .offset(offset)
                .cast::<*mut ffi::PyObject>();
            !field.read().is_null()
        }
    }

    /// Keep `g`, just released, for the next take.
    pub fn keep(&self, g: Bound<'_, PyGuard>) {
        // A load and a store, not a swap: every call holds the GIL (see
        // `take_unique`), and a locked exchange costs as much as the rest
        // of this method.
        let old = self.slot.load(std::sync::atomic::Ordering::Relaxed);
        self.slot
            .store(g.into_ptr(), std::sync::atomic::Ordering::Relaxed);
        if !old.is_null() {
            // SAFETY: the slot's strong reference, given back with the GIL held
            // (`keep` is called from Python calls only).
            unsafe { ffi::Py_DecRef(old) };
        }
    }

    /// The kept guard if nothing else can see it, to be refilled.
    pub fn take_unique<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyGuard>> {
        // The slot is only touched with the GIL held (`py` here, and
        // `keep`/`clear` in Python calls), so a load and a store cannot
        // interleave with another thread's.
        let p = self.slot.load(std::sync::atomic::Ordering::Relaxed);
        if p.is_null() {
            return None;
        }
        self.slot
            .store(std::ptr::null_mut(), std::sync::atomic::Ordering::Relaxed);
        // SAFETY: the slot held a strong reference to a Guard.
        let g = unsafe { Bound::from_owned_ptr(py, p).cast_into_unchecked::<PyGuard>() };
        // With the GIL held no other thread can take a reference meanwhile.
        // SAFETY: a live object, read with the GIL held.
        let refs = unsafe { ffi::Py_REFCNT(g.as_ptr()) };
        if refs == 1 && !Self::weakly_referenced(&g) {
            Some(g)
        } else {
            None
        }
    }

    /// Let go of the kept guard (with the GIL held).
    pub fn clear(&self, py: Python<'_>) {
        let p = self
            .slot
            .swap(std::ptr::null_mut(), std::sync::atomic::Ordering::AcqRel);
        if !p.is_null() {
            // SAFETY: the slot's strong reference.
            drop(unsafe { Bound::from_owned_ptr(py, p) });
        }
    }
}

// --- `g.__enter__` and `g.__exit__` without a bound method object each ---
//
// A `with` statement looks both methods up on the guard, and a method
// descriptor answers each lookup with a new bound method: two objects
// tracked by the cycle collector, made and freed per block (about 600
// instructions, as much as the lock itself). `Guard.__enter__` and
// `Guard.__exit__` are instead descriptors of our own whose lookup on a
// guard answers a small object that is not tracked (it can hold no cycle:
// it refers only to the guard, which refers to no Python object), taken
// from a free list of its own, and called through vectorcall. On the class
// (`Guard.__exit__`) they answer PyO3's method descriptors, so signatures,
// docstrings and `Guard.__exit__(g, ...)` are as before; the bound object
// has `__self__` (the guard), and any call with keywords or too many
// arguments goes to PyO3's method.

/// `Py_TPFLAGS_HAVE_VECTORCALL`: honoured for types made from a spec (with
/// a `__vectorcalloffset__` member) since CPython 3.9, though the limited
/// API's headers name it only from 3.12.
const TPFLAGS_HAVE_VECTORCALL: std::ffi::c_ulong = 1 << 11;
/// `PY_VECTORCALL_ARGUMENTS_OFFSET`, the flag bit of a vectorcall's count.
const VECTORCALL_ARGUMENTS_OFFSET: usize = 1 << (usize::BITS - 1);

/// A guard's `__enter__` or `__exit__`, looked up on it.
#[repr(C)]
struct BoundMethod {
    ob_base: ffi::PyObject,
    vectorcall: Option<ffi::vectorcallfunc>,
    /// The guard (a strong reference).
    guard: *mut ffi::PyObject,
    exit: bool,
}

/// `Guard.__enter__` or `Guard.__exit__` in the class's dictionary.
#[repr(C)]
struct MethodDescr {
    ob_base: ffi::PyObject,
    exit: bool,
    /// PyO3's method descriptor (a strong reference, kept for ever).
    pyo3: *mut ffi::PyObject,
}

static BOUND_TYPE: std::sync::atomic::AtomicPtr<ffi::PyTypeObject> =
    std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());
static GUARD_TYPE: std::sync::atomic::AtomicPtr<ffi::PyTypeObject> =
    std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());
/// PyO3's `__enter__`, for calls with arguments.
static ENTER: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// Bound objects freed, kept for the next lookups.
struct FreeBound {
    items: std::cell::UnsafeCell<[*mut BoundMethod; 16]>,
    len: std::cell::UnsafeCell<usize>,
}

// SAFETY: only touched by `descr_get` and `bound_dealloc`, which CPython
// calls with the GIL held; these abi3 builds never run without a GIL.
unsafe impl Sync for FreeBound {}

static FREE_BOUND: FreeBound = FreeBound {
    items: std::cell::UnsafeCell::new([std::ptr::null_mut(); 16]),
    len: std::cell::UnsafeCell::new(0),
};

/// Install the descriptors over PyO3's `__enter__`/`__exit__` (after
/// `install` put the raw methods there: those stay reachable through them).
fn install_bound(py: Python<'_>, guard: &Bound<'_, PyType>) -> PyResult<()> {
    use std::ffi::c_void;
    GUARD_TYPE.store(guard.as_type_ptr(), std::sync::atomic::Ordering::Relaxed);
    let members: &'static mut [ffi::PyMemberDef; 3] = Box::leak(Box::new([
        ffi::PyMemberDef {
            name: c"__vectorcalloffset__".as_ptr(),
            type_code: ffi::Py_T_PYSSIZET,
            offset: std::mem::offset_of!(BoundMethod, vectorcall) as ffi::Py_ssize_t,
            flags: ffi::Py_READONLY,
            doc: std::ptr::null(),
        },
        ffi::PyMemberDef {
            name: c"__self__".as_ptr(),
            type_code: ffi::Py_T_OBJECT_EX,
            offset: std::mem::offset_of!(BoundMethod, guard) as ffi::Py_ssize_t,
            flags: ffi::Py_READONLY,
            doc: std::ptr::null(),
        },
        ffi::PyMemberDef::default(),
    ]));
    let bound_slots: &'static mut [ffi::PyType_Slot; 4] = Box::leak(Box::new([
        ffi::PyType_Slot {
            slot: ffi::Py_tp_dealloc,
            pfunc: bound_dealloc as *mut c_void,
        },
        ffi::PyType_Slot {
            slot: ffi::Py_tp_call,
            pfunc: bound_call as *mut c_void,
        },
        ffi::PyType_Slot {
            slot: ffi::Py_tp_members,
            pfunc: members.as_mut_ptr().cast(),
        },
        ffi::PyType_Slot::default(),
    ]));
    let bound_spec: &'static mut ffi::PyType_Spec = Box::leak(Box::new(ffi::PyType_Spec {
        name: c"pylocksfile._GuardMethod".as_ptr(),
        basicsize: std::mem::size_of::<BoundMethod>() as c_int,
        itemsize: 0,
        flags: (ffi::Py_TPFLAGS_DEFAULT | TPFLAGS_HAVE_VECTORCALL) as std::ffi::c_uint,
        slots: bound_slots.as_mut_ptr(),
    }));
    // SAFETY: a complete spec, leaked so it outlives the type.
    let bound_type = unsafe { Bound::from_owned_ptr_or_err(py, ffi::PyType_FromSpec(bound_spec))? };
    BOUND_TYPE.store(
        bound_type.as_ptr().cast(),
        std::sync::atomic::Ordering::Relaxed,
    );
    // The type lives for ever (its instances may outlive the module's dict).
    std::mem::forget(bound_type);

    let descr_slots: &'static mut [ffi::PyType_Slot; 2] = Box::leak(Box::new([
        ffi::PyType_Slot {
            slot: ffi::Py_tp_descr_get,
            pfunc: descr_get as *mut c_void,
        },
        ffi::PyType_Slot::default(),
    ]));
    let descr_spec: &'static mut ffi::PyType_Spec = Box::leak(Box::new(ffi::PyType_Spec {
        name: c"pylocksfile._GuardMethodDescriptor".as_ptr(),
        basicsize: std::mem::size_of::<MethodDescr>() as c_int,
        itemsize: 0,
        flags: ffi::Py_TPFLAGS_DEFAULT as std::ffi::c_uint,
        slots: descr_slots.as_mut_ptr(),
    }));
    // SAFETY: a complete spec, leaked so it outlives the type.
    let descr_type = unsafe { Bound::from_owned_ptr_or_err(py, ffi::PyType_FromSpec(descr_spec))? };
    for (name, exit, keep) in [("__enter__", false, &ENTER), ("__exit__", true, &EXIT)] {
        // PyO3's descriptor (its own, not the raw one installed over it).
        let pyo3 = keep
            .get(py)
            .ok_or_else(|| PyTypeError::new_err("method not installed"))?
            .clone_ref(py);
        // SAFETY: a new instance of a type with `MethodDescr`'s layout.
        let d = unsafe {
            let p = ffi::PyType_GenericAlloc(descr_type.as_ptr().cast(), 0);
            if p.is_null() {
                return Err(PyErr::fetch(py));
            }
            let d = p.cast::<MethodDescr>();
            (*d).exit = exit;
            (*d).pyo3 = pyo3.into_ptr();
            Bound::from_owned_ptr(py, p)
        };
        guard.setattr(name, d)?;
    }
    std::mem::forget(descr_type);
    Ok(())
}

/// `descr.__get__(obj, type)`: on a guard, a bound object; otherwise
/// whatever PyO3's descriptor answers (on the class: itself).
unsafe extern "C" fn descr_get(
    descr: *mut ffi::PyObject,
    obj: *mut ffi::PyObject,
    ty: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: CPython calls this with the GIL held, `descr` one of ours.
    unsafe {
        let d = descr.cast::<MethodDescr>();
        let guard_type = GUARD_TYPE.load(std::sync::atomic::Ordering::Relaxed);
        if obj.is_null() || ffi::Py_TYPE(obj) != guard_type {
            let pyo3 = (*d).pyo3;
            let get = ffi::PyType_GetSlot(ffi::Py_TYPE(pyo3), ffi::Py_tp_descr_get);
            if get.is_null() {
                ffi::Py_IncRef(pyo3);
                return pyo3;
            }
            let get: ffi::descrgetfunc = std::mem::transmute(get);
            return get(pyo3, obj, ty);
        }
        let len = &mut *FREE_BOUND.len.get();
        let b = if *len > 0 {
            *len -= 1;
            let b = (*FREE_BOUND.items.get())[*len];
            ffi::PyObject_Init(
                b.cast(),
                BOUND_TYPE.load(std::sync::atomic::Ordering::Relaxed),
            );
            b
        } else {
            let p =
                ffi::PyType_GenericAlloc(BOUND_TYPE.load(std::sync::atomic::Ordering::Relaxed), 0);
            if p.is_null() {
                return std::ptr::null_mut();
            }
            p.cast::<BoundMethod>()
        };
        (*b).vectorcall = Some(bound_vectorcall);
        ffi::Py_IncRef(obj);
        (*b).guard = obj;
        (*b).exit = (*d).exit;
        b.cast()
    }
}

unsafe extern "C" fn bound_dealloc(obj: *mut ffi::PyObject) {
    // SAFETY: CPython calls this with the GIL held, on one of ours whose
    // count reached zero.
    unsafe {
        let b = obj.cast::<BoundMethod>();
        let guard = std::mem::replace(&mut (*b).guard, std::ptr::null_mut());
        let ty = ffi::Py_TYPE(obj);
        let len = &mut *FREE_BOUND.len.get();
        if *len < 16 {
            (*FREE_BOUND.items.get())[*len] = b;
            *len += 1;
        } else {
            ffi::PyObject_Free(obj.cast());
        }
        // Instances of a heap type hold a reference to it.
        ffi::Py_DecRef(ty.cast());
        if !guard.is_null() {
            ffi::Py_DecRef(guard);
        }
    }
}

/// A call through the vectorcall protocol: the common forms here, any
/// other by PyO3's method.
unsafe extern "C" fn bound_vectorcall(
    callable: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: usize,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: CPython calls this with the GIL held, `callable` one of ours.
    unsafe {
        let b = callable.cast::<BoundMethod>();
        let guard = (*b).guard;
        let nargs = (nargsf & !VECTORCALL_ARGUMENTS_OFFSET) as ffi::Py_ssize_t;
        if (*b).exit {
            exit_raw(guard, args, nargs, kwnames)
        } else if nargs == 0 && kwnames.is_null() {
            enter_raw(guard, std::ptr::null_mut())
        } else {
            let py = Python::assume_attached();
            trap(py, || call_slow(py, &ENTER, guard, args, nargs, kwnames))
        }
    }
}

/// A call through `tp_call` (`PyObject_Call`): PyO3's method with the guard.
unsafe extern "C" fn bound_call(
    callable: *mut ffi::PyObject,
    args: *mut ffi::PyObject,
    kwargs: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: CPython calls this with the GIL held, `args` a tuple and
    // `kwargs` a dict or NULL, all borrowed.
    unsafe {
        let py = Python::assume_attached();
        let b = callable.cast::<BoundMethod>();
        let method = if (*b).exit { &EXIT } else { &ENTER };
        trap(py, || {
            let method = method
                .get(py)
                .ok_or_else(|| PyTypeError::new_err("method not installed"))?;
            let guard = Borrowed::from_ptr(py, (*b).guard).to_owned();
            let args = Borrowed::from_ptr(py, args).cast::<PyTuple>()?.to_owned();
            let mut all = vec![guard.into_any()];
            all.extend(args.iter());
            let kwargs = if kwargs.is_null() {
                None
            } else {
                Some(Borrowed::from_ptr(py, kwargs).cast::<PyDict>()?.to_owned())
            };
            let out = method
                .bind(py)
                .call(PyTuple::new(py, all)?, kwargs.as_ref())?;
            Ok(out.into_ptr())
        })
    }
}
