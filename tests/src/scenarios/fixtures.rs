//! Key material for the scenarios: fixed keys imported with
//! `C_CreateObject`, so that deterministic mechanisms (RSA PKCS#1 v1.5,
//! AES-CBC and AES-GCM with a fixed IV, AES key wrap, ECDH) give the same
//! bytes through any module, and generated keys for what only needs to
//! verify.
//!
//! Every helper records its call as one step of the transcript. Keys are
//! session objects unless a scenario asks for token objects.

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use super::Transcript;

/// A fixed AES-256 key.
pub const AES_KEY: [u8; 32] = *b"p11shim fixed AES-256 test key!!";
/// A second fixed AES key (AES-128), the one wrapped and copied around.
pub const AES_KEY_2: [u8; 16] = *b"second AES key16";
/// The fixed IV of the AES-CBC steps.
pub const IV: [u8; 16] = *b"fixed 16-byte iv";
/// The fixed nonce of the AES-GCM steps.
pub const GCM_IV: [u8; 12] = *b"fixed nonce!";

/// DER of the OID of NIST P-256.
pub const P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// DER of the OID of NIST P-384.
pub const P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

/// A public and a private key.
#[derive(Debug, Clone, Copy)]
pub struct KeyPair {
    pub public: ObjectHandle,
    pub private: ObjectHandle,
}

/// One of the two fixed P-256 keys.
#[derive(Debug, Clone, Copy)]
pub enum EcKey {
    A,
    B,
}

impl EcKey {
    /// The uncompressed public point (`04 || x || y`).
    pub fn point(self) -> Vec<u8> {
        unhex(match self {
            EcKey::A => EC_A_POINT,
            EcKey::B => EC_B_POINT,
        })
    }

    fn private(self) -> Vec<u8> {
        unhex(match self {
            EcKey::A => EC_A_PRIVATE,
            EcKey::B => EC_B_PRIVATE,
        })
    }
}

/// Bytes of a hex string.
pub fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// CKA_EC_POINT of an uncompressed point: its DER OCTET STRING.
pub fn der_point(point: &[u8]) -> Vec<u8> {
    let mut v = vec![0x04, point.len() as u8];
    v.extend_from_slice(point);
    v
}

/// The uncompressed point inside a CKA_EC_POINT (DER OCTET STRING, short
/// or one-byte long form).
pub fn point_of(der: &[u8]) -> Vec<u8> {
    match der {
        [0x04, 0x81, _, rest @ ..] | [0x04, _, rest @ ..] => rest.to_vec(),
        _ => der.to_vec(),
    }
}

/// A secret key's template: AES, usable for everything a scenario does
/// with it, extractable and not sensitive unless `extra` says otherwise
/// (later attributes of the same type win in SoftHSM2 as in p11shim, which
/// forwards the template as given).
pub fn aes_template(label: &str, value: &[u8], extra: &[Attribute]) -> Vec<Attribute> {
    let mut t = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Value(value.to_vec()),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
    ];
    t.extend_from_slice(extra);
    t
}

/// Imports an AES key (`extra` adds or overrides attributes).
pub fn import_aes(
    s: &Session,
    t: &mut Transcript,
    label: &str,
    value: &[u8],
    extra: &[Attribute],
) -> Option<ObjectHandle> {
    let mut attrs = vec![Attribute::Sensitive(false), Attribute::Extractable(true)];
    attrs.extend_from_slice(extra);
    t.ok(
        &format!("import AES key {label}"),
        s.create_object(&aes_template(label, value, &attrs)),
    )
}

/// Imports the fixed RSA-2048 key pair, the private key with its CRT
/// components.
pub fn import_rsa(s: &Session, t: &mut Transcript, label: &str) -> Option<KeyPair> {
    let common = |class| {
        vec![
            Attribute::Class(class),
            Attribute::KeyType(KeyType::RSA),
            Attribute::Token(false),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(b"rsa-fixed".to_vec()),
            Attribute::Modulus(unhex(RSA_MODULUS)),
            Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
        ]
    };
    let mut public = common(ObjectClass::PUBLIC_KEY);
    public.extend([
        Attribute::Verify(true),
        Attribute::Encrypt(true),
        Attribute::Wrap(true),
    ]);
    let mut private = common(ObjectClass::PRIVATE_KEY);
    private.extend([
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Sign(true),
        Attribute::Decrypt(true),
        Attribute::Unwrap(true),
        Attribute::PrivateExponent(unhex(RSA_PRIVATE_EXPONENT)),
        Attribute::Prime1(unhex(RSA_PRIME_1)),
        Attribute::Prime2(unhex(RSA_PRIME_2)),
        Attribute::Exponent1(unhex(RSA_EXPONENT_1)),
        Attribute::Exponent2(unhex(RSA_EXPONENT_2)),
        Attribute::Coefficient(unhex(RSA_COEFFICIENT)),
    ]);
    let public = t.ok(
        &format!("import RSA public key {label}"),
        s.create_object(&public),
    )?;
    let private = t.ok(
        &format!("import RSA private key {label}"),
        s.create_object(&private),
    )?;
    Some(KeyPair { public, private })
}

