//! The auditor: callers push records onto a bounded lock-free queue; the
//! writer thread `p11shim-audit` chains, signs and writes them in batches.
//!
//! Caller side (`record`, `admit`): one push (a CAS) and a relaxed counter,
//! plus one `unpark` only when the writer announced it is asleep. The
//! writer announces sleep only after an idle doze of [`DOZE`], so under a
//! steady load callers never make a system call.
//!
//! Writer side: a batch of formatted lines stays in `out` until every sink
//! took all of it. While a sink fails, nothing more is taken from the
//! queue (the lines already chained cannot be dropped without breaking the
//! chain), the queue fills, and the policy decides: fail-closed callers are
//! refused by `admit`, fail-open records are counted as lost and a `lost`
//! record enters the chain once the sinks recover.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use sha2::{Digest as _, Sha256};

use crate::record::{self, SigFields};
use crate::sink::{self, FileOut, SyslogOut};
use crate::{Config, Error, Fsync, Kind, OnFailure, Record, Signer};

/// How long the idle writer polls before it announces sleep. Long enough
/// that a steady trickle of records (a few thousand signatures a second)
/// costs the application's cores a hundred writer wake-ups a second, not
/// one per record; short enough that a record reaches the file within
/// 10 ms. Callers never wait for it.
const DOZE: Duration = Duration::from_millis(10);
/// The longest a fail-closed record waits for room in a full queue.
const FULL_WAIT: Duration = Duration::from_millis(200);
/// First and longest wait before a failing sink is tried again.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Longest sleep of an idle writer with nothing due.
const IDLE_MAX: Duration = Duration::from_secs(1);
/// Formatted bytes per batch before they are written.
const BATCH_BYTES: usize = sink::MAX_WRITE - 4096;

/// Counters of an [`Auditor`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Caller records written to every sink.
    pub written: u64,
    /// Caller records refused: the queue was full (or the auditor stopped
    /// with records still queued).
    pub lost: u64,
    /// Failed writes, sends, opens and syncs.
    pub sink_errors: u64,
    /// Records waiting in the queue.
    pub queued: u64,
    /// Whether the last attempt to write succeeded everywhere.
    pub sink_healthy: bool,
    /// Checkpoints written (including the final `stop`).
    pub checkpoints: u64,
    /// Caller records known to be on stable storage in the file (after an
    /// fdatasync); 0 without a file sink or with [`Fsync::Never`].
    pub synced: u64,
}

/// The audit log of one process. `Send + Sync`; keep it in an `Arc`.
///
/// An `Auditor` does not survive `fork()`: the child has no writer thread.
/// A child must start its own (p11shim does so in `C_Initialize`) and
/// `std::mem::forget` the parent's.
#[derive(Debug)]
pub struct Auditor {
    shared: Arc<Shared>,
    writer: thread::Thread,
    handle: Mutex<Option<JoinHandle<()>>>,
    chain: String,
}

