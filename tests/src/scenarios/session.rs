//! Scenarios of the library's life, its slots and sessions:
//! initialize/finalize cycles, session kinds and states, login, logout and
//! PIN changes, random numbers, slot, token and mechanism information.

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::RvError;
use cryptoki::mechanism::MechanismType;
use cryptoki::object::{Attribute, ObjectClass};
use cryptoki::session::{SessionInfo, UserType};
use cryptoki::slot::{Slot, TokenInfo};
use pkcs11_sys::CKF_SERIAL_SESSION;

use super::fixtures::{AES_KEY, import_aes};
use super::{Transcript, cbc_encrypt, count, init_args, pin, raw::raw, sha256, user_session};
use crate::{SO_PIN, USER_PIN};

/// A slot id no module here has.
const NO_SUCH_SLOT: u64 = 0x7fff_0000_1234;

/// What of a session's information is the same through any module: its
/// state and kind (not its slot, whose id is the module's own).
fn show_session(info: &SessionInfo) -> String {
    format!("{:?} rw={}", info.session_state(), info.read_write())
}

/// The login-related flags of a token.
fn show_pin_flags(i: &TokenInfo) -> String {
    format!(
        "count_low={} final_try={} locked={} initialized={}",
        i.user_pin_count_low(),
        i.user_pin_final_try(),
        i.user_pin_locked(),
        i.user_pin_initialized()
    )
}

/// What of a token's information is the same through any module: all but
/// its label, serial number and clock.
fn show_token(i: &TokenInfo) -> String {
    format!(
        "manufacturer={:?} model={:?} rng={} write_protected={} login_required={} user_pin_initialized={} \
         token_initialized={} protected_path={} dual={} pin_len={}..{} sessions={:?}/{:?} rw={:?}/{:?} \
         public_memory={:?}/{:?} private_memory={:?}/{:?} hw={:?} fw={:?}",
        i.manufacturer_id(),
        i.model(),
        i.rng(),
        i.write_protected(),
        i.login_required(),
        i.user_pin_initialized(),
        i.token_initialized(),
        i.protected_authentication_path(),
        i.dual_crypto_operations(),
        i.min_pin_length(),
        i.max_pin_length(),
        i.session_count(),
        i.max_session_count(),
        i.rw_session_count(),
        i.max_rw_session_count(),
        i.free_public_memory(),
        i.total_public_memory(),
        i.free_private_memory(),
        i.total_private_memory(),
        i.hardware_version(),
        i.firmware_version()
    )
}

/// Three cycles of initialize, use, finalize in one process (initialized
/// again with OS locking, with no flags, and without threads): sessions die
/// with C_Finalize, token objects survive it, and a second C_Initialize or
/// C_Finalize is refused.
pub fn init_finalize_cycles(pkcs11: &Pkcs11, slot: Slot, t: &mut Transcript) -> Option<()> {
    t.fails(
        "C_Initialize while initialized",
        pkcs11.initialize(init_args()),
        RvError::CryptokiAlreadyInitialized,
    );
    let kept = [
        Attribute::Class(ObjectClass::DATA),
        Attribute::Label(b"kept across cycles".to_vec()),
    ];
    for cycle in 1..=3 {
        let step = |what: &str| format!("cycle {cycle}: {what}");
        let s = user_session(pkcs11, slot, t)?;
        t.bytes(&step("SHA-256"), sha256(&s, step("data").as_bytes()))?;
        let key = import_aes(&s, t, "cycle key", &AES_KEY, &[])?;
        t.bytes(
            &step("AES-CBC-PAD with a session key"),
            cbc_encrypt(&s, key),
        )?;
        if cycle == 1 {
            let mut data = kept.to_vec();
            data.extend([
                Attribute::Token(true),
                Attribute::Value(b"persistent".to_vec()),
            ]);
            t.ok("create a token data object", s.create_object(&data))?;
        }
        let n = count(t, &step("find the token data object"), &s, &kept)?;
        t.check(&step("the token data object is there"), n == 1);
        t.ok(&step("C_Finalize"), pkcs11.clone().finalize())?;
        t.fails(
            &step("C_GetSessionInfo after C_Finalize"),
            s.get_session_info(),
            RvError::CryptokiNotInitialized,
        );
        t.fails(
            &step("C_Finalize again"),
            pkcs11.clone().finalize(),
            RvError::CryptokiNotInitialized,
        );
        t.fails(
            &step("C_GetSlotList while finalized"),
            pkcs11.get_slots_with_token(),
            RvError::CryptokiNotInitialized,
        );
        let flags = [
            CInitializeFlags::OS_LOCKING_OK,
            CInitializeFlags::empty(),
            CInitializeFlags::LIBRARY_CANT_CREATE_OS_THREADS,
        ];
        t.ok(
            &step("C_Initialize"),
            pkcs11.initialize(CInitializeArgs::new(flags[cycle - 1])),
        )?;
        t.fails(
            &step("session of the last cycle"),
            s.get_session_info(),
            RvError::SessionHandleInvalid,
        );
        t.fails(
            &step("C_CloseSession of it"),
            s.close(),
            RvError::SessionHandleInvalid,
        );
        let slots = t.ok(&step("C_GetSlotList"), pkcs11.get_slots_with_token())?;
        t.check(&step("the slot is back"), slots.contains(&slot));
    }
    Some(())
}

