//! The supervisor's facts (DESIGN §5.3): recorded under `.cvx/` for `cvx status`, and, with
//! `CVX_METRICS_ADDR`, served to Prometheus at `/metrics`.
//!
//! The supervisor reports events through [`handle`] (daemon started or exited, upgrade started
//! or finished, backup started or finished); each updates one [`Record`] that is written to
//! `cosmovisor/.cvx/supervisor.json` at once, so what `cvx status` reads and what the metrics
//! show are the same facts, and the upgrade counts survive a restart of cvx (a failed upgrade
//! ends cvx: the next cvx still reports it).
//!
//! With metrics on, a timer (CVX_METRICS_INTERVAL, 5 s) reads the node's height from its RPC and,
//! when the tree or the manifest changed, has `cvx status` judge the next upgrade (see [`Judge`]).
//! A timer rather than work at scrape time: a scrape then only encodes, never waits on the node's
//! RPC or on a hash, and the work per interval is bounded whoever scrapes: one `/status` GET and
//! a few `stat`s. A `cvx apply` that stages the next binary while the node runs shows within one
//! interval.
//!
//! The HTTP side is a small HTTP/1.1 responder on tokio's TCP listener: `GET /metrics` (and
//! HEAD), one request per connection, a few connections at once, a deadline for each. A
//! server framework would map more code into the supervisor for one route (DESIGN's memory goal).

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, Semaphore};
use tracing::{debug, info, trace, warn};

use super::config::Config;
use super::record::{LastBackup, LastUpgrade, Record, Supervisor, UpgradeResult};
use crate::tree::Layout;
use crate::tree::receipt::FileIdentity;

