//! Walk the spanned TOML once, collecting every problem, then build the validated [`Manifest`].

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::{
    Artifact, Chain, Genesis, Library, Manifest, Problem, Trigger, Upgrade, is_archive_url,
    url_file_name,
};

type Span = Range<usize>;

const ROOT_KEYS: &[&str] = &["chain", "genesis", "upgrade"];
const CHAIN_KEYS: &[&str] = &["id", "daemon", "home", "platforms"];
const GENESIS_KEYS: &[&str] = &["version", "binary", "library"];
const UPGRADE_KEYS: &[&str] = &["name", "height", "version", "trigger", "binary", "library"];
const ARTIFACT_KEYS: &[&str] = &["url", "sha256", "path"];
const LIBRARY_KEYS: &[&str] = &["url", "sha256", "path", "name"];

/// Validate manifest text. Ok carries the manifest and its warnings; Err every problem found.
pub fn parse(source: &str) -> Result<(Manifest, Vec<Problem>), Vec<Problem>> {
    let mut walker = Walker::new(source);
    let root = match DeTable::parse(source) {
        Ok(root) => root,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            let message = e.message().trim().to_string();
            walker.error(
                span,
                "",
                format!("not valid TOML: {message}"),
                Some("fix the syntax; see https://toml.io".into()),
            );
            return Err(walker.errors);
        }
    };
    let manifest = walker.manifest(root.get_ref());
    if walker.errors.is_empty() {
        Ok((manifest, walker.warnings))
    } else {
        walker.errors.sort_by_key(|p| p.span.start);
        Err(walker.errors)
    }
}

struct Walker<'s> {
    source: &'s str,
    line_starts: Vec<usize>,
    errors: Vec<Problem>,
    warnings: Vec<Problem>,
}

/// Where a table sits, for "missing key" problems and key paths.
#[derive(Clone)]
struct At {
    key: String,
    span: Span,
}

impl At {
    fn child(&self, key: &str, span: Span) -> At {
        let key = if self.key.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.key)
        };
        At { key, span }
    }
}

fn quoted_key(key: &str) -> String {
    if !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        key.to_string()
    } else {
        format!("{key:?}")
    }
}

fn type_name(value: &DeValue<'_>) -> &'static str {
    match value {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a datetime",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

fn lookup<'t, 'i>(
    table: &'t DeTable<'i>,
    key: &str,
) -> Option<(
    &'t Spanned<std::borrow::Cow<'i, str>>,
    &'t Spanned<DeValue<'i>>,
)> {
    table.iter().find(|(k, _)| k.get_ref().as_ref() == key)
}

/// Levenshtein distance, for "did you mean" on unknown keys.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let here = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(here + 1);
            prev = here;
        }
    }
    row[b.len()]
}

const WHITESPACE: &str = "starts or ends with whitespace";

/// Why a name cannot be a directory or file name inside the tree, if it cannot.
pub(crate) fn unsafe_name(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("is empty")
    } else if name == "." || name == ".." {
        Some("would name the directory itself or its parent")
    } else if name.contains('/') || name.contains('\\') {
        Some("contains a path separator")
    } else if name.contains('\0') {
        Some("contains a NUL byte")
    } else if name.trim() != name {
        Some(WHITESPACE)
    } else {
        None
    }
}

/// A pin without its optional `sha256:` prefix (any case), as release pages write it.
pub(crate) fn strip_sha256_prefix(pin: &str) -> &str {
    match pin.get(..7) {
        Some(prefix) if prefix.eq_ignore_ascii_case("sha256:") => &pin[7..],
        _ => pin,
    }
}

/// Whether `platform` is of Go's `os/arch` form, as manifests key binaries.
pub(crate) fn valid_platform(platform: &str) -> bool {
    platform.split_once('/').is_some_and(|(os, arch)| {
        let part = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        };
        part(os) && part(arch)
    })
}

/// Parse a version as semver, a leading "v" allowed.
pub(crate) fn parse_version(version: &str) -> Result<semver::Version, semver::Error> {
    semver::Version::parse(version.strip_prefix('v').unwrap_or(version))
}

