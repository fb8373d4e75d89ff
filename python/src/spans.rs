//! Python values as spans of lock indices, and back.
//!
//! Two dialects: the original's `lock_n` (an int, or a `(start, count)`
//! pair as a tuple or list; anything else is an `IllegalArgumentError`) and
//! the modern API's (an int, a `range` with step 1, a `slice` whose open
//! stop means "to the end", or a `(start, count)` pair).

use locksfile::{Span, INDEX_END};
use pyo3::exceptions::{PyOverflowError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyInt, PyList, PyRange, PySlice, PyTuple};

use crate::exceptions::{illegal_argument, invalid_span};

/// The largest lock index, `i64::MAX - 1`, spelled for messages.
const LAST_INDEX: &str = "2**63 - 2";

/// An int that is not a bool, as i64; `Err(None)` when it is not an int at
/// all, `Err(Some(negative))` when it does not fit in an i64.
fn int_value(obj: &Bound<'_, PyAny>) -> Result<i64, Option<bool>> {
    if !obj.is_instance_of::<PyInt>() || obj.is_instance_of::<PyBool>() {
        return Err(None);
    }
    match obj.extract::<i64>() {
        Ok(v) => Ok(v),
        Err(e) if e.is_instance_of::<PyOverflowError>(obj.py()) => {
            Err(Some(obj.lt(0).unwrap_or(false)))
        }
        Err(_) => Err(None),
    }
}

fn describe(obj: &Bound<'_, PyAny>) -> String {
    let ty = obj
        .get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into());
    let r = obj
        .repr()
        .map(|r| r.to_string())
        .unwrap_or_else(|_| "?".into());
    let r = if r.chars().count() > 40 {
        format!("{}...", r.chars().take(40).collect::<String>())
    } else {
        r
    };
    format!("{ty} {r}")
}

/// The span of one index given as a plain `int` (not a subclass) in range:
/// the hot path of every take, so the span is made by the inlined
/// `Span::new` (no `Result` carrying an `Error` through a call). `None`
/// for anything else, which the callers parse the slow way.
#[inline]
pub fn plain_index(obj: &Bound<'_, PyAny>) -> Option<Span> {
    if !obj.is_exact_instance_of::<PyInt>() {
        return None;
    }
    let v = obj.extract::<i64>().ok()?;
    if v >= 0 && v < INDEX_END as i64 {
        Span::new(v as u64, v as u64 + 1).ok()
    } else {
        None
    }
}

/// The original's `lock_n`: an index, or `(start, count)` as a tuple or list.
pub fn lock_n_span(obj: &Bound<'_, PyAny>) -> PyResult<Span> {
    let py = obj.py();
    // Hot path: a plain int.
    if let Some(s) = plain_index(obj) {
        return Ok(s);
    }
    let pair = if let Ok(t) = obj.cast::<PyTuple>() {
        Some((t.len(), t.get_item(0).ok(), t.get_item(1).ok()))
    } else if let Ok(l) = obj.cast::<PyList>() {
        Some((l.len(), l.get_item(0).ok(), l.get_item(1).ok()))
    } else {
        None
    };
    match pair {
        None => match int_value(obj) {
            Ok(v) if v < 0 => Err(illegal_argument(
                py,
                format!("lock_n must be a non-negative lock index, got {v}"),
            )),
            Ok(v) => Ok(Span::with_count(v as u64, 1).map_err(|_| {
                illegal_argument(
                    py,
                    format!("lock_n {v} is beyond the last lock index ({LAST_INDEX})"),
                )
            })?),
            Err(Some(true)) => Err(illegal_argument(
                py,
                "lock_n must be a non-negative lock index, got a negative int",
            )),
            Err(Some(false)) => Err(illegal_argument(
                py,
                format!("lock_n is beyond the last lock index ({LAST_INDEX})"),
            )),
            Err(None) => Err(illegal_argument(
                py,
                format!(
                    "lock_n must be an int or a (start, count) tuple or list, got {}",
                    describe(obj)
                ),
            )),
        },
        Some((len, a, b)) => {
            if len != 2 {
                return Err(illegal_argument(
                    py,
                    format!("lock_n as a tuple or list must be (start, count), got {len} items"),
                ));
            }
            let (a, b) = (a.expect("two items"), b.expect("two items"));
            let start = pair_field(
                &a,
                "start",
                "a non-negative lock index",
                0,
                "is beyond the last lock index",
            )?;
            let count = pair_field(
                &b,
                "count",
                "a positive number of locks",
                1,
                "goes beyond the last lock index",
            )?;
            Span::with_count(start, count).map_err(|_| {
                illegal_argument(
                    py,
                    format!(
                        "lock_n ({start}, {count}) goes beyond the last lock index ({LAST_INDEX})"
                    ),
                )
            })
        }
    }
}

