//! Metrics: the module writes Prometheus text to a file for node_exporter's
//! textfile collector. Through the real module and cryptoki, against
//! SoftHSM2 tokens: every read of the file, taken while the application
//! signs, is a complete and valid exposition (the file is replaced
//! atomically); the counters match what the application did exactly; the
//! histograms are well formed; `{pid}` names the file and labels the
//! series; the file goes away at `C_Finalize`, and so does the thread.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use p11shim_tests::{TestEnv, USER_PIN, p11shim_lib};

// ---------------------------------------------------------------------------
// A strict parser of the Prometheus text format (0.0.4), as node_exporter
// reads it: every sample belongs to the family whose HELP and TYPE came
// just before, label values use only the three escapes, no series twice.

#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

#[derive(Debug)]
struct Family {
    kind: String,
    samples: Vec<Sample>,
}

#[derive(Debug)]
struct Exposition {
    families: BTreeMap<String, Family>,
}

fn metric_name_ok(n: &str) -> bool {
    !n.is_empty()
        && n.chars().enumerate().all(|(i, c)| {
            c == '_' || c == ':' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit())
        })
}

fn label_name_ok(n: &str) -> bool {
    !n.is_empty()
        && n.chars()
            .enumerate()
            .all(|(i, c)| c == '_' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit()))
}

/// `{a="b",c="d"}` at the start of `s`: the labels and the rest.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = s.strip_prefix('{').ok_or("expected {")?;
    if let Some(r) = rest.strip_prefix('}') {
        return Ok((labels, r));
    }
    loop {
        let eq = rest.find('=').ok_or("label without =")?;
        let name = &rest[..eq];
        if !label_name_ok(name) {
            return Err(format!("bad label name {name:?}"));
        }
        let mut chars = rest[eq + 1..].char_indices();
        if chars.next().map(|(_, c)| c) != Some('"') {
            return Err(format!("label {name}: value not quoted"));
        }
        let mut value = String::new();
        let end = loop {
            match chars.next() {
                None => return Err(format!("label {name}: unterminated value")),
                Some((i, '"')) => break eq + 1 + i + 1,
                Some((_, '\\')) => match chars.next().map(|(_, c)| c) {
                    Some('\\') => value.push('\\'),
                    Some('"') => value.push('"'),
                    Some('n') => value.push('\n'),
                    other => return Err(format!("label {name}: bad escape {other:?}")),
                },
                Some((_, '\n')) => return Err(format!("label {name}: raw line feed")),
                Some((_, c)) => value.push(c),
            }
        };
        if labels.insert(name.to_owned(), value).is_some() {
            return Err(format!("label {name} twice"));
        }
        rest = &rest[end..];
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        rest = rest
            .strip_prefix(',')
            .ok_or_else(|| format!("expected , or }} after label {name}"))?;
    }
}

fn parse_value(v: &str) -> Result<f64, String> {
    match v {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        v => v.parse::<f64>().map_err(|e| format!("value {v:?}: {e}")),
    }
}