#[derive(Debug)]
struct Shared {
    queue: ArrayQueue<Record>,
    on_failure: OnFailure,
    /// The writer is parked (or about to be) and needs an unpark.
    sleeping: AtomicBool,
    /// `stop` was called: records are refused.
    stopped: AtomicBool,
    stop_deadline: Mutex<Option<Instant>>,
    /// The writer thread has exited.
    dead: AtomicBool,
    healthy: AtomicBool,
    accepted: AtomicU64,
    lost: AtomicU64,
    written: AtomicU64,
    synced: AtomicU64,
    sink_errors: AtomicU64,
    checkpoints: AtomicU64,
    /// A fail-open loss was logged and the `lost` record is not yet written.
    loss_logged: AtomicBool,
    /// The last interval fdatasync (made by the syncer thread) failed.
    sync_failing: AtomicBool,
    new_signer: Mutex<Option<Signer>>,
    signer_pending: AtomicBool,
    progress: Mutex<()>,
    progress_cv: Condvar,
    waiters: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Auditor {
    /// Opens the sinks and starts the writer thread, which writes the
    /// chain's `start` record first.
    ///
    /// A file that cannot be opened is an error, except a FIFO without a
    /// reader (the sink starts unhealthy and is retried); so is a missing
    /// syslog socket.
    pub fn start(cfg: Config, signer: Option<Signer>) -> Result<Auditor, Error> {
        if cfg.file.is_none() && cfg.syslog.is_none() {
            return Err(Error::Config("no sink: configure a file or syslog".into()));
        }
        if cfg.checkpoint_records == 0 || cfg.checkpoint_interval_ms == 0 {
            return Err(Error::Config(
                "checkpoint_records and checkpoint_interval_ms must be at least 1".into(),
            ));
        }
        if let Some(f) = &cfg.file
            && f.rotate_bytes == Some(0)
        {
            return Err(Error::Config("rotate_bytes must be at least 1".into()));
        }
        let mut id = [0u8; 16];
        getrandom::fill(&mut id)
            .map_err(|e| Error::Thread(io::Error::other(format!("no randomness: {e}"))))?;
        let chain = record::hex(&id);

        let mut healthy = true;
        let mut anchor = [0u8; 32];
        let file = match cfg.file.clone() {
            None => None,
            Some(fc) => {
                let path = fc.path.clone();
                let mut f = FileOut::new(fc);
                match f.open() {
                    Ok(()) => {
                        let last = f.last_line().map_err(|source| Error::Io {
                            path: path.clone(),
                            source,
                        })?;
                        if let Some(l) = last {
                            anchor = Sha256::digest(&l).into();
                        }
                    }
                    // A FIFO nobody reads yet.
                    Err(e) if e.raw_os_error() == Some(libc::ENXIO) => healthy = false,
                    Err(source) => return Err(Error::Io { path, source }),
                }
                Some(f)
            }
        };
        let syslog = cfg.syslog.clone().map(|sc| {
            let mut s = SyslogOut::new(sc);
            if let Err(e) = s.open() {
                tracing::warn!(socket = %s.cfg.socket.display(), error = %e, "audit: syslog socket unavailable");
                healthy = false;
            }
            s
        });

        let shared = Arc::new(Shared {
            queue: ArrayQueue::new(cfg.queue.max(16)),
            on_failure: cfg.on_failure,
            sleeping: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            stop_deadline: Mutex::new(None),
            dead: AtomicBool::new(false),
            healthy: AtomicBool::new(healthy),
            accepted: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            written: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            sink_errors: AtomicU64::new(u64::from(!healthy)),
            checkpoints: AtomicU64::new(0),
            loss_logged: AtomicBool::new(false),
            sync_failing: AtomicBool::new(false),
            new_signer: Mutex::new(None),
            signer_pending: AtomicBool::new(false),
            progress: Mutex::new(()),
            progress_cv: Condvar::new(),
            waiters: AtomicUsize::new(0),
        });
        let mut w = Writer {
            shared: shared.clone(),
            chain: chain.clone(),
            seq: 0,
            prev: anchor,
            key_id: signer.as_ref().map(Signer::key_id).unwrap_or_default(),
            signer,
            file,
            syslog,
            out: Vec::with_capacity(sink::MAX_WRITE * 2),
            lines: Vec::with_capacity(1024),
            file_off: 0,
            syslog_line: 0,
            batch_records: 0,
            since_ckpt: 0,
            last_ckpt: Instant::now(),
            ckpt_records: cfg.checkpoint_records,
            ckpt_interval: Duration::from_millis(cfg.checkpoint_interval_ms),
            lost_reported: 0,
            backoff: BACKOFF_MIN,
            retry_at: None,
            dozed: false,
            stop_written: false,
            syncer: None,
        };
        let handle = thread::Builder::new()
            .name("p11shim-audit".into())
            .spawn(move || {
                sink::block_signals();
                let _exit = ExitGuard(w.shared.clone());
                w.run();
            })
            .map_err(Error::Thread)?;
        Ok(Auditor {
            shared,
            writer: handle.thread().clone(),
            handle: Mutex::new(Some(handle)),
            chain,
        })
    }

    /// This process's chain id (32 hex digits).
    pub fn chain(&self) -> &str {
        &self.chain
    }

    /// Signs the following checkpoints with `s`, starting with one written
    /// right away (it covers the whole chain so far).
    pub fn set_signer(&self, s: Signer) {
        *lock(&self.shared.new_signer) = Some(s);
        self.shared.signer_pending.store(true, Ordering::Release);
        self.writer.unpark();
    }

    /// Whether a security-relevant call may proceed. Fail-open: always.
    /// Fail-closed: not while the queue is full, a sink is failing, or
    /// after `stop`.
    pub fn admit(&self) -> bool {
        let s = &*self.shared;
        match s.on_failure {
            OnFailure::FailOpen => true,
            OnFailure::FailClosed => {
                s.healthy.load(Ordering::Relaxed)
                    && !s.sync_failing.load(Ordering::Relaxed)
                    && !s.queue.is_full()
                    && !s.stopped.load(Ordering::Relaxed)
                    && !s.dead.load(Ordering::Relaxed)
            }
        }
    }

    /// Queues `r`. Fail-open never blocks. Fail-closed admitted the call
    /// the record describes (`admit`): when the callers outrun the sink and
    /// the queue is full, the record waits for room while the writer makes
    /// progress (at most [`FULL_WAIT`]), rather than let a key use go
    /// unrecorded. `false`: the record is lost (counted; fail-open logs the
    /// first loss of each episode), or `stop` was called.
    pub fn record(&self, r: Record) -> bool {
        let s = &*self.shared;
        if s.stopped.load(Ordering::Relaxed) {
            return false;
        }
        let r = match s.queue.push(r) {
            Err(r) if s.on_failure == OnFailure::FailClosed => self.wait_for_room(r),
            other => other,
        };
        match r {
            Ok(()) => {
                s.accepted.fetch_add(1, Ordering::Relaxed);
                // Pairs with the fence in `Writer::sleep`: either the writer
                // sees this record before parking, or we see it asleep.
                fence(Ordering::SeqCst);
                if s.sleeping.load(Ordering::Relaxed) {
                    self.writer.unpark();
                }
                true
            }
            Err(_dropped) => {
                s.lost.fetch_add(1, Ordering::Relaxed);
                if s.on_failure == OnFailure::FailOpen
                    && !s.loss_logged.swap(true, Ordering::Relaxed)
                {
                    tracing::warn!("audit: queue full, records are being lost (fail-open)");
                }
                false
            }
        }
    }

    /// Retries a push into a full queue while the writer is alive and
    /// healthy, for at most [`FULL_WAIT`].
    #[cold]
    #[allow(clippy::result_large_err)] // the queue's own push, retried
    fn wait_for_room(&self, mut r: Record) -> Result<(), Record> {
        let s = &*self.shared;
        let deadline = Instant::now() + FULL_WAIT;
        loop {
            if s.sleeping.load(Ordering::Relaxed) {
                self.writer.unpark();
            }
            thread::sleep(Duration::from_micros(50));
            match s.queue.push(r) {
                Ok(()) => return Ok(()),
                Err(back) => r = back,
            }
            if s.dead.load(Ordering::Relaxed)
                || s.stopped.load(Ordering::Relaxed)
                || !s.healthy.load(Ordering::Relaxed)
                || Instant::now() >= deadline
            {
                return Err(r);
            }
        }
    }

    /// The counters.
    pub fn stats(&self) -> Stats {
        let s = &*self.shared;
        Stats {
            written: s.written.load(Ordering::Relaxed),
            lost: s.lost.load(Ordering::Relaxed),
            sink_errors: s.sink_errors.load(Ordering::Relaxed),
            queued: s.queue.len() as u64,
            sink_healthy: s.healthy.load(Ordering::Relaxed)
                && !s.sync_failing.load(Ordering::Relaxed),
            checkpoints: s.checkpoints.load(Ordering::Relaxed),
            synced: s.synced.load(Ordering::Relaxed),
        }
    }

    /// Waits until every record queued before the call is written (and,
    /// with [`Fsync::Always`], synced), at most `timeout`. `false` on
    /// timeout or when the writer is gone.
    pub fn flush(&self, timeout: Duration) -> bool {
        let target = self.shared.accepted.load(Ordering::Relaxed);
        self.wait(timeout, |s| s.written.load(Ordering::SeqCst) >= target)
    }

    /// Stops accepting records, drains the queue, writes the final `stop`
    /// checkpoint, syncs the file and joins the writer, within `timeout`:
    /// past it (a sink still failing), what is left is counted as lost and
    /// the writer exits on its own.
    pub fn stop(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        {
            let mut d = lock(&self.shared.stop_deadline);
            if d.is_none() {
                *d = Some(deadline);
            }
        }
        self.shared.stopped.store(true, Ordering::SeqCst);
        self.writer.unpark();
        if self.wait(timeout, |s| s.dead.load(Ordering::SeqCst))
            && let Some(h) = lock(&self.handle).take()
        {
            // The thread has finished its work; join only reaps it.
            let _ = h.join();
        }
    }

    fn wait(&self, timeout: Duration, done: impl Fn(&Shared) -> bool) -> bool {
        let s = &*self.shared;
        let deadline = Instant::now() + timeout;
        s.waiters.fetch_add(1, Ordering::SeqCst);
        let mut g = lock(&s.progress);
        let ok = loop {
            if done(s) {
                break true;
            }
            if s.dead.load(Ordering::SeqCst) {
                break done(s);
            }
            let now = Instant::now();
            if now >= deadline {
                break false;
            }
            g = s
                .progress_cv
                .wait_timeout(g, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        };
        drop(g);
        s.waiters.fetch_sub(1, Ordering::SeqCst);
        ok
    }
}

impl Drop for Auditor {
    /// Asks the writer to finish (drain, `stop` checkpoint, sync) without
    /// waiting for it; call [`Auditor::stop`] to wait.
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        lock(&self.shared.stop_deadline).get_or_insert_with(|| Instant::now() + BACKOFF_MAX);
        self.writer.unpark();
    }
}

impl Shared {
    fn notify(&self) {
        if self.waiters.load(Ordering::SeqCst) > 0 {
            let _g = lock(&self.progress);
            self.progress_cv.notify_all();
        }
    }
}

/// Marks the writer dead when its thread ends, however it ends.
struct ExitGuard(Arc<Shared>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        let s = &*self.0;
        let mut left = 0;
        while s.queue.pop().is_some() {
            left += 1;
        }
        s.lost.fetch_add(left, Ordering::Relaxed);
        s.dead.store(true, Ordering::SeqCst);
        s.healthy.store(false, Ordering::SeqCst);
        s.notify();
        let _g = lock(&s.progress);
        s.progress_cv.notify_all();
    }
}

