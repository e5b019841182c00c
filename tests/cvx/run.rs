//! `cvx run` end to end: the real supervisor binary supervising simnode, the simulated node,
//! staged as wrapper scripts in a real Cosmovisor tree (DESIGN §5).
//!
//! Every run's stdout and stderr go to files (never pipes: a daemon left behind by a bug would
//! hold a pipe open and hang the test), and every test holds a `Reaper` that kills whatever still
//! runs with the test's home in its command line, so a failed assertion leaves no node behind.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};
use serde_json::{Value, json};

use crate::ctx::{Ctx, platform, sha256};
use crate::support::server::{Fault, Server};

pub(crate) const SIMNODE: &str = env!("CARGO_BIN_EXE_simnode");
pub(crate) const CVX: &str = env!("CARGO_BIN_EXE_cvx");
pub(crate) const DAEMON: &str = "simd";
/// Upper bound for anything a test waits for; the runs themselves take well under a second.
pub(crate) const LIMIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// The tree

/// A wrapper script, staged as `<stage>/bin/simd`: shell lines `pre`, then
/// `exec simnode --sim-block-time 10ms <sim> "$@"`.
pub(crate) fn script(pre: &str, sim: &str) -> Vec<u8> {
    format!("#!/bin/sh\n{pre}exec {SIMNODE} --sim-block-time 10ms {sim} \"$@\"\n").into_bytes()
}

pub(crate) fn wrapper(sim: &str) -> Vec<u8> {
    script("", sim)
}

fn executable(path: &Path) {
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// Stage `bytes` as `<stage>/bin/simd`, executable.
pub(crate) fn stage_bin(ctx: &Ctx, stage: &str, bytes: &[u8]) -> PathBuf {
    let path = ctx.stage(&format!("{stage}/bin/{DAEMON}"), bytes);
    executable(&path);
    path
}

/// A genesis binary and `current -> genesis`, as `cvx apply` leaves the tree.
pub(crate) fn genesis(ctx: &Ctx, sim: &str) {
    stage_bin(ctx, "genesis", &wrapper(sim));
    std::os::unix::fs::symlink("genesis", ctx.cosmovisor("current")).unwrap();
}

pub(crate) fn current(ctx: &Ctx) -> String {
    fs::read_link(ctx.cosmovisor("current"))
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

pub(crate) fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

pub(crate) fn height(ctx: &Ctx) -> Option<u64> {
    read(&ctx.home.join("data/height")).trim().parse().ok()
}

/// Upgrades the node ran the migration for, in order.
pub(crate) fn applied(ctx: &Ctx) -> Vec<String> {
    read(&ctx.home.join("data/applied"))
        .lines()
        .map(String::from)
        .collect()
}

fn pre_upgrade_count(ctx: &Ctx) -> u64 {
    read(&ctx.home.join("data/sim-pre-upgrade-count"))
        .trim()
        .parse()
        .unwrap_or(0)
}

pub(crate) fn json(path: &Path) -> Value {
    serde_json::from_slice(&fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .unwrap()
}

/// Files (not directories) under `dir`, relative, sorted.
fn files_under(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                out.push(path.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

pub(crate) fn zip(entries: &[(&str, &[u8])]) -> Vec<u8> {
    use zip::write::SimpleFileOptions;
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .unix_permissions(0o755);
    for (name, data) in entries {
        w.start_file(*name, opts).unwrap();
        w.write_all(data).unwrap();
    }
    w.finish().unwrap().into_inner()
}

// ---------------------------------------------------------------------------------------------
// Processes

/// Poll `cond` until it holds; fail after `limit`.
pub(crate) fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Processes (other than this one) with an argument containing `needle`.
fn processes_with(needle: &Path) -> Vec<(i32, Vec<String>)> {
    let needle = needle.to_string_lossy().into_owned();
    let me = std::process::id() as i32;
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(raw) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if pid != me && args.iter().any(|a| a.contains(&needle)) {
            found.push((pid, args));
        }
    }
    found
}

pub(crate) fn send(pid: i32, sig: Signal) {
    rustix::process::kill_process(Pid::from_raw(pid).unwrap(), sig)
        .unwrap_or_else(|e| panic!("cannot send {sig:?} to {pid}: {e}"));
}

/// Kills, when dropped, every process still running with the home in its command line (cvx is
/// run as `cvx run start --home <home>`, and passes those args to the node).
pub(crate) struct Reaper(pub(crate) PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        for (pid, _) in processes_with(&self.0) {
            let _ = rustix::process::kill_process(Pid::from_raw(pid).unwrap(), Signal::KILL);
        }
    }
}

/// `cvx run start --home <home> <extra>` with a clean environment (as `Ctx::cvx`) plus
/// DAEMON_HOME, DAEMON_NAME=simd, DAEMON_POLL_INTERVAL=50ms, UNSAFE_SKIP_BACKUP=true, then `env`
/// (which may override them).
pub(crate) fn command(ctx: &Ctx, env: &[(&str, &str)], extra: &[&str]) -> Command {
    let mut cmd = cvx_run(ctx, env);
    cmd.args(["start", "--home"]).arg(&ctx.home).args(extra);
    cmd
}

/// `cvx run`, with the test's environment and no daemon arguments yet.
fn cvx_run(ctx: &Ctx, env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(CVX);
    cmd.current_dir(ctx.dir.path());
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("DAEMON_") || key.starts_with("CVX_") || key.starts_with("COSMOVISOR_") {
            cmd.env_remove(&*key);
        }
    }
    cmd.env("NO_COLOR", "1")
        .env("DAEMON_HOME", &ctx.home)
        .env("DAEMON_NAME", DAEMON)
        .env("DAEMON_POLL_INTERVAL", "50ms")
        .env("UNSAFE_SKIP_BACKUP", "true");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.arg("run");
    cmd
}

/// A running cvx whose stdout (the node's logs) and stderr (cvx's) go to files.
pub(crate) struct Running {
    pub(crate) child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

static RUNS: AtomicUsize = AtomicUsize::new(0);

pub(crate) fn spawn(ctx: &Ctx, mut cmd: Command) -> Running {
    let n = RUNS.fetch_add(1, Ordering::SeqCst);
    let stdout = ctx.path(&format!("run-{n}.stdout"));
    let stderr = ctx.path(&format!("run-{n}.stderr"));
    let child = cmd
        .stdin(Stdio::null())
        .stdout(fs::File::create(&stdout).unwrap())
        .stderr(fs::File::create(&stderr).unwrap())
        .spawn()
        .expect("start cvx");
    Running {
        child,
        stdout,
        stderr,
    }
}

impl Running {
    pub(crate) fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub(crate) fn stderr(&self) -> String {
        read(&self.stderr)
    }

    pub(crate) fn stdout(&self) -> String {
        read(&self.stdout)
    }

    pub(crate) fn logs(&self) -> String {
        format!(
            "--- stdout (the node)\n{}\n--- stderr (cvx)\n{}",
            self.stdout(),
            self.stderr()
        )
    }

    /// Wait for cvx to exit (within LIMIT), expecting `code`; returns (stdout, stderr).
    pub(crate) fn finish(mut self, code: i32) -> (String, String) {
        let status = self.exit();
        assert_eq!(
            status.code(),
            Some(code),
            "unexpected exit {status}\n{}",
            self.logs()
        );
        (self.stdout(), self.stderr())
    }

    pub(crate) fn exit(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if start.elapsed() > LIMIT {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("cvx did not exit within {LIMIT:?}\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Run cvx to completion, expecting `code`.
pub(crate) fn run_cvx(
    ctx: &Ctx,
    env: &[(&str, &str)],
    extra: &[&str],
    code: i32,
) -> (String, String) {
    spawn(ctx, command(ctx, env, extra)).finish(code)
}

/// Lines of cvx's log that mention `upgrade=<name>` and `height=<height>` and contain `text`.
fn logged(stderr: &str, name: &str, height: u64, text: &str) -> bool {
    stderr.lines().any(|l| {
        l.contains(text)
            && l.contains(&format!("upgrade={name}"))
            && l.contains(&format!("height={height}"))
    })
}

const NO_RESTART: (&str, &str) = ("DAEMON_RESTART_AFTER_UPGRADE", "false");

// ---------------------------------------------------------------------------------------------
// The upgrade cycle

#[test]
fn two_upgrades_in_one_run_and_the_last_daemons_exit_code() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    genesis(&ctx, "--sim-version v1.0.0 --sim-upgrade v2@3");
    stage_bin(
        &ctx,
        "upgrades/v2",
        &wrapper("--sim-version v2.0.0 --sim-handlers v2 --sim-upgrade v3@6"),
    );
    stage_bin(
        &ctx,
        "upgrades/v3",
        &wrapper("--sim-version v3.0.0 --sim-handlers v3 --sim-exit-at 8 5"),
    );

    let (stdout, stderr) = run_cvx(&ctx, &[], &[], 5);

    assert_eq!(current(&ctx), "upgrades/v3");
    assert_eq!(applied(&ctx), ["v2", "v3"], "{stdout}");
    assert_eq!(height(&ctx), Some(8));
    // (Not the node's "UPGRADE NEEDED" lines: the node prints them after writing the file, and
    // cvx may kill it in between.)
    for (name, h) in [("v2", 3), ("v3", 6)] {
        let plan = json(&ctx.cosmovisor(&format!("upgrades/{name}/upgrade-info.json")));
        assert_eq!(
            (plan["name"].as_str(), plan["height"].as_u64()),
            (Some(name), Some(h))
        );
        for text in [
            "upgrade detected",
            "stopping the daemon",
            &format!("switched current to upgrades/{name}"),
            "restarting the daemon",
        ] {
            assert!(
                logged(&stderr, name, h, text),
                "no {text:?} for {name} at {h}:\n{stderr}"
            );
        }
    }
    assert!(stderr.contains("exited by itself"), "{stderr}");
}

#[test]
fn a_tree_without_current_starts_at_genesis() {
    // Cosmovisor's CurrentBin: no `current` link yet (a fresh install) means genesis.
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    stage_bin(&ctx, "genesis", &wrapper("--sim-upgrade v2@3"));
    stage_bin(
        &ctx,
        "upgrades/v2",
        &wrapper("--sim-handlers v2 --sim-exit-at 5 0"),
    );

    let (_, stderr) = run_cvx(&ctx, &[], &[], 0);

    assert!(stderr.contains("pointing it to genesis"), "{stderr}");
    assert_eq!(current(&ctx), "upgrades/v2");
    assert_eq!(applied(&ctx), ["v2"]);
}

#[test]
fn without_restart_cvx_exits_0_after_switching() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    genesis(&ctx, "--sim-upgrade v2@3");
    stage_bin(&ctx, "upgrades/v2", &wrapper("--sim-handlers v2"));

    let (_, stderr) = run_cvx(&ctx, &[NO_RESTART], &[], 0);

    assert_eq!(current(&ctx), "upgrades/v2");
    assert!(
        logged(&stderr, "v2", 3, "DAEMON_RESTART_AFTER_UPGRADE is false"),
        "{stderr}"
    );
    assert!(
        applied(&ctx).is_empty(),
        "the new daemon must not have been started"
    );
    assert_eq!(pre_upgrade_count(&ctx), 1);
}

#[test]
fn a_shutdown_grace_lets_the_node_flush() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    genesis(&ctx, "--sim-upgrade v2@3 --sim-flush 200ms");
    stage_bin(&ctx, "upgrades/v2", &wrapper("--sim-handlers v2"));

    run_cvx(&ctx, &[NO_RESTART, ("DAEMON_SHUTDOWN_GRACE", "2s")], &[], 0);

    assert_eq!(
        read(&ctx.home.join("data/flushed")).trim(),
        "3",
        "SIGTERM, then a graceful flush"
    );
    assert_eq!(current(&ctx), "upgrades/v2");
}

#[test]
fn without_a_grace_the_node_is_killed_at_once() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    genesis(&ctx, "--sim-upgrade v2@3 --sim-flush 200ms");
    stage_bin(&ctx, "upgrades/v2", &wrapper("--sim-handlers v2"));

    run_cvx(&ctx, &[NO_RESTART], &[], 0);

    assert!(
        !ctx.home.join("data/flushed").exists(),
        "SIGKILL leaves no time to flush"
    );
    assert_eq!(current(&ctx), "upgrades/v2");
}

// ---------------------------------------------------------------------------------------------
// pre-upgrade

/// genesis halts for v2 at 3; v2's `pre-upgrade` answers as `pre` says; restarted, v2 migrates
/// and exits 0 at 5.
fn pre_upgrade_case(pre: &str, env: &[(&str, &str)], code: i32) -> (Ctx, String) {
    let ctx = Ctx::new();
    genesis(&ctx, "--sim-upgrade v2@3");
    stage_bin(
        &ctx,
        "upgrades/v2",
        &wrapper(&format!("--sim-handlers v2 --sim-exit-at 5 0 {pre}")),
    );
    let _reaper = Reaper(ctx.home.clone());
    let (_, stderr) = run_cvx(&ctx, env, &[], code);
    (ctx, stderr)
}

#[test]
fn pre_upgrade_exit_0_is_done() {
    let (ctx, stderr) = pre_upgrade_case("--sim-pre-upgrade-exit 0", &[], 0);
    assert!(logged(&stderr, "v2", 3, "pre-upgrade done"), "{stderr}");
    assert_eq!(pre_upgrade_count(&ctx), 1);
    assert_eq!(applied(&ctx), ["v2"]);
}

#[test]
fn pre_upgrade_exit_1_is_not_implemented_and_the_upgrade_continues() {
    let (ctx, stderr) = pre_upgrade_case("--sim-pre-upgrade-exit 1", &[], 0);
    assert!(logged(&stderr, "v2", 3, "not implemented"), "{stderr}");
    assert_eq!(pre_upgrade_count(&ctx), 1);
    assert_eq!(applied(&ctx), ["v2"]);
}

#[test]
fn pre_upgrade_exit_30_fails_without_relaunch() {
    let (ctx, stderr) = pre_upgrade_case("--sim-pre-upgrade-exit 30", &[], 1);
    assert!(
        stderr.contains("pre-upgrade") && stderr.contains("exit 30"),
        "{stderr}"
    );
    assert_eq!(pre_upgrade_count(&ctx), 1);
    assert!(
        applied(&ctx).is_empty(),
        "v2 must not be launched after a failed pre-upgrade"
    );
    assert_eq!(height(&ctx), Some(3));
}

#[test]
fn pre_upgrade_exit_31_is_retried_up_to_the_max() {
    let (ctx, stderr) = pre_upgrade_case(
        "--sim-pre-upgrade-exit 31 --sim-pre-upgrade-fail-times 2",
        &[("DAEMON_PREUPGRADE_MAX_RETRIES", "2")],
        0,
    );
    assert_eq!(
        pre_upgrade_count(&ctx),
        3,
        "two retries, the third call succeeds"
    );
    assert!(logged(&stderr, "v2", 3, "retry (exit 31)"), "{stderr}");
    assert!(logged(&stderr, "v2", 3, "pre-upgrade done"), "{stderr}");
    assert_eq!(applied(&ctx), ["v2"]);
}

#[test]
fn pre_upgrade_exit_31_beyond_the_max_fails() {
    let (ctx, stderr) = pre_upgrade_case(
        "--sim-pre-upgrade-exit 31 --sim-pre-upgrade-fail-times 2",
        &[("DAEMON_PREUPGRADE_MAX_RETRIES", "1")],
        1,
    );
    assert_eq!(pre_upgrade_count(&ctx), 2, "one call plus one retry");
    assert!(
        stderr.contains("pre-upgrade") && stderr.contains("exit 31"),
        "{stderr}"
    );
    assert!(applied(&ctx).is_empty());
}

#[test]
fn pre_upgrade_with_another_exit_code_fails() {
    let (ctx, stderr) = pre_upgrade_case("--sim-pre-upgrade-exit 2", &[], 1);
    assert!(stderr.contains("only 0, 1, 30 and 31"), "{stderr}");
    assert!(stderr.contains("exited with code 2"), "{stderr}");
    assert!(applied(&ctx).is_empty());
}

#[test]
fn custom_pre_upgrade_script_gets_name_and_height_in_the_home() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    genesis(&ctx, "--sim-upgrade v2@3");
    stage_bin(&ctx, "upgrades/v2", &wrapper("--sim-handlers v2"));
    let out = ctx.dir.path();
    let script = ctx.stage(
        "scripts/pre.sh",
        format!(
            "#!/bin/sh\necho \"$#:$*\" > '{0}/script-args'\npwd -P > '{0}/script-cwd'\n",
            out.display()
        )
        .as_bytes(),
    );
    executable(&script);

    let (_, stderr) = run_cvx(
        &ctx,
        &[
            NO_RESTART,
            ("COSMOVISOR_CUSTOM_PREUPGRADE", "scripts/pre.sh"),
        ],
        &[],
        0,
    );

    assert_eq!(read(&out.join("script-args")).trim(), "2:v2 3", "{stderr}");
    assert_eq!(
        Path::new(read(&out.join("script-cwd")).trim()),
        fs::canonicalize(&ctx.home).unwrap()
    );
    assert_eq!(current(&ctx), "upgrades/v2");
}

#[test]
fn a_failing_custom_pre_upgrade_script_stops_the_upgrade() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    genesis(&ctx, "--sim-upgrade v2@3");
    stage_bin(&ctx, "upgrades/v2", &wrapper("--sim-handlers v2"));
    executable(&ctx.stage("scripts/pre.sh", b"#!/bin/sh\nexit 4\n"));

    let (_, stderr) = run_cvx(
        &ctx,
        &[("COSMOVISOR_CUSTOM_PREUPGRADE", "scripts/pre.sh")],
        &[],
        1,
    );

    assert!(
        stderr.contains("custom pre-upgrade script") && stderr.contains("exited with code 4"),
        "{stderr}"
    );
    assert_eq!(
        current(&ctx),
        "genesis",
        "the script runs before the switch"
    );
    assert_eq!(pre_upgrade_count(&ctx), 0);
}

// ---------------------------------------------------------------------------------------------
// Backup

#[test]
fn data_is_backed_up_before_the_upgrade() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    genesis(&ctx, "--sim-upgrade v2@3");
    stage_bin(&ctx, "upgrades/v2", &wrapper("--sim-handlers v2"));
    let backups = ctx.path("backups");
    let backups_str = backups.to_str().unwrap();

    let (_, stderr) = run_cvx(
        &ctx,
        &[
            NO_RESTART,
            ("UNSAFE_SKIP_BACKUP", "false"),
            ("DAEMON_DATA_BACKUP_DIR", backups_str),
        ],
        &[],
        0,
    );

    let dirs: Vec<String> = fs::read_dir(&backups)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    // data-backup-<date>-<upgrade>: unique per plan.
    let date = dirs[0]
        .strip_prefix("data-backup-")
        .and_then(|rest| rest.strip_suffix("-v2"))
        .unwrap_or_else(|| panic!("{dirs:?}"));
    let parts: Vec<&str> = date.split('-').collect();
    assert!(
        parts.len() == 3 && parts.iter().all(|p| p.parse::<u32>().is_ok()),
        "a date: {date}"
    );
    let backup = backups.join(&dirs[0]);
    assert_eq!(read(&backup.join("height")).trim(), "3");
    assert_eq!(json(&backup.join("upgrade-info.json"))["name"], "v2");
    assert!(logged(&stderr, "v2", 3, "backed up data to"), "{stderr}");
    assert_eq!(current(&ctx), "upgrades/v2");
}

