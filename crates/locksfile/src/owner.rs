//! A lock owner: hold bookkeeping plus the engine, and the protocol that
//! keeps the kernel's view equal to the bookkeeping's.
//!
//! Invariant: outside the `busy` spans, the kernel holds exactly the
//! effective kind the bookkeeping computes. A thread that must sleep in the
//! kernel marks its span busy and lets go of the mutex, so other threads of
//! the same owner can still release (releases never block); they skip the
//! kernel inside busy spans and the sleeper puts things right when it wakes.

use std::os::fd::{OwnedFd, RawFd};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::engine::Fcntl;
use crate::error::{Error, Holder};
use crate::holds::{rank, Change, HandleId, Holds, Move};
use crate::span::Span;
use crate::sys::{self, Family};
use crate::{Kind, Wait};

pub(crate) struct Owner {
    pub family: Family,
    pub generation: u64,
    pub dev: u64,
    pub ino: u64,
    state: Mutex<State>,
    /// Signalled whenever a busy span is cleared.
    cond: Condvar,
}

pub(crate) struct State {
    holds: Holds,
    busy: Vec<Span>,
    /// Scratch buffer for the moves of one change; kept to avoid allocating.
    moves: Vec<Move>,
    /// The descriptor locks are taken through.
    fd: RawFd,
    pub writable: bool,
    /// Every descriptor this owner keeps open; `fd` is one of them. In
    /// process mode closing any of them would drop the process's locks on
    /// the file, so they all live as long as the owner.
    pub fds: Vec<OwnedFd>,
    /// Handles sharing this owner (process mode).
    pub handles: usize,
    next_handle: HandleId,
}

/// How long a timed wait sleeps between polls, at most: bounds how late it
/// sees a release, while costing well under 1% of a core.
const MAX_POLL: Duration = Duration::from_millis(1);
const FIRST_POLL: Duration = Duration::from_micros(50);
/// Tries after yielding the CPU before a blocking wait sleeps in the kernel.
const YIELDS_BEFORE_SLEEP: u32 = 2;
/// How long an interruptible wait behind a sibling thread sleeps before it
/// returns [`Error::Interrupted`] so its caller can look at signals.
const INTERRUPT_SLICE: Duration = Duration::from_millis(20);

impl State {
    /// Whether closing a descriptor of the file now could lose none of this
    /// owner's process-associated locks: nothing is held, and no thread
    /// sleeps in the kernel (a sleeper may already hold the first raises of
    /// a multi-piece wait, which `holds` shows only once it wakes).
    pub fn is_idle(&self) -> bool {
        self.holds.is_empty() && self.busy.is_empty()
    }
}

