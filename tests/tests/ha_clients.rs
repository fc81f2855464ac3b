//! Real PKCS#11 clients signing through an HA slot of three members while
//! members fail (see docs/ha.md).
//!
//! pkcs11-tool and OpenSSL's pkcs11 engine sign once per process: members
//! fail between processes (each then starts with a member down), and, for
//! OpenSSL, in the middle of the signature. Java's SunPKCS11 signs 200 times
//! in one process, pausing mid-signature at chosen points while the test
//! makes members fail under its open sessions. Every signature is verified
//! in software; p11shim's debug log must show the failovers, and that no
//! call of a client failed.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use p11shim_tests::{FaultyMember, TestEnv, USER_PIN, p11shim_lib, require, run_ok, softhsm_lib};

mod common;
use common::{compile_java, openssl, openssl_cnf, openssl_verify, sunpkcs11_cfg, text, write};

/// Label of the virtual slot ([`TestEnv::ha_config`]).
const SLOT: &str = "ha";
/// The key pair every member holds ([`TestEnv::ha_members`]).
const KEY_ID: &str = "01";
const KEY_LABEL: &str = "rsa";
/// Bound on every wait: for a line of a client, for p11shim's recovery.
const WAIT: Duration = Duration::from_secs(30);

/// Three members holding the RSA key pair, behind virtual slot 0 `ha`.
struct Ha {
    env: TestEnv,
    members: Vec<FaultyMember>,
    /// The public key (DER), taken in software from the key pair imported
    /// into the members.
    pubkey: PathBuf,
}

fn ha(extra: &str) -> Ha {
    let env = TestEnv::new();
    let members = env.ha_members(3);
    env.ha_config(
        &members,
        &format!("recovery_interval_ms = 20\nrecovery_max_interval_ms = 100\n{extra}"),
    );
    let pubkey = env.path().join("rsa.pub.der");
    run_ok(
        Command::new("openssl")
            .args(["pkey", "-in"])
            .arg(env.path().join("rsa.pem"))
            .args(["-pubout", "-outform", "DER", "-out"])
            .arg(&pubkey),
    );
    Ha {
        env,
        members,
        pubkey,
    }
}

/// A member's name in p11shim's log.
fn member(i: usize) -> String {
    format!("{SLOT}#{i}")
}

impl Ha {
    /// A client command: the test's environment, p11shim logging at debug
    /// level (every failed call is logged), nothing to read from a terminal.
    fn client(&self, program: &str) -> Command {
        let mut c = self.env.command(program);
        c.env("P11SHIM_LOG", "debug").stdin(Stdio::null());
        c
    }

    /// `pkcs11-tool` on p11shim.
    fn pkcs11_tool(&self) -> Command {
        let mut c = self.client("pkcs11-tool");
        c.arg("--module").arg(p11shim_lib());
        c
    }

    /// Where the log ends now.
    fn log_mark(&self) -> usize {
        self.env.log().len()
    }

    /// The log written since `mark`.
    fn log_since(&self, mark: usize) -> String {
        self.env.log().get(mark..).unwrap_or_default().to_owned()
    }

    /// Forgets the members' call counts.
    fn reset_calls(&self) {
        for m in &self.members {
            m.reset_calls();
        }
    }

    /// The members on which the last process that finished called
    /// `C_Sign` or `C_SignFinal` (faulted calls included).
    fn signers(&self) -> Vec<usize> {
        (0..self.members.len())
            .filter(|&i| {
                let calls = self.members[i].calls();
                calls.get("C_Sign").copied().unwrap_or(0)
                    + calls.get("C_SignFinal").copied().unwrap_or(0)
                    > 0
            })
            .collect()
    }

    /// Waits (bounded) until every member marked down since `mark` has
    /// recovered as often: the recovery thread's work, while the client is
    /// paused.
    fn wait_recovered(&self, mark: usize) -> String {
        let start = Instant::now();
        loop {
            let log = self.log_since(mark);
            let pending: Vec<String> = (0..self.members.len())
                .map(member)
                .filter(|m| {
                    count(&log, "member marked down", m) > count(&log, "member recovered", m)
                })
                .collect();
            if pending.is_empty() {
                return log;
            }
            assert!(
                start.elapsed() < WAIT,
                "{pending:?} not recovered within {WAIT:?}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Log lines with `what` about member `m`.
fn lines_about<'a>(log: &'a str, what: &str, m: &str) -> Vec<&'a str> {
    let field = format!("member={m}");
    log.lines()
        .filter(|l| l.contains(what) && l.split_whitespace().any(|w| w == field))
        .collect()
}

fn count(log: &str, what: &str, m: &str) -> usize {
    lines_about(log, what, m).len()
}

/// The "session moved" lines from member `from`.
fn moves_from<'a>(log: &'a str, from: &str) -> Vec<&'a str> {
    let field = format!("from={from}");
    log.lines()
        .filter(|l| l.contains("session moved") && l.split_whitespace().any(|w| w == field))
        .collect()
}

