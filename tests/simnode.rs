//! The simulated node behaves towards a supervisor like a real Cosmos SDK node.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const SIMNODE: &str = env!("CARGO_BIN_EXE_simnode");
const DEADLINE: Duration = Duration::from_secs(20);
const BLOCK: &str = "10ms";

/// Poll `cond` until it holds or the deadline passes.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn height(home: &Path) -> Option<u64> {
    fs::read_to_string(home.join("data/height"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn applied(home: &Path) -> Vec<String> {
    fs::read_to_string(home.join("data/applied"))
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

fn upgrade_info(home: &Path) -> Option<serde_json::Value> {
    serde_json::from_slice(&fs::read(home.join("data/upgrade-info.json")).ok()?).ok()
}

fn run(sim: &[&str], daemon: &[&str], home: Option<&Path>) -> Output {
    let mut cmd = Command::new(SIMNODE);
    cmd.args(sim).args(daemon).env_remove("DAEMON_HOME");
    if let Some(home) = home {
        cmd.env("DAEMON_HOME", home);
    }
    cmd.output().expect("run simnode")
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} {pid}");
}

/// A running `simnode ... start --home <home>` whose stdout lines are collected.
struct Node {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
}

impl Node {
    fn start(home: &Path, sim: &[&str]) -> Node {
        Self::start_with(home, sim, &[])
    }

    /// `simnode <sim> start --home <home> <extra>`, as a supervisor passes the daemon's args.
    fn start_with(home: &Path, sim: &[&str], extra: &[&str]) -> Node {
        let mut child = Command::new(SIMNODE)
            .args(sim)
            .arg("start")
            .arg("--home")
            .arg(home)
            .args(extra)
            .env_remove("DAEMON_HOME")
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn simnode");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().unwrap();
        let sink = Arc::clone(&lines);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let node = Node {
            child,
            lines,
            reader: Some(reader),
        };
        // Signal handlers are installed before this line is printed.
        node.wait_line("starting node");
        node
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    fn has_line(&self, needle: &str) -> bool {
        self.lines().iter().any(|l| l.contains(needle))
    }

    fn wait_line(&self, needle: &str) {
        wait_for(&format!("a log line containing {needle:?}"), || {
            self.has_line(needle)
        });
    }

    fn committed(&self) -> Vec<u64> {
        self.lines()
            .iter()
            .filter_map(|l| {
                l.strip_prefix("INF committed state height=")?
                    .strip_suffix(" module=state")?
                    .parse()
                    .ok()
            })
            .collect()
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn signal(&self, sig: &str) {
        signal(self.child.id(), sig);
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let mut status = None;
        wait_for("simnode to exit", || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        // Every line it printed has been collected.
        if let Some(reader) = self.reader.take() {
            reader.join().unwrap();
        }
        status.unwrap()
    }

    /// Stop as a supervisor without a shutdown grace does.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Let the node run for a while, to show that something does NOT happen.
fn several_blocks() {
    std::thread::sleep(Duration::from_millis(200));
}

#[test]
fn version_prints_the_version() {
    let out = run(&["--sim-version", "v2.0.0"], &["version"], None);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "v2.0.0\n");
}

#[test]
fn version_through_a_wrapper_script() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("simd");
    fs::write(
        &bin,
        format!("#!/bin/sh\nexec {SIMNODE} --sim-version v3.1.0 --sim-handlers v2,v3 \"$@\"\n"),
    )
    .unwrap();
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new(&bin).arg("version").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "v3.1.0\n");
}

#[test]
fn bad_invocations_exit_2() {
    for (sim, daemon) in [
        (&[][..], &["frobnicate"][..]),
        (&[], &[]),
        (&["--sim-bogus", "1"], &["version"]),
        (&["--sim-block-time", "fast"], &["version"]),
        (&["--sim-upgrade", "v2"], &["version"]),
        (&["--sim-exit-at", "5"], &["version"]),
        (&[], &["start"]),
    ] {
        let out = run(sim, daemon, None);
        assert_eq!(out.status.code(), Some(2), "{sim:?} {daemon:?}");
        assert!(!out.stderr.is_empty(), "{sim:?} {daemon:?}: no message");
    }
}

#[test]
fn pre_upgrade_exit_codes() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let out = run(&[], &["pre-upgrade"], None);
    assert_eq!(out.status.code(), Some(0));
    assert!(!out.stdout.is_empty(), "pre-upgrade prints a line");

    for code in ["1", "30", "31", "7"] {
        let out = run(
            &["--sim-pre-upgrade-exit", code],
            &["pre-upgrade"],
            Some(home),
        );
        assert_eq!(out.status.code(), Some(code.parse().unwrap()));
    }
    // Invocations are counted under $HOME/data.
    let count = fs::read_to_string(home.join("data/sim-pre-upgrade-count")).unwrap();
    assert_eq!(count.trim(), "4");
}

#[test]
fn pre_upgrade_fails_the_first_n_times() {
    let home = tempfile::tempdir().unwrap();
    let sim = [
        "--sim-pre-upgrade-exit",
        "31",
        "--sim-pre-upgrade-fail-times",
        "2",
    ];
    let codes: Vec<_> = (0..4)
        .map(|_| run(&sim, &["pre-upgrade"], Some(home.path())).status.code())
        .collect();
    assert_eq!(codes, [Some(31), Some(31), Some(0), Some(0)]);

    // --home in the daemon args counts in that home.
    let other = tempfile::tempdir().unwrap();
    let home_arg = other.path().to_str().unwrap();
    let codes: Vec<_> = (0..2)
        .map(|_| {
            run(
                &sim,
                &["pre-upgrade", "--home", home_arg],
                Some(home.path()),
            )
            .status
            .code()
        })
        .collect();
    assert_eq!(codes, [Some(31), Some(31)]);
}

#[test]
fn start_makes_blocks_and_persists_height_across_restarts() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let mut node = Node::start(home, &["--sim-block-time", BLOCK]);
    wait_for("height 5", || height(home).is_some_and(|h| h >= 5));
    node.signal("TERM");
    assert_eq!(node.wait_exit().code(), Some(0));
    let stopped = height(home).unwrap();
    let committed = node.committed();
    assert_eq!(committed, (1..=stopped).collect::<Vec<_>>());

    let node = Node::start(home, &["--sim-block-time", BLOCK]);
    assert!(node.has_line(&format!("height={stopped} module=server")));
    wait_for("blocks after the restart", || node.committed().len() >= 2);
    // It resumed where it stopped: the first block it makes is the next one.
    assert_eq!(node.committed()[0], stopped + 1);
}

#[test]
fn sigterm_flushes_then_exits_0() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let mut node = Node::start(home, &["--sim-block-time", BLOCK, "--sim-flush", "300ms"]);
    wait_for("height 3", || height(home).is_some_and(|h| h >= 3));
    let sent = Instant::now();
    node.signal("TERM");
    assert_eq!(node.wait_exit().code(), Some(0));
    assert!(
        sent.elapsed() >= Duration::from_millis(300),
        "exited before the flush delay"
    );
    let flushed = fs::read_to_string(home.join("data/flushed")).unwrap();
    assert_eq!(flushed.trim().parse::<u64>().ok(), height(home));
}

