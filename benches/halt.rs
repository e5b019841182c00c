//! Scheduled upgrades (`trigger = "halt-height"`, DESIGN §5.1): time from the moment the node is
//! known halted at its halt height to the new daemon's exec, for both ways a node halts.
//!
//! Run with `scripts/bench-halt`. One `cvx run start` (release build, `CVX_MANIFEST` pinning every
//! build) supervises simnode through UPGRADES scheduled upgrades (v1 -> v2 -> ...), each at
//! `--halt-height` 5·N with 300 ms blocks, the node's RPC answering and DAEMON_POLL_INTERVAL at
//! 100 ms (cvx reads the RPC that often while a scheduled upgrade is ahead):
//! - exit (SDK <= 0.47): the node commits H and exits. Known halted = the daemon's exit, stamped
//!   by its wrapper script right after simnode returns (`date +%s%N`), just before the shell exits.
//! - stay (SDK 0.50): the node commits H and stays up. Known halted = cvx's own log line "the node
//!   halted at height" (timestamps in rfc3339nano), once three RPC checks in a row saw H.
//!
//! Latency = that moment -> the new daemon's exec (its wrapper's first `date +%s%N`), including
//! the stop, the verification of the pinned binary, the switch and `<new> pre-upgrade`. Goal: p50
//! <= 20 ms, as for governance upgrades. Printed, not enforced.

use std::fs;
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

#[path = "support/mod.rs"]
mod support;

use support::{
    Result, cpu_model, cvx_run_start, load_average, percentile, read_stamps, rpc_config,
    write_executable,
};

const SIMNODE: &str = env!("CARGO_BIN_EXE_simnode");
const CVX: &str = env!("CARGO_BIN_EXE_cvx");
const DAEMON: &str = "simd";
const UPGRADES: u32 = 6;
const BLOCKS_PER_VERSION: u64 = 5;
const BLOCK_TIME: &str = "300ms";
const GOAL_MS: f64 = 20.0;
const DEADLINE: Duration = Duration::from_secs(120);

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-halt: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    println!(
        "scheduled-upgrade benchmark: {UPGRADES} halt-height upgrades in one cvx run, {BLOCK_TIME} blocks, DAEMON_POLL_INTERVAL=100ms"
    );
    println!(
        "cpu: {} x {}; cvx: {CVX}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model()
    );
    let mut lines = Vec::new();
    for flavour in ["exit", "stay"] {
        println!();
        println!(
            "flavour {flavour} (load average before: {})",
            load_average()
        );
        let latencies = flavour_run(flavour)?;
        for (n, ms) in latencies.iter().enumerate() {
            println!("  v{} -> v{}: {ms:.1} ms", n + 1, n + 2);
        }
        let p50 = percentile(&latencies, 50.0);
        lines.push(format!(
            "{flavour} {p50:.1} ms {} (max {:.1})",
            if p50 <= GOAL_MS { "MET" } else { "NOT MET" },
            percentile(&latencies, 100.0)
        ));
    }
    println!();
    println!(
        "summary (command: scripts/bench-halt): known halted -> new daemon's exec, p50 (goal <= {GOAL_MS:.0} ms): {}",
        lines.join(" | ")
    );
    Ok(())
}

fn flavour_run(flavour: &str) -> Result<Vec<f64>> {
    let dir = tempfile::tempdir().map_err(|e| format!("cannot make a temp dir: {e}"))?;
    let home = dir.path().join("home");
    let stamps = dir.path().join("stamps");
    let root = home.join("cosmovisor");
    fs::create_dir_all(&stamps).map_err(|e| format!("{}: {e}", stamps.display()))?;
    rpc_config(&home)?;

    let platform = cvx::cli::host_platform();
    let mut manifest = format!("[chain]\nid = \"bench-1\"\ndaemon = \"{DAEMON}\"\n");
    for n in 1..=UPGRADES + 1 {
        let stage = if n == 1 {
            "genesis".to_string()
        } else {
            format!("upgrades/v{n}")
        };
        let path = root.join(&stage).join("bin").join(DAEMON);
        // Not exec'd: the shell stamps the node's exit before it exits itself.
        let script = format!(
            "#!/bin/sh\nif [ \"$1\" = start ]; then date +%s%N >> '{s}/start-v{n}'; '{SIMNODE}' --sim-version v{n}.0.0 --sim-block-time {BLOCK_TIME} --sim-rpc --sim-chain-id bench-1 --sim-halt {flavour} \"$@\"; code=$?; date +%s%N >> '{s}/exit-v{n}'; exit $code; fi\nexec '{SIMNODE}' --sim-version v{n}.0.0 \"$@\"\n",
            s = stamps.display()
        );
        write_executable(&path, &script, None)?;
        let (sha, _) = cvx::hash::sha256_file(&path).map_err(|e| e.to_string())?;
        let pin = format!(
            "binary.\"{platform}\" = {{ url = \"file://{}\", sha256 = \"{sha}\" }}\n",
            path.display()
        );
        if n == 1 {
            manifest.push_str(&format!("[genesis]\n{pin}"));
        } else {
            manifest.push_str(&format!(
                "[[upgrade]]\nname = \"v{n}\"\nheight = {}\ntrigger = \"halt-height\"\n{pin}",
                BLOCKS_PER_VERSION * u64::from(n - 1)
            ));
        }
    }
    let manifest_path = dir.path().join("cvx.toml");
    fs::write(&manifest_path, manifest).map_err(|e| e.to_string())?;
    std::os::unix::fs::symlink("genesis", root.join("current")).map_err(|e| e.to_string())?;

    let log_path = dir.path().join("cvx.log");
    let log = fs::File::create(&log_path).map_err(|e| e.to_string())?;
    let mut child = cvx_run_start(Path::new(CVX), &home, DAEMON)
        .env("UNSAFE_SKIP_BACKUP", "true")
        .env("DAEMON_POLL_INTERVAL", "100ms")
        .env("COSMOVISOR_TIMEFORMAT_LOGS", "rfc3339nano")
        .env("CVX_MANIFEST", &manifest_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start {CVX}: {e}"))?;
    let last = stamps.join(format!("start-v{}", UPGRADES + 1));
    let started = Instant::now();
    // The stamp written, not just its file created: the shell opens it before `date` writes.
    while !read_stamps(&last).is_ok_and(|s| !s.is_empty()) {
        if started.elapsed() > DEADLINE || child.try_wait().map_err(|e| e.to_string())?.is_some() {
            let _ = child.kill();
            return Err(format!(
                "v{} never started; cvx's log:\n{}",
                UPGRADES + 1,
                fs::read_to_string(&log_path).unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).expect("a pid"),
        rustix::process::Signal::TERM,
    );
    let _ = child.wait();
    let log = fs::read_to_string(&log_path).map_err(|e| e.to_string())?;
    let halted_logs: Vec<i128> = log
        .lines()
        .filter(|l| l.contains("the node halted at height"))
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|t| cvx::time::parse_rfc3339(t).map(|ns| ns as i128))
        .collect();

    let mut latencies = Vec::new();
    for n in 1..=UPGRADES {
        let exec = read_stamps(&stamps.join(format!("start-v{}", n + 1)))?[0];
        let known = if flavour == "exit" {
            read_stamps(&stamps.join(format!("exit-v{n}")))?[0]
        } else {
            *halted_logs
                .get(n as usize - 1)
                .ok_or_else(|| format!("no \"the node halted\" line for v{n} in:\n{log}"))?
        };
        latencies.push((exec - known) as f64 / 1e6);
    }
    Ok(latencies)
}
