//! The workers of the HA benchmarks (`p11shim-bench --ha-worker <job> ...`),
//! each a child process of its own:
//!
//! * `setup`: SoftHSM2 called directly creates the same HMAC key on every
//!   member token (the RSA and EC keys are imported by `softhsm2-util`).
//! * `load`: N threads, each with its own session on the HA slot, sign for
//!   a bounded time (the load of the scaling and cost measurements).
//! * `failover`: sessions sign on every member of the slot; the fault module
//!   of one member is switched to `fail all CKR_DEVICE_ERROR`, and each
//!   session's wait for its next successful result is timed; repeated, the
//!   failing member taking turns.
//!
//! p11shim's status query (`C_GetInterface("p11shim")`) tells which member
//! each session went to, and confirms that sessions moved and that members
//! came back. Every return code is checked; an error that reaches the
//! application ends the run with the details.

use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pkcs11_sys::*;

use crate::p11::{Module, attr, attr_bytes, check, die, rv_name, set_who};
use crate::stats::Histogram;
use crate::worker::{Plan, ThreadResult, USER_PIN, drive};

/// The label of the HA slot's token, as p11shim shows it.
pub const SLOT_LABEL: &str = "ha";
/// Key labels and ids, the same on every member token.
pub const RSA_LABEL: &str = "ha-rsa";
pub const RSA_ID: &str = "01";
pub const EC_LABEL: &str = "ha-ec";
pub const EC_ID: &str = "02";
pub const HMAC_LABEL: &str = "ha-hmac";
const HMAC_ID: [u8; 1] = [0x03];

/// How the failover benchmark makes a member fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Every call returns `CKR_DEVICE_ERROR`.
    Error,
    /// Every call blocks (until the rule is removed).
    Hang,
}

impl Fault {
    pub fn name(self) -> &'static str {
        match self {
            Fault::Error => "error",
            Fault::Hang => "hang",
        }
    }

    pub fn parse(s: &str) -> Option<Fault> {
        [Fault::Error, Fault::Hang]
            .into_iter()
            .find(|f| f.name() == s)
    }

    /// The fault module's rule.
    pub fn rule(self) -> &'static str {
        match self {
            Fault::Error => "fail all CKR_DEVICE_ERROR",
            Fault::Hang => "hang all",
        }
    }
}

/// One signing operation: `C_SignInit` + `C_Sign`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HaOp {
    /// HMAC-SHA256 of 64 bytes: the cheap operation.
    Hmac,
    /// RSA-2048, PKCS#1 v1.5 with SHA-256, of 64 bytes.
    Rsa,
    /// ECDSA P-256 of a 32-byte hash.
    Ecdsa,
}

impl HaOp {
    pub fn name(self) -> &'static str {
        match self {
            HaOp::Hmac => "hmac",
            HaOp::Rsa => "rsa",
            HaOp::Ecdsa => "ecdsa",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            HaOp::Hmac => "HMAC-SHA256 sign, 64 B",
            HaOp::Rsa => "RSA-2048 sign, PKCS#1 v1.5 SHA-256",
            HaOp::Ecdsa => "ECDSA P-256 sign",
        }
    }

    pub fn parse(s: &str) -> Option<HaOp> {
        [HaOp::Hmac, HaOp::Rsa, HaOp::Ecdsa]
            .into_iter()
            .find(|o| o.name() == s)
    }

    fn mechanism(self) -> CK_MECHANISM_TYPE {
        match self {
            HaOp::Hmac => CKM_SHA256_HMAC,
            HaOp::Rsa => CKM_SHA256_RSA_PKCS,
            HaOp::Ecdsa => CKM_ECDSA,
        }
    }

    fn label(self) -> &'static str {
        match self {
            HaOp::Hmac => HMAC_LABEL,
            HaOp::Rsa => RSA_LABEL,
            HaOp::Ecdsa => EC_LABEL,
        }
    }

    fn class(self) -> CK_OBJECT_CLASS {
        match self {
            HaOp::Hmac => CKO_SECRET_KEY,
            HaOp::Rsa | HaOp::Ecdsa => CKO_PRIVATE_KEY,
        }
    }

    /// (input bytes, signature bytes).
    fn lengths(self) -> (usize, usize) {
        match self {
            HaOp::Hmac => (64, 32),
            HaOp::Rsa => (64, 256),
            HaOp::Ecdsa => (32, 64),
        }
    }
}

