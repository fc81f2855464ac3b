//! `--acl`: what a role's key ACL and the audit record add to a signature.
//!
//! A third target, `shim-audited`, is p11shim with a second configuration:
//! an `[acl]` role whose rules grant the benchmark's signing keys exactly
//! the operation and mechanism the cases use, and an `[audit]` log
//! (`fsync = "interval"`, default checkpoints, fail-closed, Ed25519
//! checkpoints with a key OpenSSL makes for the run). Before measuring, a
//! probe checks that the ACL is in force; after, the audit file must
//! verify with the public key and hold exactly one `key_use` record of
//! `C_Sign` per signature the workers made: a benchmark of a module that
//! silently does not audit would be worthless.
//!
//! Three parts:
//! - instructions (callgrind, `--separate-threads=yes`) per HMAC-SHA256
//!   signature, SoftHSM2 directly, through p11shim, and through p11shim
//!   with ACL and audit: the caller thread's count (what the application
//!   pays), and the audit writer thread's per record (off the caller's
//!   path);
//! - timing of RSA-2048 and ECDSA P-256 signatures on 1 and 2 threads, the
//!   three targets in alternating order within each round;
//! - the sustained audit rate: HMAC signatures (cheap) on 1, 2 and 4
//!   threads for a few seconds, through p11shim with and without the
//!   audit log: records queued per second, written and lost (p11shim's
//!   status query), refusals, the callers' latency, and the writer
//!   thread's CPU time per record.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use p11shim_audit::VerifyKey;

use crate::env::{BenchEnv, Target, result_field, run, run_checked};
use crate::p11::die;
use crate::stats::Histogram;
use crate::timing::{ops, signed, thousands, us};
use crate::worker::Case;

/// Instructions the ACL decision and the audit record may add to one
/// signature on the caller's thread.
pub const TARGET_ADDED: f64 = 2000.0;
/// Throughput ratio, ACL and audit against SoftHSM2 directly, RSA-2048.
pub const TARGET_RATIO: f64 = 0.97;
/// Audit records per second, none lost, callers not blocked.
pub const TARGET_RATE: f64 = 100_000.0;

/// The parts of `--acl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Callgrind,
    Timing,
    Sustained,
}

impl Part {
    pub const ALL: [Part; 3] = [Part::Callgrind, Part::Timing, Part::Sustained];

