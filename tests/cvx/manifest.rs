//! Manifest validation: one test per rule, each through the real binary, each checking the
//! location, the key and the message an operator sees.

use crate::ctx::{Ctx, run};

const SHA_A: &str = "5b0b5ff3d6c5c5a4a13b1d1d6a2e3a8c8f0f9e2e4d4a1f6b7c8d9e0f1a2b3c4d";
const SHA_B: &str = "8f3c2a1b0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b";

/// A valid manifest for two platforms; tests break one thing in it.
fn valid() -> String {
    format!(
        r#"[chain]
id = "testchain-1"
daemon = "simd"
platforms = ["linux/amd64", "linux/arm64"]

[genesis]
version = "v1.0.0"
binary."linux/amd64" = {{ url = "https://example.org/v1/simd-amd64", sha256 = "{SHA_A}" }}
binary."linux/arm64" = {{ url = "https://example.org/v1/simd-arm64", sha256 = "{SHA_B}" }}

[[upgrade]]
name = "v2"
height = 100
version = "v2.0.0"
binary."linux/amd64" = {{ url = "https://example.org/v2/simd-amd64.tar.gz", sha256 = "{SHA_A}", path = "bin/simd" }}
binary."linux/arm64" = {{ url = "https://example.org/v2/simd-arm64.tar.gz", sha256 = "{SHA_B}", path = "bin/simd" }}
library."linux/amd64" = [ {{ url = "https://example.org/libwasmvm.x86_64.so", sha256 = "{SHA_A}" }} ]
library."linux/arm64" = [ {{ url = "https://example.org/libwasmvm.aarch64.so", sha256 = "{SHA_B}" }} ]

[[upgrade]]
name = "v3"
height = 200
version = "v3.0.0"
binary."linux/amd64" = {{ url = "https://example.org/v3/simd-amd64", sha256 = "{SHA_A}" }}
binary."linux/arm64" = {{ url = "https://example.org/v3/simd-arm64", sha256 = "{SHA_B}" }}
"#
    )
}

/// Validate `text`, expecting failure; return stderr.
fn invalid(text: &str) -> String {
    let ctx = Ctx::new();
    ctx.manifest(text);
    let (stdout, stderr) = run(ctx.cvx().args(["plan", "--platform", "linux/amd64"]), 1);
    assert!(stdout.is_empty(), "nothing on stdout on error: {stdout}");
    stderr
}

fn replace(from: &str, to: &str) -> String {
    let text = valid();
    assert!(text.contains(from), "{from:?} not in the base manifest");
    text.replacen(from, to, 1)
}

#[track_caller]
fn assert_has(stderr: &str, needle: &str) {
    assert!(stderr.contains(needle), "expected {needle:?} in:\n{stderr}");
}

#[test]
fn the_base_manifest_is_valid() {
    let ctx = Ctx::new();
    ctx.manifest(&valid());
    run(ctx.cvx().args(["plan", "--platform", "linux/arm64"]), 0);
}

#[test]
fn not_toml() {
    let err = invalid("[chain\nid = 1\n");
    assert_has(&err, "cvx.toml:1:7: not valid TOML");
    assert_has(&err, "1 | [chain");
    assert_has(&err, "1 problem found");
}

#[test]
fn unknown_key_names_valid_ones_and_the_closest() {
    let err = invalid(&replace(
        "path = \"bin/simd\" }",
        "path = \"bin/simd\", sha265 = \"x\" }",
    ));
    let err2 = invalid(&replace(
        "daemon = \"simd\"",
        "daemon = \"simd\"\ncolour = \"blue\"",
    ));
    assert_has(
        &err,
        "upgrade \"v2\".binary.\"linux/amd64\".sha265: unknown key `sha265`",
    );
    assert_has(
        &err,
        "did you mean `sha256`? valid keys here: url, sha256, path",
    );
    assert_has(
        &err2,
        "cvx.toml:4:1: chain.colour: unknown key `colour` in chain",
    );
    assert_has(&err2, "valid keys here: id, daemon, home, platforms");
}

