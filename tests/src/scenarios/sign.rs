//! Signature scenarios: RSA PKCS#1 v1.5 and PSS, ECDSA on P-256 and P-384,
//! single- and multi-part, and the output buffer protocol of C_Sign.

use cryptoki::context::Pkcs11;
use cryptoki::error::{Result, RvError};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use cryptoki::slot::Slot;

use super::fixtures::{EcKey, P384, generate_ec, import_ec, import_rsa};
use super::raw::raw;
use super::{Transcript, sha256, user_session};

/// The message the scenarios sign.
pub const MESSAGE: &[u8] = b"p11shim signs what the vendor signs, byte for byte";
/// [`MESSAGE`] in three parts.
pub const PARTS: [&[u8]; 3] = [
    b"p11shim signs what ",
    b"",
    b"the vendor signs, byte for byte",
];

/// DER prefix of a SHA-256 DigestInfo (PKCS#1 v1.5).
const SHA256_DIGEST_INFO: &[u8] = &[
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];

/// Multi-part signature: C_SignInit, one C_SignUpdate a part, C_SignFinal.
pub fn sign_parts(
    s: &Session,
    m: &Mechanism,
    key: ObjectHandle,
    parts: &[&[u8]],
) -> Result<Vec<u8>> {
    s.sign_init(m, key)?;
    for p in parts {
        s.sign_update(p)?;
    }
    s.sign_final()
}

/// Multi-part verification.
pub fn verify_parts(
    s: &Session,
    m: &Mechanism,
    key: ObjectHandle,
    parts: &[&[u8]],
    sig: &[u8],
) -> Result<()> {
    s.verify_init(m, key)?;
    for p in parts {
        s.verify_update(p)?;
    }
    s.verify_final(sig)
}

/// A signature with one byte changed.
fn tampered(sig: &[u8]) -> Vec<u8> {
    let mut v = sig.to_vec();
    v[sig.len() / 2] ^= 0x01;
    v
}

/// RSA with the fixed key: PKCS#1 v1.5 signatures are byte-identical
/// single-part, multi-part and over a DigestInfo, survive a too small
/// buffer, and verify; PSS signatures verify (single- and multi-part) and
/// differ each time; wrong keys, messages and states are refused.
pub fn sign_rsa(pkcs11: &Pkcs11, slot: Slot, t: &mut Transcript) -> Option<()> {
    let s = user_session(pkcs11, slot, t)?;
    let k = import_rsa(&s, t, "rsa signer")?;

    let m = Mechanism::Sha256RsaPkcs;
    let sig = t.bytes("SHA256-RSA-PKCS sign", s.sign(&m, k.private, MESSAGE))?;
    t.ok(
        "SHA256-RSA-PKCS verify",
        s.verify(&m, k.public, MESSAGE, &sig),
    );
    t.fails(
        "verify over another message",
        s.verify(&m, k.public, b"another message", &sig),
        RvError::SignatureInvalid,
    );
    t.fails(
        "verify a tampered signature",
        s.verify(&m, k.public, MESSAGE, &tampered(&sig)),
        RvError::SignatureInvalid,
    );
    t.fails(
        "verify a short signature",
        s.verify(&m, k.public, MESSAGE, &sig[..128]),
        RvError::SignatureLenRange,
    );
    let digest = t.bytes("SHA-256 of the message", sha256(&s, MESSAGE))?;
    let raw_sig = t.bytes(
        "RSA-PKCS sign of its DigestInfo",
        s.sign(
            &Mechanism::RsaPkcs,
            k.private,
            &[SHA256_DIGEST_INFO, &digest].concat(),
        ),
    )?;
    t.check("same signature as SHA256-RSA-PKCS", raw_sig == sig);
    let multi = t.bytes(
        "SHA256-RSA-PKCS multi-part sign",
        sign_parts(&s, &m, k.private, &PARTS),
    )?;
    t.check("multi-part signature equals single-part", multi == sig);
    t.ok(
        "SHA256-RSA-PKCS multi-part verify",
        verify_parts(&s, &m, k.public, &PARTS, &sig),
    );
    t.fails(
        "multi-part verify of a tampered signature",
        verify_parts(&s, &m, k.public, &PARTS, &tampered(&sig)),
        RvError::SignatureInvalid,
    );

    // C_Sign's buffer protocol: length query, too small, then the same
    // operation completes.
    t.ok("C_SignInit", s.sign_init(&m, k.private))?;
    let (r, len, _) = raw().sign(s.handle(), MESSAGE, None);
    t.value("C_Sign length query", r.map(|()| len), |n| n.to_string());
    let (r, len, _) = raw().sign(s.handle(), MESSAGE, Some(16));
    t.fails("C_Sign into 16 bytes", r, RvError::BufferTooSmall);
    t.check("the length needed is reported", len == 256);
    let (r, _, out) = raw().sign(s.handle(), MESSAGE, Some(512));
    let out = t.bytes("C_Sign into 512 bytes", r.map(|()| out))?;
    t.check("the operation survived the short buffer", out == sig);

    let pss = PkcsPssParams {
        hash_alg: MechanismType::SHA256,
        mgf: PkcsMgfType::MGF1_SHA256,
        s_len: 32.into(),
    };
    let m = Mechanism::Sha256RsaPkcsPss(pss);
    let sig = t.len("SHA256-RSA-PKCS-PSS sign", s.sign(&m, k.private, MESSAGE))?;
    t.ok(
        "SHA256-RSA-PKCS-PSS verify",
        s.verify(&m, k.public, MESSAGE, &sig),
    );
    t.fails(
        "PSS verify over another message",
        s.verify(&m, k.public, b"another message", &sig),
        RvError::SignatureInvalid,
    );
    let again = t.len(
        "SHA256-RSA-PKCS-PSS sign again",
        s.sign(&m, k.private, MESSAGE),
    )?;
    t.check("PSS signatures are randomized", again != sig);
    let multi = t.len(
        "SHA256-RSA-PKCS-PSS multi-part sign",
        sign_parts(&s, &m, k.private, &PARTS),
    )?;
    t.ok(
        "verify it single-part",
        s.verify(&m, k.public, MESSAGE, &multi),
    );
    t.ok(
        "PSS multi-part verify",
        verify_parts(&s, &m, k.public, &PARTS, &sig),
    );
    let m = Mechanism::RsaPkcsPss(pss);
    let sig = t.len(
        "RSA-PKCS-PSS sign of the digest",
        s.sign(&m, k.private, &digest),
    )?;
    t.ok("RSA-PKCS-PSS verify", s.verify(&m, k.public, &digest, &sig));

    t.rejected(
        "sign with the public key",
        s.sign(&Mechanism::Sha256RsaPkcs, k.public, MESSAGE),
    );
    t.rejected(
        "verify with the private key",
        s.verify(&Mechanism::Sha256RsaPkcs, k.private, MESSAGE, &sig),
    );
    t.fails(
        "C_SignUpdate without C_SignInit",
        s.sign_update(MESSAGE),
        RvError::OperationNotInitialized,
    );
    t.fails(
        "C_VerifyFinal without C_VerifyInit",
        s.verify_final(&sig),
        RvError::OperationNotInitialized,
    );
    Some(())
}

