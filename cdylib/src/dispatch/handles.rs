//! p11shim's own object handles.
//!
//! Object handles are 64-bit, never 0 and never reused: they come from one
//! counter, which starts far above the small numbers vendors use, so a
//! vendor handle that leaked would not resolve, and stays far below the
//! session handles (`sessions`), so neither kind is valid as the other. No
//! vendor handle ever reaches the application; that is what lets a session
//! move to another member.
//!
//! An object is known by its identity on the token and by its handle on
//! each member where it was found. The object table's lock comes last in
//! the lock order and is never held across a vendor call.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLock;
use pkcs11_sys::{CK_INVALID_HANDLE, CK_OBJECT_HANDLE, CK_SESSION_HANDLE, CK_ULONG};
use rustc_hash::FxHashMap;

use crate::config::MAX_MEMBERS;
use crate::policy::{Attrs, Grant};

/// First handle issued.
const FIRST_HANDLE: u64 = 0x0001_0000;
static NEXT_HANDLE: AtomicU64 = AtomicU64::new(FIRST_HANDLE);

/// A fresh object handle, never issued before in this process.
pub fn next_handle() -> CK_ULONG {
    NEXT_HANDLE.fetch_add(1, Ordering::Relaxed) as CK_ULONG
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

/// What identifies an object on every member: its class, `CKA_ID`,
/// `CKA_LABEL` and key type, as read from the member where it was first
/// seen. Members holding the same key material hold objects with the same
/// identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub class: Option<CK_ULONG>,
    pub id: Option<Vec<u8>>,
    pub label: Option<Vec<u8>>,
    pub key_type: Option<CK_ULONG>,
}

/// What the ACL and the audit log know of an object: its selector
/// attributes, read once when its handle is issued, and its fingerprint.
#[derive(Debug, Clone)]
pub struct ObjectInfo {
    pub attrs: Attrs,
    /// SHA-256 over the key's public material where the token shows it
    /// (RSA modulus, EC point), else over its identity attributes and
    /// check value: the same for a key on every member, and for the two
    /// halves of an RSA or EC key pair.
    pub fingerprint: [u8; 32],
    /// The object as audit records name it.
    pub key_ref: Arc<p11shim_audit::KeyRef>,
}

impl ObjectInfo {
    pub fn new(
        attrs: Attrs,
        modulus: Option<&[u8]>,
        ec_point: Option<&[u8]>,
        check_value: Option<&[u8]>,
    ) -> ObjectInfo {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        let mut part = |tag: &[u8], v: &[u8]| {
            h.update(tag);
            h.update((v.len() as u32).to_be_bytes());
            h.update(v);
        };
        match (
            modulus.filter(|m| !m.is_empty()),
            ec_point.filter(|p| !p.is_empty()),
        ) {
            (Some(m), _) => part(b"rsa-modulus", m),
            (None, Some(p)) => part(b"ec-point", p),
            (None, None) => {
                let ulong = |v: Option<u64>| v.unwrap_or(u64::MAX).to_be_bytes();
                part(b"class", &ulong(attrs.class));
                part(b"key-type", &ulong(attrs.key_type));
                part(b"id", attrs.id.as_deref().unwrap_or_default());
                part(b"label", attrs.label.as_deref().unwrap_or_default());
                part(b"check-value", check_value.unwrap_or_default());
            }
        }
        let fingerprint: [u8; 32] = h.finalize().into();
        let key_ref = Arc::new(p11shim_audit::KeyRef {
            label: attrs
                .label
                .as_deref()
                .map(|l| String::from_utf8_lossy(l).into_owned()),
            id: attrs.id.clone(),
            fingerprint: Some(fingerprint),
            class: attrs.class,
            key_type: attrs.key_type,
        });
        ObjectInfo {
            attrs,
            fingerprint,
            key_ref,
        }
    }
}

