//! What the owners of one process share of a table ([`Joined`]): its
//! mapping, one description of the sidecar (carrying the process's share
//! of the DMS byte and its liveness byte), one in-use marker on the lock
//! file, and a process entry in the table that every owner of the process
//! names. As SQLite's `unixInodeInfo` shares one `-shm` mapping among a
//! process's connections.
//!
//! Why shared: every `fcntl` and every `close` of a file walks the
//! kernel's list of that file's record locks, and the table is mapped
//! whole (gigabytes of address space, see `layout.rs`). With a description
//! and a mapping per owner, a process with thousands of owners pays for
//! each open and close in proportion to every owner's locks, and runs out
//! of address space past about 20,000 of them; shared, the kernel's lists
//! hold a few entries per process, and a table is mapped once per process.
//!
//! An owner lives while its process entry does: the process holds byte
//! `LIVENESS + entry` of the sidecar until its last owner is gone or it
//! dies, and a slot names the entry and that entry's nonce when claimed,
//! so that an entry reused after its process died names none of the dead
//! process's owners.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use crate::error::Error;
use crate::sys::{self, LockType};

use super::layout::{LIVENESS, NIL, PROCS};
use super::sidecar::{is_contention, join_marked, kernel_locks, reopen, set_byte, IN_USE};
use super::table::{take_corrupt, Map, TableLock};

/// A table as one process has joined it (see the module's note).
pub(super) struct Joined {
    map: Map,
    /// The sidecar: the process's share of its DMS byte and its liveness
    /// byte. `None` once dropped.
    fd: Option<OwnedFd>,
    /// A description of the lock file holding its [`IN_USE`] byte shared.
    mark: Option<OwnedFd>,
    /// This process's entry in the table (`NIL` until claimed).
    pub(super) proc: u32,
    generation: u64,
    dev: u64,
    ino: u64,
    pub(super) sidecar: PathBuf,
}

impl std::ops::Deref for Joined {
    type Target = Map;

    fn deref(&self) -> &Map {
        &self.map
    }
}

/// The tables this process has joined, found by the lock file's device
/// and inode: held weakly, so a table is left when its last owner goes.
static JOINED: Mutex<Vec<Weak<Joined>>> = Mutex::new(Vec::new());

