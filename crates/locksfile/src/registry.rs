//! The per-process table of process-mode owners, keyed by (device, inode).
//!
//! Process-associated locks belong to the process and the file, not to a
//! descriptor, and closing *any* descriptor of the file drops all of them.
//! So all process-mode handles of one file share one [`Owner`], and no
//! descriptor of a file with a live process-mode owner is closed until that
//! owner goes: it is handed to the owner instead (SQLite's cure for the
//! same pitfall). Every change of that lifecycle happens under one mutex.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::owner::Owner;
use crate::sys::{self, Family};

struct Table {
    owners: Vec<Arc<Owner>>,
}

static TABLE: Mutex<Table> = Mutex::new(Table { owners: Vec::new() });

fn table() -> MutexGuard<'static, Table> {
    TABLE.lock().unwrap_or_else(|p| p.into_inner())
}

impl Table {
    /// Drop entries inherited through fork without closing anything:
    /// closing their descriptors here could drop the child's own locks.
    fn forget_inherited(&mut self) {
        let gen = sys::current_fork_generation();
        if self.owners.iter().any(|o| o.generation != gen) {
            let (stale, live) = std::mem::take(&mut self.owners)
                .into_iter()
                .partition(|o| o.generation != gen);
            self.owners = live;
            std::mem::forget::<Vec<Arc<Owner>>>(stale);
        }
    }

    fn find(&self, dev: u64, ino: u64) -> Option<&Arc<Owner>> {
        self.owners.iter().find(|o| o.dev == dev && o.ino == ino)
    }
}

/// The process-mode owner of (dev, ino), joined by one more handle that
/// brings `fd`; created if there is none.
pub(crate) fn join(dev: u64, ino: u64, fd: OwnedFd, writable: bool) -> Arc<Owner> {
    let mut t = table();
    t.forget_inherited();
    if let Some(owner) = t.find(dev, ino) {
        let owner = Arc::clone(owner);
        let mut st = owner.lock();
        st.handles += 1;
        Owner::adopt_fd(&mut st, fd, writable);
        drop(st);
        return owner;
    }
    let owner = Arc::new(Owner::new(Family::Posix, dev, ino, fd, writable));
    t.owners.push(Arc::clone(&owner));
    owner
}

/// One process-mode handle leaves; the last one unlocks everything and
/// takes the owner out of the table (its descriptors close when it drops).
pub(crate) fn leave(owner: &Arc<Owner>) {
    let mut t = table();
    let mut st = owner.lock();
    st.handles -= 1;
    if st.handles > 0 {
        return;
    }
    drop(st);
    // Still under the table lock, so no new owner of this file exists yet
    // whose locks this could drop.
    owner.unlock_everything();
    t.owners.retain(|o| !Arc::ptr_eq(o, owner));
}

/// Close `fd` of (dev, ino), unless a live process-mode owner of that file
/// would lose its locks by it; then that owner keeps it open.
pub(crate) fn close(dev: u64, ino: u64, fd: OwnedFd) {
    let mut t = table();
    t.forget_inherited();
    match t.find(dev, ino) {
        Some(owner) => owner.lock().fds.push(fd),
        None => drop(fd),
    }
}