/// Unmounts the tmpfs when dropped (before the temp dir holding it is removed).
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

#[test]
fn a_backup_that_does_not_fit_is_refused_before_copying() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    let backups = ctx.path("backups");
    fs::create_dir_all(&backups).unwrap();
    let mount = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&backups)
        .output()
        .expect("run mount");
    assert!(
        mount.status.success(),
        "this test needs a 64 KiB tmpfs to run out of room for real and could not mount one \
         (it needs root, or CAP_SYS_ADMIN in a container): mount -t tmpfs -o size=64k tmpfs {}: {}",
        backups.display(),
        String::from_utf8_lossy(&mount.stderr)
    );
    let _mount = Mount(backups.clone());
    genesis(&ctx, "--sim-upgrade v2@3");
    stage_bin(&ctx, "upgrades/v2", &wrapper("--sim-handlers v2"));
    fs::create_dir_all(ctx.home.join("data")).unwrap();
    fs::write(ctx.home.join("data/big"), vec![7u8; 128 * 1024]).unwrap();

    let (_, stderr) = run_cvx(
        &ctx,
        &[
            ("UNSAFE_SKIP_BACKUP", "false"),
            ("DAEMON_DATA_BACKUP_DIR", backups.to_str().unwrap()),
        ],
        &[],
        1,
    );

    let need: u64 = stderr
        .split("needs ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no \"needs N bytes\" in:\n{stderr}"));
    assert!(need > 128 * 1024, "{stderr}");
    assert!(
        stderr.contains("backup of") && stderr.contains("refused"),
        "{stderr}"
    );
    assert!(
        fs::read_dir(&backups).unwrap().next().is_none(),
        "nothing may be copied before the refusal"
    );
    assert_eq!(current(&ctx), "genesis");
}

// ---------------------------------------------------------------------------------------------
// Downloads

/// genesis halting for v2 at 3 with `info` (single-quoted in the wrapper script).
fn genesis_with_info(ctx: &Ctx, info: &str) {
    assert!(!info.contains('\''));
    genesis(ctx, &format!("--sim-upgrade 'v2@3@{info}'"));
}

/// The v2 build the tests serve zipped as `bin/simd`: it migrates and exits 0 at 5.
fn v2_to_download() -> Vec<u8> {
    wrapper("--sim-handlers v2 --sim-exit-at 5 0")
}

const DOWNLOAD: (&str, &str) = ("DAEMON_ALLOW_DOWNLOAD_BINARIES", "true");

fn assert_downloaded(ctx: &Ctx, v2: &[u8], url: &str) {
    assert_eq!(current(ctx), "upgrades/v2");
    assert_eq!(
        fs::read(ctx.cosmovisor("upgrades/v2/bin/simd")).unwrap(),
        v2
    );
    let receipt = json(&ctx.cosmovisor(".cvx/receipts/upgrades/v2/bin/simd.json"));
    assert_eq!(receipt["sha256"], sha256(v2));
    assert_eq!(receipt["source_url"], url);
    assert_eq!(
        applied(ctx),
        ["v2"],
        "the downloaded daemon ran the migration"
    );
    assert_eq!(height(ctx), Some(5));
}

#[test]
fn download_from_inline_info() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    let server = Server::start();
    let url = server.url("/simd.zip");
    let v2 = v2_to_download();
    let zipped = zip(&[("bin/simd", &v2)]);
    server.add("/simd.zip", zipped.clone(), Fault::None);
    let info = format!(
        r#"{{"binaries":{{"{}":"{url}?checksum=sha256:{}"}}}}"#,
        platform(),
        sha256(&zipped)
    );
    genesis_with_info(&ctx, &info);

    let (_, stderr) = run_cvx(&ctx, &[DOWNLOAD], &[], 0);

    assert!(logged(&stderr, "v2", 3, "downloading"), "{stderr}");
    assert_downloaded(&ctx, &v2, &url);
}

#[test]
fn download_from_info_at_a_url() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    let server = Server::start();
    let url = server.url("/simd.zip");
    genesis_with_info(&ctx, &server.url("/info.json"));
    let v2 = v2_to_download();
    let zipped = zip(&[("bin/simd", &v2)]);
    server.add("/simd.zip", zipped.clone(), Fault::None);
    let info = format!(
        r#"{{"binaries":{{"any":"{url}?checksum=sha256:{}"}}}}"#,
        sha256(&zipped)
    );
    server.add("/info.json", info.into_bytes(), Fault::None);

    run_cvx(&ctx, &[DOWNLOAD], &[], 0);

    assert_downloaded(&ctx, &v2, &url);
    assert_eq!(server.hits("/info.json"), 1);
}

