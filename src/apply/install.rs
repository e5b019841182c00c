//! Install a verified download at its place in the tree, atomically.
//!
//! The new bytes are written to a temp file in the destination directory, given their mode,
//! fsynced, and renamed over the destination; then the directory is fsynced. A reader of the
//! destination sees the old file or the new one, never a mix, and a crash leaves at worst a
//! stray temp file. A file being replaced is first hard-linked under `.cvx/replaced/<stage>/`
//! (named by the time it was replaced), so it is kept without a copy on the hot path. Run as root
//! on another user's home, whatever is created is given to the home's owner ([`crate::owner`]).

use crate::errors::io_err;
use std::fs::{self, File, Permissions};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::unpack::{self, UnpackError};
use crate::owner::{self, Owner};
use crate::tree::receipt::FileIdentity;

/// Binaries are executable by all, libraries readable by all.
pub const BINARY_MODE: u32 = 0o755;
pub const LIBRARY_MODE: u32 = 0o644;

/// What was installed: the bytes now at the destination.
#[derive(Debug, Clone)]
pub struct Installed {
    pub sha256: String,
    pub size: u64,
    /// The archive member the file came from, if it was unpacked.
    pub member: Option<String>,
    /// Where the file it replaced is kept, if it replaced one.
    pub replaced: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(transparent)]
    Io(#[from] crate::errors::IoError),
    #[error(transparent)]
    Unpack(#[from] UnpackError),
}

/// One file to install.
pub struct Source<'a> {
    /// The verified download.
    pub file: &'a Path,
    /// The URL it came from, for archive detection by name.
    pub url: &'a str,
    /// Its sha256, already verified by the download.
    pub sha256: &'a str,
    /// For archives: the member named in the manifest.
    pub member: Option<&'a str>,
    pub daemon: &'a str,
    /// The most bytes an archive member may unpack to (`--max-size`).
    pub max_size: u64,
    /// The download may be moved into place rather than copied (no one else needs it).
    pub consume: bool,
}

/// Where a file is installed, and how.
#[derive(Debug, Clone, Copy)]
pub struct Dest<'a> {
    pub path: &'a Path,
    pub mode: u32,
    /// The directory a file it replaces is kept in: `.cvx/replaced/<stage>/<bin|lib>`.
    pub aside: &'a Path,
    /// Whom the new files and directories belong to (None: whoever runs cvx).
    pub owner: Option<Owner>,
}

impl Dest<'_> {
    fn dir(&self) -> &Path {
        self.path
            .parent()
            .expect("destinations are inside the tree")
    }
}

/// Install `source` at `dest`, keeping any file it replaces aside.
pub fn install(source: &Source<'_>, dest: &Dest<'_>) -> Result<Installed, InstallError> {
    let dir = dest.dir();
    owner::create_dir_all(dest.owner, dir).map_err(io_err("create directory", dir))?;
    let kind = unpack::detect(source.file, source.url).map_err(io_err("read", source.file))?;

    let installed = match kind {
        None if source.consume => {
            // The download is already verified and fsynced: a rename is the whole install.
            let size = fs::metadata(source.file)
                .map_err(io_err("read", source.file))?
                .len();
            set_mode(source.file, dest.mode)?;
            owner::give(dest.owner, source.file)
                .map_err(io_err("set the owner of", source.file))?;
            let replaced = keep_aside(dest)?;
            fs::rename(source.file, dest.path).map_err(io_err("move into place", dest.path))?;
            Installed {
                sha256: source.sha256.to_string(),
                size,
                member: None,
                replaced,
            }
        }
        None => {
            let mut from = File::open(source.file).map_err(io_err("read", source.file))?;
            let (size, replaced) = write_new(dest, |tmp, path| {
                Ok(io::copy(&mut from, tmp).map_err(io_err("write", path))?)
            })?;
            Installed {
                sha256: source.sha256.to_string(),
                size,
                member: None,
                replaced,
            }
        }
        Some(kind) => {
            let (extracted, replaced) = write_new(dest, |tmp, _| {
                unpack::extract(
                    source.file,
                    kind,
                    source.member,
                    source.daemon,
                    source.max_size,
                    tmp,
                )
                .map_err(InstallError::from)
            })?;
            Installed {
                sha256: extracted.sha256,
                size: extracted.size,
                member: Some(extracted.member),
                replaced,
            }
        }
    };
    sync_dir(dir)?;
    Ok(installed)
}