#[test]
fn sigint_exits_0_and_sigkill_just_kills() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let mut node = Node::start(home, &["--sim-block-time", BLOCK]);
    node.signal("INT");
    assert_eq!(node.wait_exit().code(), Some(0));
    assert!(home.join("data/flushed").exists());

    fs::remove_file(home.join("data/flushed")).unwrap();
    let mut node = Node::start(home, &["--sim-block-time", BLOCK, "--sim-flush", "1s"]);
    node.signal("KILL");
    assert_eq!(node.wait_exit().code(), None);
    assert!(!home.join("data/flushed").exists());
}

#[test]
fn halts_at_the_plan_then_a_build_with_the_handler_migrates() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let info = r#"{"binaries":{"any":"https://example.com/v2?checksum=sha256:00"}}"#;
    let plan = format!("v2@8@{info}");
    let v1 = [
        "--sim-version",
        "v1.0.0",
        "--sim-block-time",
        BLOCK,
        "--sim-upgrade",
        &plan,
    ];
    let mut node = Node::start(home, &v1);
    node.wait_line(&format!("ERR UPGRADE \"v2\" NEEDED at height: 8: {info}"));
    assert_eq!(
        upgrade_info(home).unwrap(),
        serde_json::json!({"name": "v2", "time": "0001-01-01T00:00:00Z", "height": 8, "info": info})
    );
    assert_eq!(height(home), Some(8));

    // It stays alive, making no blocks, like a node waiting for its supervisor.
    several_blocks();
    assert!(node.alive(), "a halted node stays alive");
    assert_eq!(height(home), Some(8));
    assert_eq!(node.committed(), (1..=7).collect::<Vec<_>>());
    assert!(applied(home).is_empty());
    node.kill();

    let v2 = [
        "--sim-version",
        "v2.0.0",
        "--sim-handlers",
        "v2",
        "--sim-block-time",
        BLOCK,
        "--sim-upgrade",
        &plan,
    ];
    let node = Node::start(home, &v2);
    node.wait_line("INF applying upgrade \"v2\" at height: 8");
    wait_for("blocks past the upgrade", || node.committed().len() >= 4);
    assert_eq!(applied(home), ["v2"]);
    assert_eq!(node.committed()[..3], [8, 9, 10]);
    assert!(!node.has_line("NEEDED"));
    node.kill();

    // Once applied, neither build halts for it again, and the migration is not re-run.
    let node = Node::start(home, &v2);
    wait_for("more blocks", || node.committed().len() >= 3);
    assert!(node.committed()[0] > 11);
    assert!(!node.has_line("applying upgrade"));
    assert_eq!(applied(home), ["v2"]);
}

