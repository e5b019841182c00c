//! Turn a downloaded, already checksum-verified artifact into the files to install.
//!
//! Archives (`.tar.gz`, `.tar.xz`, `.tar.zst`, `.zip`) are recognised by their content first and by
//! their name second ([`detect`]); [`extract`] then copies exactly one member into a temp file the
//! caller owns, hashing it on the way, and [`unpack_tree`] hands every regular file and inside
//! symlink to the caller, as Cosmovisor unpacks a downloaded upgrade whole.
//!
//! Size policy: a pinned archive can still be a decompression bomb. Every byte written counts
//! against a cap (`--max-size`); the copy stops before the byte that would cross it, so nothing,
//! not even the temp file, ever holds more than the cap.
//!
//! Safety policy: the whole archive is refused when any entry could land outside the archive root
//! if it were unpacked (a `..` component, an absolute path, a symlink or hard link pointing out),
//! even though cvx only ever writes the one chosen member. A pinned sha256 says the bytes are the
//! ones the operator meant; it does not say the archive is well made, and one that tries to escape
//! is not one to run a validator from.
//!
//! Tar archives are read in one streaming pass: every entry is validated, and the member that the
//! rules would choose given what has been seen so far is written as it streams by (a later,
//! better candidate replaces it). Zip archives are listed from their central directory first and
//! the chosen member is then read by index.
//!
//! Here: formats, detection, the member rules, the safety checks and the cap. By format:
//! `tarball.rs`, `zipfile.rs`; the whole archive: `tree.rs`; tests: `tests.rs`.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::hash::Sha256;

mod tarball;
mod tree;
mod zipfile;

use tarball::*;
pub use tree::{Member, TreeEntry, unpack_tree};
use zipfile::*;

/// The archive formats cvx unpacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ArchiveKind {
    TarGz,
    TarXz,
    TarZst,
    Zip,
}

impl ArchiveKind {
    /// The usual file suffix, for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            ArchiveKind::TarGz => "tar.gz",
            ArchiveKind::TarXz => "tar.xz",
            ArchiveKind::TarZst => "tar.zst",
            ArchiveKind::Zip => "zip",
        }
    }
}

impl ArchiveKind {
    /// The compression of a tar archive; `None` for zip.
    fn codec(self) -> Option<Codec> {
        match self {
            ArchiveKind::TarGz => Some(Codec::Gz),
            ArchiveKind::TarXz => Some(Codec::Xz),
            ArchiveKind::TarZst => Some(Codec::Zst),
            ArchiveKind::Zip => None,
        }
    }
}

impl fmt::Display for ArchiveKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Magic bytes, checked before the name: a mirror may serve a tarball under any name.
const MAGIC: &[(&[u8], ArchiveKind)] = &[
    (&[0x1f, 0x8b], ArchiveKind::TarGz),
    (&[0xfd, b'7', b'z', b'X', b'Z', 0x00], ArchiveKind::TarXz),
    (&[0x28, 0xb5, 0x2f, 0xfd], ArchiveKind::TarZst),
    (&[b'P', b'K', 0x03, 0x04], ArchiveKind::Zip),
];

/// Name suffixes, lower-case, for content that has no recognised magic.
const SUFFIXES: &[(&str, ArchiveKind)] = &[
    (".tar.gz", ArchiveKind::TarGz),
    (".tgz", ArchiveKind::TarGz),
    (".tar.xz", ArchiveKind::TarXz),
    (".txz", ArchiveKind::TarXz),
    (".tar.zst", ArchiveKind::TarZst),
    (".tzst", ArchiveKind::TarZst),
    (".zip", ArchiveKind::Zip),
];