/// The modulus of the fixed RSA key.
pub fn rsa_modulus() -> Vec<u8> {
    unhex(RSA_MODULUS)
}

/// Imports one of the fixed P-256 key pairs, usable for ECDSA and ECDH.
pub fn import_ec(s: &Session, t: &mut Transcript, key: EcKey, label: &str) -> Option<KeyPair> {
    let common = |class| {
        vec![
            Attribute::Class(class),
            Attribute::KeyType(KeyType::EC),
            Attribute::Token(false),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::EcParams(P256.to_vec()),
        ]
    };
    let mut public = common(ObjectClass::PUBLIC_KEY);
    public.extend([
        Attribute::Verify(true),
        Attribute::EcPoint(der_point(&key.point())),
    ]);
    let mut private = common(ObjectClass::PRIVATE_KEY);
    private.extend([
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Sign(true),
        Attribute::Derive(true),
        Attribute::Value(key.private()),
    ]);
    let public = t.ok(
        &format!("import EC public key {label}"),
        s.create_object(&public),
    )?;
    let private = t.ok(
        &format!("import EC private key {label}"),
        s.create_object(&private),
    )?;
    Some(KeyPair { public, private })
}

/// Generates an AES key of `len` bytes.
pub fn generate_aes(
    s: &Session,
    t: &mut Transcript,
    label: &str,
    len: u64,
    token: bool,
) -> Option<ObjectHandle> {
    let template = [
        Attribute::Token(token),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::ValueLen(len.into()),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
        Attribute::Extractable(true),
        Attribute::Sensitive(false),
    ];
    t.ok(
        &format!("generate AES key {label}"),
        s.generate_key(&Mechanism::AesKeyGen, &template),
    )
}

/// Generates an RSA key pair of `bits` bits.
pub fn generate_rsa(
    s: &Session,
    t: &mut Transcript,
    label: &str,
    bits: u64,
    token: bool,
) -> Option<KeyPair> {
    let public = [
        Attribute::Token(token),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::ModulusBits(bits.into()),
        Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
        Attribute::Verify(true),
        Attribute::Encrypt(true),
        Attribute::Wrap(true),
    ];
    let private = [
        Attribute::Token(token),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Sign(true),
        Attribute::Decrypt(true),
        Attribute::Unwrap(true),
    ];
    let (public, private) = t.ok(
        &format!("generate RSA-{bits} key pair {label}"),
        s.generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &public, &private),
    )?;
    Some(KeyPair { public, private })
}

/// Generates an EC key pair on the curve whose OID is `curve` (DER).
pub fn generate_ec(
    s: &Session,
    t: &mut Transcript,
    label: &str,
    curve: &[u8],
    token: bool,
) -> Option<KeyPair> {
    let public = [
        Attribute::Token(token),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::EcParams(curve.to_vec()),
        Attribute::Verify(true),
    ];
    let private = [
        Attribute::Token(token),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Sign(true),
        Attribute::Derive(true),
    ];
    let (public, private) = t.ok(
        &format!("generate EC key pair {label}"),
        s.generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private),
    )?;
    Some(KeyPair { public, private })
}

// The fixed RSA-2048 key (e = 65537) and P-256 keys, big-endian hex.

/// Modulus n.
const RSA_MODULUS: &str = concat!(
    "d1d56051a8e56b0fc4d254706290d7f806154744080ba709370cbe57cea19083ed547bcd3a965998bf9f1a74cdd0fb78",
    "2a52cbb0cf9dded9f9bdba289fbe604a8b9716bef94e5492a8a9d0da1971a880565e5908875004d3e6a41c2a0889a76b",
    "9f82a009fe51defed43ec3b6850172fc1d5c57afad2c869fb0a369170f00641c4c725eb9b2b43d645bf7bf1e5add7195",
    "1ff47b821cb8e9c71a7e145da2019b53ee5853fad3b6333c785510c0a37d1bb0904b9a37b6a66e202177f65954813eb7",
    "40d5121b7a6499745beac49f2e1dd7e9aa77644bdf0e33f740ce1ea2e081163307d74d8c3dcd786e1e88f5ed2de4bf42",
    "cf18fb6b676f52b1ace7879cac7dfa91",
);

