//! An EC2 instance metadata service (IMDSv2) for the broker tests, on
//! loopback: session tokens with a TTL, the meta-data paths the shim reads,
//! and the identity document with its three signatures made with a test CA
//! (`--ca-dir`) that the broker under test pins in place of AWS's.
//!
//!     imds-emulator --listen 127.0.0.1:0 --instance instance.json --ca-dir DIR
//!
//! prints `listening <addr>` once it accepts connections. Faults are set
//! with `POST /_control` (loopback only), one command per request, as a
//! text line (`unauthorized 3`) or JSON (`{"cmd":"unauthorized","n":3}`):
//!
//! | command | effect |
//! |---|---|
//! | `unauthorized <n>` | the next n GETs answer 401 |
//! | `delay_ms <n>` | every answer is delayed by n ms |
//! | `substitute <file>` | document and signatures of another instance; meta-data stays |
//! | `crlf` | the document is served with CRLF line ends; the signed content keeps LF |
//! | `expire_tokens` | every token issued so far expires now |
//! | `refuse_put` | token PUTs answer 403 (a hop limit too small) |
//! | `allow_v1` | GETs without a token are answered (IMDSv1, `HttpTokens=optional`) |
//! | `set <path> <value>` | one meta-data value, e.g. `set instance-type m5.large` |
//! | `reset` | back to the start state |

use std::collections::HashMap;
use std::fs;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use base64::Engine as _;
use clap::Parser;
use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::hash::MessageDigest;
use openssl::pkcs7::{Pkcs7, Pkcs7Flags};
use openssl::pkey::{PKey, Private};
use openssl::rsa::Rsa;
use openssl::sign::Signer;
use openssl::stack::Stack;
use openssl::x509::{X509, X509NameBuilder};
use serde::Deserialize;

const TOKEN_TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
const MAX_TOKEN_TTL: u64 = 21_600;

#[derive(Parser, Debug)]
#[command(about = "IMDSv2 emulator for the p11shim broker tests")]
struct Args {
    /// Address to listen on; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The instance, as JSON (see `Instance`).
    #[arg(long)]
    instance: PathBuf,
    /// Where the test CA lives; made on first use, reused after.
    #[arg(long)]
    ca_dir: PathBuf,
}

/// What the emulator says about its instance.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Instance {
    instance_id: String,
    reservation_id: String,
    instance_type: String,
    local_hostname: String,
    #[serde(default)]
    public_hostname: String,
    local_ipv4: String,
    #[serde(default)]
    public_ipv4: String,
    ami_id: String,
    region: String,
    availability_zone: String,
    account_id: String,
    /// RFC 3339, `Z`.
    pending_time: String,
    #[serde(default)]
    instance_profile_arn: String,
    #[serde(default)]
    instance_profile_id: String,
    #[serde(default = "default_architecture")]
    architecture: String,
}

fn default_architecture() -> String {
    "x86_64".into()
}

