//! `Holder`: a lock another owner holds, as the kernel reported it.

use locksfile::Holder;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::kinds::{kind_name, parse_kind};
use crate::spans::{py_span, span_to_range};

/// A lock another owner holds, as the kernel reported it (a snapshot).
#[pyclass(name = "Holder", module = "pylocksfile", frozen, eq)]
#[derive(PartialEq)]
pub struct PyHolder {
    inner: Holder,
}

impl From<Holder> for PyHolder {
    fn from(inner: Holder) -> Self {
        PyHolder { inner }
    }
}

#[pymethods]
impl PyHolder {
    /// ``Holder(span, kind, pid=None)``: normally made by the library, from
    /// what the kernel reports; constructible so that it pickles.
    #[new]
    #[pyo3(signature = (span, kind, pid = None))]
    fn new(span: &Bound<'_, PyAny>, kind: &Bound<'_, PyAny>, pid: Option<u32>) -> PyResult<Self> {
        Ok(PyHolder {
            inner: Holder {
                span: py_span(span)?,
                kind: parse_kind(kind)?,
                pid,
                server: None,
            },
        })
    }

    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyTuple>> {
        let py = slf.py();
        let me = slf.get();
        let args = (
            span_to_range(py, me.inner.span)?,
            kind_name(me.inner.kind),
            me.inner.pid,
        );
        PyTuple::new(
            py,
            [
                slf.get_type().into_any(),
                args.into_pyobject(py)?.into_any(),
            ],
        )
    }

    /// The indices the conflicting lock covers, as a ``range`` (a lock to
    /// the end of the file ends at ``INDEX_END``).
    #[getter]
    fn span<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        span_to_range(py, self.inner.span)
    }

    /// ``"shared"`` or ``"exclusive"``.
    #[getter]
    fn kind(&self) -> &'static str {
        kind_name(self.inner.kind)
    }

    /// The holding process for a process-associated lock, or the process
    /// that opened the holding object in shm mode (the table records it);
    /// None for an open-file-description lock, whose owner the kernel does
    /// not name.
    #[getter]
    fn pid(&self) -> Option<u32> {
        self.inner.pid
    }

    /// For a lock on a PostgreSQL server: the holding session's server
    /// process; None for a lock file (and after pickling).
    #[getter]
    fn backend_pid(&self) -> Option<u32> {
        self.inner.server.map(|s| s.backend_pid)
    }

    /// For a lock on a PostgreSQL server: the holding client's address
    /// (None over a Unix socket).
    #[getter]
    fn client_addr(&self) -> Option<String> {
        self.inner
            .server
            .and_then(|s| s.client_addr)
            .map(|a| a.to_string())
    }

    /// For a lock on a PostgreSQL server: the holding session's
    /// ``application_name`` (``locksfile pid N`` unless its target set one).
    #[getter]
    fn application_name(&self) -> Option<&'static str> {
        self.inner.server.map(|s| {
            let name: &'static str = s.application_name_static();
            name
        })
    }

    fn __str__(&self) -> String {
        self.inner.to_string()
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let server = match &self.inner.server {
            Some(s) => format!(
                ", backend_pid={}, client_addr={}, application_name={:?}",
                s.backend_pid,
                s.client_addr
                    .map_or("None".to_string(), |a| format!("{:?}", a.to_string())),
                s.application_name()
            ),
            None => String::new(),
        };
        Ok(format!(
            "Holder(span={}, kind={:?}, pid={}{server})",
            span_to_range(py, self.inner.span)?.repr()?,
            kind_name(self.inner.kind),
            self.inner.pid.map_or("None".to_string(), |p| p.to_string())
        ))
    }
}
