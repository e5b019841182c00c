//! `cvx::apply::stage_archive_tree`, the whole-archive staging `cvx run` uses for an upgrade it
//! downloads, on real files in a temp home; then the real `cvx plan` reads what it staged.

use std::fs;
use std::io::{Cursor, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use cvx::apply::{Staging, stage_archive_tree};
use cvx::tree::{InspectOptions, Layout};
use serde_json::Value;

use crate::ctx::{Ctx, platform, run, sha256};

const GENESIS: &[u8] = b"#!/bin/sh\necho v1.0.0\n";
const V2: &[u8] = b"#!/bin/sh\necho v2.0.0\n";
const LIB: &[u8] = b"\x7fELF pretend libwasmvm";
const README: &[u8] = b"release notes\n";
const HELPER: &[u8] = b"#!/bin/sh\necho helper\n";
const MIB: usize = 1 << 20;

/// One archive entry: a regular file with its mode, or a symlink.
enum Entry<'a> {
    File(&'a str, u32, &'a [u8]),
    Symlink(&'a str, &'a str),
}

fn tar_gz(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(0);
        match e {
            Entry::File(name, mode, data) => {
                h.set_mode(*mode);
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, name, *data).unwrap();
            }
            Entry::Symlink(name, target) => {
                h.set_mode(0o777);
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, name, target).unwrap();
            }
        }
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&b.into_inner().unwrap()).unwrap();
    gz.finish().unwrap()
}

fn zip(entries: &[Entry<'_>]) -> Vec<u8> {
    use zip::write::SimpleFileOptions;
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for e in entries {
        match e {
            Entry::File(name, mode, data) => {
                w.start_file(*name, opts.unix_permissions(*mode)).unwrap();
                w.write_all(data).unwrap();
            }
            Entry::Symlink(name, target) => w.add_symlink(*name, *target, opts).unwrap(),
        }
    }
    w.finish().unwrap().into_inner()
}

/// A release as chains ship it: the daemon, libwasmvm and its soname link, and extras.
fn release() -> Vec<Entry<'static>> {
    vec![
        Entry::File("bin/simd", 0o755, V2),
        Entry::File("lib/libwasmvm.x86_64.so", 0o755, LIB),
        Entry::Symlink("lib/libwasmvm.so", "libwasmvm.x86_64.so"),
        Entry::File("README.md", 0o644, README),
        Entry::File("tools/helper", 0o755, HELPER),
    ]
}

/// The archive as downloaded and verified (a copy in the test's directory), and the manifest
/// pinning it as upgrade `v2` (member `path` if given), with genesis pinned as a plain file.
fn downloaded(ctx: &Ctx, archive: &[u8], name: &str, member: Option<&str>) -> (PathBuf, String) {
    let mirror = ctx.path(&format!("mirror/{name}"));
    fs::create_dir_all(mirror.parent().unwrap()).unwrap();
    fs::write(&mirror, archive).unwrap();
    let genesis = ctx.path("mirror/simd-v1");
    fs::write(&genesis, GENESIS).unwrap();
    let p = platform();
    let path = member
        .map(|m| format!(", path = \"{m}\""))
        .unwrap_or_default();
    ctx.manifest(&format!(
        "[chain]\nid = \"testchain-1\"\ndaemon = \"simd\"\n\n\
         [genesis]\nbinary.\"{p}\" = {{ url = \"{}\", sha256 = \"{}\" }}\n\n\
         [[upgrade]]\nname = \"v2\"\n\
         binary.\"{p}\" = {{ url = \"{}\", sha256 = \"{}\"{path} }}\n",
        genesis.display(),
        sha256(GENESIS),
        mirror.display(),
        sha256(archive),
    ));
    let file = ctx.path(&format!("download-{name}"));
    fs::write(&file, archive).unwrap();
    (file, mirror.display().to_string())
}

fn staging<'a>(url: &'a str, sha: &'a str, member: Option<&'a str>, max_size: u64) -> Staging<'a> {
    Staging {
        url,
        sha256: sha,
        member,
        daemon: "simd",
        destination: "",
        mode: 0,
        max_size,
    }
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn receipt(ctx: &Ctx, rel: &str) -> Value {
    let path = ctx.cosmovisor(&format!(".cvx/receipts/{rel}.json"));
    serde_json::from_slice(&fs::read(&path).unwrap_or_else(|e| panic!("{rel}: {e}"))).unwrap()
}

/// Every file and link under `root`, recursively, sorted.
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
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn temp_files(ctx: &Ctx) -> Vec<PathBuf> {
    walk(&ctx.home)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(".cvx-")
        })
        .collect()
}

fn plan_stage(ctx: &Ctx, dir: &str) -> Value {
    let (stdout, _) = run(ctx.plan().arg("--json"), 0);
    let plan: Value = serde_json::from_str(&stdout).unwrap();
    plan["upgrades"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["dir"] == dir)
        .unwrap_or_else(|| panic!("no stage {dir} in {plan:#}"))
        .clone()
}

