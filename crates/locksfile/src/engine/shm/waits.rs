//! The queue and the grant rule: waiter entries, whom a request defers to,
//! what blocks it, and the wait itself ([`Shm::wait_all`]: give the CPU
//! away, queue, sleep on the entry's wake word, look again).
//!
//! Waiter entries and the header's `waiting`, `waiter_hwm` and
//! `next_ticket` are written under the mutex. An entry's wake word is
//! bumped by whoever wakes it (under the mutex, just after letting it go,
//! or from a thread that cancels the wait) and slept on by its waiting
//! thread.

use std::os::fd::BorrowedFd;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::engine::Until;
use crate::error::Error;
use crate::kind::Kind;
use crate::span::Span;
use crate::sys;

use super::layout::{code, conflict, overlaps, Waiter, WAITERS};
use super::table::{TableLock, WAKE_LIST};
use super::Shm;

/// How long a waiter sleeps before it checks its blockers are alive: a
/// killed holder's waiter gets the lock within this (plus a few µs).
pub(crate) const LIVENESS_SLICE: Duration = Duration::from_millis(50);

/// Tries after yielding the CPU before a wait queues and sleeps: a lock
/// held for a moment (hand-over-hand, more processes than cores) is mostly
/// free again once a few others have run, and giving the CPU to them costs
/// less than sleeping and being woken. Measured on the ring race: 10 and
/// more tries beat 2 (and 0, sleeping at once) clearly with 8 processes on
/// 2 CPUs; where no one else wants the CPU each try is a moment.
pub(super) const YIELDS_BEFORE_QUEUEING: u32 = 10;

/// A place in the queue: a waiter's `(order, ticket)`, earlier first.
pub(super) type Place = (u64, u64);

impl Waiter {
    pub(super) fn place(&self) -> Place {
        (self.order, self.ticket)
    }
}

/// A request as the grant rule sees it.
#[derive(Clone, Copy)]
pub(super) struct Request<'p> {
    pub(super) me: u32,
    pub(super) pieces: &'p [Span],
    pub(super) kind: u32,
    /// The ticket of its waiter entry, which holds its place in the queue
    /// ([`TableLock::place_of`]); `u64::MAX` for a request not queued yet
    /// (its place is past every entry).
    pub(super) ticket: u64,
    /// Where that entry is, if the caller knows ([`NO_ENTRY`] if not): a
    /// hint that saves a walk over the waiter entries under the mutex.
    pub(super) entry: u32,
}

/// [`Request::entry`] when the caller does not know it.
pub(super) const NO_ENTRY: u32 = u32::MAX;

/// What stands in the way of a request.
pub(super) enum Blocker {
    Record(u32),
    Waiter(u32),
}

