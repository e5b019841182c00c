//! Unpacking tested on archives built here, in every format: member rules, safety, size caps.

use super::*;
use std::io::Cursor;

#[test]
fn the_suffix_table_covers_the_manifests_archive_suffixes() {
    let suffixes: Vec<&str> = SUFFIXES.iter().map(|(s, _)| *s).collect();
    assert_eq!(suffixes, crate::manifest::ARCHIVE_SUFFIXES);
}

// ---- archive builders -------------------------------------------------------------------

#[derive(Clone, Copy)]
enum E<'a> {
    /// A regular file with mode 0755.
    File(&'a str, &'a [u8]),
    /// A regular file with mode 0644.
    Plain(&'a str, &'a [u8]),
    Dir(&'a str),
    Symlink(&'a str, &'a str),
    HardLink(&'a str, &'a str),
    /// A regular file whose name bytes are written into the header as is (the tar crate's
    /// `set_path` refuses `..` and absolute paths, which is what these tests need to craft).
    RawFile(&'a str, &'a [u8]),
    /// A regular file named by a GNU long-name entry (`L`) before it, as is.
    GnuLongName(&'a str, &'a [u8]),
    /// A regular file named by a PAX `path` record before it, as is.
    PaxPath(&'a str, &'a [u8]),
}

