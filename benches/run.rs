//! `cvx run`: time from `data/upgrade-info.json` written to the new daemon's exec, and the
//! supervisor's memory while the daemon runs (DESIGN §7; README "Benchmarks").
//!
//! Run with `scripts/bench-run`. One `cvx run` (release build) supervises simnode through a chain
//! of upgrades v1 → v2 → … → v12 with Cosmovisor's defaults except DAEMON_SHUTDOWN_GRACE unset
//! (SIGKILL at once) and UNSAFE_SKIP_BACKUP=true; DAEMON_POLL_INTERVAL keeps its 300ms default,
//! so the speed comes from file events.
//!
//! How it is measured, per upgrade:
//! - t0, written: the mtime of `data/upgrade-info.json`, read right after simnode closes the file
//!   (seen by an inotify watch of our own). The kernel stamps mtimes from its coarse clock, which
//!   runs up to one tick (4 ms at HZ=250) behind, and simnode writes the file in two halves 1 ms
//!   apart: the mtime is at or before the end of the write, so `exec - mtime` never flatters cvx.
//!   The time our own watch saw the close is given as the other bound (at or after the write).
//! - t1, exec: the staged "binary" is a wrapper script whose first action, for `start` only, is
//!   `date +%s%N >> stamps/<version>`, before it execs simnode. t1 therefore also includes the
//!   start of `/bin/sh` and one run of `date`; that overhead is measured on its own and printed,
//!   and is not subtracted.
//!
//! Scenarios (`CVX_BENCH_SCENARIOS=plain,rpc,receipts,metrics` picks some; all run by default):
//! - plain: the setup; no node RPC, and staged binaries without receipts (nothing to hash).
//! - rpc: the node's RPC answers at config.toml's `[rpc] laddr`, as on a production node; cvx asks
//!   it for the height before it stops the node.
//! - receipts: every staged binary is 100 MiB (the script, then a sparse tail the shell never
//!   reads) with a receipt as `cvx apply` writes it, so cvx hashes it before switching, as it does
//!   for binaries it staged itself.
//! - metrics: as rpc, with metrics on: CVX_MANIFEST pins every version (and a staged v13, the next
//!   upgrade once v12 runs), CVX_METRICS_ADDR is served, and /metrics is scraped every 250 ms
//!   while the memory is measured (a Prometheus scrapes every 15 s or more).
//!
//! Each goal is judged in every scenario; the summary prints one line per metric.
//!
//! The memory: VmRSS (and VmHWM, the peak) of the cvx process itself, not of the daemon, read from
//! /proc while the last daemon runs, after the last upgrade has settled; with cvx's CPU use over
//! the same 1.5 s, which should be near zero for a supervisor that waits on events.
//!
//! `CVX_BENCH_CVX=/path/to/cvx` measures another build of cvx (simnode stays this package's).
//!
//! Exits 0 unless something broke (a daemon not started, cvx exiting early, a timeout); whether
//! the goals are met is printed, not turned into an exit code.

use std::fs;
use std::io::Write as _;
use std::mem::MaybeUninit;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use rustix::fs::inotify;
use rustix::process::{Pid, Signal};

/// The cvx under test: this package's release build, or `CVX_BENCH_CVX` (another build to compare).
fn cvx_path() -> PathBuf {
    std::env::var_os("CVX_BENCH_CVX")
        .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_cvx")), PathBuf::from)
}
const SIMNODE: &str = env!("CARGO_BIN_EXE_simnode");
const DAEMON: &str = "simd";
/// v1 is genesis; every later version is one upgrade.
const LAST_VERSION: u32 = 12;
const BLOCK_TIME: &str = "20ms";
/// Blocks between upgrades: upgrade to v(N+1) is planned at height 10·N.
const BLOCKS_PER_VERSION: u64 = 10;
/// How long the last daemon runs under cvx before its memory is read.
const SETTLE: Duration = Duration::from_millis(1500);
const SCENARIO_DEADLINE: Duration = Duration::from_secs(60);
const LATENCY_GOAL_MS: f64 = 20.0;
const RSS_GOAL_KIB: u64 = 8 * 1024;
/// Size of the staged binaries in the receipts scenario (a Cosmos SDK node is 100-200 MB).
const BINARY_MIB: u64 = 100;
const CALIBRATION_RUNS: usize = 21;
/// How often the metrics scenario scrapes /metrics while it measures the memory.
const SCRAPE_EVERY: Duration = Duration::from_millis(250);