    pub fn parse(s: &str) -> Option<Part> {
        match s {
            "callgrind" => Some(Part::Callgrind),
            "timing" => Some(Part::Timing),
            "sustained" => Some(Part::Sustained),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct AclOpts {
    pub parts: Vec<Part>,
    /// Callgrind: the runs do N and 2N signatures.
    pub iters: u64,
    pub out_dir: PathBuf,
    /// Timing: measured time per round and target, warm-up, rounds.
    pub measure: Duration,
    pub warmup: Duration,
    pub rounds: usize,
    pub threads: Vec<usize>,
    /// Sustained rate: time per run, rounds, thread counts.
    pub sustain: Duration,
    pub sustain_rounds: usize,
    pub sustain_threads: Vec<usize>,
    /// Paced sustained runs: (threads, records offered per second in all).
    pub sustain_paced: Vec<(usize, f64)>,
}

impl AclOpts {
    pub fn new(quick: bool, out_dir: PathBuf) -> AclOpts {
        AclOpts {
            parts: Part::ALL.to_vec(),
            iters: if quick { 500 } else { 2000 },
            out_dir,
            measure: Duration::from_millis(if quick { 250 } else { 600 }),
            warmup: Duration::from_millis(if quick { 50 } else { 150 }),
            rounds: if quick { 2 } else { 4 },
            threads: vec![1, 2],
            sustain: Duration::from_secs_f64(if quick { 1.0 } else { 3.0 }),
            sustain_rounds: if quick { 1 } else { 2 },
            sustain_threads: vec![1, 2, 4],
            sustain_paced: vec![(2, TARGET_RATE), (2, 2.0 * TARGET_RATE)],
        }
    }
}

/// Signatures the audited target made, for the check of its audit log.
#[derive(Debug, Default)]
struct Tally {
    /// Successful signatures, warm-up included.
    signs: u64,
    /// Signatures refused for want of an audit record.
    refused: u64,
    /// Worker processes (one chain each).
    processes: u64,
}

impl Tally {
    fn add(&mut self, r: &WorkerRun) {
        self.signs += r.all - r.refused;
        self.refused += r.refused;
        self.processes += 1;
    }
}

/// What a worker reported.
#[derive(Debug, Clone, Default)]
struct WorkerRun {
    ops: u64,
    all: u64,
    refused: u64,
    rate: f64,
    hist: Histogram,
    audit: Option<AuditCounters>,
}

#[derive(Debug, Clone, Copy, Default)]
struct AuditCounters {
    written: u64,
    lost: u64,
    queued: u64,
    healthy: bool,
    writer_cpu_ns: Option<u64>,
}

fn parse_run(stdout: &str, timed: bool) -> WorkerRun {
    let num = |k: &str| -> u64 {
        result_field(stdout, k)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| die(format_args!("worker report without {k}: {stdout:?}")))
    };
    let mut r = WorkerRun {
        ops: num("ops"),
        all: num("all"),
        refused: num("refused"),
        ..WorkerRun::default()
    };
    if timed {
        r.rate = result_field(stdout, "rate")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| die(format_args!("worker report without a rate: {stdout:?}")));
        r.hist = result_field(stdout, "hist")
            .and_then(Histogram::decode)
            .unwrap_or_else(|| {
                die(format_args!(
                    "worker report without a histogram: {stdout:?}"
                ))
            });
    }
    if result_field(stdout, "audit_written").is_some() {
        r.audit = Some(AuditCounters {
            written: num("audit_written"),
            lost: num("audit_lost"),
            queued: num("audit_queued"),
            healthy: result_field(stdout, "audit_healthy") == Some("true"),
            writer_cpu_ns: result_field(stdout, "audit_writer_cpu_ns").and_then(|v| v.parse().ok()),
        });
    }
    r
}

pub fn run_all(env: &BenchEnv, opts: &AclOpts, markdown: bool) {
    env.add_audited();
    let probe = run_checked(
        env.worker(Target::ShimAudited, &["--acl-probe"]),
        "the ACL probe",
    );
    if !String::from_utf8_lossy(&probe.stdout).contains("RESULT acl=enforced") {
        die("the ACL probe did not report that the ACL is in force");
    }
    eprintln!(
        "ACL in force: the role sees its three signing keys, not the AES key, and CKM_RSA_PKCS is refused at C_SignInit"
    );
    let mut tally = Tally {
        processes: 1,
        ..Tally::default()
    };

    let counted = opts
        .parts
        .contains(&Part::Callgrind)
        .then(|| callgrind(env, opts, &mut tally));
    let timed = opts
        .parts
        .contains(&Part::Timing)
        .then(|| timing(env, opts, &mut tally));
    let sustained = opts
        .parts
        .contains(&Part::Sustained)
        .then(|| sustained(env, opts, &mut tally));

    println!();
    if let Some(c) = &counted {
        print_callgrind(c, opts, markdown);
    }
    if let Some(t) = &timed {
        print_timing(t, markdown);
    }
    if let Some(s) = &sustained {
        print_sustained(s, markdown);
    }
    let check = check_audit_log(env, &tally);
    println!("{check}");
    println!();
    print_targets(counted.as_ref(), timed.as_deref(), sustained.as_deref());
}

// --- Instructions ------------------------------------------------------------

const CG_TARGETS: [Target; 3] = [Target::Direct, Target::Shim, Target::ShimAudited];

/// Per-signature instructions of one target: (I(2N) − I(N)) / N, by thread.
#[derive(Debug, Clone, Default)]
struct ThreadCounts {
    /// The thread that signs.
    caller: f64,
    /// The audit writer thread (per signature, that is per record).
    writer: Option<f64>,
    /// Every thread of the process.
    all: f64,
}

#[derive(Debug)]
struct Counted {
    n: u64,
    by_target: [ThreadCounts; 3],
    /// Where the caller's added instructions go (audited minus plain
    /// p11shim, self cost by function), largest first.
    functions: Vec<(String, f64)>,
}

/// One callgrind file per thread: the thread that called `C_Sign` is the
/// caller, the one running p11shim-audit's `Writer` the writer (its sync
/// thread is counted in all threads only).
#[derive(Debug, Default)]
struct ThreadFiles {
    caller: Option<PathBuf>,
    writer: Option<PathBuf>,
    all: Vec<PathBuf>,
}

/// Whether a callgrind file names a function (a `fn=`/`cfn=` line with that
/// exact name, compressed `(id) name` or not).
fn names_function(text: &str, pred: impl Fn(&str) -> bool) -> bool {
    text.lines().any(|l| {
        let Some(rest) = l.strip_prefix("fn=").or_else(|| l.strip_prefix("cfn=")) else {
            return false;
        };
        let name = match rest.strip_prefix('(') {
            Some(r) => r.split_once(") ").map_or("", |(_, n)| n),
            None => rest,
        };
        pred(name)
    })
}

fn classify(files: &[PathBuf]) -> ThreadFiles {
    let mut t = ThreadFiles {
        all: files.to_vec(),
        ..ThreadFiles::default()
    };
    for f in files {
        let text = std::fs::read_to_string(f)
            .unwrap_or_else(|e| die(format_args!("cannot read {}: {e}", f.display())));
        if names_function(&text, |n| n == "C_Sign") {
            if t.caller.replace(f.clone()).is_some() {
                die(format_args!(
                    "two threads called C_Sign in {files:?}: expected one signing thread"
                ));
            }
        } else if names_function(&text, |n| n.starts_with("p11shim_audit::auditor::Writer::")) {
            t.writer = Some(f.clone());
        }
    }
    t
}

/// Runs the worker under callgrind with one output file per thread; the
/// files are kept in `out_dir` as `<target>.hmac-sign.<n>.out-<thread>`.
fn count_threads(env: &BenchEnv, target: Target, n: u64, out_dir: &Path) -> ThreadFiles {
    let base = format!("{}.hmac-sign.{n}.out", target.name());
    let tmp = env.path().join("callgrind");
    std::fs::create_dir_all(&tmp)
        .unwrap_or_else(|e| die(format_args!("cannot create {}: {e}", tmp.display())));
    let out_file = format!("--callgrind-out-file={}", tmp.join(&base).display());
    let n_arg = n.to_string();
    let cmd = env.command(
        target,
        &[
            "valgrind",
            "--tool=callgrind",
            "--separate-threads=yes",
            &out_file,
        ],
        &[
            "--case",
            Case::HmacSign.name(),
            "--threads",
            "1",
            "--count",
            &n_arg,
        ],
    );
    let out = run(
        cmd,
        &format!("callgrind of {} hmac-sign x{n}", target.title()),
        false,
    );
    let r = parse_run(&String::from_utf8_lossy(&out.stdout), false);
    if r.ops != n || r.refused != 0 {
        die(format_args!(
            "the worker under callgrind reported {} signatures ({} refused), expected {n}",
            r.ops, r.refused
        ));
    }
    let mut kept = Vec::new();
    let entries = std::fs::read_dir(&tmp)
        .unwrap_or_else(|e| die(format_args!("cannot list {}: {e}", tmp.display())));
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        // `<base>-<thread>`; `<base>` itself stays empty.
        let Some(rest) = name.strip_prefix(&base) else {
            continue;
        };
        if rest.is_empty() {
            let _ = std::fs::remove_file(e.path());
        } else if rest.starts_with('-') {
            let dest = out_dir.join(&name);
            std::fs::rename(e.path(), &dest)
                .or_else(|_| std::fs::copy(e.path(), &dest).map(|_| ()))
                .unwrap_or_else(|err| {
                    die(format_args!("cannot keep {}: {err}", e.path().display()))
                });
            kept.push(dest);
        }
    }
    kept.sort();
    if kept.is_empty() {
        die(format_args!("callgrind wrote no file {base}*"));
    }
    classify(&kept)
}

