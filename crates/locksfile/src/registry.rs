//! The per-process table of process-mode owners, keyed by (device, inode).
//!
//! Process-associated locks belong to the process and the file, not to a
//! descriptor, and closing *any* descriptor of the file drops all of them.
//! So all process-mode handles of one file share one [`Owner`], and no
//! descriptor of a file with a live process-mode owner is closed while that
//! could lose a lock (SQLite's cure for the same pitfall): the table has
//! `descriptors` park them, and lends them again here.
//!
//! - **Reuse.** Opening a handle of a file that has an owner first looks
//!   the path up with `stat` and opens nothing new where it can: a
//!   process-mode handle joins the owner with no descriptor of its own (the
//!   owner's one is enough), and an OFD handle takes a parked descriptor of
//!   the right access mode (it needs an open file description of its own,
//!   which a parked one is: no other owner uses it).
//! - Whenever the table meets the file (a handle opens or leaves), parked
//!   descriptors are closed if that can lose no lock (see `descriptors`).
//!
//! Every change of this lifecycle happens under the table's mutex, then
//! the parked descriptors' one, then the owner's (never the other way
//! round).

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use crate::descriptors::{self, Keeper};
use crate::engine::fcntl::Fcntl;
use crate::engine::Engine;
use crate::owner::Owner;
use crate::sys::Family;

type FcntlOwner = Owner<Fcntl>;

struct Table {
    owners: Vec<Arc<FcntlOwner>>,
}

static TABLE: Mutex<Table> = Mutex::new(Table { owners: Vec::new() });

fn table() -> MutexGuard<'static, Table> {
    let mut t = TABLE.lock().unwrap_or_else(|p| p.into_inner());
    t.forget_inherited();
    t
}

impl Table {
    /// Drop owners inherited through fork without dropping their engines:
    /// closing their descriptors here could drop the child's own locks.
    fn forget_inherited(&mut self) {
        if self.owners.iter().any(|o| o.is_inherited()) {
            let (stale, live) = std::mem::take(&mut self.owners)
                .into_iter()
                .partition(|o| o.is_inherited());
            self.owners = live;
            std::mem::forget::<Vec<Arc<FcntlOwner>>>(stale);
        }
    }

    fn find(&self, dev: u64, ino: u64) -> Option<&Arc<FcntlOwner>> {
        self.owners
            .iter()
            .find(|o| o.engine.dev == dev && o.engine.ino == ino)
    }
}

/// Whether any file has a process-mode owner in this process (else opening
/// need not look for one).
pub(crate) fn has_owners() -> bool {
    !table().owners.is_empty()
}

/// What the table can give a new handle of a file without opening it.
pub(crate) enum Reuse {
    /// A process-mode handle joined the file's owner (counted in).
    Joined(Arc<FcntlOwner>),
    /// A parked descriptor for an OFD handle of its own, and whether it is
    /// writable.
    Lent(OwnedFd, bool),
    /// The file has an owner, but nothing fits: the owner has no writable
    /// descriptor (process mode) or none is parked (OFD), and read-only
    /// ones were not asked for.
    NoFit,
    /// The file has no process-mode owner here.
    NoOwner,
}

/// A handle of `family` for (dev, ino) without a new descriptor, if the
/// file has a process-mode owner: see [`Reuse`]. Read-only descriptors
/// serve only when `read_only_ok` (the caller found the file cannot be
/// opened for writing now).
pub(crate) fn reuse(dev: u64, ino: u64, family: Family, read_only_ok: bool) -> Reuse {
    let t = table();
    let Some(owner) = t.find(dev, ino).map(Arc::clone) else {
        return Reuse::NoOwner;
    };
    let got = match family {
        Family::Posix => {
            if !owner.engine.writable() {
                // A writable descriptor parked by an OFD handle lets the
                // owner take exclusive locks from now on.
                if let Some((fd, _)) = descriptors::take(dev, ino, false) {
                    owner.engine.adopt(fd, true);
                }
            }
            if owner.engine.writable() || read_only_ok {
                owner.add_handle();
                Reuse::Joined(owner)
            } else {
                Reuse::NoFit
            }
        }
        Family::Ofd => match descriptors::take(dev, ino, read_only_ok) {
            Some((fd, writable)) => Reuse::Lent(fd, writable),
            None => Reuse::NoFit,
        },
    };
    descriptors::close_parked_if_idle(dev, ino);
    drop(t);
    got
}

/// The process-mode owner of (dev, ino), joined by one more handle that
/// brings `fd`; created if there is none.
pub(crate) fn join(dev: u64, ino: u64, fd: OwnedFd, writable: bool) -> Arc<FcntlOwner> {
    let mut t = table();
    if let Some(owner) = t.find(dev, ino).map(Arc::clone) {
        owner.add_handle();
        if writable && !owner.engine.writable() {
            owner.engine.adopt(fd, writable);
        } else {
            // The owner needs no second descriptor; closing it could drop
            // the owner's locks, though.
            descriptors::park(dev, ino, fd, writable);
        }
        return owner;
    }
    let engine = Fcntl::new(Family::Posix, dev, ino, fd, writable);
    let owner = Arc::new(Owner::new(engine));
    let keeper: Weak<dyn Keeper> = Arc::downgrade(&owner) as Weak<FcntlOwner>;
    descriptors::watch(dev, ino, keeper);
    t.owners.push(Arc::clone(&owner));
    owner
}

/// One process-mode handle leaves; the last one unlocks everything and
/// takes the owner out of the table, closing its parked descriptors (its
/// own close when it drops).
pub(crate) fn leave(owner: &Arc<FcntlOwner>) {
    let mut t = table();
    let (dev, ino) = (owner.engine.dev, owner.engine.ino);
    if owner.remove_handle() > 0 {
        descriptors::close_parked_if_idle(dev, ino);
        return;
    }
    // Still under the table lock, so no new owner of this file exists yet
    // whose locks this could drop.
    owner.unlock_everything();
    descriptors::unwatch(dev, ino);
    t.owners.retain(|o| !Arc::ptr_eq(o, owner));
}
