//! SHA-256, the one integrity check cvx relies on.
//!
//! Backed by aws-lc-rs, the crypto provider that reqwest's rustls already links: its hand-written
//! assembly (SHA-NI, AVX2) is openssl's, so it keeps `openssl dgst -sha256`'s pace on hosts with
//! and without SHA-NI. `scripts/bench-hash` measures it; README has the figures.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use aws_lc_rs::digest;

/// Read size for hashing files: large enough that syscalls do not show in the profile.
const CHUNK: usize = 1 << 20;

/// An incremental SHA-256, fed as bytes arrive.
pub struct Sha256(digest::Context);

impl Sha256 {
    pub fn new() -> Self {
        Self(digest::Context::new(&digest::SHA256))
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The digest as 64 lower-case hex digits, the form manifests pin.
    pub fn finish(self) -> String {
        hex::encode(self.0.finish().as_ref())
    }
}

impl Default for Sha256 {
    fn default() -> Self {
        Self::new()
    }
}

/// The sha256 and size of everything `reader` yields.
pub fn sha256_reader(reader: impl Read) -> io::Result<(String, u64)> {
    hash_with(reader, CHUNK)
}

/// The sha256 and size of the file at `path`, read through a small buffer: for a process that
/// lives for months (`cvx run`), where a freed 1 MiB buffer stays resident in the heap.
pub fn sha256_file_small(path: &Path) -> io::Result<(String, u64)> {
    hash_with(File::open(path)?, 64 << 10)
}

fn hash_with(mut reader: impl Read, chunk: usize) -> io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; chunk];
    let mut size = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hasher.finish(), size))
}

/// The sha256 and size of the file at `path`.
pub fn sha256_file(path: &Path) -> io::Result<(String, u64)> {
    sha256_reader(File::open(path)?)
}

/// Whether `s` is a sha256 written as 64 hex digits (either case), as manifests, `?checksum=`
/// parameters and fetch's arguments carry it.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        let (empty, n) = sha256_reader(&b""[..]).unwrap();
        assert_eq!(n, 0);
        assert_eq!(
            empty,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let mut h = Sha256::new();
        h.update(b"ab");
        h.update(b"c");
        assert_eq!(
            h.finish(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
