//! The worker: one child process that loads one module (SoftHSM2, p11shim
//! or p11-kit's proxy) and either creates the benchmark's objects, lists its
//! slots, or runs one case on N threads, timed or for a fixed count, and
//! prints one `RESULT` line for the parent.
//!
//! Each thread has its own session; a base session stays open (and logged
//! in) for the whole run, so that closing a session never logs out or
//! empties the module's session table.

use std::path::PathBuf;
use std::ptr;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use pkcs11_sys::*;

use crate::p11::{Module, attr, attr_bytes, check, die, set_who};
use crate::stats::Histogram;

pub const TOKEN_LABEL: &str = "bench";
pub const SO_PIN: &str = "5678";
pub const USER_PIN: &str = "1234";
/// Labels of the keys and of the data objects the setup creates.
pub const RSA_LABEL: &str = "bench-rsa";
pub const EC_LABEL: &str = "bench-ec";
pub const AES_LABEL: &str = "bench-aes";
pub const HMAC_LABEL: &str = "bench-hmac";
/// The HMAC session key each worker generates for `hmac-session-sign`.
pub const HMAC_SESSION_LABEL: &str = "bench-hmac-session";
pub const DATA_OBJECTS: usize = 8;
/// The data object searched for by label.
pub const FIND_LABEL: &str = "bench-data-3";

/// DER of the OID of P-256 (prime256v1).
const P256_OID: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// One measured operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Case {
    Digest,
    RsaSign,
    EcdsaSign,
    AesGcm,
    Find,
    Session,
    GetAttr,
    HmacSign,
    HmacSessionSign,
}

impl Case {
    pub const ALL: [Case; 9] = [
        Case::Digest,
        Case::RsaSign,
        Case::EcdsaSign,
        Case::AesGcm,
        Case::Find,
        Case::Session,
        Case::GetAttr,
        Case::HmacSign,
        Case::HmacSessionSign,
    ];

    /// The cases of the plain timed comparison (`p11shim-bench` without a
    /// mode); `hmac-sign` and `hmac-session-sign` belong to `--acl`.
    pub const DEFAULT: [Case; 7] = [
        Case::Digest,
        Case::RsaSign,
        Case::EcdsaSign,
        Case::AesGcm,
        Case::Find,
        Case::Session,
        Case::GetAttr,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Case::Digest => "digest",
            Case::RsaSign => "rsa-sign",
            Case::EcdsaSign => "ecdsa-sign",
            Case::AesGcm => "aes-gcm",
            Case::Find => "find",
            Case::Session => "session",
            Case::GetAttr => "get-attr",
            Case::HmacSign => "hmac-sign",
            Case::HmacSessionSign => "hmac-session-sign",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Case::Digest => "SHA-256, 64 B (DigestInit+Digest)",
            Case::RsaSign => "RSA-2048 sign, PKCS#1 v1.5 SHA-256",
            Case::EcdsaSign => "ECDSA P-256 sign",
            Case::AesGcm => "AES-256-GCM encrypt, 4 KiB",
            Case::Find => "FindObjects by label (Init+Find+Final)",
            Case::Session => "OpenSession+CloseSession",
            Case::GetAttr => "GetAttributeValue (CKA_LABEL)",
            Case::HmacSign => "HMAC-SHA256 sign, 64 B",
            Case::HmacSessionSign => "HMAC-SHA256 sign, 64 B, session key",
        }
    }

    pub fn parse(s: &str) -> Option<Case> {
        Case::ALL.into_iter().find(|c| c.name() == s)
    }
}

/// A paced thread's sleep when it is ahead of its schedule.
const PACE_SLEEP: Duration = Duration::from_micros(500);

/// How long a case runs.
#[derive(Debug, Clone, Copy)]
pub enum Plan {
    /// Warm up, then measure for a fixed time; with `rate`, each thread
    /// starts operations on an open-loop schedule of `rate` per second
    /// (the ones due run back to back, then the thread sleeps about
    /// 0.5 ms), else back to back.
    Timed {
        warmup: Duration,
        measure: Duration,
        rate: Option<f64>,
    },
    /// A fixed number of operations, untimed (for instruction counts).
    Count(u64),
}

