//! `cvx run`: the Cosmovisor-compatible supervisor (DESIGN §5).
//!
//! A small state machine fed by events: the daemon exited, `upgrade-info.json` may have changed
//! (file event or poll tick), a signal arrived.
//!
//! Signal policy:
//! - TERM, INT, QUIT and HUP sent to cvx are forwarded, as the same signal, to the daemon's process
//!   group (the daemon runs in a group of its own, so a terminal's Ctrl-C reaches it only through
//!   cvx). cvx then waits for the daemon and exits with its code (128+N if signal N killed it).
//!   Further signals are forwarded too; no upgrade starts once a signal has arrived.
//! - A signal arriving while an upgrade runs (the daemon already stopped) does not cut a step in
//!   half: the step in progress completes, cvx does not relaunch, and exits 128+N.
//! - cvx stops the daemon for an upgrade with SIGTERM, waits DAEMON_SHUTDOWN_GRACE, then SIGKILL
//!   (SIGKILL at once without a grace), always to the whole group so nothing is left orphaned.

pub mod config;
pub mod logs;
pub mod metrics;
pub mod upgrade;
pub mod watch;

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use rustix::process::{Pid, Signal};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, info, warn};

use crate::tree::{self, Layout, PlanInfo, UpgradeInfo};
use config::{Config, ConfigError};
use upgrade::UpgradeError;
use watch::{Trigger, Watcher};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot start the daemon {}", path.display())]
    Launch {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("upgrade {name:?} at height {height} failed")]
    Upgrade {
        name: String,
        height: u64,
        #[source]
        source: UpgradeError,
    },
    #[error("cannot set up the supervisor")]
    Setup(#[source] std::io::Error),
}

/// Split off a first `--cosmovisor-config PATH` (or `=PATH`); everything else is the daemon's.
pub fn split_args(mut args: Vec<OsString>) -> (Option<PathBuf>, Vec<OsString>) {
    let Some(first) = args.first().and_then(|a| a.to_str()).map(str::to_string) else {
        return (None, args);
    };
    if first == "--cosmovisor-config" && args.len() >= 2 {
        let path = PathBuf::from(args.remove(1));
        args.remove(0);
        (Some(path), args)
    } else if let Some(path) = first.strip_prefix("--cosmovisor-config=") {
        args.remove(0);
        (Some(PathBuf::from(path)), args)
    } else {
        (None, args)
    }
}

/// Heights named by `--unsafe-skip-upgrades` in the daemon's args (space- or comma-separated).
pub fn skip_heights(args: &[OsString]) -> Vec<u64> {
    let mut heights = Vec::new();
    let mut iter = args.iter().filter_map(|a| a.to_str()).peekable();
    while let Some(arg) = iter.next() {
        let inline = arg.strip_prefix("--unsafe-skip-upgrades=");
        if arg != "--unsafe-skip-upgrades" && inline.is_none() {
            continue;
        }
        let mut values: Vec<&str> = inline.map(|v| v.split(',').collect()).unwrap_or_default();
        if inline.is_none() {
            while let Some(next) = iter.peek() {
                if next.split(',').all(|h| h.parse::<u64>().is_ok()) {
                    values.extend(next.split(','));
                    iter.next();
                } else {
                    break;
                }
            }
        }
        heights.extend(values.iter().filter_map(|h| h.parse::<u64>().ok()));
    }
    heights
}

/// Entry point: configuration, logs, then the supervisor on a single-threaded runtime (the
/// supervisor waits on events; one thread keeps its memory small).
pub fn main(args: Vec<OsString>) -> Result<u8, RunError> {
    let (config_file, args) = split_args(args);
    // Only `start` records facts and serves metrics; CVX_METRICS_ADDR is bound with the
    // configuration, so a port in use is reported with the other problems.
    let start = args.first().is_some_and(|a| a == "start");
    let (config, listener) =
        config::load_and_listen(std::env::vars(), config_file.as_deref(), start)?;
    logs::init(&config, false);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RunError::Setup)?;
    if start {
        metrics::start(&runtime, &config, listener).map_err(RunError::Setup)?;
    }
    runtime.block_on(supervise(&config, &args))
}

