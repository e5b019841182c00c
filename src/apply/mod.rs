//! `cvx apply`: execute a plan, and nothing else. Fetch each distinct pin once (in parallel),
//! install it atomically at every destination that needs it, write receipts, and create the
//! `current` link when it is missing. Failures are per artifact: the rest is still staged.
//!
//! Owns the one HTTP client path ([`fetch`]), archives ([`unpack`]) and atomic installs
//! ([`install`]), which `run` and the authoring tools reuse. Must not decide what to stage (the
//! plan does) nor render anything.

pub mod fetch;
pub mod install;
pub mod progress;
pub mod prune;
pub mod unpack;

use crate::errors::io_err;
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use crate::errors::error_chain;
use crate::plan::{
    ArtifactAction, ArtifactKind, ArtifactPlan, ArtifactState, LinkAction, Plan, StagePlan,
};
use crate::tree::Layout;
use crate::tree::receipt::{self, FileIdentity, Receipt};
use fetch::{FetchError, FetchOptions};
use install::InstallError;
use unpack::TreeEntry;

#[derive(Debug, Clone)]
pub struct Options {
    /// Artifacts fetched at once.
    pub jobs: usize,
    /// Replace files in the stage `current` points to.
    pub force: bool,
    pub fetch: FetchOptions,
}

/// Turns artifact downloads into progress displays; the CLI decides whether anything is shown.
pub trait Reporter: Send + Sync {
    fn artifact(&self, destination: &str) -> Box<dyn fetch::Progress>;
}

/// Reports nothing (`--json`, `-q`, not a terminal).
pub struct Silent;

impl Reporter for Silent {
    fn artifact(&self, _destination: &str) -> Box<dyn fetch::Progress> {
        Box::new(fetch::NoProgress)
    }
}

/// What apply did (or, with `--check`, would do). Ansible reads this as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub changed: bool,
    pub failed: bool,
    /// Why apply could not run at all (bad manifest, locked tree, ...); then no actions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub actions: Vec<Action>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Already in place; nothing done.
    Unchanged,
    /// Staged (or the link created) by this run.
    Changed,
    /// `--check`: this run would change it.
    WouldChange,
    Failed,
}

#[derive(Debug, Clone, Serialize)]
pub struct Action {
    /// fetch, replace, adopt, ok (artifacts) or link (the `current` link).
    pub action: &'static str,
    /// Relative to `$DAEMON_HOME/cosmovisor`.
    pub destination: String,
    /// Where the manifest pins the artifact, e.g. `upgrade[0].binary."linux/amd64"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<crate::plan::ManifestKey>,
    /// The manifest's line for `key` (filled by the command, which has the manifest's text).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    pub status: Status,
    /// Why the plan chose this action.
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Bytes installed at the destination.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// The download continued bytes kept from an interrupted run.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub resumed: bool,
    /// The file this action replaced, and where it is kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replaced: Option<Replaced>,
}

/// A file apply replaced: what it was, and where it is kept (nothing is deleted).
#[derive(Debug, Clone, Serialize)]
pub struct Replaced {
    /// Its sha256, as the plan found it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Relative to `$DAEMON_HOME/cosmovisor`: `.cvx/replaced/<stage>/bin/<name>.<time>`.
    pub kept_at: String,
}

impl Report {
    /// The report of an apply that could not start.
    pub fn error(message: String) -> Self {
        Report {
            changed: false,
            failed: true,
            error: Some(message),
            actions: Vec::new(),
        }
    }