/// The thread that makes the interval fdatasyncs of the audit file
/// (`fsync = "interval"`), so that the writer never waits for the disk: a
/// sync of a second's worth of records can take longer than the queue
/// lasts at a high record rate. A sync covers every record written before
/// it started (`Stats::synced`); one that fails is a failing sink until
/// the next one succeeds (fail-closed refuses calls meanwhile). The writer
/// still syncs itself before a rotation and when it stops.
struct Syncer {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<()>,
}

impl Syncer {
    fn start(shared: Arc<Shared>, path: std::path::PathBuf, every: Duration) -> Option<Syncer> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let spawned = thread::Builder::new()
            .name("p11shim-audit-sync".into())
            .spawn(move || {
                sink::block_signals();
                while !flag.load(Ordering::SeqCst) {
                    thread::park_timeout(every);
                    if flag.load(Ordering::SeqCst) {
                        break;
                    }
                    Syncer::sync_once(&shared, &path);
                }
            });
        match spawned {
            Ok(handle) => Some(Syncer { stop, handle }),
            Err(e) => {
                // The writer then syncs on its own, as without the thread.
                tracing::warn!(error = %e, "audit: no sync thread; the writer syncs the file itself");
                None
            }
        }
    }

    fn sync_once(shared: &Shared, path: &std::path::Path) {
        let written = shared.written.load(Ordering::SeqCst);
        if written <= shared.synced.load(Ordering::SeqCst) {
            return;
        }
        match sink::sync_path(path) {
            Ok(()) => {
                shared.synced.fetch_max(written, Ordering::SeqCst);
                if shared.sync_failing.swap(false, Ordering::SeqCst) {
                    tracing::info!("audit: file synced again");
                }
            }
            Err(e) => {
                shared.sink_errors.fetch_add(1, Ordering::Relaxed);
                if !shared.sync_failing.swap(true, Ordering::SeqCst) {
                    tracing::warn!(path = %path.display(), error = %e, "audit: fdatasync failing; retrying");
                }
            }
        }
        shared.notify();
    }

    fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.thread().unpark();
        let _ = self.handle.join();
    }
}

