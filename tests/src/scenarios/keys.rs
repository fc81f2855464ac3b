//! Key management scenarios: generation, wrapping and unwrapping, ECDH
//! derivation.

use cryptoki::context::Pkcs11;
use cryptoki::error::RvError;
use cryptoki::mechanism::elliptic_curve::{EcKdf, Ecdh1DeriveParams};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use pkcs11_sys::*;

use super::fixtures::{
    AES_KEY, AES_KEY_2, EcKey, IV, KeyPair, P256, der_point, generate_aes, generate_ec,
    generate_rsa, import_aes, import_ec, import_rsa, point_of,
};
use super::sign::MESSAGE;
use super::{PLAINTEXT, Transcript, attribute, cbc_encrypt, count, sha256, user_session};

/// A CK_ULONG attribute value as the module returns it.
fn ulong(v: u64) -> Vec<u8> {
    v.to_ne_bytes().to_vec()
}

/// The template of a derived or unwrapped session secret key that can be
/// read back.
fn secret_template(label: &str, key_type: KeyType, len: Option<u64>) -> Vec<Attribute> {
    let mut t = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(key_type),
        Attribute::Token(false),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Sensitive(false),
        Attribute::Extractable(true),
    ];
    t.extend(len.map(|n| Attribute::ValueLen(n.into())));
    t
}

/// Signs [`MESSAGE`] with SHA256-RSA-PKCS or ECDSA over its SHA-256 and
/// verifies the signature, recording the signature's length.
fn sign_and_verify(
    s: &Session,
    t: &mut Transcript,
    what: &str,
    pair: KeyPair,
    m: &Mechanism,
    data: &[u8],
) -> Option<()> {
    let sig = t.len(&format!("sign with {what}"), s.sign(m, pair.private, data))?;
    t.ok(
        &format!("verify with {what}"),
        s.verify(m, pair.public, data, &sig),
    )
}

/// Generated AES, RSA and EC keys, as session and token objects: their
/// attributes are as requested, they work, token objects are found again,
/// and impossible requests are refused.
pub fn generate_keys(pkcs11: &Pkcs11, slot: Slot, t: &mut Transcript) -> Option<()> {
    let s = user_session(pkcs11, slot, t)?;
    let aes128 = generate_aes(&s, t, "gen aes 128", 16, false)?;
    let aes256 = generate_aes(&s, t, "gen aes 256", 32, true)?;
    let len = t.bytes(
        "CKA_VALUE_LEN of the AES-256 key",
        attribute(&s, aes256, CKA_VALUE_LEN),
    )?;
    t.check("32 bytes", len == ulong(32));
    t.bytes("CKA_LOCAL", attribute(&s, aes256, CKA_LOCAL));
    t.bytes(
        "CKA_KEY_GEN_MECHANISM",
        attribute(&s, aes256, CKA_KEY_GEN_MECHANISM),
    );
    t.bytes(
        "CKA_TOKEN of the AES-128 key",
        attribute(&s, aes128, CKA_TOKEN),
    );
    let ct = t.len("encrypt with the AES-128 key", cbc_encrypt(&s, aes128))?;
    let pt = t.bytes("decrypt", s.decrypt(&Mechanism::AesCbcPad(IV), aes128, &ct))?;
    t.check("round trip", pt == PLAINTEXT);
    let other = generate_aes(&s, t, "gen aes 128 again", 16, false)?;
    let ct2 = t.len("encrypt with the other AES-128 key", cbc_encrypt(&s, other))?;
    t.check("two generated keys differ", ct != ct2);
    let bad = [Attribute::Token(false), Attribute::ValueLen(7.into())];
    t.rejected(
        "generate an AES key of 7 bytes",
        s.generate_key(&Mechanism::AesKeyGen, &bad),
    );

    let rsa = generate_rsa(&s, t, "gen rsa", 2048, false)?;
    let n = t.len("CKA_MODULUS", attribute(&s, rsa.public, CKA_MODULUS))?;
    t.check("a 2048-bit modulus", n.len() == 256);
    t.bytes(
        "CKA_PUBLIC_EXPONENT",
        attribute(&s, rsa.public, CKA_PUBLIC_EXPONENT),
    );
    t.bytes(
        "CKA_MODULUS_BITS",
        attribute(&s, rsa.public, CKA_MODULUS_BITS),
    );
    t.fails(
        "CKA_PRIVATE_EXPONENT",
        attribute(&s, rsa.private, CKA_PRIVATE_EXPONENT),
        RvError::AttributeSensitive,
    );
    sign_and_verify(
        &s,
        t,
        "the RSA key",
        rsa,
        &Mechanism::Sha256RsaPkcs,
        MESSAGE,
    )?;

    let ec = generate_ec(&s, t, "gen ec", P256, true)?;
    let params = t.bytes("CKA_EC_PARAMS", attribute(&s, ec.public, CKA_EC_PARAMS))?;
    t.check("P-256", params == P256);
    let point = t.len("CKA_EC_POINT", attribute(&s, ec.public, CKA_EC_POINT))?;
    t.check(
        "a DER uncompressed P-256 point",
        point.len() == 67 && point[2] == 0x04,
    );
    let digest = t.bytes("SHA-256 of the message", sha256(&s, MESSAGE))?;
    sign_and_verify(&s, t, "the EC key", ec, &Mechanism::Ecdsa, &digest)?;
    let curve25519_oid = [0x06, 0x03, 0x2b, 0x65, 0x6e];
    let bad = [Attribute::EcParams(curve25519_oid.to_vec())];
    t.rejected(
        "generate an ECDSA key pair on X25519",
        s.generate_key_pair(&Mechanism::EccKeyPairGen, &bad, &[]),
    );

    let n = count(
        t,
        "find the AES token key",
        &s,
        &[Attribute::Label(b"gen aes 256".to_vec())],
    )?;
    t.check("found", n == 1);
    let n = count(
        t,
        "find the EC token key pair",
        &s,
        &[Attribute::Label(b"gen ec".to_vec()), Attribute::Token(true)],
    )?;
    t.check("both halves found", n == 2);
    let n = count(
        t,
        "find the RSA session key pair among token objects",
        &s,
        &[
            Attribute::Label(b"gen rsa".to_vec()),
            Attribute::Token(true),
        ],
    )?;
    t.check("not a token object", n == 0);
    Some(())
}

