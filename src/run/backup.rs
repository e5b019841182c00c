//! The backup of `data/` before an upgrade (DESIGN §5.2), and its restore for `cvx rollback`.
//!
//! Fast: the table files of LSM databases (`*.ldb`, `*.sst` in a directory holding a `CURRENT`
//! file: goleveldb, pebble, rocksdb) are never modified after they are written, only deleted, so
//! they are reflinked where the file system can (XFS, btrfs) and hard-linked otherwise; everything
//! else (WALs, `MANIFEST-*`, `CURRENT`, `LOG`, JSON state, `cs.wal/`, anything unknown) is copied.
//! Where linking fails (another file system, permissions) the file is copied. The time then grows
//! with the number of files and the bytes of mutable files, not with the size of the chain. When
//! the upgrade's height is known, the backup is begun ahead while the node runs ([`Ahead`]), and
//! at the halt only what changed since is linked, removed or written.
//!
//! Safe: written under a temporary name, fsync'd, renamed to `data-backup-<date>-<upgrade>`, and
//! recorded under `.cvx/backups/` (once per plan). A backup never changes once complete, so every
//! file in it must be older than its completion: a table file modified in place later, through a
//! hard link, makes the backup *damaged*, and `cvx rollback` refuses it instead of restoring
//! silently corrupt state. Cancellable between chunks and files, leaving no complete-looking
//! directory behind.

use crate::errors::io_err;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
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
    #[error(transparent)]
    Io(#[from] crate::errors::IoError),
    #[error("backup to {} interrupted by a signal; the partial copy was removed", to.display())]
    Interrupted { to: PathBuf },
}

/// A finished backup, as recorded under `.cvx/backups/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The upgrade this backup precedes.
    pub upgrade: String,
    pub height: u64,
    pub path: PathBuf,
    /// What `current` pointed to when the backup was taken: the stage a rollback returns to.
    pub from_stage: String,
    pub bytes_copied: u64,
    pub files_copied: u64,
    /// Table files shared with `data/` (hard links) or cloned (reflinks), and their bytes.
    pub bytes_linked: u64,
    pub files_linked: u64,
    /// Of the linked tables, those linked ahead while the node still ran.
    #[serde(default)]
    pub files_linked_ahead: u64,
    pub millis: u64,
    /// When the backup completed, on the file system's clock, in nanoseconds since the Unix
    /// epoch: every file in it is older.
    pub finished_at_ns: i128,
}

impl Record {
    /// How long the backup took, for people.
    pub fn took(&self) -> String {
        crate::duration::show(Duration::from_millis(self.millis))
    }

    /// The first file in the backup changed since it completed (a table file modified in place
    /// through its hard link), if any: such a backup must not be restored.
    pub fn damage(&self) -> io::Result<Option<PathBuf>> {
        fn walk(dir: &Path, limit: i128) -> io::Result<Option<PathBuf>> {
            for entry in fs::read_dir(dir)? {
                let entry = entry?;
                let meta = entry.metadata()?;
                if meta.is_dir() {
                    if let Some(found) = walk(&entry.path(), limit)? {
                        return Ok(Some(found));
                    }
                } else if meta.is_file() && mtime_ns(&meta) >= limit {
                    return Ok(Some(entry.path()));
                }
            }
            Ok(None)
        }
        walk(&self.path, self.finished_at_ns)
    }
}

fn mtime_ns(meta: &fs::Metadata) -> i128 {
    ns(meta.mtime(), meta.mtime_nsec())
}

/// A file time (seconds and nanoseconds) in nanoseconds since the Unix epoch.
fn ns(secs: i64, nanos: i64) -> i128 {
    i128::from(secs) * 1_000_000_000 + i128::from(nanos)
}

/// `time` in nanoseconds since the Unix epoch.
fn epoch_ns(time: SystemTime) -> i128 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

/// Now, in nanoseconds since the Unix epoch.
fn now_ns() -> i128 {
    epoch_ns(SystemTime::now())
}

/// An error when `cancel` is set: a signal came, or the halt (for work begun ahead).
fn go_on(cancel: &AtomicBool) -> io::Result<()> {
    if cancel.load(Ordering::Relaxed) {
        Err(io::Error::new(io::ErrorKind::Interrupted, "interrupted"))
    } else {
        Ok(())
    }
}

/// Whether `a` and `b` are on one file system (so files can be linked from one to the other).
fn same_device(a: &Path, b: &Path) -> bool {
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev(),
        _ => false,
    }
}

/// Copy `from`'s bytes to the new file `to` (with `meta`'s mode) in the kernel, chunk by chunk,
/// looking at `cancel` between chunks; the copy, not yet synced, and its length.
fn copy_bytes(
    from: &Path,
    to: &Path,
    meta: &fs::Metadata,
    cancel: &AtomicBool,
) -> io::Result<(File, u64)> {
    let mut source = File::open(from)?;
    let mut out = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(meta.mode() & 0o7777)
        .open(to)?;
    let mut bytes = 0;
    loop {
        go_on(cancel)?;
        // std copies File to File in the kernel (copy_file_range).
        let n = io::copy(&mut (&mut source).take(CHUNK), &mut out)?;
        bytes += n;
        if n < CHUNK {
            return Ok((out, bytes));
        }
    }
}

/// Give `out` `meta`'s access and modification times, as `cp -a` does, a time ahead of the clock
/// becoming now (a backup's completion must be later than every file in it); the time set.
fn keep_times(out: &File, meta: &fs::Metadata) -> io::Result<i128> {
    let now = SystemTime::now();
    let modified = meta.modified()?.min(now);
    out.set_times(
        fs::FileTimes::new()
            .set_accessed(meta.accessed()?.min(now))
            .set_modified(modified),
    )?;
    Ok(epoch_ns(modified))
}