impl TableLock<'_> {
    /// Wake the waiters whose requests overlap `s..e`: something there
    /// was released, or a request they queued behind went away.
    pub(super) fn wake_waiters(&mut self, s: u64, e: u64) {
        let h = self.header();
        if h.waiting == 0 {
            return;
        }
        for i in 0..self.waiter_hwm() {
            let w = *self.waiter(i);
            if w.owner != 0 && overlaps(s, e, w.start, w.end) {
                self.wake(i);
            }
        }
    }

    pub(super) fn wake(&mut self, i: usize) {
        self.map.wake_word(i).fetch_add(1, Ordering::Release);
        if self.wake_upto > 0 {
            self.wake_upto = self.wake_upto.max(i + 1);
        } else if self.n_woken < WAKE_LIST {
            self.woken[self.n_woken] = i as u32;
            self.n_woken += 1;
        } else {
            self.wake_upto = self.waiter_hwm().max(i + 1);
        }
    }

    /// Wake every waiter (a dead owner's locks went, or the table was
    /// repaired).
    pub(super) fn wake_everyone(&mut self) {
        let upto = self.waiter_hwm();
        for i in 0..upto {
            self.map.wake_word(i).fetch_add(1, Ordering::Release);
        }
        self.wake_upto = self.wake_upto.max(upto);
    }

    pub(super) fn shrink_waiters(&mut self) {
        let mut hwm = self.waiter_hwm();
        while hwm > 0 && self.waiter(hwm - 1).owner == 0 {
            hwm -= 1;
        }
        self.header().waiter_hwm = hwm as u32;
    }

    /// Whether `req` converts: its owner holds part of the span it changes
    /// (from its first piece to its last). A conversion queues behind no
    /// one, as PostgreSQL's lock manager has it.
    pub(super) fn is_conversion(&self, req: Request<'_>) -> bool {
        let s = req.pieces.first().map_or(0, |p| p.start());
        let e = req.pieces.last().map_or(0, |p| p.end());
        self.holds_over(req.me, s, e, 0)
    }

    /// Where `req` stands in the queue: its entry's place, or past every
    /// entry when it is not queued.
    pub(super) fn place_of(&self, req: Request<'_>) -> Place {
        if req.ticket == u64::MAX {
            return (u64::MAX, u64::MAX);
        }
        self.entry_of(req)
            .map_or((u64::MAX, req.ticket), |i| self.waiter(i).place())
    }

    /// The waiter entry of `req`, if it is queued.
    pub(super) fn entry_of(&self, req: Request<'_>) -> Option<usize> {
        if req.ticket == u64::MAX {
            return None;
        }
        let is_it = |i: usize| {
            let w = self.waiter(i);
            w.owner == req.me + 1 && w.ticket == req.ticket
        };
        let hwm = self.waiter_hwm();
        let hint = req.entry as usize;
        if hint < hwm && is_it(hint) {
            return Some(hint);
        }
        (0..hwm).find(|&i| is_it(i))
    }

    /// Whether `req` (not a conversion), standing at `at` in the queue,
    /// queues behind the earlier waiter `w` of another owner: their spans
    /// overlap and their kinds conflict, unless the requester's own locks
    /// hold `w` up (that would be a cycle fcntl never had). The grant rule
    /// and the deadlock search both ask this, so every wait the rule makes
    /// is an edge the search sees.
    pub(super) fn defers_to(&self, req: Request<'_>, at: Place, w: &Waiter) -> bool {
        w.owner != 0
            && w.owner != req.me + 1
            && w.place() < at
            && conflict(req.kind, w.kind)
            && req
                .pieces
                .iter()
                .any(|p| overlaps(p.start(), p.end(), w.start, w.end))
            && !self.holds_over(req.me, w.start, w.end, w.kind)
    }

    /// The first earlier waiter `req` must let go first (fair queueing).
    pub(super) fn deferred_to(&self, req: Request<'_>) -> Option<u32> {
        let h = self.header();
        if h.waiting == 0 || self.is_conversion(req) {
            return None;
        }
        let at = self.place_of(req);
        (0..self.waiter_hwm())
            .position(|i| self.defers_to(req, at, &*self.waiter(i)))
            .map(|i| i as u32)
    }

    /// What is in the way of `req`, if anything. With `life`, owners in
    /// the way are checked for life first (through that descriptor), and
    /// purged when dead; without, the answer may name a dead owner, which
    /// the caller then checks with the mutex let go: the check is a system
    /// call, and the mutex is everyone's.
    pub(super) fn blocker(
        &mut self,
        life: Option<BorrowedFd<'_>>,
        req: Request<'_>,
    ) -> Option<Blocker> {
        for p in req.pieces {
            while let Some(r) = self.conflicting_record(req.me, p.start(), p.end(), req.kind) {
                let owner = self.rec(r).owner.wrapping_sub(1);
                if !life.is_some_and(|fd| self.purge_if_dead(fd, owner)) {
                    return Some(Blocker::Record(r));
                }
            }
        }
        // A queued request of a dead owner would be deferred to forever:
        // nothing else ever probes an owner that holds nothing in the way.
        while let Some(w) = self.deferred_to(req) {
            let owner = self.waiter(w as usize).owner.wrapping_sub(1);
            if !life.is_some_and(|fd| self.purge_if_dead(fd, owner)) {
                return Some(Blocker::Waiter(w));
            }
        }
        None
    }

    /// The owner slot of a blocker.
    pub(super) fn owner_of(&self, b: &Blocker) -> u32 {
        match *b {
            Blocker::Record(r) => self.rec(r).owner.wrapping_sub(1),
            Blocker::Waiter(w) => self.waiter(w as usize).owner.wrapping_sub(1),
        }
    }

    /// Queue a request: at the end, or where the deadlock search put it
    /// ([`TableLock::ahead`]), and then it looks again before it sleeps.
    pub(super) fn add_waiter(
        &mut self,
        me: u32,
        pid: u32,
        pieces: &[Span],
        kind: u32,
    ) -> Option<(u32, u64)> {
        let ahead = self.ahead.take();
        let queued = self.push_waiter(me, pid, pieces, kind, ahead)?;
        if ahead.is_some() {
            self.renew = queued.0 + 1;
        }
        Some(queued)
    }

    /// Take a waiter entry and a ticket for a request; its place in the
    /// queue is `order`, or its ticket (the end of the queue).
    pub(super) fn push_waiter(
        &mut self,
        me: u32,
        pid: u32,
        pieces: &[Span],
        kind: u32,
        order: Option<u64>,
    ) -> Option<(u32, u64)> {
        let h = self.header();
        // The lowest free entry: below the mark, or the mark itself.
        let hwm = self.waiter_hwm();
        let i = (0..hwm)
            .position(|i| self.waiter(i).owner == 0)
            .or((hwm < WAITERS).then_some(hwm))?;
        let ticket = h.next_ticket;
        h.next_ticket = h.next_ticket.wrapping_add(1);
        let w = self.waiter(i);
        *w = Waiter {
            owner: 0,
            kind,
            start: pieces.first().map_or(0, |p| p.start()),
            end: pieces.last().map_or(0, |p| p.end()),
            ticket,
            order: order.unwrap_or(ticket),
            since_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
            pid,
            _pad: 0,
        };
        w.owner = me + 1;
        h.waiting = h.waiting.wrapping_add(1);
        h.waiter_hwm = h.waiter_hwm.max(i as u32 + 1);
        Some((i as u32, ticket))
    }

    /// Take waiter entry `i` out of the queue. `wake`: wake the later
    /// waiters that may have deferred to it; needless when it was granted
    /// one piece, as every waiter that deferred to it conflicts with that
    /// piece, now held.
    pub(super) fn remove_waiter(&mut self, me: u32, i: u32, ticket: u64, wake: bool) {
        let w = self.waiter(i as usize);
        if w.owner == me + 1 && w.ticket == ticket {
            w.owner = 0;
            let (s, e) = (w.start, w.end);
            self.count_down(&mut self.header().waiting, "the waiter count");
            self.shrink_waiters();
            if wake {
                self.wake_waiters(s, e);
            }
        }
    }
}

