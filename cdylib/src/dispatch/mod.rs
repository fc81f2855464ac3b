//! Dispatch: the module's state and one method per PKCS#11 function.
//!
//! The C boundary (`abi`) checks arguments and calls a method of
//! [`Library`]; the method translates p11shim's handles into a member's
//! vendor handles and calls the vendor through `backend`, with the HA
//! router (`router`) choosing members, moving sessions off failed members
//! and replaying their operations. No table lock is held while a vendor
//! function runs: a handle is translated under a short read lock, copied
//! out, and the lock released before the call.
//!
//! Lock order, written once: `INIT` (initialize/finalize only) → session
//! table → a session's state → object table → a slot's login state → a
//! member's control session. Table locks are never held across a vendor
//! call; a session's state lock only while that session moves to another
//! member.

mod acl;
mod audit;
mod crypto;
pub mod direct;
mod handles;
mod keygen;
mod objects;
mod quorum;
mod resync;
mod sessions;
mod slots;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use pkcs11_sys::*;
use zeroize::Zeroizing;

use crate::abi::library;
use crate::abi::mem::{Bytes, OutBytes, RawMechanism, Template, unpadded};
use crate::backend::Vendor;
use crate::config::{self, Config, MemberConfig, SlotConfig, TokenSelector};
use crate::error::{Error, Result};
use crate::logging;
use crate::metrics::{self, Op};
use crate::policy::Attrs;
use crate::router::replay::{OpKind, OpRecord, Outcome, final_outcome};
use crate::router::{self, Member, recovery};
use p11shim_audit::Kind;

pub use direct::direct;
pub use handles::{Identity, ObjectEntry, ObjectInfo, Owner};
pub use sessions::{MAX_SLOTS, Session, SessionState};
pub use slots::info;

/// Bumped in the child after every `fork()`; state from another generation
/// is stale and reads as "not initialized".
static FORK_GEN: AtomicU64 = AtomicU64::new(0);
/// Serializes `C_Initialize` and `C_Finalize`.
static INIT: Mutex<()> = Mutex::new(());
static ATFORK: std::sync::Once = std::sync::Once::new();
/// The recovery thread of the initialized module.
static RECOVERY: Mutex<Option<recovery::Thread>> = Mutex::new(None);

extern "C" fn after_fork_in_child() {
    // Async-signal-safe: one atomic increment, nothing else.
    FORK_GEN.fetch_add(1, Ordering::Relaxed);
}

/// At `exit()` of a process that did not call `C_Finalize` (OpenSSL's
/// engine, many short-lived tools): the audit log is drained and closed
/// with its signed `stop` checkpoint (bounded by `Audit::stop`).
extern "C" fn at_exit() {
    let _ = std::panic::catch_unwind(|| {
        if let Ok(lib) = current() {
            if let Some(a) = &lib.audit {
                a.stop(lib.credentials.as_deref());
            }
        }
    });
}

/// The initialized library, or `CKR_CRYPTOKI_NOT_INITIALIZED` (also in a
/// forked child that has not initialized again).
#[inline]
pub fn current() -> Result<&'static Library> {
    match library::get() {
        Some(lib) if lib.fork_gen == FORK_GEN.load(Ordering::Relaxed) => Ok(lib),
        _ => Err(Error::NotInitialized),
    }
}

/// `C_Initialize`: reads and validates the configuration, then loads,
/// initializes and resolves the members, and starts the recovery thread.
pub fn initialize(reserved: Option<&str>, no_threads: bool, own: CK_C_Initialize) -> Result<()> {
    let _init = INIT.lock();
    let generation = FORK_GEN.load(Ordering::Relaxed);
    let stale = match library::installed() {
        Some(lib) if lib.fork_gen == generation => return Err(Error::AlreadyInitialized),
        other => other,
    };

    let path = config::locate(reserved);
    let cfg = match config::load(&path) {
        Ok(cfg) => cfg,
        Err(e) => {
            logging::setup(&config::LogConfig {
                level: config::LogLevel::Info,
                file: None,
            });
            tracing::error!(error = %e, "C_Initialize: invalid configuration");
            return Err(Error::Config(e.to_string()));
        }
    };
    logging::setup(&cfg.log);

    // In a forked child the parent's vendor libraries are still mapped:
    // reuse them, initializing each again. The parent's recovery thread
    // does not exist in the child.
    let inherited: Vec<Arc<Vendor>> = match stale {
        Some(lib) => {
            library::take();
            // Nothing of the parent's is dropped: its locks may be held.
            lib.sessions.retire();
            std::mem::forget(RECOVERY.lock().take());
            metrics::stop_thread();
            tracing::info!("C_Initialize in a forked child: state of the parent discarded");
            lib.vendors.iter().map(|v| v.vendor.clone()).collect()
        }
        None => Vec::new(),
    };
    let lib = Arc::new(
        Library::open(cfg, generation, inherited, own, no_threads).inspect_err(|e| {
            tracing::error!(config = %path.display(), error = %e, "C_Initialize failed");
        })?,
    );
    let multi = lib
        .slots
        .iter()
        .any(|s| s.members.len() > 1 || s.members.iter().any(|m| m.vendor_slot().is_none()));
    if multi && !no_threads {
        match recovery::Thread::start(Arc::downgrade(&lib) as Weak<Library>, lib.recovery.clone()) {
            Ok(t) => *RECOVERY.lock() = Some(t),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the recovery thread; members recover inline")
            }
        }
    }
    if lib.metrics.is_some() && !no_threads {
        if let Err(e) = metrics::start_thread(Arc::downgrade(&lib)) {
            tracing::warn!(error = %e, "cannot start the metrics thread; no metrics file is written");
        }
    }
    tracing::info!(config = %path.display(), slots = lib.slots.len(), "p11shim initialized");
    library::install(lib);
    ATFORK.call_once(|| {
        if let Err(rc) = crate::abi::on_fork_in_child(after_fork_in_child) {
            tracing::warn!(rc, "pthread_atfork failed; fork() will not be detected");
        }
        if let Err(rc) = crate::abi::on_exit(at_exit) {
            tracing::warn!(
                rc,
                "atexit failed; an exit without C_Finalize leaves the audit chain open"
            );
        }
    });
    Ok(())
}

