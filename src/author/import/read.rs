//! Reading the registry: sources (files or URLs, through `apply::fetch`), chain.json and
//! versions.json told apart by content, and each version's binaries classified: what cvx can
//! stage, and why not the rest.

use super::*;

/// Read every source and tell chain.json from versions.json by their content.
pub async fn read_inputs(sources: &[String]) -> Result<Inputs, ImportError> {
    let mut inputs = Inputs::default();
    let mut client = None;
    for source in sources {
        let raw = read_source(source, &mut client).await?;
        // Editors on Windows save UTF-8 with a byte-order mark; JSON parsers need it gone.
        let bytes = raw.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&raw);
        let json_error = |e| json_error(source, e);
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(json_error)?;
        let object = value.as_object().ok_or_else(|| ImportError::NotRegistry {
            source_name: source.clone(),
        })?;
        if object.contains_key("versions") {
            // From the bytes again, so a field of the wrong shape is reported at its line.
            let versions: VersionsJson = serde_json::from_slice(bytes).map_err(json_error)?;
            if let Some((first, _)) = &inputs.versions {
                return Err(ImportError::Twice {
                    first: first.clone(),
                    second: source.clone(),
                    kind: "versions.json",
                });
            }
            inputs.versions = Some((source.clone(), versions));
        } else if ["chain_id", "daemon_name", "codebase"]
            .iter()
            .any(|k| object.contains_key(*k))
        {
            let chain: ChainJson = serde_json::from_slice(bytes).map_err(json_error)?;
            if let Some((first, _)) = &inputs.chain {
                return Err(ImportError::Twice {
                    first: first.clone(),
                    second: source.clone(),
                    kind: "chain.json",
                });
            }
            inputs.chain = Some((source.clone(), chain));
        } else {
            return Err(ImportError::NotRegistry {
                source_name: source.clone(),
            });
        }
    }
    Ok(inputs)
}

/// A JSON error at its line and column of `source`.
pub(super) fn json_error(source: &str, e: serde_json::Error) -> ImportError {
    let (line, column) = (e.line(), e.column());
    let text = e.to_string();
    let message = text
        .strip_suffix(&format!(" at line {line} column {column}"))
        .unwrap_or(&text)
        .to_string();
    ImportError::Json {
        source_name: source.to_string(),
        line,
        column,
        what: if e.is_data() {
            "not a chain-registry file"
        } else {
            "not valid JSON"
        },
        message,
    }
}

/// The bytes of a path, a `file://` URL or an http(s) URL, at most [`MAX_SOURCE_SIZE`].
pub(super) async fn read_source(
    source: &str,
    client: &mut Option<reqwest::Client>,
) -> Result<Vec<u8>, ImportError> {
    let too_large = || ImportError::TooLarge {
        source_name: source.to_string(),
        max: MAX_SOURCE_SIZE,
    };
    if source.starts_with("https://") || source.starts_with("http://") {
        let download = |e| ImportError::Download {
            url: source.to_string(),
            source: e,
        };
        if source.starts_with("http://") {
            tracing::warn!(
                "{source} is plain http: the checksums it carries are only as trustworthy as the network"
            );
        }
        let client = match client {
            Some(c) => c,
            None => client.insert(fetch::client(&FetchOptions::default()).map_err(download)?),
        };
        return fetch::read(client, source, MAX_SOURCE_SIZE, &FetchOptions::default())
            .await
            .map_err(|e| match e {
                FetchError::TooLarge { .. } => too_large(),
                e => download(e),
            });
    }
    let path = match source.strip_prefix("file://") {
        Some(_) => url::Url::parse(source)
            .ok()
            .and_then(|u| u.to_file_path().ok())
            .unwrap_or_else(|| PathBuf::from(source)),
        None => PathBuf::from(source),
    };
    let read = |e| ImportError::Read {
        path: path.clone(),
        source: e,
    };
    let size = std::fs::metadata(&path).map_err(read)?.len();
    if size > MAX_SOURCE_SIZE {
        return Err(too_large());
    }
    std::fs::read(&path).map_err(read)
}

/// A version as the manifest writes it: a leading `v`.
pub(super) fn normalize_version(version: &str) -> String {
    let version = version.trim();
    if version.starts_with(|c: char| c.is_ascii_digit()) {
        format!("v{version}")
    } else {
        version.to_string()
    }
}

