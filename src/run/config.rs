//! The supervisor's configuration: Cosmovisor's environment variables, with Cosmovisor's names,
//! defaults and strict parsing, optionally read first from a Cosmovisor `config.toml` (lower-case
//! names as keys; the environment overrides the file). Every problem is reported together.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One variable `cvx run` reads: its name, its default and what it does. `cvx help run` and
/// `cvx man run` are generated from [`VARIABLES`].
#[derive(Debug, Clone, Copy)]
pub struct Variable {
    pub name: &'static str,
    pub default: &'static str,
    pub meaning: &'static str,
}

const fn var(name: &'static str, default: &'static str, meaning: &'static str) -> Variable {
    Variable {
        name,
        default,
        meaning,
    }
}

/// Every variable cvx run reads, with Cosmovisor's names and defaults.
pub const VARIABLES: &[Variable] = &[
    var(
        "DAEMON_HOME",
        "required",
        "the node's home: data/ and cosmovisor/ are in it",
    ),
    var(
        "DAEMON_NAME",
        "required",
        "the daemon's file name in cosmovisor/*/bin/, e.g. osmosisd",
    ),
    var(
        "DAEMON_ALLOW_DOWNLOAD_BINARIES",
        "false",
        "download an upgrade's binary from the plan's info when it is not staged (verified; a CVX_MANIFEST pin wins)",
    ),
    var(
        "DAEMON_DOWNLOAD_MUST_HAVE_CHECKSUM",
        "false",
        "accepted for Cosmovisor's sake: cvx never downloads without a checksum",
    ),
    var(
        "DAEMON_RESTART_AFTER_UPGRADE",
        "true",
        "start the new binary after the switch; false: exit 0 after it",
    ),
    var(
        "DAEMON_RESTART_DELAY",
        "none",
        "wait this long after the daemon stops for an upgrade, before the upgrade steps (Go duration: 10s, 1m30s)",
    ),
    var(
        "DAEMON_SHUTDOWN_GRACE",
        "none (SIGKILL at once)",
        "how long the daemon may take to exit after SIGTERM before SIGKILL (when cvx itself is stopped: 60s if unset)",
    ),
    var(
        "DAEMON_POLL_INTERVAL",
        "300ms",
        "how often data/upgrade-info.json is read when no file event arrives",
    ),
    var(
        "UNSAFE_SKIP_BACKUP",
        "false",
        "do not back up data/ before an upgrade",
    ),
    var(
        "DAEMON_DATA_BACKUP_DIR",
        "$DAEMON_HOME",
        "where data-backup-<date>-<upgrade> goes (not inside data/)",
    ),
    var(
        "DAEMON_PREUPGRADE_MAX_RETRIES",
        "0",
        "retries of `<new binary> pre-upgrade` when it exits 31",
    ),
    var(
        "COSMOVISOR_CUSTOM_PREUPGRADE",
        "none",
        "a script under cosmovisor/, run as `<script> <name> <height>` in $DAEMON_HOME before the switch",
    ),
    var(
        "COSMOVISOR_DISABLE_RECASE",
        "false",
        "keep the plan name's case in upgrades/<name> instead of lower-casing it",
    ),
    var(
        "COSMOVISOR_DISABLE_LOGS",
        "false",
        "no logs from cvx run (the daemon's own output is not touched)",
    ),
    var(
        "COSMOVISOR_COLOR_LOGS",
        "true",
        "colour in the logs, on a terminal only",
    ),
    var(
        "COSMOVISOR_TIMEFORMAT_LOGS",
        "kitchen",
        "timestamps of every cvx command's logs: a Go layout name (rfc3339, rfc3339nano, kitchen, ...), or empty for none",
    ),
    var(
        "CVX_MANIFEST",
        "none",
        "a manifest: every binary must be its pin for this host before it runs, and its pins win over the plan's checksums for downloads",
    ),
    var(
        "CVX_MAX_SIZE",
        "4096 (MiB)",
        "the most bytes a download may have, and the most its archive may unpack to",
    ),
    var(
        "CVX_UPGRADE_HOOK",
        "none",
        "an executable run on upgrade detected, done and failed, with the facts as JSON on stdin (never blocks the upgrade)",
    ),
    var(
        "CVX_UPGRADE_HOOK_TIMEOUT",
        "10s",
        "how long CVX_UPGRADE_HOOK may run before it is killed",
    ),
    var(
        "CVX_CUSTOM_PREUPGRADE_TIMEOUT",
        "none",
        "how long COSMOVISOR_CUSTOM_PREUPGRADE may run before it is killed and the upgrade fails",
    ),
    var(
        "CVX_PREUPGRADE_TIMEOUT",
        "none",
        "how long `<new binary> pre-upgrade` may run before it is killed and the upgrade fails",
    ),
    var(
        "CVX_PREFLIGHT_INTERVAL",
        "10m",
        "how often the preflight warnings (backup dir, room, next binary, grace) are checked again while the node runs",
    ),
    var(
        "CVX_METRICS_ADDR",
        "none (no metrics)",
        "host:port where cvx run start serves Prometheus metrics at /metrics",
    ),
    var(
        "CVX_METRICS_INTERVAL",
        "5s",
        "with metrics on: how often cvx reads the node's height and re-checks the next upgrade",
    ),
];

