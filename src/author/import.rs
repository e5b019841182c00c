//! `cvx import chain-registry`: a manifest written from the chain registry's `chain.json` and/or
//! `versions.json` (files or http(s) URLs; UTF-8, a byte-order mark allowed; a JSON error is
//! reported at its file:line:column).
//!
//! Mapping (README, `cvx import`):
//! - `[chain]`: `chain_id`, `daemon_name` (or `--chain-id`, `--daemon`); `node_home` becomes `home`
//!   only when absolute, else a commented suggestion; `platforms` = the platforms every imported
//!   version has a binary for (the others are dropped, and named on stderr).
//! - Which versions: versions.json's, else those of the older layout, chain.json's
//!   `codebase.versions`. By default the second-to-last is the genesis binary and the last one the
//!   upgrade to come: a node started today from a recent snapshot runs one of the two. `--from
//!   NAME` starts at NAME, `--all` at the first. Without any list, chain.json's `codebase` (its
//!   recommended version) is the genesis binary. Two versions of one name are an error naming the
//!   file and both entries (a note when neither is imported).
//! - Per version: `name` (the plan name, exactly), `height` when it is a positive block height
//!   (else a note and a comment), `version` = `recommended_version`, else `tag`, with a leading
//!   `v`; a version that is not semver or not above the one before it is written as a comment,
//!   and so is a height that does not increase.
//! - Binaries: the URL without its `?checksum=` parameter, whose value (`sha256:HEX` or a bare
//!   HEX) becomes `sha256`. Without one, `sha256 = ""` with a TODO comment: the manifest is not
//!   valid until `cvx pin` fills it. Downloads that cannot be the daemon (`.deb`, `.rpm` and other
//!   packages, archives cvx does not unpack, checksum files) are skipped with a note; a version
//!   left with none is an error whose hint comes from the registry's own data.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml_edit::{Array, DocumentMut, InlineTable, Item, Table, Value};

use crate::apply::fetch::{self, FetchError, FetchOptions};

/// The largest registry file read; the biggest chain.json in the registry is well under 1 MiB.
pub const MAX_SOURCE_SIZE: u64 = 8 << 20;

/// The comment `cvx pin` looks for (and removes) on a line whose sha256 it fills.
pub const PIN_TODO: &str = "# TODO: no checksum in the registry; run cvx pin";

#[derive(Debug, clap::Subcommand)]
pub enum ImportCommand {
    /// Write a manifest from a chain-registry chain.json and/or versions.json (paths or URLs).
    ChainRegistry(ChainRegistryArgs),
}

