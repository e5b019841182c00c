//! `cvx run`: the Cosmovisor-compatible supervisor (DESIGN §5).
//!
//! Only `cvx run start ...` supervises and may change the tree; any other command (`version`,
//! `keys add`, ...) has its binary verified and is then executed in cvx's place, so it owns the
//! terminal and its signals as if run directly. The supervisor is a small state machine fed by
//! events: the daemon exited, `upgrade-info.json` may have changed (file event or poll tick), a
//! signal arrived. The signal policy is in [`child`]; the upgrade steps in [`upgrade`].
//!
//! Owns the supervisor and its [`record`]. Downloads, unpacks and installs through apply's
//! fetch, unpack and install rather than its own; must not import the command line.

pub mod backup;
pub mod binary;
pub mod child;
pub mod config;
pub mod history;
pub mod logs;
pub mod metrics;
pub mod preflight;
pub mod record;
pub mod rollback;
pub mod upgrade;
pub mod watch;

use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::PathBuf;

use tracing::{debug, info, warn};

use crate::manifest::Trigger as Kind;
use crate::tree::{self, Layout, PlanInfo, UpgradeInfo};
use binary::{BinaryError, Pins};
use child::{Daemon, Signals};
use config::{Config, ConfigError};
use upgrade::UpgradeError;
use watch::{Trigger, Watcher};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("refusing to start the daemon")]
    Binary(#[from] BinaryError),
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
        source: Box<UpgradeError>,
    },
    #[error("cannot point current to genesis")]
    Genesis(#[source] UpgradeError),
    #[error("cvx run (pid {pid}) already supervises {}; one supervisor per home", home.display())]
    AlreadySupervised { pid: u32, home: PathBuf },
    #[error(transparent)]
    SupervisorLock(backup::BackupError),
    #[error("upgrade {name:?} is scheduled at height {height} (trigger = \"halt-height\"), and cvx can tell that the node halted there only from its RPC, but {} names none ([rpc] laddr)", config.display())]
    ScheduledWithoutRpc {
        name: String,
        height: u64,
        config: PathBuf,
    },
    #[error("the supervisor could not do its job:\n{}", problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Unworkable { problems: Vec<String> },
    #[error("cannot set up the supervisor")]
    Setup(#[source] std::io::Error),
}

/// Held by `cvx run start` for its whole life (and by `cvx rollback` while it works): one
/// supervisor per home. The kernel releases it when the process dies, however it dies.
pub struct SupervisorLock {
    _file: std::fs::File,
}

/// Why the supervisor lock could not be taken.
pub enum Holder {
    /// Another process holds it.
    Pid(u32),
    Io(backup::BackupError),
}

impl SupervisorLock {
    pub fn take(layout: &Layout) -> Result<SupervisorLock, Holder> {
        use std::io::{Read, Seek, Write};
        let path = layout.cvx().join("supervisor.lock");
        let io = |action: &'static str, path: &std::path::Path| {
            let error = crate::errors::io_err(action, path);
            move |source| Holder::Io(error(source).into())
        };
        std::fs::create_dir_all(layout.cvx()).map_err(io("create", &layout.cvx()))?;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io("open", &path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(Holder::Pid(text.trim().parse().unwrap_or(0)));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io("lock", &path)(e)),
        }
        file.set_len(0).map_err(io("write", &path))?;
        file.rewind().map_err(io("write", &path))?;
        write!(file, "{}", std::process::id()).map_err(io("write", &path))?;
        Ok(SupervisorLock { _file: file })
    }
}