#[test]
fn a_whole_archive_is_staged_bin_and_lib_with_receipts_that_plan_trusts() {
    for (kind, archive) in [("tar.gz", tar_gz(&release())), ("zip", zip(&release()))] {
        let ctx = Ctx::new();
        let (file, url) = downloaded(&ctx, &archive, &format!("simd.{kind}"), None);
        let sha = sha256(&archive);
        let layout = Layout::new(&ctx.home);

        let staged = stage_archive_tree(
            &layout,
            &file,
            &staging(&url, &sha, None, 4096 * MIB as u64),
            "upgrades/v2",
        )
        .unwrap();
        assert_eq!(
            staged,
            [
                "upgrades/v2/bin/simd",
                "upgrades/v2/lib/libwasmvm.x86_64.so",
                "upgrades/v2/README.md",
                "upgrades/v2/tools/helper",
                "upgrades/v2/lib/libwasmvm.so",
            ],
            "{kind}"
        );
        for (rel, bytes, want_mode, member) in [
            ("upgrades/v2/bin/simd", V2, 0o755, "bin/simd"),
            (
                "upgrades/v2/lib/libwasmvm.x86_64.so",
                LIB,
                0o644,
                "lib/libwasmvm.x86_64.so",
            ),
            ("upgrades/v2/README.md", README, 0o644, "README.md"),
            ("upgrades/v2/tools/helper", HELPER, 0o755, "tools/helper"),
        ] {
            assert_eq!(
                fs::read(ctx.cosmovisor(rel)).unwrap(),
                bytes,
                "{kind} {rel}"
            );
            assert_eq!(
                mode(&ctx.cosmovisor(rel)),
                want_mode,
                "{kind} mode of {rel}"
            );
            let r = receipt(&ctx, rel);
            assert_eq!(r["sha256"], sha256(bytes), "{kind} {rel}");
            assert_eq!(r["size"], bytes.len(), "{kind} {rel}");
            assert_eq!(r["source_url"], url, "{kind} {rel}");
            assert_eq!(r["source_sha256"], sha, "{kind} {rel}");
            assert_eq!(r["member"], member, "{kind} {rel}");
        }
        let link = ctx.cosmovisor("upgrades/v2/lib/libwasmvm.so");
        assert_eq!(
            fs::read_link(&link).unwrap(),
            Path::new("libwasmvm.x86_64.so")
        );
        assert_eq!(fs::read(&link).unwrap(), LIB, "{kind}: the link resolves");
        assert_eq!(temp_files(&ctx), Vec::<PathBuf>::new(), "{kind}");
        let out = std::process::Command::new(ctx.cosmovisor("upgrades/v2/bin/simd"))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "v2.0.0\n");

        // The real `cvx plan` trusts the binary from its receipt: nothing to fetch, no re-hash.
        let v2 = plan_stage(&ctx, "upgrades/v2");
        assert_eq!(v2["action"], "ok", "{kind}: {v2:#}");
        assert_eq!(v2["artifacts"][0]["state"], "ok");
        assert_eq!(
            v2["artifacts"][0]["reason"],
            "staged from the pin (receipt, file unchanged)"
        );
        // And the tree vouches for the library by its receipt too.
        let tree = cvx::tree::inspect(
            &layout,
            &InspectOptions {
                verify: false,
                managed: ["upgrades/v2".to_string()].into(),
            },
        )
        .unwrap();
        let lib = &tree.stages["upgrades/v2"].files["lib/libwasmvm.x86_64.so"];
        assert!(lib.from_receipt, "{kind}: {lib:?}");
        assert_eq!(lib.sha256.as_deref(), Some(sha256(LIB).as_str()));
    }
}

#[test]
fn the_daemon_chosen_by_path_is_also_at_bin_daemon() {
    let ctx = Ctx::new();
    let archive = tar_gz(&[
        Entry::File("simd-2.0.0/bin/simd", 0o644, V2),
        Entry::File("simd-2.0.0/lib/libwasmvm.so", 0o644, LIB),
    ]);
    let member = "simd-2.0.0/bin/simd";
    let (file, url) = downloaded(&ctx, &archive, "simd.tar.gz", Some(member));
    let sha = sha256(&archive);
    let staged = stage_archive_tree(
        &Layout::new(&ctx.home),
        &file,
        &staging(&url, &sha, Some(member), 4096 * MIB as u64),
        "upgrades/v2",
    )
    .unwrap();
    assert_eq!(
        staged,
        [
            "upgrades/v2/simd-2.0.0/bin/simd",
            "upgrades/v2/bin/simd",
            "upgrades/v2/simd-2.0.0/lib/libwasmvm.so",
        ]
    );
    for rel in ["upgrades/v2/simd-2.0.0/bin/simd", "upgrades/v2/bin/simd"] {
        assert_eq!(fs::read(ctx.cosmovisor(rel)).unwrap(), V2, "{rel}");
        assert_eq!(mode(&ctx.cosmovisor(rel)), 0o755, "the daemon runs: {rel}");
        let r = receipt(&ctx, rel);
        assert_eq!(
            (&r["member"], &r["source_sha256"]),
            (&member.into(), &sha.clone().into())
        );
    }
    let v2 = plan_stage(&ctx, "upgrades/v2");
    assert_eq!(v2["artifacts"][0]["state"], "ok", "{v2:#}");
}

