//! HA slots: one virtual slot over three SoftHSM2 tokens holding the same
//! keys, each member behind its own copy of the fault module. Members fail
//! (device errors, a token that disappears, a restart that loses sessions
//! and login) and come back while the application keeps working.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use p11shim_tests::{FaultyMember, TestEnv, USER_PIN, p11shim_lib};

const IV: [u8; 16] = [7; 16];

struct Ha {
    env: TestEnv,
    members: Vec<FaultyMember>,
    pkcs11: Pkcs11,
    slot: Slot,
}

/// Three members, a config with fast recovery, the module initialized.
fn ha(n: usize, extra: &str) -> Ha {
    ha_with(n, extra, CInitializeFlags::OS_LOCKING_OK)
}

/// [`ha`] with the given `C_Initialize` flags.
fn ha_with(n: usize, extra: &str, flags: CInitializeFlags) -> Ha {
    let env = TestEnv::new();
    let members = env.ha_members(n);
    env.ha_config(
        &members,
        &format!("recovery_interval_ms = 20\nrecovery_max_interval_ms = 100\n{extra}"),
    );
    env.apply();
    let pkcs11 = Pkcs11::new(p11shim_lib()).expect("load p11shim");
    pkcs11
        .initialize(CInitializeArgs::new(flags))
        .expect("C_Initialize");
    let slot = pkcs11.get_slots_with_token().expect("slots")[0];
    // The replication key: the same AES key on every member, marked trusted
    // by the security officer.
    let so = pkcs11.open_rw_session(slot).expect("session");
    so.login(
        UserType::So,
        Some(&AuthPin::new(p11shim_tests::SO_PIN.into())),
    )
    .expect("SO login");
    so.create_object(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Label(b"p11shim-replication".to_vec()),
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
        Attribute::Trusted(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Value((100u8..132).collect()),
    ])
    .expect("create the replication key");
    so.logout().expect("SO logout");
    drop(so);
    // An AES key made through the virtual slot reaches every member.
    let s = pkcs11.open_rw_session(slot).expect("session");
    s.login(UserType::User, Some(&AuthPin::new(USER_PIN.into())))
        .expect("login");
    s.create_object(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(true),
        Attribute::Label(b"aes".to_vec()),
        Attribute::Id(vec![2]),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Value((0u8..32).collect()),
    ])
    .expect("create the AES key");
    drop(s);
    Ha {
        env,
        members,
        pkcs11,
        slot,
    }
}

impl Ha {
    fn session(&self) -> Session {
        self.pkcs11
            .open_rw_session(self.slot)
            .expect("open session")
    }

    fn login(&self, s: &Session) {
        s.login(UserType::User, Some(&AuthPin::new(USER_PIN.into())))
            .expect("login");
    }

