//! Read-only inspection of the Cosmovisor tree under `$DAEMON_HOME` (DESIGN §3).
//!
//! Nothing here changes the tree. A home that does not exist is an empty tree, and
//! `upgrade-info.json` in any state (missing, empty, half-written, garbage) is a state to report,
//! never a failure.
//!
//! Owns the tree's layout (paths under `cosmovisor/`), its [`receipt`]s and its [`lock`], where
//! the commands that change the tree meet. Must not touch the manifest's meaning or the network:
//! the plan decides, apply and run write.

pub mod lock;
pub mod receipt;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::Serialize;

use receipt::{FileIdentity, Receipt};

/// Where everything lives under one `$DAEMON_HOME`.
#[derive(Debug, Clone)]
pub struct Layout {
    pub home: PathBuf,
}

impl Layout {
    pub fn new(home: impl Into<PathBuf>) -> Self {
        Layout { home: home.into() }
    }
    /// `$DAEMON_HOME/cosmovisor`; every tree-relative path in cvx is relative to it.
    pub fn root(&self) -> PathBuf {
        self.home.join("cosmovisor")
    }
    pub fn current(&self) -> PathBuf {
        self.root().join("current")
    }
    /// cvx's own directory: lock, partial downloads, receipts, files moved aside.
    pub fn cvx(&self) -> PathBuf {
        self.root().join(".cvx")
    }
    pub fn receipts(&self) -> PathBuf {
        self.cvx().join("receipts")
    }
    pub fn partial(&self) -> PathBuf {
        self.cvx().join("partial")
    }
    pub fn lock(&self) -> PathBuf {
        self.cvx().join("lock")
    }
    pub fn upgrade_info(&self) -> PathBuf {
        self.home.join("data").join("upgrade-info.json")
    }
    /// Files kept aside when replaced: `.cvx/replaced/<stage>/bin/<name>.<time>`.
    pub fn replaced(&self) -> PathBuf {
        self.cvx().join("replaced")
    }
    /// Whom what cvx creates here belongs to, when cvx runs as root on another user's home.
    pub fn owner(&self) -> Option<crate::owner::Owner> {
        crate::owner::Owner::of_home(&self.home)
    }
}

/// The tree-relative directory of a stage: `genesis` or `upgrades/<dir>`.
pub const GENESIS: &str = "genesis";

/// The directory Cosmovisor uses for a plan name: lower-cased unless recase is disabled, then
/// escaped as Go's `url.PathEscape` does, so both tools find the same directory.
pub fn upgrade_dir(name: &str, recase: bool) -> String {
    let name = if recase {
        name.to_lowercase()
    } else {
        name.to_string()
    };
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        let keep = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'_' | b'.' | b'~' | b'$' | b'&' | b'+' | b':' | b'=' | b'@'
            );
        if keep {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    format!("upgrades/{out}")
}