#[test]
fn a_wrong_checksum_fails_and_leaves_nothing_in_the_way_of_the_next_try() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    let server = Server::start();
    let url = server.url("/simd.zip");
    let v2 = v2_to_download();
    let good = zip(&[("bin/simd", &v2)]);
    let bad = zip(&[("bin/simd", &wrapper("--sim-handlers v2 --sim-version evil"))]);
    let info = format!(
        r#"{{"binaries":{{"{}":"{url}?checksum=sha256:{}"}}}}"#,
        platform(),
        sha256(&good)
    );
    genesis_with_info(&ctx, &info);
    server.add("/simd.zip", bad.clone(), Fault::None);

    let (_, stderr) = run_cvx(&ctx, &[DOWNLOAD], &[], 1);

    assert!(stderr.contains("checksum mismatch"), "{stderr}");
    assert!(
        stderr.contains(&sha256(&good)) && stderr.contains(&sha256(&bad)),
        "{stderr}"
    );
    assert!(!ctx.cosmovisor("upgrades/v2/bin/simd").exists());
    assert!(
        !ctx.cosmovisor(".cvx/receipts/upgrades/v2/bin/simd.json")
            .exists()
    );
    assert_eq!(
        files_under(&ctx.cosmovisor(".cvx/partial")),
        Vec::<String>::new(),
        "no unverified bytes kept"
    );
    assert_eq!(current(&ctx), "genesis");

    server.add("/simd.zip", good, Fault::None);
    let (_, stderr) = run_cvx(&ctx, &[DOWNLOAD], &[], 0);

    assert!(
        logged(&stderr, "v2", 3, "switching before launch"),
        "{stderr}"
    );
    assert_downloaded(&ctx, &v2, &url);
}

// ---------------------------------------------------------------------------------------------
// A missing binary, a restart, half-written files

#[test]
fn a_missing_binary_fails_and_a_restart_after_staging_switches_before_launch() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    genesis(&ctx, "--sim-upgrade v2@3");

    let (_, stderr) = run_cvx(&ctx, &[], &[], 1);

    let missing = ctx.cosmovisor("upgrades/v2/bin/simd");
    assert!(stderr.contains(&missing.display().to_string()), "{stderr}");
    assert!(stderr.contains("cvx apply"), "{stderr}");
    assert_eq!(current(&ctx), "genesis");
    assert_eq!(height(&ctx), Some(3));

    stage_bin(
        &ctx,
        "upgrades/v2",
        &wrapper("--sim-handlers v2 --sim-exit-at 6 0"),
    );
    let (stdout, stderr) = run_cvx(&ctx, &[], &[], 0);

    assert!(
        logged(&stderr, "v2", 3, "switching before launch"),
        "{stderr}"
    );
    let switched = stderr
        .find("switched current to upgrades/v2")
        .expect("switched");
    let started = stderr.find("started ").expect("started");
    assert!(
        switched < started,
        "the switch comes before the only launch:\n{stderr}"
    );
    assert_eq!(stderr.matches("started ").count(), 1, "{stderr}");
    assert!(
        !stdout.contains("NEEDED"),
        "the genesis binary was not started again: {stdout}"
    );
    assert_eq!(current(&ctx), "upgrades/v2");
    assert_eq!(applied(&ctx), ["v2"]);
    assert_eq!(
        height(&ctx),
        Some(6),
        "the node continued past the upgrade height"
    );
}

#[test]
fn a_partial_upgrade_info_is_logged_and_read_again() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    genesis(&ctx, "--sim-upgrade v2@30");
    stage_bin(
        &ctx,
        "upgrades/v2",
        &wrapper("--sim-handlers v2 --sim-exit-at 32 0"),
    );
    fs::create_dir_all(ctx.home.join("data")).unwrap();
    fs::write(
        ctx.home.join("data/upgrade-info.json"),
        r#"{"name":"v2","hei"#,
    )
    .unwrap();

    let cvx = spawn(&ctx, command(&ctx, &[("CVX_LOG", "cvx=debug")], &[]));
    // The half-written file is seen while the node runs towards the plan, and nothing happens.
    wait_for("cvx to read the partial file", LIMIT, || {
        cvx.stderr().contains("is incomplete")
    });
    assert!(
        height(&ctx).unwrap_or(0) < 30,
        "the test's premise: read before the halt"
    );
    assert!(!cvx.stderr().contains("upgrade detected"), "{}", cvx.logs());
    let (_, stderr) = cvx.finish(0);

    assert_eq!(stderr.matches("upgrade detected").count(), 1, "{stderr}");
    assert!(
        logged(&stderr, "v2", 30, "switched current to upgrades/v2"),
        "{stderr}"
    );
    assert_eq!(applied(&ctx), ["v2"]);
    assert_eq!(height(&ctx), Some(32));
}

#[test]
fn an_invalid_upgrade_info_is_logged_and_does_not_stop_the_supervisor() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    genesis(&ctx, "--sim-upgrade v2@20");
    stage_bin(
        &ctx,
        "upgrades/v2",
        &wrapper("--sim-handlers v2 --sim-exit-at 22 0"),
    );
    fs::create_dir_all(ctx.home.join("data")).unwrap();
    fs::write(ctx.home.join("data/upgrade-info.json"), "not json at all").unwrap();

    let (_, stderr) = run_cvx(&ctx, &[], &[], 0);

    assert!(stderr.contains("is not a valid plan"), "{stderr}");
    assert!(
        logged(&stderr, "v2", 20, "switched current to upgrades/v2"),
        "{stderr}"
    );
    assert_eq!(applied(&ctx), ["v2"]);
}

// ---------------------------------------------------------------------------------------------
// Signals and exit codes

fn forwards(sig: Signal) {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    genesis(&ctx, "--sim-flush 100ms");
    let mut cvx = spawn(&ctx, command(&ctx, &[], &[]));
    wait_for("the node to make blocks", LIMIT, || {
        height(&ctx).unwrap_or(0) >= 2
    });
    let nodes: Vec<i32> = processes_with(&ctx.home)
        .into_iter()
        .filter(|(pid, args)| {
            *pid != cvx.pid() && args.first().map(String::as_str) == Some(SIMNODE)
        })
        .map(|(pid, _)| pid)
        .collect();
    assert_eq!(nodes.len(), 1, "one simnode, {nodes:?}\n{}", cvx.logs());
    let node = nodes[0];

    send(cvx.pid(), sig);
    let status = cvx.exit();

    assert_eq!(
        status.code(),
        Some(0),
        "cvx exits with the node's code\n{}",
        cvx.logs()
    );
    assert!(
        ctx.home.join("data/flushed").exists(),
        "the node got the signal and flushed\n{}",
        cvx.logs()
    );
    assert!(
        cvx.stderr().contains(&format!("received {sig:?}")),
        "{}",
        cvx.logs()
    );
    assert!(
        !Path::new(&format!("/proc/{node}")).exists(),
        "simnode {node} is still there"
    );
    assert_eq!(processes_with(&ctx.home), vec![], "no orphan");
}

#[test]
fn sigterm_is_forwarded_and_cvx_exits_with_the_node() {
    forwards(Signal::TERM);
}

#[test]
fn sigint_is_forwarded_and_cvx_exits_with_the_node() {
    forwards(Signal::INT);
}

#[test]
fn the_daemons_own_exit_code_passes_through() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    genesis(&ctx, "--sim-exit-at 4 7");

    let (stdout, stderr) = run_cvx(&ctx, &[], &[], 7);

    assert!(stdout.contains("exiting at height=4 code=7"), "{stdout}");
    assert!(stderr.contains("exited by itself"), "{stderr}");
    assert_eq!(current(&ctx), "genesis");
}

// ---------------------------------------------------------------------------------------------
// Names, libraries, configuration, RPC, skips

#[test]
fn plan_names_are_lower_cased_for_the_directory() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    genesis(&ctx, "--sim-upgrade V2@3");
    stage_bin(
        &ctx,
        "upgrades/v2",
        &wrapper("--sim-handlers V2 --sim-exit-at 5 0"),
    );

    run_cvx(&ctx, &[], &[], 0);

    assert_eq!(current(&ctx), "upgrades/v2");
    assert_eq!(
        json(&ctx.cosmovisor("upgrades/v2/upgrade-info.json"))["name"],
        "V2"
    );
    assert_eq!(applied(&ctx), ["V2"]);
}

#[test]
fn disable_recase_keeps_the_plan_name() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    genesis(&ctx, "--sim-upgrade V2@3");
    stage_bin(
        &ctx,
        "upgrades/V2",
        &wrapper("--sim-handlers V2 --sim-exit-at 5 0"),
    );

    run_cvx(&ctx, &[("COSMOVISOR_DISABLE_RECASE", "true")], &[], 0);

    assert_eq!(current(&ctx), "upgrades/V2");
    assert!(!ctx.cosmovisor("upgrades/v2").exists());
    assert_eq!(applied(&ctx), ["V2"]);
}

#[test]
fn the_new_daemon_finds_its_libraries() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    genesis(&ctx, "--sim-upgrade v2@3");
    let record = r#"echo "$1 $LD_LIBRARY_PATH" >> "$DAEMON_HOME/ldpath""#;
    stage_bin(
        &ctx,
        "upgrades/v2",
        &script(
            &format!("{record}\n"),
            "--sim-handlers v2 --sim-exit-at 5 0",
        ),
    );
    ctx.stage("upgrades/v2/lib/libsim.so", b"not really a library");

    run_cvx(&ctx, &[], &[], 0);

    let root = ctx.cosmovisor("");
    let seen: Vec<(String, String)> = read(&ctx.home.join("ldpath"))
        .lines()
        .map(|l| {
            let (cmd, path) = l.split_once(' ').unwrap();
            (cmd.to_string(), path.split(':').next().unwrap().to_string())
        })
        .collect();
    assert_eq!(
        seen,
        [
            (
                "pre-upgrade".to_string(),
                root.join("upgrades/v2/lib").display().to_string()
            ),
            (
                "start".to_string(),
                root.join("current/lib").display().to_string()
            ),
        ]
    );
    assert_eq!(applied(&ctx), ["v2"]);
}

#[test]
fn configuration_errors_are_reported_together_and_nothing_starts() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    stage_bin(
        &ctx,
        "genesis",
        &script("touch \"$DAEMON_HOME/started\"\n", ""),
    );
    std::os::unix::fs::symlink("genesis", ctx.cosmovisor("current")).unwrap();
    let mut cmd = command(
        &ctx,
        &[
            ("DAEMON_RESTART_AFTER_UPGRADE", "yes"),
            ("DAEMON_POLL_INTERVAL", "-1s"),
        ],
        &[],
    );
    cmd.env_remove("DAEMON_NAME");

    let (_, stderr) = spawn(&ctx, cmd).finish(1);

    for text in [
        "DAEMON_NAME is not set",
        "DAEMON_RESTART_AFTER_UPGRADE=\"yes\"",
        "DAEMON_POLL_INTERVAL",
    ] {
        assert!(stderr.contains(text), "no {text:?} in:\n{stderr}");
    }
    assert_eq!(stderr.matches("\n  - ").count(), 3, "{stderr}");
    assert!(
        !ctx.home.join("started").exists(),
        "the daemon must never start"
    );
    assert!(!ctx.home.join("data").exists());
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub(crate) fn rpc_config(ctx: &Ctx) {
    fs::create_dir_all(ctx.home.join("config")).unwrap();
    let port = free_port();
    fs::write(
        ctx.home.join("config/config.toml"),
        format!(
            "[p2p]\nladdr = \"tcp://0.0.0.0:1\"\n\n[rpc]\nladdr = \"tcp://127.0.0.1:{port}\"\n"
        ),
    )
    .unwrap();
}

