//! `cvx plan --node URL`: compare the manifest with what the chain itself says, through a node's
//! REST API (x/upgrade's `current_plan` and `applied_plan/{name}`, and the latest height).

use std::time::Duration;

use schemars::JsonSchema;
use serde::Serialize;
use serde_json::Value;

use crate::apply::fetch::{self, FetchError, FetchOptions};
use crate::manifest::Manifest;
use crate::plan::ManifestKey;

#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct DriftReport {
    /// The node's REST endpoint asked.
    pub node: String,
    /// The chain the node says it is on (`node_info.network`).
    pub chain_id: String,
    /// False when that is not the manifest's `chain.id`: then nothing else was asked of the
    /// node, and there are no findings but that one.
    pub trusted: bool,
    /// The node's latest height (absent when the node is not trusted).
    pub latest_height: Option<u64>,
    /// The upgrade plan governance has scheduled, if any.
    pub current_plan: Option<ChainPlan>,
    pub findings: Vec<Drift>,
    /// The next upgrade height ahead of the chain, and how far it is.
    pub next: Option<NextHeight>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
pub struct ChainPlan {
    pub name: String,
    pub height: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// The node would halt without a binary, or at another height than the manifest says.
    Error,
    /// The manifest is stale about an upgrade already applied; nothing will break for it.
    Warning,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct Drift {
    pub severity: Severity,
    /// The upgrade concerned (empty for the chain itself).
    pub upgrade: String,
    /// Where the manifest says what the chain contradicts (its height, or its name, or
    /// `chain.id`); absent when the manifest lacks the upgrade.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<ManifestKey>,
    /// `key` in the manifest as `FILE:LINE:COLUMN` (filled by the command, which has the text).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct NextHeight {
    pub name: String,
    pub height: u64,
    pub blocks_remaining: u64,
}

impl DriftReport {
    pub fn has_errors(&self) -> bool {
        self.findings.iter().any(|f| f.severity == Severity::Error)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DriftError {
    #[error("the node at {url} does not answer")]
    Unreachable {
        url: String,
        #[source]
        source: FetchError,
    },
    #[error("{url} answered {status}")]
    Status { url: String, status: u16 },
    #[error("{url} did not answer as a Cosmos SDK REST API does: {reason}")]
    Unexpected { url: String, reason: String },
}

/// An integer the REST API may give as a JSON string (proto3 JSON int64) or a number.
fn int(value: &Value) -> Option<u64> {
    match value {
        Value::String(s) => s.parse().ok(),
        other => other.as_u64(),
    }
}

/// REST reads fail fast: the operator waits on them, and a node that does not answer soon will
/// not answer on a fifth try.
fn read_options() -> FetchOptions {
    FetchOptions {
        connect_timeout: Duration::from_secs(10),
        read_timeout: Duration::from_secs(10),
        retries: 2,
        backoff: Duration::from_millis(250),
        ..FetchOptions::default()
    }
}

async fn get(client: &reqwest::Client, base: &str, path: &str) -> Result<Value, DriftError> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let bytes = fetch::read(client, &url, fetch::MAX_DOCUMENT, &read_options())
        .await
        .map_err(|source| match source {
            FetchError::Status { status, .. } => DriftError::Status {
                url: url.clone(),
                status: status.as_u16(),
            },
            source => DriftError::Unreachable {
                url: url.clone(),
                source,
            },
        })?;
    serde_json::from_slice(&bytes).map_err(|e| DriftError::Unexpected {
        url,
        reason: e.to_string(),
    })
}

/// Ask the node, then compare. `node` is its REST endpoint, e.g. `http://127.0.0.1:1317`. A
/// node of another chain than the manifest's is not asked anything more: its plans say nothing
/// about this chain.
pub async fn check(manifest: &Manifest, node: &str) -> Result<DriftReport, DriftError> {
    let client = fetch::client(&read_options()).map_err(|source| DriftError::Unreachable {
        url: node.to_string(),
        source,
    })?;
    let info = get(&client, node, "/cosmos/base/tendermint/v1beta1/node_info").await?;
    let chain_id = info["default_node_info"]["network"]
        .as_str()
        .ok_or_else(|| DriftError::Unexpected {
            url: format!("{node}/cosmos/base/tendermint/v1beta1/node_info"),
            reason: "no default_node_info.network".into(),
        })?
        .to_string();
    if chain_id != manifest.chain.id {
        return Ok(DriftReport {
            node: node.to_string(),
            findings: vec![Drift {
                severity: Severity::Warning,
                upgrade: String::new(),
                key: Some(ManifestKey::default().key("chain").key("id")),
                location: None,
                message: format!(
                    "the node at {node} is on chain {chain_id:?}, the manifest is for {:?}: its upgrade plans were not compared",
                    manifest.chain.id
                ),
            }],
            chain_id,
            trusted: false,
            latest_height: None,
            current_plan: None,
            next: None,
        });
    }
    let latest = get(
        &client,
        node,
        "/cosmos/base/tendermint/v1beta1/blocks/latest",
    )
    .await?;
    let header = if latest["sdk_block"].is_object() {
        &latest["sdk_block"]["header"]
    } else {
        &latest["block"]["header"]
    };
    let latest_height = int(&header["height"]).ok_or_else(|| DriftError::Unexpected {
        url: format!("{node}/cosmos/base/tendermint/v1beta1/blocks/latest"),
        reason: "no block.header.height".into(),
    })?;
    let plan = get(&client, node, "/cosmos/upgrade/v1beta1/current_plan").await?;
    let current_plan = match &plan["plan"] {
        Value::Null => None,
        p => Some(ChainPlan {
            name: p["name"].as_str().unwrap_or_default().to_string(),
            height: int(&p["height"]).unwrap_or(0),
        }),
    };
    let mut applied = Vec::new();
    for upgrade in &manifest.upgrades {
        let name =
            url::form_urlencoded::byte_serialize(upgrade.name.as_bytes()).collect::<String>();
        let answer = get(
            &client,
            node,
            &format!("/cosmos/upgrade/v1beta1/applied_plan/{name}"),
        )
        .await?;
        applied.push(int(&answer["height"]).filter(|h| *h > 0));
    }
    let mut report = compare(manifest, node, latest_height, current_plan, &applied);
    report.chain_id = chain_id;
    Ok(report)
}

/// The comparison itself, pure: `applied[i]` is where the chain applied `manifest.upgrades[i]`.
pub fn compare(
    manifest: &Manifest,
    node: &str,
    latest_height: u64,
    current_plan: Option<ChainPlan>,
    applied: &[Option<u64>],
) -> DriftReport {
    let mut findings = Vec::new();
    if let Some(plan) = &current_plan {
        let exact = manifest
            .upgrades
            .iter()
            .enumerate()
            .find(|(_, u)| u.name == plan.name);
        let by_height = manifest
            .upgrades
            .iter()
            .enumerate()
            .find(|(_, u)| u.height == Some(plan.height));
        match (exact, by_height) {
            (Some((i, u)), _) => {
                if let Some(h) = u.height.filter(|h| *h != plan.height) {
                    findings.push(Drift {
                        severity: Severity::Error,
                        upgrade: u.name.clone(),
                        key: Some(ManifestKey::stage(Some(i)).key("height")),
                        location: None,
                        message: format!("the chain schedules {} at height {}, the manifest says {h}", plan.name, plan.height),
                    });
                }
            }
            (None, Some((i, u))) => findings.push(Drift {
                severity: Severity::Error,
                upgrade: u.name.clone(),
                key: Some(ManifestKey::stage(Some(i)).key("name")),
                location: None,
                message: format!(
                    "at height {} the chain schedules {:?}, the manifest names it {:?}; the node will look for upgrades/{}",
                    plan.height,
                    plan.name,
                    u.name,
                    plan.name.to_lowercase()
                ),
            }),
            (None, None) => findings.push(Drift {
                severity: Severity::Error,
                upgrade: plan.name.clone(),
                key: None,
                location: None,
                message: format!(
                    "the chain schedules {} at height {} and the manifest lacks it: the node will halt there with no binary",
                    plan.name, plan.height
                ),
            }),
        }
        // Two things would halt the node at one height: governance, and cvx's --halt-height.
        if let Some((i, u)) = manifest.upgrades.iter().enumerate().find(|(_, u)| {
            u.trigger == crate::manifest::Trigger::HaltHeight && u.height == Some(plan.height)
        }) {
            findings.push(Drift {
                severity: Severity::Error,
                upgrade: u.name.clone(),
                key: Some(ManifestKey::stage(Some(i)).key("trigger")),
                location: None,
                message: format!(
                    "the chain schedules {:?} by governance at height {}, where the manifest schedules {:?} with trigger = \"halt-height\": one upgrade, two halts; if it is the same upgrade, set trigger = \"governance\" (or remove trigger)",
                    plan.name, plan.height, u.name
                ),
            });
        }
    }
    // Applied upgrades are history: a manifest that disagrees is stale, and nothing breaks for it.
    for (i, (upgrade, applied_at)) in manifest.upgrades.iter().zip(applied).enumerate() {
        let Some(at) = *applied_at else { continue };
        let stage = ManifestKey::stage(Some(i));
        let key = Some(if upgrade.height.is_some() {
            stage.key("height")
        } else {
            stage.key("name")
        });
        let message = match upgrade.height {
            Some(h) if h > latest_height => {
                format!("still expected at {h}, but the chain already applied it at {at}")
            }
            Some(h) if h != at => {
                format!("the chain applied it at height {at}, the manifest says {h}")
            }
            Some(_) => continue,
            None => {
                format!("already applied at height {at}; the manifest could record height = {at}")
            }
        };
        findings.push(Drift {
            severity: Severity::Warning,
            upgrade: upgrade.name.clone(),
            key,
            location: None,
            message,
        });
    }
    // The next height ahead: the chain's own plan first, else the manifest's next upgrade.
    let next = current_plan
        .as_ref()
        .filter(|p| p.height > latest_height)
        .map(|p| (p.name.clone(), p.height))
        .or_else(|| {
            manifest
                .upgrades
                .iter()
                .zip(applied)
                .filter(|(_, a)| a.is_none())
                .filter_map(|(u, _)| {
                    u.height
                        .filter(|h| *h > latest_height)
                        .map(|h| (u.name.clone(), h))
                })
                .min_by_key(|(_, h)| *h)
        })
        .map(|(name, height)| NextHeight {
            name,
            height,
            blocks_remaining: height - latest_height,
        });
    DriftReport {
        node: node.to_string(),
        chain_id: manifest.chain.id.clone(),
        trusted: true,
        latest_height: Some(latest_height),
        current_plan,
        findings,
        next,
    }
}
