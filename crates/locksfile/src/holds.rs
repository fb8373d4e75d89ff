//! Hold bookkeeping: who asked for what, and what the owner must hold.
//!
//! Pure data, no system calls. One owner (a handle in OFD mode, the
//! process's view of one file in process mode) holds a lock index at the
//! strongest kind any of its holders asked for: each guard is one holder,
//! and each handle's explicit `acquire`/`release` layer is one more, where
//! the last call wins. Applying a [`Change`] reports where that effective
//! kind moved, which is exactly the work left for the lock engine.

use crate::kind::Kind;
use crate::segmap::SegMap;
#[cfg(test)]
use crate::segmap::LAZY_LEN;
use crate::span::Span;

/// How many holders of each kind cover an index, plus the first handle's
/// explicit kind there.
///
/// The first handle's explicit layer lives inline (an OFD owner only ever
/// has that one handle), so its `acquire`/`release` update a single map;
/// further handles of a process-mode owner keep layers of their own and
/// count as holders here.
///
/// Packed in one word (readers in bits 0..30, writers in 30..60, the first
/// handle's kind in 60..62): the hot path copies, compares and updates it
/// with single instructions, and a map entry is two words.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counts(u64);

const READERS: u64 = (1 << 30) - 1;
const WRITERS: u64 = READERS << 30;
const FIRST_SHIFT: u32 = 60;
const FIRST: u64 = 0b11 << FIRST_SHIFT;
const FIRST_EXCLUSIVE: u64 = 2 << FIRST_SHIFT;

/// One holder of `kind`, as a count.
#[inline]
fn one(kind: Option<Kind>) -> u64 {
    match kind {
        None => 0,
        Some(Kind::Shared) => 1,
        Some(Kind::Exclusive) => 1 << 30,
    }
}
impl Counts {
    #[inline]
    pub fn effective(self) -> Option<Kind> {
        if self.0 & (WRITERS | FIRST_EXCLUSIVE) != 0 {
            Some(Kind::Exclusive)
        } else if self.0 != 0 {
            // Readers, or the first handle's shared lock.
            Some(Kind::Shared)
        } else {
            None
        }
    }

    /// One holder moves from `from` to `to`.
    #[inline]
    fn with(self, from: Option<Kind>, to: Option<Kind>) -> Counts {
        let (down, up) = (one(from), one(to));
        debug_assert!(self.0 & (READERS | WRITERS) >= down, "no such holder");
        let n = self.0 - down;
        // A billion holders of one index would carry into the next field.
        assert!(
            (n & READERS) != READERS && (n & WRITERS) != WRITERS,
            "too many holders of one lock"
        );
        Counts(n + up)
    }

    /// The first handle's explicit kind.
    fn first(self) -> Option<Kind> {
        match self.0 >> FIRST_SHIFT {
            0 => None,
            1 => Some(Kind::Shared),
            _ => Some(Kind::Exclusive),
        }
    }

    #[inline]
    fn with_first(self, kind: Option<Kind>) -> Counts {
        let bits = match kind {
            None => 0,
            Some(Kind::Shared) => 1,
            Some(Kind::Exclusive) => 2,
        };
        Counts((self.0 & !FIRST) | (bits << FIRST_SHIFT))
    }
}

/// Identifies one handle's explicit layer among the owner's.
pub(crate) type HandleId = u64;

/// One change to an owner's holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Change {
    /// A guard on `span` goes from `from` to `to` (`None` is no guard).
    Guard {
        span: Span,
        from: Option<Kind>,
        to: Option<Kind>,
    },
    /// A handle's explicit layer is set to `kind` over `span` (last call wins).
    Explicit {
        handle: HandleId,
        span: Span,
        kind: Option<Kind>,
    },
}

impl Change {
    pub fn span(&self) -> Span {
        match *self {
            Change::Guard { span, .. } | Change::Explicit { span, .. } => span,
        }
    }
}

/// Where the effective kind moved, piece by piece.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Move {
    pub span: Span,
    pub from: Option<Kind>,
    pub to: Option<Kind>,
}

impl Move {
    fn between(span: Span, old: Counts, new: Counts) -> Move {
        Move {
            span,
            from: old.effective(),
            to: new.effective(),
        }
    }

    pub fn is_raise(&self) -> bool {
        rank(self.to) > rank(self.from)
    }
}

/// Orders `None < Shared < Exclusive`.
#[inline]
pub(crate) fn rank(k: Option<Kind>) -> u8 {
    match k {
        None => 0,
        Some(Kind::Shared) => 1,
        Some(Kind::Exclusive) => 2,
    }
}

