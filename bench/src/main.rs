//! p11shim-bench: what p11shim costs over calling SoftHSM2 directly.
//!
//! ```text
//! p11shim-bench [--quick] [--markdown]     timed comparison, 1 and 2 threads
//! p11shim-bench --callgrind [--markdown]   instructions per operation, also vs p11-kit
//! p11shim-bench --ha [--quick] [--markdown] HA slots: failover, scaling, cost
//! p11shim-bench --broker [--quick] [--markdown] the broker: requests/s, C_Initialize to first signature
//! p11shim-bench --acl [--quick] [--markdown] the key ACL and the audit record on the sign path
//! ```
//!
//! The parent process creates a temporary SoftHSM2 token with the keys and
//! objects, a p11shim configuration over it, and runs every measurement in
//! a worker child (`--worker <target> ...`): SoftHSM2 is a singleton per
//! process, and p11shim loads it itself, so each target gets a process of
//! its own. Workers call the modules' function lists directly, with no
//! wrapper in between. See docs/performance.md.

mod acl;
mod broker;
mod broker_worker;
mod callgrind;
mod env;
mod ha;
mod ha_worker;
mod p11;
mod stats;
mod timing;
mod worker;

use std::path::PathBuf;
use std::time::Duration;

use callgrind::CallgrindOpts;
use env::BenchEnv;
use p11::die;
use timing::TimingOpts;
use worker::{Case, Job, Plan, WorkerArgs};

const USAGE: &str = "\
usage: p11shim-bench [options]

Timed comparison of SoftHSM2 called directly and through p11shim
(ops/s, p50 and p99 latency, on 1 and 2 threads):
  --quick            a short run (about 20 s instead of about 1.5 minutes)
  --secs S           measured seconds per round and target (default 0.6)
  --rounds R         rounds per case, alternating the order (default 4)
  --threads 1,2      thread counts (default 1,2)
  --cases a,b,...    cases (default all: digest, rsa-sign, ecdsa-sign,
                     aes-gcm, find, session, get-attr)
  --markdown         print the tables as Markdown

Instruction counts under valgrind's callgrind, SoftHSM2 directly, through
p11shim and through p11-kit's proxy:
  --callgrind        count instead of timing (cases: digest, session)
  --iters N          the runs do N and 2N operations (default 2000)
  --out DIR          keep callgrind's files there (default target/callgrind)

HA slots, three SoftHSM2 tokens behind one copy each of the fault-injecting
module (tests/faultmod), about 2 minutes:
  --ha               failover latency (a member returning errors, a member
                     that hangs), scaling over members with 2 ms of latency
                     per call, and a healthy 3-member slot against a
                     1-member slot (--quick: about 35 s)
  --ha-parts a,b,c   only some of them: failover, scaling, cost
  --reps N           failover repetitions, member returning errors (200)
  --hang-reps N      failover repetitions, member hanging (100)
  --per-member K     failover: signing sessions per member (default 2)
  --latency-ms L     scaling: latency added to every member call (default 2)
  --keep             keep the temporary directory (p11shim's logs are there)
  --secs S, --rounds R   measured seconds per run and rounds of the cost
                     comparison (default 0.6 and 4)
  --markdown         print the tables as Markdown

The credential broker (the release p11shim-broker binary), about 1 minute:
  --broker           verified requests per second (nonce re-authentication,
                     sealed answers) with SQLite and a throwaway PostgreSQL,
                     from 1 and 8 client threads; then C_Initialize to first
                     signature in fresh processes: SoftHSM2 with a PIN,
                     p11shim with a PIN, p11shim with the PIN from a warm
                     broker over HTTP and HTTPS (--quick: about 15 s)
  --stores a,b       sqlite, postgres (default both)
  --threads 1,8      client thread counts
  --secs S, --rounds R   measured seconds per round (default 3) and rounds
  --runs N           application starts per target (default 100; 0: none)
  --keep             keep the temporary directory (broker logs are there)

The key ACL and the audit record on the sign path (a third target: p11shim
with an [acl] role and an [audit] log signed with a fresh Ed25519 key; the
log must verify and hold one key_use record per signature), about 2 minutes:
  --acl              instructions per HMAC-SHA256 signature under callgrind
                     (caller thread, and the audit writer thread per record),
                     RSA-2048 and ECDSA P-256 signatures timed on 1 and 2
                     threads, and the sustained audit rate on 1, 2, 4 threads
                     (--quick: about 40 s)
  --acl-parts a,b,c  only some of them: callgrind, timing, sustained
  --iters N, --out DIR   as for --callgrind (default N: 2000)
  --secs S, --rounds R, --threads 1,2   timing, as above
  --sustain S        seconds per sustained run (default 3)

Environment: P11SHIM_LIB, SOFTHSM2_LIB, P11KIT_PROXY_LIB name the modules,
P11FAULTMOD_LIB the fault-injecting module, P11SHIM_BROKER_BIN the broker
(default: next to this program).
";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--worker") => {
            worker::run(parse_worker(&args));
            return;
        }
        Some("--ha-worker") => {
            ha_worker::run(ha::parse_worker(&args));
            return;
        }
        Some("--broker-worker") => {
            let (lib, login) = broker_worker::parse(&args);
            broker_worker::run(lib, login);
            return;
        }
        _ => {}
    }
    parent(&args);
}

