//! How a guard's lock reaches its `LockFile`: a counted reference, or the
//! `LocksFile`'s own handle lent without a count.
//!
//! An `Arc` cloned per take and dropped per release is two locked
//! instructions per `with lf.write(i):` block, about 10 ns here, as much
//! as a tenth of the block. The block's first try (`Owner::guard_forever`)
//! lends the owner's handle instead; the rules that keep that handle
//! alive for as long as any lock lent it lives are in `Handle::lent`.
#![allow(unsafe_code)]

use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::Arc;

use locksfile::LockFile;

pub enum Handle {
    Shared(Arc<LockFile>),
    Lent(NonNull<LockFile>),
}

// SAFETY: a `LockFile` is `Sync` (an `Arc<LockFile>` is sent between
// threads already), so a reference to one may go to another thread; a
// lent one stays valid wherever it is (see `Handle::lent`).
unsafe impl Send for Handle {}

impl Handle {
    /// `lf` lent, without a count.
    ///
    /// # Safety
    /// The caller keeps the `LockFile` alive for as long as the handle
    /// lives. `Owner` does so: only its first try of `write(i)`/`read(i)`
    /// lends its handle, and the guard taken goes into one of its cells
    /// at once; `close()` releases every cell before letting the handle
    /// go, and gives a counted reference to each cell an upgrade has
    /// taken the lock out of (`GuardCell::keep`); the owner dropped gives
    /// one to every cell still holding or converting. A cell keeps that
    /// reference until its lock is released.
    pub unsafe fn lent(lf: &LockFile) -> Handle {
        Handle::Lent(NonNull::from(lf))
    }
}

impl Deref for Handle {
    type Target = LockFile;

    #[inline]
    fn deref(&self) -> &LockFile {
        match self {
            Handle::Shared(lf) => lf,
            // SAFETY: alive for as long as the handle (see `lent`).
            Handle::Lent(p) => unsafe { p.as_ref() },
        }
    }
}
