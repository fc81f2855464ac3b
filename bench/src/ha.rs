//! The HA benchmarks (`p11shim-bench --ha`): failover latency (a member
//! returning errors, a member that hangs), scaling over latency-bound
//! members, and the cost of a healthy multi-member slot.
//!
//! The parent creates three SoftHSM2 tokens `ha-a`, `ha-b`, `ha-c` holding
//! the same keys (an RSA-2048 and an EC P-256 key pair imported with
//! `softhsm2-util --import`, and an HMAC key created with the same value on
//! each), one copy of the fault-injecting module (`tests/faultmod`) per
//! member, and p11shim configurations over 1, 2 or 3 of those members (and
//! variants: standby members, `call_timeout_ms`). Faults and latency are
//! set through each copy's control file. Every measurement runs in a worker
//! child process (`ha_worker`): SoftHSM2 and p11shim are singletons per
//! process. See docs/performance.md, "HA slots".

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::env::{exe, result_field, shim_lib, softhsm_lib};
use crate::ha_worker::{EC_ID, EC_LABEL, Fault, HaOp, RSA_ID, RSA_LABEL, SLOT_LABEL, set_rules};
use crate::p11::die;
use crate::stats::Histogram;
use crate::timing::{thousands, us};
use crate::worker::{SO_PIN, USER_PIN};

/// Member tokens (and fault-module copies), in configuration order.
const MEMBERS: [&str; 3] = ["ha-a", "ha-b", "ha-c"];
/// p99 failover latency target.
const FAILOVER_TARGET_MS: f64 = 50.0;
/// Scaling target: N members give at least this share of N x one member.
const SCALING_TARGET: f64 = 0.9;
/// A healthy 3-member slot may be at most this much slower than 1 member.
const COST_TARGET: f64 = 0.95;

/// Which HA measurements to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Failover,
    Scaling,
    Cost,
}

impl Part {
    pub const ALL: [Part; 3] = [Part::Failover, Part::Scaling, Part::Cost];