/// A time on the file system's own clock that is later than `newest` (the newest mtime in the
/// backup). File times come from a coarse clock (a few ms per tick) behind the real one, so the
/// time of a write just after the backup can equal the backup's last write: waiting for the next
/// tick lets "changed after completion" be `mtime >= finished`, exactly.
fn fs_clock_after(dir: &Path, newest: i128) -> io::Result<i128> {
    let stamp = dir.join(format!(".cvx-clock-{}", std::process::id()));
    let started = Instant::now();
    let result = loop {
        let file = File::create(&stamp)?;
        let now = mtime_ns(&file.metadata()?);
        if now > newest {
            break Ok(now);
        }
        // A tick is a few ms; no file in the backup is dated ahead of the clock (see copy_file).
        if started.elapsed() > Duration::from_secs(1) {
            break Err(io::Error::other(
                "the file system's clock stays behind the newest file in the backup",
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let _ = fs::remove_file(&stamp);
    result
}

/// Where the record of the backup taken before `plan` lives: one file per plan (name and height).
fn record_path(layout: &Layout, plan: &PlanInfo, recase: bool) -> PathBuf {
    let dir = crate::tree::upgrade_dir(&plan.name, recase);
    let dir = dir.trim_start_matches("upgrades/");
    records_dir(layout).join(format!("{dir}-{}.json", plan.height))
}

fn records_dir(layout: &Layout) -> PathBuf {
    layout.cvx().join("backups")
}

/// The backup already taken for `plan`, if its record and its directory are both still there.
pub fn taken(layout: &Layout, plan: &PlanInfo, recase: bool) -> Option<Record> {
    let bytes = fs::read(record_path(layout, plan, recase)).ok()?;
    let record: Record = serde_json::from_slice(&bytes).ok()?;
    record.path.is_dir().then_some(record)
}

/// Every recorded backup, by height; unreadable records are skipped with a warning.
pub fn list(layout: &Layout) -> Vec<Record> {
    let Ok(entries) = fs::read_dir(records_dir(layout)) else {
        return Vec::new();
    };
    let mut records: Vec<Record> = entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| {
            match fs::read(e.path())
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            {
                Ok(record) => Some(record),
                Err(why) => {
                    tracing::warn!("ignoring backup record {}: {why}", e.path().display());
                    None
                }
            }
        })
        .collect();
    records.sort_by_key(|r: &Record| (r.height, r.finished_at_ns));
    records
}

/// Back up `home/data` into `backup_dir` for `plan` (taken while `current` is `from_stage`),
/// refusing early when the room for the copied bytes is short, and record it. `cancel` is checked
/// between chunks; when it is set the partial copy is removed. `ahead`: the tables linked while
/// the node ran, used when it was for this plan (then only what changed since is linked).
#[allow(clippy::too_many_arguments)]
pub fn backup(
    home: &Path,
    backup_dir: &Path,
    layout: &Layout,
    plan: &PlanInfo,
    from_stage: &str,
    recase: bool,
    cancel: &AtomicBool,
    ahead: Option<Ahead>,
) -> Result<Record, BackupError> {
    let started = Instant::now();
    let data = data_dir(home);
    fs::create_dir_all(backup_dir).map_err(io_err("create", backup_dir))?;
    let partial = partial_path(backup_dir, plan, recase);
    let made_ahead = ahead.and_then(|ahead| ahead.adopt(&partial));
    remove_partials(
        backup_dir,
        PARTIAL_PREFIX,
        made_ahead.map(|_| partial.as_path()),
    );
    let same_device = same_device(&data, backup_dir);
    // What was copied ahead already takes its room.
    let need = bytes_to_copy(&data, same_device)
        .map_err(io_err("measure", &data))?
        .saturating_sub(made_ahead.map_or(0, |made| made.bytes));
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
    let mut copier = Copier::new(cancel, same_device);
    if let Some(made) = made_ahead {
        copier.ahead = true;
        if made.tables > 0 {
            // Linking ahead found that tables are hard-linked here, not cloned.
            copier.sharing = Sharing::HardLink;
        }
    }
    if let Err(e) = copier.replicate(&data, &partial, &to, backup_dir) {
        return Err(if cancel.load(Ordering::Relaxed) {
            BackupError::Interrupted { to }
        } else {
            io_err("back up data to", &to)(e).into()
        });
    }
    let finished_at_ns = fs_clock_after(backup_dir, copier.newest_ns)
        .map_err(io_err("read the file system's clock in", backup_dir))?;
    let record = Record {
        upgrade: plan.name.clone(),
        height: plan.height,
        path: to,
        from_stage: from_stage.to_string(),
        bytes_copied: copier.bytes_copied,
        files_copied: copier.files_copied,
        bytes_linked: copier.bytes_linked,
        files_linked: copier.files_linked,
        files_linked_ahead: copier.files_linked_ahead,
        millis: started.elapsed().as_millis() as u64,
        finished_at_ns,
    };
    write_record(&record_path(layout, plan, recase), &record)?;
    Ok(record)
}

/// The next backup, begun ahead of an upgrade whose height is known while the node still runs:
/// its table files hard-linked into the backup's temporary directory on a thread of their own.
/// At the halt the backup adopts it and only brings it up to date (a table is never rewritten
/// under its name, so a link whose name still holds the same file is right), and the downtime no
/// longer grows with the number of tables. Dropped unadopted, it removes what it made.
pub struct Ahead {
    partial: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Made>>,
}

/// What was made ahead: the tables linked and the bytes copied.
#[derive(Debug, Default, Clone, Copy)]
struct Made {
    tables: u64,
    bytes: u64,
}

impl Ahead {
    /// Begin the backup of `home`'s data/ for `plan` into `backup_dir`. None where tables would
    /// not be hard-linked (`backup_dir` on another file system) or no thread can be had.
    pub fn start(home: &Path, backup_dir: &Path, plan: &PlanInfo, recase: bool) -> Option<Ahead> {
        let data = data_dir(home);
        // As the backup itself would; a failure here is the backup's to report at the halt.
        let _ = fs::create_dir_all(backup_dir);
        if !(data.is_dir() && same_device(&data, backup_dir)) {
            return None;
        }
        remove_partials(backup_dir, PARTIAL_PREFIX, None);
        let partial = partial_path(backup_dir, plan, recase);
        let stop = Arc::new(AtomicBool::new(false));
        let (to, flag, upgrade, height) = (
            partial.clone(),
            Arc::clone(&stop),
            plan.name.clone(),
            plan.height,
        );
        let thread = std::thread::Builder::new()
            .name("cvx-backup-ahead".into())
            .spawn(move || {
                let started = Instant::now();
                let mut made = Made::default();
                // Copies ahead take room the node may need: only while plenty is left.
                let copy = bytes_to_copy(&data, true).is_ok_and(|need| {
                    let parent = to.parent().unwrap_or(&to);
                    rustix::fs::statvfs(parent).is_ok_and(|stat| {
                        need <= stat.f_bavail.saturating_mul(stat.f_frsize) / 2
                    })
                });
                match prepare(&data, &to, copy, &flag, &mut made) {
                    Ok(()) => tracing::info!(
                        upgrade,
                        height,
                        "linked {} table files into the backup ahead and copied {} bytes, in {}",
                        made.tables,
                        made.bytes,
                        crate::duration::show(started.elapsed())
                    ),
                    Err(e) => tracing::info!(
                        upgrade,
                        height,
                        "linking table files ahead stopped after {} ({e}); the backup links the rest at the halt",
                        made.tables
                    ),
                }
                made
            })
            .ok()?;
        Some(Ahead {
            partial,
            stop,
            thread: Some(thread),
        })
    }

    /// Stop linking; what was made.
    fn halt(&mut self) -> Made {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|thread| thread.join().ok())
            .unwrap_or_default()
    }

    /// Taken over by the backup whose temporary directory is `partial`: what was made, or None
    /// (and what was made removed) when it was begun for another plan.
    fn adopt(mut self, partial: &Path) -> Option<Made> {
        let made = self.halt();
        if self.partial != partial || !partial.is_dir() {
            return None;
        }
        self.partial = PathBuf::new();
        Some(made)
    }
}

impl Drop for Ahead {
    fn drop(&mut self) {
        self.halt();
        if !self.partial.as_os_str().is_empty() {
            let _ = fs::remove_dir_all(&self.partial);
        }
    }
}

/// Mirror the directories of `from` into `to`, hard-link the table files of its databases and,
/// when `copy`, copy the other files, while the node runs. A file that changes or goes meanwhile
/// is the backup's to bring up to date at the halt; each copy is synced now, so that at the halt
/// only what changed since is written.
fn prepare(
    from: &Path,
    to: &Path,
    copy: bool,
    stop: &AtomicBool,
    made: &mut Made,
) -> io::Result<()> {
    fs::DirBuilder::new().mode(0o700).create(to)?;
    let dirs = if is_database(from) {
        Some(Dirs::open(from, to)?)
    } else {
        None
    };
    for entry in fs::read_dir(from)? {
        go_on(stop)?;
        let entry = entry?;
        let (name, kind) = (entry.file_name(), entry.file_type()?);
        if kind.is_dir() {
            prepare(&entry.path(), &to.join(&name), copy, stop, made)?;
            continue;
        }
        if copy && kind.is_file() && !(dirs.is_some() && is_table(&name, true)) {
            match copy_ahead(&entry.path(), &to.join(&name), stop) {
                Ok(bytes) => made.bytes += bytes,
                // Gone since the listing (a rotated log).
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            continue;
        }
        let Some(dirs) = dirs
            .as_ref()
            .filter(|_| kind.is_file() && is_table(&name, true))
        else {
            continue;
        };
        if made.tables == 0 && clones(dirs, &name) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this file system clones files: the backup clones the tables at the halt",
            ));
        }
        match rustix::fs::linkat(
            &dirs.from,
            &name,
            &dirs.to,
            &name,
            rustix::fs::AtFlags::empty(),
        ) {
            Ok(()) => made.tables += 1,
            // Compacted away since the listing.
            Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(e.into()),
        }
    }
    // Its links durable now: the halt's sync then commits only what changed since.
    sync_dir(to)
}

