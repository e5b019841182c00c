//! `cvx run` end to end: the real supervisor binary supervising simnode, the simulated node,
//! staged as wrapper scripts in a real Cosmovisor tree (DESIGN §5).
//!
//! Every run's stdout and stderr go to files (never pipes: a daemon left behind by a bug would
//! hold a pipe open and hang the test), and every test holds a `Reaper` that kills whatever still
//! runs with the test's home in its command line, so a failed assertion leaves no node behind.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};
use serde_json::Value;

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

fn zip(entries: &[(&str, &[u8])]) -> Vec<u8> {
    use std::io::Write;
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
    cmd.args(["run", "start", "--home"])
        .arg(&ctx.home)
        .args(extra);
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
    let date = dirs[0]
        .strip_prefix("data-backup-")
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
    let g = wrapper("--sim-version v1.0.0 --sim-upgrade v2@3");
    let v2 = wrapper("--sim-version v2.0.0 --sim-handlers v2 --sim-exit-at 5 0");
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
