//! Python bindings of `locksfile`: the native half of the `pylocksfile`
//! package (`pylocksfile._native`). The package's `__init__.py` re-exports
//! everything public; the exception classes live in `pylocksfile._errors`.
// Unsafe code only in `compat::fastcall`, `modern::fastcall` and
// `gil_cell` (and the calls of `GilCell::with` in `modern::owner`),
// which say why it is sound.
#![deny(unsafe_code)]

mod compat;
mod errors;
mod exceptions;
mod forks;
mod gil_cell;
mod holder;
mod kinds;
mod modern;
mod modes;
mod mutex;
mod paths;
mod spans;
mod trap;
mod wait;
mod with_block;

use pyo3::prelude::*;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    forks::install(m)?;
    m.add("INDEX_END", locksfile::INDEX_END)?;
    m.add_class::<compat::pylocksfile::Pylocksfile>()?;
    compat::fastcall::install(&m.py().get_type::<compat::pylocksfile::Pylocksfile>())?;
    m.add_class::<modern::PyLocksFile>()?;
    m.add_class::<modern::PyGuard>()?;
    modern::install_fastcall(m.py())?;
    m.add_class::<holder::PyHolder>()?;
    m.add_function(wrap_pyfunction!(modern::_shm_table, m)?)?;
    m.add_function(wrap_pyfunction!(modern::_cap_shm_for_tests, m)?)?;
    // `_Wait` and `_ThreadOwner` are internal: made by `LocksFile` only,
    // so not exported.
    Ok(())
}
