//! `cvx status` against a staged tree and a live simulated node's RPC.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::ctx::{Ctx, platform, run, sha256};

const GENESIS: &[u8] = b"#!/bin/sh\necho v1\n";
const V2: &[u8] = b"#!/bin/sh\necho v2\n";

fn manifest(ctx: &Ctx) {
    let p = platform();
    ctx.manifest(&format!(
        "[chain]\nid = \"t-1\"\ndaemon = \"simd\"\n[genesis]\nversion = \"v1.0.0\"\nbinary.\"{p}\" = {{ url = \"https://e.org/g\", sha256 = \"{}\" }}\n[[upgrade]]\nname = \"v2\"\nheight = 5000\nversion = \"v2.0.0\"\nbinary.\"{p}\" = {{ url = \"https://e.org/v2\", sha256 = \"{}\" }}\n",
        sha256(GENESIS),
        sha256(V2)
    ));
}

struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A simulated node making a block every 20 ms, answering RPC on a free loopback port.
fn start_node(ctx: &Ctx, chain_id: &str) -> Node {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::create_dir_all(ctx.home.join("config")).unwrap();
    std::fs::write(
        ctx.home.join("config/config.toml"),
        format!("[rpc]\nladdr = \"tcp://127.0.0.1:{port}\"\n"),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_simnode"))
        .args([
            "--sim-block-time",
            "20ms",
            "--sim-rpc",
            "--sim-chain-id",
            chain_id,
        ])
        .args(["start", "--home"])
        .arg(&ctx.home)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    Node(child)
}

fn status(ctx: &Ctx) -> Value {
    let (stdout, _) = run(
        ctx.cvx()
            .args(["status", "--json", "--home"])
            .arg(&ctx.home),
        0,
    );
    serde_json::from_str(&stdout).unwrap()
}

#[test]
fn status_without_a_node_says_unknown() {
    let ctx = Ctx::new();
    manifest(&ctx);
    ctx.stage("genesis/bin/simd", GENESIS);
    std::os::unix::fs::symlink("genesis", ctx.cosmovisor("current")).unwrap();
    let s = status(&ctx);
    assert_eq!(s["current"]["upgrade"], "genesis");
    assert_eq!(s["current"]["version"], "v1.0.0");
    assert_eq!(s["next"]["name"], "v2");
    assert_eq!(s["next"]["binary_ready"], false);
    assert_eq!(s["node"]["answering"], false);
    assert_eq!(
        s["node"]["reason"],
        "unknown: no [rpc] laddr in config/config.toml"
    );
    let (human, _) = run(ctx.cvx().args(["status", "--home"]).arg(&ctx.home), 0);
    assert!(
        human.contains("next:     upgrade v2 at height 5000 (v2.0.0): not ready: not staged"),
        "{human}"
    );
}

#[test]
fn status_reads_height_and_block_time_from_the_node() {
    let ctx = Ctx::new();
    manifest(&ctx);
    ctx.stage("genesis/bin/simd", GENESIS);
    ctx.stage("upgrades/v2/bin/simd", V2);
    std::os::unix::fs::symlink("genesis", ctx.cosmovisor("current")).unwrap();
    let _node = start_node(&ctx, "t-1");
    // Wait until the node has made enough blocks for a block time over several of them.
    let deadline = Instant::now() + Duration::from_secs(10);
    let s = loop {
        let s = status(&ctx);
        if s["node"]["height"].as_u64().is_some_and(|h| h >= 10) {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the node never reached height 10: {s:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(s["next"]["binary_ready"], true);
    let height = s["node"]["height"].as_u64().unwrap();
    assert_eq!(
        s["node"]["blocks_remaining"].as_u64().unwrap(),
        5000 - height
    );
    let ms = s["node"]["block_time_ms"].as_u64().expect("a block time");
    assert!((15..=60).contains(&ms), "20 ms blocks measured as {ms} ms");
    let eta = s["node"]["eta_seconds"].as_u64().unwrap();
    assert_eq!(eta, (5000 - height) * ms / 1000);
}

#[test]
fn status_does_not_trust_the_rpc_of_another_chain() {
    let ctx = Ctx::new();
    manifest(&ctx);
    ctx.stage("genesis/bin/simd", GENESIS);
    std::os::unix::fs::symlink("genesis", ctx.cosmovisor("current")).unwrap();
    let _node = start_node(&ctx, "other-1");
    let deadline = Instant::now() + Duration::from_secs(10);
    let s = loop {
        let s = status(&ctx);
        if s["node"]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("chain id")
        {
            break s;
        }
        assert!(Instant::now() < deadline, "{s:#}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(s["node"]["answering"], false);
    assert_eq!(s["node"]["height"], serde_json::Value::Null);
    assert!(
        s["node"]["reason"]
            .as_str()
            .unwrap()
            .contains("reports chain id \"other-1\", not the manifest's \"t-1\""),
        "{s:#}"
    );
}
