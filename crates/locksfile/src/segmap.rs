//! A piecewise-constant map over the index space: the one data structure
//! of the bookkeeping (`holds`, `party`) and of the test engine.

use crate::span::{Span, INDEX_END};

/// A piecewise-constant map over the whole index space.
///
/// Sorted `(start, value)` pairs; the first starts at 0, each value runs to
/// the next start (or [`INDEX_END`]), and neighbours differ, so an owner
/// holding one lock is three entries and a vector beats a tree: it keeps its
/// buffer between calls and never allocates on the hot path. The one
/// exception, [`SegMap::set_within`], may leave a few equal neighbours
/// behind; [`SegMap::pieces`] shows them, and every reader merges.
#[derive(Clone, Debug)]
pub(crate) struct SegMap<V> {
    segs: Vec<(u64, V)>,
}

/// The largest map that [`SegMap::set_within`] leaves equal neighbours in
/// (the size up to which [`SegMap::find`] scans).
pub(crate) const LAZY_LEN: usize = 8;

impl<V: Copy + Eq + Default> SegMap<V> {
    pub fn new() -> Self {
        SegMap {
            segs: vec![(0, V::default())],
        }
    }

    #[inline]
    pub fn end_of(&self, i: usize) -> u64 {
        self.segs.get(i + 1).map_or(INDEX_END, |s| s.0)
    }

    /// Index of the segment containing `pos`.
    #[inline]
    pub fn find(&self, pos: u64) -> usize {
        // An owner usually holds a handful of pieces: a scan from the top
        // (where new locks go) beats a binary search there.
        if self.segs.len() <= LAZY_LEN {
            // The first segment starts at 0, so one is always found.
            return self.segs.iter().rposition(|s| s.0 <= pos).unwrap_or(0);
        }
        // The first segment starts at 0, so the partition point is >= 1.
        self.segs.partition_point(|s| s.0 <= pos) - 1
    }

    /// Make `pos` a segment boundary; returns the index of the segment
    /// that starts there (`len()` for `INDEX_END`).
    fn split(&mut self, pos: u64) -> usize {
        if pos >= INDEX_END {
            return self.segs.len();
        }
        let i = self.find(pos);
        if self.segs[i].0 == pos {
            return i;
        }
        let v = self.segs[i].1;
        self.segs.insert(i + 1, (pos, v));
        i + 1
    }

    /// Merge equal neighbours among segments `lo..=hi` (and their left neighbour).
    fn coalesce(&mut self, lo: usize, hi: usize) {
        let lo = lo.max(1);
        let hi = hi.min(self.segs.len() - 1);
        if lo > hi {
            return;
        }
        let mut w = lo;
        for r in lo..=hi {
            if self.segs[r].1 != self.segs[w - 1].1 {
                self.segs[w] = self.segs[r];
                w += 1;
            }
        }
        self.segs.drain(w..=hi);
    }

    /// Apply `f` to every value in `span`; `seen` gets each piece's span with
    /// its value before and after.
    pub fn update(
        &mut self,
        span: Span,
        mut f: impl FnMut(V) -> V,
        mut seen: impl FnMut(Span, V, V),
    ) {
        let i = self.find(span.start());
        if span.end() <= self.end_of(i) {
            // The usual case, one lock taken or dropped: the span lies in a
            // single segment, so patch it in place instead of splitting and
            // merging the general way.
            let old = self.segs[i].1;
            let new = f(old);
            seen(span, old, new);
            if new != old {
                self.replace_within(i, span, new);
            }
            return;
        }
        let i = self.split(span.start());
        let j = self.split(span.end());
        for k in i..j {
            let old = self.segs[k].1;
            let new = f(old);
            self.segs[k].1 = new;
            seen(Span::from_checked(self.segs[k].0, self.end_of(k)), old, new);
        }
        self.coalesce(i, j);
    }

