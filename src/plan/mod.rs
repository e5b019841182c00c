//! The plan: a pure function of (manifest, observed tree, platform) saying what apply would do
//! and why. It is the one place that decides; apply executes it and the renderers show it.
//!
//! Owns the decision. Must not touch: the network, the filesystem (the tree arrives inspected),
//! the clock, or the checks against the world (`checks`), whose results travel beside the plan.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::Serialize;

use crate::manifest::{Artifact, Manifest};
use crate::tree::{self, Current, FileKind, StageDir, Tree, UpgradeInfo};

/// Bumped when the JSON shape changes incompatibly.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct Plan {
    pub format_version: u32,
    pub chain: String,
    pub daemon: String,
    pub platform: String,
    /// `$DAEMON_HOME`, when known.
    pub home: Option<PathBuf>,
    /// Genesis first, then each upgrade of the manifest in order, then directories on disk that
    /// the manifest does not name.
    pub upgrades: Vec<StagePlan>,
    pub current: CurrentPlan,
    pub pending: PendingPlan,
    pub warnings: Vec<String>,
    pub summary: Summary,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StageAction {
    /// Nothing staged yet.
    Create,
    /// Something staged, something to fetch or replace.
    Replace,
    /// Staged without receipts (by hand, or by Cosmovisor) and to be adopted: nothing to fetch
    /// or replace, receipts to write.
    Adopt,
    Ok,
    /// On disk, not in the manifest: left alone.
    Unmanaged,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct StagePlan {
    /// `genesis`, or the upgrade's on-chain name.
    pub name: String,
    /// Relative to `$DAEMON_HOME/cosmovisor`: `genesis` or `upgrades/<dir>`.
    pub dir: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub height: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// For upgrades: what halts the node for it (`governance`, or `halt-height`: `cvx run`
    /// starts the node with `--halt-height` and upgrades it there).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trigger: Option<crate::manifest::Trigger>,
    pub action: StageAction,
    /// True when `current` points here: apply replaces nothing here without `--force`.
    pub current: bool,
    pub artifacts: Vec<ArtifactPlan>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactKind {
    Binary,
    Library,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactState {
    Missing,
    /// Staged and proven to come from the pin (hash or receipt); see the action for whether a
    /// receipt is still to be written.
    Ok,
    /// Staged bytes differ from what the pin describes.
    Mismatch,
    /// Staged, but nothing proves it came from the pinned archive.
    Unverified,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactAction {
    Fetch,
    Replace,
    /// Staged without a receipt: apply proves the file is the pinned one (its sha256, or the
    /// pinned archive's member, fetched) and writes the receipt, replacing nothing. A file that
    /// turns out to differ from the archive's member is replaced (in `current`'s stage only with
    /// `--force`).
    Adopt,
    Ok,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct ArtifactPlan {
    pub kind: ArtifactKind,
    /// Where the manifest pins it, e.g. `upgrade[0].binary."linux/amd64"`.
    pub key: ManifestKey,
    pub url: String,
    pub sha256: String,
    /// For archives: the member to install.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    /// Relative to `$DAEMON_HOME/cosmovisor`, e.g. `upgrades/v26/bin/osmosisd`.
    pub destination: String,
    /// The sha256 of the file staged there now, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub staged_sha256: Option<String>,
    pub state: ArtifactState,
    pub action: ArtifactAction,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LinkAction {
    /// Create `current -> genesis`, as `cosmovisor init` does.
    Create,
    Ok,
    /// Something is wrong that apply will not touch; see the reason.
    Attention,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct CurrentPlan {
    /// The link's target as found, if it is a link.
    pub target: Option<String>,
    /// The stage it points to: `genesis` or `upgrades/<dir>`.
    pub stage: Option<String>,
    pub action: LinkAction,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PendingState {
    None,
    Empty,
    Partial,
    Invalid,
    Valid,
}

/// What `data/upgrade-info.json` says, and whether the supervisor could act on it.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct PendingPlan {
    pub state: PendingState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub height: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
    /// The manifest names this upgrade.
    pub in_manifest: bool,
    /// `current` already points at its directory.
    pub applied: bool,
    /// Its binary is staged and verified for this platform.
    pub binary_ready: bool,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, JsonSchema)]
pub struct Summary {
    pub fetch: usize,
    pub replace: usize,
    pub adopt: usize,
    pub ok: usize,
    pub unmanaged: usize,
}

impl Plan {
    /// Whether apply would change anything.
    pub fn has_changes(&self) -> bool {
        self.summary.fetch + self.summary.replace + self.summary.adopt > 0
            || self.current.action == LinkAction::Create
    }
}

/// A key of the manifest as a path from its top, e.g. `upgrade[2].binary."linux/amd64".url`
/// (upgrades counted from 0 in the file's order): where a finding belongs, so annotations can
/// point at the manifest's line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ManifestKey(Vec<KeyPart>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPart {
    Key(String),
    Index(usize),
}

impl ManifestKey {
    /// `genesis`, or `upgrade[i]` for the manifest's i-th upgrade.
    pub fn stage(upgrade: Option<usize>) -> Self {
        match upgrade {
            None => ManifestKey(vec![KeyPart::Key("genesis".into())]),
            Some(i) => ManifestKey(vec![KeyPart::Key("upgrade".into()), KeyPart::Index(i)]),
        }
    }

    /// This key's child `name`.
    pub fn key(&self, name: &str) -> Self {
        let mut parts = self.0.clone();
        parts.push(KeyPart::Key(name.to_string()));
        ManifestKey(parts)
    }

    /// This array's item `i`.
    pub fn index(&self, i: usize) -> Self {
        let mut parts = self.0.clone();
        parts.push(KeyPart::Index(i));
        ManifestKey(parts)
    }

    pub fn parts(&self) -> &[KeyPart] {
        &self.0
    }
}

impl std::fmt::Display for ManifestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, part) in self.0.iter().enumerate() {
            match part {
                KeyPart::Index(n) => write!(f, "[{n}]")?,
                KeyPart::Key(k) => {
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    let bare = !k.is_empty()
                        && k.chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                    if bare {
                        f.write_str(k)?;
                    } else {
                        write!(f, "{k:?}")?;
                    }
                }
            }
        }
        Ok(())
    }
}

impl Serialize for ManifestKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl JsonSchema for ManifestKey {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ManifestKey".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A key of the manifest as a path from its top, upgrades counted from 0: `upgrade[2].binary.\"linux/amd64\"`.",
            "type": "string"
        })
    }
}

