//! Instructions per call under `valgrind --tool=callgrind`: a worker runs
//! N and 2N operations; (I(2N) − I(N)) / N is the cost of one operation,
//! with the process's setup and teardown cancelled out. Timing on a shared
//! machine resolves 5-10%; instruction counts are exact.
//!
//! Three targets: SoftHSM2 directly, through p11shim, and through p11-kit's
//! proxy module configured (in a private HOME) to load SoftHSM2 only, which
//! is checked before counting.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::env::{BenchEnv, Target, result_field, run, run_checked};
use crate::p11::die;
use crate::timing::{signed, thousands};
use crate::worker::{Case, TOKEN_LABEL};

#[derive(Debug, Clone)]
pub struct CallgrindOpts {
    /// N: the runs do N and 2N operations.
    pub iters: u64,
    /// Where callgrind's output files are kept.
    pub out_dir: PathBuf,
    pub cases: Vec<Case>,
}

/// The cases counted by default.
pub const DEFAULT_CASES: [Case; 2] = [Case::Digest, Case::Session];
const TARGETS: [Target; 3] = [Target::Direct, Target::Shim, Target::P11Kit];

#[derive(Debug)]
pub struct Counted {
    pub case: Case,
    /// Instructions per operation, in the order of `TARGETS`.
    pub per_op: [f64; 3],
    /// Where p11shim's added instructions go: (function, instructions per
    /// operation through p11shim minus directly), largest first.
    pub shim_functions: Vec<(String, f64)>,
}

impl Counted {
    fn direct(&self) -> f64 {
        self.per_op[0]
    }
    fn shim_added(&self) -> f64 {
        self.per_op[1] - self.per_op[0]
    }
    fn p11kit_added(&self) -> f64 {
        self.per_op[2] - self.per_op[0]
    }
}

/// The slots a target's worker sees, with and without a token:
/// (description, manufacturer) of every slot, and (label, manufacturer,
/// model) of every token, sorted.
type SlotView = (Vec<(String, String)>, Vec<(String, String, String)>);

fn slots(env: &BenchEnv, target: Target) -> SlotView {
    let out = run_checked(
        env.worker(target, &["--list-slots"]),
        &format!("listing the slots of {}", target.title()),
    );
    let (mut slots, mut tokens) = (Vec::new(), Vec::new());
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let f: Vec<&str> = line.split('\t').collect();
        match f.as_slice() {
            ["SLOT", _id, description, manufacturer] => {
                slots.push((description.to_string(), manufacturer.to_string()))
            }
            ["TOKEN", _id, label, manufacturer, model] => tokens.push((
                label.to_string(),
                manufacturer.to_string(),
                model.to_string(),
            )),
            _ => {}
        }
    }
    slots.sort();
    tokens.sort();
    (slots, tokens)
}

/// p11-kit's proxy must load SoftHSM2 and nothing else: it must show
/// exactly SoftHSM2's slots and tokens, and `p11-kit list-modules` in the
/// same environment must list SoftHSM2's module only.
fn check_p11kit_sees_only_softhsm(env: &BenchEnv) {
    let direct = slots(env, Target::Direct);
    let proxied = slots(env, Target::P11Kit);
    eprintln!(
        "p11-kit's proxy shows {} slot(s), {} with a token:",
        proxied.0.len(),
        proxied.1.len()
    );
    for (label, manufacturer, model) in &proxied.1 {
        eprintln!("  token {label:?} ({manufacturer}, {model})");
    }
    if proxied != direct || proxied.1.iter().filter(|t| t.0 == TOKEN_LABEL).count() != 1 {
        die(format_args!(
            "p11-kit's proxy does not show exactly SoftHSM2's slots: it shows {proxied:?}, SoftHSM2 {direct:?}"
        ));
    }
    eprintln!("  = exactly the slots and tokens of SoftHSM2 loaded directly");

    let softhsm = crate::env::softhsm_lib();
    let out = run_checked(
        env.tool_command(
            Target::P11Kit,
            vec!["p11-kit".into(), "list-modules".into()],
        ),
        "p11-kit list-modules",
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let modules: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with(char::is_whitespace) && !l.trim().is_empty())
        .collect();
    let canonical = |p: &str| std::fs::canonicalize(p).ok();
    let module_path = |m: &str| {
        m.split_once(": ")
            .and_then(|(_, path)| canonical(path.trim()))
    };
    let only_softhsm = matches!(modules.as_slice(), [m] if module_path(m) == canonical(&softhsm.to_string_lossy()));
    if !only_softhsm {
        die(format_args!(
            "p11-kit list-modules, in the workers' environment, lists {modules:?}; expected SoftHSM2's module only"
        ));
    }
    eprintln!("  p11-kit list-modules: {}", modules.join("; "));
}

