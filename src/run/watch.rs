//! Noticing the upgrade: file events on `data/` (inotify), polling at DAEMON_POLL_INTERVAL as the
//! fallback, Cosmovisor's trigger rule, and the node's own height where its RPC answers.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind};
use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

use crate::apply::fetch;
use crate::tree::{PlanInfo, UpgradeInfo, parse_upgrade_info};

/// Wakes the supervisor when `upgrade-info.json` may have changed.
pub struct Watcher {
    file: PathBuf,
    events: mpsc::UnboundedReceiver<()>,
    sender: mpsc::UnboundedSender<()>,
    watcher: Option<notify::RecommendedWatcher>,
    poll: tokio::time::Interval,
    /// The last unusable content logged: the same bytes are not logged again on every tick.
    reported: Option<Vec<u8>>,
}

impl Watcher {
    pub fn new(file: &Path, poll_interval: Duration) -> Self {
        let (sender, events) = mpsc::unbounded_channel();
        let mut poll = tokio::time::interval(poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut watcher = Watcher {
            file: file.to_path_buf(),
            events,
            sender,
            watcher: None,
            poll,
            reported: None,
        };
        watcher.arm();
        watcher
    }

    /// Watch the file's directory (the file itself may not exist yet, and x/upgrade recreates it).
    /// Without inotify, or before `data/` exists, polling alone does the job.
    fn arm(&mut self) {
        if self.watcher.is_some() {
            return;
        }
        let Some(dir) = self.file.parent() else {
            return;
        };
        let sender = self.sender.clone();
        let name = self.file.file_name().map(|n| n.to_os_string());
        let made = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let relevant = match &event {
                // Opening or closing the file to read it (cvx itself does) changes nothing; an
                // event for it would wake cvx to read again, in a loop.
                Ok(e) if matches!(e.kind, EventKind::Access(a) if a != AccessKind::Close(AccessMode::Write)) => {
                    false
                }
                Ok(e) => e
                    .paths
                    .iter()
                    .any(|p| p.file_name().map(|n| n.to_os_string()) == name),
                Err(_) => true,
            };
            if relevant {
                let _ = sender.send(());
            }
        });
        match made.and_then(|mut w| w.watch(dir, RecursiveMode::NonRecursive).map(|()| w)) {
            Ok(w) => {
                tracing::debug!("watching {} for file events", dir.display());
                self.watcher = Some(w);
            }
            Err(e) => tracing::debug!("no file events for {} ({e}); polling", dir.display()),
        }
    }

    /// Wait for the next file event or poll tick.
    pub async fn changed(&mut self) {
        tokio::select! {
            _ = self.events.recv() => {}
            _ = self.poll.tick() => self.arm(),
        }
    }

    /// The file's state now. Half-written and invalid files are states, logged once per distinct
    /// content (a node that leaves a broken file would otherwise flood the journal), never errors.
    pub fn read(&mut self) -> UpgradeInfo {
        let (info, bytes) = match std::fs::read(&self.file) {
            Ok(bytes) => (parse_upgrade_info(&bytes), bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                (UpgradeInfo::Missing, Vec::new())
            }
            Err(e) => {
                let error = e.to_string();
                let bytes = error.clone().into_bytes();
                (UpgradeInfo::Invalid { error }, bytes)
            }
        };
        let unusable = matches!(
            info,
            UpgradeInfo::Partial { .. } | UpgradeInfo::Invalid { .. }
        );
        if !unusable {
            self.reported = None;
            return info;
        }
        if self.reported.as_ref() == Some(&bytes) {
            return info;
        }
        match &info {
            UpgradeInfo::Partial { error } => tracing::info!(
                "{} is incomplete ({error}); reading it again on the next event",
                self.file.display()
            ),
            UpgradeInfo::Invalid { error } => tracing::warn!(
                "{} is not a valid plan ({error}); reading it again when it changes",
                self.file.display()
            ),
            _ => {}
        }
        self.reported = Some(bytes);
        info
    }
}

/// Cosmovisor's rule: on the first valid read, a plan triggers when its name differs from the
/// current upgrade's; afterwards, when its height is above the last one seen. A plan below the
/// current upgrade's own height is older than it (a governance plan left in `data/` before a
/// scheduled upgrade) and never triggers.
#[derive(Debug)]
pub struct Trigger {
    current: String,
    last_height: Option<u64>,
    floor: u64,
}

impl Trigger {
    /// `current` is the plan `current` points to (None for genesis).
    pub fn new(current: Option<&PlanInfo>) -> Self {
        Trigger {
            current: current.map(|p| p.name.clone()).unwrap_or_default(),
            last_height: None,
            floor: current.map_or(0, |p| p.height),
        }
    }

    pub fn fires(&mut self, plan: &PlanInfo) -> bool {
        let fires = match self.last_height {
            None => plan.name != self.current,
            Some(last) => plan.height > last,
        };
        self.last_height = Some(self.last_height.map_or(plan.height, |l| l.max(plan.height)));
        fires && plan.height >= self.floor
    }
}

