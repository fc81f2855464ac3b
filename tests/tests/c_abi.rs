#![allow(clippy::undocumented_unsafe_blocks, clippy::manual_c_str_literals)]
//! The spec's error paths, called through the C ABI of libp11shim.so:
//! NULL pointers, bad handles, the two-call buffer convention, calls before
//! `C_Initialize`, double initialization, a forked child, interfaces and
//! exported symbols.

use std::ptr::null_mut;

use p11shim_tests::abi;
use p11shim_tests::{TestEnv, USER_PIN, call, p11shim_lib};
use pkcs11_sys::*;

/// A token and a config, applied to this process.
fn env() -> TestEnv {
    let env = TestEnv::new();
    env.init_token("abi");
    env.single_slot_config("virt", "abi", "", "");
    env.apply();
    env
}

fn open_rw(m: &abi::Module) -> CK_SESSION_HANDLE {
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
    h
}

fn login(m: &abi::Module, h: CK_SESSION_HANDLE) {
    let pin = USER_PIN.as_bytes();
    assert_eq!(
        call!(
            m,
            C_Login(h, CKU_USER, pin.as_ptr().cast_mut(), pin.len() as CK_ULONG)
        ),
        CKR_OK
    );
}

/// Every call before C_Initialize is CKR_CRYPTOKI_NOT_INITIALIZED; the
/// function lists and interfaces are available before it.
#[test]
fn calls_before_initialize() {
    let _env = env();
    let m = abi::Module::load(&p11shim_lib());
    let mut count: CK_ULONG = 0;
    let mut info = CK_INFO::default();
    assert_eq!(call!(m, C_GetInfo(&mut info)), CKR_CRYPTOKI_NOT_INITIALIZED);
    assert_eq!(
        call!(m, C_GetSlotList(CK_TRUE, null_mut(), &mut count)),
        CKR_CRYPTOKI_NOT_INITIALIZED
    );
    assert_eq!(call!(m, C_CloseSession(1)), CKR_CRYPTOKI_NOT_INITIALIZED);
    assert_eq!(
        call!(m, C_Finalize(null_mut())),
        CKR_CRYPTOKI_NOT_INITIALIZED
    );
    let mut buf = [0u8; 8];
    assert_eq!(
        call!(m, C_GenerateRandom(1, buf.as_mut_ptr(), 8)),
        CKR_CRYPTOKI_NOT_INITIALIZED
    );
    let mut fl: CK_FUNCTION_LIST_PTR = null_mut();
    assert_eq!(call!(m, C_GetFunctionList(&mut fl)), CKR_OK);
    assert_eq!(fl as *const _, m.fl as *const _);
}

