//! `cvx import chain-registry` and `cvx pin`: the shared osmosis registry files, crafted registry
//! files served by a loopback server, and pins filled, kept and re-verified.

use std::fs;

use serde_json::json;

use crate::ctx::{Ctx, run, sha256};
use crate::support::server::{Fault, Server};

const OSMOSIS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/data/chain-registry/osmosis"
);
const TODO: &str = "# TODO: no checksum in the registry; run cvx pin";

fn osmosis(file: &str) -> String {
    format!("{OSMOSIS}/{file}")
}

/// The manifest text validated, with every empty sha256 standing in as a real one.
fn validates_once_pinned(text: &str) -> cvx::manifest::Manifest {
    let stand_in = text.replace("sha256 = \"\"", &format!("sha256 = \"{}\"", "0".repeat(64)));
    cvx::manifest::parse(&stand_in)
        .unwrap_or_else(|p| panic!("{p:#?}\n{text}"))
        .0
}

#[test]
fn osmosis_by_default_the_second_to_last_version_is_genesis_and_the_last_the_upgrade() {
    let ctx = Ctx::new();
    let (stdout, stderr) = run(
        ctx.cvx().args([
            "import",
            "chain-registry",
            &osmosis("chain.json"),
            &osmosis("versions.json"),
        ]),
        0,
    );
    let (m, _) = cvx::manifest::parse(&stdout).unwrap_or_else(|p| panic!("{p:#?}\n{stdout}"));
    assert_eq!(
        (m.chain.id.as_str(), m.chain.daemon.as_str()),
        ("osmosis-1", "osmosisd")
    );
    assert_eq!(m.chain.platforms, ["linux/amd64", "linux/arm64"]);
    // node_home is "$HOME/.osmosisd": a suggestion in a comment, not chain.home.
    assert_eq!(m.chain.home, None);
    assert!(stdout.contains("# home = \"$HOME/.osmosisd\""), "{stdout}");
    assert_eq!(m.genesis.version.as_deref(), Some("v30.0.0"));
    assert_eq!(
        m.genesis.binary["linux/amd64"].sha256,
        "b469237ba50239988601ec5f0b88197a507b68ca1e1cf97a7e993bd731d7a5fc"
    );
    let [v31] = m.upgrades.as_slice() else {
        panic!("{:#?}", m.upgrades)
    };
    assert_eq!(
        (v31.name.as_str(), v31.height, v31.version.as_deref()),
        ("v31", Some(47_626_000), Some("v31.0.0"))
    );
    assert_eq!(
        v31.binary["linux/arm64"].url,
        "https://github.com/osmosis-labs/osmosis/releases/download/v31.0.0/osmosisd-31.0.0-linux-arm64"
    );
    assert!(!stdout.contains("checksum="), "{stdout}");
    assert!(stderr.contains("every artifact is pinned"), "{stderr}");
    // The file names its source and the command that regenerates it.
    assert!(stdout.starts_with("# Osmosis (osmosis-1), imported from the chain registry by:\n"));
}