/// The variables as `cvx help run` and `cvx man run` show them.
pub fn variables_help() -> String {
    let mut out = String::from(
        "Environment, as Cosmovisor's (or the lower-case keys of a `--cosmovisor-config` file; the environment wins):\n",
    );
    for v in VARIABLES {
        let default = if v.default == "required" {
            "required".to_string()
        } else {
            format!("default: {}", v.default)
        };
        out.push_str(&format!(
            "\n  {}  ({default})\n      {}\n",
            v.name, v.meaning
        ));
    }
    out.push_str(
        "\nBooleans are true or false (any case) or empty; durations use Go's syntax and must be positive.",
    );
    out
}

/// Go's named time layouts Cosmovisor accepts for COSMOVISOR_TIMEFORMAT_LOGS.
pub const TIME_FORMATS: &[(&str, &str)] = &[
    ("layout", "01/02 03:04:05PM '06 -0700"),
    ("ansic", "Mon Jan _2 15:04:05 2006"),
    ("unixdate", "Mon Jan _2 15:04:05 MST 2006"),
    ("rubydate", "Mon Jan 02 15:04:05 -0700 2006"),
    ("rfc822", "02 Jan 06 15:04 MST"),
    ("rfc822z", "02 Jan 06 15:04 -0700"),
    ("rfc850", "Monday, 02-Jan-06 15:04:05 MST"),
    ("rfc1123", "Mon, 02 Jan 2006 15:04:05 MST"),
    ("rfc1123z", "Mon, 02 Jan 2006 15:04:05 -0700"),
    ("rfc3339", "2006-01-02T15:04:05Z07:00"),
    ("rfc3339nano", "2006-01-02T15:04:05.999999999Z07:00"),
    ("kitchen", "3:04PM"),
];

