//! Will it run here? Checks on a staged binary against this host, before the node needs it:
//!
//! - `elf`: what kind of file it is. An ELF executable is checked further; a script (`#!`) is
//!   legitimately runnable (its interpreter must exist), and only `version` applies to it;
//!   anything else cannot be executed at all.
//! - `arch`: the ELF's machine, class and byte order are the host's.
//! - `libraries`: its program interpreter exists, and every `DT_NEEDED` library is found in the
//!   upgrade's `lib/`, its RPATH/RUNPATH or the system's library directories, built for this
//!   host; libraries found in the upgrade's `lib/` are checked the same way, transitively.
//! - `glibc`: the highest `GLIBC_x.y` symbol version it (or a library of its `lib/`) needs is at
//!   most the host's glibc.
//! - `executable`: the file has an execute bit.
//! - `version`: only when asked ([`Execute::Version`]: `plan --run-version`, and `apply` after
//!   staging), where the manifest declares a version and nothing above failed: `<binary> version`
//!   prints that version, a leading `v` ignored on both sides. It runs with an environment
//!   cleared to `PATH`, `LD_LIBRARY_PATH` (the upgrade's `lib/`), and `HOME`, `TMPDIR` and the
//!   working directory all a temp dir removed afterwards (a daemon may write its config under
//!   `$HOME`); stdin closed; killed with its process group after a timeout.
//!
//! Everything but `version` only reads files: plain `plan` never executes what it finds in the
//! tree, which in CI may come from an untrusted pull request (DESIGN §4). Plan shows the findings
//! as warnings; `apply --strict` fails on them. Nothing here writes outside its temp dir.
//!
//! Here: the findings, the targets of a plan or an apply, and the checks' order. By concern:
//! `host.rs` (what this host offers), `binary.rs` (what an ELF file asks), `version.rs` (running
//! `version`); tests: `tests.rs`.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Seek};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use object::read::ReadCache;
use object::read::elf::{FileHeader, ProgramHeader};
use object::{Endianness, elf};
use schemars::JsonSchema;
use serde::Serialize;

use crate::apply::{Report, Status};
use crate::plan::{ArtifactKind, ArtifactState, ManifestKey, Plan};
use crate::tree::Layout;

mod binary;
mod host;
mod version;

use self::binary::*;
pub use host::{Arch, GlibcVersion, Host};
pub use version::version_matches;
use version::*;

/// How long `<binary> version` may take before it is killed.
pub const VERSION_TIMEOUT: Duration = Duration::from_secs(5);

/// Binaries checked at once (each may start a daemon's `version`).
const WORKERS: usize = 4;

/// `PATH` for `version`: the system's directories only (a `#!/usr/bin/env sh` script needs one).
const VERSION_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Whether the checks may execute the staged binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Execute {
    /// Read the files only: `plan` by default.
    Nothing,
    /// Also run `<binary> version` where the manifest declares a version.
    Version,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// Not an executable format this host can run (neither an ELF executable nor a script).
    Elf,
    /// An ELF for another machine, class or byte order.
    Arch,
    /// The program interpreter or a `DT_NEEDED` library is missing, or built for another machine.
    Libraries,
    /// It needs a newer glibc than the host's.
    Glibc,
    /// No execute permission.
    Executable,
    /// `<binary> version` did not print the manifest's version (or failed, or timed out).
    Version,
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Check::Elf => "elf",
            Check::Arch => "arch",
            Check::Libraries => "libraries",
            Check::Glibc => "glibc",
            Check::Executable => "executable",
            Check::Version => "version",
        })
    }
}

/// One reason a staged binary may not run on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
pub struct Finding {
    pub check: Check,
    pub message: String,
}

impl Finding {
    fn new(check: Check, message: impl Into<String>) -> Self {
        Finding {
            check,
            message: message.into(),
        }
    }
}

/// The findings on one staged binary of the host's platform (only binaries with findings).
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct RunnableCheck {
    /// Relative to `$DAEMON_HOME/cosmovisor`, e.g. `upgrades/v26/bin/osmosisd`.
    pub destination: String,
    /// Where the manifest pins it.
    pub key: ManifestKey,
    pub findings: Vec<Finding>,
}