fn parse(text: &str) -> Result<Exposition, String> {
    if text.is_empty() || !text.ends_with('\n') {
        return Err("the text must end with a line feed".into());
    }
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut pending_help: Option<String> = None;
    let mut series = std::collections::HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let at = |m: String| format!("line {}: {m}: {line:?}", n + 1);
        if let Some(help) = line.strip_prefix("# HELP ") {
            let (name, doc) = help
                .split_once(' ')
                .ok_or_else(|| at("HELP without text".into()))?;
            if !metric_name_ok(name) || families.contains_key(name) || pending_help.is_some() {
                return Err(at("HELP out of place".into()));
            }
            if doc.trim().is_empty() {
                return Err(at("empty HELP".into()));
            }
            pending_help = Some(name.to_owned());
            continue;
        }
        if let Some(ty) = line.strip_prefix("# TYPE ") {
            let (name, kind) = ty
                .split_once(' ')
                .ok_or_else(|| at("TYPE without kind".into()))?;
            if pending_help.as_deref() != Some(name) {
                return Err(at("TYPE without its HELP just before".into()));
            }
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                return Err(at(format!("unknown type {kind}")));
            }
            pending_help = None;
            families.insert(
                name.to_owned(),
                Family {
                    kind: kind.to_owned(),
                    samples: Vec::new(),
                },
            );
            current = Some(name.to_owned());
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            return Err(at("unexpected comment or blank line".into()));
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
        let name = &line[..name_end];
        if !metric_name_ok(name) {
            return Err(at("bad metric name".into()));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(at)?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let value = rest
            .strip_prefix(' ')
            .ok_or_else(|| at("expected one space before the value".into()))?;
        if value.contains(' ') {
            return Err(at("extra fields after the value".into()));
        }
        let value = parse_value(value).map_err(at)?;
        let fam_name = current
            .clone()
            .ok_or_else(|| at("sample before any TYPE".into()))?;
        let fam = families.get_mut(&fam_name).expect("current family");
        let belongs = match fam.kind.as_str() {
            "histogram" => ["_bucket", "_sum", "_count"]
                .iter()
                .any(|s| name == format!("{fam_name}{s}")),
            _ => name == fam_name,
        };
        if !belongs {
            return Err(at(format!("sample outside its family {fam_name}")));
        }
        if fam.kind == "histogram" && name.ends_with("_bucket") != labels.contains_key("le") {
            return Err(at("le on buckets, and on buckets only".into()));
        }
        if !series.insert(format!("{name}{labels:?}")) {
            return Err(at("the same series twice".into()));
        }
        fam.samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    if pending_help.is_some() {
        return Err("HELP without TYPE at the end".into());
    }
    let e = Exposition { families };
    e.check_histograms()?;
    Ok(e)
}

/// One histogram series: its buckets (le, cumulative count), sum and count.
#[derive(Debug)]
struct Hist {
    buckets: Vec<(f64, f64)>,
    sum: f64,
    count: f64,
}

impl Exposition {
    fn family(&self, name: &str) -> &Family {
        self.families
            .get(name)
            .unwrap_or_else(|| panic!("no family {name}"))
    }

    /// The value of the one sample of `name` whose labels include `want`.
    fn value(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        let found: Vec<&Sample> = self
            .families
            .values()
            .flat_map(|f| &f.samples)
            .filter(|s| {
                s.name == name
                    && want
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect();
        assert_eq!(found.len(), 1, "{name} {want:?}: {found:?}");
        found[0].value
    }

    /// The histograms of family `name`, by their labels without `le`.
    fn histograms(&self, name: &str) -> BTreeMap<BTreeMap<String, String>, Hist> {
        let fam = self.family(name);
        assert_eq!(fam.kind, "histogram");
        let mut out: BTreeMap<BTreeMap<String, String>, Hist> = BTreeMap::new();
        for s in &fam.samples {
            let mut key = s.labels.clone();
            let le = key.remove("le");
            let h = out.entry(key).or_insert(Hist {
                buckets: Vec::new(),
                sum: f64::NAN,
                count: f64::NAN,
            });
            match le {
                Some(le) => h.buckets.push((parse_value(&le).expect("le"), s.value)),
                None if s.name.ends_with("_sum") => h.sum = s.value,
                None => h.count = s.value,
            }
        }
        out
    }

    /// Buckets in increasing `le`, cumulative, ending with `+Inf` equal to
    /// the count; a sum and a count for every series.
    fn check_histograms(&self) -> Result<(), String> {
        for (name, fam) in &self.families {
            if fam.kind != "histogram" {
                continue;
            }
            for (labels, h) in self.histograms(name) {
                let at = format!("{name}{labels:?}");
                if h.buckets.is_empty() || h.sum.is_nan() || h.count.is_nan() {
                    return Err(format!("{at}: buckets, sum and count expected"));
                }
                if !h.buckets.windows(2).all(|w| w[0].0 < w[1].0) {
                    return Err(format!("{at}: le not increasing"));
                }
                if !h.buckets.windows(2).all(|w| w[0].1 <= w[1].1) {
                    return Err(format!("{at}: buckets not cumulative: {:?}", h.buckets));
                }
                let (le, last) = h.buckets[h.buckets.len() - 1];
                if le != f64::INFINITY || last != h.count {
                    return Err(format!("{at}: +Inf bucket {last} != count {}", h.count));
                }
                if h.sum < 0.0 {
                    return Err(format!("{at}: negative sum"));
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------

/// The threads of this process with a given name.
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == name)
        .count()
}

/// Polls until `f` gives a value (bounded).
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads and parses the file; `None` when it does not exist. Any read
/// that is not a complete, valid exposition fails the test.
fn read(path: &Path) -> Option<(String, Exposition)> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("read {}: {e}", path.display()),
    };
    match parse(&text) {
        Ok(x) => Some((text, x)),
        Err(e) => panic!("invalid exposition in {}: {e}\n{text}", path.display()),
    }
}

/// A slot over `members` HA members (same RSA key on each) with `[metrics]`.
fn setup(members: usize, metrics: &str) -> (TestEnv, PathBuf) {
    let env = TestEnv::new();
    let ms = env.ha_members(members);
    let config = env.ha_config(&ms, "");
    let dir = env.path().join("textfile");
    std::fs::create_dir(&dir).expect("textfile dir");
    let mut text = std::fs::read_to_string(&config).expect("config");
    text.push_str(&format!(
        "\n[metrics]\n{}\n",
        metrics.replace("DIR", &dir.display().to_string())
    ));
    std::fs::write(&config, text).expect("config");
    env.apply();
    (env, dir)
}

fn private_key(s: &Session) -> ObjectHandle {
    let keys = s
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(b"rsa".to_vec()),
        ])
        .expect("find the key");
    assert_eq!(keys.len(), 1);
    keys[0]
}

fn public_key(s: &Session) -> ObjectHandle {
    let keys = s
        .find_objects(&[
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::Label(b"rsa".to_vec()),
        ])
        .expect("find the public key");
    assert_eq!(keys.len(), 1);
    keys[0]
}

#[test]
fn counts_match_the_application_and_the_file_is_replaced_atomically() {
    let (_env, dir) = setup(
        2,
        "file = \"DIR/p11shim-{pid}.prom\"\ninterval_ms = 1000\nlabels = { service = \"pay\\\"ments\" }",
    );
    let pid = std::process::id().to_string();
    let path = dir.join(format!("p11shim-{pid}.prom"));

    let pkcs11 = Pkcs11::new(p11shim_lib()).expect("load p11shim");
    pkcs11
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("C_Initialize");
    // A thread names itself once it runs.
    wait_for("the metrics thread", || {
        (threads_named("p11shim-metrics") == 1).then_some(())
    });
    let slot = pkcs11.get_slots_with_token().expect("slots")[0];
    // Two sessions: the second goes to the other member.
    let a = pkcs11.open_rw_session(slot).expect("session");
    let b = pkcs11.open_rw_session(slot).expect("session");
    a.login(UserType::User, Some(&AuthPin::new(USER_PIN.into())))
        .expect("login");
    let (ka, kb) = (private_key(&a), private_key(&b));
    let public = public_key(&a);
    let finds = 3u64;

    // A reader parses every version of the file while the application signs.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (path, stop) = (path.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut versions = 0u32;
            let mut reads = 0u32;
            let mut last = String::new();
            // Three versions: the file was replaced twice under the reader.
            while versions < 3 && !stop.load(Ordering::Relaxed) {
                if let Some((text, _)) = read(&path) {
                    reads += 1;
                    if text != last {
                        versions += 1;
                        last = text;
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            (versions, reads)
        })
    };
    let data = [0x5au8; 64];
    let (mut signs, mut on_b) = (0u64, 0u64);
    let start = Instant::now();
    // Signs until the file was replaced a few times under the reader
    // (bounded: about 1 s per version).
    while !reader.is_finished() && start.elapsed() < Duration::from_secs(30) {
        let (s, k) = if signs % 2 == 0 { (&a, ka) } else { (&b, kb) };
        s.sign(&Mechanism::Sha256RsaPkcs, k, &data).expect("sign");
        on_b += u64::from(signs % 2 == 1);
        signs += 1;
    }
    let signature = a.sign(&Mechanism::Sha256RsaPkcs, ka, &data).expect("sign");
    signs += 1;
    a.verify(&Mechanism::Sha256RsaPkcs, public, &data, &signature)
        .expect("verify");
    // A failed operation: an RSA key cannot sign with AES-CMAC.
    assert!(a.sign(&Mechanism::AesCMac, ka, &data).is_err());
    stop.store(true, Ordering::Relaxed);
    let (versions, reads) = reader.join().expect("every read parsed");
    assert!(
        versions >= 3,
        "the file was replaced {versions} times in {reads} reads"
    );

    // The counts reach the file exactly.
    let (text, x) = wait_for("the final counts", || {
        read(&path).filter(|(_, x)| {
            x.value(
                "p11shim_operations_total",
                &[("op", "sign"), ("result", "error")],
            ) == 1.0
        })
    });
    let op = |op: &str, result: &str| {
        x.value(
            "p11shim_operations_total",
            &[("slot", "0"), ("op", op), ("result", result)],
        )
    };
    assert_eq!(op("sign", "ok"), signs as f64, "{text}");
    assert_eq!(op("sign", "error"), 1.0);
    assert_eq!(op("verify", "ok"), 1.0);
    assert_eq!(op("login", "ok"), 1.0);
    assert_eq!(op("find", "ok"), finds as f64);
    assert_eq!(op("encrypt", "ok") + op("encrypt", "error"), 0.0);

    let ops = x.histograms("p11shim_operation_duration_seconds");
    let sign = ops
        .iter()
        .find(|(l, _)| l.get("op").map(String::as_str) == Some("sign"))
        .map(|(_, h)| h)
        .expect("a sign histogram");
    assert_eq!(sign.count, signs as f64 + 1.0, "ok and error alike");
    assert!(sign.sum > 0.0);
    assert_eq!(sign.buckets.len(), 17);
    assert_eq!(sign.buckets[0].0, 0.00005);
    assert_eq!(sign.buckets[15].0, 5.0);

    // Both members are up, active, with one session each, and their calls timed.
    for member in ["ha#0", "ha#1"] {
        let m = [("slot", "0"), ("member", member)];
        assert_eq!(x.value("p11shim_member_up", &m), 1.0, "{member}");
        assert_eq!(
            x.value(
                "p11shim_member_state",
                &[("member", member), ("state", "active")]
            ),
            1.0
        );
        assert_eq!(
            x.value(
                "p11shim_member_state",
                &[("member", member), ("state", "down")]
            ),
            0.0
        );
        assert_eq!(x.value("p11shim_member_sessions", &m), 1.0);
        assert_eq!(x.value("p11shim_member_failovers_total", &m), 0.0);
        assert_eq!(x.value("p11shim_member_missed_changes", &m), 0.0);
    }
    let calls = x.histograms("p11shim_member_call_duration_seconds");
    assert_eq!(calls.len(), 2);
    // Each of the member's signatures is C_SignInit and C_Sign twice (the
    // size query, then the signature).
    let b_calls = calls
        .iter()
        .find(|(l, _)| l.get("member").map(String::as_str) == Some("ha#1"))
        .map(|(_, h)| h)
        .expect("member ha#1");
    assert!(b_calls.count >= 3.0 * on_b as f64, "{b_calls:?}");
    assert!(x.value("p11shim_member_errors_total", &[("member", "ha#0")]) >= 1.0);

    // The configured label and the pid label are on every series.
    for s in x.families.values().flat_map(|f| &f.samples) {
        assert_eq!(
            s.labels.get("service").map(String::as_str),
            Some("pay\"ments")
        );
        assert_eq!(s.labels.get("pid"), Some(&pid), "{}", s.name);
    }
    assert_eq!(x.value("p11shim_slot_logged_in", &[]), 1.0);
    assert_eq!(x.value("p11shim_slot_info", &[("token", "ha")]), 1.0);
    let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
    assert_eq!(mode & 0o777, 0o644);

    drop((a, b));
    pkcs11.finalize().expect("C_Finalize");
    assert!(!path.exists(), "the file is removed at C_Finalize");
    assert_eq!(
        std::fs::read_dir(&dir).expect("dir").count(),
        0,
        "no temporary file left"
    );
    assert_eq!(threads_named("p11shim-metrics"), 0, "the thread stopped");
}

#[test]
fn without_threads_the_application_calls_write_the_file() {
    let (_env, dir) = setup(1, "file = \"DIR/p11shim.prom\"\ninterval_ms = 1000");
    let path = dir.join("p11shim.prom");
    let pkcs11 = Pkcs11::new(p11shim_lib()).expect("load p11shim");
    pkcs11
        .initialize(CInitializeArgs::new(
            CInitializeFlags::OS_LOCKING_OK | CInitializeFlags::LIBRARY_CANT_CREATE_OS_THREADS,
        ))
        .expect("C_Initialize");
    assert_eq!(threads_named("p11shim-metrics"), 0, "no thread");
    assert!(!path.exists(), "nothing written before a call");
    let slot = pkcs11.get_slots_with_token().expect("slots")[0];
    let s = pkcs11.open_rw_session(slot).expect("session");
    s.login(UserType::User, Some(&AuthPin::new(USER_PIN.into())))
        .expect("login");
    let key = private_key(&s);
    let mut signs = 0u64;
    // The file is written by the call that finds it due: keep signing
    // until it shows every signature made so far.
    let x = wait_for("a file with every signature", || {
        s.sign(&Mechanism::Sha256RsaPkcs, key, b"data")
            .expect("sign");
        signs += 1;
        read(&path).map(|(_, x)| x).filter(|x| {
            x.value(
                "p11shim_operations_total",
                &[("op", "sign"), ("result", "ok")],
            ) == signs as f64
        })
    });
    assert!(signs > 1, "the interval separates two writes");
    assert_eq!(x.value("p11shim_member_up", &[("member", "ha#0")]), 1.0);
    for s in x.families.values().flat_map(|f| &f.samples) {
        assert!(!s.labels.contains_key("pid"), "no {{pid}}, no pid label");
    }
    drop(s);
    pkcs11.finalize().expect("C_Finalize");
    assert!(!path.exists(), "the file is removed at C_Finalize");
}

#[test]
fn the_parser_is_strict() {
    let ok = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\\\"\"} 3\n";
    assert!(parse(ok).is_ok());
    for bad in [
        "a_total 3\n",                                   // no TYPE
        "# HELP a A.\n# TYPE a gauge\na 1",              // no final line feed
        "# HELP a A.\n# TYPE a gauge\na{x=\"1} 1\n",     // unterminated
        "# HELP a A.\n# TYPE a gauge\na{x=\"\\t\"} 1\n", // bad escape
        "# HELP a A.\n# TYPE a gauge\na 1\na 2\n",       // same series twice
        "# HELP a A.\n# TYPE a gauge\nb 1\n",            // outside its family
        "# HELP a A.\n# TYPE a gauge\na one\n",          // not a number
        "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n", // not cumulative
        "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 1\n", // count mismatch
        "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\n", // no count
    ] {
        assert!(parse(bad).is_err(), "accepted: {bad:?}");
    }
}
