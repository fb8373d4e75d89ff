//! Wait times of lock takes, in log2 buckets of microseconds: cheap enough
//! to record on every step of a race (a leading-zeros count and an add),
//! and the shape `locksfile top` draws its histogram in.

use std::time::Duration;

use serde_json::{json, Value};

/// Bucket `k` holds waits of `[2^k, 2^(k+1))` microseconds (bucket 0 also
/// those under 1 us); the last one everything from `2^31` us (36 min) up.
pub const WAIT_BUCKETS: usize = 32;

/// The bucket of a wait of `us` microseconds.
pub fn wait_bucket(us: u64) -> usize {
    ((63 - us.max(1).leading_zeros()) as usize).min(WAIT_BUCKETS - 1)
}

/// Counts per bucket and the longest wait.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WaitHistogram {
    pub buckets: [u64; WAIT_BUCKETS],
    pub max_us: u64,
}

impl WaitHistogram {
    pub fn record(&mut self, wait: Duration) {
        let us = u64::try_from(wait.as_micros()).unwrap_or(u64::MAX);
        self.buckets[wait_bucket(us)] += 1;
        self.max_us = self.max_us.max(us);
    }

    pub fn merge(&mut self, other: &WaitHistogram) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.max_us = self.max_us.max(other.max_us);
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The `q` quantile, as the upper edge of the bucket that holds it
    /// (the buckets keep no finer detail), never above the longest wait.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        // The rank of the quantile among the waits, 1-based.
        let rank = ((q * n as f64).ceil() as u64).clamp(1, n);
        let mut seen = 0;
        for (k, &c) in self.buckets.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let edge = if k == WAIT_BUCKETS - 1 {
                    u64::MAX
                } else {
                    (1u64 << (k + 1)) - 1
                };
                return Some(edge.min(self.max_us));
            }
        }
        Some(self.max_us)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "unit": "us",
            "buckets": self.buckets.to_vec(),
            "count": self.count(),
            "p50_us": self.quantile_us(0.5),
            "p99_us": self.quantile_us(0.99),
            "max_us": self.max_us,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_log2_microseconds() {
        assert_eq!(wait_bucket(0), 0);
        assert_eq!(wait_bucket(1), 0);
        assert_eq!(wait_bucket(2), 1);
        assert_eq!(wait_bucket(3), 1);
        assert_eq!(wait_bucket(1023), 9);
        assert_eq!(wait_bucket(1024), 10);
        assert_eq!(wait_bucket(u64::MAX), WAIT_BUCKETS - 1);
    }

    #[test]
    fn quantiles_are_bucket_edges_capped_at_the_max() {
        let mut h = WaitHistogram::default();
        assert_eq!(h.quantile_us(0.5), None);
        for _ in 0..98 {
            h.record(Duration::from_micros(3)); // bucket 1: 2..4 us
        }
        h.record(Duration::from_micros(600)); // bucket 9
        h.record(Duration::from_micros(5000)); // bucket 12
        assert_eq!(h.count(), 100);
        assert_eq!(h.quantile_us(0.5), Some(3));
        assert_eq!(h.quantile_us(0.99), Some(1023));
        assert_eq!(h.quantile_us(1.0), Some(5000));
        let mut m = WaitHistogram::default();
        m.record(Duration::from_secs(1));
        m.merge(&h);
        assert_eq!((m.count(), m.max_us), (101, 1_000_000));
        assert_eq!(m.to_json()["buckets"][1], 98);
    }
}