/// One metric as exposed: its name, type and help (README's table and the examples under
/// `examples/prometheus/` are checked against this list).
#[derive(Debug)]
pub struct Metric {
    pub name: &'static str,
    pub kind: MetricType,
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

const fn gauge(name: &'static str, labels: &'static [&'static str], help: &'static str) -> Metric {
    Metric {
        name,
        kind: MetricType::Gauge,
        labels,
        help,
    }
}

pub const INFO: Metric = gauge(
    "cvx_info",
    &["version", "chain_id", "daemon", "current"],
    "Always 1: cvx's version, the chain id (from CVX_MANIFEST, else the node's RPC), the daemon's name, and the upgrade current points to (genesis for genesis)",
);
pub const DAEMON_UP: Metric = gauge(
    "cvx_daemon_up",
    &[],
    "1 while the daemon cvx supervises runs, 0 while it is stopped (during an upgrade)",
);
pub const DAEMON_RESTARTS: Metric = Metric {
    name: "cvx_daemon_restarts_total",
    kind: MetricType::Counter,
    labels: &[],
    help: "Times this cvx process started the daemon again, after upgrades",
};
pub const NODE_HEIGHT: Metric = gauge(
    "cvx_node_height",
    &[],
    "The node's latest block height, as its RPC last reported it",
);
pub const NODE_RPC_UP: Metric = gauge(
    "cvx_node_rpc_up",
    &[],
    "1 when the node's RPC ([rpc] laddr of config/config.toml) answered cvx's last /status request, else 0",
);
pub const NEXT_HEIGHT: Metric = gauge(
    "cvx_upgrade_next_height",
    &["name"],
    "Height of the next upgrade the manifest (CVX_MANIFEST) expects after the current one",
);
pub const NEXT_READY: Metric = gauge(
    "cvx_upgrade_next_ready",
    &["name"],
    "1 when the next upgrade's binary and libraries for this platform are staged and verified against the manifest's pins (as cvx status judges), else 0",
);
pub const BLOCKS_REMAINING: Metric = gauge(
    "cvx_upgrade_blocks_remaining",
    &[],
    "Blocks from the node's height to the next upgrade's height",
);
pub const UPGRADES: Metric = Metric {
    name: "cvx_upgrades_total",
    kind: MetricType::Counter,
    labels: &["result"],
    help: "Upgrades cvx performed on this home, by result (success or failure); recorded under cosmovisor/.cvx/, so the counts survive restarts of cvx",
};
pub const LAST_FAILED: Metric = gauge(
    "cvx_upgrade_last_failed",
    &[],
    "1 when the last upgrade cvx attempted on this home failed, 0 when it succeeded",
);
pub const LAST_TIMESTAMP: Metric = gauge(
    "cvx_upgrade_last_timestamp_seconds",
    &[],
    "When the last upgrade cvx attempted on this home finished, in Unix time",
);
pub const LAST_DOWNTIME: Metric = gauge(
    "cvx_upgrade_last_downtime_seconds",
    &[],
    "Downtime of the last upgrade: from stopping the old daemon to starting the new one (absent after a failed upgrade)",
);
pub const BACKUP_SECONDS: Metric = gauge(
    "cvx_backup_last_seconds",
    &[],
    "Duration of the last backup of data/ before an upgrade",
);
pub const BACKUP_BYTES: Metric = gauge(
    "cvx_backup_last_bytes_copied",
    &[],
    "Bytes the last backup of data/ copied",
);

pub const PREFLIGHT: Metric = gauge(
    "cvx_preflight_warning",
    &["check"],
    "1 for each preflight check that warns now of a problem at the next upgrade (check = backup_dir, backup_room, next_binary or shutdown_grace)",
);

/// Every metric cvx exports, in the order of the exposition.
pub const ALL: &[&Metric] = &[
    &INFO,
    &DAEMON_UP,
    &DAEMON_RESTARTS,
    &NODE_HEIGHT,
    &NODE_RPC_UP,
    &NEXT_HEIGHT,
    &NEXT_READY,
    &BLOCKS_REMAINING,
    &UPGRADES,
    &LAST_FAILED,
    &LAST_TIMESTAMP,
    &LAST_DOWNTIME,
    &BACKUP_SECONDS,
    &BACKUP_BYTES,
    &PREFLIGHT,
];

/// A cheap handle on the supervisor's facts; a disabled one ignores every event.
#[derive(Clone, Debug, Default)]
pub struct Metrics(Option<Arc<Shared>>);

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    file: PathBuf,
    /// Wakes the refresher before its next tick (the daemon started: `current` moved).
    refresh: Notify,
}

#[derive(Debug, Default)]
struct State {
    record: Record,
    /// The first daemon start is not a restart.
    launched: bool,
    /// The upgrade under way: name, height, and when the daemon went down for it.
    upgrading: Option<(String, u64, Instant)>,
    /// The last upgrade succeeded and its new daemon has not started yet.
    downtime_from: Option<Instant>,
    backup_from: Option<Instant>,
    /// Whether the last write of the record failed (said once).
    write_failed: bool,
    view: View,
}

/// What the refresher last saw of the node and the tree.
#[derive(Debug, Clone, Default)]
struct View {
    /// DAEMON_NAME.
    daemon: String,
    node_height: Option<u64>,
    rpc_up: bool,
    chain_id: String,
    current: String,
    next: Option<NextUpgrade>,
    blocks_remaining: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
struct NextUpgrade {
    name: String,
    height: Option<u64>,
    ready: bool,
}

static HANDLE: OnceLock<Metrics> = OnceLock::new();
static OFF: Metrics = Metrics(None);

/// The supervisor's handle: the one [`start`] set up, else a disabled one (`cvx run` of a
/// command other than `start`, and unit tests).
pub fn handle() -> &'static Metrics {
    HANDLE.get().unwrap_or(&OFF)
}

/// For `cvx run start`: record the supervisor's facts, and with a listener (CVX_METRICS_ADDR,
/// bound with the configuration) serve them and keep the node's height and the next upgrade's
/// readiness fresh, on `runtime`.
pub fn start(
    runtime: &tokio::runtime::Runtime,
    config: &Config,
    listener: Option<std::net::TcpListener>,
) -> io::Result<()> {
    let layout = Layout::new(&config.home);
    let metrics = Metrics::new(&layout, &config.name);
    if let Some(listener) = listener {
        let _enter = runtime.enter();
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        runtime.spawn(serve(listener, metrics.clone()));
        runtime.spawn(refresh(metrics.clone(), config.clone()));
        info!("serving metrics at http://{addr}/metrics");
    }
    let _ = HANDLE.set(metrics);
    Ok(())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Metrics {
    /// A handle recording to `layout`'s `.cvx/supervisor.json`, keeping what a previous cvx
    /// recorded there about upgrades and backups.
    pub fn new(layout: &Layout, daemon: &str) -> Self {
        let previous = crate::run::record::read_record(layout)
            .unwrap_or_default()
            .facts;
        let pid = std::process::id();
        let record = Record {
            start_ticks: crate::run::record::start_ticks(pid).unwrap_or_default(),
            facts: Supervisor {
                running: true,
                pid,
                version: env!("CARGO_PKG_VERSION").to_string(),
                started_at: unix_now(),
                daemon_up: false,
                daemon_restarts: 0,
                upgrades: previous.upgrades,
                last_upgrade: previous.last_upgrade,
                last_backup: previous.last_backup,
                warnings: Vec::new(),
            },
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                record,
                view: View {
                    daemon: daemon.to_string(),
                    ..View::default()
                },
                ..State::default()
            }),
            file: crate::run::record::record_path(layout),
            refresh: Notify::new(),
        });
        let metrics = Metrics(Some(shared));
        metrics.update(|_| {});
        metrics
    }

    /// Apply `change` to the facts and write the record.
    fn update(&self, change: impl FnOnce(&mut State)) {
        let Some(shared) = &self.0 else {
            return;
        };
        let mut state = shared.lock();
        change(&mut state);
        // Not fsync'd: a record of facts, rewritten at every event, and the write sits between
        // the switch and the new daemon's launch.
        let written = write_json(&shared.file, &state.record);
        match written {
            Err(e) if !state.write_failed => {
                warn!(
                    "cannot record the supervisor's state in {}: {e}; cvx status will not show it",
                    shared.file.display()
                );
                state.write_failed = true;
            }
            Err(_) => {}
            Ok(()) => state.write_failed = false,
        }
    }

    /// The daemon was launched.
    pub fn daemon_started(&self) {
        self.update(|s| {
            if s.launched {
                s.record.facts.daemon_restarts += 1;
            }
            s.launched = true;
            s.record.facts.daemon_up = true;
            if let (Some(from), Some(last)) =
                (s.downtime_from.take(), &mut s.record.facts.last_upgrade)
            {
                last.downtime_seconds = Some(from.elapsed().as_secs_f64());
            }
        });
        if let Some(shared) = &self.0 {
            shared.refresh.notify_one();
        }
    }

    /// The preflight warnings in force now (DESIGN §5.4).
    pub fn preflight(&self, warnings: &[super::preflight::Warning]) {
        self.update(|s| s.record.facts.warnings = warnings.to_vec());
    }

    /// The daemon exited (by itself, after a signal, or stopped for an upgrade).
    pub fn daemon_exited(&self) {
        self.update(|s| s.record.facts.daemon_up = false);
    }

    /// cvx starts upgrade `name` at `height`: the daemon is about to stop, or (found pending at
    /// start) has not started.
    pub fn upgrade_started(&self, name: &str, height: u64) {
        if let Some(shared) = &self.0 {
            shared.lock().upgrading = Some((name.to_string(), height, Instant::now()));
        }
    }

    /// The upgrade's steps are over, with this result.
    pub fn upgrade_finished<T, E: std::error::Error>(&self, result: &Result<T, E>) {
        self.update(|s| {
            let Some((name, height, from)) = s.upgrading.take() else {
                return;
            };
            let facts = &mut s.record.facts;
            let (result, error) = match result {
                Ok(_) => {
                    facts.upgrades.success += 1;
                    s.downtime_from = Some(from);
                    (UpgradeResult::Success, None)
                }
                Err(e) => {
                    facts.upgrades.failure += 1;
                    (UpgradeResult::Failure, Some(crate::errors::error_chain(e)))
                }
            };
            facts.last_upgrade = Some(LastUpgrade {
                name,
                height,
                result,
                error,
                finished_at: unix_now(),
                // Until the new daemon starts (it may not: DAEMON_RESTART_AFTER_UPGRADE=false).
                downtime_seconds: (result == UpgradeResult::Success)
                    .then(|| from.elapsed().as_secs_f64()),
            });
        });
    }

    /// The backup of `data/` begins.
    pub fn backup_started(&self) {
        if let Some(shared) = &self.0 {
            shared.lock().backup_from = Some(Instant::now());
        }
    }

    /// The backup is complete, having copied `bytes_copied` bytes.
    pub fn backup_finished(&self, bytes_copied: u64) {
        self.update(|s| {
            let Some(from) = s.backup_from.take() else {
                return;
            };
            s.record.facts.last_backup = Some(LastBackup {
                upgrade: s
                    .upgrading
                    .as_ref()
                    .map(|(name, _, _)| name.clone())
                    .unwrap_or_default(),
                seconds: from.elapsed().as_secs_f64(),
                bytes_copied,
                finished_at: unix_now(),
            });
        });
    }

    /// The exposition, in the Prometheus text format (version 0.0.4).
    pub fn encode(&self) -> String {
        let mut registry = Registry::default();
        if let Some(shared) = &self.0 {
            registry.register_collector(Box::new(Exposition(shared.clone())));
        }
        let mut body = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut body, &registry)
            .expect("writing to a String does not fail");
        body
    }
}