#[test]
fn osmosis_all_keeps_the_registry_quirks() {
    let ctx = Ctx::new();
    let (stdout, stderr) = run(
        ctx.cvx().args([
            "import",
            "chain-registry",
            &osmosis("versions.json"),
            &osmosis("chain.json"),
            "--all",
            "-o",
            "all.toml",
        ]),
        0,
    );
    assert_eq!(stdout, "", "the manifest went to the file");
    let text = fs::read_to_string(ctx.path("all.toml")).unwrap();
    let m = validates_once_pinned(&text);

    // v3 (height 0) is genesis: its version comes from the tag; every other version an upgrade.
    assert_eq!(m.genesis.version.as_deref(), Some("v3.1.0"));
    assert_eq!(m.upgrades.len(), 26);
    let upgrade = |name: &str| m.upgrades.iter().find(|u| u.name == name).unwrap();
    let patch = upgrade("v28.0.1+");
    assert_eq!(
        (patch.height, patch.version.as_deref()),
        (Some(29_743_104), Some("v28.0.4"))
    );
    // A name that is not its version: v5 shipped v6.4.0 (the tag; no recommended_version).
    assert_eq!(upgrade("v5").version.as_deref(), Some("v6.4.0"));
    assert_eq!(upgrade("v4").height, Some(1_314_500));

    // Checksums: `sha256:`-prefixed (v4), bare (v28), stripped from the URL either way.
    let amd = |name: &str| upgrade(name).binary["linux/amd64"].clone();
    assert_eq!(
        amd("v4").sha256,
        "a11c61a737983d176f23ce83fa5ff985000ce8d5107d738ee6fa7d59b8dd3053"
    );
    assert_eq!(
        amd("v4").url,
        "https://github.com/osmosis-labs/osmosis/releases/download/v4.2.0/osmosisd-4.2.0-linux-amd64"
    );
    assert_eq!(
        amd("v28").sha256,
        "8efbeca8f3e6a27c7b8ab02141bbfc457a6efbb089e338147942aa6fcb586545"
    );
    assert!(!text.contains("checksum="));

    // v7 has only a linux/amd64 binary: the other platforms cannot be pinned throughout.
    assert_eq!(m.chain.platforms, ["linux/amd64"]);
    assert!(
        stderr.contains(
            "platforms dropped (not every imported version has a binary for them): darwin/amd64, darwin/arm64, linux/arm64"
        ),
        "{stderr}"
    );

    // v22 to v27 and v28.0.1+ carry no checksum: written empty, flagged on the line and stderr.
    let unpinned = ["v22", "v23", "v24", "v25", "v26", "v27", "v28.0.1+"];
    for name in unpinned {
        assert_eq!(amd(name).sha256, "0".repeat(64), "{name}");
        assert!(
            stderr.contains(&format!("upgrade \"{name}\" linux/amd64: https://")),
            "{stderr}"
        );
    }
    assert_eq!(text.matches(TODO).count(), unpinned.len());
    for line in text.lines().filter(|l| l.contains(TODO)) {
        assert!(line.contains("sha256 = \"\" } # TODO"), "{line}");
    }
    assert!(stderr.contains("7 artifacts have no checksum"), "{stderr}");
    assert!(
        stderr.contains("all.toml is NOT valid until those are pinned: run `cvx pin -m all.toml`"),
        "{stderr}"
    );
    // As written it does not validate: pin first.
    run(
        ctx.cvx()
            .args(["plan", "-m", "all.toml", "--platform", "linux/amd64"]),
        1,
    );
}

#[test]
fn from_chooses_the_genesis_version() {
    let ctx = Ctx::new();
    let import = |extra: &[&str]| {
        let mut cmd = ctx.cvx();
        cmd.args([
            "import",
            "chain-registry",
            &osmosis("chain.json"),
            &osmosis("versions.json"),
        ])
        .args(extra);
        cmd
    };
    let (stdout, _) = run(&mut import(&["--from", "v28"]), 0);
    let m = validates_once_pinned(&stdout);
    assert_eq!(m.genesis.version.as_deref(), Some("v28.0.0"));
    let names: Vec<&str> = m.upgrades.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(names, ["v28.0.1+", "v29", "v30", "v31"]);
    assert!(stdout.contains("# Registry version \"v28\" (upgrade height 25861100)"));

    let (_, stderr) = run(&mut import(&["--from", "v99"]), 1);
    assert!(
        stderr.contains("no registry version is named \"v99\""),
        "{stderr}"
    );
    assert!(stderr.contains("hint: versions in the registry: v3, v4, v5"));

    let (_, stderr) = run(
        &mut import(&["--from", "v15", "--platform", "darwin/arm64"]),
        1,
    );
    assert!(
        stderr.contains("registry version \"v15\" has no binary for darwin/arm64"),
        "{stderr}"
    );
    let (stdout, _) = run(&mut import(&["--platform", "linux/arm64"]), 0);
    assert_eq!(
        validates_once_pinned(&stdout).chain.platforms,
        ["linux/arm64"]
    );
}

#[test]
fn chain_json_alone_gives_the_recommended_version_and_versions_json_alone_needs_the_chain() {
    let ctx = Ctx::new();
    let (stdout, _) = run(
        ctx.cvx()
            .args(["import", "chain-registry", &osmosis("chain.json")]),
        0,
    );
    let (m, _) = cvx::manifest::parse(&stdout).unwrap();
    assert_eq!(m.genesis.version.as_deref(), Some("v31.0.0"));
    assert!(m.upgrades.is_empty());

    let (_, stderr) = run(
        ctx.cvx()
            .args(["import", "chain-registry", &osmosis("versions.json")]),
        1,
    );
    assert!(stderr.contains("no chain-id"), "{stderr}");
    assert!(stderr.contains("hint: pass the chain's chain.json too, or --chain-id ID"));
    let (stdout, _) = run(
        ctx.cvx().args([
            "import",
            "chain-registry",
            &osmosis("versions.json"),
            "--chain-id",
            "osmosis-1",
            "--daemon",
            "osmosisd",
        ]),
        0,
    );
    assert_eq!(
        cvx::manifest::parse(&stdout).unwrap().0.chain.id,
        "osmosis-1"
    );

    let (_, stderr) = run(
        ctx.cvx().args([
            "import",
            "chain-registry",
            &osmosis("chain.json"),
            &osmosis("chain.json"),
        ]),
        1,
    );
    assert!(stderr.contains("are both a chain.json"), "{stderr}");
}

