//! Setting a table up, owners' liveness, purging dead or leaving owners,
//! rebuilding every derived index after a death in the mutex
//! (`EOWNERDEAD`), and [`verify`]. All under the mutex ([`TableLock`]).

use std::mem::size_of;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::sync::atomic::Ordering;

use crate::span::INDEX_END;
use crate::sys::{self, Family, LockType, OpenHow};

use super::layout::{
    bucket, is_fast, lane_index, lane_owner, Rec, Slot, Waiter, BUCKETS, BUCKETS_AT, DMS,
    EXCLUSIVE, LANES_AT, LANE_EMPTY, LANE_MOVING, LANE_SLOW, LIVENESS, NIL, PROCS, RECORDS,
    RECORDS_AT, SHARED, SIZE, SLOTS, SLOTS_AT, VERSION, WAITERS, WAITERS_AT,
};
use super::sidecar::{byte, check_and_map, cstring, read_header, set_byte, sidecar_path};
use super::table::{take_corrupt, touched, TableLock};
use super::waits::Place;

/// Tells whether the process in entry `p` is alive (holds its liveness
/// byte), through some descriptor of the sidecar that is not that
/// process's.
pub(super) fn proc_alive(fd: BorrowedFd<'_>, p: u32) -> bool {
    match sys::get_lock(fd, Family::Ofd, LockType::Write, byte(LIVENESS + p as i64)) {
        Ok(found) => found.is_some(),
        // Unknown: never free a lock on a guess.
        Err(_) => true,
    }
}

