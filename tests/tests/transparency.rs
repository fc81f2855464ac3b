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

p11shim_tests::for_each_scenario!(transparency);