#[test]
fn an_existing_output_is_kept_unless_forced() {
    let ctx = Ctx::new();
    fs::write(ctx.path("cvx.toml"), "mine").unwrap();
    let import = |force: bool| {
        let mut cmd = ctx.cvx();
        cmd.args([
            "import",
            "chain-registry",
            &osmosis("chain.json"),
            &osmosis("versions.json"),
            "-o",
            "cvx.toml",
        ]);
        if force {
            cmd.arg("--force");
        }
        cmd
    };
    let (_, stderr) = run(&mut import(false), 1);
    assert!(stderr.contains("cvx.toml exists"), "{stderr}");
    assert!(stderr.contains("hint: pass --force"));
    assert_eq!(fs::read_to_string(ctx.path("cvx.toml")).unwrap(), "mine");
    run(&mut import(true), 0);
    cvx::manifest::load(&ctx.path("cvx.toml")).unwrap();
}

#[test]
fn the_example_is_the_importers_output() {
    // Run from the repository, with the paths the example's header names.
    let ctx = Ctx::new();
    let mut cmd = ctx.cvx();
    cmd.current_dir(env!("CARGO_MANIFEST_DIR")).args([
        "import",
        "chain-registry",
        "../shared/data/chain-registry/osmosis/chain.json",
        "../shared/data/chain-registry/osmosis/versions.json",
    ]);
    let (stdout, _) = run(&mut cmd, 0);
    let committed = fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/osmosis-registry.toml"
    ))
    .unwrap();
    assert!(
        stdout == committed,
        "examples/osmosis-registry.toml is stale: regenerate it with `cargo run -- import \
         chain-registry ../shared/data/chain-registry/osmosis/chain.json \
         ../shared/data/chain-registry/osmosis/versions.json -o examples/osmosis-registry.toml --force`"
    );
}

const GENESIS: &[u8] = b"simd v1 build";
const UPGRADE: &[u8] = b"simd v2 build";

/// Registry files for a small chain whose binaries the loopback server serves: the genesis one
/// with a checksum, the upgrade's without.
fn registry(server: &Server) -> (serde_json::Value, serde_json::Value) {
    server.add("/v1/simd", GENESIS.to_vec(), Fault::None);
    server.add("/v2/simd", UPGRADE.to_vec(), Fault::None);
    let chain = json!({
        "$schema": "../chain.schema.json",
        "chain_name": "sim",
        "chain_id": "sim-1",
        "daemon_name": "simd",
        "node_home": "$HOME/.simd",
    });
    let versions = json!({
        "$schema": "../versions.schema.json",
        "chain_name": "sim",
        "versions": [
            { "name": "v1", "tag": "v1.0.0", "height": 0,
              "binaries": { "linux/amd64": format!("{}?checksum=sha256:{}", server.url("/v1/simd"), sha256(GENESIS)) } },
            { "name": "v2", "recommended_version": "2.0.0",
              "binaries": { "linux/amd64": server.url("/v2/simd") } },
        ],
    });
    (chain, versions)
}

fn write_json(ctx: &Ctx, name: &str, value: &serde_json::Value) -> String {
    let path = ctx.path(name);
    fs::write(&path, serde_json::to_vec_pretty(value).unwrap()).unwrap();
    path.display().to_string()
}

