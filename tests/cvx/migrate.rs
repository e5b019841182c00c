//! README's "Migrating from Cosmovisor", run as written on a tree Cosmovisor left: the commands
//! of its `sh` block, in order, with the unit of its `ini` block standing in for systemd. Paths
//! and URLs are the test's (the home, the manifest, the registry on a loopback server); the
//! simulated node plays osmosisd.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use serde_json::json;

use crate::ctx::{Ctx, platform, run, sha256};
use crate::run::{CVX, Reaper, applied, current, spawn, wrapper, zip};
use crate::support::server::{Fault, Server};

const README: &str = include_str!("../../README.md");
const CHAIN_JSON: &str =
    "https://raw.githubusercontent.com/cosmos/chain-registry/master/osmosis/chain.json";
const VERSIONS_JSON: &str =
    "https://raw.githubusercontent.com/cosmos/chain-registry/master/osmosis/versions.json";

/// The fenced blocks of `lang` in README's section `title`.
fn blocks(title: &str, lang: &str) -> Vec<Vec<String>> {
    let section = README
        .split(&format!("\n## {title}\n"))
        .nth(1)
        .unwrap_or_else(|| panic!("README has no section {title:?}"));
    let section = section.split("\n## ").next().unwrap();
    let mut found = Vec::new();
    let mut lines = section.lines();
    while let Some(line) = lines.next() {
        if line == format!("```{lang}") {
            found.push(
                lines
                    .by_ref()
                    .take_while(|l| *l != "```")
                    .map(str::to_owned)
                    .collect(),
            );
        }
    }
    found
}

