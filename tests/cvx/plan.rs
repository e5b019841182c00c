//! `cvx plan` over empty, partial, complete and tampered trees; JSON shape; exit codes.

use std::os::unix::fs::symlink;

use serde_json::Value;

use crate::ctx::{Ctx, platform, run, sha256};

const GENESIS: &[u8] = b"#!/bin/sh\necho v1.0.0\n";
const V2: &[u8] = b"#!/bin/sh\necho v2.0.0\n";
const LIB: &[u8] = b"\x7fELF pretend library";

/// A manifest for the host platform: genesis, v2 (binary + library), v3 (an archive).
fn manifest(ctx: &Ctx) {
    let p = platform();
    ctx.manifest(&format!(
        r#"[chain]
id = "testchain-1"
daemon = "simd"

[genesis]
version = "v1.0.0"
binary."{p}" = {{ url = "https://example.org/v1/simd", sha256 = "{g}" }}

[[upgrade]]
name = "V2"
height = 100
version = "v2.0.0"
binary."{p}" = {{ url = "https://example.org/v2/simd", sha256 = "{v2}" }}
library."{p}" = [ {{ url = "https://example.org/v2/libwasmvm.so", sha256 = "{lib}" }} ]

[[upgrade]]
name = "v3"
height = 200
binary."{p}" = {{ url = "https://example.org/v3/simd.tar.gz", sha256 = "{arc}", path = "bin/simd" }}
"#,
        g = sha256(GENESIS),
        v2 = sha256(V2),
        lib = sha256(LIB),
        arc = sha256(b"an archive"),
    ));
}

fn plan_json(ctx: &Ctx, code: i32) -> Value {
    let (stdout, _) = run(ctx.plan().args(["--json", "--detailed-exitcode"]), code);
    serde_json::from_str(&stdout).unwrap()
}

fn stage<'a>(plan: &'a Value, dir: &str) -> &'a Value {
    plan["upgrades"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["dir"] == dir)
        .unwrap_or_else(|| panic!("no stage {dir} in {plan:#}"))
}

/// Stage genesis and v2 exactly as pinned, and point current at genesis.
fn stage_complete_raw(ctx: &Ctx) {
    ctx.stage("genesis/bin/simd", GENESIS);
    ctx.stage("upgrades/v2/bin/simd", V2);
    ctx.stage("upgrades/v2/lib/libwasmvm.so", LIB);
    symlink("genesis", ctx.cosmovisor("current")).unwrap();
}

