//! The checked ways to name a span: [`Span`]'s fallible constructors and
//! [`IntoSpan`]. They answer with the crate's [`Error`], which itself
//! names spans, so they sit here, above both `span.rs` and `error.rs`,
//! rather than in `span.rs`.

use std::ops::{Range, RangeFrom, RangeFull, RangeInclusive, RangeTo, RangeToInclusive};

use crate::error::{Error, SpanError};
use crate::span::{Span, INDEX_END};

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
        Ok(Span::from_checked(start, end))
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
}

/// Anything that names a span of lock indices: an index, a range of
/// indices (`a..b`, `a..=b`, `a..`, `..b`, `..=b`, `..`) of any integer
/// type, `(start, count)`, or a [`Span`].
///
/// An unsuffixed literal is an `i32`, as everywhere in Rust: write
/// `1u64 << 40` for an index past `i32::MAX`. Negative indices are refused
/// ([`SpanError::Negative`]).
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
            Ok(Span::from_checked(self, self + 1))
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
