//! Every PKCS#11 entry point, exported by name.
//!
//! Each body runs in [`guard`]: it turns the application's pointers into
//! checked views (`mem`) and calls one method of the initialized library.
//! The spec's return codes for bad arguments are decided here, before any
//! vendor is called.

#![allow(non_snake_case)]

use pkcs11_sys::*;

use super::guard::guard;
use super::mem::{
    self, Bytes, BytesMut, Mechanism, Out, OutBytes, OutHandles, OutList, Param, Template,
};
use super::{FUNCTION_LIST, INTERFACE_NAME, INTERFACES};
use crate::dispatch::{self, current};
use crate::error::Error;
use crate::router::replay::OpKind;

/// Defines exported PKCS#11 functions; each body is a closure returning
/// `Result<()>`, run through the guard.
macro_rules! cryptoki {
    ($( fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block )*) => {$(
        /// PKCS#11 entry point.
        ///
        /// # Safety
        /// Called by applications as the PKCS#11 specification describes:
        /// every pointer is NULL or valid for the sizes given with it.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> CK_RV {
            guard(stringify!($name), || $body)
        }
    )*};
}

/// Defines exported data-path functions: a direct session's call goes to
/// the member's vendor function of the same name, with the session handle
/// (and `key`, if named) translated, when the arguments pass `$valid` (what
/// the body's views would accept); any other call runs the body in the
/// guard. `$kind` is the operation the call continues (`None` for `*Init`
/// and calls outside an operation).
macro_rules! cryptoki_direct {
    ($( fn $name:ident($h:ident: Sh $(, $arg:ident: $ty:ty)* $(,)?)
        direct($kind:expr, $valid:expr $(, key $key:ident)?) $body:block )*) => {$(
        /// PKCS#11 entry point.
        ///
        /// # Safety
        /// Called by applications as the PKCS#11 specification describes:
        /// every pointer is NULL or valid for the sizes given with it.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name($h: Sh $(, $arg: $ty)*) -> CK_RV {
            // The full path, kept out of the direct one's frame.
            #[inline(never)]
            fn full($h: Sh $(, $arg: $ty)*) -> CK_RV {
                guard(stringify!($name), || $body)
            }
            if $valid {
                if let Some(d) = dispatch::direct($h) {
                    let rv = (|| {
                        $( let $key = d.object($key)?; )?
                        let f = d.functions().$name?;
                        // SAFETY: the application's arguments, checked as
                        // the body's views check them, with p11shim's
                        // handles replaced by the member's; `f` is the
                        // member's own entry point.
                        let rv = unsafe { f(d.vendor_session() $(, $arg)*) };
                        d.finish(stringify!($name), $kind, rv)
                    })();
                    if let Some(rv) = rv {
                        return rv;
                    }
                }
            }
            full($h $(, $arg)*)
        }
    )*};
}

/// An input buffer the views accept: NULL only with length 0.
#[inline(always)]
fn in_ok(ptr: CK_BYTE_PTR, len: CK_ULONG) -> bool {
    !ptr.is_null() || len == 0
}

type Sh = CK_SESSION_HANDLE;
type Oh = CK_OBJECT_HANDLE;

// SAFETY (for every `unsafe` block below that builds a view): the pointers
// come from the application, which the spec obliges to pass NULL or memory
// valid for the sizes given with them for the duration of the call; each
// view checks what the spec lets it check (NULL where forbidden).

