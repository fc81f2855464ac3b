//! The audit log against real sinks that fail: `/dev/full`, a FIFO nobody
//! reads, a FIFO whose reader never reads; the fail-closed and fail-open
//! policies; durability of synced records across a SIGKILL; the syslog
//! datagram sink on a socket the test binds.

use std::io::{BufRead as _, BufReader, Read as _};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use p11shim_audit::{
    Auditor, Config, Facility, FileSink, Fsync, Kind, OnFailure, Record, Signer, SyslogSink,
    VerifyKey, Zeroizing, verify,
};
use p11shim_tests::TempDir;

/// Longest a step may take before the test calls it a hang.
const HANG: Duration = Duration::from_secs(60);
const STOP: Duration = Duration::from_secs(2);

fn tempdir() -> TempDir {
    tempfile::Builder::new()
        .prefix("p11shim-audit-")
        .tempdir()
        .expect("tempdir")
}

fn file_cfg(path: &Path, on_failure: OnFailure, queue: usize) -> Config {
    Config {
        file: Some(FileSink {
            fsync: Fsync::Never,
            ..FileSink::new(path.to_path_buf())
        }),
        queue,
        on_failure,
        ..Config::default()
    }
}

fn sign_record(i: u64) -> Record {
    let mut r = Record::new(Kind::KeyUse, "C_Sign", 0);
    r.slot = Some(0);
    r.latency_us = Some(i);
    r
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// Polls `cond` until it holds; panics after [`HANG`].
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < HANG, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Fail-closed against a sink that cannot take anything: `admit` says no
/// once the sink failed, `record` returns at once whatever happens, and
/// `stop` returns within its bound.
fn fail_closed_refuses(a: &Auditor) {
    wait_for("the sink to be marked failing", || !a.stats().sink_healthy);
    assert!(!a.admit(), "fail-closed admits while the sink fails");
    let lost0 = a.stats().lost;
    let t = Instant::now();
    let mut refused = 0;
    for i in 0..10_000 {
        if !a.record(sign_record(i)) {
            refused += 1;
        }
    }
    assert!(t.elapsed() < HANG, "record() blocked");
    let st = a.stats();
    assert!(
        refused > 0 && st.lost - lost0 == refused,
        "{st:?}, {refused} refused"
    );
    assert!(!a.admit());
    assert!(st.sink_errors >= 1, "{st:?}");
    let t = Instant::now();
    a.stop(STOP);
    assert!(
        t.elapsed() < STOP + Duration::from_secs(5),
        "stop() overran its bound"
    );
    assert!(!a.record(sign_record(0)), "record() after stop()");
}

#[test]
fn fail_closed_on_dev_full() {
    let a = Auditor::start(
        file_cfg(Path::new("/dev/full"), OnFailure::FailClosed, 64),
        None,
    )
    .expect("/dev/full opens; writing it fails");
    fail_closed_refuses(&a);
    assert_eq!(a.stats().written, 0);
}

#[test]
fn fail_closed_on_a_fifo_nobody_reads() {
    let dir = tempdir();
    let fifo = dir.path().join("audit.fifo");
    mkfifo(&fifo);
    let a = Auditor::start(file_cfg(&fifo, OnFailure::FailClosed, 64), None)
        .expect("a FIFO without a reader starts unhealthy");
    assert!(!a.admit());
    fail_closed_refuses(&a);
}

#[test]
fn fail_closed_on_a_fifo_whose_reader_never_reads() {
    let dir = tempdir();
    let fifo = dir.path().join("audit.fifo");
    mkfifo(&fifo);
    // A reader that holds the FIFO open and never reads: the pipe fills.
    let _reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .expect("reader");
    let a = Auditor::start(file_cfg(&fifo, OnFailure::FailClosed, 1024), None).expect("start");
    assert!(a.admit(), "healthy while the pipe has room");
    // Enough to fill the pipe buffer (64 KiB) several times over.
    let mut i = 0;
    wait_for("the pipe to fill", || {
        for _ in 0..100 {
            a.record(sign_record(i));
            i += 1;
        }
        !a.stats().sink_healthy
    });
    fail_closed_refuses(&a);
}

#[test]
fn fail_open_counts_the_loss_and_chains_a_lost_record() {
    let dir = tempdir();
    let fifo = dir.path().join("audit.fifo");
    mkfifo(&fifo);
    let a = Auditor::start(file_cfg(&fifo, OnFailure::FailOpen, 16), None).expect("start");
    // Nothing reads yet: 16 records wait in the queue, the rest are lost.
    for i in 0..100 {
        assert!(a.admit(), "fail-open always admits");
        a.record(sign_record(i));
    }
    let st = a.stats();
    assert_eq!((st.queued, st.lost, st.written), (16, 84, 0), "{st:?}");
    assert!(!st.sink_healthy);

    // A reader arrives: the writer's next retry opens the FIFO.
    let (tx, rx) = mpsc::channel();
    let reader_path = fifo.clone();
    std::thread::spawn(move || {
        let mut data = Vec::new();
        let r = std::fs::File::open(&reader_path).and_then(|mut f| f.read_to_end(&mut data));
        let _ = tx.send(r.map(|_| data));
    });
    wait_for("the queued records to be written", || {
        a.stats().written == 16
    });
    assert!(a.stats().sink_healthy);
    a.stop(Duration::from_secs(10));
    let data = rx
        .recv_timeout(HANG)
        .expect("the reader ends when the writer closes the FIFO")
        .expect("read the FIFO");

    let log = dir.path().join("audit.log");
    std::fs::write(&log, &data).expect("write copy");
    let r = verify(std::slice::from_ref(&log), &VerifyKey::None).expect("verify");
    assert!(r.ok(), "{r:?}");
    assert!(r.chains[0].terminated);
    let lines: Vec<serde_json::Value> = data
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).expect("json"))
        .collect();
    // start, the loss made explicit as soon as the sink took the start
    // record, the 16 records that waited in the queue, stop.
    let kinds: Vec<&str> = lines.iter().map(|l| l["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds[0], "start");
    assert_eq!(kinds[1], "lost");
    assert_eq!(lines[1]["detail"], "84 records lost");
    assert_eq!(kinds[2..18], ["key_use"; 16]);
    assert_eq!(kinds[18..], ["stop"]);
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Kills the child on drop, so a failing assertion leaves no process.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn records_synced_before_a_sigkill_survive_it() {
    let dir = tempdir();
    let log = dir.path().join("audit.log");
    let key = b"crash-test-hmac-key-0123456789ab".to_vec();
    let mut child = Killed(
        Command::new(env!("CARGO_BIN_EXE_audit-writer"))
            .arg(&log)
            .env("AUDIT_HMAC_KEY", hex(&key))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn audit-writer"),
    );
    let stdout = child.0.stdout.take().expect("stdout");
    let mut acked = 0u64;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("read child");
        acked = line
            .strip_prefix("synced ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unexpected line {line:?}"));
        if acked >= 300 {
            break;
        }
    }
    assert!(acked >= 300, "the writer stopped early");
    // SAFETY: signalling our own child, which has not been waited for.
    assert_eq!(unsafe { libc::kill(child.0.id() as i32, libc::SIGKILL) }, 0);
    let status = child.0.wait().expect("wait");
    assert!(!status.success());

    let key = VerifyKey::Hmac(Zeroizing::new(key));
    let r = verify(std::slice::from_ref(&log), &key).expect("verify");
    assert!(r.ok(), "{r:?}");
    assert_eq!(r.chains.len(), 1);
    let c = &r.chains[0];
    assert!(!c.terminated, "killed: no stop record");
    assert!(c.verified >= 300 / 25, "{c:?}");
    assert!(
        r.warnings.iter().any(|w| w.contains("unterminated")),
        "{:?}",
        r.warnings
    );
    // Every acknowledged record is there, in order.
    let text = std::fs::read_to_string(&log).expect("read log");
    let ns: Vec<u64> = text
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            v["detail"].as_str()?.strip_prefix("n=")?.parse().ok()
        })
        .collect();
    assert!(
        ns.len() as u64 >= acked,
        "{} records in the file, {acked} acknowledged",
        ns.len()
    );
    assert!(ns.iter().enumerate().all(|(i, &n)| i as u64 == n));
}