/// An object the application has seen.
#[derive(Debug, Clone)]
pub struct ObjectEntry {
    pub slot: u32,
    pub owner: Owner,
    pub identity: Option<Arc<Identity>>,
    pub info: Option<Arc<ObjectInfo>>,
    /// The role's grant, and the policy epoch it was computed under.
    grant: Option<(u64, Arc<Grant>)>,
    /// The object's handle on each member, `CK_INVALID_HANDLE` where not
    /// (yet) known.
    pub handles: [CK_OBJECT_HANDLE; MAX_MEMBERS],
}

#[derive(Debug, Default)]
struct ObjectMaps {
    by_handle: FxHashMap<CK_OBJECT_HANDLE, ObjectEntry>,
    by_vendor: FxHashMap<(u32, u32, CK_OBJECT_HANDLE), CK_OBJECT_HANDLE>,
    by_identity: FxHashMap<(u32, Arc<Identity>), CK_OBJECT_HANDLE>,
    /// Identities shared by several objects of one member.
    ambiguous: rustc_hash::FxHashSet<(u32, Arc<Identity>)>,
    /// Session objects found by search, per slot.
    found_session: FxHashMap<u32, Vec<CK_OBJECT_HANDLE>>,
}

/// The objects the application has seen.
#[derive(Debug, Default)]
pub struct Objects {
    maps: RwLock<ObjectMaps>,
}

impl Objects {
    /// The object's handle on a member, when known.
    #[inline]
    pub fn on_member(
        &self,
        h: CK_OBJECT_HANDLE,
        slot: u32,
        member: u32,
    ) -> Option<CK_OBJECT_HANDLE> {
        let maps = self.maps.read();
        let e = maps.by_handle.get(&h)?;
        if e.slot != slot {
            return None;
        }
        Some(e.handles[member as usize]).filter(|v| *v != CK_INVALID_HANDLE)
    }

    pub fn get(&self, h: CK_OBJECT_HANDLE) -> Option<ObjectEntry> {
        self.maps.read().by_handle.get(&h).cloned()
    }

    /// The handle already issued for a vendor object, if any.
    #[inline]
    pub fn lookup_vendor(
        &self,
        slot: u32,
        member: u32,
        vendor: CK_OBJECT_HANDLE,
    ) -> Option<CK_OBJECT_HANDLE> {
        self.maps
            .read()
            .by_vendor
            .get(&(slot, member, vendor))
            .copied()
    }

    /// Records the object's handle on another member.
    pub fn set_on_member(&self, h: CK_OBJECT_HANDLE, member: u32, vendor: CK_OBJECT_HANDLE) {
        let mut maps = self.maps.write();
        let Some(e) = maps.by_handle.get_mut(&h) else {
            return;
        };
        let slot = e.slot;
        let old = std::mem::replace(&mut e.handles[member as usize], vendor);
        if old != CK_INVALID_HANDLE {
            maps.by_vendor.remove(&(slot, member, old));
        }
        maps.by_vendor.insert((slot, member, vendor), h);
    }

    /// Issues a handle for a vendor object, or returns the one it already
    /// has (found on this member before, or on another member under the
    /// same identity).
    pub fn insert(
        &self,
        slot: u32,
        member: u32,
        vendor: CK_OBJECT_HANDLE,
        owner: Owner,
        identity: Option<Identity>,
        info: Option<ObjectInfo>,
    ) -> CK_OBJECT_HANDLE {
        let mut maps = self.maps.write();
        if let Some(h) = maps.by_vendor.get(&(slot, member, vendor)) {
            return *h;
        }
        let identity = identity.map(Arc::new);
        let mut identity_free = true;
        if owner == Owner::Token {
            if let Some(id) = &identity {
                if let Some(h) = maps.by_identity.get(&(slot, id.clone())).copied() {
                    match maps.by_handle.get_mut(&h) {
                        // The same object, first seen on another member.
                        Some(e) if e.handles[member as usize] == CK_INVALID_HANDLE => {
                            e.handles[member as usize] = vendor;
                            maps.by_vendor.insert((slot, member, vendor), h);
                            return h;
                        }
                        // Two objects on one member share the identity: it
                        // singles out neither, so neither is matched by it.
                        _ => {
                            maps.by_identity.remove(&(slot, id.clone()));
                            maps.ambiguous.insert((slot, id.clone()));
                            identity_free = false;
                        }
                    }
                } else if maps.ambiguous.contains(&(slot, id.clone())) {
                    identity_free = false;
                }
            }
        }
        let h = next_handle();
        let mut handles = [CK_INVALID_HANDLE; MAX_MEMBERS];
        handles[member as usize] = vendor;
        if let (Owner::Token, Some(id), true) = (owner, &identity, identity_free) {
            maps.by_identity.insert((slot, id.clone()), h);
        }
        maps.by_handle.insert(
            h,
            ObjectEntry {
                slot,
                owner,
                identity,
                info: info.map(Arc::new),
                grant: None,
                handles,
            },
        );
        maps.by_vendor.insert((slot, member, vendor), h);
        if owner == Owner::SlotSessions {
            maps.found_session.entry(slot).or_default().push(h);
        }
        h
    }