/// `C_Finalize`.
pub fn finalize() -> Result<()> {
    let _init = INIT.lock();
    let lib = library::take().ok_or(Error::NotInitialized)?;
    if lib.fork_gen != FORK_GEN.load(Ordering::Relaxed) {
        // The parent's state in a forked child: dropped without touching the
        // vendors, which belong to the parent.
        std::mem::forget(RECOVERY.lock().take());
        metrics::stop_thread();
        return Err(Error::NotInitialized);
    }
    stop_threads();
    // node_exporter has no staleness for textfiles: a file left behind
    // would be served with its last values forever.
    if let Some(m) = &lib.metrics {
        m.remove();
    }
    if let Some(a) = &lib.credentials {
        a.stop();
    }
    if let Some(a) = &lib.audit {
        a.stop(lib.credentials.as_deref());
    }
    for v in lib.vendors.iter().filter(|v| v.owned) {
        // A call abandoned at its deadline may still be running inside the
        // vendor: finalizing under it is undefined, so the vendor is left
        // initialized (and loaded, by the reference the call holds).
        let busy: u32 = lib
            .slots
            .iter()
            .flat_map(|s| &s.members)
            .filter(|m| Arc::ptr_eq(&m.vendor, &v.vendor))
            .map(|m| m.abandoned.count())
            .sum();
        if busy > 0 {
            logging::quietly(|| {
                tracing::warn!(library = %v.vendor.path().display(), calls = busy,
                "abandoned calls still run in this vendor library; it is not finalized")
            });
            continue;
        }
        v.vendor.finalize();
    }
    // C_Finalize may run from an exit handler, after this thread's storage
    // was torn down.
    logging::quietly(|| tracing::info!("p11shim finalized"));
    Ok(())
}

/// Stops the module's threads (at `C_Finalize`, and when the module is
/// unloaded without it).
pub fn stop_threads() {
    let thread = RECOVERY.lock().take();
    if let Some(mut t) = thread {
        t.stop();
    }
    metrics::stop_thread();
}

/// A vendor library in use, and whether p11shim initialized it.
#[derive(Debug)]
struct LoadedVendor {
    vendor: Arc<Vendor>,
    owned: bool,
}

/// Who is logged in on a slot, and how to log in a member that comes back.
#[derive(Debug, Default)]
pub struct Login {
    pub user: Option<CK_USER_TYPE>,
    /// The application's PIN, kept (wiped on drop) when the slot has no
    /// PIN source, to log in members that come back.
    pin: Option<Zeroizing<Vec<u8>>>,
}

/// One virtual slot.
#[derive(Debug)]
pub struct Slot {
    pub cfg: SlotConfig,
    pub members: Vec<Member>,
    pub login: Mutex<Login>,
    /// What members missed while down.
    journal: resync::Journal,
    /// The broker's credentials, for a slot with `pin = "broker"`.
    pub agent: Option<Arc<crate::credentials::Agent>>,
    /// Operations counted for `[metrics]`.
    pub ops: metrics::SlotOps,
}

impl Slot {
    pub fn logged_in(&self) -> bool {
        self.login.lock().user.is_some()
    }

    /// Token changes member `m` missed while down.
    pub fn missed_changes(&self, m: u32) -> usize {
        self.journal.pending(m)
    }

    fn first_backoff(&self) -> Duration {
        Duration::from_millis(self.cfg.recovery_interval_ms)
    }

    /// The credential to log a member in with, if the slot is logged in.
    fn credential(&self) -> Result<Option<(CK_USER_TYPE, Zeroizing<Vec<u8>>)>> {
        let (user, kept) = {
            let login = self.login.lock();
            let Some(user) = login.user else {
                return Ok(None);
            };
            (user, login.pin.clone())
        };
        match (&self.cfg.pin, user, kept) {
            (Some(_), CKU_USER, _) => Ok(Some((user, self.read_pin()?))),
            (_, _, Some(pin)) => Ok(Some((user, pin))),
            _ => Ok(None),
        }
    }

    /// The user PIN from the slot's source (a file, the environment or the
    /// broker); the broker's may wait for the first grant.
    pub fn read_pin(&self) -> Result<Zeroizing<Vec<u8>>> {
        match (&self.cfg.pin, &self.agent) {
            (Some(crate::config::PinSource::Broker), Some(agent)) => agent.pin(),
            (Some(src), _) => src.read().map_err(|e| {
                tracing::error!(slot = self.cfg.id, source = %src, error = %e, "PIN source unavailable");
                Error::PinSource(e)
            }),
            (None, _) => Err(Error::PinSource("the slot has no PIN source".into())),
        }
    }

    /// After a member refused the PIN from the broker: asks for fresh
    /// credentials (a rotated PIN) and says whether new ones arrived.
    pub fn pin_refused(&self) -> bool {
        match (&self.cfg.pin, &self.agent) {
            (Some(crate::config::PinSource::Broker), Some(agent)) => {
                tracing::warn!(
                    slot = self.cfg.id,
                    "a member refused the brokered PIN; asking the broker again"
                );
                agent.refresh()
            }
            _ => false,
        }
    }
}

/// The initialized module.
#[derive(Debug)]
pub struct Library {
    fork_gen: u64,
    pub config: Config,
    vendors: Vec<LoadedVendor>,
    pub slots: Vec<Slot>,
    /// The application forbade threads (`CKF_LIBRARY_CANT_CREATE_OS_THREADS`):
    /// down members are probed inline.
    pub no_threads: bool,
    sessions: sessions::Sessions,
    objects: handles::Objects,
    recovery: Arc<recovery::Control>,
    /// Credentials by attestation, when `[broker]` is configured.
    pub credentials: Option<Arc<crate::credentials::Agent>>,
    /// The role's key ACL.
    acl: acl::AclState,
    /// The audit log.
    audit: Option<audit::Audit>,
    /// The metrics file, when `[metrics]` is configured.
    pub metrics: Option<metrics::Exporter>,
    /// Nothing is recorded per call (no key ACL, audit log or metrics):
    /// sessions of one-member slots take the direct path (`direct`).
    lean: bool,
}

