//! Latency histogram: log-linear buckets (64 per power of two, so within
//! 1.6% of the true value), fixed size, no allocation while recording.

/// Values below this are recorded exactly.
const EXACT: u64 = 128;
/// Sub-buckets per power of two above `EXACT`, as a power of two.
const SUB_BITS: u32 = 6;
const SUB: usize = 1 << SUB_BITS;
/// Enough buckets for any `u64`.
const BUCKETS: usize = EXACT as usize + (64 - 7) * SUB;

/// Latencies in nanoseconds.
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    pub fn new() -> Histogram {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < EXACT {
            return v as usize;
        }
        let e = 63 - v.leading_zeros(); // >= 7
        let m = (v >> (e - SUB_BITS)) as usize & (SUB - 1);
        EXACT as usize + (e as usize - 7) * SUB + m
    }

    /// The middle of a bucket.
    fn value(i: usize) -> u64 {
        if i < EXACT as usize {
            return i as u64;
        }
        let e = 7 + ((i - EXACT as usize) / SUB) as u32;
        let m = ((i - EXACT as usize) % SUB) as u64;
        let width = 1u64 << (e - SUB_BITS);
        (SUB as u64 + m) * width + width / 2
    }

    #[inline]
    pub fn record(&mut self, nanos: u64) {
        self.counts[Self::index(nanos)] += 1;
        self.total += 1;
    }

    #[cfg(test)]
    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
    }

    /// The `p`-quantile (0 < p <= 1) in nanoseconds; 0 when empty.
    pub fn quantile(&self, p: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((p * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::value(i);
            }
        }
        Self::value(BUCKETS - 1)
    }

    /// Compact text form for the worker's report: `index:count,...`.
    pub fn encode(&self) -> String {
        let parts: Vec<String> = self
            .counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c != 0)
            .map(|(i, c)| format!("{i}:{c}"))
            .collect();
        if parts.is_empty() {
            "-".to_string()
        } else {
            parts.join(",")
        }
    }

    pub fn decode(s: &str) -> Option<Histogram> {
        let mut h = Histogram::new();
        if s == "-" {
            return Some(h);
        }
        for part in s.split(',') {
            let (i, c) = part.split_once(':')?;
            let (i, c): (usize, u64) = (i.parse().ok()?, c.parse().ok()?);
            *h.counts.get_mut(i)? += c;
            h.total += c;
        }
        Some(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_within_two_percent() {
        for v in [
            0u64,
            1,
            127,
            128,
            129,
            255,
            256,
            1000,
            1234,
            99_999,
            1_000_000,
            123_456_789,
            u64::MAX / 3,
        ] {
            let got = Histogram::value(Histogram::index(v));
            let err = (got as f64 - v as f64).abs() / (v.max(1) as f64);
            assert!(err <= 0.016, "{v} -> {got}");
        }
    }

    #[test]
    fn quantiles_and_round_trip() {
        let mut h = Histogram::new();
        for v in 1..=100u64 {
            h.record(v * 1000);
        }
        let p50 = h.quantile(0.5) as f64;
        let p99 = h.quantile(0.99) as f64;
        assert!((p50 - 50_000.0).abs() / 50_000.0 < 0.02, "{p50}");
        assert!((p99 - 99_000.0).abs() / 99_000.0 < 0.02, "{p99}");
        let back = Histogram::decode(&h.encode()).expect("decode");
        assert_eq!(back.total(), 100);
        assert_eq!(back.quantile(0.5), h.quantile(0.5));
    }
}