fn tar(entries: &[E<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o755);
        h.set_mtime(0);
        match e {
            E::File(name, data) | E::Plain(name, data) => {
                if matches!(e, E::Plain(..)) {
                    h.set_mode(0o644);
                }
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, name, *data).unwrap();
            }
            E::Dir(name) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                b.append_data(&mut h, name, &[][..]).unwrap();
            }
            E::Symlink(name, target) | E::HardLink(name, target) => {
                h.set_entry_type(if matches!(e, E::Symlink(..)) {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                });
                h.set_size(0);
                h.set_link_name_literal(target).unwrap();
                h.set_path(name).unwrap();
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            }
            E::GnuLongName(name, data) | E::PaxPath(name, data) => {
                let (mut ext, ty, body) = match e {
                    E::GnuLongName(..) => (
                        tar::Header::new_gnu(),
                        tar::EntryType::GNULongName,
                        [name.as_bytes(), b"\0"].concat(),
                    ),
                    _ => {
                        let record = format!(" path={name}\n");
                        // The length counts its own digits.
                        let mut len = record.len();
                        while len.to_string().len() + record.len() != len {
                            len = len.to_string().len() + record.len();
                        }
                        let record = format!("{len}{record}");
                        assert_eq!(record.len(), len, "pax record length");
                        (
                            tar::Header::new_ustar(),
                            tar::EntryType::XHeader,
                            record.into_bytes(),
                        )
                    }
                };
                ext.set_entry_type(ty);
                ext.set_size(body.len() as u64);
                ext.set_path("ext").unwrap();
                ext.set_cksum();
                b.append(&ext, &body[..]).unwrap();
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(data.len() as u64);
                h.set_path("placeholder").unwrap();
                h.set_cksum();
                b.append(&h, *data).unwrap();
            }
            E::RawFile(name, data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(data.len() as u64);
                let field = &mut h.as_old_mut().name;
                field.fill(0);
                field[..name.len()].copy_from_slice(name.as_bytes());
                h.set_cksum();
                b.append(&h, *data).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

fn gz(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn xz(data: &[u8]) -> Vec<u8> {
    let mut enc =
        lzma_rust2::XzWriter::new(Vec::new(), lzma_rust2::XzOptions::with_preset(1)).unwrap();
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn zst(data: &[u8]) -> Vec<u8> {
    ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
}

fn compress(kind: ArchiveKind, tar: &[u8]) -> Vec<u8> {
    match kind {
        ArchiveKind::TarGz => gz(tar),
        ArchiveKind::TarXz => xz(tar),
        ArchiveKind::TarZst => zst(tar),
        ArchiveKind::Zip => unreachable!("zip is built by `zip_archive()`"),
    }
}

fn zip_archive(entries: &[E<'_>]) -> Vec<u8> {
    use zip::write::SimpleFileOptions;
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts = SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .unix_permissions(0o755);
    for e in entries {
        match e {
            E::File(name, data) | E::RawFile(name, data) => {
                w.start_file(*name, opts).unwrap();
                w.write_all(data).unwrap();
            }
            E::Plain(name, data) => {
                w.start_file(*name, opts.unix_permissions(0o644)).unwrap();
                w.write_all(data).unwrap();
            }
            E::Dir(name) => w.add_directory(*name, opts).unwrap(),
            E::Symlink(name, target) => w.add_symlink(*name, *target, opts).unwrap(),
            E::HardLink(..) | E::GnuLongName(..) | E::PaxPath(..) => {
                unreachable!("tar only")
            }
        }
    }
    w.finish().unwrap().into_inner()
}

/// No size limit worth the name, for the tests about something else.
const NO_CAP: u64 = u64::MAX;

const TAR_KINDS: [ArchiveKind; 3] = [ArchiveKind::TarGz, ArchiveKind::TarXz, ArchiveKind::TarZst];
const ALL_KINDS: [ArchiveKind; 4] = [
    ArchiveKind::TarGz,
    ArchiveKind::TarXz,
    ArchiveKind::TarZst,
    ArchiveKind::Zip,
];

fn build(kind: ArchiveKind, entries: &[E<'_>]) -> Vec<u8> {
    match kind {
        ArchiveKind::Zip => zip_archive(entries),
        _ => compress(kind, &tar(entries)),
    }
}

struct Run {
    _dir: tempfile::TempDir,
    result: Result<Extracted, UnpackError>,
    out: Vec<u8>,
}

fn run_bytes(kind: ArchiveKind, bytes: &[u8], path: Option<&str>) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("artifact");
    std::fs::write(&archive, bytes).unwrap();
    let out_path = dir.path().join("out.tmp");
    let mut out = File::create(&out_path).unwrap();
    let result = extract(&archive, kind, path, "osmosisd", NO_CAP, &mut out);
    drop(out);
    let out = std::fs::read(&out_path).unwrap();
    Run {
        _dir: dir,
        result,
        out,
    }
}

fn run(kind: ArchiveKind, entries: &[E<'_>], path: Option<&str>) -> Run {
    run_bytes(kind, &build(kind, entries), path)
}

fn sha(bytes: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(bytes);
    h.finish()
}

/// Extraction succeeded with `member`, and the bytes and their digest are `want`'s.
fn assert_extracted(r: &Run, member: &str, want: &[u8], what: &str) {
    let got = r.result.as_ref().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(got.member, member, "{what}");
    assert_eq!(got.size, want.len() as u64, "{what}");
    assert_eq!(got.sha256, sha(want), "{what}");
    assert_eq!(r.out, want, "{what}");
}

/// Extraction failed and left `out` empty.
fn err(r: Run, what: &str) -> UnpackError {
    assert!(r.out.is_empty(), "{what}: out not empty after an error");
    match r.result {
        Ok(x) => panic!("{what}: expected an error, extracted {x:?}"),
        Err(e) => e,
    }
}

// ---- detect --------------------------------------------------------------------------------

#[test]
fn detects_each_format_by_content_despite_a_misleading_name() {
    let dir = tempfile::tempdir().unwrap();
    for kind in ALL_KINDS {
        let file = dir.path().join("x");
        std::fs::write(&file, build(kind, &[E::File("osmosisd", b"bin")])).unwrap();
        for hint in [
            "osmosisd",
            "https://h/osmosisd.tar.gz",
            "a.zip",
            "b.tar.zst",
        ] {
            assert_eq!(
                detect(&file, hint).unwrap(),
                Some(kind),
                "{kind} named {hint}"
            );
        }
    }
}

#[test]
fn detects_by_name_when_content_has_no_magic() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("x");
    std::fs::write(&file, b"\x7fELF not an archive").unwrap();
    let cases = [
        (
            "https://h/p/osmosisd-26.0.0-linux-amd64.tar.gz",
            Some(ArchiveKind::TarGz),
        ),
        ("o.TGZ", Some(ArchiveKind::TarGz)),
        ("o.tar.xz", Some(ArchiveKind::TarXz)),
        ("o.txz", Some(ArchiveKind::TarXz)),
        ("o.tar.zst", Some(ArchiveKind::TarZst)),
        ("o.tzst", Some(ArchiveKind::TarZst)),
        ("https://h/o.zip?raw=1#x", Some(ArchiveKind::Zip)),
        ("https://h/osmosisd-26.0.0-linux-amd64", None),
        ("o.gz", None),
        ("", None),
    ];
    for (hint, want) in cases {
        assert_eq!(detect(&file, hint).unwrap(), want, "{hint}");
    }
    // Shorter than any magic, and empty.
    std::fs::write(&file, b"\x1f").unwrap();
    assert_eq!(detect(&file, "osmosisd").unwrap(), None);
    std::fs::write(&file, b"").unwrap();
    assert_eq!(detect(&file, "o.zip").unwrap(), Some(ArchiveKind::Zip));
    assert!(detect(&dir.path().join("missing"), "o.zip").is_err());
}

// ---- member rules --------------------------------------------------------------------------

#[test]
fn path_picks_that_member_with_or_without_dot_slash() {
    let layout = [
        E::Dir("osmosisd-26.0.0/"),
        E::File("./osmosisd-26.0.0/bin/osmosisd", b"the daemon"),
        E::File("osmosisd-26.0.0/lib/libwasmvm.so", b"lib"),
        E::File("osmosisd", b"decoy"),
    ];
    for kind in ALL_KINDS {
        for path in [
            "osmosisd-26.0.0/bin/osmosisd",
            "./osmosisd-26.0.0/bin/osmosisd",
        ] {
            let r = run(kind, &layout, Some(path));
            assert_extracted(
                &r,
                "osmosisd-26.0.0/bin/osmosisd",
                b"the daemon",
                &format!("{kind} {path}"),
            );
        }
        let e = err(run(kind, &layout, Some("bin/osmosisd")), "missing path");
        assert!(
            matches!(&e, UnpackError::NoSuchMember { wanted, .. } if wanted == "bin/osmosisd"),
            "{kind}: {e:?}"
        );
        let msg = e.to_string();
        assert!(msg.contains("no member `bin/osmosisd` in archive"), "{msg}");
        assert!(msg.contains("osmosisd-26.0.0/lib/libwasmvm.so"), "{msg}");
        assert!(msg.contains("set `path`"), "{msg}");
        let e = err(run(kind, &layout, Some("osmosisd-26.0.0")), "dir as path");
        assert!(
            matches!(
                e,
                UnpackError::NotRegular {
                    kind: EntryKind::Directory,
                    ..
                }
            ),
            "{kind}: {e:?}"
        );
    }
}

#[test]
fn the_only_regular_file_is_chosen_whatever_its_name() {
    for kind in ALL_KINDS {
        let r = run(
            kind,
            &[
                E::Dir("dist/"),
                E::File("dist/osmosisd-26.0.0-linux-amd64", b"only"),
            ],
            None,
        );
        assert_extracted(
            &r,
            "dist/osmosisd-26.0.0-linux-amd64",
            b"only",
            kind.as_str(),
        );
    }
}

#[test]
fn bin_daemon_then_daemon() {
    for kind in ALL_KINDS {
        // bin/<daemon> wins over <daemon>, whichever comes first.
        for layout in [
            [
                E::File("osmosisd", b"top"),
                E::File("README.md", b"r"),
                E::File("./bin/osmosisd", b"bin"),
            ],
            [
                E::File("bin/osmosisd", b"bin"),
                E::File("osmosisd", b"top"),
                E::File("README.md", b"r"),
            ],
        ] {
            let r = run(kind, &layout, None);
            assert_extracted(&r, "bin/osmosisd", b"bin", kind.as_str());
        }
        // Then <daemon>, even after other files were seen.
        let r = run(
            kind,
            &[
                E::File("README.md", b"r"),
                E::File("LICENSE", b"l"),
                E::File("./osmosisd", b"top"),
            ],
            None,
        );
        assert_extracted(&r, "osmosisd", b"top", kind.as_str());
        // A single top-level directory is NOT stripped.
        let e = err(
            run(
                kind,
                &[
                    E::File("osmosisd-26/bin/osmosisd", b"x"),
                    E::File("osmosisd-26/README", b"r"),
                ],
                None,
            ),
            "top-level dir",
        );
        assert!(matches!(e, UnpackError::Ambiguous { .. }), "{kind}: {e:?}");
    }
}

#[test]
fn ambiguous_archive_lists_its_members() {
    for kind in ALL_KINDS {
        let e = err(
            run(
                kind,
                &[
                    E::File("a", b"1"),
                    E::Dir("d/"),
                    E::File("d/b", b"2"),
                    E::File("c", b"3"),
                ],
                None,
            ),
            "ambiguous",
        );
        let UnpackError::Ambiguous { daemon, members } = &e else {
            panic!("{kind}: {e:?}");
        };
        assert_eq!(daemon, "osmosisd");
        assert_eq!(members, &["a", "d/b", "c"]);
        assert_eq!(
            e.to_string(),
            "archive holds 3 regular files and none is `bin/osmosisd` or `osmosisd`; \
             set `path` in the manifest to the one to install: a, d/b, c"
        );
    }
}

#[test]
fn long_member_lists_are_cut_in_the_message_only() {
    let names: Vec<String> = (0..30).map(|i| format!("f{i:02}")).collect();
    let layout: Vec<E<'_>> = names.iter().map(|n| E::File(n, b"x")).collect();
    let e = err(run(ArchiveKind::TarGz, &layout, None), "many");
    let UnpackError::Ambiguous { members, .. } = &e else {
        panic!("{e:?}");
    };
    assert_eq!(members.len(), 30);
    let msg = e.to_string();
    assert!(msg.contains("f19, … and 10 more"), "{msg}");
    assert!(!msg.contains("f20"), "{msg}");
}

#[test]
fn empty_archive_and_duplicates() {
    for kind in ALL_KINDS {
        let e = err(run(kind, &[E::Dir("bin/")], None), "empty");
        assert!(matches!(e, UnpackError::Empty), "{kind}: {e:?}");
    }
    // Zip refuses duplicate names when writing; tar can hold them.
    for kind in TAR_KINDS {
        let layout = [
            E::File("bin/osmosisd", b"one"),
            E::File("./bin/osmosisd", b"two"),
            E::File("x", b""),
        ];
        let e = err(run(kind, &layout, None), "duplicate");
        assert!(
            matches!(&e, UnpackError::Duplicate { member, count: 2 } if member == "bin/osmosisd"),
            "{kind}: {e:?}"
        );
        let e = err(run(kind, &layout, Some("bin/osmosisd")), "duplicate path");
        assert!(
            matches!(e, UnpackError::Duplicate { count: 2, .. }),
            "{kind}: {e:?}"
        );
    }
}

#[test]
fn a_symlink_is_never_the_chosen_member() {
    for kind in ALL_KINDS {
        let layout = [
            E::File("osmosisd-26", b"real"),
            E::File("README", b"r"),
            E::Symlink("bin/osmosisd", "../osmosisd-26"),
        ];
        let e = err(run(kind, &layout, None), "symlink bin/<daemon>");
        assert!(
            matches!(&e, UnpackError::NotRegular { member, kind: EntryKind::Symlink } if member == "bin/osmosisd"),
            "{kind}: {e:?}"
        );
        assert_eq!(
            e.to_string(),
            "member `bin/osmosisd` is a symlink, not a regular file"
        );
        let e = err(run(kind, &layout, Some("bin/osmosisd")), "symlink path");
        assert!(
            matches!(
                e,
                UnpackError::NotRegular {
                    kind: EntryKind::Symlink,
                    ..
                }
            ),
            "{kind}: {e:?}"
        );
        // An inside symlink next to a single regular file is fine: rule 1 picks the file.
        let r = run(
            kind,
            &[
                E::File("osmosisd-26", b"real"),
                E::Symlink("osmosisd", "osmosisd-26"),
            ],
            None,
        );
        assert_extracted(&r, "osmosisd-26", b"real", kind.as_str());
    }
    for kind in TAR_KINDS {
        let layout = [
            E::File("osmosisd-26", b"real"),
            E::File("README", b"r"),
            E::HardLink("osmosisd", "osmosisd-26"),
        ];
        let e = err(run(kind, &layout, None), "hard link <daemon>");
        assert!(
            matches!(
                e,
                UnpackError::NotRegular {
                    kind: EntryKind::HardLink,
                    ..
                }
            ),
            "{kind}: {e:?}"
        );
    }
}

// ---- hostile archives ----------------------------------------------------------------------

fn assert_refused(e: &UnpackError, entry: &str, reason: &UnsafeReason, what: &str) {
    match e {
        UnpackError::UnsafeEntry {
            entry: got,
            reason: why,
        } => {
            assert_eq!(got, entry, "{what}");
            assert_eq!(why, reason, "{what}");
        }
        other => panic!("{what}: expected UnsafeEntry, got {other:?}"),
    }
}

#[test]
fn tar_escapes_refuse_the_whole_archive() {
    let good = E::File("bin/osmosisd", b"daemon");
    let cases: Vec<(E<'_>, &str, UnsafeReason)> = vec![
        (
            E::RawFile("../../etc/passwd", b"x"),
            "../../etc/passwd",
            UnsafeReason::ParentDir,
        ),
        (
            E::RawFile("bin/../../x", b"x"),
            "bin/../../x",
            UnsafeReason::ParentDir,
        ),
        (
            E::RawFile("a/../b", b"x"),
            "a/../b",
            UnsafeReason::ParentDir,
        ),
        (E::RawFile("..\\x", b"x"), "..\\x", UnsafeReason::ParentDir),
        (
            E::RawFile("/etc/passwd", b"x"),
            "/etc/passwd",
            UnsafeReason::Absolute,
        ),
        (
            E::Symlink("lib/evil", "../../x"),
            "lib/evil",
            UnsafeReason::SymlinkOut {
                target: "../../x".into(),
            },
        ),
        (
            E::Symlink("evil", "/etc/passwd"),
            "evil",
            UnsafeReason::SymlinkOut {
                target: "/etc/passwd".into(),
            },
        ),
        (
            E::Symlink("evil", ".."),
            "evil",
            UnsafeReason::SymlinkOut {
                target: "..".into(),
            },
        ),
        (
            E::HardLink("evil", "../x"),
            "evil",
            UnsafeReason::HardLinkOut {
                target: "../x".into(),
            },
        ),
        (
            E::HardLink("evil", "/etc/shadow"),
            "evil",
            UnsafeReason::HardLinkOut {
                target: "/etc/shadow".into(),
            },
        ),
        // The classic bypasses: a name that only the extension entry carries.
        (
            E::GnuLongName(LONG_EVIL, b"x"),
            LONG_EVIL,
            UnsafeReason::ParentDir,
        ),
        (
            E::PaxPath("../evil", b"x"),
            "../evil",
            UnsafeReason::ParentDir,
        ),
        (
            E::PaxPath("/etc/cron.d/x", b"x"),
            "/etc/cron.d/x",
            UnsafeReason::Absolute,
        ),
    ];
    for kind in TAR_KINDS {
        for (bad, entry, reason) in &cases {
            // Before and after the member that would be chosen: nothing is left in `out`.
            for layout in [[bad, &good], [&good, bad]] {
                let entries: Vec<E<'_>> = layout.iter().map(|e| **e).collect();
                for path in [None, Some("bin/osmosisd")] {
                    let e = err(run(kind, &entries, path), entry);
                    assert_refused(&e, entry, reason, &format!("{kind} {entry} {path:?}"));
                }
            }
        }
    }
    let e = err(
        run(
            ArchiveKind::TarGz,
            &[E::RawFile("../../etc/passwd", b"x")],
            None,
        ),
        "msg",
    );
    assert_eq!(
        e.to_string(),
        "archive entry `../../etc/passwd` escapes the archive; refusing the whole archive"
    );
}

const LONG_EVIL: &str = "a/../../../../../../../../../../../../../../../../../../../../../../\
                         ../../../../../../../../../../../../../../../../../../../etc/evil";

#[test]
fn names_from_extension_entries_and_dot_slash_are_honoured() {
    assert!(LONG_EVIL.len() > 100);
    let long = format!("{}/bin/osmosisd", "d".repeat(120));
    for kind in TAR_KINDS {
        let r = run(
            kind,
            &[E::File("README", b"r"), E::GnuLongName(&long, b"long")],
            Some(&long),
        );
        assert_extracted(&r, &long, b"long", kind.as_str());
        let r = run(
            kind,
            &[E::File("README", b"r"), E::PaxPath("./osmosisd", b"pax")],
            None,
        );
        assert_extracted(&r, "osmosisd", b"pax", kind.as_str());
        let r = run(
            kind,
            &[
                E::File("README", b"r"),
                E::RawFile("./bin/osmosisd", b"raw"),
            ],
            Some("./bin/osmosisd"),
        );
        assert_extracted(&r, "bin/osmosisd", b"raw", kind.as_str());
    }
}

#[test]
fn links_that_stay_inside_are_accepted() {
    for kind in TAR_KINDS {
        let r = run(
            kind,
            &[
                E::File("osmosisd-26/bin/osmosisd", b"d"),
                E::Symlink("osmosisd-26/lib/up", "../bin/osmosisd"),
                E::Symlink("osmosisd-26/self", "."),
                E::HardLink("osmosisd-26/bin/copy", "osmosisd-26/bin/osmosisd"),
            ],
            Some("osmosisd-26/bin/osmosisd"),
        );
        assert_extracted(&r, "osmosisd-26/bin/osmosisd", b"d", kind.as_str());
    }
}

/// Replace `from` by `to` (same length) everywhere in a built archive: zip writers refuse to
/// write hostile names, and the names are not covered by any checksum.
fn patch(mut bytes: Vec<u8>, from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let mut hits = 0;
    let mut i = 0;
    while i + from.len() <= bytes.len() {
        if &bytes[i..i + from.len()] == from {
            bytes[i..i + from.len()].copy_from_slice(to);
            hits += 1;
            i += from.len();
        } else {
            i += 1;
        }
    }
    assert!(
        hits >= 2,
        "expected the name in the local and central headers"
    );
    bytes
}

#[test]
fn zip_escapes_refuse_the_whole_archive() {
    let zip_with =
        |name: &str| zip_archive(&[E::File("bin/osmosisd", b"daemon"), E::File(name, b"x")]);
    let cases = [
        ("xx/xx/evil", "../../evil", UnsafeReason::ParentDir),
        ("xx\\evil", "..\\evil", UnsafeReason::ParentDir),
        ("xetc/passwd", "/etc/passwd", UnsafeReason::Absolute),
        ("xxWindows", "C:Windows", UnsafeReason::Absolute),
    ];
    for (placeholder, hostile, reason) in cases {
        let bytes = patch(
            zip_with(placeholder),
            placeholder.as_bytes(),
            hostile.as_bytes(),
        );
        for path in [None, Some("bin/osmosisd")] {
            let e = err(run_bytes(ArchiveKind::Zip, &bytes, path), hostile);
            assert_refused(&e, hostile, &reason, hostile);
        }
    }
    for (target, reason) in [
        (
            "../../x",
            UnsafeReason::SymlinkOut {
                target: "../../x".into(),
            },
        ),
        (
            "/etc/passwd",
            UnsafeReason::SymlinkOut {
                target: "/etc/passwd".into(),
            },
        ),
    ] {
        let e = err(
            run(
                ArchiveKind::Zip,
                &[
                    E::File("bin/osmosisd", b"d"),
                    E::Symlink("lib/evil", target),
                ],
                None,
            ),
            target,
        );
        assert_refused(&e, "lib/evil", &reason, target);
    }
}

#[test]
fn extracted_digest_is_that_of_the_original_bytes() {
    // Big enough to span several read buffers and compressed blocks; not compressible to nothing.
    let mut body = Vec::with_capacity(3 * BUF + 17);
    let mut x: u32 = 0x1234_5678;
    while body.len() < 3 * BUF + 17 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        body.extend_from_slice(&x.to_le_bytes()[..(x % 4) as usize]);
        body.extend_from_slice(b"osmosis");
    }
    for kind in ALL_KINDS {
        let r = run(
            kind,
            &[E::File("README", b"r"), E::File("bin/osmosisd", &body)],
            None,
        );
        assert_extracted(&r, "bin/osmosisd", &body, kind.as_str());
        assert_eq!(
            r.result.unwrap().sha256,
            crate::hash::sha256_reader(&body[..]).unwrap().0
        );
    }
}

#[test]
fn a_worse_candidate_written_first_is_replaced() {
    // The first regular file is written speculatively, then replaced by bin/<daemon>.
    for kind in TAR_KINDS {
        let big = vec![7u8; BUF + 1];
        let r = run(
            kind,
            &[
                E::File("lib/libwasmvm.so", &big),
                E::File("bin/osmosisd", b"short"),
            ],
            None,
        );
        assert_extracted(&r, "bin/osmosisd", b"short", kind.as_str());
    }
}

#[test]
fn the_second_pass_extracts_by_ordinal() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("a.tar.gz");
    std::fs::write(
        &archive,
        gz(&tar(&[
            E::File("a", b"first"),
            E::Dir("d/"),
            E::File("d/b", b"second"),
        ])),
    )
    .unwrap();
    let ctx = Ctx {
        archive: &archive,
        kind: ArchiveKind::TarGz,
        file_error: Rc::default(),
    };
    let mut out = tempfile::tempfile().unwrap();
    out.write_all(b"stale bytes from before").unwrap();
    let x = second_pass(&ctx, Codec::Gz, 2, NO_CAP, &mut out).unwrap();
    assert_eq!((x.member.as_str(), x.size), ("d/b", 6));
    let mut got = Vec::new();
    out.seek(SeekFrom::Start(0)).unwrap();
    out.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"second");
    assert!(matches!(
        second_pass(&ctx, Codec::Gz, 9, NO_CAP, &mut out),
        Err(UnpackError::Corrupt { .. })
    ));
}

// ---- corrupt input -------------------------------------------------------------------------

#[test]
fn corrupt_gzip_is_an_error_not_a_panic() {
    let good = build(
        ArchiveKind::TarGz,
        &[E::File("bin/osmosisd", &[0x5a; 5000])],
    );
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0xff;
    let mut bad_crc = good.clone();
    let n = bad_crc.len();
    bad_crc[n - 8] ^= 0x01; // the CRC32 in the trailer
    for (what, bytes) in [
        ("flipped", flipped),
        ("bad crc", bad_crc),
        ("truncated", good[..good.len() / 2].to_vec()),
        ("header only", good[..10].to_vec()),
        ("garbage", [&[0x1f, 0x8b][..], &[0xff; 64][..]].concat()),
    ] {
        let e = err(run_bytes(ArchiveKind::TarGz, &bytes, None), what);
        assert!(
            matches!(
                e,
                UnpackError::Corrupt {
                    kind: ArchiveKind::TarGz,
                    ..
                }
            ),
            "{what}: {e:?}"
        );
    }
}

#[test]
fn a_compressed_single_file_is_not_a_tar() {
    let e = err(
        run_bytes(ArchiveKind::TarGz, &gz(&[0x7f; 2000]), None),
        "gz binary",
    );
    let msg = e.to_string();
    assert!(matches!(e, UnpackError::Corrupt { .. }), "{e:?}");
    assert!(msg.contains("not a tar archive"), "{msg}");
}

#[test]
fn corrupt_or_truncated_archives_never_panic() {
    let body: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
    for kind in ALL_KINDS {
        let good = build(
            kind,
            &[E::File("README", b"r"), E::File("bin/osmosisd", &body)],
        );
        let step = (good.len() / 40).max(1);
        for at in (0..good.len()).step_by(step) {
            let mut flipped = good.clone();
            flipped[at] ^= 0x55;
            for bytes in [flipped, good[..at].to_vec()] {
                let r = run_bytes(kind, &bytes, None);
                // Either refused, or (a flip in a field nothing checks) the right bytes.
                if let Ok(x) = &r.result {
                    assert_eq!(x.sha256, sha(&body), "{kind} at {at}: wrong bytes accepted");
                }
            }
        }
    }
}

#[test]
fn zstd_multiple_frames_skippable_frames_and_checksums() {
    let t = tar(&[
        E::File("README", b"r"),
        E::File("bin/osmosisd", &[0x42; 3000]),
    ]);
    let (a, b) = t.split_at(700);
    let skippable = [&[0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0][..], b"abc"].concat();
    let stream = [zst(a), skippable, zst(b)].concat();
    let r = run_bytes(ArchiveKind::TarZst, &stream, None);
    assert_extracted(&r, "bin/osmosisd", &[0x42; 3000], "multi-frame");

    let mut bad = zst(&t);
    let n = bad.len();
    bad[n - 1] ^= 0x01; // the frame's content checksum
    let e = err(run_bytes(ArchiveKind::TarZst, &bad, None), "checksum");
    assert!(e.to_string().contains("checksum"), "{e}");
}

#[test]
fn a_missing_archive_is_a_read_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut out = tempfile::tempfile().unwrap();
    for kind in ALL_KINDS {
        let e = extract(
            &dir.path().join("gone"),
            kind,
            None,
            "osmosisd",
            NO_CAP,
            &mut out,
        )
        .unwrap_err();
        assert!(
            matches!(&e, UnpackError::Read { source, .. } if source.kind() == io::ErrorKind::NotFound),
            "{e:?}"
        );
        assert!(e.to_string().starts_with("cannot read archive `"), "{e}");
    }
}