#[test]
fn a_build_without_the_handler_halts_again_at_once() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let v1 = ["--sim-block-time", BLOCK, "--sim-upgrade", "v2@4"];
    let node = Node::start(home, &v1);
    node.wait_line("ERR UPGRADE \"v2\" NEEDED at height: 4: ");
    // No INFO: omitted from the JSON, as x/upgrade's `info,omitempty` does.
    assert_eq!(
        upgrade_info(home).unwrap(),
        serde_json::json!({"name": "v2", "time": "0001-01-01T00:00:00Z", "height": 4})
    );
    node.kill();

    // The same build again: it halts at once, never advancing.
    let mut node = Node::start(home, &v1);
    node.wait_line("ERR UPGRADE \"v2\" NEEDED at height: 4");
    several_blocks();
    assert!(node.alive());
    assert!(node.committed().is_empty());
    assert_eq!(height(home), Some(4));
    node.kill();

    // A build for another upgrade, without the schedule: the pending plan comes from
    // upgrade-info.json alone, and it halts at once too (rewriting the file, as x/upgrade does).
    fs::write(home.join("data/upgrade-info.json"), "").unwrap();
    fs::write(
        home.join("data/upgrade-info.json"),
        r#"{"name":"v2","time":"0001-01-01T00:00:00Z","height":"4"}"#,
    )
    .unwrap();
    let mut node = Node::start(home, &["--sim-handlers", "v3", "--sim-block-time", BLOCK]);
    node.wait_line("ERR UPGRADE \"v2\" NEEDED at height: 4");
    several_blocks();
    assert!(node.alive());
    assert!(node.committed().is_empty());
    assert_eq!(height(home), Some(4));
    assert_eq!(upgrade_info(home).unwrap()["height"], 4);

    // SIGTERM while halted is still a graceful shutdown.
    node.signal("TERM");
    assert_eq!(node.wait_exit().code(), Some(0));
    assert_eq!(
        fs::read_to_string(home.join("data/flushed"))
            .unwrap()
            .trim(),
        "4"
    );
}

#[test]
fn a_build_with_the_handler_started_below_the_height_does_not_migrate_early() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let sim = [
        "--sim-handlers",
        "v2",
        "--sim-block-time",
        BLOCK,
        "--sim-upgrade",
        "v2@5",
    ];
    let node = Node::start(home, &sim);
    node.wait_line("ERR UPGRADE \"v2\" NEEDED at height: 5");
    assert!(!node.has_line("applying"));
    assert!(applied(home).is_empty());
    assert_eq!(node.committed(), [1, 2, 3, 4]);
}

#[test]
fn unsafe_skip_upgrades_skips_the_plan() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let sim = ["--sim-block-time", BLOCK, "--sim-upgrade", "v2@3"];
    let node = Node::start_with(home, &sim, &["--unsafe-skip-upgrades", "3"]);
    node.wait_line("UPGRADE \"v2\" SKIPPED at height: 3");
    wait_for("height past the skipped plan", || {
        height(home).is_some_and(|h| h >= 6)
    });
    assert!(!home.join("data/upgrade-info.json").exists());
    assert!(!node.has_line("NEEDED"));
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn write_config(home: &Path, port: u16) {
    fs::create_dir_all(home.join("config")).unwrap();
    fs::write(
        home.join("config/config.toml"),
        format!(
            "moniker = \"sim\"\n\n[rpc]\n\n# TCP address\nladdr = \"tcp://127.0.0.1:{port}\"\n\n[p2p]\nladdr = \"tcp://0.0.0.0:1\"\n"
        ),
    )
    .unwrap();
}