#[path = "support/mod.rs"]
mod support;

use support::{
    Result, cpu_model, cvx_run_start, free_port, load_average, now_ns, percentile, read_stamps,
    rpc_config, write_executable,
};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-run: error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Scenario {
    /// The issue's: no RPC, nothing to hash.
    Plain,
    /// The node's RPC answers; cvx checks the height before it acts.
    Rpc,
    /// cvx receipts for BINARY_MIB MiB staged binaries; cvx hashes each before switching.
    Receipts,
    /// As Rpc, with CVX_MANIFEST and CVX_METRICS_ADDR, scraped while the memory is measured.
    Metrics,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Plain => "plain",
            Scenario::Rpc => "rpc",
            Scenario::Receipts => "receipts",
            Scenario::Metrics => "metrics",
        }
    }

    fn describe(self) -> String {
        match self {
            Scenario::Plain => "no node RPC, no receipts (the goal's setup)".into(),
            Scenario::Rpc => {
                "node RPC answering /status (cvx asks it before stopping the node)".into()
            }
            Scenario::Receipts => {
                format!("cvx receipts for {BINARY_MIB} MiB binaries (hashed before the switch)")
            }
            Scenario::Metrics => format!(
                "as rpc, with CVX_MANIFEST and CVX_METRICS_ADDR; /metrics scraped every {} ms",
                SCRAPE_EVERY.as_millis()
            ),
        }
    }
}

/// One upgrade's timeline, in Unix nanoseconds.
struct Sample {
    version: u32,
    /// mtime of data/upgrade-info.json as simnode left it.
    mtime: i128,
    /// When our inotify watch read the IN_CLOSE_WRITE of that write.
    seen: i128,
    /// The new daemon's first action (wrapper's `date +%s%N`).
    exec: i128,
}

struct Memory {
    /// CPU time cvx used while the last daemon ran (SETTLE), as a percentage of one core.
    idle_cpu_percent: f64,
    rss_kib: u64,
    hwm_kib: u64,
    anon_kib: u64,
    file_kib: u64,
    threads: u64,
}

struct Outcome {
    samples: Vec<Sample>,
    memory: Memory,
    wall: Duration,
}

fn run() -> Result<()> {
    let cvx = cvx_path();
    let cvx_size = fs::metadata(&cvx)
        .map_err(|e| format!("{}: {e}", cvx.display()))?
        .len();
    println!(
        "cvx run benchmark: {} upgrades in one `cvx run` (v1 -> v{LAST_VERSION}), simnode {BLOCK_TIME} blocks, {BLOCKS_PER_VERSION} blocks per version",
        LAST_VERSION - 1
    );
    println!(
        "cvx: {} ({:.1} MiB{})",
        cvx.display(),
        cvx_size as f64 / (1 << 20) as f64,
        if std::env::var_os("CVX_BENCH_CVX").is_some() {
            ", from CVX_BENCH_CVX"
        } else {
            ", release profile"
        }
    );
    println!(
        "env: DAEMON_SHUTDOWN_GRACE unset (SIGKILL at once), UNSAFE_SKIP_BACKUP=true, DAEMON_POLL_INTERVAL unset (300ms)"
    );
    println!(
        "cpu: {} x {}",
        thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model()
    );

    let overhead = calibrate()?;
    println!(
        "stamp overhead (spawn of the wrapper to its `date +%s%N`, median of {CALIBRATION_RUNS}): {:.2} ms; included in every latency below, not subtracted",
        ms(overhead)
    );
    let pre = pre_upgrade_cost()?;
    println!(
        "`<new binary> pre-upgrade` alone (sh + simnode, spawn to exit, median of {}): {:.2} ms; part of every latency below",
        LAST_VERSION - 1,
        ms(pre)
    );

    let mut results = Vec::new();
    for scenario in scenarios()? {
        println!();
        println!(
            "scenario {}: {} (load average before: {})",
            scenario.name(),
            scenario.describe(),
            load_average()
        );
        let outcome = scenario_run(scenario)?;
        report(&outcome);
        results.push((scenario, outcome));
    }

    println!();
    // One line per metric; each goal is judged in every scenario that ran.
    println!(
        "summary (command: scripts/bench-run; latency = mtime of upgrade-info.json -> new daemon's exec)"
    );
    let line = |each: &dyn Fn(&Outcome) -> String| -> String {
        results
            .iter()
            .map(|(scenario, outcome)| format!("{} {}", scenario.name(), each(outcome)))
            .collect::<Vec<_>>()
            .join(" | ")
    };
    println!(
        "upgrade latency p50 (goal <= {LATENCY_GOAL_MS:.0} ms, {} upgrades each): {}",
        LAST_VERSION - 1,
        line(&|o| {
            let lat = latencies(&o.samples, |s| s.mtime);
            let p50 = percentile(&lat, 50.0);
            format!(
                "{:.1} ms {} (p90 {:.1}, max {:.1})",
                p50 / 1e6,
                verdict(p50 <= LATENCY_GOAL_MS * 1e6),
                percentile(&lat, 90.0) / 1e6,
                percentile(&lat, 100.0) / 1e6
            )
        })
    );
    println!(
        "supervisor VmRSS while the daemon runs (goal <= {} MiB): {}",
        RSS_GOAL_KIB / 1024,
        line(&|o| {
            let m = &o.memory;
            format!(
                "{:.2} MiB {} (peak VmHWM {:.2})",
                m.rss_kib as f64 / 1024.0,
                verdict(m.rss_kib <= RSS_GOAL_KIB),
                m.hwm_kib as f64 / 1024.0
            )
        })
    );
    println!(
        "supervisor CPU while the daemon runs (no goal; an idle supervisor should be near 0%): {}",
        line(&|o| format!("{:.0}%", o.memory.idle_cpu_percent))
    );
    println!(
        "for comparison: Cosmovisor polls upgrade-info.json every 300 ms by default, so it notices an upgrade ~150 ms after the write on average (from its design; not measured here)"
    );
    Ok(())
}

