//! Test harness: SoftHSM2 token directories, p11shim configurations and
//! module paths, for tests that each run in their own process (nextest).
//!
//! Every test gets its own temporary directory holding a `softhsm2.conf`,
//! its token directory and its `p11shim.toml`; [`TestEnv::apply`] points
//! this process at them, [`TestEnv::command`] a child process.

#![allow(clippy::undocumented_unsafe_blocks, clippy::manual_c_str_literals)]

pub mod abi;

pub use abi::{status_fn, status_json};
pub mod peers;
pub mod scenarios;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub use tempfile::TempDir;

/// SO PIN of the tokens made by [`TestEnv::init_token`].
pub const SO_PIN: &str = "5678";
/// User PIN of the tokens made by [`TestEnv::init_token`].
pub const USER_PIN: &str = "1234";

/// The SoftHSM2 module of the machine.
pub fn softhsm_lib() -> PathBuf {
    if let Some(p) = std::env::var_os("SOFTHSM2_LIB") {
        return PathBuf::from(p);
    }
    for p in [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/local/lib/softhsm/libsofthsm2.so",
    ] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!("SoftHSM2 is not installed (apt-get install softhsm2, or `make test` installs it)");
}

/// The workspace's target directory for the running test's profile.
pub fn target_dir() -> PathBuf {
    // The test binary lives in target/<profile>/deps/.
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf()
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

/// The p11shim module under test: `P11SHIM_LIB`, else the one built next
/// to the test binary (`cargo build -p p11shim` builds it; `make test` does).
pub fn p11shim_lib() -> PathBuf {
    if let Some(p) = std::env::var_os("P11SHIM_LIB") {
        return PathBuf::from(p);
    }
    let p = target_dir().join("libp11shim.so");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build -p p11shim` (make test does)",
        p.display()
    );
    p
}

/// The fault-injecting module built from `tests/faultmod`
/// (`cargo build -p p11shim-faultmod`; `make test` does).
pub fn faultmod_lib() -> PathBuf {
    let p = target_dir().join("libp11faultmod.so");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build -p p11shim-faultmod` (make test does)",
        p.display()
    );
    p
}

/// One HA member behind its own copy of the fault module: writing its
/// control file injects faults into that member only.
#[derive(Debug, Clone)]
pub struct FaultyMember {
    /// The copy of the fault module the member is loaded through.
    pub library: PathBuf,
    /// The member's token label.
    pub token: String,
}

impl FaultyMember {
    fn control(&self) -> PathBuf {
        let mut p = self.library.clone().into_os_string();
        p.push(".ctl");
        PathBuf::from(p)
    }

    /// Replaces the member's fault rules (see `tests/faultmod/src/lib.rs`).
    pub fn set(&self, rules: &str) {
        let tmp = self.control().with_extension("ctl.tmp");
        std::fs::write(&tmp, rules).expect("write fault rules");
        std::fs::rename(&tmp, self.control()).expect("install fault rules");
    }

    /// Removes every fault.
    pub fn heal(&self) {
        self.set("");
    }

    /// Forgets the last dump of call counts, so that the next one (the
    /// next `C_Finalize` of a process using the member) stands alone.
    pub fn reset_calls(&self) {
        let mut p = self.library.clone().into_os_string();
        p.push(".calls");
        match std::fs::remove_file(PathBuf::from(p)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("remove the call counts: {e}"),
        }
    }

    /// Calls per function seen by the member, as of its last dump.
    pub fn calls(&self) -> std::collections::HashMap<String, u64> {
        let mut p = self.library.clone().into_os_string();
        p.push(".calls");
        std::fs::read_to_string(PathBuf::from(p))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                l.split_once(' ')
                    .and_then(|(f, n)| Some((f.to_owned(), n.parse().ok()?)))
            })
            .collect()
    }
}

/// Which module a scenario talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// SoftHSM2 called directly.
    Direct,
    /// SoftHSM2 through p11shim.
    Shim,
}

/// Whether an external tool is on the PATH.
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool} >/dev/null 2>&1"))
        .status()
        .is_ok_and(|s| s.success())
}

