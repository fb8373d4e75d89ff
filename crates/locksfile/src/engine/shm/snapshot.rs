//! [`Snapshot`]: what a table holds and who waits, read under its mutex
//! without joining it (no owner slot is taken; a repair after a death in
//! the mutex is the only write).

use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::error::{Error, SidecarProblem};
use crate::kind::Kind;
use crate::span::{Span, INDEX_END};
use crate::sys::{self, Family, LockType, OpenHow};

use super::layout::{is_fast, kind_of, lane_index, lane_kind, lane_owner, Slot, DMS, NIL};
use super::repair::proc_alive;
use super::sidecar::{
    byte, check_and_map, cstring, open_sidecar, read_header, set_byte, sidecar_path,
};
use super::table::take_corrupt;
use super::waits::Place;

// ---- snapshots ----

/// One lock in a table snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldLock {
    /// The process that opened the owning handle.
    pub pid: u32,
    /// The owner's id: unique per table while it lives (a registration
    /// counter, never reused while the table is in use).
    pub owner: u64,
    /// The indices held.
    pub span: Span,
    /// Shared or exclusive.
    pub kind: Kind,
}

/// One queued request in a table snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaitingLock {
    /// The waiting process.
    pub pid: u32,
    /// The waiting owner's id (see [`HeldLock::owner`]).
    pub owner: u64,
    /// The indices asked for (for a request of several pieces, from the
    /// first to the last).
    pub span: Span,
    /// The kind asked for.
    pub kind: Kind,
    /// When the wait began.
    pub since: std::time::SystemTime,
}

/// What a [`Mode::Shm`](crate::Mode::Shm) lock table holds, read without
/// joining it: for `locksfile status` and the like.
///
/// ```
/// use locksfile::{shm::Snapshot, LockFile, Mode};
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("data.lock");
/// let lf = LockFile::options().mode(Mode::Shm).open(&path)?;
/// let _g = lf.write(3..5)?;
/// let snap = Snapshot::read(&path)?;
/// assert_eq!(snap.holders.len(), 1);
/// assert_eq!(snap.holders[0].pid, std::process::id());
/// assert!(snap.waiters.is_empty());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Snapshot {
    /// Every lock held, ordered by start index.
    pub holders: Vec<HeldLock>,
    /// Every queued request, in queue order: oldest first, but where the
    /// deadlock search moved a request ahead to break a cycle.
    pub waiters: Vec<WaitingLock>,
}

