//! `cvx demo`: the rehearsal an operator runs first must work, offline, end to end.

use crate::ctx::{Ctx, run};

#[test]
fn the_demo_rehearses_plan_apply_two_governance_upgrades_and_a_scheduled_one() {
    let ctx = Ctx::new();
    let (stdout, stderr) = run(ctx.cvx().arg("demo").env("TMPDIR", ctx.dir.path()), 0);
    for expected in [
        "Plan: 5 to fetch, 0 to replace, 0 ok, current link to create: changes pending.",
        "Apply: 6 changed, 0 unchanged, 0 failed: changed.",
        "Apply: 0 changed, 5 unchanged, 0 failed: nothing to do.",
        "ERR UPGRADE \"v2\" NEEDED at height: 10",
        "INF applying upgrade \"v3\" at height: 20",
        "scheduled: cvx run halts the node at 25",
        "halt-height=25",
        "current -> upgrades/v3.0.1-patch",
        "pending:  v3 at height 20: already applied: current points to upgrades/v3.0.1-patch, which comes after it",
        "Rehearsal complete",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}\n{stderr}"
        );
    }
    for expected in [
        "switched current to upgrades/v2",
        "switched current to upgrades/v3",
        "starting the daemon with --halt-height 25",
        "the node halted at height 25",
        "switched current to upgrades/v3.0.1-patch",
        "backed up data to",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in stderr:\n{stderr}"
        );
    }
    // The simulated node writes upgrade-info.json in pieces; reading one is not news here.
    assert!(!stderr.contains("is incomplete"), "{stderr}");
    // Without --keep the rehearsal cleans up after itself.
    let left: Vec<_> = std::fs::read_dir(ctx.dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("cvx-demo-"))
        .collect();
    assert!(left.is_empty(), "the demo left {left:?}");
}