/// What the parent asked of an HA worker.
#[derive(Debug)]
pub enum HaJob {
    /// Create the HMAC key on these tokens (SoftHSM2 directly).
    Setup { tokens: Vec<String> },
    /// Sign on `threads` sessions of the HA slot.
    Load {
        op: HaOp,
        threads: usize,
        plan: Plan,
        /// The sessions are opened one after another before the threads
        /// start, instead of by the threads, at the same time.
        one_by_one: bool,
    },
    /// Fail a member under signing sessions, again and again.
    Failover(FailoverPlan),
}

/// What the failover benchmark does.
#[derive(Debug, Clone, Copy)]
pub struct FailoverPlan {
    pub op: HaOp,
    pub reps: usize,
    /// Signing sessions per member.
    pub per_member: usize,
    /// How long the sessions sign before the fault.
    pub warm: Duration,
    /// Pause of each session between two operations.
    pub think: Duration,
    pub fault: Fault,
}

#[derive(Debug)]
pub struct HaWorkerArgs {
    pub lib: PathBuf,
    pub job: HaJob,
}

pub fn run(args: HaWorkerArgs) {
    let what = match &args.job {
        HaJob::Setup { .. } => "HA setup worker",
        HaJob::Load { .. } => "HA load worker",
        HaJob::Failover { .. } => "HA failover worker",
    };
    set_who(what.to_string());
    let m = Module::load(&args.lib);
    m.initialize();
    match args.job {
        HaJob::Setup { tokens } => {
            let value = random_key();
            for t in &tokens {
                create_hmac_key(&m, m.find_slot(t), &value);
            }
            println!("RESULT setup=ok");
        }
        HaJob::Load {
            op,
            threads,
            plan,
            one_by_one,
        } => {
            let status = Status::load(&args.lib);
            load(&m, &status, op, threads, plan, one_by_one);
        }
        HaJob::Failover(plan) => {
            let status = Status::load(&args.lib);
            failover(&m, &status, plan);
        }
    }
    m.finalize();
}

// --- Setup -------------------------------------------------------------------

fn random_key() -> [u8; 32] {
    use std::io::Read;
    let mut k = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut k))
        .unwrap_or_else(|e| die(format_args!("cannot read /dev/urandom: {e}")));
    k
}

/// A token HMAC key (generic secret) with a given value, so that every
/// member holds the same key.
fn create_hmac_key(m: &Module, slot: CK_SLOT_ID, value: &[u8; 32]) {
    let s = m.open_session(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION);
    m.login_user(s, USER_PIN);
    let (t, fl) = (CK_TRUE, CK_FALSE);
    let (class, kt) = (CKO_SECRET_KEY, CKK_GENERIC_SECRET);
    let mut tmpl = [
        attr(CKA_CLASS, &class),
        attr(CKA_KEY_TYPE, &kt),
        attr(CKA_TOKEN, &t),
        attr(CKA_PRIVATE, &t),
        attr(CKA_SENSITIVE, &t),
        attr(CKA_EXTRACTABLE, &fl),
        attr(CKA_SIGN, &t),
        attr(CKA_VERIFY, &t),
        attr_bytes(CKA_LABEL, HMAC_LABEL.as_bytes()),
        attr_bytes(CKA_ID, &HMAC_ID),
        attr_bytes(CKA_VALUE, value),
    ];
    let mut h = CK_INVALID_HANDLE;
    // SAFETY: the template points to live values for the call.
    check(
        unsafe { (m.f.create_object)(s, tmpl.as_mut_ptr(), tmpl.len() as CK_ULONG, &mut h) },
        "C_CreateObject (HMAC key)",
    );
    m.logout(s);
    m.close_session(s);
}

// --- p11shim's status query -------------------------------------------------

type StatusFn = unsafe extern "C" fn(CK_UTF8CHAR_PTR, CK_ULONG_PTR) -> CK_RV;

/// p11shim's status query, from its own interface.
#[derive(Debug, Clone, Copy)]
pub struct Status {
    f: StatusFn,
}

/// One member of the HA slot, as the status query reports it.
#[derive(Debug, Clone)]
pub struct MemberStatus {
    pub library: String,
    pub state: String,
    pub logged_in: bool,
    pub sessions: u64,
    pub errors: u64,
    pub failovers: u64,
    pub recoveries: u64,
}