/// The scenarios to run: all, or those named in `CVX_BENCH_SCENARIOS` (comma-separated).
fn scenarios() -> Result<Vec<Scenario>> {
    let all = [
        Scenario::Plain,
        Scenario::Rpc,
        Scenario::Receipts,
        Scenario::Metrics,
    ];
    let Some(wanted) = std::env::var_os("CVX_BENCH_SCENARIOS") else {
        return Ok(all.to_vec());
    };
    let wanted = wanted.to_string_lossy().into_owned();
    wanted
        .split(',')
        .map(str::trim)
        .filter(|w| !w.is_empty())
        .map(|w| {
            all.iter().copied().find(|s| s.name() == w).ok_or_else(|| {
                format!(
                    "CVX_BENCH_SCENARIOS: unknown scenario {w:?} (known: plain, rpc, receipts, metrics)"
                )
            })
        })
        .collect()
}

fn verdict(met: bool) -> &'static str {
    if met { "MET" } else { "NOT MET" }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

// ---------------------------------------------------------------------------------------------
// the staged tree

/// The wrapper staged as version `n`'s binary: it stamps its start (for `start` only; cvx also
/// runs it for `pre-upgrade`), then execs simnode planning the upgrade to v(n+1).
fn wrapper(stamps: &Path, n: u32, rpc: bool) -> String {
    let mut sim =
        format!("--sim-version v{n}.0.0 --sim-handlers v{n} --sim-block-time {BLOCK_TIME}");
    if n < LAST_VERSION {
        sim.push_str(&format!(
            " --sim-upgrade v{}@{}",
            n + 1,
            BLOCKS_PER_VERSION * u64::from(n)
        ));
    }
    if rpc {
        sim.push_str(" --sim-rpc");
    }
    format!(
        "#!/bin/sh\nif [ \"$1\" = start ]; then date +%s%N >> '{}/v{n}'; fi\nexec '{SIMNODE}' {sim} \"$@\"\n",
        stamps.display()
    )
}

/// A receipt as `cvx apply` writes it, so `cvx run` hashes the binary before switching to it.
fn write_receipt(layout: &cvx::tree::Layout, rel: &str) -> Result<()> {
    let path = layout.root().join(rel);
    let (sha256, size) = cvx::hash::sha256_file(&path)
        .map_err(|e| format!("cannot hash {}: {e}", path.display()))?;
    let meta = fs::metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let receipt = cvx::receipt::Receipt {
        path: rel.to_string(),
        sha256: sha256.clone(),
        size,
        source_url: format!("file://{}", path.display()),
        source_sha256: sha256,
        member: None,
        identity: cvx::receipt::FileIdentity::of(&meta),
    };
    cvx::receipt::write(&layout.receipts(), &receipt, None)
        .map_err(|e| format!("cannot write the receipt of {rel}: {e}"))
}

