//! Writes audit records with `fsync = Always` until it is killed, and
//! reports on stdout how many are on stable storage: one line `synced N`
//! after each group of records it waited for. The crash-durability test
//! SIGKILLs it and checks that every record reported is in the file.
//!
//! `audit-writer <file>`; the checkpoints are signed with the HMAC key in
//! the environment variable `AUDIT_HMAC_KEY` (hex).

use std::borrow::Cow;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use p11shim_audit::{Auditor, Config, FileSink, Fsync, Kind, Record, Signer, Zeroizing};

fn main() -> ExitCode {
    let Some(path) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: audit-writer <file>");
        return ExitCode::from(2);
    };
    let key = std::env::var("AUDIT_HMAC_KEY").unwrap_or_default();
    let key: Vec<u8> = (0..key.len() / 2)
        .filter_map(|i| u8::from_str_radix(&key[2 * i..2 * i + 2], 16).ok())
        .collect();
    let cfg = Config {
        file: Some(FileSink {
            fsync: Fsync::Always,
            ..FileSink::new(path)
        }),
        checkpoint_records: 25,
        ..Config::default()
    };
    let auditor = match Auditor::start(cfg, Some(Signer::hmac(Zeroizing::new(key)))) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("audit-writer: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout().lock();
    // Bounded: the test kills the process long before.
    for i in 0u64..10_000_000 {
        let mut r = Record::new(Kind::KeyUse, "C_Sign", 0);
        r.slot = Some(0);
        r.detail = Some(Cow::Owned(format!("n={i}")));
        if !auditor.record(r) {
            eprintln!("audit-writer: record {i} refused");
            return ExitCode::FAILURE;
        }
        if i % 7 == 6 {
            if !auditor.flush(Duration::from_secs(30)) {
                eprintln!("audit-writer: flush timed out");
                return ExitCode::FAILURE;
            }
            let synced = auditor.stats().synced;
            if writeln!(out, "synced {synced}")
                .and_then(|()| out.flush())
                .is_err()
            {
                return ExitCode::FAILURE;
            }
        }
    }
    auditor.stop(Duration::from_secs(10));
    ExitCode::SUCCESS
}
