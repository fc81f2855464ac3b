//! Object scenarios: searching, reading and changing attributes, copying
//! and destroying, and how long session and token object handles live.

use cryptoki::context::Pkcs11;
use cryptoki::error::RvError;
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use pkcs11_sys::*;

use super::fixtures::{AES_KEY, AES_KEY_2, aes_template, import_aes, import_rsa, rsa_modulus};
use super::raw::{AttrOut, raw};
use super::{Transcript, attribute, cbc_encrypt, count, hex, pin, user_session};
use crate::USER_PIN;

/// What an invalid key handle may give: the spec's code, or the one
/// SoftHSM2 returns for every unknown handle.
const INVALID_KEY: &[RvError] = &[RvError::KeyHandleInvalid, RvError::ObjectHandleInvalid];

/// Renders the result of a raw `C_GetAttributeValue`.
fn show_attrs(out: &[AttrOut]) -> String {
    out.iter().map(AttrOut::show).collect::<Vec<_>>().join("; ")
}

/// Records a raw `C_GetAttributeValue`: its return code (success, or
/// `expect`) and every attribute as the module left it, which it returns.
fn get_raw(
    t: &mut Transcript,
    name: &str,
    s: &Session,
    o: ObjectHandle,
    query: &[(CK_ATTRIBUTE_TYPE, Option<usize>)],
    expect: Option<RvError>,
) -> Vec<AttrOut> {
    let (r, out) = raw().get_attributes(s.handle(), o.handle(), query);
    match expect {
        None => t.ok(name, r),
        Some(rv) => {
            t.fails(name, r, rv);
            None
        }
    };
    t.outcome(&format!("{name}: attributes"), Ok(()), |_| show_attrs(&out));
    out
}

/// A data object's template; `n` (its CKA_APPLICATION and value) tells
/// it apart from the others.
fn data_object(label: &str, n: u8, token: bool, private: bool) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(token),
        Attribute::Private(private),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Application(vec![b'0' + n]),
        Attribute::Value(vec![n; 4]),
    ]
}

/// Searches by label, id and class find what was created, also in several
/// C_FindObjects batches; a search in progress refuses another, and a
/// public session sees only public objects.
pub fn find_objects(pkcs11: &Pkcs11, slot: Slot, t: &mut Transcript) -> Option<()> {
    let s = user_session(pkcs11, slot, t)?;
    for n in 0..7u8 {
        // Token and session objects, private and public.
        let template = data_object("batch", n, n % 2 == 0, n < 3);
        t.ok(
            &format!("create data object {n}"),
            s.create_object(&template),
        )?;
    }
    for (label, id) in [
        ("batch key", 0xaa),
        ("batch key", 0xaa),
        ("other key", 0xab),
    ] {
        import_aes(&s, t, label, &AES_KEY, &[Attribute::Id(vec![id])])?;
    }

    let n = count(
        t,
        "find by label",
        &s,
        &[Attribute::Label(b"batch".to_vec())],
    )?;
    t.check("7 objects labelled batch", n == 7);
    let by_app = [
        Attribute::Class(ObjectClass::DATA),
        Attribute::Application(b"3".to_vec()),
    ];
    let found = t.value(
        "find by class and application",
        s.find_objects(&by_app),
        |v| format!("found {}", v.len()),
    )?;
    t.check("one data object of application 3", found.len() == 1)?;
    let value = t.bytes("its CKA_VALUE", attribute(&s, found[0], CKA_VALUE))?;
    t.check("it is object 3", value == [3; 4]);
    let n = count(
        t,
        "find by class",
        &s,
        &[Attribute::Class(ObjectClass::SECRET_KEY)],
    )?;
    t.check("3 secret keys", n == 3);
    let n = count(t, "find by id", &s, &[Attribute::Id(vec![0xaa])])?;
    t.check("2 keys with id aa", n == 2);
    let n = count(
        t,
        "find by class and id",
        &s,
        &[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Id(vec![0xab]),
        ],
    )?;
    t.check("1 secret key with id ab", n == 1);
    let n = count(
        t,
        "find by an unknown label",
        &s,
        &[Attribute::Label(b"nothing".to_vec())],
    )?;
    t.check("nothing found", n == 0);
    let n = count(t, "find everything", &s, &[])?;
    t.check("at least the 10 objects created", n >= 10);

    // Batches of 3, through C_FindObjects directly.
    let r = raw();
    let all = t.ok(
        "find by label in one go",
        s.find_objects(&[Attribute::Label(b"batch".to_vec())]),
    )?;
    t.ok(
        "C_FindObjectsInit by label",
        r.find_init(s.handle(), &[(CKA_LABEL, b"batch")]),
    )?;
    let mut batches = Vec::new();
    let mut handles = Vec::new();
    loop {
        let batch = t.ok(
            &format!("C_FindObjects batch {}", batches.len() + 1),
            r.find(s.handle(), 3),
        )?;
        batches.push(batch.len());
        handles.extend(batch.iter().copied());
        if batch.is_empty() || batches.len() > 10 {
            break;
        }
    }
    t.value("batch sizes", Ok(&batches), |b| format!("{b:?}"));
    t.check("batches of 3, 3, 1, then none", batches == [3, 3, 1, 0]);
    t.ok("C_FindObjectsFinal", r.find_final(s.handle()))?;
    let mut sorted = handles.clone();
    sorted.sort_unstable();
    sorted.dedup();
    let mut expected: Vec<_> = all.iter().map(|o| o.handle()).collect();
    expected.sort_unstable();
    t.check(
        "the batches found the same objects, once each",
        sorted.len() == handles.len() && sorted == expected,
    );

    t.ok("C_FindObjectsInit", r.find_init(s.handle(), &[]))?;
    t.fails(
        "C_FindObjectsInit during a search",
        r.find_init(s.handle(), &[]),
        RvError::OperationActive,
    );
    t.ok("C_FindObjectsFinal", r.find_final(s.handle()))?;
    t.fails(
        "C_FindObjects without a search",
        r.find(s.handle(), 3),
        RvError::OperationNotInitialized,
    );
    t.fails(
        "C_FindObjectsFinal without a search",
        r.find_final(s.handle()),
        RvError::OperationNotInitialized,
    );

    t.ok("C_Logout", s.logout())?;
    let n = count(
        t,
        "find by label, logged out",
        &s,
        &[Attribute::Label(b"batch".to_vec())],
    )?;
    t.check("only the 4 public objects", n == 4);
    Some(())
}