/// Read-only and read/write sessions: their information names the slot
/// they were opened on and follows login; parallel sessions and unknown
/// slots are refused; C_CloseAllSessions closes every one, and closing the
/// last session logs out.
pub fn sessions(pkcs11: &Pkcs11, slot: Slot, t: &mut Transcript) -> Option<()> {
    let ro = t.ok("open RO session", pkcs11.open_ro_session(slot))?;
    let info = t.value("RO session info", ro.get_session_info(), show_session)?;
    t.check("RO session info names the slot", info.slot_id() == slot);
    t.check("RO session is read-only", !info.read_write());
    let rw = t.ok("open RW session", pkcs11.open_rw_session(slot))?;
    let info = t.value("RW session info", rw.get_session_info(), show_session)?;
    t.check("RW session info names the slot", info.slot_id() == slot);
    t.check("RW session is read/write", info.read_write());
    t.value(
        "token info session counts",
        pkcs11.get_token_info(slot),
        |i| {
            format!(
                "sessions={:?} rw={:?}",
                i.session_count(),
                i.rw_session_count()
            )
        },
    );

    t.ok(
        "C_Login user on the RW session",
        rw.login(UserType::User, Some(&pin(USER_PIN))),
    )?;
    t.value(
        "RO session info after login",
        ro.get_session_info(),
        show_session,
    );
    t.value(
        "RW session info after login",
        rw.get_session_info(),
        show_session,
    );
    let late = t.ok(
        "open a RO session after login",
        pkcs11.open_ro_session(slot),
    )?;
    t.value("its info", late.get_session_info(), show_session);
    t.ok("close it", late.close())?;

    let r = raw();
    t.fails(
        "open a session without CKF_SERIAL_SESSION",
        r.open_session(slot.id(), 0),
        RvError::SessionParallelNotSupported,
    );
    t.fails(
        "open a session on an unknown slot",
        r.open_session(NO_SUCH_SLOT, CKF_SERIAL_SESSION),
        RvError::SlotIdInvalid,
    );
    if let Some(h) = t.ok(
        "open a session through C_OpenSession",
        r.open_session(slot.id(), CKF_SERIAL_SESSION),
    ) {
        t.ok("close it", r.close_session(h));
        t.fails(
            "close it again",
            r.close_session(h),
            RvError::SessionHandleInvalid,
        );
    }

    t.ok("close the RO session", ro.close())?;
    t.value(
        "RW session info after closing the RO session",
        rw.get_session_info(),
        show_session,
    );
    t.fails(
        "C_CloseAllSessions of an unknown slot",
        r.close_all_sessions(NO_SUCH_SLOT),
        RvError::SlotIdInvalid,
    );
    t.ok("C_CloseAllSessions", r.close_all_sessions(slot.id()))?;
    t.fails(
        "RW session after C_CloseAllSessions",
        rw.get_session_info(),
        RvError::SessionHandleInvalid,
    );
    t.fails("close it", rw.close(), RvError::SessionHandleInvalid);
    let again = t.ok(
        "open a session after C_CloseAllSessions",
        pkcs11.open_ro_session(slot),
    )?;
    let info = t.value(
        "its info: logged out",
        again.get_session_info(),
        show_session,
    )?;
    t.check("its info names the slot", info.slot_id() == slot);

    t.ok(
        "C_Login user",
        again.login(UserType::User, Some(&pin(USER_PIN))),
    )?;
    t.ok("close the last session", again.close())?;
    let last = t.ok(
        "open a session after closing the last one",
        pkcs11.open_ro_session(slot),
    )?;
    t.value(
        "its info: logged out",
        last.get_session_info(),
        show_session,
    );
    Some(())
}

