//! The `p11shim` operator command through its real interface: the built
//! binary spawned, its exit code and output checked. Also `make install`
//! into a scratch root, and a client and the CLI using the installed paths.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::object::{Attribute, AttributeType, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use p11shim_tests::peers::broker::{
    TestBroker, broker_toml, fingerprint_here, fingerprint_role, module_broker, write_secret,
};
use p11shim_tests::{TestEnv, USER_PIN, p11shim_lib, require, softhsm_lib, target_dir};

/// The CLI built next to the test binary (`cargo build -p p11shim-cli`;
/// `make test` does).
fn cli_bin() -> PathBuf {
    let p = target_dir().join("p11shim");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build -p p11shim-cli` (make test does)",
        p.display()
    );
    p
}

fn cli(env: &TestEnv, args: &[&str]) -> Output {
    let mut c = env.command(cli_bin().to_str().expect("utf-8 path"));
    c.args(args).env_remove("P11SHIM_MODULE");
    c.output().expect("run p11shim")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exit code")
}

#[track_caller]
fn assert_code(o: &Output, want: i32) {
    assert_eq!(
        code(o),
        want,
        "--- stdout\n{}\n--- stderr\n{}",
        stdout(o),
        stderr(o)
    );
}

/// A slot over the given SoftHSM2 token labels.
fn slot_toml(id: u64, label: &str, extra: &str, tokens: &[&str]) -> String {
    let mut t = format!("[[slot]]\nid = {id}\nlabel = \"{label}\"\n{extra}\n");
    for tok in tokens {
        t.push_str(&format!(
            "\n[[slot.member]]\nlibrary = \"{}\"\ntoken = \"{tok}\"\n",
            softhsm_lib().display()
        ));
    }
    t
}

#[test]
fn config_check_accepts_a_good_config() {
    let env = TestEnv::new();
    let pin = write_secret(env.path(), "pin", USER_PIN);
    let cfg = env.write_config(&slot_toml(
        0,
        "payments",
        &format!("pin = \"file:{}\"\nreplication_key = \"r\"", pin.display()),
        &["ha-a", "ha-b"],
    ));
    let o = cli(&env, &["config", "check", cfg.to_str().unwrap()]);
    assert_code(&o, 0);
    assert!(
        stdout(&o).contains("valid, 1 slot(s), 2 member(s)"),
        "{}",
        stdout(&o)
    );
    assert!(!stdout(&o).contains("warning"), "{}", stdout(&o));
    // Without FILE: the module's own lookup (P11SHIM_CONFIG).
    let o = cli(&env, &["config", "check"]);
    assert_code(&o, 0);
    assert!(stdout(&o).contains(&cfg.display().to_string()));
}

#[test]
fn config_check_gives_the_modules_precise_error() {
    let env = TestEnv::new();
    let cfg = env.write_config(
        "[[slot]]\nid = 0\nlabel = \"x\"\n\n[[slot.member]]\nlibrary = \"/lib/x.so\"\ntoken = \"t\"\nweigth = 2\n",
    );
    let o = cli(&env, &["config", "check", cfg.to_str().unwrap()]);
    assert_code(&o, 1);
    let err = stderr(&o);
    // The module's own message (as C_Initialize logs it): file, line, key.
    assert!(
        err.contains(&format!(
            "{}:8: key `weigth`: unknown field `weigth`",
            cfg.display()
        )),
        "{err}"
    );
}

#[test]
fn config_check_warns_of_a_readable_pin_file_and_an_unreplicated_slot() {
    let env = TestEnv::new();
    let pin = env.path().join("pin");
    std::fs::write(&pin, USER_PIN).unwrap();
    std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o644)).unwrap();
    let missing = env.path().join("absent.so");
    let cfg = env.write_config(&format!(
        "{}\n[[slot]]\nid = 1\nlabel = \"b\"\npin = \"file:{}\"\n\n[[slot.member]]\nlibrary = \"{}\"\ntoken = \"t\"\n",
        slot_toml(0, "a", &format!("pin = \"file:{}\"", pin.display()), &["solo"]),
        env.path().join("nopin").display(),
        missing.display()
    ));
    let o = cli(&env, &["config", "check", cfg.to_str().unwrap()]);
    assert_code(&o, 0);
    let out = stdout(&o);
    assert!(
        out.contains(&format!(
            "warning: slot 0 PIN file {} is readable by group or others (mode 0644)",
            pin.display()
        )),
        "{out}"
    );
    assert!(
        out.contains("warning: slot 0 (\"a\") has one member: not replicated"),
        "{out}"
    );
    assert!(
        out.contains(&format!("library {} does not exist", missing.display())),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "slot 1 PIN file {} does not exist",
            env.path().join("nopin").display()
        )),
        "{out}"
    );
    // The PIN itself never appears.
    assert!(!out.contains(USER_PIN) && !stderr(&o).contains(USER_PIN));
}

#[test]
fn config_check_runs_the_brokers_check() {
    let env = TestEnv::new();
    let cfg = env.write_config(&slot_toml(0, "a", "replication_key = \"r\"", &["x", "y"]));
    let pin = write_secret(env.path(), "broker.pin", "s3cret-broker-pin");
    let good = env.path().join("broker.toml");
    std::fs::write(
        &good,
        broker_toml(env.path(), &fingerprint_role("payments", &pin, "")),
    )
    .unwrap();
    let o = cli(
        &env,
        &[
            "config",
            "check",
            cfg.to_str().unwrap(),
            "--broker",
            good.to_str().unwrap(),
        ],
    );
    assert_code(&o, 0);
    assert!(
        stdout(&o).contains("valid, 1 role(s), store reachable"),
        "{}",
        stdout(&o)
    );
    // A role whose PIN file is missing: the broker's own check refuses it.
    let bad = env.path().join("bad.toml");
    std::fs::write(
        &bad,
        broker_toml(
            env.path(),
            &fingerprint_role("payments", &env.path().join("gone.pin"), ""),
        ),
    )
    .unwrap();
    let o = cli(
        &env,
        &[
            "config",
            "check",
            cfg.to_str().unwrap(),
            "--broker",
            bad.to_str().unwrap(),
        ],
    );
    assert_code(&o, 1);
    assert!(stderr(&o).contains("roles.payments.pin"), "{}", stderr(&o));
    assert!(!stdout(&o).contains("s3cret") && !stderr(&o).contains("s3cret"));
}

#[test]
fn usage_errors_exit_2() {
    let env = TestEnv::new();
    assert_code(&cli(&env, &["frobnicate"]), 2);
    assert_code(&cli(&env, &["provision"]), 2);
    assert_code(&cli(&env, &["slots", "--no-such-flag"]), 2);
    assert_code(&cli(&env, &[]), 2);
}

#[test]
fn every_command_has_help() {
    let env = TestEnv::new();
    for args in [
        &[][..],
        &["config"][..],
        &["config", "check"][..],
        &["slots"][..],
        &["attest"][..],
        &["provision"][..],
    ] {
        let mut a = args.to_vec();
        a.push("--help");
        let o = cli(&env, &a);
        assert_code(&o, 0);
        assert!(
            stdout(&o).contains("Usage: p11shim"),
            "{args:?}: {}",
            stdout(&o)
        );
    }
}

#[test]
fn slots_shows_both_members_of_a_slot_active() {
    let env = TestEnv::new();
    env.init_token("ha-a");
    env.init_token("ha-b");
    env.write_config(&format!(
        "[log]\nlevel = \"warn\"\nfile = \"{}\"\n\n{}",
        env.path().join("p11shim.log").display(),
        slot_toml(0, "ha", "allow_unreplicated = true", &["ha-a", "ha-b"])
    ));
    let module = p11shim_lib();
    let o = cli(&env, &["slots", "--module", module.to_str().unwrap()]);
    assert_code(&o, 0);
    let out = stdout(&o);
    assert!(out.contains("slot 0 \"ha\""), "{out}");
    for token in ["ha-a", "ha-b"] {
        let line = out
            .lines()
            .find(|l| l.contains(&format!("token \"{token}\"")))
            .unwrap_or_else(|| panic!("no row for {token}: {out}"));
        assert!(line.contains("active"), "{line}");
    }
    // --json: the status document, and the module found through
    // P11SHIM_MODULE.
    let o = env
        .command(cli_bin().to_str().unwrap())
        .args(["slots", "--json"])
        .env("P11SHIM_MODULE", &module)
        .output()
        .unwrap();
    assert_code(&o, 0);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    let members = v["slots"][0]["members"].as_array().expect("members");
    assert_eq!(members.len(), 2);
    assert!(members.iter().all(|m| m["state"] == "active"), "{v}");
    // A module that is not there: exit 1, named.
    let o = cli(&env, &["slots", "--module", "/nonexistent/libp11shim.so"]);
    assert_code(&o, 1);
    assert!(stderr(&o).contains("/nonexistent/libp11shim.so"));
}

fn attest_config(env: &TestEnv, url: &str) -> PathBuf {
    env.write_config(&format!(
        "{}\n{}",
        slot_toml(0, "payments", "pin = \"broker\"", &["ha-a"]),
        module_broker(
            url,
            "payments",
            "static-fingerprint",
            &format!(
                "nonce_file = \"{}\"\nwait_ms = 5000",
                env.path().join("nonce").display()
            )
        )
    ))
}

#[test]
fn attest_dry_run_shows_the_fingerprint_and_sends_nothing() {
    let env = TestEnv::new();
    // Nothing listens there: a dry run must not try.
    attest_config(&env, "http://127.0.0.1:9");
    let o = cli(&env, &["attest", "--dry-run"]);
    assert_code(&o, 0);
    let out = stdout(&o);
    assert!(out.contains(&fingerprint_here()), "{out}");
    assert!(out.contains("machine-id"), "{out}");
    assert!(out.contains("dry run: nothing sent"), "{out}");
    assert!(!out.contains("pin"), "{out}");
    let o = cli(&env, &["attest", "--dry-run", "--json"]);
    assert_code(&o, 0);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(v["evidence"]["fingerprint"], fingerprint_here());
    assert!(v.get("grant").is_none());
    // No nonce was made: nothing happened.
    assert!(!env.path().join("nonce").exists());
}

#[test]
fn attest_shows_the_grant_and_never_the_pin() {
    let env = TestEnv::new();
    const PIN: &str = "Zq7-attest-pin-4419";
    let pin = write_secret(env.path(), "role.pin", PIN);
    let broker = TestBroker::start(&broker_toml(
        env.path(),
        &fingerprint_role(
            "payments",
            &pin,
            "ttl = \"5m\"\npolicy = { keys = [{ label = \"payments-*\", ops = [\"sign\"] }] }",
        ),
    ));
    attest_config(&env, &broker.url());
    let o = cli(&env, &["attest"]);
    assert_code(&o, 0);
    let out = stdout(&o);
    assert!(out.contains("granted"), "{out}");
    assert!(out.contains("role: payments"), "{out}");
    assert!(out.contains("pin: received"), "{out}");
    assert!(out.contains("reauth: nonce"), "{out}");
    assert!(out.contains("payments-*"), "{out}");
    assert!(out.contains("subject: "), "{out}");
    for text in [out.as_str(), stderr(&o).as_str()] {
        assert!(!text.contains(PIN), "the PIN was printed: {text}");
    }
    // Again, as JSON: the module's nonce file lets this machine come back.
    let o = cli(&env, &["attest", "--json"]);
    assert_code(&o, 0);
    assert!(!stdout(&o).contains(PIN) && !stderr(&o).contains(PIN));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(v["grant"]["role"], "payments");
    assert_eq!(v["grant"]["pin"], "received");
    assert!(v["grant"]["ttl_seconds"].as_u64().unwrap() <= 300);
}

#[test]
fn attest_refused_exits_1() {
    let env = TestEnv::new();
    let pin = write_secret(env.path(), "role.pin", "x-pin-1");
    // A role for another machine's fingerprint.
    let broker = TestBroker::start(&broker_toml(
        env.path(),
        &format!(
            "[roles.payments]\nmethods = [\"static-fingerprint\"]\npin = \"file:{}\"\nfingerprints = [\"{}\"]\n",
            pin.display(),
            "0".repeat(64)
        ),
    ));
    attest_config(&env, &broker.url());
    let o = cli(&env, &["attest"]);
    assert_code(&o, 1);
    assert!(stderr(&o).contains("broker answered 403"), "{}", stderr(&o));
}

/// Counts the initialized tokens SoftHSM2 has in this environment.
fn initialized_tokens(env: &TestEnv) -> usize {
    let o = env
        .command("softhsm2-util")
        .arg("--show-slots")
        .output()
        .expect("softhsm2-util");
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| l.trim() == "Initialized:      yes")
        .count()
}

#[test]
fn provision_sets_up_three_fresh_tokens_once() {
    let env = TestEnv::new();
    let so = write_secret(env.path(), "so.pin", "so-secret-8812");
    let user = write_secret(env.path(), "user.pin", "user-secret-3391");
    env.write_config(&format!(
        "[log]\nlevel = \"warn\"\nfile = \"{}\"\n\n{}",
        env.path().join("p11shim.log").display(),
        slot_toml(
            0,
            "payments",
            &format!(
                "pin = \"file:{}\"\nreplication_key = \"p11shim-replication\"",
                user.display()
            ),
            &["ha-a", "ha-b", "ha-c"]
        )
    ));
    let mut plan = format!("config = \"{}\"\n", env.config_path().display());
    for t in ["ha-a", "ha-b", "ha-c"] {
        plan.push_str(&format!(
            "\n[[member]]\ntoken = \"{t}\"\ninit = true\nso_pin = \"file:{}\"\npin = \"file:{}\"\n",
            so.display(),
            user.display()
        ));
    }
    plan.push_str(
        "\n[[key]]\nlabel = \"signing\"\nid = \"01\"\ntype = \"rsa\"\nbits = 2048\n\n[[key]]\nlabel = \"data\"\nid = \"02\"\ntype = \"aes\"\n",
    );
    let plan_path = env.path().join("provision.toml");
    std::fs::write(&plan_path, plan).unwrap();
    let plan_arg = plan_path.to_str().unwrap();

    // --dry-run: the plan, and nothing changed.
    let o = cli(&env, &["provision", plan_arg, "--dry-run"]);
    assert_code(&o, 0);
    let out = stdout(&o);
    assert!(out.contains("initialize token \"ha-c\""), "{out}");
    assert!(
        out.contains("key \"signing\" (id 01, RSA-2048): generate on ha-a"),
        "{out}"
    );
    assert_eq!(initialized_tokens(&env), 0, "a dry run initialized a token");

    let o = cli(&env, &["provision", plan_arg]);
    assert_code(&o, 0);
    let out = stdout(&o);
    assert!(
        // The replication key, the RSA pair and the AES key.
        out.contains("verified slot 0: 3 members hold the same 4 objects"),
        "{out}"
    );
    for secret in ["so-secret-8812", "user-secret-3391"] {
        assert!(!out.contains(secret) && !stderr(&o).contains(secret));
    }
    assert_eq!(initialized_tokens(&env), 3);

    // Seen independently, with SoftHSM2 called directly: the same RSA
    // public key and the same AES key (same encryption) on every member.
    env.apply();
    let p = Pkcs11::new(softhsm_lib()).expect("SoftHSM2");
    p.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("C_Initialize");
    let mut seen = Vec::new();
    for s in p.get_slots_with_initialized_token().expect("slots") {
        let label = p.get_token_info(s).unwrap().label().to_owned();
        let sess = p.open_ro_session(s).unwrap();
        sess.login(
            UserType::User,
            Some(&AuthPin::new("user-secret-3391".into())),
        )
        .unwrap();
        let find = |class, label: &str| {
            let f = sess
                .find_objects(&[
                    Attribute::Class(class),
                    Attribute::Label(label.as_bytes().to_vec()),
                ])
                .unwrap();
            assert_eq!(f.len(), 1, "{label} on a member");
            f[0]
        };
        let pubkey = find(ObjectClass::PUBLIC_KEY, "signing");
        let privkey = find(ObjectClass::PRIVATE_KEY, "signing");
        let modulus = |o| {
            sess.get_attributes(o, &[AttributeType::Modulus])
                .unwrap()
                .into_iter()
                .find_map(|a| match a {
                    Attribute::Modulus(m) => Some(m),
                    _ => None,
                })
                .expect("modulus")
        };
        let (m_pub, m_priv) = (modulus(pubkey), modulus(privkey));
        assert_eq!(m_pub, m_priv);
        let aes = find(ObjectClass::SECRET_KEY, "data");
        let ct = sess
            .encrypt(&cryptoki::mechanism::Mechanism::AesEcb, aes, &[0u8; 16])
            .unwrap();
        let attrs = sess
            .get_attributes(privkey, &[AttributeType::Sensitive, AttributeType::Id])
            .unwrap();
        assert!(attrs.contains(&Attribute::Sensitive(true)));
        assert!(attrs.contains(&Attribute::Id(vec![1])));
        seen.push((label, m_pub, ct));
    }
    drop(p);
    assert_eq!(seen.len(), 3);
    assert!(
        seen.windows(2)
            .all(|w| w[0].1 == w[1].1 && w[0].2 == w[1].2)
    );

    // A second run: nothing to do, still verified.
    let o = cli(&env, &["provision", plan_arg]);
    assert_code(&o, 0);
    assert!(stdout(&o).contains("nothing to do"), "{}", stdout(&o));
    let o = cli(&env, &["provision", plan_arg, "--json"]);
    assert_code(&o, 0);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(v["changed"], false);
    assert_eq!(v["actions"].as_array().unwrap().len(), 0);
    assert_eq!(v["verified"][0]["objects"], 4);
}

#[test]
fn provision_refuses_an_invalid_plan() {
    let env = TestEnv::new();
    env.write_config(&slot_toml(0, "a", "", &["ha-a"]));
    let plan = env.path().join("plan.toml");
    std::fs::write(
        &plan,
        format!(
            "config = \"{}\"\n[[member]]\ntoken = \"ha-a\"\ninit = true\nso_pin = \"1234\"\npin = \"file:/x\"\n",
            env.config_path().display()
        ),
    )
    .unwrap();
    let o = cli(&env, &["provision", plan.to_str().unwrap()]);
    assert_code(&o, 1);
    assert!(
        stderr(&o).contains("key `member[0].so_pin`: a secret is given as"),
        "{}",
        stderr(&o)
    );
}

/// Rebases the unit's installed paths into the scratch root, so that
/// `systemd-analyze verify` finds the program it names.
fn check_unit(root: &Path) {
    let unit = root.join("usr/lib/systemd/system/p11shim-broker.service");
    let text = std::fs::read_to_string(&unit).expect("unit installed");
    assert!(
        text.contains("ExecStart=/usr/bin/p11shim-broker serve --config /etc/p11shim/broker.toml")
    );
    for key in [
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "StateDirectory=p11shim-broker",
    ] {
        assert!(text.contains(key), "{key} missing from the unit");
    }
    if p11shim_tests::have("systemd-analyze") {
        let copy = root.join("p11shim-broker.service");
        std::fs::write(
            &copy,
            text.replace("/usr/bin/", &format!("{}/usr/bin/", root.display())),
        )
        .unwrap();
        let o = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&copy)
            .output()
            .unwrap();
        assert!(
            o.status.success() && o.stderr.is_empty(),
            "systemd-analyze verify: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    } else {
        eprintln!("systemd-analyze is not installed: the unit's keys were checked, not verified");
    }
}

#[test]
fn make_install_gives_a_working_module_cli_and_unit() {
    if !require("make") || !require("pkcs11-tool") {
        return;
    }
    let env = TestEnv::new();
    env.init_token("ha-a");
    env.write_config(&slot_toml(0, "installed", "", &["ha-a"]));
    let root = env.path().join("root");
    let target = target_dir();
    // The debug build `make test` has made; CARGO=true: nothing to build.
    let o = Command::new("make")
        .arg("-C")
        .arg(p11shim_tests::repo_root())
        .arg("install")
        .arg(format!("DESTDIR={}", root.display()))
        .arg("PREFIX=/usr")
        .arg(format!(
            "PROFILE={}",
            target.file_name().unwrap().to_str().unwrap()
        ))
        .arg(format!("TARGET_DIR={}", target.parent().unwrap().display()))
        .arg("CARGO=true")
        .output()
        .expect("make");
    assert_code(&o, 0);
    for f in [
        "usr/lib/libp11shim.so",
        "usr/include/p11shim.h",
        "usr/bin/p11shim",
        "usr/bin/p11shim-broker",
        "etc/p11shim/p11shim.toml.example",
        "etc/p11shim/broker.toml.example",
        "etc/p11shim/provision.toml.example",
    ] {
        assert!(root.join(f).is_file(), "{f} not installed");
    }
    let module_file =
        std::fs::read_to_string(root.join("usr/share/p11-kit/modules/p11shim.module")).unwrap();
    assert!(
        module_file
            .lines()
            .any(|l| l == "module: /usr/lib/libp11shim.so"),
        "{module_file}"
    );
    // A client on the installed module.
    let lib = root.join("usr/lib/libp11shim.so");
    let o = env
        .command("pkcs11-tool")
        .arg("--module")
        .arg(&lib)
        .arg("-L")
        .output()
        .unwrap();
    assert_code(&o, 0);
    assert!(
        stdout(&o).contains("token label        : installed"),
        "{}",
        stdout(&o)
    );
    // The installed CLI finds the installed module (<bin>/../lib).
    let o = env
        .command(root.join("usr/bin/p11shim").to_str().unwrap())
        .args(["slots", "--json"])
        .env_remove("P11SHIM_MODULE")
        .output()
        .unwrap();
    assert_code(&o, 0);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["slots"][0]["label"], "installed");
    // The example configuration installed is valid for the installed CLI.
    let o = env
        .command(root.join("usr/bin/p11shim").to_str().unwrap())
        .args(["config", "check"])
        .arg(root.join("etc/p11shim/p11shim.toml.example"))
        .output()
        .unwrap();
    assert_code(&o, 0);
    check_unit(&root);
}
