//! Metrics: counters and latency histograms in the Prometheus text format,
//! written to a file at an interval for node_exporter's textfile collector.
//!
//! A library inside someone else's process must not open a port, so the
//! module writes a file and node_exporter serves it. What is counted:
//!
//! * per operation kind and slot (`Op`, [`SlotOps`]): how many ended, with
//!   which result, and a histogram of the duration of the call that ended
//!   each; recorded by `dispatch` when an operation ends;
//! * per member: a histogram of vendor call durations
//!   ([`Histogram`] in `router::MemberStats`, fed by `Member::track`), next
//!   to the counters the status query already keeps (errors, failovers,
//!   recoveries), read when the file is written.
//!
//! Recording costs relaxed atomic additions only: no lock, no allocation,
//! and nothing at all when `[metrics]` is not configured. The text is made
//! by [`text::render`] from those counters when the file is written.
//!
//! The file is replaced atomically (written next to it as
//! `<file>.tmp.<pid>`, then renamed), by the `p11shim-metrics` thread,
//! started in `C_Initialize` and stopped in `C_Finalize`, which then removes
//! the file: node_exporter has no staleness for textfiles and would serve
//! the last values of a finished process forever. When the application
//! forbids threads (`CKF_LIBRARY_CANT_CREATE_OS_THREADS`) the file is
//! written from the application's own calls once it is due.

pub mod text;

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::config::MetricsConfig;
use crate::router::replay::OpKind;

// ---------------------------------------------------------------------------
// Recording (the hot path).

/// Upper bounds of the latency buckets, in nanoseconds: 50 µs to 5 s.
pub const BOUNDS_NS: [u64; 16] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
];
/// The same bounds as written in the `le` label (canonical decimal form),
/// then `+Inf`.
pub const BOUNDS_LE: [&str; 17] = [
    "0.00005", "0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05",
    "0.1", "0.25", "0.5", "1", "2.5", "5", "+Inf",
];

/// A latency histogram: one counter per bucket (not cumulative: an
/// observation adds to one counter only) and the sum of the observations.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; 17],
    sum_ns: AtomicU64,
}

/// What a histogram held when it was read.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// Cumulative counts, one per bound of [`BOUNDS_LE`] (the last is the
    /// count of observations).
    pub cumulative: [u64; 17],
    /// Sum of the observations, in seconds.
    pub sum_seconds: f64,
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.cumulative[16]
    }
}

impl Histogram {
    /// Adds one observation.
    #[inline]
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        // Most observations fall in the first buckets: a short scan.
        let i = BOUNDS_NS.iter().position(|&b| ns <= b).unwrap_or(16);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Reads the histogram. Buckets are read one by one while others may
    /// add to them; the cumulative counts are summed from what was read,
    /// so they never decrease and the count is the last of them.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = [0u64; 17];
        let mut total = 0u64;
        for (c, b) in cumulative.iter_mut().zip(&self.buckets) {
            total = total.wrapping_add(b.load(Ordering::Relaxed));
            *c = total;
        }
        HistogramSnapshot {
            cumulative,
            sum_seconds: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// The kinds of operations counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    Sign = 0,
    Verify,
    Encrypt,
    Decrypt,
    Digest,
    SignRecover,
    VerifyRecover,
    Wrap,
    Unwrap,
    Derive,
    Generate,
    Find,
    Login,
}

impl Op {
    pub const ALL: [Op; 13] = [
        Op::Sign,
        Op::Verify,
        Op::Encrypt,
        Op::Decrypt,
        Op::Digest,
        Op::SignRecover,
        Op::VerifyRecover,
        Op::Wrap,
        Op::Unwrap,
        Op::Derive,
        Op::Generate,
        Op::Find,
        Op::Login,
    ];

    /// The value of the `op` label.
    pub fn name(self) -> &'static str {
        match self {
            Op::Sign => "sign",
            Op::Verify => "verify",
            Op::Encrypt => "encrypt",
            Op::Decrypt => "decrypt",
            Op::Digest => "digest",
            Op::SignRecover => "sign_recover",
            Op::VerifyRecover => "verify_recover",
            Op::Wrap => "wrap",
            Op::Unwrap => "unwrap",
            Op::Derive => "derive",
            Op::Generate => "generate",
            Op::Find => "find",
            Op::Login => "login",
        }
    }
}

