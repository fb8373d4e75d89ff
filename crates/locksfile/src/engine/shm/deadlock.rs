//! The deadlock search from a request's blockers through their owners'
//! waits, and the queue reordering that breaks a cycle running through
//! queue order alone, as PostgreSQL's deadlock check does. Under the mutex:
//! it purges the owners it finds dead, writes waiter entries' places in the
//! queue (`order`), and tells the request where to queue
//! ([`TableLock::ahead`], [`TableLock::renew`]).

use std::os::fd::BorrowedFd;

use crate::span::{Span, INDEX_END};

use super::layout::{conflict, overlaps, NIL, SLOTS};
use super::table::TableLock;
use super::waits::{Place, Request};

/// The most moves [`TableLock::reorder`] makes at once to break the cycles
/// through one request, and the most sets of moves it tries.
pub(super) const MAX_MOVES: usize = 16;
pub(super) const REORDER_TRIALS: u32 = 64;

/// The entries of `queue` (earliest first) in an order that puts `a`
/// ahead of `b` for each `(a, b)` of `moves` and moves no one else, as
/// PostgreSQL's `TopoSort`: built from the back, each step taking the
/// latest entry that need not come ahead of an entry still left, so each
/// `a` lands just ahead of the earliest `b` it must pass. `None` when the
/// moves contradict each other (or name an entry not in `queue`).
pub(super) fn topo_sort(queue: &[(Place, u32)], moves: &[(u32, u32)]) -> Option<Vec<u32>> {
    let n = queue.len();
    let at = |e: u32| queue.iter().position(|q| q.1 == e);
    let mut pairs = Vec::with_capacity(moves.len());
    // How many entries still left each entry must come ahead of.
    let mut ahead_of = vec![0u32; n];
    for &(a, b) in moves {
        let (a, b) = (at(a)?, at(b)?);
        ahead_of[a] += 1;
        pairs.push((a, b));
    }
    let mut left = vec![true; n];
    let mut out = vec![0; n];
    let mut top = n;
    for slot in (0..n).rev() {
        while top > 0 && !left[top - 1] {
            top -= 1;
        }
        let k = (0..top).rev().find(|&k| left[k] && ahead_of[k] == 0)?;
        left[k] = false;
        out[slot] = queue[k].1;
        for &(a, b) in &pairs {
            if b == k {
                ahead_of[a] -= 1;
            }
        }
    }
    Some(out)
}

