//! Secrets never reach a log: PINs (the application's, the SO's, a new PIN,
//! a configured PIN source's) and data to be signed are absent from the
//! diagnostic log at the loudest level, on success and on failure.

use std::ptr::null_mut;

use p11shim_tests::{TestEnv, abi, call, p11shim_lib};
use pkcs11_sys::*;

const USER_PIN: &str = "Zq8pW3vUserPin";
const SO_PIN: &str = "Hk2xR7mSoPin";
const NEW_PIN: &str = "Jt5cN9bNewPin";
const WRONG_PIN: &str = "Wy4dL6fWrongPin";
const CONFIGURED_PIN: &str = "Qe3sV8gCfgPin";
const PAYLOAD: &[u8] = b"PAYLOAD-7d3e91-to-be-signed";

fn pin_ptr(p: &str) -> (CK_UTF8CHAR_PTR, CK_ULONG) {
    (p.as_ptr().cast_mut(), p.len() as CK_ULONG)
}

fn assert_clean(log: &str) {
    let payload = String::from_utf8_lossy(PAYLOAD);
    for secret in [
        USER_PIN,
        SO_PIN,
        NEW_PIN,
        WRONG_PIN,
        CONFIGURED_PIN,
        &payload,
    ] {
        assert!(
            !log.contains(secret),
            "the log contains a secret ({secret}):\n{log}"
        );
    }
    let hex: String = PAYLOAD.iter().map(|b| format!("{b:02x}")).collect();
    assert!(
        !log.to_lowercase().contains(&hex[..16]),
        "the log contains the payload in hex"
    );
}

/// PINs the application passes, and the data it signs, stay out of a
/// trace-level log, on success and on failure.
#[test]
fn application_pins_and_data_never_logged() {
    let env = TestEnv::new();
    env.init_token_with("secrets", SO_PIN, USER_PIN);
    let log = env.path().join("p11shim.log");
    env.single_slot_config(
        "secrets",
        "secrets",
        "",
        &format!("file = \"{}\"", log.display()),
    );
    env.apply();
    // SAFETY: one test per process.
    unsafe { std::env::set_var("P11SHIM_LOG", "trace") };

    let m = abi::Module::load(&p11shim_lib());
    assert_eq!(call!(m, C_Initialize(null_mut())), CKR_OK);
    let mut h: CK_SESSION_HANDLE = 0;
    assert_eq!(
        call!(
            m,
            C_OpenSession(
                0,
                CKF_SERIAL_SESSION | CKF_RW_SESSION,
                null_mut(),
                None,
                &mut h
            )
        ),
        CKR_OK
    );
    let (p, l) = pin_ptr(WRONG_PIN);
    assert_eq!(call!(m, C_Login(h, CKU_USER, p, l)), CKR_PIN_INCORRECT);
    let (p, l) = pin_ptr(SO_PIN);
    assert_eq!(call!(m, C_Login(h, CKU_SO, p, l)), CKR_OK);
    let (p, l) = pin_ptr(NEW_PIN);
    assert_eq!(call!(m, C_InitPIN(h, p, l)), CKR_OK);
    assert_eq!(call!(m, C_Logout(h)), CKR_OK);
    let (p, l) = pin_ptr(NEW_PIN);
    assert_eq!(call!(m, C_Login(h, CKU_USER, p, l)), CKR_OK);
    let (o, ol) = pin_ptr(NEW_PIN);
    let (n, nl) = pin_ptr(USER_PIN);
    assert_eq!(call!(m, C_SetPIN(h, o, ol, n, nl)), CKR_OK);

    // An HMAC over the payload, with a session key made for it.
    let mut key: CK_OBJECT_HANDLE = 0;
    let mut keygen = CK_MECHANISM {
        mechanism: CKM_GENERIC_SECRET_KEY_GEN,
        pParameter: null_mut(),
        ulParameterLen: 0,
    };
    let mut len: CK_ULONG = 32;
    let mut yes: CK_BBOOL = CK_TRUE;
    let mut tmpl = [
        CK_ATTRIBUTE {
            type_: CKA_VALUE_LEN,
            pValue: (&mut len as *mut CK_ULONG).cast(),
            ulValueLen: 8,
        },
        CK_ATTRIBUTE {
            type_: CKA_SIGN,
            pValue: (&mut yes as *mut CK_BBOOL).cast(),
            ulValueLen: 1,
        },
    ];
    assert_eq!(
        call!(
            m,
            C_GenerateKey(h, &mut keygen, tmpl.as_mut_ptr(), 2, &mut key)
        ),
        CKR_OK
    );
    let mut mech = CK_MECHANISM {
        mechanism: CKM_SHA256_HMAC,
        pParameter: null_mut(),
        ulParameterLen: 0,
    };
    assert_eq!(call!(m, C_SignInit(h, &mut mech, key)), CKR_OK);
    let mut data = PAYLOAD.to_vec();
    let mut sig = [0u8; 32];
    let mut sig_len: CK_ULONG = 4;
    assert_eq!(
        call!(
            m,
            C_Sign(
                h,
                data.as_mut_ptr(),
                data.len() as CK_ULONG,
                sig.as_mut_ptr(),
                &mut sig_len
            )
        ),
        CKR_BUFFER_TOO_SMALL
    );
    sig_len = 32;
    assert_eq!(
        call!(
            m,
            C_Sign(
                h,
                data.as_mut_ptr(),
                data.len() as CK_ULONG,
                sig.as_mut_ptr(),
                &mut sig_len
            )
        ),
        CKR_OK
    );
    assert_eq!(call!(m, C_Finalize(null_mut())), CKR_OK);

    let text = std::fs::read_to_string(&log).expect("log file");
    assert!(
        text.contains("C_Login") && text.contains("C_Sign"),
        "the trace log should record the calls:\n{text}"
    );
    assert!(
        text.contains("CKR_PIN_INCORRECT"),
        "the failed login should be logged:\n{text}"
    );
    assert_clean(&text);
}