    /// Replaces an object's identity (its `CKA_LABEL` or `CKA_ID` changed).
    pub fn set_identity(
        &self,
        h: CK_OBJECT_HANDLE,
        identity: Option<Identity>,
        info: Option<ObjectInfo>,
    ) {
        let mut maps = self.maps.write();
        let Some(e) = maps.by_handle.get_mut(&h) else {
            return;
        };
        e.info = info.map(Arc::new);
        e.grant = None;
        let (slot, owner) = (e.slot, e.owner);
        let old = std::mem::replace(&mut e.identity, identity.map(Arc::new));
        let new = e.identity.clone();
        if let Some(id) = old {
            if maps.by_identity.get(&(slot, id.clone())) == Some(&h) {
                maps.by_identity.remove(&(slot, id));
            }
        }
        if let (Owner::Token, Some(id)) = (owner, new) {
            if !maps.ambiguous.contains(&(slot, id.clone())) {
                maps.by_identity.entry((slot, id)).or_insert(h);
            }
        }
    }

    /// The role's grant on an object, computed from its attributes on
    /// first use under a policy `epoch` and cached with the handle; `None`
    /// for an unknown handle.
    #[inline]
    pub fn grant(
        &self,
        h: CK_OBJECT_HANDLE,
        epoch: u64,
        compute: impl FnOnce(&Attrs) -> Grant,
    ) -> Option<(Arc<Grant>, Option<Arc<ObjectInfo>>)> {
        {
            let maps = self.maps.read();
            let e = maps.by_handle.get(&h)?;
            if let Some((at, g)) = &e.grant {
                if *at == epoch {
                    return Some((g.clone(), e.info.clone()));
                }
            }
        }
        let mut maps = self.maps.write();
        let e = maps.by_handle.get_mut(&h)?;
        let g = Arc::new(match &e.info {
            Some(i) => compute(&i.attrs),
            None => compute(&Attrs::default()),
        });
        e.grant = Some((epoch, g.clone()));
        Some((g, e.info.clone()))
    }

    /// What is known of an object, for its audit record.
    #[inline]
    pub fn info(&self, h: CK_OBJECT_HANDLE) -> Option<Arc<ObjectInfo>> {
        self.maps.read().by_handle.get(&h)?.info.clone()
    }

    pub fn remove(&self, h: CK_OBJECT_HANDLE) {
        let mut maps = self.maps.write();
        if let Some(e) = maps.by_handle.remove(&h) {
            Self::unlink(&mut maps, h, &e);
        }
    }

    fn unlink(maps: &mut ObjectMaps, h: CK_OBJECT_HANDLE, e: &ObjectEntry) {
        for (m, v) in e.handles.iter().enumerate() {
            if *v != CK_INVALID_HANDLE {
                maps.by_vendor.remove(&(e.slot, m as u32, *v));
            }
        }
        if let Some(id) = &e.identity {
            if maps.by_identity.get(&(e.slot, id.clone())) == Some(&h) {
                maps.by_identity.remove(&(e.slot, id.clone()));
            }
        }
    }