#[test]
fn a_failing_file_read_is_a_read_error_not_corruption() {
    // A directory opens on Linux but every read fails with EISDIR.
    let dir = tempfile::tempdir().unwrap();
    let mut out = tempfile::tempfile().unwrap();
    for kind in ALL_KINDS {
        let e = extract(dir.path(), kind, None, "osmosisd", NO_CAP, &mut out).unwrap_err();
        assert!(matches!(e, UnpackError::Read { .. }), "{kind}: {e:?}");
    }
}

// ---- the size cap --------------------------------------------------------------------------

const MIB: u64 = 1 << 20;

/// A reader that counts what was taken from it.
struct Counted<R> {
    inner: R,
    read: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

fn test_ctx(archive: &Path) -> Ctx<'_> {
    Ctx {
        archive,
        kind: ArchiveKind::TarGz,
        file_error: Rc::default(),
    }
}

#[test]
fn the_copy_stops_at_the_cap_and_leaves_nothing() {
    // An endless member: without the cap this would fill the disk.
    let ctx = test_ctx(Path::new("bomb.tar.gz"));
    let mut data = Counted {
        inner: io::repeat(0),
        read: 0,
    };
    let mut out = tempfile::tempfile().unwrap();
    let mut cap = Cap::new(MIB);
    let e = copy_member(&ctx, "bin/osmosisd", &mut data, &mut out, &mut cap).unwrap_err();
    assert!(
        matches!(&e, UnpackError::TooLarge { member, max, .. } if member == "bin/osmosisd" && *max == MIB),
        "{e:?}"
    );
    assert!(data.read <= MIB + BUF as u64, "read {} bytes", data.read);
    assert_eq!(out.metadata().unwrap().len(), 0, "out not emptied");
    assert_eq!(cap.used, 0);
}