    pub fn parse(s: &str) -> Option<Part> {
        match s {
            "failover" => Some(Part::Failover),
            "scaling" => Some(Part::Scaling),
            "cost" => Some(Part::Cost),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct HaOpts {
    pub parts: Vec<Part>,
    /// Failover: repetitions, sessions per member, the operation, and how
    /// long the sessions sign before the fault.
    pub reps: usize,
    pub per_member: usize,
    pub failover_op: HaOp,
    pub warm: Duration,
    /// One failover run per pause between a session's operations.
    pub think: Vec<Duration>,
    /// Hung members: repetitions (with the first pause of `think`), and the
    /// slot's `call_timeout_ms`.
    pub hang_reps: usize,
    pub deadline_ms: u64,
    /// Scaling: threads, added latency per call, measured time, rounds.
    pub scaling_threads: usize,
    pub latency_ms: u64,
    pub scaling_secs: Duration,
    pub scaling_warmup: Duration,
    pub scaling_rounds: usize,
    /// Cost: measured time per round and target, warm-up, rounds, and the
    /// `call_timeout_ms` of the configuration with deadlines.
    pub cost_secs: Duration,
    pub cost_warmup: Duration,
    pub cost_rounds: usize,
    pub cost_deadline_ms: u64,
    /// Keep the temporary directory.
    pub keep: bool,
}

impl HaOpts {
    pub fn new(quick: bool) -> HaOpts {
        HaOpts {
            parts: Part::ALL.to_vec(),
            reps: if quick { 50 } else { 200 },
            per_member: 2,
            failover_op: HaOp::Ecdsa,
            warm: Duration::from_millis(5),
            think: vec![Duration::from_micros(500), Duration::ZERO],
            hang_reps: if quick { 30 } else { 100 },
            deadline_ms: 100,
            scaling_threads: 16,
            latency_ms: 2,
            scaling_secs: Duration::from_millis(if quick { 1000 } else { 2500 }),
            scaling_warmup: Duration::from_millis(300),
            scaling_rounds: if quick { 1 } else { 2 },
            cost_secs: Duration::from_millis(if quick { 300 } else { 600 }),
            cost_warmup: Duration::from_millis(if quick { 100 } else { 150 }),
            cost_rounds: if quick { 2 } else { 4 },
            cost_deadline_ms: 2000,
            keep: false,
        }
    }
}

/// The temporary directory of an HA run: tokens, fault-module copies,
/// configurations and p11shim's logs.
#[derive(Debug)]
struct HaEnv {
    dir: TempDir,
    /// The fault-module copy of each member.
    libs: Vec<PathBuf>,
}

/// The fault-injecting module (`P11FAULTMOD_LIB`, else the one built next
/// to this binary).
fn faultmod_lib() -> PathBuf {
    if let Some(p) = std::env::var_os("P11FAULTMOD_LIB") {
        return PathBuf::from(p);
    }
    let p = exe()
        .parent()
        .map(|d| d.join("libp11faultmod.so"))
        .unwrap_or_default();
    if !p.exists() {
        die(format_args!(
            "{} is missing: run `cargo build --release -p p11shim-faultmod` (make bench-ha does)",
            p.display()
        ));
    }
    p
}

fn tool(cmd: &mut Command, what: &str) {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| {
        die(format_args!(
            "{what}: cannot start {:?}: {e}",
            cmd.get_program()
        ))
    });
    if !out.status.success() {
        die(format_args!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
}

impl HaEnv {
    /// Creates the tokens, their keys, the fault-module copies and the
    /// configurations; with `opts.keep`, the directory is left in place
    /// (and named) at the end.
    fn create(opts: &HaOpts) -> HaEnv {
        let keep = opts.keep;
        let mut dir = tempfile::Builder::new()
            .prefix("p11shim-bench-ha-")
            .tempdir()
            .unwrap_or_else(|e| die(format_args!("cannot create a temporary directory: {e}")));
        if keep {
            dir.disable_cleanup(true);
            eprintln!(
                "Keeping {} (tokens, configurations, p11shim's logs)",
                dir.path().display()
            );
        } else {
            crate::p11::remove_on_abort(dir.path());
        }
        let p = dir.path();
        std::fs::create_dir_all(p.join("tokens"))
            .unwrap_or_else(|e| die(format_args!("cannot create the token directory: {e}")));
        write(
            &p.join("softhsm2.conf"),
            &format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                p.join("tokens").display()
            ),
        );
        let (rsa, ec) = (p.join("rsa.pem"), p.join("ec.pem"));
        tool(
            Command::new("openssl")
                .args([
                    "genpkey",
                    "-algorithm",
                    "RSA",
                    "-pkeyopt",
                    "rsa_keygen_bits:2048",
                    "-out",
                ])
                .arg(&rsa),
            "openssl genpkey (RSA-2048)",
        );
        tool(
            Command::new("openssl")
                .args([
                    "genpkey",
                    "-algorithm",
                    "EC",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-out",
                ])
                .arg(&ec),
            "openssl genpkey (EC P-256)",
        );
        let faultmod = faultmod_lib();
        let mut libs = Vec::new();
        for token in MEMBERS {
            let softhsm = |args: &[&str]| {
                let mut c = Command::new("softhsm2-util");
                c.env("SOFTHSM2_CONF", p.join("softhsm2.conf")).args(args);
                c
            };
            tool(
                &mut softhsm(&[
                    "--init-token",
                    "--free",
                    "--label",
                    token,
                    "--so-pin",
                    SO_PIN,
                    "--pin",
                    USER_PIN,
                ]),
                "softhsm2-util --init-token",
            );
            for (pem, label, id) in [(&rsa, RSA_LABEL, RSA_ID), (&ec, EC_LABEL, EC_ID)] {
                let mut c = softhsm(&["--import"]);
                c.arg(pem).args([
                    "--token", token, "--label", label, "--id", id, "--pin", USER_PIN,
                ]);
                tool(&mut c, "softhsm2-util --import");
            }
            let lib = p.join(format!("member-{token}.so"));
            std::fs::copy(&faultmod, &lib)
                .unwrap_or_else(|e| die(format_args!("cannot copy {}: {e}", faultmod.display())));
            libs.push(lib);
        }
        let env = HaEnv { dir, libs };
        env.set_all("");
        // The HMAC key, with the same value on every token.
        let mut setup = env.command(
            &softhsm_lib(),
            None,
            &["setup", "--tokens", &MEMBERS.join(",")],
        );
        let out = run_worker(&mut setup, "creating the HMAC keys", None);
        if result_field(&String::from_utf8_lossy(&out.stdout), "setup") != Some("ok") {
            die("the HA setup worker did not report success");
        }
        for n in 1..=MEMBERS.len() {
            env.write_config(&format!("load-{n}.toml"), n, "warn", "load.log", "");
        }
        env.write_config_standby(
            &format!("load-{}s.toml", MEMBERS.len()),
            MEMBERS.len(),
            "warn",
            "load.log",
        );
        let recovery = "recovery_interval_ms = 10\nrecovery_max_interval_ms = 40\n";
        env.write_config(
            "failover.toml",
            MEMBERS.len(),
            "info",
            "failover.log",
            recovery,
        );
        env.write_config(
            "failover-hang.toml",
            MEMBERS.len(),
            "info",
            "failover.log",
            &format!("{recovery}call_timeout_ms = {}\n", opts.deadline_ms),
        );
        env.write_config(
            &format!("load-{}t.toml", MEMBERS.len()),
            MEMBERS.len(),
            "warn",
            "load.log",
            &format!("call_timeout_ms = {}\n", opts.cost_deadline_ms),
        );
        env
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A one-slot configuration over the first `n` members, all active.
    fn write_config(&self, name: &str, n: usize, level: &str, log: &str, extra: &str) {
        self.config_text(name, n, level, log, extra, false);
    }

    /// As [`HaEnv::write_config`], every member but the first on standby.
    fn write_config_standby(&self, name: &str, n: usize, level: &str, log: &str) {
        self.config_text(name, n, level, log, "", true);
    }

    fn config_text(
        &self,
        name: &str,
        n: usize,
        level: &str,
        log: &str,
        extra: &str,
        standby: bool,
    ) {
        let mut toml = format!(
            "[log]\nlevel = \"{level}\"\nfile = \"{}\"\n\n[[slot]]\nid = 0\nlabel = \"{SLOT_LABEL}\"\n{extra}",
            self.path().join(log).display()
        );
        for (i, (lib, token)) in self.libs.iter().zip(MEMBERS).take(n).enumerate() {
            toml.push_str(&format!(
                "\n[[slot.member]]\nlibrary = \"{}\"\ntoken = \"{token}\"\n",
                lib.display()
            ));
            if standby && i > 0 {
                toml.push_str("standby = true\n");
            }
        }
        write(&self.path().join(name), &toml);
    }

    fn ctl(&self, member: usize) -> PathBuf {
        let mut p = self.libs[member].as_os_str().to_owned();
        p.push(".ctl");
        PathBuf::from(p)
    }

    /// The same fault rules for every member.
    fn set_all(&self, rules: &str) {
        for i in 0..self.libs.len() {
            set_rules(&self.ctl(i), rules);
        }
    }

    /// `p11shim-bench --ha-worker <args> --lib <module>`, with the
    /// environment of the run; `config` is p11shim's configuration.
    fn command(&self, lib: &Path, config: Option<&str>, args: &[&str]) -> Command {
        let mut c = Command::new(exe());
        c.arg("--ha-worker").args(args).arg("--lib").arg(lib);
        c.env("SOFTHSM2_CONF", self.path().join("softhsm2.conf"))
            .env("P11FAULT_TARGET", softhsm_lib())
            .env_remove("P11SHIM_LOG");
        if let Some(config) = config {
            c.env("P11SHIM_CONFIG", self.path().join(config));
        }
        c
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path().join(name)).unwrap_or_default()
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text)
        .unwrap_or_else(|e| die(format_args!("cannot write {}: {e}", path.display())));
}

/// Runs a worker; a failure ends the run with its stderr and the last lines
/// of p11shim's log (`log`).
fn run_worker(cmd: &mut Command, what: &str, log: Option<(&HaEnv, &str)>) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| die(format_args!("{what}: cannot start the worker: {e}")));
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        eprintln!("{}", stderr.trim_end());
        if let Some((env, name)) = log {
            let text = env.log(name);
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!("--- last {} lines of p11shim's log ({name}):", tail.len());
            for l in tail {
                eprintln!("{l}");
            }
            eprintln!("---");
        }
        die(format_args!("{what} failed ({})", out.status));
    }
    if !stderr.trim().is_empty() {
        eprint!("{stderr}");
    }
    out
}

