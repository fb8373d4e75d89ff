//! The owner's fast path: up to two holds of one index each, no mutex.
//!
//! While the owner holds nothing else and nothing else goes on (no thread
//! waits, no statistics are recorded), a take of one index is made on the
//! engine's fast lane ([`Engine::fast_take`]) and recorded in one of two
//! slots of the owner instead of the bookkeeping, and its release is the
//! engine's [`Engine::fast_release`] and one store: no mutex, no map, no
//! allocation. Two slots, so that a walk hand over hand (take the next
//! index, then let go of the last) stays on this path. Anything else takes
//! the mutex, which first *closes* the fast path, taking its holds over
//! into the bookkeeping (`close_fast`); the mutex holder opens it again
//! when the owner is quiet once more (`reopen_fast`).
//!
//! # The words
//!
//! A gate (`open`) and a word per slot: two bits of state and a generation
//! above them, which every change of the slot moves on, so that no value
//! comes back.
//!
//! | slot word from | to | by | how |
//! |---|---|---|---|
//! | `FREE(g)` | `CLAIMING(g+1)` | a fast take, the gate open | CAS, then the gate read again (`SeqCst`) |
//! | `CLAIMING(g)` | `HELD(g+1)` | that take, granted by the engine | store, after the hold's fields |
//! | `CLAIMING(g)` | `FREE(g+1)` | that take, refused, or the gate found closed | store: nothing changed |
//! | `HELD(g)` | `FREE(g+1)` | the release of that hold | store, after the engine let it go |
//! | `HELD(g)` | `FREE(g+1)` | the mutex holder, taking it over | store, after the engine made the hold one its release cannot let go |
//!
//! The gate is opened and closed by the mutex holder alone.
//!
//! Why it holds:
//! - **F1** A slot is taken only while the gate is open, and the gate is
//!   open only while the bookkeeping is empty and the owner quiet: the
//!   mutex holder closes it, and empties both slots, before it looks at
//!   the bookkeeping, and opens it only when it leaves the owner quiet.
//! - **F2** A hold's fields are written while its slot is `CLAIMING` (by
//!   the one take that claimed it) and read as a seqlock's data: read
//!   between two loads of the slot that find the same `HELD` value.
//! - **F3** A `HELD` slot is emptied by one of two ways that exclude each
//!   other, decided by the engine's word for the index: its release (the
//!   engine's `fast_release` succeeds, then the store) or its take-over
//!   (the engine's `fast_take_over` makes that release fail, then the
//!   mutex holder's store). A take-over that finds the hold let go waits
//!   for the release's store (a step away); if it does not come (the
//!   engine lost the hold some other way, as a table written over could),
//!   the call fails rather than hang.
//! - **F4** No take slips past a closing: a take's claim (`SeqCst` CAS)
//!   comes before its read of the gate, the mutex holder's close
//!   (`SeqCst` store) before its reads of the slots, so one of the two sees
//!   the other (the pairing of the lane's I3). The mutex holder waits out a
//!   `CLAIMING` slot (a few atomic instructions from its outcome), and once
//!   the gate is closed no slot is claimed again: the hold whose fields a
//!   take-over read is the one the engine then decides on.

use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};

use super::{Owner, State};
use crate::engine::{Engine, FAST_SLOTS as SLOTS};
use crate::error::Error;
use crate::holds::{Change, HandleId};
use crate::kind::Kind;
use crate::party::Party;
use crate::span::Span;

const STATE: u64 = 0b11;
const FREE: u64 = 0;
const CLAIMING: u64 = 1;
const HELD: u64 = 2;
/// One generation.
const NEXT: u64 = 4;
/// How long a take-over waits for the release that let its hold go to
/// store its outcome (a step away, unless its thread is preempted there).
const GONE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(1);

/// `w` moved on a generation, in state `state`.
#[inline(always)]
fn next(w: u64, state: u64) -> u64 {
    ((w & !STATE).wrapping_add(NEXT)) | state
}

/// What a fast hold is, as its `what` field says: the holder (0 for a
/// guard, else the explicit layer's handle) and whether it is exclusive.
#[inline(always)]
fn what(handle: HandleId, kind: Kind) -> u64 {
    handle << 1 | (kind == Kind::Exclusive) as u64
}

/// A slot: its word and its hold's fields.
struct Slot {
    word: AtomicU64,
    /// The held index.
    index: AtomicU64,
    /// The party it is held for.
    party: AtomicU64,
    /// See [`what`].
    what: AtomicU64,
}

impl Slot {
    /// The fields of the hold in `HELD` word `w` (F2): `None` when the
    /// word moved on meanwhile.
    #[inline(always)]
    fn fields(&self, w: u64) -> Option<(u64, u64, u64)> {
        let index = self.index.load(Ordering::Relaxed);
        let party = self.party.load(Ordering::Relaxed);
        let what = self.what.load(Ordering::Relaxed);
        // F2: the seqlock reader's fence, against the claim's.
        fence(Ordering::Acquire);
        (self.word.load(Ordering::Relaxed) == w).then_some((index, party, what))
    }
}

