//! The README's first command: the demo runs end to end (in its short
//! mode) and tells its story: a broker, three HA members, real clients
//! signing through p11shim with no PIN while a member disappears.

use std::path::Path;

use p11shim_tests::{faultmod_lib, p11shim_lib, repo_root, require, softhsm_lib};

/// The numbers on the summary line that starts with `prefix`.
fn summary(text: &str, prefix: &str) -> Vec<u64> {
    let line = text
        .lines()
        .skip_while(|l| !l.contains("summary:"))
        .find(|l| l.trim_start().starts_with(prefix))
        .unwrap_or_else(|| panic!("no summary line {prefix:?}:\n{text}"));
    line.split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// `scripts/demo.sh --quick`: the broker grants the PIN once and every
/// later client process re-authenticates; pkcs11-tool sees the protected
/// authentication path and makes a key pair that reaches the three
/// members; OpenSSL and a long-lived application sign, every signature
/// verified, while a member is removed (the application's session moves)
/// and comes back; no PIN in any log, and no secret left behind.
#[test]
fn the_demo_tells_its_story() {
    for tool in ["openssl", "pkcs11-tool", "softhsm2-util", "python3", "curl"] {
        if !require(tool) {
            return;
        }
    }
    let broker = p11shim_lib().with_file_name("p11shim-broker");
    assert!(
        broker.exists(),
        "{} is missing: run `cargo build -p p11shim-broker` (make test does)",
        broker.display()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let work = dir.path().join("demo");
    let out = std::process::Command::new("bash")
        .arg(repo_root().join("scripts/demo.sh"))
        .arg("--quick")
        .env("P11SHIM_LIB", p11shim_lib())
        .env("P11SHIM_BROKER", &broker)
        .env("P11SHIM_FAULTMOD", faultmod_lib())
        .env("SOFTHSM2_LIB", softhsm_lib())
        .env("P11SHIM_DEMO_DIR", &work)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run the demo");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "p11shim-broker listening on http://127.0.0.1:",
        "p11shim virtual slot payments over ha-a, ha-b, ha-c; pin = \"broker\"",
        "PIN pad present",
        "generated ECDSA P-256 'demo-ec' through the slot; it is on ha-a ha-b ha-c",
        "OpenSSL config has no PIN: 0 lines mention a PIN",
        "with 3 members up, all verified",
        "with ha-a removed, all verified",
        "member ha-a back",
        "self-signed certificate for CN=payments.example issued with the token key and verified",
        "the PIN is in no log",
    ] {
        assert!(
            text.contains(line),
            "the demo did not say {line:?}:\n{text}"
        );
    }
    // The status query, read while ha-a was gone: the member down, the
    // brokered credentials ready.
    let down = status_section(&text);
    assert!(
        down.contains("credentials: state=ready role=payments method=static-fingerprint"),
        "credentials not ready in the status:\n{down}"
    );
    assert!(
        down.lines()
            .any(|l| l.contains("token \"ha-a\": down") && !l.contains("failovers=0")),
        "ha-a not shown down with a failover:\n{down}"
    );
    // The broker's counters: one first use, a re-authentication for every
    // later process, no refusal.
    let broker = summary(&text, "broker:");
    assert_eq!(broker[0], 1, "one grant on first use:\n{text}");
    assert!(broker[1] >= 4, "later processes re-authenticate:\n{text}");
    assert_eq!(broker[2], 0, "nothing refused:\n{text}");
    let signatures = summary(&text, "signatures:");
    assert!(signatures[1] >= 4 && signatures[2] > 0, "{text}");
    assert_eq!(signatures[0], signatures[1] + signatures[2], "{text}");
    assert_eq!(signatures[3], 0, "no call failed:\n{text}");
    let ha = summary(&text, "HA:");
    assert!(ha[0] >= 1, "a session moved:\n{text}");
    assert_eq!(ha[1], 3, "{text}");
    // Independently of the demo's own checks: p11shim's log shows the
    // member going down and coming back, and not the PIN's neighbourhood.
    let log = std::fs::read_to_string(work.join("p11shim.log")).expect("p11shim.log");
    assert!(log.contains("member marked down"), "{log}");
    assert!(log.contains("member recovered"), "{log}");
    assert!(!log.to_lowercase().contains("pin=\""), "{log}");
    // Secrets are gone with the demo; its report stays.
    assert!(!work.join("secrets").exists(), "secrets left behind");
    assert!(!work.join("tokens").exists(), "tokens left behind");
    assert!(work.join("status-final.json").exists());
    assert_no_child_left(&work);
}

/// The lines the demo printed for the status query while ha-a was gone.
fn status_section(text: &str) -> String {
    text.lines()
        .skip_while(|l| !l.contains("p11shim status in the long-lived application"))
        .skip(1)
        .take_while(|l| l.starts_with("    "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// No process still runs with the demo directory on its command line
/// (the broker and the long-lived application were stopped on exit).
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