/// Private exponent d.
const RSA_PRIVATE_EXPONENT: &str = concat!(
    "0a425cbc795dc82b83f3c5a99e04176f1abb091a382b7badfd694bd826b3eb092c3e24746f10214ed0d5a2594223dcdb",
    "adf410ddf2f4b4cbe30445f90d00659c57715a6d196add433368641bf9c0ff1c513cb92d2bd27b7df1c9a5cfdf4d7da8",
    "4b2afb90a984ceba965d803ba90a9e58d9c5a54ae354693b9f0b0a4d149070148464f2606af5cd21deea525cc74f837d",
    "75da1f6fad1416f8d7ca7bd6bf91c97052bd4af2fb1f1e1a3b6eca04c37d93647490845735371b349d24dce656bcccfb",
    "82792bdf6473d2443a8fee2dca5d4c8a9c101ed4b767f9098e4059e9e208ee35bf269283ef1b3505e801af13599979fb",
    "82d6f872f45780c362eca5fd20d25901",
);

/// Prime p.
const RSA_PRIME_1: &str = concat!(
    "f9e34a38b11dbb1401d5dca3ba750723d90fb3023b8dcbcceb2399153dd485304f228c75bd52e266aa2c841d2fdd8846",
    "f1c85abc05ed3312a1536069d618e51b518a2169ed04d92bd41a43b55d3d09a36ef865c57b012582bb83d3cfbdafce75",
    "d994e5a0f4191af22e5d0dbc1e72423444f76cc8658807ade74ce667d9328941",
);

/// Prime q.
const RSA_PRIME_2: &str = concat!(
    "d6f747afd12cb8de1eb7439a1c665abed399a3d307281df672eae63dfe11a46bdf27e71895fd97caff310abf2c92102a",
    "16469db8534853b3cfcc8a03e54cbfc4c398a63a346a427766e7cb18deb66df8352a83d22bd49daec29dbf8d0d9ede1a",
    "e8496c5f6769ef0592b03ea255fcc73d40734e35546ff1714a9ac6c63a384d51",
);

/// d mod (p-1).
const RSA_EXPONENT_1: &str = concat!(
    "e21a519718538169a9fb7b47be3793bd50f30e92ef95ee98bd0e19be899298eccc3dc37fe94d6cc35e2927654d6112a4",
    "b6b305be695265caeea40571de21ea739c84f294e8bc615071fb4dd675c5fbc9a0682b95d325876e5203070d4a621fda",
    "ac84387e393fda0cd5fca6a7d798a4e4ac9e80149721cd690207a7d6c14523c1",
);

/// d mod (q-1).
const RSA_EXPONENT_2: &str = concat!(
    "7d15e0f1ee9ebe6809a98c3dc5decd591319e8d927e5f12172173ba8c109950a6c0cf50d3a62190cb757db300908693d",
    "843ecd11efec3b407b5f42c4278e745c5390a4d163a49d4e8b63bfab9614c382d5b50a85a6998eb39d6d5b840173fb3b",
    "df04b27a055c0008d725951cb33a66d93e8299f4b0507f46f4298216e0d3d831",
);

/// q^-1 mod p.
const RSA_COEFFICIENT: &str = concat!(
    "c012d5c02d355efe2897f04129f309d33ea2f9095cbefc2bf47721a3549a0219e22e82bd764686985e6c125d332dc9f2",
    "b18a05380e2bc0149f3b18a876b8508b5fc7aaec74cbef2ef7703f0e3328abd6d91e72f779f105c73bb87e35b8a9e6ab",
    "925136699b6bfd7f30e0abff42c11e75fad738db5831d2dc6195d14c18bb6f49",
);

/// Private scalar of P-256 key A.
const EC_A_PRIVATE: &str = "e0cca2f35e6052dcd575175b540b067a1507f9409c9f3bf494ca1f669276be51";

/// Uncompressed public point of P-256 key A.
const EC_A_POINT: &str = concat!(
    "04b4d23a5cfead6ea6534bf6842090e9d416a4fee6d6371bc4a9a42aeec5eadbdfb6eb56bce89af41bb51aa9144d16b0",
    "9fa6ec01a1f3694c1a1a0cd08d563c8468",
);

/// Private scalar of P-256 key B.
const EC_B_PRIVATE: &str = "868c834588c51849b982c81812018a10054922cbc08ddeb22f6e7514fcd949b9";

/// Uncompressed public point of P-256 key B.
const EC_B_POINT: &str = concat!(
    "04d226374995716268ac0b49124caa82c5d675095f0dfb6b9411fd2908f77c6bcacf90f0ec1e5ab9d812b668ece4f6f8",
    "4bf55ed9c91f923c8f7865d7a8930342d6",
);