#[test]
fn an_unpinned_artifact_is_flagged_then_pinned_in_place() {
    let server = Server::start();
    let (chain, versions) = registry(&server);
    let ctx = Ctx::new();
    let (chain, versions) = (
        write_json(&ctx, "chain.json", &chain),
        write_json(&ctx, "versions.json", &versions),
    );
    let (_, stderr) = run(
        ctx.cvx().args([
            "import",
            "chain-registry",
            &chain,
            &versions,
            "-o",
            "cvx.toml",
        ]),
        0,
    );
    assert!(
        stderr.contains(&format!(
            "upgrade \"v2\" linux/amd64: {}",
            server.url("/v2/simd")
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("cvx.toml is NOT valid until those are pinned: run `cvx pin -m cvx.toml`")
    );
    let imported = fs::read_to_string(ctx.path("cvx.toml")).unwrap();
    let m = validates_once_pinned(&imported);
    assert_eq!(
        (m.upgrades[0].height, m.upgrades[0].version.as_deref()),
        (None, Some("v2.0.0")),
        "no height in the registry: no height key"
    );
    assert_eq!(imported.matches(TODO).count(), 1);

    // The operator reviews the file and adds their own notes, then pins.
    let reviewed = imported
        .replace(
            "[[upgrade]]",
            "# Reviewed by ops: v2 is proposal 42.\n[[upgrade]]",
        )
        .replace("name = \"v2\"", "name = \"v2\" # plan name as voted");
    fs::write(ctx.path("cvx.toml"), &reviewed).unwrap();
    let (stdout, stderr) = run(ctx.cvx().args(["pin", "-m", "cvx.toml"]), 0);
    assert_eq!(stdout, "");
    assert!(stderr.contains("trust on first use"), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "pinned {} {}",
            sha256(UPGRADE),
            server.url("/v2/simd")
        )),
        "{stderr}"
    );
    let pinned = fs::read_to_string(ctx.path("cvx.toml")).unwrap();
    // Exactly the pin changed, and its TODO went with it; every other byte is as it was.
    let expected = reviewed.replace(
        &format!("sha256 = \"\" }} {TODO}"),
        &format!("sha256 = \"{}\" }}", sha256(UPGRADE)),
    );
    assert_eq!(pinned, expected);
    let (m, _) = cvx::manifest::parse(&pinned).unwrap();
    assert_eq!(m.upgrades[0].binary["linux/amd64"].sha256, sha256(UPGRADE));
    run(
        ctx.cvx()
            .args(["plan", "-m", "cvx.toml", "--platform", "linux/amd64"]),
        0,
    );
    // The genesis binary was pinned by the registry: it was not downloaded.
    assert_eq!(server.hits("/v1/simd"), 0);

    // Nothing left to pin: nothing downloaded, nothing written.
    let (_, stderr) = run(ctx.cvx().args(["pin", "-m", "cvx.toml"]), 0);
    assert!(stderr.contains("nothing to pin"), "{stderr}");
    assert_eq!(server.hits("/v2/simd"), 1);
    assert_eq!(fs::read_to_string(ctx.path("cvx.toml")).unwrap(), pinned);
}

#[test]
fn a_failed_download_writes_nothing() {
    let server = Server::start();
    server.add("/ok", GENESIS.to_vec(), Fault::None);
    server.add("/gone", Vec::new(), Fault::Status(404));
    // A port nothing listens on.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let ctx = Ctx::new();
    for (bad, why) in [
        (server.url("/gone"), "answered 404"),
        (format!("http://{closed}/simd"), "request to"),
    ] {
        let text = format!(
            r#"[chain]
id = "sim-1"
daemon = "simd"

[genesis]
binary."linux/amd64" = {{ url = "{ok}", sha256 = "" }} {TODO}

[[upgrade]]
name = "v2"
binary."linux/amd64" = {{ url = "{bad}", sha256 = "" }}
"#,
            ok = server.url("/ok"),
        );
        let path = ctx.manifest(&text);
        let (_, stderr) = run(ctx.cvx().args(["pin", "--retries", "0"]), 1);
        assert!(
            stderr.contains(&format!("cannot download {bad}")),
            "{stderr}"
        );
        assert!(stderr.contains(why), "{stderr}");
        assert!(
            stderr.contains("used by upgrade v2 linux/amd64 binary"),
            "{stderr}"
        );
        assert!(
            stderr.contains("1 of 2 downloads failed; cvx.toml was not changed"),
            "{stderr}"
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), text);
    }
}

/// A manifest pointing at a device that never ends (`file:///dev/zero`) fails at the size cap
/// instead of hashing forever.
#[test]
fn pin_stops_a_never_ending_local_file_at_the_size_cap() {
    let ctx = Ctx::new();
    let text = r#"[chain]
id = "sim-1"
daemon = "simd"

[genesis]
binary."linux/amd64" = { url = "file:///dev/zero", sha256 = "" }
"#;
    let path = ctx.manifest(text);
    // Killed after 30 s: without the cap it would hash zeros until then.
    let (_, stderr) = run(
        ctx.cvx()
            .args(["pin", "--max-size", "1"])
            .timeout(std::time::Duration::from_secs(30)),
        1,
    );
    assert!(
        stderr.contains("file:///dev/zero is larger than the limit of 1048576 bytes"),
        "{stderr}"
    );
    assert_eq!(fs::read_to_string(&path).unwrap(), text);
}