#[test]
fn no_upgrade_while_the_nodes_rpc_reports_a_lower_height() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    rpc_config(&ctx);
    genesis(
        &ctx,
        "--sim-rpc --sim-rpc-height-offset 5 --sim-upgrade v2@10",
    );
    stage_bin(&ctx, "upgrades/v2", &wrapper("--sim-handlers v2"));

    let mut cvx = spawn(
        &ctx,
        command(&ctx, &[NO_RESTART, ("CVX_LOG", "cvx=debug")], &[]),
    );
    wait_for("the node to halt", LIMIT, || {
        cvx.stdout().contains(r#"UPGRADE "v2" NEEDED"#)
    });
    wait_for("cvx to wait for the node's height", LIMIT, || {
        cvx.stderr()
            .contains("reports height 5: waiting for it to reach the plan's height")
    });
    // cvx asks the node again on every poll tick (50 ms): after ten more answers of 5, it has
    // still not stopped the node nor switched.
    wait_for("ten more RPC checks", LIMIT, || {
        cvx.stderr()
            .matches("the node's RPC still reports height 5")
            .count()
            >= 10
    });
    assert_eq!(current(&ctx), "genesis", "{}", cvx.logs());
    assert!(
        !cvx.stderr().contains("stopping the daemon"),
        "{}",
        cvx.logs()
    );
    assert!(cvx.child.try_wait().unwrap().is_none(), "{}", cvx.logs());
    assert_eq!(height(&ctx), Some(10), "the node stays halted");

    send(cvx.pid(), Signal::TERM);
    assert_eq!(cvx.exit().code(), Some(0), "{}", cvx.logs());
    assert_eq!(current(&ctx), "genesis");
    assert_eq!(pre_upgrade_count(&ctx), 0);
}

#[test]
fn the_upgrade_proceeds_once_the_nodes_rpc_reports_the_height() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    rpc_config(&ctx);
    genesis(&ctx, "--sim-rpc --sim-upgrade v2@10");
    stage_bin(&ctx, "upgrades/v2", &wrapper("--sim-handlers v2"));

    let (stdout, stderr) = run_cvx(&ctx, &[NO_RESTART], &[], 0);

    assert!(
        stdout.contains("serving rpc"),
        "the node's RPC was up: {stdout}"
    );
    assert!(!stderr.contains("waiting for it to reach"), "{stderr}");
    assert_eq!(current(&ctx), "upgrades/v2");
}

#[test]
fn unsafe_skip_upgrades_in_the_daemons_args_is_honoured() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    // v2 is not staged: an upgrade attempt would fail with exit 1.
    genesis(&ctx, "--sim-upgrade v2@3 --sim-exit-at 6 0");
    // As a node that halted for the plan before the operator chose to skip it leaves the file.
    fs::create_dir_all(ctx.home.join("data")).unwrap();
    fs::write(
        ctx.home.join("data/upgrade-info.json"),
        r#"{"name":"v2","height":3}"#,
    )
    .unwrap();

    let (stdout, stderr) = run_cvx(&ctx, &[], &["--unsafe-skip-upgrades", "3"], 0);

    assert!(logged(&stderr, "v2", 3, "skipping the upgrade"), "{stderr}");
    assert!(
        stdout.contains(r#"UPGRADE "v2" SKIPPED at height: 3"#),
        "{stdout}"
    );
    assert_eq!(
        height(&ctx),
        Some(6),
        "the node went past the skipped height"
    );
    assert_eq!(current(&ctx), "genesis");
    assert!(applied(&ctx).is_empty());
}

#[test]
fn unsafe_skip_upgrades_without_a_file_at_start() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    genesis(&ctx, "--sim-upgrade v2@3 --sim-exit-at 6 0");

    let (stdout, _) = run_cvx(&ctx, &[], &["--unsafe-skip-upgrades=3"], 0);

    assert!(
        stdout.contains(r#"UPGRADE "v2" SKIPPED at height: 3"#),
        "{stdout}"
    );
    assert_eq!(height(&ctx), Some(6));
    assert_eq!(current(&ctx), "genesis");
}

#[test]
fn a_binary_changed_after_apply_staged_it_is_never_run() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    let (_, v2) = applied_tree(
        &ctx,
        "--sim-version v1.0.0 --sim-upgrade v2@3",
        "--sim-version v2.0.0 --sim-handlers v2 --sim-exit-at 5 0",
    );

    // Same length, other bytes: only the receipt's identity and hash can tell.
    let staged = ctx.cosmovisor("upgrades/v2/bin/simd");
    let evil = String::from_utf8(v2.clone())
        .unwrap()
        .replace("v2.0.0", "v6.6.6");
    fs::write(&staged, evil).unwrap();

    let (_, stderr) = run_cvx(&ctx, &[], &[], 1);
    assert!(
        stderr.contains("changed since cvx staged it")
            && stderr.contains("refusing to run unverified bytes"),
        "{stderr}"
    );
    assert_eq!(
        current(&ctx),
        "genesis",
        "never switched to the changed binary"
    );
    assert_eq!(applied(&ctx), Vec::<String>::new());
}

// ---------------------------------------------------------------------------------------------
// The upgrade moment under faults

/// Directories in `dir` (none when it does not exist), sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The simnode processes running for this test's home (not cvx itself).
fn nodes(ctx: &Ctx, cvx: &Running) -> Vec<i32> {
    processes_with(&ctx.home)
        .into_iter()
        .filter(|(pid, args)| {
            *pid != cvx.pid() && args.first().map(String::as_str) == Some(SIMNODE)
        })
        .map(|(pid, _)| pid)
        .collect()
}

fn with_backups<'a>(backups: &'a str, env: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut all = vec![
        ("UNSAFE_SKIP_BACKUP", "false"),
        ("DAEMON_DATA_BACKUP_DIR", backups),
    ];
    all.extend_from_slice(env);
    all
}

#[test]
fn a_missing_binary_costs_no_backup() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    genesis(&ctx, "--sim-upgrade v2@3");
    let backups = ctx.path("backups");
    let env = with_backups(backups.to_str().unwrap(), &[]);

    for _restart in 0..3 {
        let (_, stderr) = run_cvx(&ctx, &env, &[], 1);
        assert!(
            stderr.contains("no binary at") && stderr.contains("stage it with `cvx apply`"),
            "{stderr}"
        );
        assert!(!stderr.contains("backing up"), "{stderr}");
    }
    assert_eq!(entries(&backups), Vec::<String>::new());
    assert_eq!(current(&ctx), "genesis");
}

#[test]
fn three_restarts_of_a_failing_upgrade_make_one_backup() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    genesis(&ctx, "--sim-upgrade v2@3");
    stage_bin(
        &ctx,
        "upgrades/v2",
        &wrapper("--sim-handlers v2 --sim-exit-at 5 0"),
    );
    let script = ctx.stage("fail.sh", b"#!/bin/sh\nexit 4\n");
    executable(&script);
    let backups = ctx.path("backups");
    let env = with_backups(
        backups.to_str().unwrap(),
        &[("COSMOVISOR_CUSTOM_PREUPGRADE", "fail.sh")],
    );

    let (_, first) = run_cvx(&ctx, &env, &[], 1);
    assert!(first.contains("exited with code 4"), "{first}");
    for _restart in 0..2 {
        let (_, stderr) = run_cvx(&ctx, &env, &[], 1);
        assert!(
            stderr.contains("already backed up for this upgrade"),
            "{stderr}"
        );
    }
    let taken = entries(&backups);
    assert_eq!(taken.len(), 1, "{taken:?}");
    assert!(taken[0].starts_with("data-backup-") && taken[0].ends_with("-v2"));
    assert_eq!(current(&ctx), "genesis");

    // Fixed, the next start completes the upgrade without copying again.
    fs::write(&script, "#!/bin/sh\nexit 0\n").unwrap();
    let (_, stderr) = run_cvx(&ctx, &env, &[], 0);
    assert!(stderr.contains("already backed up"), "{stderr}");
    assert_eq!(current(&ctx), "upgrades/v2");
    assert_eq!(entries(&backups), taken);
}

#[test]
fn sigterm_mid_backup_exits_promptly_and_the_next_start_completes_the_upgrade() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    genesis(&ctx, "--sim-upgrade v2@3");
    stage_bin(
        &ctx,
        "upgrades/v2",
        &wrapper("--sim-handlers v2 --sim-exit-at 5 0"),
    );
    // Mutable database files (copied, never linked): enough that copying and syncing them takes
    // a while on any disk.
    let db = ctx.home.join("data/application.db");
    fs::create_dir_all(&db).unwrap();
    let chunk = vec![0x5au8; 32 << 20];
    for i in 0..12 {
        fs::write(db.join(format!("{i:06}.log")), &chunk).unwrap();
    }
    let backups = ctx.path("backups");
    let env = with_backups(backups.to_str().unwrap(), &[]);

    let mut cvx = spawn(&ctx, command(&ctx, &env, &[]));
    let partial = || {
        entries(&backups)
            .into_iter()
            .find(|e| e.starts_with(".data-backup-partial-"))
    };
    wait_for("the backup to start copying", LIMIT, || {
        partial().is_some_and(|p| !entries(&backups.join(p).join("application.db")).is_empty())
    });
    let signalled = Instant::now();
    send(cvx.pid(), Signal::TERM);
    let status = cvx.exit();
    let took = signalled.elapsed();

    assert_eq!(status.code(), Some(128 + 15), "{}", cvx.logs());
    assert!(
        took < Duration::from_secs(3),
        "cvx took {took:?} to exit\n{}",
        cvx.logs()
    );
    assert!(
        cvx.stderr().contains("interrupted by a signal"),
        "{}",
        cvx.logs()
    );
    assert_eq!(
        entries(&backups),
        Vec::<String>::new(),
        "no partial copy is left, and nothing looks like a complete backup"
    );
    assert_eq!(current(&ctx), "genesis");

    let (_, stderr) = run_cvx(&ctx, &env, &[], 0);
    assert!(
        logged(&stderr, "v2", 3, "switching before launch"),
        "{stderr}"
    );
    let taken = entries(&backups);
    assert_eq!(taken.len(), 1, "{taken:?}");
    assert_eq!(
        fs::metadata(backups.join(&taken[0]).join("application.db/000011.log"))
            .unwrap()
            .len(),
        32 << 20
    );
    assert_eq!(current(&ctx), "upgrades/v2");
    assert_eq!(applied(&ctx), ["v2"]);
}

#[test]
fn a_backup_dir_inside_data_is_refused_before_anything_starts() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    genesis(&ctx, "--sim-upgrade v2@3");
    let inside = ctx.home.join("data/backups");
    let env = with_backups(inside.to_str().unwrap(), &[]);

    let (_, stderr) = run_cvx(&ctx, &env, &[], 1);

    assert!(stderr.contains("copy into itself"), "{stderr}");
    assert_eq!(height(&ctx), None, "the node never started");
}

#[test]
fn an_interactive_command_on_a_terminal_reads_its_input() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    genesis(&ctx, "");
    // `script` gives the command a pseudo-terminal, and types our stdin into it.
    let mut child = Command::new("script")
        .args(["-q", "-e", "-c"])
        .arg(format!("{CVX} run keys add validator"))
        .arg("/dev/null")
        .env("DAEMON_HOME", &ctx.home)
        .env("DAEMON_NAME", DAEMON)
        .env("NO_COLOR", "1")
        .stdin(Stdio::piped())
        .stdout(fs::File::create(ctx.path("pty.out")).unwrap())
        .stderr(fs::File::create(ctx.path("pty.err")).unwrap())
        .spawn()
        .expect("run script(1), from util-linux");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hunter22\n")
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > LIMIT {
            let _ = child.kill();
            panic!(
                "the command did not finish: it never got its input\n{}",
                read(&ctx.path("pty.out"))
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let out = read(&ctx.path("pty.out"));
    assert!(status.success(), "{status}\n{out}");
    assert!(
        out.contains("Enter keyring passphrase:")
            && out.contains("key validator added (passphrase of 8 characters)"),
        "{out}"
    );
}

#[test]
fn commands_other_than_start_leave_current_alone() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    genesis(&ctx, "--sim-version v1.0.0");
    stage_bin(&ctx, "upgrades/v2", &wrapper("--sim-version v2.0.0"));
    fs::create_dir_all(ctx.home.join("data")).unwrap();
    fs::write(
        ctx.home.join("data/upgrade-info.json"),
        r#"{"name":"v2","height":3}"#,
    )
    .unwrap();

    let mut cmd = Command::new(CVX);
    cmd.env("DAEMON_HOME", &ctx.home)
        .env("DAEMON_NAME", DAEMON)
        .env("UNSAFE_SKIP_BACKUP", "false")
        .args(["run", "version"]);
    let out = cmd.output().unwrap();

    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "v1.0.0");
    assert_eq!(current(&ctx), "genesis", "only start switches");
    assert_eq!(
        entries(&ctx.home),
        ["cosmovisor", "data"],
        "no backup either"
    );
    assert!(!ctx.cosmovisor(".cvx").exists(), "not even a lock file");
}

