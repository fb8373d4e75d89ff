//! Lock statistics: per lock index and per owner, how many takes were
//! granted, how many found the lock held by another owner (waited, or were
//! refused), how many timed out or were refused as deadlocks, and how long
//! takes waited and locks were held.
//!
//! # Off by default, one switch
//! Recording is off unless the handle is opened with
//! [`OpenOptions::stats`](crate::OpenOptions::stats) or the environment
//! variable `LOCKSFILE_STATS` is `1` (`true`, `on`, `yes`). Off, a take or
//! release pays one test of a field already in cache: 6 user instructions
//! per uncontended shm guard pair (684 against 678 before, callgrind,
//! slope between 10k and 30k pairs; OFD 582 against 576). On, it reads the
//! monotonic clock at every grant and every release (a hold time is the
//! span between the two, a wait time the span of the wait) and adds to
//! the index's and the owner's counters: about 680 more instructions and,
//! side by side in one criterion run (bench `pair`, group "statistics off
//! and on", a busy 2-core machine), 135 ns against 223 ns per shm pair.
//! Far above the 5 ns an always-on recording could afford (two clock
//! reads alone take 40 ns; an atomic add to shared memory 5 to 10 ns),
//! hence the switch. Nothing is sampled: on, every take counts.
//!
//! # Where the figures live
//! - [`Mode::Shm`](crate::Mode::Shm): table-wide, in a region of the
//!   table's shared memory, written by every owner that records (relaxed
//!   atomic adds, never under the table's mutex) and read by anyone
//!   ([`shm::read_stats`](crate::shm::read_stats), `locksfile stats`). The
//!   figures outlive the processes that made them while the table lives;
//!   they start again from zero when the table is set up afresh.
//! - Every other mode: per handle (per owner: in process mode, the
//!   process's handles on a file share one), in the handle's memory.
//!
//! # What is counted
//! A take that raises an index (free to held, or shared to exclusive)
//! counts one acquisition *for each index of its span*; a span wider than
//! [`SPAN_INDICES`] indices counts once, under the "other indices" entry
//! (`index: None`). The owner's totals count each take once. A take that
//! another owner was in the way of counts as contended, whether it then
//! waited or was refused ([`Wait::NonBlocking`](crate::Wait::NonBlocking));
//! its wait (from the refusal to the grant, or to giving up) goes in the
//! wait histogram, and a wait that ended by its deadline or by
//! [`Error::Deadlock`](crate::Error::Deadlock) counts in `timeouts` or
//! `deadlocks`. A wait that a signal ends ([`Error::Interrupted`](crate::Error::Interrupted))
//! counts nothing yet: its caller calls again (the Python binding does,
//! after running the signal handlers), and the same thread's next wait
//! for the same span counts as one wait from the first start; nor does
//! a refusal without the holder ([`Wait::NonBlockingNoHolder`](crate::Wait::NonBlockingNoHolder)),
//! the try a binding makes before it waits. A hold lasts from the grant
//! of an index to its release (a conversion between kinds does not end
//! it). Waits for another thread of the same handle are not counted.
//!
//! # Histograms
//! [`HIST_BUCKETS`] power-of-two buckets of microseconds: bucket `i`
//! counts durations in `[2^i, 2^(i+1))` µs, bucket 0 also those under 1
//! µs, the last one everything longer. With each: the count, the sum and
//! the maximum. A percentile is the upper bound of the bucket it falls in,
//! capped at the maximum (so a single sample reads exactly); histograms
//! merge by adding buckets.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::span::Span;

/// Buckets of a [`Histogram`].
pub const HIST_BUCKETS: usize = 32;

/// A take of more indices than this counts once under "other indices".
pub const SPAN_INDICES: u64 = 64;

/// Whose figures a [`Stats`] shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every owner of a shared-memory table, table-wide.
    Table,
    /// One handle's own takes.
    Handle,
}

impl Scope {
    /// `"table"` or `"handle"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Table => "table",
            Scope::Handle => "handle",
        }
    }
}

/// A distribution of durations in log-scale buckets (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Histogram {
    buckets: [u64; HIST_BUCKETS],
    count: u64,
    sum_us: u64,
    max_us: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: [0; HIST_BUCKETS],
            count: 0,
            sum_us: 0,
            max_us: 0,
        }
    }
}