impl TableLock<'_> {
    /// Every owner in the way of `req`, standing at `place` in the queue, for
    /// the deadlock search: `f(owner, None)` for each holder of a
    /// conflicting record (a *hard* edge), `f(owner, Some(entry))` for
    /// each earlier waiter entry it defers to (a *soft* edge). An owner
    /// may come more than once.
    pub(super) fn each_blocker(
        &self,
        req: Request<'_>,
        place: Place,
        mut f: impl FnMut(u32, Option<u32>),
    ) {
        let h = self.header();
        for o in 0..self.slot_hwm() {
            let slot = *self.slot(o);
            if slot.used != 1 || o as u32 == req.me {
                continue;
            }
            let mut at = slot.head;
            let mut steps = 0;
            while at != NIL && steps < self.walk_limit() {
                let r = self.rec(at);
                if conflict(req.kind, r.kind)
                    && req
                        .pieces
                        .iter()
                        .any(|p| overlaps(p.start(), p.end(), r.start, r.end))
                {
                    f(o as u32, None);
                    break;
                }
                at = r.onext;
                steps += 1;
            }
        }
        if h.waiting == 0 || self.is_conversion(req) {
            return;
        }
        for i in 0..self.waiter_hwm() {
            let w = *self.waiter(i);
            if self.defers_to(req, place, &w) {
                f(w.owner.wrapping_sub(1), Some(i as u32));
            }
        }
    }

    /// [`TableLock::each_blocker`] of the request of waiter entry `i` (in use).
    pub(super) fn each_entry_blocker(&self, i: usize, f: impl FnMut(u32, Option<u32>)) {
        let w = *self.waiter(i);
        if w.start >= w.end || w.end > INDEX_END {
            self.corrupt("a waiter's span");
            return;
        }
        let piece = [Span::from_checked(w.start, w.end)];
        let req = Request {
            me: w.owner.wrapping_sub(1),
            pieces: &piece,
            kind: w.kind,
            ticket: w.ticket,
            entry: i as u32,
        };
        self.each_blocker(req, w.place(), f);
    }

    /// Whether waiting for `req` would close a cycle of waiting owners
    /// that no rearrangement of the queue breaks: `true` is
    /// `Error::Deadlock`.
    ///
    /// An owner waits for another along a *hard* edge (for a record the
    /// other holds) or a *soft* one (behind the other's earlier queued
    /// request, as [`TableLock::defers_to`] has it). First a search from the
    /// blockers of `req` through the waits of their owners, over every
    /// owner slot (no depth limit), tells whether any cycle runs back to
    /// `req`'s owner; when none does (the common case) that is all, at the
    /// cost this search always had. Owners met on a cycle are checked for
    /// life, and dead ones purged before looking again. A cycle left is
    /// then broken by rearranging the queue where that can be done, as
    /// PostgreSQL's deadlock check does ([`TableLock::reorder`]): only a cycle
    /// of locks held, or of soft edges that no tried rearrangement
    /// reverses without closing another cycle, is a deadlock.
    pub(super) fn closes_cycle(&mut self, fd: BorrowedFd<'_>, req: Request<'_>) -> bool {
        let mut seen = [false; SLOTS];
        let mut stack = Vec::new();
        self.each_blocker(req, self.place_of(req), |o, _| stack.push(o));
        let mut found = false;
        while let Some(o) = stack.pop() {
            if o == req.me {
                found = true;
                break;
            }
            let Some(seen) = seen.get_mut(o as usize) else {
                self.corrupt("an owner slot number");
                continue;
            };
            if std::mem::replace(seen, true) {
                continue;
            }
            for i in 0..self.waiter_hwm() {
                if self.waiter(i).owner == o + 1 {
                    self.each_entry_blocker(i, |b, _| stack.push(b));
                }
            }
        }
        if !found {
            return false;
        }
        // A dead owner on the way breaks the cycle once purged: check
        // everyone this search met, then look again.
        let mut purged = false;
        for (o, was_seen) in seen.iter().enumerate() {
            if *was_seen && o as u32 != req.me {
                purged |= self.purge_if_dead(fd, o as u32);
            }
        }
        if purged {
            return self.closes_cycle(fd, req);
        }
        !self.reorder(req)
    }

    /// Break every cycle of waits through `req` by rearranging the queue,
    /// as PostgreSQL's deadlock check does (its lock manager's README,
    /// `DeadLockCheckRecurse`, `TopoSort`): whether it did.
    ///
    /// A cycle that passes through a soft edge (an entry `a` queued
    /// behind an earlier conflicting entry `b`) is broken by moving `a`
    /// just ahead of `b`. Each cycle found offers its soft edges as such
    /// *moves*, tried in turn on top of the moves already chosen, and the
    /// whole queue is laid out again for each set of moves from its order
    /// before the search ([`topo_sort`]): every `a` lands just ahead of
    /// the earliest `b` it must pass, everyone else keeps their order, and
    /// the places the entries had are handed out again in the new order.
    /// A set of moves is taken when no cycle then runs through `req`, nor
    /// through the owner of any entry moved or passed (a move makes new
    /// edges only there: an entry passed may now defer to the one that
    /// passed it); the entries moved or passed are woken, as one moved
    /// ahead may be granted now. A request not queued yet takes part as a
    /// provisional entry, and queues at the place it was given
    /// ([`TableLock::ahead`]), looking again at once ([`TableLock::renew`]); so
    /// does a queued request moved ahead.
    ///
    /// What it does not do: a cycle of hard edges alone is a deadlock as
    /// before. Cycles not through `req` or a moved owner are left to their
    /// owners' own searches (PostgreSQL does the same), and a set of moves
    /// that leaves a moved owner in any cycle is refused. At most
    /// [`MAX_MOVES`] moves together and [`REORDER_TRIALS`] sets are tried,
    /// after which the cycle counts as a deadlock; owners met only by the
    /// searches made here are not checked for life. Grants are still
    /// decided by the records: a move only changes whom a request waits
    /// behind, never what two owners may hold at once.
    pub(super) fn reorder(&mut self, req: Request<'_>) -> bool {
        let (start, provisional) = if req.ticket == u64::MAX {
            // The request as the entry it will be once queued.
            let Some((i, ticket)) = self.push_waiter(req.me, 0, req.pieces, req.kind, None) else {
                return false;
            };
            (
                Request {
                    ticket,
                    entry: i,
                    ..req
                },
                Some(i as usize),
            )
        } else {
            (req, None)
        };
        let mut queue: Vec<(Place, u32)> = (0..self.waiter_hwm())
            .filter(|&i| self.waiter(i).owner != 0)
            .map(|i| (self.waiter(i).place(), i as u32))
            .collect();
        queue.sort_unstable();
        let mut moves = Vec::new();
        let mut trials = REORDER_TRIALS;
        // No move breaks a cycle of locks held: look for one first.
        let broken = self.find_cycle(start, start.me, false, true).is_none()
            && self.try_moves(start, &queue, &mut moves, &mut trials);
        if !broken {
            self.arrange(&queue, &[]);
        }
        let own = self.entry_of(start);
        for &(place, i) in &queue {
            let w = *self.waiter(i as usize);
            if w.place() == place {
                continue;
            }
            if Some(i as usize) == provisional {
                self.ahead = Some(w.order);
            } else if Some(i as usize) == own {
                self.renew = i + 1;
            } else {
                self.wake(i as usize);
            }
        }
        if let Some(i) = provisional {
            let w = self.waiter(i);
            w.owner = 0;
            self.count_down(&mut self.header().waiting, "the waiter count");
            self.shrink_waiters();
        }
        broken
    }

    /// One step of [`TableLock::reorder`]: lay the queue out for `moves`, look
    /// for a cycle, and if there is one try each of its soft edges as one
    /// more move. Whether a set of moves that leaves no cycle was found
    /// (the queue is then laid out for it).
    pub(super) fn try_moves(
        &mut self,
        start: Request<'_>,
        queue: &[(Place, u32)],
        moves: &mut Vec<(u32, u32)>,
        trials: &mut u32,
    ) -> bool {
        if !self.arrange(queue, moves) {
            return false;
        }
        let mut cycle = self.find_cycle(start, start.me, false, false);
        if cycle.is_none() {
            let mut owners: Vec<u32> = moves
                .iter()
                .flat_map(|&(a, b)| [a, b])
                .map(|e| self.waiter(e as usize).owner.wrapping_sub(1))
                .collect();
            owners.sort_unstable();
            owners.dedup();
            cycle = owners
                .into_iter()
                .find_map(|o| self.find_cycle(start, o, true, false));
        }
        let Some(soft) = cycle else {
            return true;
        };
        if moves.len() >= MAX_MOVES {
            return false;
        }
        for edge in soft {
            if moves.contains(&edge) {
                continue;
            }
            if *trials == 0 {
                return false;
            }
            *trials -= 1;
            moves.push(edge);
            if self.try_moves(start, queue, moves, trials) {
                return true;
            }
            moves.pop();
        }
        false
    }

    /// Give the entries of `queue` (as it was, earliest first) places that
    /// put `a` ahead of `b` for each move `(a, b)` and keep everyone else
    /// in order ([`topo_sort`]): the places they had, in the new order.
    /// `false` (nothing changed): the moves contradict each other.
    pub(super) fn arrange(&mut self, queue: &[(Place, u32)], moves: &[(u32, u32)]) -> bool {
        let Some(order) = topo_sort(queue, moves) else {
            return false;
        };
        for (&(place, _), e) in queue.iter().zip(order) {
            self.waiter(e as usize).order = place.0;
        }
        true
    }

    /// A cycle of waits back to owner `o`, given as its soft edges
    /// (waiting entry, entry it defers to), none for a cycle of locks
    /// held; `None` if there is no cycle. The search starts from `start`
    /// (of owner `o`), or with `whole` from every queued request of `o`;
    /// with `hard_only` it follows hard edges alone.
    pub(super) fn find_cycle(
        &self,
        start: Request<'_>,
        o: u32,
        whole: bool,
        hard_only: bool,
    ) -> Option<Vec<(u32, u32)>> {
        /// How the search first reached an owner: from which owner, and
        /// through which soft edge (none: a hard one).
        #[derive(Clone, Copy)]
        struct Step {
            from: u32,
            soft: Option<(u32, u32)>,
        }
        let hwm = self.waiter_hwm();
        let mut via: Vec<Option<Step>> = vec![None; SLOTS];
        let mut stack: Vec<(u32, Step)> = Vec::new();
        let expand = |stack: &mut Vec<(u32, Step)>, from: u32| {
            for i in 0..hwm {
                if self.waiter(i).owner == from + 1 {
                    self.each_entry_blocker(i, |b, w| {
                        if !(hard_only && w.is_some()) {
                            let soft = w.map(|w| (i as u32, w));
                            stack.push((b, Step { from, soft }));
                        }
                    });
                }
            }
        };
        if whole {
            expand(&mut stack, o);
        } else {
            let from = self.entry_of(start).map_or(NIL, |i| i as u32);
            self.each_blocker(start, self.place_of(start), |b, w| {
                if !(hard_only && w.is_some()) {
                    let soft = w.map(|w| (from, w)).filter(|_| from != NIL);
                    stack.push((b, Step { from: o, soft }));
                }
            });
        }
        while let Some((b, step)) = stack.pop() {
            if b == o {
                let mut soft = Vec::new();
                let mut s = step;
                for _ in 0..=SLOTS {
                    soft.extend(s.soft);
                    if s.from == o {
                        break;
                    }
                    s = via.get(s.from as usize).copied().flatten()?;
                }
                return Some(soft);
            }
            let Some(seen) = via.get_mut(b as usize) else {
                self.corrupt("an owner slot number");
                continue;
            };
            if seen.is_some() {
                continue;
            }
            *seen = Some(step);
            expand(&mut stack, b);
        }
        None
    }
}