#[test]
fn a_first_double_dash_separates_cvx_from_the_daemons_arguments() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    genesis(&ctx, "--sim-upgrade v2@3");
    stage_bin(
        &ctx,
        "upgrades/v2",
        &wrapper("--sim-handlers v2 --sim-exit-at 4 0"),
    );
    // `cvx run -- start --home H`: still `start`, so supervised through the upgrade.
    let mut cmd = cvx_run(&ctx, &[]);
    cmd.args(["--", "start", "--home"]).arg(&ctx.home);
    let (_, stderr) = spawn(&ctx, cmd).finish(0);

    assert!(stderr.contains("upgrade detected"), "{stderr}");
    assert_eq!(current(&ctx), "upgrades/v2");
}

/// A manifest pinning the genesis and v2 wrappers (files in the test dir), applied to the home.
fn applied_tree(ctx: &Ctx, genesis_sim: &str, v2_sim: &str) -> (Vec<u8>, Vec<u8>) {
    let g = wrapper(genesis_sim);
    let v2 = wrapper(v2_sim);
    let (g_src, v2_src) = (ctx.path("g-src"), ctx.path("v2-src"));
    fs::write(&g_src, &g).unwrap();
    fs::write(&v2_src, &v2).unwrap();
    let p = platform();
    ctx.manifest(&format!(
        "[chain]\nid = \"t-1\"\ndaemon = \"{DAEMON}\"\n[genesis]\nbinary.\"{p}\" = {{ url = \"{}\", sha256 = \"{}\" }}\n[[upgrade]]\nname = \"v2\"\nbinary.\"{p}\" = {{ url = \"{}\", sha256 = \"{}\" }}\n",
        g_src.display(),
        sha256(&g),
        v2_src.display(),
        sha256(&v2)
    ));
    let out = Command::new(CVX)
        .current_dir(ctx.dir.path())
        .args(["apply", "-q", "--home"])
        .arg(&ctx.home)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (g, v2)
}

#[test]
fn a_staged_binary_changed_after_apply_is_refused_at_launch() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    let (g, _) = applied_tree(&ctx, "--sim-version v1.0.0", "--sim-handlers v2");
    let evil = String::from_utf8(g).unwrap().replace("v1.0.0", "v6.6.6");
    fs::write(ctx.cosmovisor("genesis/bin/simd"), evil).unwrap();

    let (_, stderr) = run_cvx(&ctx, &[], &[], 1);
    assert!(
        stderr.contains("refusing to start the daemon")
            && stderr.contains("changed since cvx staged it"),
        "{stderr}"
    );
    assert!(stderr.contains("hint:"), "{stderr}");
    assert_eq!(height(&ctx), None, "the changed binary never ran");

    let out = Command::new(CVX)
        .env("DAEMON_HOME", &ctx.home)
        .env("DAEMON_NAME", DAEMON)
        .args(["run", "version"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("v6.6.6"));
}

#[test]
fn with_a_manifest_a_binary_must_be_the_pinned_one() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    applied_tree(
        &ctx,
        "--sim-version v1.0.0 --sim-upgrade v2@3",
        "--sim-handlers v2",
    );
    let manifest = ctx.path("cvx.toml");
    let manifest = manifest.to_str().unwrap();
    // Staged by hand over the verified v2 (a receipt no longer holds, and no receipt at all for
    // what replaces it): the manifest's pin decides.
    let v2 = ctx.cosmovisor("upgrades/v2/bin/simd");
    fs::remove_file(&v2).unwrap();
    fs::remove_file(ctx.cosmovisor(".cvx/receipts/upgrades/v2/bin/simd.json")).unwrap();
    stage_bin(
        &ctx,
        "upgrades/v2",
        &wrapper("--sim-handlers v2 --sim-version v9 --sim-exit-at 5 0"),
    );

    let (_, stderr) = run_cvx(&ctx, &[("CVX_MANIFEST", manifest)], &[], 1);
    assert!(
        stderr.contains("is not what the manifest") && stderr.contains("cvx has no receipt"),
        "{stderr}"
    );
    assert_eq!(current(&ctx), "genesis", "{stderr}");

    // Without the manifest, the same binary runs with a warning, as Cosmovisor would run it.
    let (_, stderr) = run_cvx(&ctx, &[], &[], 0);
    assert!(stderr.contains("has no cvx receipt"), "{stderr}");
    assert_eq!(current(&ctx), "upgrades/v2");
}

#[test]
fn apply_waits_while_run_switches_and_a_signal_ends_the_custom_script() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    applied_tree(
        &ctx,
        "--sim-upgrade v2@3",
        "--sim-handlers v2 --sim-exit-at 5 0",
    );
    let out = ctx.dir.path().display().to_string();
    // Not executable: cvx adds u+x as Cosmovisor does.
    ctx.stage(
        "hold.sh",
        format!(
            "#!/bin/sh\ntouch '{out}/script-running'\nwhile [ ! -e '{out}/release' ]; do sleep 0.01; done\n"
        )
        .as_bytes(),
    );
    let env = [("COSMOVISOR_CUSTOM_PREUPGRADE", "hold.sh")];
    let mut cvx = spawn(&ctx, command(&ctx, &env, &[]));
    wait_for("the custom script to run", LIMIT, || {
        ctx.path("script-running").exists()
    });

    let apply = Command::new(CVX)
        .current_dir(ctx.dir.path())
        .env("NO_COLOR", "1")
        .args(["apply", "--lock-timeout", "300ms", "--home"])
        .arg(&ctx.home)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&apply.stderr);
    assert_eq!(apply.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "locked by cvx run (pid {}), upgrading the node",
            cvx.pid()
        )),
        "{stderr}"
    );

    let signalled = Instant::now();
    send(cvx.pid(), Signal::TERM);
    let status = cvx.exit();
    assert_eq!(status.code(), Some(128 + 15), "{}", cvx.logs());
    assert!(
        signalled.elapsed() < Duration::from_secs(3),
        "{}",
        cvx.logs()
    );
    assert!(
        cvx.stderr()
            .contains("interrupted by a signal while running the custom pre-upgrade script"),
        "{}",
        cvx.logs()
    );
    assert_eq!(current(&ctx), "genesis");
    assert_eq!(nodes(&ctx, &cvx), Vec::<i32>::new());
    assert!(
        processes_with(&ctx.path("release")).is_empty(),
        "the script was killed"
    );

    fs::write(ctx.path("release"), "").unwrap();
    let (_, stderr) = run_cvx(&ctx, &env, &[], 0);
    assert!(
        logged(&stderr, "v2", 3, "switched current to upgrades/v2"),
        "{stderr}"
    );
    assert_eq!(applied(&ctx), ["v2"]);
    let apply = Command::new(CVX)
        .current_dir(ctx.dir.path())
        .args(["apply", "--json", "--home"])
        .arg(&ctx.home)
        .output()
        .unwrap();
    assert!(apply.status.success(), "{apply:?}");
}

#[test]
fn a_plan_seen_while_the_rpc_gate_is_closed_fires_when_the_daemon_exits() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    rpc_config(&ctx);
    genesis(
        &ctx,
        "--sim-rpc --sim-rpc-height-offset 5 --sim-upgrade v2@10",
    );
    stage_bin(
        &ctx,
        "upgrades/v2",
        &wrapper("--sim-handlers v2 --sim-exit-at 12 0"),
    );
    let mut cvx = spawn(&ctx, command(&ctx, &[], &[]));
    wait_for("cvx to wait for the node's height", LIMIT, || {
        cvx.stderr()
            .contains("waiting for it to reach the plan's height")
    });
    let node = nodes(&ctx, &cvx);
    assert_eq!(node.len(), 1, "{}", cvx.logs());
    // The node goes down on its own (here: told to by someone else), at its halt height.
    send(node[0], Signal::TERM);

    let status = cvx.exit();
    assert_eq!(status.code(), Some(0), "{}", cvx.logs());
    assert!(
        logged(&cvx.stderr(), "v2", 10, "switched current to upgrades/v2"),
        "{}",
        cvx.logs()
    );
    assert_eq!(applied(&ctx), ["v2"]);
    assert_eq!(height(&ctx), Some(12));
}

#[test]
fn an_invalid_upgrade_info_is_logged_once_per_content() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    genesis(&ctx, "--sim-exit-at 200 0");
    fs::create_dir_all(ctx.home.join("data")).unwrap();
    let file = ctx.home.join("data/upgrade-info.json");
    let mut cvx = spawn(&ctx, command(&ctx, &[], &[]));
    let lines = |cvx: &Running, needle: &str| {
        cvx.stderr()
            .lines()
            .filter(|l| l.contains("is not a valid plan") && l.contains(needle))
            .count()
    };
    // Blocks come every 10 ms and cvx polls every 50 ms: 30 blocks span several polls.
    let polls_pass = || {
        let from = height(&ctx).unwrap_or(0);
        wait_for("30 more blocks", LIMIT, || {
            height(&ctx).unwrap_or(0) >= from + 30
        });
    };

    fs::write(&file, "not json").unwrap();
    wait_for("the first report", LIMIT, || lines(&cvx, "expected") >= 1);
    polls_pass();
    fs::write(&file, r#"{"name":"..","height":50}"#).unwrap();
    wait_for("the second report", LIMIT, || {
        lines(&cvx, "would name the upgrades directory") >= 1
    });
    polls_pass();
    fs::write(&file, "not json").unwrap();
    wait_for("the first content again", LIMIT, || {
        lines(&cvx, "expected") >= 2
    });
    polls_pass();

    send(cvx.pid(), Signal::TERM);
    cvx.exit();
    assert_eq!(lines(&cvx, "expected"), 2, "{}", cvx.logs());
    assert_eq!(
        lines(&cvx, "would name the upgrades directory"),
        1,
        "{}",
        cvx.logs()
    );
    assert_eq!(
        current(&ctx),
        "genesis",
        "a plan named .. is never performed"
    );
}

// ---------------------------------------------------------------------------------------------
// Backups that link table files, and rollback

/// An LSM-shaped database in data/ as goleveldb leaves it, plus the validator's state and the
/// consensus WAL.
pub(crate) fn lsm_data(ctx: &Ctx) {
    let data = ctx.home.join("data");
    let db = data.join("application.db");
    fs::create_dir_all(&db).unwrap();
    fs::create_dir_all(data.join("cs.wal")).unwrap();
    fs::write(db.join("CURRENT"), "MANIFEST-000004\n").unwrap();
    fs::write(db.join("MANIFEST-000004"), vec![4u8; 4096]).unwrap();
    fs::write(db.join("000005.ldb"), vec![5u8; 2 << 20]).unwrap();
    fs::write(db.join("000006.ldb"), vec![6u8; 2 << 20]).unwrap();
    fs::write(db.join("000007.log"), vec![7u8; 64 << 10]).unwrap();
    fs::write(db.join("LOG"), "opened\n").unwrap();
    fs::write(data.join("cs.wal/wal"), vec![9u8; 8192]).unwrap();
    fs::write(
        data.join("priv_validator_state.json"),
        r#"{"height":"2","round":0,"step":3}"#,
    )
    .unwrap();
}

/// Every file under `dir` with its bytes (symlinks as their target), for byte-for-byte equality.
fn contents(dir: &Path) -> Vec<(String, Vec<u8>)> {
    files_under(dir)
        .into_iter()
        .map(|rel| {
            let path = dir.join(&rel);
            let bytes = match fs::read_link(&path) {
                Ok(target) => target.into_os_string().into_encoded_bytes(),
                Err(_) => fs::read(&path).unwrap(),
            };
            (rel, bytes)
        })
        .collect()
}

