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

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::hash::Sha256;

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

// ---------------------------------------------------------------------------------------------
// tar

#[derive(Clone, Copy)]
enum Codec {
    Gz,
    Xz,
    Zst,
}

fn tar_kind(ty: tar::EntryType) -> EntryKind {
    use tar::EntryType as T;
    match ty {
        T::Regular | T::Continuous | T::GNUSparse => EntryKind::Regular,
        T::Directory => EntryKind::Directory,
        T::Symlink => EntryKind::Symlink,
        T::Link => EntryKind::HardLink,
        T::Fifo => EntryKind::Fifo,
        T::Char | T::Block => EntryKind::Device,
        _ => EntryKind::Special,
    }
}

/// Stream every entry of a tar archive: validate it, list it, and hand it to `visit` with its
/// data. Ends by draining the decompressor so its integrity trailer (gzip CRC, xz check, zstd
/// checksum) is verified too.
fn walk_tar<E: From<UnpackError>>(
    ctx: &Ctx<'_>,
    codec: Codec,
    mut visit: impl FnMut(&Listed, &mut dyn Read) -> Result<(), E>,
) -> Result<Vec<Listed>, E> {
    let src = ctx.open()?;
    let decoder: Box<dyn Read> = match codec {
        Codec::Gz => Box::new(flate2::bufread::MultiGzDecoder::new(src)),
        Codec::Xz => Box::new(lzma_rust2::XzReader::new(src, true)),
        Codec::Zst => Box::new(ZstdFrames::new(src)),
    };
    let mut tar = tar::Archive::new(decoder);
    let mut listed = Vec::new();
    let entries = tar.entries().map_err(|e| ctx.read_error(e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| {
            let err = ctx.read_error(e);
            match err {
                UnpackError::Corrupt { detail, .. } if listed.is_empty() => ctx.corrupt(format!(
                    "{detail} (a compressed single file, not a tar archive, is not supported)"
                )),
                other => other,
            }
        })?;
        let ty = entry.header().entry_type();
        if ty.is_pax_global_extensions() {
            // Archive-wide metadata (`pax_global_header`); never extracted by anyone.
            continue;
        }
        let kind = tar_kind(ty);
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let name = check_name(&raw, kind)?;
        let target = entry
            .link_name_bytes()
            .map(|t| String::from_utf8_lossy(&t).into_owned());
        if let Some(target) = &target {
            check_link(&raw, &name, kind, target)?;
        }
        if name.is_empty() {
            continue; // `./`, the root itself
        }
        let item = Listed {
            name,
            kind,
            at: listed.len(),
            size: entry.size(),
            executable: entry.header().mode().is_ok_and(|m| m & 0o111 != 0),
            target,
        };
        visit(&item, &mut entry)?;
        listed.push(item);
    }
    let mut decoder = tar.into_inner();
    io::copy(&mut decoder, &mut io::sink()).map_err(|e| ctx.read_error(e))?;
    Ok(listed)
}

fn extract_tar(
    ctx: &Ctx<'_>,
    codec: Codec,
    want: &Want<'_>,
    max_size: u64,
    out: &mut File,
) -> Result<Extracted, UnpackError> {
    // Write the best candidate so far as it streams by. The rules' final choice, when it is a
    // unique regular file, is always the best candidate seen: the only regular file is the first
    // one seen; `bin/<daemon>` outranks everything; `<daemon>` outranks all but `bin/<daemon>`.
    // A candidate over the cap is remembered as such: it is an error only if it is the choice.
    let mut written: Option<(usize, u8, Result<Extracted, UnpackError>)> = None;
    let listed = walk_tar(ctx, codec, |item, data| {
        if item.kind != EntryKind::Regular {
            return Ok(());
        }
        let rank = want.rank(&item.name);
        let better = match (&written, want) {
            (None, Want::Path(_)) => rank > 0,
            (None, Want::Auto { .. }) => true,
            (Some((_, best, _)), _) => rank > *best,
        };
        if better {
            let copied = match copy_member(ctx, &item.name, data, out, &mut Cap::new(max_size)) {
                Err(e) if !matches!(e, UnpackError::TooLarge { .. }) => return Err(e),
                copied => copied,
            };
            written = Some((item.at, rank, copied));
        }
        Ok(())
    })?;
    let chosen = choose(&listed, want)?;
    match written {
        Some((at, _, copied)) if at == chosen => copied,
        _ => second_pass(ctx, codec, chosen, max_size, out),
    }
}

/// Extract entry number `chosen` by streaming the archive again. Not reached for archives the
/// first pass handles (see [`extract_tar`]); kept so correctness never rests on that argument.
fn second_pass(
    ctx: &Ctx<'_>,
    codec: Codec,
    chosen: usize,
    max_size: u64,
    out: &mut File,
) -> Result<Extracted, UnpackError> {
    let mut extracted = None;
    walk_tar(ctx, codec, |item, data| {
        if item.at == chosen && extracted.is_none() {
            extracted = Some(copy_member(
                ctx,
                &item.name,
                data,
                out,
                &mut Cap::new(max_size),
            )?);
        }
        Ok(())
    })?;
    extracted.ok_or_else(|| ctx.corrupt("the archive changed between two reads".to_owned()))
}

/// A zstd stream of one or more frames (skippable frames skipped), each frame's content checksum
/// verified when it has one. ruzstd's own `StreamingDecoder` reads a single frame.
struct ZstdFrames<R: BufRead> {
    src: R,
    decoder: ruzstd::decoding::FrameDecoder,
    in_frame: bool,
}

impl<R: BufRead> ZstdFrames<R> {
    fn new(src: R) -> Self {
        Self {
            src,
            decoder: ruzstd::decoding::FrameDecoder::new(),
            in_frame: false,
        }
    }
}

impl<R: BufRead> Read for ZstdFrames<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use ruzstd::decoding::BlockDecodingStrategy;
        use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
        let invalid = |e: FrameDecoderError| io::Error::new(io::ErrorKind::InvalidData, e);
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.in_frame {
                while self.decoder.can_collect() == 0 && !self.decoder.is_finished() {
                    self.decoder
                        .decode_blocks(&mut self.src, BlockDecodingStrategy::UptoBlocks(1))
                        .map_err(invalid)?;
                }
                let n = self.decoder.read(buf)?;
                if n > 0 {
                    return Ok(n);
                }
                if let (Some(stored), Some(computed)) = (
                    self.decoder.get_checksum_from_data(),
                    self.decoder.get_calculated_checksum(),
                ) && stored != computed
                {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "zstd frame checksum mismatch: stored {stored:08x}, computed {computed:08x}"
                        ),
                    ));
                }
                self.in_frame = false;
            } else {
                if self.src.fill_buf()?.is_empty() {
                    return Ok(0);
                }
                match self.decoder.reset(&mut self.src) {
                    Ok(()) => self.in_frame = true,
                    Err(FrameDecoderError::ReadFrameHeaderError(
                        ReadFrameHeaderError::SkipFrame { length, .. },
                    )) => {
                        let length = u64::from(length);
                        let skipped = io::copy(&mut (&mut self.src).take(length), &mut io::sink())?;
                        if skipped != length {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "zstd skippable frame truncated",
                            ));
                        }
                    }
                    Err(e) => return Err(invalid(e)),
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// zip

fn zip_error(ctx: &Ctx<'_>, e: zip::result::ZipError) -> UnpackError {
    use zip::result::ZipError as Z;
    match e {
        Z::Io(e) => ctx.read_error(e),
        Z::UnsupportedArchive(what) => UnpackError::Unsupported {
            archive: ctx.archive.to_owned(),
            detail: what.to_owned(),
        },
        e @ (Z::CompressionMethodNotSupported(_) | Z::InvalidPassword) => {
            UnpackError::Unsupported {
                archive: ctx.archive.to_owned(),
                detail: e.to_string(),
            }
        }
        other => ctx.corrupt(other.to_string()),
    }
}