struct Writer {
    shared: Arc<Shared>,
    chain: String,
    seq: u64,
    /// SHA-256 of the chain's last line (of the file's last line before
    /// the `start` record).
    prev: [u8; 32],
    signer: Option<Signer>,
    key_id: String,
    file: Option<FileOut>,
    syslog: Option<SyslogOut>,
    /// Chained lines not yet taken by every sink.
    out: Vec<u8>,
    /// End offset (after the newline) and kind of each line in `out`.
    lines: Vec<(usize, Kind)>,
    /// How much of `out` the file took.
    file_off: usize,
    /// How many lines of `out` syslog took.
    syslog_line: usize,
    /// Caller records in `out`.
    batch_records: u64,
    since_ckpt: u64,
    last_ckpt: Instant,
    ckpt_records: u64,
    ckpt_interval: Duration,
    lost_reported: u64,
    backoff: Duration,
    retry_at: Option<Instant>,
    dozed: bool,
    stop_written: bool,
    /// The interval fdatasyncs run on a thread of their own.
    syncer: Option<Syncer>,
}

impl Writer {
    fn run(&mut self) {
        self.syncer = self.file.as_ref().and_then(|f| match f.cfg.fsync {
            Fsync::IntervalMs(ms) => Syncer::start(
                self.shared.clone(),
                f.cfg.path.clone(),
                Duration::from_millis(ms.max(1)),
            ),
            _ => None,
        });
        self.work();
        if let Some(s) = self.syncer.take() {
            s.stop();
        }
    }

