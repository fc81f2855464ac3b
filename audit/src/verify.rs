//! The verifier: reads audit files in order (oldest first), follows every
//! chain through them and reports the first broken link.
//!
//! Broken (tampering or damage): a line that is not a JSON record or not
//! ended by a newline; a seq gap, repeat or inversion; a `prev` that is not
//! the hash of the chain's previous line; a chain beginning at seq 0 with
//! something other than `start`; anything after `stop`; a checkpoint whose
//! signature fails, names another key, or (with a key given) is missing
//! after a signed one. Warnings: a chain with no `stop` (unterminated), a
//! chain whose head is in files not given, unsigned checkpoints, a `start`
//! anchored to a line not among the given files.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};

use crate::record::SIG_FIELD;
use crate::{Error, Kind, VerifyKey};

/// The first broken link found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Broken {
    pub file: PathBuf,
    /// 1-based line number in `file`.
    pub line: u64,
    /// The chain, when the line could be read that far.
    pub chain: Option<String>,
    pub seq: Option<u64>,
    pub reason: String,
}

impl fmt::Display for Broken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.file.display(), self.line)?;
        if let Some(c) = &self.chain {
            write!(f, "chain {c}")?;
            if let Some(s) = self.seq {
                write!(f, " seq {s}")?;
            }
            write!(f, ": ")?;
        }
        f.write_str(&self.reason)
    }
}

/// One chain as the verifier saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainReport {
    pub chain: String,
    pub first_seq: u64,
    pub last_seq: u64,
    pub records: u64,
    pub checkpoints: u64,
    /// Checkpoints whose signature was verified with the given key.
    pub verified: u64,
    /// Whether the chain ends with its `stop` checkpoint.
    pub terminated: bool,
    /// The seq of the last checkpoint (signed or not).
    pub last_checkpoint: Option<u64>,
}

/// What [`verify`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Every chain, in order of first appearance (up to the broken link).
    pub chains: Vec<ChainReport>,
    /// Lines read (up to the broken link).
    pub records: u64,
    pub checkpoints: u64,
    /// The first broken link, `None` when the files verify.
    pub broken: Option<Broken>,
    /// Not broken, but worth knowing: unterminated or unsigned chains...
    pub warnings: Vec<String>,
}

impl Report {
    /// Nothing broken.
    pub fn ok(&self) -> bool {
        self.broken.is_none()
    }

    /// Nothing broken and no warning (`verify --strict`).
    pub fn ok_strict(&self) -> bool {
        self.broken.is_none() && self.warnings.is_empty()
    }
}

struct ChainState {
    idx: usize,
    next_seq: u64,
    prev: [u8; 32],
    stopped: bool,
    /// A signed checkpoint was seen.
    signed: bool,
    unsigned: u64,
}

/// Verifies `paths`, read in the order given (oldest rotated file first:
/// `audit.log.2 audit.log.1 audit.log`). An unreadable file is an error;
/// a broken link is reported in [`Report::broken`].
pub fn verify(paths: &[PathBuf], key: &VerifyKey) -> Result<Report, Error> {
    let mut v = Verifier {
        key,
        key_id: key.key_id(),
        report: Report::default(),
        chains: HashMap::new(),
        lines_seen: HashSet::new(),
    };
    for path in paths {
        let data = std::fs::read(path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        if let Err(b) = v.file(path, &data) {
            v.report.broken = Some(b);
            return Ok(v.report);
        }
    }
    v.finish();
    Ok(v.report)
}

struct Verifier<'k> {
    key: &'k VerifyKey,
    key_id: Option<String>,
    report: Report,
    chains: HashMap<String, ChainState>,
    /// Hashes of every line read, for `start` anchors.
    lines_seen: HashSet<[u8; 32]>,
}

struct At<'a> {
    file: &'a Path,
    line: u64,
    chain: Option<String>,
    seq: Option<u64>,
}

impl At<'_> {
    fn broken(&self, reason: impl Into<String>) -> Broken {
        Broken {
            file: self.file.to_path_buf(),
            line: self.line,
            chain: self.chain.clone(),
            seq: self.seq,
            reason: reason.into(),
        }
    }
}