/// C_FindObjects with a NULL array and a maximum of 0 handles gets the
/// vendor's answer, and the search goes on after it.
pub fn find_null_array(pkcs11: &Pkcs11, slot: Slot, t: &mut Transcript) -> Option<()> {
    let s = user_session(pkcs11, slot, t)?;
    for n in 0..2u8 {
        t.ok(
            &format!("create data object {n}"),
            s.create_object(&data_object("null array", n, false, false)),
        )?;
    }
    let r = raw();
    t.ok(
        "C_FindObjectsInit by label",
        r.find_init(s.handle(), &[(CKA_LABEL, b"null array")]),
    )?;
    t.outcome(
        "C_FindObjects into a NULL array of 0 handles",
        r.find(s.handle(), 0),
        |v| format!("found {}", v.len()),
    );
    let found = t.value("C_FindObjects of up to 10", r.find(s.handle(), 10), |v| {
        format!("found {}", v.len())
    })?;
    t.check("the search found both objects", found.len() == 2);
    t.ok("C_FindObjectsFinal", r.find_final(s.handle()))
}

/// Attributes: a label change is visible (also to search), the length
/// query and a too small buffer behave as the spec says, a sensitive value
/// is CKR_ATTRIBUTE_SENSITIVE, an unknown attribute type is
/// CKR_ATTRIBUTE_TYPE_INVALID with the others still filled in, and
/// read-only attributes stay so.
pub fn attributes(pkcs11: &Pkcs11, slot: Slot, t: &mut Transcript) -> Option<()> {
    let s = user_session(pkcs11, slot, t)?;
    let key = import_aes(&s, t, "attr key", &AES_KEY, &[])?;
    t.bytes("CKA_LABEL", attribute(&s, key, CKA_LABEL))?;
    t.ok(
        "C_SetAttributeValue CKA_LABEL",
        s.update_attributes(key, &[Attribute::Label(b"renamed".to_vec())]),
    )?;
    let label = t.bytes("CKA_LABEL after the change", attribute(&s, key, CKA_LABEL))?;
    t.check("the new label is visible", label == b"renamed");
    let n = count(
        t,
        "find by the old label",
        &s,
        &[Attribute::Label(b"attr key".to_vec())],
    )?;
    t.check("not found by the old label", n == 0);
    let n = count(
        t,
        "find by the new label",
        &s,
        &[Attribute::Label(b"renamed".to_vec())],
    )?;
    t.check("found by the new label", n == 1);

    let out = get_raw(
        t,
        "length query of CKA_VALUE",
        &s,
        key,
        &[(CKA_VALUE, None)],
        None,
    );
    t.check("CKA_VALUE is 32 bytes long", out[0].len == 32);
    let out = get_raw(
        t,
        "CKA_VALUE into 8 bytes",
        &s,
        key,
        &[(CKA_VALUE, Some(8))],
        Some(RvError::BufferTooSmall),
    );
    t.check(
        "too small: length unavailable",
        out[0].len == CK_UNAVAILABLE_INFORMATION,
    );
    let out = get_raw(
        t,
        "CKA_VALUE into 64 bytes",
        &s,
        key,
        &[(CKA_VALUE, Some(64))],
        None,
    );
    t.check("the value is the key", out[0].value == AES_KEY);
    let query = [
        (CKA_LABEL, Some(64)),
        (CKA_MODULUS, Some(64)),
        (CKA_VALUE_LEN, Some(8)),
    ];
    let out = get_raw(
        t,
        "an attribute the key has not",
        &s,
        key,
        &query,
        Some(RvError::AttributeTypeInvalid),
    );
    t.check(
        "its neighbours are filled in",
        out[0].value == b"renamed" && out[1].len == CK_UNAVAILABLE_INFORMATION && out[2].len == 8,
    );

    let secret = import_aes(
        &s,
        t,
        "sensitive key",
        &AES_KEY_2,
        &[Attribute::Sensitive(true)],
    )?;
    let out = get_raw(
        t,
        "CKA_VALUE of a sensitive key",
        &s,
        secret,
        &[(CKA_VALUE, None)],
        Some(RvError::AttributeSensitive),
    );
    t.check(
        "sensitive: length unavailable",
        out[0].len == CK_UNAVAILABLE_INFORMATION,
    );
    let query = [(CKA_LABEL, Some(64)), (CKA_VALUE, Some(64))];
    let out = get_raw(
        t,
        "CKA_LABEL and CKA_VALUE of a sensitive key",
        &s,
        secret,
        &query,
        Some(RvError::AttributeSensitive),
    );
    t.check(
        "the label is still filled in",
        out[0].value == b"sensitive key",
    );
    t.fails(
        "make a sensitive key non-sensitive",
        s.update_attributes(secret, &[Attribute::Sensitive(false)]),
        RvError::AttributeReadOnly,
    );

    let rsa = import_rsa(&s, t, "attr rsa")?;
    let modulus = t.bytes(
        "CKA_MODULUS of the RSA private key",
        attribute(&s, rsa.private, CKA_MODULUS),
    )?;
    t.check("it is the fixed modulus", modulus == rsa_modulus());
    t.fails(
        "CKA_PRIVATE_EXPONENT",
        attribute(&s, rsa.private, CKA_PRIVATE_EXPONENT),
        RvError::AttributeSensitive,
    );
    t.bytes(
        "CKA_PUBLIC_EXPONENT of the public key",
        attribute(&s, rsa.public, CKA_PUBLIC_EXPONENT),
    );

    t.rejected(
        "change CKA_CLASS",
        s.update_attributes(key, &[Attribute::Class(ObjectClass::DATA)]),
    );
    t.outcome(
        "C_GetObjectSize",
        raw().object_size(s.handle(), key.handle()),
        |n| n.to_string(),
    );
    // SAFETY: a made-up handle is only passed to the module, whose answer
    // to an unknown handle is what is recorded.
    let unknown = unsafe { ObjectHandle::new_from_raw(0xdead) };
    t.fails(
        "CKA_LABEL of an unknown handle",
        attribute(&s, unknown, CKA_LABEL),
        RvError::ObjectHandleInvalid,
    );
    t.fails(
        "C_SetAttributeValue of an unknown handle",
        s.update_attributes(unknown, &[Attribute::Label(b"x".to_vec())]),
        RvError::ObjectHandleInvalid,
    );
    Some(())
}