/// Detect by content (magic bytes) first, else by the URL/file name suffix; `None` = a plain file,
/// install as is.
pub fn detect(file: &Path, name_hint: &str) -> io::Result<Option<ArchiveKind>> {
    let mut head = [0u8; 6];
    let mut filled = 0;
    let mut f = File::open(file)?;
    while filled < head.len() {
        match f.read(&mut head[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    let head = &head[..filled];
    if let Some((_, kind)) = MAGIC.iter().find(|(magic, _)| head.starts_with(magic)) {
        return Ok(Some(*kind));
    }
    Ok(kind_from_name(name_hint))
}

pub(crate) fn kind_from_name(hint: &str) -> Option<ArchiveKind> {
    // A URL's query or fragment is not part of the name (`.../x.tar.gz?download=1`).
    let name = if hint.contains("://") {
        hint.split(['?', '#']).next().unwrap_or(hint)
    } else {
        hint
    };
    let name = name.to_ascii_lowercase();
    SUFFIXES
        .iter()
        .find(|(suffix, _)| name.ends_with(suffix))
        .map(|(_, kind)| *kind)
}

/// The member that was extracted, with the sha256 and size of the bytes written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extracted {
    /// The member's path in the archive, normalized (`./bin/x` -> `bin/x`, `\` -> `/`).
    pub member: String,
    pub sha256: String,
    pub size: u64,
}

/// What an archive entry is, when it is not a regular file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Regular,
    Directory,
    Symlink,
    HardLink,
    Fifo,
    Device,
    /// Any other tar entry type or zip file mode.
    Special,
}

impl fmt::Display for EntryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EntryKind::Regular => "a regular file",
            EntryKind::Directory => "a directory",
            EntryKind::Symlink => "a symlink",
            EntryKind::HardLink => "a hard link",
            EntryKind::Fifo => "a fifo",
            EntryKind::Device => "a device file",
            EntryKind::Special => "a special entry",
        })
    }
}

/// Why an archive entry makes the whole archive unacceptable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnsafeReason {
    /// A `..` component in the entry's own name.
    ParentDir,
    /// `/x`, or a drive letter `C:x`.
    Absolute,
    /// A symlink whose target is absolute or climbs above the archive root.
    SymlinkOut { target: String },
    /// A hard link whose target is absolute or climbs above the archive root.
    HardLinkOut { target: String },
    /// A name with a NUL byte, or a non-directory entry whose name is empty.
    BadName,
    /// Unpacking the whole archive: the entry's path goes through a symlink or a file of the
    /// archive, so writing it would follow that link or fail.
    UnderNonDirectory { parent: String },
    /// Unpacking the whole archive: a symlink whose target climbs (`..`) out of another symlink,
    /// where the lexical check cannot tell where it lands.
    SymlinkThroughLink { target: String, link: String },
}

impl fmt::Display for UnsafeReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnsafeReason::ParentDir => f.write_str("escapes the archive"),
            UnsafeReason::Absolute => f.write_str("has an absolute path"),
            UnsafeReason::SymlinkOut { target } => {
                write!(f, "is a symlink to `{target}`, outside the archive")
            }
            UnsafeReason::HardLinkOut { target } => {
                write!(f, "is a hard link to `{target}`, outside the archive")
            }
            UnsafeReason::BadName => f.write_str("has an empty name or a NUL byte in its name"),
            UnsafeReason::UnderNonDirectory { parent } => write!(
                f,
                "lies under `{parent}`, which the archive makes a symlink or a file, not a directory"
            ),
            UnsafeReason::SymlinkThroughLink { target, link } => write!(
                f,
                "is a symlink to `{target}`, which climbs out of the symlink `{link}`"
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The archive file itself could not be read (not a decoding problem).
    #[error("cannot read archive `{}`", archive.display())]
    Read {
        archive: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write member `{member}` of archive `{}` to the temporary file", archive.display())]
    Write {
        archive: PathBuf,
        member: String,
        #[source]
        source: io::Error,
    },
    #[error("archive `{}` is not a valid {kind} archive (corrupt, truncated or mislabelled): {detail}", archive.display())]
    Corrupt {
        archive: PathBuf,
        kind: ArchiveKind,
        detail: String,
    },
    #[error("archive `{}` uses a zip feature cvx does not support: {detail}", archive.display())]
    Unsupported { archive: PathBuf, detail: String },
    #[error("archive entry `{entry}` {reason}; refusing the whole archive")]
    UnsafeEntry { entry: String, reason: UnsafeReason },
    #[error("no member `{wanted}` in archive; regular files: {} (set `path` in the manifest to the one to install)", list(.members))]
    NoSuchMember {
        wanted: String,
        /// The archive's regular files, the candidates for `path`.
        members: Vec<String>,
    },
    #[error("archive holds {} regular files and none is `bin/{daemon}` or `{daemon}`; set `path` in the manifest to the one to install: {}", .members.len(), list(.members))]
    Ambiguous {
        daemon: String,
        members: Vec<String>,
    },
    #[error("archive holds no regular file to install")]
    Empty,
    #[error(
        "unpacking member `{member}` of archive `{}` would write more than the size limit of {}; \
         stopped there\nhint: if the archive is genuine (not a decompression bomb), raise the \
         limit with --max-size (cvx apply) or CVX_MAX_SIZE (cvx run)",
        archive.display(),
        show_size(*max)
    )]
    TooLarge {
        archive: PathBuf,
        /// The member whose bytes crossed the limit.
        member: String,
        /// The limit, in bytes.
        max: u64,
    },
    #[error("member `{member}` is {kind}, not a regular file")]
    NotRegular { member: String, kind: EntryKind },
    #[error(
        "archive holds {count} entries named `{member}`; refusing to guess which one to install"
    )]
    Duplicate { member: String, count: usize },
}

