//! p11faultmod: a PKCS#11 module used by the tests to put faults between
//! p11shim and SoftHSM2. It is part of the tests, never of the product.
//!
//! Every function forwards to the wrapped module (`P11FAULT_TARGET`, else
//! SoftHSM2) after consulting a control file. A test loads one copy of this
//! library per HA member (copies at different paths are separate modules),
//! and each copy reads the control file `<its own path>.ctl`, re-read
//! whenever it changes. One rule per line (`#` starts a comment):
//!
//! ```text
//! latency 2ms                          # added to every call
//! serial                               # one call at a time, as a device
//!                                      # with one processing unit: the
//!                                      # added latency is then a service time
//! latency C_Sign 50ms                  # added to one function
//! fail C_Sign CKR_DEVICE_ERROR         # every call fails
//! fail C_Sign 0x30 after 5 times 2     # the 6th and 7th calls fail
//! fail all CKR_DEVICE_ERROR            # every function
//! late C_CreateObject CKR_DEVICE_ERROR # makes the call, then reports
//!                                      # the error (work done, answer lost)
//! hang C_SignUpdate                    # blocks while the rule is present
//! remove                               # the token is gone: no slots,
//!                                      # CKR_DEVICE_REMOVED everywhere
//! restart 1                            # each new number closes every
//!                                      # session opened through this copy
//! ```
//!
//! Call counts per function are written to `<its own path>.calls` on
//! `C_Finalize` and whenever the control file says `dump N` with a new N.

#![allow(
    clippy::collapsible_if,
    non_snake_case,
    clippy::missing_safety_doc,
    clippy::undocumented_unsafe_blocks
)]

use std::collections::{HashMap, HashSet};
use std::ffi::CStr;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use pkcs11_sys::*;

struct Target {
    fl: CK_FUNCTION_LIST,
    _lib: libloading::Library,
}

// SAFETY: the wrapped module is initialized for multi-threaded use.
unsafe impl Send for Target {}
unsafe impl Sync for Target {}

static TARGET: OnceLock<Result<Target, String>> = OnceLock::new();

fn target() -> Option<&'static CK_FUNCTION_LIST> {
    TARGET
        .get_or_init(|| {
            let path = std::env::var("P11FAULT_TARGET")
                .unwrap_or_else(|_| "/usr/lib/softhsm/libsofthsm2.so".into());
            let lib = unsafe { libloading::Library::new(&path) }.map_err(|e| e.to_string())?;
            let mut fl: CK_FUNCTION_LIST_PTR = std::ptr::null_mut();
            unsafe {
                let gfl = lib
                    .get::<unsafe extern "C" fn(CK_FUNCTION_LIST_PTR_PTR) -> CK_RV>(
                        b"C_GetFunctionList\0",
                    )
                    .map_err(|e| e.to_string())?;
                if gfl(&mut fl) != CKR_OK || fl.is_null() {
                    return Err("C_GetFunctionList failed".into());
                }
                Ok(Target { fl: *fl, _lib: lib })
            }
        })
        .as_ref()
        .ok()
        .map(|t| &t.fl)
}

#[derive(Default)]
struct Rule {
    function: String,
    rv: CK_RV,
    after: u64,
    times: Option<u64>,
    fired: u64,
}

#[derive(Default)]
struct Control {
    stamp: Option<(SystemTime, u64)>,
    latency_all: Duration,
    latency: HashMap<String, Duration>,
    fails: Vec<Rule>,
    /// Errors reported after the call was made.
    late: HashMap<String, CK_RV>,
    hangs: HashSet<String>,
    removed: bool,
    serial: bool,
    restart: Option<String>,
    dump: Option<String>,
    calls: HashMap<&'static str, u64>,
    /// Sessions opened through this copy: calls running on each, and its
    /// life. A session a `restart` killed stays here after it is closed in
    /// the wrapped module (until the module hands its number out again),
    /// so that a call racing with the close is refused rather than reach
    /// the wrapped module with a session it is freeing.
    sessions: HashMap<CK_SESSION_HANDLE, (u32, Life)>,
}

/// A session's life, as this copy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Life {
    Live,
    /// Killed by a `restart`; closed when its last running call ends.
    Dead,
    /// Killed and closed in the wrapped module.
    Closed,
}

/// The error to report after a call was made, if any.
fn late_fault(function: &str) -> Option<CK_RV> {
    CONTROL
        .lock()
        .as_ref()
        .and_then(|c| c.late.get(function).copied())
}

/// Notes a call starting on a session; `false` when the session is dead.
fn enter(s: CK_SESSION_HANDLE) -> bool {
    let mut guard = CONTROL.lock();
    let c = guard.get_or_insert_with(Control::default);
    match c.sessions.get_mut(&s) {
        Some((n, Life::Live)) => {
            *n += 1;
            true
        }
        Some(_) => false,
        None => true,
    }
}