/// The total instruction count of a callgrind output file.
pub(crate) fn totals(path: &Path) -> u64 {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| die(format_args!("cannot read {}: {e}", path.display())));
    text.lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| die(format_args!("no totals in {}", path.display())))
}

fn count(env: &BenchEnv, target: Target, case: Case, n: u64, out_dir: &Path) -> u64 {
    // Written in the run's directory (the workers may run as another user),
    // then kept in `out_dir`.
    let name = format!("{}.{}.{n}.out", target.name(), case.name());
    let tmp = env.path().join(&name);
    let out_file = format!("--callgrind-out-file={}", tmp.display());
    let n_arg = n.to_string();
    let cmd = env.command(
        target,
        &[
            "valgrind",
            "--tool=callgrind",
            "--dump-instr=yes",
            &out_file,
        ],
        &["--case", case.name(), "--threads", "1", "--count", &n_arg],
    );
    let out = run(
        cmd,
        &format!("callgrind of {} {} x{n}", target.title(), case.name()),
        false,
    );
    let ops: u64 = result_field(&String::from_utf8_lossy(&out.stdout), "ops")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if ops != n {
        die(format_args!(
            "the worker under callgrind reported {ops} operations, expected {n}"
        ));
    }
    let file = out_dir.join(&name);
    std::fs::copy(&tmp, &file).unwrap_or_else(|e| {
        die(format_args!(
            "cannot copy {} to {}: {e}",
            tmp.display(),
            file.display()
        ))
    });
    totals(&file)
}

/// Self cost of every function in a callgrind file, from `callgrind_annotate`
/// (costs of inlined code are summed under the function they were inlined
/// into). `None` when callgrind_annotate is not available.
pub(crate) fn self_costs(file: &Path) -> Option<HashMap<String, u64>> {
    let out = Command::new("callgrind_annotate")
        .args(["--threshold=100", "--auto=no", "--inclusive=no"])
        .arg(file)
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut costs = HashMap::new();
    let mut in_table = false;
    for line in text.lines() {
        if line.contains("file:function") {
            in_table = true;
            continue;
        }
        let line = line.trim_start();
        let Some((count, rest)) = line.split_once(char::is_whitespace) else {
            continue;
        };
        let Ok(count) = count.replace(',', "").parse::<u64>() else {
            continue;
        };
        if !in_table || rest.contains("PROGRAM TOTALS") {
            continue;
        }
        let mut rest = rest.trim_start();
        if rest.starts_with('(') {
            rest = rest.split_once(')').map_or(rest, |(_, r)| r.trim_start());
        }
        let function = rest.split_once(':').map_or(rest, |(_, f)| f);
        let function = match function.rfind(" [") {
            Some(i) if function.ends_with(']') => &function[..i],
            _ => function,
        };
        *costs.entry(function.to_string()).or_insert(0) += count;
    }
    Some(costs)
}

/// Per-operation self cost of every function: (costs(2N) − costs(N)) / N.
fn per_op_costs(
    out_dir: &Path,
    target: Target,
    case: Case,
    n: u64,
) -> Option<HashMap<String, f64>> {
    let small = self_costs(&out_dir.join(format!("{}.{}.{n}.out", target.name(), case.name())))?;
    let large =
        self_costs(&out_dir.join(format!("{}.{}.{}.out", target.name(), case.name(), 2 * n)))?;
    let mut per = HashMap::new();
    for k in small.keys().chain(large.keys()) {
        let v =
            (*large.get(k).unwrap_or(&0) as f64 - *small.get(k).unwrap_or(&0) as f64) / n as f64;
        per.insert(k.clone(), v);
    }
    Some(per)
}

