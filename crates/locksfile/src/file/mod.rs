//! The public handle: taking locks through it (opening is in `open`, what
//! it is opened as in `mode`).

use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use self::mode::{Mode, Threads};
use crate::cancel::Cancel;
use crate::engine::fcntl::Fcntl;
use crate::engine::flock::Flock;
#[cfg(feature = "postgres")]
use crate::engine::pg::Pg;
use crate::engine::shm::Shm;
use crate::engine::Engine;
use crate::error::{Error, Holder};
use crate::holds::{Change, HandleId};
use crate::into_span::IntoSpan;
use crate::kind::Kind;
use crate::owner::Owner;
use crate::party::{Party, EVERYONE};
use crate::registry;
use crate::span::Span;
use crate::sys;
use crate::wait::Wait;

#[cfg(doc)]
use crate::error::SpanError;

/// The owner behind a handle, by engine. One match per call, after which
/// the owner's code is the engine's own (no dynamic call on the hot path).
enum Owners {
    Fcntl(Arc<Owner<Fcntl>>),
    Flock(Arc<Owner<Flock>>),
    Shm(Arc<Owner<Shm>>),
    #[cfg(feature = "postgres")]
    Pg(Arc<Owner<Pg>>),
}

/// Run `$body` with `$o` bound to the owner, whichever engine it has.
macro_rules! with_owner {
    ($owners:expr, $o:ident => $body:expr) => {
        match $owners {
            Owners::Fcntl($o) => $body,
            Owners::Flock($o) => $body,
            Owners::Shm($o) => $body,
            #[cfg(feature = "postgres")]
            Owners::Pg($o) => $body,
        }
    };
}

pub(crate) mod mode;
pub(crate) mod open;

/// A handle on a lock file: many numbered reader/writer locks in one file,
/// lock `n` being byte `n`.
///
/// Locks are taken two ways that mix freely: explicitly, as in the original
/// `pylocksfile` ([`acquire`](Self::acquire) / [`release`](Self::release),
/// where the last call on an index wins), and through scoped guards
/// ([`read`](Self::read), [`write`](Self::write) and their `try_`, `_for`
/// and `_until` forms). An index stays locked while any of them covers it,
/// at the strongest kind asked for.
///
/// # Threads
/// `LockFile` is `Send + Sync`. Threads sharing one handle exclude each
/// other as separate handles would, in every mode, while the takes of one
/// thread compose; each thread has its own explicit layer. A guard
/// belongs to the thread that took it, wherever it is dropped. Open with
/// [`Threads::Share`] for handles whose locks are every thread's (see
/// [`Threads`]), and take locks as a [`Party`] of its own for a task.
///
/// # Fork
/// A handle inherited through `fork` fails with [`Error::Forked`] in the
/// child, and dropping it there releases nothing of the parent's.
///
/// ```
/// use locksfile::{Kind, LockFile, Wait};
/// let dir = tempfile::tempdir()?;
/// let lf = LockFile::open(dir.path().join("data.lock"))?;
/// {
///     let _g = lf.write(1..4)?;          // locks 1, 2 and 3, exclusive
///     assert!(LockFile::open(dir.path().join("data.lock"))?.try_read(2).is_err());
/// }                                       // released here
/// lf.acquire(Kind::Shared, 0, Wait::Blocking)?;
/// lf.release_all()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct LockFile {
    owner: Owners,
    /// The explicit layer of the first party to use one.
    handle: HandleId,
    mode: Mode,
    path: PathBuf,
    threads: Threads,
    layers: Layers,
}

/// Which party's explicit layer is which.
#[derive(Default)]
struct Layers {
    /// The party whose layer is the handle's own id (0: none yet).
    first: AtomicU64,
    /// The layers of other parties.
    others: Mutex<Vec<(Party, HandleId)>>,
}

