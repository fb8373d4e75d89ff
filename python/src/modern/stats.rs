//! `LocksFile.stats()`: the core's lock statistics as a dict, with the
//! keys of `locksfile stats --json` (durations in milliseconds).

use locksfile::{Histogram, Stats};
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// Milliseconds to the microsecond (the histograms' resolution).
fn ms(d: std::time::Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

fn hist<'py>(py: Python<'py>, h: &Histogram) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("p50", ms(h.p50()))?;
    d.set_item("p99", ms(h.p99()))?;
    d.set_item("max", ms(h.max()))?;
    d.set_item("count", h.count())?;
    d.set_item("sum", ms(h.sum()))?;
    Ok(d)
}

#[allow(clippy::too_many_arguments)]
fn figures<'py>(
    py: Python<'py>,
    acquired: u64,
    contended: u64,
    timeouts: u64,
    deadlocks: u64,
    wait: &Histogram,
    hold: &Histogram,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("acquired", acquired)?;
    d.set_item("contended", contended)?;
    d.set_item("timeouts", timeouts)?;
    d.set_item("deadlocks", deadlocks)?;
    d.set_item("wait_ms", hist(py, wait)?)?;
    d.set_item("hold_ms", hist(py, hold)?)?;
    Ok(d)
}

/// `{"scope", "locks": [{"index", ...}], "owners": [{"pid", "command", ...}]}`.
pub fn to_dict<'py>(py: Python<'py>, s: &Stats) -> PyResult<Bound<'py, PyDict>> {
    let locks = s
        .locks
        .iter()
        .map(|l| {
            let d = figures(
                py,
                l.acquired,
                l.contended,
                l.timeouts,
                l.deadlocks,
                &l.wait,
                &l.hold,
            )?;
            // None: the "other indices" entry.
            d.set_item("index", l.index)?;
            Ok(d)
        })
        .collect::<PyResult<Vec<_>>>()?;
    let owners = s
        .owners
        .iter()
        .map(|o| {
            let d = figures(
                py,
                o.acquired,
                o.contended,
                o.timeouts,
                o.deadlocks,
                &o.wait,
                &o.hold,
            )?;
            d.set_item("pid", o.pid)?;
            d.set_item("command", o.command.as_deref())?;
            Ok(d)
        })
        .collect::<PyResult<Vec<_>>>()?;
    let out = PyDict::new(py);
    out.set_item("scope", s.scope.as_str())?;
    out.set_item("locks", locks)?;
    out.set_item("owners", owners)?;
    Ok(out)
}
