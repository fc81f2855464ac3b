//! p11shim's own session and object handles, mapped to (member, vendor
//! handle).
//!
//! Handles are 64-bit, never 0 and never reused: one counter serves sessions
//! and objects alike, so a session handle is never a valid object handle and
//! the reverse, and it starts far above the small numbers vendors use, so a
//! vendor handle that leaked would not resolve. No vendor handle ever reaches
//! the application; that is what lets a session move to another member.
//!
//! Lock order: `Sessions` before `Objects`; neither is held across a vendor
//! call.

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLock;
use pkcs11_sys::{CK_OBJECT_HANDLE, CK_SESSION_HANDLE, CK_ULONG};
use rustc_hash::FxHashMap;

/// First handle issued.
const FIRST_HANDLE: u64 = 0x0001_0000;
static NEXT_HANDLE: AtomicU64 = AtomicU64::new(FIRST_HANDLE);

/// A fresh handle, never issued before in this process.
pub fn next_handle() -> CK_ULONG {
    NEXT_HANDLE.fetch_add(1, Ordering::Relaxed) as CK_ULONG
}

/// Where a virtual session lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionEntry {
    /// Index of the virtual slot in the library's slot list.
    pub slot: u32,
    /// Index of the member within the slot.
    pub member: u32,
    /// The vendor's session handle on that member.
    pub vendor: CK_SESSION_HANDLE,
}

/// The open sessions.
#[derive(Debug, Default)]
pub struct Sessions {
    map: RwLock<FxHashMap<CK_SESSION_HANDLE, SessionEntry>>,
}

impl Sessions {
    #[inline]
    pub fn get(&self, h: CK_SESSION_HANDLE) -> Option<SessionEntry> {
        self.map.read().get(&h).copied()
    }

    pub fn insert(&self, entry: SessionEntry) -> CK_SESSION_HANDLE {
        let h = next_handle();
        self.map.write().insert(h, entry);
        h
    }

    pub fn remove(&self, h: CK_SESSION_HANDLE) -> Option<SessionEntry> {
        self.map.write().remove(&h)
    }

    /// Removes every session of a slot and returns their handles.
    pub fn remove_slot(&self, slot: u32) -> Vec<CK_SESSION_HANDLE> {
        let mut map = self.map.write();
        let gone: Vec<_> = map.iter().filter(|(_, e)| e.slot == slot).map(|(h, _)| *h).collect();
        for h in &gone {
            map.remove(h);
        }
        gone
    }

    /// Number of open sessions of a slot.
    pub fn count_slot(&self, slot: u32) -> usize {
        self.map.read().values().filter(|e| e.slot == slot).count()
    }
}

/// Who an object's lifetime depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// A token object: lives until destroyed.
    Token,
    /// A session object created through this session.
    Session(CK_SESSION_HANDLE),
    /// A session object found by search: it goes when the slot's last
    /// session closes.
    SlotSessions,
}

/// Where a virtual object lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectEntry {
    pub slot: u32,
    pub member: u32,
    pub vendor: CK_OBJECT_HANDLE,
    pub owner: Owner,
}

#[derive(Debug, Default)]
struct ObjectMaps {
    by_handle: FxHashMap<CK_OBJECT_HANDLE, ObjectEntry>,
    by_vendor: FxHashMap<(u32, u32, CK_OBJECT_HANDLE), CK_OBJECT_HANDLE>,
}

/// The objects the application has seen.
#[derive(Debug, Default)]
pub struct Objects {
    maps: RwLock<ObjectMaps>,
}

impl Objects {
    #[inline]
    pub fn get(&self, h: CK_OBJECT_HANDLE) -> Option<ObjectEntry> {
        self.maps.read().by_handle.get(&h).copied()
    }

    /// The handle already issued for a vendor object, if any.
    #[inline]
    pub fn lookup_vendor(&self, slot: u32, member: u32, vendor: CK_OBJECT_HANDLE) -> Option<CK_OBJECT_HANDLE> {
        self.maps.read().by_vendor.get(&(slot, member, vendor)).copied()
    }

    /// Issues a handle for a vendor object, or returns the one it already has.
    pub fn insert(&self, entry: ObjectEntry) -> CK_OBJECT_HANDLE {
        let mut maps = self.maps.write();
        let key = (entry.slot, entry.member, entry.vendor);
        if let Some(h) = maps.by_vendor.get(&key) {
            return *h;
        }
        let h = next_handle();
        maps.by_handle.insert(h, entry);
        maps.by_vendor.insert(key, h);
        h
    }

    pub fn remove(&self, h: CK_OBJECT_HANDLE) {
        let mut maps = self.maps.write();
        if let Some(e) = maps.by_handle.remove(&h) {
            maps.by_vendor.remove(&(e.slot, e.member, e.vendor));
        }
    }

    /// Forgets the session objects that died with a session; when it was the
    /// slot's last session, also the session objects found by search.
    pub fn session_closed(&self, slot: u32, session: CK_SESSION_HANDLE, last_of_slot: bool) {
        let mut maps = self.maps.write();
        let ObjectMaps { by_handle, by_vendor } = &mut *maps;
        by_handle.retain(|_, e| {
            let dead = e.slot == slot
                && (e.owner == Owner::Session(session)
                    || (last_of_slot && matches!(e.owner, Owner::Session(_) | Owner::SlotSessions)));
            if dead {
                by_vendor.remove(&(e.slot, e.member, e.vendor));
            }
            !dead
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_are_never_zero_nor_reused() {
        let s = Sessions::default();
        let e = SessionEntry { slot: 0, member: 0, vendor: 1 };
        let a = s.insert(e);
        s.remove(a);
        let b = s.insert(e);
        assert!(a >= FIRST_HANDLE as CK_ULONG && b > a);
    }

    #[test]
    fn the_same_vendor_object_keeps_its_handle() {
        let o = Objects::default();
        let e = ObjectEntry { slot: 0, member: 0, vendor: 7, owner: Owner::Token };
        let h = o.insert(e);
        assert_eq!(o.insert(e), h);
        assert_eq!(o.lookup_vendor(0, 0, 7), Some(h));
        assert_eq!(o.lookup_vendor(0, 1, 7), None);
        o.remove(h);
        assert_eq!(o.get(h), None);
        assert_ne!(o.insert(e), h);
    }

    #[test]
    fn session_objects_go_with_their_session() {
        let o = Objects::default();
        let tok = o.insert(ObjectEntry { slot: 0, member: 0, vendor: 1, owner: Owner::Token });
        let mine = o.insert(ObjectEntry { slot: 0, member: 0, vendor: 2, owner: Owner::Session(10) });
        let other = o.insert(ObjectEntry { slot: 0, member: 0, vendor: 3, owner: Owner::Session(11) });
        let found = o.insert(ObjectEntry { slot: 0, member: 0, vendor: 4, owner: Owner::SlotSessions });
        o.session_closed(0, 10, false);
        assert!(o.get(mine).is_none());
        assert!(o.get(other).is_some() && o.get(found).is_some());
        o.session_closed(0, 11, true);
        assert!(o.get(other).is_none() && o.get(found).is_none());
        assert!(o.get(tok).is_some());
    }
}