    /// The time before the writer's own interval sync is due (none when
    /// the syncer thread makes them).
    fn sync_due(&self) -> Option<Instant> {
        if self.syncer.is_some() {
            return None;
        }
        self.file.as_ref().and_then(FileOut::sync_due)
    }

    fn work(&mut self) {
        let mut start = Record::new(Kind::Start, "start", 0);
        start.detail = Some(format!("pid {}", std::process::id()).into());
        self.append(&start);
        loop {
            let now = Instant::now();
            let stopping = self.shared.stopped.load(Ordering::SeqCst);
            let give_up = stopping && lock(&self.shared.stop_deadline).is_some_and(|d| now >= d);

            if !self.out.is_empty() {
                if give_up {
                    self.shared
                        .lost
                        .fetch_add(self.batch_records, Ordering::Relaxed);
                    break;
                }
                if let Some(t) = self.retry_at
                    && now < t
                {
                    let until = match *lock(&self.shared.stop_deadline) {
                        Some(d) if stopping => t.min(d),
                        _ => t,
                    };
                    thread::park_timeout(until.saturating_duration_since(now));
                    continue;
                }
                if !self.flush() {
                    continue;
                }
            }

            let new_signer = if self.shared.signer_pending.swap(false, Ordering::AcqRel) {
                lock(&self.shared.new_signer).take()
            } else {
                None
            };
            if let Some(s) = new_signer {
                self.key_id = s.key_id();
                self.signer = Some(s);
                self.checkpoint(Kind::Checkpoint);
                continue;
            }

            let lost = self.shared.lost.load(Ordering::Relaxed);
            if lost > self.lost_reported {
                let mut r = Record::new(Kind::Lost, "lost", 0);
                r.detail = Some(format!("{} records lost", lost - self.lost_reported).into());
                self.lost_reported = lost;
                self.shared.loss_logged.store(false, Ordering::Relaxed);
                self.append(&r);
                self.since_ckpt += 1;
            }

            let mut n = 0u64;
            while self.out.len() < BATCH_BYTES {
                let Some(r) = self.shared.queue.pop() else {
                    break;
                };
                self.append(&r);
                drop(r);
                n += 1;
                self.since_ckpt += 1;
                if self.since_ckpt >= self.ckpt_records {
                    self.checkpoint(Kind::Checkpoint);
                }
            }
            self.batch_records += n;
            if n > 0 {
                self.dozed = false;
            }
            if self.since_ckpt > 0 && now >= self.last_ckpt + self.ckpt_interval {
                self.checkpoint(Kind::Checkpoint);
            }
            if !self.out.is_empty() {
                continue;
            }

            if stopping {
                if !self.stop_written {
                    self.stop_written = true;
                    self.checkpoint(Kind::Stop);
                    continue;
                }
                self.sync();
                break;
            }
            if let Some(due) = self.sync_due()
                && now >= due
            {
                self.sync();
                continue;
            }
            self.sleep(now);
        }
    }

    /// Idle: a doze first (callers do not wake it), then a sleep callers
    /// wake, until the next checkpoint or sync is due.
    fn sleep(&mut self, now: Instant) {
        if !self.dozed {
            self.dozed = true;
            thread::park_timeout(DOZE);
            return;
        }
        let mut until = now + IDLE_MAX;
        if self.since_ckpt > 0 {
            until = until.min(self.last_ckpt + self.ckpt_interval);
        }
        if let Some(due) = self.sync_due() {
            until = until.min(due);
        }
        let s = &*self.shared;
        s.sleeping.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if s.queue.is_empty()
            && !s.stopped.load(Ordering::SeqCst)
            && !s.signer_pending.load(Ordering::SeqCst)
        {
            thread::park_timeout(until.saturating_duration_since(now));
        }
        s.sleeping.store(false, Ordering::SeqCst);
    }