impl Shared {
    /// The state, even after a panic elsewhere held the lock: facts are plain values.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `value` as JSON in `path`, replaced atomically (temp file in the same directory, rename).
fn write_json(path: &std::path::Path, value: &impl serde::Serialize) -> io::Result<()> {
    let dir = path.parent().expect("a file in .cvx/");
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    serde_json::to_writer_pretty(&mut tmp, value)?;
    io::Write::write_all(&mut tmp, b"\n")?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The exposition

#[derive(Debug)]
struct Exposition(Arc<Shared>);

/// One sample: label values (in the metric's label order) and the value.
type Sample<'a> = (Vec<&'a str>, f64);

impl Collector for Exposition {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let (facts, view) = {
            let state = self.0.lock();
            (state.record.facts.clone(), state.view.clone())
        };
        let flag = |on: bool| if on { 1.0 } else { 0.0 };
        let one = |value: f64| vec![(Vec::new(), value)];
        let version = facts.version.as_str();
        let next = view.next.as_ref();
        let last = facts.last_upgrade.as_ref();
        let backup = facts.last_backup.as_ref();
        let samples: [(&Metric, Vec<Sample>); 15] = [
            (
                &INFO,
                vec![(
                    vec![version, &view.chain_id, &view.daemon, &view.current],
                    1.0,
                )],
            ),
            (&DAEMON_UP, one(flag(facts.daemon_up))),
            (&DAEMON_RESTARTS, one(facts.daemon_restarts as f64)),
            (
                &NODE_HEIGHT,
                view.node_height.map(|h| one(h as f64)).unwrap_or_default(),
            ),
            (&NODE_RPC_UP, one(flag(view.rpc_up))),
            (
                &NEXT_HEIGHT,
                next.and_then(|n| Some((vec![n.name.as_str()], n.height? as f64)))
                    .into_iter()
                    .collect(),
            ),
            (
                &NEXT_READY,
                next.map(|n| (vec![n.name.as_str()], flag(n.ready)))
                    .into_iter()
                    .collect(),
            ),
            (
                &BLOCKS_REMAINING,
                view.blocks_remaining
                    .map(|b| one(b as f64))
                    .unwrap_or_default(),
            ),
            (
                &UPGRADES,
                vec![
                    (vec!["success"], facts.upgrades.success as f64),
                    (vec!["failure"], facts.upgrades.failure as f64),
                ],
            ),
            (
                &LAST_FAILED,
                last.map(|l| one(flag(l.result == UpgradeResult::Failure)))
                    .unwrap_or_default(),
            ),
            (
                &LAST_TIMESTAMP,
                last.map(|l| one(l.finished_at as f64)).unwrap_or_default(),
            ),
            (
                &LAST_DOWNTIME,
                last.and_then(|l| l.downtime_seconds)
                    .map(one)
                    .unwrap_or_default(),
            ),
            (
                &BACKUP_SECONDS,
                backup.map(|b| one(b.seconds)).unwrap_or_default(),
            ),
            (
                &BACKUP_BYTES,
                backup
                    .map(|b| one(b.bytes_copied as f64))
                    .unwrap_or_default(),
            ),
            (
                &PREFLIGHT,
                facts
                    .warnings
                    .iter()
                    .map(|w| (vec![w.check.as_str()], 1.0))
                    .collect(),
            ),
        ];
        for (metric, samples) in samples {
            encode_metric(&mut encoder, metric, &samples)?;
        }
        Ok(())
    }
}