impl Library {
    fn open(
        cfg: Config,
        fork_gen: u64,
        inherited: Vec<Arc<Vendor>>,
        own: CK_C_Initialize,
        no_threads: bool,
    ) -> Result<Library> {
        // The audit log first: the credentials thread records its exchanges.
        let audit = match &cfg.audit {
            Some(_) if no_threads => {
                tracing::error!(
                    "the audit log is written by a thread, and the application forbids threads"
                );
                return Err(Error::Vendor(CKR_NEED_TO_CREATE_THREADS));
            }
            Some(a) => {
                let role = match (&cfg.acl, &cfg.broker) {
                    (_, Some(b)) => Some(b.role.as_str()),
                    (Some(config::AclConfig::Config { role, .. }), None) => Some(role.as_str()),
                    _ => None,
                };
                Some(audit::Audit::start(a, role)?)
            }
            None => None,
        };
        // The broker exchange starts next and runs while vendors load.
        let agent = match &cfg.broker {
            Some(_) if no_threads => {
                tracing::error!(
                    "credentials from the broker need a thread, and the application forbids threads"
                );
                return Err(Error::Vendor(CKR_NEED_TO_CREATE_THREADS));
            }
            Some(b) => Some(crate::credentials::Agent::start(
                b.clone(),
                audit.as_ref().map(|a| a.auditor.clone()),
            )?),
            None => None,
        };
        let mut vendors: Vec<LoadedVendor> = Vec::new();
        let result = (|| {
            let mut slots = Vec::with_capacity(cfg.slots.len());
            for sc in &cfg.slots {
                let mut members = Vec::with_capacity(sc.members.len());
                for (i, mc) in sc.members.iter().enumerate() {
                    let vendor = match vendors.iter().find(|v| v.vendor.path() == mc.library) {
                        Some(v) => v.vendor.clone(),
                        None => {
                            let (vendor, after_fork) =
                                match inherited.iter().find(|v| v.path() == mc.library) {
                                    Some(v) => (v.clone(), true),
                                    None => (Arc::new(Vendor::load(&mc.library, own)?), false),
                                };
                            let init = if after_fork {
                                vendor.initialize_after_fork()
                            } else {
                                vendor.initialize()
                            };
                            let owned = init.map_err(|e| {
                                tracing::error!(library = %mc.library.display(), error = %e, "vendor C_Initialize failed");
                                Error::Backend(format!("{}: C_Initialize failed: {e}", mc.library.display()))
                            })?;
                            vendors.push(LoadedVendor {
                                vendor: vendor.clone(),
                                owned,
                            });
                            vendor
                        }
                    };
                    let name = format!("{}#{i}", sc.label);
                    let vendor_slot = resolve_member(&vendor, mc);
                    match vendor_slot {
                        Some(s) => {
                            tracing::info!(slot = sc.id, member = %name, vendor_slot = s, "member resolved")
                        }
                        None => {
                            tracing::warn!(slot = sc.id, member = %name, selector = %mc.selector,
                            library = %mc.library.display(), "member token not found; it will be probed")
                        }
                    }
                    // A deadline needs a thread per call: none when the
                    // application forbids threads.
                    let deadline = sc
                        .call_timeout_ms
                        .filter(|_| !no_threads)
                        .map(Duration::from_millis);
                    let mut m = Member::new(name, vendor, mc.clone(), vendor_slot, deadline);
                    m.time_calls(cfg.metrics.is_some());
                    if vendor_slot.is_none() {
                        m.mark_down(Duration::from_millis(sc.recovery_interval_ms));
                    }
                    members.push(m);
                }
                let journal = resync::Journal::new(members.len());
                slots.push(Slot {
                    cfg: sc.clone(),
                    members,
                    login: Mutex::new(Login::default()),
                    journal,
                    agent: agent
                        .clone()
                        .filter(|_| sc.pin == Some(crate::config::PinSource::Broker)),
                    ops: Default::default(),
                });
            }
            Ok(slots)
        })();
        let exporter = cfg
            .metrics
            .as_ref()
            .map(|m| metrics::Exporter::new(m, no_threads));
        match result {
            Ok(slots) => Ok(Library {
                sessions: sessions::Sessions::new(slots.len()),
                lean: exporter.is_none() && audit.is_none() && cfg.acl.is_none(),
                metrics: exporter,
                fork_gen,
                acl: acl::AclState::new(
                    cfg.acl.clone(),
                    cfg.broker.as_ref().map(|b| b.role.as_str()),
                ),
                config: cfg,
                vendors,
                slots,
                no_threads,
                objects: Default::default(),
                recovery: Arc::new(recovery::Control::default()),
                credentials: agent,
                audit,
            }),
            Err(e) => {
                for v in vendors.iter().filter(|v| v.owned) {
                    v.vendor.finalize();
                }
                Err(e)
            }
        }
    }

    /// The configuration file in use.
    pub fn config_path(&self) -> &PathBuf {
        &self.config.source
    }

    /// A virtual slot by its id.
    #[inline]
    fn slot_index(&self, id: CK_SLOT_ID) -> Result<u32> {
        self.slots
            .iter()
            .position(|s| s.cfg.id == id as u64)
            .map(|i| i as u32)
            .ok_or(Error::SlotIdInvalid)
    }

    /// Whether a slot has a member up to serve it (its token is present).
    fn token_present(&self, slot: u32) -> bool {
        self.probe_inline();
        router::pick(&self.slots[slot as usize].members, 0).is_some()
    }

    /// Runs a slot-level call (token info, mechanisms) on the member new
    /// work would go to; a member that fails with a failover-class result is
    /// marked down and the next one asked, while one is left.
    fn on_slot<T>(
        &self,
        slot: u32,
        mut call: impl FnMut(&Member, CK_SLOT_ID) -> Result<T>,
    ) -> Result<T> {
        let s = &self.slots[slot as usize];
        self.probe_inline();
        let mut excluded = 0u32;
        loop {
            let i = router::pick(&s.members, excluded).ok_or(Error::TokenNotPresent)?;
            let m = &s.members[i as usize];
            let vs = m.vendor_slot().ok_or(Error::TokenNotPresent)?;
            match m.track(false, || call(m, vs)) {
                Err(Error::Vendor(rv))
                    if router::is_failover(rv, false)
                        && router::pick(&s.members, excluded | 1 << i).is_some() =>
                {
                    self.member_down(s, i, Some(rv));
                    excluded |= 1 << i;
                }
                other => return other,
            }
        }
    }

