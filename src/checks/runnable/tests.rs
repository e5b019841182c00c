//! Will-it-run checks on binaries built and copied here: ELF kinds, architectures, libraries,
//! glibc, `version`.

use super::host::*;
use super::*;

#[test]
fn versions_match_with_or_without_v() {
    assert!(version_matches("v26.0.0\n", "v26.0.0"));
    assert!(version_matches("26.0.0", "v26.0.0"));
    assert!(version_matches("v26.0.0", "26.0.0"));
    assert!(version_matches("WARN something\nv26.0.0\n", "v26.0.0"));
    assert!(!version_matches("v26.0.1", "v26.0.0"));
    assert!(!version_matches("", "v26.0.0"));
    assert!(!version_matches("v", "v"));
}

#[test]
fn glibc_versions_compare_by_component() {
    let v = |s| GlibcVersion::of_symbol_version(s).unwrap();
    assert!(v("GLIBC_2.2.5") < v("GLIBC_2.17"));
    assert!(v("GLIBC_2.34") < v("GLIBC_2.36"));
    assert!(v("GLIBC_2.36") < v("GLIBC_9.34"));
    assert_eq!(v("GLIBC_2.2.5").to_string(), "2.2.5");
    assert_eq!(GlibcVersion::of_symbol_version("GLIBC_PRIVATE"), None);
    assert_eq!(GlibcVersion::of_symbol_version("GLIBC_ABI_DT_RELR"), None);
}

#[test]
fn wildcards_in_ld_so_conf_includes() {
    assert!(wildcard_match("*.conf", "libc.conf"));
    assert!(wildcard_match("x86_64-*.conf", "x86_64-linux-gnu.conf"));
    assert!(!wildcard_match("*.conf", "libc.conf.bak"));
    assert!(wildcard_match("a*b*c", "a-b-c"));
    assert!(!wildcard_match("a*b*c", "a-c"));
}

#[test]
fn ld_so_conf_includes_and_dirs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::create_dir(d.join("conf.d")).unwrap();
    fs::write(
        d.join("ld.so.conf"),
        "# comment\ninclude conf.d/*.conf\n/opt/first\n",
    )
    .unwrap();
    fs::write(d.join("conf.d/a.conf"), "/opt/a # trailing\n").unwrap();
    fs::write(d.join("conf.d/b.conf"), "include ../ld.so.conf\n/opt/b\n").unwrap();
    fs::write(d.join("conf.d/skip.txt"), "/opt/skipped\n").unwrap();
    let mut dirs = Vec::new();
    ld_so_conf(&d.join("ld.so.conf"), &mut dirs, &mut BTreeSet::new());
    let dirs: Vec<String> = dirs.iter().map(|p| p.display().to_string()).collect();
    assert_eq!(dirs, ["/opt/a", "/opt/b", "/opt/first"]);
}

#[test]
fn the_host_is_detected() {
    let host = Host::detect();
    assert!(host.arch.is_some(), "{host:?}");
    assert!(!host.lib_dirs.is_empty(), "{host:?}");
    // This crate is built for glibc on Linux (target_env = "gnu"): its libc must be found.
    if cfg!(all(target_os = "linux", target_env = "gnu")) {
        assert!(host.glibc.is_some(), "{host:?}");
        assert!(
            host.glibc_names.contains("GLIBC_2.17") || host.glibc_names.contains("GLIBC_2.2.5")
        );
    }
}
