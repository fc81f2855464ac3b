//! `p11shim`: the operator's command line for the p11shim PKCS#11 module.
//!
//! Every subcommand lives in its own file under [`commands`] and reuses the
//! module's own code (the cdylib is also an rlib) rather than a copy of it:
//! the configuration loader, the broker client, the broker's check, the key
//! ACL's decisions, the audit verifier. Exit codes: 0 success, 1 failure,
//! 2 usage (clap's); `acl explain`: 0 allowed, 1 denied, 2 usage, 3 no
//! decision could be made.

#![deny(unsafe_code)]

mod approval;
mod commands;
mod output;
mod plan;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use commands::{CliError, acl, approve, attest, audit, config, provision, slots};

#[derive(Parser, Debug)]
#[command(
    name = "p11shim",
    version,
    about = "Operate p11shim: check its configuration, show its slots, test attestation, provision HA members, explain key ACL decisions, verify the audit log, approve key use",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Each virtual slot and its members, read through the module's status
    /// query (C_GetInterface("p11shim"), P11shim_GetStatus).
    Slots(slots::Args),
    /// Collect this machine's evidence as the module does and, without
    /// --dry-run, exchange it with the broker (the PIN is never shown).
    Attest(attest::Args),
    /// Set up the members of HA slots from one plan: initialize tokens,
    /// put the replication key and the same keys on every member, verify.
    Provision(provision::Args),
    /// Quorum approval of key use: list and show requests, approve or
    /// reject them with your key (a PEM file or a PKCS#11 token).
    Approve(Box<approve::Args>),
    /// The per-role key ACL.
    Acl {
        #[command(subcommand)]
        command: AclCommand,
    },
    /// The tamper-evident audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand, Debug)]
enum AclCommand {
    /// Whether ROLE may do OP with KEY, and every rule's verdict, with the
    /// module's own decision. Exit 0 allowed, 1 denied, 2 usage, 3 no
    /// decision (configuration or token unreadable, key not found).
    Explain(acl::Args),
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Verify hash chains and checkpoint signatures; report the first
    /// broken link. Exit 0 intact, 1 broken (with --strict: any warning).
    Verify(audit::VerifyArgs),
    /// The last records, one line each; -f follows appends and rotation.
    Tail(audit::TailArgs),
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Validate the module's configuration (and the broker's) exactly as
    /// they load it, with warnings the module does not give.
    Check(config::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let style = output::Style::detect();
    let result = match cli.command {
        Command::Config {
            command: ConfigCommand::Check(a),
        } => config::run(&a, &style),
        Command::Slots(a) => slots::run(&a, &style),
        Command::Attest(a) => attest::run(&a, &style),
        Command::Provision(a) => provision::run(&a, &style),
        Command::Approve(a) => approve::run(&a, &style),
        Command::Acl {
            command: AclCommand::Explain(a),
        } => {
            return match acl::run(&a, &style) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => fail(&style, &e, ExitCode::from(3)),
            };
        }
        Command::Audit {
            command: AuditCommand::Verify(a),
        } => audit::verify(&a, &style).and_then(|ok| {
            if ok {
                Ok(())
            } else {
                // The report says why.
                Err(CliError::Silent)
            }
        }),
        Command::Audit {
            command: AuditCommand::Tail(a),
        } => audit::tail(&a, &style),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&style, &e, ExitCode::FAILURE),
    }
}

/// Prints the error (usage errors exit 2, as clap's own).
fn fail(style: &output::Style, e: &CliError, code: ExitCode) -> ExitCode {
    match e {
        CliError::Silent => code,
        CliError::Usage(_) => {
            eprintln!("{} {e}", style.error("error:"));
            ExitCode::from(2)
        }
        _ => {
            eprintln!("{} {e}", style.error("error:"));
            match e.exit_code() {
                2 => ExitCode::from(2),
                _ => code,
            }
        }
    }
}
