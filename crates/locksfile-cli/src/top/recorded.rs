//! The statistics panel fed by counters the locks keep themselves: a shm
//! table's, in its shared memory (`locksfile::shm::read_stats`), which
//! every process that takes locks with statistics on adds to. Where the
//! file has none, `top` shows what its refreshes saw instead.

use std::time::Duration;

use super::view::{IndexStats, StatsSource, WAIT_BUCKETS};

/// A shm table's statistics, as read at the last refresh.
pub struct Recorded(pub locksfile::Stats);

impl Recorded {
    /// The table's statistics, when the lock file at `path` has a table in
    /// use and something was recorded there.
    pub fn read(path: &std::path::Path) -> Option<Recorded> {
        let stats = locksfile::shm::read_stats(path).ok()??;
        stats
            .locks
            .iter()
            .any(|l| l.acquired > 0 || l.contended > 0)
            .then_some(Recorded(stats))
    }
}

fn seen(h: &locksfile::Histogram, d: Duration) -> Option<Duration> {
    (h.count() > 0).then_some(d)
}

impl StatsSource for Recorded {
    fn heading(&self) -> String {
        "LOCK STATISTICS (the table's own counters: every process's takes with statistics on)"
            .to_string()
    }

    fn columns(&self) -> (&'static str, &'static str) {
        ("ACQUIRED", "CONTENDED")
    }

    fn per_index(&self) -> Vec<IndexStats> {
        // The "other indices" entry (no index) has no row of its own.
        self.0
            .locks
            .iter()
            .filter_map(|l| {
                Some(IndexStats {
                    index: l.index?,
                    acquired: l.acquired,
                    contended: l.contended,
                    wait_p50: seen(&l.wait, l.wait.p50()),
                    wait_p99: seen(&l.wait, l.wait.p99()),
                    wait_max: seen(&l.wait, l.wait.max()),
                })
            })
            .collect()
    }

    fn histogram_heading(&self) -> String {
        "WAIT TIMES (every wait the table recorded, log2 buckets)".into()
    }

    fn wait_histogram(&self) -> [u64; WAIT_BUCKETS] {
        // Both count microseconds in [2^i, 2^(i+1)) buckets.
        let mut out = [0u64; WAIT_BUCKETS];
        for l in &self.0.locks {
            for (o, n) in out.iter_mut().zip(l.wait.buckets()) {
                *o = o.saturating_add(*n);
            }
        }
        out
    }
}
