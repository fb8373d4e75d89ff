//! The per-process table of process-mode owners, keyed by (device, inode).
//!
//! Process-associated locks belong to the process and the file, not to a
//! descriptor, and closing *any* descriptor of the file drops all of them.
//! So all process-mode handles of one file share one [`Owner`], and no
//! descriptor of a file with a live process-mode owner is closed while that
//! could lose a lock (SQLite's cure for the same pitfall).
//!
//! # Parked descriptors, and why they stay few
//! A descriptor of such a file whose handle goes away (an OFD handle, or a
//! process-mode handle's own) is *parked* in the file's entry instead of
//! closed. Left at that, every open and close of a handle would leave one
//! more descriptor behind for as long as the process-mode owner lives. Two
//! rules keep the number bounded by the most handles ever open at once:
//!
//! - **Reuse.** Opening a handle of a file that has an entry first looks
//!   the path up with `stat` and opens nothing new where it can: a
//!   process-mode handle joins the owner with no descriptor of its own (the
//!   owner's one is enough), and an OFD handle takes a parked descriptor of
//!   the right access mode (it needs an open file description of its own,
//!   which a parked one is: no other owner uses it, and any OFD lock left
//!   on it is cleared first).
//! - **Closing when idle.** Whenever the table meets the entry (a handle
//!   opens, leaves or parks a descriptor), parked descriptors are closed if
//!   the owner holds nothing *and* no thread of it sleeps in the kernel: a
//!   sleeper may already hold the first raises of a multi-piece wait that
//!   the bookkeeping does not show yet ([`Owner::if_idle`]).
//!   They are closed under the owner's mutex, so no lock can be taken
//!   between the check and the close.
//!
//! Every change of this lifecycle happens under the table's mutex, then the
//! owner's (never the other way round).

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::engine::fcntl::Fcntl;
use crate::engine::Engine;
use crate::owner::Owner;
use crate::span::Span;
use crate::sys::{self, Family, LockType};

type FcntlOwner = Owner<Fcntl>;

/// A descriptor of a file with a process-mode owner, kept open only so its
/// closing drops none of the owner's locks.
struct Parked {
    fd: OwnedFd,
    writable: bool,
}

struct Entry {
    owner: Arc<FcntlOwner>,
    parked: Vec<Parked>,
}

impl Entry {
    /// Close every parked descriptor if that can lose no lock (checked
    /// and done under the owner's mutex, so no lock is taken in between).
    fn close_parked_if_idle(&mut self) {
        if !self.parked.is_empty() {
            let parked = &mut self.parked;
            self.owner.if_idle(|| parked.clear());
        }
    }

    /// Take a parked descriptor, writable ones first, read-only ones only if
    /// `read_only_ok`.
    fn take_parked(&mut self, read_only_ok: bool) -> Option<Parked> {
        let writable = self.parked.iter().position(|p| p.writable);
        let at = match writable {
            Some(at) => at,
            None if read_only_ok && !self.parked.is_empty() => 0,
            None => return None,
        };
        let p = self.parked.swap_remove(at);
        // Its last OFD owner unlocked what it knew of; a lowering that
        // failed would still be there, and would stand in the way of this
        // process's own locks. Without OFD support there is nothing to clear.
        let _ = sys::set_lock(
            p.fd.as_fd(),
            Family::Ofd,
            LockType::Unlock,
            Span::ALL.to_sys(),
            false,
        );
        // Nor may a flock(2) lock left by a flock-mode handle stay on it.
        let _ = sys::flock_file(p.fd.as_fd(), sys::FlockOp::Unlock, false);
        Some(p)
    }
}

struct Table {
    entries: Vec<Entry>,
}

static TABLE: Mutex<Table> = Mutex::new(Table {
    entries: Vec::new(),
});

fn table() -> MutexGuard<'static, Table> {
    let mut t = TABLE.lock().unwrap_or_else(|p| p.into_inner());
    t.forget_inherited();
    t
}