/// The bucket of a duration of `us` microseconds.
pub(crate) fn bucket_of(us: u64) -> usize {
    if us < 2 {
        0
    } else {
        ((63 - us.leading_zeros()) as usize).min(HIST_BUCKETS - 1)
    }
}

/// Microseconds, saturating.
pub(crate) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Histogram {
    /// From raw parts (read from shared memory: any values are accepted).
    pub(crate) fn from_parts(
        buckets: [u64; HIST_BUCKETS],
        count: u64,
        sum_us: u64,
        max_us: u64,
    ) -> Self {
        Histogram {
            buckets,
            count,
            sum_us,
            max_us,
        }
    }

    pub(crate) fn add(&mut self, d: Duration) {
        let us = micros(d);
        self.buckets[bucket_of(us)] = self.buckets[bucket_of(us)].wrapping_add(1);
        self.count = self.count.wrapping_add(1);
        self.sum_us = self.sum_us.wrapping_add(us);
        self.max_us = self.max_us.max(us);
    }

    /// Add `other`'s samples to these.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a = a.wrapping_add(b);
        }
        self.count = self.count.wrapping_add(other.count);
        self.sum_us = self.sum_us.wrapping_add(other.sum_us);
        self.max_us = self.max_us.max(other.max_us);
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Their total.
    pub fn sum(&self) -> Duration {
        Duration::from_micros(self.sum_us)
    }

    /// The longest.
    pub fn max(&self) -> Duration {
        Duration::from_micros(self.max_us)
    }

    /// Samples per bucket (bucket `i`: `[2^i, 2^(i+1))` µs).
    pub fn buckets(&self) -> &[u64; HIST_BUCKETS] {
        &self.buckets
    }

    /// The upper bound of bucket `i` (the last one: none, `Duration::MAX`).
    pub fn bucket_bound(i: usize) -> Duration {
        if i + 1 >= HIST_BUCKETS {
            Duration::MAX
        } else {
            Duration::from_micros(1u64 << (i + 1))
        }
    }

    /// The `q` quantile (0 to 1): the upper bound of its bucket, capped at
    /// the maximum; zero with no samples.
    pub fn quantile(&self, q: f64) -> Duration {
        let total: u64 = self.buckets.iter().fold(0u64, |a, b| a.saturating_add(*b));
        if total == 0 {
            return Duration::ZERO;
        }
        let rank = ((total as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        for (i, n) in self.buckets.iter().enumerate() {
            seen = seen.saturating_add(*n);
            if seen >= rank {
                return Self::bucket_bound(i).min(self.max());
            }
        }
        self.max()
    }

    /// The median (see [`quantile`](Self::quantile)).
    pub fn p50(&self) -> Duration {
        self.quantile(0.5)
    }

    /// The 99th percentile (see [`quantile`](Self::quantile)).
    pub fn p99(&self) -> Duration {
        self.quantile(0.99)
    }
}

/// One lock index's figures.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LockStats {
    /// The index; `None` for "other indices" (spans wider than
    /// [`SPAN_INDICES`], or indices past what a table's region can name).
    pub index: Option<u64>,
    /// Takes granted.
    pub acquired: u64,
    /// Takes another owner was in the way of (they waited or were refused).
    pub contended: u64,
    /// Waits that ended at their deadline.
    pub timeouts: u64,
    /// Waits refused as deadlocks.
    pub deadlocks: u64,
    /// How long contended takes waited.
    pub wait: Histogram,
    /// How long the index was held, grant to release.
    pub hold: Histogram,
}

/// One owner's figures (each take counted once).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct OwnerStats {
    /// The owner's process.
    pub pid: u32,
    /// Its command (`/proc/PID/comm`), when readable (gone with it).
    pub command: Option<String>,
    /// Takes granted.
    pub acquired: u64,
    /// Takes another owner was in the way of.
    pub contended: u64,
    /// Waits that ended at their deadline.
    pub timeouts: u64,
    /// Waits refused as deadlocks.
    pub deadlocks: u64,
    /// How long contended takes waited.
    pub wait: Histogram,
    /// How long pieces were held.
    pub hold: Histogram,
}

/// Lock statistics: see the module docs of `stats` and
/// [`LockFile::stats`](crate::LockFile::stats).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Table-wide or this handle's own.
    pub scope: Scope,
    /// Per index, in index order ("other indices" last).
    pub locks: Vec<LockStats>,
    /// Per owner process.
    pub owners: Vec<OwnerStats>,
}

