//! `cvx status`: where a node stands. Derived from the plan (what is staged and verified) and,
//! where the node's RPC answers, its height and recent block time for an ETA.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::plan::{ArtifactKind, ArtifactState, PendingPlan, Plan, StageAction};

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub chain: String,
    pub daemon: String,
    pub platform: String,
    pub home: Option<PathBuf>,
    pub current: Current,
    /// The next upgrade the manifest expects after the current one.
    pub next: Option<Next>,
    pub pending: PendingPlan,
    pub node: Node,
}

#[derive(Debug, Clone, Serialize)]
pub struct Current {
    /// `genesis` or `upgrades/<dir>`, when `current` is a link into the tree.
    pub stage: Option<String>,
    /// The upgrade's name (`genesis` for genesis), when the manifest names the stage.
    pub upgrade: Option<String>,
    pub version: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Next {
    pub name: String,
    pub dir: String,
    pub height: Option<u64>,
    pub version: Option<String>,
    /// Its binary for this platform is staged and verified.
    pub binary_ready: bool,
    pub reason: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Node {
    /// Whether the node's RPC answered.
    pub answering: bool,
    pub height: Option<u64>,
    /// Mean time per block over the recent blocks.
    pub block_time_ms: Option<u64>,
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
        chain: plan.chain.clone(),
        daemon: plan.daemon.clone(),
        platform: plan.platform.clone(),
        home: plan.home.clone(),
        current,
        next,
        pending: plan.pending.clone(),
        node,
    }
}

/// Ask the node's RPC (`[rpc] laddr` of `config/config.toml`) for its height and block time.
pub async fn node(home: Option<&Path>) -> Node {
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
