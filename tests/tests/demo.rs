//! The README's first command: the demo runs end to end (in its short
//! mode) and tells its story.

use p11shim_tests::{p11shim_lib, repo_root, require};

/// `scripts/demo.sh --quick` signs and verifies through p11shim with
/// OpenSSL, no PIN in the client's configuration.
#[test]
fn the_demo_tells_its_story() {
    for tool in ["openssl", "pkcs11-tool", "softhsm2-util"] {
        if !require(tool) {
            return;
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new("bash")
        .arg(repo_root().join("scripts/demo.sh"))
        .arg("--quick")
        .env("P11SHIM_LIB", p11shim_lib())
        .env("P11SHIM_DEMO_DIR", dir.path().join("demo"))
        .output()
        .expect("run the demo");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "p11shim virtual slot payments",
        "generated RSA-2048 'demo-rsa' and ECDSA P-256 'demo-ec'",
        "OpenSSL config has no PIN: 0 lines mention a PIN",
        "all verified",
        "self-signed certificate for CN=payments.example issued with the token key and verified",
        "never held the PIN",
    ] {
        assert!(
            text.contains(line),
            "the demo did not say {line:?}:\n{text}"
        );
    }
}