/// The calls of a client that failed, as p11shim logs them at debug level.
/// None of the clients here gets an error when nothing fails (an attribute
/// a key lacks, say), so any is one the HA slot let through.
fn client_errors(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains("call failed")).collect()
}

fn assert_no_client_errors(log: &str, context: &str) {
    let errors = client_errors(log);
    assert!(
        errors.is_empty(),
        "{context}: calls failed for the client:\n{}\n--- p11shim log\n{log}",
        errors.join("\n")
    );
}

/// Checks one client process: it succeeded, and none of its calls failed.
fn assert_client_ok(what: &str, out: &Output, log: &str) {
    let errors = client_errors(log);
    assert!(
        out.status.success() && errors.is_empty(),
        "{what}: the client ended with {}; its calls that failed:\n{}\n--- client output\n{}\n--- p11shim log\n{log}",
        out.status,
        errors.join("\n"),
        text(out)
    );
}

impl Ha {
    /// `pkcs11-tool --sign` of a new message `name`, verified with openssl;
    /// returns the p11shim log of the process.
    fn pkcs11_tool_sign(&self, name: &str) -> String {
        let msg = write(
            &self.env,
            &format!("{name}.txt"),
            format!("pkcs11-tool signs {name}\n"),
        );
        let sig = self.env.path().join(format!("{name}.sig"));
        let mark = self.log_mark();
        let out = self
            .pkcs11_tool()
            .args([
                "--login",
                "--pin",
                USER_PIN,
                "--sign",
                "-m",
                "SHA256-RSA-PKCS",
                "--id",
                KEY_ID,
                "-i",
            ])
            .arg(&msg)
            .arg("-o")
            .arg(&sig)
            .output()
            .expect("run pkcs11-tool");
        let log = self.log_since(mark);
        assert_client_ok(name, &out, &log);
        openssl_verify(&self.env, &self.pubkey, &msg, &sig);
        log
    }

    /// `openssl dgst -sign` of a new message `name` with the token's key,
    /// through the pkcs11 engine configured by `cnf` (the slot has the PIN
    /// source `env:P11SHIM_PIN`: no PIN in the URI), verified with openssl;
    /// returns the p11shim log of the process.
    fn openssl_sign(&self, cnf: &Path, name: &str) -> String {
        let msg = write(
            &self.env,
            &format!("{name}.txt"),
            format!("OpenSSL signs {name}\n"),
        );
        let sig = self.env.path().join(format!("{name}.sig"));
        let uri = format!("pkcs11:token={SLOT};object={KEY_LABEL};type=private");
        let mark = self.log_mark();
        let out = openssl(&self.env, cnf)
            .env("P11SHIM_LOG", "debug")
            .env("P11SHIM_PIN", USER_PIN)
            .stdin(Stdio::null())
            .args([
                "dgst", "-sha256", "-engine", "pkcs11", "-keyform", "engine", "-sign", &uri, "-out",
            ])
            .arg(&sig)
            .arg(&msg)
            .output()
            .expect("run openssl");
        let log = self.log_since(mark);
        assert_client_ok(name, &out, &log);
        openssl_verify(&self.env, &self.pubkey, &msg, &sig);
        log
    }

    /// The calls p11shim's `C_Initialize` makes on member `m` (finding its
    /// token), counted in a pkcs11-tool process that asks nothing of the
    /// slot's members.
    fn calls_at_start_up(&self, m: usize) -> u64 {
        self.reset_calls();
        run_ok(self.pkcs11_tool().arg("--show-info"));
        let n = self.members[m].calls().values().sum();
        assert!(n > 0, "no call counted on {}", member(m));
        n
    }
}

// ---------------------------------------------------------------------------
// OpenSC pkcs11-tool: one process per signature.