impl Status {
    /// Finds `C_GetInterface` in the module already loaded from `path`.
    pub fn load(path: &Path) -> Status {
        type GetInterface = unsafe extern "C" fn(
            CK_UTF8CHAR_PTR,
            CK_VERSION_PTR,
            CK_INTERFACE_PTR_PTR,
            CK_FLAGS,
        ) -> CK_RV;
        #[repr(C)]
        struct List {
            version: CK_VERSION,
            get_status: StatusFn,
        }
        // SAFETY: the module is loaded already (this takes one more
        // reference); it is never unloaded.
        let lib = unsafe { libloading::Library::new(path) }
            .unwrap_or_else(|e| die(format_args!("cannot load {}: {e}", path.display())));
        // SAFETY: C_GetInterface has the spec's signature.
        let gi = unsafe { lib.get::<GetInterface>(b"C_GetInterface\0") }
            .unwrap_or_else(|e| die(format_args!("{}: no C_GetInterface: {e}", path.display())));
        let mut iface: CK_INTERFACE_PTR = ptr::null_mut();
        // SAFETY: a NUL-terminated name, no version, a writable out pointer.
        check(
            unsafe {
                gi(
                    c"p11shim".as_ptr().cast_mut().cast(),
                    ptr::null_mut(),
                    &mut iface,
                    0,
                )
            },
            "C_GetInterface(\"p11shim\")",
        );
        if iface.is_null() {
            die("C_GetInterface(\"p11shim\") gave NULL");
        }
        // SAFETY: p11shim's own interface has this layout (include/p11shim.h).
        let f = unsafe { (*((*iface).pFunctionList as *const List)).get_status };
        std::mem::forget(lib);
        Status { f }
    }

    /// The status as JSON text.
    pub fn json(&self) -> String {
        let mut len: CK_ULONG = 0;
        // SAFETY: the size query of the two-call convention.
        check(
            unsafe { (self.f)(ptr::null_mut(), &mut len) },
            "P11shim_GetStatus",
        );
        let mut buf = vec![0u8; len as usize + 256];
        let mut len = buf.len() as CK_ULONG;
        // SAFETY: `buf` holds `len` bytes.
        check(
            unsafe { (self.f)(buf.as_mut_ptr(), &mut len) },
            "P11shim_GetStatus",
        );
        buf.truncate(len as usize);
        String::from_utf8(buf).unwrap_or_else(|_| die("P11shim_GetStatus: not UTF-8"))
    }

    /// The members of the first (only) slot.
    pub fn members(&self) -> Vec<MemberStatus> {
        let text = self.json();
        let v: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| die(format_args!("P11shim_GetStatus: bad JSON ({e}): {text}")));
        let members = v["slots"][0]["members"]
            .as_array()
            .unwrap_or_else(|| die(format_args!("P11shim_GetStatus: no members: {text}")));
        let num = |m: &serde_json::Value, k: &str| m[k].as_u64().unwrap_or(0);
        members
            .iter()
            .map(|m| MemberStatus {
                library: m["library"].as_str().unwrap_or("").to_string(),
                state: m["state"].as_str().unwrap_or("").to_string(),
                logged_in: m["logged_in"].as_bool().unwrap_or(false),
                sessions: num(m, "sessions"),
                errors: num(m, "errors"),
                failovers: num(m, "failovers"),
                recoveries: num(m, "recoveries"),
            })
            .collect()
    }
}