#[test]
fn one_cap_counts_every_file_of_an_unpack() {
    let ctx = test_ctx(Path::new("a.zip"));
    let mut out = tempfile::tempfile().unwrap();
    let mut cap = Cap::new(MIB);
    let half = vec![1u8; (MIB / 2) as usize];
    let x = copy_member(&ctx, "lib/a.so", &mut &half[..], &mut out, &mut cap).unwrap();
    assert_eq!((x.size, cap.used), (MIB / 2, MIB / 2));
    let x = copy_member(&ctx, "lib/b.so", &mut &half[..], &mut out, &mut cap).unwrap();
    assert_eq!(
        (x.size, cap.used),
        (MIB / 2, MIB),
        "exactly the cap is allowed"
    );
    let e = copy_member(&ctx, "lib/c.so", &mut &[1u8][..], &mut out, &mut cap).unwrap_err();
    assert!(
        matches!(&e, UnpackError::TooLarge { member, .. } if member == "lib/c.so"),
        "{e:?}"
    );
}

#[test]
fn a_member_inflating_past_the_cap_is_refused_in_every_format() {
    let zeros = vec![0u8; 3 * MIB as usize];
    let exact = vec![7u8; MIB as usize];
    for kind in ALL_KINDS {
        let bytes = build(
            kind,
            &[E::File("README", b"r"), E::File("bin/osmosisd", &zeros)],
        );
        assert!(bytes.len() < zeros.len() / 10, "{kind}: not a bomb");
        for path in [None, Some("bin/osmosisd")] {
            let dir = tempfile::tempdir().unwrap();
            let archive = dir.path().join("bomb");
            std::fs::write(&archive, &bytes).unwrap();
            let mut out = tempfile::tempfile().unwrap();
            let e = extract(&archive, kind, path, "osmosisd", MIB, &mut out).unwrap_err();
            assert_eq!(out.metadata().unwrap().len(), 0, "{kind}: out not emptied");
            assert!(
                matches!(&e, UnpackError::TooLarge { member, max: MIB, .. } if member == "bin/osmosisd"),
                "{kind}: {e:?}"
            );
            assert_eq!(
                e.to_string(),
                format!(
                    "unpacking member `bin/osmosisd` of archive `{}` would write more than \
                     the size limit of 1 MiB; stopped there\nhint: if the archive is genuine \
                     (not a decompression bomb), raise the limit with --max-size (cvx apply) or \
                     CVX_MAX_SIZE (cvx run)",
                    archive.display()
                )
            );
        }
        // A member of exactly the cap is fine.
        let r = run_bytes(
            kind,
            &build(kind, &[E::File("bin/osmosisd", &exact)]),
            Some("bin/osmosisd"),
        );
        let got = r.result.as_ref().unwrap();
        assert_eq!(got.size, MIB);
    }
}