/// C_CopyObject makes an equal key (also as a token object), C_DestroyObject
/// invalidates the handle for every later call, CKA_COPYABLE and
/// CKA_DESTROYABLE are enforced, and a read-only session makes no token
/// objects.
pub fn copy_destroy(pkcs11: &Pkcs11, slot: Slot, t: &mut Transcript) -> Option<()> {
    let s = user_session(pkcs11, slot, t)?;
    let orig = import_aes(&s, t, "original", &AES_KEY, &[])?;
    let ct = t.bytes("encrypt with the original", cbc_encrypt(&s, orig))?;
    let copy = t.ok(
        "C_CopyObject",
        s.copy_object(orig, &[Attribute::Label(b"copy".to_vec())]),
    )?;
    t.bytes("CKA_LABEL of the copy", attribute(&s, copy, CKA_LABEL))?;
    let ct2 = t.bytes("encrypt with the copy", cbc_encrypt(&s, copy))?;
    t.check("the copy is the same key", ct == ct2);
    let tok = t.ok(
        "C_CopyObject to a token object",
        s.copy_object(
            orig,
            &[
                Attribute::Label(b"token copy".to_vec()),
                Attribute::Token(true),
            ],
        ),
    )?;
    t.bytes("CKA_TOKEN of the token copy", attribute(&s, tok, CKA_TOKEN));
    let n = count(
        t,
        "find the token copy",
        &s,
        &[Attribute::Label(b"token copy".to_vec())],
    )?;
    t.check("the token copy is found", n == 1);

    t.ok("C_DestroyObject of the copy", s.destroy_object(copy))?;
    t.fails(
        "CKA_LABEL of the destroyed copy",
        attribute(&s, copy, CKA_LABEL),
        RvError::ObjectHandleInvalid,
    );
    t.fails_one_of(
        "encrypt with the destroyed copy",
        cbc_encrypt(&s, copy),
        INVALID_KEY,
    );
    t.fails(
        "C_CopyObject of the destroyed copy",
        s.copy_object(copy, &[]),
        RvError::ObjectHandleInvalid,
    );
    t.fails(
        "C_DestroyObject again",
        s.destroy_object(copy),
        RvError::ObjectHandleInvalid,
    );
    t.ok("C_DestroyObject of the token copy", s.destroy_object(tok))?;
    let n = count(
        t,
        "find the token copy",
        &s,
        &[Attribute::Label(b"token copy".to_vec())],
    )?;
    t.check("the token copy is gone", n == 0);

    let fixed = import_aes(
        &s,
        t,
        "not copyable",
        &AES_KEY_2,
        &[Attribute::Copyable(false)],
    )?;
    t.fails(
        "C_CopyObject of a non-copyable key",
        s.copy_object(fixed, &[]),
        RvError::ActionProhibited,
    );
    let kept = import_aes(
        &s,
        t,
        "not destroyable",
        &AES_KEY_2,
        &[Attribute::Destroyable(false)],
    )?;
    t.fails(
        "C_DestroyObject of a non-destroyable key",
        s.destroy_object(kept),
        RvError::ActionProhibited,
    );
    let ct3 = t.bytes("encrypt with the original again", cbc_encrypt(&s, orig))?;
    t.check("the original is untouched", ct == ct3);

    let ro = t.ok("open a RO session", pkcs11.open_ro_session(slot))?;
    t.fails(
        "C_CopyObject to a token object in it",
        ro.copy_object(orig, &[Attribute::Token(true)]),
        RvError::SessionReadOnly,
    );
    let token_key = aes_template("ro token key", &AES_KEY, &[Attribute::Token(true)]);
    t.fails(
        "C_CreateObject of a token object in it",
        ro.create_object(&token_key),
        RvError::SessionReadOnly,
    );
    let ro_copy = t.ok(
        "C_CopyObject to a session object in it",
        ro.copy_object(orig, &[Attribute::Label(b"ro copy".to_vec())]),
    )?;
    t.bytes("CKA_LABEL of that copy", attribute(&s, ro_copy, CKA_LABEL));
    t.ok(
        "C_DestroyObject of it from the RW session",
        s.destroy_object(ro_copy),
    );
    Some(())
}

