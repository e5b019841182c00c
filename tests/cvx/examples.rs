//! The deployment examples under examples/ are checked, not just shipped.

use std::collections::BTreeMap;
use std::process::Command;

use crate::ctx::Ctx;

const UNIT: &str = include_str!("../../examples/systemd/cvx.service");

/// `Key=Value` lines of the unit; for Environment=, the variables.
fn unit_settings() -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let mut settings = BTreeMap::new();
    let mut env = BTreeMap::new();
    for line in UNIT
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && l.contains('='))
    {
        let (key, value) = line.split_once('=').unwrap();
        if key == "Environment" {
            let (name, v) = value.split_once('=').unwrap();
            env.insert(name.to_string(), v.to_string());
        } else {
            settings.insert(key.to_string(), value.to_string());
        }
    }
    (settings, env)
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let ctx = Ctx::new();
    // The unit as installed, with ExecStart pointing at the cvx under test.
    let unit = UNIT.replace("/usr/local/bin/cvx", env!("CARGO_BIN_EXE_cvx"));
    let path = ctx.path("osmosisd.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze is missing: scripts/test installs it (apt-get install systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    // verify exits 0 on settings it ignores; an ignored setting is a broken unit all the same.
    assert!(
        stderr.trim().is_empty(),
        "systemd-analyze verify complained:\n{stderr}"
    );
}

#[test]
fn systemd_unit_agrees_with_cvx_signal_handling() {
    let (settings, env) = unit_settings();
    assert!(
        settings["ExecStart"].contains("cvx run start --home"),
        "cvx run stands where cosmovisor run did"
    );
    // cvx forwards SIGTERM to the node and exits after it: only cvx is to be signalled.
    assert_eq!(settings["KillMode"], "mixed");
    assert_eq!(settings["KillSignal"], "SIGTERM");
    let stop = cvx::duration::parse(&settings["TimeoutStopSec"]).unwrap();
    let grace = cvx::duration::parse(&env["DAEMON_SHUTDOWN_GRACE"]).unwrap();
    assert!(
        stop > grace,
        "TimeoutStopSec {stop:?} must exceed DAEMON_SHUTDOWN_GRACE {grace:?}"
    );
    assert!(settings.contains_key("LimitNOFILE") && settings.contains_key("Restart"));
    // Restarts are limited: a node failing in a loop stops being restarted.
    let burst: u32 = settings["StartLimitBurst"].parse().unwrap();
    let interval =
        cvx::duration::parse(&format!("{}s", settings["StartLimitIntervalSec"])).unwrap();
    assert!(
        burst > 1 && interval >= std::time::Duration::from_secs(60),
        "{burst} in {interval:?}"
    );
    assert!(
        UNIT.lines()
            .any(|l| l.trim_start_matches(['#', ' ']).starts_with("OnFailure=")),
        "an OnFailure= example"
    );
    // The environment is one cvx run accepts: load it as cvx would.
    let env: Vec<(String, String)> = env.into_iter().collect();
    cvx::run::config::load(env, None)
        .expect("the unit's environment is a valid cvx run configuration");
}