/// Copy `from` to the new file `to` while the node may write it, and sync it. The copy gets the
/// source's time as read before the copy; a write during or after the copy sets the source's
/// change time at or after the copy's birth, which tells the backup at the halt to compare them.
fn copy_ahead(from: &Path, to: &Path, stop: &AtomicBool) -> io::Result<u64> {
    let meta = fs::metadata(from)?;
    let (out, bytes) = copy_bytes(from, to, &meta, stop)?;
    keep_times(&out, &meta)?;
    out.sync_all()?;
    Ok(bytes)
}

/// Whether the file system clones the table `name` (XFS, btrfs). There the backup clones every
/// table at the halt, each an independent file, and nothing is linked ahead.
fn clones(dirs: &Dirs, name: &std::ffi::OsStr) -> bool {
    use rustix::fs::{Mode, OFlags};
    const PROBE: &str = ".cvx-clone-probe";
    let Ok(source) = rustix::fs::openat(
        &dirs.from,
        name,
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return false;
    };
    let Ok(out) = rustix::fs::openat(
        &dirs.to,
        PROBE,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
        Mode::RUSR | Mode::WUSR,
    ) else {
        return false;
    };
    let cloned = rustix::fs::ioctl_ficlone(&out, &source).is_ok();
    let _ = rustix::fs::unlinkat(&dirs.to, PROBE, rustix::fs::AtFlags::empty());
    cloned
}

/// Restore `record`'s backup as `home/data`, by the same rules (tables linked, the rest copied,
/// so the backup stays as it was for another restore). The current `data/` is renamed to
/// `data-rolled-back-<date>-<upgrade>` beside it, never deleted. Returns where it went. The
/// restored `data/` belongs to `owner` when there is one (root restoring the node user's home).
pub fn restore(
    home: &Path,
    record: &Record,
    owner: Option<crate::owner::Owner>,
) -> Result<PathBuf, BackupError> {
    // Beside data/'s own directory, which may sit on a volume of its own behind a symlink: the
    // link stays, and what it points to is restored.
    let data = data_dir(home);
    let parent = data.parent().unwrap_or(home);
    remove_partials(parent, RESTORE_PREFIX, None);
    let partial = parent.join(format!("{RESTORE_PREFIX}{}", std::process::id()));
    let same_device = same_device(parent, &record.path);
    let never = AtomicBool::new(false);
    let mut copier = Copier::new(&never, same_device);
    // Build the restored tree completely before touching data/.
    copier
        .walk(&record.path, &partial)
        .and_then(|()| crate::owner::give_tree(owner, &partial))
        .and_then(|()| copier.sync())
        .and_then(|()| sync_dir(parent))
        .map_err(|e| {
            let _ = fs::remove_dir_all(&partial);
            io_err("restore the backup into", &partial)(e)
        })?;
    let date = crate::time::format_go("2006-01-02T15-04-05", SystemTime::now());
    let dir = crate::tree::upgrade_dir(&record.upgrade, true);
    let aside = parent.join(format!(
        "data-rolled-back-{date}-{}",
        dir.trim_start_matches("upgrades/")
    ));
    if data.exists() {
        fs::rename(&data, &aside).map_err(io_err("move aside", &data))?;
    }
    fs::rename(&partial, &data).map_err(io_err("put the restored data in place at", &data))?;
    sync_dir(parent).map_err(io_err("sync", parent))?;
    Ok(aside)
}

/// Temp names of backups and restores in progress; a complete one never carries them.
const PARTIAL_PREFIX: &str = ".data-backup-partial-";
const RESTORE_PREFIX: &str = ".data-restore-partial-";

/// The temporary name of the backup for `plan` by this process.
fn partial_path(backup_dir: &Path, plan: &PlanInfo, recase: bool) -> PathBuf {
    let dir = crate::tree::upgrade_dir(&plan.name, recase);
    let dir = dir.trim_start_matches("upgrades/");
    backup_dir.join(format!(
        "{PARTIAL_PREFIX}{dir}-{}-{}",
        plan.height,
        std::process::id()
    ))
}

/// Remove the leftovers of backups or restores a crash (kill -9, power loss) cut short, but not
/// `keep`, nor those of another live process (a backup directory two nodes share).
fn remove_partials(dir: &Path, prefix: &str, keep: Option<&Path>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let own = std::process::id();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name.rsplit('-').next().and_then(|p| p.parse::<u32>().ok());
        let live_other = pid.is_some_and(|pid| {
            pid != own
                && rustix::process::Pid::from_raw(pid as i32)
                    // EPERM: alive, another user's.
                    .is_some_and(|pid| {
                        rustix::process::test_kill_process(pid) != Err(rustix::io::Errno::SRCH)
                    })
        });
        if name.starts_with(prefix) && !live_other && keep != Some(entry.path().as_path()) {
            tracing::info!(
                "removing {}, left by an interrupted run",
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

/// A table file of an LSM database: never modified after it is written (the rule that makes
/// linking safe). Only in a directory that holds the database's `CURRENT` file.
fn is_table(name: &std::ffi::OsStr, in_database: bool) -> bool {
    in_database
        && Path::new(name)
            .extension()
            .is_some_and(|x| x == "ldb" || x == "sst")
}

fn is_database(dir: &Path) -> bool {
    dir.join("CURRENT").is_file()
}

/// `home/data`, or the directory it links to: operators keep data/ on a volume of its own behind
/// a symlink, and what is backed up is its contents, not the link.
fn data_dir(home: &Path) -> PathBuf {
    let data = home.join("data");
    match fs::symlink_metadata(&data) {
        Ok(meta) if meta.file_type().is_symlink() => fs::canonicalize(&data).unwrap_or(data),
        _ => data,
    }
}

/// The bytes a backup of `home`'s data/ into `backup_dir` would copy now.
pub fn copied_bytes(home: &Path, backup_dir: &Path) -> io::Result<u64> {
    let data = data_dir(home);
    let same_device = fs::metadata(&data)?.dev() == fs::metadata(backup_dir)?.dev();
    bytes_to_copy(&data, same_device)
}

/// The bytes a backup of `path` will copy: everything but the table files it can link.
fn bytes_to_copy(path: &Path, same_device: bool) -> io::Result<u64> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        // A node that never wrote data/ has nothing to back up.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        return Ok(if meta.is_file() { meta.len() } else { 0 });
    }
    let in_database = same_device && is_database(path);
    let mut total = 0;
    for entry in fs::read_dir(path)? {
        let entry = entry?;
        if !is_table(&entry.file_name(), in_database) {
            total += bytes_to_copy(&entry.path(), same_device)?;
        }
    }
    Ok(total)
}

/// Make `out` hold the bytes of `source`, writing only the blocks that differ.
fn patch(source: &mut File, out: &mut File, cancel: &AtomicBool) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    const BLOCK: usize = 64 << 10;
    let (mut want, mut have) = (vec![0u8; BLOCK], vec![0u8; BLOCK]);
    let mut offset = 0u64;
    loop {
        go_on(cancel)?;
        let n = read_full(source, &mut want)?;
        if n == 0 {
            break;
        }
        let m = read_full(out, &mut have[..n])?;
        if m != n || want[..n] != have[..n] {
            out.write_all_at(&want[..n], offset)?;
        }
        offset += n as u64;
    }
    out.set_len(offset)
}