impl TableLock<'_> {
    /// Whether the owner in slot `s` lives: its process entry is the one
    /// it was claimed with, and that process holds the entry's byte
    /// (probed through `fd`). `me` is the caller's own process entry
    /// (`NIL` for none): its byte is held through `fd`, which
    /// `F_OFD_GETLK` does not report.
    pub(super) fn slot_alive(&self, fd: BorrowedFd<'_>, s: u32, me: u32) -> bool {
        let slot = *self.slot(s as usize);
        let p = slot.proc;
        if slot.used != 1 || p as usize >= PROCS {
            return false;
        }
        let entry = *self.process(p as usize);
        entry.used == 1 && entry.nonce == slot.proc_nonce && (p == me || proc_alive(fd, p))
    }

    /// Rebuild every derived index from the records, slots and waiters,
    /// dropping whatever does not validate. Dead processes (their liveness
    /// byte free, probed through `fd`) lose their entry, and their owners
    /// their slots and everything. `me` is the repairer's own process
    /// entry (`NIL` for none).
    pub(super) fn repair(&mut self, fd: BorrowedFd<'_>, me: u32) {
        self.repairing = true;
        for p in 0..self.proc_hwm() as u32 {
            let entry = self.process(p as usize);
            if entry.used != 0 && (entry.used != 1 || (p != me && !proc_alive(fd, p))) {
                entry.used = 0;
            }
        }
        let h = self.header();
        h.slot_hwm = 0;
        h.slots_used = 0;
        for s in touched(fd, SLOTS_AT, size_of::<Slot>(), SLOTS)
            .into_iter()
            .flatten()
        {
            if self.slot(s).used != 0 && !self.slot_alive(fd, s as u32, me) {
                self.slot(s).used = 0;
            }
            let slot = self.slot(s);
            if slot.used == 1 {
                h.slot_hwm = s as u32 + 1;
                h.slots_used += 1;
            }
            slot.head = NIL;
            slot.records = 0;
        }
        let valid = |g: &Self, owner: u32, kind: u32, start: u64, end: u64| {
            owner >= 1
                && owner as usize <= SLOTS
                && g.slot((owner - 1) as usize).used == 1
                && (kind == SHARED || kind == EXCLUSIVE)
                && start < end
                && end <= INDEX_END
        };
        h.waiting = 0;
        h.waiter_hwm = 0;
        for i in touched(fd, WAITERS_AT, size_of::<Waiter>(), WAITERS)
            .into_iter()
            .flatten()
        {
            let w = *self.waiter(i);
            if w.owner != 0 && valid(self, w.owner, w.kind, w.start, w.end) {
                h.waiting += 1;
                h.waiter_hwm = i as u32 + 1;
            } else {
                self.waiter(i).owner = 0;
            }
        }
        self.renumber_queue();
        let h = self.header();
        for b in touched(fd, BUCKETS_AT, size_of::<u32>(), BUCKETS)
            .into_iter()
            .flatten()
        {
            self.set_head(b, NIL);
        }
        h.free_head = NIL;
        h.coarse_head = NIL;
        h.coarse_count = 0;
        let fresh = h.fresh.min(RECORDS as u32);
        h.fresh = fresh;
        h.free_count = RECORDS as u32 - fresh;
        for i in (0..fresh).rev() {
            let r = *self.rec(i);
            if r.owner != 0 && valid(self, r.owner, r.kind, r.start, r.end) {
                self.link(i);
            } else {
                self.free(i);
            }
        }
        self.settle_lanes(fd);
        self.repairing = false;
        // Waiters of the dead owner's locks must look again.
        self.wake_everyone();
    }

    /// Make the places in the queue of the entries in use differ and lie
    /// below `next_ticket` (past every ticket too), keeping their order: a
    /// reordering cut short by a death may have left two equal.
    pub(super) fn renumber_queue(&mut self) {
        let h = self.header();
        let mut queue: Vec<(Place, usize)> = (0..self.waiter_hwm())
            .filter(|&i| self.waiter(i).owner != 0)
            .map(|i| (self.waiter(i).place(), i))
            .collect();
        queue.sort_unstable();
        let mut free = 0u64;
        for (_, i) in queue {
            let w = self.waiter(i);
            w.order = w.order.max(free);
            free = w.order.saturating_add(1);
            h.next_ticket = h.next_ticket.max(free).max(w.ticket.saturating_add(1));
        }
    }

    /// Set up a fresh table (the caller holds the sidecar exclusively, and
    /// has just truncated it: every byte reads zero). Zero is what every
    /// slot, waiter entry, bucket head (stored complemented), lane and
    /// fast list is when empty, so nothing is written there and their
    /// pages take no memory until used; the records are all fresh.
    pub(super) fn init(&mut self, dev: u64, ino: u64) {
        let h = self.header();
        h.version = VERSION;
        h.size = SIZE as u64;
        h.dev = dev;
        h.ino = ino;
        h.next_ticket = 1;
        h.next_nonce = 1;
        h.free_head = NIL;
        h.fresh = 0;
        h.free_count = RECORDS as u32;
        h.coarse_head = NIL;
        h.coarse_count = 0;
        h.waiting = 0;
        h.waiter_hwm = 0;
        h.slot_hwm = 0;
        h.slots_used = 0;
        h.proc_hwm = 0;
        self.map.gate().store(0, Ordering::SeqCst);
    }

    /// Free everything of the owner in `slot` and the slot itself.
    pub(super) fn purge(&mut self, slot: u32) {
        self.clear_fast(slot);
        let mut at = self.slot(slot as usize).head;
        let mut steps = 0;
        while at != NIL && steps < self.walk_limit() {
            let next = self.rec(at).onext;
            let r = *self.rec(at);
            if r.end.wrapping_sub(r.start) == 1 {
                self.note_lane(bucket(r.start));
            }
            self.unlink_tier(at);
            self.free(at);
            at = next;
            steps += 1;
        }
        let s = self.slot(slot as usize);
        s.head = NIL;
        s.records = 0;
        if s.used == 1 {
            self.count_down(&mut self.header().slots_used, "the owner count");
        }
        s.used = 0;
        let mut hwm = self.slot_hwm();
        while hwm > 0 && self.slot(hwm - 1).used == 0 {
            hwm -= 1;
        }
        let h = self.header();
        h.slot_hwm = hwm as u32;
        for i in 0..self.waiter_hwm() {
            let w = self.waiter(i);
            if w.owner == slot + 1 {
                w.owner = 0;
                self.count_down(&mut h.waiting, "the waiter count");
            }
        }
        self.wake_everyone();
        self.shrink_waiters();
    }

    /// Purge `slot` if its owner is dead; whether it was.
    pub(super) fn purge_if_dead(&mut self, fd: BorrowedFd<'_>, slot: u32) -> bool {
        if self.slot(slot as usize).used == 1 && !self.slot_alive(fd, slot, self.my_proc) {
            self.purge(slot);
            return true;
        }
        false
    }
}