#[derive(Debug, clap::Args)]
pub struct ChainRegistryArgs {
    /// chain.json and/or versions.json of one chain, in any order: paths or http(s) URLs.
    #[arg(required = true, num_args = 1..=2, value_name = "FILE_OR_URL")]
    pub sources: Vec<String>,
    /// Write the manifest to OUT instead of stdout (refused if OUT exists, unless --force).
    #[arg(short, long, value_name = "OUT")]
    pub output: Option<PathBuf>,
    /// Overwrite OUT.
    #[arg(long, requires = "output")]
    pub force: bool,
    /// Start at this registry version (its name, e.g. v30): it is the genesis binary and every
    /// later version an upgrade. Default: the second-to-last version.
    #[arg(long, value_name = "NAME", conflicts_with = "all")]
    pub from: Option<String>,
    /// Import every registry version; the first is the genesis binary.
    #[arg(long)]
    pub all: bool,
    /// Import only this platform (repeatable), e.g. linux/amd64. Default: every platform each
    /// imported version has a binary for.
    #[arg(long = "platform", value_name = "OS/ARCH")]
    pub platforms: Vec<String>,
    /// The chain-id, when no chain.json is given (or to override it).
    #[arg(long, value_name = "ID")]
    pub chain_id: Option<String>,
    /// The daemon's file name (DAEMON_NAME), when no chain.json is given (or to override it).
    #[arg(long, value_name = "NAME")]
    pub daemon: Option<String>,
    /// More logs on stderr (-v debug, -vv trace).
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors on stderr: no notes, no warnings, no summary.
    #[arg(short, long, conflicts_with = "verbose")]
    pub quiet: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot download {url}")]
    Download {
        url: String,
        #[source]
        source: FetchError,
    },
    #[error("{source_name} is larger than {max} bytes")]
    TooLarge { source_name: String, max: u64 },
    #[error("{source_name}:{line}:{column}: {what}: {message}")]
    Json {
        source_name: String,
        line: usize,
        column: usize,
        /// `not valid JSON`, or `not a chain-registry file` for valid JSON of another shape.
        what: &'static str,
        message: String,
    },
    #[error("{source_name} is neither a chain-registry chain.json nor a versions.json")]
    NotRegistry { source_name: String },
    #[error("{first} and {second} are both a {kind}")]
    Twice {
        first: String,
        second: String,
        kind: &'static str,
    },
    #[error("chain.json describes chain {chain:?} but versions.json {versions:?}")]
    ChainMismatch { chain: String, versions: String },
    #[error("no {what} given")]
    Missing {
        what: &'static str,
        flag: &'static str,
    },
    #[error("no registry version is named {name:?}")]
    UnknownVersion { name: String, names: Vec<String> },
    #[error("the registry has no version to import")]
    NoVersions,
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("{flag} chooses among versions.json's versions, and none was given")]
    NeedsVersions { flag: &'static str },
    #[error("registry version {name:?} lists no binary cvx can stage{detail}")]
    NoBinaries {
        name: String,
        /// What it lists instead, e.g. `: linux/amd64 is a Debian package (.deb)`; empty when
        /// it lists nothing.
        detail: String,
        /// What would help, from the registry's own data.
        hint: String,
    },
    #[error("no platform has a binary in every imported version ({detail})")]
    NoCommonPlatform { detail: String, hint: String },
    #[error("registry version {name:?} has no binary for {platform}")]
    PlatformMissing {
        name: String,
        platform: String,
        hint: String,
    },
    #[error(
        "{source_name} lists version {name:?} twice: entry #{} ({}) and entry #{} ({})",
        first.0, first.1, second.0, second.1
    )]
    DuplicateVersion {
        source_name: String,
        name: String,
        /// 1-based position in the list, and what tells the entries apart (tag, height).
        first: (usize, String),
        second: (usize, String),
    },
    #[error("platform {0:?} is not of the form os/arch")]
    BadPlatform(String),
    #[error("upgrade name {name:?} {why}")]
    BadName { name: String, why: &'static str },
    #[error(
        "{source_name}: upgrade names {first:?} and {second:?} would share a directory (Cosmovisor lower-cases names)"
    )]
    DuplicateName {
        source_name: String,
        first: String,
        second: String,
    },
    #[error("{} exists", path.display())]
    Exists { path: PathBuf },
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the imported manifest does not validate:\n{0}")]
    Invalid(String),
}

impl ImportError {
    /// The obvious fix, when there is one.
    pub fn hint(&self) -> Option<String> {
        match self {
            ImportError::NotRegistry { .. } | ImportError::Json { .. } => Some(
                "pass the chain's chain.json and/or versions.json from cosmos/chain-registry"
                    .into(),
            ),
            ImportError::Missing { flag, .. } => {
                Some(format!("pass the chain's chain.json too, or {flag}"))
            }
            ImportError::UnknownVersion { names, .. } => {
                Some(format!("versions in the registry: {}", names.join(", ")))
            }
            ImportError::NoBinaries { hint, .. }
            | ImportError::NoCommonPlatform { hint, .. }
            | ImportError::PlatformMissing { hint, .. } => Some(hint.clone()),
            ImportError::DuplicateVersion { .. } => Some(
                "a version's name is its on-chain plan name, which is unique: fix the registry \
                 file (keep the entry the chain's upgrade plan matches)"
                    .into(),
            ),
            ImportError::BadPlatform(_) => Some("use Go's names, e.g. linux/amd64".into()),
            ImportError::NeedsVersions { .. } | ImportError::NoVersions => {
                Some("pass the chain's versions.json too".into())
            }
            ImportError::Exists { .. } => Some("pass --force to overwrite it".into()),
            ImportError::ChainMismatch { .. } | ImportError::Twice { .. } => {
                Some("pass one chain.json and one versions.json of the same chain".into())
            }
            _ => None,
        }
    }
}