/// What the parent asked of the worker.
#[derive(Debug)]
pub enum Job {
    Setup,
    ListSlots,
    /// Checks that p11shim's `[acl]` is in force (`--acl` runs it on the
    /// audited target before measuring).
    AclProbe,
    Run {
        case: Case,
        threads: usize,
        plan: Plan,
        /// Report p11shim's audit counters (its status query) at the end.
        audit_status: bool,
    },
}

#[derive(Debug)]
pub struct WorkerArgs {
    pub target: String,
    pub lib: PathBuf,
    pub job: Job,
}

/// The objects the cases use, as this module's handles; only those of the
/// case being run are looked up (a role's ACL may hide the others), the
/// rest stay `CK_INVALID_HANDLE`.
#[derive(Debug, Clone, Copy)]
struct Keys {
    rsa: CK_OBJECT_HANDLE,
    ec: CK_OBJECT_HANDLE,
    aes: CK_OBJECT_HANDLE,
    rsa_pub: CK_OBJECT_HANDLE,
    hmac: CK_OBJECT_HANDLE,
}

impl Keys {
    fn for_case(m: &Module, s: CK_SESSION_HANDLE, case: Case) -> Keys {
        let mut k = Keys {
            rsa: CK_INVALID_HANDLE,
            ec: CK_INVALID_HANDLE,
            aes: CK_INVALID_HANDLE,
            rsa_pub: CK_INVALID_HANDLE,
            hmac: CK_INVALID_HANDLE,
        };
        match case {
            Case::RsaSign => k.rsa = m.find_one(s, CKO_PRIVATE_KEY, RSA_LABEL),
            Case::EcdsaSign => k.ec = m.find_one(s, CKO_PRIVATE_KEY, EC_LABEL),
            Case::AesGcm => k.aes = m.find_one(s, CKO_SECRET_KEY, AES_LABEL),
            Case::GetAttr => k.rsa_pub = m.find_one(s, CKO_PUBLIC_KEY, RSA_LABEL),
            Case::HmacSign => k.hmac = m.find_one(s, CKO_SECRET_KEY, HMAC_LABEL),
            Case::HmacSessionSign => k.hmac = hmac_key(m, s, HMAC_SESSION_LABEL, false),
            Case::Digest | Case::Find | Case::Session => {}
        }
        k
    }
}

/// p11shim's `CKR_P11SHIM_AUDIT_UNAVAILABLE` (include/p11shim.h): a
/// fail-closed audit log could not take the record, the call was refused.
pub const CKR_P11SHIM_AUDIT_UNAVAILABLE: CK_RV = CKR_VENDOR_DEFINED | 0x5053_0006;

/// p11shim's audit counters, from its status query.
#[derive(Debug, Clone, Copy)]
struct AuditStatus {
    written: u64,
    lost: u64,
    queued: u64,
    healthy: bool,
    checkpoints: u64,
    /// CPU time of the writer thread so far, in nanoseconds.
    writer_cpu_ns: Option<u64>,
}

pub fn run(args: WorkerArgs) {
    set_who(format!("{} worker", args.target));
    let m = Module::load(&args.lib);
    m.initialize();
    match args.job {
        Job::ListSlots => {
            for (id, description, manufacturer) in m.slots() {
                println!("SLOT\t{id}\t{description}\t{manufacturer}");
            }
            for t in m.tokens() {
                println!(
                    "TOKEN\t{}\t{}\t{}\t{}",
                    t.id, t.label, t.manufacturer, t.model
                );
            }
        }
        Job::Setup => {
            let slot = m.find_slot(TOKEN_LABEL);
            create_objects(&m, slot);
            println!("RESULT setup=ok");
        }
        Job::AclProbe => {
            let slot = m.find_slot(TOKEN_LABEL);
            acl_probe(&m, slot);
            println!("RESULT acl=enforced");
        }
        Job::Run {
            case,
            threads,
            plan,
            audit_status,
        } => {
            let slot = m.find_slot(TOKEN_LABEL);
            let base = m.open_session(slot, CKF_SERIAL_SESSION);
            m.login_user(base, USER_PIN);
            let keys = Keys::for_case(&m, base, case);
            let results = run_threads(&m, slot, keys, case, threads, plan);
            let audit = audit_status.then(|| drained_audit_status(&args.lib));
            report(&results, plan, audit);
            m.logout(base);
            m.close_session(base);
        }
    }
    m.finalize();
}

