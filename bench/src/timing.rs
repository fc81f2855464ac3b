//! The timed comparison: every case, on 1 and 2 threads, against SoftHSM2
//! directly and through p11shim, each in its own worker process.
//!
//! A case runs in several short rounds; each round measures both targets
//! back to back, alternating which goes first (A B, then B A), so that a
//! change of the machine's speed weighs on both alike. Throughput is the
//! median over rounds, the ratio the median of the rounds' ratios (each
//! from two neighbouring measurements), so that a burst of load from
//! another process spoils one round, not the result; the range of the
//! rounds' ratios is shown beside it.

use std::time::Duration;

use crate::env::{BenchEnv, Target, result_field, run_checked};
use crate::p11::die;
use crate::stats::Histogram;
use crate::worker::Case;

/// The ratio of throughputs p11shim must reach.
pub const TARGET_RATIO: f64 = 0.95;

#[derive(Debug, Clone)]
pub struct TimingOpts {
    pub cases: Vec<Case>,
    pub threads: Vec<usize>,
    /// Measured time per round and target.
    pub measure: Duration,
    pub warmup: Duration,
    pub rounds: usize,
}

/// One measurement of one (case, threads, target).
#[derive(Debug, Clone, Default)]
struct Measure {
    ops: u64,
    /// ops / rate: the time the operations took (per thread).
    secs: f64,
    hist: Histogram,
}

impl Measure {
    fn rate(&self) -> f64 {
        if self.secs > 0.0 {
            self.ops as f64 / self.secs
        } else {
            0.0
        }
    }
}

#[derive(Debug)]
pub struct Row {
    pub case: Case,
    pub threads: usize,
    /// One (SoftHSM2, p11shim) pair per round.
    rounds: Vec<(Measure, Measure)>,
    /// All rounds' latencies.
    direct_hist: Histogram,
    shim_hist: Histogram,
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

impl Row {
    fn ratios(&self) -> Vec<f64> {
        self.rounds
            .iter()
            .map(|(d, s)| {
                if d.rate() > 0.0 {
                    s.rate() / d.rate()
                } else {
                    0.0
                }
            })
            .collect()
    }

    pub fn ratio(&self) -> f64 {
        median(self.ratios())
    }

    fn ratio_range(&self) -> (f64, f64) {
        let r = self.ratios();
        (
            r.iter().copied().fold(f64::INFINITY, f64::min),
            r.iter().copied().fold(0.0, f64::max),
        )
    }

    fn direct_rate(&self) -> f64 {
        median(self.rounds.iter().map(|(d, _)| d.rate()).collect())
    }