/// A registry height: `Ok(None)` when absent, `Ok(Some)` for a positive block height (a number,
/// or a string of digits), else `Err` with the value as the registry wrote it.
pub(super) fn height(value: Option<&serde_json::Value>) -> Result<Option<u64>, String> {
    use serde_json::Value;
    let positive = |h: u64| (h > 0 && i64::try_from(h).is_ok()).then_some(h);
    let parsed = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && *f >= 1.0 && *f < i64::MAX as f64)
                    .map(|f| f as u64)
            })
            .and_then(positive),
        Some(Value::String(s)) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse().ok().and_then(positive)
        }
        Some(_) => None,
    };
    parsed
        .map(Some)
        .ok_or_else(|| value.map(Value::to_string).unwrap_or_default())
}

/// Why a download cannot be what cvx stages as the daemon, judged by its file name: a package or
/// an installer, an archive cvx does not unpack, a checksum or a signature.
pub(super) fn not_a_binary(url: &str) -> Option<String> {
    const KINDS: &[(&str, &str)] = &[
        (".deb", "a Debian package"),
        (".rpm", "an RPM package"),
        (".apk", "an Alpine package"),
        (".snap", "a snap package"),
        (".pkg", "a macOS installer package"),
        (".dmg", "a macOS disk image"),
        (".msi", "a Windows installer"),
        (".tar.bz2", "a bzip2 tar archive, which cvx does not unpack"),
        (".tbz2", "a bzip2 tar archive, which cvx does not unpack"),
        (
            ".tar",
            "an uncompressed tar archive, which cvx does not unpack",
        ),
        (".7z", "a 7-Zip archive, which cvx does not unpack"),
        (".rar", "a RAR archive, which cvx does not unpack"),
        (
            ".gz",
            "a single gzip-compressed file, which cvx does not unpack",
        ),
        (
            ".xz",
            "a single xz-compressed file, which cvx does not unpack",
        ),
        (
            ".zst",
            "a single zstd-compressed file, which cvx does not unpack",
        ),
        (
            ".bz2",
            "a single bzip2-compressed file, which cvx does not unpack",
        ),
        (".sha256", "a checksum file"),
        (".sha256sum", "a checksum file"),
        (".asc", "a signature"),
        (".sig", "a signature"),
    ];
    let name = crate::manifest::url_file_name(url)?.to_ascii_lowercase();
    if crate::manifest::is_archive_url(url) {
        return None;
    }
    KINDS
        .iter()
        .find(|(ext, _)| name.ends_with(ext))
        .map(|(ext, what)| format!("{what} ({ext})"))
}

/// A registry binary cvx cannot stage: its platform, URL, and why.
pub(super) struct Skipped {
    pub(super) platform: String,
    pub(super) url: String,
    pub(super) why: String,
}

/// The registry's binaries that cvx can stage, and those it cannot.
pub(super) fn classify(
    raw: Option<&BTreeMap<String, String>>,
) -> (BTreeMap<String, Binary>, Vec<Skipped>) {
    let mut binaries = BTreeMap::new();
    let mut skipped = Vec::new();
    for (platform, url) in raw.into_iter().flatten() {
        if !crate::manifest::valid_platform(platform) {
            skipped.push(Skipped {
                platform: format!("{platform:?}"),
                url: url.clone(),
                why: "not an os/arch platform".into(),
            });
            continue;
        }
        let (url, sha256, _) = fetch::split_checksum(url.trim());
        if let Some(why) = not_a_binary(&url) {
            skipped.push(Skipped {
                platform: platform.clone(),
                url,
                why: format!("{why}, not a binary or an archive cvx can unpack"),
            });
            continue;
        }
        binaries.insert(platform.clone(), Binary { url, sha256 });
    }
    (binaries, skipped)
}

/// The registry's binaries, checked; what cvx cannot stage is dropped with a note.
pub(super) fn binaries(
    origin: &str,
    raw: Option<&BTreeMap<String, String>>,
    notes: &mut Vec<String>,
) -> (BTreeMap<String, Binary>, Vec<Skipped>) {
    for url in raw.into_iter().flat_map(|r| r.values()) {
        let (_, _, note) = fetch::split_checksum(url.trim());
        notes.extend(note.map(|n| format!("{origin}: {n}")));
    }
    let (binaries, skipped) = classify(raw);
    for s in &skipped {
        notes.push(format!(
            "{origin}: binary for {} skipped: {} is {}",
            s.platform, s.url, s.why
        ));
    }
    (binaries, skipped)
}