/// The node's RPC listen address from `$DAEMON_HOME/config/config.toml` (`[rpc] laddr`), as a
/// URL cvx can reach: a node listening on all interfaces answers on loopback.
pub fn rpc_address(home: &Path) -> Option<String> {
    let text = std::fs::read_to_string(home.join("config").join("config.toml")).ok()?;
    let table: toml::Table = text.parse().ok()?;
    rpc_url(table.get("rpc")?.get("laddr")?.as_str()?)
}

/// `tcp://HOST:PORT` (or `HOST:PORT`) as an http URL; None for a unix socket or no port.
fn rpc_url(laddr: &str) -> Option<String> {
    if laddr.starts_with("unix://") {
        return None;
    }
    let hostport = laddr.strip_prefix("tcp://").unwrap_or(laddr);
    let (host, port) = hostport.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    let host = match host {
        "" | "0.0.0.0" => "127.0.0.1",
        "[::]" => "[::1]",
        other => other,
    };
    Some(format!("http://{host}:{port}"))
}

/// GET `path` from the node's CometBFT RPC and parse the JSON answer; None when it does not
/// answer.
///
/// The one HTTP read outside `apply::fetch`, kept for the supervisor's memory goal (README
/// "Supervision": RSS at most 8 MiB, 7.0-7.2 MiB with metrics): `cvx run` polls the local RPC
/// all day, and this bare HTTP/1.0 request over TCP maps in no HTTP client stack (no TLS, no
/// connection pool) for a local GET answered in well under a millisecond. It has the same limits
/// as the fetch layer's reads: a timeout (2 s for the whole exchange), a body cap
/// ([`fetch::MAX_DOCUMENT`]), plain `http://` only (nothing to downgrade), and no retries: the
/// next poll is the retry.
pub async fn rpc_get(rpc: &str, path: &str) -> Option<serde_json::Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let hostport = rpc.strip_prefix("http://")?;
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(hostport).await.ok()?;
        let request =
            format!("GET {path} HTTP/1.0\r\nHost: {hostport}\r\nAccept: application/json\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream
            .take(fetch::MAX_DOCUMENT)
            .read_to_end(&mut response)
            .await
            .ok()?;
        Some(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .ok()??;
    let split = response.windows(4).position(|w| w == b"\r\n\r\n")?;
    let (head, body) = (&response[..split], &response[split + 4..]);
    if !head.starts_with(b"HTTP/1.1 200") && !head.starts_with(b"HTTP/1.0 200") {
        return None;
    }
    serde_json::from_slice(body).ok()
}

/// What the node's CometBFT `/status` says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    /// The chain id (`node_info.network`).
    pub network: String,
    pub height: u64,
}

/// The node's `/status`, or None when the RPC does not answer.
pub async fn node_status(rpc: &str) -> Option<NodeStatus> {
    let status = rpc_get(rpc, "/status").await?;
    let height = match &status["result"]["sync_info"]["latest_block_height"] {
        serde_json::Value::String(s) => s.parse().ok(),
        other => other.as_u64(),
    }?;
    let network = status["result"]["node_info"]["network"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    Some(NodeStatus { network, height })
}

/// The node's latest height, or None when the RPC does not answer.
pub async fn node_height(rpc: &str) -> Option<u64> {
    node_status(rpc).await.map(|s| s.height)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(name: &str, height: u64) -> PlanInfo {
        PlanInfo {
            name: name.into(),
            height,
            info: String::new(),
        }
    }

    #[test]
    fn rpc_addresses() {
        assert_eq!(
            rpc_url("tcp://0.0.0.0:26657").as_deref(),
            Some("http://127.0.0.1:26657")
        );
        assert_eq!(
            rpc_url("tcp://10.0.0.0:26657").as_deref(),
            Some("http://10.0.0.0:26657"),
            "only the whole host 0.0.0.0 means all interfaces"
        );
        assert_eq!(
            rpc_url("tcp://[::]:26657").as_deref(),
            Some("http://[::1]:26657")
        );
        assert_eq!(
            rpc_url("tcp://[::1]:26657").as_deref(),
            Some("http://[::1]:26657")
        );
        assert_eq!(
            rpc_url("127.0.0.1:1").as_deref(),
            Some("http://127.0.0.1:1")
        );
        assert_eq!(rpc_url("unix:///run/node.sock"), None);
        assert_eq!(rpc_url("tcp://localhost"), None);
    }

    #[test]
    fn trigger_rule() {
        let mut t = Trigger::new(Some(&plan("v2", 100)));
        assert!(!t.fires(&plan("v2", 100)), "the current upgrade's own plan");
        assert!(!t.fires(&plan("v2", 100)));
        assert!(t.fires(&plan("v3", 200)), "a higher height");
        assert!(!t.fires(&plan("v3", 200)));
        let mut t = Trigger::new(None);
        assert!(t.fires(&plan("v2", 100)), "genesis, first read");
        let mut t = Trigger::new(Some(&plan("v2.1-patch", 150)));
        assert!(
            !t.fires(&plan("v2", 100)),
            "a plan older than the current (scheduled) upgrade"
        );
        assert!(t.fires(&plan("v3", 200)));
    }
}