    fn from_actions(actions: Vec<Action>) -> Self {
        Report {
            error: None,
            changed: actions
                .iter()
                .any(|a| matches!(a.status, Status::Changed | Status::WouldChange)),
            failed: actions.iter().any(|a| a.status == Status::Failed),
            actions,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("no home: cvx apply needs to know where the Cosmovisor tree is")]
    NoHome,
    #[error(transparent)]
    Io(#[from] crate::errors::IoError),
    #[error(transparent)]
    Lock(#[from] crate::tree::lock::LockError),
    #[error(transparent)]
    Client(#[from] FetchError),
    #[error(transparent)]
    Prune(#[from] prune::PruneError),
}

/// The report `--check` gives: what apply would do, without doing it.
pub fn check(plan: &Plan, force: bool) -> Report {
    let mut actions = artifact_actions(plan, |a| match a.action {
        ArtifactAction::Ok => Status::Unchanged,
        _ => Status::WouldChange,
    });
    for (index, (stage, artifact)) in artifacts(plan).enumerate() {
        if let Some(refusal) = refusal(stage, artifact, force) {
            actions[index].status = Status::Failed;
            actions[index].error = Some(refusal);
        }
    }
    if plan.current.action == LinkAction::Create {
        actions.push(link_action(plan, Status::WouldChange, None));
    }
    Report::from_actions(actions)
}

/// Every artifact of the plan with its stage, in the order of the report's actions.
fn artifacts(plan: &Plan) -> impl Iterator<Item = (&StagePlan, &ArtifactPlan)> {
    plan.upgrades
        .iter()
        .flat_map(|s| s.artifacts.iter().map(move |a| (s, a)))
}

/// Why apply must not execute this action, if it must not: the stage `current` points to holds
/// the binary a node may be running, and is replaced only with `--force`.
fn refusal(stage: &StagePlan, artifact: &ArtifactPlan, force: bool) -> Option<String> {
    (stage.current && artifact.action == ArtifactAction::Replace && !force).then(|| {
        format!(
            "current points to {}: cvx does not replace the binary a node may be running without --force",
            stage.dir
        )
    })
}

fn artifact_actions(
    plan: &Plan,
    status: impl Fn(&crate::plan::ArtifactPlan) -> Status,
) -> Vec<Action> {
    plan.upgrades
        .iter()
        .flat_map(|s| &s.artifacts)
        .map(|a| Action {
            action: match a.action {
                ArtifactAction::Fetch => "fetch",
                ArtifactAction::Replace => "replace",
                ArtifactAction::Adopt => "adopt",
                ArtifactAction::Ok => "ok",
            },
            destination: a.destination.clone(),
            key: Some(a.key.clone()),
            line: None,
            url: Some(a.url.clone()),
            sha256: Some(a.sha256.clone()),
            status: status(a),
            reason: a.reason.clone(),
            error: None,
            size: None,
            resumed: false,
            replaced: None,
        })
        .collect()
}

fn link_action(plan: &Plan, status: Status, error: Option<String>) -> Action {
    Action {
        action: "link",
        destination: "current".into(),
        key: None,
        line: None,
        url: None,
        sha256: None,
        status,
        reason: plan.current.reason.clone(),
        error,
        size: None,
        resumed: false,
        replaced: None,
    }
}

/// One destination of a pinned artifact.
#[derive(Debug, Clone)]
struct Target {
    index: usize,
    kind: ArtifactKind,
    destination: String,
    member: Option<String>,
    mode: u32,
    /// Staged without a receipt: compare with the member before replacing anything.
    adopt: bool,
    /// A file found different may be replaced (not `current`'s stage, or `--force`).
    may_replace: bool,
    /// The sha256 of what is staged there now, as the plan found it.
    staged_sha256: Option<String>,
}

/// How one target ended.
#[derive(Debug)]
struct Done {
    size: u64,
    resumed: bool,
    /// Adopted as planned, but the file was not the member and was replaced.
    differed: Option<String>,
    replaced: Option<PathBuf>,
}

/// Execute `plan` in the tree at `layout`. The caller holds the lock and computed the plan under it.
pub async fn execute(
    plan: &Plan,
    layout: &Layout,
    options: &Options,
    reporter: Arc<dyn Reporter>,
) -> Result<Report, ApplyError> {
    let root = layout.root();
    let owner = layout.owner();
    crate::owner::create_dir_all(owner, &root).map_err(io_err("create directory", &root))?;
    // Made here so a download's partial file is in a directory the home's owner can write.
    crate::owner::create_dir_all(owner, &layout.partial())
        .map_err(io_err("create directory", &layout.partial()))?;
    let fetch_options = FetchOptions {
        owner,
        ..options.fetch.clone()
    };
    let client = fetch::client(&fetch_options)?;
    let mut actions = artifact_actions(plan, |_| Status::Unchanged);

    // Group the work by pin: the same bytes are fetched once, wherever they go.
    let mut groups: BTreeMap<String, (String, Vec<Target>)> = BTreeMap::new();
    let mut matching = Vec::new();
    for (index, (stage, artifact)) in artifacts(plan).enumerate() {
        if artifact.action == ArtifactAction::Ok {
            continue;
        }
        if let Some(refusal) = refusal(stage, artifact, options.force) {
            actions[index].status = Status::Failed;
            actions[index].error = Some(refusal);
            continue;
        }
        // Its sha256 already matches the pin: nothing to fetch to prove it.
        if artifact.action == ArtifactAction::Adopt && artifact.state == ArtifactState::Ok {
            matching.push((index, artifact.clone()));
            continue;
        }
        let mode = match artifact.kind {
            ArtifactKind::Binary => install::BINARY_MODE,
            ArtifactKind::Library => install::LIBRARY_MODE,
        };
        groups
            .entry(artifact.sha256.clone())
            .or_insert_with(|| (artifact.url.clone(), Vec::new()))
            .1
            .push(Target {
                index,
                kind: artifact.kind,
                destination: artifact.destination.clone(),
                member: artifact.member.clone(),
                mode,
                adopt: artifact.action == ArtifactAction::Adopt,
                may_replace: !stage.current || options.force,
                staged_sha256: artifact.staged_sha256.clone(),
            });
    }

    let semaphore = Arc::new(tokio::sync::Semaphore::new(options.jobs.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    // Adoptions that need no download: hashed again while the downloads run.
    for (index, artifact) in matching {
        let layout = layout.clone();
        tasks.spawn_blocking(move || {
            let done = adopt_matching(&layout, &artifact).map(|size| Done {
                size,
                resumed: false,
                differed: None,
                replaced: None,
            });
            vec![(index, done)]
        });
    }
    for (sha256, (url, targets)) in groups {
        let client = client.clone();
        let semaphore = semaphore.clone();
        let layout = layout.clone();
        let daemon = plan.daemon.clone();
        let fetch_options = fetch_options.clone();
        let reporter = reporter.clone();
        tasks.spawn(async move {
            let _permit = semaphore
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            let progress = reporter.artifact(&targets[0].destination);
            let fetched = fetch::fetch(
                &client,
                &url,
                &sha256,
                &layout.partial(),
                &fetch_options,
                progress.as_ref(),
            )
            .await;
            match fetched {
                Ok(fetched) => tokio::task::spawn_blocking(move || {
                    install_all(
                        &layout,
                        &fetched,
                        &url,
                        &sha256,
                        &daemon,
                        fetch_options.max_size,
                        &targets,
                    )
                })
                .await
                .expect("install does not panic"),
                Err(e) => {
                    let message = error_chain(&e);
                    targets
                        .iter()
                        .map(|t| (t.index, Err(message.clone())))
                        .collect::<Vec<TargetResult>>()
                }
            }
        });
    }
    let root_prefix = root.clone();
    while let Some(joined) = tasks.join_next().await {
        for (index, result) in joined.expect("apply tasks do not panic") {
            let action = &mut actions[index];
            match result {
                Ok(done) => {
                    action.status = Status::Changed;
                    action.size = Some(done.size);
                    action.resumed = done.resumed;
                    // Planned as an adoption, but not the pinned archive's member: replaced.
                    if let Some(reason) = done.differed {
                        action.action = "replace";
                        action.reason = reason;
                    }
                    action.replaced = done.replaced.map(|kept| Replaced {
                        sha256: plan_artifact(plan, index).staged_sha256.clone(),
                        kept_at: kept
                            .strip_prefix(&root_prefix)
                            .unwrap_or(&kept)
                            .display()
                            .to_string(),
                    });
                }
                Err(message) => {
                    action.status = Status::Failed;
                    action.error = Some(message);
                }
            }
        }
    }

    if plan.current.action == LinkAction::Create {
        // Like `cosmovisor init`: the link goes in once the genesis binary is there.
        let genesis: Vec<_> = actions
            .iter()
            .filter(|a| a.destination.starts_with("genesis/bin/"))
            .collect();
        let genesis_ready =
            !genesis.is_empty() && genesis.iter().all(|a| a.status != Status::Failed);
        let action = if genesis_ready {
            match create_current(layout) {
                Ok(()) => link_action(plan, Status::Changed, None),
                Err(e) => link_action(plan, Status::Failed, Some(error_chain(&e))),
            }
        } else {
            link_action(
                plan,
                Status::Failed,
                Some("the genesis binary is not staged; current was not created".into()),
            )
        };
        actions.push(action);
    }
    Ok(Report::from_actions(actions))
}

type TargetResult = (usize, Result<Done, String>);

/// The `index`-th artifact of the plan, in the order of the report's actions.
fn plan_artifact(plan: &Plan, index: usize) -> &ArtifactPlan {
    artifacts(plan)
        .nth(index)
        .map(|(_, a)| a)
        .expect("actions follow the plan's artifacts")
}

/// Adopt a file staged without a receipt whose sha256 the plan found equal to the pin: hash it
/// again (it must still match, and not change while read) and write its receipt. Returns its
/// size; errors as one line.
fn adopt_matching(layout: &Layout, artifact: &ArtifactPlan) -> Result<u64, String> {
    let path = layout.root().join(&artifact.destination);
    let (sha256, identity) = install::hash_unchanged(&path).map_err(|e| error_chain(&e))?;
    if sha256 != artifact.sha256 {
        return Err(format!(
            "{} changed since it was planned: sha256 {sha256}, the pin is {}",
            artifact.destination, artifact.sha256
        ));
    }
    let receipt = Receipt {
        path: artifact.destination.clone(),
        sha256,
        size: identity.size,
        source_url: artifact.url.clone(),
        source_sha256: artifact.sha256.clone(),
        member: None,
        identity,
    };
    receipt::write(&layout.receipts(), &receipt, layout.owner())
        .map_err(|e| format!("cannot write the receipt of {}: {e}", artifact.destination))?;
    tracing::info!("adopted {}: its sha256 is the pin", artifact.destination);
    Ok(identity.size)
}

/// Install a verified download at each of its destinations, with receipts; then drop it.
fn install_all(
    layout: &Layout,
    fetched: &fetch::Fetched,
    url: &str,
    sha256: &str,
    daemon: &str,
    max_size: u64,
    targets: &[Target],
) -> Vec<TargetResult> {
    let results = targets
        .iter()
        .map(|target| {
            let staged = Staging {
                url,
                sha256,
                member: target.member.as_deref(),
                daemon,
                destination: &target.destination,
                mode: target.mode,
                max_size,
            };
            let result = stage_target(layout, &fetched.path, &staged, target, targets.len() == 1)
                .map(|mut done| {
                    done.resumed = fetched.resumed;
                    done
                });
            (target.index, result)
        })
        .collect();
    // Verified bytes that were unpacked or copied are not needed any more.
    if let Err(e) = fs::remove_file(&fetched.path)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!("cannot remove {}: {e}", fetched.path.display());
    }
    results
}

/// One target of a download: a library archive must name its member; a file staged without a
/// receipt is compared before anything is replaced; anything else is staged.
fn stage_target(
    layout: &Layout,
    file: &Path,
    staging: &Staging<'_>,
    target: &Target,
    consume: bool,
) -> Result<Done, String> {
    if target.kind == ArtifactKind::Library && target.member.is_none() {
        let archive = unpack::detect(file, staging.url)
            .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        if archive.is_some() {
            return Err(format!(
                "{} is an archive, and the library entry names no member in it: add path = \"lib/<the library's file>\" to it in the manifest (the daemon binary is not a library)",
                staging.url
            ));
        }
    }
    if !target.adopt {
        return stage_with(layout, file, staging, consume).map(|installed| Done {
            size: installed.size,
            resumed: false,
            differed: None,
            replaced: installed.replaced,
        });
    }
    let (dest_path, aside) = destination(layout, staging.destination);
    let dest = install::Dest {
        path: &dest_path,
        mode: staging.mode,
        aside: &aside,
        owner: layout.owner(),
    };
    let source = source(file, staging, false);
    receipt::remove(&layout.receipts(), staging.destination).map_err(|e| {
        format!(
            "cannot remove the old receipt of {}: {e}",
            staging.destination
        )
    })?;
    let adoption =
        install::adopt(&source, &dest, target.may_replace).map_err(|e| error_chain(&e))?;
    let what = match &staging.member {
        Some(member) => format!("member {member} of {}", staging.url),
        None => format!("the pinned archive {}", staging.url),
    };
    match adoption {
        install::Adoption::Same {
            installed,
            identity,
        } => {
            let size = installed.size;
            let receipt = Receipt {
                path: staging.destination.to_string(),
                sha256: installed.sha256,
                size,
                source_url: staging.url.to_string(),
                source_sha256: staging.sha256.to_string(),
                member: installed.member,
                identity,
            };
            receipt::write(&layout.receipts(), &receipt, layout.owner())
                .map_err(|e| format!("cannot write the receipt of {}: {e}", staging.destination))?;
            tracing::info!("adopted {}: it is {what}", staging.destination);
            Ok(Done {
                size,
                resumed: false,
                differed: None,
                replaced: None,
            })
        }
        install::Adoption::Replaced(installed) => {
            let size = installed.size;
            let differed = format!(
                "staged without a receipt and not {what} (sha256 {}, the member's {})",
                target.staged_sha256.as_deref().unwrap_or("unknown"),
                installed.sha256
            );
            let replaced = installed.replaced.clone();
            write_receipt(layout, staging.destination, installed, staging)
                .map_err(|e| format!("cannot write the receipt of {}: {e}", staging.destination))?;
            tracing::info!("staged {} from {}", staging.destination, staging.url);
            Ok(Done {
                size,
                resumed: false,
                differed: Some(differed),
                replaced,
            })
        }
        install::Adoption::Differs { staged, expected } => Err(format!(
            "{} (sha256 {staged}) is not {what} (sha256 {expected}), and current points to its stage: cvx does not replace the binary a node may be running without --force",
            staging.destination
        )),
    }
}

/// The absolute path of `rel` (relative to `$DAEMON_HOME/cosmovisor`) and the directory a file
/// it replaces is kept in: `.cvx/replaced/<rel's directory>`, named by stage.
fn destination(layout: &Layout, rel: &str) -> (PathBuf, PathBuf) {
    let parent = Path::new(rel).parent().unwrap_or(Path::new(""));
    (layout.root().join(rel), layout.replaced().join(parent))
}

fn source<'a>(file: &'a Path, staging: &Staging<'a>, consume: bool) -> install::Source<'a> {
    install::Source {
        file,
        url: staging.url,
        sha256: staging.sha256,
        member: staging.member,
        daemon: staging.daemon,
        max_size: staging.max_size,
        consume,
    }
}

/// One verified artifact to put at one place in the tree.
pub struct Staging<'a> {
    pub url: &'a str,
    pub sha256: &'a str,
    pub member: Option<&'a str>,
    pub daemon: &'a str,
    /// Relative to `$DAEMON_HOME/cosmovisor`.
    pub destination: &'a str,
    pub mode: u32,
    /// The most bytes an archive may unpack to (`--max-size`, in bytes); the download itself is
    /// capped by [`FetchOptions::max_size`], usually the same value.
    pub max_size: u64,
}

/// Install the verified download `file` as `staging` says, with its receipt. `consume` lets the
/// download itself be moved into place. Returns the installed size; errors as one line.
pub fn stage(
    layout: &Layout,
    file: &std::path::Path,
    staging: &Staging<'_>,
    consume: bool,
) -> Result<u64, String> {
    stage_with(layout, file, staging, consume).map(|installed| installed.size)
}

fn stage_with(
    layout: &Layout,
    file: &std::path::Path,
    staging: &Staging<'_>,
    consume: bool,
) -> Result<install::Installed, String> {
    let receipts = layout.receipts();
    let (dest_path, aside) = destination(layout, staging.destination);
    let dest = install::Dest {
        path: &dest_path,
        mode: staging.mode,
        aside: &aside,
        owner: layout.owner(),
    };
    receipt::remove(&receipts, staging.destination).map_err(|e| {
        format!(
            "cannot remove the old receipt of {}: {e}",
            staging.destination
        )
    })?;
    let installed =
        install::install(&source(file, staging, consume), &dest).map_err(|e| error_chain(&e))?;
    write_receipt(layout, staging.destination, installed.clone(), staging)
        .map_err(|e| format!("cannot write the receipt of {}: {e}", staging.destination))?;
    match &installed.replaced {
        Some(kept) => tracing::info!(
            "staged {} from {}; the file it replaced is kept at {}",
            staging.destination,
            staging.url,
            kept.display()
        ),
        None => tracing::info!("staged {} from {}", staging.destination, staging.url),
    }
    Ok(installed)
}

/// Record what was just installed at `rel` (relative to `$DAEMON_HOME/cosmovisor`) from the
/// artifact `staging` names.
fn write_receipt(
    layout: &Layout,
    rel: &str,
    installed: install::Installed,
    staging: &Staging<'_>,
) -> io::Result<()> {
    let meta = fs::metadata(layout.root().join(rel))?;
    let receipt = Receipt {
        path: rel.to_string(),
        sha256: installed.sha256,
        size: installed.size,
        source_url: staging.url.to_string(),
        source_sha256: staging.sha256.to_string(),
        member: installed.member,
        identity: FileIdentity::of(&meta),
    };
    receipt::write(&layout.receipts(), &receipt, layout.owner())
}

/// Unpack the verified archive `file` whole into `stage_dir` (`upgrades/<dir>`), as Cosmovisor
/// does with an upgrade it downloads, so that a `lib/` shipped beside `bin/<daemon>` is kept.
///
/// Every regular file goes to its own path under `stage_dir`, installed atomically with a
/// receipt; symlinks that stay inside the archive are recreated; the daemon binary, chosen by
/// `staging.member` and the member rules of [`unpack::extract`], is also put at
/// `<stage_dir>/bin/<daemon>`. Modes: the daemon 0755, files under `lib/` 0644, other files 0755
/// when the archive gives them an execute bit, else 0644. The archive may unpack to at most
/// `staging.max_size` bytes in all (the copy of the daemon at `bin/<daemon>` aside). A file that
/// is not an archive is staged (moved) as `<stage_dir>/bin/<daemon>`. `staging.destination` and
/// `staging.mode` are not used.
///
/// Returns the paths staged (files and symlinks), relative to `$DAEMON_HOME/cosmovisor`. On
/// error nothing half-written is left at a final name; files this call already installed stay,
/// with their receipts. Errors as one line.
pub fn stage_archive_tree(
    layout: &Layout,
    file: &Path,
    staging: &Staging<'_>,
    stage_dir: &str,
) -> Result<Vec<String>, String> {
    let bin = format!("{stage_dir}/bin/{}", staging.daemon);
    let kind = unpack::detect(file, staging.url)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let Some(kind) = kind else {
        let binary = Staging {
            destination: &bin,
            mode: install::BINARY_MODE,
            ..*staging
        };
        stage(layout, file, &binary, true)?;
        return Ok(vec![bin]);
    };
    let owner = layout.owner();
    let mut staged = Vec::new();
    let unpacked = unpack::unpack_tree(
        file,
        kind,
        staging.member,
        staging.daemon,
        staging.max_size,
        |entry| -> Result<(), InstallError> {
            match entry {
                TreeEntry::File(member) => {
                    let name = member.name.to_owned();
                    let mode = if member.daemon {
                        install::BINARY_MODE
                    } else if name.starts_with("lib/") || !member.executable {
                        install::LIBRARY_MODE
                    } else {
                        install::BINARY_MODE
                    };
                    let daemon = member.daemon;
                    let rel = format!("{stage_dir}/{name}");
                    let (dest, aside) = destination(layout, &rel);
                    forget(layout, &rel)?;
                    let (extracted, replaced) = install::write_new(
                        &install::Dest {
                            path: &dest,
                            mode,
                            aside: &aside,
                            owner,
                        },
                        |tmp, _| Ok(member.copy_to(tmp)?),
                    )?;
                    sync_parent(&dest)?;
                    let installed = install::Installed {
                        sha256: extracted.sha256,
                        size: extracted.size,
                        member: Some(extracted.member),
                        replaced,
                    };
                    record(layout, &rel, installed.clone(), staging)?;
                    let elsewhere = rel != bin;
                    staged.push(rel);
                    if daemon && elsewhere {
                        copy_daemon(layout, &dest, &bin, installed, staging)?;
                        staged.push(bin.clone());
                    }
                }
                TreeEntry::Symlink { name, target } => {
                    let rel = format!("{stage_dir}/{name}");
                    let (dest, aside) = destination(layout, &rel);
                    forget(layout, &rel)?;
                    install::replace_symlink(
                        target,
                        &install::Dest {
                            path: &dest,
                            mode: install::LIBRARY_MODE,
                            aside: &aside,
                            owner,
                        },
                    )?;
                    sync_parent(&dest)?;
                    staged.push(rel);
                }
            }
            Ok(())
        },
    );
    match unpacked {
        Ok(member) => {
            tracing::info!(
                "staged {} files and links from {} in {stage_dir} (daemon: {member})",
                staged.len(),
                staging.url
            );
            Ok(staged)
        }
        Err(e) => Err(error_chain(&e)),
    }
}

/// Drop the receipt of `rel` before its file is replaced: a crash in between leaves no receipt
/// vouching for bytes it did not see.
fn forget(layout: &Layout, rel: &str) -> Result<(), InstallError> {
    let path = receipt::receipt_path(&layout.receipts(), rel);
    Ok(
        receipt::remove(&layout.receipts(), rel)
            .map_err(io_err("remove the old receipt", &path))?,
    )
}

fn record(
    layout: &Layout,
    rel: &str,
    installed: install::Installed,
    staging: &Staging<'_>,
) -> Result<(), InstallError> {
    Ok(write_receipt(layout, rel, installed, staging)
        .map_err(io_err("write the receipt of", &layout.root().join(rel)))?)
}

fn sync_parent(dest: &Path) -> Result<(), InstallError> {
    install::sync_dir(dest.parent().expect("destinations are inside the tree"))
}

/// Put a copy of the daemon binary just installed at `from` at `bin` (relative to the
/// cosmovisor root), proving on the way that the bytes are still the member's.
fn copy_daemon(
    layout: &Layout,
    from: &Path,
    bin: &str,
    installed: install::Installed,
    staging: &Staging<'_>,
) -> Result<(), InstallError> {
    let (dest, aside) = destination(layout, bin);
    forget(layout, bin)?;
    let target = install::Dest {
        path: &dest,
        mode: install::BINARY_MODE,
        aside: &aside,
        owner: layout.owner(),
    };
    install::write_new(&target, |tmp, path| {
        let source = File::open(from).map_err(io_err("read", from))?;
        let (sha256, _) = crate::hash::sha256_reader(Tee { source, out: tmp })
            .map_err(io_err("copy the daemon binary to", path))?;
        if sha256 == installed.sha256 {
            Ok(())
        } else {
            let changed = io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "it changed after it was unpacked (sha256 {sha256}, unpacked as {})",
                    installed.sha256
                ),
            );
            Err(io_err("copy the daemon binary from", from)(changed).into())
        }
    })?;
    sync_parent(&dest)?;
    record(layout, bin, installed, staging)
}

/// Reads `source`, writing every byte read to `out` as well.
struct Tee<'a> {
    source: File,
    out: &'a mut File,
}

impl Read for Tee<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.source.read(buf)?;
        self.out.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// `current -> genesis`, relative as Cosmovisor writes it.
fn create_current(layout: &Layout) -> Result<(), ApplyError> {
    Ok(install::point_current(layout, crate::tree::GENESIS)
        .map_err(io_err("point current at genesis in", &layout.root()))?)
}