#[derive(Debug, Clone)]
pub struct Config {
    pub home: PathBuf,
    pub name: String,
    pub allow_download: bool,
    pub must_have_checksum: bool,
    pub restart_after_upgrade: bool,
    pub restart_delay: Option<Duration>,
    pub shutdown_grace: Option<Duration>,
    pub poll_interval: Duration,
    pub skip_backup: bool,
    pub backup_dir: PathBuf,
    pub preupgrade_max_retries: u32,
    pub custom_preupgrade: Option<PathBuf>,
    pub recase: bool,
    pub logs: bool,
    pub color_logs: bool,
    /// A Go layout, or None for no timestamps (an empty COSMOVISOR_TIMEFORMAT_LOGS).
    pub time_format: Option<&'static str>,
    /// A manifest whose pins every binary must match, and which win over the plan's checksums
    /// for downloads.
    pub manifest: Option<PathBuf>,
    /// Bytes a download may have, and bytes its archive may unpack to.
    pub max_size: u64,
    /// Run on upgrade detected, done and failed.
    pub hook: Option<super::history::Hook>,
    /// How long COSMOVISOR_CUSTOM_PREUPGRADE and `<new> pre-upgrade` may take (None: no limit).
    pub custom_preupgrade_timeout: Option<Duration>,
    pub preupgrade_timeout: Option<Duration>,
    /// How often the preflight warnings are checked again while the daemon runs.
    pub preflight_interval: Duration,
    /// Where `cvx run start` serves Prometheus metrics (CVX_METRICS_ADDR); None: no metrics.
    pub metrics_addr: Option<SocketAddr>,
    /// How often, with metrics on, cvx reads the node's height and re-checks the next upgrade.
    pub metrics_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n{}", problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

/// Where each value came from, for error messages.
struct Sources {
    env: BTreeMap<String, String>,
    file: BTreeMap<String, toml::Value>,
    file_path: Option<PathBuf>,
    problems: Vec<String>,
}

impl Sources {
    /// The raw value of `name`: the environment first, then the file (as text).
    fn get(&mut self, name: &str) -> Option<(String, String)> {
        if let Some(v) = self.env.get(name) {
            return Some((v.clone(), name.to_string()));
        }
        let key = name.to_ascii_lowercase();
        let value = self.file.get(&key)?;
        let at = format!(
            "{key} in {}",
            self.file_path
                .as_deref()
                .unwrap_or(Path::new("?"))
                .display()
        );
        match value {
            toml::Value::String(s) => Some((s.clone(), at)),
            toml::Value::Boolean(b) => Some((b.to_string(), at)),
            // Go's config.toml stores durations as integer nanoseconds.
            toml::Value::Integer(i)
                if name.ends_with("_DELAY")
                    || name.ends_with("_GRACE")
                    || name.ends_with("_INTERVAL") =>
            {
                Some((format!("{i}ns"), at))
            }
            toml::Value::Integer(i) => Some((i.to_string(), at)),
            other => {
                self.problems.push(format!(
                    "{at}: expected a string, boolean or integer, found {}",
                    other.type_str()
                ));
                None
            }
        }
    }

    fn boolean(&mut self, name: &str, default: bool) -> bool {
        match self.get(name) {
            None => default,
            Some((v, _)) if v.is_empty() => default,
            Some((v, _)) if v.eq_ignore_ascii_case("true") => true,
            Some((v, _)) if v.eq_ignore_ascii_case("false") => false,
            Some((v, at)) => {
                self.problems
                    .push(format!("{at}={v:?} is not a boolean (use true or false)"));
                default
            }
        }
    }

    fn duration(&mut self, name: &str) -> Option<Duration> {
        let (v, at) = self.get(name)?;
        if v.is_empty() {
            return None;
        }
        match crate::duration::parse(&v) {
            Ok(d) if d > Duration::ZERO => Some(d),
            Ok(_) => {
                self.problems.push(format!(
                    "{at}={v:?} must be positive (use e.g. 300ms, 10s, 1m30s)"
                ));
                None
            }
            Err(e) => {
                self.problems.push(format!("{at}: {e}"));
                None
            }
        }
    }

