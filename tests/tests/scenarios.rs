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

p11shim_tests::for_each_scenario!(scenarios);