fn field<T: std::str::FromStr>(stdout: &str, key: &str) -> T {
    result_field(stdout, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| die(format_args!("worker report without {key}: {stdout:?}")))
}

fn hist(stdout: &str, key: &str) -> Histogram {
    result_field(stdout, key)
        .and_then(Histogram::decode)
        .unwrap_or_else(|| die(format_args!("worker report without {key}: {stdout:?}")))
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

fn ms(nanos: u64) -> String {
    let v = nanos as f64 / 1e6;
    if v < 1.0 {
        format!("{v:.3}")
    } else if v < 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.1}")
    }
}

/// A load measurement: `threads` sessions signing on a slot of `n` members.
#[derive(Debug, Clone)]
struct Load {
    rate: f64,
    hist: Histogram,
    /// Sessions per member while the threads ran (with the base session).
    sessions: String,
}

fn measure_load(
    env: &HaEnv,
    config: &str,
    op: HaOp,
    threads: usize,
    secs: Duration,
    warmup: Duration,
    one_by_one: bool,
) -> Load {
    let config = format!("{config}.toml");
    let (th, s, w) = (
        threads.to_string(),
        secs.as_secs_f64().to_string(),
        warmup.as_secs_f64().to_string(),
    );
    let mut args = vec![
        "load",
        "--case",
        op.name(),
        "--threads",
        &th,
        "--secs",
        &s,
        "--warmup",
        &w,
    ];
    if one_by_one {
        args.push("--one-by-one");
    }
    let mut cmd = env.command(&shim_lib(), Some(&config), &args);
    let what = format!(
        "{} on {threads} thread(s), configuration {config}",
        op.title()
    );
    let out = run_worker(&mut cmd, &what, Some((env, "load.log")));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ops: u64 = field(&stdout, "ops");
    if ops == 0 {
        die(format_args!("{what}: no operation in {secs:?}"));
    }
    Load {
        rate: field(&stdout, "rate"),
        hist: hist(&stdout, "hist"),
        sessions: field(&stdout, "sessions"),
    }
}

