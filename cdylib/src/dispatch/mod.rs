//! Dispatch: the module's state and one method per PKCS#11 function.
//!
//! The C boundary (`abi`) checks arguments and calls a method of
//! [`Library`]; the method translates p11shim's handles into a member's
//! vendor handles and calls the vendor through `backend`. No lock of ours is
//! held while a vendor function runs: a handle is translated under a short
//! read lock, copied out, and the lock released before the call.
//!
//! Lock order, written once: `INIT` (initialize/finalize only) → session
//! table → object table. Neither table lock is ever held across a vendor
//! call.

mod crypto;
mod handles;
mod objects;
mod slots;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::{ArcSwapOption, Guard};
use parking_lot::Mutex;
use pkcs11_sys::*;

use crate::abi::mem::unpadded;
use crate::backend::Vendor;
use crate::config::{self, Config, MemberConfig, SlotConfig, TokenSelector};
use crate::error::{Error, Result};
use crate::logging;

pub use handles::{ObjectEntry, Owner, SessionEntry};
pub use slots::info;

/// The initialized module, shared by every call.
static STATE: ArcSwapOption<Library> = ArcSwapOption::const_empty();
/// Bumped in the child after every `fork()`; state from another generation
/// is stale and reads as "not initialized".
static FORK_GEN: AtomicU64 = AtomicU64::new(0);
/// Serializes `C_Initialize` and `C_Finalize`.
static INIT: Mutex<()> = Mutex::new(());
static ATFORK: std::sync::Once = std::sync::Once::new();

extern "C" fn after_fork_in_child() {
    // Async-signal-safe: one atomic increment, nothing else.
    FORK_GEN.fetch_add(1, Ordering::Relaxed);
}

/// The initialized library, held for the duration of one call.
pub struct Current(Guard<Option<Arc<Library>>>);

impl std::fmt::Debug for Current {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Current")
    }
}

impl std::ops::Deref for Current {
    type Target = Library;
    #[inline]
    fn deref(&self) -> &Library {
        match &*self.0 {
            Some(lib) => lib,
            // `current` only builds a `Current` from `Some`.
            None => unreachable!("Current holds an initialized library"),
        }
    }
}

/// The initialized library, or `CKR_CRYPTOKI_NOT_INITIALIZED` (also in a
/// forked child that has not initialized again).
#[inline]
pub fn current() -> Result<Current> {
    let guard = STATE.load();
    match &*guard {
        Some(lib) if lib.fork_gen == FORK_GEN.load(Ordering::Relaxed) => Ok(Current(guard)),
        _ => Err(Error::NotInitialized),
    }
}

/// `C_Initialize`: reads and validates the configuration, then loads,
/// initializes and resolves the members.
pub fn initialize(reserved: Option<&str>, no_threads: bool, own: CK_C_Initialize) -> Result<()> {
    let _init = INIT.lock();
    let generation = FORK_GEN.load(Ordering::Relaxed);
    let stale = match STATE.load_full() {
        Some(lib) if lib.fork_gen == generation => return Err(Error::AlreadyInitialized),
        other => other,
    };

    let path = config::locate(reserved);
    let cfg = match config::load(&path) {
        Ok(cfg) => cfg,
        Err(e) => {
            logging::setup(&config::LogConfig { level: config::LogLevel::Info, file: None });
            tracing::error!(error = %e, "C_Initialize: invalid configuration");
            return Err(Error::Config(e.to_string()));
        }
    };
    logging::setup(&cfg.log);

    // In a forked child the parent's vendor libraries are still mapped:
    // reuse them, initializing each again.
    let inherited: Vec<Arc<Vendor>> = match stale {
        Some(lib) => {
            STATE.store(None);
            tracing::info!("C_Initialize in a forked child: state of the parent discarded");
            lib.vendors.iter().map(|v| v.vendor.clone()).collect()
        }
        None => Vec::new(),
    };
    let mut lib = Library::open(cfg, generation, inherited, own).inspect_err(|e| {
        tracing::error!(config = %path.display(), error = %e, "C_Initialize failed");
    })?;
    lib.no_threads = no_threads;
    tracing::info!(config = %path.display(), slots = lib.slots.len(), "p11shim initialized");
    STATE.store(Some(Arc::new(lib)));
    ATFORK.call_once(|| {
        if let Err(rc) = crate::abi::on_fork_in_child(after_fork_in_child) {
            tracing::warn!(rc, "pthread_atfork failed; fork() will not be detected");
        }
    });
    Ok(())
}