    /// Chains `r` onto `out`, signing it when it is a checkpoint and a
    /// signer exists.
    fn append(&mut self, r: &Record) {
        let start = self.out.len();
        let sign = r.kind.is_checkpoint() && self.signer.is_some();
        let fields = self.signer.as_ref().filter(|_| sign).map(|s| SigFields {
            alg: s.alg(),
            key_id: &self.key_id,
        });
        record::format(
            &mut self.out,
            &self.chain,
            self.seq,
            r,
            &self.prev,
            fields.as_ref(),
        );
        if let Some(s) = self.signer.as_ref().filter(|_| sign) {
            let sig = s.sign(&self.out[start..]);
            record::append_sig(&mut self.out, &sig);
        }
        self.prev = Sha256::digest(&self.out[start..]).into();
        self.out.push(b'\n');
        self.lines.push((self.out.len(), r.kind));
        self.seq += 1;
    }

    fn checkpoint(&mut self, kind: Kind) {
        let r = Record::new(
            kind,
            if kind == Kind::Stop {
                "stop"
            } else {
                "checkpoint"
            },
            0,
        );
        self.append(&r);
        self.since_ckpt = 0;
        self.last_ckpt = Instant::now();
        self.shared.checkpoints.fetch_add(1, Ordering::Relaxed);
    }

    /// Hands `out` to every sink. `true` when all of it went (and was
    /// synced under [`Fsync::Always`]).
    fn flush(&mut self) -> bool {
        if let Some(f) = &mut self.file {
            while self.file_off < self.out.len() {
                match f.write(&self.out[self.file_off..]) {
                    Ok(n) => self.file_off += n,
                    Err(e) => {
                        f.close();
                        let what = format!("file {}", f.cfg.path.display());
                        self.failed(&what, &e);
                        return false;
                    }
                }
            }
        }
        if let Some(s) = &mut self.syslog {
            while self.syslog_line < self.lines.len() {
                let begin = match self.syslog_line {
                    0 => 0,
                    i => self.lines[i - 1].0,
                };
                let (end, kind) = self.lines[self.syslog_line];
                match s.send(kind, &self.out[begin..end - 1]) {
                    Ok(()) => self.syslog_line += 1,
                    Err(e) => {
                        if e.kind() != io::ErrorKind::WouldBlock {
                            s.close();
                        }
                        let what = format!("syslog {}", s.cfg.socket.display());
                        self.failed(&what, &e);
                        return false;
                    }
                }
            }
        }
        let always = self
            .file
            .as_ref()
            .is_some_and(|f| f.cfg.fsync == Fsync::Always);
        if always && let Some(f) = &mut self.file {
            if let Err(e) = f.sync() {
                f.close();
                let what = format!("file {}", f.cfg.path.display());
                self.failed(&what, &e);
                return false;
            }
        }
        let written = self
            .shared
            .written
            .fetch_add(self.batch_records, Ordering::SeqCst)
            + self.batch_records;
        if always {
            self.shared.synced.store(written, Ordering::SeqCst);
        }
        self.out.clear();
        self.lines.clear();
        self.file_off = 0;
        self.syslog_line = 0;
        self.batch_records = 0;
        self.retry_at = None;
        self.backoff = BACKOFF_MIN;
        if !self.shared.healthy.swap(true, Ordering::SeqCst) {
            tracing::info!("audit: sinks writable again");
        }
        self.shared.notify();
        true
    }

    /// fdatasync of the file when it has unsynced writes.
    fn sync(&mut self) {
        let Some(f) = &mut self.file else { return };
        if f.cfg.fsync == Fsync::Never || !f.needs_sync() {
            return;
        }
        let written = self.shared.written.load(Ordering::SeqCst);
        match f.sync() {
            Ok(()) => self.shared.synced.store(written, Ordering::SeqCst),
            Err(e) => {
                f.close();
                let what = format!("file {}", f.cfg.path.display());
                self.failed(&what, &e);
            }
        }
    }

