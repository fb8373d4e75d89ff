//! Asyncio tasks as parties of a `LocksFile`'s owner.

use locksfile::Party;
use pyo3::prelude::*;

/// The party of each asyncio task that took a lock: tasks of one loop
/// (one thread) exclude each other as threads do, and a task's takes
/// compose, whether it awaits them or calls the blocking forms.
#[pyclass(name = "_TaskParty", module = "pylocksfile", frozen)]
pub struct TaskParty(Party);

/// The running asyncio task's party, if this thread runs one now.
///
/// Every take of a `threads="exclude"` object asks, so the common case is
/// kept cheap: no event loop can run before `asyncio` was imported, and
/// looking it up in `sys.modules` costs a dict lookup where asking
/// `asyncio._get_running_loop()` is a call (about a fifth of the guard's
/// own instructions in a `with lf.write(i):` block).
pub fn task_party(py: Python<'_>) -> PyResult<Option<Party>> {
    use pyo3::sync::PyOnceLock;
    use pyo3::types::PyDict;
    static MODULES: PyOnceLock<Py<PyDict>> = PyOnceLock::new();
    let modules = MODULES.get_or_try_init(py, || {
        Ok::<_, PyErr>(
            py.import("sys")?
                .getattr("modules")?
                .cast_into::<PyDict>()?
                .unbind(),
        )
    })?;
    if modules
        .bind(py)
        .get_item(pyo3::intern!(py, "asyncio"))?
        .is_none()
    {
        return Ok(None);
    }
    static RUNNING: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    static CURRENT: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    static PARTIES: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    let running = RUNNING.get_or_try_init(py, || {
        py.import("asyncio")?
            .getattr("_get_running_loop")
            .map(Bound::unbind)
    })?;
    let event_loop = running.bind(py).call0()?;
    if event_loop.is_none() {
        return Ok(None);
    }
    let current = CURRENT.get_or_try_init(py, || {
        py.import("asyncio")?
            .getattr("current_task")
            .map(Bound::unbind)
    })?;
    let task = current.bind(py).call1((event_loop,))?;
    if task.is_none() {
        return Ok(None);
    }
    let parties = PARTIES.get_or_try_init(py, || {
        py.import("weakref")?
            .getattr("WeakKeyDictionary")?
            .call0()
            .map(Bound::unbind)
    })?;
    let parties = parties.bind(py);
    if let Ok(p) = parties.call_method1("get", (&task,))?.cast::<TaskParty>() {
        return Ok(Some(p.get().0));
    }
    let party = Party::new();
    parties.set_item(&task, Py::new(py, TaskParty(party))?)?;
    Ok(Some(party))
}