impl<'s> Walker<'s> {
    fn new(source: &'s str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(source.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Walker {
            source,
            line_starts,
            errors: Vec::new(),
            warnings: Vec::new(),
        }
    }

    fn problem(&self, span: Span, key: &str, message: String, hint: Option<String>) -> Problem {
        let start = span.start.min(self.source.len());
        let line = self.line_starts.partition_point(|&s| s <= start);
        let line_start = self.line_starts[line - 1];
        let column = self
            .source
            .get(line_start..start)
            .map_or(1, |s| s.chars().count() + 1);
        Problem {
            line,
            column,
            span,
            key: key.to_string(),
            message,
            hint,
        }
    }

    fn error(&mut self, span: Span, key: &str, message: impl Into<String>, hint: Option<String>) {
        let problem = self.problem(span, key, message.into(), hint);
        self.errors.push(problem);
    }

    fn warn(&mut self, span: Span, key: &str, message: impl Into<String>, hint: Option<String>) {
        let problem = self.problem(span, key, message.into(), hint);
        self.warnings.push(problem);
    }

    /// Report every key of `table` that is not in `allowed`.
    fn known_keys(&mut self, table: &DeTable<'_>, at: &At, allowed: &[&str]) {
        for (key, _) in table.iter() {
            let name = key.get_ref().as_ref();
            if allowed.contains(&name) {
                continue;
            }
            let close = allowed
                .iter()
                .filter(|k| distance(name, k) <= 2)
                .min_by_key(|k| distance(name, k));
            let hint = match close {
                Some(k) => format!(
                    "did you mean `{k}`? valid keys here: {}",
                    allowed.join(", ")
                ),
                None => format!("valid keys here: {}", allowed.join(", ")),
            };
            let where_ = if at.key.is_empty() {
                "at the top level".to_string()
            } else {
                format!("in {}", at.key)
            };
            self.error(
                key.span(),
                &at.child(&quoted_key(name), key.span()).key,
                format!("unknown key `{name}` {where_}"),
                Some(hint),
            );
        }
    }

    fn table<'t, 'i>(
        &mut self,
        value: &'t Spanned<DeValue<'i>>,
        at: &At,
    ) -> Option<&'t DeTable<'i>> {
        match value.get_ref() {
            DeValue::Table(table) => Some(table),
            other => {
                self.error(
                    value.span(),
                    &at.key,
                    format!("expected a table, found {}", type_name(other)),
                    None,
                );
                None
            }
        }
    }

    /// A required or optional string; `None` when absent or wrong (reported).
    fn string(
        &mut self,
        table: &DeTable<'_>,
        at: &At,
        key: &str,
        required: Option<&str>,
    ) -> Option<(String, Span)> {
        match lookup(table, key) {
            Some((_, value)) => match value.get_ref() {
                DeValue::String(s) => Some((s.to_string(), value.span())),
                other => {
                    self.error(
                        value.span(),
                        &at.child(key, value.span()).key,
                        format!("expected a string, found {}", type_name(other)),
                        None,
                    );
                    None
                }
            },
            None => {
                if let Some(hint) = required {
                    self.error(
                        at.span.clone(),
                        &at.child(key, at.span.clone()).key,
                        format!("missing required key `{key}`"),
                        Some(hint.to_string()),
                    );
                }
                None
            }
        }
    }

    fn manifest(&mut self, root: &DeTable<'_>) -> Manifest {
        let top = At {
            key: String::new(),
            span: 0..0,
        };
        self.known_keys(root, &top, ROOT_KEYS);

        let chain = match lookup(root, "chain") {
            Some((key, value)) => {
                let at = top.child("chain", key.span());
                self.table(value, &at).map(|t| self.chain(t, &at))
            }
            None => {
                self.error(
                    0..0,
                    "chain",
                    "missing required table [chain]",
                    Some("add [chain] with id = \"...\" and daemon = \"...\"".into()),
                );
                None
            }
        };
        let genesis = match lookup(root, "genesis") {
            Some((key, value)) => {
                let at = top.child("genesis", key.span());
                self.table(value, &at).map(|t| self.genesis(t, &at))
            }
            None => {
                self.error(
                    0..0,
                    "genesis",
                    "missing required table [genesis]",
                    Some("add [genesis] with binary.\"os/arch\" = { url = \"...\", sha256 = \"...\" }".into()),
                );
                None
            }
        };
        let upgrades = match lookup(root, "upgrade") {
            Some((_, value)) => self.upgrades(value),
            None => Vec::new(),
        };
        let (chain, chain_spans) = chain.unwrap_or_default();
        let (genesis, genesis_spans) = genesis.unwrap_or_default();
        let manifest = Manifest {
            chain,
            genesis,
            upgrades: upgrades.iter().map(|(u, _)| u.clone()).collect(),
        };
        self.cross_checks(&manifest, &chain_spans, &genesis_spans, &upgrades);
        manifest
    }

    fn chain(&mut self, table: &DeTable<'_>, at: &At) -> (Chain, ChainSpans) {
        self.known_keys(table, at, CHAIN_KEYS);
        let id = self.string(
            table,
            at,
            "id",
            Some("set id to the chain-id, e.g. id = \"osmosis-1\""),
        );
        if let Some((id, span)) = &id {
            if id.trim().is_empty() {
                self.error(
                    span.clone(),
                    "chain.id",
                    "chain id is empty",
                    Some("set the chain-id, e.g. \"osmosis-1\"".into()),
                );
            } else if id.trim() != id {
                self.error(
                    span.clone(),
                    "chain.id",
                    format!("chain id {id:?} {WHITESPACE}"),
                    Some(format!(
                        "write {:?}: nodes report the chain-id without spaces",
                        id.trim()
                    )),
                );
            }
        }
        let daemon = self.string(
            table,
            at,
            "daemon",
            Some("set daemon to the binary's name, e.g. daemon = \"osmosisd\""),
        );
        if let Some((daemon, span)) = &daemon
            && let Some(why) = unsafe_name(daemon)
        {
            let hint = if why == WHITESPACE {
                format!(
                    "write {:?}: the daemon's file name has no surrounding spaces",
                    daemon.trim()
                )
            } else {
                "use the binary's file name, e.g. \"osmosisd\"".into()
            };
            self.error(
                span.clone(),
                "chain.daemon",
                format!("daemon name {daemon:?} {why}"),
                Some(hint),
            );
        }
        let home = self.string(table, at, "home", None);
        if let Some((home, span)) = &home
            && !home.starts_with('/')
        {
            self.error(
                span.clone(),
                "chain.home",
                format!("home {home:?} is not an absolute path"),
                Some("use an absolute path such as \"/var/lib/osmosis\"".into()),
            );
        }
        let mut platforms = Vec::new();
        let mut platforms_span = None;
        if let Some((_, value)) = lookup(table, "platforms") {
            platforms_span = Some(value.span());
            match value.get_ref() {
                DeValue::Array(items) => {
                    for item in items.iter() {
                        match item.get_ref() {
                            DeValue::String(s) => {
                                if let Some(p) = self.platform(s, item.span(), "chain.platforms") {
                                    if platforms.contains(&p) {
                                        self.error(
                                            item.span(),
                                            "chain.platforms",
                                            format!("platform {p:?} is listed twice"),
                                            None,
                                        );
                                    } else {
                                        platforms.push(p);
                                    }
                                }
                            }
                            other => self.error(
                                item.span(),
                                "chain.platforms",
                                format!(
                                    "expected a string such as \"linux/amd64\", found {}",
                                    type_name(other)
                                ),
                                None,
                            ),
                        }
                    }
                    if items.is_empty() {
                        self.error(value.span(), "chain.platforms", "platforms is empty", Some("list at least one platform, e.g. [\"linux/amd64\"], or remove the key to use the genesis binary's platforms".into()));
                    }
                }
                other => self.error(
                    value.span(),
                    "chain.platforms",
                    format!(
                        "expected an array of \"os/arch\" strings, found {}",
                        type_name(other)
                    ),
                    None,
                ),
            }
        }
        let chain = Chain {
            id: id.map(|i| i.0).unwrap_or_default(),
            daemon: daemon.map(|d| d.0).unwrap_or_default(),
            home: home.map(|(h, _)| PathBuf::from(h)),
            platforms,
        };
        (
            chain,
            ChainSpans {
                platforms: platforms_span,
            },
        )
    }

    /// Check an "os/arch" string; `None` (reported) when malformed.
    fn platform(&mut self, platform: &str, span: Span, key: &str) -> Option<String> {
        if valid_platform(platform) {
            Some(platform.to_string())
        } else {
            self.error(
                span,
                key,
                format!("platform {platform:?} is not of the form os/arch"),
                Some("use Go's names, e.g. \"linux/amd64\" or \"linux/arm64\"".into()),
            );
            None
        }
    }

    fn version(&mut self, table: &DeTable<'_>, at: &At) -> Option<(String, Span)> {
        let (version, span) = self.string(table, at, "version", None)?;
        if let Err(e) = parse_version(&version) {
            self.error(
                span,
                &at.child("version", 0..0).key,
                format!("version {version:?} is not semver: {e}"),
                Some("use a semantic version such as \"v26.0.0\" (a leading v is allowed)".into()),
            );
            return None;
        }
        Some((version, span))
    }

    fn genesis(&mut self, table: &DeTable<'_>, at: &At) -> (Genesis, StageSpans) {
        self.known_keys(table, at, GENESIS_KEYS);
        let version = self.version(table, at);
        let (binary, binary_spans) = self.binaries(table, at);
        let (library, library_spans) = self.libraries(table, at);
        let genesis = Genesis {
            version: version.as_ref().map(|v| v.0.clone()),
            binary,
            library,
        };
        (
            genesis,
            StageSpans {
                name: None,
                height: None,
                version: version.map(|v| v.1),
                binary: binary_spans,
                library: library_spans,
            },
        )
    }

    fn upgrades(&mut self, value: &Spanned<DeValue<'_>>) -> Vec<(Upgrade, StageSpans)> {
        let DeValue::Array(items) = value.get_ref() else {
            self.error(
                value.span(),
                "upgrade",
                format!(
                    "expected an array of tables ([[upgrade]]), found {}",
                    type_name(value.get_ref())
                ),
                Some("write each upgrade as a [[upgrade]] section".into()),
            );
            return Vec::new();
        };
        let mut upgrades = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let label = match item.get_ref() {
                DeValue::Table(t) => match lookup(t, "name").map(|(_, v)| v.get_ref()) {
                    Some(DeValue::String(name)) => format!("upgrade {:?}", name.as_ref()),
                    _ => format!("upgrade #{}", i + 1),
                },
                _ => format!("upgrade #{}", i + 1),
            };
            let item_at = At {
                key: label,
                span: item.span(),
            };
            if let Some(t) = self.table(item, &item_at) {
                upgrades.push(self.upgrade(t, &item_at));
            }
        }
        upgrades
    }

    fn upgrade(&mut self, table: &DeTable<'_>, at: &At) -> (Upgrade, StageSpans) {
        self.known_keys(table, at, UPGRADE_KEYS);
        let name = self.string(
            table,
            at,
            "name",
            Some("set name to the on-chain plan name, e.g. name = \"v26\""),
        );
        if let Some((name, span)) = &name
            && let Some(why) = unsafe_name(name)
        {
            let hint = if why == WHITESPACE {
                format!(
                    "write {:?}: the node looks for the plan's name exactly, and governance names have no surrounding spaces",
                    name.trim()
                )
            } else {
                "use the on-chain plan name; it becomes the directory upgrades/<name>".into()
            };
            self.error(
                span.clone(),
                &at.child("name", 0..0).key,
                format!("upgrade name {name:?} {why}"),
                Some(hint),
            );
        }
        let height = match lookup(table, "height") {
            Some((_, value)) => {
                let key = at.child("height", 0..0).key;
                match value.get_ref() {
                    DeValue::Integer(i) => match u64::from_str_radix(i.as_str(), i.radix()) {
                        Ok(h) if h > 0 => Some((h, value.span())),
                        _ => {
                            self.error(value.span(), &key, format!("height {i} is not a positive block height"), Some("use the plan's height from the governance proposal, e.g. 24250100".into()));
                            None
                        }
                    },
                    other => {
                        self.error(
                            value.span(),
                            &key,
                            format!(
                                "expected an integer block height, found {}",
                                type_name(other)
                            ),
                            None,
                        );
                        None
                    }
                }
            }
            None => None,
        };
        let version = self.version(table, at);
        let trigger = self.trigger(table, at, height.is_some());
        let (binary, binary_spans) = self.binaries(table, at);
        let (library, library_spans) = self.libraries(table, at);
        let upgrade = Upgrade {
            name: name.as_ref().map(|n| n.0.clone()).unwrap_or_default(),
            height: height.as_ref().map(|h| h.0),
            version: version.as_ref().map(|v| v.0.clone()),
            trigger,
            binary,
            library,
        };
        (
            upgrade,
            StageSpans {
                name: name.map(|n| n.1),
                height: height.map(|h| h.1),
                version: version.map(|v| v.1),
                binary: binary_spans,
                library: library_spans,
            },
        )
    }

    /// `trigger = "governance" | "halt-height"`; a halt-height needs the upgrade's height.
    fn trigger(&mut self, table: &DeTable<'_>, at: &At, has_height: bool) -> Trigger {
        let Some((value, span)) = self.string(table, at, "trigger", None) else {
            return Trigger::Governance;
        };
        let key = at.child("trigger", 0..0).key;
        match value.as_str() {
            "governance" => Trigger::Governance,
            "halt-height" => {
                if !has_height {
                    self.error(
                        span,
                        &key,
                        "trigger = \"halt-height\" needs the upgrade's height: nothing on chain says where to stop",
                        Some("add height = <the height every validator agreed to halt at>".into()),
                    );
                }
                Trigger::HaltHeight
            }
            other => {
                self.error(
                    span,
                    &key,
                    format!("unknown trigger {other:?}"),
                    Some("use \"governance\" (the default: an on-chain plan halts the node) or \"halt-height\" (cvx halts it at height)".into()),
                );
                Trigger::Governance
            }
        }
    }

    /// `binary."os/arch" = { url, sha256, path }`, required.
    fn binaries(
        &mut self,
        table: &DeTable<'_>,
        at: &At,
    ) -> (BTreeMap<String, Artifact>, Option<PlatformSpans>) {
        let Some((key, value)) = lookup(table, "binary") else {
            self.error(
                at.span.clone(),
                &at.child("binary", 0..0).key,
                "missing required key `binary`",
                Some(
                    "add binary.\"linux/amd64\" = { url = \"https://...\", sha256 = \"...\" }"
                        .into(),
                ),
            );
            return (BTreeMap::new(), None);
        };
        let binary_at = at.child("binary", key.span());
        let mut binaries = BTreeMap::new();
        let Some(platforms) = self.table(value, &binary_at) else {
            return (binaries, None);
        };
        let mut spans = PlatformSpans {
            table: key.span(),
            platforms: BTreeMap::new(),
        };
        for (platform, value) in platforms.iter() {
            let p_at = binary_at.child(&quoted_key(platform.get_ref()), platform.span());
            let Some(p) = self.platform(platform.get_ref(), platform.span(), &p_at.key) else {
                continue;
            };
            if let Some(t) = self.table(value, &p_at) {
                let artifact = self.artifact(t, &p_at);
                spans.platforms.insert(p.clone(), platform.span());
                binaries.insert(p, artifact);
            }
        }
        if platforms.is_empty() {
            self.error(
                value.span(),
                &binary_at.key,
                "no binary is pinned",
                Some(
                    "add binary.\"linux/amd64\" = { url = \"https://...\", sha256 = \"...\" }"
                        .into(),
                ),
            );
        }
        (binaries, Some(spans))
    }

    fn artifact(&mut self, table: &DeTable<'_>, at: &At) -> Artifact {
        self.known_keys(table, at, ARTIFACT_KEYS);
        let url = self.url(table, at);
        let sha256 = self.sha256(table, at);
        let path = self.member(table, at, "bin/osmosisd");
        Artifact {
            url: url.unwrap_or_default(),
            sha256: sha256.unwrap_or_default(),
            path: path.map(|p| p.0),
        }
    }

    /// `path`: an archive's member, relative and inside it. `example` shows a good one.
    fn member(&mut self, table: &DeTable<'_>, at: &At, example: &str) -> Option<(String, Span)> {
        let path = self.string(table, at, "path", None);
        if let Some((path, span)) = &path
            && (path.is_empty()
                || path.starts_with('/')
                || path.ends_with('/')
                || path.split('/').any(|c| c == ".."))
        {
            self.error(
                span.clone(),
                &at.child("path", 0..0).key,
                format!("archive member {path:?} is not a relative path inside the archive"),
                Some(format!(
                    "name the member as the archive lists it, e.g. \"{example}\""
                )),
            );
            return None;
        }
        path
    }

    fn url(&mut self, table: &DeTable<'_>, at: &At) -> Option<String> {
        let (url, span) = self.string(
            table,
            at,
            "url",
            Some("set url to where the file is served, e.g. url = \"https://...\""),
        )?;
        let key = at.child("url", 0..0).key;
        let hint = Some(
            "use https://..., http://..., file:///absolute/path or /absolute/path".to_string(),
        );
        if url.starts_with('/') {
            return Some(url);
        }
        match url::Url::parse(&url) {
            Ok(parsed) => match parsed.scheme() {
                "https" if parsed.host().is_some() => Some(url),
                "http" if parsed.host().is_some() => {
                    self.warn(
                        span,
                        &key,
                        format!("{url} is plain http: only the sha256 pin protects it"),
                        Some("prefer an https:// URL".into()),
                    );
                    Some(url)
                }
                "file" if parsed.path().len() > 1 => Some(url),
                "http" | "https" | "file" => {
                    self.error(span, &key, format!("URL {url:?} has no host or path"), hint);
                    None
                }
                scheme => {
                    self.error(
                        span,
                        &key,
                        format!("URL scheme `{scheme}` is not supported"),
                        hint,
                    );
                    None
                }
            },
            Err(e) => {
                self.error(
                    span,
                    &key,
                    format!("{url:?} is neither a URL nor an absolute path: {e}"),
                    hint,
                );
                None
            }
        }
    }

    fn sha256(&mut self, table: &DeTable<'_>, at: &At) -> Option<String> {
        let (sha, span) = self.string(
            table,
            at,
            "sha256",
            Some("pin the artifact: run `cvx pin -m MANIFEST` (it downloads the artifact and pins what it serves), or write sha256 = \"<64 hex digits>\" (sha256sum FILE)"),
        )?;
        // `sha256:HEX`, as release pages and `?checksum=` parameters write it, is the same pin.
        let hex = strip_sha256_prefix(&sha);
        if crate::hash::is_sha256_hex(hex) {
            Some(hex.to_ascii_lowercase())
        } else if sha.is_empty() {
            self.error(
                span,
                &at.child("sha256", 0..0).key,
                "sha256 is empty: the artifact is not pinned",
                Some("run `cvx pin -m MANIFEST`: it downloads the artifact and pins what it serves (compare it with the release's checksums), or paste the digest that `sha256sum FILE` prints".into()),
            );
            None
        } else {
            self.error(
                span,
                &at.child("sha256", 0..0).key,
                format!(
                    "sha256 {sha:?} is not 64 hex digits ({} characters{})",
                    hex.chars().count(),
                    if hex.len() == sha.len() {
                        ""
                    } else {
                        " after `sha256:`"
                    }
                ),
                Some("paste the full digest that `sha256sum FILE` prints".into()),
            );
            None
        }
    }

    /// `library."os/arch" = [ { url, sha256, name } ]`, optional.
    fn libraries(
        &mut self,
        table: &DeTable<'_>,
        at: &At,
    ) -> (BTreeMap<String, Vec<Library>>, Option<PlatformSpans>) {
        let mut libraries = BTreeMap::new();
        let Some((key, value)) = lookup(table, "library") else {
            return (libraries, None);
        };
        let library_at = at.child("library", key.span());
        let mut spans = PlatformSpans {
            table: key.span(),
            platforms: BTreeMap::new(),
        };
        let Some(platforms) = self.table(value, &library_at) else {
            return (libraries, None);
        };
        for (platform, value) in platforms.iter() {
            let p_at = library_at.child(&quoted_key(platform.get_ref()), platform.span());
            let Some(p) = self.platform(platform.get_ref(), platform.span(), &p_at.key) else {
                continue;
            };
            let DeValue::Array(items) = value.get_ref() else {
                self.error(
                    value.span(),
                    &p_at.key,
                    format!(
                        "expected an array of libraries, found {}",
                        type_name(value.get_ref())
                    ),
                    Some(
                        "write library.\"linux/amd64\" = [ { url = \"...\", sha256 = \"...\" } ]"
                            .into(),
                    ),
                );
                continue;
            };
            let mut list: Vec<Library> = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let item_at = At {
                    key: format!("{}[{i}]", p_at.key),
                    span: item.span(),
                };
                let Some(t) = self.table(item, &item_at) else {
                    continue;
                };
                self.known_keys(t, &item_at, LIBRARY_KEYS);
                let url = self.url(t, &item_at);
                let sha256 = self.sha256(t, &item_at);
                let path = self.member(t, &item_at, "lib/libwasmvm.x86_64.so");
                let name = self.string(t, &item_at, "name", None);
                if path.is_none()
                    && lookup(t, "path").is_none()
                    && let Some(url) = url.as_deref().filter(|u| is_archive_url(u))
                {
                    let file = url_file_name(url).unwrap_or(url);
                    self.error(
                        item.span(),
                        &format!("{}.path", item_at.key),
                        format!("library {file} is an archive, and no path names the library inside it"),
                        Some("add path = \"lib/libwasmvm.x86_64.so\" (the member as the archive lists it); without it cvx would have to guess, and the daemon binary is not a library".into()),
                    );
                }
                let file_name = match (&name, &path, &url) {
                    (Some((n, s)), _, _) => Some((n.clone(), s.clone())),
                    (None, Some((p, s)), _) => {
                        p.rsplit('/').next().map(|n| (n.to_string(), s.clone()))
                    }
                    (None, None, Some(u)) => url_file_name(u).map(|n| (n.to_string(), item.span())),
                    (None, None, None) => None,
                };
                if let Some((file_name, span)) = &file_name {
                    if let Some(why) = unsafe_name(file_name) {
                        self.error(
                            span.clone(),
                            &format!("{}.name", item_at.key),
                            format!("library file name {file_name:?} {why}"),
                            Some(
                                "set name to the library's file name, e.g. \"libwasmvm.x86_64.so\""
                                    .into(),
                            ),
                        );
                    } else if list.iter().any(|l| l.file_name() == file_name) {
                        self.error(
                            span.clone(),
                            &format!("{}.name", item_at.key),
                            format!("two libraries would both be staged as lib/{file_name}"),
                            Some("give each library a distinct name".into()),
                        );
                    }
                } else if url.is_some() {
                    self.error(
                        item.span(),
                        &item_at.key,
                        "cannot tell the library's file name from its URL",
                        Some("set name = \"libwasmvm.x86_64.so\"".into()),
                    );
                }
                if let (Some(url), Some(sha256)) = (url, sha256) {
                    list.push(Library {
                        url,
                        sha256,
                        path: path.map(|p| p.0),
                        name: name.map(|n| n.0),
                    });
                }
            }
            spans.platforms.insert(p.clone(), platform.span());
            libraries.insert(p, list);
        }
        (libraries, Some(spans))
    }

    /// Rules across sections: platforms pinned, names unique, heights and versions increasing.
    fn cross_checks(
        &mut self,
        manifest: &Manifest,
        chain: &ChainSpans,
        genesis: &StageSpans,
        upgrades: &[(Upgrade, StageSpans)],
    ) {
        let declared = manifest.platforms();
        let explicit = !manifest.chain.platforms.is_empty();
        let source_of_platforms = if explicit {
            "chain.platforms"
        } else {
            "the genesis binary's platforms"
        };
        let stages = std::iter::once((
            "genesis".to_string(),
            &manifest.genesis.binary,
            &manifest.genesis.library,
            genesis,
        ))
        .chain(
            upgrades
                .iter()
                .map(|(u, s)| (format!("upgrade {:?}", u.name), &u.binary, &u.library, s)),
        );
        for (label, binary, library, spans) in stages {
            let Some(binary_spans) = &spans.binary else {
                continue;
            };
            for platform in &declared {
                if !binary.contains_key(platform) {
                    let span = binary_spans.table.clone();
                    let hint = format!(
                        "add binary.{platform:?} = {{ url = \"...\", sha256 = \"...\" }} to {label}{}",
                        if explicit {
                            ", or remove it from chain.platforms"
                        } else {
                            ""
                        }
                    );
                    self.error(
                        span,
                        &format!("{label}.binary"),
                        format!("not pinned for platform {platform} (from {source_of_platforms})"),
                        Some(hint),
                    );
                }
            }
            for (platform, span) in &binary_spans.platforms {
                if !declared.contains(platform) {
                    let hint = if explicit {
                        format!("add {platform:?} to chain.platforms, or fix the key")
                    } else {
                        format!("pin the genesis binary for {platform} too, or fix the key")
                    };
                    self.error(
                        span.clone(),
                        &format!("{label}.binary.{platform:?}"),
                        format!(
                            "platform {platform} is not among {source_of_platforms} ({})",
                            declared.join(", ")
                        ),
                        Some(hint),
                    );
                }
            }
            if let Some(lib_spans) = &spans.library {
                for (platform, span) in &lib_spans.platforms {
                    if !declared.contains(platform) {
                        self.error(
                            span.clone(),
                            &format!("{label}.library.{platform:?}"),
                            format!(
                                "platform {platform} is not among {source_of_platforms} ({})",
                                declared.join(", ")
                            ),
                            Some("fix the key or declare the platform".into()),
                        );
                    }
                }
                for platform in &declared {
                    if !library.contains_key(platform) {
                        self.warn(lib_spans.table.clone(), &format!("{label}.library"), format!("libraries are pinned for some platforms but not for {platform}"), Some(format!("add library.{platform:?} = [ ... ] if the {platform} binary needs them too")));
                    }
                }
            }
        }
        if let Some(span) = &chain.platforms
            && declared.is_empty()
        {
            self.error(
                span.clone(),
                "chain.platforms",
                "no platform declared",
                None,
            );
        }

        let mut seen: BTreeMap<String, &str> = BTreeMap::new();
        for (upgrade, spans) in upgrades.iter().filter(|(u, _)| !u.name.is_empty()) {
            let lower = upgrade.name.to_lowercase();
            if let Some(first) = seen.get(&lower) {
                let span = spans.name.clone().unwrap_or_default();
                self.error(
                    span,
                    &format!("upgrade {:?}.name", upgrade.name),
                    format!("upgrade name {:?} duplicates {:?} (Cosmovisor lower-cases plan names into directory names)", upgrade.name, first),
                    Some("each [[upgrade]] needs its own name".into()),
                );
            } else {
                seen.insert(lower, &upgrade.name);
            }
        }

        let mut last_height: Option<(u64, &str)> = None;
        for (upgrade, spans) in upgrades {
            if let Some(height) = upgrade.height {
                if let Some((prev, prev_name)) = last_height
                    && height <= prev
                {
                    self.error(
                        spans.height.clone().unwrap_or_default(),
                        &format!("upgrade {:?}.height", upgrade.name),
                        format!("height {height} is not above {prev}, the height of upgrade {prev_name:?} before it"),
                        Some("list upgrades in the order the chain runs them; heights must strictly increase".into()),
                    );
                }
                last_height = Some((height, &upgrade.name));
            }
        }

        let mut last_version: Option<(semver::Version, &str, String)> =
            manifest.genesis.version.as_ref().and_then(|v| {
                parse_version(v)
                    .ok()
                    .map(|p| (p, v.as_str(), "genesis".to_string()))
            });
        for (upgrade, spans) in upgrades {
            let Some(version) = &upgrade.version else {
                continue;
            };
            let Ok(parsed) = parse_version(version) else {
                continue;
            };
            if let Some((prev, prev_text, prev_label)) = &last_version
                && parsed <= *prev
            {
                self.error(
                    spans.version.clone().unwrap_or_default(),
                    &format!("upgrade {:?}.version", upgrade.name),
                    format!("version {version} is not above {prev_text}, the version of {prev_label} before it"),
                    Some("each upgrade brings a newer binary; check the version or the order".into()),
                );
            }
            last_version = Some((parsed, version, format!("upgrade {:?}", upgrade.name)));
        }
    }
}