impl From<OpKind> for Op {
    #[inline]
    fn from(k: OpKind) -> Op {
        match k {
            OpKind::Encrypt => Op::Encrypt,
            OpKind::Decrypt => Op::Decrypt,
            OpKind::Digest => Op::Digest,
            OpKind::Sign => Op::Sign,
            OpKind::Verify => Op::Verify,
            OpKind::SignRecover => Op::SignRecover,
            OpKind::VerifyRecover => Op::VerifyRecover,
        }
    }
}

/// Counters of one operation kind on one slot.
#[derive(Debug, Default)]
pub struct OpStats {
    pub ok: AtomicU64,
    pub error: AtomicU64,
    /// Duration of the call that ended each operation.
    pub duration: Histogram,
}

/// The operations of one virtual slot.
#[derive(Debug, Default)]
pub struct SlotOps([OpStats; 13]);

impl SlotOps {
    /// Counts an operation that ended.
    #[inline]
    pub fn record(&self, op: Op, ok: bool, d: Duration) {
        let s = &self.0[op as usize];
        if ok { &s.ok } else { &s.error }.fetch_add(1, Ordering::Relaxed);
        s.duration.observe(d);
    }

    pub fn get(&self, op: Op) -> &OpStats {
        &self.0[op as usize]
    }
}

// ---------------------------------------------------------------------------
// The file.

/// Writes the metrics file of an initialized module.
#[derive(Debug)]
pub struct Exporter {
    path: PathBuf,
    tmp: PathBuf,
    interval: Duration,
    /// `name="value"` pairs on every series (escaped, comma-separated):
    /// the configured labels, and `pid` when each process has its file.
    constant: String,
    /// Written from the application's calls (no thread allowed).
    inline: bool,
    epoch: Instant,
    /// When the next inline write is due, in nanoseconds since `epoch`.
    next_ns: AtomicU64,
    /// One write at a time; `true` once the file is removed (no more writes).
    write: Mutex<bool>,
    /// The last write failed (its error was logged once).
    failing: AtomicBool,
}

impl Exporter {
    /// The exporter of this process; `inline` when no thread may run.
    pub fn new(cfg: &MetricsConfig, inline: bool) -> Exporter {
        let pid = std::process::id();
        let path = cfg.file_for(pid);
        let mut tmp = path.clone().into_os_string();
        tmp.push(format!(".tmp.{pid}"));
        let mut labels: Vec<(&str, String)> = cfg
            .labels
            .iter()
            .map(|(n, v)| (n.as_str(), v.clone()))
            .collect();
        if cfg.per_process() {
            labels.push(("pid", pid.to_string()));
        }
        let constant = labels
            .iter()
            .map(|(n, v)| format!("{n}=\"{}\"", text::escape_label(v)))
            .collect::<Vec<_>>()
            .join(",");
        Exporter {
            path,
            tmp: tmp.into(),
            interval: Duration::from_millis(cfg.interval_ms),
            constant,
            inline,
            epoch: Instant::now(),
            next_ns: AtomicU64::new(0),
            write: Mutex::new(false),
            failing: AtomicBool::new(false),
        }
    }

    /// The file written (`{pid}` expanded).
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The labels on every series, rendered.
    pub fn constant_labels(&self) -> &str {
        &self.constant
    }

    /// Whether an inline write is due (only when no thread runs): one
    /// subtraction and one relaxed load.
    #[inline]
    pub fn due(&self, now: Instant) -> bool {
        self.inline
            && now.duration_since(self.epoch).as_nanos() as u64
                >= self.next_ns.load(Ordering::Relaxed)
    }

