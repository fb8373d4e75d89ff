//! A lock table in memory, for testing the owner protocol without a
//! kernel: several fake owners share one table, conflicts follow the
//! reader/writer rule, waits sleep on a condition variable, and every call
//! is counted. It can also be told to fail a call, to test what the
//! protocol does with an engine error half-way through a change.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::{Abilities, Engine, Until};
use crate::error::{Error, Holder};
use crate::kind::Kind;
use crate::segmap::SegMap;
use crate::span::Span;

#[derive(Default)]
struct Table {
    /// Each owner's locks, by owner id.
    owners: Vec<SegMap<Option<Kind>>>,
    /// Calls made through `try_set` and `wait_set`, by owner id.
    calls: Vec<u64>,
    /// Fail the call that would make `calls` reach this number.
    fail_at: Vec<Option<u64>>,
    /// Owners asleep in `wait_set`.
    waiting: usize,
}

impl Table {
    /// The first lock of an owner other than `me` in the way of `kind`.
    fn blocker(&self, me: usize, span: Span, kind: Kind) -> Option<Holder> {
        for (id, map) in self.owners.iter().enumerate() {
            if id == me {
                continue;
            }
            for (piece, theirs) in map.pieces(span) {
                let clash = match (kind, theirs) {
                    (_, None) => false,
                    (Kind::Exclusive, Some(_)) | (_, Some(Kind::Exclusive)) => true,
                    (Kind::Shared, Some(Kind::Shared)) => false,
                };
                if clash {
                    return Some(Holder {
                        span: piece,
                        kind: theirs.expect("a clash has a kind"),
                        pid: None,
                        server: None,
                    });
                }
            }
        }
        None
    }

    fn count_call(&mut self, me: usize) -> Result<(), Error> {
        self.calls[me] += 1;
        if self.fail_at[me] == Some(self.calls[me]) {
            return Err(Error::io("fake engine", std::io::Error::other("injected")));
        }
        Ok(())
    }

    fn set(&mut self, me: usize, span: Span, kind: Option<Kind>) -> bool {
        let granted = match kind {
            Some(k) => self.blocker(me, span, k).is_none(),
            None => true,
        };
        if granted {
            self.owners[me].update(span, |_| kind, |_, _, _| {});
        }
        granted
    }
}

/// Owners of one in-memory lock table.
#[derive(Clone, Default)]
pub(crate) struct FakeTable {
    shared: Arc<(Mutex<Table>, Condvar)>,
}

impl FakeTable {
    fn table(&self) -> MutexGuard<'_, Table> {
        self.shared.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new owner of this table.
    pub fn owner(&self) -> Fake {
        let mut t = self.table();
        t.owners.push(SegMap::new());
        t.calls.push(0);
        t.fail_at.push(None);
        Fake {
            table: self.clone(),
            id: t.owners.len() - 1,
            writable: true,
        }
    }

    /// What owner `id` holds, as maximal pieces.
    pub fn held(&self, id: usize) -> Vec<(Span, Kind)> {
        let t = self.table();
        let mut out: Vec<(Span, Kind)> = Vec::new();
        for (s, k) in t.owners[id].pieces(Span::ALL) {
            let Some(k) = k else { continue };
            match out.last_mut() {
                Some((last, lk)) if *lk == k && last.end() == s.start() => {
                    *last = Span::new(last.start(), s.end()).expect("joined span")
                }
                _ => out.push((s, k)),
            }
        }
        out
    }

    /// Calls owner `id` has made.
    pub fn calls(&self, id: usize) -> u64 {
        self.table().calls[id]
    }

    /// Make owner `id`'s `n`-th call from now fail with an I/O error.
    pub fn fail_call(&self, id: usize, n: u64) {
        let mut t = self.table();
        t.fail_at[id] = Some(t.calls[id] + n);
    }

    /// How many owners are asleep in a wait.
    pub fn waiting(&self) -> usize {
        self.table().waiting
    }
}

/// One owner's view of a [`FakeTable`].
pub(crate) struct Fake {
    table: FakeTable,
    pub id: usize,
    pub writable: bool,
}

impl Engine for Fake {
    fn try_set(&self, span: Span, kind: Option<Kind>) -> Result<bool, Error> {
        let mut t = self.table.table();
        t.count_call(self.id)?;
        let granted = t.set(self.id, span, kind);
        drop(t);
        self.table.shared.1.notify_all();
        Ok(granted)
    }

    fn wait_set(&self, span: Span, kind: Kind, until: Until<'_>) -> Result<(), Error> {
        let cond = &self.table.shared.1;
        let mut t = self.table.table();
        t.count_call(self.id)?;
        loop {
            if t.set(self.id, span, Some(kind)) {
                drop(t);
                cond.notify_all();
                return Ok(());
            }
            t.waiting += 1;
            if let Some(e) = until.ended() {
                t.waiting -= 1;
                return Err(e);
            }
            t = match until.left() {
                // A cancel is seen within a millisecond: tests only.
                Some(left) => {
                    cond.wait_timeout(t, left.min(Duration::from_millis(1)))
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
                None if until.cancel.is_some() => {
                    cond.wait_timeout(t, Duration::from_millis(1))
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
                None => cond.wait(t).unwrap_or_else(|p| p.into_inner()),
            };
            t.waiting -= 1;
        }
    }

    fn probe(&self, span: Span, kind: Kind) -> Result<Option<Holder>, Error> {
        Ok(self.table.table().blocker(self.id, span, kind))
    }

    fn writable(&self) -> bool {
        self.writable
    }

    fn abilities(&self) -> Abilities {
        Abilities {
            detects_deadlocks: false,
            fair: false,
            releases_on_death: false,
        }
    }
}
