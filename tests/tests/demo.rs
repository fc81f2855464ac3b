//! The README's first command: the demo runs end to end (in its short
//! mode) and tells its story: `p11shim provision` makes three HA members,
//! the broker hands two roles their credentials, key policy and audit key,
//! role payments signs with no PIN while a member fails and comes back,
//! role reports is refused the payments key, and both audit logs verify
//! with `p11shim audit verify`.
//!
//! Only outcomes are checked, never durations: counts that must be
//! positive, lines that must be there, zero broken links.
//!
//! The `--aws` variant tells the same story with roles that are instances
//! in moto's EC2 (moto from the repository's `.venv`, made by
//! `scripts/deps.sh`), each seen through its own IMDS emulator and
//! attested by `aws-imds-fields`.

use std::path::{Path, PathBuf};

use p11shim_tests::peers::moto::moto_server;
use p11shim_tests::{faultmod_lib, p11shim_lib, repo_root, require, softhsm_lib, target_dir};

/// The lines of the story (the `[demo]` lines and the indented ones
/// under them).
fn story_line<'a>(text: &'a str, needle: &str) -> &'a str {
    text.lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("the demo did not say {needle:?}:\n{text}"))
}

/// The number just before `word` in `line` (`"12 denials"` → 12).
fn count_before(line: &str, word: &str) -> u64 {
    let at = line
        .find(word)
        .unwrap_or_else(|| panic!("no {word:?} in {line:?}"));
    line[..at]
        .trim_end()
        .rsplit(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number before {word:?} in {line:?}"))
}

/// The number just after `prefix` in `line` (`"T=2012 ms"` → 2012).
fn number_after(line: &str, prefix: &str) -> u64 {
    let at = line
        .find(prefix)
        .unwrap_or_else(|| panic!("no {prefix:?} in {line:?}"))
        + prefix.len();
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after {prefix:?} in {line:?}"))
}

/// `scripts/demo.sh --quick`, checked line by line.
#[test]
fn the_demo_tells_its_story() {
    let Some(demo) = run_demo(&[]) else { return };
    check_story(&demo, |_| "fingerprint:".to_owned());
    assert_no_child_left(&demo.work);
}

/// `scripts/demo.sh --quick --aws`: the same story, each role attested as
/// its own moto instance.
#[test]
fn the_aws_demo_tells_its_story() {
    // No skip: scripts/deps.sh makes the venv wherever the suite runs.
    assert!(
        moto_server().exists(),
        "{} is missing: run scripts/deps.sh (make test does)",
        moto_server().display()
    );
    assert!(
        target_dir().join("imds-emulator").exists(),
        "imds-emulator is missing: run `cargo build -p p11shim-peers` (make test does)"
    );
    let Some(demo) = run_demo(&["--aws"]) else {
        return;
    };
    let text = &demo.text;

    // Each role is its own instance, in moto's one account, with its own
    // IMDS; the moto line names it.
    let instance = |role: &str| -> (String, String) {
        let l = story_line(text, &format!("(EC2, IAM): role {role} is instance i-"));
        let id = l
            .split_once("is instance ")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no instance id in {l:?}"))
            .to_owned();
        let account = l
            .split_once("(account ")
            .and_then(|(_, rest)| rest.split(',').next())
            .unwrap_or_else(|| panic!("no account in {l:?}"))
            .to_owned();
        assert!(
            l.contains(&format!(
                "holding IAM role {role}-hsm; its IMDSv2 at http://127.0.0.1:"
            )),
            "{l}"
        );
        (id, account)
    };
    let (payments, account) = instance("payments");
    let (reports, reports_account) = instance("reports");
    assert_ne!(payments, reports);
    assert_eq!(account, reports_account);
    assert!(
        account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit()),
        "{account}"
    );
    let subject = |role: &str| {
        let id = if role == "payments" {
            &payments
        } else {
            &reports
        };
        format!("aws:{account}:us-east-1:{id} (account {account}, region us-east-1, instance {id})")
    };
    let l = story_line(text, "p11shim-broker on http://");
    assert!(l.contains("aws-imds-fields"), "{l}");
    story_line(
        text,
        "each role reaches the broker through a loopback proxy",
    );
    check_story(&demo, subject);

    // The broker's own log: every role's credentials were issued to its
    // instance, by the AWS method, and never to the other role's.
    let log = std::fs::read_to_string(demo.work.join("broker/broker.log")).expect("broker log");
    for (role, id, other) in [
        ("payments", &payments, &reports),
        ("reports", &reports, &payments),
    ] {
        let issued: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("credentials issued") && l.contains(&format!("role={role}")))
            .collect();
        assert!(
            !issued.is_empty(),
            "no credentials issued to {role}:\n{log}"
        );
        for l in &issued {
            assert!(
                l.contains(&format!("subject=aws:{account}:us-east-1:{id}")),
                "{l}"
            );
            assert!(l.contains("aws-imds-fields"), "{l}");
            assert!(!l.contains(other.as_str()), "{l}");
        }
        let summary = story_line(text, "    attested by aws-imds-fields against moto:");
        let at = summary
            .find(&format!("{role} as aws:{account}:us-east-1:{id} ("))
            .unwrap_or_else(|| panic!("{role} not in {summary:?}"));
        assert_eq!(
            count_before(&summary[at..], "credentials issued"),
            issued.len() as u64,
            "{summary}"
        );
    }

    // moto and the proxies were stopped with the demo (their command lines
    // do not name the demo directory): nothing answers on their ports.
    let moto = story_line(text, "(EC2, IAM): role payments")
        .split_once("moto at http://")
        .and_then(|(_, rest)| rest.split('/').next())
        .expect("moto's address")
        .to_owned();
    let l = story_line(
        text,
        "each role reaches the broker through a loopback proxy",
    );
    let proxies = [" (payments via ", ", reports via "].map(|p| {
        l.split_once(p)
            .and_then(|(_, rest)| rest.split([',', ')']).next())
            .unwrap_or_else(|| panic!("no {p:?} in {l:?}"))
            .to_owned()
    });
    for addr in std::iter::once(&moto).chain(&proxies) {
        assert!(
            std::net::TcpStream::connect(addr.as_str()).is_err(),
            "{addr} still answers after the demo"
        );
    }
    assert_no_child_left(&demo.work);
}