fn cvx_json(ctx: &Ctx, args: &[&str], code: i32) -> Value {
    let out = Command::new(CVX)
        .current_dir(ctx.dir.path())
        .env("NO_COLOR", "1")
        .args(args)
        .arg("--json")
        .arg("--home")
        .arg(&ctx.home)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(code),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Stage `snapshot.sh`, a COSMOVISOR_CUSTOM_PREUPGRADE script copying data/ to the path returned:
/// it runs after the backup, before the switch, so the copy is data/ exactly as it was at the halt.
fn snapshot_at_the_halt(ctx: &Ctx) -> PathBuf {
    let snapshot = ctx.path("snapshot");
    let hook = ctx.stage(
        "snapshot.sh",
        format!("#!/bin/sh\ncp -a data '{}'\n", snapshot.display()).as_bytes(),
    );
    executable(&hook);
    snapshot
}

#[test]
fn a_backup_links_tables_and_stays_equal_to_data_at_the_halt_while_the_new_binary_writes() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    lsm_data(&ctx);
    genesis(&ctx, "--sim-upgrade v2@3");
    // The new binary writes as a database does: appends to the WAL, rewrites CURRENT, MANIFEST
    // and the validator state in place (same inode), deletes a table.
    let d = "$DAEMON_HOME/data";
    stage_bin(
        &ctx,
        "upgrades/v2",
        &script(
            &format!(
                "printf more >> {d}/application.db/000007.log\n\
                 printf 'MANIFEST-000009\\n' > {d}/application.db/CURRENT\n\
                 printf XXXX | dd of={d}/application.db/MANIFEST-000004 conv=notrunc 2>/dev/null\n\
                 printf '{{\"height\":\"4\"}}' > {d}/priv_validator_state.json\n\
                 rm -f {d}/application.db/000005.ldb\n"
            ),
            "--sim-handlers v2 --sim-exit-at 5 0",
        ),
    );
    let snapshot = snapshot_at_the_halt(&ctx);
    let backups = ctx.path("backups");
    let env = with_backups(
        backups.to_str().unwrap(),
        &[("COSMOVISOR_CUSTOM_PREUPGRADE", "snapshot.sh")],
    );

    let (_, stderr) = run_cvx(&ctx, &env, &[], 0);

    assert_eq!(applied(&ctx), ["v2"]);
    assert!(
        logged(&stderr, "v2", 3, "2 table files linked (4194304 bytes)"),
        "{stderr}"
    );
    assert_eq!(
        read(&ctx.home.join("data/application.db/CURRENT")),
        "MANIFEST-000009\n",
        "the new binary did write"
    );
    let taken = entries(&backups);
    assert_eq!(taken.len(), 1, "{taken:?}");
    let backup = backups.join(&taken[0]);
    assert_eq!(contents(&backup), contents(&snapshot));

    let list = cvx_json(&ctx, &["backup", "list"], 0);
    let b = &list["backups"][0];
    assert_eq!(
        (&b["upgrade"], &b["height"], &b["state"], &b["files_linked"]),
        (&json!("v2"), &json!(3), &json!("ok"), &json!(2)),
        "{list}"
    );
    assert_eq!(b["from_stage"], "genesis");
}

#[test]
fn a_backup_begun_ahead_of_a_known_height_is_equal_to_data_at_the_halt() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    lsm_data(&ctx);
    // The manifest knows v2's height; the node compacts at every block until it halts there.
    let manifest = scheduled_tree(
        &ctx,
        "--sim-block-time 150ms --sim-upgrade v2@25 --sim-compact application.db",
        &[("v2", "--sim-handlers v2 --sim-exit-at 26 0", Some(25), "")],
    );
    let snapshot = snapshot_at_the_halt(&ctx);
    let backups = ctx.path("backups");
    let env = with_backups(
        backups.to_str().unwrap(),
        &[
            ("COSMOVISOR_CUSTOM_PREUPGRADE", "snapshot.sh"),
            ("CVX_MANIFEST", manifest.as_str()),
        ],
    );

    let (_, stderr) = run_cvx(&ctx, &env, &[], 0);

    assert_eq!(applied(&ctx), ["v2"]);
    assert!(
        logged(&stderr, "v2", 25, "beginning the backup ahead"),
        "{stderr}"
    );
    let taken = entries(&backups);
    assert_eq!(taken.len(), 1, "nothing but the backup is left: {taken:?}");
    let backup = backups.join(&taken[0]);
    assert_eq!(contents(&backup), contents(&snapshot));
    let list = cvx_json(&ctx, &["backup", "list"], 0);
    let b = &list["backups"][0];
    let (linked, ahead) = (
        b["files_linked"].as_u64().unwrap(),
        b["files_linked_ahead"].as_u64().unwrap(),
    );
    assert!(
        0 < ahead && ahead < linked,
        "some tables linked ahead, the newer ones at the halt: {list}"
    );
    assert!(
        logged(
            &stderr,
            "v2",
            25,
            &format!("{ahead} of the tables were linked ahead")
        ),
        "{stderr}"
    );
}

#[test]
fn a_backup_begun_ahead_is_removed_when_the_node_passes_the_height_without_halting() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    lsm_data(&ctx);
    // The manifest says v2 halts at 12, but no such plan passed on chain: the node goes on.
    let manifest = scheduled_tree(
        &ctx,
        "--sim-block-time 50ms --sim-exit-at 40 3",
        &[("v2", "--sim-handlers v2", Some(12), "")],
    );
    let backups = ctx.path("backups");
    let env = with_backups(
        backups.to_str().unwrap(),
        &[("CVX_MANIFEST", manifest.as_str())],
    );

    let (_, stderr) = run_cvx(&ctx, &env, &[], 3);

    assert!(
        logged(&stderr, "v2", 12, "beginning the backup ahead"),
        "{stderr}"
    );
    assert!(
        logged(
            &stderr,
            "v2",
            12,
            "past the upgrade's without halting: removing the backup begun ahead"
        ),
        "{stderr}"
    );
    assert_eq!(entries(&backups), Vec::<String>::new());
    assert_eq!(
        fs::metadata(ctx.home.join("data/application.db/000005.ldb"))
            .unwrap()
            .nlink(),
        1,
        "no link to the node's tables is left"
    );
}

#[test]
fn a_table_modified_in_place_after_the_backup_makes_it_damaged_and_unrestorable() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    lsm_data(&ctx);
    genesis(&ctx, "--sim-upgrade v2@3");
    stage_bin(
        &ctx,
        "upgrades/v2",
        &wrapper("--sim-handlers v2 --sim-exit-at 5 0"),
    );
    let backups = ctx.path("backups");
    run_cvx(&ctx, &with_backups(backups.to_str().unwrap(), &[]), &[], 0);
    let table = ctx.home.join("data/application.db/000006.ldb");
    assert_eq!(
        fs::metadata(&table).unwrap().nlink(),
        2,
        "this test needs the backup to hard-link tables (a file system without reflinks)"
    );

    // Not what these databases do, but possible: a table rewritten in place.
    fs::OpenOptions::new()
        .append(true)
        .open(&table)
        .unwrap()
        .write_all(b"!")
        .unwrap();

    let list = cvx_json(&ctx, &["backup", "list"], 0);
    assert_eq!(list["backups"][0]["state"], "damaged", "{list}");
    let out = Command::new(CVX)
        .env("NO_COLOR", "1")
        .args(["rollback", "v2", "--home"])
        .arg(&ctx.home)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("is damaged") && stderr.contains("000006.ldb"),
        "{stderr}"
    );
    assert_eq!(current(&ctx), "upgrades/v2", "nothing was touched");
}

#[test]
fn rollback_undoes_an_upgrade_and_the_old_binary_runs_again_from_the_pre_upgrade_state() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    lsm_data(&ctx);
    genesis(
        &ctx,
        "--sim-version v1.0.0 --sim-upgrade v2@3 --sim-exit-at 6 0",
    );
    stage_bin(
        &ctx,
        "upgrades/v2",
        &wrapper("--sim-version v2.0.0 --sim-handlers v2 --sim-exit-at 5 0"),
    );
    let backups = ctx.path("backups");
    let env = with_backups(backups.to_str().unwrap(), &[]);
    run_cvx(&ctx, &env, &[], 0);
    assert_eq!(applied(&ctx), ["v2"], "state migrated by v2");
    assert_eq!(height(&ctx), Some(5));

    // While cvx run supervises the home (v2 now running on), a rollback and a second supervisor
    // are refused.
    stage_bin(
        &ctx,
        "upgrades/v2",
        &wrapper("--sim-version v2.0.0 --sim-handlers v2"),
    );
    let mut held = spawn(&ctx, command(&ctx, &[], &[]));
    wait_for("the supervisor to start the node", LIMIT, || {
        held.stderr().contains("started ")
    });
    let out = Command::new(CVX)
        .env("NO_COLOR", "1")
        .args(["rollback", "v2", "--home"])
        .arg(&ctx.home)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cvx run (pid {}) supervises", held.pid())),
        "{stderr}"
    );
    let (_, second) = run_cvx(&ctx, &env, &[], 1);
    assert!(
        second.contains(&format!("cvx run (pid {}) already supervises", held.pid())),
        "{second}"
    );
    send(held.pid(), Signal::TERM);
    held.exit();

    let check = cvx_json(&ctx, &["rollback", "v2", "--check"], 0);
    assert_eq!(
        (&check["done"], &check["current_from"], &check["current_to"]),
        (&json!(false), &json!("upgrades/v2"), &json!("genesis")),
        "{check}"
    );
    assert_eq!(current(&ctx), "upgrades/v2", "--check changes nothing");

    let out = Command::new(CVX)
        .env("NO_COLOR", "1")
        .args(["rollback", "v2", "--home"])
        .arg(&ctx.home)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let restart = format!(
        "cvx run start --home {} --unsafe-skip-upgrades 3",
        ctx.home.display()
    );
    assert!(stdout.contains(&restart), "{stdout}");
    assert_eq!(current(&ctx), "genesis");
    assert_eq!(applied(&ctx), Vec::<String>::new(), "the pre-upgrade state");
    let kept: Vec<String> = entries(&ctx.home)
        .into_iter()
        .filter(|e| e.starts_with("data-rolled-back-"))
        .collect();
    assert_eq!(kept.len(), 1, "{:?}", entries(&ctx.home));
    assert_eq!(read(&ctx.home.join(&kept[0]).join("applied")).trim(), "v2");

    // The printed command: v1 skips the upgrade it halted for and goes on from height 3.
    let (stdout, stderr) = run_cvx(&ctx, &env, &["--unsafe-skip-upgrades", "3"], 0);
    assert!(stdout.contains("version=v1.0.0"), "{stdout}");
    assert!(stderr.contains("skipping the upgrade"), "{stderr}");
    assert_eq!(current(&ctx), "genesis");
    assert_eq!(applied(&ctx), Vec::<String>::new());
    assert_eq!(height(&ctx), Some(6));
}

#[test]
fn an_auto_downloaded_archive_keeps_its_libraries_beside_the_binary() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    let server = Server::start();
    let url = server.url("/simd.zip");
    // The new binary refuses to run without the library shipped beside it, as a wasmd build
    // linked against libwasmvm does.
    let v2 = script(
        "test -f \"$DAEMON_HOME/cosmovisor/current/lib/libwasmvm.x86_64.so\" || exit 42\n",
        "--sim-handlers v2 --sim-exit-at 5 0",
    );
    let lib = b"\x7fELF not really libwasmvm".to_vec();
    let zipped = zip(&[("bin/simd", &v2), ("lib/libwasmvm.x86_64.so", &lib)]);
    server.add("/simd.zip", zipped.clone(), Fault::None);
    genesis_with_info(
        &ctx,
        &format!(
            r#"{{"binaries":{{"{}":"{url}?checksum=sha256:{}"}}}}"#,
            platform(),
            sha256(&zipped)
        ),
    );

    let (_, stderr) = run_cvx(&ctx, &[DOWNLOAD], &[], 0);

    assert_downloaded(&ctx, &v2, &url);
    assert_eq!(
        fs::read(ctx.cosmovisor("upgrades/v2/lib/libwasmvm.x86_64.so")).unwrap(),
        lib,
        "{stderr}"
    );
    let receipt = json(&ctx.cosmovisor(".cvx/receipts/upgrades/v2/lib/libwasmvm.x86_64.so.json"));
    assert_eq!(receipt["sha256"], sha256(&lib));
    assert_eq!(receipt["member"], "lib/libwasmvm.x86_64.so");
}