#[test]
fn a_candidate_over_the_cap_that_is_not_chosen_is_no_error() {
    let big = vec![0u8; 2 * MIB as usize];
    for kind in TAR_KINDS {
        let archive = build(
            kind,
            &[E::File("README", &big), E::File("bin/osmosisd", b"daemon")],
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        std::fs::write(&path, &archive).unwrap();
        let mut out = tempfile::tempfile().unwrap();
        let x = extract(&path, kind, None, "osmosisd", MIB, &mut out).unwrap();
        assert_eq!((x.member.as_str(), x.size), ("bin/osmosisd", 6), "{kind}");
    }
}

#[test]
fn sizes_show_in_mib_when_they_are_whole() {
    assert_eq!(show_size(4096 * MIB), "4096 MiB");
    assert_eq!(show_size(MIB), "1 MiB");
    assert_eq!(show_size(4_999), "4999 bytes");
}

// ---- the whole archive ---------------------------------------------------------------------

/// What `unpack_tree` handed over, in order: files with their bytes, and symlinks.
#[derive(Debug, PartialEq, Eq)]
enum Got {
    /// name, executable, daemon, bytes
    File(String, bool, bool, Vec<u8>),
    Link(String, String),
}

fn tree_run(
    kind: ArchiveKind,
    bytes: &[u8],
    path: Option<&str>,
    max_size: u64,
) -> (Vec<Got>, Result<String, UnpackError>) {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("artifact");
    std::fs::write(&archive, bytes).unwrap();
    let mut got = Vec::new();
    let result = unpack_tree(&archive, kind, path, "osmosisd", max_size, |entry| {
        match entry {
            TreeEntry::File(m) => {
                let (name, executable, daemon) = (m.name.to_owned(), m.executable, m.daemon);
                let mut out = tempfile::tempfile().unwrap();
                let x = m.copy_to(&mut out)?;
                let mut bytes = Vec::new();
                out.seek(SeekFrom::Start(0)).unwrap();
                out.read_to_end(&mut bytes).unwrap();
                assert_eq!((x.member.as_str(), x.sha256), (name.as_str(), sha(&bytes)));
                got.push(Got::File(name, executable, daemon, bytes));
            }
            TreeEntry::Symlink { name, target } => {
                got.push(Got::Link(name.to_owned(), target.to_owned()));
            }
        }
        Ok::<_, UnpackError>(())
    });
    (got, result)
}

fn file(name: &str, executable: bool, daemon: bool, bytes: &[u8]) -> Got {
    Got::File(name.into(), executable, daemon, bytes.to_vec())
}

#[test]
fn the_whole_archive_is_handed_over_with_inside_symlinks_last() {
    for kind in ALL_KINDS {
        let archive = build(
            kind,
            &[
                E::Dir("bin/"),
                E::File("bin/osmosisd", b"daemon"),
                E::Dir("lib/"),
                E::Symlink("lib/libwasmvm.so", "libwasmvm.x86_64.so"),
                E::File("lib/libwasmvm.x86_64.so", b"lib"),
                E::Plain("README.md", b"notes"),
                E::File("tools/helper", b"helper"),
            ],
        );
        let (got, result) = tree_run(kind, &archive, None, NO_CAP);
        assert_eq!(result.unwrap(), "bin/osmosisd", "{kind}");
        assert_eq!(
            got,
            vec![
                file("bin/osmosisd", true, true, b"daemon"),
                file("lib/libwasmvm.x86_64.so", true, false, b"lib"),
                file("README.md", false, false, b"notes"),
                file("tools/helper", true, false, b"helper"),
                Got::Link("lib/libwasmvm.so".into(), "libwasmvm.x86_64.so".into()),
            ],
            "{kind}"
        );
    }
}

#[test]
fn the_daemon_follows_the_member_rules_and_owns_bin_daemon() {
    for kind in ALL_KINDS {
        let archive = build(
            kind,
            &[
                E::File("osmosisd-26/bin/osmosisd", b"the daemon"),
                E::File("bin/osmosisd", b"a decoy"),
                E::File("osmosisd-26/lib/libwasmvm.so", b"lib"),
            ],
        );
        let (got, result) = tree_run(kind, &archive, Some("./osmosisd-26/bin/osmosisd"), NO_CAP);
        assert_eq!(result.unwrap(), "osmosisd-26/bin/osmosisd", "{kind}");
        assert_eq!(
            got,
            vec![
                file("osmosisd-26/bin/osmosisd", true, true, b"the daemon"),
                file("osmosisd-26/lib/libwasmvm.so", true, false, b"lib"),
            ],
            "{kind}: bin/osmosisd is where the chosen daemon goes"
        );
        // The member rules' errors are extract's.
        let (got, result) = tree_run(kind, &archive, Some("bin/missing"), NO_CAP);
        assert!(
            matches!(result, Err(UnpackError::NoSuchMember { .. })),
            "{kind}"
        );
        assert_eq!(got, vec![], "{kind}: visited before refusing");
    }
}

#[test]
fn the_whole_archive_is_refused_before_anything_is_handed_over() {
    let bad: Vec<(Vec<E<'_>>, &str, UnsafeReason)> = vec![
        (
            vec![E::File("bin/osmosisd", b"d"), E::RawFile("../evil", b"x")],
            "../evil",
            UnsafeReason::ParentDir,
        ),
        (
            vec![
                E::File("bin/osmosisd", b"d"),
                E::Symlink("lib/evil", "../../x"),
            ],
            "lib/evil",
            UnsafeReason::SymlinkOut {
                target: "../../x".into(),
            },
        ),
        (
            // A file written under a link of the archive would land where the link points.
            vec![
                E::File("bin/osmosisd", b"d"),
                E::Symlink("lib", "bin"),
                E::File("lib/x", b"x"),
            ],
            "lib/x",
            UnsafeReason::UnderNonDirectory {
                parent: "lib".into(),
            },
        ),
        (
            // `a/b` is the root; `..` from there leaves the archive though the text stays in.
            vec![
                E::File("bin/osmosisd", b"d"),
                E::Symlink("a/b", ".."),
                E::Symlink("a/c", "b/../../x"),
            ],
            "a/c",
            UnsafeReason::SymlinkThroughLink {
                target: "b/../../x".into(),
                link: "a/b".into(),
            },
        ),
    ];
    for kind in TAR_KINDS {
        for (entries, entry, reason) in &bad {
            let (got, result) = tree_run(kind, &build(kind, entries), None, NO_CAP);
            assert_eq!(got, vec![], "{kind} {entry}: visited before refusing");
            assert_refused(
                &result.unwrap_err(),
                entry,
                reason,
                &format!("{kind} {entry}"),
            );
        }
        let dup = build(
            kind,
            &[
                E::File("bin/osmosisd", b"d"),
                E::File("lib/x", b"1"),
                E::File("./lib/x", b"2"),
            ],
        );
        let (got, result) = tree_run(kind, &dup, None, NO_CAP);
        assert_eq!(got, vec![]);
        assert!(
            matches!(&result, Err(UnpackError::Duplicate { member, count: 2 }) if member == "lib/x"),
            "{kind}: {result:?}"
        );
    }
}

#[test]
fn hard_links_and_devices_are_skipped() {
    for kind in TAR_KINDS {
        let archive = build(
            kind,
            &[
                E::File("bin/osmosisd", b"d"),
                E::File("lib/libwasmvm.x86_64.so", b"lib"),
                E::HardLink("lib/libwasmvm.so", "lib/libwasmvm.x86_64.so"),
            ],
        );
        let (got, result) = tree_run(kind, &archive, None, NO_CAP);
        result.unwrap();
        assert_eq!(
            got,
            vec![
                file("bin/osmosisd", true, true, b"d"),
                file("lib/libwasmvm.x86_64.so", true, false, b"lib"),
            ],
            "{kind}"
        );
    }
}

#[test]
fn a_bomb_anywhere_in_the_archive_is_refused_before_anything_is_written() {
    let zeros = vec![0u8; 3 * MIB as usize];
    for kind in ALL_KINDS {
        let archive = build(
            kind,
            &[
                E::File("bin/osmosisd", b"daemon"),
                E::File("lib/libwasmvm.so", &zeros),
            ],
        );
        let (got, result) = tree_run(kind, &archive, None, MIB);
        assert_eq!(got, vec![], "{kind}: visited before refusing");
        assert!(
            matches!(&result, Err(UnpackError::TooLarge { member, max: MIB, .. }) if member == "lib/libwasmvm.so"),
            "{kind}: {result:?}"
        );
        // The total counts: two files under the cap each, over it together.
        let half = vec![1u8; (MIB / 2 + 1) as usize];
        let archive = build(
            kind,
            &[
                E::File("bin/osmosisd", &half),
                E::File("lib/libwasmvm.so", &half),
            ],
        );
        let (got, result) = tree_run(kind, &archive, None, MIB);
        assert_eq!(got, vec![], "{kind}");
        assert!(
            matches!(&result, Err(UnpackError::TooLarge { member, .. }) if member == "lib/libwasmvm.so"),
            "{kind}: {result:?}"
        );
        let (got, result) = tree_run(kind, &archive, None, MIB + 2);
        result.unwrap();
        assert_eq!(got.len(), 2, "{kind}: exactly the cap is allowed");
    }
}
