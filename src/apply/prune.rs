//! `cvx prune`: remove what the manifest no longer needs from the tree.
//!
//! - Stage directories under `upgrades/` that the manifest does not name, unless `current`
//!   points to one or a pending `data/upgrade-info.json` names it (the node needs those), with
//!   their receipts.
//! - Files kept aside under `.cvx/replaced/` beyond the newest [`KEEP_REPLACED`] of each path.
//!
//! `genesis` and every stage the manifest names are never touched. Works under the tree lock, so
//! it never races an apply or a switch by `cvx run`; `--check` says what it would remove and
//! removes nothing.

use crate::errors::io_err;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::tree::{self, Layout, UpgradeInfo};

/// Replaced files kept per path: enough to go back a few steps, not a growing pile.
pub const KEEP_REPLACED: usize = 3;

/// What prune removed (or, with `--check`, would remove) and what it kept on purpose.
#[derive(Debug, Clone, Serialize)]
pub struct Pruned {
    pub changed: bool,
    /// `--check`: nothing was removed.
    pub check: bool,
    pub removed: Vec<Removal>,
    /// Stages the manifest does not name, kept because the node needs them.
    pub kept: Vec<Kept>,
    /// Bytes removed (or that would be).
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum What {
    /// A stage directory, `upgrades/<dir>`.
    Stage,
    /// A file kept aside when apply replaced it.
    Replaced,
}

#[derive(Debug, Clone, Serialize)]
pub struct Removal {
    pub what: What,
    /// Relative to `$DAEMON_HOME/cosmovisor`.
    pub path: String,
    pub bytes: u64,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Kept {
    /// Relative to `$DAEMON_HOME/cosmovisor`.
    pub path: String,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error(transparent)]
    Io(#[from] crate::errors::IoError),
}

/// Prune the tree at `layout`, keeping the stages in `managed` (`genesis`, `upgrades/<dir>`).
/// The caller holds the tree lock unless `check`.
pub fn prune(
    layout: &Layout,
    managed: &std::collections::BTreeSet<String>,
    recase: bool,
    check: bool,
) -> Result<Pruned, PruneError> {
    let root = layout.root();
    let current = tree::current_stage(layout);
    let pending = match tree::inspect_upgrade_info(layout) {
        UpgradeInfo::Valid(plan) => Some(tree::upgrade_dir(&plan.name, recase)),
        _ => None,
    };
    let mut pruned = Pruned {
        changed: false,
        check,
        removed: Vec::new(),
        kept: Vec::new(),
        bytes: 0,
    };

    let upgrades = root.join("upgrades");
    let mut stages: Vec<String> = match fs::read_dir(&upgrades) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| format!("upgrades/{}", e.file_name().to_string_lossy()))
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io_err("read", &upgrades)(e).into()),
    };
    stages.sort();
    for stage in stages.into_iter().filter(|s| !managed.contains(s)) {
        if stage == current {
            pruned.kept.push(Kept {
                path: stage,
                reason: "not in the manifest, but current points to it".into(),
            });
            continue;
        }
        if pending.as_deref() == Some(stage.as_str()) {
            pruned.kept.push(Kept {
                path: stage,
                reason: "not in the manifest, but data/upgrade-info.json names it: the node will switch to it".into(),
            });
            continue;
        }
        let dir = root.join(&stage);
        let bytes = size(&dir).map_err(io_err("measure", &dir))?;
        if !check {
            fs::remove_dir_all(&dir).map_err(io_err("remove", &dir))?;
            let receipts = layout.receipts().join(&stage);
            match fs::remove_dir_all(&receipts) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(io_err("remove", &receipts)(e).into());
                }
                _ => {}
            }
            tracing::info!("removed {stage}: the manifest does not name it");
        }
        pruned.bytes += bytes;
        pruned.removed.push(Removal {
            what: What::Stage,
            path: stage,
            bytes,
            reason: "on disk, not in the manifest".into(),
        });
    }

    let replaced = layout.replaced();
    let mut groups: std::collections::BTreeMap<PathBuf, Vec<(u128, PathBuf, u64)>> =
        Default::default();
    collect_replaced(&replaced, &mut groups).map_err(io_err("read", &replaced))?;
    for (path, mut kept) in groups {
        // Newest first; the rest goes.
        kept.sort_by_key(|k| std::cmp::Reverse(k.0));
        let label = path.strip_prefix(&root).unwrap_or(&path);
        let label = label
            .strip_prefix(".cvx/replaced")
            .unwrap_or(label)
            .display()
            .to_string();
        for (_, file, bytes) in kept.into_iter().skip(KEEP_REPLACED) {
            if !check {
                fs::remove_file(&file).map_err(io_err("remove", &file))?;
            }
            pruned.bytes += bytes;
            pruned.removed.push(Removal {
                what: What::Replaced,
                path: file
                    .strip_prefix(&root)
                    .unwrap_or(&file)
                    .display()
                    .to_string(),
                bytes,
                reason: format!("older than the newest {KEEP_REPLACED} kept for {label}"),
            });
        }
    }
    if !check {
        remove_empty_dirs(&replaced);
    }
    pruned.changed = !pruned.removed.is_empty();
    Ok(pruned)
}