/// The functions whose per-operation cost grows most from SoftHSM2 direct
/// to through p11shim.
fn shim_functions(out_dir: &Path, case: Case, n: u64) -> Vec<(String, f64)> {
    let (Some(shim), Some(direct)) = (
        per_op_costs(out_dir, Target::Shim, case, n),
        per_op_costs(out_dir, Target::Direct, case, n),
    ) else {
        return Vec::new();
    };
    let mut rows: Vec<(String, f64)> = shim
        .iter()
        .map(|(k, v)| (k.clone(), v - direct.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d >= 5.0)
        .collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    rows
}

pub fn run_all(env: &mut BenchEnv, opts: &CallgrindOpts) -> Vec<Counted> {
    let version = Command::new("valgrind").arg("--version").output();
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
    if env.unprivileged_workers() {
        eprintln!(
            "Running as root: workers run as an unprivileged user, since p11-kit ignores root's user configuration"
        );
    }
    check_p11kit_sees_only_softhsm(env);

    let n = opts.iters;
    let mut rows = Vec::new();
    for &case in &opts.cases {
        let mut per_op = [0.0; 3];
        for (i, &target) in TARGETS.iter().enumerate() {
            let small = count(env, target, case, n, &opts.out_dir);
            let large = count(env, target, case, 2 * n, &opts.out_dir);
            if large <= small {
                die(format_args!(
                    "{} {}: {large} instructions for {} ops, {small} for {n}",
                    target.title(),
                    case.name(),
                    2 * n
                ));
            }
            per_op[i] = (large - small) as f64 / n as f64;
            eprintln!(
                "  {:<36} {:<8} I({n}) = {:>13}  I({}) = {:>13}  per op {:>9.1}",
                case.title(),
                target.title(),
                thousands(small),
                2 * n,
                thousands(large),
                per_op[i]
            );
        }
        let shim_functions = shim_functions(&opts.out_dir, case, n);
        rows.push(Counted {
            case,
            per_op,
            shim_functions,
        });
    }
    rows
}

pub fn print(rows: &[Counted], opts: &CallgrindOpts, markdown: bool) {
    let n = opts.iters;
    let int = |v: f64| thousands(v.round().max(0.0) as u64);
    if markdown {
        println!(
            "| Operation | SoftHSM2 direct | through p11shim | through p11-kit | added by p11shim | added by p11-kit |"
        );
        println!("|---|--:|--:|--:|--:|--:|");
        for r in rows {
            println!(
                "| {} | {} | {} | {} | {} | {} |",
                r.case.title(),
                int(r.per_op[0]),
                int(r.per_op[1]),
                int(r.per_op[2]),
                signed(r.shim_added()),
                signed(r.p11kit_added())
            );
        }
    } else {
        println!(
            "Instructions per operation (callgrind, (I({}) - I({n})) / {n}):",
            2 * n
        );
        println!(
            "{:<40} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "operation", "direct", "p11shim", "p11-kit", "+p11shim", "+p11-kit"
        );
        for r in rows {
            println!(
                "{:<40} {:>10} {:>10} {:>10} {:>10} {:>10}",
                r.case.title(),
                int(r.per_op[0]),
                int(r.per_op[1]),
                int(r.per_op[2]),
                signed(r.shim_added()),
                signed(r.p11kit_added())
            );
        }
    }
    println!();
    println!("Each operation is two PKCS#11 calls (DigestInit+Digest, OpenSession+CloseSession).");
    println!();
    let missed: Vec<&Counted> = rows
        .iter()
        .filter(|r| r.shim_added() >= r.p11kit_added())
        .collect();
    if missed.is_empty() {
        println!(
            "Instruction target (p11shim adds fewer instructions per operation than p11-kit): met."
        );
    } else {
        println!(
            "Instruction target (p11shim adds fewer instructions per operation than p11-kit): NOT met:"
        );
        for r in missed {
            println!(
                "  - {}: p11shim adds {:.0} (direct {:.0}), p11-kit adds {:.0}",
                r.case.title(),
                r.shim_added(),
                r.direct(),
                r.p11kit_added()
            );
        }
    }
    for r in rows {
        if r.shim_functions.is_empty() {
            continue;
        }
        println!();
        println!(
            "{}: where p11shim's {:.0} added instructions per operation go",
            r.case.title(),
            r.shim_added()
        );
        println!(
            "(self cost per operation through p11shim minus directly, by function; inlined code counts in its caller)"
        );
        if markdown {
            println!();
            println!("| Instructions per op | Function |");
            println!("|--:|---|");
        }
        for (function, d) in r.shim_functions.iter().take(12) {
            let function: String = function.chars().take(160).collect();
            if markdown {
                println!("| {d:.0} | `{function}` |");
            } else {
                println!("{d:>8.0}  {function}");
            }
        }
    }
    println!();
    println!(
        "Callgrind files: {}  (e.g. callgrind_annotate {}/shim.digest.{}.out)",
        opts.out_dir.display(),
        opts.out_dir.display(),
        2 * n
    );
}
