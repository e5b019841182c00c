//! `cvx plan --node URL` against a loopback server playing a node's REST API.

use serde_json::{Value, json};

use crate::ctx::{Ctx, platform, run, sha256};
use crate::support::server::{Fault, Server};

/// A manifest with v2 at 200 and v3 at 300 (heights as given).
fn manifest(ctx: &Ctx, v2: Option<u64>, v3: u64) {
    let p = platform();
    let pin = |name: &str| {
        format!(
            "binary.\"{p}\" = {{ url = \"https://e.org/{name}\", sha256 = \"{}\" }}",
            sha256(name.as_bytes())
        )
    };
    let v2_height = v2.map(|h| format!("height = {h}\n")).unwrap_or_default();
    ctx.manifest(&format!(
        "[chain]\nid = \"t-1\"\ndaemon = \"simd\"\n[genesis]\n{}\n[[upgrade]]\nname = \"v2\"\n{v2_height}{}\n[[upgrade]]\nname = \"v3\"\nheight = {v3}\n{}\n",
        pin("g"),
        pin("v2"),
        pin("v3")
    ));
}

/// The chain: at `latest`, `plan` scheduled, v2 applied at `v2_applied` (0 = not), v3 not applied.
fn chain(latest: u64, plan: Option<(&str, u64)>, v2_applied: u64) -> Server {
    let server = Server::start();
    let body = |v: Value| v.to_string().into_bytes();
    server.add(
        "/cosmos/base/tendermint/v1beta1/node_info",
        body(json!({"default_node_info": {"network": "t-1", "version": "0.38.12"}, "application_version": {"name": "sim"}})),
        Fault::None,
    );
    server.add(
        "/cosmos/base/tendermint/v1beta1/blocks/latest",
        body(json!({"sdk_block": {"header": {"height": latest.to_string()}}})),
        Fault::None,
    );
    let plan = match plan {
        Some((name, height)) => {
            json!({"plan": {"name": name, "time": "0001-01-01T00:00:00Z", "height": height.to_string(), "info": ""}})
        }
        None => json!({"plan": null}),
    };
    server.add(
        "/cosmos/upgrade/v1beta1/current_plan",
        body(plan),
        Fault::None,
    );
    server.add(
        "/cosmos/upgrade/v1beta1/applied_plan/v2",
        body(json!({"height": v2_applied.to_string()})),
        Fault::None,
    );
    server.add(
        "/cosmos/upgrade/v1beta1/applied_plan/v3",
        body(json!({"height": "0"})),
        Fault::None,
    );
    server
}

fn drift(ctx: &Ctx, server: &Server, code: i32) -> Value {
    let (stdout, _) = run(ctx.plan().args(["--json", "--node", &server.url("")]), code);
    let plan: Value = serde_json::from_str(&stdout).unwrap();
    plan["drift"].clone()
}

#[test]
fn no_drift_and_the_blocks_remaining() {
    let ctx = Ctx::new();
    manifest(&ctx, Some(200), 300);
    let server = chain(250, Some(("v3", 300)), 200);
    let d = drift(&ctx, &server, 0);
    assert_eq!(d["latest_height"], 250);
    assert_eq!(
        (&d["chain_id"], &d["trusted"]),
        (&json!("t-1"), &json!(true))
    );
    assert_eq!(d["findings"], json!([]));
    assert_eq!(
        d["next"],
        json!({"name": "v3", "height": 300, "blocks_remaining": 50})
    );
    let (human, _) = run(ctx.plan().args(["--node", &server.url("")]), 0);
    assert!(
        human.contains("next: v3 at height 300, 50 blocks from now"),
        "{human}"
    );
    assert!(human.contains("no drift"), "{human}");
}

#[test]
fn an_on_chain_plan_the_manifest_lacks_is_an_error() {
    let ctx = Ctx::new();
    manifest(&ctx, Some(200), 300);
    let server = chain(250, Some(("v2.1", 280)), 200);
    let d = drift(&ctx, &server, 1);
    assert_eq!(d["findings"][0]["severity"], "error");
    assert_eq!(
        d["findings"][0]["message"],
        "the chain schedules v2.1 at height 280 and the manifest lacks it: the node will halt there with no binary"
    );
    assert_eq!(d["next"]["blocks_remaining"], 30);
}

#[test]
fn a_height_that_differs_is_an_error() {
    let ctx = Ctx::new();
    manifest(&ctx, Some(200), 300);
    let d = drift(&ctx, &chain(250, Some(("v3", 310)), 200), 1);
    assert_eq!(d["findings"][0]["upgrade"], "v3");
    assert_eq!(
        d["findings"][0]["message"],
        "the chain schedules v3 at height 310, the manifest says 300"
    );
}