/// A size limit as the operator gave it: `--max-size` counts MiB.
fn show_size(bytes: u64) -> String {
    const MIB: u64 = 1 << 20;
    if bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{bytes} bytes")
    }
}

/// At most this many names in a message; the error value keeps them all.
const LISTED: usize = 20;

fn list(members: &[String]) -> String {
    if members.is_empty() {
        return "(none)".to_owned();
    }
    let mut s = members
        .iter()
        .take(LISTED)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if members.len() > LISTED {
        s.push_str(&format!(", … and {} more", members.len() - LISTED));
    }
    s
}

/// Extract the chosen member of `archive` into `out` (an empty temp file the caller fsyncs and
/// renames). Member choice: `path` when given (a leading `./` ignored on both sides), else the
/// only regular file in the archive, else `bin/<daemon>`, else `<daemon>`. A member that unpacks
/// to more than `max_size` bytes is refused ([`UnpackError::TooLarge`]) without writing past it.
/// On error `out` is left empty.
pub fn extract(
    archive: &Path,
    kind: ArchiveKind,
    path: Option<&str>,
    daemon: &str,
    max_size: u64,
    out: &mut File,
) -> Result<Extracted, UnpackError> {
    let want = Want::new(path, daemon);
    let ctx = Ctx {
        archive,
        kind,
        file_error: Rc::default(),
    };
    let result = match kind.codec() {
        Some(codec) => extract_tar(&ctx, codec, &want, max_size, out),
        None => extract_zip(&ctx, &want, max_size, out),
    };
    if result.is_err() {
        // Nothing half-extracted is left for a careless caller to rename into place.
        let _ = reset(out);
    }
    result
}

/// Which member the caller asked for.
enum Want<'a> {
    /// `path` from the manifest, normalized.
    Path(String),
    Auto {
        bin: String,
        daemon: &'a str,
    },
}

impl<'a> Want<'a> {
    fn new(path: Option<&str>, daemon: &'a str) -> Self {
        match path {
            Some(p) => Want::Path(normalize(p)),
            None => Want::Auto {
                bin: format!("bin/{daemon}"),
                daemon,
            },
        }
    }

    /// How strongly the rules prefer a regular file of this name: 0 = only if it is the only one.
    fn rank(&self, name: &str) -> u8 {
        match self {
            Want::Path(p) => u8::from(name == p),
            Want::Auto { bin, daemon } => {
                if name == bin {
                    2
                } else if name == *daemon {
                    1
                } else {
                    0
                }
            }
        }
    }
}

