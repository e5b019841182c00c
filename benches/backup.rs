//! The upgrade with backups on (DESIGN §5.2; README "Performance"): time from
//! `data/upgrade-info.json` written to the new daemon's exec, beside `cp -a` of the same `data/`.
//!
//! Run with `scripts/bench-backup`. For each size (1 GiB and 2 GiB by default), a home is made
//! with an LSM-shaped `data/`: `application.db/` holding `CURRENT`, a 1 MiB `MANIFEST-000001`,
//! 2 MiB table files (`*.ldb`) up to the size, a 4 MiB write-ahead log and a `LOG`; plus
//! `cs.wal/wal` (1 MiB) and `priv_validator_state.json`. Then, ROUNDS times each:
//! - cvx: one `cvx run start` (release build) supervises simnode, which halts for v2; cvx backs up
//!   `data/` (UNSAFE_SKIP_BACKUP=false, DAEMON_DATA_BACKUP_DIR on the same file system), switches
//!   and starts v2. Latency = mtime of upgrade-info.json -> v2's exec (stamped by its wrapper's
//!   `date +%s%N`), as in benches/run.rs. Twice per round:
//!   - at the halt: upgrade-info.json is cvx's first word of the upgrade (no manifest), so the
//!     whole backup is taken at the halt;
//!   - begun ahead: `CVX_MANIFEST` gives v2's height and the node's RPC answers, so cvx links the
//!     tables while the node runs (10 blocks before) and brings them up to date at the halt.
//! - `cp -a data <copy>` of the same directory, timed from spawn to exit, every file read into the
//!   page cache just before (no fsync; cvx fsyncs every file it copies).
//!
//! The file system is synced (untimed) before each timed operation, so neither pays for the
//! other's writes: cp -a leaves a gigabyte to write back, and setting up a home links every table.
//!
//! Goals (issue 10): cvx's latency <= 5% of `cp -a`, and no more than 1.5x longer when the data
//! doubles. Printed, not enforced. `CVX_BENCH_SIZES_MIB=1024,2048` and `CVX_BENCH_ROUNDS=3`
//! change the sizes and rounds; `CVX_BENCH_TABLE_KIB=2048` the size of a table (small tables give
//! many of them in little space, to see the cost per table in a large directory). Needs Linux, GNU date, cp, and twice the largest size free.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
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
const DEADLINE: Duration = Duration::from_secs(120);
const RATIO_GOAL: f64 = 0.05;
const GROWTH_GOAL: f64 = 1.5;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-backup: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn env_list(name: &str, default: &[u64]) -> Result<Vec<u64>> {
    match std::env::var(name) {
        Err(_) => Ok(default.to_vec()),
        Ok(v) => v
            .split(',')
            .map(|x| {
                x.trim()
                    .parse()
                    .map_err(|_| format!("{name}: not a number: {x:?}"))
            })
            .collect(),
    }
}

fn run() -> Result<()> {
    let sizes = env_list("CVX_BENCH_SIZES_MIB", &[1024, 2048])?;
    let table = (env_list("CVX_BENCH_TABLE_KIB", &[2048])?[0].max(1) << 10) as usize;
    let rounds = env_list("CVX_BENCH_ROUNDS", &[3])?[0].max(1) as usize;
    println!(
        "backup benchmark: upgrade-info.json -> new daemon's exec with backups on, beside `cp -a` of the same data/"
    );
    println!(
        "cpu: {} x {}; cvx: {CVX}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model()
    );
    let mut results = Vec::new();
    for &mib in &sizes {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .map_err(|e| format!("cannot make a temp dir: {e}"))?;
        let data = dir.path().join("data-template");
        let (tables, bytes) = lsm_data(&data, mib, table)?;
        // The template's own writes flushed now, not by whatever syncs next.
        sync()?;
        println!();
        println!(
            "data/: {} MiB in {tables} tables of {} KiB, {:.1} MiB of mutable files (load average: {})",
            bytes.0 >> 20,
            table >> 10,
            bytes.1 as f64 / (1 << 20) as f64,
            load_average()
        );
        let (mut cvx_ms, mut ahead_ms, mut cp_ms) = (Vec::new(), Vec::new(), Vec::new());
        for round in 1..=rounds {
            let cp = cp_a(&data, &dir.path().join(format!("copy-{round}")))?;
            let (latency, log) = upgrade_with_backup(dir.path(), &data, round, false)?;
            let (ahead, ahead_log) = upgrade_with_backup(dir.path(), &data, round, true)?;
            println!(
                "  round {round}: cp -a {:.1} ms; cvx at the halt {:.1} ms ({log}); begun ahead {:.1} ms ({ahead_log})",
                cp.as_secs_f64() * 1e3,
                latency.as_secs_f64() * 1e3,
                ahead.as_secs_f64() * 1e3,
            );
            cvx_ms.push(latency.as_secs_f64() * 1e3);
            ahead_ms.push(ahead.as_secs_f64() * 1e3);
            cp_ms.push(cp.as_secs_f64() * 1e3);
        }
        let cp = percentile(&cp_ms, 50.0);
        let (cvx, ahead) = (percentile(&cvx_ms, 50.0), percentile(&ahead_ms, 50.0));
        println!("  median: cp -a {cp:.1} ms");
        for (how, ms) in [("at the halt", cvx), ("begun ahead", ahead)] {
            println!(
                "  median: cvx {how} {ms:.1} ms: {:.1}% of cp -a (goal <= {:.0}%: {})",
                100.0 * ms / cp,
                100.0 * RATIO_GOAL,
                verdict(ms / cp <= RATIO_GOAL)
            );
        }
        results.push((mib, cvx, ahead, cp));
    }
    if let [
        (small, small_cvx, small_ahead, small_cp),
        ..,
        (large, large_cvx, large_ahead, large_cp),
    ] = results[..]
    {
        println!();
        println!(
            "growth from {small} MiB to {large} MiB: cp -a x{:.2}",
            large_cp / small_cp
        );
        for (how, small, large) in [
            ("at the halt", small_cvx, large_cvx),
            ("begun ahead", small_ahead, large_ahead),
        ] {
            println!(
                "  cvx {how}: x{:.2} (goal <= x{GROWTH_GOAL}: {})",
                large / small,
                verdict(large / small <= GROWTH_GOAL),
            );
        }
    }
    println!("command: scripts/bench-backup");
    Ok(())
}

