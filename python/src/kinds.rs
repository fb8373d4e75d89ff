//! Lock kinds as Python code names them: `"shared"`/`"exclusive"`, with
//! `"read"`/`"write"` accepted on the way in.

use locksfile::Kind;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyString, PyTuple};

/// `"shared"` or `"exclusive"`: the core's name of the kind (its
/// `Display`), as a `&'static str` for Python.
pub fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Shared => "shared",
        Kind::Exclusive => "exclusive",
    }
}

/// `"shared"`/`"read"` or `"exclusive"`/`"write"`.
pub fn parse_kind(obj: &Bound<'_, PyAny>) -> PyResult<Kind> {
    let s = obj.cast::<PyString>().map_err(|_| {
        PyTypeError::new_err("kind must be \"shared\" or \"exclusive\" (or \"read\" / \"write\")")
    })?;
    match &*s.to_cow()? {
        "shared" | "read" => Ok(Kind::Shared),
        "exclusive" | "write" => Ok(Kind::Exclusive),
        other => Err(PyValueError::new_err(format!(
            "kind must be \"shared\" or \"exclusive\" (or \"read\" / \"write\"), got {other:?}"
        ))),
    }
}

/// A span and an optional kind from up to two positional arguments in
/// either order, told apart by type (a kind is a `str`, a span never is),
/// and the keywords `span=` and `kind=`.
pub fn kind_and_span<'py>(
    method: &str,
    args: &Bound<'py, PyTuple>,
    span: Option<&Bound<'py, PyAny>>,
    kind: Option<&Bound<'py, PyAny>>,
) -> PyResult<(Bound<'py, PyAny>, Option<Bound<'py, PyAny>>)> {
    if args.len() > 2 {
        return Err(PyTypeError::new_err(format!(
            "{method}() takes a kind and a span, got {} positional arguments",
            args.len()
        )));
    }
    let (mut span, mut kind) = (span.cloned(), kind.cloned());
    for a in args.iter() {
        let (slot, name) = if a.is_instance_of::<PyString>() {
            (&mut kind, "kind")
        } else {
            (&mut span, "span")
        };
        if slot.is_some() {
            return Err(PyTypeError::new_err(format!(
                "{method}() got two values for {name}"
            )));
        }
        *slot = Some(a);
    }
    let span = span.ok_or_else(|| {
        PyTypeError::new_err(format!(
            "{method}() missing its span (an index, range, slice or (start, count))"
        ))
    })?;
    Ok((span, kind))
}