/// What [`adopt`] found at the destination.
#[derive(Debug)]
pub enum Adoption {
    /// The staged file holds the source's bytes: left as it is. `identity` is the file's, as
    /// hashed, for its receipt.
    Same {
        installed: Installed,
        identity: FileIdentity,
    },
    /// It differed and was replaced.
    Replaced(Installed),
    /// It differs and may not be replaced: nothing changed.
    Differs { staged: String, expected: String },
}

/// Adopt the file staged at `dest` without a receipt if it holds the bytes `source` installs
/// (the pinned file, or the pinned archive's member, unpacked beside it to compare); replace it
/// when it does not and `may_replace`.
pub fn adopt(
    source: &Source<'_>,
    dest: &Dest<'_>,
    may_replace: bool,
) -> Result<Adoption, InstallError> {
    let (staged, identity) = hash_unchanged(dest.path)?;
    let kind = unpack::detect(source.file, source.url).map_err(io_err("read", source.file))?;
    let Some(kind) = kind else {
        return if staged == source.sha256 {
            Ok(Adoption::Same {
                installed: Installed {
                    sha256: staged,
                    size: identity.size,
                    member: None,
                    replaced: None,
                },
                identity,
            })
        } else if may_replace {
            install(source, dest).map(Adoption::Replaced)
        } else {
            Ok(Adoption::Differs {
                staged,
                expected: source.sha256.to_string(),
            })
        };
    };
    let dir = dest.dir();
    let mut tmp = temp_beside(dest)?;
    let extracted = unpack::extract(
        source.file,
        kind,
        source.member,
        source.daemon,
        source.max_size,
        tmp.as_file_mut(),
    )
    .map_err(InstallError::from)?;
    if extracted.sha256 == staged {
        return Ok(Adoption::Same {
            installed: Installed {
                sha256: extracted.sha256,
                size: extracted.size,
                member: Some(extracted.member),
                replaced: None,
            },
            identity,
        });
    }
    if !may_replace {
        return Ok(Adoption::Differs {
            staged,
            expected: extracted.sha256,
        });
    }
    let replaced = finish(tmp, dest)?;
    sync_dir(dir)?;
    Ok(Adoption::Replaced(Installed {
        sha256: extracted.sha256,
        size: extracted.size,
        member: Some(extracted.member),
        replaced,
    }))
}

/// The sha256 of the file at `path` and its identity, which did not change while it was read.
pub fn hash_unchanged(path: &Path) -> Result<(String, FileIdentity), InstallError> {
    let before = fs::symlink_metadata(path).map_err(io_err("read", path))?;
    let (sha256, _) = crate::hash::sha256_file(path).map_err(io_err("read", path))?;
    let after = fs::symlink_metadata(path).map_err(io_err("read", path))?;
    let identity = FileIdentity::of(&after);
    if FileIdentity::of(&before) != identity {
        return Err(io_err("read", path)(io::Error::other("it changed while cvx read it")).into());
    }
    Ok((sha256, identity))
}

fn temp_beside(dest: &Dest<'_>) -> Result<tempfile::NamedTempFile, InstallError> {
    let dir = dest.dir();
    owner::create_dir_all(dest.owner, dir).map_err(io_err("create directory", dir))?;
    Ok(tempfile::Builder::new()
        .prefix(".cvx-")
        .tempfile_in(dir)
        .map_err(io_err("create a temp file in", dir))?)
}

/// Install at `dest` the bytes `write` puts into a fresh temp file beside it (given with its
/// path): mode, owner, fsync, keep the old file aside, rename. Creates the directory if needed;
/// the caller syncs it. On error the temp file is removed and `dest` is untouched. Returns what
/// `write` returned and where the replaced file is kept.
pub fn write_new<T>(
    dest: &Dest<'_>,
    write: impl FnOnce(&mut File, &Path) -> Result<T, InstallError>,
) -> Result<(T, Option<PathBuf>), InstallError> {
    let mut tmp = temp_beside(dest)?;
    let path = tmp.path().to_path_buf();
    let written = write(tmp.as_file_mut(), &path)?;
    let replaced = finish(tmp, dest)?;
    Ok((written, replaced))
}