fn verdict(met: bool) -> &'static str {
    if met { "MET" } else { "NOT MET" }
}

/// An LSM-shaped data directory of about `mib` MiB in tables of `table` bytes; returns (tables,
/// (table bytes, other bytes)).
fn lsm_data(data: &Path, mib: u64, table: usize) -> Result<(usize, (u64, u64))> {
    let db = data.join("application.db");
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e: std::io::Error| format!("cannot write {}: {e}", p.display())
    };
    fs::create_dir_all(&db).map_err(io(&db))?;
    fs::create_dir_all(data.join("cs.wal")).map_err(io(data))?;
    // Table bodies differ from each other, as real tables do.
    let mut block = vec![0u8; table];
    let tables = ((mib << 20) as usize).div_ceil(table);
    for i in 0..tables {
        block[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let path = db.join(format!("{:06}.ldb", i + 10));
        fs::write(&path, &block).map_err(io(&path))?;
    }
    let mutable: [(PathBuf, usize); 6] = [
        (db.join("CURRENT"), 16),
        (db.join("MANIFEST-000001"), 1 << 20),
        (db.join(format!("{:06}.log", tables + 10)), 4 << 20),
        (db.join("LOG"), 64 << 10),
        (data.join("cs.wal/wal"), 1 << 20),
        (data.join("priv_validator_state.json"), 64),
    ];
    let mut other = 0;
    for (path, size) in &mutable {
        fs::write(path, vec![b'm'; *size]).map_err(io(path))?;
        other += *size as u64;
    }
    Ok((tables, ((tables * table) as u64, other)))
}