/// Notes a call ending on a session; closes a dead session nobody uses.
fn leave(s: CK_SESSION_HANDLE) {
    let close = {
        let mut guard = CONTROL.lock();
        let c = guard.get_or_insert_with(Control::default);
        match c.sessions.get_mut(&s) {
            Some((n, life)) => {
                *n = n.saturating_sub(1);
                if *life == Life::Dead && *n == 0 {
                    *life = Life::Closed;
                    true
                } else {
                    false
                }
            }
            None => false,
        }
    };
    if close {
        if let Some(fl) = target() {
            unsafe { (fl.C_CloseSession.unwrap())(s) };
        }
    }
}

static CONTROL: Mutex<Option<Control>> = Mutex::new(None);
/// The emulated device's one processing unit (`serial`).
static DEVICE: Mutex<()> = Mutex::new(());

fn own_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
        let addr = own_path as *const libc::c_void;
        if unsafe { libc::dladdr(addr, &mut info) } != 0 && !info.dli_fname.is_null() {
            PathBuf::from(
                unsafe { CStr::from_ptr(info.dli_fname) }
                    .to_string_lossy()
                    .into_owned(),
            )
        } else {
            PathBuf::from("/nonexistent/p11faultmod.so")
        }
    })
    .clone()
}

fn with_suffix(suffix: &str) -> PathBuf {
    let mut p = own_path().into_os_string();
    p.push(suffix);
    PathBuf::from(p)
}

fn parse_duration(s: &str) -> Duration {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().unwrap_or(0);
    match unit {
        "us" => Duration::from_micros(n),
        "s" => Duration::from_secs(n),
        _ => Duration::from_millis(n),
    }
}

fn parse_rv(s: &str) -> CK_RV {
    match s {
        "CKR_DEVICE_ERROR" => CKR_DEVICE_ERROR,
        "CKR_DEVICE_REMOVED" => CKR_DEVICE_REMOVED,
        "CKR_DEVICE_MEMORY" => CKR_DEVICE_MEMORY,
        "CKR_TOKEN_NOT_PRESENT" => CKR_TOKEN_NOT_PRESENT,
        "CKR_GENERAL_ERROR" => CKR_GENERAL_ERROR,
        "CKR_FUNCTION_FAILED" => CKR_FUNCTION_FAILED,
        "CKR_SESSION_HANDLE_INVALID" => CKR_SESSION_HANDLE_INVALID,
        "CKR_SESSION_CLOSED" => CKR_SESSION_CLOSED,
        "CKR_USER_NOT_LOGGED_IN" => CKR_USER_NOT_LOGGED_IN,
        "CKR_PIN_INCORRECT" => CKR_PIN_INCORRECT,
        other => {
            let hex = other.trim_start_matches("0x");
            CK_RV::from_str_radix(hex, 16).unwrap_or(CKR_GENERAL_ERROR)
        }
    }
}

/// Re-reads the control file when it changed; returns a restart or dump
/// order seen for the first time.
fn reload(c: &mut Control) -> (bool, bool) {
    let path = with_suffix(".ctl");
    let meta = std::fs::metadata(&path).ok();
    let stamp = meta.as_ref().map(|m| {
        (
            m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            m.len() ^ (std::os::unix::fs::MetadataExt::ino(m) << 32),
        )
    });
    if stamp == c.stamp {
        return (false, false);
    }
    c.stamp = stamp;
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let (mut latency_all, mut latency, mut hangs, mut removed) =
        (Duration::ZERO, HashMap::new(), HashSet::new(), false);
    let mut fails = Vec::new();
    let mut serial = false;
    let mut late = HashMap::new();
    let (mut restart, mut dump) = (None, None);
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["latency", d] => latency_all = parse_duration(d),
            ["latency", f, d] => {
                latency.insert(f.to_string(), parse_duration(d));
            }
            ["fail", f, rv, rest @ ..] => {
                let mut rule = Rule {
                    function: f.to_string(),
                    rv: parse_rv(rv),
                    ..Default::default()
                };
                for pair in rest.chunks(2) {
                    match pair {
                        ["after", n] => rule.after = n.parse().unwrap_or(0),
                        ["times", n] => rule.times = n.parse().ok(),
                        _ => {}
                    }
                }
                // Keep the count of a rule that was already there.
                if let Some(old) = c.fails.iter().find(|o| {
                    o.function == rule.function && o.rv == rule.rv && o.after == rule.after
                }) {
                    rule.fired = old.fired;
                }
                fails.push(rule);
            }
            ["hang", f] => {
                hangs.insert(f.to_string());
            }
            ["remove"] => removed = true,
            ["serial"] => serial = true,
            ["late", f, rv] => {
                late.insert(f.to_string(), parse_rv(rv));
            }
            ["restart", n] => restart = Some(n.to_string()),
            ["dump", n] => dump = Some(n.to_string()),
            _ => {}
        }
    }
    c.latency_all = latency_all;
    c.latency = latency;
    c.fails = fails;
    c.hangs = hangs;
    c.removed = removed;
    c.serial = serial;
    c.late = late;
    let new_restart = restart.is_some() && restart != c.restart;
    let new_dump = dump.is_some() && dump != c.dump;
    c.restart = restart;
    c.dump = dump;
    (new_restart, new_dump)
}