/// HELP, TYPE and the samples of one metric; nothing for a metric without a sample (a fact cvx
/// does not know yet, such as the node's height before its RPC answered).
fn encode_metric(
    encoder: &mut DescriptorEncoder,
    metric: &Metric,
    samples: &[Sample],
) -> fmt::Result {
    if samples.is_empty() {
        return Ok(());
    }
    // The encoder appends `_total` to a counter's name.
    let name = match metric.kind {
        MetricType::Counter => metric.name.trim_end_matches("_total"),
        _ => metric.name,
    };
    let mut encoder = encoder.encode_descriptor(name, metric.help, None, metric.kind)?;
    for (values, value) in samples {
        let labels: Vec<(&str, &str)> = metric
            .labels
            .iter()
            .copied()
            .zip(values.iter().copied())
            .collect();
        if labels.is_empty() {
            encode_value(&mut encoder, metric.kind, *value)?;
        } else {
            encode_value(&mut encoder.encode_family(&labels)?, metric.kind, *value)?;
        }
    }
    Ok(())
}

fn encode_value(encoder: &mut MetricEncoder, kind: MetricType, value: f64) -> fmt::Result {
    match kind {
        MetricType::Counter => encoder.encode_counter::<NoLabelSet, _, u64>(&(value as u64), None),
        _ => encoder.encode_gauge(&value),
    }
}