/// One run of the demo: its directory (inside `_tmp`), its output.
struct Demo {
    _tmp: tempfile::TempDir,
    work: PathBuf,
    /// Where the binaries are.
    dir: PathBuf,
    text: String,
}

/// `scripts/demo.sh --quick ARGS` with the test build's binaries; `None`
/// when a tool is missing and skipping is allowed.
fn run_demo(args: &[&str]) -> Option<Demo> {
    for tool in ["openssl", "pkcs11-tool", "python3", "curl"] {
        if !require(tool) {
            return None;
        }
    }
    let bin = p11shim_lib().with_file_name("p11shim-broker");
    let dir = bin.parent().expect("target dir").to_path_buf();
    for (name, package) in [
        ("p11shim-broker", "p11shim-broker"),
        ("p11shim", "p11shim-cli"),
    ] {
        assert!(
            dir.join(name).exists(),
            "{} is missing: run `cargo build -p {package}` (make test does)",
            dir.join(name).display()
        );
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let work = tmp.path().join("demo");
    let out = std::process::Command::new("bash")
        .arg(repo_root().join("scripts/demo.sh"))
        .arg("--quick")
        .args(args)
        .env("P11SHIM_LIB", p11shim_lib())
        .env("P11SHIM_BROKER", dir.join("p11shim-broker"))
        .env("P11SHIM_CLI", dir.join("p11shim"))
        .env("P11SHIM_FAULTMOD", faultmod_lib())
        .env("P11SHIM_IMDS_EMULATOR", dir.join("imds-emulator"))
        .env("SOFTHSM2_LIB", softhsm_lib())
        .env("P11SHIM_DEMO_DIR", &work)
        .env_remove("P11SHIM_CONFIG")
        .env_remove("AWS_EC2_METADATA_SERVICE_ENDPOINT")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run the demo");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "demo failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(Demo {
        _tmp: tmp,
        work,
        dir,
        text,
    })
}

/// The facts every variant's story holds; `subject(role)` is what the
/// credentials line says after `subject `.
fn check_story(demo: &Demo, subject: impl Fn(&str) -> String) {
    let (text, work, dir) = (demo.text.as_str(), &demo.work, &demo.dir);

    // 1. Provisioned by the CLI: the replication key, two RSA pairs and an
    //    EC pair, the same on the three members.
    story_line(text, "verified slot 0: 3 members hold the same 7 objects");

    // 2. Credentials of both roles, from the broker, with their policies.
    for role in ["payments", "reports"] {
        let l = story_line(
            text,
            &format!(
                "credentials fetched: role {role}, subject {}",
                subject(role)
            ),
        );
        assert!(l.contains(" expires 20"), "{l}");
        assert!(l.contains(&format!("key policy: {role}-* sign")), "{l}");
        assert!(l.contains("PIN received"), "{l}");
    }
    story_line(
        text,
        "(no --pin; the token has a PIN pad): private keys payments-ec payments-signing",
    );
    story_line(text, "OpenSSL config has no PIN: 0 lines mention a PIN");

    // 3. Signatures verified in every phase: before, while ha-a is out,
    //    after it is back.
    for phase in ["3 members up", "ha-a out", "ha-a back"] {
        let l = story_line(text, &format!("    {phase}"));
        assert!(
            count_before(l, "in ") > 0,
            "no signature verified in phase {phase:?}:\n{text}"
        );
    }
    // Failover after the pull, recovery after the member came back, both
    // as the payments audit log recorded them.
    let pulled = number_after(story_line(text, "member ha-a pulled out"), "T=");
    let back = number_after(story_line(text, "member ha-a put back"), "T=");
    let l = story_line(text, "failover at T=");
    let failover = number_after(l, "failover at T=");
    let recovery = number_after(l, "recovery at T'=");
    assert!(
        pulled <= failover && failover <= back && back <= recovery,
        "pull {pulled}, failover {failover}, back {back}, recovery {recovery}:\n{text}"
    );

    // 4. Role reports: the payments key hidden, its own key usable, a key
    //    under the payments name refused with the exact return code.
    story_line(text, "private keys this role sees: reports-signing");
    story_line(text, "C_FindObjects(label=payments-signing): 0 objects");
    story_line(text, "C_Sign with reports-signing: CKR_OK");
    story_line(
        text,
        "C_GenerateKeyPair(label=payments-signing): CKR_TEMPLATE_INCONSISTENT (0xD1)",
    );
    let l = story_line(text, "p11shim's log: denied by the key ACL");
    assert!(
        l.contains("C_GenerateKeyPair") && l.contains("reports"),
        "{l}"
    );

    // 5. Both audit logs verified by the CLI with the role's key, signed,
    //    with what happened in them.
    let payments = story_line(text, "audit log payments.jsonl verified:");
    let reports = story_line(text, "audit log reports.jsonl verified:");
    for l in [payments, reports] {
        assert_eq!(count_before(l, "broken links"), 0, "{l}");
        assert!(count_before(l, "chains") > 0, "{l}");
        assert!(count_before(l, "signed") > 0, "{l}");
        assert!(
            count_before(l, "checkpoints") >= count_before(l, "signed"),
            "{l}"
        );
        assert!(l.contains("hmac-sha256 key "), "{l}");
        // Each role's credentials came from the broker, in some process.
        assert!(count_before(l, "credential fetches") >= 1, "{l}");
    }
    assert!(count_before(payments, "failovers") >= 1, "{payments}");
    assert!(count_before(payments, "recoveries") >= 1, "{payments}");
    assert!(count_before(payments, "key uses") > 0, "{payments}");
    assert_eq!(count_before(payments, "denials"), 0, "{payments}");
    assert!(count_before(reports, "denials") >= 1, "{reports}");
    // The same files, read here: the CLI's hash-chain check (no key: the
    // keys are gone with the demo) agrees on the records, and the kinds
    // the story counts are the files' own.
    for (role, line) in [("payments", payments), ("reports", reports)] {
        let file = work.join(format!("audit/{role}.jsonl"));
        let report = cli_verify(&dir.join("p11shim"), &file);
        assert!(report["broken"].is_null(), "{report}");
        assert_eq!(
            report["records"].as_u64(),
            Some(count_before(line, "records")),
            "{line}"
        );
        let records = std::fs::read_to_string(&file).expect("audit file");
        for (kind, word) in [
            ("denial", "denials"),
            ("failover", "failovers"),
            ("recovery", "recoveries"),
            ("key_use", "key uses"),
            ("credentials", "credential fetches"),
        ] {
            let n = records
                .lines()
                .filter(|r| {
                    serde_json::from_str::<serde_json::Value>(r).expect("a JSON record")["kind"]
                        == kind
                })
                .count();
            assert_eq!(n as u64, count_before(line, word), "{kind} in {line}");
        }
    }

    // The summary: signatures verified, nothing refused by the broker.
    let l = story_line(text, "    signatures:");
    assert!(count_before(l, "verified") > 0, "{l}");
    let l = story_line(text, "    broker:");
    assert_eq!(count_before(l, "refused"), 0, "{l}");
    assert!(count_before(l, "grants on first use") >= 2, "{l}");

    // The end: the payments log's last five records, one readable line
    // each; the last is the signed stop checkpoint of the last payments
    // process (the long-lived application, stopped after the OpenSSL load,
    // which finalizes).
    let tail: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.contains("p11shim audit tail -n 5 audit/payments.jsonl:"))
        .skip(1)
        .collect();
    assert_eq!(tail.len(), 5, "{text}");
    for l in &tail {
        assert!(l.starts_with("    20"), "not a record's time: {l:?}");
        assert!(!l.contains('{'), "not a readable line: {l:?}");
    }
    assert!(
        tail[4].contains(" stop stop ") && tail[4].contains("signed hmac-sha256"),
        "{}",
        tail[4]
    );

    // Independently of the demo's own checks: p11shim's log shows the
    // member going down and coming back.
    let log = std::fs::read_to_string(work.join("p11shim-payments.log")).expect("log");
    assert!(log.contains("member marked down"), "{log}");
    assert!(log.contains("member recovered"), "{log}");
    // Secrets are gone with the demo; its report stays.
    assert!(!work.join("secrets").exists(), "secrets left behind");
    assert!(!work.join("tokens").exists(), "tokens left behind");
    assert!(work.join("status-final.json").exists());
    assert!(work.join("audit/payments.jsonl").exists());
}

/// `p11shim audit verify --json FILE` without a key: the hash chain only.
fn cli_verify(cli: &Path, file: &Path) -> serde_json::Value {
    let out = std::process::Command::new(cli)
        .args(["audit", "verify", "--json"])
        .arg(file)
        .output()
        .expect("run p11shim audit verify");
    assert!(
        out.status.success(),
        "p11shim audit verify {}: {}{}",
        file.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the report is JSON")
}

/// No process still runs with the demo directory on its command line
/// (the broker, the OpenSSL load and the long-lived application were
/// stopped on exit).
fn assert_no_child_left(work: &Path) {
    let needle = work.display().to_string();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(
            !cmdline.contains(&needle),
            "still running after the demo: {cmdline}"
        );
    }
}
