//! `cvx backup list` and `cvx rollback <upgrade>` (DESIGN §5.2): undo a bad upgrade in seconds.
//!
//! A rollback restores the backup taken before the upgrade (tables linked, the rest copied, so the
//! backup stays usable), keeps the current `data/` aside under a new name (nothing is deleted),
//! points `current` at the stage that ran before, and prints the restart command: the restored
//! `data/` still holds the plan, so the old binary must be told to skip its height.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::backup::{self, BackupError, Record};
use crate::errors::io_err;
use crate::tree::{self, Layout, lock};

#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    #[error("no backup was taken before upgrade {upgrade:?} in {}{}", dir.display(), if known.is_empty() { String::new() } else { format!(" (backups exist before: {})", known.join(", ")) })]
    NoBackup {
        upgrade: String,
        dir: PathBuf,
        known: Vec<String>,
    },
    #[error("the backup {} is gone", path.display())]
    Gone { path: PathBuf },
    #[error("the backup {} is damaged: {} changed after the backup completed (a table file modified in place through its hard link); refusing to restore it", backup.display(), file.display())]
    Damaged { backup: PathBuf, file: PathBuf },
    #[error("cvx run (pid {pid}) supervises {}: stop it before rolling back", home.display())]
    Supervised { pid: u32, home: PathBuf },
    #[error("a node answers on {rpc} (the RPC of {}): stop it before rolling back", home.display())]
    NodeRunning { rpc: String, home: PathBuf },
    #[error("the stage {stage} that ran before the upgrade is not in {}", root.display())]
    NoStage { stage: String, root: PathBuf },
    #[error(transparent)]
    Locked(#[from] crate::tree::lock::LockError),
    #[error(transparent)]
    Backup(#[from] BackupError),
    #[error("cannot point current to {stage}")]
    Switch {
        stage: String,
        #[source]
        source: std::io::Error,
    },
}

impl RollbackError {
    pub fn hint(&self) -> Option<String> {
        match self {
            RollbackError::NoBackup { .. } => Some("`cvx backup list` shows the backups cvx took; a backup exists only for upgrades cvx run performed with backups on".into()),
            RollbackError::Supervised { .. } | RollbackError::NodeRunning { .. } => {
                Some("e.g. `systemctl stop <the node's unit>`, then run the rollback again".into())
            }
            RollbackError::Damaged { .. } => Some("restore from another snapshot; README, \"Backups and rollback\", explains the hard-link rule".into()),
            _ => None,
        }
    }
}

/// One backup as `cvx backup list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Listed {
    #[serde(flatten)]
    pub record: Record,
    /// `ok`, `missing` (the directory is gone) or `damaged`.
    pub state: &'static str,
    /// For a damaged backup, the first file that changed after it completed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changed: Option<PathBuf>,
}

/// Every backup recorded for the tree at `layout`, checked (a stat per file).
pub fn list(layout: &Layout) -> Vec<Listed> {
    backup::list(layout)
        .into_iter()
        .map(|record| {
            let (state, changed) = if !record.path.is_dir() {
                ("missing", None)
            } else {
                match record.damage() {
                    Ok(None) => ("ok", None),
                    Ok(Some(file)) => ("damaged", Some(file)),
                    Err(e) => {
                        tracing::warn!("cannot check {}: {e}", record.path.display());
                        ("damaged", None)
                    }
                }
            };
            Listed {
                record,
                state,
                changed,
            }
        })
        .collect()
}

/// What a rollback does (or, with `--check`, would do).
#[derive(Debug, Clone, Serialize)]
pub struct Rollback {
    pub upgrade: String,
    pub height: u64,
    pub backup: PathBuf,
    /// Where the current `data/` goes (renamed, not deleted); set once done.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_kept_at: Option<PathBuf>,
    /// `current` now, and the stage it points to afterwards.
    pub current_from: String,
    pub current_to: String,
    /// The daemon's flag that makes the old binary skip the upgrade it would halt for again.
    pub skip_flag: String,
    pub restart: String,
    pub done: bool,
}

/// Check that a rollback of `upgrade` can run, and what it would do.
pub fn prepare(
    home: &Path,
    layout: &Layout,
    upgrade: &str,
    recase: bool,
) -> Result<(Record, Rollback), RollbackError> {
    let wanted = tree::upgrade_dir(upgrade, recase);
    let records = backup::list(layout);
    let record = records
        .iter()
        .filter(|r| tree::upgrade_dir(&r.upgrade, recase) == wanted)
        .max_by_key(|r| (r.height, r.finished_at_ns))
        .cloned()
        .ok_or_else(|| RollbackError::NoBackup {
            upgrade: upgrade.to_string(),
            dir: layout.cvx().join("backups"),
            known: records.iter().map(|r| r.upgrade.clone()).collect(),
        })?;
    if !record.path.is_dir() {
        return Err(RollbackError::Gone { path: record.path });
    }
    if let Some(file) = record
        .damage()
        .map_err(|e| BackupError::from(io_err("check", &record.path)(e)))?
    {
        return Err(RollbackError::Damaged {
            backup: record.path,
            file,
        });
    }
    if !layout.root().join(&record.from_stage).join("bin").is_dir() {
        return Err(RollbackError::NoStage {
            stage: record.from_stage,
            root: layout.root(),
        });
    }
    let skip_flag = format!("--unsafe-skip-upgrades {}", record.height);
    let plan = Rollback {
        upgrade: record.upgrade.clone(),
        height: record.height,
        backup: record.path.clone(),
        data_kept_at: None,
        current_from: tree::current_stage(layout),
        current_to: record.from_stage.clone(),
        restart: format!("cvx run start --home {} {skip_flag}", home.display()),
        skip_flag,
        done: false,
    };
    Ok((record, plan))
}

/// Roll back: refuse while a supervisor or a node runs, then restore, keep, re-point.
pub async fn execute(
    home: &Path,
    layout: &Layout,
    record: &Record,
    mut plan: Rollback,
) -> Result<Rollback, RollbackError> {
    // As root on the node user's home, the lock files and `.cvx/` are theirs: `cvx run start`,
    // as that user, takes the same locks afterwards.
    let owner = layout.owner();
    let give = |path: &Path| {
        crate::owner::give(owner, path)
            .map_err(|e| BackupError::from(io_err("set the owner of", path)(e)))
    };
    crate::owner::create_dir_all(owner, &layout.cvx())
        .map_err(|e| BackupError::from(io_err("create", &layout.cvx())(e)))?;
    let _supervisor = super::SupervisorLock::take(layout).map_err(|holder| match holder {
        super::Holder::Pid(pid) => RollbackError::Supervised {
            pid,
            home: home.to_path_buf(),
        },
        super::Holder::Io(e) => RollbackError::Backup(e),
    })?;
    give(&layout.cvx().join("supervisor.lock"))?;
    if let Some(rpc) = super::watch::rpc_address(home)
        && super::watch::node_height(&rpc).await.is_some()
    {
        return Err(RollbackError::NodeRunning {
            rpc,
            home: home.to_path_buf(),
        });
    }
    let _lock = lock::lock(layout, std::time::Duration::ZERO, lock::Role::Rollback)?;
    let aside = backup::restore(home, record, owner)?;
    crate::apply::install::point_current(layout, &record.from_stage).map_err(|source| {
        RollbackError::Switch {
            stage: record.from_stage.clone(),
            source,
        }
    })?;
    plan.data_kept_at = Some(aside);
    plan.done = true;
    Ok(plan)
}