    /// Sessions the application has open on slot `si`.
    pub fn open_sessions(&self, si: u32) -> usize {
        self.sessions.open(si)
    }

    /// Sessions bound to a member: on a one-member slot, the slot's.
    pub fn member_sessions(&self, si: u32, m: &Member) -> usize {
        match self.slots[si as usize].members.len() {
            1 => self.open_sessions(si),
            _ => m.sessions() as usize,
        }
    }

    /// A session of the application.
    #[inline(always)]
    fn session(&self, h: CK_SESSION_HANDLE) -> Result<sessions::SessionRef> {
        self.sessions.get(h).ok_or(Error::SessionHandleInvalid)
    }

    /// Runs a vendor call for a session on the member serving it. When the
    /// member fails, the session moves to another member (its operations
    /// replayed there) and the call is made again; when no other member can
    /// take it, the member's result is returned. `kind` names the operation
    /// the call belongs to, so that one lost in a move is reported.
    ///
    /// On a one-member slot the first attempt is inlined in the caller: one
    /// load of the vendor handle and the call. Everything after a failure,
    /// and multi-member routing, is out of line.
    #[inline(always)]
    fn on_session<T>(
        &self,
        sess: &Session,
        kind: Option<OpKind>,
        mut call: impl FnMut(&Member, u32, CK_SESSION_HANDLE) -> Result<T>,
    ) -> Result<T> {
        if !sess.single {
            return self.on_session_routed(sess, kind, call, None);
        }
        let slot = &self.slots[sess.slot as usize];
        let member = &slot.members[0];
        let vh = sess.vendor.load(Ordering::Acquire) as CK_SESSION_HANDLE;
        let r = member.track(false, || call(member, 0, vh));
        match &r {
            Err(Error::Vendor(rv)) if router::is_failover(*rv, slot.logged_in()) => {}
            Err(Error::TimedOut) => {}
            _ => return r,
        }
        self.on_session_routed(sess, kind, call, Some(r))
    }

    /// The rest of [`Self::on_session`]: a multi-member session, or the
    /// failover after a first attempt on a one-member slot (`first`).
    #[cold]
    #[inline(never)]
    fn on_session_routed<T>(
        &self,
        sess: &Session,
        kind: Option<OpKind>,
        mut call: impl FnMut(&Member, u32, CK_SESSION_HANDLE) -> Result<T>,
        mut first: Option<Result<T>>,
    ) -> Result<T> {
        let slot = &self.slots[sess.slot as usize];
        let mut moves = 0;
        loop {
            if let Some(r) = first.take() {
                // The first attempt failed over on member 0 of a one-member
                // slot: handle its result as if made here.
                match self.after_failure(sess, kind, slot, 0, r, &mut moves) {
                    Some(r) => return r,
                    None => continue,
                }
            }
            let (m, vh, sample) = if sess.single {
                (
                    0,
                    sess.vendor.load(Ordering::Acquire) as CK_SESSION_HANDLE,
                    false,
                )
            } else {
                let mut st = sess.state.lock();
                if kind.is_some_and(|k| st.ops.take_lost(k)) {
                    return Err(Error::OperationLost);
                }
                st.calls = st.calls.wrapping_add(1);
                (st.member, st.vendor, st.calls % 64 == 1)
            };
            let member = &slot.members[m as usize];
            if !sess.single
                && !member.is_up()
                && moves < slot.members.len()
                && self.move_session(sess, m, None)
            {
                moves += 1;
                continue;
            }
            let r = if sess.single {
                member.track(sample, || call(member, m, vh))
            } else {
                member.counted(|| member.track(sample, || call(member, m, vh)))
            };
            if let Some(r) = self.after_failure(sess, kind, slot, m, r, &mut moves) {
                return r;
            }
        }
    }

    /// What follows a call on member `m`: `Some` result to return, or
    /// `None` when the session moved and the call is to be made again.
    fn after_failure<T>(
        &self,
        sess: &Session,
        kind: Option<OpKind>,
        slot: &Slot,
        m: u32,
        r: Result<T>,
        moves: &mut usize,
    ) -> Option<Result<T>> {
        // A failover-class result, or a call abandoned at its deadline.
        let failed = match &r {
            Err(Error::Vendor(rv)) if router::is_failover(*rv, slot.logged_in()) => Some(Some(*rv)),
            Err(Error::TimedOut) => Some(None),
            _ => None,
        };
        match failed {
            Some(rv) if *moves < slot.members.len() => {
                *moves += 1;
                if !self.move_session(sess, m, rv) {
                    return Some(r);
                }
                if kind.is_some() && !sess.replay {
                    // The session went on, but its operation was not
                    // recorded (a single-member slot): it is lost.
                    return Some(Err(Error::OperationLost));
                }
                None
            }
            _ => Some(r),
        }
    }

    /// Moves a session off member `from` (which failed with `rv`, or is
    /// down): opens a session on another member, logs it in, and replays the
    /// session's operations there. Returns `false` when no member can take
    /// it.
    fn move_session(&self, sess: &Session, from: u32, rv: Option<CK_RV>) -> bool {
        self.probe_inline();
        let slot = &self.slots[sess.slot as usize];
        let mut st = sess.state.lock();
        if st.member != from {
            return true; // moved meanwhile by another thread
        }
        let failed = &slot.members[from as usize];
        // A member that only lost this session's state (a restart) may serve
        // it again when it is the only one left.
        let state_only = rv.is_some_and(router::lost_state_only);
        let mut excluded: u32 = 1 << from;
        loop {
            let target = router::pick(&slot.members, excluded).or_else(|| {
                (state_only && failed.vendor_slot().is_some() && excluded == 1 << from)
                    .then_some(from)
            });
            let Some(to) = target else {
                if let Some(rv) = rv {
                    tracing::warn!(slot = slot.cfg.id, member = %failed.name, rv = %crate::error::rv_name(rv),
                        "member failed and no other member can take its sessions");
                }
                return false;
            };
            if to != from {
                self.member_down(slot, from, rv);
            } else {
                // The member forgot this session, and maybe everything (a
                // restart): log it in again, find its objects again.
                failed.set_logged_in(false);
                failed.drop_control();
                self.objects.forget_member(sess.slot, from);
            }
            // A member that answered that the session is gone forgot it:
            // its number may already serve another session of ours there,
            // so it is neither closed nor kept to close later.
            let gone = rv.is_some_and(router::session_gone);
            match self.rebind(sess, &mut st, to, gone) {
                Ok(()) => {
                    failed
                        .stats
                        .failovers
                        .fetch_add(u64::from(to != from), Ordering::Relaxed);
                    tracing::info!(slot = slot.cfg.id, from = %failed.name, to = %slot.members[to as usize].name,
                        reason = %rv.map_or_else(|| "member down".to_owned(), crate::error::rv_name), "session moved");
                    if self.audit.is_some() {
                        let to = format!("to={}", slot.members[to as usize].name);
                        self.audit_member(
                            Kind::Failover,
                            "session_moved",
                            sess.slot,
                            from,
                            rv,
                            Some(to),
                        );
                    }
                    return true;
                }
                Err(e) => {
                    tracing::warn!(slot = slot.cfg.id, member = %slot.members[to as usize].name, error = %e,
                        "cannot move a session to this member");
                    if to != from {
                        self.member_down(slot, to, None);
                    }
                    excluded |= 1 << to;
                    if to == from {
                        return false;
                    }
                }
            }
        }
    }

