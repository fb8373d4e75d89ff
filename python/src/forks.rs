//! Telling a forked child from the process that made an object, without a
//! `getpid(2)` per call.
//!
//! `getpid` is a system call (glibc stopped caching it in 2.25): about
//! 110 ns here, and a guard's `with` block made three of them (the take,
//! `__enter__`, `__exit__`), more than the lock itself costs in shm mode.
//! Instead a generation is bumped in every child by an
//! `os.register_at_fork(after_in_child=...)` hook, registered when the
//! module is imported (before any object exists); an object remembers the
//! generation it was made in. CPython runs that hook in the child of
//! `os.fork()` (and so of `multiprocessing`'s fork), and any C code that
//! forks and then runs Python must call `PyOS_AfterFork_Child`, which runs
//! it too.

use std::sync::atomic::{AtomicU64, Ordering};

use pyo3::prelude::*;
use pyo3::types::PyDict;

static GENERATION: AtomicU64 = AtomicU64::new(0);

/// The process an object was made in, as a fork generation.
#[derive(Clone, Copy, Debug)]
pub struct Born(u64);

impl Born {
    pub fn now() -> Born {
        Born(GENERATION.load(Ordering::Relaxed))
    }

    /// Whether this process is a child forked since the object was made.
    #[inline]
    pub fn forked(self) -> bool {
        GENERATION.load(Ordering::Relaxed) != self.0
    }
}

/// The `after_in_child` hook: this process is a new generation.
#[pyfunction]
fn _after_fork_in_child() {
    GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// Register the hook (at import, before any object is made).
pub fn install(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let hook = wrap_pyfunction!(_after_fork_in_child, m)?;
    let kw = PyDict::new(py);
    kw.set_item("after_in_child", hook)?;
    py.import("os")?
        .getattr("register_at_fork")?
        .call((), Some(&kw))?;
    Ok(())
}