fn dump_calls(c: &Control) {
    let mut lines: Vec<String> = c.calls.iter().map(|(f, n)| format!("{f} {n}")).collect();
    lines.sort();
    let _ = std::fs::write(with_suffix(".calls"), lines.join("\n") + "\n");
}

/// The fault to inject for a call, if any, after its latency.
fn fault(function: &'static str) -> Option<CK_RV> {
    let (delay, restart_sessions, serial) = {
        let mut guard = CONTROL.lock();
        let c = guard.get_or_insert_with(Control::default);
        let (restart, dump) = reload(c);
        *c.calls.entry(function).or_insert(0) += 1;
        if dump {
            dump_calls(c);
        }
        // A restart kills every session: idle ones are closed now (which logs
        // the token out), busy ones when their call returns.
        let mut sessions = Vec::new();
        if restart {
            for (s, (n, life)) in c.sessions.iter_mut() {
                if *life == Life::Live {
                    *life = Life::Dead;
                }
                if *life == Life::Dead && *n == 0 {
                    *life = Life::Closed;
                    sessions.push(*s);
                }
            }
        }
        let delay = c.latency_all + c.latency.get(function).copied().unwrap_or_default();
        (delay, sessions, c.serial)
    };
    if let Some(fl) = target() {
        for s in restart_sessions {
            unsafe { (fl.C_CloseSession.unwrap())(s) };
        }
    }
    if !delay.is_zero() {
        // With `serial`, calls take their service time one after another.
        let _one_at_a_time = serial.then(|| DEVICE.lock());
        std::thread::sleep(delay);
    }
    // Hang while the rule is present (bounded, so a test can never wedge).
    let started = Instant::now();
    loop {
        let mut guard = CONTROL.lock();
        let c = guard.get_or_insert_with(Control::default);
        reload(c);
        if c.removed {
            return Some(CKR_DEVICE_REMOVED);
        }
        let hung = c.hangs.contains(function) || c.hangs.contains("all");
        if !hung || started.elapsed() > Duration::from_secs(120) {
            for rule in c
                .fails
                .iter_mut()
                .filter(|r| r.function == function || r.function == "all")
            {
                rule.fired += 1;
                let n = rule.fired;
                if n > rule.after && rule.times.is_none_or(|t| n <= rule.after + t) {
                    return Some(rule.rv);
                }
            }
            return None;
        }
        drop(guard);
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn removed() -> bool {
    let mut guard = CONTROL.lock();
    let c = guard.get_or_insert_with(Control::default);
    reload(c);
    c.removed
}

/// Forwards a function whose first argument is a session: a session that a
/// `restart` killed answers CKR_SESSION_HANDLE_INVALID, and is closed in the
/// wrapped module once no call is running on it.
macro_rules! forward_session {
    ($( fn $name:ident(hSession: CK_SESSION_HANDLE $(, $arg:ident: $ty:ty)*) => (hSession $(, $a:ident)*); )*) => {$(
        pub unsafe extern "C" fn $name(hSession: CK_SESSION_HANDLE $(, $arg: $ty)*) -> CK_RV {
            if let Some(rv) = fault(stringify!($name)) {
                return rv;
            }
            if !enter(hSession) {
                return CKR_SESSION_HANDLE_INVALID;
            }
            let rv = match target().and_then(|fl| fl.$name) {
                Some(f) => unsafe { f(hSession $(, $a)*) },
                None => CKR_FUNCTION_NOT_SUPPORTED,
            };
            leave(hSession);
            match late_fault(stringify!($name)) {
                Some(late) if rv == CKR_OK => late,
                _ => rv,
            }
        }
    )*};
}

macro_rules! forward {
    ($( fn $name:ident($($arg:ident: $ty:ty),*) => ($($a:ident),*); )*) => {$(
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> CK_RV {
            if let Some(rv) = fault(stringify!($name)) {
                return rv;
            }
            match target().and_then(|fl| fl.$name) {
                Some(f) => unsafe { f($($a),*) },
                None => CKR_FUNCTION_NOT_SUPPORTED,
            }
        }
    )*};
}

forward! {
    fn C_GetInfo(pInfo: CK_INFO_PTR) => (pInfo);
    fn C_GetMechanismList(slotID: CK_SLOT_ID, pMechanismList: CK_MECHANISM_TYPE_PTR, pulCount: CK_ULONG_PTR) => (slotID, pMechanismList, pulCount);
    fn C_GetMechanismInfo(slotID: CK_SLOT_ID, type_: CK_MECHANISM_TYPE, pInfo: CK_MECHANISM_INFO_PTR) => (slotID, type_, pInfo);
    fn C_InitToken(slotID: CK_SLOT_ID, pPin: CK_UTF8CHAR_PTR, ulPinLen: CK_ULONG, pLabel: CK_UTF8CHAR_PTR) => (slotID, pPin, ulPinLen, pLabel);
    fn C_OpenSession(slotID: CK_SLOT_ID, flags: CK_FLAGS, pApplication: CK_VOID_PTR, Notify: CK_NOTIFY, phSession: CK_SESSION_HANDLE_PTR) => (slotID, flags, pApplication, Notify, phSession);
    fn C_CloseAllSessions(slotID: CK_SLOT_ID) => (slotID);
    fn C_WaitForSlotEvent(flags: CK_FLAGS, pSlot: CK_SLOT_ID_PTR, pRserved: CK_VOID_PTR) => (flags, pSlot, pRserved);
}

forward_session! {
    fn C_InitPIN(hSession: CK_SESSION_HANDLE, pPin: CK_UTF8CHAR_PTR, ulPinLen: CK_ULONG) => (hSession, pPin, ulPinLen);
    fn C_SetPIN(hSession: CK_SESSION_HANDLE, pOldPin: CK_UTF8CHAR_PTR, ulOldLen: CK_ULONG, pNewPin: CK_UTF8CHAR_PTR, ulNewLen: CK_ULONG) => (hSession, pOldPin, ulOldLen, pNewPin, ulNewLen);
    fn C_GetSessionInfo(hSession: CK_SESSION_HANDLE, pInfo: CK_SESSION_INFO_PTR) => (hSession, pInfo);
    fn C_GetOperationState(hSession: CK_SESSION_HANDLE, pOperationState: CK_BYTE_PTR, pulOperationStateLen: CK_ULONG_PTR) => (hSession, pOperationState, pulOperationStateLen);
    fn C_SetOperationState(hSession: CK_SESSION_HANDLE, pOperationState: CK_BYTE_PTR, ulOperationStateLen: CK_ULONG, hEncryptionKey: CK_OBJECT_HANDLE, hAuthenticationKey: CK_OBJECT_HANDLE) => (hSession, pOperationState, ulOperationStateLen, hEncryptionKey, hAuthenticationKey);
    fn C_Login(hSession: CK_SESSION_HANDLE, userType: CK_USER_TYPE, pPin: CK_UTF8CHAR_PTR, ulPinLen: CK_ULONG) => (hSession, userType, pPin, ulPinLen);
    fn C_Logout(hSession: CK_SESSION_HANDLE) => (hSession);
    fn C_CreateObject(hSession: CK_SESSION_HANDLE, pTemplate: CK_ATTRIBUTE_PTR, ulCount: CK_ULONG, phObject: CK_OBJECT_HANDLE_PTR) => (hSession, pTemplate, ulCount, phObject);
    fn C_CopyObject(hSession: CK_SESSION_HANDLE, hObject: CK_OBJECT_HANDLE, pTemplate: CK_ATTRIBUTE_PTR, ulCount: CK_ULONG, phNewObject: CK_OBJECT_HANDLE_PTR) => (hSession, hObject, pTemplate, ulCount, phNewObject);
    fn C_DestroyObject(hSession: CK_SESSION_HANDLE, hObject: CK_OBJECT_HANDLE) => (hSession, hObject);
    fn C_GetObjectSize(hSession: CK_SESSION_HANDLE, hObject: CK_OBJECT_HANDLE, pulSize: CK_ULONG_PTR) => (hSession, hObject, pulSize);
    fn C_GetAttributeValue(hSession: CK_SESSION_HANDLE, hObject: CK_OBJECT_HANDLE, pTemplate: CK_ATTRIBUTE_PTR, ulCount: CK_ULONG) => (hSession, hObject, pTemplate, ulCount);
    fn C_SetAttributeValue(hSession: CK_SESSION_HANDLE, hObject: CK_OBJECT_HANDLE, pTemplate: CK_ATTRIBUTE_PTR, ulCount: CK_ULONG) => (hSession, hObject, pTemplate, ulCount);
    fn C_FindObjectsInit(hSession: CK_SESSION_HANDLE, pTemplate: CK_ATTRIBUTE_PTR, ulCount: CK_ULONG) => (hSession, pTemplate, ulCount);
    fn C_FindObjects(hSession: CK_SESSION_HANDLE, phObject: CK_OBJECT_HANDLE_PTR, ulMaxObjectCount: CK_ULONG, pulObjectCount: CK_ULONG_PTR) => (hSession, phObject, ulMaxObjectCount, pulObjectCount);
    fn C_FindObjectsFinal(hSession: CK_SESSION_HANDLE) => (hSession);
    fn C_EncryptInit(hSession: CK_SESSION_HANDLE, pMechanism: CK_MECHANISM_PTR, hKey: CK_OBJECT_HANDLE) => (hSession, pMechanism, hKey);
    fn C_Encrypt(hSession: CK_SESSION_HANDLE, pData: CK_BYTE_PTR, ulDataLen: CK_ULONG, pEncryptedData: CK_BYTE_PTR, pulEncryptedDataLen: CK_ULONG_PTR) => (hSession, pData, ulDataLen, pEncryptedData, pulEncryptedDataLen);
    fn C_EncryptUpdate(hSession: CK_SESSION_HANDLE, pPart: CK_BYTE_PTR, ulPartLen: CK_ULONG, pEncryptedPart: CK_BYTE_PTR, pulEncryptedPartLen: CK_ULONG_PTR) => (hSession, pPart, ulPartLen, pEncryptedPart, pulEncryptedPartLen);
    fn C_EncryptFinal(hSession: CK_SESSION_HANDLE, pLastEncryptedPart: CK_BYTE_PTR, pulLastEncryptedPartLen: CK_ULONG_PTR) => (hSession, pLastEncryptedPart, pulLastEncryptedPartLen);
    fn C_DecryptInit(hSession: CK_SESSION_HANDLE, pMechanism: CK_MECHANISM_PTR, hKey: CK_OBJECT_HANDLE) => (hSession, pMechanism, hKey);
    fn C_Decrypt(hSession: CK_SESSION_HANDLE, pEncryptedData: CK_BYTE_PTR, ulEncryptedDataLen: CK_ULONG, pData: CK_BYTE_PTR, pulDataLen: CK_ULONG_PTR) => (hSession, pEncryptedData, ulEncryptedDataLen, pData, pulDataLen);
    fn C_DecryptUpdate(hSession: CK_SESSION_HANDLE, pEncryptedPart: CK_BYTE_PTR, ulEncryptedPartLen: CK_ULONG, pPart: CK_BYTE_PTR, pulPartLen: CK_ULONG_PTR) => (hSession, pEncryptedPart, ulEncryptedPartLen, pPart, pulPartLen);
    fn C_DecryptFinal(hSession: CK_SESSION_HANDLE, pLastPart: CK_BYTE_PTR, pulLastPartLen: CK_ULONG_PTR) => (hSession, pLastPart, pulLastPartLen);
    fn C_DigestInit(hSession: CK_SESSION_HANDLE, pMechanism: CK_MECHANISM_PTR) => (hSession, pMechanism);
    fn C_Digest(hSession: CK_SESSION_HANDLE, pData: CK_BYTE_PTR, ulDataLen: CK_ULONG, pDigest: CK_BYTE_PTR, pulDigestLen: CK_ULONG_PTR) => (hSession, pData, ulDataLen, pDigest, pulDigestLen);
    fn C_DigestUpdate(hSession: CK_SESSION_HANDLE, pPart: CK_BYTE_PTR, ulPartLen: CK_ULONG) => (hSession, pPart, ulPartLen);
    fn C_DigestKey(hSession: CK_SESSION_HANDLE, hKey: CK_OBJECT_HANDLE) => (hSession, hKey);
    fn C_DigestFinal(hSession: CK_SESSION_HANDLE, pDigest: CK_BYTE_PTR, pulDigestLen: CK_ULONG_PTR) => (hSession, pDigest, pulDigestLen);
    fn C_SignInit(hSession: CK_SESSION_HANDLE, pMechanism: CK_MECHANISM_PTR, hKey: CK_OBJECT_HANDLE) => (hSession, pMechanism, hKey);
    fn C_Sign(hSession: CK_SESSION_HANDLE, pData: CK_BYTE_PTR, ulDataLen: CK_ULONG, pSignature: CK_BYTE_PTR, pulSignatureLen: CK_ULONG_PTR) => (hSession, pData, ulDataLen, pSignature, pulSignatureLen);
    fn C_SignUpdate(hSession: CK_SESSION_HANDLE, pPart: CK_BYTE_PTR, ulPartLen: CK_ULONG) => (hSession, pPart, ulPartLen);
    fn C_SignFinal(hSession: CK_SESSION_HANDLE, pSignature: CK_BYTE_PTR, pulSignatureLen: CK_ULONG_PTR) => (hSession, pSignature, pulSignatureLen);
    fn C_SignRecoverInit(hSession: CK_SESSION_HANDLE, pMechanism: CK_MECHANISM_PTR, hKey: CK_OBJECT_HANDLE) => (hSession, pMechanism, hKey);
    fn C_SignRecover(hSession: CK_SESSION_HANDLE, pData: CK_BYTE_PTR, ulDataLen: CK_ULONG, pSignature: CK_BYTE_PTR, pulSignatureLen: CK_ULONG_PTR) => (hSession, pData, ulDataLen, pSignature, pulSignatureLen);
    fn C_VerifyInit(hSession: CK_SESSION_HANDLE, pMechanism: CK_MECHANISM_PTR, hKey: CK_OBJECT_HANDLE) => (hSession, pMechanism, hKey);
    fn C_Verify(hSession: CK_SESSION_HANDLE, pData: CK_BYTE_PTR, ulDataLen: CK_ULONG, pSignature: CK_BYTE_PTR, ulSignatureLen: CK_ULONG) => (hSession, pData, ulDataLen, pSignature, ulSignatureLen);
    fn C_VerifyUpdate(hSession: CK_SESSION_HANDLE, pPart: CK_BYTE_PTR, ulPartLen: CK_ULONG) => (hSession, pPart, ulPartLen);
    fn C_VerifyFinal(hSession: CK_SESSION_HANDLE, pSignature: CK_BYTE_PTR, ulSignatureLen: CK_ULONG) => (hSession, pSignature, ulSignatureLen);
    fn C_VerifyRecoverInit(hSession: CK_SESSION_HANDLE, pMechanism: CK_MECHANISM_PTR, hKey: CK_OBJECT_HANDLE) => (hSession, pMechanism, hKey);
    fn C_VerifyRecover(hSession: CK_SESSION_HANDLE, pSignature: CK_BYTE_PTR, ulSignatureLen: CK_ULONG, pData: CK_BYTE_PTR, pulDataLen: CK_ULONG_PTR) => (hSession, pSignature, ulSignatureLen, pData, pulDataLen);
    fn C_DigestEncryptUpdate(hSession: CK_SESSION_HANDLE, pPart: CK_BYTE_PTR, ulPartLen: CK_ULONG, pEncryptedPart: CK_BYTE_PTR, pulEncryptedPartLen: CK_ULONG_PTR) => (hSession, pPart, ulPartLen, pEncryptedPart, pulEncryptedPartLen);
    fn C_DecryptDigestUpdate(hSession: CK_SESSION_HANDLE, pEncryptedPart: CK_BYTE_PTR, ulEncryptedPartLen: CK_ULONG, pPart: CK_BYTE_PTR, pulPartLen: CK_ULONG_PTR) => (hSession, pEncryptedPart, ulEncryptedPartLen, pPart, pulPartLen);
    fn C_SignEncryptUpdate(hSession: CK_SESSION_HANDLE, pPart: CK_BYTE_PTR, ulPartLen: CK_ULONG, pEncryptedPart: CK_BYTE_PTR, pulEncryptedPartLen: CK_ULONG_PTR) => (hSession, pPart, ulPartLen, pEncryptedPart, pulEncryptedPartLen);
    fn C_DecryptVerifyUpdate(hSession: CK_SESSION_HANDLE, pEncryptedPart: CK_BYTE_PTR, ulEncryptedPartLen: CK_ULONG, pPart: CK_BYTE_PTR, pulPartLen: CK_ULONG_PTR) => (hSession, pEncryptedPart, ulEncryptedPartLen, pPart, pulPartLen);
    fn C_GenerateKey(hSession: CK_SESSION_HANDLE, pMechanism: CK_MECHANISM_PTR, pTemplate: CK_ATTRIBUTE_PTR, ulCount: CK_ULONG, phKey: CK_OBJECT_HANDLE_PTR) => (hSession, pMechanism, pTemplate, ulCount, phKey);
    fn C_GenerateKeyPair(hSession: CK_SESSION_HANDLE, pMechanism: CK_MECHANISM_PTR, pPublicKeyTemplate: CK_ATTRIBUTE_PTR, ulPublicKeyAttributeCount: CK_ULONG, pPrivateKeyTemplate: CK_ATTRIBUTE_PTR, ulPrivateKeyAttributeCount: CK_ULONG, phPublicKey: CK_OBJECT_HANDLE_PTR, phPrivateKey: CK_OBJECT_HANDLE_PTR) => (hSession, pMechanism, pPublicKeyTemplate, ulPublicKeyAttributeCount, pPrivateKeyTemplate, ulPrivateKeyAttributeCount, phPublicKey, phPrivateKey);
    fn C_WrapKey(hSession: CK_SESSION_HANDLE, pMechanism: CK_MECHANISM_PTR, hWrappingKey: CK_OBJECT_HANDLE, hKey: CK_OBJECT_HANDLE, pWrappedKey: CK_BYTE_PTR, pulWrappedKeyLen: CK_ULONG_PTR) => (hSession, pMechanism, hWrappingKey, hKey, pWrappedKey, pulWrappedKeyLen);
    fn C_UnwrapKey(hSession: CK_SESSION_HANDLE, pMechanism: CK_MECHANISM_PTR, hUnwrappingKey: CK_OBJECT_HANDLE, pWrappedKey: CK_BYTE_PTR, ulWrappedKeyLen: CK_ULONG, pTemplate: CK_ATTRIBUTE_PTR, ulAttributeCount: CK_ULONG, phKey: CK_OBJECT_HANDLE_PTR) => (hSession, pMechanism, hUnwrappingKey, pWrappedKey, ulWrappedKeyLen, pTemplate, ulAttributeCount, phKey);
    fn C_DeriveKey(hSession: CK_SESSION_HANDLE, pMechanism: CK_MECHANISM_PTR, hBaseKey: CK_OBJECT_HANDLE, pTemplate: CK_ATTRIBUTE_PTR, ulAttributeCount: CK_ULONG, phKey: CK_OBJECT_HANDLE_PTR) => (hSession, pMechanism, hBaseKey, pTemplate, ulAttributeCount, phKey);
    fn C_SeedRandom(hSession: CK_SESSION_HANDLE, pSeed: CK_BYTE_PTR, ulSeedLen: CK_ULONG) => (hSession, pSeed, ulSeedLen);
    fn C_GenerateRandom(hSession: CK_SESSION_HANDLE, RandomData: CK_BYTE_PTR, ulRandomLen: CK_ULONG) => (hSession, RandomData, ulRandomLen);
    fn C_GetFunctionStatus(hSession: CK_SESSION_HANDLE) => (hSession);
    fn C_CancelFunction(hSession: CK_SESSION_HANDLE) => (hSession);
}

pub unsafe extern "C" fn C_Initialize(args: CK_VOID_PTR) -> CK_RV {
    let _ = args;
    let Some(fl) = target() else {
        return CKR_GENERAL_ERROR;
    };
    let mut own = CK_C_INITIALIZE_ARGS {
        flags: CKF_OS_LOCKING_OK,
        ..Default::default()
    };
    // The wrapped module is shared by every copy of this library in the
    // process: the first copy initializes it, and none finalizes it.
    match unsafe { (fl.C_Initialize.unwrap())((&mut own as *mut CK_C_INITIALIZE_ARGS).cast()) } {
        CKR_OK | CKR_CRYPTOKI_ALREADY_INITIALIZED => CKR_OK,
        rv => rv,
    }
}

pub unsafe extern "C" fn C_Finalize(_reserved: CK_VOID_PTR) -> CK_RV {
    if let Some(c) = CONTROL.lock().as_mut() {
        dump_calls(c);
        if let Some(fl) = target() {
            for (s, (n, life)) in c.sessions.drain() {
                if n == 0 && life != Life::Closed {
                    unsafe { (fl.C_CloseSession.unwrap())(s) };
                }
            }
        }
    }
    CKR_OK
}

pub unsafe extern "C" fn C_GetSlotList(
    present: CK_BBOOL,
    list: CK_SLOT_ID_PTR,
    count: CK_ULONG_PTR,
) -> CK_RV {
    if removed() {
        if count.is_null() {
            return CKR_ARGUMENTS_BAD;
        }
        unsafe { *count = 0 };
        return CKR_OK;
    }
    if let Some(rv) = fault("C_GetSlotList") {
        return rv;
    }
    match target() {
        Some(fl) => unsafe { (fl.C_GetSlotList.unwrap())(present, list, count) },
        None => CKR_GENERAL_ERROR,
    }
}

pub unsafe extern "C" fn C_GetSlotInfo(slot: CK_SLOT_ID, info: CK_SLOT_INFO_PTR) -> CK_RV {
    if removed() {
        return CKR_SLOT_ID_INVALID;
    }
    match target() {
        Some(fl) => unsafe { (fl.C_GetSlotInfo.unwrap())(slot, info) },
        None => CKR_GENERAL_ERROR,
    }
}

pub unsafe extern "C" fn C_GetTokenInfo(slot: CK_SLOT_ID, info: CK_TOKEN_INFO_PTR) -> CK_RV {
    if removed() {
        return CKR_TOKEN_NOT_PRESENT;
    }
    if let Some(rv) = fault("C_GetTokenInfo") {
        return rv;
    }
    match target() {
        Some(fl) => unsafe { (fl.C_GetTokenInfo.unwrap())(slot, info) },
        None => CKR_GENERAL_ERROR,
    }
}

/// Closes a session and forgets it.
unsafe extern "C" fn close_session(s: CK_SESSION_HANDLE) -> CK_RV {
    if let Some(rv) = fault("C_CloseSession") {
        return rv;
    }
    let known = CONTROL.lock().as_mut().and_then(|c| c.sessions.remove(&s));
    if let Some((_, Life::Dead | Life::Closed)) = known {
        return CKR_SESSION_HANDLE_INVALID;
    }
    match target() {
        Some(fl) => unsafe { (fl.C_CloseSession.unwrap())(s) },
        None => CKR_GENERAL_ERROR,
    }
}

/// Records the sessions opened through this copy, for `restart`.
unsafe extern "C" fn open_session(
    slot: CK_SLOT_ID,
    flags: CK_FLAGS,
    app: CK_VOID_PTR,
    notify: CK_NOTIFY,
    out: CK_SESSION_HANDLE_PTR,
) -> CK_RV {
    let rv = unsafe { C_OpenSession(slot, flags, app, notify, out) };
    if rv == CKR_OK && !out.is_null() {
        if let Some(c) = CONTROL.lock().as_mut() {
            c.sessions.insert(unsafe { *out }, (0, Life::Live));
        }
    }
    rv
}

static LIST: CK_FUNCTION_LIST = CK_FUNCTION_LIST {
    version: CK_VERSION {
        major: 2,
        minor: 40,
    },
    C_Initialize: Some(C_Initialize),
    C_Finalize: Some(C_Finalize),
    C_GetInfo: Some(C_GetInfo),
    C_GetFunctionList: Some(C_GetFunctionList),
    C_GetSlotList: Some(C_GetSlotList),
    C_GetSlotInfo: Some(C_GetSlotInfo),
    C_GetTokenInfo: Some(C_GetTokenInfo),
    C_GetMechanismList: Some(C_GetMechanismList),
    C_GetMechanismInfo: Some(C_GetMechanismInfo),
    C_InitToken: Some(C_InitToken),
    C_InitPIN: Some(C_InitPIN),
    C_SetPIN: Some(C_SetPIN),
    C_OpenSession: Some(open_session),
    C_CloseSession: Some(close_session),
    C_CloseAllSessions: Some(C_CloseAllSessions),
    C_GetSessionInfo: Some(C_GetSessionInfo),
    C_GetOperationState: Some(C_GetOperationState),
    C_SetOperationState: Some(C_SetOperationState),
    C_Login: Some(C_Login),
    C_Logout: Some(C_Logout),
    C_CreateObject: Some(C_CreateObject),
    C_CopyObject: Some(C_CopyObject),
    C_DestroyObject: Some(C_DestroyObject),
    C_GetObjectSize: Some(C_GetObjectSize),
    C_GetAttributeValue: Some(C_GetAttributeValue),
    C_SetAttributeValue: Some(C_SetAttributeValue),
    C_FindObjectsInit: Some(C_FindObjectsInit),
    C_FindObjects: Some(C_FindObjects),
    C_FindObjectsFinal: Some(C_FindObjectsFinal),
    C_EncryptInit: Some(C_EncryptInit),
    C_Encrypt: Some(C_Encrypt),
    C_EncryptUpdate: Some(C_EncryptUpdate),
    C_EncryptFinal: Some(C_EncryptFinal),
    C_DecryptInit: Some(C_DecryptInit),
    C_Decrypt: Some(C_Decrypt),
    C_DecryptUpdate: Some(C_DecryptUpdate),
    C_DecryptFinal: Some(C_DecryptFinal),
    C_DigestInit: Some(C_DigestInit),
    C_Digest: Some(C_Digest),
    C_DigestUpdate: Some(C_DigestUpdate),
    C_DigestKey: Some(C_DigestKey),
    C_DigestFinal: Some(C_DigestFinal),
    C_SignInit: Some(C_SignInit),
    C_Sign: Some(C_Sign),
    C_SignUpdate: Some(C_SignUpdate),
    C_SignFinal: Some(C_SignFinal),
    C_SignRecoverInit: Some(C_SignRecoverInit),
    C_SignRecover: Some(C_SignRecover),
    C_VerifyInit: Some(C_VerifyInit),
    C_Verify: Some(C_Verify),
    C_VerifyUpdate: Some(C_VerifyUpdate),
    C_VerifyFinal: Some(C_VerifyFinal),
    C_VerifyRecoverInit: Some(C_VerifyRecoverInit),
    C_VerifyRecover: Some(C_VerifyRecover),
    C_DigestEncryptUpdate: Some(C_DigestEncryptUpdate),
    C_DecryptDigestUpdate: Some(C_DecryptDigestUpdate),
    C_SignEncryptUpdate: Some(C_SignEncryptUpdate),
    C_DecryptVerifyUpdate: Some(C_DecryptVerifyUpdate),
    C_GenerateKey: Some(C_GenerateKey),
    C_GenerateKeyPair: Some(C_GenerateKeyPair),
    C_WrapKey: Some(C_WrapKey),
    C_UnwrapKey: Some(C_UnwrapKey),
    C_DeriveKey: Some(C_DeriveKey),
    C_SeedRandom: Some(C_SeedRandom),
    C_GenerateRandom: Some(C_GenerateRandom),
    C_GetFunctionStatus: Some(C_GetFunctionStatus),
    C_CancelFunction: Some(C_CancelFunction),
    C_WaitForSlotEvent: Some(C_WaitForSlotEvent),
};

#[unsafe(no_mangle)]
pub unsafe extern "C" fn C_GetFunctionList(list: CK_FUNCTION_LIST_PTR_PTR) -> CK_RV {
    if list.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    unsafe { *list = (&raw const LIST).cast_mut() };
    CKR_OK
}