#[test]
fn a_name_that_differs_is_an_error() {
    let ctx = Ctx::new();
    manifest(&ctx, Some(200), 300);
    let d = drift(&ctx, &chain(250, Some(("V3-final", 300)), 200), 1);
    let message = d["findings"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("the chain schedules \"V3-final\", the manifest names it \"v3\""),
        "{message}"
    );
}

#[test]
fn an_upgrade_still_expected_but_already_applied_is_stale() {
    let ctx = Ctx::new();
    manifest(&ctx, Some(260), 300);
    let d = drift(&ctx, &chain(250, None, 240), 0);
    assert_eq!(d["findings"][0]["severity"], "warning");
    assert_eq!(
        d["findings"][0]["message"],
        "still expected at 260, but the chain already applied it at 240"
    );
    assert_eq!(
        d["next"],
        json!({"name": "v3", "height": 300, "blocks_remaining": 50})
    );

    manifest(&ctx, None, 300);
    let d = drift(&ctx, &chain(250, None, 240), 0);
    assert_eq!(
        d["findings"][0]["message"],
        "already applied at height 240; the manifest could record height = 240"
    );
}

#[test]
fn an_unreachable_node_is_an_error_with_a_hint() {
    let ctx = Ctx::new();
    manifest(&ctx, Some(200), 300);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (_, err) = run(
        ctx.plan()
            .args(["--node", &format!("http://127.0.0.1:{port}")]),
        1,
    );
    assert!(err.contains(&format!("the node at http://127.0.0.1:{port}/cosmos/base/tendermint/v1beta1/node_info does not answer")), "{err}");
    assert!(
        err.contains("hint: --node takes the node's REST endpoint"),
        "{err}"
    );
}

#[test]
fn an_on_chain_plan_at_a_scheduled_upgrades_height_is_a_conflict() {
    let ctx = Ctx::new();
    manifest(&ctx, Some(200), 300);
    let text = std::fs::read_to_string(ctx.path("cvx.toml"))
        .unwrap()
        .replace(
            "height = 300\n",
            "height = 300\ntrigger = \"halt-height\"\n",
        );
    ctx.manifest(&text);
    let d = drift(&ctx, &chain(250, Some(("v3", 300)), 200), 1);
    assert_eq!(d["findings"].as_array().unwrap().len(), 1, "{d}");
    assert_eq!(d["findings"][0]["severity"], "error");
    let message = d["findings"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("by governance at height 300, where the manifest schedules \"v3\" with trigger = \"halt-height\""),
        "{message}"
    );
}

#[test]
fn a_node_of_another_chain_is_a_warning_and_its_plans_are_not_compared() {
    let ctx = Ctx::new();
    manifest(&ctx, Some(200), 300);
    // It schedules an upgrade this manifest lacks: drift, were it this chain.
    let server = chain(250, Some(("v9", 260)), 0);
    server.add(
        "/cosmos/base/tendermint/v1beta1/node_info",
        json!({"default_node_info": {"network": "other-7"}})
            .to_string()
            .into_bytes(),
        Fault::None,
    );
    let d = drift(&ctx, &server, 0);
    assert_eq!(
        (&d["chain_id"], &d["trusted"]),
        (&json!("other-7"), &json!(false))
    );
    assert_eq!(d["latest_height"], Value::Null);
    assert_eq!(d["next"], Value::Null);
    let findings = d["findings"].as_array().unwrap();
    assert_eq!(findings.len(), 1, "{d:#}");
    assert_eq!(findings[0]["severity"], "warning");
    assert_eq!(findings[0]["key"], "chain.id");
    assert_eq!(findings[0]["location"], "cvx.toml:2:1");
    assert_eq!(
        findings[0]["message"],
        format!(
            "the node at {} is on chain \"other-7\", the manifest is for \"t-1\": its upgrade plans were not compared",
            server.url("")
        )
    );
    assert_eq!(
        server.hits("/cosmos/upgrade/v1beta1/current_plan"),
        0,
        "nothing else asked"
    );
    let (human, _) = run(ctx.plan().args(["--node", &server.url("")]), 0);
    assert!(
        human.contains(&format!(
            "chain: {} (other-7): not this chain\n  warning: cvx.toml:2:1: the node at",
            server.url("")
        )),
        "{human}"
    );
}

#[test]
fn drift_is_an_error_at_the_manifests_line_and_the_summary_says_failed() {
    let ctx = Ctx::new();
    manifest(&ctx, Some(200), 300);
    let server = chain(250, Some(("v3", 310)), 200);
    let (human, _) = run(ctx.plan().args(["--node", &server.url("")]), 1);
    // v3's height is on line 12 of the manifest, column 1.
    assert!(
        human.contains("  error: cvx.toml:12:1: upgrade v3: the chain schedules v3 at height 310, the manifest says 300\n"),
        "{human}"
    );
    assert!(
        human.trim_end().ends_with("failed (1 drift error)."),
        "the verdict agrees with exit 1:\n{human}"
    );
}
