//! The steps between the old daemon's exit and the new one's launch (DESIGN §5, 4-6): restart
//! delay, backup, custom pre-upgrade script, the binary (staged and verified, or downloaded and
//! verified), the switch of `current`, and `<new> pre-upgrade`.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{info, warn};

use super::config::Config;
use crate::apply::{self, fetch, install};
use crate::render::error_chain;
use crate::tree::{self, Layout, PlanInfo};

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("backup of {} refused: it needs {need} bytes and {} has {free} free", data.display(), dir.display())]
    NoRoom {
        data: PathBuf,
        dir: PathBuf,
        need: u64,
        free: u64,
    },
    #[error("cannot back up {} to {}", from.display(), to.display())]
    Backup {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("custom pre-upgrade script {} {outcome}", script.display())]
    CustomScript { script: PathBuf, outcome: String },
    #[error("no binary for upgrade {name:?} at {}{why}", path.display())]
    Missing {
        name: String,
        path: PathBuf,
        why: String,
    },
    #[error("{} changed since cvx staged it (sha256 {actual}, receipt says {expected}); refusing to run unverified bytes", path.display())]
    Tampered {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("cannot download the binary for upgrade {name:?}: {reason}")]
    Download { name: String, reason: String },
    #[error("cannot switch current to {dir}")]
    Switch {
        dir: String,
        #[source]
        source: io::Error,
    },
    #[error("pre-upgrade of the new binary {outcome}")]
    PreUpgrade { outcome: String },
    #[error("cannot {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> UpgradeError + use<> {
    let path = path.to_path_buf();
    move |source| UpgradeError::Io {
        action,
        path,
        source,
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

/// Everything between stop and relaunch, in DESIGN's order.
pub async fn perform(
    config: &Config,
    layout: &Layout,
    plan: &PlanInfo,
) -> Result<(), UpgradeError> {
    let dir = tree::upgrade_dir(&plan.name, config.recase);
    let (name, height) = (plan.name.as_str(), plan.height);
    if let Some(delay) = config.restart_delay {
        info!(upgrade = %name, height, "waiting DAEMON_RESTART_DELAY {}", crate::duration::show(delay));
        tokio::time::sleep(delay).await;
    }
    if config.skip_backup {
        info!(upgrade = %name, height, "backup skipped (UNSAFE_SKIP_BACKUP)");
    } else {
        let home = config.home.clone();
        let backup_dir = config.backup_dir.clone();
        let to = tokio::task::spawn_blocking(move || backup(&home, &backup_dir))
            .await
            .expect("backup does not panic")?;
        info!(upgrade = %name, height, "backed up data to {}", to.display());
    }
    if let Some(script) = &config.custom_preupgrade {
        run_custom_script(config, script, plan).await?;
    }
    ensure_binary(config, layout, plan, &dir).await?;
    install::point_current(layout, &dir).map_err(|source| UpgradeError::Switch {
        dir: dir.clone(),
        source,
    })?;
    write_plan(layout, &dir, plan)?;
    info!(upgrade = %name, height, "switched current to {dir}");
    pre_upgrade(config, layout, plan, &dir).await
}

/// Copy `home/data` to `backup_dir/data-backup-<date>`, refusing early when the room is short.
fn backup(home: &Path, backup_dir: &Path) -> Result<PathBuf, UpgradeError> {
    super::metrics::handle().backup_started();
    let data = home.join("data");
    let need = tree_size(&data).map_err(io_err("measure", &data))?;
    fs::create_dir_all(backup_dir).map_err(io_err("create", backup_dir))?;
    let stat = rustix::fs::statvfs(backup_dir)
        .map_err(|e| io_err("measure free space of", backup_dir)(e.into()))?;
    let free = stat.f_bavail.saturating_mul(stat.f_frsize);
    if need > free {
        return Err(UpgradeError::NoRoom {
            data,
            dir: backup_dir.to_path_buf(),
            need,
            free,
        });
    }
    let date = crate::time::format_go("2006-1-2", std::time::SystemTime::now());
    let mut to = backup_dir.join(format!("data-backup-{date}"));
    if to.exists() {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        to = backup_dir.join(format!("data-backup-{date}-{stamp}"));
    }
    copy_tree(&data, &to).map_err(|source| UpgradeError::Backup {
        from: data.clone(),
        to: to.clone(),
        source,
    })?;
    super::metrics::handle().backup_finished(need);
    Ok(to)
}

fn tree_size(path: &Path) -> io::Result<u64> {
    let meta = fs::symlink_metadata(path)?;
    if !meta.is_dir() {
        return Ok(meta.len());
    }
    let mut total = 0;
    for entry in fs::read_dir(path)? {
        total += tree_size(&entry?.path())?;
    }
    Ok(total)
}

fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(from)?;
    if meta.is_dir() {
        fs::create_dir_all(to)?;
        for entry in fs::read_dir(from)? {
            let entry = entry?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
        fs::set_permissions(to, meta.permissions())
    } else if meta.file_type().is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(from)?, to)
    } else {
        fs::copy(from, to).map(drop)
    }
}