    /// Waits (bounded) until every member marked down has recovered, and
    /// at least `n` recoveries happened.
    fn wait_recoveries(&self, n: usize) {
        let start = Instant::now();
        loop {
            let log = self.env.log();
            let (down, up) = (
                log.matches("member marked down").count(),
                log.matches("member recovered").count(),
            );
            if up >= n && up >= down {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no recovery within 10 s:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Ha {
    /// Leaves member `alive` as the only one that answers.
    fn only(&self, alive: usize) {
        for (i, m) in self.members.iter().enumerate() {
            m.set(if i == alive {
                ""
            } else {
                "fail all CKR_DEVICE_ERROR\n"
            });
        }
    }
}

/// The names of this process's threads.
fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_owned())
        .collect()
}

fn key(s: &Session, label: &str) -> ObjectHandle {
    let found = s
        .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
        .expect("find");
    *found.iter().find(|&&h| {
        s.get_attributes(h, &[cryptoki::object::AttributeType::Class])
            .map(|a| matches!(a.first(), Some(Attribute::Class(c)) if *c != ObjectClass::PUBLIC_KEY))
            .unwrap_or(false)
    })
    .expect("the private or secret key")
}

/// A number of the status query: the first (or the last) of its name.
fn status_number(name: &str, last: bool) -> u64 {
    let status = p11shim_tests::status_json(&p11shim_lib());
    let key = format!("\"{name}\":");
    let at = if last {
        status.rfind(&key)
    } else {
        status.find(&key)
    };
    let at = at.unwrap_or_else(|| panic!("{name} in the status: {status}")) + key.len();
    let n: String = status[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    n.parse().unwrap()
}

fn rv(e: &CkError) -> Option<RvError> {
    match e {
        CkError::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    }
}

/// A single-part sign and an encryption on a session whose member fails
/// move to another member and give the same bytes.
#[test]
fn single_part_operations_move_to_another_member() {
    let ha = ha(3, "");
    let s = ha.session();
    ha.login(&s);
    // Slot-level answers over three members: what all of them offer.
    let mechs = ha.pkcs11.get_mechanism_list(ha.slot).unwrap();
    assert!(mechs.contains(&cryptoki::mechanism::MechanismType::SHA256_RSA_PKCS));
    let info = ha
        .pkcs11
        .get_mechanism_info(ha.slot, cryptoki::mechanism::MechanismType::RSA_PKCS)
        .unwrap();
    assert!(info.min_key_size() <= 2048 && info.max_key_size() >= 2048);
    let (rsa, aes) = (key(&s, "rsa"), key(&s, "aes"));
    let sig = s.sign(&Mechanism::Sha256RsaPkcs, rsa, b"pay 100").unwrap();
    let ct = s
        .encrypt(&Mechanism::AesCbcPad(IV), aes, b"secret plaintext")
        .unwrap();

    // The first session went to member a; it fails every call now.
    ha.members[0].set("fail all CKR_DEVICE_ERROR\n");
    assert_eq!(
        s.sign(&Mechanism::Sha256RsaPkcs, rsa, b"pay 100").unwrap(),
        sig
    );
    assert_eq!(
        s.encrypt(&Mechanism::AesCbcPad(IV), aes, b"secret plaintext")
            .unwrap(),
        ct
    );
    assert_eq!(
        s.decrypt(&Mechanism::AesCbcPad(IV), aes, &ct).unwrap(),
        b"secret plaintext"
    );
    let log = ha.env.log();
    assert!(
        log.contains("member marked down") && log.contains("session moved"),
        "{log}"
    );
    // The status query shows it.
    let status = p11shim_tests::status_json(&p11shim_lib());
    assert!(
        status.contains(r#""name":"ha#0""#) && status.contains(r#""state":"down""#),
        "{status}"
    );
    assert!(status.contains(r#""failovers":1"#), "{status}");

    ha.members[0].heal();
    ha.wait_recoveries(1);
    let status = p11shim_tests::status_json(&p11shim_lib());
    assert!(
        !status.contains(r#""state":"down""#) && status.contains(r#""recoveries":1"#),
        "{status}"
    );
}

/// Multi-part sign and encrypt with the member failing between updates:
/// the input given so far is replayed on the new member, and the result is
/// the one the single-part operation gives.
#[test]
fn multi_part_operations_survive_a_failure_between_updates() {
    let ha = ha(3, "");
    let s = ha.session();
    ha.login(&s);
    let (rsa, aes) = (key(&s, "rsa"), key(&s, "aes"));
    let (p1, p2) = (vec![1u8; 1000], vec![2u8; 777]);
    let whole: Vec<u8> = [p1.clone(), p2.clone()].concat();
    let want_sig = s.sign(&Mechanism::Sha256RsaPkcs, rsa, &whole).unwrap();
    let want_ct = s.encrypt(&Mechanism::AesCbcPad(IV), aes, &whole).unwrap();

    s.sign_init(&Mechanism::Sha256RsaPkcs, rsa).unwrap();
    s.sign_update(&p1).unwrap();
    ha.members[0].set("fail all CKR_DEVICE_ERROR\n");
    s.sign_update(&p2).unwrap();
    assert_eq!(s.sign_final().unwrap(), want_sig);

    // Now on member b: fail it mid-encryption.
    s.encrypt_init(&Mechanism::AesCbcPad(IV), aes).unwrap();
    let mut ct = s.encrypt_update(&p1).unwrap();
    ha.members[1].set("fail all CKR_DEVICE_REMOVED\n");
    ct.extend(s.encrypt_update(&p2).unwrap());
    ct.extend(s.encrypt_final().unwrap());
    assert!(ct == want_ct, "ciphertexts differ");
    assert!(ha.env.log().matches("session moved").count() >= 2);
}

/// Past the replay limit, a failure mid-operation is reported with
/// CKR_P11SHIM_OPERATION_LOST, never a wrong result; the session goes on.
#[test]
fn an_operation_past_the_replay_limit_is_lost_not_wrong() {
    let ha = ha(2, "replay_limit = 100");
    let s = ha.session();
    ha.login(&s);
    let rsa = key(&s, "rsa");
    s.sign_init(&Mechanism::Sha256RsaPkcs, rsa).unwrap();
    s.sign_update(&[1u8; 150]).unwrap();
    ha.members[0].set("fail all CKR_DEVICE_ERROR\n");
    let e = s.sign_update(&[2u8; 10]).unwrap_err();
    assert_eq!(
        rv(&e),
        Some(RvError::VendorDefined(0x8000_0000 | 0x5053_0004)),
        "{e}"
    );
    // A new operation works on the other member.
    let sig = s.sign(&Mechanism::Sha256RsaPkcs, rsa, b"again").unwrap();
    assert_eq!(sig.len(), 256);
}

/// Logged in once: the session stays logged in when its member fails, and
/// a member that comes back is logged in again before it takes work.
#[test]
fn login_survives_failover_and_recovered_members_are_logged_in() {
    let ha = ha(3, "");
    let s = ha.session();
    ha.login(&s);
    let rsa = key(&s, "rsa");
    let sig = s.sign(&Mechanism::Sha256RsaPkcs, rsa, b"m").unwrap();
    ha.members[0].set("remove\n");
    assert_eq!(s.sign(&Mechanism::Sha256RsaPkcs, rsa, b"m").unwrap(), sig);
    ha.members[0].heal();
    ha.wait_recoveries(1);
    // Only member a is left: it must be logged in to sign.
    ha.members[1].set("fail all CKR_DEVICE_ERROR\n");
    ha.members[2].set("fail all CKR_DEVICE_ERROR\n");
    assert_eq!(s.sign(&Mechanism::Sha256RsaPkcs, rsa, b"m").unwrap(), sig);
}

/// A member that restarts (its sessions and login gone) is used again at
/// once when it is the only member: the session is reopened and logged in.
#[test]
fn a_restarted_single_member_is_logged_in_again() {
    let ha = ha(1, "");
    let s = ha.session();
    ha.login(&s);
    let rsa = key(&s, "rsa");
    let sig = s.sign(&Mechanism::Sha256RsaPkcs, rsa, b"m").unwrap();
    ha.members[0].set("restart 1\n");
    assert_eq!(s.sign(&Mechanism::Sha256RsaPkcs, rsa, b"m").unwrap(), sig);
    assert!(ha.env.log().contains("session moved"), "{}", ha.env.log());
}

/// One member and nothing recorded per call: calls take the direct path,
/// and fail as the full path fails. An error that is no member failure
/// reaches the application unchanged; an operation interrupted by the
/// member's restart is reported lost, never wrong; an `*Init` that meets
/// the restart is made again on the new session.
#[test]
fn a_single_member_failure_on_the_direct_path() {
    let ha = ha(1, "");
    let s = ha.session();
    ha.login(&s);
    let rsa = key(&s, "rsa");
    let sig = s.sign(&Mechanism::Sha256RsaPkcs, rsa, b"m").unwrap();
    let errors = || status_number("errors", false);
    let before = errors();

    ha.members[0].set("fail C_DigestInit CKR_FUNCTION_FAILED\n");
    let e = s.digest(&Mechanism::Sha256, b"abc").unwrap_err();
    assert_eq!(rv(&e), Some(RvError::FunctionFailed), "{e}");
    assert_eq!(errors(), before + 1, "the member's error is counted");
    ha.members[0].heal();

    s.sign_init(&Mechanism::Sha256RsaPkcs, rsa).unwrap();
    s.sign_update(b"m").unwrap();
    ha.members[0].set("restart 1\n");
    let e = s.sign_final().unwrap_err();
    assert_eq!(
        rv(&e),
        Some(RvError::VendorDefined(0x8000_0000 | 0x5053_0004)),
        "{e}"
    );
    // The session goes on, logged in, on the member's new session.
    assert_eq!(s.sign(&Mechanism::Sha256RsaPkcs, rsa, b"m").unwrap(), sig);
    ha.members[0].set("restart 2\n");
    assert_eq!(s.sign(&Mechanism::Sha256RsaPkcs, rsa, b"m").unwrap(), sig);
    assert!(
        ha.env.log().matches("session moved").count() >= 2,
        "{}",
        ha.env.log()
    );
}

/// Opening and closing the sessions of a one-member slot take the direct
/// path: what the member says reaches the application, a failure to open
/// is counted on the member, a session is gone whatever the member said of
/// closing it, and closing the slot's last session logs the application
/// out.
#[test]
fn opening_and_closing_on_the_direct_path() {
    let ha = ha(1, "");
    let errors = || status_number("errors", false);
    // The slot's count comes last in its status object.
    let open = || status_number("sessions", true);
    let before = errors();
    ha.members[0].set("fail C_OpenSession CKR_DEVICE_MEMORY\n");
    let e = ha.pkcs11.open_rw_session(ha.slot).unwrap_err();
    assert_eq!(rv(&e), Some(RvError::DeviceMemory), "{e}");
    assert_eq!(errors(), before + 1, "the member's error is counted");
    assert_eq!(open(), 0);
    ha.members[0].heal();

    let s = ha.session();
    ha.login(&s);
    let other = ha.session();
    assert_eq!(open(), 2);
    s.close().unwrap();
    assert_eq!(
        other.get_session_info().unwrap().session_state(),
        cryptoki::session::SessionState::RwUser
    );
    other.close().unwrap();
    assert_eq!(open(), 0);
    let s = ha.session();
    assert_eq!(
        s.get_session_info().unwrap().session_state(),
        cryptoki::session::SessionState::RwPublic,
        "the last session closed logged the application out"
    );

    // Closes the member refuses. (The fault module leaves the member's
    // sessions open then: the member's login outlives them.)
    let (a, b) = (ha.session(), ha.session());
    assert_eq!(open(), 3);
    ha.members[0].set("fail C_CloseSession CKR_FUNCTION_FAILED times 1\n");
    let e = a.close().unwrap_err();
    assert_eq!(rv(&e), Some(RvError::FunctionFailed), "{e}");
    assert_eq!(open(), 2, "the session is gone all the same");
    // A member's loss of the session is no failure to close it.
    ha.members[0].set("fail C_CloseSession CKR_DEVICE_ERROR times 1\n");
    b.close().unwrap();
    assert_eq!(open(), 1);
    ha.members[0].heal();
    s.close().unwrap();
    assert_eq!(open(), 0);
}

/// A member that forgot a session (a restart) may hand its number out again
/// at once (many HSMs do; SoftHSM2 does not): p11shim, moving the forgotten
/// session, never closes that number. The member sees no `C_CloseSession`.
#[test]
fn a_forgotten_vendor_session_is_not_closed() {
    let ha = ha(1, "");
    let s = ha.session();
    let want = s.digest(&Mechanism::Sha256, b"m").unwrap();
    let closes = |ha: &Ha, rules: &str| {
        ha.members[0].set(rules);
        assert_eq!(s.digest(&Mechanism::Sha256, b"m").unwrap(), want);
        ha.members[0]
            .calls()
            .get("C_CloseSession")
            .copied()
            .unwrap_or(0)
    };
    let before = closes(&ha, "dump 1\n");
    for n in 1..=3 {
        ha.members[0].set(&format!("restart {n}\n"));
        let got = s
            .digest(&Mechanism::Sha256, b"m")
            .unwrap_or_else(|e| panic!("after restart {n}: {e}\n{}", ha.env.log()));
        assert_eq!(got, want);
    }
    assert_eq!(closes(&ha, "restart 3\ndump 2\n"), before);
    assert!(
        ha.env.log().matches("session moved").count() >= 3,
        "{}",
        ha.env.log()
    );
}

/// Token objects created through the slot reach every member; a token key
/// generated on one member only is refused with CKR_P11SHIM_NOT_REPLICATED.
#[test]
fn token_objects_reach_every_member() {
    let ha = ha(3, "");
    let s = ha.session();
    ha.login(&s);
    let data = s
        .create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Label(b"shared".to_vec()),
            Attribute::Value(b"payload".to_vec()),
        ])
        .unwrap();
    s.update_attributes(data, &[Attribute::Label(b"shared-v2".to_vec())])
        .unwrap();
    // Each member alone holds it, changed.
    for alive in 0..3 {
        ha.only(alive);
        assert!(
            s.find_objects(&[Attribute::Label(b"shared".to_vec())])
                .unwrap()
                .is_empty(),
            "member {alive}"
        );
        let found = s
            .find_objects(&[Attribute::Label(b"shared-v2".to_vec())])
            .unwrap();
        assert_eq!(
            found,
            vec![data],
            "member {alive}: the same object, under the same handle"
        );
        let v = s
            .get_attributes(data, &[cryptoki::object::AttributeType::Value])
            .unwrap();
        assert_eq!(
            v,
            vec![Attribute::Value(b"payload".to_vec())],
            "member {alive}"
        );
        for m in &ha.members {
            m.heal();
        }
        ha.wait_recoveries(0);
    }
    let e = s
        .generate_key(
            &Mechanism::AesKeyGen,
            &[Attribute::Token(true), Attribute::ValueLen(32.into())],
        )
        .unwrap_err();
    assert_eq!(
        rv(&e),
        Some(RvError::VendorDefined(0x8000_0000 | 0x5053_0005)),
        "{e}"
    );
    s.generate_key(
        &Mechanism::AesKeyGen,
        &[Attribute::Token(false), Attribute::ValueLen(32.into())],
    )
    .unwrap();
}

/// Token keys generated through the slot are wrapped under the replication
/// key and unwrapped on every member: each member alone can use them, and
/// their attributes tell the truth.
#[test]
fn generated_token_keys_reach_every_member() {
    let ha = ha(3, "replication_key = \"p11shim-replication\"");
    let s = ha.session();
    ha.login(&s);
    let aes = s
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(true),
                Attribute::ValueLen(32.into()),
                Attribute::Label(b"gen-aes".to_vec()),
                Attribute::Id(vec![9]),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::Extractable(false),
            ],
        )
        .unwrap();
    let (rsa_pub, rsa) = s
        .generate_key_pair(
            &Mechanism::RsaPkcsKeyPairGen,
            &[
                Attribute::Token(true),
                Attribute::ModulusBits(2048.into()),
                Attribute::Verify(true),
                Attribute::Label(b"gen-rsa".to_vec()),
                Attribute::Id(vec![10]),
            ],
            &[
                Attribute::Token(true),
                Attribute::Sign(true),
                Attribute::Label(b"gen-rsa".to_vec()),
                Attribute::Id(vec![10]),
            ],
        )
        .unwrap();
    let ct = s
        .encrypt(&Mechanism::AesCbcPad(IV), aes, b"replicated")
        .unwrap();
    let sig = s
        .sign(&Mechanism::Sha256RsaPkcs, rsa, b"replicated")
        .unwrap();
    for alive in 0..3 {
        ha.only(alive);
        assert_eq!(
            s.decrypt(&Mechanism::AesCbcPad(IV), aes, &ct).unwrap(),
            b"replicated",
            "member {alive}"
        );
        assert_eq!(
            s.sign(&Mechanism::Sha256RsaPkcs, rsa, b"replicated")
                .unwrap(),
            sig,
            "member {alive}"
        );
        s.verify(&Mechanism::Sha256RsaPkcs, rsa_pub, b"replicated", &sig)
            .unwrap();
        let attrs = s
            .get_attributes(
                aes,
                &[
                    cryptoki::object::AttributeType::Extractable,
                    cryptoki::object::AttributeType::NeverExtractable,
                ],
            )
            .unwrap();
        assert_eq!(
            attrs,
            vec![
                Attribute::Extractable(false),
                Attribute::NeverExtractable(false)
            ],
            "member {alive}"
        );
        for m in &ha.members {
            m.heal();
        }
        ha.wait_recoveries(0);
    }
}

/// A member that was down while token objects were created, generated,
/// changed and destroyed through the slot receives all of it when it comes
/// back, before it serves again.
#[test]
fn a_member_that_was_down_is_resynchronized() {
    let ha = ha(3, "replication_key = \"p11shim-replication\"");
    let s = ha.session();
    ha.login(&s);
    let data = |label: &[u8]| {
        s.create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Label(label.to_vec()),
            Attribute::Value(label.to_vec()),
        ])
        .unwrap()
    };
    let doomed = data(b"doomed");
    let renamed = data(b"old-name");
    // Member c goes away; the changes happen without it.
    ha.members[2].set("remove\n");
    let fresh = data(b"fresh");
    s.destroy_object(doomed).unwrap();
    s.update_attributes(renamed, &[Attribute::Label(b"new-name".to_vec())])
        .unwrap();
    let aes = s
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(true),
                Attribute::ValueLen(32.into()),
                Attribute::Label(b"while-down".to_vec()),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
            ],
        )
        .unwrap();
    let ct = s
        .encrypt(&Mechanism::AesCbcPad(IV), aes, b"resync")
        .unwrap();
    let status = p11shim_tests::status_json(&p11shim_lib());
    assert!(status.contains(r#""missed_changes":4"#), "{status}");

    ha.members[2].heal();
    ha.wait_recoveries(1);
    assert!(
        ha.env.log().contains("member resynchronized"),
        "{}",
        ha.env.log()
    );
    // Member c alone.
    ha.members[0].set("fail all CKR_DEVICE_ERROR\n");
    ha.members[1].set("fail all CKR_DEVICE_ERROR\n");
    let find = |label: &[u8]| s.find_objects(&[Attribute::Label(label.to_vec())]).unwrap();
    assert_eq!(find(b"fresh"), vec![fresh]);
    assert!(find(b"doomed").is_empty());
    assert!(find(b"old-name").is_empty());
    assert_eq!(find(b"new-name"), vec![renamed]);
    assert_eq!(
        s.decrypt(&Mechanism::AesCbcPad(IV), aes, &ct).unwrap(),
        b"resync"
    );
    let status = p11shim_tests::status_json(&p11shim_lib());
    assert!(!status.contains(r#""missed_changes":4"#), "{status}");
}

/// A member that hangs: the call is abandoned at the slot's deadline and
/// finishes on another member; sessions on other members never wait for
/// it; with one member, the application gets CKR_DEVICE_ERROR at the
/// deadline instead of hanging.
#[test]
fn a_hung_member_is_abandoned_at_the_deadline() {
    let ha = Arc::new(ha(3, "call_timeout_ms = 300"));
    let s = ha.session();
    ha.login(&s);
    let rsa = key(&s, "rsa");
    let sig = s.sign(&Mechanism::Sha256RsaPkcs, rsa, b"m").unwrap();
    // A second session, on another member, signs all along.
    let stop = Arc::new(AtomicBool::new(false));
    let other = {
        let (ha, stop) = (ha.clone(), stop.clone());
        std::thread::spawn(move || {
            let s2 = ha.session();
            let rsa = key(&s2, "rsa");
            let mut worst = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                s2.sign(&Mechanism::Sha256RsaPkcs, rsa, b"other").unwrap();
                worst = worst.max(t.elapsed());
            }
            worst
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    ha.members[0].set("hang all\n");
    let t = Instant::now();
    let got = s
        .sign(&Mechanism::Sha256RsaPkcs, rsa, b"m")
        .unwrap_or_else(|e| panic!("{e}\n{}", ha.env.log()));
    assert_eq!(got, sig);
    let took = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    let worst = other.join().unwrap();
    assert!(
        took >= Duration::from_millis(300),
        "abandoned before the deadline: {took:?}"
    );
    assert!(
        took < Duration::from_millis(300 + 1500),
        "finished {took:?} after the hang began"
    );
    assert!(
        worst < Duration::from_millis(300),
        "a session on another member waited {worst:?}"
    );
    assert!(
        ha.env.log().contains("call abandoned after its deadline"),
        "{}",
        ha.env.log()
    );
    ha.members[0].heal();
    ha.wait_recoveries(1);
}

/// With one member that hangs, the application gets CKR_DEVICE_ERROR at
/// the deadline rather than hanging with it.
#[test]
fn a_hung_single_member_fails_at_the_deadline() {
    let ha = ha(1, "call_timeout_ms = 200");
    let s = ha.session();
    ha.login(&s);
    let rsa = key(&s, "rsa");
    ha.members[0].set("hang C_Sign\n");
    let t = Instant::now();
    let e = s.sign(&Mechanism::Sha256RsaPkcs, rsa, b"m").unwrap_err();
    assert_eq!(rv(&e), Some(RvError::DeviceError), "{e}");
    assert!(
        t.elapsed() < Duration::from_millis(200 + 1500),
        "{:?}",
        t.elapsed()
    );
    ha.members[0].heal();
}

/// A session object made from a template follows its session to another
/// member; a generated session key cannot, and is reported lost.
#[test]
fn session_objects_follow_their_session_when_they_can() {
    let ha = ha(3, "");
    let s = ha.session();
    ha.login(&s);
    let imported = s
        .create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Value(vec![5; 16]),
        ])
        .unwrap();
    let generated = s
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(false),
                Attribute::ValueLen(16.into()),
                Attribute::Encrypt(true),
            ],
        )
        .unwrap();
    let ct = s
        .encrypt(&Mechanism::AesCbcPad(IV), imported, b"session")
        .unwrap();
    s.encrypt(&Mechanism::AesCbcPad(IV), generated, b"session")
        .unwrap();
    ha.members[0].set("fail all CKR_DEVICE_ERROR\n");
    assert_eq!(
        s.encrypt(&Mechanism::AesCbcPad(IV), imported, b"session")
            .unwrap(),
        ct
    );
    let e = s
        .encrypt(&Mechanism::AesCbcPad(IV), generated, b"session")
        .unwrap_err();
    assert!(
        matches!(
            rv(&e),
            Some(RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid)
        ),
        "{e}"
    );
    assert!(
        ha.env.log().contains("are lost with their member"),
        "{}",
        ha.env.log()
    );
}

/// The recovery thread runs while the module is initialized and is gone
/// after C_Finalize.
#[test]
fn the_recovery_thread_stops_at_finalize() {
    let ha = ha(2, "");
    assert!(
        thread_names()
            .iter()
            .any(|n| n.starts_with("p11shim-recov")),
        "{:?}",
        thread_names()
    );
    let Ha { pkcs11, .. } = ha;
    pkcs11.finalize().unwrap();
    assert!(
        !thread_names().iter().any(|n| n.starts_with("p11shim")),
        "{:?}",
        thread_names()
    );
}

/// An application that forbids threads gets none: down members are probed
/// from its own calls, and still recover.
#[test]
fn without_threads_members_recover_inline() {
    let ha = ha_with(
        3,
        "",
        CInitializeFlags::OS_LOCKING_OK | CInitializeFlags::LIBRARY_CANT_CREATE_OS_THREADS,
    );
    assert!(
        !thread_names().iter().any(|n| n.starts_with("p11shim")),
        "{:?}",
        thread_names()
    );
    let s = ha.session();
    ha.login(&s);
    let rsa = key(&s, "rsa");
    let sig = s.sign(&Mechanism::Sha256RsaPkcs, rsa, b"m").unwrap();
    ha.members[0].set("fail all CKR_DEVICE_ERROR\n");
    assert_eq!(s.sign(&Mechanism::Sha256RsaPkcs, rsa, b"m").unwrap(), sig);
    ha.members[0].heal();
    // No thread probes: the application's calls do (bounded wait).
    let start = Instant::now();
    while !ha.env.log().contains("member recovered") {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{}",
            ha.env.log()
        );
        drop(ha.session());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !thread_names().iter().any(|n| n.starts_with("p11shim")),
        "{:?}",
        thread_names()
    );
}

