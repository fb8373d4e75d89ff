//! Parties: which thread (or task) of one owner holds what, so that the
//! threads sharing a handle exclude each other as separate handles would.
//!
//! An engine only knows owners (an open file description, a process, a
//! table slot, a server session); the threads of one owner are invisible
//! to it. Each take is made *for a party*, by default the calling thread,
//! and the owner refuses (or makes wait) a take that conflicts with what
//! another of its parties holds or is waiting in the engine for. Takes of
//! one party compose as they always did: a thread that holds a write lock
//! may take a read lock inside it.
//!
//! Kept cheap for the usual case: while at most one party holds anything,
//! the owner's own counts are that party's (`solo`), and nothing more is
//! kept. Only when a second party holds something at the same time does
//! each party get its own count map, dropped again when one is left.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::holds::{Change, Counts, Holds};
use crate::kind::Kind;
use crate::segmap::SegMap;
use crate::span::Span;

/// Who a lock is taken for among the threads and tasks sharing one handle:
/// locks of different parties exclude each other, locks of one party
/// compose. By default each thread is its own party ([`Party::current`]);
/// an async task that moves between threads, or a wait run on a pool
/// thread for someone else, makes its own with [`Party::new`] and takes
/// locks as it with [`Party::enter`].
///
/// ```
/// use locksfile::{LockFile, Party};
/// let dir = tempfile::tempdir()?;
/// let lf = LockFile::open(dir.path().join("data.lock"))?;
/// let g = lf.write(0)?;                     // for this thread
/// let task = Party::new();
/// {
///     let _as_task = task.enter();
///     assert!(lf.try_read(0).is_err());     // another party of the handle
/// }
/// let _inner = lf.read(0)?;                 // this thread again: composes
/// # drop(g);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Party(u64);

/// Every lock of a handle opened with [`Threads::Share`](crate::Threads::Share).
pub(crate) const EVERYONE: Party = Party(0);

static NEXT: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The calling thread's party (0: none given out yet).
    static CURRENT: Cell<u64> = const { Cell::new(0) };
}

impl Party {
    /// A party of its own, distinct from every thread's and every other.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Party {
        Party(NEXT.fetch_add(1, Ordering::Relaxed))
    }

    /// The calling thread's party (the one entered last, if any).
    #[inline]
    pub fn current() -> Party {
        CURRENT.with(|c| match c.get() {
            0 => {
                let p = Party::new();
                c.set(p.0);
                p
            }
            p => Party(p),
        })
    }

    /// Take locks for `self` on this thread until the returned value is
    /// dropped (then the thread's previous party is back).
    pub fn enter(self) -> Entered {
        let before = CURRENT.with(|c| c.replace(self.0));
        Entered {
            before,
            _not_send: std::marker::PhantomData,
        }
    }

    pub(crate) fn from_id(id: u64) -> Party {
        Party(id)
    }

    /// A number that identifies the party in this process (for messages
    /// and bindings); never 0.
    pub fn id(self) -> u64 {
        self.0
    }
}

/// The thread takes locks for another [`Party`] while this lives.
#[must_use = "the party is left again when this is dropped"]
#[derive(Debug)]
pub struct Entered {
    before: u64,
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Drop for Entered {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.before));
    }
}

/// What another party has in the way of a take.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Blocker {
    pub party: Party,
    pub span: Span,
    pub kind: Kind,
}

/// The parties of one owner (see the module's comment).
#[derive(Debug)]
pub(crate) struct Parties {
    /// While `maps` is empty: the one party that holds what the owner holds.
    solo: Party,
    /// Each party's counts, while more than one holds something.
    maps: Vec<(Party, SegMap<Counts>)>,
    /// Raises waiting in the engine: party, span, kind.
    pending: Vec<(Party, Span, Kind)>,
    /// Parties waiting for another party of this owner: (waiter, in the way).
    waits: Vec<(Party, Party)>,
}

/// The kind a change asks for, if it asks for a lock at all.
fn asked(change: Change) -> Option<Kind> {
    match change {
        Change::Guard { to, .. } => to,
        Change::Explicit { kind, .. } => kind,
    }
}

fn conflict(a: Kind, b: Option<Kind>) -> bool {
    matches!(
        (a, b),
        (Kind::Exclusive, Some(_)) | (Kind::Shared, Some(Kind::Exclusive))
    )
}