cryptoki! {
    // --- General purpose (5.4) ---
    fn C_Initialize(init_args: CK_VOID_PTR) {
        // SAFETY: see above.
        let args = unsafe { mem::init_args(init_args)? };
        dispatch::initialize(args.reserved.as_deref(), args.no_threads, Some(C_Initialize))
    }

    fn C_Finalize(reserved: CK_VOID_PTR) {
        if !reserved.is_null() {
            return Err(Error::ArgumentsBad("pReserved must be NULL"));
        }
        dispatch::finalize()
    }

    fn C_GetInfo(info: CK_INFO_PTR) {
        current()?;
        // SAFETY: see above.
        let mut out = unsafe { Out::new(info)? };
        out.write(dispatch::info(CK_VERSION { major: 3, minor: 0 }));
        Ok(())
    }

    fn C_GetFunctionList(list: CK_FUNCTION_LIST_PTR_PTR) {
        // SAFETY: see above.
        let mut out = unsafe { Out::new(list)? };
        out.write((&raw const FUNCTION_LIST).cast_mut());
        Ok(())
    }

    fn C_GetInterfaceList(list: CK_INTERFACE_PTR, count: CK_ULONG_PTR) {
        // SAFETY: see above.
        let mut out = unsafe { OutList::new(list, count)? };
        let all: Vec<CK_INTERFACE> = INTERFACES.iter().map(|i| i.0).collect();
        out.write(&all)
    }

    fn C_GetInterface(name: CK_UTF8CHAR_PTR, version: CK_VERSION_PTR, iface: CK_INTERFACE_PTR_PTR, flags: CK_FLAGS) {
        // SAFETY: see above.
        let mut out = unsafe { Out::new(iface)? };
        // SAFETY: a non-NULL name is a NUL-terminated string per the spec.
        let name = unsafe { mem::c_str(name as *const _) };
        // No name asks for the default interface, the standard one.
        let name = name.unwrap_or_else(|| String::from_utf8_lossy(&INTERFACE_NAME[..INTERFACE_NAME.len() - 1]).into_owned());
        // SAFETY: a non-NULL version points to a CK_VERSION.
        let want = unsafe { version.as_ref() }.copied();
        let found = INTERFACES.iter().find(|i| {
            // SAFETY: interface names are NUL-terminated statics, and every
            // function list starts with its version.
            let (n, v) = unsafe { (mem::c_str(i.0.pInterfaceName as *const _), *(i.0.pFunctionList as *const CK_VERSION)) };
            n.as_deref() == Some(name.as_str())
                && want.is_none_or(|w| w.major == v.major && w.minor == v.minor)
                && (i.0.flags & flags) == flags
        });
        match found {
            Some(i) => {
                out.write((&raw const i.0).cast_mut());
                Ok(())
            }
            None => Err(Error::ArgumentsBad("no interface of that version and flags")),
        }
    }

    // --- Slots and tokens (5.5) ---
    fn C_GetSlotList(token_present: CK_BBOOL, list: CK_SLOT_ID_PTR, count: CK_ULONG_PTR) {
        let lib = current()?;
        // SAFETY: see above.
        lib.get_slot_list(token_present != CK_FALSE, unsafe { OutList::new(list, count)? })
    }

    fn C_GetSlotInfo(slot: CK_SLOT_ID, info: CK_SLOT_INFO_PTR) {
        let lib = current()?;
        // SAFETY: see above.
        lib.get_slot_info(slot, unsafe { Out::new(info)? })
    }

    fn C_GetTokenInfo(slot: CK_SLOT_ID, info: CK_TOKEN_INFO_PTR) {
        let lib = current()?;
        // SAFETY: see above.
        lib.get_token_info(slot, unsafe { Out::new(info)? })
    }

    fn C_GetMechanismList(slot: CK_SLOT_ID, list: CK_MECHANISM_TYPE_PTR, count: CK_ULONG_PTR) {
        let lib = current()?;
        // SAFETY: see above.
        lib.get_mechanism_list(slot, unsafe { OutList::new(list, count)? })
    }

    fn C_GetMechanismInfo(slot: CK_SLOT_ID, ty: CK_MECHANISM_TYPE, info: CK_MECHANISM_INFO_PTR) {
        let lib = current()?;
        // SAFETY: see above.
        lib.get_mechanism_info(slot, ty, unsafe { Out::new(info)? })
    }

    fn C_InitToken(slot: CK_SLOT_ID, pin: CK_UTF8CHAR_PTR, pin_len: CK_ULONG, label: CK_UTF8CHAR_PTR) {
        let lib = current()?;
        // SAFETY: see above.
        lib.init_token(slot, unsafe { Bytes::new(pin, pin_len)? }, unsafe { mem::Label::new(label)? })
    }

    fn C_InitPIN(h: Sh, pin: CK_UTF8CHAR_PTR, pin_len: CK_ULONG) {
        let lib = current()?;
        // SAFETY: see above.
        lib.init_pin(h, unsafe { Bytes::new(pin, pin_len)? })
    }

    fn C_SetPIN(h: Sh, old: CK_UTF8CHAR_PTR, old_len: CK_ULONG, new: CK_UTF8CHAR_PTR, new_len: CK_ULONG) {
        let lib = current()?;
        // SAFETY: see above.
        lib.set_pin(h, unsafe { Bytes::new(old, old_len)? }, unsafe { Bytes::new(new, new_len)? })
    }

    fn C_WaitForSlotEvent(flags: CK_FLAGS, slot: CK_SLOT_ID_PTR, reserved: CK_VOID_PTR) {
        let lib = current()?;
        if !reserved.is_null() {
            return Err(Error::ArgumentsBad("pReserved must be NULL"));
        }
        // SAFETY: see above.
        lib.wait_for_slot_event(flags, unsafe { Out::new(slot)? })
    }

    // --- Sessions (5.6); C_OpenSession and C_CloseSession are further down ---
    fn C_CloseAllSessions(slot: CK_SLOT_ID) {
        current()?.close_all_sessions(slot)
    }

    fn C_GetSessionInfo(h: Sh, info: CK_SESSION_INFO_PTR) {
        let lib = current()?;
        // SAFETY: see above.
        lib.get_session_info(h, unsafe { Out::new(info)? })
    }

    fn C_GetOperationState(h: Sh, state: CK_BYTE_PTR, state_len: CK_ULONG_PTR) {
        let lib = current()?;
        // SAFETY: see above.
        lib.get_operation_state(h, unsafe { OutBytes::new(state, state_len)? })
    }

    fn C_SetOperationState(h: Sh, state: CK_BYTE_PTR, state_len: CK_ULONG, enc_key: Oh, auth_key: Oh) {
        let lib = current()?;
        // SAFETY: see above.
        lib.set_operation_state(h, unsafe { Bytes::new(state, state_len)? }, enc_key, auth_key)
    }

    fn C_Login(h: Sh, user: CK_USER_TYPE, pin: CK_UTF8CHAR_PTR, pin_len: CK_ULONG) {
        let lib = current()?;
        // SAFETY: see above.
        lib.login(h, user, unsafe { Bytes::new(pin, pin_len)? })
    }

    fn C_LoginUser(h: Sh, user: CK_USER_TYPE, pin: CK_UTF8CHAR_PTR, pin_len: CK_ULONG, name: CK_UTF8CHAR_PTR, name_len: CK_ULONG) {
        let lib = current()?;
        // SAFETY: see above.
        lib.login_user(h, user, unsafe { Bytes::new(pin, pin_len)? }, unsafe { Bytes::new(name, name_len)? })
    }

    fn C_Logout(h: Sh) {
        current()?.logout(h)
    }

    fn C_SessionCancel(h: Sh, flags: CK_FLAGS) {
        current()?.session_cancel(h, flags)
    }

    // --- Objects (5.7) ---
    fn C_CreateObject(h: Sh, template: CK_ATTRIBUTE_PTR, count: CK_ULONG, object: CK_OBJECT_HANDLE_PTR) {
        let lib = current()?;
        // SAFETY: see above.
        lib.create_object(h, unsafe { Template::new(template, count)? }, unsafe { Out::new(object)? })
    }

    fn C_CopyObject(h: Sh, object: Oh, template: CK_ATTRIBUTE_PTR, count: CK_ULONG, new_object: CK_OBJECT_HANDLE_PTR) {
        let lib = current()?;
        // SAFETY: see above.
        lib.copy_object(h, object, unsafe { Template::new(template, count)? }, unsafe { Out::new(new_object)? })
    }

    fn C_DestroyObject(h: Sh, object: Oh) {
        current()?.destroy_object(h, object)
    }

    fn C_GetObjectSize(h: Sh, object: Oh, size: CK_ULONG_PTR) {
        let lib = current()?;
        // SAFETY: see above.
        lib.get_object_size(h, object, unsafe { Out::new(size)? })
    }

    fn C_GetAttributeValue(h: Sh, object: Oh, template: CK_ATTRIBUTE_PTR, count: CK_ULONG) {
        let lib = current()?;
        // SAFETY: see above.
        lib.get_attribute_value(h, object, unsafe { Template::new(template, count)? })
    }

    fn C_SetAttributeValue(h: Sh, object: Oh, template: CK_ATTRIBUTE_PTR, count: CK_ULONG) {
        let lib = current()?;
        // SAFETY: see above.
        lib.set_attribute_value(h, object, unsafe { Template::new(template, count)? })
    }

    fn C_FindObjectsInit(h: Sh, template: CK_ATTRIBUTE_PTR, count: CK_ULONG) {
        let lib = current()?;
        // SAFETY: see above.
        lib.find_objects_init(h, unsafe { Template::new(template, count)? })
    }

    fn C_FindObjects(h: Sh, objects: CK_OBJECT_HANDLE_PTR, max: CK_ULONG, count: CK_ULONG_PTR) {
        let lib = current()?;
        // SAFETY: see above.
        lib.find_objects(h, unsafe { OutHandles::new(objects, max, count)? })
    }

    fn C_FindObjectsFinal(h: Sh) {
        current()?.find_objects_final(h)
    }

    // --- Encryption and decryption (5.8, 5.9) ---

    // --- Message digesting (5.10) ---

    fn C_DigestKey(h: Sh, key: Oh) {
        current()?.digest_key(h, key)
    }

    // --- Signing and MACing (5.11), verifying (5.12) ---

    fn C_SignRecoverInit(h: Sh, mech: CK_MECHANISM_PTR, key: Oh) {
        let lib = current()?;
        // SAFETY: see above.
        lib.sign_recover_init(h, unsafe { Mechanism::new(mech)? }, key)
    }

    fn C_SignRecover(h: Sh, data: CK_BYTE_PTR, len: CK_ULONG, sig: CK_BYTE_PTR, sig_len: CK_ULONG_PTR) {
        let lib = current()?;
        // SAFETY: see above.
        lib.sign_recover(h, unsafe { Bytes::new(data, len)? }, unsafe { OutBytes::new(sig, sig_len)? })
    }

    fn C_VerifyRecoverInit(h: Sh, mech: CK_MECHANISM_PTR, key: Oh) {
        let lib = current()?;
        // SAFETY: see above.
        lib.verify_recover_init(h, unsafe { Mechanism::new(mech)? }, key)
    }

    fn C_VerifyRecover(h: Sh, sig: CK_BYTE_PTR, sig_len: CK_ULONG, out: CK_BYTE_PTR, out_len: CK_ULONG_PTR) {
        let lib = current()?;
        // SAFETY: see above.
        lib.verify_recover(h, unsafe { Bytes::new(sig, sig_len)? }, unsafe { OutBytes::new(out, out_len)? })
    }

    // --- Dual-function operations (5.13) ---
    fn C_DigestEncryptUpdate(h: Sh, data: CK_BYTE_PTR, len: CK_ULONG, out: CK_BYTE_PTR, out_len: CK_ULONG_PTR) {
        let lib = current()?;
        // SAFETY: see above.
        lib.digest_encrypt_update(h, unsafe { Bytes::new(data, len)? }, unsafe { OutBytes::new(out, out_len)? })
    }

    fn C_DecryptDigestUpdate(h: Sh, data: CK_BYTE_PTR, len: CK_ULONG, out: CK_BYTE_PTR, out_len: CK_ULONG_PTR) {
        let lib = current()?;
        // SAFETY: see above.
        lib.decrypt_digest_update(h, unsafe { Bytes::new(data, len)? }, unsafe { OutBytes::new(out, out_len)? })
    }

    fn C_SignEncryptUpdate(h: Sh, data: CK_BYTE_PTR, len: CK_ULONG, out: CK_BYTE_PTR, out_len: CK_ULONG_PTR) {
        let lib = current()?;
        // SAFETY: see above.
        lib.sign_encrypt_update(h, unsafe { Bytes::new(data, len)? }, unsafe { OutBytes::new(out, out_len)? })
    }

    fn C_DecryptVerifyUpdate(h: Sh, data: CK_BYTE_PTR, len: CK_ULONG, out: CK_BYTE_PTR, out_len: CK_ULONG_PTR) {
        let lib = current()?;
        // SAFETY: see above.
        lib.decrypt_verify_update(h, unsafe { Bytes::new(data, len)? }, unsafe { OutBytes::new(out, out_len)? })
    }

    // --- Key management (5.14) ---
    fn C_GenerateKey(h: Sh, mech: CK_MECHANISM_PTR, template: CK_ATTRIBUTE_PTR, count: CK_ULONG, key: CK_OBJECT_HANDLE_PTR) {
        let lib = current()?;
        // SAFETY: see above.
        lib.generate_key(h, unsafe { Mechanism::new(mech)? }, unsafe { Template::new(template, count)? }, unsafe { Out::new(key)? })
    }

    fn C_GenerateKeyPair(
        h: Sh,
        mech: CK_MECHANISM_PTR,
        pub_template: CK_ATTRIBUTE_PTR,
        pub_count: CK_ULONG,
        priv_template: CK_ATTRIBUTE_PTR,
        priv_count: CK_ULONG,
        pub_key: CK_OBJECT_HANDLE_PTR,
        priv_key: CK_OBJECT_HANDLE_PTR,
    ) {
        let lib = current()?;
        // SAFETY: see above.
        let (m, pt, st) = unsafe { (Mechanism::new(mech)?, Template::new(pub_template, pub_count)?, Template::new(priv_template, priv_count)?) };
        // SAFETY: see above.
        let (po, so) = unsafe { (Out::new(pub_key)?, Out::new(priv_key)?) };
        lib.generate_key_pair(h, m, pt, st, po, so)
    }

    fn C_WrapKey(h: Sh, mech: CK_MECHANISM_PTR, wrapping: Oh, key: Oh, out: CK_BYTE_PTR, out_len: CK_ULONG_PTR) {
        let lib = current()?;
        // SAFETY: see above.
        lib.wrap_key(h, unsafe { Mechanism::new(mech)? }, wrapping, key, unsafe { OutBytes::new(out, out_len)? })
    }

    fn C_UnwrapKey(
        h: Sh,
        mech: CK_MECHANISM_PTR,
        unwrapping: Oh,
        wrapped: CK_BYTE_PTR,
        wrapped_len: CK_ULONG,
        template: CK_ATTRIBUTE_PTR,
        count: CK_ULONG,
        key: CK_OBJECT_HANDLE_PTR,
    ) {
        let lib = current()?;
        // SAFETY: see above.
        let (m, w, t, k) = unsafe { (Mechanism::new(mech)?, Bytes::new(wrapped, wrapped_len)?, Template::new(template, count)?, Out::new(key)?) };
        lib.unwrap_key(h, m, unwrapping, w, t, k)
    }

    fn C_DeriveKey(h: Sh, mech: CK_MECHANISM_PTR, base: Oh, template: CK_ATTRIBUTE_PTR, count: CK_ULONG, key: CK_OBJECT_HANDLE_PTR) {
        let lib = current()?;
        // SAFETY: see above.
        lib.derive_key(h, unsafe { Mechanism::new(mech)? }, base, unsafe { Template::new(template, count)? }, unsafe { Out::new(key)? })
    }

    // --- Random numbers (5.15) ---
    fn C_SeedRandom(h: Sh, seed: CK_BYTE_PTR, len: CK_ULONG) {
        let lib = current()?;
        // SAFETY: see above.
        lib.seed_random(h, unsafe { Bytes::new(seed, len)? })
    }

    // --- Legacy parallel functions (5.16) ---
    fn C_GetFunctionStatus(h: Sh) {
        current()?.get_function_status(h)
    }

    fn C_CancelFunction(h: Sh) {
        current()?.cancel_function(h)
    }

    // --- Message-based encryption and signing (3.0, 5.19 to 5.22) ---
    fn C_MessageEncryptInit(h: Sh, mech: CK_MECHANISM_PTR, key: Oh) {
        let lib = current()?;
        // SAFETY: see above.
        lib.message_encrypt_init(h, unsafe { Mechanism::new(mech)? }, key)
    }

    fn C_EncryptMessage(h: Sh, param: CK_VOID_PTR, param_len: CK_ULONG, ad: CK_BYTE_PTR, ad_len: CK_ULONG, data: CK_BYTE_PTR, len: CK_ULONG, out: CK_BYTE_PTR, out_len: CK_ULONG_PTR) {
        let lib = current()?;
        // SAFETY: see above.
        let (p, a, d, o) = unsafe { (Param::new(param, param_len)?, Bytes::new(ad, ad_len)?, Bytes::new(data, len)?, OutBytes::new(out, out_len)?) };
        lib.encrypt_message(h, p, a, d, o)
    }

    fn C_EncryptMessageBegin(h: Sh, param: CK_VOID_PTR, param_len: CK_ULONG, ad: CK_BYTE_PTR, ad_len: CK_ULONG) {
        let lib = current()?;
        // SAFETY: see above.
        lib.encrypt_message_begin(h, unsafe { Param::new(param, param_len)? }, unsafe { Bytes::new(ad, ad_len)? })
    }

    fn C_EncryptMessageNext(h: Sh, param: CK_VOID_PTR, param_len: CK_ULONG, data: CK_BYTE_PTR, len: CK_ULONG, out: CK_BYTE_PTR, out_len: CK_ULONG_PTR, flags: CK_FLAGS) {
        let lib = current()?;
        // SAFETY: see above.
        let (p, d, o) = unsafe { (Param::new(param, param_len)?, Bytes::new(data, len)?, OutBytes::new(out, out_len)?) };
        lib.encrypt_message_next(h, p, d, o, flags)
    }

    fn C_MessageEncryptFinal(h: Sh) {
        current()?.message_encrypt_final(h)
    }

    fn C_MessageDecryptInit(h: Sh, mech: CK_MECHANISM_PTR, key: Oh) {
        let lib = current()?;
        // SAFETY: see above.
        lib.message_decrypt_init(h, unsafe { Mechanism::new(mech)? }, key)
    }

    fn C_DecryptMessage(h: Sh, param: CK_VOID_PTR, param_len: CK_ULONG, ad: CK_BYTE_PTR, ad_len: CK_ULONG, data: CK_BYTE_PTR, len: CK_ULONG, out: CK_BYTE_PTR, out_len: CK_ULONG_PTR) {
        let lib = current()?;
        // SAFETY: see above.
        let (p, a, d, o) = unsafe { (Param::new(param, param_len)?, Bytes::new(ad, ad_len)?, Bytes::new(data, len)?, OutBytes::new(out, out_len)?) };
        lib.decrypt_message(h, p, a, d, o)
    }

    fn C_DecryptMessageBegin(h: Sh, param: CK_VOID_PTR, param_len: CK_ULONG, ad: CK_BYTE_PTR, ad_len: CK_ULONG) {
        let lib = current()?;
        // SAFETY: see above.
        lib.decrypt_message_begin(h, unsafe { Param::new(param, param_len)? }, unsafe { Bytes::new(ad, ad_len)? })
    }

    fn C_DecryptMessageNext(h: Sh, param: CK_VOID_PTR, param_len: CK_ULONG, data: CK_BYTE_PTR, len: CK_ULONG, out: CK_BYTE_PTR, out_len: CK_ULONG_PTR, flags: CK_FLAGS) {
        let lib = current()?;
        // SAFETY: see above.
        let (p, d, o) = unsafe { (Param::new(param, param_len)?, Bytes::new(data, len)?, OutBytes::new(out, out_len)?) };
        lib.decrypt_message_next(h, p, d, o, flags)
    }

    fn C_MessageDecryptFinal(h: Sh) {
        current()?.message_decrypt_final(h)
    }

    fn C_MessageSignInit(h: Sh, mech: CK_MECHANISM_PTR, key: Oh) {
        let lib = current()?;
        // SAFETY: see above.
        lib.message_sign_init(h, unsafe { Mechanism::new(mech)? }, key)
    }

    fn C_SignMessage(h: Sh, param: CK_VOID_PTR, param_len: CK_ULONG, data: CK_BYTE_PTR, len: CK_ULONG, sig: CK_BYTE_PTR, sig_len: CK_ULONG_PTR) {
        let lib = current()?;
        // SAFETY: see above.
        let (p, d, o) = unsafe { (Param::new(param, param_len)?, Bytes::new(data, len)?, OutBytes::new(sig, sig_len)?) };
        lib.sign_message(h, p, d, o)
    }

    fn C_SignMessageBegin(h: Sh, param: CK_VOID_PTR, param_len: CK_ULONG) {
        let lib = current()?;
        // SAFETY: see above.
        lib.sign_message_begin(h, unsafe { Param::new(param, param_len)? })
    }

    fn C_SignMessageNext(h: Sh, param: CK_VOID_PTR, param_len: CK_ULONG, data: CK_BYTE_PTR, len: CK_ULONG, sig: CK_BYTE_PTR, sig_len: CK_ULONG_PTR) {
        let lib = current()?;
        // SAFETY: see above. A NULL pulSignatureLen is allowed on a
        // non-final part; the vendor sees it as given.
        let (p, d, o) = unsafe { (Param::new(param, param_len)?, Bytes::new(data, len)?, OutBytes::new_optional(sig, sig_len)) };
        lib.sign_message_next(h, p, d, o)
    }

    fn C_MessageSignFinal(h: Sh) {
        current()?.message_sign_final(h)
    }

    fn C_MessageVerifyInit(h: Sh, mech: CK_MECHANISM_PTR, key: Oh) {
        let lib = current()?;
        // SAFETY: see above.
        lib.message_verify_init(h, unsafe { Mechanism::new(mech)? }, key)
    }

    fn C_VerifyMessage(h: Sh, param: CK_VOID_PTR, param_len: CK_ULONG, data: CK_BYTE_PTR, len: CK_ULONG, sig: CK_BYTE_PTR, sig_len: CK_ULONG) {
        let lib = current()?;
        // SAFETY: see above.
        let (p, d, s) = unsafe { (Param::new(param, param_len)?, Bytes::new(data, len)?, Bytes::new(sig, sig_len)?) };
        lib.verify_message(h, p, d, s)
    }

    fn C_VerifyMessageBegin(h: Sh, param: CK_VOID_PTR, param_len: CK_ULONG) {
        let lib = current()?;
        // SAFETY: see above.
        lib.verify_message_begin(h, unsafe { Param::new(param, param_len)? })
    }

    fn C_VerifyMessageNext(h: Sh, param: CK_VOID_PTR, param_len: CK_ULONG, data: CK_BYTE_PTR, len: CK_ULONG, sig: CK_BYTE_PTR, sig_len: CK_ULONG) {
        let lib = current()?;
        // SAFETY: see above.
        let (p, d, s) = unsafe { (Param::new(param, param_len)?, Bytes::new(data, len)?, Bytes::new(sig, sig_len)?) };
        lib.verify_message_next(h, p, d, s)
    }

    fn C_MessageVerifyFinal(h: Sh) {
        current()?.message_verify_final(h)
    }
}

