//! The direct path: a call on a session that nothing needs to see goes
//! straight to the vendor, with only its handles translated.
//!
//! A session is *direct* when its slot has one member, that member has no
//! call deadline, and the module keeps no per-call record: no key ACL, no
//! audit log, no metrics (`Library::lean`). For such a session the data-path
//! calls (`C_*Init`, the single-part calls, `*Update`, `*Final`,
//! `C_GenerateRandom`) cost a session lookup, a key lookup for a keyed
//! `*Init`, and the vendor call: what the full path does for them, without
//! the bookkeeping that is switched off.
//!
//! The full path stays the reference: a call the direct path cannot take
//! (an argument the spec refuses, an unknown handle, a key not yet found on
//! the member) goes the full way and gets its return code there. After a
//! vendor failure the direct path does what the full path does (the member's
//! error count, the session moved by the router); a call that is to be made
//! again after the move goes the full way.

#![allow(unsafe_code)]

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr::NonNull;
use std::sync::atomic::Ordering;

use pkcs11_sys::*;

use super::sessions::SessionRef;
use super::{FORK_GEN, Library};
use crate::abi::mem::Out;
use crate::abi::{guard, library};
use crate::error::Error;
use crate::router::{self, Health, replay::OpKind};

/// The vendor functions of a direct session's member. The function list
/// lives in the member's `Vendor`, which outlives every session of the
/// library.
#[derive(Debug, Clone, Copy)]
pub struct DirectFns(NonNull<CK_FUNCTION_LIST_3_0>);

// SAFETY: a pointer to an immutable function list, owned by the library
// that owns the session; reading it from any thread is sound.
unsafe impl Send for DirectFns {}
// SAFETY: as above.
unsafe impl Sync for DirectFns {}

impl DirectFns {
    pub fn new(fl: &CK_FUNCTION_LIST_3_0) -> DirectFns {
        DirectFns(NonNull::from(fl))
    }
}

/// `C_OpenSession` on a slot of one member without a call deadline, in a
/// lean module that may start threads: the member's `C_OpenSession`, and
/// the session entered in the table. `None`: the call goes the full way
/// (an argument the full path refuses, a member that is down).
///
/// # Safety
/// `out` is NULL or valid for writing a handle.
#[inline(always)]
pub unsafe fn open_session(
    slot: CK_SLOT_ID,
    flags: CK_FLAGS,
    out: CK_SESSION_HANDLE_PTR,
) -> Option<CK_RV> {
    let lib = library::get()?;
    if !lib.lean
        || lib.no_threads
        || lib.fork_gen != FORK_GEN.load(Ordering::Relaxed)
        || flags & CKF_SERIAL_SESSION == 0
        || out.is_null()
    {
        return None;
    }
    let si = lib.slot_index(slot).ok()?;
    let s = lib.slots.get(si as usize)?;
    let [m] = &s.members[..] else { return None };
    if m.deadline.is_some() || m.health() != Health::Up {
        return None;
    }
    let vs = m.vendor_slot()?;
    let f = m.vendor.functions().C_OpenSession?;
    // What follows cannot panic: no indexing, no unwrapping (the guard's
    // `catch_unwind` is left out of the fast part, as for the other direct
    // calls; the cold failures log through `guard::failed`, which catches).
    let mut vendor: CK_SESSION_HANDLE = 0;
    // SAFETY: the member's own entry point, with its slot, the application's
    // flags, no callback and a writable handle.
    let rv = unsafe { f(vs, flags, std::ptr::null_mut(), None, &mut vendor) };
    if rv != CKR_OK {
        m.count_error();
        return Some(guard::failed("C_OpenSession", &Error::Vendor(rv)));
    }
    // SAFETY: checked non-NULL above, and valid for writing (the caller's
    // promise).
    let added = match unsafe { Out::new(out) } {
        Ok(out) => lib.add_session(m, Library::opened(s, m, si, 0, flags, vendor), out),
        Err(e) => Err(e),
    };
    Some(match added {
        Ok(()) => {
            tracing::trace!(function = "C_OpenSession", "CKR_OK");
            CKR_OK
        }
        Err(e) => guard::failed("C_OpenSession", &e),
    })
}