#[test]
fn unknown_top_level_table() {
    let err = invalid(&format!("{}\n[upgrades]\nname = \"v4\"\n", valid()));
    assert_has(&err, "upgrades: unknown key `upgrades` at the top level");
    assert_has(&err, "did you mean `upgrade`?");
}

#[test]
fn missing_required_keys() {
    let err = invalid(&replace("id = \"testchain-1\"\n", ""));
    assert_has(&err, "cvx.toml:1:2: chain.id: missing required key `id`");
    let err = invalid(&replace(
        &format!(
            ", sha256 = \"{SHA_A}\" }}\nbinary.\"linux/arm64\" = {{ url = \"https://example.org/v3"
        ),
        " }\nbinary.\"linux/arm64\" = { url = \"https://example.org/v3",
    ));
    assert_has(
        &err,
        "upgrade \"v3\".binary.\"linux/amd64\".sha256: missing required key `sha256`",
    );
    let err = invalid("[chain]\nid = \"x\"\ndaemon = \"d\"\n");
    assert_has(&err, "genesis: missing required table [genesis]");
    let err = invalid(&replace("name = \"v3\"\n", ""));
    assert_has(&err, "upgrade #2.name: missing required key `name`");
}

#[test]
fn wrong_types() {
    let err = invalid(&replace("height = 100", "height = \"100\""));
    assert_has(
        &err,
        "upgrade \"v2\".height: expected an integer block height, found a string",
    );
    let err = invalid(&replace("id = \"testchain-1\"", "id = 1"));
    assert_has(&err, "chain.id: expected a string, found an integer");
}

#[test]
fn duplicate_names_after_lower_casing() {
    let err = invalid(&replace("name = \"v3\"", "name = \"V2\""));
    assert_has(
        &err,
        "cvx.toml:21:8: upgrade \"V2\".name: upgrade name \"V2\" duplicates \"v2\"",
    );
    assert_has(&err, "lower-cases");
}

#[test]
fn names_that_would_escape_the_tree() {
    for (name, why) in [
        ("", "is empty"),
        (".", "would name the directory itself"),
        ("..", "would name the directory itself or its parent"),
        ("../x", "contains a path separator"),
        ("a\\\\b", "contains a path separator"),
        ("a\\u0000b", "contains a NUL byte"),
    ] {
        let err = invalid(&replace("name = \"v3\"", &format!("name = \"{name}\"")));
        assert_has(&err, "cvx.toml:21:8: ");
        assert_has(&err, why);
    }
    let err = invalid(&replace("daemon = \"simd\"", "daemon = \"bin/simd\""));
    assert_has(
        &err,
        "chain.daemon: daemon name \"bin/simd\" contains a path separator",
    );
}

#[test]
fn heights_must_strictly_increase() {
    let err = invalid(&replace("height = 200", "height = 100"));
    assert_has(
        &err,
        "cvx.toml:22:10: upgrade \"v3\".height: height 100 is not above 100, the height of upgrade \"v2\" before it",
    );
    let err = invalid(&replace("height = 200", "height = 0"));
    assert_has(
        &err,
        "upgrade \"v3\".height: height 0 is not a positive block height",
    );
    let err = invalid(&replace("height = 200", "height = -5"));
    assert_has(&err, "height -5 is not a positive block height");
}

#[test]
fn versions_must_be_semver_and_increase() {
    let err = invalid(&replace("version = \"v3.0.0\"", "version = \"v1.5.0\""));
    assert_has(
        &err,
        "cvx.toml:23:11: upgrade \"v3\".version: version v1.5.0 is not above v2.0.0, the version of upgrade \"v2\" before it",
    );
    let err = invalid(&replace("version = \"v2.0.0\"", "version = \"v0.9.0\""));
    assert_has(
        &err,
        "version v0.9.0 is not above v1.0.0, the version of genesis before it",
    );
    let err = invalid(&replace("version = \"v2.0.0\"", "version = \"two\""));
    assert_has(
        &err,
        "upgrade \"v2\".version: version \"two\" is not semver",
    );
}

