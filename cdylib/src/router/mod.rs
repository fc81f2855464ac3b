//! The HA router: the members of a virtual slot, their health, and the
//! choice of the member that serves new work.
//!
//! A member is `Up` or `Down`. New sessions go to the healthy active member
//! with the least outstanding work for its weight; standby members take
//! work only when no active member is up. A failover-class result marks a
//! member down (unless it is the last one up), and the session that saw it
//! moves to another member (`dispatch` does the move, `replay` re-creates
//! its operations there). The recovery thread (`recovery`) probes down
//! members with backoff and returns them to service.

pub mod bounded;
pub mod recovery;
pub mod replay;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use pkcs11_sys::*;

use crate::backend::Vendor;
use crate::config::MemberConfig;

const NO_SLOT: u64 = u64::MAX;

/// Health of a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Health {
    Up = 0,
    Down = 1,
}

/// When a down member is probed next.
#[derive(Debug)]
struct Probe {
    next: Instant,
    backoff: Duration,
    since: Instant,
}

/// One member partition of a virtual slot.
#[derive(Debug)]
pub struct Member {
    /// `<slot label>#<index>`, as logs, the status and audit records name it.
    pub name: Arc<str>,
    pub vendor: Arc<Vendor>,
    pub cfg: MemberConfig,
    vendor_slot: AtomicU64,
    health: AtomicU8,
    /// Sessions bound to the member.
    sessions: AtomicU32,
    /// Whether the member holds the slot's login.
    logged_in: AtomicBool,
    pub stats: MemberStats,
    probe: Mutex<Probe>,
    /// The member's own session (login, probes, replication).
    control: Mutex<Option<CK_SESSION_HANDLE>>,
    /// How long a data-path call may take before it is abandoned (the
    /// slot's `call_timeout_ms`); `None` runs calls inline.
    pub deadline: Option<Duration>,
    /// Calls abandoned after their deadline that are still running.
    pub abandoned: bounded::Abandoned,
    /// Calls of multi-member slots running on the member now.
    inflight: AtomicU32,
    /// A probe is logging the member in and resynchronizing it.
    recovering: AtomicBool,
    /// Vendor sessions left behind when sessions moved off the member while
    /// it was down.
    orphans: Mutex<Vec<CK_SESSION_HANDLE>>,
    /// Every call is timed into `stats.calls` (`[metrics]` is configured).
    timed: bool,
}

/// Counters of a member, for the status query and the logs.
#[derive(Debug, Default)]
pub struct MemberStats {
    /// Calls timed (one in 64 of each session).
    pub sampled: AtomicU64,
    pub errors: AtomicU64,
    /// Sessions moved away from this member.
    pub failovers: AtomicU64,
    pub recoveries: AtomicU64,
    /// Moving average of sampled call latency, in microseconds.
    pub latency_us: AtomicU64,
    /// Duration of every call, when the member is timed (`[metrics]`).
    pub calls: crate::metrics::Histogram,
}

impl Member {
    pub fn new(
        name: String,
        vendor: Arc<Vendor>,
        cfg: MemberConfig,
        vendor_slot: Option<CK_SLOT_ID>,
        deadline: Option<Duration>,
    ) -> Member {
        let now = Instant::now();
        let m = Member {
            name: name.into(),
            vendor,
            cfg,
            vendor_slot: AtomicU64::new(vendor_slot.map_or(NO_SLOT, |s| s as u64)),
            health: AtomicU8::new(Health::Up as u8),
            sessions: AtomicU32::new(0),
            logged_in: AtomicBool::new(false),
            stats: MemberStats::default(),
            probe: Mutex::new(Probe {
                next: now,
                backoff: Duration::ZERO,
                since: now,
            }),
            control: Mutex::new(None),
            deadline,
            abandoned: Default::default(),
            inflight: AtomicU32::new(0),
            recovering: AtomicBool::new(false),
            orphans: Mutex::new(Vec::new()),
            timed: false,
        };
        if vendor_slot.is_none() {
            m.health.store(Health::Down as u8, Ordering::Relaxed);
        }
        m
    }

