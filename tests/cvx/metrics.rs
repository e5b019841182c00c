//! Metrics (`CVX_METRICS_ADDR`, DESIGN §5.3) and the facts `cvx status` shares with them: the
//! real supervisor supervising simnode, scraped over real HTTP, the scrape checked by
//! Prometheus's own `promtool`; and the examples under examples/prometheus/ (alert rules and
//! their unit tests, the scrape config, the Grafana dashboard), checked the same way.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use rustix::process::Signal;
use serde_json::Value;

use crate::ctx::{Ctx, platform, run, sha256};
use crate::run::{
    CVX, LIMIT, Reaper, Running, command, current, free_port, rpc_config, run_cvx, send, spawn,
    stage_bin, wait_for, wrapper,
};

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/prometheus");
const VERSION: &str = env!("CARGO_PKG_VERSION");

// ---------------------------------------------------------------------------------------------
// Helpers

/// A version's wrapper, its node answering RPC at config.toml's `[rpc] laddr`.
fn node(sim: &str) -> Vec<u8> {
    wrapper(&format!("--sim-rpc --sim-chain-id sim-1 {sim}"))
}

/// A manifest pinning each stage's bytes (genesis first), each served from a file of its own.
fn manifest(ctx: &Ctx, stages: &[(&str, Option<u64>, &[u8])]) -> PathBuf {
    let p = platform();
    let mut text = "[chain]\nid = \"sim-1\"\ndaemon = \"simd\"\n".to_string();
    for (name, height, bytes) in stages {
        let source = ctx.path(&format!("source-{name}"));
        fs::write(&source, bytes).unwrap();
        if *name == "genesis" {
            text.push_str("[genesis]\n");
        } else {
            text.push_str(&format!("[[upgrade]]\nname = \"{name}\"\n"));
        }
        if let Some(h) = height {
            text.push_str(&format!("height = {h}\n"));
        }
        text.push_str(&format!(
            "binary.\"{p}\" = {{ url = \"{}\", sha256 = \"{}\" }}\n",
            source.display(),
            sha256(bytes)
        ));
    }
    ctx.manifest(&text)
}

/// A request with a real HTTP client: (status, content type, body).
fn request(addr: &str, method: &str, path: &str) -> (u16, String, String) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let response = reqwest::Client::new()
            .request(method.parse().unwrap(), format!("http://{addr}{path}"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} http://{addr}{path}: {e}"));
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        (status, content_type, response.text().await.unwrap())
    })
}

/// One scrape of `/metrics`.
struct Scrape(String);

impl Scrape {
    /// The value of one series, written as exposed: `name` or `name{label="value",...}`.
    fn value(&self, series: &str) -> Option<f64> {
        self.0
            .lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                (name == series).then(|| value.parse().unwrap())
            })
    }

    /// Names of the metrics with samples.
    fn names(&self) -> BTreeSet<String> {
        self.0
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
            .collect()
    }
}

fn scrape(addr: &str) -> Scrape {
    let (status, content_type, body) = request(addr, "GET", "/metrics");
    assert_eq!(status, 200, "{body}");
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    Scrape(body)
}

/// Scrape until `cond` holds (every 20 ms, within LIMIT); the scrape where it did.
fn scrape_until(cvx: &Running, addr: &str, what: &str, cond: impl Fn(&Scrape) -> bool) -> Scrape {
    let start = std::time::Instant::now();
    loop {
        let s = scrape(addr);
        if cond(&s) {
            return s;
        }
        assert!(
            start.elapsed() < LIMIT,
            "timed out waiting for {what}; last scrape:\n{}\n{}",
            s.0,
            cvx.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `promtool ARGS` in `dir`, `stdin` fed to it: (success, stdout and stderr).
fn promtool(dir: &Path, args: &[&str], stdin: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is missing: scripts/test installs it (apt-get install prometheus)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn status_json(ctx: &Ctx, manifest: &Path) -> Value {
    let (stdout, _) = run(
        ctx.cvx()
            .args(["status", "--json", "-m"])
            .arg(manifest)
            .arg("--home")
            .arg(&ctx.home),
        0,
    );
    serde_json::from_str(&stdout).unwrap()
}

/// Whether process `pid` has a listening TCP socket (its fds against /proc/net/tcp{,6}).
fn listening(pid: i32) -> bool {
    let sockets: BTreeSet<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|fd| fs::read_link(fd.path()).ok())
        .filter_map(|link| {
            let link = link.to_string_lossy().into_owned();
            Some(
                link.strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_string(),
            )
        })
        .collect();
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|table| {
        fs::read_to_string(table)
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                // st 0A is LISTEN; field 9 is the socket's inode.
                fields.get(3) == Some(&"0A") && fields.get(9).is_some_and(|i| sockets.contains(*i))
            })
    })
}

