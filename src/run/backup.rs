//! The backup of `data/` before an upgrade (DESIGN §5.2), and its restore for `cvx rollback`.
//!
//! Fast: the table files of LSM databases (`*.ldb`, `*.sst` in a directory holding a `CURRENT`
//! file: goleveldb, pebble, rocksdb) are never modified after they are written, only deleted, so
//! they are reflinked where the file system can (XFS, btrfs) and hard-linked otherwise; everything
//! else (WALs, `MANIFEST-*`, `CURRENT`, `LOG`, JSON state, `cs.wal/`, anything unknown) is copied.
//! Where linking fails (another file system, permissions) the file is copied. The time then grows
//! with the number of files and the bytes of mutable files, not with the size of the chain.
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
use std::io::{self, Read, Write};
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
    i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec())
}

/// Now, in nanoseconds since the Unix epoch.
fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
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
/// between chunks; when it is set the partial copy is removed.
pub fn backup(
    home: &Path,
    backup_dir: &Path,
    layout: &Layout,
    plan: &PlanInfo,
    from_stage: &str,
    recase: bool,
    cancel: &AtomicBool,
) -> Result<Record, BackupError> {
    let started = Instant::now();
    let data = data_dir(home);
    fs::create_dir_all(backup_dir).map_err(io_err("create", backup_dir))?;
    remove_partials(backup_dir, PARTIAL_PREFIX);
    let same_device = match (fs::metadata(&data), fs::metadata(backup_dir)) {
        (Ok(d), Ok(b)) => d.dev() == b.dev(),
        _ => false,
    };
    let need = bytes_to_copy(&data, same_device).map_err(io_err("measure", &data))?;
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
    let mut copier = Copier::new(cancel, same_device);
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
        millis: started.elapsed().as_millis() as u64,
        finished_at_ns,
    };
    write_record(&record_path(layout, plan, recase), &record)?;
    Ok(record)
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
    remove_partials(parent, RESTORE_PREFIX);
    let partial = parent.join(format!("{RESTORE_PREFIX}{}", std::process::id()));
    let same_device = match (fs::metadata(parent), fs::metadata(&record.path)) {
        (Ok(h), Ok(b)) => h.dev() == b.dev(),
        _ => false,
    };
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

/// Remove the leftovers of backups or restores a crash (kill -9, power loss) cut short.
fn remove_partials(dir: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(prefix) {
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
    /// The newest mtime of anything written or linked into the copy.
    newest_ns: i128,
    /// Written, not yet synced: files, then the directories that name them.
    unsynced: Vec<File>,
    dirs: Vec<PathBuf>,
    /// Where hard links of table files go while `walk` runs: to a thread of their own.
    linker: Option<mpsc::SyncSender<Link>>,
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
        if cancel.load(Ordering::Relaxed) {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "interrupted"));
        }
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
            newest_ns: 0,
            unsynced: Vec::new(),
            dirs: Vec::new(),
            linker: None,
        }
    }

    fn check(&self) -> io::Result<()> {
        if self.cancel.load(Ordering::Relaxed) {
            Err(io::Error::new(io::ErrorKind::Interrupted, "interrupted"))
        } else {
            Ok(())
        }
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
            fs::DirBuilder::new().mode(0o700).create(to)?;
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
            for entry in fs::read_dir(from)? {
                let entry = entry?;
                let name = entry.file_name();
                if !(is_table(&name, database) && entry.file_type()?.is_file()) {
                    rest.push(entry);
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
            fs::set_permissions(to, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
            self.dirs.push(to.to_path_buf());
            Ok(())
        } else if file_type.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(from)?, to)
        } else if file_type.is_file() {
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
            self.bytes_copied += n;
            if n < CHUNK {
                break;
            }
        }
        out.flush()?;
        // The source's times, as `cp -a` keeps them: the backup's newest time is then the node's
        // last write, long enough ago that completion needs no wait for the file system's clock.
        // A time ahead of the clock becomes now: completion must be later than every file.
        let now = SystemTime::now();
        let modified = meta.modified()?.min(now);
        out.set_times(
            fs::FileTimes::new()
                .set_accessed(meta.accessed()?.min(now))
                .set_modified(modified),
        )?;
        let modified = modified
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        self.newest_ns = self.newest_ns.max(modified);
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
        let go = AtomicBool::new(false);
        let layout = Layout::new(home);
        backup(home, backups, &layout, &plan("v2", 7), "genesis", true, &go).unwrap()
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