fn callgrind(env: &BenchEnv, opts: &AclOpts, tally: &mut Tally) -> Counted {
    let version = std::process::Command::new("valgrind")
        .arg("--version")
        .output();
    match version {
        Ok(o) if o.status.success() => eprintln!("{}", String::from_utf8_lossy(&o.stdout).trim()),
        _ => die("valgrind is not installed (apt-get install valgrind; `make deps` installs it)"),
    }
    std::fs::create_dir_all(&opts.out_dir).unwrap_or_else(|e| {
        die(format_args!(
            "cannot create {}: {e}",
            opts.out_dir.display()
        ))
    });
    let n = opts.iters;
    let total = |fs: &[PathBuf]| fs.iter().map(|f| crate::callgrind::totals(f)).sum::<u64>();
    let per = |small: u64, large: u64, what: &str| -> f64 {
        if large <= small {
            die(format_args!(
                "{what}: {large} instructions for {} signatures, {small} for {n}",
                2 * n
            ));
        }
        (large - small) as f64 / n as f64
    };
    let mut by_target: [ThreadCounts; 3] = Default::default();
    let mut callers = Vec::new();
    for (i, &target) in CG_TARGETS.iter().enumerate() {
        let small = count_threads(env, target, n, &opts.out_dir);
        let large = count_threads(env, target, 2 * n, &opts.out_dir);
        if target == Target::ShimAudited {
            for r in [n, 2 * n] {
                tally.add(&WorkerRun {
                    ops: r,
                    all: r,
                    ..WorkerRun::default()
                });
            }
        }
        let (Some(cs), Some(cl)) = (&small.caller, &large.caller) else {
            die(format_args!(
                "{}: no callgrind thread file names C_Sign (files: {:?})",
                target.title(),
                large.all
            ))
        };
        let what = format!("{} caller thread", target.title());
        let caller = per(
            crate::callgrind::totals(cs),
            crate::callgrind::totals(cl),
            &what,
        );
        let writer = match (&small.writer, &large.writer) {
            (Some(ws), Some(wl)) => Some(per(
                crate::callgrind::totals(ws),
                crate::callgrind::totals(wl),
                &format!("{} audit writer thread", target.title()),
            )),
            _ if target == Target::ShimAudited => die(format_args!(
                "{}: no callgrind thread file shows the audit writer (files: {:?})",
                target.title(),
                large.all
            )),
            _ => None,
        };
        let all = per(
            total(&small.all),
            total(&large.all),
            &format!("{} all threads", target.title()),
        );
        eprintln!(
            "  HMAC-SHA256 sign  {:<18} caller {:>9.1}  writer {:>9}  all threads {:>9.1}  per signature",
            target.title(),
            caller,
            writer.map_or("-".to_string(), |w| format!("{w:.1}")),
            all
        );
        by_target[i] = ThreadCounts {
            caller,
            writer,
            all,
        };
        callers.push((cs.clone(), cl.clone()));
    }
    let functions = added_functions(&callers[1], &callers[2], n);
    Counted {
        n,
        by_target,
        functions,
    }
}

/// Self cost per signature of every function on the caller's thread.
fn per_sign(files: &(PathBuf, PathBuf), n: u64) -> Option<HashMap<String, f64>> {
    let small = crate::callgrind::self_costs(&files.0)?;
    let large = crate::callgrind::self_costs(&files.1)?;
    let mut per = HashMap::new();
    for k in small.keys().chain(large.keys()) {
        let v =
            (*large.get(k).unwrap_or(&0) as f64 - *small.get(k).unwrap_or(&0) as f64) / n as f64;
        per.insert(k.clone(), v);
    }
    Some(per)
}