#[test]
fn sha256_must_be_64_hex_digits() {
    let err = invalid(&replace(SHA_B, "abc123"));
    assert_has(
        &err,
        "cvx.toml:9:78: genesis.binary.\"linux/arm64\".sha256: sha256 \"abc123\" is not 64 hex digits (6 characters)",
    );
    let err = invalid(&replace(SHA_B, &"g".repeat(64)));
    assert_has(&err, "is not 64 hex digits (64 characters)");
}

#[test]
fn an_empty_or_absent_sha256_points_at_cvx_pin() {
    // As `cvx import` writes an artifact the registry gives no checksum for.
    let err = invalid(&replace(SHA_B, ""));
    assert_has(
        &err,
        "cvx.toml:9:78: genesis.binary.\"linux/arm64\".sha256: sha256 is empty: the artifact is not pinned",
    );
    assert_has(&err, "hint: run `cvx pin -m MANIFEST`");
    let err = invalid(&replace(&format!(", sha256 = \"{SHA_B}\""), ""));
    assert_has(&err, "missing required key `sha256`");
    assert_has(&err, "hint: pin the artifact: run `cvx pin -m MANIFEST`");
}

#[test]
fn every_upgrade_is_pinned_for_every_platform() {
    let err = invalid(&replace(
        &format!(
            "binary.\"linux/arm64\" = {{ url = \"https://example.org/v3/simd-arm64\", sha256 = \"{SHA_B}\" }}\n"
        ),
        "",
    ));
    assert_has(
        &err,
        "cvx.toml:24:1: upgrade \"v3\".binary: not pinned for platform linux/arm64 (from chain.platforms)",
    );
    assert_has(&err, "add binary.\"linux/arm64\"");
    let err = invalid(&replace(
        "binary.\"linux/arm64\" = { url = \"https://example.org/v3",
        "binary.\"linux/arm46\" = { url = \"https://example.org/v3",
    ));
    assert_has(
        &err,
        "platform linux/arm46 is not among chain.platforms (linux/amd64, linux/arm64)",
    );
    let err = invalid(&replace("\"linux/amd64\", \"linux/arm64\"]", "\"linux\"]"));
    assert_has(&err, "platform \"linux\" is not of the form os/arch");
}

#[test]
fn urls_must_parse_and_use_a_known_scheme() {
    let err = invalid(&replace(
        "https://example.org/v3/simd-amd64",
        "ftp://example.org/v3/simd-amd64",
    ));
    assert_has(
        &err,
        "upgrade \"v3\".binary.\"linux/amd64\".url: URL scheme `ftp` is not supported",
    );
    let err = invalid(&replace(
        "https://example.org/v3/simd-amd64",
        "downloads/simd",
    ));
    assert_has(
        &err,
        "\"downloads/simd\" is neither a URL nor an absolute path",
    );
    assert_has(
        &err,
        "hint: use https://..., http://..., file:///absolute/path or /absolute/path",
    );
    let err = invalid(&replace(
        "https://example.org/v3/simd-amd64",
        "https://exa mple.org/x",
    ));
    assert_has(&err, "is neither a URL nor an absolute path");
}