impl RunError {
    /// The obvious fix, when there is one.
    pub fn hint(&self) -> Option<String> {
        match self {
            RunError::Config(_) => {
                Some("`cvx help run` lists every variable, its default and meaning".into())
            }
            RunError::Binary(e) => e.hint(),
            RunError::Unworkable { .. } => Some("cvx run must be able to write $DAEMON_HOME/cosmovisor and read its .cvx/: run it as the user that owns the home".into()),
            RunError::ScheduledWithoutRpc { .. } => Some(
                "enable the node's RPC on loopback (e.g. laddr = \"tcp://127.0.0.1:26657\")".into(),
            ),
            RunError::Upgrade { source, .. } => match &**source {
                UpgradeError::Binary(e) => e.hint(),
                _ => None,
            },
            _ => None,
        }
    }
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

/// Entry point: configuration, logs, then either the command in cvx's place or, for `start`, the
/// supervisor on a single-threaded runtime (it waits on events; one thread keeps its memory small).
pub fn main(args: Vec<OsString>) -> Result<u8, RunError> {
    let (config_file, args) = split_args(args);
    // Only `start` records facts and serves metrics; CVX_METRICS_ADDR is bound with the
    // configuration, so a port in use is reported with the other problems.
    let start = args.first().is_some_and(|a| a == "start");
    let (config, listener) =
        config::load_and_listen(std::env::vars(), config_file.as_deref(), start)?;
    logs::init(&config, false);
    let layout = Layout::new(&config.home);
    if !start {
        return Err(exec(&config, &layout, &args));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RunError::Setup)?;
    metrics::start(&runtime, &config, listener).map_err(RunError::Setup)?;
    runtime.block_on(supervise(&config, &layout, &args))
}

/// Verify `current`'s binary against its receipt and the manifest's pin.
fn verified_current(config: &Config, layout: &Layout) -> Result<PathBuf, RunError> {
    let pins = Pins::load(config.manifest.as_deref(), config.recase)?;
    let stage = tree::current_stage(layout);
    Ok(binary::verify(layout, &config.name, &stage, pins.as_ref())?)
}

/// Any command but `start`: verified, then executed in cvx's place. Changes nothing in the tree.
/// Returns only when it could not be executed.
fn exec(config: &Config, layout: &Layout, args: &[OsString]) -> RunError {
    use std::os::unix::process::CommandExt;
    let path = match verified_current(config, layout) {
        Ok(path) => path,
        Err(e) => return e,
    };
    debug!("executing {} in cvx's place", path.display());
    let source = std::process::Command::new(&path)
        .args(args)
        .env("LD_LIBRARY_PATH", upgrade::library_path(layout, "current"))
        .exec();
    RunError::Launch { path, source }
}

/// The preflight warnings in force, said at start and again at each check while they last.
#[derive(Default)]
struct Preflight {
    warnings: Vec<preflight::Warning>,
}

impl Preflight {
    fn check(&mut self, config: &Config, layout: &Layout) {
        let now = preflight::warnings(config, layout);
        for w in &now {
            warn!("preflight: {}", w.message);
        }
        for gone in self
            .warnings
            .iter()
            .filter(|w| !now.iter().any(|n| n.check == w.check))
        {
            info!("preflight: resolved: {}", gone.message);
        }
        metrics::handle().preflight(&now);
        self.warnings = now;
    }
}

/// How long a daemon may take to exit after cvx forwarded a stop signal, when
/// DAEMON_SHUTDOWN_GRACE is unset: well inside systemd's default stop timeout (90 s), so cvx, not
/// systemd, does the killing and says so.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

/// Why the daemon is no longer running.
enum Outcome {
    Exited(std::process::ExitStatus),
    Signalled(std::process::ExitStatus),
    Upgrade(PlanInfo, Kind),
}

/// Reads `upgrade-info.json` and applies the trigger rule and `--unsafe-skip-upgrades`.
struct Detector {
    watcher: Watcher,
    trigger: Trigger,
    skip: Vec<u64>,
    rpc: Option<String>,
    /// A plan that fired while the node's RPC said its height was not reached yet.
    armed: Option<PlanInfo>,
    said_waiting: bool,
    /// The manifest's next scheduled upgrade (`trigger = "halt-height"`) for the running daemon.
    scheduled: Option<Halt>,
    /// The manifest's chain id: an RPC reporting another one is not trusted.
    chain_id: Option<String>,
    /// The last foreign chain id reported, so it is said once.
    foreign: Option<String>,
    /// The last height the node's RPC reported, and when.
    polled: Option<(std::time::Instant, u64)>,
}

/// Blocks before a known upgrade height at which its backup begins (DESIGN §5.2): time enough to
/// link a large node's tables (seconds) at the fastest chains' block times.
const AHEAD_BLOCKS: u64 = 10;

/// The backup of the manifest's next upgrade, begun ahead while the node runs, once its RPC says
/// the upgrade's height is near.
struct Prepared {
    /// The plan to prepare for: the next upgrade, when the manifest gives its height, backups are
    /// on, none was taken for it yet and the node's RPC can tell how near it is.
    plan: Option<PlanInfo>,
    ahead: Option<backup::Ahead>,
    begun: bool,
}

impl Prepared {
    fn for_next(config: &Config, layout: &Layout, has_rpc: bool) -> Prepared {
        let plan = Pins::load(config.manifest.as_deref(), config.recase)
            .ok()
            .flatten()
            .and_then(|pins| pins.next_plan_after(&tree::current_stage(layout)))
            .filter(|plan| {
                has_rpc
                    && !config.skip_backup
                    && backup::taken(layout, plan, config.recase).is_none()
            });
        Prepared {
            plan,
            ahead: None,
            begun: false,
        }
    }

