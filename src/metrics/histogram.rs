//! A latency histogram made of atomics, for the paths that must not take a lock.
//!
//! prometheus-client's own `Histogram` keeps its buckets behind a mutex; ours is fixed
//! bucket counters and a nanosecond sum, each a relaxed `fetch_add`, so an observation never
//! waits on a scrape or on another observer. [`DurationHistogram::observe_n`] records `n`
//! events of the same latency in one step: fan-out observes once per batch, with the batch's
//! size, and still counts events.
//!
//! The count is not stored: a scrape derives it from the buckets, so `_count` always equals
//! the `+Inf` bucket even while observations race with the scrape (only `_sum` may lag a
//! concurrent observation by one).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the fan-out histogram: a batch handed to local sessions takes
/// microseconds to a few milliseconds; the tail shows a stalled fan-out.
pub const FANOUT_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 1.0,
];

/// Upper bounds (seconds) of the pub/sub lag histogram: Redis round trips are sub-millisecond
/// on one host; publisher-set timestamps (clock skew, a worker's own queueing) reach seconds.
pub const LAG_BUCKETS: &[f64] = &[
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

pub struct DurationHistogram {
    /// Ascending, finite upper bounds in seconds; the implicit last bucket is `+Inf`.
    bounds: &'static [f64],
    /// Per-bucket (not cumulative) counts; `bounds.len() + 1` of them.
    buckets: Box<[AtomicU64]>,
    sum_nanos: AtomicU64,
}

impl DurationHistogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]));
        Self {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        self.observe_n(d, 1);
    }

    /// Records `n` observations of `d`.
    pub fn observe_n(&self, d: Duration, n: u64) {
        if n == 0 {
            return;
        }
        let secs = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(n, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos
            .fetch_add(nanos.saturating_mul(n), Ordering::Relaxed);
    }

    /// `(sum in seconds, count, per-bucket counts with their upper bounds)`, the shape
    /// prometheus-client's encoder takes (it accumulates the buckets itself).
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(self.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        (sum, count, buckets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let h = DurationHistogram::new(&[0.001, 0.01]);
        h.observe(Duration::from_micros(1000)); // on the bound: le="0.001"
        h.observe_n(Duration::from_millis(5), 3);
        h.observe(Duration::from_secs(2));
        h.observe_n(Duration::from_secs(9), 0);
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 5);
        assert_eq!(buckets, vec![(0.001, 1), (0.01, 3), (f64::INFINITY, 1)]);
        assert!((sum - (0.001 + 0.015 + 2.0)).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn the_bucket_lists_are_ascending() {
        for bounds in [FANOUT_BUCKETS, LAG_BUCKETS] {
            assert!(bounds.windows(2).all(|w| w[0] < w[1]));
            assert!(bounds.iter().all(|b| b.is_finite() && *b > 0.0));
        }
    }
}