impl Snapshot {
    /// Read the table of the lock file at `lock_path` (its sidecar is
    /// `<lock_path>-shm`). A table no one uses, or none at all, reads as
    /// empty. Owners found dead are left out. The snapshot may be stale by
    /// the time it returns.
    ///
    /// # Errors
    /// [`Error::Open`] when the sidecar cannot be opened for reading and
    /// writing (taking the table's mutex writes to it); [`Error::Sidecar`]
    /// for a file that is not a lock table; [`Error::Io`].
    pub fn read(lock_path: impl AsRef<Path>) -> Result<Snapshot, Error> {
        let Some((fd, sidecar)) = open_in_use(lock_path.as_ref())? else {
            return Ok(Snapshot::default());
        };
        let map = check_and_map(&sidecar, fd.as_fd(), None)?;
        let (mut g, died) = map.lock().map_err(|e| Error::io("lock table mutex", e))?;
        if died {
            g.repair(fd.as_fd(), NIL);
            g.consistent();
        }
        let mut snap = Snapshot::default();
        // Owners and waiters in use lie below their marks.
        let n = g.slot_hwm();
        let slots: Vec<Slot> = (0..n).map(|s| *g.slot(s)).collect();
        // Each process probed once, however many owners it has.
        let procs: Vec<bool> = (0..g.proc_hwm() as u32)
            .map(|p| g.process(p as usize).used == 1 && proc_alive(fd.as_fd(), p))
            .collect();
        let live: Vec<bool> = slots
            .iter()
            .map(|s| {
                s.used == 1
                    && procs.get(s.proc as usize) == Some(&true)
                    && g.process(s.proc as usize).nonce == s.proc_nonce
            })
            .collect();
        for (o, slot) in slots.iter().enumerate() {
            if !live[o] {
                continue;
            }
            let mut at = slot.head;
            let mut steps = 0;
            while at != NIL && steps < g.walk_limit() {
                let r = *g.rec(at);
                at = r.onext;
                steps += 1;
                if r.owner as usize != o + 1 || r.start >= r.end || r.end > INDEX_END {
                    continue;
                }
                snap.holders.push(HeldLock {
                    pid: slot.pid,
                    owner: slot.nonce,
                    span: Span::from_checked(r.start, r.end),
                    kind: kind_of(r.kind),
                });
            }
        }
        for o in (0..n).filter(|&o| live[o]) {
            for l in g.map.listed_lanes(o as u32) {
                let w = g.map.lane(l).load(Ordering::Acquire);
                if is_fast(w) && lane_owner(w) as usize == o {
                    let i = lane_index(w);
                    snap.holders.push(HeldLock {
                        pid: slots[o].pid,
                        owner: slots[o].nonce,
                        span: Span::from_checked(i, i + 1),
                        kind: kind_of(lane_kind(w)),
                    });
                }
            }
        }
        let mut waiters: Vec<(Place, WaitingLock)> = Vec::new();
        for i in 0..g.waiter_hwm() {
            let w = *g.waiter(i);
            if w.owner == 0 || w.owner as usize > n || !live[(w.owner - 1) as usize] {
                continue;
            }
            if w.start >= w.end || w.end > INDEX_END {
                continue;
            }
            waiters.push((
                w.place(),
                WaitingLock {
                    pid: w.pid,
                    owner: slots[(w.owner - 1) as usize].nonce,
                    span: Span::from_checked(w.start, w.end),
                    kind: kind_of(w.kind),
                    since: std::time::UNIX_EPOCH + Duration::from_nanos(w.since_ns),
                },
            ));
        }
        drop(g);
        drop(map);
        if let Some(what) = take_corrupt() {
            return Err(Error::Sidecar {
                path: sidecar,
                problem: SidecarProblem::Corrupt { what },
            });
        }
        waiters.sort_by_key(|(t, _)| *t);
        snap.waiters = waiters.into_iter().map(|(_, w)| w).collect();
        snap.holders.sort_by_key(|h| (h.span.start(), h.owner));
        Ok(snap)
    }
}

/// The sidecar of the lock file at `lock_path`, opened for reading and
/// writing with a share of its DMS byte (which keeps the table from being
/// reset while it is read), and its path; `None` when there is no table
/// or no one uses it.
pub(super) fn open_in_use(
    lock_path: &Path,
) -> Result<Option<(std::os::fd::OwnedFd, std::path::PathBuf)>, Error> {
    let lock_path = std::fs::canonicalize(lock_path)
        .or_else(|_| std::path::absolute(lock_path))
        .unwrap_or_else(|_| lock_path.to_path_buf());
    let sidecar = sidecar_path(&lock_path);
    let fd = match open_sidecar(&sidecar, 0, false, false) {
        Ok(_) => {
            // Exists: open it for writing without creating anything.
            let c = cstring(&sidecar)?;
            let how = OpenHow::existing(true);
            sys::open(&c, how).map_err(|e| Error::Open {
                path: sidecar.clone(),
                source: e,
            })?
        }
        Err(Error::Open { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    // A share of the DMS byte keeps the table from being reset while
    // we read; if no one else holds it, no one uses the table.
    match sys::get_lock(fd.as_fd(), Family::Ofd, LockType::Write, byte(DMS)) {
        Ok(Some(_)) => {}
        Ok(None) => return Ok(None),
        Err(e) => return Err(Error::io("probe lock table", e)),
    }
    set_byte(fd.as_fd(), LockType::Read, DMS, true)
        .map_err(|e| Error::io("share lock table", e))?;
    let (magic, ..) = read_header(fd.as_fd()).map_err(|e| Error::io("read lock table", e))?;
    if magic == 0 {
        // Being set up afresh (its first opener died at it): empty.
        return Ok(None);
    }
    Ok(Some((fd, sidecar)))
}