    /// Forgets objects that no longer exist (a session's own objects when
    /// it closes).
    pub fn forget(&self, handles: &[CK_OBJECT_HANDLE]) {
        if handles.is_empty() {
            return;
        }
        let mut maps = self.maps.write();
        for h in handles {
            if let Some(e) = maps.by_handle.remove(h) {
                Self::unlink(&mut maps, *h, &e);
            }
        }
    }

    /// Forgets the session objects found by search on a slot (its last
    /// session closed, so they are gone).
    pub fn forget_found_session_objects(&self, slot: u32) {
        let gone = self
            .maps
            .write()
            .found_session
            .remove(&slot)
            .unwrap_or_default();
        self.forget(&gone);
    }

    /// Forgets every member handle of a member (it restarted or came back:
    /// its handles may have changed).
    pub fn forget_member(&self, slot: u32, member: u32) {
        let mut maps = self.maps.write();
        let ObjectMaps {
            by_handle,
            by_vendor,
            ..
        } = &mut *maps;
        for e in by_handle.values_mut().filter(|e| e.slot == slot) {
            let v = std::mem::replace(&mut e.handles[member as usize], CK_INVALID_HANDLE);
            if v != CK_INVALID_HANDLE {
                by_vendor.remove(&(slot, member, v));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(label: &str) -> Option<Identity> {
        Some(Identity {
            class: Some(3),
            id: Some(vec![1]),
            label: Some(label.as_bytes().to_vec()),
            key_type: Some(0),
        })
    }

    #[test]
    fn handles_are_never_zero_nor_reused() {
        let a = next_handle();
        let b = next_handle();
        assert!(a >= FIRST_HANDLE as CK_ULONG && b > a);
    }

    #[test]
    fn the_same_object_keeps_its_handle_across_members() {
        let o = Objects::default();
        let h = o.insert(0, 0, 7, Owner::Token, id("k"), None);
        assert_eq!(o.insert(0, 0, 7, Owner::Token, id("k"), None), h);
        // Found on member 1 under the same identity: the same handle.
        assert_eq!(o.insert(0, 1, 9, Owner::Token, id("k"), None), h);
        assert_eq!(o.on_member(h, 0, 0), Some(7));
        assert_eq!(o.on_member(h, 0, 1), Some(9));
        assert_eq!(o.on_member(h, 0, 2), None);
        assert_eq!(o.on_member(h, 1, 0), None, "another slot's handle");
        // Another identity: another handle.
        assert_ne!(o.insert(0, 1, 10, Owner::Token, id("other"), None), h);
        // A second object with the same identity on one member: its own
        // handle, and the identity no longer matches across members.
        let twin = o.insert(0, 0, 8, Owner::Token, id("k"), None);
        assert_ne!(twin, h);
        assert_ne!(o.insert(0, 2, 12, Owner::Token, id("k"), None), h);
        o.forget_member(0, 1);
        assert_eq!(o.on_member(h, 0, 1), None);
        o.set_on_member(h, 1, 11);
        assert_eq!(o.lookup_vendor(0, 1, 11), Some(h));
        o.remove(h);
        assert!(o.get(h).is_none());
        assert_ne!(o.insert(0, 0, 7, Owner::Token, id("k"), None), h);
    }

    #[test]
    fn session_objects_go_with_their_session() {
        let o = Objects::default();
        let tok = o.insert(0, 0, 1, Owner::Token, None, None);
        let mine = o.insert(0, 0, 2, Owner::Session(10), None, None);
        let found = o.insert(0, 0, 4, Owner::SlotSessions, None, None);
        let elsewhere = o.insert(1, 0, 4, Owner::SlotSessions, None, None);
        o.forget(&[mine]);
        assert!(o.get(mine).is_none() && o.lookup_vendor(0, 0, 2).is_none());
        assert!(o.get(found).is_some());
        o.forget_found_session_objects(0);
        assert!(o.get(found).is_none());
        assert!(o.get(tok).is_some() && o.get(elsewhere).is_some());
    }
}
