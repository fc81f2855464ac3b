//! The broker's clock, injectable so that age windows and expiry can be
//! tested without waiting.

use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub trait Clock: Send + Sync + fmt::Debug {
    fn now(&self) -> SystemTime;
}

/// The system's wall clock.
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// The system clock moved by an adjustable offset (tests: "the instance is
/// now an hour old").
#[derive(Debug, Default)]
pub struct OffsetClock {
    offset_ms: AtomicI64,
}

impl OffsetClock {
    pub fn advance(&self, by: Duration) {
        self.offset_ms
            .fetch_add(by.as_millis() as i64, Ordering::SeqCst);
    }
}

impl Clock for OffsetClock {
    fn now(&self) -> SystemTime {
        let o = self.offset_ms.load(Ordering::SeqCst);
        if o >= 0 {
            SystemTime::now() + Duration::from_millis(o as u64)
        } else {
            SystemTime::now() - Duration::from_millis(o.unsigned_abs())
        }
    }
}

/// Unix seconds of `t` (0 before the epoch).
pub fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// RFC 3339 with second precision.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}
