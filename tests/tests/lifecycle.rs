//! Loading and unloading: the module survives being loaded, initialized,
//! finalized and unloaded many times in one process, without leaking threads
//! or memory.

use std::ptr::null_mut;

use p11shim_tests::{TestEnv, p11shim_lib};
use pkcs11_sys::*;

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Resident set size in KiB.
fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    pages * page / 1024
}

/// One cycle: dlopen, C_Initialize, a session and a digest, C_Finalize, dlclose.
fn cycle() {
    // SAFETY: loading a PKCS#11 module.
    let lib = unsafe { libloading::Library::new(p11shim_lib()) }.expect("dlopen");
    // SAFETY: the symbol has the spec's signature; every call below passes
    // valid pointers.
    unsafe {
        let gfl = lib
            .get::<unsafe extern "C" fn(CK_FUNCTION_LIST_PTR_PTR) -> CK_RV>(b"C_GetFunctionList\0")
            .unwrap();
        let mut fl: CK_FUNCTION_LIST_PTR = null_mut();
        assert_eq!(gfl(&mut fl), CKR_OK);
        let fl = &*fl;
        let mut args = CK_C_INITIALIZE_ARGS {
            flags: CKF_OS_LOCKING_OK,
            ..Default::default()
        };
        assert_eq!(
            (fl.C_Initialize.unwrap())((&mut args as *mut CK_C_INITIALIZE_ARGS).cast()),
            CKR_OK
        );
        let mut h: CK_SESSION_HANDLE = 0;
        assert_eq!(
            (fl.C_OpenSession.unwrap())(0, CKF_SERIAL_SESSION, null_mut(), None, &mut h),
            CKR_OK
        );
        let mut mech = CK_MECHANISM {
            mechanism: CKM_SHA256,
            pParameter: null_mut(),
            ulParameterLen: 0,
        };
        assert_eq!((fl.C_DigestInit.unwrap())(h, &mut mech), CKR_OK);
        let mut data = [7u8; 64];
        let mut out = [0u8; 32];
        let mut len: CK_ULONG = 32;
        assert_eq!(
            (fl.C_Digest.unwrap())(h, data.as_mut_ptr(), 64, out.as_mut_ptr(), &mut len),
            CKR_OK
        );
        assert_eq!((fl.C_Finalize.unwrap())(null_mut()), CKR_OK);
    }
    lib.close().expect("dlclose");
}

/// 200 load/initialize/finalize/unload cycles: no crash, no thread left
/// behind, no growth in memory once warmed up.
#[test]
fn load_initialize_finalize_unload_200_times() {
    let env = TestEnv::new();
    env.init_token("cycle");
    env.single_slot_config("cycle", "cycle", "", "");
    env.apply();

    let threads_before = threads();
    for _ in 0..20 {
        cycle();
    }
    let warm = rss_kib();
    for _ in 20..200 {
        cycle();
    }
    let end = rss_kib();
    assert_eq!(threads(), threads_before, "a thread was left behind");
    // 180 cycles: a leak of 8 KiB per cycle would show as 1.4 MiB.
    let growth = end.saturating_sub(warm);
    assert!(
        growth < 1024,
        "memory grew by {growth} KiB over 180 cycles (from {warm} KiB to {end} KiB)"
    );
}

/// C_Finalize from an exit handler (OpenSSL's cleanup does this), after the
/// main thread's storage was torn down, at a log level that logs it: a C
/// program that initializes on its main thread and finalizes in `atexit`
/// exits cleanly instead of aborting.
#[test]
fn finalize_from_an_exit_handler() {
    if !p11shim_tests::require("cc") {
        return;
    }
    let env = TestEnv::new();
    env.init_token("exit");
    env.single_slot_config("exit", "exit", "", "");
    let src = p11shim_tests::repo_root().join("tests/clients/c/atexit.c");
    let bin = env.path().join("atexit");
    p11shim_tests::run_ok(
        std::process::Command::new("cc")
            .arg(&src)
            .arg("-o")
            .arg(&bin)
            .arg("-ldl"),
    );
    let out = env
        .command(bin.to_str().unwrap())
        .arg(p11shim_lib())
        .env("P11SHIM_LOG", "info")
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "exit status {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("initialized"));
}