/// Everything the plan needs besides the manifest and the tree.
#[derive(Debug, Clone)]
pub struct PlanInput {
    pub platform: String,
    /// Lower-case plan names into directory names (Cosmovisor's default).
    pub recase: bool,
    pub home: Option<PathBuf>,
    pub warnings: Vec<String>,
}

/// The tree directories the manifest names: `genesis` and `upgrades/<dir>` for each upgrade.
pub fn managed_dirs(manifest: &Manifest, recase: bool) -> std::collections::BTreeSet<String> {
    std::iter::once(tree::GENESIS.to_string())
        .chain(
            manifest
                .upgrades
                .iter()
                .map(|u| tree::upgrade_dir(&u.name, recase)),
        )
        .collect()
}

pub fn plan(manifest: &Manifest, tree: &Tree, input: &PlanInput) -> Plan {
    let mut warnings = input.warnings.clone();
    let platform = &input.platform;
    let daemon = &manifest.chain.daemon;
    let current_stage = match &tree.current {
        Current::Link { stage, .. } => stage.clone(),
        _ => None,
    };
    let empty = StageDir::default();

    let stages = std::iter::once((
        ManifestKey::stage(None),
        "genesis".to_string(),
        tree::GENESIS.to_string(),
        None,
        manifest.genesis.version.clone(),
        None,
        &manifest.genesis.binary,
        &manifest.genesis.library,
    ))
    .chain(manifest.upgrades.iter().enumerate().map(|(i, u)| {
        (
            ManifestKey::stage(Some(i)),
            u.name.clone(),
            tree::upgrade_dir(&u.name, input.recase),
            u.height,
            u.version.clone(),
            Some(u.trigger),
            &u.binary,
            &u.library,
        )
    }));

    let mut upgrades = Vec::new();
    for (key, name, dir, height, version, trigger, binary, library) in stages {
        let on_disk = tree.stages.get(&dir).unwrap_or(&empty);
        let mut artifacts = Vec::new();
        if let Some(artifact) = binary.get(platform) {
            let rel = format!("bin/{daemon}");
            artifacts.push(artifact_plan(
                ArtifactKind::Binary,
                key.key("binary").key(platform),
                artifact,
                &dir,
                &rel,
                on_disk,
            ));
        }
        for (i, lib) in library.get(platform).into_iter().flatten().enumerate() {
            let as_artifact = Artifact {
                url: lib.url.clone(),
                sha256: lib.sha256.clone(),
                path: lib.path.clone(),
            };
            let rel = format!("lib/{}", lib.file_name());
            artifacts.push(artifact_plan(
                ArtifactKind::Library,
                key.key("library").key(platform).index(i),
                &as_artifact,
                &dir,
                &rel,
                on_disk,
            ));
        }
        let is_current = current_stage.as_deref() == Some(dir.as_str());
        let action = if artifacts.iter().all(|a| a.action == ArtifactAction::Ok) {
            StageAction::Ok
        } else if artifacts.iter().all(|a| a.state == ArtifactState::Missing) {
            StageAction::Create
        } else if artifacts
            .iter()
            .all(|a| matches!(a.action, ArtifactAction::Ok | ArtifactAction::Adopt))
        {
            StageAction::Adopt
        } else {
            StageAction::Replace
        };
        if is_current
            && artifacts
                .iter()
                .any(|a| a.action == ArtifactAction::Replace)
        {
            warnings.push(format!(
                "{dir} is what `current` points to: apply will not replace the running binary without --force"
            ));
        }
        upgrades.push(StagePlan {
            name,
            dir,
            height,
            version,
            trigger,
            action,
            current: is_current,
            artifacts,
        });
    }

    let managed: Vec<String> = upgrades.iter().map(|u| u.dir.clone()).collect();
    for dir in tree.stages.keys().filter(|d| !managed.contains(d)) {
        let name = dir.strip_prefix("upgrades/").unwrap_or(dir).to_string();
        upgrades.push(StagePlan {
            name,
            dir: dir.clone(),
            height: None,
            version: None,
            trigger: None,
            action: StageAction::Unmanaged,
            current: current_stage.as_deref() == Some(dir.as_str()),
            artifacts: Vec::new(),
        });
    }

    let current = current_plan(&tree.current, &managed);
    if current.action == LinkAction::Attention {
        warnings.push(format!("current: {}", current.reason));
    }
    let pending = pending_plan(tree, &upgrades, current_stage.as_deref(), input.recase);

    let mut summary = Summary::default();
    for stage in &upgrades {
        if stage.action == StageAction::Unmanaged {
            summary.unmanaged += 1;
        }
        for a in &stage.artifacts {
            match a.action {
                ArtifactAction::Fetch => summary.fetch += 1,
                ArtifactAction::Replace => summary.replace += 1,
                ArtifactAction::Adopt => summary.adopt += 1,
                ArtifactAction::Ok => summary.ok += 1,
            }
        }
    }

    Plan {
        format_version: FORMAT_VERSION,
        chain: manifest.chain.id.clone(),
        daemon: daemon.clone(),
        platform: platform.clone(),
        home: input.home.clone(),
        upgrades,
        current,
        pending,
        warnings,
        summary,
    }
}