#[test]
fn http_file_and_absolute_paths_are_accepted_http_with_a_warning() {
    let ctx = Ctx::new();
    let text = valid()
        .replacen(
            "https://example.org/v3/simd-amd64",
            "http://mirror.example.org/v3/simd",
            1,
        )
        .replacen(
            "https://example.org/v3/simd-arm64",
            "file:///srv/mirror/simd-arm64",
            1,
        )
        .replacen(
            "https://example.org/v1/simd-amd64",
            "/srv/mirror/simd-v1",
            1,
        );
    ctx.manifest(&text);
    let (stdout, _) = run(ctx.cvx().args(["plan", "--platform", "linux/amd64"]), 0);
    assert!(stdout.contains("warning: cvx.toml:24:32: upgrade \"v3\".binary.\"linux/amd64\".url: http://mirror.example.org/v3/simd is plain http"), "{stdout}");
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = valid()
        .replacen(
            "id = \"testchain-1\"",
            "id = \"testchain-1\"\nnetwork = \"main\"",
            1,
        )
        .replacen(SHA_B, "short", 1)
        .replacen("height = 200", "height = 50", 1)
        .replacen("name = \"v3\"", "name = \"V2\"", 1);
    let err = invalid(&text);
    assert_has(&err, "unknown key `network`");
    assert_has(&err, "is not 64 hex digits");
    assert_has(&err, "height 50 is not above 100");
    assert_has(&err, "duplicates \"v2\"");
    assert_has(&err, "error: cvx.toml: 4 problems found");
}

#[test]
fn a_missing_manifest_says_where_it_looked() {
    let ctx = Ctx::new();
    let (_, err) = run(ctx.cvx().args(["plan", "-m", "nope.toml"]), 1);
    assert_has(&err, "error: cannot read manifest nope.toml");
    assert_has(&err, "caused by: No such file or directory");
    assert_has(&err, "hint: pass the manifest with -m PATH or CVX_MANIFEST");
}

#[test]
fn every_example_is_valid_and_reads_the_same_through_serde() {
    let mut seen = 0;
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        seen += 1;
        let ctx = Ctx::new();
        run(
            ctx.cvx()
                .arg("plan")
                .arg("-m")
                .arg(&path)
                .args(["--platform", "linux/amd64"]),
            0,
        );
        let text = std::fs::read_to_string(&path).unwrap();
        let (walked, _) = cvx::manifest::parse(&text).unwrap();
        let via_serde: cvx::manifest::Manifest = toml::from_str(&text).unwrap();
        assert_eq!(
            walked,
            via_serde,
            "{}: walker and schema types disagree",
            path.display()
        );
    }
    assert!(seen >= 2, "expected the example manifests, found {seen}");
}

#[test]
fn committed_schemas_are_current() {
    for (which, file) in [
        ("manifest", "manifest.schema.json"),
        ("plan", "plan.schema.json"),
        ("status", "status.schema.json"),
    ] {
        let ctx = Ctx::new();
        let (generated, _) = run(ctx.cvx().args(["schema", which]), 0);
        let path = format!("{}/schemas/{file}", env!("CARGO_MANIFEST_DIR"));
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            generated == committed,
            "schemas/{file} is stale: regenerate it with `cargo run -- schema {which} > schemas/{file}`"
        );
    }
}

#[test]
fn validation_report_snapshot() {
    let text = valid()
        .replacen(
            "daemon = \"simd\"",
            "daemon = \"simd\"\nnetwork = \"main\"",
            1,
        )
        .replacen(SHA_B, "short", 1)
        .replacen("height = 200", "height = 50", 1);
    insta::assert_snapshot!(invalid(&text));
}

#[test]
fn completions_and_man_pages_come_from_the_cli_definition() {
    let ctx = Ctx::new();
    for shell in ["bash", "zsh", "fish"] {
        let (script, _) = run(ctx.cvx().args(["completions", shell]), 0);
        assert!(
            script.contains("apply") && script.contains("detailed-exitcode"),
            "{shell}: {script}"
        );
    }
    let (page, _) = run(ctx.cvx().arg("man"), 0);
    assert!(
        page.contains(".TH cvx 1") && page.contains("cvx\\-plan(1)"),
        "{page}"
    );
    let (page, _) = run(ctx.cvx().args(["man", "plan"]), 0);
    assert!(
        page.contains(".TH cvx-plan 1") && page.contains("\\-\\-detailed\\-exitcode"),
        "{page}"
    );
    let (_, err) = run(ctx.cvx().args(["man", "nope"]), 1);
    assert!(err.contains("no command `nope`"), "{err}");
}