/// `C_Finalize`.
pub fn finalize() -> Result<()> {
    let _init = INIT.lock();
    let lib = STATE.load_full().ok_or(Error::NotInitialized)?;
    STATE.store(None);
    if lib.fork_gen != FORK_GEN.load(Ordering::Relaxed) {
        // The parent's state in a forked child: dropped without touching the
        // vendors, which belong to the parent.
        return Err(Error::NotInitialized);
    }
    for v in lib.vendors.iter().filter(|v| v.owned) {
        v.vendor.finalize();
    }
    tracing::info!("p11shim finalized");
    Ok(())
}

/// A vendor library in use, and whether p11shim initialized it.
#[derive(Debug)]
struct LoadedVendor {
    vendor: Arc<Vendor>,
    owned: bool,
}

/// One virtual slot.
#[derive(Debug)]
pub struct Slot {
    pub cfg: SlotConfig,
    pub members: Vec<Member>,
}

/// One member partition of a virtual slot.
#[derive(Debug)]
pub struct Member {
    pub vendor: Arc<Vendor>,
    /// The member's slot in its vendor library; `None` when its token was
    /// not found.
    pub vendor_slot: Option<CK_SLOT_ID>,
    pub name: String,
}

/// The initialized module.
#[derive(Debug)]
pub struct Library {
    fork_gen: u64,
    pub config: Config,
    vendors: Vec<LoadedVendor>,
    pub slots: Vec<Slot>,
    /// The application forbade threads (`CKF_LIBRARY_CANT_CREATE_OS_THREADS`).
    pub no_threads: bool,
    sessions: handles::Sessions,
    objects: handles::Objects,
}

impl Library {
    fn open(cfg: Config, fork_gen: u64, inherited: Vec<Arc<Vendor>>, own: CK_C_Initialize) -> Result<Library> {
        let mut vendors: Vec<LoadedVendor> = Vec::new();
        let result = (|| {
            let mut slots = Vec::with_capacity(cfg.slots.len());
            for sc in &cfg.slots {
                let mut members = Vec::with_capacity(sc.members.len());
                for (i, mc) in sc.members.iter().enumerate() {
                    let vendor = match vendors.iter().find(|v| v.vendor.path() == mc.library) {
                        Some(v) => v.vendor.clone(),
                        None => {
                            let (vendor, after_fork) = match inherited.iter().find(|v| v.path() == mc.library) {
                                Some(v) => (v.clone(), true),
                                None => (Arc::new(Vendor::load(&mc.library, own)?), false),
                            };
                            let init = if after_fork { vendor.initialize_after_fork() } else { vendor.initialize() };
                            let owned = init.map_err(|e| {
                                tracing::error!(library = %mc.library.display(), error = %e, "vendor C_Initialize failed");
                                Error::Backend(format!("{}: C_Initialize failed: {e}", mc.library.display()))
                            })?;
                            vendors.push(LoadedVendor { vendor: vendor.clone(), owned });
                            vendor
                        }
                    };
                    let name = format!("{}#{i}", sc.label);
                    let vendor_slot = resolve_member(&vendor, mc);
                    match vendor_slot {
                        Some(s) => tracing::info!(slot = sc.id, member = %name, vendor_slot = s, "member resolved"),
                        None => tracing::warn!(slot = sc.id, member = %name, selector = %mc.selector,
                            library = %mc.library.display(), "member token not found"),
                    }
                    members.push(Member { vendor, vendor_slot, name });
                }
                slots.push(Slot { cfg: sc.clone(), members });
            }
            Ok(slots)
        })();
        match result {
            Ok(slots) => Ok(Library {
                fork_gen,
                config: cfg,
                vendors,
                slots,
                no_threads: false,
                sessions: Default::default(),
                objects: Default::default(),
            }),
            Err(e) => {
                for v in vendors.iter().filter(|v| v.owned) {
                    v.vendor.finalize();
                }
                Err(e)
            }
        }
    }

    /// The configuration file in use.
    pub fn config_path(&self) -> &PathBuf {
        &self.config.source
    }

    /// A virtual slot by its id.
    #[inline]
    fn slot_index(&self, id: CK_SLOT_ID) -> Result<u32> {
        self.slots.iter().position(|s| s.cfg.id == id as u64).map(|i| i as u32).ok_or(Error::SlotIdInvalid)
    }

