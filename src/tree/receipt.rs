//! Receipts: what cvx staged, so a re-plan need not re-hash bytes it can prove unchanged.
//!
//! One JSON file per staged file, at `.cvx/receipts/<path in the tree>.json`. A receipt is trusted
//! only while the file's identity (device, inode, size, mtime, ctime) is the one recorded: any
//! write, replacement or `touch` changes it and forces a re-hash. ctime cannot be set by a user,
//! so a tamperer cannot restore it.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::owner::Owner;

/// The identity of a file as the kernel sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl FileIdentity {
    pub fn of(meta: &fs::Metadata) -> Self {
        FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// Path of the staged file, relative to `$DAEMON_HOME/cosmovisor`.
    pub path: String,
    /// sha256 and size of the staged file itself.
    pub sha256: String,
    pub size: u64,
    /// Where it came from: the URL and the pinned sha256 of what the URL served (an archive's
    /// sha256 for an unpacked binary).
    pub source_url: String,
    pub source_sha256: String,
    /// The archive member it was unpacked from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    pub identity: FileIdentity,
}

/// Where the receipt for `rel` (a path relative to the cosmovisor root) lives.
pub fn receipt_path(receipts_dir: &Path, rel: &str) -> PathBuf {
    receipts_dir.join(format!("{rel}.json"))
}

/// The receipt for `rel`, if one exists and can be read. An unreadable or malformed receipt is
/// no receipt: the file is then hashed, never trusted.
pub fn read(receipts_dir: &Path, rel: &str) -> Option<Receipt> {
    let bytes = fs::read(receipt_path(receipts_dir, rel)).ok()?;
    serde_json::from_slice(&bytes)
        .inspect_err(|e| tracing::debug!("ignoring malformed receipt for {rel}: {e}"))
        .ok()
        .filter(|r: &Receipt| r.path == rel)
}

/// Write the receipt atomically (temp file, fsync, rename), at a file-system time strictly after
/// the file's last change. Timestamps advance in coarse ticks (a few ms): a receipt written in
/// the file's own tick is not trusted by `tree` (a change in that tick would not show), so the
/// write is repeated, briefly, until the clock has moved on.
///
/// Receipts (and their directories) belong to `owner` when there is one: `cvx run`, as the
/// home's owner, reads them before it executes a binary.
pub fn write(receipts_dir: &Path, receipt: &Receipt, owner: Option<Owner>) -> io::Result<()> {
    let path = receipt_path(receipts_dir, &receipt.path);
    let dir = path.parent().unwrap_or(receipts_dir);
    crate::owner::create_dir_all(owner, dir)?;
    for _ in 0..100 {
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        crate::owner::give_file(owner, tmp.as_file())?;
        serde_json::to_writer_pretty(&mut tmp, receipt)?;
        tmp.write_all(b"\n")?;
        tmp.as_file().sync_all()?;
        let written = FileIdentity::of(&tmp.as_file().metadata()?).mtime_ns;
        tmp.persist(&path).map_err(|e| e.error)?;
        if written > receipt.identity.ctime_ns {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    fs::File::open(dir)?.sync_all()
}

/// Forget the receipt for `rel` (its file is gone or about to be replaced).
pub fn remove(receipts_dir: &Path, rel: &str) -> io::Result<()> {
    match fs::remove_file(receipt_path(receipts_dir, rel)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