impl Verifier<'_> {
    fn file(&mut self, path: &Path, data: &[u8]) -> Result<(), Broken> {
        let mut rest = data;
        let mut n = 0u64;
        while !rest.is_empty() {
            n += 1;
            let mut at = At {
                file: path,
                line: n,
                chain: None,
                seq: None,
            };
            let Some(end) = rest.iter().position(|&b| b == b'\n') else {
                return Err(at.broken(format!(
                    "incomplete last line ({} bytes without a newline): the file was truncated or a write was torn",
                    rest.len()
                )));
            };
            let line = &rest[..end];
            rest = &rest[end + 1..];
            self.line(&mut at, line)?;
        }
        Ok(())
    }

    fn line(&mut self, at: &mut At<'_>, line: &[u8]) -> Result<(), Broken> {
        let hash: [u8; 32] = Sha256::digest(line).into();
        let obj: Map<String, Value> = serde_json::from_slice(line)
            .map_err(|e| at.broken(format!("not a JSON record: {e}")))?;
        if obj.get("v").and_then(Value::as_u64) != Some(1) {
            return Err(at.broken("missing or unknown format version `v`"));
        }
        let chain = obj
            .get("chain")
            .and_then(Value::as_str)
            .filter(|c| c.len() == 32 && c.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| at.broken("missing or malformed `chain`"))?
            .to_owned();
        at.chain = Some(chain.clone());
        let seq = obj
            .get("seq")
            .and_then(Value::as_u64)
            .ok_or_else(|| at.broken("missing or malformed `seq`"))?;
        at.seq = Some(seq);
        let kind = obj
            .get("kind")
            .and_then(Value::as_str)
            .and_then(Kind::parse)
            .ok_or_else(|| at.broken("missing or unknown `kind`"))?;
        let prev = obj
            .get("prev")
            .and_then(Value::as_str)
            .and_then(unhex32)
            .ok_or_else(|| at.broken("missing or malformed `prev`"))?;

        self.report.records += 1;
        let st = match self.chains.get_mut(&chain) {
            Some(st) => {
                if st.stopped {
                    return Err(at.broken("record after the chain's `stop`"));
                }
                if seq != st.next_seq {
                    return Err(at.broken(if seq > st.next_seq {
                        format!(
                            "seq gap: expected {}, found {seq} (records deleted or reordered)",
                            st.next_seq
                        )
                    } else {
                        format!(
                            "seq {seq} after {}: records reordered or repeated",
                            st.next_seq - 1
                        )
                    }));
                }
                if prev != st.prev {
                    return Err(at.broken(format!(
                        "`prev` is not the hash of seq {}: that record was edited or replaced",
                        seq - 1
                    )));
                }
                st
            }
            None => {
                if seq == 0 {
                    if kind != Kind::Start {
                        return Err(at.broken("a chain's seq 0 must be its `start` record"));
                    }
                    if prev != [0; 32] && !self.lines_seen.contains(&prev) {
                        self.report.warnings.push(format!(
                            "chain {chain}: its start ({}:{}) follows a line that is not in the given files",
                            at.file.display(),
                            at.line
                        ));
                    }
                } else {
                    self.report.warnings.push(format!(
                        "chain {chain} begins at seq {seq} ({}:{}): its earlier records are not in the given files",
                        at.file.display(),
                        at.line
                    ));
                }
                self.report.chains.push(ChainReport {
                    chain: chain.clone(),
                    first_seq: seq,
                    last_seq: seq,
                    records: 0,
                    checkpoints: 0,
                    verified: 0,
                    terminated: false,
                    last_checkpoint: None,
                });
                self.chains.entry(chain.clone()).or_insert(ChainState {
                    idx: self.report.chains.len() - 1,
                    next_seq: seq,
                    prev,
                    stopped: false,
                    signed: false,
                    unsigned: 0,
                })
            }
        };
        if kind == Kind::Start && seq != 0 {
            return Err(at.broken("a `start` record in the middle of a chain"));
        }
        let cr = &mut self.report.chains[st.idx];
        cr.records += 1;
        cr.last_seq = seq;
        if kind.is_checkpoint() {
            self.report.checkpoints += 1;
            cr.checkpoints += 1;
            cr.last_checkpoint = Some(seq);
            match obj.get("sig") {
                Some(sig) => {
                    st.signed = true;
                    if let Some(want) = &self.key_id {
                        let sig = sig.as_str().ok_or_else(|| at.broken("malformed `sig`"))?;
                        check_sig(self.key, want, &obj, line, sig).map_err(|r| at.broken(r))?;
                        cr.verified += 1;
                    }
                }
                None => {
                    if st.signed && self.key_id.is_some() {
                        return Err(at.broken(
                            "unsigned checkpoint after signed ones: a signature was removed",
                        ));
                    }
                    st.unsigned += 1;
                }
            }
            if kind == Kind::Stop {
                st.stopped = true;
                cr.terminated = true;
            }
        }
        st.next_seq = seq + 1;
        st.prev = hash;
        self.lines_seen.insert(hash);
        Ok(())
    }

    fn finish(&mut self) {
        let key_given = self.key_id.is_some();
        for cr in &self.report.chains {
            let Some(st) = self.chains.get(&cr.chain) else {
                continue;
            };
            if !cr.terminated {
                let after = match cr.last_checkpoint {
                    Some(c) => cr.last_seq - c,
                    None => cr.last_seq - cr.first_seq + 1,
                };
                self.report.warnings.push(format!(
                    "chain {}: unterminated: {after} records after the last checkpoint (process crashed, still running, or the file was truncated)",
                    cr.chain
                ));
            }
            if st.unsigned > 0 {
                self.report.warnings.push(format!(
                    "chain {}: {} unsigned checkpoints{}",
                    cr.chain,
                    st.unsigned,
                    if key_given {
                        " (before the signer was set)"
                    } else {
                        ""
                    }
                ));
            }
            if key_given && !st.signed && cr.checkpoints > 0 {
                self.report.warnings.push(format!(
                    "chain {}: no signed checkpoint: only the hash chain was checked",
                    cr.chain
                ));
            }
        }
    }
}

