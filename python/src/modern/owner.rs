//! What a `LocksFile` is below its Python class: its handle (or its
//! threads' handles), the guards and waits `close()` must reach, and the
//! one path every blocking take goes through.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use locksfile::{Cancel, Entered, Error, Kind, LockFile, Party, Span, Threads, Wait};
use pyo3::prelude::*;

use crate::errors::to_py;
use crate::forks::Born;
use crate::gil_cell::GilCell;
use crate::mutex::lock_mutex;
use crate::wait::{with_patience, Patience, Waits};
use crate::with_block::WithBlocks;

use super::fastcall::GuardCache;
use super::guard::{GuardCell, Held, HeldSlot, PyGuard, SpanCell, State};
use super::handle::Handle;
use super::outcomes::{closed_error, closed_while_waiting, Refused, GIVE_UP};
use super::tasks::task_party;
use super::thread_owners::ThreadOwners;

/// The state of one `LocksFile` that its guards' and waits' calls share
/// with it.
pub struct Owner {
    /// Touched only with the GIL held (every use is a call from Python),
    /// so the first try of `write(i)` borrows it without a lock.
    handle: GilCell<Option<Arc<LockFile>>>,
    /// Whether `close()` was called: `handle` is `None`. Kept apart so
    /// that the checks of every take (up to four) are loads, not locks,
    /// and so that waits without the GIL see it; set as `handle` is
    /// emptied, before `close()` ends waits and takes the guards, whose
    /// locks carry it to whoever comes after.
    closed: AtomicBool,
    /// The cells of its guards, for `close()`: every live guard's, and
    /// those of guards already gone, which the next guards reuse (a cell
    /// only this list holds is reused in place: no allocation per guard).
    /// So the list is as long as the most guards that lived at once.
    guards: Mutex<Vec<Arc<GuardCell>>>,
    /// The waits in progress on this object (any thread's), which
    /// `close()` ends.
    pub waits: Waits,
    /// The process that opened it: `held()` answers from bookkeeping
    /// without a system call, so it checks for a fork itself.
    pub born: Born,
    /// `thread_local=True`: an owner per thread, opened on first use.
    pub threads: Option<ThreadOwners>,
    /// Whether the object's threads and tasks exclude each other.
    pub sharing: Threads,
    /// The with statements open on it, and whether their blocks took a lock.
    pub(crate) with_blocks: WithBlocks,
    /// The last guard object released, for the next take to reuse.
    pub guard_cache: Arc<GuardCache>,
}

impl Owner {
    pub fn new(lf: Arc<LockFile>, threads: Option<ThreadOwners>, sharing: Threads) -> Owner {
        Owner {
            handle: GilCell::new(Some(lf)),
            closed: AtomicBool::new(false),
            guards: Mutex::new(Vec::new()),
            waits: Waits::default(),
            born: Born::now(),
            threads,
            sharing,
            with_blocks: WithBlocks::default(),
            guard_cache: Arc::default(),
        }
    }

    /// Whether `close()` was called.
    pub fn closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Inside an asyncio task, take locks for the task (see `TaskParty`)
    /// until the returned value is dropped.
    pub fn as_task(&self, py: Python<'_>) -> PyResult<Option<Entered>> {
        if self.sharing == Threads::Share {
            return Ok(None);
        }
        Ok(task_party(py)?.map(Party::enter))
    }

    /// The party an asyncio wait takes its lock for, wherever it runs: the
    /// task's, or one of its own when made outside a task (`None` when the
    /// object's threads share its locks).
    pub fn wait_party(&self, py: Python<'_>) -> PyResult<Option<Party>> {
        Ok(match self.sharing {
            Threads::Share => None,
            Threads::Exclude => Some(task_party(py)?.unwrap_or_else(Party::new)),
        })
    }

    /// This thread's handle, unless closed or inherited through fork.
    pub fn lf_not_forked(&self, py: Python<'_>) -> PyResult<Arc<LockFile>> {
        Ok(self.lf_if_open(py, true)?.expect("opened when missing"))
    }