#[test]
fn pin_verify_detects_a_file_replaced_upstream() {
    let server = Server::start();
    server.add("/v1/simd", GENESIS.to_vec(), Fault::None);
    let ctx = Ctx::new();
    let text = format!(
        r#"[chain]
id = "sim-1"
daemon = "simd"

[genesis]
binary."linux/amd64" = {{ url = "{url}", sha256 = "{sha}" }}
"#,
        url = server.url("/v1/simd"),
        sha = sha256(GENESIS),
    );
    let path = ctx.manifest(&text);
    let (stdout, _) = run(ctx.cvx().args(["pin", "--verify"]), 0);
    assert!(
        stdout.starts_with(&format!("ok        {}", server.url("/v1/simd"))),
        "{stdout}"
    );

    server.add("/v1/simd", b"rebuilt upstream".to_vec(), Fault::None);
    let (stdout, stderr) = run(ctx.cvx().args(["pin", "--verify"]), 1);
    assert!(
        stdout.contains(&format!(
            "MISMATCH  {} (genesis linux/amd64 binary): pinned {}, served {}",
            server.url("/v1/simd"),
            sha256(GENESIS),
            sha256(b"rebuilt upstream")
        )),
        "{stdout}"
    );
    assert!(stderr.contains("1 mismatch"), "{stderr}");
    assert_eq!(
        fs::read_to_string(&path).unwrap(),
        text,
        "verify writes nothing"
    );
}

#[test]
fn registry_files_can_be_downloaded() {
    let server = Server::start();
    let (chain, versions) = registry(&server);
    server.add(
        "/chain.json",
        serde_json::to_vec(&chain).unwrap(),
        Fault::None,
    );
    server.add(
        "/versions.json",
        serde_json::to_vec(&versions).unwrap(),
        Fault::None,
    );
    let ctx = Ctx::new();
    let (from_urls, _) = run(
        ctx.cvx().args([
            "import",
            "chain-registry",
            &server.url("/versions.json"),
            &server.url("/chain.json"),
        ]),
        0,
    );
    let (from_files, _) = run(
        ctx.cvx().args([
            "import",
            "chain-registry",
            &write_json(&ctx, "versions.json", &versions),
            &write_json(&ctx, "chain.json", &chain),
        ]),
        0,
    );
    // The same manifest, but for the command in the header.
    let body = |text: &str| text.lines().skip(2).collect::<Vec<_>>().join("\n");
    assert_eq!(body(&from_urls), body(&from_files));
    assert!(from_urls.contains(&server.url("/versions.json")));

    let (_, stderr) = run(
        ctx.cvx()
            .args(["import", "chain-registry", &server.url("/missing.json")]),
        1,
    );
    assert!(stderr.contains("answered 404"), "{stderr}");

    server.add("/huge.json", vec![b' '; (8 << 20) + 1], Fault::None);
    let (_, stderr) = run(
        ctx.cvx()
            .args(["import", "chain-registry", &server.url("/huge.json")]),
        1,
    );
    assert!(stderr.contains("is larger than 8388608 bytes"), "{stderr}");

    server.add("/other.json", b"{\"hello\": 1}".to_vec(), Fault::None);
    let (_, stderr) = run(
        ctx.cvx()
            .args(["import", "chain-registry", &server.url("/other.json")]),
        1,
    );
    assert!(
        stderr.contains("is neither a chain-registry chain.json nor a versions.json"),
        "{stderr}"
    );
}

