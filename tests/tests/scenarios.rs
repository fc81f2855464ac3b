//! The PKCS#11 scenarios of `p11shim_tests::scenarios`, each run through
//! p11shim over SoftHSM2 in its own test process: every step must meet the
//! scenario's expectations, on the configuration's virtual slot 0.

use p11shim_tests::Target;
use p11shim_tests::scenarios::{ALL, by_name, environment, run};

/// Runs a scenario through p11shim and fails with the steps it violated.
fn through_p11shim(name: &str) {
    let env = environment();
    env.apply();
    let scenario = by_name(name).unwrap_or_else(|| panic!("no scenario {name}"));
    let run = run(&env.module(Target::Shim), scenario);
    let t = &run.transcript;
    assert!(
        t.violations().is_empty(),
        "scenario {name} through p11shim\n{}",
        t.report()
    );
    assert_eq!(
        run.slot,
        Some(0),
        "the scenario ran on virtual slot 0 (the only one configured)"
    );
}

macro_rules! scenarios {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        $(
            $(#[$doc])*
            #[test]
            fn $name() {
                through_p11shim(stringify!($name));
            }
        )*

        /// Every scenario of the library has a test here.
        #[test]
        fn every_scenario_is_tested() {
            let tested = [$(stringify!($name)),*];
            let missing: Vec<_> = ALL.iter().map(|s| s.name).filter(|n| !tested.contains(n)).collect();
            assert!(missing.is_empty(), "scenarios without a test: {missing:?}");
        }
    };
}

scenarios! {
    /// Three initialize/use/finalize cycles in one process work through p11shim.
    init_finalize_cycles,
    /// RO/RW sessions report the virtual slot and their state; C_CloseAllSessions closes them all.
    sessions,
    /// Wrong PIN, double login, SO/user exclusion, logout, C_SetPIN and C_InitPIN give the spec's codes.
    login_logout,
    /// C_GenerateRandom returns the lengths asked for, with fresh bytes each time.
    random,
    /// Slot, token and mechanism information and slot events come through p11shim.
    slot_token_info,
    /// Searches by label, id and class, in several batches, find exactly what exists.
    find_objects,
    /// C_FindObjects into a NULL array of 0 handles leaves the search usable.
    find_null_array,
    /// Attribute changes are visible; length queries, small buffers and sensitive values follow the spec.
    attributes,
    /// Copies are equal keys; destroyed handles are invalid everywhere.
    copy_destroy,
    /// Session objects die with their session, token objects survive C_CloseAllSessions.
    session_objects_lifetime,
    /// RSA PKCS#1 v1.5 and PSS signatures, single- and multi-part, verify.
    sign_rsa,
    /// ECDSA P-256 and P-384 signatures verify and fail on other data.
    sign_ecdsa,
    /// AES-GCM and AES-CBC-PAD (multi-part too) round-trip and refuse tampering.
    encrypt_aes,
    /// RSA-OAEP and RSA PKCS#1 v1.5 encryption round-trip.
    encrypt_rsa_oaep,
    /// SHA digests over several updates equal single-part ones; C_DigestKey digests the key value.
    digest_multipart,
    /// Dual-function updates work or are CKR_FUNCTION_NOT_SUPPORTED.
    dual_function,
    /// C_GetOperationState/C_SetOperationState answer without disturbing the operation.
    operation_state,
    /// Generated AES, RSA and EC keys work and token ones are found again.
    generate_keys,
    /// AES key wrap and RSA-OAEP wrap round-trip an AES key.
    wrap_unwrap,
    /// ECDH on P-256 gives the same secret both ways.
    ecdh_derive,
}