/// `C_CloseSession` on a direct session whose member is up: the member's
/// `C_CloseSession`, and the session taken out of the table.
#[inline(always)]
pub fn close_session(h: CK_SESSION_HANDLE) -> Option<CK_RV> {
    let d = direct(h)?;
    let m = d.lib.slots.get(d.sess.slot as usize)?.members.first()?;
    if !m.is_up() {
        return None;
    }
    let f = d.functions().C_CloseSession?;
    // As in `open_session`, nothing here can panic; the rest of closing a
    // slot's last session catches on its own.
    // SAFETY: the member's own entry point and its session handle.
    let rv = unsafe { f(d.vendor_session()) };
    d.lib.session_closed(h, d.sess, m);
    Some(if rv == CKR_OK || router::is_failover(rv, false) {
        tracing::trace!(function = "C_CloseSession", "CKR_OK");
        CKR_OK
    } else {
        guard::failed("C_CloseSession", &Error::Vendor(rv))
    })
}

#[cold]
fn panicked(function: &'static str) -> CK_RV {
    tracing::error!(
        function,
        "internal error: a panic was caught at the C boundary"
    );
    CKR_GENERAL_ERROR
}

/// A direct session, found for one call.
#[derive(Debug)]
pub struct Direct {
    lib: &'static Library,
    sess: SessionRef,
    fns: DirectFns,
}

/// The direct session behind `h`, if the call can take the direct path.
#[inline(always)]
pub fn direct(h: CK_SESSION_HANDLE) -> Option<Direct> {
    let lib = library::get()?;
    if !lib.lean || lib.fork_gen != FORK_GEN.load(Ordering::Relaxed) {
        return None;
    }
    let sess = lib.sessions.get(h)?;
    let fns = sess.direct?;
    Some(Direct { lib, sess, fns })
}

impl Direct {
    /// The member's function list.
    #[inline(always)]
    pub fn functions(&self) -> &CK_FUNCTION_LIST_3_0 {
        // SAFETY: see `DirectFns`: the list outlives the session, which the
        // application does not close during a call on it.
        unsafe { self.fns.0.as_ref() }
    }

    /// The vendor session serving this session now.
    #[inline(always)]
    pub fn vendor_session(&self) -> CK_SESSION_HANDLE {
        self.sess.vendor.load(Ordering::Acquire) as CK_SESSION_HANDLE
    }

    /// The member's handle of key `h`, when it is known already.
    #[inline(always)]
    pub fn object(&self, h: CK_OBJECT_HANDLE) -> Option<CK_OBJECT_HANDLE> {
        self.lib.objects.on_member(h, self.sess.slot, 0)
    }

    /// The end of a direct call: `Some` return code for the application,
    /// or `None` when the call is to be made again the full way (the
    /// session moved after a failure, and the call is no part of an
    /// operation that the move lost). `kind` is the operation the call
    /// continues (`None` for `*Init` and calls outside an operation), as
    /// for the full path.
    #[inline(always)]
    pub fn finish(&self, function: &'static str, kind: Option<OpKind>, rv: CK_RV) -> Option<CK_RV> {
        if rv == CKR_OK {
            tracing::trace!(function, "CKR_OK");
            return Some(CKR_OK);
        }
        self.failed(function, kind, rv)
    }

    #[cold]
    #[inline(never)]
    fn failed(&self, function: &'static str, kind: Option<OpKind>, rv: CK_RV) -> Option<CK_RV> {
        let r = catch_unwind(AssertUnwindSafe(|| {
            let slot = &self.lib.slots[self.sess.slot as usize];
            slot.members[0].count_error();
            let r = Err(Error::Vendor(rv));
            if !router::is_failover(rv, slot.logged_in()) {
                return Some(r);
            }
            let mut moves = 0;
            self.lib
                .after_failure(&self.sess, kind, slot, 0, r, &mut moves)
        }));
        match r {
            Ok(Some(Ok(()))) => Some(CKR_OK),
            Ok(Some(Err(e))) => Some(guard::failed(function, &e)),
            Ok(None) => None,
            Err(_) => Some(panicked(function)),
        }
    }
}
