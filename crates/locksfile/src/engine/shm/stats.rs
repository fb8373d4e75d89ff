//! The table-wide lock statistics in a table's shared memory (the region
//! at `STATS_AT`, see `layout.rs`): what every recording owner of the
//! table adds to, and anyone reads, without the mutex.
//!
//! Entries are found by key in a bounded open-addressing table: a key's
//! search starts at its hash and looks at up to [`STAT_PROBES`] entries,
//! claiming a free one by CAS; a key that finds none (the table is full
//! there) counts in the "other" entry after the keyed ones. Keys are never
//! removed while the table lives, so a claimed entry always keeps its key.
//! A take's figures are several relaxed adds, so a reader may see it half
//! counted; every figure only grows, and nothing read here is trusted (a
//! key past the indices goes to "other", figures are only reported).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::error::{Error, SidecarProblem};
use crate::span::{Span, INDEX_END};
use crate::stats::{
    bucket_of, indices, micros, Entry, Event, Histogram, Scope, Shared, Stats, HIST_BUCKETS,
};

use super::layout::{StatEntry, HIST_WORDS, STAT_LOCKS, STAT_OWNERS, STAT_PROBES};
use super::sidecar::check_and_map;
use super::snapshot::open_in_use;
use super::table::{take_corrupt, Map};

/// The first owner entry (after the lock entries and "other indices").
const OWNERS_FROM: usize = STAT_LOCKS + 1;

fn hash(key: u64) -> usize {
    (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize
}

/// The entry of `key` among `n` entries from `first` (then "other").
fn entry_of(map: &Map, first: usize, n: usize, key: u64) -> &StatEntry {
    let start = hash(key) % n;
    for probe in 0..STAT_PROBES.min(n) {
        let e = map.stat_entry(first + (start + probe) % n);
        let k = e.key.load(Relaxed);
        if k == key {
            return e;
        }
        if k == 0 {
            match e.key.compare_exchange(0, key, Relaxed, Relaxed) {
                Ok(_) => return e,
                Err(k) if k == key => return e,
                Err(_) => {}
            }
        }
    }
    map.stat_entry(first + n)
}

/// Two atomic adds; the maximum is written only when it grows (a plain
/// `fetch_max` is a locked compare-and-swap every time).
fn add_hist(words: &[AtomicU64; HIST_WORDS], us: u64) {
    words[bucket_of(us)].fetch_add(1, Relaxed);
    words[HIST_BUCKETS].fetch_add(us, Relaxed);
    let max = &words[HIST_BUCKETS + 1];
    if us > max.load(Relaxed) {
        max.fetch_max(us, Relaxed);
    }
}

fn add(e: &StatEntry, ev: Event) {
    let count = |i: usize| {
        e.counts[i].fetch_add(1, Relaxed);
    };
    match ev {
        Event::Acquired => count(0),
        Event::Contended => count(1),
        Event::TimedOut => count(2),
        Event::Deadlock => count(3),
        Event::Waited(d) => add_hist(&e.wait, micros(d)),
        Event::Held(d) => add_hist(&e.hold, micros(d)),
    }
}

fn read_hist(words: &[AtomicU64; HIST_WORDS]) -> Histogram {
    let mut b = [0u64; HIST_BUCKETS];
    for (d, w) in b.iter_mut().zip(words.iter()) {
        *d = w.load(Relaxed);
    }
    let count = b.iter().fold(0u64, |a, n| a.wrapping_add(*n));
    Histogram::from_parts(
        b,
        count,
        words[HIST_BUCKETS].load(Relaxed),
        words[HIST_BUCKETS + 1].load(Relaxed),
    )
}

fn read_entry(e: &StatEntry) -> Entry {
    Entry {
        counts: std::array::from_fn(|i| e.counts[i].load(Relaxed)),
        wait: read_hist(&e.wait),
        hold: read_hist(&e.hold),
    }
}

fn merge(into: &mut Entry, from: &Entry) {
    for (a, b) in into.counts.iter_mut().zip(from.counts) {
        *a = a.wrapping_add(b);
    }
    into.wait.merge(&from.wait);
    into.hold.merge(&from.hold);
}

impl Shared for Map {
    fn record(&self, pid: u32, span: Span, ev: Event) {
        for i in indices(span) {
            let e = match i {
                Some(i) => entry_of(self, 0, STAT_LOCKS, i + 1),
                None => self.stat_entry(STAT_LOCKS),
            };
            add(e, ev);
        }
        add(entry_of(self, OWNERS_FROM, STAT_OWNERS, pid.into()), ev);
    }

    fn read(&self) -> Stats {
        let mut locks = Vec::new();
        let mut other = read_entry(self.stat_entry(STAT_LOCKS));
        for i in 0..STAT_LOCKS {
            let e = self.stat_entry(i);
            let key = e.key.load(Relaxed);
            let figures = read_entry(e);
            if key == 0 || figures.is_empty() {
                continue;
            }
            if key > INDEX_END {
                // Not an index: written over. Counted, not named.
                merge(&mut other, &figures);
            } else {
                locks.push(figures.lock_stats(Some(key - 1)));
            }
        }
        locks.sort_by_key(|l| l.index);
        if !other.is_empty() {
            locks.push(other.lock_stats(None));
        }
        let mut owners = Vec::new();
        let mut others = read_entry(self.stat_entry(OWNERS_FROM + STAT_OWNERS));
        for i in OWNERS_FROM..OWNERS_FROM + STAT_OWNERS {
            let e = self.stat_entry(i);
            let key = e.key.load(Relaxed);
            let figures = read_entry(e);
            if key == 0 || figures.is_empty() {
                continue;
            }
            match u32::try_from(key) {
                Ok(pid) if pid <= i32::MAX as u32 => owners.push(figures.owner_stats(pid)),
                _ => merge(&mut others, &figures),
            }
        }
        owners.sort_by_key(|o| o.pid);
        if !others.is_empty() {
            // Owners past the entries (pid 0: no process).
            owners.push(others.owner_stats(0));
        }
        Stats {
            scope: Scope::Table,
            locks,
            owners,
        }
    }
}

/// The table-wide statistics of the [`Mode::Shm`](crate::Mode::Shm) table
/// of the lock file at `lock_path`, read without joining the table (for
/// `locksfile stats` and the like): `None` when no one uses a table of
/// the file (or it has none). Figures are only those of owners that record
/// ([`OpenOptions::stats`](crate::OpenOptions::stats)).
///
/// ```
/// use locksfile::{shm, LockFile, Mode};
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("data.lock");
/// let lf = LockFile::options().mode(Mode::Shm).stats(true).open(&path)?;
/// drop(lf.write(3)?);
/// let stats = shm::read_stats(&path)?.expect("a table in use");
/// assert_eq!(stats.locks[0].index, Some(3));
/// assert_eq!(stats.locks[0].acquired, 1);
/// assert_eq!(stats.locks[0].hold.count(), 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// As [`Snapshot::read`](crate::shm::Snapshot::read).
pub fn read_stats(lock_path: impl AsRef<Path>) -> Result<Option<Stats>, Error> {
    let Some((fd, sidecar)) = open_in_use(lock_path.as_ref())? else {
        return Ok(None);
    };
    let map = check_and_map(&sidecar, std::os::fd::AsFd::as_fd(&fd), None)?;
    let stats = map.read();
    drop(map);
    if let Some(what) = take_corrupt() {
        return Err(Error::Sidecar {
            path: sidecar,
            problem: SidecarProblem::Corrupt { what },
        });
    }
    Ok(Some(stats))
}