/// What one thread measured.
#[derive(Debug)]
pub(crate) struct ThreadResult {
    /// Operations measured.
    pub(crate) ops: u64,
    /// Operations made, warm-up included.
    pub(crate) all: u64,
    /// Operations p11shim refused because its fail-closed audit log could
    /// not take their record (`CKR_P11SHIM_AUDIT_UNAVAILABLE`).
    pub(crate) refused: u64,
    pub(crate) elapsed: Duration,
    pub(crate) hist: Histogram,
}

fn run_threads(
    m: &Module,
    slot: CK_SLOT_ID,
    keys: Keys,
    case: Case,
    threads: usize,
    plan: Plan,
) -> Vec<ThreadResult> {
    let barrier = Barrier::new(threads);
    std::thread::scope(|sc| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let barrier = &barrier;
                sc.spawn(move || {
                    let mut ctx = Ctx::new(*m, slot, keys);
                    barrier.wait();
                    let mut r = match case {
                        Case::Digest => drive(plan, || ctx.digest()),
                        Case::RsaSign => drive(plan, || ctx.rsa_sign()),
                        Case::EcdsaSign => drive(plan, || ctx.ecdsa_sign()),
                        Case::AesGcm => drive(plan, || ctx.aes_gcm()),
                        Case::Find => drive(plan, || ctx.find()),
                        Case::Session => drive(plan, || ctx.open_close()),
                        Case::GetAttr => drive(plan, || ctx.get_label()),
                        Case::HmacSign | Case::HmacSessionSign => drive(plan, || ctx.hmac_sign()),
                    };
                    r.refused = ctx.refused;
                    ctx.close();
                    r
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| die("a benchmark thread panicked"))
            })
            .collect()
    })
}

/// Runs `op` as the plan says. Timed: one clock read per operation; the
/// latency of an operation is the time between two reads.
pub(crate) fn drive<F: FnMut()>(plan: Plan, mut op: F) -> ThreadResult {
    match plan {
        Plan::Count(n) => {
            for _ in 0..n {
                op();
            }
            ThreadResult {
                ops: n,
                all: n,
                refused: 0,
                elapsed: Duration::ZERO,
                hist: Histogram::new(),
            }
        }
        Plan::Timed {
            warmup,
            measure,
            rate,
        } => {
            let start = Instant::now();
            let (warm_end, end) = (start + warmup, start + warmup + measure);
            // Operations due by `now` on the schedule (all, without a rate).
            let due =
                |now: Instant| rate.map_or(u64::MAX, |r| ((now - start).as_secs_f64() * r) as u64);
            let mut now = start;
            let mut warm = 0u64;
            while now < warm_end {
                if warm >= due(now) {
                    std::thread::sleep(PACE_SLEEP);
                    now = Instant::now();
                    continue;
                }
                op();
                warm += 1;
                now = Instant::now();
            }
            let first = now;
            let mut hist = Histogram::new();
            let mut ops = 0u64;
            while now < end {
                if warm + ops >= due(now) {
                    std::thread::sleep(PACE_SLEEP);
                    now = Instant::now();
                    continue;
                }
                op();
                let t = Instant::now();
                hist.record((t - now).as_nanos() as u64);
                ops += 1;
                now = t;
            }
            ThreadResult {
                ops,
                all: warm + ops,
                refused: 0,
                elapsed: now - first,
                hist,
            }
        }
    }
}