#[test]
fn an_auto_downloaded_decompression_bomb_is_refused_without_filling_the_disk() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    let server = Server::start();
    let url = server.url("/simd.zip");
    // 32 MiB of zeros deflate to a few tens of KiB: far under the download cap, far over the
    // unpacked one.
    let zipped = zip(&[("bin/simd", &vec![0u8; 32 << 20])]);
    assert!(zipped.len() < 1 << 20);
    server.add("/simd.zip", zipped.clone(), Fault::None);
    genesis_with_info(
        &ctx,
        &format!(
            r#"{{"binaries":{{"{}":"{url}?checksum=sha256:{}"}}}}"#,
            platform(),
            sha256(&zipped)
        ),
    );

    let (_, stderr) = run_cvx(&ctx, &[DOWNLOAD, ("CVX_MAX_SIZE", "1")], &[], 1);

    assert!(
        stderr.contains("unpacking member `bin/simd`")
            && stderr.contains("size limit of 1 MiB")
            && stderr.contains("CVX_MAX_SIZE"),
        "{stderr}"
    );
    assert_eq!(current(&ctx), "genesis");
    assert!(!ctx.cosmovisor("upgrades/v2/bin/simd").exists());
    fn largest(dir: &Path) -> u64 {
        fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| {
                        let meta = fs::symlink_metadata(e.path()).unwrap();
                        if meta.is_dir() {
                            largest(&e.path())
                        } else {
                            meta.len()
                        }
                    })
                    .max()
                    .unwrap_or(0)
            })
            .unwrap_or(0)
    }
    assert!(largest(&ctx.home) <= 1 << 20, "a file grew past the cap");
}

// ---------------------------------------------------------------------------------------------
// Scheduled upgrades (trigger = "halt-height")

/// Stages as `cvx apply` does from a manifest pinning genesis and `upgrades` (name, simnode
/// options, height, trigger); every build serves the RPC of config.toml and records its
/// arguments in `args-<version>`. Returns the manifest's path for CVX_MANIFEST.
fn scheduled_tree(
    ctx: &Ctx,
    genesis_sim: &str,
    upgrades: &[(&str, &str, Option<u64>, &str)],
) -> String {
    rpc_config(ctx);
    let p = platform();
    let out = ctx.dir.path().display().to_string();
    let build = |version: &str, sim: &str| {
        let bytes = script(
            &format!("echo \"$*\" >> '{out}/args-{version}'\n"),
            &format!("--sim-rpc --sim-chain-id t-1 {sim}"),
        );
        let src = ctx.path(&format!("{version}-src"));
        fs::write(&src, &bytes).unwrap();
        format!(
            "binary.\"{p}\" = {{ url = \"{}\", sha256 = \"{}\" }}\n",
            src.display(),
            sha256(&bytes)
        )
    };
    let mut text = format!(
        "[chain]\nid = \"t-1\"\ndaemon = \"{DAEMON}\"\n[genesis]\n{}",
        build("genesis", genesis_sim)
    );
    for (name, sim, height, trigger) in upgrades {
        text.push_str(&format!("[[upgrade]]\nname = \"{name}\"\n"));
        if let Some(h) = height {
            text.push_str(&format!("height = {h}\n"));
        }
        if !trigger.is_empty() {
            text.push_str(&format!("trigger = \"{trigger}\"\n"));
        }
        text.push_str(&build(name, sim));
    }
    let manifest = ctx.manifest(&text);
    let out = Command::new(CVX)
        .current_dir(ctx.dir.path())
        .args(["apply", "-q", "--home"])
        .arg(&ctx.home)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    manifest.display().to_string()
}

/// The arguments each start of `version`'s binary got (pre-upgrade runs included).
fn starts(ctx: &Ctx, version: &str) -> Vec<String> {
    read(&ctx.path(&format!("args-{version}")))
        .lines()
        .filter(|l| l.starts_with("start"))
        .map(String::from)
        .collect()
}

fn scheduled_case(flavour: &str) {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    // Blocks slower than cvx's checks, as on a real chain (seconds against 300 ms).
    let manifest = scheduled_tree(
        &ctx,
        &format!("--sim-block-time 60ms --sim-halt {flavour}"),
        &[(
            "v1.1-patch",
            "--sim-version v1.1.0 --sim-exit-at 8 0",
            Some(5),
            "halt-height",
        )],
    );
    let env = [
        ("CVX_MANIFEST", manifest.as_str()),
        ("DAEMON_POLL_INTERVAL", "15ms"),
    ];

    let (stdout, stderr) = run_cvx(&ctx, &env, &[], 0);

    let g = starts(&ctx, "genesis");
    assert_eq!(g.len(), 1, "{g:?}");
    assert!(g[0].ends_with("--halt-height 5"), "{g:?}");
    assert!(stdout.contains("halt-height=5"), "{stdout}");
    assert!(
        logged(
            &stderr,
            "v1.1-patch",
            5,
            "switched current to upgrades/v1.1-patch"
        ),
        "{stderr}"
    );
    assert_eq!(current(&ctx), "upgrades/v1.1-patch");
    assert_eq!(
        starts(&ctx, "v1.1-patch")
            .iter()
            .filter(|a| a.contains("--halt-height"))
            .count(),
        0,
        "no scheduled upgrade after it"
    );
    assert_eq!(
        height(&ctx),
        Some(8),
        "the patched binary carried on from the halt"
    );
}

#[test]
fn a_scheduled_upgrade_when_the_node_stays_up_at_its_halt_height() {
    scheduled_case("stay");
}

#[test]
fn a_scheduled_upgrade_when_the_node_exits_at_its_halt_height() {
    scheduled_case("exit");
}

#[test]
fn two_scheduled_upgrades_in_a_row_and_none_without_a_manifest() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    let manifest = scheduled_tree(
        &ctx,
        "",
        &[
            ("v1.1", "--sim-version v1.1.0", Some(4), "halt-height"),
            (
                "v1.2",
                "--sim-version v1.2.0 --sim-exit-at 9 0",
                Some(7),
                "halt-height",
            ),
        ],
    );
    let (_, stderr) = run_cvx(&ctx, &[("CVX_MANIFEST", manifest.as_str())], &[], 0);

    assert_eq!(current(&ctx), "upgrades/v1.2", "{stderr}");
    assert!(starts(&ctx, "genesis")[0].ends_with("--halt-height 4"));
    assert!(starts(&ctx, "v1.1")[0].ends_with("--halt-height 7"));
    assert!(!starts(&ctx, "v1.2")[0].contains("--halt-height"));
    assert_eq!(height(&ctx), Some(9));

    // Without CVX_MANIFEST cvx knows no schedule and adds nothing.
    fs::remove_file(ctx.cosmovisor("current")).unwrap();
    std::os::unix::fs::symlink("genesis", ctx.cosmovisor("current")).unwrap();
    fs::remove_dir_all(ctx.home.join("data")).unwrap();
    fs::remove_file(ctx.path("args-genesis")).unwrap();
    let mut cvx = spawn(&ctx, command(&ctx, &[], &[]));
    wait_for("the node to pass height 6", LIMIT, || {
        height(&ctx).unwrap_or(0) > 6
    });
    send(cvx.pid(), Signal::TERM);
    cvx.exit();
    assert!(!starts(&ctx, "genesis")[0].contains("--halt-height"));
    assert_eq!(current(&ctx), "genesis");
}

#[test]
fn governance_upgrades_get_no_halt_height_and_a_same_height_plan_is_performed_once() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    // v2 is governance; v3 is scheduled at 6 and also proposed on chain at 6.
    let manifest = scheduled_tree(
        &ctx,
        "--sim-upgrade v2@3",
        &[
            ("v2", "--sim-handlers v2 --sim-upgrade v3@6", Some(3), ""),
            (
                "v3",
                "--sim-handlers v3 --sim-exit-at 8 0",
                Some(6),
                "halt-height",
            ),
        ],
    );
    let (_, stderr) = run_cvx(&ctx, &[("CVX_MANIFEST", manifest.as_str())], &[], 0);

    assert!(
        starts(&ctx, "genesis")[0].ends_with("--halt-height 6"),
        "the nearest scheduled upgrade, even past a governance one"
    );
    assert_eq!(current(&ctx), "upgrades/v3");
    assert_eq!(applied(&ctx), ["v2", "v3"]);
    assert_eq!(
        stderr.matches("switched current to upgrades/v3").count(),
        1,
        "{stderr}"
    );
    assert_eq!(height(&ctx), Some(8));
}

#[test]
fn the_operators_halt_height_wins_and_cvx_never_switches_early() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    let manifest = scheduled_tree(
        &ctx,
        "",
        &[("v1.1", "--sim-version v1.1.0", Some(8), "halt-height")],
    );
    let env = [
        ("CVX_MANIFEST", manifest.as_str()),
        ("CVX_LOG", "cvx=debug"),
    ];
    let mut cvx = spawn(&ctx, command(&ctx, &env, &["--halt-height", "4"]));
    wait_for("the node to halt at the operator's height", LIMIT, || {
        cvx.stdout().contains("halt-height=4")
    });
    // Well past the stall window: ten checks in a row see the node halted at 4.
    wait_for("ten RPC checks of the halted node", LIMIT, || {
        cvx.stderr()
            .matches("the node's RPC reports height 4")
            .count()
            >= 10
    });
    assert_eq!(current(&ctx), "genesis", "{}", cvx.logs());
    assert!(
        !cvx.stderr().contains("stopping the daemon"),
        "{}",
        cvx.logs()
    );
    let g = starts(&ctx, "genesis");
    assert_eq!(g[0].matches("--halt-height").count(), 1, "{g:?}");

    send(cvx.pid(), Signal::TERM);
    assert_eq!(cvx.exit().code(), Some(0), "{}", cvx.logs());
    assert_eq!(current(&ctx), "genesis");
}

#[test]
fn an_exit_below_the_halt_height_is_not_an_upgrade() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    let manifest = scheduled_tree(
        &ctx,
        "--sim-exit-at 3 7",
        &[("v1.1", "--sim-version v1.1.0", Some(9), "halt-height")],
    );
    let (_, stderr) = run_cvx(&ctx, &[("CVX_MANIFEST", manifest.as_str())], &[], 7);
    assert!(stderr.contains("exited by itself"), "{stderr}");
    assert_eq!(current(&ctx), "genesis");
}

#[test]
fn a_restarted_cvx_completes_the_upgrade_of_a_node_stuck_at_its_halt_height() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    let manifest = scheduled_tree(
        &ctx,
        "",
        &[(
            "v1.1",
            "--sim-version v1.1.0 --sim-exit-at 7 0",
            Some(5),
            "halt-height",
        )],
    );
    // The node halted at 5 and stays there, as if cvx had died before it noticed.
    let mut node = Command::new(ctx.cosmovisor("genesis/bin/simd"))
        .args(["start", "--home"])
        .arg(&ctx.home)
        .args(["--halt-height", "5"])
        .stdout(fs::File::create(ctx.path("node.out")).unwrap())
        .spawn()
        .unwrap();
    wait_for("the node to halt at 5", LIMIT, || {
        read(&ctx.path("node.out")).contains("halt-height=5")
    });
    send(node.id() as i32, Signal::TERM);
    node.wait().unwrap();
    assert_eq!(height(&ctx), Some(5));

    let (_, stderr) = run_cvx(&ctx, &[("CVX_MANIFEST", manifest.as_str())], &[], 0);

    assert!(
        logged(&stderr, "v1.1", 5, "the node halted at height 5"),
        "{stderr}"
    );
    assert_eq!(current(&ctx), "upgrades/v1.1");
    assert_eq!(height(&ctx), Some(7));
}