/// Append a move, merging it into the previous one when they touch and
/// move between the same two kinds, so one kernel call covers both.
///
/// Both kinds must match, not only the target: a raise that another owner
/// refuses part-way is rolled back move by move to each move's `from`, so a
/// merged "none and shared to exclusive" would come back as one kind and
/// drop (or leak) the other piece's lock in the kernel.
fn push_move(out: &mut Vec<Move>, m: Move) {
    if m.from == m.to {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.span.end() == m.span.start() && last.to == m.to && last.from == m.from {
            last.span = Span::from_checked(last.span.start(), m.span.end());
            return;
        }
    }
    out.push(m);
}

/// A change that lies inside one piece of the map, worked out by
/// [`Holds::one_piece`] but not made yet: the common case, one lock taken or
/// dropped by a guard or by the first handle.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Step {
    /// The piece's index in the map.
    i: usize,
    /// Whether the span is the whole piece.
    whole: bool,
    pub span: Span,
    old: Counts,
    new: Counts,
}

impl Step {
    /// Where the effective kind moves (`from == to` when it stays).
    #[inline]
    pub fn kinds(&self) -> (Option<Kind>, Option<Kind>) {
        (self.old.effective(), self.new.effective())
    }
}

/// Pieces with neighbours of equal kind merged.
fn merged(pieces: impl Iterator<Item = (Span, Option<Kind>)>) -> Vec<(Span, Option<Kind>)> {
    let mut out: Vec<(Span, Option<Kind>)> = Vec::new();
    for (s, k) in pieces {
        match out.last_mut() {
            Some((last, lk)) if *lk == k => *last = Span::from_checked(last.start(), s.end()),
            _ => out.push((s, k)),
        }
    }
    out
}

/// What an applied change needs to be taken back. Valid only until the
/// next [`Holds::apply`]: an explicit change's old layer lives in a buffer
/// of `Holds` that is reused, so the hot path never allocates.
pub(crate) enum Undo {
    Guard(Change),
    Explicit { handle: HandleId },
}

/// The handle whose explicit layer lives inline in [`Counts`].
pub(crate) const FIRST_HANDLE: HandleId = 1;

/// All holds of one owner.
#[derive(Debug)]
pub(crate) struct Holds {
    counts: SegMap<Counts>,
    explicit: Vec<(HandleId, SegMap<Option<Kind>>)>,
    /// The explicit layer as it was before the last explicit change.
    before: Vec<(Span, Option<Kind>)>,
}

impl Holds {
    pub fn new() -> Self {
        Holds {
            counts: SegMap::new(),
            explicit: Vec::new(),
            before: Vec::new(),
        }
    }

    fn layer(&mut self, handle: HandleId) -> &mut SegMap<Option<Kind>> {
        let i = match self.explicit.iter().position(|(h, _)| *h == handle) {
            Some(i) => i,
            None => {
                self.explicit.push((handle, SegMap::new()));
                self.explicit.len() - 1
            }
        };
        &mut self.explicit[i].1
    }

    /// Apply `change`, appending the effective moves to `moves`.
    pub fn apply(&mut self, change: Change, moves: &mut Vec<Move>) -> Undo {
        match change {
            Change::Guard { span, from, to } => {
                self.count(span, from, to, moves);
                Undo::Guard(change)
            }
            Change::Explicit { handle, span, kind } if handle == FIRST_HANDLE => {
                let before = &mut self.before;
                before.clear();
                self.counts.update(
                    span,
                    |c| c.with_first(kind),
                    |piece, old, new| {
                        before.push((piece, old.first()));
                        push_move(moves, Move::between(piece, old, new))
                    },
                );
                Undo::Explicit { handle }
            }
            Change::Explicit { handle, span, kind } => {
                let mut before = std::mem::take(&mut self.before);
                before.clear();
                let layer = self.layer(handle);
                before.extend(layer.pieces(span));
                layer.update(span, |_| kind, |_, _, _| {});
                for &(piece, old) in &before {
                    self.count(piece, old, kind, moves);
                }
                self.before = before;
                Undo::Explicit { handle }
            }
        }
    }