impl Shm {
    /// Wait until every piece can be raised to `kind` at once, then raise
    /// them all; on any error nothing changed.
    pub(super) fn wait_all(
        &self,
        pieces: &[Span],
        kind: Kind,
        until: Until<'_>,
    ) -> Result<(), Error> {
        if let [span] = pieces {
            if self.wait_on_lane(*span, kind, until)? {
                return Ok(());
            }
        }
        let kind = code(kind);
        let me = self.slot;
        let mut g = self.lock()?;
        self.settle(&mut g);
        let mut queued: Option<(u32, u64)> = None;
        let mut slice_over = false;
        let mut yields = 0;
        // While queued, a cancel bumps and wakes our futex word.
        let mut armed = None;
        loop {
            let (entry, ticket) = queued.unwrap_or((NO_ENTRY, u64::MAX));
            let req = Request {
                me,
                pieces,
                kind,
                ticket,
                entry,
            };
            // Owners in the way are checked for life (a system call) only
            // before the wait queues and sleeps, gives up, or goes on after
            // a slice with no wake-up (a holder that dies wakes no one): a
            // lock held for a moment is mostly free again before that.
            let ended = until.ended();
            let expired = ended.is_some();
            let about_to_queue = queued.is_none() && yields >= YIELDS_BEFORE_QUEUEING;
            let life = (slice_over || expired || about_to_queue).then(|| self.fd());
            let prepared = g.prepare(pieces);
            let blocked = prepared && g.blocker(life, req).is_some();
            let outcome = if let Some(e) = self.corrupt_so_far() {
                // Nothing more is written into a table found corrupt.
                Some(Err(e))
            } else if !prepared {
                Some(Err(self.full("lock records")))
            } else if !blocked {
                if g.has_room(pieces.len()) {
                    for p in pieces {
                        g.set(me, p.start(), p.end(), kind);
                        self.forget_deferred(p.start(), p.end());
                    }
                    Some(Ok(()))
                } else {
                    Some(Err(self.full("lock records")))
                }
            } else if (about_to_queue || slice_over) && g.closes_cycle(self.fd(), req) {
                Some(Err(Error::Deadlock { at: None }))
            } else {
                ended.map(Err)
            };
            if let Some(outcome) = outcome {
                if let Some((i, t)) = queued {
                    let one_piece_granted = outcome.is_ok() && pieces.len() == 1;
                    g.remove_waiter(me, i, t, !one_piece_granted);
                }
                return outcome;
            }
            if queued.is_none() && yields < YIELDS_BEFORE_QUEUEING {
                // A lock held for a moment (hand-over-hand, more processes
                // than cores) is often free once its holder has run: give
                // the CPU away and look again before queueing and sleeping.
                yields += 1;
                drop(g);
                std::thread::yield_now();
                g = self.lock()?;
                continue;
            }
            if queued.is_none() {
                queued = Some(
                    g.add_waiter(me, self.pid, pieces, kind)
                        .ok_or_else(|| self.full("waiters"))?,
                );
            }
            let entry = queued.map_or(0, |q| q.0) as usize;
            let word = self.map.wake_word(entry);
            if let (Some(c), None) = (until.cancel, &armed) {
                armed = Some(self.map.arm_cancel(c, entry));
            }
            let seen = word.load(Ordering::Acquire);
            drop(g);
            let mut sleep = LIVENESS_SLICE;
            if let Some(left) = until.left() {
                sleep = sleep.min(left);
            }
            // A cancel after `seen` was read changes the word, so the sleep
            // ends at once; one before it is seen here.
            let woke = if until.ended().is_some() {
                Ok(())
            } else {
                sys::futex_wait(word, seen, sleep)
            };
            slice_over = false;
            let interrupted = match woke {
                Ok(()) => false,
                Err(e) if e.raw_os_error() == Some(libc::ETIMEDOUT) => {
                    slice_over = true;
                    false
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => until.interruptible,
                Err(e) => {
                    let mut g = self.lock()?;
                    if let Some((i, t)) = queued {
                        g.remove_waiter(me, i, t, true);
                    }
                    return Err(Error::io("futex wait", e));
                }
            };
            g = self.lock()?;
            self.settle(&mut g);
            if interrupted {
                if let Some((i, t)) = queued {
                    g.remove_waiter(me, i, t, true);
                }
                return Err(Error::Interrupted);
            }
        }
    }
}