    /// Times every call of the member into `stats.calls`.
    pub fn time_calls(&mut self, on: bool) {
        self.timed = on;
    }

    /// The member's slot in its vendor library, when its token was found.
    #[inline]
    pub fn vendor_slot(&self) -> Option<CK_SLOT_ID> {
        match self.vendor_slot.load(Ordering::Relaxed) {
            NO_SLOT => None,
            s => Some(s as CK_SLOT_ID),
        }
    }

    pub fn set_vendor_slot(&self, s: Option<CK_SLOT_ID>) {
        self.vendor_slot
            .store(s.map_or(NO_SLOT, |s| s as u64), Ordering::Relaxed);
    }

    #[inline]
    pub fn health(&self) -> Health {
        if self.health.load(Ordering::Relaxed) == Health::Up as u8 {
            Health::Up
        } else {
            Health::Down
        }
    }

    #[inline]
    pub fn is_up(&self) -> bool {
        self.health() == Health::Up && self.vendor_slot().is_some()
    }

    pub fn is_logged_in(&self) -> bool {
        self.logged_in.load(Ordering::Relaxed)
    }

    pub fn set_logged_in(&self, v: bool) {
        self.logged_in.store(v, Ordering::Relaxed);
    }

    pub fn sessions(&self) -> u32 {
        self.sessions.load(Ordering::Relaxed)
    }

    /// Calls running on the member now (multi-member slots).
    pub fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Counts a failed call (what `track` counts).
    pub fn count_error(&self) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a call running on the member for the time of `f`.
    #[inline]
    pub fn counted<T>(&self, f: impl FnOnce() -> T) -> T {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        let r = f();
        self.inflight.fetch_sub(1, Ordering::Relaxed);
        r
    }

    /// Remembers a vendor session left behind on the member.
    pub fn orphan(&self, s: CK_SESSION_HANDLE) {
        self.orphans.lock().push(s);
    }

    /// The vendor sessions left behind, to close.
    pub fn take_orphans(&self) -> Vec<CK_SESSION_HANDLE> {
        std::mem::take(&mut *self.orphans.lock())
    }

    /// Marks the member as being recovered (shown by the status query).
    pub fn set_recovering(&self, v: bool) {
        self.recovering.store(v, Ordering::Relaxed);
    }

    pub fn session_opened(&self) {
        self.sessions.fetch_add(1, Ordering::Relaxed);
    }

