//! Helpers the benchmarks share: stamps written by staged wrapper scripts, files, percentiles.

#![allow(dead_code)] // each benchmark uses its own subset

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

pub type Result<T> = std::result::Result<T, String>;

pub fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

pub fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

pub fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// `text` as an executable file; `size` extends it with a sparse tail (the shell never reads
/// past the `exec`), so it hashes like a binary of that size.
pub fn write_executable(path: &Path, text: &str, size: Option<u64>) -> Result<()> {
    let dir = path.parent().expect("a file in a directory");
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut file =
        fs::File::create(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    file.write_all(text.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    if let Some(size) = size {
        file.set_len(size)
            .map_err(|e| format!("cannot extend {}: {e}", path.display()))?;
    }
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("cannot chmod {}: {e}", path.display()))
}

pub fn read_stamps(path: &Path) -> Result<Vec<i128>> {
    let text =
        fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    text.lines()
        .map(|l| {
            l.trim()
                .parse::<i128>()
                .map_err(|_| format!("{}: not a `date +%s%N` stamp: {l:?}", path.display()))
        })
        .collect()
}

/// Nearest-rank percentile.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// `cvx run start --home <home>` with nothing of this shell's environment but PATH, and
/// DAEMON_HOME and DAEMON_NAME set: the supervisor as a systemd unit would start it.
pub fn cvx_run_start(cvx: &Path, home: &Path, daemon: &str) -> Command {
    let mut command = Command::new(cvx);
    command
        .args(["run", "start", "--home"])
        .arg(home)
        .env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
        )
        .env("DAEMON_HOME", home)
        .env("DAEMON_NAME", daemon);
    command
}

/// A port free on loopback now.
pub fn free_port() -> Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free port: {e}"))
}

/// `[rpc] laddr` in `home`'s config/config.toml, on a free port, where simnode serves its RPC and
/// cvx reads it.
pub fn rpc_config(home: &Path) -> Result<()> {
    let config = home.join("config").join("config.toml");
    fs::create_dir_all(home.join("config")).map_err(|e| format!("cannot create config/: {e}"))?;
    fs::write(
        &config,
        format!("[rpc]\nladdr = \"tcp://127.0.0.1:{}\"\n", free_port()?),
    )
    .map_err(|e| format!("cannot write {}: {e}", config.display()))
}