/// Where the versions come from: versions.json, or the older layout inside chain.json.
pub(super) struct VersionList<'a> {
    /// For messages: the file as given, and for the older layout ` codebase.versions` after it.
    pub(super) source: String,
    /// For each version's origin: `versions.json` or `chain.json codebase.versions`.
    pub(super) kind: &'static str,
    pub(super) versions: &'a [RegistryVersion],
}

pub(super) fn entry(version: &RegistryVersion, kind: &str, notes: &mut Vec<String>) -> Entry {
    let origin = format!("{kind} {:?}", version.name);
    let (binaries, skipped) = binaries(&origin, version.binaries.as_ref(), notes);
    Entry {
        name: Some(version.name.clone()),
        height: height(version.height.as_ref()),
        version: version
            .recommended_version
            .as_deref()
            .or(version.tag.as_deref())
            .filter(|v| !v.trim().is_empty())
            .map(normalize_version),
        binaries,
        skipped,
        origin,
    }
}

/// What tells a registry version apart from another of the same name.
pub(super) fn describe(version: &RegistryVersion) -> String {
    let mut parts = Vec::new();
    if let Some(tag) = &version.tag {
        parts.push(format!("tag {tag}"));
    }
    if let Some(v) = &version.recommended_version {
        parts.push(format!("recommended_version {v}"));
    }
    match &version.height {
        Some(h) => parts.push(format!("height {h}")),
        None => parts.push("no height".into()),
    }
    one_line(&parts.join(", "))
}

/// Two versions of one name: an error when either is imported (which one is meant?), a note when
/// both are left out.
pub(super) fn check_duplicates(
    list: &VersionList<'_>,
    start: usize,
    notes: &mut Vec<String>,
) -> Result<(), ImportError> {
    let mut first: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, v) in list.versions.iter().enumerate() {
        let Some(j) = first.insert(&v.name, i) else {
            continue;
        };
        first.insert(&v.name, j);
        let error = ImportError::DuplicateVersion {
            source_name: list.source.clone(),
            name: v.name.clone(),
            first: (j + 1, describe(&list.versions[j])),
            second: (i + 1, describe(v)),
        };
        if i >= start {
            return Err(error);
        }
        notes.push(format!("{error}; neither is imported"));
    }
    Ok(())
}

/// For a version that lists nothing cvx can stage: a later start from which every version does,
/// else the way to write its binaries by hand.
pub(super) fn no_binaries_hint(
    list: Option<&VersionList<'_>>,
    name: Option<&str>,
    skipped: &[Skipped],
) -> String {
    let by_hand = |lists: &str| {
        format!(
            "the registry {lists}: write binary.\"linux/amd64\" = {{ url = \"<the release's binary or .tar.gz>\", sha256 = \"\" }} for each version by hand (examples/minimal.toml shows the layout), then run cvx pin"
        )
    };
    let Some(list) = list else {
        return by_hand("gives no binary cvx can stage in chain.json's codebase");
    };
    let stageable: Vec<bool> = list
        .versions
        .iter()
        .map(|v| !classify(v.binaries.as_ref()).0.is_empty())
        .collect();
    let at = list
        .versions
        .iter()
        .position(|v| Some(v.name.as_str()) == name);
    if let Some(at) = at
        && let Some(from) =
            (at + 1..list.versions.len()).find(|&m| stageable[m..].iter().all(|s| *s))
    {
        return format!(
            "start at a later version with --from {}: it and every version after it list a binary",
            list.versions[from].name
        );
    }
    if stageable.iter().all(|s| !s) {
        let mut kinds: Vec<&str> = skipped
            .iter()
            .map(|s| s.why.split(" (").next().unwrap_or(&s.why))
            .collect();
        kinds.dedup();
        return if kinds.is_empty() {
            by_hand("lists no binaries for this chain")
        } else {
            by_hand(&format!("lists only {} for this chain", kinds.join(", ")))
        };
    }
    let without: Vec<&str> = list
        .versions
        .iter()
        .zip(&stageable)
        .filter(|(_, s)| !**s)
        .map(|(v, _)| v.name.as_str())
        .collect();
    by_hand(&format!(
        "lists no stageable binary for {}",
        span_of(&without)
    ))
}
