//! Encryption, digest, dual-function and operation-state scenarios.

use cryptoki::context::Pkcs11;
use cryptoki::error::{Error, Result, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use pkcs11_sys::CK_INVALID_HANDLE;

use super::fixtures::{AES_KEY, AES_KEY_2, GCM_IV, IV, import_aes, import_rsa};
use super::raw::{Dual, raw};
use super::sign::{MESSAGE, PARTS};
use super::{PLAINTEXT, Transcript, cbc_encrypt, hex, sha256, user_session};

/// Additional authenticated data of the AES-GCM steps.
const AAD: &[u8] = b"header authenticated, not encrypted";

/// AES-GCM with a 128-bit tag over the fixed nonce (copied into `iv`).
fn gcm<'a>(iv: &'a mut [u8; 12], aad: &'a [u8]) -> Result<Mechanism<'a>> {
    *iv = GCM_IV;
    Ok(Mechanism::AesGcm(GcmParams::new(iv, aad, 128.into())?))
}

/// Multi-part encryption: the outputs of every update and of the final.
pub fn encrypt_parts(
    s: &Session,
    m: &Mechanism,
    key: ObjectHandle,
    parts: &[&[u8]],
) -> Result<Vec<u8>> {
    s.encrypt_init(m, key)?;
    let mut out = Vec::new();
    for p in parts {
        out.extend(s.encrypt_update(p)?);
    }
    out.extend(s.encrypt_final()?);
    Ok(out)
}

/// Multi-part decryption.
pub fn decrypt_parts(
    s: &Session,
    m: &Mechanism,
    key: ObjectHandle,
    parts: &[&[u8]],
) -> Result<Vec<u8>> {
    s.decrypt_init(m, key)?;
    let mut out = Vec::new();
    for p in parts {
        out.extend(s.decrypt_update(p)?);
    }
    out.extend(s.decrypt_final()?);
    Ok(out)
}

/// Multi-part digest.
pub fn digest_parts(s: &Session, m: &Mechanism, parts: &[&[u8]]) -> Result<Vec<u8>> {
    s.digest_init(m)?;
    for p in parts {
        s.digest_update(p)?;
    }
    s.digest_final()
}

/// Whether a call succeeded or the vendor does not support it.
fn ok_or_unsupported<T>(r: &Result<T>) -> bool {
    matches!(
        r,
        Ok(_) | Err(Error::Pkcs11(RvError::FunctionNotSupported, _))
    )
}

/// A session handle that was valid once and is closed now.
fn closed_session(pkcs11: &Pkcs11, slot: Slot, t: &mut Transcript) -> Option<u64> {
    let gone = t.ok("open a session to close", pkcs11.open_ro_session(slot))?;
    let h = gone.handle();
    t.ok("close it", gone.close())?;
    Some(h)
}

/// AES with the fixed key: GCM and CBC-PAD ciphertexts are byte-identical,
/// multi-part CBC-PAD equals single-part in both directions, tampering and
/// bad lengths are refused.
pub fn encrypt_aes(pkcs11: &Pkcs11, slot: Slot, t: &mut Transcript) -> Option<()> {
    let s = user_session(pkcs11, slot, t)?;
    let key = import_aes(&s, t, "aes", &AES_KEY, &[])?;
    let mut iv = [0u8; 12];

    let ct = t.bytes(
        "AES-GCM encrypt",
        gcm(&mut iv, AAD).and_then(|m| s.encrypt(&m, key, PLAINTEXT)),
    )?;
    t.check(
        "ciphertext and 16-byte tag",
        ct.len() == PLAINTEXT.len() + 16,
    );
    let pt = t.bytes(
        "AES-GCM decrypt",
        gcm(&mut iv, AAD).and_then(|m| s.decrypt(&m, key, &ct)),
    )?;
    t.check("AES-GCM round trip", pt == PLAINTEXT);
    let mut bad = ct.clone();
    bad[3] ^= 0x80;
    t.rejected(
        "AES-GCM decrypt of a tampered ciphertext",
        gcm(&mut iv, AAD).and_then(|m| s.decrypt(&m, key, &bad)),
    );
    t.rejected(
        "AES-GCM decrypt with other AAD",
        gcm(&mut iv, b"other").and_then(|m| s.decrypt(&m, key, &ct)),
    );

    let m = Mechanism::AesCbcPad(IV);
    let ct = t.bytes("AES-CBC-PAD encrypt", cbc_encrypt(&s, key))?;
    t.check(
        "padded to whole blocks",
        ct.len() == PLAINTEXT.len().next_multiple_of(16),
    );
    let pt = t.bytes("AES-CBC-PAD decrypt", s.decrypt(&m, key, &ct))?;
    t.check("AES-CBC-PAD round trip", pt == PLAINTEXT);
    let (a, b) = PLAINTEXT.split_at(13);
    let multi = t.bytes(
        "AES-CBC-PAD multi-part encrypt",
        encrypt_parts(&s, &m, key, &[a, b"", b]),
    )?;
    t.check("multi-part ciphertext equals single-part", multi == ct);
    let pt = t.bytes(
        "AES-CBC-PAD multi-part decrypt",
        decrypt_parts(&s, &m, key, &[&ct[..7], &ct[7..37], &ct[37..]]),
    )?;
    t.check("multi-part plaintext is the message", pt == PLAINTEXT);
    t.fails(
        "AES-CBC-PAD decrypt of a truncated ciphertext",
        s.decrypt(&m, key, &ct[..ct.len() - 1]),
        RvError::EncryptedDataLenRange,
    );
    t.fails(
        "AES-CBC encrypt of 15 bytes",
        s.encrypt(&Mechanism::AesCbc(IV), key, &PLAINTEXT[..15]),
        RvError::DataLenRange,
    );
    t.bytes(
        "AES-CBC encrypt of 32 bytes",
        s.encrypt(&Mechanism::AesCbc(IV), key, &PLAINTEXT[..32]),
    );
    t.bytes(
        "AES-ECB encrypt of 16 bytes",
        s.encrypt(&Mechanism::AesEcb, key, &PLAINTEXT[..16]),
    );

    let no_encrypt = import_aes(
        &s,
        t,
        "decrypt only",
        &AES_KEY_2,
        &[Attribute::Encrypt(false)],
    )?;
    t.fails(
        "encrypt with a key without CKA_ENCRYPT",
        s.encrypt(&m, no_encrypt, PLAINTEXT),
        RvError::KeyFunctionNotPermitted,
    );
    t.fails(
        "C_EncryptUpdate without C_EncryptInit",
        s.encrypt_update(PLAINTEXT),
        RvError::OperationNotInitialized,
    );
    t.ok("C_EncryptInit", s.encrypt_init(&m, key))?;
    t.fails(
        "C_EncryptInit during encryption",
        s.encrypt_init(&m, key),
        RvError::OperationActive,
    );
    Some(())
}

/// RSA-OAEP with the fixed key: randomized ciphertexts decrypt to the
/// message, too long data is refused; PKCS#1 v1.5 encryption round-trips.
pub fn encrypt_rsa_oaep(pkcs11: &Pkcs11, slot: Slot, t: &mut Transcript) -> Option<()> {
    let s = user_session(pkcs11, slot, t)?;
    let k = import_rsa(&s, t, "rsa cipher")?;
    let oaep = |label| {
        Mechanism::RsaPkcsOaep(PkcsOaepParams::new(
            MechanismType::SHA1,
            PkcsMgfType::MGF1_SHA1,
            label,
        ))
    };
    let m = oaep(PkcsOaepSource::empty());
    let ct = t.len("RSA-OAEP encrypt", s.encrypt(&m, k.public, PLAINTEXT))?;
    t.check("an RSA-2048 ciphertext is 256 bytes", ct.len() == 256);
    let pt = t.bytes("RSA-OAEP decrypt", s.decrypt(&m, k.private, &ct))?;
    t.check("RSA-OAEP round trip", pt == PLAINTEXT);
    let again = t.len("RSA-OAEP encrypt again", s.encrypt(&m, k.public, PLAINTEXT))?;
    t.check("RSA-OAEP is randomized", again != ct);
    let mut bad = ct.clone();
    bad[100] ^= 0x01;
    t.rejected(
        "RSA-OAEP decrypt of a tampered ciphertext",
        s.decrypt(&m, k.private, &bad),
    );
    t.rejected(
        "RSA-OAEP encrypt of 300 bytes",
        s.encrypt(&m, k.public, &[7u8; 300]),
    );
    let sha256 = Mechanism::RsaPkcsOaep(PkcsOaepParams::new(
        MechanismType::SHA256,
        PkcsMgfType::MGF1_SHA256,
        PkcsOaepSource::empty(),
    ));
    t.outcome(
        "RSA-OAEP with SHA-256",
        s.encrypt(&sha256, k.public, PLAINTEXT),
        |v| format!("len {}", v.len()),
    );
    let labelled = oaep(PkcsOaepSource::data_specified(b"a label"));
    if let Some(ct) = t.outcome(
        "RSA-OAEP encrypt with a label",
        s.encrypt(&labelled, k.public, PLAINTEXT),
        |v| format!("len {}", v.len()),
    ) {
        t.outcome(
            "decrypt it with the label",
            s.decrypt(&labelled, k.private, &ct),
            |v| hex(v),
        );
    }

    let ct = t.len(
        "RSA-PKCS encrypt",
        s.encrypt(&Mechanism::RsaPkcs, k.public, PLAINTEXT),
    )?;
    let pt = t.bytes(
        "RSA-PKCS decrypt",
        s.decrypt(&Mechanism::RsaPkcs, k.private, &ct),
    )?;
    t.check("RSA-PKCS round trip", pt == PLAINTEXT);
    Some(())
}

/// Digests: SHA-256 over several updates (empty ones too) equals the
/// single-part digest and the known answer; C_DigestKey digests a key's
/// value; state errors are reported.
pub fn digest_multipart(pkcs11: &Pkcs11, slot: Slot, t: &mut Transcript) -> Option<()> {
    let s = user_session(pkcs11, slot, t)?;
    let abc = t.bytes("SHA-256 of abc", sha256(&s, b"abc"))?;
    t.check(
        "the known answer",
        hex(&abc) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
    );
    let single = t.bytes("SHA-256 single-part", sha256(&s, MESSAGE))?;
    let multi = t.bytes(
        "SHA-256 multi-part",
        digest_parts(&s, &Mechanism::Sha256, &PARTS),
    )?;
    t.check("multi-part equals single-part", multi == single);
    let bytes: Vec<&[u8]> = MESSAGE.chunks(1).collect();
    let one_by_one = t.bytes(
        "SHA-256 one byte an update",
        digest_parts(&s, &Mechanism::Sha256, &bytes),
    )?;
    t.check("byte by byte equals single-part", one_by_one == single);
    for (name, m) in [
        ("SHA-1", Mechanism::Sha1),
        ("SHA-384", Mechanism::Sha384),
        ("SHA-512", Mechanism::Sha512),
    ] {
        let one = t.bytes(&format!("{name} single-part"), s.digest(&m, MESSAGE))?;
        let parts = t.bytes(&format!("{name} multi-part"), digest_parts(&s, &m, &PARTS))?;
        t.check(
            &format!("{name} multi-part equals single-part"),
            one == parts,
        );
    }

    let key = import_aes(&s, t, "digested", &AES_KEY, &[])?;
    t.ok("C_DigestInit", s.digest_init(&Mechanism::Sha256))?;
    t.ok("C_DigestUpdate", s.digest_update(b"prefix"))?;
    t.ok("C_DigestKey", s.digest_key(key))?;
    let keyed = t.bytes("C_DigestFinal", s.digest_final())?;
    let expected = t.bytes(
        "SHA-256 of prefix and key value",
        sha256(&s, &[b"prefix".as_slice(), &AES_KEY].concat()),
    )?;
    t.check("C_DigestKey digests the key's value", keyed == expected);
    let secret = import_aes(
        &s,
        t,
        "sensitive",
        &AES_KEY_2,
        &[Attribute::Sensitive(true), Attribute::Extractable(false)],
    )?;
    t.ok("C_DigestInit", s.digest_init(&Mechanism::Sha256))?;
    t.outcome(
        "C_DigestKey of a sensitive key",
        s.digest_key(secret),
        |_| String::new(),
    );
    t.outcome("C_DigestFinal after it", s.digest_final(), |v| hex(v));

    t.fails(
        "C_DigestFinal without C_DigestInit",
        s.digest_final(),
        RvError::OperationNotInitialized,
    );
    t.ok("C_DigestInit", s.digest_init(&Mechanism::Sha256))?;
    t.fails(
        "C_DigestInit during a digest",
        s.digest_init(&Mechanism::Sha256),
        RvError::OperationActive,
    );
    let fin = t.bytes("C_DigestFinal of nothing", s.digest_final())?;
    let empty = t.bytes("SHA-256 of nothing", sha256(&s, b""))?;
    t.check("empty multi-part equals empty single-part", fin == empty);
    Some(())
}

/// The dual-function calls (C_DigestEncryptUpdate, C_DecryptDigestUpdate,
/// C_SignEncryptUpdate, C_DecryptVerifyUpdate) with both operations set
/// up: each works or is CKR_FUNCTION_NOT_SUPPORTED, exactly as the vendor
/// answers; a closed session is CKR_SESSION_HANDLE_INVALID.
pub fn dual_function(pkcs11: &Pkcs11, slot: Slot, t: &mut Transcript) -> Option<()> {
    let login = user_session(pkcs11, slot, t)?;
    t.value(
        "CKF_DUAL_CRYPTO_OPERATIONS",
        pkcs11.get_token_info(slot),
        |i| i.dual_crypto_operations().to_string(),
    );
    let key = import_aes(&login, t, "dual aes", &AES_KEY, &[])?;
    let rsa = import_rsa(&login, t, "dual rsa")?;
    let cbc = Mechanism::AesCbcPad(IV);
    let ct = t.bytes("AES-CBC-PAD encrypt", cbc_encrypt(&login, key))?;
    let sig = t.bytes(
        "SHA256-RSA-PKCS sign",
        login.sign(&Mechanism::Sha256RsaPkcs, rsa.private, PLAINTEXT),
    )?;

    type Init<'a> = Box<dyn Fn(&Session) -> Result<()> + 'a>;
    let digest: Init = Box::new(|s| s.digest_init(&Mechanism::Sha256));
    let encrypt: Init = Box::new(|s| s.encrypt_init(&cbc, key));
    let decrypt: Init = Box::new(|s| s.decrypt_init(&cbc, key));
    let sign: Init = Box::new(|s| s.sign_init(&Mechanism::Sha256RsaPkcs, rsa.private));
    let verify: Init = Box::new(|s| s.verify_init(&Mechanism::Sha256RsaPkcs, rsa.public));
    let cases: [(&str, Dual, &Init, &Init, &[u8]); 4] = [
        (
            "C_DigestEncryptUpdate",
            Dual::DigestEncrypt,
            &digest,
            &encrypt,
            PLAINTEXT,
        ),
        (
            "C_DecryptDigestUpdate",
            Dual::DecryptDigest,
            &decrypt,
            &digest,
            &ct,
        ),
        (
            "C_SignEncryptUpdate",
            Dual::SignEncrypt,
            &sign,
            &encrypt,
            PLAINTEXT,
        ),
        (
            "C_DecryptVerifyUpdate",
            Dual::DecryptVerify,
            &decrypt,
            &verify,
            &ct,
        ),
    ];
    for (name, dual, first, second, input) in cases {
        // A fresh session a case, so that no state leaks between them.
        let s = t.ok(
            &format!("{name}: open a session"),
            pkcs11.open_rw_session(slot),
        )?;
        t.ok(&format!("{name}: first operation"), first(&s))?;
        t.outcome(&format!("{name}: second operation"), second(&s), |_| {
            String::new()
        });
        let r = raw().dual(dual, s.handle(), input);
        t.check(
            &format!("{name}: works or is not supported"),
            ok_or_unsupported(&r),
        );
        t.outcome(name, r, |v| hex(v));
        t.outcome(
            &format!("{name}: without operations, in a new session"),
            {
                let fresh = pkcs11.open_ro_session(slot);
                fresh.and_then(|f| raw().dual(dual, f.handle(), input))
            },
            |v| hex(v),
        );
    }
    let gone = closed_session(pkcs11, slot, t)?;
    for dual in [
        Dual::DigestEncrypt,
        Dual::DecryptDigest,
        Dual::SignEncrypt,
        Dual::DecryptVerify,
    ] {
        t.fails(
            &format!("{dual:?} on a closed session"),
            raw().dual(dual, gone, PLAINTEXT),
            RvError::SessionHandleInvalid,
        );
    }
    // The single-function operations are unaffected.
    let pt = t.bytes("AES-CBC-PAD decrypt", login.decrypt(&cbc, key, &ct))?;
    t.check("round trip", pt == PLAINTEXT);
    t.ok(
        "SHA256-RSA-PKCS verify",
        login.verify(&Mechanism::Sha256RsaPkcs, rsa.public, PLAINTEXT, &sig),
    );
    Some(())
}

/// C_GetOperationState and C_SetOperationState answer as the vendor does,
/// during a digest, a signature and no operation at all; a saved digest
/// state, when there is one, resumes in another session; the operation
/// goes on either way.
pub fn operation_state(pkcs11: &Pkcs11, slot: Slot, t: &mut Transcript) -> Option<()> {
    let s = user_session(pkcs11, slot, t)?;
    let r = raw();
    let whole = t.bytes("SHA-256 of the whole message", sha256(&s, MESSAGE))?;
    let (head, tail) = MESSAGE.split_at(20);

    t.ok("C_DigestInit", s.digest_init(&Mechanism::Sha256))?;
    t.ok("C_DigestUpdate with the head", s.digest_update(head))?;
    let state = r.get_operation_state(s.handle());
    t.check(
        "C_GetOperationState works or is not supported",
        ok_or_unsupported(&state)
            || matches!(state, Err(Error::Pkcs11(RvError::StateUnsaveable, _))),
    );
    if let Some(state) = t.outcome("C_GetOperationState during a digest", state, |v| {
        format!("len {}", v.len())
    }) {
        let other = t.ok("open another session", pkcs11.open_rw_session(slot))?;
        t.ok(
            "C_SetOperationState there",
            r.set_operation_state(other.handle(), &state, CK_INVALID_HANDLE, CK_INVALID_HANDLE),
        )?;
        t.ok(
            "C_DigestUpdate with the tail there",
            other.digest_update(tail),
        )?;
        let resumed = t.bytes("C_DigestFinal there", other.digest_final())?;
        t.check(
            "the resumed digest is the whole message's",
            resumed == whole,
        );
    }
    t.ok("C_DigestUpdate with the tail", s.digest_update(tail))?;
    let fin = t.bytes("C_DigestFinal", s.digest_final())?;
    t.check("the digest went on", fin == whole);

    let k = import_rsa(&s, t, "state rsa")?;
    t.ok(
        "C_SignInit",
        s.sign_init(&Mechanism::Sha256RsaPkcs, k.private),
    )?;
    t.ok("C_SignUpdate", s.sign_update(head))?;
    let state = t.outcome(
        "C_GetOperationState during a signature",
        r.get_operation_state(s.handle()),
        |v| format!("len {}", v.len()),
    );
    let state = state.unwrap_or_else(|| b"not a state".to_vec());
    t.outcome(
        "C_SetOperationState with the signing key",
        r.set_operation_state(s.handle(), &state, CK_INVALID_HANDLE, k.private.handle()),
        |_| String::new(),
    );
    t.outcome("C_SignUpdate after it", s.sign_update(tail), |_| {
        String::new()
    });
    t.outcome("C_SignFinal", s.sign_final(), |v| hex(v));

    t.outcome(
        "C_GetOperationState without an operation",
        r.get_operation_state(s.handle()),
        |v| format!("len {}", v.len()),
    );
    t.outcome(
        "C_SetOperationState of garbage",
        r.set_operation_state(s.handle(), b"garbage", CK_INVALID_HANDLE, CK_INVALID_HANDLE),
        |_| String::new(),
    );
    let gone = closed_session(pkcs11, slot, t)?;
    t.fails(
        "C_GetOperationState on a closed session",
        r.get_operation_state(gone),
        RvError::SessionHandleInvalid,
    );
    t.fails(
        "C_SetOperationState on a closed session",
        r.set_operation_state(gone, b"x", CK_INVALID_HANDLE, CK_INVALID_HANDLE),
        RvError::SessionHandleInvalid,
    );
    Some(())
}