impl fmt::Debug for LockFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockFile")
            .field("path", &self.path)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl LockFile {
    /// Whether the handle's server session is lost (server restart,
    /// failover, network loss, the backend terminated), and every lock
    /// with it: calls then fail with [`Error::ConnectionLost`] and
    /// [`held`](Self::held) is empty. Checks without a round trip (a flag
    /// set by a failed call, and a `poll` of the socket for a hang-up), so
    /// a partition shows once TCP keepalive gives up (about 30 s unless the
    /// target's keepalive words say otherwise). Always
    /// `false` for a lock file.
    pub fn lost(&self) -> bool {
        with_owner!(&self.owner, o => o.engine.session_lost())
    }

    /// Call `f` once, on a thread of its own, as soon as the server
    /// session is gone and every lock with it (the server terminated or
    /// restarted it, or the connection broke: a hang-up is seen at once,
    /// a silent partition after the TCP keepalive's ~30 s), without any
    /// call on the handle. Then [`lost`](Self::lost) is true and every
    /// guard's `is_held()` false. What the holder should do: stop touching
    /// what the locks protected (a write already under way is what fencing
    /// tokens, [`fence`](Self::fence), are for) and open a new handle. If
    /// the handle is dropped first, `f` is never called. Each call adds a
    /// callback (and a thread that sleeps in `poll(2)`).
    ///
    /// # Errors
    /// [`Error::Unsupported`] for a lock file: its locks are lost only with
    /// the process. [`Error::Io`] when the thread cannot start.
    pub fn on_lost(&self, f: impl FnOnce() + Send + 'static) -> Result<(), Error> {
        #[cfg(feature = "postgres")]
        if let Owners::Pg(o) = &self.owner {
            return lost_watch(Arc::downgrade(o), Box::new(f));
        }
        let _ = f;
        Err(Error::Unsupported {
            what: "on_lost on a lock file (only server sessions lose their locks)",
            source: io::Error::from(io::ErrorKind::Unsupported),
        })
    }

    /// Lock statistics (see [`OpenOptions::stats`](crate::OpenOptions::stats)):
    /// per index and per owner, acquisitions, contended takes, timeouts,
    /// deadlocks, and wait and hold time histograms. In [`Mode::Shm`]
    /// they are the table's, every recording owner's together
    /// ([`Scope::Table`](crate::Scope::Table)); in the other modes this
    /// handle's own ([`Scope::Handle`](crate::Scope::Handle)).
    ///
    /// A [`Mode::Shm`] handle reads the table's figures whether or not it
    /// records itself.
    ///
    /// ```
    /// use locksfile::{LockFile, Scope};
    /// let dir = tempfile::tempdir()?;
    /// let lf = LockFile::options().stats(true).open(dir.path().join("data.lock"))?;
    /// drop(lf.write(7)?);
    /// let stats = lf.stats()?;
    /// assert_eq!(stats.scope, Scope::Handle);
    /// assert_eq!((stats.locks[0].index, stats.locks[0].acquired), (Some(7), 1));
    /// assert_eq!(stats.locks[0].hold.count(), 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Unsupported`] when a handle in another mode does not record
    /// statistics.
    pub fn stats(&self) -> Result<crate::Stats, Error> {
        with_owner!(&self.owner, o => o.stats()).ok_or_else(|| Error::Unsupported {
            what: "statistics of a handle that does not record them (OpenOptions::stats, LOCKSFILE_STATS=1)",
            source: io::Error::from(io::ErrorKind::Unsupported),
        })
    }

    /// Whether the owner's locks are gone while its guards live: its
    /// server session was lost ([`lost`](Self::lost)), or a
    /// [`Mode::Flock`] conversion was lost ([`Error::ConversionLost`]).
    pub(crate) fn locks_lost(&self) -> bool {
        with_owner!(&self.owner, o => o.engine.locks_lost().is_some())
    }

    /// Every lock other sessions hold or wait for in this handle's
    /// PostgreSQL namespace, in index order, from `pg_locks` and
    /// `pg_stat_activity` (feature `postgres`); what `locksfile status`
    /// shows. A snapshot.
    ///
    /// # Errors
    /// [`Error::Unsupported`] for a lock file; [`Error::ConnectionLost`];
    /// [`Error::Server`].
    #[cfg(feature = "postgres")]
    pub fn server_locks(&self) -> Result<Vec<crate::ServerLock>, Error> {
        match &self.owner {
            Owners::Pg(o) => o.engine.locks(Span::ALL, None, false),
            _ => Err(Error::Unsupported {
                what: "listing server locks (PostgreSQL handles only)",
                source: io::Error::from(io::ErrorKind::Unsupported),
            }),
        }
    }

    /// What this handle's session can tell about its server that bears on
    /// its locks (feature `postgres`): a pooler between them, the room in
    /// the server's lock table, the deadlock detector's delay, encryption.
    /// `locksfile doctor` reads it.
    ///
    /// # Errors
    /// [`Error::Unsupported`] for a lock file; [`Error::ConnectionLost`];
    /// [`Error::Server`].
    #[cfg(feature = "postgres")]
    pub fn server_facts(&self) -> Result<crate::ServerFacts, Error> {
        match &self.owner {
            Owners::Pg(o) => o.engine.facts(),
            _ => Err(Error::Unsupported {
                what: "reading server facts (PostgreSQL handles only)",
                source: io::Error::from(io::ErrorKind::Unsupported),
            }),
        }
    }

    /// A fencing token for lock `index`, which this handle must hold
    /// exclusively (feature `postgres`): a number that grows with every
    /// call for that lock of the namespace, whoever makes it
    /// (`INSERT ... ON CONFLICT DO UPDATE ... RETURNING` on the table
    /// `locksfile_fences`). Take one after each exclusive grant and send it
    /// with every write to a resource outside the database; the resource
    /// keeps the highest token it has seen and refuses writes with a lower
    /// one, so a holder that lost its lock without knowing (a pause, a
    /// partition) cannot write over its successor.
    ///
    /// # Errors
    /// [`Error::NotHeld`] unless held exclusively; [`Error::Unsupported`]
    /// for a lock file; [`Error::ConnectionLost`]; [`Error::Server`].
    pub fn fence(&self, index: u64) -> Result<u64, Error> {
        match &self.owner {
            #[cfg(feature = "postgres")]
            Owners::Pg(o) => {
                if o.is_inherited() {
                    return Err(Error::Forked);
                }
                o.engine.fence(index)
            }
            _ => {
                let _ = index;
                Err(Error::Unsupported {
                    what: "fencing tokens (PostgreSQL handles only)",
                    source: io::Error::from(io::ErrorKind::Unsupported),
                })
            }
        }
    }

    /// The lock mode chosen at open.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The absolute path the file was opened by.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What this handle's mode offers beyond mutual exclusion: whether a
    /// wait that would deadlock is refused ([`Error::Deadlock`], process
    /// and shm modes) or waits forever (OFD mode), whether waiters are
    /// served in order (shm mode), whether a dead holder's locks are freed.
    ///
    /// ```
    /// use locksfile::{LockFile, Mode};
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("data.lock");
    /// assert!(!LockFile::open(&path)?.abilities().detects_deadlocks);
    /// let p = LockFile::options().mode(Mode::Process).open(&path)?;
    /// assert!(p.abilities().detects_deadlocks);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn abilities(&self) -> crate::Abilities {
        with_owner!(&self.owner, o => o.engine.abilities())
    }

    /// In [`Mode::Shm`], this handle's owner id as
    /// [`shm::Snapshot`](crate::shm::Snapshot) lists it; `None` in the
    /// kernel modes.
    pub fn table_owner(&self) -> Option<u64> {
        match &self.owner {
            Owners::Shm(o) => Some(o.engine.owner_id()),
            _ => None,
        }
    }

    /// Whether the file could be opened for writing (needed for exclusive locks).
    pub fn is_writable(&self) -> bool {
        with_owner!(&self.owner, o => o.engine.writable())
    }

    fn check_ofd_supported(&self) -> Result<(), Error> {
        // F_OFD_GETLK on an old kernel answers EINVAL: say so now rather
        // than at the first lock, and never fall back to process locks.
        with_owner!(&self.owner, o => o.probe(Span::ALL, Kind::Shared).map(|_| ()))
    }

    /// Who the calling thread takes locks for.
    #[inline]
    pub(crate) fn party(&self) -> Party {
        match self.threads {
            Threads::Exclude => Party::current(),
            Threads::Share => EVERYONE,
        }
    }

    /// Whether threads sharing this handle exclude each other.
    pub fn threads(&self) -> Threads {
        self.threads
    }

    /// The explicit layer of `party` (`None` if it has none and `make` is false).
    #[inline]
    fn layer(&self, party: Party, make: bool) -> Option<HandleId> {
        if self.layers.first.load(Ordering::Relaxed) == party.id() {
            return Some(self.handle);
        }
        self.other_layer(party, make)
    }

    #[cold]
    #[inline(never)]
    fn other_layer(&self, party: Party, make: bool) -> Option<HandleId> {
        let mut others = self.layers.others.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&(_, h)) = others.iter().find(|(p, _)| *p == party) {
            return Some(h);
        }
        if !make {
            return None;
        }
        let first = &self.layers.first;
        if first
            .compare_exchange(0, party.id(), Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
            || first.load(Ordering::Relaxed) == party.id()
        {
            return Some(self.handle);
        }
        let h = with_owner!(&self.owner, o => o.new_handle_id());
        others.push((party, h));
        Some(h)
    }

    /// Every explicit layer of this handle, with its party.
    fn all_layers(&self) -> Vec<(Party, HandleId)> {
        if self.threads == Threads::Share {
            return vec![(EVERYONE, self.handle)];
        }
        let others = self.layers.others.lock().unwrap_or_else(|p| p.into_inner());
        let mut all = others.clone();
        match self.layers.first.load(Ordering::Relaxed) {
            0 => {}
            // A handle whose threads share was never claimed by a party.
            id => all.push((Party::from_id(id), self.handle)),
        }
        all
    }

    /// Explicit change of the calling party's layer: the owner's fast path
    /// when it can, else [`LockFile::explicit_change`].
    #[inline]
    fn explicit(
        &self,
        span: Span,
        kind: Option<Kind>,
        wait: Wait,
        cancel: Option<&Cancel>,
    ) -> Result<(), Error> {
        let party = self.party();
        // The party whose layer is the handle's own (the usual one).
        if self.layers.first.load(Ordering::Relaxed) == party.id() {
            let fast = match kind {
                Some(kind) => self.fast_take(span, kind, self.handle, party),
                None => self.fast_release(span, None, self.handle, party),
            };
            if fast {
                return Ok(());
            }
        }
        self.explicit_change(span, kind, wait, cancel, party)
    }

    /// [`LockFile::explicit`] the usual way. Out of line, so that the fast
    /// path around it stays small.
    #[inline(never)]
    fn explicit_change(
        &self,
        span: Span,
        kind: Option<Kind>,
        wait: Wait,
        cancel: Option<&Cancel>,
        party: Party,
    ) -> Result<(), Error> {
        let Some(handle) = self.layer(party, kind.is_some()) else {
            // Nothing of this party's to release.
            return with_owner!(&self.owner, o => if o.is_inherited() { Err(Error::Forked) } else { Ok(()) });
        };
        let fast = match kind {
            Some(kind) => self.fast_take(span, kind, handle, party),
            None => self.fast_release(span, None, handle, party),
        };
        if fast {
            return Ok(());
        }
        self.change_or_cancel(Change::Explicit { handle, span, kind }, wait, cancel, party)
    }

    /// Take the one index `span` at `kind` on the owner's fast path (see
    /// `owner/fast.rs`), for a guard (`layer` 0) or an explicit layer:
    /// `true` when taken, else the take goes the usual way.
    #[inline(always)]
    pub(crate) fn fast_take(&self, span: Span, kind: Kind, layer: HandleId, party: Party) -> bool {
        match &self.owner {
            Owners::Shm(o) => o.fast_take(span, kind, layer, party),
            _ => false,
        }
    }

    /// Let go of a hold taken by [`LockFile::fast_take`] (`kind` `None`:
    /// an explicit release, whatever kind it has): `true` when let go,
    /// else the release goes the usual way.
    #[inline(always)]
    pub(crate) fn fast_release(
        &self,
        span: Span,
        kind: Option<Kind>,
        layer: HandleId,
        party: Party,
    ) -> bool {
        match &self.owner {
            Owners::Shm(o) => o.fast_release(span, kind, layer, party),
            _ => false,
        }
    }

    /// [`LockFile::change`] for `party`, and a wait ends when `cancel` is cancelled.
    #[inline]
    pub(crate) fn change_or_cancel(
        &self,
        change: Change,
        wait: Wait,
        cancel: Option<&Cancel>,
        party: Party,
    ) -> Result<(), Error> {
        // Only a change asking for exclusive can need an exclusive lock, and
        // an owner that cannot write never holds one: refuse it here, where
        // the path is known, before anything is tried.
        let wants_exclusive = match change {
            Change::Guard { to, .. } => to == Some(Kind::Exclusive),
            Change::Explicit { kind, .. } => kind == Some(Kind::Exclusive),
        };
        let done = match &self.owner {
            // Out of line: the fast path (`fast_take`, `fast_release`)
            // makes the common shm change, and stays small beside this.
            Owners::Shm(o) => self.change_on_shm(o, change, wait, cancel, wants_exclusive, party),
            owners => {
                with_owner!(owners, o => self.change_on(o, change, wait, cancel, wants_exclusive, party))
            }
        };
        match done {
            Ok(()) => Ok(()),
            Err(e) => Err(self.locate(e, change)),
        }
    }

    /// A contention error from `change`, saying where: this handle's lock
    /// file (or server target), the span and the kind asked for.
    #[cold]
    #[inline(never)]
    fn locate(&self, e: Error, change: Change) -> Error {
        let kind = match change {
            Change::Guard { to, .. } => to,
            Change::Explicit { kind, .. } => kind,
        };
        let Some(kind) = kind else { return e };
        e.located(|| crate::error::At {
            file: self.shown(),
            span: change.span(),
            kind,
        })
    }

    /// The lock file's path, or the server target without its password.
    fn shown(&self) -> String {
        match with_owner!(&self.owner, o => o.engine.target()) {
            Some(target) => target.to_string(),
            None => self.path.display().to_string(),
        }
    }

    /// [`LockFile::change`] on one engine: what it can never do is
    /// refused before anything is tried (a span it cannot take, a lock
    /// asked of an owner whose locks are lost, an exclusive one of a
    /// read-only file).
    #[inline]
    fn change_on<E: Engine>(
        &self,
        o: &Owner<E>,
        change: Change,
        wait: Wait,
        cancel: Option<&Cancel>,
        wants_exclusive: bool,
        party: Party,
    ) -> Result<(), Error> {
        let wants_lock = match change {
            Change::Guard { to, .. } => to.is_some(),
            Change::Explicit { kind, .. } => kind.is_some(),
        };
        o.engine.check_span(change.span(), wants_lock)?;
        if wants_exclusive && !o.engine.writable() {
            return Err(self.read_only());
        }
        if wants_lock {
            if let Some(e) = o.engine.locks_lost() {
                return Err(e);
            }
        }
        o.change_or_cancel(change, wait, cancel, party)
    }

    #[inline(never)]
    fn change_on_shm(
        &self,
        o: &Owner<Shm>,
        change: Change,
        wait: Wait,
        cancel: Option<&Cancel>,
        wants_exclusive: bool,
        party: Party,
    ) -> Result<(), Error> {
        self.change_on(o, change, wait, cancel, wants_exclusive, party)
    }

    #[cold]
    fn read_only(&self) -> Error {
        Error::ReadOnly {
            path: self.path.clone(),
        }
    }

    /// `fcntl(F_OFD_SETLK | F_SETLK[W])`: lock `span` at `kind` in this
    /// handle's explicit layer (`flock(LOCK_SH | LOCK_EX)` on the whole file
    /// in [`Mode::Flock`]). Acquiring over a span it already holds converts
    /// it in place (atomically in the kernel, except in [`Mode::Flock`]: see
    /// there): the last call wins.
    /// Acquiring what the owner already holds at that kind makes no system call.
    ///
    /// # Errors
    /// [`Error::WouldBlock`] (with the holder) when `wait` is
    /// [`Wait::NonBlocking`] and another owner is in the way;
    /// [`Error::TimedOut`]; [`Error::Deadlock`] (process mode);
    /// [`Error::InvalidSpan`] (in [`Mode::Flock`] for any span but `..`);
    /// [`Error::ReadOnly`] for an exclusive lock on a read-only file;
    /// [`Error::Forked`]. On error nothing changed, except after
    /// [`Error::ConversionLost`] (flock mode), which says what was lost.
    ///
    /// # References
    /// fcntl(2), "Advisory record locking".
    #[doc(alias = "F_SETLK")]
    #[doc(alias = "F_OFD_SETLK")]
    #[inline]
    pub fn acquire(&self, kind: Kind, span: impl IntoSpan, wait: Wait) -> Result<(), Error> {
        let span = span.into_span()?;
        self.explicit(span, Some(kind), wait, None)
    }

    /// As [`acquire`](Self::acquire), and [`Cancel::cancel`] from another
    /// thread (or task) ends the wait with [`Error::Cancelled`], nothing
    /// changed. The wait is one wait for the engine whatever `wait` says,
    /// so fair queueing and deadlock detection hold for it.
    ///
    /// # Errors
    /// As [`acquire`](Self::acquire), and [`Error::Cancelled`].
    pub fn acquire_cancellable(
        &self,
        kind: Kind,
        span: impl IntoSpan,
        wait: Wait,
        cancel: &Cancel,
    ) -> Result<(), Error> {
        let span = span.into_span()?;
        self.explicit(span, Some(kind), wait, Some(cancel))
    }

    /// Drop this handle's explicit locks on `span`. Indices still covered by
    /// a guard (or, in process mode, another handle) stay locked at the kind
    /// those need. Releasing what is not held is harmless. Never blocks.
    ///
    /// # Errors
    /// [`Error::InvalidSpan`], [`Error::Forked`], or a failed unlock call.
    #[inline]
    pub fn release(&self, span: impl IntoSpan) -> Result<(), Error> {
        let span = span.into_span()?;
        self.explicit(span, None, Wait::NonBlocking, None)
    }

    /// Drop all of this handle's explicit locks. Guards stay.
    ///
    /// # Errors
    /// As [`release`](Self::release).
    pub fn release_all(&self) -> Result<(), Error> {
        self.release(Span::ALL)
    }

    /// How many of the owner's holds its fast path keeps now, outside the
    /// bookkeeping (shm mode; for tests of that path).
    #[doc(hidden)]
    pub fn fast_holds(&self) -> usize {
        match &self.owner {
            Owners::Shm(o) => o.fast_holds(),
            _ => 0,
        }
    }

    /// Everything the owner holds (the handle in OFD mode; every handle of
    /// this file in this process in process mode), with guards, piece by piece.
    /// A lost server session holds nothing, whatever guards remain.
    pub fn held(&self) -> Vec<(Span, Kind)> {
        if self.lost() {
            return Vec::new();
        }
        with_owner!(&self.owner, o => o.held())
    }

    /// This handle's explicit locks only.
    pub fn held_explicitly(&self) -> Vec<(Span, Kind)> {
        if self.lost() {
            return Vec::new();
        }
        match self.layer(self.party(), false) {
            Some(handle) => with_owner!(&self.owner, o => o.explicit(handle)),
            None => Vec::new(),
        }
    }

    /// `fcntl(F_OFD_GETLK | F_GETLK)`: the first lock of another owner that
    /// would conflict with `kind` on `span`, or `None`. A snapshot: it may
    /// be stale by the time it returns. In [`Mode::Flock`], which has no
    /// such call, the `FLOCK` lines of `/proc/locks`, with the pid that took
    /// the lock.
    ///
    /// # Errors
    /// [`Error::InvalidSpan`], [`Error::Forked`], or the call failing.
    #[doc(alias = "F_GETLK")]
    #[doc(alias = "F_OFD_GETLK")]
    pub fn conflicts(&self, kind: Kind, span: impl IntoSpan) -> Result<Option<Holder>, Error> {
        let span = span.into_span()?;
        with_owner!(&self.owner, o => {
            o.engine.check_span(span, false)?;
            o.probe(span, kind)
        })
    }
}