/// The stage `current` points to (`genesis` or `upgrades/<dir>`), or `current` itself when the
/// link leads elsewhere (then no receipt or pin applies).
pub fn current_stage(layout: &Layout) -> String {
    let target = std::fs::read_link(layout.current()).unwrap_or_default();
    let target = target.to_string_lossy();
    let target = target.trim_end_matches('/');
    let is_stage = target == GENESIS
        || target
            .strip_prefix("upgrades/")
            .is_some_and(|d| !d.is_empty() && !d.contains('/') && d != "." && d != "..");
    if is_stage {
        target.to_string()
    } else {
        "current".to_string()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    Regular,
    Symlink,
    Other,
}

/// One file found in a stage's `bin/` or `lib/`.
#[derive(Debug, Clone, Serialize)]
pub struct StagedFile {
    pub kind: FileKind,
    pub size: u64,
    /// None for files in directories the manifest does not name (not hashed) and non-files.
    pub sha256: Option<String>,
    /// True when the sha256 is the receipt's, trusted because the file's identity is unchanged.
    pub from_receipt: bool,
    #[serde(skip)]
    pub receipt: Option<Receipt>,
    pub executable: bool,
}

/// A stage directory: `genesis` or `upgrades/<dir>`; files keyed `bin/<name>` or `lib/<name>`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StageDir {
    pub files: BTreeMap<String, StagedFile>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Current {
    Missing,
    /// A symlink; `stage` is `genesis` or `upgrades/<dir>` when the target is one of them.
    Link {
        target: String,
        stage: Option<String>,
        exists: bool,
    },
    NotALink,
}

/// The plan the node wrote at its upgrade height, as found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum UpgradeInfo {
    Missing,
    Empty,
    /// Cut short: the node may be writing it right now (x/upgrade does not write atomically).
    Partial {
        error: String,
    },
    Invalid {
        error: String,
    },
    Valid(PlanInfo),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlanInfo {
    pub name: String,
    pub height: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub info: String,
}

/// Parse `upgrade-info.json` tolerantly, as x/upgrade writes it.
pub fn parse_upgrade_info(bytes: &[u8]) -> UpgradeInfo {
    #[derive(serde::Deserialize)]
    struct Raw {
        #[serde(default)]
        name: String,
        #[serde(default)]
        height: serde_json::Value,
        #[serde(default)]
        info: String,
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return UpgradeInfo::Empty;
    }
    let raw: Raw = match serde_json::from_slice(bytes) {
        Ok(raw) => raw,
        Err(e) if e.is_eof() => {
            return UpgradeInfo::Partial {
                error: e.to_string(),
            };
        }
        Err(e) => {
            return UpgradeInfo::Invalid {
                error: e.to_string(),
            };
        }
    };
    // x/upgrade writes int64 heights as numbers; proto-JSON writes them as strings.
    let height = match &raw.height {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    };
    if raw.name == "." || raw.name == ".." {
        return UpgradeInfo::Invalid {
            error: format!(
                "upgrade name {:?} would name the upgrades directory or its parent",
                raw.name
            ),
        };
    }
    match (raw.name.is_empty(), height) {
        (true, _) => UpgradeInfo::Invalid {
            error: "no upgrade name".into(),
        },
        (false, Some(height)) if height > 0 => UpgradeInfo::Valid(PlanInfo {
            name: raw.name,
            height,
            info: raw.info,
        }),
        _ => UpgradeInfo::Invalid {
            error: format!("height {} is not a positive integer", raw.height),
        },
    }
}

/// What is on disk, as one value the plan reads.
#[derive(Debug, Clone, Serialize)]
pub struct Tree {
    /// `$DAEMON_HOME/cosmovisor`, or None when no home is known.
    pub root: Option<PathBuf>,
    /// `genesis` and `upgrades/<dir>` directories found.
    pub stages: BTreeMap<String, StageDir>,
    pub current: Current,
    pub upgrade_info: UpgradeInfo,
}

impl Tree {
    /// The tree of a home that is not known or does not exist.
    pub fn empty(root: Option<PathBuf>) -> Self {
        Tree {
            root,
            stages: BTreeMap::new(),
            current: Current::Missing,
            upgrade_info: UpgradeInfo::Missing,
        }
    }
}

#[derive(Debug, Default)]
pub struct InspectOptions {
    /// Re-hash every file, trusting no receipt.
    pub verify: bool,
    /// Stages whose files are hashed (`genesis`, `upgrades/<dir>`): those the manifest names.
    pub managed: BTreeSet<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn read_err(path: &Path) -> impl FnOnce(io::Error) -> TreeError + '_ {
    move |source| TreeError::Read {
        path: path.to_path_buf(),
        source,
    }
}

/// Inspect the tree under `layout`, hashing the files of managed stages in parallel.
pub fn inspect(layout: &Layout, options: &InspectOptions) -> Result<Tree, TreeError> {
    let root = layout.root();
    let mut tree = Tree::empty(Some(root.clone()));
    tree.upgrade_info = inspect_upgrade_info(layout);
    if !root.exists() {
        return Ok(tree);
    }
    tree.current = inspect_current(layout)?;

    let mut stages = Vec::new();
    if root.join(GENESIS).is_dir() {
        stages.push(GENESIS.to_string());
    }
    let upgrades = root.join("upgrades");
    match fs::read_dir(&upgrades) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry.map_err(read_err(&upgrades))?;
                if entry.path().is_dir() {
                    stages.push(format!("upgrades/{}", entry.file_name().to_string_lossy()));
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(read_err(&upgrades)(e)),
    }

    let receipts_dir = layout.receipts();
    let mut to_hash = Vec::new();
    for stage in stages {
        let managed = options.managed.contains(&stage);
        let mut dir = StageDir::default();
        for sub in ["bin", "lib"] {
            let path = root.join(&stage).join(sub);
            let entries = match fs::read_dir(&path) {
                Ok(entries) => entries,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                    ) =>
                {
                    continue;
                }
                Err(e) => return Err(read_err(&path)(e)),
            };
            for entry in entries {
                let entry = entry.map_err(read_err(&path))?;
                let name = format!("{sub}/{}", entry.file_name().to_string_lossy());
                let meta = fs::symlink_metadata(entry.path()).map_err(read_err(&entry.path()))?;
                let kind = if meta.file_type().is_symlink() {
                    FileKind::Symlink
                } else if meta.is_file() {
                    FileKind::Regular
                } else {
                    FileKind::Other
                };
                let rel = format!("{stage}/{name}");
                let receipt = (kind == FileKind::Regular && managed)
                    .then(|| receipt::read(&receipts_dir, &rel))
                    .flatten();
                let trusted = receipt
                    .as_ref()
                    .filter(|r| !options.verify && receipt_holds(&receipts_dir, &rel, r, &meta))
                    .map(|r| r.sha256.clone());
                if kind == FileKind::Regular && managed && trusted.is_none() {
                    to_hash.push((stage.clone(), name.clone(), entry.path()));
                }
                dir.files.insert(
                    name,
                    StagedFile {
                        kind,
                        size: meta.len(),
                        from_receipt: trusted.is_some(),
                        sha256: trusted,
                        receipt,
                        executable: meta.permissions().mode() & 0o111 != 0,
                    },
                );
            }
        }
        tree.stages.insert(stage, dir);
    }

    for (stage, name, result) in hash_all(to_hash) {
        let (sha256, _) = result?;
        if let Some(file) = tree
            .stages
            .get_mut(&stage)
            .and_then(|d| d.files.get_mut(&name))
        {
            file.sha256 = Some(sha256);
        }
    }
    Ok(tree)
}