impl Joined {
    /// The table of the lock file `id` (open as `lock_fd` at `lock_path`,
    /// whose sidecar is `sidecar`), as this process has joined it: the one
    /// its other owners use, or joined now. Two threads that join at once
    /// may each join (two entries of one process, each sound).
    pub(super) fn get(
        lock_path: &Path,
        lock_fd: BorrowedFd<'_>,
        id: &sys::FileId,
        sidecar: &Path,
    ) -> Result<Arc<Joined>, Error> {
        let generation = sys::fork_generation();
        let found = {
            let mut joined = JOINED.lock().unwrap_or_else(|p| p.into_inner());
            joined.retain(|w| w.strong_count() > 0);
            joined
                .iter()
                .filter_map(Weak::upgrade)
                .find(|j| j.is(id, generation, sidecar))
        };
        if let Some(j) = found {
            return Ok(j);
        }
        if let Some(in_use) = kernel_locks(lock_fd, id.dev, id.ino) {
            return Err(Error::MixedModes {
                path: lock_path.to_path_buf(),
                in_use,
            });
        }
        // The in-use marker goes through a description of its own, which
        // no child inherits: a child must never keep the table in use.
        let write = sys::is_writable(lock_fd).unwrap_or(false);
        let mark = reopen(lock_fd, write).map_err(|e| Error::io("open lock file", e))?;
        if !sys::close_in_children(mark.as_raw_fd()) {
            return Err(Error::TableFull {
                path: sidecar.to_path_buf(),
                what: "shm handles in this process",
            });
        }
        let (fd, map) = match join_marked(sidecar, mark.as_fd(), write, id) {
            Ok(j) => j,
            Err(e) => {
                sys::keep_in_children(mark.as_raw_fd());
                return Err(e);
            }
        };
        let mut j = Joined {
            map,
            fd: Some(fd),
            mark: Some(mark),
            proc: NIL,
            generation,
            dev: id.dev,
            ino: id.ino,
            sidecar: sidecar.to_path_buf(),
        };
        // On an error, dropping `j` leaves the table as it found it, and
        // this thread's note of a corrupt table goes with the error.
        j.proc = j.claim_proc().inspect_err(|_| {
            take_corrupt();
        })?;
        let j = Arc::new(j);
        JOINED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::downgrade(&j));
        Ok(j)
    }

    /// Whether this is the table of lock file `id` with sidecar `sidecar`,
    /// joined in this process since its last fork. Both files must still
    /// have a name: a device and inode number are reused once a file is
    /// removed, so a lock file made where one was removed may have this
    /// one's numbers and be another.
    fn is(&self, id: &sys::FileId, generation: u64, sidecar: &Path) -> bool {
        let named = |fd: &Option<OwnedFd>| {
            fd.as_ref()
                .and_then(|fd| sys::fstat(fd.as_fd()).ok())
                .is_some_and(|st| st.nlink > 0)
        };
        (self.dev, self.ino, self.generation) == (id.dev, id.ino, generation)
            && self.sidecar == sidecar
            && named(&self.mark)
            && named(&self.fd)
    }

    /// The sidecar's descriptor.
    pub(super) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_ref().expect("open until dropped").as_fd()
    }

    pub(super) fn is_inherited(&self) -> bool {
        self.generation != sys::current_fork_generation()
    }

    #[cold]
    pub(super) fn corrupted(&self, what: &'static str) -> Error {
        Error::Sidecar {
            path: self.sidecar.clone(),
            problem: crate::error::SidecarProblem::Corrupt { what },
        }
    }

    /// The table with its mutex held, repaired first if its last holder
    /// died holding it.
    pub(super) fn table(&self) -> Result<TableLock<'_>, Error> {
        let (mut g, died) = self.map.lock().map_err(|e| {
            if e.kind() == std::io::ErrorKind::InvalidData {
                self.corrupted("the table's mutex")
            } else {
                Error::io("lock table mutex", e)
            }
        })?;
        g.my_proc = self.proc;
        if died {
            g.repair(self.fd(), self.proc);
            g.consistent();
            g.recheck();
        }
        if !g.sane {
            return Err(self.corrupted("the header or the queue"));
        }
        Ok(g)
    }

    /// Take a process entry and its liveness byte: a free one, else one
    /// whose process died (its owners are purged first).
    fn claim_proc(&self) -> Result<u32, Error> {
        let mut g = self.table()?;
        let hwm = g.proc_hwm() as u32;
        for pass in 0..2 {
            for p in 0..PROCS as u32 {
                let used = g.process(p as usize).used != 0;
                if used != (pass == 1) {
                    if pass == 1 && p >= hwm {
                        break;
                    }
                    continue;
                }
                // Getting the byte proves the entry's last process gone.
                match set_byte(self.fd(), LockType::Write, LIVENESS + p as i64, false) {
                    Ok(()) => {}
                    Err(e) if is_contention(&e) => continue,
                    Err(e) => return Err(Error::io("lock process entry", e)),
                }
                if used {
                    let dead = *g.process(p as usize);
                    for s in 0..g.slot_hwm() as u32 {
                        let slot = *g.slot(s as usize);
                        if slot.used == 1 && slot.proc == p && slot.proc_nonce == dead.nonce {
                            g.purge(s);
                        }
                    }
                }
                if let Some(what) = take_corrupt() {
                    return Err(self.corrupted(what));
                }
                let h = g.header();
                let nonce = h.next_nonce;
                h.next_nonce = h.next_nonce.wrapping_add(1);
                h.proc_hwm = h.proc_hwm.max(p + 1);
                let entry = g.process(p as usize);
                entry.pid = std::process::id();
                entry.nonce = nonce;
                entry.used = 1;
                return Ok(p);
            }
        }
        Err(Error::TableFull {
            path: self.sidecar.clone(),
            what: "processes",
        })
    }
}

impl Drop for Joined {
    fn drop(&mut self) {
        if self.is_inherited() {
            // The parent's: its descriptors were closed at fork (their
            // numbers may be other files' by now) and its entry is not ours.
            std::mem::forget(self.fd.take());
            std::mem::forget(self.mark.take());
            return;
        }
        if self.proc != NIL {
            if let Ok(g) = self.table() {
                // Every owner of ours purged its slot as it left.
                g.process(self.proc as usize).used = 0;
            }
            // A corrupt table is left as it is: its next first opener
            // sets it up afresh.
            let _ = take_corrupt();
        }
        // The marker before the table: whoever holds the marker holds the
        // table, but for openers on their way in.
        if let Some(mark) = self.mark.take() {
            let _ = set_byte(mark.as_fd(), LockType::Unlock, IN_USE, false);
            sys::keep_in_children(mark.as_raw_fd());
            // Through the registry: a close may drop process-mode locks.
            crate::descriptors::close(self.dev, self.ino, mark);
        }
        if let Some(fd) = self.fd.take() {
            sys::keep_in_children(fd.as_raw_fd());
            // Closing drops the liveness byte and our share of the table.
            drop(fd);
        }
    }
}