    /// Marks a member down and wakes the recovery thread.
    fn member_down(&self, slot: &Slot, m: u32, rv: Option<CK_RV>) {
        objects::failed_on_this_thread(slot.cfg.id, m);
        let member = &slot.members[m as usize];
        if router::pick(&slot.members, 1 << m).is_none() {
            return; // never the last member up
        }
        if member.mark_down(slot.first_backoff()) {
            tracing::warn!(slot = slot.cfg.id, member = %member.name,
                rv = %rv.map_or_else(|| "-".to_owned(), crate::error::rv_name), "member marked down");
            if let Some(si) = self.slots.iter().position(|s| std::ptr::eq(s, slot)) {
                self.audit_member(Kind::Failover, "member_down", si as u32, m, rv, None);
            }
            self.recovery.nudge();
        }
    }

    /// Binds a session to member `to`: a new vendor session, the slot's
    /// login, then each operation started again with its input replayed.
    fn rebind(&self, sess: &Session, st: &mut SessionState, to: u32, old_gone: bool) -> Result<()> {
        let slot = &self.slots[sess.slot as usize];
        let member = &slot.members[to as usize];
        let vs = member.vendor_slot().ok_or(Error::TokenNotPresent)?;
        let mut vh: CK_SESSION_HANDLE = 0;
        member.session_opened();
        if let Err(e) = member.track(false, || {
            member.vendor.open_session(vs, sess.flags, &mut vh)
        }) {
            member.session_closed();
            return Err(e);
        }
        let result = (|| {
            self.ensure_login(slot, member, vh)?;
            // Session objects first: the operations may use them.
            for (h, t) in &st.recreate {
                let mut raw = t.to_raw();
                let mut v = CK_INVALID_HANDLE;
                match member
                    .vendor
                    .create_object(vh, Template::from_slice(&mut raw), &mut v)
                {
                    Ok(()) => self.objects.set_on_member(*h, to, v),
                    Err(Error::Vendor(rv)) if router::is_failover(rv, true) => {
                        return Err(Error::Vendor(rv));
                    }
                    Err(e) => {
                        tracing::warn!(member = %member.name, error = %e, "session object could not be re-created; it is lost")
                    }
                }
            }
            let lost_objects = st.owned.len().saturating_sub(st.recreate.len());
            if lost_objects > 0 {
                tracing::warn!(member = %member.name, objects = lost_objects,
                    "session objects not made from a template (generated, derived, unwrapped, copied) are lost with their member");
            }
            let mut lost = Vec::new();
            for (kind, rec) in st.ops.records() {
                if !rec.replayable() {
                    lost.push(kind);
                    continue;
                }
                match self.replay(sess.slot, to, member, vh, kind, rec) {
                    Ok(()) => {}
                    Err(Error::Vendor(rv)) if router::is_failover(rv, true) => {
                        return Err(Error::Vendor(rv));
                    }
                    Err(e) => {
                        tracing::warn!(member = %member.name, op = ?kind, error = %e, "operation could not be replayed");
                        lost.push(kind);
                    }
                }
            }
            if let Some(find) = &mut st.ops.find {
                match &find.template {
                    Some(t) => {
                        let mut raw = t.to_raw();
                        member
                            .vendor
                            .find_objects_init(vh, Template::from_slice(&mut raw))?;
                        find.restarted = true;
                    }
                    None => st.ops.find = None,
                }
            }
            Ok(lost)
        })();
        match result {
            Ok(lost) => {
                for k in lost {
                    st.ops.mark_lost(k);
                }
                let old = std::mem::replace(&mut st.member, to);
                let old_vh = std::mem::replace(&mut st.vendor, vh);
                sess.vendor.store(vh as u64, Ordering::Release);
                let old_member = &slot.members[old as usize];
                old_member.session_closed();
                if old_gone {
                    // Nothing to close (see `move_session`).
                } else if old_member.is_up() {
                    let _ = old_member.vendor.close_session(old_vh);
                } else {
                    // Closed when the member comes back, if it kept it.
                    old_member.orphan(old_vh);
                }
                Ok(())
            }
            Err(e) => {
                member.session_closed();
                let _ = member.vendor.close_session(vh);
                Err(e)
            }
        }
    }