/// `data/upgrade-info.json` as found, in whatever state.
pub fn inspect_upgrade_info(layout: &Layout) -> UpgradeInfo {
    match fs::read(layout.upgrade_info()) {
        Ok(bytes) => parse_upgrade_info(&bytes),
        Err(e) if e.kind() == io::ErrorKind::NotFound => UpgradeInfo::Missing,
        Err(e) => UpgradeInfo::Invalid {
            error: format!("cannot read {}: {e}", layout.upgrade_info().display()),
        },
    }
}

/// Whether a receipt still vouches for the file: same identity, and written after the file's
/// last change by a clear clock tick. Timestamps are coarse (a few ms on ext4): a write in the
/// same tick as the install would leave the identity unchanged, so such a receipt is not trusted
/// and the file is hashed instead, as git treats "racily clean" entries.
pub fn receipt_holds(
    receipts_dir: &Path,
    rel: &str,
    receipt: &Receipt,
    meta: &fs::Metadata,
) -> bool {
    let identity = FileIdentity::of(meta);
    if receipt.identity != identity {
        return false;
    }
    fs::metadata(receipt::receipt_path(receipts_dir, rel))
        .map(|m| FileIdentity::of(&m).mtime_ns > identity.ctime_ns)
        .unwrap_or(false)
}

type HashResult = Result<(String, u64), TreeError>;

/// Hash files on as many threads as the machine has cores: a big tree is bound by hashing.
fn hash_all(files: Vec<(String, String, PathBuf)>) -> Vec<(String, String, HashResult)> {
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(files.len());
    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::with_capacity(files.len()));
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((stage, name, path)) = files.get(i) else {
                        break;
                    };
                    let result = crate::hash::sha256_file(path).map_err(read_err(path));
                    results.lock().unwrap_or_else(|e| e.into_inner()).push((
                        stage.clone(),
                        name.clone(),
                        result,
                    ));
                }
            });
        }
    });
    results.into_inner().unwrap_or_else(|e| e.into_inner())
}

