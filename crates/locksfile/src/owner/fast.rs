//! The owner's fast path: one index, one holder, no mutex.
//!
//! While the owner holds nothing and nothing else goes on (no thread
//! waits, no statistics are recorded), a take of one index is made on the
//! engine's fast lane ([`Engine::fast_take`]) and recorded in one word of
//! the owner instead of the bookkeeping, and its release is the engine's
//! [`Engine::fast_release`] and one store: no mutex, no map, no allocation.
//! Anything else takes the mutex, which first *closes* the fast path,
//! taking a fast hold over into the bookkeeping (`close`); the mutex
//! holder opens it again when the owner is quiet once more (`reopen`).
//!
//! # The word
//!
//! Two bits of state and a generation above them, which every change but
//! a refused claim's return moves on, so that no state value comes back:
//!
//! | from | to | by | how |
//! |---|---|---|---|
//! | `OPEN(g)` | `CLAIMING(g)` | a fast take | CAS: only one take at a time |
//! | `CLAIMING(g)` | `HELD(g+1)` | that take, granted by the engine | store, after the hold's fields |
//! | `CLAIMING(g)` | `OPEN(g)` | that take, refused | store: nothing changed |
//! | `HELD(g)` | `OPEN(g+1)` | the release of that hold | store, after the engine let it go |
//! | `OPEN(g)` | `CLOSED(g+1)` | the mutex holder | CAS |
//! | `HELD(g)` | `CLOSED(g+1)` | the mutex holder, taking it over | CAS, after the engine made the hold one its release cannot let go |
//! | `CLOSED(g)` | `OPEN(g+1)` | the mutex holder, the owner quiet | store |
//!
//! Why it holds:
//! - **F1** `OPEN` and `HELD` only while the bookkeeping is empty and the
//!   owner quiet: the mutex holder closes the word before it looks at the
//!   bookkeeping, and opens it only when it leaves the owner quiet.
//! - **F2** A hold's fields are written while the word is `CLAIMING` (by
//!   the one take that claimed it) and read as a seqlock's data: read
//!   between two loads of the word that find the same `HELD` value.
//! - **F3** A `HELD` word leaves that state by one of two ways that
//!   exclude each other, decided by the engine's word for the index: its
//!   release (the engine's `fast_release` succeeds, then `OPEN` is
//!   stored) or its take-over (the engine's `fast_take_over` makes that
//!   release fail, then the mutex holder's CAS). A take-over that finds
//!   the hold let go waits for the release's store (a step away); if it
//!   does not come (the engine lost the hold some other way, as a table
//!   written over could), the call fails rather than hang.
//! - **F4** The mutex holder waits out a `CLAIMING` word (a take is a few
//!   atomic instructions away from storing its outcome) and never calls the
//!   engine while one is in flight, but for the race F3 allows: a release,
//!   then a new take of the same index between the take-over's read of
//!   the fields and its engine call. The take-over then makes the new
//!   take's word a record, its CAS fails on the new word, and it looks
//!   again; the new take, if its engine call was cut short by that,
//!   goes the usual way, which raises afresh. The engine may then hold
//!   more than the bookkeeping says (the record of a word its take gave
//!   up): once the word is closed, the mutex holder sets each span it
//!   raced on to what the bookkeeping says (`put_right`), so that the
//!   excess lasts only in between and delays other owners at most.

use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};

use super::{Owner, State};
use crate::engine::Engine;
use crate::error::Error;
use crate::holds::{Change, HandleId};
use crate::kind::Kind;
use crate::party::Party;
use crate::span::Span;

const STATE: u64 = 0b11;
const CLOSED: u64 = 0;
const OPEN: u64 = 1;
const CLAIMING: u64 = 2;
const HELD: u64 = 3;
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

/// The owner's fast path's word and its hold's fields, on a line of
/// their own.
#[repr(align(64))]
pub(super) struct Fast {
    word: AtomicU64,
    /// The held index.
    index: AtomicU64,
    /// The party it is held for.
    party: AtomicU64,
    /// See [`what`].
    what: AtomicU64,
    /// The owner records statistics: no take goes the fast way.
    recording: AtomicBool,
    /// The engine has a fast lane.
    lane: bool,
}

impl Fast {
    pub(super) fn new(lane: bool) -> Fast {
        Fast {
            word: AtomicU64::new(if lane { OPEN } else { CLOSED }),
            index: AtomicU64::new(0),
            party: AtomicU64::new(0),
            what: AtomicU64::new(0),
            recording: AtomicBool::new(false),
            lane,
        }
    }

    pub(super) fn set_recording(&self) {
        self.recording.store(true, Ordering::Relaxed);
    }

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