    fn shim_rate(&self) -> f64 {
        median(self.rounds.iter().map(|(_, s)| s.rate()).collect())
    }
}

fn measure_once(
    env: &BenchEnv,
    target: Target,
    case: Case,
    threads: usize,
    opts: &TimingOpts,
) -> Measure {
    let secs = format!("{}", opts.measure.as_secs_f64());
    let warm = format!("{}", opts.warmup.as_secs_f64());
    let th = threads.to_string();
    let cmd = env.worker(
        target,
        &[
            "--case",
            case.name(),
            "--threads",
            &th,
            "--secs",
            &secs,
            "--warmup",
            &warm,
        ],
    );
    let out = run_checked(
        cmd,
        &format!("{} {} on {threads} thread(s)", target.title(), case.name()),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let parse = || -> Option<Measure> {
        let ops: u64 = result_field(&stdout, "ops")?.parse().ok()?;
        let rate: f64 = result_field(&stdout, "rate")?.parse().ok()?;
        let hist = Histogram::decode(result_field(&stdout, "hist")?)?;
        Some(Measure {
            ops,
            secs: if rate > 0.0 { ops as f64 / rate } else { 0.0 },
            hist,
        })
    };
    let m = parse().unwrap_or_else(|| die(format_args!("unreadable worker report: {stdout:?}")));
    if m.ops == 0 {
        die(format_args!(
            "{} {} ran no operation in {:?}",
            target.title(),
            case.name(),
            opts.measure
        ));
    }
    m
}

pub fn run(env: &BenchEnv, opts: &TimingOpts) -> Vec<Row> {
    let mut rows = Vec::new();
    for &case in &opts.cases {
        for &threads in &opts.threads {
            let mut row = Row {
                case,
                threads,
                rounds: Vec::new(),
                direct_hist: Histogram::new(),
                shim_hist: Histogram::new(),
            };
            for round in 0..opts.rounds {
                let order = if round % 2 == 0 {
                    [Target::Direct, Target::Shim]
                } else {
                    [Target::Shim, Target::Direct]
                };
                let (mut direct, mut shim) = (Measure::default(), Measure::default());
                for target in order {
                    let m = measure_once(env, target, case, threads, opts);
                    if target == Target::Direct {
                        row.direct_hist.merge(&m.hist);
                        direct = m;
                    } else {
                        row.shim_hist.merge(&m.hist);
                        shim = m;
                    }
                }
                row.rounds.push((direct, shim));
            }
            let (lo, hi) = row.ratio_range();
            eprintln!(
                "  {:<40} {threads} thr  SoftHSM2 {:>10}/s  p11shim {:>10}/s  ratio {:.3} ({lo:.3}-{hi:.3})",
                case.title(),
                ops(row.direct_rate()),
                ops(row.shim_rate()),
                row.ratio()
            );
            rows.push(row);
        }
    }
    rows
}

/// A difference, rounded, with its sign and thousands separators.
pub fn signed(v: f64) -> String {
    let r = v.round() as i64;
    let s = thousands(r.unsigned_abs());
    if r < 0 {
        format!("−{s}")
    } else {
        format!("+{s}")
    }
}

/// An integer with thousands separators.
pub fn thousands(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn ops(rate: f64) -> String {
    thousands(rate.round() as u64)
}

/// Nanoseconds as microseconds, with a precision that suits the value.
pub fn us(nanos: u64) -> String {
    let v = nanos as f64 / 1000.0;
    if v < 10.0 {
        format!("{v:.2}")
    } else if v < 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

pub fn print(rows: &[Row], markdown: bool) {
    if markdown {
        println!(
            "| Operation | Threads | SoftHSM2 ops/s | p11shim ops/s | p11shim / SoftHSM2 (range) | SoftHSM2 p50 µs | SoftHSM2 p99 µs | p11shim p50 µs | p11shim p99 µs |"
        );
        println!("|---|--:|--:|--:|--:|--:|--:|--:|--:|");
        for r in rows {
            let (lo, hi) = r.ratio_range();
            println!(
                "| {} | {} | {} | {} | {:.3} ({lo:.2}–{hi:.2}) | {} | {} | {} | {} |",
                r.case.title(),
                r.threads,
                ops(r.direct_rate()),
                ops(r.shim_rate()),
                r.ratio(),
                us(r.direct_hist.quantile(0.5)),
                us(r.direct_hist.quantile(0.99)),
                us(r.shim_hist.quantile(0.5)),
                us(r.shim_hist.quantile(0.99)),
            );
        }
    } else {
        println!(
            "{:<40} {:>3}  {:>14} {:>14} {:>19}  {:>19}  {:>19}",
            "operation",
            "thr",
            "SoftHSM2 ops/s",
            "p11shim ops/s",
            "ratio (range)",
            "SoftHSM2 p50/p99 µs",
            "p11shim p50/p99 µs"
        );
        for r in rows {
            let (lo, hi) = r.ratio_range();
            println!(
                "{:<40} {:>3}  {:>14} {:>14} {:>19}  {:>19}  {:>19}",
                r.case.title(),
                r.threads,
                ops(r.direct_rate()),
                ops(r.shim_rate()),
                format!("{:.3} ({lo:.2}-{hi:.2})", r.ratio()),
                format!(
                    "{} / {}",
                    us(r.direct_hist.quantile(0.5)),
                    us(r.direct_hist.quantile(0.99))
                ),
                format!(
                    "{} / {}",
                    us(r.shim_hist.quantile(0.5)),
                    us(r.shim_hist.quantile(0.99))
                ),
            );
        }
    }
    println!();
    let below: Vec<String> = rows
        .iter()
        .filter(|r| r.ratio() < TARGET_RATIO)
        .map(|r| {
            format!(
                "{} on {} thread(s): {:.3}",
                r.case.title(),
                r.threads,
                r.ratio()
            )
        })
        .collect();
    if below.is_empty() {
        println!("Throughput target (p11shim >= {TARGET_RATIO} x SoftHSM2 in every case): met.");
    } else {
        println!(
            "Throughput target (p11shim >= {TARGET_RATIO} x SoftHSM2 in every case): NOT met:"
        );
        for b in below {
            println!("  - {b}");
        }
    }
}