#[derive(Default)]
struct ChainSpans {
    platforms: Option<Span>,
}

struct PlatformSpans {
    table: Span,
    platforms: BTreeMap<String, Span>,
}

#[derive(Default)]
struct StageSpans {
    name: Option<Span>,
    height: Option<Span>,
    version: Option<Span>,
    binary: Option<PlatformSpans>,
    library: Option<PlatformSpans>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance_counts_edits() {
        assert_eq!(distance("sha265", "sha256"), 2);
        assert_eq!(distance("url", "url"), 0);
        assert_eq!(distance("", "abc"), 3);
    }

    #[test]
    fn positions_are_one_based_in_characters() {
        let w = Walker::new("a = 1\nbé = 2\n");
        let p = w.problem(10..11, "k", "m".into(), None);
        assert_eq!((p.line, p.column), (2, 4));
    }

    #[test]
    fn names_that_escape_are_refused() {
        for bad in ["", ".", "..", "a/b", "a\\b", "a\0b"] {
            assert!(unsafe_name(bad).is_some(), "{bad:?}");
        }
        assert!(unsafe_name("v28.0.1+").is_none());
    }

    /// No input panics: every prefix of a real manifest, and every byte of it replaced by a
    /// character TOML gives meaning to, is either valid or a list of located problems.
    #[test]
    fn no_input_panics() {
        let text = include_str!("../../examples/osmosis.toml");
        let check = |input: &str| {
            if let Err(problems) = parse(input) {
                assert!(!problems.is_empty());
                for p in problems {
                    assert!(p.line >= 1 && p.column >= 1, "{p:?}");
                }
            }
        };
        for end in (0..text.len()).filter(|&i| text.is_char_boundary(i)) {
            check(&text[..end]);
        }
        for (i, _) in text.char_indices().step_by(7) {
            for c in ['"', '[', ']', '=', '\n', '{', ',', '.', 'é'] {
                let mut mutated = text.to_string();
                let len = mutated[i..].chars().next().map_or(0, char::len_utf8);
                mutated.replace_range(i..i + len, &c.to_string());
                check(&mutated);
            }
        }
    }
}