/// 30 pkcs11-tool processes sign distinct messages; after the first ten the
/// member that served them fails every call, after the next ten the member
/// that served those disappears. Each process starts with those members
/// down, signs on the remaining one, and every signature verifies.
#[test]
fn pkcs11_tool_signs_while_members_fail() {
    if !require("pkcs11-tool") || !require("openssl") || !require("softhsm2-util") {
        return;
    }
    let ha = ha("");
    // The check that no call of a client failed sees one that did.
    let mark = ha.log_mark();
    let out = ha
        .pkcs11_tool()
        .args(["--login", "--pin", "0000", "--list-objects"])
        .output()
        .expect("run pkcs11-tool");
    let log = ha.log_since(mark);
    assert!(!out.status.success(), "a wrong PIN worked:\n{}", text(&out));
    assert!(
        client_errors(&log)
            .iter()
            .any(|l| l.contains("C_Login") && l.contains("CKR_PIN_INCORRECT")),
        "the wrong PIN is not logged as a failed call:\n{log}"
    );

    let mut served: Vec<usize> = Vec::new();
    for i in 0..30 {
        if i == 10 {
            ha.members[served[0]].set("fail all CKR_DEVICE_ERROR\n");
        }
        if i == 20 {
            ha.members[served[10]].set("remove\n");
        }
        ha.reset_calls();
        let log = ha.pkcs11_tool_sign(&format!("message-{i}"));
        let signers = ha.signers();
        assert_eq!(
            signers.len(),
            1,
            "message {i}: signed on {signers:?}\n{log}"
        );
        served.push(signers[0]);
    }

    let (first, second, third) = (served[0], served[10], served[20]);
    assert!(
        served[..10].iter().all(|&m| m == first)
            && served[10..20].iter().all(|&m| m == second)
            && served[20..].iter().all(|&m| m == third),
        "members that signed: {served:?}"
    );
    assert!(
        first != second && third != first && third != second,
        "a failed member signed: {served:?}"
    );
    // Each process found the failed members down when it started.
    let log = ha.env.log();
    for (m, processes) in [(first, 20), (second, 10)] {
        assert_eq!(
            count(&log, "member token not found", &member(m)),
            processes,
            "{}: not seen down at start-up:\n{log}",
            member(m)
        );
    }
}

/// pkcs11-tool signs while the member p11shim's start-up found, and that
/// slot-level questions go to, fails every call from then on: the slot
/// still has two members up, so the client must not see the failure.
#[test]
fn pkcs11_tool_signs_when_a_member_fails_right_after_start_up() {
    if !require("pkcs11-tool") || !require("openssl") || !require("softhsm2-util") {
        return;
    }
    let ha = ha("");
    let start_up = ha.calls_at_start_up(0);
    ha.members[0].set(&format!("fail all CKR_DEVICE_ERROR after {start_up}\n"));
    for i in 0..3 {
        ha.reset_calls();
        let log = ha.pkcs11_tool_sign(&format!("message-{i}"));
        assert!(
            count(&log, "member marked down", &member(0)) == 1,
            "message {i}: {} not marked down:\n{log}",
            member(0)
        );
        assert_eq!(ha.signers(), [1], "message {i}\n{log}");
    }
}

// ---------------------------------------------------------------------------
// OpenSSL's pkcs11 engine: one process per signature.

/// 12 `openssl dgst -sign` processes with the key in the token (the PIN
/// from the slot's PIN source): in the middle four, member a, which serves
/// each process first, fails its C_Sign, so the signature in progress moves
/// to member b; in the last four, a and b are down from the start. Every
/// signature verifies.
#[test]
fn openssl_engine_signs_while_members_fail() {
    if !require("openssl") || !require("softhsm2-util") {
        return;
    }
    let ha = ha("pin = \"env:P11SHIM_PIN\"");
    let cnf = openssl_cnf(&ha.env);
    for i in 0..12 {
        match i {
            4 => ha.members[0].set("fail C_Sign CKR_DEVICE_ERROR\n"),
            8 => {
                ha.members[0].set("fail all CKR_DEVICE_ERROR\n");
                ha.members[1].set("remove\n");
            }
            _ => {}
        }
        let log = ha.openssl_sign(&cnf, &format!("message-{i}"));
        // openssl does not finalize the engine: the members' call counts
        // are not written, the log tells where the signature went.
        match i {
            0..4 => {
                assert!(!log.contains("session moved"), "message {i}\n{log}");
                assert!(!log.contains("member marked down"), "message {i}\n{log}");
            }
            4..8 => {
                let moved = moves_from(&log, &member(0));
                assert!(
                    moved.len() == 1
                        && moved[0].contains(&format!("to={}", member(1)))
                        && moved[0].contains("reason=CKR_DEVICE_ERROR"),
                    "message {i}: the signature did not move from a to b:\n{log}"
                );
                assert_eq!(
                    count(&log, "member marked down", &member(0)),
                    1,
                    "message {i}\n{log}"
                );
            }
            _ => {
                assert!(!log.contains("session moved"), "message {i}\n{log}");
                for m in [0, 1] {
                    assert_eq!(
                        count(&log, "member token not found", &member(m)),
                        1,
                        "message {i}: {} not seen down at start-up\n{log}",
                        member(m)
                    );
                }
            }
        }
    }
}

