//! PKCS#11 scenarios that run against any module, SoftHSM2 directly or
//! through p11shim, and record a [`Transcript`] of every step.
//!
//! A scenario is a function `fn(&Pkcs11, Slot, &mut Transcript) -> Option<()>`
//! over an initialized library and the slot of the token [`TOKEN`]; it
//! returns `None` when it stopped early because a step the rest depends on
//! failed (that step is in the transcript). Scenarios check their own
//! expectations step by step; the transparency test also compares the
//! transcripts of both modules line by line.
//!
//! Areas: [`session`] (initialize/finalize, sessions, login and PINs,
//! random, slot and token information),
//! [`objects`] (search, attributes, copy/destroy, lifetimes), [`sign`],
//! [`cipher`] (encryption, digests, dual-function calls, operation state)
//! and [`keys`] (generation, wrapping, derivation); [`fixtures`] holds the
//! key material, [`raw`] the calls `cryptoki` does not offer.

pub mod cipher;
pub mod fixtures;
pub mod keys;
pub mod objects;
pub mod raw;
pub mod session;
pub mod sign;
mod transcript;

use std::path::Path;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::Result;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use pkcs11_sys::CK_ATTRIBUTE_TYPE;

pub use transcript::{Step, Transcript, hex};

use crate::{TestEnv, USER_PIN};

/// Label of the token the scenarios run on (and of p11shim's virtual slot
/// over it).
pub const TOKEN: &str = "scenarios";

/// A test environment holding the scenarios' token and a p11shim
/// configuration with one virtual slot over it, labelled [`TOKEN`] too.
pub fn environment() -> TestEnv {
    let env = TestEnv::new();
    env.init_token(TOKEN);
    env.single_slot_config(TOKEN, TOKEN, "", "");
    env
}

/// A named scenario.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    pub name: &'static str,
    pub run: fn(&Pkcs11, Slot, &mut Transcript) -> Option<()>,
}

/// Every scenario, by the name tests and the runner use.
pub const ALL: &[Scenario] = &[
    Scenario {
        name: "init_finalize_cycles",
        run: session::init_finalize_cycles,
    },
    Scenario {
        name: "sessions",
        run: session::sessions,
    },
    Scenario {
        name: "login_logout",
        run: session::login_logout,
    },
    Scenario {
        name: "random",
        run: session::random,
    },
    Scenario {
        name: "slot_token_info",
        run: session::slot_token_info,
    },
    Scenario {
        name: "find_objects",
        run: objects::find_objects,
    },
    Scenario {
        name: "find_null_array",
        run: objects::find_null_array,
    },
    Scenario {
        name: "attributes",
        run: objects::attributes,
    },
    Scenario {
        name: "copy_destroy",
        run: objects::copy_destroy,
    },
    Scenario {
        name: "session_objects_lifetime",
        run: objects::session_objects_lifetime,
    },
    Scenario {
        name: "sign_rsa",
        run: sign::sign_rsa,
    },
    Scenario {
        name: "sign_ecdsa",
        run: sign::sign_ecdsa,
    },
    Scenario {
        name: "encrypt_aes",
        run: cipher::encrypt_aes,
    },
    Scenario {
        name: "encrypt_rsa_oaep",
        run: cipher::encrypt_rsa_oaep,
    },
    Scenario {
        name: "digest_multipart",
        run: cipher::digest_multipart,
    },
    Scenario {
        name: "dual_function",
        run: cipher::dual_function,
    },
    Scenario {
        name: "operation_state",
        run: cipher::operation_state,
    },
    Scenario {
        name: "generate_keys",
        run: keys::generate_keys,
    },
    Scenario {
        name: "wrap_unwrap",
        run: keys::wrap_unwrap,
    },
    Scenario {
        name: "ecdh_derive",
        run: keys::ecdh_derive,
    },
];

/// A scenario by name.
pub fn by_name(name: &str) -> Option<&'static Scenario> {
    ALL.iter().find(|s| s.name == name)
}

/// The initialization arguments every scenario uses.
pub fn init_args() -> CInitializeArgs {
    CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)
}

/// A scenario run: its transcript, and the id of the slot it ran on (the
/// module's own, so not part of the transcript).
#[derive(Debug)]
pub struct Run {
    pub transcript: Transcript,
    pub slot: Option<u64>,
}

/// Runs a scenario against `module` in this process: initializes it, finds
/// the slot of [`TOKEN`], runs the scenario and finalizes. The environment
/// (`SOFTHSM2_CONF`, `P11SHIM_CONFIG`) must point at a token [`TOKEN`].
pub fn run(module: &Path, scenario: &Scenario) -> Run {
    let mut t = Transcript::default();
    raw::load(module);
    let pkcs11 = Pkcs11::new(module).unwrap_or_else(|e| panic!("load {}: {e}", module.display()));
    if t.ok("C_Initialize", pkcs11.initialize(init_args()))
        .is_none()
    {
        return Run {
            transcript: t,
            slot: None,
        };
    }
    let slot = token_slot(&pkcs11, &mut t);
    if let Some(slot) = slot {
        (scenario.run)(&pkcs11, slot, &mut t);
    }
    t.ok("C_Finalize", pkcs11.finalize());
    Run {
        transcript: t,
        slot: slot.map(|s| s.id()),
    }
}

