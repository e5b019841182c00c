//! simnode: a simulated Cosmos SDK node daemon for cvx's end-to-end tests, benchmarks and demo.
//!
//! It behaves towards a supervisor like a real node (DESIGN §3, §5): it makes blocks, persists its
//! height, halts at a scheduled upgrade writing `data/upgrade-info.json` the way x/upgrade does
//! (truncate, then a non-atomic write), stays alive while halted, runs the migration when restarted
//! at the halt height on a build that has the handler, answers `pre-upgrade`, serves a minimal
//! CometBFT `/status`, and exits 0 after flushing on SIGTERM/SIGINT.
//!
//! Invocation: `simnode [--sim-* options...] <daemon args...>`, normally through a per-version
//! wrapper script staged as `<tree>/bin/<daemon>`:
//! `#!/bin/sh\nexec /path/to/simnode --sim-version v2.0.0 --sim-handlers v2 "$@"`.
//! The simnode options must come first; the first argument that does not start with `--sim-`
//! begins the daemon's own arguments (`start --home X`, `version`, `pre-upgrade`).
//!
//! It deliberately shares no parser with the supervisor it exercises (upgrade-info.json,
//! `--unsafe-skip-upgrades`, config.toml's `[rpc] laddr`): a test double that read the contract
//! through cvx's own code could not catch cvx misreading it.

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokio::signal::unix::{Signal, SignalKind, signal};

const USAGE: &str = "\
usage: simnode [SIM OPTIONS] <version | pre-upgrade | start | keys add NAME> [--home DIR] [DAEMON ARGS]

sim options (must come before the daemon's arguments):
  --sim-version V                     version printed by `version` (default v0.0.0-simnode)
  --sim-handlers A,B                  upgrade names this build has handlers for (repeatable)
  --sim-block-time DUR                time between blocks, Go syntax (default 100ms)
  --sim-upgrade NAME@HEIGHT[@INFO]    on-chain plan: halt for NAME at HEIGHT (repeatable)
  --sim-pre-upgrade-exit CODE         exit code of `pre-upgrade` (default 0)
  --sim-pre-upgrade-fail-times N      exit CODE only for the first N `pre-upgrade` calls, then 0
  --sim-flush DUR                     flush delay on SIGTERM/SIGINT before exiting 0 (default 0)
  --sim-rpc                           serve GET /status at [rpc] laddr of $HOME/config/config.toml
  --sim-rpc-height-offset N           report a height N lower than the real one on /status
  --sim-chain-id ID                   the chain id /status reports (default simnet)
  --sim-exit-at HEIGHT CODE           exit with CODE on reaching HEIGHT
  --sim-halt exit|stay                what `--halt-height H` (a daemon argument) does once H is
                                      committed: exit 0 (SDK <= 0.47), or stay up refusing the
                                      next block with the RPC alive (SDK 0.50; the default)
  --sim-compact DIR                   as an LSM database in data/DIR works: at each block a line
                                      appended to its log (*.log) and a new table file, and at
                                      every other block its oldest table deleted

home: --home DIR in the daemon arguments, else $DAEMON_HOME";

/// Exit code for usage errors.
const USAGE_ERROR: u8 = 2;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Plan {
    name: String,
    height: u64,
    info: String,
}

#[derive(Debug)]
struct Sim {
    version: String,
    handlers: BTreeSet<String>,
    block_time: Duration,
    upgrades: Vec<Plan>,
    pre_upgrade_exit: u8,
    pre_upgrade_fail_times: Option<u64>,
    flush: Duration,
    rpc: bool,
    rpc_height_offset: u64,
    chain_id: String,
    exit_at: Option<(u64, u8)>,
    halt: Halt,
    compact: Option<String>,
}

/// How the node honours `--halt-height`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Halt {
    Exit,
    Stay,
}

impl Default for Sim {
    fn default() -> Self {
        Sim {
            version: "v0.0.0-simnode".into(),
            handlers: BTreeSet::new(),
            block_time: Duration::from_millis(100),
            upgrades: Vec::new(),
            pre_upgrade_exit: 0,
            pre_upgrade_fail_times: None,
            flush: Duration::ZERO,
            rpc: false,
            rpc_height_offset: 0,
            chain_id: "simnet".into(),
            exit_at: None,
            halt: Halt::Stay,
            compact: None,
        }
    }
}