    /// Begin the backup once the node is AHEAD_BLOCKS from the plan's height; release it when the
    /// node goes well past the height without halting (a cancelled plan, a wrong height).
    async fn check(&mut self, config: &Config, detector: &mut Detector) {
        let Some(plan) = &self.plan else {
            return;
        };
        if detector.skip.contains(&plan.height) {
            // --unsafe-skip-upgrades: the node will not halt there.
            self.plan = None;
            return;
        }
        let height = match detector.recent_height() {
            Some(height) => height,
            None => match detector.node_height().await {
                Some(height) => height,
                None => return,
            },
        };
        if height > plan.height + AHEAD_BLOCKS {
            if let Some(ahead) = self.ahead.take() {
                info!(upgrade = %plan.name, height = plan.height, "the node is at height {height}, past the upgrade's without halting: removing the backup begun ahead");
                // Unlinking a large node's tables takes seconds: not on the supervisor's thread.
                tokio::task::spawn_blocking(move || drop(ahead));
            }
            self.plan = None;
        } else if !self.begun && height + AHEAD_BLOCKS >= plan.height {
            self.begun = true;
            info!(upgrade = %plan.name, height = plan.height, "the node is at height {height}: beginning the backup ahead, while it runs");
            self.ahead =
                backup::Ahead::start(&config.home, &config.backup_dir, plan, config.recase);
        }
    }
}

/// Watching for the node to halt at a scheduled upgrade's height (DESIGN §5.1).
struct Halt {
    plan: PlanInfo,
    /// The highest height the node's RPC reported, and how many checks in a row reported it.
    seen: Option<u64>,
    unchanged: u32,
}

/// Checks in a row at the same height (at or past the halt height) that mean the node stopped
/// making blocks: the SDK 0.50 way of halting, process up and RPC alive.
const STALLED_CHECKS: u32 = 3;

impl Halt {
    /// Record the node's height; true once the node is known halted at or past the height.
    fn observe(&mut self, height: u64) -> bool {
        if self.seen == Some(height) {
            self.unchanged += 1;
        } else {
            self.unchanged = 1;
            if height + 1 >= self.plan.height && self.seen.is_none_or(|s| s + 1 < self.plan.height)
            {
                info!(upgrade = %self.plan.name, height = self.plan.height, "the node reached height {height}: the scheduled halt is next");
            }
        }
        self.seen = Some(self.seen.map_or(height, |s| s.max(height)));
        height >= self.plan.height && self.unchanged >= STALLED_CHECKS
    }

    /// Whether a daemon that exited by itself halted for this upgrade (SDK <= 0.47: it commits
    /// the height and exits), judged by the last height its RPC reported. Never early.
    fn exited_at_height(&self) -> bool {
        self.seen.is_some_and(|h| h + 1 >= self.plan.height)
    }
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

    /// The height the node's RPC reported just now (within a check), if it was asked.
    fn recent_height(&self) -> Option<u64> {
        self.polled
            .filter(|(at, _)| at.elapsed() < std::time::Duration::from_millis(50))
            .map(|(_, height)| height)
    }