    pub fn session_closed(&self) {
        let _ = self
            .sessions
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// Marks the member down; returns `false` when it already was.
    pub fn mark_down(&self, first_backoff: Duration) -> bool {
        let was = self.health.swap(Health::Down as u8, Ordering::AcqRel);
        self.logged_in.store(false, Ordering::Relaxed);
        if was == Health::Down as u8 {
            return false;
        }
        let now = Instant::now();
        *self.probe.lock() = Probe {
            next: now + first_backoff,
            backoff: first_backoff,
            since: now,
        };
        true
    }

    /// Returns a down member to service.
    pub fn mark_up(&self) {
        self.health.store(Health::Up as u8, Ordering::Release);
        self.stats.recoveries.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether a down member is due for a probe.
    pub fn probe_due(&self, now: Instant) -> bool {
        self.health() == Health::Down && self.probe.lock().next <= now
    }

    /// When the next probe of a down member is due.
    pub fn next_probe(&self) -> Option<Instant> {
        (self.health() == Health::Down).then(|| self.probe.lock().next)
    }

    /// How long the member has been down.
    pub fn down_for(&self) -> Duration {
        self.probe.lock().since.elapsed()
    }

    /// Schedules the next probe after a failed one (exponential backoff).
    pub fn probe_failed(&self, max: Duration) {
        let mut p = self.probe.lock();
        p.backoff = (p.backoff * 2).clamp(Duration::from_millis(10), max);
        p.next = Instant::now() + p.backoff;
    }

    /// Runs `f` on the member's own session, opening it when needed and
    /// once more when the member lost it. The session is used by one caller
    /// at a time (its lock is held across the vendor calls of `f`: this is
    /// the slow path of logins, lookups and replication, never an
    /// application's call).
    pub fn with_control<T>(
        &self,
        mut f: impl FnMut(CK_SESSION_HANDLE) -> crate::Result<T>,
    ) -> crate::Result<T> {
        // On a slot with a call deadline, a member that hangs is found by a
        // bounded look at its token first, so that management work for
        // sessions on other members does not wait for it.
        if let (Some(t), Some(vs)) = (self.deadline, self.vendor_slot()) {
            let v = self.vendor.clone();
            self.bounded(t, move || {
                let mut info = CK_TOKEN_INFO::default();
                v.get_token_info(vs, &mut info)
            })??;
        }
        let mut control = self.control.lock();
        for attempt in 0..2 {
            let cs = match *control {
                Some(cs) => cs,
                None => {
                    let vs = self.vendor_slot().ok_or(crate::Error::TokenNotPresent)?;
                    let mut cs: CK_SESSION_HANDLE = 0;
                    self.vendor
                        .open_session(vs, CKF_SERIAL_SESSION | CKF_RW_SESSION, &mut cs)?;
                    *control = Some(cs);
                    cs
                }
            };
            match f(cs) {
                Err(crate::Error::Vendor(CKR_SESSION_HANDLE_INVALID | CKR_SESSION_CLOSED))
                    if attempt == 0 =>
                {
                    *control = None
                }
                other => return other,
            }
        }
        Err(crate::Error::Vendor(CKR_SESSION_HANDLE_INVALID))
    }

    /// Closes the member's own session (best effort).
    pub fn close_control(&self) {
        if let Some(cs) = self.control.lock().take() {
            let _ = self.vendor.close_session(cs);
        }
    }

    /// Forgets the member's own session without closing it (the member
    /// lost it already).
    pub fn drop_control(&self) {
        self.control.lock().take();
    }

    /// Runs a vendor call on the member, counting its failures and, when
    /// `sample` (one call in 64 of a session), timing it. Nothing shared is
    /// written on the common path, unless `[metrics]` asks for every call's
    /// duration (one relaxed addition to a histogram bucket).
    #[inline(always)]
    pub fn track<T>(&self, sample: bool, f: impl FnOnce() -> crate::Result<T>) -> crate::Result<T> {
        if !sample && !self.timed {
            let r = f();
            if r.is_err() {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
            }
            return r;
        }
        let start = Instant::now();
        let r = f();
        let took = start.elapsed();
        if self.timed {
            self.stats.calls.observe(took);
        }
        if sample {
            let us = took.as_micros() as u64;
            let old = self.stats.latency_us.load(Ordering::Relaxed);
            let new = if old == 0 { us } else { (old * 7 + us) / 8 };
            self.stats.latency_us.store(new, Ordering::Relaxed);
            self.stats.sampled.fetch_add(1, Ordering::Relaxed);
        }
        if r.is_err() {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
}

/// Picks the member for new work: up, active before standby, the fewest
/// sessions for its weight (each session's operations go to its member, so
/// sessions are the member's outstanding work). Members in the `exclude`
/// bit set are never picked.
pub fn pick(members: &[Member], exclude: u32) -> Option<u32> {
    if let [m] = members {
        return (exclude & 1 == 0 && m.is_up()).then_some(0);
    }
    let score = |m: &Member| u64::from(m.sessions()) * 1_000_000 / u64::from(m.cfg.weight.max(1));
    let best = |standby: bool| {
        members
            .iter()
            .enumerate()
            .filter(|(i, m)| exclude & (1 << i) == 0 && m.is_up() && m.cfg.standby == standby)
            .min_by_key(|(_, m)| score(m))
            .map(|(i, _)| i as u32)
    };
    best(false).or_else(|| best(true))
}

/// Whether a result from a member means the member (or its state for this
/// session) is lost, so that the work must move. `USER_NOT_LOGGED_IN` counts
/// only when the slot is logged in (a restarted member forgot the login).
pub fn is_failover(rv: CK_RV, slot_logged_in: bool) -> bool {
    match rv {
        CKR_DEVICE_ERROR
        | CKR_DEVICE_REMOVED
        | CKR_TOKEN_NOT_PRESENT
        | CKR_DEVICE_MEMORY
        | CKR_GENERAL_ERROR
        | CKR_SESSION_HANDLE_INVALID
        | CKR_SESSION_CLOSED => true,
        CKR_USER_NOT_LOGGED_IN => slot_logged_in,
        _ => false,
    }
}

/// Whether a failover-class result says the member lost this session's
/// state but still answers (it may serve again at once, after a new
/// session and login).
pub fn lost_state_only(rv: CK_RV) -> bool {
    session_gone(rv) || rv == CKR_USER_NOT_LOGGED_IN
}

/// Whether a result says the member no longer knows the session: its handle
/// must not be closed (the member may have given the number to another).
pub fn session_gone(rv: CK_RV) -> bool {
    matches!(rv, CKR_SESSION_HANDLE_INVALID | CKR_SESSION_CLOSED)
}

/// A member's state as the status query reports it.
pub fn state_name(m: &Member) -> &'static str {
    match (m.is_up(), m.cfg.standby) {
        (true, false) => "active",
        (true, true) => "standby",
        (false, _) if m.recovering.load(Ordering::Relaxed) => "recovering",
        (false, _) if m.vendor_slot().is_none() => "absent",
        (false, _) => "down",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TokenSelector;

    fn member(weight: u32, standby: bool) -> Member {
        let cfg = MemberConfig {
            library: "/x.so".into(),
            selector: TokenSelector::Label("t".into()),
            weight,
            standby,
        };
        Member {
            name: "m".into(),
            vendor: Arc::new(Vendor::for_tests()),
            cfg,
            vendor_slot: AtomicU64::new(1),
            health: AtomicU8::new(Health::Up as u8),
            sessions: AtomicU32::new(0),
            logged_in: AtomicBool::new(false),
            stats: MemberStats::default(),
            probe: Mutex::new(Probe {
                next: Instant::now(),
                backoff: Duration::ZERO,
                since: Instant::now(),
            }),
            control: Mutex::new(None),
            deadline: None,
            abandoned: Default::default(),
            inflight: AtomicU32::new(0),
            recovering: AtomicBool::new(false),
            orphans: Mutex::new(Vec::new()),
            timed: false,
        }
    }

    #[test]
    fn least_loaded_active_member_wins() {
        let ms = [member(1, false), member(1, false), member(1, true)];
        ms[0].session_opened();
        assert_eq!(pick(&ms, 0), Some(1));
        ms[1].session_opened();
        ms[1].session_opened();
        assert_eq!(pick(&ms, 0), Some(0));
        assert_eq!(pick(&ms, 1), Some(1));
        assert_eq!(pick(&ms, 0b11), Some(2));
    }

    #[test]
    fn weight_scales_the_share() {
        let ms = [member(1, false), member(3, false)];
        for _ in 0..2 {
            ms[1].session_opened();
        }
        ms[0].session_opened();
        // 1 session at weight 1 weighs more than 2 at weight 3.
        assert_eq!(pick(&ms, 0), Some(1));
    }

    #[test]
    fn standby_only_when_no_active_is_up() {
        let ms = [member(1, false), member(1, true)];
        assert_eq!(pick(&ms, 0), Some(0));
        assert!(ms[0].mark_down(Duration::from_millis(10)));
        assert!(!ms[0].mark_down(Duration::from_millis(10)));
        assert_eq!(pick(&ms, 0), Some(1));
        ms[1].mark_down(Duration::from_millis(10));
        assert_eq!(pick(&ms, 0), None);
        ms[0].mark_up();
        assert_eq!(pick(&ms, 0), Some(0));
    }

    #[test]
    fn failover_classes() {
        assert!(is_failover(CKR_DEVICE_ERROR, false));
        assert!(is_failover(CKR_SESSION_HANDLE_INVALID, false));
        assert!(!is_failover(CKR_USER_NOT_LOGGED_IN, false));
        assert!(is_failover(CKR_USER_NOT_LOGGED_IN, true));
        assert!(!is_failover(CKR_SIGNATURE_INVALID, true));
        assert!(!is_failover(CKR_PIN_INCORRECT, true));
    }
}
