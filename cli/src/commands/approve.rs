//! `p11shim approve list|show|sign|reject|submit|sign-file`: the
//! approver's side of quorum (m-of-n) approval of key use.
//!
//! Every request fetched from the broker is checked before it is shown or
//! signed ([`crate::approval::check`]): its `approval_data`, the bytes an
//! approver signs, must be the canonical text of the fields shown, and its
//! `digest` their SHA-256; otherwise the command refuses (exit 1). An
//! approval signs `approval_data`, a rejection `REJECTION_PREFIX` +
//! `approval_data`, with an RSA or Ed25519 key from a PEM file or a PKCS#11
//! token; or with any other tool, whose signature `submit` posts.
//!
//! The broker is `--broker`, else `$P11SHIM_BROKER_URL`, else the module
//! configuration's `[broker] url` (with its `ca`).

use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use p11shim_proto::approval::{Approval, ApprovalStatus, Decision, REJECTION_PREFIX};
use serde_json::{Value, json};

use super::CliError;
use crate::approval::client::{BrokerClient, Verdict};
use crate::approval::sign::{KeyRef, Signed, TokenOptions};
use crate::approval::{ApproveError, check, human_duration, seconds_until, uri};
use crate::output::{Style, print_json};

/// Time allowed for one call to the broker.
const BROKER_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: Sub,
}

#[derive(clap::Subcommand, Debug)]
pub enum Sub {
    /// Approval requests at the broker, as a table.
    List(ListArgs),
    /// One request: everything needed to decide, checked against the
    /// bytes it asks approvers to sign.
    Show(ShowArgs),
    /// Approve a request: check it, show it, sign its approval_data with
    /// your key, send the signature.
    Sign(DecideArgs),
    /// Reject a request: as sign, over the rejection prefix + approval_data.
    Reject(DecideArgs),
    /// Send a signature made with another tool (openssl, pkcs11-tool).
    Submit(SubmitArgs),
    /// Sign a file written by `show --data-out`, without a broker (for an
    /// approver key on an offline machine).
    SignFile(SignFileArgs),
}

#[derive(clap::Args, Debug)]
pub struct BrokerArgs {
    /// The broker's base URL (default: $P11SHIM_BROKER_URL, else the
    /// module configuration's [broker] url).
    #[arg(long, value_name = "URL")]
    pub broker: Option<String>,
    /// PEM file of the CA(s) the broker's certificate chains to (default:
    /// the configuration's [broker] ca when the URL comes from there, else
    /// the system's roots).
    #[arg(long, value_name = "PEM")]
    pub ca: Option<PathBuf>,
}

// `--key` and `--pin-source` are parsed after clap, not by a value
// parser: clap echoes a value it refuses, and these may hold a PIN typed
// by mistake (`pin-value=` in a URI, a PIN given as its own source).
#[derive(clap::Args, Debug)]
pub struct KeyArgs {
    /// The approver's private key: a PEM file (RSA or Ed25519) or an RFC
    /// 7512 URI (pkcs11:token=...;object=...;type=private).
    #[arg(long, value_name = "FILE|pkcs11:URI")]
    pub key: String,
    /// The PKCS#11 module of a pkcs11: key (default: the URI's
    /// module-path, else $P11SHIM_APPROVER_MODULE).
    #[arg(long, value_name = "LIB")]
    pub module: Option<PathBuf>,
    /// Where the token's PIN (or an encrypted PEM's passphrase) is read.
    #[arg(long, value_name = "env:NAME|file:/path")]
    pub pin_source: Option<String>,
}

impl KeyArgs {
    /// The key and how to reach it; a malformed value is a usage error
    /// whose message does not repeat it.
    fn resolve(&self) -> Result<(KeyRef, TokenOptions), ApproveError> {
        let key =
            KeyRef::parse(&self.key).map_err(|e| ApproveError::Usage(format!("--key: {e}")))?;
        let pin = self
            .pin_source
            .as_deref()
            .map(uri::pin_source)
            .transpose()
            .map_err(|e| ApproveError::Usage(format!("--pin-source: {e}")))?;
        let opts = TokenOptions {
            module: self.module.clone(),
            pin,
        };
        if let KeyRef::Pkcs11(u) = &key {
            crate::approval::sign::module_for(u, &opts)?;
        }
        Ok((key, opts))
    }
}