/// The command of process `pid`, if it can be read.
pub(crate) fn command_of(pid: u32) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(s.trim_end_matches('\n').to_string())
}

/// Whether `LOCKSFILE_STATS` asks for recording.
pub(crate) fn env_default() -> bool {
    std::env::var("LOCKSFILE_STATS").is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "on" | "yes"
        )
    })
}

/// Something that happened to a take.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Event {
    Acquired,
    Contended,
    TimedOut,
    Deadlock,
    Waited(Duration),
    Held(Duration),
}

/// The counters of one index or owner.
#[derive(Clone, Debug, Default)]
pub(crate) struct Entry {
    pub counts: [u64; 4],
    pub wait: Histogram,
    pub hold: Histogram,
}

impl Entry {
    pub(crate) fn add(&mut self, ev: Event) {
        let c = |e: &mut Entry, i: usize| e.counts[i] = e.counts[i].wrapping_add(1);
        match ev {
            Event::Acquired => c(self, 0),
            Event::Contended => c(self, 1),
            Event::TimedOut => c(self, 2),
            Event::Deadlock => c(self, 3),
            Event::Waited(d) => self.wait.add(d),
            Event::Held(d) => self.hold.add(d),
        }
    }

    pub(crate) fn lock_stats(self, index: Option<u64>) -> LockStats {
        let [acquired, contended, timeouts, deadlocks] = self.counts;
        LockStats {
            index,
            acquired,
            contended,
            timeouts,
            deadlocks,
            wait: self.wait,
            hold: self.hold,
        }
    }

    pub(crate) fn owner_stats(self, pid: u32) -> OwnerStats {
        let [acquired, contended, timeouts, deadlocks] = self.counts;
        OwnerStats {
            pid,
            command: command_of(pid),
            acquired,
            contended,
            timeouts,
            deadlocks,
            wait: self.wait,
            hold: self.hold,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.counts == [0; 4] && self.wait.count == 0 && self.hold.count == 0
    }
}

/// The indices a span counts under: each index, or `None` once.
pub(crate) fn indices(span: Span) -> impl Iterator<Item = Option<u64>> {
    let wide = span.end() - span.start() > SPAN_INDICES;
    let (a, b) = if wide {
        (0, 1)
    } else {
        (span.start(), span.end())
    };
    (a..b).map(move |i| (!wide).then_some(i))
}

/// A table-wide store of figures (a shared-memory table's region).
pub(crate) trait Shared: Send + Sync {
    /// Record `ev` for each index of `span`, and once for the owner in
    /// process `pid` (`getpid` is a system call: the caller keeps it).
    fn record(&self, pid: u32, span: Span, ev: Event);
    /// Read every figure.
    fn read(&self) -> Stats;
}

/// What a recording owner keeps, under its mutex: when each piece it holds
/// was granted, and (without a table) its own figures.
pub(crate) struct Recording {
    /// The owner's process (a recording owner is refused after a fork).
    pid: u32,
    since: Vec<(Span, Instant)>,
    /// Waits a signal ended, by thread: when they began, so that the
    /// same wait called again counts from there.
    interrupted: Vec<(std::thread::ThreadId, Span, Instant)>,
    locks: BTreeMap<u64, Entry>,
    other: Entry,
    owner: Entry,
}

impl Default for Recording {
    fn default() -> Self {
        Recording {
            pid: std::process::id(),
            since: Vec::new(),
            interrupted: Vec::new(),
            locks: BTreeMap::new(),
            other: Entry::default(),
            owner: Entry::default(),
        }
    }
}

impl Recording {
    /// Record `ev` for `span`, in `table` if there is one.
    pub(crate) fn note(&mut self, table: Option<&dyn Shared>, span: Span, ev: Event) {
        if let Some(t) = table {
            return t.record(self.pid, span, ev);
        }
        for i in indices(span) {
            match i {
                Some(i) => self.locks.entry(i).or_default().add(ev),
                None => self.other.add(ev),
            }
        }
        self.owner.add(ev);
    }

    /// When the calling thread's wait for `span` began: now, or when the
    /// same wait began before a signal ended it.
    pub(crate) fn wait_started(&mut self, span: Span) -> Instant {
        let me = std::thread::current().id();
        match self.interrupted.iter().position(|(t, _, _)| *t == me) {
            Some(i) => {
                let (_, s, began) = self.interrupted.swap_remove(i);
                if s == span {
                    began
                } else {
                    Instant::now()
                }
            }
            None => Instant::now(),
        }
    }

