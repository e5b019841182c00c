//! Error text shared by every layer: an error and its causes on one line, and the file error every
//! stage reports the same way. A leaf: imports nothing of cvx, so the stages can report failures
//! without reaching up to `render` or `cli`.

use std::io;
use std::path::PathBuf;

/// An I/O failure on a path, said the one way every stage says it: "cannot {action} {path}",
/// with the OS error as its cause. Each stage's error holds it as its `Io` variant.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {}", path.display())]
pub struct IoError {
    pub action: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// `map_err(io_err("read", path))`: the error of `action` on `path`.
pub fn io_err(
    action: &'static str,
    path: &std::path::Path,
) -> impl FnOnce(io::Error) -> IoError + use<> {
    let path = path.to_path_buf();
    move |source| IoError {
        action,
        path,
        source,
    }
}

/// An error and its causes on one line, for per-action reports and logs.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        cause = c.source();
    }
    message
}