    /// As `lf_not_forked`, but a thread of a `thread_local=True` object
    /// that has no owner yet gets `None` rather than a new one.
    pub fn lf_if_open(&self, py: Python<'_>, open: bool) -> PyResult<Option<Arc<LockFile>>> {
        // SAFETY: cloning an `Arc` runs no Python code.
        #[allow(unsafe_code)]
        let lf = unsafe { self.handle.with(py, |h| h.as_ref().map(Arc::clone)) }
            .ok_or_else(closed_error)?;
        if self.born.forked() {
            return Err(to_py(py, Error::Forked));
        }
        match &self.threads {
            None => Ok(Some(lf)),
            Some(t) => t.current(py, open),
        }
    }

    /// Wrap a lock just taken in a guard that `close()` can reach.
    ///
    /// Runs no Python code until `h` is in a cell of `guards` (the
    /// allocation of a new guard object, which may collect garbage, comes
    /// after): a lock lent the owner's handle must stay where `close()`
    /// and the owner's drop find it (see `Handle::lent`).
    ///
    /// The guard's cell is one of a guard already gone when there is one:
    /// a cell that only the list holds (`Arc::get_mut` succeeds: no
    /// `PyGuard` and no call has it, and none can get it but through this
    /// list, under its lock) is released and refilled in place. A guard
    /// object kept after its release keeps its cell, which is then never
    /// reused, so it can never release a newer guard's lock.
    pub fn register<'py>(
        &self,
        py: Python<'py>,
        span: Span,
        h: Held,
    ) -> PyResult<Bound<'py, PyGuard>> {
        if let Some(g) = self.guard_cache.take_unique(py) {
            // Its cell is in `guards` already. `close()` holds the GIL as
            // this does: it came before (`closed` says so) or comes after,
            // and releases what this fills in.
            g.get().refill(py, span, h);
            if self.closed() {
                let _ = g.get().cell.release(py, Held::Closed);
                return Err(closed_while_waiting());
            }
            self.with_blocks.took();
            return Ok(g);
        }
        // Under the guards' lock, so `close()` (which closes first,
        // then takes the guards) either sees this guard or we see it closed.
        let mut guards = lock_mutex(&self.guards);
        if self.closed() {
            // Closed by another thread while this one waited.
            drop(guards);
            let _ = h.unlock();
            return Err(closed_while_waiting());
        }
        // The most recently made cells first: the last guard released.
        let free = (0..guards.len())
            .rev()
            .find(|&i| Arc::strong_count(&guards[i]) == 1);
        let cell = match free.and_then(|i| Arc::get_mut(&mut guards[i]).map(|c| (i, c))) {
            Some((i, c)) => {
                // Released when its guard went (`PyGuard`'s drop), or by
                // `close()`: nothing in it to unlock.
                let old = c.held.replace_mut(h);
                debug_assert!(matches!(old, Held::Released | Held::Closed));
                drop(old);
                c.span.set(span);
                c.born = self.born;
                c.waits.clear();
                Arc::clone(&guards[i])
            }
            None => {
                let c = Arc::new(GuardCell {
                    held: HeldSlot::new(h),
                    span: SpanCell::new(span),
                    born: self.born,
                    waits: Waits::default(),
                    keep: GilCell::new(None),
                });
                guards.push(Arc::clone(&c));
                c
            }
        };
        drop(guards);
        self.with_blocks.took();
        Bound::new(py, PyGuard::new(cell, Arc::clone(&self.guard_cache)))
    }

    /// The one path of every blocking take: `take` tried as `patience`
    /// says, for the calling task, in one wait that `close()` ends at once.
    /// The inner `Err` is the engine's answer, for the caller to judge.
    fn take<T: Send>(
        &self,
        py: Python<'_>,
        patience: Patience,
        mut take: impl FnMut(Wait, Option<&Cancel>) -> Result<T, Error> + Send,
    ) -> PyResult<Result<T, Error>> {
        let _as_task = self.as_task(py)?;
        with_patience(py, patience, Some(&self.waits), |w, cancel| {
            if self.closed() {
                return Err(GIVE_UP);
            }
            take(w, cancel)
        })
    }

    /// A guard of `kind` on `span` through `lf`, waiting as `patience`
    /// says; None when refused with `Refused::Nothing`.
    ///
    /// `with lf.write(i):` takes the quicker way, `guard_forever`.
    pub fn guard<'py>(
        &self,
        py: Python<'py>,
        lf: &Arc<LockFile>,
        kind: Kind,
        span: Span,
        patience: Patience,
        refused: Refused,
    ) -> PyResult<Option<Bound<'py, PyGuard>>> {
        let outcome = self.take(py, patience, |w, cancel| {
            Held::take(lf, kind, span, w, cancel)
        })?;
        match outcome {
            Ok(h) => self.register(py, span, h).map(Some),
            Err(_) if self.closed() => Err(closed_while_waiting()),
            Err(Error::WouldBlock { .. }) if refused == Refused::Nothing => Ok(None),
            Err(e) => Err(refused.error(py, e)),
        }
    }

    /// `guard` waiting as long as it takes (`read(i)`, `write(i)`): the
    /// first try made here without the plumbing of waits, through the
    /// handle in place (no `Arc` of it cloned for the call); contention (or
    /// any refusal) goes the general way, which tries again.
    ///
    /// The hot path of `with lf.write(i):`. What an uncontended block
    /// costs, in instructions (callgrind, shm mode, CPython 3.11), about
    /// 2,600 in all with its loop: about 950 in `write` (the engine's take
    /// 450, the asyncio check 170 (a miss in `sys.modules`), refilling the
    /// guard kept from the last block 120, the rest the call and the span),
    /// about 620 in `__exit__` (the engine's release 400), 200 to look
    /// `__enter__` and `__exit__` up and let them go (see
    /// `super::fastcall`: no bound method objects), and the rest in
    /// CPython's `with` protocol and loop. The guard object and its cell are
    /// reused (`GuardCache`), so nothing is allocated. A fork check used to
    /// be a `getpid(2)` per call, three per block: see `crate::forks`.
    ///
    /// Instructions are not the whole cost: a locked instruction (an
    /// atomic read-modify-write, a `Mutex` taken or let go) costs about
    /// 5 ns here whatever else runs, 20 or more plain instructions' worth.
    /// A block used to execute 15 (the engine's 5, the `Arc` of the handle
    /// 2, and 8 in the binding: this handle's mutex, the guard's mutex at
    /// the take and at the release, the kept guard's slot swapped twice),
    /// which made it cost 1.5 times the seed API's pair for 1.08 times its
    /// instructions. Now it executes the engine's 5, as the seed API's
    /// pair does: what only calls holding the GIL touch is kept apart by
    /// the GIL (`GilCell`, `HeldSlot`, and `GuardCache`'s loads and
    /// stores), and the lock is lent the handle without a count
    /// (`Handle::lent`).
    ///
    /// `bench/python/guard_costs.py` measures each variant side by side
    /// (`--callgrind N1,N2` for instructions).
    pub fn guard_forever<'py>(
        &self,
        py: Python<'py>,
        kind: Kind,
        span: Span,
    ) -> PyResult<Bound<'py, PyGuard>> {
        if self.threads.is_none() {
            if self.closed() {
                return Err(closed_error());
            }
            if self.born.forked() {
                return Err(to_py(py, Error::Forked));
            }
            let first = {
                let _as_task = self.as_task(py)?;
                // SAFETY: a take that does not wait runs no Python code
                // and keeps the GIL, so `close()` cannot run meanwhile.
                #[allow(unsafe_code)]
                unsafe {
                    self.handle.with(py, |handle| match handle {
                        Some(lf) if !self.closed() => {
                            // SAFETY: the guard goes into one of this
                            // owner's cells in `register`, which runs no
                            // Python code before; see `Handle::lent`.
                            let lent = Handle::lent(lf);
                            Held::take_through(lent, kind, span, Wait::NonBlockingNoHolder, None)
                                .ok()
                        }
                        _ => None,
                    })
                }
            };
            if let Some(h) = first {
                return self.register(py, span, h);
            }
        }
        let lf = self.lf_not_forked(py)?;
        let g = self.guard(py, &lf, kind, span, Patience::Forever, Refused::WouldBlock)?;
        Ok(g.expect("a refusal raises"))
    }

    /// `kind` on `span` in the explicit layer of `lf`, waiting as
    /// `patience` says.
    pub fn acquire(
        &self,
        py: Python<'_>,
        lf: &LockFile,
        kind: Kind,
        span: Span,
        patience: Patience,
        refused: Refused,
    ) -> PyResult<()> {
        let outcome = self.take(py, patience, |w, cancel| match cancel {
            Some(c) => lf.acquire_cancellable(kind, span, w, c),
            None => lf.acquire(kind, span, w),
        })?;
        match outcome {
            Err(_) if self.closed() => Err(closed_while_waiting()),
            Ok(()) if self.closed() => {
                // Closed by another thread while this one waited: `close()`
                // may have released everything before this lock was had.
                lf.release_all().map_err(|e| to_py(py, e))?;
                Err(closed_while_waiting())
            }
            Ok(()) => {
                self.with_blocks.took();
                Ok(())
            }
            Err(e) => Err(refused.error(py, e)),
        }
    }

    /// Release everything (explicit locks and every live guard), end every
    /// wait and close the handles: `close()` but for its temporary file.
    /// In a forked child only the child's copies go: the parent's locks
    /// and waits stay.
    pub fn close(&self, py: Python<'_>) {
        // SAFETY: setting a flag and taking the value out run no Python code.
        #[allow(unsafe_code)]
        let lf = unsafe {
            self.handle.with(py, |handle| {
                self.closed.store(true, Ordering::SeqCst);
                handle.take()
            })
        };
        let forked = self.born.forked();
        // Closed first: a wait that registers from now on sees it.
        if forked {
            // The parent's threads' waits: not this process's to end.
            self.waits.forget_all();
        } else {
            self.waits.cancel_all();
        }
        // The kept guard holds this cache: let go of it, or neither goes.
        self.guard_cache.clear(py);
        let guards = std::mem::take(&mut *lock_mutex(&self.guards));
        for g in guards.iter() {
            if g.held.state(py) == State::Busy {
                // An upgrade has the lock out of the cell, and it may be
                // lent the handle let go below (see `Handle::lent`).
                if let Some(lf) = &lf {
                    g.keep_alive(py, lf);
                }
            }
            if forked {
                // Mark it closed without unlocking: the locks are the parent's.
                drop(g.held.replace(py, Held::Closed));
            } else {
                let _ = g.release(py, Held::Closed);
            }
        }
        if let Some(lf) = lf {
            if !forked {
                let _ = lf.release_all();
            }
        }
        if let Some(t) = &self.threads {
            t.close_all(forked);
        }
    }
}

/// A lock lent the owner's handle (see `Handle::lent`) that outlives the
/// owner, a guard kept after its `LocksFile` went, keeps the handle alive
/// itself until released.
impl Drop for Owner {
    fn drop(&mut self) {
        let Some(lf) = self.handle.get_mut().take() else {
            return;
        };
        let guards = self.guards.get_mut().unwrap_or_else(|p| p.into_inner());
        if guards.iter().all(|g| g.held.ended()) {
            return;
        }
        Python::attach(|py| {
            for g in guards.iter().filter(|g| !g.held.ended()) {
                g.keep_alive(py, &lf);
            }
        });
    }
}
