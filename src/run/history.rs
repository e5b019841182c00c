//! What happened at each upgrade (DESIGN §5.4): one JSON line per upgrade cvx performed, appended
//! to `.cvx/history.jsonl`, read by `cvx history`; and the notification hook, an executable named
//! by `CVX_UPGRADE_HOOK`, run on `detected`, `done` and `failed` with the facts as JSON on stdin.
//! A hook that fails or hangs is logged and killed after its timeout; it never holds up an
//! upgrade.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tracing::{debug, warn};

use crate::tree::Layout;

/// One upgrade as it happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub upgrade: String,
    pub height: u64,
    /// `governance` or `halt-height`.
    pub trigger: String,
    /// When cvx knew the node had halted for it (RFC 3339, UTC).
    pub detected_at: String,
    /// When the new binary was started (None when it was not: a failure, or
    /// DAEMON_RESTART_AFTER_UPGRADE=false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// From detection to the new binary's start, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<PathBuf>,
    /// `done`, `failed` or `interrupted`.
    pub result: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn path(layout: &Layout) -> PathBuf {
    layout.cvx().join("history.jsonl")
}

/// RFC 3339 in UTC, to the millisecond.
pub fn timestamp(t: SystemTime) -> String {
    crate::time::format_go("2006-01-02T15:04:05.000Z07:00", t)
}

/// Append `entry` as one line, synced: the history survives a crash right after an upgrade.
pub fn append(layout: &Layout, entry: &Entry) -> io::Result<()> {
    fs::create_dir_all(layout.cvx())?;
    let mut line = serde_json::to_vec(entry).map_err(io::Error::other)?;
    line.push(b'\n');
    let mut file = fs::OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path(layout))?;
    // A line torn by a crash gets its end, so this entry starts a line of its own.
    let len = file.metadata()?.len();
    let mut last = [0u8; 1];
    if len > 0 && file.read_at(&mut last, len - 1)? == 1 && last[0] != b'\n' {
        line.insert(0, b'\n');
    }
    file.write_all(&line)?;
    file.sync_all()
}

/// Every recorded upgrade, oldest first; a line that does not parse (a crash mid-write) is
/// skipped with a warning.
pub fn read(layout: &Layout) -> io::Result<Vec<Entry>> {
    let text = match fs::read_to_string(path(layout)) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .filter_map(|(i, l)| match serde_json::from_str(l) {
            Ok(entry) => Some(entry),
            Err(e) => {
                warn!(
                    "{}:{}: skipping a line that does not parse: {e}",
                    path(layout).display(),
                    i + 1
                );
                None
            }
        })
        .collect())
}

/// The notification hook, when `CVX_UPGRADE_HOOK` names one.
#[derive(Debug, Clone)]
pub struct Hook {
    pub program: PathBuf,
    pub timeout: Duration,
    /// One run at a time, in the order they were asked for (tokio's mutex is fair): `detected`
    /// is delivered before `failed` even when the upgrade fails while it runs.
    pub turn: std::sync::Arc<tokio::sync::Mutex<()>>,
}

/// What the hook gets on stdin.
#[derive(Debug, Clone, Serialize)]
pub struct Event<'a> {
    /// `detected`, `done` or `failed`.
    pub event: &'static str,
    pub home: &'a Path,
    pub daemon: &'a str,
    #[serde(flatten)]
    pub entry: &'a Entry,
}

impl Hook {
    /// Run the hook with `event` on stdin; kill it past the timeout. Errors are logged, never
    /// returned: a broken notifier must not change what happens to the node.
    pub async fn run(&self, event: &Event<'_>) {
        let _turn = self.turn.lock().await;
        let json = match serde_json::to_vec(event) {
            Ok(json) => json,
            Err(e) => {
                warn!("cannot encode the {} event for the hook: {e}", event.event);
                return;
            }
        };
        let spawned = tokio::process::Command::new(&self.program)
            .arg(event.event)
            .stdin(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                warn!(
                    "CVX_UPGRADE_HOOK {} could not be run for {}: {e}",
                    self.program.display(),
                    event.event
                );
                return;
            }
        };
        let work = async {
            if let Some(mut stdin) = child.stdin.take() {
                // A hook that does not read its stdin is its own business.
                let _ = stdin.write_all(&json).await;
            }
            child.wait().await
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(Ok(status)) if status.success() => {
                debug!("CVX_UPGRADE_HOOK ran for {}", event.event)
            }
            Ok(Ok(status)) => warn!(
                "CVX_UPGRADE_HOOK {} failed for {} ({status}); the upgrade goes on regardless",
                self.program.display(),
                event.event
            ),
            Ok(Err(e)) => warn!("CVX_UPGRADE_HOOK {}: {e}", self.program.display()),
            Err(_) => {
                let _ = child.kill().await;
                warn!(
                    "CVX_UPGRADE_HOOK {} did not finish within {} for {}; killed it",
                    self.program.display(),
                    crate::duration::show(self.timeout),
                    event.event
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_append_and_read_back_and_a_torn_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        assert_eq!(read(&layout).unwrap(), Vec::new());
        let entry = Entry {
            upgrade: "v2".into(),
            height: 10,
            trigger: "governance".into(),
            detected_at: timestamp(SystemTime::UNIX_EPOCH),
            started_at: None,
            downtime_ms: None,
            backup: None,
            result: "failed".into(),
            error: Some("no binary".into()),
        };
        append(&layout, &entry).unwrap();
        fs::OpenOptions::new()
            .append(true)
            .open(path(&layout))
            .unwrap()
            .write_all(b"{\"upgrade\":\"v3\",\"hei")
            .unwrap();
        assert_eq!(read(&layout).unwrap(), vec![entry.clone()]);
        append(&layout, &entry).unwrap();
        assert_eq!(read(&layout).unwrap(), vec![entry.clone(), entry.clone()]);
        assert_eq!(entry.detected_at, "1970-01-01T00:00:00.000Z");
    }
}