/// The daemon, in a process group of its own.
struct Daemon {
    child: tokio::process::Child,
    group: Pid,
}

impl Daemon {
    fn launch(config: &Config, layout: &Layout, args: &[OsString]) -> Result<Self, RunError> {
        let path = layout.current().join("bin").join(&config.name);
        let child = tokio::process::Command::new(&path)
            .args(args)
            .env("LD_LIBRARY_PATH", upgrade::library_path(layout, "current"))
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| RunError::Launch {
                path: path.clone(),
                source,
            })?;
        let pid = child
            .id()
            .and_then(|id| Pid::from_raw(id as i32))
            .ok_or_else(|| RunError::Launch {
                path,
                source: std::io::Error::other("the daemon exited before it could be watched"),
            })?;
        info!(
            pid = pid.as_raw_nonzero().get(),
            "started {}",
            layout.current().join("bin").join(&config.name).display()
        );
        metrics::handle().daemon_started();
        Ok(Daemon { child, group: pid })
    }

    fn signal(&self, sig: Signal) {
        if let Err(e) = rustix::process::kill_process_group(self.group, sig)
            && e != rustix::io::Errno::SRCH
        {
            warn!("cannot send {sig:?} to the daemon: {e}");
        }
    }

    async fn wait(&mut self) -> ExitStatus {
        let status = match self.child.wait().await {
            Ok(status) => status,
            Err(e) => {
                warn!("lost track of the daemon: {e}");
                ExitStatus::from_raw(1 << 8)
            }
        };
        metrics::handle().daemon_exited();
        status
    }

    /// SIGTERM, up to `grace`, then SIGKILL; without a grace, SIGKILL at once.
    async fn stop(&mut self, grace: Option<Duration>) -> ExitStatus {
        let status = match grace {
            Some(grace) => {
                self.signal(Signal::TERM);
                match tokio::time::timeout(grace, self.wait()).await {
                    Ok(status) => status,
                    Err(_) => {
                        warn!(
                            "the daemon did not exit within DAEMON_SHUTDOWN_GRACE {}; killing it",
                            crate::duration::show(grace)
                        );
                        self.signal(Signal::KILL);
                        self.wait().await
                    }
                }
            }
            None => {
                self.signal(Signal::KILL);
                self.wait().await
            }
        };
        // Whatever the daemon left in its group goes with it.
        self.signal(Signal::KILL);
        status
    }
}

/// The daemon's exit status as a process exit code.
fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(sig)) => 128u8.wrapping_add(sig as u8),
        _ => 1,
    }
}

/// The signals cvx forwards.
struct Signals {
    streams: Vec<(Signal, tokio::signal::unix::Signal)>,
}

impl Signals {
    fn new() -> Result<Self, RunError> {
        let kinds = [
            (Signal::TERM, SignalKind::terminate()),
            (Signal::INT, SignalKind::interrupt()),
            (Signal::QUIT, SignalKind::quit()),
            (Signal::HUP, SignalKind::hangup()),
        ];
        let streams = kinds
            .into_iter()
            .map(|(sig, kind)| signal(kind).map(|s| (sig, s)))
            .collect::<Result<_, _>>()
            .map_err(RunError::Setup)?;
        Ok(Signals { streams })
    }

    async fn recv(&mut self) -> Signal {
        let futures = self.streams.iter_mut().map(|(sig, stream)| {
            let sig = *sig;
            Box::pin(async move {
                stream.recv().await;
                sig
            })
        });
        futures_select_all(futures).await
    }
}

