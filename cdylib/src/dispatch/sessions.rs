//! The application's sessions, and their handles.
//!
//! Each virtual slot has a table of session entries. A session handle names
//! its entry: the slot's index, the entry's index in the slot's table and
//! the entry's generation, which grows every time the entry is used again.
//! So a handle is 64-bit, never 0 and never reused, and it is never a valid
//! object handle (object handles come from a counter that stays below the
//! session tag bit). Looking a handle up is a few loads and no lock: the
//! entry's memory stays where it is for the life of the library, and its
//! current handle, compared with the one given, says whether the session is
//! still open.
//!
//! Opening and closing take the slot's table lock once each, for as long as
//! it takes to take or return an entry and count the slot's open sessions:
//! the count tells when the slot's last session closes, which logs the
//! application out as on a token.
//!
//! A session is bound to one member at a time (`SessionState`). Lock order:
//! a slot's table lock is never held with any other lock; then a session's
//! state, then the object table. A session's state lock is held across
//! vendor calls only while the session moves to another member (calls on
//! one session are serialized by the spec anyway).

#![allow(unsafe_code)]

use std::cell::UnsafeCell;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};

use crossbeam_utils::CachePadded;
use parking_lot::Mutex;
use pkcs11_sys::{CK_FLAGS, CK_OBJECT_HANDLE, CK_SESSION_HANDLE};

use crate::error::{Error, Result};
use crate::router::replay::Ops;

/// An open session of the application.
#[derive(Debug)]
pub struct Session {
    /// Index of the virtual slot.
    pub slot: u32,
    /// The flags it was opened with.
    pub flags: CK_FLAGS,
    /// Whether its operations are recorded for replay on another member
    /// (multi-member slots with a replay limit).
    pub replay: bool,
    /// The slot has one member: the session is always bound to member 0
    /// and its vendor handle is read from `vendor`, without a lock.
    pub single: bool,
    /// The vendor session handle, mirrored from the state for `single`.
    pub vendor: AtomicU64,
    /// The member's functions, when calls on this session may take the
    /// direct path (a one-member slot without a call deadline).
    pub direct: Option<super::direct::DirectFns>,
    pub state: Mutex<SessionState>,
}

/// Where a session is bound, and what it is doing.
#[derive(Debug)]
pub struct SessionState {
    /// Index of the member within the slot.
    pub member: u32,
    /// The vendor's session handle on that member.
    pub vendor: CK_SESSION_HANDLE,
    pub ops: Ops,
    /// Session objects this session created (they die with it).
    pub owned: Vec<CK_OBJECT_HANDLE>,
    /// Session objects created from a template (kept), re-created on the
    /// member the session moves to; other session objects are lost then.
    pub recreate: Vec<(CK_OBJECT_HANDLE, crate::abi::mem::SavedTemplate)>,
    /// Calls made, for sampling latency.
    pub calls: u32,
    /// The key operations in progress, by `OpKind`, for their audit records.
    /// (Allocated with the first one: most sessions have none.)
    pub audit: Option<Box<[Option<super::audit::AuditedOp>; 7]>>,
    /// A key operation under a quorum rule, waiting for or holding approval.
    pub quorum: Option<Box<super::quorum::QuorumOp>>,
}

impl SessionState {
    /// The state of a session just opened on `member`.
    pub fn new(member: u32, vendor: CK_SESSION_HANDLE) -> SessionState {
        SessionState {
            member,
            vendor,
            ops: Ops::default(),
            owned: Vec::new(),
            recreate: Vec::new(),
            calls: 0,
            audit: None,
            quorum: None,
        }
    }
}

impl Session {
    /// The member and vendor session serving this session now.
    #[inline]
    pub fn binding(&self) -> (u32, CK_SESSION_HANDLE) {
        if self.single {
            return (0, self.vendor.load(Ordering::Acquire) as CK_SESSION_HANDLE);
        }
        let st = self.state.lock();
        (st.member, st.vendor)
    }
}

