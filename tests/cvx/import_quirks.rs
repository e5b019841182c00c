//! `cvx import chain-registry` on the shapes real registry files take beyond osmosis (Secret
//! Network's `.deb` packages, the older `codebase.versions` layout, versions without a height,
//! duplicated entries, a byte-order mark, broken JSON): each built here from that shape, never
//! committed as a copy of the registry.

use std::fs;

use serde_json::{Value, json};

use crate::ctx::{Ctx, run};

const OSMOSIS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/data/chain-registry/osmosis"
);
const HEX_A: &str = "8efbeca8f3e6a27c7b8ab02141bbfc457a6efbb089e338147942aa6fcb586545";
const HEX_B: &str = "b469237ba50239988601ec5f0b88197a507b68ca1e1cf97a7e993bd731d7a5fc";

fn write(ctx: &Ctx, name: &str, value: &Value) -> String {
    let path = ctx.path(name);
    fs::write(&path, serde_json::to_vec_pretty(value).unwrap()).unwrap();
    path.display().to_string()
}

/// `cvx import chain-registry FILES... EXTRA...`, expecting `code`: (stdout, stderr).
fn import(ctx: &Ctx, files: &[&str], extra: &[&str], code: i32) -> (String, String) {
    let mut cmd = ctx.cvx();
    cmd.args(["import", "chain-registry"])
        .args(files)
        .args(extra);
    run(&mut cmd, code)
}

fn parse(text: &str) -> cvx::manifest::Manifest {
    cvx::manifest::parse(text)
        .unwrap_or_else(|p| panic!("{p:#?}\n{text}"))
        .0
}

/// A chain.json as the registry writes one (the fields cvx reads and some it does not).
fn chain_json(name: &str, id: &str, daemon: &str, codebase: Value) -> Value {
    json!({
        "$schema": "../chain.schema.json",
        "chain_name": name,
        "status": "live",
        "network_type": "mainnet",
        "pretty_name": name,
        "chain_id": id,
        "bech32_prefix": "x",
        "daemon_name": daemon,
        "node_home": format!("$HOME/.{daemon}"),
        "codebase": codebase,
    })
}

/// A versions.json entry as the registry writes one.
fn version(name: &str, tag: &str, height: Value, binaries: Value) -> Value {
    json!({
        "name": name,
        "tag": tag,
        "height": height,
        "recommended_version": tag,
        "compatible_versions": [tag],
        "consensus": { "type": "cometbft", "version": "v0.37.4" },
        "binaries": binaries,
    })
}

fn versions_json(name: &str, versions: Vec<Value>) -> Value {
    json!({ "$schema": "../versions.schema.json", "chain_name": name, "versions": versions })
}

