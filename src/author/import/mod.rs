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
//!
//! Here: the command, its errors and the values passed between reading and writing. Reading the
//! registry: `read.rs`; writing the manifest: `write.rs`; tests: `tests.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml_edit::{Array, DocumentMut, InlineTable, Item, Table, Value};

use crate::apply::fetch::{self, FetchError, FetchOptions};

mod read;
mod write;

pub use read::read_inputs;
use read::*;
use write::*;
pub use write::{convert, write_new};

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

#[cfg(test)]
mod tests;