fn summary(ms: &[MemberStatus]) -> String {
    ms.iter()
        .enumerate()
        .map(|(i, m)| {
            format!(
                "member {i}: {} sessions={} errors={} failovers={} recoveries={} logged_in={}",
                m.state, m.sessions, m.errors, m.failovers, m.recoveries, m.logged_in
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

// --- Signing ------------------------------------------------------------------

/// One session signing with one key.
struct Signer {
    m: Module,
    s: CK_SESSION_HANDLE,
    key: CK_OBJECT_HANDLE,
    op: HaOp,
    data: [u8; 64],
    out: [u8; 512],
}

impl Signer {
    fn new(m: Module, s: CK_SESSION_HANDLE, key: CK_OBJECT_HANDLE, op: HaOp) -> Signer {
        Signer {
            m,
            s,
            key,
            op,
            data: [0x5a; 64],
            out: [0; 512],
        }
    }

    /// One operation; an error says which call failed and how.
    #[inline]
    fn try_sign(&mut self) -> Result<(), String> {
        let f = &self.m.f;
        let (input, want) = self.op.lengths();
        let mut mech = CK_MECHANISM {
            mechanism: self.op.mechanism(),
            pParameter: ptr::null_mut(),
            ulParameterLen: 0,
        };
        // SAFETY: a valid mechanism for the call.
        let rv = unsafe { (f.sign_init)(self.s, &mut mech, self.key) };
        if rv != CKR_OK {
            return Err(format!("C_SignInit returned {} (0x{rv:08x})", rv_name(rv)));
        }
        let mut n = self.out.len() as CK_ULONG;
        // SAFETY: input and output buffers of the lengths given.
        let rv = unsafe {
            (f.sign)(
                self.s,
                self.data.as_mut_ptr(),
                input as CK_ULONG,
                self.out.as_mut_ptr(),
                &mut n,
            )
        };
        if rv != CKR_OK {
            return Err(format!("C_Sign returned {} (0x{rv:08x})", rv_name(rv)));
        }
        if n as usize != want {
            return Err(format!("C_Sign gave {n} bytes, expected {want}"));
        }
        Ok(())
    }

    #[inline]
    fn sign(&mut self) {
        if let Err(e) = self.try_sign() {
            die(e);
        }
    }
}

/// The HA slot, a base session logged in for the whole run (so that the
/// slot stays logged in whatever the measured sessions do), and the key.
fn open_slot(m: &Module, op: HaOp) -> (CK_SLOT_ID, CK_SESSION_HANDLE, CK_OBJECT_HANDLE) {
    let slot = m.find_slot(SLOT_LABEL);
    let base = m.open_session(slot, CKF_SERIAL_SESSION);
    m.login_user(base, USER_PIN);
    let key = m.find_one(base, op.class(), op.label());
    (slot, base, key)
}

/// Every member must be up, with no error and no session moved: a load
/// measurement with a member failing would measure something else.
fn expect_healthy(ms: &[MemberStatus], when: &str) {
    if ms.iter().any(|m| {
        !matches!(m.state.as_str(), "active" | "standby") || m.errors != 0 || m.failovers != 0
    }) {
        die(format_args!(
            "{when}, a member is not healthy: {}",
            summary(ms)
        ));
    }
}

fn load(m: &Module, status: &Status, op: HaOp, threads: usize, plan: Plan, one_by_one: bool) {
    let (slot, base, key) = open_slot(m, op);
    let opened: Vec<Option<CK_SESSION_HANDLE>> = (0..threads)
        .map(|_| one_by_one.then(|| m.open_session(slot, CKF_SERIAL_SESSION)))
        .collect();
    let ready = Barrier::new(threads + 1);
    let go = Barrier::new(threads + 1);
    let (results, during): (Vec<ThreadResult>, Vec<MemberStatus>) = std::thread::scope(|sc| {
        let handles: Vec<_> = opened
            .iter()
            .map(|&opened| {
                let (ready, go) = (&ready, &go);
                sc.spawn(move || {
                    // As a pool of application threads does: each opens its
                    // session, all at the same time.
                    let s = opened.unwrap_or_else(|| m.open_session(slot, CKF_SERIAL_SESSION));
                    let mut signer = Signer::new(*m, s, key, op);
                    ready.wait();
                    go.wait();
                    let r = drive(plan, || signer.sign());
                    m.close_session(s);
                    r
                })
            })
            .collect();
        ready.wait();
        // Every thread's session is open: where did they go?
        let during = status.members();
        go.wait();
        let results = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| die("a benchmark thread panicked"))
            })
            .collect();
        (results, during)
    });
    expect_healthy(&status.members(), "after the run");
    m.logout(base);
    m.close_session(base);

    let ops: u64 = results.iter().map(|r| r.ops).sum();
    let rate: f64 = results
        .iter()
        .map(|r| r.ops as f64 / r.elapsed.as_secs_f64().max(1e-9))
        .sum();
    let mut hist = Histogram::new();
    for r in &results {
        hist.merge(&r.hist);
    }
    let sessions: Vec<String> = during.iter().map(|m| m.sessions.to_string()).collect();
    println!(
        "RESULT ops={ops} rate={rate:.3} sessions={} hist={}",
        sessions.join("/"),
        hist.encode()
    );
}

// --- Failover ------------------------------------------------------------------

/// Shared by the controller and the signing threads of one repetition.
struct Rep {
    epoch: Instant,
    /// T0 in nanoseconds since `epoch`, stored once the fault is in place;
    /// 0 before.
    armed: AtomicU64,
    stop: AtomicBool,
    /// Threads that completed their first operation begun after T0.
    done: AtomicUsize,
    failed: AtomicBool,
}

impl Rep {
    #[inline]
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

/// What one session saw in one repetition.
#[derive(Debug, Default)]
struct Seen {
    /// T0 to the end of the first operation begun after T0.
    from_t0: Option<u64>,
    /// The longest operation that ended after T0, up to that one.
    held: u64,
    /// Operations, all told.
    ops: u64,
    error: Option<(u64, String)>,
}

fn signing_thread(rep: &Rep, start: &Barrier, think: Duration, mut signer: Signer) -> Seen {
    let mut seen = Seen::default();
    // One operation before the clock starts: the session is in use and the
    // key known on its member.
    if let Err(e) = signer.try_sign() {
        seen.error = Some((0, format!("before the fault: {e}")));
        rep.failed.store(true, Ordering::Release);
    }
    seen.ops += 1;
    start.wait();
    if seen.error.is_some() {
        return seen;
    }
    while !rep.stop.load(Ordering::Acquire) {
        let armed = rep.armed.load(Ordering::Acquire);
        let t = rep.now();
        let r = signer.try_sign();
        let end = rep.now();
        seen.ops += 1;
        if let Err(e) = r {
            let t0 = rep.armed.load(Ordering::Acquire);
            let since = if t0 == 0 { 0 } else { end.saturating_sub(t0) };
            seen.error = Some((since, e));
            rep.failed.store(true, Ordering::Release);
            return seen;
        }
        if seen.from_t0.is_none() && rep.armed.load(Ordering::Acquire) != 0 {
            seen.held = seen.held.max(end - t);
            if armed != 0 {
                seen.from_t0 = Some(end.saturating_sub(armed));
                rep.done.fetch_add(1, Ordering::AcqRel);
            }
        }
        if !think.is_zero() {
            std::thread::sleep(think);
        }
    }
    seen
}

/// Replaces a member's fault rules (a new file renamed into place: the
/// fault module sees the change at its next call).
pub fn set_rules(ctl: &Path, rules: &str) {
    let mut tmp = ctl.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, rules)
        .unwrap_or_else(|e| die(format_args!("cannot write {}: {e}", tmp.display())));
    std::fs::rename(&tmp, ctl)
        .unwrap_or_else(|e| die(format_args!("cannot install {}: {e}", ctl.display())));
}

/// Waits until every member is up and logged in (the one that failed last
/// has recovered).
fn wait_all_up(status: &Status, limit: Duration) -> Vec<MemberStatus> {
    let start = Instant::now();
    loop {
        let ms = status.members();
        if ms.iter().all(|m| m.state == "active" && m.logged_in) {
            return ms;
        }
        if start.elapsed() > limit {
            die(format_args!(
                "a member did not recover within {limit:?}: {}",
                summary(&ms)
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Per-repetition statistics, in nanoseconds.
#[derive(Debug, Default)]
struct Tally {
    from_t0: Histogram,
    held: Histogram,
    max_from_t0: u64,
    max_held: u64,
    sessions: u64,
}

impl Tally {
    fn add(&mut self, from_t0: u64, held: u64) {
        self.from_t0.record(from_t0);
        self.held.record(held);
        self.max_from_t0 = self.max_from_t0.max(from_t0);
        self.max_held = self.max_held.max(held);
        self.sessions += 1;
    }

    fn fields(&self, prefix: &str) -> String {
        format!(
            "{prefix}_n={} {prefix}_t0_max={} {prefix}_held_max={} {prefix}_t0={} {prefix}_held={}",
            self.sessions,
            self.max_from_t0,
            self.max_held,
            self.from_t0.encode(),
            self.held.encode()
        )
    }
}

fn failover(m: &Module, status: &Status, plan: FailoverPlan) {
    let FailoverPlan {
        op,
        reps,
        per_member,
        warm,
        think,
        fault,
    } = plan;
    let (slot, base, key) = open_slot(m, op);
    let first = wait_all_up(status, Duration::from_secs(10));
    let members = first.len();
    if members < 2 {
        die("the failover benchmark needs a slot with at least 2 members");
    }
    let ctl: Vec<PathBuf> = first
        .iter()
        .map(|ms| PathBuf::from(format!("{}.ctl", ms.library)))
        .collect();
    let (mut affected, mut others) = (Tally::default(), Tally::default());
    let mut total_ops = 0u64;
    let started = Instant::now();
    for rep_no in 0..reps {
        let mut before = wait_all_up(status, Duration::from_secs(10));
        // Open the sessions one by one, noting the member each one went to.
        let mut sessions: Vec<(CK_SESSION_HANDLE, usize)> = Vec::new();
        for _ in 0..members * per_member {
            let h = m.open_session(slot, CKF_SERIAL_SESSION);
            let now = status.members();
            let grew: Vec<usize> = (0..members)
                .filter(|&i| now[i].sessions == before[i].sessions + 1)
                .collect();
            match grew.as_slice() {
                [i] => sessions.push((h, *i)),
                _ => die(format_args!(
                    "cannot tell which member a new session went to: before {}, after {}",
                    summary(&before),
                    summary(&now)
                )),
            }
            before = now;
        }
        let victim = rep_no % members;
        let on_victim = sessions.iter().filter(|(_, i)| *i == victim).count();
        if on_victim == 0 {
            die(format_args!(
                "no session went to member {victim}: {}",
                summary(&before)
            ));
        }

        let rep = Rep {
            epoch: Instant::now(),
            armed: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            done: AtomicUsize::new(0),
            failed: AtomicBool::new(false),
        };
        let start = Barrier::new(sessions.len() + 1);
        let seen: Vec<Seen> = std::thread::scope(|sc| {
            let handles: Vec<_> = sessions
                .iter()
                .map(|&(h, _)| {
                    let (rep, start) = (&rep, &start);
                    let signer = Signer::new(*m, h, key, op);
                    sc.spawn(move || signing_thread(rep, start, think, signer))
                })
                .collect();
            start.wait();
            std::thread::sleep(warm);
            // T0: the fault is in place; every call that starts from now on
            // fails (or blocks) on the victim (the fault module reads its
            // rules at the start of every call).
            set_rules(&ctl[victim], fault.rule());
            rep.armed.store(rep.now().max(1), Ordering::Release);
            let limit = Duration::from_secs(10);
            let t0 = Instant::now();
            while rep.done.load(Ordering::Acquire) < sessions.len()
                && !rep.failed.load(Ordering::Acquire)
            {
                if t0.elapsed() > limit {
                    die(format_args!(
                        "repetition {rep_no}: {} of {} sessions completed no operation within {limit:?} of member {victim} failing; status: {}",
                        sessions.len() - rep.done.load(Ordering::Acquire),
                        sessions.len(),
                        summary(&status.members())
                    ));
                }
                std::thread::sleep(Duration::from_micros(100));
            }
            rep.stop.store(true, Ordering::Release);
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| die("a benchmark thread panicked"))
                })
                .collect()
        });
        set_rules(&ctl[victim], "");

        let after = status.members();
        for (s, &(_, member)) in seen.iter().zip(&sessions) {
            if let Some((since, e)) = &s.error {
                die(format_args!(
                    "repetition {rep_no}: member {victim} failed ({}); a session on member {member} got an error {:.3} ms after T0: {e}; status: {}",
                    fault.rule(),
                    *since as f64 / 1e6,
                    summary(&after)
                ));
            }
        }
        let moved = after[victim].failovers - before[victim].failovers;
        if moved != on_victim as u64 {
            die(format_args!(
                "repetition {rep_no}: {on_victim} session(s) were on member {victim} when it failed, {moved} moved; status: {}",
                summary(&after)
            ));
        }
        for (s, &(_, member)) in seen.iter().zip(&sessions) {
            total_ops += s.ops;
            let t = s
                .from_t0
                .unwrap_or_else(|| die("a session recorded no operation after T0"));
            if member == victim {
                affected.add(t, s.held);
            } else {
                others.add(t, s.held);
            }
        }
        for (h, _) in sessions {
            m.close_session(h);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    wait_all_up(status, Duration::from_secs(10));
    m.logout(base);
    m.close_session(base);
    println!(
        "RESULT reps={reps} members={members} ops={total_ops} secs={secs:.3} {} {}",
        affected.fields("aff"),
        others.fields("oth")
    );
}
