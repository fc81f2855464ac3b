//! Transparency: every scenario runs against SoftHSM2 directly and through
//! p11shim, each in a child process of its own (`scenario-runner`) with its
//! own fresh token; the two transcripts, return codes and deterministic
//! outputs included, must be identical, and must meet the scenario's
//! expectations.

use p11shim_tests::scenarios::{ALL, Transcript, environment};
use p11shim_tests::{Target, run_ok};

/// Runs a scenario in a child process against one target.
fn run_in_child(name: &str, target: Target) -> Transcript {
    let env = environment();
    let mut cmd = env.command(env!("CARGO_BIN_EXE_scenario-runner"));
    cmd.arg(name).arg(env.module(target));
    let out = run_ok(&mut cmd);
    Transcript::parse(&String::from_utf8_lossy(&out.stdout))
        .unwrap_or_else(|e| panic!("{target:?}: {e}"))
}

/// Runs a scenario against both targets and compares the transcripts.
fn transparent(name: &str) {
    let direct = run_in_child(name, Target::Direct);
    let shim = run_in_child(name, Target::Shim);
    assert!(
        direct.violations().is_empty(),
        "scenario {name} fails against SoftHSM2 itself\n{}",
        direct.report()
    );
    let diff = direct.diff(&shim, "SoftHSM2", "p11shim");
    assert!(
        diff.is_empty(),
        "scenario {name}: p11shim differs from SoftHSM2 in {} step(s):\n{}\n--- p11shim's transcript\n{}",
        diff.len(),
        diff.join("\n"),
        shim.to_text()
    );
    assert!(
        shim.violations().is_empty(),
        "scenario {name} through p11shim\n{}",
        shim.report()
    );
}

macro_rules! transparency {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        $(
            $(#[$doc])*
            #[test]
            fn $name() {
                transparent(stringify!($name));
            }
        )*

        /// Every scenario of the library is compared here.
        #[test]
        fn every_scenario_is_compared() {
            let compared = [$(stringify!($name)),*];
            let missing: Vec<_> = ALL.iter().map(|s| s.name).filter(|n| !compared.contains(n)).collect();
            assert!(missing.is_empty(), "scenarios without a transparency test: {missing:?}");
        }
    };
}

transparency! {
    /// Initialize/finalize cycles answer as SoftHSM2 does.
    init_finalize_cycles,
    /// Session calls and their states answer as SoftHSM2 does.
    sessions,
    /// Login, logout and PIN changes return SoftHSM2's codes.
    login_logout,
    /// C_GenerateRandom and C_SeedRandom answer as SoftHSM2 does.
    random,
    /// Mechanism list and details, token flags and slot events are SoftHSM2's.
    slot_token_info,
    /// Searches find as many objects, in the same batches, as SoftHSM2.
    find_objects,
    /// C_FindObjects into a NULL array of 0 handles answers as SoftHSM2 does.
    find_null_array,
    /// C_GetAttributeValue/C_SetAttributeValue give SoftHSM2's codes, lengths and values.
    attributes,
    /// Copy and destroy give SoftHSM2's codes.
    copy_destroy,
    /// Object handles live and die as SoftHSM2's do.
    session_objects_lifetime,
    /// RSA signatures are byte-identical to SoftHSM2's.
    sign_rsa,
    /// ECDSA answers as SoftHSM2 does.
    sign_ecdsa,
    /// AES ciphertexts are byte-identical to SoftHSM2's.
    encrypt_aes,
    /// RSA encryption answers as SoftHSM2 does.
    encrypt_rsa_oaep,
    /// Digests are byte-identical to SoftHSM2's.
    digest_multipart,
    /// Dual-function calls return SoftHSM2's codes.
    dual_function,
    /// Operation state calls return SoftHSM2's codes.
    operation_state,
    /// Key generation answers as SoftHSM2 does.
    generate_keys,
    /// Wrapped keys are byte-identical to SoftHSM2's.
    wrap_unwrap,
    /// ECDH secrets are byte-identical to SoftHSM2's.
    ecdh_derive,
}
