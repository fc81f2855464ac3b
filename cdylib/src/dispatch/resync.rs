//! What a member misses while it is down (token objects created, changed or
//! destroyed through the slot), given to it when it comes back, in order,
//! before it takes work again.

use std::sync::Arc;

use parking_lot::Mutex;
use pkcs11_sys::*;

use super::{Identity, Library, identity_template};
use crate::abi::mem::{SavedTemplate, Template};
use crate::error::Result;
use crate::router::Member;

/// A change to make on a member: given the library, the member, its index
/// and p11shim's session on it.
pub(super) type Change =
    Arc<dyn Fn(&Library, &Member, u32, CK_SESSION_HANDLE) -> Result<()> + Send + Sync>;

/// Makes an object again on a member, from data of its own; returns the
/// member's handle of it.
pub(super) type Remake = Arc<
    dyn Fn(&Library, &Member, u32, CK_SESSION_HANDLE) -> Result<CK_OBJECT_HANDLE> + Send + Sync,
>;

/// Changes kept per member at most; past it the member needs a manual
/// resynchronization (logged).
const LIMIT: usize = 10_000;

struct Missed {
    what: &'static str,
    change: Change,
}

/// The changes each member of a slot missed.
pub(super) struct Journal {
    lists: Vec<Mutex<Vec<Missed>>>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n: Vec<usize> = self.lists.iter().map(|l| l.lock().len()).collect();
        write!(f, "Journal({n:?})")
    }
}

impl Journal {
    pub fn new(members: usize) -> Journal {
        Journal {
            lists: (0..members).map(|_| Mutex::new(Vec::new())).collect(),
        }
    }

    /// Records a change member `m` missed.
    pub fn record(&self, m: u32, what: &'static str, change: Change) {
        let mut list = self.lists[m as usize].lock();
        if list.len() == LIMIT {
            tracing::error!(
                member = m,
                what,
                "too many changes missed: this member needs a manual resynchronization"
            );
            return;
        }
        list.push(Missed { what, change });
    }

    /// Number of changes waiting for member `m`.
    pub fn pending(&self, m: u32) -> usize {
        self.lists[m as usize].lock().len()
    }
}

/// Finds an object with this identity on a member (the first, should
/// earlier failures have left copies).
pub(super) fn find_identity(
    m: &Member,
    cs: CK_SESSION_HANDLE,
    id: &Identity,
) -> Result<Option<CK_OBJECT_HANDLE>> {
    let t = SavedTemplate::from_values(identity_template(id));
    let mut raw = t.to_raw();
    m.vendor
        .find_objects_init(cs, Template::from_slice(&mut raw))?;
    let mut found = [CK_INVALID_HANDLE; 2];
    let mut n: CK_ULONG = 0;
    let r = m.vendor.find_objects(cs, &mut found, &mut n);
    let _ = m.vendor.find_objects_final(cs);
    r?;
    Ok((n >= 1).then_some(found[0]))
}

impl Library {
    /// Gives a member that came back what it missed, in order. A change
    /// that fails leaves it and the rest for the next probe.
    pub(super) fn resync(&self, si: u32, mi: u32, cs: CK_SESSION_HANDLE) -> Result<()> {
        let slot = &self.slots[si as usize];
        let member = &slot.members[mi as usize];
        let list = std::mem::take(&mut *slot.journal.lists[mi as usize].lock());
        let total = list.len();
        let mut iter = list.into_iter();
        while let Some(missed) = iter.next() {
            if let Err(e) = (missed.change)(self, member, mi, cs) {
                tracing::warn!(slot = slot.cfg.id, member = %member.name, what = missed.what, error = %e, "resynchronization failed; retried at the next probe");
                let mut rest: Vec<Missed> = std::iter::once(missed).chain(iter).collect();
                let mut list = slot.journal.lists[mi as usize].lock();
                rest.append(&mut list);
                *list = rest;
                return Err(e);
            }
        }
        if total > 0 {
            tracing::info!(slot = slot.cfg.id, member = %member.name, changes = total, "member resynchronized");
        }
        Ok(())
    }
}
