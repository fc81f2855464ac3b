//! Diagnostic logging with `tracing`, set up in `C_Initialize`.
//!
//! The level comes from `P11SHIM_LOG`, else from `[log] level`; records go
//! to stderr or to `[log] file`. Nothing secret is ever given to a log
//! call: PINs, key material and data travel in types whose `Debug` prints
//! only a length. Logging is diagnostics, not audit.

use std::io::Write;
use std::sync::OnceLock;

use parking_lot::RwLock;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::{Registry, reload};

use crate::config::{LOG_ENV, LogConfig, LogLevel};

enum Sink {
    Stderr,
    File(std::fs::File),
}

static SINK: RwLock<Sink> = RwLock::new(Sink::Stderr);
static FILTER: OnceLock<reload::Handle<LevelFilter, Registry>> = OnceLock::new();

struct SinkWriter;

impl Write for SinkWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &*SINK.read() {
            Sink::Stderr => std::io::stderr().write(buf),
            Sink::File(f) => (&*f).write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match &*SINK.read() {
            Sink::Stderr => std::io::stderr().flush(),
            Sink::File(f) => (&*f).flush(),
        }
    }
}

struct MakeSink;

impl<'a> MakeWriter<'a> for MakeSink {
    type Writer = SinkWriter;
    fn make_writer(&'a self) -> SinkWriter {
        SinkWriter
    }
}

fn level_filter(level: LogLevel) -> LevelFilter {
    match level {
        LogLevel::Off => LevelFilter::OFF,
        LogLevel::Error => LevelFilter::ERROR,
        LogLevel::Warn => LevelFilter::WARN,
        LogLevel::Info => LevelFilter::INFO,
        LogLevel::Debug => LevelFilter::DEBUG,
        LogLevel::Trace => LevelFilter::TRACE,
    }
}

/// Something with a destructor in thread-local storage: when it can no
/// longer be reached, this thread's storage is being torn down (an exit
/// handler running after the main thread's storage was destroyed), and the
/// logger, which keeps buffers there, must not be called.
struct Canary;

impl Drop for Canary {
    fn drop(&mut self) {}
}

thread_local! {
    static CANARY: Canary = const { Canary };
}

/// Whether logging is possible on this thread now.
#[inline]
pub fn usable() -> bool {
    CANARY.try_with(|_| ()).is_ok()
}

/// Runs a logging statement when it is safe to: never while this thread's
/// storage is being torn down, and never letting a panic out.
#[inline]
pub fn quietly(f: impl FnOnce()) {
    if usable() {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    }
}

/// Applies a log configuration; may be called again on every
/// `C_Initialize` (a new level or file takes effect).
pub fn setup(cfg: &LogConfig) {
    let level = std::env::var(LOG_ENV)
        .ok()
        .and_then(|l| LogLevel::parse(&l))
        .unwrap_or(cfg.level);
    let sink = match &cfg.file {
        None => Sink::Stderr,
        Some(path) => {
            let mut opts = std::fs::OpenOptions::new();
            opts.create(true).append(true);
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            match opts.open(path) {
                Ok(f) => Sink::File(f),
                Err(e) => {
                    let _ = writeln!(
                        std::io::stderr(),
                        "p11shim: cannot open log file {}: {e}; logging to stderr",
                        path.display()
                    );
                    Sink::Stderr
                }
            }
        }
    };
    *SINK.write() = sink;
    let filter = level_filter(level);
    if let Some(handle) = FILTER.get() {
        let _ = handle.reload(filter);
        return;
    }
    let (layer, handle) = reload::Layer::new(filter);
    let subscriber = Registry::default().with(layer).with(
        tracing_subscriber::fmt::layer()
            .with_writer(MakeSink)
            .with_ansi(false)
            .with_target(false)
            .with_thread_ids(true),
    );
    // Inside a host process the dispatcher is this library's own copy of
    // tracing; when it was already set (the rlib used by a tool), the host's
    // subscriber stays in charge.
    if tracing::subscriber::set_global_default(subscriber).is_ok() {
        let _ = FILTER.set(handle);
    }
}