fn http_get(port: u16, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

fn status(port: u16) -> serde_json::Value {
    let (status_line, body) = http_get(port, "/status");
    assert_eq!(status_line, "HTTP/1.1 200 OK");
    serde_json::from_str(&body).unwrap()
}

fn rpc_node(offset: &str) -> (tempfile::TempDir, Node, u16) {
    let home = tempfile::tempdir().unwrap();
    let port = free_port();
    write_config(home.path(), port);
    let sim = [
        "--sim-version",
        "v1.2.3",
        "--sim-block-time",
        BLOCK,
        "--sim-upgrade",
        "v2@6",
        "--sim-rpc",
        "--sim-rpc-height-offset",
        offset,
    ];
    let node = Node::start(home.path(), &sim);
    (home, node, port)
}

#[test]
fn rpc_status_reports_the_height() {
    let (_home, node, port) = rpc_node("0");
    // Halted at 6, so the height is stable.
    node.wait_line("NEEDED at height: 6");
    let status = status(port);
    assert_eq!(status["jsonrpc"], "2.0");
    assert_eq!(status["id"], -1);
    let result = &status["result"];
    assert_eq!(result["node_info"]["network"], "simnet");
    assert_eq!(result["node_info"]["version"], "v1.2.3");
    assert_eq!(result["sync_info"]["latest_block_height"], "6");
    assert_eq!(result["sync_info"]["catching_up"], false);
    let time = result["sync_info"]["latest_block_time"].as_str().unwrap();
    let b = time.as_bytes();
    assert_eq!(b.len(), 30, "{time}");
    assert!(time.starts_with("20") && time.ends_with('Z'), "{time}");
    assert_eq!(
        (b[4], b[7], b[10], b[13], b[16], b[19]),
        (b'-', b'-', b'T', b':', b':', b'.')
    );

    let (status_line, _) = http_get(port, "/abci_info");
    assert_eq!(status_line, "HTTP/1.1 404 Not Found");
}

#[test]
fn rpc_status_follows_the_chain_and_honours_the_offset() {
    let (home, node, port) = rpc_node("2");
    wait_for("the reported height to advance", || {
        status(port)["result"]["sync_info"]["latest_block_height"]
            .as_str()
            .and_then(|h| h.parse::<u64>().ok())
            .is_some_and(|h| h >= 1)
    });
    node.wait_line("NEEDED at height: 6");
    assert_eq!(height(home.path()), Some(6));
    assert_eq!(
        status(port)["result"]["sync_info"]["latest_block_height"],
        "4"
    );
}

#[test]
fn no_rpc_without_a_config() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let node = Node::start(home, &["--sim-block-time", BLOCK, "--sim-rpc"]);
    assert!(node.has_line("rpc disabled"));
    wait_for("blocks", || height(home).is_some_and(|h| h >= 2));
}

#[test]
fn exit_at_exits_with_the_code() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let mut node = Node::start(
        home,
        &["--sim-block-time", BLOCK, "--sim-exit-at", "4", "3"],
    );
    assert_eq!(node.wait_exit().code(), Some(3));
    assert_eq!(height(home), Some(4));
    assert_eq!(node.committed(), [1, 2, 3, 4]);
}

#[test]
fn halt_height_exit_flavour_commits_the_height_and_exits_0() {
    let home = tempfile::tempdir().unwrap();
    let sim = ["--sim-block-time", BLOCK, "--sim-halt", "exit"];
    let mut node = Node::start_with(home.path(), &sim, &["--halt-height", "4"]);
    assert!(node.wait_exit().success());
    assert_eq!(height(home.path()), Some(4));
    assert!(node.has_line("halting node per configuration height=4 halt-height=4"));
    assert_eq!(node.committed().last(), Some(&4));

    // Restarted at the height, it commits one more block and exits again, as some SDKs do.
    let mut node = Node::start_with(home.path(), &sim, &["--halt-height=4"]);
    assert!(node.wait_exit().success());
    assert_eq!(height(home.path()), Some(5));
}

#[test]
fn halt_height_stay_flavour_stays_up_at_the_height_serving_rpc() {
    let home = tempfile::tempdir().unwrap();
    let port = free_port();
    write_config(home.path(), port);
    let sim = ["--sim-block-time", BLOCK, "--sim-rpc"];
    let mut node = Node::start_with(home.path(), &sim, &["--halt-height", "4"]);
    node.wait_line("halt per configuration: refusing block height=5 halt-height=4");
    several_blocks();
    assert!(node.alive(), "it stays up");
    assert_eq!(height(home.path()), Some(4), "and makes no block");
    assert_eq!(
        status(port)["result"]["sync_info"]["latest_block_height"],
        "4"
    );
    node.signal("TERM");
    assert!(node.wait_exit().success());

    // Restarted at the height with the same flag, it halts again at once.
    let node = Node::start_with(home.path(), &sim, &["--halt-height", "4"]);
    node.wait_line("refusing block height=5");
    node.kill();
    assert_eq!(height(home.path()), Some(4));
}
