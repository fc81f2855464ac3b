//! Slots, tokens, sessions and login (PKCS#11 sections 5.5 to 5.7).

use pkcs11_sys::*;

use super::{Library, SessionEntry};
use crate::abi::mem::{Bytes, Out, OutBytes, OutList, Pin, padded};
use crate::error::{Error, Result};

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
    let mut it = env!("CARGO_PKG_VERSION").split('.').map(|p| p.parse::<u8>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

impl Library {
    pub fn get_slot_list(&self, token_present: bool, mut out: OutList<'_, CK_SLOT_ID>) -> Result<()> {
        let ids: Vec<CK_SLOT_ID> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(i, _)| !token_present || self.serving_member(*i as u32).is_ok())
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
        if let Ok((_, m, vs)) = self.serving_member(i) {
            let mut mi = CK_SLOT_INFO::default();
            if m.vendor.get_slot_info(vs, &mut mi).is_ok() {
                info.hardwareVersion = mi.hardwareVersion;
                info.firmwareVersion = mi.firmwareVersion;
            }
            info.flags |= CKF_TOKEN_PRESENT;
        }
        out.write(info);
        Ok(())
    }

    pub fn get_token_info(&self, slot: CK_SLOT_ID, mut out: Out<'_, CK_TOKEN_INFO>) -> Result<()> {
        let i = self.slot_index(slot)?;
        let s = &self.slots[i as usize];
        let (_, m, vs) = self.serving_member(i)?;
        let mut info = CK_TOKEN_INFO::default();
        m.vendor.get_token_info(vs, &mut info)?;
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

    pub fn get_mechanism_list(&self, slot: CK_SLOT_ID, out: OutList<'_, CK_MECHANISM_TYPE>) -> Result<()> {
        let (_, m, vs) = self.serving_member(self.slot_index(slot)?)?;
        m.vendor.get_mechanism_list(vs, out)
    }

    pub fn get_mechanism_info(&self, slot: CK_SLOT_ID, ty: CK_MECHANISM_TYPE, out: Out<'_, CK_MECHANISM_INFO>) -> Result<()> {
        let (_, m, vs) = self.serving_member(self.slot_index(slot)?)?;
        m.vendor.get_mechanism_info(vs, ty, out)
    }

    pub fn init_token(&self, slot: CK_SLOT_ID, pin: Pin<'_>, label: *mut CK_UTF8CHAR) -> Result<()> {
        let (_, m, vs) = self.serving_member(self.slot_index(slot)?)?;
        m.vendor.init_token(vs, pin, label)
    }

    /// `C_WaitForSlotEvent`: only the non-blocking form can be served over
    /// several vendor libraries without a thread of our own.
    pub fn wait_for_slot_event(&self, flags: CK_FLAGS, mut out: Out<'_, CK_SLOT_ID>) -> Result<()> {
        if flags & CKF_DONT_BLOCK == 0 {
            return Err(Error::FunctionNotSupported);
        }
        let mut supported = false;
        for (i, s) in self.slots.iter().enumerate() {
            for m in &s.members {
                let mut vs: CK_SLOT_ID = 0;
                match m.vendor.wait_for_slot_event(CKF_DONT_BLOCK, &mut vs) {
                    Ok(()) if Some(vs) == m.vendor_slot => {
                        out.write(self.slots[i].cfg.id as CK_SLOT_ID);
                        return Ok(());
                    }
                    Ok(()) | Err(Error::Vendor(CKR_NO_EVENT)) => supported = true,
                    Err(_) => {}
                }
            }
        }
        if supported { Err(Error::NoEvent) } else { Err(Error::FunctionNotSupported) }
    }

    pub fn open_session(&self, slot: CK_SLOT_ID, flags: CK_FLAGS, mut out: Out<'_, CK_SESSION_HANDLE>) -> Result<()> {
        let slot = self.slot_index(slot)?;
        if flags & CKF_SERIAL_SESSION == 0 {
            return Err(Error::ParallelNotSupported);
        }
        let (member, m, vs) = self.serving_member(slot)?;
        let mut vendor: CK_SESSION_HANDLE = 0;
        m.vendor.open_session(vs, flags, &mut vendor)?;
        let h = self.sessions.insert(SessionEntry { slot, member, vendor });
        out.write(h);
        Ok(())
    }

    pub fn close_session(&self, h: CK_SESSION_HANDLE) -> Result<()> {
        let (s, v) = self.session(h)?;
        let rv = v.close_session(s.vendor);
        // The session is gone for the application whatever the vendor said
        // (it may have lost it already).
        if self.sessions.remove(h).is_some() {
            let last = self.sessions.count_slot(s.slot) == 0;
            self.objects.session_closed(s.slot, h, last);
        }
        rv
    }

    pub fn close_all_sessions(&self, slot: CK_SLOT_ID) -> Result<()> {
        let i = self.slot_index(slot)?;
        let mut result = Ok(());
        for m in &self.slots[i as usize].members {
            if let Some(vs) = m.vendor_slot {
                if let Err(e) = m.vendor.close_all_sessions(vs) {
                    result = Err(e);
                }
            }
        }
        for h in self.sessions.remove_slot(i) {
            self.objects.session_closed(i, h, true);
        }
        result
    }

    pub fn get_session_info(&self, h: CK_SESSION_HANDLE, mut out: Out<'_, CK_SESSION_INFO>) -> Result<()> {
        let (s, v) = self.session(h)?;
        let mut info = CK_SESSION_INFO::default();
        v.get_session_info(s.vendor, &mut info)?;
        info.slotID = self.slots[s.slot as usize].cfg.id as CK_SLOT_ID;
        out.write(info);
        Ok(())
    }

    /// `C_Login`: with a PIN source configured for the slot, the user PIN is
    /// read from it and whatever the application passed is ignored.
    pub fn login(&self, h: CK_SESSION_HANDLE, user: CK_USER_TYPE, pin: Pin<'_>) -> Result<()> {
        let (s, v) = self.session(h)?;
        let slot = &self.slots[s.slot as usize];
        match (&slot.cfg.pin, user) {
            (Some(src), CKU_USER | CKU_CONTEXT_SPECIFIC) => {
                let secret = src.read().map_err(|e| {
                    tracing::error!(slot = slot.cfg.id, source = %src, error = %e, "C_Login: PIN source unavailable");
                    Error::PinSource(e)
                })?;
                v.login(s.vendor, user, Bytes::from_slice(&secret))
            }
            _ => v.login(s.vendor, user, pin),
        }
    }

    pub fn login_user(&self, h: CK_SESSION_HANDLE, user: CK_USER_TYPE, pin: Pin<'_>, name: Bytes<'_>) -> Result<()> {
        let (s, v) = self.session(h)?;
        let slot = &self.slots[s.slot as usize];
        match (&slot.cfg.pin, user) {
            (Some(src), CKU_USER | CKU_CONTEXT_SPECIFIC) => {
                let secret = src.read().map_err(Error::PinSource)?;
                v.login_user(s.vendor, user, Bytes::from_slice(&secret), name)
            }
            _ => v.login_user(s.vendor, user, pin, name),
        }
    }

    pub fn logout(&self, h: CK_SESSION_HANDLE) -> Result<()> {
        let (s, v) = self.session(h)?;
        v.logout(s.vendor)
    }

    pub fn init_pin(&self, h: CK_SESSION_HANDLE, pin: Pin<'_>) -> Result<()> {
        let (s, v) = self.session(h)?;
        v.init_pin(s.vendor, pin)
    }

    pub fn set_pin(&self, h: CK_SESSION_HANDLE, old: Pin<'_>, new: Pin<'_>) -> Result<()> {
        let (s, v) = self.session(h)?;
        v.set_pin(s.vendor, old, new)
    }

    pub fn get_operation_state(&self, h: CK_SESSION_HANDLE, out: OutBytes<'_>) -> Result<()> {
        let (s, v) = self.session(h)?;
        v.get_operation_state(s.vendor, out)
    }

    pub fn set_operation_state(&self, h: CK_SESSION_HANDLE, state: Bytes<'_>, enc: CK_OBJECT_HANDLE, auth: CK_OBJECT_HANDLE) -> Result<()> {
        let (s, v) = self.session(h)?;
        let map = |k| if k == CK_INVALID_HANDLE { k } else { self.vendor_object(&s, k) };
        v.set_operation_state(s.vendor, state, map(enc), map(auth))
    }
}