    /// Starts an operation again on another member and feeds it the input
    /// given so far (outputs of the replayed updates are discarded: the
    /// application already has them).
    fn replay(
        &self,
        slot: u32,
        m: u32,
        member: &Member,
        vh: CK_SESSION_HANDLE,
        kind: OpKind,
        rec: &OpRecord,
    ) -> Result<()> {
        let Some(mech) = &rec.mechanism else {
            return Err(Error::OperationLost);
        };
        let raw = RawMechanism(mech.to_raw());
        let mech = raw.view();
        let key = if rec.key == CK_INVALID_HANDLE {
            CK_INVALID_HANDLE
        } else {
            self.object_on(slot, m, rec.key)?
        };
        let v = &member.vendor;
        match kind {
            OpKind::Encrypt => v.encrypt_init(vh, mech, key)?,
            OpKind::Decrypt => v.decrypt_init(vh, mech, key)?,
            OpKind::Digest => v.digest_init(vh, mech)?,
            OpKind::Sign => v.sign_init(vh, mech, key)?,
            OpKind::Verify => v.verify_init(vh, mech, key)?,
            OpKind::SignRecover => v.sign_recover_init(vh, mech, key)?,
            OpKind::VerifyRecover => v.verify_recover_init(vh, mech, key)?,
        }
        if rec.input.is_empty() {
            return Ok(());
        }
        let input = Bytes::from_slice(&rec.input);
        match kind {
            OpKind::Digest => v.digest_update(vh, input),
            OpKind::Sign => v.sign_update(vh, input),
            OpKind::Verify => v.verify_update(vh, input),
            OpKind::Encrypt | OpKind::Decrypt => {
                let mut scratch = Zeroizing::new(vec![0u8; rec.input.len() + 256]);
                let mut len: CK_ULONG = 0;
                let out = OutBytes::from_local(&mut scratch, &mut len);
                if kind == OpKind::Encrypt {
                    v.encrypt_update(vh, input, out)
                } else {
                    v.decrypt_update(vh, input, out)
                }
            }
            OpKind::SignRecover | OpKind::VerifyRecover => Ok(()),
        }
    }