    /// Work out a change inside one piece of the map with no separate
    /// explicit layer, without making it; `None` sends it the general way.
    /// Only the step's own move reaches the engine, and [`Holds::commit`]
    /// makes it afterwards, so a refused call needs no undo.
    #[inline(always)]
    pub fn one_piece(&self, change: Change) -> Option<Step> {
        let span = change.span();
        let i = self.counts.find(span.start());
        let end = self.counts.end_of(i);
        if span.end() > end {
            return None;
        }
        let (start, old) = self.counts.seg(i);
        let new = match change {
            Change::Guard { from, to, .. } => old.with(from, to),
            Change::Explicit { handle, kind, .. } if handle == FIRST_HANDLE => old.with_first(kind),
            Change::Explicit { .. } => return None,
        };
        let whole = span.start() == start && span.end() == end;
        Some(Step {
            i,
            whole,
            span,
            old,
            new,
        })
    }

    /// Make a step from [`Holds::one_piece`], with nothing applied since.
    #[inline]
    pub fn commit(&mut self, step: Step) {
        if step.new != step.old {
            self.counts
                .set_within(step.i, step.whole, step.span, step.new);
        }
    }

    /// Take back a change made by [`Holds::apply`].
    pub fn undo(&mut self, undo: Undo) {
        let mut ignored = Vec::new();
        match undo {
            Undo::Guard(Change::Guard { span, from, to }) => {
                self.count(span, to, from, &mut ignored)
            }
            Undo::Guard(Change::Explicit { .. }) => unreachable!("explicit changes undo by layer"),
            Undo::Explicit { handle } if handle == FIRST_HANDLE => {
                for (piece, old) in std::mem::take(&mut self.before) {
                    self.counts
                        .update(piece, |c| c.with_first(old), |_, _, _| {});
                }
            }
            Undo::Explicit { handle } => {
                for (piece, old) in std::mem::take(&mut self.before) {
                    let layer = self.layer(handle);
                    let now: Vec<_> = layer.pieces(piece).collect();
                    layer.update(piece, |_| old, |_, _, _| {});
                    for (p, cur) in now {
                        self.count(p, cur, old, &mut ignored);
                    }
                }
            }
        }
    }

    fn count(&mut self, span: Span, from: Option<Kind>, to: Option<Kind>, moves: &mut Vec<Move>) {
        if from == to {
            return;
        }
        self.counts.update(
            span,
            |c| c.with(from, to),
            |piece, old, new| push_move(moves, Move::between(piece, old, new)),
        );
    }

    /// The owner's effective kind over `span`, piece by piece (`None` = unlocked).
    /// Neighbouring pieces of equal kind are merged.
    pub fn effective(&self, span: Span) -> Vec<(Span, Option<Kind>)> {
        merged(self.counts.pieces(span).map(|(s, c)| (s, c.effective())))
    }

    /// The handle's explicit layer over `span`.
    pub fn explicit(&self, handle: HandleId, span: Span) -> Vec<(Span, Option<Kind>)> {
        if handle == FIRST_HANDLE {
            return merged(self.counts.pieces(span).map(|(s, c)| (s, c.first())));
        }
        match self.explicit.iter().find(|(h, _)| *h == handle) {
            Some((_, layer)) => layer.pieces(span).collect(),
            None => vec![(span, None)],
        }
    }

    /// The owner's counts, piece by piece.
    pub fn counts(&self) -> &SegMap<Counts> {
        &self.counts
    }

    /// Make on `map` what the change applied last made on the owner's
    /// counts: one party's share of them.
    pub fn replay(&self, change: Change, map: &mut SegMap<Counts>) {
        match change {
            Change::Guard { span, from, to } => {
                if from != to {
                    map.update(span, |c| c.with(from, to), |_, _, _| {});
                }
            }
            Change::Explicit { handle, span, kind } if handle == FIRST_HANDLE => {
                map.update(span, |c| c.with_first(kind), |_, _, _| {});
            }
            Change::Explicit { kind, .. } => {
                for &(piece, old) in &self.before {
                    if old != kind {
                        map.update(piece, |c| c.with(old, kind), |_, _, _| {});
                    }
                }
            }
        }
    }