// ---------------------------------------------------------------------------------------------
// Keeping the node's height and the next upgrade fresh

/// Every CVX_METRICS_INTERVAL, and when the daemon starts: the node's height and chain id from
/// its RPC, then, with CVX_MANIFEST, the next upgrade as `cvx status` judges it.
async fn refresh(metrics: Metrics, config: Config) {
    let Some(shared) = metrics.0.clone() else {
        return;
    };
    let rpc = super::watch::rpc_address(&config.home);
    let mut judge = Judge {
        layout: Layout::new(&config.home),
        manifest: config.manifest.clone(),
        recase: config.recase,
        tree: None,
        status: None,
        said: None,
        passed: Value::Null,
    };
    let mut tick = tokio::time::interval(config.metrics_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_height = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shared.refresh.notified() => {}
        }
        let answer = match &rpc {
            Some(rpc) => super::watch::rpc_get(rpc, "/status").await,
            None => None,
        };
        let height =
            answer
                .as_ref()
                .and_then(|a| match &a["result"]["sync_info"]["latest_block_height"] {
                    Value::String(s) => s.parse().ok(),
                    other => other.as_u64(),
                });
        let network = answer
            .as_ref()
            .and_then(|a| a["result"]["node_info"]["network"].as_str())
            .map(String::from);
        // The last height known stays: a node whose RPC went silent is not advancing either.
        last_height = height.or(last_height);
        let status = judge.status(last_height).await;
        let mut state = shared.lock();
        let view = &mut state.view;
        view.node_height = last_height;
        view.rpc_up = height.is_some();
        match status {
            Some(status) => {
                let text = |v: &Value| v.as_str().map(String::from);
                view.chain_id = text(&status["chain"]).unwrap_or_default();
                view.current = text(&status["current"]["upgrade"])
                    .or_else(|| text(&status["current"]["stage"]))
                    .unwrap_or_default();
                view.next = status["next"]["name"].as_str().map(|name| NextUpgrade {
                    name: name.to_string(),
                    height: status["next"]["height"].as_u64(),
                    ready: status["next"]["binary_ready"] == true,
                });
            }
            None => {
                view.chain_id = network.unwrap_or_default();
                view.current = super::upgrade::current_upgrade(&judge.layout)
                    .map_or_else(|| crate::tree::GENESIS.to_string(), |plan| plan.name);
                view.next = None;
            }
        }
        // As `cvx status` counts them.
        view.blocks_remaining = view
            .next
            .as_ref()
            .and_then(|n| n.height)
            .zip(last_height)
            .map(|(target, at)| target.saturating_sub(at));
        trace!("metrics: refreshed");
    }
}

