//! `_shm_table`: an shm lock table read from outside, for tests and tools.

use std::path::PathBuf;

use locksfile::{Kind, Span};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::to_py;
use crate::kinds::kind_name;

/// ``_shm_table(path)``: what the shm lock table of ``path`` holds, read
/// from outside without joining it, for tests and tools: a dict with
/// ``"holders"`` and ``"waiters"``, lists of ``(pid, owner, start, stop,
/// kind)`` (``stop`` exclusive; ``INDEX_END`` for spans to the end;
/// ``owner`` is the table's id of the handle). Empty when no one uses the
/// table. Not part of the public API.
#[pyfunction]
pub fn _shm_table<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyDict>> {
    let snap = py
        .detach(|| locksfile::shm::Snapshot::read(&path))
        .map_err(|e| to_py(py, e))?;
    let row = |pid: u32, owner: u64, span: Span, kind: Kind| {
        (pid, owner, span.start(), span.end(), kind_name(kind))
    };
    let out = PyDict::new(py);
    let holders: Vec<_> = snap
        .holders
        .iter()
        .map(|h| row(h.pid, h.owner, h.span, h.kind))
        .collect();
    let waiters: Vec<_> = snap
        .waiters
        .iter()
        .map(|w| row(w.pid, w.owner, w.span, w.kind))
        .collect();
    out.set_item("holders", holders)?;
    out.set_item("waiters", waiters)?;
    Ok(out)
}

/// Let this process use at most ``records`` lock records and ``owners``
/// owner slots of any shm table, so that a test sees a table fill without
/// filling gigabytes. Not part of the public API.
#[pyfunction]
pub fn _cap_shm_for_tests(records: usize, owners: usize) {
    locksfile::shm::cap_for_tests(records, owners);
}