/// Run the simulated node with `args` (its `--sim-*` options, then the daemon's arguments).
pub fn main(args: Vec<String>) -> ExitCode {
    let (sim, daemon_args) = match parse_sim_args(&args) {
        Ok(parsed) => parsed,
        Err(e) => return usage_error(&e),
    };
    match daemon_args.first().map(String::as_str) {
        Some("version") => {
            out(&sim.version);
            ExitCode::SUCCESS
        }
        Some("pre-upgrade") => pre_upgrade(&sim, &daemon_args[1..]),
        Some("start") => start(sim, &daemon_args[1..]),
        Some("keys") => keys(&daemon_args[1..]),
        Some(other) => usage_error(&format!("unknown command {other:?}")),
        None => usage_error("no command given"),
    }
}

/// `keys add NAME`: asks for a passphrase on the terminal and reads it from stdin, as the SDK's
/// keyring does: an interactive command a supervisor must let through.
fn keys(args: &[String]) -> ExitCode {
    let [add, name, ..] = args else {
        return usage_error("keys: expected `keys add NAME`");
    };
    if add != "add" {
        return usage_error(&format!("keys: unknown subcommand {add:?}"));
    }
    eprint!("Enter keyring passphrase:");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    match std::io::stdin().read_line(&mut line) {
        Ok(0) | Err(_) => fail("keys add: no passphrase given"),
        Ok(_) => {
            let passphrase = line.trim_end_matches(['\r', '\n']);
            out(&format!(
                "key {name} added (passphrase of {} characters)",
                passphrase.chars().count()
            ));
            ExitCode::SUCCESS
        }
    }
}

fn usage_error(msg: &str) -> ExitCode {
    eprintln!("simnode: {msg}\n\n{USAGE}");
    ExitCode::from(USAGE_ERROR)
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("simnode: {msg}");
    out(&format!("ERR {msg}"));
    ExitCode::FAILURE
}

/// One log line on stdout; a closed stdout is not the node's problem.
fn out(line: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}

/// Split `--sim-*` options (which come first) from the daemon's arguments.
fn parse_sim_args(args: &[String]) -> Result<(Sim, Vec<String>), String> {
    let mut sim = Sim::default();
    let mut i = 0;
    while i < args.len() && args[i].starts_with("--sim-") {
        let (flag, inline) = match args[i].split_once('=') {
            Some((f, v)) => (f, Some(v.to_string())),
            None => (args[i].as_str(), None),
        };
        i += 1;
        let mut value = |what: &str| -> Result<String, String> {
            if let Some(v) = &inline {
                return Ok(v.clone());
            }
            let v = args
                .get(i)
                .cloned()
                .ok_or_else(|| format!("{flag} needs {what}"))?;
            i += 1;
            Ok(v)
        };
        match flag {
            "--sim-version" => sim.version = value("a version")?,
            "--sim-handlers" => sim.handlers.extend(
                value("a list of upgrade names")?
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from),
            ),
            "--sim-block-time" => {
                sim.block_time = crate::duration::parse(&value("a duration")?)?;
                if sim.block_time.is_zero() {
                    return Err("--sim-block-time must be positive".into());
                }
            }
            "--sim-upgrade" => sim
                .upgrades
                .push(parse_plan(&value("NAME@HEIGHT[@INFO]")?)?),
            "--sim-pre-upgrade-exit" => {
                sim.pre_upgrade_exit = parse_num(flag, &value("an exit code")?)?
            }
            "--sim-pre-upgrade-fail-times" => {
                sim.pre_upgrade_fail_times = Some(parse_num(flag, &value("a count")?)?)
            }
            "--sim-flush" => sim.flush = crate::duration::parse(&value("a duration")?)?,
            "--sim-rpc" => {
                if inline.is_some() {
                    return Err("--sim-rpc takes no value".into());
                }
                sim.rpc = true;
            }
            "--sim-rpc-height-offset" => {
                sim.rpc_height_offset = parse_num(flag, &value("a number")?)?
            }
            "--sim-chain-id" => sim.chain_id = value("a chain id")?,
            "--sim-exit-at" => {
                if inline.is_some() {
                    return Err("--sim-exit-at takes two arguments: HEIGHT CODE".into());
                }
                let height = parse_num(flag, &value("HEIGHT CODE")?)?;
                let code = parse_num(flag, &value("HEIGHT CODE")?)?;
                sim.exit_at = Some((height, code));
            }
            "--sim-compact" => sim.compact = Some(value("a directory under data/")?),
            "--sim-halt" => {
                sim.halt = match value("exit or stay")?.as_str() {
                    "exit" => Halt::Exit,
                    "stay" => Halt::Stay,
                    other => return Err(format!("--sim-halt: {other:?} is neither exit nor stay")),
                }
            }
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    Ok((sim, args[i..].to_vec()))
}

fn parse_num<T: std::str::FromStr>(flag: &str, s: &str) -> Result<T, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("{flag}: invalid number {s:?}"))
}

