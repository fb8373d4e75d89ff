//! An owner's lock statistics (`stats.rs`): switching recording on,
//! reading the figures, and the hooks the protocol calls where a piece
//! moves or a wait ends. Every hook is cold: the protocol's hot path only
//! tests whether the owner records.

use std::time::Instant;

use super::{Owner, State};
use crate::engine::Engine;
use crate::holds::{rank, Move, Step};
use crate::kind::Kind;
use crate::span::Span;
use crate::stats::{Event, Stats};

impl<E: Engine> Owner<E> {
    /// Record lock statistics from now on (`stats.rs`).
    pub(crate) fn record_stats(&self) {
        // Takes go the usual way from now on, and a fast hold is taken
        // over (its release then counted).
        self.fast.set_recording();
        let mut st = self.lock_closed_or_not();
        if st.stats.is_none() {
            st.stats = Some(Box::default());
        }
    }

    /// The statistics: the engine's table-wide ones if it keeps them
    /// (whether or not this owner records), else this owner's; `None`
    /// when there are none.
    pub(crate) fn stats(&self) -> Option<Stats> {
        if let Some(t) = self.engine.shared_stats() {
            return Some(t.read());
        }
        self.lock().stats.as_ref().map(|r| r.read())
    }

    /// Record a piece's move from `from` to `to`.
    #[cold]
    #[inline(never)]
    pub(super) fn note_move(
        &self,
        st: &mut State,
        span: Span,
        from: Option<Kind>,
        to: Option<Kind>,
    ) {
        if let Some(rec) = st.stats.as_mut() {
            let now = Instant::now();
            let raised = rank(to) > rank(from);
            rec.moved(
                self.engine.shared_stats(),
                span,
                raised,
                from.is_some(),
                to.is_some(),
                now,
            );
        }
    }

    /// Record a one-piece step (its kinds worked out here, off the hot
    /// path, which only tests whether there is a recording).
    #[cold]
    #[inline(never)]
    pub(super) fn note_step(&self, st: &mut State, step: &Step) {
        let (from, to) = step.kinds();
        self.note_move(st, step.span, from, to);
    }

    /// Record the moves of the change just applied.
    pub(super) fn note_moves(&self, st: &mut State) {
        if st.stats.is_some() {
            let moves = std::mem::take(&mut st.moves);
            for m in &moves {
                self.note_move(st, m.span, m.from, m.to);
            }
            st.moves = moves;
        }
    }

    /// Record `ev` for each of `spans`.
    #[cold]
    pub(super) fn note(&self, st: &mut State, spans: &[Move], ev: Event) {
        if let Some(rec) = st.stats.as_mut() {
            for m in spans {
                rec.note(self.engine.shared_stats(), m.span, ev);
            }
        }
    }
}