/// A PIN read from a configured source stays out of the log, and so does a
/// PIN the application passes that p11shim replaces.
#[test]
fn configured_pin_never_logged() {
    let env = TestEnv::new();
    env.init_token_with("cfgpin", SO_PIN, CONFIGURED_PIN);
    let log = env.path().join("p11shim.log");
    env.single_slot_config(
        "cfgpin",
        "cfgpin",
        "pin = \"env:P11SHIM_TEST_PIN\"",
        &format!("file = \"{}\"", log.display()),
    );
    env.apply();
    // SAFETY: one test per process.
    unsafe {
        std::env::set_var("P11SHIM_TEST_PIN", CONFIGURED_PIN);
        std::env::set_var("P11SHIM_LOG", "trace");
    }

    let m = abi::Module::load(&p11shim_lib());
    assert_eq!(call!(m, C_Initialize(null_mut())), CKR_OK);
    let mut ti = CK_TOKEN_INFO::default();
    assert_eq!(call!(m, C_GetTokenInfo(0, &mut ti)), CKR_OK);
    assert_ne!(
        ti.flags & CKF_PROTECTED_AUTHENTICATION_PATH,
        0,
        "the PIN comes from outside the application"
    );
    let mut h: CK_SESSION_HANDLE = 0;
    assert_eq!(
        call!(
            m,
            C_OpenSession(0, CKF_SERIAL_SESSION, null_mut(), None, &mut h)
        ),
        CKR_OK
    );
    // The application passes a wrong PIN, or none: the configured one is used.
    let (p, l) = pin_ptr(WRONG_PIN);
    assert_eq!(call!(m, C_Login(h, CKU_USER, p, l)), CKR_OK);
    assert_eq!(call!(m, C_Logout(h)), CKR_OK);
    assert_eq!(call!(m, C_Login(h, CKU_USER, null_mut(), 0)), CKR_OK);
    assert_eq!(call!(m, C_Logout(h)), CKR_OK);
    // The source disappears: a clear vendor-defined code, no PIN in the log.
    // SAFETY: one test per process.
    unsafe { std::env::remove_var("P11SHIM_TEST_PIN") };
    assert_eq!(
        call!(m, C_Login(h, CKU_USER, null_mut(), 0)),
        CKR_VENDOR_DEFINED | 0x5053_0003
    );
    assert_eq!(call!(m, C_Finalize(null_mut())), CKR_OK);

    let text = std::fs::read_to_string(&log).expect("log file");
    assert!(
        text.contains("P11SHIM_TEST_PIN is not set"),
        "the log should name the source:\n{text}"
    );
    assert_clean(&text);
}