/// `RESULT ops=<n> all=<n> refused=<n> [rate=<ops/s> hist=<histogram>]
/// [audit_written=... audit_lost=... ...]`; the rate is the sum of the
/// threads' rates.
fn report(results: &[ThreadResult], plan: Plan, audit: Option<AuditStatus>) {
    let ops: u64 = results.iter().map(|r| r.ops).sum();
    let all: u64 = results.iter().map(|r| r.all).sum();
    let refused: u64 = results.iter().map(|r| r.refused).sum();
    let mut line = format!("RESULT ops={ops} all={all} refused={refused}");
    if let Plan::Timed { .. } = plan {
        let rate: f64 = results
            .iter()
            .map(|r| r.ops as f64 / r.elapsed.as_secs_f64().max(1e-9))
            .sum();
        let mut hist = Histogram::new();
        for r in results {
            hist.merge(&r.hist);
        }
        line += &format!(" rate={rate:.3} hist={}", hist.encode());
    }
    if let Some(a) = audit {
        line += &format!(
            " audit_written={} audit_lost={} audit_queued={} audit_healthy={} audit_checkpoints={}",
            a.written, a.lost, a.queued, a.healthy, a.checkpoints
        );
        if let Some(ns) = a.writer_cpu_ns {
            line += &format!(" audit_writer_cpu_ns={ns}");
        }
    }
    println!("{line}");
}

/// p11shim's audit counters once its writer has emptied the queue (polled
/// every 10 ms, for at most 5 s; whatever is still queued then is reported
/// as such). A module without an audit section ends the run: a benchmark
/// of the audit path must not measure a module that does not audit.
fn drained_audit_status(lib: &std::path::Path) -> AuditStatus {
    let status = crate::ha_worker::Status::load(lib);
    let mut last = None;
    for _ in 0..500 {
        let text = status.json();
        let v: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| die(format_args!("P11shim_GetStatus: bad JSON ({e}): {text}")));
        let a = &v["audit"];
        if !a.is_object() {
            die(format_args!(
                "P11shim_GetStatus has no audit section: the module does not audit ({text})"
            ));
        }
        let num = |k: &str| {
            a[k].as_u64().unwrap_or_else(|| {
                die(format_args!("P11shim_GetStatus: audit.{k} missing: {text}"))
            })
        };
        let st = AuditStatus {
            written: num("written"),
            lost: num("lost"),
            queued: num("queued"),
            healthy: a["healthy"].as_bool().unwrap_or(false),
            checkpoints: num("checkpoints"),
            writer_cpu_ns: None,
        };
        last = Some(st);
        if st.queued == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut st = last.unwrap_or_else(|| die("P11shim_GetStatus: no answer"));
    st.writer_cpu_ns = thread_cpu_ns("p11shim-audit");
    st
}

/// The CPU time, in nanoseconds, of this process's thread named `name`
/// (from /proc/self/task/*/comm), read through its per-thread CPU clock.
fn thread_cpu_ns(name: &str) -> Option<u64> {
    let tasks = std::fs::read_dir("/proc/self/task").ok()?;
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let tid: libc::pid_t = t.file_name().to_str()?.parse().ok()?;
        // The kernel's per-thread CPU clock id of a thread of this process
        // (MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED), as glibc's
        // pthread_getcpuclockid builds it).
        let clock: libc::clockid_t = ((!tid) << 3) | 6;
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a writable timespec; an invalid clock id is an error return.
        if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
            return None;
        }
        return Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64);
    }
    None
}

const MSG: [u8; 64] = [0x5a; 64];
const GCM_IN: usize = 4096;
const GCM_TAG: usize = 16;

/// One thread's session and buffers.
struct Ctx {
    m: Module,
    slot: CK_SLOT_ID,
    keys: Keys,
    s: CK_SESSION_HANDLE,
    data: [u8; 64],
    out: Vec<u8>,
    gcm_in: Vec<u8>,
    iv: [u8; 12],
    counter: u64,
    label: [u8; 64],
    /// Signatures refused by a fail-closed audit log.
    refused: u64,
}

impl Ctx {
    fn new(m: Module, slot: CK_SLOT_ID, keys: Keys) -> Ctx {
        let s = m.open_session(slot, CKF_SERIAL_SESSION);
        Ctx {
            m,
            slot,
            keys,
            s,
            data: MSG,
            out: vec![0; GCM_IN + GCM_TAG],
            gcm_in: vec![0xa5; GCM_IN],
            iv: [0; 12],
            counter: 0,
            label: [0; 64],
            refused: 0,
        }
    }