/// `NAME@HEIGHT[@INFO]`; INFO may itself contain `@`.
fn parse_plan(s: &str) -> Result<Plan, String> {
    let mut parts = s.splitn(3, '@');
    let name = parts.next().unwrap_or_default().to_string();
    let height = parts
        .next()
        .ok_or_else(|| format!("--sim-upgrade {s:?}: expected NAME@HEIGHT[@INFO]"))?;
    let height: u64 = parse_num("--sim-upgrade", height)?;
    if name.is_empty() || height == 0 {
        return Err(format!(
            "--sim-upgrade {s:?}: needs a name and a positive height"
        ));
    }
    let info = parts.next().unwrap_or_default().to_string();
    Ok(Plan { name, height, info })
}

/// The node's home: `--home DIR` / `--home=DIR` in the daemon args, else `$DAEMON_HOME`.
fn home_dir(daemon_args: &[String]) -> Option<PathBuf> {
    let mut iter = daemon_args.iter();
    while let Some(arg) = iter.next() {
        if arg == "--home" {
            return iter.next().map(PathBuf::from);
        }
        if let Some(v) = arg.strip_prefix("--home=") {
            return Some(PathBuf::from(v));
        }
    }
    std::env::var_os("DAEMON_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// `--halt-height H` / `--halt-height=H` in the daemon args (0 means none, as in the SDK).
fn halt_height(daemon_args: &[String]) -> Result<Option<u64>, String> {
    let mut iter = daemon_args.iter();
    let mut found = None;
    while let Some(arg) = iter.next() {
        let value = if arg == "--halt-height" {
            iter.next().cloned()
        } else if let Some(v) = arg.strip_prefix("--halt-height=") {
            Some(v.to_string())
        } else {
            continue;
        };
        let value = value.ok_or("--halt-height needs a height")?;
        found = Some(parse_num::<u64>("--halt-height", &value)?);
    }
    Ok(found.filter(|h| *h > 0))
}

/// Heights from `--unsafe-skip-upgrades H [H...]` (values may also be comma-separated).
fn skip_heights(daemon_args: &[String]) -> BTreeSet<u64> {
    let mut heights = BTreeSet::new();
    let mut iter = daemon_args.iter().peekable();
    while let Some(arg) = iter.next() {
        let mut values = Vec::new();
        if let Some(v) = arg.strip_prefix("--unsafe-skip-upgrades=") {
            values.push(v.to_string());
        } else if arg == "--unsafe-skip-upgrades" {
            while let Some(v) = iter.next_if(|v| !v.starts_with('-')) {
                values.push(v.clone());
            }
        }
        for v in &values {
            heights.extend(v.split(',').filter_map(|h| h.trim().parse::<u64>().ok()));
        }
    }
    heights
}

// ---------------------------------------------------------------------------------------------
// pre-upgrade

fn pre_upgrade(sim: &Sim, daemon_args: &[String]) -> ExitCode {
    let home = home_dir(daemon_args);
    // Count invocations under $HOME/data so tests can see how often the supervisor called us.
    let invocation = match &home {
        Some(home) => {
            let data = home.join("data");
            let counter = data.join("sim-pre-upgrade-count");
            let previous: u64 = fs::read_to_string(&counter)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            if let Err(e) = fs::create_dir_all(&data)
                .and_then(|()| write_atomic(&counter, &format!("{}\n", previous + 1)))
            {
                return fail(&format!(
                    "pre-upgrade: cannot count invocations in {}: {e}",
                    data.display()
                ));
            }
            previous + 1
        }
        None if sim.pre_upgrade_fail_times.is_some() => {
            return usage_error(
                "pre-upgrade: --sim-pre-upgrade-fail-times needs --home or $DAEMON_HOME",
            );
        }
        None => 1,
    };
    let code = match sim.pre_upgrade_fail_times {
        Some(n) if invocation > n => 0,
        _ => sim.pre_upgrade_exit,
    };
    out(&format!(
        "INF pre-upgrade version={} invocation={invocation} exit={code} module=simnode",
        sim.version
    ));
    ExitCode::from(code)
}

// ---------------------------------------------------------------------------------------------
// start

fn start(sim: Sim, daemon_args: &[String]) -> ExitCode {
    let Some(home) = home_dir(daemon_args) else {
        return usage_error("start: no home (give --home DIR or set $DAEMON_HOME)");
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the runtime: {e}")),
    };
    let skips = skip_heights(daemon_args);
    let halt_height = match halt_height(daemon_args) {
        Ok(h) => h,
        Err(e) => return usage_error(&e),
    };
    runtime.block_on(async move {
        match Node::new(sim, home, skips, halt_height) {
            Ok(node) => node.run().await,
            Err(e) => fail(&e),
        }
    })
}

/// What the RPC thread reads.
struct Shared {
    chain_id: String,
    height: AtomicU64,
    /// Unix nanoseconds of the latest block.
    block_time: AtomicU64,
}

struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

enum AtHeight {
    Continue { migrated: bool },
    Halt(Plan),
}

struct Node {
    sim: Sim,
    data: PathBuf,
    skips: BTreeSet<u64>,
    /// `--halt-height`: stop once this height is committed.
    halt_height: Option<u64>,
    /// Plans on chain: the schedule plus a pending plan named by `data/upgrade-info.json`.
    plans: Vec<Plan>,
    applied: BTreeSet<String>,
    /// The height the node resumed at (loaded from `data/height`).
    resume: u64,
    height: u64,
    shared: Arc<Shared>,
    signals: Signals,
}

impl Node {
    fn new(
        sim: Sim,
        home: PathBuf,
        skips: BTreeSet<u64>,
        halt_height: Option<u64>,
    ) -> Result<Node, String> {
        // Handlers first, so SIGTERM from here on is a graceful shutdown, never the default kill.
        let signals = Signals {
            term: signal(SignalKind::terminate())
                .map_err(|e| format!("cannot handle SIGTERM: {e}"))?,
            int: signal(SignalKind::interrupt())
                .map_err(|e| format!("cannot handle SIGINT: {e}"))?,
        };
        let data = home.join("data");
        fs::create_dir_all(&data).map_err(|e| format!("cannot create {}: {e}", data.display()))?;
        let height = match fs::read_to_string(data.join("height")) {
            Ok(s) => s
                .trim()
                .parse()
                .map_err(|_| format!("corrupt {}: {s:?}", data.join("height").display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => {
                return Err(format!(
                    "cannot read {}: {e}",
                    data.join("height").display()
                ));
            }
        };
        let applied: BTreeSet<String> = fs::read_to_string(data.join("applied"))
            .unwrap_or_default()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        let mut plans = sim.upgrades.clone();
        if let Some(pending) = read_upgrade_info(&data.join("upgrade-info.json"))
            && !applied.contains(&pending.name)
            && !plans
                .iter()
                .any(|p| p.name == pending.name && p.height == pending.height)
        {
            plans.push(pending);
        }
        let shared = Arc::new(Shared {
            chain_id: sim.chain_id.clone(),
            height: AtomicU64::new(height),
            block_time: AtomicU64::new(crate::time::unix_nanos(SystemTime::now())),
        });
        Ok(Node {
            sim,
            data,
            skips,
            halt_height,
            plans,
            applied,
            resume: height,
            height,
            shared,
            signals,
        })
    }

    async fn run(mut self) -> ExitCode {
        if self.sim.rpc {
            match self.start_rpc() {
                Ok(Some(addr)) => out(&format!("INF serving rpc addr={addr} module=rpc-server")),
                Ok(None) => {}
                Err(e) => return fail(&e),
            }
        }
        out(&format!(
            "INF starting node version={} height={} module=server",
            self.sim.version, self.height
        ));
        let mut first = true;
        loop {
            match self.at_height() {
                Err(e) => return fail(&e),
                Ok(AtHeight::Halt(plan)) => return self.halt(&plan).await,
                Ok(AtHeight::Continue { migrated }) => {
                    // The block at the resume height was committed by the previous run, unless it
                    // halted in it (then it is executed now, with the migration).
                    if !first || migrated {
                        out(&format!(
                            "INF committed state height={} module=state",
                            self.height
                        ));
                    }
                }
            }
            // The SDK checks the halt height after a commit: a node restarted at or past it
            // (exit flavour) commits one more block first, as some versions do.
            if let Some(halt) = self.halt_height
                && self.height >= halt
                && !(first && self.sim.halt == Halt::Exit)
            {
                return self.halt_at_height(halt).await;
            }
            first = false;
            if let Some((at, code)) = self.sim.exit_at
                && self.height == at
            {
                out(&format!(
                    "ERR exiting at height={at} code={code} (--sim-exit-at) module=simnode"
                ));
                return ExitCode::from(code);
            }
            tokio::select! {
                () = tokio::time::sleep(self.sim.block_time) => {}
                sig = self.signals.recv() => return self.shutdown(sig).await,
            }
            self.height += 1;
            if let Err(e) = write_atomic(&self.data.join("height"), &format!("{}\n", self.height)) {
                return fail(&format!("cannot persist height: {e}"));
            }
            self.shared
                .block_time
                .store(crate::time::unix_nanos(SystemTime::now()), Ordering::SeqCst);
            self.shared.height.store(self.height, Ordering::SeqCst);
            if let Some(db) = &self.sim.compact
                && let Err(e) = compact(&self.data.join(db), self.height)
            {
                return fail(&format!("cannot compact data/{db}: {e}"));
            }
        }
    }

    /// x/upgrade's BeginBlocker at the current height.
    fn at_height(&mut self) -> Result<AtHeight, String> {
        let due: Vec<Plan> = self
            .plans
            .iter()
            .filter(|p| p.height == self.height)
            .cloned()
            .collect();
        let mut migrated = false;
        for plan in due {
            if self.applied.contains(&plan.name) {
                continue;
            }
            if self.skips.contains(&plan.height) {
                out(&format!(
                    "INF UPGRADE \"{}\" SKIPPED at height: {}: {} module=x/upgrade",
                    plan.name, plan.height, plan.info
                ));
                continue;
            }
            if self.sim.handlers.contains(&plan.name) && plan.height == self.resume {
                out(&format!(
                    "INF applying upgrade \"{}\" at height: {} module=x/upgrade",
                    plan.name, plan.height
                ));
                append_line(&self.data.join("applied"), &plan.name)
                    .map_err(|e| format!("cannot record applied upgrade: {e}"))?;
                self.applied.insert(plan.name.clone());
                migrated = true;
                continue;
            }
            return Ok(AtHeight::Halt(plan));
        }
        Ok(AtHeight::Continue { migrated })
    }

    /// Write the plan as x/upgrade does, say so, then wait (without making blocks) for a signal.
    async fn halt(mut self, plan: &Plan) -> ExitCode {
        if let Err(e) = write_upgrade_info(&self.data.join("upgrade-info.json"), plan) {
            return fail(&format!("cannot write upgrade-info.json: {e}"));
        }
        out(&format!(
            "ERR UPGRADE \"{}\" NEEDED at height: {}: {}",
            plan.name, plan.height, plan.info
        ));
        let sig = self.signals.recv().await;
        self.shutdown(sig).await
    }

    /// `--halt-height` reached: exit 0, or stay up (RPC alive) refusing the next block.
    async fn halt_at_height(mut self, halt: u64) -> ExitCode {
        match self.sim.halt {
            Halt::Exit => {
                out(&format!(
                    "INF halting node per configuration height={} halt-height={halt} module=server",
                    self.height
                ));
                ExitCode::SUCCESS
            }
            Halt::Stay => {
                out(&format!(
                    "ERR halt per configuration: refusing block height={} halt-height={halt} module=consensus",
                    self.height + 1
                ));
                let sig = self.signals.recv().await;
                self.shutdown(sig).await
            }
        }
    }

    async fn shutdown(self, sig: &str) -> ExitCode {
        out(&format!(
            "INF caught {sig}, flushing state height={} flush={:?} module=server",
            self.height, self.sim.flush
        ));
        tokio::time::sleep(self.sim.flush).await;
        if let Err(e) = write_atomic(&self.data.join("flushed"), &format!("{}\n", self.height)) {
            return fail(&format!("cannot write data/flushed: {e}"));
        }
        out(&format!(
            "INF flushed state height={}, exiting module=server",
            self.height
        ));
        ExitCode::SUCCESS
    }

    /// Bind `[rpc] laddr`'s port on 127.0.0.1 and serve `/status` from a thread. `Ok(None)` when
    /// config.toml or the key is missing (no RPC, like a node with RPC disabled).
    fn start_rpc(&self) -> Result<Option<String>, String> {
        let config = self
            .data
            .parent()
            .unwrap_or(Path::new("."))
            .join("config")
            .join("config.toml");
        let Some(port) = fs::read_to_string(&config).ok().and_then(|t| rpc_port(&t)) else {
            out("INF no [rpc] laddr in config/config.toml, rpc disabled module=rpc-server");
            return Ok(None);
        };
        let addr = format!("127.0.0.1:{port}");
        let listener =
            TcpListener::bind(&addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let shared = Arc::clone(&self.shared);
        let version = self.sim.version.clone();
        let offset = self.sim.rpc_height_offset;
        let interval = self.sim.block_time;
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = serve(stream, &shared, &version, offset, interval);
            }
        });
        Ok(Some(addr))
    }
}

/// The port of `laddr` in the `[rpc]` table, parsed by hand (`laddr = "tcp://127.0.0.1:26657"`).
fn rpc_port(config: &str) -> Option<u16> {
    let mut in_rpc = false;
    for line in config.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_rpc = line.trim_start_matches('[').trim_end_matches(']').trim() == "rpc";
            continue;
        }
        if !in_rpc {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        if key.trim() != "laddr" {
            continue;
        }
        let value = value
            .split('#')
            .next()
            .unwrap_or_default()
            .trim()
            .trim_matches(['"', '\'']);
        return value
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse().ok());
    }
    None
}