/// Which requests `list` shows.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusFilter {
    Pending,
    Approved,
    Rejected,
    Expired,
    Consumed,
    All,
}

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// Only requests in this state.
    #[arg(long, value_enum, default_value = "pending")]
    pub status: StatusFilter,
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct ShowArgs {
    /// The request's id (apr_...).
    #[arg(value_parser = approval_id)]
    pub id: String,
    /// Write the exact bytes to sign to FILE (for openssl, pkcs11-tool or
    /// `approve sign-file`).
    #[arg(long, value_name = "FILE")]
    pub data_out: Option<PathBuf>,
    /// With --data-out: write the bytes of a rejection instead.
    #[arg(long, requires = "data_out")]
    pub reject: bool,
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct DecideArgs {
    /// The request's id (apr_...).
    #[arg(value_parser = approval_id)]
    pub id: String,
    /// Your name, as the broker's [approvers.<name>] registers it.
    #[arg(long, value_name = "NAME", value_parser = approver_name)]
    pub approver: String,
    #[command(flatten)]
    pub key: KeyArgs,
    /// Do not ask for confirmation (it is asked only on a terminal).
    #[arg(long, short = 'y')]
    pub yes: bool,
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct SubmitArgs {
    /// The request's id (apr_...).
    #[arg(value_parser = approval_id)]
    pub id: String,
    /// Your name, as the broker's [approvers.<name>] registers it.
    #[arg(long, value_name = "NAME", value_parser = approver_name)]
    pub approver: String,
    /// The signature: raw bytes or base64.
    #[arg(long, value_name = "FILE")]
    pub signature: PathBuf,
    /// The signature rejects the request (it is over the rejection
    /// prefix + approval_data).
    #[arg(long)]
    pub reject: bool,
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct SignFileArgs {
    /// A file written by `approve show ID --data-out FILE [--reject]`.
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    #[command(flatten)]
    pub key: KeyArgs,
    /// Where the signature is written (raw bytes, or base64 with --base64).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Write the signature as base64 text.
    #[arg(long)]
    pub base64: bool,
    /// Do not ask for confirmation (it is asked only on a terminal).
    #[arg(long, short = 'y')]
    pub yes: bool,
}

/// Approval ids as the broker makes them (`apr_` + hex); anything safe in
/// a URL path is accepted.
fn approval_id(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(s.to_owned())
    } else {
        Err("an approval id is made of [A-Za-z0-9_-] (apr_...)".into())
    }
}

/// Approver names as quorum rules allow them.
fn approver_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._@-".contains(&b));
    if ok {
        Ok(s.to_owned())
    } else {
        Err("approver names use [A-Za-z0-9._@-], at most 64".into())
    }
}

pub fn run(args: &Args, style: &Style) -> Result<(), CliError> {
    match &args.command {
        Sub::List(a) => list(a, style),
        Sub::Show(a) => show(a, style),
        Sub::Sign(a) => decide(a, Verdict::Approve, style),
        Sub::Reject(a) => decide(a, Verdict::Reject, style),
        Sub::Submit(a) => submit(a, style),
        Sub::SignFile(a) => sign_file(a, style),
    }
    .map_err(CliError::Approve)
}

/// The broker: `--broker`, `$P11SHIM_BROKER_URL`, or the module's
/// configuration.
fn client(b: &BrokerArgs) -> Result<BrokerClient, ApproveError> {
    let from_env = std::env::var("P11SHIM_BROKER_URL")
        .ok()
        .filter(|u| !u.is_empty());
    let (url, ca) = match (&b.broker, from_env) {
        (Some(u), _) => (u.clone(), b.ca.clone()),
        (None, Some(u)) => (u, b.ca.clone()),
        (None, None) => {
            let path = p11shim::config::locate(None);
            if !path.exists() {
                return Err(ApproveError::Usage(format!(
                    "no broker: give --broker URL, set P11SHIM_BROKER_URL, or configure [broker] in {}",
                    path.display()
                )));
            }
            let cfg = p11shim::config::load(&path)
                .map_err(|e| ApproveError::Usage(format!("the broker's URL: {e}")))?;
            let broker = cfg.broker.ok_or_else(|| {
                ApproveError::Usage(format!(
                    "no broker: {} has no [broker] section; give --broker URL or set P11SHIM_BROKER_URL",
                    path.display()
                ))
            })?;
            (broker.url, b.ca.clone().or(broker.ca))
        }
    };
    BrokerClient::new(&url, ca.as_deref(), BROKER_TIMEOUT)
}

fn mechanism(m: Option<u64>) -> String {
    match m {
        Some(m) => match p11shim_proto::names::mechanism_name(m) {
            Some(n) => n.to_string(),
            None => format!("{m:#x}"),
        },
        None => "-".into(),
    }
}

fn expires_in(a: &Approval) -> String {
    match seconds_until(&a.expires_at) {
        Some(s) => human_duration(s),
        None => "-".into(),
    }
}

fn key_name(a: &Approval) -> String {
    match (&a.key.label, &a.key.id) {
        (Some(l), _) => l.clone(),
        (None, Some(id)) => format!("id {id}"),
        (None, None) => format!(
            "fp {}",
            &a.key.fingerprint[..16.min(a.key.fingerprint.len())]
        ),
    }
}

fn list(args: &ListArgs, style: &Style) -> Result<(), ApproveError> {
    let status = match args.status {
        StatusFilter::Pending => Some(ApprovalStatus::Pending),
        StatusFilter::Approved => Some(ApprovalStatus::Approved),
        StatusFilter::Rejected => Some(ApprovalStatus::Rejected),
        StatusFilter::Expired => Some(ApprovalStatus::Expired),
        StatusFilter::Consumed => Some(ApprovalStatus::Consumed),
        StatusFilter::All => None,
    };
    let c = client(&args.broker)?;
    let approvals = c.list(status)?;
    // Every row is checked as `show` checks it; a bad one is flagged and
    // makes the command fail after the listing.
    let checks: Vec<Result<Vec<u8>, ApproveError>> = approvals
        .iter()
        .map(|a| check::verified(&a.id, a))
        .collect();
    let bad = checks.iter().filter(|c| c.is_err()).count();
    if args.json {
        let rows: Vec<Value> = approvals
            .iter()
            .zip(&checks)
            .map(|(a, c)| {
                let mut v = serde_json::to_value(a).unwrap_or(Value::Null);
                v["verified"] = Value::Bool(c.is_ok());
                v["expires_in_seconds"] = json!(seconds_until(&a.expires_at));
                v
            })
            .collect();
        print_json(&json!({ "broker": c.url(), "approvals": rows }));
    } else if approvals.is_empty() {
        println!(
            "{}",
            style.dim(&format!(
                "no {}approval requests at {}",
                status
                    .map(|s| format!("{} ", s.as_str()))
                    .unwrap_or_default(),
                c.url()
            ))
        );
    } else {
        let mut rows = vec![
            [
                "ID",
                "ROLE",
                "REQUESTER",
                "KEY",
                "OP",
                "MECHANISM",
                "APPROVALS",
                "STATUS",
                "EXPIRES IN",
            ]
            .map(String::from),
        ];
        for (a, c) in approvals.iter().zip(&checks) {
            rows.push([
                a.id.clone(),
                a.role.clone(),
                a.subject.clone(),
                key_name(a),
                a.op.clone(),
                mechanism(a.mechanism),
                format!("{}/{}", a.approvals.len(), a.m),
                if c.is_ok() {
                    a.status.as_str().to_owned()
                } else {
                    "INVALID".to_owned()
                },
                if a.status == ApprovalStatus::Pending || a.status == ApprovalStatus::Approved {
                    expires_in(a)
                } else {
                    "-".into()
                },
            ]);
        }
        let widths: Vec<usize> = (0..9)
            .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
            .collect();
        for (n, r) in rows.iter().enumerate() {
            let line = r
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect::<Vec<_>>()
                .join("  ");
            let line = line.trim_end();
            if n == 0 {
                println!("{}", style.bold(line));
            } else if r[7] == "INVALID" {
                println!("{}", style.error(line));
            } else {
                println!("{line}");
            }
        }
    }
    for (a, c) in approvals.iter().zip(checks) {
        if let Err(e) = c {
            eprintln!("{} {}: {e}", style.error("invalid:"), a.id);
        }
    }
    if bad > 0 {
        return Err(ApproveError::Mismatch {
            id: format!("{bad} of the requests"),
            what: "their approval_data does not match what they show".into(),
        });
    }
    Ok(())
}

/// The request, fetched and checked; its approval_data.
fn fetch(c: &BrokerClient, id: &str) -> Result<(Approval, Vec<u8>), ApproveError> {
    let a = c.get(id)?;
    let data = check::verified(id, &a)?;
    Ok((a, data))
}

fn summary_json(a: &Approval, data: &[u8]) -> Value {
    let mut v = serde_json::to_value(a).unwrap_or(Value::Null);
    v["verified"] = Value::Bool(true);
    v["approval_data_text"] = Value::String(String::from_utf8_lossy(data).into_owned());
    v["expires_in_seconds"] = json!(seconds_until(&a.expires_at));
    v
}

fn print_summary(a: &Approval, data: &[u8], style: &Style) {
    let status = match a.status {
        ApprovalStatus::Pending => style.warn("pending"),
        ApprovalStatus::Approved => style.ok("approved"),
        s => style.error(s.as_str()),
    };
    println!("{} {}  {status}", style.bold("approval"), a.id);
    let signoffs = |v: &[p11shim_proto::approval::Signoff]| {
        if v.is_empty() {
            "none".to_owned()
        } else {
            v.iter()
                .map(|s| format!("{} ({})", s.approver, s.at))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let rows = [
        ("requester", format!("{} (role {})", a.subject, a.role)),
        (
            "key",
            format!(
                "label {}, id {}, fingerprint {}",
                a.key.label.as_deref().unwrap_or("-"),
                a.key.id.as_deref().unwrap_or("-"),
                a.key.fingerprint
            ),
        ),
        (
            "operation",
            match a.mechanism {
                Some(m) => format!("{} with {} ({m:#x})", a.op, mechanism(Some(m))),
                None => a.op.clone(),
            },
        ),
        (
            "data",
            match &a.data_sha256 {
                Some(h) => format!("sha256 {h} (this approval covers exactly that input)"),
                None => "- (no single-part input)".into(),
            },
        ),
        (
            "approvals",
            format!(
                "{} of {} needed: {}",
                a.approvals.len(),
                a.m,
                signoffs(&a.approvals)
            ),
        ),
        ("rejections", signoffs(&a.rejections)),
        ("approvers", a.approvers.join(", ")),
        ("created", a.created_at.clone()),
        (
            "expires",
            format!("{} (in {})", a.expires_at, expires_in(a)),
        ),
        ("digest", format!("{} (SHA-256 of approval_data)", a.digest)),
    ];
    for (k, v) in rows {
        println!("  {:<12}{v}", format!("{k}:"));
    }
    if let Some(t) = &a.consumed_at {
        println!("  {:<12}{t}", "consumed:");
    }
    println!(
        "  {}",
        style.ok("approval_data checked: it is exactly the request shown above")
    );
    println!(
        "{}",
        style.dim("  --- approval_data (what approvers sign) ---")
    );
    for line in String::from_utf8_lossy(data).lines() {
        println!("{}", style.dim(&format!("  {line}")));
    }
}

fn to_sign(data: &[u8], verdict: Verdict) -> Vec<u8> {
    match verdict {
        Verdict::Approve => data.to_vec(),
        Verdict::Reject => {
            let mut v = REJECTION_PREFIX.as_bytes().to_vec();
            v.extend_from_slice(data);
            v
        }
    }
}

fn show(args: &ShowArgs, style: &Style) -> Result<(), ApproveError> {
    let c = client(&args.broker)?;
    let (a, data) = fetch(&c, &args.id)?;
    if let Some(out) = &args.data_out {
        let verdict = if args.reject {
            Verdict::Reject
        } else {
            Verdict::Approve
        };
        std::fs::write(out, to_sign(&data, verdict))
            .map_err(|e| ApproveError::File(format!("{}: {e}", out.display())))?;
    }
    if args.json {
        print_json(&summary_json(&a, &data));
    } else {
        print_summary(&a, &data, style);
        if let Some(out) = &args.data_out {
            println!(
                "{} {} (the exact bytes to sign{})",
                style.bold("written:"),
                out.display(),
                if args.reject { ", as a rejection" } else { "" }
            );
        }
    }
    Ok(())
}

/// Whether this approver may decide on the request now; said before any
/// key is touched.
fn decidable(a: &Approval, approver: &str) -> Result<(), ApproveError> {
    if !a.approvers.iter().any(|n| n == approver) {
        return Err(ApproveError::NotDecidable(format!(
            "{approver} is not an approver of {} (approvers: {})",
            a.id,
            a.approvers.join(", ")
        )));
    }
    if a.approvals.iter().any(|s| s.approver == approver) {
        return Err(ApproveError::NotDecidable(format!(
            "{approver} already approved {}",
            a.id
        )));
    }
    if a.rejections.iter().any(|s| s.approver == approver) {
        return Err(ApproveError::NotDecidable(format!(
            "{approver} already rejected {}",
            a.id
        )));
    }
    if a.status != ApprovalStatus::Pending {
        return Err(ApproveError::NotDecidable(format!(
            "{} is {}: it can no longer be approved or rejected",
            a.id,
            a.status.as_str()
        )));
    }
    Ok(())
}

/// Asks on a terminal; elsewhere (scripts) the command's own arguments are
/// the consent.
fn confirm(question: &str, yes: bool) -> Result<(), ApproveError> {
    if yes || !std::io::stdin().is_terminal() || !std::io::stderr().is_terminal() {
        return Ok(());
    }
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|e| ApproveError::File(format!("stdin: {e}")))?;
    match answer.trim().to_ascii_lowercase().as_str() {
        "y" | "yes" => Ok(()),
        _ => Err(ApproveError::Declined("answered no".into())),
    }
}

fn decide(args: &DecideArgs, verdict: Verdict, style: &Style) -> Result<(), ApproveError> {
    let (key, opts) = args.key.resolve()?;
    let c = client(&args.broker)?;
    let (a, data) = fetch(&c, &args.id)?;
    decidable(&a, &args.approver)?;
    if !args.json {
        print_summary(&a, &data, style);
    }
    let word = match verdict {
        Verdict::Approve => "Approve",
        Verdict::Reject => "Reject",
    };
    confirm(
        &format!("{word} {} as {} with {key}?", a.id, args.approver),
        args.yes,
    )?;
    let signed = crate::approval::sign::sign(&key, &opts, &to_sign(&data, verdict))?;
    let after = post(&c, &a.id, &args.approver, verdict, &signed.signature)?;
    report(
        &after,
        &args.approver,
        verdict,
        Some(&signed),
        args.json,
        style,
    );
    Ok(())
}

fn post(
    c: &BrokerClient,
    id: &str,
    approver: &str,
    verdict: Verdict,
    signature: &[u8],
) -> Result<Approval, ApproveError> {
    let decision = Decision {
        v: p11shim_proto::VERSION,
        approver: approver.to_owned(),
        signature: p11shim_proto::b64_std().encode(signature),
    };
    let after = c.decide(id, verdict, &decision)?;
    if after.id != id {
        return Err(ApproveError::Broker(format!(
            "answered a decision on {id} with request {:?}",
            after.id
        )));
    }
    Ok(after)
}

fn report(
    after: &Approval,
    approver: &str,
    verdict: Verdict,
    signed: Option<&Signed>,
    json: bool,
    style: &Style,
) {
    if json {
        print_json(&json!({
            "id": after.id,
            "approver": approver,
            "decision": verdict.path(),
            "algorithm": signed.map(|s| s.algorithm.to_string()),
            "status": after.status.as_str(),
            "approvals": after.approvals.len(),
            "m": after.m,
            "rejections": after.rejections.len(),
            "approval": after,
        }));
        return;
    }
    let how = signed
        .map(|s| format!(" ({})", s.algorithm))
        .unwrap_or_default();
    let done = match verdict {
        Verdict::Approve => "approved",
        Verdict::Reject => "rejected",
    };
    let status = match after.status {
        ApprovalStatus::Approved => style.ok("approved"),
        ApprovalStatus::Pending => style.warn("pending"),
        s => style.error(s.as_str()),
    };
    println!(
        "{} {} as {approver}{how}: {} of {} approvals, {} rejection(s); status {status}",
        style.bold(done),
        after.id,
        after.approvals.len(),
        after.m,
        after.rejections.len(),
    );
}

/// A signature file: base64 text if it reads as such, else raw bytes.
fn read_signature(path: &PathBuf) -> Result<Vec<u8>, ApproveError> {
    let bytes =
        std::fs::read(path).map_err(|e| ApproveError::File(format!("{}: {e}", path.display())))?;
    if bytes.is_empty() {
        return Err(ApproveError::File(format!("{}: empty", path.display())));
    }
    let text: Vec<u8> = bytes
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    let base64ish = !text.is_empty()
        && text
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(b));
    if base64ish && let Ok(raw) = p11shim_proto::b64_std().decode(&text) {
        return Ok(raw);
    }
    Ok(bytes)
}

fn submit(args: &SubmitArgs, style: &Style) -> Result<(), ApproveError> {
    let signature = read_signature(&args.signature)?;
    let verdict = if args.reject {
        Verdict::Reject
    } else {
        Verdict::Approve
    };
    let c = client(&args.broker)?;
    // Checked as for `sign`: the approver sees which request the signature
    // goes to, and a request they cannot decide is not sent.
    let (a, data) = fetch(&c, &args.id)?;
    decidable(&a, &args.approver)?;
    if !args.json {
        print_summary(&a, &data, style);
    }
    let after = post(&c, &a.id, &args.approver, verdict, &signature)?;
    report(&after, &args.approver, verdict, None, args.json, style);
    Ok(())
}

fn sign_file(args: &SignFileArgs, style: &Style) -> Result<(), ApproveError> {
    let (key, opts) = args.key.resolve()?;
    let data = std::fs::read(&args.data)
        .map_err(|e| ApproveError::File(format!("{}: {e}", args.data.display())))?;
    let rejection = check::offline_data(&data)
        .map_err(|e| ApproveError::File(format!("{}: {e}", args.data.display())))?;
    println!(
        "{} {}",
        style.bold(if rejection {
            "signing a REJECTION of:"
        } else {
            "signing an APPROVAL of:"
        }),
        args.data.display()
    );
    let text = String::from_utf8_lossy(&data);
    let body = text.strip_prefix(REJECTION_PREFIX).unwrap_or(&text);
    for line in body.lines() {
        println!("  {line}");
    }
    confirm(
        &format!(
            "{} with {key}?",
            if rejection { "Reject" } else { "Approve" },
        ),
        args.yes,
    )?;
    let signed = crate::approval::sign::sign(&key, &opts, &data)?;
    let out = if args.base64 {
        let mut s = p11shim_proto::b64_std().encode(&signed.signature);
        s.push('\n');
        s.into_bytes()
    } else {
        signed.signature.clone()
    };
    std::fs::write(&args.out, out)
        .map_err(|e| ApproveError::File(format!("{}: {e}", args.out.display())))?;
    println!(
        "{} {} ({}, {} bytes); send it with `p11shim approve submit ID --approver NAME --signature {}{}`",
        style.bold("written:"),
        args.out.display(),
        signed.algorithm,
        signed.signature.len(),
        args.out.display(),
        if rejection { " --reject" } else { "" }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_names() {
        assert!(approval_id("apr_0123abcd").is_ok());
        assert!(approval_id("../admin").is_err());
        assert!(approval_id("a?b").is_err());
        assert!(approver_name("carol@ops").is_ok());
        assert!(approver_name("ca rol").is_err());
    }

    #[test]
    fn signature_files_raw_or_base64() {
        let dir = tempfile::tempdir().unwrap();
        let raw: Vec<u8> = (0..=255u8).collect();
        let p = dir.path().join("sig.bin");
        std::fs::write(&p, &raw).unwrap();
        assert_eq!(read_signature(&p).unwrap(), raw);
        let b = dir.path().join("sig.b64");
        let mut text = p11shim_proto::b64_std().encode(&raw);
        text.insert(40, '\n');
        text.push('\n');
        std::fs::write(&b, text).unwrap();
        assert_eq!(read_signature(&b).unwrap(), raw);
        std::fs::write(&b, "").unwrap();
        assert!(read_signature(&b).is_err());
    }

    #[test]
    fn rejections_sign_the_prefixed_bytes() {
        assert_eq!(to_sign(b"x\n", Verdict::Approve), b"x\n");
        assert_eq!(
            to_sign(b"x\n", Verdict::Reject),
            format!("{REJECTION_PREFIX}x\n").into_bytes()
        );
    }
}