    fn close(&self) {
        self.m.close_session(self.s);
    }

    #[inline]
    fn expect_len(what: &str, got: CK_ULONG, want: usize) {
        if got as usize != want {
            die(format_args!("{what} gave {got} bytes, expected {want}"));
        }
    }

    fn digest(&mut self) {
        let f = &self.m.f;
        let mut mech = CK_MECHANISM {
            mechanism: CKM_SHA256,
            pParameter: ptr::null_mut(),
            ulParameterLen: 0,
        };
        // SAFETY: a valid mechanism for the call.
        check(
            unsafe { (f.digest_init)(self.s, &mut mech) },
            "C_DigestInit",
        );
        let mut n = self.out.len() as CK_ULONG;
        // SAFETY: input and output buffers of the lengths given.
        check(
            unsafe {
                (f.digest)(
                    self.s,
                    self.data.as_mut_ptr(),
                    64,
                    self.out.as_mut_ptr(),
                    &mut n,
                )
            },
            "C_Digest",
        );
        Self::expect_len("C_Digest", n, 32);
    }

    fn sign(
        &mut self,
        mechanism: CK_MECHANISM_TYPE,
        key: CK_OBJECT_HANDLE,
        input: usize,
        sig: usize,
    ) {
        let f = &self.m.f;
        let mut mech = CK_MECHANISM {
            mechanism,
            pParameter: ptr::null_mut(),
            ulParameterLen: 0,
        };
        // SAFETY: a valid mechanism for the call.
        let rv = unsafe { (f.sign_init)(self.s, &mut mech, key) };
        if rv == CKR_P11SHIM_AUDIT_UNAVAILABLE {
            // Counted and reported: the parent decides what a refusal means
            // for the measurement.
            self.refused += 1;
            return;
        }
        check(rv, "C_SignInit");
        let mut n = self.out.len() as CK_ULONG;
        // SAFETY: input and output buffers of the lengths given.
        check(
            unsafe {
                (f.sign)(
                    self.s,
                    self.data.as_mut_ptr(),
                    input as CK_ULONG,
                    self.out.as_mut_ptr(),
                    &mut n,
                )
            },
            "C_Sign",
        );
        Self::expect_len("C_Sign", n, sig);
    }

    /// HMAC-SHA256 of 64 bytes: a cheap signature whose vendor cost does
    /// not vary, so that instruction counts compare exactly.
    fn hmac_sign(&mut self) {
        self.sign(CKM_SHA256_HMAC, self.keys.hmac, 64, 32);
    }

    fn rsa_sign(&mut self) {
        self.sign(CKM_SHA256_RSA_PKCS, self.keys.rsa, 64, 256);
    }

    /// ECDSA over a 32-byte hash.
    fn ecdsa_sign(&mut self) {
        self.sign(CKM_ECDSA, self.keys.ec, 32, 64);
    }

    fn aes_gcm(&mut self) {
        let f = &self.m.f;
        // A fresh IV for every message, as GCM requires.
        self.counter += 1;
        self.iv[4..].copy_from_slice(&self.counter.to_be_bytes());
        let mut params = CK_GCM_PARAMS {
            pIv: self.iv.as_mut_ptr(),
            ulIvLen: 12,
            ulIvBits: 96,
            pAAD: ptr::null_mut(),
            ulAADLen: 0,
            ulTagBits: (GCM_TAG * 8) as CK_ULONG,
        };
        let mut mech = CK_MECHANISM {
            mechanism: CKM_AES_GCM,
            pParameter: (&mut params as *mut CK_GCM_PARAMS).cast(),
            ulParameterLen: std::mem::size_of::<CK_GCM_PARAMS>() as CK_ULONG,
        };
        // SAFETY: the mechanism and its parameters live across the call.
        check(
            unsafe { (f.encrypt_init)(self.s, &mut mech, self.keys.aes) },
            "C_EncryptInit",
        );
        let mut n = self.out.len() as CK_ULONG;
        // SAFETY: input and output buffers of the lengths given.
        check(
            unsafe {
                (f.encrypt)(
                    self.s,
                    self.gcm_in.as_mut_ptr(),
                    GCM_IN as CK_ULONG,
                    self.out.as_mut_ptr(),
                    &mut n,
                )
            },
            "C_Encrypt",
        );
        Self::expect_len("C_Encrypt", n, GCM_IN + GCM_TAG);
    }

