//! The tree's lock (DESIGN §6): `cvx apply`, `cvx prune`, `cvx rollback` and `cvx run` at an
//! upgrade take it before they change the tree, so none of them interleaves with another. The
//! lock file (`.cvx/lock`) names its holder for the message a waiting cvx prints.

use crate::errors::io_err;
use std::fs::{self, File, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::Layout;

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(transparent)]
    Io(#[from] crate::errors::IoError),
    #[error("the tree is locked by {} ({}); gave up after {}", holder.as_ref().map_or_else(|| "another cvx process".to_string(), Holder::to_string), path.display(), crate::duration::show(*waited))]
    Locked {
        path: PathBuf,
        holder: Option<Holder>,
        waited: Duration,
    },
}

/// Held while applying, and while `cvx run` switches: nothing that changes the tree interleaves.
/// Released when dropped (or the process dies).
pub struct TreeLock {
    _file: File,
}

/// Which cvx command holds the tree's lock, as recorded in the lock file for those who wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Apply,
    Run,
    Rollback,
    Prune,
}

/// Who holds the lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub role: Role,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.role {
            Role::Apply => write!(f, "another cvx apply (pid {})", self.pid),
            Role::Run => write!(f, "cvx run (pid {}), upgrading the node", self.pid),
            Role::Rollback => write!(f, "cvx rollback (pid {})", self.pid),
            Role::Prune => write!(f, "cvx prune (pid {})", self.pid),
        }
    }
}

/// Take the tree's lock, waiting up to `timeout` (saying so) while another cvx holds it.
pub fn lock(layout: &Layout, timeout: Duration, role: Role) -> Result<TreeLock, LockError> {
    let cvx = layout.cvx();
    let owner = layout.owner();
    crate::owner::create_dir_all(owner, &cvx).map_err(io_err("create directory", &cvx))?;
    let path = layout.lock();
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err("open lock file", &path))?;
    // `cvx run`, as the home's owner, takes the same lock at the upgrade height.
    crate::owner::give_file(owner, &file).map_err(io_err("set the owner of", &path))?;
    let start = Instant::now();
    let mut said = false;
    loop {
        match file.try_lock() {
            Ok(()) => break,
            Err(TryLockError::WouldBlock) => {
                let holder = read_holder(&mut file);
                if start.elapsed() >= timeout {
                    return Err(LockError::Locked {
                        path,
                        holder,
                        waited: start.elapsed(),
                    });
                }
                if !said {
                    tracing::warn!(
                        "{} holds {}; waiting up to {}",
                        holder
                            .as_ref()
                            .map_or_else(|| "another cvx process".to_string(), Holder::to_string),
                        path.display(),
                        crate::duration::show(timeout)
                    );
                    said = true;
                }
                std::thread::sleep(
                    Duration::from_millis(50).min(timeout.saturating_sub(start.elapsed())),
                );
            }
            Err(TryLockError::Error(e)) => return Err(io_err("lock", &path)(e).into()),
        }
    }
    // Record who holds it, for the message a waiting cvx prints.
    let role = match role {
        Role::Apply => "apply",
        Role::Run => "run",
        Role::Rollback => "rollback",
        Role::Prune => "prune",
    };
    file.set_len(0).map_err(io_err("write", &path))?;
    file.rewind().map_err(io_err("write", &path))?;
    write!(file, "{} {role}", std::process::id()).map_err(io_err("write", &path))?;
    Ok(TreeLock { _file: file })
}

fn read_holder(file: &mut File) -> Option<Holder> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut text).ok()?;
    let mut words = text.split_whitespace();
    let pid = words.next()?.parse().ok()?;
    let role = match words.next() {
        Some("run") => Role::Run,
        Some("rollback") => Role::Rollback,
        Some("prune") => Role::Prune,
        _ => Role::Apply,
    };
    Some(Holder { pid, role })
}