    fn string(&mut self, name: &str) -> Option<String> {
        self.get(name).map(|(v, _)| v).filter(|v| !v.is_empty())
    }
}

/// Read the configuration from `env` (the process environment) and an optional config file.
pub fn load(
    env: impl IntoIterator<Item = (String, String)>,
    config_file: Option<&Path>,
) -> Result<Config, ConfigError> {
    load_inner(env, config_file, false).map(|(config, _)| config)
}

/// `load`, then, when `listen` (`cvx run start`), bind CVX_METRICS_ADDR: a port that cannot be
/// bound is one more configuration problem, reported with the others before the daemon starts.
pub fn load_and_listen(
    env: impl IntoIterator<Item = (String, String)>,
    config_file: Option<&Path>,
    listen: bool,
) -> Result<(Config, Option<TcpListener>), ConfigError> {
    load_inner(env, config_file, listen)
}

fn load_inner(
    env: impl IntoIterator<Item = (String, String)>,
    config_file: Option<&Path>,
    listen: bool,
) -> Result<(Config, Option<TcpListener>), ConfigError> {
    let mut sources = Sources {
        env: env
            .into_iter()
            .filter(|(k, _)| VARIABLES.iter().any(|v| v.name == k))
            .collect(),
        file: BTreeMap::new(),
        file_path: config_file.map(Path::to_path_buf),
        problems: Vec::new(),
    };
    if let Some(path) = config_file {
        match std::fs::read_to_string(path) {
            Ok(text) => match text.parse::<toml::Table>() {
                Ok(table) => {
                    for (key, value) in table {
                        if VARIABLES.iter().any(|v| v.name.eq_ignore_ascii_case(&key)) {
                            sources.file.insert(key, value);
                        } else {
                            tracing::warn!("{}: ignoring unknown key {key:?}", path.display());
                        }
                    }
                }
                Err(e) => sources.problems.push(format!(
                    "{} is not valid TOML: {}",
                    path.display(),
                    e.message()
                )),
            },
            Err(e) => sources
                .problems
                .push(format!("cannot read {}: {e}", path.display())),
        }
    }

    let home = sources.string("DAEMON_HOME").map(PathBuf::from);
    match &home {
        None => sources
            .problems
            .push("DAEMON_HOME is not set (the node's home, e.g. /var/lib/osmosis)".into()),
        Some(h) if !h.is_absolute() => sources.problems.push(format!(
            "DAEMON_HOME={:?} is not an absolute path",
            h.display()
        )),
        _ => {}
    }
    let name = sources.string("DAEMON_NAME");
    match &name {
        None => sources
            .problems
            .push("DAEMON_NAME is not set (the daemon's file name, e.g. osmosisd)".into()),
        Some(n) => {
            if let Some(why) = crate::manifest::unsafe_name(n) {
                sources.problems.push(format!("DAEMON_NAME={n:?} {why}"));
            }
        }
    }
    let allow_download = sources.boolean("DAEMON_ALLOW_DOWNLOAD_BINARIES", false);
    let must_have_checksum = sources.boolean("DAEMON_DOWNLOAD_MUST_HAVE_CHECKSUM", false);
    let restart_after_upgrade = sources.boolean("DAEMON_RESTART_AFTER_UPGRADE", true);
    let restart_delay = sources.duration("DAEMON_RESTART_DELAY");
    let shutdown_grace = sources.duration("DAEMON_SHUTDOWN_GRACE");
    let poll_interval = sources
        .duration("DAEMON_POLL_INTERVAL")
        .unwrap_or(Duration::from_millis(300));
    let skip_backup = sources.boolean("UNSAFE_SKIP_BACKUP", false);
    let backup_dir = sources.string("DAEMON_DATA_BACKUP_DIR").map(PathBuf::from);
    if let Some(dir) = &backup_dir
        && !dir.is_absolute()
    {
        sources.problems.push(format!(
            "DAEMON_DATA_BACKUP_DIR={:?} is not an absolute path",
            dir.display()
        ));
    }
    let preupgrade_max_retries = match sources.get("DAEMON_PREUPGRADE_MAX_RETRIES") {
        None => 0,
        Some((v, _)) if v.is_empty() => 0,
        Some((v, at)) => v.parse().unwrap_or_else(|_| {
            sources
                .problems
                .push(format!("{at}={v:?} is not a non-negative integer"));
            0
        }),
    };
    let custom_preupgrade = sources
        .string("COSMOVISOR_CUSTOM_PREUPGRADE")
        .map(PathBuf::from);
    let recase = !sources.boolean("COSMOVISOR_DISABLE_RECASE", false);
    let logs = !sources.boolean("COSMOVISOR_DISABLE_LOGS", false);
    let color_logs = sources.boolean("COSMOVISOR_COLOR_LOGS", true);
    let time_format = match sources.get("COSMOVISOR_TIMEFORMAT_LOGS") {
        None => Some(TIME_FORMATS[TIME_FORMATS.len() - 1].1),
        Some((v, _)) if v.is_empty() => None,
        Some((v, at)) => match TIME_FORMATS
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(&v))
        {
            Some((_, layout)) => Some(*layout),
            None => {
                let names: Vec<_> = TIME_FORMATS.iter().map(|(n, _)| *n).collect();
                sources.problems.push(format!(
                    "{at}={v:?} is not a known time format (valid: {}, or empty for none)",
                    names.join(", ")
                ));
                None
            }
        },
    };
    let manifest = sources.string("CVX_MANIFEST").map(PathBuf::from);
    let hook = sources.string("CVX_UPGRADE_HOOK").map(PathBuf::from);
    let hook_timeout = sources
        .duration("CVX_UPGRADE_HOOK_TIMEOUT")
        .unwrap_or(Duration::from_secs(10));
    let custom_preupgrade_timeout = sources.duration("CVX_CUSTOM_PREUPGRADE_TIMEOUT");
    let preupgrade_timeout = sources.duration("CVX_PREUPGRADE_TIMEOUT");
    let preflight_interval = sources
        .duration("CVX_PREFLIGHT_INTERVAL")
        .unwrap_or(Duration::from_secs(600));
    let max_size = match sources.get("CVX_MAX_SIZE") {
        Some((v, at)) if !v.is_empty() => match v.parse::<u64>() {
            Ok(mib) if mib > 0 => mib.saturating_mul(1 << 20),
            _ => {
                sources.problems.push(format!(
                    "{at}={v:?} is not a positive number of MiB (e.g. 4096)"
                ));
                0
            }
        },
        _ => 4096 << 20,
    };
    let metrics_addr = sources.get("CVX_METRICS_ADDR").and_then(|(v, at)| {
        let parsed = metrics_addr(&v)
            .map_err(|why| sources.problems.push(format!("{at}={v:?} {why}")))
            .ok()?;
        parsed.map(|addr| (addr, v, at))
    });
    let metrics_interval = sources
        .duration("CVX_METRICS_INTERVAL")
        .unwrap_or(Duration::from_secs(5));
    let listener = match &metrics_addr {
        Some((addr, v, at)) if listen => TcpListener::bind(addr)
            .map_err(|e| {
                sources.problems.push(format!(
                    "{at}={v:?}: cannot serve metrics there ({e}){}",
                    if e.kind() == std::io::ErrorKind::AddrInUse {
                        "; another process (another cvx run?) has that port: pick a free one"
                    } else {
                        ""
                    }
                ))
            })
            .ok(),
        _ => None,
    };

