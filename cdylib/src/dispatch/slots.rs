//! Slots, tokens, sessions and login (PKCS#11 sections 5.5 to 5.7).

use p11shim_audit::Kind;
use pkcs11_sys::*;
use zeroize::Zeroizing;

use super::sessions::{Closed, Held, Opened, SessionRef};
use super::{Library, Slot};
use crate::abi::mem::{Bytes, Label, Out, OutBytes, OutList, Pin, padded};
use crate::error::{Error, Result};
use crate::router::{self, Member, bounded};

/// What `C_GetInfo` says of p11shim.
pub fn info(version: CK_VERSION) -> CK_INFO {
    let (major, minor) = crate_version();
    CK_INFO {
        cryptokiVersion: version,
        manufacturerID: padded("p11shim"),
        flags: 0,
        libraryDescription: padded("p11shim HA PKCS#11 module"),
        libraryVersion: CK_VERSION { major, minor },
    }
}

fn crate_version() -> (u8, u8) {
    let mut it = env!("CARGO_PKG_VERSION")
        .split('.')
        .map(|p| p.parse::<u8>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

impl Library {
    pub fn get_slot_list(
        &self,
        token_present: bool,
        mut out: OutList<'_, CK_SLOT_ID>,
    ) -> Result<()> {
        let ids: Vec<CK_SLOT_ID> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(i, _)| !token_present || self.token_present(*i as u32))
            .map(|(_, s)| s.cfg.id as CK_SLOT_ID)
            .collect();
        out.write(&ids)
    }

    pub fn get_slot_info(&self, slot: CK_SLOT_ID, mut out: Out<'_, CK_SLOT_INFO>) -> Result<()> {
        let i = self.slot_index(slot)?;
        let s = &self.slots[i as usize];
        let mut info = CK_SLOT_INFO {
            slotDescription: padded(&format!("p11shim virtual slot {}", s.cfg.label)),
            manufacturerID: padded("p11shim"),
            flags: CKF_HW_SLOT,
            ..Default::default()
        };
        let mut mi = CK_SLOT_INFO::default();
        match self.on_slot(i, |m, vs| m.vendor.get_slot_info(vs, &mut mi)) {
            Ok(()) => {
                info.hardwareVersion = mi.hardwareVersion;
                info.firmwareVersion = mi.firmwareVersion;
                info.flags |= CKF_TOKEN_PRESENT;
            }
            Err(Error::TokenNotPresent) => {}
            Err(_) => info.flags |= CKF_TOKEN_PRESENT,
        }
        out.write(info);
        Ok(())
    }

    pub fn get_token_info(&self, slot: CK_SLOT_ID, mut out: Out<'_, CK_TOKEN_INFO>) -> Result<()> {
        let i = self.slot_index(slot)?;
        let s = &self.slots[i as usize];
        let mut info = CK_TOKEN_INFO::default();
        self.on_slot(i, |m, vs| m.vendor.get_token_info(vs, &mut info))?;
        info.label = padded(&s.cfg.label);
        info.serialNumber = padded(&s.cfg.serial);
        if s.cfg.pin.is_some() {
            // The PIN comes from outside the application: it logs in with an
            // empty PIN, as on a reader with a PIN pad.
            info.flags |= CKF_PROTECTED_AUTHENTICATION_PATH;
        }
        out.write(info);
        Ok(())
    }

    /// `C_GetMechanismList`: on a multi-member slot, the mechanisms every
    /// member that is up offers (a session may move to any of them).
    pub fn get_mechanism_list(
        &self,
        slot: CK_SLOT_ID,
        mut out: OutList<'_, CK_MECHANISM_TYPE>,
    ) -> Result<()> {
        let si = self.slot_index(slot)?;
        let s = &self.slots[si as usize];
        if s.members.len() == 1 {
            return self.on_slot(si, |m, vs| m.vendor.get_mechanism_list(vs, out.reborrow()));
        }
        let list_of = |m: &Member, vs: CK_SLOT_ID| -> Result<Vec<CK_MECHANISM_TYPE>> {
            let mut n: CK_ULONG = 0;
            m.vendor
                .get_mechanism_list(vs, OutList::from_local(None, &mut n))?;
            let mut list = vec![0; n as usize];
            m.vendor
                .get_mechanism_list(vs, OutList::from_local(Some(&mut list), &mut n))?;
            list.truncate(n as usize);
            Ok(list)
        };
        let mut common = self.on_slot(si, list_of)?;
        for m in s.members.iter().filter(|m| m.is_up()) {
            if let (Some(vs), true) = (m.vendor_slot(), m.is_up()) {
                if let Ok(theirs) = m.track(false, || list_of(m, vs)) {
                    common.retain(|t| theirs.contains(t));
                }
            }
        }
        out.write(&common)
    }

    /// `C_GetMechanismInfo`: on a multi-member slot, what every member that
    /// is up can do: the narrowest key sizes and the flags they share.
    pub fn get_mechanism_info(
        &self,
        slot: CK_SLOT_ID,
        ty: CK_MECHANISM_TYPE,
        mut out: Out<'_, CK_MECHANISM_INFO>,
    ) -> Result<()> {
        let si = self.slot_index(slot)?;
        let s = &self.slots[si as usize];
        if s.members.len() == 1 {
            return self.on_slot(si, |m, vs| {
                m.vendor.get_mechanism_info(vs, ty, out.reborrow())
            });
        }
        let mut info = CK_MECHANISM_INFO::default();
        self.on_slot(si, |m, vs| {
            m.vendor
                .get_mechanism_info(vs, ty, Out::from_local(&mut info))
        })?;
        for m in s.members.iter().filter(|m| m.is_up()) {
            let Some(vs) = m.vendor_slot() else { continue };
            let mut theirs = CK_MECHANISM_INFO::default();
            match m.track(false, || {
                m.vendor
                    .get_mechanism_info(vs, ty, Out::from_local(&mut theirs))
            }) {
                Ok(()) => {
                    info.ulMinKeySize = info.ulMinKeySize.max(theirs.ulMinKeySize);
                    info.ulMaxKeySize = info.ulMaxKeySize.min(theirs.ulMaxKeySize);
                    info.flags &= theirs.flags;
                }
                Err(Error::Vendor(CKR_MECHANISM_INVALID)) => {
                    return Err(Error::Vendor(CKR_MECHANISM_INVALID));
                }
                Err(_) => {}
            }
        }
        out.write(info);
        Ok(())
    }

    pub fn init_token(&self, slot: CK_SLOT_ID, pin: Pin<'_>, label: Label<'_>) -> Result<()> {
        let i = self.slot_index(slot)?;
        if self.slots[i as usize].members.len() > 1 {
            // Re-initializing one member would make it differ from the
            // others; members are initialized one by one with their own tools.
            return Err(Error::FunctionNotSupported);
        }
        self.on_slot(i, |m, vs| m.vendor.init_token(vs, pin, label))
    }

    /// `C_WaitForSlotEvent`: only the non-blocking form can be served over
    /// several vendor libraries without a thread of our own.
    pub fn wait_for_slot_event(&self, flags: CK_FLAGS, mut out: Out<'_, CK_SLOT_ID>) -> Result<()> {
        if flags & CKF_DONT_BLOCK == 0 {
            return Err(Error::FunctionNotSupported);
        }
        let mut supported = false;
        for s in &self.slots {
            for m in &s.members {
                let mut vs: CK_SLOT_ID = 0;
                match m.vendor.wait_for_slot_event(CKF_DONT_BLOCK, &mut vs) {
                    Ok(()) if Some(vs) == m.vendor_slot() => {
                        out.write(s.cfg.id as CK_SLOT_ID);
                        return Ok(());
                    }
                    Ok(()) | Err(Error::Vendor(CKR_NO_EVENT)) => supported = true,
                    Err(_) => {}
                }
            }
        }
        if supported {
            Err(Error::NoEvent)
        } else {
            Err(Error::FunctionNotSupported)
        }
    }

    /// `C_OpenSession`: the new session goes to the member with the least
    /// outstanding work; a member that fails to open it is marked down and
    /// the next one tried.
    pub fn open_session(
        &self,
        slot: CK_SLOT_ID,
        flags: CK_FLAGS,
        out: Out<'_, CK_SESSION_HANDLE>,
    ) -> Result<()> {
        let si = self.slot_index(slot)?;
        if flags & CKF_SERIAL_SESSION == 0 {
            return Err(Error::ParallelNotSupported);
        }
        let s = &self.slots[si as usize];
        match &s.members[..] {
            // One member and nothing to probe inline: it opens the session
            // or the call fails.
            [m] if m.deadline.is_none() && !self.no_threads => {
                let vs = m.vendor_slot().filter(|_| m.is_up());
                let vs = vs.ok_or(Error::TokenNotPresent)?;
                let mut vendor: CK_SESSION_HANDLE = 0;
                m.track(false, || m.vendor.open_session(vs, flags, &mut vendor))?;
                self.add_session(m, Self::opened(s, m, si, 0, flags, vendor), out)
            }
            _ => self.open_session_routed(s, si, flags, out),
        }
    }

    #[inline(never)]
    fn open_session_routed(
        &self,
        s: &Slot,
        si: u32,
        flags: CK_FLAGS,
        out: Out<'_, CK_SESSION_HANDLE>,
    ) -> Result<()> {
        self.probe_inline();
        let single = s.members.len() == 1;
        let mut excluded = 0u32;
        loop {
            let mi = router::pick(&s.members, excluded).ok_or(Error::TokenNotPresent)?;
            let m = &s.members[mi as usize];
            let vs = m.vendor_slot().ok_or(Error::TokenNotPresent)?;
            // Counted at once, so that sessions opened at the same time
            // spread over the members.
            if !single {
                m.session_opened();
            }
            let opened = m.track(false, || match m.deadline {
                Some(t) => {
                    let v = m.vendor.clone();
                    m.bounded(t, move || {
                        let mut vh: CK_SESSION_HANDLE = 0;
                        v.open_session(vs, flags, &mut vh).map(|_| vh)
                    })?
                }
                None => {
                    let mut vh: CK_SESSION_HANDLE = 0;
                    m.vendor.open_session(vs, flags, &mut vh).map(|_| vh)
                }
            });
            let vendor = match opened {
                Ok(vh) => vh,
                Err(e) => {
                    if !single {
                        m.session_closed();
                    }
                    let (failover, rv) = match &e {
                        Error::Vendor(rv) => (router::is_failover(*rv, false), Some(*rv)),
                        Error::TimedOut => (true, None),
                        _ => (false, None),
                    };
                    if failover && router::pick(&s.members, excluded | 1 << mi).is_some() {
                        self.member_down(s, mi, rv);
                        excluded |= 1 << mi;
                        continue;
                    }
                    return Err(e);
                }
            };
            if !single {
                if let Err(e) = self.ensure_login(s, m, vendor) {
                    let _ = m.vendor.close_session(vendor);
                    m.session_closed();
                    return Err(e);
                }
            }
            return self.add_session(m, Self::opened(s, m, si, mi, flags, vendor), out);
        }
    }

    /// What a session the member `mi` opened starts with.
    #[inline(always)]
    pub(super) fn opened(
        s: &Slot,
        m: &Member,
        si: u32,
        mi: u32,
        flags: CK_FLAGS,
        vendor: CK_SESSION_HANDLE,
    ) -> Opened {
        let single = s.members.len() == 1;
        Opened {
            slot: si,
            flags,
            replay: !single && s.cfg.replay_limit > 0,
            single,
            member: mi,
            vendor,
            direct: (single && m.deadline.is_none())
                .then(|| super::direct::DirectFns::new(m.vendor.functions())),
        }
    }

    /// Enters a session its member opened (and counted, on a slot of
    /// several members) in the table.
    #[inline(always)]
    pub(super) fn add_session(
        &self,
        m: &Member,
        session: Opened,
        mut out: Out<'_, CK_SESSION_HANDLE>,
    ) -> Result<()> {
        match self.sessions.insert(session) {
            Ok(h) => {
                out.write(h);
                Ok(())
            }
            Err(e) => {
                let _ = m.vendor.close_session(session.vendor);
                if !session.single {
                    m.session_closed();
                }
                Err(e)
            }
        }
    }

    pub fn close_session(&self, h: CK_SESSION_HANDLE) -> Result<()> {
        let sess = self.session(h)?;
        let (m, vh) = sess.binding();
        let sess_slot = sess.slot;
        let member = &self.slots[sess_slot as usize].members[m as usize];
        let rv = if member.is_up() {
            member.vendor.close_session(vh)
        } else {
            Ok(())
        };
        self.session_closed(h, sess, member);
        match rv {
            Err(Error::Vendor(rv)) if router::is_failover(rv, false) => Ok(()),
            other => other,
        }
    }

    /// Takes a session the application closed out of the table, whatever
    /// the vendor said (a member that failed may have lost it already).
    #[inline(always)]
    pub(super) fn session_closed(&self, h: CK_SESSION_HANDLE, sess: SessionRef, member: &Member) {
        let si = sess.slot;
        if let Some(Closed {
            single, last, held, ..
        }) = self.sessions.remove_found(h, sess)
        {
            if !single {
                member.session_closed();
            }
            if held.is_some() || last {
                self.closed_with_more(si, held, last);
            }
        }
    }

    /// The rest of closing a session that held objects or operations, or
    /// was the slot's last.
    #[cold]
    #[inline(never)]
    fn closed_with_more(&self, si: u32, held: Option<Box<Held>>, last: bool) {
        // Off the direct path's fast part: a panic stops here.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if let Some(held) = &held {
                self.objects.forget(&held.owned);
            }
            if last {
                self.objects.forget_found_session_objects(si);
                self.slot_sessions_gone(&self.slots[si as usize]);
            }
        }));
        if r.is_err() {
            tracing::error!("internal error: a panic was caught closing a session");
        }
    }

    /// The application has no session left on a slot: as on a token, it is
    /// logged out, and p11shim closes its own sessions on the members.
    fn slot_sessions_gone(&self, slot: &Slot) {
        if slot.members.len() > 1 {
            for m in &slot.members {
                m.close_control();
                m.set_logged_in(false);
            }
        }
        *slot.login.lock() = Default::default();
    }

    pub fn close_all_sessions(&self, slot: CK_SLOT_ID) -> Result<()> {
        let i = self.slot_index(slot)?;
        let s = &self.slots[i as usize];
        // Every member up closes its sessions; a member that fails is marked
        // down (its sessions die with it), and only a failure that is not a
        // member's loss reaches the application.
        let mut result = Ok(());
        for (mi, m) in s.members.iter().enumerate() {
            if let (Some(vs), true) = (m.vendor_slot(), m.is_up()) {
                m.drop_control();
                match m.vendor.close_all_sessions(vs) {
                    Ok(()) => {}
                    Err(Error::Vendor(rv)) if router::is_failover(rv, false) => {
                        self.member_down(s, mi as u32, Some(rv))
                    }
                    Err(e) => result = Err(e),
                }
            }
        }
        for closed in self.sessions.remove_slot(i) {
            if !closed.single {
                s.members[closed.member as usize].session_closed();
            }
            if let Some(held) = &closed.held {
                self.objects.forget(&held.owned);
            }
        }
        self.objects.forget_found_session_objects(i);
        self.slot_sessions_gone(s);
        result
    }

    pub fn get_session_info(
        &self,
        h: CK_SESSION_HANDLE,
        mut out: Out<'_, CK_SESSION_INFO>,
    ) -> Result<()> {
        let sess = self.session(h)?;
        let mut info = CK_SESSION_INFO::default();
        self.on_session(&sess, None, |m, _, vh| {
            m.vendor.get_session_info(vh, &mut info)
        })?;
        info.slotID = self.slots[sess.slot as usize].cfg.id as CK_SLOT_ID;
        out.write(info);
        Ok(())
    }

    /// `C_Login`: with a PIN source configured for the slot, the user PIN is
    /// read from it and whatever the application passed is ignored. On a
    /// multi-member slot every member up is logged in, and the credential
    /// is kept (wiped on logout) to log in members that come back.
    pub fn login(&self, h: CK_SESSION_HANDLE, user: CK_USER_TYPE, pin: Pin<'_>) -> Result<()> {
        self.audited_login(h, "C_Login", Kind::Login, user, || {
            self.as_op(h, crate::metrics::Op::Login, false, || {
                self.login_as(h, user, pin)
            })
        })
    }

    /// Runs a login-related call and records it: the user type and where
    /// the PIN came from, never the PIN.
    fn audited_login(
        &self,
        h: CK_SESSION_HANDLE,
        function: &'static str,
        kind: Kind,
        user: CK_USER_TYPE,
        call: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        let slot = self.session(h)?.slot;
        self.audit_admit(function)?;
        let started = self.started();
        let r = call();
        if self.audit.is_some() {
            let source = match &self.slots[slot as usize].cfg.pin {
                _ if kind == Kind::Logout => "",
                Some(crate::config::PinSource::Broker) => " pin_source=broker",
                Some(crate::config::PinSource::File(_)) => " pin_source=file",
                Some(crate::config::PinSource::Env(_)) => " pin_source=env",
                None => " pin_source=application",
            };
            let user = match user {
                CKU_SO => "so",
                CKU_USER => "user",
                CKU_CONTEXT_SPECIFIC => "context-specific",
                _ => "other",
            };
            let detail = format!("user={user}{source}");
            self.audit_call_detail(kind, function, slot, started, &r, detail);
        }
        r
    }

    fn login_as(&self, h: CK_SESSION_HANDLE, user: CK_USER_TYPE, pin: Pin<'_>) -> Result<()> {
        let sess = self.session(h)?;
        let slot = &self.slots[sess.slot as usize];
        let mut source = match (&slot.cfg.pin, user) {
            (Some(_), CKU_USER | CKU_CONTEXT_SPECIFIC) => Some(slot.read_pin()?),
            _ => None,
        };
        let mut r = self.on_session(&sess, None, |m, _, vh| {
            let secret = source.as_ref().map(|s| Bytes::from_slice(s)).unwrap_or(pin);
            bounded::in_only_with(m, vh, secret, move |v, s, pin| v.login(s, user, pin))
        });
        if source.is_some()
            && matches!(r, Err(Error::Vendor(CKR_PIN_INCORRECT | CKR_PIN_EXPIRED)))
            && slot.pin_refused()
        {
            source = Some(slot.read_pin()?);
            r = self.on_session(&sess, None, |m, _, vh| {
                let secret = source.as_ref().map(|s| Bytes::from_slice(s)).unwrap_or(pin);
                bounded::in_only_with(m, vh, secret, move |v, s, pin| v.login(s, user, pin))
            });
        }
        r?;
        let secret = source.as_ref().map(|s| Bytes::from_slice(s)).unwrap_or(pin);
        if user == CKU_CONTEXT_SPECIFIC {
            return Ok(());
        }
        {
            let mut login = slot.login.lock();
            login.user = Some(user);
            login.pin = if source.is_none() {
                Some(Zeroizing::new(secret.as_slice().to_vec()))
            } else {
                None
            };
        }
        let (serving, _) = sess.binding();
        slot.members[serving as usize].set_logged_in(true);
        if slot.members.len() > 1 {
            for (i, m) in slot.members.iter().enumerate() {
                if i as u32 == serving || !m.is_up() {
                    continue;
                }
                if let Err(e) = m.with_control(|cs| self.ensure_login(slot, m, cs)) {
                    tracing::warn!(slot = slot.cfg.id, member = %m.name, error = %e, "login on member failed");
                    self.member_down(slot, i as u32, None);
                }
            }
        }
        Ok(())
    }

    pub fn login_user(
        &self,
        h: CK_SESSION_HANDLE,
        user: CK_USER_TYPE,
        pin: Pin<'_>,
        name: Bytes<'_>,
    ) -> Result<()> {
        self.audited_login(h, "C_LoginUser", Kind::Login, user, || {
            self.as_op(h, crate::metrics::Op::Login, false, || {
                self.login_user_as(h, user, pin, name)
            })
        })
    }

    fn login_user_as(
        &self,
        h: CK_SESSION_HANDLE,
        user: CK_USER_TYPE,
        pin: Pin<'_>,
        name: Bytes<'_>,
    ) -> Result<()> {
        let sess = self.session(h)?;
        let slot = &self.slots[sess.slot as usize];
        let source = match (&slot.cfg.pin, user) {
            (Some(_), CKU_USER | CKU_CONTEXT_SPECIFIC) => Some(slot.read_pin()?),
            _ => None,
        };
        let secret = match &source {
            Some(s) => Bytes::from_slice(s),
            None => pin,
        };
        self.on_session(&sess, None, |m, _, vh| {
            m.vendor.login_user(vh, user, secret, name)
        })
    }

    pub fn logout(&self, h: CK_SESSION_HANDLE) -> Result<()> {
        let user = self.session(h)?.slot;
        let user = self.slots[user as usize]
            .login
            .lock()
            .user
            .unwrap_or(CKU_USER);
        self.audited_login(h, "C_Logout", Kind::Logout, user, || self.logout_all(h))
    }

    fn logout_all(&self, h: CK_SESSION_HANDLE) -> Result<()> {
        let sess = self.session(h)?;
        let slot = &self.slots[sess.slot as usize];
        let r = self.on_session(&sess, None, |m, _, vh| m.vendor.logout(vh));
        let (serving, _) = sess.binding();
        for (i, m) in slot.members.iter().enumerate() {
            if i as u32 != serving && m.is_logged_in() {
                let _ = m.with_control(|cs| m.vendor.logout(cs));
            }
            m.set_logged_in(false);
        }
        *slot.login.lock() = Default::default();
        r
    }

    pub fn init_pin(&self, h: CK_SESSION_HANDLE, pin: Pin<'_>) -> Result<()> {
        self.audited_login(h, "C_InitPIN", Kind::Login, CKU_SO, || {
            self.on_session(&*self.session(h)?, None, |m, _, vh| {
                m.vendor.init_pin(vh, pin)
            })
        })
    }

    pub fn set_pin(&self, h: CK_SESSION_HANDLE, old: Pin<'_>, new: Pin<'_>) -> Result<()> {
        let user = self.session(h)?.slot;
        let user = self.slots[user as usize]
            .login
            .lock()
            .user
            .unwrap_or(CKU_USER);
        self.audited_login(h, "C_SetPIN", Kind::Login, user, || {
            self.on_session(&*self.session(h)?, None, |m, _, vh| {
                m.vendor.set_pin(vh, old, new)
            })
        })
    }

    pub fn get_operation_state(&self, h: CK_SESSION_HANDLE, mut out: OutBytes<'_>) -> Result<()> {
        self.on_session(&*self.session(h)?, None, |m, _, vh| {
            m.vendor.get_operation_state(vh, out.reborrow())
        })
    }

    pub fn set_operation_state(
        &self,
        h: CK_SESSION_HANDLE,
        state: Bytes<'_>,
        enc: CK_OBJECT_HANDLE,
        auth: CK_OBJECT_HANDLE,
    ) -> Result<()> {
        let sess = self.session(h)?;
        let slot = sess.slot;
        self.on_session(&sess, None, |m: &Member, mi, vh| {
            let map = |k| {
                if k == CK_INVALID_HANDLE {
                    Ok(k)
                } else {
                    self.object_on(slot, mi, k)
                }
            };
            m.vendor
                .set_operation_state(vh, state, map(enc)?, map(auth)?)
        })
    }
}
