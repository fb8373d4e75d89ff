//! What `with LocksFile(p):` watches: whether its block took a lock.
//!
//! A `LocksFile`'s with statement closes the handle at its end and takes
//! no lock, so `with LocksFile(p):` (filelock's `with FileLock(p):`) runs
//! its block unprotected. The statement notices a block that ended without
//! taking any lock through the handle, holding none at its start, and says
//! so with `NoLockWarning`, naming the fix.
//!
//! The counting stays off the lock path's cost: a take does one relaxed
//! load of `open`, and counts only while some block is open. Relaxed is
//! enough: a take that must count is ordered after the block's `enter` and
//! before its `exit` by something else already (the same thread, or a
//! thread started in the block and joined before its end), and that order
//! carries the two counters with it; a take racing an unrelated thread's
//! block has no order to respect.

use std::ffi::CString;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread::ThreadId;

use pyo3::prelude::*;

use crate::exceptions::no_lock_warning;

/// The with statements open on one `LocksFile`, in any thread.
#[derive(Default)]
pub(crate) struct WithBlocks {
    /// How many blocks are open: takes are counted only while some are.
    open: AtomicU32,
    /// The locks taken (and pickles made) while a block was open.
    takes: AtomicU64,
    /// Each open block, in the order entered.
    entries: Mutex<Vec<Entry>>,
}

/// One open block: who entered it, and what it found there.
struct Entry {
    thread: ThreadId,
    takes: u64,
    held: bool,
}

impl WithBlocks {
    /// A lock was taken through the handle, or the handle was pickled (the
    /// process that unpickles it takes the locks).
    #[inline]
    pub(crate) fn took(&self) {
        if self.open.load(Ordering::Relaxed) != 0 {
            self.takes.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A block starts in this thread; `held`: the handle holds a lock now.
    pub(crate) fn enter(&self, held: bool) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        self.open.fetch_add(1, Ordering::Relaxed);
        entries.push(Entry {
            thread: std::thread::current().id(),
            takes: self.takes.load(Ordering::Relaxed),
            held,
        });
    }

    /// This thread's innermost block ends: what it found ([`Exit`]).
    pub(crate) fn exit(&self) -> Exit {
        let thread = std::thread::current().id();
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let Some(i) = entries.iter().rposition(|e| e.thread == thread) else {
            return Exit {
                no_lock: false,
                last: entries.is_empty(),
            };
        };
        let entry = entries.remove(i);
        self.open.fetch_sub(1, Ordering::Relaxed);
        Exit {
            no_lock: !entry.held && self.takes.load(Ordering::Relaxed) == entry.takes,
            last: entries.is_empty(),
        }
    }
}

/// What a block's end found.
pub(crate) struct Exit {
    /// It ran with no lock: none held at its start, none taken since.
    pub no_lock: bool,
    /// No other block of the handle is open, in any thread: the handle
    /// closes. An outer block (or another thread's) still open keeps it,
    /// and with it the locks that block may hold.
    pub last: bool,
}

/// `NoLockWarning` for a with block of `shown` (`LocksFile('/tmp/x.lock')`)
/// that took no lock, attributed to the user's `with` line (the warning is
/// raised from `__exit__`, which has no Python frame of its own).
pub(crate) fn warn_no_lock(py: Python<'_>, shown: &str) -> PyResult<()> {
    let msg = format!(
        "`with {shown}:` ran its block without taking any lock: LocksFile's with statement \
         only closes the handle. Take a lock (`with lf.write(0):`, `with lf.write(slice(None)):` \
         for the whole file) or use `pylocksfile.FileLock(path)` as with filelock."
    );
    let msg =
        CString::new(msg).map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()))?;
    PyErr::warn(py, no_lock_warning(py)?.as_any(), &msg, 1)
}