#[test]
fn a_decompression_bomb_is_refused_before_anything_is_written() {
    // 32 MiB of zeros beside the daemon: tens of KiB packed.
    let zeros = vec![0u8; 32 * MIB];
    let entries = [
        Entry::File("bin/simd", 0o755, V2),
        Entry::File("lib/libwasmvm.so", 0o644, &zeros),
    ];
    for (kind, archive) in [("tar.gz", tar_gz(&entries)), ("zip", zip(&entries))] {
        assert!(archive.len() < MIB / 4, "{kind}: {} bytes", archive.len());
        let ctx = Ctx::new();
        let (file, url) = downloaded(&ctx, &archive, &format!("bomb.{kind}"), None);
        let sha = sha256(&archive);
        let err = stage_archive_tree(
            &Layout::new(&ctx.home),
            &file,
            &staging(&url, &sha, None, MIB as u64),
            "upgrades/v2",
        )
        .unwrap_err();
        assert_eq!(
            err,
            format!(
                "unpacking member `lib/libwasmvm.so` of archive `{}` would write more than the \
                 size limit of 1 MiB; stopped there\nhint: if the archive is genuine (not a \
                 decompression bomb), raise the limit with --max-size (cvx apply) or CVX_MAX_SIZE (cvx run)",
                file.display()
            ),
            "{kind}"
        );
        assert_eq!(
            walk(&ctx.home),
            Vec::<PathBuf>::new(),
            "{kind}: nothing written"
        );
    }
}

#[test]
fn a_failure_midway_leaves_no_temp_file_and_keeps_what_was_installed() {
    let ctx = Ctx::new();
    let archive = tar_gz(&release());
    let (file, url) = downloaded(&ctx, &archive, "simd.tar.gz", None);
    let sha = sha256(&archive);
    // A file where the archive needs the directory `tools/`.
    ctx.stage("upgrades/v2/tools", b"in the way");
    let err = stage_archive_tree(
        &Layout::new(&ctx.home),
        &file,
        &staging(&url, &sha, None, 4096 * MIB as u64),
        "upgrades/v2",
    )
    .unwrap_err();
    assert!(
        err.starts_with(&format!(
            "cannot create directory {}: ",
            ctx.cosmovisor("upgrades/v2/tools").display()
        )),
        "{err}"
    );
    assert_eq!(temp_files(&ctx), Vec::<PathBuf>::new());
    // Installed before the failure: verified bytes with their receipts.
    for (rel, bytes) in [
        ("upgrades/v2/bin/simd", V2),
        ("upgrades/v2/lib/libwasmvm.x86_64.so", LIB),
        ("upgrades/v2/README.md", README),
    ] {
        assert_eq!(fs::read(ctx.cosmovisor(rel)).unwrap(), bytes, "{rel}");
        assert_eq!(receipt(&ctx, rel)["sha256"], sha256(bytes), "{rel}");
    }
    // Links come last: not made.
    assert!(
        fs::symlink_metadata(ctx.cosmovisor("upgrades/v2/lib/libwasmvm.so")).is_err(),
        "the link was made after the failure"
    );
}

#[test]
fn a_plain_binary_is_staged_as_the_daemon() {
    let ctx = Ctx::new();
    let (file, url) = downloaded(&ctx, V2, "simd-linux-amd64", None);
    let sha = sha256(V2);
    let staged = stage_archive_tree(
        &Layout::new(&ctx.home),
        &file,
        &staging(&url, &sha, None, 4096 * MIB as u64),
        "upgrades/v2",
    )
    .unwrap();
    assert_eq!(staged, ["upgrades/v2/bin/simd"]);
    assert_eq!(
        fs::read(ctx.cosmovisor("upgrades/v2/bin/simd")).unwrap(),
        V2
    );
    assert_eq!(mode(&ctx.cosmovisor("upgrades/v2/bin/simd")), 0o755);
    assert_eq!(receipt(&ctx, "upgrades/v2/bin/simd")["source_sha256"], sha);
    let v2 = plan_stage(&ctx, "upgrades/v2");
    assert_eq!(v2["artifacts"][0]["state"], "ok", "{v2:#}");
}