fn inspect_current(layout: &Layout) -> Result<Current, TreeError> {
    let path = layout.current();
    let meta = match fs::symlink_metadata(&path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Current::Missing),
        Err(e) => return Err(read_err(&path)(e)),
    };
    if !meta.file_type().is_symlink() {
        return Ok(Current::NotALink);
    }
    let target = fs::read_link(&path).map_err(read_err(&path))?;
    let root = layout.root();
    // Cosmovisor writes relative links; older versions wrote absolute ones into the same root.
    let relative = target.strip_prefix(&root).unwrap_or(&target);
    let parts: Vec<_> = relative
        .components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let stage = match parts.as_slice() {
        [g] if g == GENESIS => Some(GENESIS.to_string()),
        [u, dir] if u == "upgrades" && dir != ".." => Some(format!("upgrades/{dir}")),
        _ => None,
    };
    Ok(Current::Link {
        target: target.to_string_lossy().into_owned(),
        exists: path.is_dir(),
        stage,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_names_follow_cosmovisor() {
        assert_eq!(upgrade_dir("V26", true), "upgrades/v26");
        assert_eq!(upgrade_dir("V26", false), "upgrades/V26");
        assert_eq!(upgrade_dir("v28.0.1+", true), "upgrades/v28.0.1+");
        assert_eq!(upgrade_dir("a b/c?", true), "upgrades/a%20b%2Fc%3F");
    }

    #[test]
    fn upgrade_info_states() {
        assert_eq!(parse_upgrade_info(b""), UpgradeInfo::Empty);
        assert!(matches!(
            parse_upgrade_info(b"{\"name\":\"v2\",\"hei"),
            UpgradeInfo::Partial { .. }
        ));
        assert!(matches!(
            parse_upgrade_info(b"garbage"),
            UpgradeInfo::Invalid { .. }
        ));
        assert!(matches!(
            parse_upgrade_info(b"{\"height\":5}"),
            UpgradeInfo::Invalid { .. }
        ));
        for name in [".", ".."] {
            assert!(matches!(
                parse_upgrade_info(format!("{{\"name\":\"{name}\",\"height\":5}}").as_bytes()),
                UpgradeInfo::Invalid { .. }
            ));
        }
        assert_eq!(
            parse_upgrade_info(
                br#"{"name":"v2","time":"0001-01-01T00:00:00Z","height":"7","info":"x"}"#
            ),
            UpgradeInfo::Valid(PlanInfo {
                name: "v2".into(),
                height: 7,
                info: "x".into()
            })
        );
    }

    #[test]
    fn a_receipt_from_the_files_own_clock_tick_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let file = layout.root().join("genesis/bin/simd");
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, b"binary").unwrap();
        let meta = std::fs::metadata(&file).unwrap();
        let receipt = Receipt {
            path: "genesis/bin/simd".into(),
            sha256: "recorded".into(),
            size: 6,
            source_url: "/src".into(),
            source_sha256: "pin".into(),
            member: None,
            identity: FileIdentity::of(&meta),
        };
        receipt::write(&layout.receipts(), &receipt, None).unwrap();
        let options = InspectOptions {
            verify: false,
            managed: [GENESIS.to_string()].into(),
        };
        let sha = |tree: &Tree| {
            tree.stages[GENESIS].files["bin/simd"]
                .sha256
                .clone()
                .unwrap()
        };
        assert_eq!(
            sha(&inspect(&layout, &options).unwrap()),
            "recorded",
            "trusted: written after the file"
        );

        // Back-date the receipt into the file's tick: a change then would not show, so hash.
        let path = receipt::receipt_path(&layout.receipts(), "genesis/bin/simd");
        let ctime = std::time::UNIX_EPOCH
            + std::time::Duration::from_nanos(receipt.identity.ctime_ns as u64);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(ctime)
            .unwrap();
        let tree = inspect(&layout, &options).unwrap();
        assert_eq!(
            sha(&tree),
            crate::hash::sha256_reader(&b"binary"[..]).unwrap().0
        );
        assert!(!tree.stages[GENESIS].files["bin/simd"].from_receipt);
    }
}
