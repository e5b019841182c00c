//! The manifest (`cvx.toml`): one chain, its genesis binary and its expected upgrades.
//!
//! The TOML is read once into spanned values, walked by [`read`] which reports every problem it
//! finds with its line and column, and only then turned into the types below, which the rest of
//! cvx uses. The same types generate `schemas/manifest.schema.json`, and a test checks that serde
//! reads every example to the same value as the walker, so the schema and the walker cannot drift.
//!
//! Owns the manifest's format and validation. Must not touch the tree or the network.

mod read;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use read::parse;
pub(crate) use read::{parse_version, strip_sha256_prefix, unsafe_name, valid_platform};

/// A manifest as validated: the public key names of DESIGN §2, exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(
    title = "cvx manifest",
    description = "One Cosmos SDK chain: its daemon, its genesis binary and its expected upgrades, each pinned by sha256 for every platform."
)]
pub struct Manifest {
    pub chain: Chain,
    pub genesis: Genesis,
    /// Upgrades in the order the chain will run them.
    #[serde(default, rename = "upgrade", skip_serializing_if = "Vec::is_empty")]
    pub upgrades: Vec<Upgrade>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Chain {
    /// The chain-id, e.g. "osmosis-1".
    #[schemars(length(min = 1))]
    pub id: String,
    /// The daemon's file name (DAEMON_NAME), e.g. "osmosisd".
    #[schemars(length(min = 1))]
    pub daemon: String,
    /// The node's home (DAEMON_HOME) unless --home or DAEMON_HOME say otherwise. Absolute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home: Option<PathBuf>,
    /// Every binary must be pinned for each of these "os/arch" platforms. Defaults to the
    /// platforms the genesis binary is pinned for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = r"^[a-z0-9]+/[a-z0-9]+$")))]
    pub platforms: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Genesis {
    /// The version `<daemon> version` prints (semver, a leading "v" allowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The binary for each platform, keyed "os/arch".
    pub binary: BTreeMap<String, Artifact>,
    /// Shared libraries for each platform, staged into `genesis/lib/`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub library: BTreeMap<String, Vec<Library>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Upgrade {
    /// The on-chain plan name, exactly as governance wrote it.
    #[schemars(length(min = 1))]
    pub name: String,
    /// The plan's height; checked for order and against the chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub height: Option<u64>,
    /// The version `<daemon> version` prints (semver, a leading "v" allowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// What halts the node for this upgrade: an on-chain plan ("governance", the default), or
    /// `cvx run` itself at `height` ("halt-height": a coordinated patch or hard fork).
    #[serde(default, skip_serializing_if = "Trigger::is_governance")]
    pub trigger: Trigger,
    /// The binary for each platform, keyed "os/arch".
    pub binary: BTreeMap<String, Artifact>,
    /// Shared libraries for each platform, staged into `upgrades/<dir>/lib/`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub library: BTreeMap<String, Vec<Library>>,
}

/// What halts the node for an upgrade (DESIGN §5.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Trigger {
    /// x/upgrade halts the node at the plan's height and writes `data/upgrade-info.json`.
    #[default]
    Governance,
    /// No on-chain plan: `cvx run` starts the node with `--halt-height <height>` and upgrades it
    /// once it has halted there.
    HaltHeight,
}

impl Trigger {
    pub fn is_governance(&self) -> bool {
        *self == Trigger::Governance
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Governance => "governance",
            Trigger::HaltHeight => "halt-height",
        }
    }
}

/// A binary to download: a plain file, or an archive holding it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    /// https:// (preferred), http://, file:// or an absolute path.
    pub url: String,
    /// The sha256 of what `url` serves, 64 hex digits (a `sha256:` prefix is accepted).
    #[schemars(regex(pattern = r"^(sha256:)?[0-9a-fA-F]{64}$"))]
    pub sha256: String,
    /// For archives: the member to install.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// A shared library staged next to the binary, in `lib/`: a plain file, or a member of an archive
/// (often the same archive, pinned once, that holds the binary).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Library {
    /// https:// (preferred), http://, file:// or an absolute path.
    pub url: String,
    /// The sha256 of what `url` serves, 64 hex digits (a `sha256:` prefix is accepted).
    #[schemars(regex(pattern = r"^(sha256:)?[0-9a-fA-F]{64}$"))]
    pub sha256: String,
    /// For archives (required there): the member to install, e.g. "lib/libwasmvm.x86_64.so".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The file name in `lib/`; defaults to the last segment of `path`, else of the URL's path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Library {
    /// The file name this library is staged under. Validation guarantees it exists.
    pub fn file_name(&self) -> &str {
        match (&self.name, &self.path) {
            (Some(name), _) => name,
            (None, Some(path)) => path.rsplit('/').next().unwrap_or_default(),
            (None, None) => url_file_name(&self.url).unwrap_or_default(),
        }
    }
}

/// The file name suffixes (lower-case) of the archives cvx unpacks; `apply::unpack` maps each to
/// its format (a test there keeps the two lists equal).
pub const ARCHIVE_SUFFIXES: &[&str] = &[
    ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.zst", ".tzst", ".zip",
];

/// Whether `url` names an archive cvx unpacks (`.tar.gz`, `.zip`, ...), by its file name.
pub fn is_archive_url(url: &str) -> bool {
    let name = url_file_name(url).unwrap_or_default().to_ascii_lowercase();
    ARCHIVE_SUFFIXES.iter().any(|ext| name.ends_with(ext))
}

/// The last segment of a URL's or path's path, without query or fragment.
pub fn url_file_name(url: &str) -> Option<&str> {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    path.rsplit('/').next().filter(|name| !name.is_empty())
}

/// A manifest as loaded from disk, with where it came from and what deserves a warning.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub path: PathBuf,
    pub manifest: Manifest,
    pub warnings: Vec<Problem>,
}

impl Manifest {
    /// The platforms every binary must be pinned for: `chain.platforms`, else the genesis pins.
    pub fn platforms(&self) -> Vec<String> {
        if self.chain.platforms.is_empty() {
            self.genesis.binary.keys().cloned().collect()
        } else {
            self.chain.platforms.clone()
        }
    }
}

/// Read and validate the manifest at `path`.
pub fn load(path: &Path) -> Result<Loaded, ManifestError> {
    let source = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let (manifest, warnings) = parse(&source).map_err(|problems| ManifestError::Invalid {
        path: path.to_path_buf(),
        text: source.clone(),
        problems,
    })?;
    Ok(Loaded {
        path: path.to_path_buf(),
        manifest,
        warnings,
    })
}

/// One finding of validation, located in the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// 1-based line and column of the offending key or value.
    pub line: usize,
    pub column: usize,
    /// Byte range in the source, for showing the line.
    #[serde(skip)]
    pub span: std::ops::Range<usize>,
    /// The key, as a path: `upgrade[2].binary."linux/amd64".sha256`.
    pub key: String,
    pub message: String,
    /// What would be valid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.line, self.column)?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read manifest {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {} problem{} found", path.display(), problems.len(), if problems.len() == 1 { "" } else { "s" })]
    Invalid {
        path: PathBuf,
        text: String,
        problems: Vec<Problem>,
    },
}