async fn run_custom_script(
    config: &Config,
    script: &Path,
    plan: &PlanInfo,
) -> Result<(), UpgradeError> {
    info!(upgrade = %plan.name, height = plan.height, "running COSMOVISOR_CUSTOM_PREUPGRADE {}", script.display());
    let status = tokio::process::Command::new(script)
        .arg(&plan.name)
        .arg(plan.height.to_string())
        .current_dir(&config.home)
        .status()
        .await;
    match status {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(UpgradeError::CustomScript {
            script: script.to_path_buf(),
            outcome: describe(s),
        }),
        Err(e) => Err(UpgradeError::CustomScript {
            script: script.to_path_buf(),
            outcome: format!("could not be run: {e}"),
        }),
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

/// Whether the staged binary of `dir` is there and matches its receipt (when it has one).
pub fn staged_binary(config: &Config, layout: &Layout, dir: &str) -> Result<PathBuf, UpgradeError> {
    let rel = format!("{dir}/bin/{}", config.name);
    let path = layout.root().join(&rel);
    if !path.is_file() {
        return Err(UpgradeError::Missing {
            name: dir.trim_start_matches("upgrades/").to_string(),
            path,
            why: String::new(),
        });
    }
    if let Some(receipt) = crate::receipt::read(&layout.receipts(), &rel) {
        // Unchanged since apply verified it (same identity, as plan decides): no re-read of a
        // 100 MiB binary while the chain waits. Anything else is hashed before it may run.
        let meta = std::fs::metadata(&path).map_err(io_err("inspect", &path))?;
        if tree::receipt_holds(&layout.receipts(), &rel, &receipt, &meta) {
            return Ok(path);
        }
        let (actual, _) = crate::hash::sha256_file(&path).map_err(io_err("read", &path))?;
        if actual != receipt.sha256 {
            return Err(UpgradeError::Tampered {
                path,
                expected: receipt.sha256,
                actual,
            });
        }
    } else {
        warn!(
            "{} has no cvx receipt: staged by another tool, not verified by cvx",
            path.display()
        );
    }
    Ok(path)
}

/// The binary for `plan`: staged and verified, or downloaded and verified when allowed.
async fn ensure_binary(
    config: &Config,
    layout: &Layout,
    plan: &PlanInfo,
    dir: &str,
) -> Result<(), UpgradeError> {
    let missing = match staged_binary(config, layout, dir) {
        Ok(path) => {
            info!(upgrade = %plan.name, height = plan.height, "binary {} is staged", path.display());
            return Ok(());
        }
        Err(e @ UpgradeError::Missing { .. }) => e,
        Err(e) => return Err(e),
    };
    if !config.allow_download {
        return Err(match missing {
            UpgradeError::Missing { name, path, .. } => UpgradeError::Missing {
                name,
                path,
                why: "; stage it with `cvx apply`, or allow downloads with DAEMON_ALLOW_DOWNLOAD_BINARIES=true".into(),
            },
            other => other,
        });
    }
    let download_err = |reason: String| UpgradeError::Download {
        name: plan.name.clone(),
        reason,
    };
    let (url, sha256, member) = download_source(config, plan).await.map_err(download_err)?;
    info!(upgrade = %plan.name, height = plan.height, "downloading {url}");
    let options = fetch::FetchOptions::default();
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
    let (layout, daemon, file) = (layout.clone(), config.name.clone(), fetched.path.clone());
    let result = tokio::task::spawn_blocking(move || {
        let staging = apply::Staging {
            url: &url,
            sha256: &sha256,
            member: member.as_deref(),
            daemon: &daemon,
            destination: &destination,
            mode: install::BINARY_MODE,
        };
        let result = apply::stage(&layout, &file, &staging, true);
        let _ = fs::remove_file(&file);
        result
    })
    .await
    .expect("staging does not panic");
    result.map(drop).map_err(download_err)
}

/// Where to download `plan`'s binary from, and its sha256: the manifest's pin when a manifest
/// is known and names the upgrade, else the plan's `info` with its `?checksum=sha256:...`.
async fn download_source(
    config: &Config,
    plan: &PlanInfo,
) -> Result<(String, String, Option<String>), String> {
    let platform = crate::cli::host_platform();
    if let Some(path) = &config.manifest {
        let loaded =
            crate::manifest::load(path).map_err(|e| format!("manifest {}: {e}", path.display()))?;
        let pinned = loaded
            .manifest
            .upgrades
            .iter()
            .find(|u| {
                tree::upgrade_dir(&u.name, config.recase)
                    == tree::upgrade_dir(&plan.name, config.recase)
            })
            .and_then(|u| u.binary.get(&platform));
        if let Some(artifact) = pinned {
            return Ok((
                artifact.url.clone(),
                artifact.sha256.clone(),
                artifact.path.clone(),
            ));
        }
    }
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
        let client = fetch::client(&fetch::FetchOptions::default()).map_err(|e| error_chain(&e))?;
        let response = client
            .get(info)
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| {
                format!(
                    "cannot fetch the plan's info from {info}: {}",
                    error_chain(&e)
                )
            })?;
        response
            .bytes()
            .await
            .map_err(|e| format!("cannot read the plan's info from {info}: {e}"))?
            .to_vec()
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

/// The name of the upgrade `current` points to ("" for genesis or no link).
pub fn current_upgrade(layout: &Layout) -> String {
    let Ok(bytes) = fs::read(layout.current().join("upgrade-info.json")) else {
        return String::new();
    };
    match tree::parse_upgrade_info(&bytes) {
        tree::UpgradeInfo::Valid(plan) => plan.name,
        _ => String::new(),
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
        let status = tokio::process::Command::new(&binary)
            .arg("pre-upgrade")
            .env("LD_LIBRARY_PATH", library_path(layout, dir))
            .current_dir(&config.home)
            .status()
            .await
            .map_err(|e| UpgradeError::PreUpgrade {
                outcome: format!("could not be run ({}): {e}", binary.display()),
            })?;
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
