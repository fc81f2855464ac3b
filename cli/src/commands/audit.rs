//! `p11shim audit verify` and `p11shim audit tail`: the module's audit log
//! (`docs/audit.md`) checked with the audit crate's own verifier
//! (`p11shim_audit::verify`) and shown one line per record
//! (`p11shim_audit::render_human`).
//!
//! Keys: the Ed25519 public key (`openssl pkey -pubout` of the module's
//! `signing_key`) or the HMAC key the broker hands out (`audit_key`),
//! named as `file:` or `env:`; a key is never printed, only its id.

use std::fs::File;
use std::io::{self, Read as _, Seek as _, SeekFrom};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use p11shim_audit::{Report, VerifyKey, Zeroizing};
use serde_json::{Value, json};

use super::CliError;
use crate::output::{Style, print_json};

/// Where the HMAC key is read: the same secret the broker's role names
/// as `audit_key`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    File(PathBuf),
    Env(String),
}

fn parse_key_source(s: &str) -> Result<KeySource, String> {
    match s.split_once(':') {
        Some(("file", p)) if !p.is_empty() => Ok(KeySource::File(PathBuf::from(p))),
        Some(("env", n)) if !n.is_empty() => Ok(KeySource::Env(n.to_owned())),
        _ => Err("expected file:PATH or env:NAME (never the key itself)".into()),
    }
}

impl KeySource {
    /// The key's bytes: the secret's text, trimmed, as the broker reads
    /// it and the module receives it.
    fn read(&self) -> Result<Zeroizing<Vec<u8>>, CliError> {
        let (origin, raw) = match self {
            KeySource::File(p) => (
                format!("file:{}", p.display()),
                Zeroizing::new(std::fs::read(p).map_err(|e| {
                    CliError::Audit(format!("HMAC key file:{}: {}", p.display(), e.kind()))
                })?),
            ),
            KeySource::Env(n) => (
                format!("env:{n}"),
                Zeroizing::new(
                    std::env::var_os(n)
                        .map(std::os::unix::ffi::OsStringExt::into_vec)
                        .ok_or_else(|| CliError::Audit(format!("HMAC key env:{n} is not set")))?,
                ),
            ),
        };
        let text = std::str::from_utf8(&raw)
            .map_err(|_| CliError::Audit(format!("HMAC key {origin} is not UTF-8 text")))?;
        let t = text.trim();
        if t.is_empty() {
            return Err(CliError::Audit(format!("HMAC key {origin} is empty")));
        }
        Ok(Zeroizing::new(t.as_bytes().to_vec()))
    }
}

#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    /// Audit files, oldest first: `audit.log.3 audit.log.2 audit.log.1
    /// audit.log` (rotation numbers newest = 1).
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Each FILE is the live file of a rotated set: verify `FILE.N` ...
    /// `FILE.1` `FILE` (the numbered files that exist, from 1 up).
    #[arg(long)]
    pub rotated: bool,
    /// Ed25519 public key (PEM, `openssl pkey -pubout`) of the module's
    /// `signing_key`.
    #[arg(long, value_name = "PEM", conflicts_with = "hmac_key")]
    pub public_key: Option<PathBuf>,
    /// The HMAC key the broker hands out (its role's `audit_key`):
    /// `file:PATH` or `env:NAME`.
    #[arg(long, value_name = "file:PATH|env:NAME", value_parser = parse_key_source)]
    pub hmac_key: Option<KeySource>,
    /// Fail (exit 1) on any warning too: an unterminated chain (a file
    /// cut at a record boundary, or a process still running), a chain
    /// whose head is missing, unsigned checkpoints, no key given.
    #[arg(long)]
    pub strict: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct TailArgs {
    /// The audit file.
    pub file: PathBuf,
    /// How many of the last records to show.
    #[arg(short = 'n', long = "lines", default_value_t = 10, value_name = "N")]
    pub lines: usize,
    /// Keep showing records as they are appended, across rotation, until
    /// SIGINT or SIGTERM.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Print the records as they are (JSON lines).
    #[arg(long)]
    pub json: bool,
}

fn io_err(path: &Path, e: io::Error) -> CliError {
    CliError::Audit(format!("{}: {e}", path.display()))
}

// ---------------------------------------------------------------------------
// verify