/// The first of several futures to finish.
async fn futures_select_all<F: std::future::Future<Output = Signal> + Unpin>(
    futures: impl Iterator<Item = F>,
) -> Signal {
    let mut futures: Vec<F> = futures.collect();
    std::future::poll_fn(move |cx| {
        for f in futures.iter_mut() {
            if let std::task::Poll::Ready(sig) = std::pin::Pin::new(f).poll(cx) {
                return std::task::Poll::Ready(sig);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// Why the daemon is no longer running.
enum Outcome {
    Exited(ExitStatus),
    Signalled(ExitStatus),
    Upgrade(PlanInfo),
}

/// Reads `upgrade-info.json` and applies the trigger rule and `--unsafe-skip-upgrades`.
struct Detector {
    watcher: Watcher,
    trigger: Trigger,
    skip: Vec<u64>,
    rpc: Option<String>,
    armed: Option<PlanInfo>,
    said_waiting: bool,
}

impl Detector {
    /// A plan that fires now, ignoring the node's height.
    fn fired(&mut self) -> Option<PlanInfo> {
        let UpgradeInfo::Valid(plan) = self.watcher.read() else {
            return None;
        };
        if !self.trigger.fires(&plan) {
            return None;
        }
        if self.skip.contains(&plan.height) {
            info!(upgrade = %plan.name, height = plan.height, "skipping the upgrade: its height is in --unsafe-skip-upgrades");
            return None;
        }
        info!(upgrade = %plan.name, height = plan.height, "upgrade detected in data/upgrade-info.json");
        Some(plan)
    }

    /// A fired plan, once the node's RPC (when it answers) says the plan's height is reached.
    async fn ready(&mut self) -> Option<PlanInfo> {
        if self.armed.is_none() {
            self.armed = self.fired();
        }
        let plan = self.armed.as_ref()?;
        if let Some(rpc) = &self.rpc {
            match watch::node_height(rpc).await {
                // The node halts in the plan's block: its last committed block is height - 1.
                Some(h) if h + 1 < plan.height => {
                    if self.said_waiting {
                        debug!(upgrade = %plan.name, height = plan.height, "the node's RPC still reports height {h}");
                    } else {
                        info!(upgrade = %plan.name, height = plan.height, "the node's RPC reports height {h}: waiting for it to reach the plan's height");
                        self.said_waiting = true;
                    }
                    return None;
                }
                Some(h) => debug!("the node's RPC reports height {h}"),
                None => {
                    debug!("the node's RPC at {rpc} does not answer; trusting upgrade-info.json")
                }
            }
        }
        self.said_waiting = false;
        self.armed.take()
    }

    /// After switching to `plan`, it is the current upgrade.
    fn switched(&mut self, plan: &PlanInfo) {
        self.trigger = Trigger::new(plan.name.clone());
        self.trigger.fires(plan);
        self.armed = None;
    }
}

async fn supervise(config: &Config, args: &[OsString]) -> Result<u8, RunError> {
    let layout = Layout::new(&config.home);
    // As Cosmovisor does: a tree with no `current` link yet (a fresh install) starts at genesis.
    if let Err(e) = std::fs::symlink_metadata(layout.current())
        && e.kind() == std::io::ErrorKind::NotFound
        && layout.root().join("genesis").is_dir()
    {
        info!(
            "{} does not exist: pointing it to genesis",
            layout.current().display()
        );
        crate::apply::install::point_current(&layout, "genesis").map_err(RunError::Setup)?;
    }
    let mut signals = Signals::new()?;
    let mut detector = Detector {
        watcher: Watcher::new(&layout.upgrade_info(), config.poll_interval),
        trigger: Trigger::new(upgrade::current_upgrade(&layout)),
        skip: skip_heights(args),
        rpc: watch::rpc_address(&config.home),
        armed: None,
        said_waiting: false,
    };

    // A restart after a missed switch: switch first when the binary is there, not crash-loop.
    if let Some(plan) = detector.fired() {
        let dir = tree::upgrade_dir(&plan.name, config.recase);
        match upgrade::staged_binary(config, &layout, &dir) {
            Err(e) if !config.allow_download => {
                warn!(upgrade = %plan.name, height = plan.height, "pending upgrade cannot be applied yet ({e}); starting the current binary, which will halt for it again: stage the binary (cvx apply) to continue");
                detector.trigger = Trigger::new(upgrade::current_upgrade(&layout));
            }
            _ => {
                info!(upgrade = %plan.name, height = plan.height, "upgrade pending at start: switching before launch");
                metrics::handle().upgrade_started(&plan.name, plan.height);
                if let Some(code) = run_upgrade(config, &layout, &plan, &mut signals).await? {
                    return Ok(code);
                }
                detector.switched(&plan);
            }
        }
    }

    loop {
        let mut daemon = Daemon::launch(config, &layout, args)?;
        let outcome = loop {
            tokio::select! {
                status = daemon.wait() => {
                    // Some nodes exit instead of halting once they have written the plan.
                    match detector.fired() {
                        Some(plan) => break Outcome::Upgrade(plan),
                        None => break Outcome::Exited(status),
                    }
                }
                sig = signals.recv() => {
                    info!("received {sig:?}: forwarding it to the daemon");
                    daemon.signal(sig);
                    let status = loop {
                        tokio::select! {
                            status = daemon.wait() => break status,
                            sig = signals.recv() => {
                                info!("received {sig:?}: forwarding it to the daemon");
                                daemon.signal(sig);
                            }
                        }
                    };
                    break Outcome::Signalled(status);
                }
                () = detector.watcher.changed() => {
                    if let Some(plan) = detector.ready().await {
                        break Outcome::Upgrade(plan);
                    }
                }
            }
        };
        match outcome {
            Outcome::Exited(status) => {
                info!("the daemon exited by itself ({status}); cvx exits with its code");
                return Ok(exit_code(status));
            }
            Outcome::Signalled(status) => {
                info!("the daemon exited ({status}) after the forwarded signal");
                return Ok(exit_code(status));
            }
            Outcome::Upgrade(plan) => {
                info!(upgrade = %plan.name, height = plan.height, "stopping the daemon");
                metrics::handle().upgrade_started(&plan.name, plan.height);
                let status = daemon.stop(config.shutdown_grace).await;
                info!(upgrade = %plan.name, height = plan.height, "the daemon stopped ({status})");
                if let Some(code) = run_upgrade(config, &layout, &plan, &mut signals).await? {
                    return Ok(code);
                }
                detector.switched(&plan);
                if !config.restart_after_upgrade {
                    info!(upgrade = %plan.name, height = plan.height, "upgrade done; DAEMON_RESTART_AFTER_UPGRADE is false, so cvx exits instead of restarting the daemon");
                    return Ok(0);
                }
                info!(upgrade = %plan.name, height = plan.height, "upgrade done; restarting the daemon");
            }
        }
    }
}

/// Perform the upgrade without letting a signal cut a step in half. Some(code) means exit now.
async fn run_upgrade(
    config: &Config,
    layout: &Layout,
    plan: &PlanInfo,
    signals: &mut Signals,
) -> Result<Option<u8>, RunError> {
    let work = upgrade::perform(config, layout, plan);
    tokio::pin!(work);
    let mut interrupted = None;
    let result = loop {
        tokio::select! {
            result = &mut work => break result,
            sig = signals.recv() => {
                warn!(upgrade = %plan.name, height = plan.height, "received {sig:?} during the upgrade: finishing the step in progress, then exiting");
                interrupted = Some(sig);
            }
        }
    };
    metrics::handle().upgrade_finished(&result);
    result.map_err(|source| RunError::Upgrade {
        name: plan.name.clone(),
        height: plan.height,
        source,
    })?;
    Ok(interrupted.map(|sig| 128u8.wrapping_add(sig.as_raw() as u8)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn config_pair_is_split_off() {
        let (file, rest) = split_args(os(&[
            "--cosmovisor-config",
            "/c.toml",
            "start",
            "--home",
            "/h",
        ]));
        assert_eq!(file, Some(PathBuf::from("/c.toml")));
        assert_eq!(rest, os(&["start", "--home", "/h"]));
        let (file, rest) = split_args(os(&["start", "--cosmovisor-config", "/c.toml"]));
        assert_eq!(file, None);
        assert_eq!(rest.len(), 3);
    }

    #[test]
    fn skip_heights_in_both_forms() {
        assert_eq!(
            skip_heights(&os(&[
                "start",
                "--unsafe-skip-upgrades",
                "10",
                "20",
                "--home",
                "/h"
            ])),
            vec![10, 20]
        );
        assert_eq!(
            skip_heights(&os(&["start", "--unsafe-skip-upgrades=5,6"])),
            vec![5, 6]
        );
        assert!(skip_heights(&os(&["start"])).is_empty());
    }
}