    /// The member that serves new work in a slot.
    fn serving_member(&self, slot: u32) -> Result<(u32, &Member, CK_SLOT_ID)> {
        let s = &self.slots[slot as usize];
        s.members
            .iter()
            .enumerate()
            .find_map(|(i, m)| m.vendor_slot.map(|vs| (i as u32, m, vs)))
            .ok_or(Error::TokenNotPresent)
    }

    /// A session and the vendor serving it.
    #[inline]
    fn session(&self, h: CK_SESSION_HANDLE) -> Result<(SessionEntry, &Vendor)> {
        let e = self.sessions.get(h).ok_or(Error::SessionHandleInvalid)?;
        Ok((e, &self.slots[e.slot as usize].members[e.member as usize].vendor))
    }

    /// The vendor handle of an object for a session's member. An unknown
    /// handle becomes `CK_INVALID_HANDLE`, so that the vendor answers with
    /// its own code for an invalid handle, in its own order of checks.
    #[inline]
    fn vendor_object(&self, s: &SessionEntry, h: CK_OBJECT_HANDLE) -> CK_OBJECT_HANDLE {
        match self.objects.get(h) {
            Some(o) if o.slot == s.slot && o.member == s.member => o.vendor,
            _ => CK_INVALID_HANDLE,
        }
    }

    /// The application's handle for a vendor object, issued on first sight.
    /// `creator` is the session that created it, `None` when it was found.
    fn app_object(&self, s: &SessionEntry, vendor: &Vendor, creator: Option<CK_SESSION_HANDLE>, o: CK_OBJECT_HANDLE) -> CK_OBJECT_HANDLE {
        if let Some(h) = self.objects.lookup_vendor(s.slot, s.member, o) {
            return h;
        }
        let owner = match vendor.bool_attribute(s.vendor, o, CKA_TOKEN) {
            Some(false) => creator.map_or(Owner::SlotSessions, Owner::Session),
            _ => Owner::Token,
        };
        self.objects.insert(ObjectEntry { slot: s.slot, member: s.member, vendor: o, owner })
    }
}

/// Finds a member's token among its vendor library's slots.
fn resolve_member(vendor: &Vendor, mc: &MemberConfig) -> Option<CK_SLOT_ID> {
    let mut count: CK_ULONG = 0;
    vendor.get_slot_list(CK_TRUE, crate::abi::mem::OutList::from_local(None, &mut count)).ok()?;
    let mut ids = vec![0 as CK_SLOT_ID; count as usize];
    vendor.get_slot_list(CK_TRUE, crate::abi::mem::OutList::from_local(Some(&mut ids), &mut count)).ok()?;
    ids.truncate(count as usize);
    let mut lib_info = None;
    ids.into_iter().find(|&id| {
        let mut ti = CK_TOKEN_INFO::default();
        if vendor.get_token_info(id, &mut ti).is_err() {
            return false;
        }
        match &mc.selector {
            TokenSelector::Label(l) => unpadded(&ti.label) == *l,
            TokenSelector::Uri(u) => {
                let eq = |want: &Option<String>, have: &[u8]| want.as_ref().is_none_or(|w| unpadded(have) == *w);
                let mut ok = eq(&u.token, &ti.label)
                    && eq(&u.manufacturer, &ti.manufacturerID)
                    && eq(&u.serial, &ti.serialNumber)
                    && eq(&u.model, &ti.model)
                    && u.slot_id.is_none_or(|s| s == id as u64);
                if ok && (u.slot_description.is_some() || u.slot_manufacturer.is_some()) {
                    let mut si = CK_SLOT_INFO::default();
                    ok = vendor.get_slot_info(id, &mut si).is_ok()
                        && eq(&u.slot_description, &si.slotDescription)
                        && eq(&u.slot_manufacturer, &si.manufacturerID);
                }
                if ok && (u.library_manufacturer.is_some() || u.library_description.is_some()) {
                    let info = lib_info.get_or_insert_with(|| {
                        let mut i = CK_INFO::default();
                        vendor.get_info(&mut i).ok().map(|_| i)
                    });
                    ok = info.as_ref().is_some_and(|i| {
                        eq(&u.library_manufacturer, &i.manufacturerID) && eq(&u.library_description, &i.libraryDescription)
                    });
                }
                ok
            }
        }
    })
}