/// `base.N` ... `base.1` `base`: the numbered files that exist, oldest
/// first.
pub fn rotated_set(base: &Path) -> Vec<PathBuf> {
    let numbered = |n: u32| {
        let mut s = base.as_os_str().to_owned();
        s.push(format!(".{n}"));
        PathBuf::from(s)
    };
    let mut out: Vec<PathBuf> = (1..=u32::MAX)
        .map(numbered)
        .take_while(|p| p.exists())
        .collect();
    out.reverse();
    out.push(base.to_path_buf());
    out
}

/// The rotation number of `path` (`audit.log.2` -> (`audit.log`, 2), the
/// live file 0).
fn rotation(path: &Path) -> (String, u64) {
    let s = path.to_string_lossy();
    match s.rsplit_once('.') {
        Some((base, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
            (base.to_owned(), n.parse().unwrap_or(0))
        }
        _ => (s.into_owned(), 0),
    }
}

/// Whether some rotated files of one base are given newest first.
fn misordered(files: &[PathBuf]) -> bool {
    let r: Vec<(String, u64)> = files.iter().map(|p| rotation(p)).collect();
    r.iter()
        .enumerate()
        .any(|(i, (base, n))| r[i + 1..].iter().any(|(b2, n2)| b2 == base && n2 > n))
}

pub fn verify(args: &VerifyArgs, style: &Style) -> Result<bool, CliError> {
    let files: Vec<PathBuf> = if args.rotated {
        args.files.iter().flat_map(|f| rotated_set(f)).collect()
    } else {
        args.files.clone()
    };
    let key = match (&args.public_key, &args.hmac_key) {
        (Some(p), _) => {
            let pem = std::fs::read_to_string(p).map_err(|e| io_err(p, e))?;
            VerifyKey::from_public_pem(&pem)
                .map_err(|e| CliError::Audit(format!("{}: {e}", p.display())))?
        }
        (None, Some(src)) => VerifyKey::Hmac(src.read()?),
        (None, None) => VerifyKey::None,
    };
    let report = p11shim_audit::verify(&files, &key).map_err(|e| CliError::Audit(e.to_string()))?;
    let mut warnings = report.warnings.clone();
    if key.alg().is_none() {
        warnings.push(
            "no key given (--public-key or --hmac-key): checkpoint signatures were not checked, only the hash chain"
                .into(),
        );
    }
    let hint = (report.broken.is_some() && misordered(&files)).then(|| {
        "rotated files are verified oldest first: audit.log.2 audit.log.1 audit.log (or --rotated audit.log)".to_owned()
    });
    let ok = report.ok() && (!args.strict || warnings.is_empty());
    if args.json {
        print_json(&report_json(
            &files,
            &key,
            &report,
            &warnings,
            hint.as_deref(),
            ok,
            args.strict,
        ));
    } else {
        print_report(
            style,
            &files,
            &key,
            &report,
            &warnings,
            hint.as_deref(),
            args.strict,
        );
    }
    Ok(ok)
}

fn report_json(
    files: &[PathBuf],
    key: &VerifyKey,
    r: &Report,
    warnings: &[String],
    hint: Option<&str>,
    ok: bool,
    strict: bool,
) -> Value {
    let chains: Vec<Value> = r
        .chains
        .iter()
        .map(|c| {
            json!({
                "chain": c.chain,
                "first_seq": c.first_seq,
                "last_seq": c.last_seq,
                "records": c.records,
                "checkpoints": c.checkpoints,
                "verified": c.verified,
                "terminated": c.terminated,
                "last_checkpoint": c.last_checkpoint,
            })
        })
        .collect();
    json!({
        "ok": ok,
        "strict": strict,
        "files": files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
        "key": key.alg().map(|alg| json!({ "alg": alg, "key_id": key.key_id() })),
        "records": r.records,
        "checkpoints": r.checkpoints,
        "chains": chains,
        "broken": r.broken.as_ref().map(|b| json!({
            "file": b.file.display().to_string(),
            "line": b.line,
            "chain": b.chain,
            "seq": b.seq,
            "reason": b.reason,
        })),
        "warnings": warnings,
        "hint": hint,
    })
}

fn print_report(
    style: &Style,
    files: &[PathBuf],
    key: &VerifyKey,
    r: &Report,
    warnings: &[String],
    hint: Option<&str>,
    strict: bool,
) {
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    println!(
        "{}: {} record(s), {} checkpoint(s), {} chain(s){}",
        names.join(" "),
        r.records,
        r.checkpoints,
        r.chains.len(),
        match (key.alg(), key.key_id()) {
            (Some(alg), Some(id)) => format!(", signatures checked with {alg} key {id}"),
            _ => String::new(),
        }
    );
    for c in &r.chains {
        let signed = if key.alg().is_none() {
            "signatures not checked".to_owned()
        } else if c.verified == c.checkpoints && c.checkpoints > 0 {
            format!("all {} signed and verified", c.verified)
        } else {
            format!("{} of them signed and verified", c.verified)
        };
        println!(
            "  chain {}  seq {}..{}  {} record(s)  {} checkpoint(s), {signed}  {}",
            c.chain,
            c.first_seq,
            c.last_seq,
            c.records,
            c.checkpoints,
            if c.terminated {
                style.ok("terminated")
            } else {
                style.warn("unterminated")
            }
        );
    }
    if let Some(b) = &r.broken {
        println!(
            "{} {}:{}: {}{}",
            style.error("BROKEN"),
            b.file.display(),
            b.line,
            match (&b.chain, b.seq) {
                (Some(c), Some(s)) => format!("chain {c} seq {s}: "),
                (Some(c), None) => format!("chain {c}: "),
                _ => String::new(),
            },
            b.reason
        );
        if let Some(h) = hint {
            println!("{} {h}", style.warn("hint:"));
        }
    }
    for w in warnings {
        println!("{} {w}", style.warn("warning:"));
    }
    match (&r.broken, strict && !warnings.is_empty()) {
        (Some(_), _) => println!("{}", style.error("verification FAILED")),
        (None, true) => println!(
            "{}",
            style.error("verification FAILED (--strict: warnings)")
        ),
        (None, false) => println!("{}", style.ok("ok")),
    }
}

// ---------------------------------------------------------------------------
// tail

/// Set by SIGINT or SIGTERM while following.
static STOP: AtomicBool = AtomicBool::new(false);

/// SIGINT and SIGTERM end `tail -f` cleanly (at its next poll) instead of
/// killing it mid-line.
#[allow(unsafe_code)]
fn stop_on_signals() -> Result<(), CliError> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the action only stores to an atomic, which is
        // async-signal-safe; it captures nothing.
        unsafe { signal_hook_registry::register(sig, || STOP.store(true, Ordering::SeqCst)) }
            .map_err(|e| CliError::Audit(format!("cannot handle signal {sig}: {e}")))?;
    }
    Ok(())
}