// --- Failover -----------------------------------------------------------------

#[derive(Debug)]
struct FailoverResult {
    fault: Fault,
    think: Duration,
    reps: usize,
    members: usize,
    secs: f64,
    ops: u64,
    /// Sessions on the member that failed, and on the others.
    affected: Sessions,
    others: Sessions,
    /// From p11shim's log: members marked down, sessions moved, recoveries,
    /// calls abandoned, and other warnings.
    down: usize,
    moved: usize,
    recovered: usize,
    abandoned: usize,
    warnings: Vec<String>,
}

#[derive(Debug)]
struct Sessions {
    n: u64,
    from_t0: Histogram,
    held: Histogram,
    max_from_t0: u64,
    max_held: u64,
}

impl Sessions {
    /// A quantile is the middle of its histogram bucket: never above the max.
    fn p99_from_t0(&self) -> u64 {
        self.from_t0.quantile(0.99).min(self.max_from_t0)
    }
}

fn sessions(stdout: &str, prefix: &str) -> Sessions {
    Sessions {
        n: field(stdout, &format!("{prefix}_n")),
        from_t0: hist(stdout, &format!("{prefix}_t0")),
        held: hist(stdout, &format!("{prefix}_held")),
        max_from_t0: field(stdout, &format!("{prefix}_t0_max")),
        max_held: field(stdout, &format!("{prefix}_held_max")),
    }
}

fn run_failover(env: &HaEnv, opts: &HaOpts, think: Duration, fault: Fault) -> FailoverResult {
    env.set_all("");
    // A fresh log for each run.
    write(&env.path().join("failover.log"), "");
    let reps = match fault {
        Fault::Error => opts.reps,
        Fault::Hang => opts.hang_reps,
    };
    let config = match fault {
        Fault::Error => "failover.toml",
        Fault::Hang => "failover-hang.toml",
    };
    let (reps_s, per) = (reps.to_string(), opts.per_member.to_string());
    let (warm, pause) = (
        opts.warm.as_secs_f64().to_string(),
        think.as_secs_f64().to_string(),
    );
    let mut cmd = env.command(
        &shim_lib(),
        Some(config),
        &[
            "failover",
            "--case",
            opts.failover_op.name(),
            "--fault",
            fault.name(),
            "--reps",
            &reps_s,
            "--per-member",
            &per,
            "--warmup",
            &warm,
            "--think",
            &pause,
        ],
    );
    let out = run_worker(
        &mut cmd,
        &format!("the failover benchmark ({})", fault.rule()),
        Some((env, "failover.log")),
    );
    env.set_all("");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let log = env.log("failover.log");
    let count = |s: &str| log.lines().filter(|l| l.contains(s)).count();
    let warnings = log
        .lines()
        .filter(|l| matches!(l.split_whitespace().nth(1), Some("WARN" | "ERROR")))
        .filter(|l| !l.contains("member marked down") && !l.contains("call abandoned"))
        .map(str::to_string)
        .collect();
    FailoverResult {
        fault,
        think,
        reps: field(&stdout, "reps"),
        members: field(&stdout, "members"),
        secs: field(&stdout, "secs"),
        ops: field(&stdout, "ops"),
        affected: sessions(&stdout, "aff"),
        others: sessions(&stdout, "oth"),
        down: count("member marked down"),
        moved: count("session moved"),
        recovered: count("member recovered"),
        abandoned: count("call abandoned"),
        warnings,
    }
}

fn load_name(think: Duration) -> String {
    if think.is_zero() {
        "back to back".to_string()
    } else {
        format!("{} ms pause", ms(think.as_nanos() as u64))
    }
}