#[test]
fn syslog_gets_every_record_as_a_datagram() {
    let dir = tempdir();
    let sock_path = dir.path().join("log.sock");
    let server = UnixDatagram::bind(&sock_path).expect("bind");
    server.set_read_timeout(Some(HANG)).expect("timeout");
    let signer = Signer::hmac(Zeroizing::new(b"syslog-test-key".to_vec()));
    let verify_key = signer.verify_key();
    let cfg = Config {
        syslog: Some(SyslogSink {
            ident: "p11shim-test".into(),
            facility: Facility::AuthPriv,
            socket: sock_path.clone(),
        }),
        checkpoint_records: 3,
        ..Config::default()
    };
    let a = Auditor::start(cfg, Some(signer)).expect("start");
    assert!(a.admit());
    for i in 0..5 {
        assert!(a.record(sign_record(i)));
    }
    let mut denial = Record::new(Kind::Denial, "C_SignInit", 0x68);
    denial.detail = Some("role web may not sign with k1".into());
    assert!(a.record(denial));
    a.stop(Duration::from_secs(10));
    assert_eq!(a.stats().written, 6);

    // start, 3 records, checkpoint, 3 records, checkpoint, stop.
    let header = format!("p11shim-test[{}]: ", std::process::id());
    let mut lines = Vec::new();
    let mut pris = Vec::new();
    let mut buf = vec![0u8; 65536];
    for _ in 0..10 {
        let n = server.recv(&mut buf).expect("datagram");
        let msg = std::str::from_utf8(&buf[..n]).expect("utf-8");
        let (pri, rest) = msg[1..].split_once('>').expect("<PRI>");
        let json = rest
            .strip_prefix(&header)
            .unwrap_or_else(|| panic!("{msg}"));
        pris.push(pri.parse::<u32>().expect("pri"));
        lines.push(json.to_owned());
    }
    // authpriv (10): notice (5) for the chain's own records, warning (4)
    // for the denial, info (6) for key use.
    assert_eq!(pris, [85, 86, 86, 86, 85, 86, 86, 84, 85, 85]);
    assert!(lines[7].contains("\"kind\":\"denial\""));
    // The datagrams are the chain itself: they verify, signatures included.
    let copy = dir.path().join("from-syslog.log");
    std::fs::write(
        &copy,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .expect("write");
    let r = verify(&[copy], &verify_key).expect("verify");
    assert!(r.ok_strict(), "{r:?}");
    assert_eq!(r.chains[0].verified, 3);
}

#[test]
fn a_missing_syslog_socket_fails_closed() {
    let dir = tempdir();
    let cfg = Config {
        syslog: Some(SyslogSink {
            socket: dir.path().join("no-such.sock"),
            ..SyslogSink::default()
        }),
        queue: 32,
        ..Config::default()
    };
    let a = Auditor::start(cfg, None).expect("start");
    assert!(!a.stats().sink_healthy);
    fail_closed_refuses(&a);
}