/// Make `dest` a symlink to `target`: created under a temp name beside it, then renamed over
/// whatever was there (kept aside). The caller syncs the directory.
pub fn replace_symlink(target: &str, dest: &Dest<'_>) -> Result<Option<PathBuf>, InstallError> {
    let dir = dest.dir();
    owner::create_dir_all(dest.owner, dir).map_err(io_err("create directory", dir))?;
    let name = dest.path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".cvx-{name}.{}.link", std::process::id()));
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(io_err("remove", &tmp)(e).into());
        }
        _ => {}
    }
    std::os::unix::fs::symlink(target, &tmp).map_err(io_err("create symlink", &tmp))?;
    let placed = owner::give(dest.owner, &tmp)
        .map_err(|e| io_err("set the owner of", &tmp)(e).into())
        .and_then(|()| keep_aside(dest))
        .and_then(|replaced| {
            fs::rename(&tmp, dest.path)
                .map(|()| replaced)
                .map_err(|e| io_err("move into place", dest.path)(e).into())
        });
    if placed.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    placed
}

/// fsync a directory, so the renames in it survive a crash.
pub fn sync_dir(dir: &Path) -> Result<(), InstallError> {
    Ok(File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync directory", dir))?)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), InstallError> {
    Ok(fs::set_permissions(path, Permissions::from_mode(mode))
        .map_err(io_err("set the mode of", path))?)
}

/// Mode, owner, fsync, keep the old file aside, rename over the destination.
fn finish(tmp: tempfile::NamedTempFile, dest: &Dest<'_>) -> Result<Option<PathBuf>, InstallError> {
    set_mode(tmp.path(), dest.mode)?;
    owner::give_file(dest.owner, tmp.as_file()).map_err(io_err("set the owner of", tmp.path()))?;
    tmp.as_file()
        .sync_all()
        .map_err(io_err("sync", tmp.path()))?;
    let replaced = keep_aside(dest)?;
    tmp.persist(dest.path)
        .map_err(|e| io_err("move into place", dest.path)(e.error))?;
    Ok(replaced)
}

/// Hard-link the file at `dest` (if any) to `<aside>/<name>.<time replaced>`, copying only when
/// a link is impossible; something that is not a regular file (a directory, a symlink) is moved
/// aside. Returns where it is kept.
fn keep_aside(dest: &Dest<'_>) -> Result<Option<PathBuf>, InstallError> {
    let meta = match fs::symlink_metadata(dest.path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("inspect", dest.path)(e).into()),
    };
    owner::create_dir_all(dest.owner, dest.aside)
        .map_err(io_err("create directory", dest.aside))?;
    // The time sorts as text (prune keeps the newest few) and tells a person when.
    let stamp = crate::time::rfc3339_nanos(crate::time::unix_nanos(std::time::SystemTime::now()));
    let name = dest.path.file_name().unwrap_or_default().to_string_lossy();
    let target = dest.aside.join(format!("{name}.{stamp}"));
    if !meta.is_file() {
        fs::rename(dest.path, &target).map_err(io_err("move aside", dest.path))?;
        return Ok(Some(target));
    }
    if fs::hard_link(dest.path, &target).is_err() {
        fs::copy(dest.path, &target).map_err(io_err("keep a copy of", dest.path))?;
        owner::give(dest.owner, &target).map_err(io_err("set the owner of", &target))?;
    }
    Ok(Some(target))
}

/// Point `current` at `stage` (`genesis` or `upgrades/<dir>`) atomically: a relative link made
/// under a temp name, renamed over `current`, and the directory fsynced. The link belongs to the
/// home's owner when cvx runs as root.
pub fn point_current(layout: &crate::tree::Layout, stage: &str) -> io::Result<()> {
    let root = layout.root();
    let tmp = root.join(format!(".current-{}", std::process::id()));
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::os::unix::fs::symlink(stage, &tmp)?;
    owner::give(layout.owner(), &tmp)?;
    fs::rename(&tmp, layout.current())?;
    File::open(&root)?.sync_all()
}
