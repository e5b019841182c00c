//! `cvx pin`: fill every empty (or absent) `sha256` in a manifest by downloading the artifact and
//! hashing what it serves (trust on first use), rewriting the manifest in place with its comments
//! and layout kept; `cvx pin --verify` downloads every pinned artifact again and reports the pins
//! that no longer match, writing nothing.
//!
//! The manifest is read with toml_edit, not through validation (an empty sha256 is a validation
//! error): the walk visits `genesis.binary.*`, `genesis.library.*[]`, `upgrade[].binary.*` and
//! `upgrade[].library.*[]`, inline tables or standard ones. Downloads are all-or-nothing: one that
//! fails leaves the file untouched. The new text is written atomically (temp file in the same
//! directory, fsync, rename) and then validated.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use toml_edit::{DocumentMut, InlineTable, Item, Table, TableLike, Value};

use crate::apply::fetch;
use crate::errors::error_chain;
use crate::manifest::ManifestError;

#[derive(Debug, clap::Args)]
pub struct PinArgs {
    /// The manifest.
    #[arg(short = 'm', long, env = "CVX_MANIFEST", default_value = "cvx.toml")]
    pub manifest: PathBuf,
    /// Download every pinned artifact again and report the pins that no longer match what the
    /// URL serves (exit 1); writes nothing.
    #[arg(long)]
    pub verify: bool,
    /// Downloads at once.
    #[arg(long, short = 'j', default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub jobs: u16,
    /// Attempts after a transient failure (connection, timeout, 5xx) of one download.
    #[arg(long, default_value_t = 4)]
    pub retries: u32,
    /// Refuse artifacts larger than this many MiB.
    #[arg(long, default_value_t = 4096, value_name = "MIB")]
    pub max_size: u64,
    /// More logs on stderr (-v debug, -vv trace).
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors on stderr: no notes, no warnings, no list of what was pinned.
    #[arg(short, long, conflicts_with = "verbose")]
    pub quiet: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(
        "{failed} of {total} download{} failed; {} was not changed",
        if *total == 1 { "" } else { "s" },
        path.display()
    )]
    Downloads {
        path: PathBuf,
        failed: usize,
        total: usize,
    },
    #[error("{} changed while cvx pin was downloading; nothing was written", path.display())]
    Changed { path: PathBuf },
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{count} artifact{} in {} ha{} no url to download", if *count == 1 { "" } else { "s" }, path.display(), if *count == 1 { "s" } else { "ve" })]
    NoUrl { path: PathBuf, count: usize },
    #[error(transparent)]
    Fetch(#[from] fetch::FetchError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("{} is not TOML cvx can edit: {problem}", path.display())]
    NotToml { path: PathBuf, problem: String },
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
}

impl PinError {
    pub fn hint(&self) -> Option<String> {
        match self {
            PinError::Downloads { .. } => {
                Some("fix the URLs above (or the network) and run cvx pin again".into())
            }
            PinError::Changed { .. } => Some("run cvx pin again".into()),
            PinError::NoUrl { .. } => Some("give each artifact url = \"https://...\"".into()),
            _ => None,
        }
    }
}

