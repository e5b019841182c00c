//! `cvx plan --verify-remote`: every artifact of every platform downloaded and proven, for CI.

use serde_json::Value;

use crate::ctx::{Ctx, run, sha256};
use crate::support::server::{Fault, Server};

const AMD: &[u8] = b"amd64 build";
const ARM: &[u8] = b"arm64 build";
const LIB: &[u8] = b"library";

/// Two platforms, a library; `arm_body` is what the server actually serves for the arm64 pin.
fn setup(arm_fault: Fault, arm_body: &[u8]) -> (Ctx, Server) {
    let server = Server::start();
    server.add("/amd", AMD.to_vec(), Fault::None);
    server.add("/arm", arm_body.to_vec(), arm_fault);
    server.add("/lib.so", LIB.to_vec(), Fault::None);
    let ctx = Ctx::new();
    ctx.manifest(&format!(
        r#"[chain]
id = "t-1"
daemon = "simd"
platforms = ["linux/amd64", "linux/arm64"]
[genesis]
binary."linux/amd64" = {{ url = "{amd}", sha256 = "{amd_sha}" }}
binary."linux/arm64" = {{ url = "{arm}", sha256 = "{arm_sha}" }}
[[upgrade]]
name = "v2"
binary."linux/amd64" = {{ url = "{amd}", sha256 = "{amd_sha}" }}
binary."linux/arm64" = {{ url = "{arm}", sha256 = "{arm_sha}" }}
library."linux/amd64" = [ {{ url = "{lib}", sha256 = "{lib_sha}" }} ]
library."linux/arm64" = [ {{ url = "{lib}", sha256 = "{lib_sha}" }} ]
"#,
        amd = server.url("/amd"),
        arm = server.url("/arm"),
        lib = server.url("/lib.so"),
        amd_sha = sha256(AMD),
        arm_sha = sha256(ARM),
        lib_sha = sha256(LIB),
    ));
    (ctx, server)
}

fn verify(ctx: &Ctx, code: i32) -> Value {
    let (stdout, _) = run(
        ctx.plan()
            .args(["--verify-remote", "--json", "--platform", "linux/amd64"]),
        code,
    );
    serde_json::from_str(&stdout).unwrap()
}

#[test]
fn every_platform_is_downloaded_once_per_pin_and_nothing_is_written() {
    let (ctx, server) = setup(Fault::None, ARM);
    let plan = verify(&ctx, 0);
    let remote = plan["remote"].as_array().unwrap();
    assert_eq!(remote.len(), 3, "one check per distinct pin: {remote:#?}");
    assert!(
        remote
            .iter()
            .all(|r| r["ok"] == true && r["http_status"] == 200)
    );
    let arm = remote
        .iter()
        .find(|r| r["url"] == server.url("/arm"))
        .unwrap();
    assert_eq!(arm["size"], ARM.len());
    assert_eq!(
        arm["used_by"],
        serde_json::json!([
            "genesis linux/arm64 binary",
            "upgrade v2 linux/arm64 binary"
        ])
    );
    // The arm64 pins are checked from an amd64 host, each URL fetched once.
    assert_eq!(
        (
            server.hits("/amd"),
            server.hits("/arm"),
            server.hits("/lib.so")
        ),
        (1, 1, 1)
    );
    assert!(!ctx.home.exists(), "--verify-remote writes nothing");
}

#[test]
fn a_mismatch_fails_naming_the_url_and_both_hashes() {
    let (ctx, server) = setup(Fault::None, b"something else");
    let plan = verify(&ctx, 1);
    let arm = plan["remote"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["url"] == server.url("/arm"))
        .unwrap()
        .clone();
    assert_eq!(arm["ok"], false);
    assert_eq!(arm["actual_sha256"], sha256(b"something else"));
    let (human, _) = run(
        ctx.plan()
            .args(["--verify-remote", "--platform", "linux/amd64"]),
        1,
    );
    assert!(human.contains("2 ok, 1 failed"), "{human}");
    assert!(
        human.contains(&format!(
            "checksum mismatch: pinned {}, served {}",
            sha256(ARM),
            sha256(b"something else")
        )),
        "{human}"
    );
}

#[test]
fn an_unreachable_url_fails_with_its_status() {
    let (ctx, server) = setup(Fault::Status(404), ARM);
    let plan = verify(&ctx, 1);
    let arm = plan["remote"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["url"] == server.url("/arm"))
        .unwrap()
        .clone();
    assert_eq!(arm["http_status"], 404);
    assert!(arm["error"].as_str().unwrap().contains("404"), "{arm:#}");
    assert_eq!(server.hits("/arm"), 1, "no retry on a 4xx");
}

#[test]
fn transient_failures_are_retried() {
    let (ctx, server) = setup(Fault::FailTimes(503, 1), ARM);
    let plan = verify(&ctx, 0);
    assert!(
        plan["remote"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["ok"] == true)
    );
    assert_eq!(server.hits("/arm"), 2);
}
