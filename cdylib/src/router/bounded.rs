//! Calls with a deadline, for members that may hang (network HSMs).
//!
//! On a slot with `call_timeout_ms`, the calls of the data path (sign,
//! verify, encrypt, decrypt, digest, their `*Init`, `*Update` and `*Final`,
//! random, opening a session, login) run on a thread of their own, with
//! copies of the application's buffers. A call that does not return in time
//! is abandoned with its copies (so a late answer writes nowhere the
//! application can see) and reported as `Error::TimedOut`, which moves the
//! session to another member like a device error. Without a deadline,
//! calls run inline and nothing is copied.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use pkcs11_sys::*;
use zeroize::Zeroizing;

use super::Member;
use crate::abi::mem::{Bytes, BytesMut, Mechanism, OutBytes, RawMechanism};
use crate::backend::Vendor;
use crate::error::{Error, Result};

type Sh = CK_SESSION_HANDLE;
type Oh = CK_OBJECT_HANDLE;

/// Abandoned calls a member may hold before new calls are refused at once.
const MAX_ABANDONED: u32 = 64;

/// Calls abandoned on a member and still running.
#[derive(Debug, Default)]
pub struct Abandoned(Arc<AtomicU32>);

impl Abandoned {
    pub fn count(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Member {
    /// Runs `job` on a thread of its own, waiting at most `deadline`.
    pub fn bounded<T: Send + 'static>(
        &self,
        deadline: Duration,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T> {
        if self.abandoned.count() >= MAX_ABANDONED {
            return Err(Error::TimedOut);
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let abandoned = self.abandoned.0.clone();
        std::thread::Builder::new()
            .name("p11shim-call".into())
            .spawn(move || {
                let r = job();
                if tx.send(r).is_err() {
                    // Nobody waits any more: this call had been abandoned.
                    abandoned.fetch_sub(1, Ordering::Relaxed);
                }
            })
            .map_err(|_| Error::HostMemory)?;
        match rx.recv_timeout(deadline) {
            Ok(r) => Ok(r),
            Err(_) => {
                self.abandoned.0.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(member = %self.name, deadline_ms = deadline.as_millis() as u64, "call abandoned after its deadline");
                Err(Error::TimedOut)
            }
        }
    }
}

/// A call with input and output buffers (`C_Sign`, `C_Encrypt`,
/// `C_EncryptUpdate`...).
pub type InOut = for<'a, 'b> fn(&Vendor, Sh, Bytes<'a>, OutBytes<'b>) -> Result<()>;
/// A call with an input buffer (`C_SignUpdate`, `C_VerifyFinal`...).
pub type In = for<'a> fn(&Vendor, Sh, Bytes<'a>) -> Result<()>;
/// A call with an output buffer (`C_SignFinal`, `C_EncryptFinal`...).
pub type Out = for<'b> fn(&Vendor, Sh, OutBytes<'b>) -> Result<()>;
/// A call with two input buffers (`C_Verify`).
pub type InIn = for<'a, 'b> fn(&Vendor, Sh, Bytes<'a>, Bytes<'b>) -> Result<()>;
/// A keyed `*Init`.
pub type Init = for<'a> fn(&Vendor, Sh, Mechanism<'a>, Oh) -> Result<()>;