/// Login and logout: a wrong PIN is CKR_PIN_INCORRECT, a second login
/// CKR_USER_ALREADY_LOGGED_IN, the SO cannot log in beside the user or a
/// read-only session, session states follow; C_SetPIN and the SO's
/// C_InitPIN change the PIN that login accepts.
pub fn login_logout(pkcs11: &Pkcs11, slot: Slot, t: &mut Transcript) -> Option<()> {
    let s = t.ok("open RW session", pkcs11.open_rw_session(slot))?;
    t.fails(
        "C_Login with a wrong PIN",
        s.login(UserType::User, Some(&pin("0000"))),
        RvError::PinIncorrect,
    );
    t.value(
        "PIN flags after a wrong PIN",
        pkcs11.get_token_info(slot),
        show_pin_flags,
    );
    t.ok(
        "C_Login user",
        s.login(UserType::User, Some(&pin(USER_PIN))),
    )?;
    t.value(
        "PIN flags after login",
        pkcs11.get_token_info(slot),
        show_pin_flags,
    );
    t.value("session state", s.get_session_info(), show_session);
    t.fails(
        "C_Login user again",
        s.login(UserType::User, Some(&pin(USER_PIN))),
        RvError::UserAlreadyLoggedIn,
    );
    t.fails(
        "C_Login SO beside the user",
        s.login(UserType::So, Some(&pin(SO_PIN))),
        RvError::UserAnotherAlreadyLoggedIn,
    );
    t.rejected(
        "C_Login context-specific without an operation",
        s.login(UserType::ContextSpecific, Some(&pin(USER_PIN))),
    );
    t.ok("C_Logout", s.logout())?;
    t.outcome("C_Logout again", s.logout(), |_| String::new());
    t.value(
        "session state after logout",
        s.get_session_info(),
        show_session,
    );

    let ro = t.ok("open RO session", pkcs11.open_ro_session(slot))?;
    t.fails(
        "C_Login SO with a read-only session open",
        s.login(UserType::So, Some(&pin(SO_PIN))),
        RvError::SessionReadOnlyExists,
    );
    t.ok("close the RO session", ro.close())?;
    t.ok("C_Login SO", s.login(UserType::So, Some(&pin(SO_PIN))))?;
    t.value(
        "session state of the SO",
        s.get_session_info(),
        show_session,
    );
    t.fails(
        "C_Login user beside the SO",
        s.login(UserType::User, Some(&pin(USER_PIN))),
        RvError::UserAnotherAlreadyLoggedIn,
    );
    t.fails(
        "open RO session while the SO is logged in",
        pkcs11.open_ro_session(slot),
        RvError::SessionReadWriteSoExists,
    );
    t.ok("C_Logout SO", s.logout())?;
    t.fails(
        "C_Login with an empty PIN",
        s.login(UserType::User, Some(&pin(""))),
        RvError::PinIncorrect,
    );
    t.ok(
        "C_Login user after the SO",
        s.login(UserType::User, Some(&pin(USER_PIN))),
    )?;
    t.value("session state", s.get_session_info(), show_session);

    t.fails(
        "C_SetPIN with a wrong old PIN",
        s.set_pin(&pin("0000"), &pin("1111")),
        RvError::PinIncorrect,
    );
    t.ok("C_SetPIN", s.set_pin(&pin(USER_PIN), &pin("4321")))?;
    t.rejected("C_InitPIN as the user", s.init_pin(&pin(USER_PIN)));
    t.ok("C_Logout", s.logout())?;
    t.fails(
        "C_Login with the old PIN",
        s.login(UserType::User, Some(&pin(USER_PIN))),
        RvError::PinIncorrect,
    );
    t.ok(
        "C_Login with the new PIN",
        s.login(UserType::User, Some(&pin("4321"))),
    )?;
    t.ok("C_Logout", s.logout())?;
    t.ok("C_Login SO", s.login(UserType::So, Some(&pin(SO_PIN))))?;
    t.ok("C_InitPIN as the SO", s.init_pin(&pin(USER_PIN)))?;
    t.ok("C_Logout SO", s.logout())?;
    t.ok(
        "C_Login with the PIN the SO set",
        s.login(UserType::User, Some(&pin(USER_PIN))),
    )?;
    t.value(
        "session state at the end",
        s.get_session_info(),
        show_session,
    );
    Some(())
}

