//! `cvx status`: where a node stands. Derived from the plan (what is staged and verified), where
//! the node's RPC answers its height and recent block time for an ETA, and what `cvx run start`
//! recorded under `.cvx/` (the facts its metrics show, DESIGN §5.3).

use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::plan::{ArtifactKind, ArtifactState, PendingPlan, Plan, StageAction};
use crate::tree::Layout;

/// Bumped when the JSON shape changes incompatibly.
pub const FORMAT_VERSION: u32 = 1;

/// `cvx status --json` (schema: `cvx schema status`).
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct Status {
    pub format_version: u32,
    /// The chain id, from the manifest.
    pub chain: String,
    /// The daemon's file name, from the manifest.
    pub daemon: String,
    /// This host's platform, e.g. `linux/amd64`.
    pub platform: String,
    /// `$DAEMON_HOME`, when known.
    pub home: Option<PathBuf>,
    pub current: Current,
    /// The next upgrade the manifest expects after the current one.
    pub next: Option<Next>,
    /// What `data/upgrade-info.json` says.
    pub pending: PendingPlan,
    pub node: Node,
    /// What the last `cvx run start` on this home recorded; absent when none has run with this
    /// version of cvx.
    pub supervisor: Option<Supervisor>,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct Current {
    /// `genesis` or `upgrades/<dir>`, when `current` is a link into the tree.
    pub stage: Option<String>,
    /// The upgrade's name (`genesis` for genesis), when the manifest names the stage (label
    /// `current` of metric `cvx_info`).
    pub upgrade: Option<String>,
    pub version: Option<String>,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct Next {
    /// The upgrade's on-chain name.
    pub name: String,
    /// Relative to `$DAEMON_HOME/cosmovisor`: `upgrades/<dir>`.
    pub dir: String,
    /// (metric `cvx_upgrade_next_height`)
    pub height: Option<u64>,
    pub version: Option<String>,
    /// What halts the node for it: `governance`, or `halt-height` (cvx run halts it there).
    pub trigger: crate::manifest::Trigger,
    /// Its binary (and libraries) for this platform are staged and verified against the
    /// manifest's pins (metric `cvx_upgrade_next_ready`).
    pub binary_ready: bool,
    pub reason: String,
}

#[derive(Debug, Clone, Default, Serialize, JsonSchema)]
pub struct Node {
    /// Whether the node's RPC answered (metric `cvx_node_rpc_up`).
    pub answering: bool,
    /// The node's latest block height (metric `cvx_node_height`).
    pub height: Option<u64>,
    /// Mean time per block over the recent blocks.
    pub block_time_ms: Option<u64>,
    /// Blocks to the next upgrade's height (metric `cvx_upgrade_blocks_remaining`).
    pub blocks_remaining: Option<u64>,
    pub eta_seconds: Option<u64>,
    pub reason: String,
}

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
    pub warnings: Vec<crate::run::preflight::Warning>,
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

/// Derive the status from a plan, the manifest and what the node said.
pub fn status(plan: &Plan, mut node: Node) -> Status {
    let managed: Vec<_> = plan
        .upgrades
        .iter()
        .filter(|s| s.action != StageAction::Unmanaged)
        .collect();
    let current_index = managed.iter().position(|s| s.current);
    let current = Current {
        stage: plan.current.stage.clone(),
        upgrade: current_index.map(|i| managed[i].name.clone()),
        version: current_index.and_then(|i| managed[i].version.clone()),
    };
    // After the current stage; without one, the first upgrade the node has not passed.
    let next_stage = match current_index {
        Some(i) => managed.get(i + 1).copied(),
        None => managed
            .iter()
            .skip(1)
            .copied()
            .find(|s| match (s.height, node.height) {
                (Some(h), Some(at)) => h > at,
                _ => true,
            }),
    };
    let next = next_stage.map(|s| {
        let binary = s.artifacts.iter().find(|a| a.kind == ArtifactKind::Binary);
        let binary_ready =
            s.artifacts.iter().all(|a| a.state == ArtifactState::Ok) && binary.is_some();
        Next {
            name: s.name.clone(),
            dir: s.dir.clone(),
            height: s.height,
            version: s.version.clone(),
            trigger: s.trigger.unwrap_or_default(),
            binary_ready,
            reason: match binary {
                _ if binary_ready => "staged and verified".into(),
                Some(b) => format!("not ready: {} ({}); run cvx apply", b.reason, b.destination),
                None => format!("no binary pinned for {}", plan.platform),
            },
        }
    });
    if let (Some(at), Some(target)) = (node.height, next.as_ref().and_then(|n| n.height)) {
        let remaining = target.saturating_sub(at);
        node.blocks_remaining = Some(remaining);
        node.eta_seconds = node
            .block_time_ms
            .map(|ms| remaining.saturating_mul(ms) / 1000);
    }
    Status {
        format_version: FORMAT_VERSION,
        chain: plan.chain.clone(),
        daemon: plan.daemon.clone(),
        platform: plan.platform.clone(),
        home: plan.home.clone(),
        current,
        next,
        pending: plan.pending.clone(),
        node,
        supervisor: None,
    }
}

/// Ask the node's RPC (`[rpc] laddr` of `config/config.toml`) for its height and block time.
pub async fn node(home: Option<&Path>, chain_id: &str) -> Node {
    let Some(rpc) = home.and_then(crate::run::watch::rpc_address) else {
        return Node {
            reason: "unknown: no [rpc] laddr in config/config.toml".into(),
            ..Node::default()
        };
    };
    let unknown = |why: String| Node {
        reason: format!("unknown: {why}"),
        ..Node::default()
    };
    let get = |path: String| {
        let rpc = rpc.clone();
        async move { crate::run::watch::rpc_get(&rpc, &path).await }
    };
    let Some(status) = get("/status".into()).await else {
        return unknown(format!("the node's RPC at {rpc} does not answer"));
    };
    let network = status["result"]["node_info"]["network"]
        .as_str()
        .unwrap_or_default();
    if network != chain_id {
        return unknown(format!(
            "the node's RPC at {rpc} reports chain id {network:?}, not the manifest's {chain_id:?}: not trusted (check [rpc] laddr in config/config.toml)"
        ));
    }
    let sync = &status["result"]["sync_info"];
    let height = sync["latest_block_height"]
        .as_str()
        .and_then(|h| h.parse::<u64>().ok());
    let Some(height) = height else {
        return unknown(format!("{rpc}/status has no latest_block_height"));
    };
    let latest_time = sync["latest_block_time"]
        .as_str()
        .and_then(crate::time::parse_rfc3339);
    // The mean over the last (up to) 100 blocks.
    let earlier = height.saturating_sub(100).max(1);
    let earlier_time = if earlier < height {
        get(format!("/block?height={earlier}")).await.and_then(|b| {
            b["result"]["block"]["header"]["time"]
                .as_str()
                .and_then(crate::time::parse_rfc3339)
        })
    } else {
        None
    };
    let block_time_ms = match (latest_time, earlier_time) {
        (Some(late), Some(early)) if late > early => {
            Some((late - early) / (height - earlier) / 1_000_000)
        }
        _ => None,
    };
    Node {
        answering: true,
        height: Some(height),
        block_time_ms,
        reason: match block_time_ms {
            Some(_) => format!("from {rpc}"),
            None => format!("from {rpc}; block time unknown"),
        },
        ..Node::default()
    }
}