#[test]
fn pin_writes_what_a_person_would_and_quiet_means_quiet() {
    let server = Server::start();
    server.add("/v1/simd", GENESIS.to_vec(), Fault::None);
    server.add("/lib.so", UPGRADE.to_vec(), Fault::None);
    let (g, l) = (server.url("/v1/simd"), server.url("/lib.so"));
    let ctx = Ctx::new();
    // Written by hand, sha256 missing in every shape: inline, tight inline, a table, and a TODO
    // comment on the last line of the file.
    let text = format!(
        r#"[chain]
id = "sim-1"
daemon = "simd"

[genesis]
binary."linux/amd64" = {{ url = "{g}" }}
library."linux/amd64" = [ {{url="{l}",name="libx.so"}} ]

[[upgrade]]
name = "v2"
[upgrade.binary."linux/amd64"]
url = "{g}"
path = "simd"

[[upgrade]]
name = "v3"
binary."linux/amd64" = {{ url = "{l}", sha256 = "" }} {TODO}
"#
    );
    let path = ctx.manifest(&text);
    let (stdout, stderr) = run(ctx.cvx().args(["pin", "-q"]), 0);
    assert_eq!(
        (stdout.as_str(), stderr.as_str()),
        ("", ""),
        "-q: nothing but errors"
    );
    let (sg, sl) = (sha256(GENESIS), sha256(UPGRADE));
    assert_eq!(
        fs::read_to_string(&path).unwrap(),
        format!(
            r#"[chain]
id = "sim-1"
daemon = "simd"

[genesis]
binary."linux/amd64" = {{ url = "{g}", sha256 = "{sg}" }}
library."linux/amd64" = [ {{ url = "{l}", sha256 = "{sl}", name = "libx.so" }} ]

[[upgrade]]
name = "v2"
[upgrade.binary."linux/amd64"]
url = "{g}"
sha256 = "{sg}"
path = "simd"

[[upgrade]]
name = "v3"
binary."linux/amd64" = {{ url = "{l}", sha256 = "{sl}" }}
"#
        )
    );
    // A pin written as `sha256:HEX` is the same pin.
    let prefixed = fs::read_to_string(&path).unwrap().replacen(
        &format!("sha256 = \"{sg}\""),
        &format!("sha256 = \"sha256:{sg}\""),
        1,
    );
    fs::write(&path, prefixed).unwrap();
    let (stdout, stderr) = run(ctx.cvx().args(["pin", "--verify", "-q"]), 0);
    assert!(!stdout.contains("MISMATCH"), "{stdout}");
    assert_eq!(stderr, "");
}

/// Every command logs as `cvx run` does: its timestamps (COSMOVISOR_TIMEFORMAT_LOGS, kitchen by
/// default), no colour off a terminal, and nothing but errors with -q.
#[test]
fn logs_have_runs_timestamps_no_colour_off_a_terminal_and_q_silences_warnings() {
    let server = Server::start();
    let (chain, versions) = registry(&server);
    server.add(
        "/chain.json",
        serde_json::to_vec(&chain).unwrap(),
        Fault::None,
    );
    server.add(
        "/versions.json",
        serde_json::to_vec(&versions).unwrap(),
        Fault::None,
    );
    let ctx = Ctx::new();
    let import = |extra: &[&str], env: &[(&str, &str)]| -> String {
        let mut cmd = ctx.cvx();
        cmd.env_remove("NO_COLOR")
            .args(["import", "chain-registry"])
            .arg(server.url("/chain.json"))
            .arg(server.url("/versions.json"))
            .args(extra);
        for (k, v) in env {
            cmd.env(k, v);
        }
        run(&mut cmd, 0).1
    };
    let warning = |stderr: &str| -> String {
        stderr
            .lines()
            .find(|l| l.contains("is plain http"))
            .unwrap_or_else(|| panic!("no plain-http warning in:\n{stderr}"))
            .to_string()
    };

    let stderr = import(&[], &[]);
    assert!(
        !stderr.contains('\x1b'),
        "colour codes off a terminal:\n{stderr}"
    );
    // kitchen: `3:04PM  WARN ...`
    let line = warning(&stderr);
    let (time, rest) = line.split_once(' ').unwrap();
    let clock = time.trim_end_matches(['A', 'P', 'M']);
    assert!(
        (time.ends_with("AM") || time.ends_with("PM"))
            && clock.split(':').all(|p| p.parse::<u32>().is_ok()),
        "{line}"
    );
    assert!(rest.trim_start().starts_with("WARN"), "{line}");

    let line = warning(&import(&[], &[("COSMOVISOR_TIMEFORMAT_LOGS", "rfc3339")]));
    let time = line.split_whitespace().next().unwrap();
    assert!(cvx::time::parse_rfc3339(time).is_some(), "{line}");
    let line = warning(&import(&[], &[("COSMOVISOR_TIMEFORMAT_LOGS", "")]));
    assert!(
        line.starts_with(" WARN") || line.starts_with("WARN"),
        "{line}"
    );

    assert_eq!(import(&["-q"], &[]), "", "-q: only errors");
}