/// How long `tail -f` sleeps between two looks at the file.
const POLL: Duration = Duration::from_millis(200);
/// Bytes read from the end at a time when looking for the last lines.
const CHUNK: u64 = 64 * 1024;

/// The last `n` complete lines of `f` and the offset just past them (an
/// incomplete last line, a write in progress, is left for later).
fn last_lines(f: &mut File, n: usize) -> io::Result<(Vec<Vec<u8>>, u64)> {
    let len = f.metadata()?.len();
    let mut buf: Vec<u8> = Vec::new();
    let mut start = len;
    // Read backwards until the buffer holds n complete lines before the
    // tail, or the whole file.
    loop {
        let newlines = buf.iter().filter(|&&b| b == b'\n').count();
        if start == 0 || newlines > n {
            break;
        }
        let step = CHUNK.min(start);
        start -= step;
        f.seek(SeekFrom::Start(start))?;
        let mut chunk = vec![0u8; step as usize];
        f.read_exact(&mut chunk)?;
        chunk.extend_from_slice(&buf);
        buf = chunk;
    }
    let end = match buf.iter().rposition(|&b| b == b'\n') {
        Some(p) => p + 1,
        None => 0,
    };
    let complete = &buf[..end];
    let mut lines: Vec<Vec<u8>> = complete
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    // The first piece may be the end of a line begun before `start`.
    if start > 0 && !lines.is_empty() && lines.len() > n {
        lines.remove(0);
    }
    let skip = lines.len().saturating_sub(n);
    Ok((lines.split_off(skip), start + end as u64))
}

/// Writes one record; `false` when stdout is gone (a closed pipe).
fn emit(out: &mut impl io::Write, line: &[u8], json: bool) -> bool {
    let text = String::from_utf8_lossy(line);
    let r = if json {
        writeln!(out, "{text}")
    } else {
        writeln!(out, "{}", p11shim_audit::render_human(&text))
    };
    r.and_then(|()| out.flush()).is_ok()
}