    /// Set `span`, which lies inside segment `i`, to `new` (which differs
    /// from the segment's value), keeping the map coalesced. Out of line:
    /// the one-piece path mostly finds its piece ready (see `set_within`).
    #[inline(never)]
    fn replace_within(&mut self, i: usize, span: Span, new: V) {
        let (seg_start, old) = self.segs[i];
        let seg_end = self.end_of(i);
        let (a, b) = (span.start(), span.end());
        match (a == seg_start, b == seg_end) {
            (true, true) => {
                self.segs[i].1 = new;
                let next_same = self.segs.get(i + 1).is_some_and(|s| s.1 == new);
                let prev_same = i > 0 && self.segs[i - 1].1 == new;
                match (prev_same, next_same) {
                    (true, true) => {
                        // Both neighbours match: segments i and i+1 go.
                        if i + 2 < self.segs.len() {
                            self.segs.copy_within(i + 2.., i);
                        }
                        self.segs.truncate(self.segs.len() - 2);
                    }
                    (true, false) => drop(self.segs.remove(i)),
                    (false, true) => drop(self.segs.remove(i + 1)),
                    (false, false) => {}
                }
            }
            (true, false) => {
                if i > 0 && self.segs[i - 1].1 == new {
                    self.segs[i].0 = b;
                } else {
                    self.segs[i].1 = new;
                    self.insert(i + 1, (b, old));
                }
            }
            (false, true) => {
                if self.segs.get(i + 1).is_some_and(|s| s.1 == new) {
                    self.segs[i + 1].0 = a;
                } else {
                    self.insert(i + 1, (a, new));
                }
            }
            (false, false) => {
                self.segs.reserve(2);
                self.insert(i + 1, (a, new));
                self.insert(i + 2, (b, old));
            }
        }
    }

    /// Set `span`, which lies inside segment `i` (`whole`: is all of it), to
    /// `new` (which differs from the segment's value), as
    /// [`SegMap::replace_within`] does, except that a span that is its whole
    /// segment just takes the new value while
    /// the map is small, even if that leaves it equal to a neighbour. Taking
    /// and dropping the same lock again and again, the usual pattern, then
    /// moves no boundary at all after the first time. Only a map of at most
    /// [`LAZY_LEN`] entries keeps such a boundary, so there are never more
    /// than that many, and lookups stay a short scan.
    #[inline(always)]
    pub fn set_within(&mut self, i: usize, whole: bool, span: Span, new: V) {
        if whole && self.segs.len() <= LAZY_LEN {
            self.segs[i].1 = new;
        } else {
            self.replace_within(i, span, new);
        }
    }

    /// `Vec::insert`, minus the move of an empty tail: the new piece is
    /// usually the last (locks are taken above the highest one held).
    #[inline]
    fn insert(&mut self, i: usize, seg: (u64, V)) {
        if i == self.segs.len() {
            self.segs.push(seg);
        } else {
            self.segs.insert(i, seg);
        }
    }

    /// The pieces of `span` with their values; neighbours may be equal.
    pub fn pieces(&self, span: Span) -> impl Iterator<Item = (Span, V)> + '_ {
        let first = self.find(span.start());
        (first..self.segs.len())
            .take_while(move |&k| self.segs[k].0 < span.end())
            .map(move |k| {
                let start = self.segs[k].0.max(span.start());
                let end = self.end_of(k).min(span.end());
                (Span::from_checked(start, end), self.segs[k].1)
            })
    }

    /// Whether every value is the default.
    pub fn is_empty(&self) -> bool {
        self.segs.iter().all(|s| s.1 == V::default())
    }

    /// The `i`th piece's start and value.
    pub fn seg(&self, i: usize) -> (u64, V) {
        self.segs[i]
    }

    /// How many pieces the map keeps.
    #[cfg(test)]
    pub fn seg_count(&self) -> usize {
        self.segs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(a: u64, b: u64) -> Span {
        Span::new(a, b).unwrap()
    }

    #[test]
    fn segmap_splits_and_coalesces() {
        let mut m: SegMap<u8> = SegMap::new();
        m.update(span(5, 10), |v| v + 1, |_, _, _| {});
        m.update(span(10, 12), |v| v + 1, |_, _, _| {});
        assert_eq!(m.segs, vec![(0, 0), (5, 1), (12, 0)]);
        m.update(span(5, 12), |v| v - 1, |_, _, _| {});
        assert_eq!(m.segs, vec![(0, 0)]);
        assert!(m.is_empty());
        m.update(Span::to_end(3).unwrap(), |_| 7, |_, _, _| {});
        assert_eq!(m.segs, vec![(0, 0), (3, 7)]);
        let p: Vec<_> = m.pieces(span(1, 5)).collect();
        assert_eq!(p, vec![(span(1, 3), 0), (span(3, 5), 7)]);
    }
}