#[test]
fn the_readme_migration_runs_as_written_on_a_tree_cosmovisor_left() {
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    let server = Server::start();

    // The chain: a genesis build, and v2 at height 3 as an archive with its library, both in the
    // registry with their checksums.
    let v1 = wrapper("--sim-version v1.0.0 --sim-upgrade v2@3");
    let v2 = wrapper("--sim-version v2.0.0 --sim-handlers v2 --sim-exit-at 5 0");
    let lib = b"\x7fELF libwasmvm for v2".as_slice();
    let archive = zip(&[("bin/simd", &v2), ("lib/libwasmvm.x86_64.so", lib)]);
    server.add("/v1/simd", v1.clone(), Fault::None);
    server.add("/v2/simd-v2.0.0-linux.zip", archive.clone(), Fault::None);
    let p = platform();
    server.add(
        "/chain.json",
        json!({"chain_name": "sim", "chain_id": "sim-1", "daemon_name": "simd"})
            .to_string()
            .into_bytes(),
        Fault::None,
    );
    server.add(
        "/versions.json",
        json!({"chain_name": "sim", "versions": [
            {"name": "v1", "tag": "v1.0.0",
             "binaries": {&p: format!("{}?checksum=sha256:{}", server.url("/v1/simd"), sha256(&v1))}},
            {"name": "v2", "tag": "v2.0.0", "height": 3,
             "binaries": {&p: format!("{}?checksum=sha256:{}", server.url("/v2/simd-v2.0.0-linux.zip"), sha256(&archive))}},
        ]})
        .to_string()
        .into_bytes(),
        Fault::None,
    );

    // The tree Cosmovisor left: genesis installed by hand (`cosmovisor init`), v2 downloaded and
    // unpacked whole by Cosmovisor ahead of the height, `current -> genesis`, no cvx receipts.
    for (rel, bytes, mode) in [
        ("genesis/bin/simd", &v1[..], 0o755),
        ("upgrades/v2/bin/simd", &v2[..], 0o755),
        ("upgrades/v2/lib/libwasmvm.x86_64.so", lib, 0o644),
    ] {
        let path = ctx.stage(rel, bytes);
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
    }
    std::os::unix::fs::symlink("genesis", ctx.cosmovisor("current")).unwrap();
    fs::create_dir_all(ctx.home.join("data")).unwrap();
    let inode = |rel: &str| fs::metadata(ctx.cosmovisor(rel)).unwrap().ino();
    let inodes = [inode("genesis/bin/simd"), inode("upgrades/v2/bin/simd")];

    // README's words for this host, and the test's.
    let manifest = ctx.path("etc/cvx/osmosis.toml");
    let home = ctx.home.display().to_string();
    let substitutions = [
        (CHAIN_JSON.to_string(), server.url("/chain.json")),
        (VERSIONS_JSON.to_string(), server.url("/versions.json")),
        (
            "/etc/cvx/osmosis.toml".into(),
            manifest.display().to_string(),
        ),
        ("/etc/cvx".into(), ctx.path("etc/cvx").display().to_string()),
        ("/var/lib/osmosis".into(), home.clone()),
        ("osmosisd".into(), "simd".into()),
    ];
    let ours = |word: &str| -> String {
        substitutions
            .iter()
            .find(|(theirs, _)| theirs == word)
            .map_or_else(|| word.to_owned(), |(_, ours)| ours.clone())
    };
    let sh = blocks("Migrating from Cosmovisor", "sh");
    let ini = blocks("Migrating from Cosmovisor", "ini");
    assert_eq!((sh.len(), ini.len()), (1, 1), "one sh block and one unit");
    let unit = &ini[0];
    let commands: Vec<String> = sh[0]
        .iter()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .cloned()
        .collect();
    // Each kind of step, in the README's order; a new step needs its check here.
    let steps: Vec<&str> = commands
        .iter()
        .map(|c| {
            let words: Vec<&str> = c.split_whitespace().filter(|w| *w != "sudo").collect();
            match words.as_slice() {
                ["systemctl", "disable", "--now", "cosmovisor"] => "stop cosmovisor",
                ["mkdir", "-p", ..] => "mkdir",
                ["cvx", command, ..] => command,
                [
                    "systemctl",
                    "daemon-reload",
                    "&&",
                    "systemctl",
                    "enable",
                    "--now",
                    _,
                ] => "start the unit",
                _ => panic!("README step {c:?} has no counterpart in this test"),
            }
        })
        .collect();
    assert_eq!(
        steps,
        [
            "stop cosmovisor",
            "mkdir",
            "import",
            "pin",
            "plan",
            "apply",
            "start the unit",
            "status"
        ]
    );

    for (command, step) in commands.iter().zip(steps) {
        let words: Vec<String> = command
            .split_whitespace()
            .filter(|w| *w != "sudo")
            .map(ours)
            .collect();
        let (stdout, stderr) = match step {
            // No Cosmovisor runs here (a unit of systemd, which the test has not).
            "stop cosmovisor" => continue,
            "mkdir" => {
                fs::create_dir_all(&words[2]).unwrap();
                continue;
            }
            // The unit as README shows it: its ExecStart, with its environment.
            "start the unit" => {
                let exec: Vec<String> = unit
                    .iter()
                    .find_map(|l| l.strip_prefix("ExecStart="))
                    .expect("the unit's ExecStart")
                    .split_whitespace()
                    .map(ours)
                    .collect();
                assert_eq!(exec[0], "/usr/local/bin/cvx");
                let mut cmd = Command::new(CVX);
                cmd.current_dir(ctx.dir.path()).args(&exec[1..]);
                for (key, _) in std::env::vars() {
                    if ["DAEMON_", "CVX_", "COSMOVISOR_"]
                        .iter()
                        .any(|p| key.starts_with(p))
                    {
                        cmd.env_remove(key);
                    }
                }
                for line in unit.iter().filter_map(|l| l.strip_prefix("Environment=")) {
                    let (key, value) = line.split_once('=').unwrap();
                    cmd.env(key, ours(value));
                }
                spawn(&ctx, cmd).finish(0)
            }
            _ => run(ctx.cvx().args(&words[1..]), 0),
        };
        match step {
            "import" => {
                let text = fs::read_to_string(&manifest).unwrap();
                assert!(
                    text.contains(&sha256(&v1)) && text.contains(&sha256(&archive)),
                    "{text}"
                );
            }
            "pin" => assert!(stderr.contains("nothing to pin"), "{stderr}"),
            "plan" => {
                for line in [
                    "genesis (v1.0.0, current): adopt",
                    "upgrade v2 (height 3, v2.0.0, upgrades/v2): adopt",
                    "Plan: 0 to fetch, 0 to replace, 2 to adopt, 0 ok: changes pending.",
                ] {
                    assert!(stdout.contains(line), "{line:?} not in\n{stdout}");
                }
            }
            "apply" => {
                for line in [
                    "= adopted  genesis/bin/simd",
                    "= adopted  upgrades/v2/bin/simd",
                    "Apply: 2 changed, 0 unchanged, 0 failed: changed.",
                ] {
                    assert!(stdout.contains(line), "{line:?} not in\n{stdout}");
                }
                assert!(!stdout.contains("~ replaced"), "{stdout}");
                assert!(!ctx.cosmovisor(".cvx/replaced").exists());
                assert_eq!(
                    [inode("genesis/bin/simd"), inode("upgrades/v2/bin/simd")],
                    inodes,
                    "adopted in place"
                );
                assert_eq!(server.hits("/v1/simd"), 0, "its sha256 was proof enough");
                assert_eq!(server.hits("/v2/simd-v2.0.0-linux.zip"), 1);
            }
            "start the unit" => {
                assert_eq!(current(&ctx), "upgrades/v2", "{stderr}");
                assert_eq!(applied(&ctx), ["v2"]);
                assert!(!stderr.contains("no cvx receipt"), "{stderr}");
            }
            "status" => {
                assert!(
                    stdout.contains("current:  upgrade v2 (v2.0.0) in upgrades/v2"),
                    "{stdout}"
                );
            }
            _ => unreachable!(),
        }
    }
    assert!(Path::new(&home).join("cosmovisor/upgrades/v2/lib").is_dir());
}