/// Total size of the files under `dir`.
fn bytes_under(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            let meta = fs::symlink_metadata(e.path()).unwrap();
            if meta.is_dir() {
                bytes_under(&e.path())
            } else {
                meta.len()
            }
        })
        .sum()
}

fn metric_names() -> BTreeSet<&'static str> {
    cvx::run::metrics::ALL.iter().map(|m| m.name).collect()
}

/// The `cvx_*` names a text mentions.
fn mentioned(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("cvx_") {
        let word: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        rest = &rest[at + word.len()..];
        names.insert(word);
    }
    names
}

// ---------------------------------------------------------------------------------------------
// The supervisor

#[test]
fn an_upgrade_shows_in_a_live_scrape_that_promtool_accepts_and_in_cvx_status() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    rpc_config(&ctx);
    let g = node("--sim-version v1.0.0 --sim-upgrade v2@30");
    let v2 = node("--sim-version v2.0.0 --sim-handlers v2");
    let v3 = node("--sim-version v3.0.0 --sim-handlers v3");
    let m = manifest(
        &ctx,
        &[
            ("genesis", None, &g),
            ("v2", Some(30), &v2),
            ("v3", Some(1_000_000), &v3),
        ],
    );
    stage_bin(&ctx, "genesis", &g);
    std::os::unix::fs::symlink("genesis", ctx.cosmovisor("current")).unwrap();
    stage_bin(&ctx, "upgrades/v2", &v2);
    let addr = format!("127.0.0.1:{}", free_port());
    let backups = ctx.path("backups");
    let env = [
        ("CVX_METRICS_ADDR", addr.as_str()),
        ("CVX_METRICS_INTERVAL", "100ms"),
        ("CVX_MANIFEST", m.to_str().unwrap()),
        ("UNSAFE_SKIP_BACKUP", "false"),
        ("DAEMON_DATA_BACKUP_DIR", backups.to_str().unwrap()),
    ];
    let cvx = spawn(&ctx, command(&ctx, &env, &[]));

    // (The new daemon's RPC answers a moment after its start.)
    let s = scrape_until(&cvx, &addr, "the upgrade to v2, then v3 judged", |s| {
        s.value(r#"cvx_upgrades_total{result="success"}"#) == Some(1.0)
            && s.value("cvx_daemon_restarts_total") == Some(1.0)
            && s.value(r#"cvx_upgrade_next_ready{name="v3"}"#).is_some()
            && s.value("cvx_node_rpc_up") == Some(1.0)
    });

    // promtool accepts the exposition as Prometheus will scrape it.
    let (ok, said) = promtool(ctx.dir.path(), &["check", "metrics"], &s.0);
    assert!(
        ok && said.trim().is_empty(),
        "promtool check metrics:\n{said}\n{}",
        s.0
    );
    // Every metric cvx exports is there, with HELP and TYPE.
    for metric in cvx::run::metrics::ALL {
        let kind = metric.kind.as_str();
        for line in [
            format!("# HELP {} {}\n", metric.name, metric.help),
            format!("# TYPE {} {kind}\n", metric.name),
        ] {
            assert!(s.0.contains(&line), "no {line:?} in:\n{}", s.0);
        }
    }
    assert_eq!(
        s.names(),
        metric_names().into_iter().map(String::from).collect()
    );

    let info =
        format!(r#"cvx_info{{version="{VERSION}",chain_id="sim-1",daemon="simd",current="v2"}}"#);
    assert_eq!(s.value(&info), Some(1.0), "{}", s.0);
    assert_eq!(current(&ctx), "upgrades/v2");
    assert_eq!(s.value("cvx_daemon_up"), Some(1.0));
    assert_eq!(s.value("cvx_daemon_restarts_total"), Some(1.0));
    assert_eq!(
        s.value(r#"cvx_upgrades_total{result="failure"}"#),
        Some(0.0)
    );
    assert_eq!(s.value("cvx_upgrade_last_failed"), Some(0.0));
    assert_eq!(s.value("cvx_node_rpc_up"), Some(1.0));
    assert_eq!(s.value(r#"cvx_upgrade_next_height{name="v3"}"#), Some(1e6));
    assert_eq!(s.value(r#"cvx_upgrade_next_ready{name="v3"}"#), Some(0.0));
    let height = s.value("cvx_node_height").unwrap();
    assert_eq!(s.value("cvx_upgrade_blocks_remaining"), Some(1e6 - height));
    let downtime = s.value("cvx_upgrade_last_downtime_seconds").unwrap();
    assert!(
        downtime > 0.0 && downtime < LIMIT.as_secs_f64(),
        "{downtime}"
    );
    let finished = s.value("cvx_upgrade_last_timestamp_seconds").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - finished).abs() < LIMIT.as_secs_f64(), "{finished}");
    // The bytes the backup copied are the bytes in the backup.
    let backup = fs::read_dir(&backups)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let copied = s.value("cvx_backup_last_bytes_copied").unwrap();
    assert_eq!(copied, bytes_under(&backup) as f64);
    assert!(copied > 0.0);
    assert!(s.value("cvx_backup_last_seconds").unwrap() >= 0.0);

    // `cvx status --json` reports the same facts.
    let st = status_json(&ctx, &m);
    let sup = &st["supervisor"];
    assert_eq!(sup["running"], true, "{st:#}");
    assert_eq!(sup["pid"], cvx.pid());
    assert_eq!(sup["version"], VERSION);
    assert_eq!(sup["daemon_up"], true);
    assert_eq!(sup["daemon_restarts"], 1);
    assert_eq!(
        sup["upgrades"],
        serde_json::json!({"success": 1, "failure": 0})
    );
    let last = &sup["last_upgrade"];
    assert_eq!((&last["name"], &last["height"]), (&"v2".into(), &30.into()));
    assert_eq!(last["result"], "success");
    assert_eq!(last["downtime_seconds"].as_f64(), Some(downtime));
    assert_eq!(last["finished_at"].as_f64(), Some(finished));
    assert_eq!(sup["last_backup"]["bytes_copied"].as_f64(), Some(copied));
    assert_eq!(sup["last_backup"]["upgrade"], "v2");
    assert_eq!(st["current"]["upgrade"], "v2");
    assert_eq!(st["next"]["name"], "v3");
    assert_eq!(st["next"]["binary_ready"], false);
    assert_eq!(st["node"]["answering"], true);

    // Once cvx is gone, status says so, and keeps the facts it recorded.
    send(cvx.pid(), Signal::TERM);
    cvx.finish(0);
    let st = status_json(&ctx, &m);
    assert_eq!(st["supervisor"]["running"], false, "{st:#}");
    assert_eq!(st["supervisor"]["daemon_up"], false);
    assert_eq!(st["supervisor"]["upgrades"]["success"], 1);
    let (human, _) = run(
        ctx.cvx()
            .args(["status", "-m"])
            .arg(&m)
            .arg("--home")
            .arg(&ctx.home),
        0,
    );
    assert!(
        human.contains("supervisor: not running (last: cvx run, pid")
            && human.contains("upgrades: 1 succeeded, 0 failed; last v2 at height 30: succeeded"),
        "{human}"
    );
}

#[test]
fn readiness_follows_cvx_apply_while_the_node_runs_without_hashing_again() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    rpc_config(&ctx);
    let g = node("--sim-version v1.0.0 --sim-block-time 50ms");
    let v2 = node("--sim-version v2.0.0 --sim-handlers v2");
    let m = manifest(&ctx, &[("genesis", None, &g), ("v2", Some(1_000_000), &v2)]);
    stage_bin(&ctx, "genesis", &g);
    std::os::unix::fs::symlink("genesis", ctx.cosmovisor("current")).unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let env = [
        ("CVX_METRICS_ADDR", addr.as_str()),
        ("CVX_METRICS_INTERVAL", "100ms"),
        ("CVX_MANIFEST", m.to_str().unwrap()),
        ("CVX_LOG", "cvx=trace"),
    ];
    let cvx = spawn(&ctx, command(&ctx, &env, &[]));

    let s = scrape_until(&cvx, &addr, "v2 judged not ready", |s| {
        s.value(r#"cvx_upgrade_next_ready{name="v2"}"#) == Some(0.0)
            && s.value("cvx_node_height").is_some()
    });
    assert!(listening(cvx.pid()), "{}", cvx.logs());
    assert_eq!(s.value(r#"cvx_upgrade_next_height{name="v2"}"#), Some(1e6));
    let height = s.value("cvx_node_height").unwrap();
    assert_eq!(s.value("cvx_upgrade_blocks_remaining"), Some(1e6 - height));
    assert_eq!(status_json(&ctx, &m)["next"]["binary_ready"], false);
    // The node advances, and so does the gauge.
    scrape_until(&cvx, &addr, "the height to advance", |s| {
        s.value("cvx_node_height").is_some_and(|h| h > height)
    });

    run(
        ctx.cvx()
            .args(["apply", "-q", "-m"])
            .arg(&m)
            .arg("--home")
            .arg(&ctx.home),
        0,
    );
    scrape_until(&cvx, &addr, "v2 ready after cvx apply", |s| {
        s.value(r#"cvx_upgrade_next_ready{name="v2"}"#) == Some(1.0)
    });
    assert_eq!(status_json(&ctx, &m)["next"]["binary_ready"], true);

    // Nothing changes: ten more refreshes, and the staged files are not judged (hashed) again.
    let judged = |cvx: &Running| {
        cvx.stderr()
            .matches("metrics: judging the next upgrade")
            .count()
    };
    let refreshes = |cvx: &Running| cvx.stderr().matches("metrics: refreshed").count();
    // (A refresh that began while apply wrote may judge once more: let two pass.)
    let settled = refreshes(&cvx);
    wait_for("two more refreshes", LIMIT, || {
        refreshes(&cvx) >= settled + 2
    });
    let (before, refreshed) = (judged(&cvx), refreshes(&cvx));
    wait_for("ten more refreshes", LIMIT, || {
        refreshes(&cvx) >= refreshed + 10
    });
    assert_eq!(judged(&cvx), before, "{}", cvx.logs());

    // Other bytes, same length: the receipt no longer vouches, the hash disagrees.
    let staged = ctx.cosmovisor("upgrades/v2/bin/simd");
    let evil = String::from_utf8(v2.clone())
        .unwrap()
        .replace("v2.0.0", "v6.6.6");
    fs::write(&staged, evil).unwrap();
    scrape_until(&cvx, &addr, "v2 not ready once changed", |s| {
        s.value(r#"cvx_upgrade_next_ready{name="v2"}"#) == Some(0.0)
    });
    assert_eq!(status_json(&ctx, &m)["next"]["binary_ready"], false);

    // The endpoint answers GET and HEAD of /metrics, and nothing else.
    let (status, _, body) = request(&addr, "HEAD", "/metrics");
    assert_eq!((status, body.as_str()), (200, ""));
    assert_eq!(request(&addr, "GET", "/metrics?x=1").0, 200);
    assert_eq!(request(&addr, "GET", "/").0, 404);
    assert_eq!(request(&addr, "POST", "/metrics").0, 405);

    send(cvx.pid(), Signal::TERM);
    cvx.finish(0);
}

#[test]
fn off_the_manifest_the_next_upgrade_follows_the_nodes_height() {
    // `current` points to a stage the manifest does not name: the next upgrade is the first
    // above the node's height, and changes as the node passes one, with no change in the tree.
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    rpc_config(&ctx);
    let g = node("--sim-version v1.0.0");
    let m = manifest(
        &ctx,
        &[
            ("genesis", None, &g),
            ("v2", Some(40), &node("--sim-version v2.0.0")),
            ("v3", Some(1_000_000), &node("--sim-version v3.0.0")),
        ],
    );
    stage_bin(&ctx, "upgrades/custom", &node("--sim-block-time 50ms"));
    std::os::unix::fs::symlink("upgrades/custom", ctx.cosmovisor("current")).unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let env = [
        ("CVX_METRICS_ADDR", addr.as_str()),
        ("CVX_METRICS_INTERVAL", "100ms"),
        ("CVX_MANIFEST", m.to_str().unwrap()),
    ];
    let cvx = spawn(&ctx, command(&ctx, &env, &[]));

    let s = scrape_until(&cvx, &addr, "v2 next", |s| {
        s.value(r#"cvx_upgrade_next_height{name="v2"}"#) == Some(40.0)
    });
    assert!(s.value("cvx_node_height").unwrap_or(0.0) < 40.0, "{}", s.0);
    let info = format!(
        r#"cvx_info{{version="{VERSION}",chain_id="sim-1",daemon="simd",current="upgrades/custom"}}"#
    );
    assert_eq!(s.value(&info), Some(1.0), "{}", s.0);
    let s = scrape_until(&cvx, &addr, "v3 next once the node passed 40", |s| {
        s.value(r#"cvx_upgrade_next_height{name="v3"}"#) == Some(1e6)
    });
    assert!(s.value("cvx_node_height").unwrap() >= 40.0, "{}", s.0);
    assert!(!s.0.contains(r#"name="v2""#), "{}", s.0);
    send(cvx.pid(), Signal::TERM);
    cvx.finish(0);
}

#[test]
fn metrics_are_off_by_default_and_status_still_has_the_facts() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    let g = node("--sim-version v1.0.0");
    let m = manifest(&ctx, &[("genesis", None, &g)]);
    stage_bin(&ctx, "genesis", &g);
    std::os::unix::fs::symlink("genesis", ctx.cosmovisor("current")).unwrap();
    let cvx = spawn(&ctx, command(&ctx, &[], &[]));
    wait_for("the daemon", LIMIT, || {
        status_json(&ctx, &m)["supervisor"]["daemon_up"] == true
    });

    assert!(!listening(cvx.pid()), "{}", cvx.logs());
    assert!(!cvx.stderr().contains("metrics"), "{}", cvx.logs());
    send(cvx.pid(), Signal::TERM);
    cvx.finish(0);
}

#[test]
fn a_failed_upgrade_is_reported_by_the_next_cvx() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    rpc_config(&ctx);
    // v2 is not staged: the upgrade fails and cvx exits 1.
    stage_bin(&ctx, "genesis", &node("--sim-upgrade v2@3"));
    std::os::unix::fs::symlink("genesis", ctx.cosmovisor("current")).unwrap();
    run_cvx(&ctx, &[], &[], 1);

    // The next cvx (the operator skips the upgrade to keep the node up) still reports it.
    let addr = format!("127.0.0.1:{}", free_port());
    let env = [
        ("CVX_METRICS_ADDR", addr.as_str()),
        ("CVX_METRICS_INTERVAL", "100ms"),
    ];
    let cvx = spawn(&ctx, command(&ctx, &env, &["--unsafe-skip-upgrades", "3"]));
    let s = scrape_until(&cvx, &addr, "the node's chain id from its RPC", |s| {
        s.value("cvx_node_height").is_some_and(|h| h > 3.0)
    });
    assert_eq!(
        s.value(r#"cvx_upgrades_total{result="failure"}"#),
        Some(1.0)
    );
    assert_eq!(
        s.value(r#"cvx_upgrades_total{result="success"}"#),
        Some(0.0)
    );
    assert_eq!(s.value("cvx_upgrade_last_failed"), Some(1.0));
    assert_eq!(s.value("cvx_upgrade_last_downtime_seconds"), None);
    assert!(s.value("cvx_upgrade_last_timestamp_seconds").is_some());
    // Without CVX_MANIFEST: no next upgrade to judge; the chain id is the node's.
    assert_eq!(
        s.value(&format!(
            r#"cvx_info{{version="{VERSION}",chain_id="sim-1",daemon="simd",current="genesis"}}"#
        )),
        Some(1.0),
        "{}",
        s.0
    );
    assert!(!s.0.contains("cvx_upgrade_next"), "{}", s.0);
    let (ok, said) = promtool(ctx.dir.path(), &["check", "metrics"], &s.0);
    assert!(
        ok && said.trim().is_empty(),
        "promtool check metrics:\n{said}"
    );

    let m = manifest(&ctx, &[("genesis", None, &node("--sim-upgrade v2@3"))]);
    let last = &status_json(&ctx, &m)["supervisor"]["last_upgrade"];
    assert_eq!(last["result"], "failure");
    assert!(
        last["error"].as_str().unwrap().contains("no binary at"),
        "{last}"
    );
    send(cvx.pid(), Signal::TERM);
    cvx.finish(0);
}

#[test]
fn a_bad_metrics_address_is_reported_with_the_other_configuration_errors() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    stage_bin(&ctx, "genesis", &wrapper(""));
    std::os::unix::fs::symlink("genesis", ctx.cosmovisor("current")).unwrap();
    let env = [
        ("CVX_METRICS_ADDR", ":9464"),
        ("DAEMON_POLL_INTERVAL", "-1s"),
    ];
    let (_, stderr) = spawn(&ctx, command(&ctx, &env, &[])).finish(1);
    assert!(
        stderr.contains(
            "CVX_METRICS_ADDR=\":9464\" has no host: use 127.0.0.1:9464 for this host only"
        ),
        "{stderr}"
    );
    assert_eq!(stderr.matches("\n  - ").count(), 2, "{stderr}");
    assert!(
        !ctx.home.join("data").exists(),
        "the daemon must never start"
    );
}

#[test]
fn a_metrics_port_in_use_stops_start_but_not_other_commands() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    stage_bin(&ctx, "genesis", &wrapper("--sim-version v1.0.0"));
    std::os::unix::fs::symlink("genesis", ctx.cosmovisor("current")).unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let env = [("CVX_METRICS_ADDR", addr.as_str()), ("DAEMON_NAME", "")];

    let (_, stderr) = spawn(&ctx, command(&ctx, &env, &[])).finish(1);
    assert!(
        stderr.contains(&format!(
            "CVX_METRICS_ADDR={addr:?}: cannot serve metrics there"
        )) && stderr.contains("pick a free one")
            && stderr.contains("DAEMON_NAME is not set"),
        "{stderr}"
    );
    assert!(
        !ctx.home.join("data").exists(),
        "the daemon must never start"
    );

    // `cvx run version` in the same environment (the unit's, in a shell) serves nothing.
    let out = Command::new(CVX)
        .args(["run", "version"])
        .env("DAEMON_HOME", &ctx.home)
        .env("DAEMON_NAME", "simd")
        .env("CVX_METRICS_ADDR", &addr)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "v1.0.0");
    assert!(!ctx.cosmovisor(".cvx/supervisor.json").exists());
}

// ---------------------------------------------------------------------------------------------
// examples/prometheus/

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let dir = Path::new(EXAMPLES);
    let (ok, said) = promtool(dir, &["check", "rules", "cvx.rules.yml"], "");
    assert!(ok && said.contains("SUCCESS: 5 rules found"), "{said}");
    let (ok, said) = promtool(dir, &["test", "rules", "cvx.rules.test.yml"], "");
    assert!(ok && said.contains("SUCCESS"), "{said}");
    let (ok, said) = promtool(dir, &["check", "config", "prometheus.yml"], "");
    assert!(ok, "{said}");

    // Every alert the issue asks for exists and has a unit test.
    let rules = fs::read_to_string(dir.join("cvx.rules.yml")).unwrap();
    let tests = fs::read_to_string(dir.join("cvx.rules.test.yml")).unwrap();
    for alert in [
        "CvxUpgradeBinaryNotReady",
        "CvxDaemonDown",
        "CvxUpgradeFailed",
        "CvxUpgradeDowntimeHigh",
        "CvxNodeNotAdvancing",
    ] {
        assert!(rules.contains(&format!("- alert: {alert}\n")), "{alert}");
        assert!(tests.contains(&format!("alertname: {alert}\n")), "{alert}");
    }
}

#[test]
fn the_examples_and_readme_name_only_metrics_cvx_exports() {
    let exported = metric_names();
    for file in [
        "cvx.rules.yml",
        "cvx.rules.test.yml",
        "grafana-dashboard.json",
    ] {
        let text = fs::read_to_string(Path::new(EXAMPLES).join(file)).unwrap();
        let names = mentioned(&text);
        assert!(!names.is_empty(), "{file}");
        for name in names {
            assert!(
                exported.contains(name.as_str()),
                "{file} names {name}, which cvx does not export"
            );
        }
    }
    let dashboard: Value = serde_json::from_str(
        &fs::read_to_string(Path::new(EXAMPLES).join("grafana-dashboard.json")).unwrap(),
    )
    .expect("the dashboard is valid JSON");
    let panels = dashboard["panels"].as_array().unwrap();
    let exprs: Vec<&str> = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap())
        .map(|t| t["expr"].as_str().unwrap())
        .collect();
    for wanted in [
        "cvx_node_height",
        "cvx_upgrade_blocks_remaining",
        "cvx_upgrade_next_ready",
        "cvx_upgrade_last_downtime_seconds",
    ] {
        assert!(
            exprs.iter().any(|e| e.contains(wanted)),
            "no panel shows {wanted}"
        );
    }

    // README's metric table lists exactly what cvx exports.
    let readme = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let table: BTreeSet<String> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `cvx_"))
        .map(|l| format!("cvx_{}", l.split(['`', '{']).next().unwrap()))
        .collect();
    assert_eq!(table, exported.into_iter().map(String::from).collect());
}