// A session handle: bit 63 clear, bit 62 set, then the entry's generation,
// the slot's index and the entry's index.
const TAG: u64 = 1 << 62;
/// Set in a free entry's last handle; never in a handle given out.
const FREE: u64 = 1 << 63;
const INDEX_BITS: u32 = 16;
const SLOT_BITS: u32 = 8;
const GEN_SHIFT: u32 = INDEX_BITS + SLOT_BITS;
const GEN_BITS: u32 = 62 - GEN_SHIFT;
const MAX_GEN: u64 = (1 << GEN_BITS) - 1;
/// Sessions a slot can have open at once.
const MAX_ENTRIES: u32 = 1 << INDEX_BITS;
/// Slots a library can have (`config` refuses more).
pub const MAX_SLOTS: usize = 1 << SLOT_BITS;
/// Entries of a chunk: a table grows by a chunk at a time, and an entry
/// never moves.
const CHUNK: u32 = 64;
const CHUNK_SHIFT: u32 = CHUNK.trailing_zeros();
/// Chunks to hold `MAX_ENTRIES` entries.
const CHUNKS: usize = (MAX_ENTRIES / CHUNK) as usize;

const _: () = assert!(size_of::<CK_SESSION_HANDLE>() == 8);

/// The generation every table of the process starts above, so that a
/// handle is not issued again after `C_Finalize` and `C_Initialize`.
static GEN_FLOOR: AtomicU64 = AtomicU64::new(0);

fn handle(slot: u32, index: u32, generation: u64) -> CK_SESSION_HANDLE {
    (TAG | generation << GEN_SHIFT | u64::from(slot) << INDEX_BITS | u64::from(index))
        as CK_SESSION_HANDLE
}

/// The slot and entry a handle names, if it is a session handle at all.
#[inline(always)]
fn decode(h: CK_SESSION_HANDLE) -> Option<(usize, u32)> {
    let h = h as u64;
    if h & (TAG | FREE) != TAG {
        return None;
    }
    let slot = (h >> INDEX_BITS) as usize & (MAX_SLOTS - 1);
    Some((slot, h as u32 & (MAX_ENTRIES - 1)))
}

fn generation(h: u64) -> u64 {
    (h >> GEN_SHIFT) & MAX_GEN
}

/// A chunk and the position in it of entry `index`.
#[inline(always)]
fn chunk_of(index: u32) -> (usize, usize) {
    (
        (index >> CHUNK_SHIFT) as usize,
        (index & (CHUNK - 1)) as usize,
    )
}

struct Entry {
    /// The open session's handle; in a free entry, the handle its next
    /// session gets, with `FREE` set (0 before its first session).
    handle: AtomicU64,
    /// The session while `handle` is live; else a closed one, emptied.
    session: UnsafeCell<Session>,
}

impl Entry {
    fn new() -> Entry {
        Entry {
            handle: AtomicU64::new(0),
            session: UnsafeCell::new(Session {
                slot: 0,
                flags: 0,
                replay: false,
                single: false,
                vendor: AtomicU64::new(0),
                direct: None,
                state: Mutex::new(SessionState::new(0, 0)),
            }),
        }
    }
}

/// What a session starts with.
#[derive(Debug, Clone, Copy)]
pub struct Opened {
    pub slot: u32,
    pub flags: CK_FLAGS,
    pub replay: bool,
    pub single: bool,
    pub member: u32,
    pub vendor: CK_SESSION_HANDLE,
    pub direct: Option<super::direct::DirectFns>,
}

/// What the table lock guards.
struct Free {
    /// Entries to use again, the most recently freed last.
    entries: Vec<u32>,
    /// Entries made so far.
    len: u32,
    /// Sessions open.
    open: usize,
}

/// One slot's sessions. What lookups read and what opening and closing
/// write live in cache lines of their own, and so does every entry, so that
/// threads working on different sessions do not contend.
struct Table {
    slot: u32,
    /// `CHUNKS` pointers, NULL until their chunk is made.
    chunks: Box<[AtomicPtr<CachePadded<Entry>>]>,
    /// The first generation of a new entry.
    base: u64,
    /// What opening and closing write.
    free: CachePadded<SpinLock<Free>>,
}