/// A replication key that is not trusted cannot wrap the new key: the
/// generation fails with CKR_P11SHIM_NOT_REPLICATED and leaves no key.
#[test]
fn an_untrusted_replication_key_refuses_generation() {
    let ha = ha(2, "replication_key = \"aes\"");
    let s = ha.session();
    ha.login(&s);
    let e = s
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(true),
                Attribute::ValueLen(32.into()),
                Attribute::Label(b"orphan".to_vec()),
            ],
        )
        .unwrap_err();
    assert_eq!(
        rv(&e),
        Some(RvError::VendorDefined(0x8000_0000 | 0x5053_0005)),
        "{e}"
    );
    assert!(
        s.find_objects(&[Attribute::Label(b"orphan".to_vec())])
            .unwrap()
            .is_empty()
    );
    assert!(
        ha.env
            .log()
            .contains("cannot be wrapped under the replication key"),
        "{}",
        ha.env.log()
    );
}

/// 16 threads sign, encrypt and decrypt through one virtual slot for a
/// bounded time while the three members fail and recover in turn (device
/// errors, a token that disappears, a restart): every operation succeeds
/// with the expected bytes.
#[test]
fn sixteen_threads_while_members_fail_and_recover_in_turn() {
    let ha = Arc::new(ha(3, ""));
    let admin = ha.session();
    ha.login(&admin);
    let (rsa, aes) = (key(&admin, "rsa"), key(&admin, "aes"));
    let msgs: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i; 64]).collect();
    let sigs: Vec<Vec<u8>> = msgs
        .iter()
        .map(|m| admin.sign(&Mechanism::Sha256RsaPkcs, rsa, m).unwrap())
        .collect();
    let cts: Vec<Vec<u8>> = msgs
        .iter()
        .map(|m| admin.encrypt(&Mechanism::AesCbcPad(IV), aes, m).unwrap())
        .collect();
    let (msgs, sigs, cts) = (Arc::new(msgs), Arc::new(sigs), Arc::new(cts));

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed, wrong) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let workers: Vec<_> = (0..16)
        .map(|t| {
            let (ha, stop, ok, failed, wrong) = (
                ha.clone(),
                stop.clone(),
                ok.clone(),
                failed.clone(),
                wrong.clone(),
            );
            let (msgs, sigs, cts) = (msgs.clone(), sigs.clone(), cts.clone());
            std::thread::spawn(move || {
                let s = ha.session();
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    let k = i % msgs.len();
                    let result = match i % 3 {
                        0 => s
                            .sign(&Mechanism::Sha256RsaPkcs, rsa, &msgs[k])
                            .map(|v| v == sigs[k]),
                        1 => s
                            .encrypt(&Mechanism::AesCbcPad(IV), aes, &msgs[k])
                            .map(|v| v == cts[k]),
                        _ => s
                            .decrypt(&Mechanism::AesCbcPad(IV), aes, &cts[k])
                            .map(|v| v == msgs[k]),
                    };
                    match result {
                        Ok(true) => ok.fetch_add(1, Ordering::Relaxed),
                        Ok(false) => wrong.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            eprintln!("thread {t}: {e}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    i += 1;
                }
            })
        })
        .collect();

    let faults = [
        "fail all CKR_DEVICE_ERROR\n",
        "remove\n",
        "restart 1\n",
        "fail C_Sign CKR_GENERAL_ERROR\n",
    ];
    let start = Instant::now();
    let mut round = 0;
    while start.elapsed() < Duration::from_secs(4) {
        let m = &ha.members[round % 3];
        m.set(faults[round % faults.len()]);
        std::thread::sleep(Duration::from_millis(250));
        m.heal();
        std::thread::sleep(Duration::from_millis(250));
        round += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().expect("worker");
    }
    let (ok, failed, wrong) = (
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        wrong.load(Ordering::Relaxed),
    );
    let log = ha.env.log();
    println!(
        "{ok} operations verified, {failed} failed, {wrong} wrong; {round} fault rounds, {} sessions moved, {} recoveries",
        log.matches("session moved").count(),
        log.matches("member recovered").count()
    );
    assert_eq!(wrong, 0, "wrong results");
    assert_eq!(failed, 0, "failed operations");
    assert!(ok > 100, "too little work done: {ok}");
    assert!(log.matches("session moved").count() > 0);
}