    fn find(&mut self) {
        let f = &self.m.f;
        let mut t = [attr_bytes(CKA_LABEL, FIND_LABEL.as_bytes())];
        // SAFETY: the template points to live values for the call.
        check(
            unsafe { (f.find_objects_init)(self.s, t.as_mut_ptr(), 1) },
            "C_FindObjectsInit",
        );
        let mut found = [CK_INVALID_HANDLE; 4];
        let mut n: CK_ULONG = 0;
        // SAFETY: `found` holds 4 handles.
        check(
            unsafe { (f.find_objects)(self.s, found.as_mut_ptr(), 4, &mut n) },
            "C_FindObjects",
        );
        // SAFETY: no pointers.
        check(
            unsafe { (f.find_objects_final)(self.s) },
            "C_FindObjectsFinal",
        );
        if n != 1 {
            die(format_args!(
                "C_FindObjects found {n} objects labelled {FIND_LABEL:?}, expected 1"
            ));
        }
    }

    fn open_close(&mut self) {
        let f = &self.m.f;
        let mut h: CK_SESSION_HANDLE = 0;
        // SAFETY: no application pointer nor callback; a writable handle.
        check(
            unsafe {
                (f.open_session)(self.slot, CKF_SERIAL_SESSION, ptr::null_mut(), None, &mut h)
            },
            "C_OpenSession",
        );
        // SAFETY: no pointers.
        check(unsafe { (f.close_session)(h) }, "C_CloseSession");
    }

    fn get_label(&mut self) {
        let f = &self.m.f;
        let mut a = [CK_ATTRIBUTE {
            type_: CKA_LABEL,
            pValue: self.label.as_mut_ptr().cast(),
            ulValueLen: self.label.len() as CK_ULONG,
        }];
        // SAFETY: the template's buffer is writable for its length.
        check(
            unsafe { (f.get_attribute_value)(self.s, self.keys.rsa_pub, a.as_mut_ptr(), 1) },
            "C_GetAttributeValue",
        );
        Self::expect_len(
            "C_GetAttributeValue(CKA_LABEL)",
            a[0].ulValueLen,
            RSA_LABEL.len(),
        );
    }
}

