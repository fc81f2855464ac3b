//! Object management (PKCS#11 section 5.8): every object handle the
//! application sees is p11shim's own. On a multi-member slot, token
//! objects created, copied, changed or destroyed through the virtual slot
//! are created, copied, changed or destroyed on every member that is up.

use pkcs11_sys::*;

use super::acl::HandleKind;
use super::{Library, Session};
use crate::abi::mem::{Out, OutHandles, Template};
use crate::error::{Error, Result};
use crate::policy::Op;
use p11shim_audit::Kind;
use std::sync::Arc;

use super::resync::{Change, Remake, find_identity};
use crate::router::Member;
use crate::router::replay::FindRecord;

thread_local! {
    /// Members marked down by calls of this thread since the last
    /// replication: (slot id, member).
    static FAILED: std::cell::RefCell<Vec<(u64, u32)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Notes that a call of this thread marked member `m` of slot `slot` down.
pub(super) fn failed_on_this_thread(slot: u64, m: u32) {
    let _ = FAILED.try_with(|f| {
        let mut f = f.borrow_mut();
        if !f.contains(&(slot, m)) && f.len() < 64 {
            f.push((slot, m));
        }
    });
}

impl Library {
    /// Repeats on every other member that is up what made a token object on
    /// member `made_on`, recording the object's handle on each; a member
    /// that fails is marked down.
    ///
    /// `later` makes the object again from data of its own; a member that is
    /// down or fails gets it when it comes back (without it, it misses the
    /// object, and a warning says so).
    pub(super) fn replicate(
        &self,
        sess: &Session,
        made_on: u32,
        h: CK_OBJECT_HANDLE,
        what: &'static str,
        mut make: impl FnMut(&Member, u32, CK_SESSION_HANDLE) -> Result<CK_OBJECT_HANDLE>,
        later: Option<Remake>,
    ) {
        let slot = &self.slots[sess.slot as usize];
        let failed_here = FAILED
            .try_with(|f| std::mem::take(&mut *f.borrow_mut()))
            .unwrap_or_default();
        let missed = |i: u32, m: &Member| match &later {
            Some(remake) => {
                let remake = remake.clone();
                let change: Change = Arc::new(move |lib, m, mi, cs| {
                    // The member may have made the object before it failed
                    // (the call that failed there was then retried
                    // elsewhere): looked up first, made only when missing.
                    let identity = lib.objects.get(h).and_then(|e| e.identity);
                    let existing = match &identity {
                        Some(id) => find_identity(m, cs, id)?,
                        None => None,
                    };
                    let v = match existing {
                        Some(v) => v,
                        None => remake(lib, m, mi, cs)?,
                    };
                    lib.objects.set_on_member(h, mi, v);
                    Ok(())
                });
                slot.journal.record(i, what, change);
            }
            None => tracing::warn!(slot = slot.cfg.id, member = %m.name, what,
                "a member that is down misses a token object it cannot be given later"),
        };
        for (i, m) in slot.members.iter().enumerate() {
            let i = i as u32;
            if i == made_on {
                continue;
            }
            if !m.is_up() {
                missed(i, m);
                continue;
            }
            // A member that failed a call of this same operation (a create
            // that failed late) and came back at once may hold the object
            // already: looked up first there, and only there (elsewhere an
            // object of the same identity is the application's own).
            let identity = later
                .as_ref()
                .filter(|_| failed_here.contains(&(slot.cfg.id, i)))
                .and_then(|_| self.objects.get(h).and_then(|e| e.identity));
            let made = m.with_control(|cs| {
                m.track(false, || match &identity {
                    Some(id) => match find_identity(m, cs, id)? {
                        Some(v) => Ok(v),
                        None => make(m, i, cs),
                    },
                    None => make(m, i, cs),
                })
            });
            match made {
                Ok(v) => self.objects.set_on_member(h, i, v),
                Err(e) => {
                    tracing::warn!(slot = slot.cfg.id, member = %m.name, what, error = %e, "replication to member failed");
                    self.member_down(slot, i, None);
                    missed(i, m);
                }
            }
        }
    }

    /// Applies a change of a token object on every other member that is up;
    /// a member that is down or fails gets `later` when it comes back.
    fn on_other_members(
        &self,
        sess: &Session,
        done_on: u32,
        h: CK_OBJECT_HANDLE,
        what: &'static str,
        mut f: impl FnMut(&Member, CK_SESSION_HANDLE, CK_OBJECT_HANDLE) -> Result<()>,
        later: Change,
    ) {
        let slot = &self.slots[sess.slot as usize];
        if slot.members.len() < 2
            || self
                .objects
                .get(h)
                .is_none_or(|e| e.owner != super::Owner::Token)
        {
            return;
        }
        for (i, m) in slot.members.iter().enumerate() {
            let i = i as u32;
            if i == done_on {
                continue;
            }
            if !m.is_up() {
                slot.journal.record(i, what, later.clone());
                continue;
            }
            let r = m.with_control(|cs| match self.object_on_in(sess.slot, i, h, cs)? {
                CK_INVALID_HANDLE => Ok(()),
                v => m.track(false, || f(m, cs, v)),
            });
            if let Err(e) = r {
                tracing::warn!(slot = slot.cfg.id, member = %m.name, what, error = %e, "change on member failed");
                self.member_down(slot, i, None);
                slot.journal.record(i, what, later.clone());
            }
        }
    }

    fn multi(&self, sess: &Session) -> bool {
        self.slots[sess.slot as usize].members.len() > 1
    }

    pub fn create_object(
        &self,
        h: CK_SESSION_HANDLE,
        t: Template<'_>,
        mut out: Out<'_, CK_OBJECT_HANDLE>,
    ) -> Result<()> {
        let sess = self.session(h)?;
        let f = "C_CreateObject";
        let started = self.started();
        self.authorize_new(f, Op::Create, &t, None, None)?;
        let r = self.on_session(&sess, None, |m, mi, vh| {
            let mut o = CK_INVALID_HANDLE;
            m.vendor.create_object(vh, t, &mut o)?;
            Ok((
                self.app_object(sess.slot, mi, &m.vendor, vh, Some(h), o),
                mi,
            ))
        });
        let made = r.as_ref().ok().and_then(|(o, _)| self.key_ref(*o));
        self.audit_call((Kind::KeyManagement, f), sess.slot, None, made, started, &r);
        let (o, m) = r?;
        if sess.replay && t.bool_attr(CKA_TOKEN) != Some(true) {
            // A session object follows its session to another member.
            if let Some(saved) = t.save() {
                sess.state.lock().recreate.push((o, saved));
            }
        }
        if self.multi(&sess) && t.bool_attr(CKA_TOKEN) == Some(true) {
            let later = t.save().map(|saved| -> Remake {
                Arc::new(move |_, mem, _, cs| {
                    let mut raw = saved.to_raw();
                    let mut v = CK_INVALID_HANDLE;
                    mem.vendor
                        .create_object(cs, Template::from_slice(&mut raw), &mut v)
                        .map(|_| v)
                })
            });
            self.replicate(
                &sess,
                m,
                o,
                "C_CreateObject",
                |mem, _, cs| {
                    let mut v = CK_INVALID_HANDLE;
                    mem.vendor.create_object(cs, t, &mut v).map(|_| v)
                },
                later,
            );
        }
        out.write(o);
        Ok(())
    }

    pub fn copy_object(
        &self,
        h: CK_SESSION_HANDLE,
        src: CK_OBJECT_HANDLE,
        t: Template<'_>,
        mut out: Out<'_, CK_OBJECT_HANDLE>,
    ) -> Result<()> {
        let sess = self.session(h)?;
        let slot = sess.slot;
        let f = "C_CopyObject";
        let started = self.started();
        self.authorize_change(f, Op::Copy, src, &t)?;
        let r = self.on_session(&sess, None, |m, mi, vh| {
            let mut o = CK_INVALID_HANDLE;
            m.vendor
                .copy_object(vh, self.object_on(slot, mi, src)?, t, &mut o)?;
            Ok((self.app_object(slot, mi, &m.vendor, vh, Some(h), o), mi))
        });
        let made = r.as_ref().ok().and_then(|(o, _)| self.key_ref(*o));
        self.audit_call((Kind::KeyManagement, f), slot, None, made, started, &r);
        let (o, m) = r?;
        if self.multi(&sess)
            && self
                .objects
                .get(o)
                .is_some_and(|e| e.owner == super::Owner::Token)
        {
            let later = t.save().map(|saved| -> Remake {
                Arc::new(move |lib, mem, mi, cs| {
                    let mut raw = saved.to_raw();
                    let mut v = CK_INVALID_HANDLE;
                    let from = lib.object_on_in(slot, mi, src, cs)?;
                    mem.vendor
                        .copy_object(cs, from, Template::from_slice(&mut raw), &mut v)
                        .map(|_| v)
                })
            });
            self.replicate(
                &sess,
                m,
                o,
                "C_CopyObject",
                |mem, mi, cs| {
                    let mut v = CK_INVALID_HANDLE;
                    mem.vendor
                        .copy_object(cs, self.object_on_in(slot, mi, src, cs)?, t, &mut v)
                        .map(|_| v)
                },
                later,
            );
        }
        out.write(o);
        Ok(())
    }

    pub fn destroy_object(&self, h: CK_SESSION_HANDLE, o: CK_OBJECT_HANDLE) -> Result<()> {
        let sess = self.session(h)?;
        let slot = sess.slot;
        let f = "C_DestroyObject";
        let started = self.started();
        let info = self.authorize(f, o, HandleKind::Object, Some(Op::Destroy), None)?;
        self.quorum_call(f, info.as_ref(), Op::Destroy, None, None)?;
        let r = self.on_session(&sess, None, |m, mi, vh| {
            m.vendor
                .destroy_object(vh, self.object_on(slot, mi, o)?)
                .map(|_| mi)
        });
        let key = info.map(|i| i.key_ref.clone());
        self.audit_call((Kind::KeyManagement, f), slot, None, key, started, &r);
        let done_on = r?;
        let identity = self.objects.get(o).and_then(|e| e.identity);
        let later: Change = Arc::new(move |_, m, _, cs| match &identity {
            Some(id) => match find_identity(m, cs, id)? {
                Some(v) => m.vendor.destroy_object(cs, v),
                None => Ok(()),
            },
            None => Ok(()),
        });
        self.on_other_members(
            &sess,
            done_on,
            o,
            "C_DestroyObject",
            |m, cs, v| m.vendor.destroy_object(cs, v),
            later,
        );
        self.objects.remove(o);
        if sess.replay {
            sess.state.lock().recreate.retain(|(h, _)| *h != o);
        }
        Ok(())
    }

    pub fn get_object_size(
        &self,
        h: CK_SESSION_HANDLE,
        o: CK_OBJECT_HANDLE,
        mut out: Out<'_, CK_ULONG>,
    ) -> Result<()> {
        let sess = self.session(h)?;
        self.authorize("C_GetObjectSize", o, HandleKind::Object, None, None)?;
        self.on_session(&sess, None, |m, mi, vh| {
            m.vendor
                .get_object_size(vh, self.object_on(sess.slot, mi, o)?, out.reborrow())
        })
    }

    pub fn get_attribute_value(
        &self,
        h: CK_SESSION_HANDLE,
        o: CK_OBJECT_HANDLE,
        t: Template<'_>,
    ) -> Result<()> {
        let sess = self.session(h)?;
        self.authorize("C_GetAttributeValue", o, HandleKind::Object, None, None)?;
        self.on_session(&sess, None, |m, mi, vh| {
            m.vendor
                .get_attribute_value(vh, self.object_on(sess.slot, mi, o)?, t)
        })
    }

    pub fn set_attribute_value(
        &self,
        h: CK_SESSION_HANDLE,
        o: CK_OBJECT_HANDLE,
        t: Template<'_>,
    ) -> Result<()> {
        let sess = self.session(h)?;
        let slot = sess.slot;
        let f = "C_SetAttributeValue";
        let started = self.started();
        self.authorize_change(f, Op::SetAttributes, o, &t)?;
        let changes_identity = t
            .attrs()
            .iter()
            .any(|a| a.type_ == CKA_LABEL || a.type_ == CKA_ID);
        // The object is found on the other members under its identity from
        // before the change.
        let before = self.objects.get(o).and_then(|e| e.identity);
        if self.multi(&sess) && changes_identity {
            for (i, m) in self.slots[slot as usize].members.iter().enumerate() {
                if m.is_up() {
                    let _ = self.object_on(slot, i as u32, o);
                }
            }
        }
        let key = self.key_ref(o);
        let r = self.on_session(&sess, None, |m, mi, vh| {
            let v = self.object_on(slot, mi, o)?;
            m.vendor.set_attribute_value(vh, v, t)?;
            if changes_identity {
                let (_, identity, info) = super::read_object(&m.vendor, vh, v);
                self.objects.set_identity(o, identity, info);
            }
            Ok(mi)
        });
        self.audit_call((Kind::KeyManagement, f), slot, None, key, started, &r);
        let done_on = r?;
        let saved = t.save();
        let later: Change = Arc::new(move |_, m, _, cs| match (&before, &saved) {
            (Some(id), Some(saved)) => match find_identity(m, cs, id)? {
                Some(v) => {
                    let mut raw = saved.to_raw();
                    m.vendor
                        .set_attribute_value(cs, v, Template::from_slice(&mut raw))
                }
                None => Ok(()),
            },
            _ => Ok(()),
        });
        self.on_other_members(
            &sess,
            done_on,
            o,
            "C_SetAttributeValue",
            |m, cs, v| m.vendor.set_attribute_value(cs, v, t),
            later,
        );
        Ok(())
    }

    /// `C_FindObjectsInit` is counted as the `find` operation: the search
    /// itself happens there in most tokens.
    pub fn find_objects_init(&self, h: CK_SESSION_HANDLE, t: Template<'_>) -> Result<()> {
        self.as_op(h, crate::metrics::Op::Find, false, || {
            self.find_objects_init_op(h, t)
        })
    }

    fn find_objects_init_op(&self, h: CK_SESSION_HANDLE, t: Template<'_>) -> Result<()> {
        let sess = self.session(h)?;
        self.on_session(&sess, None, |m, _, vh| m.vendor.find_objects_init(vh, t))?;
        if sess.replay {
            sess.state.lock().ops.find = Some(Box::new(FindRecord {
                template: t.save(),
                returned: Vec::new(),
                restarted: false,
            }));
        }
        Ok(())
    }

    /// The vendor fills the application's array with its handles, which are
    /// then replaced in place by p11shim's: no allocation on this path.
    /// After a move to another member, the search runs again there and
    /// skips what was already returned.
    pub fn find_objects(&self, h: CK_SESSION_HANDLE, mut out: OutHandles<'_>) -> Result<()> {
        let sess = self.session(h)?;
        let slot = sess.slot;
        loop {
            let n = self.on_session(&sess, None, |m, mi, vh| {
                let found = out.as_mut_slice();
                let mut n: CK_ULONG = 0;
                m.vendor.find_objects(vh, found, &mut n)?;
                let n = (n as usize).min(found.len());
                for slot_h in &mut found[..n] {
                    *slot_h = self.app_object(slot, mi, &m.vendor, vh, None, *slot_h);
                }
                Ok(n)
            })?;
            // Objects the role may not see do not exist for it; when a whole
            // batch was hidden, the search goes on.
            let (n, hidden) = self.hide_invisible(&mut out.as_mut_slice()[..n]);
            if n == 0 && hidden {
                continue;
            }
            if !sess.replay {
                out.set_count(n as CK_ULONG);
                return Ok(());
            }
            let mut st = sess.state.lock();
            let Some(rec) = st.ops.find.as_mut() else {
                drop(st);
                out.set_count(n as CK_ULONG);
                return Ok(());
            };
            let found = &mut out.as_mut_slice()[..n];
            let mut kept = n;
            if rec.restarted {
                kept = 0;
                for i in 0..n {
                    if !rec.returned.contains(&found[i]) {
                        found[kept] = found[i];
                        kept += 1;
                    }
                }
            }
            rec.returned.extend_from_slice(&found[..kept]);
            drop(st);
            if kept > 0 || n == 0 {
                out.set_count(kept as CK_ULONG);
                return Ok(());
            }
        }
    }

    /// Moves the visible handles to the front; returns how many there are
    /// and whether any was hidden.
    fn hide_invisible(&self, found: &mut [CK_OBJECT_HANDLE]) -> (usize, bool) {
        let mut kept = 0;
        for i in 0..found.len() {
            if self.visible(found[i]) {
                found[kept] = found[i];
                kept += 1;
            }
        }
        (kept, kept < found.len())
    }

    pub fn find_objects_final(&self, h: CK_SESSION_HANDLE) -> Result<()> {
        let sess = self.session(h)?;
        let r = self.on_session(&sess, None, |m, _, vh| m.vendor.find_objects_final(vh));
        if sess.replay {
            sess.state.lock().ops.find = None;
        }
        match r {
            Err(Error::Vendor(CKR_OPERATION_NOT_INITIALIZED)) | Ok(()) => r,
            other => other,
        }
    }
}