/// The owner's fast path: the gate and the slots, on a line of their own
/// (the first slot, which a lone hold uses, within the first 64 bytes).
#[repr(align(64))]
pub(super) struct Fast {
    /// Takes may claim a slot (F1, F4).
    open: AtomicBool,
    /// The owner records statistics: no take goes the fast way.
    recording: AtomicBool,
    /// The engine has a fast lane.
    lane: bool,
    slots: [Slot; SLOTS],
}

impl Fast {
    pub(super) fn new(lane: bool) -> Fast {
        Fast {
            open: AtomicBool::new(lane),
            recording: AtomicBool::new(false),
            lane,
            slots: std::array::from_fn(|_| Slot {
                word: AtomicU64::new(FREE),
                index: AtomicU64::new(0),
                party: AtomicU64::new(0),
                what: AtomicU64::new(0),
            }),
        }
    }

    pub(super) fn set_recording(&self) {
        self.recording.store(true, Ordering::Relaxed);
    }

    /// How many holds the fast path keeps now.
    pub(crate) fn holds(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.word.load(Ordering::Acquire) & STATE == HELD)
            .count()
    }

    /// Whether the owner holds something on the fast path (or is taking it).
    pub(super) fn busy(&self) -> bool {
        self.slots
            .iter()
            .any(|s| s.word.load(Ordering::Acquire) & STATE != FREE)
    }
}

