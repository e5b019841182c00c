//! `cvx plan --verify-remote`: download every artifact of every declared platform, hashing as the
//! bytes stream and writing nothing, and prove each pin. Meant for CI, weeks before the height.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::Serialize;

use crate::apply::fetch;
use crate::errors::error_chain;
use crate::manifest::Manifest;
use crate::plan::ManifestKey;

/// One URL checked against its pin.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct RemoteCheck {
    pub url: String,
    pub sha256: String,
    /// Where the manifest uses it: `genesis linux/amd64 binary`, `upgrade v26 linux/arm64 library`.
    pub used_by: Vec<String>,
    /// The same places as manifest keys, in the same order: `upgrade[0].binary."linux/arm64"`.
    pub keys: Vec<ManifestKey>,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    pub millis: u64,
    /// What the URL served, when it differs from the pin.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actual_sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Every (url, sha256) the manifest pins, for every platform, with where it is used.
fn artifacts(manifest: &Manifest) -> BTreeMap<(String, String), Vec<(String, ManifestKey)>> {
    let mut all: BTreeMap<(String, String), Vec<(String, ManifestKey)>> = BTreeMap::new();
    let stages = std::iter::once((
        "genesis".to_string(),
        ManifestKey::stage(None),
        &manifest.genesis.binary,
        &manifest.genesis.library,
    ))
    .chain(manifest.upgrades.iter().enumerate().map(|(i, u)| {
        (
            format!("upgrade {}", u.name),
            ManifestKey::stage(Some(i)),
            &u.binary,
            &u.library,
        )
    }));
    for (stage, key, binaries, libraries) in stages {
        for (platform, a) in binaries {
            all.entry((a.url.clone(), a.sha256.clone()))
                .or_default()
                .push((
                    format!("{stage} {platform} binary"),
                    key.key("binary").key(platform),
                ));
        }
        for (platform, libs) in libraries {
            for (i, l) in libs.iter().enumerate() {
                all.entry((l.url.clone(), l.sha256.clone()))
                    .or_default()
                    .push((
                        format!("{stage} {platform} library"),
                        key.key("library").key(platform).index(i),
                    ));
            }
        }
    }
    all
}

/// Check every artifact, `jobs` at a time.
pub async fn verify_remote(
    manifest: &Manifest,
    jobs: usize,
    options: &fetch::FetchOptions,
) -> Result<Vec<RemoteCheck>, fetch::FetchError> {
    let artifacts = artifacts(manifest);
    let urls = artifacts.keys().map(|(url, _)| url.clone()).collect();
    let digests = fetch::digest_all(urls, jobs, options).await?;
    Ok(artifacts
        .into_iter()
        .zip(digests)
        .map(|(((url, sha256), uses), (result, elapsed))| {
            let millis = elapsed.as_millis() as u64;
            let (used_by, keys) = uses.into_iter().unzip();
            match result {
                Ok(d) => RemoteCheck {
                    ok: d.sha256 == sha256,
                    error: (d.sha256 != sha256).then(|| {
                        format!("checksum mismatch: pinned {sha256}, served {}", d.sha256)
                    }),
                    actual_sha256: (d.sha256 != sha256).then_some(d.sha256),
                    http_status: d.status,
                    size: Some(d.size),
                    url,
                    sha256,
                    used_by,
                    keys,
                    millis,
                },
                Err(e) => RemoteCheck {
                    ok: false,
                    http_status: match &e {
                        fetch::FetchError::Status { status, .. } => Some(status.as_u16()),
                        _ => None,
                    },
                    size: None,
                    actual_sha256: None,
                    error: Some(error_chain(&e)),
                    url,
                    sha256,
                    used_by,
                    keys,
                    millis,
                },
            }
        })
        .collect())
}