    /// Forget a handle's (already released) explicit layer.
    pub fn drop_layer(&mut self, handle: HandleId) {
        self.explicit.retain(|(h, _)| *h != handle);
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(a: u64, b: u64) -> Span {
        Span::new(a, b).unwrap()
    }

    #[test]
    fn explicit_last_call_wins_and_guards_compose() {
        let mut h = Holds::new();
        let mut mv = Vec::new();
        h.apply(
            Change::Explicit {
                handle: 1,
                span: span(0, 4),
                kind: Some(Kind::Exclusive),
            },
            &mut mv,
        );
        assert_eq!(mv.len(), 1);
        assert!(mv[0].is_raise());
        mv.clear();
        h.apply(
            Change::Guard {
                span: span(2, 6),
                from: None,
                to: Some(Kind::Shared),
            },
            &mut mv,
        );
        // Only 4..6 moved: 2..4 stays exclusive.
        assert_eq!(
            mv,
            vec![Move {
                span: span(4, 6),
                from: None,
                to: Some(Kind::Shared)
            }]
        );
        mv.clear();
        h.apply(
            Change::Explicit {
                handle: 1,
                span: span(0, 4),
                kind: Some(Kind::Shared),
            },
            &mut mv,
        );
        assert_eq!(
            mv,
            vec![Move {
                span: span(0, 4),
                from: Some(Kind::Exclusive),
                to: Some(Kind::Shared)
            }]
        );
        let eff = h.effective(span(0, 8));
        assert_eq!(
            eff,
            vec![(span(0, 6), Some(Kind::Shared)), (span(6, 8), None)]
        );
    }

    /// Raises from different kinds stay separate moves, so a rollback can
    /// put each piece back to its own kind.
    #[test]
    fn raises_from_different_kinds_stay_apart() {
        let mut h = Holds::new();
        let mut mv = Vec::new();
        let shared_3 = Change::Guard {
            span: span(3, 4),
            from: None,
            to: Some(Kind::Shared),
        };
        h.apply(shared_3, &mut mv);
        mv.clear();
        h.apply(
            Change::Explicit {
                handle: FIRST_HANDLE,
                span: span(0, 6),
                kind: Some(Kind::Exclusive),
            },
            &mut mv,
        );
        let ex = Some(Kind::Exclusive);
        assert_eq!(
            mv,
            vec![
                Move {
                    span: span(0, 3),
                    from: None,
                    to: ex
                },
                Move {
                    span: span(3, 4),
                    from: Some(Kind::Shared),
                    to: ex
                },
                Move {
                    span: span(4, 6),
                    from: None,
                    to: ex
                },
            ]
        );
    }

    /// Taking and dropping one lock after another through the one-piece
    /// path leaves at most a few boundaries behind, never one per lock, and
    /// readers still see merged pieces and an empty map.
    #[test]
    fn one_piece_steps_leave_few_boundaries() {
        let mut h = Holds::new();
        let ex = Some(Kind::Exclusive);
        for i in 0..100 {
            for (from, to) in [(None, ex), (ex, None)] {
                let change = Change::Guard {
                    span: span(i, i + 1),
                    from,
                    to,
                };
                let step = match h.one_piece(change) {
                    Some(step) => step,
                    // Across a boundary left behind: the general way.
                    None => {
                        h.apply(change, &mut Vec::new());
                        continue;
                    }
                };
                h.commit(step);
            }
            assert!(h.counts.seg_count() <= LAZY_LEN + 2, "{:?}", h.counts);
            assert!(h.is_empty());
            assert_eq!(h.effective(Span::ALL), vec![(Span::ALL, None)]);
        }
        let held = Change::Guard {
            span: span(40, 42),
            from: None,
            to: ex,
        };
        h.apply(held, &mut Vec::new());
        assert!(!h.is_empty());
        assert_eq!(
            h.effective(span(30, 50)),
            vec![
                (span(30, 40), None),
                (span(40, 42), ex),
                (span(42, 50), None)
            ]
        );
    }

    #[test]
    fn undo_restores_counts() {
        for handle in [FIRST_HANDLE, FIRST_HANDLE + 1] {
            undo_restores_counts_for(handle);
        }
    }

    fn undo_restores_counts_for(handle: HandleId) {
        let mut h = Holds::new();
        let mut mv = Vec::new();
        h.apply(
            Change::Explicit {
                handle,
                span: span(0, 2),
                kind: Some(Kind::Shared),
            },
            &mut mv,
        );
        let u = h.apply(
            Change::Explicit {
                handle,
                span: span(1, 3),
                kind: Some(Kind::Exclusive),
            },
            &mut mv,
        );
        h.undo(u);
        let eff = h.effective(span(0, 3));
        assert_eq!(
            eff,
            vec![(span(0, 2), Some(Kind::Shared)), (span(2, 3), None)]
        );
        assert_eq!(
            h.explicit(handle, span(0, 3)),
            vec![(span(0, 2), Some(Kind::Shared)), (span(2, 3), None)]
        );
    }
}