    /// The node's height from its RPC, when it answers and is the manifest's chain.
    async fn node_height(&mut self) -> Option<u64> {
        let rpc = self.rpc.as_deref()?;
        let status = watch::node_status(rpc).await?;
        match &self.chain_id {
            Some(id) if *id != status.network => {
                if self.foreign.as_ref() != Some(&status.network) {
                    warn!(
                        "the node's RPC at {rpc} reports chain id {:?}, not the manifest's {id:?}: cvx does not trust its heights (check [rpc] laddr in config/config.toml)",
                        status.network
                    );
                    self.foreign = Some(status.network);
                }
                None
            }
            _ => {
                self.foreign = None;
                self.polled = Some((std::time::Instant::now(), status.height));
                Some(status.height)
            }
        }
    }

    /// A fired plan, once the node's RPC (when it answers) says the plan's height is reached.
    async fn ready(&mut self) -> Option<PlanInfo> {
        if self.armed.is_none() {
            self.armed = self.fired();
        }
        let plan = self.armed.clone()?;
        if let Some(rpc) = self.rpc.clone() {
            match self.node_height().await {
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

    /// The plan to perform now that the daemon has exited by itself: one armed earlier (the RPC
    /// gate was still closed), one it wrote just before exiting, or the scheduled upgrade whose
    /// height it had reached.
    fn exited(&mut self) -> Option<(PlanInfo, Kind)> {
        if let Some(plan) = self.armed.take().or_else(|| self.fired()) {
            return Some((plan, Kind::Governance));
        }
        let halt = self.scheduled.as_ref()?;
        if !halt.exited_at_height() {
            return None;
        }
        info!(upgrade = %halt.plan.name, height = halt.plan.height, "the daemon exited at its halt height (its RPC last reported {}): the scheduled upgrade is due", halt.seen.unwrap_or_default());
        Some((halt.plan.clone(), Kind::HaltHeight))
    }

    /// The scheduled upgrade, once the node's RPC shows it halted at its height.
    async fn halted(&mut self) -> Option<PlanInfo> {
        self.scheduled.as_ref()?;
        let height = self.node_height().await?;
        let halt = self.scheduled.as_mut()?;
        debug!(upgrade = %halt.plan.name, height = halt.plan.height, "scheduled upgrade: the node's RPC reports height {height}");
        if halt.observe(height) {
            info!(upgrade = %halt.plan.name, height = halt.plan.height, "the node halted at height {height}: performing the scheduled upgrade");
            return Some(halt.plan.clone());
        }
        None
    }

    /// After switching to `plan`, it is the current upgrade.
    fn switched(&mut self, plan: &PlanInfo) {
        self.trigger = Trigger::new(Some(plan));
        self.trigger.fires(plan);
        self.armed = None;
        self.scheduled = None;
    }
}

async fn supervise(config: &Config, layout: &Layout, args: &[OsString]) -> Result<u8, RunError> {
    // On a terminal the daemon keeps it (see `child`); under systemd it gets a group of its own.
    let terminal = std::io::stdin().is_terminal();
    // A manifest that cannot be read cannot verify anything: say so now, not at the height.
    let chain_id = Pins::load(config.manifest.as_deref(), config.recase)?
        .map(|pins| pins.chain_id().to_string());
    let problems = preflight::unworkable(layout);
    if !problems.is_empty() {
        return Err(RunError::Unworkable { problems });
    }
    let _supervisor = SupervisorLock::take(layout).map_err(|holder| match holder {
        Holder::Pid(pid) => RunError::AlreadySupervised {
            pid,
            home: config.home.clone(),
        },
        Holder::Io(e) => RunError::SupervisorLock(e),
    })?;
    // As Cosmovisor does: a tree with no `current` link yet (a fresh install) starts at genesis.
    if let Err(e) = std::fs::symlink_metadata(layout.current())
        && e.kind() == std::io::ErrorKind::NotFound
        && layout.root().join(tree::GENESIS).is_dir()
    {
        let _lock = upgrade::lock(layout).await.map_err(RunError::Genesis)?;
        info!(
            "{} does not exist: pointing it to genesis",
            layout.current().display()
        );
        crate::apply::install::point_current(layout, tree::GENESIS).map_err(|source| {
            RunError::Genesis(UpgradeError::Switch {
                dir: tree::GENESIS.into(),
                source,
            })
        })?;
    }
    let mut preflight = Preflight::default();
    preflight.check(config, layout);
    let mut signals = Signals::new().map_err(RunError::Setup)?;
    let mut detector = Detector {
        watcher: Watcher::new(&layout.upgrade_info(), config.poll_interval),
        trigger: Trigger::new(upgrade::current_upgrade(layout).as_ref()),
        skip: skip_heights(args),
        rpc: watch::rpc_address(&config.home),
        armed: None,
        said_waiting: false,
        scheduled: None,
        chain_id,
        foreign: None,
        polled: None,
    };
    let operator_halt = halt_height(args);

    // A restart after a missed switch: switch first, never start a binary that would halt again.
    // Performed, waiting for the new binary's start to complete its history entry.
    let mut upgraded = None;
    if let Some(plan) = detector.fired() {
        info!(upgrade = %plan.name, height = plan.height, "upgrade pending at start: switching before launch");
        metrics::handle().upgrade_started(&plan.name, plan.height);
        let done = Detected::now(config, &plan, Kind::Governance)
            .perform(config, layout, &mut signals, None)
            .await?;
        if let Some(code) = done.exit {
            done.finish(config, layout, false).await;
            return Ok(code);
        }
        detector.switched(&plan);
        upgraded = Some(done);
    }

    loop {
        let path = verified_current(config, layout)?;
        let mut args = args.to_vec();
        detector.scheduled = scheduled(config, layout, detector.rpc.is_some())?.map(|plan| {
            match operator_halt {
                Some(h) => info!(upgrade = %plan.name, height = plan.height, "scheduled upgrade next; the daemon's own --halt-height {h} stays"),
                None => {
                    info!(upgrade = %plan.name, height = plan.height, "scheduled upgrade next: starting the daemon with --halt-height {}", plan.height);
                    args.extend(["--halt-height".into(), plan.height.to_string().into()]);
                }
            }
            Halt {
                plan,
                seen: None,
                unchanged: 0,
            }
        });
        let mut daemon = Daemon::launch(
            &path,
            &args,
            upgrade::library_path(layout, "current"),
            terminal,
        )
        .map_err(|source| RunError::Launch { path, source })?;
        if let Some(done) = upgraded.take() {
            done.finish(config, layout, true).await;
        }
        let mut prepared = Prepared::for_next(config, layout, detector.rpc.is_some());
        let mut recheck = tokio::time::interval_at(
            tokio::time::Instant::now() + config.preflight_interval,
            config.preflight_interval,
        );
        let outcome = loop {
            tokio::select! {
                _ = recheck.tick() => preflight.check(config, layout),
                status = daemon.wait() => {
                    // Some nodes exit instead of halting once they have written the plan.
                    match detector.exited() {
                        Some((plan, kind)) => break Outcome::Upgrade(plan, kind),
                        None => break Outcome::Exited(status),
                    }
                }
                sig = signals.recv() => {
                    info!("received {sig:?}: forwarding it to the daemon");
                    daemon.signal(sig);
                    // A daemon that ignores the signal is killed once its grace has passed.
                    let grace = config.shutdown_grace.unwrap_or(STOP_GRACE);
                    let deadline = tokio::time::sleep(grace);
                    tokio::pin!(deadline);
                    let status = loop {
                        tokio::select! {
                            status = daemon.wait() => break status,
                            sig = signals.recv() => {
                                info!("received {sig:?}: forwarding it to the daemon");
                                daemon.signal(sig);
                            }
                            () = &mut deadline => {
                                warn!("the daemon did not exit within {} of the signal (DAEMON_SHUTDOWN_GRACE, default {}); killing it", crate::duration::show(grace), crate::duration::show(STOP_GRACE));
                                break daemon.stop(None).await;
                            }
                        }
                    };
                    break Outcome::Signalled(status);
                }
                () = detector.watcher.changed() => {
                    if let Some(plan) = detector.ready().await {
                        break Outcome::Upgrade(plan, Kind::Governance);
                    }
                    if let Some(plan) = detector.halted().await {
                        break Outcome::Upgrade(plan, Kind::HaltHeight);
                    }
                    prepared.check(config, &mut detector).await;
                }
            }
        };
        match outcome {
            Outcome::Exited(status) => {
                info!("the daemon exited by itself ({status}); cvx exits with its code");
                return Ok(child::exit_code(status));
            }
            Outcome::Signalled(status) => {
                info!("the daemon exited ({status}) after the forwarded signal");
                return Ok(child::exit_code(status));
            }
            Outcome::Upgrade(plan, kind) => {
                let detected = Detected::now(config, &plan, kind);
                info!(upgrade = %plan.name, height = plan.height, "stopping the daemon");
                metrics::handle().upgrade_started(&plan.name, plan.height);
                let status = daemon.stop(config.shutdown_grace).await;
                info!(upgrade = %plan.name, height = plan.height, "the daemon stopped ({status})");
                let done = detected
                    .perform(config, layout, &mut signals, prepared.ahead.take())
                    .await?;
                if let Some(code) = done.exit {
                    done.finish(config, layout, false).await;
                    return Ok(code);
                }
                detector.switched(&plan);
                if !config.restart_after_upgrade {
                    info!(upgrade = %plan.name, height = plan.height, "upgrade done; DAEMON_RESTART_AFTER_UPGRADE is false, so cvx exits instead of restarting the daemon");
                    done.finish(config, layout, false).await;
                    return Ok(0);
                }
                info!(upgrade = %plan.name, height = plan.height, "upgrade done; restarting the daemon");
                upgraded = Some(done);
            }
        }
    }
}

/// `--halt-height H` / `--halt-height=H` in the daemon's args: the operator's own halt wins.
fn halt_height(args: &[OsString]) -> Option<u64> {
    let mut iter = args.iter().filter_map(|a| a.to_str());
    let mut found = None;
    while let Some(arg) = iter.next() {
        if arg == "--halt-height" {
            found = iter.next().and_then(|h| h.parse().ok());
        } else if let Some(h) = arg.strip_prefix("--halt-height=") {
            found = h.parse().ok();
        }
    }
    found.filter(|h| *h > 0)
}

/// The manifest's next scheduled upgrade after `current`, when `CVX_MANIFEST` names a manifest.
/// cvx learns that the node halted from its RPC, so one without an RPC is refused now rather
/// than missed at the height.
fn scheduled(
    config: &Config,
    layout: &Layout,
    has_rpc: bool,
) -> Result<Option<PlanInfo>, RunError> {
    let Some(pins) = Pins::load(config.manifest.as_deref(), config.recase)? else {
        return Ok(None);
    };
    let Some(plan) = pins.scheduled_after(&tree::current_stage(layout)) else {
        return Ok(None);
    };
    if !has_rpc {
        return Err(RunError::ScheduledWithoutRpc {
            name: plan.name,
            height: plan.height,
            config: config.home.join("config").join("config.toml"),
        });
    }
    Ok(Some(plan))
}

/// An upgrade cvx knows is due: when it knew, for the history and the hook.
struct Detected {
    plan: PlanInfo,
    entry: history::Entry,
    at: std::time::Instant,
}

impl Detected {
    /// Record the detection now and tell the hook (in the background: it never holds up the
    /// upgrade).
    fn now(config: &Config, plan: &PlanInfo, kind: Kind) -> Detected {
        let entry = history::Entry {
            upgrade: plan.name.clone(),
            height: plan.height,
            trigger: kind.as_str().to_string(),
            detected_at: history::timestamp(std::time::SystemTime::now()),
            started_at: None,
            downtime_ms: None,
            backup: None,
            result: String::new(),
            error: None,
        };
        if let Some(hook) = config.hook.clone() {
            let (entry, home, daemon) = (entry.clone(), config.home.clone(), config.name.clone());
            tokio::spawn(async move {
                let event = history::Event {
                    event: "detected",
                    home: &home,
                    daemon: &daemon,
                    entry: &entry,
                };
                hook.run(&event).await;
            });
        }
        Detected {
            plan: plan.clone(),
            entry,
            at: std::time::Instant::now(),
        }
    }

    /// Perform the upgrade; a signal ends the step in progress (see [`upgrade`]). A failure is
    /// recorded (history, hook) before it is returned.
    async fn perform(
        mut self,
        config: &Config,
        layout: &Layout,
        signals: &mut Signals,
        ahead: Option<backup::Ahead>,
    ) -> Result<Upgraded, RunError> {
        let plan = self.plan.clone();
        let (canceller, cancel) = upgrade::Canceller::new();
        let mut backup = None;
        let mut interrupted = None;
        let result = {
            let work = upgrade::perform(config, layout, &plan, &cancel, &mut backup, ahead);
            tokio::pin!(work);
            loop {
                tokio::select! {
                    result = &mut work => break result,
                    sig = signals.recv() => {
                        if interrupted.is_none() {
                            warn!(upgrade = %plan.name, height = plan.height, "received {sig:?} during the upgrade: ending the step in progress, then exiting");
                            interrupted = Some(sig);
                        }
                        canceller.cancel();
                    }
                }
            }
        };
        self.entry.backup = backup;
        metrics::handle().upgrade_finished(&result);
        let exit = match (result, interrupted) {
            (Err(e @ UpgradeError::Interrupted { .. }), Some(sig)) => {
                warn!(upgrade = %plan.name, height = plan.height, "{e}");
                self.entry.result = "interrupted".into();
                self.entry.error = Some(e.to_string());
                self.record(config, layout, "failed").await;
                return Ok(Upgraded {
                    exit: Some(child::signalled(sig)),
                    detected: None,
                });
            }
            (Err(source), _) => {
                self.entry.result = "failed".into();
                self.entry.error = Some(crate::errors::error_chain(&source));
                self.record(config, layout, "failed").await;
                return Err(RunError::Upgrade {
                    name: plan.name.clone(),
                    height: plan.height,
                    source: Box::new(source),
                });
            }
            (Ok(()), Some(sig)) => {
                info!(upgrade = %plan.name, height = plan.height, "upgrade done; not restarting the daemon after {sig:?}");
                Some(child::signalled(sig))
            }
            (Ok(()), None) => None,
        };
        self.entry.result = "done".into();
        Ok(Upgraded {
            exit,
            detected: Some(self),
        })
    }

    /// Append the entry to the history and run the hook for `event`, waiting for it (bounded by
    /// its timeout): cvx may be about to exit.
    async fn record(&self, config: &Config, layout: &Layout, event: &'static str) {
        if let Err(e) = history::append(layout, &self.entry) {
            warn!(
                "cannot record the upgrade in {}: {e}",
                layout.cvx().join("history.jsonl").display()
            );
        }
        if let Some(hook) = &config.hook {
            hook.run(&history::Event {
                event,
                home: &config.home,
                daemon: &config.name,
                entry: &self.entry,
            })
            .await;
        }
    }
}

/// A performed upgrade. `exit`: cvx exits now with that code.
struct Upgraded {
    exit: Option<u8>,
    detected: Option<Detected>,
}

impl Upgraded {
    /// Complete the history entry of a successful upgrade: with the new binary's start and the
    /// downtime when `started`.
    async fn finish(self, config: &Config, layout: &Layout, started: bool) {
        let Some(mut detected) = self.detected else {
            return;
        };
        if started {
            detected.entry.started_at = Some(history::timestamp(std::time::SystemTime::now()));
            detected.entry.downtime_ms = Some(detected.at.elapsed().as_millis() as u64);
            info!(upgrade = %detected.plan.name, height = detected.plan.height, "the node was down for {} ms", detected.at.elapsed().as_millis());
        }
        detected.record(config, layout, "done").await;
    }
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
