//! What a session must remember to continue its work on another member:
//! each active operation's mechanism and key, and the multi-part input
//! given since its `*Init`, up to the slot's replay limit.
//!
//! The record follows the spec's life cycle of an operation: it starts
//! with a successful `*Init`, grows with each successful `*Update`, and ends
//! with the call that ends the operation (a single-part call or `*Final`
//! that is neither a size query nor `CKR_BUFFER_TOO_SMALL`, or any error).

use pkcs11_sys::*;

use crate::abi::mem::{SavedMechanism, SavedTemplate};

/// The operations a session can have active, one of each at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Encrypt = 0,
    Decrypt = 1,
    Digest = 2,
    Sign = 3,
    Verify = 4,
    SignRecover = 5,
    VerifyRecover = 6,
}

impl OpKind {
    pub const ALL: [OpKind; 7] = [
        OpKind::Encrypt,
        OpKind::Decrypt,
        OpKind::Digest,
        OpKind::Sign,
        OpKind::Verify,
        OpKind::SignRecover,
        OpKind::VerifyRecover,
    ];

    /// Whether `*Update` of this operation produces output.
    pub fn has_update_output(self) -> bool {
        matches!(self, OpKind::Encrypt | OpKind::Decrypt)
    }
}

/// One active operation.
#[derive(Debug)]
pub struct OpRecord {
    /// `None` when the mechanism's parameter could not be copied.
    pub mechanism: Option<SavedMechanism>,
    /// p11shim's handle of the key (`CK_INVALID_HANDLE` for a digest).
    pub key: CK_OBJECT_HANDLE,
    /// Input given to `*Update` so far.
    pub input: Vec<u8>,
    /// The input outgrew the replay limit, or could not be recorded
    /// (`C_DigestKey`, dual-function updates).
    pub unreplayable: bool,
}

impl OpRecord {
    pub fn replayable(&self) -> bool {
        self.mechanism.is_some() && !self.unreplayable
    }
}

/// A search in progress.
#[derive(Debug)]
pub struct FindRecord {
    /// `None` when the template could not be copied.
    pub template: Option<SavedTemplate>,
    /// Handles already returned to the application.
    pub returned: Vec<CK_OBJECT_HANDLE>,
    /// The search was started again on another member: what it returns
    /// again is skipped.
    pub restarted: bool,
}

/// The active operations of a session (few at a time, so a short list).
#[derive(Debug, Default)]
pub struct Ops {
    ops: Vec<(OpKind, OpRecord)>,
    pub find: Option<Box<FindRecord>>,
    /// Operations lost in a move to another member: the next call on them
    /// reports it once.
    lost: u8,
}

impl Ops {
    /// No operation is active or lost.
    #[inline]
    pub fn is_idle(&self) -> bool {
        self.ops.is_empty() && self.find.is_none() && self.lost == 0
    }

    pub fn get(&self, k: OpKind) -> Option<&OpRecord> {
        self.ops.iter().find(|(x, _)| *x == k).map(|(_, r)| r)
    }

    fn get_mut(&mut self, k: OpKind) -> Option<&mut OpRecord> {
        self.ops.iter_mut().find(|(x, _)| *x == k).map(|(_, r)| r)
    }

    pub fn start(&mut self, k: OpKind, mechanism: Option<SavedMechanism>, key: CK_OBJECT_HANDLE) {
        let rec = OpRecord {
            mechanism,
            key,
            input: Vec::new(),
            unreplayable: false,
        };
        match self.get_mut(k) {
            Some(r) => *r = rec,
            None => self.ops.push((k, rec)),
        }
        self.lost &= !(1 << k as u8);
    }

    pub fn end(&mut self, k: OpKind) {
        if let Some(i) = self.ops.iter().position(|(x, _)| *x == k) {
            self.ops.swap_remove(i);
        }
    }

    /// Records `*Update` input, within `limit` bytes.
    pub fn add_input(&mut self, k: OpKind, data: &[u8], limit: u64) {
        if let Some(r) = self.get_mut(k) {
            if r.unreplayable {
                return;
            }
            if (r.input.len() + data.len()) as u64 > limit {
                r.unreplayable = true;
                r.input = Vec::new();
            } else {
                r.input.extend_from_slice(data);
            }
        }
    }

    /// The operation can no longer be replayed (input not recordable).
    pub fn taint(&mut self, k: OpKind) {
        if let Some(r) = self.get_mut(k) {
            r.unreplayable = true;
            r.input = Vec::new();
        }
    }

    pub fn records(&self) -> impl Iterator<Item = (OpKind, &OpRecord)> {
        self.ops.iter().map(|(k, r)| (*k, r))
    }

    pub fn mark_lost(&mut self, k: OpKind) {
        self.end(k);
        self.lost |= 1 << k as u8;
    }

    /// Whether the operation was lost in a move; clears the flag.
    #[inline]
    pub fn take_lost(&mut self, k: OpKind) -> bool {
        if self.lost == 0 {
            return false;
        }
        let was = self.lost & (1 << k as u8) != 0;
        self.lost &= !(1 << k as u8);
        was
    }
}

/// How a call ended, for the record of its operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The operation goes on (a size query, `CKR_BUFFER_TOO_SMALL`, or a
    /// successful update).
    Continues,
    /// The operation is over.
    Ended,
}

/// The outcome of a single-part or final call, per the spec: it ends the
/// operation unless it was a size query or `CKR_BUFFER_TOO_SMALL`.
pub fn final_outcome<T>(result: &crate::Result<T>, size_query: bool) -> Outcome {
    match result {
        Ok(_) if size_query => Outcome::Continues,
        Err(crate::Error::Vendor(CKR_BUFFER_TOO_SMALL)) => Outcome::Continues,
        _ => Outcome::Ended,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_is_kept_within_the_limit() {
        let mut ops = Ops::default();
        ops.start(OpKind::Sign, None, 5);
        ops.add_input(OpKind::Sign, b"abc", 4);
        assert_eq!(ops.get(OpKind::Sign).unwrap().input, b"abc");
        ops.add_input(OpKind::Sign, b"de", 4);
        let r = ops.get(OpKind::Sign).unwrap();
        assert!(r.unreplayable && r.input.is_empty());
        ops.end(OpKind::Sign);
        assert!(ops.get(OpKind::Sign).is_none());
    }

    #[test]
    fn lost_is_reported_once() {
        let mut ops = Ops::default();
        ops.start(OpKind::Encrypt, None, 0);
        ops.mark_lost(OpKind::Encrypt);
        assert!(ops.get(OpKind::Encrypt).is_none());
        assert!(ops.take_lost(OpKind::Encrypt));
        assert!(!ops.take_lost(OpKind::Encrypt));
    }

    #[test]
    fn outcomes_follow_the_spec() {
        assert_eq!(final_outcome::<()>(&Ok(()), true), Outcome::Continues);
        assert_eq!(final_outcome::<()>(&Ok(()), false), Outcome::Ended);
        assert_eq!(
            final_outcome::<()>(&Err(crate::Error::Vendor(CKR_BUFFER_TOO_SMALL)), false),
            Outcome::Continues
        );
        assert_eq!(
            final_outcome::<()>(&Err(crate::Error::Vendor(CKR_DATA_LEN_RANGE)), false),
            Outcome::Ended
        );
    }
}
