//! The broker benchmark's worker: one process, one application start. It
//! loads a module, then times `C_Initialize`, finding the token and
//! `C_OpenSession`, `C_Login`, and the first signature (finding the EC
//! key, `C_SignInit` + `C_Sign` of a 32-byte hash, checked to be 64 bytes),
//! and prints one `RESULT` line with each step's nanoseconds.
//!
//! With `--login pin` the application passes the token's PIN (SoftHSM2
//! directly, or p11shim configured without a broker); with
//! `--login protected` it passes none and p11shim's `C_Login` waits for the
//! broker's grant (the protected authentication path).

use std::path::PathBuf;
use std::ptr;
use std::time::Instant;

use pkcs11_sys::*;

use crate::p11::{Module, check, die, set_who};
use crate::worker::{EC_LABEL, TOKEN_LABEL, USER_PIN};

/// How the worker logs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Login {
    /// The application passes the user PIN.
    Pin,
    /// No PIN: p11shim gets it from the broker.
    Protected,
}

impl Login {
    pub fn name(self) -> &'static str {
        match self {
            Login::Pin => "pin",
            Login::Protected => "protected",
        }
    }
}

/// `--broker-worker --lib <module> --login pin|protected`.
pub fn parse(args: &[String]) -> (PathBuf, Login) {
    let (mut lib, mut login) = (None, None);
    let mut i = 1;
    while i < args.len() {
        match args[i].as_str() {
            "--lib" => lib = args.get(i + 1).map(PathBuf::from),
            "--login" => {
                login = match args.get(i + 1).map(String::as_str) {
                    Some("pin") => Some(Login::Pin),
                    Some("protected") => Some(Login::Protected),
                    other => die(format_args!("broker worker: --login {other:?}")),
                }
            }
            a => die(format_args!("broker worker: unknown argument {a:?}")),
        }
        i += 2;
    }
    (
        lib.unwrap_or_else(|| die("broker worker: --lib is required")),
        login.unwrap_or_else(|| die("broker worker: --login is required")),
    )
}

fn nanos(from: Instant, to: Instant) -> u128 {
    to.duration_since(from).as_nanos()
}

pub fn run(lib: PathBuf, login: Login) {
    set_who(format!("broker worker ({})", login.name()));
    let t_load = Instant::now();
    let m = Module::load(&lib);
    let t0 = Instant::now();
    m.initialize();
    let t1 = Instant::now();
    let slot = m.find_slot(TOKEN_LABEL);
    let s = m.open_session(slot, CKF_SERIAL_SESSION);
    let t2 = Instant::now();
    match login {
        Login::Pin => m.login_user(s, USER_PIN),
        // SAFETY: a NULL PIN of length 0 is the protected authentication
        // path's login; no pointer is read.
        Login::Protected => check(
            unsafe { (m.f.login)(s, CKU_USER, ptr::null_mut(), 0) },
            "C_Login with no PIN",
        ),
    }
    let t3 = Instant::now();
    let key = m.find_one(s, CKO_PRIVATE_KEY, EC_LABEL);
    let mut mech = CK_MECHANISM {
        mechanism: CKM_ECDSA,
        pParameter: ptr::null_mut(),
        ulParameterLen: 0,
    };
    // SAFETY: a valid mechanism living across the call.
    check(unsafe { (m.f.sign_init)(s, &mut mech, key) }, "C_SignInit");
    let mut hash = [0x5au8; 32];
    let mut sig = [0u8; 128];
    let mut n = sig.len() as CK_ULONG;
    // SAFETY: input and output buffers of the lengths given.
    check(
        unsafe {
            (m.f.sign)(
                s,
                hash.as_mut_ptr(),
                hash.len() as CK_ULONG,
                sig.as_mut_ptr(),
                &mut n,
            )
        },
        "C_Sign",
    );
    let t4 = Instant::now();
    if n != 64 {
        die(format_args!("C_Sign gave {n} bytes, expected 64"));
    }
    m.close_session(s);
    m.finalize();
    println!(
        "RESULT load={} init={} open={} login={} sign={} total={}",
        nanos(t_load, t0),
        nanos(t0, t1),
        nanos(t1, t2),
        nanos(t2, t3),
        nanos(t3, t4),
        nanos(t0, t4),
    );
}