/// p11shim's status query (`P11SHIM_FUNCTION_LIST.P11shim_GetStatus`):
/// every virtual slot and member, as JSON, with the two-call convention.
pub(super) unsafe extern "C" fn p11shim_get_status(
    buf: CK_UTF8CHAR_PTR,
    len: CK_ULONG_PTR,
) -> CK_RV {
    guard("P11shim_GetStatus", || {
        let lib = current()?;
        // SAFETY: see above.
        let mut out = unsafe { OutList::new(buf, len)? };
        out.write(lib.status_json().as_bytes())
    })
}

/// `C_GetInfo` of the 2.40 function list: the same, with version 2.40.
pub(super) unsafe extern "C" fn get_info_v2(info: CK_INFO_PTR) -> CK_RV {
    guard("C_GetInfo", || {
        current()?;
        // SAFETY: see above.
        let mut out = unsafe { Out::new(info)? };
        out.write(dispatch::info(CK_VERSION {
            major: 2,
            minor: 40,
        }));
        Ok(())
    })
}

// --- Sessions (5.6): opening and closing ---

/// PKCS#11 entry point: `C_OpenSession`, the direct way when the slot
/// allows it (`dispatch::direct`), else through the guard.
///
/// Notification callbacks are optional for a library (5.16); p11shim makes
/// none, and passes none to the vendor, which would call back with its own
/// handles.
///
/// # Safety
/// Called by applications as the PKCS#11 specification describes: every
/// pointer is NULL or valid for the sizes given with it.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn C_OpenSession(
    slot: CK_SLOT_ID,
    flags: CK_FLAGS,
    _app: CK_VOID_PTR,
    _notify: CK_NOTIFY,
    session: CK_SESSION_HANDLE_PTR,
) -> CK_RV {
    #[inline(never)]
    fn full(slot: CK_SLOT_ID, flags: CK_FLAGS, session: CK_SESSION_HANDLE_PTR) -> CK_RV {
        guard("C_OpenSession", || {
            let lib = current()?;
            // SAFETY: see above.
            lib.open_session(slot, flags, unsafe { Out::new(session)? })
        })
    }
    // SAFETY: the application's handle pointer, NULL or writable.
    if let Some(rv) = unsafe { dispatch::direct::open_session(slot, flags, session) } {
        return rv;
    }
    full(slot, flags, session)
}

