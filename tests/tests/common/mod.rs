//! Helpers shared by the real-client tests (`clients.rs`, `ha_clients.rs`):
//! running commands, verifying signatures with openssl in software, and the
//! configurations of OpenSSL's pkcs11 engine and Java's SunPKCS11 over
//! p11shim.

// Each test file uses its own subset.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use p11shim_tests::{TestEnv, p11shim_lib, repo_root, run_ok};

/// Both output streams, for assertions and failure messages.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a command that must fail; returns both streams.
pub fn run_fail(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        !out.status.success(),
        "{cmd:?} succeeded but must fail:\n{}",
        text(&out)
    );
    text(&out)
}

/// Writes a file in the test's directory and returns its path.
pub fn write(env: &TestEnv, name: &str, data: impl AsRef<[u8]>) -> PathBuf {
    let p = env.path().join(name);
    std::fs::write(&p, data).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    p
}

/// Checks with openssl, in software, that `sig` is a SHA-256 signature
/// (PKCS#1 v1.5 or DER ECDSA) of `msg` by `pubkey`, and that it does not
/// verify for another message.
pub fn openssl_verify(env: &TestEnv, pubkey: &Path, msg: &Path, sig: &Path) {
    let out = run_ok(
        env.command("openssl")
            .args(["dgst", "-sha256", "-keyform", "DER", "-verify"])
            .arg(pubkey)
            .arg("-signature")
            .arg(sig)
            .arg(msg),
    );
    assert!(text(&out).contains("Verified OK"), "{}", text(&out));
    let other = write(env, "other-message.txt", "not the signed message");
    let out = run_fail(
        env.command("openssl")
            .args(["dgst", "-sha256", "-keyform", "DER", "-verify"])
            .arg(pubkey)
            .arg("-signature")
            .arg(sig)
            .arg(other),
    );
    assert!(out.contains("Verification failure"), "{out}");
}

/// The OpenSSL engine module of the pkcs11 engine (libengine-pkcs11-openssl).
pub fn pkcs11_engine() -> PathBuf {
    let out = run_ok(Command::new("openssl").args(["version", "-e"]));
    let dir = text(&out)
        .split('"')
        .nth(1)
        .map(PathBuf::from)
        .expect("ENGINESDIR in `openssl version -e`");
    let engine = dir.join("pkcs11.so");
    assert!(
        engine.exists(),
        "{} is missing (apt-get install libengine-pkcs11-openssl)",
        engine.display()
    );
    engine
}

/// Writes an openssl.cnf that loads the pkcs11 engine over p11shim: the
/// annotated conf/openssl-pkcs11.cnf with this machine's paths.
pub fn openssl_cnf(env: &TestEnv) -> PathBuf {
    let example = repo_root().join("conf/openssl-pkcs11.cnf");
    let example =
        std::fs::read_to_string(&example).unwrap_or_else(|e| panic!("{}: {e}", example.display()));
    let cnf: Vec<String> = example
        .lines()
        .map(|line| match line.split_once(" = ") {
            Some(("dynamic_path", _)) => format!("dynamic_path = {}", pkcs11_engine().display()),
            Some(("MODULE_PATH", _)) => format!("MODULE_PATH = {}", p11shim_lib().display()),
            _ => line.to_owned(),
        })
        .collect();
    write(env, "openssl.cnf", cnf.join("\n") + "\n")
}

/// `openssl` reading the test's openssl.cnf.
pub fn openssl(env: &TestEnv, cnf: &Path) -> Command {
    let mut c = env.command("openssl");
    c.env("OPENSSL_CONF", cnf);
    c
}

/// A SunPKCS11 configuration naming p11shim and virtual slot 0.
pub fn sunpkcs11_cfg(env: &TestEnv) -> PathBuf {
    write(
        env,
        "sunpkcs11.cfg",
        format!(
            "name = p11shim\nlibrary = {}\nslot = 0\n",
            p11shim_lib().display()
        ),
    )
}

/// Compiles a program of tests/clients/java (e.g. `P11Sign.java`) into the
/// test's directory and returns the class path.
pub fn compile_java(env: &TestEnv, source: &str) -> PathBuf {
    let classes = env.path().join("java-classes");
    run_ok(
        env.command("javac")
            .arg("-d")
            .arg(&classes)
            .arg(repo_root().join("tests/clients/java").join(source)),
    );
    classes
}

/// Java's SunPKCS11 signing `count` times through p11shim's slot 0 with an
/// empty keystore password (tests/clients/java/HaSign.java); returns the
/// program's output after checking that every signature verified.
pub fn java_signs_without_pin(env: &TestEnv, count: u32) -> String {
    let cfg = sunpkcs11_cfg(env);
    let classes = compile_java(env, "HaSign.java");
    let out = text(&run_ok(
        env.command("java")
            .arg("-cp")
            .arg(&classes)
            .arg("HaSign")
            .arg(&cfg)
            .args(["", &count.to_string(), ""]),
    ));
    let want = format!("signed: {count} verified: {count} failed: 0");
    assert!(out.contains(&want), "{out}");
    out
}

/// pkcs11-tool signs `message <n>` with the key of id 01 through p11shim,
/// logging in with no PIN (the slot's PIN source supplies it). Returns the
/// message, the signature path and the process output.
pub fn pkcs11_tool_sign_without_pin(env: &TestEnv, n: u32) -> (PathBuf, PathBuf, Output) {
    let msg = write(env, &format!("msg{n}.txt"), format!("message {n}\n"));
    let sig = env.path().join(format!("msg{n}.sig"));
    let out = env
        .command("pkcs11-tool")
        .arg("--module")
        .arg(p11shim_lib())
        .args(["--login", "--sign", "--id", "01", "-m", "SHA256-RSA-PKCS"])
        .arg("--input-file")
        .arg(&msg)
        .arg("--output-file")
        .arg(&sig)
        .output()
        .expect("pkcs11-tool");
    (msg, sig, out)
}