/// Session objects are shared by the application's sessions and vanish
/// when the session that made them closes (or all sessions close); token
/// objects stay; private objects hide while logged out.
pub fn session_objects_lifetime(pkcs11: &Pkcs11, slot: Slot, t: &mut Transcript) -> Option<()> {
    let a = user_session(pkcs11, slot, t)?;
    let b = t.ok("open a second RW session", pkcs11.open_rw_session(slot))?;
    let key_a = import_aes(&a, t, "owned by A", &AES_KEY, &[])?;
    t.ok(
        "create a token data object",
        a.create_object(&data_object("kept", 1, true, false)),
    )?;
    let n = count(
        t,
        "B finds A's session key",
        &b,
        &[Attribute::Label(b"owned by A".to_vec())],
    )?;
    t.check("A's key is visible to B", n == 1);
    t.bytes("B encrypts with A's key", cbc_encrypt(&b, key_a))?;

    t.ok("close A", a.close())?;
    let n = count(
        t,
        "B looks for A's key",
        &b,
        &[Attribute::Label(b"owned by A".to_vec())],
    )?;
    t.check("A's key is gone", n == 0);
    t.fails(
        "CKA_LABEL of A's key",
        attribute(&b, key_a, CKA_LABEL),
        RvError::ObjectHandleInvalid,
    );
    t.fails_one_of(
        "B encrypts with A's key",
        cbc_encrypt(&b, key_a),
        INVALID_KEY,
    );
    let kept = t.ok(
        "B finds the token object",
        b.find_objects(&[Attribute::Label(b"kept".to_vec())]),
    )?;
    t.check("the token object is still there", kept.len() == 1)?;

    let key_b = import_aes(&b, t, "owned by B", &AES_KEY, &[])?;
    let c = t.ok("open a third session", pkcs11.open_ro_session(slot))?;
    let found = t.ok(
        "C finds B's key",
        c.find_objects(&[Attribute::Label(b"owned by B".to_vec())]),
    )?;
    t.check("C sees B's key under B's handle", found == [key_b]);
    t.ok("close C", c.close())?;
    t.bytes("B still encrypts with its key", cbc_encrypt(&b, key_b))?;

    t.ok("C_CloseAllSessions", raw().close_all_sessions(slot.id()))?;
    let d = user_session(pkcs11, slot, t)?;
    let n = count(
        t,
        "find B's key after C_CloseAllSessions",
        &d,
        &[Attribute::Label(b"owned by B".to_vec())],
    )?;
    t.check("B's key is gone", n == 0);
    t.fails(
        "CKA_LABEL of B's key",
        attribute(&d, key_b, CKA_LABEL),
        RvError::ObjectHandleInvalid,
    );
    let again = t.ok(
        "find the token object again",
        d.find_objects(&[Attribute::Label(b"kept".to_vec())]),
    )?;
    t.check("the token object survives", again.len() == 1)?;
    t.bytes("its value", attribute(&d, again[0], CKA_VALUE));
    t.outcome(
        "CKA_VALUE through its handle from before",
        attribute(&d, kept[0], CKA_VALUE),
        |v| hex(v),
    );

    // Logging out hides private objects; public ones stay usable.
    let private = import_aes(
        &d,
        t,
        "private token key",
        &AES_KEY,
        &[Attribute::Private(true), Attribute::Token(true)],
    )?;
    let private_session = import_aes(
        &d,
        t,
        "private session key",
        &AES_KEY,
        &[Attribute::Private(true)],
    )?;
    let public = import_aes(
        &d,
        t,
        "public session key",
        &AES_KEY_2,
        &[Attribute::Private(false)],
    )?;
    t.ok("C_Logout", d.logout())?;
    t.rejected(
        "CKA_LABEL of the private token key, logged out",
        attribute(&d, private, CKA_LABEL),
    );
    t.rejected(
        "CKA_LABEL of the private session key, logged out",
        attribute(&d, private_session, CKA_LABEL),
    );
    t.bytes(
        "CKA_LABEL of the public session key, logged out",
        attribute(&d, public, CKA_LABEL),
    );
    t.ok(
        "C_Login user",
        d.login(UserType::User, Some(&pin(USER_PIN))),
    )?;
    t.outcome(
        "CKA_LABEL of the private token key through its handle from before",
        attribute(&d, private, CKA_LABEL),
        |v| hex(v),
    );
    t.outcome(
        "CKA_LABEL of the private session key through its handle from before",
        attribute(&d, private_session, CKA_LABEL),
        |v| hex(v),
    );
    count(
        t,
        "find the private session key again",
        &d,
        &[Attribute::Label(b"private session key".to_vec())],
    );
    let found = t.ok(
        "find the private token key again",
        d.find_objects(&[Attribute::Label(b"private token key".to_vec())]),
    )?;
    t.check("found once", found.len() == 1)?;
    t.bytes("encrypt with it", cbc_encrypt(&d, found[0]));
    Some(())
}