    if !sources.problems.is_empty() {
        return Err(ConfigError {
            problems: sources.problems,
        });
    }
    let home = home.expect("checked above");
    if let Some(dir) = &backup_dir
        && !skip_backup
        && inside(dir, &home.join("data"))
    {
        return Err(ConfigError {
            problems: vec![format!(
                "DAEMON_DATA_BACKUP_DIR={:?} is inside $DAEMON_HOME/data: the backup would copy into itself (use a directory outside data/, e.g. $DAEMON_HOME or /var/lib/<chain>-backups)",
                dir.display()
            )],
        });
    }
    let custom_preupgrade = custom_preupgrade.map(|script| home.join("cosmovisor").join(script));
    let config = Config {
        backup_dir: backup_dir.unwrap_or_else(|| home.clone()),
        home,
        name: name.expect("checked above"),
        allow_download,
        must_have_checksum,
        restart_after_upgrade,
        restart_delay,
        shutdown_grace,
        poll_interval,
        skip_backup,
        preupgrade_max_retries,
        custom_preupgrade,
        recase,
        logs,
        color_logs,
        time_format,
        manifest,
        max_size,
        hook: hook.map(|program| super::history::Hook {
            program,
            timeout: hook_timeout,
            turn: Default::default(),
        }),
        custom_preupgrade_timeout,
        preupgrade_timeout,
        preflight_interval,
        metrics_addr: metrics_addr.map(|(addr, _, _)| addr),
        metrics_interval,
    };
    Ok((config, listener))
}

