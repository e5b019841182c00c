//! `cvx plan --verify-remote`: download every artifact of every declared platform, hashing as the
//! bytes stream and writing nothing, and prove each pin. Meant for CI, weeks before the height.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::Serialize;

use crate::apply::fetch;
use crate::manifest::Manifest;
use crate::render::error_chain;

/// One URL checked against its pin.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct RemoteCheck {
    pub url: String,
    pub sha256: String,
    /// Where the manifest uses it: `genesis linux/amd64 binary`, `upgrade v26 linux/arm64 library`.
    pub used_by: Vec<String>,
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
fn artifacts(manifest: &Manifest) -> BTreeMap<(String, String), Vec<String>> {
    let mut all: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    let stages = std::iter::once((
        "genesis".to_string(),
        &manifest.genesis.binary,
        &manifest.genesis.library,
    ))
    .chain(
        manifest
            .upgrades
            .iter()
            .map(|u| (format!("upgrade {}", u.name), &u.binary, &u.library)),
    );
    for (stage, binaries, libraries) in stages {
        for (platform, a) in binaries {
            all.entry((a.url.clone(), a.sha256.clone()))
                .or_default()
                .push(format!("{stage} {platform} binary"));
        }
        for (platform, libs) in libraries {
            for l in libs {
                all.entry((l.url.clone(), l.sha256.clone()))
                    .or_default()
                    .push(format!("{stage} {platform} library"));
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
        .map(|(((url, sha256), used_by), (result, elapsed))| {
            let millis = elapsed.as_millis() as u64;
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
                    millis,
                },
            }
        })
        .collect())
}