impl TableLock<'_> {
    /// Check the derived indices against the records: every record in use
    /// is in its owner's list and its tier exactly once, every free one in
    /// the free list, and the counters agree.
    pub(super) fn verify(&self, fd: BorrowedFd<'_>) -> Result<(), String> {
        let h = self.header();
        let fresh = h.fresh as usize;
        if fresh > RECORDS {
            return Err(format!("{fresh} fresh records"));
        }
        let mut seen_owner = vec![0u8; fresh];
        let mut seen_tier = vec![0u8; fresh];
        let mut used = 0;
        for o in touched(fd, SLOTS_AT, size_of::<Slot>(), SLOTS)
            .into_iter()
            .flatten()
        {
            let slot = *self.slot(o);
            if slot.used != 0 && o >= h.slot_hwm as usize {
                return Err(format!("slot {o} in use past the mark {}", h.slot_hwm));
            }
            used += usize::from(slot.used == 1);
            if slot.used == 0 {
                // Never claimed, or left: nothing listed.
                if slot.records != 0 {
                    return Err(format!("free slot {o} counts {} records", slot.records));
                }
                continue;
            }
            let entry = *self.process(slot.proc as usize);
            if entry.used != 1 || entry.nonce != slot.proc_nonce {
                return Err(format!("slot {o} names no live process entry"));
            }
            let mut at = slot.head;
            let mut n = 0;
            while at != NIL {
                if at as usize >= fresh {
                    return Err("owner list out of range".into());
                }
                let r = *self.rec(at);
                if slot.used != 1 || r.owner as usize != o + 1 {
                    return Err(format!("record {at} in the list of slot {o} is not its"));
                }
                seen_owner[at as usize] = seen_owner[at as usize].saturating_add(1);
                n += 1;
                if n > fresh {
                    return Err(format!("slot {o}'s list loops"));
                }
                at = r.onext;
            }
            if n != slot.records as usize {
                return Err(format!("slot {o} counts {} records, has {n}", slot.records));
            }
        }
        if used != h.slots_used as usize {
            return Err(format!("{used} slots in use, counter {}", h.slots_used));
        }
        let mut walk = |mut at: u32, what: &str| -> Result<usize, String> {
            let mut n = 0;
            while at != NIL {
                if at as usize >= fresh {
                    return Err("chain out of range".into());
                }
                let r = *self.rec(at);
                seen_tier[at as usize] = seen_tier[at as usize].saturating_add(1);
                n += 1;
                if n > fresh {
                    return Err(format!("{what} loops"));
                }
                at = r.next;
            }
            Ok(n)
        };
        let coarse = walk(h.coarse_head, "the coarse list")?;
        if coarse != h.coarse_count as usize {
            return Err(format!("coarse list {coarse}, counter {}", h.coarse_count));
        }
        for b in touched(fd, BUCKETS_AT, size_of::<u32>(), BUCKETS)
            .into_iter()
            .flatten()
        {
            walk(self.head(b), "a bucket")?;
        }
        let free = walk(h.free_head, "the free list")?;
        if free + (RECORDS - fresh) != h.free_count as usize {
            return Err(format!(
                "free list {free} and {} fresh, counter {}",
                RECORDS.saturating_sub(fresh),
                h.free_count
            ));
        }
        let records = touched(fd, RECORDS_AT, size_of::<Rec>(), RECORDS);
        let beyond = records.into_iter().flatten().filter(|&i| i >= fresh);
        for i in beyond.chain(0..fresh) {
            let r = *self.rec(i as u32);
            let used = r.owner != 0;
            if i >= fresh {
                if used {
                    return Err(format!("fresh record {i} is in use"));
                }
                continue;
            }
            if seen_tier[i] != 1 || seen_owner[i] != u8::from(used) {
                return Err(format!(
                    "record {i} (owner {}) is in {} index chains and {} owner lists",
                    r.owner, seen_tier[i], seen_owner[i]
                ));
            }
            if used && (r.start >= r.end || !(r.kind == SHARED || r.kind == EXCLUSIVE)) {
                return Err(format!("record {i} is malformed"));
            }
        }
        let entries = touched(fd, WAITERS_AT, size_of::<Waiter>(), WAITERS);
        let entries = || entries.iter().cloned().flatten();
        let waiting = entries().filter(|&i| self.waiter(i).owner != 0).count();
        if waiting != h.waiting as usize {
            return Err(format!("{waiting} waiters, counter {}", h.waiting));
        }
        let mut places = Vec::new();
        for i in entries() {
            let w = *self.waiter(i);
            if w.owner == 0 {
                continue;
            }
            if i >= h.waiter_hwm as usize {
                return Err(format!("waiter {i} in use past the mark {}", h.waiter_hwm));
            }
            if w.ticket >= h.next_ticket || w.order >= h.next_ticket {
                return Err(format!(
                    "waiter {i}: ticket {} or place {} not below the next ticket {}",
                    w.ticket, w.order, h.next_ticket
                ));
            }
            places.push(w.order);
        }
        places.sort_unstable();
        if places.windows(2).any(|p| p[0] == p[1]) {
            return Err(format!(
                "two waiters share a place in the queue: {places:?}"
            ));
        }
        self.verify_lanes(fd)
    }

    /// The fast lane against the table: an empty or fast lane's bucket is
    /// empty, a fast word names a live slot and an index of its bucket, no
    /// owner has more fast holds than its count, an open gate means
    /// nothing spans more than one index.
    pub(super) fn verify_lanes(&self, fd: BorrowedFd<'_>) -> Result<(), String> {
        let lanes = touched(fd, LANES_AT, size_of::<u64>(), BUCKETS);
        for l in lanes.iter().cloned().flatten() {
            let w = self.map.lane(l).load(Ordering::Acquire);
            if w == LANE_SLOW {
                continue;
            }
            if w != LANE_EMPTY && (!is_fast(w) || w & LANE_MOVING != 0) {
                return Err(format!("lane {l} reads {w:#x}"));
            }
            if self.head(l) != NIL || self.waits_in(l) {
                return Err(format!("lane {l} is not slow, but its bucket is in use"));
            }
            if is_fast(w) {
                let o = lane_owner(w);
                if self.slot(o as usize).used != 1 || bucket(lane_index(w)) != l {
                    return Err(format!(
                        "lane {l}: fast hold {w:#x} of no owner, or misplaced"
                    ));
                }
            }
        }
        for l in lanes.into_iter().flatten() {
            let w = self.map.lane(l).load(Ordering::Acquire);
            if is_fast(w)
                && !self
                    .map
                    .fast_list(lane_owner(w))
                    .iter()
                    .any(|e| e.load(Ordering::Acquire) == l as u32 + 1)
            {
                return Err(format!(
                    "lane {l}: fast hold {w:#x} not on its owner's list"
                ));
            }
        }
        if self.gate_open() && (self.header().coarse_count > 0 || self.waits_wide()) {
            return Err("the gate is open while something spans more than one index".into());
        }
        Ok(())
    }
}

