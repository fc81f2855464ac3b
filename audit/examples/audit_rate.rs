//! Audit throughput and the caller's cost, to a real file with
//! `fsync = IntervalMs(1000)` and Ed25519 checkpoints every 1000 records.
//!
//! `cargo run --release -p p11shim-audit --example audit_rate [-- --seconds S]
//! [--rate R] [--dir D] [--instructions]`
//!
//! For 1 and 4 caller threads:
//! - saturated: callers record as fast as `admit()` lets them (fail-closed
//!   gate, so nothing is lost); the writer's sustained rate;
//! - paced: R records per second in total (default 100,000), in bursts of
//!   100 every 100/R' seconds per thread; lost records (must be 0) and the
//!   caller-side cost per record (time inside `Record::new` + `record()`).
//!
//! Then the log is verified (time and rate). `--instructions` runs itself
//! under `valgrind --tool=callgrind`, collecting only the caller path, and
//! prints instructions per record.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

use p11shim_audit::{
    Auditor, Config, FileSink, Fsync, KeyRef, Kind, OnFailure, Record, Signer, verify,
};

struct Args {
    seconds: f64,
    rate: u64,
    dir: PathBuf,
    instructions: bool,
    callgrind_child: Option<u64>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        seconds: 2.0,
        rate: 100_000,
        dir: std::env::temp_dir(),
        instructions: false,
        callgrind_child: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--seconds" => a.seconds = val("--seconds")?.parse().map_err(|e| format!("{e}"))?,
            "--rate" => a.rate = val("--rate")?.parse().map_err(|e| format!("{e}"))?,
            "--dir" => a.dir = PathBuf::from(val("--dir")?),
            "--instructions" => a.instructions = true,
            "--callgrind-child" => {
                a.callgrind_child = Some(
                    val("--callgrind-child")?
                        .parse()
                        .map_err(|e| format!("{e}"))?,
                )
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

/// The fields a module fills in for a signature.
struct Proto {
    role: Arc<str>,
    subject: Arc<str>,
    member: Arc<str>,
    key: Arc<KeyRef>,
}

impl Proto {
    fn new() -> Proto {
        Proto {
            role: Arc::from("payments"),
            subject: Arc::from("i-0123456789abcdef0"),
            member: Arc::from("ha-a"),
            key: Arc::new(KeyRef {
                label: Some("payments-signing-2025".into()),
                id: Some(vec![0x01, 0x02, 0x03, 0x04]),
                fingerprint: Some([0x5a; 32]),
                class: Some(3),
                key_type: Some(3),
            }),
        }
    }

    #[inline(always)]
    fn record(&self, i: u64) -> Record {
        let mut r = Record::new(Kind::KeyUse, "C_Sign", 0);
        r.role = Some(self.role.clone());
        r.subject = Some(self.subject.clone());
        r.slot = Some(0);
        r.member = Some(self.member.clone());
        r.mechanism = Some(0x1041);
        r.key = Some(self.key.clone());
        r.latency_us = Some(i & 0xff);
        r
    }
}

fn auditor(path: &Path) -> Auditor {
    let mut seed = [0u8; 32];
    for (i, b) in seed.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(37) ^ 0xa5;
    }
    let signer = Signer::Ed25519(p11shim_audit::ed25519_dalek::SigningKey::from_bytes(&seed));
    let cfg = Config {
        file: Some(FileSink {
            fsync: Fsync::IntervalMs(1000),
            ..FileSink::new(path.to_path_buf())
        }),
        on_failure: OnFailure::FailClosed,
        ..Config::default()
    };
    match Auditor::start(cfg, Some(signer)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("audit_rate: {e}");
            std::process::exit(1);
        }
    }
}

/// Callers record as fast as `admit()` allows for `secs`; returns records
/// written per second.
fn saturated(path: &Path, threads: usize, secs: f64) -> (f64, u64) {
    let a = Arc::new(auditor(path));
    let proto = Arc::new(Proto::new());
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let hs: Vec<_> = (0..threads)
        .map(|_| {
            let (a, p) = (a.clone(), proto.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                // Bounded by the clock: `end` is a few seconds away.
                while Instant::now() < end {
                    for _ in 0..64 {
                        if a.admit() {
                            a.record(p.record(i));
                            i += 1;
                        } else {
                            std::thread::yield_now();
                        }
                    }
                }
            })
        })
        .collect();
    for h in hs {
        let _ = h.join();
    }
    a.flush(Duration::from_secs(60));
    let elapsed = start.elapsed().as_secs_f64();
    let st = a.stats();
    a.stop(Duration::from_secs(10));
    (st.written as f64 / elapsed, st.lost)
}

struct Paced {
    sent: u64,
    lost: u64,
    written: u64,
    ns_per_record: f64,
    worst_burst_ns_per_record: f64,
}