/// The metrics scenario's manifest (genesis v1, upgrades v2..v13 at their heights, pinned to
/// `pins`) in `dir`, and a free loopback address for CVX_METRICS_ADDR.
fn metrics_setup(dir: &Path, pins: &[String]) -> Result<(PathBuf, String)> {
    let platform = cvx::cli::host_platform();
    let pin = |n: usize| {
        format!(
            "binary.\"{platform}\" = {{ url = \"https://example.org/v{}\", sha256 = \"{}\" }}\n",
            n + 1,
            pins[n]
        )
    };
    let mut text = format!(
        "[chain]\nid = \"bench-1\"\ndaemon = \"{DAEMON}\"\n[genesis]\n{}",
        pin(0)
    );
    for n in 1..pins.len() {
        text.push_str(&format!(
            "[[upgrade]]\nname = \"v{}\"\nheight = {}\n{}",
            n + 1,
            // v13 is never reached: the node runs v12 while the memory is measured.
            if n + 1 > LAST_VERSION as usize {
                1_000_000
            } else {
                BLOCKS_PER_VERSION * n as u64
            },
            pin(n)
        ));
    }
    let manifest = dir.join("cvx.toml");
    fs::write(&manifest, text).map_err(|e| format!("cannot write {}: {e}", manifest.display()))?;
    Ok((manifest, format!("127.0.0.1:{}", free_port()?)))
}

/// GET /metrics over plain HTTP/1.1; the body of a 200.
fn scrape(addr: &str) -> Result<String> {
    use std::io::Read as _;
    let mut stream =
        std::net::TcpStream::connect(addr).map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("cannot send to {addr}: {e}"))?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| format!("cannot read from {addr}: {e}"))?;
    match response.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200 ") => Ok(body.to_string()),
        _ => Err(format!("GET http://{addr}/metrics: {response}")),
    }
}

// ---------------------------------------------------------------------------------------------
// calibration

/// Median time from spawning a wrapper to its `date +%s%N`: what t1 adds to the true exec.
fn calibrate() -> Result<Duration> {
    let dir = tempfile::tempdir().map_err(|e| format!("cannot make a temp dir: {e}"))?;
    let stamps = dir.path().join("stamps");
    fs::create_dir_all(&stamps).map_err(|e| format!("{}: {e}", stamps.display()))?;
    let script = dir.path().join("calibrate");
    write_executable(
        &script,
        &format!(
            "#!/bin/sh\nif [ \"$1\" = start ]; then date +%s%N >> '{}/v0'; fi\nexit 0\n",
            stamps.display()
        ),
        None,
    )?;
    let mut overheads = Vec::new();
    for _ in 0..CALIBRATION_RUNS {
        let _ = fs::remove_file(stamps.join("v0"));
        let before = now_ns();
        let status = Command::new(&script)
            .arg("start")
            .status()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if !status.success() {
            return Err(format!("{} failed: {status}", script.display()));
        }
        let stamp = read_stamps(&stamps.join("v0"))?;
        overheads.push((stamp[0] - before) as f64);
    }
    Ok(Duration::from_nanos(percentile(&overheads, 50.0) as u64))
}

/// Median time of `<binary> pre-upgrade` on its own, as cvx runs it between stop and start.
fn pre_upgrade_cost() -> Result<Duration> {
    let dir = tempfile::tempdir().map_err(|e| format!("cannot make a temp dir: {e}"))?;
    let mut times = Vec::new();
    for n in 2..=LAST_VERSION {
        let script = dir.path().join(format!("v{n}"));
        write_executable(&script, &wrapper(dir.path(), n, false), None)?;
        let start = Instant::now();
        let status = Command::new(&script)
            .arg("pre-upgrade")
            .env("DAEMON_HOME", dir.path())
            .stdout(Stdio::null())
            .status()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        times.push(start.elapsed().as_nanos() as f64);
        if !status.success() {
            return Err(format!("{} pre-upgrade failed: {status}", script.display()));
        }
    }
    Ok(Duration::from_nanos(percentile(&times, 50.0) as u64))
}

// ---------------------------------------------------------------------------------------------
// one chain of upgrades under one cvx run

/// What our own inotify watch saw of each complete upgrade-info.json: (plan name, seen, mtime).
type Written = (String, i128, i128);

