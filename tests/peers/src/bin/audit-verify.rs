//! Verifies p11shim audit files with `p11shim_audit::verify` and counts
//! their records by kind, for the demo (until `p11shim audit verify` exists;
//! it prints the same numbers).
//!
//!     audit-verify [--hmac-key-file F | --ed25519-pub F] FILE...
//!
//! Prints one `key=value` line (`files`, `chains`, `terminated`, `records`,
//! `checkpoints`, `signed`, `broken`, `warnings`), one `kinds` line (the
//! count of each record kind, in the files' order of first appearance), then
//! each warning and the broken link if any. Exit status: 0 when nothing is
//! broken, 1 when a link is broken, 2 on a usage or read error. Kinds are
//! counted only when the files verify.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use p11shim_audit::{VerifyKey, Zeroizing, verify};

#[derive(Parser, Debug)]
#[command(about = "Verify p11shim audit files and count their records by kind")]
struct Args {
    /// The HMAC-SHA256 checkpoint key (the broker's `audit_key`: the file's
    /// text, surrounding whitespace removed, as the broker hands it out).
    #[arg(long, value_name = "FILE", conflicts_with = "ed25519_pub")]
    hmac_key_file: Option<PathBuf>,
    /// The Ed25519 public key (SPKI PEM) of `signing_key = "file:..."`.
    #[arg(long, value_name = "FILE")]
    ed25519_pub: Option<PathBuf>,
    /// Audit files, oldest first.
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

fn key(args: &Args) -> Result<VerifyKey, String> {
    if let Some(p) = &args.hmac_key_file {
        let raw =
            Zeroizing::new(std::fs::read(p).map_err(|e| format!("{}: {}", p.display(), e.kind()))?);
        let text = std::str::from_utf8(&raw)
            .map_err(|_| format!("{}: not UTF-8 text", p.display()))?
            .trim();
        if text.is_empty() {
            return Err(format!("{}: empty", p.display()));
        }
        return Ok(VerifyKey::Hmac(Zeroizing::new(text.as_bytes().to_vec())));
    }
    if let Some(p) = &args.ed25519_pub {
        let pem =
            std::fs::read_to_string(p).map_err(|e| format!("{}: {}", p.display(), e.kind()))?;
        return VerifyKey::from_public_pem(&pem).map_err(|e| format!("{}: {e}", p.display()));
    }
    Ok(VerifyKey::None)
}

/// Record kinds and their counts, in order of first appearance.
fn kinds(files: &[PathBuf]) -> Result<Vec<(String, u64)>, String> {
    let mut out: Vec<(String, u64)> = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| format!("{}: not JSON: {e}", f.display()))?;
            let kind = v["kind"].as_str().unwrap_or("?");
            match out.iter_mut().find(|(k, _)| k == kind) {
                Some((_, n)) => *n += 1,
                None => out.push((kind.to_owned(), 1)),
            }
        }
    }
    Ok(out)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let key = match key(&args) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("audit-verify: {e}");
            return ExitCode::from(2);
        }
    };
    let report = match verify(&args.files, &key) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("audit-verify: {e}");
            return ExitCode::from(2);
        }
    };
    let signed: u64 = report.chains.iter().map(|c| c.verified).sum();
    let terminated = report.chains.iter().filter(|c| c.terminated).count();
    println!(
        "files={} chains={} terminated={} records={} checkpoints={} signed={} broken={} warnings={}",
        args.files.len(),
        report.chains.len(),
        terminated,
        report.records,
        report.checkpoints,
        signed,
        u8::from(report.broken.is_some()),
        report.warnings.len(),
    );
    if report.broken.is_none() {
        match kinds(&args.files) {
            Ok(k) => {
                let k: Vec<String> = k.iter().map(|(k, n)| format!("{k}={n}")).collect();
                println!("kinds {}", k.join(" "));
            }
            Err(e) => {
                eprintln!("audit-verify: {e}");
                return ExitCode::from(2);
            }
        }
    }
    for w in &report.warnings {
        println!("warning: {w}");
    }
    match &report.broken {
        None => ExitCode::SUCCESS,
        Some(b) => {
            println!("broken: {b}");
            ExitCode::FAILURE
        }
    }
}