impl Owner {
    pub fn new(family: Family, dev: u64, ino: u64, fd: OwnedFd, writable: bool) -> Owner {
        use std::os::fd::AsRawFd;
        Owner {
            family,
            generation: sys::fork_generation(),
            dev,
            ino,
            state: Mutex::new(State {
                holds: Holds::new(),
                busy: Vec::new(),
                moves: Vec::new(),
                fd: fd.as_raw_fd(),
                writable,
                fds: vec![fd],
                handles: 1,
                next_handle: 0,
            }),
            cond: Condvar::new(),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the mutex leaves the bookkeeping as it was
        // at some consistent step: every mutation completes before any call
        // that can panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_inherited(&self) -> bool {
        self.generation != sys::current_fork_generation()
    }

    pub fn new_handle_id(&self) -> HandleId {
        let mut st = self.lock();
        st.next_handle += 1;
        st.next_handle
    }

    /// Use `fd` for locking from now on (a writable descriptor replacing a
    /// read-only one in process mode).
    pub fn adopt_fd(st: &mut State, fd: OwnedFd, writable: bool) {
        use std::os::fd::AsRawFd;
        if writable && !st.writable {
            st.fd = fd.as_raw_fd();
            st.writable = true;
        }
        st.fds.push(fd);
    }

    fn engine(&self, st: &State) -> Fcntl {
        Fcntl {
            fd: st.fd,
            family: self.family,
        }
    }

    /// Apply `change`, making the kernel agree, waiting as `wait` says.
    pub fn change(&self, change: Change, wait: Wait) -> Result<(), Error> {
        if self.is_inherited() {
            return Err(Error::Forked);
        }
        let wait = timeout_to_deadline(wait);
        let mut st = self.lock();
        let deadline = || match wait {
            Wait::Deadline(t) => Some(t),
            _ => None,
        };
        if st.busy.is_empty() {
            if let Some(single) = st.holds.single(change) {
                if self.change_single(&mut st, single)? {
                    return Ok(());
                }
                // Contention on the one raise: straight to waiting (or
                // failing), without trying the same call again.
                let refused = Move {
                    span: single.span,
                    from: single.from(),
                    to: single.to(),
                };
                return self.refused(st, change, refused, vec![refused], wait, deadline());
            }
        }
        let span = change.span();
        let deadline = deadline();
        loop {
            let st_ref = &mut *st;
            st_ref.moves.clear();
            let undo = st_ref.holds.apply(change, &mut st_ref.moves);
            let raises = st_ref.moves.iter().any(|m| m.is_raise());
            if raises
                && !st_ref.busy.is_empty()
                && st_ref.busy.iter().any(|b| b.intersect(span).is_some())
            {
                // Another thread of this owner is sleeping on part of this
                // span, so what the kernel holds there is in flux until it
                // wakes. Changes that only lower (or need nothing) go
                // ahead: the sleeper puts the kernel right when it wakes.
                st_ref.holds.undo(undo);
                st = match wait {
                    Wait::NonBlocking | Wait::NonBlockingNoHolder => {
                        return Err(Error::WouldBlock { holder: None })
                    }
                    Wait::Timeout(_) | Wait::Deadline(_) => {
                        let left = remaining(deadline).ok_or(Error::TimedOut)?;
                        self.cond
                            .wait_timeout(st, left)
                            .unwrap_or_else(|p| p.into_inner())
                            .0
                    }
                    Wait::BlockingInterruptible => {
                        // A condition variable wait does not end on a
                        // signal, so wake every slice and let the caller
                        // run its signal handlers before calling again.
                        let (st, slept) = self
                            .cond
                            .wait_timeout(st, INTERRUPT_SLICE)
                            .unwrap_or_else(|p| p.into_inner());
                        if slept.timed_out() {
                            return Err(Error::Interrupted);
                        }
                        st
                    }
                    _ => self.cond.wait(st).unwrap_or_else(|p| p.into_inner()),
                };
                continue;
            }
            let engine = self.engine(st_ref);
            // Raises first: they are the only calls that can fail for
            // contention, and nothing is lowered until they all succeed.
            let mut done = 0;
            let mut refused = None;
            for m in st_ref.moves.iter().filter(|m| m.is_raise()) {
                if m.to == Some(Kind::Exclusive) && !st_ref.writable {
                    Self::roll_back(engine, &st_ref.moves, done);
                    st_ref.holds.undo(undo);
                    // The handle fills in its path (an owner may be
                    // reached by several).
                    return Err(Error::ReadOnly {
                        path: std::path::PathBuf::new(),
                    });
                }
                match engine.try_set(m.span, m.to) {
                    Ok(true) => done += 1,
                    Ok(false) => {
                        refused = Some(*m);
                        break;
                    }
                    Err(e) => {
                        Self::roll_back(engine, &st_ref.moves, done);
                        st_ref.holds.undo(undo);
                        return Err(e);
                    }
                }
            }
            let Some(refused) = refused else {
                return self.lower(st_ref, engine);
            };
            Self::roll_back(engine, &st_ref.moves, done);
            st_ref.holds.undo(undo);
            let raises: Vec<Move> = st_ref
                .moves
                .iter()
                .filter(|m| m.is_raise())
                .copied()
                .collect();
            return self.refused(st, change, refused, raises, wait, deadline);
        }
    }

    /// Another owner refused one of `raises` (nothing is changed): fail
    /// as a non-blocking call, or wait for all of them.
    fn refused(
        &self,
        st: MutexGuard<'_, State>,
        change: Change,
        refused: Move,
        raises: Vec<Move>,
        wait: Wait,
        deadline: Option<Instant>,
    ) -> Result<(), Error> {
        match wait {
            Wait::NonBlocking => {
                let engine = self.engine(&st);
                let holder = refused.to.and_then(|k| engine.probe(refused.span, k).ok());
                Err(Error::WouldBlock {
                    holder: holder.flatten(),
                })
            }
            Wait::NonBlockingNoHolder => Err(Error::WouldBlock { holder: None }),
            _ => self.sleep_and_apply(st, change, raises, wait, deadline),
        }
    }

    /// The fast path: a change inside one piece of the map, at most one
    /// system call. `Ok(false)` when another owner is in the way (nothing
    /// changed).
    fn change_single(&self, st: &mut State, single: crate::holds::Single) -> Result<bool, Error> {
        let (from, to) = (single.from(), single.to());
        if from != to {
            let raise = rank(to) > rank(from);
            if raise && to == Some(Kind::Exclusive) && !st.writable {
                return Err(Error::ReadOnly {
                    path: std::path::PathBuf::new(),
                });
            }
            let granted = self.engine(st).try_set(single.span, to);
            if raise && !matches!(granted, Ok(true)) {
                return granted;
            }
            // A lowering is kept in the bookkeeping even if the call
            // failed: the kernel then holds more than it says, which only
            // delays others, and the error is reported.
            st.holds.commit(single);
            return granted.map(|_| true);
        }
        st.holds.commit(single);
        Ok(true)
    }

    /// Undo the first `done` raises of `moves` after a later one failed.
    fn roll_back(engine: Fcntl, moves: &[Move], done: usize) {
        for m in moves.iter().filter(|m| m.is_raise()).take(done) {
            // Lowering never blocks; if it fails the kernel holds more than
            // the bookkeeping says, which only delays other owners.
            let _ = engine.try_set(m.span, m.from);
        }
    }

    /// Make the kernel follow the lowering moves just computed, skipping
    /// spans another thread is sleeping on.
    fn lower(&self, st: &mut State, engine: Fcntl) -> Result<(), Error> {
        let mut result = Ok(());
        for m in st.moves.iter().filter(|m| !m.is_raise()) {
            if st.busy.is_empty() {
                set_or_keep(engine, m.span, m.to, &mut result);
            } else {
                for piece in outside(m.span, &st.busy) {
                    set_or_keep(engine, piece, m.to, &mut result);
                }
            }
        }
        result
    }

    /// The slow path: with the change not applied, mark its span busy, drop
    /// the mutex, wait in the kernel for every raise, then apply the change
    /// and lower whatever the wait took beyond what is now needed.
    fn sleep_and_apply(
        &self,
        mut st: MutexGuard<'_, State>,
        change: Change,
        raises: Vec<Move>,
        wait: Wait,
        deadline: Option<Instant>,
    ) -> Result<(), Error> {
        let span = change.span();
        // What the kernel holds over the span, as we go.
        let mut kernel: Vec<(Span, Option<Kind>)> = st.holds.effective(span);
        st.busy.push(span);
        let engine = self.engine(&st);
        drop(st);

        let mut outcome = Ok(());
        for m in &raises {
            let kind = m.to.expect("a raise has a kind");
            outcome = match wait {
                Wait::Timeout(_) | Wait::Deadline(_) => {
                    poll_until(engine, m.span, kind, deadline.unwrap_or_else(Instant::now))
                }
                // No early return from here on: the busy mark must go.
                _ => match yield_and_retry(engine, m.span, kind) {
                    Ok(true) => Ok(()),
                    Err(e) => Err(e),
                    Ok(false) if wait == Wait::BlockingInterruptible => {
                        engine.wait_set(m.span, kind)
                    }
                    Ok(false) => loop {
                        match engine.wait_set(m.span, kind) {
                            Err(Error::Interrupted) => continue,
                            other => break other,
                        }
                    },
                },
            };
            if outcome.is_err() {
                break;
            }
            overwrite(&mut kernel, m.span, Some(kind));
        }

        let mut st = self.lock();
        let busy_at = st
            .busy
            .iter()
            .position(|b| *b == span)
            .expect("our busy span");
        st.busy.swap_remove(busy_at);
        if outcome.is_ok() {
            let st_ref = &mut *st;
            st_ref.moves.clear();
            st_ref.holds.apply(change, &mut st_ref.moves);
        }
        // Everything over the span that the kernel holds beyond the
        // bookkeeping (our extra raises after a failure, or releases other
        // threads skipped while we slept) is lowered now.
        let desired: Vec<(Span, Option<Kind>)> = st.holds.effective(span);
        let mut lowered = Ok(());
        for (piece, have, want) in zip_pieces(&kernel, &desired) {
            if rank(want) < rank(have) {
                let others_busy = st.busy.clone();
                for p in outside(piece, &others_busy) {
                    set_or_keep(engine, p, want, &mut lowered);
                }
            }
        }
        drop(st);
        self.cond.notify_all();
        outcome.and(lowered)
    }

    /// What the owner holds, piece by piece.
    pub fn held(&self) -> Vec<(Span, Kind)> {
        let st = self.lock();
        st.holds
            .effective(Span::ALL)
            .into_iter()
            .filter_map(|(s, k)| k.map(|k| (s, k)))
            .collect()
    }

    /// A handle's explicit layer.
    pub fn explicit(&self, handle: HandleId) -> Vec<(Span, Kind)> {
        let st = self.lock();
        st.holds
            .explicit(handle, Span::ALL)
            .into_iter()
            .filter_map(|(s, k)| k.map(|k| (s, k)))
            .collect()
    }

    /// The first lock of another owner in the way of `kind` on `span`.
    pub fn probe(&self, span: Span, kind: Kind) -> Result<Option<Holder>, Error> {
        if self.is_inherited() {
            return Err(Error::Forked);
        }
        let st = self.lock();
        self.engine(&st).probe(span, kind)
    }

    /// Release a handle's explicit layer and forget it.
    pub fn forget_handle(&self, handle: HandleId) -> Result<(), Error> {
        let r = self.change(
            Change::Explicit {
                handle,
                span: Span::ALL,
                kind: None,
            },
            Wait::NonBlocking,
        );
        self.lock().holds.drop_layer(handle);
        r
    }

    /// Unlock every index in the kernel (the owner is going away).
    pub fn unlock_everything(&self) {
        let st = self.lock();
        if !st.holds.is_empty() {
            let _ = self.engine(&st).try_set(Span::ALL, None);
        }
    }
}

fn set_or_keep(engine: Fcntl, span: Span, kind: Option<Kind>, result: &mut Result<(), Error>) {
    if let Err(e) = engine.try_set(span, kind) {
        if result.is_ok() {
            *result = Err(e);
        }
    }
}

/// A timeout as the deadline it sets, counted from now. A timeout that
/// ends past what the clock can hold (`Duration::MAX`, say) sets no
/// deadline at all: the caller means "as long as it takes", so it is a
/// blocking wait, not one that gives up at once.
fn timeout_to_deadline(wait: Wait) -> Wait {
    match wait {
        Wait::Timeout(d) => Instant::now()
            .checked_add(d)
            .map_or(Wait::Blocking, Wait::Deadline),
        w => w,
    }
}

fn remaining(deadline: Option<Instant>) -> Option<Duration> {
    let left = deadline?.checked_duration_since(Instant::now())?;
    (!left.is_zero()).then_some(left)
}

/// Give the CPU away and try again, a few times, before sleeping in the
/// kernel. A lock held for a moment (hand-over-hand, above all with more
/// processes than cores) is often free once its holder has run, and a
/// failed try costs far less than a sleep and a wake-up. The kernel wait
/// that follows still detects deadlocks.
fn yield_and_retry(engine: Fcntl, span: Span, kind: Kind) -> Result<bool, Error> {
    for _ in 0..YIELDS_BEFORE_SLEEP {
        std::thread::yield_now();
        if engine.try_set(span, Some(kind))? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Try, sleep a little, try again, until `deadline`. The kernel has no
/// timed `F_SETLKW`; polling with a capped back-off keeps both the lateness
/// after a release and the CPU cost small.
fn poll_until(engine: Fcntl, span: Span, kind: Kind, deadline: Instant) -> Result<(), Error> {
    let mut pause = FIRST_POLL;
    loop {
        if engine.try_set(span, Some(kind))? {
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(Error::TimedOut);
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(MAX_POLL);
    }
}

/// The parts of `span` outside every span in `busy`.
fn outside(span: Span, busy: &[Span]) -> Vec<Span> {
    let mut parts = vec![span];
    for b in busy {
        parts = parts
            .into_iter()
            .flat_map(|p| {
                let mut out = Vec::with_capacity(2);
                if p.intersect(*b).is_none() {
                    out.push(p);
                } else {
                    if p.start() < b.start() {
                        out.push(Span::from_checked(p.start(), b.start()));
                    }
                    if b.end() < p.end() {
                        out.push(Span::from_checked(b.end(), p.end()));
                    }
                }
                out
            })
            .collect();
    }
    parts
}

/// Set `span` to `kind` within a piece list that covers it.
fn overwrite(pieces: &mut Vec<(Span, Option<Kind>)>, span: Span, kind: Option<Kind>) {
    let mut out = Vec::with_capacity(pieces.len() + 2);
    for &(p, k) in pieces.iter() {
        match p.intersect(span) {
            None => out.push((p, k)),
            Some(_) => {
                if p.start() < span.start() {
                    out.push((Span::from_checked(p.start(), span.start()), k));
                }
                if span.end() < p.end() {
                    out.push((Span::from_checked(span.end(), p.end()), k));
                }
            }
        }
    }
    out.push((span, kind));
    out.sort_by_key(|(s, _)| s.start());
    *pieces = out;
}

/// Walk two piece lists over the same span together.
fn zip_pieces(
    a: &[(Span, Option<Kind>)],
    b: &[(Span, Option<Kind>)],
) -> Vec<(Span, Option<Kind>, Option<Kind>)> {
    let mut out = Vec::new();
    for &(pa, ka) in a {
        for &(pb, kb) in b {
            if let Some(s) = pa.intersect(pb) {
                out.push((s, ka, kb));
            }
        }
    }
    out
}

impl Drop for Owner {
    fn drop(&mut self) {
        let fds = std::mem::take(&mut self.state.get_mut().unwrap_or_else(|p| p.into_inner()).fds);
        for fd in fds {
            crate::registry::close(self.dev, self.ino, fd);
        }
    }
}