fn failure_name(fault: Fault, opts: &HaOpts) -> String {
    match fault {
        Fault::Error => "CKR_DEVICE_ERROR".to_string(),
        Fault::Hang => format!("hang, deadline {} ms", opts.deadline_ms),
    }
}

fn print_failover(results: &[FailoverResult], opts: &HaOpts, markdown: bool) {
    for r in results {
        println!(
            "Failover ({}), sessions signing {}: {} repetitions, {} members, {} sessions per member ({}), {} signatures in {:.1} s; p11shim's log: {} member(s) marked down, {} session(s) moved, {} recovery(ies), {} call(s) abandoned, {} other warning(s)",
            failure_name(r.fault, opts),
            load_name(r.think),
            r.reps,
            r.members,
            opts.per_member,
            opts.failover_op.title(),
            thousands(r.ops),
            r.secs,
            r.down,
            r.moved,
            r.recovered,
            r.abandoned,
            r.warnings.len()
        );
        for w in r.warnings.iter().take(5) {
            println!("  {w}");
        }
    }
    println!();
    let q = |h: &Histogram, p: f64, max: u64| ms(h.quantile(p).min(max));
    if markdown {
        println!(
            "| Failure | Sessions signing | Sessions | Measured | Samples | p50 ms | p99 ms | max ms |"
        );
        println!("|---|---|---|---|--:|--:|--:|--:|");
    } else {
        println!(
            "{:<24} {:<15} {:<21} {:<19} {:>7} {:>8} {:>8} {:>8}",
            "failure", "signing", "sessions", "measured", "samples", "p50 ms", "p99 ms", "max ms"
        );
    }
    for r in results {
        for (who, s) in [
            ("on the failed member", &r.affected),
            ("on the other members", &r.others),
        ] {
            for (what, h, max) in [
                ("T0 to next success", &s.from_t0, s.max_from_t0),
                ("longest operation", &s.held, s.max_held),
            ] {
                let cells = (
                    failure_name(r.fault, opts),
                    load_name(r.think),
                    q(h, 0.5, max),
                    q(h, 0.99, max),
                    ms(max),
                );
                if markdown {
                    println!(
                        "| {} | {} | {who} | {what} | {} | {} | {} | {} |",
                        cells.0, cells.1, s.n, cells.2, cells.3, cells.4
                    );
                } else {
                    println!(
                        "{:<24} {:<15} {who:<21} {what:<19} {:>7} {:>8} {:>8} {:>8}",
                        cells.0, cells.1, s.n, cells.2, cells.3, cells.4
                    );
                }
            }
        }
    }
    println!();
    for r in results {
        let p99 = r.affected.p99_from_t0() as f64 / 1e6;
        match r.fault {
            Fault::Error => println!(
                "Failover target (p99 from T0 to the next success < {FAILOVER_TARGET_MS} ms, member returning CKR_DEVICE_ERROR), sessions signing {}: {} ({p99:.2} ms)",
                load_name(r.think),
                if p99 < FAILOVER_TARGET_MS {
                    "met"
                } else {
                    "NOT met"
                }
            ),
            Fault::Hang => println!(
                "Hung member, call_timeout_ms = {}, sessions signing {}: p99 from T0 to the next success {p99:.2} ms, {:.2} ms past the deadline",
                opts.deadline_ms,
                load_name(r.think),
                p99 - opts.deadline_ms as f64
            ),
        }
    }
}

// --- Scaling ------------------------------------------------------------------

fn opening(one_by_one: bool) -> &'static str {
    if one_by_one {
        "one after another"
    } else {
        "by the threads, at once"
    }
}