/// Slot, token and mechanism information as the vendor gives it: the
/// mechanism list and every mechanism's details, the token's flags,
/// limits and versions, the slot's presence flags and versions (its
/// description is the virtual slot's own); a non-blocking
/// C_WaitForSlotEvent; unknown slots are refused.
pub fn slot_token_info(pkcs11: &Pkcs11, slot: Slot, t: &mut Transcript) -> Option<()> {
    let info = t.value("C_GetSlotInfo", pkcs11.get_slot_info(slot), |i| {
        format!(
            "token_present={} removable={} hw={:?} fw={:?}",
            i.token_present(),
            i.removable_device(),
            i.hardware_version(),
            i.firmware_version()
        )
    })?;
    t.check("the token is present", info.token_present());
    t.value("C_GetTokenInfo", pkcs11.get_token_info(slot), show_token);
    let mechanisms = t.value("C_GetMechanismList", pkcs11.get_mechanism_list(slot), |m| {
        m.iter()
            .map(|m| m.to_string())
            .collect::<Vec<_>>()
            .join(",")
    })?;
    let wanted = [
        MechanismType::AES_KEY_GEN,
        MechanismType::RSA_PKCS_KEY_PAIR_GEN,
        MechanismType::ECC_KEY_PAIR_GEN,
        MechanismType::SHA256,
    ];
    t.check(
        "the mechanisms the scenarios use are listed",
        wanted.iter().all(|m| mechanisms.contains(m)),
    );
    for m in mechanisms {
        t.value(
            &format!("C_GetMechanismInfo {m}"),
            pkcs11.get_mechanism_info(slot, m),
            |i| format!("{i:?}"),
        );
    }
    t.fails(
        "C_GetMechanismInfo of an unsupported mechanism",
        pkcs11.get_mechanism_info(slot, MechanismType::ML_DSA),
        RvError::MechanismInvalid,
    );
    t.outcome(
        "C_WaitForSlotEvent without blocking",
        pkcs11.get_slot_event(),
        |e| format!("event={}", e.is_some()),
    );
    let unknown = Slot::try_from(NO_SUCH_SLOT).ok()?;
    t.fails(
        "C_GetSlotInfo of an unknown slot",
        pkcs11.get_slot_info(unknown),
        RvError::SlotIdInvalid,
    );
    t.fails(
        "C_GetTokenInfo of an unknown slot",
        pkcs11.get_token_info(unknown),
        RvError::SlotIdInvalid,
    );
    t.fails(
        "C_GetMechanismList of an unknown slot",
        pkcs11.get_mechanism_list(unknown),
        RvError::SlotIdInvalid,
    );
    let all = t.ok("C_GetSlotList of all slots", pkcs11.get_all_slots())?;
    t.check("the slot is among them", all.contains(&slot));
    Some(())
}

/// C_GenerateRandom of several lengths gives that many bytes, and two
/// draws differ; C_SeedRandom is answered as the vendor answers it.
pub fn random(pkcs11: &Pkcs11, slot: Slot, t: &mut Transcript) -> Option<()> {
    let s = t.ok("open RO session", pkcs11.open_ro_session(slot))?;
    for n in [1u32, 16, 32, 257, 4096] {
        let r = t.len(
            &format!("C_GenerateRandom of {n} bytes"),
            s.generate_random_vec(n),
        )?;
        t.check(&format!("{n} bytes came back"), r.len() == n as usize);
    }
    let a = t.len("first draw", s.generate_random_vec(32))?;
    let b = t.len("second draw", s.generate_random_vec(32))?;
    t.check("two draws differ", a != b);
    let mut buf = [0u8; 64];
    t.ok(
        "C_GenerateRandom into a slice",
        s.generate_random_slice(&mut buf),
    )?;
    t.check("the slice was filled", buf != [0u8; 64]);
    t.outcome("C_SeedRandom", s.seed_random(b"some seed"), |_| {
        String::new()
    });
    t.outcome(
        "C_GenerateRandom of 0 bytes",
        s.generate_random_vec(0),
        |v| format!("len {}", v.len()),
    );
    Some(())
}
