//! What `verbose=True` prints, in the original's words.

use locksfile::{Holder, Kind, Span};

/// "lock 5", "locks 1 to 3", "locks 3 onwards".
pub fn locks(s: Span) -> String {
    if s.count() == 1 {
        format!("lock {}", s.start())
    } else if s.is_to_end() {
        format!("locks {} onwards", s.start())
    } else {
        format!("locks {} to {}", s.start(), s.end() - 1)
    }
}

pub fn kind_word(k: Kind) -> &'static str {
    match k {
        Kind::Shared => "read",
        Kind::Exclusive => "write",
    }
}

pub fn holder_words(h: &Holder) -> String {
    match h.pid {
        Some(pid) => format!(
            "pid {pid} holds a {} lock on {}",
            kind_word(h.kind),
            locks(h.span)
        ),
        None => format!(
            "another owner holds a {} lock on {}",
            kind_word(h.kind),
            locks(h.span)
        ),
    }
}