/// Check a lock table's internal consistency (its derived indices against
/// its records), for tests: `Err` says what is wrong.
#[doc(hidden)]
pub fn verify(lock_path: &Path) -> Result<(), String> {
    let lock_path = std::fs::canonicalize(lock_path).map_err(|e| e.to_string())?;
    let sidecar = sidecar_path(&lock_path);
    let c = cstring(&sidecar).map_err(|e| e.to_string())?;
    let how = OpenHow::existing(true);
    let fd = sys::open(&c, how).map_err(|e| e.to_string())?;
    set_byte(fd.as_fd(), LockType::Read, DMS, true).map_err(|e| e.to_string())?;
    let (magic, ..) = read_header(fd.as_fd()).map_err(|e| e.to_string())?;
    if magic == 0 {
        // Its first opener died setting it up: the next opener starts it
        // afresh, and there is nothing to check yet.
        return Ok(());
    }
    let map = check_and_map(&sidecar, fd.as_fd(), None).map_err(|e| e.to_string())?;
    let (mut g, died) = map.lock().map_err(|e| e.to_string())?;
    if died {
        g.repair(fd.as_fd(), NIL);
        g.consistent();
    }
    let found = g.verify(fd.as_fd());
    drop(g);
    match take_corrupt() {
        Some(what) => Err(format!("{what} out of range")),
        None => found,
    }
}