/// One artifact table in the manifest: an inline table (`{ url = ..., sha256 = ... }`) or a
/// standard one (`[genesis.binary."linux/amd64"]`).
enum Slot<'a> {
    Inline(&'a mut InlineTable),
    Table(&'a mut Table),
}

impl Slot<'_> {
    fn table(&self) -> &dyn TableLike {
        match self {
            Slot::Inline(t) => *t,
            Slot::Table(t) => *t,
        }
    }

    fn table_mut(&mut self) -> &mut dyn TableLike {
        match self {
            Slot::Inline(t) => *t,
            Slot::Table(t) => *t,
        }
    }

    fn string(&self, key: &str) -> Option<String> {
        self.table()
            .get(key)
            .and_then(Item::as_str)
            .map(str::to_string)
    }

    /// Set `sha256` as a person would write it: an existing value keeps its place and spacing; a
    /// new one goes right after `url`, an inline table then spaced as `{ url = "...", sha256 =
    /// "..." }`. The TODO comment about the missing pin goes, the line's end stays.
    fn set_sha256(&mut self, sha256: &str) {
        match self.table_mut().get_mut("sha256") {
            Some(Item::Value(value)) => {
                let mut decor = value.decor().clone();
                drop_pin_todo(&mut decor);
                *value = Value::from(sha256);
                *value.decor_mut() = decor;
            }
            _ => match self {
                Slot::Inline(t) => {
                    t.insert("sha256", Value::from(sha256));
                    t.sort_values_by(|a, _, b, _| key_rank(a).cmp(&key_rank(b)));
                    t.fmt();
                }
                Slot::Table(t) => {
                    t.insert("sha256", toml_edit::value(sha256));
                    t.sort_values_by(|a, _, b, _| key_rank(a).cmp(&key_rank(b)));
                }
            },
        }
        if let Slot::Inline(t) = self {
            drop_pin_todo(t.decor_mut());
        }
    }
}

/// Where a key of an artifact goes, as the manifest's documentation orders them.
fn key_rank(key: &str) -> usize {
    ["url", "sha256", "path", "name"]
        .iter()
        .position(|k| *k == key)
        .unwrap_or(usize::MAX)
}

/// Remove the TODO comment about the missing pin from a value's trailing decor, keeping what
/// follows it (the line's end).
fn drop_pin_todo(decor: &mut toml_edit::Decor) {
    let Some(suffix) = decor.suffix().and_then(|s| s.as_str()) else {
        return;
    };
    let (comment, rest) = suffix
        .split_once('\n')
        .map_or((suffix, ""), |(c, r)| (c, r));
    if is_pin_todo(comment) {
        let rest = if suffix.contains('\n') {
            format!("\n{rest}")
        } else {
            String::new()
        };
        decor.set_suffix(rest);
    }
}

/// A comment `cvx import` writes on a line whose sha256 is missing (`# TODO: ... cvx pin`).
fn is_pin_todo(text: &str) -> bool {
    let text = text.trim();
    text.starts_with('#') && text.contains("TODO") && text.contains("cvx pin")
}

fn slot(item: &mut Item) -> Option<Slot<'_>> {
    match item {
        Item::Table(t) => Some(Slot::Table(t)),
        Item::Value(Value::InlineTable(t)) => Some(Slot::Inline(t)),
        _ => None,
    }
}