/// Give the CPU a moment while another thread finishes a step.
fn back_off(spins: &mut u32) {
    *spins += 1;
    if *spins < 64 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

impl<E: Engine> Owner<E> {
    /// Take the one index `span` at `kind` for `party` on the fast path,
    /// for a guard (`layer` 0) or the explicit layer `layer`: `true` when
    /// it is taken; `false` sends the take the usual way, which also says
    /// why a take cannot be made at all (a forked child, a read-only
    /// file, a span the engine never takes).
    #[inline(always)]
    pub(crate) fn fast_take(&self, span: Span, kind: Kind, layer: HandleId, party: Party) -> bool {
        let f = &self.fast;
        // Relaxed: the gate is read again after the claim (F4).
        if !f.open.load(Ordering::Relaxed)
            || span.end() - span.start() != 1
            || f.recording.load(Ordering::Relaxed)
            || self.is_inherited()
            || (kind == Kind::Exclusive && !self.engine.writable())
            || self.engine.check_span(span, true).is_err()
            || self.engine.locks_lost().is_some()
        {
            return false;
        }
        // The first free slot, claimed.
        let mut claimed = None;
        for (k, slot) in f.slots.iter().enumerate() {
            // Relaxed: the CAS decides.
            let w = slot.word.load(Ordering::Relaxed);
            if w & STATE == FREE
                && slot
                    .word
                    // F4: the first of the taker's pair, before its gate read.
                    .compare_exchange(w, next(w, CLAIMING), Ordering::SeqCst, Ordering::Relaxed)
                    .is_ok()
            {
                claimed = Some((k, next(w, CLAIMING)));
                break;
            }
        }
        let Some((k, w)) = claimed else {
            return false;
        };
        let slot = &f.slots[k];
        // F4: closed meanwhile, and the closer may not have seen the claim:
        // give it back untouched.
        if !f.open.load(Ordering::SeqCst) {
            slot.word.store(next(w, FREE), Ordering::Release);
            return false;
        }
        // F2: the seqlock writer's fence, before the fields.
        fence(Ordering::Release);
        if !self.engine.fast_take(span, kind, k) {
            // Refused (or taken away at once): nothing changed here.
            slot.word.store(next(w, FREE), Ordering::Release);
            return false;
        }
        slot.index.store(span.start(), Ordering::Relaxed);
        slot.party.store(party.id(), Ordering::Relaxed);
        slot.what.store(what(layer, kind), Ordering::Relaxed);
        slot.word.store(next(w, HELD), Ordering::Release);
        true
    }

    /// Let go of the fast hold on `span` for `party`, if it is the
    /// guard's of `kind` (`layer` 0), or the explicit layer `layer`'s
    /// (`kind` `None`: whatever kind it has): `true` when it is let go.
    /// An explicit release while the owner holds nothing at all is made
    /// at once. `false` sends the release the usual way.
    #[inline(always)]
    pub(crate) fn fast_release(
        &self,
        span: Span,
        kind: Option<Kind>,
        layer: HandleId,
        party: Party,
    ) -> bool {
        let f = &self.fast;
        let (expected, mask) = match kind {
            Some(k) => (what(layer, k), !0),
            None => (what(layer, Kind::Shared), !1),
        };
        let mut none_held = true;
        for slot in &f.slots {
            let w = slot.word.load(Ordering::Acquire);
            if w & STATE == FREE {
                continue;
            }
            none_held = false;
            if w & STATE != HELD {
                continue;
            }
            let Some((index, p, wh)) = slot.fields(w) else {
                continue;
            };
            if index != span.start()
                || span.end() - span.start() != 1
                || p != party.id()
                || (wh ^ expected) & mask != 0
            {
                continue;
            }
            if self.is_inherited() {
                return false;
            }
            // F3: the engine decides between this release and a take-over.
            if !self.engine.fast_release(span) {
                return false;
            }
            slot.word.store(next(w, FREE), Ordering::Release);
            return true;
        }
        // F1: open with both slots free, the owner holds nothing, so an
        // explicit release has nothing to do (as the usual way would
        // find), but in a forked child, which the usual way refuses.
        kind.is_none() && none_held && f.open.load(Ordering::Acquire) && !self.is_inherited()
    }

    /// Close the fast path (the mutex is held, as `st`): its holds are
    /// taken over into the bookkeeping. On an error (the engine could not
    /// take a hold over) the path stays closed, and whatever it still
    /// holds stays where it is, for the next call to take over.
    #[inline(always)]
    pub(super) fn close_fast(&self, st: &mut State) -> Result<(), Error> {
        let f = &self.fast;
        // Relaxed: the gate is written by the mutex holder alone, and
        // every slot is emptied before it lets the mutex go.
        if !f.open.load(Ordering::Relaxed) && !f.busy() {
            return Ok(());
        }
        self.close_fast_slow(st)
    }

    #[cold]
    #[inline(never)]
    fn close_fast_slow(&self, st: &mut State) -> Result<(), Error> {
        let f = &self.fast;
        // F4: the first of the closer's pair, before its reads of the slots.
        f.open.store(false, Ordering::SeqCst);
        for slot in &f.slots {
            let mut spins = 0;
            loop {
                // F4: the second of the closer's pair.
                let w = slot.word.load(Ordering::SeqCst);
                match w & STATE {
                    FREE => break,
                    // F4: a take is a few instructions from its outcome.
                    CLAIMING => back_off(&mut spins),
                    _ => {
                        let Some((index, party, what)) = slot.fields(w) else {
                            continue;
                        };
                        if self.take_over(slot, w, index, party, what, st, &mut spins)? {
                            break;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Take the hold in `HELD` slot word `w` over into the bookkeeping
    /// (F3): `true` when the slot is empty after, taken over or let go.
    #[allow(clippy::too_many_arguments)]
    fn take_over(
        &self,
        slot: &Slot,
        w: u64,
        index: u64,
        party: u64,
        what: u64,
        st: &mut State,
        spins: &mut u32,
    ) -> Result<bool, Error> {
        let span = Span::from_checked(index, index + 1);
        let kind = if what & 1 != 0 {
            Kind::Exclusive
        } else {
            Kind::Shared
        };
        if !self.engine.fast_take_over(span, kind)? {
            // Let go meanwhile: its store is a step away.
            let since = std::time::Instant::now();
            while slot.word.load(Ordering::Acquire) == w {
                back_off(spins);
                if *spins % 1024 == 0 && since.elapsed() > GONE_PATIENCE {
                    // Not a release in flight (the table was written
                    // over): an error, never a hang, and the slot is left
                    // as it is.
                    return Err(Error::io(
                        "take over a fast hold",
                        std::io::Error::other("the hold is gone from the lock table"),
                    ));
                }
            }
            return Ok(true);
        }
        // F3: its release now fails, and no take claims the slot (F4).
        slot.word.store(next(w, FREE), Ordering::Release);
        let party = Party::from_id(party);
        let change = match what >> 1 {
            0 => Change::Guard {
                span,
                from: None,
                to: Some(kind),
            },
            handle => Change::Explicit {
                handle,
                span,
                kind: Some(kind),
            },
        };
        // F1: what the bookkeeping lacks; the engine holds it.
        st.apply(change, party);
        st.keep(change, party);
        Ok(true)
    }

    /// Open the fast path again if the owner is quiet (the mutex is held,
    /// as `st`, and about to go).
    #[inline]
    pub(super) fn reopen_fast(&self, st: &State) {
        let f = &self.fast;
        if f.lane
            // Relaxed: written by the mutex holder alone.
            && !f.open.load(Ordering::Relaxed)
            && st.holds.is_empty()
            && st.busy.is_empty()
            && st.stats.is_none()
            && st.parties.alone(crate::party::EVERYONE, &st.holds)
            && !self.is_inherited()
            && !f.busy()
        {
            f.open.store(true, Ordering::Release);
        }
    }
}