#[test]
fn a_scheduled_upgrade_without_the_nodes_rpc_is_refused_at_start() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    let manifest = scheduled_tree(
        &ctx,
        "",
        &[("v1.1", "--sim-version v1.1.0", Some(5), "halt-height")],
    );
    fs::remove_file(ctx.home.join("config/config.toml")).unwrap();

    let (_, stderr) = run_cvx(&ctx, &[("CVX_MANIFEST", manifest.as_str())], &[], 1);

    assert!(
        stderr.contains("is scheduled at height 5") && stderr.contains("[rpc] laddr"),
        "{stderr}"
    );
    assert_eq!(height(&ctx), None, "the node never started");
}

// ---------------------------------------------------------------------------------------------
// History, the notification hook, time limits, stopping a stubborn daemon

/// A hook that appends its event name and its stdin (one JSON line) to `events` in the test dir.
fn recording_hook(ctx: &Ctx, extra: &str) -> String {
    let events = ctx.path("events");
    let hook = ctx.path("hook.sh");
    fs::write(
        &hook,
        format!(
            "#!/bin/sh\n{{ printf '%s ' \"$1\"; cat; echo; }} >> '{}'\n{extra}",
            events.display()
        ),
    )
    .unwrap();
    executable(&hook);
    hook.display().to_string()
}

fn events(ctx: &Ctx) -> Vec<(String, Value)> {
    read(&ctx.path("events"))
        .lines()
        .map(|l| {
            let (event, json) = l.split_once(' ').unwrap();
            (event.to_string(), serde_json::from_str(json).unwrap())
        })
        .collect()
}

#[test]
fn upgrades_are_recorded_in_the_history_and_told_to_the_hook() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    genesis(&ctx, "--sim-upgrade v2@3");
    stage_bin(
        &ctx,
        "upgrades/v2",
        &wrapper("--sim-handlers v2 --sim-exit-at 5 0"),
    );
    let hook = recording_hook(&ctx, "exit 1\n");
    let backups = ctx.path("backups");
    let env = with_backups(backups.to_str().unwrap(), &[("CVX_UPGRADE_HOOK", &hook)]);

    let (_, stderr) = run_cvx(&ctx, &env, &[], 0);

    assert_eq!(applied(&ctx), ["v2"], "a failing hook changes nothing");
    assert!(
        stderr.contains("CVX_UPGRADE_HOOK"),
        "its failure is logged: {stderr}"
    );
    let history = cvx_json(&ctx, &["history"], 0);
    let entry = &history["upgrades"][0];
    assert_eq!(
        history["upgrades"].as_array().unwrap().len(),
        1,
        "{history}"
    );
    assert_eq!(
        (
            &entry["upgrade"],
            &entry["height"],
            &entry["trigger"],
            &entry["result"]
        ),
        (
            &json!("v2"),
            &json!(3),
            &json!("governance"),
            &json!("done")
        )
    );
    assert!(entry["downtime_ms"].as_u64().is_some(), "{entry}");
    assert!(entry["started_at"].as_str().unwrap() >= entry["detected_at"].as_str().unwrap());
    let backup = PathBuf::from(entry["backup"].as_str().unwrap());
    assert_eq!(backup.parent(), Some(backups.as_path()));

    let events = events(&ctx);
    let names: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(names, ["detected", "done"]);
    assert_eq!(events[1].1["event"], "done");
    assert_eq!(events[1].1["upgrade"], "v2");
    assert_eq!(events[1].1["daemon"], DAEMON);
    assert_eq!(events[1].1["downtime_ms"], entry["downtime_ms"]);

    let out = Command::new(CVX)
        .env("NO_COLOR", "1")
        .args(["history", "--home"])
        .arg(&ctx.home)
        .output()
        .unwrap();
    let human = String::from_utf8_lossy(&out.stdout);
    assert!(
        human.starts_with("done v2 at height 3 (governance), detected "),
        "{human}"
    );
}

#[test]
fn a_failed_upgrade_is_recorded_and_a_hanging_hook_is_killed() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    genesis(&ctx, "--sim-upgrade v2@3");
    let hook = recording_hook(&ctx, "exec sleep 30\n");
    let env = [
        ("CVX_UPGRADE_HOOK", hook.as_str()),
        // Room for the hook to write its line on a loaded machine before it hangs.
        ("CVX_UPGRADE_HOOK_TIMEOUT", "1s"),
    ];

    let started = Instant::now();
    let (_, stderr) = run_cvx(&ctx, &env, &[], 1);

    assert!(started.elapsed() < Duration::from_secs(8), "{stderr}");
    assert!(stderr.contains("did not finish within 1s"), "{stderr}");
    let history = cvx_json(&ctx, &["history"], 0);
    let entry = &history["upgrades"][0];
    assert_eq!(entry["result"], "failed");
    assert!(
        entry["error"].as_str().unwrap().contains("no binary at"),
        "{entry}"
    );
    let names: Vec<String> = events(&ctx).into_iter().map(|(e, _)| e).collect();
    assert_eq!(names, ["detected", "failed"]);
}

#[test]
fn a_custom_script_or_pre_upgrade_that_hangs_is_killed_at_its_time_limit() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    genesis(&ctx, "--sim-upgrade v2@3");
    stage_bin(
        &ctx,
        "upgrades/v2",
        &script(
            "if [ \"$1\" = pre-upgrade ] && [ ! -e \"$DAEMON_HOME/quick\" ]; then sleep 30; fi\n",
            "--sim-handlers v2 --sim-exit-at 5 0",
        ),
    );
    let hang = ctx.stage("hang.sh", b"#!/bin/sh\nsleep 30\n");
    executable(&hang);

    let (_, stderr) = run_cvx(
        &ctx,
        &[
            ("COSMOVISOR_CUSTOM_PREUPGRADE", "hang.sh"),
            ("CVX_CUSTOM_PREUPGRADE_TIMEOUT", "200ms"),
        ],
        &[],
        1,
    );
    assert!(
        stderr.contains("did not finish within CVX_CUSTOM_PREUPGRADE_TIMEOUT=200ms; killed it"),
        "{stderr}"
    );
    assert_eq!(current(&ctx), "genesis");

    let (_, stderr) = run_cvx(&ctx, &[("CVX_PREUPGRADE_TIMEOUT", "200ms")], &[], 1);
    assert!(
        stderr.contains(
            "pre-upgrade of the new binary did not finish within CVX_PREUPGRADE_TIMEOUT=200ms"
        ),
        "{stderr}"
    );
    assert!(
        processes_with(&ctx.home).is_empty(),
        "the hung pre-upgrade was killed"
    );
}

#[test]
fn a_daemon_that_ignores_the_stop_signal_is_killed_after_the_grace() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    let started = ctx.path("started");
    stage_bin(
        &ctx,
        "genesis",
        format!(
            "#!/bin/sh\ntrap '' TERM INT\ntouch '{}'\nwhile true; do sleep 0.05; done\n",
            started.display()
        )
        .as_bytes(),
    );
    std::os::unix::fs::symlink("genesis", ctx.cosmovisor("current")).unwrap();
    let mut cvx = spawn(
        &ctx,
        command(&ctx, &[("DAEMON_SHUTDOWN_GRACE", "300ms")], &[]),
    );
    wait_for("the daemon to start", LIMIT, || started.exists());

    let signalled = Instant::now();
    send(cvx.pid(), Signal::TERM);
    let status = cvx.exit();

    assert_eq!(status.code(), Some(128 + 9), "{}", cvx.logs());
    assert!(
        signalled.elapsed() < Duration::from_secs(3),
        "{}",
        cvx.logs()
    );
    assert!(
        cvx.stderr()
            .contains("did not exit within 300ms of the signal"),
        "{}",
        cvx.logs()
    );
    assert_eq!(processes_with(&ctx.home), vec![], "nothing left running");
}

// ---------------------------------------------------------------------------------------------
// Preflight and the node's chain id

#[test]
fn a_tree_the_supervisor_could_not_switch_is_refused_before_the_node_starts() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    genesis(&ctx, "");
    // Root's tree, readable by all; the supervisor runs as nobody.
    fs::set_permissions(ctx.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        CVX,
        "run",
        "start",
        "--home",
    ])
    .arg(&ctx.home)
    .env("DAEMON_HOME", &ctx.home)
    .env("DAEMON_NAME", DAEMON)
    .env("NO_COLOR", "1");
    let out = cmd.output().expect("setpriv, from util-linux");
    let stderr = String::from_utf8_lossy(&out.stderr);

    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cannot write {}",
            ctx.cosmovisor("")
                .display()
                .to_string()
                .trim_end_matches('/')
        )) && stderr.contains("hint: cvx run must be able to write"),
        "{stderr}"
    );
    assert_eq!(height(&ctx), None, "the node never started");
}

#[test]
fn problems_days_away_are_warned_at_start_and_while_they_last_without_stopping_the_node() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    applied_tree(&ctx, "--sim-upgrade v2@400", "--sim-handlers v2");
    // The next upgrade's binary is gone; the backup directory does not exist; no grace.
    fs::remove_dir_all(ctx.cosmovisor("upgrades/v2")).unwrap();
    let backups = ctx.path("backups");
    let manifest = ctx.path("cvx.toml");
    let env = with_backups(
        backups.to_str().unwrap(),
        &[
            ("CVX_MANIFEST", manifest.to_str().unwrap()),
            ("CVX_PREFLIGHT_INTERVAL", "100ms"),
        ],
    );
    let mut cvx = spawn(&ctx, command(&ctx, &env, &[]));
    for what in [
        "does not exist: create it",
        "DAEMON_SHUTDOWN_GRACE is not set",
        "the next upgrade, \"v2\", is not ready on this host",
    ] {
        wait_for(what, LIMIT, || cvx.stderr().matches(what).count() >= 2);
    }
    let started = cvx
        .stderr()
        .find("started ")
        .expect("the node runs meanwhile");
    let first_warning = cvx.stderr().find("preflight:").unwrap();
    assert!(
        first_warning < started,
        "warned before the launch:\n{}",
        cvx.logs()
    );

    fs::create_dir_all(&backups).unwrap();
    wait_for("the resolved backup directory", LIMIT, || {
        cvx.stderr()
            .contains("preflight: resolved: DAEMON_DATA_BACKUP_DIR")
    });
    assert!(cvx.child.try_wait().unwrap().is_none(), "{}", cvx.logs());
    assert!(height(&ctx).unwrap_or(0) > 0);
    send(cvx.pid(), Signal::TERM);
    assert_eq!(cvx.exit().code(), Some(0));
}

#[test]
fn an_rpc_of_another_chain_is_not_trusted_by_the_height_gate() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    rpc_config(&ctx);
    // The RPC would hold the gate closed (it reports 5 below the real height), but it answers
    // for another chain than the manifest's.
    applied_tree(
        &ctx,
        "--sim-rpc --sim-chain-id other-1 --sim-rpc-height-offset 5 --sim-upgrade v2@10",
        "--sim-handlers v2 --sim-exit-at 12 0",
    );
    let manifest = ctx.path("cvx.toml");

    let (_, stderr) = run_cvx(
        &ctx,
        &[("CVX_MANIFEST", manifest.to_str().unwrap())],
        &[],
        0,
    );

    assert!(
        stderr.contains("reports chain id \"other-1\", not the manifest's \"t-1\""),
        "{stderr}"
    );
    assert!(
        !stderr.contains("waiting for it to reach the plan's height"),
        "{stderr}"
    );
    assert_eq!(current(&ctx), "upgrades/v2");
    assert_eq!(applied(&ctx), ["v2"]);
}

#[test]
fn a_manifest_of_governance_upgrades_adds_no_halt_height() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    let manifest = scheduled_tree(
        &ctx,
        "--sim-upgrade v2@3",
        &[("v2", "--sim-handlers v2 --sim-exit-at 5 0", Some(3), "")],
    );
    let (_, stderr) = run_cvx(&ctx, &[("CVX_MANIFEST", manifest.as_str())], &[], 0);
    assert_eq!(current(&ctx), "upgrades/v2", "{stderr}");
    for version in ["genesis", "v2"] {
        let args = starts(&ctx, version);
        assert_eq!(args.len(), 1, "{args:?}");
        assert!(!args[0].contains("--halt-height"), "{version}: {args:?}");
    }
}
