//! `cvx apply` through the real binary against a real loopback server: staging, idempotence,
//! check mode, download faults, kill -9 mid-download, hostile archives, the lock, repairs.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Cursor, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::ctx::{Ctx, platform, run, sha256};
use crate::support::server::{Fault, RequestLog, Server};

const GENESIS: &[u8] = b"#!/bin/sh\necho v1.0.0\n";
const V2: &[u8] = b"#!/bin/sh\necho v2.0.0\n";
const V3: &[u8] = b"#!/bin/sh\necho v3.0.0\n";
const LIB: &[u8] = b"\x7fELF pretend libwasmvm";
const README: &[u8] = b"release notes\n";

// ---- fixtures ---------------------------------------------------------------------------------

/// Deterministic bytes that do not repeat in an obvious way.
fn body(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + i / 251) as u8) ^ seed)
        .collect()
}

/// One tar entry. `Raw` writes its name into the header as is: `tar::Builder` refuses `..` and
/// absolute names, which are exactly what the hostile cases need.
enum Entry<'a> {
    File(&'a str, &'a [u8]),
    Raw(&'a str, &'a [u8]),
    Symlink(&'a str, &'a str),
}

fn tar_gz(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o755);
        h.set_mtime(0);
        match e {
            Entry::File(name, data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, name, *data).unwrap();
            }
            Entry::Raw(name, data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(data.len() as u64);
                let field = &mut h.as_old_mut().name;
                field.fill(0);
                field[..name.len()].copy_from_slice(name.as_bytes());
                h.set_cksum();
                b.append(&h, *data).unwrap();
            }
            Entry::Symlink(name, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                h.set_link_name_literal(target).unwrap();
                h.set_path(name).unwrap();
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            }
        }
    }
    let tar = b.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    gz.finish().unwrap()
}

fn zip(entries: &[(&str, &[u8])]) -> Vec<u8> {
    use zip::write::SimpleFileOptions;
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts = SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .unix_permissions(0o755);
    for (name, data) in entries {
        w.start_file(*name, opts).unwrap();
        w.write_all(data).unwrap();
    }
    w.finish().unwrap().into_inner()
}

/// Serve `bytes` at `path` and return the manifest's inline table pinning them.
fn serve(server: &Server, path: &str, bytes: &[u8], fault: Fault) -> String {
    server.add(path, bytes.to_vec(), fault);
    pin(&server.url(path), &sha256(bytes), None)
}

fn pin(url: &str, sha: &str, member: Option<&str>) -> String {
    match member {
        Some(m) => format!(r#"{{ url = "{url}", sha256 = "{sha}", path = "{m}" }}"#),
        None => format!(r#"{{ url = "{url}", sha256 = "{sha}" }}"#),
    }
}

struct Upgrade<'a> {
    name: &'a str,
    binary: String,
    libraries: Vec<String>,
}

fn up(name: &str, binary: String) -> Upgrade<'_> {
    Upgrade {
        name,
        binary,
        libraries: Vec::new(),
    }
}

/// Write `cvx.toml` for the host platform, daemon `simd`.
fn manifest(ctx: &Ctx, genesis: &str, upgrades: &[Upgrade<'_>]) {
    let p = platform();
    let mut text = format!(
        "[chain]\nid = \"testchain-1\"\ndaemon = \"simd\"\n\n[genesis]\nbinary.\"{p}\" = {genesis}\n"
    );
    for u in upgrades {
        text.push_str(&format!(
            "\n[[upgrade]]\nname = \"{}\"\nbinary.\"{p}\" = {}\n",
            u.name, u.binary
        ));
        if !u.libraries.is_empty() {
            text.push_str(&format!(
                "library.\"{p}\" = [ {} ]\n",
                u.libraries.join(", ")
            ));
        }
    }
    ctx.manifest(&text);
}

// ---- running cvx --------------------------------------------------------------------------------

/// `cvx apply --home <home> --json <extra>`, expecting exit `code`: (report, stderr).
fn apply(ctx: &Ctx, extra: &[&str], code: i32) -> (Value, String) {
    let mut cmd = ctx.cvx();
    cmd.arg("apply")
        .arg("--home")
        .arg(&ctx.home)
        .arg("--json")
        .args(extra);
    let (stdout, stderr) = run(&mut cmd, code);
    let report = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("apply printed no JSON ({e})\n{stdout}\n--- stderr\n{stderr}"));
    (report, stderr)
}

/// The same command as a child process, for the tests that kill it or race it.
fn spawn_apply(ctx: &Ctx, extra: &[&str]) -> Child {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_cvx"));
    cmd.current_dir(ctx.dir.path());
    for (key, _) in std::env::vars() {
        if key.starts_with("DAEMON_") || key.starts_with("CVX_") || key.starts_with("COSMOVISOR_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("NO_COLOR", "1")
        .arg("apply")
        .arg("--home")
        .arg(&ctx.home)
        .arg("--json")
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.spawn().unwrap()
}

/// Wait for a child to exit by itself with `code`: (report, stderr).
fn finish(child: Child, code: i32) -> (Value, String) {
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(code),
        "unexpected exit\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    (serde_json::from_str(&stdout).unwrap(), stderr)
}

/// Poll `condition` until it holds; fail after `limit`.
fn wait_until(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

// ---- inspecting the result ----------------------------------------------------------------------

fn action<'a>(report: &'a Value, destination: &str) -> &'a Value {
    report["actions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["destination"] == destination)
        .unwrap_or_else(|| panic!("no action for {destination} in {report:#}"))
}

fn error_of(report: &Value, destination: &str) -> String {
    action(report, destination)["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{destination} has no error in {report:#}"))
        .to_owned()
}

fn file_sha(path: &Path) -> String {
    sha256(&fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display())))
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// Every path under `root` (files, links, directories), recursively, sorted.
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries {
            let path = e.unwrap().path();
            if fs::symlink_metadata(&path).unwrap().is_dir() {
                stack.push(path.clone());
            }
            out.push(path);
        }
    }
    out.sort();
    out
}

/// Regular files under `root`, sorted.
fn files(root: &Path) -> Vec<PathBuf> {
    walk(root).into_iter().filter(|p| p.is_file()).collect()
}