fn value<'a>(args: &'a [String], i: &mut usize, flag: &str) -> &'a str {
    *i += 1;
    args.get(*i)
        .map(String::as_str)
        .unwrap_or_else(|| die(format_args!("{flag} needs a value\n\n{USAGE}")))
}

fn number<T: std::str::FromStr>(s: &str, flag: &str) -> T {
    s.parse()
        .unwrap_or_else(|_| die(format_args!("{flag}: not a number: {s:?}")))
}

fn secs(s: &str, flag: &str) -> Duration {
    let v: f64 = number(s, flag);
    if !(v.is_finite() && v > 0.0) {
        die(format_args!("{flag}: must be a positive number of seconds"));
    }
    Duration::from_secs_f64(v)
}

/// A comma-separated list of names, each parsed by `parse`; an unknown one
/// ends the program naming `what` it should have been.
fn list<T>(s: &str, what: &str, parse: impl Fn(&str) -> Option<T>) -> Vec<T> {
    s.split(',')
        .map(|n| {
            parse(n.trim()).unwrap_or_else(|| die(format_args!("unknown {what} {n:?}\n\n{USAGE}")))
        })
        .collect()
}

fn cases(s: &str) -> Vec<Case> {
    list(s, "case", Case::parse)
}

fn parse_worker(args: &[String]) -> WorkerArgs {
    let (mut target, mut lib, mut setup, mut list) = (None, None, false, false);
    let (mut probe, mut audit_status, mut rate) = (false, false, None);
    let (mut case, mut threads, mut count, mut measure, mut warmup) =
        (None, 1usize, None, None, Duration::ZERO);
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        match a {
            "--worker" => target = Some(value(args, &mut i, a).to_string()),
            "--lib" => lib = Some(PathBuf::from(value(args, &mut i, a))),
            "--setup" => setup = true,
            "--list-slots" => list = true,
            "--acl-probe" => probe = true,
            "--audit-status" => audit_status = true,
            "--case" => case = Some(cases(value(args, &mut i, a))[0]),
            "--threads" => threads = number(value(args, &mut i, a), a),
            "--count" => count = Some(number(value(args, &mut i, a), a)),
            "--secs" => measure = Some(secs(value(args, &mut i, a), a)),
            "--warmup" => warmup = Duration::from_secs_f64(number(value(args, &mut i, a), a)),
            "--rate" => rate = Some(number::<f64>(value(args, &mut i, a), a)),
            _ => die(format_args!("worker: unknown argument {a:?}")),
        }
        i += 1;
    }
    let target = target.unwrap_or_else(|| die("worker: --worker needs a target"));
    let lib = lib.unwrap_or_else(|| die("worker: --lib is required"));
    let job = if setup {
        Job::Setup
    } else if list {
        Job::ListSlots
    } else if probe {
        Job::AclProbe
    } else {
        let case = case.unwrap_or_else(|| die("worker: --case is required"));
        let plan = match (count, measure) {
            (Some(n), None) => Plan::Count(n),
            (None, Some(measure)) => Plan::Timed {
                warmup,
                measure,
                rate: rate.filter(|r| *r > 0.0),
            },
            _ => die("worker: exactly one of --count and --secs"),
        };
        if threads == 0 {
            die("worker: --threads must be at least 1");
        }
        Job::Run {
            case,
            threads,
            plan,
            audit_status,
        }
    };
    WorkerArgs { target, lib, job }
}