/// The next upgrade judged by `cvx status` itself, in a child process, whenever the tree or the
/// manifest changed: the judgement is the same by construction, and the supervisor maps none of
/// the code (manifest, plan, hashing) that makes it, nor its memory. Unchanged, nothing runs:
/// files with receipts are not hashed by `cvx status` anyway, and those without one are hashed
/// again only when something in the tree changed.
struct Judge {
    layout: Layout,
    manifest: Option<PathBuf>,
    recase: bool,
    /// The tree as it was at the last judgement.
    tree: Option<TreeState>,
    /// That judgement: `cvx status --json`, or None when it failed.
    status: Option<Value>,
    /// The last problem logged, so that a lasting one is said once.
    said: Option<String>,
    /// The next upgrade judged again because the node passed its height.
    passed: Value,
}

/// What `cvx status`'s judgement depends on in the tree, as cheap `stat`s: the manifest, the
/// `current` link, and every staged file with its receipt, by identity.
#[derive(Debug, PartialEq)]
struct TreeState {
    manifest: Option<FileIdentity>,
    current: Option<PathBuf>,
    files: Vec<(PathBuf, Option<FileIdentity>, Option<FileIdentity>)>,
}

/// How long `cvx status` may take (it may hash a large binary staged without a receipt).
const JUDGE_DEADLINE: Duration = Duration::from_secs(300);

impl Judge {
    /// `cvx status --json`, judged again when the tree changed or the node passed the next
    /// upgrade's height (where `current` is not a manifest stage, the next one is the first
    /// above the node's height); None without a manifest, or when it failed (said once).
    async fn status(&mut self, height: Option<u64>) -> Option<Value> {
        let manifest = self.manifest.clone()?;
        let tree = self.tree_state(&manifest);
        // Once per next upgrade: a node that skipped it stays past it.
        let passed = self.status.as_ref().and_then(|s| {
            let next = &s["next"];
            let at = height?;
            (at >= next["height"].as_u64()? && next["name"] != self.passed)
                .then(|| next["name"].clone())
        });
        if self.tree.as_ref() == Some(&tree) && passed.is_none() {
            return self.status.clone();
        }
        if let Some(name) = passed {
            self.passed = name;
        }
        debug!("metrics: judging the next upgrade (the tree changed): cvx status");
        self.tree = Some(tree);
        self.status = match self.run_status(&manifest).await {
            Ok(status) => {
                self.said = None;
                Some(status)
            }
            Err(problem) => {
                if self.said.as_ref() != Some(&problem) {
                    warn!("metrics: cannot judge the next upgrade: {problem}");
                    self.said = Some(problem);
                }
                None
            }
        };
        self.status.clone()
    }

