//! Where the broker's secrets come from: a file (refused unless its mode is
//! 0600 or stricter), an environment variable, or a command's output.
//! Values are held in zeroizing memory and never printed.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use zeroize::Zeroizing;

/// A secret's source, parsed from `file:/abs/path`, `env:NAME` or
/// `cmd:/abs/program arg…`.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretSource {
    File(PathBuf),
    Env(String),
    Command(Vec<String>),
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::File(p) => write!(f, "file:{}", p.display()),
            SecretSource::Env(n) => write!(f, "env:{n}"),
            SecretSource::Command(a) => {
                write!(f, "cmd:{}", a.first().map(String::as_str).unwrap_or(""))
            }
        }
    }
}

impl fmt::Display for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("{0}")]
    Syntax(String),
    #[error("{origin}: {message}")]
    Read { origin: String, message: String },
}

impl SecretSource {
    /// Parses a source. A bare value is refused: secrets never live in the
    /// configuration file itself.
    pub fn parse(s: &str) -> Result<SecretSource, SecretError> {
        if let Some(p) = s.strip_prefix("file:") {
            let p = PathBuf::from(p);
            if !p.is_absolute() {
                return Err(SecretError::Syntax("file: needs an absolute path".into()));
            }
            Ok(SecretSource::File(p))
        } else if let Some(n) = s.strip_prefix("env:") {
            let ok = !n.is_empty()
                && !n.starts_with(|c: char| c.is_ascii_digit())
                && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                return Err(SecretError::Syntax(format!(
                    "'{n}' is not an environment variable name"
                )));
            }
            Ok(SecretSource::Env(n.to_owned()))
        } else if let Some(c) = s.strip_prefix("cmd:") {
            let args: Vec<String> = c.split_whitespace().map(str::to_owned).collect();
            match args.first() {
                Some(p) if p.starts_with('/') => Ok(SecretSource::Command(args)),
                _ => Err(SecretError::Syntax(
                    "cmd: needs an absolute program path".into(),
                )),
            }
        } else {
            Err(SecretError::Syntax(
                "a secret is given as file:/path, env:NAME or cmd:/program; never inline".into(),
            ))
        }
    }

    /// Reads the secret; surrounding whitespace (a trailing newline) is
    /// removed from file and command values.
    pub fn read(&self) -> Result<Zeroizing<String>, SecretError> {
        let err = |m: String| SecretError::Read {
            origin: self.to_string(),
            message: m,
        };
        match self {
            SecretSource::File(p) => {
                let meta = std::fs::metadata(p).map_err(|e| err(e.kind().to_string()))?;
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(err(format!(
                        "mode {mode:04o} lets others read it; chmod 600"
                    )));
                }
                let raw = Zeroizing::new(std::fs::read(p).map_err(|e| err(e.kind().to_string()))?);
                trimmed_utf8(&raw).map_err(err)
            }
            SecretSource::Env(n) => match std::env::var(n) {
                Ok(v) if !v.is_empty() => Ok(Zeroizing::new(v)),
                _ => Err(err("not set".into())),
            },
            SecretSource::Command(args) => {
                let out = Command::new(&args[0])
                    .args(&args[1..])
                    .stdin(Stdio::null())
                    .stderr(Stdio::null())
                    .output()
                    .map_err(|e| err(e.kind().to_string()))?;
                let stdout = Zeroizing::new(out.stdout);
                if !out.status.success() {
                    return Err(err(format!("exited with {}", out.status)));
                }
                trimmed_utf8(&stdout).map_err(err)
            }
        }
    }
}

fn trimmed_utf8(b: &[u8]) -> Result<Zeroizing<String>, String> {
    let s = std::str::from_utf8(b).map_err(|_| "not UTF-8".to_string())?;
    let t = s.trim();
    if t.is_empty() {
        return Err("empty".into());
    }
    Ok(Zeroizing::new(t.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_forms() {
        assert_eq!(
            SecretSource::parse("env:PIN_A").unwrap(),
            SecretSource::Env("PIN_A".into())
        );
        assert!(SecretSource::parse("1234").is_err());
        assert!(SecretSource::parse("file:rel").is_err());
        assert!(SecretSource::parse("env:1X").is_err());
        assert!(SecretSource::parse("cmd:echo hi").is_err());
    }

    #[test]
    fn file_mode_is_checked_and_value_never_in_errors() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pin");
        std::fs::write(&p, "s3cret-pin\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let src = SecretSource::File(p.clone());
        let e = src.read().unwrap_err().to_string();
        assert!(e.contains("chmod 600") && !e.contains("s3cret"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(&*src.read().unwrap(), "s3cret-pin");
    }

    #[test]
    fn command_output() {
        let src = SecretSource::parse("cmd:/bin/echo  pin-from-cmd").unwrap();
        assert_eq!(&*src.read().unwrap(), "pin-from-cmd");
        let bad = SecretSource::parse("cmd:/bin/false").unwrap();
        assert!(bad.read().is_err());
    }
}