/// CVX_METRICS_ADDR: `host:port` with an explicit host (`127.0.0.1:9464` for this host only,
/// `0.0.0.0:9464` for every interface), a name such as `localhost`, or empty for no metrics.
fn metrics_addr(text: &str) -> Result<Option<SocketAddr>, String> {
    if text.is_empty() {
        return Ok(None);
    }
    let addr = match text.parse::<SocketAddr>() {
        Ok(addr) => addr,
        Err(_) => {
            let Some((host, port)) = text.rsplit_once(':') else {
                return Err("is not host:port (e.g. 127.0.0.1:9464)".into());
            };
            if host.is_empty() {
                return Err(format!(
                    "has no host: use 127.0.0.1:{port} for this host only, or 0.0.0.0:{port} for every interface"
                ));
            }
            let port: u16 = port
                .parse()
                .map_err(|_| format!("has no valid port ({port:?} is not 1-65535)"))?;
            (host, port)
                .to_socket_addrs()
                .ok()
                .and_then(|mut addrs| addrs.next())
                .ok_or_else(|| format!("names a host that does not resolve ({host:?})"))?
        }
    };
    if addr.port() == 0 {
        return Err("has port 0: Prometheus needs a fixed port (e.g. 9464)".into());
    }
    Ok(Some(addr))
}