/// Read until `buf` is full or the file ends; the bytes read.
fn read_full(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Remove a file, a link or a whole directory.
fn remove_any(path: &Path) -> io::Result<()> {
    if fs::symlink_metadata(path)?.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// How table files can be shared with the source, learnt on the first try and kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sharing {
    Reflink,
    HardLink,
    Copy,
}

struct Copier<'a> {
    cancel: &'a AtomicBool,
    sharing: Sharing,
    bytes_copied: u64,
    files_copied: u64,
    bytes_linked: u64,
    files_linked: u64,
    files_linked_ahead: u64,
    /// The newest mtime of anything written or linked into the copy.
    newest_ns: i128,
    /// Written, not yet synced: files, then the directories that name them.
    unsynced: Vec<File>,
    dirs: Vec<PathBuf>,
    /// Where hard links of table files go while `walk` runs: to a thread of their own.
    linker: Option<mpsc::SyncSender<Link>>,
    /// Set when the copy was begun ahead, while the node ran: it is brought up to date.
    ahead: bool,
}

/// A database directory and its copy, open, for links relative to them.
struct Dirs {
    from: OwnedFd,
    to: OwnedFd,
    from_path: PathBuf,
    to_path: PathBuf,
}

impl Dirs {
    /// `from` and its copy `to`, both existing directories, opened for links relative to them.
    fn open(from: &Path, to: &Path) -> io::Result<Dirs> {
        let open = |dir: &Path| {
            rustix::fs::open(
                dir,
                rustix::fs::OFlags::RDONLY
                    | rustix::fs::OFlags::DIRECTORY
                    | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
        };
        Ok(Dirs {
            from: open(from)?,
            to: open(to)?,
            from_path: from.to_path_buf(),
            to_path: to.to_path_buf(),
        })
    }
}

/// A table file to hard-link: `name` from one database directory into its copy, with its size
/// and modification time (read by the walking thread, so the linker only links).
struct Link {
    dirs: Arc<Dirs>,
    name: OsString,
    size: u64,
    mtime_ns: i128,
}

impl Link {
    fn paths(&self) -> (PathBuf, PathBuf) {
        (
            self.dirs.from_path.join(&self.name),
            self.dirs.to_path.join(&self.name),
        )
    }
}

/// Links waiting for the linker, at most: a database holds tens of thousands of tables, and the
/// queue is held in the supervisor's memory.
const LINK_QUEUE: usize = 8192;

/// What the linker did: the links made, and the tables it could not link (to be copied).
#[derive(Default)]
struct Linked {
    bytes: u64,
    files: u64,
    newest_ns: i128,
    failed: Vec<(PathBuf, PathBuf)>,
}

/// Make the links sent on `links` until the sender is dropped. Each link is a directory entry
/// (one journal update); made relative to the directories' descriptors, as a path walk per file,
/// twice, would be most of what a link costs.
fn link_all(links: mpsc::Receiver<Link>, cancel: &AtomicBool) -> io::Result<Linked> {
    let mut linked = Linked::default();
    for link in links {
        go_on(cancel)?;
        let (src, dst) = (&link.dirs.from, &link.dirs.to);
        match rustix::fs::linkat(
            src,
            &link.name,
            dst,
            &link.name,
            rustix::fs::AtFlags::empty(),
        ) {
            Ok(()) => {
                linked.bytes += link.size;
                linked.files += 1;
                linked.newest_ns = linked.newest_ns.max(link.mtime_ns);
            }
            Err(e) => {
                if linked.failed.is_empty() {
                    tracing::debug!(
                        "cannot hard-link {} ({e}); copying it instead",
                        link.paths().0.display()
                    );
                }
                linked.failed.push(link.paths());
            }
        }
    }
    Ok(linked)
}

/// Copied files held open for the final sync, at most: beyond, they are synced as they come.
const UNSYNCED: usize = 256;
/// Threads that sync the held files at the end.
const SYNC_THREADS: usize = 8;

impl<'a> Copier<'a> {
    fn new(cancel: &'a AtomicBool, same_device: bool) -> Self {
        Copier {
            cancel,
            sharing: if same_device {
                Sharing::Reflink
            } else {
                Sharing::Copy
            },
            bytes_copied: 0,
            files_copied: 0,
            bytes_linked: 0,
            files_linked: 0,
            files_linked_ahead: 0,
            newest_ns: 0,
            unsynced: Vec::new(),
            dirs: Vec::new(),
            linker: None,
            ahead: false,
        }
    }

    fn check(&self) -> io::Result<()> {
        go_on(self.cancel)
    }

    /// `from` copied to `partial`, then renamed to `to` inside `parent`; on failure nothing is
    /// left under either name.
    fn replicate(
        &mut self,
        from: &Path,
        partial: &Path,
        to: &Path,
        parent: &Path,
    ) -> io::Result<()> {
        let result = (|| {
            match fs::symlink_metadata(from) {
                Ok(_) => self.walk(from, partial)?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if self.ahead {
                        // data/ gone since the copy was begun ahead: nothing of it stays.
                        fs::remove_dir_all(partial)?;
                    }
                    fs::DirBuilder::new().mode(0o700).create(partial)?;
                }
                Err(e) => return Err(e),
            }
            // The copy durable first, then its final name: a crash leaves a partial name or a
            // complete backup, never a complete-looking name on missing bytes.
            self.sync()?;
            fs::rename(partial, to)?;
            sync_dir(parent)
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(partial);
        }
        result
    }

    /// `copy_tree` of `from` to `to`, with the table files hard-linked on a second thread while
    /// this one copies the rest: the two take about as long on a node's data.
    fn walk(&mut self, from: &Path, to: &Path) -> io::Result<()> {
        let cancel = self.cancel;
        std::thread::scope(|scope| {
            let (links, received) = mpsc::sync_channel(LINK_QUEUE);
            let Ok(linker) = std::thread::Builder::new()
                .name("cvx-backup-links".into())
                .spawn_scoped(scope, move || link_all(received, cancel))
            else {
                // No thread to be had (a tasks limit): this one links as it goes.
                return self.copy_tree(from, to, true);
            };
            self.linker = Some(links);
            let walked = self.copy_tree(from, to, true);
            // Dropping the sender ends the linker's loop.
            self.linker = None;
            let linked = linker.join().expect("the linker does not panic");
            walked?;
            let linked = linked?;
            self.bytes_linked += linked.bytes;
            self.files_linked += linked.files;
            self.newest_ns = self.newest_ns.max(linked.newest_ns);
            for (from, to) in linked.failed {
                self.check()?;
                let meta = fs::symlink_metadata(&from)?;
                self.copy_file(&from, &to, &meta)?;
            }
            Ok(())
        })
    }

