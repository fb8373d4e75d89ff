//! A lock owner: hold bookkeeping plus an engine, and the protocol that
//! keeps the engine's view equal to the bookkeeping's.
//!
//! Invariant: outside the `busy` spans, the engine holds exactly the
//! effective kind the bookkeeping computes. A thread that must wait marks
//! its span busy and lets go of the mutex, so other threads of the same
//! owner can still release (releases never block); they skip the engine
//! inside busy spans and the waiter puts things right when it wakes.
//!
//! Nothing here knows how an engine keeps its locks: see `engine/mod.rs`
//! for what the protocol asks of one.

use std::ops::{Deref, DerefMut};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

use crate::cancel::Cancel;
use crate::descriptors::Keeper;
use crate::engine::{Engine, Until, INTERRUPT_SLICE};
use crate::error::{Error, Holder};
use crate::holds::{rank, Change, HandleId, Holds, Move, Step, Undo};
use crate::kind::Kind;
use crate::party::{Blocker, Parties, Party};
use crate::span::Span;
use crate::stats::{Event, Recording};
use crate::sys;
use crate::wait::Wait;

use self::fast::Fast;

pub(crate) struct Owner<E> {
    pub engine: E,
    /// The fast path for a lone hold of one index (`owner/fast.rs`).
    fast: Fast,
    generation: u64,
    state: Mutex<State>,
    /// Signalled whenever a busy span is cleared.
    cond: Condvar,
}

struct State {
    holds: Holds,
    /// Which of the owner's threads (or tasks) holds what.
    parties: Parties,
    busy: Vec<Span>,
    /// Scratch buffer for the moves of one change; kept to avoid allocating.
    moves: Vec<Move>,
    /// Handles sharing this owner (process mode).
    handles: usize,
    next_handle: HandleId,
    /// Lock statistics, when recorded (`stats.rs`): one test of this
    /// field is all a take pays when they are not.
    stats: Option<Box<Recording>>,
}

impl State {
    /// Apply `change` to the bookkeeping; its moves land in `self.moves`.
    fn apply(&mut self, change: Change, party: Party) -> Undo {
        self.parties.before_apply(party, &self.holds);
        self.moves.clear();
        self.holds.apply(change, &mut self.moves)
    }

    /// The change applied last is final: count it for its party.
    fn keep(&mut self, change: Change, party: Party) {
        self.parties.after_apply(party, change, &self.holds);
    }

    fn raises(&self) -> impl Iterator<Item = &Move> {
        self.moves.iter().filter(|m| m.is_raise())
    }

    /// Whether another thread of this owner waits on part of `span`.
    fn busy_over(&self, span: Span) -> bool {
        !self.busy.is_empty() && self.busy.iter().any(|b| b.intersect(span).is_some())
    }
}

/// How raising the pieces of a change went.
enum Raised {
    All,
    /// Another owner refused this move; the earlier ones were rolled back.
    Refused(Move),
    /// A call failed; the earlier ones were rolled back.
    Failed(Error),
}

/// Whether a refused raise goes on to wait.
fn waits(wait: Wait) -> bool {
    !matches!(wait, Wait::NonBlocking | Wait::NonBlockingNoHolder)
}

/// How the caller asked to wait: `started` is when a [`Wait::Timeout`]
/// began counting (the call, not the wait).
#[derive(Clone, Copy)]
struct Asked<'a> {
    wait: Wait,
    started: Option<Instant>,
    cancel: Option<&'a Cancel>,
}

impl<'a> Asked<'a> {
    /// When a wait must give up: a timeout past what the clock can hold
    /// means waiting forever, not failing at once.
    fn until(self) -> Until<'a> {
        let (deadline, interruptible) = match self.wait {
            Wait::Timeout(d) => (self.started.and_then(|t| t.checked_add(d)), false),
            Wait::Deadline(t) => (Some(t), false),
            Wait::DeadlineInterruptible(t) => (Some(t), true),
            Wait::BlockingInterruptible => (None, true),
            // Non-blocking calls never reach a wait.
            Wait::Blocking | Wait::NonBlocking | Wait::NonBlockingNoHolder => (None, false),
        };
        Until {
            deadline,
            interruptible,
            cancel: self.cancel,
        }
    }
}