/// One field of the original's `(start, count)`: an int of at least `min`.
fn pair_field(
    item: &Bound<'_, PyAny>,
    field: &str,
    rule: &str,
    min: i64,
    beyond: &str,
) -> PyResult<u64> {
    let py = item.py();
    let msg = match int_value(item) {
        Ok(v) if v >= min => return Ok(v as u64),
        Ok(v) => format!("lock_n {field} must be {rule}, got {v}"),
        Err(Some(true)) => format!("lock_n {field} must be {rule}, got a negative int"),
        Err(Some(false)) => format!("lock_n {field} {beyond} ({LAST_INDEX})"),
        Err(None) => format!("lock_n {field} must be an int, got {}", describe(item)),
    };
    Err(illegal_argument(py, msg))
}

/// A lock index or bound for the modern API (`InvalidSpanError` when negative or too large).
fn index(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<u64> {
    let py = obj.py();
    match int_value(obj) {
        Ok(v) if v >= 0 => Ok(v as u64),
        Ok(_) | Err(Some(true)) => Err(invalid_span(py, format!("{what} must not be negative"))),
        Err(Some(false)) => Err(invalid_span(
            py,
            format!("{what} is beyond the last lock index ({LAST_INDEX})"),
        )),
        Err(None) => Err(PyTypeError::new_err(format!(
            "{what} must be an int, got {}",
            describe(obj)
        ))),
    }
}

fn checked(py: Python<'_>, r: Result<Span, locksfile::Error>) -> PyResult<Span> {
    r.map_err(|e| invalid_span(py, e.to_string()))
}

/// The modern API's span: an int, a `range` (step 1), a `slice` (step 1;
/// an open stop runs to the end), or a `(start, count)` pair.
pub fn py_span(obj: &Bound<'_, PyAny>) -> PyResult<Span> {
    let py = obj.py();
    if let Some(s) = plain_index(obj) {
        return Ok(s);
    }
    if let Ok(r) = obj.cast::<PyRange>() {
        let step = r.getattr("step")?;
        if !step.eq(1)? {
            return Err(invalid_span(py, "a range span must have step 1"));
        }
        let start = index(&r.getattr("start")?, "range start")?;
        let stop = index(&r.getattr("stop")?, "range stop")?;
        return checked(py, Span::new(start, stop));
    }
    if let Ok(s) = obj.cast::<PySlice>() {
        let step = s.getattr("step")?;
        if !step.is_none() && !step.eq(1)? {
            return Err(invalid_span(py, "a slice span must have step 1"));
        }
        let start = s.getattr("start")?;
        let start = if start.is_none() {
            0
        } else {
            index(&start, "slice start")?
        };
        let stop = s.getattr("stop")?;
        if stop.is_none() {
            return checked(py, Span::to_end(start));
        }
        let stop = index(&stop, "slice stop")?;
        return checked(py, Span::new(start, stop));
    }
    let pair = if let Ok(t) = obj.cast::<PyTuple>() {
        Some((t.len(), t.get_item(0).ok(), t.get_item(1).ok()))
    } else if let Ok(l) = obj.cast::<PyList>() {
        Some((l.len(), l.get_item(0).ok(), l.get_item(1).ok()))
    } else {
        None
    };
    if let Some((len, a, b)) = pair {
        if len != 2 {
            return Err(invalid_span(
                py,
                format!("a span pair must be (start, count), got {len} items"),
            ));
        }
        let start = index(&a.expect("two items"), "span start")?;
        let count = index(&b.expect("two items"), "span count")?;
        return checked(py, Span::with_count(start, count));
    }
    if int_value(obj).is_ok() || matches!(int_value(obj), Err(Some(_))) {
        let i = index(obj, "lock index")?;
        return checked(py, Span::with_count(i, 1));
    }
    Err(PyTypeError::new_err(format!(
        "a span is an int, a range, a slice or a (start, count) pair, not {}",
        describe(obj)
    )))
}

/// `range(start, end)`; a span to the end ends at `INDEX_END` (2**63 - 1).
pub fn span_to_range(py: Python<'_>, s: Span) -> PyResult<Bound<'_, PyAny>> {
    Ok(PyRange::new(py, s.start() as isize, s.end() as isize)?.into_any())
}