    fn copy_tree(&mut self, from: &Path, to: &Path, in_database: bool) -> io::Result<()> {
        self.check()?;
        let meta = fs::symlink_metadata(from)?;
        let file_type = meta.file_type();
        if file_type.is_dir() {
            self.make_dir(to)?;
            let database = is_database(from);
            let dirs = if database {
                Some(Arc::new(Dirs::open(from, to)?))
            } else {
                None
            };
            // Tables first, as they come, so the linker starts at once; the rest (a few files)
            // follows on this thread.
            let mut rest = Vec::new();
            let now = now_ns();
            // In a copy begun ahead: the names here now, to remove what the node deleted since.
            let mut names = self.ahead.then(std::collections::HashSet::new);
            for entry in fs::read_dir(from)? {
                let entry = entry?;
                let name = entry.file_name();
                if let Some(names) = &mut names {
                    names.insert(name.clone());
                }
                if !(is_table(&name, database) && entry.file_type()?.is_file()) {
                    rest.push(entry);
                    continue;
                }
                if let Some(dirs) = &dirs
                    && self.ahead
                    && self.sharing == Sharing::HardLink
                    && self.linked_ahead(dirs, &entry, now)?
                {
                    continue;
                }
                match (&dirs, &self.linker) {
                    (Some(dirs), Some(linker)) if self.sharing == Sharing::HardLink => {
                        let meta = entry.metadata()?;
                        if mtime_ns(&meta) > now {
                            // Dated ahead of the clock (set back since): no completion time
                            // could be later, so the damage check could not vouch for a link.
                            // A copy gets today's time.
                            self.copy_file(&entry.path(), &to.join(&name), &meta)?;
                            continue;
                        }
                        let link = Link {
                            dirs: Arc::clone(dirs),
                            name,
                            size: meta.len(),
                            mtime_ns: mtime_ns(&meta),
                        };
                        if linker.send(link).is_err() {
                            // The linker stopped (interrupted, or an error it reports at the join).
                            return self.check();
                        }
                    }
                    // Reflinked or copied here; the first table also settles which.
                    _ => self.copy_tree(&entry.path(), &to.join(&name), database)?,
                }
            }
            for entry in rest {
                self.copy_tree(&entry.path(), &to.join(entry.file_name()), database)?;
            }
            if let Some(names) = names {
                // Tables compacted away, logs rotated, directories dropped since. The linker may
                // still be adding links here, all of them under names in the set.
                for entry in fs::read_dir(to)? {
                    let entry = entry?;
                    if !names.contains(&entry.file_name()) {
                        remove_any(&entry.path())?;
                    }
                }
            }
            fs::set_permissions(to, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
            self.dirs.push(to.to_path_buf());
            Ok(())
        } else if file_type.is_symlink() {
            self.clear(to)?;
            std::os::unix::fs::symlink(fs::read_link(from)?, to)
        } else if file_type.is_file() {
            if self.ahead && self.update(from, to, &meta)? {
                return Ok(());
            }
            self.clear(to)?;
            let name = from.file_name().unwrap_or_default();
            if is_table(name, in_database) && self.share(from, to, &meta)? {
                self.bytes_linked += meta.len();
                self.files_linked += 1;
                return Ok(());
            }
            self.copy_file(from, to, &meta)
        } else {
            // Sockets and fifos carry no data to restore; the node recreates them.
            tracing::debug!("not backing up {}: not a regular file", from.display());
            Ok(())
        }
    }

    /// Create the directory `to`; in a copy begun ahead, it may be there already.
    fn make_dir(&mut self, to: &Path) -> io::Result<()> {
        match fs::DirBuilder::new().mode(0o700).create(to) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && self.ahead => {
                if fs::symlink_metadata(to)?.is_dir() {
                    Ok(())
                } else {
                    remove_any(to)?;
                    fs::DirBuilder::new().mode(0o700).create(to)
                }
            }
            made => made,
        }
    }