#[test]
fn help_and_man_for_run_list_every_variable_with_its_default_and_meaning() {
    let ctx = Ctx::new();
    let (help, _) = run(ctx.cvx().args(["help", "run"]), 0);
    let (page, _) = run(ctx.cvx().args(["man", "run"]), 0);
    // roff escapes `-` and `'`; undo that to compare the words.
    let page = page.replace("\\-", "-").replace("\\*(Aq", "'");
    // Unwrapped, as the terminal's width folds the help.
    let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(!cvx::run::config::VARIABLES.is_empty());
    for v in cvx::run::config::VARIABLES {
        let default = if v.default == "required" {
            "(required)".to_string()
        } else {
            format!("(default: {})", v.default)
        };
        let meaning = v.meaning.split_whitespace().collect::<Vec<_>>().join(" ");
        let entry = format!("{} {default} {meaning}", v.name);
        assert!(
            help.contains(&entry),
            "`cvx help run` lacks {entry:?}:\n{help}"
        );
        assert!(
            page.contains(v.name) && page.contains(v.meaning),
            "`cvx man run` lacks {}:\n{page}",
            v.name
        );
    }
}

#[test]
fn a_manifest_that_is_not_text_says_so() {
    let ctx = Ctx::new();
    std::fs::write(ctx.path("cvx.toml"), [0xff, 0xfe, 0x00, 0x80]).unwrap();
    let (_, err) = run(ctx.cvx().arg("plan"), 1);
    assert!(
        err.contains("error: cannot read manifest cvx.toml"),
        "{err}"
    );
    assert!(
        err.contains("hint: a manifest is a UTF-8 TOML text file"),
        "{err}"
    );
}

#[test]
fn plan_json_reports_problems_as_data() {
    let ctx = Ctx::new();
    ctx.manifest(&replace("height = 200", "height = 50"));
    let out = ctx
        .cvx()
        .args(["plan", "--json", "--platform", "linux/amd64"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["format_version"], 1);
    assert_eq!(doc["manifest"], "cvx.toml");
    assert_eq!(doc["error"], "cvx.toml: 1 problem found");
    let p = &doc["problems"][0];
    assert_eq!(
        (p["line"].as_u64(), p["column"].as_u64()),
        (Some(22), Some(10))
    );
    assert_eq!(p["key"], "upgrade \"v3\".height");
    assert_eq!(
        p["message"],
        "height 50 is not above 100, the height of upgrade \"v2\" before it"
    );
    assert!(p["hint"].as_str().unwrap().contains("strictly increase"));
}

#[test]
fn a_trigger_is_governance_or_a_halt_height_with_its_height() {
    let ctx = Ctx::new();
    ctx.manifest(&valid().replacen(
        "name = \"v3\"\nheight = 200",
        "name = \"v3\"\nheight = 200\ntrigger = \"halt-height\"",
        1,
    ));
    run(ctx.cvx().args(["plan", "--platform", "linux/amd64"]), 0);

    let err = invalid(&valid().replacen(
        "name = \"v3\"\nheight = 200",
        "name = \"v3\"\ntrigger = \"halt-height\"",
        1,
    ));
    assert_has(
        &err,
        "error: cvx.toml:22:11: upgrade \"v3\".trigger: trigger = \"halt-height\" needs the upgrade's height",
    );
    assert_has(
        &err,
        "hint: add height = <the height every validator agreed to halt at>",
    );

    let err = invalid(&replace(
        "name = \"v2\"\nheight = 100",
        "name = \"v2\"\nheight = 100\ntrigger = \"halt\"",
    ));
    assert_has(
        &err,
        "cvx.toml:14:11: upgrade \"v2\".trigger: unknown trigger \"halt\"",
    );
    assert_has(&err, "use \"governance\" (the default");
}

#[test]
fn names_with_surrounding_spaces_are_refused() {
    let err = invalid(&replace("name = \"v3\"", "name = \"v3 \""));
    assert_has(
        &err,
        "cvx.toml:21:8: upgrade \"v3 \".name: upgrade name \"v3 \" starts or ends with whitespace",
    );
    assert_has(&err, "hint: write \"v3\"");
    let err = invalid(&replace("daemon = \"simd\"", "daemon = \" simd\""));
    assert_has(
        &err,
        "chain.daemon: daemon name \" simd\" starts or ends with whitespace",
    );
    let err = invalid(&replace("id = \"testchain-1\"", "id = \"testchain-1\\t\""));
    assert_has(
        &err,
        "chain.id: chain id \"testchain-1\\t\" starts or ends with whitespace",
    );
}

#[test]
fn a_sha256_prefix_is_accepted_and_its_length_counted_without_it() {
    let ctx = Ctx::new();
    ctx.manifest(&replace(
        &format!("simd-amd64\", sha256 = \"{SHA_A}\""),
        &format!("simd-amd64\", sha256 = \"sha256:{}\"", SHA_A.to_uppercase()),
    ));
    let (out, _) = run(
        ctx.cvx()
            .args(["plan", "--json", "--platform", "linux/amd64"]),
        0,
    );
    let plan: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        plan["upgrades"][0]["artifacts"][0]["sha256"], SHA_A,
        "the prefix is stripped, the digest lower-cased"
    );
    let err = invalid(&replace(
        &format!("simd-amd64\", sha256 = \"{SHA_A}\""),
        &format!("simd-amd64\", sha256 = \"sha256:{}\"", &SHA_A[..60]),
    ));
    assert_has(&err, "is not 64 hex digits (60 characters after `sha256:`)");
}