/// Double initialization, bad initialize arguments, finalize arguments.
#[test]
fn initialize_and_finalize_rules() {
    let _env = env();
    let m = abi::Module::load(&p11shim_lib());
    // Some but not all mutex functions: CKR_ARGUMENTS_BAD.
    unsafe extern "C" fn create(_: CK_VOID_PTR_PTR) -> CK_RV {
        CKR_OK
    }
    let mut bad = CK_C_INITIALIZE_ARGS {
        CreateMutex: Some(create),
        ..Default::default()
    };
    assert_eq!(
        call!(
            m,
            C_Initialize((&mut bad as *mut CK_C_INITIALIZE_ARGS).cast())
        ),
        CKR_ARGUMENTS_BAD
    );
    // OS locking, as SunPKCS11 passes it.
    let mut args = CK_C_INITIALIZE_ARGS {
        flags: CKF_OS_LOCKING_OK,
        ..Default::default()
    };
    assert_eq!(
        call!(
            m,
            C_Initialize((&mut args as *mut CK_C_INITIALIZE_ARGS).cast())
        ),
        CKR_OK
    );
    assert_eq!(
        call!(m, C_Initialize(null_mut())),
        CKR_CRYPTOKI_ALREADY_INITIALIZED
    );
    let mut junk = 0u8;
    assert_eq!(
        call!(m, C_Finalize((&mut junk as *mut u8).cast())),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(call!(m, C_Finalize(null_mut())), CKR_OK);
    assert_eq!(
        call!(m, C_Finalize(null_mut())),
        CKR_CRYPTOKI_NOT_INITIALIZED
    );
    assert_eq!(call!(m, C_Initialize(null_mut())), CKR_OK);
    assert_eq!(call!(m, C_Finalize(null_mut())), CKR_OK);
}

/// The configuration path passed in pReserved is used when P11SHIM_CONFIG
/// is not set.
#[test]
fn config_path_from_reserved() {
    let env = env();
    // SAFETY: one test per process; no other thread reads the environment.
    unsafe { std::env::remove_var("P11SHIM_CONFIG") };
    let m = abi::Module::load(&p11shim_lib());
    let path = std::ffi::CString::new(env.config_path().to_str().unwrap()).unwrap();
    let mut args = CK_C_INITIALIZE_ARGS {
        flags: CKF_OS_LOCKING_OK,
        pReserved: path.as_ptr().cast_mut().cast(),
        ..Default::default()
    };
    assert_eq!(
        call!(
            m,
            C_Initialize((&mut args as *mut CK_C_INITIALIZE_ARGS).cast())
        ),
        CKR_OK
    );
    let mut count: CK_ULONG = 0;
    assert_eq!(
        call!(m, C_GetSlotList(CK_TRUE, null_mut(), &mut count)),
        CKR_OK
    );
    assert_eq!(count, 1);
    assert_eq!(call!(m, C_Finalize(null_mut())), CKR_OK);
}

/// Runs `f` with the process's stderr going to a file; returns what was written.
fn capture_stderr(path: &std::path::Path, f: impl FnOnce()) -> String {
    let file = std::fs::File::create(path).unwrap();
    // SAFETY: plain descriptor juggling on fds this test owns; restored below.
    let saved = unsafe { libc::dup(2) };
    // SAFETY: as above.
    unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&file), 2) };
    f();
    // SAFETY: as above.
    unsafe {
        libc::dup2(saved, 2);
        libc::close(saved);
    }
    std::fs::read_to_string(path).unwrap()
}

/// An invalid configuration makes C_Initialize fail with
/// CKR_P11SHIM_CONFIG_INVALID and a log line naming file, line and key; a
/// vendor library that cannot be loaded is CKR_P11SHIM_BACKEND_UNAVAILABLE;
/// the module initializes once the file is fixed.
#[test]
fn invalid_config_fails_cleanly() {
    let env = env();
    env.write_config("[log]\nlevel = \"warn\"\n[[slot]]\nid = 0\nlabel = \"v\"\nweight = 3\n");
    let m = abi::Module::load(&p11shim_lib());
    let stderr = capture_stderr(&env.path().join("stderr.txt"), || {
        assert_eq!(
            call!(m, C_Initialize(null_mut())),
            CKR_VENDOR_DEFINED | 0x5053_0001,
            "CKR_P11SHIM_CONFIG_INVALID"
        );
    });
    let want = format!(
        "{}:6: key `weight`: unknown field `weight`",
        env.config_path().display()
    );
    assert!(
        stderr.contains(&want),
        "log does not say {want:?}:\n{stderr}"
    );

    env.write_config("[[slot]]\nid = 0\nlabel = \"v\"\n\n[[slot.member]]\nlibrary = \"/nonexistent/libvendor.so\"\ntoken = \"t\"\n");
    let stderr = capture_stderr(&env.path().join("stderr2.txt"), || {
        assert_eq!(
            call!(m, C_Initialize(null_mut())),
            CKR_VENDOR_DEFINED | 0x5053_0002,
            "CKR_P11SHIM_BACKEND_UNAVAILABLE"
        );
    });
    assert!(stderr.contains("/nonexistent/libvendor.so"), "{stderr}");
    let mut count: CK_ULONG = 0;
    assert_eq!(
        call!(m, C_GetSlotList(CK_TRUE, null_mut(), &mut count)),
        CKR_CRYPTOKI_NOT_INITIALIZED
    );

    env.single_slot_config("virt", "abi", "", "");
    assert_eq!(call!(m, C_Initialize(null_mut())), CKR_OK);
    assert_eq!(call!(m, C_Finalize(null_mut())), CKR_OK);
}