fn scenario_run(scenario: Scenario) -> Result<Outcome> {
    let dir = tempfile::tempdir().map_err(|e| format!("cannot make a temp dir: {e}"))?;
    let home = dir.path().join("home");
    let stamps = dir.path().join("stamps");
    let data = home.join("data");
    for d in [&stamps, &data] {
        fs::create_dir_all(d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
    }
    let layout = cvx::tree::Layout::new(&home);
    let rpc = matches!(scenario, Scenario::Rpc | Scenario::Metrics);
    // The metrics scenario's manifest also pins (and the tree stages) v13: the next upgrade once
    // v12 runs, judged while the memory is measured.
    let staged_versions = if scenario == Scenario::Metrics {
        LAST_VERSION + 1
    } else {
        LAST_VERSION
    };
    let mut pins = Vec::new();
    for n in 1..=staged_versions {
        let stage = if n == 1 {
            cvx::tree::GENESIS.to_string()
        } else {
            cvx::tree::upgrade_dir(&format!("v{n}"), true)
        };
        let rel = format!("{stage}/bin/{DAEMON}");
        let size = (scenario == Scenario::Receipts).then_some(BINARY_MIB << 20);
        let script = wrapper(&stamps, n, rpc);
        write_executable(&layout.root().join(&rel), &script, size)?;
        pins.push(
            cvx::hash::sha256_reader(script.as_bytes())
                .map_err(|e| format!("cannot hash v{n}: {e}"))?
                .0,
        );
        if scenario == Scenario::Receipts && n > 1 {
            write_receipt(&layout, &rel)?;
        }
    }
    std::os::unix::fs::symlink(cvx::tree::GENESIS, layout.current())
        .map_err(|e| format!("cannot link current: {e}"))?;
    if rpc {
        rpc_config(&home)?;
    }

    let metrics = if scenario == Scenario::Metrics {
        Some(metrics_setup(dir.path(), &pins)?)
    } else {
        None
    };

    let (written_tx, written_rx) = mpsc::channel::<Written>();
    let observer = watch_upgrade_info(&data, written_tx)?;

    // All of cvx in the page cache, as on a host where it has run before: the kernel maps cached
    // pages around each page fault, so how much of the binary is cached moves RSS by ~1 MiB.
    fs::read(cvx_path()).map_err(|e| format!("cannot read {}: {e}", cvx_path().display()))?;
    let log_path = dir.path().join("cvx.log");
    let log = fs::File::create(&log_path)
        .map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
    let started = Instant::now();
    let mut command = cvx_run_start(&cvx_path(), &home, DAEMON);
    command.env("UNSAFE_SKIP_BACKUP", "true");
    if let Some((manifest, addr)) = &metrics {
        command
            .env("CVX_MANIFEST", manifest)
            .env("CVX_METRICS_ADDR", addr);
    }
    let child = command
        .stdin(Stdio::null())
        .stdout(
            log.try_clone()
                .map_err(|e| format!("cannot share the log: {e}"))?,
        )
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", cvx_path().display()))?;
    let mut cvx = Supervisor {
        child,
        log: log_path,
    };

    // Wait for the last daemon, keeping an eye on cvx.
    let last = stamps.join(format!("v{LAST_VERSION}"));
    while !last.exists() {
        if started.elapsed() > SCENARIO_DEADLINE {
            return Err(cvx.failure(&format!(
                "v{LAST_VERSION} did not start within {SCENARIO_DEADLINE:?}"
            )));
        }
        if let Ok(Some(status)) = cvx.child.try_wait() {
            return Err(cvx.failure(&format!("cvx exited early ({status})")));
        }
        thread::sleep(Duration::from_millis(10));
    }
    let wall = started.elapsed();
    // Let the last upgrade settle, then watch cvx supervise a running daemon.
    thread::sleep(Duration::from_millis(200));
    let pid = cvx.child.id();
    let (cpu_before, since) = (cpu_ticks(pid).map_err(|e| cvx.failure(&e))?, Instant::now());
    match &metrics {
        // A Prometheus scraping (far more often than one would), then the memory.
        Some((_, addr)) => {
            while since.elapsed() < SETTLE {
                let body = scrape(addr).map_err(|e| cvx.failure(&e))?;
                let upgrades = format!(
                    "cvx_upgrades_total{{result=\"success\"}} {}\n",
                    LAST_VERSION - 1
                );
                if !body.contains(&upgrades)
                    || !body.contains("cvx_upgrade_next_ready{name=\"v13\"}")
                {
                    return Err(cvx.failure(&format!(
                        "/metrics lacks {upgrades:?} or v13's readiness:\n{body}"
                    )));
                }
                thread::sleep(SCRAPE_EVERY);
            }
        }
        None => thread::sleep(SETTLE),
    }
    if let Ok(Some(status)) = cvx.child.try_wait() {
        return Err(cvx.failure(&format!("cvx exited while the last daemon ran ({status})")));
    }
    let cpu = (cpu_ticks(pid).map_err(|e| cvx.failure(&e))? - cpu_before) as f64 / CLOCK_TICKS;
    let cpu_percent = 100.0 * cpu / since.elapsed().as_secs_f64();
    let memory = memory(pid, cpu_percent).map_err(|e| cvx.failure(&e))?;

    // SIGTERM goes to the daemon through cvx; simnode flushes and exits 0, and so does cvx.
    let status = cvx.stop().map_err(|e| cvx.failure(&e))?;
    if !status.success() {
        return Err(cvx.failure(&format!(
            "cvx exited with {status} after SIGTERM, expected 0"
        )));
    }
    let applied = fs::read_to_string(data.join("applied")).unwrap_or_default();
    let expected: Vec<String> = (2..=LAST_VERSION).map(|n| format!("v{n}")).collect();
    if applied.lines().collect::<Vec<_>>() != expected {
        return Err(cvx.failure(&format!(
            "data/applied lists {:?}, expected {expected:?}",
            applied.lines().collect::<Vec<_>>()
        )));
    }
    let mut execs = Vec::new();
    for n in 2..=LAST_VERSION {
        let exec = read_stamps(&stamps.join(format!("v{n}")))?;
        if exec.len() != 1 {
            return Err(cvx.failure(&format!("v{n} started {} times, expected once", exec.len())));
        }
        execs.push((n, exec[0]));
    }
    drop(dir); // removes the watched directory: the observer sees IN_IGNORED and ends
    observer
        .join()
        .map_err(|_| "the inotify observer panicked".to_string())??;
    let written: Vec<Written> = written_rx.try_iter().collect();

    let mut samples = Vec::new();
    for (n, exec) in execs {
        let name = format!("v{n}");
        let Some((_, seen, mtime)) = written.iter().rev().find(|(plan, _, _)| *plan == name) else {
            return Err(format!(
                "the write of upgrade-info.json for {name} was not seen"
            ));
        };
        samples.push(Sample {
            version: n,
            mtime: *mtime,
            seen: *seen,
            exec,
        });
    }
    Ok(Outcome {
        samples,
        memory,
        wall,
    })
}

/// Watch `data/` and report every complete write of upgrade-info.json (its IN_CLOSE_WRITE) with
/// the time we saw it and its mtime then. Ends when the directory is removed.
fn watch_upgrade_info(
    data: &Path,
    tx: mpsc::Sender<Written>,
) -> Result<thread::JoinHandle<Result<()>>> {
    let fd = inotify::init(inotify::CreateFlags::CLOEXEC).map_err(|e| format!("inotify: {e}"))?;
    inotify::add_watch(&fd, data, inotify::WatchFlags::CLOSE_WRITE)
        .map_err(|e| format!("cannot watch {}: {e}", data.display()))?;
    let file = data.join("upgrade-info.json");
    Ok(thread::spawn(move || {
        let mut buf = [MaybeUninit::uninit(); 4096];
        let mut reader = inotify::Reader::new(&fd, &mut buf);
        loop {
            let event = match reader.next() {
                Ok(event) => event,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(format!("inotify read: {e}")),
            };
            let seen = now_ns();
            if event.events().contains(inotify::ReadFlags::IGNORED) {
                return Ok(());
            }
            if event
                .file_name()
                .is_none_or(|n| n.to_bytes() != b"upgrade-info.json")
            {
                continue;
            }
            // Read before the next halt rewrites it: that is BLOCKS_PER_VERSION blocks away.
            let Ok(meta) = fs::metadata(&file) else {
                continue;
            };
            let Ok(bytes) = fs::read(&file) else { continue };
            let name = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.get("name").and_then(|n| n.as_str()).map(String::from))
                .unwrap_or_default();
            let mtime = i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec());
            let _ = tx.send((name, seen, mtime));
        }
    }))
}

