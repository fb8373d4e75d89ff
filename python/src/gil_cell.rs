//! A value that only calls holding the GIL touch, reached without a lock.
//!
//! These abi3 builds never run without a GIL, so the GIL already keeps
//! such calls apart; a `Mutex` around the value adds two locked
//! instructions per use, which on the path of `with lf.write(i):` cost
//! more than the rest of the check they guard.
#![allow(unsafe_code)]

use std::cell::UnsafeCell;

use pyo3::Python;

pub struct GilCell<T>(UnsafeCell<T>);

// SAFETY: the value is reached only through `with`, which takes a
// `Python` token: one thread at a time, the one holding the GIL.
unsafe impl<T: Send> Sync for GilCell<T> {}

impl<T> GilCell<T> {
    pub fn new(v: T) -> GilCell<T> {
        GilCell(UnsafeCell::new(v))
    }

    /// Run `f` on the value.
    ///
    /// # Safety
    /// `f` must run no Python code and must not release the GIL: either
    /// could let another call (this thread's, or another thread's once
    /// the GIL is released) reach the value while `f` holds it.
    pub unsafe fn with<R>(&self, _py: Python<'_>, f: impl FnOnce(&mut T) -> R) -> R {
        // SAFETY: the GIL is held (`_py`) and, by the caller's word, kept
        // with no Python code run until `f` returns: no other reference
        // to the value exists meanwhile.
        f(unsafe { &mut *self.0.get() })
    }

    /// The value, through exclusive access.
    pub fn get_mut(&mut self) -> &mut T {
        self.0.get_mut()
    }
}