/// `rate` records per second in total for `secs`, in bursts of 100.
fn paced(path: &Path, threads: usize, rate: u64, secs: f64) -> Paced {
    const BURST: u64 = 100;
    let a = Arc::new(auditor(path));
    let proto = Arc::new(Proto::new());
    let per_thread = rate as f64 / threads as f64;
    let period = Duration::from_secs_f64(BURST as f64 / per_thread);
    let bursts = (secs / period.as_secs_f64()) as u64;
    let hs: Vec<_> = (0..threads)
        .map(|_| {
            let (a, p) = (a.clone(), proto.clone());
            std::thread::spawn(move || {
                let (mut inside, mut worst, mut sent) = (Duration::ZERO, Duration::ZERO, 0u64);
                let t0 = Instant::now();
                for b in 0..bursts {
                    let due = t0 + period * b as u32;
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let t = Instant::now();
                    for i in 0..BURST {
                        a.record(p.record(sent + i));
                    }
                    let d = t.elapsed();
                    inside += d;
                    worst = worst.max(d);
                    sent += BURST;
                }
                (inside, worst, sent)
            })
        })
        .collect();
    let (mut inside, mut worst, mut sent) = (Duration::ZERO, Duration::ZERO, 0);
    for h in hs {
        if let Ok((i, w, s)) = h.join() {
            inside += i;
            worst = worst.max(w);
            sent += s;
        }
    }
    a.flush(Duration::from_secs(60));
    let st = a.stats();
    a.stop(Duration::from_secs(10));
    Paced {
        sent,
        lost: st.lost,
        written: st.written,
        ns_per_record: inside.as_nanos() as f64 / sent.max(1) as f64,
        worst_burst_ns_per_record: worst.as_nanos() as f64 / BURST as f64,
    }
}

/// The caller path alone, for callgrind's `--toggle-collect`.
#[inline(never)]
fn caller_path(a: &Auditor, p: &Proto, n: u64) {
    for i in 0..n {
        a.record(p.record(i));
    }
}

/// `n` records (a multiple of 1000) through `caller_path`; between groups
/// of 1000 the queue is drained outside the collected function.
fn callgrind_child(dir: &Path, n: u64) {
    let a = auditor(&dir.join("callgrind.log"));
    let p = Proto::new();
    for _ in 0..n / 1000 {
        caller_path(&a, &p, 1000);
        a.flush(Duration::from_secs(60));
    }
    a.stop(Duration::from_secs(60));
}

/// Runs this program under callgrind collecting `caller_path` only;
/// returns instructions per record.
fn instructions(dir: &Path) -> Result<f64, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let out = dir.join("callgrind.out");
    let n = 20_000u64;
    let status = Command::new("valgrind")
        .args(["--tool=callgrind", "--toggle-collect=*caller_path*"])
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(&exe)
        .arg("--callgrind-child")
        .arg(n.to_string())
        .arg("--dir")
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map_err(|e| format!("valgrind: {e} (apt-get install valgrind)"))?;
    if !status.success() {
        return Err(format!("valgrind exited with {status}"));
    }
    let text = std::fs::read_to_string(&out).map_err(|e| e.to_string())?;
    let total: u64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or("no totals in the callgrind output")?;
    Ok(total as f64 / n as f64)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("audit_rate: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(n) = args.callgrind_child {
        callgrind_child(&args.dir, n);
        return ExitCode::SUCCESS;
    }
    let tmp = match tempfile::Builder::new()
        .prefix("audit-rate-")
        .tempdir_in(&args.dir)
    {
        Ok(d) => d,
        Err(e) => {
            eprintln!("audit_rate: {}: {e}", args.dir.display());
            return ExitCode::FAILURE;
        }
    };
    let dir = tmp.path().to_path_buf();
    let mut ok = true;
    println!(
        "| callers | saturated rate | paced at | lost | caller cost / record | worst burst / record |"
    );
    println!("|---|---|---|---|---|---|");
    let mut files = Vec::new();
    for threads in [1, 4] {
        let sat_path = dir.join(format!("saturated-{threads}.log"));
        let (rate, sat_lost) = saturated(&sat_path, threads, args.seconds);
        let path = dir.join(format!("paced-{threads}.log"));
        let p = paced(&path, threads, args.rate, args.seconds);
        println!(
            "| {threads} | {:.0} records/s | {} records/s | {} of {} | {:.0} ns | {:.0} ns |",
            rate, args.rate, p.lost, p.sent, p.ns_per_record, p.worst_burst_ns_per_record
        );
        ok &= sat_lost == 0 && p.lost == 0 && p.written == p.sent;
        let _ = std::fs::remove_file(&sat_path);
        files.push(path);
    }
    let t = Instant::now();
    let mut lines = 0;
    for f in &files {
        match verify(std::slice::from_ref(f), &p11shim_audit::VerifyKey::None) {
            Ok(r) if r.ok_strict() => lines += r.records,
            Ok(r) => {
                eprintln!(
                    "audit_rate: {} does not verify: {:?}",
                    f.display(),
                    r.broken
                );
                ok = false;
            }
            Err(e) => {
                eprintln!("audit_rate: {e}");
                ok = false;
            }
        }
    }
    let el = t.elapsed().as_secs_f64();
    println!(
        "\nverify (chain only, the paced logs): {lines} lines in {el:.2} s, {:.0} lines/s",
        lines as f64 / el
    );
    if args.instructions {
        match instructions(&dir) {
            Ok(n) => println!(
                "caller path (Record::new + Arc clones + record()): {n:.0} instructions per record"
            ),
            Err(e) => {
                eprintln!("audit_rate: instructions: {e}");
                ok = false;
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