pub fn tail(args: &TailArgs, _style: &Style) -> Result<(), CliError> {
    let path = &args.file;
    let mut f = File::open(path).map_err(|e| io_err(path, e))?;
    let (lines, mut pos) = last_lines(&mut f, args.lines).map_err(|e| io_err(path, e))?;
    let stdout = io::stdout();
    let mut out = stdout.lock();
    for l in &lines {
        if !emit(&mut out, l, args.json) {
            return Ok(());
        }
    }
    if !args.follow {
        return Ok(());
    }
    stop_on_signals()?;
    let meta = f.metadata().map_err(|e| io_err(path, e))?;
    let mut id = (meta.dev(), meta.ino());
    let mut pending: Vec<u8> = Vec::new();
    while !STOP.load(Ordering::SeqCst) {
        // What was appended to the file we hold.
        f.seek(SeekFrom::Start(pos)).map_err(|e| io_err(path, e))?;
        let mut fresh = Vec::new();
        let read = f.read_to_end(&mut fresh).map_err(|e| io_err(path, e))?;
        pos += read as u64;
        pending.extend_from_slice(&fresh);
        while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            let line = &line[..line.len() - 1];
            if !line.is_empty() && !emit(&mut out, line, args.json) {
                return Ok(());
            }
        }
        // Rotated (renamed away, a new file in its place) or truncated:
        // the old file has been read to its end above; start over on the
        // file now at the path.
        match std::fs::metadata(path) {
            Ok(m) if (m.dev(), m.ino()) != id => {
                if let Ok(nf) = File::open(path) {
                    f = nf;
                    id = (m.dev(), m.ino());
                    pos = 0;
                    pending.clear();
                    continue;
                }
            }
            Ok(m) if m.len() < pos => {
                pos = 0;
                pending.clear();
            }
            Ok(_) => {}
            // Renamed away, the new file not created yet: keep waiting.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(path, e)),
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(content: &[u8]) -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.log");
        std::fs::write(&p, content).unwrap();
        let f = File::open(&p).unwrap();
        (dir, f)
    }

    #[test]
    fn the_last_complete_lines() {
        let (_d, mut f) = file_with(b"a\nbb\nccc\ndd");
        let (l, pos) = last_lines(&mut f, 2).unwrap();
        assert_eq!(l, vec![b"bb".to_vec(), b"ccc".to_vec()]);
        assert_eq!(pos, 9, "the incomplete last line is left for later");
        let (l, _) = last_lines(&mut f, 10).unwrap();
        assert_eq!(l.len(), 3);
        let (l, pos) = last_lines(&mut f, 0).unwrap();
        assert!(l.is_empty());
        assert_eq!(pos, 9);
    }

    #[test]
    fn lines_longer_than_a_chunk() {
        let long = vec![b'x'; (CHUNK as usize) + 100];
        let mut content = Vec::new();
        for i in 0..5u8 {
            content.extend_from_slice(&long);
            content.push(b'0' + i);
            content.push(b'\n');
        }
        let (_d, mut f) = file_with(&content);
        let (l, pos) = last_lines(&mut f, 2).unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].last(), Some(&b'3'));
        assert_eq!(l[1].last(), Some(&b'4'));
        assert_eq!(l[0].len(), long.len() + 1);
        assert_eq!(pos, content.len() as u64);
    }

    #[test]
    fn rotated_sets_and_their_order() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("audit.log");
        for p in ["audit.log", "audit.log.1", "audit.log.2", "audit.log.4"] {
            std::fs::write(dir.path().join(p), b"").unwrap();
        }
        let set = rotated_set(&base);
        let names: Vec<_> = set
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["audit.log.2", "audit.log.1", "audit.log"]);
        assert!(!misordered(&set));
        let mut wrong = set.clone();
        wrong.reverse();
        assert!(misordered(&wrong));
    }

    #[test]
    fn key_sources() {
        assert_eq!(parse_key_source("env:K"), Ok(KeySource::Env("K".into())));
        assert_eq!(
            parse_key_source("file:/k"),
            Ok(KeySource::File("/k".into()))
        );
        assert!(parse_key_source("0123456789abcdef").is_err());
        assert!(parse_key_source("env:").is_err());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, "  s3cret-hmac\n").unwrap();
        let k = KeySource::File(p).read().unwrap();
        assert_eq!(&k[..], b"s3cret-hmac");
    }
}
