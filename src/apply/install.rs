//! Install a verified download at its place in the tree, atomically.
//!
//! The new bytes are written to a temp file in the destination directory, given their mode,
//! fsynced, and renamed over the destination; then the directory is fsynced. A reader of the
//! destination sees the old file or the new one, never a mix, and a crash leaves at worst a
//! stray temp file. A file being replaced is first hard-linked under `.cvx/replaced/`, so it is
//! kept without a copy on the hot path.

use std::fs::{self, File, Permissions};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::unpack::{self, UnpackError};

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
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("cannot {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Unpack(#[from] UnpackError),
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> InstallError + use<> {
    let path = path.to_path_buf();
    move |source| InstallError::Io {
        action,
        path,
        source,
    }
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

/// Install `source` at `dest` with `mode`, keeping any file it replaces under `aside`.
pub fn install(
    source: &Source<'_>,
    dest: &Path,
    mode: u32,
    aside: &Path,
) -> Result<Installed, InstallError> {
    let dir = dest.parent().expect("destinations are inside the tree");
    fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    let kind = unpack::detect(source.file, source.url).map_err(io_err("read", source.file))?;

    let installed = match kind {
        None if source.consume => {
            // The download is already verified and fsynced: a rename is the whole install.
            let size = fs::metadata(source.file)
                .map_err(io_err("read", source.file))?
                .len();
            set_mode(source.file, mode)?;
            keep_aside(dest, aside)?;
            fs::rename(source.file, dest).map_err(io_err("move into place", dest))?;
            Installed {
                sha256: source.sha256.to_string(),
                size,
                member: None,
            }
        }
        None => {
            let mut from = File::open(source.file).map_err(io_err("read", source.file))?;
            let size = write_new(dest, mode, aside, |tmp, path| {
                io::copy(&mut from, tmp).map_err(io_err("write", path))
            })?;
            Installed {
                sha256: source.sha256.to_string(),
                size,
                member: None,
            }
        }
        Some(kind) => {
            let extracted = write_new(dest, mode, aside, |tmp, _| {
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
            }
        }
    };
    sync_dir(dir)?;
    Ok(installed)
}

/// Install at `dest` the bytes `write` puts into a fresh temp file beside it (given with its
/// path): mode, fsync, keep the old file aside, rename. Creates the directory if needed; the
/// caller syncs it. On error the temp file is removed and `dest` is untouched.
pub fn write_new<T>(
    dest: &Path,
    mode: u32,
    aside: &Path,
    write: impl FnOnce(&mut File, &Path) -> Result<T, InstallError>,
) -> Result<T, InstallError> {
    let dir = dest.parent().expect("destinations are inside the tree");
    fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".cvx-")
        .tempfile_in(dir)
        .map_err(io_err("create a temp file in", dir))?;
    let path = tmp.path().to_path_buf();
    let written = write(tmp.as_file_mut(), &path)?;
    finish(tmp, dest, mode, aside)?;
    Ok(written)
}

/// Make `dest` a symlink to `target`: created under a temp name beside it, then renamed over
/// whatever was there (kept aside). The caller syncs the directory.
pub fn replace_symlink(target: &str, dest: &Path, aside: &Path) -> Result<(), InstallError> {
    let dir = dest.parent().expect("destinations are inside the tree");
    fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    let name = dest.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".cvx-{name}.{}.link", std::process::id()));
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(io_err("remove", &tmp)(e));
        }
        _ => {}
    }
    std::os::unix::fs::symlink(target, &tmp).map_err(io_err("create symlink", &tmp))?;
    let placed = keep_aside(dest, aside)
        .and_then(|()| fs::rename(&tmp, dest).map_err(io_err("move into place", dest)));
    if placed.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    placed
}

/// fsync a directory, so the renames in it survive a crash.
pub fn sync_dir(dir: &Path) -> Result<(), InstallError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync directory", dir))
}

fn set_mode(path: &Path, mode: u32) -> Result<(), InstallError> {
    fs::set_permissions(path, Permissions::from_mode(mode)).map_err(io_err("set the mode of", path))
}

/// Mode, fsync, keep the old file aside, rename over the destination.
fn finish(
    tmp: tempfile::NamedTempFile,
    dest: &Path,
    mode: u32,
    aside: &Path,
) -> Result<(), InstallError> {
    set_mode(tmp.path(), mode)?;
    tmp.as_file()
        .sync_all()
        .map_err(io_err("sync", tmp.path()))?;
    keep_aside(dest, aside)?;
    tmp.persist(dest).map_err(|e| InstallError::Io {
        action: "move into place",
        path: dest.to_path_buf(),
        source: e.error,
    })?;
    Ok(())
}

/// Hard-link the file at `dest` (if any) to `aside/<name>.<unix time>`, copying only when a link
/// is impossible. Something that is not a regular file (a directory, a symlink) is moved aside.
fn keep_aside(dest: &Path, aside: &Path) -> Result<(), InstallError> {
    let meta = match fs::symlink_metadata(dest) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("inspect", dest)(e)),
    };
    fs::create_dir_all(aside).map_err(io_err("create directory", aside))?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let name = dest.file_name().unwrap_or_default().to_string_lossy();
    let target = aside.join(format!("{name}.{stamp}"));
    if !meta.is_file() {
        return fs::rename(dest, &target).map_err(io_err("move aside", dest));
    }
    if fs::hard_link(dest, &target).is_err() {
        fs::copy(dest, &target).map_err(io_err("keep a copy of", dest))?;
    }
    Ok(())
}

/// Point `current` at `stage` (`genesis` or `upgrades/<dir>`) atomically: a relative link made
/// under a temp name, renamed over `current`, and the directory fsynced.
pub fn point_current(layout: &crate::tree::Layout, stage: &str) -> io::Result<()> {
    let root = layout.root();
    let tmp = root.join(format!(".current-{}", std::process::id()));
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::os::unix::fs::symlink(stage, &tmp)?;
    fs::rename(&tmp, layout.current())?;
    File::open(&root)?.sync_all()
}