impl Table {
    fn new(slot: u32, base: u64) -> Table {
        Table {
            slot,
            chunks: (0..CHUNKS)
                .map(|_| AtomicPtr::new(ptr::null_mut()))
                .collect(),
            base,
            free: CachePadded::new(SpinLock::new(Free {
                entries: Vec::new(),
                len: 0,
                open: 0,
            })),
        }
    }

    #[inline(always)]
    fn entry(&self, index: u32) -> Option<&Entry> {
        let (k, i) = chunk_of(index);
        let chunk = self.chunks[k].load(Ordering::Acquire);
        // SAFETY: a published chunk holds `CHUNK` entries, `i` is below
        // that, and chunks are freed only when the table is dropped.
        unsafe { chunk.as_ref().map(|_| &**chunk.add(i)) }
    }

    /// The highest generation this table issued or keeps for an entry's
    /// next session (its base if none), read from the entries' handles
    /// without the lock.
    fn high(&self) -> u64 {
        let mut high = self.base;
        for c in self.chunks.iter() {
            let p = c.load(Ordering::Acquire);
            if p.is_null() {
                break;
            }
            for i in 0..CHUNK as usize {
                // SAFETY: a published chunk of `CHUNK` entries, freed only
                // when the table is dropped.
                let h = unsafe { (&*p.add(i)).handle.load(Ordering::Relaxed) };
                if h != 0 {
                    high = high.max(generation(h));
                }
            }
        }
        high
    }

    /// A new entry's index, making its chunk when it is the first of one.
    fn grow(&self, free: &mut Free) -> Result<u32> {
        let index = free.len;
        if index >= MAX_ENTRIES {
            return Err(Error::SessionCount);
        }
        let (k, i) = chunk_of(index);
        if i == 0 {
            let n = CHUNK as usize;
            let chunk: Box<[CachePadded<Entry>]> =
                (0..n).map(|_| CachePadded::new(Entry::new())).collect();
            // Every entry may be free at once: returning one never grows
            // the list under the lock.
            free.entries
                .reserve(index as usize + n - free.entries.len());
            self.chunks[k].store(Box::into_raw(chunk).cast(), Ordering::Release);
        }
        free.len += 1;
        Ok(index)
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        GEN_FLOOR.fetch_max(self.high(), Ordering::Relaxed);
        for c in self.chunks.iter() {
            let p = c.load(Ordering::Relaxed);
            if !p.is_null() {
                let n = CHUNK as usize;
                // SAFETY: made by `grow` from a boxed slice of `n` entries;
                // the table is going away, nothing else reaches them.
                drop(unsafe { Box::from_raw(ptr::slice_from_raw_parts_mut(p, n)) });
            }
        }
    }
}

/// A session, borrowed for the duration of one call.
///
/// The session stays in its entry until it is closed; closing a session
/// while another thread is inside a call on that same session is undefined
/// in PKCS#11 (vendor libraries free its state too), which is what makes
/// the borrow without a reference count sound.
#[derive(Debug, Clone, Copy)]
pub struct SessionRef(*const Session);

impl std::ops::Deref for SessionRef {
    type Target = Session;
    #[inline(always)]
    fn deref(&self) -> &Session {
        // SAFETY: the pointer came from an entry whose handle matched; the
        // entry gives the session up only in C_CloseSession,
        // C_CloseAllSessions or C_Finalize of that session,
        // which the application does not run concurrently with a call on the
        // session (see above), and its memory lives as long as the library.
        unsafe { &*self.0 }
    }
}

/// A session taken out of the table by closing it.
#[derive(Debug)]
pub struct Closed {
    /// The member it was bound to.
    pub member: u32,
    /// Its slot has one member.
    pub single: bool,
    /// It was the slot's last open session.
    pub last: bool,
    /// What it still held, if anything: dropped with it, outside the table
    /// lock.
    pub held: Option<Box<Held>>,
}