/// NULL where the spec forbids it is CKR_ARGUMENTS_BAD.
#[test]
fn null_pointers() {
    let _env = env();
    let m = abi::Module::load(&p11shim_lib());
    assert_eq!(call!(m, C_Initialize(null_mut())), CKR_OK);
    assert_eq!(call!(m, C_GetInfo(null_mut())), CKR_ARGUMENTS_BAD);
    assert_eq!(
        call!(m, C_GetSlotList(CK_TRUE, null_mut(), null_mut())),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(call!(m, C_GetSlotInfo(0, null_mut())), CKR_ARGUMENTS_BAD);
    assert_eq!(call!(m, C_GetTokenInfo(0, null_mut())), CKR_ARGUMENTS_BAD);
    assert_eq!(
        call!(m, C_GetMechanismList(0, null_mut(), null_mut())),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(
        call!(
            m,
            C_OpenSession(0, CKF_SERIAL_SESSION, null_mut(), None, null_mut())
        ),
        CKR_ARGUMENTS_BAD
    );
    let h = open_rw(&m);
    assert_eq!(call!(m, C_GetSessionInfo(h, null_mut())), CKR_ARGUMENTS_BAD);
    assert_eq!(
        call!(m, C_Login(h, CKU_USER, null_mut(), 4)),
        CKR_ARGUMENTS_BAD
    );
    login(&m, h);
    assert_eq!(
        call!(m, C_FindObjectsInit(h, null_mut(), 1)),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(call!(m, C_FindObjectsInit(h, null_mut(), 0)), CKR_OK);
    let mut n: CK_ULONG = 0;
    assert_eq!(
        call!(m, C_FindObjects(h, null_mut(), 4, &mut n)),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(call!(m, C_FindObjectsFinal(h)), CKR_OK);
    assert_eq!(
        call!(m, C_GenerateRandom(h, null_mut(), 8)),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(call!(m, C_DigestInit(h, null_mut())), CKR_ARGUMENTS_BAD);
    let mut mech = CK_MECHANISM {
        mechanism: CKM_SHA256,
        pParameter: null_mut(),
        ulParameterLen: 0,
    };
    assert_eq!(call!(m, C_DigestInit(h, &mut mech)), CKR_OK);
    assert_eq!(
        call!(m, C_Digest(h, null_mut(), 5, null_mut(), null_mut())),
        CKR_ARGUMENTS_BAD
    );
    let mut data = *b"hello";
    assert_eq!(
        call!(m, C_Digest(h, data.as_mut_ptr(), 5, null_mut(), null_mut())),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(
        call!(m, C_CreateObject(h, null_mut(), 0, null_mut())),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(call!(m, C_CloseSession(h)), CKR_OK);
    assert_eq!(
        call!(
            m,
            C_WaitForSlotEvent(CKF_DONT_BLOCK, null_mut(), null_mut())
        ),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(call!(m, C_Finalize(null_mut())), CKR_OK);
}

/// Unknown slot, session and object handles.
#[test]
fn bad_handles() {
    let _env = env();
    let m = abi::Module::load(&p11shim_lib());
    assert_eq!(call!(m, C_Initialize(null_mut())), CKR_OK);
    let mut si = CK_SLOT_INFO::default();
    assert_eq!(call!(m, C_GetSlotInfo(7, &mut si)), CKR_SLOT_ID_INVALID);
    let mut h: CK_SESSION_HANDLE = 0;
    assert_eq!(
        call!(
            m,
            C_OpenSession(7, CKF_SERIAL_SESSION, null_mut(), None, &mut h)
        ),
        CKR_SLOT_ID_INVALID
    );
    assert_eq!(
        call!(m, C_OpenSession(0, 0, null_mut(), None, &mut h)),
        CKR_SESSION_PARALLEL_NOT_SUPPORTED
    );
    assert_eq!(call!(m, C_CloseSession(0)), CKR_SESSION_HANDLE_INVALID);
    assert_eq!(call!(m, C_CloseSession(12345)), CKR_SESSION_HANDLE_INVALID);
    let h = open_rw(&m);
    assert_ne!(h, 0);
    login(&m, h);
    // Object handles: an unknown one, and the session handle itself (p11shim
    // issues sessions and objects from one counter, so neither is the other).
    let mut size: CK_ULONG = 0;
    assert_eq!(
        call!(m, C_GetObjectSize(h, 99, &mut size)),
        CKR_OBJECT_HANDLE_INVALID
    );
    assert_eq!(
        call!(m, C_GetObjectSize(h, h, &mut size)),
        CKR_OBJECT_HANDLE_INVALID
    );
    assert_eq!(call!(m, C_DestroyObject(h, 0)), CKR_OBJECT_HANDLE_INVALID);
    let mut mech = CK_MECHANISM {
        mechanism: CKM_SHA256_RSA_PKCS,
        pParameter: null_mut(),
        ulParameterLen: 0,
    };
    let rv = call!(m, C_SignInit(h, &mut mech, 42));
    assert!(
        rv == CKR_KEY_HANDLE_INVALID || rv == CKR_OBJECT_HANDLE_INVALID,
        "{rv:#x}"
    );
    // A closed session is invalid, and its handle is never issued again.
    assert_eq!(call!(m, C_CloseSession(h)), CKR_OK);
    assert_eq!(call!(m, C_CloseSession(h)), CKR_SESSION_HANDLE_INVALID);
    let h2 = open_rw(&m);
    assert!(h2 > h);
    assert_eq!(call!(m, C_CloseAllSessions(0)), CKR_OK);
    assert_eq!(call!(m, C_CloseSession(h2)), CKR_SESSION_HANDLE_INVALID);
    assert_eq!(call!(m, C_CloseAllSessions(9)), CKR_SLOT_ID_INVALID);
    assert_eq!(call!(m, C_Finalize(null_mut())), CKR_OK);
}

/// The NULL-buffer size query and CKR_BUFFER_TOO_SMALL, for p11shim's own
/// outputs and for forwarded ones.
#[test]
fn two_call_convention() {
    let _env = env();
    let m = abi::Module::load(&p11shim_lib());
    assert_eq!(call!(m, C_Initialize(null_mut())), CKR_OK);
    // Slot list.
    let mut count: CK_ULONG = 0;
    assert_eq!(
        call!(m, C_GetSlotList(CK_FALSE, null_mut(), &mut count)),
        CKR_OK
    );
    assert_eq!(count, 1);
    let mut slots = [CK_SLOT_ID::MAX; 2];
    count = 0;
    assert_eq!(
        call!(m, C_GetSlotList(CK_FALSE, slots.as_mut_ptr(), &mut count)),
        CKR_BUFFER_TOO_SMALL
    );
    assert_eq!(count, 1);
    count = 2;
    assert_eq!(
        call!(m, C_GetSlotList(CK_FALSE, slots.as_mut_ptr(), &mut count)),
        CKR_OK
    );
    assert_eq!((count, slots[0]), (1, 0));
    // Mechanism list.
    assert_eq!(
        call!(m, C_GetMechanismList(0, null_mut(), &mut count)),
        CKR_OK
    );
    assert!(count > 10);
    let mut mechs = vec![0; count as usize];
    let mut small = 1;
    assert_eq!(
        call!(m, C_GetMechanismList(0, mechs.as_mut_ptr(), &mut small)),
        CKR_BUFFER_TOO_SMALL
    );
    assert_eq!(small, count);
    assert_eq!(
        call!(m, C_GetMechanismList(0, mechs.as_mut_ptr(), &mut count)),
        CKR_OK
    );
    assert!(mechs.contains(&CKM_SHA256));
    // A digest.
    let h = open_rw(&m);
    let mut mech = CK_MECHANISM {
        mechanism: CKM_SHA256,
        pParameter: null_mut(),
        ulParameterLen: 0,
    };
    let mut data = *b"abc";
    assert_eq!(call!(m, C_DigestInit(h, &mut mech)), CKR_OK);
    let mut len: CK_ULONG = 0;
    assert_eq!(
        call!(m, C_Digest(h, data.as_mut_ptr(), 3, null_mut(), &mut len)),
        CKR_OK
    );
    assert_eq!(len, 32);
    let mut out = [0u8; 32];
    len = 8;
    assert_eq!(
        call!(
            m,
            C_Digest(h, data.as_mut_ptr(), 3, out.as_mut_ptr(), &mut len)
        ),
        CKR_BUFFER_TOO_SMALL
    );
    assert_eq!(len, 32);
    assert_eq!(
        call!(
            m,
            C_Digest(h, data.as_mut_ptr(), 3, out.as_mut_ptr(), &mut len)
        ),
        CKR_OK
    );
    assert_eq!(out[..4], [0xba, 0x78, 0x16, 0xbf]);
    // The interface list.
    // SAFETY: the symbol has the spec's signature.
    let gil = unsafe {
        m.lib
            .get::<unsafe extern "C" fn(CK_INTERFACE_PTR, CK_ULONG_PTR) -> CK_RV>(
                b"C_GetInterfaceList\0",
            )
    }
    .unwrap();
    let mut n: CK_ULONG = 0;
    // SAFETY: valid pointers.
    assert_eq!(unsafe { gil(null_mut(), &mut n) }, CKR_OK);
    assert_eq!(n, 3);
    let mut ifaces = [CK_INTERFACE::default(); 3];
    let mut one = 1;
    // SAFETY: room for one interface, as announced.
    assert_eq!(
        unsafe { gil(ifaces.as_mut_ptr(), &mut one) },
        CKR_BUFFER_TOO_SMALL
    );
    // SAFETY: room for two.
    assert_eq!(unsafe { gil(ifaces.as_mut_ptr(), &mut n) }, CKR_OK);
    assert_eq!(call!(m, C_Finalize(null_mut())), CKR_OK);
}

/// C_GetInterface offers the 3.0 list by default and 2.40 on request.
#[test]
fn interfaces() {
    let _env = env();
    let m = abi::Module::load(&p11shim_lib());
    type Gi = unsafe extern "C" fn(
        CK_UTF8CHAR_PTR,
        CK_VERSION_PTR,
        CK_INTERFACE_PTR_PTR,
        CK_FLAGS,
    ) -> CK_RV;
    // SAFETY: the symbol has the spec's signature.
    let gi = unsafe { m.lib.get::<Gi>(b"C_GetInterface\0") }.unwrap();
    let mut iface: CK_INTERFACE_PTR = null_mut();
    let version_of = |i: CK_INTERFACE_PTR| {
        // SAFETY: a valid interface's list starts with its version.
        unsafe { *((*i).pFunctionList as *const CK_VERSION) }
    };
    // SAFETY (all calls below): valid or deliberately bad arguments.
    unsafe {
        assert_eq!(gi(null_mut(), null_mut(), &mut iface, 0), CKR_OK);
        assert_eq!((version_of(iface).major, version_of(iface).minor), (3, 0));
        let name = b"PKCS 11\0".as_ptr().cast_mut();
        let mut v2 = CK_VERSION {
            major: 2,
            minor: 40,
        };
        assert_eq!(gi(name, &mut v2, &mut iface, 0), CKR_OK);
        assert_eq!(version_of(iface).major, 2);
        assert!(std::ptr::eq(
            (*iface).pFunctionList as *const CK_FUNCTION_LIST,
            m.fl
        ));
        let mut v9 = CK_VERSION { major: 9, minor: 9 };
        assert_eq!(gi(name, &mut v9, &mut iface, 0), CKR_ARGUMENTS_BAD);
        assert_eq!(
            gi(b"Vendor X\0".as_ptr().cast_mut(), null_mut(), &mut iface, 0),
            CKR_ARGUMENTS_BAD
        );
        // p11shim's own interface: the status query.
        assert_eq!(
            gi(b"p11shim\0".as_ptr().cast_mut(), null_mut(), &mut iface, 0),
            CKR_OK
        );
        let status = p11shim_tests::status_fn(iface);
        let mut len: CK_ULONG = 0;
        assert_eq!(status(null_mut(), &mut len), CKR_CRYPTOKI_NOT_INITIALIZED);
        assert_eq!((m.fl.C_Initialize.unwrap())(null_mut()), CKR_OK);
        assert_eq!(status(null_mut(), &mut len), CKR_OK);
        let mut small = [0u8; 4];
        let mut n4: CK_ULONG = 4;
        assert_eq!(status(small.as_mut_ptr(), &mut n4), CKR_BUFFER_TOO_SMALL);
        let mut buf = vec![0u8; len as usize];
        assert_eq!(status(buf.as_mut_ptr(), &mut len), CKR_OK);
        let text = String::from_utf8(buf).unwrap();
        assert!(
            text.contains(r#""label":"virt""#) && text.contains(r#""state":"active""#),
            "{text}"
        );
        assert_eq!((m.fl.C_Finalize.unwrap())(null_mut()), CKR_OK);
        assert_eq!(gi(name, null_mut(), null_mut(), 0), CKR_ARGUMENTS_BAD);
        // 3.0 functions the vendor lacks (SoftHSM2 2.6 is a 2.40 library).
        assert_eq!(gi(null_mut(), null_mut(), &mut iface, 0), CKR_OK);
        let fl3 = &*((*iface).pFunctionList as *const CK_FUNCTION_LIST_3_0);
        assert_eq!((m.fl.C_Initialize.unwrap())(null_mut()), CKR_OK);
        let mut h: CK_SESSION_HANDLE = 0;
        assert_eq!(
            (fl3.C_OpenSession.unwrap())(0, CKF_SERIAL_SESSION, null_mut(), None, &mut h),
            CKR_OK
        );
        assert_eq!(
            (fl3.C_SessionCancel.unwrap())(h, 0),
            CKR_FUNCTION_NOT_SUPPORTED
        );
        let mut info = CK_INFO::default();
        assert_eq!((fl3.C_GetInfo.unwrap())(&mut info), CKR_OK);
        assert_eq!(
            (info.cryptokiVersion.major, info.cryptokiVersion.minor),
            (3, 0)
        );
        assert_eq!((m.fl.C_GetInfo.unwrap())(&mut info), CKR_OK);
        assert_eq!(
            (info.cryptokiVersion.major, info.cryptokiVersion.minor),
            (2, 40)
        );
        assert_eq!(&info.manufacturerID[..7], b"p11shim");
        assert_eq!((m.fl.C_Finalize.unwrap())(null_mut()), CKR_OK);
    }
}

/// The virtual slot shows the configured label and a stable serial; the
/// member's own slot is never shown.
#[test]
fn virtual_slot_identity() {
    let _env = env();
    let m = abi::Module::load(&p11shim_lib());
    assert_eq!(call!(m, C_Initialize(null_mut())), CKR_OK);
    let mut ti = CK_TOKEN_INFO::default();
    assert_eq!(call!(m, C_GetTokenInfo(0, &mut ti)), CKR_OK);
    assert_eq!(&ti.label[..5], b"virt ");
    assert_eq!(ti.flags & CKF_PROTECTED_AUTHENTICATION_PATH, 0);
    let serial = ti.serialNumber;
    let h = open_rw(&m);
    let mut si = CK_SESSION_INFO::default();
    assert_eq!(call!(m, C_GetSessionInfo(h, &mut si)), CKR_OK);
    assert_eq!(si.slotID, 0);
    assert_eq!(si.state, CKS_RW_PUBLIC_SESSION);
    assert_eq!(call!(m, C_Finalize(null_mut())), CKR_OK);
    assert_eq!(call!(m, C_Initialize(null_mut())), CKR_OK);
    assert_eq!(call!(m, C_GetTokenInfo(0, &mut ti)), CKR_OK);
    assert_eq!(ti.serialNumber, serial);
    assert_eq!(call!(m, C_Finalize(null_mut())), CKR_OK);
}

/// A forked child sees CKR_CRYPTOKI_NOT_INITIALIZED until it initializes
/// again, then works; the parent's sessions are unaffected.
#[test]
fn fork_child_must_initialize_again() {
    let _env = env();
    let m = abi::Module::load(&p11shim_lib());
    assert_eq!(call!(m, C_Initialize(null_mut())), CKR_OK);
    let parent_session = open_rw(&m);
    login(&m, parent_session);
    // SAFETY: the child only makes PKCS#11 calls and exits with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let mut code = 0;
        let mut count: CK_ULONG = 0;
        if call!(m, C_GetSlotList(CK_TRUE, null_mut(), &mut count)) != CKR_CRYPTOKI_NOT_INITIALIZED
        {
            code |= 1;
        }
        if call!(m, C_CloseSession(parent_session)) != CKR_CRYPTOKI_NOT_INITIALIZED {
            code |= 2;
        }
        if call!(m, C_Initialize(null_mut())) != CKR_OK {
            code |= 4;
        }
        let mut h: CK_SESSION_HANDLE = 0;
        if call!(
            m,
            C_OpenSession(0, CKF_SERIAL_SESSION, null_mut(), None, &mut h)
        ) != CKR_OK
        {
            code |= 8;
        }
        let mut buf = [0u8; 16];
        if call!(m, C_GenerateRandom(h, buf.as_mut_ptr(), 16)) != CKR_OK {
            code |= 16;
        }
        if call!(m, C_Finalize(null_mut())) != CKR_OK {
            code |= 32;
        }
        // SAFETY: leaving the child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(libc::WIFEXITED(status), "child did not exit normally");
    assert_eq!(libc::WEXITSTATUS(status), 0, "child failure bits");
    // The parent's session still works.
    let mut buf = [0u8; 16];
    assert_eq!(
        call!(m, C_GenerateRandom(parent_session, buf.as_mut_ptr(), 16)),
        CKR_OK
    );
    assert_eq!(call!(m, C_Finalize(null_mut())), CKR_OK);
}

/// Only the PKCS#11 entry points are exported.
#[test]
fn exports_only_pkcs11_symbols() {
    if !p11shim_tests::require("nm") {
        return;
    }
    let out = p11shim_tests::run_ok(
        std::process::Command::new("nm")
            .args(["-D", "--defined-only"])
            .arg(p11shim_lib()),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    let others: Vec<&&str> = names.iter().filter(|n| !n.starts_with("C_")).collect();
    assert!(others.is_empty(), "non-PKCS#11 exports: {others:?}");
    for f in [
        "C_GetFunctionList",
        "C_GetInterface",
        "C_GetInterfaceList",
        "C_Initialize",
        "C_Sign",
        "C_MessageVerifyFinal",
        "C_LoginUser",
    ] {
        assert!(names.contains(&f), "{f} is not exported");
    }
    assert_eq!(names.len(), 92, "every 2.40 and 3.0 function, no more");
}