impl AsFd for LockFile {
    /// The descriptor locks go through. Closing a duplicate of it in
    /// process mode would drop the process's locks on the file: don't.
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.owner {
            Owners::Fcntl(o) => {
                let raw = o.engine.raw_fd();
                // The owner keeps every descriptor it ever held open as long
                // as it lives, and `self` keeps the owner alive.
                sys::borrow_raw(raw)
            }
            Owners::Flock(o) => o.engine.fd(),
            Owners::Shm(o) => o.engine.lock_fd(),
            #[cfg(feature = "postgres")]
            Owners::Pg(o) => o.engine.socket(),
        }
    }
}

impl Drop for LockFile {
    fn drop(&mut self) {
        if with_owner!(&self.owner, o => o.is_inherited()) {
            // Inherited through fork: the parent's locks are not ours (a
            // flock(2) lock, like an OFD one, is shared with the child
            // through the open file description: unlocking would free it).
            return;
        }
        match &self.owner {
            Owners::Fcntl(o) if self.mode == Mode::Process => {
                for (party, handle) in self.all_layers() {
                    let _ = o.forget_handle(handle, party);
                }
                registry::leave(o);
            }
            owners => with_owner!(owners, o => o.unlock_everything()),
        }
    }
}

/// The thread behind [`LockFile::on_lost`]: it sleeps in `poll(2)` on a
/// duplicate of the session's socket and looks every 100 ms whether the
/// handle is still there (holding only a weak reference, so that dropping
/// the handle ends the session as before, at most one look later).
#[cfg(feature = "postgres")]
fn lost_watch(owner: std::sync::Weak<Owner<Pg>>, f: Box<dyn FnOnce() + Send>) -> Result<(), Error> {
    let socket = match owner.upgrade() {
        Some(o) => o
            .engine
            .socket()
            .try_clone_to_owned()
            .map_err(|e| Error::io("duplicate the session socket", e))?,
        None => return Ok(()),
    };
    std::thread::Builder::new()
        .name("locksfile-lost".into())
        .spawn(move || loop {
            let closed = sys::peer_closed_within(socket.as_fd(), 100);
            let Some(o) = owner.upgrade() else { return };
            if closed || o.engine.lost() {
                o.engine.mark_lost();
                drop(o);
                f();
                return;
            }
        })
        .map(drop)
        .map_err(|e| Error::io("start the lost-session watch", e))
}
