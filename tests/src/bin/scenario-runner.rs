//! Runs one scenario against one PKCS#11 module and prints its transcript
//! on stdout, one step a line (name, expectation, outcome; tab-separated).
//!
//! `scenario-runner <scenario> <module.so>`; `scenario-runner --list`
//! prints the scenarios. The environment names the token store and the
//! p11shim configuration (`SOFTHSM2_CONF`, `P11SHIM_CONFIG`), and must hold
//! a token labelled as `p11shim_tests::scenarios::TOKEN`. The transparency
//! test runs each module in a child process of its own this way, since
//! SoftHSM2 is a per-process singleton.

use std::path::Path;
use std::process::ExitCode;

use p11shim_tests::scenarios::{ALL, by_name, run};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [flag] if flag == "--list" => {
            for s in ALL {
                println!("{}", s.name);
            }
            ExitCode::SUCCESS
        }
        [name, module] => match by_name(name) {
            Some(scenario) => {
                print!("{}", run(Path::new(module), scenario).transcript.to_text());
                ExitCode::SUCCESS
            }
            None => {
                eprintln!("unknown scenario {name:?}; --list lists them");
                ExitCode::from(2)
            }
        },
        _ => {
            eprintln!("usage: scenario-runner <scenario> <module.so> | --list");
            ExitCode::from(2)
        }
    }
}
