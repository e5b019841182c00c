//! `cvx plan --verify-remote`: download every artifact of every declared platform, hashing as the
//! bytes stream and writing nothing, and prove each pin. Meant for CI, weeks before the height.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use schemars::JsonSchema;
use serde::Serialize;

use crate::apply::{error_chain, fetch};
use crate::manifest::Manifest;

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
    let client = fetch::client(options)?;
    let semaphore = Arc::new(tokio::sync::Semaphore::new(jobs.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for (index, ((url, sha256), used_by)) in artifacts(manifest).into_iter().enumerate() {
        let (client, semaphore, options) = (client.clone(), semaphore.clone(), options.clone());
        tasks.spawn(async move {
            let _permit = semaphore
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            let start = Instant::now();
            let result = fetch::digest(&client, &url, &options).await;
            let millis = start.elapsed().as_millis() as u64;
            let check = match result {
                Ok(d) if d.sha256 == sha256 => RemoteCheck {
                    ok: true,
                    http_status: d.status,
                    size: Some(d.size),
                    actual_sha256: None,
                    error: None,
                    url,
                    sha256,
                    used_by,
                    millis,
                },
                Ok(d) => RemoteCheck {
                    ok: false,
                    http_status: d.status,
                    size: Some(d.size),
                    error: Some(format!(
                        "checksum mismatch: pinned {sha256}, served {}",
                        d.sha256
                    )),
                    actual_sha256: Some(d.sha256),
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
            };
            (index, check)
        });
    }
    let mut checks = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        checks.push(joined.expect("verification tasks do not panic"));
    }
    checks.sort_by_key(|(index, _)| *index);
    Ok(checks.into_iter().map(|(_, c)| c).collect())
}