    /// The calling thread's wait for `span`, begun at `began`, was ended
    /// by a signal: its caller calls again.
    pub(crate) fn wait_interrupted(&mut self, span: Span, began: Instant) {
        let me = std::thread::current().id();
        self.interrupted.retain(|(t, _, _)| *t != me);
        self.interrupted.push((me, span, began));
    }

    /// A piece moved from `from` to `to` (held or not) at `now`.
    pub(crate) fn moved(
        &mut self,
        table: Option<&dyn Shared>,
        span: Span,
        raised: bool,
        from_held: bool,
        to_held: bool,
        now: Instant,
    ) {
        if raised {
            self.note(table, span, Event::Acquired);
        }
        if !from_held && to_held {
            self.since.push((span, now));
        } else if from_held && !to_held {
            self.released(table, span, now);
        }
    }

    /// End the holds over `span`.
    fn released(&mut self, table: Option<&dyn Shared>, span: Span, now: Instant) {
        let mut i = 0;
        while i < self.since.len() {
            let (held, t) = self.since[i];
            let Some(gone) = held.intersect(span) else {
                i += 1;
                continue;
            };
            self.since.swap_remove(i);
            if held.start() < gone.start() {
                self.since
                    .push((Span::from_checked(held.start(), gone.start()), t));
            }
            if gone.end() < held.end() {
                self.since
                    .push((Span::from_checked(gone.end(), held.end()), t));
            }
            self.note(table, gone, Event::Held(now.saturating_duration_since(t)));
        }
    }

    /// This handle's figures.
    pub(crate) fn read(&self) -> Stats {
        let mut locks: Vec<LockStats> = self
            .locks
            .iter()
            .map(|(i, e)| e.clone().lock_stats(Some(*i)))
            .collect();
        if !self.other.is_empty() {
            locks.push(self.other.clone().lock_stats(None));
        }
        Stats {
            scope: Scope::Handle,
            locks,
            owners: vec![self.owner.clone().owner_stats(self.pid)],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_powers_of_two_of_microseconds() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(1), 0);
        assert_eq!(bucket_of(2), 1);
        assert_eq!(bucket_of(3), 1);
        assert_eq!(bucket_of(4), 2);
        assert_eq!(bucket_of(250_000), 17);
        assert_eq!(bucket_of(u64::MAX), HIST_BUCKETS - 1);
    }

    #[test]
    fn percentiles_are_bucket_bounds_capped_at_the_max() {
        let mut h = Histogram::default();
        assert_eq!(h.p50(), Duration::ZERO);
        h.add(Duration::from_millis(250));
        assert_eq!(h.p50(), Duration::from_millis(250));
        for _ in 0..99 {
            h.add(Duration::from_micros(10));
        }
        assert_eq!(h.count(), 100);
        assert_eq!(h.p50(), Duration::from_micros(16));
        assert_eq!(h.p99(), Duration::from_micros(16));
        assert_eq!(h.quantile(1.0), Duration::from_millis(250));
        assert_eq!(h.max(), Duration::from_millis(250));
        let mut m = h.clone();
        m.merge(&h);
        assert_eq!(m.count(), 200);
        assert_eq!(m.sum(), h.sum() * 2);
    }

    #[test]
    fn garbage_parts_never_panic() {
        let h = Histogram::from_parts([u64::MAX; HIST_BUCKETS], 3, u64::MAX, u64::MAX);
        let _ = (h.p50(), h.p99(), h.sum(), h.max());
    }

    #[test]
    fn holds_end_piece_by_piece() {
        let mut r = Recording::default();
        let t = Instant::now();
        r.moved(None, Span::from_checked(0, 4), true, false, true, t);
        r.moved(None, Span::from_checked(1, 2), false, true, false, t);
        let s = r.read();
        assert_eq!(s.locks.len(), 4);
        assert_eq!(s.locks[1].hold.count(), 1);
        assert_eq!(s.locks[0].hold.count(), 0);
        assert_eq!(s.owners[0].acquired, 1);
        r.moved(None, Span::ALL, false, true, false, t);
        let s = r.read();
        assert!(s
            .locks
            .iter()
            .all(|l| l.hold.count() == 1 && l.acquired == 1));
    }
}