    /// In a copy begun ahead: true when the table `entry` was linked ahead and is still the same
    /// file (the same inode: a table is never rewritten under its name), counted as linked. A link
    /// to a file the name no longer holds is removed, to be made again.
    fn linked_ahead(&mut self, dirs: &Dirs, entry: &fs::DirEntry, now: i128) -> io::Result<bool> {
        use std::os::unix::fs::DirEntryExt;
        let name = entry.file_name();
        let stat = match rustix::fs::statat(&dirs.to, &name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
        {
            Ok(stat) => stat,
            Err(rustix::io::Errno::NOENT) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        let mtime = ns(stat.st_mtime, stat.st_mtime_nsec as i64);
        let file =
            rustix::fs::FileType::from_raw_mode(stat.st_mode) == rustix::fs::FileType::RegularFile;
        // Dated ahead of the clock: copied instead, as when nothing was linked ahead.
        if file && stat.st_ino == entry.ino() && mtime <= now {
            self.bytes_linked += stat.st_size as u64;
            self.files_linked += 1;
            self.files_linked_ahead += 1;
            self.newest_ns = self.newest_ns.max(mtime);
            return Ok(true);
        }
        remove_any(&dirs.to_path.join(&name))?;
        Ok(false)
    }

    /// In a copy begun ahead: bring the copy of `from` made ahead at `to` up to date, writing only
    /// what differs (a log appended since, a state file rewritten); false when there is none to
    /// update. A copy whose size and time are still the source's, with the source unchanged since
    /// before the copy was made, is left as it is: it was synced when made.
    fn update(&mut self, from: &Path, to: &Path, meta: &fs::Metadata) -> io::Result<bool> {
        let copy = match fs::symlink_metadata(to) {
            Ok(copy) => copy,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        let modified = mtime_ns(meta);
        // A link shares its bytes with data/ (more than one name): never written through. A time
        // ahead of the clock is copied afresh, as it would be without the copy made ahead.
        if !copy.is_file() || copy.nlink() != 1 || modified > now_ns() {
            return Ok(false);
        }
        let born = copy.created().ok().map(epoch_ns);
        // Every write, and a rename over the name, sets the source's change time (ctime), which
        // nothing can set back: one older than the copy's birth means no change since it.
        let changed = ns(meta.ctime(), meta.ctime_nsec());
        let unchanged = copy.len() == meta.len()
            && mtime_ns(&copy) == modified
            && born.is_some_and(|born| changed < born);
        if !unchanged {
            let mut out = fs::OpenOptions::new().read(true).write(true).open(to)?;
            patch(&mut File::open(from)?, &mut out, self.cancel)?;
            keep_times(&out, meta)?;
            self.hold(out)?;
        }
        if copy.mode() & 0o7777 != meta.mode() & 0o7777 {
            fs::set_permissions(to, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        }
        self.bytes_copied += meta.len();
        self.files_copied += 1;
        self.newest_ns = self.newest_ns.max(modified);
        Ok(true)
    }

    /// In a copy begun ahead, remove what is at `to` before writing there: only a table linked
    /// ahead can be, under a name that is no longer a table's (its database lost `CURRENT`).
    fn clear(&self, to: &Path) -> io::Result<()> {
        if !self.ahead {
            return Ok(());
        }
        match remove_any(to) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            cleared => cleared,
        }
    }

    /// Share a table file: reflink, else hard link; false when neither works here (then it is
    /// copied, and the next tables are copied without trying again).
    fn share(&mut self, from: &Path, to: &Path, meta: &fs::Metadata) -> io::Result<bool> {
        if self.sharing == Sharing::Reflink {
            let source = File::open(from)?;
            let out = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(meta.mode() & 0o7777)
                .open(to)?;
            match rustix::fs::ioctl_ficlone(&out, &source) {
                Ok(()) => {
                    // A clone is a new file: its own time, and its extents to make durable.
                    self.newest_ns = self.newest_ns.max(mtime_ns(&out.metadata()?));
                    self.hold(out)?;
                    return Ok(true);
                }
                Err(_) => {
                    // Not on this file system (ext4, tmpfs) or not across these two files.
                    drop(out);
                    fs::remove_file(to)?;
                    self.sharing = Sharing::HardLink;
                }
            }
        }
        if self.sharing == Sharing::HardLink && mtime_ns(meta) > now_ns() {
            // As in `link_all`: a link dated ahead of the clock could not be vouched for.
            return Ok(false);
        }
        if self.sharing == Sharing::HardLink {
            match fs::hard_link(from, to) {
                Ok(()) => {
                    // The same inode: the source's time is the link's.
                    self.newest_ns = self.newest_ns.max(mtime_ns(meta));
                    return Ok(true);
                }
                Err(e) => {
                    tracing::debug!(
                        "cannot hard-link {} ({e}); copying table files instead",
                        from.display()
                    );
                    self.sharing = Sharing::Copy;
                }
            }
        }
        Ok(false)
    }

    fn copy_file(&mut self, from: &Path, to: &Path, meta: &fs::Metadata) -> io::Result<()> {
        let (out, bytes) = copy_bytes(from, to, meta, self.cancel)?;
        self.bytes_copied += bytes;
        // The source's times: the backup's newest time is then the node's last write, long
        // enough ago that completion needs no wait for the file system's clock.
        self.newest_ns = self.newest_ns.max(keep_times(&out, meta)?);
        self.files_copied += 1;
        // Start writing the copy to disk now rather than at the final sync; its pages are not
        // needed in the cache (nothing reads a backup until a rollback).
        // A hint only: where the file system ignores it, the final sync does the writing.
        let _ = rustix::fs::fadvise(&out, 0, None, rustix::fs::Advice::DontNeed);
        self.hold(out)
    }

    /// Keep `file` open for the final sync; past UNSYNCED held files, sync it now instead.
    fn hold(&mut self, file: File) -> io::Result<()> {
        if self.unsynced.len() >= UNSYNCED {
            file.sync_all()
        } else {
            self.unsynced.push(file);
            Ok(())
        }
    }

    /// Make everything written durable: the files first, then the directories naming them,
    /// deepest first. Synced together at the end, the file system commits them in one journal
    /// transaction or few (each fsync right after its copy would wait for a commit of its own);
    /// not syncfs, which would also flush whatever else is dirty on the disk, at a cost no one
    /// could predict.
    fn sync(&mut self) -> io::Result<()> {
        // From a few threads at once, so the file system can commit them together.
        let files = std::mem::take(&mut self.unsynced);
        let threads = files.len().clamp(1, SYNC_THREADS);
        let sync_every = |first: usize| {
            files
                .iter()
                .skip(first)
                .step_by(threads)
                .try_for_each(File::sync_all)
        };
        std::thread::scope(|scope| {
            let syncs: Vec<_> = (0..threads)
                .map(|first| {
                    std::thread::Builder::new()
                        .name("cvx-backup-sync".into())
                        .spawn_scoped(scope, move || sync_every(first))
                        // No thread to be had: this one syncs that share.
                        .map_err(|_| sync_every(first))
                })
                .collect();
            syncs.into_iter().try_for_each(|sync| match sync {
                Ok(thread) => thread.join().expect("fsync does not panic"),
                Err(synced) => synced,
            })
        })?;
        for dir in self.dirs.drain(..).rev() {
            sync_dir(&dir)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    fn plan(name: &str, height: u64) -> PlanInfo {
        PlanInfo {
            name: name.into(),
            height,
            info: String::new(),
        }
    }

    /// A home whose data/ holds an LSM database (two tables, a WAL, CURRENT, MANIFEST), a table
    /// name outside any database, and a symlink.
    fn home() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let db = home.join("data/application.db");
        fs::create_dir_all(&db).unwrap();
        fs::write(db.join("CURRENT"), "MANIFEST-000004\n").unwrap();
        fs::write(db.join("MANIFEST-000004"), vec![4u8; 1000]).unwrap();
        fs::write(db.join("000005.ldb"), vec![5u8; 300_000]).unwrap();
        fs::write(db.join("000006.sst"), vec![6u8; 200_000]).unwrap();
        fs::write(db.join("000007.log"), vec![7u8; 100_000]).unwrap();
        fs::write(home.join("data/loose.sst"), vec![8u8; 10]).unwrap();
        std::os::unix::fs::symlink("application.db/CURRENT", home.join("data/link")).unwrap();
        (dir, home)
    }

    /// The backup before v2 at height 7, taken while genesis runs, uninterrupted.
    fn back_up(home: &Path, backups: &Path) -> Record {
        back_up_ahead(home, backups, None)
    }

    /// The same, given what was begun ahead.
    fn back_up_ahead(home: &Path, backups: &Path, ahead: Option<Ahead>) -> Record {
        let go = AtomicBool::new(false);
        let layout = Layout::new(home);
        backup(
            home,
            backups,
            &layout,
            &plan("v2", 7),
            "genesis",
            true,
            &go,
            ahead,
        )
        .unwrap()
    }

    #[test]
    fn tables_are_shared_the_rest_copied_and_a_cancelled_backup_leaves_nothing() {
        let (dir, home) = home();
        let layout = Layout::new(&home);
        let backups = dir.path().join("backups");

        let stop = AtomicBool::new(true);
        let err = backup(
            &home,
            &backups,
            &layout,
            &plan("v2", 7),
            "genesis",
            true,
            &stop,
            None,
        )
        .unwrap_err();
        assert!(matches!(err, BackupError::Interrupted { .. }), "{err}");
        assert_eq!(fs::read_dir(&backups).unwrap().count(), 0);
        assert!(taken(&layout, &plan("v2", 7), true).is_none());

        let go = AtomicBool::new(false);
        let record = backup(
            &home,
            &backups,
            &layout,
            &plan("V2", 7),
            "genesis",
            true,
            &go,
            None,
        )
        .unwrap();
        assert_eq!((record.files_linked, record.bytes_linked), (2, 500_000));
        assert_eq!(
            (record.files_copied, record.bytes_copied),
            (4, 16 + 1000 + 100_000 + 10),
            "CURRENT, MANIFEST, the WAL, and a table name outside a database"
        );
        assert_eq!(record.from_stage, "genesis");
        let wal = "application.db/000007.log";
        assert_eq!(
            fs::metadata(record.path.join(wal))
                .unwrap()
                .modified()
                .unwrap(),
            fs::metadata(home.join("data").join(wal))
                .unwrap()
                .modified()
                .unwrap(),
            "a copy keeps its source's time, as cp -a does"
        );
        assert!(
            record
                .path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .ends_with("-v2")
        );
        assert_eq!(
            fs::read_link(record.path.join("link")).unwrap(),
            Path::new("application.db/CURRENT")
        );
        assert_eq!(record.damage().unwrap(), None);
        assert_eq!(taken(&layout, &plan("v2", 7), true), Some(record.clone()));
        assert!(
            taken(&layout, &plan("v2", 8), true).is_none(),
            "another height is another plan"
        );
        assert_eq!(list(&layout), vec![record.clone()]);

        // The database moves on as databases do: the backup does not.
        let db = home.join("data/application.db");
        fs::OpenOptions::new()
            .append(true)
            .open(db.join("000007.log"))
            .unwrap()
            .write_all(b"more")
            .unwrap();
        fs::write(db.join("CURRENT"), "MANIFEST-000009\n").unwrap();
        fs::remove_file(db.join("000005.ldb")).unwrap();
        let backed = record.path.join("application.db");
        assert_eq!(
            fs::read(backed.join("000007.log")).unwrap(),
            vec![7u8; 100_000]
        );
        assert_eq!(
            fs::read(backed.join("CURRENT")).unwrap(),
            b"MANIFEST-000004\n"
        );
        assert_eq!(
            fs::read(backed.join("000005.ldb")).unwrap(),
            vec![5u8; 300_000]
        );
        assert_eq!(record.damage().unwrap(), None);

        // A table modified in place: through a hard link the backup changed, and says so.
        let shared = fs::metadata(backed.join("000006.sst")).unwrap().nlink() > 1;
        fs::OpenOptions::new()
            .append(true)
            .open(db.join("000006.sst"))
            .unwrap()
            .write_all(b"!")
            .unwrap();
        let damage = record.damage().unwrap();
        if shared {
            assert_eq!(damage, Some(backed.join("000006.sst")));
        } else {
            assert_eq!(damage, None, "a reflinked or copied table is independent");
        }

        fs::remove_dir_all(&record.path).unwrap();
        assert!(
            taken(&layout, &plan("v2", 7), true).is_none(),
            "a record whose directory is gone is no backup"
        );
    }

    #[test]
    fn files_dated_ahead_of_the_clock_are_copied_with_todays_time_and_the_backup_completes() {
        let (dir, home) = home();
        let db = home.join("data/application.db");
        // The clock was set back after these were written (an NTP step, a restored snapshot).
        let tomorrow = SystemTime::now() + Duration::from_secs(86_400);
        for name in ["000005.ldb", "000006.sst", "000007.log"] {
            File::options()
                .write(true)
                .open(db.join(name))
                .unwrap()
                .set_modified(tomorrow)
                .unwrap();
        }
        let record = back_up(&home, &dir.path().join("backups"));

        assert_eq!(
            (record.files_linked, record.files_copied),
            (0, 6),
            "the tables copied, not linked"
        );
        let backed = record.path.join("application.db");
        for name in ["000005.ldb", "000006.sst", "000007.log"] {
            let copy = fs::metadata(backed.join(name)).unwrap();
            assert_eq!(copy.nlink(), 1);
            assert!(copy.modified().unwrap() < tomorrow, "{name}");
        }
        assert_eq!(record.damage().unwrap(), None);
        assert!(record.finished_at_ns < now_ns() + 1_000_000_000);
    }

    #[test]
    fn a_table_the_linker_cannot_link_is_handed_back_to_be_copied() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("db"), dir.path().join("copy"));
        fs::create_dir_all(&from).unwrap();
        fs::create_dir_all(&to).unwrap();
        for name in ["000001.ldb", "000002.ldb"] {
            fs::write(from.join(name), name).unwrap();
        }
        // A name already taken in the copy: linkat refuses it (EEXIST).
        fs::write(to.join("000002.ldb"), "in the way").unwrap();
        let dirs = Arc::new(Dirs::open(&from, &to).unwrap());
        let (links, received) = mpsc::channel();
        for name in ["000001.ldb", "000002.ldb"] {
            links
                .send(Link {
                    dirs: Arc::clone(&dirs),
                    name: name.into(),
                    size: 10,
                    mtime_ns: 1,
                })
                .unwrap();
        }
        drop(links);
        let linked = link_all(received, &AtomicBool::new(false)).unwrap();

        assert_eq!((linked.files, linked.bytes, linked.newest_ns), (1, 10, 1));
        assert_eq!(
            linked.failed,
            vec![(from.join("000002.ldb"), to.join("000002.ldb"))]
        );
        assert_eq!(fs::metadata(to.join("000001.ldb")).unwrap().nlink(), 2);
    }

    #[test]
    fn a_data_directory_behind_a_symlink_is_backed_up_and_restored_through_it() {
        let (dir, home) = home();
        // data/ on a volume of its own, linked from the home.
        let volume = dir.path().join("volume/node-data");
        fs::create_dir_all(volume.parent().unwrap()).unwrap();
        fs::rename(home.join("data"), &volume).unwrap();
        std::os::unix::fs::symlink(&volume, home.join("data")).unwrap();
        let backups = dir.path().join("backups");
        fs::create_dir_all(&backups).unwrap();
        assert_eq!(
            copied_bytes(&home, &backups).unwrap(),
            16 + 1000 + 100_000 + 10
        );

        let record = back_up(&home, &backups);

        assert!(fs::symlink_metadata(&record.path).unwrap().is_dir());
        assert_eq!((record.files_linked, record.files_copied), (2, 4));
        assert_eq!(
            fs::read(record.path.join("application.db/MANIFEST-000004")).unwrap(),
            vec![4u8; 1000]
        );
        fs::write(volume.join("migrated"), "v2").unwrap();

        let aside = restore(&home, &record, None).unwrap();

        assert_eq!(aside.parent(), volume.parent(), "kept aside on the volume");
        assert_eq!(fs::read(aside.join("migrated")).unwrap(), b"v2");
        assert_eq!(
            fs::read_link(home.join("data")).unwrap(),
            volume,
            "the link stays"
        );
        assert!(!volume.join("migrated").exists());
        assert_eq!(
            fs::read(volume.join("application.db/000005.ldb")).unwrap(),
            vec![5u8; 300_000]
        );
    }

    /// `a` and `b` hold the same names, bytes and symlink targets.
    fn assert_same_tree(a: &Path, b: &Path) {
        let names = |dir: &Path| {
            let mut names: Vec<_> = fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            names
        };
        assert_eq!(names(a), names(b), "{} and {}", a.display(), b.display());
        for name in names(a) {
            let (x, y) = (a.join(&name), b.join(&name));
            let kind = fs::symlink_metadata(&x).unwrap().file_type();
            assert_eq!(kind, fs::symlink_metadata(&y).unwrap().file_type());
            if kind.is_dir() {
                assert_same_tree(&x, &y);
            } else if kind.is_symlink() {
                assert_eq!(fs::read_link(&x).unwrap(), fs::read_link(&y).unwrap());
            } else {
                assert!(
                    fs::read(&x).unwrap() == fs::read(&y).unwrap(),
                    "{}",
                    x.display()
                );
            }
        }
    }

    /// `ahead` done linking (it is not stopped: the test wants all of it).
    fn linked(ahead: &Ahead) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ahead.thread.as_ref().is_none_or(|t| t.is_finished()) {
            assert!(Instant::now() < deadline, "linking ahead never finished");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_backup_begun_ahead_is_brought_up_to_date_at_the_halt() {
        let (dir, home) = home();
        let data = home.join("data");
        let db = data.join("application.db");
        fs::write(db.join("000008.ldb"), vec![8u8; 100]).unwrap();
        fs::write(db.join("000009.ldb"), vec![9u8; 1000]).unwrap();
        let state = data.join("state.json");
        fs::write(&state, "{\"height\":\"6\"}").unwrap();
        let old = data.join("old.db");
        fs::create_dir_all(&old).unwrap();
        fs::write(old.join("CURRENT"), "MANIFEST-000001\n").unwrap();
        fs::write(old.join("000001.ldb"), "old").unwrap();
        let backups = dir.path().join("backups");
        fs::create_dir_all(&backups).unwrap();

        let ahead = Ahead::start(&home, &backups, &plan("v2", 7), true).unwrap();
        linked(&ahead);
        let partial = partial_path(&backups, &plan("v2", 7), true);
        assert_eq!(
            fs::metadata(partial.join("application.db/000009.ldb"))
                .unwrap()
                .ino(),
            fs::metadata(db.join("000009.ldb")).unwrap().ino(),
            "tables linked while the node runs"
        );
        let wal = partial.join("application.db/000007.log");
        assert_eq!(
            fs::read(&wal).unwrap(),
            vec![7u8; 100_000],
            "the rest copied"
        );
        let copied_ahead = fs::metadata(&wal).unwrap().ino();

        // The node runs on until the halt: it compacts, flushes, drops a database, adds one.
        fs::remove_file(db.join("000005.ldb")).unwrap();
        fs::write(db.join("000010.ldb"), vec![10u8; 2000]).unwrap();
        fs::remove_file(db.join("000006.sst")).unwrap();
        fs::write(db.join("000006.sst"), vec![66u8; 500]).unwrap();
        fs::write(db.join("CURRENT"), "MANIFEST-000011\n").unwrap();
        fs::OpenOptions::new()
            .append(true)
            .open(db.join("000007.log"))
            .unwrap()
            .write_all(b"appended")
            .unwrap();
        // Rewritten in place, the same size: only the bytes tell.
        fs::OpenOptions::new()
            .write(true)
            .open(db.join("MANIFEST-000004"))
            .unwrap()
            .write_all_at(b"edit", 500)
            .unwrap();
        fs::remove_file(data.join("loose.sst")).unwrap();
        // Replaced by a rename, the same size and time: only the change time tells.
        let written = fs::metadata(&state).unwrap().modified().unwrap();
        let next = data.join("state.json.tmp");
        fs::write(&next, "{\"height\":\"7\"}").unwrap();
        File::options()
            .write(true)
            .open(&next)
            .unwrap()
            .set_modified(written)
            .unwrap();
        fs::rename(&next, &state).unwrap();
        fs::remove_dir_all(&old).unwrap();
        let snapshots = data.join("snapshots/metadata.db");
        fs::create_dir_all(&snapshots).unwrap();
        fs::write(snapshots.join("CURRENT"), "MANIFEST-000002\n").unwrap();
        fs::write(snapshots.join("000003.sst"), "snap").unwrap();
        // A linked table whose time is now ahead of the clock (set back): copied instead.
        File::options()
            .write(true)
            .open(db.join("000009.ldb"))
            .unwrap()
            .set_modified(SystemTime::now() + Duration::from_secs(86_400))
            .unwrap();

        let record = back_up_ahead(&home, &backups, Some(ahead));

        assert_same_tree(&data, &record.path);
        let backed = record.path.join("application.db");
        assert_eq!(
            fs::metadata(backed.join("000007.log")).unwrap().ino(),
            copied_ahead,
            "the copy made ahead, brought up to date"
        );
        assert_eq!(
            fs::metadata(backed.join("000006.sst")).unwrap().ino(),
            fs::metadata(db.join("000006.sst")).unwrap().ino(),
            "a name that holds another file now is linked to it"
        );
        assert_eq!(fs::metadata(backed.join("000009.ldb")).unwrap().nlink(), 1);
        assert_eq!(
            (record.files_linked, record.bytes_linked),
            (4, 100 + 500 + 2000 + 4),
            "000008.ldb, 000006.sst, 000010.ldb and snapshots' 000003.sst"
        );
        assert_eq!(
            record.files_linked_ahead, 1,
            "000008.ldb, unchanged since it was linked ahead, is not linked again"
        );
        assert_eq!(
            record.files_copied, 6,
            "CURRENT twice, MANIFEST, the WAL, the state and the table dated ahead"
        );
        assert_eq!(record.damage().unwrap(), None);
        let left: Vec<_> = fs::read_dir(&backups)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(
            left,
            vec![record.path.clone()],
            "no temporary directory left"
        );
    }

    #[test]
    fn a_backup_begun_ahead_for_another_plan_is_removed_and_partials_of_live_processes_are_kept() {
        let (dir, home) = home();
        let backups = dir.path().join("backups");
        fs::create_dir_all(&backups).unwrap();
        // pid 1 lives; a reaped child does not.
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        gone.wait().unwrap();
        let live = backups.join(format!("{PARTIAL_PREFIX}v2-7-1"));
        let dead = backups.join(format!("{PARTIAL_PREFIX}v2-7-{}", gone.id()));
        fs::create_dir_all(&live).unwrap();
        fs::create_dir_all(&dead).unwrap();

        let ahead = Ahead::start(&home, &backups, &plan("v3", 9), true).unwrap();
        linked(&ahead);
        assert!(!dead.exists(), "a crashed run's leftovers are removed");
        let other = partial_path(&backups, &plan("v3", 9), true);
        assert!(other.join("application.db/000005.ldb").exists());

        let record = back_up_ahead(&home, &backups, Some(ahead));

        assert!(!other.exists(), "begun for v3: removed");
        assert!(
            live.exists(),
            "another live process's backup in progress is left alone"
        );
        assert_eq!((record.files_linked, record.files_copied), (2, 4));
        assert_same_tree(&home.join("data"), &record.path);

        let unused = Ahead::start(&home, &backups, &plan("v3", 9), true).unwrap();
        linked(&unused);
        assert!(other.exists());
        drop(unused);
        assert!(!other.exists(), "dropped unused, it removes its links");
    }

    #[test]
    fn a_restore_keeps_the_current_data_and_leaves_the_backup_usable() {
        let (dir, home) = home();
        let record = back_up(&home, &dir.path().join("backups"));
        fs::write(
            home.join("data/application.db/CURRENT"),
            "MANIFEST-000009\n",
        )
        .unwrap();
        fs::write(home.join("data/migrated"), "v2").unwrap();

        let aside = restore(&home, &record, None).unwrap();

        assert_eq!(fs::read(aside.join("migrated")).unwrap(), b"v2");
        assert!(!home.join("data/migrated").exists());
        assert_eq!(
            fs::read(home.join("data/application.db/CURRENT")).unwrap(),
            b"MANIFEST-000004\n"
        );
        // The restored WAL is a copy: the node appending to it leaves the backup as it was.
        fs::OpenOptions::new()
            .append(true)
            .open(home.join("data/application.db/000007.log"))
            .unwrap()
            .write_all(b"more")
            .unwrap();
        assert_eq!(
            fs::read(record.path.join("application.db/000007.log"))
                .unwrap()
                .len(),
            100_000
        );
        assert_eq!(record.damage().unwrap(), None);
    }
}