impl Table {
    /// Drop entries inherited through fork without closing anything:
    /// closing their descriptors here could drop the child's own locks.
    fn forget_inherited(&mut self) {
        if self.entries.iter().any(|e| e.owner.is_inherited()) {
            let (stale, live) = std::mem::take(&mut self.entries)
                .into_iter()
                .partition(|e| e.owner.is_inherited());
            self.entries = live;
            std::mem::forget::<Vec<Entry>>(stale);
        }
    }

    fn find(&mut self, dev: u64, ino: u64) -> Option<&mut Entry> {
        self.entries
            .iter_mut()
            .find(|e| e.owner.engine.dev == dev && e.owner.engine.ino == ino)
    }
}

/// Whether any file has a process-mode owner in this process (else opening
/// need not look for one).
pub(crate) fn has_owners() -> bool {
    !table().entries.is_empty()
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
    let mut t = table();
    let Some(entry) = t.find(dev, ino) else {
        return Reuse::NoOwner;
    };
    let owner = Arc::clone(&entry.owner);
    let got = match family {
        Family::Posix => {
            if !owner.engine.writable() {
                // A writable descriptor parked by an OFD handle lets the
                // owner take exclusive locks from now on.
                if let Some(p) = entry.take_parked(false) {
                    owner.engine.adopt(p.fd, true);
                }
            }
            if owner.engine.writable() || read_only_ok {
                owner.add_handle();
                Reuse::Joined(owner)
            } else {
                Reuse::NoFit
            }
        }
        Family::Ofd => match entry.take_parked(read_only_ok) {
            Some(p) => Reuse::Lent(p.fd, p.writable),
            None => Reuse::NoFit,
        },
    };
    entry.close_parked_if_idle();
    got
}

/// The process-mode owner of (dev, ino), joined by one more handle that
/// brings `fd`; created if there is none.
pub(crate) fn join(dev: u64, ino: u64, fd: OwnedFd, writable: bool) -> Arc<FcntlOwner> {
    let mut t = table();
    if let Some(entry) = t.find(dev, ino) {
        let owner = Arc::clone(&entry.owner);
        owner.add_handle();
        if writable && !owner.engine.writable() {
            owner.engine.adopt(fd, writable);
        } else {
            // The owner needs no second descriptor; closing it could drop
            // the owner's locks, though.
            entry.parked.push(Parked { fd, writable });
            entry.close_parked_if_idle();
        }
        return owner;
    }
    let engine = Fcntl::new(Family::Posix, dev, ino, fd, writable);
    let owner = Arc::new(Owner::new(engine));
    t.entries.push(Entry {
        owner: Arc::clone(&owner),
        parked: Vec::new(),
    });
    owner
}

/// One process-mode handle leaves; the last one unlocks everything and
/// takes the owner out of the table, closing its parked descriptors (its
/// own close when it drops).
pub(crate) fn leave(owner: &Arc<FcntlOwner>) {
    let mut t = table();
    if owner.remove_handle() > 0 {
        if let Some(entry) = t.find(owner.engine.dev, owner.engine.ino) {
            entry.close_parked_if_idle();
        }
        return;
    }
    // Still under the table lock, so no new owner of this file exists yet
    // whose locks this could drop.
    owner.unlock_everything();
    t.entries.retain(|e| !Arc::ptr_eq(&e.owner, owner));
}

/// Close `fd` of (dev, ino), unless a live process-mode owner of that file
/// could lose its locks by it; then it is parked for reuse.
pub(crate) fn close(dev: u64, ino: u64, fd: OwnedFd) {
    let mut t = table();
    let Some(entry) = t.find(dev, ino) else {
        drop(t);
        return drop(fd);
    };
    // Unknown access mode: park it as read-only, which never lends it for
    // an exclusive lock it cannot take.
    let writable = sys::is_writable(fd.as_fd()).unwrap_or(false);
    entry.parked.push(Parked { fd, writable });
    entry.close_parked_if_idle();
}