    /// Claims the inline write that is due; `false` when another thread
    /// took it.
    fn claim(&self, now: Instant) -> bool {
        let at = now.duration_since(self.epoch).as_nanos() as u64;
        let due = self.next_ns.load(Ordering::Relaxed);
        at >= due
            && self
                .next_ns
                .compare_exchange(
                    due,
                    at + self.interval.as_nanos() as u64,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    /// Replaces the file with `text`: written to `<file>.tmp.<pid>` in the
    /// same directory with mode 0644, then renamed over the file, so that a
    /// reader sees the old file or the new one, never part of one. Not
    /// synced to disk: the file is rewritten at every interval and a
    /// machine that lost power starts without it (node_exporter then
    /// reports the error until the process writes again).
    fn replace(&self, text: &str) -> std::io::Result<()> {
        let result = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o644)
                .open(&self.tmp)?;
            // The mode given at creation is reduced by the umask.
            f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
            f.write_all(text.as_bytes())?;
            drop(f);
            std::fs::rename(&self.tmp, &self.path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        result
    }

    /// Writes the file now, with the text `render` makes (called with the
    /// write lock held, so that the newest values are written last).
    pub fn write(&self, render: impl FnOnce(&Exporter) -> String) {
        let removed = self.write.lock();
        if *removed {
            return;
        }
        let text = render(self);
        match self.replace(&text) {
            Ok(()) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(file = %self.path.display(), "metrics file written again");
                }
            }
            Err(e) => {
                // Logged once until a write succeeds: a missing directory
                // would otherwise log at every interval.
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(file = %self.path.display(), error = %e,
                        "cannot write the metrics file; retrying at each interval");
                }
            }
        }
    }

    /// The inline write, when it is due and no other thread does it.
    #[cold]
    pub fn write_inline(&self, now: Instant, render: impl FnOnce(&Exporter) -> String) {
        if self.claim(now) {
            self.write(render);
        }
    }

    /// Removes the file (at `C_Finalize`); no write happens after.
    pub fn remove(&self) {
        let mut removed = self.write.lock();
        *removed = true;
        for p in [&self.path, &self.tmp] {
            match std::fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => crate::logging::quietly(
                    || tracing::warn!(file = %p.display(), error = %e, "cannot remove the metrics file"),
                ),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The thread.

/// Something whose metrics the thread writes.
pub trait Export: Send + Sync + 'static {
    /// Writes the metrics file once.
    fn export(&self);
    /// Time between two writes.
    fn interval(&self) -> Duration;
}

#[derive(Debug, Default)]
struct Control {
    stop: Mutex<bool>,
    wake: Condvar,
}

/// The running `p11shim-metrics` thread.
#[derive(Debug)]
struct Thread {
    control: Arc<Control>,
    handle: Option<JoinHandle<()>>,
    /// The process that started it: a forked child has no such thread.
    pid: u32,
}

/// The thread of the initialized module.
static THREAD: Mutex<Option<Thread>> = Mutex::new(None);

/// Starts the thread over a weakly held target: it writes at once, then at
/// every interval, until [`stop_thread`] or the target is gone.
pub fn start_thread<E: Export>(target: Weak<E>) -> std::io::Result<()> {
    let control = Arc::new(Control::default());
    let c = control.clone();
    let handle = std::thread::Builder::new()
        .name("p11shim-metrics".into())
        .spawn(move || {
            loop {
                let interval = match target.upgrade() {
                    Some(t) => {
                        t.export();
                        t.interval()
                    }
                    None => return,
                };
                let deadline = Instant::now() + interval;
                let mut stop = c.stop.lock();
                while !*stop && Instant::now() < deadline {
                    c.wake.wait_until(&mut stop, deadline);
                }
                if *stop {
                    return;
                }
            }
        })?;
    let old = THREAD.lock().replace(Thread {
        control,
        handle: Some(handle),
        pid: std::process::id(),
    });
    if let Some(old) = old {
        old.end();
    }
    Ok(())
}

/// Stops the thread and waits for it (it never waits on anything but its
/// interval and one write of a local file).
pub fn stop_thread() {
    let t = THREAD.lock().take();
    if let Some(t) = t {
        t.end();
    }
}

impl Thread {
    fn end(mut self) {
        let Some(h) = self.handle.take() else {
            return;
        };
        if self.pid != std::process::id() {
            // The parent's thread does not exist in a forked child.
            std::mem::forget(h);
            return;
        }
        *self.control.stop.lock() = true;
        self.control.wake.notify_all();
        let _ = h.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_bounds_inclusive() {
        let h = Histogram::default();
        h.observe(Duration::from_nanos(1));
        h.observe(Duration::from_micros(50)); // on the bound: le="0.00005"
        h.observe(Duration::from_nanos(50_001));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(10));
        let s = h.snapshot();
        assert_eq!(s.cumulative[0], 2);
        assert_eq!(s.cumulative[1], 3);
        assert_eq!(s.cumulative[5], 3, "le=0.0025");
        assert_eq!(s.cumulative[6], 4, "le=0.005");
        assert_eq!(s.cumulative[15], 4, "le=5");
        assert_eq!(s.count(), 5);
        assert!(s.cumulative.windows(2).all(|w| w[0] <= w[1]));
        let want = (1 + 50_000 + 50_001 + 3_000_000 + 10_000_000_000u64) as f64 / 1e9;
        assert!((s.sum_seconds - want).abs() < 1e-12);
    }

    #[test]
    fn le_labels_match_the_bounds() {
        for (ns, le) in BOUNDS_NS.iter().zip(BOUNDS_LE) {
            let v: f64 = le.parse().unwrap();
            assert_eq!((v * 1e9).round() as u64, *ns, "{le}");
        }
        assert_eq!(BOUNDS_LE[16], "+Inf");
        assert!(BOUNDS_NS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn ops_count_by_result() {
        let ops = SlotOps::default();
        ops.record(Op::Sign, true, Duration::from_micros(10));
        ops.record(Op::Sign, false, Duration::from_micros(10));
        ops.record(Op::Sign, true, Duration::from_micros(10));
        let s = ops.get(Op::Sign);
        assert_eq!(s.ok.load(Ordering::Relaxed), 2);
        assert_eq!(s.error.load(Ordering::Relaxed), 1);
        assert_eq!(s.duration.snapshot().count(), 3);
        assert_eq!(ops.get(Op::Verify).duration.snapshot().count(), 0);
        for (i, op) in Op::ALL.iter().enumerate() {
            assert_eq!(*op as usize, i);
        }
    }

    fn config(dir: &Path, name: &str) -> MetricsConfig {
        MetricsConfig {
            file: dir.join(name),
            interval_ms: 1000,
            labels: vec![("service".into(), "pay\"ments".into())],
        }
    }

    #[test]
    fn writes_atomically_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let e = Exporter::new(&config(dir.path(), "m-{pid}.prom"), false);
        let pid = std::process::id();
        assert_eq!(e.path(), dir.path().join(format!("m-{pid}.prom")));
        assert_eq!(
            e.constant_labels(),
            format!("service=\"pay\\\"ments\",pid=\"{pid}\"")
        );
        e.write(|_| "a 1\n".into());
        assert_eq!(std::fs::read_to_string(e.path()).unwrap(), "a 1\n");
        let mode = std::fs::metadata(e.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        e.write(|_| "a 2\n".into());
        assert_eq!(std::fs::read_to_string(e.path()).unwrap(), "a 2\n");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|d| d.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
        e.remove();
        assert!(!e.path().exists());
        e.write(|_| "a 3\n".into());
        assert!(!e.path().exists(), "no write after the removal");
    }

    #[test]
    fn a_failed_write_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let e = Exporter::new(&config(&dir.path().join("missing"), "m.prom"), false);
        e.write(|_| "a 1\n".into());
        assert!(e.failing.load(Ordering::Relaxed));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn inline_writes_when_due_once() {
        let dir = tempfile::tempdir().unwrap();
        let e = Exporter::new(&config(dir.path(), "m.prom"), true);
        let now = Instant::now();
        assert!(e.due(now));
        assert!(e.claim(now));
        assert!(!e.due(now), "the next write is an interval away");
        assert!(!e.claim(now));
        assert!(e.due(now + Duration::from_millis(1000)));
        let threaded = Exporter::new(&config(dir.path(), "n.prom"), false);
        assert!(!threaded.due(now), "the thread writes; calls never do");
    }

    struct Target {
        writes: AtomicU64,
    }

    impl Export for Target {
        fn export(&self) {
            self.writes.fetch_add(1, Ordering::Relaxed);
        }
        fn interval(&self) -> Duration {
            Duration::from_millis(5)
        }
    }

    #[test]
    fn the_thread_writes_until_stopped() {
        let t = Arc::new(Target {
            writes: AtomicU64::new(0),
        });
        start_thread(Arc::downgrade(&t)).unwrap();
        let start = Instant::now();
        while t.writes.load(Ordering::Relaxed) < 3 && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(2));
        }
        stop_thread();
        let n = t.writes.load(Ordering::Relaxed);
        assert!(n >= 3);
        assert!(THREAD.lock().is_none());
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(t.writes.load(Ordering::Relaxed), n, "no write after stop");
    }
}