impl Instance {
    fn load(path: &Path) -> Result<Instance, String> {
        let text = fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The identity document, laid out as IMDS serves it: pretty-printed
    /// with `" : "`, AWS's field order, no final newline.
    fn document(&self) -> String {
        let s = |v: &str| serde_json::Value::from(v).to_string();
        let null = "null".to_owned();
        let fields: [(&str, String); 15] = [
            ("accountId", s(&self.account_id)),
            ("architecture", s(&self.architecture)),
            ("availabilityZone", s(&self.availability_zone)),
            ("billingProducts", null.clone()),
            ("devpayProductCodes", null.clone()),
            ("marketplaceProductCodes", null.clone()),
            ("imageId", s(&self.ami_id)),
            ("instanceId", s(&self.instance_id)),
            ("instanceType", s(&self.instance_type)),
            ("kernelId", null.clone()),
            ("pendingTime", s(&self.pending_time)),
            ("privateIp", s(&self.local_ipv4)),
            ("ramdiskId", null),
            ("region", s(&self.region)),
            ("version", s("2017-09-30")),
        ];
        let body: Vec<String> = fields
            .iter()
            .map(|(k, v)| format!("  \"{k}\" : {v}"))
            .collect();
        format!("{{\n{}\n}}", body.join(",\n"))
    }

    fn iam_info(&self) -> Option<String> {
        if self.instance_profile_arn.is_empty() {
            return None;
        }
        let s = |v: &str| serde_json::Value::from(v).to_string();
        Some(format!(
            "{{\n  \"Code\" : \"Success\",\n  \"LastUpdated\" : {},\n  \"InstanceProfileArn\" : {},\n  \"InstanceProfileId\" : {}\n}}",
            s(&self.pending_time),
            s(&self.instance_profile_arn),
            s(&self.instance_profile_id)
        ))
    }

    /// The value of a `meta-data/` path; `None` is a 404.
    fn meta_data(&self, path: &str) -> Option<String> {
        let v = match path {
            "instance-id" => &self.instance_id,
            "reservation-id" => &self.reservation_id,
            "instance-type" => &self.instance_type,
            "local-hostname" | "hostname" => &self.local_hostname,
            "public-hostname" => &self.public_hostname,
            "local-ipv4" => &self.local_ipv4,
            "public-ipv4" => &self.public_ipv4,
            "ami-id" => &self.ami_id,
            "placement/region" => &self.region,
            "placement/availability-zone" => &self.availability_zone,
            "iam/info" => return self.iam_info(),
            _ => return None,
        };
        (!v.is_empty()).then(|| v.clone())
    }

    /// Changes the value behind a `meta-data/` path.
    fn set(&mut self, path: &str, value: String) -> Result<(), String> {
        let slot = match path {
            "instance-id" => &mut self.instance_id,
            "reservation-id" => &mut self.reservation_id,
            "instance-type" => &mut self.instance_type,
            "local-hostname" | "hostname" => &mut self.local_hostname,
            "public-hostname" => &mut self.public_hostname,
            "local-ipv4" => &mut self.local_ipv4,
            "public-ipv4" => &mut self.public_ipv4,
            "ami-id" => &mut self.ami_id,
            "placement/region" => &mut self.region,
            "placement/availability-zone" => &mut self.availability_zone,
            "iam/info" | "instance-profile-arn" => &mut self.instance_profile_arn,
            "instance-profile-id" => &mut self.instance_profile_id,
            _ => return Err(format!("no meta-data path {path}")),
        };
        *slot = value;
        Ok(())
    }
}

/// A signing key and its self-signed certificate.
struct Ca {
    key: PKey<Private>,
    cert: X509,
}

impl Ca {
    /// Loads `<name>.key` + `<name>.pem` from `dir`, or makes them.
    fn load_or_create(dir: &Path, name: &str, bits: u32) -> Result<Ca, String> {
        let key_path = dir.join(format!("{name}.key"));
        let cert_path = dir.join(format!("{name}.pem"));
        if key_path.exists() && cert_path.exists() {
            let key = fs::read(&key_path).map_err(|e| format!("{}: {e}", key_path.display()))?;
            let cert = fs::read(&cert_path).map_err(|e| format!("{}: {e}", cert_path.display()))?;
            let ca = Ca {
                key: PKey::private_key_from_pem(&key).map_err(|e| format!("{name}.key: {e}"))?,
                cert: X509::from_pem(&cert).map_err(|e| format!("{name}.pem: {e}"))?,
            };
            if !ca.cert.public_key().is_ok_and(|k| k.public_eq(&ca.key)) {
                return Err(format!("{name}.key does not match {name}.pem"));
            }
            return Ok(ca);
        }
        let ca = Ca::generate(bits).map_err(|e| format!("make the {name} CA: {e}"))?;
        let key_pem = ca
            .key
            .private_key_to_pem_pkcs8()
            .map_err(|e| e.to_string())?;
        let cert_pem = ca.cert.to_pem().map_err(|e| e.to_string())?;
        write_new(&key_path, &key_pem, 0o600)?;
        write_new(&cert_path, &cert_pem, 0o644)?;
        Ok(ca)
    }