/// USER_HZ, the unit of utime and stime in /proc/<pid>/stat (100 on every Linux architecture
/// Rust supports).
const CLOCK_TICKS: f64 = 100.0;

/// utime + stime of every thread of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    // Fields after the command (which may hold spaces) start at field 3, `state`.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    match (field(14), field(15)) {
        (Some(utime), Some(stime)) => Ok(utime + stime),
        _ => Err(format!("{path}: no utime and stime")),
    }
}

fn memory(pid: u32, idle_cpu_percent: f64) -> Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{path} has no {name}"))
    };
    Ok(Memory {
        idle_cpu_percent,
        rss_kib: field("VmRSS")?,
        hwm_kib: field("VmHWM")?,
        anon_kib: field("RssAnon")?,
        file_kib: field("RssFile")?,
        threads: field("Threads")?,
    })
}

/// The cvx process; killed with its daemon whatever happens.
struct Supervisor {
    child: Child,
    log: PathBuf,
}

impl Supervisor {
    /// SIGTERM to cvx, which forwards it; its exit status.
    fn stop(&mut self) -> Result<std::process::ExitStatus> {
        signal(self.child.id(), Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self
                .child
                .try_wait()
                .map_err(|e| format!("cannot wait for cvx: {e}"))?
            {
                return Ok(status);
            }
            if Instant::now() > deadline {
                return Err("cvx did not exit within 10 s of SIGTERM".into());
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The error, with the end of cvx's log.
    fn failure(&self, what: &str) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(
            "{what}\n--- the last lines cvx and the daemon wrote ---\n{}",
            tail.join("\n")
        )
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // The daemon runs in a process group of its own: a SIGKILL to cvx would orphan it.
            let daemons = children(self.child.id());
            signal(self.child.id(), Signal::KILL);
            for pid in daemons {
                if let Some(pid) = Pid::from_raw(pid as i32) {
                    let _ = rustix::process::kill_process_group(pid, Signal::KILL);
                }
            }
            let _ = self.child.wait();
        }
    }
}

fn signal(pid: u32, sig: Signal) {
    if let Some(pid) = Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// Child processes of `pid`, from /proc/*/stat.
fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                })
                == Some(pid)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// results