/// Creates the token objects: RSA-2048, EC P-256, AES-256 and HMAC
/// (generic secret) keys, and a few labelled data objects.
fn create_objects(m: &Module, slot: CK_SLOT_ID) {
    let f = &m.f;
    let s = m.open_session(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION);
    m.login_user(s, USER_PIN);
    let (t, fl) = (CK_TRUE, CK_FALSE);

    // RSA-2048.
    let bits: CK_ULONG = 2048;
    let exponent = [0x01u8, 0x00, 0x01];
    let mut pub_t = [
        attr(CKA_TOKEN, &t),
        attr(CKA_VERIFY, &t),
        attr(CKA_MODULUS_BITS, &bits),
        attr_bytes(CKA_PUBLIC_EXPONENT, &exponent),
        attr_bytes(CKA_LABEL, RSA_LABEL.as_bytes()),
    ];
    let mut priv_t = [
        attr(CKA_TOKEN, &t),
        attr(CKA_PRIVATE, &t),
        attr(CKA_SENSITIVE, &t),
        attr(CKA_SIGN, &t),
        attr_bytes(CKA_LABEL, RSA_LABEL.as_bytes()),
    ];
    generate_pair(m, s, CKM_RSA_PKCS_KEY_PAIR_GEN, &mut pub_t, &mut priv_t);

    // EC P-256.
    let mut pub_t = [
        attr(CKA_TOKEN, &t),
        attr(CKA_VERIFY, &t),
        attr_bytes(CKA_EC_PARAMS, &P256_OID),
        attr_bytes(CKA_LABEL, EC_LABEL.as_bytes()),
    ];
    let mut priv_t = [
        attr(CKA_TOKEN, &t),
        attr(CKA_PRIVATE, &t),
        attr(CKA_SENSITIVE, &t),
        attr(CKA_SIGN, &t),
        attr_bytes(CKA_LABEL, EC_LABEL.as_bytes()),
    ];
    generate_pair(m, s, CKM_EC_KEY_PAIR_GEN, &mut pub_t, &mut priv_t);

    // AES-256.
    let len: CK_ULONG = 32;
    let mut aes_t = [
        attr(CKA_TOKEN, &t),
        attr(CKA_PRIVATE, &t),
        attr(CKA_SENSITIVE, &t),
        attr(CKA_ENCRYPT, &t),
        attr(CKA_DECRYPT, &t),
        attr(CKA_VALUE_LEN, &len),
        attr_bytes(CKA_LABEL, AES_LABEL.as_bytes()),
    ];
    generate_key(m, s, CKM_AES_KEY_GEN, &mut aes_t, "C_GenerateKey");

    // HMAC: a generic secret of 256 bits.
    hmac_key(m, s, HMAC_LABEL, true);

    // Labelled data objects.
    let class = CKO_DATA;
    for i in 0..DATA_OBJECTS {
        let label = format!("bench-data-{i}");
        let value = format!("p11shim benchmark object {i}");
        let mut tmpl = [
            attr(CKA_CLASS, &class),
            attr(CKA_TOKEN, &t),
            attr(CKA_PRIVATE, &fl),
            attr_bytes(CKA_LABEL, label.as_bytes()),
            attr_bytes(CKA_VALUE, value.as_bytes()),
        ];
        let mut h = CK_INVALID_HANDLE;
        // SAFETY: the template lives across the call.
        check(
            unsafe { (f.create_object)(s, tmpl.as_mut_ptr(), tmpl.len() as CK_ULONG, &mut h) },
            "C_CreateObject",
        );
    }
    m.logout(s);
    m.close_session(s);
}

/// A 256-bit generic secret for HMAC: a private token key (`hmac-sign`),
/// or one that lives in the worker's base session, not private
/// (`hmac-session-sign`): SoftHSM2 keeps that one in memory, where a
/// token key is read back from its encrypted store on every use, so that
/// signing with it is several times faster.
fn hmac_key(m: &Module, s: CK_SESSION_HANDLE, label: &str, token: bool) -> CK_OBJECT_HANDLE {
    let (t, on_token): (CK_BBOOL, CK_BBOOL) = (CK_TRUE, if token { CK_TRUE } else { CK_FALSE });
    let (secret, generic, len) = (CKO_SECRET_KEY, CKK_GENERIC_SECRET, 32 as CK_ULONG);
    let mut tmpl = [
        attr(CKA_CLASS, &secret),
        attr(CKA_KEY_TYPE, &generic),
        attr(CKA_TOKEN, &on_token),
        attr(CKA_PRIVATE, &on_token),
        attr(CKA_SENSITIVE, &t),
        attr(CKA_SIGN, &t),
        attr(CKA_VERIFY, &t),
        attr(CKA_VALUE_LEN, &len),
        attr_bytes(CKA_LABEL, label.as_bytes()),
    ];
    generate_key(
        m,
        s,
        CKM_GENERIC_SECRET_KEY_GEN,
        &mut tmpl,
        "C_GenerateKey (HMAC)",
    )
}

/// Generates a key from a template; any error ends the run.
fn generate_key(
    m: &Module,
    s: CK_SESSION_HANDLE,
    mechanism: CK_MECHANISM_TYPE,
    tmpl: &mut [CK_ATTRIBUTE],
    what: &str,
) -> CK_OBJECT_HANDLE {
    let mut mech = CK_MECHANISM {
        mechanism,
        pParameter: ptr::null_mut(),
        ulParameterLen: 0,
    };
    let mut key = CK_INVALID_HANDLE;
    // SAFETY: the mechanism and template live across the call.
    check(
        unsafe {
            (m.f.generate_key)(
                s,
                &mut mech,
                tmpl.as_mut_ptr(),
                tmpl.len() as CK_ULONG,
                &mut key,
            )
        },
        what,
    );
    key
}

