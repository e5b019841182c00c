//! A whole archive unpacked, as Cosmovisor unpacks a downloaded upgrade: every entry validated
//! first, then each regular file and inside symlink handed to the caller.

use super::*;

/// A regular file of an archive unpacked whole, handed to the caller of [`unpack_tree`].
pub struct Member<'a> {
    /// The member's normalized path in the archive: where it goes under the stage directory.
    pub name: &'a str,
    /// The archive gives it an execute bit.
    pub executable: bool,
    /// The member rules chose it as the daemon binary.
    pub daemon: bool,
    data: &'a mut dyn Read,
    ctx: &'a Ctx<'a>,
    cap: &'a mut Cap,
}

impl Member<'_> {
    /// Copy the member's bytes into `out` (a temp file), hashing them and counting them against
    /// the cap shared by the whole archive. On error `out` is left empty.
    pub fn copy_to(self, out: &mut File) -> Result<Extracted, UnpackError> {
        copy_member(self.ctx, self.name, self.data, out, self.cap)
    }
}

/// An entry of an archive unpacked whole.
pub enum TreeEntry<'a> {
    File(Member<'a>),
    /// A symlink whose target stays inside the archive, to recreate as is.
    Symlink {
        name: &'a str,
        target: &'a str,
    },
}

/// Unpack all of `archive`, as Cosmovisor unpacks a downloaded upgrade: every entry is validated
/// first (the checks of [`extract`], plus: nothing lies under a symlink or file of the archive,
/// no symlink climbs out through another), the daemon binary is chosen by [`extract`]'s member
/// rules, and the regular files unpack to at most `max_size` bytes in all. Then `visit` gets each
/// regular file in archive order, then each symlink. Directories are implied by the files;
/// hard links, fifos and devices are skipped (logged); so is any other entry at `bin` or
/// `bin/<daemon>`, where the chosen binary goes. Returns the chosen member's name.
pub fn unpack_tree<E: From<UnpackError>>(
    archive: &Path,
    kind: ArchiveKind,
    path: Option<&str>,
    daemon: &str,
    max_size: u64,
    mut visit: impl FnMut(TreeEntry<'_>) -> Result<(), E>,
) -> Result<String, E> {
    let want = Want::new(path, daemon);
    let ctx = Ctx {
        archive,
        kind,
        file_error: Rc::default(),
    };
    let mut cap = Cap::new(max_size);
    let (listed, plan) = match kind.codec() {
        Some(codec) => {
            let listed = walk_tar(&ctx, codec, |_, _| Ok::<_, UnpackError>(()))?;
            let plan = plan_tree(&ctx, &listed, &want, daemon, max_size)?;
            let again = walk_tar(&ctx, codec, |item, data| {
                if !plan.files.contains(&item.at) {
                    return Ok(());
                }
                if listed.get(item.at).map(|l| &l.name) != Some(&item.name) {
                    return Err(E::from(
                        ctx.corrupt("the archive changed between two reads".to_owned()),
                    ));
                }
                visit(TreeEntry::File(Member {
                    name: &item.name,
                    executable: item.executable,
                    daemon: item.at == plan.chosen,
                    data,
                    ctx: &ctx,
                    cap: &mut cap,
                }))
            })?;
            if again.len() != listed.len() {
                return Err(E::from(
                    ctx.corrupt("the archive changed between two reads".to_owned()),
                ));
            }
            (listed, plan)
        }
        None => {
            let (mut zip, listed) = list_zip(&ctx)?;
            let plan = plan_tree(&ctx, &listed, &want, daemon, max_size)?;
            for item in listed.iter().filter(|l| plan.files.contains(&l.at)) {
                let mut data = zip.by_index(item.at).map_err(|e| zip_error(&ctx, e))?;
                visit(TreeEntry::File(Member {
                    name: &item.name,
                    executable: item.executable,
                    daemon: item.at == plan.chosen,
                    data: &mut data,
                    ctx: &ctx,
                    cap: &mut cap,
                }))?;
            }
            (listed, plan)
        }
    };
    // Last, so that no file is ever written through a link this archive made.
    for item in listed.iter().filter(|l| plan.symlinks.contains(&l.at)) {
        let target = item.target.as_deref().unwrap_or_default();
        visit(TreeEntry::Symlink {
            name: &item.name,
            target,
        })?;
    }
    let chosen = listed.iter().find(|l| l.at == plan.chosen);
    Ok(chosen.map(|l| l.name.clone()).unwrap_or_default())
}

/// Which entries [`unpack_tree`] writes, by `at`.
pub(super) struct TreePlan {
    chosen: usize,
    files: HashSet<usize>,
    symlinks: HashSet<usize>,
}

/// Decide what to write, and refuse the archive before anything is written when that would be
/// unsafe or more than `max_size` bytes by the archive's own account.
pub(super) fn plan_tree(
    ctx: &Ctx<'_>,
    listed: &[Listed],
    want: &Want<'_>,
    daemon: &str,
    max_size: u64,
) -> Result<TreePlan, UnpackError> {
    let chosen = choose(listed, want)?;
    let bin = format!("bin/{daemon}");
    let mut plan = TreePlan {
        chosen,
        files: Default::default(),
        symlinks: Default::default(),
    };
    let mut written: BTreeMap<&str, usize> = BTreeMap::new();
    for item in listed {
        let kept = match item.kind {
            EntryKind::Directory => continue,
            EntryKind::Regular | EntryKind::Symlink
                if item.at != chosen && (item.name == bin || item.name == "bin") =>
            {
                tracing::debug!(
                    "not unpacking `{}`: {bin} is where the daemon binary goes",
                    item.name
                );
                continue;
            }
            EntryKind::Regular => &mut plan.files,
            EntryKind::Symlink => &mut plan.symlinks,
            EntryKind::HardLink => {
                tracing::warn!(
                    "not unpacking `{}`: a hard link (to `{}`); cvx unpacks regular files and symlinks",
                    item.name,
                    item.target.as_deref().unwrap_or_default()
                );
                continue;
            }
            other => {
                tracing::debug!("not unpacking `{}`: {other}", item.name);
                continue;
            }
        };
        kept.insert(item.at);
        *written.entry(&item.name).or_default() += 1;
    }
    if let Some((name, count)) = written.iter().find(|(_, n)| **n > 1) {
        return Err(UnpackError::Duplicate {
            member: (*name).to_owned(),
            count: *count,
        });
    }
    let links: HashSet<&str> = listed
        .iter()
        .filter(|l| plan.symlinks.contains(&l.at))
        .map(|l| l.name.as_str())
        .collect();
    let kept = |l: &&Listed| plan.files.contains(&l.at) || plan.symlinks.contains(&l.at);
    for item in listed.iter().filter(kept) {
        let mut parent = item.name.as_str();
        while let Some((up, _)) = parent.rsplit_once('/') {
            if written.contains_key(up) {
                return Err(UnpackError::UnsafeEntry {
                    entry: item.name.clone(),
                    reason: UnsafeReason::UnderNonDirectory {
                        parent: up.to_owned(),
                    },
                });
            }
            parent = up;
        }
        if let Some(target) = item
            .target
            .as_deref()
            .filter(|_| plan.symlinks.contains(&item.at))
            && let Some(link) = climbs_through(&item.name, target, &links)
        {
            return Err(UnpackError::UnsafeEntry {
                entry: item.name.clone(),
                reason: UnsafeReason::SymlinkThroughLink {
                    target: target.to_owned(),
                    link,
                },
            });
        }
    }
    let mut declared = Cap::new(max_size);
    for item in listed.iter().filter(|l| plan.files.contains(&l.at)) {
        declared.used = declared.used.saturating_add(item.size);
        if declared.used > max_size {
            return Err(declared.too_large(ctx, &item.name));
        }
    }
    Ok(plan)
}

/// The archive symlink that a `..` in the target of symlink `name` would climb out of, if any.
/// `..` after a symlink leaves from the link's target, not from where the path seems to be, so
/// the lexical check of [`stays_inside`] holds only for targets that never do that.
pub(super) fn climbs_through(name: &str, target: &str, links: &HashSet<&str>) -> Option<String> {
    let mut path: Vec<&str> = name.split('/').collect();
    path.pop();
    let mut through = None;
    for c in target.split(['/', '\\']) {
        match c {
            "" | "." => {}
            ".." => {
                if through.is_some() {
                    return through;
                }
                path.pop();
            }
            _ => {
                path.push(c);
                let here = path.join("/");
                if links.contains(here.as_str()) {
                    through = Some(here);
                }
            }
        }
    }
    None
}
