//! Locking a `Mutex` whose holder panicked: the data is still what the
//! binding left there, and a Python caller must not see a poisoned lock.

use std::sync::{Mutex, MutexGuard};

/// `m.lock()`, taking the data of a poisoned mutex as it is.
pub fn lock_mutex<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