    /// Logs a member in with the slot's credential when the slot is logged
    /// in and the member is not.
    fn ensure_login(&self, slot: &Slot, member: &Member, vh: CK_SESSION_HANDLE) -> Result<()> {
        if member.is_logged_in() {
            return Ok(());
        }
        let Some((user, pin)) = slot.credential()? else {
            return Ok(());
        };
        let mut r = member.vendor.login(vh, user, Bytes::from_slice(&pin));
        if matches!(r, Err(Error::Vendor(CKR_PIN_INCORRECT | CKR_PIN_EXPIRED)))
            && slot.pin_refused()
        {
            if let Some((user, pin)) = slot.credential()? {
                r = member.vendor.login(vh, user, Bytes::from_slice(&pin));
            }
        }
        match r {
            Ok(()) | Err(Error::Vendor(CKR_USER_ALREADY_LOGGED_IN)) => {
                member.set_logged_in(true);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// The vendor handle of an object on a member. An object not known
    /// there is looked up by its identity (through the member's own
    /// session); an unknown handle becomes `CK_INVALID_HANDLE`, so that the
    /// vendor answers with its own code for an invalid handle, in its own
    /// order of checks. A member failing during the lookup is an error (the
    /// session then moves).
    #[inline]
    fn object_on(&self, slot: u32, m: u32, h: CK_OBJECT_HANDLE) -> Result<CK_OBJECT_HANDLE> {
        match self.objects.on_member(h, slot, m) {
            Some(v) => Ok(v),
            None => Ok(self.resolve(slot, m, h, None)?.unwrap_or(CK_INVALID_HANDLE)),
        }
    }

    /// [`Library::object_on`] from code already running on the member's own
    /// session `cs` (its lock is held).
    fn object_on_in(
        &self,
        slot: u32,
        m: u32,
        h: CK_OBJECT_HANDLE,
        cs: CK_SESSION_HANDLE,
    ) -> Result<CK_OBJECT_HANDLE> {
        match self.objects.on_member(h, slot, m) {
            Some(v) => Ok(v),
            None => Ok(self
                .resolve(slot, m, h, Some(cs))?
                .unwrap_or(CK_INVALID_HANDLE)),
        }
    }

    /// Finds an object on a member by its identity.
    fn resolve(
        &self,
        slot: u32,
        m: u32,
        h: CK_OBJECT_HANDLE,
        cs: Option<CK_SESSION_HANDLE>,
    ) -> Result<Option<CK_OBJECT_HANDLE>> {
        let Some(e) = self.objects.get(h) else {
            return Ok(None);
        };
        let (true, Owner::Token, Some(id)) = (e.slot == slot, e.owner, e.identity) else {
            return Ok(None);
        };
        let member = &self.slots[slot as usize].members[m as usize];
        let found = match cs {
            Some(cs) => resync::find_identity(member, cs, &id)?,
            None => member.with_control(|cs| resync::find_identity(member, cs, &id))?,
        };
        let Some(found) = found else {
            tracing::debug!(member = %member.name, "object identity does not single out one object on this member");
            return Ok(None);
        };
        self.objects.set_on_member(h, m, found);
        Ok(Some(found))
    }

    /// The application's handle for a vendor object, issued on first sight.
    /// `creator` is the session that created it, `None` when it was found.
    fn app_object(
        &self,
        slot: u32,
        m: u32,
        vendor: &Vendor,
        vh: CK_SESSION_HANDLE,
        creator: Option<CK_SESSION_HANDLE>,
        o: CK_OBJECT_HANDLE,
    ) -> CK_OBJECT_HANDLE {
        if let Some(h) = self.objects.lookup_vendor(slot, m, o) {
            return h;
        }
        let (token, identity, info) = read_object(vendor, vh, o);
        let owner = match token {
            Some(false) => creator.map_or(Owner::SlotSessions, Owner::Session),
            _ => Owner::Token,
        };
        let h = self.objects.insert(slot, m, o, owner, identity, info);
        if let Owner::Session(creator) = owner {
            if let Some(sess) = self.sessions.get(creator) {
                sess.state.lock().owned.push(h);
            }
        }
        h
    }

    /// Probes due members from the application's own calls, when no
    /// recovery thread runs.
    #[inline]
    fn probe_inline(&self) {
        if self.no_threads {
            let now = Instant::now();
            let _ = recovery::Probe::probe_due(self, now);
            self.metrics_inline(now);
        }
    }

    /// Writes the metrics file from the application's call when it is due
    /// and no thread may write it.
    #[inline]
    fn metrics_inline(&self, now: Instant) {
        if let Some(m) = &self.metrics {
            if m.due(now) {
                m.write_inline(now, |m| metrics::text::render(self, m));
            }
        }
    }

    /// The start of a call that may end an operation, when metrics are on.
    #[inline(always)]
    fn op_clock(&self) -> Option<Instant> {
        self.metrics.as_ref().map(|_| Instant::now())
    }

    /// Counts an operation of `op` that ended on slot `slot`, with the
    /// duration of the call that ended it (metrics on).
    /// Without metrics this is one test of `start`, inlined in the caller.
    #[inline(always)]
    fn op_done(&self, slot: u32, op: Op, ok: bool, start: Option<Instant>) {
        if let Some(start) = start {
            self.op_record(slot, op, ok, start);
        }
    }

    fn op_record(&self, slot: u32, op: Op, ok: bool, start: Instant) {
        let now = Instant::now();
        self.slots[slot as usize].ops.record(op, ok, now - start);
        self.metrics_inline(now);
    }

    /// Runs a call that is a whole operation of `op` on session `h`, and
    /// counts it unless it was a size query or `CKR_BUFFER_TOO_SMALL`.
    #[inline]
    fn as_op<T>(
        &self,
        h: CK_SESSION_HANDLE,
        op: Op,
        size_query: bool,
        call: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let Some(start) = self.op_clock() else {
            return call();
        };
        let r = call();
        if final_outcome(&r, size_query) == Outcome::Ended {
            if let Some(sess) = self.sessions.get(h) {
                self.op_done(sess.slot, op, r.is_ok(), Some(start));
            }
        }
        r
    }

    /// Probes a down member: finds its token again, opens its session,
    /// logs it in, and returns it to service.
    fn probe(&self, si: u32, mi: u32) {
        let slot = &self.slots[si as usize];
        let member = &slot.members[mi as usize];
        let max = Duration::from_millis(slot.cfg.recovery_max_interval_ms);
        let found = match member.deadline {
            // A member that may hang is first asked for its token within
            // the deadline, so that the probe itself cannot hang.
            Some(t) => {
                let (v, cfg) = (member.vendor.clone(), member.cfg.clone());
                member
                    .bounded(t, move || resolve_member(&v, &cfg))
                    .ok()
                    .flatten()
            }
            None => resolve_member(&member.vendor, &member.cfg),
        };
        let Some(vs) = found else {
            member.probe_failed(max);
            return;
        };
        member.set_vendor_slot(Some(vs));
        member.set_recovering(true);
        // Sessions moved off the member while it was down, before any new
        // session of ours exists there (their numbers cannot be reused yet);
        // not while a call abandoned at its deadline may still use one.
        if member.abandoned.count() == 0 {
            for old in member.take_orphans() {
                let _ = member.vendor.close_session(old);
            }
        }
        member.close_control();
        let result = member.with_control(|cs| {
            self.ensure_login(slot, member, cs)?;
            // Its handles may have changed; what it missed is given to it
            // before it serves again.
            self.objects.forget_member(si, mi);
            self.resync(si, mi, cs)
        });
        member.set_recovering(false);
        match result {
            Ok(()) => {
                member.mark_up();
                let down_ms = member.down_for().as_millis() as u64;
                tracing::info!(slot = slot.cfg.id, member = %member.name, down_ms, "member recovered");
                let detail = Some(format!("down_ms={down_ms}"));
                self.audit_member(Kind::Recovery, "member_recovered", si, mi, None, detail);
            }
            Err(e) => {
                tracing::debug!(slot = slot.cfg.id, member = %member.name, error = %e, "probe failed");
                member.close_control();
                member.probe_failed(max);
            }
        }
    }
}

impl Library {
    /// The status of every virtual slot and its members, as JSON (the
    /// status query of `include/p11shim.h`).
    pub fn status_json(&self) -> String {
        let slots: Vec<serde_json::Value> = self
            .slots
            .iter()
            .enumerate()
            .map(|(si, s)| {
                let members: Vec<serde_json::Value> = s
                    .members
                    .iter()
                    .enumerate()
                    .map(|(i, m)| {
                        let st = &m.stats;
                        serde_json::json!({
                            "name": &*m.name,
                            "library": m.cfg.library.display().to_string(),
                            "token": m.cfg.selector.to_string(),
                            "state": router::state_name(m),
                            "standby": m.cfg.standby,
                            "weight": m.cfg.weight,
                            "sessions": self.member_sessions(si as u32, m),
                            "inflight": m.inflight(),
                            "logged_in": m.is_logged_in(),
                            "latency_us": st.latency_us.load(Ordering::Relaxed),
                            "sampled_calls": st.sampled.load(Ordering::Relaxed),
                            "errors": st.errors.load(Ordering::Relaxed),
                            "failovers": st.failovers.load(Ordering::Relaxed),
                            "recoveries": st.recoveries.load(Ordering::Relaxed),
                            "down_ms": (!m.is_up()).then(|| m.down_for().as_millis() as u64),
                            "missed_changes": s.journal.pending(i as u32),
                        })
                    })
                    .collect();
                serde_json::json!({
                    "id": s.cfg.id,
                    "label": s.cfg.label,
                    "serial": s.cfg.serial,
                    "logged_in": s.logged_in(),
                    "sessions": self.open_sessions(si as u32),
                    "members": members,
                })
            })
            .collect();
        serde_json::json!({
            "module": "p11shim",
            "version": env!("CARGO_PKG_VERSION"),
            "config": self.config.source.display().to_string(),
            "recovery_thread": !self.no_threads,
            "credentials": self.credentials.as_ref().map(|a| a.status_json()),
            "acl": self.acl_status(),
            "audit": self.audit.as_ref().map(|a| a.status_json()),
            "slots": slots,
        })
        .to_string()
    }
}

impl recovery::Probe for Library {
    fn probe_due(&self, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        for (si, slot) in self.slots.iter().enumerate() {
            for (mi, m) in slot.members.iter().enumerate() {
                if m.probe_due(now) {
                    self.probe(si as u32, mi as u32);
                }
                if let Some(n) = m.next_probe() {
                    next = Some(next.map_or(n, |x| x.min(n)));
                }
            }
        }
        next
    }
}

/// The attributes that identify an object on every member.
pub(super) fn identity_template(id: &Identity) -> Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)> {
    let mut t = Vec::with_capacity(4);
    if let Some(c) = id.class {
        t.push((CKA_CLASS, c.to_ne_bytes().to_vec()));
    }
    if let Some(v) = &id.id {
        t.push((CKA_ID, v.clone()));
    }
    if let Some(v) = &id.label {
        t.push((CKA_LABEL, v.clone()));
    }
    if let Some(k) = id.key_type {
        t.push((CKA_KEY_TYPE, k.to_ne_bytes().to_vec()));
    }
    t
}

/// Reads whether an object is a token object, its identity, and what the
/// ACL and the audit log know of it, in one call.
pub(super) fn read_object(
    vendor: &Vendor,
    vh: CK_SESSION_HANDLE,
    o: CK_OBJECT_HANDLE,
) -> (Option<bool>, Option<Identity>, Option<ObjectInfo>) {
    let mut token: CK_BBOOL = CK_FALSE;
    let mut class: CK_ULONG = 0;
    let mut key_type: CK_ULONG = 0;
    let mut id = [0u8; 128];
    let mut label = [0u8; 128];
    let mut unique_id = [0u8; 128];
    let mut modulus = [0u8; 1024];
    let mut ec_point = [0u8; 256];
    let mut check_value = [0u8; 16];
    fn attr(type_: CK_ATTRIBUTE_TYPE, buf: &mut [u8]) -> CK_ATTRIBUTE {
        CK_ATTRIBUTE {
            type_,
            pValue: buf.as_mut_ptr().cast(),
            ulValueLen: buf.len() as CK_ULONG,
        }
    }
    let ulong = std::mem::size_of::<CK_ULONG>() as CK_ULONG;
    let mut attrs = [
        CK_ATTRIBUTE {
            type_: CKA_TOKEN,
            pValue: (&mut token as *mut CK_BBOOL).cast(),
            ulValueLen: 1,
        },
        CK_ATTRIBUTE {
            type_: CKA_CLASS,
            pValue: (&mut class as *mut CK_ULONG).cast(),
            ulValueLen: ulong,
        },
        attr(CKA_ID, &mut id),
        attr(CKA_LABEL, &mut label),
        CK_ATTRIBUTE {
            type_: CKA_KEY_TYPE,
            pValue: (&mut key_type as *mut CK_ULONG).cast(),
            ulValueLen: ulong,
        },
        attr(CKA_UNIQUE_ID, &mut unique_id),
        attr(CKA_MODULUS, &mut modulus),
        attr(CKA_EC_POINT, &mut ec_point),
        attr(CKA_CHECK_VALUE, &mut check_value),
    ];
    match vendor.get_attribute_value(vh, o, Template::from_slice(&mut attrs)) {
        Ok(())
        | Err(Error::Vendor(
            CKR_ATTRIBUTE_TYPE_INVALID | CKR_ATTRIBUTE_SENSITIVE | CKR_BUFFER_TOO_SMALL,
        )) => {}
        Err(_) => return (None, None, None),
    }
    let len = |i: usize| {
        let n = attrs[i].ulValueLen;
        (n != CK_UNAVAILABLE_INFORMATION).then_some(n as usize)
    };
    let bytes = |i: usize, buf: &[u8]| len(i).map(|n| buf[..n.min(buf.len())].to_vec());
    let token = len(0).map(|_| token != CK_FALSE);
    let info = ObjectInfo::new(
        Attrs {
            class: len(1).map(|_| class as u64),
            key_type: len(4).map(|_| key_type as u64),
            id: bytes(2, &id),
            label: bytes(3, &label),
            unique_id: bytes(5, &unique_id),
        },
        bytes(6, &modulus).as_deref(),
        bytes(7, &ec_point).as_deref(),
        bytes(8, &check_value).as_deref(),
    );
    let identity = Identity {
        class: info.attrs.class.map(|c| c as CK_ULONG),
        id: info.attrs.id.clone(),
        label: info.attrs.label.clone(),
        key_type: info.attrs.key_type.map(|k| k as CK_ULONG),
    };
    // An identity without CKA_ID and CKA_LABEL does not single an object out.
    let useful = identity.class.is_some()
        && (identity.id.as_ref().is_some_and(|v| !v.is_empty())
            || identity.label.as_ref().is_some_and(|v| !v.is_empty()));
    (token, useful.then_some(identity), Some(info))
}

/// Finds a member's token among its vendor library's slots.
fn resolve_member(vendor: &Vendor, mc: &MemberConfig) -> Option<CK_SLOT_ID> {
    let mut count: CK_ULONG = 0;
    vendor
        .get_slot_list(
            CK_TRUE,
            crate::abi::mem::OutList::from_local(None, &mut count),
        )
        .ok()?;
    let mut ids = vec![0 as CK_SLOT_ID; count as usize];
    vendor
        .get_slot_list(
            CK_TRUE,
            crate::abi::mem::OutList::from_local(Some(&mut ids), &mut count),
        )
        .ok()?;
    ids.truncate(count as usize);
    let mut lib_info = None;
    ids.into_iter().find(|&id| {
        let mut ti = CK_TOKEN_INFO::default();
        if vendor.get_token_info(id, &mut ti).is_err() {
            return false;
        }
        match &mc.selector {
            TokenSelector::Label(l) => unpadded(&ti.label) == *l,
            TokenSelector::Uri(u) => {
                let eq = |want: &Option<String>, have: &[u8]| {
                    want.as_ref().is_none_or(|w| unpadded(have) == *w)
                };
                let mut ok = eq(&u.token, &ti.label)
                    && eq(&u.manufacturer, &ti.manufacturerID)
                    && eq(&u.serial, &ti.serialNumber)
                    && eq(&u.model, &ti.model)
                    && u.slot_id.is_none_or(|s| s == id as u64);
                if ok && (u.slot_description.is_some() || u.slot_manufacturer.is_some()) {
                    let mut si = CK_SLOT_INFO::default();
                    ok = vendor.get_slot_info(id, &mut si).is_ok()
                        && eq(&u.slot_description, &si.slotDescription)
                        && eq(&u.slot_manufacturer, &si.manufacturerID);
                }
                if ok && (u.library_manufacturer.is_some() || u.library_description.is_some()) {
                    let info = lib_info.get_or_insert_with(|| {
                        let mut i = CK_INFO::default();
                        vendor.get_info(&mut i).ok().map(|_| i)
                    });
                    ok = info.as_ref().is_some_and(|i| {
                        eq(&u.library_manufacturer, &i.manufacturerID)
                            && eq(&u.library_description, &i.libraryDescription)
                    });
                }
                ok
            }
        }
    })
}
