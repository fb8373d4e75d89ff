//! Closing a lock file's descriptors without dropping a process-mode
//! owner's locks: where a file has one, a descriptor whose user goes away
//! is *parked* instead of closed.
//!
//! Process-associated locks belong to the process and the file, and
//! closing *any* descriptor of the file drops all of them (SQLite's
//! pitfall; `registry` keeps the owners). Engines close every descriptor
//! through [`close`], which parks it while the file has a live
//! process-mode owner here, so no engine needs to know about owners.
//!
//! # Why parked descriptors stay few
//! Left at that, every open and close of a handle would leave one more
//! descriptor behind for as long as the process-mode owner lives. Two
//! rules keep the number bounded by the most handles ever open at once:
//!
//! - **Reuse.** Opening a handle of such a file takes a parked descriptor
//!   where it can ([`take`]; `registry::reuse` decides), which is an open
//!   file description no other owner uses; any lock left on it is cleared
//!   first.
//! - **Closing when idle.** Whenever the table meets the file (a handle
//!   opens, leaves or parks a descriptor), parked descriptors are closed if
//!   the owner holds nothing *and* no thread of it sleeps in the kernel: a
//!   sleeper may already hold the first raises of a multi-piece wait that
//!   the bookkeeping does not show yet ([`Keeper::if_idle`]). They are
//!   closed under the owner's mutex, so no lock can be taken between the
//!   check and the close.
//!
//! Lock order: `registry`'s table, then this one, then the owner's mutex
//! (never the other way round).

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Mutex, MutexGuard, Weak};

use crate::span::Span;
use crate::sys::{self, Family, LockType};

/// The process-mode owner of a file, as parking needs to see it.
pub(crate) trait Keeper: Send + Sync {
    /// Whether the owner came through `fork` (it is the parent's).
    fn inherited(&self) -> bool;

    /// Run `f` if closing a descriptor of the file can lose no lock now,
    /// under what keeps a lock from being taken until `f` returns.
    fn if_idle(&self, f: &mut dyn FnMut());
}

/// A descriptor kept open only so its closing drops none of the owner's locks.
struct Parked {
    fd: OwnedFd,
    writable: bool,
}

struct Entry {
    dev: u64,
    ino: u64,
    keeper: Weak<dyn Keeper>,
    parked: Vec<Parked>,
}

impl Entry {
    /// Close every parked descriptor if that can lose no lock.
    fn close_parked_if_idle(&mut self) {
        if self.parked.is_empty() {
            return;
        }
        match self.keeper.upgrade() {
            Some(keeper) => {
                let parked = &mut self.parked;
                keeper.if_idle(&mut || parked.clear());
            }
            None => self.parked.clear(),
        }
    }
}

static TABLE: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

fn table() -> MutexGuard<'static, Vec<Entry>> {
    let mut t = TABLE.lock().unwrap_or_else(|p| p.into_inner());
    forget_inherited(&mut t);
    t
}

/// Drop entries inherited through fork without closing anything: closing
/// their descriptors here could drop the child's own locks.
fn forget_inherited(entries: &mut Vec<Entry>) {
    let inherited = |e: &Entry| e.keeper.upgrade().is_some_and(|k| k.inherited());
    if entries.iter().any(inherited) {
        let (stale, live) = std::mem::take(entries).into_iter().partition(inherited);
        *entries = live;
        std::mem::forget::<Vec<Entry>>(stale);
    }
}

fn find(entries: &mut [Entry], dev: u64, ino: u64) -> Option<&mut Entry> {
    entries.iter_mut().find(|e| e.dev == dev && e.ino == ino)
}

/// (dev, ino) has a process-mode owner from now on: its descriptors are
/// parked until [`unwatch`].
pub(crate) fn watch(dev: u64, ino: u64, keeper: Weak<dyn Keeper>) {
    table().push(Entry {
        dev,
        ino,
        keeper,
        parked: Vec::new(),
    });
}

/// The process-mode owner of (dev, ino) is gone, its locks with it: close
/// what it kept parked.
pub(crate) fn unwatch(dev: u64, ino: u64) {
    let mut t = table();
    let gone: Vec<Entry> = {
        let (gone, kept) = std::mem::take(&mut *t)
            .into_iter()
            .partition(|e| e.dev == dev && e.ino == ino);
        *t = kept;
        gone
    };
    drop(t);
    drop(gone);
}

/// Park `fd` of (dev, ino), which has a process-mode owner, then close the
/// parked ones if that can lose nothing.
pub(crate) fn park(dev: u64, ino: u64, fd: OwnedFd, writable: bool) {
    let mut t = table();
    match find(&mut t, dev, ino) {
        Some(entry) => {
            entry.parked.push(Parked { fd, writable });
            entry.close_parked_if_idle();
        }
        None => {
            drop(t);
            drop(fd);
        }
    }
}

/// Close `fd` of (dev, ino), unless a live process-mode owner of that file
/// could lose its locks by it; then it is parked for reuse.
pub(crate) fn close(dev: u64, ino: u64, fd: OwnedFd) {
    if find(&mut table(), dev, ino).is_none() {
        return drop(fd);
    }
    // Unknown access mode: park it as read-only, which never lends it for
    // an exclusive lock it cannot take.
    let writable = sys::is_writable(fd.as_fd()).unwrap_or(false);
    park(dev, ino, fd, writable);
}

/// Close the parked descriptors of (dev, ino) if that can lose no lock.
pub(crate) fn close_parked_if_idle(dev: u64, ino: u64) {
    if let Some(entry) = find(&mut table(), dev, ino) {
        entry.close_parked_if_idle();
    }
}

/// A parked descriptor of (dev, ino) and whether it is writable: writable
/// ones first, read-only ones only if `read_only_ok`. Cleared of any lock
/// its last user left on it.
pub(crate) fn take(dev: u64, ino: u64, read_only_ok: bool) -> Option<(OwnedFd, bool)> {
    let mut t = table();
    let entry = find(&mut t, dev, ino)?;
    let writable = entry.parked.iter().position(|p| p.writable);
    let at = match writable {
        Some(at) => at,
        None if read_only_ok && !entry.parked.is_empty() => 0,
        None => return None,
    };
    let p = entry.parked.swap_remove(at);
    drop(t);
    // Its last OFD owner unlocked what it knew of; a lowering that failed
    // would still be there, and would stand in the way of this process's
    // own locks. Without OFD support there is nothing to clear.
    let _ = sys::set_lock(
        p.fd.as_fd(),
        Family::Ofd,
        LockType::Unlock,
        Span::ALL.to_sys(),
        false,
    );
    // Nor may a flock(2) lock left by a flock-mode handle stay on it.
    let _ = sys::flock_file(p.fd.as_fd(), sys::FlockOp::Unlock, false);
    Some((p.fd, p.writable))
}