#[test]
fn debian_packages_are_not_imported_as_the_daemon() {
    // Secret Network publishes its daemon as .deb packages only.
    let ctx = Ctx::new();
    let deb = |v: &str| {
        format!(
            "https://github.com/scrtlabs/SecretNetwork/releases/download/v{v}/secretnetwork_{v}_mainnet_goleveldb_amd64.deb"
        )
    };
    let chain = write(
        &ctx,
        "chain.json",
        &chain_json(
            "secretnetwork",
            "secret-4",
            "secretd",
            json!({ "git_repo": "https://github.com/scrtlabs/SecretNetwork", "recommended_version": "v1.13.1",
                    "binaries": { "linux/amd64": deb("1.13.1") } }),
        ),
    );
    let versions = write(
        &ctx,
        "versions.json",
        &versions_json(
            "secretnetwork",
            vec![
                version(
                    "v1.12",
                    "v1.12.1",
                    json!(13403870),
                    json!({ "linux/amd64": deb("1.12.1") }),
                ),
                version(
                    "v1.13",
                    "v1.13.1",
                    json!(14475000),
                    json!({ "linux/amd64": deb("1.13.1") }),
                ),
            ],
        ),
    );
    let (stdout, stderr) = import(&ctx, &[&chain, &versions], &[], 1);
    assert_eq!(stdout, "", "nothing written");
    assert!(
        stderr.contains("error: registry version \"v1.12\" lists no binary cvx can stage: linux/amd64 is a Debian package (.deb), not a binary or an archive cvx can unpack"),
        "{stderr}"
    );
    // No --from or --platform can help: the hint says what can.
    assert!(
        stderr.contains("hint: the registry lists only a Debian package for this chain: write binary.\"linux/amd64\" = { url = \"<the release's binary or .tar.gz>\", sha256 = \"\" } for each version by hand"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("--from") && !stderr.contains("--platform"),
        "{stderr}"
    );
    // chain.json alone: its codebase lists the same.
    let (_, stderr) = import(&ctx, &[&chain], &[], 1);
    assert!(
        stderr
            .contains("hint: the registry gives no binary cvx can stage in chain.json's codebase"),
        "{stderr}"
    );

    // A version with a .deb for one platform and a binary for another imports the binary.
    let versions = write(
        &ctx,
        "mixed.json",
        &versions_json(
            "secretnetwork",
            vec![
                version(
                    "v1.12",
                    "v1.12.1",
                    json!(13403870),
                    json!({ "linux/amd64": deb("1.12.1"), "linux/arm64": format!("https://e.org/secretd-arm64?checksum=sha256:{HEX_A}") }),
                ),
                version(
                    "v1.13",
                    "v1.13.1",
                    json!(14475000),
                    json!({ "linux/amd64": deb("1.13.1"), "linux/arm64": format!("https://e.org/secretd-1.13-arm64.tar.gz?checksum=sha256:{HEX_B}") }),
                ),
            ],
        ),
    );
    let (stdout, stderr) = import(&ctx, &[&chain, &versions], &[], 0);
    let m = parse(&stdout);
    assert_eq!(m.chain.platforms, ["linux/arm64"]);
    assert_eq!(
        m.upgrades[0].binary["linux/arm64"].url,
        "https://e.org/secretd-1.13-arm64.tar.gz"
    );
    assert!(!stdout.contains(".deb"), "{stdout}");
    assert!(
        stderr.contains(&format!(
            "note: versions.json \"v1.12\": binary for linux/amd64 skipped: {} is a Debian package (.deb), not a binary or an archive cvx can unpack",
            deb("1.12.1")
        )),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("is a Debian package (.deb)").count(),
        2,
        "{stderr}"
    );

    // The first version a .deb only, the later ones fine: start later.
    let versions = write(
        &ctx,
        "later.json",
        &versions_json(
            "secretnetwork",
            vec![
                version(
                    "v1.11",
                    "v1.11.0",
                    json!(12000000),
                    json!({ "linux/amd64": deb("1.11.0") }),
                ),
                version(
                    "v1.12",
                    "v1.12.1",
                    json!(13403870),
                    json!({ "linux/amd64": format!("https://e.org/secretd-1.12?checksum=sha256:{HEX_A}") }),
                ),
                version(
                    "v1.13",
                    "v1.13.1",
                    json!(14475000),
                    json!({ "linux/amd64": format!("https://e.org/secretd-1.13?checksum=sha256:{HEX_B}") }),
                ),
            ],
        ),
    );
    let (_, stderr) = import(&ctx, &[&chain, &versions], &["--all"], 1);
    assert!(
        stderr.contains("hint: start at a later version with --from v1.12: it and every version after it list a binary"),
        "{stderr}"
    );
}

#[test]
fn duplicate_version_names_name_the_file_and_both_entries() {
    let ctx = Ctx::new();
    let chain = write(
        &ctx,
        "chain.json",
        &chain_json("sim", "sim-1", "simd", json!({})),
    );
    let bin = |v: &str| json!({ "linux/amd64": format!("https://e.org/{v}/simd?checksum=sha256:{HEX_A}") });
    // The same plan appended twice, as a registry pull request may do: genesis and upgrade by
    // default, both named v5.
    let versions = write(
        &ctx,
        "versions.json",
        &versions_json(
            "sim",
            vec![
                version("v4", "v4.0.0", json!(400), bin("v4")),
                version("v5", "v5.0.0", json!(500), bin("v5")),
                version("v5", "v5.0.1", json!(500), bin("v5.0.1")),
            ],
        ),
    );
    let (_, stderr) = import(&ctx, &[&chain, &versions], &[], 1);
    assert!(
        stderr.contains(&format!(
            "error: {versions} lists version \"v5\" twice: entry #2 (tag v5.0.0, recommended_version v5.0.0, height 500) and entry #3 (tag v5.0.1, recommended_version v5.0.1, height 500)"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("lower-case"), "{stderr}");
    // --from v5 is ambiguous too; --from v4 imports both.
    import(&ctx, &[&chain, &versions], &["--from", "v5"], 1);
    import(&ctx, &[&chain, &versions], &["--from", "v4"], 1);

    // Names that differ only in case share an upgrade directory: that is what lower-casing says.
    let versions = write(
        &ctx,
        "case.json",
        &versions_json(
            "sim",
            vec![
                version("v4", "v4.0.0", json!(400), bin("v4")),
                version("V5", "v5.0.0", json!(500), bin("v5")),
                version("v5", "v5.0.1", json!(600), bin("v5.0.1")),
            ],
        ),
    );
    let (_, stderr) = import(&ctx, &[&chain, &versions], &["--all"], 1);
    assert!(
        stderr.contains(&format!(
            "error: {versions}: upgrade names \"V5\" and \"v5\" would share a directory (Cosmovisor lower-cases names)"
        )),
        "{stderr}"
    );

    // A duplicate left out of the import is noted, not fatal.
    let versions = write(
        &ctx,
        "old-dup.json",
        &versions_json(
            "sim",
            vec![
                version("v3", "v3.0.0", json!(300), bin("v3")),
                version("v3", "v3.0.0", json!(300), bin("v3")),
                version("v4", "v4.0.0", json!(400), bin("v4")),
                version("v5", "v5.0.0", json!(500), bin("v5")),
            ],
        ),
    );
    let (stdout, stderr) = import(&ctx, &[&chain, &versions], &[], 0);
    assert_eq!(parse(&stdout).upgrades[0].name, "v5");
    assert!(
        stderr.contains("lists version \"v3\" twice: entry #1"),
        "{stderr}"
    );
    assert!(stderr.contains("; neither is imported"), "{stderr}");
}

#[test]
fn the_older_layout_with_versions_in_chain_json_is_read() {
    // Before versions.json, chain.json's codebase held the versions (juno, 2022).
    let ctx = Ctx::new();
    let codebase = json!({
        "git_repo": "https://github.com/CosmosContracts/juno",
        "recommended_version": "v9.0.0",
        "compatible_versions": ["v9.0.0"],
        "cosmos_sdk_version": "0.45",
        "tendermint_version": "0.34",
        "cosmwasm_version": "0.28",
        "cosmwasm_enabled": true,
        "binaries": { "linux/amd64": format!("https://e.org/v9.0.0/junod?checksum=sha256:{HEX_B}") },
        "genesis": { "name": "v1", "genesis_url": "https://e.org/genesis.json" },
        "versions": [
            { "name": "v1", "recommended_version": "v1.0.0", "compatible_versions": ["v1.0.0"], "next_version_name": "v2" },
            { "name": "v8", "height": 4136532, "recommended_version": "v8.0.0", "compatible_versions": ["v8.0.0"],
              "binaries": { "linux/amd64": format!("https://e.org/v8.0.0/junod?checksum=sha256:{HEX_A}") }, "next_version_name": "v9" },
            { "name": "v9", "height": 4845000, "recommended_version": "v9.0.0", "compatible_versions": ["v9.0.0"],
              "binaries": { "linux/amd64": format!("https://e.org/v9.0.0/junod?checksum=sha256:{HEX_B}") } }
        ]
    });
    let chain = write(
        &ctx,
        "chain.json",
        &chain_json("juno", "juno-1", "junod", codebase),
    );
    let (stdout, stderr) = import(&ctx, &[&chain], &[], 0);
    let m = parse(&stdout);
    assert_eq!(m.genesis.version.as_deref(), Some("v8.0.0"));
    assert_eq!(m.upgrades.len(), 1);
    assert_eq!(
        (m.upgrades[0].name.as_str(), m.upgrades[0].height),
        ("v9", Some(4_845_000))
    );
    assert_eq!(m.upgrades[0].binary["linux/amd64"].sha256, HEX_B);
    assert!(
        stderr.contains(&format!("note: {chain}: versions read from codebase.versions (the registry's older layout, before versions.json)")),
        "{stderr}"
    );
    assert!(
        stdout.contains("# Registry version \"v8\" (upgrade height 4136532)"),
        "{stdout}"
    );
    // --from works on them; v1 lists no binaries, and the hint says where to start.
    let (_, stderr) = import(&ctx, &[&chain], &["--all"], 1);
    assert!(
        stderr.contains("registry version \"v1\" lists no binary cvx can stage\n"),
        "{stderr}"
    );
    assert!(
        stderr.contains("hint: start at a later version with --from v8"),
        "{stderr}"
    );

    // Given versions.json as well, it wins, and chain.json's list is said to be ignored.
    let versions = write(
        &ctx,
        "versions.json",
        &versions_json(
            "juno",
            vec![
                version(
                    "v9",
                    "v9.0.0",
                    json!(4845000),
                    json!({ "linux/amd64": format!("https://e.org/v9.0.0/junod?checksum=sha256:{HEX_B}") }),
                ),
                version(
                    "v10",
                    "v10.0.0",
                    json!(5004269),
                    json!({ "linux/amd64": format!("https://e.org/v10.0.0/junod?checksum=sha256:{HEX_A}") }),
                ),
            ],
        ),
    );
    let (stdout, stderr) = import(&ctx, &[&chain, &versions], &[], 0);
    assert_eq!(parse(&stdout).upgrades[0].name, "v10");
    assert!(
        stderr.contains(
            "codebase.versions (the registry's older layout) is ignored: versions.json is given"
        ),
        "{stderr}"
    );
}

#[test]
fn missing_and_invalid_heights_are_noted_per_version() {
    let ctx = Ctx::new();
    let chain = write(
        &ctx,
        "chain.json",
        &chain_json("sim", "sim-1", "simd", json!({})),
    );
    let bin = |v: &str| json!({ "linux/amd64": format!("https://e.org/{v}/simd?checksum=sha256:{HEX_A}") });
    let mut v3 = version("v3", "v3.0.0", Value::Null, bin("v3"));
    v3.as_object_mut().unwrap().remove("height");
    let versions = write(
        &ctx,
        "versions.json",
        &versions_json(
            "sim",
            vec![
                version("v1", "v1.0.0", json!(0), bin("v1")),
                version("v2", "v2.0.0", json!(0), bin("v2")),
                v3,
                version("v4", "v4.0.0", json!(-5), bin("v4")),
                version("v5", "v5.0.0", json!(1200.5), bin("v5")),
                version("v6", "v6.0.0", json!("1300"), bin("v6")),
            ],
        ),
    );
    let (stdout, stderr) = import(&ctx, &[&chain, &versions], &["--all"], 0);
    let m = parse(&stdout);
    let heights: Vec<Option<u64>> = m.upgrades.iter().map(|u| u.height).collect();
    assert_eq!(heights, [None, None, None, None, Some(1300)]);
    for note in [
        "note: upgrade \"v2\": height 0 in the registry is not a block height: left out",
        "note: upgrade \"v3\": no height in the registry: written without one",
        "note: upgrade \"v4\": height -5 in the registry is not a block height: left out",
        "note: upgrade \"v5\": height 1200.5 in the registry is not a block height: left out",
    ] {
        assert!(stderr.contains(note), "{note}\n{stderr}");
    }
    // Genesis at height 0 is the registry's way of saying "from the start": no note.
    assert!(!stderr.contains("\"v1\""), "{stderr}");
    assert!(!stderr.contains("\"v6\""), "{stderr}");
    // The reviewer sees it on the manifest's lines too.
    assert!(
        stdout.contains("# height = 0  # the registry's; not a block height"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "# height: none in the registry; add the plan's height from its governance proposal"
        ),
        "{stdout}"
    );
}

#[test]
fn a_hint_that_fits_when_no_platform_spans_the_versions() {
    let ctx = Ctx::new();
    let chain = write(
        &ctx,
        "chain.json",
        &chain_json("sim", "sim-1", "simd", json!({})),
    );
    let url = |v: &str, p: &str| {
        format!(
            "https://e.org/{v}/simd-{}?checksum=sha256:{HEX_A}",
            p.replace('/', "-")
        )
    };
    // The early versions only for macOS, the later ones for Linux too (as osmosis v3 to v7 did).
    let versions = write(
        &ctx,
        "versions.json",
        &versions_json(
            "sim",
            vec![
                version(
                    "v1",
                    "v1.0.0",
                    json!(100),
                    json!({ "darwin/amd64": url("v1", "darwin/amd64") }),
                ),
                version(
                    "v2",
                    "v2.0.0",
                    json!(200),
                    json!({ "linux/amd64": url("v2", "linux/amd64"), "linux/arm64": url("v2", "linux/arm64") }),
                ),
                version(
                    "v3",
                    "v3.0.0",
                    json!(300),
                    json!({ "linux/amd64": url("v3", "linux/amd64"), "linux/arm64": url("v3", "linux/arm64") }),
                ),
            ],
        ),
    );
    let (_, stderr) = import(&ctx, &[&chain, &versions], &["--all"], 1);
    assert!(
        stderr.contains("no platform has a binary in every imported version"),
        "{stderr}"
    );
    assert!(
        stderr.contains("hint: start at a later version with --from v2: from it on, every version has a binary for linux/amd64, linux/arm64"),
        "{stderr}"
    );
    let (_, stderr) = import(
        &ctx,
        &[&chain, &versions],
        &["--all", "--platform", "linux/arm64"],
        1,
    );
    assert!(
        stderr.contains("hint: start at a later version with --from v2 (from it on, every version has a binary for linux/arm64), or drop --platform linux/arm64"),
        "{stderr}"
    );
    let (_, stderr) = import(
        &ctx,
        &[&chain, &versions],
        &["--platform", "darwin/amd64"],
        1,
    );
    assert!(
        stderr.contains("hint: import the platforms every version has: --platform linux/amd64 --platform linux/arm64"),
        "{stderr}"
    );
}

#[test]
fn a_byte_order_mark_is_accepted() {
    let ctx = Ctx::new();
    let with_bom = |name: &str| {
        let mut bytes = b"\xEF\xBB\xBF".to_vec();
        bytes.extend(fs::read(format!("{OSMOSIS}/{name}")).unwrap());
        let path = ctx.path(name);
        fs::write(&path, bytes).unwrap();
        path.display().to_string()
    };
    let (stdout, _) = import(
        &ctx,
        &[&with_bom("chain.json"), &with_bom("versions.json")],
        &[],
        0,
    );
    assert_eq!(parse(&stdout).chain.id, "osmosis-1");
}

#[test]
fn json_errors_are_reported_at_file_line_and_column() {
    let ctx = Ctx::new();
    // A trailing comma, as a hand edit leaves: line 5, where the parser meets the `]`.
    let path = ctx.path("versions.json");
    fs::write(
        &path,
        "{\n  \"chain_name\": \"sim\",\n  \"versions\": [\n    { \"name\": \"v1\" },\n  ]\n}\n",
    )
    .unwrap();
    let file = path.display().to_string();
    let (_, stderr) = import(
        &ctx,
        &[&file],
        &["--chain-id", "sim-1", "--daemon", "simd"],
        1,
    );
    assert!(
        stderr.contains(&format!(
            "error: {file}:5:3: not valid JSON: trailing comma"
        )),
        "{stderr}"
    );
    // Valid JSON of the wrong shape: where the field is.
    fs::write(
        &path,
        "{\n  \"chain_name\": \"sim\",\n  \"versions\": [\n    { \"name\": 5 }\n  ]\n}\n",
    )
    .unwrap();
    let (_, stderr) = import(
        &ctx,
        &[&file],
        &["--chain-id", "sim-1", "--daemon", "simd"],
        1,
    );
    assert!(
        stderr.contains(&format!(
            "error: {file}:4:15: not a chain-registry file: invalid type: integer `5`, expected a string"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("hint: pass the chain's chain.json"),
        "{stderr}"
    );
}
