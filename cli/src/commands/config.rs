//! `p11shim config check [FILE] [--broker FILE]`: the module's own loader
//! (`p11shim::config::load`) and the broker's (`Config::load` and
//! `run::check`, what `p11shim-broker check` runs), so the errors are the
//! ones they give; then warnings about what loads but is risky.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use p11shim::config::{Config, PinSource};

use super::CliError;
use crate::output::Style;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The module's configuration (default: what the module reads:
    /// $P11SHIM_CONFIG, else /etc/p11shim/p11shim.toml).
    pub file: Option<PathBuf>,
    /// Also check the broker's configuration: syntax, store reachable,
    /// every role's secret readable.
    #[arg(long, value_name = "FILE")]
    pub broker: Option<PathBuf>,
}

/// Something that loads but deserves an operator's look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning(pub String);

pub fn run(args: &Args, style: &Style) -> Result<(), CliError> {
    let path = args
        .file
        .clone()
        .unwrap_or_else(|| p11shim::config::locate(None));
    let cfg = p11shim::config::load(&path)?;
    let members: usize = cfg.slots.iter().map(|s| s.members.len()).sum();
    let mut warnings = module_warnings(&cfg);
    println!(
        "{} {}: valid, {} slot(s), {} member(s)",
        style.ok("ok"),
        path.display(),
        cfg.slots.len(),
        members
    );
    if let Some(bpath) = &args.broker {
        let roles = check_broker(bpath)?;
        warnings.extend(broker_warnings(bpath));
        println!(
            "{} {}: valid, {roles} role(s), store reachable, every secret readable",
            style.ok("ok"),
            bpath.display()
        );
    }
    for w in &warnings {
        println!("{} {}", style.warn("warning:"), w.0);
    }
    Ok(())
}

fn check_broker(path: &Path) -> Result<usize, CliError> {
    let fail = |message: String| CliError::BrokerConfig {
        file: path.display().to_string(),
        message,
    };
    let cfg = p11shim_broker::config::Config::load(path).map_err(|e| fail(e.to_string()))?;
    p11shim_broker::run::check(&cfg).map_err(fail)?;
    Ok(cfg.roles.len())
}

/// Group or other permission bits of a file, when it exists.
fn mode(path: &Path) -> Option<u32> {
    std::fs::metadata(path).ok().map(|m| m.mode() & 0o777)
}

/// A secret file's warnings: missing, or readable by group or others.
fn secret_file(what: &str, path: &Path, out: &mut Vec<Warning>) {
    match std::fs::metadata(path) {
        Err(e) => out.push(Warning(format!(
            "{what} {} {} (the module will fail at login)",
            path.display(),
            io_reason(&e)
        ))),
        Ok(m) if m.permissions().mode() & 0o077 != 0 => out.push(Warning(format!(
            "{what} {} is readable by group or others (mode {:04o}); chmod 600",
            path.display(),
            m.permissions().mode() & 0o7777
        ))),
        Ok(_) => {}
    }
}

fn io_reason(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::NotFound => "does not exist",
        std::io::ErrorKind::PermissionDenied => "cannot be read (permission denied)",
        _ => "cannot be read",
    }
}

/// What the module accepts but an operator should know.
pub fn module_warnings(cfg: &Config) -> Vec<Warning> {
    let mut out = Vec::new();
    // The module runs inside every application, as their users, so the
    // file must be readable by them; but whoever can write it chooses the
    // code those applications load.
    if let Some(m) = mode(&cfg.source).filter(|m| m & 0o022 != 0) {
        out.push(Warning(format!(
            "{} is writable by group or others (mode {m:04o}): they choose the libraries every application loads; chmod go-w",
            cfg.source.display()
        )));
    }
    for s in &cfg.slots {
        if s.members.len() == 1 {
            out.push(Warning(format!(
                "slot {} ({:?}) has one member: not replicated, no failover",
                s.id, s.label
            )));
        }
        if s.members.len() > 1 && s.replication_key.is_none() && !s.allow_unreplicated {
            out.push(Warning(format!(
                "slot {} ({:?}) has no replication_key: token keys generated through it are refused",
                s.id, s.label
            )));
        }
        for (i, m) in s.members.iter().enumerate() {
            let lib = &m.library;
            match std::fs::metadata(lib) {
                Err(e) => out.push(Warning(format!(
                    "slot {} member {i}: library {} {}",
                    s.id,
                    lib.display(),
                    io_reason(&e)
                ))),
                Ok(md) if !md.is_file() => out.push(Warning(format!(
                    "slot {} member {i}: library {} is not a regular file",
                    s.id,
                    lib.display()
                ))),
                Ok(md) if md.mode() & 0o022 != 0 => out.push(Warning(format!(
                    "slot {} member {i}: library {} is writable by group or others (mode {:04o})",
                    s.id,
                    lib.display(),
                    md.mode() & 0o7777
                ))),
                Ok(_) => {}
            }
        }
        if let Some(PinSource::File(p)) = &s.pin {
            secret_file(&format!("slot {} PIN file", s.id), p, &mut out);
        }
    }
    if let Some(b) = &cfg.broker {
        if let Some(n) = &b.nonce_file {
            // Made by the module on first use; only its mode matters.
            if let Some(m) = mode(n).filter(|m| m & 0o077 != 0) {
                out.push(Warning(format!(
                    "broker nonce_file {} is readable by group or others (mode {m:04o}): the module refuses it; chmod 600",
                    n.display()
                )));
            }
        }
        if let Some(t) = &b.token_file
            && let Err(e) = std::fs::metadata(t)
        {
            out.push(Warning(format!(
                "broker token_file {} {}",
                t.display(),
                io_reason(&e)
            )));
        }
        if let Some(ca) = &b.ca
            && let Err(e) = std::fs::metadata(ca)
        {
            out.push(Warning(format!(
                "broker ca {} {}",
                ca.display(),
                io_reason(&e)
            )));
        }
        if !cfg
            .slots
            .iter()
            .any(|s| matches!(s.pin, Some(PinSource::Broker)))
        {
            out.push(Warning(
                "[broker] is configured but no slot has pin = \"broker\"".into(),
            ));
        }
    }
    out
}

/// The broker's own configuration holds no secret (they are `file:`,
/// `env:` or `cmd:` sources, and the broker refuses a secret file that is
/// not 0600), but it decides who gets which PIN: nobody but root should
/// be able to change it.
fn broker_warnings(path: &Path) -> Vec<Warning> {
    let mut out = Vec::new();
    if let Some(m) = mode(path).filter(|m| m & 0o022 != 0) {
        out.push(Warning(format!(
            "{} is writable by group or others (mode {m:04o}): they decide who gets which PIN; chmod go-w",
            path.display()
        )));
    }
    out
}