fn zip_kind(file: &zip::read::ZipFile<'_, impl Read>) -> EntryKind {
    if file.is_dir() {
        return EntryKind::Directory;
    }
    if file.is_symlink() {
        return EntryKind::Symlink;
    }
    match file.unix_mode().map(|m| m & 0o170_000) {
        Some(0o010_000) => EntryKind::Fifo,
        Some(0o020_000 | 0o060_000) => EntryKind::Device,
        Some(0o140_000) => EntryKind::Special, // socket
        _ => EntryKind::Regular,
    }
}

/// Longer than any symlink target a system accepts (PATH_MAX).
const MAX_LINK: u64 = 4096;

type Zip = zip::ZipArchive<BufReader<Tracked>>;

/// Open a zip archive and validate and list every entry from its central directory.
fn list_zip(ctx: &Ctx<'_>) -> Result<(Zip, Vec<Listed>), UnpackError> {
    let mut zip = zip::ZipArchive::new(ctx.open()?).map_err(|e| zip_error(ctx, e))?;
    let mut listed = Vec::with_capacity(zip.len());
    for i in 0..zip.len() {
        let (raw, kind, size, executable) = {
            let file = zip.by_index_raw(i).map_err(|e| zip_error(ctx, e))?;
            let raw = match file.name() {
                Ok(name) => name.into_owned(),
                Err(_) => String::from_utf8_lossy(file.name_raw()).into_owned(),
            };
            let executable = file.unix_mode().is_some_and(|m| m & 0o111 != 0);
            (raw, zip_kind(&file), file.size(), executable)
        };
        let name = check_name(&raw, kind)?;
        let mut target = None;
        if kind == EntryKind::Symlink {
            let mut bytes = Vec::new();
            zip.by_index(i)
                .map_err(|e| zip_error(ctx, e))?
                .take(MAX_LINK + 1)
                .read_to_end(&mut bytes)
                .map_err(|e| ctx.read_error(e))?;
            let link = String::from_utf8_lossy(&bytes).into_owned();
            if link.len() as u64 > MAX_LINK {
                return Err(ctx.corrupt(format!(
                    "symlink `{raw}` has a target longer than {MAX_LINK} bytes"
                )));
            }
            check_link(&raw, &name, kind, &link)?;
            target = Some(link);
        }
        if !name.is_empty() {
            listed.push(Listed {
                name,
                kind,
                at: i,
                size,
                executable,
                target,
            });
        }
    }
    Ok((zip, listed))
}

fn extract_zip(
    ctx: &Ctx<'_>,
    want: &Want<'_>,
    max_size: u64,
    out: &mut File,
) -> Result<Extracted, UnpackError> {
    let (mut zip, listed) = list_zip(ctx)?;
    let chosen = choose(&listed, want)?;
    let member = listed
        .iter()
        .find(|l| l.at == chosen)
        .map(|l| l.name.clone())
        .unwrap_or_default();
    let mut file = zip.by_index(chosen).map_err(|e| zip_error(ctx, e))?;
    copy_member(ctx, &member, &mut file, out, &mut Cap::new(max_size))
}

// ---------------------------------------------------------------------------------------------
// the whole archive

/// A regular file of an archive unpacked whole, handed to the caller of [`unpack_tree`].
pub struct Member<'a> {
    /// The member's normalized path in the archive: where it goes under the stage directory.
    pub name: &'a str,
    /// The archive gives it an execute bit.
    pub executable: bool,
    /// The member rules chose it as the daemon binary.
    pub daemon: bool,
    data: &'a mut dyn Read,
    ctx: &'a Ctx<'a>,
    cap: &'a mut Cap,
}

impl Member<'_> {
    /// Copy the member's bytes into `out` (a temp file), hashing them and counting them against
    /// the cap shared by the whole archive. On error `out` is left empty.
    pub fn copy_to(self, out: &mut File) -> Result<Extracted, UnpackError> {
        copy_member(self.ctx, self.name, self.data, out, self.cap)
    }
}

/// An entry of an archive unpacked whole.
pub enum TreeEntry<'a> {
    File(Member<'a>),
    /// A symlink whose target stays inside the archive, to recreate as is.
    Symlink {
        name: &'a str,
        target: &'a str,
    },
}