/// What a closed session still held.
#[derive(Debug, Default)]
#[allow(dead_code, reason = "the fields are held to be dropped")]
pub struct Held {
    /// Its session objects.
    pub owned: Vec<CK_OBJECT_HANDLE>,
    ops: Ops,
    recreate: Vec<(CK_OBJECT_HANDLE, crate::abi::mem::SavedTemplate)>,
    audit: Option<Box<[Option<super::audit::AuditedOp>; 7]>>,
    quorum: Option<Box<super::quorum::QuorumOp>>,
}

impl SessionState {
    /// Whether the session holds nothing but its binding.
    #[inline(always)]
    fn is_empty(&self) -> bool {
        self.owned.is_empty()
            && self.ops.is_idle()
            && self.recreate.is_empty()
            && self.audit.is_none()
            && self.quorum.is_none()
    }

    /// Takes what the session holds, leaving it empty.
    fn take_held(&mut self) -> Box<Held> {
        Box::new(Held {
            owned: std::mem::take(&mut self.owned),
            ops: std::mem::take(&mut self.ops),
            recreate: std::mem::take(&mut self.recreate),
            audit: self.audit.take(),
            quorum: self.quorum.take(),
        })
    }
}

/// The open sessions of every slot.
pub struct Sessions {
    tables: Box<[Table]>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("slots", &self.tables.len())
            .finish()
    }
}

impl Sessions {
    /// Tables for `slots` slots (at most `MAX_SLOTS`).
    pub fn new(slots: usize) -> Sessions {
        assert!(slots <= MAX_SLOTS, "at most {MAX_SLOTS} slots");
        let base = GEN_FLOOR.load(Ordering::Relaxed);
        Sessions {
            tables: (0..slots as u32).map(|s| Table::new(s, base)).collect(),
        }
    }

    /// Looks a session up: no lock, no write.
    #[inline(always)]
    pub fn get(&self, h: CK_SESSION_HANDLE) -> Option<SessionRef> {
        let (slot, index) = decode(h)?;
        let e = self.tables.get(slot)?.entry(index)?;
        if e.handle.load(Ordering::Acquire) != h as u64 {
            return None;
        }
        Some(SessionRef(e.session.get().cast::<Session>()))
    }

    /// Adds a session to its slot, and counts it open there.
    #[inline(always)]
    pub fn insert(&self, o: Opened) -> Result<CK_SESSION_HANDLE> {
        let (t, index, e) = self.reserve(o.slot)?;
        Ok(Self::publish(t, index, e, o))
    }

    /// Takes an entry of the slot's table off the free list and counts its
    /// session open (before it is published: a close-all in between leaves
    /// it counted).
    #[inline(always)]
    fn reserve(&self, slot: u32) -> Result<(&Table, u32, &Entry)> {
        let t = self.tables.get(slot as usize).ok_or(Error::SlotIdInvalid)?;
        let mut free = t.free.lock();
        let index = match free.entries.pop() {
            Some(i) => i,
            None => t.grow(&mut free)?,
        };
        let Some(e) = t.entry(index) else {
            // Unreachable: a made entry has its chunk.
            return Err(Error::HostMemory);
        };
        free.open += 1;
        Ok((t, index, e))
    }

    /// Fills a reserved entry in and publishes its handle.
    #[inline(always)]
    fn publish(t: &Table, index: u32, e: &Entry, o: Opened) -> CK_SESSION_HANDLE {
        // A free entry keeps its next handle.
        let h = match e.handle.load(Ordering::Relaxed) {
            0 => handle(t.slot, index, t.base + 1),
            next => (next & !FREE) as CK_SESSION_HANDLE,
        };
        // SAFETY: the entry is off the free list and not yet published: no
        // other thread writes it, and none finds its session.
        let s = unsafe { &mut *e.session.get() };
        s.slot = o.slot;
        s.flags = o.flags;
        s.replay = o.replay;
        s.single = o.single;
        *s.vendor.get_mut() = o.vendor as u64;
        s.direct = o.direct;
        let st = s.state.get_mut();
        st.member = o.member;
        st.vendor = o.vendor;
        st.calls = 0;
        e.handle.store(h as u64, Ordering::Release);
        h
    }