    /// A key and a self-signed certificate shaped like AWS's (subject
    /// without CN, SHA-256, a long validity).
    fn generate(bits: u32) -> Result<Ca, openssl::error::ErrorStack> {
        let key = PKey::from_rsa(Rsa::generate(bits)?)?;
        let mut name = X509NameBuilder::new()?;
        name.append_entry_by_text("C", "US")?;
        name.append_entry_by_text("ST", "Washington State")?;
        name.append_entry_by_text("L", "Seattle")?;
        name.append_entry_by_text("O", "p11shim IMDS emulator test CA")?;
        let name = name.build();
        let mut serial = BigNum::new()?;
        serial.rand(64, MsbOption::MAYBE_ZERO, false)?;
        let mut b = X509::builder()?;
        b.set_version(2)?;
        let serial = serial.to_asn1_integer()?;
        let (not_before, not_after) = (Asn1Time::days_from_now(0)?, Asn1Time::days_from_now(3650)?);
        b.set_serial_number(&serial)?;
        b.set_subject_name(&name)?;
        b.set_issuer_name(&name)?;
        b.set_pubkey(&key)?;
        b.set_not_before(&not_before)?;
        b.set_not_after(&not_after)?;
        b.sign(&key, MessageDigest::sha256())?;
        Ok(Ca {
            key,
            cert: b.build(),
        })
    }
}

/// Writes a file through a temporary name, so a reader never sees half.
fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), String> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(data).map_err(err)?;
    f.sync_all().map_err(err)?;
    fs::rename(&tmp, path).map_err(err)
}

/// The identity document and its signatures, for one instance.
struct Signed {
    document: String,
    /// `signature`: base64 of RSA-1024 PKCS#1 v1.5 over SHA-256(document).
    signature: String,
    /// `rsa2048` (also served as `pkcs7`): base64 DER PKCS#7 SignedData.
    pkcs7: String,
}

impl Signed {
    fn new(instance: &Instance, rsa2048: &Ca, rsa: &Ca) -> Result<Signed, String> {
        let document = instance.document();
        let ssl = |e: openssl::error::ErrorStack| e.to_string();
        let mut signer = Signer::new(MessageDigest::sha256(), &rsa.key).map_err(ssl)?;
        let signature = signer
            .sign_oneshot_to_vec(document.as_bytes())
            .map_err(ssl)?;
        // BINARY: the content is signed as is (no CRLF canonicalisation);
        // NOCERTS: AWS does not embed its certificate either.
        let no_certs: Stack<X509> = Stack::new().map_err(ssl)?;
        let p7 = Pkcs7::sign(
            &rsa2048.cert,
            &rsa2048.key,
            &no_certs,
            document.as_bytes(),
            Pkcs7Flags::BINARY | Pkcs7Flags::NOCERTS,
        )
        .map_err(ssl)?;
        let der = p7.to_der().map_err(ssl)?;
        Ok(Signed {
            document,
            signature: wrap64(&base64::engine::general_purpose::STANDARD.encode(signature)),
            pkcs7: wrap64(&base64::engine::general_purpose::STANDARD.encode(der)),
        })
    }
}

/// Base64 in lines of 64 characters, as IMDS serves it.
fn wrap64(b64: &str) -> String {
    b64.as_bytes()
        .chunks(64)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The fault settings and the instance as currently served.
struct Faults {
    meta: Instance,
    /// Another instance whose document is served (`substitute`).
    substitute: Option<Signed>,
    crlf: bool,
    unauthorized: u64,
    delay: Duration,
    refuse_put: bool,
    allow_v1: bool,
}

struct Emulator {
    instance: Instance,
    signed: Signed,
    rsa2048: Ca,
    rsa: Ca,
    faults: Mutex<Faults>,
    /// token → expiry
    tokens: Mutex<HashMap<String, Instant>>,
}

impl Emulator {
    fn faults(&self) -> MutexGuard<'_, Faults> {
        self.faults.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn tokens(&self) -> MutexGuard<'_, HashMap<String, Instant>> {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn start_faults(&self) -> Faults {
        Faults::start(&self.instance)
    }
}