/// Visit every artifact of the manifest, labelled as `cvx plan --verify-remote` labels them.
fn walk(doc: &mut DocumentMut, visit: &mut dyn FnMut(String, Slot<'_>)) {
    if let Some(genesis) = doc.get_mut("genesis").and_then(Item::as_table_like_mut) {
        stage(genesis, "genesis", visit);
    }
    match doc.get_mut("upgrade") {
        Some(Item::ArrayOfTables(upgrades)) => {
            for (i, table) in upgrades.iter_mut().enumerate() {
                let label = upgrade_label(table, i);
                stage(table, &label, visit);
            }
        }
        Some(Item::Value(Value::Array(upgrades))) => {
            for (i, value) in upgrades.iter_mut().enumerate() {
                if let Value::InlineTable(table) = value {
                    let label = upgrade_label(table, i);
                    stage(table, &label, visit);
                }
            }
        }
        _ => {}
    }
}

fn upgrade_label(table: &dyn TableLike, index: usize) -> String {
    match table.get("name").and_then(Item::as_str) {
        Some(name) => format!("upgrade {name}"),
        None => format!("upgrade #{}", index + 1),
    }
}

fn stage(table: &mut dyn TableLike, label: &str, visit: &mut dyn FnMut(String, Slot<'_>)) {
    if let Some(binaries) = table.get_mut("binary").and_then(Item::as_table_like_mut) {
        for (platform, item) in binaries.iter_mut() {
            if let Some(slot) = slot(item) {
                visit(format!("{label} {} binary", platform.get()), slot);
            }
        }
    }
    if let Some(libraries) = table.get_mut("library").and_then(Item::as_table_like_mut) {
        for (platform, item) in libraries.iter_mut() {
            let what = format!("{label} {} library", platform.get());
            match item {
                Item::Value(Value::Array(list)) => {
                    for value in list.iter_mut() {
                        if let Value::InlineTable(t) = value {
                            visit(what.clone(), Slot::Inline(t));
                        }
                    }
                }
                Item::ArrayOfTables(list) => {
                    for t in list.iter_mut() {
                        visit(what.clone(), Slot::Table(t));
                    }
                }
                _ => {}
            }
        }
    }
}

/// An artifact as the manifest states it.
struct Artifact {
    used_by: String,
    url: Option<String>,
    sha256: Option<String>,
}

impl Artifact {
    fn pinned(&self) -> bool {
        self.sha256.as_deref().is_some_and(|s| !s.trim().is_empty())
    }
}

fn artifacts(doc: &mut DocumentMut) -> Vec<Artifact> {
    let mut all = Vec::new();
    walk(doc, &mut |used_by, slot| {
        all.push(Artifact {
            used_by,
            url: slot.string("url").filter(|u| !u.trim().is_empty()),
            sha256: slot.string("sha256"),
        });
    });
    all
}

/// `cvx pin` and `cvx pin --verify`: `Ok(false)` when `--verify` found a mismatch, a failed
/// download or an unpinned artifact (the caller exits 1).
pub fn run(args: PinArgs) -> Result<bool, PinError> {
    let path = &args.manifest;
    let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
        path: path.clone(),
        source,
    })?;
    let mut doc: DocumentMut = match text.parse() {
        Ok(doc) => doc,
        // The validator says where the syntax breaks, as for every other command.
        Err(_) => return Err(invalid(path, &text).unwrap_or_else(|| not_toml(path, &text))),
    };
    let all = artifacts(&mut doc);
    let targets: Vec<&Artifact> = all.iter().filter(|a| a.pinned() == args.verify).collect();
    let no_url = targets.iter().filter(|a| a.url.is_none()).count();
    if no_url > 0 {
        for a in targets.iter().filter(|a| a.url.is_none()) {
            eprintln!("error: {}: no url", a.used_by);
        }
        return Err(PinError::NoUrl {
            path: path.clone(),
            count: no_url,
        });
    }

    // Each distinct URL once, with every place that uses it.
    let mut urls: BTreeMap<String, Vec<&Artifact>> = BTreeMap::new();
    for a in &targets {
        urls.entry(a.url.clone().unwrap_or_default())
            .or_default()
            .push(a);
    }
    if targets.is_empty() && !args.quiet {
        if args.verify {
            eprintln!(
                "{}: no artifact is pinned; nothing to verify",
                path.display()
            );
        } else {
            eprintln!(
                "{}: every artifact already has a sha256; nothing to pin",
                path.display()
            );
        }
    }
    let options = fetch::FetchOptions {
        max_size: args.max_size.saturating_mul(1 << 20),
        retries: args.retries,
        ..fetch::FetchOptions::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(PinError::Runtime)?;
    let sources: Vec<String> = urls.keys().cloned().collect();
    let results = runtime.block_on(fetch::digest_all(
        sources.clone(),
        usize::from(args.jobs),
        &options,
    ))?;
    let digests: Digests = sources
        .into_iter()
        .zip(results)
        .map(|(url, (result, _))| (url, result.map_err(|e| error_chain(&e))))
        .collect();

    let mut failed = 0;
    for (url, result) in &digests {
        if let Err(e) = result {
            failed += 1;
            eprintln!("error: cannot download {url}: {e}");
            for a in &urls[url] {
                eprintln!("  used by {}", a.used_by);
            }
        }
    }

    if args.verify {
        return verify_report(&all, &urls, &digests, failed, args.quiet);
    }
    if failed > 0 {
        return Err(PinError::Downloads {
            path: path.clone(),
            failed,
            total: digests.len(),
        });
    }
    if targets.is_empty() {
        return match invalid(path, &text) {
            Some(e) => Err(e),
            None => Ok(true),
        };
    }

    let found: BTreeMap<&str, &fetch::Digest> = digests
        .iter()
        .filter_map(|(url, r)| r.as_ref().ok().map(|d| (url.as_str(), d)))
        .collect();
    let mut filled = 0;
    walk(&mut doc, &mut |_, mut slot| {
        let missing = slot.string("sha256").is_none_or(|s| s.trim().is_empty());
        if let (true, Some(url)) = (missing, slot.string("url"))
            && let Some(d) = found.get(url.as_str())
        {
            slot.set_sha256(&d.sha256);
            filled += 1;
        }
    });
    let new_text = doc.to_string();
    write_in_place(path, &text, &new_text)?;

    if !args.quiet {
        report_pins(path, &found, &urls, filled);
    }
    match invalid(path, &new_text) {
        Some(e) => Err(e),
        None => Ok(true),
    }
}

/// What was pinned, from where, for whom: the operator compares these with the release's own
/// checksums.
fn report_pins(
    path: &Path,
    found: &BTreeMap<&str, &fetch::Digest>,
    urls: &BTreeMap<String, Vec<&Artifact>>,
    filled: usize,
) {
    eprintln!(
        "trust on first use: each sha256 below is what its URL served just now, not a checksum \
         anyone published; compare it with the release's own checksums before relying on it."
    );
    for (url, d) in found {
        let uses: Vec<&str> = urls[*url].iter().map(|a| a.used_by.as_str()).collect();
        eprintln!(
            "  pinned {} {url} ({} bytes; {})",
            d.sha256,
            d.size,
            uses.join(", ")
        );
    }
    eprintln!(
        "{}: {filled} sha256 pin{} written",
        path.display(),
        if filled == 1 { "" } else { "s" }
    );
}

/// The validation error for `text`, if it does not validate.
fn invalid(path: &Path, text: &str) -> Option<PinError> {
    crate::manifest::parse(text).err().map(|problems| {
        PinError::Manifest(ManifestError::Invalid {
            path: path.to_path_buf(),
            text: text.to_string(),
            problems,
        })
    })
}

/// toml_edit refused what the validator accepted: not expected, but say so plainly.
fn not_toml(path: &Path, text: &str) -> PinError {
    let problem = text
        .parse::<DocumentMut>()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    PinError::NotToml {
        path: path.to_path_buf(),
        problem,
    }
}

type Digests = Vec<(String, Result<fetch::Digest, String>)>;

/// `--verify`: one line per pinned URL on stdout; exit 1 on a mismatch, a failed download, or an
/// artifact not pinned at all.
fn verify_report(
    all: &[Artifact],
    urls: &BTreeMap<String, Vec<&Artifact>>,
    digests: &Digests,
    failed: usize,
    quiet: bool,
) -> Result<bool, PinError> {
    let mut out = String::new();
    let mut mismatched = 0;
    for (url, result) in digests {
        let Ok(d) = result else {
            out.push_str(&format!("failed    {url}\n"));
            continue;
        };
        for a in &urls[url] {
            let pinned = crate::manifest::strip_sha256_prefix(
                a.sha256.as_deref().unwrap_or_default().trim(),
            )
            .to_ascii_lowercase();
            if pinned == d.sha256 {
                out.push_str(&format!("ok        {url} ({})\n", a.used_by));
            } else {
                mismatched += 1;
                out.push_str(&format!(
                    "MISMATCH  {url} ({}): pinned {pinned}, served {}\n",
                    a.used_by, d.sha256
                ));
            }
        }
    }
    let unpinned: Vec<&Artifact> = all.iter().filter(|a| !a.pinned()).collect();
    for a in &unpinned {
        out.push_str(&format!(
            "unpinned  {} ({}): run cvx pin\n",
            a.url.as_deref().unwrap_or("(no url)"),
            a.used_by
        ));
    }
    let mut stdout = std::io::stdout().lock();
    let _ = stdout
        .write_all(out.as_bytes())
        .and_then(|()| stdout.flush());
    let checked = digests.len();
    let verified = mismatched == 0 && failed == 0 && unpinned.is_empty();
    if quiet {
        return Ok(verified);
    }
    eprintln!(
        "verified {checked} URL{}: {mismatched} mismatch{}, {failed} failed download{}, {} unpinned artifact{}",
        if checked == 1 { "" } else { "s" },
        if mismatched == 1 { "" } else { "es" },
        if failed == 1 { "" } else { "s" },
        unpinned.len(),
        if unpinned.len() == 1 { "" } else { "s" },
    );
    if mismatched > 0 {
        eprintln!(
            "warning: a mismatch means the file was replaced upstream or the pin is wrong; \
             find out which before staging it (the manifest was not changed)"
        );
    }
    Ok(verified)
}

/// Replace `path` with `new_text` atomically, unless it no longer holds `old_text`; the file's
/// permissions and owner are kept.
fn write_in_place(path: &Path, old_text: &str, new_text: &str) -> Result<(), PinError> {
    let write = |source| PinError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let meta = std::fs::metadata(path).map_err(write)?;
    let mut temp = tempfile::Builder::new()
        .prefix(".cvx-pin-")
        .tempfile_in(dir)
        .map_err(write)?;
    temp.write_all(new_text.as_bytes()).map_err(write)?;
    temp.as_file()
        .set_permissions(meta.permissions())
        .map_err(write)?;
    // Run as root (sudo) on someone's manifest, the file stays theirs.
    crate::owner::give_file(crate::owner::Owner::same_as(&meta), temp.as_file()).map_err(write)?;
    temp.as_file().sync_all().map_err(write)?;
    // Someone edited the file while we downloaded: their edit wins, ours is not written.
    if std::fs::read_to_string(path).map_err(write)? != old_text {
        return Err(PinError::Changed {
            path: path.to_path_buf(),
        });
    }
    temp.persist(path).map_err(|e| write(e.error))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "2cc4172bcf000f0f06b30b16864d875a8de2ee12df994a593dfd52a506851bce";

    #[test]
    fn fills_inline_and_standard_tables_and_keeps_the_rest() {
        let text = r#"# my manifest
[chain]
id = "t-1" # keep me
daemon = "simd"

[genesis]
binary."linux/amd64" = { url = "https://e.org/a", sha256 = "" } # TODO: no checksum in the registry; run cvx pin
library."linux/amd64" = [ { url = "https://e.org/lib.so", sha256 = "" } ]

[[upgrade]]
name = "v2"
[upgrade.binary."linux/amd64"]
url = "https://e.org/b"
sha256 = ""   # TODO: no checksum in the registry; run cvx pin
"#;
        let mut doc: DocumentMut = text.parse().unwrap();
        let found = artifacts(&mut doc);
        let labels: Vec<&str> = found.iter().map(|a| a.used_by.as_str()).collect();
        assert_eq!(
            labels,
            [
                "genesis linux/amd64 binary",
                "genesis linux/amd64 library",
                "upgrade v2 linux/amd64 binary"
            ]
        );
        walk(&mut doc, &mut |_, mut slot| slot.set_sha256(SHA));
        let out = doc.to_string();
        assert!(!out.contains("TODO"), "{out}");
        assert!(out.contains("# my manifest\n") && out.contains("id = \"t-1\" # keep me\n"));
        assert!(out.contains(&format!(
            "binary.\"linux/amd64\" = {{ url = \"https://e.org/a\", sha256 = \"{SHA}\" }}\n"
        )));
        assert!(out.contains(&format!("\nsha256 = \"{SHA}\"\n")), "{out}");
        crate::manifest::parse(&out).unwrap();
    }

    #[test]
    fn other_comments_are_not_todo() {
        assert!(is_pin_todo(
            " # TODO: no checksum in the registry; run cvx pin"
        ));
        assert!(!is_pin_todo(" # pinned by hand"));
        assert!(!is_pin_todo(" # TODO: ask the validator set"));
    }
}