/// Fails the test when a tool is missing, unless `P11SHIM_ALLOW_SKIP=1`
/// (local runs without every client installed); CI never sets it.
/// Returns `false` when the caller should return early.
pub fn require(tool: &str) -> bool {
    if have(tool) {
        return true;
    }
    if std::env::var("P11SHIM_ALLOW_SKIP").as_deref() == Ok("1") {
        eprintln!("SKIPPED: {tool} is not installed");
        return false;
    }
    panic!(
        "{tool} is not installed; `make test` installs every client (set P11SHIM_ALLOW_SKIP=1 to skip locally)"
    );
}

/// One test's private SoftHSM2 tokens and p11shim configuration.
#[derive(Debug)]
pub struct TestEnv {
    pub dir: TempDir,
}

impl Default for TestEnv {
    fn default() -> Self {
        Self::new()
    }
}

impl TestEnv {
    /// A fresh directory with an empty SoftHSM2 token store.
    pub fn new() -> TestEnv {
        let dir = tempfile::Builder::new()
            .prefix("p11shim-test-")
            .tempdir()
            .expect("tempdir");
        std::fs::create_dir_all(dir.path().join("tokens")).expect("tokens dir");
        std::fs::write(
            dir.path().join("softhsm2.conf"),
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                dir.path().join("tokens").display()
            ),
        )
        .expect("softhsm2.conf");
        TestEnv { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn softhsm_conf(&self) -> PathBuf {
        self.path().join("softhsm2.conf")
    }

    pub fn config_path(&self) -> PathBuf {
        self.path().join("p11shim.toml")
    }

    /// Creates a token with [`SO_PIN`] and [`USER_PIN`].
    pub fn init_token(&self, label: &str) {
        self.init_token_with(label, SO_PIN, USER_PIN);
    }

    /// Creates a token with the given PINs.
    pub fn init_token_with(&self, label: &str, so_pin: &str, user_pin: &str) {
        let out = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", self.softhsm_conf())
            .args([
                "--init-token",
                "--free",
                "--label",
                label,
                "--so-pin",
                so_pin,
                "--pin",
                user_pin,
            ])
            .output()
            .expect("softhsm2-util (apt-get install softhsm2)");
        assert!(
            out.status.success(),
            "softhsm2-util: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Imports a PEM private key (PKCS#8) into a token, with its public key.
    pub fn import_key(&self, token: &str, pem: &Path, label: &str, id_hex: &str) {
        let out = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", self.softhsm_conf())
            .args(["--import"])
            .arg(pem)
            .args([
                "--token", token, "--label", label, "--id", id_hex, "--pin", USER_PIN,
            ])
            .output()
            .expect("softhsm2-util");
        assert!(
            out.status.success(),
            "softhsm2-util --import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A fresh RSA-2048 private key (PKCS#8 PEM) at `<dir>/rsa.pem`.
    pub fn rsa_pem(&self) -> PathBuf {
        let pem = self.path().join("rsa.pem");
        run_ok(
            Command::new("openssl")
                .args([
                    "genpkey",
                    "-algorithm",
                    "RSA",
                    "-pkeyopt",
                    "rsa_keygen_bits:2048",
                    "-out",
                ])
                .arg(&pem),
        );
        pem
    }

    /// A token `token` holding an RSA-2048 key pair (label `rsa`, id 01)
    /// with a self-signed certificate of the same id and label (as Java's
    /// KeyStore wants). Returns the public key (DER) for software checks.
    pub fn token_with_signing_key(&self, token: &str) -> PathBuf {
        self.init_token(token);
        self.add_signing_key(token, "rsa", "01")
    }

    /// Adds an RSA-2048 key pair and a self-signed certificate, all with
    /// the same label and id, to the token. Returns the public key (DER).
    pub fn add_signing_key(&self, token: &str, label: &str, id_hex: &str) -> PathBuf {
        let pem = self.path().join(format!("{label}.pem"));
        run_ok(
            Command::new("openssl")
                .args([
                    "genpkey",
                    "-algorithm",
                    "RSA",
                    "-pkeyopt",
                    "rsa_keygen_bits:2048",
                    "-out",
                ])
                .arg(&pem),
        );
        self.import_key(token, &pem, label, id_hex);
        let cert = self.path().join(format!("{label}.crt.der"));
        run_ok(
            Command::new("openssl")
                .args(["req", "-x509", "-new", "-key"])
                .arg(&pem)
                .args([
                    "-subj",
                    &format!("/CN={label}"),
                    "-days",
                    "30",
                    "-outform",
                    "DER",
                    "-out",
                ])
                .arg(&cert),
        );
        run_ok(
            self.command("pkcs11-tool")
                .arg("--module")
                .arg(softhsm_lib())
                .args([
                    "--token-label",
                    token,
                    "--login",
                    "--pin",
                    USER_PIN,
                    "--write-object",
                ])
                .arg(&cert)
                .args(["--type", "cert", "--id", id_hex, "--label", label]),
        );
        let pubkey = self.path().join(format!("{label}.pub.der"));
        run_ok(
            Command::new("openssl")
                .args(["pkey", "-in"])
                .arg(&pem)
                .args(["-pubout", "-outform", "DER", "-out"])
                .arg(&pubkey),
        );
        pubkey
    }

    /// `n` members named `ha-a`, `ha-b`, ...: a token each, holding the
    /// same RSA-2048 key pair (`rsa`, id 01), each loaded through its own
    /// copy of the fault module. Returns the members.
    pub fn ha_members(&self, n: usize) -> Vec<FaultyMember> {
        let pem = self.rsa_pem();
        (0..n)
            .map(|i| {
                let token = format!("ha-{}", (b'a' + i as u8) as char);
                self.init_token(&token);
                self.import_key(&token, &pem, "rsa", "01");
                let library = self
                    .path()
                    .join(format!("member-{}.so", (b'a' + i as u8) as char));
                std::fs::copy(faultmod_lib(), &library).expect("copy the fault module");
                FaultyMember { library, token }
            })
            .collect()
    }

    /// A one-slot configuration over HA members; `extra` is appended to the
    /// `[[slot]]` table.
    pub fn ha_config(&self, members: &[FaultyMember], extra: &str) -> PathBuf {
        let mut toml = format!(
            "[log]\nlevel = \"info\"\nfile = \"{}\"\n\n[[slot]]\nid = 0\nlabel = \"ha\"\n{extra}\n",
            self.path().join("p11shim.log").display()
        );
        for m in members {
            toml.push_str(&format!(
                "\n[[slot.member]]\nlibrary = \"{}\"\ntoken = \"{}\"\n",
                m.library.display(),
                m.token
            ));
        }
        self.write_config(&toml)
    }

    /// The module's diagnostic log written by [`TestEnv::ha_config`].
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path().join("p11shim.log")).unwrap_or_default()
    }

    /// Writes the p11shim configuration.
    pub fn write_config(&self, toml: &str) -> PathBuf {
        std::fs::write(self.config_path(), toml).expect("write p11shim.toml");
        self.config_path()
    }

    /// A one-slot configuration: virtual slot 0, labelled `label`, over the
    /// SoftHSM2 token `token`; `extra` is appended to the `[[slot]]` table
    /// (e.g. `pin = "env:X"`), `log` to the `[log]` table.
    pub fn single_slot_config(&self, label: &str, token: &str, extra: &str, log: &str) -> PathBuf {
        self.write_config(&format!(
            "[log]\nlevel = \"warn\"\n{log}\n\n[[slot]]\nid = 0\nlabel = \"{label}\"\n{extra}\n\n[[slot.member]]\nlibrary = \"{}\"\ntoken = \"{token}\"\n",
            softhsm_lib().display()
        ))
    }

    /// Points this process at the environment (one test per process).
    pub fn apply(&self) {
        // SAFETY: nextest runs every test in its own process, and the tests
        // set these before any thread that reads the environment starts.
        unsafe {
            std::env::set_var("SOFTHSM2_CONF", self.softhsm_conf());
            std::env::set_var("P11SHIM_CONFIG", self.config_path());
        }
    }

    /// A command with the environment set.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SOFTHSM2_CONF", self.softhsm_conf())
            .env("P11SHIM_CONFIG", self.config_path())
            .current_dir(self.path());
        c
    }

    /// The module path for a target.
    pub fn module(&self, target: Target) -> PathBuf {
        match target {
            Target::Direct => softhsm_lib(),
            Target::Shim => p11shim_lib(),
        }
    }
}

/// Runs a command and returns its output, failing the test with both
/// streams when it does not succeed.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
