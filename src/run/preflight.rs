//! Preflight (DESIGN §5.4): what `cvx run start` checks before it launches the daemon, and again
//! at an interval while the daemon runs. What makes the supervisor itself unworkable is refused
//! now, with the fix. What will only bite at the next upgrade is a warning, repeated while it
//! lasts: never cause downtime now for a problem that is days away.

use std::path::Path;

use rustix::fs::Access;
use serde::{Deserialize, Serialize};

use super::binary::{self, Pins};
use super::config::Config;
use crate::tree::{self, Layout};

/// One problem that will bite at the next upgrade.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Warning {
    /// What is checked: `backup_dir`, `backup_room`, `next_binary`, `shutdown_grace`.
    pub check: String,
    pub message: String,
}

fn warning(check: &str, message: String) -> Warning {
    Warning {
        check: check.to_string(),
        message,
    }
}

/// Whether this process may `access` `path`.
fn can(path: &Path, access: Access) -> bool {
    rustix::fs::access(path, access).is_ok()
}

/// What makes the supervisor unworkable: it could start the daemon but never switch it.
pub fn unworkable(layout: &Layout) -> Vec<String> {
    let mut problems = Vec::new();
    let root = layout.root();
    if root.is_dir() && !can(&root, Access::WRITE_OK | Access::EXEC_OK) {
        problems.push(format!(
            "cannot write {}: cvx could not replace `current` at the upgrade (fix the owner, e.g. `chown -R <node user> {}`)",
            root.display(),
            root.display()
        ));
    }
    let receipts = layout.receipts();
    if receipts.is_dir() && !can(&receipts, Access::READ_OK | Access::EXEC_OK) {
        problems.push(format!(
            "cannot read {}: cvx could not verify the binaries it staged (fix the owner, e.g. `chown -R <node user> {}`)",
            receipts.display(),
            layout.cvx().display()
        ));
    }
    problems
}

/// What will only fail at the next upgrade.
pub fn warnings(config: &Config, layout: &Layout) -> Vec<Warning> {
    let mut found = Vec::new();
    if !config.skip_backup {
        backup_checks(config, &mut found);
    }
    if config.shutdown_grace.is_none() {
        found.push(warning(
            "shutdown_grace",
            "DAEMON_SHUTDOWN_GRACE is not set: at the upgrade the node is killed at once, without flushing (set e.g. DAEMON_SHUTDOWN_GRACE=30s)".into(),
        ));
    }
    match Pins::load(config.manifest.as_deref(), config.recase) {
        Ok(Some(pins)) => {
            if let Some(next) = pins.next_after(&tree::current_stage(layout)) {
                let dir = tree::upgrade_dir(&next, config.recase);
                if let Err(e) = binary::verify(layout, &config.name, &dir, Some(&pins)) {
                    found.push(warning(
                        "next_binary",
                        format!(
                            "the next upgrade, {next:?}, is not ready on this host: {e} (run `cvx apply`)"
                        ),
                    ));
                }
            }
        }
        Ok(None) => {}
        Err(e) => found.push(warning("next_binary", e.to_string())),
    }
    found
}

fn backup_checks(config: &Config, found: &mut Vec<Warning>) {
    let dir = &config.backup_dir;
    if !dir.is_dir() {
        found.push(warning(
            "backup_dir",
            format!(
                "DAEMON_DATA_BACKUP_DIR {} does not exist: create it, owned by the node's user, or the backup fails at the upgrade",
                dir.display()
            ),
        ));
        return;
    }
    if !can(dir, Access::WRITE_OK | Access::EXEC_OK) {
        found.push(warning(
            "backup_dir",
            format!(
                "cannot write DAEMON_DATA_BACKUP_DIR {}: the backup would fail at the upgrade (fix its owner or mode)",
                dir.display()
            ),
        ));
        return;
    }
    let (Ok(need), Ok(stat)) = (
        super::backup::copied_bytes(&config.home, dir),
        rustix::fs::statvfs(dir),
    ) else {
        return;
    };
    let free = stat.f_bavail.saturating_mul(stat.f_frsize);
    if need > free {
        found.push(warning(
            "backup_room",
            format!(
                "{} has {free} bytes free and the next backup copies {need}: free some room or point DAEMON_DATA_BACKUP_DIR elsewhere",
                dir.display()
            ),
        ));
    }
}