/// Files under `.cvx/replaced`, grouped by the path they were replaced at (the directory and
/// the name before the time suffix), each with its time, path and size.
fn collect_replaced(
    dir: &Path,
    groups: &mut std::collections::BTreeMap<PathBuf, Vec<(u128, PathBuf, u64)>>,
) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let meta = fs::symlink_metadata(entry.path())?;
        if meta.is_dir() {
            collect_replaced(&entry.path(), groups)?;
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((base, time)) = split_stamp(&name) else {
            continue;
        };
        groups
            .entry(dir.join(base))
            .or_default()
            .push((time, entry.path(), meta.len()));
    }
    Ok(())
}

/// `simd.2025-01-02T03:04:05.123456789Z` (or, from older cvx, `simd.<unix nanoseconds>`) into
/// the name and the time in nanoseconds.
fn split_stamp(name: &str) -> Option<(&str, u128)> {
    const STAMP: usize = "2025-01-02T03:04:05.123456789Z".len();
    if name.len() > STAMP + 1 && name.is_char_boundary(name.len() - STAMP - 1) {
        let (base, stamp) = name.split_at(name.len() - STAMP - 1);
        if let Some(time) = stamp.strip_prefix('.').and_then(crate::time::parse_rfc3339) {
            return Some((base, u128::from(time)));
        }
    }
    let (base, digits) = name.rsplit_once('.')?;
    Some((base, digits.parse().ok()?))
}

/// Bytes of the regular files under `path`.
fn size(path: &Path) -> io::Result<u64> {
    let meta = fs::symlink_metadata(path)?;
    if !meta.is_dir() {
        return Ok(if meta.is_file() { meta.len() } else { 0 });
    }
    let mut total = 0;
    for entry in fs::read_dir(path)? {
        total += size(&entry?.path())?;
    }
    Ok(total)
}

/// Remove the directories left empty under `dir` (not `dir` itself).
fn remove_empty_dirs(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_empty_dirs(&path);
            // Fails while anything is left in it, which is the point.
            let _ = fs::remove_dir(&path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_old_and_new() {
        assert_eq!(
            split_stamp("simd.2025-01-02T03:04:05.000000001Z"),
            Some(("simd", 1_735_787_045_000_000_001))
        );
        assert_eq!(
            split_stamp("libwasmvm.x86_64.so.1700000000000000000"),
            Some(("libwasmvm.x86_64.so", 1_700_000_000_000_000_000))
        );
        assert_eq!(split_stamp("simd"), None);
        assert_eq!(split_stamp("notes.txt"), None);
    }
}