fn artifact_plan(
    kind: ArtifactKind,
    key: ManifestKey,
    artifact: &Artifact,
    dir: &str,
    rel: &str,
    on_disk: &StageDir,
) -> ArtifactPlan {
    let staged_file = on_disk.files.get(rel);
    let staged_sha256 = staged_file.and_then(|f| f.sha256.clone());
    let (state, action, reason) = match staged_file {
        None => (
            ArtifactState::Missing,
            ArtifactAction::Fetch,
            "not staged".to_string(),
        ),
        Some(file) if file.kind != FileKind::Regular => (
            ArtifactState::Mismatch,
            ArtifactAction::Replace,
            format!("{rel} is not a regular file"),
        ),
        Some(file) => {
            let staged = file.sha256.clone().unwrap_or_default();
            match &file.receipt {
                Some(r) if r.source_sha256 != artifact.sha256 => (
                    ArtifactState::Mismatch,
                    ArtifactAction::Replace,
                    format!(
                        "pin changed: staged from sha256 {}, pinned {}",
                        r.source_sha256, artifact.sha256
                    ),
                ),
                Some(r) if r.sha256 != staged => (
                    ArtifactState::Mismatch,
                    ArtifactAction::Replace,
                    format!(
                        "modified since staged: sha256 {staged}, staged as {}",
                        r.sha256
                    ),
                ),
                Some(_) if file.from_receipt => (
                    ArtifactState::Ok,
                    ArtifactAction::Ok,
                    "staged from the pin (receipt, file unchanged)".into(),
                ),
                Some(_) => (
                    ArtifactState::Ok,
                    ArtifactAction::Ok,
                    "staged from the pin (re-hashed)".into(),
                ),
                // An archive's pin is the archive's sha256, never a staged binary's: only its
                // member can prove the file.
                None if crate::manifest::is_archive_url(&artifact.url) => (
                    ArtifactState::Unverified,
                    ArtifactAction::Adopt,
                    format!(
                        "staged without a receipt (sha256 {staged}): apply will verify it against the pinned archive's member, adopting it if it is the same and replacing it if not"
                    ),
                ),
                None if staged == artifact.sha256 => (
                    ArtifactState::Ok,
                    ArtifactAction::Adopt,
                    "staged without a receipt; its sha256 matches the pin: apply writes the receipt"
                        .into(),
                ),
                None => (
                    ArtifactState::Mismatch,
                    ArtifactAction::Replace,
                    format!("sha256 {staged} differs from the pin {}", artifact.sha256),
                ),
            }
        }
    };
    ArtifactPlan {
        kind,
        key,
        url: artifact.url.clone(),
        sha256: artifact.sha256.clone(),
        member: artifact.path.clone(),
        destination: format!("{dir}/{rel}"),
        staged_sha256,
        state,
        action,
        reason,
    }
}

