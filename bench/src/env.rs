//! The benchmark's environment: a temporary SoftHSM2 token store with the
//! token "bench" and its objects, a p11shim configuration over it (and, for
//! `--acl`, a second one with a role's key ACL and the audit log), a
//! private p11-kit configuration that loads only SoftHSM2, and the command
//! line of a worker for each target.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use tempfile::TempDir;

use crate::p11::die;
use crate::worker::{
    EC_LABEL, HMAC_LABEL, HMAC_SESSION_LABEL, RSA_LABEL, SO_PIN, TOKEN_LABEL, USER_PIN,
};

/// What a worker talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// SoftHSM2 called directly.
    Direct,
    /// SoftHSM2 through p11shim.
    Shim,
    /// SoftHSM2 through p11-kit's proxy module.
    P11Kit,
    /// SoftHSM2 through p11shim with a role's key ACL and the audit log
    /// ([`BenchEnv::add_audited`]).
    ShimAudited,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Shim => "shim",
            Target::P11Kit => "p11kit",
            Target::ShimAudited => "shim-audited",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Target::Direct => "SoftHSM2",
            Target::Shim => "p11shim",
            Target::P11Kit => "p11-kit",
            Target::ShimAudited => "p11shim+ACL+audit",
        }
    }
}

fn first_existing(env: &str, candidates: &[&str]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    candidates.iter().map(PathBuf::from).find(|p| p.exists())
}

/// SoftHSM2's module (`SOFTHSM2_LIB` overrides).
pub fn softhsm_lib() -> PathBuf {
    first_existing(
        "SOFTHSM2_LIB",
        &[
            "/usr/lib/softhsm/libsofthsm2.so",
            "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
            "/usr/local/lib/softhsm/libsofthsm2.so",
        ],
    )
    .unwrap_or_else(|| {
        die("SoftHSM2 is not installed (apt-get install softhsm2; `make deps` installs it)")
    })
}

/// p11-kit's proxy module (`P11KIT_PROXY_LIB` overrides).
pub fn p11kit_lib() -> PathBuf {
    first_existing(
        "P11KIT_PROXY_LIB",
        &[
            "/usr/lib/x86_64-linux-gnu/p11-kit-proxy.so",
            "/usr/lib64/p11-kit-proxy.so",
            "/usr/lib/p11-kit-proxy.so",
        ],
    )
    .unwrap_or_else(|| {
        die("p11-kit's proxy module is not installed (apt-get install p11-kit-modules)")
    })
}

/// p11shim's module: `P11SHIM_LIB`, else the one built next to this binary.
pub fn shim_lib() -> PathBuf {
    if let Some(p) = std::env::var_os("P11SHIM_LIB") {
        return PathBuf::from(p);
    }
    let p = exe()
        .parent()
        .map(|d| d.join("libp11shim.so"))
        .unwrap_or_default();
    if !p.exists() {
        die(format_args!(
            "{} is missing: run `cargo build --release -p p11shim` (make bench does)",
            p.display()
        ));
    }
    p
}

pub fn exe() -> PathBuf {
    std::env::current_exe()
        .unwrap_or_else(|e| die(format_args!("cannot find this program's path: {e}")))
}

/// The unprivileged user and group that workers run as when the benchmark
/// runs as root (see [`BenchEnv::unprivileged_workers`]).
const NOBODY: (u32, u32) = (65534, 65534);

/// The temporary directory of a run and what is in it.
#[derive(Debug)]
pub struct BenchEnv {
    dir: TempDir,
    /// Workers run as this uid and gid (through `setpriv`).
    run_as: Option<(u32, u32)>,
}