fn listing(root: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries {
            let e = e.unwrap();
            let meta = std::fs::symlink_metadata(e.path()).unwrap();
            out.push(format!(
                "{} {:?}",
                e.path().display(),
                meta.modified().unwrap()
            ));
            if meta.is_dir() {
                stack.push(e.path());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn empty_tree_plans_everything_and_writes_nothing() {
    let ctx = Ctx::new();
    manifest(&ctx);
    let plan = plan_json(&ctx, 2);
    assert_eq!(plan["format_version"], 1);
    assert_eq!(
        plan["summary"],
        serde_json::json!({"fetch": 4, "replace": 0, "adopt": 0, "ok": 0, "unmanaged": 0})
    );
    assert_eq!(stage(&plan, "genesis")["action"], "create");
    assert_eq!(stage(&plan, "upgrades/v2")["name"], "V2");
    assert_eq!(plan["current"]["action"], "create");
    assert_eq!(plan["pending"]["state"], "none");
    assert!(!ctx.home.exists(), "plan must not create the home");
    // Without --detailed-exitcode a valid plan exits 0 even with changes.
    run(&mut ctx.plan(), 0);
}

#[test]
fn partial_tree() {
    let ctx = Ctx::new();
    manifest(&ctx);
    ctx.stage("genesis/bin/simd", GENESIS);
    let plan = plan_json(&ctx, 2);
    // Staged by hand (no receipt) and equal to the pin: adopted, not fetched again.
    let genesis = stage(&plan, "genesis");
    assert_eq!(genesis["action"], "adopt");
    assert_eq!(genesis["artifacts"][0]["state"], "ok");
    assert_eq!(genesis["artifacts"][0]["action"], "adopt");
    assert_eq!(
        genesis["artifacts"][0]["reason"],
        "staged without a receipt; its sha256 matches the pin: apply writes the receipt"
    );
    assert_eq!(genesis["artifacts"][0]["staged_sha256"], sha256(GENESIS));
    assert_eq!(stage(&plan, "upgrades/v2")["action"], "create");
    assert_eq!(plan["summary"]["adopt"], 1);
    assert_eq!(plan["summary"]["ok"], 0);
    assert_eq!(plan["summary"]["fetch"], 3);
}

#[test]
fn complete_tree_has_nothing_to_do() {
    let ctx = Ctx::new();
    let p = platform();
    ctx.manifest(&format!(
        "[chain]\nid = \"t-1\"\ndaemon = \"simd\"\n[genesis]\nbinary.\"{p}\" = {{ url = \"https://e.org/g\", sha256 = \"{}\" }}\n[[upgrade]]\nname = \"v2\"\nbinary.\"{p}\" = {{ url = \"https://e.org/v2\", sha256 = \"{}\" }}\nlibrary.\"{p}\" = [ {{ url = \"https://e.org/libwasmvm.so\", sha256 = \"{}\" }} ]\n",
        sha256(GENESIS),
        sha256(V2),
        sha256(LIB)
    ));
    stage_complete_raw(&ctx);
    let before = listing(&ctx.home);
    // Staged by hand: every file is the pinned one, and only receipts are missing.
    let plan = plan_json(&ctx, 2);
    assert_eq!(plan["summary"]["adopt"], 3);
    assert_eq!(listing(&ctx.home), before, "plan must not write");
    run(ctx.cvx().args(["apply", "--home"]).arg(&ctx.home), 0);

    let plan = plan_json(&ctx, 0);
    assert_eq!(plan["summary"]["ok"], 3);
    assert_eq!(plan["current"]["action"], "ok");
    assert_eq!(plan["current"]["stage"], "genesis");
    assert_eq!(stage(&plan, "genesis")["current"], true);
    let (human, _) = run(ctx.plan().arg("--detailed-exitcode"), 0);
    assert!(human.contains("nothing to do"), "{human}");
}

#[test]
fn tampered_files_are_replaced_with_the_reason() {
    let ctx = Ctx::new();
    manifest(&ctx);
    stage_complete_raw(&ctx);
    ctx.stage("upgrades/v2/bin/simd", b"#!/bin/sh\necho evil\n");
    let plan = plan_json(&ctx, 2);
    let v2 = stage(&plan, "upgrades/v2");
    assert_eq!(v2["action"], "replace");
    let bin = &v2["artifacts"][0];
    assert_eq!(bin["state"], "mismatch");
    assert_eq!(bin["action"], "replace");
    let staged = sha256(b"#!/bin/sh\necho evil\n");
    // Whole digests: a reader compares them with sha256sum's output.
    assert_eq!(
        bin["reason"],
        format!("sha256 {staged} differs from the pin {}", sha256(V2))
    );
    assert_eq!(bin["staged_sha256"], staged);
    assert_eq!(
        v2["artifacts"][1]["state"], "ok",
        "the library is untouched"
    );
}

#[test]
fn an_archive_binary_without_receipt_is_unverified() {
    let ctx = Ctx::new();
    manifest(&ctx);
    ctx.stage("upgrades/v3/bin/simd", b"unpacked by hand");
    let plan = plan_json(&ctx, 2);
    let bin = &stage(&plan, "upgrades/v3")["artifacts"][0];
    assert_eq!(bin["state"], "unverified");
    assert_eq!(bin["member"], "bin/simd");
    assert_eq!(bin["destination"], "upgrades/v3/bin/simd");
}

#[test]
fn unmanaged_directories_and_odd_current_links() {
    let ctx = Ctx::new();
    manifest(&ctx);
    ctx.stage("upgrades/v0-old/bin/simd", b"old");
    symlink("upgrades/v0-old", ctx.cosmovisor("current")).unwrap();
    let plan = plan_json(&ctx, 2);
    let old = stage(&plan, "upgrades/v0-old");
    assert_eq!(old["action"], "unmanaged");
    assert_eq!(old["current"], true);
    assert_eq!(plan["summary"]["unmanaged"], 1);
    assert_eq!(plan["current"]["action"], "attention");
    assert!(
        plan["warnings"][0]
            .as_str()
            .unwrap()
            .contains("points to upgrades/v0-old, which the manifest does not name")
    );

    std::fs::remove_file(ctx.cosmovisor("current")).unwrap();
    symlink("upgrades/gone", ctx.cosmovisor("current")).unwrap();
    let plan = plan_json(&ctx, 2);
    assert_eq!(
        plan["current"]["reason"],
        "points to upgrades/gone, which does not exist"
    );
}

#[test]
fn upgrade_info_states_never_fail_the_plan() {
    let ctx = Ctx::new();
    manifest(&ctx);
    stage_complete_raw(&ctx);
    let info = ctx.home.join("data/upgrade-info.json");
    std::fs::create_dir_all(info.parent().unwrap()).unwrap();
    for (bytes, state) in [
        (&b""[..], "empty"),
        (&b"{\"name\":\"V2\",\"hei"[..], "partial"),
        (&b"\x00\xffnot json"[..], "invalid"),
    ] {
        std::fs::write(&info, bytes).unwrap();
        let plan = plan_json(&ctx, 2);
        assert_eq!(plan["pending"]["state"], state);
    }
    std::fs::write(
        &info,
        br#"{"name":"V2","time":"0001-01-01T00:00:00Z","height":100}"#,
    )
    .unwrap();
    let plan = plan_json(&ctx, 2);
    let pending = &plan["pending"];
    assert_eq!(pending["state"], "valid");
    assert_eq!(pending["dir"], "upgrades/v2");
    assert_eq!(pending["in_manifest"], true);
    assert_eq!(pending["binary_ready"], true);
    assert_eq!(pending["applied"], false);

    std::fs::write(&info, br#"{"name":"v9","height":900}"#).unwrap();
    let (human, _) = run(&mut ctx.plan(), 0);
    assert!(
        human.contains("pending upgrade: v9 at height 900  not in the manifest"),
        "{human}"
    );
}

#[test]
fn recase_follows_cosmovisor_and_can_be_disabled() {
    let ctx = Ctx::new();
    manifest(&ctx);
    let plan = plan_json(&ctx, 2);
    assert!(
        plan["upgrades"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["dir"] == "upgrades/v2")
    );
    let (stdout, _) = run(
        ctx.plan()
            .arg("--json")
            .env("COSMOVISOR_DISABLE_RECASE", "TRUE"),
        0,
    );
    let plan: Value = serde_json::from_str(&stdout).unwrap();
    assert!(
        plan["upgrades"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["dir"] == "upgrades/V2")
    );
    let (_, err) = run(ctx.plan().env("COSMOVISOR_DISABLE_RECASE", "yes"), 1);
    assert!(
        err.contains("COSMOVISOR_DISABLE_RECASE=\"yes\" is not a boolean"),
        "{err}"
    );
}

#[test]
fn home_comes_from_flag_then_env_then_manifest() {
    let ctx = Ctx::new();
    let p = platform();
    let in_manifest = ctx.path("from-manifest");
    ctx.manifest(&format!(
        "[chain]\nid = \"t-1\"\ndaemon = \"simd\"\nhome = \"{}\"\n[genesis]\nbinary.\"{p}\" = {{ url = \"https://e.org/g\", sha256 = \"{}\" }}\n",
        in_manifest.display(),
        sha256(GENESIS)
    ));
    let home_of = |cmd: &mut assert_cmd::Command| -> String {
        let (stdout, _) = run(cmd, 0);
        let plan: Value = serde_json::from_str(&stdout).unwrap();
        plan["home"].as_str().unwrap().to_string()
    };
    let plan = || {
        let mut cmd = ctx.cvx();
        cmd.args(["plan", "--json"]);
        cmd
    };
    assert_eq!(home_of(&mut plan()), in_manifest.display().to_string());
    assert_eq!(home_of(plan().env("DAEMON_HOME", "/env/home")), "/env/home");
    assert_eq!(
        home_of(
            plan()
                .env("DAEMON_HOME", "/env/home")
                .args(["--home", "/flag/home"])
        ),
        "/flag/home"
    );
}

#[test]
fn a_platform_the_manifest_does_not_declare_is_an_error() {
    let ctx = Ctx::new();
    manifest(&ctx);
    let (_, err) = run(ctx.plan().args(["--platform", "plan9/mips"]), 1);
    assert!(
        err.contains("platform plan9/mips is not among the manifest's platforms"),
        "{err}"
    );
    assert!(err.contains("hint: pass --platform"), "{err}");
}

#[test]
fn human_plan_snapshot() {
    let ctx = Ctx::new();
    manifest(&ctx);
    ctx.stage("genesis/bin/simd", GENESIS);
    ctx.stage("upgrades/v2/bin/simd", b"tampered");
    ctx.stage("upgrades/v1-rc/bin/simd", b"left over");
    symlink("genesis", ctx.cosmovisor("current")).unwrap();
    let (stdout, _) = run(ctx.plan().arg("--detailed-exitcode"), 2);
    insta::assert_snapshot!(ctx.redact(&stdout).replace(&platform(), "[PLATFORM]"));
}

#[test]
fn empty_tree_human_plan_snapshot() {
    let ctx = Ctx::new();
    manifest(&ctx);
    let (stdout, _) = run(&mut ctx.plan(), 0);
    insta::assert_snapshot!(ctx.redact(&stdout).replace(&platform(), "[PLATFORM]"));
}

#[test]
fn a_scheduled_upgrade_is_shown_with_its_trigger() {
    let ctx = Ctx::new();
    let p = platform();
    ctx.manifest(&format!(
        "[chain]\nid = \"t-1\"\ndaemon = \"simd\"\n[genesis]\nbinary.\"{p}\" = {{ url = \"https://example.org/g\", sha256 = \"{0}\" }}\n[[upgrade]]\nname = \"v2\"\nheight = 100\nbinary.\"{p}\" = {{ url = \"https://example.org/v2\", sha256 = \"{0}\" }}\n[[upgrade]]\nname = \"v2.0.1-patch\"\nheight = 150\ntrigger = \"halt-height\"\nbinary.\"{p}\" = {{ url = \"https://example.org/v201\", sha256 = \"{0}\" }}\n",
        "a".repeat(64)
    ));
    let (stdout, _) = run(&mut ctx.plan(), 0);
    assert!(
        stdout
            .contains("upgrade v2.0.1-patch (height 150, scheduled: cvx run halts the node at 150"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("upgrade v2 (height 100, scheduled"),
        "{stdout}"
    );
    let (json, _) = run(ctx.plan().arg("--json"), 0);
    let plan: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(plan["upgrades"][1]["trigger"], "governance");
    assert_eq!(plan["upgrades"][2]["trigger"], "halt-height");
    assert!(
        plan["upgrades"][0].get("trigger").is_none(),
        "genesis has none"
    );
}