/// A manifest pinning both builds, with v2's height.
fn write_manifest(path: &Path, genesis: &Path, v2: &Path, height: u64) -> Result<()> {
    let platform = cvx::cli::host_platform();
    let pin = |binary: &Path| -> Result<String> {
        let (sha, _) = cvx::hash::sha256_file(binary).map_err(|e| e.to_string())?;
        Ok(format!(
            "binary.\"{platform}\" = {{ url = \"file://{}\", sha256 = \"{sha}\" }}\n",
            binary.display()
        ))
    };
    let text = format!(
        "[chain]\nid = \"bench-1\"\ndaemon = \"{DAEMON}\"\n[genesis]\n{}[[upgrade]]\nname = \"v2\"\nheight = {height}\n{}",
        pin(genesis)?,
        pin(v2)?
    );
    fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Flush the file system, so the next timed operation does not pay for the last one's writes
/// (cp -a's gigabyte, or the metadata of a home just set up).
fn sync() -> Result<()> {
    let status = Command::new("sync")
        .status()
        .map_err(|e| format!("cannot run sync: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("sync failed: {status}"))
    }
}

/// Read every file under `dir`, so it is in the page cache: the machine may have reclaimed some of
/// it since the last round, and `cp -a` is compared on a warm cache, every round alike.
fn warm(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))? {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.is_dir() {
            warm(&path)?;
        } else {
            let mut file = fs::File::open(&path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            std::io::copy(&mut file, &mut std::io::sink())
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        }
    }
    Ok(())
}

/// `cp -a from to` on a warm cache, timed; the copy is removed afterwards.
fn cp_a(from: &Path, to: &Path) -> Result<Duration> {
    warm(from)?;
    let start = Instant::now();
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .map_err(|e| format!("cannot run cp: {e}"))?;
    let took = start.elapsed();
    if !status.success() {
        return Err(format!("cp -a failed: {status}"));
    }
    fs::remove_dir_all(to).map_err(|e| format!("cannot remove {}: {e}", to.display()))?;
    sync()?;
    Ok(took)
}

/// One upgrade with the backup on, from a fresh home whose data/ is `template` (hard-linked into
/// place, so the setup costs no copy); returns the latency and cvx's backup log line. `ahead`:
/// with a manifest giving the upgrade's height and the node's RPC on, so the backup begins ahead.
fn upgrade_with_backup(
    dir: &Path,
    template: &Path,
    round: usize,
    ahead: bool,
) -> Result<(Duration, String)> {
    let name = format!("{round}{}", if ahead { "-ahead" } else { "" });
    let home = dir.join(format!("home-{name}"));
    let backups = dir.join(format!("backups-{name}"));
    let stamps = dir.join(format!("stamps-{name}"));
    fs::create_dir_all(&stamps).map_err(|e| format!("{}: {e}", stamps.display()))?;
    fs::create_dir_all(&home).map_err(|e| format!("{}: {e}", home.display()))?;
    let linked = Command::new("cp")
        .arg("-al")
        .arg(template)
        .arg(home.join("data"))
        .status()
        .map_err(|e| format!("cannot run cp: {e}"))?;
    if !linked.success() {
        return Err(format!("cp -al of the template failed: {linked}"));
    }
    let root = home.join("cosmovisor");
    // Begun ahead: blocks slow enough for cvx's checks (300 ms) to see the height come near.
    let (height, sim) = if ahead {
        rpc_config(&home)?;
        (
            15,
            "--sim-block-time 100ms --sim-rpc --sim-chain-id bench-1",
        )
    } else {
        (3, "--sim-block-time 20ms")
    };
    // The node works until the halt: its log grows, tables come and go.
    let sim = format!("{sim} --sim-compact application.db");
    let genesis = root.join("genesis/bin").join(DAEMON);
    write_executable(
        &genesis,
        &format!("#!/bin/sh\nexec '{SIMNODE}' {sim} --sim-upgrade v2@{height} \"$@\"\n"),
        None,
    )?;
    let v2 = root.join("upgrades/v2/bin").join(DAEMON);
    write_executable(
        &v2,
        &format!(
            "#!/bin/sh\nif [ \"$1\" = start ]; then date +%s%N >> '{}/v2'; fi\nexec '{SIMNODE}' {sim} --sim-handlers v2 --sim-exit-at {} 0 \"$@\"\n",
            stamps.display(),
            height + 1
        ),
        None,
    )?;
    std::os::unix::fs::symlink("genesis", root.join("current"))
        .map_err(|e| format!("cannot link current: {e}"))?;
    let manifest = dir.join(format!("cvx-{name}.toml"));
    if ahead {
        write_manifest(&manifest, &genesis, &v2, height)?;
    }
    sync()?;
    let log_path = dir.join(format!("cvx-{name}.log"));
    let log = fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
    let mut cvx = cvx_run_start(Path::new(CVX), &home, DAEMON);
    if ahead {
        cvx.env("CVX_MANIFEST", &manifest);
    }
    let mut child = cvx
        .env("UNSAFE_SKIP_BACKUP", "false")
        .env("DAEMON_DATA_BACKUP_DIR", &backups)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start {CVX}: {e}"))?;
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            return Err(format!(
                "cvx did not finish within {DEADLINE:?}; see {}",
                log_path.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = fs::read_to_string(&log_path).unwrap_or_default();
    if !status.success() {
        return Err(format!("cvx exited with {status}:\n{log}"));
    }
    let written = fs::metadata(home.join("data/upgrade-info.json"))
        .map_err(|e| format!("no upgrade-info.json: {e}"))?;
    let written = {
        use std::os::unix::fs::MetadataExt;
        i128::from(written.mtime()) * 1_000_000_000 + i128::from(written.mtime_nsec())
    };
    let exec = read_stamps(&stamps.join("v2"))?;
    let latency = Duration::from_nanos((exec[0] - written).max(0) as u64);
    let line = log
        .lines()
        .find(|l| l.contains("backed up data to"))
        .and_then(|l| l.split_once(" in "))
        .map(|(_, rest)| rest.split(" upgrade=").next().unwrap_or(rest).to_string())
        .ok_or_else(|| format!("no backup in cvx's log:\n{log}"))?;
    if ahead && !line.contains("linked ahead") {
        return Err(format!("the backup was not begun ahead; cvx's log:\n{log}"));
    }
    for d in [&home, &backups] {
        fs::remove_dir_all(d).map_err(|e| format!("cannot remove {}: {e}", d.display()))?;
    }
    Ok((latency, line))
}
