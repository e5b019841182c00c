//! The host's platform in the manifest's words (Go's `os/arch`). A leaf: imports nothing of cvx.

/// The host's platform in Go's names, as manifests key binaries.
pub fn host_platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    };
    format!("{}/{arch}", std::env::consts::OS)
}