    async fn run_status(&self, manifest: &std::path::Path) -> Result<Value, String> {
        // This very binary, even if a newer cvx replaced the file since.
        let output = tokio::process::Command::new("/proc/self/exe")
            .args(["status", "--json", "--quiet", "--manifest"])
            .arg(manifest)
            .arg("--home")
            .arg(&self.layout.home)
            .env(
                "COSMOVISOR_DISABLE_RECASE",
                if self.recase { "false" } else { "true" },
            )
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let output = match tokio::time::timeout(JUDGE_DEADLINE, output).await {
            Ok(Ok(output)) => output,
            Ok(Err(e)) => return Err(format!("cannot run cvx status: {e}")),
            Err(_) => {
                return Err(format!(
                    "cvx status took more than {}",
                    crate::duration::show(JUDGE_DEADLINE)
                ));
            }
        };
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(format!(
                "cvx status failed ({}): {}",
                output.status,
                stderr.lines().next().unwrap_or_default()
            ));
        }
        serde_json::from_slice(&output.stdout)
            .map_err(|e| format!("cvx status printed no JSON document: {e}"))
    }

    fn tree_state(&self, manifest: &std::path::Path) -> TreeState {
        let identity = |path: &std::path::Path| {
            std::fs::symlink_metadata(path)
                .ok()
                .map(|m| FileIdentity::of(&m))
        };
        let root = self.layout.root();
        let mut stages = vec![crate::tree::GENESIS.to_string()];
        if let Ok(entries) = std::fs::read_dir(root.join("upgrades")) {
            stages.extend(
                entries
                    .flatten()
                    .map(|e| format!("upgrades/{}", e.file_name().to_string_lossy())),
            );
        }
        let mut files = Vec::new();
        for stage in stages {
            for sub in ["bin", "lib"] {
                let Ok(entries) = std::fs::read_dir(root.join(&stage).join(sub)) else {
                    continue;
                };
                for entry in entries.flatten() {
                    let rel = format!("{stage}/{sub}/{}", entry.file_name().to_string_lossy());
                    let receipt = crate::tree::receipt::receipt_path(&self.layout.receipts(), &rel);
                    files.push((entry.path(), identity(&entry.path()), identity(&receipt)));
                }
            }
        }
        files.sort_by(|a, b| a.0.cmp(&b.0));
        TreeState {
            manifest: std::fs::metadata(manifest)
                .ok()
                .map(|m| FileIdentity::of(&m)),
            current: std::fs::read_link(self.layout.current()).ok(),
            files,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Serving /metrics

/// Connections served at once; more are closed at once (Prometheus scrapes one at a time).
const CONNECTIONS: usize = 4;
/// A request's head must arrive, and its response leave, within this.
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// The longest request head read.
const MAX_HEAD: usize = 8 << 10;
const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

async fn serve(listener: tokio::net::TcpListener, metrics: Metrics) {
    let permits = Arc::new(Semaphore::new(CONNECTIONS));
    let mut said = false;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                said = false;
                stream
            }
            Err(e) => {
                // Out of file descriptors, typically: wait rather than spin.
                if !said {
                    warn!("metrics: cannot accept a connection: {e}");
                    said = true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            debug!("metrics: {CONNECTIONS} connections already open; closing a new one");
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Ok(Err(e)) =
                tokio::time::timeout(REQUEST_DEADLINE, respond(stream, &metrics)).await
            {
                debug!("metrics: a request failed: {e}");
            }
            drop(permit);
        });
    }
}

/// Read one request head and answer it; the connection then closes.
async fn respond(mut stream: tokio::net::TcpStream, metrics: &Metrics) -> io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let end = loop {
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        if head.len() > MAX_HEAD {
            return reply(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "request head too large\n",
                true,
            )
            .await;
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    };
    let line = String::from_utf8_lossy(&head[..end]);
    let mut parts = line.lines().next().unwrap_or_default().split(' ');
    let (method, target) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let path = target.split('?').next().unwrap_or_default();
    let with_body = method != "HEAD";
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let body = metrics.encode();
            reply(&mut stream, "200 OK", CONTENT_TYPE, &body, with_body).await
        }
        ("GET" | "HEAD", _) => {
            reply(
                &mut stream,
                "404 Not Found",
                "text/plain",
                "cvx serves /metrics only\n",
                with_body,
            )
            .await
        }
        _ => {
            reply(
                &mut stream,
                "405 Method Not Allowed",
                "text/plain",
                "GET /metrics\n",
                true,
            )
            .await
        }
    }
}