/// Checks the signature of a checkpoint line: `sig` must be its last
/// field, and the line without it must verify under `key`.
fn check_sig(
    key: &VerifyKey,
    want_id: &str,
    obj: &Map<String, Value>,
    line: &[u8],
    sig: &str,
) -> Result<(), String> {
    let alg = obj.get("alg").and_then(Value::as_str).unwrap_or("");
    let id = obj.get("key_id").and_then(Value::as_str).unwrap_or("");
    if Some(alg) != key.alg() || id != want_id {
        return Err(format!(
            "checkpoint signed by key {id} ({alg}), not by the given key {want_id}"
        ));
    }
    let p = line
        .windows(SIG_FIELD.len())
        .rposition(|w| w == SIG_FIELD)
        .filter(|&p| line[p + SIG_FIELD.len()..] == *[sig.as_bytes(), b"\"}"].concat())
        .ok_or("`sig` is not the record's last field")?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(sig)
        .map_err(|_| "`sig` is not base64".to_owned())?;
    let mut msg = line[..p].to_vec();
    msg.push(b'}');
    if !key.verify(&msg, &raw) {
        return Err(
            "checkpoint signature does not verify: the checkpoint was edited or forged".into(),
        );
    }
    Ok(())
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        let h = (b[2 * i] as char).to_digit(16)?;
        let l = (b[2 * i + 1] as char).to_digit(16)?;
        *o = (h * 16 + l) as u8;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Auditor, Config, FileSink, Fsync, KeyRef, Record, Signer};
    use std::sync::Arc;
    use std::time::Duration;
    use zeroize::Zeroizing;

    const PRIV: &str = "-----BEGIN PRIVATE KEY-----\n\
        MC4CAQAwBQYDK2VwBCIEIJ1hsZ3v/VpguoRK9JLsLMREScVpezJpGXA7rAMcrn9g\n\
        -----END PRIVATE KEY-----\n";
    const PUB: &str = "-----BEGIN PUBLIC KEY-----\n\
        MCowBQYDK2VwAyEA11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=\n\
        -----END PUBLIC KEY-----\n";

    fn hmac_key() -> Zeroizing<Vec<u8>> {
        Zeroizing::new(b"0123456789abcdef0123456789abcdef".to_vec())
    }

    fn cfg(path: &Path) -> Config {
        Config {
            file: Some(FileSink {
                fsync: Fsync::Never,
                ..FileSink::new(path.to_path_buf())
            }),
            checkpoint_records: 10,
            ..Config::default()
        }
    }

    fn sign_record(i: u64) -> Record {
        let mut r = Record::new(Kind::KeyUse, "C_Sign", 0);
        r.slot = Some(0);
        r.role = Some(Arc::from("payments"));
        r.mechanism = Some(0x1041);
        r.key = Some(Arc::new(KeyRef {
            label: Some(format!("key-{i}")),
            id: Some(vec![i as u8]),
            ..KeyRef::default()
        }));
        r.latency_us = Some(i);
        r
    }

    /// Writes `n` records through an auditor; returns its chain id.
    fn write_log(cfg: Config, n: u64, signer: Option<Signer>) -> String {
        let a = Auditor::start(cfg, signer).unwrap();
        for i in 0..n {
            assert!(a.record(sign_record(i)));
        }
        a.stop(Duration::from_secs(10));
        let st = a.stats();
        assert_eq!((st.written, st.lost), (n, 0));
        a.chain().to_owned()
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn put(path: &Path, lines: &[String]) {
        std::fs::write(
            path,
            lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
        )
        .unwrap();
    }

    fn check(path: &Path, key: &VerifyKey) -> Report {
        verify(&[path.to_path_buf()], key).unwrap()
    }

    fn ed_pub() -> VerifyKey {
        VerifyKey::from_public_pem(PUB).unwrap()
    }

    #[test]
    fn a_good_signed_log_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let chain = write_log(cfg(&path), 25, Some(Signer::from_pkcs8_pem(PRIV).unwrap()));
        let r = check(&path, &ed_pub());
        assert!(r.ok_strict(), "{r:?}");
        // start + 25 records + checkpoints at 10 and 20 + stop.
        assert_eq!(r.records, 29);
        assert_eq!(r.checkpoints, 3);
        assert_eq!(r.chains.len(), 1);
        let c = &r.chains[0];
        assert_eq!(
            (c.chain.as_str(), c.verified, c.terminated),
            (chain.as_str(), 3, true)
        );
        assert!(check(&path, &VerifyKey::None).ok_strict());
        // Every line is a record of this chain, consecutive, the last one `stop`.
        let ls = lines(&path);
        let last: Value = serde_json::from_str(ls.last().unwrap()).unwrap();
        assert_eq!(
            (last["kind"].as_str(), last["seq"].as_u64()),
            (Some("stop"), Some(28))
        );
        assert_eq!(last["alg"], "ed25519");
    }

    #[test]
    fn hmac_checkpoints_verify_with_their_key_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        write_log(cfg(&path), 12, Some(Signer::hmac(hmac_key())));
        assert!(check(&path, &VerifyKey::Hmac(hmac_key())).ok_strict());
        let wrong = check(&path, &VerifyKey::Hmac(Zeroizing::new(b"other".to_vec())));
        let b = wrong.broken.unwrap();
        assert!(b.reason.contains("not by the given key"), "{b}");
        assert_eq!(b.line, 12, "the first checkpoint is line 12 (seq 11)");
        let b = check(&path, &ed_pub()).broken.unwrap();
        assert!(b.reason.contains("not by the given key"), "{b}");
    }

    #[test]
    fn an_edited_field_breaks_the_next_link() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        write_log(cfg(&path), 5, None);
        let mut ls = lines(&path);
        ls[3] = ls[3].replace("\"key-2\"", "\"key-X\"");
        put(&path, &ls);
        let b = check(&path, &VerifyKey::None).broken.unwrap();
        assert_eq!((b.line, b.seq), (5, Some(4)));
        assert!(b.reason.contains("hash of seq 3"), "{b}");
    }

    #[test]
    fn an_edited_checkpoint_fails_its_signature() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        write_log(cfg(&path), 10, Some(Signer::from_pkcs8_pem(PRIV).unwrap()));
        let mut ls = lines(&path);
        // Line 12 is the checkpoint after 10 records; its time is not chained
        // by anything before it.
        assert!(ls[11].contains("\"checkpoint\""));
        ls[11] = ls[11].replacen("\"time\":\"2", "\"time\":\"1", 1);
        put(&path, &ls);
        let b = check(&path, &ed_pub()).broken.unwrap();
        assert_eq!(b.line, 12);
        assert!(b.reason.contains("does not verify"), "{b}");
    }

    #[test]
    fn a_forged_signature_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        write_log(cfg(&path), 3, Some(Signer::from_pkcs8_pem(PRIV).unwrap()));
        let mut ls = lines(&path);
        let last = ls.len() - 1;
        // Another key's valid signature over the same bytes.
        let mut k = [7u8; 32];
        k[0] = 1;
        let forger = Signer::Ed25519(ed25519_dalek::SigningKey::from_bytes(&k));
        let p = ls[last].rfind(",\"sig\":\"").unwrap();
        let msg = format!("{}}}", &ls[last][..p]);
        let sig = base64::engine::general_purpose::STANDARD.encode(forger.sign(msg.as_bytes()));
        ls[last] = format!("{},\"sig\":\"{sig}\"}}", &ls[last][..p]);
        put(&path, &ls);
        let b = check(&path, &ed_pub()).broken.unwrap();
        assert!(b.reason.contains("does not verify"), "{b}");
        // A signature removed (the last checkpoint's) after signed ones: the
        // stop line is then unsigned after the first signed checkpoint? Here
        // the only checkpoint is `stop`, so check the dedicated case below.
    }

    #[test]
    fn a_stripped_signature_after_signed_ones_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        write_log(cfg(&path), 10, Some(Signer::from_pkcs8_pem(PRIV).unwrap()));
        let mut ls = lines(&path);
        let last = ls.len() - 1;
        let p = ls[last].rfind(",\"alg\":").unwrap();
        ls[last] = format!("{}}}", &ls[last][..p]);
        put(&path, &ls);
        let b = check(&path, &ed_pub()).broken.unwrap();
        assert!(b.reason.contains("signature was removed"), "{b}");
    }

    #[test]
    fn a_deleted_line_is_a_seq_gap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        write_log(cfg(&path), 5, None);
        let mut ls = lines(&path);
        ls.remove(2);
        put(&path, &ls);
        let b = check(&path, &VerifyKey::None).broken.unwrap();
        assert_eq!(b.line, 3);
        assert!(b.reason.contains("seq gap: expected 2, found 3"), "{b}");
    }

    #[test]
    fn swapped_lines_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        write_log(cfg(&path), 5, None);
        let mut ls = lines(&path);
        ls.swap(2, 3);
        put(&path, &ls);
        let b = check(&path, &VerifyKey::None).broken.unwrap();
        assert_eq!(b.line, 3);
        assert!(b.reason.contains("reordered"), "{b}");
    }

    #[test]
    fn a_truncated_last_line_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        write_log(cfg(&path), 5, None);
        let data = std::fs::read(&path).unwrap();
        // Cut inside the last line.
        std::fs::write(&path, &data[..data.len() - 20]).unwrap();
        let b = check(&path, &VerifyKey::None).broken.unwrap();
        assert!(b.reason.contains("incomplete last line"), "{b}");
        // Cut the newline only.
        std::fs::write(&path, &data[..data.len() - 1]).unwrap();
        assert!(check(&path, &VerifyKey::None).broken.is_some());
        // Garbage line in the middle.
        let mut ls = lines(&path);
        ls.truncate(3);
        ls[1] = ls[1][..30].to_owned();
        put(&path, &ls);
        let b = check(&path, &VerifyKey::None).broken.unwrap();
        assert_eq!(b.line, 2);
        assert!(b.reason.contains("not a JSON record"), "{b}");
    }

    #[test]
    fn a_removed_tail_is_unterminated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        write_log(cfg(&path), 15, Some(Signer::from_pkcs8_pem(PRIV).unwrap()));
        let mut ls = lines(&path);
        ls.truncate(ls.len() - 3);
        put(&path, &ls);
        let r = check(&path, &ed_pub());
        assert!(r.ok() && !r.ok_strict(), "{r:?}");
        assert_eq!(r.warnings.len(), 1);
        assert!(
            r.warnings[0].contains("unterminated: 3 records after the last checkpoint"),
            "{:?}",
            r.warnings
        );
    }

    #[test]
    fn two_processes_interleaved_in_one_file_verify() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let a = Auditor::start(cfg(&path), Some(Signer::from_pkcs8_pem(PRIV).unwrap())).unwrap();
        let b = Auditor::start(cfg(&path), Some(Signer::from_pkcs8_pem(PRIV).unwrap())).unwrap();
        for i in 0..200 {
            assert!(a.record(sign_record(i)));
            assert!(b.record(sign_record(i)));
            if i % 20 == 0 {
                assert!(a.flush(Duration::from_secs(10)) && b.flush(Duration::from_secs(10)));
            }
        }
        a.stop(Duration::from_secs(10));
        b.stop(Duration::from_secs(10));
        let r = check(&path, &ed_pub());
        assert!(r.ok_strict(), "{r:?}");
        assert_eq!(r.chains.len(), 2);
        assert!(
            r.chains
                .iter()
                .all(|c| c.terminated && c.records == 1 + 200 + 20 + 1)
        );
        // The lines of the two chains are interleaved.
        let ls = lines(&path);
        let first_of = |c: &str| ls.iter().position(|l| l.contains(c)).unwrap();
        let last_of = |c: &str| ls.iter().rposition(|l| l.contains(c)).unwrap();
        assert!(
            first_of(a.chain()) < last_of(b.chain()) && first_of(b.chain()) < last_of(a.chain())
        );
    }

    #[test]
    fn a_new_chain_is_anchored_to_the_files_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        write_log(cfg(&path), 3, None);
        let stop_line = lines(&path).pop().unwrap();
        write_log(cfg(&path), 3, None);
        let ls = lines(&path);
        let start: Value = serde_json::from_str(&ls[5]).unwrap();
        assert_eq!(start["kind"], "start");
        assert_eq!(
            start["prev"].as_str().unwrap(),
            crate::record::hex(&Sha256::digest(stop_line.as_bytes()))
        );
        let r = check(&path, &VerifyKey::None);
        assert!(r.ok(), "{r:?}");
        assert!(r.warnings.iter().all(|w| w.contains("unsigned")), "{r:?}");
        // Without the first chain's lines, the anchor is missing.
        put(&path, &ls[5..]);
        let r = check(&path, &VerifyKey::None);
        assert!(
            r.ok()
                && r.warnings
                    .iter()
                    .any(|w| w.contains("not in the given files")),
            "{r:?}"
        );
    }

    #[test]
    fn a_rotated_chain_continues_across_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let mut c = cfg(&path);
        if let Some(f) = &mut c.file {
            f.rotate_bytes = Some(4096);
            f.keep = 50;
        }
        write_log(c, 60, Some(Signer::hmac(hmac_key())));
        let mut files: Vec<PathBuf> = (1..=50)
            .map(|i| crate::sink::numbered(&path, i))
            .filter(|p| p.exists())
            .collect();
        assert!(files.len() >= 3, "rotated into {} files", files.len());
        assert!(
            files
                .iter()
                .all(|f| std::fs::metadata(f).unwrap().len() <= 4096)
        );
        files.reverse();
        files.push(path.clone());
        let key = VerifyKey::Hmac(hmac_key());
        let r = verify(&files, &key).unwrap();
        assert!(r.ok_strict(), "{r:?}");
        assert_eq!(r.chains.len(), 1);
        assert_eq!(r.records, 1 + 60 + 6 + 1);
        // Out of order: a seq inversion. Without the oldest: a headless chain.
        files.swap(0, 1);
        assert!(verify(&files, &key).unwrap().broken.is_some());
        files.swap(0, 1);
        let r = verify(&files[1..], &key).unwrap();
        assert!(r.ok() && r.warnings[0].contains("begins at seq"), "{r:?}");
    }

    #[test]
    fn a_signer_set_later_signs_the_following_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let a = Auditor::start(cfg(&path), None).unwrap();
        for i in 0..10 {
            a.record(sign_record(i));
        }
        assert!(a.flush(Duration::from_secs(10)));
        a.set_signer(Signer::hmac(hmac_key()));
        for i in 0..5 {
            a.record(sign_record(i));
        }
        a.stop(Duration::from_secs(10));
        assert!(!a.record(sign_record(0)), "no record after stop");
        let key = VerifyKey::Hmac(hmac_key());
        let r = check(&path, &key);
        assert!(r.ok(), "{r:?}");
        assert_eq!(r.chains[0].verified, 2, "the signer's checkpoint and stop");
        assert!(
            r.warnings
                .iter()
                .any(|w| w.contains("1 unsigned checkpoints")),
            "{r:?}"
        );
    }
}