/// Runs an output call on owned buffers and copies the result back.
fn with_output(
    m: &Member,
    deadline: Duration,
    out: &mut OutBytes<'_>,
    call: impl FnOnce(&Vendor, OutBytes<'_>) -> Result<()> + Send + 'static,
) -> Result<()> {
    let query = out.is_size_query();
    let capacity = out.capacity();
    let v = m.vendor.clone();
    let (r, len, buf) = m.bounded(deadline, move || {
        let mut buf = Zeroizing::new(vec![0u8; if query { 0 } else { capacity }]);
        let mut len = capacity as CK_ULONG;
        let o = if query {
            OutBytes::new_len(&mut len)
        } else {
            OutBytes::from_local(&mut buf, &mut len)
        };
        let r = call(&v, o);
        (r, len, buf)
    })?;
    out.set_len(len);
    if r.is_ok() && !query {
        out.fill(&buf[..(len as usize).min(buf.len())]);
    }
    r
}

#[inline(always)]
pub fn in_out(m: &Member, s: Sh, d: Bytes<'_>, out: &mut OutBytes<'_>, f: InOut) -> Result<()> {
    if m.deadline.is_none() {
        return f(&m.vendor, s, d, out.reborrow());
    }
    in_out_bounded(m, s, d, out, f)
}

#[cold]
#[inline(never)]
fn in_out_bounded(m: &Member, s: Sh, d: Bytes<'_>, out: &mut OutBytes<'_>, f: InOut) -> Result<()> {
    let Some(t) = m.deadline else {
        return f(&m.vendor, s, d, out.reborrow());
    };
    let input = Zeroizing::new(d.as_slice().to_vec());
    with_output(m, t, out, move |v, o| f(v, s, Bytes::from_slice(&input), o))
}

#[inline(always)]
pub fn out_only(m: &Member, s: Sh, out: &mut OutBytes<'_>, f: Out) -> Result<()> {
    if m.deadline.is_none() {
        return f(&m.vendor, s, out.reborrow());
    }
    out_only_bounded(m, s, out, f)
}

#[cold]
#[inline(never)]
fn out_only_bounded(m: &Member, s: Sh, out: &mut OutBytes<'_>, f: Out) -> Result<()> {
    let Some(t) = m.deadline else {
        return f(&m.vendor, s, out.reborrow());
    };
    with_output(m, t, out, move |v, o| f(v, s, o))
}

#[inline(always)]
pub fn in_only(m: &Member, s: Sh, d: Bytes<'_>, f: In) -> Result<()> {
    if m.deadline.is_none() {
        return f(&m.vendor, s, d);
    }
    in_only_bounded(m, s, d, f)
}

#[cold]
#[inline(never)]
fn in_only_bounded(m: &Member, s: Sh, d: Bytes<'_>, f: In) -> Result<()> {
    let Some(t) = m.deadline else {
        return f(&m.vendor, s, d);
    };
    let input = Zeroizing::new(d.as_slice().to_vec());
    let v = m.vendor.clone();
    m.bounded(t, move || f(&v, s, Bytes::from_slice(&input)))?
}

/// A call with an input buffer and other plain arguments (`C_Login`: the
/// PIN copy is wiped when the call is over).
pub fn in_only_with(
    m: &Member,
    s: Sh,
    d: Bytes<'_>,
    f: impl for<'a> Fn(&Vendor, Sh, Bytes<'a>) -> Result<()> + Send + 'static,
) -> Result<()> {
    let Some(t) = m.deadline else {
        return f(&m.vendor, s, d);
    };
    let input = Zeroizing::new(d.as_slice().to_vec());
    let v = m.vendor.clone();
    m.bounded(t, move || f(&v, s, Bytes::from_slice(&input)))?
}

#[inline(always)]
pub fn in_in(m: &Member, s: Sh, a: Bytes<'_>, b: Bytes<'_>, f: InIn) -> Result<()> {
    if m.deadline.is_none() {
        return f(&m.vendor, s, a, b);
    }
    in_in_bounded(m, s, a, b, f)
}

#[cold]
#[inline(never)]
fn in_in_bounded(m: &Member, s: Sh, a: Bytes<'_>, b: Bytes<'_>, f: InIn) -> Result<()> {
    let Some(t) = m.deadline else {
        return f(&m.vendor, s, a, b);
    };
    let (a, b) = (Zeroizing::new(a.as_slice().to_vec()), b.as_slice().to_vec());
    let v = m.vendor.clone();
    m.bounded(t, move || {
        f(&v, s, Bytes::from_slice(&a), Bytes::from_slice(&b))
    })?
}

/// A `*Init`: the mechanism is copied when its layout is known, else the
/// call runs inline.
#[inline(always)]
pub fn init(m: &Member, s: Sh, mech: Mechanism<'_>, key: Oh, f: Init) -> Result<()> {
    if m.deadline.is_none() {
        return f(&m.vendor, s, mech, key);
    }
    init_bounded(m, s, mech, key, f)
}

#[cold]
#[inline(never)]
fn init_bounded(m: &Member, s: Sh, mech: Mechanism<'_>, key: Oh, f: Init) -> Result<()> {
    let Some(t) = m.deadline else {
        return f(&m.vendor, s, mech, key);
    };
    let Some(saved) = mech.save() else {
        return f(&m.vendor, s, mech, key);
    };
    let v = m.vendor.clone();
    m.bounded(t, move || {
        let raw = RawMechanism(saved.to_raw());
        f(&v, s, raw.view(), key)
    })?
}

#[inline(always)]
pub fn random(m: &Member, s: Sh, out: &mut BytesMut<'_>) -> Result<()> {
    if m.deadline.is_none() {
        return m.vendor.generate_random(s, out.reborrow());
    }
    random_bounded(m, s, out)
}

#[cold]
#[inline(never)]
fn random_bounded(m: &Member, s: Sh, out: &mut BytesMut<'_>) -> Result<()> {
    let Some(t) = m.deadline else {
        return m.vendor.generate_random(s, out.reborrow());
    };
    let n = out.len();
    let v = m.vendor.clone();
    let (r, buf) = m.bounded(t, move || {
        let mut buf = Zeroizing::new(vec![0u8; n]);
        let r = v.generate_random(s, BytesMut::from_local(&mut buf));
        (r, buf)
    })?;
    if r.is_ok() {
        out.fill(&buf);
    }
    r
}