/// `exec - t0` for every sample, in nanoseconds, t0 chosen by `from`.
fn latencies(samples: &[Sample], from: impl Fn(&Sample) -> i128) -> Vec<f64> {
    samples.iter().map(|s| (s.exec - from(s)) as f64).collect()
}

fn report(outcome: &Outcome) {
    println!(
        "  upgrade   mtime->exec   seen->exec   (ms; mtime = upper bound, seen by our watch = lower bound)"
    );
    for s in &outcome.samples {
        println!(
            "  v{:<2}->v{:<2} {:>11.2} {:>12.2}",
            s.version - 1,
            s.version,
            (s.exec - s.mtime) as f64 / 1e6,
            (s.exec - s.seen) as f64 / 1e6
        );
    }
    for (label, from) in [
        ("mtime->exec", (|s: &Sample| s.mtime) as fn(&Sample) -> i128),
        ("seen->exec ", |s: &Sample| s.seen),
    ] {
        let lat = latencies(&outcome.samples, from);
        println!(
            "  {label}: p50 {:.2} ms, p90 {:.2} ms, max {:.2} ms, mean {:.2} ms (n={})",
            percentile(&lat, 50.0) / 1e6,
            percentile(&lat, 90.0) / 1e6,
            percentile(&lat, 100.0) / 1e6,
            lat.iter().sum::<f64>() / lat.len() as f64 / 1e6,
            lat.len()
        );
    }
    let m = &outcome.memory;
    println!(
        "  cvx memory with v{LAST_VERSION} running: VmRSS {} KiB ({:.2} MiB: anon {} KiB, file {} KiB), VmHWM {} KiB ({:.2} MiB), {} threads",
        m.rss_kib,
        m.rss_kib as f64 / 1024.0,
        m.anon_kib,
        m.file_kib,
        m.hwm_kib,
        m.hwm_kib as f64 / 1024.0,
        m.threads
    );
    println!(
        "  cvx CPU with v{LAST_VERSION} running: {:.0}% of one core over {:.1} s",
        m.idle_cpu_percent,
        SETTLE.as_secs_f64()
    );
    println!(
        "  chain took {:.2} s from cvx start to v{LAST_VERSION}'s exec",
        outcome.wall.as_secs_f64()
    );
}