/// The slot whose token is labelled [`TOKEN`].
fn token_slot(pkcs11: &Pkcs11, t: &mut Transcript) -> Option<Slot> {
    let slots = t.ok("C_GetSlotList with tokens", pkcs11.get_slots_with_token())?;
    let found = slots
        .into_iter()
        .find(|s| pkcs11.get_token_info(*s).is_ok_and(|i| i.label() == TOKEN));
    t.check("a slot holds the scenarios' token", found.is_some())?;
    found
}

/// A PIN for `C_Login`.
pub fn pin(p: &str) -> AuthPin {
    AuthPin::from(p)
}

/// Opens a read/write session and logs the user in.
pub fn user_session(pkcs11: &Pkcs11, slot: Slot, t: &mut Transcript) -> Option<Session> {
    let s = t.ok("open RW session", pkcs11.open_rw_session(slot))?;
    t.ok(
        "C_Login user",
        s.login(UserType::User, Some(&pin(USER_PIN))),
    )?;
    Some(s)
}

/// One attribute's value (`C_GetAttributeValue`, length query first).
pub fn attribute(s: &Session, o: ObjectHandle, ty: CK_ATTRIBUTE_TYPE) -> Result<Vec<u8>> {
    raw::raw().attribute(s.handle(), o.handle(), ty)
}

/// Records the number of objects a search finds.
pub fn count(t: &mut Transcript, name: &str, s: &Session, template: &[Attribute]) -> Option<usize> {
    t.value(name, s.find_objects(template).map(|v| v.len()), |n| {
        format!("found {n}")
    })
}

/// The fixed plaintext the AES steps encrypt.
pub const PLAINTEXT: &[u8] =
    b"The quick brown fox jumps over the lazy dog; p11shim forwards it all.";

/// AES-CBC-PAD with the fixed IV over [`PLAINTEXT`]: what tells two AES
/// keys apart or shows them equal.
pub fn cbc_encrypt(s: &Session, key: ObjectHandle) -> Result<Vec<u8>> {
    s.encrypt(&Mechanism::AesCbcPad(fixtures::IV), key, PLAINTEXT)
}

/// SHA-256 of `data` by the module.
pub fn sha256(s: &Session, data: &[u8]) -> Result<Vec<u8>> {
    s.digest(&Mechanism::Sha256, data)
}

/// Expands `$m!` with every scenario, each with a line saying what it
/// proves: the test files make one test per scenario from it.
#[macro_export]
macro_rules! for_each_scenario {
    ($m:ident) => {
        $m! {
        /// Three initialize/use/finalize cycles in one process work through p11shim.
        init_finalize_cycles,
        /// RO/RW sessions report the virtual slot and their state; C_CloseAllSessions closes them all.
        sessions,
        /// Wrong PIN, double login, SO/user exclusion, logout, C_SetPIN and C_InitPIN give the spec's codes.
        login_logout,
        /// C_GenerateRandom returns the lengths asked for, with fresh bytes each time.
        random,
        /// Slot, token and mechanism information and slot events come through p11shim.
        slot_token_info,
        /// Searches by label, id and class, in several batches, find exactly what exists.
        find_objects,
        /// C_FindObjects into a NULL array of 0 handles leaves the search usable.
        find_null_array,
        /// Attribute changes are visible; length queries, small buffers and sensitive values follow the spec.
        attributes,
        /// Copies are equal keys; destroyed handles are invalid everywhere.
        copy_destroy,
        /// Session objects die with their session, token objects survive C_CloseAllSessions.
        session_objects_lifetime,
        /// RSA PKCS#1 v1.5 and PSS signatures, single- and multi-part, verify.
        sign_rsa,
        /// ECDSA P-256 and P-384 signatures verify and fail on other data.
        sign_ecdsa,
        /// AES-GCM and AES-CBC-PAD (multi-part too) round-trip and refuse tampering.
        encrypt_aes,
        /// RSA-OAEP and RSA PKCS#1 v1.5 encryption round-trip.
        encrypt_rsa_oaep,
        /// SHA digests over several updates equal single-part ones; C_DigestKey digests the key value.
        digest_multipart,
        /// Dual-function updates work or are CKR_FUNCTION_NOT_SUPPORTED.
        dual_function,
        /// C_GetOperationState/C_SetOperationState answer without disturbing the operation.
        operation_state,
        /// Generated AES, RSA and EC keys work and token ones are found again.
        generate_keys,
        /// AES key wrap and RSA-OAEP wrap round-trip an AES key.
        wrap_unwrap,
        /// ECDH on P-256 gives the same secret both ways.
        ecdh_derive,
        }
    };
}