/// OpenSSL signs while the member p11shim's start-up found, and that
/// slot-level questions go to, fails every call from then on: the slot
/// still has two members up, so the client must not see the failure.
#[test]
fn openssl_engine_signs_when_a_member_fails_right_after_start_up() {
    if !require("openssl") || !require("pkcs11-tool") || !require("softhsm2-util") {
        return;
    }
    let ha = ha("pin = \"env:P11SHIM_PIN\"");
    let cnf = openssl_cnf(&ha.env);
    let start_up = ha.calls_at_start_up(0);
    ha.members[0].set(&format!("fail all CKR_DEVICE_ERROR after {start_up}\n"));
    for i in 0..3 {
        let log = ha.openssl_sign(&cnf, &format!("message-{i}"));
        assert!(
            count(&log, "member marked down", &member(0)) == 1,
            "message {i}: {} not marked down:\n{log}",
            member(0)
        );
    }
}

// ---------------------------------------------------------------------------
// Java SunPKCS11: one process, failures under its open sessions.

/// A client process driven through its standard streams: each line of its
/// output is awaited with a deadline, and it is killed if the test ends
/// first.
struct Driven {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    transcript: Vec<String>,
    stderr: Option<JoinHandle<String>>,
}

impl Driven {
    fn spawn(cmd: &mut Command) -> Driven {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        let stdout = child.stdout.take().expect("stdout");
        let mut stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        Driven {
            stdin: child.stdin.take(),
            child,
            lines,
            transcript: Vec::new(),
            stderr: Some(stderr),
        }
    }

    fn output(&self) -> String {
        self.transcript.join("\n")
    }

    /// Reads lines until one that starts with `prefix`, and returns it.
    fn expect(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) => {
                    self.transcript.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("no {prefix:?} within {WAIT:?}:\n{}", self.output())
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let _ = self.child.wait();
                    let stderr = self.stderr.take().map(|h| h.join().unwrap_or_default());
                    panic!(
                        "the client ended before {prefix:?}:\n{}\n--- stderr\n{}",
                        self.output(),
                        stderr.unwrap_or_default()
                    )
                }
            }
        }
    }

    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .expect("write to the client");
    }

    /// Reads the rest of the output and waits for the exit; returns the
    /// status, and the output with standard error.
    fn finish(mut self) -> (ExitStatus, String) {
        self.stdin = None;
        let deadline = Instant::now() + WAIT;
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) => self.transcript.push(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    panic!("the client did not end within {WAIT:?}:\n{}", self.output())
                }
            }
        }
        let status = self.child.wait().expect("wait for the client");
        let stderr = self
            .stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        (status, format!("{}\n--- stderr\n{stderr}", self.output()))
    }
}