fn parent(args: &[String]) {
    let (mut quick, mut markdown, mut cg, mut ha_mode) = (false, false, false, false);
    let (mut ha_parts, mut reps, mut per_member, mut latency) = (None, None, None, None);
    let (mut keep, mut hang_reps) = (false, None);
    let (mut broker_mode, mut stores, mut runs, mut threads_given) = (false, None, None, false);
    let (mut measure, mut rounds, mut threads, mut chosen) = (None, None, vec![1usize, 2], None);
    let (mut iters, mut out_dir) = (None, None);
    let (mut acl_mode, mut acl_parts, mut sustain) = (false, None, None);
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        match a {
            "--quick" => quick = true,
            "--markdown" => markdown = true,
            "--callgrind" => cg = true,
            "--ha" => ha_mode = true,
            "--broker" => broker_mode = true,
            "--acl" => acl_mode = true,
            "--acl-parts" => {
                acl_parts = Some(list(value(args, &mut i, a), "--acl part", acl::Part::parse));
                acl_mode = true;
            }
            "--sustain" => sustain = Some(secs(value(args, &mut i, a), a)),
            "--stores" => {
                stores = Some(list(value(args, &mut i, a), "store", broker::Store::parse));
                broker_mode = true;
            }
            "--runs" => runs = Some(number::<usize>(value(args, &mut i, a), a)),
            "--ha-parts" => {
                ha_parts = Some(list(value(args, &mut i, a), "HA part", ha::Part::parse));
                ha_mode = true;
            }
            "--reps" => reps = Some(number::<usize>(value(args, &mut i, a), a).max(1)),
            "--per-member" => per_member = Some(number::<usize>(value(args, &mut i, a), a).max(1)),
            "--keep" => keep = true,
            "--hang-reps" => hang_reps = Some(number::<usize>(value(args, &mut i, a), a).max(1)),
            "--latency-ms" => latency = Some(number::<u64>(value(args, &mut i, a), a)),
            "--secs" => measure = Some(secs(value(args, &mut i, a), a)),
            "--rounds" => rounds = Some(number::<usize>(value(args, &mut i, a), a).max(1)),
            "--threads" => {
                threads = value(args, &mut i, a)
                    .split(',')
                    .map(|t| number::<usize>(t.trim(), a).max(1))
                    .collect();
                threads_given = true;
            }
            "--cases" => chosen = Some(cases(value(args, &mut i, a))),
            "--iters" => iters = Some(number::<u64>(value(args, &mut i, a), a).max(1)),
            "--out" => out_dir = Some(PathBuf::from(value(args, &mut i, a))),
            "-h" | "--help" => {
                print!("{USAGE}");
                return;
            }
            _ => die(format_args!("unknown argument {a:?}\n\n{USAGE}")),
        }
        i += 1;
    }

    print_machine(markdown);
    if acl_mode {
        let mut opts =
            acl::AclOpts::new(quick, out_dir.clone().unwrap_or_else(default_callgrind_dir));
        if let Some(p) = acl_parts {
            opts.parts = p;
        }
        if let Some(n) = iters {
            opts.iters = n;
        }
        if let Some(s) = measure {
            opts.measure = s;
        }
        if let Some(r) = rounds {
            opts.rounds = r;
        }
        if threads_given {
            opts.threads = threads;
        }
        if let Some(s) = sustain {
            opts.sustain = s;
        }
        eprintln!(
            "Creating the token and its keys (RSA-2048, EC P-256, AES-256, HMAC, data objects)..."
        );
        let env = BenchEnv::create();
        let load_before = loadavg();
        let start = std::time::Instant::now();
        acl::run_all(&env, &opts, markdown);
        println!();
        println!(
            "Load average (1 min) before and after the run: {load_before} / {}; {:.0} s in all",
            loadavg(),
            start.elapsed().as_secs_f64()
        );
        return;
    }
    if broker_mode {
        let mut opts = broker::BrokerOpts::new(quick);
        if let Some(s) = stores {
            opts.stores = s;
        }
        if threads_given {
            opts.threads = threads;
        }
        if let Some(s) = measure {
            opts.secs = s;
        }
        if let Some(r) = rounds {
            opts.rounds = r;
        }
        if let Some(r) = runs {
            opts.runs = r;
        }
        opts.keep = keep;
        let load_before = loadavg();
        let start = std::time::Instant::now();
        broker::run(&opts, markdown);
        println!();
        println!(
            "Load average (1 min) before and after the run: {load_before} / {}; {:.0} s in all",
            loadavg(),
            start.elapsed().as_secs_f64()
        );
        return;
    }
    if ha_mode {
        let mut opts = ha::HaOpts::new(quick);
        if let Some(p) = ha_parts {
            opts.parts = p;
        }
        if let Some(r) = reps {
            opts.reps = r;
        }
        if let Some(k) = per_member {
            opts.per_member = k;
        }
        if let Some(l) = latency {
            opts.latency_ms = l;
        }
        if let Some(r) = hang_reps {
            opts.hang_reps = r;
        }
        opts.keep = keep;
        if let Some(s) = measure {
            opts.cost_secs = s;
        }
        if let Some(r) = rounds {
            opts.cost_rounds = r;
        }
        let load_before = loadavg();
        let start = std::time::Instant::now();
        ha::run(&opts, markdown);
        println!();
        println!(
            "Load average (1 min) before and after the run: {load_before} / {}; {:.0} s in all",
            loadavg(),
            start.elapsed().as_secs_f64()
        );
        return;
    }
    eprintln!("Creating the token and its keys (RSA-2048, EC P-256, AES-256, data objects)...");
    let mut env = BenchEnv::create();

    if cg {
        let out_dir = out_dir.unwrap_or_else(default_callgrind_dir);
        let opts = CallgrindOpts {
            iters: iters.unwrap_or(2000),
            out_dir,
            cases: chosen.unwrap_or_else(|| callgrind::DEFAULT_CASES.to_vec()),
        };
        let rows = callgrind::run_all(&mut env, &opts);
        println!();
        callgrind::print(&rows, &opts, markdown);
        return;
    }

    let opts = TimingOpts {
        cases: chosen.unwrap_or_else(|| Case::DEFAULT.to_vec()),
        threads,
        measure: measure.unwrap_or(if quick {
            Duration::from_millis(250)
        } else {
            Duration::from_millis(600)
        }),
        warmup: if quick {
            Duration::from_millis(50)
        } else {
            Duration::from_millis(150)
        },
        rounds: rounds.unwrap_or(if quick { 2 } else { 4 }),
    };
    eprintln!(
        "Measuring: {} round(s) of {:.2} s (after {:.2} s of warm-up) per case, thread count and target",
        opts.rounds,
        opts.measure.as_secs_f64(),
        opts.warmup.as_secs_f64()
    );
    let load_before = loadavg();
    let rows = timing::run(&env, &opts);
    println!();
    timing::print(&rows, markdown);
    println!();
    println!(
        "Load average (1 min) before and after the run: {load_before} / {}",
        loadavg()
    );
}

/// target/callgrind, next to the profile directory holding this binary.
fn default_callgrind_dir() -> PathBuf {
    let exe = env::exe();
    exe.parent()
        .and_then(|d| d.parent())
        .map(|t| t.join("callgrind"))
        .unwrap_or_else(|| PathBuf::from("callgrind"))
}

/// The 1-minute load average: other work on the machine skews timings.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_default()
}

/// The machine, for the record.
fn print_machine(markdown: bool) {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let softhsm = std::process::Command::new("softhsm2-util")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let lines = [
        format!("CPUs: {cpus} x {cpu}"),
        format!("Kernel: {kernel}"),
        format!("SoftHSM2: {softhsm} ({})", env::softhsm_lib().display()),
        format!("p11shim: {}", env::shim_lib().display()),
    ];
    for l in lines {
        if markdown {
            println!("- {l}");
        } else {
            println!("{l}");
        }
    }
    println!();
}
