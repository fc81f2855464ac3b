//! The initialized library as every call reaches it: one pointer, read
//! with a single atomic load.
//!
//! The library is owned here from `C_Initialize` to `C_Finalize`. A call
//! borrows it without counting references: the spec makes `C_Finalize`
//! undefined while other threads are making Cryptoki calls (PKCS#11 2.40,
//! 5.4), so no call that loaded the pointer can outlive the library.
//! Threads of p11shim's own (recovery) hold a weak reference instead and
//! are stopped before the library is dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicPtr, Ordering};

use parking_lot::Mutex;

use crate::dispatch::Library;

static CURRENT: AtomicPtr<Library> = AtomicPtr::new(std::ptr::null_mut());
static OWNER: Mutex<Option<Arc<Library>>> = Mutex::new(None);

/// Makes `lib` the library of every call.
pub fn install(lib: Arc<Library>) {
    let mut owner = OWNER.lock();
    CURRENT.store(Arc::as_ptr(&lib).cast_mut(), Ordering::Release);
    *owner = Some(lib);
}

/// Takes the library away from new calls and returns it.
pub fn take() -> Option<Arc<Library>> {
    let mut owner = OWNER.lock();
    CURRENT.store(std::ptr::null_mut(), Ordering::Release);
    owner.take()
}

/// The library, if installed.
pub fn installed() -> Option<Arc<Library>> {
    OWNER.lock().clone()
}

/// The library for the duration of one call.
#[inline]
pub fn get() -> Option<&'static Library> {
    let p = CURRENT.load(Ordering::Acquire);
    // SAFETY: a non-NULL pointer points into the Arc held by OWNER, which is
    // released only by `take` in C_Finalize (or C_Initialize in a forked
    // child); the spec forbids C_Finalize while other calls run, so the
    // library outlives the call that loaded the pointer.
    unsafe { p.as_ref() }
}
