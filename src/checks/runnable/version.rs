//! Running `<binary> version` (bounded in time, in a clean environment) and judging its output
//! against the declared version.

use super::*;

/// `v26.0.0` and `26.0.0` are the same version.
pub(super) fn strip_v(text: &str) -> &str {
    text.trim().strip_prefix(['v', 'V']).unwrap_or(text.trim())
}

/// Whether `version`'s output states `expected`: the whole output, or one of its lines (daemons
/// may log a warning first).
pub fn version_matches(output: &str, expected: &str) -> bool {
    let want = strip_v(expected);
    !want.is_empty()
        && (strip_v(output) == want || output.lines().any(|line| strip_v(line) == want))
}

/// The first lines of an output, for a message.
pub(super) fn excerpt(output: &str) -> String {
    let trimmed = output.trim();
    if trimmed.is_empty() {
        return "nothing".into();
    }
    let mut text: String = trimmed.lines().take(3).collect::<Vec<_>>().join(" / ");
    if text.chars().count() > 200 {
        text = text.chars().take(200).collect::<String>() + "…";
    } else if trimmed.lines().count() > 3 {
        text.push_str(" / …");
    }
    format!("{text:?}")
}

/// Run `<binary> version` and compare what it prints with `expected`; None when it matches.
pub(super) fn version_finding(binary: &Path, stage_lib: &Path, expected: &str) -> Option<Finding> {
    let name = binary.file_name().map_or_else(
        || binary.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let command = format!("`{name} version`");
    let fail = |message: String| Some(Finding::new(Check::Version, message));
    match run_version(binary, stage_lib, VERSION_TIMEOUT) {
        Err(e) => fail(format!("{command} could not be started: {e}")),
        Ok(Ran::TimedOut) => fail(format!(
            "{command} did not finish within {}s (killed); the manifest declares {expected}",
            VERSION_TIMEOUT.as_secs()
        )),
        Ok(Ran::Exited {
            success,
            code,
            output,
        }) => {
            if !success {
                let status = code.map_or("was killed by a signal".into(), |c| {
                    format!("exited with status {c}")
                });
                fail(format!("{command} {status}, printing {}", excerpt(&output)))
            } else if !version_matches(&output, expected) {
                fail(format!(
                    "{command} printed {}; the manifest declares {expected}",
                    excerpt(&output)
                ))
            } else {
                None
            }
        }
    }
}

pub(super) enum Ran {
    Exited {
        success: bool,
        code: Option<i32>,
        /// stdout and stderr, interleaved as written.
        output: String,
    },
    TimedOut,
}

/// `<binary> version` in its own process group: stdin closed, an environment of `PATH`, the
/// stage's `lib/` on `LD_LIBRARY_PATH`, and `HOME`, `TMPDIR` and the working directory a temp dir
/// removed afterwards (no proxy, no credentials, no real home to write config into); killed with
/// everything it started after `timeout`.
pub(super) fn run_version(binary: &Path, stage_lib: &Path, timeout: Duration) -> io::Result<Ran> {
    let home = tempfile::Builder::new()
        .prefix("cvx-version-home-")
        .tempdir()?;
    let mut output = tempfile::tempfile()?;
    let mut command = Command::new(binary);
    command
        .arg("version")
        .env_clear()
        .env("PATH", VERSION_PATH)
        .env("HOME", home.path())
        .env("TMPDIR", home.path())
        .env("LD_LIBRARY_PATH", stage_lib)
        .current_dir(home.path())
        .stdin(Stdio::null())
        .stdout(output.try_clone()?)
        .stderr(output.try_clone()?)
        .process_group(0);
    let mut child = command.spawn()?;
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if start.elapsed() >= timeout {
            // The whole group: a script's own children would hold the output open.
            let _ = rustix::process::kill_process_group(
                rustix::process::Pid::from_child(&child),
                rustix::process::Signal::KILL,
            );
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let Some(status) = status else {
        return Ok(Ran::TimedOut);
    };
    output.rewind()?;
    let mut bytes = Vec::new();
    output.take(64 * 1024).read_to_end(&mut bytes)?;
    Ok(Ran::Exited {
        success: status.success(),
        code: status.code(),
        output: String::from_utf8_lossy(&bytes).into_owned(),
    })
}
