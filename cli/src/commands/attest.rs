//! `p11shim attest [--dry-run] [--config FILE] [--json]`: the evidence the
//! module would present, gathered by the module's own code
//! (`p11shim::credentials::evidence`), and without `--dry-run` one exchange
//! with the broker as the module makes it
//! (`p11shim::credentials::exchange_once`). Shown: the evidence's claims
//! and fields, never a bearer token or signature whole; the grant's role,
//! subject, expiry, re-authentication and policy; of the PIN only that it
//! was received.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use p11shim::config::BrokerConfig;
use p11shim::credentials::evidence::{self, Evidence};
use serde_json::{Map, Value, json};

use super::CliError;
use crate::output::{Style, print_json};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Only gather and show the evidence; send nothing to the broker.
    #[arg(long)]
    pub dry_run: bool,
    /// The module's configuration (default: what the module reads).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &Args, style: &Style) -> Result<(), CliError> {
    let path = args
        .config
        .clone()
        .unwrap_or_else(|| p11shim::config::locate(None));
    let cfg = p11shim::config::load(&path)?;
    let broker = cfg.broker.ok_or_else(|| {
        CliError::Attest(format!(
            "{}: no [broker] section: this configuration does not use attestation",
            path.display()
        ))
    })?;
    let shown = gather(&broker)?;
    let mut doc = json!({
        "config": path.display().to_string(),
        "broker": broker.url,
        "role": broker.role,
        "method": broker.method.as_str(),
        "evidence": shown,
    });
    if !args.dry_run {
        if broker.nonce_file.is_none() && !args.json {
            eprintln!(
                "{} no nonce_file in [broker]: this exchange binds a nonce nobody keeps; if the role's reauth is \"nonce\", later requests from this machine (the module's) are refused as already used",
                style.warn("note:")
            );
        }
        let grant = p11shim::credentials::exchange_once(&broker)
            .map_err(|e| CliError::Attest(e.to_string()))?;
        doc["grant"] = json!({
            "role": broker.role,
            "subject": grant.subject,
            "expires_at": grant.expires_at,
            "ttl_seconds": grant.ttl.as_secs(),
            "reauth": grant.reauth,
            "policy": grant.policy,
            "pin": "received",
        });
        // `grant` (and its PIN) is wiped here.
    }
    if args.json {
        print_json(&doc);
    } else {
        print_human(&doc, style);
    }
    Ok(())
}

/// Gathers the evidence and turns it into what may be shown.
fn gather(cfg: &BrokerConfig) -> Result<Value, CliError> {
    let imds = evidence::imds_client(Duration::from_millis(cfg.request_timeout_ms))
        .map_err(|e| CliError::Attest(format!("evidence: {e}")))?;
    let ev =
        evidence::gather(cfg, &imds).map_err(|e| CliError::Attest(format!("evidence: {e}")))?;
    Ok(match ev {
        Evidence::Fingerprint(f) => json!({
            "attributes": f.attributes,
            "fingerprint": p11shim_proto::fingerprint::fingerprint(&f.attributes),
        }),
        Evidence::Aws(a) => {
            let mut m = Map::new();
            for (k, v) in [
                ("instance_id", &a.instance_id),
                ("reservation_id", &a.reservation_id),
                ("instance_type", &a.instance_type),
                ("local_hostname", &a.local_hostname),
                ("public_hostname", &a.public_hostname),
                ("instance_profile_arn", &a.instance_profile_arn),
            ] {
                if let Some(v) = v {
                    m.insert(k.into(), Value::String(v.clone()));
                }
            }
            if let Some(doc) = &a.iid_document {
                let fields = p11shim_proto::b64_std()
                    .decode(doc)
                    .ok()
                    .and_then(|d| serde_json::from_slice::<Value>(&d).ok())
                    .unwrap_or(Value::String("<not JSON>".into()));
                m.insert("identity_document".into(), fields);
            }
            if let Some(sig) = &a.iid_rsa2048 {
                m.insert(
                    "identity_signature".into(),
                    Value::String(format!(
                        "PKCS#7 rsa2048, {} base64 characters (not shown)",
                        sig.trim().len()
                    )),
                );
            }
            Value::Object(m)
        }
        Evidence::K8s(k) => {
            let claims = jwt_parts(k.token.expose());
            json!({
                "cluster": k.cluster,
                "token": claims,
            })
        }
    })
}

/// A JWT's header and claims; its signature only by length (the token
/// as a whole is a bearer credential and is never shown).
fn jwt_parts(token: &str) -> Value {
    let mut parts = token.split('.');
    let decode = |p: Option<&str>| {
        p.and_then(|p| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p)
                .ok()
        })
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
    };
    let header = decode(parts.next());
    let claims = decode(parts.next());
    let sig_len = parts.next().map(str::len);
    match (header, claims, sig_len) {
        (Some(h), Some(c), Some(n)) => json!({
            "header": h,
            "claims": c,
            "signature": format!("{n} base64url characters (not shown)"),
        }),
        _ => Value::String("<not a JWT; not shown>".into()),
    }
}

fn flat(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flat(&key, v, out);
            }
        }
        Value::String(s) => out.push((prefix.to_owned(), s.clone())),
        Value::Null => out.push((prefix.to_owned(), "-".into())),
        v => out.push((prefix.to_owned(), v.to_string())),
    }
}

fn print_human(doc: &Value, style: &Style) {
    println!(
        "{} role {} via {} at {}",
        style.bold("attest"),
        doc["role"].as_str().unwrap_or("-"),
        doc["method"].as_str().unwrap_or("-"),
        doc["broker"].as_str().unwrap_or("-")
    );
    println!("{}", style.bold("evidence"));
    let mut rows = Vec::new();
    flat("", &doc["evidence"], &mut rows);
    for (k, v) in rows {
        println!("  {k}: {v}");
    }
    let Some(g) = doc.get("grant") else {
        println!("{}", style.dim("dry run: nothing sent to the broker"));
        return;
    };
    println!("{}", style.ok("granted"));
    for k in [
        "role",
        "subject",
        "expires_at",
        "ttl_seconds",
        "reauth",
        "pin",
    ] {
        let v = match &g[k] {
            Value::String(s) => s.clone(),
            v => v.to_string(),
        };
        println!("  {k}: {v}");
    }
    let policy = serde_json::to_string_pretty(&g["policy"]).unwrap_or_default();
    println!("  policy: {}", policy.replace('\n', "\n  "));
}