    /// Closes session `h`.
    #[cfg(test)]
    fn remove(&self, h: CK_SESSION_HANDLE) -> Option<Closed> {
        self.remove_found(h, self.get(h)?)
    }

    /// Closes session `h`, found as `s`.
    #[inline(always)]
    pub fn remove_found(&self, h: CK_SESSION_HANDLE, s: SessionRef) -> Option<Closed> {
        let t = self.tables.get(s.slot as usize)?;
        // SAFETY: `s` points at the session of an entry of this library's
        // tables (`get`), whose memory lives as long as the tables.
        let e = unsafe {
            &*s.0
                .cast::<u8>()
                .sub(std::mem::offset_of!(Entry, session))
                .cast::<Entry>()
        };
        let index = h as u32 & (MAX_ENTRIES - 1);
        let mut free = t.free.lock();
        let closed = Self::take(e, h as u64, &mut free, index)?;
        free.open -= 1;
        let last = free.open == 0;
        drop(free);
        Some(Closed { last, ..closed })
    }

    /// Takes the session out of an entry that holds the live handle `h`,
    /// and frees the entry; called with the table lock held.
    #[inline(always)]
    fn take(e: &Entry, h: u64, free: &mut Free, index: u32) -> Option<Closed> {
        if e.handle.load(Ordering::Relaxed) != h {
            return None;
        }
        // The entry keeps its next handle; one whose generations ran out
        // is never used again.
        let spent = generation(h) == MAX_GEN;
        let next = if spent { h } else { h + (1 << GEN_SHIFT) };
        e.handle.store(next | FREE, Ordering::Release);
        // SAFETY: the entry held handle `h`; under the table lock no other
        // thread frees it, its handle no longer matches, so no new call
        // finds it, and it is not yet on the free list.
        let s = unsafe { &mut *e.session.get() };
        let st = s.state.get_mut();
        let closed = Closed {
            member: st.member,
            single: s.single,
            last: false,
            held: (!st.is_empty()).then(|| st.take_held()),
        };
        if !spent {
            free.entries.push(index);
        }
        Some(closed)
    }

    /// Closes every session of a slot.
    pub fn remove_slot(&self, slot: u32) -> Vec<Closed> {
        let Some(t) = self.tables.get(slot as usize) else {
            return Vec::new();
        };
        let mut gone = Vec::new();
        let mut free = t.free.lock();
        for index in 0..free.len {
            let Some(e) = t.entry(index) else { continue };
            let h = e.handle.load(Ordering::Relaxed);
            if h != 0 && h & FREE == 0 {
                gone.extend(Self::take(e, h, &mut free, index));
            }
        }
        // A session being opened now is counted already and not yet
        // published: it stays counted.
        free.open -= gone.len();
        drop(free);
        gone
    }

    /// Sessions open on a slot.
    pub fn open(&self, slot: u32) -> usize {
        self.tables
            .get(slot as usize)
            .map_or(0, |t| t.free.lock().open)
    }

    /// Makes sure that no table made from now on in this process issues a
    /// handle this one issued; for a library that is abandoned instead of
    /// dropped (in a forked child). Takes no lock: a thread of the parent
    /// may have held one at the fork.
    pub fn retire(&self) {
        for t in self.tables.iter() {
            GEN_FLOOR.fetch_max(t.high(), Ordering::Relaxed);
        }
    }
}

// SAFETY: entries are shared between threads as described above: a
// session is written only while its entry is unpublished, and emptied only
// under the table lock; `Session` itself is `Sync`.
unsafe impl Sync for Sessions {}
// SAFETY: as above; the raw chunk pointers are owned by the tables.
unsafe impl Send for Sessions {}

/// A lock for a few instructions of work: one atomic exchange to take it and
/// a plain store to give it back. A waiter spins briefly, then yields.
struct SpinLock<T> {
    locked: AtomicBool,
    value: UnsafeCell<T>,
}

struct SpinGuard<'a, T>(&'a SpinLock<T>);

impl<T> SpinLock<T> {
    const SPINS: u32 = 100;