fn run_scaling(env: &HaEnv, opts: &HaOpts, markdown: bool) {
    env.set_all(&format!("latency {}ms\nserial\n", opts.latency_ms));
    // (members, sessions opened one by one): the threads open their own
    // sessions at the same time, as an application's pool does; with 2 and
    // 3 members, also with the sessions opened one after another.
    let configs: Vec<(usize, bool)> = (1..=MEMBERS.len())
        .map(|n| (n, false))
        .chain((2..=MEMBERS.len()).map(|n| (n, true)))
        .collect();
    let mut loads: Vec<Vec<Load>> = vec![Vec::new(); configs.len()];
    for round in 0..opts.scaling_rounds {
        // Rotate the order, so that a change of the machine's speed weighs
        // on every configuration alike.
        for k in 0..configs.len() {
            let i = (k + round) % configs.len();
            let (n, one_by_one) = configs[i];
            let l = measure_load(
                env,
                &format!("load-{n}"),
                HaOp::Hmac,
                opts.scaling_threads,
                opts.scaling_secs,
                opts.scaling_warmup,
                one_by_one,
            );
            eprintln!(
                "  scaling, round {}: {n} member(s), sessions opened {}: {} ops/s (sessions per member {})",
                round + 1,
                opening(one_by_one),
                thousands(l.rate.round() as u64),
                l.sessions
            );
            loads[i].push(l);
        }
    }
    env.set_all("");
    let one = median(loads[0].iter().map(|l| l.rate).collect());
    // Each thread waits (2 calls x latency) per operation at least.
    let bound = opts.scaling_threads as f64 / (2.0 * opts.latency_ms.max(1) as f64 / 1000.0);
    println!(
        "Scaling: {} threads, each with its own session, {} (2 calls per operation), `latency {}ms` on every member; {} round(s) of {:.1} s",
        opts.scaling_threads,
        HaOp::Hmac.title(),
        opts.latency_ms,
        opts.scaling_rounds,
        opts.scaling_secs.as_secs_f64()
    );
    println!();
    if markdown {
        println!(
            "| Members | Sessions opened | Sessions per member | ops/s | ÷ (N × 1-member ops/s) | ÷ client bound ({}) | p50 ms | p99 ms |",
            thousands(bound as u64)
        );
        println!("|--:|---|---|--:|--:|--:|--:|--:|");
    } else {
        println!(
            "{:>7}  {:<24} {:<16} {:>8} {:>13} {:>14} {:>7} {:>7}",
            "members",
            "sessions opened",
            "sessions/member",
            "ops/s",
            "/(N x 1-mem)",
            "/client bound",
            "p50 ms",
            "p99 ms"
        );
    }
    let mut missed = Vec::new();
    for (i, &(n, one_by_one)) in configs.iter().enumerate() {
        let rate = median(loads[i].iter().map(|l| l.rate).collect());
        let mut h = Histogram::new();
        for l in &loads[i] {
            h.merge(&l.hist);
        }
        let ratio = rate / (n as f64 * one);
        if n > 1 && ratio < SCALING_TARGET {
            missed.push(format!(
                "{n} members, sessions opened {}: {ratio:.3}",
                opening(one_by_one)
            ));
        }
        // Where the sessions went, in every round.
        let mut placements: Vec<&str> = loads[i].iter().map(|l| l.sessions.as_str()).collect();
        placements.dedup();
        let sessions = placements.join(", ");
        if markdown {
            println!(
                "| {n} | {} | {sessions} | {} | {ratio:.3} | {:.3} | {} | {} |",
                opening(one_by_one),
                thousands(rate.round() as u64),
                rate / bound,
                ms(h.quantile(0.5)),
                ms(h.quantile(0.99))
            );
        } else {
            println!(
                "{n:>7}  {:<24} {sessions:<16} {:>8} {ratio:>13.3} {:>14.3} {:>7} {:>7}",
                opening(one_by_one),
                thousands(rate.round() as u64),
                rate / bound,
                ms(h.quantile(0.5)),
                ms(h.quantile(0.99))
            );
        }
    }
    println!();
    if missed.is_empty() {
        println!("Scaling target (>= {SCALING_TARGET} x N x one member): met.");
    } else {
        println!(
            "Scaling target (>= {SCALING_TARGET} x N x one member): NOT met ({}).",
            missed.join("; ")
        );
    }
    println!(
        "Sessions per member include the worker's base session. The fault module's latency sleeps in the calling thread and limits no member's concurrency: the {} threads, not the members, bound the throughput (client bound = threads / (2 calls x {} ms)).",
        opts.scaling_threads, opts.latency_ms
    );
}

// --- Cost of a healthy multi-member slot -----------------------------------------

/// One configuration of the cost comparison, measured in every round.
#[derive(Debug, Default)]
struct CostColumn {
    rates: Vec<f64>,
    /// Rate over the 1-member rate of the same round.
    ratios: Vec<f64>,
    hist: Histogram,
    sessions: Vec<String>,
}

impl CostColumn {
    fn rate(&self) -> f64 {
        median(self.rates.clone())
    }

    fn ratio(&self) -> f64 {
        median(self.ratios.clone())
    }

    fn placements(&self) -> String {
        let mut p = self.sessions.clone();
        p.sort();
        p.dedup();
        p.join(", ")
    }
}