/// One entry of the archive, as listed by the validating pass.
#[derive(Debug)]
struct Listed {
    /// Normalized: no `.` or empty components, `/` separators, no trailing `/`.
    name: String,
    kind: EntryKind,
    /// Tar: ordinal among listed entries; zip: index in the central directory.
    at: usize,
    /// The size the archive declares for the entry's data (the copy counts the real bytes).
    size: u64,
    /// Any execute bit in the entry's mode.
    executable: bool,
    /// A link's target, as written in the archive (already checked to stay inside).
    target: Option<String>,
}

/// Apply the member rules to the full listing; returns the chosen entry's `at`.
fn choose(listed: &[Listed], want: &Want<'_>) -> Result<usize, UnpackError> {
    let regular = || {
        listed
            .iter()
            .filter(|l| l.kind == EntryKind::Regular)
            .map(|l| l.name.clone())
            .collect::<Vec<_>>()
    };
    let pick = |name: &str, include_dirs: bool| -> Option<Result<usize, UnpackError>> {
        let hits: Vec<&Listed> = listed
            .iter()
            .filter(|l| l.name == name && (include_dirs || l.kind != EntryKind::Directory))
            .collect();
        match hits.as_slice() {
            [] => None,
            [one] if one.kind == EntryKind::Regular => Some(Ok(one.at)),
            [one] => Some(Err(UnpackError::NotRegular {
                member: one.name.clone(),
                kind: one.kind,
            })),
            many => Some(Err(UnpackError::Duplicate {
                member: name.to_owned(),
                count: many.len(),
            })),
        }
    };
    match want {
        Want::Path(p) => pick(p, true).unwrap_or_else(|| {
            Err(UnpackError::NoSuchMember {
                wanted: p.clone(),
                members: regular(),
            })
        }),
        Want::Auto { bin, daemon } => {
            let mut files = listed.iter().filter(|l| l.kind == EntryKind::Regular);
            match (files.next(), files.next()) {
                (None, _) => return Err(UnpackError::Empty),
                (Some(only), None) => return Ok(only.at),
                _ => {}
            }
            pick(bin, false)
                .or_else(|| pick(daemon, false))
                .unwrap_or_else(|| {
                    Err(UnpackError::Ambiguous {
                        daemon: (*daemon).to_owned(),
                        members: regular(),
                    })
                })
        }
    }
}

/// `./a//b/./c/` -> `a/b/c`, with `\` taken as a separator too. No safety checks.
fn normalize(name: &str) -> String {
    name.split(['/', '\\'])
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

fn is_drive(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':'
}

/// Check an entry's own name and return it normalized (`""` for the archive root).
fn check_name(raw: &str, kind: EntryKind) -> Result<String, UnpackError> {
    let refuse = |reason| UnpackError::UnsafeEntry {
        entry: raw.to_owned(),
        reason,
    };
    if raw.contains('\0') {
        return Err(refuse(UnsafeReason::BadName));
    }
    if raw.starts_with(['/', '\\']) || is_drive(raw) {
        return Err(refuse(UnsafeReason::Absolute));
    }
    if raw.split(['/', '\\']).any(|c| c == "..") {
        return Err(refuse(UnsafeReason::ParentDir));
    }
    let name = normalize(raw);
    if name.is_empty() && kind != EntryKind::Directory {
        return Err(refuse(UnsafeReason::BadName));
    }
    Ok(name)
}

/// Does a link target stay inside the archive root? `depth` is the number of directories the
/// target is resolved from (a symlink's parent directory; the root for a hard link).
fn stays_inside(target: &str, mut depth: usize) -> bool {
    if target.contains('\0') || target.starts_with(['/', '\\']) || is_drive(target) {
        return false;
    }
    for c in target.split(['/', '\\']) {
        match c {
            "" | "." => {}
            ".." => match depth.checked_sub(1) {
                Some(d) => depth = d,
                None => return false,
            },
            _ => depth += 1,
        }
    }
    true
}

fn check_link(raw: &str, name: &str, kind: EntryKind, target: &str) -> Result<(), UnpackError> {
    let (depth, reason) = match kind {
        EntryKind::Symlink => (
            name.split('/').count().saturating_sub(1),
            UnsafeReason::SymlinkOut {
                target: target.to_owned(),
            },
        ),
        EntryKind::HardLink => (
            0,
            UnsafeReason::HardLinkOut {
                target: target.to_owned(),
            },
        ),
        _ => return Ok(()),
    };
    if stays_inside(target, depth) {
        Ok(())
    } else {
        Err(UnpackError::UnsafeEntry {
            entry: raw.to_owned(),
            reason,
        })
    }
}

/// Per-call context: which archive, and the first error the archive *file* returned, so that a
/// failing disk reads as an I/O error and not as a corrupt archive.
struct Ctx<'a> {
    archive: &'a Path,
    kind: ArchiveKind,
    file_error: Rc<RefCell<Option<io::Error>>>,
}

