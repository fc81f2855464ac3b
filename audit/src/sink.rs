//! Where the lines go: an append-only file (rotation, fsync policy, shared
//! by several processes) and the syslog datagram socket (journald reads
//! it). Never stdout or stderr.
//!
//! Everything here runs on the writer thread only. Every descriptor is
//! non-blocking where the kernel honours it (a FIFO, a socket), so the
//! writer never waits for a reader: a full pipe or socket is an error
//! like any other, and the writer retries later.

#![allow(unsafe_code)]

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read as _, Seek as _, SeekFrom};
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::{FileSink, Fsync, SyslogSink};

/// The most one write(2) carries: whole lines, at most 64 KiB.
pub(crate) const MAX_WRITE: usize = 64 * 1024;

/// fdatasync of the regular file at `path` through a descriptor of its
/// own (the data of an inode is synced whichever descriptor wrote it); a
/// FIFO or a device has nothing to sync, a file that is gone neither.
pub(crate) fn sync_path(path: &std::path::Path) -> io::Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_file() => {}
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    f.sync_data()
}

/// The audit file, as the writer thread holds it.
#[derive(Debug)]
pub(crate) struct FileOut {
    pub cfg: FileSink,
    file: Option<File>,
    /// (st_dev, st_ino) of the open file, for regular files.
    id: Option<(u64, u64)>,
    regular: bool,
    /// Bytes written since the last fdatasync.
    dirty: bool,
    pub last_sync: Instant,
}

impl FileOut {
    pub fn new(cfg: FileSink) -> FileOut {
        FileOut {
            cfg,
            file: None,
            id: None,
            regular: false,
            dirty: false,
            last_sync: Instant::now(),
        }
    }