#[test]
fn a_library_archive_needs_the_path_of_the_library_in_it() {
    let archive = "url = \"https://example.org/v2/simd-amd64.tar.gz\", sha256 = \"".to_string();
    let err = invalid(&replace(
        "library.\"linux/amd64\" = [ { url = \"https://example.org/libwasmvm.x86_64.so\", sha256 = \"",
        &format!("library.\"linux/amd64\" = [ {{ {archive}"),
    ));
    assert_has(
        &err,
        "cvx.toml:17:27: upgrade \"v2\".library.\"linux/amd64\"[0].path: library simd-amd64.tar.gz is an archive, and no path names the library inside it",
    );
    assert_has(&err, "hint: add path = \"lib/libwasmvm.x86_64.so\"");

    // With path: valid, and staged under the member's file name.
    let ctx = Ctx::new();
    ctx.manifest(&replace(
        "library.\"linux/amd64\" = [ { url = \"https://example.org/libwasmvm.x86_64.so\", sha256 = \"",
        &format!("library.\"linux/amd64\" = [ {{ path = \"lib/libwasmvm.x86_64.so\", {archive}"),
    ));
    let (out, _) = run(
        ctx.cvx()
            .args(["plan", "--json", "--platform", "linux/amd64"]),
        0,
    );
    let plan: serde_json::Value = serde_json::from_str(&out).unwrap();
    let lib = &plan["upgrades"][1]["artifacts"][1];
    assert_eq!(lib["destination"], "upgrades/v2/lib/libwasmvm.x86_64.so");
    assert_eq!(lib["member"], "lib/libwasmvm.x86_64.so");

    let err = invalid(&replace(
        "library.\"linux/amd64\" = [ { url = \"https://example.org/libwasmvm.x86_64.so\", sha256 = \"",
        &format!("library.\"linux/amd64\" = [ {{ path = \"../libwasmvm.so\", {archive}"),
    ));
    assert_has(
        &err,
        "archive member \"../libwasmvm.so\" is not a relative path inside the archive",
    );
}