    /// Whether the owner holds something on the fast path (or is taking it).
    pub(super) fn busy(&self) -> bool {
        self.word.load(Ordering::Acquire) & STATE >= CLAIMING
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
        // Relaxed: the CAS below decides.
        let w = f.word.load(Ordering::Relaxed);
        if w & STATE != OPEN
            || span.end() - span.start() != 1
            || f.recording.load(Ordering::Relaxed)
            || self.is_inherited()
            || (kind == Kind::Exclusive && !self.engine.writable())
            || self.engine.check_span(span, true).is_err()
            || self.engine.locks_lost().is_some()
        {
            return false;
        }
        let claiming = (w & !STATE) | CLAIMING;
        if f.word
            .compare_exchange(w, claiming, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        // F2: the seqlock writer's fence, before the fields.
        fence(Ordering::Release);
        if !self.engine.fast_take(span, kind) {
            // Refused (or taken away at once): nothing changed here.
            f.word.store(w, Ordering::Release);
            return false;
        }
        f.index.store(span.start(), Ordering::Relaxed);
        f.party.store(party.id(), Ordering::Relaxed);
        f.what.store(what(layer, kind), Ordering::Relaxed);
        f.word.store(next(w, HELD), Ordering::Release);
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
        let w = f.word.load(Ordering::Acquire);
        if w & STATE != HELD {
            // F1: open, the owner holds nothing, so an explicit release
            // has nothing to do (as the usual way would find), but in a
            // forked child, which the usual way refuses.
            return kind.is_none() && w & STATE == OPEN && !self.is_inherited();
        }
        let Some((index, p, wh)) = f.fields(w) else {
            return false;
        };
        let (expected, mask) = match kind {
            Some(k) => (what(layer, k), !0),
            None => (what(layer, Kind::Shared), !1),
        };
        if index != span.start()
            || span.end() - span.start() != 1
            || p != party.id()
            || (wh ^ expected) & mask != 0
            || self.is_inherited()
        {
            return false;
        }
        // F3: the engine decides between this release and a take-over.
        if !self.engine.fast_release(span) {
            return false;
        }
        f.word.store(next(w, OPEN), Ordering::Release);
        true
    }

    /// Close the fast path (the mutex is held, as `st`): a fast hold is
    /// taken over into the bookkeeping. On an error (the engine could not
    /// take the hold over) the path stays as it was.
    pub(super) fn close_fast(&self, st: &mut State) -> Result<(), Error> {
        // Spans a take-over went to the engine for and then found the hold
        // gone or replaced (F4): put right once the word is closed.
        let mut raced: Vec<Span> = Vec::new();
        let r = self.close_fast_noting(st, &mut raced);
        if r.is_ok() {
            self.put_right(st, &raced);
        }
        r
    }

    /// After a take-over raced a release and a new take (F4), the engine
    /// may hold an index the bookkeeping does not, or more strongly: the
    /// take-over made a record of a word its caller then gave up. With the
    /// word closed and the mutex held no fast call runs, and the
    /// bookkeeping is the truth: each such span is set to what it says (a
    /// lowering, never refused). A take cut short goes the usual way once
    /// the mutex is free, and raises afresh.
    #[cold]
    fn put_right(&self, st: &State, raced: &[Span]) {
        for &span in raced {
            let want = st.holds.effective(span).first().and_then(|&(_, k)| k);
            let _ = self.engine.try_set(span, want);
        }
    }

    fn close_fast_noting(&self, st: &mut State, raced: &mut Vec<Span>) -> Result<(), Error> {
        let f = &self.fast;
        let mut spins = 0;
        loop {
            let w = f.word.load(Ordering::Acquire);
            match w & STATE {
                CLOSED => return Ok(()),
                OPEN => {
                    if f.word
                        .compare_exchange(w, next(w, CLOSED), Ordering::AcqRel, Ordering::Relaxed)
                        .is_ok()
                    {
                        return Ok(());
                    }
                }
                // F4: a take is a few instructions from its outcome.
                CLAIMING => back_off(&mut spins),
                _ => {
                    let Some((index, party, what)) = f.fields(w) else {
                        continue;
                    };
                    let span = Span::from_checked(index, index + 1);
                    let kind = if what & 1 != 0 {
                        Kind::Exclusive
                    } else {
                        Kind::Shared
                    };
                    // F3.
                    if !self.engine.fast_take_over(span, kind)? {
                        raced.push(span);
                        // Let go meanwhile: its store is a step away.
                        let since = std::time::Instant::now();
                        while f.word.load(Ordering::Acquire) == w {
                            back_off(&mut spins);
                            if spins % 1024 == 0 && since.elapsed() > GONE_PATIENCE {
                                // Not a release in flight (the table was
                                // written over): an error, never a hang,
                                // and the word is left as it is.
                                return Err(Error::io(
                                    "take over a fast hold",
                                    std::io::Error::other("the hold is gone from the lock table"),
                                ));
                            }
                        }
                        continue;
                    }
                    if f.word
                        .compare_exchange(w, next(w, CLOSED), Ordering::AcqRel, Ordering::Relaxed)
                        .is_err()
                    {
                        // F4: a new hold; look again.
                        raced.push(span);
                        continue;
                    }
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
                    // F1: the bookkeeping was empty; the engine holds it.
                    st.apply(change, party);
                    st.keep(change, party);
                    return Ok(());
                }
            }
        }
    }

    /// Open the fast path again if the owner is quiet (the mutex is held,
    /// as `st`, and about to go).
    #[inline]
    pub(super) fn reopen_fast(&self, st: &State) {
        let f = &self.fast;
        if f.lane
            && st.holds.is_empty()
            && st.busy.is_empty()
            && st.stats.is_none()
            && st.parties.alone(crate::party::EVERYONE, &st.holds)
            && !self.is_inherited()
        {
            // Relaxed: only the mutex holder writes a closed word.
            let w = f.word.load(Ordering::Relaxed);
            if w & STATE == CLOSED {
                f.word.store(next(w, OPEN), Ordering::Release);
            }
        }
    }
}