fn run_cost(env: &HaEnv, opts: &HaOpts, markdown: bool) {
    env.set_all("");
    let big = MEMBERS.len();
    // (configuration, title, judged against the target).
    let configs = [
        ("load-1".to_string(), "1 member".to_string(), false),
        (format!("load-{big}"), format!("{big} members"), true),
        (
            format!("load-{big}s"),
            format!("{big} members, {} on standby", big - 1),
            true,
        ),
        (
            format!("load-{big}t"),
            format!("{big} members, call_timeout_ms = {}", opts.cost_deadline_ms),
            false,
        ),
    ];
    let mut rows = Vec::new();
    for op in [HaOp::Hmac, HaOp::Ecdsa, HaOp::Rsa] {
        for threads in [1usize, 2] {
            let mut cols: Vec<CostColumn> =
                (0..configs.len()).map(|_| CostColumn::default()).collect();
            for round in 0..opts.cost_rounds {
                // Rotate the order, so that a change of the machine's speed
                // weighs on every configuration alike.
                let mut rates = vec![0.0; configs.len()];
                for k in 0..configs.len() {
                    let i = (k + round) % configs.len();
                    let l = measure_load(
                        env,
                        &configs[i].0,
                        op,
                        threads,
                        opts.cost_secs,
                        opts.cost_warmup,
                        false,
                    );
                    rates[i] = l.rate;
                    cols[i].hist.merge(&l.hist);
                    cols[i].sessions.push(l.sessions);
                }
                for (i, c) in cols.iter_mut().enumerate() {
                    c.rates.push(rates[i]);
                    c.ratios.push(if rates[0] > 0.0 {
                        rates[i] / rates[0]
                    } else {
                        0.0
                    });
                }
            }
            let line: Vec<String> = configs
                .iter()
                .zip(&cols)
                .map(|((_, title, _), c)| {
                    format!(
                        "{title} {}/s ({:.3})",
                        thousands(c.rate().round() as u64),
                        c.ratio()
                    )
                })
                .collect();
            eprintln!("  {:<36} {threads} thr  {}", op.title(), line.join("  "));
            rows.push((op, threads, cols));
        }
    }
    println!(
        "Cost of a healthy {big}-member slot against a 1-member slot (all through the fault module, no fault, no added latency); {} rounds of {:.2} s, rotating the order; ratio: median of the rounds' ratios to the 1-member run of the same round (range)",
        opts.cost_rounds,
        opts.cost_secs.as_secs_f64()
    );
    println!();
    if markdown {
        println!(
            "| Operation | Threads | Slot | Sessions per member | ops/s | ÷ 1 member (range) | p50 µs | p99 µs |"
        );
        println!("|---|--:|---|---|--:|--:|--:|--:|");
    } else {
        println!(
            "{:<36} {:>3}  {:<38} {:<14} {:>8} {:>20} {:>8} {:>8}",
            "operation", "thr", "slot", "sessions", "ops/s", "ratio (range)", "p50 µs", "p99 µs"
        );
    }
    let mut missed = Vec::new();
    for (op, threads, cols) in &rows {
        for ((_, title, judged), c) in configs.iter().zip(cols) {
            let (lo, hi) = range(&c.ratios);
            let ratio = if c.sessions.is_empty() {
                String::new()
            } else if title == "1 member" {
                "1".to_string()
            } else {
                format!("{:.3} ({lo:.3}–{hi:.3})", c.ratio())
            };
            if *judged && c.ratio() < COST_TARGET {
                missed.push(format!(
                    "{} on {threads} thread(s), {title}: {:.3}",
                    op.title(),
                    c.ratio()
                ));
            }
            let cells = (
                thousands(c.rate().round() as u64),
                us(c.hist.quantile(0.5)),
                us(c.hist.quantile(0.99)),
            );
            if markdown {
                println!(
                    "| {} | {threads} | {title} | {} | {} | {ratio} | {} | {} |",
                    op.title(),
                    c.placements(),
                    cells.0,
                    cells.1,
                    cells.2
                );
            } else {
                println!(
                    "{:<36} {threads:>3}  {title:<38} {:<14} {:>8} {:>20} {:>8} {:>8}",
                    op.title(),
                    c.placements(),
                    cells.0,
                    ratio.replace('–', "-"),
                    cells.1,
                    cells.2
                );
            }
        }
    }
    println!();
    let judged: Vec<&str> = configs
        .iter()
        .filter(|c| c.2)
        .map(|c| c.1.as_str())
        .collect();
    if missed.is_empty() {
        println!(
            "Cost target ({} >= {COST_TARGET} x 1 member): met.",
            judged.join(" and ")
        );
    } else {
        println!(
            "Cost target ({} >= {COST_TARGET} x 1 member): NOT met:",
            judged.join(" and ")
        );
        for m in missed {
            println!("  - {m}");
        }
    }
}