/// Whether `path` is `dir` or lies below it, by their components and, where both exist, by the
/// directories they resolve to (a symlink can hide a path inside `data/`).
fn inside(path: &Path, dir: &Path) -> bool {
    let lexical = |p: &Path| -> PathBuf { p.components().collect() };
    if lexical(path).starts_with(lexical(dir)) {
        return true;
    }
    // The deepest existing ancestor of `path`, resolved, then the rest appended.
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (
            existing.file_name().map(|n| n.to_os_string()),
            existing.parent(),
        ) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => return false,
        }
    }
    let (Ok(mut resolved), Ok(dir)) = (existing.canonicalize(), dir.canonicalize()) else {
        return false;
    };
    resolved.extend(rest.iter().rev());
    resolved.starts_with(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_cosmovisors() {
        let c = load(env(&[("DAEMON_HOME", "/h"), ("DAEMON_NAME", "simd")]), None).unwrap();
        assert!(!c.allow_download && c.restart_after_upgrade && !c.skip_backup && c.recase);
        assert_eq!(c.poll_interval, Duration::from_millis(300));
        assert_eq!((c.shutdown_grace, c.restart_delay), (None, None));
        assert_eq!(c.backup_dir, PathBuf::from("/h"));
        assert_eq!(c.time_format, Some("3:04PM"));
    }

    #[test]
    fn every_problem_is_reported() {
        let err = load(
            env(&[
                ("DAEMON_NAME", "a/b"),
                ("DAEMON_RESTART_AFTER_UPGRADE", "yes"),
                ("DAEMON_POLL_INTERVAL", "0s"),
                ("DAEMON_SHUTDOWN_GRACE", "5"),
                ("DAEMON_PREUPGRADE_MAX_RETRIES", "-1"),
                ("COSMOVISOR_TIMEFORMAT_LOGS", "iso"),
                ("CVX_MAX_SIZE", "0"),
            ]),
            None,
        )
        .unwrap_err();
        assert_eq!(err.problems.len(), 8, "{err}");
    }

    #[test]
    fn a_backup_dir_inside_data_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        std::fs::create_dir_all(home.join("data")).unwrap();
        std::os::unix::fs::symlink(home.join("data"), dir.path().join("alias")).unwrap();
        let h = home.to_str().unwrap();
        for inside in [
            format!("{h}/data"),
            format!("{h}/data/backups"),
            format!("{h}/./data/x"),
            format!("{}/alias/backups", dir.path().display()),
        ] {
            let err = load(
                env(&[
                    ("DAEMON_HOME", h),
                    ("DAEMON_NAME", "simd"),
                    ("DAEMON_DATA_BACKUP_DIR", &inside),
                ]),
                None,
            )
            .unwrap_err();
            assert!(
                err.to_string().contains("copy into itself"),
                "{inside}: {err}"
            );
        }
        for outside in [h.to_string(), format!("{h}/data-backups")] {
            load(
                env(&[
                    ("DAEMON_HOME", h),
                    ("DAEMON_NAME", "simd"),
                    ("DAEMON_DATA_BACKUP_DIR", &outside),
                ]),
                None,
            )
            .unwrap();
        }
    }

    #[test]
    fn the_environment_overrides_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.toml");
        std::fs::write(&file, "daemon_home = \"/from/file\"\ndaemon_name = \"simd\"\ndaemon_poll_interval = 50000000\nunsafe_skip_backup = true\n").unwrap();
        let c = load(env(&[("DAEMON_HOME", "/from/env")]), Some(&file)).unwrap();
        assert_eq!(c.home, PathBuf::from("/from/env"));
        assert_eq!(c.poll_interval, Duration::from_millis(50));
        assert!(c.skip_backup);
    }

    #[test]
    fn metrics_addresses() {
        let ok = |text: &str| metrics_addr(text).unwrap().unwrap().to_string();
        assert_eq!(ok("127.0.0.1:9464"), "127.0.0.1:9464");
        assert_eq!(ok("[::1]:9464"), "[::1]:9464");
        assert_eq!(ok("0.0.0.0:1"), "0.0.0.0:1");
        assert!(
            metrics_addr("localhost:9464")
                .unwrap()
                .unwrap()
                .ip()
                .is_loopback()
        );
        assert_eq!(metrics_addr("").unwrap(), None);
        let err = |text: &str| metrics_addr(text).unwrap_err();
        assert!(err("9464").contains("is not host:port"), "{}", err("9464"));
        assert!(err(":9464").contains("use 127.0.0.1:9464 for this host only"));
        assert!(err("127.0.0.1:http").contains("no valid port"));
        assert!(err("127.0.0.1:70000").contains("no valid port"));
        assert!(err("127.0.0.1:0").contains("port 0"));
    }

    #[test]
    fn a_metrics_port_in_use_is_reported_with_the_other_problems() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let vars = env(&[
            ("DAEMON_HOME", "/h"),
            ("DAEMON_POLL_INTERVAL", "soon"),
            ("CVX_METRICS_ADDR", &addr),
        ]);
        // Not for `cvx run version`: only `start` serves, and only it may find the port taken.
        load_and_listen(vars.clone(), None, false).unwrap_err();
        let err = load_and_listen(vars, None, true).unwrap_err();
        assert_eq!(err.problems.len(), 3, "{err}");
        assert!(
            err.problems[2].starts_with(&format!(
                "CVX_METRICS_ADDR={addr:?}: cannot serve metrics there"
            )) && err.problems[2].ends_with("pick a free one"),
            "{err}"
        );
        drop(taken);
        let (config, listener) = load_and_listen(
            env(&[
                ("DAEMON_HOME", "/h"),
                ("DAEMON_NAME", "simd"),
                ("CVX_METRICS_ADDR", &addr),
            ]),
            None,
            true,
        )
        .unwrap();
        assert_eq!(config.metrics_addr.unwrap().to_string(), addr);
        assert_eq!(listener.unwrap().local_addr().unwrap().to_string(), addr);
        assert_eq!(config.metrics_interval, Duration::from_secs(5));
    }
}
