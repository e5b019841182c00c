//! Who owns what cvx creates in a home (DESIGN §5.4).
//!
//! `cvx apply`, `cvx pin`, `cvx prune` and `cvx rollback` are often run as root (Ansible's
//! `become`, `sudo`) on a home that belongs to the node's user, who runs `cvx run` and must be
//! able to read the receipts, replace `current` and write under `.cvx/` at the upgrade height.
//! So, as root, everything cvx creates in such a home (directories, staged files, links,
//! receipts, lock files, files kept aside, restored data) is given to the home's owner, with the
//! modes cvx uses anyway. Run as anyone else, files are created as that user and nothing changes.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// A user and group to give new files to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl Owner {
    /// The owner of `home`, when cvx runs as root and the home is not root's own: what cvx creates
    /// there is then given to them. None when there is nothing to change (not root, the home is
    /// root's, or it does not exist yet).
    pub fn of_home(home: &Path) -> Option<Owner> {
        if !rustix::process::geteuid().is_root() {
            return None;
        }
        let meta = fs::metadata(home).ok()?;
        (meta.uid() != 0 || meta.gid() != 0).then(|| Owner {
            uid: meta.uid(),
            gid: meta.gid(),
        })
    }
}

impl Owner {
    /// The owner of the file `meta` describes, for a file that replaces it, when cvx runs as root
    /// (as anyone else the new file is theirs, which is the old one's owner or their own choice).
    pub fn same_as(meta: &fs::Metadata) -> Option<Owner> {
        rustix::process::geteuid().is_root().then(|| Owner {
            uid: meta.uid(),
            gid: meta.gid(),
        })
    }
}

/// Give `path` (a symlink itself, not its target) to `owner`, if there is one.
pub fn give(owner: Option<Owner>, path: &Path) -> io::Result<()> {
    match owner {
        Some(o) => std::os::unix::fs::lchown(path, Some(o.uid), Some(o.gid)),
        None => Ok(()),
    }
}

/// Give an open file to `owner`, if there is one.
pub fn give_file(owner: Option<Owner>, file: &impl std::os::fd::AsFd) -> io::Result<()> {
    match owner {
        Some(o) => std::os::unix::fs::fchown(file, Some(o.uid), Some(o.gid)),
        None => Ok(()),
    }
}

/// `fs::create_dir_all`, giving every directory it creates to `owner`. Directories that already
/// exist keep their owner.
pub fn create_dir_all(owner: Option<Owner>, path: &Path) -> io::Result<()> {
    if owner.is_none() || path.is_dir() {
        return fs::create_dir_all(path);
    }
    // The missing ancestors, outermost first.
    let mut missing = Vec::new();
    let mut next = Some(path);
    while let Some(dir) = next {
        if fs::symlink_metadata(dir).is_ok() {
            break;
        }
        missing.push(dir);
        next = dir.parent();
    }
    for dir in missing.into_iter().rev() {
        match fs::create_dir(dir) {
            Ok(()) => give(owner, dir)?,
            // Another process made it meanwhile: not ours to give.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Give `path` and everything below it (not following symlinks) to `owner`, if there is one.
pub fn give_tree(owner: Option<Owner>, path: &Path) -> io::Result<()> {
    if owner.is_none() {
        return Ok(());
    }
    give(owner, path)?;
    if fs::symlink_metadata(path)?.is_dir() {
        for entry in fs::read_dir(path)? {
            give_tree(owner, &entry?.path())?;
        }
    }
    Ok(())
}
