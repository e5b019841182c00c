//! A temp home and manifest for one test, and the real `cvx` binary to run in it.

use std::fs;
use std::path::PathBuf;

use assert_cmd::Command;
use tempfile::TempDir;

pub struct Ctx {
    pub dir: TempDir,
    pub home: PathBuf,
}

/// sha256 of bytes, as manifests pin it.
pub fn sha256(bytes: &[u8]) -> String {
    cvx::hash::sha256_reader(bytes).unwrap().0
}

pub fn platform() -> String {
    cvx::platform::host_platform()
}

impl Ctx {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        Ctx { dir, home }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Write `cvx.toml` in the test's directory (where `cvx` runs).
    pub fn manifest(&self, text: &str) -> PathBuf {
        let path = self.path("cvx.toml");
        fs::write(&path, text).unwrap();
        path
    }

    /// Write a file under `$DAEMON_HOME/cosmovisor`.
    pub fn stage(&self, rel: &str, bytes: &[u8]) -> PathBuf {
        let path = self.home.join("cosmovisor").join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, bytes).unwrap();
        path
    }

    pub fn cosmovisor(&self, rel: &str) -> PathBuf {
        self.home.join("cosmovisor").join(rel)
    }

    /// `cvx` with a clean environment: no inherited DAEMON_* or CVX_* variables.
    pub fn cvx(&self) -> Command {
        let mut cmd = Command::cargo_bin("cvx").unwrap();
        cmd.current_dir(self.dir.path());
        for (key, _) in std::env::vars() {
            if key.starts_with("DAEMON_")
                || key.starts_with("CVX_")
                || key.starts_with("COSMOVISOR_")
            {
                cmd.env_remove(key);
            }
        }
        cmd.env("NO_COLOR", "1");
        cmd
    }

    /// `cvx plan` against this context's home.
    pub fn plan(&self) -> Command {
        let mut cmd = self.cvx();
        cmd.arg("plan").arg("--home").arg(&self.home);
        cmd
    }

    /// Output with this test's temp directory shown as [TMP], for snapshots.
    pub fn redact(&self, text: &str) -> String {
        text.replace(&self.dir.path().display().to_string(), "[TMP]")
    }
}

/// Run `cmd`, expecting exit `code`; return (stdout, stderr).
pub fn run(cmd: &mut Command, code: i32) -> (String, String) {
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(code),
        "unexpected exit\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    (stdout, stderr)
}
