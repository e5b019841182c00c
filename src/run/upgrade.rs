//! The steps between the old daemon's exit and the new one's launch (DESIGN §5, step 4), in this
//! order: take the tree lock, wait DAEMON_RESTART_DELAY, resolve the binary (staged and verified,
//! or downloaded and verified), back up `data/` once per plan, run the custom pre-upgrade script,
//! switch `current`, record the plan, run `<new> pre-upgrade`. A failure to resolve the binary
//! costs nothing else: no backup, no script, `current` unchanged. A signal during the steps before
//! the switch ends the step in progress promptly, removes its partial output and leaves `current`
//! as it was, so the next start resumes the upgrade.

use crate::errors::io_err;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tracing::{info, warn};

use super::backup::{self, BackupError};
use super::binary::{self, BinaryError, Pins};
use super::config::Config;
use crate::apply::{self, fetch, install};
use crate::errors::error_chain;
use crate::tree::{self, Layout, PlanInfo, lock};

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error(transparent)]
    Binary(#[from] BinaryError),
    #[error(
        "{0}; stage it with `cvx apply`, or allow downloads with DAEMON_ALLOW_DOWNLOAD_BINARIES=true"
    )]
    NotStaged(#[source] BinaryError),
    #[error(transparent)]
    Backup(#[from] BackupError),
    #[error("custom pre-upgrade script {} {outcome}", script.display())]
    CustomScript { script: PathBuf, outcome: String },
    #[error("cannot download the binary for upgrade {name:?}: {reason}")]
    Download { name: String, reason: String },
    #[error("cannot take the tree's lock")]
    Lock(#[source] lock::LockError),
    #[error("cannot switch current to {dir}")]
    Switch {
        dir: String,
        #[source]
        source: io::Error,
    },
    #[error("pre-upgrade of the new binary {outcome}")]
    PreUpgrade { outcome: String },
    #[error(
        "interrupted by a signal while {step}; current is unchanged and the next start resumes the upgrade"
    )]
    Interrupted { step: &'static str },
    #[error(transparent)]
    Io(#[from] crate::errors::IoError),
}

/// Set when a signal arrives during the upgrade: blocking work polls the flag, async work awaits
/// [`Cancel::wait`].
#[derive(Clone)]
pub struct Cancel {
    flag: Arc<AtomicBool>,
    changed: tokio::sync::watch::Receiver<bool>,
}

/// The side that cancels.
pub struct Canceller {
    flag: Arc<AtomicBool>,
    changed: tokio::sync::watch::Sender<bool>,
}

impl Canceller {
    pub fn new() -> (Canceller, Cancel) {
        let flag = Arc::new(AtomicBool::new(false));
        let (tx, rx) = tokio::sync::watch::channel(false);
        (
            Canceller {
                flag: flag.clone(),
                changed: tx,
            },
            Cancel { flag, changed: rx },
        )
    }

    pub fn cancel(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let _ = self.changed.send(true);
    }
}

impl Cancel {
    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Resolves once cancelled.
    async fn wait(&self) {
        let mut changed = self.changed.clone();
        let _ = changed.wait_for(|c| *c).await;
    }

    /// `work`, unless a signal comes first.
    pub async fn guard<T>(
        &self,
        step: &'static str,
        work: impl Future<Output = Result<T, UpgradeError>>,
    ) -> Result<T, UpgradeError> {
        if self.is_set() {
            return Err(UpgradeError::Interrupted { step });
        }
        tokio::select! {
            result = work => result,
            () = self.wait() => Err(UpgradeError::Interrupted { step }),
        }
    }
}

/// `LD_LIBRARY_PATH` for a binary of `stage`: its `lib/` first, then what the environment had.
pub fn library_path(layout: &Layout, stage: &str) -> OsString {
    let mut path = layout.root().join(stage).join("lib").into_os_string();
    if let Some(existing) = std::env::var_os("LD_LIBRARY_PATH").filter(|p| !p.is_empty()) {
        path.push(":");
        path.push(existing);
    }
    path
}

/// Take the tree's lock, waiting (saying so) while `cvx apply` holds it: it may be staging the
/// very binary this upgrade needs. Cancel it with [`Cancel::guard`].
pub async fn lock(layout: &Layout) -> Result<lock::TreeLock, UpgradeError> {
    let mut said = false;
    loop {
        match lock::lock(layout, Duration::ZERO, lock::Role::Run) {
            Ok(lock) => return Ok(lock),
            Err(lock::LockError::Locked { holder, path, .. }) => {
                if !said {
                    info!(
                        "{} holds {}; waiting for it to finish",
                        holder.map_or_else(|| "another cvx process".to_string(), |h| h.to_string()),
                        path.display()
                    );
                    said = true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(UpgradeError::Lock(e)),
        }
    }
}

/// Everything between stop and relaunch, in DESIGN's order, under the tree lock. `backup` gets
/// the backup's path as soon as there is one (for the history, even when a later step fails);
/// `ahead`, the backup begun while the node ran, if it was.
pub async fn perform(
    config: &Config,
    layout: &Layout,
    plan: &PlanInfo,
    cancel: &Cancel,
    backup: &mut Option<PathBuf>,
    ahead: Option<backup::Ahead>,
) -> Result<(), UpgradeError> {
    let dir = tree::upgrade_dir(&plan.name, config.recase);
    let (name, height) = (plan.name.as_str(), plan.height);
    let _lock = cancel
        .guard("waiting for the tree lock", lock(layout))
        .await?;
    if let Some(delay) = config.restart_delay {
        info!(upgrade = %name, height, "waiting DAEMON_RESTART_DELAY {}", crate::duration::show(delay));
        cancel
            .guard("waiting DAEMON_RESTART_DELAY", async {
                tokio::time::sleep(delay).await;
                Ok(())
            })
            .await?;
    }

    let pins = Pins::load(config.manifest.as_deref(), config.recase)?;
    let binary = resolve(config, layout, plan, &dir, pins.as_ref(), cancel).await?;
    info!(upgrade = %name, height, "binary {} is staged and verified", binary.display());

    if config.skip_backup {
        info!(upgrade = %name, height, "backup skipped (UNSAFE_SKIP_BACKUP)");
    } else if let Some(record) = backup::taken(layout, plan, config.recase) {
        info!(upgrade = %name, height, "data was already backed up for this upgrade to {}; not copying again", record.path.display());
        super::metrics::handle().backup_finished(record.bytes_copied);
        *backup = Some(record.path);
    } else {
        info!(upgrade = %name, height, "backing up data to {}", config.backup_dir.display());
        super::metrics::handle().backup_started();
        let from_stage = tree::current_stage(layout);
        let (home, backup_dir, layout2, plan2, recase, flag) = (
            config.home.clone(),
            config.backup_dir.clone(),
            layout.clone(),
            plan.clone(),
            config.recase,
            cancel.flag.clone(),
        );
        let record = tokio::task::spawn_blocking(move || {
            backup::backup(
                &home,
                &backup_dir,
                &layout2,
                &plan2,
                &from_stage,
                recase,
                &flag,
                ahead,
            )
        })
        .await
        .expect("backup does not panic")
        .map_err(|e| match e {
            BackupError::Interrupted { .. } => UpgradeError::Interrupted {
                step: "backing up data (the partial copy was removed)",
            },
            other => other.into(),
        })?;
        info!(
            upgrade = %name,
            height,
            "backed up data to {} in {}: {} table files linked ({} bytes), {} files copied ({} bytes){}",
            record.path.display(),
            record.took(),
            record.files_linked,
            record.bytes_linked,
            record.files_copied,
            record.bytes_copied,
            match record.files_linked_ahead {
                0 => String::new(),
                n => format!("; {n} of the tables were linked ahead, while the node ran"),
            }
        );
        super::metrics::handle().backup_finished(record.bytes_copied);
        *backup = Some(record.path);
    }

    if let Some(script) = &config.custom_preupgrade {
        run_custom_script(config, script, plan, cancel).await?;
    }
    if cancel.is_set() {
        return Err(UpgradeError::Interrupted {
            step: "about to switch",
        });
    }
    install::point_current(layout, &dir).map_err(|source| UpgradeError::Switch {
        dir: dir.clone(),
        source,
    })?;
    write_plan(layout, &dir, plan)?;
    info!(upgrade = %name, height, "switched current to {dir}");
    pre_upgrade(config, layout, plan, &dir).await
}

/// The binary of `plan`, proven fit to run: staged and verified, or downloaded, verified and
/// staged when DAEMON_ALLOW_DOWNLOAD_BINARIES allows it.
async fn resolve(
    config: &Config,
    layout: &Layout,
    plan: &PlanInfo,
    dir: &str,
    pins: Option<&Pins>,
    cancel: &Cancel,
) -> Result<PathBuf, UpgradeError> {
    match binary::verify(layout, &config.name, dir, pins) {
        Err(missing @ BinaryError::Missing { .. }) if !config.allow_download => {
            Err(UpgradeError::NotStaged(missing))
        }
        Err(BinaryError::Missing { .. }) => {
            cancel
                .guard(
                    "downloading the binary",
                    download(config, layout, plan, dir, pins),
                )
                .await?;
            Ok(binary::verify(layout, &config.name, dir, pins)?)
        }
        other => Ok(other?),
    }
}

/// Download `plan`'s binary, verify it and stage it at `dir`.
async fn download(
    config: &Config,
    layout: &Layout,
    plan: &PlanInfo,
    dir: &str,
    pins: Option<&Pins>,
) -> Result<(), UpgradeError> {
    let download_err = |reason: String| UpgradeError::Download {
        name: plan.name.clone(),
        reason,
    };
    let (url, sha256, member) = download_source(config, plan, dir, pins)
        .await
        .map_err(download_err)?;
    info!(upgrade = %plan.name, height = plan.height, "downloading {url}");
    let options = fetch::FetchOptions {
        max_size: config.max_size,
        ..fetch::FetchOptions::default()
    };
    let client = fetch::client(&options).map_err(|e| download_err(error_chain(&e)))?;
    let fetched = fetch::fetch(
        &client,
        &url,
        &sha256,
        &layout.partial(),
        &options,
        &fetch::NoProgress,
    )
    .await
    .map_err(|e| download_err(error_chain(&e)))?;
    let destination = format!("{dir}/bin/{}", config.name);
    let (layout, daemon, file, dir) = (
        layout.clone(),
        config.name.clone(),
        fetched.path.clone(),
        dir.to_string(),
    );
    let result = tokio::task::spawn_blocking(move || {
        let staging = apply::Staging {
            url: &url,
            sha256: &sha256,
            member: member.as_deref(),
            daemon: &daemon,
            destination: &destination,
            mode: install::BINARY_MODE,
            max_size: options.max_size,
        };
        // As Cosmovisor does: the whole archive (bin/ and lib/), so the libraries shipped beside
        // the binary are there when it starts.
        let result = apply::stage_archive_tree(&layout, &file, &staging, &dir);
        let _ = fs::remove_file(&file);
        result
    })
    .await
    .expect("staging does not panic");
    let staged = result.map_err(download_err)?;
    info!(upgrade = %plan.name, height = plan.height, "staged {}", staged.join(", "));
    Ok(())
}

/// `COSMOVISOR_CUSTOM_PREUPGRADE <name> <height>` in the home, made executable for its owner first
/// as Cosmovisor does; killed (its whole group) when a signal interrupts the upgrade.
async fn run_custom_script(
    config: &Config,
    script: &Path,
    plan: &PlanInfo,
    cancel: &Cancel,
) -> Result<(), UpgradeError> {
    let script_err = |outcome: String| UpgradeError::CustomScript {
        script: script.to_path_buf(),
        outcome,
    };
    let meta = fs::metadata(script).map_err(|e| script_err(format!("cannot be read: {e}")))?;
    let mode = meta.permissions().mode();
    if mode & 0o100 == 0 {
        info!("adding u+x to {}, as Cosmovisor does", script.display());
        fs::set_permissions(script, fs::Permissions::from_mode(mode | 0o100))
            .map_err(|e| script_err(format!("is not executable and cannot be made so: {e}")))?;
    }
    info!(upgrade = %plan.name, height = plan.height, "running COSMOVISOR_CUSTOM_PREUPGRADE {}", script.display());
    let child = tokio::process::Command::new(script)
        .arg(&plan.name)
        .arg(plan.height.to_string())
        .current_dir(&config.home)
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| script_err(format!("could not be run: {e}")))?;
    let pid = child
        .id()
        .and_then(|id| rustix::process::Pid::from_raw(id as i32));
    let status = tokio::select! {
        status = wait_bounded(child, config.custom_preupgrade_timeout, "CVX_CUSTOM_PREUPGRADE_TIMEOUT") => status.map_err(script_err)?,
        () = cancel.wait() => {
            // Dropping the wait kills the script; its group goes too.
            if let Some(pid) = pid {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
            return Err(UpgradeError::Interrupted { step: "running the custom pre-upgrade script" });
        }
    };
    if status.success() {
        Ok(())
    } else {
        Err(script_err(describe(status)))
    }
}

/// Wait for `child` (which leads its own process group), up to `limit`; past it, kill the group
/// and say which variable set the limit.
async fn wait_bounded(
    mut child: tokio::process::Child,
    limit: Option<Duration>,
    variable: &str,
) -> Result<std::process::ExitStatus, String> {
    let pid = child
        .id()
        .and_then(|id| rustix::process::Pid::from_raw(id as i32));
    let waited = match limit {
        Some(limit) => tokio::time::timeout(limit, child.wait()).await,
        None => Ok(child.wait().await),
    };
    match waited {
        Ok(status) => status.map_err(|e| format!("could not be waited for: {e}")),
        Err(_) => {
            if let Some(pid) = pid {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
            let _ = child.wait().await;
            Err(format!(
                "did not finish within {variable}={}; killed it",
                crate::duration::show(limit.unwrap_or_default())
            ))
        }
    }
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => "ended abnormally".into(),
    }
}

/// Where to download `plan`'s binary from, and its sha256: the manifest's pin when a manifest
/// is known and names the upgrade, else the plan's `info` with its `?checksum=sha256:...`.
async fn download_source(
    config: &Config,
    plan: &PlanInfo,
    dir: &str,
    pins: Option<&Pins>,
) -> Result<(String, String, Option<String>), String> {
    if let Some(artifact) = pins.and_then(|p| p.binary(dir)) {
        return Ok((
            artifact.url.clone(),
            artifact.sha256.clone(),
            artifact.path.clone(),
        ));
    }
    let platform = crate::platform::host_platform();
    let binaries = plan_binaries(&plan.info).await?;
    let url = binaries
        .get(&platform)
        .or_else(|| binaries.get("any"))
        .ok_or_else(|| format!("the plan's info lists no binary for {platform} or \"any\""))?;
    let (url, checksum, note) = fetch::split_checksum(url);
    match checksum {
        Some(sha256) => Ok((url, sha256, None)),
        None => Err(format!(
            "{url} carries no ?checksum=sha256:...{} and no manifest pins it; cvx never runs unverified bytes{}",
            note.map(|n| format!(" ({n})")).unwrap_or_default(),
            if config.must_have_checksum {
                ""
            } else {
                " (whatever DAEMON_DOWNLOAD_MUST_HAVE_CHECKSUM says)"
            }
        )),
    }
}

/// The `binaries` map of a plan's info: inline JSON, or JSON at a URL.
async fn plan_binaries(info: &str) -> Result<std::collections::BTreeMap<String, String>, String> {
    #[derive(serde::Deserialize)]
    struct Info {
        binaries: std::collections::BTreeMap<String, String>,
    }
    let info = info.trim();
    let json = if info.starts_with('{') {
        info.as_bytes().to_vec()
    } else if info.starts_with("http://") || info.starts_with("https://") {
        let options = fetch::FetchOptions::default();
        let client = fetch::client(&options).map_err(|e| error_chain(&e))?;
        fetch::read(&client, info, fetch::MAX_DOCUMENT, &options)
            .await
            .map_err(|e| {
                format!(
                    "cannot fetch the plan's info from {info}: {}",
                    error_chain(&e)
                )
            })?
    } else if info.is_empty() {
        return Err("the plan carries no info to download from".into());
    } else {
        return Err(format!(
            "the plan's info is neither JSON nor a URL: {info:?}"
        ));
    };
    serde_json::from_slice::<Info>(&json)
        .map(|i| i.binaries)
        .map_err(|e| format!("the plan's info is not {{\"binaries\": {{...}}}}: {e}"))
}

/// `upgrades/<dir>/upgrade-info.json`: the plan that brought this binary, as Cosmovisor keeps it.
fn write_plan(layout: &Layout, dir: &str, plan: &PlanInfo) -> Result<(), UpgradeError> {
    let path = layout.root().join(dir).join("upgrade-info.json");
    let json = serde_json::json!({ "name": plan.name, "height": plan.height, "info": plan.info });
    let parent = path.parent().expect("inside the tree");
    let mut tmp = tempfile::NamedTempFile::new_in(parent).map_err(io_err("write", &path))?;
    serde_json::to_writer(&mut tmp, &json).map_err(|e| io_err("write", &path)(e.into()))?;
    tmp.as_file().sync_all().map_err(io_err("sync", &path))?;
    tmp.persist(&path)
        .map_err(|e| io_err("write", &path)(e.error))?;
    Ok(())
}

/// The plan of the upgrade `current` points to, as recorded at its switch (None for genesis or
/// a stage switched to by hand).
pub fn current_upgrade(layout: &Layout) -> Option<PlanInfo> {
    let bytes = fs::read(layout.current().join("upgrade-info.json")).ok()?;
    match tree::parse_upgrade_info(&bytes) {
        tree::UpgradeInfo::Valid(plan) => Some(plan),
        _ => None,
    }
}

/// `<new binary> pre-upgrade`: 0 done, 1 not implemented (continue), 30 failed, 31 retry up to
/// DAEMON_PREUPGRADE_MAX_RETRIES; anything else (another code, a signal) is a failure.
async fn pre_upgrade(
    config: &Config,
    layout: &Layout,
    plan: &PlanInfo,
    dir: &str,
) -> Result<(), UpgradeError> {
    let binary = layout.root().join(dir).join("bin").join(&config.name);
    let (name, height) = (plan.name.as_str(), plan.height);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let child = tokio::process::Command::new(&binary)
            .arg("pre-upgrade")
            .env("LD_LIBRARY_PATH", library_path(layout, dir))
            .current_dir(&config.home)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| UpgradeError::PreUpgrade {
                outcome: format!("could not be run ({}): {e}", binary.display()),
            })?;
        let status = wait_bounded(child, config.preupgrade_timeout, "CVX_PREUPGRADE_TIMEOUT")
            .await
            .map_err(|outcome| UpgradeError::PreUpgrade { outcome })?;
        match status.code() {
            Some(0) => {
                info!(upgrade = %name, height, "pre-upgrade done");
                return Ok(());
            }
            Some(1) => {
                info!(upgrade = %name, height, "pre-upgrade not implemented by the new binary (exit 1); continuing");
                return Ok(());
            }
            Some(30) => {
                return Err(UpgradeError::PreUpgrade {
                    outcome: "failed (exit 30)".into(),
                });
            }
            Some(31) if attempt <= config.preupgrade_max_retries => {
                warn!(upgrade = %name, height, "pre-upgrade asked for a retry (exit 31); attempt {} of {}", attempt + 1, config.preupgrade_max_retries + 1);
            }
            Some(31) => {
                return Err(UpgradeError::PreUpgrade {
                    outcome: format!(
                        "still asked for a retry (exit 31) after {} attempts (DAEMON_PREUPGRADE_MAX_RETRIES={})",
                        attempt, config.preupgrade_max_retries
                    ),
                });
            }
            _ => {
                return Err(UpgradeError::PreUpgrade {
                    outcome: format!("{}: only 0, 1, 30 and 31 have a meaning", describe(status)),
                });
            }
        }
    }
}