fn generate_pair(
    m: &Module,
    s: CK_SESSION_HANDLE,
    mechanism: CK_MECHANISM_TYPE,
    pub_t: &mut [CK_ATTRIBUTE],
    priv_t: &mut [CK_ATTRIBUTE],
) {
    let mut mech = CK_MECHANISM {
        mechanism,
        pParameter: ptr::null_mut(),
        ulParameterLen: 0,
    };
    let (mut pk, mut sk) = (CK_INVALID_HANDLE, CK_INVALID_HANDLE);
    // SAFETY: the mechanism and templates live across the call.
    check(
        unsafe {
            (m.f.generate_key_pair)(
                s,
                &mut mech,
                pub_t.as_mut_ptr(),
                pub_t.len() as CK_ULONG,
                priv_t.as_mut_ptr(),
                priv_t.len() as CK_ULONG,
                &mut pk,
                &mut sk,
            )
        },
        "C_GenerateKeyPair",
    );
}

/// The number of objects of a class with a label that the module shows.
fn count_objects(m: &Module, s: CK_SESSION_HANDLE, class: CK_OBJECT_CLASS, label: &str) -> u64 {
    let mut t = [
        attr(CKA_CLASS, &class),
        attr_bytes(CKA_LABEL, label.as_bytes()),
    ];
    // SAFETY: the template points to live values for the call.
    check(
        unsafe { (m.f.find_objects_init)(s, t.as_mut_ptr(), t.len() as CK_ULONG) },
        "C_FindObjectsInit",
    );
    let mut found = [CK_INVALID_HANDLE; 4];
    let mut n: CK_ULONG = 0;
    // SAFETY: `found` holds 4 handles.
    check(
        unsafe { (m.f.find_objects)(s, found.as_mut_ptr(), found.len() as CK_ULONG, &mut n) },
        "C_FindObjects",
    );
    // SAFETY: no pointers.
    check(unsafe { (m.f.find_objects_final)(s) }, "C_FindObjectsFinal");
    n as u64
}

/// The role of the audited configuration sees the keys of the signing
/// cases and nothing else, and may sign only with the cases' mechanisms:
/// the AES key must not exist for it, and an RSA signature with another
/// mechanism must be refused at `C_SignInit`. (Both refusals are recorded
/// in the audit log as denials, not as key use.)
fn acl_probe(m: &Module, slot: CK_SLOT_ID) {
    let s = m.open_session(slot, CKF_SERIAL_SESSION);
    m.login_user(s, USER_PIN);
    for (class, label) in [
        (CKO_PRIVATE_KEY, RSA_LABEL),
        (CKO_PRIVATE_KEY, EC_LABEL),
        (CKO_SECRET_KEY, HMAC_LABEL),
    ] {
        if count_objects(m, s, class, label) != 1 {
            die(format_args!(
                "ACL probe: the role does not see {label:?}, which its rules grant"
            ));
        }
    }
    let aes = count_objects(m, s, CKO_SECRET_KEY, AES_LABEL);
    if aes != 0 {
        die(format_args!(
            "ACL probe: {AES_LABEL:?} is visible ({aes} found) though no rule selects it: the ACL is not in force"
        ));
    }
    let rsa = m.find_one(s, CKO_PRIVATE_KEY, RSA_LABEL);
    let mut mech = CK_MECHANISM {
        mechanism: CKM_RSA_PKCS,
        pParameter: ptr::null_mut(),
        ulParameterLen: 0,
    };
    // SAFETY: a valid mechanism for the call.
    let rv = unsafe { (m.f.sign_init)(s, &mut mech, rsa) };
    if rv != CKR_MECHANISM_INVALID {
        die(format_args!(
            "ACL probe: C_SignInit(CKM_RSA_PKCS) on {RSA_LABEL:?}, a mechanism no rule grants, returned {} (0x{rv:08x}), expected CKR_MECHANISM_INVALID",
            crate::p11::rv_name(rv)
        ));
    }
    m.logout(s);
    m.close_session(s);
}