/// Unpack all of `archive`, as Cosmovisor unpacks a downloaded upgrade: every entry is validated
/// first (the checks of [`extract`], plus: nothing lies under a symlink or file of the archive,
/// no symlink climbs out through another), the daemon binary is chosen by [`extract`]'s member
/// rules, and the regular files unpack to at most `max_size` bytes in all. Then `visit` gets each
/// regular file in archive order, then each symlink. Directories are implied by the files;
/// hard links, fifos and devices are skipped (logged); so is any other entry at `bin` or
/// `bin/<daemon>`, where the chosen binary goes. Returns the chosen member's name.
pub fn unpack_tree<E: From<UnpackError>>(
    archive: &Path,
    kind: ArchiveKind,
    path: Option<&str>,
    daemon: &str,
    max_size: u64,
    mut visit: impl FnMut(TreeEntry<'_>) -> Result<(), E>,
) -> Result<String, E> {
    let want = Want::new(path, daemon);
    let ctx = Ctx {
        archive,
        kind,
        file_error: Rc::default(),
    };
    let mut cap = Cap::new(max_size);
    let (listed, plan) = match kind.codec() {
        Some(codec) => {
            let listed = walk_tar(&ctx, codec, |_, _| Ok::<_, UnpackError>(()))?;
            let plan = plan_tree(&ctx, &listed, &want, daemon, max_size)?;
            let again = walk_tar(&ctx, codec, |item, data| {
                if !plan.files.contains(&item.at) {
                    return Ok(());
                }
                if listed.get(item.at).map(|l| &l.name) != Some(&item.name) {
                    return Err(E::from(
                        ctx.corrupt("the archive changed between two reads".to_owned()),
                    ));
                }
                visit(TreeEntry::File(Member {
                    name: &item.name,
                    executable: item.executable,
                    daemon: item.at == plan.chosen,
                    data,
                    ctx: &ctx,
                    cap: &mut cap,
                }))
            })?;
            if again.len() != listed.len() {
                return Err(E::from(
                    ctx.corrupt("the archive changed between two reads".to_owned()),
                ));
            }
            (listed, plan)
        }
        None => {
            let (mut zip, listed) = list_zip(&ctx)?;
            let plan = plan_tree(&ctx, &listed, &want, daemon, max_size)?;
            for item in listed.iter().filter(|l| plan.files.contains(&l.at)) {
                let mut data = zip.by_index(item.at).map_err(|e| zip_error(&ctx, e))?;
                visit(TreeEntry::File(Member {
                    name: &item.name,
                    executable: item.executable,
                    daemon: item.at == plan.chosen,
                    data: &mut data,
                    ctx: &ctx,
                    cap: &mut cap,
                }))?;
            }
            (listed, plan)
        }
    };
    // Last, so that no file is ever written through a link this archive made.
    for item in listed.iter().filter(|l| plan.symlinks.contains(&l.at)) {
        let target = item.target.as_deref().unwrap_or_default();
        visit(TreeEntry::Symlink {
            name: &item.name,
            target,
        })?;
    }
    let chosen = listed.iter().find(|l| l.at == plan.chosen);
    Ok(chosen.map(|l| l.name.clone()).unwrap_or_default())
}

/// Which entries [`unpack_tree`] writes, by `at`.
struct TreePlan {
    chosen: usize,
    files: HashSet<usize>,
    symlinks: HashSet<usize>,
}

/// Decide what to write, and refuse the archive before anything is written when that would be
/// unsafe or more than `max_size` bytes by the archive's own account.
fn plan_tree(
    ctx: &Ctx<'_>,
    listed: &[Listed],
    want: &Want<'_>,
    daemon: &str,
    max_size: u64,
) -> Result<TreePlan, UnpackError> {
    let chosen = choose(listed, want)?;
    let bin = format!("bin/{daemon}");
    let mut plan = TreePlan {
        chosen,
        files: Default::default(),
        symlinks: Default::default(),
    };
    let mut written: BTreeMap<&str, usize> = BTreeMap::new();
    for item in listed {
        let kept = match item.kind {
            EntryKind::Directory => continue,
            EntryKind::Regular | EntryKind::Symlink
                if item.at != chosen && (item.name == bin || item.name == "bin") =>
            {
                tracing::debug!(
                    "not unpacking `{}`: {bin} is where the daemon binary goes",
                    item.name
                );
                continue;
            }
            EntryKind::Regular => &mut plan.files,
            EntryKind::Symlink => &mut plan.symlinks,
            EntryKind::HardLink => {
                tracing::warn!(
                    "not unpacking `{}`: a hard link (to `{}`); cvx unpacks regular files and symlinks",
                    item.name,
                    item.target.as_deref().unwrap_or_default()
                );
                continue;
            }
            other => {
                tracing::debug!("not unpacking `{}`: {other}", item.name);
                continue;
            }
        };
        kept.insert(item.at);
        *written.entry(&item.name).or_default() += 1;
    }
    if let Some((name, count)) = written.iter().find(|(_, n)| **n > 1) {
        return Err(UnpackError::Duplicate {
            member: (*name).to_owned(),
            count: *count,
        });
    }
    let links: HashSet<&str> = listed
        .iter()
        .filter(|l| plan.symlinks.contains(&l.at))
        .map(|l| l.name.as_str())
        .collect();
    let kept = |l: &&Listed| plan.files.contains(&l.at) || plan.symlinks.contains(&l.at);
    for item in listed.iter().filter(kept) {
        let mut parent = item.name.as_str();
        while let Some((up, _)) = parent.rsplit_once('/') {
            if written.contains_key(up) {
                return Err(UnpackError::UnsafeEntry {
                    entry: item.name.clone(),
                    reason: UnsafeReason::UnderNonDirectory {
                        parent: up.to_owned(),
                    },
                });
            }
            parent = up;
        }
        if let Some(target) = item
            .target
            .as_deref()
            .filter(|_| plan.symlinks.contains(&item.at))
            && let Some(link) = climbs_through(&item.name, target, &links)
        {
            return Err(UnpackError::UnsafeEntry {
                entry: item.name.clone(),
                reason: UnsafeReason::SymlinkThroughLink {
                    target: target.to_owned(),
                    link,
                },
            });
        }
    }
    let mut declared = Cap::new(max_size);
    for item in listed.iter().filter(|l| plan.files.contains(&l.at)) {
        declared.used = declared.used.saturating_add(item.size);
        if declared.used > max_size {
            return Err(declared.too_large(ctx, &item.name));
        }
    }
    Ok(plan)
}

/// The archive symlink that a `..` in the target of symlink `name` would climb out of, if any.
/// `..` after a symlink leaves from the link's target, not from where the path seems to be, so
/// the lexical check of [`stays_inside`] holds only for targets that never do that.
fn climbs_through(name: &str, target: &str, links: &HashSet<&str>) -> Option<String> {
    let mut path: Vec<&str> = name.split('/').collect();
    path.pop();
    let mut through = None;
    for c in target.split(['/', '\\']) {
        match c {
            "" | "." => {}
            ".." => {
                if through.is_some() {
                    return through;
                }
                path.pop();
            }
            _ => {
                path.push(c);
                let here = path.join("/");
                if links.contains(here.as_str()) {
                    through = Some(here);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_suffix_table_covers_the_manifests_archive_suffixes() {
        let suffixes: Vec<&str> = super::SUFFIXES.iter().map(|(s, _)| *s).collect();
        assert_eq!(suffixes, crate::manifest::ARCHIVE_SUFFIXES);
    }

    use super::*;
    use std::io::Cursor;

    // ---- archive builders -------------------------------------------------------------------

    #[derive(Clone, Copy)]
    enum E<'a> {
        /// A regular file with mode 0755.
        File(&'a str, &'a [u8]),
        /// A regular file with mode 0644.
        Plain(&'a str, &'a [u8]),
        Dir(&'a str),
        Symlink(&'a str, &'a str),
        HardLink(&'a str, &'a str),
        /// A regular file whose name bytes are written into the header as is (the tar crate's
        /// `set_path` refuses `..` and absolute paths, which is what these tests need to craft).
        RawFile(&'a str, &'a [u8]),
        /// A regular file named by a GNU long-name entry (`L`) before it, as is.
        GnuLongName(&'a str, &'a [u8]),
        /// A regular file named by a PAX `path` record before it, as is.
        PaxPath(&'a str, &'a [u8]),
    }

    fn tar(entries: &[E<'_>]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o755);
            h.set_mtime(0);
            match e {
                E::File(name, data) | E::Plain(name, data) => {
                    if matches!(e, E::Plain(..)) {
                        h.set_mode(0o644);
                    }
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(data.len() as u64);
                    b.append_data(&mut h, name, *data).unwrap();
                }
                E::Dir(name) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    b.append_data(&mut h, name, &[][..]).unwrap();
                }
                E::Symlink(name, target) | E::HardLink(name, target) => {
                    h.set_entry_type(if matches!(e, E::Symlink(..)) {
                        tar::EntryType::Symlink
                    } else {
                        tar::EntryType::Link
                    });
                    h.set_size(0);
                    h.set_link_name_literal(target).unwrap();
                    h.set_path(name).unwrap();
                    h.set_cksum();
                    b.append(&h, &[][..]).unwrap();
                }
                E::GnuLongName(name, data) | E::PaxPath(name, data) => {
                    let (mut ext, ty, body) = match e {
                        E::GnuLongName(..) => (
                            tar::Header::new_gnu(),
                            tar::EntryType::GNULongName,
                            [name.as_bytes(), b"\0"].concat(),
                        ),
                        _ => {
                            let record = format!(" path={name}\n");
                            // The length counts its own digits.
                            let mut len = record.len();
                            while len.to_string().len() + record.len() != len {
                                len = len.to_string().len() + record.len();
                            }
                            let record = format!("{len}{record}");
                            assert_eq!(record.len(), len, "pax record length");
                            (
                                tar::Header::new_ustar(),
                                tar::EntryType::XHeader,
                                record.into_bytes(),
                            )
                        }
                    };
                    ext.set_entry_type(ty);
                    ext.set_size(body.len() as u64);
                    ext.set_path("ext").unwrap();
                    ext.set_cksum();
                    b.append(&ext, &body[..]).unwrap();
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(data.len() as u64);
                    h.set_path("placeholder").unwrap();
                    h.set_cksum();
                    b.append(&h, *data).unwrap();
                }
                E::RawFile(name, data) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(data.len() as u64);
                    let field = &mut h.as_old_mut().name;
                    field.fill(0);
                    field[..name.len()].copy_from_slice(name.as_bytes());
                    h.set_cksum();
                    b.append(&h, *data).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn xz(data: &[u8]) -> Vec<u8> {
        let mut enc =
            lzma_rust2::XzWriter::new(Vec::new(), lzma_rust2::XzOptions::with_preset(1)).unwrap();
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn zst(data: &[u8]) -> Vec<u8> {
        ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
    }

    fn compress(kind: ArchiveKind, tar: &[u8]) -> Vec<u8> {
        match kind {
            ArchiveKind::TarGz => gz(tar),
            ArchiveKind::TarXz => xz(tar),
            ArchiveKind::TarZst => zst(tar),
            ArchiveKind::Zip => unreachable!("zip is built by `zip_archive()`"),
        }
    }

    fn zip_archive(entries: &[E<'_>]) -> Vec<u8> {
        use zip::write::SimpleFileOptions;
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let opts = SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .unix_permissions(0o755);
        for e in entries {
            match e {
                E::File(name, data) | E::RawFile(name, data) => {
                    w.start_file(*name, opts).unwrap();
                    w.write_all(data).unwrap();
                }
                E::Plain(name, data) => {
                    w.start_file(*name, opts.unix_permissions(0o644)).unwrap();
                    w.write_all(data).unwrap();
                }
                E::Dir(name) => w.add_directory(*name, opts).unwrap(),
                E::Symlink(name, target) => w.add_symlink(*name, *target, opts).unwrap(),
                E::HardLink(..) | E::GnuLongName(..) | E::PaxPath(..) => {
                    unreachable!("tar only")
                }
            }
        }
        w.finish().unwrap().into_inner()
    }

    /// No size limit worth the name, for the tests about something else.
    const NO_CAP: u64 = u64::MAX;

    const TAR_KINDS: [ArchiveKind; 3] =
        [ArchiveKind::TarGz, ArchiveKind::TarXz, ArchiveKind::TarZst];
    const ALL_KINDS: [ArchiveKind; 4] = [
        ArchiveKind::TarGz,
        ArchiveKind::TarXz,
        ArchiveKind::TarZst,
        ArchiveKind::Zip,
    ];

    fn build(kind: ArchiveKind, entries: &[E<'_>]) -> Vec<u8> {
        match kind {
            ArchiveKind::Zip => zip_archive(entries),
            _ => compress(kind, &tar(entries)),
        }
    }

    struct Run {
        _dir: tempfile::TempDir,
        result: Result<Extracted, UnpackError>,
        out: Vec<u8>,
    }

    fn run_bytes(kind: ArchiveKind, bytes: &[u8], path: Option<&str>) -> Run {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("artifact");
        std::fs::write(&archive, bytes).unwrap();
        let out_path = dir.path().join("out.tmp");
        let mut out = File::create(&out_path).unwrap();
        let result = extract(&archive, kind, path, "osmosisd", NO_CAP, &mut out);
        drop(out);
        let out = std::fs::read(&out_path).unwrap();
        Run {
            _dir: dir,
            result,
            out,
        }
    }

    fn run(kind: ArchiveKind, entries: &[E<'_>], path: Option<&str>) -> Run {
        run_bytes(kind, &build(kind, entries), path)
    }

    fn sha(bytes: &[u8]) -> String {
        let mut h = Sha256::new();
        h.update(bytes);
        h.finish()
    }

    /// Extraction succeeded with `member`, and the bytes and their digest are `want`'s.
    fn assert_extracted(r: &Run, member: &str, want: &[u8], what: &str) {
        let got = r.result.as_ref().unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(got.member, member, "{what}");
        assert_eq!(got.size, want.len() as u64, "{what}");
        assert_eq!(got.sha256, sha(want), "{what}");
        assert_eq!(r.out, want, "{what}");
    }

    /// Extraction failed and left `out` empty.
    fn err(r: Run, what: &str) -> UnpackError {
        assert!(r.out.is_empty(), "{what}: out not empty after an error");
        match r.result {
            Ok(x) => panic!("{what}: expected an error, extracted {x:?}"),
            Err(e) => e,
        }
    }

    // ---- detect --------------------------------------------------------------------------------

    #[test]
    fn detects_each_format_by_content_despite_a_misleading_name() {
        let dir = tempfile::tempdir().unwrap();
        for kind in ALL_KINDS {
            let file = dir.path().join("x");
            std::fs::write(&file, build(kind, &[E::File("osmosisd", b"bin")])).unwrap();
            for hint in [
                "osmosisd",
                "https://h/osmosisd.tar.gz",
                "a.zip",
                "b.tar.zst",
            ] {
                assert_eq!(
                    detect(&file, hint).unwrap(),
                    Some(kind),
                    "{kind} named {hint}"
                );
            }
        }
    }

    #[test]
    fn detects_by_name_when_content_has_no_magic() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("x");
        std::fs::write(&file, b"\x7fELF not an archive").unwrap();
        let cases = [
            (
                "https://h/p/osmosisd-26.0.0-linux-amd64.tar.gz",
                Some(ArchiveKind::TarGz),
            ),
            ("o.TGZ", Some(ArchiveKind::TarGz)),
            ("o.tar.xz", Some(ArchiveKind::TarXz)),
            ("o.txz", Some(ArchiveKind::TarXz)),
            ("o.tar.zst", Some(ArchiveKind::TarZst)),
            ("o.tzst", Some(ArchiveKind::TarZst)),
            ("https://h/o.zip?raw=1#x", Some(ArchiveKind::Zip)),
            ("https://h/osmosisd-26.0.0-linux-amd64", None),
            ("o.gz", None),
            ("", None),
        ];
        for (hint, want) in cases {
            assert_eq!(detect(&file, hint).unwrap(), want, "{hint}");
        }
        // Shorter than any magic, and empty.
        std::fs::write(&file, b"\x1f").unwrap();
        assert_eq!(detect(&file, "osmosisd").unwrap(), None);
        std::fs::write(&file, b"").unwrap();
        assert_eq!(detect(&file, "o.zip").unwrap(), Some(ArchiveKind::Zip));
        assert!(detect(&dir.path().join("missing"), "o.zip").is_err());
    }

    // ---- member rules --------------------------------------------------------------------------

    #[test]
    fn path_picks_that_member_with_or_without_dot_slash() {
        let layout = [
            E::Dir("osmosisd-26.0.0/"),
            E::File("./osmosisd-26.0.0/bin/osmosisd", b"the daemon"),
            E::File("osmosisd-26.0.0/lib/libwasmvm.so", b"lib"),
            E::File("osmosisd", b"decoy"),
        ];
        for kind in ALL_KINDS {
            for path in [
                "osmosisd-26.0.0/bin/osmosisd",
                "./osmosisd-26.0.0/bin/osmosisd",
            ] {
                let r = run(kind, &layout, Some(path));
                assert_extracted(
                    &r,
                    "osmosisd-26.0.0/bin/osmosisd",
                    b"the daemon",
                    &format!("{kind} {path}"),
                );
            }
            let e = err(run(kind, &layout, Some("bin/osmosisd")), "missing path");
            assert!(
                matches!(&e, UnpackError::NoSuchMember { wanted, .. } if wanted == "bin/osmosisd"),
                "{kind}: {e:?}"
            );
            let msg = e.to_string();
            assert!(msg.contains("no member `bin/osmosisd` in archive"), "{msg}");
            assert!(msg.contains("osmosisd-26.0.0/lib/libwasmvm.so"), "{msg}");
            assert!(msg.contains("set `path`"), "{msg}");
            let e = err(run(kind, &layout, Some("osmosisd-26.0.0")), "dir as path");
            assert!(
                matches!(
                    e,
                    UnpackError::NotRegular {
                        kind: EntryKind::Directory,
                        ..
                    }
                ),
                "{kind}: {e:?}"
            );
        }
    }

    #[test]
    fn the_only_regular_file_is_chosen_whatever_its_name() {
        for kind in ALL_KINDS {
            let r = run(
                kind,
                &[
                    E::Dir("dist/"),
                    E::File("dist/osmosisd-26.0.0-linux-amd64", b"only"),
                ],
                None,
            );
            assert_extracted(
                &r,
                "dist/osmosisd-26.0.0-linux-amd64",
                b"only",
                kind.as_str(),
            );
        }
    }

    #[test]
    fn bin_daemon_then_daemon() {
        for kind in ALL_KINDS {
            // bin/<daemon> wins over <daemon>, whichever comes first.
            for layout in [
                [
                    E::File("osmosisd", b"top"),
                    E::File("README.md", b"r"),
                    E::File("./bin/osmosisd", b"bin"),
                ],
                [
                    E::File("bin/osmosisd", b"bin"),
                    E::File("osmosisd", b"top"),
                    E::File("README.md", b"r"),
                ],
            ] {
                let r = run(kind, &layout, None);
                assert_extracted(&r, "bin/osmosisd", b"bin", kind.as_str());
            }
            // Then <daemon>, even after other files were seen.
            let r = run(
                kind,
                &[
                    E::File("README.md", b"r"),
                    E::File("LICENSE", b"l"),
                    E::File("./osmosisd", b"top"),
                ],
                None,
            );
            assert_extracted(&r, "osmosisd", b"top", kind.as_str());
            // A single top-level directory is NOT stripped.
            let e = err(
                run(
                    kind,
                    &[
                        E::File("osmosisd-26/bin/osmosisd", b"x"),
                        E::File("osmosisd-26/README", b"r"),
                    ],
                    None,
                ),
                "top-level dir",
            );
            assert!(matches!(e, UnpackError::Ambiguous { .. }), "{kind}: {e:?}");
        }
    }

    #[test]
    fn ambiguous_archive_lists_its_members() {
        for kind in ALL_KINDS {
            let e = err(
                run(
                    kind,
                    &[
                        E::File("a", b"1"),
                        E::Dir("d/"),
                        E::File("d/b", b"2"),
                        E::File("c", b"3"),
                    ],
                    None,
                ),
                "ambiguous",
            );
            let UnpackError::Ambiguous { daemon, members } = &e else {
                panic!("{kind}: {e:?}");
            };
            assert_eq!(daemon, "osmosisd");
            assert_eq!(members, &["a", "d/b", "c"]);
            assert_eq!(
                e.to_string(),
                "archive holds 3 regular files and none is `bin/osmosisd` or `osmosisd`; \
                 set `path` in the manifest to the one to install: a, d/b, c"
            );
        }
    }

    #[test]
    fn long_member_lists_are_cut_in_the_message_only() {
        let names: Vec<String> = (0..30).map(|i| format!("f{i:02}")).collect();
        let layout: Vec<E<'_>> = names.iter().map(|n| E::File(n, b"x")).collect();
        let e = err(run(ArchiveKind::TarGz, &layout, None), "many");
        let UnpackError::Ambiguous { members, .. } = &e else {
            panic!("{e:?}");
        };
        assert_eq!(members.len(), 30);
        let msg = e.to_string();
        assert!(msg.contains("f19, … and 10 more"), "{msg}");
        assert!(!msg.contains("f20"), "{msg}");
    }

    #[test]
    fn empty_archive_and_duplicates() {
        for kind in ALL_KINDS {
            let e = err(run(kind, &[E::Dir("bin/")], None), "empty");
            assert!(matches!(e, UnpackError::Empty), "{kind}: {e:?}");
        }
        // Zip refuses duplicate names when writing; tar can hold them.
        for kind in TAR_KINDS {
            let layout = [
                E::File("bin/osmosisd", b"one"),
                E::File("./bin/osmosisd", b"two"),
                E::File("x", b""),
            ];
            let e = err(run(kind, &layout, None), "duplicate");
            assert!(
                matches!(&e, UnpackError::Duplicate { member, count: 2 } if member == "bin/osmosisd"),
                "{kind}: {e:?}"
            );
            let e = err(run(kind, &layout, Some("bin/osmosisd")), "duplicate path");
            assert!(
                matches!(e, UnpackError::Duplicate { count: 2, .. }),
                "{kind}: {e:?}"
            );
        }
    }

    #[test]
    fn a_symlink_is_never_the_chosen_member() {
        for kind in ALL_KINDS {
            let layout = [
                E::File("osmosisd-26", b"real"),
                E::File("README", b"r"),
                E::Symlink("bin/osmosisd", "../osmosisd-26"),
            ];
            let e = err(run(kind, &layout, None), "symlink bin/<daemon>");
            assert!(
                matches!(&e, UnpackError::NotRegular { member, kind: EntryKind::Symlink } if member == "bin/osmosisd"),
                "{kind}: {e:?}"
            );
            assert_eq!(
                e.to_string(),
                "member `bin/osmosisd` is a symlink, not a regular file"
            );
            let e = err(run(kind, &layout, Some("bin/osmosisd")), "symlink path");
            assert!(
                matches!(
                    e,
                    UnpackError::NotRegular {
                        kind: EntryKind::Symlink,
                        ..
                    }
                ),
                "{kind}: {e:?}"
            );
            // An inside symlink next to a single regular file is fine: rule 1 picks the file.
            let r = run(
                kind,
                &[
                    E::File("osmosisd-26", b"real"),
                    E::Symlink("osmosisd", "osmosisd-26"),
                ],
                None,
            );
            assert_extracted(&r, "osmosisd-26", b"real", kind.as_str());
        }
        for kind in TAR_KINDS {
            let layout = [
                E::File("osmosisd-26", b"real"),
                E::File("README", b"r"),
                E::HardLink("osmosisd", "osmosisd-26"),
            ];
            let e = err(run(kind, &layout, None), "hard link <daemon>");
            assert!(
                matches!(
                    e,
                    UnpackError::NotRegular {
                        kind: EntryKind::HardLink,
                        ..
                    }
                ),
                "{kind}: {e:?}"
            );
        }
    }

    // ---- hostile archives ----------------------------------------------------------------------

    fn assert_refused(e: &UnpackError, entry: &str, reason: &UnsafeReason, what: &str) {
        match e {
            UnpackError::UnsafeEntry {
                entry: got,
                reason: why,
            } => {
                assert_eq!(got, entry, "{what}");
                assert_eq!(why, reason, "{what}");
            }
            other => panic!("{what}: expected UnsafeEntry, got {other:?}"),
        }
    }

    #[test]
    fn tar_escapes_refuse_the_whole_archive() {
        let good = E::File("bin/osmosisd", b"daemon");
        let cases: Vec<(E<'_>, &str, UnsafeReason)> = vec![
            (
                E::RawFile("../../etc/passwd", b"x"),
                "../../etc/passwd",
                UnsafeReason::ParentDir,
            ),
            (
                E::RawFile("bin/../../x", b"x"),
                "bin/../../x",
                UnsafeReason::ParentDir,
            ),
            (
                E::RawFile("a/../b", b"x"),
                "a/../b",
                UnsafeReason::ParentDir,
            ),
            (E::RawFile("..\\x", b"x"), "..\\x", UnsafeReason::ParentDir),
            (
                E::RawFile("/etc/passwd", b"x"),
                "/etc/passwd",
                UnsafeReason::Absolute,
            ),
            (
                E::Symlink("lib/evil", "../../x"),
                "lib/evil",
                UnsafeReason::SymlinkOut {
                    target: "../../x".into(),
                },
            ),
            (
                E::Symlink("evil", "/etc/passwd"),
                "evil",
                UnsafeReason::SymlinkOut {
                    target: "/etc/passwd".into(),
                },
            ),
            (
                E::Symlink("evil", ".."),
                "evil",
                UnsafeReason::SymlinkOut {
                    target: "..".into(),
                },
            ),
            (
                E::HardLink("evil", "../x"),
                "evil",
                UnsafeReason::HardLinkOut {
                    target: "../x".into(),
                },
            ),
            (
                E::HardLink("evil", "/etc/shadow"),
                "evil",
                UnsafeReason::HardLinkOut {
                    target: "/etc/shadow".into(),
                },
            ),
            // The classic bypasses: a name that only the extension entry carries.
            (
                E::GnuLongName(LONG_EVIL, b"x"),
                LONG_EVIL,
                UnsafeReason::ParentDir,
            ),
            (
                E::PaxPath("../evil", b"x"),
                "../evil",
                UnsafeReason::ParentDir,
            ),
            (
                E::PaxPath("/etc/cron.d/x", b"x"),
                "/etc/cron.d/x",
                UnsafeReason::Absolute,
            ),
        ];
        for kind in TAR_KINDS {
            for (bad, entry, reason) in &cases {
                // Before and after the member that would be chosen: nothing is left in `out`.
                for layout in [[bad, &good], [&good, bad]] {
                    let entries: Vec<E<'_>> = layout.iter().map(|e| **e).collect();
                    for path in [None, Some("bin/osmosisd")] {
                        let e = err(run(kind, &entries, path), entry);
                        assert_refused(&e, entry, reason, &format!("{kind} {entry} {path:?}"));
                    }
                }
            }
        }
        let e = err(
            run(
                ArchiveKind::TarGz,
                &[E::RawFile("../../etc/passwd", b"x")],
                None,
            ),
            "msg",
        );
        assert_eq!(
            e.to_string(),
            "archive entry `../../etc/passwd` escapes the archive; refusing the whole archive"
        );
    }

    const LONG_EVIL: &str = "a/../../../../../../../../../../../../../../../../../../../../../../\
                             ../../../../../../../../../../../../../../../../../../../etc/evil";

    #[test]
    fn names_from_extension_entries_and_dot_slash_are_honoured() {
        assert!(LONG_EVIL.len() > 100);
        let long = format!("{}/bin/osmosisd", "d".repeat(120));
        for kind in TAR_KINDS {
            let r = run(
                kind,
                &[E::File("README", b"r"), E::GnuLongName(&long, b"long")],
                Some(&long),
            );
            assert_extracted(&r, &long, b"long", kind.as_str());
            let r = run(
                kind,
                &[E::File("README", b"r"), E::PaxPath("./osmosisd", b"pax")],
                None,
            );
            assert_extracted(&r, "osmosisd", b"pax", kind.as_str());
            let r = run(
                kind,
                &[
                    E::File("README", b"r"),
                    E::RawFile("./bin/osmosisd", b"raw"),
                ],
                Some("./bin/osmosisd"),
            );
            assert_extracted(&r, "bin/osmosisd", b"raw", kind.as_str());
        }
    }

    #[test]
    fn links_that_stay_inside_are_accepted() {
        for kind in TAR_KINDS {
            let r = run(
                kind,
                &[
                    E::File("osmosisd-26/bin/osmosisd", b"d"),
                    E::Symlink("osmosisd-26/lib/up", "../bin/osmosisd"),
                    E::Symlink("osmosisd-26/self", "."),
                    E::HardLink("osmosisd-26/bin/copy", "osmosisd-26/bin/osmosisd"),
                ],
                Some("osmosisd-26/bin/osmosisd"),
            );
            assert_extracted(&r, "osmosisd-26/bin/osmosisd", b"d", kind.as_str());
        }
    }

    /// Replace `from` by `to` (same length) everywhere in a built archive: zip writers refuse to
    /// write hostile names, and the names are not covered by any checksum.
    fn patch(mut bytes: Vec<u8>, from: &[u8], to: &[u8]) -> Vec<u8> {
        assert_eq!(from.len(), to.len());
        let mut hits = 0;
        let mut i = 0;
        while i + from.len() <= bytes.len() {
            if &bytes[i..i + from.len()] == from {
                bytes[i..i + from.len()].copy_from_slice(to);
                hits += 1;
                i += from.len();
            } else {
                i += 1;
            }
        }
        assert!(
            hits >= 2,
            "expected the name in the local and central headers"
        );
        bytes
    }

    #[test]
    fn zip_escapes_refuse_the_whole_archive() {
        let zip_with =
            |name: &str| zip_archive(&[E::File("bin/osmosisd", b"daemon"), E::File(name, b"x")]);
        let cases = [
            ("xx/xx/evil", "../../evil", UnsafeReason::ParentDir),
            ("xx\\evil", "..\\evil", UnsafeReason::ParentDir),
            ("xetc/passwd", "/etc/passwd", UnsafeReason::Absolute),
            ("xxWindows", "C:Windows", UnsafeReason::Absolute),
        ];
        for (placeholder, hostile, reason) in cases {
            let bytes = patch(
                zip_with(placeholder),
                placeholder.as_bytes(),
                hostile.as_bytes(),
            );
            for path in [None, Some("bin/osmosisd")] {
                let e = err(run_bytes(ArchiveKind::Zip, &bytes, path), hostile);
                assert_refused(&e, hostile, &reason, hostile);
            }
        }
        for (target, reason) in [
            (
                "../../x",
                UnsafeReason::SymlinkOut {
                    target: "../../x".into(),
                },
            ),
            (
                "/etc/passwd",
                UnsafeReason::SymlinkOut {
                    target: "/etc/passwd".into(),
                },
            ),
        ] {
            let e = err(
                run(
                    ArchiveKind::Zip,
                    &[
                        E::File("bin/osmosisd", b"d"),
                        E::Symlink("lib/evil", target),
                    ],
                    None,
                ),
                target,
            );
            assert_refused(&e, "lib/evil", &reason, target);
        }
    }

    #[test]
    fn extracted_digest_is_that_of_the_original_bytes() {
        // Big enough to span several read buffers and compressed blocks; not compressible to nothing.
        let mut body = Vec::with_capacity(3 * BUF + 17);
        let mut x: u32 = 0x1234_5678;
        while body.len() < 3 * BUF + 17 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            body.extend_from_slice(&x.to_le_bytes()[..(x % 4) as usize]);
            body.extend_from_slice(b"osmosis");
        }
        for kind in ALL_KINDS {
            let r = run(
                kind,
                &[E::File("README", b"r"), E::File("bin/osmosisd", &body)],
                None,
            );
            assert_extracted(&r, "bin/osmosisd", &body, kind.as_str());
            assert_eq!(
                r.result.unwrap().sha256,
                crate::hash::sha256_reader(&body[..]).unwrap().0
            );
        }
    }

    #[test]
    fn a_worse_candidate_written_first_is_replaced() {
        // The first regular file is written speculatively, then replaced by bin/<daemon>.
        for kind in TAR_KINDS {
            let big = vec![7u8; BUF + 1];
            let r = run(
                kind,
                &[
                    E::File("lib/libwasmvm.so", &big),
                    E::File("bin/osmosisd", b"short"),
                ],
                None,
            );
            assert_extracted(&r, "bin/osmosisd", b"short", kind.as_str());
        }
    }

    #[test]
    fn the_second_pass_extracts_by_ordinal() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a.tar.gz");
        std::fs::write(
            &archive,
            gz(&tar(&[
                E::File("a", b"first"),
                E::Dir("d/"),
                E::File("d/b", b"second"),
            ])),
        )
        .unwrap();
        let ctx = Ctx {
            archive: &archive,
            kind: ArchiveKind::TarGz,
            file_error: Rc::default(),
        };
        let mut out = tempfile::tempfile().unwrap();
        out.write_all(b"stale bytes from before").unwrap();
        let x = second_pass(&ctx, Codec::Gz, 2, NO_CAP, &mut out).unwrap();
        assert_eq!((x.member.as_str(), x.size), ("d/b", 6));
        let mut got = Vec::new();
        out.seek(SeekFrom::Start(0)).unwrap();
        out.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"second");
        assert!(matches!(
            second_pass(&ctx, Codec::Gz, 9, NO_CAP, &mut out),
            Err(UnpackError::Corrupt { .. })
        ));
    }

    // ---- corrupt input -------------------------------------------------------------------------

    #[test]
    fn corrupt_gzip_is_an_error_not_a_panic() {
        let good = build(
            ArchiveKind::TarGz,
            &[E::File("bin/osmosisd", &[0x5a; 5000])],
        );
        let mut flipped = good.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0xff;
        let mut bad_crc = good.clone();
        let n = bad_crc.len();
        bad_crc[n - 8] ^= 0x01; // the CRC32 in the trailer
        for (what, bytes) in [
            ("flipped", flipped),
            ("bad crc", bad_crc),
            ("truncated", good[..good.len() / 2].to_vec()),
            ("header only", good[..10].to_vec()),
            ("garbage", [&[0x1f, 0x8b][..], &[0xff; 64][..]].concat()),
        ] {
            let e = err(run_bytes(ArchiveKind::TarGz, &bytes, None), what);
            assert!(
                matches!(
                    e,
                    UnpackError::Corrupt {
                        kind: ArchiveKind::TarGz,
                        ..
                    }
                ),
                "{what}: {e:?}"
            );
        }
    }

    #[test]
    fn a_compressed_single_file_is_not_a_tar() {
        let e = err(
            run_bytes(ArchiveKind::TarGz, &gz(&[0x7f; 2000]), None),
            "gz binary",
        );
        let msg = e.to_string();
        assert!(matches!(e, UnpackError::Corrupt { .. }), "{e:?}");
        assert!(msg.contains("not a tar archive"), "{msg}");
    }

    #[test]
    fn corrupt_or_truncated_archives_never_panic() {
        let body: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for kind in ALL_KINDS {
            let good = build(
                kind,
                &[E::File("README", b"r"), E::File("bin/osmosisd", &body)],
            );
            let step = (good.len() / 40).max(1);
            for at in (0..good.len()).step_by(step) {
                let mut flipped = good.clone();
                flipped[at] ^= 0x55;
                for bytes in [flipped, good[..at].to_vec()] {
                    let r = run_bytes(kind, &bytes, None);
                    // Either refused, or (a flip in a field nothing checks) the right bytes.
                    if let Ok(x) = &r.result {
                        assert_eq!(x.sha256, sha(&body), "{kind} at {at}: wrong bytes accepted");
                    }
                }
            }
        }
    }

    #[test]
    fn zstd_multiple_frames_skippable_frames_and_checksums() {
        let t = tar(&[
            E::File("README", b"r"),
            E::File("bin/osmosisd", &[0x42; 3000]),
        ]);
        let (a, b) = t.split_at(700);
        let skippable = [&[0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0][..], b"abc"].concat();
        let stream = [zst(a), skippable, zst(b)].concat();
        let r = run_bytes(ArchiveKind::TarZst, &stream, None);
        assert_extracted(&r, "bin/osmosisd", &[0x42; 3000], "multi-frame");

        let mut bad = zst(&t);
        let n = bad.len();
        bad[n - 1] ^= 0x01; // the frame's content checksum
        let e = err(run_bytes(ArchiveKind::TarZst, &bad, None), "checksum");
        assert!(e.to_string().contains("checksum"), "{e}");
    }

    #[test]
    fn a_missing_archive_is_a_read_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut out = tempfile::tempfile().unwrap();
        for kind in ALL_KINDS {
            let e = extract(
                &dir.path().join("gone"),
                kind,
                None,
                "osmosisd",
                NO_CAP,
                &mut out,
            )
            .unwrap_err();
            assert!(
                matches!(&e, UnpackError::Read { source, .. } if source.kind() == io::ErrorKind::NotFound),
                "{e:?}"
            );
            assert!(e.to_string().starts_with("cannot read archive `"), "{e}");
        }
    }

    #[test]
    fn a_failing_file_read_is_a_read_error_not_corruption() {
        // A directory opens on Linux but every read fails with EISDIR.
        let dir = tempfile::tempdir().unwrap();
        let mut out = tempfile::tempfile().unwrap();
        for kind in ALL_KINDS {
            let e = extract(dir.path(), kind, None, "osmosisd", NO_CAP, &mut out).unwrap_err();
            assert!(matches!(e, UnpackError::Read { .. }), "{kind}: {e:?}");
        }
    }

    // ---- the size cap --------------------------------------------------------------------------

    const MIB: u64 = 1 << 20;

    /// A reader that counts what was taken from it.
    struct Counted<R> {
        inner: R,
        read: u64,
    }

    impl<R: Read> Read for Counted<R> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.read += n as u64;
            Ok(n)
        }
    }

    fn test_ctx(archive: &Path) -> Ctx<'_> {
        Ctx {
            archive,
            kind: ArchiveKind::TarGz,
            file_error: Rc::default(),
        }
    }

    #[test]
    fn the_copy_stops_at_the_cap_and_leaves_nothing() {
        // An endless member: without the cap this would fill the disk.
        let ctx = test_ctx(Path::new("bomb.tar.gz"));
        let mut data = Counted {
            inner: io::repeat(0),
            read: 0,
        };
        let mut out = tempfile::tempfile().unwrap();
        let mut cap = Cap::new(MIB);
        let e = copy_member(&ctx, "bin/osmosisd", &mut data, &mut out, &mut cap).unwrap_err();
        assert!(
            matches!(&e, UnpackError::TooLarge { member, max, .. } if member == "bin/osmosisd" && *max == MIB),
            "{e:?}"
        );
        assert!(data.read <= MIB + BUF as u64, "read {} bytes", data.read);
        assert_eq!(out.metadata().unwrap().len(), 0, "out not emptied");
        assert_eq!(cap.used, 0);
    }

    #[test]
    fn one_cap_counts_every_file_of_an_unpack() {
        let ctx = test_ctx(Path::new("a.zip"));
        let mut out = tempfile::tempfile().unwrap();
        let mut cap = Cap::new(MIB);
        let half = vec![1u8; (MIB / 2) as usize];
        let x = copy_member(&ctx, "lib/a.so", &mut &half[..], &mut out, &mut cap).unwrap();
        assert_eq!((x.size, cap.used), (MIB / 2, MIB / 2));
        let x = copy_member(&ctx, "lib/b.so", &mut &half[..], &mut out, &mut cap).unwrap();
        assert_eq!(
            (x.size, cap.used),
            (MIB / 2, MIB),
            "exactly the cap is allowed"
        );
        let e = copy_member(&ctx, "lib/c.so", &mut &[1u8][..], &mut out, &mut cap).unwrap_err();
        assert!(
            matches!(&e, UnpackError::TooLarge { member, .. } if member == "lib/c.so"),
            "{e:?}"
        );
    }

    #[test]
    fn a_member_inflating_past_the_cap_is_refused_in_every_format() {
        let zeros = vec![0u8; 3 * MIB as usize];
        let exact = vec![7u8; MIB as usize];
        for kind in ALL_KINDS {
            let bytes = build(
                kind,
                &[E::File("README", b"r"), E::File("bin/osmosisd", &zeros)],
            );
            assert!(bytes.len() < zeros.len() / 10, "{kind}: not a bomb");
            for path in [None, Some("bin/osmosisd")] {
                let dir = tempfile::tempdir().unwrap();
                let archive = dir.path().join("bomb");
                std::fs::write(&archive, &bytes).unwrap();
                let mut out = tempfile::tempfile().unwrap();
                let e = extract(&archive, kind, path, "osmosisd", MIB, &mut out).unwrap_err();
                assert_eq!(out.metadata().unwrap().len(), 0, "{kind}: out not emptied");
                assert!(
                    matches!(&e, UnpackError::TooLarge { member, max: MIB, .. } if member == "bin/osmosisd"),
                    "{kind}: {e:?}"
                );
                assert_eq!(
                    e.to_string(),
                    format!(
                        "unpacking member `bin/osmosisd` of archive `{}` would write more than \
                         the size limit of 1 MiB; stopped there\nhint: if the archive is genuine \
                         (not a decompression bomb), raise the limit with --max-size (cvx apply) or \
                         CVX_MAX_SIZE (cvx run)",
                        archive.display()
                    )
                );
            }
            // A member of exactly the cap is fine.
            let r = run_bytes(
                kind,
                &build(kind, &[E::File("bin/osmosisd", &exact)]),
                Some("bin/osmosisd"),
            );
            let got = r.result.as_ref().unwrap();
            assert_eq!(got.size, MIB);
        }
    }

    #[test]
    fn a_candidate_over_the_cap_that_is_not_chosen_is_no_error() {
        let big = vec![0u8; 2 * MIB as usize];
        for kind in TAR_KINDS {
            let archive = build(
                kind,
                &[E::File("README", &big), E::File("bin/osmosisd", b"daemon")],
            );
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("a");
            std::fs::write(&path, &archive).unwrap();
            let mut out = tempfile::tempfile().unwrap();
            let x = extract(&path, kind, None, "osmosisd", MIB, &mut out).unwrap();
            assert_eq!((x.member.as_str(), x.size), ("bin/osmosisd", 6), "{kind}");
        }
    }

    #[test]
    fn sizes_show_in_mib_when_they_are_whole() {
        assert_eq!(show_size(4096 * MIB), "4096 MiB");
        assert_eq!(show_size(MIB), "1 MiB");
        assert_eq!(show_size(4_999), "4999 bytes");
    }

    // ---- the whole archive ---------------------------------------------------------------------

    /// What `unpack_tree` handed over, in order: files with their bytes, and symlinks.
    #[derive(Debug, PartialEq, Eq)]
    enum Got {
        /// name, executable, daemon, bytes
        File(String, bool, bool, Vec<u8>),
        Link(String, String),
    }

    fn tree_run(
        kind: ArchiveKind,
        bytes: &[u8],
        path: Option<&str>,
        max_size: u64,
    ) -> (Vec<Got>, Result<String, UnpackError>) {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("artifact");
        std::fs::write(&archive, bytes).unwrap();
        let mut got = Vec::new();
        let result = unpack_tree(&archive, kind, path, "osmosisd", max_size, |entry| {
            match entry {
                TreeEntry::File(m) => {
                    let (name, executable, daemon) = (m.name.to_owned(), m.executable, m.daemon);
                    let mut out = tempfile::tempfile().unwrap();
                    let x = m.copy_to(&mut out)?;
                    let mut bytes = Vec::new();
                    out.seek(SeekFrom::Start(0)).unwrap();
                    out.read_to_end(&mut bytes).unwrap();
                    assert_eq!((x.member.as_str(), x.sha256), (name.as_str(), sha(&bytes)));
                    got.push(Got::File(name, executable, daemon, bytes));
                }
                TreeEntry::Symlink { name, target } => {
                    got.push(Got::Link(name.to_owned(), target.to_owned()));
                }
            }
            Ok::<_, UnpackError>(())
        });
        (got, result)
    }

    fn file(name: &str, executable: bool, daemon: bool, bytes: &[u8]) -> Got {
        Got::File(name.into(), executable, daemon, bytes.to_vec())
    }

    #[test]
    fn the_whole_archive_is_handed_over_with_inside_symlinks_last() {
        for kind in ALL_KINDS {
            let archive = build(
                kind,
                &[
                    E::Dir("bin/"),
                    E::File("bin/osmosisd", b"daemon"),
                    E::Dir("lib/"),
                    E::Symlink("lib/libwasmvm.so", "libwasmvm.x86_64.so"),
                    E::File("lib/libwasmvm.x86_64.so", b"lib"),
                    E::Plain("README.md", b"notes"),
                    E::File("tools/helper", b"helper"),
                ],
            );
            let (got, result) = tree_run(kind, &archive, None, NO_CAP);
            assert_eq!(result.unwrap(), "bin/osmosisd", "{kind}");
            assert_eq!(
                got,
                vec![
                    file("bin/osmosisd", true, true, b"daemon"),
                    file("lib/libwasmvm.x86_64.so", true, false, b"lib"),
                    file("README.md", false, false, b"notes"),
                    file("tools/helper", true, false, b"helper"),
                    Got::Link("lib/libwasmvm.so".into(), "libwasmvm.x86_64.so".into()),
                ],
                "{kind}"
            );
        }
    }

    #[test]
    fn the_daemon_follows_the_member_rules_and_owns_bin_daemon() {
        for kind in ALL_KINDS {
            let archive = build(
                kind,
                &[
                    E::File("osmosisd-26/bin/osmosisd", b"the daemon"),
                    E::File("bin/osmosisd", b"a decoy"),
                    E::File("osmosisd-26/lib/libwasmvm.so", b"lib"),
                ],
            );
            let (got, result) =
                tree_run(kind, &archive, Some("./osmosisd-26/bin/osmosisd"), NO_CAP);
            assert_eq!(result.unwrap(), "osmosisd-26/bin/osmosisd", "{kind}");
            assert_eq!(
                got,
                vec![
                    file("osmosisd-26/bin/osmosisd", true, true, b"the daemon"),
                    file("osmosisd-26/lib/libwasmvm.so", true, false, b"lib"),
                ],
                "{kind}: bin/osmosisd is where the chosen daemon goes"
            );
            // The member rules' errors are extract's.
            let (got, result) = tree_run(kind, &archive, Some("bin/missing"), NO_CAP);
            assert!(
                matches!(result, Err(UnpackError::NoSuchMember { .. })),
                "{kind}"
            );
            assert_eq!(got, vec![], "{kind}: visited before refusing");
        }
    }

    #[test]
    fn the_whole_archive_is_refused_before_anything_is_handed_over() {
        let bad: Vec<(Vec<E<'_>>, &str, UnsafeReason)> = vec![
            (
                vec![E::File("bin/osmosisd", b"d"), E::RawFile("../evil", b"x")],
                "../evil",
                UnsafeReason::ParentDir,
            ),
            (
                vec![
                    E::File("bin/osmosisd", b"d"),
                    E::Symlink("lib/evil", "../../x"),
                ],
                "lib/evil",
                UnsafeReason::SymlinkOut {
                    target: "../../x".into(),
                },
            ),
            (
                // A file written under a link of the archive would land where the link points.
                vec![
                    E::File("bin/osmosisd", b"d"),
                    E::Symlink("lib", "bin"),
                    E::File("lib/x", b"x"),
                ],
                "lib/x",
                UnsafeReason::UnderNonDirectory {
                    parent: "lib".into(),
                },
            ),
            (
                // `a/b` is the root; `..` from there leaves the archive though the text stays in.
                vec![
                    E::File("bin/osmosisd", b"d"),
                    E::Symlink("a/b", ".."),
                    E::Symlink("a/c", "b/../../x"),
                ],
                "a/c",
                UnsafeReason::SymlinkThroughLink {
                    target: "b/../../x".into(),
                    link: "a/b".into(),
                },
            ),
        ];
        for kind in TAR_KINDS {
            for (entries, entry, reason) in &bad {
                let (got, result) = tree_run(kind, &build(kind, entries), None, NO_CAP);
                assert_eq!(got, vec![], "{kind} {entry}: visited before refusing");
                assert_refused(
                    &result.unwrap_err(),
                    entry,
                    reason,
                    &format!("{kind} {entry}"),
                );
            }
            let dup = build(
                kind,
                &[
                    E::File("bin/osmosisd", b"d"),
                    E::File("lib/x", b"1"),
                    E::File("./lib/x", b"2"),
                ],
            );
            let (got, result) = tree_run(kind, &dup, None, NO_CAP);
            assert_eq!(got, vec![]);
            assert!(
                matches!(&result, Err(UnpackError::Duplicate { member, count: 2 }) if member == "lib/x"),
                "{kind}: {result:?}"
            );
        }
    }

    #[test]
    fn hard_links_and_devices_are_skipped() {
        for kind in TAR_KINDS {
            let archive = build(
                kind,
                &[
                    E::File("bin/osmosisd", b"d"),
                    E::File("lib/libwasmvm.x86_64.so", b"lib"),
                    E::HardLink("lib/libwasmvm.so", "lib/libwasmvm.x86_64.so"),
                ],
            );
            let (got, result) = tree_run(kind, &archive, None, NO_CAP);
            result.unwrap();
            assert_eq!(
                got,
                vec![
                    file("bin/osmosisd", true, true, b"d"),
                    file("lib/libwasmvm.x86_64.so", true, false, b"lib"),
                ],
                "{kind}"
            );
        }
    }

    #[test]
    fn a_bomb_anywhere_in_the_archive_is_refused_before_anything_is_written() {
        let zeros = vec![0u8; 3 * MIB as usize];
        for kind in ALL_KINDS {
            let archive = build(
                kind,
                &[
                    E::File("bin/osmosisd", b"daemon"),
                    E::File("lib/libwasmvm.so", &zeros),
                ],
            );
            let (got, result) = tree_run(kind, &archive, None, MIB);
            assert_eq!(got, vec![], "{kind}: visited before refusing");
            assert!(
                matches!(&result, Err(UnpackError::TooLarge { member, max: MIB, .. }) if member == "lib/libwasmvm.so"),
                "{kind}: {result:?}"
            );
            // The total counts: two files under the cap each, over it together.
            let half = vec![1u8; (MIB / 2 + 1) as usize];
            let archive = build(
                kind,
                &[
                    E::File("bin/osmosisd", &half),
                    E::File("lib/libwasmvm.so", &half),
                ],
            );
            let (got, result) = tree_run(kind, &archive, None, MIB);
            assert_eq!(got, vec![], "{kind}");
            assert!(
                matches!(&result, Err(UnpackError::TooLarge { member, .. }) if member == "lib/libwasmvm.so"),
                "{kind}: {result:?}"
            );
            let (got, result) = tree_run(kind, &archive, None, MIB + 2);
            result.unwrap();
            assert_eq!(got.len(), 2, "{kind}: exactly the cap is allowed");
        }
    }
}
