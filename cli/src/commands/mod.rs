//! One module per subcommand. Each exposes `Args` (its clap arguments) and
//! `run(&Args, &Style) -> Result<(), CliError>`.

pub mod acl;
pub mod approve;
pub mod attest;
pub mod audit;
pub mod config;
pub mod provision;
// Loads the module with dlopen and calls it: the crate's only unsafe code.
#[allow(unsafe_code)]
pub mod slots;

/// Why a command failed (exit code 1). Messages name files, keys, slots and
/// members; never a PIN or key material.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The module's configuration is invalid (file, line and key).
    #[error("{0}")]
    Config(#[from] p11shim::config::ConfigError),
    /// The broker's configuration or its check failed.
    #[error("broker configuration {file}: {message}")]
    BrokerConfig { file: String, message: String },
    /// Loading or calling the p11shim module.
    #[error("{0}")]
    Module(String),
    /// Evidence or the broker exchange.
    #[error("{0}")]
    Attest(String),
    /// The provisioning plan is invalid.
    #[error("{0}")]
    Plan(String),
    /// A member token refused or failed.
    #[error("{0}")]
    Token(String),
    /// The members do not hold the same objects.
    #[error("{0}")]
    Mismatch(String),
    /// Arguments that parse but do not fit (exit 2, as clap's own).
    #[error("{0}")]
    Usage(String),
    /// Reading or verifying an audit log.
    #[error("{0}")]
    Audit(String),
    /// The command's own output already said why (exit 1).
    #[error("failed")]
    Silent,
    /// An approval command (`p11shim approve`).
    #[error("{0}")]
    Approve(#[from] crate::approval::ApproveError),
}

impl CliError {
    /// Exit code 2 for a usage error found after parsing (an option's
    /// value that clap cannot judge), 1 for every failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) | CliError::Approve(crate::approval::ApproveError::Usage(_)) => 2,
            _ => 1,
        }
    }
}