impl BenchEnv {
    /// Creates the token, its objects and the configurations.
    pub fn create() -> BenchEnv {
        let dir = tempfile::Builder::new()
            .prefix("p11shim-bench-")
            .tempdir()
            .unwrap_or_else(|e| die(format_args!("cannot create a temporary directory: {e}")));
        crate::p11::remove_on_abort(dir.path());
        let env = BenchEnv { dir, run_as: None };
        let tokens = env.path().join("tokens");
        std::fs::create_dir_all(&tokens)
            .unwrap_or_else(|e| die(format_args!("cannot create {}: {e}", tokens.display())));
        write(
            &env.softhsm_conf(),
            &format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        );
        write(
            &env.shim_conf(),
            &format!(
                "[log]\nlevel = \"warn\"\n\n[[slot]]\nid = 0\nlabel = \"{TOKEN_LABEL}\"\n\n[[slot.member]]\nlibrary = \"{}\"\ntoken = \"{TOKEN_LABEL}\"\n",
                softhsm_lib().display()
            ),
        );
        // p11-kit reads ~/.config/pkcs11: "only" ignores the system's modules.
        let conf = env.p11kit_home().join(".config/pkcs11");
        write(&conf.join("pkcs11.conf"), "user-config: only\n");
        write(
            &conf.join("modules/softhsm2.module"),
            &format!("module: {}\n", softhsm_lib().display()),
        );

        let out = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", env.softhsm_conf())
            .args([
                "--init-token",
                "--free",
                "--label",
                TOKEN_LABEL,
                "--so-pin",
                SO_PIN,
                "--pin",
                USER_PIN,
            ])
            .output()
            .unwrap_or_else(|e| {
                die(format_args!(
                    "softhsm2-util: {e} (apt-get install softhsm2)"
                ))
            });
        if !out.status.success() {
            die(format_args!(
                "softhsm2-util --init-token failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let out = run_checked(
            env.worker(Target::Direct, &["--setup"]),
            "creating the benchmark's keys",
        );
        if !String::from_utf8_lossy(&out.stdout).contains("RESULT setup=ok") {
            die("the setup worker did not report success");
        }
        env
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// From now on, run workers as an unprivileged user when this process
    /// is root. p11-kit ignores the user configuration of root ("skipping
    /// user config in program running as root"), and that configuration is
    /// what limits its proxy to SoftHSM2. Every target's worker then runs
    /// as that user, so that all are counted alike. Returns whether it did.
    pub fn unprivileged_workers(&mut self) -> bool {
        if !is_root() {
            return false;
        }
        chown_tree(self.path(), NOBODY);
        self.run_as = Some(NOBODY);
        let probe = self
            .command(Target::Direct, &[], &["--list-slots"])
            .stdin(Stdio::null())
            .output();
        match probe {
            Ok(o) if o.status.success() => true,
            Ok(o) => die(format_args!(
                "running as root, workers must run as uid {} for p11-kit to read its user configuration, and that failed:\n{}\n\
                 (run the benchmark as a non-root user, or make the build directory readable to that user)",
                NOBODY.0,
                String::from_utf8_lossy(&o.stderr).trim_end()
            )),
            Err(e) => die(format_args!(
                "cannot start setpriv (util-linux) to run workers as uid {}: {e}",
                NOBODY.0
            )),
        }
    }

    fn softhsm_conf(&self) -> PathBuf {
        self.path().join("softhsm2.conf")
    }

    fn shim_conf(&self) -> PathBuf {
        self.path().join("p11shim.toml")
    }

    fn p11kit_home(&self) -> PathBuf {
        self.path().join("home")
    }

    fn audited_conf(&self) -> PathBuf {
        self.path().join("p11shim-audited.toml")
    }

    /// The audit log the audited target writes (every worker appends its
    /// own chain).
    pub fn audit_file(&self) -> PathBuf {
        self.path().join("audit.jsonl")
    }

    /// The Ed25519 private key that signs the audit checkpoints.
    fn audit_key(&self) -> PathBuf {
        self.path().join("audit-ed25519.pem")
    }

    /// Its public key, which the verifier takes.
    pub fn audit_public_key(&self) -> PathBuf {
        self.path().join("audit-ed25519.pub.pem")
    }

    /// Adds the audited target: an Ed25519 checkpoint key made by OpenSSL
    /// (mode 0600, as the module demands) and a p11shim configuration with
    /// a role whose rules grant exactly what the signing cases use, and the
    /// audit log (`fsync = "interval"`, default checkpoints, fail-closed).
    pub fn add_audited(&self) {
        let key = self.audit_key();
        run_checked(
            {
                let mut c = Command::new("openssl");
                c.args(["genpkey", "-algorithm", "ed25519", "-out"])
                    .arg(&key);
                c
            },
            "openssl genpkey -algorithm ed25519",
        );
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap_or_else(|e| die(format_args!("cannot chmod {}: {e}", key.display())));
        run_checked(
            {
                let mut c = Command::new("openssl");
                c.args(["pkey", "-pubout", "-in"])
                    .arg(&key)
                    .arg("-out")
                    .arg(self.audit_public_key());
                c
            },
            "openssl pkey -pubout",
        );
        write(
            &self.audited_conf(),
            &format!(
                r#"[log]
level = "warn"

[[slot]]
id = 0
label = "{TOKEN_LABEL}"

[[slot.member]]
library = "{lib}"
token = "{TOKEN_LABEL}"

# The keys of the signing cases, for their operation and mechanism only.
[acl]
source = "config"
role = "bench"

[acl.roles.bench]
keys = [
  {{ label = "{RSA_LABEL}", class = "private-key", ops = ["sign"], mechanisms = ["SHA256_RSA_PKCS"] }},
  {{ label = "{EC_LABEL}", class = "private-key", ops = ["sign"], mechanisms = ["ECDSA"] }},
  {{ label = "{HMAC_LABEL}", class = "secret-key", ops = ["sign"], mechanisms = ["SHA256_HMAC"] }},
  {{ label = "{HMAC_SESSION_LABEL}", class = "secret-key", ops = ["generate"], mechanisms = ["GENERIC_SECRET_KEY_GEN"] }},
  {{ label = "{HMAC_SESSION_LABEL}", class = "secret-key", ops = ["sign"], mechanisms = ["SHA256_HMAC"] }},
]

[audit]
file = "{audit}"
fsync = "interval"
on_failure = "fail-closed"
signing_key = "file:{key}"
"#,
                lib = softhsm_lib().display(),
                audit = self.audit_file().display(),
                key = key.display(),
            ),
        );
    }

    /// The environment of a worker for `target`.
    pub fn apply(&self, cmd: &mut Command, target: Target) {
        cmd.env("SOFTHSM2_CONF", self.softhsm_conf());
        match target {
            Target::Direct => {}
            Target::Shim => {
                cmd.env("P11SHIM_CONFIG", self.shim_conf())
                    .env_remove("P11SHIM_LOG");
            }
            Target::ShimAudited => {
                cmd.env("P11SHIM_CONFIG", self.audited_conf())
                    .env_remove("P11SHIM_LOG");
            }
            Target::P11Kit => {
                let home = self.p11kit_home();
                cmd.env("HOME", &home)
                    .env("XDG_CONFIG_HOME", home.join(".config"));
            }
        }
    }

    /// The module a target's worker loads.
    pub fn lib(target: Target) -> PathBuf {
        match target {
            Target::Direct => softhsm_lib(),
            Target::Shim | Target::ShimAudited => shim_lib(),
            Target::P11Kit => p11kit_lib(),
        }
    }

    /// `p11shim-bench --worker <target> --lib <module> <args>`.
    pub fn worker(&self, target: Target, args: &[&str]) -> Command {
        self.command(target, &[], args)
    }

    /// A worker run by a tool (`tool` is its command line, e.g. valgrind's),
    /// as the unprivileged user if there is one.
    pub fn command(&self, target: Target, tool: &[&str], args: &[&str]) -> Command {
        let mut line: Vec<std::ffi::OsString> = tool.iter().map(Into::into).collect();
        line.push(exe().into());
        line.extend(["--worker", target.name(), "--lib"].map(Into::into));
        line.push(Self::lib(target).into());
        line.extend(args.iter().map(Into::into));
        self.tool_command(target, line)
    }

    /// Any command line, in the environment of `target`'s workers.
    pub fn tool_command(&self, target: Target, line: Vec<std::ffi::OsString>) -> Command {
        let mut cmd = match self.run_as {
            Some((uid, gid)) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .arg("--clear-groups")
                    .arg("--")
                    .args(&line);
                c
            }
            None => {
                let mut c = Command::new(&line[0]);
                c.args(&line[1..]);
                c
            }
        };
        self.apply(&mut cmd, target);
        cmd
    }
}

fn is_root() -> bool {
    // /proc/self/status: "Uid:\treal\teffective\t...".
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("Uid:")
                    .map(|v| v.split_whitespace().nth(1) == Some("0"))
            })
        })
        .unwrap_or(false)
}