    /// Opens the file for appending (created 0600). A FIFO without a
    /// reader fails with ENXIO instead of blocking.
    pub fn open(&mut self) -> io::Result<()> {
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&self.cfg.path)?;
        let meta = file.metadata()?;
        self.regular = meta.file_type().is_file();
        self.id = self.regular.then(|| (meta.dev(), meta.ino()));
        self.file = Some(file);
        Ok(())
    }

    /// Forgets the open file (after an error), so the next write reopens.
    pub fn close(&mut self) {
        self.file = None;
        self.id = None;
    }

    /// SHA-256 input for a new chain's `start` record: the last complete
    /// line of the existing file, if it is a regular file with one.
    pub fn last_line(&self) -> io::Result<Option<Vec<u8>>> {
        if !self.regular {
            return Ok(None);
        }
        let mut f = File::open(&self.cfg.path)?;
        let len = f.seek(SeekFrom::End(0))?;
        // Lines are far shorter than this; a longer one is not anchored to.
        let want = len.min(1 << 20);
        f.seek(SeekFrom::Start(len - want))?;
        let mut buf = Vec::with_capacity(want as usize);
        f.take(want).read_to_end(&mut buf)?;
        // Up to the last newline: a torn line after it is not a line.
        let Some(end) = buf.iter().rposition(|&b| b == b'\n') else {
            return Ok(None);
        };
        let start = buf[..end]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |p| p + 1);
        if start == 0 && want < len {
            return Ok(None);
        }
        Ok(Some(buf[start..end].to_vec()))
    }

    /// Writes a prefix of `buf` (whole lines, at most [`MAX_WRITE`] bytes,
    /// or one longer line) with one write(2); returns how many bytes went.
    /// Rotates first when the file would grow past `rotate_bytes`, and
    /// reopens when the path no longer names the open file.
    pub fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.file.is_none() {
            self.open()?;
        }
        if self.regular {
            self.follow_path()?;
        }
        let mut limit = MAX_WRITE;
        if self.regular
            && let Some(max) = self.cfg.rotate_bytes
        {
            let size = self.file()?.metadata()?.len();
            let room = max.saturating_sub(size);
            if size > 0 && (chunk_len(buf, MAX_WRITE) as u64).min(first_line(buf)) > room {
                self.rotate()?;
                limit = limit.min(usize::try_from(max).unwrap_or(usize::MAX));
            } else {
                limit = limit.min(usize::try_from(room).unwrap_or(usize::MAX));
            }
        }
        let chunk = chunk_len(buf, limit);
        let n = loop {
            // SAFETY: the descriptor is open and owned by `self.file`; the
            // pointer and length describe the initialized slice `buf`.
            let n = unsafe { libc::write(self.file()?.as_raw_fd(), buf.as_ptr().cast(), chunk) };
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "write returned 0"));
        }
        self.dirty = true;
        Ok(n)
    }

    /// fdatasync when something was written since the last one (regular
    /// files only: a FIFO or a device has nothing to sync).
    pub fn sync(&mut self) -> io::Result<()> {
        if self.dirty && self.regular {
            self.file()?.sync_data()?;
        }
        self.dirty = false;
        self.last_sync = Instant::now();
        Ok(())
    }

    pub fn needs_sync(&self) -> bool {
        self.dirty
    }

    /// When the next interval sync is due, if the policy has intervals.
    pub fn sync_due(&self) -> Option<Instant> {
        match self.cfg.fsync {
            Fsync::IntervalMs(ms) if self.dirty => {
                Some(self.last_sync + std::time::Duration::from_millis(ms))
            }
            _ => None,
        }
    }

    fn file(&self) -> io::Result<&File> {
        self.file
            .as_ref()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "audit file not open"))
    }

    /// Reopens when the path was renamed away (rotated by another process
    /// or by logrotate) or removed.
    fn follow_path(&mut self) -> io::Result<()> {
        let current = match std::fs::metadata(&self.cfg.path) {
            Ok(m) => Some((m.dev(), m.ino())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        if current != self.id {
            self.sync()?;
            self.open()?;
        }
        Ok(())
    }

    /// `audit.log` becomes `audit.log.1`, `.1` becomes `.2`... up to
    /// `.keep` (the oldest beyond it is removed), under an exclusive flock
    /// of the file being rotated, so that of several processes reaching the
    /// limit together only one rotates and the others reopen.
    fn rotate(&mut self) -> io::Result<()> {
        self.sync()?;
        let fd = self.file()?.as_raw_fd();
        flock(fd, libc::LOCK_EX)?;
        let result = self.rotate_locked();
        // Unlocking cannot fail on a descriptor we hold; the lock also
        // goes when the descriptor is closed below.
        let _ = flock(fd, libc::LOCK_UN);
        result?;
        self.open()
    }

    fn rotate_locked(&mut self) -> io::Result<()> {
        let path = &self.cfg.path;
        let still_ours = match std::fs::metadata(path) {
            Ok(m) => Some((m.dev(), m.ino())) == self.id,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(e),
        };
        if !still_ours {
            // Another process rotated while we waited for the lock.
            return Ok(());
        }
        if self.cfg.keep == 0 {
            return std::fs::remove_file(path);
        }
        for i in (1..self.cfg.keep).rev() {
            match std::fs::rename(numbered(path, i), numbered(path, i + 1)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        std::fs::rename(path, numbered(path, 1))
    }
}

/// `path.n`.
pub fn numbered(path: &Path, n: u32) -> PathBuf {
    let mut s = OsString::from(path.as_os_str());
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

fn flock(fd: i32, op: i32) -> io::Result<()> {
    loop {
        // SAFETY: flock on a descriptor we hold open; no memory is passed.
        if unsafe { libc::flock(fd, op) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Blocks every signal in the calling thread (the writer thread): the
/// application's handlers run on its own threads, and the SIGPIPE of a
/// write to a FIFO whose reader left stays pending here instead of
/// killing a process that did not ignore it; the write fails with EPIPE.
pub(crate) fn block_signals() {
    // SAFETY: `set` is a local sigset_t initialized by sigfillset before
    // use; pthread_sigmask only changes the calling thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Length of the prefix of `buf` one write carries: whole lines up to
/// `limit` bytes, or the first line alone when it is longer.
pub(crate) fn chunk_len(buf: &[u8], limit: usize) -> usize {
    if buf.len() <= limit {
        return buf.len();
    }
    match buf[..limit].iter().rposition(|&b| b == b'\n') {
        Some(p) => p + 1,
        None => first_line(buf) as usize,
    }
}

/// Length of the first line of `buf`, with its newline.
fn first_line(buf: &[u8]) -> u64 {
    buf.iter()
        .position(|&b| b == b'\n')
        .map_or(buf.len(), |p| p + 1) as u64
}

/// The syslog socket, as the writer thread holds it.
#[derive(Debug)]
pub(crate) struct SyslogOut {
    pub cfg: SyslogSink,
    sock: Option<UnixDatagram>,
    header: Vec<u8>,
    msg: Vec<u8>,
}

/// Syslog severities used: notice for the chain's own records, warning for
/// denials, losses and failovers, info for the rest.
fn severity(kind: crate::Kind) -> u8 {
    use crate::Kind::*;
    match kind {
        Denial | Lost | Failover => 4,
        Start | Stop | Checkpoint => 5,
        _ => 6,
    }
}

impl SyslogOut {
    pub fn new(cfg: SyslogSink) -> SyslogOut {
        // `ident[pid]: `, as glibc's syslog(3) writes it, without the
        // timestamp (journald and rsyslog stamp the message on receipt).
        let header = format!("{}[{}]: ", cfg.ident, std::process::id()).into_bytes();
        SyslogOut {
            cfg,
            sock: None,
            header,
            msg: Vec::with_capacity(2048),
        }
    }

    pub fn open(&mut self) -> io::Result<()> {
        let s = UnixDatagram::unbound()?;
        s.set_nonblocking(true)?;
        s.connect(&self.cfg.socket)?;
        self.sock = Some(s);
        Ok(())
    }

    pub fn close(&mut self) {
        self.sock = None;
    }

    /// Sends one line (without its newline) as one datagram.
    pub fn send(&mut self, kind: crate::Kind, line: &[u8]) -> io::Result<()> {
        if self.sock.is_none() {
            self.open()?;
        }
        let pri = self.cfg.facility.code() * 8 + severity(kind);
        self.msg.clear();
        self.msg.push(b'<');
        self.msg.extend_from_slice(pri.to_string().as_bytes());
        self.msg.push(b'>');
        self.msg.extend_from_slice(&self.header);
        self.msg.extend_from_slice(line);
        let sock = self
            .sock
            .as_ref()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "syslog not open"))?;
        let n = sock.send(&self.msg)?;
        if n != self.msg.len() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "short datagram"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_whole_lines_of_at_most_64k() {
        let line = [b'x'; 99].iter().chain(b"\n").copied().collect::<Vec<_>>();
        let buf: Vec<u8> = line.iter().cycle().take(100 * 1000).copied().collect();
        let n = chunk_len(&buf, MAX_WRITE);
        assert!(n <= MAX_WRITE && n % 100 == 0 && n > MAX_WRITE - 100);
        assert_eq!(chunk_len(&buf[..500], MAX_WRITE), 500);
        assert_eq!(chunk_len(&buf[..500], 250), 200);
        assert_eq!(chunk_len(&buf[..500], 50), 100);
        let mut long = vec![b'y'; MAX_WRITE + 10];
        long.push(b'\n');
        long.extend_from_slice(&line);
        assert_eq!(chunk_len(&long, MAX_WRITE), MAX_WRITE + 11);
    }

    #[test]
    fn last_line_of_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        let mut f = FileOut::new(FileSink::new(path.clone()));
        f.open().unwrap();
        assert_eq!(f.last_line().unwrap(), None);
        std::fs::write(&path, b"one\ntwo\nthr").unwrap();
        assert_eq!(f.last_line().unwrap().as_deref(), Some(&b"two"[..]));
        std::fs::write(&path, b"only\n").unwrap();
        assert_eq!(f.last_line().unwrap().as_deref(), Some(&b"only"[..]));
    }
}
