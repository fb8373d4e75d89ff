//! `thread_local=True`: an owner per thread.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};

use locksfile::LockFile;
use pyo3::prelude::*;

use crate::errors::to_py;
use crate::mutex::lock_mutex;

use super::outcomes::closed_error;

/// The owners of a `thread_local=True` object: one `LockFile` per thread,
/// kept in a `threading.local`, so that it is closed (and its explicit
/// locks released) when its thread ends. `close()` reaches them through
/// `slots`.
pub struct ThreadOwners {
    local: Py<PyAny>,
    slots: Mutex<Vec<Weak<Slot>>>,
    open: locksfile::OpenOptions,
    abs_path: PathBuf,
}

type Slot = Mutex<Option<Arc<LockFile>>>;

/// What a thread's `threading.local` keeps: that thread's owner.
#[pyclass(name = "_ThreadOwner", module = "pylocksfile", frozen)]
pub struct ThreadSlot {
    slot: Arc<Slot>,
}

impl ThreadOwners {
    /// The owners of an object opened with `open`, `first` (the opening
    /// thread's, whose path the others open) among them.
    pub fn new(
        py: Python<'_>,
        open: locksfile::OpenOptions,
        first: &Arc<LockFile>,
    ) -> PyResult<ThreadOwners> {
        let owners = ThreadOwners {
            local: py.import("threading")?.call_method0("local")?.unbind(),
            slots: Mutex::new(Vec::new()),
            open,
            abs_path: first.path().to_path_buf(),
        };
        owners.add(py, first)?;
        Ok(owners)
    }

    fn add(&self, py: Python<'_>, lf: &Arc<LockFile>) -> PyResult<()> {
        let slot = Arc::new(Mutex::new(Some(Arc::clone(lf))));
        {
            let mut slots = lock_mutex(&self.slots);
            slots.retain(|w| w.strong_count() > 0);
            slots.push(Arc::downgrade(&slot));
        }
        self.local.bind(py).setattr(
            pyo3::intern!(py, "owner"),
            Py::new(py, ThreadSlot { slot })?,
        )
    }

    /// This thread's owner; opened now when `open` and it has none yet.
    pub fn current(&self, py: Python<'_>, open: bool) -> PyResult<Option<Arc<LockFile>>> {
        let local = self.local.bind(py);
        if let Ok(obj) = local.getattr(pyo3::intern!(py, "owner")) {
            let slot = obj.cast::<ThreadSlot>()?;
            // Emptied by close().
            return lock_mutex(&slot.get().slot)
                .as_ref()
                .map(|lf| Some(Arc::clone(lf)))
                .ok_or_else(closed_error);
        }
        if !open {
            return Ok(None);
        }
        let lf = Arc::new(self.open.open(&self.abs_path).map_err(|e| to_py(py, e))?);
        self.add(py, &lf)?;
        Ok(Some(lf))
    }

    /// Release and close every thread's owner (`close()`).
    pub fn close_all(&self, forked: bool) {
        let slots = std::mem::take(&mut *lock_mutex(&self.slots));
        for slot in slots.iter().filter_map(Weak::upgrade) {
            if let Some(lf) = lock_mutex(&slot).take() {
                if !forked {
                    let _ = lf.release_all();
                }
            }
        }
    }
}