/// The caller-thread functions whose cost grows most from p11shim to
/// p11shim with ACL and audit.
fn added_functions(
    shim: &(PathBuf, PathBuf),
    audited: &(PathBuf, PathBuf),
    n: u64,
) -> Vec<(String, f64)> {
    let (Some(s), Some(a)) = (per_sign(shim, n), per_sign(audited, n)) else {
        return Vec::new();
    };
    let mut rows: Vec<(String, f64)> = a
        .iter()
        .map(|(k, v)| (k.clone(), v - s.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| d.abs() >= 5.0)
        .collect();
    rows.sort_by(|x, y| y.1.total_cmp(&x.1));
    rows
}

fn int(v: f64) -> String {
    thousands(v.round().max(0.0) as u64)
}

impl Counted {
    fn added(&self) -> f64 {
        self.by_target[2].caller - self.by_target[1].caller
    }
}

fn print_callgrind(c: &Counted, opts: &AclOpts, markdown: bool) {
    let [d, s, a] = &c.by_target;
    let n = c.n;
    println!(
        "Instructions per HMAC-SHA256 signature of 64 B (SignInit+Sign), callgrind --separate-threads=yes, (I({}) - I({n})) / {n}:",
        2 * n
    );
    println!();
    let rows = [
        ("SoftHSM2 direct", d),
        ("through p11shim", s),
        ("through p11shim, ACL + audit", a),
    ];
    if markdown {
        println!(
            "| Target | caller thread | added on the caller vs p11shim | audit writer thread, per record | all threads |"
        );
        println!("|---|--:|--:|--:|--:|");
        for (i, (name, t)) in rows.iter().enumerate() {
            let added = match i {
                0 => String::new(),
                1 => format!("{} (vs direct)", signed(s.caller - d.caller)),
                _ => format!("**{}**", signed(c.added())),
            };
            println!(
                "| {name} | {} | {added} | {} | {} |",
                int(t.caller),
                t.writer.map_or(String::new(), int),
                int(t.all)
            );
        }
    } else {
        println!(
            "{:<30} {:>12} {:>22} {:>16} {:>12}",
            "target", "caller", "added on the caller", "writer/record", "all threads"
        );
        for (i, (name, t)) in rows.iter().enumerate() {
            let added = match i {
                0 => String::new(),
                1 => format!("{} vs direct", signed(s.caller - d.caller)),
                _ => format!("{} vs p11shim", signed(c.added())),
            };
            println!(
                "{name:<30} {:>12} {added:>22} {:>16} {:>12}",
                int(t.caller),
                t.writer.map_or("-".to_string(), int),
                int(t.all)
            );
        }
    }
    if !c.functions.is_empty() {
        println!();
        println!(
            "Where the caller's {:.0} added instructions go (self cost per signature, ACL + audit minus p11shim, by function; inlined code counts in its caller):",
            c.added()
        );
        if markdown {
            println!();
            println!("| Instructions per signature | Function |");
            println!("|--:|---|");
        }
        for (f, v) in c.functions.iter().take(12) {
            let f: String = f.chars().take(150).collect();
            if markdown {
                println!("| {} | `{f}` |", signed(*v));
            } else {
                println!("{:>8}  {f}", signed(*v));
            }
        }
    }
    println!();
    println!(
        "Callgrind files: {} (hmac-sign.*.out-NN, one per thread)",
        opts.out_dir.display()
    );
    println!();
}

// --- Timing --------------------------------------------------------------------

const TIMED_TARGETS: [Target; 3] = [Target::Direct, Target::Shim, Target::ShimAudited];
const TIMED_CASES: [Case; 2] = [Case::RsaSign, Case::EcdsaSign];

fn measure(
    env: &BenchEnv,
    target: Target,
    case: Case,
    threads: usize,
    (warmup, secs): (Duration, Duration),
    audit_status: bool,
    rate: Option<f64>,
) -> WorkerRun {
    let (s, w, th) = (
        secs.as_secs_f64().to_string(),
        warmup.as_secs_f64().to_string(),
        threads.to_string(),
    );
    let per_thread = rate.map(|r| (r / threads as f64).to_string());
    let mut args = vec![
        "--case",
        case.name(),
        "--threads",
        &th,
        "--secs",
        &s,
        "--warmup",
        &w,
    ];
    if audit_status {
        args.push("--audit-status");
    }
    if let Some(r) = &per_thread {
        args.extend(["--rate", r.as_str()]);
    }
    let out = run_checked(
        env.worker(target, &args),
        &format!("{} {} on {threads} thread(s)", target.title(), case.name()),
    );
    let r = parse_run(&String::from_utf8_lossy(&out.stdout), true);
    if r.ops == 0 {
        die(format_args!(
            "{} {} ran no operation in {secs:?}",
            target.title(),
            case.name()
        ));
    }
    r
}

/// The order of the targets in round `r`: rotated by one every two rounds,
/// reversed every other round, so that each target goes first, in the
/// middle and last alike.
fn order<T: Copy>(items: &[T], r: usize) -> Vec<T> {
    let mut v = items.to_vec();
    if !v.is_empty() {
        let len = v.len();
        v.rotate_left((r / 2) % len);
    }
    if r % 2 == 1 {
        v.reverse();
    }
    v
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn range(v: &[f64]) -> (f64, f64) {
    (
        v.iter().copied().fold(f64::INFINITY, f64::min),
        v.iter().copied().fold(0.0, f64::max),
    )
}

/// One (case, threads) of the timed comparison: per round, one run of
/// each target, in the order of `TIMED_TARGETS`.
#[derive(Debug)]
struct TimedRow {
    case: Case,
    threads: usize,
    rounds: Vec<[WorkerRun; 3]>,
}

impl TimedRow {
    fn rate(&self, t: usize) -> f64 {
        median(self.rounds.iter().map(|r| r[t].rate).collect())
    }

    /// Per-round ratios of target `a` to target `b`.
    fn ratios(&self, a: usize, b: usize) -> Vec<f64> {
        self.rounds
            .iter()
            .map(|r| {
                if r[b].rate > 0.0 {
                    r[a].rate / r[b].rate
                } else {
                    0.0
                }
            })
            .collect()
    }

    fn ratio(&self, a: usize, b: usize) -> f64 {
        median(self.ratios(a, b))
    }

    fn hist(&self, t: usize) -> Histogram {
        let mut h = Histogram::new();
        for r in &self.rounds {
            h.merge(&r[t].hist);
        }
        h
    }

    /// The speed of target `a` relative to target `b` from their median
    /// latencies (latency of `b` over latency of `a`, read like the
    /// throughput ratio): on a loaded machine the median of single
    /// operations moves far less than throughput, which counts every
    /// moment another process held the core.
    fn p50_ratio(&self, a: usize, b: usize) -> f64 {
        let (la, lb) = (self.hist(a).quantile(0.5), self.hist(b).quantile(0.5));
        if la > 0 { lb as f64 / la as f64 } else { 0.0 }
    }
}

fn timing(env: &BenchEnv, opts: &AclOpts, tally: &mut Tally) -> Vec<TimedRow> {
    eprintln!(
        "Timing: {} round(s) of {:.2} s (after {:.2} s of warm-up) per case, thread count and target",
        opts.rounds,
        opts.measure.as_secs_f64(),
        opts.warmup.as_secs_f64()
    );
    let mut rows = Vec::new();
    for &case in &TIMED_CASES {
        for &threads in &opts.threads {
            let mut row = TimedRow {
                case,
                threads,
                rounds: Vec::new(),
            };
            for r in 0..opts.rounds {
                let mut runs: [WorkerRun; 3] = Default::default();
                for i in order(&[0usize, 1, 2], r) {
                    let target = TIMED_TARGETS[i];
                    let m = measure(
                        env,
                        target,
                        case,
                        threads,
                        (opts.warmup, opts.measure),
                        false,
                        None,
                    );
                    if target == Target::ShimAudited {
                        tally.add(&m);
                    }
                    if m.refused > 0 {
                        // A refused C_SignInit returns at once: the rate
                        // would count signatures that were never made.
                        die(format_args!(
                            "{} {} on {threads} thread(s): {} signatures refused by the fail-closed audit log",
                            target.title(),
                            case.name(),
                            m.refused
                        ));
                    }
                    runs[i] = m;
                }
                row.rounds.push(runs);
            }
            let (lo, hi) = range(&row.ratios(2, 0));
            eprintln!(
                "  {:<36} {threads} thr  SoftHSM2 {:>8}/s  p11shim {:>8}/s  ACL+audit {:>8}/s  ratio to SoftHSM2 {:.3} ({lo:.3}-{hi:.3})",
                case.title(),
                ops(row.rate(0)),
                ops(row.rate(1)),
                ops(row.rate(2)),
                row.ratio(2, 0)
            );
            rows.push(row);
        }
    }
    rows
}

fn print_timing(rows: &[TimedRow], markdown: bool) {
    println!(
        "Signatures per second and latency, SoftHSM2 directly, through p11shim, and through p11shim with ACL + audit (median of the rounds; ratios: median of the rounds' ratios, range beside it):"
    );
    println!();
    if markdown {
        println!(
            "| Operation | Threads | SoftHSM2 ops/s | p11shim ops/s | ACL + audit ops/s | ACL + audit / SoftHSM2 (range) | ACL + audit / p11shim | p50 µs (SoftHSM2 / p11shim / ACL + audit) | p50 speed ratio, ACL + audit / SoftHSM2 | p99 µs (SoftHSM2 / p11shim / ACL + audit) |"
        );
        println!("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    } else {
        println!(
            "{:<36} {:>3} {:>10} {:>10} {:>10} {:>18} {:>8} {:>22} {:>9} {:>22}",
            "operation",
            "thr",
            "SoftHSM2",
            "p11shim",
            "ACL+audit",
            "ACL+audit/direct",
            "/p11shim",
            "p50 µs d/s/a",
            "p50 a/d",
            "p99 µs d/s/a"
        );
    }
    for r in rows {
        let (lo, hi) = range(&r.ratios(2, 0));
        let h = [r.hist(0), r.hist(1), r.hist(2)];
        let q = |p: f64| {
            format!(
                "{} / {} / {}",
                us(h[0].quantile(p)),
                us(h[1].quantile(p)),
                us(h[2].quantile(p))
            )
        };
        if markdown {
            println!(
                "| {} | {} | {} | {} | {} | {:.3} ({lo:.2}–{hi:.2}) | {:.3} | {} | {:.3} | {} |",
                r.case.title(),
                r.threads,
                ops(r.rate(0)),
                ops(r.rate(1)),
                ops(r.rate(2)),
                r.ratio(2, 0),
                r.ratio(2, 1),
                q(0.5),
                r.p50_ratio(2, 0),
                q(0.99)
            );
        } else {
            println!(
                "{:<36} {:>3} {:>10} {:>10} {:>10} {:>18} {:>8.3} {:>22} {:>9.3} {:>22}",
                r.case.title(),
                r.threads,
                ops(r.rate(0)),
                ops(r.rate(1)),
                ops(r.rate(2)),
                format!("{:.3} ({lo:.2}-{hi:.2})", r.ratio(2, 0)),
                r.ratio(2, 1),
                q(0.5),
                r.p50_ratio(2, 0),
                q(0.99)
            );
        }
    }
    println!();
}

// --- Sustained audit rate ----------------------------------------------------

#[derive(Debug)]
struct SustainedRow {
    threads: usize,
    /// Records offered per second in all (paced), or `None`: as fast as
    /// the callers go.
    offered: Option<f64>,
    /// Per round: (p11shim, p11shim with ACL + audit).
    rounds: Vec<(WorkerRun, WorkerRun)>,
}

impl SustainedRow {
    fn offered_text(&self) -> String {
        self.offered
            .map_or("flat out".to_string(), |r| format!("{}/s", ops(r)))
    }
    /// No record lost or refused, none left queued, the sinks healthy.
    fn clean(&self) -> bool {
        self.lost() == 0 && self.refused() == 0 && self.still_queued() == 0 && self.healthy()
    }
    fn shim_rate(&self) -> f64 {
        median(self.rounds.iter().map(|r| r.0.rate).collect())
    }
    fn audited_rate(&self) -> f64 {
        median(self.rounds.iter().map(|r| r.1.rate).collect())
    }
    fn hist(&self, audited: bool) -> Histogram {
        let mut h = Histogram::new();
        for r in &self.rounds {
            h.merge(if audited { &r.1.hist } else { &r.0.hist });
        }
        h
    }
    fn audited(&self) -> impl Iterator<Item = &WorkerRun> {
        self.rounds.iter().map(|r| &r.1)
    }
    /// Records the audited workers queued (signatures, warm-up included).
    fn queued(&self) -> u64 {
        self.audited().map(|r| r.all - r.refused).sum()
    }
    fn written(&self) -> u64 {
        self.audited()
            .map(|r| r.audit.unwrap_or_default().written)
            .sum()
    }
    fn lost(&self) -> u64 {
        self.audited()
            .map(|r| r.audit.unwrap_or_default().lost)
            .sum()
    }
    fn refused(&self) -> u64 {
        self.audited().map(|r| r.refused).sum()
    }
    fn still_queued(&self) -> u64 {
        self.audited()
            .map(|r| r.audit.unwrap_or_default().queued)
            .sum()
    }
    fn healthy(&self) -> bool {
        self.audited().all(|r| r.audit.unwrap_or_default().healthy)
    }
    /// The writer thread's CPU time per record written, in nanoseconds.
    fn writer_ns_per_record(&self) -> Option<f64> {
        let mut cpu = 0u64;
        for r in self.audited() {
            cpu += r.audit?.writer_cpu_ns?;
        }
        let written = self.written();
        (written > 0).then(|| cpu as f64 / written as f64)
    }
}

fn sustained(env: &BenchEnv, opts: &AclOpts, tally: &mut Tally) -> Vec<SustainedRow> {
    eprintln!(
        "Sustained audit rate: HMAC-SHA256 signatures with a session key, {} round(s) of {:.1} s per thread count, offered rate and target",
        opts.sustain_rounds,
        opts.sustain.as_secs_f64()
    );
    let warmup = Duration::from_millis(100);
    let runs = opts
        .sustain_threads
        .iter()
        .map(|&t| (t, None))
        .chain(opts.sustain_paced.iter().map(|&(t, r)| (t, Some(r))));
    let mut rows = Vec::new();
    for (threads, offered) in runs {
        let mut row = SustainedRow {
            threads,
            offered,
            rounds: Vec::new(),
        };
        for r in 0..opts.sustain_rounds {
            let mut pair = (WorkerRun::default(), WorkerRun::default());
            for audited in order(&[false, true], r) {
                let target = if audited {
                    Target::ShimAudited
                } else {
                    Target::Shim
                };
                let m = measure(
                    env,
                    target,
                    Case::HmacSessionSign,
                    threads,
                    (warmup, opts.sustain),
                    audited,
                    offered,
                );
                if audited {
                    tally.add(&m);
                    pair.1 = m;
                } else {
                    pair.0 = m;
                }
            }
            row.rounds.push(pair);
        }
        eprintln!(
            "  {threads} thr  offered {:>9}  p11shim {:>8}/s  ACL+audit {:>8} records/s  written {} lost {} refused {}",
            row.offered_text(),
            ops(row.shim_rate()),
            ops(row.audited_rate()),
            thousands(row.written()),
            row.lost(),
            row.refused()
        );
        rows.push(row);
    }
    rows
}

fn print_sustained(rows: &[SustainedRow], markdown: bool) {
    println!(
        "Sustained audit rate: HMAC-SHA256 signatures with a session key through p11shim, with ACL + audit (one key_use record each) and without, as fast as the callers go and paced at a rate offered in all; records written and lost from p11shim's status query once the queue drained; refused: C_SignInit refused by the fail-closed log:"
    );
    println!();
    if markdown {
        println!(
            "| Threads | Offered | p11shim signs/s | ACL + audit signs/s = records/s | records queued | written | lost | refused | p50 µs (p11shim / audited) | p99 µs (p11shim / audited) | writer CPU per record |"
        );
        println!("|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    } else {
        println!(
            "{:>3} {:>10} {:>12} {:>14} {:>10} {:>10} {:>6} {:>8} {:>16} {:>16} {:>14}",
            "thr",
            "offered",
            "p11shim/s",
            "audited rec/s",
            "queued",
            "written",
            "lost",
            "refused",
            "p50 µs s/a",
            "p99 µs s/a",
            "writer ns/rec"
        );
    }
    for r in rows {
        let (hs, ha) = (r.hist(false), r.hist(true));
        let p50 = format!("{} / {}", us(hs.quantile(0.5)), us(ha.quantile(0.5)));
        let p99 = format!("{} / {}", us(hs.quantile(0.99)), us(ha.quantile(0.99)));
        let writer = r
            .writer_ns_per_record()
            .map_or("n/a".to_string(), |v| format!("{v:.0} ns"));
        let mut written = thousands(r.written());
        if r.still_queued() > 0 {
            written += &format!(" ({} still queued)", r.still_queued());
        }
        if !r.healthy() {
            written += " (sink unhealthy)";
        }
        if markdown {
            println!(
                "| {} | {} | {} | {} | {} | {written} | {} | {} | {p50} | {p99} | {writer} |",
                r.threads,
                r.offered_text(),
                ops(r.shim_rate()),
                ops(r.audited_rate()),
                thousands(r.queued()),
                r.lost(),
                r.refused()
            );
        } else {
            println!(
                "{:>3} {:>10} {:>12} {:>14} {:>10} {written:>10} {:>6} {:>8} {p50:>16} {p99:>16} {writer:>14}",
                r.threads,
                r.offered_text(),
                ops(r.shim_rate()),
                ops(r.audited_rate()),
                thousands(r.queued()),
                r.lost(),
                r.refused()
            );
        }
    }
    println!();
    println!(
        "written counts every record of the process (its login too), so it exceeds the signatures' records by one per run."
    );
    if let Some(ns) = rows
        .iter()
        .filter_map(SustainedRow::writer_ns_per_record)
        .reduce(f64::max)
    {
        println!(
            "Writer capacity from its CPU time (formatting, SHA-256 chain, Ed25519 checkpoints, write(2), idle polls included): at most {ns:.0} ns per record, {} records/s on a core of its own.",
            ops(1e9 / ns)
        );
    }
    println!();
}

// --- The audit log -----------------------------------------------------------

/// The audit file must verify with the public key (no broken link, no
/// warning, every chain terminated by its signed `stop`), hold one chain
/// per audited worker, and exactly one `key_use` record of a successful
/// `C_Sign` per signature made; no `lost` record.
fn check_audit_log(env: &BenchEnv, tally: &Tally) -> String {
    let path = env.audit_file();
    let pem = std::fs::read_to_string(env.audit_public_key())
        .unwrap_or_else(|e| die(format_args!("cannot read the audit public key: {e}")));
    let key = VerifyKey::from_public_pem(&pem)
        .unwrap_or_else(|e| die(format_args!("the audit public key: {e}")));
    let report = p11shim_audit::verify(std::slice::from_ref(&path), &key)
        .unwrap_or_else(|e| die(format_args!("verifying {}: {e}", path.display())));
    if let Some(b) = &report.broken {
        die(format_args!("the audit log does not verify: {b}"));
    }
    if !report.warnings.is_empty() {
        die(format_args!(
            "the audit log verifies with warnings: {}",
            report.warnings.join("; ")
        ));
    }
    let chains = report.chains.len() as u64;
    if chains != tally.processes {
        die(format_args!(
            "the audit log holds {chains} chains, expected one per audited worker ({})",
            tally.processes
        ));
    }
    if let Some(c) = report
        .chains
        .iter()
        .find(|c| !c.terminated || c.verified == 0)
    {
        die(format_args!(
            "audit chain {} is not terminated by a verified checkpoint ({c:?})",
            c.chain
        ));
    }
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| die(format_args!("cannot read {}: {e}", path.display())));
    // `lost` records count the records a full queue dropped (a fail-closed
    // log admits a call at its `*Init`; its record at the end can still
    // meet a full queue when the callers outrun the sink).
    let (mut signs, mut lost, mut denials) = (0u64, 0u64, 0u64);
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| die(format_args!("audit line is not JSON ({e}): {line}")));
        match v["kind"].as_str() {
            Some("key_use") if v["function"] == "C_Sign" && v["result"] == "CKR_OK" => signs += 1,
            Some("lost") => {
                lost += v["detail"]
                    .as_str()
                    .and_then(|d| d.strip_suffix(" records lost"))
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or_else(|| {
                        die(format_args!("a `lost` record without its count: {line}"))
                    });
            }
            Some("denial") => denials += 1,
            _ => {}
        }
    }
    if signs + lost != tally.signs {
        die(format_args!(
            "the audit log holds {signs} key_use records of C_Sign and `lost` records counting {lost}; the workers made {} signatures ({} refused)",
            tally.signs, tally.refused
        ));
    }
    let verified: u64 = report.chains.iter().map(|c| c.verified).sum();
    format!(
        "Audit log {}: verifies with the Ed25519 public key ({} lines, {chains} chains each ended by its stop, {verified} signed checkpoints verified); {} key_use records of C_Sign of {} signatures made by the audited workers, with {} more counted by `lost` records; {denials} denial records (the ACL probe's).",
        path.display(),
        thousands(report.records),
        thousands(signs),
        thousands(tally.signs),
        thousands(lost),
    )
}

// --- Targets -----------------------------------------------------------------

fn print_targets(
    counted: Option<&Counted>,
    timed: Option<&[TimedRow]>,
    sustained: Option<&[SustainedRow]>,
) {
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    if let Some(c) = counted {
        let added = c.added();
        println!(
            "Instructions added by ACL + audit on the caller's thread per signature <= {TARGET_ADDED:.0}: {} ({added:.0}; the writer thread spends {} per record off the caller's path).",
            verdict(added <= TARGET_ADDED),
            c.by_target[2].writer.map_or("?".to_string(), int)
        );
    }
    if let Some(rows) = timed {
        for r in rows.iter().filter(|r| r.case == Case::RsaSign) {
            let ratio = r.ratio(2, 0);
            let (lo, hi) = range(&r.ratios(2, 0));
            println!(
                "RSA-2048 throughput with ACL + audit >= {TARGET_RATIO} x SoftHSM2, {} thread(s): {} ({ratio:.3}, rounds {lo:.2}-{hi:.2}; median-latency speed ratio {:.3}).",
                r.threads,
                verdict(ratio >= TARGET_RATIO),
                r.p50_ratio(2, 0)
            );
        }
    }
    if let Some(rows) = sustained {
        // The target: a paced rate of at least TARGET_RATE, kept (within
        // 2%), with nothing lost or refused.
        let paced = rows
            .iter()
            .filter(|r| r.offered.is_some_and(|o| o >= TARGET_RATE))
            .max_by(|a, b| a.audited_rate().total_cmp(&b.audited_rate()));
        let kept = |r: &SustainedRow| {
            r.offered
                .is_some_and(|o| r.audited_rate() >= 0.98 * o && r.clean())
        };
        let best_kept = rows
            .iter()
            .filter(|r| kept(r))
            .max_by(|a, b| a.audited_rate().total_cmp(&b.audited_rate()));
        match (best_kept, paced) {
            (Some(b), _) => println!(
                "Sustained audit rate >= {} records/s, 0 lost, callers not blocked: met ({} offered on {} thread(s), {} records/s kept; lost 0, refused 0; p99 {} µs audited against {} µs without).",
                ops(TARGET_RATE),
                b.offered_text(),
                b.threads,
                ops(b.audited_rate()),
                us(b.hist(true).quantile(0.99)),
                us(b.hist(false).quantile(0.99)),
            ),
            (None, Some(p)) => println!(
                "Sustained audit rate >= {} records/s, 0 lost, callers not blocked: NOT met ({} offered on {} thread(s): {} records/s, lost {}, refused {}).",
                ops(TARGET_RATE),
                p.offered_text(),
                p.threads,
                ops(p.audited_rate()),
                p.lost(),
                p.refused()
            ),
            (None, None) => println!(
                "Sustained audit rate >= {} records/s: not measured (no paced run offered that rate).",
                ops(TARGET_RATE)
            ),
        }
        for r in rows.iter().filter(|r| r.offered.is_none() && !r.clean()) {
            println!(
                "  As fast as {} caller thread(s) go ({} records/s): {} refused by the fail-closed log and {} lost while the sink fell behind.",
                r.threads,
                ops(r.audited_rate()),
                r.refused(),
                r.lost()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_takes_every_place() {
        let mut first = [0; 3];
        let mut last = [0; 3];
        for r in 0..6 {
            let o = order(&[0usize, 1, 2], r);
            let mut sorted = o.clone();
            sorted.sort();
            assert_eq!(sorted, [0, 1, 2], "round {r}: {o:?}");
            first[o[0]] += 1;
            last[o[2]] += 1;
        }
        assert_eq!(first, [2, 2, 2]);
        assert_eq!(last, [2, 2, 2]);
        assert_eq!(order(&[false, true], 0), [false, true]);
        assert_eq!(order(&[false, true], 1), [true, false]);
    }

    #[test]
    fn thread_files_are_told_apart_by_their_functions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, body: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, body).expect("write");
            p
        };
        let main = write("x.out-01", "fn=(1) main\ncfn=(2) C_Initialize\n");
        let writer = write(
            "x.out-02",
            "fn=(7) p11shim_audit::auditor::Writer::run\ncfn=(8) sha2::sha256::compress256\n",
        );
        let caller = write(
            "x.out-03",
            "fn=(3) p11shim_bench::worker::Ctx::sign\ncfn=(4) C_SignInit\ncfn=(5) C_Sign\nfn=(5)\n",
        );
        let t = classify(&[main.clone(), writer.clone(), caller.clone()]);
        assert_eq!(t.caller.as_deref(), Some(caller.as_path()));
        assert_eq!(t.writer.as_deref(), Some(writer.as_path()));
        // C_SignInit alone, or a name that merely starts with C_Sign, is not
        // the signing thread.
        let other = write("y.out-01", "fn=(1) C_SignInit\ncfn=(2) C_SignFinal\n");
        assert_eq!(classify(&[other]).caller, None);
    }

    #[test]
    fn worker_reports_are_read_whole() {
        let r = parse_run(
            "noise\nRESULT ops=10 all=12 refused=1 rate=100.5 hist=3:10 audit_written=12 audit_lost=0 audit_queued=0 audit_healthy=true audit_checkpoints=1 audit_writer_cpu_ns=4000\n",
            true,
        );
        assert_eq!((r.ops, r.all, r.refused), (10, 12, 1));
        assert!((r.rate - 100.5).abs() < 1e-9);
        let a = r.audit.expect("audit counters");
        assert_eq!((a.written, a.lost, a.queued, a.healthy), (12, 0, 0, true));
        assert_eq!(a.writer_cpu_ns, Some(4000));
        assert!(
            parse_run("RESULT ops=3 all=3 refused=0\n", false)
                .audit
                .is_none()
        );
    }
}
