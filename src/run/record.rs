//! The supervisor's record, `cosmovisor/.cvx/supervisor.json`: the facts `cvx run start` writes
//! as it goes (the ones its metrics show, DESIGN §5.3) and `cvx status` reads back. Owned by
//! run, which writes it; readers only read.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::tree::Layout;

/// What a `cvx run start` recorded in `cosmovisor/.cvx/supervisor.json` as it went: the facts its
/// metrics show (DESIGN §5.3).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Supervisor {
    /// Whether that `cvx run start` is running now; when false, the rest is what it last
    /// recorded (a killed supervisor cannot say that its daemon stopped).
    pub running: bool,
    /// Its process id.
    pub pid: u32,
    /// Its cvx version.
    pub version: String,
    /// When it started, in Unix seconds.
    pub started_at: u64,
    /// Whether the daemon it supervises runs (metric `cvx_daemon_up`).
    pub daemon_up: bool,
    /// Times it started the daemon again, after upgrades (metric `cvx_daemon_restarts_total`).
    pub daemon_restarts: u64,
    /// Upgrades performed on this home by every `cvx run`, by result (metric
    /// `cvx_upgrades_total`).
    pub upgrades: UpgradeCounts,
    pub last_upgrade: Option<LastUpgrade>,
    pub last_backup: Option<LastBackup>,
    /// Problems that will bite at the next upgrade, from its last preflight check (metric
    /// `cvx_preflight_warning`).
    #[serde(default)]
    pub warnings: Vec<super::preflight::Warning>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct UpgradeCounts {
    pub success: u64,
    pub failure: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum UpgradeResult {
    Success,
    Failure,
}

/// The last upgrade cvx attempted on this home.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LastUpgrade {
    pub name: String,
    pub height: u64,
    /// (metric `cvx_upgrade_last_failed`)
    pub result: UpgradeResult,
    /// Why it failed.
    pub error: Option<String>,
    /// When it finished, in Unix seconds (metric `cvx_upgrade_last_timestamp_seconds`).
    pub finished_at: u64,
    /// From stopping the old daemon (or, for an upgrade found pending at start, from cvx's
    /// start) to starting the new one, or to the switch when cvx does not restart the daemon;
    /// absent after a failure (metric `cvx_upgrade_last_downtime_seconds`).
    pub downtime_seconds: Option<f64>,
}

/// The last backup of `data/` before an upgrade.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LastBackup {
    /// The upgrade it preceded.
    pub upgrade: String,
    /// How long it took (metric `cvx_backup_last_seconds`).
    pub seconds: f64,
    /// Bytes copied (metric `cvx_backup_last_bytes_copied`).
    pub bytes_copied: u64,
    /// When it finished, in Unix seconds.
    pub finished_at: u64,
}

/// The file behind [`Supervisor`]: the facts, and what tells whether their writer still runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The writer's start time in clock ticks since boot (`/proc/<pid>/stat`, field 22): a pid
    /// alone may since belong to another process.
    pub start_ticks: u64,
    #[serde(flatten)]
    pub facts: Supervisor,
}

/// `cosmovisor/.cvx/supervisor.json`.
pub fn record_path(layout: &Layout) -> PathBuf {
    layout.cvx().join("supervisor.json")
}

/// The record as written, if there is one that can be read.
pub fn read_record(layout: &Layout) -> Option<Record> {
    let bytes = std::fs::read(record_path(layout)).ok()?;
    serde_json::from_slice(&bytes)
        .inspect_err(|e| tracing::debug!("ignoring {}: {e}", record_path(layout).display()))
        .ok()
}

/// What the last `cvx run start` on this home recorded, with whether it still runs.
pub fn supervisor(layout: &Layout) -> Option<Supervisor> {
    let record = read_record(layout)?;
    let mut facts = record.facts;
    facts.running = start_ticks(facts.pid) == Some(record.start_ticks);
    facts.daemon_up &= facts.running;
    Some(facts)
}

/// When process `pid` started, in clock ticks since boot; None when there is no such process.
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command (field 2) may hold spaces and parentheses: count from its closing one.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}
