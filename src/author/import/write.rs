//! Writing the manifest: the registry's versions turned into TOML (comments, notes, `TODO` pins),
//! and the file written without clobbering one that exists.

use super::*;

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
pub(super) fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() && c != '\t' { '?' } else { c })
        .collect()
}

/// `a`, `a, b`, or `a .. z` for a list of names.
pub(super) fn span_of<S: AsRef<str>>(names: &[S]) -> String {
    match names {
        [] => String::new(),
        [one] => one.as_ref().to_string(),
        [a, b] => format!("{}, {}", a.as_ref(), b.as_ref()),
        [first, .., last] => format!("{} .. {}", first.as_ref(), last.as_ref()),
    }
}

/// Insert `key`, putting the pending comment lines before it.
pub(super) fn insert_with(table: &mut Table, key: &str, item: Item, pending: &mut String) {
    table.insert(key, item);
    if !pending.is_empty() {
        set_key_prefix(table, pending, key);
        pending.clear();
    }
}

pub(super) fn set_key_prefix(table: &mut Table, prefix: &str, key: &str) {
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