/// Check the file at `binary`, staged with the libraries in `stage_lib`, against `host`; run
/// `<binary> version` when `expected_version` is declared and nothing else stands in the way.
pub fn check(
    binary: &Path,
    stage_lib: &Path,
    expected_version: Option<&str>,
    host: &Host,
) -> Vec<Finding> {
    let mut findings = Vec::new();
    let meta = match fs::metadata(binary) {
        Ok(meta) => meta,
        Err(e) => return vec![Finding::new(Check::Elf, format!("cannot read it: {e}"))],
    };
    match read_file_kind(binary) {
        Err(e) => findings.push(Finding::new(Check::Elf, format!("cannot read it: {e}"))),
        Ok(Kind::Other(head)) => findings.push(Finding::new(
            Check::Elf,
            format!(
                "neither an ELF executable nor a script (#!): the kernel cannot run it (it starts with {:?})",
                String::from_utf8_lossy(&head)
            ),
        )),
        Ok(Kind::BadElf(e)) => {
            findings.push(Finding::new(Check::Elf, format!("a malformed ELF file: {e}")))
        }
        // A script is runnable as such; only its interpreter and `version` can be checked.
        Ok(Kind::Script(interpreter)) => {
            if interpreter.starts_with('/') && !Path::new(&interpreter).exists() {
                findings.push(Finding::new(
                    Check::Elf,
                    format!("a script whose interpreter {interpreter} does not exist here"),
                ));
            }
        }
        Ok(Kind::Elf(info)) => elf_findings(binary, &info, stage_lib, host, &mut findings),
    }
    if meta.permissions().mode() & 0o111 == 0 {
        findings.push(Finding::new(
            Check::Executable,
            format!(
                "mode {:04o}: not executable, so the node cannot be started from it (apply stages binaries 0755)",
                meta.permissions().mode() & 0o7777
            ),
        ));
    }
    if let Some(expected) = expected_version
        && findings.is_empty()
        && let Some(finding) = version_finding(binary, stage_lib, expected)
    {
        findings.push(finding);
    }
    findings
}

/// One binary to check.
struct Target {
    destination: String,
    key: ManifestKey,
    path: PathBuf,
    stage_lib: PathBuf,
    version: Option<String>,
}

/// Check `targets` a few at a time; the ones with findings, in order.
fn check_all(targets: Vec<Target>, execute: Execute) -> Vec<RunnableCheck> {
    if targets.is_empty() {
        return Vec::new();
    }
    let host = Host::detect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Vec<Finding>>> =
        targets.iter().map(|_| Default::default()).collect();
    std::thread::scope(|scope| {
        for _ in 0..WORKERS.min(targets.len()) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(t) = targets.get(i) else { break };
                    let version = match execute {
                        Execute::Version => t.version.as_deref(),
                        Execute::Nothing => None,
                    };
                    let findings = check(&t.path, &t.stage_lib, version, &host);
                    *results[i].lock().expect("no worker panics") = findings;
                }
            });
        }
    });
    targets
        .into_iter()
        .zip(results)
        .filter_map(|(t, r)| {
            let findings = r.into_inner().expect("no worker panics");
            (!findings.is_empty()).then_some(RunnableCheck {
                destination: t.destination,
                key: t.key,
                findings,
            })
        })
        .collect()
}

/// The binaries of `plan` that pass `keep`, when the plan is for this host's platform.
fn targets(
    plan: &Plan,
    layout: &Layout,
    keep: impl Fn(&crate::plan::ArtifactPlan) -> bool,
) -> Vec<Target> {
    if plan.platform != crate::platform::host_platform() {
        return Vec::new();
    }
    // Absolute: `version` runs in a temp dir, with the stage's lib/ on LD_LIBRARY_PATH.
    let root = std::path::absolute(layout.root()).unwrap_or_else(|_| layout.root());
    plan.upgrades
        .iter()
        .flat_map(|stage| {
            stage
                .artifacts
                .iter()
                .filter(|a| a.kind == ArtifactKind::Binary && keep(a))
                .map(|a| Target {
                    destination: a.destination.clone(),
                    key: a.key.clone(),
                    path: root.join(&a.destination),
                    stage_lib: root.join(&stage.dir).join("lib"),
                    version: stage.version.clone(),
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// For `cvx plan`: every binary of the host's platform that is staged and verified (state `ok`),
/// when the plan is for this host. `version` runs only with [`Execute::Version`]
/// (`--run-version`): by default nothing found in the tree is executed.
pub fn check_plan(plan: &Plan, execute: Execute) -> Vec<RunnableCheck> {
    let Some(home) = &plan.home else {
        return Vec::new();
    };
    check_all(
        targets(plan, &Layout::new(home), |a| a.state == ArtifactState::Ok),
        execute,
    )
}

/// For `cvx apply`: every binary now in place (unchanged or staged by this run), `version`
/// included: the host asked for these bytes. The findings are logged as warnings; with `strict`
/// as errors, and they make the report fail (the files stay staged: they are the verified bytes).
pub fn after_apply(report: &mut Report, plan: &Plan, layout: &Layout, strict: bool) {
    let in_place = |a: &crate::plan::ArtifactPlan| {
        report.actions.iter().any(|action| {
            action.destination == a.destination
                && matches!(action.status, Status::Changed | Status::Unchanged)
        })
    };
    let checks = check_all(targets(plan, layout, in_place), Execute::Version);
    if checks.is_empty() {
        return;
    }
    for c in &checks {
        for f in &c.findings {
            if strict {
                tracing::error!("{} ({}): {}", c.destination, f.check, f.message);
            } else {
                tracing::warn!("{} ({}): {}", c.destination, f.check, f.message);
            }
        }
    }
    if strict {
        let list: Vec<String> = checks
            .iter()
            .flat_map(|c| {
                c.findings
                    .iter()
                    .map(move |f| format!("{} ({}): {}", c.destination, f.check, f.message))
            })
            .collect();
        report.failed = true;
        report.error = Some(format!(
            "--strict: {} staged binar{} will not run as declared on this host: {}",
            checks.len(),
            if checks.len() == 1 { "y" } else { "ies" },
            list.join("; ")
        ));
    }
}

#[cfg(test)]
mod tests;
