//! Conversion tested on registry files written here.

use super::*;

const HEX: &str = "8efbeca8f3e6a27c7b8ab02141bbfc457a6efbb089e338147942aa6fcb586545";

#[test]
fn registry_text_cannot_break_out_of_a_comment() {
    let chain = ChainJson {
        chain_id: Some("x-1".into()),
        daemon_name: Some("xd".into()),
        pretty_name: Some("X\n[chain]\nid = \"evil\"".into()),
        codebase: Some(Codebase {
            tag: Some("v1.0.0".into()),
            binaries: Some(BTreeMap::from([(
                "linux/amd64".to_string(),
                format!("https://e.org/xd?checksum=sha256:{HEX}"),
            )])),
            ..Codebase::default()
        }),
        ..ChainJson::default()
    };
    let inputs = Inputs {
        chain: Some(("chain.json".into(), chain)),
        versions: None,
    };
    let imported = convert(&inputs, &Options::default()).unwrap();
    let (m, _) = crate::manifest::parse(&imported.text).unwrap();
    assert_eq!(m.chain.id, "x-1");
    assert!(imported.text.starts_with("# X?[chain]?id = \"evil\" (x-1)"));
}

#[test]
fn versions_and_heights_are_normalised() {
    assert_eq!(normalize_version("28.0.4"), "v28.0.4");
    assert_eq!(normalize_version("v15.2.0"), "v15.2.0");
    let h = |s: &str| height(Some(&serde_json::from_str(s).unwrap()));
    assert_eq!(h("0"), Err("0".into()));
    assert_eq!(h("-3"), Err("-3".into()));
    assert_eq!(h("12.5"), Err("12.5".into()));
    assert_eq!(h("\"soon\""), Err("\"soon\"".into()));
    assert_eq!(h("41332000"), Ok(Some(41_332_000)));
    assert_eq!(h("41332000.0"), Ok(Some(41_332_000)));
    assert_eq!(h("\"41332000\""), Ok(Some(41_332_000)));
    assert_eq!(h("null"), Ok(None));
    assert_eq!(height(None), Ok(None));
}

#[test]
fn packages_and_archives_cvx_cannot_unpack_are_not_binaries() {
    let no = |url: &str| not_a_binary(url);
    assert_eq!(
        no("https://e.org/v1.12.1/secretnetwork_1.12.1_mainnet_goleveldb_amd64.deb").as_deref(),
        Some("a Debian package (.deb)")
    );
    assert!(no("https://e.org/x.rpm?raw=1").is_some());
    assert!(no("https://e.org/osmosisd.gz").is_some());
    assert!(no("https://e.org/osmosisd.tar.bz2").is_some());
    for fine in [
        "https://e.org/osmosisd-26.0.0-linux-amd64",
        "https://e.org/osmosisd.tar.gz",
        "https://e.org/osmosisd.TGZ",
        "https://e.org/osmosisd.zip",
        "https://e.org/osmosisd.tar.zst",
        "https://e.org/gaiad-v15.2.0-linux-amd64.exe",
        "https://e.org/dl?file=x.deb",
    ] {
        assert_eq!(no(fine), None, "{fine}");
    }
}
