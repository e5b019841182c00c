//! Tar archives, gzip-, xz- or zstd-compressed: one streaming pass that validates every entry
//! and writes the member the rules choose as it streams by (a second pass only if it must).

use super::*;

#[derive(Clone, Copy)]
pub(super) enum Codec {
    Gz,
    Xz,
    Zst,
}

pub(super) fn tar_kind(ty: tar::EntryType) -> EntryKind {
    use tar::EntryType as T;
    match ty {
        T::Regular | T::Continuous | T::GNUSparse => EntryKind::Regular,
        T::Directory => EntryKind::Directory,
        T::Symlink => EntryKind::Symlink,
        T::Link => EntryKind::HardLink,
        T::Fifo => EntryKind::Fifo,
        T::Char | T::Block => EntryKind::Device,
        _ => EntryKind::Special,
    }
}

/// Stream every entry of a tar archive: validate it, list it, and hand it to `visit` with its
/// data. Ends by draining the decompressor so its integrity trailer (gzip CRC, xz check, zstd
/// checksum) is verified too.
pub(super) fn walk_tar<E: From<UnpackError>>(
    ctx: &Ctx<'_>,
    codec: Codec,
    mut visit: impl FnMut(&Listed, &mut dyn Read) -> Result<(), E>,
) -> Result<Vec<Listed>, E> {
    let src = ctx.open()?;
    let decoder: Box<dyn Read> = match codec {
        Codec::Gz => Box::new(flate2::bufread::MultiGzDecoder::new(src)),
        Codec::Xz => Box::new(lzma_rust2::XzReader::new(src, true)),
        Codec::Zst => Box::new(ZstdFrames::new(src)),
    };
    let mut tar = tar::Archive::new(decoder);
    let mut listed = Vec::new();
    let entries = tar.entries().map_err(|e| ctx.read_error(e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| {
            let err = ctx.read_error(e);
            match err {
                UnpackError::Corrupt { detail, .. } if listed.is_empty() => ctx.corrupt(format!(
                    "{detail} (a compressed single file, not a tar archive, is not supported)"
                )),
                other => other,
            }
        })?;
        let ty = entry.header().entry_type();
        if ty.is_pax_global_extensions() {
            // Archive-wide metadata (`pax_global_header`); never extracted by anyone.
            continue;
        }
        let kind = tar_kind(ty);
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let name = check_name(&raw, kind)?;
        let target = entry
            .link_name_bytes()
            .map(|t| String::from_utf8_lossy(&t).into_owned());
        if let Some(target) = &target {
            check_link(&raw, &name, kind, target)?;
        }
        if name.is_empty() {
            continue; // `./`, the root itself
        }
        let item = Listed {
            name,
            kind,
            at: listed.len(),
            size: entry.size(),
            executable: entry.header().mode().is_ok_and(|m| m & 0o111 != 0),
            target,
        };
        visit(&item, &mut entry)?;
        listed.push(item);
    }
    let mut decoder = tar.into_inner();
    io::copy(&mut decoder, &mut io::sink()).map_err(|e| ctx.read_error(e))?;
    Ok(listed)
}

pub(super) fn extract_tar(
    ctx: &Ctx<'_>,
    codec: Codec,
    want: &Want<'_>,
    max_size: u64,
    out: &mut File,
) -> Result<Extracted, UnpackError> {
    // Write the best candidate so far as it streams by. The rules' final choice, when it is a
    // unique regular file, is always the best candidate seen: the only regular file is the first
    // one seen; `bin/<daemon>` outranks everything; `<daemon>` outranks all but `bin/<daemon>`.
    // A candidate over the cap is remembered as such: it is an error only if it is the choice.
    let mut written: Option<(usize, u8, Result<Extracted, UnpackError>)> = None;
    let listed = walk_tar(ctx, codec, |item, data| {
        if item.kind != EntryKind::Regular {
            return Ok(());
        }
        let rank = want.rank(&item.name);
        let better = match (&written, want) {
            (None, Want::Path(_)) => rank > 0,
            (None, Want::Auto { .. }) => true,
            (Some((_, best, _)), _) => rank > *best,
        };
        if better {
            let copied = match copy_member(ctx, &item.name, data, out, &mut Cap::new(max_size)) {
                Err(e) if !matches!(e, UnpackError::TooLarge { .. }) => return Err(e),
                copied => copied,
            };
            written = Some((item.at, rank, copied));
        }
        Ok(())
    })?;
    let chosen = choose(&listed, want)?;
    match written {
        Some((at, _, copied)) if at == chosen => copied,
        _ => second_pass(ctx, codec, chosen, max_size, out),
    }
}

/// Extract entry number `chosen` by streaming the archive again. Not reached for archives the
/// first pass handles (see [`extract_tar`]); kept so correctness never rests on that argument.
pub(super) fn second_pass(
    ctx: &Ctx<'_>,
    codec: Codec,
    chosen: usize,
    max_size: u64,
    out: &mut File,
) -> Result<Extracted, UnpackError> {
    let mut extracted = None;
    walk_tar(ctx, codec, |item, data| {
        if item.at == chosen && extracted.is_none() {
            extracted = Some(copy_member(
                ctx,
                &item.name,
                data,
                out,
                &mut Cap::new(max_size),
            )?);
        }
        Ok(())
    })?;
    extracted.ok_or_else(|| ctx.corrupt("the archive changed between two reads".to_owned()))
}

/// A zstd stream of one or more frames (skippable frames skipped), each frame's content checksum
/// verified when it has one. ruzstd's own `StreamingDecoder` reads a single frame.
pub(super) struct ZstdFrames<R: BufRead> {
    src: R,
    decoder: ruzstd::decoding::FrameDecoder,
    in_frame: bool,
}

impl<R: BufRead> ZstdFrames<R> {
    fn new(src: R) -> Self {
        Self {
            src,
            decoder: ruzstd::decoding::FrameDecoder::new(),
            in_frame: false,
        }
    }
}

impl<R: BufRead> Read for ZstdFrames<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use ruzstd::decoding::BlockDecodingStrategy;
        use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
        let invalid = |e: FrameDecoderError| io::Error::new(io::ErrorKind::InvalidData, e);
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.in_frame {
                while self.decoder.can_collect() == 0 && !self.decoder.is_finished() {
                    self.decoder
                        .decode_blocks(&mut self.src, BlockDecodingStrategy::UptoBlocks(1))
                        .map_err(invalid)?;
                }
                let n = self.decoder.read(buf)?;
                if n > 0 {
                    return Ok(n);
                }
                if let (Some(stored), Some(computed)) = (
                    self.decoder.get_checksum_from_data(),
                    self.decoder.get_calculated_checksum(),
                ) && stored != computed
                {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "zstd frame checksum mismatch: stored {stored:08x}, computed {computed:08x}"
                        ),
                    ));
                }
                self.in_frame = false;
            } else {
                if self.src.fill_buf()?.is_empty() {
                    return Ok(0);
                }
                match self.decoder.reset(&mut self.src) {
                    Ok(()) => self.in_frame = true,
                    Err(FrameDecoderError::ReadFrameHeaderError(
                        ReadFrameHeaderError::SkipFrame { length, .. },
                    )) => {
                        let length = u64::from(length);
                        let skipped = io::copy(&mut (&mut self.src).take(length), &mut io::sink())?;
                        if skipped != length {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "zstd skippable frame truncated",
                            ));
                        }
                    }
                    Err(e) => return Err(invalid(e)),
                }
            }
        }
    }
}