/// AES key wrap of an AES key is byte-identical and unwraps to the same key;
/// RSA-OAEP wraps and unwraps it too; unextractable keys, keys without
/// CKA_WRAP and tampered blobs are refused.
pub fn wrap_unwrap(pkcs11: &Pkcs11, slot: Slot, t: &mut Transcript) -> Option<()> {
    let s = user_session(pkcs11, slot, t)?;
    let kek = import_aes(&s, t, "kek", &AES_KEY, &[])?;
    let target = import_aes(&s, t, "target", &AES_KEY_2, &[])?;
    let reference = t.bytes("encrypt with the target key", cbc_encrypt(&s, target))?;
    let check_unwrapped = |t: &mut Transcript, what: &str, key: ObjectHandle| -> Option<()> {
        let value = t.bytes(
            &format!("CKA_VALUE of the key unwrapped by {what}"),
            attribute(&s, key, CKA_VALUE),
        )?;
        t.check(
            &format!("{what} gave back the target key"),
            value == AES_KEY_2,
        );
        let ct = t.bytes(
            &format!("encrypt with the key unwrapped by {what}"),
            cbc_encrypt(&s, key),
        )?;
        t.check(
            &format!("{what}: it encrypts as the target"),
            ct == reference,
        )
    };

    let wrapped = t.bytes(
        "AES key wrap",
        s.wrap_key(&Mechanism::AesKeyWrap, kek, target),
    )?;
    t.check("an AES-128 key wraps into 24 bytes", wrapped.len() == 24);
    let template = secret_template("unwrapped", KeyType::AES, None);
    let unwrapped = t.ok(
        "AES key unwrap",
        s.unwrap_key(&Mechanism::AesKeyWrap, kek, &wrapped, &template),
    )?;
    check_unwrapped(t, "AES key wrap", unwrapped)?;
    let mut bad = wrapped.clone();
    bad[5] ^= 0x01;
    t.rejected(
        "AES key unwrap of a tampered blob",
        s.unwrap_key(&Mechanism::AesKeyWrap, kek, &bad, &template),
    );
    let locked = import_aes(
        &s,
        t,
        "unextractable",
        &AES_KEY_2,
        &[Attribute::Extractable(false)],
    )?;
    t.fails(
        "wrap an unextractable key",
        s.wrap_key(&Mechanism::AesKeyWrap, kek, locked),
        RvError::KeyUnextractable,
    );
    let no_wrap = import_aes(&s, t, "cannot wrap", &AES_KEY, &[Attribute::Wrap(false)])?;
    t.fails(
        "wrap with a key without CKA_WRAP",
        s.wrap_key(&Mechanism::AesKeyWrap, no_wrap, target),
        RvError::KeyFunctionNotPermitted,
    );

    let rsa = import_rsa(&s, t, "rsa kek")?;
    let oaep = Mechanism::RsaPkcsOaep(PkcsOaepParams::new(
        MechanismType::SHA1,
        PkcsMgfType::MGF1_SHA1,
        PkcsOaepSource::empty(),
    ));
    let wrapped = t.len("RSA-OAEP wrap", s.wrap_key(&oaep, rsa.public, target))?;
    t.check("an RSA-2048 wrap is 256 bytes", wrapped.len() == 256);
    let unwrapped = t.ok(
        "RSA-OAEP unwrap",
        s.unwrap_key(&oaep, rsa.private, &wrapped, &template),
    )?;
    check_unwrapped(t, "RSA-OAEP", unwrapped)
}