/// `chain.json`, the fields cvx reads.
#[derive(Debug, Default, Deserialize)]
pub struct ChainJson {
    pub chain_name: Option<String>,
    pub pretty_name: Option<String>,
    pub chain_id: Option<String>,
    pub daemon_name: Option<String>,
    pub node_home: Option<String>,
    pub codebase: Option<Codebase>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Codebase {
    pub recommended_version: Option<String>,
    pub tag: Option<String>,
    pub binaries: Option<BTreeMap<String, String>>,
    /// The older layout, before versions.json: the chain's versions inside chain.json.
    pub versions: Option<Vec<RegistryVersion>>,
}

/// `versions.json`, the fields cvx reads.
#[derive(Debug, Default, Deserialize)]
pub struct VersionsJson {
    pub chain_name: Option<String>,
    pub versions: Vec<RegistryVersion>,
}

#[derive(Debug, Default, Clone, Deserialize)]
pub struct RegistryVersion {
    pub name: String,
    pub tag: Option<String>,
    /// A number in the schema; anything else is noted and left out.
    pub height: Option<serde_json::Value>,
    pub recommended_version: Option<String>,
    pub binaries: Option<BTreeMap<String, String>>,
}

/// What the command line asked for, less where to write it.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub from: Option<String>,
    pub all: bool,
    pub platforms: Vec<String>,
    pub chain_id: Option<String>,
    pub daemon: Option<String>,
    /// The command that regenerates the manifest, for its header.
    pub command: String,
}

/// Registry files as read, with where each came from.
#[derive(Debug, Default)]
pub struct Inputs {
    pub chain: Option<(String, ChainJson)>,
    pub versions: Option<(String, VersionsJson)>,
}

/// An artifact written with `sha256 = ""`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpinned {
    /// `genesis linux/amd64`, `upgrade "v31" linux/arm64`.
    pub used_by: String,
    pub url: String,
}

/// The manifest, and what the operator must hear about it.
#[derive(Debug)]
pub struct Imported {
    pub text: String,
    pub unpinned: Vec<Unpinned>,
    /// Notes for stderr: dropped platforms, versions or heights written as comments.
    pub notes: Vec<String>,
    /// One line: the chain, genesis, upgrades, platforms.
    pub summary: String,
}

/// A registry version, or chain.json's codebase, as imported.
struct Entry {
    /// Where it comes from, for comments: `versions.json "v31"`, `chain.json codebase`.
    origin: String,
    name: Option<String>,
    /// `Err`: the registry's value, which is not a block height.
    height: Result<Option<u64>, String>,
    version: Option<String>,
    binaries: BTreeMap<String, Binary>,
    /// What the registry lists that cvx cannot stage.
    skipped: Vec<Skipped>,
}

struct Binary {
    url: String,
    sha256: Option<String>,
}

/// `cvx import chain-registry`: read, convert, write, report.
pub fn run(command: ImportCommand) -> Result<(), ImportError> {
    let ImportCommand::ChainRegistry(args) = command;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(ImportError::Runtime)?;
    let inputs = runtime.block_on(read_inputs(&args.sources))?;
    let options = Options {
        from: args.from.clone(),
        all: args.all,
        platforms: args.platforms.clone(),
        chain_id: args.chain_id.clone(),
        daemon: args.daemon.clone(),
        command: command_line(&args),
    };
    let imported = convert(&inputs, &options)?;
    match &args.output {
        Some(path) => write_new(path, &imported.text, args.force)?,
        None => {
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(imported.text.as_bytes())
                .and_then(|()| stdout.flush())
                .map_err(|source| ImportError::Write {
                    path: "stdout".into(),
                    source,
                })?;
        }
    }
    if args.quiet {
        return Ok(());
    }
    for note in &imported.notes {
        eprintln!("note: {note}");
    }
    let target = args
        .output
        .as_ref()
        .map_or("the manifest".to_string(), |p| p.display().to_string());
    eprintln!("{}", imported.summary);
    if imported.unpinned.is_empty() {
        eprintln!("{target}: every artifact is pinned by the registry's own sha256");
    } else {
        eprintln!(
            "warning: {} artifact{} ha{} no checksum in the registry (written as sha256 = \"\"):",
            imported.unpinned.len(),
            if imported.unpinned.len() == 1 {
                ""
            } else {
                "s"
            },
            if imported.unpinned.len() == 1 {
                "s"
            } else {
                "ve"
            },
        );
        for u in &imported.unpinned {
            eprintln!("  {}: {}", u.used_by, u.url);
        }
        let pin = match &args.output {
            Some(path) => format!("cvx pin -m {}", path.display()),
            None => "cvx pin -m FILE".to_string(),
        };
        eprintln!(
            "{target} is NOT valid until those are pinned: run `{pin}` (it downloads each and pins what it serves)"
        );
    }
    Ok(())
}