async fn reply(
    stream: &mut tokio::net::TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
    with_body: bool,
) -> io::Result<()> {
    let allow = if status.starts_with("405") {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if with_body {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(metrics: &Metrics) -> Vec<String> {
        metrics
            .encode()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(String::from)
            .collect()
    }

    #[test]
    fn a_fresh_supervisor_exposes_only_what_it_knows() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Metrics::new(&Layout::new(dir.path()), "simd");
        let version = env!("CARGO_PKG_VERSION");
        assert_eq!(
            values(&metrics),
            [
                format!(
                    r#"cvx_info{{version="{version}",chain_id="",daemon="simd",current=""}} 1.0"#
                ),
                "cvx_daemon_up 0.0".into(),
                "cvx_daemon_restarts_total 0".into(),
                "cvx_node_rpc_up 0.0".into(),
                r#"cvx_upgrades_total{result="success"} 0"#.into(),
                r#"cvx_upgrades_total{result="failure"} 0"#.into(),
            ]
        );
        let text = metrics.encode();
        assert!(
            text.contains("# TYPE cvx_upgrades_total counter\n"),
            "{text}"
        );
        assert!(text.contains("# HELP cvx_daemon_up 1 while"), "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Metrics::new(&Layout::new(dir.path()), "a\"b\\c\nd");
        assert!(
            metrics.encode().contains(r#"daemon="a\"b\\c\nd""#),
            "{}",
            metrics.encode()
        );
    }

    #[test]
    fn events_become_facts_and_the_next_cvx_keeps_the_history() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let metrics = Metrics::new(&layout, "simd");
        metrics.daemon_started();
        metrics.upgrade_started("v2", 30);
        metrics.daemon_exited();
        metrics.backup_started();
        metrics.backup_finished(1234);
        metrics.upgrade_finished(&Ok::<(), io::Error>(()));
        metrics.daemon_started();
        let record = crate::run::record::read_record(&layout).unwrap();
        let facts = &record.facts;
        assert!(facts.daemon_up);
        assert_eq!(facts.daemon_restarts, 1);
        assert_eq!((facts.upgrades.success, facts.upgrades.failure), (1, 0));
        let last = facts.last_upgrade.as_ref().unwrap();
        assert_eq!((last.name.as_str(), last.height), ("v2", 30));
        assert!(last.downtime_seconds.is_some_and(|d| d >= 0.0));
        let backup = facts.last_backup.as_ref().unwrap();
        assert_eq!((backup.upgrade.as_str(), backup.bytes_copied), ("v2", 1234));
        let text = values(&metrics).join("\n");
        assert!(text.contains("cvx_upgrade_last_failed 0.0"), "{text}");
        assert!(
            text.contains("cvx_backup_last_bytes_copied 1234.0"),
            "{text}"
        );
        // The writer is this process, alive: cvx status says it runs.
        assert!(crate::run::record::supervisor(&layout).unwrap().running);

        metrics.upgrade_started("v3", 60);
        metrics.upgrade_finished(&Err::<(), _>(io::Error::other("no binary")));
        let next = Metrics::new(&layout, "simd");
        let text = values(&next).join("\n");
        assert!(
            text.contains(r#"cvx_upgrades_total{result="success"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"cvx_upgrades_total{result="failure"} 1"#),
            "{text}"
        );
        assert!(text.contains("cvx_upgrade_last_failed 1.0"), "{text}");
        assert!(
            !text.contains("cvx_upgrade_last_downtime_seconds"),
            "{text}"
        );
        assert!(text.contains("cvx_daemon_restarts_total 0"), "{text}");
        let facts = crate::run::record::read_record(&layout).unwrap().facts;
        assert_eq!(
            facts.last_upgrade.unwrap().error.as_deref(),
            Some("no binary")
        );
        assert!(!facts.daemon_up);
    }

    #[test]
    fn a_record_whose_writer_is_gone_is_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        Metrics::new(&layout, "simd").daemon_started();
        let mut record = crate::run::record::read_record(&layout).unwrap();
        // Same pid, another start: the pid was reused.
        record.start_ticks += 1;
        write_json(&crate::run::record::record_path(&layout), &record).unwrap();
        let supervisor = crate::run::record::supervisor(&layout).unwrap();
        assert!(!supervisor.running && !supervisor.daemon_up);
    }

    #[test]
    fn a_disabled_handle_records_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let off = Metrics::default();
        off.daemon_started();
        off.upgrade_started("v2", 3);
        off.upgrade_finished(&Ok::<(), io::Error>(()));
        assert_eq!(off.encode(), "");
        assert!(crate::run::record::read_record(&Layout::new(dir.path())).is_none());
    }
}