/// ECDH over the fixed P-256 keys gives the same secret both ways (also as
/// AES keys, and with a DER public point); generated keys agree too.
pub fn ecdh_derive(pkcs11: &Pkcs11, slot: Slot, t: &mut Transcript) -> Option<()> {
    let s = user_session(pkcs11, slot, t)?;
    let a = import_ec(&s, t, EcKey::A, "ecdh a")?;
    let b = import_ec(&s, t, EcKey::B, "ecdh b")?;
    let derive = |t: &mut Transcript,
                  name: &str,
                  private: ObjectHandle,
                  peer: &[u8],
                  template: &[Attribute]| {
        let m = Mechanism::Ecdh1Derive(Ecdh1DeriveParams::new(EcKdf::null(), peer));
        t.ok(name, s.derive_key(&m, private, template))
    };
    let generic = secret_template("ecdh secret", KeyType::GENERIC_SECRET, Some(32));

    let pb = EcKey::B.point();
    let ka = derive(t, "derive A with B's point", a.private, &pb, &generic)?;
    let kb = derive(
        t,
        "derive B with A's point",
        b.private,
        &EcKey::A.point(),
        &generic,
    )?;
    let va = t.bytes("the secret of A", attribute(&s, ka, CKA_VALUE))?;
    let vb = t.bytes("the secret of B", attribute(&s, kb, CKA_VALUE))?;
    t.check(
        "both ways give the same 32 bytes",
        va == vb && va.len() == 32,
    );
    let kd = derive(
        t,
        "derive A with B's point in DER",
        a.private,
        &der_point(&EcKey::B.point()),
        &generic,
    )?;
    let vd = t.bytes("that secret", attribute(&s, kd, CKA_VALUE))?;
    t.check("the encoding of the point does not matter", vd == va);

    let aes = secret_template("ecdh aes", KeyType::AES, Some(32));
    let aa = derive(
        t,
        "derive an AES key A with B's point",
        a.private,
        &EcKey::B.point(),
        &aes,
    )?;
    let ab = derive(
        t,
        "derive an AES key B with A's point",
        b.private,
        &EcKey::A.point(),
        &aes,
    )?;
    let ca = t.bytes("encrypt with A's AES key", cbc_encrypt(&s, aa))?;
    let cb = t.bytes("encrypt with B's AES key", cbc_encrypt(&s, ab))?;
    t.check("the derived AES keys are equal", ca == cb);

    let c = generate_ec(&s, t, "ecdh c", P256, false)?;
    let d = generate_ec(&s, t, "ecdh d", P256, false)?;
    let pc = point_of(&t.len("CKA_EC_POINT of C", attribute(&s, c.public, CKA_EC_POINT))?);
    let pd = point_of(&t.len("CKA_EC_POINT of D", attribute(&s, d.public, CKA_EC_POINT))?);
    let kc = derive(t, "derive C with D's point", c.private, &pd, &generic)?;
    let kd = derive(t, "derive D with C's point", d.private, &pc, &generic)?;
    let vc = t.len("the secret of C", attribute(&s, kc, CKA_VALUE))?;
    let vd = t.len("the secret of D", attribute(&s, kd, CKA_VALUE))?;
    t.check("generated keys agree", vc == vd && vc != va);

    t.ok(
        "clear CKA_DERIVE of A",
        s.update_attributes(a.private, &[Attribute::Derive(false)]),
    )?;
    let m = Mechanism::Ecdh1Derive(Ecdh1DeriveParams::new(EcKdf::null(), &pb));
    t.fails(
        "derive from A without CKA_DERIVE",
        s.derive_key(&m, a.private, &generic),
        RvError::KeyFunctionNotPermitted,
    );
    Some(())
}