    fn new(value: T) -> SpinLock<T> {
        SpinLock {
            locked: AtomicBool::new(false),
            value: UnsafeCell::new(value),
        }
    }

    #[inline(always)]
    fn lock(&self) -> SpinGuard<'_, T> {
        if self.locked.swap(true, Ordering::Acquire) {
            self.lock_contended();
        }
        SpinGuard(self)
    }

    #[cold]
    #[inline(never)]
    fn lock_contended(&self) {
        loop {
            let mut spins = 0;
            while self.locked.load(Ordering::Relaxed) {
                if spins < Self::SPINS {
                    std::hint::spin_loop();
                    spins += 1;
                } else {
                    std::thread::yield_now();
                }
            }
            if !self.locked.swap(true, Ordering::Acquire) {
                return;
            }
        }
    }
}

impl<T> std::ops::Deref for SpinGuard<'_, T> {
    type Target = T;
    #[inline(always)]
    fn deref(&self) -> &T {
        // SAFETY: the guard holds the lock.
        unsafe { &*self.0.value.get() }
    }
}

impl<T> std::ops::DerefMut for SpinGuard<'_, T> {
    #[inline(always)]
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard holds the lock.
        unsafe { &mut *self.0.value.get() }
    }
}

impl<T> Drop for SpinGuard<'_, T> {
    #[inline(always)]
    fn drop(&mut self) {
        self.0.locked.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(slot: u32) -> Opened {
        Opened {
            slot,
            flags: 4,
            replay: false,
            single: true,
            member: 0,
            vendor: 7,
            direct: None,
        }
    }

    #[test]
    fn chunks_cover_every_index() {
        assert_eq!(chunk_of(0), (0, 0));
        assert_eq!(chunk_of(63), (0, 63));
        assert_eq!(chunk_of(64), (1, 0));
        assert_eq!(chunk_of(191), (2, 63));
        assert_eq!(chunk_of(MAX_ENTRIES - 1), (CHUNKS - 1, CHUNK as usize - 1));
    }

    #[test]
    fn a_closed_handle_is_gone_and_never_issued_again() {
        let t = Sessions::new(2);
        let a = t.insert(session(1)).unwrap();
        assert_ne!(a, 0);
        assert_eq!(t.get(a).unwrap().slot, 1);
        assert_eq!(t.open(1), 1);
        assert_eq!(t.open(0), 0);
        let closed = t.remove(a).unwrap();
        assert!(closed.last);
        assert!(t.get(a).is_none());
        assert!(t.remove(a).is_none(), "closed twice");
        // The entry is used again, under another handle.
        let b = t.insert(session(1)).unwrap();
        assert_ne!(a, b);
        assert_eq!(decode(a), decode(b));
        assert!(t.get(a).is_none());
        assert!(t.get(b).is_some());
        // What the closed session owned goes with it, not to the next.
        t.get(b).unwrap().state.lock().owned.push(0x10001);
        let closed = t.remove(b).unwrap();
        assert_eq!(closed.held.unwrap().owned, [0x10001]);
        let b = t.insert(session(1)).unwrap();
        assert!(t.get(b).unwrap().state.lock().owned.is_empty());
        // Not the last one while another is open.
        let c = t.insert(session(1)).unwrap();
        assert!(!t.remove(b).unwrap().last);
        assert!(t.remove(c).unwrap().last);
    }

    #[test]
    fn handles_that_are_not_sessions_do_not_resolve() {
        let t = Sessions::new(1);
        let a = t.insert(session(0)).unwrap();
        for h in [
            0,
            1,
            0x10000,
            a | FREE as CK_SESSION_HANDLE,
            a & !TAG,
            a + 1,
            a + (1 << INDEX_BITS),
        ] {
            assert!(t.get(h).is_none(), "{h:#x}");
            assert!(t.remove(h).is_none(), "{h:#x}");
        }
        assert!(t.get(a).is_some());
        // A freed entry's handles, as stored, do not match either: neither
        // the last one nor the one its next session gets.
        t.remove(a).unwrap();
        let next = a + (1 << GEN_SHIFT);
        for h in [
            a,
            next,
            a | FREE as CK_SESSION_HANDLE,
            next | FREE as CK_SESSION_HANDLE,
        ] {
            assert!(t.get(h).is_none(), "{h:#x}");
        }
        assert_eq!(t.insert(session(0)).unwrap(), next);
    }

    #[test]
    fn a_new_table_issues_none_of_an_old_ones_handles() {
        let old = Sessions::new(1);
        let issued: Vec<_> = (0..5).map(|_| old.insert(session(0)).unwrap()).collect();
        drop(old);
        let new = Sessions::new(1);
        for _ in 0..5 {
            let h = new.insert(session(0)).unwrap();
            assert!(!issued.contains(&h));
        }
        // An abandoned table counts as well.
        let kept: Vec<_> = (0..3).map(|_| new.insert(session(0)).unwrap()).collect();
        new.retire();
        std::mem::forget(new);
        let next = Sessions::new(1);
        assert!(!kept.contains(&next.insert(session(0)).unwrap()));
    }

    #[test]
    fn closing_a_slot_takes_its_sessions_only() {
        let t = Sessions::new(2);
        let a: Vec<_> = (0..200).map(|_| t.insert(session(0)).unwrap()).collect();
        let b = t.insert(session(1)).unwrap();
        t.remove(a[10]).unwrap();
        assert_eq!(t.remove_slot(0).len(), 199);
        assert_eq!(t.open(0), 0);
        assert!(a.iter().all(|h| t.get(*h).is_none()));
        assert!(t.get(b).is_some());
        // The freed entries are used again.
        let c = t.insert(session(0)).unwrap();
        assert!(decode(c).unwrap().1 < 200);
    }

    /// A session being opened while every session of its slot is closed
    /// (reserved, not yet published) stays counted, and its own close
    /// later brings the count to zero, not below.
    #[test]
    fn a_close_all_during_an_open_keeps_the_count() {
        let t = Sessions::new(1);
        let a = t.insert(session(0)).unwrap();
        let (table, index, e) = t.reserve(0).unwrap();
        assert_eq!(t.open(0), 2);
        assert_eq!(t.remove_slot(0).len(), 1, "the published one only");
        assert!(t.get(a).is_none());
        assert_eq!(t.open(0), 1);
        let b = Sessions::publish(table, index, e, session(0));
        assert!(t.get(b).is_some());
        assert!(t.remove(b).unwrap().last);
        assert_eq!(t.open(0), 0);
    }

    #[test]
    fn a_full_slot_refuses_one_more() {
        let t = Sessions::new(1);
        let all: Vec<_> = (0..MAX_ENTRIES)
            .map(|_| t.insert(session(0)).unwrap())
            .collect();
        assert!(matches!(t.insert(session(0)), Err(Error::SessionCount)));
        assert_eq!(t.open(0), MAX_ENTRIES as usize);
        t.remove(all[7]).unwrap();
        let h = t.insert(session(0)).unwrap();
        assert_eq!(decode(h), decode(all[7]));
    }

    #[test]
    fn threads_opening_and_closing_keep_the_count() {
        let t = std::sync::Arc::new(Sessions::new(1));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || {
                    let mut mine = Vec::new();
                    for i in 0..20_000 {
                        let h = t.insert(session(0)).unwrap();
                        assert_eq!(t.get(h).unwrap().flags, 4);
                        mine.push(h);
                        if i % 3 != 0 {
                            let h = mine.swap_remove(i % mine.len());
                            assert!(t.remove(h).is_some());
                            assert!(t.get(h).is_none());
                        }
                    }
                    mine
                })
            })
            .collect();
        let left: Vec<_> = threads
            .into_iter()
            .flat_map(|j| j.join().unwrap())
            .collect();
        assert_eq!(t.open(0), left.len());
        let mut sorted = left.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), left.len(), "no handle issued twice");
        let lasts = left.iter().filter(|h| t.remove(**h).unwrap().last).count();
        assert_eq!(lasts, 1);
    }
}
