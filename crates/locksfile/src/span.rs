//! Spans of lock indices: lock `n` is byte `n` of the lock file.

use std::fmt;

/// One past the last lock index: indices run from 0 to `i64::MAX - 1`.
///
/// A span that ends here is "to the end of the index space", which the
/// kernel spells as a length of 0.
pub const INDEX_END: u64 = i64::MAX as u64;

/// A non-empty run of consecutive lock indices, `start..end`.
///
/// Build one from anything that implements [`IntoSpan`](crate::IntoSpan):
/// a single index, `a..b`, `a..=b`, `a..`, `..`, or a `(start, count)`
/// pair as in the original `pylocksfile`. Every constructor checks its
/// input, so a `Span` always fits the kernel's `off_t` arithmetic.
///
/// ```
/// use locksfile::{IntoSpan, Span};
/// assert_eq!(5.into_span()?, Span::new(5, 6)?);
/// assert_eq!((2, 3).into_span()?, (2..5).into_span()?);
/// assert!((7..7).into_span().is_err());
/// assert!((10..).into_span()?.is_to_end());
/// # Ok::<(), locksfile::Error>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Span {
    start: u64,
    end: u64,
}

impl Span {
    /// Every lock index.
    pub const ALL: Span = Span {
        start: 0,
        end: INDEX_END,
    };

    /// First index.
    #[inline]
    pub fn start(&self) -> u64 {
        self.start
    }

    /// One past the last index (`INDEX_END` for a span to the end).
    #[inline]
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Number of indices.
    pub fn count(&self) -> u64 {
        self.end - self.start
    }

    /// Whether the span runs to the end of the index space.
    #[inline]
    pub fn is_to_end(&self) -> bool {
        self.end == INDEX_END
    }

    /// Whether `index` lies in the span.
    pub fn contains(&self, index: u64) -> bool {
        self.start <= index && index < self.end
    }

    /// The part shared with `other`, if any.
    pub fn intersect(&self, other: Span) -> Option<Span> {
        let start = self.start.max(other.start);
        let end = self.end.min(other.end);
        (start < end).then_some(Span { start, end })
    }

    /// Built from bounds the caller has already checked (`start < end <= INDEX_END`).
    #[inline]
    pub(crate) fn from_checked(start: u64, end: u64) -> Span {
        debug_assert!(start < end && end <= INDEX_END);
        Span { start, end }
    }

    /// The kernel's spelling: a length of 0 means "to the end".
    #[inline]
    pub(crate) fn to_sys(self) -> crate::sys::Range {
        crate::sys::Range {
            start: self.start as i64,
            len: if self.is_to_end() {
                0
            } else {
                (self.end - self.start) as i64
            },
        }
    }

    /// The kernel's range back as a span, clipped to the index space.
    pub(crate) fn from_sys(range: crate::sys::Range) -> Span {
        let start = (range.start.max(0) as u64).min(INDEX_END - 1);
        let end = if range.len <= 0 {
            INDEX_END
        } else {
            start.saturating_add(range.len as u64).min(INDEX_END)
        };
        Span::from_checked(start, end.max(start + 1))
    }
}

impl fmt::Debug for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_to_end() {
            write!(f, "{}..", self.start)
        } else if self.count() == 1 {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}..{}", self.start, self.end)
        }
    }
}