/// What parking descriptors needs of a process-mode owner.
impl<E: Engine> Keeper for Owner<E> {
    fn inherited(&self) -> bool {
        self.is_inherited()
    }

    fn if_idle(&self, f: &mut dyn FnMut()) {
        Owner::if_idle(self, f)
    }
}

impl<E: Engine> Owner<E> {
    pub fn new(engine: E) -> Owner<E> {
        Owner {
            fast: Fast::new(engine.fast_lane()),
            engine,
            generation: sys::fork_generation(),
            state: Mutex::new(State {
                holds: Holds::new(),
                parties: Parties::new(),
                busy: Vec::new(),
                moves: Vec::new(),
                handles: 1,
                next_handle: 0,
                stats: None,
            }),
            cond: Condvar::new(),
        }
    }

    fn lock(&self) -> Locked<'_, E> {
        // A panic while holding the mutex leaves the bookkeeping as it was
        // at some consistent step: every mutation completes before any call
        // that can panic.
        Locked::new(self, self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The mutex, with the fast path closed (a fast hold taken over into
    /// the bookkeeping): what every change of the bookkeeping needs.
    /// Inline, and the guard made once the path is closed: it then stays
    /// in registers instead of going through memory around the call.
    #[inline(always)]
    fn lock_closed(&self) -> Result<Locked<'_, E>, Error> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = self.close_fast(&mut st) {
            // Let go as every guard does (`Locked::drop`).
            drop(Locked::new(self, st));
            return Err(e);
        }
        Ok(Locked::new(self, st))
    }