impl Drop for Driven {
    fn drop(&mut self) {
        // Only a client still running when the test failed.
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One Java process loads the PKCS11 KeyStore once and signs SHA256withRSA
/// 200 times, each signature in two updates. Three times it stops between
/// the updates of a signature while members fail under its sessions:
///
/// 1. at 50, member a fails every call and member b's token disappears;
/// 2. at 100, a and b are back, and member c, where all the work went,
///    restarts: its sessions and login are gone, and the signature in
///    progress is carried over to a or b;
/// 3. at 150, c is back, and a fails every call while b fails
///    C_SignUpdate: the signature in progress, on a or b, ends up on c.
///
/// Every signature verifies in software against the certificate, no call
/// of Java's fails, and the log shows the sessions moved.
#[test]
fn java_sunpkcs11_keeps_signing_while_members_fail_under_its_sessions() {
    if !require("javac")
        || !require("java")
        || !require("pkcs11-tool")
        || !require("openssl")
        || !require("softhsm2-util")
    {
        return;
    }
    let ha = ha("");
    let env = &ha.env;
    let [a, b, c] = [&ha.members[0], &ha.members[1], &ha.members[2]];

    // SunPKCS11 lists a private key with a certificate of the same CKA_ID
    // only. The certificate (made in software for the members' key pair)
    // is written through the virtual slot, which replicates it to every
    // member.
    let cert = env.path().join("rsa.cert.der");
    run_ok(
        Command::new("openssl")
            .args(["req", "-x509", "-new", "-key"])
            .arg(env.path().join("rsa.pem"))
            .args(["-subj", "/CN=rsa", "-days", "2", "-outform", "DER", "-out"])
            .arg(&cert),
    );
    let out = text(&run_ok(
        ha.pkcs11_tool()
            .args(["--login", "--pin", USER_PIN, "--write-object"])
            .arg(&cert)
            .args(["--type", "cert", "--id", KEY_ID, "--label", KEY_LABEL]),
    ));
    assert!(out.contains("Created certificate"), "{out}");
    for m in &ha.members {
        let out = text(&run_ok(
            env.command("pkcs11-tool")
                .arg("--module")
                .arg(softhsm_lib())
                .args([
                    "--token-label",
                    &m.token,
                    "--list-objects",
                    "--type",
                    "cert",
                ]),
        ));
        let words = out.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            words.contains(&format!("label: {KEY_LABEL}"))
                && words.contains(&format!("ID: {KEY_ID}")),
            "{}: the certificate was not replicated:\n{out}",
            m.token
        );
    }

    let cfg = sunpkcs11_cfg(env);
    let classes = compile_java(env, "HaSign.java");
    let start = ha.log_mark();
    let mut java = Driven::spawn(
        ha.client("java")
            .arg("-cp")
            .arg(&classes)
            .arg("HaSign")
            .arg(&cfg)
            .arg(USER_PIN)
            .args(["200", "50,100,150"]),
    );
    java.expect(&format!("LOADED {KEY_LABEL} RSA"));

    java.expect("PAUSED 50");
    let first = ha.log_mark();
    a.set("fail all CKR_DEVICE_ERROR\n");
    b.set("remove\n");
    java.send("go");

    java.expect("PAUSED 100");
    a.heal();
    b.heal();
    ha.wait_recovered(start);
    let second = ha.log_mark();
    c.set("restart 1\n");
    java.send("go");

    java.expect("PAUSED 150");
    ha.wait_recovered(start);
    let third = ha.log_mark();
    a.set("fail all CKR_DEVICE_ERROR\n");
    b.set("fail C_SignUpdate CKR_DEVICE_ERROR\n");
    java.send("go");

    let (status, out) = java.finish();
    let log = ha.log_since(start);
    assert!(
        status.success() && out.contains("signed: 200 verified: 200 failed: 0"),
        "Java failed ({status}):\n{out}\n--- p11shim log\n{log}"
    );
    assert!(!out.contains("FAILED"), "{out}");
    assert_no_client_errors(&log, "Java");

    // 1: the sessions in use on a or b moved to c.
    let phase1 = &env.log()[first..second];
    let moved: Vec<&str> = [0, 1]
        .iter()
        .flat_map(|&m| moves_from(phase1, &member(m)))
        .collect();
    assert!(!moved.is_empty(), "no session moved from a or b:\n{log}");
    for line in moved {
        assert!(line.contains(&format!("to={}", member(2))), "{line}\n{log}");
    }
    // 2: the signature in progress on c lost its session and moved.
    let phase2 = &env.log()[second..third];
    let moved = moves_from(phase2, &member(2));
    assert!(
        moved
            .iter()
            .any(|l| l.contains("reason=CKR_SESSION_HANDLE_INVALID")),
        "the restart of c moved no session:\n{log}"
    );
    assert!(
        count(phase2, "member marked down", &member(2)) >= 1,
        "c was not marked down:\n{log}"
    );
    // 3: it was on a or b, and moved (through the other) to c.
    let phase3 = ha.log_since(third);
    let moved: Vec<&str> = [0, 1]
        .iter()
        .flat_map(|&m| moves_from(&phase3, &member(m)))
        .collect();
    assert!(
        moved
            .iter()
            .any(|l| l.contains(&format!("to={}", member(2)))
                && l.contains("reason=CKR_DEVICE_ERROR")),
        "no session moved from a or b to c:\n{log}"
    );
    println!("{log}\n{out}");
    println!(
        "Java: 200 signatures verified; {} sessions moved, {} members marked down, {} recovered",
        log.matches("session moved").count(),
        log.matches("member marked down").count(),
        log.matches("member recovered").count()
    );
}