/// PKCS#11 entry point: `C_CloseSession`, the direct way for a direct
/// session, else through the guard.
///
/// # Safety
/// Called by applications as the PKCS#11 specification describes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn C_CloseSession(h: Sh) -> CK_RV {
    #[inline(never)]
    fn full(h: Sh) -> CK_RV {
        guard("C_CloseSession", || current()?.close_session(h))
    }
    if let Some(rv) = dispatch::direct::close_session(h) {
        return rv;
    }
    full(h)
}

// The data path: with a direct session (see `dispatch::direct`) these go
// straight to the vendor; otherwise, and for any argument or handle the
// direct path does not take, the body runs as for every other function.
cryptoki_direct! {
    fn C_EncryptInit(h: Sh, mech: CK_MECHANISM_PTR, key: Oh)
        direct(None, !mech.is_null(), key key)
    {
        let lib = current()?;
        // SAFETY: see above.
        lib.encrypt_init(h, unsafe { Mechanism::new(mech)? }, key)
    }

    fn C_Encrypt(h: Sh, data: CK_BYTE_PTR, len: CK_ULONG, out: CK_BYTE_PTR, out_len: CK_ULONG_PTR)
        direct(Some(OpKind::Encrypt), in_ok(data, len) && !out_len.is_null())
    {
        let lib = current()?;
        // SAFETY: see above.
        lib.encrypt(h, unsafe { Bytes::new(data, len)? }, unsafe { OutBytes::new(out, out_len)? })
    }

    fn C_EncryptUpdate(h: Sh, data: CK_BYTE_PTR, len: CK_ULONG, out: CK_BYTE_PTR, out_len: CK_ULONG_PTR)
        direct(Some(OpKind::Encrypt), in_ok(data, len) && !out_len.is_null())
    {
        let lib = current()?;
        // SAFETY: see above.
        lib.encrypt_update(h, unsafe { Bytes::new(data, len)? }, unsafe { OutBytes::new(out, out_len)? })
    }

    fn C_EncryptFinal(h: Sh, out: CK_BYTE_PTR, out_len: CK_ULONG_PTR)
        direct(Some(OpKind::Encrypt), !out_len.is_null())
    {
        let lib = current()?;
        // SAFETY: see above.
        lib.encrypt_final(h, unsafe { OutBytes::new(out, out_len)? })
    }

    fn C_DecryptInit(h: Sh, mech: CK_MECHANISM_PTR, key: Oh)
        direct(None, !mech.is_null(), key key)
    {
        let lib = current()?;
        // SAFETY: see above.
        lib.decrypt_init(h, unsafe { Mechanism::new(mech)? }, key)
    }

    fn C_Decrypt(h: Sh, data: CK_BYTE_PTR, len: CK_ULONG, out: CK_BYTE_PTR, out_len: CK_ULONG_PTR)
        direct(Some(OpKind::Decrypt), in_ok(data, len) && !out_len.is_null())
    {
        let lib = current()?;
        // SAFETY: see above.
        lib.decrypt(h, unsafe { Bytes::new(data, len)? }, unsafe { OutBytes::new(out, out_len)? })
    }

    fn C_DecryptUpdate(h: Sh, data: CK_BYTE_PTR, len: CK_ULONG, out: CK_BYTE_PTR, out_len: CK_ULONG_PTR)
        direct(Some(OpKind::Decrypt), in_ok(data, len) && !out_len.is_null())
    {
        let lib = current()?;
        // SAFETY: see above.
        lib.decrypt_update(h, unsafe { Bytes::new(data, len)? }, unsafe { OutBytes::new(out, out_len)? })
    }

    fn C_DecryptFinal(h: Sh, out: CK_BYTE_PTR, out_len: CK_ULONG_PTR)
        direct(Some(OpKind::Decrypt), !out_len.is_null())
    {
        let lib = current()?;
        // SAFETY: see above.
        lib.decrypt_final(h, unsafe { OutBytes::new(out, out_len)? })
    }

    fn C_DigestInit(h: Sh, mech: CK_MECHANISM_PTR)
        direct(None, !mech.is_null())
    {
        let lib = current()?;
        // SAFETY: see above.
        lib.digest_init(h, unsafe { Mechanism::new(mech)? })
    }

    fn C_Digest(h: Sh, data: CK_BYTE_PTR, len: CK_ULONG, out: CK_BYTE_PTR, out_len: CK_ULONG_PTR)
        direct(Some(OpKind::Digest), in_ok(data, len) && !out_len.is_null())
    {
        let lib = current()?;
        // SAFETY: see above.
        lib.digest(h, unsafe { Bytes::new(data, len)? }, unsafe { OutBytes::new(out, out_len)? })
    }

    fn C_DigestUpdate(h: Sh, data: CK_BYTE_PTR, len: CK_ULONG)
        direct(Some(OpKind::Digest), in_ok(data, len))
    {
        let lib = current()?;
        // SAFETY: see above.
        lib.digest_update(h, unsafe { Bytes::new(data, len)? })
    }

    fn C_DigestFinal(h: Sh, out: CK_BYTE_PTR, out_len: CK_ULONG_PTR)
        direct(Some(OpKind::Digest), !out_len.is_null())
    {
        let lib = current()?;
        // SAFETY: see above.
        lib.digest_final(h, unsafe { OutBytes::new(out, out_len)? })
    }

    fn C_SignInit(h: Sh, mech: CK_MECHANISM_PTR, key: Oh)
        direct(None, !mech.is_null(), key key)
    {
        let lib = current()?;
        // SAFETY: see above.
        lib.sign_init(h, unsafe { Mechanism::new(mech)? }, key)
    }

    fn C_Sign(h: Sh, data: CK_BYTE_PTR, len: CK_ULONG, sig: CK_BYTE_PTR, sig_len: CK_ULONG_PTR)
        direct(Some(OpKind::Sign), in_ok(data, len) && !sig_len.is_null())
    {
        let lib = current()?;
        // SAFETY: see above.
        lib.sign(h, unsafe { Bytes::new(data, len)? }, unsafe { OutBytes::new(sig, sig_len)? })
    }

    fn C_SignUpdate(h: Sh, data: CK_BYTE_PTR, len: CK_ULONG)
        direct(Some(OpKind::Sign), in_ok(data, len))
    {
        let lib = current()?;
        // SAFETY: see above.
        lib.sign_update(h, unsafe { Bytes::new(data, len)? })
    }

    fn C_SignFinal(h: Sh, sig: CK_BYTE_PTR, sig_len: CK_ULONG_PTR)
        direct(Some(OpKind::Sign), !sig_len.is_null())
    {
        let lib = current()?;
        // SAFETY: see above.
        lib.sign_final(h, unsafe { OutBytes::new(sig, sig_len)? })
    }

    fn C_VerifyInit(h: Sh, mech: CK_MECHANISM_PTR, key: Oh)
        direct(None, !mech.is_null(), key key)
    {
        let lib = current()?;
        // SAFETY: see above.
        lib.verify_init(h, unsafe { Mechanism::new(mech)? }, key)
    }

    fn C_Verify(h: Sh, data: CK_BYTE_PTR, len: CK_ULONG, sig: CK_BYTE_PTR, sig_len: CK_ULONG)
        direct(Some(OpKind::Verify), in_ok(data, len) && in_ok(sig, sig_len))
    {
        let lib = current()?;
        // SAFETY: see above.
        lib.verify(h, unsafe { Bytes::new(data, len)? }, unsafe { Bytes::new(sig, sig_len)? })
    }

    fn C_VerifyUpdate(h: Sh, data: CK_BYTE_PTR, len: CK_ULONG)
        direct(Some(OpKind::Verify), in_ok(data, len))
    {
        let lib = current()?;
        // SAFETY: see above.
        lib.verify_update(h, unsafe { Bytes::new(data, len)? })
    }

    fn C_VerifyFinal(h: Sh, sig: CK_BYTE_PTR, sig_len: CK_ULONG)
        direct(Some(OpKind::Verify), in_ok(sig, sig_len))
    {
        let lib = current()?;
        // SAFETY: see above.
        lib.verify_final(h, unsafe { Bytes::new(sig, sig_len)? })
    }

    fn C_GenerateRandom(h: Sh, out: CK_BYTE_PTR, len: CK_ULONG)
        direct(None, in_ok(out, len))
    {
        let lib = current()?;
        // SAFETY: see above.
        lib.generate_random(h, unsafe { BytesMut::new(out, len)? })
    }
}