impl Parties {
    pub fn new() -> Self {
        Parties {
            solo: EVERYONE,
            maps: Vec::new(),
            pending: Vec::new(),
            waits: Vec::new(),
        }
    }

    /// Whether `party` alone has anything here, so that its change needs
    /// no look at the others (the hot path).
    #[inline]
    pub fn alone(&self, party: Party, holds: &Holds) -> bool {
        // A party waiting for another must be woken by its release, which
        // the hot path does not do.
        self.maps.is_empty() && self.waits.is_empty() && (self.solo == party || holds.is_empty())
    }

    /// After a change for `party` on the hot path (where it was `alone`).
    #[inline]
    pub fn solo(&mut self, party: Party) {
        self.solo = party;
    }

    /// The first hold (or engine wait) of another party that `change`
    /// for `party` conflicts with.
    pub fn in_the_way(&self, party: Party, change: Change, holds: &Holds) -> Option<Blocker> {
        let kind = asked(change)?;
        let span = change.span();
        for &(p, s, k) in &self.pending {
            if p != party && s.intersect(span).is_some() && conflict(kind, Some(k)) {
                return Some(Blocker {
                    party: p,
                    span: s,
                    kind: k,
                });
            }
        }
        if self.maps.is_empty() {
            if self.solo == party || holds.is_empty() {
                return None;
            }
            return holds
                .effective(span)
                .into_iter()
                .find(|&(_, k)| conflict(kind, k))
                .map(|(s, k)| Blocker {
                    party: self.solo,
                    span: s,
                    kind: k.expect("a conflict is a lock"),
                });
        }
        for (p, map) in &self.maps {
            if *p == party {
                continue;
            }
            for (s, c) in map.pieces(span) {
                let k = c.effective();
                if conflict(kind, k) {
                    return Some(Blocker {
                        party: *p,
                        span: s,
                        kind: k.expect("a conflict is a lock"),
                    });
                }
            }
        }
        None
    }

    /// Before `change` for `party` is applied to `holds`: start keeping
    /// counts per party if it is a second party to hold something.
    pub fn before_apply(&mut self, party: Party, holds: &Holds) {
        if self.maps.is_empty() && self.solo != party && !holds.is_empty() {
            self.maps.push((self.solo, holds.counts().clone()));
        }
    }

    /// Right after `change` for `party` was applied to `holds` (whose
    /// record of the explicit layer's old pieces is still fresh).
    pub fn after_apply(&mut self, party: Party, change: Change, holds: &Holds) {
        if self.maps.is_empty() {
            self.solo = party;
            return;
        }
        let i = match self.maps.iter().position(|(p, _)| *p == party) {
            Some(i) => i,
            None => {
                self.maps.push((party, SegMap::new()));
                self.maps.len() - 1
            }
        };
        holds.replay(change, &mut self.maps[i].1);
        self.maps.retain(|(_, m)| !m.is_empty());
        if self.maps.len() <= 1 {
            if let Some((p, _)) = self.maps.pop() {
                self.solo = p;
            }
            self.maps.clear();
        }
    }

    /// Whether more than one party holds something (then releases must
    /// wake the parties waiting for each other).
    pub fn several(&self) -> bool {
        !self.maps.is_empty() || !self.waits.is_empty()
    }

    pub fn start_pending(&mut self, party: Party, change: Change) {
        if let Some(k) = asked(change) {
            self.pending.push((party, change.span(), k));
        }
    }

    pub fn end_pending(&mut self, party: Party, change: Change) {
        let span = change.span();
        if let Some(i) = self
            .pending
            .iter()
            .position(|&(p, s, _)| p == party && s == span)
        {
            self.pending.swap_remove(i);
        }
    }

    /// `party` is about to wait for `other`: false (and nothing recorded)
    /// if that closes a cycle of parties waiting for each other.
    pub fn start_waiting(&mut self, party: Party, other: Party) -> bool {
        let mut at = other;
        for _ in 0..=self.waits.len() {
            if at == party {
                return false;
            }
            match self.waits.iter().find(|(w, _)| *w == at) {
                Some(&(_, next)) => at = next,
                None => break,
            }
        }
        self.waits.push((party, other));
        true
    }

    pub fn stop_waiting(&mut self, party: Party) {
        if let Some(i) = self.waits.iter().position(|(w, _)| *w == party) {
            self.waits.swap_remove(i);
        }
    }
}
