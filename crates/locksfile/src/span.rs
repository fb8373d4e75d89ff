//! Spans of lock indices: lock `n` is byte `n` of the lock file.

use std::fmt;
use std::ops::{Range, RangeFrom, RangeFull, RangeInclusive, RangeTo, RangeToInclusive};

use crate::error::{Error, SpanError};

/// One past the last lock index: indices run from 0 to `i64::MAX - 1`.
///
/// A span that ends here is "to the end of the index space", which the
/// kernel spells as a length of 0.
pub const INDEX_END: u64 = i64::MAX as u64;

/// A non-empty run of consecutive lock indices, `start..end`.
///
/// Build one from anything that implements [`IntoSpan`]: a single index,
/// `a..b`, `a..=b`, `a..`, `..`, or a `(start, count)` pair as in the
/// original `pylocksfile`. Every constructor checks its input, so a `Span`
/// always fits the kernel's `off_t` arithmetic.
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
    /// The span `start..end`.
    ///
    /// # Errors
    /// [`Error::InvalidSpan`] when `end <= start` or `end > INDEX_END`.
    #[inline]
    pub fn new(start: u64, end: u64) -> Result<Span, Error> {
        if end > INDEX_END || start >= INDEX_END {
            return Err(Error::InvalidSpan(SpanError::Overflow));
        }
        if end == start {
            return Err(Error::InvalidSpan(SpanError::Empty));
        }
        if end < start {
            return Err(Error::InvalidSpan(SpanError::Reversed));
        }
        Ok(Span { start, end })
    }

    /// `count` indices from `start`, as in the original's `(start, count)`.
    ///
    /// # Errors
    /// [`Error::InvalidSpan`] when `count` is 0 or the span passes `INDEX_END`.
    pub fn with_count(start: u64, count: u64) -> Result<Span, Error> {
        if count == 0 {
            return Err(Error::InvalidSpan(SpanError::Empty));
        }
        let end = start
            .checked_add(count)
            .ok_or(Error::InvalidSpan(SpanError::Overflow))?;
        Span::new(start, end)
    }

    /// Every index from `start` to the end of the index space.
    ///
    /// # Errors
    /// [`Error::InvalidSpan`] when `start >= INDEX_END`.
    pub fn to_end(start: u64) -> Result<Span, Error> {
        Span::new(start, INDEX_END)
    }

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

/// Anything that names a span of lock indices: an index, a range of
/// indices (`a..b`, `a..=b`, `a..`, `..b`, `..=b`, `..`) of any integer
/// type, `(start, count)`, or a [`Span`].
///
/// An unsuffixed literal is an `i32`, as everywhere in Rust: write
/// `1u64 << 40` for an index past `i32::MAX`. Negative indices are refused
/// ([`SpanError::Negative`](crate::SpanError::Negative)).
///
/// ```
/// use locksfile::IntoSpan;
/// let rows: std::ops::Range<usize> = 10..20;
/// assert_eq!(rows.into_span()?, (10u64..20).into_span()?);
/// assert_eq!((4, 2).into_span()?.to_string(), "4..6");
/// assert!((-1).into_span().is_err());
/// # Ok::<(), locksfile::Error>(())
/// ```
pub trait IntoSpan {
    /// Check and convert.
    ///
    /// # Errors
    /// [`Error::InvalidSpan`] for an empty, reversed or overflowing span.
    fn into_span(self) -> Result<Span, Error>;
}

impl IntoSpan for Span {
    #[inline]
    fn into_span(self) -> Result<Span, Error> {
        Ok(self)
    }
}

/// A single index.
impl IntoSpan for u64 {
    #[inline]
    fn into_span(self) -> Result<Span, Error> {
        if self < INDEX_END {
            Ok(Span {
                start: self,
                end: self + 1,
            })
        } else {
            Err(Error::InvalidSpan(SpanError::Overflow))
        }
    }
}

impl IntoSpan for Range<u64> {
    #[inline]
    fn into_span(self) -> Result<Span, Error> {
        Span::new(self.start, self.end)
    }
}

impl IntoSpan for RangeInclusive<u64> {
    fn into_span(self) -> Result<Span, Error> {
        let (start, last) = self.into_inner();
        if last < start {
            return Err(Error::InvalidSpan(SpanError::Reversed));
        }
        let end = last
            .checked_add(1)
            .ok_or(Error::InvalidSpan(SpanError::Overflow))?;
        Span::new(start, end)
    }
}

impl IntoSpan for RangeFrom<u64> {
    fn into_span(self) -> Result<Span, Error> {
        Span::to_end(self.start)
    }
}

impl IntoSpan for RangeTo<u64> {
    fn into_span(self) -> Result<Span, Error> {
        Span::new(0, self.end)
    }
}

impl IntoSpan for RangeToInclusive<u64> {
    fn into_span(self) -> Result<Span, Error> {
        (0..=self.end).into_span()
    }
}

impl IntoSpan for RangeFull {
    fn into_span(self) -> Result<Span, Error> {
        Ok(Span::ALL)
    }
}

/// `(start, count)`, as in the original `pylocksfile`.
impl IntoSpan for (u64, u64) {
    fn into_span(self) -> Result<Span, Error> {
        Span::with_count(self.0, self.1)
    }
}

/// An index of any integer type as a `u64`; negative ones are refused.
#[inline]
fn index<T: TryInto<u64> + Copy + PartialOrd + Default>(i: T) -> Result<u64, Error> {
    if i < T::default() {
        return Err(Error::InvalidSpan(SpanError::Negative));
    }
    // Every non-negative value of the integer types below fits in a u64
    // (u128 and i128 past it are past the last lock index anyway).
    i.try_into()
        .map_err(|_| Error::InvalidSpan(SpanError::Overflow))
}

/// Indices of every other integer type name the same spans as `u64` ones,
/// so `usize` indices and unsuffixed literals (`i32` by default) work;
/// a negative index is an [`SpanError::Negative`] error.
macro_rules! integer_spans {
    ($($t:ty),*) => {$(
        impl IntoSpan for $t {
            #[inline]
            fn into_span(self) -> Result<Span, Error> {
                index(self)?.into_span()
            }
        }

        impl IntoSpan for Range<$t> {
            #[inline]
            fn into_span(self) -> Result<Span, Error> {
                (index(self.start)?..index(self.end)?).into_span()
            }
        }

        impl IntoSpan for RangeInclusive<$t> {
            fn into_span(self) -> Result<Span, Error> {
                let (start, last) = self.into_inner();
                (index(start)?..=index(last)?).into_span()
            }
        }

        impl IntoSpan for RangeFrom<$t> {
            fn into_span(self) -> Result<Span, Error> {
                (index(self.start)?..).into_span()
            }
        }

        impl IntoSpan for RangeTo<$t> {
            fn into_span(self) -> Result<Span, Error> {
                (..index(self.end)?).into_span()
            }
        }

        impl IntoSpan for RangeToInclusive<$t> {
            fn into_span(self) -> Result<Span, Error> {
                (..=index(self.end)?).into_span()
            }
        }

        /// `(start, count)`.
        impl IntoSpan for ($t, $t) {
            fn into_span(self) -> Result<Span, Error> {
                (index(self.0)?, index(self.1)?).into_span()
            }
        }
    )*};
}

integer_spans!(u8, u16, u32, u128, usize, i8, i16, i32, i64, i128, isize);