    fn failed(&mut self, what: &str, e: &io::Error) {
        self.shared.sink_errors.fetch_add(1, Ordering::Relaxed);
        if self.shared.healthy.swap(false, Ordering::SeqCst) {
            tracing::warn!(sink = what, error = %e, "audit: sink failing; retrying");
        }
        self.retry_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        self.shared.notify();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auditor_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Auditor>();
        check::<Arc<Auditor>>();
    }

    /// The threads of this process with a given name.
    fn threads_named(name: &str) -> usize {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|c| c.trim_end() == name)
            .count()
    }

    #[test]
    fn interval_syncs_run_on_the_sync_thread() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = crate::FileSink::new(dir.path().join("a.log"));
        file.fsync = Fsync::IntervalMs(20);
        let cfg = Config {
            file: Some(file),
            ..Config::default()
        };
        let a = Auditor::start(cfg, None).unwrap();
        for i in 0..200u64 {
            let mut r = Record::new(Kind::KeyUse, "C_Sign", 0);
            r.detail = Some(format!("n={i}").into());
            assert!(a.record(r));
        }
        assert!(a.flush(Duration::from_secs(10)));
        let deadline = Instant::now() + Duration::from_secs(10);
        while a.stats().synced < 200 {
            assert!(Instant::now() < deadline, "never synced: {:?}", a.stats());
            thread::sleep(Duration::from_millis(5));
        }
        // The thread's name as /proc shows it (15 bytes); other tests of
        // this process may run theirs.
        assert!(threads_named("p11shim-audit-s") >= 1);
        assert!(a.stats().sink_healthy);
        a.stop(Duration::from_secs(10));
        let s = a.stats();
        assert_eq!(s.synced, s.written, "the last records are synced at stop");
    }

    /// Callers that outrun the writer: fail-closed waits for room for the
    /// record of a call it admitted; fail-open drops and counts.
    #[test]
    fn a_full_queue_holds_fail_closed_records_back_and_drops_fail_open_ones() {
        for (on_failure, may_lose) in [(OnFailure::FailClosed, false), (OnFailure::FailOpen, true)]
        {
            let dir = tempfile::tempdir().unwrap();
            let cfg = Config {
                file: Some(crate::FileSink::new(dir.path().join("a.log"))),
                queue: 16,
                on_failure,
                ..Config::default()
            };
            let a = Arc::new(Auditor::start(cfg, None).unwrap());
            let pushers: Vec<_> = (0..4)
                .map(|_| {
                    let a = a.clone();
                    thread::spawn(move || {
                        (0..20_000)
                            .filter(|_| a.record(Record::new(Kind::KeyUse, "C_Sign", 0)))
                            .count() as u64
                    })
                })
                .collect();
            let queued: u64 = pushers.into_iter().map(|p| p.join().unwrap()).sum();
            assert!(a.flush(Duration::from_secs(30)));
            let s = a.stats();
            assert_eq!(s.written, queued, "{on_failure:?}: {s:?}");
            assert_eq!(s.written + s.lost, 80_000, "{on_failure:?}: {s:?}");
            if !may_lose {
                assert_eq!(s.lost, 0, "fail-closed lost records: {s:?}");
            }
            a.stop(Duration::from_secs(10));
        }
    }

    #[test]
    #[allow(unsafe_code)]
    fn sync_path_skips_what_has_nothing_to_sync() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.log");
        std::fs::write(&f, b"x\n").unwrap();
        sink::sync_path(&f).unwrap();
        sink::sync_path(&dir.path().join("gone.log")).unwrap();
        sink::sync_path(std::path::Path::new("/dev/null")).unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        sink::sync_path(&fifo).unwrap();
    }

    #[test]
    fn configuration_errors_are_refused() {
        assert!(matches!(
            Auditor::start(Config::default(), None),
            Err(Error::Config(_))
        ));
        let dir = tempfile::tempdir().unwrap();
        let file = Some(crate::FileSink::new(dir.path().join("a.log")));
        let cfg = Config {
            file: file.clone(),
            checkpoint_records: 0,
            ..Config::default()
        };
        assert!(matches!(Auditor::start(cfg, None), Err(Error::Config(_))));
        let cfg = Config {
            file: Some(crate::FileSink::new(dir.path().join("no/such/dir/a.log"))),
            ..Config::default()
        };
        let e = Auditor::start(cfg, None).unwrap_err();
        assert!(e.to_string().contains("no/such/dir/a.log"), "{e}");
    }
}