fn serve(
    mut stream: TcpStream,
    shared: &Shared,
    version: &str,
    offset: u64,
    interval: Duration,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let request = String::from_utf8_lossy(&request);
    let mut first = request
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace();
    let (method, target) = (
        first.next().unwrap_or_default(),
        first.next().unwrap_or_default(),
    );
    let path = target.split('?').next().unwrap_or_default();
    let (status, body) = if method == "GET" && path == "/status" {
        let height = shared.height.load(Ordering::SeqCst).saturating_sub(offset);
        let time = crate::time::rfc3339_nanos(shared.block_time.load(Ordering::SeqCst));
        let body = serde_json::json!({
            "jsonrpc": "2.0",
            "id": -1,
            "result": {
                "node_info": {"network": shared.chain_id, "version": version},
                "sync_info": {
                    "latest_block_height": height.to_string(),
                    "latest_block_time": time,
                    "catching_up": false,
                },
            },
        });
        ("200 OK", body.to_string())
    } else if let Some(asked) = (method == "GET" && path == "/block")
        .then(|| {
            target
                .split_once("height=")
                .and_then(|(_, h)| h.split('&').next()?.parse::<u64>().ok())
        })
        .flatten()
        .filter(|&h| h >= 1 && h <= shared.height.load(Ordering::SeqCst).saturating_sub(offset))
    {
        // Blocks came at the configured interval: block N's time is the latest's minus the gap.
        let latest = shared.height.load(Ordering::SeqCst).saturating_sub(offset);
        let gap = u64::try_from(interval.as_nanos())
            .unwrap_or(u64::MAX)
            .saturating_mul(latest - asked);
        let time = crate::time::rfc3339_nanos(
            shared.block_time.load(Ordering::SeqCst).saturating_sub(gap),
        );
        let body = serde_json::json!({
            "jsonrpc": "2.0",
            "id": -1,
            "result": {"block": {"header": {"chain_id": shared.chain_id, "height": asked.to_string(), "time": time}}},
        });
        ("200 OK", body.to_string())
    } else {
        let body = serde_json::json!({
            "jsonrpc": "2.0",
            "id": -1,
            "error": {"code": -32601, "message": "Method not found", "data": format!("{method} {target}")},
        });
        ("404 Not Found", body.to_string())
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())?;
    stream.flush()
}