/// `p11shim-bench --ha`.
pub fn run(opts: &HaOpts, markdown: bool) {
    eprintln!(
        "Creating {} tokens with the same keys (RSA-2048, EC P-256, HMAC), one fault-module copy per member...",
        MEMBERS.len()
    );
    let env = HaEnv::create(opts);
    if opts.parts.contains(&Part::Failover) {
        let mut results = Vec::new();
        let runs = opts
            .think
            .iter()
            .map(|&t| (Fault::Error, t, opts.reps))
            .chain(
                opts.think
                    .first()
                    .map(|&t| (Fault::Hang, t, opts.hang_reps)),
            );
        for (fault, think, reps) in runs {
            eprintln!(
                "Failover ({}): {reps} repetitions, {} sessions per member signing {}...",
                fault.rule(),
                opts.per_member,
                load_name(think)
            );
            results.push(run_failover(&env, opts, think, fault));
        }
        println!();
        print_failover(&results, opts, markdown);
    }
    if opts.parts.contains(&Part::Scaling) {
        eprintln!(
            "Scaling: {} threads, latency {} ms per call, 1 to {} members...",
            opts.scaling_threads,
            opts.latency_ms,
            MEMBERS.len()
        );
        println!();
        run_scaling(&env, opts, markdown);
    }
    if opts.parts.contains(&Part::Cost) {
        eprintln!("Cost: 1 against {} healthy members...", MEMBERS.len());
        println!();
        run_cost(&env, opts, markdown);
    }
    let warnings: Vec<String> = env.log("load.log").lines().map(str::to_string).collect();
    if !warnings.is_empty() {
        println!();
        println!("p11shim logged during the load runs (no fault was injected in them):");
        for w in warnings.iter().take(20) {
            println!("  {w}");
        }
    }
}

/// Arguments of an HA worker: `--ha-worker <job> [options] --lib <module>`.
pub fn parse_worker(args: &[String]) -> crate::ha_worker::HaWorkerArgs {
    use crate::ha_worker::{FailoverPlan, HaJob, HaWorkerArgs};
    use crate::worker::Plan;
    let job = args.get(1).map(String::as_str).unwrap_or("");
    let mut lib = None;
    let (mut op, mut threads, mut secs, mut warmup) = (HaOp::Hmac, 1usize, None, 0.0f64);
    let (mut reps, mut per_member, mut tokens) = (1usize, 1usize, Vec::new());
    let (mut think, mut one_by_one, mut fault) = (0.0f64, false, Fault::Error);
    let mut i = 2;
    let value = |i: &mut usize| -> String {
        *i += 1;
        args.get(*i)
            .cloned()
            .unwrap_or_else(|| die(format_args!("HA worker: {} needs a value", args[*i - 1])))
    };
    let num = |s: String| -> f64 {
        s.parse()
            .unwrap_or_else(|_| die(format_args!("HA worker: not a number: {s:?}")))
    };
    while i < args.len() {
        match args[i].as_str() {
            "--lib" => lib = Some(PathBuf::from(value(&mut i))),
            "--case" => {
                let v = value(&mut i);
                op = HaOp::parse(&v)
                    .unwrap_or_else(|| die(format_args!("HA worker: unknown case {v:?}")))
            }
            "--threads" => threads = num(value(&mut i)) as usize,
            "--secs" => secs = Some(num(value(&mut i))),
            "--warmup" => warmup = num(value(&mut i)),
            "--reps" => reps = num(value(&mut i)) as usize,
            "--per-member" => per_member = num(value(&mut i)) as usize,
            "--think" => think = num(value(&mut i)),
            "--one-by-one" => one_by_one = true,
            "--fault" => {
                let v = value(&mut i);
                fault = Fault::parse(&v)
                    .unwrap_or_else(|| die(format_args!("HA worker: unknown fault {v:?}")))
            }
            "--tokens" => tokens = value(&mut i).split(',').map(str::to_string).collect(),
            a => die(format_args!("HA worker: unknown argument {a:?}")),
        }
        i += 1;
    }
    let lib = lib.unwrap_or_else(|| die("HA worker: --lib is required"));
    let warmup = Duration::from_secs_f64(warmup.max(0.0));
    let job = match job {
        "setup" => HaJob::Setup { tokens },
        "load" => HaJob::Load {
            op,
            threads: threads.max(1),
            plan: Plan::Timed {
                warmup,
                measure: Duration::from_secs_f64(
                    secs.unwrap_or_else(|| die("HA worker: load needs --secs")),
                ),
                rate: None,
            },
            one_by_one,
        },
        "failover" => HaJob::Failover(FailoverPlan {
            op,
            reps: reps.max(1),
            per_member: per_member.max(1),
            warm: warmup,
            think: Duration::from_secs_f64(think.max(0.0)),
            fault,
        }),
        other => die(format_args!("HA worker: unknown job {other:?}")),
    };
    HaWorkerArgs { lib, job }
}