/// The command that regenerates the manifest: sources and the options that shape it.
fn command_line(args: &ChainRegistryArgs) -> String {
    let mut words = vec!["cvx import chain-registry".to_string()];
    words.extend(args.sources.iter().cloned());
    if let Some(from) = &args.from {
        words.push(format!("--from {from}"));
    }
    if args.all {
        words.push("--all".into());
    }
    for p in &args.platforms {
        words.push(format!("--platform {p}"));
    }
    if let Some(id) = &args.chain_id {
        words.push(format!("--chain-id {id}"));
    }
    if let Some(daemon) = &args.daemon {
        words.push(format!("--daemon {daemon}"));
    }
    words.join(" ")
}

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
fn json_error(source: &str, e: serde_json::Error) -> ImportError {
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
async fn read_source(
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
fn normalize_version(version: &str) -> String {
    let version = version.trim();
    if version.starts_with(|c: char| c.is_ascii_digit()) {
        format!("v{version}")
    } else {
        version.to_string()
    }
}

/// A registry height: `Ok(None)` when absent, `Ok(Some)` for a positive block height (a number,
/// or a string of digits), else `Err` with the value as the registry wrote it.
fn height(value: Option<&serde_json::Value>) -> Result<Option<u64>, String> {
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
fn not_a_binary(url: &str) -> Option<String> {
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
struct Skipped {
    platform: String,
    url: String,
    why: String,
}

/// The registry's binaries that cvx can stage, and those it cannot.
fn classify(raw: Option<&BTreeMap<String, String>>) -> (BTreeMap<String, Binary>, Vec<Skipped>) {
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
fn binaries(
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
struct VersionList<'a> {
    /// For messages: the file as given, and for the older layout ` codebase.versions` after it.
    source: String,
    /// For each version's origin: `versions.json` or `chain.json codebase.versions`.
    kind: &'static str,
    versions: &'a [RegistryVersion],
}

fn entry(version: &RegistryVersion, kind: &str, notes: &mut Vec<String>) -> Entry {
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
fn describe(version: &RegistryVersion) -> String {
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
fn check_duplicates(
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
fn no_binaries_hint(
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

/// Turn registry files into manifest text; pure (no I/O), so tests can call it directly.
pub fn convert(inputs: &Inputs, options: &Options) -> Result<Imported, ImportError> {
    let mut notes = Vec::new();
    let chain = inputs.chain.as_ref().map(|(_, c)| c);
    let versions = inputs.versions.as_ref().map(|(_, v)| v);
    if let (Some(c), Some(v)) = (chain, versions)
        && let (Some(a), Some(b)) = (&c.chain_name, &v.chain_name)
        && a != b
    {
        return Err(ImportError::ChainMismatch {
            chain: a.clone(),
            versions: b.clone(),
        });
    }
    let id = options
        .chain_id
        .clone()
        .or_else(|| chain.and_then(|c| c.chain_id.clone()))
        .filter(|s| !s.trim().is_empty())
        .ok_or(ImportError::Missing {
            what: "chain-id (chain.json's chain_id)",
            flag: "--chain-id ID",
        })?;
    let daemon = options
        .daemon
        .clone()
        .or_else(|| chain.and_then(|c| c.daemon_name.clone()))
        .filter(|s| !s.trim().is_empty())
        .ok_or(ImportError::Missing {
            what: "daemon name (chain.json's daemon_name)",
            flag: "--daemon NAME",
        })?;
    for p in &options.platforms {
        if !crate::manifest::valid_platform(p) {
            return Err(ImportError::BadPlatform(p.clone()));
        }
    }

    // The versions: versions.json, else the older layout's codebase.versions in chain.json.
    let old_layout = inputs.chain.as_ref().and_then(|(source, c)| {
        let versions = c.codebase.as_ref()?.versions.as_deref()?;
        (!versions.is_empty()).then_some((source, versions))
    });
    let list = match (&inputs.versions, old_layout) {
        (Some((source, v)), old) if !v.versions.is_empty() => {
            if let Some((chain_source, _)) = old {
                notes.push(format!(
                    "{chain_source}: codebase.versions (the registry's older layout) is ignored: versions.json is given"
                ));
            }
            Some(VersionList {
                source: source.clone(),
                kind: "versions.json",
                versions: &v.versions,
            })
        }
        (_, Some((source, versions))) => {
            notes.push(format!(
                "{source}: versions read from codebase.versions (the registry's older layout, before versions.json)"
            ));
            Some(VersionList {
                source: format!("{source} codebase.versions"),
                kind: "chain.json codebase.versions",
                versions,
            })
        }
        _ => None,
    };

    // The versions to import: genesis first.
    let (entries, skipped_before) = match &list {
        Some(list) => {
            let all = list.versions;
            let start = if options.all {
                0
            } else if let Some(name) = &options.from {
                all.iter().position(|v| &v.name == name).ok_or_else(|| {
                    ImportError::UnknownVersion {
                        name: name.clone(),
                        names: all.iter().map(|v| v.name.clone()).collect(),
                    }
                })?
            } else {
                all.len().saturating_sub(2)
            };
            check_duplicates(list, start, &mut notes)?;
            let entries: Vec<Entry> = all[start..]
                .iter()
                .map(|v| entry(v, list.kind, &mut notes))
                .collect();
            (
                entries,
                all[..start].iter().map(|v| v.name.clone()).collect(),
            )
        }
        None => {
            if options.all || options.from.is_some() {
                return Err(ImportError::NeedsVersions {
                    flag: if options.all { "--all" } else { "--from" },
                });
            }
            let codebase = chain
                .and_then(|c| c.codebase.as_ref())
                .ok_or(ImportError::NoVersions)?;
            let origin = "chain.json codebase".to_string();
            let (binaries, skipped) = binaries(&origin, codebase.binaries.as_ref(), &mut notes);
            let entry = Entry {
                name: None,
                height: Ok(None),
                version: codebase
                    .recommended_version
                    .as_deref()
                    .or(codebase.tag.as_deref())
                    .filter(|v| !v.trim().is_empty())
                    .map(normalize_version),
                binaries,
                skipped,
                origin,
            };
            (vec![entry], Vec::<String>::new())
        }
    };
    let label = |i: usize, e: &Entry| -> String {
        if i == 0 {
            "genesis".to_string()
        } else {
            format!("upgrade {:?}", e.name.as_deref().unwrap_or(""))
        }
    };
    for e in &entries {
        if e.binaries.is_empty() {
            let detail = if e.skipped.is_empty() {
                String::new()
            } else {
                let what: Vec<String> = e
                    .skipped
                    .iter()
                    .map(|s| format!("{} is {}", s.platform, s.why))
                    .collect();
                format!(": {}", what.join("; "))
            };
            return Err(ImportError::NoBinaries {
                name: e.name.clone().unwrap_or_else(|| e.origin.clone()),
                detail,
                hint: no_binaries_hint(list.as_ref(), e.name.as_deref(), &e.skipped),
            });
        }
    }
    let mut seen: BTreeMap<String, &str> = BTreeMap::new();
    for e in entries.iter().skip(1) {
        let name = e.name.as_deref().unwrap_or_default();
        if let Some(why) = crate::manifest::unsafe_name(name) {
            return Err(ImportError::BadName {
                name: name.to_string(),
                why,
            });
        }
        if let Some(first) = seen.insert(name.to_lowercase(), name) {
            return Err(ImportError::DuplicateName {
                source_name: list.as_ref().map(|l| l.source.clone()).unwrap_or_default(),
                first: first.to_string(),
                second: name.to_string(),
            });
        }
    }

    // Platforms: those asked for (every imported version must have them), else the common ones.
    let all: BTreeSet<&String> = entries.iter().flat_map(|e| e.binaries.keys()).collect();
    // The platforms every version from `from` on has a binary for.
    let shared_from = |from: usize| -> Vec<String> {
        all.iter()
            .filter(|p| entries[from..].iter().all(|e| e.binaries.contains_key(**p)))
            .map(|p| p.to_string())
            .collect()
    };
    // The first later version from which every version has one of `wanted` (or any platform).
    let later_start = |wanted: Option<&str>| {
        (1..entries.len()).find_map(|from| {
            let shared = shared_from(from);
            let fits = match wanted {
                Some(p) => shared.iter().any(|s| s == p),
                None => !shared.is_empty(),
            };
            let name = entries[from].name.clone()?;
            fits.then_some((name, shared))
        })
    };
    let platforms: Vec<String> = if options.platforms.is_empty() {
        let common = shared_from(0);
        if common.is_empty() {
            let detail = entries
                .iter()
                .map(|e| {
                    format!(
                        "{}: {}",
                        e.name.as_deref().unwrap_or(&e.origin),
                        e.binaries.keys().cloned().collect::<Vec<_>>().join(" ")
                    )
                })
                .collect::<Vec<_>>()
                .join("; ");
            let hint = match later_start(None) {
                Some((name, shared)) => format!(
                    "start at a later version with --from {name}: from it on, every version has a binary for {}",
                    shared.join(", ")
                ),
                None => "write the binaries of the versions you need by hand (examples/minimal.toml shows the layout), then run cvx pin".into(),
            };
            return Err(ImportError::NoCommonPlatform { detail, hint });
        }
        common
    } else {
        let mut chosen: Vec<String> = Vec::new();
        for p in &options.platforms {
            if let Some(e) = entries.iter().find(|e| !e.binaries.contains_key(p)) {
                let mut ways = Vec::new();
                if let Some((name, _)) = later_start(Some(p)) {
                    ways.push(format!(
                        "start at a later version with --from {name} (from it on, every version has a binary for {p})"
                    ));
                }
                let common = shared_from(0);
                if common.is_empty() {
                    ways.push(format!("drop --platform {p}"));
                } else {
                    ways.push(format!(
                        "import the platforms every version has: --platform {}",
                        common.join(" --platform ")
                    ));
                }
                return Err(ImportError::PlatformMissing {
                    name: e.name.clone().unwrap_or_else(|| e.origin.clone()),
                    platform: p.clone(),
                    hint: ways.join(", or "),
                });
            }
            if !chosen.contains(p) {
                chosen.push(p.clone());
            }
        }
        chosen.sort();
        chosen
    };
    let dropped: Vec<&str> = all
        .iter()
        .filter(|p| !platforms.contains(p))
        .map(|p| p.as_str())
        .collect();
    if !dropped.is_empty() {
        let why = if options.platforms.is_empty() {
            "not every imported version has a binary for them"
        } else {
            "not asked for with --platform"
        };
        notes.push(format!("platforms dropped ({why}): {}", dropped.join(", ")));
    }

    // The document.
    let chain_name = chain
        .and_then(|c| c.chain_name.clone())
        .or_else(|| versions.and_then(|v| v.chain_name.clone()));
    let pretty = chain
        .and_then(|c| c.pretty_name.clone())
        .or(chain_name)
        .unwrap_or_else(|| id.clone());
    let pretty = one_line(&pretty);
    let mut header = String::new();
    let _ = writeln!(
        header,
        "# {pretty} ({}), imported from the chain registry by:",
        one_line(&id)
    );
    let _ = writeln!(header, "#   {}", one_line(&options.command));
    header.push_str(
        "# The plan names, heights, versions, URLs and checksums are the registry's: review them.\n",
    );
    if list.is_some() {
        if !skipped_before.is_empty() {
            let _ = writeln!(
                header,
                "# Earlier registry versions ({}) are left out: a node started from a recent",
                one_line(&span_of(&skipped_before))
            );
            header.push_str(
                "# snapshot runs the genesis binary below (--from NAME or --all imports more).\n",
            );
        }
    } else {
        header.push_str(
            "# Without versions.json, the genesis binary is chain.json's recommended version and no\n\
             # upgrade is listed: add each [[upgrade]] the chain votes for.\n",
        );
    }

    let mut doc = DocumentMut::new();
    let mut chain_table = Table::new();
    chain_table.decor_mut().set_prefix(header);
    chain_table.insert("id", toml_edit::value(id.clone()));
    chain_table.insert("daemon", toml_edit::value(daemon.clone()));
    let node_home = chain
        .and_then(|c| c.node_home.clone())
        .filter(|h| !h.trim().is_empty());
    let mut home_comment = None;
    match &node_home {
        Some(home) if home.starts_with('/') => {
            chain_table.insert("home", toml_edit::value(home.clone()));
        }
        Some(home) => {
            home_comment = Some(format!(
                "# home = {:?}  # the registry's node_home: not absolute; set the node's real home\n",
                home
            ));
        }
        None => {}
    }
    chain_table.insert(
        "platforms",
        toml_edit::value(Array::from_iter(platforms.iter().map(String::as_str))),
    );
    if let Some(comment) = home_comment
        && let Some(mut key) = chain_table.key_mut("platforms")
    {
        key.leaf_decor_mut().set_prefix(comment);
    }
    doc.insert("chain", Item::Table(chain_table));

    let mut unpinned = Vec::new();
    let mut last_height: Option<(u64, String)> = None;
    let mut last_version: Option<(semver::Version, String)> = None;
    let mut upgrades = toml_edit::ArrayOfTables::new();
    for (i, e) in entries.iter().enumerate() {
        let stage = label(i, e);
        let mut table = Table::new();
        let mut comment = String::from("\n");
        let mut pending = String::new(); // comments that go before the next key
        if i == 0 {
            let mut what = match &e.name {
                Some(name) => format!("# Registry version {name:?}"),
                None => format!("# The {}", e.origin),
            };
            if let Ok(Some(h)) = e.height {
                let _ = write!(what, " (upgrade height {h})");
            }
            what.push_str(": the binary the node starts with.\n");
            comment.push_str(&what);
        } else {
            let name = e.name.clone().unwrap_or_default();
            table.insert("name", toml_edit::value(name.clone()));
            match e.height.clone() {
                Ok(None) => {
                    notes.push(format!(
                        "{stage}: no height in the registry: written without one (plan cannot check its order, nor --node its height)"
                    ));
                    pending.push_str(
                        "# height: none in the registry; add the plan's height from its governance proposal\n",
                    );
                }
                Err(written) => {
                    notes.push(format!(
                        "{stage}: height {written} in the registry is not a block height: left out"
                    ));
                    let _ = writeln!(
                        pending,
                        "# height = {}  # the registry's; not a block height",
                        one_line(&written)
                    );
                }
                Ok(Some(h)) => match &last_height {
                    Some((prev, prev_name)) if h <= *prev => {
                        notes.push(format!("{stage}: height {h} is not above {prev} ({prev_name}): written as a comment"));
                        let _ = writeln!(
                            pending,
                            "# height = {h}  # the registry's; not above {prev_name}'s {prev}"
                        );
                    }
                    _ => {
                        table.insert("height", toml_edit::value(h as i64));
                        last_height = Some((h, name.clone()));
                    }
                },
            }
        }
        if let Some(v) = &e.version {
            let parsed = crate::manifest::parse_version(v).ok();
            let problem = match (&parsed, &last_version) {
                (None, _) => Some("not semver".to_string()),
                (Some(p), Some((prev, prev_text))) if p <= prev => {
                    Some(format!("not above {prev_text}"))
                }
                _ => None,
            };
            match problem {
                Some(why) => {
                    notes.push(format!(
                        "{stage}: version {v:?} is {why}: written as a comment"
                    ));
                    let _ = writeln!(pending, "# version = {v:?}  # the registry's; {why}");
                }
                None => {
                    insert_with(
                        &mut table,
                        "version",
                        toml_edit::value(v.clone()),
                        &mut pending,
                    );
                    last_version = parsed.map(|p| (p, v.clone()));
                }
            }
        }
        let mut binary = Table::new();
        binary.set_dotted(true);
        for platform in &platforms {
            let b = &e.binaries[platform];
            let mut artifact = InlineTable::new();
            artifact.insert("url", Value::from(b.url.clone()));
            artifact.insert("sha256", Value::from(b.sha256.clone().unwrap_or_default()));
            if b.sha256.is_none() {
                artifact.decor_mut().set_suffix(format!(" {PIN_TODO}"));
                unpinned.push(Unpinned {
                    used_by: format!("{stage} {platform}"),
                    url: b.url.clone(),
                });
            }
            binary.insert(platform, Item::Value(Value::InlineTable(artifact)));
        }
        // A dotted key's line takes its comment from the leaf: the first platform's key.
        if let Some(first) = platforms.first() {
            set_key_prefix(&mut binary, &pending, first);
        }
        table.insert("binary", Item::Table(binary));
        table.decor_mut().set_prefix(comment);
        if i == 0 {
            doc.insert("genesis", Item::Table(table));
        } else {
            upgrades.push(table);
        }
    }
    if !upgrades.is_empty() {
        doc.insert("upgrade", Item::ArrayOfTables(upgrades));
    }
    let text = doc.to_string();

    // The result must validate once pinned: check it with the empty pins filled by a stand-in.
    let stand_in = text.replace("sha256 = \"\"", &format!("sha256 = \"{}\"", "0".repeat(64)));
    if let Err(problems) = crate::manifest::parse(&stand_in) {
        let list = problems
            .iter()
            .map(|p| format!("  {p}"))
            .collect::<Vec<_>>()
            .join("\n");
        return Err(ImportError::Invalid(list));
    }

    let upgrade_names: Vec<&str> = entries
        .iter()
        .skip(1)
        .filter_map(|e| e.name.as_deref())
        .collect();
    let genesis = &entries[0];
    let summary = format!(
        "imported {id}: genesis {}{}, {} upgrade{}{}; platforms {}",
        genesis.name.as_deref().unwrap_or(&genesis.origin),
        genesis
            .version
            .as_deref()
            .map(|v| format!(" ({v})"))
            .unwrap_or_default(),
        upgrade_names.len(),
        if upgrade_names.len() == 1 { "" } else { "s" },
        if upgrade_names.is_empty() {
            String::new()
        } else {
            format!(" ({})", span_of(&upgrade_names))
        },
        platforms.join(", ")
    );
    Ok(Imported {
        text,
        unpinned,
        notes,
        summary,
    })
}

/// Registry text made fit for a TOML comment: no control characters (a newline would end it).
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() && c != '\t' { '?' } else { c })
        .collect()
}

/// `a`, `a, b`, or `a .. z` for a list of names.
fn span_of<S: AsRef<str>>(names: &[S]) -> String {
    match names {
        [] => String::new(),
        [one] => one.as_ref().to_string(),
        [a, b] => format!("{}, {}", a.as_ref(), b.as_ref()),
        [first, .., last] => format!("{} .. {}", first.as_ref(), last.as_ref()),
    }
}

/// Insert `key`, putting the pending comment lines before it.
fn insert_with(table: &mut Table, key: &str, item: Item, pending: &mut String) {
    table.insert(key, item);
    if !pending.is_empty() {
        set_key_prefix(table, pending, key);
        pending.clear();
    }
}

fn set_key_prefix(table: &mut Table, prefix: &str, key: &str) {
    if prefix.is_empty() {
        return;
    }
    if let Some(mut k) = table.key_mut(key) {
        k.leaf_decor_mut().set_prefix(prefix.to_string());
    }
}

/// Write `text` to `path` atomically (temp file in the same directory, fsync, rename); refuse an
/// existing file unless `force`.
pub fn write_new(path: &Path, text: &str, force: bool) -> Result<(), ImportError> {
    let write = |source| ImportError::Write {
        path: path.to_path_buf(),
        source,
    };
    if !force && path.exists() {
        return Err(ImportError::Exists {
            path: path.to_path_buf(),
        });
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut temp = tempfile::Builder::new()
        .prefix(".cvx-import-")
        .tempfile_in(dir)
        .map_err(write)?;
    temp.write_all(text.as_bytes()).map_err(write)?;
    temp.as_file().sync_all().map_err(write)?;
    {
        use std::os::unix::fs::PermissionsExt;
        temp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(write)?;
    }
    if force {
        temp.persist(path).map_err(|e| write(e.error))?;
    } else {
        temp.persist_noclobber(path).map_err(|e| {
            if e.error.kind() == std::io::ErrorKind::AlreadyExists {
                ImportError::Exists {
                    path: path.to_path_buf(),
                }
            } else {
                write(e.error)
            }
        })?;
    }
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
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
}