fn chown_tree(path: &Path, (uid, gid): (u32, u32)) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| die(format_args!("cannot chown {}: {e}", path.display())));
    if path.is_dir() && !path.is_symlink() {
        let entries = std::fs::read_dir(path)
            .unwrap_or_else(|e| die(format_args!("cannot list {}: {e}", path.display())));
        for entry in entries {
            let entry =
                entry.unwrap_or_else(|e| die(format_args!("cannot list {}: {e}", path.display())));
            chown_tree(&entry.path(), (uid, gid));
        }
    }
}

fn write(path: &Path, text: &str) {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)
            .unwrap_or_else(|e| die(format_args!("cannot create {}: {e}", d.display())));
    }
    std::fs::write(path, text)
        .unwrap_or_else(|e| die(format_args!("cannot write {}: {e}", path.display())));
}

/// Runs a command to completion; a failure ends the run with its stderr.
/// Its stderr is passed on when it succeeds too, so that no warning is lost.
pub fn run_checked(cmd: Command, what: &str) -> Output {
    run(cmd, what, true)
}

/// As [`run_checked`], and `pass_stderr` says whether the stderr of a
/// successful run is shown (not for valgrind's own chatter).
pub fn run(mut cmd: Command, what: &str, pass_stderr: bool) -> Output {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| {
        die(format_args!(
            "{what}: cannot start {:?}: {e}",
            cmd.get_program()
        ))
    });
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        eprintln!("{}", stderr.trim_end());
        die(format_args!("{what} failed ({})", out.status));
    }
    if pass_stderr && !stderr.trim().is_empty() {
        eprint!("{stderr}");
    }
    out
}

/// The value of `key=` in a worker's `RESULT` line.
pub fn result_field<'a>(stdout: &'a str, key: &str) -> Option<&'a str> {
    let line = stdout.lines().rev().find(|l| l.starts_with("RESULT "))?;
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}