/// Members hang and come back in turn, each while sessions use it: every
/// call finishes within the deadline on a member that answers.
#[test]
fn members_hang_in_turn() {
    let ha = Arc::new(ha(3, "call_timeout_ms = 100"));
    let admin = ha.session();
    ha.login(&admin);
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..6)
        .map(|_| {
            let (ha, stop) = (ha.clone(), stop.clone());
            std::thread::spawn(move || {
                let s = ha.session();
                let rsa = key(&s, "rsa");
                let mut worst = Duration::ZERO;
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    s.sign(&Mechanism::Sha256RsaPkcs, rsa, b"turn")
                        .unwrap_or_else(|e| panic!("{e}"));
                    worst = worst.max(t.elapsed());
                    std::thread::sleep(Duration::from_millis(1));
                }
                worst
            })
        })
        .collect();
    for round in 0..6 {
        let m = &ha.members[round % 3];
        m.set("hang all\n");
        std::thread::sleep(Duration::from_millis(150));
        m.heal();
        ha.wait_recoveries(0);
        std::thread::sleep(Duration::from_millis(30));
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let worst = w.join().expect("a signing thread failed");
        assert!(worst < Duration::from_millis(100 + 1000), "{worst:?}");
    }
}

/// With a call deadline, a member that hangs does not hold up the creation
/// of a token object by a session on another member; it receives the
/// object once it is back.
#[test]
fn a_hung_member_does_not_hold_up_replication() {
    let ha = ha(3, "call_timeout_ms = 200");
    let s = ha.session(); // on member a
    ha.login(&s);
    ha.members[2].set("hang all\n");
    let t = Instant::now();
    let data = s
        .create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Label(b"while-hung".to_vec()),
            Attribute::Value(b"x".to_vec()),
        ])
        .unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(200 + 1500),
        "{:?}",
        t.elapsed()
    );
    ha.members[2].heal();
    ha.wait_recoveries(1);
    ha.only(2);
    assert_eq!(
        s.find_objects(&[Attribute::Label(b"while-hung".to_vec())])
            .unwrap(),
        vec![data]
    );
}

/// A create whose member makes the object but fails to answer is retried
/// on another member; when the first member comes back, the object is
/// found there rather than made twice.
#[test]
fn a_create_that_failed_late_is_not_made_twice() {
    let ha = ha(2, "");
    let s = ha.session(); // on member a
    ha.login(&s);
    ha.members[0].set("late C_CreateObject CKR_DEVICE_ERROR\n");
    let data = s
        .create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Label(b"once".to_vec()),
            Attribute::Value(b"1".to_vec()),
        ])
        .unwrap();
    assert!(ha.env.log().contains("session moved"), "{}", ha.env.log());
    ha.members[0].heal();
    ha.wait_recoveries(1);
    ha.only(0);
    assert_eq!(
        s.find_objects(&[Attribute::Label(b"once".to_vec())])
            .unwrap(),
        vec![data]
    );
}
