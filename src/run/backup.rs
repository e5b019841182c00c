//! The backup of `data/` before an upgrade (DESIGN §5.2): written under a temporary name, fsync'd,
//! renamed to `data-backup-<date>-<upgrade>`, recorded under `.cvx/backups/` so a restart during
//! a failing upgrade does not copy again, and cancellable between chunks so a signal ends it
//! within moments, leaving no directory that looks complete.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::tree::{Layout, PlanInfo};

/// Bytes copied between two looks at the cancel flag: large enough that the kernel copies at full
/// speed, small enough that a signal is honoured within a fraction of a second.
const CHUNK: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("backup of {} refused: it needs {need} bytes and {} has {free} free", data.display(), dir.display())]
    NoRoom {
        data: PathBuf,
        dir: PathBuf,
        need: u64,
        free: u64,
    },
    #[error("cannot {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("backup to {} interrupted by a signal; the partial copy was removed", to.display())]
    Interrupted { to: PathBuf },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> BackupError + use<> {
    let path = path.to_path_buf();
    move |source| BackupError::Io {
        action,
        path,
        source,
    }
}

/// A finished backup, as recorded under `.cvx/backups/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub upgrade: String,
    pub height: u64,
    pub path: PathBuf,
    pub bytes_copied: u64,
    pub files: u64,
    pub millis: u64,
    /// Seconds since the Unix epoch when the backup completed.
    pub finished_at: u64,
}

/// Where the record of the backup taken before `plan` lives: one file per plan (name and height).
fn record_path(layout: &Layout, plan: &PlanInfo, recase: bool) -> PathBuf {
    let dir = crate::tree::upgrade_dir(&plan.name, recase);
    let dir = dir.trim_start_matches("upgrades/");
    layout
        .cvx()
        .join("backups")
        .join(format!("{dir}-{}.json", plan.height))
}

/// The backup already taken for `plan`, if its record and its directory are both still there.
pub fn taken(layout: &Layout, plan: &PlanInfo, recase: bool) -> Option<Record> {
    let bytes = fs::read(record_path(layout, plan, recase)).ok()?;
    let record: Record = serde_json::from_slice(&bytes).ok()?;
    record.path.is_dir().then_some(record)
}