/// ECDSA with the fixed P-256 key and a generated P-384 key: signatures
/// verify, are randomized, and fail on another digest or key; multi-part
/// and hashing ECDSA get the vendor's answer.
pub fn sign_ecdsa(pkcs11: &Pkcs11, slot: Slot, t: &mut Transcript) -> Option<()> {
    let s = user_session(pkcs11, slot, t)?;
    let a = import_ec(&s, t, EcKey::A, "ec signer")?;
    let digest = t.bytes("SHA-256 of the message", sha256(&s, MESSAGE))?;
    let sig = t.len(
        "ECDSA P-256 sign",
        s.sign(&Mechanism::Ecdsa, a.private, &digest),
    )?;
    t.check("a P-256 signature is 64 bytes", sig.len() == 64);
    t.ok(
        "ECDSA P-256 verify",
        s.verify(&Mechanism::Ecdsa, a.public, &digest, &sig),
    );
    t.fails(
        "verify a tampered signature",
        s.verify(&Mechanism::Ecdsa, a.public, &digest, &tampered(&sig)),
        RvError::SignatureInvalid,
    );
    let other = t.bytes("SHA-256 of another message", sha256(&s, b"another message"))?;
    t.fails(
        "verify over another digest",
        s.verify(&Mechanism::Ecdsa, a.public, &other, &sig),
        RvError::SignatureInvalid,
    );
    let again = t.len(
        "ECDSA P-256 sign again",
        s.sign(&Mechanism::Ecdsa, a.private, &digest),
    )?;
    t.check("ECDSA signatures are randomized", again != sig);

    let b = generate_ec(&s, t, "ec p384", P384, false)?;
    let digest384 = t.bytes(
        "SHA-384 of the message",
        s.digest(&Mechanism::Sha384, MESSAGE),
    )?;
    let sig384 = t.len(
        "ECDSA P-384 sign",
        s.sign(&Mechanism::Ecdsa, b.private, &digest384),
    )?;
    t.check("a P-384 signature is 96 bytes", sig384.len() == 96);
    t.ok(
        "ECDSA P-384 verify",
        s.verify(&Mechanism::Ecdsa, b.public, &digest384, &sig384),
    );
    t.rejected(
        "verify the P-256 signature with the P-384 key",
        s.verify(&Mechanism::Ecdsa, b.public, &digest, &sig),
    );

    t.outcome(
        "ECDSA multi-part sign",
        sign_parts(
            &s,
            &Mechanism::Ecdsa,
            a.private,
            &[&digest[..16], &digest[16..]],
        ),
        |v| format!("len {}", v.len()),
    );
    let r = t.outcome(
        "ECDSA-SHA256 multi-part sign",
        sign_parts(&s, &Mechanism::EcdsaSha256, a.private, &PARTS),
        |v| format!("len {}", v.len()),
    );
    if let Some(sig) = r {
        t.ok(
            "ECDSA-SHA256 multi-part verify",
            verify_parts(&s, &Mechanism::EcdsaSha256, a.public, &PARTS, &sig),
        );
    }
    // Whatever became of those operations, a fresh one works.
    let sig = t.len(
        "ECDSA P-256 sign after them",
        s.sign(&Mechanism::Ecdsa, a.private, &digest),
    )?;
    t.ok(
        "and verifies",
        s.verify(&Mechanism::Ecdsa, a.public, &digest, &sig),
    );
    Some(())
}
