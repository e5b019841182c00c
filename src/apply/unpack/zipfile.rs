//! Zip archives: listed and validated from the central directory, then the chosen member is read
//! by index.

use super::*;

pub(super) fn zip_error(ctx: &Ctx<'_>, e: zip::result::ZipError) -> UnpackError {
    use zip::result::ZipError as Z;
    match e {
        Z::Io(e) => ctx.read_error(e),
        Z::UnsupportedArchive(what) => UnpackError::Unsupported {
            archive: ctx.archive.to_owned(),
            detail: what.to_owned(),
        },
        e @ (Z::CompressionMethodNotSupported(_) | Z::InvalidPassword) => {
            UnpackError::Unsupported {
                archive: ctx.archive.to_owned(),
                detail: e.to_string(),
            }
        }
        other => ctx.corrupt(other.to_string()),
    }
}

pub(super) fn zip_kind(file: &zip::read::ZipFile<'_, impl Read>) -> EntryKind {
    if file.is_dir() {
        return EntryKind::Directory;
    }
    if file.is_symlink() {
        return EntryKind::Symlink;
    }
    match file.unix_mode().map(|m| m & 0o170_000) {
        Some(0o010_000) => EntryKind::Fifo,
        Some(0o020_000 | 0o060_000) => EntryKind::Device,
        Some(0o140_000) => EntryKind::Special, // socket
        _ => EntryKind::Regular,
    }
}

/// Longer than any symlink target a system accepts (PATH_MAX).
pub(super) const MAX_LINK: u64 = 4096;

pub(super) type Zip = zip::ZipArchive<BufReader<Tracked>>;

/// Open a zip archive and validate and list every entry from its central directory.
pub(super) fn list_zip(ctx: &Ctx<'_>) -> Result<(Zip, Vec<Listed>), UnpackError> {
    let mut zip = zip::ZipArchive::new(ctx.open()?).map_err(|e| zip_error(ctx, e))?;
    let mut listed = Vec::with_capacity(zip.len());
    for i in 0..zip.len() {
        let (raw, kind, size, executable) = {
            let file = zip.by_index_raw(i).map_err(|e| zip_error(ctx, e))?;
            let raw = match file.name() {
                Ok(name) => name.into_owned(),
                Err(_) => String::from_utf8_lossy(file.name_raw()).into_owned(),
            };
            let executable = file.unix_mode().is_some_and(|m| m & 0o111 != 0);
            (raw, zip_kind(&file), file.size(), executable)
        };
        let name = check_name(&raw, kind)?;
        let mut target = None;
        if kind == EntryKind::Symlink {
            let mut bytes = Vec::new();
            zip.by_index(i)
                .map_err(|e| zip_error(ctx, e))?
                .take(MAX_LINK + 1)
                .read_to_end(&mut bytes)
                .map_err(|e| ctx.read_error(e))?;
            let link = String::from_utf8_lossy(&bytes).into_owned();
            if link.len() as u64 > MAX_LINK {
                return Err(ctx.corrupt(format!(
                    "symlink `{raw}` has a target longer than {MAX_LINK} bytes"
                )));
            }
            check_link(&raw, &name, kind, &link)?;
            target = Some(link);
        }
        if !name.is_empty() {
            listed.push(Listed {
                name,
                kind,
                at: i,
                size,
                executable,
                target,
            });
        }
    }
    Ok((zip, listed))
}

pub(super) fn extract_zip(
    ctx: &Ctx<'_>,
    want: &Want<'_>,
    max_size: u64,
    out: &mut File,
) -> Result<Extracted, UnpackError> {
    let (mut zip, listed) = list_zip(ctx)?;
    let chosen = choose(&listed, want)?;
    let member = listed
        .iter()
        .find(|l| l.at == chosen)
        .map(|l| l.name.clone())
        .unwrap_or_default();
    let mut file = zip.by_index(chosen).map_err(|e| zip_error(ctx, e))?;
    copy_member(ctx, &member, &mut file, out, &mut Cap::new(max_size))
}