impl Faults {
    fn start(instance: &Instance) -> Faults {
        Faults {
            meta: instance.clone(),
            substitute: None,
            crlf: false,
            unauthorized: 0,
            delay: Duration::ZERO,
            refuse_put: false,
            allow_v1: false,
        }
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain")], body.into()).into_response()
}

async fn imds(
    State(emu): State<Arc<Emulator>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let delay = emu.faults().delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let path = uri.path();
    if path == "/latest/api/token" {
        return if method == Method::PUT {
            put_token(&emu, &headers)
        } else {
            text(StatusCode::METHOD_NOT_ALLOWED, "")
        };
    }
    if method != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "");
    }
    if !path.starts_with("/latest/") {
        return text(StatusCode::NOT_FOUND, "");
    }
    let mut faults = emu.faults();
    if faults.unauthorized > 0 {
        faults.unauthorized -= 1;
        return text(StatusCode::UNAUTHORIZED, "");
    }
    match headers.get(TOKEN_HEADER).map(|v| v.to_str().unwrap_or("")) {
        Some(token) => {
            let valid = emu
                .tokens()
                .get(token)
                .is_some_and(|&expiry| Instant::now() < expiry);
            if !valid {
                return text(StatusCode::UNAUTHORIZED, "");
            }
        }
        None if faults.allow_v1 => {}
        None => return text(StatusCode::UNAUTHORIZED, ""),
    }
    let path = &path["/latest/".len()..];
    let answer = if let Some(p) = path.strip_prefix("meta-data/") {
        faults.meta.meta_data(p)
    } else if let Some(p) = path.strip_prefix("dynamic/instance-identity/") {
        let signed = faults.substitute.as_ref().unwrap_or(&emu.signed);
        match p {
            "document" if faults.crlf => Some(signed.document.replace('\n', "\r\n")),
            "document" => Some(signed.document.clone()),
            "signature" => Some(signed.signature.clone()),
            "rsa2048" | "pkcs7" => Some(signed.pkcs7.clone()),
            _ => None,
        }
    } else {
        None
    };
    match answer {
        Some(body) => text(StatusCode::OK, body),
        None => text(StatusCode::NOT_FOUND, ""),
    }
}

fn put_token(emu: &Emulator, headers: &HeaderMap) -> Response {
    // Real IMDS refuses a token to anything that went through a proxy.
    if headers.contains_key("x-forwarded-for") || emu.faults().refuse_put {
        return text(StatusCode::FORBIDDEN, "");
    }
    let ttl = headers
        .get(TOKEN_TTL_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|t| (1..=MAX_TOKEN_TTL).contains(t));
    let Some(ttl) = ttl else {
        return text(StatusCode::BAD_REQUEST, "");
    };
    let mut raw = [0u8; 32];
    if openssl::rand::rand_bytes(&mut raw).is_err() {
        return text(StatusCode::INTERNAL_SERVER_ERROR, "");
    }
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
    let now = Instant::now();
    let mut tokens = emu.tokens();
    tokens.retain(|_, expiry| *expiry > now);
    tokens.insert(token.clone(), now + Duration::from_secs(ttl));
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/plain".to_owned()),
            (
                header::HeaderName::from_static(TOKEN_TTL_HEADER),
                ttl.to_string(),
            ),
        ],
        token,
    )
        .into_response()
}

/// A control command, from a text line or JSON.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
enum Control {
    Unauthorized { n: u64 },
    DelayMs { n: u64 },
    Substitute { path: PathBuf },
    Crlf,
    ExpireTokens,
    RefusePut,
    AllowV1,
    Set { field: String, value: String },
    Reset,
}

impl Control {
    fn parse(body: &[u8]) -> Result<Control, String> {
        let s = std::str::from_utf8(body)
            .map_err(|_| "not UTF-8".to_owned())?
            .trim();
        if s.starts_with('{') {
            return serde_json::from_str(s).map_err(|e| e.to_string());
        }
        let mut words = s.split_whitespace();
        let verb = words.next().unwrap_or("");
        let mut arg = || {
            words
                .next()
                .ok_or_else(|| format!("{verb}: argument missing"))
        };
        let number = |a: &str| {
            a.parse::<u64>()
                .map_err(|_| format!("{verb}: {a} is not a number"))
        };
        let cmd = match verb {
            "unauthorized" => Control::Unauthorized { n: number(arg()?)? },
            "delay_ms" => Control::DelayMs { n: number(arg()?)? },
            "substitute" => Control::Substitute {
                path: PathBuf::from(arg()?),
            },
            "crlf" => Control::Crlf,
            "expire_tokens" => Control::ExpireTokens,
            "refuse_put" => Control::RefusePut,
            "allow_v1" => Control::AllowV1,
            "set" => Control::Set {
                field: arg()?.to_owned(),
                value: arg()?.to_owned(),
            },
            "reset" => Control::Reset,
            _ => return Err(format!("unknown command '{verb}'")),
        };
        match words.next() {
            Some(extra) => Err(format!("{verb}: unexpected '{extra}'")),
            None => Ok(cmd),
        }
    }
}