impl Ctx<'_> {
    fn open(&self) -> Result<BufReader<Tracked>, UnpackError> {
        let file = File::open(self.archive).map_err(|source| UnpackError::Read {
            archive: self.archive.to_owned(),
            source,
        })?;
        Ok(BufReader::with_capacity(
            BUF,
            Tracked {
                file,
                error: Rc::clone(&self.file_error),
            },
        ))
    }

    /// Classify an error that came out of a decoder or archive reader.
    fn read_error(&self, e: io::Error) -> UnpackError {
        match self.file_error.borrow_mut().take() {
            Some(source) => UnpackError::Read {
                archive: self.archive.to_owned(),
                source,
            },
            None => self.corrupt(e.to_string()),
        }
    }

    fn corrupt(&self, detail: String) -> UnpackError {
        UnpackError::Corrupt {
            archive: self.archive.to_owned(),
            kind: self.kind,
            detail,
        }
    }
}

/// The archive file, remembering the first error it returns (decoders pass on only a copy).
struct Tracked {
    file: File,
    error: Rc<RefCell<Option<io::Error>>>,
}

impl Tracked {
    fn keep(&self, e: io::Error) -> io::Error {
        if e.kind() == io::ErrorKind::Interrupted {
            return e;
        }
        let copy = io::Error::new(e.kind(), e.to_string());
        self.error.borrow_mut().get_or_insert(e);
        copy
    }
}

impl Read for Tracked {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf).map_err(|e| self.keep(e))
    }
}

impl Seek for Tracked {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.file.seek(pos).map_err(|e| self.keep(e))
    }
}

const BUF: usize = 256 * 1024;

/// Empty `out` before (re)writing a member into it.
fn reset(out: &mut File) -> io::Result<()> {
    out.set_len(0)?;
    out.seek(SeekFrom::Start(0))?;
    Ok(())
}

/// The bytes one unpack may write: `max` in all, `used` so far by the files already written.
#[derive(Debug, Clone, Copy)]
struct Cap {
    max: u64,
    used: u64,
}

impl Cap {
    fn new(max: u64) -> Self {
        Cap { max, used: 0 }
    }

    fn too_large(&self, ctx: &Ctx<'_>, member: &str) -> UnpackError {
        UnpackError::TooLarge {
            archive: ctx.archive.to_owned(),
            member: member.to_owned(),
            max: self.max,
        }
    }
}

/// Copy one member's bytes into `out`, hashing them on the way, and count them in `cap`. The
/// chunk that would cross the cap is not written: `out` is emptied and the copy refused.
fn copy_member(
    ctx: &Ctx<'_>,
    member: &str,
    data: &mut dyn Read,
    out: &mut File,
    cap: &mut Cap,
) -> Result<Extracted, UnpackError> {
    let write_error = |source| UnpackError::Write {
        archive: ctx.archive.to_owned(),
        member: member.to_owned(),
        source,
    };
    reset(out).map_err(write_error)?;
    let room = cap.max.saturating_sub(cap.used);
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut buf = vec![0u8; BUF];
    loop {
        let n = match data.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ctx.read_error(e)),
        };
        if size + n as u64 > room {
            reset(out).map_err(write_error)?;
            return Err(cap.too_large(ctx, member));
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(write_error)?;
        size += n as u64;
    }
    cap.used += size;
    Ok(Extracted {
        member: member.to_owned(),
        sha256: hasher.finish(),
        size,
    })
}

#[cfg(test)]
mod tests;
