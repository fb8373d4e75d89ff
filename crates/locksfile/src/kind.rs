//! Shared or exclusive: the one word every layer speaks.

use std::fmt;

/// Shared (read) or exclusive (write).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Many owners may hold it at once; excludes exclusive locks.
    Shared,
    /// One owner only.
    Exclusive,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Shared => "shared",
            Kind::Exclusive => "exclusive",
        })
    }
}