    /// [`Owner::lock_closed`], or the mutex alone if the fast hold cannot
    /// be taken over (for a reader that can say nothing of an error).
    fn lock_closed_or_not(&self) -> Locked<'_, E> {
        self.lock_closed().unwrap_or_else(|_| self.lock())
    }

    pub fn is_inherited(&self) -> bool {
        self.generation != sys::current_fork_generation()
    }

    pub fn new_handle_id(&self) -> HandleId {
        let mut st = self.lock();
        st.next_handle += 1;
        st.next_handle
    }

    /// One more handle shares this owner (process mode).
    pub fn add_handle(&self) {
        self.lock().handles += 1;
    }

    /// One handle leaves; how many are left.
    pub fn remove_handle(&self) -> usize {
        let mut st = self.lock();
        st.handles -= 1;
        st.handles
    }

    /// Apply `change` for every thread alike, making the engine agree,
    /// waiting as `wait` says.
    #[cfg(test)]
    pub fn change(&self, change: Change, wait: Wait) -> Result<(), Error> {
        self.change_or_cancel(change, wait, None, crate::party::EVERYONE)
    }

    /// As [`Owner::change`], for `party` (whose takes other parties of
    /// this owner keep out), and a wait ends when `cancel` is cancelled.
    #[inline]
    pub fn change_or_cancel(
        &self,
        change: Change,
        wait: Wait,
        cancel: Option<&Cancel>,
        party: Party,
    ) -> Result<(), Error> {
        if self.is_inherited() {
            return Err(Error::Forked);
        }
        // A timeout counts from the call, not from when waiting starts.
        let started = matches!(wait, Wait::Timeout(_)).then(Instant::now);
        let asked = move || Asked {
            wait,
            started,
            cancel,
        };
        let mut st = self.lock_closed()?;
        if st.busy.is_empty() && st.parties.alone(party, &st.holds) {
            if let Some(step) = st.holds.one_piece(change) {
                let (from, to) = step.kinds();
                if from != to {
                    // A lowering is recorded before the engine lets go, so
                    // that whoever gets the lock next finds its hold counted
                    // (the table's figures are shared); a raise once granted.
                    let lowers = matches!(
                        (from, to),
                        (Some(_), None) | (Some(Kind::Exclusive), Some(Kind::Shared))
                    );
                    let noted_first = lowers && st.stats.is_some();
                    if noted_first {
                        self.note_step(&mut st, &step);
                    }
                    let outcome = match to {
                        Some(k) if waits(wait) => self.engine.try_set_before_wait(step.span, k),
                        _ => self.engine.try_set(step.span, to),
                    };
                    match outcome {
                        // Recorded here, where everything it needs is at
                        // hand: nothing more stays live past the commit.
                        Ok(true) => {
                            if st.stats.is_some() && !noted_first {
                                self.note_step(&mut st, &step);
                            }
                        }
                        other => {
                            return self.one_piece_not_granted(
                                st,
                                change,
                                step,
                                other,
                                asked(),
                                party,
                            )
                        }
                    }
                }
                st.holds.commit(step);
                st.parties.solo(party);
                return Ok(());
            }
        }
        self.change_pieces(st, change, asked(), party)
    }

    /// The one-piece path when its call was refused or failed. A raise then
    /// changed nothing: a refusal goes straight to waiting (or failing),
    /// without trying the same call again. A lowering is committed either
    /// way, as lowering is never refused: after a failed call the engine
    /// holds more than the bookkeeping says, which only delays other
    /// owners, and the error is reported.
    #[cold]
    #[inline(never)]
    fn one_piece_not_granted(
        &self,
        mut st: Locked<'_, E>,
        change: Change,
        step: Step,
        outcome: Result<bool, Error>,
        asked: Asked<'_>,
        party: Party,
    ) -> Result<(), Error> {
        let (from, to) = step.kinds();
        if rank(to) > rank(from) {
            return match outcome {
                Ok(_) => {
                    let m = Move {
                        span: step.span,
                        from,
                        to,
                    };
                    self.refused(st, change, m, vec![m], asked, party)
                }
                Err(e) => Err(e),
            };
        }
        st.holds.commit(step);
        st.parties.solo(party);
        self.note_move(&mut st, step.span, from, to);
        outcome.map(drop)
    }

    /// The general path: any number of pieces, raises first. Out of line,
    /// so that the one-piece path stays small.
    #[inline(never)]
    fn change_pieces<'a>(
        &'a self,
        mut st: Locked<'a, E>,
        change: Change,
        asked: Asked<'_>,
        party: Party,
    ) -> Result<(), Error> {
        loop {
            if let Some(b) = st.parties.in_the_way(party, change, &st.holds) {
                // Another thread (or task) of this owner holds, or waits
                // in the engine for, what this change asks for.
                st = self.wait_for_party(st, party, b, asked)?;
                continue;
            }
            let undo = st.apply(change, party);
            if st.raises().next().is_some() && st.busy_over(change.span()) {
                // Another thread of this owner is waiting on part of this
                // span, so what the engine holds there is in flux until it
                // wakes. Changes that only lower (or need nothing) go
                // ahead: the waiter puts the engine right when it wakes.
                st.holds.undo(undo);
                st = self.wait_for_sibling(st, asked)?;
                continue;
            }
            return match self.raise_all(&st) {
                Raised::All => {
                    st.keep(change, party);
                    self.note_moves(&mut st);
                    let wake = st.parties.several();
                    let lowered = self.lower(&st);
                    drop(st);
                    if wake {
                        self.cond.notify_all();
                    }
                    lowered
                }
                Raised::Refused(refused) => {
                    st.holds.undo(undo);
                    let raises: Vec<Move> = st.raises().copied().collect();
                    self.refused(st, change, refused, raises, asked, party)
                }
                Raised::Failed(e) => {
                    st.holds.undo(undo);
                    Err(e)
                }
            };
        }
    }

    /// Make every raise of the moves just computed, without waiting. They
    /// go first because they are the only calls that can fail for
    /// contention; if one does, the ones made are put back, each to the
    /// kind its own piece had, so the engine is as it was.
    fn raise_all(&self, st: &State) -> Raised {
        for (done, m) in st.raises().enumerate() {
            let outcome = match self.engine.try_set(m.span, m.to) {
                Ok(true) => continue,
                Ok(false) => Raised::Refused(*m),
                Err(e) => Raised::Failed(e),
            };
            for made in st.raises().take(done) {
                // Lowering never blocks; if it fails the engine holds more
                // than the bookkeeping says, which only delays other owners.
                let _ = self.engine.try_set(made.span, made.from);
            }
            return outcome;
        }
        Raised::All
    }

    /// Make the engine follow the lowering moves just computed, skipping
    /// spans another thread is waiting on.
    fn lower(&self, st: &State) -> Result<(), Error> {
        let mut result = Ok(());
        for m in st.moves.iter().filter(|m| !m.is_raise()) {
            if st.busy.is_empty() {
                self.set_or_keep(m.span, m.to, &mut result);
            } else {
                for piece in outside(m.span, &st.busy) {
                    self.set_or_keep(piece, m.to, &mut result);
                }
            }
        }
        result
    }

    /// Wait for a sibling thread's wait over part of our span to end.
    fn wait_for_sibling<'a>(
        &'a self,
        st: Locked<'a, E>,
        asked: Asked<'_>,
    ) -> Result<Locked<'a, E>, Error> {
        if matches!(asked.wait, Wait::NonBlocking | Wait::NonBlockingNoHolder) {
            return Err(Error::WouldBlock {
                holder: None,
                at: None,
            });
        }
        self.nap(st, asked)
    }

    /// Wait until another party of this owner lets go of what is in the
    /// way (`blocker`), or refuse: at once for a non-blocking call, with
    /// [`Error::Deadlock`] if that party waits, through others maybe, for
    /// this one.
    #[cold]
    #[inline(never)]
    fn wait_for_party<'a>(
        &'a self,
        mut st: Locked<'a, E>,
        party: Party,
        blocker: Blocker,
        asked: Asked<'_>,
    ) -> Result<Locked<'a, E>, Error> {
        match asked.wait {
            Wait::NonBlocking => {
                return Err(Error::WouldBlock {
                    holder: Some(Holder {
                        span: blocker.span,
                        kind: blocker.kind,
                        pid: Some(std::process::id()),
                        server: None,
                    }),
                    at: None,
                })
            }
            Wait::NonBlockingNoHolder => {
                return Err(Error::WouldBlock {
                    holder: None,
                    at: None,
                })
            }
            _ => {}
        }
        if !st.parties.start_waiting(party, blocker.party) {
            return Err(Error::Deadlock { at: None });
        }
        let napped = self.nap(st, asked);
        let mut st = match napped {
            Ok(st) => st,
            Err(e) => {
                self.lock().parties.stop_waiting(party);
                return Err(e);
            }
        };
        st.parties.stop_waiting(party);
        Ok(st)
    }

    /// Sleep on the condition variable once (until something is released
    /// or a waiter wakes), ending as `asked` says.
    fn nap<'a>(&'a self, st: Locked<'a, E>, asked: Asked<'_>) -> Result<Locked<'a, E>, Error> {
        let until = asked.until();
        if let Some(e) = until.ended() {
            return Err(e);
        }
        // A condition variable wait ends on no signal and no cancel: an
        // interruptible or cancellable one wakes every slice to look (and
        // an interruptible one returns, so that its caller can run signal
        // handlers and call again).
        let slice = (until.interruptible || until.cancel.is_some()).then_some(INTERRUPT_SLICE);
        let st = st.into_inner();
        let st = match (until.left(), slice) {
            (None, None) => self.cond.wait(st).unwrap_or_else(|p| p.into_inner()),
            (left, slice) => {
                let nap = left
                    .into_iter()
                    .chain(slice)
                    .min()
                    .unwrap_or(INTERRUPT_SLICE);
                let (st, slept) = self
                    .cond
                    .wait_timeout(st, nap)
                    .unwrap_or_else(|p| p.into_inner());
                let st = self.closed_again(st)?;
                if slept.timed_out() {
                    if let Some(e) = until.ended() {
                        return Err(e);
                    }
                    if until.interruptible {
                        return Err(Error::Interrupted);
                    }
                }
                return Ok(st);
            }
        };
        self.closed_again(st)
    }

    /// The mutex, back after a condition variable wait, with the fast path
    /// closed again: while it was let go, a sibling whose wait ended may
    /// have left the owner quiet and opened the path (`reopen_fast`), and
    /// a fast take may have come since; the caller goes on to change the
    /// bookkeeping, which an open path must never see (F1).
    fn closed_again<'a>(&'a self, mut st: MutexGuard<'a, State>) -> Result<Locked<'a, E>, Error> {
        if let Err(e) = self.close_fast(&mut st) {
            drop(Locked::new(self, st));
            return Err(e);
        }
        Ok(Locked::new(self, st))
    }

    /// Another owner refused one of `raises` (nothing is changed): fail
    /// as a non-blocking call, or wait for all of them.
    #[inline(never)]
    fn refused(
        &self,
        mut st: Locked<'_, E>,
        change: Change,
        refused: Move,
        raises: Vec<Move>,
        asked: Asked<'_>,
        party: Party,
    ) -> Result<(), Error> {
        match asked.wait {
            Wait::NonBlocking => {
                self.note(&mut st, &raises, Event::Contended);
                let holder = refused
                    .to
                    .and_then(|k| self.engine.probe(refused.span, k).ok());
                Err(Error::WouldBlock {
                    holder: holder.flatten(),
                    at: None,
                })
            }
            Wait::NonBlockingNoHolder => Err(Error::WouldBlock {
                holder: None,
                at: None,
            }),
            _ => self.wait_and_apply(st, change, raises, asked.until(), party),
        }
    }

    /// The slow path: with the change not applied, mark its span busy, drop
    /// the mutex, wait in the engine for every raise, then apply the change
    /// and lower whatever the wait took beyond what is now needed.
    fn wait_and_apply(
        &self,
        mut st: Locked<'_, E>,
        change: Change,
        raises: Vec<Move>,
        until: Until<'_>,
        party: Party,
    ) -> Result<(), Error> {
        let span = change.span();
        // What the engine holds over the span, as we go.
        let mut held: Vec<(Span, Option<Kind>)> = st.holds.effective(span);
        st.busy.push(span);
        // Other parties keep out of what this one waits for, so that
        // nothing of theirs conflicts with it when it is granted.
        st.parties.start_pending(party, change);
        let waited = st.stats.as_mut().map(|r| r.wait_started(span));
        drop(st);

        // No early return from here on: the busy mark must go.
        let mut outcome = Ok(());
        let first = raises.first().and_then(|m| m.to);
        let all_at_once = match first {
            Some(kind) if raises.len() > 1 && raises.iter().all(|m| m.to == first) => {
                let spans: Vec<Span> = raises.iter().map(|m| m.span).collect();
                self.engine
                    .wait_set_all(&spans, kind, until)
                    .map(|r| (r, kind))
            }
            _ => None,
        };
        if let Some((r, kind)) = all_at_once {
            outcome = r;
            if outcome.is_ok() {
                for m in &raises {
                    overwrite(&mut held, m.span, Some(kind));
                }
            }
        } else {
            for m in &raises {
                let kind = m.to.expect("a raise has a kind");
                outcome = self.engine.wait_set(m.span, kind, until);
                if outcome.is_err() {
                    break;
                }
                overwrite(&mut held, m.span, Some(kind));
            }
        }

        let mut st = self.lock();
        let busy_at = st
            .busy
            .iter()
            .position(|b| *b == span)
            .expect("our busy span");
        st.busy.swap_remove(busy_at);
        st.parties.end_pending(party, change);
        // A wait a signal ended is called again by its caller (the Python
        // binding does, after running the handlers): it counts once, from
        // its first start, when it ends. Nor does the refused try a
        // binding makes before waiting (`Wait::NonBlockingNoHolder`).
        if let (Some(t), Err(Error::Interrupted)) = (waited, &outcome) {
            if let Some(r) = st.stats.as_mut() {
                r.wait_interrupted(span, t);
            }
        } else if let Some(t) = waited {
            self.note(&mut st, &raises, Event::Contended);
            self.note(&mut st, &raises, Event::Waited(t.elapsed()));
            match outcome {
                Err(Error::TimedOut { .. }) => self.note(&mut st, &raises, Event::TimedOut),
                Err(Error::Deadlock { .. }) => self.note(&mut st, &raises, Event::Deadlock),
                _ => {}
            }
        }
        if outcome.is_ok() {
            st.apply(change, party);
            st.keep(change, party);
            self.note_moves(&mut st);
        }
        // Everything over the span that the engine holds beyond the
        // bookkeeping (our raises after a failure, or releases other
        // threads skipped while we waited) is lowered now.
        let desired: Vec<(Span, Option<Kind>)> = st.holds.effective(span);
        let mut lowered = Ok(());
        for (piece, have, want) in zip_pieces(&held, &desired) {
            if rank(want) < rank(have) {
                for p in outside(piece, &st.busy) {
                    self.set_or_keep(p, want, &mut lowered);
                }
            }
        }
        drop(st);
        self.cond.notify_all();
        outcome.and(lowered)
    }

    fn set_or_keep(&self, span: Span, kind: Option<Kind>, result: &mut Result<(), Error>) {
        if let Err(e) = self.engine.try_set(span, kind) {
            if result.is_ok() {
                *result = Err(e);
            }
        }
    }

    /// What the owner holds, piece by piece.
    /// How many holds the fast path keeps now (`owner/fast.rs`).
    pub fn fast_holds(&self) -> usize {
        self.fast.holds()
    }

    pub fn held(&self) -> Vec<(Span, Kind)> {
        let st = self.lock_closed_or_not();
        st.holds
            .effective(Span::ALL)
            .into_iter()
            .filter_map(|(s, k)| k.map(|k| (s, k)))
            .collect()
    }

    /// A handle's explicit layer.
    pub fn explicit(&self, handle: HandleId) -> Vec<(Span, Kind)> {
        let st = self.lock_closed_or_not();
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
        self.engine.probe(span, kind)
    }

    /// Release a handle's explicit layer and forget it.
    pub fn forget_handle(&self, handle: HandleId, party: Party) -> Result<(), Error> {
        let r = self.change_or_cancel(
            Change::Explicit {
                handle,
                span: Span::ALL,
                kind: None,
            },
            Wait::NonBlocking,
            None,
            party,
        );
        self.lock().holds.drop_layer(handle);
        r
    }

    /// Run `f` under the owner's mutex if the owner holds nothing and no
    /// thread of it is waiting: then nothing it holds can be lost, whatever
    /// `f` does to the engine's file (a waiter may already hold the first
    /// raises of a multi-piece wait, which the bookkeeping shows only once
    /// it wakes).
    pub fn if_idle(&self, f: impl FnOnce()) {
        let st = self.lock();
        if st.holds.is_empty() && st.busy.is_empty() && !self.fast.busy() {
            f();
        }
    }

    /// Unlock everything in the engine (the owner is going away).
    pub fn unlock_everything(&self) {
        let st = self.lock_closed_or_not();
        if !st.holds.is_empty() || self.fast.busy() {
            let _ = self.engine.unlock_all();
        }
    }
}

