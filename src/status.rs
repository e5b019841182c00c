//! `cvx status`: where a node stands. Derived from the plan (what is staged and verified), where
//! the node's RPC answers its height and recent block time for an ETA, and what `cvx run start`
//! recorded under `.cvx/` (the facts its metrics show, DESIGN §5.3).

use std::path::{Path, PathBuf};
use std::time::Duration;

use schemars::JsonSchema;
use serde::Serialize;

use crate::apply::fetch::{self, FetchOptions};
use crate::plan::{ArtifactKind, ArtifactState, PendingPlan, Plan, StageAction};

// What `cvx run start` recorded: the supervisor owns the record, status shows it.
pub use crate::run::record::{Supervisor, UpgradeResult, supervisor};

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
    // Through the fetch layer's client, as quick as the supervisor's own polls: a local RPC
    // that does not answer in 2 s is reported, not waited for.
    let options = FetchOptions {
        connect_timeout: Duration::from_secs(2),
        read_timeout: Duration::from_secs(2),
        retries: 0,
        ..FetchOptions::default()
    };
    let client = fetch::client(&options).ok();
    let get = |path: String| {
        let (rpc, client, options) = (rpc.clone(), client.clone(), options.clone());
        async move {
            let bytes = fetch::read(
                &client?,
                &format!("{rpc}{path}"),
                fetch::MAX_DOCUMENT,
                &options,
            )
            .await
            .ok()?;
            serde_json::from_slice::<serde_json::Value>(&bytes).ok()
        }
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