/// Copy `home/data` into `backup_dir` for `plan`, refusing early when the room is short, and
/// record it. `cancel` is checked between chunks; when it is set the partial copy is removed.
pub fn backup(
    home: &Path,
    backup_dir: &Path,
    layout: &Layout,
    plan: &PlanInfo,
    recase: bool,
    cancel: &AtomicBool,
) -> Result<Record, BackupError> {
    let started = Instant::now();
    let data = home.join("data");
    fs::create_dir_all(backup_dir).map_err(io_err("create", backup_dir))?;
    remove_partials(backup_dir);
    let need = tree_size(&data).map_err(io_err("measure", &data))?;
    let stat = rustix::fs::statvfs(backup_dir)
        .map_err(|e| io_err("measure free space of", backup_dir)(e.into()))?;
    let free = stat.f_bavail.saturating_mul(stat.f_frsize);
    if need > free {
        return Err(BackupError::NoRoom {
            data,
            dir: backup_dir.to_path_buf(),
            need,
            free,
        });
    }

    let dir = crate::tree::upgrade_dir(&plan.name, recase);
    let dir = dir.trim_start_matches("upgrades/");
    let date = crate::time::format_go("2006-01-02", SystemTime::now());
    let mut to = backup_dir.join(format!("data-backup-{date}-{dir}"));
    if to.exists() {
        // Another plan of the same name the same day (a re-proposed upgrade): keep both.
        to = backup_dir.join(format!("data-backup-{date}-{dir}-{}", plan.height));
    }
    let partial = backup_dir.join(format!("{PARTIAL_PREFIX}{dir}-{}", std::process::id()));
    let mut copier = Copier {
        cancel,
        bytes: 0,
        files: 0,
    };
    let copied = copier.copy_tree(&data, &partial).and_then(|()| {
        sync_dir(backup_dir)?;
        fs::rename(&partial, &to)?;
        sync_dir(backup_dir)
    });
    if let Err(e) = copied {
        // Nothing that looks like a backup is left behind: only complete copies carry the name.
        let _ = fs::remove_dir_all(&partial);
        return Err(if cancel.load(Ordering::Relaxed) {
            BackupError::Interrupted { to }
        } else {
            BackupError::Io {
                action: "back up data to",
                path: to,
                source: e,
            }
        });
    }
    let record = Record {
        upgrade: plan.name.clone(),
        height: plan.height,
        path: to,
        bytes_copied: copier.bytes,
        files: copier.files,
        millis: started.elapsed().as_millis() as u64,
        finished_at: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    write_record(&record_path(layout, plan, recase), &record)?;
    Ok(record)
}

/// Temp names of backups in progress; a complete backup never carries this prefix.
const PARTIAL_PREFIX: &str = ".data-backup-partial-";

/// Remove the leftovers of backups a crash (kill -9, power loss) cut short.
fn remove_partials(backup_dir: &Path) {
    let Ok(entries) = fs::read_dir(backup_dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(PARTIAL_PREFIX)
        {
            tracing::info!(
                "removing {}, left by an interrupted backup",
                entry.path().display()
            );
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

fn write_record(path: &Path, record: &Record) -> Result<(), BackupError> {
    let parent = path.parent().expect("records live in .cvx/backups");
    fs::create_dir_all(parent).map_err(io_err("create", parent))?;
    let mut tmp = tempfile::NamedTempFile::new_in(parent).map_err(io_err("write", path))?;
    serde_json::to_writer_pretty(&mut tmp, record).map_err(|e| io_err("write", path)(e.into()))?;
    tmp.as_file().sync_all().map_err(io_err("sync", path))?;
    tmp.persist(path)
        .map_err(|e| io_err("write", path)(e.error))?;
    Ok(())
}

fn tree_size(path: &Path) -> io::Result<u64> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        // A node that never wrote data/ has nothing to back up.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        return Ok(meta.len());
    }
    let mut total = 0;
    for entry in fs::read_dir(path)? {
        total += tree_size(&entry?.path())?;
    }
    Ok(total)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

struct Copier<'a> {
    cancel: &'a AtomicBool,
    bytes: u64,
    files: u64,
}

impl Copier<'_> {
    fn check(&self) -> io::Result<()> {
        if self.cancel.load(Ordering::Relaxed) {
            Err(io::Error::new(io::ErrorKind::Interrupted, "interrupted"))
        } else {
            Ok(())
        }
    }

    fn copy_tree(&mut self, from: &Path, to: &Path) -> io::Result<()> {
        self.check()?;
        let meta = match fs::symlink_metadata(from) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return fs::DirBuilder::new().mode(0o700).create(to);
            }
            Err(e) => return Err(e),
        };
        let file_type = meta.file_type();
        if file_type.is_dir() {
            fs::DirBuilder::new().mode(0o700).create(to)?;
            for entry in fs::read_dir(from)? {
                let entry = entry?;
                self.copy_tree(&entry.path(), &to.join(entry.file_name()))?;
            }
            fs::set_permissions(to, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
            sync_dir(to)
        } else if file_type.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(from)?, to)
        } else if file_type.is_file() {
            self.copy_file(from, to, &meta)
        } else {
            // Sockets and fifos carry no data to restore; the node recreates them.
            tracing::debug!("not backing up {}: not a regular file", from.display());
            Ok(())
        }
    }

    fn copy_file(&mut self, from: &Path, to: &Path, meta: &fs::Metadata) -> io::Result<()> {
        let mut source = File::open(from)?;
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(meta.mode() & 0o7777)
            .open(to)?;
        loop {
            self.check()?;
            // std copies File to File in the kernel (copy_file_range), chunk by chunk.
            let n = io::copy(&mut (&mut source).take(CHUNK), &mut out)?;
            self.bytes += n;
            if n < CHUNK {
                break;
            }
        }
        out.flush()?;
        out.sync_all()?;
        self.files += 1;
        Ok(())
    }
}

/// How long a backup took, for the log.
pub fn took(record: &Record) -> String {
    crate::duration::show(Duration::from_millis(record.millis))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(name: &str, height: u64) -> PlanInfo {
        PlanInfo {
            name: name.into(),
            height,
            info: String::new(),
        }
    }

    #[test]
    fn a_backup_is_recorded_once_per_plan_and_a_cancelled_one_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        fs::create_dir_all(home.join("data/db")).unwrap();
        fs::write(home.join("data/db/000001.log"), vec![1u8; 100_000]).unwrap();
        std::os::unix::fs::symlink("db/000001.log", home.join("data/link")).unwrap();
        let layout = Layout::new(&home);
        let backups = dir.path().join("backups");

        let stop = AtomicBool::new(true);
        let err = backup(&home, &backups, &layout, &plan("v2", 7), true, &stop).unwrap_err();
        assert!(matches!(err, BackupError::Interrupted { .. }), "{err}");
        assert_eq!(fs::read_dir(&backups).unwrap().count(), 0);
        assert!(taken(&layout, &plan("v2", 7), true).is_none());

        let go = AtomicBool::new(false);
        let record = backup(&home, &backups, &layout, &plan("V2", 7), true, &go).unwrap();
        assert_eq!((record.bytes_copied, record.files), (100_000, 1));
        assert!(
            record
                .path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .ends_with("-v2")
        );
        assert_eq!(
            fs::read(record.path.join("db/000001.log")).unwrap().len(),
            100_000
        );
        assert_eq!(
            fs::read_link(record.path.join("link")).unwrap(),
            Path::new("db/000001.log")
        );
        assert_eq!(taken(&layout, &plan("v2", 7), true), Some(record.clone()));
        assert!(
            taken(&layout, &plan("v2", 8), true).is_none(),
            "another height is another plan"
        );
        fs::remove_dir_all(&record.path).unwrap();
        assert!(
            taken(&layout, &plan("v2", 7), true).is_none(),
            "a record whose directory is gone is no backup"
        );
    }
}