/// The owner's mutex held: the bookkeeping, and on the way out the fast
/// path opened again if the owner is quiet (`owner/fast.rs`).
struct Locked<'a, E: Engine> {
    owner: &'a Owner<E>,
    /// `None` only once handed on by [`Locked::into_inner`].
    st: Option<MutexGuard<'a, State>>,
}

impl<'a, E: Engine> Locked<'a, E> {
    fn new(owner: &'a Owner<E>, st: MutexGuard<'a, State>) -> Self {
        Locked {
            owner,
            st: Some(st),
        }
    }

    /// The mutex guard itself, for a wait on the condition variable (the
    /// owner is not quiet then: nothing is opened).
    fn into_inner(mut self) -> MutexGuard<'a, State> {
        self.st.take().expect("a live guard")
    }
}

impl<E: Engine> Deref for Locked<'_, E> {
    type Target = State;
    fn deref(&self) -> &State {
        self.st.as_ref().expect("a live guard")
    }
}

impl<E: Engine> DerefMut for Locked<'_, E> {
    fn deref_mut(&mut self) -> &mut State {
        self.st.as_mut().expect("a live guard")
    }
}

impl<E: Engine> Drop for Locked<'_, E> {
    fn drop(&mut self) {
        if let Some(st) = self.st.take() {
            self.owner.reopen_fast(&st);
        }
    }
}

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

mod fast;
mod recording;
#[cfg(test)]
mod tests;