/// Files in `.cvx/partial` (downloads in progress or left by a failure).
fn partials(ctx: &Ctx) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(ctx.cosmovisor(".cvx/partial"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Outside `.cvx/`, the tree holds nothing but `expected` (path -> sha256 of its bytes) and the
/// `current -> genesis` link: no temp file, no unverified bytes.
fn assert_only_verified(ctx: &Ctx, expected: &BTreeMap<&str, String>) {
    let root = ctx.cosmovisor("");
    for path in walk(&root) {
        let rel = path.strip_prefix(&root).unwrap().to_str().unwrap();
        if rel == ".cvx" || rel.starts_with(".cvx/") {
            continue;
        }
        let meta = fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            continue;
        }
        if meta.file_type().is_symlink() {
            assert_eq!(rel, "current", "unexpected link in the tree");
            assert_eq!(fs::read_link(&path).unwrap(), Path::new("genesis"));
            continue;
        }
        let want = expected
            .get(rel)
            .unwrap_or_else(|| panic!("unexpected file {rel} in the tree"));
        assert_eq!(
            &file_sha(&path),
            want,
            "{rel} holds bytes other than its pin"
        );
    }
}

fn get(range: Option<String>, if_range: Option<String>) -> RequestLog {
    RequestLog {
        method: "GET".into(),
        range,
        if_range,
    }
}

// ---- tests --------------------------------------------------------------------------------------

/// Genesis (raw), an upgrade from a tar.gz member with a library: the manifest of most tests.
fn standard(ctx: &Ctx, server: &Server) -> Vec<u8> {
    let archive = tar_gz(&[
        Entry::File("simd-2.0.0/README.md", README),
        Entry::File("simd-2.0.0/bin/simd", V2),
    ]);
    let genesis = serve(server, "/v1/simd", GENESIS, Fault::None);
    server.add("/v2/simd.tar.gz", archive.clone(), Fault::None);
    let v2 = pin(
        &server.url("/v2/simd.tar.gz"),
        &sha256(&archive),
        Some("simd-2.0.0/bin/simd"),
    );
    let lib = serve(server, "/v2/libwasmvm.so", LIB, Fault::None);
    manifest(
        ctx,
        &genesis,
        &[Upgrade {
            name: "V2",
            binary: v2,
            libraries: vec![lib],
        }],
    );
    archive
}

const STANDARD_PATHS: [&str; 3] = ["/v1/simd", "/v2/simd.tar.gz", "/v2/libwasmvm.so"];

fn hits(server: &Server) -> Vec<usize> {
    STANDARD_PATHS.iter().map(|p| server.hits(p)).collect()
}

#[test]
fn fresh_apply_stages_everything_and_a_second_run_changes_nothing() {
    let ctx = Ctx::new();
    let server = Server::start();
    let archive = standard(&ctx, &server);

    let (report, _) = apply(&ctx, &[], 0);
    assert_eq!(report["changed"], true);
    assert_eq!(report["failed"], false);
    assert_eq!(report["actions"].as_array().unwrap().len(), 4, "{report:#}");
    assert_eq!(
        action(&report, "genesis/bin/simd"),
        &json!({
            "action": "fetch",
            "destination": "genesis/bin/simd",
            "key": format!("genesis.binary.\"{}\"", platform()),
            "line": 6,
            "url": server.url("/v1/simd"),
            "sha256": sha256(GENESIS),
            "status": "changed",
            "reason": "not staged",
            "size": GENESIS.len(),
        })
    );
    let v2 = action(&report, "upgrades/v2/bin/simd");
    assert_eq!(v2["status"], "changed");
    assert_eq!(v2["sha256"], sha256(&archive), "the pin is the archive's");
    assert_eq!(v2["size"], V2.len(), "the size is the member's");
    let lib = action(&report, "upgrades/v2/lib/libwasmvm.so");
    assert_eq!(
        (&lib["status"], &lib["size"]),
        (&json!("changed"), &json!(LIB.len()))
    );
    let link = action(&report, "current");
    assert_eq!(
        (&link["action"], &link["status"]),
        (&json!("link"), &json!("changed"))
    );

    // The tree, as Cosmovisor expects it.
    assert_eq!(
        fs::read_link(ctx.cosmovisor("current")).unwrap(),
        Path::new("genesis")
    );
    for (rel, bytes, want_mode) in [
        ("genesis/bin/simd", GENESIS, 0o755),
        ("upgrades/v2/bin/simd", V2, 0o755),
        ("upgrades/v2/lib/libwasmvm.so", LIB, 0o644),
    ] {
        assert_eq!(fs::read(ctx.cosmovisor(rel)).unwrap(), bytes, "{rel}");
        assert_eq!(mode(&ctx.cosmovisor(rel)), want_mode, "mode of {rel}");
    }
    let out = std::process::Command::new(ctx.cosmovisor("current/bin/simd"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "v1.0.0\n");
    let receipt: Value = serde_json::from_slice(
        &fs::read(ctx.cosmovisor(".cvx/receipts/upgrades/v2/bin/simd.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(receipt["sha256"], sha256(V2));
    assert_eq!(receipt["source_sha256"], sha256(&archive));
    assert_eq!(receipt["source_url"], server.url("/v2/simd.tar.gz"));
    assert_eq!(receipt["member"], "simd-2.0.0/bin/simd");
    assert_eq!(
        partials(&ctx),
        Vec::<String>::new(),
        "downloads are cleaned up"
    );
    assert_eq!(hits(&server), vec![1, 1, 1]);

    // Again: nothing to do, nothing downloaded.
    let (report, _) = apply(&ctx, &[], 0);
    assert_eq!(report["changed"], false);
    assert_eq!(report["failed"], false);
    let actions = report["actions"].as_array().unwrap();
    assert_eq!(
        actions.len(),
        3,
        "no link action once current exists: {report:#}"
    );
    for a in actions {
        assert_eq!(
            (&a["action"], &a["status"]),
            (&json!("ok"), &json!("unchanged")),
            "{a}"
        );
        assert_eq!(a["reason"], "staged from the pin (receipt, file unchanged)");
    }
    let (human, _) = run(ctx.cvx().arg("apply").arg("--home").arg(&ctx.home), 0);
    assert_eq!(
        human,
        "Apply: 0 changed, 3 unchanged, 0 failed: nothing to do.\n"
    );
    let (check, _) = apply(&ctx, &["--check"], 0);
    assert_eq!(check["changed"], false);
    assert_eq!(
        hits(&server),
        vec![1, 1, 1],
        "idempotent without re-downloading"
    );
}

#[test]
fn check_on_an_empty_home_reports_and_writes_nothing() {
    let ctx = Ctx::new();
    let server = Server::start();
    standard(&ctx, &server);

    let (report, _) = apply(&ctx, &["--check"], 0);
    assert_eq!(report["changed"], true);
    assert_eq!(report["failed"], false);
    let statuses: Vec<(&str, &str)> = report["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["action"].as_str().unwrap(), a["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        statuses,
        vec![
            ("fetch", "would_change"),
            ("fetch", "would_change"),
            ("fetch", "would_change"),
            ("link", "would_change"),
        ]
    );
    assert_eq!(
        action(&report, "upgrades/v2/bin/simd")["reason"],
        "not staged"
    );

    let (human, _) = run(
        ctx.cvx()
            .args(["apply", "--check", "--home"])
            .arg(&ctx.home),
        0,
    );
    assert!(
        human.contains("~ would fetch   genesis/bin/simd  not staged\n"),
        "{human}"
    );
    assert!(
        human.ends_with("Apply: 4 to change, 0 unchanged, 0 failed: changes pending.\n"),
        "{human}"
    );
    assert!(!ctx.home.exists(), "--check must not create the home");
    assert_eq!(hits(&server), vec![0, 0, 0], "--check downloads nothing");
}

#[test]
fn dropped_connections_and_503s_are_retried_within_one_run() {
    let ctx = Ctx::new();
    let server = Server::start();
    let big = body(300_000, 1);
    let genesis = serve(&server, "/g", &big, Fault::DropAfter(100_000));
    let v2 = serve(&server, "/v2", V2, Fault::FailTimes(503, 2));
    manifest(&ctx, &genesis, &[up("v2", v2)]);

    let (report, stderr) = apply(&ctx, &[], 0);
    assert_eq!(report["failed"], false);
    let g = action(&report, "genesis/bin/simd");
    assert_eq!(
        (&g["status"], &g["resumed"]),
        (&json!("changed"), &json!(true))
    );
    assert_eq!(
        server.requests("/g"),
        vec![
            get(None, None),
            get(Some("bytes=100000-".into()), server.etag("/g")),
        ],
        "the second request continues where the dropped one stopped"
    );
    let v2 = action(&report, "upgrades/v2/bin/simd");
    assert_eq!(v2["status"], "changed");
    assert_eq!(v2.get("resumed"), None, "nothing was kept from a 503");
    assert_eq!(server.hits("/v2"), 3);
    assert!(stderr.contains("download failed; retrying"), "{stderr}");
    assert_eq!(fs::read(ctx.cosmovisor("genesis/bin/simd")).unwrap(), big);
    assert_eq!(
        fs::read(ctx.cosmovisor("upgrades/v2/bin/simd")).unwrap(),
        V2
    );
    assert_eq!(partials(&ctx), Vec::<String>::new());
}

#[test]
fn an_interrupted_download_is_kept_and_a_server_ignoring_range_restarts_it() {
    let ctx = Ctx::new();
    let server = Server::start();
    let big = body(200_000, 2);
    let sha = sha256(&big);
    let genesis = serve(&server, "/g", &big, Fault::DropAfter(60_000));
    manifest(&ctx, &genesis, &[]);

    // No retries: the run fails, the bytes received are kept for the next one.
    let (report, _) = apply(&ctx, &["--retries", "0"], 1);
    let error = error_of(&report, "genesis/bin/simd");
    assert!(
        error.starts_with(&format!(
            "download of {} was interrupted after 60000 bytes: ",
            server.url("/g")
        )),
        "{error}"
    );
    assert_eq!(
        action(&report, "current")["error"],
        "the genesis binary is not staged; current was not created"
    );
    assert_eq!(
        partials(&ctx),
        vec![format!("{sha}.part"), format!("{sha}.part.json")]
    );
    assert_eq!(
        fs::metadata(ctx.cosmovisor(&format!(".cvx/partial/{sha}.part")))
            .unwrap()
            .len(),
        60_000
    );
    assert!(!ctx.cosmovisor("genesis/bin/simd").exists());

    // Now the server ignores Range: cvx asks for the rest, gets the whole file, starts over.
    server.add("/g", big.clone(), Fault::IgnoreRange);
    let (report, _) = apply(&ctx, &["--retries", "0"], 0);
    let g = action(&report, "genesis/bin/simd");
    assert_eq!(
        (&g["status"], &g["size"]),
        (&json!("changed"), &json!(200_000))
    );
    assert_eq!(
        g.get("resumed"),
        None,
        "a restarted download is not a resumed one"
    );
    assert_eq!(
        server.requests("/g")[1],
        get(Some("bytes=60000-".into()), server.etag("/g"))
    );
    assert_eq!(server.hits("/g"), 2);
    assert_eq!(fs::read(ctx.cosmovisor("genesis/bin/simd")).unwrap(), big);
    assert_eq!(partials(&ctx), Vec::<String>::new());
}

#[test]
fn wrong_bytes_and_404_fail_while_the_rest_is_staged() {
    let ctx = Ctx::new();
    let server = Server::start();
    let genesis = serve(&server, "/g", GENESIS, Fault::None);
    let wrong = b"#!/bin/sh\necho not v2\n";
    server.add("/v2", wrong.to_vec(), Fault::None);
    let v2 = pin(&server.url("/v2"), &sha256(V2), None);
    let v3 = pin(&server.url("/missing"), &sha256(V3), None);
    manifest(&ctx, &genesis, &[up("v2", v2), up("v3", v3)]);

    let (report, _) = apply(&ctx, &[], 1);
    assert_eq!(report["failed"], true);
    assert_eq!(report["changed"], true, "genesis was staged");
    assert_eq!(action(&report, "genesis/bin/simd")["status"], "changed");
    assert_eq!(action(&report, "current")["status"], "changed");
    assert_eq!(action(&report, "upgrades/v2/bin/simd")["status"], "failed");
    assert_eq!(
        error_of(&report, "upgrades/v2/bin/simd"),
        format!(
            "checksum mismatch for {}: expected sha256 {}, got {}\n\
             hint: the manifest's sha256 pin or its url is wrong (or the file was replaced upstream)",
            server.url("/v2"),
            sha256(V2),
            sha256(wrong)
        )
    );
    assert_eq!(action(&report, "upgrades/v3/bin/simd")["status"], "failed");
    assert_eq!(
        error_of(&report, "upgrades/v3/bin/simd"),
        format!("{} answered 404 Not Found", server.url("/missing"))
    );
    assert_eq!(
        server.hits("/missing"),
        1,
        "a 404 is an answer, not retried"
    );
    assert_eq!(server.hits("/v2"), 1, "a checksum mismatch is not retried");

    assert!(!ctx.cosmovisor("upgrades/v2/bin/simd").exists());
    assert!(!ctx.cosmovisor("upgrades/v3/bin/simd").exists());
    assert_eq!(
        partials(&ctx),
        Vec::<String>::new(),
        "rejected bytes are not kept"
    );
    assert_only_verified(
        &ctx,
        &BTreeMap::from([("genesis/bin/simd", sha256(GENESIS))]),
    );

    // The failure points at the artifact's line in the manifest.
    let (human, _) = run(ctx.cvx().arg("apply").arg("--home").arg(&ctx.home), 1);
    assert!(
        human.contains(&format!(
            "! failed    upgrades/v2/bin/simd (manifest line 10, upgrade[0].binary.\"{}\")\n    checksum mismatch for",
            platform()
        )),
        "{human}"
    );
    let v2 = action(&report, "upgrades/v2/bin/simd");
    assert_eq!(
        (&v2["line"], &v2["key"]),
        (
            &json!(10),
            &json!(format!("upgrade[0].binary.\"{}\"", platform()))
        )
    );
    assert!(
        human.ends_with("Apply: 0 changed, 1 unchanged, 2 failed: failed.\n"),
        "{human}"
    );
}

#[test]
fn kill_9_mid_download_leaves_no_unverified_bytes_and_the_rerun_resumes() {
    const SIZE: usize = 8 << 20;
    let ctx = Ctx::new();
    let server = Server::start();
    let big = body(SIZE, 3);
    let sha = sha256(&big);
    let slow = Fault::Slow {
        chunk: 64 << 10,
        delay: Duration::from_millis(5),
    };
    let genesis = serve(&server, "/big", &big, slow);
    let v2 = serve(&server, "/v2", V2, Fault::None);
    manifest(&ctx, &genesis, &[up("v2", v2)]);
    let part = ctx.cosmovisor(&format!(".cvx/partial/{sha}.part"));
    let size = || fs::metadata(&part).map_or(0, |m| m.len());
    // Whatever the moment of the kill, only these bytes may be in the tree.
    let verified = BTreeMap::from([
        ("genesis/bin/simd", sha),
        ("upgrades/v2/bin/simd", sha256(V2)),
    ]);

    let mut kept = Vec::new();
    for target in [1u64 << 20, 5 << 19, 4 << 20] {
        let before = kept.last().copied().unwrap_or(0);
        let mut child = spawn_apply(&ctx, &[]);
        wait_until(
            &format!("{} to grow past {target} bytes", part.display()),
            Duration::from_secs(20),
            || {
                if let Some(status) = child.try_wait().unwrap() {
                    panic!("apply exited ({status}) before it could be killed");
                }
                let now = size();
                now >= target && now > before
            },
        );
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(9), "killed, not finished: {status}");

        assert!(
            !ctx.cosmovisor("genesis/bin/simd").exists(),
            "unverified bytes at the destination"
        );
        assert!(
            fs::symlink_metadata(ctx.cosmovisor("current")).is_err(),
            "current before genesis is staged"
        );
        assert_only_verified(&ctx, &verified);
        let now = size();
        assert!(
            now > before && now < SIZE as u64,
            "partial of {now} bytes after {before}"
        );
        assert!(
            ctx.cosmovisor(&format!(
                ".cvx/partial/{}.part.json",
                verified["genesis/bin/simd"]
            ))
            .exists()
        );
        kept.push(now);
    }

    let (report, _) = apply(&ctx, &[], 0);
    let g = action(&report, "genesis/bin/simd");
    assert_eq!(
        (&g["status"], &g["resumed"], &g["size"]),
        (&json!("changed"), &json!(true), &json!(SIZE))
    );
    assert_eq!(
        file_sha(&ctx.cosmovisor("genesis/bin/simd")),
        verified["genesis/bin/simd"]
    );
    assert_eq!(
        fs::read_link(ctx.cosmovisor("current")).unwrap(),
        Path::new("genesis")
    );
    // One request per run, each continuing from exactly what the killed one had kept.
    let ranges: Vec<Option<String>> = server
        .requests("/big")
        .into_iter()
        .map(|r| r.range)
        .collect();
    let mut want = vec![None];
    want.extend(kept.iter().map(|n| Some(format!("bytes={n}-"))));
    assert_eq!(ranges, want);
    assert_only_verified(&ctx, &verified);
    assert_eq!(partials(&ctx), Vec::<String>::new());
}

#[test]
fn hostile_archives_are_refused_and_a_zip_is_unpacked() {
    let ctx = Ctx::new();
    let server = Server::start();
    let abs = ctx.path("abs-evil");
    let abs = abs.to_str().unwrap();
    let genesis = serve(&server, "/g", GENESIS, Fault::None);
    let dotdot = tar_gz(&[Entry::Raw("../evil", b"evil"), Entry::File("bin/simd", V2)]);
    let absolute = tar_gz(&[Entry::File("bin/simd", V2), Entry::Raw(abs, b"evil")]);
    let link = tar_gz(&[
        Entry::File("bin/simd", V2),
        Entry::Symlink("lib/passwd", "../../etc/passwd"),
    ]);
    let zipped = zip(&[("README.md", README), ("bin/simd", V3)]);
    manifest(
        &ctx,
        &genesis,
        &[
            up(
                "dotdot",
                serve(&server, "/dotdot.tar.gz", &dotdot, Fault::None),
            ),
            up(
                "absolute",
                serve(&server, "/absolute.tar.gz", &absolute, Fault::None),
            ),
            up("link", serve(&server, "/link.tar.gz", &link, Fault::None)),
            up(
                "zipped",
                serve(&server, "/zipped.zip", &zipped, Fault::None),
            ),
        ],
    );

    let (report, _) = apply(&ctx, &[], 1);
    assert_eq!(
        error_of(&report, "upgrades/dotdot/bin/simd"),
        "archive entry `../evil` escapes the archive; refusing the whole archive"
    );
    assert_eq!(
        error_of(&report, "upgrades/absolute/bin/simd"),
        format!("archive entry `{abs}` has an absolute path; refusing the whole archive")
    );
    assert_eq!(
        error_of(&report, "upgrades/link/bin/simd"),
        "archive entry `lib/passwd` is a symlink to `../../etc/passwd`, outside the archive; \
         refusing the whole archive"
    );
    let z = action(&report, "upgrades/zipped/bin/simd");
    assert_eq!(
        (&z["status"], &z["size"]),
        (&json!("changed"), &json!(V3.len()))
    );
    assert_eq!(
        fs::read(ctx.cosmovisor("upgrades/zipped/bin/simd")).unwrap(),
        V3
    );
    assert_eq!(mode(&ctx.cosmovisor("upgrades/zipped/bin/simd")), 0o755);

    for dir in ["dotdot", "absolute", "link"] {
        assert!(
            !ctx.cosmovisor(&format!("upgrades/{dir}/bin/simd")).exists(),
            "{dir}"
        );
    }
    assert!(!Path::new(abs).exists(), "the absolute entry was written");
    let evil: Vec<_> = walk(ctx.dir.path())
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n == "evil" || n == "passwd"))
        .collect();
    assert_eq!(evil, Vec::<PathBuf>::new(), "hostile entries were written");
    assert_only_verified(
        &ctx,
        &BTreeMap::from([
            ("genesis/bin/simd", sha256(GENESIS)),
            ("upgrades/zipped/bin/simd", sha256(V3)),
        ]),
    );
    assert_eq!(partials(&ctx), Vec::<String>::new());
}

#[test]
fn concurrent_applies_take_turns_on_the_lock() {
    let ctx = Ctx::new();
    let server = Server::start();
    let big = body(2 << 20, 4);
    // About 2 s: long enough for the other applies to find the tree locked.
    let slow = Fault::Slow {
        chunk: 32 << 10,
        delay: Duration::from_millis(30),
    };
    let genesis = serve(&server, "/big", &big, slow);
    manifest(&ctx, &genesis, &[]);

    let mut first = spawn_apply(&ctx, &[]);
    let pid = first.id();
    let lock = ctx.cosmovisor(".cvx/lock");
    wait_until(
        "the first apply to hold the lock",
        Duration::from_secs(10),
        || {
            assert_eq!(
                first.try_wait().unwrap(),
                None,
                "the first apply ended early"
            );
            fs::read_to_string(&lock).is_ok_and(|s| s == format!("{pid} apply"))
        },
    );

    let mut impatient = ctx.cvx();
    impatient
        .args(["apply", "--json", "--lock-timeout", "200ms", "--home"])
        .arg(&ctx.home);
    let (stdout, stderr) = run(&mut impatient, 1);
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        (&report["failed"], &report["actions"]),
        (&json!(true), &json!([]))
    );
    assert!(
        report["error"]
            .as_str()
            .unwrap()
            .starts_with("the tree is locked by another cvx apply")
    );
    assert!(
        stderr.contains(&format!(
            "error: the tree is locked by another cvx apply (pid {pid}) ({}); gave up after",
            lock.display()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("hint: wait for the other cvx to finish, or raise --lock-timeout"));
    assert_eq!(
        first.try_wait().unwrap(),
        None,
        "the first apply must still hold the lock"
    );

    let (second, stderr) = apply(&ctx, &[], 0);
    assert!(
        stderr.contains(&format!(
            "another cvx apply (pid {pid}) holds {}; waiting up to ",
            lock.display()
        )),
        "{stderr}"
    );
    assert_eq!(
        second["changed"], false,
        "planned after the first finished: {second:#}"
    );
    assert_eq!(action(&second, "genesis/bin/simd")["status"], "unchanged");

    let (first, _) = finish(first, 0);
    assert_eq!(first["changed"], true);
    assert_eq!(action(&first, "genesis/bin/simd")["status"], "changed");
    assert_eq!(server.hits("/big"), 1, "downloaded once in total");
    assert_eq!(file_sha(&ctx.cosmovisor("genesis/bin/simd")), sha256(&big));
}

#[test]
fn a_tampered_file_is_replaced_and_kept_aside() {
    let ctx = Ctx::new();
    let server = Server::start();
    standard(&ctx, &server);
    apply(&ctx, &[], 0);
    let tampered = b"#!/bin/sh\necho pwned, and longer than the original\n";
    fs::write(ctx.cosmovisor("upgrades/v2/bin/simd"), tampered).unwrap();

    let (plan, _) = run(ctx.plan().arg("--json"), 0);
    let plan: Value = serde_json::from_str(&plan).unwrap();
    let v2 = plan["upgrades"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["dir"] == "upgrades/v2")
        .unwrap();
    assert_eq!(v2["artifacts"][0]["action"], "replace");
    assert_eq!(
        v2["artifacts"][0]["reason"],
        format!(
            "modified since staged: sha256 {}, staged as {}",
            sha256(tampered),
            sha256(V2)
        )
    );

    let (report, _) = apply(&ctx, &[], 0);
    assert_eq!(report["changed"], true);
    let a = action(&report, "upgrades/v2/bin/simd");
    assert_eq!(
        (&a["action"], &a["status"]),
        (&json!("replace"), &json!("changed"))
    );
    assert_eq!(action(&report, "genesis/bin/simd")["status"], "unchanged");
    assert_eq!(
        fs::read(ctx.cosmovisor("upgrades/v2/bin/simd")).unwrap(),
        V2
    );
    assert_eq!(mode(&ctx.cosmovisor("upgrades/v2/bin/simd")), 0o755);
    // Kept under the stage it came from, named by when it was replaced; the report says where.
    let aside = files(&ctx.cosmovisor(".cvx/replaced"));
    assert_eq!(aside.len(), 1, "{aside:?}");
    let kept = aside[0].strip_prefix(ctx.cosmovisor("")).unwrap();
    assert!(
        kept.to_str()
            .unwrap()
            .starts_with(".cvx/replaced/upgrades/v2/bin/simd."),
        "{kept:?}"
    );
    assert_eq!(fs::read(&aside[0]).unwrap(), tampered);
    assert_eq!(
        a["replaced"],
        json!({"sha256": sha256(tampered), "kept_at": kept.to_str().unwrap()})
    );
    assert_eq!(hits(&server), vec![1, 2, 1]);
    let (report, _) = apply(&ctx, &[], 0);
    assert_eq!(report["changed"], false);
}

#[test]
fn the_current_stage_is_replaced_only_with_force() {
    let ctx = Ctx::new();
    let server = Server::start();
    standard(&ctx, &server);
    apply(&ctx, &[], 0);
    let tampered = b"#!/bin/sh\necho running node, do not touch\n";
    let genesis = ctx.cosmovisor("genesis/bin/simd");
    fs::write(&genesis, tampered).unwrap();

    // Check mode predicts the refusal (Ansible's --check must not promise what apply won't do).
    let (report, _) = apply(&ctx, &["--check"], 1);
    assert_eq!(action(&report, "genesis/bin/simd")["status"], "failed");
    let (report, _) = apply(&ctx, &["--check", "--force"], 0);
    assert_eq!(
        action(&report, "genesis/bin/simd")["status"],
        "would_change"
    );

    let (report, _) = apply(&ctx, &[], 1);
    let g = action(&report, "genesis/bin/simd");
    assert_eq!(
        (&g["action"], &g["status"]),
        (&json!("replace"), &json!("failed"))
    );
    assert_eq!(
        g["error"],
        "current points to genesis: cvx does not replace the binary a node may be running without --force"
    );
    assert_eq!(
        fs::read(&genesis).unwrap(),
        tampered,
        "untouched without --force"
    );
    assert_eq!(server.hits("/v1/simd"), 1, "nothing fetched for it");
    assert!(!ctx.cosmovisor(".cvx/replaced").exists());

    let (report, _) = apply(&ctx, &["--force"], 0);
    let g = action(&report, "genesis/bin/simd");
    assert_eq!(
        (&g["action"], &g["status"]),
        (&json!("replace"), &json!("changed"))
    );
    assert_eq!(fs::read(&genesis).unwrap(), GENESIS);
    let aside = files(&ctx.cosmovisor(".cvx/replaced/genesis/bin"));
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(fs::read(&aside[0]).unwrap(), tampered);
    assert_eq!(
        fs::read_link(ctx.cosmovisor("current")).unwrap(),
        Path::new("genesis")
    );
}

#[test]
fn a_pin_change_replaces_the_staged_file() {
    let ctx = Ctx::new();
    let server = Server::start();
    let genesis = serve(&server, "/g", GENESIS, Fault::None);
    let old = serve(&server, "/v2.0.0/simd", V2, Fault::None);
    manifest(&ctx, &genesis, &[up("v2", old)]);
    apply(&ctx, &[], 0);

    let v2_1 = b"#!/bin/sh\necho v2.0.1\n";
    let new = serve(&server, "/v2.0.1/simd", v2_1, Fault::None);
    manifest(&ctx, &genesis, &[up("v2", new)]);
    let (report, _) = apply(&ctx, &[], 0);
    let a = action(&report, "upgrades/v2/bin/simd");
    assert_eq!(
        (&a["action"], &a["status"]),
        (&json!("replace"), &json!("changed"))
    );
    assert_eq!(
        a["reason"],
        format!(
            "pin changed: staged from sha256 {}, pinned {}",
            sha256(V2),
            sha256(v2_1)
        )
    );
    assert_eq!(a["url"], server.url("/v2.0.1/simd"));
    assert_eq!(
        fs::read(ctx.cosmovisor("upgrades/v2/bin/simd")).unwrap(),
        v2_1
    );
    let aside = files(&ctx.cosmovisor(".cvx/replaced/upgrades/v2/bin"));
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(fs::read(&aside[0]).unwrap(), V2);
    assert_eq!(
        (server.hits("/v2.0.0/simd"), server.hits("/v2.0.1/simd")),
        (1, 1)
    );
    let receipt: Value = serde_json::from_slice(
        &fs::read(ctx.cosmovisor(".cvx/receipts/upgrades/v2/bin/simd.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(receipt["source_url"], server.url("/v2.0.1/simd"));
    assert_eq!(receipt["sha256"], sha256(v2_1));
}

#[test]
fn one_pin_at_two_destinations_is_fetched_once() {
    let ctx = Ctx::new();
    let server = Server::start();
    let genesis = serve(&server, "/g", GENESIS, Fault::None);
    let lib = serve(&server, "/libwasmvm.so", LIB, Fault::None);
    let mut v2 = up("v2", serve(&server, "/v2", V2, Fault::None));
    v2.libraries.push(lib.clone());
    let mut v3 = up("v3", serve(&server, "/v3", V3, Fault::None));
    v3.libraries.push(lib);
    manifest(&ctx, &genesis, &[v2, v3]);

    let (report, _) = apply(&ctx, &[], 0);
    for dir in ["v2", "v3"] {
        let rel = format!("upgrades/{dir}/lib/libwasmvm.so");
        let a = action(&report, &rel);
        assert_eq!(
            (&a["status"], &a["size"]),
            (&json!("changed"), &json!(LIB.len()))
        );
        assert_eq!(fs::read(ctx.cosmovisor(&rel)).unwrap(), LIB);
        assert_eq!(mode(&ctx.cosmovisor(&rel)), 0o644);
        assert!(
            ctx.cosmovisor(&format!(".cvx/receipts/{rel}.json"))
                .exists()
        );
    }
    assert_eq!(server.hits("/libwasmvm.so"), 1);
    assert_eq!(partials(&ctx), Vec::<String>::new());
    let (report, _) = apply(&ctx, &[], 0);
    assert_eq!(report["changed"], false);
}

#[test]
fn json_mode_prints_one_document_even_when_apply_cannot_start() {
    let ctx = Ctx::new();
    ctx.manifest("[chain]\nid = \"t-1\"\n");
    let out = ctx
        .cvx()
        .args(["apply", "--json", "--home"])
        .arg(&ctx.home)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["changed"], false);
    assert_eq!(report["failed"], true);
    assert_eq!(report["actions"], json!([]));
    assert!(
        report["error"].as_str().unwrap().contains("problems found"),
        "{report:#}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing required table [genesis]"));
}

/// `cvx apply --json <extra>` with the kernel refusing to let it grow any file past
/// `file_limit` bytes (RLIMIT_FSIZE: a write past it kills the process with SIGXFSZ), so a test
/// proves what was never written, not only what is left afterwards.
fn apply_with_file_limit(ctx: &Ctx, extra: &[&str], file_limit: u64, code: i32) -> Value {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_cvx"));
    cmd.current_dir(ctx.dir.path());
    for (key, _) in std::env::vars() {
        if key.starts_with("DAEMON_") || key.starts_with("CVX_") || key.starts_with("COSMOVISOR_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("NO_COLOR", "1")
        .arg("apply")
        .arg("--home")
        .arg(&ctx.home)
        .arg("--json")
        .args(extra);
    // SAFETY: between fork and exec the closure only makes two system calls, which is
    // async-signal-safe; it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
            let hard = getrlimit(Resource::Fsize).maximum;
            setrlimit(
                Resource::Fsize,
                Rlimit {
                    current: Some(file_limit),
                    maximum: hard,
                },
            )
            .map_err(io::Error::from)
        });
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        (out.status.code(), out.status.signal()),
        (Some(code), None),
        "unexpected exit (killed by SIGXFSZ: a file grew past {file_limit} bytes)\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("no JSON ({e})\n{stdout}\n{stderr}"))
}

#[test]
fn max_size_caps_the_unpacked_bytes_and_nothing_grows_past_it() {
    const MIB: usize = 1 << 20;
    let ctx = Ctx::new();
    let server = Server::start();
    // 32 MiB of zeros: a few tens of KiB compressed, well under the 1 MiB download cap.
    let zeros = vec![0u8; 32 * MIB];
    let bomb_tgz = tar_gz(&[
        Entry::File("README.md", README),
        Entry::File("bin/simd", &zeros),
    ]);
    let bomb_zip = zip(&[("bin/simd", &zeros[..])]);
    // Exactly the cap, and just under it: staged.
    let at_cap = vec![0u8; MIB];
    let fits_tgz = tar_gz(&[Entry::File("bin/simd", &at_cap)]);
    let fits_zip = zip(&[("bin/simd", &at_cap[..MIB - 1])]);
    for archive in [&bomb_tgz, &bomb_zip, &fits_tgz, &fits_zip] {
        assert!(archive.len() < MIB / 4, "{} bytes", archive.len());
    }
    let genesis = serve(&server, "/g", GENESIS, Fault::None);
    manifest(
        &ctx,
        &genesis,
        &[
            up(
                "bomb-tgz",
                serve(&server, "/bomb.tar.gz", &bomb_tgz, Fault::None),
            ),
            up(
                "bomb-zip",
                serve(&server, "/bomb.zip", &bomb_zip, Fault::None),
            ),
            up(
                "fits-tgz",
                serve(&server, "/fits.tar.gz", &fits_tgz, Fault::None),
            ),
            up(
                "fits-zip",
                serve(&server, "/fits.zip", &fits_zip, Fault::None),
            ),
        ],
    );

    let report = apply_with_file_limit(&ctx, &["--max-size", "1"], MIB as u64, 1);
    for (dir, archive) in [("bomb-tgz", &bomb_tgz), ("bomb-zip", &bomb_zip)] {
        let destination = format!("upgrades/{dir}/bin/simd");
        assert_eq!(action(&report, &destination)["status"], "failed");
        let part = ctx.cosmovisor(&format!(".cvx/partial/{}.part", sha256(archive)));
        assert_eq!(
            error_of(&report, &destination),
            format!(
                "unpacking member `bin/simd` of archive `{}` would write more than the size \
                 limit of 1 MiB; stopped there\nhint: if the archive is genuine (not a \
                 decompression bomb), raise the limit with --max-size (cvx apply) or CVX_MAX_SIZE (cvx run)",
                part.display()
            )
        );
        assert!(!ctx.cosmovisor(&destination).exists(), "{destination}");
        assert!(
            !ctx.cosmovisor(&format!(".cvx/receipts/{destination}.json"))
                .exists(),
            "{destination}"
        );
    }
    assert_eq!(
        fs::read(ctx.cosmovisor("upgrades/fits-tgz/bin/simd")).unwrap(),
        at_cap
    );
    assert_eq!(
        fs::read(ctx.cosmovisor("upgrades/fits-zip/bin/simd")).unwrap(),
        &at_cap[..MIB - 1]
    );
    for dir in ["fits-tgz", "fits-zip"] {
        assert_eq!(
            action(&report, &format!("upgrades/{dir}/bin/simd"))["status"],
            "changed"
        );
    }
    // Nothing anywhere in the home, `.cvx/` included, is larger than the cap; no temp file
    // is left; only verified bytes are in the tree.
    for path in walk(&ctx.home) {
        let meta = fs::symlink_metadata(&path).unwrap();
        assert!(
            meta.len() <= MIB as u64,
            "{} holds {} bytes",
            path.display(),
            meta.len()
        );
        let name = path.file_name().unwrap().to_string_lossy();
        assert!(
            !name.starts_with(".cvx-"),
            "temp file left: {}",
            path.display()
        );
    }
    assert_only_verified(
        &ctx,
        &BTreeMap::from([
            ("genesis/bin/simd", sha256(GENESIS)),
            ("upgrades/fits-tgz/bin/simd", sha256(&at_cap)),
            ("upgrades/fits-zip/bin/simd", sha256(&at_cap[..MIB - 1])),
        ]),
    );
    assert_eq!(partials(&ctx), Vec::<String>::new());

    // The default cap (4096 MiB) lets the same archive through.
    let (report, _) = apply(&ctx, &[], 0);
    assert_eq!(
        action(&report, "upgrades/bomb-tgz/bin/simd")["size"],
        json!(zeros.len())
    );
}

// ---- adoption: a tree staged without receipts (by hand, or by Cosmovisor) ----------------------

/// Inode of a file: adoption must leave the very file in place.
fn inode(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).unwrap().ino()
}

#[test]
fn files_staged_without_receipts_that_are_the_pinned_ones_are_adopted_even_in_current() {
    let ctx = Ctx::new();
    let server = Server::start();
    // genesis is a plain file; v2 comes from an archive, and is what `current` points to: the
    // tree Cosmovisor leaves after an upgrade whose binary it downloaded.
    let genesis = serve(&server, "/g", GENESIS, Fault::None);
    let archive = tar_gz(&[
        Entry::File("simd-2.0.0/bin/simd", V2),
        Entry::File("simd-2.0.0/README", README),
    ]);
    server.add("/v2.tar.gz", archive.clone(), Fault::None);
    let v2 = pin(
        &server.url("/v2.tar.gz"),
        &sha256(&archive),
        Some("simd-2.0.0/bin/simd"),
    );
    manifest(&ctx, &genesis, &[up("v2", v2)]);
    ctx.stage("genesis/bin/simd", GENESIS);
    ctx.stage("upgrades/v2/bin/simd", V2);
    std::os::unix::fs::symlink("upgrades/v2", ctx.cosmovisor("current")).unwrap();
    let inodes: Vec<u64> = ["genesis/bin/simd", "upgrades/v2/bin/simd"]
        .iter()
        .map(|r| inode(&ctx.cosmovisor(r)))
        .collect();

    // plan: both adopted; the archive's member must be fetched to be proven, and plan says so.
    let (out, _) = run(ctx.plan().args(["--json", "--detailed-exitcode"]), 2);
    let plan: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(plan["summary"]["adopt"], 2, "{plan:#}");
    assert_eq!(plan["summary"]["replace"], 0, "{plan:#}");
    let v2 = &plan["upgrades"][1];
    assert_eq!(
        (&v2["action"], &v2["current"]),
        (&json!("adopt"), &json!(true))
    );
    assert_eq!(v2["artifacts"][0]["state"], "unverified");
    assert_eq!(
        v2["artifacts"][0]["reason"],
        format!(
            "staged without a receipt (sha256 {}): apply will verify it against the pinned archive's member, adopting it if it is the same and replacing it if not",
            sha256(V2)
        )
    );
    let (human, _) = run(&mut ctx.plan(), 0);
    assert!(
        human.contains("upgrade v2 (upgrades/v2, current): adopt\n  = adopt   bin/simd"),
        "{human}"
    );

    // apply, without --force: receipts written, nothing replaced, nothing kept aside.
    let (report, _) = apply(&ctx, &[], 0);
    assert_eq!(report["changed"], true, "{report:#}");
    for rel in ["genesis/bin/simd", "upgrades/v2/bin/simd"] {
        let a = action(&report, rel);
        assert_eq!(
            (&a["action"], &a["status"]),
            (&json!("adopt"), &json!("changed")),
            "{a}"
        );
        assert!(a.get("replaced").is_none(), "{a}");
    }
    assert_eq!(
        ["genesis/bin/simd", "upgrades/v2/bin/simd"]
            .iter()
            .map(|r| inode(&ctx.cosmovisor(r)))
            .collect::<Vec<_>>(),
        inodes,
        "the files themselves stay"
    );
    assert!(!ctx.cosmovisor(".cvx/replaced").exists());
    assert_eq!(
        server.hits("/g"),
        0,
        "a matching plain file needs no download"
    );
    assert_eq!(
        server.hits("/v2.tar.gz"),
        1,
        "the archive, to compare its member"
    );
    let receipt: Value = serde_json::from_slice(
        &fs::read(ctx.cosmovisor(".cvx/receipts/upgrades/v2/bin/simd.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(receipt["sha256"], sha256(V2));
    assert_eq!(receipt["source_sha256"], sha256(&archive));
    assert_eq!(receipt["member"], "simd-2.0.0/bin/simd");
    assert_eq!(partials(&ctx), Vec::<String>::new());
    let (human, _) = run(
        ctx.cvx()
            .args(["apply", "--check", "--home"])
            .arg(&ctx.home),
        0,
    );
    assert!(human.contains("nothing to do"), "{human}");

    // Adopted: the receipts vouch for the files from now on.
    let (out, _) = run(ctx.plan().args(["--json", "--detailed-exitcode"]), 0);
    let plan: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(plan["summary"]["ok"], 2, "{plan:#}");
    let (report, _) = apply(&ctx, &[], 0);
    assert_eq!(report["changed"], false);
    assert_eq!(server.hits("/v2.tar.gz"), 1);
}

#[test]
fn a_file_without_receipt_that_is_not_the_archives_member_is_replaced_and_kept_by_stage() {
    let ctx = Ctx::new();
    let server = Server::start();
    let genesis = serve(&server, "/g", GENESIS, Fault::None);
    let archive = |v: &[u8]| tar_gz(&[Entry::File("bin/simd", v)]);
    let (a2, a3) = (archive(V2), archive(V3));
    server.add("/v2.tar.gz", a2.clone(), Fault::None);
    server.add("/v3.tar.gz", a3.clone(), Fault::None);
    manifest(
        &ctx,
        &genesis,
        &[
            up("v2", pin(&server.url("/v2.tar.gz"), &sha256(&a2), None)),
            up("v3", pin(&server.url("/v3.tar.gz"), &sha256(&a3), None)),
        ],
    );
    ctx.stage("genesis/bin/simd", GENESIS);
    let other = b"#!/bin/sh\necho a hand-built v2\n";
    ctx.stage("upgrades/v2/bin/simd", other);
    ctx.stage("upgrades/v3/bin/simd", other);
    std::os::unix::fs::symlink("upgrades/v2", ctx.cosmovisor("current")).unwrap();

    // v3 is not current: replaced, and the report says with what and where the old file is kept.
    // v2 is current: refused without --force, untouched.
    let (report, _) = apply(&ctx, &[], 1);
    let v3 = action(&report, "upgrades/v3/bin/simd");
    assert_eq!(
        (&v3["action"], &v3["status"]),
        (&json!("replace"), &json!("changed")),
        "{v3}"
    );
    assert_eq!(
        v3["reason"],
        format!(
            "staged without a receipt and not the pinned archive {} (sha256 {}, the member's {})",
            server.url("/v3.tar.gz"),
            sha256(other),
            sha256(V3)
        )
    );
    let kept = v3["replaced"]["kept_at"].as_str().unwrap();
    assert!(
        kept.starts_with(".cvx/replaced/upgrades/v3/bin/simd."),
        "{kept}"
    );
    assert_eq!(v3["replaced"]["sha256"], sha256(other));
    assert_eq!(fs::read(ctx.cosmovisor(kept)).unwrap(), other);
    assert_eq!(
        fs::read(ctx.cosmovisor("upgrades/v3/bin/simd")).unwrap(),
        V3
    );

    let v2 = action(&report, "upgrades/v2/bin/simd");
    assert_eq!(v2["status"], "failed");
    assert_eq!(
        v2["error"],
        format!(
            "upgrades/v2/bin/simd (sha256 {}) is not the pinned archive {} (sha256 {}), and current points to its stage: cvx does not replace the binary a node may be running without --force",
            sha256(other),
            server.url("/v2.tar.gz"),
            sha256(V2)
        )
    );
    assert_eq!(
        fs::read(ctx.cosmovisor("upgrades/v2/bin/simd")).unwrap(),
        other
    );
    assert!(
        !ctx.cosmovisor(".cvx/receipts/upgrades/v2/bin/simd.json")
            .exists()
    );

    // The human report names what was replaced and where it is kept.
    let (human, _) = run(
        ctx.cvx()
            .args(["apply", "--force", "--home"])
            .arg(&ctx.home),
        0,
    );
    assert!(human.contains("~ replaced upgrades/v2/bin/simd"), "{human}");
    assert!(
        human.contains(&format!(
            "the file it replaced (sha256 {}) is kept at .cvx/replaced/upgrades/v2/bin/simd.",
            sha256(other)
        )),
        "{human}"
    );
    assert_eq!(
        fs::read(ctx.cosmovisor("upgrades/v2/bin/simd")).unwrap(),
        V2
    );
}

// ---- cvx prune ------------------------------------------------------------------------------

#[test]
fn prune_removes_unnamed_stages_and_old_replaced_files_but_never_what_the_node_needs() {
    let ctx = Ctx::new();
    let server = Server::start();
    let genesis = serve(&server, "/g", GENESIS, Fault::None);
    manifest(
        &ctx,
        &genesis,
        &[up("v2", serve(&server, "/v2", V2, Fault::None))],
    );
    apply(&ctx, &[], 0);
    // Left over: an old stage with its receipt, the stage current points to, and the stage of a
    // pending plan; none is in the manifest.
    for dir in ["v0-old", "v1-current", "v3-pending"] {
        ctx.stage(&format!("upgrades/{dir}/bin/simd"), b"some old build");
    }
    ctx.stage(".cvx/receipts/upgrades/v0-old/bin/simd.json", b"{}");
    fs::remove_file(ctx.cosmovisor("current")).unwrap();
    std::os::unix::fs::symlink("upgrades/v1-current", ctx.cosmovisor("current")).unwrap();
    fs::create_dir_all(ctx.home.join("data")).unwrap();
    fs::write(
        ctx.home.join("data/upgrade-info.json"),
        br#"{"name":"V3-pending","height":30}"#,
    )
    .unwrap();
    // Five replaced copies of v2's binary (the newest three stay), and one in the old flat layout.
    let stamps = [
        "2025-01-01T00:00:00.000000001Z",
        "2025-01-02T00:00:00.000000000Z",
        "2025-01-03T00:00:00.000000000Z",
        "2025-01-04T00:00:00.000000000Z",
        "2025-01-05T00:00:00.000000000Z",
    ];
    for stamp in stamps {
        ctx.stage(
            &format!(".cvx/replaced/upgrades/v2/bin/simd.{stamp}"),
            stamp.as_bytes(),
        );
    }
    ctx.stage(".cvx/replaced/simd.1700000000000000000", b"flat");

    let prune = |extra: &[&str]| -> Value {
        let mut cmd = ctx.cvx();
        cmd.args(["prune", "--json", "--home"])
            .arg(&ctx.home)
            .args(extra);
        let (out, _) = run(&mut cmd, 0);
        serde_json::from_str(&out).unwrap()
    };
    let before = walk(&ctx.home);
    let check = prune(&["--check"]);
    assert_eq!(walk(&ctx.home), before, "--check removes nothing");
    assert_eq!(
        (&check["changed"], &check["check"]),
        (&json!(true), &json!(true))
    );
    let removed: Vec<&str> = check["removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        removed,
        [
            "upgrades/v0-old",
            format!(".cvx/replaced/upgrades/v2/bin/simd.{}", stamps[1]).as_str(),
            format!(".cvx/replaced/upgrades/v2/bin/simd.{}", stamps[0]).as_str(),
        ],
        "{check:#}"
    );
    let kept: Vec<&str> = check["kept"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["path"].as_str().unwrap())
        .collect();
    assert_eq!(kept, ["upgrades/v1-current", "upgrades/v3-pending"]);

    let (human, _) = run(ctx.cvx().args(["prune", "--home"]).arg(&ctx.home), 0);
    assert!(
        human.contains("- removed upgrades/v0-old  on disk, not in the manifest"),
        "{human}"
    );
    assert!(
        human.contains("= kept upgrades/v1-current  not in the manifest, but current points to it"),
        "{human}"
    );
    assert!(human.contains("Prune: 3 removed"), "{human}");
    assert!(!ctx.cosmovisor("upgrades/v0-old").exists());
    assert!(!ctx.cosmovisor(".cvx/receipts/upgrades/v0-old").exists());
    for kept in [
        "upgrades/v1-current",
        "upgrades/v3-pending",
        "genesis",
        "upgrades/v2",
    ] {
        assert!(ctx.cosmovisor(kept).join("bin/simd").exists(), "{kept}");
    }
    let left: Vec<String> = files(&ctx.cosmovisor(".cvx/replaced"))
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        left,
        [
            "simd.1700000000000000000".to_string(),
            format!("simd.{}", stamps[2]),
            format!("simd.{}", stamps[3]),
            format!("simd.{}", stamps[4]),
        ]
    );
    let again = prune(&[]);
    assert_eq!(again["changed"], false, "{again:#}");
    // The tree still converges: prune removed nothing the manifest names.
    let (report, _) = apply(&ctx, &[], 0);
    assert_eq!(report["changed"], false, "{report:#}");
}

// ---- libraries from archives --------------------------------------------------------------------

#[test]
fn one_archive_pinned_once_gives_the_binary_and_the_library() {
    let ctx = Ctx::new();
    let server = Server::start();
    let genesis = serve(&server, "/g", GENESIS, Fault::None);
    let archive = tar_gz(&[
        Entry::File("bin/simd", V2),
        Entry::File("lib/libwasmvm.x86_64.so", LIB),
    ]);
    server.add("/simd-v2.tar.gz", archive.clone(), Fault::None);
    let url = server.url("/simd-v2.tar.gz");
    let sha = sha256(&archive);
    let mut v2 = up("v2", pin(&url, &sha, Some("bin/simd")));
    v2.libraries
        .push(pin(&url, &sha, Some("lib/libwasmvm.x86_64.so")));
    manifest(&ctx, &genesis, &[v2]);

    let (report, _) = apply(&ctx, &[], 0);
    assert_eq!(report["failed"], false, "{report:#}");
    assert_eq!(
        server.hits("/simd-v2.tar.gz"),
        1,
        "pinned once, fetched once"
    );
    for (rel, bytes, want_mode, member) in [
        ("upgrades/v2/bin/simd", V2, 0o755, "bin/simd"),
        (
            "upgrades/v2/lib/libwasmvm.x86_64.so",
            LIB,
            0o644,
            "lib/libwasmvm.x86_64.so",
        ),
    ] {
        assert_eq!(fs::read(ctx.cosmovisor(rel)).unwrap(), bytes, "{rel}");
        assert_eq!(mode(&ctx.cosmovisor(rel)), want_mode, "{rel}");
        let receipt: Value = serde_json::from_slice(
            &fs::read(ctx.cosmovisor(&format!(".cvx/receipts/{rel}.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(
            (&receipt["member"], &receipt["source_sha256"]),
            (&json!(member), &json!(sha))
        );
    }
    let (report, _) = apply(&ctx, &[], 0);
    assert_eq!(report["changed"], false);
}

#[test]
fn a_library_url_serving_an_archive_without_a_path_fails_instead_of_staging_the_daemon() {
    // Named like a library, served as an archive: validation cannot tell, apply can.
    let ctx = Ctx::new();
    let server = Server::start();
    let genesis = serve(&server, "/g", GENESIS, Fault::None);
    let archive = tar_gz(&[
        Entry::File("bin/simd", V2),
        Entry::File("lib/libwasmvm.x86_64.so", LIB),
    ]);
    let mut v2 = up("v2", serve(&server, "/v2", V2, Fault::None));
    v2.libraries.push(serve(
        &server,
        "/libwasmvm.x86_64.so",
        &archive,
        Fault::None,
    ));
    manifest(&ctx, &genesis, &[v2]);

    let (report, _) = apply(&ctx, &[], 1);
    let error = error_of(&report, "upgrades/v2/lib/libwasmvm.x86_64.so");
    assert!(
        error.contains("is an archive, and the library entry names no member in it: add path ="),
        "{error}"
    );
    assert!(
        !ctx.cosmovisor("upgrades/v2/lib/libwasmvm.x86_64.so")
            .exists()
    );
    assert_eq!(
        fs::read(ctx.cosmovisor("upgrades/v2/bin/simd")).unwrap(),
        V2
    );
}