// ---------------------------------------------------------------------------------------------
// files

/// An LSM database's block at `height`: a line appended to its log, a new table file (a flush),
/// and at even heights its oldest table deleted (a compaction).
fn compact(db: &Path, height: u64) -> std::io::Result<()> {
    let names: Vec<String> = fs::read_dir(db)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    if let Some(log) = names.iter().filter(|n| n.ends_with(".log")).max() {
        append_line(&db.join(log), &format!("block {height}"))?;
    }
    let mut tables: Vec<&String> = names.iter().filter(|n| n.ends_with(".ldb")).collect();
    tables.sort();
    fs::write(
        db.join(format!("{:06}.ldb", 100_000 + height)),
        height.to_string().repeat(1000),
    )?;
    match tables.first() {
        Some(oldest) if height.is_multiple_of(2) => fs::remove_file(db.join(oldest)),
        _ => Ok(()),
    }
}

fn write_atomic(path: &Path, contents: &str) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    fs::write(&tmp, contents)?;
    fs::rename(&tmp, path)
}

fn append_line(path: &Path, line: &str) -> std::io::Result<()> {
    let mut file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    file.write_all(format!("{line}\n").as_bytes())
}

/// As x/upgrade's `DumpUpgradeInfoToDisk`: truncate, then write — here in two `write()` calls ~1 ms
/// apart, so a supervisor reading meanwhile sees an empty or partial file. An empty INFO is
/// omitted, as the plan's `info,omitempty` JSON tag does.
fn write_upgrade_info(path: &Path, plan: &Plan) -> std::io::Result<()> {
    let name = serde_json::to_string(&plan.name).map_err(std::io::Error::other)?;
    let mut json = format!(
        r#"{{"name":{name},"time":"0001-01-01T00:00:00Z","height":{}"#,
        plan.height
    );
    if !plan.info.is_empty() {
        let info = serde_json::to_string(&plan.info).map_err(std::io::Error::other)?;
        json.push_str(&format!(r#","info":{info}"#));
    }
    json.push('}');
    let bytes = json.as_bytes();
    let (head, tail) = bytes.split_at(bytes.len() / 2);
    let mut file = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)?;
    file.write_all(head)?;
    std::thread::sleep(Duration::from_millis(1));
    file.write_all(tail)
}

/// A plan named by an existing `upgrade-info.json` (heights as numbers or strings).
fn read_upgrade_info(path: &Path) -> Option<Plan> {
    let value: serde_json::Value = serde_json::from_slice(&fs::read(path).ok()?).ok()?;
    let name = value.get("name")?.as_str()?.to_string();
    let height = match value.get("height")? {
        serde_json::Value::Number(n) => n.as_u64()?,
        serde_json::Value::String(s) => s.parse().ok()?,
        _ => return None,
    };
    let info = value
        .get("info")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_string();
    (!name.is_empty() && height > 0).then_some(Plan { name, height, info })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans() {
        let p = parse_plan("v2@10@{\"binaries\":{\"any\":\"https://x@y\"}}").unwrap();
        assert_eq!((p.name.as_str(), p.height), ("v2", 10));
        assert_eq!(p.info, "{\"binaries\":{\"any\":\"https://x@y\"}}");
        assert_eq!(parse_plan("v3@7").unwrap().info, "");
        assert!(parse_plan("v3").is_err());
        assert!(parse_plan("v3@0").is_err());
        assert!(parse_plan("@5").is_err());
    }

    #[test]
    fn config_port() {
        let config = "[p2p]\nladdr = \"tcp://0.0.0.0:26656\"\n\n[rpc]\n# comment\nladdr = \"tcp://127.0.0.1:36657\" # x\n";
        assert_eq!(rpc_port(config), Some(36657));
        assert_eq!(rpc_port("[p2p]\nladdr = \"tcp://0.0.0.0:26656\"\n"), None);
    }

    #[test]
    fn skips() {
        let args: Vec<String> = ["--home", "h", "--unsafe-skip-upgrades", "5", "7,9", "--x"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(skip_heights(&args), BTreeSet::from([5, 7, 9]));
    }
}