fn current_plan(current: &Current, managed: &[String]) -> CurrentPlan {
    match current {
        Current::Missing => CurrentPlan {
            target: None,
            stage: None,
            action: LinkAction::Create,
            reason: "missing: will point to genesis, as `cosmovisor init` does".into(),
        },
        Current::NotALink => CurrentPlan {
            target: None,
            stage: None,
            action: LinkAction::Attention,
            reason: "exists but is not a symlink; Cosmovisor and cvx need a link to genesis or upgrades/<dir>".into(),
        },
        Current::Link { target, stage, exists } => {
            let (action, reason) = match stage {
                _ if !exists => (LinkAction::Attention, format!("points to {target}, which does not exist")),
                None => (LinkAction::Attention, format!("points to {target}, outside genesis and upgrades/")),
                Some(s) if !managed.contains(s) => (LinkAction::Attention, format!("points to {s}, which the manifest does not name")),
                Some(s) => (LinkAction::Ok, format!("points to {s}")),
            };
            CurrentPlan {
                target: Some(target.clone()),
                stage: stage.clone(),
                action,
                reason,
            }
        }
    }
}

fn pending_plan(
    tree: &Tree,
    stages: &[StagePlan],
    current: Option<&str>,
    recase: bool,
) -> PendingPlan {
    let none = |state, reason: String| PendingPlan {
        state,
        name: None,
        height: None,
        dir: None,
        in_manifest: false,
        applied: false,
        binary_ready: false,
        reason,
    };
    match &tree.upgrade_info {
        UpgradeInfo::Missing => none(PendingState::None, "no data/upgrade-info.json".into()),
        UpgradeInfo::Empty => none(
            PendingState::Empty,
            "data/upgrade-info.json is empty".into(),
        ),
        UpgradeInfo::Partial { error } => none(
            PendingState::Partial,
            format!(
                "data/upgrade-info.json is incomplete ({error}); the node may still be writing it"
            ),
        ),
        UpgradeInfo::Invalid { error } => none(
            PendingState::Invalid,
            format!("data/upgrade-info.json is not a valid plan: {error}"),
        ),
        UpgradeInfo::Valid(info) => {
            let dir = tree::upgrade_dir(&info.name, recase);
            let stage = stages
                .iter()
                .find(|s| s.dir == dir && s.action != StageAction::Unmanaged);
            // Applied when current points to it, or to an upgrade the manifest lists after it
            // (a scheduled upgrade leaves the last governance plan in data/).
            let position = |d: &str| {
                stages
                    .iter()
                    .position(|s| s.dir == d && s.action != StageAction::Unmanaged)
            };
            let past = match (current.and_then(position), position(&dir)) {
                (Some(now), Some(then)) => now > then,
                _ => false,
            };
            let applied = current == Some(dir.as_str()) || past;
            let binary_ready = stage.is_some_and(|s| {
                s.artifacts
                    .iter()
                    .any(|a| a.kind == ArtifactKind::Binary && a.state == ArtifactState::Ok)
            });
            let reason = match (applied, stage.is_some(), binary_ready) {
                (true, _, _) if past => format!(
                    "already applied: current points to {}, which comes after it",
                    current.unwrap_or_default()
                ),
                (true, _, _) => "already applied: current points to it".to_string(),
                (false, false, _) => {
                    "not in the manifest: add it, or the node cannot continue after the halt"
                        .to_string()
                }
                (false, true, true) => "binary staged and verified: ready to switch".to_string(),
                (false, true, false) => "binary not staged: run cvx apply".to_string(),
            };
            PendingPlan {
                state: PendingState::Valid,
                name: Some(info.name.clone()),
                height: Some(info.height),
                dir: Some(dir),
                in_manifest: stage.is_some(),
                applied,
                binary_ready,
                reason,
            }
        }
    }
}