async fn control(
    State(emu): State<Arc<Emulator>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> Response {
    if !peer.ip().is_loopback() {
        return text(StatusCode::FORBIDDEN, "control is for loopback only\n");
    }
    let cmd = match Control::parse(&body) {
        Ok(c) => c,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    let result = apply(&emu, cmd);
    match result {
        Ok(()) => text(StatusCode::OK, "ok\n"),
        Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    }
}

fn apply(emu: &Emulator, cmd: Control) -> Result<(), String> {
    match cmd {
        Control::Unauthorized { n } => emu.faults().unauthorized = n,
        Control::DelayMs { n } => emu.faults().delay = Duration::from_millis(n),
        Control::Substitute { path } => {
            let other = Instance::load(&path)?;
            let signed = Signed::new(&other, &emu.rsa2048, &emu.rsa)?;
            emu.faults().substitute = Some(signed);
        }
        Control::Crlf => emu.faults().crlf = true,
        Control::ExpireTokens => {
            let now = Instant::now();
            emu.tokens().values_mut().for_each(|expiry| *expiry = now);
        }
        Control::RefusePut => emu.faults().refuse_put = true,
        Control::AllowV1 => emu.faults().allow_v1 = true,
        Control::Set { field, value } => emu.faults().meta.set(&field, value)?,
        Control::Reset => *emu.faults() = emu.start_faults(),
    }
    Ok(())
}

fn setup(args: &Args) -> Result<Emulator, String> {
    let instance = Instance::load(&args.instance)?;
    fs::create_dir_all(&args.ca_dir).map_err(|e| format!("{}: {e}", args.ca_dir.display()))?;
    let rsa2048 = Ca::load_or_create(&args.ca_dir, "rsa2048", 2048)?;
    // The plain `signature` is made with an RSA-1024 key, like AWS's.
    let rsa = Ca::load_or_create(&args.ca_dir, "rsa", 1024)?;
    // `<region>.pem` pins the instance's region only.
    let region_pem = args.ca_dir.join(format!("{}.pem", instance.region));
    if !region_pem.exists() {
        let pem = rsa2048.cert.to_pem().map_err(|e| e.to_string())?;
        write_new(&region_pem, &pem, 0o644)?;
    }
    let signed = Signed::new(&instance, &rsa2048, &rsa)?;
    let emu = Emulator {
        faults: Mutex::new(Faults::start(&instance)),
        instance,
        signed,
        rsa2048,
        rsa,
        tokens: Mutex::new(HashMap::new()),
    };
    Ok(emu)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let emu = match setup(&args) {
        Ok(e) => Arc::new(e),
        Err(e) => {
            eprintln!("imds-emulator: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let app = Router::new()
        .route("/_control", post(control))
        .fallback(any(imds))
        .with_state(emu);
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("imds-emulator: listen on {}: {e}", args.listen);
            return std::process::ExitCode::FAILURE;
        }
    };
    let addr = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("imds-emulator: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    println!("listening {addr}");
    let _ = std::io::stdout().flush();
    let served = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await;
    if let Err(e) = served {
        eprintln!("imds-emulator: {e}");
        return std::process::ExitCode::FAILURE;
    }
    std::process::ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_lines_and_json_agree() {
        let pairs = [
            ("unauthorized 3", r#"{"cmd":"unauthorized","n":3}"#),
            ("delay_ms 250", r#"{"cmd":"delay_ms","n":250}"#),
            (
                "substitute /tmp/b.json",
                r#"{"cmd":"substitute","path":"/tmp/b.json"}"#,
            ),
            ("crlf", r#"{"cmd":"crlf"}"#),
            (
                "set instance-type m5.large",
                r#"{"cmd":"set","field":"instance-type","value":"m5.large"}"#,
            ),
            ("reset\n", r#"{"cmd":"reset"}"#),
        ];
        for (line, json) in pairs {
            assert_eq!(
                Control::parse(line.as_bytes()),
                Control::parse(json.as_bytes()),
                "{line}"
            );
            assert!(Control::parse(line.as_bytes()).is_ok(), "{line}");
        }
        for bad in [
            "",
            "unauthorized",
            "unauthorized x",
            "crlf now",
            "fly",
            r#"{"cmd":"fly"}"#,
        ] {
            assert!(Control::parse(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
